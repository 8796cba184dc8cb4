/* Where a bucket's bytes go on the device path: the buffers the ranks' workers read, how the
 * owner's bytes get into its buffer, and how a bucket reaches every rank's buffer. The
 * pipeline (update.c, run_device_pipeline) drives a sink without knowing which:
 *
 *   cuda  (sink_cuda.c)  two device buffers per rank on its GPU; put = cudaMemcpyAsync H2D
 *                        on a copy stream, move = ncclBroadcast on a second stream after
 *                        the copies (an event between them, no host sync), wait = the
 *                        broadcast's event; workers open the buffers by CUDA IPC handle
 *   sim   (sink_sim.c)   the same shape in host memory, for running the GPU path on a CPU
 *                        (CI): a rank's own memfd buffers, put = memcpy, move = MPI_Bcast
 *                        over every rank, handles = /proc/PID/fd/FD
 *
 * Without a sink (--device cpu, or auto on a machine with no GPU) buckets go through the
 * host path: IPC buffers shared by a host's ranks, the host leaders' broadcast (buffers.c,
 * update.c's prepare_bucket). A new device is one file defining a ckpt__sink_ops_t, named
 * in sink.c. */
#ifndef CKPT_ENGINE_SINK_H
#define CKPT_ENGINE_SINK_H

#include "engine/engine_internal.h"
#include "ipc/wire.h"

typedef struct ckpt__sink ckpt__sink_t;

/* What the device timed of one slot's bucket, in seconds before the move was seen done
 * (the host's clock when wait returned): the puts ran over [put_end + put_s, put_end] before
 * it, the move over [move_s, 0]. With two buffers the move of b+1 queues behind the move of
 * b while its puts overlap it, so put_end can exceed move_s. All 0: not timed. */
typedef struct {
    double put_s, put_end, move_s;
} ckpt__sink_times_t;

typedef struct ckpt__sink_ops {
    const char *name;
    uint32_t buffer_kind; /* CKPT_IPC_BUFFER_* of its buffers in BEGIN */
    /* This rank's device (its local rank's, round robin over the visible ones) and the
     * communicator over every rank. Collective; < 0 with the cause. */
    int (*open)(ckpt__sink_t *s, int timeout_ms);
    void (*close)(ckpt__sink_t *s);
    /* Memory free for buffers on this rank's device. */
    int (*mem_free)(ckpt__sink_t *s, uint64_t *bytes);
    /* Buffer i of size bytes: s->ptr[i] and s->handle[i]; release undoes it. */
    int (*alloc)(ckpt__sink_t *s, int i, uint64_t size);
    void (*release)(ckpt__sink_t *s, int i);
    /* Copies host memory into buffer memory, ordered before the next move (may return
     * before the copy is done). */
    int (*put)(ckpt__sink_t *s, char *dst, const void *src, uint64_t len);
    /* Broadcasts the first len bytes of buffer `slot` from rank root to every rank's buffer
     * `slot`, after root's puts (may return before it is done). Every rank calls it, in
     * the same order. */
    int (*move)(ckpt__sink_t *s, int slot, uint64_t len, int root);
    /* Until slot's move is done on this rank (its bytes readable by the worker), at most
     * timeout_ms; *t: when the puts and the move ran, where the device can tell (else 0).
     * A failure leaves the collective state unknown: the caller stops. */
    int (*wait)(ckpt__sink_t *s, int slot, int timeout_ms, ckpt__sink_times_t *t);
} ckpt__sink_ops_t;

struct ckpt__sink {
    const ckpt__sink_ops_t *ops;
    ckpt_engine_t *e;
    int ordinal;          /* the device's index among the visible ones */
    char device[96];      /* its name, for logs */
    int nbuffers;         /* 0 until ensured */
    uint64_t size;
    char *ptr[2];         /* device addresses (cuda) or mapped host memory (sim) */
    uint8_t handle[2][CKPT_IPC_HANDLE_BYTES];
    void *impl;           /* the sink's own state */
};

extern const ckpt__sink_ops_t ckpt__sink_cuda;
extern const ckpt__sink_ops_t ckpt__sink_sim;

/* Picks the device by name ("auto" or NULL, "cpu", "cuda", "sim") and opens it: e->sink,
 * NULL for the host path. auto takes CUDA when every rank sees a GPU and the runtime and
 * NCCL load, else the host path (logged once, with why). Collective. */
int ckpt__sink_open(ckpt_engine_t *e, const char *device, int timeout_ms);
void ckpt__sink_close(ckpt_engine_t *e);
/* Memory every rank may use for device buffers: the smallest over ranks (collective). */
int ckpt__sink_budget(ckpt_engine_t *e, int timeout_ms, uint64_t *budget_out);
/* Makes sure every rank has nbuffers device buffers of at least size (collective, agreed:
 * the same result everywhere). */
int ckpt__sink_ensure(ckpt_engine_t *e, uint64_t size, int nbuffers, int timeout_ms);
/* The local rank (among the ranks on this host) that picks the device. */
int ckpt__local_rank(ckpt_engine_t *e);

#endif
