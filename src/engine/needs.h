/* What the workers need of an update (NEED, protocol version 4): every rank reads what its
 * worker declared, checks it against the update's tensors, and the ranks learn together
 * which tensors some worker needs. A tensor nobody needs fails the update before any byte
 * moves, or with ignore_unneeded is left out of it. Each rank then sends its worker only
 * the records of the tensors it needs, and the bytes every worker needs are counted. */
#ifndef CKPT_ENGINE_NEEDS_H
#define CKPT_ENGINE_NEEDS_H

#include "engine/engine_internal.h"

/* A worker's need of one tensor: the whole (dim -1) or [start, start + length) of dim. */
typedef struct ckpt__slice {
    int32_t dim;
    uint32_t pad;
    uint64_t start, length;
} ckpt__slice_t;

/* Values of mine[]: not needed, needed whole, a slice of it needed. */
#define CKPT__NEED_NONE 0
#define CKPT__NEED_WHOLE 1
#define CKPT__NEED_SLICE 2

typedef struct ckpt__needs {
    int declared;          /* this rank's worker declared a need */
    int any_declared;      /* some worker did (else nothing below changes the update) */
    uint8_t *mine;         /* per tensor of the update (gathered order): this worker's need,
                            * CKPT__NEED_*; every one WHOLE when it declared nothing */
    ckpt__slice_t *slice;  /* per tensor: which slice (declared workers only) */
    uint64_t mine_bytes;   /* bytes this worker needs (its slices) */
    uint64_t bytes_max;    /* the busiest worker's need, all ranks */
    uint64_t bytes_total;  /* every worker's need summed */
    uint32_t unneeded;     /* tensors nobody needs (left out with ignore_unneeded) */
    /* name -> index into the update's tensors, to find a planned tensor's entry */
    uint32_t *slots;
    size_t nslots;
    const ckpt_tensor_meta_t *all;
} ckpt__needs_t;

/* This rank's part (local, no collective): reads what its worker declared and checks it
 * against the update's tensors all[0 .. count): a tensor the update does not have (fine
 * when `partial`: the update is a subset) or a range outside the tensor is CKPT_EINVAL
 * naming the rank, the worker and the tensor. The caller agrees on the result. */
int ckpt__needs_local(ckpt_engine_t *e, const ckpt_tensor_meta_t *all, size_t count,
                      int partial, ckpt__needs_t *out);
/* Collective, after every rank's local part succeeded: learns which tensors some worker
 * needs and the bytes they need. Unless ignore_unneeded, a tensor nobody needs is
 * CKPT_EINVAL naming up to 4 of them (the same text on every rank); with it they are
 * removed from all[0 .. *count) (the others keep their order). */
int ckpt__needs_union(ckpt_engine_t *e, ckpt_tensor_meta_t *all, size_t *count,
                      int ignore_unneeded, int coll_ms, ckpt__needs_t *out);
/* 1 when this rank's worker needs the tensor (by name; undeclared: always). */
int ckpt__needs_wants(const ckpt__needs_t *n, const ckpt_tensor_meta_t *t);
/* 1 when this rank's worker needs some of indices [start, start + length) of dimension dim
 * of tensor i (a part of it cut by the route); dim -1: any of it. */
int ckpt__needs_wants_part(const ckpt__needs_t *n, size_t i, int dim, uint64_t start,
                           uint64_t length);
void ckpt__needs_free(ckpt__needs_t *n);

#endif
