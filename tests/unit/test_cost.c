/* Worker needs from a parallel layout (plan/layout.c) and the update cost model
 * (plan/cost.c): every figure checked against the arithmetic done by hand. */
#include <math.h>

#include "ckpt/layout.h"
#include "plan/cost.h"
#include "plan/layout.h"
#include "test.h"

static ckpt_tensor_meta_t meta2(const char *name, int64_t rows, int64_t cols)
{
    ckpt_tensor_meta_t m;
    int64_t shape[2] = {rows, cols};
    CHECK_OK(ckpt_tensor_meta_init(&m, name, CKPT_DTYPE_BF16, shape, cols ? 2 : 1));
    return m;
}

static ckpt_need_t need(const ckpt_layout_t *l, int worker, const ckpt_tensor_meta_t *m)
{
    ckpt_need_t n;
    CHECK_OK(ckpt__layout_need(l, worker, m, &n));
    return n;
}

static void test_tensor_parallel(void)
{
    ckpt_layout_t l = {.tp = 2, .pp = 1, .ep = 1, .num_layers = 2};
    ckpt_tensor_meta_t q = meta2("model.layers.0.self_attn.q_proj.weight", 64, 32);
    ckpt_tensor_meta_t o = meta2("model.layers.0.self_attn.o_proj.weight", 32, 64);
    ckpt_tensor_meta_t ob = meta2("model.layers.0.self_attn.o_proj.bias", 32, 0);
    ckpt_tensor_meta_t qb = meta2("model.layers.0.self_attn.q_proj.bias", 64, 0);
    ckpt_tensor_meta_t norm = meta2("model.layers.0.input_layernorm.weight", 32, 0);
    ckpt_tensor_meta_t scale = meta2("model.layers.0.mlp.down_proj.weight_scale_inv", 4, 8);
    for (int w = 0; w < 2; w++) {
        ckpt_need_t n = need(&l, w, &q);
        CHECK(n.needed && n.dim == 0 && n.parts == 2 && n.index == w);
        CHECK(ckpt__need_bytes(&q, &n) == q.nbytes / 2);
        n = need(&l, w, &o);
        CHECK(n.needed && n.dim == 1 && n.parts == 2 && n.index == w);
        n = need(&l, w, &scale); /* an FP8 scale follows its weight */
        CHECK(n.dim == 1 && n.index == w);
        n = need(&l, w, &qb);
        CHECK(n.dim == 0 && n.index == w && ckpt__need_bytes(&qb, &n) == qb.nbytes / 2);
        n = need(&l, w, &ob); /* added after the reduction: whole */
        CHECK(n.needed && n.dim == -1 && ckpt__need_bytes(&ob, &n) == ob.nbytes);
        n = need(&l, w, &norm);
        CHECK(n.needed && n.dim == -1);
    }
    /* fewer KV heads than TP ranks: k/v cut in kv_heads parts, each replicated */
    l = (ckpt_layout_t){.tp = 8, .pp = 1, .ep = 1, .kv_heads = 4};
    ckpt_tensor_meta_t k = meta2("model.layers.3.self_attn.k_proj.weight", 512, 64);
    for (int w = 0; w < 8; w++) {
        ckpt_need_t n = need(&l, w, &k);
        CHECK(n.parts == 4 && n.index == w / 2);
        CHECK(ckpt__need_bytes(&k, &n) == k.nbytes / 4);
    }
    /* a dimension that does not divide: the larger share */
    ckpt_tensor_meta_t odd = meta2("lm_head.weight", 5, 2);
    l = (ckpt_layout_t){.tp = 2, .pp = 1, .ep = 1};
    ckpt_need_t n = need(&l, 1, &odd);
    CHECK(ckpt__need_bytes(&odd, &n) == 3 * 2 * 2);
}

static void test_expert_and_pipeline_parallel(void)
{
    ckpt_layout_t l = {.tp = 2, .pp = 1, .ep = 2, .num_layers = 4, .num_experts = 8};
    ckpt_tensor_meta_t e3 = meta2("model.layers.1.mlp.experts.3.gate_proj.weight", 16, 8);
    ckpt_tensor_meta_t e4 = meta2("model.layers.1.mlp.experts.4.down_proj.weight", 8, 16);
    ckpt_tensor_meta_t shared = meta2("model.layers.1.mlp.shared_experts.gate_proj.weight", 16, 8);
    CHECK(need(&l, 0, &e3).needed && need(&l, 0, &e3).dim == -1); /* whole, not cut by TP */
    CHECK(!need(&l, 1, &e3).needed);
    CHECK(!need(&l, 0, &e4).needed && need(&l, 1, &e4).needed);
    CHECK(need(&l, 1, &shared).dim == 0); /* shared experts are TP-sharded like an MLP */
    l = (ckpt_layout_t){.tp = 1, .pp = 2, .ep = 1, .num_layers = 4};
    ckpt_tensor_meta_t embed = meta2("model.embed_tokens.weight", 10, 4);
    ckpt_tensor_meta_t head = meta2("lm_head.weight", 10, 4);
    ckpt_tensor_meta_t l1 = meta2("model.layers.1.self_attn.q_proj.weight", 4, 4);
    ckpt_tensor_meta_t l2 = meta2("model.layers.2.self_attn.q_proj.weight", 4, 4);
    ckpt_tensor_meta_t mtp = meta2("model.layers.4.eh_proj.weight", 4, 8);
    CHECK(need(&l, 0, &embed).needed && !need(&l, 1, &embed).needed);
    CHECK(!need(&l, 0, &head).needed && need(&l, 1, &head).needed);
    CHECK(need(&l, 0, &l1).needed && !need(&l, 1, &l1).needed);
    CHECK(!need(&l, 0, &l2).needed && need(&l, 1, &l2).needed);
    CHECK(need(&l, 1, &mtp).needed); /* MTP layers go to the last stage */
    ckpt_layout_t scanned = {0};
    ckpt_tensor_meta_t all[] = {e3, e4, l2, mtp};
    ckpt__layout_scan(all, 4, &scanned);
    CHECK(scanned.num_layers == 5 && scanned.num_experts == 5);
    /* not a layout */
    l = (ckpt_layout_t){.tp = 4, .pp = 1, .ep = 3};
    ckpt_need_t n;
    CHECK_RC(ckpt__layout_need(&l, 0, &e3, &n), CKPT_EINVAL);
    CHECK_ERR_HAS("ep must divide tp");
    l.ep = 2;
    CHECK_RC(ckpt__layout_need(&l, 4, &e3, &n), CKPT_EINVAL);
    CHECK_ERR_HAS("worker 4");
}

/* The public form: index ranges a worker declares. */
static void test_public_layout_need(void)
{
    ckpt_parallel_layout_t l = {.tp = 2, .pp = 1, .ep = 1};
    ckpt_tensor_meta_t head = meta2("lm_head.weight", 5, 2);
    ckpt_need_decl_t d;
    int needed = -1;
    CHECK_OK(ckpt_layout_need(&l, 0, &head, &needed, &d));
    CHECK(needed == 1 && d.dim == 0 && d.start == 0 && d.length == 2);
    CHECK_STR(d.name, "lm_head.weight");
    CHECK_OK(ckpt_layout_need(&l, 1, &head, &needed, &d));
    CHECK(needed == 1 && d.dim == 0 && d.start == 2 && d.length == 3);
    l.tp = 8; /* more ranks than rows: some need nothing of it */
    int none = 0;
    for (int w = 0; w < 8; w++) {
        CHECK_OK(ckpt_layout_need(&l, w, &head, &needed, &d));
        none += !needed;
    }
    CHECK(none == 3);
    ckpt_tensor_meta_t norm = meta2("model.norm.weight", 4, 0);
    CHECK_OK(ckpt_layout_need(&l, 3, &norm, &needed, &d));
    CHECK(needed == 1 && d.dim == -1 && d.start == 0 && d.length == 0);
    l.ep = 3;
    CHECK_RC(ckpt_layout_need(&l, 0, &norm, &needed, &d), CKPT_EINVAL);
    CHECK_RC(ckpt_layout_need(NULL, 0, &norm, &needed, &d), CKPT_EINVAL);
}

/* n tensors of `mib` MiB each, q_proj-like (column-parallel) so TP cuts them. */
static ckpt_tensor_meta_t *model(size_t n, int64_t mib)
{
    ckpt_tensor_meta_t *m = calloc(n, sizeof(*m));
    for (size_t i = 0; i < n; i++) {
        char name[64];
        snprintf(name, sizeof(name), "model.layers.%zu.self_attn.q_proj.weight", i);
        m[i] = meta2(name, mib * 512, 1024); /* BF16: 1024 x 2 bytes per row */
    }
    return m;
}

static int near(double a, double b) { return fabs(a - b) <= 1e-6 + 1e-9 * fabs(b); }

static void test_cost_one_host(void)
{
    ckpt_tensor_meta_t *m = model(8, 32); /* 256 MiB */
    const double bytes = 256.0 * 1048576;
    ckpt_cost_deploy_t d = {.hosts = 1, .ranks_per_host = 2, .layout = {.tp = 1, .pp = 1, .ep = 1},
                            .direct = 1, .bucket_max = 64ull << 20};
    ckpt_cost_links_t L = {.copy_gbps = 1, .host_copy_gbps = 1.5, .disk_gbps = 0.5};
    ckpt_cost_result_t r;
    CHECK_OK(ckpt__cost_predict(m, 8, &d, &L, &r));
    CHECK(r.ntensors == 8 && r.total_bytes == (uint64_t)bytes);
    CHECK(r.nbuckets == 4 && r.share_max == (uint64_t)bytes / 2);
    CHECK(near(r.disk_s, bytes / 0.5e9));
    /* direct: only the workers copy, two of them at once share 1.5 GB/s */
    CHECK(near(r.full.stage_s, 0) && near(r.full.bcast_s, 0));
    CHECK(near(r.full.reload_s, 2 * bytes / 1.5e9));
    CHECK(near(r.full.total_s, 2 * bytes / 1.5e9));
    CHECK(r.full.host_in_max == 0 && r.full.worker_max == (uint64_t)bytes);
    ckpt__cost_free(&r);
    /* staged: the owner copies too; fixed costs add up */
    d.direct = 0;
    L.bucket_us = 1000, L.update_ms = 10;
    CHECK_OK(ckpt__cost_predict(m, 8, &d, &L, &r));
    CHECK(r.nbuckets == 8); /* the pipeline limit: 256 MiB / 16 < 32 MiB -> 32 MiB */
    CHECK(near(r.full.stage_s, bytes / 1e9));
    CHECK(near(r.full.overhead_s, 8 * 1e-3 + 10e-3));
    /* memory bound: stage + two workers = 3 x bytes through 1.5 GB/s */
    CHECK(near(r.full.total_s, 3 * bytes / 1.5e9 + r.full.overhead_s));
    CHECK_STR(r.full.bound, "host memory bandwidth");
    ckpt__cost_free(&r);
    /* two cores copying at 1 GB/s each bound the same three copies at 1.5 x bytes / 1 GB/s */
    L.host_copy_gbps = 100, d.cores = 2;
    CHECK_OK(ckpt__cost_predict(m, 8, &d, &L, &r));
    CHECK(near(r.full.cpu_s, 3 * bytes / 1e9 / 2));
    CHECK_STR(r.full.bound, "cores");
    ckpt__cost_free(&r);
    free(m);
}

static void test_cost_two_hosts(void)
{
    ckpt_tensor_meta_t *m = model(8, 32);
    const double bytes = 256.0 * 1048576;
    /* 2 hosts x 1 rank, one TP=2 instance across them: each host needs half of each tensor */
    ckpt_cost_deploy_t d = {.hosts = 2, .ranks_per_host = 1, .layout = {.tp = 2, .pp = 1, .ep = 1},
                            .bucket_max = 64ull << 20};
    ckpt_cost_links_t L = {.copy_gbps = 100, .host_copy_gbps = 100, .inter_gbps = 1};
    ckpt_cost_result_t r;
    CHECK_OK(ckpt__cost_predict(m, 8, &d, &L, &r));
    CHECK(r.host_in_full[0] == (uint64_t)bytes / 2 && r.host_in_full[1] == (uint64_t)bytes / 2);
    /* routed: a host receives half of the other host's tensors */
    CHECK(r.host_in_routed[0] == (uint64_t)bytes / 4 && r.host_in_routed[1] == (uint64_t)bytes / 4);
    CHECK(r.routed.host_out_max == (uint64_t)bytes / 4);
    CHECK(r.worker_need[0] == (uint64_t)bytes / 2 && r.worker_need[1] == (uint64_t)bytes / 2);
    CHECK(r.full.link_bytes == (uint64_t)bytes && r.routed.link_bytes == (uint64_t)bytes / 2);
    /* every bucket crosses the link at 1 GB/s in the full broadcast */
    CHECK(near(r.full.bcast_s, bytes / 1e9));
    CHECK_STR(r.full.bound, "broadcast");
    CHECK(r.full.total_s >= bytes / 1e9 && r.full.total_s < 1.1 * bytes / 1e9);
    CHECK(near(r.routed.bcast_s, bytes / 4 / 1e9));
    CHECK(r.routed.total_s < r.full.total_s / 3);
    ckpt__cost_free(&r);
    /* errors name the cause */
    d.layout.tp = 4;
    CHECK_RC(ckpt__cost_predict(m, 8, &d, &L, &r), CKPT_EINVAL);
    CHECK_ERR_HAS("whole instances of tp*pp = 4");
    d.layout.tp = 2, L.inter_gbps = 0;
    CHECK_RC(ckpt__cost_predict(m, 8, &d, &L, &r), CKPT_EINVAL);
    CHECK_ERR_HAS("inter (between hosts)");
    free(m);
}

static void test_cost_gpu_owners_stage_at_once(void)
{
    /* 4 owners on one host, GPU: each H2Ds its own share while the others broadcast */
    ckpt_tensor_meta_t *m = model(16, 64); /* 1 GiB */
    const double bytes = 1024.0 * 1048576;
    ckpt_cost_deploy_t d = {.hosts = 1, .ranks_per_host = 4, .layout = {.tp = 4, .pp = 1, .ep = 1},
                            .gpu = 1, .bucket_max = 64ull << 20};
    ckpt_cost_links_t L = {.copy_gbps = 10, .h2d_gbps = 1, .intra_gbps = 4, .d2d_gbps = 1000};
    ckpt_cost_result_t r;
    CHECK_OK(ckpt__cost_predict(m, 16, &d, &L, &r));
    CHECK(near(r.full.stage_s, bytes / 4 / 1e9)); /* the busiest owner's share */
    CHECK(near(r.full.bcast_s, bytes / 4e9));
    /* H2D of the four owners overlap: far below the 1.07 s one owner at a time would take */
    CHECK(r.full.total_s < 0.5 * bytes / 1e9);
    CHECK(r.worker_need[0] == (uint64_t)bytes / 4);
    ckpt__cost_free(&r);
    free(m);
}

int main(void)
{
    RUN_TEST(test_tensor_parallel);
    RUN_TEST(test_expert_and_pipeline_parallel);
    RUN_TEST(test_public_layout_need);
    RUN_TEST(test_cost_one_host);
    RUN_TEST(test_cost_two_hosts);
    RUN_TEST(test_cost_gpu_owners_stage_at_once);
    TEST_EXIT();
}
