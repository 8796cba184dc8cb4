/* Share policy: largest-first greedy onto the least-loaded rank (LPT scheduling).
 *
 * Why this bound holds: a tensor always goes to a rank whose load is the minimum, so after
 * placing it the new maximum is either the old maximum (the gap shrinks or stays) or the
 * receiving rank, whose load exceeds every other by at most that tensor's size. Hence
 * max - min <= the largest tensor, for any input order. Sorting largest first makes the
 * result close to optimal, and sorting (not input order) makes it deterministic: every
 * rank computes the same shares from the same headers without talking. */
#include <stdlib.h>
#include <string.h>

#include "plan/share.h"

static int by_size_then_name(const void *a, const void *b)
{
    const ckpt_tensor_meta_t *x = *(const ckpt_tensor_meta_t *const *)a;
    const ckpt_tensor_meta_t *y = *(const ckpt_tensor_meta_t *const *)b;
    if (x->nbytes != y->nbytes) return x->nbytes > y->nbytes ? -1 : 1;
    int c = strncmp(x->name, y->name, CKPT_NAME_MAX);
    if (c) return c;
    return x < y ? -1 : (x > y); /* duplicate names: input order, still deterministic */
}

int ckpt__plan_shares(const ckpt_tensor_meta_t *metas, size_t count, int nranks,
                      int32_t *owners_out, uint64_t *loads_out)
{
    int rc = CKPT_OK;
    const ckpt_tensor_meta_t **order = NULL;
    uint64_t *load = NULL;

    if ((count && (!metas || !owners_out)) || nranks < 1)
        return ckpt__error(CKPT_EINVAL, "plan shares: %s", nranks < 1 ? "nranks < 1" : "NULL argument");
    order = ckpt__malloc(count * sizeof(*order));
    load = ckpt__calloc((size_t)nranks, sizeof(*load));
    if (!order || !load) {
        rc = ckpt__error(CKPT_ENOMEM, "plan shares: %zu tensors", count);
        goto out;
    }
    for (size_t i = 0; i < count; i++) order[i] = &metas[i];
    qsort(order, count, sizeof(*order), by_size_then_name);
    /* A linear scan over ranks is enough: ranks are few (one per GPU of a deployment). */
    for (size_t i = 0; i < count; i++) {
        int best = 0;
        for (int r = 1; r < nranks; r++)
            if (load[r] < load[best]) best = r;
        load[best] += order[i]->nbytes;
        owners_out[order[i] - metas] = best;
    }
    if (loads_out) memcpy(loads_out, load, (size_t)nranks * sizeof(*load));
out:
    ckpt__free(order);
    ckpt__free(load);
    return rc;
}

int ckpt_plan_shares(const ckpt_tensor_meta_t *metas, size_t count, int nranks,
                     int32_t *owners_out)
{
    return ckpt__plan_shares(metas, count, nranks, owners_out, NULL);
}
