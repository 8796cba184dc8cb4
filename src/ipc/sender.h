/*
 * Engine side of the engine <-> worker protocol (docs/PROTOCOL.md). One engine rank serves
 * one inference worker over a Unix socket. Internal to the engine: not exported by
 * libckpt.so; engine code links the static archive.
 *
 * An update, as the engine drives it:
 *     ckpt_ipc_server_wait_worker(srv, t)          a worker is connected (accepts one if not)
 *     ckpt_ipc_begin(srv, &begin, t)               BEGIN + buffer fds, waits READY
 *     for each bucket b:
 *         (fill buffer b % 2, or point metas into a pool region)
 *         ckpt_ipc_send_bucket(srv, b, buffer, metas, n)  returns once sent
 *         (fill the other buffer with b + 1 while the worker reloads b)
 *         ckpt_ipc_wait_ack(srv, t)                0, or the worker's error / EPEER / ETIMEDOUT
 *     ckpt_ipc_finish(srv, commit, reason, t)      FINISH (all ranks succeeded) or ABORT
 *
 * At most one bucket is outstanding. Errors: CKPT_EPEER (worker gone; the connection is
 * dropped), CKPT_ETIMEDOUT (see wait_ack), CKPT_EPROTO (garbage from the worker; dropped),
 * or the worker's own status with its text in ckpt_last_error(). After any failure the
 * engine calls ckpt_ipc_finish(srv, 0, reason, t) (or the connection is dropped); either
 * leaves the server ready for the next update: ckpt_ipc_server_wait_worker accepts the
 * reconnecting worker.
 */
#ifndef CKPT_IPC_SENDER_H
#define CKPT_IPC_SENDER_H

#include <stddef.h>
#include <stdint.h>

#include "ckpt/ckpt.h"
#include "ipc/wire.h" /* CKPT_IPC_MAX_BUFFERS */

#pragma GCC visibility push(hidden)

typedef struct ckpt_ipc_server ckpt_ipc_server_t;

/* Creates the socket at `socket_path` (mode 0600; a stale socket file is replaced, any
 * other existing file is CKPT_EEXIST) and listens. Connections from another uid are
 * refused (SO_PEERCRED) with an error log naming the uid. */
int ckpt_ipc_server_open(const char *socket_path, ckpt_ipc_server_t **out);
/* Closes the worker connection and the socket, and unlinks the path. NULL is a no-op. */
void ckpt_ipc_server_close(ckpt_ipc_server_t *srv);
/* 0 when a live worker is connected: accepts one (waiting up to timeout_ms, < 0 = forever)
 * if none is. A connection found dead (EOF) or left in the middle of an update is dropped
 * first. CKPT_ETIMEDOUT when no worker came. */
int ckpt_ipc_server_wait_worker(ckpt_ipc_server_t *srv, int timeout_ms);
/* 1 when a worker connection is open (not probed for liveness), else 0. */
int ckpt_ipc_server_has_worker(ckpt_ipc_server_t *srv);
/* Without waiting: accepts a worker that is connecting and reads what an idle worker sent
 * (its NEED; EOF or anything else drops it). */
void ckpt_ipc_server_poll(ckpt_ipc_server_t *srv);
/* The connected worker's declared need (NEED): 1 with *need_out / *count_out (valid until
 * the next call on srv that reads from the worker, or a drop) when it declared one, 0 when
 * it did not (it needs everything) or none is connected. Read between updates by
 * wait_worker (and while waiting for any answer). */
int ckpt_ipc_server_need(ckpt_ipc_server_t *srv, const ckpt_need_decl_t **need_out,
                         uint32_t *count_out);
/* pid of the connected worker (SO_PEERCRED), -1 when none. */
int ckpt_ipc_server_worker_pid(ckpt_ipc_server_t *srv);
/* How long ckpt_ipc_send_bucket may block when the worker stops reading its socket
 * (default 10000 ms). A BUCKET message is sent whole or the connection is dropped. */
void ckpt_ipc_server_set_send_timeout(ckpt_ipc_server_t *srv, int timeout_ms);

typedef struct {
    uint64_t update_id;
    uint64_t version;
    const char *name;       /* checkpoint name, < CKPT_NAME_MAX bytes */
    uint32_t nbuckets;
    int verify;             /* ask the worker to verify checksums */
    int nbuffers;           /* 1 .. CKPT_IPC_MAX_BUFFERS: the IPC buffers and, on one host,
                               the pool regions of the local ranks */
    int buffer_fds[CKPT_IPC_MAX_BUFFERS]; /* memfd or /dev/shm fds, the first nbuffers used;
                                             the caller keeps them open */
    uint64_t buffer_sizes[CKPT_IPC_MAX_BUFFERS]; /* bytes the worker may read of each (> 0,
                                                    any value; the file may be larger) */
    /* CKPT_IPC_BUFFER_* (0, host memory, when left zeroed): a buffer of another kind has no
     * fd (buffer_fds[i] is ignored) but a handle the worker opens (wire.h). */
    uint32_t buffer_kinds[CKPT_IPC_MAX_BUFFERS];
    uint8_t buffer_handles[CKPT_IPC_MAX_BUFFERS][CKPT_IPC_HANDLE_BYTES];
    uint32_t max_tensors;   /* optional: most tensors in one bucket (0 = unknown); lets
                               both sides size their per-bucket arrays once */
    int stable;             /* the buffers keep their bytes until FINISH/ABORT (pools) */
    /* Every tensor of the update (name, dtype, shape, nbytes, checksum): the worker checks
     * it against its model before any byte lands. NULL/0 for PREPARE. */
    const ckpt_tensor_meta_t *manifest;
    size_t manifest_count;
    int partial;            /* the update carries a subset of the model on purpose */
} ckpt_ipc_begin_t;

/* Sends BEGIN with the buffer fds (SCM_RIGHTS) and waits for READY. Needs a connected
 * worker with no update in progress (CKPT_ESTATE otherwise). A worker ERR reply returns
 * its status with the text in ckpt_last_error() and keeps the connection. The answers of
 * earlier PREPAREs are read first; everything is waited for within timeout_ms in all. */
int ckpt_ipc_begin(ckpt_ipc_server_t *srv, const ckpt_ipc_begin_t *begin, int timeout_ms);
/* Sends BUCKET `bucket` for buffer `buffer` (< the update's nbuffers, CKPT_EINVAL
 * otherwise): tensors[i].offset is the offset in that buffer. Returns as soon as the message is in the socket; the worker's answer is collected
 * by ckpt_ipc_wait_ack. CKPT_ESTATE if an ack is still outstanding. */
/* Like ckpt_ipc_begin, but only has the worker map the buffers now (they are kept for the
 * next update that hands the same files); no update starts. Name and version are still
 * required. Asynchronous: it waits for no answer (registration never waits for a worker);
 * the worker's READY/ERR is read later, when the connection is probed (wait_worker) and at
 * the latest by the next ckpt_ipc_begin, within that call's timeout. Sending may block
 * 100 ms at most; CKPT_EBUSY (nothing sent) when 4 PREPAREs are still unanswered. */
int ckpt_ipc_prepare(ckpt_ipc_server_t *srv, const ckpt_ipc_begin_t *begin, int timeout_ms);
int ckpt_ipc_send_bucket(ckpt_ipc_server_t *srv, uint32_t bucket, int buffer,
                         const ckpt_tensor_meta_t *tensors, size_t count);
/* The same with parts: parts[i] says which part of its tensor record i holds (tensors[i]
 * then describes the part: shape, nbytes); parts NULL = every record whole. */
int ckpt_ipc_send_bucket_parts(ckpt_ipc_server_t *srv, uint32_t bucket, int buffer,
                               const ckpt_tensor_meta_t *tensors, const ckpt__ipc_part_t *parts,
                               size_t count);
/* Waits for the answer to the last bucket: 0 = OK; the worker's status (e.g.
 * CKPT_ECHECKSUM) with "worker ...: bucket 3: <its text>" in ckpt_last_error(); CKPT_EPEER
 * (dropped); CKPT_ETIMEDOUT when no answer came within timeout_ms: the ack stays
 * outstanding (call again to keep waiting, or give up with finish/drop). */
int ckpt_ipc_wait_ack(ckpt_ipc_server_t *srv, int timeout_ms);
/* Ends the update. commit = 1: FINISH (every rank succeeded; needs every ack collected,
 * CKPT_ESTATE otherwise), waits for the worker's post-hook answer (0, or its error); the
 * update then waits for the decision: ckpt_ipc_commit when every rank's worker answered
 * OK, else ckpt_ipc_finish(srv, 0, reason, t), which sends ABORT and waits for nothing
 * (a worker does not answer the decision). commit = 0: ABORT with
 * `reason`; an outstanding ack is collected (and ignored) first, unless wait_ack already
 * timed out on it: then the worker is dropped at once (CKPT_ETIMEDOUT) instead of being
 * waited for a second time. Whatever happens the
 * update is over afterwards; a worker that timed out or failed the protocol is dropped. */
int ckpt_ipc_finish(ckpt_ipc_server_t *srv, int commit, const char *reason, int timeout_ms);
/* After a FINISH answered (either way): COMMIT, the worker's update is complete. Not
 * answered. CKPT_ESTATE when no FINISH was answered. */
int ckpt_ipc_commit(ckpt_ipc_server_t *srv, int timeout_ms);
/* 1 when a FINISH was answered and the decision (commit / finish(0)) is still due. */
int ckpt_ipc_deciding(ckpt_ipc_server_t *srv);

#pragma GCC visibility pop

#endif /* CKPT_IPC_SENDER_H */
