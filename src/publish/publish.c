/* Trainer side of publishing (include/ckpt/publish.h): a memfd laid out as a safetensors
 * file, written once by the caller, sealed and passed to the engine rank's socket. */
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include "ckpt/publish.h"
#include "ipc/conn.h"
#include "format/st_internal.h"
#include "publish/publish_int.h"
#include "core/le.h"

struct ckpt_publication {
    char name[CKPT_NAME_MAX];
    int fd;
    uint8_t *base; /* the writable mapping; NULL once sealed */
    uint64_t size;
    int sealed;
    int sent;
    size_t count;
    uint64_t *offsets; /* per caller index: absolute offset in the memfd */
    uint64_t *nbytes;
    /* pull (ckpt_publish_begin_pull): no memfd here; the engine reads each tensor from
     * sources[i] in this process. header: the 8-byte length and JSON it writes first. */
    int pull;
    const void **sources;
    uint8_t *header;
    uint64_t header_len;
};

typedef struct {
    size_t index;
    size_t esize;
} order_t;

/* Falling element size, then the caller's order: every tensor then starts on a multiple of
 * its element size (all sizes before it are multiples of it), as a typed view wants. */
static int by_esize(const void *a, const void *b)
{
    const order_t *x = a, *y = b;
    if (x->esize != y->esize) return x->esize > y->esize ? -1 : 1;
    return x->index < y->index ? -1 : x->index > y->index;
}

void ckpt_publish_free(ckpt_publication_t *pub)
{
    if (!pub) return;
    if (pub->base && pub->size) munmap(pub->base, pub->size);
    if (pub->fd >= 0) close(pub->fd);
    ckpt__free(pub->offsets);
    ckpt__free(pub->nbytes);
    ckpt__free(pub->sources);
    ckpt__free(pub->header);
    ckpt__free(pub);
}

static int begin(const char *name, const ckpt_tensor_meta_t *metas, size_t count, int pull,
                 ckpt_publication_t **pub_out);

int ckpt_publish_begin(const char *name, const ckpt_tensor_meta_t *metas, size_t count,
                       ckpt_publication_t **pub_out)
{
    return begin(name, metas, count, 0, pub_out);
}

int ckpt_publish_begin_pull(const char *name, const ckpt_tensor_meta_t *metas, size_t count,
                            ckpt_publication_t **pub_out)
{
    return begin(name, metas, count, 1, pub_out);
}

int ckpt_publish_set_source(ckpt_publication_t *pub, size_t index, const void *data)
{
    if (!pub || index >= pub->count)
        return ckpt__error(CKPT_EINVAL, "publish: no tensor %zu", index);
    if (!pub->pull)
        return ckpt__error(CKPT_ESTATE, "publish '%s': set_source is for pulled publications "
                           "(ckpt_publish_begin_pull); copy into ckpt_publish_tensor_ptr",
                           pub->name);
    pub->sources[index] = data;
    return CKPT_OK;
}

static int begin(const char *name, const ckpt_tensor_meta_t *metas, size_t count, int pull,
                 ckpt_publication_t **pub_out)
{
    int rc = ckpt__pub_check_name(name);
    if (rc) return rc;
    if ((count && !metas) || !pub_out)
        return ckpt__error(CKPT_EINVAL, "publish '%s': NULL metas or pub_out", name);
    char label[CKPT_NAME_MAX + 16];
    snprintf(label, sizeof(label), "publish '%s'", name);
    ckpt_publication_t *pub = ckpt__calloc(1, sizeof(*pub));
    order_t *order = ckpt__calloc(count, sizeof(*order));
    ckpt_tensor_meta_t *sorted = ckpt__calloc(count, sizeof(*sorted));
    char *json = NULL;
    size_t jlen = 0;
    if (!pub || !order || !sorted) {
        ckpt__free(pub);
        pub = NULL;
        rc = ckpt__error(CKPT_ENOMEM, "%s: out of memory", label);
        goto out;
    }
    pub->fd = -1;
    ckpt__strlcpy(pub->name, name, sizeof(pub->name));
    pub->count = count;
    pub->offsets = ckpt__calloc(count, sizeof(uint64_t));
    pub->nbytes = ckpt__calloc(count, sizeof(uint64_t));
    if (!pub->offsets || !pub->nbytes) {
        rc = ckpt__error(CKPT_ENOMEM, "%s: out of memory", label);
        goto out;
    }
    for (size_t i = 0; i < count; i++) {
        if (memchr(metas[i].name, '\0', CKPT_NAME_MAX) == NULL) {
            rc = ckpt__error(CKPT_EINVAL, "%s: the name of tensor %zu is not terminated", label, i);
            goto out;
        }
        order[i].index = i;
        order[i].esize = ckpt_dtype_size(metas[i].dtype);
    }
    qsort(order, count, sizeof(*order), by_esize);
    for (size_t k = 0; k < count; k++) {
        const ckpt_tensor_meta_t *in = &metas[order[k].index];
        /* Rebuilt from name, dtype and shape: a caller's nbytes cannot lie to the layout. */
        rc = ckpt_tensor_meta_init(&sorted[k], in->name, in->dtype, in->shape, in->ndim);
        if (rc < 0) {
            rc = ckpt__error_prefix(rc, "%s: tensor %zu: ", label, order[k].index);
            goto out;
        }
    }
    rc = ckpt__st_header_json(label, sorted, count, CKPT_PUBLISH_DATA_ALIGN, &json, &jlen);
    if (rc < 0) goto out;
    uint64_t pos = 8 + jlen;
    for (size_t k = 0; k < count; k++) {
        pub->offsets[order[k].index] = pos;
        pub->nbytes[order[k].index] = sorted[k].nbytes;
        pos += sorted[k].nbytes;
    }
    pub->size = pos;
    if (pull) {
        pub->pull = 1;
        pub->header_len = 8 + jlen;
        pub->header = ckpt__malloc((size_t)pub->header_len);
        pub->sources = ckpt__calloc(count ? count : 1, sizeof(*pub->sources));
        if (!pub->header || !pub->sources) {
            rc = ckpt__error(CKPT_ENOMEM, "%s: out of memory", label);
            goto out;
        }
        for (int i = 0; i < 8; i++) pub->header[i] = (uint8_t)((uint64_t)jlen >> (8 * i));
        memcpy(pub->header + 8, json, jlen);
        *pub_out = pub;
        pub = NULL;
        rc = CKPT_OK;
        goto out;
    }
    /* MFD_ALLOW_SEALING: the engine accepts only sealed fds (it must know nobody can
     * change the bytes while workers read them). */
    pub->fd = memfd_create("ckpt-publish", MFD_CLOEXEC | MFD_ALLOW_SEALING);
    if (pub->fd < 0) {
        rc = ckpt__error(CKPT_ENOMEM, "%s: memfd_create: %s", label, strerror(errno));
        goto out;
    }
    if (ftruncate(pub->fd, (off_t)pub->size) != 0) {
        rc = ckpt__error(CKPT_ENOMEM, "%s: sizing a %llu-byte memfd: %s", label,
                         (unsigned long long)pub->size, strerror(errno));
        goto out;
    }
    void *base = mmap(NULL, pub->size, PROT_READ | PROT_WRITE, MAP_SHARED, pub->fd, 0);
    if (base == MAP_FAILED) {
        rc = ckpt__error(CKPT_ENOMEM, "%s: mapping a %llu-byte memfd: %s", label,
                         (unsigned long long)pub->size, strerror(errno));
        goto out;
    }
    pub->base = base;
    /* Hints only: shmem huge pages where the system allows them, and every page allocated
     * in one call instead of one write fault per 4 KiB during the caller's copy. A page
     * that cannot be had now faults later (or SIGBUSes on a full tmpfs, as any memfd). */
    madvise(base, pub->size, MADV_HUGEPAGE);
    if (pub->size > 8 + jlen) madvise(base, pub->size, MADV_POPULATE_WRITE);
    for (int i = 0; i < 8; i++) pub->base[i] = (uint8_t)((uint64_t)jlen >> (8 * i));
    memcpy(pub->base + 8, json, jlen);
    *pub_out = pub;
    pub = NULL;
    rc = CKPT_OK;
out:
    ckpt_publish_free(pub);
    ckpt__free(order);
    ckpt__free(sorted);
    ckpt__free(json);
    return rc;
}

void *ckpt_publish_tensor_ptr(ckpt_publication_t *pub, size_t index)
{
    if (!pub || pub->sealed || !pub->base || index >= pub->count) return NULL;
    return pub->base + pub->offsets[index];
}

uint64_t ckpt_publish_tensor_offset(const ckpt_publication_t *pub, size_t index)
{
    if (!pub || index >= pub->count) return UINT64_MAX;
    return pub->offsets[index];
}

uint64_t ckpt_publish_size(const ckpt_publication_t *pub) { return pub ? pub->size : 0; }

int ckpt_publish_fd(const ckpt_publication_t *pub) { return pub ? pub->fd : -1; }

int ckpt_publish_seal(ckpt_publication_t *pub)
{
    if (!pub) return ckpt__error(CKPT_EINVAL, "publish seal: NULL publication");
    if (pub->sealed || pub->pull) return CKPT_OK; /* pulled: nothing of ours to seal */
    /* F_SEAL_WRITE is refused (EBUSY) while any writable shared mapping exists: ours goes
     * first. After the seal nobody can write, shrink or grow the memfd, us included. */
    if (pub->base) munmap(pub->base, pub->size);
    pub->base = NULL;
    if (fcntl(pub->fd, F_ADD_SEALS, F_SEAL_WRITE | F_SEAL_SHRINK | F_SEAL_GROW) != 0)
        return ckpt__error(errno == EBUSY ? CKPT_EBUSY : CKPT_EIO,
                           "publish '%s': sealing the memfd: %s%s", pub->name, strerror(errno),
                           errno == EBUSY ? " (a writable mapping of it is still open: unmap "
                                            "every mapping of this fd first)" : "");
    pub->sealed = 1;
    return CKPT_OK;
}

/* Connects to a Unix socket within the deadline. */
static int connect_socket(const char *path, int timeout_ms, int *fd_out)
{
    struct sockaddr_un addr;
    memset(&addr, 0, sizeof(addr));
    addr.sun_family = AF_UNIX;
    if (ckpt__strlcpy(addr.sun_path, path, sizeof(addr.sun_path)) < 0)
        return ckpt__error(CKPT_EINVAL, "publish: socket path longer than %zu bytes: %s",
                           sizeof(addr.sun_path) - 1, path);
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
    if (fd < 0) return ckpt__error(CKPT_EIO, "publish: socket: %s", strerror(errno));
    if (connect(fd, (struct sockaddr *)&addr, sizeof(addr)) != 0) {
        int err = errno;
        if (err == EAGAIN || err == EINPROGRESS) {
            /* The listener's backlog is full: wait for room, bounded. */
            struct pollfd pf = {fd, POLLOUT, 0};
            int n = poll(&pf, 1, timeout_ms < 0 ? 60000 : timeout_ms);
            socklen_t len = sizeof(err);
            if (n <= 0) err = ETIMEDOUT;
            else if (getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len) != 0) err = errno;
        }
        if (err) {
            close(fd);
            if (err == ENOENT || err == ECONNREFUSED)
                return ckpt__error(CKPT_EPEER, "publish: no engine rank listens on %s (%s): "
                                   "start `ckpt-engine serve --socket-dir DIR` on this host "
                                   "and publish to DIR/publish-<rank>.sock", path, strerror(err));
            if (err == EACCES || err == EPERM)
                return ckpt__error(CKPT_EPERM, "publish: %s: %s (the socket is mode 0600: "
                                   "publish as the engine's user)", path, strerror(err));
            return ckpt__error(err == ETIMEDOUT ? CKPT_ETIMEDOUT : CKPT_EIO,
                               "publish: connecting to %s: %s", path, strerror(err));
        }
    }
    *fd_out = fd;
    return CKPT_OK;
}

/* Receives one PUBLISH_REPLY into reply; returns its kind or a negative status. */
static int recv_reply(ckpt__ipc_conn_t *c, int timeout_ms, ckpt_publish_reply_t *reply)
{
    ckpt__ipc_hdr_t hdr;
    int rc = ckpt__ipc_conn_recv(c, timeout_ms, NULL, &hdr);
    if (rc) return rc;
    if (hdr.type != CKPT_IPC_MSG_PUBLISH_REPLY) {
        ckpt__ipc_conn_drop_fds(c);
        return ckpt__error(CKPT_EPROTO, "%s: answered with %s instead of PUBLISH_REPLY (a "
                           "worker socket? publish to DIR/publish-<rank>.sock)", c->peer,
                           ckpt__ipc_msg_name(hdr.type));
    }
    ckpt__ipc_conn_drop_fds(c);
    int32_t status;
    uint32_t kind;
    rc = ckpt__pub_reply_decode(c->rx_buf, hdr.length, &status, &kind, &reply->version,
                                reply->text, sizeof(reply->text));
    if (rc) return rc;
    reply->status = status;
    return (int)kind;
}

static int send_once(ckpt_publication_t *pub, const char *socket_path,
                     const ckpt_publish_options_t *opts, ckpt_publish_reply_t *reply);

int ckpt_publish_send(ckpt_publication_t *pub, const char *socket_path,
                      const ckpt_publish_options_t *opts, ckpt_publish_reply_t *reply)
{
    ckpt_publish_reply_t local;
    if (!reply) reply = &local;
    memset(reply, 0, sizeof(*reply));
    int rc = send_once(pub, socket_path, opts, reply);
    /* Whatever failed, the reply says so too (bindings read it instead of thread-local
     * error text). */
    if (rc < 0) {
        reply->status = rc;
        reply->registered = 0;
        ckpt__strlcpy(reply->text, ckpt_last_error(), sizeof(reply->text));
    }
    return rc;
}

static int send_once(ckpt_publication_t *pub, const char *socket_path,
                     const ckpt_publish_options_t *opts, ckpt_publish_reply_t *reply)
{
    ckpt_publish_options_t defaults = CKPT_PUBLISH_OPTIONS_INIT;
    if (!opts) opts = &defaults;
    if (!pub || !socket_path) return ckpt__error(CKPT_EINVAL, "publish: NULL publication or path");
    if (ckpt__check_field_mask(opts->field_mask, 0, "ckpt_publish_options_t") < 0)
        return CKPT_EINVAL;
    if (pub->sent)
        return ckpt__error(CKPT_ESTATE, "publish '%s': already sent; make a new publication "
                           "for the next step", pub->name);
    if (opts->nparts == 0 || opts->part >= opts->nparts)
        return ckpt__error(CKPT_EINVAL, "publish '%s': part %u of %u (parts count from 0, "
                           "nparts >= 1)", pub->name, opts->part, opts->nparts);
    int timeout_ms = opts->timeout_ms > 0 ? opts->timeout_ms : defaults.timeout_ms;
    int rc = ckpt_publish_seal(pub);
    if (rc) return rc;
    uint8_t *segs = NULL;
    if (pub->pull) {
        segs = ckpt__malloc(pub->count ? pub->count * CKPT__PUB_SEG_BYTES : 1);
        if (!segs) return ckpt__error(CKPT_ENOMEM, "publish '%s': out of memory", pub->name);
        for (size_t i = 0; i < pub->count; i++) {
            if (!pub->sources[i] && pub->nbytes[i]) {
                ckpt__free(segs);
                return ckpt__error(CKPT_EINVAL, "publish '%s': tensor %zu has no source "
                                   "(ckpt_publish_set_source)", pub->name, i);
            }
            put_u64(segs + i * CKPT__PUB_SEG_BYTES, pub->offsets[i]);
            put_u64(segs + i * CKPT__PUB_SEG_BYTES + 8, (uint64_t)(uintptr_t)pub->sources[i]);
        }
    }
    int fd = -1;
    rc = connect_socket(socket_path, timeout_ms, &fd);
    if (rc) {
        ckpt__free(segs);
        return rc;
    }
    int ptracer_set = 0;
    if (pub->pull) {
        /* Under Yama's ptrace_scope 1 only a process we name may read our memory: the
         * engine rank at the other end of this socket, until its answer. */
        struct ucred cred;
        socklen_t clen = sizeof(cred);
        if (getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cred, &clen) == 0)
            ptracer_set = prctl(PR_SET_PTRACER, (unsigned long)cred.pid, 0, 0, 0) == 0;
    }
    char peer[320];
    snprintf(peer, sizeof(peer), "engine rank on %s", socket_path);
    ckpt__ipc_conn_t c;
    memset(&c, 0, sizeof(c));
    ckpt__ipc_conn_init(&c, fd, peer);
    ckpt__pub_request_t req;
    memset(&req, 0, sizeof(req));
    req.part = opts->part;
    req.nparts = opts->nparts;
    req.step = opts->step;
    req.size = pub->size;
    req.flags = opts->wait ? CKPT__PUB_FLAG_WAIT : 0;
    ckpt__strlcpy(req.name, pub->name, sizeof(req.name));
    if (pub->pull) {
        req.flags |= CKPT__PUB_FLAG_PULL;
        req.pid = (uint32_t)getpid();
        req.nsegs = (uint32_t)pub->count;
        req.header_len = pub->header_len;
        req.header = pub->header;
        req.segs = segs;
    }
    uint8_t *payload = NULL;
    size_t len = ckpt__pub_request_size(&req);
    rc = ckpt__ipc_conn_tx_reserve(&c, len, &payload);
    if (rc == CKPT_OK) {
        ckpt__pub_request_encode(&req, payload);
        rc = ckpt__ipc_conn_send(&c, CKPT_IPC_MSG_PUBLISH, len, pub->pull ? NULL : &pub->fd,
                                 pub->pull ? 0 : 1, timeout_ms);
    }
    ckpt__free(segs);
    if (rc == CKPT_OK) pub->sent = 1;
    if (rc == CKPT_OK) rc = recv_reply(&c, timeout_ms, reply);
    /* Any answer means the engine has read our tensors (or gave up). */
    if (ptracer_set) prctl(PR_SET_PTRACER, 0, 0, 0, 0);
    if (rc == CKPT__PUB_ACCEPTED && opts->wait) {
        rc = recv_reply(&c, timeout_ms, reply);
        if (rc == CKPT_ETIMEDOUT)
            rc = ckpt__error(CKPT_ETIMEDOUT, "publish '%s' part %u/%u: accepted, but not "
                             "registered within %d ms: the engine registers a checkpoint once "
                             "every part is in and rank 0 looks (serve --http polls; with "
                             "--commands run `await-published %s`); the part stays pending",
                             pub->name, opts->part, opts->nparts, timeout_ms, pub->name);
    }
    ckpt__ipc_conn_destroy(&c);
    if (rc < 0) return rc;
    if (rc == CKPT__PUB_REFUSED)
        return ckpt__error(reply->status, "publish '%s' part %u/%u refused by %s: %s",
                           pub->name, opts->part, opts->nparts, socket_path, reply->text);
    reply->registered = rc == CKPT__PUB_REGISTERED;
    return CKPT_OK;
}

int ckpt_publish_buffers(const char *socket_path, const char *name,
                         const ckpt_tensor_meta_t *metas, const void *const *data, size_t count,
                         const ckpt_publish_options_t *opts, ckpt_publish_reply_t *reply)
{
    if (count && !data) return ckpt__error(CKPT_EINVAL, "publish '%s': NULL data", name ? name : "");
    ckpt_publication_t *pub = NULL;
    int rc = ckpt_publish_begin(name, metas, count, &pub);
    for (size_t i = 0; rc == CKPT_OK && i < count; i++) {
        if (pub->nbytes[i] && !data[i])
            rc = ckpt__error(CKPT_EINVAL, "publish '%s': tensor '%s' has no data", name,
                             metas[i].name);
        else if (pub->nbytes[i])
            memcpy(ckpt_publish_tensor_ptr(pub, i), data[i], pub->nbytes[i]);
    }
    if (rc == CKPT_OK) rc = ckpt_publish_send(pub, socket_path, opts, reply);
    ckpt_publish_free(pub);
    return rc;
}
