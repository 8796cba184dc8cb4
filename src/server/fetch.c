/* GET of a small document (P2P metas) from another deployment's HTTP API, with libcurl. */
#include <curl/curl.h>
#include <stdio.h>
#include <string.h>

#include "ckpt/server.h"
#include "core/internal.h"

#define FETCH_MAX (512u << 20) /* metas of the largest checkpoints stay far below */

typedef struct {
    char *buf;
    size_t len, cap;
    int too_big;
} fetch_buf_t;

static size_t on_body(char *p, size_t size, size_t n, void *ud)
{
    fetch_buf_t *b = ud;
    size_t bytes = size * n;
    if (b->len + bytes + 1 > FETCH_MAX) {
        b->too_big = 1;
        return 0; /* aborts the transfer */
    }
    if (b->len + bytes + 1 > b->cap) {
        size_t cap = CKPT_MAX(b->cap * 2, b->len + bytes + 1 + 65536);
        char *nb = ckpt__realloc(b->buf, cap);
        if (!nb) return 0;
        b->buf = nb;
        b->cap = cap;
    }
    memcpy(b->buf + b->len, p, bytes);
    b->len += bytes;
    b->buf[b->len] = '\0';
    return bytes;
}

int ckpt_http_fetch(const char *url, const char *token, int timeout_ms, char **body_out,
                    size_t *len_out)
{
    if (!url || !body_out || !len_out) return ckpt__error(CKPT_EINVAL, "fetch: NULL argument");
    curl_global_init(CURL_GLOBAL_DEFAULT); /* reference counted; cheap after the first */
    fetch_buf_t b = {0};
    char curl_err[CURL_ERROR_SIZE] = "", auth[600];
    struct curl_slist *hdr = NULL;
    int rc = CKPT_OK;
    CURL *h = curl_easy_init();
    if (!h) {
        rc = ckpt__error(CKPT_ENOMEM, "GET %s: cannot set up libcurl", url);
        goto out;
    }
    if (token && *token) {
        snprintf(auth, sizeof auth, "Authorization: Bearer %.512s", token);
        hdr = curl_slist_append(NULL, auth);
    }
    long t = timeout_ms > 0 ? timeout_ms : 30000;
    curl_easy_setopt(h, CURLOPT_URL, url);
    if (hdr) curl_easy_setopt(h, CURLOPT_HTTPHEADER, hdr);
    curl_easy_setopt(h, CURLOPT_TIMEOUT_MS, t);
    curl_easy_setopt(h, CURLOPT_CONNECTTIMEOUT_MS, t < 10000 ? t : 10000L);
    curl_easy_setopt(h, CURLOPT_NOSIGNAL, 1L);
    curl_easy_setopt(h, CURLOPT_PROTOCOLS_STR, "http,https");
    curl_easy_setopt(h, CURLOPT_ERRORBUFFER, curl_err);
    curl_easy_setopt(h, CURLOPT_WRITEFUNCTION, on_body);
    curl_easy_setopt(h, CURLOPT_WRITEDATA, &b);
    CURLcode cc = curl_easy_perform(h);
    long code = 0;
    curl_easy_getinfo(h, CURLINFO_RESPONSE_CODE, &code);
    if (b.too_big) {
        rc = ckpt__error(CKPT_ETOOBIG, "GET %s: more than %u bytes", url, FETCH_MAX);
    } else if (cc != CURLE_OK) {
        rc = ckpt__error(cc == CURLE_OPERATION_TIMEDOUT ? CKPT_ETIMEDOUT : CKPT_EPEER,
                         "GET %s: %s", url, curl_err[0] ? curl_err : curl_easy_strerror(cc));
    } else if (code < 200 || code > 299) {
        rc = ckpt__error(code == 404 ? CKPT_ENOENT : CKPT_EPEER, "GET %s: HTTP %ld%s%.200s",
                         url, code, b.len ? ": " : "", b.len ? b.buf : "");
    } else if (b.len == 0) {
        rc = ckpt__error(CKPT_EPROTO, "GET %s: empty reply", url);
    }
out:
    curl_slist_free_all(hdr);
    if (h) curl_easy_cleanup(h);
    if (rc < 0) {
        ckpt__free(b.buf);
        return rc;
    }
    *body_out = b.buf;
    *len_out = b.len;
    return CKPT_OK;
}
