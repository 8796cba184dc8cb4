/* ckpt-engine gen: writes a synthetic checkpoint with the tensor names and shapes of a
 * Llama-style transformer, sized to about --size, for demos and benchmarks. The bytes are
 * a pure function of (seed, tensor position, byte offset), so the same flags always give
 * the same files whatever the chunking or sharding, and generation runs at memory speed. */
#include <ctype.h>
#include <dirent.h>
#include <errno.h>
#include <fnmatch.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "ckpt/ckpt.h"
#include "commands.h"

typedef struct {
    ckpt_tensor_meta_t *metas;
    int *shard;
    size_t n;
    int hidden, inter, vocab;
    uint64_t total;
} layout_t;

typedef struct {
    const ckpt_tensor_meta_t *metas; /* this shard's tensors */
    size_t base;                     /* global position of metas[0] in the layout */
    uint64_t seed;
} fill_ctx_t;

static void usage(FILE *out)
{
    fprintf(out,
            "usage: ckpt-engine gen --out DIR [--size 1GiB] [--layers N] [--shards K]\n"
            "                       [--experts E] [--seed S] [--dtypes bf16,f32]\n\n"
            "Writes a synthetic Llama-style checkpoint of about --size bytes: embedding and\n"
            "lm_head [vocab, hidden], per layer q/k/v/o [hidden, hidden], gate/up [inter, hidden],\n"
            "down [hidden, inter] and two norms [hidden], plus the final norm. The hidden size\n"
            "is chosen to fit --size. With K > 1 shards, model-0000i-of-0000K.safetensors and a\n"
            "model.safetensors.index.json are written; earlier gen output in DIR is replaced.\n\n"
            "  --size BYTES    suffixes KiB MiB GiB TiB (or K M G T), KB MB GB; default 1GiB\n"
            "  --layers N      transformer layers (default 8)\n"
            "  --experts E     a mixture of experts: per layer a router mlp.gate [E, hidden]\n"
            "                  and E experts mlp.experts.X.{gate,up,down}_proj, each with\n"
            "                  1/E of the dense intermediate size (default 0: dense MLP)\n"
            "  --shards K      number of files (default 1)\n"
            "  --seed S        seed of the deterministic bytes (default 0)\n"
            "  --dtypes W[,N]  dtype of the weights and of the norms (default bf16,f32)\n");
}

static int parse_size(const char *s, uint64_t *out)
{
    char *end;
    errno = 0;
    double v = strtod(s, &end);
    if (end == s || errno || v < 0) return -1;
    static const struct { const char *suffix; double mult; } units[] = {
        {"", 1}, {"B", 1}, {"K", 1024.0}, {"KiB", 1024.0}, {"M", 1048576.0}, {"MiB", 1048576.0},
        {"G", 1073741824.0}, {"GiB", 1073741824.0}, {"T", 1099511627776.0},
        {"TiB", 1099511627776.0}, {"KB", 1e3}, {"MB", 1e6}, {"GB", 1e9}, {"TB", 1e12}};
    for (size_t i = 0; i < sizeof(units) / sizeof(units[0]); i++) {
        if (strcmp(end, units[i].suffix) != 0) continue;
        double b = v * units[i].mult;
        if (b > 9e18) return -1;
        *out = (uint64_t)b;
        return 0;
    }
    return -1;
}

static int parse_dtype(const char *s, size_t len)
{
    char up[16];
    if (len == 0 || len >= sizeof(up)) return CKPT_DTYPE_INVALID;
    for (size_t i = 0; i < len; i++) up[i] = (char)toupper((unsigned char)s[i]);
    up[len] = '\0';
    return ckpt_dtype_from_name(up);
}

/* An expert's intermediate size: the dense one split over the experts (a multiple of 8). */
static uint64_t expert_inter(uint64_t inter, int experts)
{
    if (experts <= 0) return inter;
    uint64_t i = (inter / (uint64_t)experts + 7) / 8 * 8;
    return i < 8 ? 8 : i;
}

static uint64_t model_bytes(uint64_t h, int layers, int experts, size_t wsz, size_t nsz)
{
    uint64_t inter = (h * 11 / 4 + 7) / 8 * 8, vocab = h * 16 < 32000 ? h * 16 : 32000;
    uint64_t n = experts > 0 ? (uint64_t)experts : 1, router = experts > 0 ? n * h : 0;
    uint64_t mlp = 3 * n * expert_inter(inter, experts) * h + router;
    uint64_t weights = 2 * vocab * h + (uint64_t)layers * (4 * h * h + mlp);
    return weights * wsz + ((uint64_t)layers * 2 + 1) * h * nsz;
}

static int add(layout_t *l, const char *name, int dtype, int64_t d0, int64_t d1)
{
    int64_t shape[2] = {d0, d1};
    return ckpt_tensor_meta_init(&l->metas[l->n++], name, dtype, shape, d1 ? 2 : 1);
}

/* Names and shapes of the model; the hidden size is the largest multiple of 8 (of 64 from
 * 256 on, as real models use) whose model still fits the target. */
static int build_layout(layout_t *l, uint64_t target, int layers, int experts, int wdt, int ndt)
{
    size_t wsz = ckpt_dtype_size(wdt), nsz = ckpt_dtype_size(ndt);
    uint64_t h = 8;
    while (h < (1u << 20) && model_bytes(h + 8, layers, experts, wsz, nsz) <= target) h += 8;
    if (h >= 256) h = h / 64 * 64;
    l->hidden = (int)h;
    l->inter = (int)((h * 11 / 4 + 7) / 8 * 8);
    l->vocab = (int)(h * 16 < 32000 ? h * 16 : 32000);
    size_t per_layer = 6 + 3 * (size_t)(experts > 0 ? experts : 1) + (experts > 0);
    l->metas = calloc((size_t)layers * per_layer + 3, sizeof(*l->metas));
    l->shard = calloc((size_t)layers * per_layer + 3, sizeof(*l->shard));
    if (!l->metas || !l->shard) return -1;
    int64_t H = l->hidden, I = l->inter, V = l->vocab;
    int rc = add(l, "model.embed_tokens.weight", wdt, V, H);
    for (int i = 0; i < layers && rc == 0; i++) {
        static const char *attn[] = {"q_proj", "k_proj", "v_proj", "o_proj"};
        char name[128];
        for (int p = 0; p < 4 && rc == 0; p++) {
            snprintf(name, sizeof(name), "model.layers.%d.self_attn.%s.weight", i, attn[p]);
            rc = add(l, name, wdt, H, H);
        }
        if (experts > 0) { /* MoE (Mixtral / Qwen-MoE names): a router and the experts */
            int64_t EI = (int64_t)expert_inter((uint64_t)I, experts);
            snprintf(name, sizeof(name), "model.layers.%d.mlp.gate.weight", i);
            if (rc == 0) rc = add(l, name, wdt, experts, H);
            for (int x = 0; x < experts && rc == 0; x++) {
                snprintf(name, sizeof(name), "model.layers.%d.mlp.experts.%d.gate_proj.weight", i, x);
                rc = add(l, name, wdt, EI, H);
                snprintf(name, sizeof(name), "model.layers.%d.mlp.experts.%d.up_proj.weight", i, x);
                if (rc == 0) rc = add(l, name, wdt, EI, H);
                snprintf(name, sizeof(name), "model.layers.%d.mlp.experts.%d.down_proj.weight", i, x);
                if (rc == 0) rc = add(l, name, wdt, H, EI);
            }
        } else {
            snprintf(name, sizeof(name), "model.layers.%d.mlp.gate_proj.weight", i);
            if (rc == 0) rc = add(l, name, wdt, I, H);
            snprintf(name, sizeof(name), "model.layers.%d.mlp.up_proj.weight", i);
            if (rc == 0) rc = add(l, name, wdt, I, H);
            snprintf(name, sizeof(name), "model.layers.%d.mlp.down_proj.weight", i);
            if (rc == 0) rc = add(l, name, wdt, H, I);
        }
        snprintf(name, sizeof(name), "model.layers.%d.input_layernorm.weight", i);
        if (rc == 0) rc = add(l, name, ndt, H, 0);
        snprintf(name, sizeof(name), "model.layers.%d.post_attention_layernorm.weight", i);
        if (rc == 0) rc = add(l, name, ndt, H, 0);
    }
    if (rc == 0) rc = add(l, "model.norm.weight", ndt, H, 0);
    if (rc == 0) rc = add(l, "lm_head.weight", wdt, V, H);
    for (size_t i = 0; i < l->n; i++) l->total += l->metas[i].nbytes;
    return rc;
}

/* Contiguous shards of about total/K bytes; every shard gets at least one tensor. */
static void assign_shards(layout_t *l, int k)
{
    uint64_t before = 0;
    int prev = 0;
    for (size_t i = 0; i < l->n; i++) {
        uint64_t mid = before + l->metas[i].nbytes / 2;
        int s = l->total ? (int)((double)mid * k / (double)l->total) : 0;
        if (s > prev + 1) s = prev + 1;
        if (s < prev) s = prev;
        long left = (long)(l->n - i); /* tensors still to place, this one included */
        if ((long)s < (long)k - left) s = (int)((long)k - left);
        if (s > k - 1) s = k - 1;
        if (i == 0) s = 0;
        l->shard[i] = prev = s;
        before += l->metas[i].nbytes;
    }
}

static uint64_t mix64(uint64_t z)
{
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

/* Random bits shaped per dtype: weights become small values (|x| in [2^-7, 2^-3)), norms
 * values just above 1.0, so an engine computing with them sees no NaN or Inf. Each pair is
 * (keep mask, set bits) over one 64-bit word of 16/32/64-bit lanes. */
static void shape_bits(int dtype, int norm, uint64_t *mask, uint64_t *set)
{
    *mask = ~0ull;
    *set = 0;
    switch (dtype) {
    case CKPT_DTYPE_BF16:
        *mask = norm ? 0x000f000f000f000full : 0x81ff81ff81ff81ffull;
        *set = norm ? 0x3f803f803f803f80ull : 0x3c003c003c003c00ull;
        break;
    case CKPT_DTYPE_F16:
        *mask = norm ? 0x00ff00ff00ff00ffull : 0x8fff8fff8fff8fffull;
        *set = norm ? 0x3c003c003c003c00ull : 0x2000200020002000ull;
        break;
    case CKPT_DTYPE_F32:
        *mask = norm ? 0x0007ffff0007ffffull : 0x81ffffff81ffffffull;
        *set = norm ? 0x3f8000003f800000ull : 0x3c0000003c000000ull;
        break;
    case CKPT_DTYPE_F64:
        *mask = norm ? 0x0000ffffffffffffull : 0x803fffffffffffffull;
        *set = norm ? 0x3ff0000000000000ull : 0x3f80000000000000ull;
        break;
    default: break; /* integers and fp8: any bit pattern will do */
    }
}

static int fill(void *user, size_t index, uint64_t offset, void *buf, size_t len)
{
    const fill_ctx_t *c = user;
    const ckpt_tensor_meta_t *m = &c->metas[index];
    uint64_t mask, set;
    shape_bits(m->dtype, m->ndim == 1, &mask, &set); /* 1-D tensors are norms */
    uint64_t tseed = mix64(c->seed ^ ((c->base + index + 1) * 0x9e3779b97f4a7c15ull));
    uint64_t w = offset / 8; /* chunks start on multiples of 8 (the writer's chunk size) */
    unsigned char *p = buf;
    size_t i = 0;
    for (; i + 8 <= len; i += 8, w++) {
        uint64_t v = (mix64(tseed + (w + 1) * 0x9e3779b97f4a7c15ull) & mask) | set;
        memcpy(p + i, &v, 8);
    }
    if (i < len) {
        uint64_t v = (mix64(tseed + (w + 1) * 0x9e3779b97f4a7c15ull) & mask) | set;
        memcpy(p + i, &v, len - i);
    }
    return 0;
}

/* Removes what an earlier gen left (other shard counts would confuse a directory load). */
static void remove_old_output(const char *dir)
{
    DIR *d = opendir(dir);
    if (!d) return;
    struct dirent *e;
    char path[4096];
    while ((e = readdir(d)) != NULL) {
        if (strcmp(e->d_name, "model.safetensors") != 0 &&
            strcmp(e->d_name, "model.safetensors.index.json") != 0 &&
            fnmatch("model-[0-9]*-of-[0-9]*.safetensors", e->d_name, 0) != 0)
            continue;
        snprintf(path, sizeof(path), "%s/%s", dir, e->d_name);
        unlink(path);
    }
    closedir(d);
}

static int write_index(const char *dir, const layout_t *l, int k)
{
    char path[4096], tmp[4100];
    snprintf(path, sizeof(path), "%s/model.safetensors.index.json", dir);
    snprintf(tmp, sizeof(tmp), "%s.tmp", path);
    FILE *f = fopen(tmp, "w");
    if (!f) return -1;
    fprintf(f, "{\n  \"metadata\": {\"total_size\": %llu},\n  \"weight_map\": {",
            (unsigned long long)l->total);
    for (size_t i = 0; i < l->n; i++)
        fprintf(f, "%s\n    \"%s\": \"model-%05d-of-%05d.safetensors\"", i ? "," : "",
                l->metas[i].name, l->shard[i] + 1, k);
    fprintf(f, "\n  }\n}\n");
    int bad = ferror(f);
    if (fclose(f) != 0 || bad || rename(tmp, path) != 0) {
        unlink(tmp);
        return -1;
    }
    return 0;
}

static int write_shards(const char *dir, const layout_t *l, int k, uint64_t seed)
{
    char seedtxt[32];
    snprintf(seedtxt, sizeof(seedtxt), "%llu", (unsigned long long)seed);
    const char *keys[] = {"format", "generator", "seed"};
    const char *vals[] = {"pt", "ckpt-engine gen", seedtxt};
    size_t start = 0;
    for (int s = 0; s < k; s++) {
        size_t end = start;
        while (end < l->n && l->shard[end] == s) end++;
        char path[4096];
        if (k == 1) snprintf(path, sizeof(path), "%s/model.safetensors", dir);
        else snprintf(path, sizeof(path), "%s/model-%05d-of-%05d.safetensors", dir, s + 1, k);
        fill_ctx_t c = {l->metas + start, start, seed};
        if (ckpt_st_write_fill(path, l->metas + start, end - start, keys, vals, 3, fill, &c) < 0)
            return -1;
        start = end;
    }
    return 0;
}

int cmd_gen(int argc, char **argv)
{
    const char *out = NULL;
    uint64_t size = 1ull << 30, seed = 0;
    long layers = 8, shards = 1, experts = 0;
    int wdt = CKPT_DTYPE_BF16, ndt = CKPT_DTYPE_F32;
    for (int i = 1; i < argc; i += 2) { /* every option takes one value */
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        char *end = NULL;
        int bad = 0;
        if (strcmp(a, "-h") == 0 || strcmp(a, "--help") == 0) {
            usage(stdout);
            return 0;
        }
        if (!v || strncmp(a, "--", 2) != 0) bad = 1;
        else if (strcmp(a, "--out") == 0) out = v;
        else if (strcmp(a, "--size") == 0) bad = parse_size(v, &size) < 0;
        else if (strcmp(a, "--layers") == 0) bad = (layers = strtol(v, &end, 10)) < 1 || layers > 100000 || *end;
        else if (strcmp(a, "--experts") == 0) bad = (experts = strtol(v, &end, 10)) < 0 || experts > 4096 || *end;
        else if (strcmp(a, "--shards") == 0) bad = (shards = strtol(v, &end, 10)) < 1 || shards > 99999 || *end;
        else if (strcmp(a, "--seed") == 0) seed = strtoull(v, &end, 0), bad = *end != '\0';
        else if (strcmp(a, "--dtypes") == 0) {
            const char *comma = strchr(v, ',');
            wdt = parse_dtype(v, comma ? (size_t)(comma - v) : strlen(v));
            ndt = comma ? parse_dtype(comma + 1, strlen(comma + 1)) : CKPT_DTYPE_F32;
            bad = wdt == CKPT_DTYPE_INVALID || ndt == CKPT_DTYPE_INVALID;
        } else bad = 1;
        if (bad) {
            fprintf(stderr, "ckpt-engine gen: bad option or value: %s %s\n", a, v ? v : "");
            usage(stderr);
            return 2;
        }
    }
    if (!out) {
        fprintf(stderr, "ckpt-engine gen: --out DIR is required\n");
        usage(stderr);
        return 2;
    }
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    layout_t l = {0};
    int rc = 1;
    if (build_layout(&l, size, (int)layers, (int)experts, wdt, ndt) != 0) {
        fprintf(stderr, "ckpt-engine gen: %s\n", l.metas ? ckpt_last_error() : "out of memory");
        goto out;
    }
    if ((size_t)shards > l.n) {
        fprintf(stderr, "ckpt-engine gen: %ld shards but only %zu tensors\n", shards, l.n);
        rc = 2;
        goto out;
    }
    if (mkdir(out, 0755) != 0 && errno != EEXIST) {
        fprintf(stderr, "ckpt-engine gen: %s: cannot create: %s\n", out, strerror(errno));
        goto out;
    }
    remove_old_output(out);
    assign_shards(&l, (int)shards);
    if (write_shards(out, &l, (int)shards, seed) != 0) {
        fprintf(stderr, "ckpt-engine gen: %s\n", ckpt_last_error());
        goto out;
    }
    if (shards > 1 && write_index(out, &l, (int)shards) != 0) {
        fprintf(stderr, "ckpt-engine gen: %s/model.safetensors.index.json: cannot write\n", out);
        goto out;
    }
    clock_gettime(CLOCK_MONOTONIC, &t1);
    printf("gen: %ld files, %zu tensors, %llu bytes (%.1f MiB) in %s: hidden %d, inter %d, "
           "vocab %d, layers %ld, %s/%s, %.2f s\n",
           shards, l.n, (unsigned long long)l.total, (double)l.total / 1048576.0, out, l.hidden,
           l.inter, l.vocab, layers, ckpt_dtype_name(wdt), ckpt_dtype_name(ndt),
           (double)(t1.tv_sec - t0.tv_sec) + (double)(t1.tv_nsec - t0.tv_nsec) * 1e-9);
    rc = 0;
out:
    free(l.metas);
    free(l.shard);
    return rc;
}
