/*
 * Receiver API: what an inference worker (vLLM / SGLang worker, ckpt-worker) needs to take
 * a weight update from its local engine rank. Plain C types, opaque handle, arrays of plain
 * structs: callable from Python through ctypes. Protocol details: docs/PROTOCOL.md.
 *
 *     ckpt_receiver_connect(path, -1, &r);                    // waits for the engine
 *     for (;;) {
 *         ckpt_receiver_wait_update(r, -1, &info);            // BEGIN: buffers mapped
 *         for (;;) {
 *             ckpt_receiver_next(r, t, &ev, &bucket, &views, &n);
 *             if (ev == CKPT_RECV_BUCKET) {                   // views[i].data: zero copy
 *                 ... copy what you need (ckpt_receiver_verify if info.verify) ...
 *                 ckpt_receiver_ack(r);                        // or ckpt_receiver_fail(r, "why")
 *             } else if (ev == CKPT_RECV_FINISH) {            // every rank succeeded
 *                 ... post-processing ...
 *                 if (ckpt_receiver_finish_reply(r, 1, NULL) == 0)  // waits for COMMIT
 *                     ... the update is complete: serve the new weights ...
 *                 break;
 *             } else break;                                    // CKPT_RECV_ABORT: incomplete
 *         }
 *     }
 *
 * Any call may return CKPT_EPEER (the engine went away; the update in progress, if any, is
 * incomplete; close and reconnect) or CKPT_ETIMEDOUT (nothing arrived in time; the state is
 * unchanged and the call may be repeated). The handle is not thread-safe.
 */
#ifndef CKPT_RECEIVER_H
#define CKPT_RECEIVER_H

#include "ckpt/ckpt.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct ckpt_receiver ckpt_receiver_t;

/* Connects to the engine rank's socket, retrying while it does not exist yet or refuses
 * (the engine may start after the worker, or be restarting after a crash) until timeout_ms,
 * or forever when timeout_ms < 0: the one unbounded wait a worker should make, while it is
 * idle and serving its current weights (waits inside an update are always bounded). Retries
 * back off to 500 ms; a warning is logged after 1 s of waiting and once a minute after. */
CKPT_API int ckpt_receiver_connect(const char *socket_path, int timeout_ms,
                                   ckpt_receiver_t **out);
/* Closes the connection and unmaps the buffers. NULL is a no-op. */
CKPT_API void ckpt_receiver_close(ckpt_receiver_t *r);

typedef struct {
    uint64_t update_id;
    uint64_t version;
    char name[CKPT_NAME_MAX]; /* checkpoint name */
    uint32_t nbuckets;
    int32_t verify;           /* the engine asks the worker to verify checksums */
    /* 1: the buffers keep this update's bytes until FINISH/ABORT (a direct update reads the
     * owners' pools), so views of an acknowledged bucket stay valid until then; 0: the
     * engine refills a buffer once its bucket is acknowledged. */
    int32_t stable;
    /* 1: the engine marked the update partial (a subset of the model on purpose): the
     * manifest check only asks that its tensors exist in the model and match. */
    int32_t partial;
    uint32_t manifest_count;  /* tensors in the update's manifest */
} ckpt_update_info_t;

/* The worker's model, optional: name, dtype and shape of every tensor it holds (offset,
 * checksum, owner ignored; nbytes is used when dtype is CKPT_DTYPE_INVALID = "unknown":
 * then only shape and nbytes are compared; with ndim -1 as well, only nbytes, for workers
 * that hold flat byte buffers). When set, wait_update checks each update's manifest before answering READY: every model tensor must be in the manifest with the
 * same dtype and shape (PARTIAL updates: only the tensors present), and every manifest
 * tensor must be in the model. A mismatch is answered ERR to the engine, which fails the
 * update before any byte lands, and returned as CKPT_EINVAL naming up to 4 missing or
 * mismatched tensors and the counts; the worker's state is unchanged. The metas are
 * copied; count 0 clears the model (no check). */
CKPT_API int ckpt_receiver_set_model(ckpt_receiver_t *r, const ckpt_tensor_meta_t *metas,
                                     size_t count);
/* The current (or last) update's manifest, for workers that check it themselves: *metas
 * valid until the next wait_update or close (offset 0, owner -1). */
CKPT_API int ckpt_receiver_manifest(ckpt_receiver_t *r, const ckpt_tensor_meta_t **metas_out,
                                    size_t *count_out);

/* What a worker needs of one tensor (ckpt_receiver_declare_need): the whole tensor
 * (dim = -1, start = length = 0) or `length` indices from `start` along dimension `dim`
 * (rows of dim 0 for a column-parallel linear, columns of dim 1 for a row-parallel one). */
typedef struct {
    char name[CKPT_NAME_MAX];
    int32_t dim;
    int32_t reserved; /* 0 */
    uint64_t start;
    uint64_t length;
} ckpt_need_decl_t;

/* Tells the engine which tensors this worker needs, between updates (protocol version 4,
 * message NEED; not answered). From the next update on, the engine sends the worker only
 * buckets' records of these tensors, checks that every tensor of a checkpoint is needed by
 * some worker (an update of a tensor nobody needs fails before any byte moves, unless asked
 * with unneeded=ignore, which leaves such tensors out), and counts the bytes each worker
 * needs. A worker that declares nothing needs every tensor (the default); count 0 declares
 * that it needs none. A later call replaces the declaration; a new connection starts
 * undeclared. The records are checked here first (CKPT_EINVAL: a name given twice, a
 * dimension outside -1..7, an empty range); whether ranges fit the tensors is checked by
 * the engine at the update. CKPT_ESTATE during an update. */
CKPT_API int ckpt_receiver_declare_need(ckpt_receiver_t *r, const ckpt_need_decl_t *needs,
                                        size_t count);

/* What the worker's weights are (ckpt_receiver_state): */
#define CKPT_RECV_STATE_NONE 0       /* no update took effect yet (version 0) */
#define CKPT_RECV_STATE_UPDATING 1   /* an update is applying buckets: weights may be mixed;
                                        version = the last consistent one (0: none) */
#define CKPT_RECV_STATE_CONSISTENT 2 /* the last update committed: every tensor at version */
#define CKPT_RECV_STATE_INCOMPLETE 3 /* an update failed after buckets landed: weights mixed
                                        since `version` (the last consistent one, 0: none) */
/* The worker's state, version and the id of the update that set it (any output may be
 * NULL). An inference engine refuses to serve unless the state is CONSISTENT (or NONE
 * with its own weights). The reason of INCOMPLETE: ckpt_receiver_reason(). An update that
 * ends before any bucket was handed out (refused, aborted early) leaves the state as it
 * was. */
CKPT_API int ckpt_receiver_state(ckpt_receiver_t *r, int *state_out, uint64_t *version_out,
                                 uint64_t *update_id_out);

/* Waits (timeout_ms < 0: forever) for the engine to begin an update, maps its buffers
 * read-only and answers READY. A refusal by the engine (another worker holds the socket,
 * wrong uid) is CKPT_EBUSY with the engine's text. */
CKPT_API int ckpt_receiver_wait_update(ckpt_receiver_t *r, int timeout_ms,
                                       ckpt_update_info_t *info_out);

/* One tensor of a bucket. `data` points into the engine's shared buffer (zero copy), valid
 * until ckpt_receiver_ack / ckpt_receiver_fail; meta.offset is its offset in that buffer.
 *
 * A part (part_dim >= 0): only indices [part_start, part_start + meta.shape[part_dim]) of
 * dimension part_dim of the tensor, packed row-major; meta describes the part (its shape,
 * nbytes; checksum 0) and part_full is the whole tensor's extent along part_dim. Only a
 * worker that declared a slice of the tensor (ckpt_receiver_declare_need) is sent parts:
 * across hosts the engine cuts a tensor whose slices different hosts need, so each host
 * receives only its part (never with verify, whose checksums cover whole tensors). A
 * declared slice may come as several parts, in one bucket or several: copy each with
 * ckpt_receiver_copy_slice. */
typedef struct {
    ckpt_tensor_meta_t meta;
    const void *data;    /* in the memory `memory` says */
    int32_t part_dim;    /* -1: the whole tensor */
    int32_t memory;      /* CKPT_MEMORY_*: where data lies */
    uint64_t part_start; /* first index along part_dim */
    int64_t part_full;   /* the whole tensor's extent along part_dim */
} ckpt_tensor_view_t;

/* Where a view's data lies (ckpt_tensor_view_t.memory), as the engine rank handed its
 * buffers at BEGIN:
 *   HOST  host memory shared with the engine rank (the CPU path).
 *   CUDA  device memory of the engine rank's GPU, opened through CUDA IPC: data is a device
 *         pointer valid in this process on the device current at BEGIN (one engine rank
 *         per GPU; the worker runs on the same GPU; $CKPT_CUDA_DEVICE, when set, is made
 *         current before the handle is opened). Copy it with cudaMemcpy / a framework's
 *         device copy; ckpt_receiver_copy, copy_slice and verify accept it too (through the
 *         CUDA runtime, synchronously; verify copies the tensor to the host to hash it).
 *   SIM   the GPU path run on a CPU (the engine's --device sim, for tests): a rank's own
 *         buffer stands in for device memory; data is host memory. */
#define CKPT_MEMORY_HOST 0
#define CKPT_MEMORY_CUDA 1
#define CKPT_MEMORY_SIM 2

/* Events of ckpt_receiver_next. */
#define CKPT_RECV_BUCKET 1 /* answer with ckpt_receiver_ack or ckpt_receiver_fail */
#define CKPT_RECV_FINISH 2 /* run the post-hook, answer with ckpt_receiver_finish_reply */
#define CKPT_RECV_ABORT 3  /* already answered; reason: ckpt_receiver_reason() */

/* Next event of the update in progress. For CKPT_RECV_BUCKET: *bucket_out, *views_out and
 * *count_out describe the bucket (the array is owned by the receiver, valid until the
 * answer). For FINISH and ABORT they are set to 0 / NULL / 0. A malformed BUCKET (a tensor
 * outside the buffer, bad dtype) is answered with an error by the receiver itself and
 * returned as CKPT_EPROTO. */
CKPT_API int ckpt_receiver_next(ckpt_receiver_t *r, int timeout_ms, int *event_out,
                                uint32_t *bucket_out, const ckpt_tensor_view_t **views_out,
                                size_t *count_out);
/* XXH3-64 of view->data against view->meta.checksum: CKPT_ECHECKSUM naming the tensor when
 * they differ (a checksum of 0 means "not computed" and passes). */
CKPT_API int ckpt_receiver_verify(const ckpt_tensor_view_t *view);

/* Copies bytes [offset, offset + len) of the tensor into dst (a tensor-parallel worker
 * copies only its slice). With verify, it also checks the whole tensor's XXH3-64 against
 * meta.checksum in the same pass: each chunk of the range is hashed from the buffer (which
 * brings it into cache) and then copied to dst with non-temporal stores, so verification
 * adds little to the copy. dst needs no particular alignment. On CKPT_ECHECKSUM the
 * copied bytes are already in dst: the update is incomplete and the worker must say so. */
CKPT_API int ckpt_receiver_copy(const ckpt_tensor_view_t *view, uint64_t offset, void *dst,
                                uint64_t len, int verify);
/* Copies what the view holds of indices [start, start + length) of dimension dim of the
 * tensor into dst, which holds exactly those indices, packed row-major (a TP worker's
 * shard: its rows, dim 0, or its columns, dim 1). The view may be the whole tensor or a
 * part along the same dimension; indices the view does not hold are left as they are.
 * Returns how many indices along dim were copied (0 when the view and the slice do not
 * meet), or CKPT_EINVAL for a dimension or range outside the tensor or a part along
 * another dimension. */
CKPT_API int64_t ckpt_receiver_copy_slice(const ckpt_tensor_view_t *view, int dim,
                                          uint64_t start, uint64_t length, void *dst);
/* Answers the current bucket: OK. */
CKPT_API int ckpt_receiver_ack(ckpt_receiver_t *r);
/* Answers the current bucket with an error; `message` names the cause (the engine reports
 * it). The engine then aborts the update. */
CKPT_API int ckpt_receiver_fail(ckpt_receiver_t *r, const char *message);
/* Same with the status the engine should see (e.g. CKPT_ECHECKSUM); fail() sends CKPT_EIO. */
CKPT_API int ckpt_receiver_fail_status(ckpt_receiver_t *r, int status, const char *message);
/* Answers FINISH after the post-hook (ok = 1; ok = 0 reports `message` to the engine) and
 * waits for the engine's decision: every rank collects every worker's answer, then sends
 * COMMIT (all succeeded) or ABORT. Returns 0 on COMMIT: the update is complete (state
 * CONSISTENT). CKPT_ECANCELED on ABORT (another worker's post-hook failed or it died), on
 * ok = 0, when the engine went away, or when no decision came within the receiver's
 * decision timeout (120 s, see finish_reply_timeout): the state is INCOMPLETE and
 * ckpt_receiver_reason() says why. Connection loss and timeouts also close the connection
 * (reconnect). */
CKPT_API int ckpt_receiver_finish_reply(ckpt_receiver_t *r, int ok, const char *message);
/* The same with an explicit bound on the wait for COMMIT/ABORT (timeout_ms < 0: forever). */
CKPT_API int ckpt_receiver_finish_reply_timeout(ckpt_receiver_t *r, int ok, const char *message,
                                                int timeout_ms);

/* The last update this receiver saw (in progress, or the one before): *completed_out is 1
 * only when the engine committed it (COMMIT after the FINISH answer); 0 while it runs, after an ABORT, a failure or a lost
 * engine. CKPT_ENOENT before the first update. */
CKPT_API int ckpt_receiver_last_update(ckpt_receiver_t *r, ckpt_update_info_t *info_out,
                                       int *completed_out);
/* Why the last update is incomplete ("" when complete or still running); valid until the
 * next call on r. */
CKPT_API const char *ckpt_receiver_reason(ckpt_receiver_t *r);
/* The connection's fd, for the worker's own poll loop (readable = a message is coming). */
CKPT_API int ckpt_receiver_fd(ckpt_receiver_t *r);

#ifdef __cplusplus
}
#endif

#endif /* CKPT_RECEIVER_H */
