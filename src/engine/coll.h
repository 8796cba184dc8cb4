/* Timed collectives (coll.c): waits on MPI requests with a deadline, the agreement of every
 * rank on a result (over e->agree_comm, which coll.c owns), broadcasts and barriers that
 * time out, the bound of waits for other ranks, and the fatal exit once the ranks can no
 * longer agree (e->broken). */
#ifndef CKPT_ENGINE_COLL_H
#define CKPT_ENGINE_COLL_H

#include "engine/engine_internal.h"

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

#endif
