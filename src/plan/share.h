/* The share policy: which rank of a deployment reads (and holds) which tensor. */
#ifndef CKPT_PLAN_SHARE_H
#define CKPT_PLAN_SHARE_H

#include "core/internal.h"
#include "ckpt/store.h"

/* Same contract as ckpt_plan_shares (include/ckpt/store.h); also writes each rank's load
 * in bytes to loads_out[nranks] when it is not NULL. */
int ckpt__plan_shares(const ckpt_tensor_meta_t *metas, size_t count, int nranks,
                      int32_t *owners_out, uint64_t *loads_out);

#endif
