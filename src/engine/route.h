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

typedef struct ckpt__route {
    int active;          /* buckets go only where they are needed */
    uint64_t *hosts_of;  /* per tensor of the update: bit g = host group g needs it */
    uint64_t *sets;      /* the distinct host sets, ascending */
    size_t nsets;
    uint32_t *bucket_set; /* per planned bucket: index into sets */
} ckpt__route_t;

/* Collective: learns which hosts need each tensor (each host's union of its workers'
 * flags, gathered by the leaders: ngroups x count bytes).
 * Inactive (and nothing allocated) when no worker declared, on one host, above 64 hosts,
 * or for P2P updates (p2p). */
int ckpt__route_init(ckpt_engine_t *e, const ckpt__needs_t *needs, size_t count, int p2p,
                     int coll_ms, ckpt__route_t *r);
/* Before planning: encodes each tensor's host set into its owner (owner * nsets + set), so
 * that the planner, which groups by owner, keeps sets apart; returns the owner count to
 * plan with. After planning, ckpt__route_decode restores owners in the plan and in all[]
 * and records each bucket's set. */
int ckpt__route_encode(const ckpt__route_t *r, ckpt_tensor_meta_t *all, size_t count, int nranks);
int ckpt__route_decode(ckpt__route_t *r, ckpt_tensor_meta_t *all, size_t count,
                       ckpt_bucket_plan_t *plan);
/* The host groups bucket b (owned by world rank `owner`) goes to, as a mask: its set and
 * its owner's group; every group when routing is inactive. */
uint64_t ckpt__route_groups(const ckpt_engine_t *e, const ckpt__route_t *r, size_t b,
                            int owner);
/* Every host group, as a mask (a full broadcast). */
uint64_t ckpt__route_everyone(const ckpt_engine_t *e);
/* Moves bucket bytes from the owner's group leader to the leaders of `groups` (a binomial
 * tree of point-to-point transfers); leaders outside `groups` and other ranks return at
 * once. A transfer not done within timeout_ms is fatal for the rank, as a collective's. */
int ckpt__route_send(ckpt_engine_t *e, void *buf, uint64_t bytes, int owner_group,
                     uint64_t groups, int timeout_ms);
void ckpt__route_free(ckpt__route_t *r);

#endif
