/*
 * The HTTP control API of rank 0 (docs/HTTP.md), its Prometheus metrics and the trigger
 * that tells an inference server to attach to an update.
 *
 * The engine is driven by rank 0's main thread only (every command is broadcast to all
 * ranks over MPI), while the HTTP server answers on its own threads. So the server is a
 * job queue: handlers validate a request and queue a job, or answer reads from the state
 * the main thread published; the main thread takes jobs with ckpt_http_next_job, runs
 * them against the engine and reports with ckpt_http_job_done. Nothing here knows the
 * engine: jobs, states and results are plain structs.
 */
#ifndef CKPT_SERVER_H
#define CKPT_SERVER_H

#include "ckpt/ckpt.h"
#include "ckpt/engine.h" /* ckpt_update_result_t: an update job's result is the engine's */

#ifdef __cplusplus
extern "C" {
#endif

typedef struct ckpt_http_server ckpt_http_server_t;

typedef struct ckpt_http_options {
    uint64_t field_mask;   /* reserved for growth; set 0 */
    const char *bind_addr; /* IPv4 or IPv6 literal; NULL: 127.0.0.1 (never all interfaces
                            * unless asked: the API can replace a model's weights) */
    int port;              /* 0: an ephemeral port (see ckpt_http_port) */
    const char *token;     /* bearer token every request but /v1/healthz must carry; NULL
                            * or "": no authentication */
    size_t max_body;       /* largest request body in bytes; 0: 1 MiB */
    const char *trace_dir; /* where update traces are written; NULL: a private temporary
                            * directory, removed by ckpt_http_stop */
    /* Abuse limits (docs/HTTP.md "Limits"). A client must deliver a whole request (headers
     * and body) within request_timeout_s of connecting or of its previous answer, however
     * it trickles; past it the server answers 408 and closes. 0: 10 s. */
    double request_timeout_s;
    unsigned per_ip_limit;    /* open connections per client address; 0: 32 */
    unsigned max_connections; /* open connections in all (a thread each); 0: 512 */
} ckpt_http_options_t;

#define CKPT_HTTP_OPTIONS_INIT {0, NULL, 0, NULL, 0, NULL, 0, 0, 0}
#define CKPT_HTTP_REQUEST_TIMEOUT_S 10.0
#define CKPT_HTTP_PER_IP_LIMIT 32
#define CKPT_HTTP_MAX_CONNECTIONS 512

#define CKPT_HTTP_PATH_MAX 4096
#define CKPT_HTTP_URL_MAX 1024
#define CKPT_HTTP_MAX_RANKS 1024

typedef enum {
    CKPT_JOB_REGISTER = 1,   /* ckpt_engine_register(name, path) */
    CKPT_JOB_UNREGISTER = 2, /* ckpt_engine_unregister(name) */
    CKPT_JOB_UPDATE = 3,     /* ckpt_engine_update(name, options) */
} ckpt_http_job_kind_t;

/* One request for the engine, copied out to the main thread. */
typedef struct ckpt_http_job {
    int kind;                         /* ckpt_http_job_kind_t */
    uint64_t id;                      /* update id for updates; a sequence number else */
    char name[CKPT_NAME_MAX];         /* checkpoint */
    char path[CKPT_HTTP_PATH_MAX];    /* register: file, directory or index ("" with files) */
    /* register from a list of safetensors files (checkpoint-engine's {"files": [...]} with
     * more than one entry): nfiles NUL-terminated paths back to back in files (heap; the
     * job owns it: ckpt_http_job_release). NULL/0 otherwise. */
    char *files;
    size_t files_len;
    int nfiles;
    /* update only: */
    char mode[16];                    /* "broadcast" or "p2p" */
    int nranks;                       /* 0: all ranks; else ranks[0..nranks) (all of them:
                                       * a strict subset is refused at admission) */
    int32_t ranks[CKPT_HTTP_MAX_RANKS];
    uint64_t bucket_max;              /* 0: the engine's option */
    int timeout_ms;                   /* 0: the engine's option */
    int verify;                       /* -1: the engine's option, 0 off, 1 on */
    int partial;                      /* 1: the checkpoint is a subset of the model on
                                       * purpose (ckpt_update_options_t.partial) */
    int isolate;                      /* 1: a failing worker is cut out, the others go on
                                       * (ckpt_update_options_t.isolate) */
    int ignore_unneeded;              /* "unneeded": "ignore": tensors no worker needs are
                                       * left out (ckpt_update_options_t.ignore_unneeded) */
    char update_url[CKPT_HTTP_URL_MAX];   /* "": no trigger; else ckpt_trigger_begin it */
    char trigger_method[128];             /* collective_rpc method ("": ckpt_engine_update) */
    /* worker i of the inference instance attaches to engine rank group_ranks[i]
     * (checkpoint-engine's inference_group_ranks); 0: worker i to rank i, every rank */
    int ngroup_ranks;
    int32_t group_ranks[CKPT_HTTP_MAX_RANKS];
    char uds[108];                        /* trigger over this Unix socket; "": TCP */
    /* vLLM generation around the update: "wait", "abort", "keep" (POST <base>/pause?mode=)
     * or "off"; "": "wait" when update_url ends in /collective_rpc, else "off" */
    char pause[8];
    char trace_path[CKPT_HTTP_PATH_MAX];  /* pass as ckpt_update_options_t.trace_path */
    /* mode "p2p": where the serving deployment's metas are (its GET
     * /v1/checkpoints/{name}/metas); this deployment pulls from it */
    char metas_url[CKPT_HTTP_URL_MAX];
} ckpt_http_job_t;

/* Frees what a job owns (its file list); the struct itself stays the caller's. Call once
 * per job taken with ckpt_http_next_job, after ckpt_http_job_done. */
CKPT_API void ckpt_http_job_release(ckpt_http_job_t *job);

/* What the main thread reports for a job. Fields an engine call does not produce stay 0. */
typedef struct ckpt_http_job_result {
    int status;             /* 0 or the failing CKPT_E* status (an update's trigger may fail
                               a job the engine completed) */
    int failed_rank;        /* -1 when none */
    char reason[1024];      /* why it failed (ckpt_last_error() or the engine's reason) */
    uint64_t version;       /* register: the checkpoint version */
    uint64_t bytes;         /* register: bytes of the checkpoint */
    uint32_t ntensors;      /* register */
    int paused;             /* update: vLLM's generation was paused for it */
    int resumed;            /* update: ... and resumed after it succeeded */
    /* update: the engine's result as ckpt_engine_update returned it (one type from the
     * engine to the HTTP answer; JSON by src/server/result_json.c) */
    ckpt_update_result_t update;
} ckpt_http_job_result_t;

/* Progress of the running update (mirrors ckpt_update_progress_t). */
typedef struct ckpt_http_progress {
    uint32_t buckets_done;
    uint32_t nbuckets; /* 0 until the plan is made */
    uint64_t bytes_done;
    uint64_t bytes_total;
    double elapsed_s;
} ckpt_http_progress_t;

/* A checkpoint as GET /v1/checkpoints shows it. */
typedef struct ckpt_http_checkpoint {
    char name[CKPT_NAME_MAX];
    uint64_t bytes;
    uint32_t ntensors;
    uint64_t version;
} ckpt_http_checkpoint_t;

/* Starts the server (its own threads). Fails with CKPT_EIO naming the address if it
 * cannot listen, CKPT_EINVAL for a bad bind address. */
CKPT_API int ckpt_http_start(const ckpt_http_options_t *opts, ckpt_http_server_t **out);
/* The port it listens on (the chosen one when opts.port was 0). */
CKPT_API int ckpt_http_port(const ckpt_http_server_t *srv);
/* Stops answering, fails queued jobs, removes the private trace directory, frees. */
CKPT_API void ckpt_http_stop(ckpt_http_server_t *srv);

/* Main thread: waits up to timeout_ms (<0: forever) for the next job and copies it out.
 * The job stays "running" until ckpt_http_job_done. CKPT_ETIMEDOUT when none came. */
CKPT_API int ckpt_http_next_job(ckpt_http_server_t *srv, int timeout_ms,
                                ckpt_http_job_t *job_out);
/* Main thread: reports a job's outcome. Register success publishes the checkpoint as
 * ready (failure: failed); unregister success removes it; updates record the result and
 * the metrics. Every job taken must be reported exactly once. */
CKPT_API int ckpt_http_job_done(ckpt_http_server_t *srv, const ckpt_http_job_t *job,
                                const ckpt_http_job_result_t *result);

/* Progress of the running update, pushed from any thread (e.g. the engine's progress). */
CKPT_API void ckpt_http_report_progress(ckpt_http_server_t *srv, const ckpt_http_progress_t *p);
/* Optional: a function the HTTP threads call to read progress while an update runs,
 * instead of pushes (the main thread is busy inside the update). Must be thread-safe;
 * returns 0 when it filled *out. NULL removes it. */
typedef int (*ckpt_http_progress_fn)(void *ctx, ckpt_http_progress_t *out);
CKPT_API void ckpt_http_set_progress_fn(ckpt_http_server_t *srv, ckpt_http_progress_fn fn,
                                        void *ctx);

/* Publishes a checkpoint registered outside the API (e.g. at start-up) as ready, or
 * replaces its numbers; removes one. */
CKPT_API int ckpt_http_set_checkpoint(ckpt_http_server_t *srv, const ckpt_http_checkpoint_t *c);
CKPT_API int ckpt_http_remove_checkpoint(ckpt_http_server_t *srv, const char *name);
/* The P2P metas export of a checkpoint (served by GET /v1/checkpoints/{name}/metas);
 * copied. CKPT_ENOENT if the checkpoint is not known. */
CKPT_API int ckpt_http_set_metas(ckpt_http_server_t *srv, const char *name, const void *bytes,
                                 size_t len);

/* The number of engine ranks, so requests naming ranks (ranks, inference_group_ranks)
 * are checked when they arrive (400) rather than when the update runs. 0: unknown. */
CKPT_API void ckpt_http_set_engine_ranks(ckpt_http_server_t *srv, int nranks);

/* ---- request bodies (also the fuzz target's entry) ----------------------------------- */

/* Checkpoint names: 1..128 bytes of [A-Za-z0-9._-], not starting with '.' or '-'. */
CKPT_API int ckpt_http_name_valid(const char *name);
/* Parses and validates a request body into *job (kind and name set by the caller first).
 * On failure returns CKPT_EINVAL (or CKPT_EFORMAT for malformed JSON, CKPT_ETOOBIG for
 * an over-long string), writes the offending field name into field (cap bytes; "" when
 * it is the whole body) and sets ckpt_last_error(). */
CKPT_API int ckpt_http_parse_register(const char *body, size_t len, ckpt_http_job_t *job,
                                      char *field, size_t cap);
CKPT_API int ckpt_http_parse_update(const char *body, size_t len, ckpt_http_job_t *job,
                                    char *field, size_t cap);

/* POST /v1/checkpoints/{name}/gather-metas (checkpoint-engine's): an optional body
 * {"timeout": seconds} bounding the wait for a registering checkpoint. */
CKPT_API int ckpt_http_parse_gather_metas(const char *body, size_t len, double *timeout_s,
                                          char *field, size_t cap);
/* 1 when update_url ends in /collective_rpc (vLLM's dev API), with base = the URL before
 * it (where /pause and /resume are); 0 otherwise. */
CKPT_API int ckpt_http_trigger_base(const char *update_url, char *base, size_t cap);

/* ---- inference-server trigger (libcurl) --------------------------------------------- */

/* What the inference server is told: the shape vLLM's POST /collective_rpc takes
 * ({"method", "args", "kwargs", "timeout"}). kwargs carry socket_paths {"<worker>": path},
 * update_id, name, version and timeout_s. */
typedef struct ckpt_trigger_request {
    uint64_t field_mask;              /* set 0 */
    const char *method;               /* NULL: "ckpt_engine_update" */
    const char *name;
    uint64_t version;
    uint64_t update_id;
    const char *const *socket_paths;  /* index = the worker's rank in its instance */
    int nsockets;
    double timeout_s;                 /* "timeout" for the RPC; <= 0: omitted (null) */
} ckpt_trigger_request_t;

/* Writes the JSON body into buf. CKPT_ETOOBIG if cap is too small. */
CKPT_API int ckpt_trigger_body(const ckpt_trigger_request_t *req, char *buf, size_t cap);
/* GET url (with "Authorization: Bearer token" when token is not NULL) into a new buffer
 * (*body_out: release with free()); errors name the URL and the HTTP status or transport
 * failure. Used to fetch P2P metas from a serving deployment. */
CKPT_API int ckpt_http_fetch(const char *url, const char *token, int timeout_ms,
                             char **body_out, size_t *len_out);
/* POSTs json_body to url (through the Unix socket uds when not NULL/""), waiting at most
 * timeout_ms in all. Non-2xx, refusal and timeouts fail (CKPT_EPEER, CKPT_ETIMEDOUT; an
 * HTTP 404 CKPT_ENOENT) with a text in err naming the URL and cause. A 2xx reply of
 * collective_rpc ({"results": [...]}) where a worker answered {"completed": false} fails
 * too (CKPT_EPEER naming the worker). */
CKPT_API int ckpt_trigger_post(const char *url, const char *uds, const char *json_body,
                               int timeout_ms, char *err, size_t errcap);

/* The same on a thread of its own, so the main thread can run the update meanwhile (the
 * inference workers attach to the update while it runs). */
typedef struct ckpt_trigger ckpt_trigger_t;
CKPT_API int ckpt_trigger_start(const char *url, const char *uds, const char *json_body,
                                int timeout_ms, ckpt_trigger_t **out);
/* Joins the thread, frees, returns the POST's status (err as in ckpt_trigger_post). */
CKPT_API int ckpt_trigger_wait(ckpt_trigger_t *t, char *err, size_t errcap);

/* An update's whole conversation with the inference server, for the main thread (the
 * real rank 0 and the tests' fake one run the same code):
 *   ckpt_trigger_begin: when job->update_url ends in /collective_rpc (vLLM) and the job's
 *     pause is not "off", POST <base>/pause?mode=<pause> and wait for its answer (a 404
 *     fails: an older vLLM; "pause": "off" updates without pausing); then start the
 *     trigger POST on its thread, socket_paths mapping worker i to
 *     <socket_dir>/rank-<group_ranks[i] or i>.sock (absolute). Returns 0 with *out set,
 *     or fills r (status, reason, paused) and returns its status: no byte has moved.
 *   run the update, fill r with its outcome, then
 *   ckpt_trigger_end: joins the trigger (its failure fails r); POSTs <base>/resume only
 *     when r succeeded, else leaves vLLM paused and says so in r->reason. Sets r->paused
 *     and r->resumed. */
CKPT_API int ckpt_trigger_begin(const ckpt_http_job_t *job, const char *socket_dir,
                                int engine_ranks, uint64_t version, int timeout_ms,
                                ckpt_trigger_t **out, ckpt_http_job_result_t *r);
CKPT_API void ckpt_trigger_end(ckpt_trigger_t *t, ckpt_http_job_result_t *r);

#ifdef __cplusplus
}
#endif

#endif /* CKPT_SERVER_H */
