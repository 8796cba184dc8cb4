/* P2P: serving ranks export their pools over UCX; a new deployment pulls buckets straight
 * out of them with one-sided gets and then updates its own workers through the ordinary
 * pipeline. Serving workers never see a message: only the serving ranks' UCX progress
 * thread is involved.
 *
 * Staleness: every serving rank has a guard page registered with UCX; an exported
 * checkpoint owns one slot holding its version, zeroed before it is unregistered. A joiner
 * reads the slot of every rank it pulls from before anything moves (metas of another
 * version, or of a checkpoint unregistered since, are refused there) and again after each
 * bucket (a checkpoint unregistered mid-transfer is never delivered). Region 0 of every
 * rank in the metas is its guard slot (docs/METAS.md). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#include "engine/coll.h"
#include "engine/p2p.h"

/* ---------------------------------------------------------------- serving side ---- */

/* UCX one-sided transfers, made on first use. The guard page holds, per exported
 * checkpoint, its version (0 once unregistered); joiners read it before and after pulling
 * so that stale metas are refused. */
struct ckpt__serving {
    struct ckpt__ucx *ucx;
    uint64_t *guard;
    struct ckpt__ucx_mem *guard_mem;
    int pools_off; /* pools from UCX: disabled by option or after the first refusal */
};

int ckpt__p2p_init(ckpt_engine_t *e)
{
    e->serving = ckpt__calloc(1, sizeof(*e->serving));
    if (!e->serving) return ckpt__error(CKPT_ENOMEM, "rank %d: P2P state", e->rank);
    e->serving->pools_off = e->opts.ucx_pools == 0;
    return CKPT_OK;
}

static int ensure_ucx(ckpt_engine_t *e)
{
    if (e->serving->ucx) return CKPT_OK;
    ckpt__ucx_options_t o = CKPT__UCX_OPTIONS_INIT;
    o.progress_thread = 1; /* serve gets over transports that need target-side progress */
    o.shared_alloc = !e->serving->pools_off;
    /* Large chunks: measured with `bench ucx-get` over shared memory, 64 MiB gets reach
     * 0.82 of ucx_perftest where 8 MiB ones reach 0.26-0.5 (fewer protocol round trips). */
    o.chunk_size = 64u << 20;
    int rc = ckpt__ucx_create(&o, &e->serving->ucx);
    if (rc < 0) return rc;
    e->serving->guard = mmap(NULL, CKPT__GUARD_SLOTS * CKPT__GUARD_SLOT_BYTES, PROT_READ | PROT_WRITE,
                    MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (e->serving->guard == MAP_FAILED) {
        e->serving->guard = NULL;
        rc = ckpt__error(CKPT_ENOMEM, "rank %d: guard page", e->rank);
    }
    if (rc == CKPT_OK)
        rc = ckpt__ucx_mem_register(e->serving->ucx, e->serving->guard, CKPT__GUARD_SLOTS * CKPT__GUARD_SLOT_BYTES,
                                    &e->serving->guard_mem);
    if (rc == CKPT_OK) rc = ckpt__ucx_progress_start(e->serving->ucx);
    if (rc < 0) ckpt__p2p_shutdown(e);
    return rc;
}

/* ---- pools from UCX ---- */

/* The store asks for pool regions here. Serving a get on memory UCX did not allocate makes
 * UCX 1.13 emulate it with active messages: this rank's progress thread copies every byte
 * into a FIFO and the joiner copies it out; on a busy host (joining workers reloading)
 * that fell to ~1 GB/s against 4.5-4.9 for UCX-allocated memory, where the joiner reads
 * the mapped segment itself (`bench ucx-get`, two CPU burners running). So pools come from
 * UCX's POSIX shared memory, with an fd for the workers as a memfd would give. */
static int pool_alloc(void *ctx, uint64_t len, void **base_out, int *fd_out, void **handle_out)
{
    ckpt_engine_t *e = ctx;
    if (e->serving->pools_off) return CKPT_EUNSUPPORTED;
    ckpt__ucx_mem_t *mem = NULL;
    int rc = ensure_ucx(e);
    if (rc == CKPT_OK) rc = ckpt__ucx_mem_alloc_shared(e->serving->ucx, (size_t)len, &mem, fd_out);
    if (rc < 0) {
        /* Not an error: the store falls back to a memfd, which P2P exports as well. */
        ckpt_info("rank %d: pools are plain memfds (%s); P2P joiners on this host will pull "
                  "through emulated gets", e->rank, ckpt_last_error());
        e->serving->pools_off = 1;
        return rc;
    }
    *base_out = ckpt__ucx_mem_base(mem);
    *handle_out = mem;
    return CKPT_OK;
}

static void pool_release(void *ctx, void *base, uint64_t len, void *handle)
{
    ckpt_engine_t *e = ctx;
    (void)base;
    (void)len;
    ckpt__ucx_mem_unregister(e->serving->ucx, handle);
}

ckpt_pool_allocator_t ckpt__p2p_pool_allocator(ckpt_engine_t *e)
{
    ckpt_pool_allocator_t a = {pool_alloc, pool_release, e};
    return a;
}

void ckpt__p2p_unexport_all(ckpt_engine_t *e)
{
    for (size_t i = 0; e->serving && e->serving->ucx && i < e->ncheckpoints; i++)
        ckpt__p2p_unexport(e, &e->checkpoints[i]);
}

void ckpt__p2p_shutdown(ckpt_engine_t *e)
{
    if (!e->serving || !e->serving->ucx) return;
    ckpt__p2p_unexport_all(e);
    if (e->serving->guard_mem) ckpt__ucx_mem_unregister(e->serving->ucx, e->serving->guard_mem);
    ckpt__ucx_destroy(e->serving->ucx);
    if (e->serving->guard) munmap(e->serving->guard, CKPT__GUARD_SLOTS * CKPT__GUARD_SLOT_BYTES);
    e->serving->ucx = NULL;
    e->serving->guard = NULL;
    e->serving->guard_mem = NULL;
}

void ckpt__p2p_unexport(ckpt_engine_t *e, ckpt__checkpoint_entry_t *c)
{
    if (c->guard_slot < 0) return;
    /* The guard first: from now on a joiner refuses what it would read. */
    __atomic_store_n(&e->serving->guard[c->guard_slot * (CKPT__GUARD_SLOT_BYTES / 8)], 0,
                     __ATOMIC_SEQ_CST);
    for (size_t i = 0; i < c->nmems; i++) /* pools UCX allocated stay: the store frees them */
        if (!ckpt__ucx_mem_allocated(c->mems[i]))
            ckpt__ucx_mem_unregister(e->serving->ucx, c->mems[i]);
    ckpt__free(c->mems);
    c->mems = NULL;
    c->nmems = 0;
    c->guard_slot = -1;
}

/* What one rank contributes to the metas, as bytes: worker address, guard and pool
 * regions (base, size, rkey), then its tensors (reserved = region index in the metas). */
typedef struct {
    char *buf;
    size_t len, cap;
} blob_t;

static int blob_put(blob_t *b, const void *p, size_t n)
{
    if (b->len + n > b->cap) {
        size_t cap = CKPT_MAX(b->cap * 2, b->len + n + 4096);
        char *nb = ckpt__realloc(b->buf, cap);
        if (!nb) return ckpt__error(CKPT_ENOMEM, "metas blob");
        b->buf = nb;
        b->cap = cap;
    }
    memcpy(b->buf + b->len, p, n);
    b->len += n;
    return CKPT_OK;
}

static int blob_region(ckpt_engine_t *e, blob_t *b, void *base, uint64_t size,
                       ckpt__ucx_mem_t *mem)
{
    void *rkey = NULL;
    size_t rlen = 0;
    int rc = ckpt__ucx_rkey_pack(e->serving->ucx, mem, &rkey, &rlen);
    uint64_t addr = (uint64_t)(uintptr_t)base;
    uint32_t l = (uint32_t)rlen;
    if (rc == CKPT_OK) rc = blob_put(b, &addr, 8);
    if (rc == CKPT_OK) rc = blob_put(b, &size, 8);
    if (rc == CKPT_OK) rc = blob_put(b, &l, 4);
    if (rc == CKPT_OK) rc = blob_put(b, rkey, rlen);
    ckpt__free(rkey);
    return rc;
}

static int export_local(ckpt_engine_t *e, ckpt__checkpoint_entry_t *c, blob_t *b)
{
    const ckpt_pool_region_t *regions = NULL;
    size_t nregions = 0;
    const ckpt_tensor_meta_t *metas = NULL;
    size_t count = 0;
    int rc = ensure_ucx(e);
    if (rc == CKPT_OK) rc = ckpt_store_regions(e->store, c->name, &regions, &nregions);
    if (rc == CKPT_OK) rc = ckpt_store_tensors(e->store, c->name, &metas, &count);
    if (rc < 0) return rc;
    if (c->guard_slot < 0) {
        int slot = -1;
        for (int s = 0; s < CKPT__GUARD_SLOTS && slot < 0; s++) {
            int used = 0;
            for (size_t i = 0; i < e->ncheckpoints; i++)
                used |= e->checkpoints[i].guard_slot == s;
            if (!used) slot = s;
        }
        if (slot < 0) return ckpt__error(CKPT_EBUSY, "%d checkpoints exported", CKPT__GUARD_SLOTS);
        c->mems = ckpt__calloc(nregions + 1, sizeof(*c->mems));
        if (!c->mems) return ckpt__error(CKPT_ENOMEM, "export of '%s'", c->name);
        for (size_t i = 0; rc == CKPT_OK && i < nregions; i++) {
            c->mems[i] = ckpt__ucx_mem_find_allocated(e->serving->ucx, regions[i].base);
            if (!c->mems[i])
                rc = ckpt__ucx_mem_register(e->serving->ucx, regions[i].base, regions[i].size, &c->mems[i]);
            if (rc == CKPT_OK) c->nmems++;
        }
        c->guard_slot = slot;
        if (rc < 0) {
            ckpt__p2p_unexport(e, c);
            return rc;
        }
        __atomic_store_n(&e->serving->guard[slot * (CKPT__GUARD_SLOT_BYTES / 8)], c->version,
                         __ATOMIC_SEQ_CST);
    }
    const void *addr = NULL;
    size_t alen = 0;
    rc = ckpt__ucx_address(e->serving->ucx, &addr, &alen);
    uint32_t l = (uint32_t)alen, nreg = (uint32_t)nregions + 1;
    if (rc == CKPT_OK) rc = blob_put(b, &l, 4);
    if (rc == CKPT_OK) rc = blob_put(b, addr, alen);
    if (rc == CKPT_OK) rc = blob_put(b, &nreg, 4);
    if (rc == CKPT_OK)
        rc = blob_region(e, b, &e->serving->guard[c->guard_slot * (CKPT__GUARD_SLOT_BYTES / 8)],
                         CKPT__GUARD_SLOT_BYTES, e->serving->guard_mem);
    for (size_t i = 0; rc == CKPT_OK && i < nregions; i++)
        rc = blob_region(e, b, regions[i].base, regions[i].size, c->mems[i]);
    /* Local tensors only, each with its region (guard is region 0) and offset inside it. */
    for (size_t i = 0; rc == CKPT_OK && i < count; i++) {
        const void *data;
        if (ckpt_store_tensor_data(e->store, c->name, i, &data) != CKPT_OK) continue;
        ckpt_tensor_meta_t m = metas[i];
        m.owner = e->rank;
        m.reserved = -1;
        for (size_t g = 0; g < nregions; g++)
            if (m.offset >= regions[g].offset && m.offset + m.nbytes <= regions[g].offset + regions[g].size) {
                m.reserved = (int32_t)g + 1;
                m.offset -= regions[g].offset;
                break;
            }
        if (m.reserved < 0)
            rc = ckpt__error(CKPT_EINVAL, "tensor '%s' lies in no pool region", m.name);
        else
            rc = blob_put(b, &m, sizeof(m));
    }
    return rc;
}

typedef struct {
    const char *p;
    size_t left;
} reader_t;

static int rd(reader_t *r, void *out, size_t n)
{
    if (n > r->left) return ckpt__error(CKPT_EPROTO, "short metas blob");
    if (out) memcpy(out, r->p, n);
    r->p += n;
    r->left -= n;
    return CKPT_OK;
}

static int decode_blob(const char *buf, size_t len, int rank, ckpt__metas_t *m,
                       ckpt_tensor_meta_t **tensors, size_t *ntensors, size_t *cap)
{
    reader_t r = {buf, len};
    ckpt__metas_rank_t *rk = &m->ranks[rank];
    uint32_t l = 0;
    int rc = rd(&r, &l, 4);
    if (rc == CKPT_OK && (rk->address = ckpt__malloc(l + 1)) == NULL) rc = CKPT_ENOMEM;
    if (rc == CKPT_OK) rc = rd(&r, rk->address, l);
    rk->address_len = l;
    if (rc == CKPT_OK) rc = rd(&r, &rk->nregions, 4);
    if (rc == CKPT_OK && (rk->regions = ckpt__calloc(rk->nregions + 1, sizeof(*rk->regions))) == NULL)
        rc = CKPT_ENOMEM;
    for (uint32_t g = 0; rc == CKPT_OK && g < rk->nregions; g++) {
        ckpt__metas_region_t *rg = &rk->regions[g];
        rc = rd(&r, &rg->base, 8);
        if (rc == CKPT_OK) rc = rd(&r, &rg->size, 8);
        if (rc == CKPT_OK) rc = rd(&r, &l, 4);
        if (rc == CKPT_OK && (rg->rkey = ckpt__malloc(l + 1)) == NULL) rc = CKPT_ENOMEM;
        if (rc == CKPT_OK) rc = rd(&r, rg->rkey, l);
        rg->rkey_len = l;
    }
    while (rc == CKPT_OK && r.left >= sizeof(ckpt_tensor_meta_t)) {
        if (*ntensors == *cap) {
            size_t ncap = *cap ? *cap * 2 : 256;
            ckpt_tensor_meta_t *nt = ckpt__realloc(*tensors, ncap * sizeof(*nt));
            if (!nt) return ckpt__error(CKPT_ENOMEM, "metas");
            *tensors = nt;
            *cap = ncap;
        }
        rc = rd(&r, &(*tensors)[(*ntensors)++], sizeof(ckpt_tensor_meta_t));
    }
    return rc < 0 ? ckpt__error(rc, "metas of rank %d: malformed", rank) : CKPT_OK;
}

int ckpt__p2p_export(ckpt_engine_t *e, const ckpt__cmd_t *cmd, char **bytes_out, size_t *len_out)
{
    blob_t b = {0};
    ckpt__checkpoint_entry_t *c = NULL;
    for (size_t i = 0; i < e->ncheckpoints; i++)
        if (strcmp(e->checkpoints[i].name, cmd->name) == 0) c = &e->checkpoints[i];
    int rc = c ? export_local(e, c, &b)
               : ckpt__error(CKPT_ENOENT, "checkpoint '%s' is not registered", cmd->name);
    char reason[CKPT__REASON_MAX];
    int failed = -1;
    rc = ckpt__agree(e, rc, rc < 0 ? ckpt_last_error() : NULL, cmd->timeout_ms, &failed, reason,
                     sizeof(reason));
    if (rc < 0) {
        ckpt__free(b.buf);
        if (e->broken) ckpt__engine_fatal(e, ckpt_last_error());
        return ckpt__error(rc, "export of '%s' failed on %s", cmd->name, reason);
    }
    int mine = (int)b.len, *counts = NULL, *displs = NULL, total = 0;
    char *all = NULL;
    if (e->rank == 0) {
        counts = ckpt__calloc((size_t)e->size, sizeof(int));
        displs = ckpt__calloc((size_t)e->size, sizeof(int));
    }
    MPI_Request req;
    MPI_Igather(&mine, 1, MPI_INT, counts, 1, MPI_INT, 0, e->world, &req);
    if (ckpt__mpi_wait(e, &req, cmd->timeout_ms, 200, "metas gather") < 0)
        ckpt__engine_fatal(e, ckpt_last_error());
    if (e->rank == 0) {
        for (int r = 0; r < e->size; r++) {
            displs[r] = total;
            total += counts[r];
        }
        all = ckpt__malloc((size_t)total + 1);
    }
    MPI_Igatherv(b.buf, mine, MPI_BYTE, all, counts, displs, MPI_BYTE, 0, e->world, &req);
    if (ckpt__mpi_wait(e, &req, cmd->timeout_ms, 200, "metas gather") < 0)
        ckpt__engine_fatal(e, ckpt_last_error());
    ckpt__free(b.buf);
    rc = CKPT_OK;
    if (e->rank == 0) {
        ckpt__metas_t m;
        memset(&m, 0, sizeof(m));
        ckpt__strlcpy(m.name, cmd->name, sizeof(m.name));
        m.version = c->version;
        m.nranks = (uint32_t)e->size;
        m.ranks = ckpt__calloc((size_t)e->size, sizeof(*m.ranks));
        ckpt_tensor_meta_t *tensors = NULL;
        size_t ntensors = 0, cap = 0;
        for (int r = 0; rc == CKPT_OK && r < e->size; r++)
            rc = decode_blob(all + displs[r], (size_t)counts[r], r, &m, &tensors, &ntensors, &cap);
        if (rc == CKPT_OK) {
            m.ntensors = ntensors;
            m.tensors = ckpt__calloc(ntensors + 1, sizeof(*m.tensors));
            for (size_t i = 0; i < ntensors; i++) {
                m.tensors[i].meta = tensors[i];
                m.tensors[i].region = (uint32_t)tensors[i].reserved;
                m.tensors[i].meta.reserved = 0;
            }
            rc = ckpt__metas_encode(&m, bytes_out, len_out);
        }
        ckpt__free(tensors);
        ckpt__metas_free(&m);
    }
    ckpt__free(all);
    ckpt__free(counts);
    ckpt__free(displs);
    return rc;
}

/* ---------------------------------------------------------------- pulling side ---- */

/* Test hook, for the tests of a serving rank that dies mid-transfer: a kill timed by a
 * sleep races the pull (a small pull wins, and the test learns nothing). With
 * CKPT_TEST_P2P_PAUSE=N:PATH in its environment, a joining rank that has pulled its N-th
 * bucket (guard re-check passed) writes "rank R paused after bucket N" to PATH.paused and
 * waits until PATH exists (at most 120 s), then goes on. The test acts in between: kills
 * the serving ranks, then creates PATH, so the next pull meets a dead rank every time. */
static void test_hook_parse(ckpt__p2p_t *p)
{
    const char *v = getenv("CKPT_TEST_P2P_PAUSE");
    char *end = NULL;
    long n = v ? strtol(v, &end, 10) : 0;
    if (n <= 0 || !end || *end != ':' || !end[1]) return;
    ckpt__strlcpy(p->test_pause_path, end + 1, sizeof(p->test_pause_path));
    p->test_pause_after = n;
}

static void test_hook_pause(ckpt_engine_t *e, ckpt__p2p_t *p)
{
    char path[sizeof(p->test_pause_path) + 16];
    snprintf(path, sizeof(path), "%s.paused", p->test_pause_path);
    FILE *f = fopen(path, "a");
    if (f) {
        fprintf(f, "rank %d paused after bucket %ld\n", e->rank, p->npulls);
        fclose(f);
    }
    ckpt_warn("CKPT_TEST_P2P_PAUSE: rank %d paused after bucket %ld until %s exists", e->rank,
              p->npulls, p->test_pause_path);
    for (int i = 0; i < 12000 && access(p->test_pause_path, F_OK) != 0; i++) {
        struct timespec ts = {0, 10 * 1000000L};
        nanosleep(&ts, NULL);
    }
}

int ckpt__p2p_open(ckpt_engine_t *e, const void *bytes, size_t len, ckpt__p2p_t **out)
{
    ckpt__p2p_t *p = ckpt__calloc(1, sizeof(*p));
    if (!p) return ckpt__error(CKPT_ENOMEM, "p2p");
    int rc = ckpt__metas_decode(bytes, len, &p->metas);
    if (rc == CKPT_OK) {
        for (uint32_t r = 0; r < p->metas.nranks && rc == CKPT_OK; r++)
            if (p->metas.ranks[r].nregions < 1)
                rc = ckpt__error(CKPT_EFORMAT, "metas: rank %u has no guard region", r);
    }
    if (rc == CKPT_OK) {
        test_hook_parse(p);
        ckpt__ucx_options_t o = CKPT__UCX_OPTIONS_INIT;
        o.chunk_size = 64u << 20; /* see ensure_ucx */
        rc = ckpt__ucx_create(&o, &p->ucx);
    }
    if (rc == CKPT_OK) {
        p->peers = ckpt__calloc(p->metas.nranks, sizeof(*p->peers));
        p->rkeys = ckpt__calloc(p->metas.nranks, sizeof(*p->rkeys));
        p->data = ckpt__calloc(p->metas.nranks, sizeof(*p->data));
        p->pools_ready = ckpt__calloc(p->metas.nranks, sizeof(*p->pools_ready));
        if (!p->peers || !p->data || !p->rkeys || !p->pools_ready) rc = ckpt__error(CKPT_ENOMEM, "p2p peers");
    }
    if (rc < 0) {
        ckpt__p2p_close(e, p);
        return rc;
    }
    *out = p;
    return CKPT_OK;
}

void ckpt__p2p_close(ckpt_engine_t *e, ckpt__p2p_t *p)
{
    if (!p) return;
    (void)e;
    for (int i = 0; i < p->nlocal; i++) ckpt__ucx_mem_unregister(p->ucx, p->local[i]);
    for (uint32_t r = 0; p->peers && r < p->metas.nranks; r++) {
        if (p->rkeys[r]) {
            for (uint32_t g = 0; g < p->metas.ranks[r].nregions; g++)
                if (p->rkeys[r][g]) ckpt__ucx_rkey_destroy(p->rkeys[r][g]);
            ckpt__free(p->rkeys[r]);
        }
        if (p->peers[r]) ckpt__ucx_disconnect(p->peers[r], 1000);
        if (p->data[r]) ckpt__ucx_disconnect(p->data[r], 1000);
    }
    ckpt__free(p->peers);
    ckpt__free(p->data);
    ckpt__free(p->rkeys);
    ckpt__free(p->pools_ready);
    ckpt__free(p->gets);
    ckpt__metas_free(&p->metas);
    ckpt__ucx_destroy(p->ucx);
    ckpt__free(p);
}

int ckpt__p2p_tensors(const ckpt__p2p_t *p, ckpt_tensor_meta_t **out, size_t *count_out)
{
    ckpt_tensor_meta_t *t = ckpt__calloc(p->metas.ntensors + 1, sizeof(*t));
    if (!t) return ckpt__error(CKPT_ENOMEM, "p2p tensors");
    for (size_t i = 0; i < p->metas.ntensors; i++) {
        t[i] = p->metas.tensors[i].meta;
        t[i].reserved = (int32_t)p->metas.tensors[i].region;
    }
    *out = t;
    *count_out = p->metas.ntensors;
    return CKPT_OK;
}

/* Connects to serving rank `owner` and unpacks the key of its guard slot only. The keys
 * of its pools are unpacked by ckpt__p2p_check once the guard said they still exist: UCX
 * 1.13 maps a pool in UCX shared memory while unpacking its key, and if the pool is gone
 * (unregistered, or its rank dead) the failed unpack crashes inside UCX
 * (uct_posix_rkey_release on a NULL handle), so a stale key must never be unpacked. */
static int connect_owner(ckpt__p2p_t *p, int owner)
{
    if (p->peers[owner]) return ckpt__ucx_peer_failed(p->peers[owner])
                                   ? ckpt__error(CKPT_EPEER, "serving rank %d failed", owner)
                                   : CKPT_OK;
    const ckpt__metas_rank_t *rk = &p->metas.ranks[owner];
    int rc = ckpt__ucx_connect(p->ucx, rk->address, rk->address_len, owner, 1, &p->peers[owner]);
    if (rc == CKPT_OK) {
        p->rkeys[owner] = ckpt__calloc(rk->nregions, sizeof(*p->rkeys[owner]));
        if (!p->rkeys[owner]) rc = ckpt__error(CKPT_ENOMEM, "rkeys");
    }
    if (rc == CKPT_OK)
        rc = ckpt__ucx_rkey_unpack(p->peers[owner], rk->regions[0].rkey, rk->regions[0].rkey_len,
                                   &p->rkeys[owner][0]);
    if (rc < 0) return ckpt__error_prefix(rc, "connecting to serving rank %d: ", owner);
    return CKPT_OK;
}

/* The data endpoint to `owner` and its pools' keys, after a guard check passed. The data
 * endpoint has no peer-failure handling so that UCX may use every transport, shared
 * memory included (see ckpt__ucx_connect); the guard endpoint keeps it, and the guard read
 * after every bucket notices a dead owner. Pools in UCX shared memory are mapped here by
 * the unpack: their pages are faulted in now, while connecting, rather than one 4 KiB
 * fault at a time inside the pulls. */
static int unpack_pools(ckpt__p2p_t *p, int owner)
{
    const ckpt__metas_rank_t *rk = &p->metas.ranks[owner];
    int rc = CKPT_OK;
    double t0 = ckpt__now_s();
    if (!p->data[owner])
        rc = ckpt__ucx_connect(p->ucx, rk->address, rk->address_len, owner, 0, &p->data[owner]);
    for (uint32_t g = 1; rc == CKPT_OK && g < rk->nregions; g++)
        if (!p->rkeys[owner][g])
            rc = ckpt__ucx_rkey_unpack(p->data[owner], rk->regions[g].rkey,
                                       rk->regions[g].rkey_len, &p->rkeys[owner][g]);
    int mapped = 0;
    for (uint32_t g = 1; rc == CKPT_OK && g < rk->nregions; g++)
        mapped += ckpt__ucx_rkey_prefault(p->rkeys[owner][g], rk->regions[g].base,
                                          rk->regions[g].size);
    if (rc < 0) return ckpt__error_prefix(rc, "connecting to serving rank %d: ", owner);
    ckpt_debug("serving rank %d: %u pool region(s), %d mapped here, in %.3f s", owner,
               rk->nregions - 1, mapped, ckpt__now_s() - t0);
    return CKPT_OK;
}

static int read_guard(ckpt__p2p_t *p, int owner, int timeout_ms)
{
    uint64_t version = 0;
    ckpt__ucx_get_t g = {p->peers[owner], p->rkeys[owner][0], p->metas.ranks[owner].regions[0].base,
                         &version, sizeof(version), NULL};
    int rc = ckpt__ucx_get_batch(p->ucx, &g, 1, 1, timeout_ms);
    if (rc < 0) return ckpt__error_prefix(rc, "checking serving rank %d: ", owner);
    if (version != p->metas.version)
        return ckpt__error(CKPT_ESTATE,
                           "metas refused: serving rank %d no longer exports '%s' version %llu "
                           "(%s); export the metas again",
                           owner, p->metas.name, (unsigned long long)p->metas.version,
                           version ? "it exports another version" : "it was unregistered");
    return CKPT_OK;
}

int ckpt__p2p_check(ckpt_engine_t *e, ckpt__p2p_t *p, int owner, int timeout_ms)
{
    (void)e;
    int rc = connect_owner(p, owner);
    if (rc == CKPT_OK) rc = read_guard(p, owner, timeout_ms);
    if (rc == CKPT_OK && !p->pools_ready[owner]) {
        rc = unpack_pools(p, owner);
        p->pools_ready[owner] = rc == CKPT_OK;
    }
    return rc;
}

int ckpt__p2p_register_buffers(ckpt_engine_t *e, ckpt__p2p_t *p)
{
    for (int i = 0; i < e->buffers.nbuffers; i++) {
        int rc = ckpt__ucx_mem_register(p->ucx, e->buffers.ptr[i], e->buffers.size, &p->local[i]);
        if (rc < 0) return rc;
        p->nlocal++;
    }
    return CKPT_OK;
}

int ckpt__p2p_pull(ckpt_engine_t *e, ckpt__p2p_t *p, int owner, const ckpt_tensor_meta_t *t,
                   const ckpt__place_t *src, size_t count, void *buf, int timeout_ms)
{
    double t0 = ckpt__now_s();
    int rc = p->pools_ready[owner] ? connect_owner(p, owner)
                                   : ckpt__p2p_check(e, p, owner, timeout_ms);
    if (rc < 0) return rc;
    if (count > p->gets_cap) {
        ckpt__ucx_get_t *g = ckpt__realloc(p->gets, count * sizeof(*g));
        if (!g) return ckpt__error(CKPT_ENOMEM, "p2p gets");
        p->gets = g;
        p->gets_cap = count;
    }
    ckpt__ucx_mem_t *local = NULL;
    for (int i = 0; i < p->nlocal; i++)
        if ((char *)buf == (char *)e->buffers.ptr[i]) local = p->local[i];
    uint64_t bytes = 0;
    for (size_t i = 0; i < count; i++) {
        const ckpt__metas_region_t *rg = &p->metas.ranks[owner].regions[src[i].source];
        ckpt__ucx_get_t *g = &p->gets[i];
        g->peer = p->data[owner];
        g->rkey = p->rkeys[owner][src[i].source];
        g->remote_addr = rg->base + src[i].offset;
        g->dst = (char *)buf + t[i].offset;
        g->len = t[i].nbytes;
        g->local = local;
        bytes += t[i].nbytes;
    }
    rc = ckpt__ucx_get_batch(p->ucx, p->gets, count, 0, timeout_ms);
    if (rc < 0) return ckpt__error_prefix(rc, "pulling from serving rank %d: ", owner);
    p->pull_s += ckpt__now_s() - t0;
    p->pull_bytes += bytes;
    rc = read_guard(p, owner, timeout_ms);
    if (rc == CKPT_OK && ++p->npulls == p->test_pause_after) test_hook_pause(e, p);
    return rc;
}
