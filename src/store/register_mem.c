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

int ckpt_store_register_fd(ckpt_store_t *store, const char *name, int fd, uint64_t size,
                           const ckpt_tensor_meta_t *metas, size_t count)
{
    double t0 = ckpt__now_s();
    struct stat st;
    int rc = ckpt__store_check_name(store, name);
    if (rc) return rc;
    if (count && !metas) return ckpt__error(CKPT_EINVAL, "registering '%s': NULL metas", name);
    if (fd < 0 || fstat(fd, &st) != 0)
        return ckpt__error(CKPT_EINVAL, "registering '%s': fd %d: %s", name, fd,
                           fd < 0 ? "negative" : strerror(errno));
    if ((uint64_t)st.st_size < size)
        return ckpt__error(CKPT_EINVAL, "registering '%s': fd %d holds %lld bytes, less than the %llu announced",
                           name, fd, (long long)st.st_size, (unsigned long long)size);

    ckpt_tensor_meta_t *m = ckpt__calloc(count, sizeof(*m));
    const void **ptrs = ckpt__calloc(count, sizeof(*ptrs));
    size_t *order = ckpt__calloc(count, sizeof(*order));
    ckpt__region_t *rg = ckpt__calloc(1, sizeof(*rg));
    uint64_t local = 0;
    if (!m || !ptrs || !order || !rg) {
        rc = ckpt__error(CKPT_ENOMEM, "registering '%s': out of memory", name);
        goto fail;
    }
    rg->pub.fd = -1;
    for (size_t i = 0; i < count; i++) {
        if ((rc = clean_meta(name, &metas[i], &m[i]))) goto fail;
        m[i].offset = metas[i].offset;
        if (m[i].offset > size || m[i].nbytes > size - m[i].offset) {
            rc = ckpt__error(CKPT_EINVAL, "registering '%s': tensor '%s' at offset %llu + %llu bytes lies outside the %llu-byte fd",
                             name, m[i].name, (unsigned long long)m[i].offset,
                             (unsigned long long)m[i].nbytes, (unsigned long long)size);
            goto fail;
        }
        order[i] = i;
        local += m[i].nbytes;
    }
    qsort_r(order, count, sizeof(*order), by_offset, m);
    for (size_t i = 1; i < count; i++) {
        const ckpt_tensor_meta_t *a = &m[order[i - 1]], *b = &m[order[i]];
        if (a->nbytes && b->nbytes && a->offset + a->nbytes > b->offset) {
            rc = ckpt__error(CKPT_EINVAL, "registering '%s': tensors '%s' and '%s' overlap at offset %llu",
                             name, a->name, b->name, (unsigned long long)b->offset);
            goto fail;
        }
    }
    if ((rc = ckpt__region_map(fd, size, name, rg))) goto fail;
    rg->pub.fd = fd;
    rg->keep_fd = 1; /* until registration succeeds the fd stays the caller's */
    if (store->opts.pin_cuda) rg->pub.pinned = ckpt__cuda_pin(&store->cuda, rg->pub.base, size, 1);
    for (size_t i = 0; i < count; i++) {
        const uint8_t *p = rg->pub.base ? (const uint8_t *)rg->pub.base + m[i].offset : NULL;
        ptrs[i] = p ? p : (const void *)rg; /* any non-NULL address marks "local" */
        m[i].checksum = ckpt_checksum(p, m[i].nbytes);
    }
    ckpt__free(order);
    rc = ckpt__store_add(store, name, m, ptrs, count, rg, 1);
    if (rc == CKPT_OK) {
        rg->keep_fd = 0; /* ours now: closed at unregister */
        set_stats(store, local, t0, "fd");
    }
    return rc;
fail:
    if (rg) ckpt__store_pool_release(store, rg);
    ckpt__free(rg);
    ckpt__free(order);
    ckpt__free(m);
    ckpt__free(ptrs);
    return rc;
}
