/* Pool regions: memfd-backed so local processes (inference workers) can map the same pages
 * by fd, and sized for 2 MiB huge pages so large pools cost few TLB entries and pin fast. */
#include <errno.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "store/store_int.h"

int ckpt__region_alloc(uint64_t size, const char *label, const ckpt_pool_allocator_t *allocator,
                       ckpt__region_t *out)
{
    int rc = CKPT_OK;
    uint64_t len = CKPT_ALIGN_UP(CKPT_MAX(size, 1), (uint64_t)CKPT__HUGE_PAGE);
    void *base = MAP_FAILED;
    if (allocator && allocator->alloc) {
        void *handle = NULL;
        int afd = -1;
        base = NULL;
        if (allocator->alloc(allocator->ctx, len, &base, &afd, &handle) == CKPT_OK) {
            memset(out, 0, sizeof(*out));
            out->pub.base = base;
            out->pub.size = len;
            out->pub.fd = afd;
            out->map_len = len;
            out->allocator = allocator;
            out->alloc_handle = handle;
            return CKPT_OK;
        }
        ckpt_debug("%s: the pool allocator refused %llu bytes (%s): using a memfd", label,
                   (unsigned long long)len, ckpt_last_error());
        base = MAP_FAILED;
    }
    int fd = memfd_create("ckpt-pool", MFD_CLOEXEC);

    if (fd < 0) {
        rc = ckpt__error(CKPT_ENOMEM, "%s: memfd_create: %s", label, strerror(errno));
        goto fail;
    }
    if (ftruncate(fd, (off_t)len) != 0) {
        rc = ckpt__error(CKPT_ENOMEM, "%s: sizing a %llu-byte pool: %s", label,
                         (unsigned long long)len, strerror(errno));
        goto fail;
    }
    base = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (base == MAP_FAILED) {
        rc = ckpt__error(CKPT_ENOMEM, "%s: mapping a %llu-byte pool: %s", label,
                         (unsigned long long)len, strerror(errno));
        goto fail;
    }
    /* Only a hint: shmem huge pages depend on /sys/kernel/mm/transparent_hugepage/shmem_enabled. */
    if (madvise(base, len, MADV_HUGEPAGE) != 0)
        ckpt_debug("%s: MADV_HUGEPAGE: %s (continuing with small pages)", label, strerror(errno));
    memset(out, 0, sizeof(*out));
    out->pub.base = base;
    out->pub.size = len;
    out->pub.fd = fd;
    out->map_len = len;
    out->memfd = 1;
    return CKPT_OK;
fail:
    if (fd >= 0) close(fd);
    return rc;
}

int ckpt__region_map(int fd, uint64_t size, const char *label, ckpt__region_t *out)
{
    void *base = NULL;
    if (size) {
        base = mmap(NULL, size, PROT_READ, MAP_SHARED, fd, 0);
        if (base == MAP_FAILED)
            return ckpt__error(CKPT_EIO, "%s: mapping %llu bytes: %s", label,
                               (unsigned long long)size, strerror(errno));
    }
    memset(out, 0, sizeof(*out));
    out->pub.base = base;
    out->pub.size = size;
    out->pub.fd = -1;
    out->map_len = size;
    return CKPT_OK;
}

void ckpt__region_release(ckpt__region_t *r)
{
    if (r->allocator) {
        if (r->pub.base) r->allocator->release(r->allocator->ctx, r->pub.base, r->map_len,
                                               r->alloc_handle);
        r->allocator = NULL;
        r->pub.base = NULL;
        r->map_len = 0;
    }
    if (r->pub.base && r->map_len) munmap(r->pub.base, r->map_len);
    if (r->pub.fd >= 0 && !r->keep_fd) close(r->pub.fd);
    r->pub.base = NULL;
    r->pub.fd = -1;
    r->map_len = 0;
}
