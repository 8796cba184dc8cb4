/* The sim sink (sink.h): the GPU path's shape in host memory, so that CI, which has no GPU,
 * runs the device pipeline, the BEGIN of device buffers by handle and the workers' device
 * views end to end. Each rank holds its own buffers (as each GPU does), the owner's puts are
 * copies, and a bucket reaches every rank by a broadcast over all of them (NCCL's role).
 * It is a test device, not a faster CPU path: the host path shares one buffer per host. */
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "engine/buffers.h"
#include "engine/coll.h"
#include "engine/sink.h"

typedef struct {
    int fd[2];
    /* Per slot, the move waiting to run (MPI has no stream to queue it on): both slots'
     * moves can be queued, and each runs when its slot is waited for. */
    int pending[2];
    uint64_t pending_len[2];
    int pending_root[2];
} sim_t;

static int sim_open(ckpt__sink_t *s, int timeout_ms)
{
    (void)timeout_ms;
    sim_t *m = ckpt__calloc(1, sizeof(*m));
    if (!m) return ckpt__error(CKPT_ENOMEM, "sim device");
    m->fd[0] = m->fd[1] = -1;
    s->impl = m;
    s->ordinal = 0;
    snprintf(s->device, sizeof(s->device), "host memory standing in for a GPU");
    return CKPT_OK;
}

static void sim_close(ckpt__sink_t *s)
{
    ckpt__free(s->impl);
    s->impl = NULL;
}

static int sim_mem_free(ckpt__sink_t *s, uint64_t *bytes)
{
    (void)s;
    *bytes = ckpt__host_available_bytes();
    return CKPT_OK;
}

static int sim_alloc(ckpt__sink_t *s, int i, uint64_t size)
{
    sim_t *m = s->impl;
    int fd = memfd_create("ckpt-sim-device", MFD_CLOEXEC);
    if (fd < 0) return ckpt__error(CKPT_EIO, "sim device: memfd_create: %m");
    if (ftruncate(fd, (off_t)size) != 0) {
        close(fd);
        return ckpt__error(CKPT_ENOMEM, "sim device: sizing a %llu-byte buffer: %m",
                           (unsigned long long)size);
    }
    void *p = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, fd, 0);
    if (p == MAP_FAILED) {
        close(fd);
        return ckpt__error(CKPT_ENOMEM, "sim device: mapping a %llu-byte buffer: %m",
                           (unsigned long long)size);
    }
    m->fd[i] = fd;
    s->ptr[i] = p;
    /* The handle: this process's pid and the fd, which a worker opens at /proc/PID/fd/FD. */
    uint32_t pid = (uint32_t)getpid(), f = (uint32_t)fd;
    memset(s->handle[i], 0, CKPT_IPC_HANDLE_BYTES);
    memcpy(s->handle[i], &pid, 4);
    memcpy(s->handle[i] + 4, &f, 4);
    return CKPT_OK;
}

static void sim_release(ckpt__sink_t *s, int i)
{
    sim_t *m = s->impl;
    if (s->ptr[i]) munmap(s->ptr[i], s->size ? s->size : 1);
    if (m->fd[i] >= 0) close(m->fd[i]);
    s->ptr[i] = NULL;
    m->fd[i] = -1;
}

static int sim_put(ckpt__sink_t *s, char *dst, const void *src, uint64_t len)
{
    (void)s;
    ckpt__copy_bulk(dst, src, (size_t)len);
    return CKPT_OK;
}

static int sim_move(ckpt__sink_t *s, int slot, uint64_t len, int root)
{
    sim_t *m = s->impl;
    m->pending[slot] = 1;
    m->pending_len[slot] = len;
    m->pending_root[slot] = root;
    return CKPT_OK;
}

static int sim_wait(ckpt__sink_t *s, int slot, int timeout_ms, ckpt__sink_times_t *t)
{
    sim_t *m = s->impl;
    *t = (ckpt__sink_times_t){0, 0, 0};
    if (!m->pending[slot])
        return ckpt__error(CKPT_ESTATE, "sim device: no move of buffer %d to wait for", slot);
    m->pending[slot] = 0;
    double t0 = ckpt__now_s();
    int rc = ckpt__bcast_bytes(s->e, s->ptr[slot], m->pending_len[slot], m->pending_root[slot],
                               s->e->world, timeout_ms, "device broadcast");
    t->move_s = ckpt__now_s() - t0;
    return rc;
}

const ckpt__sink_ops_t ckpt__sink_sim = {
    "sim", CKPT_IPC_BUFFER_SIM, sim_open, sim_close, sim_mem_free, sim_alloc, sim_release,
    sim_put, sim_move, sim_wait,
};
