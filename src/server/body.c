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

int ckpt_http_parse_register(const char *body, size_t len, ckpt_http_job_t *job, char *field,
                             size_t cap)
{
    cJSON *root = NULL;
    int rc = parse_object(body, len, &root, field, cap);
    if (rc) return rc;
    int have_path = 0;
    const cJSON *item;
    cJSON_ArrayForEach(item, root)
    {
        if (strcmp(item->string, "path") == 0) {
            if ((rc = get_string(item, job->path, sizeof job->path, field, cap))) goto cleanup;
            have_path = 1;
        } else if (strcmp(item->string, "files") == 0) {
            /* The engine registers one path (file, directory or index.json); a list is
             * accepted in the reference API's shape only when it names one path. */
            if (!cJSON_IsArray(item) || cJSON_GetArraySize(item) != 1) {
                rc = bad(field, cap, "files", CKPT_EINVAL,
                         "'%s' must be an array of one path (a file, a directory or an "
                         "index.json)");
                goto cleanup;
            }
            cJSON *first = cJSON_GetArrayItem(item, 0);
            if (!cJSON_IsString(first) ||
                ckpt__strlcpy(job->path, first->valuestring, sizeof job->path) != 0) {
                rc = bad(field, cap, "files", CKPT_EINVAL, "'%s' must hold a path string");
                goto cleanup;
            }
            have_path = 1;
        } else {
            rc = bad(field, cap, item->string, CKPT_EINVAL, "unknown field '%s'");
            goto cleanup;
        }
    }
    if (!have_path || job->path[0] == '\0') {
        rc = bad(field, cap, "path", CKPT_EINVAL, "'%s' is required");
        goto cleanup;
    }
cleanup:
    cJSON_Delete(root);
    return rc;
}

static int parse_ranks(const cJSON *item, ckpt_http_job_t *job, char *field, size_t cap)
{
    if (!cJSON_IsArray(item))
        return bad(field, cap, "ranks", CKPT_EINVAL, "'%s' must be an array of ranks");
    int n = cJSON_GetArraySize(item);
    if (n > CKPT_HTTP_MAX_RANKS)
        return bad(field, cap, "ranks", CKPT_ETOOBIG, "'%s' lists too many ranks");
    int i = 0;
    const cJSON *r;
    cJSON_ArrayForEach(r, item)
    {
        double v;
        if (!int_value(r, 0, 1 << 30, &v))
            return bad(field, cap, "ranks", CKPT_EINVAL,
                       "'%s' must hold non-negative integer ranks");
        for (int k = 0; k < i; k++)
            if (job->ranks[k] == (int32_t)v)
                return bad(field, cap, "ranks", CKPT_EINVAL, "'%s' lists a rank twice");
        job->ranks[i++] = (int32_t)v;
    }
    job->nranks = i;
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

static int parse_update_field(const cJSON *item, ckpt_http_job_t *job, char *field, size_t cap)
{
    const char *k = item->string;
    double v;
    int rc;
    if (strcmp(k, "mode") == 0) {
        if ((rc = get_string(item, job->mode, sizeof job->mode, field, cap))) return rc;
        if (strcmp(job->mode, "broadcast") != 0 && strcmp(job->mode, "p2p") != 0)
            return bad(field, cap, k, CKPT_EINVAL, "'%s' must be \"broadcast\" or \"p2p\"");
    } else if (strcmp(k, "ranks") == 0) {
        return parse_ranks(item, job, field, cap);
    } else if (strcmp(k, "timeout_ms") == 0) {
        /* A day bounds every wait: longer is a typo, not a plan. */
        if ((rc = get_int(item, 1, 86400000, &v, field, cap))) return rc;
        job->timeout_ms = (int)v;
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
    } else if (strcmp(k, "verify") == 0) {
        if (!cJSON_IsBool(item))
            return bad(field, cap, k, CKPT_EINVAL, "'%s' must be true or false");
        job->verify = cJSON_IsTrue(item) ? 1 : 0;
    } else if (strcmp(k, "update_url") == 0) {
        if ((rc = get_string(item, job->update_url, sizeof job->update_url, field, cap)))
            return rc;
        if (strncmp(job->update_url, "http://", 7) != 0 &&
            strncmp(job->update_url, "https://", 8) != 0)
            return bad(field, cap, k, CKPT_EINVAL, "'%s' must be an http:// or https:// URL");
    } else if (strcmp(k, "metas_url") == 0) {
        if ((rc = get_string(item, job->metas_url, sizeof job->metas_url, field, cap)))
            return rc;
        if (strncmp(job->metas_url, "http://", 7) != 0 &&
            strncmp(job->metas_url, "https://", 8) != 0)
            return bad(field, cap, k, CKPT_EINVAL, "'%s' must be an http:// or https:// URL");
    } else if (strcmp(k, "trigger_method") == 0) {
        if ((rc = get_string(item, job->trigger_method, sizeof job->trigger_method, field,
                             cap)))
            return rc;
        if (!valid_method(job->trigger_method))
            return bad(field, cap, k, CKPT_EINVAL,
                       "'%s' must be a method name ([A-Za-z0-9_.])");
    } else {
        return bad(field, cap, k, CKPT_EINVAL, "unknown field '%s'");
    }
    return 0;
}

int ckpt_http_parse_update(const char *body, size_t len, ckpt_http_job_t *job, char *field,
                           size_t cap)
{
    cJSON *root = NULL;
    int rc = parse_object(body, len, &root, field, cap);
    if (rc) return rc;
    snprintf(job->mode, sizeof job->mode, "broadcast");
    job->verify = -1;
    job->nranks = 0;
    const cJSON *item;
    cJSON_ArrayForEach(item, root)
    {
        if ((rc = parse_update_field(item, job, field, cap))) goto cleanup;
    }
    if (job->nranks > 0 && strcmp(job->mode, "p2p") != 0)
        rc = bad(field, cap, "ranks", CKPT_EINVAL,
                 "'%s' selects receivers of a p2p update; use \"mode\": \"p2p\"");
    if (!rc && strcmp(job->mode, "p2p") == 0 && !job->metas_url[0])
        rc = bad(field, cap, "metas_url", CKPT_EINVAL,
                 "'%s' is required with \"mode\": \"p2p\": the serving deployment's "
                 "GET /v1/checkpoints/{name}/metas URL");
    if (!rc && job->metas_url[0] && strcmp(job->mode, "p2p") != 0)
        rc = bad(field, cap, "metas_url", CKPT_EINVAL, "'%s' goes with \"mode\": \"p2p\"");
    if (!rc && job->trigger_method[0] && !job->update_url[0])
        rc = bad(field, cap, "trigger_method", CKPT_EINVAL, "'%s' needs an update_url");
cleanup:
    cJSON_Delete(root);
    return rc;
}
