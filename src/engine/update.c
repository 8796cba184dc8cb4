/* The broadcast update: gather metas, plan buckets, then per bucket stage -> broadcast ->
 * reload -> agree, pipelined over two IPC buffers so that the broadcast of bucket b+1
 * runs while the workers reload bucket b (three across hosts: two buckets in flight).
 *
 * Invariant that makes the overlap safe: the bucket of step k is written into buffer
 * k % nbuffers only after every rank agreed on step k - nbuffers, i.e. after every worker
 * acknowledged that it finished reading that buffer. With one buffer (memory short) the
 * loop degenerates to stage, reload, agree in sequence.
 *
 * With cmd->isolate a worker's failure (an error answer, a stall past the timeout, a lost
 * connection, a refused BEGIN or post-hook) is not this rank's: the rank tells the worker
 * ABORT (or drops it), agrees "ok" and keeps taking part in every collective without it;
 * the isolations are gathered on rank 0 once, after the post-hooks. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "engine/buffers.h"
#include "engine/coll.h"
#include "device/cuda_rt.h"
#include "engine/sink.h"
#include "engine/source.h"
#include "engine/update.h"
#include "ipc/wire.h"


static int fail_result(ckpt__update_t *u, int rc, int failed_rank, const char *reason)
{
    u->res->status = rc;
    u->res->failed_rank = failed_rank;
    snprintf(u->res->reason, sizeof(u->res->reason), "%s", reason);
    return rc;
}

/* The worker still takes buckets: it exists and was not cut out of the update. */
static int worker_active(const ckpt__update_t *u)
{
    return u->e->ipc != NULL && !u->isolated;
}

/* With isolate, a failure of this rank's worker (rc < 0, its text in ckpt_last_error())
 * cuts the worker out of the rest of the update: it is told ABORT when it is still
 * connected (a stalled one is dropped at once, see ckpt_ipc_finish), the failure is
 * recorded for the result and the rank reports OK to the agreement. Without isolate, or
 * for rc == 0, rc is returned unchanged. */
static int isolate_worker(ckpt__update_t *u, int rc, const char *what)
{
    ckpt_engine_t *e = u->e;
    if (rc == CKPT_OK || !u->cmd->isolate || !e->ipc || u->isolated) return rc;
    u->isolated = 1;
    u->isolated_status = rc;
    /* The sender's texts mostly name the phase already ("...: bucket 3: ..."). */
    const char *why = ckpt_last_error();
    snprintf(u->isolated_reason, sizeof(u->isolated_reason), "%s%s%s", strstr(why, what) ? "" : what,
             strstr(why, what) ? "" : ": ", why);
    ckpt_warn("update %llu: rank %d isolates its worker (pid %d), the other workers go on: %s",
              (unsigned long long)u->cmd->update_id, e->rank, u->worker_pid,
              u->isolated_reason);
    if (u->worker_begun && ckpt_ipc_server_has_worker(e->ipc)) {
        char told[CKPT__REASON_MAX + 128];
        snprintf(told, sizeof(told),
                 "update %llu: this worker was isolated (%s); the other workers complete the "
                 "update without it",
                 (unsigned long long)u->cmd->update_id, u->isolated_reason);
        int arc = ckpt_ipc_finish(e->ipc, 0, told, u->cmd->timeout_ms);
        if (arc < 0) ckpt_info("update %llu: telling the isolated worker: %s",
                               (unsigned long long)u->cmd->update_id, ckpt_last_error());
    }
    u->worker_begun = 0; /* no FINISH, no decision: it has its outcome */
    ckpt__error_clear();
    return CKPT_OK;
}

/* Agreement with the result recorded; a broken deployment is fatal. */
static int agree(ckpt__update_t *u, int local_rc, const char *what)
{
    char reason[CKPT__REASON_MAX];
    char local_reason[CKPT__REASON_MAX];
    int failed = -1;
    /* Called once per bucket: the text is formatted only when there is a failure to tell. */
    if (local_rc < 0) snprintf(local_reason, sizeof(local_reason), "%s: %s", what, ckpt_last_error());
    int rc = ckpt__agree(u->e, local_rc, local_rc < 0 ? local_reason : NULL, u->coll_ms,
                         &failed, reason, sizeof(reason));
    if (rc == CKPT_OK) return CKPT_OK;
    if (u->e->broken) ckpt__engine_fatal(u->e, ckpt_last_error());
    return fail_result(u, rc, failed, reason);
}

/* Allgather of every rank's local tensor metas. On the way meta.reserved carries the
 * owner's store index and offset its pool offset (placements() moves them beside the
 * metas), so the owner finds the bytes again without a lookup by name. */
static int gather_metas(ckpt__update_t *u, ckpt_tensor_meta_t **all_out, size_t *count_out)
{
    if (u->p2p) /* every rank decoded the same metas: nothing to gather */
        return ckpt__p2p_tensors(u->p2p, all_out, count_out);
    ckpt_engine_t *e = u->e;
    const ckpt_tensor_meta_t *metas = NULL;
    size_t count = 0, nlocal = 0;
    int rc = ckpt_store_tensors(e->store, u->cmd->name, &metas, &count);
    ckpt_tensor_meta_t *local = NULL, *all = NULL;
    int *counts = NULL, *displs = NULL;
    if (rc == CKPT_OK) {
        local = ckpt__calloc(count + 1, sizeof(*local));
        u->local_data = ckpt__calloc(count + 1, sizeof(*u->local_data));
        if (!local || !u->local_data) rc = ckpt__error(CKPT_ENOMEM, "gathering metas");
    }
    for (size_t i = 0; rc == CKPT_OK && i < count; i++) {
        const void *data = NULL;
        if (ckpt_store_tensor_data(e->store, u->cmd->name, i, &data) != CKPT_OK) continue;
        u->local_data[i] = data;
        local[nlocal] = metas[i];
        local[nlocal].owner = e->rank;
        local[nlocal].reserved = (int32_t)i;
        nlocal++;
    }
    ckpt__error_clear();
    rc = agree(u, rc, "reading local metas");
    if (rc < 0) goto out;

    counts = ckpt__calloc((size_t)e->size, sizeof(int));
    displs = ckpt__calloc((size_t)e->size, sizeof(int));
    int mine = (int)(nlocal * sizeof(ckpt_tensor_meta_t));
    MPI_Request req;
    MPI_Iallgather(&mine, 1, MPI_INT, counts, 1, MPI_INT, e->world, &req);
    rc = ckpt__mpi_wait(e, &req, u->coll_ms, 200, "allgather of metas");
    if (rc < 0) ckpt__engine_fatal(e, ckpt_last_error());
    uint64_t total = 0;
    for (int r = 0; r < e->size; r++) {
        displs[r] = (int)total;
        total += (uint64_t)counts[r];
    }
    all = ckpt__calloc(total / sizeof(ckpt_tensor_meta_t) + 1, sizeof(*all));
    MPI_Iallgatherv(local, mine, MPI_BYTE, all, counts, displs, MPI_BYTE, e->world, &req);
    rc = ckpt__mpi_wait(e, &req, u->coll_ms, 200, "allgather of metas");
    if (rc < 0) ckpt__engine_fatal(e, ckpt_last_error());
    *all_out = all;
    *count_out = total / sizeof(ckpt_tensor_meta_t);
    all = NULL;
out:
    ckpt__free(local);
    ckpt__free(all);
    ckpt__free(counts);
    ckpt__free(displs);
    return rc;
}

/* P2P: each bucket is pulled by one rank of this deployment. Buckets go to the rank with
 * the fewest bytes so far (ties: rotating with the serving rank), so receivers carry equal
 * bytes and consecutive buckets of one sender go to different receivers. Then every rank
 * checks the guards of the senders it pulls from: stale metas are refused (agreed by all)
 * before any byte reaches a worker. */
static int assign_receivers(ckpt__update_t *u)
{
    ckpt_engine_t *e = u->e;
    uint64_t *load = ckpt__calloc((size_t)e->size, sizeof(*load));
    u->src_owner = ckpt__calloc(u->plan.nbuckets + 1, sizeof(*u->src_owner));
    if (!load || !u->src_owner) {
        ckpt__free(load);
        return fail_result(u, CKPT_ENOMEM, e->rank, "p2p assignment: out of memory");
    }
    for (size_t b = 0; b < u->plan.nbuckets; b++) {
        ckpt_bucket_t *bk = &u->plan.buckets[b];
        int best = (int)((size_t)bk->owner + b) % e->size;
        for (int r = 0; r < e->size; r++)
            if (load[r] < load[best]) best = r;
        u->src_owner[b] = bk->owner;
        bk->owner = best;
        load[best] += bk->bytes;
    }
    ckpt__free(load);
    int rc = CKPT_OK;
    uint32_t nsrc = u->p2p->metas.nranks;
    for (uint32_t o = 0; rc == CKPT_OK && o < nsrc; o++) {
        int mine = 0;
        for (size_t b = 0; b < u->plan.nbuckets && !mine; b++)
            mine = u->plan.buckets[b].owner == e->rank && u->src_owner[b] == (int32_t)o;
        if (mine) rc = ckpt__p2p_check(e, u->p2p, (int)o, u->cmd->timeout_ms);
    }
    rc = agree(u, rc, "p2p metas");
    if (rc < 0) return rc;
    rc = ckpt__p2p_register_buffers(e, u->p2p);
    return agree(u, rc, "p2p buffers");
}

/* Where each of the update's tensors lies, as the gathered metas carried it (reserved: the
 * owner's store index, or for P2P the serving rank's region; offset: in the owner's pool,
 * or in that region): from here on the placement lives beside the metas. */
static ckpt__place_t *placements(const ckpt_tensor_meta_t *all, size_t count)
{
    ckpt__place_t *places = malloc((count + 1) * sizeof(*places));
    for (size_t i = 0; places && i < count; i++)
        places[i] = (ckpt__place_t){all[i].reserved, 0, all[i].offset};
    return places;
}

static int plan_from(ckpt__update_t *u, ckpt_tensor_meta_t *all, ckpt__place_t *places,
                     size_t count);

/* Routed staged updates across hosts: each host opens its ranks' pool regions so that
 * what only the owner's host needs is read there in place instead of staged (route.h,
 * in_place). Every rank decides alike (one allreduce): pools shared on the host, one
 * region per rank, and room in a BEGIN for them beside the IPC buffers. */
static void open_in_place(ckpt__update_t *u)
{
    ckpt_engine_t *e = u->e;
    int ok = 0, all_ok = 0;
    if (e->ngroups > 1 && e->opts.share_mode == CKPT_SHARE_NODE) {
        int rc = ckpt__sources_open(e, u->cmd->name, u->coll_ms, &u->sources);
        if (rc < 0 && e->broken) ckpt__engine_fatal(e, ckpt_last_error());
        ok = rc == CKPT_OK && ckpt__sources_one_per_rank(&u->sources) &&
             u->sources.count + 2 <= CKPT_IPC_MAX_BUFFERS;
        ckpt__error_clear();
    }
    MPI_Request req;
    MPI_Iallreduce(&ok, &all_ok, 1, MPI_INT, MPI_MIN, e->world, &req);
    if (ckpt__mpi_wait(e, &req, u->coll_ms, 200, "in-place agreement") < 0)
        ckpt__engine_fatal(e, ckpt_last_error());
    if (all_ok) u->route.in_place = 1;
    else ckpt__sources_close(&u->sources);
}

static int plan_update(ckpt__update_t *u, ckpt_tensor_meta_t *all, size_t count)
{
    ckpt_engine_t *e = u->e;
    ckpt__place_t *places = placements(all, count);
    if (!places) ckpt__engine_fatal(e, "no memory for the update's placements");
    int rc = plan_from(u, all, places, count);
    free(places);
    return rc;
}

static int plan_from(ckpt__update_t *u, ckpt_tensor_meta_t *all, ckpt__place_t *places,
                     size_t count)
{
    ckpt_engine_t *e = u->e;
    /* Every rank must plan from the same numbers: take the smallest free memory. The
     * group's current buffers count as available: they are reused. */
    uint64_t min_avail = 0;
    int rc = u->sink ? ckpt__sink_budget(e, u->coll_ms, &min_avail)
                     : ckpt__buffer_budget(e, u->coll_ms, &min_avail);
    if (rc < 0) ckpt__engine_fatal(e, ckpt_last_error());
    if (e->opts.memory_limit == 0 && !u->sink)
        min_avail += e->buffers.size * (uint64_t)e->buffers.nbuffers;
    uint64_t bucket_size = 0;
    int nbuffers = 0;
    u->src = u->direct ? &ckpt__source_window : u->p2p ? &ckpt__source_ucx : &ckpt__source_pool;
    if (u->direct) {
        /* No buffers: windows of the owners' pools, each at most bucket_max (a larger
         * tensor is a window of its own). */
        rc = ckpt__sources_open(e, u->cmd->name, u->coll_ms, &u->sources);
        if (rc < 0 && e->broken) ckpt__engine_fatal(e, ckpt_last_error());
        rc = agree(u, rc, "direct sources");
        if (rc < 0) return rc;
        /* Every rank sees the same count (one allgather), so all fall back together. */
        if (u->sources.count > CKPT_IPC_MAX_BUFFERS) {
            ckpt_info("%zu pool regions exceed the %d buffers a worker can map: staging",
                      u->sources.count, CKPT_IPC_MAX_BUFFERS);
            ckpt__sources_close(&u->sources);
            u->direct = 0;
            return plan_from(u, all, places, count);
        }
        for (size_t i = 0; rc == CKPT_OK && i < count; i++)
            rc = ckpt__sources_locate(&u->sources, &all[i], &places[i]);
        bucket_size = CKPT_ALIGN_UP(u->cmd->bucket_max, (uint64_t)CKPT_ALIGN);
        if (rc == CKPT_OK) rc = ckpt__plan_windows(all, places, count, bucket_size, &u->plan);
        /* Pure function of agreed input: fails the same way everywhere. */
        if (rc < 0) return fail_result(u, rc, -1, ckpt_last_error());
    } else {
        uint64_t largest = ckpt__plan_min_bucket(all, count), total = 0;
        for (size_t i = 0; i < count; i++) total += all[i].nbytes;
        rc = ckpt__plan_bucket_size(largest,
                                    ckpt__plan_pipeline_limit(total, u->cmd->bucket_max),
                                    min_avail, &bucket_size, &nbuffers);
        /* Across hosts (host memory, not P2P) a third buffer when it fits: two buckets
         * move between hosts at once (from different owners: both ways of a link busy)
         * while the workers read a third (run_in_flight). */
        if (rc == CKPT_OK && !u->sink && !u->p2p && e->ngroups > 1 && nbuffers == 2 &&
            min_avail / 3 >= bucket_size)
            nbuffers = 3;
        int owners = u->p2p ? (int)u->p2p->metas.nranks : e->size;
        if (rc == CKPT_OK && u->route.active && !u->p2p) open_in_place(u);
        /* Routed: the planner plans the route's pieces (parts of tensors cut for the hosts
         * that need them) and groups by owner, so each piece's host set rides in it. */
        ckpt_tensor_meta_t *input = all;
        ckpt__place_t *at = places;
        size_t ninput = count;
        if (rc == CKPT_OK)
            rc = ckpt__route_input(&u->route, all, places, count, owners, e->group_of_rank,
                                   &input, &at, &ninput, &owners);
        /* Names are unique per tensor; the route's parts of one tensor share its name. */
        if (rc == CKPT_OK) rc = ckpt__plan_check_names(all, count);
        if (rc == CKPT_OK) rc = ckpt__plan_parts(input, at, ninput, owners, bucket_size, &u->plan);
        if (input != all) free(input);
        if (at != places) free(at);
        if (rc == CKPT_OK) rc = ckpt__route_decode(&u->route, &u->plan);
        /* The plan is a pure function of agreed input: it fails the same way on every rank. */
        if (rc < 0) return fail_result(u, rc, -1, ckpt_last_error());
        if (u->p2p && (rc = assign_receivers(u)) < 0) return rc;
        if (u->sink) {
            rc = ckpt__sink_ensure(e, bucket_size, nbuffers, u->coll_ms);
            if (rc < 0 && e->broken) ckpt__engine_fatal(e, ckpt_last_error());
            if (rc < 0) return fail_result(u, rc, -1, ckpt_last_error()); /* agreed inside */
        }
        /* Host buffers: the host path's, or on a device where a host-only source (UCX
         * pulls) lands before its bucket is put on the device. */
        if (!u->sink || u->src->host_only) {
            rc = ckpt__buffers_ensure(e, bucket_size, nbuffers, u->coll_ms);
            if (rc < 0 && e->broken) ckpt__engine_fatal(e, ckpt_last_error());
            rc = agree(u, rc, "IPC buffers");
            if (rc < 0) return rc;
            /* On a GPU, pulls land in pinned memory so that their puts run at the bus's
             * speed (best effort: unpinned they work, slower). */
            for (int i = 0; u->sink && u->sink->ops == &ckpt__sink_cuda &&
                            i < e->buffers.nbuffers; i++)
                if (!e->buffers.pinned[i])
                    e->buffers.pinned[i] = ckpt__cuda_pin(e->buffers.ptr[i], e->buffers.size, 0);
        }
    }
    /* Declared needs: which planned tensors this worker gets, looked up once per update
     * rather than by name for every record of every bucket. */
    if (u->needs.declared) {
        u->wanted = malloc(u->plan.ntensors + 1);
        if (!u->wanted) ckpt__engine_fatal(e, "no memory for the workers' needs");
        for (size_t i = 0; i < u->plan.ntensors; i++) {
            const ckpt__piece_t *pc = ckpt__planned_piece(u, i);
            u->wanted[i] = (uint8_t)(pc ? ckpt__needs_wants_part(&u->needs, pc->tensor, pc->dim,
                                                                 pc->start, pc->length)
                                        : ckpt__needs_wants(&u->needs, &u->plan.tensors[i]));
        }
    }
    /* Bytes the busiest host receives from other hosts: every bucket another host owns
     * (the leaders' broadcast); 0 on one host. */
    if (!u->sink) u->res->nhosts = (uint32_t)CKPT_MIN(e->ngroups, CKPT_HOSTS_MAX);
    if (!u->direct && !u->sink && e->ngroups > 1) {
        for (int g = 0; g < e->ngroups; g++) {
            uint64_t in = 0;
            for (size_t b = 0; b < u->plan.nbuckets; b++) {
                const ckpt_bucket_t *bk = &u->plan.buckets[b];
                uint64_t to = ckpt__route_groups(e, &u->route, b, bk->owner);
                if (e->group_of_rank[bk->owner] != g && (g >= 64 || (to >> g) & 1)) in += bk->bytes;
            }
            if (g < CKPT_HOSTS_MAX) u->res->host_bytes_in[g] = in;
            if (in > u->res->host_bytes_max) u->res->host_bytes_max = in;
        }
        for (size_t b = 0; b < u->plan.nbuckets; b++) { /* what leaves the owner's host */
            const ckpt_bucket_t *bk = &u->plan.buckets[b];
            int from = e->group_of_rank[bk->owner];
            uint64_t to = ckpt__route_groups(e, &u->route, b, bk->owner);
            if (from < CKPT_HOSTS_MAX && (to & ~(1ull << (from & 63))) != 0)
                u->res->host_bytes_out[from] += bk->bytes;
        }
        for (size_t b = 0; b < u->plan.nbuckets; b++)
            if (ckpt__route_local(&u->route, b)) u->res->in_place_bytes += u->plan.buckets[b].bytes;
    }
    u->res->direct = u->direct;
    u->res->device = u->sink ? (int)u->sink->ops->buffer_kind : 0;
    u->res->bucket_size = bucket_size;
    u->res->nbuffers = nbuffers;
    u->res->nbuckets = (uint32_t)u->plan.nbuckets;
    u->res->ntensors = (uint32_t)u->plan.ntensors;
    u->res->bytes = u->plan.total_bytes;
    atomic_store(&e->progress.nbuckets, (uint32_t)u->plan.nbuckets);
    atomic_store(&e->progress.bytes_total, u->plan.total_bytes);
    return ckpt__timeline_init(&u->tl, u->plan.nbuckets * CKPT__EV_KINDS + 1);
}

static int begin_workers(ckpt__update_t *u)
{
    ckpt_engine_t *e = u->e;
    int rc = CKPT_OK;
    if (e->ipc) {
        /* Every wait on the worker between two collectives stays within 2 x timeout (a
         * BUCKET's send and its ack; wait_worker and BEGIN), below the ranks' 3 x timeout
         * + 5 s: a stalled worker is reported as this rank's worker, never as a dead rank. */
        ckpt_ipc_server_set_send_timeout(e->ipc, u->cmd->timeout_ms);
        u->worker_pid = -1;
        rc = ckpt_ipc_server_wait_worker(e->ipc, u->cmd->timeout_ms);
        if (rc == CKPT_OK) {
            u->worker_pid = ckpt_ipc_server_worker_pid(e->ipc);
            ckpt_ipc_begin_t begin;
            memset(&begin, 0, sizeof(begin));
            begin.update_id = u->cmd->update_id;
            begin.version = u->cmd->version;
            begin.name = u->cmd->name;
            begin.nbuckets = (uint32_t)u->plan.nbuckets;
            begin.verify = u->cmd->verify;
            begin.stable = u->direct; /* pools: never written during an update */
            /* The worker checks the manifest against its model before any byte lands: the
             * tensors it will be sent (all of them, or what it declared it needs). */
            begin.manifest = u->manifest;
            begin.manifest_count = u->nmanifest;
            ckpt_tensor_meta_t *mine = NULL;
            if (u->needs.declared && (mine = malloc((u->nmanifest + 1) * sizeof(*mine)))) {
                size_t n = 0;
                for (size_t i = 0; i < u->nmanifest; i++) /* the manifest is in needs' order */
                    if (u->needs.mine[i]) mine[n++] = u->manifest[i];
                begin.manifest = mine;
                begin.manifest_count = n;
            } else if (u->needs.declared) {
                rc = ckpt__error(CKPT_ENOMEM, "BEGIN: the manifest of %zu tensors", u->nmanifest);
            }
            begin.partial = u->cmd->partial;
            if (u->direct) {
                begin.nbuffers = (int)u->sources.count;
                for (size_t i = 0; i < u->sources.count; i++) {
                    begin.buffer_fds[i] = u->sources.fds[i];
                    begin.buffer_sizes[i] = ckpt__sources_size(&u->sources, i);
                }
            } else if (u->sink) {
                /* Device buffers: handles in place of fds (wire.h, buffer kinds). */
                begin.nbuffers = u->sink->nbuffers;
                for (int i = 0; i < u->sink->nbuffers; i++) {
                    begin.buffer_fds[i] = -1;
                    begin.buffer_sizes[i] = u->sink->size;
                    begin.buffer_kinds[i] = u->sink->ops->buffer_kind;
                    memcpy(begin.buffer_handles[i], u->sink->handle[i], CKPT_IPC_HANDLE_BYTES);
                }
            } else {
                begin.nbuffers = e->buffers.nbuffers;
                for (int i = 0; i < e->buffers.nbuffers; i++) {
                    begin.buffer_fds[i] = e->buffers.fds[i];
                    begin.buffer_sizes[i] = e->buffers.size;
                }
                /* Read in place: this host's pool regions after the IPC buffers. */
                for (size_t i = 0; u->route.in_place && i < u->sources.count; i++) {
                    begin.buffer_fds[begin.nbuffers] = u->sources.fds[i];
                    begin.buffer_sizes[begin.nbuffers++] = ckpt__sources_size(&u->sources, i);
                }
            }
            if (rc == CKPT_OK) rc = ckpt_ipc_begin(e->ipc, &begin, u->cmd->timeout_ms);
            free(mine);
            u->worker_begun = rc == CKPT_OK;
        }
        rc = isolate_worker(u, rc, "BEGIN");
    }
    return agree(u, rc, "worker");
}

/* Whether `rank` leads its host group (the group's lowest rank: groups split by rank). */
static int leads_group(const ckpt_engine_t *e, int rank)
{
    for (int r = 0; r < rank; r++)
        if (e->group_of_rank[r] == e->group_of_rank[rank]) return 0;
    return 1;
}

/* Bucket b into buffer `slot`, first half: the source fills it on its owner and the host
 * leaders start moving it to the hosts that need it (every host, or routed by need). A
 * transfer that cannot be started at once (a tree of several hops) is done here. */
static int post_bucket(ckpt__update_t *u, size_t b, int slot)
{
    ckpt_engine_t *e = u->e;
    const ckpt_bucket_t *bk = &u->plan.buckets[b];
    u->moving[slot].nreq = 0;
    /* Only the owner's host needs it and reads it in its pool: nothing to fill or move. */
    if (ckpt__route_local(&u->route, b)) return CKPT_OK;
    char *buf = e->buffers.ptr[slot];
    double t0 = ckpt__now_s();
    int fill_rc = CKPT_OK;
    if (bk->owner == e->rank) {
        fill_rc = u->src->fill(u, b, buf);
        ckpt__timeline_add(&u->tl, (int)b, CKPT__EV_STAGE, t0);
        ckpt__timeline_bytes(&u->tl, bk->bytes);
    }
    /* The host's leader moves what the owner staged: when another rank of the owner's
     * host staged it, that host's ranks wait for the fill first (the leader would send a
     * buffer still being written). */
    int owner_group = e->group_of_rank[bk->owner];
    if (e->ngroups > 1 && e->group_size > 1 && owner_group == e->group_of_rank[e->rank] &&
        !leads_group(e, bk->owner) &&
        ckpt__barrier(e, e->group, u->coll_ms, "bucket staged") < 0)
        ckpt__engine_fatal(e, ckpt_last_error());
    u->moving[slot].t0 = ckpt__now_s();
    if (e->ngroups > 1 && e->leaders != MPI_COMM_NULL) {
        /* Every host, or (routed by need) only the hosts whose workers need the bucket. */
        uint64_t to = ckpt__route_groups(e, &u->route, b, bk->owner);
        int rc = CKPT_OK;
        int n = ckpt__route_post(e, buf, bk->bytes, owner_group, to, u->moving[slot].req,
                                 (int)CKPT_ARRAY_SIZE(u->moving[slot].req));
        if (n < 0 && to != ckpt__route_everyone(e))
            rc = ckpt__route_send(e, buf, bk->bytes, owner_group, to, u->coll_ms);
        else if (n < 0)
            rc = ckpt__bcast_bytes(e, buf, bk->bytes, owner_group, e->leaders, u->coll_ms,
                                   "bucket broadcast");
        if (rc < 0) ckpt__engine_fatal(e, ckpt_last_error());
        u->moving[slot].nreq = n > 0 ? n : 0;
    }
    return fill_rc;
}

/* Second half: the transfer done, the ranks learn the bucket is ready (they agree on it
 * when the source can fail: before any worker is handed it). fill_rc: post_bucket's. */
static int finish_bucket(ckpt__update_t *u, size_t b, int slot, int fill_rc)
{
    ckpt_engine_t *e = u->e;
    const ckpt_bucket_t *bk = &u->plan.buckets[b];
    if (ckpt__route_local(&u->route, b)) return CKPT_OK;
    int rc = CKPT_OK;
    uint64_t to = ckpt__route_groups(e, &u->route, b, bk->owner);
    const char *what = to == ckpt__route_everyone(e) ? "bucket broadcast" : "routed bucket transfer";
    for (int i = 0; i < u->moving[slot].nreq; i++)
        if (ckpt__mpi_wait(e, &u->moving[slot].req[i], u->coll_ms, 200, what) < 0)
            ckpt__engine_fatal(e, ckpt_last_error());
    u->moving[slot].nreq = 0;
    if (e->ngroups > 1 && e->leaders != MPI_COMM_NULL) {
        ckpt__timeline_add(&u->tl, (int)b, CKPT__EV_BCAST, u->moving[slot].t0);
        /* what this host's leader sent or received of it (none: not among its hosts) */
        ckpt__timeline_bytes(&u->tl, to >> (e->group_of_rank[e->rank] & 63) & 1 ? bk->bytes : 0);
    }
    double t0 = ckpt__now_s();
    if (u->src->may_fail) {
        char what[64];
        snprintf(what, sizeof(what), "%s of bucket %zu", u->src == &ckpt__source_ucx ? "pull"
                                                                                    : "fill", b);
        rc = agree(u, fill_rc, what);
        ckpt__timeline_add(&u->tl, (int)b, CKPT__EV_READY, t0);
    } else if (e->group_size > 1) {
        rc = ckpt__barrier(e, e->group, u->coll_ms, "bucket ready");
        if (rc < 0) ckpt__engine_fatal(e, ckpt_last_error());
        ckpt__timeline_add(&u->tl, (int)b, CKPT__EV_READY, t0);
    }
    return rc;
}

/* Both halves at once (the pipeline with two buffers). */
static int prepare_bucket(ckpt__update_t *u, size_t b, int slot)
{
    return finish_bucket(u, b, slot, post_bucket(u, b, slot));
}

int ckpt__update_put(ckpt__update_t *u, char *dst, const void *src, size_t len)
{
    if (!u->sink) {
        ckpt__copy_bulk(dst, src, len);
        return CKPT_OK;
    }
    u->stage_bytes += len;
    return u->sink->ops->put(u->sink, dst, src, len);
}

static int send_records(ckpt__update_t *u, size_t b, int slot)
{
    ckpt_engine_t *e = u->e;
    const ckpt_bucket_t *bk = &u->plan.buckets[b];
    int buffer = u->direct ? bk->source : slot;
    u->sent_in_place = 0;
    const ckpt_tensor_meta_t *records = &u->plan.tensors[bk->first];
    size_t count = bk->count;
    int local = ckpt__route_local(&u->route, b);
    if (local && e->group_of_rank[bk->owner] != e->group_of_rank[e->rank]) {
        count = 0; /* another host's own bucket: none of it is needed here */
        buffer = 0;
    }
    if (u->wanted || (local && count)) {
        /* Only what the worker needs; a bucket with none of it still goes (empty) so the
         * worker answers every bucket and the ranks stay in step. */
        if (u->records_cap < count) {
            ckpt_tensor_meta_t *grown = realloc(u->records, count * sizeof(*grown));
            if (!grown) return ckpt__error(CKPT_ENOMEM, "bucket %zu: %zu records", b, count);
            u->records = grown;
            u->records_cap = count;
        }
        size_t kept = 0;
        for (size_t i = 0; i < count; i++) {
            if (u->wanted && !u->wanted[bk->first + i]) continue;
            ckpt_tensor_meta_t *r = &u->records[kept++];
            *r = records[i];
            if (!local) continue;
            /* Read in place: the record points into the owner's pool region. */
            ckpt__place_t at = u->plan.src[bk->first + i];
            int rc = ckpt__sources_locate(&u->sources, r, &at);
            if (rc < 0) return rc;
            r->offset = at.offset;
            buffer = e->buffers.nbuffers + at.source;
            u->sent_in_place = 1;
        }
        records = u->records;
        count = kept;
    }
    u->sent_bytes = 0;
    for (size_t i = 0; i < count; i++) u->sent_bytes += records[i].nbytes;
    u->worker_bytes += u->sent_bytes;
    if (!u->route.ncut) return ckpt_ipc_send_bucket(e->ipc, (uint32_t)b, buffer, records, count);
    /* Parts cut by the route: each record says which part of its tensor it holds. */
    if (u->parts_cap < count) {
        ckpt__ipc_part_t *grown = realloc(u->parts, count * sizeof(*grown));
        if (!grown) return ckpt__error(CKPT_ENOMEM, "bucket %zu: %zu parts", b, count);
        u->parts = grown;
        u->parts_cap = count;
    }
    for (size_t i = 0, k = 0; i < bk->count && k < count; i++) {
        if (u->wanted && !u->wanted[bk->first + i]) continue;
        const ckpt__piece_t *pc = ckpt__planned_piece(u, bk->first + i);
        u->parts[k++] = pc->dim < 0 ? (ckpt__ipc_part_t){-1, 0, 0}
                                    : (ckpt__ipc_part_t){pc->dim, pc->start, pc->full};
    }
    return ckpt_ipc_send_bucket_parts(e->ipc, (uint32_t)b, buffer, records, u->parts, count);
}

/* Whether this rank's worker needs any of bucket b. */
static int worker_needs(const ckpt__update_t *u, size_t b)
{
    const ckpt_bucket_t *bk = &u->plan.buckets[b];
    if (ckpt__route_local(&u->route, b) &&
        u->e->group_of_rank[bk->owner] != u->e->group_of_rank[u->e->rank])
        return 0;
    if (!u->wanted) return bk->count > 0;
    for (uint32_t i = 0; i < bk->count; i++)
        if (u->wanted[bk->first + i]) return 1;
    return 0;
}

/* Hands the worker bucket b (in buffer `slot`). Where it needs none of b and a bucket its
 * host reads in place is still to come, it gets that one instead (its host's own reads run
 * while the leaders move b between the other hosts); b is then owed, sent empty at the end
 * (run_pipeline's drain), so every worker still answers every bucket once. */
static int send_bucket(ckpt__update_t *u, size_t b, int slot)
{
    u->sent_at = ckpt__now_s();
    u->sent_id = b;
    u->sent_in_place = 0;
    u->sent_bytes = 0;
    if (!worker_active(u)) return CKPT_OK;
    if (u->steps.own_next < u->steps.nown && !worker_needs(u, b)) {
        u->steps.owed[u->steps.nowed++] = b;
        b = u->steps.own[u->steps.own_next++];
        u->sent_id = b;
    }
    return send_records(u, b, slot);
}

static void progress_bucket_done(ckpt__update_t *u, size_t b)
{
    atomic_fetch_add(&u->e->progress.buckets_done, 1);
    atomic_fetch_add(&u->e->progress.bytes_done, u->plan.buckets[b].bytes);
}

/* Every rank learns whether every worker took bucket b (local_rc: this worker's answer). */
static int agree_bucket(ckpt__update_t *u, size_t b, int local_rc)
{
    double t0 = ckpt__now_s();
    char what[64];
    snprintf(what, sizeof(what), "worker, bucket %zu", b);
    int rc = agree(u, local_rc, what);
    ckpt__timeline_add(&u->tl, (int)b, CKPT__EV_AGREE, t0);
    if (rc == CKPT_OK) progress_bucket_done(u, b);
    return rc;
}

/* The worker's answer to the bucket it was last handed (u->sent_id; send_rc: how sending it
 * went); with isolate a failure cuts the worker out and reads as OK. */
static int bucket_ack(ckpt__update_t *u, int send_rc)
{
    int rc = send_rc;
    if (rc == CKPT_OK && worker_active(u)) rc = ckpt_ipc_wait_ack(u->e->ipc, u->cmd->timeout_ms);
    ckpt__timeline_add(&u->tl, (int)u->sent_id,
                       u->sent_in_place ? CKPT__EV_RELOAD_IN_PLACE : CKPT__EV_RELOAD, u->sent_at);
    ckpt__timeline_bytes(&u->tl, u->sent_bytes);
    if (rc == CKPT_OK) return rc;
    char what[32];
    snprintf(what, sizeof(what), "bucket %zu", u->sent_id);
    return isolate_worker(u, rc, what);
}

/* Waits for the worker's ack of bucket b and agrees on it across ranks. */
static int complete_bucket(ckpt__update_t *u, size_t b, int send_rc)
{
    return agree_bucket(u, b, bucket_ack(u, send_rc));
}

/* Device path, first half of bucket b: its owner fills the device buffer (puts queued on
 * the device) and every rank queues the broadcast; returns the fill's status (agreed later,
 * in device_ready, when the source may fail). */
static int device_enqueue(ckpt__update_t *u, size_t b)
{
    ckpt_engine_t *e = u->e;
    ckpt__sink_t *s = u->sink;
    const ckpt_bucket_t *bk = &u->plan.buckets[b];
    int slot = (int)(b % (size_t)s->nbuffers);
    int fill_rc = CKPT_OK;
    double t0 = ckpt__now_s();
    if (bk->owner == e->rank) {
        if (u->src->host_only) { /* pulled into host memory, then one put */
            char *host = e->buffers.ptr[slot];
            fill_rc = u->src->fill(u, b, host);
            if (fill_rc == CKPT_OK) fill_rc = ckpt__update_put(u, s->ptr[slot], host, bk->bytes);
        } else {
            fill_rc = u->src->fill(u, b, s->ptr[slot]);
        }
        u->enqueued[slot][0] = t0;
        u->enqueued[slot][1] = ckpt__now_s();
    }
    /* A put that failed on a source that cannot fail is the device's failure (a CUDA error
     * leaves its state unknown, and no agreement covers it): the rank stops; the workers
     * learn the update is incomplete. */
    if (fill_rc < 0 && !u->src->may_fail) ckpt__engine_fatal(e, ckpt_last_error());
    /* Every rank queues the broadcast, also after a failed pull: the collective must match
     * on every rank; the agreement keeps the bucket from any worker. */
    int rc = s->ops->move(s, slot, bk->bytes, bk->owner);
    if (rc < 0) ckpt__engine_fatal(e, ckpt_last_error());
    return fill_rc;
}

/* Device path, second half: bucket b is in this rank's buffer, and (a source that can fail)
 * every rank's fill succeeded. */
static int device_ready(ckpt__update_t *u, size_t b, int fill_rc)
{
    ckpt__sink_t *s = u->sink;
    int slot = (int)(b % (size_t)s->nbuffers);
    double t0 = ckpt__now_s();
    ckpt__sink_times_t dt;
    int rc = s->ops->wait(s, slot, u->coll_ms, &dt);
    if (rc < 0) ckpt__engine_fatal(u->e, ckpt_last_error());
    u->stage_s += dt.put_s;
    /* The trace shows the device's own times, counted back from when the broadcast was
     * seen done; where the device could not time the puts, the host's enqueue time. */
    double t1 = ckpt__now_s();
    uint64_t bytes = u->plan.buckets[b].bytes;
    if (dt.put_s > 0)
        ckpt__timeline_span(&u->tl, (int)b, CKPT__EV_STAGE, t1 - dt.put_end - dt.put_s,
                            t1 - dt.put_end);
    else if (u->plan.buckets[b].owner == u->e->rank)
        ckpt__timeline_span(&u->tl, (int)b, CKPT__EV_STAGE, u->enqueued[slot][0],
                            u->enqueued[slot][1]);
    if (dt.put_s > 0 || u->plan.buckets[b].owner == u->e->rank) ckpt__timeline_bytes(&u->tl, bytes);
    ckpt__timeline_span(&u->tl, (int)b, CKPT__EV_BCAST, dt.move_s > 0 ? t1 - dt.move_s : t0, t1);
    ckpt__timeline_bytes(&u->tl, bytes);
    if (!u->src->may_fail) return CKPT_OK;
    char what[64];
    snprintf(what, sizeof(what), "pull of bucket %zu", b);
    return agree(u, fill_rc, what);
}

/* An update that stops with bucket b queued on the device waits for it (every rank stops at
 * the same agreed bucket, so the collective matches): the next update's puts must not land
 * in a buffer a broadcast still writes. */
static void device_drain(ckpt__update_t *u, size_t b)
{
    ckpt__sink_times_t dt;
    if (b < u->plan.nbuckets)
        (void)u->sink->ops->wait(u->sink, (int)(b % (size_t)u->sink->nbuffers), u->coll_ms, &dt);
}

/* The pipeline on a device (sink.h). With two buffers the device works on bucket b+1 while
 * bucket b is broadcast and reloaded: a source whose fill only queues puts on the device
 * queues b+1 as soon as its buffer is free (the worker acknowledged b-1), before the host
 * waits for b's broadcast, so the H2D copy of b+1 runs during it (events order the streams;
 * no host sync in between). A source that fills host memory first (a P2P pull) spends the
 * host's time instead: it pulls b+1 while the worker reloads b. */
static int run_device_pipeline(ckpt__update_t *u)
{
    size_t nb = u->plan.nbuckets;
    int nbuf = u->sink->nbuffers, two = nbuf == 2;
    int early = two && !u->src->host_only;
    int send_rc = CKPT_OK, rc = CKPT_OK, fill_rc[2] = {CKPT_OK, CKPT_OK};
    if (nb == 0) return CKPT_OK;
    fill_rc[0] = device_enqueue(u, 0);
    for (size_t b = 0; b < nb; b++) {
        if (b > 0 && two && (rc = complete_bucket(u, b - 1, send_rc)) < 0) {
            device_drain(u, b);
            return rc;
        }
        if (early && b + 1 < nb) fill_rc[(b + 1) % 2] = device_enqueue(u, b + 1);
        if ((rc = device_ready(u, b, fill_rc[b % (size_t)nbuf])) < 0) {
            if (early) device_drain(u, b + 1);
            return rc;
        }
        send_rc = send_bucket(u, b, (int)(b % (size_t)nbuf));
        if (!two && (rc = complete_bucket(u, b, send_rc)) < 0) return rc;
        if (!early && b + 1 < nb) fill_rc[(b + 1) % (size_t)nbuf] = device_enqueue(u, b + 1);
    }
    return two ? complete_bucket(u, nb - 1, send_rc) : CKPT_OK;
}

/* The pipeline's steps (update.h, `steps`): the buckets that move through the buffers, in
 * plan order, and the ones this rank's host reads in place. Every rank decides alike. */
static void plan_steps(ckpt__update_t *u)
{
    size_t nb = u->plan.nbuckets;
    int me = u->e->group_of_rank[u->e->rank];
    u->steps.order = malloc((nb + 1) * sizeof(size_t));
    u->steps.own = malloc((nb + 1) * sizeof(size_t));
    u->steps.owed = malloc((nb + 1) * sizeof(size_t));
    if (!u->steps.order || !u->steps.own || !u->steps.owed) /* the others go on: no agreement */
        ckpt__engine_fatal(u->e, "no memory for the pipeline's steps");
    for (size_t b = 0; b < nb; b++) {
        if (!ckpt__route_local(&u->route, b)) {
            u->steps.order[u->steps.n++] = b;
            continue;
        }
        u->steps.nlocal++;
        if (u->e->group_of_rank[u->plan.buckets[b].owner] == me) u->steps.own[u->steps.nown++] = b;
    }
    if (u->e->buffers.nbuffers < 3 || u->e->ngroups < 2) return;
    /* Two buckets in flight: take the owners' hosts in turn, so that the two come from
     * different hosts (each host's link busy both ways) wherever the plan allows. The
     * steps of each host keep their order (a counting sort by host, then round robin). */
    int G = u->e->ngroups;
    size_t *at = calloc((size_t)G + 1, sizeof(size_t)), *end = calloc((size_t)G, sizeof(size_t));
    size_t *byhost = malloc((u->steps.n + 1) * sizeof(size_t));
    if (!at || !end || !byhost) ckpt__engine_fatal(u->e, "no memory for the pipeline's steps");
    for (size_t i = 0; i < u->steps.n; i++)
        at[u->e->group_of_rank[u->plan.buckets[u->steps.order[i]].owner] + 1]++;
    for (int g = 0; g < G; g++) at[g + 1] += at[g];
    for (int g = 0; g < G; g++) end[g] = at[g];
    for (size_t i = 0; i < u->steps.n; i++) {
        size_t b = u->steps.order[i];
        byhost[end[u->e->group_of_rank[u->plan.buckets[b].owner]]++] = b;
    }
    for (size_t k = 0; k < u->steps.n;)
        for (int g = 0; g < G; g++)
            if (at[g] < end[g]) u->steps.order[k++] = byhost[at[g]++];
    free(at), free(end), free(byhost);
}

/* After the last step: the worker is handed what is left, one bucket at a time with no
 * agreement in between (so each host reads its own buckets at once): its host's own
 * buckets not yet read, then the owed steps and the other hosts' own buckets (empty, so
 * it answers every bucket once); then the ranks agree on all of them. */
static int drain_local(ckpt__update_t *u)
{
    if (u->steps.nlocal == 0) return CKPT_OK;
    int rc = CKPT_OK, me = u->e->group_of_rank[u->e->rank];
    size_t nb = u->plan.nbuckets;
    for (size_t i = 0; rc == CKPT_OK && i < nb + u->steps.nowed; i++) {
        size_t b;
        if (i < nb) { /* own buckets left, and other hosts' own buckets (empty here) */
            b = i;
            if (!ckpt__route_local(&u->route, b)) continue;
            int own = u->e->group_of_rank[u->plan.buckets[b].owner] == me;
            /* own buckets are handed in order: the first own_next were read during steps */
            if (own && u->steps.own_next > 0 && b <= u->steps.own[u->steps.own_next - 1])
                continue;
        } else {
            b = u->steps.owed[i - nb];
        }
        u->sent_at = ckpt__now_s();
        u->sent_id = b;
        u->sent_in_place = 0;
        u->sent_bytes = 0;
        if (!worker_active(u)) continue;
        int send_rc = i < nb ? send_records(u, b, 0)
                             : ckpt_ipc_send_bucket(u->e->ipc, (uint32_t)b, 0, NULL, 0);
        rc = bucket_ack(u, send_rc);
    }
    double t0 = ckpt__now_s();
    rc = agree(u, rc, "worker, buckets read in place");
    ckpt__timeline_add(&u->tl, -1, CKPT__EV_AGREE, t0);
    if (rc < 0) return rc;
    for (size_t b = 0; b < nb; b++)
        if (ckpt__route_local(&u->route, b)) progress_bucket_done(u, b);
    return CKPT_OK;
}

/* Waits for the transfer still in flight into `slot` (an update that stops with it
 * posted: every rank stops at the same agreed step, so every leader waits for it). */
static void drain_moving(ckpt__update_t *u, int slot)
{
    for (int i = 0; i < u->moving[slot].nreq; i++)
        (void)ckpt__mpi_wait(u->e, &u->moving[slot].req[i], u->coll_ms, 200, "bucket transfer");
    u->moving[slot].nreq = 0;
}

/* The host pipeline with three buffers across hosts: buckets k+1 and k+2 move between hosts
 * (their transfers started, progressed by MPI while this rank waits for k+1) while the
 * worker reads bucket k; bucket k+3 goes into k's buffer once every worker acknowledged k. */
static int run_in_flight(ckpt__update_t *u)
{
    const size_t *order = u->steps.order;
    size_t n = u->steps.n;
    int fill[3] = {CKPT_OK, CKPT_OK, CKPT_OK}, send_rc = CKPT_OK, rc;
    for (size_t k = 0; k < 2 && k < n; k++) fill[k] = post_bucket(u, order[k], (int)k);
    for (size_t k = 0; k < n; k++) {
        int slot = (int)(k % 3), next = (int)((k + 1) % 3);
        if ((rc = finish_bucket(u, order[k], slot, fill[slot])) < 0) {
            drain_moving(u, next);
            return rc;
        }
        if (k > 0 && (rc = complete_bucket(u, order[k - 1], send_rc)) < 0) {
            drain_moving(u, next);
            return rc;
        }
        send_rc = send_bucket(u, order[k], slot);
        if (k + 2 < n) fill[(k + 2) % 3] = post_bucket(u, order[k + 2], (int)((k + 2) % 3));
    }
    if (n > 0 && (rc = complete_bucket(u, order[n - 1], send_rc)) < 0) return rc;
    return drain_local(u);
}

static int run_pipeline(ckpt__update_t *u)
{
    size_t nb = u->plan.nbuckets;
    if (u->sink) return run_device_pipeline(u);
    int two = u->e->buffers.nbuffers == 2;
    int send_rc = CKPT_OK, rc = CKPT_OK;
    if (u->src->in_place) {
        /* Nothing to prepare: every window is already in a pool the workers have mapped.
         * As soon as the worker acknowledged window b it gets window b+1, and the ranks
         * agree on b while it copies: the agreement's latency is hidden. A failure agreed
         * for b aborts the update with b+1 outstanding, which the ABORT collects. */
        if (nb == 0) return CKPT_OK;
        send_rc = send_bucket(u, 0, 0);
        for (size_t b = 0; b < nb; b++) {
            int ack = bucket_ack(u, send_rc);
            if (ack == CKPT_OK && b + 1 < nb) send_rc = send_bucket(u, b + 1, 0);
            if ((rc = agree_bucket(u, b, ack)) < 0) return rc;
        }
        return CKPT_OK;
    }
    plan_steps(u);
    if (u->e->buffers.nbuffers == 3) return run_in_flight(u);
    const size_t *order = u->steps.order;
    size_t n = u->steps.n;
    for (size_t k = 0; k < n; k++) {
        int slot = (int)(k % (size_t)u->e->buffers.nbuffers);
        if (!two && k > 0 && (rc = complete_bucket(u, order[k - 1], send_rc)) < 0) return rc;
        int prc = prepare_bucket(u, order[k], slot);
        if (two && k > 0 && (rc = complete_bucket(u, order[k - 1], send_rc)) < 0) return rc;
        if (prc < 0) return prc; /* agreed by every rank; bucket b never reached a worker */
        send_rc = send_bucket(u, order[k], slot);
    }
    if (n > 0 && (rc = complete_bucket(u, order[n - 1], send_rc)) < 0) return rc;
    return drain_local(u);
}

/* Rank 0 learns the bytes each worker was handed (result: worker_bytes). Every rank
 * calls it after the pipeline, whatever its outcome (agreed). */
static void gather_worker_bytes(ckpt__update_t *u)
{
    ckpt_engine_t *e = u->e;
    uint64_t *all = NULL;
    if (e->rank == 0 && !(all = ckpt__calloc((size_t)e->size, sizeof(*all))))
        ckpt__engine_fatal(e, "no memory to gather the workers' bytes");
    MPI_Request req;
    MPI_Igather(&u->worker_bytes, 1, MPI_UINT64_T, all, 1, MPI_UINT64_T, 0, e->world, &req);
    if (ckpt__mpi_wait(e, &req, u->coll_ms, 200, "workers' bytes") < 0)
        ckpt__engine_fatal(e, ckpt_last_error());
    if (!all) return;
    u->res->nworkers = (uint32_t)CKPT_MIN(e->size, CKPT_WORKERS_MAX);
    for (uint32_t r = 0; r < u->res->nworkers; r++) u->res->worker_bytes[r] = all[r];
    ckpt__free(all);
}

/* One isolated worker as rank 0 gathers it. */
typedef struct {
    int32_t isolated, pid, status, pad;
    char reason[sizeof(((ckpt_isolated_worker_t *)0)->reason)];
} isolated_msg_t;

/* isolate: rank 0 learns which workers were cut out (one integer allreduce when none was;
 * a gather otherwise) and lists them in the result. When no worker is left the update
 * failed after all: nobody holds the new weights. Returns the update's status. */
static int gather_isolated(ckpt__update_t *u, int rc)
{
    ckpt_engine_t *e = u->e;
    ckpt_update_result_t *res = u->res;
    int mine[2] = {u->isolated, e->ipc != NULL}, sum[2] = {0, 0};
    MPI_Request req;
    MPI_Iallreduce(mine, sum, 2, MPI_INT, MPI_SUM, e->world, &req);
    if (ckpt__mpi_wait(e, &req, u->coll_ms, 200, "isolated workers") < 0)
        ckpt__engine_fatal(e, ckpt_last_error());
    res->nisolated = (uint32_t)sum[0];
    if (sum[0] == 0) return rc;
    isolated_msg_t msg, *all = NULL;
    memset(&msg, 0, sizeof(msg));
    msg.isolated = u->isolated;
    msg.pid = u->worker_pid;
    msg.status = u->isolated_status;
    ckpt__strlcpy(msg.reason, u->isolated_reason, sizeof(msg.reason));
    if (e->rank == 0) {
        all = ckpt__calloc((size_t)e->size, sizeof(*all));
        if (!all) ckpt__engine_fatal(e, "no memory to gather isolated workers");
    }
    MPI_Igather(&msg, (int)sizeof(msg), MPI_BYTE, all, (int)sizeof(msg), MPI_BYTE, 0, e->world,
                &req);
    if (ckpt__mpi_wait(e, &req, u->coll_ms, 200, "isolated workers") < 0)
        ckpt__engine_fatal(e, ckpt_last_error());
    uint32_t n = 0;
    for (int r = 0; all && r < e->size; r++) {
        if (!all[r].isolated || n == CKPT_ISOLATED_MAX) continue;
        ckpt_isolated_worker_t *w = &res->isolated[n++];
        w->rank = r;
        w->worker_pid = all[r].pid;
        w->status = all[r].status < 0 ? all[r].status : CKPT_EPEER;
        ckpt__strlcpy(w->reason, all[r].reason, sizeof(w->reason));
    }
    ckpt__free(all);
    if (rc < 0 || sum[0] < sum[1]) return rc;
    /* No worker is left: the same verdict on every rank (rank 0 names the first). */
    res->failed_rank = e->rank == 0 ? res->isolated[0].rank : -1;
    snprintf(res->reason, sizeof(res->reason), "every worker was isolated (%d of %d)%s%s",
             sum[0], sum[1], e->rank == 0 ? "; the first: " : "",
             e->rank == 0 ? res->isolated[0].reason : "");
    return ckpt__error(e->rank == 0 ? res->isolated[0].status : CKPT_EPEER, "%s", res->reason);
}

static int update_run(ckpt_engine_t *e, const ckpt__cmd_t *cmd, const char *trace_path,
                      ckpt_update_result_t *res, ckpt__p2p_t *p2p);

int ckpt__update_run(ckpt_engine_t *e, const ckpt__cmd_t *cmd, const char *trace_path,
                     ckpt_update_result_t *res)
{
    return update_run(e, cmd, trace_path, res, NULL);
}

int ckpt__update_run_p2p(ckpt_engine_t *e, const ckpt__cmd_t *cmd, const void *metas,
                         size_t metas_len, const char *trace_path, ckpt_update_result_t *res)
{
    ckpt__p2p_t *p2p = NULL;
    int coll_ms = ckpt__peer_timeout_ms(cmd->timeout_ms);
    int rc = ckpt__p2p_open(e, metas, metas_len, &p2p);
    char reason[CKPT__REASON_MAX];
    int failed = -1;
    rc = ckpt__agree(e, rc, rc < 0 ? ckpt_last_error() : NULL, coll_ms, &failed, reason,
                     sizeof(reason));
    if (rc < 0) {
        if (e->broken) ckpt__engine_fatal(e, ckpt_last_error());
        memset(res, 0, sizeof(*res));
        res->status = rc;
        res->failed_rank = failed;
        res->p2p = 1;
        res->update_id = cmd->update_id;
        snprintf(res->reason, sizeof(res->reason), "%s", reason);
        ckpt__p2p_close(e, p2p);
        return rc;
    }
    /* Workers learn the serving checkpoint's name and version. */
    ckpt__cmd_t c = *cmd;
    ckpt__strlcpy(c.name, p2p->metas.name, sizeof(c.name));
    c.version = p2p->metas.version;
    c.direct = 0;
    rc = update_run(e, &c, trace_path, res, p2p);
    /* The pull phase over all ranks: bytes pulled over the time spent pulling. */
    double pull[2] = {p2p->pull_s, (double)p2p->pull_bytes}, sum[2] = {0, 0};
    MPI_Request req;
    MPI_Iallreduce(pull, sum, 2, MPI_DOUBLE, MPI_SUM, e->world, &req);
    if (ckpt__mpi_wait(e, &req, coll_ms, 200, "pull statistics") < 0)
        ckpt__engine_fatal(e, ckpt_last_error());
    res->p2p = 1;
    res->pull_s = sum[0];
    res->pull_bytes = (uint64_t)sum[1];
    ckpt__p2p_close(e, p2p);
    return rc;
}

static int update_run(ckpt_engine_t *e, const ckpt__cmd_t *cmd, const char *trace_path,
                      ckpt_update_result_t *res, ckpt__p2p_t *p2p)
{
    ckpt__update_t u;
    memset(&u, 0, sizeof(u));
    u.e = e;
    u.cmd = cmd;
    u.res = res;
    u.p2p = p2p;
    u.coll_ms = ckpt__peer_timeout_ms(cmd->timeout_ms);
    memset(res, 0, sizeof(*res));
    res->failed_rank = -1;
    res->nranks = e->size;
    res->version = cmd->version;
    res->update_id = cmd->update_id;
    ckpt__strlcpy(res->name, cmd->name, sizeof(res->name));
    atomic_store(&e->progress.update_id, cmd->update_id);
    atomic_store(&e->progress.buckets_done, 0);
    atomic_store(&e->progress.nbuckets, 0);
    atomic_store(&e->progress.bytes_done, 0);
    atomic_store(&e->progress.bytes_total, 0);
    atomic_store(&e->progress.start_ns, ckpt__now_ns());
    atomic_store(&e->progress.running, 1);
    /* Direct reads need every rank on one host (one group) sharing memory. */
    u.sink = e->sink;
    u.direct = cmd->direct && !p2p && !u.sink && e->ngroups == 1 && e->group_size == e->size &&
               e->opts.share_mode == CKPT_SHARE_NODE;

    /* A common start so that every rank's timeline shares one origin. */
    if (ckpt__barrier(e, e->world, u.coll_ms, "update start") < 0)
        ckpt__engine_fatal(e, ckpt_last_error());
    double t_start = ckpt__now_s(), t = t_start;
    ckpt_tensor_meta_t *all = NULL;
    size_t count = 0;
    int rc = gather_metas(&u, &all, &count);
    if (rc == CKPT_OK) {
        rc = agree(&u, ckpt__needs_local(e, all, count, cmd->partial, &u.needs), "worker needs");
        if (rc == CKPT_OK &&
            (rc = ckpt__needs_union(e, all, &count, cmd->ignore_unneeded, u.coll_ms, &u.needs)) < 0)
            fail_result(&u, rc, -1, ckpt_last_error()); /* the same text on every rank */
        /* On a device every rank has its own buffer and NCCL broadcasts to all: no route
         * by host (declared needs still choose what each worker is sent). */
        if (rc == CKPT_OK && !u.sink &&
            (rc = ckpt__route_init(e, &u.needs, all, count, p2p != NULL,
                                   cmd->verify ? CKPT__CUT_NONE : CKPT__CUT_ALL, u.coll_ms,
                                   &u.route)) < 0)
            fail_result(&u, rc, -1, ckpt_last_error()); /* agreed inside: every rank fails */
        res->need_bytes_max = u.needs.bytes_max;
        res->need_bytes_total = u.needs.bytes_total;
        res->unneeded = u.needs.unneeded;
    }
    res->gather_s = ckpt__now_s() - t;
    if (rc < 0) goto out;
    u.manifest = all;
    u.nmanifest = count;
    t = ckpt__now_s();
    rc = plan_update(&u, all, count);
    res->plan_s = ckpt__now_s() - t;
    if (rc < 0) goto out;
    t = ckpt__now_s();
    rc = begin_workers(&u);
    res->begin_s = ckpt__now_s() - t;
    if (rc < 0) goto finish;
    t = ckpt__now_s();
    rc = run_pipeline(&u);
    res->pipeline_s = ckpt__now_s() - t;
    gather_worker_bytes(&u);
    if (u.sink) { /* the owners' H2D time and bytes, summed over ranks */
        double mine[2] = {u.stage_s, (double)u.stage_bytes}, sum[2] = {0, 0};
        MPI_Request req;
        MPI_Iallreduce(mine, sum, 2, MPI_DOUBLE, MPI_SUM, e->world, &req);
        if (ckpt__mpi_wait(e, &req, u.coll_ms, 200, "device statistics") < 0)
            ckpt__engine_fatal(e, ckpt_last_error());
        res->stage_s = sum[0];
        res->stage_bytes = (uint64_t)sum[1];
    }

finish:
    t = ckpt__now_s();
    if (u.worker_begun) {
        /* FINISH only when every rank agreed on every bucket; otherwise the worker learns
         * that the update is incomplete and why. */
        int frc = ckpt_ipc_finish(e->ipc, rc == CKPT_OK, rc == CKPT_OK ? NULL : res->reason,
                                  cmd->timeout_ms);
        if (rc == CKPT_OK) rc = isolate_worker(&u, frc, "post-hook");
        else ckpt__error_clear();
    }
    if (res->status == CKPT_OK) rc = agree(&u, rc, "worker post-hook");
    /* Every rank reaches this point with the same rc (agreed), so the gather is safe. */
    if (cmd->isolate) rc = gather_isolated(&u, rc);
    /* Second phase: every rank now knows every worker's FINISH answer, so every worker gets
     * the same outcome: COMMIT, or ABORT when any rank or worker failed (also a worker that
     * died in its post-hook): no worker reports complete for an update that failed. */
    if (u.worker_begun && ckpt_ipc_deciding(e->ipc)) {
        int drc = rc == CKPT_OK ? ckpt_ipc_commit(e->ipc, cmd->timeout_ms)
                                : ckpt_ipc_finish(e->ipc, 0, res->reason, cmd->timeout_ms);
        /* A worker lost now only misses the decision; it sees EOF and reports incomplete. */
        if (drc < 0) ckpt_warn("update %llu: %s", (unsigned long long)cmd->update_id,
                               ckpt_last_error());
        ckpt__error_clear();
    }
    res->finish_s = ckpt__now_s() - t;
    if (u.tl.events) {
        char label[CKPT_NAME_MAX + 160];
        if (u.needs.any_declared) /* the bytes the workers asked for, in the trace's title */
            snprintf(label, sizeof(label), "%s #%llu (declared needs: busiest worker %llu "
                     "bytes, all workers %llu)", cmd->name, (unsigned long long)cmd->update_id,
                     (unsigned long long)res->need_bytes_max,
                     (unsigned long long)res->need_bytes_total);
        else
            snprintf(label, sizeof(label), "%s #%llu", cmd->name,
                     (unsigned long long)cmd->update_id);
        int trc = ckpt__timeline_write(e, &u.tl, trace_path, label, u.coll_ms);
        if (trc < 0 && e->broken) ckpt__engine_fatal(e, ckpt_last_error());
        if (trc < 0) ckpt_warn("%s", ckpt_last_error());
    }
out:
    res->total_s = ckpt__now_s() - t_start;
    res->status = rc;
    atomic_store(&e->progress.end_ns, ckpt__now_ns());
    atomic_store(&e->progress.running, 0);
    if (rc < 0 && res->reason[0] == '\0')
        snprintf(res->reason, sizeof(res->reason), "%s", ckpt_last_error());
    ckpt__timeline_free(&u.tl);
    ckpt__needs_free(&u.needs);
    ckpt__route_free(&u.route);
    free(u.records);
    free(u.parts);
    free(u.steps.order);
    free(u.steps.own);
    free(u.steps.owed);
    free(u.wanted);
    ckpt__sources_close(&u.sources);
    ckpt__plan_free(&u.plan);
    ckpt__free(u.src_owner);
    ckpt__free(u.local_data);
    ckpt__free(all);
    return rc;
}

void ckpt__prepare_workers(ckpt_engine_t *e, const ckpt__cmd_t *cmd)
{
    if (!(cmd->direct && !e->sink && e->ngroups == 1 && e->group_size == e->size &&
          e->opts.share_mode == CKPT_SHARE_NODE))
        return;
    int coll_ms = ckpt__peer_timeout_ms(cmd->timeout_ms);
    ckpt__sources_t src;
    int rc = ckpt__sources_open(e, cmd->name, coll_ms, &src);
    if (rc < 0 && e->broken) ckpt__engine_fatal(e, ckpt_last_error());
    if (rc == CKPT_OK && e->ipc && src.count <= CKPT_IPC_MAX_BUFFERS) {
        ckpt_ipc_server_wait_worker(e->ipc, 0); /* accepts a worker already knocking */
        if (ckpt_ipc_server_has_worker(e->ipc)) {
            ckpt_ipc_begin_t b;
            memset(&b, 0, sizeof(b));
            b.name = cmd->name;
            b.version = cmd->version;
            b.nbuffers = (int)src.count;
            for (size_t i = 0; i < src.count; i++) {
                b.buffer_fds[i] = src.fds[i];
                b.buffer_sizes[i] = ckpt__sources_size(&src, i);
            }
            /* Sent, not waited for: the ranks agreed on the registration already and rank 0
             * moves on, so a worker that does not answer must not hold this rank. */
            rc = ckpt_ipc_prepare(e->ipc, &b, cmd->timeout_ms);
        }
    }
    /* Best effort: a worker that could not map now maps at its next update's BEGIN. */
    if (rc < 0) ckpt_warn("preparing the worker for '%s': %s", cmd->name, ckpt_last_error());
    ckpt__error_clear();
    ckpt__sources_close(&src);
}
