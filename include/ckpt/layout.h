/*
 * What a worker of a parallel inference instance needs of each tensor, derived the way
 * vLLM shards a transformer (docs/COST-MODEL.md, "What it computes"): column-parallel linears (q/k/v,
 * q_b/kv_b, gate/up, embeddings, lm_head) cut along dimension 0, row-parallel ones (o_proj,
 * down_proj) along dimension 1, FP8 scales with their weight, k/v with fewer KV heads than
 * TP ranks cut in kv_heads parts (each replicated), experts whole on one EP rank (contiguous
 * blocks), layers on one PP stage (embeddings first; final norm, lm_head, MTP last); the
 * rest (norms, routers) whole. The engine's cost model uses the same rules, and a worker
 * declares the result with ckpt_receiver_declare_need.
 */
#ifndef CKPT_LAYOUT_H
#define CKPT_LAYOUT_H

#include "ckpt/ckpt.h"
#include "ckpt/receiver.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct ckpt_parallel_layout {
    int32_t tp, pp, ep;  /* sizes of one instance (>= 1; ep divides tp) */
    int32_t num_layers;  /* decoder layers (layers.N at or beyond: MTP, the last stage);
                          * needed with pp > 1 */
    int32_t num_experts; /* routed experts per layer, for EP placement; 0: none/unknown */
    int32_t kv_heads;    /* KV heads; 0: unknown (k/v cut like q) */
} ckpt_parallel_layout_t;

/* Worker `worker` (0 .. tp*pp-1: stage * tp + tp rank) of an instance: *needed_out = 0
 * when it needs no byte of the tensor, else 1 with *decl_out filled (name, dim -1 for the
 * whole tensor, or dim/start/length of its part; parts of a dimension that does not divide
 * differ by at most one index). CKPT_EINVAL for a layout that is not one or a worker outside it. */
CKPT_API int ckpt_layout_need(const ckpt_parallel_layout_t *layout, int worker,
                              const ckpt_tensor_meta_t *meta, int *needed_out,
                              ckpt_need_decl_t *decl_out);

#ifdef __cplusplus
}
#endif

#endif /* CKPT_LAYOUT_H */
