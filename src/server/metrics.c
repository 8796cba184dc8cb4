/* GET /metrics: the Prometheus text exposition format (version 0.0.4). Names follow the
 * Prometheus conventions: base units (seconds, bytes), _total for counters. */
#include <stdarg.h>
#include <stdio.h>
#include <string.h>

#include "server/server_internal.h"

typedef struct {
    char *buf;
    size_t len, cap;
    int failed;
} text_t;

static void put(text_t *t, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void put(text_t *t, const char *fmt, ...)
{
    if (t->failed) return;
    for (;;) {
        va_list ap;
        va_start(ap, fmt);
        int n = vsnprintf(t->buf + t->len, t->cap - t->len, fmt, ap);
        va_end(ap);
        if (n < 0) {
            t->failed = 1;
            return;
        }
        if ((size_t)n < t->cap - t->len) {
            t->len += (size_t)n;
            return;
        }
        size_t cap = t->cap * 2 + (size_t)n;
        char *b = ckpt__realloc(t->buf, cap);
        if (!b) {
            t->failed = 1;
            return;
        }
        t->buf = b;
        t->cap = cap;
    }
}

static void head(text_t *t, const char *name, const char *type, const char *help)
{
    put(t, "# HELP %s %s\n# TYPE %s %s\n", name, help, name, type);
}

/* A counter with one sample per index (label="0", "1", ...). */
static void labeled(text_t *t, const char *name, const char *label, uint32_t n,
                    const uint64_t *values, const char *help)
{
    head(t, name, "counter", help);
    for (uint32_t i = 0; i < n; i++)
        put(t, "%s{%s=\"%u\"} %llu\n", name, label, i, (unsigned long long)values[i]);
}

char *srv_render_metrics(ckpt_http_server_t *srv)
{
    text_t t = {ckpt__malloc(4096), 0, 4096, 0};
    if (!t.buf) return NULL;
    pthread_mutex_lock(&srv->mu);
    head(&t, "ckpt_updates_total", "counter", "Updates finished, by result.");
    put(&t, "ckpt_updates_total{result=\"ok\"} %llu\n", (unsigned long long)srv->updates_ok);
    put(&t, "ckpt_updates_total{result=\"failed\"} %llu\n",
        (unsigned long long)srv->updates_failed);
    head(&t, "ckpt_update_bytes_total", "counter",
         "Checkpoint bytes delivered to each worker by successful updates.");
    put(&t, "ckpt_update_bytes_total %llu\n", (unsigned long long)srv->update_bytes);
    head(&t, "ckpt_update_worker_need_bytes_total", "counter",
         "Bytes the workers need (their declared slices; all of it for a worker that "
         "declared nothing), summed over workers and successful updates.");
    put(&t, "ckpt_update_worker_need_bytes_total %llu\n",
        (unsigned long long)srv->update_need_bytes);
    labeled(&t, "ckpt_update_worker_received_bytes_total", "rank", srv->nworkers, srv->worker,
            "Bytes each worker was handed (its records: parts counted as parts), by rank, "
            "summed over successful updates.");
    labeled(&t, "ckpt_update_host_received_bytes_total", "host", srv->nhosts, srv->host_in,
            "Bytes each host received from the other hosts (host groups of ranks), summed "
            "over successful updates.");
    labeled(&t, "ckpt_update_host_sent_bytes_total", "host", srv->nhosts, srv->host_out,
            "Bytes of the buckets each host owns that went to other hosts (each byte once), "
            "summed over successful updates.");

    head(&t, "ckpt_update_duration_seconds", "histogram", "Wall time of finished updates.");
    uint64_t cum = 0;
    for (int b = 0; b < SRV_DURATION_BUCKETS; b++) {
        cum += srv->duration_counts[b];
        put(&t, "ckpt_update_duration_seconds_bucket{le=\"%g\"} %llu\n", srv_duration_le[b],
            (unsigned long long)cum);
    }
    cum += srv->duration_counts[SRV_DURATION_BUCKETS];
    put(&t, "ckpt_update_duration_seconds_bucket{le=\"+Inf\"} %llu\n", (unsigned long long)cum);
    put(&t, "ckpt_update_duration_seconds_sum %.6f\n", srv->duration_sum);
    put(&t, "ckpt_update_duration_seconds_count %llu\n", (unsigned long long)cum);

    uint64_t bytes = 0, n = 0;
    for (srv_ckpt_t *c = srv->ckpts; c; c = c->next)
        if (c->state == CK_READY) {
            bytes += c->info.bytes;
            n++;
        }
    head(&t, "ckpt_registered_bytes", "gauge", "Bytes of the registered (ready) checkpoints.");
    put(&t, "ckpt_registered_bytes %llu\n", (unsigned long long)bytes);
    head(&t, "ckpt_registered_checkpoints", "gauge", "Registered (ready) checkpoints.");
    put(&t, "ckpt_registered_checkpoints %llu\n", (unsigned long long)n);

    head(&t, "ckpt_update_running", "gauge", "1 while an update is queued or running.");
    put(&t, "ckpt_update_running %d\n", srv->active_update ? 1 : 0);
    head(&t, "ckpt_jobs_queued", "gauge", "Jobs waiting for rank 0's main thread.");
    put(&t, "ckpt_jobs_queued %d\n", srv->queued);
    static const char *kinds[] = {"", "register", "unregister", "update"};
    head(&t, "ckpt_jobs_done_total", "counter", "Jobs the main thread reported, by kind.");
    for (int k = 1; k <= 3; k++)
        put(&t, "ckpt_jobs_done_total{kind=\"%s\"} %llu\n", kinds[k],
            (unsigned long long)srv->jobs_done[k]);

    head(&t, "ckpt_http_requests_total", "counter", "HTTP responses sent, by status code.");
    for (unsigned code = 100; code < 600; code++)
        if (srv->requests[code])
            put(&t, "ckpt_http_requests_total{code=\"%u\"} %llu\n", code,
                (unsigned long long)srv->requests[code]);
    pthread_mutex_unlock(&srv->mu);
    if (t.failed) {
        ckpt__free(t.buf);
        return NULL;
    }
    return t.buf;
}
