/* State shared by the HTTP threads and rank 0's main thread. One mutex guards all of it:
 * requests are rare (a controller, a scraper) and every critical section is short, so
 * finer locking would buy nothing but ordering rules. */
#ifndef CKPT_SERVER_INTERNAL_H
#define CKPT_SERVER_INTERNAL_H

#include <pthread.h>

#include <cjson/cJSON.h>

#include "ckpt/server.h"
#include "core/internal.h"

typedef enum { CK_REGISTERING, CK_READY, CK_FAILED, CK_UNREGISTERING } srv_ckpt_state_t;
typedef enum { UP_QUEUED, UP_RUNNING, UP_SUCCEEDED, UP_FAILED } srv_update_state_t;

typedef struct srv_ckpt {
    ckpt_http_checkpoint_t info;
    int state;           /* srv_ckpt_state_t */
    char reason[1024];   /* why registration or unregistration failed */
    void *metas;         /* P2P export set by the main thread; NULL until then */
    size_t metas_len;
    uint64_t last_update_id;
    struct srv_ckpt *next;
} srv_ckpt_t;

typedef struct srv_update {
    uint64_t id;         /* 0: slot unused */
    char name[CKPT_NAME_MAX];
    char mode[16];
    int state;           /* srv_update_state_t */
    int has_trigger;
    int partial, isolate; /* the options it was asked with */
    ckpt_http_progress_t progress;
    ckpt_http_job_result_t result;
    char trace_path[CKPT_HTTP_PATH_MAX];
    double queued_at, started_at, finished_at;
} srv_update_t;

/* One open connection, watched for the request deadline (http.c). Lives from MHD's
 * STARTED to its CLOSED notification; in thread-per-connection mode MHD closes the socket
 * only after CLOSED, so fd stays ours while the entry is listed. */
typedef struct srv_conn {
    int fd;
    double deadline;      /* monotonic seconds; 0: none (a handler runs or answers) */
    int cut;              /* the watchdog answered 408 and shut the socket down */
    struct srv_conn *prev, *next;
} srv_conn_t;

typedef struct srv_job {
    ckpt_http_job_t job;
    struct srv_job *next;
} srv_job_t;

/* Updates kept for GET /v1/updates/{id}: the last this many (slot = id % SRV_HISTORY). */
#define SRV_HISTORY 64
/* Jobs waiting for the main thread; more is a client bug or an attack, not a workload. */
#define SRV_QUEUE_MAX 64
/* Upper bounds (seconds) of the update duration histogram. */
#define SRV_DURATION_BUCKETS 10
extern const double srv_duration_le[SRV_DURATION_BUCKETS];

struct ckpt_http_server {
    struct MHD_Daemon *mhd;
    int port;
    char *token;             /* NULL: no auth */
    size_t max_body;
    double request_timeout_s;
    /* The request-deadline watchdog: its own lock, so a scan never waits on the state. */
    pthread_mutex_t conn_mu;
    pthread_cond_t conn_cv;
    srv_conn_t *conns;
    int nconns;
    int watchdog_run;        /* 1 while the watchdog thread should run */
    int watchdog_started;
    pthread_t watchdog;
    uint64_t requests_timed_out; /* under conn_mu */
    char trace_dir[CKPT_HTTP_PATH_MAX];
    int own_trace_dir;       /* created by us: removed on stop */

    pthread_mutex_t mu;
    pthread_cond_t cv;       /* the job queue: signalled for the main thread */
    pthread_cond_t state_cv; /* a job ended or the server stops: broadcast to handlers that
                              * wait for a registration (gather-metas) */
    int engine_ranks;        /* 0: unknown (requests naming ranks are checked at run time) */
    int stopping;
    srv_job_t *head, *tail;
    int queued;
    uint64_t next_seq;
    uint64_t next_update_id;
    uint64_t active_update;  /* queued or running update; 0: none */
    srv_ckpt_t *ckpts;
    srv_update_t updates[SRV_HISTORY];
    ckpt_http_progress_fn progress_fn;
    void *progress_ctx;

    /* metrics */
    uint64_t updates_ok, updates_failed, update_bytes;
    uint64_t update_need_bytes; /* sum over successful updates of every worker's need */
    /* per host (group) and per worker (rank), summed over successful updates: bytes
     * received from other hosts, sent to them, handed to the worker */
    uint32_t nhosts, nworkers;
    uint64_t host_in[CKPT_HOSTS_MAX], host_out[CKPT_HOSTS_MAX], worker[CKPT_WORKERS_MAX];
    uint64_t duration_counts[SRV_DURATION_BUCKETS + 1]; /* last: +Inf */
    double duration_sum;
    uint64_t requests[600];  /* by HTTP status code */
    uint64_t jobs_done[4];   /* by ckpt_http_job_kind_t */
};

/* state.c: everything below takes srv->mu itself. */
/* Queues a job after checking it against the current state; returns the HTTP status
 * (202, 404, 409, 503) and on refusal a reason in err. Sets job->id (and for updates the
 * trace path). */
int srv_submit(ckpt_http_server_t *srv, ckpt_http_job_t *job, char *err, size_t cap);
cJSON *srv_render_checkpoints(ckpt_http_server_t *srv);
/* NULL with *code 404 when unknown. */
cJSON *srv_render_checkpoint(ckpt_http_server_t *srv, const char *name, int *code);
cJSON *srv_render_update(ckpt_http_server_t *srv, uint64_t id, int *code);
/* Checks the ranks an update names against the engine's (400 with err and field), 0 when
 * fine or unknown. */
int srv_check_ranks(ckpt_http_server_t *srv, const ckpt_http_job_t *job, char *err, size_t cap,
                    char *field, size_t fcap);
/* checkpoint-engine's gather-metas: waits up to timeout_s while `name` registers, then
 * renders it (200) or returns NULL with the HTTP status and reason. */
cJSON *srv_gather_metas(ckpt_http_server_t *srv, const char *name, double timeout_s, int *code,
                        char *err, size_t cap);
/* Copies the metas (malloc) or returns the HTTP status and a reason. */
int srv_copy_metas(ckpt_http_server_t *srv, const char *name, void **out, size_t *len,
                   char *err, size_t cap);
int srv_trace_path(ckpt_http_server_t *srv, uint64_t id, char *path, size_t pcap, char *err,
                   size_t cap);
void srv_count_request(ckpt_http_server_t *srv, unsigned code);
void srv_free_state(ckpt_http_server_t *srv);

/* metrics.c: the Prometheus text (malloc'ed). */
char *srv_render_metrics(ckpt_http_server_t *srv);

#endif
