/* ckpt-engine serve --http: rank 0's main thread runs the jobs the HTTP server queues
 * (docs/HTTP.md) against the engine, which broadcasts each to every rank. The server's
 * threads only validate and queue; everything that touches the engine happens here. */
#include <arpa/inet.h>
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
    /* The one name we resolve: the server binds literals only. */
    if (strcmp(addr, "localhost") == 0) snprintf(addr, addr_cap, "127.0.0.1");
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

int serve_http_check_exposure(const char *addr, int have_token, int insecure_no_token)
{
    struct in_addr a4;
    struct in6_addr a6;
    int loopback;
    if (inet_pton(AF_INET, addr, &a4) == 1) {
        loopback = (ntohl(a4.s_addr) >> 24) == 127;
    } else if (inet_pton(AF_INET6, addr, &a6) == 1) {
        loopback = IN6_IS_ADDR_LOOPBACK(&a6) ||
                   (IN6_IS_ADDR_V4MAPPED(&a6) && a6.s6_addr[12] == 127);
    } else {
        fprintf(stderr, "ckpt-engine serve: --http address '%s' is not an IPv4 or IPv6 "
                        "literal (or localhost)\n", addr);
        return -1;
    }
    if (loopback || have_token) return 0;
    /* Anyone who reaches the port could replace a model's weights: say so loudly. */
    if (!insecure_no_token) {
        fprintf(stderr,
                "ckpt-engine serve: --http %s listens beyond this host without a token: anyone "
                "who reaches the port could register files and replace the served weights. "
                "Give --token-file FILE (clients send 'Authorization: Bearer <token>'), listen "
                "on 127.0.0.1, or pass --insecure-no-token if a firewall guards the port\n",
                addr);
        return -1;
    }
    fprintf(stderr, "ckpt-engine serve: warning: --http %s without a token "
                    "(--insecure-no-token): every client that reaches the port controls the "
                    "engine\n", addr);
    return 0;
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

int serve_http_start(serve_state_t *st, const char *addr, int port, const char *token_file,
                     const ckpt_http_options_t *limits)
{
    char token[512];
    if (token_file && read_token(token_file, token, sizeof token) < 0) return -1;
    ckpt_http_options_t ho = CKPT_HTTP_OPTIONS_INIT;
    if (limits) {
        ho.request_timeout_s = limits->request_timeout_s;
        ho.per_ip_limit = limits->per_ip_limit;
    }
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

static void run_update(serve_state_t *st, ckpt_engine_t *engine, const ckpt_http_job_t *job,
                       ckpt_http_job_result_t *r)
{
    int p2p = strcmp(job->mode, "p2p") == 0;
    /* Admission checks ranks once the server knows the engine's size; a request that came
     * before is checked here. */
    if (job->nranks > 0 && job->nranks != ckpt_engine_size(engine)) {
        r->status = CKPT_EINVAL;
        snprintf(r->reason, sizeof r->reason, "'ranks' names %d of the engine's %d ranks: "
                 "updating a subset of ranks is not supported yet", job->nranks,
                 ckpt_engine_size(engine));
        return;
    }
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
    /* Pauses vLLM (when asked) and starts the trigger; on failure nothing has moved. */
    if (job->update_url[0] &&
        ckpt_trigger_begin(job, st->socket_dir, ckpt_engine_size(engine),
                           serve_version_of(engine, job->name), timeout_ms, &trig, r) != 0) {
        free(metas);
        return;
    }

    ckpt_update_options_t uo = CKPT_UPDATE_OPTIONS_INIT;
    uo.bucket_max = job->bucket_max;
    uo.timeout_ms = job->timeout_ms;
    uo.verify = job->verify;
    uo.partial = job->partial;
    uo.isolate = job->isolate;
    uo.ignore_unneeded = job->ignore_unneeded;
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

    r->status = res.status;
    r->failed_rank = res.failed_rank;
    snprintf(r->reason, sizeof r->reason, "%s", res.reason);
    r->update = res;
    /* Joins the trigger (its failure fails the update) and resumes vLLM only after a good
     * update; a failed one leaves it paused and says so in the reason. */
    if (trig) {
        ckpt_trigger_end(trig, r);
        res.status = r->status;
        snprintf(res.reason, sizeof res.reason, "%.*s", (int)sizeof res.reason - 1, r->reason);
    }
    serve_print_update(st, &res);
}

static void run_job(serve_state_t *st, ckpt_engine_t *engine, const ckpt_http_job_t *job,
                    ckpt_http_job_result_t *r)
{
    double t = MPI_Wtime();
    size_t tensors = 0;
    switch (job->kind) {
    case CKPT_JOB_REGISTER:
        if (job->nfiles > 0) { /* checkpoint-engine's {"files": [...]}, several files */
            const char **paths = calloc((size_t)job->nfiles, sizeof *paths);
            size_t n = 0;
            for (size_t at = 0; paths && at < job->files_len && n < (size_t)job->nfiles;
                 at += strlen(job->files + at) + 1)
                paths[n++] = job->files + at;
            r->status = paths ? ckpt_engine_register_list(engine, job->name, paths, n)
                              : CKPT_ENOMEM;
            free(paths);
            if (!paths) snprintf(r->reason, sizeof r->reason, "register: out of memory");
        } else {
            r->status = ckpt_engine_register(engine, job->name, job->path);
        }
        if (r->status == 0 &&
            ckpt_engine_checkpoint_stats(engine, job->name, &r->bytes, &tensors) == 0) {
            r->ntensors = (uint32_t)tensors;
            r->version = serve_version_of(engine, job->name);
        }
        if (r->status == 0) serve_publish_metas(st, engine, job->name);
        if (r->status && !r->reason[0])
            snprintf(r->reason, sizeof r->reason, "%s", ckpt_last_error());
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
    ckpt_http_set_engine_ranks(st->srv, ckpt_engine_size(engine));
    ckpt_http_job_t *job = calloc(1, sizeof *job); /* ~12 KiB: not on the stack */
    while (job && !serve_stop) {
        /* A short wait so that a signal is noticed within a fifth of a second. */
        serve_publish_tick(st, engine); /* what trainers published, between jobs */
        if (ckpt_http_next_job(st->srv, 200, job) != 0) continue;
        ckpt_http_job_result_t r;
        memset(&r, 0, sizeof r);
        r.failed_rank = -1;
        run_job(st, engine, job, &r);
        if (r.status) failed++;
        ckpt_http_job_done(st->srv, job, &r);
        ckpt_http_job_release(job);
    }
    if (!job) fprintf(stderr, "ckpt-engine serve: out of memory\n");
    free(job);
    ckpt_http_set_progress_fn(st->srv, NULL, NULL);
    ckpt_http_stop(st->srv);
    st->srv = NULL;
    return failed;
}
