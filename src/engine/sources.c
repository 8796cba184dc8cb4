/* Sources for direct updates: on a single host, workers read tensors straight out of the
 * owners' pools, so no bucket is ever staged or broadcast. The pools are memfd-backed (or
 * tmpfs files mapped in place); the ranks of the host exchange (pid, fd, size) of their
 * regions and open each other's through /proc/<pid>/fd, then hand all of them to their
 * worker once per update. Opening through /proc needs the same uid and ptrace read access,
 * which every rank of one deployment has; a failure is reported and the update fails with
 * the cause (use --direct off to stage instead). */
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include "engine/coll.h"
#include "engine/sources.h"

typedef struct {
    int32_t rank;
    int32_t pid;
    int32_t fd;
    int32_t reserved;
    uint64_t size;
    uint64_t offset; /* where the region starts in its owner's pool offsets */
} source_desc_t;

void ckpt__sources_close(ckpt__sources_t *s)
{
    for (size_t i = 0; i < s->count; i++)
        if (s->fds && s->fds[i] >= 0) close(s->fds[i]);
    ckpt__free(s->fds);
    ckpt__free(s->descs);
    memset(s, 0, sizeof(*s));
}

int ckpt__sources_open(ckpt_engine_t *e, const char *name, int timeout_ms, ckpt__sources_t *out)
{
    const ckpt_pool_region_t *regions = NULL;
    size_t nregions = 0;
    int rc = CKPT_OK;
    int *counts = NULL, *displs = NULL;
    source_desc_t *mine = NULL;
    memset(out, 0, sizeof(*out));
    if (ckpt_store_regions(e->store, name, &regions, &nregions) != CKPT_OK) nregions = 0;
    mine = ckpt__calloc(nregions + 1, sizeof(*mine));
    counts = ckpt__calloc((size_t)e->group_size, sizeof(int));
    displs = ckpt__calloc((size_t)e->group_size, sizeof(int));
    if (!mine || !counts || !displs) {
        rc = ckpt__error(CKPT_ENOMEM, "rank %d: direct sources", e->rank);
        goto out;
    }
    for (size_t i = 0; i < nregions; i++) {
        mine[i].rank = e->rank;
        mine[i].pid = (int32_t)getpid();
        mine[i].fd = regions[i].fd;
        mine[i].size = regions[i].size;
        mine[i].offset = regions[i].offset;
    }
    int bytes = (int)(nregions * sizeof(source_desc_t));
    MPI_Request req;
    MPI_Iallgather(&bytes, 1, MPI_INT, counts, 1, MPI_INT, e->group, &req);
    rc = ckpt__mpi_wait(e, &req, timeout_ms, 200, "source exchange");
    if (rc < 0) goto out;
    int total = 0;
    for (int r = 0; r < e->group_size; r++) {
        displs[r] = total;
        total += counts[r];
    }
    out->count = (size_t)total / sizeof(source_desc_t);
    out->descs = ckpt__calloc(out->count + 1, sizeof(source_desc_t));
    out->fds = ckpt__calloc(out->count + 1, sizeof(int));
    if (!out->descs || !out->fds) {
        rc = ckpt__error(CKPT_ENOMEM, "rank %d: direct sources", e->rank);
        /* still take part in the collective below */
    }
    source_desc_t scratch;
    MPI_Iallgatherv(mine, bytes, MPI_BYTE, out->descs ? (void *)out->descs : (void *)&scratch,
                    counts, displs, MPI_BYTE, e->group, &req);
    int wrc = ckpt__mpi_wait(e, &req, timeout_ms, 200, "source exchange");
    if (wrc < 0) rc = wrc;
    if (rc < 0) goto out;
    for (size_t i = 0; i < out->count; i++) out->fds[i] = -1;
    for (size_t i = 0; i < out->count; i++) {
        const source_desc_t *d = &((const source_desc_t *)out->descs)[i];
        char path[64];
        snprintf(path, sizeof(path), "/proc/%d/fd/%d", d->pid, d->fd);
        /* Our own regions too, through /proc: one code path, and a fresh read-only fd. */
        out->fds[i] = open(path, O_RDONLY | O_CLOEXEC);
        if (out->fds[i] < 0) {
            rc = ckpt__error(CKPT_EPERM, "rank %d: cannot open rank %d's pool region %s: %m "
                             "(run all ranks of a host as one user, or use --direct off)",
                             e->rank, d->rank, path);
            goto out;
        }
    }
out:
    ckpt__free(mine);
    ckpt__free(counts);
    ckpt__free(displs);
    if (rc < 0) ckpt__sources_close(out);
    return rc;
}

int ckpt__sources_locate(const ckpt__sources_t *s, const ckpt_tensor_meta_t *meta,
                         ckpt__place_t *place)
{
    const source_desc_t *d = s->descs;
    for (size_t i = 0; i < s->count; i++) {
        if (d[i].rank != meta->owner) continue;
        if (place->offset >= d[i].offset &&
            place->offset + meta->nbytes <= d[i].offset + d[i].size) {
            place->offset -= d[i].offset;
            place->source = (int32_t)i;
            return CKPT_OK;
        }
    }
    return ckpt__error(CKPT_ENOENT, "tensor '%s' of rank %d lies in none of its pool regions",
                       meta->name, meta->owner);
}

uint64_t ckpt__sources_size(const ckpt__sources_t *s, size_t index)
{
    return ((const source_desc_t *)s->descs)[index].size;
}

int ckpt__sources_one_per_rank(const ckpt__sources_t *s)
{
    const source_desc_t *d = s->descs;
    for (size_t i = 0; i < s->count; i++)
        for (size_t j = i + 1; j < s->count; j++)
            if (d[i].rank == d[j].rank) return 0;
    return 1;
}
