/* Bucket planning for the broadcast update: a pure, deterministic function of the tensor
 * metas, so every rank computes the same plan from the same allgathered input. */
#ifndef CKPT_PLAN_BUCKET_H
#define CKPT_PLAN_BUCKET_H

#include "core/internal.h"

/* Where a tensor's bytes are: a source and the offset inside it. What a source is belongs
 * to the caller: the owner's store index (staged updates), a pool region every worker has
 * mapped (direct windows), a serving rank's UCX region (P2P). Kept beside the metas, not
 * in them: a meta says what a tensor is, a placement where its bytes lie. */
typedef struct ckpt__place {
    int32_t source;
    uint32_t pad;
    uint64_t offset;
} ckpt__place_t;

typedef struct ckpt_bucket {
    int32_t owner;     /* rank whose pool holds every tensor of the bucket */
    uint32_t first;    /* index of its first tensor in the plan's tensor array */
    uint32_t count;    /* number of tensors */
    uint64_t bytes;    /* bytes used in the bucket buffer (aligned layout); for a window,
                        * the span from its first tensor's start to its last one's end */
    int32_t source;    /* window plans: the source (pool region) the window lies in;
                        * -1 in staged plans */
    int32_t reserved;
} ckpt_bucket_t;

typedef struct ckpt_bucket_plan {
    /* Ordered bucket by bucket; offset = where the worker finds the bytes in the buffer its
     * record names (the bucket buffer; for a window, the source itself). */
    ckpt_tensor_meta_t *tensors;
    ckpt__place_t *src;          /* per tensor: where its bytes come from (the input's) */
    uint32_t *origin;            /* per tensor: its index in the planner's input */
    size_t ntensors;
    ckpt_bucket_t *buckets;
    size_t nbuckets;
    uint64_t bucket_size;        /* the limit used */
    uint64_t largest_bucket;     /* bytes of the fullest bucket */
    uint64_t total_bytes;        /* sum of tensor nbytes */
} ckpt_bucket_plan_t;

/* Plans buckets of metas[i], whose bytes are at places[i] (NULL: all at source 0, offset
 * 0; the metas' own offset and reserved are not read): tensors grouped by owner (owners in
 * ascending order), inside an owner by name; each tensor starts on a CKPT_ALIGN boundary,
 * and a tensor of 64 KiB or more at an offset congruent to its source offset modulo 4 KiB
 * when that fits (fast copies); a bucket never exceeds bucket_size and a tensor is never
 * split. Fails with CKPT_ETOOBIG naming the tensor when one does not fit in bucket_size,
 * and CKPT_EINVAL on a duplicate name or an owner outside [0, nranks). */
int ckpt__plan_buckets(const ckpt_tensor_meta_t *metas, const ckpt__place_t *places,
                       size_t count, int nranks, uint64_t bucket_size,
                       ckpt_bucket_plan_t *plan_out);
/* The same for parts of tensors (the route's pieces, route.c): a name may repeat (parts
 * of one tensor keep their input order), so the caller checks the whole tensors' names
 * first with ckpt__plan_check_names. */
int ckpt__plan_parts(const ckpt_tensor_meta_t *metas, const ckpt__place_t *places,
                     size_t count, int nranks, uint64_t bucket_size,
                     ckpt_bucket_plan_t *plan_out);
/* CKPT_EINVAL naming the ranks when two metas have the same name. */
int ckpt__plan_check_names(const ckpt_tensor_meta_t *metas, size_t count);
void ckpt__plan_free(ckpt_bucket_plan_t *plan);

/* Plans windows for workers that read straight out of the owners' pools (no staging):
 * places[i] is tensor i's source (a pool region every worker has mapped; < 0: none, an
 * error) and its offset inside that source. Tensors are taken in (source, offset) order;
 * a window is a run of consecutive tensors of one source whose span is at most
 * bucket_size (a larger tensor gets a window of its own). The planned offsets are the
 * source offsets: the worker reads the source itself. */
int ckpt__plan_windows(const ckpt_tensor_meta_t *metas, const ckpt__place_t *places,
                       size_t count, uint64_t bucket_size, ckpt_bucket_plan_t *plan_out);

/* Largest aligned tensor size in metas (the smallest workable bucket). */
uint64_t ckpt__plan_min_bucket(const ckpt_tensor_meta_t *metas, size_t count);

/* The bucket limit a staged update of `total_bytes` plans with: `bucket_max`, lowered to
 * total / CKPT__PIPELINE_DEPTH (never below CKPT__PIPELINE_MIN_BUCKET) so the pipeline has
 * that many buckets. Its fill (the first stage) and drain (the last reload) run without
 * overlap and cost about one bucket each: with 4 buckets of 256 MiB for 1 GiB they were
 * 70 of 245 ms. Below the floor the fixed cost per bucket (worker round trip, agreement)
 * would start to count. */
#define CKPT__PIPELINE_DEPTH 16
#define CKPT__PIPELINE_MIN_BUCKET (32ull << 20)
uint64_t ckpt__plan_pipeline_limit(uint64_t total_bytes, uint64_t bucket_max);

/* Chooses the bucket size: at most `bucket_max`, at most `avail_bytes / reserve_divisor`
 * per buffer, never below the largest tensor. Sets *nbuffers_out to 2 when two buffers fit
 * in the available memory, 1 when only one does (the pipeline then runs without overlap),
 * and fails with CKPT_ENOMEM naming the largest tensor when not even one fits. */
int ckpt__plan_bucket_size(uint64_t largest_tensor, uint64_t bucket_max, uint64_t avail_bytes,
                           uint64_t *bucket_size_out, int *nbuffers_out);

#endif
