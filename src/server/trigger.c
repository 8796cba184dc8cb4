/* Tells the inference server to attach its workers to an update: one HTTP POST in the
 * shape of vLLM's dev-mode POST /collective_rpc ({"method", "args", "kwargs", "timeout"}),
 * which calls `method` on every worker with the kwargs. The workers then connect to their
 * engine rank's socket (kwargs.socket_paths[rank]). */
#include <pthread.h>
#include <stdio.h>
#include <string.h>

#include <cjson/cJSON.h>
#include <curl/curl.h>

#include "ckpt/server.h"
#include "core/internal.h"

#define DEFAULT_METHOD "update_weights_from_ckpt_engine"

int ckpt_trigger_body(const ckpt_trigger_request_t *req, char *buf, size_t cap)
{
    if (!req || !buf || !cap || req->nsockets < 0 || (req->nsockets && !req->socket_paths))
        return ckpt__error(CKPT_EINVAL, "ckpt_trigger_body: bad argument");
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

typedef struct {
    char text[256]; /* start of the reply: inference servers put the reason there */
    size_t len;
} reply_t;

static size_t on_data(char *p, size_t size, size_t n, void *ud)
{
    reply_t *r = ud;
    size_t bytes = size * n, room = sizeof r->text - 1 - r->len;
    size_t take = bytes < room ? bytes : room;
    memcpy(r->text + r->len, p, take);
    r->len += take;
    r->text[r->len] = '\0';
    return bytes;
}

int ckpt_trigger_post(const char *url, const char *json_body, int timeout_ms, char *err,
                      size_t errcap)
{
    if (!url || !json_body) return ckpt__error(CKPT_EINVAL, "ckpt_trigger_post: NULL argument");
    if (errcap) err[0] = '\0';
    pthread_once(&curl_once, curl_init);
    int rc = 0;
    reply_t reply = {{0}, 0};
    char curl_err[CURL_ERROR_SIZE] = "";
    struct curl_slist *hdr = NULL;
    CURL *h = curl_easy_init();
    if (!h || !(hdr = curl_slist_append(NULL, "Content-Type: application/json"))) {
        rc = ckpt__error(CKPT_ENOMEM, "trigger %s: cannot set up libcurl", url);
        goto cleanup;
    }
    long t = timeout_ms > 0 ? timeout_ms : 30000;
    curl_easy_setopt(h, CURLOPT_URL, url);
    curl_easy_setopt(h, CURLOPT_HTTPHEADER, hdr);
    curl_easy_setopt(h, CURLOPT_POSTFIELDS, json_body);
    curl_easy_setopt(h, CURLOPT_TIMEOUT_MS, t);
    curl_easy_setopt(h, CURLOPT_CONNECTTIMEOUT_MS, t < 10000 ? t : 10000L);
    curl_easy_setopt(h, CURLOPT_NOSIGNAL, 1L); /* we run on a thread: no SIGALRM */
    curl_easy_setopt(h, CURLOPT_PROTOCOLS_STR, "http,https");
    curl_easy_setopt(h, CURLOPT_ERRORBUFFER, curl_err);
    curl_easy_setopt(h, CURLOPT_WRITEFUNCTION, on_data);
    curl_easy_setopt(h, CURLOPT_WRITEDATA, &reply);
    CURLcode cc = curl_easy_perform(h);
    if (cc != CURLE_OK) {
        rc = cc == CURLE_OPERATION_TIMEDOUT ? CKPT_ETIMEDOUT : CKPT_EPEER;
        snprintf(err, errcap, "trigger POST %s: %s", url,
                 curl_err[0] ? curl_err : curl_easy_strerror(cc));
        ckpt__error(rc, "%s", err);
        goto cleanup;
    }
    long code = 0;
    curl_easy_getinfo(h, CURLINFO_RESPONSE_CODE, &code);
    if (code < 200 || code > 299) {
        rc = CKPT_EPEER;
        snprintf(err, errcap, "trigger POST %s: HTTP %ld%s%.200s", url, code,
                 reply.len ? ": " : "", reply.text);
        ckpt__error(rc, "%s", err);
    }
cleanup:
    curl_slist_free_all(hdr);
    if (h) curl_easy_cleanup(h);
    return rc;
}

struct ckpt_trigger {
    pthread_t thread;
    char *url, *body;
    int timeout_ms;
    int status;
    char err[512];
};

static void *trigger_main(void *arg)
{
    ckpt_trigger_t *t = arg;
    t->status = ckpt_trigger_post(t->url, t->body, t->timeout_ms, t->err, sizeof t->err);
    return NULL;
}

int ckpt_trigger_start(const char *url, const char *json_body, int timeout_ms,
                       ckpt_trigger_t **out)
{
    if (!url || !json_body || !out)
        return ckpt__error(CKPT_EINVAL, "ckpt_trigger_start: NULL argument");
    /* Set up curl here, on the caller's thread: curl_global_init is not thread-safe in
     * older libcurl, and the caller is the one thread that starts triggers. */
    pthread_once(&curl_once, curl_init);
    ckpt_trigger_t *t = ckpt__calloc(1, sizeof *t);
    if (!t) return ckpt__error(CKPT_ENOMEM, "out of memory");
    t->url = ckpt__strdup(url);
    t->body = ckpt__strdup(json_body);
    t->timeout_ms = timeout_ms;
    if (!t->url || !t->body) goto fail;
    if (pthread_create(&t->thread, NULL, trigger_main, t) != 0) goto fail;
    *out = t;
    return 0;
fail:
    ckpt__free(t->url);
    ckpt__free(t->body);
    ckpt__free(t);
    return ckpt__error(CKPT_ENOMEM, "trigger %s: cannot start its thread", url);
}

int ckpt_trigger_wait(ckpt_trigger_t *t, char *err, size_t errcap)
{
    if (!t) return ckpt__error(CKPT_EINVAL, "ckpt_trigger_wait: NULL trigger");
    pthread_join(t->thread, NULL);
    int rc = t->status;
    if (errcap) snprintf(err, errcap, "%s", t->err);
    if (rc) ckpt__error(rc, "%s", t->err); /* last error is per thread: set it here too */
    ckpt__free(t->url);
    ckpt__free(t->body);
    ckpt__free(t);
    return rc;
}
