/* A CPU stand-in for NCCL, for tests only (see fake_cudart.c): one rank, so a broadcast
 * leaves its buffer as it is. As a non-blocking communicator may, the init and every other
 * broadcast report "in progress" until the next ncclCommGetAsyncError, and a call made
 * while one is in progress is refused (ncclInvalidUsage): an engine that records its event
 * or goes on without polling fails here. More than one rank is refused too: multi-rank
 * device tests use the sim sink. Never shipped. */
#include <stdlib.h>
#include <string.h>

#define EXPORT __attribute__((visibility("default")))

typedef struct {
    char internal[128];
} unique_id_t;

typedef struct {
    int polls;
    int pending;    /* an operation reported in progress, not yet polled */
    int broadcasts;
} comm_t;

EXPORT int ncclGetUniqueId(unique_id_t *id) { memset(id, 0x5a, sizeof(*id)); return 0; }
EXPORT int ncclCommInitRankConfig(comm_t **comm, int nranks, unique_id_t id, int rank, void *cfg)
{
    (void)id, (void)cfg;
    if (nranks != 1 || rank != 0) return 5; /* ncclInvalidUsage */
    *comm = calloc(1, sizeof(comm_t));
    return 7; /* ncclInProgress: completed at the next poll */
}
EXPORT int ncclCommGetAsyncError(comm_t *c, int *r)
{
    *r = c->polls++ ? 0 : 7;
    if (*r == 0) c->pending = 0;
    return 0;
}
EXPORT int ncclCommAbort(comm_t *c) { free(c); return 0; }
EXPORT int ncclCommDestroy(comm_t *c) { free(c); return 0; }
EXPORT int ncclBroadcast(const void *s, void *r, size_t n, int dt, int root, comm_t *c, void *st)
{
    (void)dt, (void)root, (void)st;
    if (c->pending) return 5; /* ncclInvalidUsage: the last call is still in progress */
    if (s != r) memcpy(r, s, n);
    c->pending = c->broadcasts++ % 2;
    return c->pending ? 7 : 0;
}
EXPORT const char *ncclGetErrorString(int r) { return r ? "fake NCCL error" : "no error"; }
EXPORT int ncclGetVersion(int *v) { *v = 99999; return 0; }
