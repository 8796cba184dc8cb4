/* Choosing and sizing the device sink (sink.h). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "device/cuda_rt.h"
#include "engine/coll.h"
#include "engine/sink.h"

int ckpt__local_rank(ckpt_engine_t *e)
{
    if (e->opts.share_mode == CKPT_SHARE_NODE) return e->group_rank;
    MPI_Comm node;
    int r = 0;
    MPI_Comm_split_type(e->world, MPI_COMM_TYPE_SHARED, e->rank, MPI_INFO_NULL, &node);
    MPI_Comm_rank(node, &r);
    MPI_Comm_free(&node);
    return r;
}

/* 1 on every rank or 0 on every rank: whether all have `mine`. */
static int all_ranks(ckpt_engine_t *e, int mine, int timeout_ms)
{
    int all = 0;
    MPI_Request req;
    MPI_Iallreduce(&mine, &all, 1, MPI_INT, MPI_MIN, e->world, &req);
    if (ckpt__mpi_wait(e, &req, timeout_ms, 200, "device agreement") < 0) return -1;
    return all;
}

int ckpt__sink_open(ckpt_engine_t *e, const char *device, int timeout_ms)
{
    const ckpt__sink_ops_t *ops = NULL;
    int want_cuda = 0;
    if (!device || !strcmp(device, "auto")) {
        int n = ckpt__cuda_devices();
        char why[CKPT__REASON_MAX];
        snprintf(why, sizeof(why), "%s", n > 0 ? "" : ckpt_last_error());
        ckpt__error_clear();
        int all = all_ranks(e, n > 0, timeout_ms);
        if (all < 0) return CKPT_EPEER;
        if (!all) {
            snprintf(e->device_text, sizeof(e->device_text), "host memory (device auto: %.400s)",
                     n > 0 ? "another rank sees no GPU" : why);
            return CKPT_OK;
        }
        ops = &ckpt__sink_cuda;
    } else if (!strcmp(device, "cpu")) {
        snprintf(e->device_text, sizeof(e->device_text), "host memory (device cpu)");
        return CKPT_OK;
    } else if (!strcmp(device, "cuda")) {
        ops = &ckpt__sink_cuda;
        want_cuda = 1;
    } else if (!strcmp(device, "sim")) {
        ops = &ckpt__sink_sim;
    } else {
        return ckpt__error(CKPT_EINVAL, "device '%s': want auto, cpu, cuda or sim", device);
    }
    ckpt__sink_t *s = ckpt__calloc(1, sizeof(*s));
    if (!s) return ckpt__error(CKPT_ENOMEM, "device sink");
    s->ops = ops;
    s->e = e;
    int rc = ops->open(s, timeout_ms);
    int all = all_ranks(e, rc == CKPT_OK, timeout_ms);
    if (all <= 0) {
        if (rc == CKPT_OK) {
            ops->close(s);
            rc = ckpt__error(CKPT_EPEER, "device %s: another rank could not open its device",
                             ops->name);
        } else if (want_cuda) {
            ckpt__error_prefix(rc, "--device cuda: ");
        }
        ckpt__free(s);
        return rc;
    }
    e->sink = s;
    snprintf(e->device_text, sizeof(e->device_text), "%s: %s", ops->name, s->device);
    return CKPT_OK;
}

void ckpt__sink_close(ckpt_engine_t *e)
{
    ckpt__sink_t *s = e->sink;
    if (!s) return;
    for (int i = 0; i < s->nbuffers; i++) s->ops->release(s, i);
    s->ops->close(s);
    ckpt__free(s);
    e->sink = NULL;
}

int ckpt__sink_budget(ckpt_engine_t *e, int timeout_ms, uint64_t *budget_out)
{
    ckpt__sink_t *s = e->sink;
    uint64_t mine = 0, all = 0;
    if (e->opts.memory_limit) {
        mine = e->opts.memory_limit;
    } else if (s->ops->mem_free(s, &mine) == CKPT_OK) {
        /* Half of what is free: the rest is the inference engine's (its weights and KV
         * cache live on the same GPU); the buffers already held count as free. */
        mine = mine / 2 + s->size * (uint64_t)s->nbuffers;
    } else {
        ckpt_warn("device %s: free memory unknown (%s); planning for none", s->ops->name,
                  ckpt_last_error());
        ckpt__error_clear();
        mine = 0;
    }
    MPI_Request req;
    MPI_Iallreduce(&mine, &all, 1, MPI_UINT64_T, MPI_MIN, e->world, &req);
    int rc = ckpt__mpi_wait(e, &req, timeout_ms, 200, "device memory agreement");
    if (rc == CKPT_OK) *budget_out = all;
    return rc;
}

int ckpt__sink_ensure(ckpt_engine_t *e, uint64_t size, int nbuffers, int timeout_ms)
{
    ckpt__sink_t *s = e->sink;
    int rc = CKPT_OK;
    if (!(s->size >= size && s->nbuffers == nbuffers)) {
        for (int i = 0; i < s->nbuffers; i++) s->ops->release(s, i);
        s->nbuffers = 0;
        s->size = 0;
        for (int i = 0; i < nbuffers && rc == CKPT_OK; i++) {
            rc = s->ops->alloc(s, i, size);
            if (rc == CKPT_OK) s->nbuffers = i + 1;
        }
        if (rc == CKPT_OK) s->size = size;
        if (rc == CKPT_OK)
            ckpt_debug("device buffers: %d x %llu bytes", nbuffers, (unsigned long long)size);
    }
    char reason[CKPT__REASON_MAX];
    int failed = -1;
    int arc = ckpt__agree(e, rc, rc < 0 ? ckpt_last_error() : NULL, timeout_ms, &failed, reason,
                          sizeof(reason));
    if (arc < 0) { /* here or elsewhere: drop what was made, the next update tries again */
        for (int i = 0; i < s->nbuffers; i++) s->ops->release(s, i);
        s->nbuffers = 0;
        s->size = 0;
    }
    if (arc < 0) return ckpt__error(arc, "device buffers: %s", reason);
    return CKPT_OK;
}
