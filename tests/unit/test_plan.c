/* Bucket planner: limits, alignment, determinism, errors. */
#include "plan/bucket.h"
#include "test.h"

static void make(ckpt_tensor_meta_t *m, const char *name, uint64_t nbytes, int owner)
{
    int64_t shape[1] = {(int64_t)nbytes};
    CHECK_OK(ckpt_tensor_meta_init(m, name, CKPT_DTYPE_U8, shape, 1));
    m->owner = owner;
    m->offset = 1000 + nbytes; /* an arbitrary pool offset, carried through */
}

/* The placements the tests give: each meta's offset (its pool offset) in source
 * `reserved`, as the engine's gathered metas carry them. */
static ckpt__place_t *places_of(const ckpt_tensor_meta_t *m, size_t n)
{
    ckpt__place_t *p = calloc(n + 1, sizeof(*p));
    for (size_t i = 0; i < n; i++) p[i] = (ckpt__place_t){m[i].reserved, 0, m[i].offset};
    return p;
}

static int plan_b(const ckpt_tensor_meta_t *m, size_t n, int nranks, uint64_t bsize,
                  ckpt_bucket_plan_t *plan)
{
    ckpt__place_t *p = places_of(m, n);
    int rc = ckpt__plan_buckets(m, p, n, nranks, bsize, plan);
    free(p);
    return rc;
}

static int plan_w(const ckpt_tensor_meta_t *m, size_t n, uint64_t bsize, ckpt_bucket_plan_t *plan)
{
    ckpt__place_t *p = places_of(m, n);
    int rc = ckpt__plan_windows(m, p, n, bsize, plan);
    free(p);
    return rc;
}

static void check_plan(const ckpt_tensor_meta_t *metas, size_t n, int nranks, uint64_t bsize)
{
    ckpt_bucket_plan_t plan;
    CHECK_OK(plan_b(metas, n, nranks, bsize, &plan));
    CHECK(plan.ntensors == n);
    uint64_t total = 0;
    size_t seen = 0;
    for (size_t b = 0; b < plan.nbuckets; b++) {
        const ckpt_bucket_t *bk = &plan.buckets[b];
        CHECK(bk->bytes <= bsize);
        CHECK(bk->count > 0);
        CHECK(bk->first == seen);
        uint64_t end = 0;
        for (uint32_t i = bk->first; i < bk->first + bk->count; i++) {
            const ckpt_tensor_meta_t *t = &plan.tensors[i];
            CHECK(t->owner == bk->owner);
            CHECK(t->offset % CKPT_ALIGN == 0);
            CHECK(t->offset >= end); /* no overlap inside the bucket */
            end = t->offset + t->nbytes;
            CHECK(end <= bk->bytes);
            CHECK(plan.src[i].offset == 1000 + t->nbytes);
            /* Large tensors keep their source's page offset unless they fill the bucket. */
            if (t->nbytes >= 65536 && ckpt_aligned_size(t->nbytes) + 4096 <= bsize)
                CHECK(t->offset % 4096 == plan.src[i].offset % 4096);
            total += t->nbytes;
        }
        seen += bk->count;
        if (b > 0) CHECK(plan.buckets[b - 1].owner <= bk->owner);
    }
    CHECK(seen == n);
    CHECK(total == plan.total_bytes);
    /* Deterministic: the same input in another order gives the same plan. */
    ckpt_tensor_meta_t *rev = calloc(n, sizeof(*rev));
    for (size_t i = 0; i < n; i++) rev[i] = metas[n - 1 - i];
    ckpt_bucket_plan_t plan2;
    CHECK_OK(plan_b(rev, n, nranks, bsize, &plan2));
    CHECK(plan2.nbuckets == plan.nbuckets);
    for (size_t i = 0; i < n; i++) {
        CHECK_STR(plan2.tensors[i].name, plan.tensors[i].name);
        CHECK(plan2.tensors[i].offset == plan.tensors[i].offset);
    }
    ckpt__plan_free(&plan2);
    free(rev);
    ckpt__plan_free(&plan);
}

static void test_sizes(void)
{
    ckpt_tensor_meta_t m[40];
    char name[32];
    for (int i = 0; i < 40; i++) {
        snprintf(name, sizeof(name), "layer.%02d.w", i);
        make(&m[i], name, (uint64_t)(i * 977 % 5000 + 1), i % 3);
    }
    uint64_t largest = ckpt__plan_min_bucket(m, 40);
    CHECK(largest == ckpt_aligned_size(4977 + 1) || largest >= 4096);
    check_plan(m, 40, 3, largest);            /* exactly the largest tensor */
    check_plan(m, 40, 3, largest + 256);
    check_plan(m, 40, 3, 64 * 1024);
    check_plan(m, 40, 3, 1 << 30);            /* one bucket per owner */
    ckpt_bucket_plan_t plan;
    CHECK_OK(plan_b(m, 40, 3, 1 << 30, &plan));
    CHECK(plan.nbuckets == 3);
    ckpt__plan_free(&plan);
    check_plan(m, 0, 1, 256);                 /* nothing to send */
}

/* Large tensors land at their source's page offset (fast copies, see place() in
 * bucket.c), the alignment stays, and the padding never pushes a tensor out of a bucket
 * it fits in alone. */
static void test_page_congruence(void)
{
    ckpt_tensor_meta_t m[12];
    char name[32];
    uint64_t off = 0;
    for (int i = 0; i < 12; i++) {
        snprintf(name, sizeof(name), "t%02d", i);
        uint64_t nbytes = i % 3 == 0 ? 1000 : (uint64_t)(70000 + i * 4352);
        make(&m[i], name, nbytes, i % 2);
        m[i].offset = off + 256u * (uint64_t)i; /* pool layout with odd page offsets */
        off += ckpt_aligned_size(nbytes);
    }
    uint64_t sizes[] = {ckpt__plan_min_bucket(m, 12), 256 * 1024, 1 << 20};
    for (int k = 0; k < 3; k++) {
        ckpt_bucket_plan_t plan;
        CHECK_OK(plan_b(m, 12, 2, sizes[k], &plan));
        size_t congruent = 0, large = 0;
        for (size_t b = 0; b < plan.nbuckets; b++) {
            const ckpt_bucket_t *bk = &plan.buckets[b];
            CHECK(bk->bytes <= sizes[k]);
            uint64_t end = 0;
            for (uint32_t i = bk->first; i < bk->first + bk->count; i++) {
                const ckpt_tensor_meta_t *t = &plan.tensors[i];
                CHECK(t->offset % CKPT_ALIGN == 0);
                CHECK(t->offset >= end);
                end = t->offset + ckpt_aligned_size(t->nbytes);
                CHECK(end <= bk->bytes);
                if (t->nbytes >= 65536) {
                    large++;
                    congruent += t->offset % 4096 == plan.src[i].offset % 4096;
                }
            }
        }
        /* With room to pad every large tensor keeps its page offset. */
        if (k > 0) CHECK(congruent == large);
        CHECK(large == 8);
        ckpt__plan_free(&plan);
    }
}

static void test_errors(void)
{
    ckpt_tensor_meta_t m[3];
    ckpt_bucket_plan_t plan;
    make(&m[0], "a", 1000, 0);
    make(&m[1], "big", 5000, 1);
    make(&m[2], "a", 10, 1);
    CHECK_RC(plan_b(m, 2, 2, 4096, &plan), CKPT_ETOOBIG);
    CHECK_ERR_HAS("'big'");
    CHECK_RC(plan_b(m, 3, 2, 8192, &plan), CKPT_EINVAL);
    CHECK_ERR_HAS("'a'");
    CHECK_RC(plan_b(m, 2, 1, 8192, &plan), CKPT_EINVAL); /* owner 1 of 1 rank */
    CHECK_RC(plan_b(m, 2, 2, 1000, &plan), CKPT_EINVAL); /* not aligned */
}

static void test_bucket_size(void)
{
    uint64_t size;
    int nbuf;
    CHECK_OK(ckpt__plan_bucket_size(1000, 64 << 20, 1ull << 34, &size, &nbuf));
    CHECK(size == 64 << 20 && nbuf == 2);
    CHECK_OK(ckpt__plan_bucket_size(100 << 20, 64 << 20, 1ull << 34, &size, &nbuf));
    CHECK(size == 100 << 20 && nbuf == 2); /* never below the largest tensor */
    CHECK_OK(ckpt__plan_bucket_size(100 << 20, 64 << 20, 150 << 20, &size, &nbuf));
    CHECK(size == 100 << 20 && nbuf == 1); /* short memory: one buffer, no overlap */
    CHECK_RC(ckpt__plan_bucket_size(100 << 20, 64 << 20, 50 << 20, &size, &nbuf), CKPT_ENOMEM);
    CHECK_ERR_HAS("largest tensor");
    /* A staged update is cut into CKPT__PIPELINE_DEPTH buckets, within the limits. */
    CHECK(ckpt__plan_pipeline_limit(1ull << 30, 256 << 20) == (1ull << 30) / 16);
    CHECK(ckpt__plan_pipeline_limit(1ull << 40, 256 << 20) == 256 << 20);
    CHECK(ckpt__plan_pipeline_limit(64 << 20, 256 << 20) == CKPT__PIPELINE_MIN_BUCKET);
    CHECK(ckpt__plan_pipeline_limit(1ull << 30, 16 << 20) == 16 << 20); /* the user's limit */
}

static void test_windows(void)
{
    /* Two sources; tensors packed 256-aligned inside each, given out of order. */
    ckpt_tensor_meta_t m[6];
    const uint64_t sizes[6] = {1000, 300, 5000, 256, 700, 10};
    uint64_t off[2] = {0, 0};
    char name[16];
    for (int i = 5; i >= 0; i--) {
        snprintf(name, sizeof(name), "t%d", i);
        make(&m[i], name, sizes[i], i % 2);
        m[i].reserved = i % 2;
        m[i].offset = off[i % 2];
        off[i % 2] += ckpt_aligned_size(sizes[i]);
    }
    ckpt_bucket_plan_t plan;
    CHECK_OK(plan_w(m, 6, 4096, &plan));
    size_t seen = 0;
    for (size_t b = 0; b < plan.nbuckets; b++) {
        const ckpt_bucket_t *bk = &plan.buckets[b];
        const ckpt_tensor_meta_t *first = &plan.tensors[bk->first];
        const ckpt_tensor_meta_t *last = &plan.tensors[bk->first + bk->count - 1];
        CHECK(bk->bytes == last->offset + last->nbytes - first->offset);
        CHECK(bk->bytes <= 4096 || bk->count == 1); /* only a lone big tensor exceeds */
        for (uint32_t i = bk->first; i < bk->first + bk->count; i++) /* read in place */
            CHECK(plan.src[i].source == bk->source && plan.tensors[i].offset == plan.src[i].offset);
        seen += bk->count;
    }
    CHECK(seen == 6);
    CHECK(plan.total_bytes == 1000 + 300 + 5000 + 256 + 700 + 10);
    ckpt__plan_free(&plan);
    m[1].offset = m[3].offset + 100; /* overlaps t3 in source 1 */
    CHECK_RC(plan_w(m, 6, 1 << 20, &plan), CKPT_EINVAL);
    CHECK_ERR_HAS("overlap");
}

int main(void)
{
    RUN_TEST(test_windows);
    RUN_TEST(test_sizes);
    RUN_TEST(test_page_congruence);
    RUN_TEST(test_errors);
    RUN_TEST(test_bucket_size);
    TEST_EXIT();
}
