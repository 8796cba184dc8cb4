/*
 * The engine: one rank per inference worker, all ranks of a deployment in one MPI job.
 *
 * Rank 0 leads: a call of ckpt_engine_register/update/unregister/shutdown on rank 0 sends
 * the command to every rank, and every other rank executes the command stream inside
 * ckpt_engine_follow(). So all ranks always agree on what is being done. Results are
 * complete on rank 0 (other ranks get the status).
 *
 * MPI must be initialised by the caller (MPI_Init) before ckpt_engine_create.
 */
#ifndef CKPT_ENGINE_H
#define CKPT_ENGINE_H

#include "ckpt/ckpt.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct ckpt_engine ckpt_engine_t;

/* How the ranks on one host share IPC buffers. */
typedef enum {
    /* One pair of IPC buffers per host, shared by all ranks and workers of that host: the
     * owner stages into it and only host leaders broadcast between hosts (default). */
    CKPT_SHARE_NODE = 0,
    /* One pair per rank: every rank receives its own copy over MPI (the classic layout;
     * useful to measure MPI_Bcast and for hosts that must not share memory). */
    CKPT_SHARE_RANK = 1,
} ckpt_share_mode_t;

typedef struct ckpt_engine_options {
    uint64_t field_mask;     /* reserved for growth; set 0 */
    const char *socket_dir;  /* worker sockets DIR/rank-<r>.sock; NULL: ranks have no worker */
    uint64_t bucket_max;     /* upper limit of a bucket in bytes (default 256 MiB) */
    int timeout_ms;          /* bound of every wait of an update (default 30000) */
    int verify;              /* ask workers to verify checksums of what they copy */
    int share_mode;          /* ckpt_share_mode_t */
    uint64_t memory_limit;   /* bytes the IPC buffers may use; 0: derived from free memory */
    /* -1 (auto): when every rank is on one host, workers read tensors straight out of the
     * owners' pools (no staging, no broadcast); 0: always stage through IPC buffers. */
    int direct;
    /* -1 (auto): pools come from UCX's shared-memory allocator where UCX has one, so P2P
     * joiners on this host read them with one copy and no work by this rank (see
     * docs/DESIGN-NOTES.md); 0: the store's own memfds (P2P gets are then emulated). */
    int ucx_pools;
    /* Where buckets go: "auto" (NULL): each rank's GPU when every rank sees one (and the CUDA
     * runtime and NCCL load), else host memory; "cpu": host memory; "cuda": the GPU, or
     * creation fails naming why; "sim": the GPU path in host memory (tests). On a GPU,
     * memory_limit bounds the device buffers. */
    const char *device;
} ckpt_engine_options_t;

#define CKPT_ENGINE_OPTIONS_INIT {0, NULL, 256ull << 20, 30000, 0, CKPT_SHARE_NODE, 0, -1, -1, NULL}

/* A worker cut out of an update run with ckpt_update_options_t.isolate. */
typedef struct ckpt_isolated_worker {
    int rank;          /* the engine rank whose worker it is */
    int worker_pid;    /* -1: no worker was connected to that rank */
    int status;        /* why: the worker's own status, CKPT_EPEER (gone), CKPT_ETIMEDOUT
                          (stalled past the timeout), ... */
    char reason[256];  /* names the phase (BEGIN, bucket B, post-hook) and the cause */
} ckpt_isolated_worker_t;

#define CKPT_ISOLATED_MAX 16
#define CKPT_HOSTS_MAX 64   /* hosts counted one by one in a result */
#define CKPT_WORKERS_MAX 64 /* workers (ranks) counted one by one in a result */

/* Result of an update, filled on rank 0 (status on every rank). */
typedef struct ckpt_update_result {
    int status;               /* 0 or the failing status */
    int failed_rank;          /* -1 when none */
    char reason[512];         /* names the failing rank, worker, tensor */
    char name[CKPT_NAME_MAX]; /* checkpoint */
    uint64_t version;
    uint64_t update_id;
    uint64_t bytes;           /* bytes of the checkpoint delivered to each worker */
    uint32_t ntensors;
    uint32_t nbuckets;
    uint64_t bucket_size;
    int nbuffers;             /* 2: pipelined; 1: memory was short */
    int nranks;
    double gather_s;          /* allgather of metas */
    double plan_s;            /* bucket plan and IPC buffer setup */
    double begin_s;           /* workers attached and ready */
    double pipeline_s;        /* stage, broadcast, reload and agree of all buckets */
    double finish_s;          /* workers' post-hooks */
    double total_s;
    int direct;               /* 1: workers read the owners' pools (no staging) */
    int p2p;                  /* 1: pulled from a serving deployment over UCX */
    double pull_s;            /* P2P: time the ranks spent pulling, summed over ranks */
    uint64_t pull_bytes;      /* P2P: bytes pulled (each byte once) */
    /* isolate: workers cut out of the update (their ranks went on without them). status 0
     * with nisolated > 0: every other worker completed the update and is consistent; the
     * isolated ones were told it is incomplete for them. When every worker was isolated the
     * update fails. The first CKPT_ISOLATED_MAX by rank are listed (rank 0 only). */
    uint32_t nisolated;
    ckpt_isolated_worker_t isolated[CKPT_ISOLATED_MAX];
    /* Workers' declared needs (ckpt_receiver_declare_need): bytes the busiest worker needs
     * and every worker's need summed (a worker that declared nothing needs every byte);
     * tensors left out because no worker needs them (ignore_unneeded). */
    uint64_t need_bytes_max;
    uint64_t need_bytes_total;
    uint32_t unneeded;
    /* Bytes the busiest host received from the other hosts (bucket broadcasts between host
     * leaders; 0 on one host). */
    uint64_t host_bytes_max;
    /* Bytes that only their owner's host needed and that host's workers read in its pools
     * in place, not staged (routed updates across hosts; all hosts together). */
    uint64_t in_place_bytes;
    /* The device the buckets went through: 0 host memory, 1 CUDA (each rank's GPU, NCCL),
     * 2 sim (the GPU path in host memory). On a device: time the owners' host-to-device
     * copies took (GPU time, summed over ranks) and the bytes they copied. */
    int device;
    double stage_s;
    uint64_t stage_bytes;
    /* Per host (host group, the first CKPT_HOSTS_MAX; nhosts of them; 0 on a device, where
     * NCCL picks the paths): bytes received from the other hosts, and bytes of the buckets
     * the host owns that went to other hosts (each byte once, whatever the leaders' tree
     * relays). Per worker (by rank, the first CKPT_WORKERS_MAX; nworkers of them): bytes of
     * the records it was handed (what it copied, parts counted as parts). */
    uint32_t nhosts, nworkers;
    uint64_t host_bytes_in[CKPT_HOSTS_MAX];
    uint64_t host_bytes_out[CKPT_HOSTS_MAX];
    uint64_t worker_bytes[CKPT_WORKERS_MAX];
} ckpt_update_result_t;

typedef struct ckpt_update_options {
    uint64_t field_mask;      /* reserved; set 0 */
    uint64_t bucket_max;      /* 0: the engine's option */
    int timeout_ms;           /* 0: the engine's option */
    int verify;               /* -1: the engine's option, 0 off, 1 on */
    const char *trace_path;   /* write the Chrome trace JSON here (rank 0); NULL: don't */
    int direct;               /* -1: the engine's option, 0: stage, 1: direct when possible */
    /* 1: the checkpoint is a subset of the workers' models on purpose: workers only check
     * that its tensors exist and match. 0 (default): a worker whose model has tensors the
     * update lacks refuses it before any byte lands (no silently mixed weights). */
    int partial;
    /* 1: one bad worker does not stop the fleet. A worker that fails (an error answer, a
     * refused BEGIN), stalls past timeout_ms or whose connection dies is cut out of the rest
     * of the update (no more buckets; ABORT when it is still connected) while its rank and
     * every other worker go on; the result lists it (nisolated, isolated[]). A rank's own
     * failure still aborts the update everywhere. 0 (default): one worker fails, all abort. */
    int isolate;
    /* 1: when every worker declared its need, tensors that no worker needs are left out of
     * the update. 0 (default): such a tensor fails the update before any byte moves. */
    int ignore_unneeded;
} ckpt_update_options_t;

#define CKPT_UPDATE_OPTIONS_INIT {0, 0, 0, -1, NULL, -1, 0, 0, 0}

/* Physical floors measured in this run: single-core memcpy on rank 0, MPI_Bcast on all. */
typedef struct ckpt_floors {
    double memcpy_gbps;
    double bcast_gbps;
    uint64_t bcast_bytes;
    /* every rank copying out of shared memory (a memfd) at the same time, as the workers
     * of an update do: the slowest rank's bandwidth */
    double memcpy_concurrent_gbps;
    /* the same two copies with streaming (non-temporal) stores, the copy the workers and
     * the staging use for large tensors: on some machines faster than memcpy, so the
     * higher of the two is the floor that counts */
    double stream_gbps;
    double stream_concurrent_gbps;
} ckpt_floors_t;

/* Collective over MPI_COMM_WORLD: every rank calls it. */
CKPT_API int ckpt_engine_create(const ckpt_engine_options_t *opts, ckpt_engine_t **engine_out);
/* Releases the store, buffers and sockets. Call after shutdown/follow returned. */
CKPT_API void ckpt_engine_destroy(ckpt_engine_t *engine);
CKPT_API int ckpt_engine_rank(const ckpt_engine_t *engine);
CKPT_API int ckpt_engine_size(const ckpt_engine_t *engine);
/* Where this rank's buckets go, in words: "cuda: GPU 0 of 8, NCCL 22703, ..." or "host
 * memory (auto: no GPU is visible ...)" (options.device); valid while the engine lives. */
CKPT_API const char *ckpt_engine_device(const ckpt_engine_t *engine);

/* Followers (rank != 0): execute commands until rank 0 calls shutdown. Returns 0 then, or
 * a negative status if the deployment broke (a rank stopped answering). */
CKPT_API int ckpt_engine_follow(ckpt_engine_t *engine);

/* Leader (rank 0) commands; each runs on every rank. */
CKPT_API int ckpt_engine_register(ckpt_engine_t *engine, const char *name, const char *path);
/* Registers from a list of safetensors files (each rank reads its share of all their
 * tensors, as from a directory). */
CKPT_API int ckpt_engine_register_list(ckpt_engine_t *engine, const char *name,
                                       const char *const *paths, size_t count);
CKPT_API int ckpt_engine_unregister(ckpt_engine_t *engine, const char *name);
CKPT_API int ckpt_engine_update(ckpt_engine_t *engine, const char *name,
                                const ckpt_update_options_t *opts, ckpt_update_result_t *result);
CKPT_API int ckpt_engine_floors(ckpt_engine_t *engine, ckpt_floors_t *floors);
/* P2P, serving side: registers the checkpoint's pools with UCX (once) and returns, on rank
 * 0, the metas a joining deployment needs (docs/METAS.md); free them with free(). */
CKPT_API int ckpt_engine_export_metas(ckpt_engine_t *engine, const char *name,
                                      char **metas_out, size_t *len_out);
/* P2P, joining side: pulls the checkpoint described by `metas` straight out of the serving
 * ranks' pools (one-sided UCX gets) and updates this deployment's workers through the
 * ordinary pipeline. Stale metas (another version, or unregistered since) are refused
 * before any byte reaches a worker. */
CKPT_API int ckpt_engine_p2p_update(ckpt_engine_t *engine, const void *metas, size_t len,
                                    const ckpt_update_options_t *opts,
                                    ckpt_update_result_t *result);
CKPT_API int ckpt_engine_shutdown(ckpt_engine_t *engine);

/* Progress of the running (or last) update. Safe to call from any thread while rank 0's
 * main thread runs ckpt_engine_update (an HTTP thread, a progress bar). */
typedef struct ckpt_update_progress {
    uint64_t update_id;     /* 0: no update yet */
    int running;            /* 1 while the update runs */
    uint32_t buckets_done;
    uint32_t nbuckets;      /* 0 until the plan is made */
    uint64_t bytes_done;
    uint64_t bytes_total;
    double elapsed_s;
} ckpt_update_progress_t;

CKPT_API int ckpt_engine_progress(const ckpt_engine_t *engine, ckpt_update_progress_t *out);

/* Checkpoints registered (as seen by rank 0): count, and the i-th name, version, total
 * bytes and tensor count. */
CKPT_API size_t ckpt_engine_checkpoint_count(const ckpt_engine_t *engine);
CKPT_API int ckpt_engine_checkpoint_info(const ckpt_engine_t *engine, size_t index,
                                         const char **name_out, uint64_t *version_out);

/* Total bytes and tensor count of registered checkpoint `name` (the whole checkpoint, every
 * rank's share; any output may be NULL). CKPT_ENOENT if it is not registered. Call from
 * the thread that drives the engine (the store is not shared with other threads). */
CKPT_API int ckpt_engine_checkpoint_stats(const ckpt_engine_t *engine, const char *name,
                                          uint64_t *bytes_out, size_t *tensors_out);

/* ---- publishing from trainers (include/ckpt/publish.h, docs/PUBLISH.md) ----
 *
 * With a socket dir every rank also listens on DIR/publish-<rank>.sock, where trainers on
 * its host hand over sealed memfds (parts of a checkpoint). A thread of the rank keeps
 * them pending; registration is collective, so rank 0 asks for it between commands. */

/* What became of one published checkpoint in a poll. */
typedef struct ckpt_publish_event {
    char name[CKPT_NAME_MAX];
    int status;          /* 0: registered as `version`; else why its parts were dropped */
    uint64_t version;
    uint64_t step;
    uint32_t nparts;
    uint32_t ntensors;
    uint64_t bytes;      /* tensor bytes of the whole checkpoint */
    int replaced;        /* 1: it replaced the version registered under that name */
    char reason[512];    /* on failure: names the tensor, the parts, the missing indices */
} ckpt_publish_event_t;

/* Leader (rank 0), between commands: every rank reports the parts published to it (one
 * integer allreduce when there are none). Checkpoints whose parts are all in are
 * registered (a name already registered gets the new version once every rank has it, and
 * the old one is freed); parts sharing a tensor are refused; a checkpoint whose first part
 * came more than `missing_ms` ago, or whose name is `expire` (NULL: none), and still lacks
 * parts is dropped naming them. Up to `cap` events go to events_out (*nevents_out gets
 * how many happened), *pending_out the parts still pending; any may be NULL. A no-op
 * without a socket dir. */
CKPT_API int ckpt_engine_publish_poll(ckpt_engine_t *engine, int missing_ms, const char *expire,
                                      ckpt_publish_event_t *events_out, size_t cap,
                                      size_t *nevents_out, size_t *pending_out);

#ifdef __cplusplus
}
#endif

#endif
