/* The state of one update (update.c) and of the sources that fill its buckets
 * (source.h): a file that adds a source reads what it needs from here. Also the update's
 * entry points, which the command stream (command.c) and publishing (publish.c) call: the
 * broadcast update, the P2P update and the workers' preparation after a registration. */
#ifndef CKPT_ENGINE_UPDATE_H
#define CKPT_ENGINE_UPDATE_H

#include "engine/engine_internal.h"
#include "engine/needs.h"
#include "engine/p2p.h"
#include "engine/route.h"
#include "engine/sources.h"
#include "engine/timeline.h"
#include "ipc/wire.h"
#include "plan/bucket.h"

struct ckpt__source_ops;

typedef struct ckpt__update {
    ckpt_engine_t *e;
    const ckpt__cmd_t *cmd;
    ckpt_update_result_t *res;
    ckpt_bucket_plan_t plan;
    ckpt__timeline_t tl;
    const void **local_data; /* per store index: address of a local tensor's bytes */
    int worker_begun;
    double sent_at;
    size_t sent_id;          /* the bucket the worker was last handed (send_bucket) */
    int sent_in_place;       /* ... and it reads that one in the owner's pool */
    uint64_t worker_bytes;   /* bytes of the records this rank's worker was handed */
    uint64_t sent_bytes;     /* ... in the last bucket it was handed */
    /* Routed across hosts with buckets read in place by their owner's host: the pipeline's
     * steps are the buckets that move (`order`); a worker that needs none of a step's
     * bucket reads one of its host's own (`own`) meanwhile, and the step's bucket is
     * `owed`, sent empty at the end with the other hosts' own buckets. Without such
     * buckets `order` is every bucket and the rest is empty. */
    struct {
        size_t *order, n;
        size_t *own, nown, own_next;
        size_t *owed, nowed;
        size_t nlocal;       /* buckets read in place, by any host */
    } steps;
    int direct;              /* workers read the owners' pools: no stage, no broadcast */
    const struct ckpt__source_ops *src; /* where the buckets' bytes come from (source.h) */
    struct ckpt__sink *sink; /* where they go on a device (sink.h); NULL: host buffers */
    double stage_s;          /* device: GPU time of this rank's puts (H2D) */
    uint64_t stage_bytes;
    double enqueued[2][2];   /* device: per slot, when the owner's fill began and ended */
    int coll_ms;             /* waits for other ranks: ckpt__peer_timeout_ms(timeout) */
    struct {                 /* host path, per buffer: its bucket's transfer between hosts */
        MPI_Request req[4];  /* started by post_bucket, waited for by finish_bucket */
        int nreq;
        double t0;
    } moving[CKPT__HOST_BUFFERS_MAX];
    ckpt__sources_t sources; /* direct: every pool region of this host, opened */
    ckpt__p2p_t *p2p;        /* P2P: the serving deployment buckets are pulled from */
    int32_t *src_owner;      /* P2P: per bucket, the serving rank that holds it */
    const ckpt_tensor_meta_t *manifest; /* every tensor of the update, sent with BEGIN */
    size_t nmanifest;
    int worker_pid;          /* of the worker BEGIN went to (kept after a drop) */
    ckpt__needs_t needs;     /* what the workers declared they need (needs.c) */
    ckpt__route_t route;     /* which hosts each bucket goes to (route.c) */
    uint8_t *wanted;         /* declared needs: per planned tensor, this worker needs it */
    ckpt_tensor_meta_t *records; /* a bucket's records this worker needs (declared needs) */
    size_t records_cap;
    ckpt__ipc_part_t *parts; /* which part of its tensor each record holds (tensors cut) */
    size_t parts_cap;
    int isolated;            /* isolate: this rank's worker is out of the update */
    int isolated_status;
    char isolated_reason[CKPT__REASON_MAX];
} ckpt__update_t;

/* Copies len bytes of host memory into the bucket buffer at dst: a device put on a device
 * (asynchronous), else a plain copy. */
int ckpt__update_put(ckpt__update_t *u, char *dst, const void *src, size_t len);

/* The route's piece planned tensor k is (routed staged updates), else NULL. */
static inline const ckpt__piece_t *ckpt__planned_piece(const ckpt__update_t *u, size_t k)
{
    if (!u->route.active || u->direct || !u->plan.origin) return NULL;
    return &u->route.pieces[u->plan.origin[k]];
}

/* The broadcast update (update.c). */
int ckpt__update_run(ckpt_engine_t *e, const ckpt__cmd_t *cmd, const char *trace_path,
                     ckpt_update_result_t *result);

/* A P2P update: the broadcast pipeline with pulls as its stage step (update.c). */
int ckpt__update_run_p2p(ckpt_engine_t *e, const ckpt__cmd_t *cmd, const void *metas,
                         size_t metas_len, const char *trace_path, ckpt_update_result_t *res);

/* Collective, after a registration: on one host (direct updates), hands every worker the
 * pools now so that its first update does not pay for mapping them. Best effort. */
void ckpt__prepare_workers(ckpt_engine_t *e, const ckpt__cmd_t *cmd);

#endif
