/* The engine's state (one per rank): struct ckpt_engine, the types it holds (IPC buffers,
 * registered checkpoints, peers), the command every rank executes (ckpt__cmd_t, the bytes
 * rank 0 broadcasts) and the constants the engine's files share. No functions: each file of
 * src/engine declares what it defines in a header named after it (coll.h, command.h,
 * buffers.h, peers.h, publish.h, floors.h, p2p.h, update.h, ...), which includes this one. */
#ifndef CKPT_ENGINE_INTERNAL_H
#define CKPT_ENGINE_INTERNAL_H

#include <mpi.h>
#include <stdatomic.h>

#include "ckpt/engine.h"
#include "ckpt/store.h"
#include "core/internal.h"
#include "ipc/sender.h"

#define CKPT__PATH_MAX 4096
#define CKPT__REASON_MAX 512
#define CKPT__MAX_CHECKPOINTS 64

typedef enum {
    CKPT__CMD_NONE = 0,
    CKPT__CMD_REGISTER,
    CKPT__CMD_UNREGISTER,
    CKPT__CMD_UPDATE,
    CKPT__CMD_FLOORS,
    CKPT__CMD_SHUTDOWN,
    CKPT__CMD_EXPORT,     /* P2P: register pools with UCX, gather metas on rank 0 */
    CKPT__CMD_P2P_UPDATE, /* P2P: pull from a serving deployment, then update workers */
    CKPT__CMD_PUBLISH,    /* register what trainers published to the ranks (publish.c) */
} ckpt__cmd_op_t;

/* One command of the stream, broadcast as plain bytes from rank 0. */
typedef struct ckpt__cmd {
    int32_t op;
    int32_t timeout_ms;
    int32_t verify;
    int32_t direct; /* 1: workers read the owners' pools when all ranks share one host */
    int32_t partial; /* UPDATE: workers accept a manifest that is a subset of their model */
    int32_t isolate; /* UPDATE/P2P_UPDATE: a failing worker is cut out, the others go on */
    int32_t ignore_unneeded; /* UPDATE/P2P_UPDATE: tensors no worker needs are left out */
    int32_t pad;
    uint64_t version;
    uint64_t update_id;
    uint64_t bucket_max;
    uint64_t payload_len; /* bytes broadcast right after the command (P2P metas) */
    uint64_t arg;         /* PUBLISH: ms a part may wait for the other parts */
    char name[CKPT_NAME_MAX];
    char path[CKPT__PATH_MAX];
} ckpt__cmd_t;

/* IPC buffers of this rank's group (the ranks sharing them: a host, or the rank alone):
 * two, or three across hosts (two buckets in flight between hosts while a third is read). */
#define CKPT__HOST_BUFFERS_MAX 3
typedef struct ckpt__buffers {
    int nbuffers;
    uint64_t size;
    int fds[CKPT__HOST_BUFFERS_MAX];
    void *ptr[CKPT__HOST_BUFFERS_MAX];
    int pinned[CKPT__HOST_BUFFERS_MAX]; /* registered with CUDA (a device path's P2P pulls) */
} ckpt__buffers_t;

typedef struct ckpt__checkpoint_entry {
    char name[CKPT_NAME_MAX];
    uint64_t version;
    /* P2P export (p2p.c): the pool regions registered with UCX and this checkpoint's slot
     * in the guard page; guard_slot < 0 while not exported. */
    int guard_slot;
    struct ckpt__ucx_mem **mems;
    size_t nmems;
} ckpt__checkpoint_entry_t;

#define CKPT__GUARD_SLOTS 64
#define CKPT__GUARD_SLOT_BYTES 64

/* A rank's identity, gathered at start (peers.c): named when it does not answer. */
typedef struct ckpt__peer {
    int32_t pid;
    char host[60];
} ckpt__peer_t;

struct ckpt_engine {
    ckpt_engine_options_t opts;
    char socket_dir[CKPT__PATH_MAX];
    int rank, size;
    MPI_Comm world;   /* dup of MPI_COMM_WORLD: our traffic never mixes with the caller's */
    MPI_Comm group;   /* ranks sharing IPC buffers */
    MPI_Comm leaders; /* one rank per group (MPI_COMM_NULL on the others) */
    int group_rank, group_size;
    int ngroups;
    int *group_of_rank;  /* world rank -> index of its group among the leaders */
    ckpt__peer_t *peers; /* per world rank: pid and host (peers.c) */
    MPI_Comm agree_comm; /* the agreement's own traffic (coll.c): point-to-point tags
                          * there never meet anyone else's */
    ckpt_store_t *store;
    ckpt_ipc_server_t *ipc; /* NULL when the rank has no worker */
    ckpt__buffers_t buffers;
    ckpt__checkpoint_entry_t checkpoints[CKPT__MAX_CHECKPOINTS];
    size_t ncheckpoints;
    uint64_t next_version;
    uint64_t next_update_id;
    int broken; /* a collective timed out: MPI state is unknown, only exit is safe */
    int last_cmd_timeout_ms; /* rank 0: worker timeout of the last command sent (command.c) */
    /* The serving side of P2P: UCX, the guard page, whether pools come from UCX. Owned by
     * p2p.c (its definition is there); made by ckpt__p2p_init. */
    struct ckpt__serving *serving;
    /* The device buckets go through (sink.h): NULL for the host path (no GPU, --device
     * cpu); made by ckpt__sink_open at start. */
    struct ckpt__sink *sink;
    char device_text[CKPT__REASON_MAX]; /* ckpt_engine_device */
    /* DIR/publish-<rank>.sock: trainers hand sealed memfds to this rank (publish.c); NULL
     * without a socket dir. Its thread only queues parts; registration is a command. */
    struct ckpt__pub_server *pub;
    /* Progress, written by the update and read by other threads (ckpt_engine_progress). */
    struct {
        _Atomic uint64_t update_id;
        atomic_int running;
        _Atomic uint32_t buckets_done, nbuckets;
        _Atomic uint64_t bytes_done, bytes_total;
        _Atomic uint64_t start_ns, end_ns;
    } progress;
};

#endif
