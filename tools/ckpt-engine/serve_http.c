/* ckpt-engine serve --http: rank 0's main thread runs the jobs the HTTP server queues
 * (docs/HTTP.md) against the engine, which broadcasts each to every rank. The server's
 * threads only validate and queue; everything that touches the engine happens here. */
#include <cjson/cJSON.h>
#include <ctype.h>
#include <errno.h>
#include <limits.h>
#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "serve.h"

int serve_http_parse_listen(const char *text, char *addr, size_t addr_cap, int *port_out)
{
    const char *port = text;
    snprintf(addr, addr_cap, "127.0.0.1");
    if (text[0] == '[') { /* [IPv6]:PORT */
        const char *end = strchr(text, ']');
        if (!end || end[1] != ':' || (size_t)(end - text - 1) >= addr_cap) goto bad;
        snprintf(addr, addr_cap, "%.*s", (int)(end - text - 1), text + 1);
        port = end + 2;
    } else if (strchr(text, ':')) {
        const char *colon = strrchr(text, ':');
        if (colon == text || (size_t)(colon - text) >= addr_cap) goto bad;
        snprintf(addr, addr_cap, "%.*s", (int)(colon - text), text);
        port = colon + 1;
    }
    char *end;
    errno = 0;
    long p = strtol(port, &end, 10);
    if (!*port || *end || errno || p < 0 || p > 65535) goto bad;
    *port_out = (int)p;
    return 0;
bad:
    fprintf(stderr, "ckpt-engine serve: --http wants [ADDR:]PORT (e.g. 8080, 0.0.0.0:8080, "
                    "[::1]:8080; PORT 0 picks a free one), got '%s'\n", text);
    return -1;
}

/* The token is the file's text without surrounding whitespace (files end in a newline). */
static int read_token(const char *file, char *token, size_t cap)
{
    FILE *f = fopen(file, "r");
    if (!f) {
        fprintf(stderr, "ckpt-engine serve: cannot read token file %s: %s\n", file,
                strerror(errno));
        return -1;
    }
    size_t n = fread(token, 1, cap - 1, f);
    int more = fgetc(f) != EOF;
    fclose(f);
    token[n] = '\0';
    if (more) {
        fprintf(stderr, "ckpt-engine serve: token file %s is longer than %zu bytes\n", file,
                cap - 1);
        return -1;
    }
    while (n && isspace((unsigned char)token[n - 1])) token[--n] = '\0';
    size_t lead = 0;
    while (isspace((unsigned char)token[lead])) lead++;
    memmove(token, token + lead, n - lead + 1);
    if (!token[0]) {
        fprintf(stderr, "ckpt-engine serve: token file %s is empty\n", file);
        return -1;
    }
    return 0;
}

int serve_http_start(serve_state_t *st, const char *addr, int port, const char *token_file)
{
    char token[512];
    if (token_file && read_token(token_file, token, sizeof token) < 0) return -1;
    ckpt_http_options_t ho = CKPT_HTTP_OPTIONS_INIT;
    ho.bind_addr = addr;
    ho.port = port;
    ho.token = token_file ? token : NULL; /* copied by the server */
    int rc = ckpt_http_start(&ho, &st->srv);
    if (token_file) snprintf(st->token, sizeof st->token, "%s", token);
    memset(token, 0, sizeof token);
    if (rc < 0) {
        fprintf(stderr, "ckpt-engine serve: --http: %s\n", ckpt_last_error());
        st->srv = NULL;
        return -1;
    }
    int v6 = strchr(addr, ':') != NULL;
    printf("http: listening on http://%s%s%s:%d\n", v6 ? "[" : "", addr, v6 ? "]" : "",
           ckpt_http_port(st->srv));
    /* mpirun treats SIGTERM as an abort and exits 1 even when the ranks stop cleanly;
     * SIGTERM to rank 0 itself stops every rank and mpirun exits 0. */
    printf("http: rank 0 is pid %d (SIGTERM to it stops every rank)\n", (int)getpid());
    fflush(stdout);
    return 0;
}

/* Called by the HTTP threads while the main thread is inside ckpt_engine_update. */
static int pull_progress(void *ctx, ckpt_http_progress_t *out)
{
    ckpt_update_progress_t p;
    if (ckpt_engine_progress(ctx, &p) != 0 || !p.running) return -1;
    *out = (ckpt_http_progress_t){p.buckets_done, p.nbuckets, p.bytes_done, p.bytes_total,
                                  p.elapsed_s};
    return 0;
}

/* Starts the trigger POST: socket_paths names DIR/rank-<r>.sock of every rank (absolute,
 * since the inference server runs elsewhere). On failure fills r and returns -1. */
static int trigger_start(serve_state_t *st, ckpt_engine_t *engine, const ckpt_http_job_t *job,
                         int timeout_ms, ckpt_trigger_t **out, ckpt_http_job_result_t *r)
{
    int n = ckpt_engine_size(engine), rc = -1;
    char **paths = calloc((size_t)n, sizeof *paths), *body = NULL, cwd[PATH_MAX] = "";
    size_t cap = 1024 + (size_t)n * (PATH_MAX + 32);
    if (!st->socket_dir) {
        r->status = CKPT_EINVAL;
        snprintf(r->reason, sizeof r->reason, "update_url needs the engine to serve workers: "
                                              "start `ckpt-engine serve` with --socket-dir");
        goto cleanup;
    }
    if (!paths || !(body = malloc(cap))) {
        r->status = CKPT_ENOMEM;
        snprintf(r->reason, sizeof r->reason, "trigger: out of memory");
        goto cleanup;
    }
    if (st->socket_dir[0] != '/' && !getcwd(cwd, sizeof cwd)) cwd[0] = '\0';
    for (int i = 0; i < n; i++) {
        if (!(paths[i] = malloc(PATH_MAX + 32))) {
            r->status = CKPT_ENOMEM;
            snprintf(r->reason, sizeof r->reason, "trigger: out of memory");
            goto cleanup;
        }
        snprintf(paths[i], PATH_MAX + 32, "%s%s%s/rank-%d.sock", cwd, cwd[0] ? "/" : "",
                 st->socket_dir, i);
    }
    ckpt_trigger_request_t req = {0, job->trigger_method[0] ? job->trigger_method : NULL,
                                  job->name, serve_version_of(engine, job->name), job->id,
                                  (const char *const *)paths, n, timeout_ms / 1000.0};
    if ((r->status = ckpt_trigger_body(&req, body, cap)) == 0 &&
        (r->status = ckpt_trigger_start(job->update_url, body, timeout_ms, out)) == 0)
        rc = 0;
    else
        snprintf(r->reason, sizeof r->reason, "trigger: %s", ckpt_last_error());
cleanup:
    for (int i = 0; paths && i < n; i++) free(paths[i]);
    free(paths);
    free(body);
    return rc;
}

static void run_update(serve_state_t *st, ckpt_engine_t *engine, const ckpt_http_job_t *job,
                       ckpt_http_job_result_t *r)
{
    int p2p = strcmp(job->mode, "p2p") == 0;
    char *metas = NULL;
    size_t metas_len = 0;
    if (p2p) {
        /* This deployment joins: it fetches the serving deployment's metas and pulls. The
         * serving side's token, if any, is the same token file (one operator, one secret). */
        int frc = ckpt_http_fetch(job->metas_url, st->token[0] ? st->token : NULL,
                                  job->timeout_ms > 0 ? job->timeout_ms : st->timeout_ms,
                                  &metas, &metas_len);
        if (frc < 0) {
            r->status = frc;
            snprintf(r->reason, sizeof r->reason, "p2p metas: %s", ckpt_last_error());
            return;
        }
        /* The URL's checkpoint must be the one the request names. */
        cJSON *m = cJSON_ParseWithLength(metas, metas_len);
        cJSON *n = m ? cJSON_GetObjectItem(m, "name") : NULL;
        if (!cJSON_IsString(n) || strcmp(n->valuestring, job->name) != 0) {
            r->status = CKPT_EINVAL;
            snprintf(r->reason, sizeof r->reason, "p2p metas at %.200s describe '%.120s', not '%.120s'",
                     job->metas_url, cJSON_IsString(n) ? n->valuestring : "?", job->name);
            cJSON_Delete(m);
            free(metas);
            return;
        }
        cJSON_Delete(m);
    }
    int timeout_ms = job->timeout_ms > 0 ? job->timeout_ms : st->timeout_ms;
    ckpt_trigger_t *trig = NULL;
    if (job->update_url[0] && trigger_start(st, engine, job, timeout_ms, &trig, r) < 0) return;

    ckpt_update_options_t uo = CKPT_UPDATE_OPTIONS_INIT;
    uo.bucket_max = job->bucket_max;
    uo.timeout_ms = job->timeout_ms;
    uo.verify = job->verify;
    uo.trace_path = job->trace_path[0] ? job->trace_path : NULL;
    ckpt_update_result_t res;
    memset(&res, 0, sizeof res);
    res.failed_rank = -1;
    double t = MPI_Wtime();
    int rc = p2p ? ckpt_engine_p2p_update(engine, metas, metas_len, &uo, &res)
                 : ckpt_engine_update(engine, job->name, &uo, &res);
    free(metas);
    if (!res.name[0]) snprintf(res.name, sizeof res.name, "%s", job->name);
    if (rc < 0 && !res.reason[0]) snprintf(res.reason, sizeof res.reason, "%s", ckpt_last_error());
    if (rc < 0 && !res.total_s) res.total_s = MPI_Wtime() - t;
    res.status = rc;

    char err[512] = "";
    /* The trigger fails the update too: the inference server did not take it. */
    if (trig && ckpt_trigger_wait(trig, err, sizeof err) != 0) {
        if (res.status == 0) {
            res.status = CKPT_EPEER;
            snprintf(res.reason, sizeof res.reason, "%s", err);
        } else {
            size_t len = strlen(res.reason);
            snprintf(res.reason + len, sizeof res.reason - len, "; %s", err);
        }
    }
    serve_print_update(st, &res);
    r->status = res.status;
    r->failed_rank = res.failed_rank;
    snprintf(r->reason, sizeof r->reason, "%s", res.reason);
    r->version = res.version;
    r->bytes = res.bytes;
    r->ntensors = res.ntensors;
    r->nbuckets = res.nbuckets;
    r->bucket_size = res.bucket_size;
    r->nranks = res.nranks;
    r->gather_s = res.gather_s;
    r->plan_s = res.plan_s;
    r->begin_s = res.begin_s;
    r->pipeline_s = res.pipeline_s;
    r->finish_s = res.finish_s;
    r->total_s = res.total_s;
}

static void run_job(serve_state_t *st, ckpt_engine_t *engine, const ckpt_http_job_t *job,
                    ckpt_http_job_result_t *r)
{
    double t = MPI_Wtime();
    size_t tensors = 0;
    switch (job->kind) {
    case CKPT_JOB_REGISTER:
        r->status = ckpt_engine_register(engine, job->name, job->path);
        if (r->status == 0 &&
            ckpt_engine_checkpoint_stats(engine, job->name, &r->bytes, &tensors) == 0) {
            r->ntensors = (uint32_t)tensors;
            r->version = serve_version_of(engine, job->name);
        }
        if (r->status == 0) serve_publish_metas(st, engine, job->name);
        if (r->status) snprintf(r->reason, sizeof r->reason, "%s", ckpt_last_error());
        serve_print_simple(st, "register", job->name, r->status, r->reason, MPI_Wtime() - t);
        break;
    case CKPT_JOB_UNREGISTER:
        r->status = ckpt_engine_unregister(engine, job->name);
        if (r->status) snprintf(r->reason, sizeof r->reason, "%s", ckpt_last_error());
        serve_print_simple(st, "unregister", job->name, r->status, r->reason, MPI_Wtime() - t);
        break;
    case CKPT_JOB_UPDATE: run_update(st, engine, job, r); break;
    default:
        r->status = CKPT_EINVAL;
        snprintf(r->reason, sizeof r->reason, "unknown job kind %d", job->kind);
    }
}

int serve_http_run(serve_state_t *st, ckpt_engine_t *engine)
{
    int failed = 0;
    ckpt_http_set_progress_fn(st->srv, pull_progress, engine);
    ckpt_http_job_t *job = calloc(1, sizeof *job); /* ~12 KiB: not on the stack */
    while (job && !serve_stop) {
        /* A short wait so that a signal is noticed within a fifth of a second. */
        if (ckpt_http_next_job(st->srv, 200, job) != 0) continue;
        ckpt_http_job_result_t r;
        memset(&r, 0, sizeof r);
        r.failed_rank = -1;
        run_job(st, engine, job, &r);
        if (r.status) failed++;
        ckpt_http_job_done(st->srv, job, &r);
    }
    if (!job) fprintf(stderr, "ckpt-engine serve: out of memory\n");
    free(job);
    ckpt_http_set_progress_fn(st->srv, NULL, NULL);
    ckpt_http_stop(st->srv);
    st->srv = NULL;
    return failed;
}
