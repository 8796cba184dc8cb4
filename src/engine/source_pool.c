/* The pool source (source.h): the owner stages its tensors out of its own pool, into the
 * host bucket buffer or, on a device, straight into the device buffer (H2D from the pinned
 * pool, no host copy in between). */
#include "engine/source.h"

/* Stages planned tensor k into the bucket: its bytes, or the part of it the route cut,
 * packed (a part along dim 0 is one run of rows; along dim d > 0, one run per index of
 * the dims before d). */
static int stage_tensor(ckpt__update_t *u, size_t k, char *buf)
{
    const ckpt_tensor_meta_t *t = &u->plan.tensors[k];
    const char *src = u->local_data[u->plan.src[k].source];
    const ckpt__piece_t *pc = ckpt__planned_piece(u, k);
    if (!pc || pc->dim < 0) return ckpt__update_put(u, buf + t->offset, src, t->nbytes);
    uint64_t outer = 1, inner = ckpt_dtype_size(t->dtype);
    for (int d = 0; d < pc->dim; d++) outer *= (uint64_t)t->shape[d];
    for (int d = pc->dim + 1; d < t->ndim; d++) inner *= (uint64_t)t->shape[d];
    int rc = CKPT_OK;
    for (uint64_t o = 0; o < outer && rc == CKPT_OK; o++)
        rc = ckpt__update_put(u, buf + t->offset + o * pc->length * inner,
                              src + (o * (uint64_t)pc->full + pc->start) * inner,
                              (size_t)(pc->length * inner));
    return rc;
}

static int fill(ckpt__update_t *u, size_t b, char *buf)
{
    const ckpt_bucket_t *bk = &u->plan.buckets[b];
    int rc = CKPT_OK;
    for (uint32_t i = bk->first; i < bk->first + bk->count && rc == CKPT_OK; i++)
        rc = stage_tensor(u, i, buf);
    return rc;
}

const ckpt__source_ops_t ckpt__source_pool = {"pool", 0, 0, 0, fill};
