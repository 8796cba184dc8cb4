/* Tells the inference server to attach its workers to an update: one HTTP POST in the
 * shape of vLLM's dev-mode POST /collective_rpc ({"method", "args", "kwargs", "timeout"}),
 * which calls `method` on every worker with the kwargs. The workers then connect to their
 * engine rank's socket (kwargs.socket_paths[worker]). Around it, vLLM's generation is
 * paused (POST /pause) and resumed (POST /resume) only after a good update, so a failed
 * one never leaves vLLM serving a mix of old and new weights unnoticed. */
#include <limits.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdlib.h>
#include <unistd.h>
#include <stdio.h>
#include <string.h>

#include <cjson/cJSON.h>
#include <curl/curl.h>

#include "ckpt/server.h"
#include "core/internal.h"

/* The method of our vLLM worker extension (ckpt_engine.vllm.CkptEngineExtension). */
#define DEFAULT_METHOD "ckpt_engine_update"

int ckpt_trigger_body(const ckpt_trigger_request_t *req, char *buf, size_t cap)
{
    if (!req || !buf || !cap || req->nsockets < 0 || (req->nsockets && !req->socket_paths))
        return ckpt__error(CKPT_EINVAL, "ckpt_trigger_body: bad argument");
    if (ckpt__check_field_mask(req->field_mask, 0, "ckpt_trigger_request_t") < 0)
        return CKPT_EINVAL;
    int rc = 0;
    char *text = NULL;
    cJSON *root = cJSON_CreateObject();
    if (!root) return ckpt__error(CKPT_ENOMEM, "out of memory");
    cJSON_AddStringToObject(root, "method", req->method && *req->method ? req->method
                                                                        : DEFAULT_METHOD);
    cJSON_AddArrayToObject(root, "args");
    cJSON *kw = cJSON_AddObjectToObject(root, "kwargs");
    cJSON *socks = cJSON_AddObjectToObject(kw, "socket_paths");
    for (int r = 0; r < req->nsockets; r++) {
        char key[16];
        snprintf(key, sizeof key, "%d", r);
        if (req->socket_paths[r]) cJSON_AddStringToObject(socks, key, req->socket_paths[r]);
    }
    cJSON_AddNumberToObject(kw, "update_id", (double)req->update_id);
    cJSON_AddStringToObject(kw, "name", req->name ? req->name : "");
    cJSON_AddNumberToObject(kw, "version", (double)req->version);
    /* The workers bound their own waits by the update's. */
    if (req->timeout_s > 0) cJSON_AddNumberToObject(kw, "timeout_s", req->timeout_s);
    if (req->timeout_s > 0) cJSON_AddNumberToObject(root, "timeout", req->timeout_s);
    else cJSON_AddNullToObject(root, "timeout");
    if (!(text = cJSON_PrintUnformatted(root))) {
        rc = ckpt__error(CKPT_ENOMEM, "out of memory");
        goto cleanup;
    }
    if (ckpt__strlcpy(buf, text, cap) != 0)
        rc = ckpt__error(CKPT_ETOOBIG, "trigger body needs %zu bytes, have %zu",
                         strlen(text) + 1, cap);
cleanup:
    cJSON_free(text);
    cJSON_Delete(root);
    return rc;
}

static pthread_once_t curl_once = PTHREAD_ONCE_INIT;
static void curl_init(void)
{
    curl_global_init(CURL_GLOBAL_DEFAULT);
}

/* collective_rpc answers one result per worker: keep enough of the reply to read them. */
#define REPLY_MAX (64u << 10)

typedef struct {
    char *text;
    size_t len;
} reply_t;

static size_t on_data(char *p, size_t size, size_t n, void *ud)
{
    reply_t *r = ud;
    size_t bytes = size * n;
    if (!r->text) return bytes; /* no buffer: the reply is dropped */
    size_t room = REPLY_MAX - 1 - r->len;
    size_t take = bytes < room ? bytes : room;
    memcpy(r->text + r->len, p, take);
    r->len += take;
    r->text[r->len] = '\0';
    return bytes;
}

/* "URL" or "URL (over Unix socket PATH)", for error texts. */
static void describe(char *buf, size_t cap, const char *url, const char *uds)
{
    if (uds && *uds) snprintf(buf, cap, "%s (over Unix socket %s)", url, uds);
    else snprintf(buf, cap, "%s", url);
}

/* One POST. Returns 0, CKPT_ENOENT (HTTP 404), CKPT_EPEER (other non-2xx, refused) or
 * CKPT_ETIMEDOUT, with err naming `what`, the URL and the cause; reply (when not NULL)
 * gets the start of the answer. */
static int post(const char *what, const char *url, const char *uds, const char *body,
                int timeout_ms, reply_t *reply, char *err, size_t errcap)
{
    pthread_once(&curl_once, curl_init);
    int rc = 0;
    reply_t local = {NULL, 0};
    if (!reply) reply = &local;
    char curl_err[CURL_ERROR_SIZE] = "", where[CKPT_HTTP_URL_MAX + 160];
    describe(where, sizeof where, url, uds);
    struct curl_slist *hdr = NULL;
    CURL *h = curl_easy_init();
    if (!h || !(hdr = curl_slist_append(NULL, "Content-Type: application/json"))) {
        snprintf(err, errcap, "%s %s: cannot set up libcurl", what, where);
        rc = CKPT_ENOMEM;
        goto cleanup;
    }
    long t = timeout_ms > 0 ? timeout_ms : 30000;
    curl_easy_setopt(h, CURLOPT_URL, url);
    if (uds && *uds) curl_easy_setopt(h, CURLOPT_UNIX_SOCKET_PATH, uds);
    curl_easy_setopt(h, CURLOPT_HTTPHEADER, hdr);
    curl_easy_setopt(h, CURLOPT_POSTFIELDS, body);
    curl_easy_setopt(h, CURLOPT_TIMEOUT_MS, t);
    curl_easy_setopt(h, CURLOPT_CONNECTTIMEOUT_MS, t < 10000 ? t : 10000L);
    curl_easy_setopt(h, CURLOPT_NOSIGNAL, 1L); /* we run on a thread: no SIGALRM */
    curl_easy_setopt(h, CURLOPT_PROTOCOLS_STR, "http,https");
    curl_easy_setopt(h, CURLOPT_ERRORBUFFER, curl_err);
    curl_easy_setopt(h, CURLOPT_WRITEFUNCTION, on_data);
    curl_easy_setopt(h, CURLOPT_WRITEDATA, reply);
    CURLcode cc = curl_easy_perform(h);
    if (cc != CURLE_OK) {
        rc = cc == CURLE_OPERATION_TIMEDOUT ? CKPT_ETIMEDOUT : CKPT_EPEER;
        snprintf(err, errcap, "%s %s: %s", what, where,
                 curl_err[0] ? curl_err : curl_easy_strerror(cc));
        goto cleanup;
    }
    long code = 0;
    curl_easy_getinfo(h, CURLINFO_RESPONSE_CODE, &code);
    if (code < 200 || code > 299) {
        rc = code == 404 ? CKPT_ENOENT : CKPT_EPEER;
        snprintf(err, errcap, "%s %s: HTTP %ld%s%.200s", what, where, code,
                 reply->len ? ": " : "", reply->text ? reply->text : "");
    }
cleanup:
    curl_slist_free_all(hdr);
    if (h) curl_easy_cleanup(h);
    return rc;
}

/* A 2xx collective_rpc reply {"results": [...]} where a worker reports {"completed":
 * false} is a failed update, whatever the HTTP status said: the worker extension answers
 * that way when the engine aborted the update under it. */
static int check_results(const reply_t *reply, const char *where, char *err, size_t errcap)
{
    if (!reply->text || !reply->len) return 0;
    cJSON *root = cJSON_ParseWithLength(reply->text, reply->len);
    const cJSON *results = cJSON_GetObjectItemCaseSensitive(root, "results");
    int rc = 0, i = 0;
    const cJSON *res;
    const cJSON *list = cJSON_IsArray(results) ? results : NULL;
    cJSON_ArrayForEach(res, list)
    {
        const cJSON *done = cJSON_GetObjectItemCaseSensitive(res, "completed");
        if (cJSON_IsFalse(done)) {
            const cJSON *why = cJSON_GetObjectItemCaseSensitive(res, "reason");
            snprintf(err, errcap, "trigger POST %s: worker %d did not complete the update%s%.300s",
                     where, i, cJSON_IsString(why) ? ": " : "",
                     cJSON_IsString(why) ? why->valuestring : "");
            rc = CKPT_EPEER;
            break;
        }
        i++;
    }
    cJSON_Delete(root);
    return rc;
}

int ckpt_trigger_post(const char *url, const char *uds, const char *json_body, int timeout_ms,
                      char *err, size_t errcap)
{
    if (!url || !json_body) return ckpt__error(CKPT_EINVAL, "ckpt_trigger_post: NULL argument");
    char scratch[8];
    if (!err || !errcap) err = scratch, errcap = sizeof scratch;
    err[0] = '\0';
    reply_t reply = {ckpt__malloc(REPLY_MAX), 0};
    if (!reply.text) {
        snprintf(err, errcap, "trigger POST %s: out of memory", url);
        return ckpt__error(CKPT_ENOMEM, "%s", err);
    }
    reply.text[0] = '\0';
    int rc = post("trigger POST", url, uds, json_body, timeout_ms, &reply, err, errcap);
    if (rc == 0) {
        char where[CKPT_HTTP_URL_MAX + 160];
        describe(where, sizeof where, url, uds);
        rc = check_results(&reply, where, err, errcap);
    }
    ckpt__free(reply.text);
    if (rc) ckpt__error(rc, "%s", err);
    return rc;
}

struct ckpt_trigger {
    pthread_t thread;
    int started;
    char *url, *body;
    char uds[108];
    int timeout_ms;
    int status;
    char err[512];
    /* ckpt_trigger_begin: vLLM's generation was paused at base (resume there) */
    int paused;
    int keep;  /* paused with mode=keep: vLLM did not clear its prefix cache at the pause */
    char base[CKPT_HTTP_URL_MAX];
};

static void *trigger_main(void *arg)
{
    ckpt_trigger_t *t = arg;
    t->status = ckpt_trigger_post(t->url, t->uds, t->body, t->timeout_ms, t->err, sizeof t->err);
    return NULL;
}

static void trigger_free(ckpt_trigger_t *t)
{
    if (!t) return;
    ckpt__free(t->url);
    ckpt__free(t->body);
    ckpt__free(t);
}

int ckpt_trigger_start(const char *url, const char *uds, const char *json_body, int timeout_ms,
                       ckpt_trigger_t **out)
{
    if (!url || !json_body || !out)
        return ckpt__error(CKPT_EINVAL, "ckpt_trigger_start: NULL argument");
    if (uds && strlen(uds) >= sizeof((ckpt_trigger_t *)0)->uds)
        return ckpt__error(CKPT_EINVAL, "trigger: Unix socket path '%s' is too long", uds);
    /* Set up curl here, on the caller's thread: curl_global_init is not thread-safe in
     * older libcurl, and the caller is the one thread that starts triggers. */
    pthread_once(&curl_once, curl_init);
    ckpt_trigger_t *t = ckpt__calloc(1, sizeof *t);
    if (!t) return ckpt__error(CKPT_ENOMEM, "out of memory");
    t->url = ckpt__strdup(url);
    t->body = ckpt__strdup(json_body);
    if (uds) snprintf(t->uds, sizeof t->uds, "%s", uds);
    t->timeout_ms = timeout_ms;
    if (!t->url || !t->body) goto fail;
    if (pthread_create(&t->thread, NULL, trigger_main, t) != 0) goto fail;
    t->started = 1;
    *out = t;
    return 0;
fail:
    trigger_free(t);
    return ckpt__error(CKPT_ENOMEM, "trigger %s: cannot start its thread", url);
}

int ckpt_trigger_wait(ckpt_trigger_t *t, char *err, size_t errcap)
{
    if (!t) return ckpt__error(CKPT_EINVAL, "ckpt_trigger_wait: NULL trigger");
    if (t->started) pthread_join(t->thread, NULL);
    int rc = t->status;
    if (errcap) snprintf(err, errcap, "%s", t->err);
    if (rc) ckpt__error(rc, "%s", t->err); /* last error is per thread: set it here too */
    trigger_free(t);
    return rc;
}

/* ---- the update's conversation with vLLM -------------------------------------------- */

static void append(char *reason, size_t cap, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static void append(char *reason, size_t cap, const char *fmt, ...)
{
    size_t len = strnlen(reason, cap);
    if (len + 1 >= cap) return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(reason + len, cap - len, fmt, ap);
    va_end(ap);
}

/* POST <base>/<what>: pause (with ?mode=) or resume. */
static int vllm_post(const char *base, const char *uds, const char *what, const char *mode,
                     int timeout_ms, char *err, size_t errcap)
{
    char url[CKPT_HTTP_URL_MAX + 32];
    snprintf(url, sizeof url, "%s/%s%s%s", base, what, mode ? "?mode=" : "", mode ? mode : "");
    char label[32];
    snprintf(label, sizeof label, "%s POST", what);
    return post(label, url, uds, "", timeout_ms, NULL, err, errcap);
}

static int fail(ckpt_http_job_result_t *r, int status, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static int fail(ckpt_http_job_result_t *r, int status, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(r->reason, sizeof r->reason, fmt, ap);
    va_end(ap);
    r->status = status;
    ckpt__error(status, "%s", r->reason);
    return status;
}

/* The trigger body: worker i -> <dir>/rank-<group_ranks[i] or i>.sock, dir made absolute
 * (the inference server runs in another process, maybe another working directory). */
static int build_body(const ckpt_http_job_t *job, const char *socket_dir, int engine_ranks,
                      uint64_t version, int timeout_ms, char **body_out,
                      ckpt_http_job_result_t *r)
{
    int n = job->ngroup_ranks ? job->ngroup_ranks : engine_ranks, rc = 0;
    if (n <= 0)
        return fail(r, CKPT_EINVAL, "trigger: the engine has no ranks to attach workers to");
    for (int i = 0; i < job->ngroup_ranks; i++)
        if (engine_ranks > 0 && job->group_ranks[i] >= engine_ranks)
            return fail(r, CKPT_EINVAL,
                        "inference_group_ranks names rank %d, but the engine has %d ranks "
                        "(0..%d)", (int)job->group_ranks[i], engine_ranks, engine_ranks - 1);
    char cwd[PATH_MAX] = "";
    if (socket_dir[0] != '/' && !getcwd(cwd, sizeof cwd)) cwd[0] = '\0';
    size_t one = strlen(cwd) + strlen(socket_dir) + 32;
    size_t cap = 1024 + (size_t)n * (one + 32);
    char **paths = ckpt__calloc((size_t)n, sizeof *paths), *body = ckpt__malloc(cap);
    if (!paths || !body) {
        rc = fail(r, CKPT_ENOMEM, "trigger: out of memory");
        goto cleanup;
    }
    for (int i = 0; i < n; i++) {
        if (!(paths[i] = ckpt__malloc(one))) {
            rc = fail(r, CKPT_ENOMEM, "trigger: out of memory");
            goto cleanup;
        }
        snprintf(paths[i], one, "%s%s%s/rank-%d.sock", cwd, cwd[0] ? "/" : "", socket_dir,
                 job->ngroup_ranks ? (int)job->group_ranks[i] : i);
    }
    ckpt_trigger_request_t req = {0, job->trigger_method[0] ? job->trigger_method : NULL,
                                  job->name, version, job->id, (const char *const *)paths,
                                  n, timeout_ms / 1000.0};
    if ((rc = ckpt_trigger_body(&req, body, cap)) != 0) {
        rc = fail(r, rc, "trigger: %s", ckpt_last_error());
        goto cleanup;
    }
    *body_out = body;
    body = NULL;
cleanup:
    for (int i = 0; paths && i < n; i++) ckpt__free(paths[i]);
    ckpt__free(paths);
    ckpt__free(body);
    return rc;
}

int ckpt_trigger_begin(const ckpt_http_job_t *job, const char *socket_dir, int engine_ranks,
                       uint64_t version, int timeout_ms, ckpt_trigger_t **out,
                       ckpt_http_job_result_t *r)
{
    if (!job || !out || !r) return ckpt__error(CKPT_EINVAL, "ckpt_trigger_begin: NULL argument");
    *out = NULL;
    if (!socket_dir || !*socket_dir)
        return fail(r, CKPT_EINVAL, "update_url needs the engine to serve workers: start "
                                    "`ckpt-engine serve` with --socket-dir");
    char base[CKPT_HTTP_URL_MAX], err[512] = "";
    int vllm = ckpt_http_trigger_base(job->update_url, base, sizeof base);
    const char *mode = job->pause[0] ? job->pause : vllm ? "wait" : "off";
    if (strcmp(mode, "off") != 0 && !vllm)
        return fail(r, CKPT_EINVAL, "pause \"%s\" needs an update_url ending in /collective_rpc",
                    mode);
    char *body = NULL;
    int rc = build_body(job, socket_dir, engine_ranks, version, timeout_ms, &body, r);
    if (rc) return rc;
    const char *uds = job->uds[0] ? job->uds : NULL;
    int paused = 0;
    if (strcmp(mode, "off") != 0) {
        /* Before any byte moves: a vLLM that cannot pause is told so while its weights are
         * still whole. */
        rc = vllm_post(base, uds, "pause", mode, timeout_ms, err, sizeof err);
        if (rc == CKPT_ENOENT) {
            rc = fail(r, CKPT_EPROTO,
                      "%s; vLLM at %s has no POST /pause (an older vLLM, or "
                      "VLLM_SERVER_DEV_MODE=1 is not set): nothing was sent; to update without "
                      "pausing generation pass \"pause\": \"off\" (ckpt-engine update --pause off)",
                      err, base);
            goto cleanup;
        }
        if (rc) {
            /* A pause that timed out may still take effect: ask vLLM to resume, as its
             * weights are untouched. */
            char rerr[512] = "";
            int rrc = vllm_post(base, uds, "resume", NULL, timeout_ms, rerr, sizeof rerr);
            rc = fail(r, rc, "%s; nothing was sent to the workers; %s%s", err,
                      rrc ? "resuming failed too: " : "vLLM was told to resume",
                      rrc ? rerr : "");
            goto cleanup;
        }
        paused = 1;
        r->paused = 1;
    }
    rc = ckpt_trigger_start(job->update_url, uds, body, timeout_ms, out);
    if (rc) {
        fail(r, rc, "trigger: %s", ckpt_last_error());
        if (paused) {
            /* Nothing moved yet: the old weights are whole, generation may go on. */
            char rerr[512] = "";
            if (vllm_post(base, uds, "resume", NULL, timeout_ms, rerr, sizeof rerr) == 0)
                r->resumed = 1;
            else
                append(r->reason, sizeof r->reason, "; vLLM at %s left paused: %s", base, rerr);
        }
        goto cleanup;
    }
    (*out)->paused = paused;
    (*out)->keep = paused && strcmp(mode, "keep") == 0;
    (*out)->timeout_ms = timeout_ms;
    snprintf((*out)->base, sizeof (*out)->base, "%s", base);
cleanup:
    ckpt__free(body);
    return rc;
}

void ckpt_trigger_end(ckpt_trigger_t *t, ckpt_http_job_result_t *r)
{
    if (!t || !r) return;
    int paused = t->paused, keep = t->keep, timeout_ms = t->timeout_ms; /* t is freed below */
    char base[CKPT_HTTP_URL_MAX], uds[108], err[512] = "";
    snprintf(base, sizeof base, "%s", t->base);
    snprintf(uds, sizeof uds, "%s", t->uds);
    /* The trigger fails the update too: the inference server did not take it. */
    int rc = ckpt_trigger_wait(t, err, sizeof err);
    if (rc) {
        if (r->status == 0) {
            r->status = rc;
            snprintf(r->reason, sizeof r->reason, "%s", err);
        } else {
            append(r->reason, sizeof r->reason, "; %s", err);
        }
    }
    if (!paused) return;
    r->paused = 1;
    if (r->status == 0) {
        /* KV blocks computed with the old weights must not be reused as a prefix of new
         * requests: reset vLLM's prefix cache before it resumes. pause with wait/abort has
         * cleared it already (so a refusal only costs a note); after keep it has not, and
         * vLLM stays paused rather than serve stale prefixes. */
        rc = vllm_post(base, uds[0] ? uds : NULL, "reset_prefix_cache", NULL, timeout_ms, err,
                       sizeof err);
        if (rc && keep) {
            fail(r, rc, "the new weights reached every worker, but %s; vLLM at %s is still "
                        "paused (its prefix cache holds blocks of the old weights): POST "
                        "%s/reset_prefix_cache, then %s/resume", err, base, base, base);
            return;
        }
        if (rc) append(r->reason, sizeof r->reason, "note: %s (the pause cleared it)", err);
        rc = vllm_post(base, uds[0] ? uds : NULL, "resume", NULL, timeout_ms, err, sizeof err);
        if (rc == 0) {
            r->resumed = 1;
            return;
        }
        fail(r, rc, "the new weights reached every worker, but %s; vLLM at %s is still paused: "
                    "POST %s/resume", err, base, base);
        return;
    }
    append(r->reason, sizeof r->reason,
           "; vLLM at %s left paused: the update failed; POST %s/resume after a good update, "
           "or restart vLLM (its workers may hold a mix of old and new weights)", base, base);
}
