/* Registration from files, format-independent core: shares, pool layout, then the reads.
 *
 * Layout. Local tensors are visited in file order and grouped into runs: tensors that are
 * adjacent in the same file and stay adjacent in the pool (every one but the last has a
 * size that is a multiple of CKPT_ALIGN), up to RUN_MAX bytes. A run is read with as few
 * large reads as possible, which is what makes checkpoints of many small tensors fast.
 *
 * O_DIRECT needs the file offset, the length and the destination 4 KiB-aligned, which
 * tensors never are. So a run of at least DIRECT_MIN bytes gets pool space for the
 * 4 KiB-aligned superset of its file range, placed so the superset lands at a 4 KiB
 * boundary of the pool; its bytes then sit less than CKPT_ALIGN above the aligned address
 * the run must start at, and one memmove when the run has landed puts it there. The
 * margins (< 8 KiB a run) are the only bytes read twice across ranks. Smaller runs are
 * read buffered into tightly packed space.
 *
 * The layout depends only on the headers, the share and which files sit on tmpfs, so every
 * rank computes every other rank's offsets too (for the metas of remote tensors). */
#include <errno.h>
#include <fcntl.h>
#include <linux/magic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/vfs.h>
#include <time.h>
#include <unistd.h>

#include "plan/share.h"
#include "store/store_int.h"

#define RUN_MAX (64ull << 20)
#define DIRECT_MIN (256ull << 10)

enum { LAYOUT_OFFSETS, LAYOUT_COUNT, LAYOUT_FILL };

typedef struct loader {
    ckpt_store_t *store;
    const char *name;
    char *const *paths;
    size_t nfiles;
    const ckpt__load_tensor_t *in;
    size_t count;
    int rank, nranks;
    ckpt_tensor_meta_t *all; /* output metas; offset rewritten to pool offsets */
    size_t *order;           /* tensor indices by (file, file offset) */
    size_t *members;         /* scratch: the tensors of the run being built */
    int *fd, *fd_direct;
    uint8_t *tmpfs;
    uint64_t *fsize;
    struct stat *opened; /* each file as it was opened: the snapshot the reads must match */
    /* this rank's reads */
    ckpt__io_run_t *runs;
    ckpt__io_chunk_t *chunks;
    ckpt_tensor_meta_t **run_tensors;
    size_t nruns, nchunks, nrun_tensors;
    uint8_t *pool;
    uint64_t bytes_io, bytes_direct;
} loader_t;

static int by_file_offset(const void *a, const void *b, void *ctx)
{
    const ckpt__load_tensor_t *t = ctx;
    const ckpt__load_tensor_t *x = &t[*(const size_t *)a], *y = &t[*(const size_t *)b];
    if (x->file != y->file) return x->file < y->file ? -1 : 1;
    return x->meta.offset < y->meta.offset ? -1 : x->meta.offset > y->meta.offset;
}

/* Places the run made of L->members[0..n) at *cursor; records its reads in FILL mode. */
static void place_run(loader_t *L, size_t n, uint64_t *cursor, int mode)
{
    const ckpt__load_tensor_t *first = &L->in[L->members[0]], *last = &L->in[L->members[n - 1]];
    uint64_t off = first->meta.offset, end = last->meta.offset + last->meta.nbytes;
    uint64_t len = end - off, fa = off, fe = end, d, land, final;
    uint32_t file = first->file;
    int dio_layout = L->store->opts.use_direct != 0 && len >= DIRECT_MIN;

    if (dio_layout) {
        fa = off & ~(uint64_t)(CKPT__DIO_ALIGN - 1);
        fe = CKPT_ALIGN_UP(end, (uint64_t)CKPT__DIO_ALIGN);
        d = CKPT_ALIGN_UP(*cursor, (uint64_t)CKPT__DIO_ALIGN);
        land = d + (off - fa);
        final = land - (off - fa) % CKPT_ALIGN;
        *cursor = d + (fe - fa);
    } else {
        d = land = final = CKPT_ALIGN_UP(*cursor, (uint64_t)CKPT_ALIGN);
        *cursor = final + len;
    }
    for (size_t k = 0; k < n; k++) {
        const ckpt__load_tensor_t *t = &L->in[L->members[k]];
        L->all[L->members[k]].offset = final + (t->meta.offset - off);
    }
    if (mode == LAYOUT_OFFSETS) return;

    int direct = dio_layout && L->fd_direct[file] >= 0;
    uint64_t rs = direct ? fa : off, re = direct ? fe : end, cb = L->store->opts.chunk_bytes;
    uint64_t nch = (re - rs + cb - 1) / cb;
    if (mode == LAYOUT_FILL) {
        ckpt__io_run_t *r = &L->runs[L->nruns];
        r->first = (uint32_t)L->nrun_tensors;
        r->count = (uint32_t)n;
        r->file = file;
        atomic_init(&r->pending, (unsigned)nch);
        r->final = L->pool + final;
        r->land = direct ? L->pool + land : r->final;
        r->len = len;
        for (size_t k = 0; k < n; k++) L->run_tensors[L->nrun_tensors + k] = &L->all[L->members[k]];
        for (uint64_t k = 0; k < nch; k++) {
            ckpt__io_chunk_t *c = &L->chunks[L->nchunks + k];
            c->file_off = rs + k * cb;
            c->len = CKPT_MIN(cb, re - c->file_off);
            c->need = direct ? CKPT_MIN(c->len, end - c->file_off) : c->len;
            c->done = 0;
            c->dst = (direct ? L->pool + d : r->final) + k * cb;
            c->run = (uint32_t)L->nruns;
            c->fd = direct ? L->fd_direct[file] : L->fd[file];
            c->direct = direct;
            L->bytes_io += c->len;
            if (direct) L->bytes_direct += c->len;
        }
    }
    L->nruns++;
    L->nchunks += nch;
    L->nrun_tensors += n;
}

/* Lays out rank r's pool (tensors not on tmpfs); returns its size in bytes. */
static uint64_t layout_pool(loader_t *L, int r, int mode)
{
    uint64_t cursor = 0, run_end = 0;
    size_t n = 0;
    int zero_sized = 0;

    L->nruns = L->nchunks = L->nrun_tensors = 0;
    L->bytes_io = L->bytes_direct = 0;
    for (size_t k = 0; k < L->count; k++) {
        size_t i = L->order[k];
        const ckpt__load_tensor_t *t = &L->in[i];
        if (L->all[i].owner != r || L->tmpfs[t->file]) continue;
        if (t->meta.nbytes == 0) { /* nothing to read; any aligned address will do */
            L->all[i].offset = CKPT_ALIGN_UP(cursor, (uint64_t)CKPT_ALIGN);
            zero_sized = 1;
            continue;
        }
        int joins = n && t->file == L->in[L->members[n - 1]].file && t->meta.offset == run_end &&
                    L->in[L->members[n - 1]].meta.nbytes % CKPT_ALIGN == 0 &&
                    run_end - L->in[L->members[0]].meta.offset + t->meta.nbytes <= RUN_MAX;
        if (n && !joins) {
            place_run(L, n, &cursor, mode);
            n = 0;
        }
        L->members[n++] = i;
        run_end = t->meta.offset + t->meta.nbytes;
    }
    if (n) place_run(L, n, &cursor, mode);
    return cursor ? cursor : (uint64_t)zero_sized;
}

/* Gives rank r's tensors on tmpfs their offsets: each such file is one region after the
 * pool. Returns the number of regions; fills rg (this rank) when not NULL. */
static size_t layout_tmpfs(loader_t *L, int r, uint64_t pool_size, ckpt__region_t *rg)
{
    uint64_t v = CKPT_ALIGN_UP(pool_size, (uint64_t)CKPT__HUGE_PAGE);
    size_t nreg = 0;
    for (size_t k = 0; k < L->count;) {
        uint32_t f = L->in[L->order[k]].file;
        size_t end = k, used = 0;
        while (end < L->count && L->in[L->order[end]].file == f) {
            size_t i = L->order[end++];
            if (L->all[i].owner == r && L->tmpfs[f]) {
                L->all[i].offset = v + L->in[i].meta.offset;
                used = 1;
            }
        }
        if (used) {
            if (rg) {
                rg[nreg].pub.offset = v;
                rg[nreg].memfd = (int)f; /* file index until mapped (see map_tmpfs) */
            }
            nreg++;
            v += CKPT_ALIGN_UP(CKPT_MAX(L->fsize[f], 1), (uint64_t)CKPT__HUGE_PAGE);
        }
        k = end;
    }
    return nreg;
}

/* Opens every file, checks it still holds what its header promised, detects tmpfs. */
static int open_files(loader_t *L)
{
    uint64_t *need = ckpt__calloc(L->nfiles, sizeof(*need));
    const char **longest = ckpt__calloc(L->nfiles, sizeof(*longest));
    int rc = CKPT_OK;
    if (!need || !longest) {
        rc = ckpt__error(CKPT_ENOMEM, "registering '%s': out of memory", L->name);
        goto out;
    }
    for (size_t i = 0; i < L->count; i++) {
        uint64_t e = L->in[i].meta.offset + L->in[i].meta.nbytes;
        if (e > need[L->in[i].file]) {
            need[L->in[i].file] = e;
            longest[L->in[i].file] = L->in[i].meta.name;
        }
    }
    for (size_t f = 0; f < L->nfiles; f++) {
        struct stat st;
        struct statfs sfs;
        L->fd[f] = open(L->paths[f], O_RDONLY | O_CLOEXEC);
        if (L->fd[f] < 0) {
            rc = ckpt__error(errno == EACCES ? CKPT_EPERM : CKPT_EIO, "%s: open: %s", L->paths[f], strerror(errno));
            goto out;
        }
        if (fstat(L->fd[f], &st) != 0 || !S_ISREG(st.st_mode)) {
            rc = ckpt__error(CKPT_EIO, "%s: not a regular file", L->paths[f]);
            goto out;
        }
        L->fsize[f] = (uint64_t)st.st_size;
        L->opened[f] = st;
        if (L->fsize[f] < need[f]) {
            rc = ckpt__error(CKPT_EIO, "%s: truncated: %llu bytes, but tensor '%s' ends at offset %llu",
                             L->paths[f], (unsigned long long)L->fsize[f], longest[f],
                             (unsigned long long)need[f]);
            goto out;
        }
        L->tmpfs[f] = L->store->opts.map_tmpfs && fstatfs(L->fd[f], &sfs) == 0 &&
                      sfs.f_type == TMPFS_MAGIC;
    }
out:
    ckpt__free(need);
    ckpt__free(longest);
    return rc;
}

/* O_DIRECT descriptors for the files this rank reads from (auto: where the file system
 * allows it; otherwise those files are read buffered). */
static int open_direct(loader_t *L)
{
    if (L->store->opts.use_direct == 0) return CKPT_OK;
    uint8_t *used = ckpt__calloc(L->nfiles, 1);
    if (!used) return ckpt__error(CKPT_ENOMEM, "registering '%s': out of memory", L->name);
    for (size_t i = 0; i < L->count; i++)
        if (L->all[i].owner == L->rank && L->in[i].meta.nbytes) used[L->in[i].file] = 1;
    int rc = CKPT_OK;
    for (size_t f = 0; f < L->nfiles && rc == CKPT_OK; f++) {
        if (!used[f] || L->tmpfs[f]) continue;
        L->fd_direct[f] = open(L->paths[f], O_RDONLY | O_CLOEXEC | O_DIRECT);
        if (L->fd_direct[f] >= 0) continue;
        if (L->store->opts.use_direct == 1)
            rc = ckpt__error(CKPT_EUNSUPPORTED, "%s: O_DIRECT: %s", L->paths[f], strerror(errno));
        else
            ckpt_debug("%s: no O_DIRECT (%s), reading buffered", L->paths[f], strerror(errno));
    }
    ckpt__free(used);
    return rc;
}

/* The registration is a snapshot: every file must still be, after the reads, the file that
 * was opened, unchanged. A file deleted, replaced (a new file renamed onto its path) or
 * written while it was read would otherwise register silently as a mix of old and new
 * bytes, or as a part of a checkpoint that no longer exists. By path, not by descriptor:
 * a deleted file stays readable through its descriptor, which is exactly what hides it. */
static int check_snapshot(const loader_t *L)
{
    for (size_t f = 0; f < L->nfiles; f++) {
        const struct stat *a = &L->opened[f];
        struct stat b;
        if (stat(L->paths[f], &b) != 0)
            return ckpt__error(CKPT_EIO, "%s: %s while it was read (%s); the checkpoint changed "
                               "during registration, register it again once it is complete",
                               L->paths[f], errno == ENOENT ? "vanished" : "became unreadable",
                               strerror(errno));
        if (a->st_dev != b.st_dev || a->st_ino != b.st_ino)
            return ckpt__error(CKPT_EIO, "%s: replaced while it was read (another file now has its "
                               "path); the checkpoint changed during registration, register it "
                               "again once it is complete", L->paths[f]);
        if (a->st_size != b.st_size || a->st_mtim.tv_sec != b.st_mtim.tv_sec ||
            a->st_mtim.tv_nsec != b.st_mtim.tv_nsec)
            return ckpt__error(CKPT_EIO, "%s: modified while it was read (size %lld -> %lld "
                               "bytes, mtime %lld.%09ld -> %lld.%09ld); the checkpoint changed "
                               "during registration, register it again once it is complete",
                               L->paths[f], (long long)a->st_size, (long long)b.st_size,
                               (long long)a->st_mtim.tv_sec, a->st_mtim.tv_nsec,
                               (long long)b.st_mtim.tv_sec, b.st_mtim.tv_nsec);
    }
    return CKPT_OK;
}

/* Tests only: a pause between opening the files and reading them, announced in the log, so
 * that a test can change the checkpoint mid-registration deterministically. */
static void test_pause(const loader_t *L)
{
    const char *v = getenv("CKPT_TEST_REGISTER_PAUSE_MS");
    long ms = v ? strtol(v, NULL, 10) : 0;
    if (ms <= 0) return;
    ckpt_warn("registering '%s' (rank %d): files opened, pausing %ld ms (CKPT_TEST_REGISTER_PAUSE_MS)",
              L->name, L->rank, ms);
    struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};
    while (nanosleep(&ts, &ts) != 0 && errno == EINTR) {
    }
}

static const char *human(uint64_t bytes, char *buf, size_t cap)
{
    static const char *const units[] = {"B", "KiB", "MiB", "GiB", "TiB"};
    double v = (double)bytes;
    size_t u = 0;
    while (v >= 1024 && u + 1 < CKPT_ARRAY_SIZE(units)) v /= 1024, u++;
    snprintf(buf, cap, u ? "%.2f %s" : "%.0f %s", v, units[u]);
    return buf;
}

int ckpt__store_load(ckpt_store_t *store, const char *name, char *const *paths, size_t nfiles,
                     const ckpt__load_tensor_t *tensors, size_t count, int rank, int nranks)
{
    double t0 = ckpt__now_s();
    loader_t L = {.store = store, .name = name, .paths = paths, .nfiles = nfiles, .in = tensors,
                  .count = count, .rank = rank, .nranks = nranks};
    ckpt__region_t *rg = NULL;
    const void **data = NULL;
    size_t nregions = 0, ntmpfs = 0;
    uint64_t pool_size = 0, bytes_read = 0, bytes_mapped = 0, local = 0;
    int rc = ckpt__store_check_name(store, name);

    if (rc) return rc;
    if (nranks < 1 || rank < 0 || rank >= nranks)
        return ckpt__error(CKPT_EINVAL, "registering '%s': rank %d of %d", name, rank, nranks);
    L.all = ckpt__calloc(count, sizeof(*L.all));
    L.order = ckpt__calloc(count, sizeof(*L.order));
    L.members = ckpt__calloc(count, sizeof(*L.members));
    L.fd = ckpt__malloc(nfiles * sizeof(*L.fd));
    L.fd_direct = ckpt__malloc(nfiles * sizeof(*L.fd_direct));
    L.tmpfs = ckpt__calloc(nfiles, 1);
    L.fsize = ckpt__calloc(nfiles, sizeof(*L.fsize));
    L.opened = ckpt__calloc(nfiles, sizeof(*L.opened));
    data = ckpt__calloc(count, sizeof(*data));
    for (size_t f = 0; L.fd && L.fd_direct && f < nfiles; f++) L.fd[f] = L.fd_direct[f] = -1;
    if (!L.all || !L.order || !L.members || !L.fd || !L.fd_direct || !L.tmpfs || !L.fsize || !L.opened || !data) {
        rc = ckpt__error(CKPT_ENOMEM, "registering '%s': out of memory", name);
        goto fail;
    }
    for (size_t i = 0; i < count; i++) {
        if (tensors[i].file >= nfiles) {
            rc = ckpt__error(CKPT_EINVAL, "registering '%s': tensor '%s' names file %u of %zu",
                             name, tensors[i].meta.name, tensors[i].file, nfiles);
            goto fail;
        }
        L.all[i] = tensors[i].meta;
        L.all[i].checksum = 0;
        L.order[i] = i;
    }
    qsort_r(L.order, count, sizeof(*L.order), by_file_offset, (void *)tensors);
    int32_t *owners = ckpt__malloc(count * sizeof(*owners));
    if (!owners) {
        rc = ckpt__error(CKPT_ENOMEM, "registering '%s': out of memory", name);
        goto fail;
    }
    rc = ckpt__plan_shares(L.all, count, nranks, owners, NULL);
    for (size_t i = 0; rc == CKPT_OK && i < count; i++) L.all[i].owner = owners[i];
    ckpt__free(owners);
    if (rc) goto fail;
    if ((rc = open_files(&L))) goto fail;

    /* Every other rank's offsets first (their metas), then ours, counting our reads. */
    for (int r = 0; r < nranks; r++) {
        if (r == rank) continue;
        layout_tmpfs(&L, r, layout_pool(&L, r, LAYOUT_OFFSETS), NULL);
    }
    /* O_DIRECT descriptors first: whether a run reads with O_DIRECT sets its chunk count. */
    if ((rc = open_direct(&L))) goto fail;
    pool_size = layout_pool(&L, rank, LAYOUT_COUNT);
    ntmpfs = layout_tmpfs(&L, rank, pool_size, NULL);
    nregions = (pool_size ? 1 : 0) + ntmpfs;
    rg = ckpt__calloc(CKPT_MAX(nregions, (size_t)1), sizeof(*rg));
    L.runs = ckpt__calloc(CKPT_MAX(L.nruns, (size_t)1), sizeof(*L.runs));
    L.chunks = ckpt__calloc(CKPT_MAX(L.nchunks, (size_t)1), sizeof(*L.chunks));
    L.run_tensors = ckpt__calloc(CKPT_MAX(L.nrun_tensors, (size_t)1), sizeof(*L.run_tensors));
    if (!rg || !L.runs || !L.chunks || !L.run_tensors) {
        rc = ckpt__error(CKPT_ENOMEM, "registering '%s': out of memory", name);
        nregions = 0;
        goto fail;
    }
    for (size_t k = 0; k < nregions; k++) rg[k].pub.fd = -1;
    if (pool_size && (rc = ckpt__store_pool_alloc(store, pool_size, name, &rg[0]))) goto fail;
    L.pool = pool_size ? rg[0].pub.base : NULL;
    layout_pool(&L, rank, LAYOUT_FILL);
    layout_tmpfs(&L, rank, pool_size, rg + (pool_size ? 1 : 0));

    /* Files on tmpfs are already in memory: map them (the region owns the file's fd). */
    for (size_t k = pool_size ? 1 : 0; k < nregions; k++) {
        int f = rg[k].memfd;
        uint64_t voff = rg[k].pub.offset;
        rg[k].memfd = 0;
        if ((rc = ckpt__region_map(L.fd[f], L.fsize[f], paths[f], &rg[k]))) goto fail;
        rg[k].pub.offset = voff;
        rg[k].pub.fd = L.fd[f];
        L.fd[f] = -1;
        if (store->opts.pin_cuda)
            rg[k].pub.pinned = ckpt__cuda_pin(rg[k].pub.base, rg[k].pub.size, 1);
    }

    ckpt__io_job_t job = {.chunks = L.chunks, .nchunks = L.nchunks, .runs = L.runs,
                          .nruns = L.nruns, .tensors = L.run_tensors, .pool_base = L.pool,
                          .paths = paths, .io_depth = store->opts.io_depth,
                          .io_threads = store->opts.io_threads,
                          .use_uring = store->opts.use_uring != 0};
    test_pause(&L);
    if ((rc = ckpt__io_run(&job)) || (rc = check_snapshot(&L))) {
        ckpt__error_prefix(rc, "registering '%s': ", name);
        goto fail;
    }

    /* Addresses of local tensors; checksums of those that were not read (tmpfs, empty). */
    for (size_t i = 0; i < count; i++) {
        if (L.all[i].owner != rank) continue;
        uint32_t f = tensors[i].file;
        const uint8_t *p = NULL;
        if (L.tmpfs[f]) {
            for (size_t k = 0; k < nregions && !p; k++)
                if (rg[k].pub.fd >= 0 && L.all[i].offset >= rg[k].pub.offset &&
                    L.all[i].offset < rg[k].pub.offset + CKPT_MAX(rg[k].pub.size, 1) && (k || !pool_size))
                    p = (const uint8_t *)rg[k].pub.base + (L.all[i].offset - rg[k].pub.offset);
            L.all[i].checksum = ckpt_checksum(p, L.all[i].nbytes);
            bytes_mapped += L.all[i].nbytes;
        } else {
            p = L.pool + L.all[i].offset;
            if (!L.all[i].nbytes) L.all[i].checksum = ckpt_checksum(p, 0);
            bytes_read += L.all[i].nbytes;
        }
        data[i] = p ? (const void *)p : (const void *)rg; /* non-NULL marks "local" */
        local += L.all[i].nbytes;
    }

    const char *via = L.nchunks ? job.path_used : (bytes_mapped ? "mmap" : "none");
    char path_buf[32];
    snprintf(path_buf, sizeof(path_buf), "%s%s", via, L.bytes_direct ? "+O_DIRECT" : "");
    rc = ckpt__store_add(store, name, L.all, data, count, rg, nregions);
    L.all = NULL;
    data = NULL;
    rg = NULL;
    nregions = 0;
    if (rc == CKPT_OK) {
        ckpt_store_stats_t *st = &store->stats;
        char h[32];
        memset(st, 0, sizeof(*st));
        st->bytes_local = local;
        st->bytes_read = bytes_read;
        st->bytes_io = L.bytes_io;
        st->bytes_direct = L.bytes_direct;
        st->bytes_mapped = bytes_mapped;
        st->seconds = ckpt__now_s() - t0;
        ckpt__strlcpy(st->io_path, path_buf, sizeof(st->io_path));
        store->has_stats = 1;
        ckpt_info("registered '%s' (rank %d of %d): %s in %.2f s via %s", name, rank, nranks,
                  human(local, h, sizeof(h)), st->seconds, st->io_path);
    }
    goto out;
fail:
    for (size_t k = 0; k < nregions; k++) ckpt__store_pool_release(store, &rg[k]);
out:
    for (size_t f = 0; L.fd && L.fd_direct && f < nfiles; f++) {
        if (L.fd[f] >= 0) close(L.fd[f]);
        if (L.fd_direct[f] >= 0) close(L.fd_direct[f]);
    }
    ckpt__free(rg);
    ckpt__free(data);
    ckpt__free(L.all);
    ckpt__free(L.order);
    ckpt__free(L.members);
    ckpt__free(L.fd);
    ckpt__free(L.fd_direct);
    ckpt__free(L.tmpfs);
    ckpt__free(L.fsize);
    ckpt__free(L.opened);
    ckpt__free(L.runs);
    ckpt__free(L.chunks);
    ckpt__free(L.run_tensors);
    return rc;
}
