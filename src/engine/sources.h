/* Pool regions of every rank of this host, opened for this rank's worker (sources.c). */
#ifndef CKPT_ENGINE_SOURCES_H
#define CKPT_ENGINE_SOURCES_H

#include "engine/engine_internal.h"
#include "plan/bucket.h"

typedef struct ckpt__sources {
    size_t count;
    void *descs; /* source_desc_t[count], in group order */
    int *fds;    /* read-only fds, handed to the worker in BEGIN */
} ckpt__sources_t;

/* Collective over the group: exchanges the regions of checkpoint `name` and opens them. */
int ckpt__sources_open(ckpt_engine_t *e, const char *name, int timeout_ms, ckpt__sources_t *out);
void ckpt__sources_close(ckpt__sources_t *s);
/* Turns the placement of meta (owned by meta->owner) from an offset in its owner's pool
 * into (source index, offset inside that source). */
int ckpt__sources_locate(const ckpt__sources_t *s, const ckpt_tensor_meta_t *meta,
                         ckpt__place_t *place);
uint64_t ckpt__sources_size(const ckpt__sources_t *s, size_t index);
/* 1 when no rank has more than one region among the sources. */
int ckpt__sources_one_per_rank(const ckpt__sources_t *s);

#endif
