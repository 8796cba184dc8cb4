/* The UCX source (source.h): the rank the bucket was assigned to pulls it from the
 * serving rank that holds it (P2P). A pull can fail (a serving rank died, the checkpoint
 * was unregistered), so the ranks agree on every bucket before a worker sees it. */
#include "engine/source.h"

static int fill(ckpt__update_t *u, size_t b, char *buf)
{
    const ckpt_bucket_t *bk = &u->plan.buckets[b];
    return ckpt__p2p_pull(u->e, u->p2p, u->src_owner[b], &u->plan.tensors[bk->first],
                          &u->plan.src[bk->first], bk->count, buf, u->cmd->timeout_ms);
}

const ckpt__source_ops_t ckpt__source_ucx = {"ucx", 0, 1, 1, fill};
