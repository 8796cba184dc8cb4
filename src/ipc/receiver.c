/* Worker side of the engine <-> worker protocol (include/ckpt/receiver.h). The receiver
 * maps the engine's IPC buffers once per update and hands out views into them, so a bucket
 * costs one message read and no copy or allocation beyond what the worker does itself. */
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include "ckpt/receiver.h"
#include "device/cuda_rt.h"
#include "ipc/conn.h"

typedef enum {
    R_IDLE,   /* connected, between updates */
    R_UPDATE, /* READY sent, waiting for the next BUCKET / FINISH / ABORT */
    R_BUCKET, /* a bucket was handed out and is not answered yet */
    R_FINISH, /* FINISH handed out, waiting for finish_reply */
    R_DEAD,   /* engine gone or protocol broken: close and reconnect */
} rstate_t;

/* One mapped buffer. dev/ino/size identify the file: the engine keeps its IPC buffers and
 * pool regions between updates, so their mappings are reused instead of being populated
 * again at every BEGIN. */
typedef struct {
    const uint8_t *base; /* NULL = not mapped */
    size_t size;
    dev_t dev;
    ino_t ino;
    int refilled; /* a memfd the engine refills at the step after next (pulled publish) */
    uint32_t kind; /* CKPT_IPC_BUFFER_*: CUDA mappings are device pointers (IPC handles) */
    uint8_t handle[CKPT_IPC_HANDLE_BYTES]; /* CUDA: the handle it was opened from */
} mapping_t;

struct ckpt_receiver {
    ckpt__ipc_conn_t conn;
    rstate_t state;
    int reply_timeout_ms;  /* for our own small answers */
    ckpt_update_info_t info;
    int have_update;
    int completed;
    char reason[CKPT_IPC_MAX_TEXT + 64];
    uint32_t bucket;
    int nbuffers;
    mapping_t map[CKPT_IPC_MAX_BUFFERS]; /* buffer i of the current update */
    /* Mappings of refilled memfds that the last BEGIN did not send again: a published
     * name alternates between two sets of them, so they come back at the next version and
     * are reused instead of entering every page in the page table again (~0.1-0.2 s per
     * GiB). Dropped when the next BEGIN does not send them either. */
    mapping_t retired[CKPT_IPC_MAX_BUFFERS];
    ckpt_tensor_view_t *views; /* sized at BEGIN from max_tensors, grown rarely */
    size_t views_cap;
    /* The worker's model (set_model) with an open-addressing name index, and the last
     * BEGIN's manifest. */
    ckpt_tensor_meta_t *model;
    size_t nmodel;
    uint32_t *model_slots; /* model index + 1, 0 = empty; nslots is a power of two */
    size_t model_nslots;
    ckpt_tensor_meta_t *manifest;
    size_t nmanifest, manifest_cap;
    int decision_timeout_ms; /* finish_reply: wait for COMMIT / ABORT */
    /* What the worker's weights are (ckpt_receiver_state). */
    int wstate;
    uint64_t wversion;       /* CONSISTENT: held; UPDATING / INCOMPLETE: last consistent */
    uint64_t wupdate;        /* the update that set the state */
    int prev_wstate;         /* before the update in progress, restored if no bucket landed */
    uint64_t prev_wupdate;
    int touched;             /* a bucket of the update in progress was handed out */
};

static void unmap_one(mapping_t *mp)
{
    const ckpt__cudart_t *rt;
    if (mp->base && mp->kind == CKPT_IPC_BUFFER_CUDA) {
        if (ckpt__cudart(&rt) == CKPT_OK) rt->IpcCloseMemHandle((void *)mp->base);
    } else if (mp->base) {
        munmap((void *)mp->base, mp->size);
    }
    mp->base = NULL;
}

/* A simulated device buffer (engine/sink_sim.c): the handle names the rank's pid and fd. */
static int open_sim_handle(const uint8_t *handle, uint32_t i)
{
    uint32_t pid, fd;
    memcpy(&pid, handle, 4);
    memcpy(&fd, handle + 4, 4);
    char path[64];
    snprintf(path, sizeof(path), "/proc/%u/fd/%u", pid, fd);
    int f = open(path, O_RDONLY | O_CLOEXEC);
    if (f < 0) return ckpt__error(CKPT_EIO, "BEGIN: buffer %u: opening the simulated device "
                                  "buffer %s: %s", i, path, strerror(errno));
    return f;
}

/* A CUDA buffer: the engine rank's device memory, opened from its IPC handle. */
static int open_cuda_handle(mapping_t *mp, uint32_t i)
{
    const ckpt__cudart_t *rt;
    int rc = ckpt__cudart(&rt);
    if (rc < 0) return ckpt__error_prefix(rc, "BEGIN: buffer %u is device memory: ", i);
    /* The handle opens on this thread's current device: $CKPT_CUDA_DEVICE names it when
     * the worker's runtime is not the one that chose it (the Python binding sets it from
     * torch's current device). */
    const char *dev = getenv("CKPT_CUDA_DEVICE");
    if (dev && *dev) {
        int e = rt->SetDevice(atoi(dev));
        if (e != 0) return ckpt__cuda_fail(rt, e, "BEGIN: cudaSetDevice($CKPT_CUDA_DEVICE)");
    }
    ckpt__cuda_ipc_t h;
    memcpy(h.bytes, mp->handle, sizeof(h.bytes));
    void *p = NULL;
    int e = rt->IpcOpenMemHandle(&p, h, CKPT__CUDA_IPC_LAZY_PEER);
    if (e != 0) {
        char what[96];
        snprintf(what, sizeof(what), "BEGIN: buffer %u: cudaIpcOpenMemHandle", i);
        return ckpt__cuda_fail(rt, e, what);
    }
    mp->base = p;
    return CKPT_OK;
}

static void unmap_buffers(ckpt_receiver_t *r)
{
    for (int i = 0; i < CKPT_IPC_MAX_BUFFERS; i++) {
        unmap_one(&r->map[i]);
        unmap_one(&r->retired[i]);
    }
    r->nbuffers = 0;
}

/* The engine names the memfds it refills CKPT__PULLED_MEMFD. Only their mappings are worth
 * keeping a version longer: any other pool's memory would stay alive for nothing. */
static int is_refilled(int fd)
{
    char link[64], target[128];
    snprintf(link, sizeof(link), "/proc/self/fd/%d", fd);
    ssize_t n = readlink(link, target, sizeof(target) - 1);
    if (n <= 0) return 0;
    target[n] = '\0';
    static const char want[] = "/memfd:" CKPT__PULLED_MEMFD;
    return strncmp(target, want, sizeof(want) - 1) == 0;
}

/* The update in progress ends without completing. Weights are mixed only if a bucket was
 * handed out; otherwise the state returns to what it was before BEGIN. */
static void end_incomplete(ckpt_receiver_t *r, const char *fmt, const char *detail)
{
    if (r->state == R_UPDATE || r->state == R_BUCKET || r->state == R_FINISH) {
        snprintf(r->reason, sizeof(r->reason), fmt, detail);
        r->completed = 0;
        if (r->wstate == CKPT_RECV_STATE_UPDATING) {
            if (r->touched) {
                r->wstate = CKPT_RECV_STATE_INCOMPLETE;
                r->wupdate = r->info.update_id;
            } else {
                r->wstate = r->prev_wstate;
                r->wupdate = r->prev_wupdate;
            }
        }
        ckpt_warn("ipc: update %llu of '%s' incomplete: %s",
                  (unsigned long long)r->info.update_id, r->info.name, r->reason);
    }
    if (r->state == R_DEAD) unmap_buffers(r);
}

/* Classifies a transport failure: EPEER and protocol errors end the connection (and the
 * update in it); a timeout changes nothing. */
static int io_fail(ckpt_receiver_t *r, int rc)
{
    if (rc == CKPT_ETIMEDOUT) return rc;
    end_incomplete(r, "connection to the engine lost: %s", ckpt_last_error());
    r->state = R_DEAD;
    return rc;
}

int ckpt_receiver_connect(const char *socket_path, int timeout_ms, ckpt_receiver_t **out)
{
    struct sockaddr_un addr = {.sun_family = AF_UNIX};
    uint64_t deadline = ckpt__ipc_deadline(timeout_ms);
    ckpt_receiver_t *r;
    char peer[320];
    int fd = -1, err;
    if (socket_path == NULL || out == NULL)
        return ckpt__error(CKPT_EINVAL, "receiver connect: NULL argument");
    if (ckpt__strlcpy(addr.sun_path, socket_path, sizeof(addr.sun_path)) != CKPT_OK)
        return ckpt__error(CKPT_EINVAL, "receiver: socket path '%s' too long", socket_path);
    /* The engine may not be up yet, or be restarting (a stale socket file refuses): ENOENT /
     * ECONNREFUSED are retried until the deadline, or forever with timeout_ms < 0 (a worker
     * keeps serving its weights however long the engine is away). The retries back off to
     * 500 ms; a line is logged after a second of waiting and then once a minute. */
    uint64_t start = ckpt__now_ns(), next_log = start + 1000000000ull;
    long nap_ms = 20;
    for (;;) {
        fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
        if (fd < 0)
            return ckpt__error(CKPT_EIO, "receiver: socket: %s", strerror(errno));
        if (connect(fd, (struct sockaddr *)&addr, sizeof(addr)) == 0) break;
        err = errno;
        close(fd);
        if (err != ENOENT && err != ECONNREFUSED && err != EAGAIN && err != EINTR)
            return ckpt__error(err == EACCES ? CKPT_EPERM : CKPT_EIO,
                               "receiver: connect to engine at %s: %s", socket_path,
                               strerror(err));
        int left = ckpt__ipc_ms_left(deadline);
        if (left == 0)
            return ckpt__error(CKPT_ETIMEDOUT, "receiver: no engine at %s within %d ms (%s)",
                               socket_path, timeout_ms, strerror(err));
        uint64_t now = ckpt__now_ns();
        if (now >= next_log) {
            ckpt_warn("receiver: waiting for an engine at %s for %llu s (%s); %s", socket_path, (unsigned long long)((now - start) / 1000000000ull),
                      strerror(err), timeout_ms < 0 ? "retrying until one comes"
                                                    : "retrying until the timeout");
            next_log = now + 60ull * 1000000000ull;
        }
        long ms = left > 0 && left < nap_ms ? left : nap_ms;
        struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};
        nanosleep(&ts, NULL);
        if (nap_ms < 500) nap_ms *= 2;
    }
    if (fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK) != 0) {
        err = errno;
        close(fd);
        return ckpt__error(CKPT_EIO, "receiver: %s: O_NONBLOCK: %s", socket_path, strerror(err));
    }
    r = ckpt__calloc(1, sizeof(*r));
    if (r == NULL) {
        close(fd);
        return ckpt__error(CKPT_ENOMEM, "receiver for %s", socket_path);
    }
    snprintf(peer, sizeof(peer), "engine at %s", socket_path);
    ckpt__ipc_conn_init(&r->conn, fd, peer);
    r->state = R_IDLE;
    r->reply_timeout_ms = 10000;
    r->decision_timeout_ms = 120000;
    *out = r;
    return CKPT_OK;
}

void ckpt_receiver_close(ckpt_receiver_t *r)
{
    if (r == NULL) return;
    unmap_buffers(r);
    ckpt__ipc_conn_destroy(&r->conn);
    ckpt__free(r->views);
    ckpt__free(r->model);
    ckpt__free(r->model_slots);
    ckpt__free(r->manifest);
    ckpt__free(r);
}

int ckpt_receiver_fd(ckpt_receiver_t *r) { return r ? r->conn.fd : -1; }

static int send_reply(ckpt_receiver_t *r, uint32_t type, int32_t status, const char *text)
{
    int rc = ckpt__ipc_conn_send_text(&r->conn, type, status, text, r->reply_timeout_ms);
    return rc ? io_fail(r, rc == CKPT_ETIMEDOUT ? CKPT_EPEER : rc) : CKPT_OK;
}

/* REFUSE: the engine will close; report its reason as the status it chose. */
static int refused(ckpt_receiver_t *r)
{
    int32_t status;
    char text[CKPT_IPC_MAX_TEXT + 1];
    int rc = ckpt__ipc_text_decode(r->conn.rx_buf, r->conn.rx_hdr.length, &status, text,
                                   sizeof(text));
    r->state = R_DEAD;
    if (rc) return rc;
    if (status >= 0 || status < CKPT_ECANCELED) status = CKPT_EBUSY;
    return ckpt__error(status, "%s refused this worker: %s", r->conn.peer, text);
}

static int bad_message(ckpt_receiver_t *r, uint32_t type, const char *when)
{
    return io_fail(r, ckpt__error(CKPT_EPROTO, "%s: unexpected %s %s", r->conn.peer,
                                  ckpt__ipc_msg_name(type), when));
}

static int grow_views(ckpt_receiver_t *r, size_t n)
{
    if (n <= r->views_cap) return CKPT_OK;
    size_t cap = r->views_cap ? r->views_cap : 64;
    while (cap < n) cap *= 2;
    ckpt_tensor_view_t *v = ckpt__realloc(r->views, cap * sizeof(*v));
    if (v == NULL) return ckpt__error(CKPT_ENOMEM, "receiver: %zu tensor views", cap);
    r->views = v;
    r->views_cap = cap;
    return CKPT_OK;
}

/* Maps the fds of BEGIN read-only; they are closed either way (the mapping keeps the
 * memory). A file mapped for the last update keeps its mapping, at whatever index it comes
 * now; mappings of files no longer sent are dropped before new ones are made. */
static int map_buffers(ckpt_receiver_t *r, const ckpt__ipc_begin_msg_t *m)
{
    ckpt__ipc_conn_t *c = &r->conn;
    mapping_t next[CKPT_IPC_MAX_BUFFERS];
    uint32_t i, n = m->nbuffers;
    int rc = CKPT_OK;
    int fds[CKPT_IPC_MAX_BUFFERS], opened[CKPT_IPC_MAX_BUFFERS];
    int nhost = 0;
    memset(next, 0, sizeof(next));
    for (i = 0; i < n; i++) {
        fds[i] = -1;
        opened[i] = 0;
        next[i].kind = m->buffer_kinds[i];
        nhost += next[i].kind == CKPT_IPC_BUFFER_HOST;
    }
    if (c->rx_nfds != nhost) {
        rc = ckpt__error(CKPT_EPROTO, "BEGIN of update %llu: %d host buffers announced, %d fds "
                         "came", (unsigned long long)m->update_id, nhost, c->rx_nfds);
        goto out;
    }
    for (i = 0, nhost = 0; i < n; i++) {
        if (next[i].kind == CKPT_IPC_BUFFER_HOST) fds[i] = c->rx_fds[nhost++];
        if (next[i].kind == CKPT_IPC_BUFFER_SIM) {
            if ((fds[i] = open_sim_handle(m->buffer_handles[i], i)) < 0) {
                rc = fds[i];
                goto out;
            }
            opened[i] = 1;
        }
    }
    for (i = 0; i < n; i++) {
        struct stat st;
        if (next[i].kind == CKPT_IPC_BUFFER_CUDA) {
            /* The same handle again (the engine keeps its buffers): the same mapping. */
            next[i].size = (size_t)m->buffer_sizes[i];
            memcpy(next[i].handle, m->buffer_handles[i], CKPT_IPC_HANDLE_BYTES);
            for (int j = 0; j < CKPT_IPC_MAX_BUFFERS; j++) {
                mapping_t *old = &r->map[j];
                if (old->base && old->kind == CKPT_IPC_BUFFER_CUDA &&
                    memcmp(old->handle, next[i].handle, CKPT_IPC_HANDLE_BYTES) == 0) {
                    next[i].base = old->base;
                    old->base = NULL;
                    break;
                }
            }
            continue;
        }
        if (fstat(fds[i], &st) != 0) {
            rc = ckpt__error(CKPT_EIO, "BEGIN: buffer %u: fstat: %s", i, strerror(errno));
            goto out;
        }
        if ((uint64_t)st.st_size < m->buffer_sizes[i]) {
            rc = ckpt__error(CKPT_EPROTO, "BEGIN: buffer %u has %lld bytes, %llu announced", i,
                             (long long)st.st_size, (unsigned long long)m->buffer_sizes[i]);
            goto out;
        }
        next[i].size = (size_t)m->buffer_sizes[i];
        next[i].dev = st.st_dev;
        next[i].ino = st.st_ino;
        next[i].refilled = is_refilled(fds[i]);
        for (int j = 0; j < 2 * CKPT_IPC_MAX_BUFFERS; j++) {
            mapping_t *old = j < CKPT_IPC_MAX_BUFFERS ? &r->map[j]
                                                      : &r->retired[j - CKPT_IPC_MAX_BUFFERS];
            if (old->base && old->kind != CKPT_IPC_BUFFER_CUDA && old->dev == st.st_dev &&
                old->ino == st.st_ino &&
                old->size == next[i].size) {
                next[i].base = old->base; /* a file mapped before: already mapped */
                old->base = NULL;
                break;
            }
        }
    }
    /* What was not sent again. When everything mapped was sent again (the BEGIN after a
     * PREPARE of the same version), the kept mappings stay as they are. Otherwise the
     * refilled memfds of the version before are kept until the next change of set (a
     * published name alternates between two), everything else, and what was kept before
     * and not sent now, goes: a worker holds at most one version's memory beyond what
     * it is sent. */
    int left = 0;
    for (int j = 0; j < CKPT_IPC_MAX_BUFFERS; j++) left |= r->map[j].base != NULL;
    if (left) {
        mapping_t keep[CKPT_IPC_MAX_BUFFERS];
        int nkeep = 0;
        for (int j = 0; j < CKPT_IPC_MAX_BUFFERS; j++) {
            unmap_one(&r->retired[j]);
            if (r->map[j].base && r->map[j].refilled) {
                keep[nkeep++] = r->map[j];
                r->map[j].base = NULL;
            }
            unmap_one(&r->map[j]);
        }
        memcpy(r->retired, keep, (size_t)nkeep * sizeof(keep[0]));
    }
    r->nbuffers = 0;
    for (i = 0; i < n; i++) {
        if (next[i].base) continue;
        if (next[i].kind == CKPT_IPC_BUFFER_CUDA) {
            if ((rc = open_cuda_handle(&next[i], i)) < 0) goto out;
            continue;
        }
        /* MAP_POPULATE maps every page now, in one call, instead of one page fault per
         * 4 KiB during the first reload (which dominated reload time). */
        void *p = mmap(NULL, next[i].size, PROT_READ, MAP_SHARED | MAP_POPULATE, fds[i], 0);
        if (p == MAP_FAILED) {
            rc = ckpt__error(CKPT_EIO, "BEGIN: mapping buffer %u (%zu bytes): %s", i,
                             next[i].size, strerror(errno));
            goto out;
        }
        next[i].base = p;
    }
    memcpy(r->map, next, sizeof(next));
    r->nbuffers = (int)n;
out:
    ckpt__ipc_conn_drop_fds(c);
    for (i = 0; i < n; i++)
        if (opened[i]) close(fds[i]);
    if (rc) {
        for (i = 0; i < n; i++) unmap_one(&next[i]);
        unmap_buffers(r);
    }
    return rc;
}

/* ---- the worker's model and the update's manifest ---- */

static uint64_t name_hash(const char *s)
{
    uint64_t h = 1469598103934665603ull; /* FNV-1a: names are short, this is plenty */
    for (; *s; s++) h = (h ^ (uint8_t)*s) * 1099511628211ull;
    return h;
}

static long model_find(const ckpt_receiver_t *r, const char *name)
{
    if (r->model_nslots == 0) return -1;
    size_t mask = r->model_nslots - 1;
    for (size_t i = name_hash(name) & mask;; i = (i + 1) & mask) {
        uint32_t v = r->model_slots[i];
        if (v == 0) return -1;
        if (strcmp(r->model[v - 1].name, name) == 0) return (long)(v - 1);
    }
}

int ckpt_receiver_declare_need(ckpt_receiver_t *r, const ckpt_need_decl_t *needs, size_t count)
{
    if (r == NULL || (needs == NULL && count > 0))
        return ckpt__error(CKPT_EINVAL, "receiver declare_need: NULL argument");
    if (r->state == R_DEAD)
        return ckpt__error(CKPT_EPEER, "%s: connection lost; reconnect, then declare",
                           r->conn.peer);
    if (r->state != R_IDLE)
        return ckpt__error(CKPT_ESTATE, "%s: needs are declared between updates",
                           r->conn.peer);
    for (size_t i = 0; i < count; i++)
        if (needs[i].reserved != 0 || strnlen(needs[i].name, CKPT_NAME_MAX) == CKPT_NAME_MAX)
            return ckpt__error(CKPT_EINVAL, "declare_need: record %zu: name not terminated or "
                               "reserved field not 0", i);
    size_t len = ckpt__ipc_need_size(needs, count);
    if (count > UINT32_MAX || len > CKPT_IPC_MAX_PAYLOAD)
        return ckpt__error(CKPT_ETOOBIG, "declare_need: %zu records (%zu bytes) exceed the "
                           "%u-byte message limit", count, len, CKPT_IPC_MAX_PAYLOAD);
    uint8_t *p = NULL;
    int rc = ckpt__ipc_conn_tx_reserve(&r->conn, len, &p);
    if (rc) return rc;
    ckpt__ipc_need_encode(needs, count, p);
    /* The engine checks the same way; checking here names the mistake to its author. */
    ckpt_need_decl_t *copy = count ? malloc(count * sizeof(*copy)) : NULL;
    uint32_t n = 0;
    if (count && !copy) return ckpt__error(CKPT_ENOMEM, "declare_need: %zu records", count);
    rc = ckpt__ipc_need_decode(p, len, copy, &n);
    free(copy);
    if (rc) return ckpt__error(CKPT_EINVAL, "declare_need: %s", ckpt_last_error());
    rc = ckpt__ipc_conn_send(&r->conn, CKPT_IPC_MSG_NEED, len, NULL, 0, r->reply_timeout_ms);
    return rc ? io_fail(r, rc == CKPT_ETIMEDOUT ? CKPT_EPEER : rc) : CKPT_OK;
}

int ckpt_receiver_set_model(ckpt_receiver_t *r, const ckpt_tensor_meta_t *metas, size_t count)
{
    if (r == NULL || (metas == NULL && count > 0))
        return ckpt__error(CKPT_EINVAL, "receiver set_model: NULL argument");
    if (count > UINT32_MAX / 4)
        return ckpt__error(CKPT_ETOOBIG, "receiver set_model: %zu tensors", count);
    ckpt__free(r->model);
    ckpt__free(r->model_slots);
    r->model = NULL;
    r->model_slots = NULL;
    r->nmodel = r->model_nslots = 0;
    if (count == 0) return CKPT_OK;
    size_t nslots = 16;
    while (nslots < count * 2) nslots *= 2; /* load <= 1/2: short probes */
    r->model = ckpt__calloc(count, sizeof(*r->model));
    r->model_slots = ckpt__calloc(nslots, sizeof(*r->model_slots));
    if (r->model == NULL || r->model_slots == NULL) {
        ckpt__free(r->model);
        ckpt__free(r->model_slots);
        r->model = NULL;
        r->model_slots = NULL;
        return ckpt__error(CKPT_ENOMEM, "receiver set_model: %zu tensors", count);
    }
    r->model_nslots = nslots;
    for (size_t i = 0; i < count; i++) {
        ckpt_tensor_meta_t *m = &r->model[r->nmodel];
        *m = metas[i];
        m->name[CKPT_NAME_MAX - 1] = '\0';
        /* ndim -1 with an unknown dtype: a worker that knows its tensors by size only
         * (flat byte buffers, e.g. the Python binding's numpy params): nbytes is compared. */
        int bytes_only = m->ndim == -1 && m->dtype == CKPT_DTYPE_INVALID;
        if ((m->ndim < 0 && !bytes_only) || m->ndim > CKPT_MAX_DIMS) {
            int nd = m->ndim;
            ckpt_receiver_set_model(r, NULL, 0);
            return ckpt__error(CKPT_EINVAL, "receiver set_model: tensor '%s' has %d dims",
                               metas[i].name, nd);
        }
        if (m->dtype != CKPT_DTYPE_INVALID) {
            uint64_t numel = 0;
            if (ckpt_dtype_size(m->dtype) == 0 ||
                ckpt_shape_numel(m->shape, m->ndim, &numel) != CKPT_OK) {
                ckpt_receiver_set_model(r, NULL, 0);
                return ckpt__error(CKPT_EINVAL, "receiver set_model: tensor '%s': bad dtype %d "
                                   "or shape", metas[i].name, metas[i].dtype);
            }
            m->nbytes = numel * ckpt_dtype_size(m->dtype);
        }
        if (model_find(r, m->name) >= 0) continue; /* a duplicate name: keep the first */
        size_t mask = nslots - 1, j = name_hash(m->name) & mask;
        while (r->model_slots[j]) j = (j + 1) & mask;
        r->model_slots[j] = (uint32_t)(r->nmodel + 1);
        r->nmodel++;
    }
    return CKPT_OK;
}

int ckpt_receiver_manifest(ckpt_receiver_t *r, const ckpt_tensor_meta_t **metas_out,
                           size_t *count_out)
{
    if (r == NULL || metas_out == NULL || count_out == NULL)
        return ckpt__error(CKPT_EINVAL, "receiver manifest: NULL argument");
    *metas_out = r->manifest;
    *count_out = r->nmanifest;
    return CKPT_OK;
}

static void shape_text(const ckpt_tensor_meta_t *m, char *out, size_t cap)
{
    if (m->ndim < 0) { /* a size-only model tensor */
        snprintf(out, cap, "%llu bytes", (unsigned long long)m->nbytes);
        return;
    }
    size_t n = (size_t)snprintf(out, cap, "%s[", ckpt_dtype_name(m->dtype));
    for (int d = 0; d < m->ndim && n < cap; d++)
        n += (size_t)snprintf(out + n, cap - n, d ? ",%lld" : "%lld", (long long)m->shape[d]);
    if (n < cap) snprintf(out + n, cap - n, "]");
}

/* Appends "what 'name'" to a list of at most 4 names, counting the rest. */
static void note(char *list, size_t cap, size_t *count, const char *item)
{
    if ((*count)++ >= 4) return;
    size_t n = strlen(list);
    /* Cut to the list's size on purpose: the text names a few, the counts say the rest. */
    if (snprintf(list + n, cap - n, "%s%s", n ? ", " : "", item) < 0) list[n] = '\0';
}

/* Reads the manifest of BEGIN into r->manifest and, when the worker set its model, checks
 * it: every manifest tensor in the model with the same dtype (unless the model's is
 * unknown), shape and bytes; every model tensor in the manifest unless `partial`. */
static int take_manifest(ckpt_receiver_t *r, const ckpt__ipc_begin_msg_t *m, size_t len)
{
    ckpt__ipc_reader_t rd = {r->conn.rx_buf, len, m->manifest_pos};
    if (m->manifest_count > r->manifest_cap) {
        ckpt_tensor_meta_t *a = ckpt__realloc(r->manifest, m->manifest_count * sizeof(*a));
        if (a == NULL)
            return ckpt__error(CKPT_ENOMEM, "receiver: manifest of %u tensors",
                               m->manifest_count);
        r->manifest = a;
        r->manifest_cap = m->manifest_count;
    }
    r->nmanifest = 0;
    for (uint32_t i = 0; i < m->manifest_count; i++) {
        int rc = ckpt__ipc_manifest_decode(&rd, &r->manifest[i]);
        if (rc) return rc; /* validated by begin_decode: cannot happen */
        r->nmanifest++;
    }
    if (r->nmodel == 0) return CKPT_OK;
    int partial = (m->flags & CKPT_IPC_BEGIN_PARTIAL) != 0;
    char unknown[600] = "", mismatched[900] = "", missing[600] = "", item[700], a[160], b[160];
    size_t nunknown = 0, nmismatched = 0, nmissing = 0, nfound = 0;
    uint8_t *seen = ckpt__calloc(r->nmodel, 1);
    if (seen == NULL) return ckpt__error(CKPT_ENOMEM, "receiver: manifest check");
    for (size_t i = 0; i < r->nmanifest; i++) {
        const ckpt_tensor_meta_t *t = &r->manifest[i];
        long j = model_find(r, t->name);
        if (j < 0) {
            snprintf(item, sizeof(item), "'%s'", t->name);
            note(unknown, sizeof(unknown), &nunknown, item);
            continue;
        }
        const ckpt_tensor_meta_t *w = &r->model[j];
        if (!seen[j]) nfound++;
        seen[j] = 1;
        int same = w->nbytes == t->nbytes && (w->ndim < 0 || w->ndim == t->ndim) &&
                   (w->dtype == CKPT_DTYPE_INVALID || w->dtype == t->dtype);
        for (int d = 0; same && w->ndim >= 0 && d < t->ndim; d++) same = w->shape[d] == t->shape[d];
        if (!same) {
            shape_text(t, a, sizeof(a));
            shape_text(w, b, sizeof(b));
            if (snprintf(item, sizeof(item), "'%s' is %s, the model has %s", t->name, a, b) < 0)
                item[0] = '\0';
            note(mismatched, sizeof(mismatched), &nmismatched, item);
        }
    }
    for (size_t j = 0; !partial && j < r->nmodel; j++) {
        if (seen[j]) continue;
        snprintf(item, sizeof(item), "'%s'", r->model[j].name);
        note(missing, sizeof(missing), &nmissing, item);
    }
    ckpt__free(seen);
    if (nunknown + nmismatched + nmissing == 0) return CKPT_OK;
    char text[CKPT_IPC_MAX_TEXT];
    size_t n = (size_t)snprintf(text, sizeof(text),
                                "manifest of '%s' (%zu tensors%s) does not fit this worker's "
                                "model (%zu tensors):", m->name, r->nmanifest,
                                partial ? ", partial" : "", r->nmodel);
    if (nmissing && n < sizeof(text))
        n += (size_t)snprintf(text + n, sizeof(text) - n, " %zu missing from the update (%s%s);",
                              nmissing, missing, nmissing > 4 ? ", ..." : "");
    if (nmismatched && n < sizeof(text))
        n += (size_t)snprintf(text + n, sizeof(text) - n, " %zu mismatched (%s%s);",
                              nmismatched, mismatched, nmismatched > 4 ? ", ..." : "");
    if (nunknown && n < sizeof(text))
        n += (size_t)snprintf(text + n, sizeof(text) - n, " %zu not in the model (unknown tensor %s%s);",
                              nunknown, unknown, nunknown > 4 ? ", ..." : "");
    if (n < sizeof(text))
        snprintf(text + n, sizeof(text) - n, " %s",
                 nmissing && !nmismatched && !nunknown
                     ? "register the whole checkpoint, or update with partial=1 if a subset "
                       "is meant"
                     : "update with the checkpoint this model was built for");
    return ckpt__error(CKPT_EINVAL, "%s", text);
}

int ckpt_receiver_wait_update(ckpt_receiver_t *r, int timeout_ms, ckpt_update_info_t *info_out)
{
    ckpt__ipc_hdr_t hdr;
    ckpt__ipc_begin_msg_t m;
    int rc;
    if (r == NULL || info_out == NULL)
        return ckpt__error(CKPT_EINVAL, "receiver wait_update: NULL argument");
    if (r->state == R_DEAD)
        return ckpt__error(CKPT_EPEER, "%s: connection closed; reconnect", r->conn.peer);
    if (r->state != R_IDLE)
        return ckpt__error(CKPT_ESTATE, "%s: update %llu still in progress", r->conn.peer,
                           (unsigned long long)r->info.update_id);
    for (;;) {
        rc = ckpt__ipc_conn_recv(&r->conn, timeout_ms, NULL, &hdr);
        if (rc) return io_fail(r, rc);
        if (hdr.type == CKPT_IPC_MSG_REFUSE) return refused(r);
        if (hdr.type != CKPT_IPC_MSG_BEGIN) return bad_message(r, hdr.type, "between updates");
        rc = ckpt__ipc_begin_decode(r->conn.rx_buf, hdr.length, &m);
        if (rc) {
            ckpt__ipc_conn_drop_fds(&r->conn);
            return io_fail(r, ckpt__error_prefix(rc, "%s: ", r->conn.peer));
        }
        /* The manifest is checked before anything is mapped or answered: a refused update
         * never starts, the worker's weights and state stay as they are. */
        rc = (m.flags & CKPT_IPC_BEGIN_PREPARE) ? CKPT_OK : take_manifest(r, &m, hdr.length);
        if (rc) ckpt__ipc_conn_drop_fds(&r->conn);
        if (rc == CKPT_OK) rc = map_buffers(r, &m);
        if (rc == CKPT_OK) rc = grow_views(r, m.max_tensors);
        if (rc) { /* tell the engine why, then report it here too */
            int src = send_reply(r, CKPT_IPC_MSG_ERR, rc, ckpt_last_error());
            /* A PREPARE that failed only costs the mapping ahead: keep waiting for BEGIN. */
            if (src == 0 && (m.flags & CKPT_IPC_BEGIN_PREPARE)) {
                ckpt_warn("ipc: mapping ahead of the next update failed (it maps at BEGIN)");
                continue;
            }
            return src ? src : rc;
        }
        if (!(m.flags & CKPT_IPC_BEGIN_PREPARE)) break;
        /* Mapped ahead of an update (kept for it); keep waiting for the update itself. */
        if ((rc = send_reply(r, CKPT_IPC_MSG_READY, 0, NULL)) != 0) return rc;
        ckpt_debug("ipc: %d buffers mapped ahead of the next update", r->nbuffers);
    }
    memset(&r->info, 0, sizeof(r->info));
    r->info.update_id = m.update_id;
    r->info.version = m.version;
    memcpy(r->info.name, m.name, sizeof(m.name));
    r->info.nbuckets = m.nbuckets;
    r->info.verify = (m.flags & CKPT_IPC_BEGIN_VERIFY) != 0;
    r->info.stable = (m.flags & CKPT_IPC_BEGIN_STABLE) != 0;
    r->info.partial = (m.flags & CKPT_IPC_BEGIN_PARTIAL) != 0;
    r->info.manifest_count = m.manifest_count;
    r->have_update = 1;
    r->completed = 0;
    r->reason[0] = '\0';
    r->state = R_UPDATE;
    r->prev_wstate = r->wstate;
    r->prev_wupdate = r->wupdate;
    r->touched = 0;
    if (r->wstate != CKPT_RECV_STATE_INCOMPLETE)
        r->wversion = r->wstate == CKPT_RECV_STATE_CONSISTENT ? r->wversion : 0;
    r->wstate = CKPT_RECV_STATE_UPDATING;
    r->wupdate = m.update_id;
    rc = send_reply(r, CKPT_IPC_MSG_READY, 0, NULL);
    if (rc) return rc;
    ckpt_debug("ipc: update %llu of '%s' version %llu: %u buckets, %d buffers",
               (unsigned long long)m.update_id, m.name, (unsigned long long)m.version,
               m.nbuckets, r->nbuffers);
    *info_out = r->info;
    return CKPT_OK;
}

/* Decodes a BUCKET into r->views. A bad record is answered with ERR right here (the
 * engine aborts) and reported as CKPT_EPROTO; the stream itself stays in step. */
static int take_bucket(ckpt_receiver_t *r, size_t len)
{
    ckpt__ipc_bucket_hdr_t h;
    ckpt__ipc_reader_t rd;
    int rc = ckpt__ipc_bucket_decode_hdr(r->conn.rx_buf, len, &h, &rd);
    if (rc == CKPT_OK && (int)h.buffer >= r->nbuffers)
        rc = ckpt__error(CKPT_EPROTO, "BUCKET %u: buffer %u of %d", h.bucket, h.buffer,
                         r->nbuffers);
    if (rc == CKPT_OK) rc = grow_views(r, h.count);
    for (uint32_t i = 0; rc == CKPT_OK && i < h.count; i++) {
        ckpt_tensor_view_t *v = &r->views[i];
        ckpt__ipc_part_t part;
        rc = ckpt__ipc_tensor_decode(&rd, r->map[h.buffer].size, &v->meta, &part);
        if (rc == CKPT_OK) v->data = r->map[h.buffer].base + v->meta.offset;
        v->part_dim = part.dim;
        v->memory = (int32_t)r->map[h.buffer].kind; /* CKPT_MEMORY_* = the buffer's kind */
        v->part_start = part.start;
        v->part_full = part.full;
    }
    if (rc == CKPT_OK) rc = ckpt__ipc_reader_done(&rd, "BUCKET");
    if (rc) {
        char text[CKPT_IPC_MAX_TEXT];
        snprintf(text, sizeof(text), "%s", ckpt_last_error());
        int src = send_reply(r, CKPT_IPC_MSG_ERR, rc, text);
        return src ? src : ckpt__error(rc, "%s: %s", r->conn.peer, text);
    }
    r->bucket = h.bucket;
    r->state = R_BUCKET;
    return (int)h.count; /* >= 0 */
}

int ckpt_receiver_next(ckpt_receiver_t *r, int timeout_ms, int *event_out, uint32_t *bucket_out,
                       const ckpt_tensor_view_t **views_out, size_t *count_out)
{
    ckpt__ipc_hdr_t hdr;
    int rc;
    if (r == NULL || event_out == NULL || bucket_out == NULL || views_out == NULL ||
        count_out == NULL)
        return ckpt__error(CKPT_EINVAL, "receiver next: NULL argument");
    if (r->state == R_DEAD)
        return ckpt__error(CKPT_EPEER, "%s: connection closed; reconnect", r->conn.peer);
    if (r->state == R_BUCKET)
        return ckpt__error(CKPT_ESTATE, "bucket %u: ack or fail it first", r->bucket);
    if (r->state != R_UPDATE)
        return ckpt__error(CKPT_ESTATE, "%s: no update in progress", r->conn.peer);
    rc = ckpt__ipc_conn_recv(&r->conn, timeout_ms, NULL, &hdr);
    if (rc) return io_fail(r, rc);
    switch (hdr.type) {
    case CKPT_IPC_MSG_BUCKET:
        r->touched = 1; /* from here the model may hold bytes of this update */
        rc = take_bucket(r, hdr.length);
        if (rc < 0) return rc;
        *event_out = CKPT_RECV_BUCKET;
        *bucket_out = r->bucket;
        *views_out = r->views;
        *count_out = (size_t)rc;
        return CKPT_OK;
    case CKPT_IPC_MSG_FINISH:
        r->state = R_FINISH;
        *event_out = CKPT_RECV_FINISH;
        break;
    case CKPT_IPC_MSG_ABORT: {
        int32_t status;
        char text[CKPT_IPC_MAX_TEXT + 1];
        rc = ckpt__ipc_text_decode(r->conn.rx_buf, hdr.length, &status, text, sizeof(text));
        if (rc) return io_fail(r, rc);
        end_incomplete(r, "aborted by the engine: %s", text);
        r->state = R_IDLE;
        rc = send_reply(r, CKPT_IPC_MSG_OK, 0, NULL);
        if (rc) return rc;
        *event_out = CKPT_RECV_ABORT;
        break;
    }
    case CKPT_IPC_MSG_REFUSE:
        end_incomplete(r, "%s", "refused by the engine");
        return refused(r);
    default:
        return bad_message(r, hdr.type, "during an update");
    }
    *bucket_out = 0;
    *views_out = NULL;
    *count_out = 0;
    return CKPT_OK;
}

/* A device view's bytes on the host (malloc'ed; the caller frees), for hashing. */
static int device_bytes(const ckpt_tensor_view_t *view, uint8_t **out)
{
    *out = malloc(view->meta.nbytes ? (size_t)view->meta.nbytes : 1);
    if (!*out) return ckpt__error(CKPT_ENOMEM, "tensor '%s': %llu bytes to verify on the host",
                                  view->meta.name, (unsigned long long)view->meta.nbytes);
    int rc = ckpt__cuda_copy(*out, view->data, (size_t)view->meta.nbytes);
    if (rc < 0) {
        free(*out);
        return ckpt__error_prefix(rc, "tensor '%s': ", view->meta.name);
    }
    return CKPT_OK;
}

int ckpt_receiver_verify(const ckpt_tensor_view_t *view)
{
    if (view == NULL) return ckpt__error(CKPT_EINVAL, "receiver verify: NULL view");
    if (view->meta.checksum == 0) return CKPT_OK;
    uint64_t got;
    if (view->memory == CKPT_MEMORY_CUDA) {
        uint8_t *host;
        int rc = device_bytes(view, &host);
        if (rc < 0) return rc;
        got = ckpt_checksum(host, (size_t)view->meta.nbytes);
        free(host);
    } else {
        got = ckpt_checksum(view->data, (size_t)view->meta.nbytes);
    }
    if (got != view->meta.checksum)
        return ckpt__error(CKPT_ECHECKSUM,
                           "tensor '%s': checksum %016llx, expected %016llx (%llu bytes)",
                           view->meta.name, (unsigned long long)got,
                           (unsigned long long)view->meta.checksum,
                           (unsigned long long)view->meta.nbytes);
    return CKPT_OK;
}

static int answer_bucket(ckpt_receiver_t *r, uint32_t type, int status, const char *message)
{
    if (r == NULL) return ckpt__error(CKPT_EINVAL, "receiver: NULL handle");
    if (r->state != R_BUCKET)
        return ckpt__error(CKPT_ESTATE, "%s: no bucket to answer", r->conn.peer);
    r->state = R_UPDATE;
    return send_reply(r, type, status, message);
}

int64_t ckpt_receiver_copy_slice(const ckpt_tensor_view_t *view, int dim, uint64_t start,
                                 uint64_t length, void *dst)
{
    if (view == NULL || (dst == NULL && length > 0))
        return ckpt__error(CKPT_EINVAL, "receiver copy_slice: NULL argument");
    const ckpt_tensor_meta_t *m = &view->meta;
    if (dim < 0 || dim >= m->ndim)
        return ckpt__error(CKPT_EINVAL, "tensor '%s': slice of dimension %d of a %d-dimensional "
                           "tensor", m->name, dim, m->ndim);
    if (view->part_dim >= 0 && view->part_dim != dim)
        return ckpt__error(CKPT_EINVAL, "tensor '%s': the bucket holds a part along dimension "
                           "%d, the slice is along %d", m->name, view->part_dim, dim);
    uint64_t have = (uint64_t)m->shape[dim];
    uint64_t first = view->part_dim >= 0 ? view->part_start : 0;
    uint64_t full = view->part_dim >= 0 ? (uint64_t)view->part_full : have;
    if (start > full || length > full - start)
        return ckpt__error(CKPT_EINVAL, "tensor '%s': slice [%llu, +%llu) of dimension %d "
                           "outside its %llu indices", m->name, (unsigned long long)start,
                           (unsigned long long)length, dim, (unsigned long long)full);
    uint64_t lo = CKPT_MAX(start, first), hi = CKPT_MIN(start + length, first + have);
    if (lo >= hi) return 0;
    /* Row-major: `outer` blocks of `have` (source) or `length` (destination) indices of
     * `inner` bytes each. Along dim 0 there is one block: one copy. */
    uint64_t outer = 1, inner = ckpt_dtype_size(m->dtype);
    for (int d = 0; d < dim; d++) outer *= (uint64_t)m->shape[d];
    for (int d = dim + 1; d < m->ndim; d++) inner *= (uint64_t)m->shape[d];
    const uint8_t *src = (const uint8_t *)view->data + (lo - first) * inner;
    uint8_t *out = (uint8_t *)dst + (lo - start) * inner;
    size_t n = (size_t)((hi - lo) * inner);
    for (uint64_t o = 0; o < outer; o++) {
        if (view->memory != CKPT_MEMORY_CUDA) {
            ckpt__copy_bulk(out + o * length * inner, src + o * have * inner, n);
            continue;
        }
        int rc = ckpt__cuda_copy(out + o * length * inner, src + o * have * inner, n);
        if (rc < 0) return ckpt__error_prefix(rc, "tensor '%s': ", m->name);
    }
    return (int64_t)(hi - lo);
}

int ckpt_receiver_ack(ckpt_receiver_t *r) { return answer_bucket(r, CKPT_IPC_MSG_OK, 0, NULL); }

int ckpt_receiver_fail_status(ckpt_receiver_t *r, int status, const char *message)
{
    if (status >= 0) status = CKPT_EIO;
    return answer_bucket(r, CKPT_IPC_MSG_ERR, status, message ? message : "worker failed");
}

int ckpt_receiver_fail(ckpt_receiver_t *r, const char *message)
{
    return ckpt_receiver_fail_status(r, CKPT_EIO, message);
}

int ckpt_receiver_finish_reply(ckpt_receiver_t *r, int ok, const char *message)
{
    return ckpt_receiver_finish_reply_timeout(r, ok, message, r ? r->decision_timeout_ms : 0);
}

int ckpt_receiver_finish_reply_timeout(ckpt_receiver_t *r, int ok, const char *message,
                                       int timeout_ms)
{
    ckpt__ipc_hdr_t hdr;
    if (r == NULL) return ckpt__error(CKPT_EINVAL, "receiver: NULL handle");
    if (r->state != R_FINISH)
        return ckpt__error(CKPT_ESTATE, "%s: no FINISH to answer", r->conn.peer);
    int rc = send_reply(r, ok ? CKPT_IPC_MSG_OK : CKPT_IPC_MSG_ERR, ok ? 0 : CKPT_EIO,
                        message ? message : "post-hook failed");
    if (rc) return ckpt__error(CKPT_ECANCELED, "update %llu incomplete: %s",
                               (unsigned long long)r->info.update_id, r->reason);
    /* The update is complete only when every rank heard every worker's answer: wait for the
     * engine's decision (COMMIT or ABORT; neither is answered). */
    rc = ckpt__ipc_conn_recv(&r->conn, timeout_ms, NULL, &hdr);
    if (rc == CKPT_ETIMEDOUT) {
        /* A late decision would arrive between updates: the stream is no longer trusted. */
        rc = ckpt__error(CKPT_EPEER, "%s: no COMMIT or ABORT within %d ms after FINISH",
                         r->conn.peer, timeout_ms);
    }
    if (rc == CKPT_OK && hdr.type == CKPT_IPC_MSG_COMMIT && ok) {
        r->completed = 1;
        r->reason[0] = '\0';
        r->state = R_IDLE;
        r->wstate = CKPT_RECV_STATE_CONSISTENT;
        r->wversion = r->info.version;
        r->wupdate = r->info.update_id;
        return CKPT_OK;
    }
    if (rc == CKPT_OK && hdr.type == CKPT_IPC_MSG_ABORT) {
        int32_t status;
        char text[CKPT_IPC_MAX_TEXT + 1];
        rc = ckpt__ipc_text_decode(r->conn.rx_buf, hdr.length, &status, text, sizeof(text));
        if (rc == CKPT_OK) {
            if (ok) end_incomplete(r, "aborted by the engine after FINISH: %s", text);
            else end_incomplete(r, "post-hook failed: %s", message ? message : "");
            r->state = R_IDLE;
            return ckpt__error(CKPT_ECANCELED, "update %llu incomplete: %s",
                               (unsigned long long)r->info.update_id, r->reason);
        }
    } else if (rc == CKPT_OK) {
        rc = ckpt__error(CKPT_EPROTO, "%s: unexpected %s after the FINISH answer", r->conn.peer,
                         ckpt__ipc_msg_name(hdr.type));
    }
    io_fail(r, rc == CKPT_ETIMEDOUT ? CKPT_EPEER : rc);
    return ckpt__error(CKPT_ECANCELED, "update %llu incomplete: %s",
                       (unsigned long long)r->info.update_id, r->reason);
}

int ckpt_receiver_state(ckpt_receiver_t *r, int *state_out, uint64_t *version_out,
                        uint64_t *update_id_out)
{
    if (r == NULL) return ckpt__error(CKPT_EINVAL, "receiver state: NULL handle");
    if (state_out) *state_out = r->wstate;
    if (version_out) *version_out = r->wversion;
    if (update_id_out) *update_id_out = r->wupdate;
    return CKPT_OK;
}

int ckpt_receiver_last_update(ckpt_receiver_t *r, ckpt_update_info_t *info_out,
                              int *completed_out)
{
    if (r == NULL || info_out == NULL || completed_out == NULL)
        return ckpt__error(CKPT_EINVAL, "receiver last_update: NULL argument");
    if (!r->have_update) return ckpt__error(CKPT_ENOENT, "%s: no update yet", r->conn.peer);
    *info_out = r->info;
    *completed_out = r->completed;
    return CKPT_OK;
}

const char *ckpt_receiver_reason(ckpt_receiver_t *r) { return r ? r->reason : ""; }

/* Verified copy. The source chunk is hashed first, which brings it into cache, and is then
 * copied from cache to dst with non-temporal stores: dst is written once and not read back
 * here, so its lines need not pass through (and evict) the cache. This beats memcpy and
 * then hashing dst (~6 vs ~4.7 GB/s measured); the chunk must stay small enough to still
 * be in L2 when it is copied. */
#define CKPT__COPY_CHUNK (128u * 1024u)


int ckpt_receiver_copy(const ckpt_tensor_view_t *view, uint64_t offset, void *dst,
                       uint64_t len, int verify)
{
    if (view == NULL || (dst == NULL && len > 0))
        return ckpt__error(CKPT_EINVAL, "receiver copy: NULL argument");
    const ckpt_tensor_meta_t *m = &view->meta;
    if (offset > m->nbytes || len > m->nbytes - offset)
        return ckpt__error(CKPT_EINVAL, "tensor '%s': copy of [%llu, +%llu) outside its %llu "
                           "bytes", m->name, (unsigned long long)offset,
                           (unsigned long long)len, (unsigned long long)m->nbytes);
    const uint8_t *src = view->data;
    if (view->memory == CKPT_MEMORY_CUDA) {
        /* Device memory: one copy by the runtime (to the host or another device); verify
         * hashes the whole tensor brought to the host first. */
        if (verify && m->checksum != 0) {
            int vrc = ckpt_receiver_verify(view);
            if (vrc < 0) return vrc;
        }
        int crc = ckpt__cuda_copy(dst, src + offset, (size_t)len);
        return crc < 0 ? ckpt__error_prefix(crc, "tensor '%s': ", m->name) : CKPT_OK;
    }
    if (!verify || m->checksum == 0) {
        /* Nothing to hash: streamed past the cache when large (core/copy.c). */
        ckpt__copy_bulk(dst, src + offset, (size_t)len);
        return CKPT_OK;
    }
    XXH3_state_t state; /* on the stack: no allocation per tensor */
    ckpt__checksum_reset(&state);
    if (offset > 0) ckpt__checksum_update(&state, src, (size_t)offset);
    for (uint64_t done = 0; done < len; done += CKPT__COPY_CHUNK) {
        size_t n = (size_t)CKPT_MIN((uint64_t)CKPT__COPY_CHUNK, len - done);
        const uint8_t *s = src + offset + done;
        ckpt__checksum_update(&state, s, n);
        ckpt__copy_stream((uint8_t *)dst + done, s, n);
    }
    ckpt__copy_fence();
    uint64_t end = offset + len;
    if (end < m->nbytes) ckpt__checksum_update(&state, src + end, (size_t)(m->nbytes - end));
    uint64_t got = ckpt__checksum_digest(&state);
    if (got != m->checksum)
        return ckpt__error(CKPT_ECHECKSUM,
                           "tensor '%s': checksum %016llx, expected %016llx (%llu bytes)",
                           m->name, (unsigned long long)got, (unsigned long long)m->checksum,
                           (unsigned long long)m->nbytes);
    return CKPT_OK;
}
