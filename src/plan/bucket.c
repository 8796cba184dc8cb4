/* Bucket planner (see bucket.h). Pure: no I/O, no global state. */
#include <stdlib.h>
#include <string.h>

#include "plan/bucket.h"

typedef struct {
    const ckpt_tensor_meta_t *meta;
    ckpt__place_t place;
    uint32_t index; /* in the input */
} plan_item_t;

static int item_cmp(const void *a, const void *b)
{
    const plan_item_t *p = a, *q = b;
    const ckpt_tensor_meta_t *x = p->meta, *y = q->meta;
    if (x->owner != y->owner) return x->owner < y->owner ? -1 : 1;
    int c = strcmp(x->name, y->name);
    if (c) return c;
    return p->index < q->index ? -1 : p->index > q->index; /* parts of one tensor: in order */
}

static int name_cmp(const void *a, const void *b)
{
    return strcmp(((const plan_item_t *)a)->meta->name, ((const plan_item_t *)b)->meta->name);
}

/* Allocation of a plan for `count` tensors (at most one bucket per tensor) and of the
 * sort scratch; on failure everything is freed. */
static int plan_alloc(size_t count, uint64_t bucket_size, ckpt_bucket_plan_t *plan,
                      plan_item_t **items)
{
    memset(plan, 0, sizeof(*plan));
    plan->bucket_size = bucket_size;
    *items = ckpt__calloc(count, sizeof(**items));
    plan->tensors = ckpt__calloc(count, sizeof(*plan->tensors));
    plan->src = ckpt__calloc(count + 1, sizeof(*plan->src));
    plan->origin = ckpt__calloc(count + 1, sizeof(*plan->origin));
    plan->buckets = ckpt__calloc(count + 1, sizeof(*plan->buckets));
    if (*items && plan->tensors && plan->src && plan->origin && plan->buckets)
        return CKPT_OK;
    ckpt__free(*items);
    *items = NULL;
    ckpt__plan_free(plan);
    return ckpt__error(CKPT_ENOMEM, "planning %zu tensors: out of memory", count);
}

/* Names must be unique across owners too: sort by name alone to find repeats. */
static int check_unique_names(const ckpt_tensor_meta_t *metas, size_t count, plan_item_t *items)
{
    for (size_t i = 0; i < count; i++) items[i].meta = &metas[i];
    qsort(items, count, sizeof(*items), name_cmp);
    for (size_t i = 1; i < count; i++)
        if (strcmp(items[i - 1].meta->name, items[i].meta->name) == 0)
            return ckpt__error(CKPT_EINVAL, "tensor '%s' is held by ranks %d and %d",
                               items[i].meta->name, items[i - 1].meta->owner,
                               items[i].meta->owner);
    return CKPT_OK;
}

/* Where a tensor goes in a bucket whose next free byte is pos: there, or further on so that
 * its bucket offset is congruent to its source offset modulo a page. Copies between two
 * addresses a little more than a multiple of 4 KiB apart run 2-3x slower on the x86 cores
 * measured here (4K aliasing: a load looks like it depends on an earlier store with the
 * same page offset): memcpy out of a pool 3.2-4.5 GB/s at distances of 64-256 bytes vs
 * 9-10.5 at 0, process_vm_readv (UCX's cma gets) 1.9 vs 3.8. Pools and buffers start on
 * page boundaries, so equal offsets modulo a page mean equal page offsets. Both offsets
 * are CKPT_ALIGN multiples, so the padding keeps the alignment. Small tensors are not
 * worth up to a page of padding each. */
#define CKPT__PLACE_PAGE 4096u
#define CKPT__PLACE_MIN (64u * 1024u)
static uint64_t place(uint64_t pos, uint64_t src_offset, uint64_t nbytes)
{
    if (nbytes < CKPT__PLACE_MIN) return pos;
    /* Rounded down to the alignment in case a source offset is not aligned itself. */
    return pos + (((src_offset - pos) & (CKPT__PLACE_PAGE - 1)) & ~(uint64_t)(CKPT_ALIGN - 1));
}

/* The common end of both planners: names checked, the sort scratch freed, the plan handed
 * out (or freed on a duplicate name). */
static int plan_finish(ckpt_bucket_plan_t *plan, size_t count, plan_item_t *items,
                       int parts, ckpt_bucket_plan_t *plan_out)
{
    int rc = parts ? CKPT_OK : check_unique_names(plan->tensors, count, items);
    ckpt__free(items);
    if (rc < 0) {
        ckpt__plan_free(plan);
        return rc;
    }
    plan->ntensors = count;
    *plan_out = *plan;
    return CKPT_OK;
}

int ckpt__plan_check_names(const ckpt_tensor_meta_t *metas, size_t count)
{
    plan_item_t *items = ckpt__calloc(count + 1, sizeof(*items));
    if (!items) return ckpt__error(CKPT_ENOMEM, "checking %zu names: out of memory", count);
    int rc = check_unique_names(metas, count, items);
    ckpt__free(items);
    return rc;
}

uint64_t ckpt__plan_min_bucket(const ckpt_tensor_meta_t *metas, size_t count)
{
    uint64_t largest = 0;
    for (size_t i = 0; i < count; i++)
        largest = CKPT_MAX(largest, ckpt_aligned_size(metas[i].nbytes));
    return largest;
}

uint64_t ckpt__plan_pipeline_limit(uint64_t total_bytes, uint64_t bucket_max)
{
    uint64_t deep = CKPT_MAX(total_bytes / CKPT__PIPELINE_DEPTH, CKPT__PIPELINE_MIN_BUCKET);
    return CKPT_MIN(bucket_max, deep);
}

int ckpt__plan_bucket_size(uint64_t largest_tensor, uint64_t bucket_max, uint64_t avail_bytes,
                           uint64_t *bucket_size_out, int *nbuffers_out)
{
    largest_tensor = ckpt_aligned_size(largest_tensor);
    if (largest_tensor == 0) largest_tensor = CKPT_ALIGN;
    if (avail_bytes < largest_tensor)
        return ckpt__error(CKPT_ENOMEM,
                           "the largest tensor needs a bucket of %llu bytes but only %llu bytes "
                           "of memory are available for buckets (free memory, or lower the "
                           "model's largest tensor)",
                           (unsigned long long)largest_tensor, (unsigned long long)avail_bytes);
    /* Two buffers when both fit, so the broadcast of b+1 overlaps the reload of b. */
    int nbuffers = avail_bytes >= 2 * largest_tensor ? 2 : 1;
    uint64_t size = CKPT_MIN(bucket_max, avail_bytes / (uint64_t)nbuffers);
    size = CKPT_MAX(size, largest_tensor);
    size = CKPT_ALIGN_UP(size, (uint64_t)CKPT_ALIGN);
    if (nbuffers == 2 && size * 2 > avail_bytes) nbuffers = 1;
    *bucket_size_out = size;
    *nbuffers_out = nbuffers;
    return CKPT_OK;
}

/* The sort items: each input meta with its placement and index. */
static void fill_items(plan_item_t *items, const ckpt_tensor_meta_t *metas,
                       const ckpt__place_t *places, size_t count)
{
    static const ckpt__place_t none = {0, 0, 0};
    for (size_t i = 0; i < count; i++) {
        items[i].meta = &metas[i];
        items[i].place = places ? places[i] : none;
        items[i].index = (uint32_t)i;
    }
}

static int plan_buckets(const ckpt_tensor_meta_t *metas, const ckpt__place_t *places,
                        size_t count, int nranks, uint64_t bucket_size, int parts,
                        ckpt_bucket_plan_t *plan_out)
{
    plan_item_t *items = NULL;
    ckpt_bucket_plan_t plan;
    if (bucket_size == 0 || bucket_size % CKPT_ALIGN != 0)
        return ckpt__error(CKPT_EINVAL, "bucket size %llu is not a positive multiple of %d",
                           (unsigned long long)bucket_size, CKPT_ALIGN);
    int rc = plan_alloc(count, bucket_size, &plan, &items);
    if (rc < 0) return rc;
    for (size_t i = 0; i < count; i++) {
        const ckpt_tensor_meta_t *m = &metas[i];
        if (m->owner < 0 || m->owner >= nranks) {
            rc = ckpt__error(CKPT_EINVAL, "tensor '%s' has owner rank %d outside [0, %d)",
                             m->name, m->owner, nranks);
            goto fail;
        }
        if (ckpt_aligned_size(m->nbytes) > bucket_size) {
            rc = ckpt__error(CKPT_ETOOBIG,
                             "tensor '%s' (%llu bytes) does not fit in a bucket of %llu bytes; "
                             "raise the bucket size to at least %llu",
                             m->name, (unsigned long long)m->nbytes,
                             (unsigned long long)bucket_size,
                             (unsigned long long)ckpt_aligned_size(m->nbytes));
            goto fail;
        }
    }
    fill_items(items, metas, places, count);
    qsort(items, count, sizeof(*items), item_cmp);

    ckpt_bucket_t *cur = NULL;
    for (size_t i = 0; i < count; i++) {
        const ckpt_tensor_meta_t *m = items[i].meta;
        const ckpt__place_t *src = &items[i].place;
        uint64_t need = ckpt_aligned_size(m->nbytes);
        uint64_t at = cur ? place(cur->bytes, src->offset, m->nbytes) : 0;
        if (cur == NULL || cur->owner != m->owner || at + need > bucket_size) {
            cur = &plan.buckets[plan.nbuckets++];
            cur->owner = m->owner;
            cur->first = (uint32_t)i;
            cur->count = 0;
            cur->bytes = 0;
            cur->source = -1;
            at = place(0, src->offset, m->nbytes);
            if (at + need > bucket_size) at = 0; /* a bucket-sized tensor: no room to pad */
        }
        plan.tensors[i] = *m;
        plan.tensors[i].reserved = 0;
        plan.src[i] = *src;
        plan.origin[i] = items[i].index;
        plan.tensors[i].offset = at;
        cur->bytes = at + need;
        cur->count++;
        plan.total_bytes += m->nbytes;
        plan.largest_bucket = CKPT_MAX(plan.largest_bucket, cur->bytes);
    }
    return plan_finish(&plan, count, items, parts, plan_out);

fail:
    ckpt__free(items);
    ckpt__plan_free(&plan);
    return rc;
}

int ckpt__plan_buckets(const ckpt_tensor_meta_t *metas, const ckpt__place_t *places,
                       size_t count, int nranks, uint64_t bucket_size,
                       ckpt_bucket_plan_t *plan_out)
{
    return plan_buckets(metas, places, count, nranks, bucket_size, 0, plan_out);
}

int ckpt__plan_parts(const ckpt_tensor_meta_t *metas, const ckpt__place_t *places,
                     size_t count, int nranks, uint64_t bucket_size,
                     ckpt_bucket_plan_t *plan_out)
{
    return plan_buckets(metas, places, count, nranks, bucket_size, 1, plan_out);
}

void ckpt__plan_free(ckpt_bucket_plan_t *plan)
{
    if (plan == NULL) return;
    ckpt__free(plan->tensors);
    ckpt__free(plan->src);
    ckpt__free(plan->origin);
    ckpt__free(plan->buckets);
    memset(plan, 0, sizeof(*plan));
}

static int window_cmp(const void *a, const void *b)
{
    const plan_item_t *p = a, *q = b;
    if (p->place.source != q->place.source) return p->place.source < q->place.source ? -1 : 1;
    if (p->place.offset != q->place.offset) return p->place.offset < q->place.offset ? -1 : 1;
    return strcmp(p->meta->name, q->meta->name);
}

int ckpt__plan_windows(const ckpt_tensor_meta_t *metas, const ckpt__place_t *places,
                       size_t count, uint64_t bucket_size, ckpt_bucket_plan_t *plan_out)
{
    ckpt_bucket_plan_t plan;
    plan_item_t *items = NULL;
    if (!places && count) return ckpt__error(CKPT_EINVAL, "windows: no placements");
    int rc = plan_alloc(count, bucket_size, &plan, &items);
    if (rc < 0) return rc;
    fill_items(items, metas, places, count);
    qsort(items, count, sizeof(*items), window_cmp);
    ckpt_bucket_t *cur = NULL;
    uint64_t start = 0;
    for (size_t i = 0; i < count; i++) {
        const ckpt_tensor_meta_t *m = items[i].meta;
        const ckpt__place_t *src = &items[i].place;
        if (src->source < 0) {
            rc = ckpt__error(CKPT_EINVAL, "tensor '%s' has no source", m->name);
            goto fail;
        }
        if (cur && cur->source == src->source && src->offset < start + cur->bytes) {
            rc = ckpt__error(CKPT_EINVAL, "tensors '%s' and '%s' overlap in source %d",
                             plan.tensors[i - 1].name, m->name, src->source);
            goto fail;
        }
        uint64_t end = src->offset + m->nbytes;
        if (cur == NULL || cur->source != src->source || end - start > bucket_size) {
            cur = &plan.buckets[plan.nbuckets++];
            cur->owner = m->owner;
            cur->source = src->source;
            cur->first = (uint32_t)i;
            cur->count = 0;
            start = src->offset;
        }
        plan.tensors[i] = *m;
        plan.tensors[i].offset = src->offset;
        plan.tensors[i].reserved = 0;
        plan.src[i] = *src;
        plan.origin[i] = items[i].index;
        cur->bytes = end - start;
        cur->count++;
        plan.total_bytes += m->nbytes;
        plan.largest_bucket = CKPT_MAX(plan.largest_bucket, cur->bytes);
    }
    return plan_finish(&plan, count, items, 0, plan_out);
fail:
    ckpt__free(items);
    ckpt__plan_free(&plan);
    return rc;
}
