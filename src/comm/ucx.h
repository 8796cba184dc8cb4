/*
 * UCX one-sided transfer layer for the P2P update (DESIGN.md §3).
 *
 * The serving side registers its host pool regions, publishes its worker address and the
 * packed remote keys (see metas_file.h), and runs a progress thread so that transports
 * which emulate RMA in software (TCP, shared memory without a registered segment) answer
 * gets while its MPI ranks are busy elsewhere. The pulling side connects to each owner by
 * worker address and reads ranges straight out of the owners' pools with ckpt__ucx_get_batch.
 *
 * Threading: a ckpt__ucx_t is driven by one thread at a time, except that with
 * progress_thread set its worker is created in multi-thread mode and the progress thread
 * runs alongside the caller. Everything returns 0 or a negative CKPT_E* status with the
 * thread's last-error text naming the peer, range or call that failed.
 */
#ifndef CKPT_COMM_UCX_H
#define CKPT_COMM_UCX_H

#include <stddef.h>
#include <stdint.h>

#include "core/internal.h"

typedef struct ckpt__ucx ckpt__ucx_t;           /* a UCP context and one worker */
typedef struct ckpt__ucx_mem ckpt__ucx_mem_t;   /* a registered memory range */
typedef struct ckpt__ucx_peer ckpt__ucx_peer_t; /* an endpoint to a remote worker */
typedef struct ckpt__ucx_rkey ckpt__ucx_rkey_t; /* a remote key unpacked for one peer */

typedef struct ckpt__ucx_options {
    uint64_t field_mask;  /* reserved for growth; set 0 */
    int progress_thread;  /* 1: this side serves gets; enables wakeup and thread-safe worker */
    size_t chunk_size;    /* gets larger than this are split (0: CKPT__UCX_CHUNK_DEFAULT) */
    int spin_us;          /* progress thread polls this long after the last event before it
                           * sleeps on the worker fd (0: CKPT__UCX_SPIN_US_DEFAULT, -1: none) */
    int shared_alloc;     /* 1: ckpt__ucx_mem_alloc_shared allocates from UCX's POSIX shared
                           * memory (UCX_ALLOC_PRIO=md:posix for this context) */
} ckpt__ucx_options_t;

#define CKPT__UCX_CHUNK_DEFAULT (8u << 20)
#define CKPT__UCX_INFLIGHT_DEFAULT 8
#define CKPT__UCX_SPIN_US_DEFAULT 2000
#define CKPT__UCX_OPTIONS_INIT {0, 0, 0, 0, 0}

/* Creates the context (RMA, plus WAKEUP when serving) and its worker. Transports come from
 * the environment (UCX_TLS), read here, so set it before calling. opts may be NULL. */
CKPT_HIDDEN int ckpt__ucx_create(const ckpt__ucx_options_t *opts, ckpt__ucx_t **out);
/* Stops the progress thread, closes remaining peers, releases registrations and the
 * context. NULL is ignored. */
CKPT_HIDDEN void ckpt__ucx_destroy(ckpt__ucx_t *ucx);
/* The address to publish: the worker's UCX address behind this process's identity (pid,
 * start time, pid namespace, boot id), which lets a peer on the same host tell that this
 * process died where the transport cannot (ucx_addr.c). Owned by ucx, valid until
 * ckpt__ucx_destroy; only ckpt__ucx_connect reads it. */
CKPT_HIDDEN int ckpt__ucx_address(ckpt__ucx_t *ucx, const void **addr_out, size_t *len_out);

/* Registers existing memory [base, base+len) (no allocation, no copy) for remote access
 * and as a zero-copy destination. Unregister before the memory goes away. */
CKPT_HIDDEN int ckpt__ucx_mem_register(ckpt__ucx_t *ucx, void *base, size_t len,
                                       ckpt__ucx_mem_t **mem_out);
/* Allocates len bytes of shared memory through UCX (ucp_mem_map with ALLOCATE; needs
 * options.shared_alloc) and returns, besides the registration, a new fd (close-on-exec,
 * the caller's) that maps the same pages, so local processes can map it as they map a
 * memfd. Why: UCX 1.13 serves gets on memory it did not allocate by emulating them with
 * active messages (the target copies every byte into a FIFO, the caller copies it out,
 * and the target's progress thread must run); on memory from its shared-memory
 * allocator the caller reads the mapped segment itself (one copy, the target idle).
 * CKPT_EUNSUPPORTED when UCX's allocation is not a shared mapping with an fd here (e.g.
 * UCX_TLS without shared memory): the caller then uses its own memory and registers it.
 * Freed by ckpt__ucx_mem_unregister. */
CKPT_HIDDEN int ckpt__ucx_mem_alloc_shared(ckpt__ucx_t *ucx, size_t len, ckpt__ucx_mem_t **mem_out,
                                           int *fd_out);
CKPT_HIDDEN void *ckpt__ucx_mem_base(const ckpt__ucx_mem_t *mem);
/* 1 when UCX allocated the memory (ckpt__ucx_mem_alloc_shared): unregistering frees it. */
CKPT_HIDDEN int ckpt__ucx_mem_allocated(const ckpt__ucx_mem_t *mem);
/* The registration made by ckpt__ucx_mem_alloc_shared whose memory starts at base, or NULL. */
CKPT_HIDDEN ckpt__ucx_mem_t *ckpt__ucx_mem_find_allocated(ckpt__ucx_t *ucx, const void *base);
CKPT_HIDDEN void ckpt__ucx_mem_unregister(ckpt__ucx_t *ucx, ckpt__ucx_mem_t *mem);
/* Packs the remote key of a registration; *buf_out is released with ckpt__free. */
CKPT_HIDDEN int ckpt__ucx_rkey_pack(ckpt__ucx_t *ucx, const ckpt__ucx_mem_t *mem,
                                    void **buf_out, size_t *len_out);

/* Starts / stops the serving progress thread (requires options.progress_thread). The
 * thread sleeps on the worker's event fd when idle (ucp_worker_arm), so an idle server
 * costs no CPU. Stop is idempotent. */
CKPT_HIDDEN int ckpt__ucx_progress_start(ckpt__ucx_t *ucx);
CKPT_HIDDEN void ckpt__ucx_progress_stop(ckpt__ucx_t *ucx);

/* Connects to a remote worker by its published address (ckpt__ucx_address; a bare UCX
 * worker address is taken too). `rank` only names the peer in error texts. A peer on this
 * host is watched through a pidfd: CKPT_EPEER here when its process is already gone, and
 * from ckpt__ucx_get_batch as soon as it exits, whatever the transport.
 * peer_errors = 1: with peer-failure handling where the transports have it, so a dead
 * peer fails requests instead of leaving them to the batch timeout. But UCX 1.13 then
 * leaves out every transport that cannot detect a dead peer, shared memory among them: with
 * TCP also enabled (UCX's default) same-host gets went over TCP, 0.54 GB/s against 6.0
 * (`bench ucx-get` without UCX_TLS). peer_errors = 0: every transport, as ucx_perftest
 * connects; a dead peer then shows as a timeout. Bulk data wants 0, liveness checks 1. */
CKPT_HIDDEN int ckpt__ucx_connect(ckpt__ucx_t *ucx, const void *addr, size_t len, int rank,
                                  int peer_errors, ckpt__ucx_peer_t **peer_out);
/* Flushes and closes the endpoint (forcefully if the peer failed), bounded by timeout_ms
 * (<= 0: 5 s). Releases the rkeys still unpacked for it. NULL is ignored. */
CKPT_HIDDEN void ckpt__ucx_disconnect(ckpt__ucx_peer_t *peer, int timeout_ms);
/* Nonzero once the peer failed (error handler ran or a forced close after a timeout). */
CKPT_HIDDEN int ckpt__ucx_peer_failed(const ckpt__ucx_peer_t *peer);

/* Unpacks a packed remote key for use with this peer's endpoint. */
CKPT_HIDDEN int ckpt__ucx_rkey_unpack(ckpt__ucx_peer_t *peer, const void *packed, size_t len,
                                      ckpt__ucx_rkey_t **rkey_out);
CKPT_HIDDEN void ckpt__ucx_rkey_destroy(ckpt__ucx_rkey_t *rkey);
/* When the peer's memory is reachable by a local mapping (UCX shared-memory segments, see
 * ckpt__ucx_mem_alloc_shared), fills this process's page tables for [remote_addr, +len)
 * now, so that later gets do not take a page fault per 4 KiB. Returns 1 when it did, 0
 * when the range is not mapped here (nothing to do). */
CKPT_HIDDEN int ckpt__ucx_rkey_prefault(ckpt__ucx_rkey_t *rkey, uint64_t remote_addr, size_t len);

/* One range to read: len bytes at remote_addr (covered by rkey on peer) into dst. local is
 * the registration covering dst, or NULL (UCX then registers or bounces as it sees fit). */
typedef struct ckpt__ucx_get {
    ckpt__ucx_peer_t *peer;
    ckpt__ucx_rkey_t *rkey;
    uint64_t remote_addr;
    void *dst;
    size_t len;
    ckpt__ucx_mem_t *local;
} ckpt__ucx_get_t;

/* Reads every range, split into chunks of options.chunk_size, keeping at most
 * max_in_flight chunks outstanding (<= 0: CKPT__UCX_INFLIGHT_DEFAULT) over all peers, so
 * ranges of different peers proceed concurrently. Completion is driven by polling this
 * worker; the whole batch is bounded by timeout_ms (<= 0: no bound). On a failure every
 * outstanding chunk is completed or aborted before return (dst may then be partly
 * written): CKPT_EPEER names the failed (or exited) rank, CKPT_ETIMEDOUT the rank still
 * pending (alive, or on another host over a transport that cannot tell). */
CKPT_HIDDEN int ckpt__ucx_get_batch(ckpt__ucx_t *ucx, const ckpt__ucx_get_t *gets, size_t n,
                                    int max_in_flight, int timeout_ms);

#endif /* CKPT_COMM_UCX_H */
