/* Internals of the engine: the rank's state, the command stream, timed collectives. */
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

/* IPC buffers of this rank's group (the ranks sharing them: a host, or the rank alone). */
typedef struct ckpt__buffers {
    int nbuffers;
    uint64_t size;
    int fds[2];
    void *ptr[2];
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

/* ---- who the ranks are (peers.c) ---- */

int ckpt__peers_init(ckpt_engine_t *e);
/* "rank R (pid P on host H)", with what /proc says when R runs on this host. */
size_t ckpt__peer_describe(const ckpt_engine_t *e, int r, char *out, size_t cap);
/* Ranks on this host whose process exited or is stopped ("" when none). */
size_t ckpt__peers_local_suspects(const ckpt_engine_t *e, char *out, size_t cap);

/* ---- timed collectives (coll.c) ---- */

/* Waits for req, sleeping between tests so an idle rank does not spin a core. Returns
 * CKPT_ETIMEDOUT naming `what` after timeout_ms (< 0: wait forever). max_sleep_us caps
 * the back-off: small on the data path, larger for idle command waits. */
int ckpt__mpi_wait(ckpt_engine_t *e, MPI_Request *req, int timeout_ms, int max_sleep_us,
                   const char *what);
/* Every rank learns whether all succeeded. On failure *failed_rank_out is the lowest
 * failing rank and `reason` its text (prefixed "rank N: "). Returns 0 when all succeeded,
 * the failing rank's status otherwise, CKPT_ETIMEDOUT if the ranks could not agree. */
int ckpt__agree(ckpt_engine_t *e, int local_rc, const char *local_reason, int timeout_ms,
                int *failed_rank_out, char *reason, size_t reason_cap);
/* Timed broadcast of count bytes from root over comm (chunks above 1 GiB). */
int ckpt__bcast_bytes(ckpt_engine_t *e, void *buf, uint64_t count, int root, MPI_Comm comm,
                      int timeout_ms, const char *what);
int ckpt__barrier(ckpt_engine_t *e, MPI_Comm comm, int timeout_ms, const char *what);
/* Bound of an update's waits for other ranks, from its worker timeout: a rank may spend a
 * whole timeout on a stalled worker (and another aborting it) before it joins a collective,
 * so ranks wait for each other 3 x timeout + 5 s; a stall is then reported as the worker's,
 * never mistaken for a dead rank. */
int ckpt__peer_timeout_ms(int timeout_ms);
/* Fatal: the deployment can no longer agree; log, tell the worker, abort the MPI job so
 * that it can be restarted as a whole. */
void ckpt__engine_fatal(ckpt_engine_t *e, const char *why) __attribute__((noreturn));

/* ---- command stream (command.c) ----
 * Every command runs the same way on every rank: rank 0 builds it and calls
 * ckpt__cmd_lead (broadcast, then execute), a follower receives it and calls
 * ckpt__cmd_execute with an empty io. What differs on rank 0 is only in the io: the
 * payload it sends and the outputs it keeps. */
typedef struct ckpt__cmd_io {
    const char *payload;           /* rank 0: cmd->payload_len bytes to broadcast (a file
                                    * list, P2P metas); followers receive theirs */
    const char *trace_path;        /* update, P2P update: where rank 0 writes the trace */
    ckpt_update_result_t *result;  /* update, P2P update */
    ckpt_floors_t *floors;         /* floors */
    char **export_out;             /* export: rank 0 gets the metas (malloc'ed) */
    size_t *export_len;
    ckpt_publish_event_t *events;  /* publish: rank 0 gets the events and pending parts */
    size_t events_cap;
    size_t *nevents_out, *pending_out;
} ckpt__cmd_io_t;

int ckpt__cmd_recv(ckpt_engine_t *e, ckpt__cmd_t *cmd);
/* Rank 0: broadcasts cmd (a broken broadcast is fatal) and executes it. */
int ckpt__cmd_lead(ckpt_engine_t *e, ckpt__cmd_t *cmd, ckpt__cmd_io_t *io);
/* Executes a command on this rank (io NULL on followers). */
int ckpt__cmd_execute(ckpt_engine_t *e, const ckpt__cmd_t *cmd, ckpt__cmd_io_t *io);

/* Version of a registered checkpoint (fixed by rank 0, carried in the register command so
 * every rank agrees); 0 when not registered. */
uint64_t ckpt__engine_version_of(const ckpt_engine_t *e, const char *name);

/* ---- IPC buffers (buffers.c) ---- */
/* Collective over the world: makes sure the group has `nbuffers` buffers of at least
 * `size` bytes (existing larger ones are kept). */
int ckpt__buffers_ensure(ckpt_engine_t *e, uint64_t size, int nbuffers, int timeout_ms);
void ckpt__buffers_release(ckpt_engine_t *e);
/* Bytes available for IPC buffers on this host (MemAvailable, /dev/shm free). */
uint64_t ckpt__host_available_bytes(void);
/* Memory every rank may use for IPC buffers: the smallest over all ranks (collective). */
int ckpt__buffer_budget(ckpt_engine_t *e, int timeout_ms, uint64_t *budget_out);

/* ---- the broadcast update (update.c) ---- */
int ckpt__update_run(ckpt_engine_t *e, const ckpt__cmd_t *cmd, const char *trace_path,
                     ckpt_update_result_t *result);

/* ---- P2P (p2p.c) ---- */
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

/* A P2P update: the broadcast pipeline with pulls as its stage step (update.c). */
int ckpt__update_run_p2p(ckpt_engine_t *e, const ckpt__cmd_t *cmd, const void *metas,
                         size_t metas_len, const char *trace_path, ckpt_update_result_t *res);

/* Collective, after a registration: on one host (direct updates), hands every worker the
 * pools now so that its first update does not pay for mapping them. Best effort. */
void ckpt__prepare_workers(ckpt_engine_t *e, const ckpt__cmd_t *cmd);

/* ---- publishing (publish.c) ---- */
/* Opens DIR/publish-<rank>.sock (called by create when there is a socket dir). */
int ckpt__publish_open(ckpt_engine_t *e);
void ckpt__publish_close(ckpt_engine_t *e);
/* Collective (CKPT__CMD_PUBLISH): registers every checkpoint whose published parts are all
 * in, refuses or expires the others. Rank 0 gets the events and the parts still pending. */
int ckpt__publish_run(ckpt_engine_t *e, const ckpt__cmd_t *cmd, ckpt_publish_event_t *events,
                      size_t cap, size_t *nevents_out, size_t *pending_out);

/* ---- floors (floors.c) ---- */
int ckpt__floors_run(ckpt_engine_t *e, ckpt_floors_t *floors);

#endif
