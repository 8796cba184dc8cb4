/* Model table of the reference worker (see model.h).
 *
 * Tensor-parallel rule (--tp-size n > 1): a tensor with ndim >= 2 whose dim 0 is a positive
 * multiple of n is sharded along dim 0: TP rank r keeps rows [r*d0/n, (r+1)*d0/n), which are
 * contiguous in a row-major tensor, so the slice is one memcpy out of the bucket. Every
 * other tensor (1-D, scalars, dim 0 not divisible) is replicated whole. */
#include <errno.h>
#include <inttypes.h>
#include <fnmatch.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "model.h"

static uint64_t name_hash(const char *s)
{
    uint64_t h = 1469598103934665603ull; /* FNV-1a */
    for (; *s; s++) h = (h ^ (uint8_t)*s) * 1099511628211ull;
    return h;
}

void wk_model_init(wk_model_t *m, int tp_rank, int tp_size)
{
    memset(m, 0, sizeof(*m));
    m->tp_rank = tp_rank;
    m->tp_size = tp_size < 1 ? 1 : tp_size;
}

void wk_model_free(wk_model_t *m)
{
    for (size_t i = 0; i < m->n; i++) free(m->t[i].data);
    free(m->t);
    free(m->slots);
    memset(m, 0, sizeof(*m));
}

static wk_tensor_t *find(const wk_model_t *m, const char *name)
{
    if (m->nslots == 0) return NULL;
    for (size_t s = name_hash(name) & (m->nslots - 1);; s = (s + 1) & (m->nslots - 1)) {
        uint32_t v = m->slots[s];
        if (v == 0) return NULL;
        if (strcmp(m->t[v - 1].full.name, name) == 0) return &m->t[v - 1];
    }
}

static int reindex(wk_model_t *m, size_t nslots)
{
    uint32_t *slots = calloc(nslots, sizeof(*slots));
    if (slots == NULL) return -1;
    for (size_t i = 0; i < m->n; i++) {
        size_t s = name_hash(m->t[i].full.name) & (nslots - 1);
        while (slots[s]) s = (s + 1) & (nslots - 1);
        slots[s] = (uint32_t)i + 1;
    }
    free(m->slots);
    m->slots = slots;
    m->nslots = nslots;
    return 0;
}

/* Adds a tensor (zeros), computing its TP slice. Allocates: only at layout load or on the
 * first sight of a name, never for a name the model already has. */
static wk_tensor_t *add(wk_model_t *m, const ckpt_tensor_meta_t *meta)
{
    if (m->n == m->cap) {
        size_t cap = m->cap ? m->cap * 2 : 64;
        wk_tensor_t *t = realloc(m->t, cap * sizeof(*t));
        if (t == NULL) return NULL;
        m->t = t;
        m->cap = cap;
    }
    wk_tensor_t *t = &m->t[m->n];
    memset(t, 0, sizeof(*t));
    t->full = *meta;
    t->full.offset = t->full.checksum = 0;
    t->local = t->full;
    int64_t d0 = meta->shape[0];
    if (m->tp_size > 1 && meta->ndim >= 2 && d0 > 0 && d0 % m->tp_size == 0) {
        uint64_t rows = (uint64_t)(d0 / m->tp_size), row_bytes = meta->nbytes / (uint64_t)d0;
        t->local.shape[0] = (int64_t)rows;
        t->local.nbytes = rows * row_bytes;
        t->src_off = (uint64_t)m->tp_rank * rows * row_bytes;
    }
    t->data = calloc(1, t->local.nbytes ? t->local.nbytes : 1);
    if (t->data == NULL) return NULL;
    /* Touch every page now, as a serving engine's weights are resident: otherwise the first
     * update would pay one page fault per 4 KiB of model and measure the kernel, not us. */
    memset(t->data, 0, t->local.nbytes);
    m->n++;
    if (m->n * 2 > m->nslots) { /* keep the index at most half full; rebuilt rarely */
        if (reindex(m, m->nslots ? m->nslots * 2 : 128) != 0) {
            free(t->data);
            m->n--;
            return NULL;
        }
    } else {
        size_t s = name_hash(t->full.name) & (m->nslots - 1);
        while (m->slots[s]) s = (s + 1) & (m->nslots - 1);
        m->slots[s] = (uint32_t)m->n;
    }
    return t;
}

/* The X of a name with ".experts.X." (an expert of a MoE layer), else -1. */
static long expert_of(const char *name)
{
    const char *p = strstr(name, ".experts.");
    if (p == NULL) return -1;
    char *end = NULL;
    long x = strtol(p + 9, &end, 10);
    return end != p + 9 && *end == '.' && x >= 0 ? x : -1;
}

/* Calls fn for every tensor of the layout's files. */
static int each_tensor(const char *path, int (*fn)(wk_model_t *, const ckpt_tensor_meta_t *),
                       wk_model_t *m)
{
    char **paths = NULL;
    size_t npaths = 0;
    int rc = ckpt_st_list_files(path, &paths, &npaths);
    for (size_t f = 0; rc == CKPT_OK && f < npaths; f++) {
        ckpt_st_file_t *file = NULL;
        rc = ckpt_st_open(paths[f], &file);
        for (size_t i = 0; rc == CKPT_OK && i < ckpt_st_num_tensors(file); i++)
            rc = fn(m, ckpt_st_tensor(file, i));
        ckpt_st_close(file);
    }
    if (paths) ckpt_st_paths_free(paths, npaths);
    return rc;
}

static int count_experts(wk_model_t *m, const ckpt_tensor_meta_t *t)
{
    long x = expert_of(t->name);
    if (x + 1 > m->experts) m->experts = x + 1;
    return CKPT_OK;
}

static int load_one(wk_model_t *m, const ckpt_tensor_meta_t *t)
{
    int keep = m->nonly == 0;
    for (int k = 0; k < m->nonly && !keep; k++) keep = fnmatch(m->only[k], t->name, 0) == 0;
    long x = expert_of(t->name);
    /* EP as vLLM places experts: rank r of n holds the contiguous block r of n. */
    if (keep && m->ep_size > 1 && x >= 0) keep = x * m->ep_size / m->experts == m->ep_rank;
    if (!keep) return CKPT_OK;
    if (find(m, t->name) == NULL && add(m, t) == NULL) return CKPT_ENOMEM;
    return CKPT_OK;
}

int wk_model_load_layout(wk_model_t *m, const char *path)
{
    int rc = CKPT_OK;
    m->experts = 0;
    if (m->ep_size > 1) rc = each_tensor(path, count_experts, m);
    if (rc == CKPT_OK) rc = each_tensor(path, load_one, m);
    if (rc) fprintf(stderr, "ckpt-worker: layout %s: %s\n", path, ckpt_last_error());
    m->fixed = 1;
    return rc;
}

int wk_model_need(const wk_model_t *m, ckpt_need_decl_t **out)
{
    ckpt_need_decl_t *d = calloc(m->n + 1, sizeof(*d));
    if (d == NULL) return CKPT_ENOMEM;
    for (size_t i = 0; i < m->n; i++) {
        const wk_tensor_t *t = &m->t[i];
        snprintf(d[i].name, sizeof(d[i].name), "%s", t->full.name);
        d[i].dim = -1;
        if (t->local.nbytes != t->full.nbytes) { /* TP rows [src_off / row, + local rows) */
            uint64_t row = t->full.nbytes / (uint64_t)t->full.shape[0];
            d[i].dim = 0;
            d[i].start = t->src_off / row;
            d[i].length = (uint64_t)t->local.shape[0];
        }
    }
    *out = d;
    return CKPT_OK;
}

static void shape_str(const ckpt_tensor_meta_t *t, char *out, size_t cap)
{
    size_t n = (size_t)snprintf(out, cap, "%s [", ckpt_dtype_name(t->dtype));
    for (int d = 0; d < t->ndim && n < cap; d++)
        n += (size_t)snprintf(out + n, cap - n, "%s%" PRId64, d ? "," : "", t->shape[d]);
    if (n < cap) snprintf(out + n, cap - n, "]");
}

int wk_model_apply(wk_model_t *m, const ckpt_tensor_view_t *v, size_t n, int verify,
                   char *why, size_t why_cap)
{
    /* Pass 1: check names, dtypes and shapes, so a malformed bucket changes nothing. */
    for (size_t i = 0; i < n; i++) {
        const ckpt_tensor_meta_t *g = &v[i].meta;
        wk_tensor_t *t = find(m, g->name);
        if (t == NULL && m->fixed) {
            snprintf(why, why_cap, "unknown tensor '%s'", g->name);
            return CKPT_ENOENT;
        }
        if (t == NULL && (t = add(m, g)) == NULL) {
            snprintf(why, why_cap, "tensor '%s': out of memory", g->name);
            return CKPT_ENOMEM;
        }
        /* A part (the engine cut the tensor for the hosts that need its slices) has the
         * tensor's shape but for its extent along part_dim. */
        ckpt_tensor_meta_t whole = *g;
        if (v[i].part_dim >= 0 && v[i].part_dim < g->ndim) whole.shape[v[i].part_dim] = v[i].part_full;
        if (t->full.dtype != g->dtype || t->full.ndim != g->ndim ||
            memcmp(t->full.shape, whole.shape, sizeof(g->shape[0]) * (size_t)g->ndim) != 0) {
            char have[128], got[128];
            shape_str(&t->full, have, sizeof(have));
            shape_str(&whole, got, sizeof(got));
            snprintf(why, why_cap, "tensor '%s': model has %s, update has %s", g->name, have,
                     got);
            return CKPT_EINVAL;
        }
        /* This worker holds rows (TP): a part must be cut along them too. */
        if (v[i].part_dim > 0 && t->local.nbytes != t->full.nbytes) {
            snprintf(why, why_cap, "tensor '%s': a part along dimension %d, this worker holds "
                     "rows", g->name, v[i].part_dim);
            return CKPT_EINVAL;
        }
    }
    /* Pass 2: copy this worker's slice of each tensor, verifying checksums in the same pass
     * (a mismatch means corruption in transit: the update is reported incomplete). */
    for (size_t i = 0; i < n; i++) {
        wk_tensor_t *t = find(m, v[i].meta.name);
        if (v[i].part_dim >= 0) { /* a part: the rows of it this worker holds, if any */
            int dim = t->local.nbytes != t->full.nbytes ? 0 : v[i].part_dim;
            uint64_t start = 0, length = (uint64_t)t->full.shape[dim];
            if (dim == 0 && t->full.ndim > 0 && t->full.shape[0] > 0) {
                start = t->src_off / (t->full.nbytes / (uint64_t)t->full.shape[0]);
                length = (uint64_t)t->local.shape[0];
            }
            if (ckpt_receiver_copy_slice(&v[i], dim, start, length, t->data) < 0) {
                snprintf(why, why_cap, "%s", ckpt_last_error());
                return CKPT_EINVAL;
            }
            continue;
        }
        if (ckpt_receiver_copy(&v[i], t->src_off, t->data, t->local.nbytes, verify) != CKPT_OK) {
            snprintf(why, why_cap, "%s", ckpt_last_error());
            return CKPT_ECHECKSUM;
        }
    }
    return CKPT_OK;
}

static void json_str(FILE *f, const char *s)
{
    fputc('"', f);
    for (; *s; s++) {
        unsigned char c = (unsigned char)*s;
        if (c == '"' || c == '\\') fprintf(f, "\\%c", c);
        else if (c < 0x20) fprintf(f, "\\u%04x", c);
        else fputc(c, f);
    }
    fputc('"', f);
}

int wk_model_write_checksums(const wk_model_t *m, const char *path,
                             const ckpt_update_info_t *info)
{
    char tmp[4096];
    snprintf(tmp, sizeof(tmp), "%s.tmp", path);
    FILE *f = fopen(tmp, "w");
    if (f == NULL) {
        fprintf(stderr, "ckpt-worker: %s: %s\n", tmp, strerror(errno));
        return CKPT_EIO;
    }
    fprintf(f, "{\"update_id\": %" PRIu64 ", \"version\": %" PRIu64 ", \"name\": ",
            info->update_id, info->version);
    json_str(f, info->name);
    fprintf(f, ",\n \"tp_rank\": %d, \"tp_size\": %d,\n \"tensors\": {", m->tp_rank,
            m->tp_size);
    for (size_t i = 0; i < m->n; i++) {
        fprintf(f, "%s\n  ", i ? "," : "");
        json_str(f, m->t[i].full.name);
        fprintf(f, ": \"%016" PRIx64 "\"", ckpt_checksum(m->t[i].data, m->t[i].local.nbytes));
    }
    fprintf(f, "\n }\n}\n");
    if (fclose(f) != 0 || rename(tmp, path) != 0) {
        fprintf(stderr, "ckpt-worker: writing %s: %s\n", path, strerror(errno));
        return CKPT_EIO;
    }
    return CKPT_OK;
}

int wk_model_dump(const wk_model_t *m, const char *dir, const ckpt_update_info_t *info)
{
    char path[4096], id[32], ver[32];
    const char *keys[3] = {"ckpt_name", "ckpt_update_id", "ckpt_version"};
    const char *vals[3] = {info->name, id, ver};
    int rc = CKPT_ENOMEM;
    if (mkdir(dir, 0755) != 0 && errno != EEXIST) {
        fprintf(stderr, "ckpt-worker: mkdir %s: %s\n", dir, strerror(errno));
        return CKPT_EIO;
    }
    snprintf(path, sizeof(path), "%s/model.safetensors", dir);
    snprintf(id, sizeof(id), "%" PRIu64, info->update_id);
    snprintf(ver, sizeof(ver), "%" PRIu64, info->version);
    ckpt_tensor_meta_t *metas = malloc((m->n ? m->n : 1) * sizeof(*metas));
    const void **data = malloc((m->n ? m->n : 1) * sizeof(*data));
    if (metas && data) {
        for (size_t i = 0; i < m->n; i++) {
            metas[i] = m->t[i].local;
            data[i] = m->t[i].data;
        }
        rc = ckpt_st_write(path, metas, data, m->n, keys, vals, 3);
        if (rc) fprintf(stderr, "ckpt-worker: dump %s: %s\n", path, ckpt_last_error());
    }
    free(metas);
    free(data);
    return rc;
}
