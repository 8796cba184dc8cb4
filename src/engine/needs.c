/* Worker-declared needs of an update (see needs.h). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "engine/coll.h"
#include "engine/needs.h"
#include "ipc/sender.h"

static uint64_t hash_name(const char *s)
{
    uint64_t h = 1469598103934665603ull; /* FNV-1a */
    for (; *s; s++) h = (h ^ (uint8_t)*s) * 1099511628211ull;
    return h;
}

/* Open-addressing index name -> position in all[] (slot value = index + 1). */
static int index_names(ckpt__needs_t *n, const ckpt_tensor_meta_t *all, size_t count)
{
    free(n->slots);
    n->nslots = 16;
    while (n->nslots < 2 * count) n->nslots *= 2;
    n->slots = calloc(n->nslots, sizeof(*n->slots));
    if (!n->slots) return ckpt__error(CKPT_ENOMEM, "needs: index of %zu tensors", count);
    n->all = all;
    for (size_t i = 0; i < count; i++) {
        size_t s = hash_name(all[i].name) & (n->nslots - 1);
        while (n->slots[s]) s = (s + 1) & (n->nslots - 1);
        n->slots[s] = (uint32_t)i + 1;
    }
    return CKPT_OK;
}

static long find(const ckpt__needs_t *n, const char *name)
{
    if (!n->slots) return -1;
    for (size_t s = hash_name(name) & (n->nslots - 1); n->slots[s]; s = (s + 1) & (n->nslots - 1))
        if (strcmp(n->all[n->slots[s] - 1].name, name) == 0) return (long)n->slots[s] - 1;
    return -1;
}

static uint64_t slice_bytes(const ckpt_tensor_meta_t *t, const ckpt_need_decl_t *d)
{
    if (d->dim < 0) return t->nbytes;
    return t->nbytes / (uint64_t)t->shape[d->dim] * d->length;
}

int ckpt__needs_local(ckpt_engine_t *e, const ckpt_tensor_meta_t *all, size_t count,
                      int partial, ckpt__needs_t *out)
{
    memset(out, 0, sizeof(*out));
    out->mine = malloc(count ? count : 1);
    out->slice = calloc(count ? count : 1, sizeof(*out->slice));
    if (!out->mine || !out->slice) return ckpt__error(CKPT_ENOMEM, "needs: %zu tensors", count);
    int rc = index_names(out, all, count);
    if (rc) return rc;
    const ckpt_need_decl_t *need = NULL;
    uint32_t nneed = 0;
    if (e->ipc) {
        /* Reads a NEED the worker sent since the last update (and accepts a worker that is
         * knocking); none connected is not an error here, BEGIN reports it. */
        ckpt_ipc_server_poll(e->ipc);
        out->declared = ckpt_ipc_server_need(e->ipc, &need, &nneed);
    }
    memset(out->mine, !out->declared, count ? count : 1);
    if (!out->declared) {
        for (size_t i = 0; i < count; i++) out->mine_bytes += all[i].nbytes;
        return CKPT_OK;
    }
    for (uint32_t k = 0; k < nneed; k++) {
        const ckpt_need_decl_t *d = &need[k];
        long i = find(out, d->name);
        if (i < 0) {
            if (partial) continue;
            return ckpt__error(CKPT_EINVAL, "rank %d: its worker (pid %d) needs tensor '%s', "
                               "which the update does not have (declare the checkpoint's "
                               "names, or update with partial=1)", e->rank,
                               ckpt_ipc_server_worker_pid(e->ipc), d->name);
        }
        const ckpt_tensor_meta_t *t = &all[i];
        if (d->dim >= 0 && (d->dim >= t->ndim || d->start + d->length > (uint64_t)t->shape[d->dim]))
            return ckpt__error(CKPT_EINVAL, "rank %d: its worker (pid %d) needs [%llu, %llu) "
                               "of dimension %d of tensor '%s', whose shape has %d dimensions%s",
                               e->rank, ckpt_ipc_server_worker_pid(e->ipc),
                               (unsigned long long)d->start,
                               (unsigned long long)(d->start + d->length), d->dim, t->name,
                               t->ndim, d->dim < t->ndim ? " and fewer indices there" : "");
        out->mine[i] = d->dim < 0 ? CKPT__NEED_WHOLE : CKPT__NEED_SLICE;
        out->slice[i].dim = d->dim < 0 ? -1 : d->dim;
        out->slice[i].start = d->dim < 0 ? 0 : d->start;
        out->slice[i].length = d->dim < 0 ? 0 : d->length;
        out->mine_bytes += slice_bytes(t, d);
    }
    return CKPT_OK;
}

int ckpt__needs_union(ckpt_engine_t *e, ckpt_tensor_meta_t *all, size_t *count,
                      int ignore_unneeded, int coll_ms, ckpt__needs_t *out)
{
    size_t n = *count;
    /* One allgather: whether each rank's worker declared, and the bytes it needs. */
    uint64_t mine[2] = {(uint64_t)out->declared, out->mine_bytes};
    uint64_t *every = malloc((size_t)e->size * sizeof(mine));
    if (!every) ckpt__engine_fatal(e, "needs: no memory for the ranks' figures");
    MPI_Request req;
    MPI_Iallgather(mine, 2, MPI_UINT64_T, every, 2, MPI_UINT64_T, e->world, &req);
    if (ckpt__mpi_wait(e, &req, coll_ms, 200, "needs agreement") < 0)
        ckpt__engine_fatal(e, ckpt_last_error());
    for (int r = 0; r < e->size; r++) {
        out->any_declared |= every[2 * r] != 0;
        out->bytes_total += every[2 * r + 1];
        if (every[2 * r + 1] > out->bytes_max) out->bytes_max = every[2 * r + 1];
    }
    free(every);
    if (!out->any_declared || n == 0) return CKPT_OK;
    uint8_t *wanted = malloc(n);
    int ok = wanted != NULL, all_ok = 0;
    MPI_Iallreduce(&ok, &all_ok, 1, MPI_INT, MPI_MIN, e->world, &req);
    if (ckpt__mpi_wait(e, &req, coll_ms, 200, "needs agreement") < 0)
        ckpt__engine_fatal(e, ckpt_last_error());
    if (!all_ok) {
        free(wanted);
        return ckpt__error(CKPT_ENOMEM, "needs: a rank has no memory for %zu flags", n);
    }
    /* MPI counts are int: a checkpoint has far fewer tensors than that. */
    MPI_Iallreduce(out->mine, wanted, (int)n, MPI_UNSIGNED_CHAR, MPI_BOR, e->world, &req);
    if (ckpt__mpi_wait(e, &req, coll_ms, 200, "needs union") < 0)
        ckpt__engine_fatal(e, ckpt_last_error());
    char names[256] = "";
    size_t len = 0, kept = 0;
    for (size_t i = 0; i < n; i++) {
        if (wanted[i]) continue;
        if (out->unneeded++ < 4 && len < sizeof(names))
            len += (size_t)snprintf(names + len, sizeof(names) - len, "%s'%s'", len ? ", " : "",
                                    all[i].name);
    }
    int rc = CKPT_OK;
    if (out->unneeded && !ignore_unneeded) {
        rc = ckpt__error(CKPT_EINVAL, "%u of %zu tensors are needed by no worker (%s%s): every "
                         "worker declared its need and none names them; declare them, or "
                         "update with unneeded=ignore to leave them out", out->unneeded, n,
                         names, out->unneeded > 4 ? ", ..." : "");
    } else if (out->unneeded) {
        for (size_t i = 0; i < n; i++) {
            if (!wanted[i]) continue;
            all[kept] = all[i];
            out->mine[kept] = out->mine[i];
            out->slice[kept] = out->slice[i];
            kept++;
        }
        *count = kept;
        rc = index_names(out, all, kept);
        ckpt_info("update: %u tensors needed by no worker are left out (unneeded=ignore)",
                  out->unneeded);
    }
    free(wanted);
    return rc;
}

int ckpt__needs_wants(const ckpt__needs_t *n, const ckpt_tensor_meta_t *t)
{
    if (!n->declared) return 1;
    long i = find(n, t->name);
    return i >= 0 && n->mine[i];
}

int ckpt__needs_wants_part(const ckpt__needs_t *n, size_t i, int dim, uint64_t start,
                           uint64_t length)
{
    if (!n->declared) return 1;
    if (n->mine[i] != CKPT__NEED_SLICE || dim < 0) return n->mine[i] != CKPT__NEED_NONE;
    const ckpt__slice_t *s = &n->slice[i];
    /* Parts are cut along the dimension every worker declared (route.c). */
    return s->dim != dim || (s->start < start + length && start < s->start + s->length);
}

void ckpt__needs_free(ckpt__needs_t *n)
{
    free(n->mine);
    free(n->slice);
    free(n->slots);
    memset(n, 0, sizeof(*n));
}
