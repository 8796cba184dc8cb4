/* The read engine of registration: executes a planned list of chunk reads with many reads
 * in flight (io_uring), or with a pool of pread threads where io_uring is unavailable
 * (old kernels, seccomp'd containers). The plan (load.c) is fixed before the first read,
 * so nothing here allocates or makes a syscall per tensor. */
#include <errno.h>
#include <liburing.h>
#include <pthread.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include "store/store_int.h"

void ckpt__io_finish_run(ckpt__io_job_t *job, ckpt__io_run_t *run)
{
    /* O_DIRECT landed the run at its 4 KiB-aligned file position; the pool wants it on a
     * CKPT_ALIGN boundary, at most CKPT_ALIGN - 1 bytes lower: one short memmove. */
    if (run->land != run->final) memmove(run->final, run->land, run->len);
    for (uint32_t i = run->first; i < run->first + run->count; i++) {
        ckpt_tensor_meta_t *m = job->tensors[i];
        m->checksum = ckpt_checksum(job->pool_base + m->offset, m->nbytes);
    }
}

/* Accounts `res` bytes transferred by one read of chunk c. Returns 1 when the chunk is
 * complete, 0 when it must continue, or a negative status (detail recorded in msg). */
static int chunk_progress(ckpt__io_job_t *job, ckpt__io_chunk_t *c, long long res, char *msg,
                          size_t msg_cap)
{
    const char *path = job->paths[job->runs[c->run].file];
    if (res == -EINTR || res == -EAGAIN) return 0;
    if (res < 0) {
        snprintf(msg, msg_cap, "%s: read of %llu bytes at offset %llu%s: %s", path,
                 (unsigned long long)(c->len - c->done), (unsigned long long)(c->file_off + c->done),
                 c->direct ? " (O_DIRECT)" : "", strerror((int)-res));
        return CKPT_EIO;
    }
    c->done += (uint64_t)res;
    if (c->done >= c->len || (res == 0 && c->done >= c->need)) return 1;
    if (res == 0) {
        snprintf(msg, msg_cap, "%s: truncated: end of file at offset %llu, %llu more bytes expected",
                 path, (unsigned long long)(c->file_off + c->done),
                 (unsigned long long)(c->need - c->done));
        return CKPT_EIO;
    }
    /* O_DIRECT reads stop short only at end of file; what lies past `need` is margin. */
    if (c->direct && c->done >= c->need) return 1;
    if (c->direct && c->done % CKPT__DIO_ALIGN) {
        snprintf(msg, msg_cap, "%s: unaligned short O_DIRECT read at offset %llu", path,
                 (unsigned long long)(c->file_off + c->done));
        return CKPT_EIO;
    }
    return 0;
}

/* ---- io_uring ---- */

/* Queues reads until `depth` are in flight: continuations of short reads first. */
static void fill(struct io_uring *ring, ckpt__io_job_t *job, size_t depth, size_t *inflight,
                 uint32_t *retry, size_t *nretry, size_t *next)
{
    while (*inflight < depth && (*nretry || *next < job->nchunks)) {
        struct io_uring_sqe *sqe = io_uring_get_sqe(ring);
        if (!sqe) break;
        uint32_t i = *nretry ? retry[--*nretry] : (uint32_t)(*next)++;
        ckpt__io_chunk_t *c = &job->chunks[i];
        io_uring_prep_read(sqe, c->fd, c->dst + c->done, (unsigned)(c->len - c->done),
                           c->file_off + c->done);
        io_uring_sqe_set_data64(sqe, i);
        (*inflight)++;
    }
}

static int run_uring(ckpt__io_job_t *job, struct io_uring *ring, uint32_t depth)
{
    int rc = CKPT_OK;
    char msg[512] = "";
    size_t next = 0, landed = 0, inflight = 0;
    /* Chunks to (re)submit ahead of new ones, and runs to finish: both bounded by depth. */
    uint32_t *retry = ckpt__malloc(depth * sizeof(*retry));
    uint32_t *ready = ckpt__malloc(depth * sizeof(*ready));
    size_t nretry = 0, nready = 0;

    if (!retry || !ready) {
        rc = ckpt__error(CKPT_ENOMEM, "io: out of memory");
        goto out;
    }
    while (landed < job->nchunks || inflight) {
        /* Fill the ring (unless failing: then only drain what is in flight). */
        if (rc == CKPT_OK) fill(ring, job, depth, &inflight, retry, &nretry, &next);
        if (!inflight) break;
        int ret = io_uring_submit_and_wait(ring, 1);
        if (ret < 0 && ret != -EINTR) {
            /* Nothing can be reaped reliably anymore; tear the ring down (the caller's
             * io_uring_queue_exit waits for in-flight reads) before freeing buffers. */
            if (rc == CKPT_OK) rc = ckpt__error(CKPT_EIO, "io: io_uring_submit: %s", strerror(-ret));
            break;
        }
        struct io_uring_cqe *cqe;
        unsigned head, seen = 0;
        io_uring_for_each_cqe(ring, head, cqe)
        {
            uint32_t i = (uint32_t)io_uring_cqe_get_data64(cqe);
            ckpt__io_chunk_t *c = &job->chunks[i];
            int st = chunk_progress(job, c, cqe->res, msg, sizeof(msg));
            seen++;
            inflight--;
            if (st < 0) {
                if (rc == CKPT_OK) rc = ckpt__error(st, "%s", msg);
            } else if (st == 0) {
                if (rc == CKPT_OK) retry[nretry++] = i;
            } else {
                landed++;
                ckpt__io_run_t *r = &job->runs[c->run];
                if (atomic_fetch_sub(&r->pending, 1) == 1) ready[nready++] = c->run;
            }
        }
        io_uring_cq_advance(ring, seen);
        if (rc) continue;
        /* Refill before the CPU work below, so the device stays busy while we hash. */
        fill(ring, job, depth, &inflight, retry, &nretry, &next);
        io_uring_submit(ring);
        for (size_t k = 0; k < nready; k++) ckpt__io_finish_run(job, &job->runs[ready[k]]);
        nready = 0;
    }
out:
    ckpt__free(retry);
    ckpt__free(ready);
    return rc;
}

/* ---- pread thread pool ---- */

typedef struct pread_ctx {
    ckpt__io_job_t *job;
    atomic_size_t next;
    atomic_int failed;
    pthread_mutex_t lock;
    int status;
    char msg[512];
} pread_ctx_t;

static void *pread_worker(void *arg)
{
    pread_ctx_t *ctx = arg;
    ckpt__io_job_t *job = ctx->job;
    char msg[512];
    for (;;) {
        if (atomic_load(&ctx->failed)) break;
        size_t i = atomic_fetch_add(&ctx->next, 1);
        if (i >= job->nchunks) break;
        ckpt__io_chunk_t *c = &job->chunks[i];
        int st = 0;
        while (st == 0) {
            ssize_t n = pread(c->fd, c->dst + c->done, c->len - c->done, (off_t)(c->file_off + c->done));
            st = chunk_progress(job, c, n < 0 ? -errno : n, msg, sizeof(msg));
        }
        if (st < 0) {
            pthread_mutex_lock(&ctx->lock);
            if (!ctx->status) {
                ctx->status = st;
                memcpy(ctx->msg, msg, sizeof(msg));
            }
            pthread_mutex_unlock(&ctx->lock);
            atomic_store(&ctx->failed, 1);
            break;
        }
        ckpt__io_run_t *r = &job->runs[c->run];
        if (atomic_fetch_sub(&r->pending, 1) == 1) ckpt__io_finish_run(job, r);
    }
    return NULL;
}

static int run_pread(ckpt__io_job_t *job)
{
    int rc = CKPT_OK;
    size_t nthreads = (size_t)CKPT_MIN((size_t)job->io_threads, CKPT_MAX(job->nchunks, (size_t)1));
    pthread_t *threads = ckpt__malloc(nthreads * sizeof(*threads));
    pread_ctx_t ctx = {.job = job, .status = CKPT_OK};
    size_t started = 0;

    if (!threads) return ckpt__error(CKPT_ENOMEM, "io: out of memory");
    atomic_init(&ctx.next, 0);
    atomic_init(&ctx.failed, 0);
    pthread_mutex_init(&ctx.lock, NULL);
    for (; started < nthreads; started++)
        if (pthread_create(&threads[started], NULL, pread_worker, &ctx) != 0) break;
    if (started == 0) pread_worker(&ctx); /* no thread at all: read on this one */
    for (size_t t = 0; t < started; t++) pthread_join(threads[t], NULL);
    if (ctx.status) rc = ckpt__error(ctx.status, "%s", ctx.msg);
    pthread_mutex_destroy(&ctx.lock);
    ckpt__free(threads);
    return rc;
}

int ckpt__io_run(ckpt__io_job_t *job)
{
    job->path_used = "pread";
    if (job->nchunks == 0) return CKPT_OK;
    if (job->use_uring) {
        struct io_uring ring;
        uint32_t depth = (uint32_t)CKPT_MAX(job->io_depth, 1);
        int ret = io_uring_queue_init(depth, &ring, 0);
        if (ret == 0) {
            job->path_used = "io_uring";
            int rc = run_uring(job, &ring, depth);
            io_uring_queue_exit(&ring);
            return rc;
        }
        ckpt_info("io_uring unavailable (%s): reading with %d pread threads", strerror(-ret),
                  job->io_threads);
    }
    return run_pread(job);
}
