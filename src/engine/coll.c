/* Timed collectives: MPI has no timeouts, so every collective is started non-blocking and
 * tested with a deadline. Between tests the rank sleeps with a growing back-off: an idle
 * rank must not spin a core at 100 % (it would steal the core a worker copies on). */
#include <limits.h>
#include <stdint.h>
#include <sched.h>
#include <stdio.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "engine/coll.h"
#include "engine/peers.h"

int ckpt__mpi_wait(ckpt_engine_t *e, MPI_Request *req, int timeout_ms, int max_sleep_us,
                   const char *what)
{
    uint64_t start = ckpt__now_ns();
    uint64_t limit = timeout_ms < 0 ? UINT64_MAX : (uint64_t)timeout_ms * 1000000ull;
    long sleep_ns = 2000;
    for (int iter = 0;; iter++) {
        int done = 0;
        int rc = MPI_Test(req, &done, MPI_STATUS_IGNORE);
        if (rc != MPI_SUCCESS)
            return ckpt__error(CKPT_ECOMM, "rank %d: MPI error %d during %s", e->rank, rc, what);
        if (done) return CKPT_OK;
        if (ckpt__now_ns() - start > limit) {
            char local[512];
            e->broken = 1;
            ckpt__peers_local_suspects(e, local, sizeof(local));
            return ckpt__error(CKPT_ETIMEDOUT,
                               "rank %d: no answer from the other ranks within %d ms during %s "
                               "(a rank died, stalled or cannot be reached%s%s)",
                               e->rank, timeout_ms, what, local[0] ? "; on this host: " : "",
                               local);
        }
        if (iter < 16) {
            sched_yield(); /* the common case completes within microseconds */
            continue;
        }
        struct timespec ts = {0, sleep_ns};
        nanosleep(&ts, NULL);
        if (sleep_ns < (long)max_sleep_us * 1000) sleep_ns = sleep_ns * 2;
        if (sleep_ns > (long)max_sleep_us * 1000) sleep_ns = (long)max_sleep_us * 1000;
    }
}

typedef struct {
    int32_t status;
    char reason[CKPT__REASON_MAX];
} agree_msg_t;

/* Up to this many ranks, rank 0 collects every rank's word itself (one message each)
 * and so knows which rank did not answer; above it, one allreduce (log-depth, anonymous):
 * per bucket, n messages into one rank would cost more than naming is worth. */
#define NAMED_AGREE_MAX 128
#define AGREE_TAG 7

/* Rank 0's side of a named agreement: the lowest failing rank, or INT_MAX. On timeout,
 * the ranks whose word never came are named (with what this host can see of them). */
static int gather_lowest(ckpt_engine_t *e, int mine, int timeout_ms, int *lowest)
{
    int n = e->size - 1;
    int words[NAMED_AGREE_MAX], done_idx[NAMED_AGREE_MAX];
    MPI_Request reqs[NAMED_AGREE_MAX];
    uint8_t arrived[NAMED_AGREE_MAX];
    memset(arrived, 0, sizeof(arrived));
    for (int i = 0; i < n; i++)
        MPI_Irecv(&words[i], 1, MPI_INT, i + 1, AGREE_TAG, e->agree_comm, &reqs[i]);
    uint64_t start = ckpt__now_ns(), limit = (uint64_t)timeout_ms * 1000000ull;
    long sleep_ns = 2000;
    int left = n;
    *lowest = mine;
    for (int iter = 0; left > 0; iter++) {
        int outcount = 0;
        if (MPI_Testsome(n, reqs, &outcount, done_idx, MPI_STATUSES_IGNORE) != MPI_SUCCESS)
            return ckpt__error(CKPT_ECOMM, "rank 0: MPI error during agreement");
        for (int k = 0; k < outcount && outcount != MPI_UNDEFINED; k++) {
            arrived[done_idx[k]] = 1;
            if (words[done_idx[k]] < *lowest) *lowest = words[done_idx[k]];
            left--;
        }
        if (left == 0) break;
        if (timeout_ms >= 0 && ckpt__now_ns() - start > limit) {
            char who[1024];
            size_t len = 0;
            int named = 0;
            for (int i = 0; i < n && len + 64 < sizeof(who); i++) {
                if (arrived[i]) continue;
                if (named++ == 4) {
                    len += (size_t)snprintf(who + len, sizeof(who) - len, "; and %d more",
                                            left - 4);
                    break;
                }
                if (len) len += (size_t)snprintf(who + len, sizeof(who) - len, "; ");
                len += ckpt__peer_describe(e, i + 1, who + len, sizeof(who) - len);
            }
            e->broken = 1;
            return ckpt__error(CKPT_ETIMEDOUT,
                               "rank 0: %d of %d ranks did not answer within %d ms during "
                               "agreement (dead, stalled or unreachable): %s",
                               left, n, timeout_ms, who);
        }
        if (iter < 16) {
            sched_yield();
            continue;
        }
        struct timespec ts = {0, sleep_ns};
        nanosleep(&ts, NULL);
        if (sleep_ns < 500000) sleep_ns *= 2;
    }
    return CKPT_OK;
}

/* Every rank's lowest failing rank (INT_MAX: none), by the named agreement. */
static int named_lowest(ckpt_engine_t *e, int mine, int timeout_ms, int *lowest)
{
    MPI_Request req;
    int rc;
    if (e->rank == 0) {
        if ((rc = gather_lowest(e, mine, timeout_ms, lowest)) < 0) return rc;
    } else {
        MPI_Isend(&mine, 1, MPI_INT, 0, AGREE_TAG, e->agree_comm, &req);
        if ((rc = ckpt__mpi_wait(e, &req, timeout_ms, 500, "agreement")) < 0) return rc;
    }
    MPI_Ibcast(lowest, 1, MPI_INT, 0, e->agree_comm, &req);
    rc = ckpt__mpi_wait(e, &req, timeout_ms, 500, "agreement");
    if (rc < 0 && e->rank != 0) {
        char who[256];
        ckpt__peer_describe(e, 0, who, sizeof(who));
        return ckpt__error(rc, "rank %d: no decision from %s within %d ms during agreement "
                           "(dead, stalled or unreachable, or waiting for another rank)",
                           e->rank, who, timeout_ms);
    }
    return rc;
}

int ckpt__agree(ckpt_engine_t *e, int local_rc, const char *local_reason, int timeout_ms,
                int *failed_rank_out, char *reason, size_t reason_cap)
{
    /* Cheap in the common case: one integer from each rank to rank 0 and its decision
     * back (or one allreduce on large jobs). Only on failure does the lowest failing rank
     * broadcast its status and text. */
    int mine = local_rc < 0 ? e->rank : INT_MAX;
    int lowest = INT_MAX;
    MPI_Request req;
    int rc;
    if (e->size <= NAMED_AGREE_MAX) {
        rc = named_lowest(e, mine, timeout_ms, &lowest);
    } else {
        MPI_Iallreduce(&mine, &lowest, 1, MPI_INT, MPI_MIN, e->world, &req);
        rc = ckpt__mpi_wait(e, &req, timeout_ms, 500, "agreement");
    }
    if (rc < 0) return rc;
    if (lowest == INT_MAX) {
        if (failed_rank_out) *failed_rank_out = -1;
        return CKPT_OK;
    }
    agree_msg_t msg;
    memset(&msg, 0, sizeof(msg));
    if (e->rank == lowest) {
        msg.status = local_rc;
        snprintf(msg.reason, sizeof(msg.reason), "rank %d: %s", e->rank,
                 local_reason ? local_reason : ckpt_strerror(local_rc));
    }
    MPI_Ibcast(&msg, (int)sizeof(msg), MPI_BYTE, lowest, e->world, &req);
    rc = ckpt__mpi_wait(e, &req, timeout_ms, 500, "failure report");
    if (rc < 0) return rc;
    if (failed_rank_out) *failed_rank_out = lowest;
    if (reason && reason_cap) snprintf(reason, reason_cap, "%s", msg.reason);
    return msg.status < 0 ? msg.status : CKPT_EPEER;
}

int ckpt__bcast_bytes(ckpt_engine_t *e, void *buf, uint64_t count, int root, MPI_Comm comm,
                      int timeout_ms, const char *what)
{
    const uint64_t chunk = 1ull << 30; /* MPI counts are int */
    for (uint64_t off = 0; off < count; off += chunk) {
        int n = (int)CKPT_MIN(chunk, count - off);
        MPI_Request req;
        MPI_Ibcast((char *)buf + off, n, MPI_BYTE, root, comm, &req);
        int rc = ckpt__mpi_wait(e, &req, timeout_ms, 200, what);
        if (rc < 0) return rc;
    }
    return CKPT_OK;
}

int ckpt__barrier(ckpt_engine_t *e, MPI_Comm comm, int timeout_ms, const char *what)
{
    MPI_Request req;
    MPI_Ibarrier(comm, &req);
    return ckpt__mpi_wait(e, &req, timeout_ms, 200, what);
}

void ckpt__engine_fatal(ckpt_engine_t *e, const char *why)
{
    ckpt_error_log("%s; the deployment cannot continue, aborting the MPI job so it can be "
                   "restarted (inference workers keep their current weights)",
                   why);
    if (e->ipc) ckpt_ipc_finish(e->ipc, 0, why, 1000);
    fflush(stdout);
    fflush(stderr);
    MPI_Abort(MPI_COMM_WORLD, 3);
    _exit(3);
}

int ckpt__peer_timeout_ms(int timeout_ms)
{
    return timeout_ms > (INT32_MAX - 5000) / 3 ? INT32_MAX : timeout_ms * 3 + 5000;
}
