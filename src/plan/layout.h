/* Which part of each tensor an inference worker needs, derived from its parallel layout
 * (tensor, expert and pipeline parallelism) the way vLLM shards a transformer:
 *  - column-parallel linears (q/k/v, q_b/kv_b, gate/up, embed_tokens, lm_head) are cut
 *    along dimension 0, row-parallel ones (o_proj, down_proj) along dimension 1; their
 *    FP8 scales follow their weight, a row-parallel bias is whole on every worker;
 *  - k/v projections with fewer KV heads than TP ranks are cut into kv_heads parts and each
 *    part is replicated (as vLLM replicates KV heads);
 *  - with EP > 1 an expert's tensors go whole to one EP rank (contiguous blocks of
 *    experts, vLLM's default placement) and are not cut by TP;
 *  - with PP > 1 a layer goes to the stage holding it (contiguous blocks of layers);
 *    embeddings to the first stage, the final norm, lm_head and MTP layers to the last;
 *  - everything else (norms, routers, replicated linears) is needed whole by every worker.
 * A pure function of the tensor's name and shape, so every rank and the cost model
 * (plan/cost.c) derive the same need. */
#ifndef CKPT_PLAN_LAYOUT_H
#define CKPT_PLAN_LAYOUT_H

#include "core/internal.h"

typedef struct ckpt_layout {
    int tp, pp, ep;   /* parallel sizes of one inference instance (>= 1; ep divides tp) */
    int num_layers;   /* decoder layers (layers.N with N >= num_layers are MTP: last stage) */
    int num_experts;  /* routed experts per layer (for EP placement); 0 when none */
    int kv_heads;     /* KV heads (0: unknown, k/v cut like q) */
} ckpt_layout_t;

typedef struct ckpt_need {
    int needed;       /* 0: this worker needs no byte of the tensor */
    int dim;          /* -1: the whole tensor; else the dimension it is cut along */
    int parts;        /* number of equal parts along dim (1 when whole) */
    int index;        /* which part this worker needs */
} ckpt_need_t;

/* Fills `need` for worker `worker` (0 .. tp*pp-1: stage * tp + tp rank) of an instance
 * with `layout`. CKPT_EINVAL for a layout that is not one (sizes < 1, ep not dividing
 * tp, worker out of range). */
int ckpt__layout_need(const ckpt_layout_t *layout, int worker, const ckpt_tensor_meta_t *meta,
                      ckpt_need_t *need);

/* Bytes of the part `need` names (a part of a dimension that does not divide evenly is
 * counted with the larger share). 0 when not needed. */
uint64_t ckpt__need_bytes(const ckpt_tensor_meta_t *meta, const ckpt_need_t *need);

/* Fills num_layers and num_experts from the names (largest layers.N / experts.N + 1) for
 * a checkpoint whose config is not known. */
void ckpt__layout_scan(const ckpt_tensor_meta_t *metas, size_t count, ckpt_layout_t *layout);

#endif
