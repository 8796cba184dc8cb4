/* Where a bucket's bytes come from. The pipeline (update.c) runs every update the same
 * way, bucket by bucket, and asks the update's source only this: fill the owner's bucket
 * buffer (`fill`, on the rank that owns the bucket), whether a fill can fail on one rank
 * so that the ranks agree before any worker sees the bucket (`may_fail`), and whether the
 * workers read the source in place, with no buffer and nothing to move (`in_place`).
 * Moving the bytes between hosts and handing them to the workers is the pipeline's.
 *
 *   pool    (source_pool.c)   the owner copies its tensors (or the parts the route cut)
 *                             out of its pool: staged updates
 *   ucx     (source_ucx.c)    the receiving rank pulls them from a serving rank's pool
 *                             with UCX gets: P2P updates
 *   window  (source_window.c) the workers read windows of the owners' pools in place:
 *                             direct updates on one host
 *
 * A new transport is one file defining one of these, chosen in update.c's plan step. */
#ifndef CKPT_ENGINE_SOURCE_H
#define CKPT_ENGINE_SOURCE_H

#include "engine/update.h"

typedef struct ckpt__source_ops {
    const char *name;
    int in_place;
    int may_fail;
    /* fill writes host memory only (UCX gets): on a device the pipeline has it fill the host
     * bucket buffer and puts the bucket onto the device in one copy. Otherwise fill puts
     * each tensor with ckpt__update_put, straight into the device buffer. */
    int host_only;
    /* Bucket b's bytes into buf (the owner's; NULL when in_place). < 0 with the error set. */
    int (*fill)(ckpt__update_t *u, size_t b, char *buf);
} ckpt__source_ops_t;

extern const ckpt__source_ops_t ckpt__source_pool;
extern const ckpt__source_ops_t ckpt__source_ucx;
extern const ckpt__source_ops_t ckpt__source_window;

#endif
