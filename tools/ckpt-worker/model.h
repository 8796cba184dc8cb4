/* The reference worker's model: named tensors in plain malloc'ed memory, the tensor-parallel
 * slicing rule, and what the worker writes after an update (checksums, safetensors dump). */
#ifndef CKPT_WORKER_MODEL_H
#define CKPT_WORKER_MODEL_H

#include <stdint.h>

#include "ckpt/receiver.h"

typedef struct {
    ckpt_tensor_meta_t full;  /* as the checkpoint has it (name, dtype, full shape) */
    ckpt_tensor_meta_t local; /* what this worker holds: shape[0] cut for its TP rank */
    uint64_t src_off;         /* first byte of the full tensor this worker keeps */
    uint8_t *data;            /* local.nbytes bytes */
} wk_tensor_t;

typedef struct {
    wk_tensor_t *t;
    size_t n, cap;
    uint32_t *slots; /* open-addressing name index: tensor index + 1, 0 = empty */
    size_t nslots;
    int tp_rank, tp_size;
    int fixed;       /* layout given: unknown names are errors, not new tensors */
    const char *const *only; /* layout load: keep only tensors whose names match one of */
    int nonly;               /* these globs (none: every tensor) */
    int ep_rank, ep_size;    /* layout load: keep only experts of block ep_rank of ep_size */
    long experts;            /* the layout's expert count (largest X of .experts.X. + 1) */
} wk_model_t;

void wk_model_init(wk_model_t *m, int tp_rank, int tp_size);
void wk_model_free(wk_model_t *m);
/* Loads names, dtypes and shapes (zeros) from a safetensors file, directory or index. */
int wk_model_load_layout(wk_model_t *m, const char *path);
/* Copies one bucket into the model. Everything is checked first (unknown tensor, dtype or
 * shape mismatch, checksum when verify), so a failed bucket leaves the model untouched.
 * On failure *why names the tensor and *status is what the engine should see. */
/* What this worker needs of each tensor it holds (its TP rows, or the whole tensor), for
 * ckpt_receiver_declare_need. *out is malloc'ed (count = m->n). */
int wk_model_need(const wk_model_t *m, ckpt_need_decl_t **out);
int wk_model_apply(wk_model_t *m, const ckpt_tensor_view_t *v, size_t n, int verify,
                   char *why, size_t why_cap);
int wk_model_write_checksums(const wk_model_t *m, const char *path,
                             const ckpt_update_info_t *info);
int wk_model_dump(const wk_model_t *m, const char *dir, const ckpt_update_info_t *info);

#endif
