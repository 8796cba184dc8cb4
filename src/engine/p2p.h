/* P2P (p2p.c): the serving side (e->serving, whose definition is in p2p.c: UCX, the guard
 * page, pools from UCX; checkpoints exported at a guard slot) and the pulling side's view of
 * a serving deployment (ckpt__p2p_t). */
#ifndef CKPT_ENGINE_P2P_H
#define CKPT_ENGINE_P2P_H

#include "format/metas_file.h"
#include "comm/ucx.h"
#include "engine/engine_internal.h"
#include "plan/bucket.h"

typedef struct ckpt__p2p {
    ckpt__metas_t metas;
    /* The pulling side's own UCX context: single-threaded and polled by this rank only.
     * The serving context (e->ucx) runs a progress thread under a lock; pulling through
     * it made that thread spin on the lock against every get (perf: pthread_spin_lock). */
    ckpt__ucx_t *ucx;
    ckpt__ucx_peer_t **peers;  /* per serving rank: guard reads, peer-failure handling */
    ckpt__ucx_peer_t **data;   /* per serving rank: pool reads, every transport */
    ckpt__ucx_rkey_t ***rkeys; /* per serving rank and region */
    char *pools_ready;         /* per serving rank: pool keys unpacked (after a guard check) */
    ckpt__ucx_get_t *gets;     /* scratch, sized for the largest bucket */
    size_t gets_cap;
    ckpt__ucx_mem_t *local[2]; /* the IPC buffers, registered for zero-copy gets */
    int nlocal;
    double pull_s;             /* time this rank spent pulling */
    uint64_t pull_bytes;
    long npulls;               /* buckets this rank pulled in this update */
    long test_pause_after;     /* CKPT_TEST_P2P_PAUSE (p2p.c); 0: off */
    char test_pause_path[512];
} ckpt__p2p_t;

/* Decodes metas (fully validated) and prepares UCX. Local, not collective. */
int ckpt__p2p_open(ckpt_engine_t *e, const void *bytes, size_t len, ckpt__p2p_t **out);
void ckpt__p2p_close(ckpt_engine_t *e, ckpt__p2p_t *p);
/* The serving deployment's tensors as metas: owner = serving rank, reserved = region,
 * offset = offset inside that region. Caller frees with ckpt__free. */
int ckpt__p2p_tensors(const ckpt__p2p_t *p, ckpt_tensor_meta_t **out, size_t *count_out);
/* Connects to serving rank `owner` and checks that it still exports this name and version
 * (its guard slot); CKPT_ESTATE names the mismatch. */
int ckpt__p2p_check(ckpt_engine_t *e, ckpt__p2p_t *p, int owner, int timeout_ms);
/* Registers this rank's IPC buffers with UCX (done once per update). */
int ckpt__p2p_register_buffers(ckpt_engine_t *e, ckpt__p2p_t *p);
/* Pulls `count` tensors of serving rank `owner` (t[i].offset = bucket offset, src[i] =
 * region and offset in it) into buf, then re-checks the guard so a checkpoint
 * unregistered during the transfer is never delivered. */
int ckpt__p2p_pull(ckpt_engine_t *e, ckpt__p2p_t *p, int owner, const ckpt_tensor_meta_t *t,
                   const ckpt__place_t *src, size_t count, void *buf, int timeout_ms);

/* Collective: exports checkpoint `name`; rank 0 gets the metas bytes (ckpt__free them). */
int ckpt__p2p_export(ckpt_engine_t *e, const ckpt__cmd_t *cmd, char **bytes_out,
                     size_t *len_out);
/* Drops the export of a checkpoint before it is unregistered (guard first). */
void ckpt__p2p_unexport(ckpt_engine_t *e, ckpt__checkpoint_entry_t *c);
/* Drops every export; then the store can go, then ckpt__p2p_shutdown (pools made by UCX
 * must be freed before its context). */
void ckpt__p2p_unexport_all(ckpt_engine_t *e);
void ckpt__p2p_shutdown(ckpt_engine_t *e);
/* The serving state (e->serving), at create: pools from UCX unless opts.ucx_pools is 0. */
int ckpt__p2p_init(ckpt_engine_t *e);
/* The store's pool allocator: UCX shared memory (ckpt_engine_options_t.ucx_pools). */
ckpt_pool_allocator_t ckpt__p2p_pool_allocator(ckpt_engine_t *e);

#endif
