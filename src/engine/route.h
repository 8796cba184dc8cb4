/* Routing by need across hosts (issue 14, item 2): when workers declared what they need
 * (needs.c) and the deployment spans hosts, each tensor gets the set of hosts whose workers
 * need it; buckets are planned per set (every tensor of a bucket needed by the same hosts)
 * and a bucket travels only from its owner's host to those hosts, along a binomial tree of
 * point-to-point transfers between the host leaders (timed waits, as every collective). A
 * bucket every host needs still goes by the leaders' broadcast. */
#ifndef CKPT_ENGINE_ROUTE_H
#define CKPT_ENGINE_ROUTE_H

#include "engine/engine_internal.h"
#include "engine/needs.h"
#include "plan/bucket.h"

/* What the plan moves of one tensor: the whole (dim -1), or a part cut for the hosts that
 * need those indices of it: [start, start + length) of dimension dim, out of `full`. */
typedef struct ckpt__piece {
    uint32_t tensor;  /* index into the update's tensors */
    int32_t dim;
    uint64_t start, length;
    int64_t full;
    uint64_t hosts;   /* bit g: host group g needs it */
} ckpt__piece_t;

typedef struct ckpt__route {
    int active;          /* buckets go only where they are needed */
    ckpt__piece_t *pieces; /* in tensor order; one per tensor unless cut */
    size_t npieces;
    size_t ncut;         /* tensors cut into parts */
    uint64_t *sets;      /* the distinct host sets, ascending */
    size_t nsets;
    uint32_t *bucket_set; /* per planned bucket: index into sets */
    /* Set by the caller before ckpt__route_input when the owners' hosts may read their
     * own pools in place (staged, one pool region per rank, the host's pools opened): a
     * piece only its owner's host needs, whole or rows, is then planned into buckets of
     * its own (bucket_local[b] = 1) that nobody stages or sends: that host's workers read
     * them out of the owner's pool. */
    int in_place;
    uint8_t *bucket_local;
} ckpt__route_t;

/* What the route may cut (route_init's `cut`): nothing (verify: checksums cover whole
 * tensors), parts along dim 0 only (P2P: a part is then one byte range of the serving
 * rank's pool, one UCX get), or parts along any dimension (the owner packs columns). */
#define CKPT__CUT_NONE 0
#define CKPT__CUT_ROWS 1
#define CKPT__CUT_ALL 2

/* Collective: learns which hosts need each tensor (each host's union of its workers'
 * flags, gathered by the leaders: ngroups x count bytes) and, unless CUT_NONE, which
 * slices: a tensor that no host needs whole, whose declared slices (all along one
 * dimension) differ between hosts or leave some of it unneeded, is cut at the slices'
 * bounds so each host gets only the parts it needs (the workers' slice records are
 * allgathered: 32 bytes each). P2P (p2p) cuts rows only and routes on one host too (the
 * joiners then pull only the byte ranges their workers need). Inactive (and nothing
 * allocated) when no worker declared, on one host (but for P2P), above 64 hosts. */
int ckpt__route_init(ckpt_engine_t *e, const ckpt__needs_t *needs,
                     const ckpt_tensor_meta_t *all, size_t count, int p2p, int cut,
                     int coll_ms, ckpt__route_t *r);
/* Before planning: the planner's input, one meta and placement per piece (a part's shape
 * and nbytes; a part of rows starts further into its source), each piece's host set
 * encoded into its owner (owner * nsets + set) so that the planner, which groups by
 * owner, keeps sets apart; *owners_out is the owner count to plan with. Inactive: all[]
 * and places[] themselves. After planning, ckpt__route_decode restores the owners in the
 * plan and records each bucket's set; plan->origin[k] is then planned tensor k's piece. */
int ckpt__route_input(const ckpt__route_t *r, const ckpt_tensor_meta_t *all,
                      const ckpt__place_t *places, size_t count, int nranks,
                      const int *group_of_rank, ckpt_tensor_meta_t **input_out,
                      ckpt__place_t **places_out, size_t *ninput_out, int *owners_out);
int ckpt__route_decode(ckpt__route_t *r, ckpt_bucket_plan_t *plan);
/* The host groups bucket b (owned by world rank `owner`) goes to, as a mask: its set and
 * its owner's group; every group when routing is inactive. */
uint64_t ckpt__route_groups(const ckpt_engine_t *e, const ckpt__route_t *r, size_t b,
                            int owner);
/* 1 when bucket b is read in place by its owner's host (nothing staged or sent). */
static inline int ckpt__route_local(const ckpt__route_t *r, size_t b)
{
    return r->bucket_local != NULL && r->bucket_local[b];
}
/* Every host group, as a mask (a full broadcast). */
uint64_t ckpt__route_everyone(const ckpt_engine_t *e);
/* Starts moving bucket bytes from the owner's group leader to the leaders of `groups`
 * without waiting for it: the leaders' broadcast (every group), or one send or receive
 * (one group besides the owner's). Returns how many requests it put in reqs (0: nothing
 * for this rank), or -1 when it cannot start the transfer at once (a tree of several hops,
 * or more than `max` chunks of 1 GiB): the caller moves it with ckpt__route_send or the
 * leaders' broadcast. Every leader decides alike (it depends on groups and bytes only). */
int ckpt__route_post(ckpt_engine_t *e, void *buf, uint64_t bytes, int owner_group,
                     uint64_t groups, MPI_Request *reqs, int max);
/* Moves bucket bytes from the owner's group leader to the leaders of `groups` (a binomial
 * tree of point-to-point transfers); leaders outside `groups` and other ranks return at
 * once. A transfer not done within timeout_ms is fatal for the rank, as a collective's. */
int ckpt__route_send(ckpt_engine_t *e, void *buf, uint64_t bytes, int owner_group,
                     uint64_t groups, int timeout_ms);
void ckpt__route_free(ckpt__route_t *r);

#endif
