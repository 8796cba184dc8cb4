/* A worker's need per tensor from its parallel layout (see layout.h for the rules). */
#include <stdlib.h>
#include <string.h>

#include "ckpt/layout.h"
#include "plan/layout.h"

/* The number after `key` ("layers." / "experts.") in name, or -1. "shared_experts." is
 * not "experts.": the match must start the name or follow a dot. */
static long number_after(const char *name, const char *key)
{
    size_t klen = strlen(key);
    for (const char *p = strstr(name, key); p; p = strstr(p + 1, key)) {
        if (p != name && p[-1] != '.') continue;
        const char *digits = p + klen;
        if (*digits < '0' || *digits > '9') continue;
        char *end = NULL;
        long v = strtol(digits, &end, 10);
        if (*end == '.' || *end == '\0') return v;
    }
    return -1;
}

/* The module a parameter belongs to: "model.layers.3.self_attn.q_proj.weight" -> "q_proj". */
static void module_of(const char *name, char *out, size_t cap)
{
    static const char *params[] = {".weight_scale_inv", ".weight_scale", ".input_scale",
                                   ".weight", ".bias"};
    size_t len = strlen(name);
    for (size_t i = 0; i < sizeof(params) / sizeof(params[0]); i++) {
        size_t plen = strlen(params[i]);
        if (len > plen && strcmp(name + len - plen, params[i]) == 0) {
            len -= plen;
            break;
        }
    }
    size_t start = len;
    while (start > 0 && name[start - 1] != '.') start--;
    size_t n = len - start < cap - 1 ? len - start : cap - 1;
    memcpy(out, name + start, n);
    out[n] = '\0';
}

static int in_list(const char *module, const char *const *list)
{
    for (; *list; list++)
        if (strcmp(module, *list) == 0) return 1;
    return 0;
}

static int ends_with(const char *s, const char *suffix)
{
    size_t a = strlen(s), b = strlen(suffix);
    return a >= b && strcmp(s + a - b, suffix) == 0;
}

static const char *const column_parallel[] = {
    "q_proj", "k_proj", "v_proj", "qkv_proj", "q_b_proj", "kv_b_proj", "gate_proj",
    "up_proj", "gate_up_proj", "w1", "w3", "embed_tokens", "lm_head", "head", NULL};
static const char *const row_parallel[] = {"o_proj", "down_proj", "w2", NULL};

/* Pipeline stage (0 .. pp-1) that holds the tensor. */
static int stage_of(const ckpt_layout_t *l, const char *name)
{
    if (l->pp <= 1) return 0;
    long layer = number_after(name, "layers.");
    if (layer >= 0) {
        if (l->num_layers <= 0 || layer >= l->num_layers) return l->pp - 1; /* MTP */
        return (int)(layer * l->pp / l->num_layers);
    }
    char module[64];
    module_of(name, module, sizeof(module));
    if (strcmp(module, "embed_tokens") == 0) return 0;
    return l->pp - 1; /* final norm, lm_head */
}

int ckpt__layout_need(const ckpt_layout_t *l, int worker, const ckpt_tensor_meta_t *meta,
                      ckpt_need_t *need)
{
    if (l->tp < 1 || l->pp < 1 || l->ep < 1 || l->tp % l->ep != 0)
        return ckpt__error(CKPT_EINVAL,
                           "layout tp=%d pp=%d ep=%d: sizes must be >= 1 and ep must divide tp",
                           l->tp, l->pp, l->ep);
    if (worker < 0 || worker >= l->tp * l->pp)
        return ckpt__error(CKPT_EINVAL, "worker %d outside an instance of %d workers", worker,
                           l->tp * l->pp);
    int tp_rank = worker % l->tp, stage = worker / l->tp;
    *need = (ckpt_need_t){.needed = 1, .dim = -1, .parts = 1, .index = 0};
    if (stage_of(l, meta->name) != stage) {
        need->needed = 0;
        return CKPT_OK;
    }
    long expert = number_after(meta->name, "experts.");
    if (expert >= 0 && l->ep > 1) {
        int ep_rank = tp_rank % l->ep;
        long experts = l->num_experts > 0 ? l->num_experts : expert + 1;
        need->needed = (int)(expert * l->ep / experts) == ep_rank;
        return CKPT_OK;
    }
    if (l->tp == 1 || meta->ndim == 0) return CKPT_OK;
    char module[64];
    module_of(meta->name, module, sizeof(module));
    int dim = -1, parts = l->tp;
    if (in_list(module, column_parallel)) {
        dim = 0;
        if (l->kv_heads > 0 && l->kv_heads < l->tp &&
            (strcmp(module, "k_proj") == 0 || strcmp(module, "v_proj") == 0))
            parts = l->kv_heads;
    } else if (in_list(module, row_parallel) && meta->ndim >= 2) {
        dim = 1; /* a row-parallel bias (1-D) is added after the reduction: whole */
    }
    if (dim < 0 || ends_with(meta->name, ".input_scale")) return CKPT_OK;
    need->dim = dim;
    need->parts = parts;
    need->index = tp_rank * parts / l->tp;
    return CKPT_OK;
}

uint64_t ckpt__need_bytes(const ckpt_tensor_meta_t *meta, const ckpt_need_t *need)
{
    if (!need->needed) return 0;
    if (need->dim < 0 || need->parts <= 1) return meta->nbytes;
    int64_t len = meta->shape[need->dim];
    if (len <= 0) return 0;
    int64_t part = (len + need->parts - 1) / need->parts;
    return meta->nbytes / (uint64_t)len * (uint64_t)part;
}

void ckpt__layout_scan(const ckpt_tensor_meta_t *metas, size_t count, ckpt_layout_t *layout)
{
    long layers = 0, experts = 0;
    for (size_t i = 0; i < count; i++) {
        long l = number_after(metas[i].name, "layers."), e = number_after(metas[i].name, "experts.");
        if (l + 1 > layers) layers = l + 1;
        if (e + 1 > experts) experts = e + 1;
    }
    layout->num_layers = (int)layers;
    layout->num_experts = (int)experts;
}

int ckpt_layout_need(const ckpt_parallel_layout_t *layout, int worker,
                     const ckpt_tensor_meta_t *meta, int *needed_out, ckpt_need_decl_t *decl)
{
    if (layout == NULL || meta == NULL || needed_out == NULL || decl == NULL)
        return ckpt__error(CKPT_EINVAL, "ckpt_layout_need: NULL argument");
    ckpt_layout_t l = {.tp = layout->tp, .pp = layout->pp, .ep = layout->ep,
                       .num_layers = layout->num_layers, .num_experts = layout->num_experts,
                       .kv_heads = layout->kv_heads};
    ckpt_need_t n = {0};
    int rc = ckpt__layout_need(&l, worker, meta, &n);
    if (rc < 0) return rc;
    memset(decl, 0, sizeof(*decl));
    ckpt__strlcpy(decl->name, meta->name, sizeof(decl->name));
    decl->dim = -1;
    *needed_out = n.needed;
    if (n.needed && n.dim >= 0 && n.parts > 1) {
        uint64_t len = (uint64_t)meta->shape[n.dim];
        decl->dim = n.dim;
        decl->start = len * (uint64_t)n.index / (uint64_t)n.parts;
        decl->length = len * (uint64_t)(n.index + 1) / (uint64_t)n.parts - decl->start;
        if (decl->length == 0) *needed_out = 0; /* fewer indices than parts */
    }
    return CKPT_OK;
}
