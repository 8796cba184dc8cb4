/* Request bodies of the HTTP API: parsed with cJSON and checked field by field, so every
 * rejection names the field. This is the part that sees outside input first, hence it has
 * its own fuzz target (tests/fuzz/fuzz_http_body.c) and no dependency on the server. */
#include <math.h>
#include <stdio.h>
#include <string.h>

#include <cjson/cJSON.h>

#include "ckpt/server.h"
#include "core/internal.h"

/* Names end up in URLs, file names and metric labels: a small alphabet keeps all of them
 * free of escaping. */
#define NAME_LEN_MAX 128

int ckpt_http_name_valid(const char *name)
{
    size_t n = name ? strlen(name) : 0;
    if (n == 0 || n > NAME_LEN_MAX || name[0] == '.' || name[0] == '-') return 0;
    for (size_t i = 0; i < n; i++) {
        char c = name[i];
        int ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
                 c == '.' || c == '_' || c == '-';
        if (!ok) return 0;
    }
    return 1;
}

/* Every rejection: the field goes to the caller (the JSON "field"), the text to the
 * thread's last error. fmt has one %s: the field. */
static int bad(char *field, size_t cap, const char *name, int status, const char *fmt)
{
    if (!name) name = "";
    if (cap) snprintf(field, cap, "%s", name);
    return ckpt__error(status, fmt, name);
}

static int int_value(const cJSON *item, double lo, double hi, double *out)
{
    if (!cJSON_IsNumber(item)) return 0;
    double v = item->valuedouble;
    if (!isfinite(v) || floor(v) != v || v < lo || v > hi) return 0;
    *out = v;
    return 1;
}

/* cJSON decodes \u0000 into a NUL and keeps C strings, so "a\u0000b" would arrive as "a":
 * a path cut at the NUL names another file. cJSON keeps no lengths, so the raw text is
 * scanned instead: returns 1 when a string holds the escape, with field = the top-level
 * key it belongs to (the key itself when it is in a key). The body already parsed. */
static int nul_escape(const char *b, size_t n, char *field, size_t cap)
{
    int depth = 0, in_str = 0, key_next = 0, is_key = 0;
    size_t str_at = 0, key_at = 0, key_len = 0;
    for (size_t i = 0; i < n; i++) {
        char c = b[i];
        if (in_str) {
            if (c == '\\') {
                if (i + 5 < n && b[i + 1] == 'u' && memcmp(b + i + 2, "0000", 4) == 0) {
                    size_t at = is_key ? str_at : key_at, len = is_key ? i - str_at : key_len;
                    if (cap) snprintf(field, cap, "%.*s", (int)CKPT_MIN(len, cap - 1), b + at);
                    return 1;
                }
                i++; /* the escaped character, so \\u0000 is text, not the escape */
            } else if (c == '"') {
                in_str = 0;
                if (is_key) key_at = str_at, key_len = i - str_at;
            }
            continue;
        }
        if (c == '"') {
            in_str = 1;
            str_at = i + 1;
            is_key = depth == 1 && key_next;
            key_next = 0;
        } else if (c == '{' || c == '[') {
            if (++depth == 1) key_next = c == '{';
        } else if (c == '}' || c == ']') {
            depth--;
        } else if (c == ',' && depth == 1) {
            key_next = 1;
        }
    }
    return 0;
}

/* cJSON keeps every member of an object, duplicates included, and the validators would
 * let the last one win: a proxy that checked the first sees another request than we run.
 * Called for each member in order; every field before item is known and distinct (unknown
 * ones are refused as they come), so this costs at most a dozen comparisons. */
static int dup_key(const cJSON *root, const cJSON *item, char *field, size_t cap)
{
    for (const cJSON *g = root->child; g && g != item; g = g->next)
        if (strcmp(g->string, item->string) == 0)
            return bad(field, cap, item->string, CKPT_EINVAL,
                       "'%s' is given twice: give each field once");
    return 0;
}

static int parse_object(const char *body, size_t len, cJSON **out, char *field, size_t cap)
{
    if (len == 0) {
        *out = cJSON_CreateObject(); /* an empty body means "all defaults" */
        return *out ? 0 : ckpt__error(CKPT_ENOMEM, "out of memory");
    }
    /* cJSON_ParseWithLength needs no NUL, so embedded NULs and unterminated input are
     * handled; require_null_terminated is irrelevant then. */
    const char *end = NULL;
    cJSON *root = cJSON_ParseWithLengthOpts(body, len, &end, 0);
    if (!root) {
        size_t at = end && end >= body ? (size_t)(end - body) : 0;
        if (cap) field[0] = '\0';
        return ckpt__error(CKPT_EFORMAT, "malformed JSON body near byte %zu", at);
    }
    if (!cJSON_IsObject(root)) {
        cJSON_Delete(root);
        if (cap) field[0] = '\0';
        return ckpt__error(CKPT_EINVAL, "the body must be a JSON object");
    }
    if (nul_escape(body, len, field, cap)) {
        cJSON_Delete(root);
        return ckpt__error(CKPT_EINVAL,
                           "'%s' holds a NUL character (\\u0000): paths, names and URLs "
                           "cannot contain one",
                           cap ? field : "");
    }
    *out = root;
    return 0;
}

static int get_string(const cJSON *item, char *dst, size_t dcap, char *field, size_t cap)
{
    if (!cJSON_IsString(item) || !item->valuestring)
        return bad(field, cap, item->string, CKPT_EINVAL, "'%s' must be a string");
    if (ckpt__strlcpy(dst, item->valuestring, dcap) != 0)
        return bad(field, cap, item->string, CKPT_ETOOBIG, "'%s' is too long");
    if (strlen(item->valuestring) != strlen(dst))
        return bad(field, cap, item->string, CKPT_EINVAL, "'%s' contains a NUL byte");
    return 0;
}

/* JSON numbers are doubles: an integer field must hold an exact integer in range. */
static int get_int(const cJSON *item, double lo, double hi, double *out, char *field,
                   size_t cap)
{
    if (!cJSON_IsNumber(item))
        return bad(field, cap, item->string, CKPT_EINVAL, "'%s' must be an integer");
    double v = item->valuedouble;
    if (!isfinite(v) || floor(v) != v)
        return bad(field, cap, item->string, CKPT_EINVAL, "'%s' must be an integer");
    if (v < lo || v > hi)
        return bad(field, cap, item->string, CKPT_EINVAL, "'%s' is out of range");
    *out = v;
    return 0;
}

static int ends_with(const char *s, const char *suffix)
{
    size_t a = strlen(s), b = strlen(suffix);
    return a >= b && strcmp(s + a - b, suffix) == 0;
}

/* checkpoint-engine's {"files": [...]}: one entry is any path we register (a file, a
 * directory or an index.json); several must be safetensors files, registered together as
 * one checkpoint (the engine shards all their tensors over the ranks, as for a directory). */
static int parse_files(const cJSON *item, ckpt_http_job_t *job, char *field, size_t cap)
{
    if (!cJSON_IsArray(item) || cJSON_GetArraySize(item) < 1)
        return bad(field, cap, "files", CKPT_EINVAL,
                   "'%s' must be a non-empty array of paths");
    int n = cJSON_GetArraySize(item);
    size_t total = 0;
    const cJSON *f;
    cJSON_ArrayForEach(f, item)
    {
        if (!cJSON_IsString(f) || !f->valuestring || !f->valuestring[0])
            return bad(field, cap, "files", CKPT_EINVAL, "'%s' must hold non-empty path strings");
        size_t len = strlen(f->valuestring);
        if (len >= CKPT_HTTP_PATH_MAX)
            return bad(field, cap, "files", CKPT_ETOOBIG, "'%s' holds a path that is too long");
        if (n > 1 && !ends_with(f->valuestring, ".safetensors"))
            return bad(field, cap, "files", CKPT_EINVAL,
                       "'%s' lists several paths: each must be a .safetensors file (a "
                       "directory or an index.json is registered alone)");
        for (const cJSON *g = item->child; g != f; g = g->next)
            if (strcmp(g->valuestring, f->valuestring) == 0)
                return bad(field, cap, "files", CKPT_EINVAL, "'%s' lists a file twice");
        total += len + 1;
    }
    if (n == 1) return get_string(item->child, job->path, sizeof job->path, field, cap) == 0
                           ? 0
                           : bad(field, cap, "files", CKPT_EINVAL, "'%s' must hold a path string");
    char *list = ckpt__malloc(total);
    if (!list) return bad(field, cap, "files", CKPT_ENOMEM, "'%s': out of memory");
    size_t at = 0;
    cJSON_ArrayForEach(f, item)
    {
        size_t len = strlen(f->valuestring) + 1;
        memcpy(list + at, f->valuestring, len);
        at += len;
    }
    ckpt__free(job->files);
    job->files = list;
    job->files_len = total;
    job->nfiles = n;
    return 0;
}

void ckpt_http_job_release(ckpt_http_job_t *job)
{
    if (!job) return;
    ckpt__free(job->files);
    job->files = NULL;
    job->files_len = 0;
    job->nfiles = 0;
}

int ckpt_http_parse_register(const char *body, size_t len, ckpt_http_job_t *job, char *field,
                             size_t cap)
{
    cJSON *root = NULL;
    int rc = parse_object(body, len, &root, field, cap);
    if (rc) return rc;
    int have_path = 0, have_files = 0;
    const cJSON *item;
    cJSON_ArrayForEach(item, root)
    {
        if ((rc = dup_key(root, item, field, cap))) goto cleanup;
        if (strcmp(item->string, "path") == 0) {
            if ((rc = get_string(item, job->path, sizeof job->path, field, cap))) goto cleanup;
            have_path = 1;
        } else if (strcmp(item->string, "files") == 0) {
            if ((rc = parse_files(item, job, field, cap))) goto cleanup;
            have_files = 1;
        } else {
            rc = bad(field, cap, item->string, CKPT_EINVAL, "unknown field '%s'");
            goto cleanup;
        }
    }
    if (have_path && have_files) {
        rc = bad(field, cap, "files", CKPT_EINVAL, "give 'path' or '%s', not both");
        goto cleanup;
    }
    if ((!have_path && !have_files) || (!job->nfiles && job->path[0] == '\0'))
        rc = bad(field, cap, have_files ? "files" : "path", CKPT_EINVAL, "'%s' is required");
cleanup:
    /* A rejected body leaves nothing allocated behind. */
    if (rc) ckpt_http_job_release(job);
    cJSON_Delete(root);
    return rc;
}

static int parse_ranks(const cJSON *item, int32_t *dst, int *n_out, char *field, size_t cap)
{
    const char *k = item->string;
    if (!cJSON_IsArray(item))
        return bad(field, cap, k, CKPT_EINVAL, "'%s' must be an array of ranks");
    int n = cJSON_GetArraySize(item);
    if (n > CKPT_HTTP_MAX_RANKS)
        return bad(field, cap, k, CKPT_ETOOBIG, "'%s' lists too many ranks");
    int i = 0;
    const cJSON *r;
    cJSON_ArrayForEach(r, item)
    {
        double v;
        if (!int_value(r, 0, CKPT_HTTP_MAX_RANKS - 1, &v))
            return bad(field, cap, k, CKPT_EINVAL,
                       "'%s' must hold integer ranks from 0 to 1023");
        for (int j = 0; j < i; j++)
            if (dst[j] == (int32_t)v)
                return bad(field, cap, k, CKPT_EINVAL, "'%s' lists a rank twice");
        dst[i++] = (int32_t)v;
    }
    *n_out = i;
    return 0;
}

static int valid_method(const char *m)
{
    if (!*m) return 0;
    for (; *m; m++)
        if (!((*m >= 'a' && *m <= 'z') || (*m >= 'A' && *m <= 'Z') ||
              (*m >= '0' && *m <= '9') || *m == '_' || *m == '.'))
            return 0;
    return 1;
}

static int http_url(const char *u)
{
    return strncmp(u, "http://", 7) == 0 || strncmp(u, "https://", 8) == 0;
}

static int parse_update_field(const cJSON *item, ckpt_http_job_t *job, int *have_timeout,
                              char *field, size_t cap)
{
    const char *k = item->string;
    double v;
    int rc;
    if (strcmp(k, "mode") == 0) {
        if ((rc = get_string(item, job->mode, sizeof job->mode, field, cap))) return rc;
        if (strcmp(job->mode, "broadcast") != 0 && strcmp(job->mode, "p2p") != 0)
            return bad(field, cap, k, CKPT_EINVAL, "'%s' must be \"broadcast\" or \"p2p\"");
    } else if (strcmp(k, "ranks") == 0) {
        return parse_ranks(item, job->ranks, &job->nranks, field, cap);
    } else if (strcmp(k, "inference_group_ranks") == 0) {
        return parse_ranks(item, job->group_ranks, &job->ngroup_ranks, field, cap);
    } else if (strcmp(k, "timeout_ms") == 0) {
        /* A day bounds every wait: longer is a typo, not a plan. */
        if ((rc = get_int(item, 1, 86400000, &v, field, cap))) return rc;
        job->timeout_ms = (int)v;
    } else if (strcmp(k, "timeout") == 0) {
        /* checkpoint-engine's timeout: seconds, fractional. */
        if (!cJSON_IsNumber(item) || !isfinite(item->valuedouble))
            return bad(field, cap, k, CKPT_EINVAL, "'%s' must be a number of seconds");
        if (item->valuedouble <= 0 || item->valuedouble > 86400)
            return bad(field, cap, k, CKPT_EINVAL, "'%s' must be seconds in (0, 86400]");
        job->timeout_ms = (int)ceil(item->valuedouble * 1000.0);
        *have_timeout = 1;
    } else if (strcmp(k, "bucket_max") == 0) {
        if (cJSON_IsString(item)) {
            uint64_t b = 0;
            if (ckpt_parse_size(item->valuestring, &b) != 0 || b == 0)
                return bad(field, cap, k, CKPT_EINVAL,
                           "'%s' must be a byte count or a size such as \"256MiB\"");
            job->bucket_max = b;
        } else {
            if ((rc = get_int(item, 1, 9007199254740992.0, &v, field, cap))) return rc;
            job->bucket_max = (uint64_t)v;
        }
    } else if (strcmp(k, "verify") == 0 || strcmp(k, "partial") == 0 ||
               strcmp(k, "isolate") == 0) {
        if (!cJSON_IsBool(item))
            return bad(field, cap, k, CKPT_EINVAL, "'%s' must be true or false");
        int on = cJSON_IsTrue(item) ? 1 : 0;
        if (k[0] == 'v') job->verify = on;
        else if (k[0] == 'p') job->partial = on;
        else job->isolate = on;
    } else if (strcmp(k, "unneeded") == 0) {
        char how[8];
        if (get_string(item, how, sizeof how, field, cap) ||
            (strcmp(how, "ignore") != 0 && strcmp(how, "error") != 0))
            return bad(field, cap, k, CKPT_EINVAL, "'%s' must be \"ignore\" or \"error\"");
        job->ignore_unneeded = strcmp(how, "ignore") == 0;
    } else if (strcmp(k, "update_url") == 0) {
        if ((rc = get_string(item, job->update_url, sizeof job->update_url, field, cap)))
            return rc;
        if (!http_url(job->update_url))
            return bad(field, cap, k, CKPT_EINVAL, "'%s' must be an http:// or https:// URL");
    } else if (strcmp(k, "metas_url") == 0) {
        if ((rc = get_string(item, job->metas_url, sizeof job->metas_url, field, cap)))
            return rc;
        if (!http_url(job->metas_url))
            return bad(field, cap, k, CKPT_EINVAL, "'%s' must be an http:// or https:// URL");
    } else if (strcmp(k, "trigger_method") == 0) {
        if ((rc = get_string(item, job->trigger_method, sizeof job->trigger_method, field,
                             cap)))
            return rc;
        if (!valid_method(job->trigger_method))
            return bad(field, cap, k, CKPT_EINVAL,
                       "'%s' must be a method name ([A-Za-z0-9_.])");
    } else if (strcmp(k, "uds") == 0) {
        if ((rc = get_string(item, job->uds, sizeof job->uds, field, cap)))
            return rc == CKPT_ETOOBIG
                       ? bad(field, cap, k, CKPT_EINVAL,
                             "'%s' is longer than a Unix socket path can be (107 bytes)")
                       : rc;
        if (job->uds[0] != '/')
            return bad(field, cap, k, CKPT_EINVAL,
                       "'%s' must be an absolute path (the inference server's Unix socket)");
    } else if (strcmp(k, "pause") == 0) {
        if ((rc = get_string(item, job->pause, sizeof job->pause, field, cap)) ||
            (strcmp(job->pause, "wait") != 0 && strcmp(job->pause, "abort") != 0 &&
             strcmp(job->pause, "keep") != 0 && strcmp(job->pause, "off") != 0))
            return bad(field, cap, k, CKPT_EINVAL,
                       "'%s' must be \"wait\", \"abort\", \"keep\" or \"off\"");
    } else {
        return bad(field, cap, k, CKPT_EINVAL, "unknown field '%s'");
    }
    return 0;
}

/* Known fields set to null mean "the default": checkpoint-engine's clients send
 * "update_url": null, "uds": null. */
static int known_update_field(const char *k)
{
    static const char *const known[] = {"mode", "ranks", "inference_group_ranks", "timeout_ms",
                                        "timeout", "bucket_max", "verify", "update_url",
                                        "metas_url", "trigger_method", "uds", "pause",
                                        "partial", "isolate", "unneeded"};
    for (size_t i = 0; i < sizeof known / sizeof known[0]; i++)
        if (strcmp(k, known[i]) == 0) return 1;
    return 0;
}

int ckpt_http_trigger_base(const char *update_url, char *base, size_t cap)
{
    static const char suffix[] = "/collective_rpc";
    if (!update_url || !ends_with(update_url, suffix)) return 0;
    size_t n = strlen(update_url) - (sizeof suffix - 1);
    if (n + 1 > cap) return 0;
    memcpy(base, update_url, n);
    base[n] = '\0';
    return 1;
}

int ckpt_http_parse_update(const char *body, size_t len, ckpt_http_job_t *job, char *field,
                           size_t cap)
{
    cJSON *root = NULL;
    int rc = parse_object(body, len, &root, field, cap);
    if (rc) return rc;
    snprintf(job->mode, sizeof job->mode, "broadcast");
    job->verify = -1;
    job->partial = 0;
    job->isolate = 0;
    job->ignore_unneeded = 0;
    job->nranks = 0;
    job->ngroup_ranks = 0;
    int have_timeout = 0, have_timeout_ms = 0;
    const cJSON *item;
    cJSON_ArrayForEach(item, root)
    {
        if ((rc = dup_key(root, item, field, cap))) goto cleanup;
        if (cJSON_IsNull(item) && known_update_field(item->string)) continue;
        if (strcmp(item->string, "timeout_ms") == 0) have_timeout_ms = 1;
        if ((rc = parse_update_field(item, job, &have_timeout, field, cap))) goto cleanup;
    }
    char base[CKPT_HTTP_URL_MAX];
    if (have_timeout && have_timeout_ms)
        rc = bad(field, cap, "timeout", CKPT_EINVAL,
                 "give '%s' (seconds, checkpoint-engine's) or 'timeout_ms', not both");
    else if (strcmp(job->mode, "p2p") == 0 && !job->metas_url[0])
        rc = bad(field, cap, "metas_url", CKPT_EINVAL,
                 "'%s' is required with \"mode\": \"p2p\": the serving deployment's "
                 "GET /v1/checkpoints/{name}/metas URL");
    else if (job->metas_url[0] && strcmp(job->mode, "p2p") != 0)
        rc = bad(field, cap, "metas_url", CKPT_EINVAL, "'%s' goes with \"mode\": \"p2p\"");
    else if (job->trigger_method[0] && !job->update_url[0])
        rc = bad(field, cap, "trigger_method", CKPT_EINVAL, "'%s' needs an update_url");
    else if (job->ngroup_ranks && !job->update_url[0])
        rc = bad(field, cap, "inference_group_ranks", CKPT_EINVAL,
                 "'%s' maps the triggered workers to engine ranks: it needs an update_url");
    else if (job->uds[0] && !job->update_url[0])
        rc = bad(field, cap, "uds", CKPT_EINVAL,
                 "'%s' needs an update_url (its path is the request's, e.g. "
                 "http://localhost/collective_rpc)");
    else if (job->pause[0] && strcmp(job->pause, "off") != 0 &&
             !ckpt_http_trigger_base(job->update_url, base, sizeof base))
        rc = bad(field, cap, "pause", CKPT_EINVAL,
                 "'%s' pauses vLLM: it needs an update_url ending in /collective_rpc (the "
                 "pause and resume endpoints are beside it)");
cleanup:
    cJSON_Delete(root);
    return rc;
}

int ckpt_http_parse_gather_metas(const char *body, size_t len, double *timeout_s, char *field,
                                 size_t cap)
{
    cJSON *root = NULL;
    int rc = parse_object(body, len, &root, field, cap);
    if (rc) return rc;
    const cJSON *item;
    cJSON_ArrayForEach(item, root)
    {
        if ((rc = dup_key(root, item, field, cap))) break;
        if (strcmp(item->string, "timeout") != 0) {
            rc = bad(field, cap, item->string, CKPT_EINVAL, "unknown field '%s'");
            break;
        }
        if (cJSON_IsNull(item)) continue;
        if (!cJSON_IsNumber(item) || !isfinite(item->valuedouble) || item->valuedouble < 0 ||
            item->valuedouble > 86400) {
            rc = bad(field, cap, "timeout", CKPT_EINVAL, "'%s' must be seconds in [0, 86400]");
            break;
        }
        *timeout_s = item->valuedouble;
    }
    cJSON_Delete(root);
    return rc;
}
