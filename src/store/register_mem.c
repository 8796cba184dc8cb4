/* Registration from caller memory: buffers are copied into a new pool region; an fd (memfd
 * or tmpfs file, e.g. handed over by a trainer) is mapped without copying. */
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "store/store_int.h"

static void set_stats(ckpt_store_t *store, uint64_t local, double t0, const char *path)
{
    memset(&store->stats, 0, sizeof(store->stats));
    store->stats.bytes_local = local;
    store->stats.seconds = ckpt__now_s() - t0;
    ckpt__strlcpy(store->stats.io_path, path, sizeof(store->stats.io_path));
    store->has_stats = 1;
}

/* Rebuilds a caller meta from name, dtype and shape, so a wrong nbytes cannot lie to us. */
static int clean_meta(const char *name, const ckpt_tensor_meta_t *in, ckpt_tensor_meta_t *out)
{
    char tname[CKPT_NAME_MAX];
    if (memchr(in->name, '\0', CKPT_NAME_MAX) == NULL)
        return ckpt__error(CKPT_EINVAL, "registering '%s': a tensor name is not terminated", name);
    memcpy(tname, in->name, CKPT_NAME_MAX);
    int rc = ckpt_tensor_meta_init(out, tname, in->dtype, in->shape, in->ndim);
    if (rc) return ckpt__error_prefix(rc, "registering '%s': ", name);
    out->owner = 0;
    return CKPT_OK;
}

int ckpt_store_register_buffers(ckpt_store_t *store, const char *name,
                                const ckpt_tensor_meta_t *metas, const void *const *data,
                                size_t count)
{
    double t0 = ckpt__now_s();
    int rc = ckpt__store_check_name(store, name);
    if (rc) return rc;
    if (count && (!metas || !data))
        return ckpt__error(CKPT_EINVAL, "registering '%s': NULL metas or data", name);

    ckpt_tensor_meta_t *m = ckpt__calloc(count, sizeof(*m));
    const void **ptrs = ckpt__calloc(count, sizeof(*ptrs));
    ckpt__region_t *rg = ckpt__calloc(1, sizeof(*rg));
    uint64_t off = 0, local = 0;
    if (!m || !ptrs || !rg) {
        rc = ckpt__error(CKPT_ENOMEM, "registering '%s': out of memory", name);
        goto fail;
    }
    rg->pub.fd = -1;
    for (size_t i = 0; i < count; i++) {
        if ((rc = clean_meta(name, &metas[i], &m[i]))) goto fail;
        if (m[i].nbytes && !data[i]) {
            rc = ckpt__error(CKPT_EINVAL, "registering '%s': tensor '%s' has no data", name, m[i].name);
            goto fail;
        }
        m[i].offset = off;
        off += ckpt_aligned_size(m[i].nbytes);
        local += m[i].nbytes;
    }
    if ((rc = ckpt__store_pool_alloc(store, off, name, rg))) goto fail;
    for (size_t i = 0; i < count; i++) {
        uint8_t *dst = (uint8_t *)rg->pub.base + m[i].offset;
        if (m[i].nbytes) memcpy(dst, data[i], m[i].nbytes);
        m[i].checksum = ckpt_checksum(dst, m[i].nbytes);
        ptrs[i] = dst;
    }
    /* ckpt__store_add owns m, ptrs and rg from here, whatever it returns. */
    rc = ckpt__store_add(store, name, m, ptrs, count, rg, 1);
    if (rc == CKPT_OK) set_stats(store, local, t0, "copy");
    return rc;
fail:
    if (rg) ckpt__store_pool_release(store, rg);
    ckpt__free(rg);
    ckpt__free(m);
    ckpt__free(ptrs);
    return rc;
}

static int by_offset(const void *a, const void *b, void *ctx)
{
    const ckpt_tensor_meta_t *m = ctx;
    uint64_t x = m[*(const size_t *)a].offset, y = m[*(const size_t *)b].offset;
    return x < y ? -1 : x > y;
}

/* Checks one part: its fd holds `size` bytes, its tensors lie inside and do not overlap.
 * Fills m[0..count) (offsets still relative to the fd). */
static int check_part(const char *name, size_t k, const ckpt_store_fd_part_t *p,
                      ckpt_tensor_meta_t *m)
{
    struct stat st;
    int rc = CKPT_OK;
    if (p->count && !p->metas)
        return ckpt__error(CKPT_EINVAL, "registering '%s': part %zu: NULL metas", name, k);
    if (p->fd < 0 || fstat(p->fd, &st) != 0)
        return ckpt__error(CKPT_EINVAL, "registering '%s': part %zu: fd %d: %s", name, k, p->fd,
                           p->fd < 0 ? "negative" : strerror(errno));
    if ((uint64_t)st.st_size < p->size)
        return ckpt__error(CKPT_EINVAL, "registering '%s': fd %d holds %lld bytes, less than the %llu announced",
                           name, p->fd, (long long)st.st_size, (unsigned long long)p->size);
    size_t *order = ckpt__calloc(p->count, sizeof(*order));
    if (!order) return ckpt__error(CKPT_ENOMEM, "registering '%s': out of memory", name);
    for (size_t i = 0; i < p->count && rc == CKPT_OK; i++) {
        if ((rc = clean_meta(name, &p->metas[i], &m[i]))) break;
        m[i].offset = p->metas[i].offset;
        m[i].checksum = p->metas[i].checksum; /* 0: computed at registration */
        if (m[i].offset > p->size || m[i].nbytes > p->size - m[i].offset)
            rc = ckpt__error(CKPT_EINVAL, "registering '%s': tensor '%s' at offset %llu + %llu bytes lies outside the %llu-byte fd",
                             name, m[i].name, (unsigned long long)m[i].offset,
                             (unsigned long long)m[i].nbytes, (unsigned long long)p->size);
        order[i] = i;
    }
    if (rc == CKPT_OK) qsort_r(order, p->count, sizeof(*order), by_offset, m);
    for (size_t i = 1; rc == CKPT_OK && i < p->count; i++) {
        const ckpt_tensor_meta_t *a = &m[order[i - 1]], *b = &m[order[i]];
        if (a->nbytes && b->nbytes && a->offset + a->nbytes > b->offset)
            rc = ckpt__error(CKPT_EINVAL, "registering '%s': tensors '%s' and '%s' overlap at offset %llu",
                             name, a->name, b->name, (unsigned long long)b->offset);
    }
    ckpt__free(order);
    return rc;
}

int ckpt_store_register_fds(ckpt_store_t *store, const char *name, int rank,
                            const ckpt_store_fd_part_t *parts, size_t nparts,
                            const ckpt_tensor_meta_t *remote, size_t nremote)
{
    double t0 = ckpt__now_s();
    int rc = ckpt__store_check_name(store, name);
    if (rc) return rc;
    if ((nparts && !parts) || (nremote && !remote))
        return ckpt__error(CKPT_EINVAL, "registering '%s': NULL parts or remote metas", name);
    size_t count = nremote;
    for (size_t k = 0; k < nparts; k++) count += parts[k].count;
    /* Pool ranges of the parts must be disjoint, or two tensors would share pool offsets. */
    for (size_t k = 0; k < nparts; k++)
        for (size_t j = k + 1; j < nparts; j++)
            if (parts[k].offset < parts[j].offset + parts[j].size &&
                parts[j].offset < parts[k].offset + parts[k].size)
                return ckpt__error(CKPT_EINVAL, "registering '%s': parts %zu and %zu claim "
                                   "overlapping pool offsets", name, k, j);

    ckpt_tensor_meta_t *m = ckpt__calloc(count, sizeof(*m));
    const void **ptrs = ckpt__calloc(count, sizeof(*ptrs));
    ckpt__region_t *rg = ckpt__calloc(nparts, sizeof(*rg));
    uint64_t local = 0;
    size_t mapped = 0, at = 0;
    if (!m || !ptrs || !rg) {
        rc = ckpt__error(CKPT_ENOMEM, "registering '%s': out of memory", name);
        goto fail;
    }
    for (size_t k = 0; k < nparts; k++) rg[k].pub.fd = -1;
    for (size_t k = 0; k < nparts; k++) {
        const ckpt_store_fd_part_t *p = &parts[k];
        ckpt_tensor_meta_t *pm = &m[at];
        if ((rc = check_part(name, k, p, pm))) goto fail;
        if ((rc = ckpt__region_map(p->fd, p->size, name, &rg[k]))) goto fail;
        mapped = k + 1;
        rg[k].pub.fd = p->fd;
        rg[k].pub.offset = p->offset;
        rg[k].keep_fd = 1; /* until registration succeeds the fd stays the caller's */
        if (store->opts.pin_cuda)
            rg[k].pub.pinned = ckpt__cuda_pin(rg[k].pub.base, p->size, 1);
        for (size_t i = 0; i < p->count; i++) {
            const uint8_t *d = rg[k].pub.base ? (const uint8_t *)rg[k].pub.base + pm[i].offset : NULL;
            ptrs[at + i] = d ? d : (const void *)&rg[k]; /* any non-NULL address marks "local" */
            /* A checksum the caller computed while it wrote the bytes (a pulled
             * publication) saves reading them again, through new page faults. */
            if (pm[i].checksum == 0 || !d) pm[i].checksum = ckpt_checksum(d, pm[i].nbytes);
            pm[i].offset += p->offset; /* from fd offset to pool offset */
            pm[i].owner = rank;
            local += pm[i].nbytes;
        }
        at += p->count;
    }
    for (size_t i = 0; i < nremote; i++) {
        ckpt_tensor_meta_t *rm = &m[at + i];
        if ((rc = clean_meta(name, &remote[i], rm))) goto fail;
        if (remote[i].owner < 0 || remote[i].owner == rank) {
            rc = ckpt__error(CKPT_EINVAL, "registering '%s': remote tensor '%s' names owner %d "
                             "(this store is rank %d)", name, rm->name, remote[i].owner, rank);
            goto fail;
        }
        rm->owner = remote[i].owner;
        rm->offset = remote[i].offset;
        ptrs[at + i] = NULL; /* held by another rank */
    }
    /* ckpt__store_add owns m, ptrs and rg from here, whatever it returns; on failure it
     * releases the regions, which leaves the fds open (keep_fd): they stay the caller's. */
    rc = ckpt__store_add(store, name, m, ptrs, count, rg, nparts);
    if (rc == CKPT_OK) {
        for (size_t k = 0; k < nparts; k++) rg[k].keep_fd = 0; /* ours now: closed at unregister */
        set_stats(store, local, t0, "fd");
    }
    return rc;
fail:
    for (size_t k = 0; rg && k < mapped; k++) ckpt__store_pool_release(store, &rg[k]);
    ckpt__free(rg);
    ckpt__free(m);
    ckpt__free(ptrs);
    return rc;
}

int ckpt_store_register_fd(ckpt_store_t *store, const char *name, int fd, uint64_t size,
                           const ckpt_tensor_meta_t *metas, size_t count)
{
    ckpt_store_fd_part_t part = {fd, size, 0, metas, count};
    return ckpt_store_register_fds(store, name, 0, &part, 1, NULL, 0);
}
