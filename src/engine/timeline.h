/* The timeline of one update: per bucket and rank, start and end of each stage, written
 * as Chrome trace JSON (opens in Perfetto / chrome://tracing) so the overlap can be seen. */
#ifndef CKPT_ENGINE_TIMELINE_H
#define CKPT_ENGINE_TIMELINE_H

#include "engine/engine_internal.h"

typedef enum {
    CKPT__EV_STAGE = 0, /* owner copies the bucket from its pool into the IPC buffer (on a
                           GPU: the H2D copies, timed by device events) */
    CKPT__EV_BCAST,     /* host leaders broadcast the buffer between groups (on a device:
                           the broadcast to every rank, NCCL's on a GPU) */
    CKPT__EV_READY,     /* group barrier: the buffer is complete for every local rank */
    CKPT__EV_RELOAD,    /* the worker copies what it needs (bucket sent -> ack) */
    CKPT__EV_AGREE,     /* every rank learns whether every worker succeeded */
    CKPT__EV_RELOAD_IN_PLACE, /* the worker copies what it needs of a bucket its host reads
                                 in the owner's pool (routed across hosts) */
    CKPT__EV_KINDS
} ckpt__event_kind_t;

typedef struct ckpt__event {
    int32_t bucket;
    int32_t kind;
    double t0, t1;  /* seconds since the update's common start */
    uint64_t bytes; /* what the span moved, where counted (trace args: "bytes") */
} ckpt__event_t;

typedef struct ckpt__timeline {
    ckpt__event_t *events;
    size_t count, cap;
    double origin; /* local clock at the common start (after a barrier) */
} ckpt__timeline_t;

int ckpt__timeline_init(ckpt__timeline_t *tl, size_t cap);
void ckpt__timeline_free(ckpt__timeline_t *tl);
/* Records [t0, now]; no allocation (capacity fixed when the update is planned). */
void ckpt__timeline_add(ckpt__timeline_t *tl, int bucket, int kind, double t0);
/* Records [t0, t1] (times the caller measured or derived, e.g. from device events). */
void ckpt__timeline_span(ckpt__timeline_t *tl, int bucket, int kind, double t0, double t1);
/* The bytes the last event added moved. */
void ckpt__timeline_bytes(ckpt__timeline_t *tl, uint64_t bytes);
/* Collective: gathers every rank's events to rank 0, which writes the JSON to path. */
int ckpt__timeline_write(ckpt_engine_t *e, ckpt__timeline_t *tl, const char *path,
                         const char *label, int timeout_ms);

#endif
