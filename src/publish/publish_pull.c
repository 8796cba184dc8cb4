/* Publishing by pull (docs/PUBLISH.md): the engine rank reads the trainer's tensors
 * straight out of the trainer's memory into a memfd of its own.
 *
 * Why: a sealed memfd from the trainer is new memory at every step (a seal is forever),
 * and allocating its pages cost 0.6-0.8 s per GiB here, six times the copy itself. A memfd
 * the engine owns can be refilled at the next step but one, so in a steady RL loop the
 * copy lands in pages that are already there. The trainer cannot write into it (it never
 * maps it), which is what the seals guarantee in the other mode. */
#include <errno.h>
#include <limits.h>
#include <stdlib.h>
#include <string.h>
#include <sys/uio.h>

#include "publish/publish_int.h"
#include "core/le.h"


typedef struct {
    uint64_t offset, addr;
} seg_t;

static int by_offset(const void *a, const void *b)
{
    const seg_t *x = a, *y = b;
    return x->offset < y->offset ? -1 : x->offset > y->offset;
}

static int meta_by_offset(const void *a, const void *b)
{
    const ckpt_tensor_meta_t *x = a, *y = b;
    return x->offset < y->offset ? -1 : x->offset > y->offset;
}

/* Copies every tensor from the trainer into base, batching up to IOV_MAX segments per
 * call and resuming after a partial read (the kernel stops at a page it cannot read). */
static int read_tensors(int pid, uint8_t *base, const ckpt_tensor_meta_t *m, const seg_t *segs,
                        size_t n, const char *label)
{
    struct iovec local[IOV_MAX], remote[IOV_MAX];
    size_t i = 0;
    uint64_t done = 0; /* bytes of tensor i already read */
    while (i < n) {
        int k = 0;
        for (size_t j = i; j < n && k < IOV_MAX; j++) {
            uint64_t skip = j == i ? done : 0;
            if (m[j].nbytes - skip == 0) continue;
            local[k].iov_base = base + m[j].offset + skip;
            local[k].iov_len = (size_t)(m[j].nbytes - skip);
            remote[k].iov_base = (void *)(uintptr_t)(segs[j].addr + skip);
            remote[k].iov_len = local[k].iov_len;
            k++;
        }
        if (k == 0) break;
        ssize_t got = process_vm_readv(pid, local, (unsigned long)k, remote, (unsigned long)k, 0);
        if (got < 0 && errno == EINTR) continue;
        if (got <= 0) {
            int err = got < 0 ? errno : EFAULT;
            /* the tensor it stopped in (one with bytes left exists: k > 0) */
            while (m[i].nbytes == done) i++, done = 0;
            if (err == ESRCH)
                return ckpt__error(CKPT_EPEER, "%s: the trainer (pid %d) exited before its "
                                   "tensors were read", label, pid);
            if (err == EPERM)
                return ckpt__error(CKPT_EPERM, "%s: may not read the memory of pid %d "
                                   "(process_vm_readv: %s; a ptrace restriction such as Yama "
                                   "ptrace_scope 2-3 or another user's process): publish "
                                   "without pull", label, pid, strerror(err));
            return ckpt__error(CKPT_EINVAL, "%s: tensor '%s': reading %llu bytes at 0x%llx of "
                               "pid %d failed (%s): the trainer does not map that memory",
                               label, m[i].name, (unsigned long long)(m[i].nbytes - done),
                               (unsigned long long)(segs[i].addr + done), pid, strerror(err));
        }
        uint64_t left = (uint64_t)got;
        while (i < n && left >= m[i].nbytes - done) {
            left -= m[i].nbytes - done;
            i++;
            done = 0;
        }
        if (i < n) done += left;
    }
    return CKPT_OK;
}

int ckpt__pub_pull(int fd, uint8_t *base, int pid, const ckpt__pub_request_t *req,
                   const char *label, ckpt_tensor_meta_t **metas_out, size_t *count_out)
{
    if (req->header_len > req->size)
        return ckpt__error(CKPT_EINVAL, "%s: a %llu-byte header in a %llu-byte checkpoint",
                           label, (unsigned long long)req->header_len,
                           (unsigned long long)req->size);
    /* The header goes in through the mapping; the memfd is then checked by the same
     * reader as a trainer's sealed memfd. */
    memcpy(base, req->header, (size_t)req->header_len);
    ckpt_tensor_meta_t *m = NULL;
    size_t n = 0;
    int rc = ckpt__pub_parse_fd(fd, label, req->size, &m, &n);
    if (rc) return rc;
    seg_t *segs = ckpt__calloc(n ? n : 1, sizeof(*segs));
    if (!segs) {
        rc = ckpt__error(CKPT_ENOMEM, "%s: out of memory", label);
        goto out;
    }
    if (req->nsegs != n) {
        rc = ckpt__error(CKPT_EINVAL, "%s: %u segments for the header's %zu tensors (one "
                         "address per tensor)", label, req->nsegs, n);
        goto out;
    }
    for (size_t i = 0; i < n; i++) {
        segs[i].offset = get_u64(req->segs + i * CKPT__PUB_SEG_BYTES);
        segs[i].addr = get_u64(req->segs + i * CKPT__PUB_SEG_BYTES + 8);
    }
    /* Segment i must name tensor i once both are in offset order (tensors of one file
     * never share an offset unless empty, and empty ones read nothing). */
    qsort(m, n, sizeof(*m), meta_by_offset);
    qsort(segs, n, sizeof(*segs), by_offset);
    for (size_t i = 0; i < n; i++)
        if (segs[i].offset != m[i].offset) {
            rc = ckpt__error(CKPT_EINVAL, "%s: segment at offset %llu does not start a tensor "
                             "(tensor '%s' starts at %llu)", label,
                             (unsigned long long)segs[i].offset, m[i].name,
                             (unsigned long long)m[i].offset);
            goto out;
        }
    double t1 = ckpt__now_s();
    rc = read_tensors(pid, base, m, segs, n, label);
    double t2 = ckpt__now_s();
    /* Checksums now, through this mapping whose pages are mapped: the store would read the
     * bytes again through a new mapping, one page fault per 4 KiB. A tensor that hashes to
     * 0 is hashed again there (0 means "not computed"). */
    for (size_t i = 0; rc == CKPT_OK && i < n; i++)
        m[i].checksum = ckpt_checksum(base + m[i].offset, m[i].nbytes);
    ckpt_debug("publish: %s: read %.3f s, checksums %.3f s (%llu bytes)", label, t2 - t1,
               ckpt__now_s() - t2, (unsigned long long)req->size);
out:
    ckpt__free(segs);
    if (rc) {
        ckpt__free(m);
        return rc;
    }
    *metas_out = m;
    *count_out = n;
    return CKPT_OK;
}
