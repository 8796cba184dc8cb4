/* Routing buckets by need across hosts (see route.h). */
#include <stdlib.h>
#include <string.h>

#include "engine/coll.h"
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

/* One worker's slice of one tensor and its rank's host group, as gathered (32 bytes). */
typedef struct {
    uint32_t tensor;
    int32_t dim;
    int32_t group;
    uint32_t pad;
    uint64_t start, length;
} slice_rec_t;

static int cmp_rec(const void *a, const void *b)
{
    const slice_rec_t *x = a, *y = b;
    if (x->tensor != y->tensor) return x->tensor < y->tensor ? -1 : 1;
    return x->start < y->start ? -1 : x->start > y->start;
}

/* Most bytes of slice records the ranks gather to cut tensors; above it every tensor goes
 * whole (the same decision on every rank: they see the same counts). */
#define ROUTE_SLICES_MAX (256u << 20)

/* Gathers every rank's slice records, sorted by tensor and start; NULL/0 when there are
 * none or too many. */
static slice_rec_t *gather_slices(ckpt_engine_t *e, const ckpt__needs_t *needs, size_t count,
                                  int coll_ms, size_t *n_out)
{
    *n_out = 0;
    size_t mine = 0;
    for (size_t i = 0; i < count; i++) mine += needs->mine[i] == CKPT__NEED_SLICE;
    int *counts = calloc((size_t)e->size, sizeof(int)), *displs = calloc((size_t)e->size, sizeof(int));
    slice_rec_t *local = malloc((mine + 1) * sizeof(*local));
    int ok = counts && displs && local, all_ok = 0;
    MPI_Request req;
    MPI_Iallreduce(&ok, &all_ok, 1, MPI_INT, MPI_MIN, e->world, &req);
    wait_or_die(e, &req, coll_ms, "routing agreement");
    slice_rec_t *every = NULL;
    if (!all_ok) goto out;
    size_t k = 0;
    for (size_t i = 0; i < count; i++)
        if (needs->mine[i] == CKPT__NEED_SLICE)
            local[k++] = (slice_rec_t){(uint32_t)i, needs->slice[i].dim,
                                       e->group_of_rank[e->rank], 0, needs->slice[i].start,
                                       needs->slice[i].length};
    int bytes = mine * sizeof(*local) > ROUTE_SLICES_MAX ? -1 : (int)(mine * sizeof(*local));
    MPI_Iallgather(&bytes, 1, MPI_INT, counts, 1, MPI_INT, e->world, &req);
    wait_or_die(e, &req, coll_ms, "slices of every worker");
    uint64_t total = 0;
    for (int r = 0; r < e->size; r++) {
        if (counts[r] < 0) total = UINT64_MAX;
        if (total == UINT64_MAX) break;
        displs[r] = (int)total;
        total += (uint64_t)counts[r];
    }
    if (total == 0 || total > ROUTE_SLICES_MAX) {
        if (total) ckpt_info("routing: the workers' slice records exceed %u MiB: tensors go "
                             "whole", ROUTE_SLICES_MAX >> 20);
        goto out;
    }
    every = malloc(total);
    ok = every != NULL;
    MPI_Iallreduce(&ok, &all_ok, 1, MPI_INT, MPI_MIN, e->world, &req);
    wait_or_die(e, &req, coll_ms, "routing agreement");
    if (!all_ok) {
        free(every);
        every = NULL;
        goto out;
    }
    MPI_Iallgatherv(local, bytes, MPI_BYTE, every, counts, displs, MPI_BYTE, e->world, &req);
    wait_or_die(e, &req, coll_ms, "slices of every worker");
    *n_out = total / sizeof(*every);
    qsort(every, *n_out, sizeof(*every), cmp_rec);
out:
    free(counts), free(displs), free(local);
    return every;
}

static int grow_pieces(ckpt__route_t *r, size_t *cap)
{
    if (r->npieces < *cap) return 0;
    size_t n = *cap ? 2 * *cap : 64;
    ckpt__piece_t *p = realloc(r->pieces, n * sizeof(*p));
    if (!p) return -1;
    r->pieces = p;
    *cap = n;
    return 0;
}

/* Cuts tensor i at the bounds of its slices recs[0 .. n) (sorted by start): each stretch between two bounds goes to the hosts whose slices cover it;
 * neighbours with the same hosts are joined, stretches nobody needs are dropped. Returns
 * 0 with the pieces appended, 1 when the tensor stays whole, -1 out of memory. */
static int cut_tensor(ckpt__route_t *r, size_t *cap, const ckpt_tensor_meta_t *t, size_t i,
                      const slice_rec_t *recs, size_t n, int cut)
{
    int dim = recs[0].dim;
    for (size_t k = 1; k < n; k++)
        if (recs[k].dim != dim) return 1; /* slices along different dims: send it whole */
    if (cut == CKPT__CUT_ROWS && dim != 0) return 1;
    uint64_t full = (uint64_t)t->shape[dim];
    uint64_t *bounds = malloc((2 * n + 2) * sizeof(*bounds));
    if (!bounds) return -1;
    size_t nb = 0;
    bounds[nb++] = 0;
    bounds[nb++] = full;
    for (size_t k = 0; k < n; k++) {
        bounds[nb++] = recs[k].start;
        bounds[nb++] = recs[k].start + recs[k].length;
    }
    qsort(bounds, nb, sizeof(*bounds), cmp_u64);
    size_t first = r->npieces;
    for (size_t b = 0; b + 1 < nb; b++) {
        uint64_t lo = bounds[b], hi = bounds[b + 1], hosts = 0;
        if (lo == hi) continue;
        for (size_t k = 0; k < n; k++)
            if (recs[k].start <= lo && hi <= recs[k].start + recs[k].length)
                hosts |= 1ull << recs[k].group;
        if (!hosts) continue;
        ckpt__piece_t *last = r->npieces > first ? &r->pieces[r->npieces - 1] : NULL;
        if (last && last->hosts == hosts && last->start + last->length == lo) {
            last->length += hi - lo;
            continue;
        }
        if (grow_pieces(r, cap) < 0) {
            free(bounds);
            return -1;
        }
        r->pieces[r->npieces++] = (ckpt__piece_t){(uint32_t)i, dim, lo, hi - lo, (int64_t)full,
                                                   hosts};
    }
    free(bounds);
    if (r->npieces == first + 1 && r->pieces[first].length == full) {
        r->npieces = first; /* one host set for all of it: it stays whole */
        return 1;
    }
    r->ncut++;
    return 0;
}

int ckpt__route_init(ckpt_engine_t *e, const ckpt__needs_t *needs,
                     const ckpt_tensor_meta_t *all, size_t count, int p2p, int cut,
                     int coll_ms, ckpt__route_t *r)
{
    memset(r, 0, sizeof(*r));
    /* P2P on one host still routes: its pieces are the byte ranges the workers need. */
    if (!needs->any_declared || (e->ngroups <= 1 && !p2p) || e->ngroups > 64 || count == 0 ||
        count > (size_t)INT32_MAX / (size_t)e->ngroups)
        return CKPT_OK;
    if (p2p && cut == CKPT__CUT_ALL) cut = CKPT__CUT_ROWS;
    /* Per host: the union of its workers' flags (one allreduce inside the host; WHOLE and
     * SLICE are bits); then the hosts' unions to every leader (ngroups x count bytes, not
     * nranks x count), and from each leader to its host. */
    uint8_t *host = malloc(count), *flags = malloc(count * (size_t)e->ngroups);
    uint64_t *hosts_of = calloc(count, sizeof(uint64_t)), *whole = calloc(count, sizeof(uint64_t));
    size_t cap = count;
    r->pieces = malloc(cap * sizeof(*r->pieces));
    int ok = host && flags && hosts_of && whole && r->pieces, all_ok = 0;
    MPI_Request req;
    MPI_Iallreduce(&ok, &all_ok, 1, MPI_INT, MPI_MIN, e->world, &req);
    wait_or_die(e, &req, coll_ms, "routing agreement");
    if (!all_ok) {
        free(host), free(flags), free(hosts_of), free(whole);
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
    int sliced = 0;
    for (int g = 0; g < e->ngroups; g++) {
        const uint8_t *f = flags + (size_t)g * count;
        for (size_t i = 0; i < count; i++) {
            if (f[i]) hosts_of[i] |= 1ull << g;
            if (f[i] & CKPT__NEED_WHOLE) whole[i] |= 1ull << g;
            sliced |= (f[i] & CKPT__NEED_SLICE) != 0;
        }
    }
    free(host), free(flags);
    /* Slices (every rank decides alike: `sliced` and `cut` are the same everywhere). */
    size_t nrec = 0;
    slice_rec_t *recs = cut && sliced ? gather_slices(e, needs, count, coll_ms, &nrec) : NULL;
    size_t k = 0;
    for (size_t i = 0; i < count; i++) {
        size_t k0 = k;
        while (k < nrec && recs[k].tensor == i) k++;
        int rc = 1;
        if (k > k0 && whole[i] == 0) /* no host needs it whole: cut it by its slices */
            rc = cut_tensor(r, &cap, &all[i], i, &recs[k0], k - k0, cut);
        if (rc < 0 || (rc == 1 && grow_pieces(r, &cap) < 0))
            ckpt__engine_fatal(e, "routing: no memory for the pieces of the update");
        if (rc == 1)
            r->pieces[r->npieces++] = (ckpt__piece_t){(uint32_t)i, -1, 0, 0, 0, hosts_of[i]};
    }
    free(recs), free(hosts_of), free(whole);
    r->sets = malloc(r->npieces * sizeof(uint64_t));
    if (!r->sets) ckpt__engine_fatal(e, "routing: no memory for the host sets");
    for (size_t p = 0; p < r->npieces; p++) r->sets[p] = r->pieces[p].hosts;
    qsort(r->sets, r->npieces, sizeof(uint64_t), cmp_u64);
    for (size_t p = 0; p < r->npieces; p++)
        if (r->nsets == 0 || r->sets[r->nsets - 1] != r->sets[p]) r->sets[r->nsets++] = r->sets[p];
    r->active = 1;
    if (r->ncut) ckpt_debug("routing: %zu tensors cut into parts by the hosts' slices (%zu pieces)",
                            r->ncut, r->npieces);
    return CKPT_OK;
}

/* A piece read in place by its owner's host: only that host needs it, and its bytes are
 * one run of the owner's pool (whole, or rows). */
static int local_piece(const ckpt__route_t *r, const ckpt__piece_t *pc, int owner,
                       const int *group_of_rank)
{
    return r->in_place && pc->dim <= 0 && pc->hosts == 1ull << group_of_rank[owner];
}

int ckpt__route_input(const ckpt__route_t *r, const ckpt_tensor_meta_t *all,
                      const ckpt__place_t *places, size_t count, int nranks,
                      const int *group_of_rank, ckpt_tensor_meta_t **input_out,
                      ckpt__place_t **places_out, size_t *ninput_out, int *owners_out)
{
    if (!r->active) {
        *input_out = (ckpt_tensor_meta_t *)all;
        *places_out = (ckpt__place_t *)places;
        *ninput_out = count;
        *owners_out = nranks;
        return CKPT_OK;
    }
    ckpt_tensor_meta_t *in = malloc((r->npieces + 1) * sizeof(*in));
    ckpt__place_t *at = malloc((r->npieces + 1) * sizeof(*at));
    if (!in || !at) {
        free(in), free(at);
        return ckpt__error(CKPT_ENOMEM, "routing: %zu pieces", r->npieces);
    }
    for (size_t p = 0; p < r->npieces; p++) {
        const ckpt__piece_t *pc = &r->pieces[p];
        ckpt_tensor_meta_t *m = &in[p];
        *m = all[pc->tensor];
        at[p] = places[pc->tensor];
        if (pc->dim >= 0) { /* the part: its shape, its bytes; no checksum covers it */
            uint64_t per = m->nbytes / (uint64_t)pc->full;
            m->shape[pc->dim] = (int64_t)pc->length;
            m->nbytes = per * pc->length;
            m->checksum = 0;
            /* Rows of a dim-0 part start further into the source (a P2P pull reads them
             * there); parts along other dims are packed by the owner from the tensor. */
            if (pc->dim == 0) at[p].offset += per * pc->start;
        }
        /* owner, set and (in place) whether local: the planner keeps them apart */
        int32_t local = local_piece(r, pc, m->owner, group_of_rank);
        m->owner = (m->owner * (int32_t)r->nsets + (int32_t)set_index(r, pc->hosts)) * 2 + local;
    }
    *input_out = in;
    *places_out = at;
    *ninput_out = r->npieces;
    *owners_out = nranks * (int)r->nsets * 2;
    return CKPT_OK;
}

int ckpt__route_decode(ckpt__route_t *r, ckpt_bucket_plan_t *plan)
{
    if (!r->active) return CKPT_OK;
    int32_t n = (int32_t)r->nsets;
    for (size_t i = 0; i < plan->ntensors; i++) plan->tensors[i].owner /= 2 * n;
    r->bucket_set = calloc(plan->nbuckets + 1, sizeof(uint32_t));
    r->bucket_local = calloc(plan->nbuckets + 1, 1);
    if (!r->bucket_set || !r->bucket_local)
        return ckpt__error(CKPT_ENOMEM, "routing: %zu buckets", plan->nbuckets);
    for (size_t b = 0; b < plan->nbuckets; b++) {
        int32_t o = plan->buckets[b].owner;
        r->bucket_local[b] = (uint8_t)(o % 2);
        r->bucket_set[b] = (uint32_t)(o / 2 % n);
        plan->buckets[b].owner = o / 2 / n;
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

int ckpt__route_post(ckpt_engine_t *e, void *buf, uint64_t bytes, int owner_group,
                     uint64_t groups, MPI_Request *reqs, int max)
{
    const uint64_t chunk = 1ull << 30; /* MPI counts are int */
    if (e->leaders == MPI_COMM_NULL) return 0;
    if (bytes > chunk * (uint64_t)max) return -1;
    int me = e->group_of_rank[e->rank], n = 0;
    if (groups == ckpt__route_everyone(e)) {
        for (uint64_t off = 0; off < bytes; off += chunk)
            MPI_Ibcast((char *)buf + off, (int)CKPT_MIN(chunk, bytes - off), MPI_BYTE,
                       owner_group, e->leaders, &reqs[n++]);
        return n;
    }
    groups |= 1ull << owner_group;
    if (__builtin_popcountll(groups) != 2) return -1; /* a tree of several hops */
    if (!(groups & (1ull << me))) return 0;
    int peer = __builtin_ctzll(groups & ~(1ull << me));
    for (uint64_t off = 0; off < bytes; off += chunk) {
        int len = (int)CKPT_MIN(chunk, bytes - off);
        if (me == owner_group)
            MPI_Isend((char *)buf + off, len, MPI_BYTE, peer, ROUTE_TAG, e->leaders, &reqs[n++]);
        else
            MPI_Irecv((char *)buf + off, len, MPI_BYTE, peer, ROUTE_TAG, e->leaders, &reqs[n++]);
    }
    return n;
}

void ckpt__route_free(ckpt__route_t *r)
{
    free(r->pieces);
    free(r->sets);
    free(r->bucket_set);
    free(r->bucket_local);
    memset(r, 0, sizeof(*r));
}
