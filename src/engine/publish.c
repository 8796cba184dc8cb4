/* Registering what trainers published (docs/PUBLISH.md). Each rank's publish socket
 * (src/publish/publish_server.c) keeps parts pending; this command, run by every rank
 * between other commands, turns complete checkpoints into registrations:
 *
 *   1. one integer allreduce: are any parts pending anywhere? (the idle cost)
 *   2. every rank takes its pending parts and allgathers their descriptions (name, part,
 *      step, tensors), so every rank makes the same decisions from the same data;
 *   3. per name, in name order: older steps are superseded; a complete set of parts with
 *      disjoint tensors is registered (every rank adopts its own parts' memfds in place and
 *      lists the others' tensors; a registered name gets the new version under a scratch
 *      name first and is swapped once every rank has it); overlapping or duplicated parts
 *      are refused; parts waiting longer than the bound are dropped naming the missing ones;
 *   4. each rank answers its waiting trainers; parts still incomplete go back to the table.
 *
 * Updates run on rank 0's main thread, as does this command: the swap never happens under
 * an update, and at most two versions of a name are held (the registered one and the one
 * being registered). */
#include <stdio.h>
#include <stdlib.h>
#include <fcntl.h>
#include <string.h>

#include "engine/coll.h"
#include "engine/command.h"
#include "engine/p2p.h"
#include "engine/publish.h"
#include "engine/update.h"
#include "publish/publish_int.h"

/* Store name of a new version until every rank has it. A publisher's name cannot start
 * with a control character (ckpt__pub_check_name), so this never collides. */
#define SCRATCH_NAME "\001publish-next"
#define REGION_ALIGN (2ull << 20)

/* A part's description as every rank sees it (allgathered raw: one binary everywhere). */
typedef struct {
    char name[CKPT_NAME_MAX];
    uint32_t part, nparts;
    uint64_t step;
    uint64_t size;
    uint64_t age_ms;
    uint64_t ntensors;
    int32_t rank;
    int32_t index; /* in that rank's taken array */
} pub_desc_t;

typedef struct {
    const pub_desc_t *d;
    const ckpt_tensor_meta_t *metas; /* offset = absolute offset in its memfd */
    int outcome;                     /* KEEP, DROP or REGISTERED */
    int status;
    uint64_t version;
    const char *text;                /* the name's reason (plan) or a superseded text */
    char own_text[160];
} entry_t;

enum { KEEP = 0, DROP = 1, REGISTERED = 2 };

int ckpt__publish_open(ckpt_engine_t *e)
{
    char path[CKPT__PATH_MAX + 32];
    snprintf(path, sizeof(path), "%s/publish-%d.sock", e->socket_dir, e->rank);
    /* A request must arrive within the engine's timeout once a trainer connected. */
    return ckpt__pub_server_open(path, e->opts.timeout_ms, &e->pub);
}

void ckpt__publish_close(ckpt_engine_t *e)
{
    ckpt__pub_server_close(e->pub);
    e->pub = NULL;
}

static int by_name_step(const void *a, const void *b)
{
    const entry_t *x = a, *y = b;
    int c = strcmp(x->d->name, y->d->name);
    if (c) return c;
    if (x->d->step != y->d->step) return x->d->step > y->d->step ? -1 : 1;
    if (x->d->part != y->d->part) return x->d->part < y->d->part ? -1 : 1;
    return x->d->rank - y->d->rank;
}

typedef struct {
    const char *name;
    const entry_t *e;
} tensor_ref_t;

static int by_tensor(const void *a, const void *b)
{
    const tensor_ref_t *x = a, *y = b;
    int c = strcmp(x->name, y->name);
    if (c) return c;
    return x->e->d->part < y->e->d->part ? -1 : x->e->d->part > y->e->d->part;
}

/* Appends ", %u" to a list text, ending in "..." when it does not fit. */
static void list_add(char *buf, size_t cap, uint32_t v)
{
    size_t n = strlen(buf);
    if (n + 16 >= cap) {
        if (n + 4 < cap && strcmp(buf + n - 3, "...") != 0) strcat(buf, "...");
        return;
    }
    snprintf(buf + n, cap - n, "%s%u", n ? ", " : "", v);
}

/* The decision for the current step's parts of one name [first, first + n) of the sorted
 * entries: 1 when complete and consistent (register), 0 when it waits, -1 when refused or
 * expired (reason filled). A pure function of gathered data: same answer on every rank. */
static int decide(entry_t *ents, size_t n, int missing_ms, const char *expire, char *reason,
                  size_t cap, int *status_out)
{
    const pub_desc_t *d0 = ents[0].d;
    uint32_t nparts = d0->nparts;
    uint64_t age = 0;
    for (size_t i = 0; i < n; i++) {
        const pub_desc_t *d = ents[i].d;
        age = CKPT_MAX(age, d->age_ms);
        if (d->nparts != nparts) {
            *status_out = CKPT_EINVAL;
            snprintf(reason, cap, "publish '%s' step %llu: the parts disagree on their number: "
                     "part %u says %u parts, part %u says %u", d0->name,
                     (unsigned long long)d0->step, d0->part, nparts, d->part, d->nparts);
            return -1;
        }
        if (i && ents[i - 1].d->part == d->part) {
            *status_out = CKPT_EEXIST;
            snprintf(reason, cap, "publish '%s' step %llu: part %u was published twice (to "
                     "rank %d and rank %d); every part goes to one rank once", d0->name,
                     (unsigned long long)d0->step, d->part, (int)ents[i - 1].d->rank,
                     (int)d->rank);
            return -1;
        }
    }
    if (n == nparts) return 1; /* parts 0..nparts-1, each once: complete */
    int expired = (expire && strcmp(expire, d0->name) == 0) ||
                  (missing_ms >= 0 && age >= (uint64_t)missing_ms);
    if (!expired) return 0;
    char missing[200] = "", arrived[200] = "";
    size_t at = 0;
    for (uint32_t p = 0; p < nparts; p++) {
        if (at < n && ents[at].d->part == p) {
            char one[48];
            snprintf(one, sizeof(one), "%s%u on rank %d", arrived[0] ? ", " : "", p,
                     (int)ents[at].d->rank);
            if (strlen(arrived) + strlen(one) + 4 < sizeof(arrived)) strcat(arrived, one);
            at++;
        } else {
            list_add(missing, sizeof(missing), p);
        }
    }
    *status_out = CKPT_ETIMEDOUT;
    snprintf(reason, cap, "publish '%s' step %llu: part(s) %s of %u missing %llu ms after the "
             "first arrived (arrived: %s); dropped the parts that came: publish every part, "
             "or wait longer (await-published timeout=, serve --timeout-ms)", d0->name,
             (unsigned long long)d0->step, missing, nparts, (unsigned long long)age, arrived);
    return -1;
}

/* Overlap check over a complete set: -1 with the reason naming the tensor and both parts. */
static int check_disjoint(entry_t *ents, size_t n, char *reason, size_t cap, uint64_t *bytes,
                          uint32_t *ntensors)
{
    size_t total = 0;
    for (size_t i = 0; i < n; i++) total += ents[i].d->ntensors;
    tensor_ref_t *refs = ckpt__calloc(total, sizeof(*refs));
    if (!refs) {
        snprintf(reason, cap, "publish '%s': out of memory checking the parts", ents[0].d->name);
        return -1;
    }
    size_t k = 0;
    *bytes = 0;
    for (size_t i = 0; i < n; i++)
        for (uint64_t t = 0; t < ents[i].d->ntensors; t++) {
            refs[k].name = ents[i].metas[t].name;
            refs[k++].e = &ents[i];
            *bytes += ents[i].metas[t].nbytes;
        }
    qsort(refs, total, sizeof(*refs), by_tensor);
    int rc = 0;
    for (size_t i = 1; i < total && rc == 0; i++)
        if (strcmp(refs[i - 1].name, refs[i].name) == 0) {
            const pub_desc_t *a = refs[i - 1].e->d, *b = refs[i].e->d;
            snprintf(reason, cap, "publish '%s' step %llu: tensor '%s' is in part %u (rank %d) "
                     "and in part %u (rank %d); the parts of a checkpoint must hold disjoint "
                     "tensors: nothing was registered", a->name, (unsigned long long)a->step,
                     refs[i].name, a->part, (int)a->rank, b->part, (int)b->rank);
            rc = -1;
        }
    *ntensors = (uint32_t)total;
    ckpt__free(refs);
    return rc;
}

static int checkpoint_index(const ckpt_engine_t *e, const char *name)
{
    for (size_t i = 0; i < e->ncheckpoints; i++)
        if (strcmp(e->checkpoints[i].name, name) == 0) return (int)i;
    return -1;
}

/* Unregisters the replaced version; the memfds a pull filled go back to the publish
 * listener, which refills them at the next step (no new pages). Nothing reads the old
 * version any more: updates run on this thread, joiners were refused by the unexport,
 * and workers drop their mappings of it when the new version is prepared. */
static void recycle_regions(ckpt_engine_t *e, const char *name)
{
    const ckpt_pool_region_t *rg = NULL;
    size_t n = 0;
    int fds[64];
    size_t nfds = 0;
    if (e->pub && ckpt_store_regions(e->store, name, &rg, &n) == CKPT_OK)
        for (size_t i = 0; i < n && nfds < CKPT_ARRAY_SIZE(fds); i++)
            if (rg[i].fd >= 0 && (fds[nfds] = fcntl(rg[i].fd, F_DUPFD_CLOEXEC, 0)) >= 0) nfds++;
    ckpt_store_unregister(e->store, name);
    for (size_t i = 0; i < nfds; i++) ckpt__pub_server_recycle(e->pub, fds[i]);
}

/* Registers a complete, disjoint set on every rank (collective). */
static int register_set(ckpt_engine_t *e, const ckpt__cmd_t *cmd, entry_t *ents, size_t n,
                        ckpt__pub_part_t *mine, uint64_t version, int *replaced, char *reason,
                        size_t cap)
{
    const char *name = ents[0].d->name;
    int existing = checkpoint_index(e, name);
    if (existing < 0 && e->ncheckpoints == CKPT__MAX_CHECKPOINTS) {
        snprintf(reason, cap, "publish '%s': %d checkpoints are registered; unregister one "
                 "first", name, CKPT__MAX_CHECKPOINTS);
        return CKPT_EBUSY;
    }
    /* Pool offsets: per rank, its parts in part order, each region 2 MiB-aligned. Every
     * rank computes every rank's layout, so remote tensors get their owners' offsets. */
    uint64_t *acc = ckpt__calloc((size_t)e->size, sizeof(*acc));
    ckpt_store_fd_part_t *parts = ckpt__calloc(n, sizeof(*parts));
    size_t nremote = 0, nlocal = 0;
    for (size_t i = 0; i < n; i++)
        if (ents[i].d->rank != e->rank) nremote += ents[i].d->ntensors;
    ckpt_tensor_meta_t *remote = ckpt__calloc(nremote, sizeof(*remote));
    int local = CKPT_OK;
    if (!acc || !parts || !remote) local = ckpt__error(CKPT_ENOMEM, "publish '%s': out of memory", name);
    size_t r_at = 0;
    for (size_t i = 0; local == CKPT_OK && i < n; i++) { /* ents are in part order */
        const pub_desc_t *d = ents[i].d;
        uint64_t off = acc[d->rank];
        acc[d->rank] += CKPT_ALIGN_UP(CKPT_MAX(d->size, 1), REGION_ALIGN);
        if (d->rank == e->rank) {
            ckpt__pub_part_t *p = &mine[d->index];
            parts[nlocal++] = (ckpt_store_fd_part_t){p->fd, p->req.size, off, p->metas, p->count};
            continue;
        }
        for (uint64_t t = 0; t < d->ntensors; t++) {
            remote[r_at] = ents[i].metas[t];
            remote[r_at].offset += off;
            remote[r_at++].owner = d->rank;
        }
    }
    const char *store_name = existing >= 0 ? SCRATCH_NAME : name;
    if (local == CKPT_OK)
        local = ckpt_store_register_fds(e->store, store_name, e->rank, parts, nlocal, remote,
                                        nremote);
    ckpt__free(acc);
    ckpt__free(parts);
    ckpt__free(remote);
    int failed = -1;
    char agreed[CKPT__REASON_MAX];
    int rc = ckpt__agree(e, local, local < 0 ? ckpt_last_error() : NULL,
                         ckpt__peer_timeout_ms(e->opts.timeout_ms), &failed, agreed,
                         sizeof(agreed));
    if (rc == CKPT_ETIMEDOUT && e->broken) ckpt__engine_fatal(e, ckpt_last_error());
    if (rc < 0) {
        if (local == CKPT_OK) ckpt_store_unregister(e->store, store_name);
        /* Cut on purpose: the rank's own text comes first and names the cause. */
        snprintf(reason, cap, "publish '%.120s': registering failed on %.350s", name, agreed);
        return rc;
    }
    /* Every rank has the new version: the store now owns the memfds. */
    for (size_t i = 0; i < n; i++)
        if (ents[i].d->rank == e->rank) mine[ents[i].d->index].fd = -1;
    if (existing >= 0) {
        ckpt__checkpoint_entry_t *c = &e->checkpoints[existing];
        ckpt__p2p_unexport(e, c); /* joiners refuse the old version from now on */
        recycle_regions(e, name);
        ckpt_store_rename(e->store, SCRATCH_NAME, name); /* cannot fail: name is free */
        c->version = version;
        *replaced = 1;
    } else {
        ckpt__checkpoint_entry_t *c = &e->checkpoints[e->ncheckpoints++];
        memset(c, 0, sizeof(*c));
        ckpt__strlcpy(c->name, name, sizeof(c->name));
        c->version = version;
        c->guard_slot = -1;
    }
    ckpt__cmd_t prep;
    memset(&prep, 0, sizeof(prep));
    ckpt__strlcpy(prep.name, name, sizeof(prep.name));
    prep.version = version;
    prep.direct = cmd->direct;
    prep.timeout_ms = e->opts.timeout_ms;
    ckpt__prepare_workers(e, &prep); /* workers map the new pools, drop the old */
    return CKPT_OK;
}

/* Allgathers every rank's pending parts. *buf_out holds descs each followed by metas. */
static int gather(ckpt_engine_t *e, ckpt__pub_part_t *mine, size_t nmine, char **buf_out,
                  size_t *len_out)
{
    size_t bytes = 0;
    uint64_t now = ckpt__now_ns();
    for (size_t i = 0; i < nmine; i++)
        bytes += sizeof(pub_desc_t) + mine[i].count * sizeof(ckpt_tensor_meta_t);
    char *out = ckpt__calloc(bytes + 1, 1);
    int *counts = ckpt__calloc((size_t)e->size, sizeof(int));
    int *displs = ckpt__calloc((size_t)e->size, sizeof(int));
    if (!out || !counts || !displs || bytes > INT32_MAX)
        ckpt__engine_fatal(e, "no memory (or over 2 GiB) for the published parts' descriptions");
    size_t at = 0;
    for (size_t i = 0; i < nmine; i++) {
        pub_desc_t d;
        memset(&d, 0, sizeof(d));
        memcpy(d.name, mine[i].req.name, sizeof(d.name));
        d.part = mine[i].req.part;
        d.nparts = mine[i].req.nparts;
        d.step = mine[i].req.step;
        d.size = mine[i].req.size;
        d.age_ms = now > mine[i].arrived_ns ? (now - mine[i].arrived_ns) / 1000000ull : 0;
        d.ntensors = mine[i].count;
        d.rank = e->rank;
        d.index = (int32_t)i;
        memcpy(out + at, &d, sizeof(d));
        at += sizeof(d);
        memcpy(out + at, mine[i].metas, mine[i].count * sizeof(ckpt_tensor_meta_t));
        at += mine[i].count * sizeof(ckpt_tensor_meta_t);
    }
    int coll_ms = ckpt__peer_timeout_ms(e->opts.timeout_ms);
    int mine_bytes = (int)bytes;
    MPI_Request req;
    MPI_Iallgather(&mine_bytes, 1, MPI_INT, counts, 1, MPI_INT, e->world, &req);
    if (ckpt__mpi_wait(e, &req, coll_ms, 1000, "allgather of published parts") < 0)
        ckpt__engine_fatal(e, ckpt_last_error());
    uint64_t total = 0;
    for (int r = 0; r < e->size; r++) {
        displs[r] = (int)total;
        total += (uint64_t)counts[r];
    }
    if (total > INT32_MAX) ckpt__engine_fatal(e, "published parts' descriptions exceed 2 GiB");
    char *all = ckpt__calloc(total + 1, 1);
    if (!all) ckpt__engine_fatal(e, "no memory for the published parts' descriptions");
    MPI_Iallgatherv(out, mine_bytes, MPI_BYTE, all, counts, displs, MPI_BYTE, e->world, &req);
    if (ckpt__mpi_wait(e, &req, coll_ms, 1000, "allgather of published parts") < 0)
        ckpt__engine_fatal(e, ckpt_last_error());
    ckpt__free(out);
    ckpt__free(counts);
    ckpt__free(displs);
    *buf_out = all;
    *len_out = total;
    return CKPT_OK;
}

int ckpt__publish_run(ckpt_engine_t *e, const ckpt__cmd_t *cmd, ckpt_publish_event_t *events,
                      size_t cap, size_t *nevents_out, size_t *pending_out)
{
    size_t nev = 0, still = 0;
    if (nevents_out) *nevents_out = 0;
    if (pending_out) *pending_out = 0;
    /* The idle cost: one integer allreduce. */
    int64_t here = e->pub ? (int64_t)ckpt__pub_server_pending(e->pub) : 0, total = 0;
    MPI_Request req;
    MPI_Iallreduce(&here, &total, 1, MPI_INT64_T, MPI_SUM, e->world, &req);
    if (ckpt__mpi_wait(e, &req, ckpt__peer_timeout_ms(e->opts.timeout_ms), 1000,
                       "publish poll") < 0)
        ckpt__engine_fatal(e, ckpt_last_error());
    if (total == 0) return CKPT_OK;

    ckpt__pub_part_t *mine = NULL;
    size_t nmine = 0;
    if (e->pub) ckpt__pub_server_take(e->pub, &mine, &nmine);
    char *all = NULL;
    size_t len = 0;
    gather(e, mine, nmine, &all, &len);
    size_t nents = 0;
    for (size_t at = 0; at < len; nents++) {
        const pub_desc_t *d = (const pub_desc_t *)(all + at);
        at += sizeof(*d) + d->ntensors * sizeof(ckpt_tensor_meta_t);
    }
    entry_t *ents = ckpt__calloc(nents, sizeof(*ents));
    if (!ents) ckpt__engine_fatal(e, "no memory for the published parts");
    size_t at = 0;
    for (size_t i = 0; i < nents; i++) {
        /* Descs and metas sit at multiples of 8 in the buffer: both sizes are. */
        ents[i].d = (const pub_desc_t *)(all + at);
        ents[i].metas = (const ckpt_tensor_meta_t *)(all + at + sizeof(pub_desc_t));
        at += sizeof(pub_desc_t) + ents[i].d->ntensors * sizeof(ckpt_tensor_meta_t);
    }
    qsort(ents, nents, sizeof(*ents), by_name_step);

    const char *expire = cmd->name[0] ? cmd->name : NULL;
    int missing_ms = cmd->arg > INT32_MAX ? INT32_MAX : (int)cmd->arg;
    uint64_t next_version = cmd->version;
    char (*reasons)[CKPT__REASON_MAX] = ckpt__calloc(nents, sizeof(*reasons));
    if (!reasons) ckpt__engine_fatal(e, "no memory for the published parts");
    for (size_t first = 0; first < nents;) {
        size_t end = first;
        while (end < nents && strcmp(ents[end].d->name, ents[first].d->name) == 0) end++;
        /* Older steps of the name lose to the newest one present. */
        size_t cur = first;
        while (cur < end && ents[cur].d->step == ents[first].d->step) cur++;
        for (size_t i = cur; i < end; i++) {
            ents[i].outcome = DROP;
            ents[i].status = CKPT_ECANCELED;
            snprintf(ents[i].own_text, sizeof(ents[i].own_text), "superseded by step %llu "
                     "before every part was in", (unsigned long long)ents[first].d->step);
            ents[i].text = ents[i].own_text;
        }
        char *reason = reasons[first];
        int status = 0, replaced = 0;
        uint64_t bytes = 0, version = 0;
        uint32_t ntensors = 0;
        int verdict = decide(&ents[first], cur - first, missing_ms, expire, reason,
                             CKPT__REASON_MAX, &status);
        if (verdict == 1 && check_disjoint(&ents[first], cur - first, reason, CKPT__REASON_MAX,
                                           &bytes, &ntensors) < 0) {
            verdict = -1;
            status = CKPT_EINVAL;
        }
        if (verdict == 1) {
            version = next_version++;
            status = register_set(e, cmd, &ents[first], cur - first, mine, version, &replaced,
                                  reason, CKPT__REASON_MAX);
            if (status == CKPT_OK)
                snprintf(reason, CKPT__REASON_MAX, "registered '%s' as version %llu (%u part%s, "
                         "%u tensors)%s", ents[first].d->name, (unsigned long long)version,
                         ents[first].d->nparts, ents[first].d->nparts == 1 ? "" : "s", ntensors,
                         replaced ? ", replacing the previous version" : "");
            else
                verdict = -1;
        }
        for (size_t i = first; i < cur; i++) {
            ents[i].outcome = verdict == 0 ? KEEP : verdict == 1 ? REGISTERED : DROP;
            ents[i].status = status;
            ents[i].version = version;
            ents[i].text = reason;
        }
        if (verdict == 0) still += cur - first;
        if (verdict != 0 && e->rank == 0) {
            if (nev < cap) {
                ckpt_publish_event_t *ev = &events[nev];
                memset(ev, 0, sizeof(*ev));
                ckpt__strlcpy(ev->name, ents[first].d->name, sizeof(ev->name));
                ev->status = status;
                ev->version = version;
                ev->step = ents[first].d->step;
                ev->nparts = ents[first].d->nparts;
                ev->ntensors = ntensors;
                ev->bytes = bytes;
                ev->replaced = replaced;
                if (status) ckpt__strlcpy(ev->reason, reason, sizeof(ev->reason));
            }
            nev++;
            if (status) ckpt_warn("%s", reason);
            else ckpt_info("%s", reason);
        }
        first = end;
    }
    /* Answers to this rank's trainers; incomplete parts wait for the next poll. */
    for (size_t i = 0; i < nents; i++) {
        const pub_desc_t *d = ents[i].d;
        if (d->rank != e->rank) continue;
        ckpt__pub_part_t *p = &mine[d->index];
        if (ents[i].outcome == KEEP) ckpt__pub_server_put_back(e->pub, p);
        else ckpt__pub_part_finish(p, ents[i].status, ents[i].version, ents[i].text);
    }
    if (e->rank == 0 && next_version > e->next_version) e->next_version = next_version;
    ckpt__free(reasons);
    ckpt__free(ents);
    ckpt__free(all);
    ckpt__free(mine);
    if (nevents_out) *nevents_out = nev;
    if (pending_out) *pending_out = still;
    return CKPT_OK;
}

int ckpt_engine_publish_poll(ckpt_engine_t *e, int missing_ms, const char *expire,
                             ckpt_publish_event_t *events_out, size_t cap, size_t *nevents_out,
                             size_t *pending_out)
{
    if (nevents_out) *nevents_out = 0;
    if (pending_out) *pending_out = 0;
    if (e->rank != 0)
        return ckpt__error(CKPT_ESTATE, "publish poll is a leader command: call it on rank 0");
    /* Every rank was started with the same socket dir: without one nobody listens. */
    if (!e->pub) return CKPT_OK;
    ckpt__cmd_t cmd;
    memset(&cmd, 0, sizeof(cmd));
    cmd.op = CKPT__CMD_PUBLISH;
    cmd.version = e->next_version;
    cmd.arg = missing_ms < 0 ? (uint64_t)INT32_MAX : (uint64_t)missing_ms;
    cmd.direct = e->opts.direct != 0;
    cmd.timeout_ms = e->opts.timeout_ms;
    if (expire && ckpt__strlcpy(cmd.name, expire, sizeof(cmd.name)) < 0)
        return ckpt__error(CKPT_ETOOBIG, "checkpoint name longer than %d bytes", CKPT_NAME_MAX - 1);
    ckpt__cmd_io_t io = {.events = events_out, .events_cap = cap, .nevents_out = nevents_out,
                         .pending_out = pending_out};
    return ckpt__cmd_lead(e, &cmd, &io);
}
