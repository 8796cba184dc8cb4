/* The tensors `ckpt-engine plan` costs: from a checkpoint or a model description. */
#ifndef CKPT_TOOLS_PLAN_INPUT_H
#define CKPT_TOOLS_PLAN_INPUT_H

#include <stddef.h>

#include "ckpt/ckpt.h"

typedef struct plan_input {
    char name[256];
    ckpt_tensor_meta_t *metas;
    size_t count, cap;
    int num_layers, num_experts, kv_heads; /* from a description's config; 0: unknown */
} plan_input_t;

/* A path ending in .json (not a safetensors index) is a model description, anything else
 * a checkpoint (directory, file or index; headers only are read). -1 with the cause in
 * err. */
int plan_input_load(const char *path, plan_input_t *in, char *err, size_t errcap);
void plan_input_free(plan_input_t *in);

#endif
