/* The job queue and what GETs show: checkpoints, updates, metas. Written by the HTTP
 * threads (submit) and the main thread (next_job, job_done, set_*), under srv->mu. */
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "server/server_internal.h"
#include "server/result_json.h"

const double srv_duration_le[SRV_DURATION_BUCKETS] = {0.1, 0.25, 0.5, 1, 2.5,
                                                      5, 10, 30, 60, 300};

static const char *ckpt_state_name(int s)
{
    static const char *names[] = {"registering", "ready", "failed", "unregistering"};
    return s >= 0 && s <= CK_UNREGISTERING ? names[s] : "unknown";
}

static const char *update_state_name(int s)
{
    static const char *names[] = {"queued", "running", "succeeded", "failed"};
    return s >= 0 && s <= UP_FAILED ? names[s] : "unknown";
}

static srv_ckpt_t *find_ckpt(ckpt_http_server_t *srv, const char *name)
{
    for (srv_ckpt_t *c = srv->ckpts; c; c = c->next)
        if (strcmp(c->info.name, name) == 0) return c;
    return NULL;
}

static srv_update_t *find_update(ckpt_http_server_t *srv, uint64_t id)
{
    srv_update_t *u = &srv->updates[id % SRV_HISTORY];
    return id && u->id == id ? u : NULL;
}

static srv_ckpt_t *add_ckpt(ckpt_http_server_t *srv, const char *name)
{
    srv_ckpt_t *c = ckpt__calloc(1, sizeof *c);
    if (!c) return NULL;
    ckpt__strlcpy(c->info.name, name, sizeof c->info.name);
    c->next = srv->ckpts;
    srv->ckpts = c;
    return c;
}

static void remove_ckpt(ckpt_http_server_t *srv, const char *name)
{
    for (srv_ckpt_t **p = &srv->ckpts; *p; p = &(*p)->next) {
        if (strcmp((*p)->info.name, name) == 0) {
            srv_ckpt_t *c = *p;
            *p = c->next;
            ckpt__free(c->metas);
            ckpt__free(c);
            return;
        }
    }
}

/* Checks a job against the state and records what it changes; 202 or the refusal. */
static int admit(ckpt_http_server_t *srv, ckpt_http_job_t *job, char *err, size_t cap)
{
    srv_ckpt_t *c = find_ckpt(srv, job->name);
    switch (job->kind) {
    case CKPT_JOB_REGISTER:
        if (c && c->state != CK_FAILED) {
            snprintf(err, cap, "checkpoint '%s' is already %s; unregister it first", job->name,
                     ckpt_state_name(c->state));
            return 409;
        }
        if (!c && !(c = add_ckpt(srv, job->name))) {
            snprintf(err, cap, "out of memory");
            return 503;
        }
        memset(&c->info, 0, sizeof c->info);
        ckpt__strlcpy(c->info.name, job->name, sizeof c->info.name);
        c->state = CK_REGISTERING;
        c->reason[0] = '\0';
        return 202;
    case CKPT_JOB_UNREGISTER:
    case CKPT_JOB_UPDATE:
        /* A p2p update pulls a checkpoint this deployment does not hold. */
        if (job->kind == CKPT_JOB_UPDATE && strcmp(job->mode, "p2p") == 0) goto one_at_a_time;
        if (!c) {
            snprintf(err, cap, "no checkpoint named '%s'", job->name);
            return 404;
        }
        if (c->state != CK_READY && !(job->kind == CKPT_JOB_UNREGISTER && c->state == CK_FAILED)) {
            snprintf(err, cap, "checkpoint '%s' is %s%s%s", job->name, ckpt_state_name(c->state),
                     c->reason[0] ? ": " : "", c->reason);
            return 409;
        }
    one_at_a_time:
        if (srv->active_update) {
            srv_update_t *u = find_update(srv, srv->active_update);
            snprintf(err, cap, "update %llu of '%s' is %s; one update runs at a time",
                     (unsigned long long)srv->active_update, u ? u->name : "?",
                     u ? update_state_name(u->state) : "active");
            return 409;
        }
        if (job->kind == CKPT_JOB_UNREGISTER) {
            if (c->state == CK_FAILED) { /* nothing on the ranks: forget it right away */
                remove_ckpt(srv, job->name);
                return 200;
            }
            c->state = CK_UNREGISTERING;
        }
        return 202;
    default:
        snprintf(err, cap, "unknown job kind %d", job->kind);
        return 400;
    }
}

int srv_submit(ckpt_http_server_t *srv, ckpt_http_job_t *job, char *err, size_t cap)
{
    srv_job_t *node = ckpt__calloc(1, sizeof *node);
    if (!node) {
        snprintf(err, cap, "out of memory");
        return 503;
    }
    pthread_mutex_lock(&srv->mu);
    int code;
    if (srv->stopping) {
        snprintf(err, cap, "the server is stopping");
        code = 503;
    } else if (srv->queued >= SRV_QUEUE_MAX) {
        snprintf(err, cap, "%d jobs are already waiting; retry later", srv->queued);
        code = 503;
    } else {
        code = admit(srv, job, err, cap);
    }
    if (code != 202) goto cleanup;

    if (job->kind == CKPT_JOB_UPDATE) {
        job->id = ++srv->next_update_id;
        srv_update_t *u = &srv->updates[job->id % SRV_HISTORY];
        memset(u, 0, sizeof *u);
        u->id = job->id;
        ckpt__strlcpy(u->name, job->name, sizeof u->name);
        ckpt__strlcpy(u->mode, job->mode, sizeof u->mode);
        u->state = UP_QUEUED;
        u->has_trigger = job->update_url[0] != '\0';
        u->partial = job->partial;
        u->isolate = job->isolate;
        u->result.failed_rank = -1;
        u->queued_at = ckpt__now_s();
        snprintf(job->trace_path, sizeof job->trace_path, "%.4000s/update-%llu.json", srv->trace_dir,
                 (unsigned long long)job->id);
        ckpt__strlcpy(u->trace_path, job->trace_path, sizeof u->trace_path);
        srv->active_update = job->id;
        srv_ckpt_t *c = find_ckpt(srv, job->name);
        if (c) c->last_update_id = job->id;
    } else {
        job->id = ++srv->next_seq;
    }
    node->job = *job;
    /* The queue owns the file list now. */
    job->files = NULL;
    job->files_len = 0;
    job->nfiles = 0;
    if (srv->tail) srv->tail->next = node;
    else srv->head = node;
    srv->tail = node;
    srv->queued++;
    node = NULL;
    pthread_cond_signal(&srv->cv);
cleanup:
    pthread_mutex_unlock(&srv->mu);
    ckpt__free(node);
    return code;
}

int ckpt_http_next_job(ckpt_http_server_t *srv, int timeout_ms, ckpt_http_job_t *job_out)
{
    if (!srv || !job_out) return ckpt__error(CKPT_EINVAL, "ckpt_http_next_job: NULL argument");
    struct timespec deadline;
    clock_gettime(CLOCK_REALTIME, &deadline);
    if (timeout_ms > 0) {
        deadline.tv_sec += timeout_ms / 1000;
        deadline.tv_nsec += (long)(timeout_ms % 1000) * 1000000L;
        if (deadline.tv_nsec >= 1000000000L) {
            deadline.tv_sec++;
            deadline.tv_nsec -= 1000000000L;
        }
    }
    pthread_mutex_lock(&srv->mu);
    while (!srv->head && !srv->stopping && timeout_ms != 0) {
        int rc = timeout_ms < 0 ? pthread_cond_wait(&srv->cv, &srv->mu)
                                : pthread_cond_timedwait(&srv->cv, &srv->mu, &deadline);
        if (rc == ETIMEDOUT) break;
    }
    srv_job_t *node = srv->head;
    if (node) {
        srv->head = node->next;
        if (!srv->head) srv->tail = NULL;
        srv->queued--;
        if (node->job.kind == CKPT_JOB_UPDATE) {
            srv_update_t *u = find_update(srv, node->job.id);
            if (u) {
                u->state = UP_RUNNING;
                u->started_at = ckpt__now_s();
            }
        }
    }
    int stopping = srv->stopping;
    pthread_mutex_unlock(&srv->mu);
    if (!node)
        return stopping ? ckpt__error(CKPT_ECANCELED, "the HTTP server is stopping")
                        : CKPT_ETIMEDOUT;
    *job_out = node->job;
    ckpt__free(node);
    return 0;
}

static void finish_update(ckpt_http_server_t *srv, const ckpt_http_job_t *job,
                          const ckpt_http_job_result_t *r)
{
    srv_update_t *u = find_update(srv, job->id);
    if (srv->active_update == job->id) srv->active_update = 0;
    if (!u) return;
    u->result = *r;
    u->state = r->status == 0 ? UP_SUCCEEDED : UP_FAILED;
    u->finished_at = ckpt__now_s();
    if (r->status == 0) {
        /* A finished update delivered everything, whatever the last push said. */
        u->progress.bytes_total = r->update.bytes;
        u->progress.bytes_done = r->update.bytes;
        u->progress.nbuckets = r->update.nbuckets;
        u->progress.buckets_done = r->update.nbuckets;
        srv->updates_ok++;
        srv->update_bytes += r->update.bytes;
        srv->update_need_bytes += r->update.need_bytes_total;
        const ckpt_update_result_t *x = &r->update;
        for (uint32_t h = 0; h < x->nhosts && h < CKPT_HOSTS_MAX; h++) {
            srv->host_in[h] += x->host_bytes_in[h];
            srv->host_out[h] += x->host_bytes_out[h];
        }
        for (uint32_t w = 0; w < x->nworkers && w < CKPT_WORKERS_MAX; w++)
            srv->worker[w] += x->worker_bytes[w];
        if (x->nhosts > srv->nhosts) srv->nhosts = CKPT_MIN(x->nhosts, CKPT_HOSTS_MAX);
        if (x->nworkers > srv->nworkers) srv->nworkers = CKPT_MIN(x->nworkers, CKPT_WORKERS_MAX);
        srv_ckpt_t *c = find_ckpt(srv, job->name);
        if (c && r->update.version) c->info.version = r->update.version;
    } else {
        srv->updates_failed++;
    }
    double d = r->update.total_s > 0 ? r->update.total_s : u->finished_at - u->started_at;
    u->progress.elapsed_s = d;
    int b = 0;
    while (b < SRV_DURATION_BUCKETS && d > srv_duration_le[b]) b++;
    srv->duration_counts[b]++;
    srv->duration_sum += d;
}

int ckpt_http_job_done(ckpt_http_server_t *srv, const ckpt_http_job_t *job,
                       const ckpt_http_job_result_t *r)
{
    if (!srv || !job || !r) return ckpt__error(CKPT_EINVAL, "ckpt_http_job_done: NULL argument");
    pthread_mutex_lock(&srv->mu);
    srv_ckpt_t *c = find_ckpt(srv, job->name);
    switch (job->kind) {
    case CKPT_JOB_REGISTER:
        if (c) {
            c->state = r->status == 0 ? CK_READY : CK_FAILED;
            if (r->status == 0) {
                c->info.bytes = r->bytes;
                c->info.ntensors = r->ntensors;
                c->info.version = r->version;
            } else {
                snprintf(c->reason, sizeof c->reason, "%s", r->reason);
            }
        }
        break;
    case CKPT_JOB_UNREGISTER:
        if (r->status == 0) {
            remove_ckpt(srv, job->name);
        } else if (c) {
            c->state = CK_READY;
            snprintf(c->reason, sizeof c->reason, "unregister failed: %.480s", r->reason);
        }
        break;
    case CKPT_JOB_UPDATE: finish_update(srv, job, r); break;
    default: break;
    }
    if (job->kind >= 1 && job->kind <= 3) srv->jobs_done[job->kind]++;
    pthread_cond_broadcast(&srv->state_cv);
    pthread_mutex_unlock(&srv->mu);
    return 0;
}

void ckpt_http_report_progress(ckpt_http_server_t *srv, const ckpt_http_progress_t *p)
{
    if (!srv || !p) return;
    pthread_mutex_lock(&srv->mu);
    srv_update_t *u = find_update(srv, srv->active_update);
    if (u && u->state == UP_RUNNING) u->progress = *p;
    pthread_mutex_unlock(&srv->mu);
}

void ckpt_http_set_progress_fn(ckpt_http_server_t *srv, ckpt_http_progress_fn fn, void *ctx)
{
    if (!srv) return;
    pthread_mutex_lock(&srv->mu);
    srv->progress_fn = fn;
    srv->progress_ctx = ctx;
    pthread_mutex_unlock(&srv->mu);
}

int ckpt_http_set_checkpoint(ckpt_http_server_t *srv, const ckpt_http_checkpoint_t *info)
{
    if (!srv || !info || !ckpt_http_name_valid(info->name))
        return ckpt__error(CKPT_EINVAL, "ckpt_http_set_checkpoint: bad name");
    int rc = 0;
    pthread_mutex_lock(&srv->mu);
    srv_ckpt_t *c = find_ckpt(srv, info->name);
    if (!c && !(c = add_ckpt(srv, info->name))) {
        rc = ckpt__error(CKPT_ENOMEM, "out of memory");
        goto cleanup;
    }
    c->info = *info;
    c->state = CK_READY;
    c->reason[0] = '\0';
cleanup:
    pthread_mutex_unlock(&srv->mu);
    return rc;
}

int ckpt_http_remove_checkpoint(ckpt_http_server_t *srv, const char *name)
{
    if (!srv || !name) return ckpt__error(CKPT_EINVAL, "ckpt_http_remove_checkpoint: NULL");
    pthread_mutex_lock(&srv->mu);
    int found = find_ckpt(srv, name) != NULL;
    remove_ckpt(srv, name);
    pthread_mutex_unlock(&srv->mu);
    return found ? 0 : ckpt__error(CKPT_ENOENT, "no checkpoint named '%s'", name);
}

int ckpt_http_set_metas(ckpt_http_server_t *srv, const char *name, const void *bytes,
                        size_t len)
{
    if (!srv || !name || (!bytes && len))
        return ckpt__error(CKPT_EINVAL, "ckpt_http_set_metas: NULL argument");
    void *copy = ckpt__malloc(len ? len : 1);
    if (!copy) return ckpt__error(CKPT_ENOMEM, "metas of '%s': out of memory", name);
    if (len) memcpy(copy, bytes, len);
    int rc = 0;
    pthread_mutex_lock(&srv->mu);
    srv_ckpt_t *c = find_ckpt(srv, name);
    if (c) {
        ckpt__free(c->metas);
        c->metas = copy;
        c->metas_len = len;
        copy = NULL;
    } else {
        rc = ckpt__error(CKPT_ENOENT, "metas: no checkpoint named '%s'", name);
    }
    pthread_mutex_unlock(&srv->mu);
    ckpt__free(copy);
    return rc;
}

int srv_copy_metas(ckpt_http_server_t *srv, const char *name, void **out, size_t *len,
                   char *err, size_t cap)
{
    int code = 200;
    pthread_mutex_lock(&srv->mu);
    srv_ckpt_t *c = find_ckpt(srv, name);
    if (!c) {
        snprintf(err, cap, "no checkpoint named '%s'", name);
        code = 404;
    } else if (!c->metas) {
        snprintf(err, cap,
                 "no metas for '%s' yet: it is %s and rank 0 has not exported its P2P metas",
                 name, ckpt_state_name(c->state));
        code = 404;
    } else if (!(*out = ckpt__malloc(c->metas_len ? c->metas_len : 1))) {
        snprintf(err, cap, "out of memory");
        code = 503;
    } else {
        memcpy(*out, c->metas, c->metas_len);
        *len = c->metas_len;
    }
    pthread_mutex_unlock(&srv->mu);
    return code;
}

int srv_trace_path(ckpt_http_server_t *srv, uint64_t id, char *path, size_t pcap, char *err,
                   size_t cap)
{
    int code = 200;
    pthread_mutex_lock(&srv->mu);
    srv_update_t *u = find_update(srv, id);
    if (!u) {
        snprintf(err, cap, "no update %llu (only the last %d are kept)", (unsigned long long)id,
                 SRV_HISTORY);
        code = 404;
    } else if (u->state == UP_QUEUED || u->state == UP_RUNNING) {
        snprintf(err, cap, "update %llu is %s; its trace is written when it ends",
                 (unsigned long long)id, update_state_name(u->state));
        code = 409;
    } else {
        ckpt__strlcpy(path, u->trace_path, pcap);
    }
    pthread_mutex_unlock(&srv->mu);
    return code;
}

void srv_count_request(ckpt_http_server_t *srv, unsigned code)
{
    pthread_mutex_lock(&srv->mu);
    if (code < 600) srv->requests[code]++;
    pthread_mutex_unlock(&srv->mu);
}

/* ---- rendering ---------------------------------------------------------------------- */

static cJSON *ckpt_json(const srv_ckpt_t *c)
{
    cJSON *o = cJSON_CreateObject();
    cJSON_AddStringToObject(o, "name", c->info.name);
    cJSON_AddStringToObject(o, "state", ckpt_state_name(c->state));
    cJSON_AddNumberToObject(o, "bytes", (double)c->info.bytes);
    cJSON_AddNumberToObject(o, "tensors", c->info.ntensors);
    cJSON_AddNumberToObject(o, "version", (double)c->info.version);
    if (c->reason[0]) cJSON_AddStringToObject(o, "reason", c->reason);
    cJSON_AddBoolToObject(o, "metas_available", c->metas != NULL);
    if (c->last_update_id) cJSON_AddNumberToObject(o, "last_update_id", (double)c->last_update_id);
    return o;
}

cJSON *srv_render_checkpoints(ckpt_http_server_t *srv)
{
    cJSON *root = cJSON_CreateObject();
    cJSON *arr = cJSON_AddArrayToObject(root, "checkpoints");
    pthread_mutex_lock(&srv->mu);
    for (srv_ckpt_t *c = srv->ckpts; c; c = c->next) cJSON_AddItemToArray(arr, ckpt_json(c));
    pthread_mutex_unlock(&srv->mu);
    return root;
}

cJSON *srv_render_checkpoint(ckpt_http_server_t *srv, const char *name, int *code)
{
    cJSON *o = NULL;
    pthread_mutex_lock(&srv->mu);
    srv_ckpt_t *c = find_ckpt(srv, name);
    if (c) o = ckpt_json(c);
    pthread_mutex_unlock(&srv->mu);
    *code = o ? 200 : 404;
    return o;
}

static void add_progress(cJSON *o, const ckpt_http_progress_t *p, int running)
{
    cJSON *g = cJSON_AddObjectToObject(o, "progress");
    cJSON_AddNumberToObject(g, "buckets_done", p->buckets_done);
    cJSON_AddNumberToObject(g, "nbuckets", p->nbuckets);
    cJSON_AddNumberToObject(g, "bytes_done", (double)p->bytes_done);
    cJSON_AddNumberToObject(g, "bytes_total", (double)p->bytes_total);
    cJSON_AddNumberToObject(g, "elapsed_s", p->elapsed_s);
    double rate = p->elapsed_s > 0 ? (double)p->bytes_done / p->elapsed_s : 0;
    cJSON_AddNumberToObject(g, "rate_bytes_per_s", rate);
    /* ETA only when it means something: running, a plan, and a measured rate. */
    if (running && rate > 0 && p->bytes_total >= p->bytes_done)
        cJSON_AddNumberToObject(g, "eta_s", (double)(p->bytes_total - p->bytes_done) / rate);
    else
        cJSON_AddNullToObject(g, "eta_s");
}

cJSON *srv_render_update(ckpt_http_server_t *srv, uint64_t id, int *code)
{
    /* The provider runs outside the lock: it may take the engine's own lock. */
    pthread_mutex_lock(&srv->mu);
    ckpt_http_progress_fn fn = srv->progress_fn;
    void *ctx = srv->progress_ctx;
    int running = find_update(srv, id) && find_update(srv, id)->state == UP_RUNNING;
    pthread_mutex_unlock(&srv->mu);
    ckpt_http_progress_t pulled;
    int have_pulled = running && fn && fn(ctx, &pulled) == 0;

    cJSON *o = NULL;
    pthread_mutex_lock(&srv->mu);
    srv_update_t *u = find_update(srv, id);
    if (!u) goto cleanup;
    if (have_pulled && u->state == UP_RUNNING) u->progress = pulled;
    o = cJSON_CreateObject();
    cJSON_AddNumberToObject(o, "update_id", (double)u->id);
    cJSON_AddStringToObject(o, "name", u->name);
    cJSON_AddStringToObject(o, "mode", u->mode);
    cJSON_AddBoolToObject(o, "partial", u->partial);
    cJSON_AddBoolToObject(o, "isolate", u->isolate);
    cJSON_AddStringToObject(o, "state", update_state_name(u->state));
    add_progress(o, &u->progress, u->state == UP_RUNNING);
    if (u->state == UP_SUCCEEDED || u->state == UP_FAILED) {
        const ckpt_http_job_result_t *r = &u->result;
        cJSON_AddNumberToObject(o, "status", r->status);
        if (r->status) cJSON_AddStringToObject(o, "status_name", ckpt_status_name(r->status));
        cJSON_AddNumberToObject(o, "failed_rank", r->failed_rank);
        cJSON_AddStringToObject(o, "reason", r->reason);
        ckpt__update_result_json(o, &r->update);
        /* The phase times again, grouped as the first version of this API had them. */
        cJSON *t = cJSON_AddObjectToObject(o, "timings");
        cJSON_AddNumberToObject(t, "gather_s", r->update.gather_s);
        cJSON_AddNumberToObject(t, "plan_s", r->update.plan_s);
        cJSON_AddNumberToObject(t, "begin_s", r->update.begin_s);
        cJSON_AddNumberToObject(t, "pipeline_s", r->update.pipeline_s);
        cJSON_AddNumberToObject(t, "finish_s", r->update.finish_s);
        cJSON_AddNumberToObject(t, "total_s", r->update.total_s);
        /* vLLM's generation around the update (docs/HTTP.md): paused and not resumed
         * means it is still paused now. */
        cJSON_AddBoolToObject(o, "paused", r->paused);
        cJSON_AddBoolToObject(o, "resumed", r->resumed);
        char url[64];
        snprintf(url, sizeof url, "/v1/updates/%llu/trace", (unsigned long long)u->id);
        if (access(u->trace_path, R_OK) == 0) cJSON_AddStringToObject(o, "trace_url", url);
    }
    cJSON_AddBoolToObject(o, "trigger", u->has_trigger);
cleanup:
    pthread_mutex_unlock(&srv->mu);
    *code = o ? 200 : 404;
    return o;
}

void srv_free_state(ckpt_http_server_t *srv)
{
    while (srv->ckpts) remove_ckpt(srv, srv->ckpts->info.name);
    while (srv->head) {
        srv_job_t *n = srv->head;
        srv->head = n->next;
        ckpt_http_job_release(&n->job);
        ckpt__free(n);
    }
    srv->tail = NULL;
}

void ckpt_http_set_engine_ranks(ckpt_http_server_t *srv, int nranks)
{
    if (!srv) return;
    pthread_mutex_lock(&srv->mu);
    srv->engine_ranks = nranks > 0 ? nranks : 0;
    pthread_mutex_unlock(&srv->mu);
}

int srv_check_ranks(ckpt_http_server_t *srv, const ckpt_http_job_t *job, char *err, size_t cap,
                    char *field, size_t fcap)
{
    pthread_mutex_lock(&srv->mu);
    int n = srv->engine_ranks;
    pthread_mutex_unlock(&srv->mu);
    if (n <= 0 || job->kind != CKPT_JOB_UPDATE) return 0;
    for (int i = 0; i < job->nranks; i++) {
        if (job->ranks[i] >= n) {
            snprintf(err, cap, "'ranks' names rank %d, but the engine has %d ranks (0..%d)",
                     (int)job->ranks[i], n, n - 1);
            snprintf(field, fcap, "ranks");
            return 400;
        }
    }
    /* Every rank takes part in an update (it is collective, and a rank whose worker is not
     * attached would only time out), so a list of ranks must name them all. */
    if (job->nranks > 0 && job->nranks < n) {
        snprintf(err, cap,
                 "'ranks' names %d of the engine's %d ranks: updating a subset of ranks is "
                 "not supported yet (every rank takes part in an update); omit 'ranks', or "
                 "serve the other inference instances from a deployment of their own "
                 "(a P2P update joins one)", job->nranks, n);
        snprintf(field, fcap, "ranks");
        return 400;
    }
    for (int i = 0; i < job->ngroup_ranks; i++) {
        if (job->group_ranks[i] >= n) {
            snprintf(err, cap,
                     "'inference_group_ranks' names rank %d, but the engine has %d ranks (0..%d)",
                     (int)job->group_ranks[i], n, n - 1);
            snprintf(field, fcap, "inference_group_ranks");
            return 400;
        }
    }
    return 0;
}

cJSON *srv_gather_metas(ckpt_http_server_t *srv, const char *name, double timeout_s, int *code,
                        char *err, size_t cap)
{
    struct timespec deadline;
    clock_gettime(CLOCK_REALTIME, &deadline);
    double whole = floor(timeout_s);
    deadline.tv_sec += (time_t)whole;
    deadline.tv_nsec += (long)((timeout_s - whole) * 1e9);
    if (deadline.tv_nsec >= 1000000000L) {
        deadline.tv_sec++;
        deadline.tv_nsec -= 1000000000L;
    }
    cJSON *o = NULL;
    pthread_mutex_lock(&srv->mu);
    for (;;) {
        /* Found again after every wait: the entry may be gone meanwhile. */
        srv_ckpt_t *c = find_ckpt(srv, name);
        if (!c) {
            snprintf(err, cap, "no checkpoint named '%s'", name);
            *code = 404;
            break;
        }
        if (c->state == CK_READY) {
            o = ckpt_json(c);
            char url[CKPT_NAME_MAX + 64];
            snprintf(url, sizeof url, "/v1/checkpoints/%s/metas", name);
            cJSON_AddStringToObject(o, "metas_url", url);
            if (srv->engine_ranks) cJSON_AddNumberToObject(o, "ranks", srv->engine_ranks);
            *code = 200;
            break;
        }
        if (c->state != CK_REGISTERING) {
            snprintf(err, cap, "checkpoint '%s' is %s%s%.600s", name, ckpt_state_name(c->state),
                     c->reason[0] ? ": " : "", c->reason);
            *code = 409;
            break;
        }
        if (srv->stopping) {
            snprintf(err, cap, "the server is stopping");
            *code = 503;
            break;
        }
        if (pthread_cond_timedwait(&srv->state_cv, &srv->mu, &deadline) == ETIMEDOUT &&
            (c = find_ckpt(srv, name)) && c->state == CK_REGISTERING) {
            snprintf(err, cap, "checkpoint '%s' is still registering after %.0f s; poll GET "
                               "/v1/checkpoints/%s", name, timeout_s, name);
            *code = 409;
            break;
        }
    }
    pthread_mutex_unlock(&srv->mu);
    return o;
}
