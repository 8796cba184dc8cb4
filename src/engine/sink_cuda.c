/* The cuda sink (sink.h): device buckets on each rank's GPU, staged by the owner with
 * host-to-device copies out of its pinned pools and broadcast by NCCL.
 *
 * Per bucket, on two streams: the owner's puts run on the copy stream and end with an
 * event; the broadcast waits for that event on the NCCL stream (no host sync in between)
 * and records its own. The host only waits for the broadcast's event, while the worker
 * reloads the bucket before, so the next bucket's copies and broadcast run on the GPU
 * during that reload. The CUDA runtime and NCCL are opened with dlopen ($CKPT_CUDART,
 * $CKPT_NCCL, else by soname): a machine without them never loads them. NCCL's
 * communicator is made non-blocking, so its setup is bounded by the timeout too. */
#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "device/cuda_rt.h"
#include "engine/coll.h"
#include "engine/sink.h"

#ifdef CKPT_HAVE_CUDA_HEADERS
#include <nccl.h>

typedef struct {
    void *lib;
    ncclResult_t (*GetUniqueId)(ncclUniqueId *);
    ncclResult_t (*CommInitRankConfig)(ncclComm_t *, int, ncclUniqueId, int, ncclConfig_t *);
    ncclResult_t (*CommGetAsyncError)(ncclComm_t, ncclResult_t *);
    ncclResult_t (*CommAbort)(ncclComm_t);
    ncclResult_t (*CommDestroy)(ncclComm_t);
    ncclResult_t (*Broadcast)(const void *, void *, size_t, ncclDataType_t, int, ncclComm_t,
                              cudaStream_t);
    const char *(*GetErrorString)(ncclResult_t);
    ncclResult_t (*GetVersion)(int *);
} nccl_t;

typedef struct {
    const ckpt__cudart_t *rt;
    nccl_t nccl;
    ncclComm_t comm;
    void *copy_stream, *comm_stream;
    /* Per slot: puts begun, puts done, move begun (after the move before it on its
     * stream), move done. */
    void *start[2], *staged[2], *moving[2], *done[2];
    int started[2];                       /* this rank recorded start[slot] (it put bytes) */
    int timeout_ms;                       /* bounds waits on NCCL outside wait() */
} cuda_t;

static int load_nccl(nccl_t *n)
{
    const char *env = getenv("CKPT_NCCL");
    const char *names[] = {env && *env ? env : NULL, "libnccl.so.2", "libnccl.so"};
    for (size_t i = 0; i < CKPT_ARRAY_SIZE(names) && !n->lib; i++)
        if (names[i]) n->lib = dlopen(names[i], RTLD_NOW | RTLD_LOCAL);
    if (!n->lib)
        return ckpt__error(CKPT_EUNSUPPORTED, "no NCCL: dlopen found none of $CKPT_NCCL, "
                           "libnccl.so.2, libnccl.so (install NCCL, or point CKPT_NCCL at it)");
    struct {
        void **slot;
        const char *name;
    } syms[] = {
#define SYM(f) {(void **)&n->f, "nccl" #f}
        SYM(GetUniqueId), SYM(CommInitRankConfig), SYM(CommGetAsyncError), SYM(CommAbort),
        SYM(CommDestroy), SYM(Broadcast), SYM(GetErrorString), SYM(GetVersion),
#undef SYM
    };
    for (size_t i = 0; i < CKPT_ARRAY_SIZE(syms); i++)
        if (!(*syms[i].slot = dlsym(n->lib, syms[i].name)))
            return ckpt__error(CKPT_EUNSUPPORTED, "NCCL lacks %s (want NCCL >= 2.14)",
                               syms[i].name);
    return CKPT_OK;
}

static int nccl_fail(const nccl_t *n, ncclResult_t r, const char *what)
{
    return ckpt__error(CKPT_EIO, "%s: NCCL error %d (%s)", what, (int)r, n->GetErrorString(r));
}

static int cu(cuda_t *c, int e, const char *what)
{
    return e == 0 ? CKPT_OK : ckpt__cuda_fail(c->rt, e, what);
}

static void sleep_us(long us)
{
    struct timespec ts = {0, us * 1000};
    nanosleep(&ts, NULL);
}

/* The communicator over every rank, once every rank has its device (one allreduce, so no
 * rank waits in the init for one that gave up): rank 0's unique id by MPI, a non-blocking
 * init polled until done, aborted at the timeout. */
static int init_comm(ckpt__sink_t *s, cuda_t *c, int local_rc, int timeout_ms)
{
    ckpt_engine_t *e = s->e;
    ncclUniqueId id;
    memset(&id, 0, sizeof(id));
    ncclResult_t r = ncclSuccess;
    if (local_rc == CKPT_OK && e->rank == 0 && (r = c->nccl.GetUniqueId(&id)) != ncclSuccess)
        local_rc = nccl_fail(&c->nccl, r, "ncclGetUniqueId");
    int ok = local_rc == CKPT_OK, all_ok = 0;
    MPI_Request req;
    MPI_Iallreduce(&ok, &all_ok, 1, MPI_INT, MPI_MIN, e->world, &req);
    int rc = ckpt__mpi_wait(e, &req, timeout_ms, 200, "device agreement");
    if (rc < 0) return rc;
    if (local_rc < 0) return local_rc;
    if (!all_ok) return ckpt__error(CKPT_EPEER, "another rank could not open its GPU");
    rc = ckpt__bcast_bytes(e, &id, sizeof(id), 0, e->world, timeout_ms, "NCCL unique id");
    if (rc < 0) return rc;
    ncclConfig_t cfg = NCCL_CONFIG_INITIALIZER;
    cfg.blocking = 0;
    r = c->nccl.CommInitRankConfig(&c->comm, e->size, id, e->rank, &cfg);
    double deadline = ckpt__now_s() + timeout_ms / 1000.0;
    while (r == ncclInProgress) {
        if (ckpt__now_s() > deadline) {
            c->nccl.CommAbort(c->comm);
            c->comm = NULL;
            return ckpt__error(CKPT_ETIMEDOUT, "NCCL communicator of %d ranks not made within "
                               "%d ms (a rank missing, or no network between them)", e->size,
                               timeout_ms);
        }
        sleep_us(1000);
        c->nccl.CommGetAsyncError(c->comm, &r);
    }
    if (r != ncclSuccess) {
        if (c->comm) c->nccl.CommAbort(c->comm);
        c->comm = NULL;
        return nccl_fail(&c->nccl, r, "ncclCommInitRankConfig");
    }
    return CKPT_OK;
}

static void cuda_close(ckpt__sink_t *s)
{
    cuda_t *c = s->impl;
    if (!c) return;
    if (c->comm) c->nccl.CommDestroy(c->comm);
    for (int i = 0; i < 2; i++) {
        if (c->start[i]) c->rt->EventDestroy(c->start[i]);
        if (c->staged[i]) c->rt->EventDestroy(c->staged[i]);
        if (c->moving[i]) c->rt->EventDestroy(c->moving[i]);
        if (c->done[i]) c->rt->EventDestroy(c->done[i]);
    }
    if (c->copy_stream) c->rt->StreamDestroy(c->copy_stream);
    if (c->comm_stream) c->rt->StreamDestroy(c->comm_stream);
    /* NCCL's library stays loaded: its threads may outlive the communicator. */
    ckpt__free(c);
    s->impl = NULL;
}

static int cuda_open(ckpt__sink_t *s, int timeout_ms)
{
    cuda_t *c = ckpt__calloc(1, sizeof(*c));
    if (!c) return ckpt__error(CKPT_ENOMEM, "cuda sink");
    s->impl = c;
    c->timeout_ms = timeout_ms;
    int n = ckpt__cuda_devices();
    int rc = n < 0 ? n : ckpt__cudart(&c->rt);
    if (rc == CKPT_OK) rc = load_nccl(&c->nccl);
    if (rc == CKPT_OK) {
        /* One rank per GPU: the local rank's device (CUDA_VISIBLE_DEVICES narrows the list
         * the runtime shows, so a rank given one GPU uses index 0). */
        s->ordinal = ckpt__local_rank(s->e) % n;
        rc = cu(c, c->rt->SetDevice(s->ordinal), "cudaSetDevice");
        int v = 0;
        c->nccl.GetVersion(&v);
        snprintf(s->device, sizeof(s->device), "GPU %d of %d, NCCL %d, %.48s", s->ordinal, n,
                 v, c->rt->path);
    }
    if (rc == CKPT_OK)
        rc = cu(c, c->rt->StreamCreateWithFlags(&c->copy_stream, CKPT__CUDA_STREAM_NONBLOCKING),
                "cudaStreamCreate");
    if (rc == CKPT_OK)
        rc = cu(c, c->rt->StreamCreateWithFlags(&c->comm_stream, CKPT__CUDA_STREAM_NONBLOCKING),
                "cudaStreamCreate");
    for (int i = 0; rc == CKPT_OK && i < 2; i++) {
        rc = cu(c, c->rt->EventCreateWithFlags(&c->start[i], 0), "cudaEventCreate");
        if (rc == CKPT_OK) rc = cu(c, c->rt->EventCreateWithFlags(&c->staged[i], 0), "cudaEventCreate");
        if (rc == CKPT_OK) rc = cu(c, c->rt->EventCreateWithFlags(&c->moving[i], 0), "cudaEventCreate");
        if (rc == CKPT_OK) rc = cu(c, c->rt->EventCreateWithFlags(&c->done[i], 0), "cudaEventCreate");
    }
    rc = init_comm(s, c, rc, timeout_ms);
    if (rc < 0) {
        char why[CKPT__REASON_MAX];
        snprintf(why, sizeof(why), "%s", ckpt_last_error());
        cuda_close(s);
        return ckpt__error(rc, "%s", why);
    }
    return CKPT_OK;
}

static int cuda_mem_free(ckpt__sink_t *s, uint64_t *bytes)
{
    cuda_t *c = s->impl;
    size_t free_b = 0, total = 0;
    int rc = cu(c, c->rt->MemGetInfo(&free_b, &total), "cudaMemGetInfo");
    *bytes = free_b;
    return rc;
}

static int cuda_alloc(ckpt__sink_t *s, int i, uint64_t size)
{
    cuda_t *c = s->impl;
    void *p = NULL;
    int rc = cu(c, c->rt->Malloc(&p, (size_t)size), "cudaMalloc of a device bucket");
    if (rc < 0) return ckpt__error_prefix(rc, "%llu bytes on GPU %d: ", (unsigned long long)size,
                                          s->ordinal);
    ckpt__cuda_ipc_t h;
    rc = cu(c, c->rt->IpcGetMemHandle(&h, p), "cudaIpcGetMemHandle");
    if (rc < 0) {
        c->rt->Free(p);
        return rc;
    }
    s->ptr[i] = p;
    memcpy(s->handle[i], h.bytes, CKPT_IPC_HANDLE_BYTES);
    return CKPT_OK;
}

static void cuda_release(ckpt__sink_t *s, int i)
{
    cuda_t *c = s->impl;
    if (s->ptr[i]) c->rt->Free(s->ptr[i]);
    s->ptr[i] = NULL;
}

/* The slot a device address lies in (puts name addresses, not slots). */
static int slot_of(const ckpt__sink_t *s, const char *dst)
{
    for (int i = 0; i < s->nbuffers; i++)
        if (dst >= s->ptr[i] && dst < s->ptr[i] + s->size) return i;
    return -1;
}

static int cuda_put(ckpt__sink_t *s, char *dst, const void *src, uint64_t len)
{
    cuda_t *c = s->impl;
    int slot = slot_of(s, dst);
    if (slot < 0) return ckpt__error(CKPT_EINVAL, "cuda sink: put outside the device buffers");
    if (!c->started[slot]) { /* the first put of the bucket: its H2D time starts here */
        int rc = cu(c, c->rt->EventRecord(c->start[slot], c->copy_stream), "cudaEventRecord");
        if (rc < 0) return rc;
        c->started[slot] = 1;
    }
    return cu(c, c->rt->MemcpyAsync(dst, src, (size_t)len, CKPT__CUDA_H2D, c->copy_stream),
              "cudaMemcpyAsync host to device");
}

static int cuda_move(ckpt__sink_t *s, int slot, uint64_t len, int root)
{
    cuda_t *c = s->impl;
    int rc = CKPT_OK;
    if (c->started[slot]) {
        rc = cu(c, c->rt->EventRecord(c->staged[slot], c->copy_stream), "cudaEventRecord");
        if (rc == CKPT_OK)
            rc = cu(c, c->rt->StreamWaitEvent(c->comm_stream, c->staged[slot], 0),
                    "cudaStreamWaitEvent");
    }
    if (rc == CKPT_OK)
        rc = cu(c, c->rt->EventRecord(c->moving[slot], c->comm_stream), "cudaEventRecord");
    if (rc < 0) return rc;
    ncclResult_t r = c->nccl.Broadcast(s->ptr[slot], s->ptr[slot], (size_t)len, ncclUint8, root,
                                       c->comm, c->comm_stream);
    /* A non-blocking communicator may return before the broadcast is on the stream: wait
     * until it is, or the event below would be recorded ahead of it (and the worker handed
     * a buffer the broadcast has not written yet). */
    double deadline = ckpt__now_s() + c->timeout_ms / 1000.0;
    while (r == ncclInProgress) {
        if (ckpt__now_s() > deadline) {
            c->nccl.CommAbort(c->comm);
            c->comm = NULL;
            return ckpt__error(CKPT_ETIMEDOUT, "ncclBroadcast of buffer %d not enqueued within "
                               "%d ms", slot, c->timeout_ms);
        }
        sleep_us(20);
        c->nccl.CommGetAsyncError(c->comm, &r);
    }
    if (r != ncclSuccess) return nccl_fail(&c->nccl, r, "ncclBroadcast");
    return cu(c, c->rt->EventRecord(c->done[slot], c->comm_stream), "cudaEventRecord");
}

static int cuda_wait(ckpt__sink_t *s, int slot, int timeout_ms, ckpt__sink_times_t *t)
{
    cuda_t *c = s->impl;
    *t = (ckpt__sink_times_t){0, 0, 0};
    double deadline = ckpt__now_s() + timeout_ms / 1000.0;
    long nap = 20;
    for (;;) {
        int e = c->rt->EventQuery(c->done[slot]);
        if (e == 0) break;
        if (e != CKPT__CUDA_NOT_READY) return ckpt__cuda_fail(c->rt, e, "device broadcast");
        ncclResult_t ar = ncclSuccess;
        c->nccl.CommGetAsyncError(c->comm, &ar);
        if (ar != ncclSuccess && ar != ncclInProgress) {
            c->nccl.CommAbort(c->comm);
            c->comm = NULL;
            return nccl_fail(&c->nccl, ar, "device broadcast");
        }
        if (ckpt__now_s() > deadline) {
            /* A rank that never joined leaves the broadcast waiting: abort it, or the GPU
             * keeps spinning in the kernel. The engine stops (the collective state is
             * unknown); the workers keep their weights and see the update incomplete. */
            c->nccl.CommAbort(c->comm);
            c->comm = NULL;
            return ckpt__error(CKPT_ETIMEDOUT, "device broadcast of buffer %d not done within "
                               "%d ms (a rank stopped?)", slot, timeout_ms);
        }
        sleep_us(nap);
        if (nap < 500) nap *= 2;
    }
    float ms = 0;
    if (c->rt->EventElapsedTime(&ms, c->moving[slot], c->done[slot]) == 0) t->move_s = ms / 1e3;
    if (c->started[slot]) {
        if (c->rt->EventElapsedTime(&ms, c->start[slot], c->staged[slot]) == 0) t->put_s = ms / 1e3;
        if (c->rt->EventElapsedTime(&ms, c->staged[slot], c->done[slot]) == 0) t->put_end = ms / 1e3;
        c->started[slot] = 0;
    }
    return CKPT_OK;
}

#else /* built without the CUDA toolkit's headers */

static int cuda_open(ckpt__sink_t *s, int timeout_ms)
{
    (void)s;
    (void)timeout_ms;
    return ckpt__error(CKPT_EUNSUPPORTED, "this build has no CUDA support (the CUDA toolkit "
                       "was not found when it was configured: rebuild with it installed)");
}
static void cuda_close(ckpt__sink_t *s) { (void)s; }
static int cuda_mem_free(ckpt__sink_t *s, uint64_t *b) { (void)s; *b = 0; return CKPT_EUNSUPPORTED; }
static int cuda_alloc(ckpt__sink_t *s, int i, uint64_t n) { (void)s, (void)i, (void)n; return CKPT_EUNSUPPORTED; }
static void cuda_release(ckpt__sink_t *s, int i) { (void)s, (void)i; }
static int cuda_put(ckpt__sink_t *s, char *d, const void *p, uint64_t n) { (void)s, (void)d, (void)p, (void)n; return CKPT_EUNSUPPORTED; }
static int cuda_move(ckpt__sink_t *s, int i, uint64_t n, int r) { (void)s, (void)i, (void)n, (void)r; return CKPT_EUNSUPPORTED; }
static int cuda_wait(ckpt__sink_t *s, int i, int t, ckpt__sink_times_t *x) { (void)s, (void)i, (void)t, (void)x; return CKPT_EUNSUPPORTED; }

#endif

const ckpt__sink_ops_t ckpt__sink_cuda = {
    "cuda", CKPT_IPC_BUFFER_CUDA, cuda_open, cuda_close, cuda_mem_free, cuda_alloc,
    cuda_release, cuda_put, cuda_move, cuda_wait,
};
