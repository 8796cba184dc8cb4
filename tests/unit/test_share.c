/* The share policy: every tensor to exactly one rank, balanced within the largest tensor,
 * deterministic whatever the input order. */
#include "ckpt/store.h"
#include "plan/share.h"
#include "test.h"

#define N 300

static uint64_t rng_state = 0x9e3779b97f4a7c15ull;
static uint64_t rnd(void)
{
    rng_state ^= rng_state << 13;
    rng_state ^= rng_state >> 7;
    rng_state ^= rng_state << 17;
    return rng_state;
}

static void make(ckpt_tensor_meta_t *m, size_t count)
{
    for (size_t i = 0; i < count; i++) {
        memset(&m[i], 0, sizeof(m[i]));
        snprintf(m[i].name, sizeof(m[i].name), "layer.%03zu.w", i);
        /* A few huge, many small, some equal sizes (ties broken by name). */
        uint64_t r = rnd();
        m[i].nbytes = (r % 10 == 0) ? (r % (64u << 20)) : (r % 7 == 0) ? 4096 : r % 100000;
    }
}

static void test_balanced(void)
{
    static ckpt_tensor_meta_t m[N];
    static int32_t owners[N];
    make(m, N);
    uint64_t largest = 0;
    for (size_t i = 0; i < N; i++) largest = CKPT_MAX(largest, m[i].nbytes);
    for (int n = 1; n <= 8; n++) {
        uint64_t loads[8] = {0}, got[8];
        CHECK_OK(ckpt__plan_shares(m, N, n, owners, got));
        for (size_t i = 0; i < N; i++) {
            CHECK(owners[i] >= 0 && owners[i] < n);
            if (owners[i] >= 0 && owners[i] < n) loads[owners[i]] += m[i].nbytes;
        }
        uint64_t mx = 0, mn = UINT64_MAX;
        for (int r = 0; r < n; r++) {
            CHECK(loads[r] == got[r]);
            mx = CKPT_MAX(mx, loads[r]);
            mn = CKPT_MIN(mn, loads[r]);
        }
        CHECK(mx - mn <= largest);
    }
}

static void test_deterministic(void)
{
    static ckpt_tensor_meta_t m[N], rev[N];
    static int32_t a[N], b[N];
    make(m, N);
    for (size_t i = 0; i < N; i++) rev[i] = m[N - 1 - i];
    CHECK_OK(ckpt_plan_shares(m, N, 5, a));
    CHECK_OK(ckpt_plan_shares(rev, N, 5, b));
    for (size_t i = 0; i < N; i++) CHECK(a[i] == b[N - 1 - i]);
}

static void test_edges(void)
{
    ckpt_tensor_meta_t m[2];
    int32_t o[2] = {-7, -7};
    memset(m, 0, sizeof(m));
    strcpy(m[0].name, "b");
    strcpy(m[1].name, "a");
    m[0].nbytes = m[1].nbytes = 10; /* tie: "a" first, onto rank 0 */
    CHECK_OK(ckpt_plan_shares(m, 2, 2, o));
    CHECK(o[1] == 0 && o[0] == 1);
    CHECK_OK(ckpt_plan_shares(m, 0, 3, NULL));
    CHECK_RC(ckpt_plan_shares(m, 2, 0, o), CKPT_EINVAL);
}

int main(void)
{
    RUN_TEST(test_balanced);
    RUN_TEST(test_deterministic);
    RUN_TEST(test_edges);
    TEST_EXIT();
}
