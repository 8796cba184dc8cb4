/* The pool source (source.h): the owner stages its tensors out of its own pool. */
#include "engine/source.h"

/* Stages planned tensor k into the bucket: its bytes, or the part of it the route cut,
 * packed (a part along dim 0 is one run of rows; along dim d > 0, one run per index of
 * the dims before d). */
static void stage_tensor(const ckpt__update_t *u, size_t k, char *buf)
{
    const ckpt_tensor_meta_t *t = &u->plan.tensors[k];
    const char *src = u->local_data[u->plan.src[k].source];
    const ckpt__piece_t *pc = ckpt__planned_piece(u, k);
    if (!pc || pc->dim < 0) {
        ckpt__copy_bulk(buf + t->offset, src, t->nbytes);
        return;
    }
    uint64_t outer = 1, inner = ckpt_dtype_size(t->dtype);
    for (int d = 0; d < pc->dim; d++) outer *= (uint64_t)t->shape[d];
    for (int d = pc->dim + 1; d < t->ndim; d++) inner *= (uint64_t)t->shape[d];
    for (uint64_t o = 0; o < outer; o++)
        ckpt__copy_bulk(buf + t->offset + o * pc->length * inner,
                        src + (o * (uint64_t)pc->full + pc->start) * inner,
                        (size_t)(pc->length * inner));
}

static int fill(ckpt__update_t *u, size_t b, char *buf)
{
    const ckpt_bucket_t *bk = &u->plan.buckets[b];
    for (uint32_t i = bk->first; i < bk->first + bk->count; i++) stage_tensor(u, i, buf);
    return CKPT_OK;
}

const ckpt__source_ops_t ckpt__source_pool = {"pool", 0, 0, fill};
