/* Routing buckets by need across hosts (see route.h). */
#include <stdlib.h>
#include <string.h>

#include "engine/route.h"

#define ROUTE_TAG 11 /* point-to-point bucket transfers on the leaders' communicator */

static int cmp_u64(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

static size_t set_index(const ckpt__route_t *r, uint64_t set)
{
    size_t lo = 0, hi = r->nsets;
    while (lo + 1 < hi) {
        size_t mid = (lo + hi) / 2;
        if (r->sets[mid] <= set) lo = mid;
        else hi = mid;
    }
    return lo;
}

/* Waits for req like every collective: a rank that does not take part within coll_ms
 * ends this one (the deployment is restarted as a whole). */
static void wait_or_die(ckpt_engine_t *e, MPI_Request *req, int coll_ms, const char *what)
{
    if (ckpt__mpi_wait(e, req, coll_ms, 200, what) < 0) ckpt__engine_fatal(e, ckpt_last_error());
}

int ckpt__route_init(ckpt_engine_t *e, const ckpt__needs_t *needs, size_t count, int p2p,
                     int coll_ms, ckpt__route_t *r)
{
    memset(r, 0, sizeof(*r));
    if (!needs->any_declared || p2p || e->ngroups <= 1 || e->ngroups > 64 || count == 0 ||
        count > (size_t)INT32_MAX / (size_t)e->ngroups)
        return CKPT_OK;
    /* Per host: the union of its workers' flags (one allreduce inside the host); then the
     * hosts' unions to every leader (ngroups x count bytes, not nranks x count), and from
     * each leader to its host. */
    uint8_t *host = malloc(count), *flags = malloc(count * (size_t)e->ngroups);
    r->hosts_of = calloc(count, sizeof(uint64_t));
    r->sets = malloc(count * sizeof(uint64_t));
    int ok = host && flags && r->hosts_of && r->sets, all_ok = 0;
    MPI_Request req;
    MPI_Iallreduce(&ok, &all_ok, 1, MPI_INT, MPI_MIN, e->world, &req);
    wait_or_die(e, &req, coll_ms, "routing agreement");
    if (!all_ok) {
        free(host), free(flags);
        ckpt__route_free(r);
        return ckpt__error(CKPT_ENOMEM, "routing: a rank has no memory for %zu x %d flags",
                           count, e->ngroups);
    }
    MPI_Iallreduce(needs->mine, host, (int)count, MPI_UNSIGNED_CHAR, MPI_BOR, e->group, &req);
    wait_or_die(e, &req, coll_ms, "needs of this host");
    if (e->leaders != MPI_COMM_NULL) {
        MPI_Iallgather(host, (int)count, MPI_UNSIGNED_CHAR, flags, (int)count,
                       MPI_UNSIGNED_CHAR, e->leaders, &req);
        wait_or_die(e, &req, coll_ms, "needs of every host");
    }
    MPI_Ibcast(flags, (int)(count * (size_t)e->ngroups), MPI_UNSIGNED_CHAR, 0, e->group, &req);
    wait_or_die(e, &req, coll_ms, "needs of every host");
    for (int g = 0; g < e->ngroups; g++) {
        const uint8_t *f = flags + (size_t)g * count;
        for (size_t i = 0; i < count; i++)
            if (f[i]) r->hosts_of[i] |= 1ull << g;
    }
    free(host), free(flags);
    memcpy(r->sets, r->hosts_of, count * sizeof(uint64_t));
    qsort(r->sets, count, sizeof(uint64_t), cmp_u64);
    for (size_t i = 0; i < count; i++)
        if (r->nsets == 0 || r->sets[r->nsets - 1] != r->sets[i]) r->sets[r->nsets++] = r->sets[i];
    r->active = 1;
    return CKPT_OK;
}

int ckpt__route_encode(const ckpt__route_t *r, ckpt_tensor_meta_t *all, size_t count, int nranks)
{
    if (!r->active) return nranks;
    for (size_t i = 0; i < count; i++)
        all[i].owner = all[i].owner * (int32_t)r->nsets + (int32_t)set_index(r, r->hosts_of[i]);
    return nranks * (int)r->nsets;
}

int ckpt__route_decode(ckpt__route_t *r, ckpt_tensor_meta_t *all, size_t count,
                       ckpt_bucket_plan_t *plan)
{
    if (!r->active) return CKPT_OK;
    int32_t n = (int32_t)r->nsets;
    for (size_t i = 0; i < count; i++) all[i].owner /= n;
    for (size_t i = 0; i < plan->ntensors; i++) plan->tensors[i].owner /= n;
    r->bucket_set = calloc(plan->nbuckets + 1, sizeof(uint32_t));
    if (!r->bucket_set) return ckpt__error(CKPT_ENOMEM, "routing: %zu buckets", plan->nbuckets);
    for (size_t b = 0; b < plan->nbuckets; b++) {
        r->bucket_set[b] = (uint32_t)(plan->buckets[b].owner % n);
        plan->buckets[b].owner /= n;
    }
    return CKPT_OK;
}

uint64_t ckpt__route_everyone(const ckpt_engine_t *e)
{
    return e->ngroups >= 64 ? ~0ull : (1ull << e->ngroups) - 1;
}

uint64_t ckpt__route_groups(const ckpt_engine_t *e, const ckpt__route_t *r, size_t b,
                            int owner)
{
    if (!r->active) return ckpt__route_everyone(e);
    return r->sets[r->bucket_set[b]] | 1ull << e->group_of_rank[owner];
}

static int transfer(ckpt_engine_t *e, void *buf, uint64_t bytes, int peer, int send,
                    int timeout_ms)
{
    const uint64_t chunk = 1ull << 30; /* MPI counts are int */
    for (uint64_t off = 0; off < bytes; off += chunk) {
        int n = (int)CKPT_MIN(chunk, bytes - off);
        MPI_Request req;
        if (send) MPI_Isend((char *)buf + off, n, MPI_BYTE, peer, ROUTE_TAG, e->leaders, &req);
        else MPI_Irecv((char *)buf + off, n, MPI_BYTE, peer, ROUTE_TAG, e->leaders, &req);
        int rc = ckpt__mpi_wait(e, &req, timeout_ms, 200, "routed bucket transfer");
        if (rc < 0) return rc;
    }
    return CKPT_OK;
}

int ckpt__route_send(ckpt_engine_t *e, void *buf, uint64_t bytes, int owner_group,
                     uint64_t groups, int timeout_ms)
{
    if (e->leaders == MPI_COMM_NULL) return CKPT_OK;
    int me = e->group_of_rank[e->rank];
    groups |= 1ull << owner_group;
    if (!(groups & (1ull << me))) return CKPT_OK;
    /* members in ascending group order; positions relative to the owner's */
    int members[64], k = 0, root = 0, pos = 0;
    for (int g = 0; g < e->ngroups && g < 64; g++)
        if (groups & (1ull << g)) {
            if (g == owner_group) root = k;
            if (g == me) pos = k;
            members[k++] = g;
        }
    int rel = (pos - root + k) % k;
    for (int mask = 1; mask < k; mask <<= 1) {
        int rc = CKPT_OK;
        if (rel < mask && rel + mask < k)
            rc = transfer(e, buf, bytes, members[(rel + mask + root) % k], 1, timeout_ms);
        else if (rel >= mask && rel < 2 * mask)
            rc = transfer(e, buf, bytes, members[(rel - mask + root) % k], 0, timeout_ms);
        if (rc < 0) return rc;
    }
    return CKPT_OK;
}

void ckpt__route_free(ckpt__route_t *r)
{
    free(r->hosts_of);
    free(r->sets);
    free(r->bucket_set);
    memset(r, 0, sizeof(*r));
}
