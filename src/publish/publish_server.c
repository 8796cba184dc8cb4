/* The engine rank's publish socket (docs/PUBLISH.md): a thread accepts trainers, checks
 * what they send (peer uid, seals, safetensors header) and keeps the parts pending under a
 * mutex. It never touches MPI or the store: rank 0's main thread takes the parts between
 * commands and registers them collectively (src/engine/publish.c). */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include "ckpt/safetensors.h"
#include "ipc/conn.h"
#include "publish/publish_int.h"

#define REQUIRED_SEALS (F_SEAL_WRITE | F_SEAL_SHRINK | F_SEAL_GROW)
/* Bound of sending one answer: answers are ~100 bytes on an idle socket. */
#define REPLY_TIMEOUT_MS 1000

struct ckpt__pub_server {
    char path[sizeof(((struct sockaddr_un *)0)->sun_path)];
    int listen_fd;
    int wake[2]; /* written by close: the thread leaves its poll at once */
    pthread_t thread;
    int started;
    int recv_timeout_ms;
    long deny_uid; /* test hook (CKPT_TEST_PUBLISH_DENY_UID): refuse this uid too; -1 none */
    int deny_pull; /* test hook (CKPT_TEST_PUBLISH_DENY_PULL=1): refuse every pull as EPERM */
    pthread_mutex_t mu;
    ckpt__pub_part_t *parts; /* pending, under mu */
    size_t count, cap;
    /* Pulled publishing. spare (under mu): memfds of replaced versions, kept for the next
     * pull. made (membership under mu, mappings touched by the listener thread only): the
     * memfds this listener made, each with the read-write mapping it fills them through,
     * kept while any fd of this process still refers to the memfd, so that refilling one
     * does not enter 262144 pages per GiB in the page table again (~0.2 s per GiB here). A
     * trainer's memfd is sealed and never among them. */
    struct spare {
        int fd;
        uint64_t size;
        double since; /* ckpt__now_s() when it came back */
    } spare[CKPT__PUB_MAX_SPARE];
    int nspare;
    struct made {
        ino_t ino;
        uint8_t *base; /* MAP_SHARED read-write, pages populated; NULL: not mapped */
        uint64_t size;
    } made[2 * CKPT__PUB_MAX_SPARE + 2];
    size_t nmade;
};

/* ---- the received fd ---- */

static const char *seal_names(int seals, char *buf, size_t cap)
{
    buf[0] = '\0';
    if (seals & F_SEAL_WRITE) strncat(buf, "F_SEAL_WRITE ", cap - strlen(buf) - 1);
    if (seals & F_SEAL_SHRINK) strncat(buf, "F_SEAL_SHRINK ", cap - strlen(buf) - 1);
    if (seals & F_SEAL_GROW) strncat(buf, "F_SEAL_GROW ", cap - strlen(buf) - 1);
    size_t n = strlen(buf);
    if (n) buf[n - 1] = '\0';
    return buf;
}

static int pread_full(int fd, void *buf, size_t len, uint64_t off)
{
    uint8_t *p = buf;
    while (len) {
        ssize_t n = pread(fd, p, len, (off_t)off);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) return -1;
        p += n;
        len -= (size_t)n;
        off += (uint64_t)n;
    }
    return 0;
}

int ckpt__pub_inspect_fd(int fd, const char *label, uint64_t announced,
                         ckpt_tensor_meta_t **metas_out, size_t *count_out)
{
    char names[64];
    int seals = fcntl(fd, F_GET_SEALS);
    if (seals < 0)
        return ckpt__error(CKPT_EINVAL, "%s: the fd is not a sealable memfd (F_GET_SEALS: %s): "
                           "create it with memfd_create(MFD_ALLOW_SEALING) and seal it with "
                           CKPT__PUB_SEALS_REQUIRED_TEXT " (ckpt_publish_send does both)",
                           label, strerror(errno));
    if ((seals & REQUIRED_SEALS) != REQUIRED_SEALS && (seals & F_SEAL_SEAL))
        return ckpt__error(CKPT_EPERM, "%s: the memfd is not sealed and cannot be (made without "
                           "MFD_ALLOW_SEALING), so the trainer could change or truncate it "
                           "while workers read it: create it with memfd_create(name, "
                           "MFD_ALLOW_SEALING), unmap it and seal it with "
                           CKPT__PUB_SEALS_REQUIRED_TEXT " before sending (ckpt_publish_send "
                           "does)", label);
    if ((seals & REQUIRED_SEALS) != REQUIRED_SEALS)
        return ckpt__error(CKPT_EPERM, "%s: the memfd is not sealed (has: %s; needs "
                           CKPT__PUB_SEALS_REQUIRED_TEXT "), so the trainer could change or "
                           "truncate it while workers read it: unmap it and call fcntl(fd, "
                           "F_ADD_SEALS, F_SEAL_WRITE | F_SEAL_SHRINK | F_SEAL_GROW) before "
                           "sending (ckpt_publish_send does)", label,
                           (seals & REQUIRED_SEALS) ? seal_names(seals, names, sizeof(names))
                                                    : "none");
    struct stat st;
    if (fstat(fd, &st) != 0)
        return ckpt__error(CKPT_EIO, "%s: fstat: %s", label, strerror(errno));
    uint64_t size = (uint64_t)st.st_size;
    if (size != announced)
        return ckpt__error(CKPT_EINVAL, "%s: the memfd holds %llu bytes, the message announced "
                           "%llu", label, (unsigned long long)size,
                           (unsigned long long)announced);
    return ckpt__pub_parse_fd(fd, label, size, metas_out, count_out);
}

int ckpt__pub_parse_fd(int fd, const char *label, uint64_t size, ckpt_tensor_meta_t **metas_out,
                       size_t *count_out)
{
    uint8_t lenbuf[8];
    if (size < 8 || pread_full(fd, lenbuf, 8, 0) != 0)
        return ckpt__error(CKPT_EFORMAT, "%s: %llu bytes, too short for a safetensors header",
                           label, (unsigned long long)size);
    uint64_t hlen = 0;
    for (int i = 7; i >= 0; i--) hlen = (hlen << 8) | lenbuf[i];
    if (hlen > CKPT_ST_MAX_HEADER || hlen > size - 8)
        return ckpt__error(CKPT_EFORMAT, "%s: header length %llu does not fit the %llu-byte "
                           "memfd (not laid out as a safetensors file)", label,
                           (unsigned long long)hlen, (unsigned long long)size);
    char *json = ckpt__malloc((size_t)hlen + 1);
    if (!json) return ckpt__error(CKPT_ENOMEM, "%s: no memory for the header", label);
    if (pread_full(fd, json, (size_t)hlen, 8) != 0) {
        ckpt__free(json);
        return ckpt__error(CKPT_EIO, "%s: reading the header: %s", label, strerror(errno));
    }
    json[hlen] = '\0';
    ckpt_st_file_t *f = NULL;
    int rc = ckpt_st_parse_header(label, json, (size_t)hlen, size, &f);
    ckpt__free(json);
    if (rc) return rc;
    size_t n = ckpt_st_num_tensors(f);
    ckpt_tensor_meta_t *m = ckpt__calloc(n, sizeof(*m));
    if (!m) {
        ckpt_st_close(f);
        return ckpt__error(CKPT_ENOMEM, "%s: no memory for %zu tensors", label, n);
    }
    for (size_t i = 0; i < n; i++) m[i] = *ckpt_st_tensor(f, i);
    ckpt_st_close(f);
    *metas_out = m;
    *count_out = n;
    return CKPT_OK;
}

/* ---- answers ---- */

static void reply_on(int fd, int32_t status, uint32_t kind, uint64_t version, const char *text)
{
    ckpt__ipc_conn_t c;
    uint8_t *p = NULL;
    memset(&c, 0, sizeof(c));
    ckpt__ipc_conn_init(&c, fd, "publisher");
    size_t len = ckpt__pub_reply_size(text);
    if (ckpt__ipc_conn_tx_reserve(&c, len, &p) == CKPT_OK) {
        ckpt__pub_reply_encode(status, kind, version, text, p);
        /* Best effort: a publisher that left gets nothing, the engine goes on. */
        if (ckpt__ipc_conn_send(&c, CKPT_IPC_MSG_PUBLISH_REPLY, len, NULL, 0, REPLY_TIMEOUT_MS))
            ckpt_debug("publish: answering a publisher: %s", ckpt_last_error());
    }
    c.fd = -1; /* the caller owns the socket */
    ckpt__ipc_conn_destroy(&c);
}

static void part_release(ckpt__pub_part_t *p)
{
    if (p->fd >= 0) close(p->fd);
    if (p->reply_fd >= 0) close(p->reply_fd);
    ckpt__free(p->metas);
    p->fd = p->reply_fd = -1;
    p->metas = NULL;
    p->count = 0;
}

void ckpt__pub_part_finish(ckpt__pub_part_t *p, int status, uint64_t version, const char *text)
{
    if (p->reply_fd >= 0)
        reply_on(p->reply_fd, status, status < 0 ? CKPT__PUB_REFUSED : CKPT__PUB_REGISTERED,
                 version, text);
    part_release(p);
}

/* ---- memfds for pulled parts ---- */

static struct made *made_find(ckpt__pub_server_t *s, ino_t ino)
{
    for (size_t i = 0; i < s->nmade; i++)
        if (s->made[i].ino == ino) return &s->made[i];
    return NULL;
}

/* Listener thread: forgets the memfds no fd of this process refers to any more (the store
 * closed them at an unregister that did not recycle them, or at shutdown), so that its
 * mapping does not keep their pages alive. */
static void reap_made(ckpt__pub_server_t *s)
{
    /* A spare not refilled for a while goes: a name that is no longer published, or was
     * unregistered, does not keep a version's memory. */
    double now = ckpt__now_s();
    pthread_mutex_lock(&s->mu);
    for (int i = s->nspare; i-- > 0;)
        if (now - s->spare[i].since > CKPT__PUB_SPARE_KEEP_S) {
            close(s->spare[i].fd);
            s->spare[i] = s->spare[--s->nspare];
        }
    pthread_mutex_unlock(&s->mu);
    if (s->nmade == 0) return;
    int held[CKPT_ARRAY_SIZE(s->made)] = {0};
    DIR *d = opendir("/proc/self/fd");
    if (!d) return;
    struct dirent *de;
    while ((de = readdir(d)) != NULL) {
        struct stat st;
        if (de->d_name[0] == '.' || fstatat(dirfd(d), de->d_name, &st, 0) != 0) continue;
        for (size_t i = 0; i < s->nmade; i++)
            if (s->made[i].ino == st.st_ino) held[i] = 1;
    }
    closedir(d);
    pthread_mutex_lock(&s->mu);
    for (size_t i = s->nmade; i-- > 0;) {
        if (held[i]) continue;
        if (s->made[i].base) munmap(s->made[i].base, s->made[i].size);
        s->made[i] = s->made[--s->nmade];
    }
    pthread_mutex_unlock(&s->mu);
}

/* Maps a memfd read-write with every page mapped (MADV_POPULATE_WRITE: allocated in one
 * call for a new memfd; a full tmpfs is an error here, not a SIGBUS during the read). */
static uint8_t *map_pages(int fd, uint64_t size)
{
    if (size == 0) return NULL;
    void *p = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (p == MAP_FAILED) return NULL;
    if (madvise(p, size, MADV_POPULATE_WRITE) != 0 && errno != EINVAL) {
        munmap(p, size);
        return NULL;
    }
    return p;
}

/* Listener thread: a memfd of `size` bytes to pull into and its read-write mapping: a
 * spare one (its pages and, when the size is unchanged, its mapping are there already),
 * else a new one. Both stay the listener's: the caller neither closes nor unmaps. */
static int pull_memfd(ckpt__pub_server_t *s, uint64_t size, const char *label, int *fd_out,
                      uint8_t **base_out)
{
    reap_made(s);
    int fd = -1;
    pthread_mutex_lock(&s->mu);
    int pick = -1;
    for (int i = 0; i < s->nspare; i++)
        if (pick < 0 || s->spare[i].size == size) pick = i;
    if (pick >= 0) {
        fd = s->spare[pick].fd;
        s->spare[pick] = s->spare[--s->nspare];
    }
    int room = s->nmade < CKPT_ARRAY_SIZE(s->made);
    pthread_mutex_unlock(&s->mu);
    int fresh = fd < 0;
    if (fresh && !room)
        return ckpt__error(CKPT_EBUSY, "%s: %zu pulled memfds are in use on this rank; "
                           "unregister published checkpoints first", label, s->nmade);
    if (fresh) fd = memfd_create(CKPT__PULLED_MEMFD, MFD_CLOEXEC);
    struct stat st;
    if (fd < 0 || fstat(fd, &st) != 0) {
        int err = errno;
        if (fd >= 0) close(fd);
        return ckpt__error(CKPT_ENOMEM, "%s: memfd_create: %s", label, strerror(err));
    }
    struct made *m = made_find(s, st.st_ino);
    if (!m) {
        pthread_mutex_lock(&s->mu);
        m = &s->made[s->nmade++];
        *m = (struct made){st.st_ino, NULL, 0};
        pthread_mutex_unlock(&s->mu);
    }
    int reused = m->base && m->size == size;
    if (!reused) {
        if (m->base) munmap(m->base, m->size);
        m->base = NULL;
        m->size = 0;
        if ((uint64_t)st.st_size != size && ftruncate(fd, (off_t)size) != 0) {
            int err = errno;
            close(fd); /* reaped with its entry */
            return ckpt__error(CKPT_ENOMEM, "%s: sizing a %llu-byte memfd: %s", label,
                               (unsigned long long)size, strerror(err));
        }
        if (size > 0 && !(m->base = map_pages(fd, size))) {
            int err = errno;
            close(fd);
            return ckpt__error(CKPT_ENOMEM, "%s: mapping and allocating %llu bytes of shared "
                               "memory: %s", label, (unsigned long long)size, strerror(err));
        }
        m->size = size;
    }
    ckpt_debug("publish: %s: %s", label, reused ? "refilling a memfd through its mapping"
                                                : fresh ? "a new memfd" : "a reused memfd");
    *fd_out = fd;
    *base_out = m->base;
    return CKPT_OK;
}

void ckpt__pub_server_recycle(ckpt__pub_server_t *s, int fd)
{
    if (fd < 0) return;
    struct stat st;
    if (!s || fstat(fd, &st) != 0) {
        close(fd);
        return;
    }
    pthread_mutex_lock(&s->mu);
    int keep = made_find(s, st.st_ino) && s->nspare < CKPT__PUB_MAX_SPARE;
    if (keep) s->spare[s->nspare++] = (struct spare){fd, (uint64_t)st.st_size, ckpt__now_s()};
    pthread_mutex_unlock(&s->mu);
    if (!keep) close(fd);
}

/* ---- the table ---- */

static ssize_t find_part(ckpt__pub_server_t *s, const char *name, uint32_t part)
{
    for (size_t i = 0; i < s->count; i++)
        if (s->parts[i].req.part == part && strcmp(s->parts[i].req.name, name) == 0)
            return (ssize_t)i;
    return -1;
}

static int append(ckpt__pub_server_t *s, const ckpt__pub_part_t *p)
{
    if (s->count == s->cap) {
        size_t cap = s->cap ? 2 * s->cap : 16;
        ckpt__pub_part_t *grown = ckpt__realloc(s->parts, cap * sizeof(*grown));
        if (!grown) return ckpt__error(CKPT_ENOMEM, "publish: pending table");
        s->parts = grown;
        s->cap = cap;
    }
    s->parts[s->count++] = *p;
    return CKPT_OK;
}

static void superseded_text(char *buf, size_t cap, const ckpt__pub_part_t *by)
{
    snprintf(buf, cap, "superseded by a newer publication of part %u/%u of '%s' (step %llu) "
             "before every part was in", by->req.part, by->req.nparts, by->req.name,
             (unsigned long long)by->req.step);
}

void ckpt__pub_server_put_back(ckpt__pub_server_t *s, ckpt__pub_part_t *p)
{
    char why[CKPT_NAME_MAX + 128];
    ckpt__pub_part_t loser;
    int have_loser = 0;
    pthread_mutex_lock(&s->mu);
    ssize_t i = find_part(s, p->req.name, p->req.part);
    if (i >= 0 && s->parts[i].req.step >= p->req.step) {
        /* What is in the table arrived after p was taken: it is the newer publication. */
        superseded_text(why, sizeof(why), &s->parts[i]);
        loser = *p;
        have_loser = 1;
    } else if (i >= 0) {
        superseded_text(why, sizeof(why), p);
        loser = s->parts[i];
        s->parts[i] = *p;
        have_loser = 1;
    } else if (append(s, p) != CKPT_OK) {
        snprintf(why, sizeof(why), "%s", ckpt_last_error());
        loser = *p;
        have_loser = 1;
    }
    pthread_mutex_unlock(&s->mu);
    if (have_loser) ckpt__pub_part_finish(&loser, CKPT_ECANCELED, 0, why);
    p->fd = p->reply_fd = -1;
    p->metas = NULL;
}

size_t ckpt__pub_server_pending(ckpt__pub_server_t *s)
{
    pthread_mutex_lock(&s->mu);
    size_t n = s->count;
    pthread_mutex_unlock(&s->mu);
    return n;
}

int ckpt__pub_server_take(ckpt__pub_server_t *s, ckpt__pub_part_t **parts_out, size_t *count_out)
{
    pthread_mutex_lock(&s->mu);
    *parts_out = s->parts;
    *count_out = s->count;
    s->parts = NULL;
    s->count = s->cap = 0;
    pthread_mutex_unlock(&s->mu);
    return CKPT_OK;
}

const char *ckpt__pub_server_path(const ckpt__pub_server_t *s) { return s->path; }

/* ---- one connection ---- */

static void refuse(int fd, int status, const char *text)
{
    ckpt_warn("publish: refused: %s", text);
    reply_on(fd, status, CKPT__PUB_REFUSED, 0, text);
    /* Closing with the request unread would reset the connection, and the publisher could
     * see ECONNRESET instead of the answer: stop writing, then read (and drop, fds
     * included) what it sends until it closes, for a bounded while. */
    shutdown(fd, SHUT_WR);
    uint64_t deadline = ckpt__now_ns() + 500ull * 1000000ull;
    char sink[4096];
    for (;;) {
        ssize_t n = recv(fd, sink, sizeof(sink), MSG_DONTWAIT);
        if (n == 0 || (n < 0 && errno != EAGAIN && errno != EINTR)) break;
        if (n > 0) continue;
        uint64_t now = ckpt__now_ns();
        if (now >= deadline) break;
        struct pollfd pf = {fd, POLLIN, 0};
        poll(&pf, 1, (int)((deadline - now) / 1000000ull) + 1);
    }
    close(fd);
}

static void serve_one(ckpt__pub_server_t *s, int fd)
{
    struct ucred cred;
    socklen_t clen = sizeof(cred);
    char text[1024], label[CKPT_NAME_MAX + 160];
    if (getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cred, &clen) != 0) {
        ckpt_error_log("publish %s: SO_PEERCRED failed (%s); refusing", s->path, strerror(errno));
        close(fd);
        return;
    }
    /* Same rule as the worker socket: only the engine's own user may hand it memory. */
    if (cred.uid != geteuid() || (s->deny_uid >= 0 && (long)cred.uid == s->deny_uid)) {
        snprintf(text, sizeof(text), "%s: uid %u may not publish (the engine runs as uid %u; "
                 "publish as that user)", s->path, (unsigned)cred.uid, (unsigned)geteuid());
        refuse(fd, CKPT_EPERM, text);
        return;
    }
    ckpt__ipc_conn_t c;
    ckpt__ipc_hdr_t hdr;
    ckpt__pub_part_t part;
    memset(&c, 0, sizeof(c));
    memset(&part, 0, sizeof(part));
    part.fd = part.reply_fd = -1;
    snprintf(label, sizeof(label), "publisher pid %d on %s", (int)cred.pid, s->path);
    ckpt__ipc_conn_init(&c, fd, label);
    int rc = ckpt__ipc_conn_recv(&c, s->recv_timeout_ms, NULL, &hdr);
    if (rc == CKPT_OK && hdr.type != CKPT_IPC_MSG_PUBLISH)
        rc = ckpt__error(CKPT_EPROTO, "%s: sent %s; this socket takes PUBLISH only (workers "
                         "connect to DIR/rank-<r>.sock)", label, ckpt__ipc_msg_name(hdr.type));
    if (rc == CKPT_OK) rc = ckpt__pub_request_decode(c.rx_buf, hdr.length, &part.req);
    int pull = rc == CKPT_OK && (part.req.flags & CKPT__PUB_FLAG_PULL);
    if (rc == CKPT_OK && c.rx_nfds != (pull ? 0 : 1))
        rc = ckpt__error(CKPT_EPROTO, "%s: PUBLISH carries %d fds; %s expected", label,
                         c.rx_nfds, pull ? "none (pull)" : "exactly one (the memfd)");
    if (rc == CKPT_OK)
        snprintf(label, sizeof(label), "publish '%s' part %u/%u from pid %d", part.req.name,
                 part.req.part, part.req.nparts, (int)cred.pid);
    if (rc == CKPT_OK && pull && s->deny_pull)
        rc = ckpt__error(CKPT_EPERM, "%s: may not read the memory of pid %d (test hook "
                         "CKPT_TEST_PUBLISH_DENY_PULL): publish without pull", label,
                         (int)cred.pid);
    if (rc == CKPT_OK && pull && part.req.pid != (uint32_t)cred.pid)
        rc = ckpt__error(CKPT_EINVAL, "%s: the trainer calls itself pid %u, which is pid %d "
                         "here (another pid namespace): publish without pull", label,
                         part.req.pid, (int)cred.pid);
    if (rc == CKPT_OK && pull) {
        /* The copy happens now, before the answer: the trainer waits for it and may change
         * its tensors once it has the answer. */
        uint8_t *base = NULL;
        rc = pull_memfd(s, part.req.size, label, &part.fd, &base);
        if (rc == CKPT_OK)
            rc = ckpt__pub_pull(part.fd, base, (int)cred.pid, &part.req, label, &part.metas,
                                &part.count);
        if (rc < 0 && part.fd >= 0) {
            ckpt__pub_server_recycle(s, part.fd); /* pages kept for the next try */
            part.fd = -1;
        }
    } else if (rc == CKPT_OK) {
        part.fd = c.rx_fds[0];
        c.rx_nfds = 0; /* the fd is the part's now */
        rc = ckpt__pub_inspect_fd(part.fd, label, part.req.size, &part.metas, &part.count);
    }
    part.req.header = part.req.segs = NULL; /* pointed into the message */
    c.fd = -1; /* the socket stays ours below */
    ckpt__ipc_conn_destroy(&c);
    if (rc < 0) {
        snprintf(text, sizeof(text), "%s", ckpt_last_error());
        part_release(&part);
        refuse(fd, rc, text);
        return;
    }
    part.arrived_ns = ckpt__now_ns();
    part.pid = (int)cred.pid;
    if (part.req.flags & CKPT__PUB_FLAG_WAIT) part.reply_fd = fd;

    ckpt__pub_part_t loser;
    int have_loser = 0;
    char why[CKPT_NAME_MAX + 128];
    pthread_mutex_lock(&s->mu);
    ssize_t i = find_part(s, part.req.name, part.req.part);
    if (i >= 0 && s->parts[i].req.step > part.req.step) {
        rc = ckpt__error(CKPT_EINVAL, "%s: step %llu is older than the pending step %llu of "
                         "that part", label, (unsigned long long)part.req.step,
                         (unsigned long long)s->parts[i].req.step);
    } else if (i < 0 && s->count >= CKPT__PUB_MAX_PENDING) {
        rc = ckpt__error(CKPT_EBUSY, "%s: %d parts are pending on this rank already (are "
                         "their checkpoints' other parts ever published?)", label,
                         CKPT__PUB_MAX_PENDING);
    } else if (i < 0 && (rc = append(s, &part)) < 0) {
        /* out of memory: refused below */
    } else {
        if (i >= 0) {
            superseded_text(why, sizeof(why), &part);
            loser = s->parts[i];
            s->parts[i] = part;
            have_loser = 1;
        }
        snprintf(text, sizeof(text), "accepted: part %u/%u of '%s' (step %llu, %zu tensors, "
                 "%llu bytes) pending on %s until every part is in", part.req.part,
                 part.req.nparts, part.req.name, (unsigned long long)part.req.step, part.count,
                 (unsigned long long)part.req.size, s->path);
        /* Answered under the lock: otherwise rank 0 could take the part and send the final
         * answer before this one. The send is bounded and tiny. */
        reply_on(fd, 0, CKPT__PUB_ACCEPTED, 0, text);
    }
    pthread_mutex_unlock(&s->mu);
    if (rc < 0) {
        snprintf(text, sizeof(text), "%s", ckpt_last_error());
        part.reply_fd = -1;
        part_release(&part);
        refuse(fd, rc, text);
        return;
    }
    ckpt_info("publish: %s", text);
    if (!(part.req.flags & CKPT__PUB_FLAG_WAIT)) close(fd);
    if (have_loser) ckpt__pub_part_finish(&loser, CKPT_ECANCELED, 0, why);
}

static void *listener(void *arg)
{
    ckpt__pub_server_t *s = arg;
    for (;;) {
        struct pollfd pf[2] = {{s->listen_fd, POLLIN, 0}, {s->wake[0], POLLIN, 0}};
        /* The wake pipe ends the wait at close; the timeout only bounds it. */
        int n = poll(pf, 2, 1000);
        if (n < 0 && errno != EINTR) {
            ckpt_error_log("publish %s: poll: %s; the listener stops", s->path, strerror(errno));
            break;
        }
        if (pf[1].revents) break;
        if (n == 0) reap_made(s); /* idle: let go of what the store no longer holds */
        if (n > 0 && (pf[0].revents & POLLIN)) {
            int fd = accept4(s->listen_fd, NULL, NULL, SOCK_CLOEXEC | SOCK_NONBLOCK);
            if (fd >= 0) serve_one(s, fd);
        }
    }
    return NULL;
}

/* ---- lifecycle ---- */

int ckpt__pub_server_open(const char *path, int recv_timeout_ms, ckpt__pub_server_t **out)
{
    struct sockaddr_un addr = {.sun_family = AF_UNIX};
    struct stat st;
    int rc;
    if (!path || !out) return ckpt__error(CKPT_EINVAL, "publish server: NULL argument");
    if (ckpt__strlcpy(addr.sun_path, path, sizeof(addr.sun_path)) != CKPT_OK)
        return ckpt__error(CKPT_EINVAL, "publish socket path '%s' longer than %zu bytes", path,
                           sizeof(addr.sun_path) - 1);
    if (lstat(path, &st) == 0) {
        if (!S_ISSOCK(st.st_mode))
            return ckpt__error(CKPT_EEXIST, "publish socket '%s' exists and is not a socket", path);
        int probe = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
        int live = probe >= 0 && connect(probe, (struct sockaddr *)&addr, sizeof(addr)) == 0;
        if (probe >= 0) close(probe);
        if (live)
            return ckpt__error(CKPT_EEXIST, "publish socket '%s' is in use by another engine", path);
        unlink(path); /* left over from a dead engine */
    }
    ckpt__pub_server_t *s = ckpt__calloc(1, sizeof(*s));
    if (!s) return ckpt__error(CKPT_ENOMEM, "publish server '%s'", path);
    memcpy(s->path, addr.sun_path, sizeof(s->path));
    s->listen_fd = -1;
    s->wake[0] = s->wake[1] = -1;
    s->recv_timeout_ms = recv_timeout_ms > 0 ? recv_timeout_ms : 10000;
    const char *deny = getenv("CKPT_TEST_PUBLISH_DENY_UID");
    s->deny_uid = deny && *deny ? strtol(deny, NULL, 10) : -1;
    const char *deny_pull = getenv("CKPT_TEST_PUBLISH_DENY_PULL");
    s->deny_pull = deny_pull && strcmp(deny_pull, "1") == 0;
    pthread_mutex_init(&s->mu, NULL);
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
    if (fd < 0) {
        rc = ckpt__error(CKPT_EIO, "publish socket '%s': socket: %s", path, strerror(errno));
        goto fail;
    }
    /* The socket file takes the inode's mode at bind: 0600 from its first instant. */
    if (fchmod(fd, 0600) != 0 || bind(fd, (struct sockaddr *)&addr, sizeof(addr)) != 0) {
        rc = ckpt__error(errno == EACCES ? CKPT_EPERM : CKPT_EIO, "publish socket '%s': bind: %s",
                         path, strerror(errno));
        goto fail;
    }
    if (chmod(path, 0600) != 0 || listen(fd, 16) != 0) {
        rc = ckpt__error(CKPT_EIO, "publish socket '%s': listen: %s", path, strerror(errno));
        unlink(path);
        goto fail;
    }
    s->listen_fd = fd;
    fd = -1;
    if (pipe2(s->wake, O_CLOEXEC) != 0) {
        rc = ckpt__error(CKPT_EIO, "publish socket '%s': pipe: %s", path, strerror(errno));
        goto fail;
    }
    if ((errno = pthread_create(&s->thread, NULL, listener, s)) != 0) {
        rc = ckpt__error(CKPT_EIO, "publish socket '%s': thread: %s", path, strerror(errno));
        goto fail;
    }
    s->started = 1;
    ckpt_debug("publish: listening on %s", path);
    *out = s;
    return CKPT_OK;
fail:
    if (fd >= 0) close(fd);
    ckpt__pub_server_close(s);
    return rc;
}

void ckpt__pub_server_close(ckpt__pub_server_t *s)
{
    if (!s) return;
    if (s->started) {
        ssize_t w = write(s->wake[1], "x", 1);
        (void)w;
        pthread_join(s->thread, NULL);
    }
    for (size_t i = 0; i < s->count; i++)
        ckpt__pub_part_finish(&s->parts[i], CKPT_ECANCELED, 0,
                              "the engine rank stopped before every part was in");
    ckpt__free(s->parts);
    for (int i = 0; i < s->nspare; i++) close(s->spare[i].fd);
    for (size_t i = 0; i < s->nmade; i++)
        if (s->made[i].base) munmap(s->made[i].base, s->made[i].size);
    if (s->listen_fd >= 0) {
        close(s->listen_fd);
        unlink(s->path);
    }
    for (int i = 0; i < 2; i++)
        if (s->wake[i] >= 0) close(s->wake[i]);
    pthread_mutex_destroy(&s->mu);
    ckpt__free(s);
}
