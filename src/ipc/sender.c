/* Engine side of the worker protocol: a listening Unix socket that serves one worker at a
 * time, and the per-update message sequence (see sender.h and docs/PROTOCOL.md). */
#include <errno.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include "ipc/conn.h"
#include "ipc/sender.h"

/* Largest encoded tensor record: name length field + name + fixed part + every dim. */
#define MAX_RECORD (2 + (CKPT_NAME_MAX - 1) + 44 + 8 + 8 * CKPT_MAX_DIMS)

typedef enum {
    ST_NONE,   /* no worker connected */
    ST_IDLE,   /* connected, no update in progress */
    ST_UPDATE, /* READY received, no bucket outstanding */
    ST_BUCKET, /* a BUCKET was sent and its answer is outstanding */
    ST_DECIDE, /* FINISH answered; COMMIT or ABORT is due (no answer follows it) */
} state_t;

struct ckpt_ipc_server {
    char path[sizeof(((struct sockaddr_un *)0)->sun_path)];
    int listen_fd;
    state_t state;
    ckpt__ipc_conn_t conn;
    int worker_pid;
    uint32_t bucket;   /* the outstanding (or last) bucket */
    int ack_late;      /* wait_ack already timed out on the outstanding bucket */
    uint64_t update_id;
    int nbuffers;
    int send_timeout_ms;
    /* PREPAREs sent whose READY/ERR has not been read yet: registration never waits for a
     * worker (a silent one would hold its rank past the other ranks' patience), so the
     * answers are read later, before the next BEGIN or whenever the connection is probed. */
    int prepares;
    uint64_t prepare_sent_ns; /* when the last of them was sent */
    /* The worker's declared need (NEED, version 4): need_declared = 0 until it sends one
     * (it needs everything); cleared when the connection goes. */
    int need_declared;
    ckpt_need_decl_t *need;
    uint32_t nneed;
};

/* More unanswered PREPAREs than this: the worker is not reading; skip further ones. */
#define MAX_PREPARES 4
/* How long sending a PREPARE may block (see begin_common). */
#define PREPARE_SEND_MS 100

/* ---- connection management ---- */

/* Closes the worker connection (the worker sees EOF and marks its update incomplete). */
static void drop_worker(ckpt_ipc_server_t *srv, const char *reason)
{
    if (srv == NULL || srv->state == ST_NONE) return;
    ckpt_info("ipc: dropping %s: %s", srv->conn.peer, reason ? reason : "requested");
    ckpt__ipc_conn_reset(&srv->conn);
    srv->state = ST_NONE;
    srv->worker_pid = -1;
    srv->prepares = 0;
    free(srv->need);
    srv->need = NULL;
    srv->nneed = 0;
    srv->need_declared = 0;
}

/* Drops the worker after a failure that left the stream unusable, keeping the error text. */
static int fail_drop(ckpt_ipc_server_t *srv, int rc)
{
    drop_worker(srv, ckpt_last_error());
    return rc;
}

/* Refuses a connection: tells the peer why (best effort, it may not be reading) and
 * closes it. The engine log gets the same text. */
static void refuse(int fd, int status, const char *why)
{
    ckpt__ipc_conn_t c = {.fd = fd, .rx_nfds = 0};
    ckpt__strlcpy(c.peer, "refused connection", sizeof(c.peer));
    ckpt__ipc_conn_send_text(&c, CKPT_IPC_MSG_REFUSE, status, why, 100);
    ckpt__ipc_conn_destroy(&c);
}

/* Accepts one pending connection. Returns 1 when it became the worker, 0 when there was
 * none or it was refused. */
static int accept_one(ckpt_ipc_server_t *srv)
{
    int fd = accept4(srv->listen_fd, NULL, NULL, SOCK_CLOEXEC | SOCK_NONBLOCK);
    if (fd < 0) return 0;
    struct ucred cred;
    socklen_t len = sizeof(cred);
    char why[256];
    if (getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cred, &len) != 0) {
        ckpt_error_log("ipc %s: SO_PEERCRED failed (%s); refusing connection", srv->path,
                       strerror(errno));
        close(fd);
        return 0;
    }
    if (cred.uid != geteuid()) {
        snprintf(why, sizeof(why), "%s: uid %u may not connect (engine runs as uid %u)",
                 srv->path, (unsigned)cred.uid, (unsigned)geteuid());
        ckpt_error_log("ipc: refusing pid %d: %s", (int)cred.pid, why);
        refuse(fd, CKPT_EPERM, why);
        return 0;
    }
    if (srv->state != ST_NONE) {
        snprintf(why, sizeof(why), "%s already serves worker pid %d; one worker per socket",
                 srv->path, srv->worker_pid);
        ckpt_warn("ipc: refusing pid %d: %s", (int)cred.pid, why);
        refuse(fd, CKPT_EBUSY, why);
        return 0;
    }
    char peer[320];
    snprintf(peer, sizeof(peer), "worker pid %d on %s", (int)cred.pid, srv->path);
    ckpt__ipc_conn_init(&srv->conn, fd, peer);
    srv->state = ST_IDLE;
    srv->worker_pid = (int)cred.pid;
    srv->prepares = 0;
    ckpt_info("ipc: %s connected", peer);
    return 1;
}

/* Watch callback while waiting on the worker: refuse whoever else is knocking. */
static void refuse_pending(void *arg)
{
    ckpt_ipc_server_t *srv = arg;
    /* One poll when nobody knocks (this runs before every reply); bounded so a listen
     * socket that stays readable while accept fails cannot hold us here. */
    struct pollfd pf = {srv->listen_fd, POLLIN, 0};
    for (int i = 0; i < 16 && srv->state != ST_NONE && poll(&pf, 1, 0) > 0; i++) accept_one(srv);
}

/* Takes a NEED the worker sent (not answered): decoded and kept for the next update. A
 * malformed one is a protocol error (the caller drops the worker). */
static int take_need(ckpt_ipc_server_t *srv)
{
    uint32_t n = 0;
    const uint8_t *p = srv->conn.rx_buf;
    uint32_t len = srv->conn.rx_hdr.length;
    int rc = ckpt__ipc_need_decode(p, len, NULL, &n);
    ckpt_need_decl_t *need = NULL;
    if (rc == CKPT_OK && n > 0 && !(need = malloc(n * sizeof(*need))))
        rc = ckpt__error(CKPT_ENOMEM, "%s: NEED of %u tensors", srv->conn.peer, n);
    if (rc == CKPT_OK) rc = ckpt__ipc_need_decode(p, len, need, &n);
    if (rc) {
        free(need);
        return ckpt__error_prefix(rc, "%s: ", srv->conn.peer);
    }
    free(srv->need);
    srv->need = need;
    srv->nneed = n;
    srv->need_declared = 1;
    ckpt_info("ipc: %s declared its need: %u tensors", srv->conn.peer, n);
    return CKPT_OK;
}

static int recv_reply(ckpt_ipc_server_t *srv, int timeout_ms, ckpt__ipc_hdr_t *hdr)
{
    uint64_t deadline = ckpt__ipc_deadline(timeout_ms);
    for (;;) {
        /* Also before receiving: when every reply is already queued the wait below never
         * blocks, and a second worker knocking would not be told until one did (seen as a
         * flaky test_second_worker_refused under load). */
        refuse_pending(srv);
        ckpt__ipc_watch_t watch = {srv->listen_fd, refuse_pending, srv};
        int rc = ckpt__ipc_conn_recv(&srv->conn, timeout_ms < 0 ? -1 : ckpt__ipc_ms_left(deadline),
                                     &watch, hdr);
        /* A NEED is no answer: it may cross a BEGIN or a PREPARE on the way. */
        if (rc || hdr->type != CKPT_IPC_MSG_NEED) return rc;
        if ((rc = take_need(srv)) != CKPT_OK) return rc;
    }
}

/* Turns an ERR payload into the worker's status with its text as the detail. */
static int worker_error(ckpt_ipc_server_t *srv, const char *what)
{
    int32_t status;
    char text[CKPT_IPC_MAX_TEXT + 1];
    int rc = ckpt__ipc_text_decode(srv->conn.rx_buf, srv->conn.rx_hdr.length, &status, text,
                                   sizeof(text));
    if (rc) return fail_drop(srv, ckpt__error_prefix(rc, "%s: ", srv->conn.peer));
    /* Only statuses from our own list cross the boundary; anything else reads as EIO. */
    if (status >= 0 || status < CKPT_ECANCELED) status = CKPT_EIO;
    return ckpt__error(status, "%s: %s: %s", srv->conn.peer, what, text);
}

static int unexpected(ckpt_ipc_server_t *srv, const ckpt__ipc_hdr_t *hdr, const char *what)
{
    return fail_drop(srv, ckpt__error(CKPT_EPROTO, "%s: got %s in answer to %s",
                                      srv->conn.peer, ckpt__ipc_msg_name(hdr->type), what));
}

/* Reads the answers of the PREPAREs sent earlier, waiting until `deadline` (0 = forever;
 * ckpt__ipc_deadline(0) = only what has already arrived). An ERR only cost the worker its
 * mapping ahead of time (it maps at BEGIN instead). With `last_chance` (before a BEGIN), one
 * still unanswered at the deadline is CKPT_ETIMEDOUT and the worker is dropped: its late
 * READY would otherwise be taken for the BEGIN's. Without, it stays pending. */
static int drain_prepares(ckpt_ipc_server_t *srv, uint64_t deadline, int last_chance)
{
    while (srv->prepares > 0 && srv->state == ST_IDLE) {
        ckpt__ipc_hdr_t hdr;
        int rc = recv_reply(srv, ckpt__ipc_ms_left(deadline), &hdr);
        if (rc == CKPT_ETIMEDOUT && !last_chance) return rc;
        if (rc == CKPT_ETIMEDOUT)
            return fail_drop(srv, ckpt__error(
                CKPT_ETIMEDOUT, "%s: no answer to the PREPARE sent %.1f s ago: the worker does "
                "not read its socket (it is dropped; restart it or fix its event loop)",
                srv->conn.peer, (double)(ckpt__now_ns() - srv->prepare_sent_ns) / 1e9));
        if (rc) return fail_drop(srv, ckpt__error_prefix(rc, "PREPARE: "));
        srv->prepares--;
        if (hdr.type == CKPT_IPC_MSG_ERR) {
            worker_error(srv, "PREPARE (it maps the buffers at BEGIN instead)");
            ckpt_warn("ipc: %s", ckpt_last_error());
            ckpt__error_clear();
        } else if (hdr.type != CKPT_IPC_MSG_READY) {
            return unexpected(srv, &hdr, "PREPARE");
        }
    }
    return srv->state == ST_NONE ? ckpt__error(CKPT_EPEER, "ipc %s: worker dropped", srv->path)
                                 : CKPT_OK;
}

/* ---- lifecycle ---- */

int ckpt_ipc_server_open(const char *socket_path, ckpt_ipc_server_t **out)
{
    struct sockaddr_un addr = {.sun_family = AF_UNIX};
    struct stat st;
    ckpt_ipc_server_t *srv = NULL;
    int fd = -1, rc;
    if (socket_path == NULL || out == NULL)
        return ckpt__error(CKPT_EINVAL, "ipc server: NULL argument");
    if (ckpt__strlcpy(addr.sun_path, socket_path, sizeof(addr.sun_path)) != CKPT_OK)
        return ckpt__error(CKPT_EINVAL, "ipc server: socket path '%s' longer than %zu bytes",
                           socket_path, sizeof(addr.sun_path) - 1);
    if (lstat(socket_path, &st) == 0) {
        if (!S_ISSOCK(st.st_mode))
            return ckpt__error(CKPT_EEXIST, "ipc server: '%s' exists and is not a socket",
                               socket_path);
        /* A socket file: in use if something answers, else left over from a dead engine. */
        int probe = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
        int live = probe >= 0 && connect(probe, (struct sockaddr *)&addr, sizeof(addr)) == 0;
        if (probe >= 0) close(probe);
        if (live)
            return ckpt__error(CKPT_EEXIST, "ipc server: '%s' is in use by another engine",
                               socket_path);
        unlink(socket_path);
    }
    srv = ckpt__calloc(1, sizeof(*srv));
    if (srv == NULL) return ckpt__error(CKPT_ENOMEM, "ipc server '%s'", socket_path);
    srv->listen_fd = -1;
    srv->conn.fd = -1;
    srv->state = ST_NONE;
    srv->worker_pid = -1;
    srv->send_timeout_ms = 10000;
    memcpy(srv->path, addr.sun_path, sizeof(srv->path));
    fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
    if (fd < 0) {
        rc = ckpt__error(CKPT_EIO, "ipc server '%s': socket: %s", socket_path, strerror(errno));
        goto fail;
    }
    /* On Linux the socket file takes the socket inode's mode at bind (minus umask), so the
     * file is 0600 from its first instant: no window where another user could connect. */
    if (fchmod(fd, 0600) != 0 || bind(fd, (struct sockaddr *)&addr, sizeof(addr)) != 0) {
        rc = ckpt__error(errno == EACCES ? CKPT_EPERM : CKPT_EIO, "ipc server '%s': bind: %s",
                         socket_path, strerror(errno));
        goto fail;
    }
    if (chmod(socket_path, 0600) != 0 || listen(fd, 8) != 0) {
        rc = ckpt__error(CKPT_EIO, "ipc server '%s': listen: %s", socket_path, strerror(errno));
        unlink(socket_path);
        goto fail;
    }
    srv->listen_fd = fd;
    ckpt_debug("ipc: listening on %s", socket_path);
    *out = srv;
    return CKPT_OK;
fail:
    if (fd >= 0) close(fd);
    ckpt__free(srv);
    return rc;
}

void ckpt_ipc_server_close(ckpt_ipc_server_t *srv)
{
    if (srv == NULL) return;
    free(srv->need);
    ckpt__ipc_conn_destroy(&srv->conn);
    if (srv->listen_fd >= 0) {
        close(srv->listen_fd);
        unlink(srv->path);
    }
    ckpt__free(srv);
}

int ckpt_ipc_server_has_worker(ckpt_ipc_server_t *srv)
{
    return srv != NULL && srv->state != ST_NONE;
}

int ckpt_ipc_server_worker_pid(ckpt_ipc_server_t *srv)
{
    return srv && srv->state != ST_NONE ? srv->worker_pid : -1;
}

void ckpt_ipc_server_set_send_timeout(ckpt_ipc_server_t *srv, int timeout_ms)
{
    srv->send_timeout_ms = timeout_ms;
}

/* An idle connection must have nothing to say: readable means EOF (worker exited) or
 * unsolicited bytes (protocol violation); either way it is dropped. */
static void probe_idle(ckpt_ipc_server_t *srv)
{
    /* Answers to PREPAREs are expected, not unsolicited: read what has arrived of them. */
    if (srv->prepares > 0) {
        drain_prepares(srv, ckpt__ipc_deadline(0), 0);
        ckpt__error_clear();
        if (srv->state != ST_IDLE || srv->prepares > 0) return;
    }
    for (;;) {
        struct pollfd pf = {srv->conn.fd, POLLIN, 0};
        if (poll(&pf, 1, 0) <= 0) return;
        char b;
        ssize_t n = recv(srv->conn.fd, &b, 1, MSG_PEEK | MSG_DONTWAIT);
        if (n < 0 && (errno == EAGAIN || errno == EINTR)) return;
        if (n <= 0) {
            drop_worker(srv, "disconnected");
            return;
        }
        /* The only message an idle worker may send is NEED; it is short and whole once
         * its first byte is here, so a brief bound suffices. */
        ckpt__ipc_hdr_t hdr;
        int rc = ckpt__ipc_conn_recv(&srv->conn, 1000, NULL, &hdr);
        if (rc == CKPT_OK && hdr.type == CKPT_IPC_MSG_NEED) rc = take_need(srv);
        else if (rc == CKPT_OK) rc = ckpt__error(CKPT_EPROTO, "%s: sent %s while idle",
                                                 srv->conn.peer, ckpt__ipc_msg_name(hdr.type));
        if (rc) {
            ckpt_warn("ipc: %s", ckpt_last_error());
            fail_drop(srv, rc);
            ckpt__error_clear();
            return;
        }
    }
}

void ckpt_ipc_server_poll(ckpt_ipc_server_t *srv)
{
    if (srv == NULL) return;
    if (srv->state == ST_NONE) {
        struct pollfd pf = {srv->listen_fd, POLLIN, 0};
        if (poll(&pf, 1, 0) > 0) accept_one(srv);
    }
    if (srv->state == ST_IDLE) probe_idle(srv);
}

int ckpt_ipc_server_need(ckpt_ipc_server_t *srv, const ckpt_need_decl_t **need_out,
                         uint32_t *count_out)
{
    *need_out = NULL;
    *count_out = 0;
    if (srv == NULL || srv->state == ST_NONE || !srv->need_declared) return 0;
    *need_out = srv->need;
    *count_out = srv->nneed;
    return 1;
}

int ckpt_ipc_server_wait_worker(ckpt_ipc_server_t *srv, int timeout_ms)
{
    if (srv == NULL) return ckpt__error(CKPT_EINVAL, "ipc: NULL server");
    if (srv->state != ST_NONE && srv->state != ST_IDLE)
        drop_worker(srv, "left in the middle of an update");
    if (srv->state == ST_IDLE) probe_idle(srv);
    uint64_t deadline = ckpt__ipc_deadline(timeout_ms);
    while (srv->state == ST_NONE) {
        struct pollfd pf = {srv->listen_fd, POLLIN, 0};
        int n = poll(&pf, 1, ckpt__ipc_ms_left(deadline));
        if (n < 0 && errno != EINTR)
            return ckpt__error(CKPT_EIO, "ipc %s: poll: %s", srv->path, strerror(errno));
        if (n == 0)
            return ckpt__error(CKPT_ETIMEDOUT, "ipc %s: no worker connected within %d ms",
                               srv->path, timeout_ms);
        if (n > 0) accept_one(srv);
    }
    return CKPT_OK;
}

/* ---- one update ---- */

static int begin_common(ckpt_ipc_server_t *srv, const ckpt_ipc_begin_t *begin, int prepare,
                        int timeout_ms);

int ckpt_ipc_begin(ckpt_ipc_server_t *srv, const ckpt_ipc_begin_t *begin, int timeout_ms)
{
    return begin_common(srv, begin, 0, timeout_ms);
}

int ckpt_ipc_prepare(ckpt_ipc_server_t *srv, const ckpt_ipc_begin_t *begin, int timeout_ms)
{
    return begin_common(srv, begin, 1, timeout_ms);
}

static int begin_common(ckpt_ipc_server_t *srv, const ckpt_ipc_begin_t *begin, int prepare,
                        int timeout_ms)
{
    ckpt__ipc_begin_msg_t m;
    ckpt__ipc_hdr_t hdr;
    uint8_t *p;
    int rc;
    if (srv == NULL || begin == NULL || begin->name == NULL)
        return ckpt__error(CKPT_EINVAL, "ipc begin: NULL argument");
    if (begin->nbuffers < 1 || begin->nbuffers > CKPT_IPC_MAX_BUFFERS)
        return ckpt__error(CKPT_EINVAL, "ipc begin: %d buffers, want 1..%d", begin->nbuffers,
                           CKPT_IPC_MAX_BUFFERS);
    int fds[CKPT_IPC_MAX_BUFFERS], nfds = 0;
    for (int i = 0; i < begin->nbuffers; i++) {
        if (begin->buffer_kinds[i] != CKPT_IPC_BUFFER_HOST) continue;
        fds[nfds++] = begin->buffer_fds[i];
    }
    for (int i = 0; i < begin->nbuffers; i++)
        if (begin->buffer_kinds[i] > CKPT_IPC_BUFFER_SIM ||
            (begin->buffer_kinds[i] == CKPT_IPC_BUFFER_HOST && begin->buffer_fds[i] < 0) ||
            begin->buffer_sizes[i] == 0)
            return ckpt__error(CKPT_EINVAL, "ipc begin: buffer %d has fd %d and size %llu", i,
                               begin->buffer_fds[i],
                               (unsigned long long)begin->buffer_sizes[i]);
    if (srv->state == ST_NONE)
        return ckpt__error(CKPT_EPEER, "ipc %s: no worker connected", srv->path);
    if (srv->state != ST_IDLE)
        return ckpt__error(CKPT_ESTATE, "%s: an update is already in progress", srv->conn.peer);
    /* One deadline for all this call waits on. A PREPARE never waits for its answer
     * (registration must not wait for a worker); a BEGIN first reads the answers still due. */
    uint64_t deadline = ckpt__ipc_deadline(timeout_ms);
    if (prepare) {
        drain_prepares(srv, ckpt__ipc_deadline(0), 0);
        ckpt__error_clear();
        if (srv->state != ST_IDLE)
            return ckpt__error(CKPT_EPEER, "ipc %s: the worker went away", srv->path);
        if (srv->prepares >= MAX_PREPARES)
            return ckpt__error(CKPT_EBUSY, "%s: %d PREPAREs unanswered, the worker does not read "
                               "its socket: none sent (its next BEGIN maps the buffers)",
                               srv->conn.peer, srv->prepares);
    } else if ((rc = drain_prepares(srv, deadline, 1)) != 0) {
        return ckpt__error_prefix(rc, "update %llu BEGIN: ", (unsigned long long)begin->update_id);
    }
    memset(&m, 0, sizeof(m));
    if (ckpt__strlcpy(m.name, begin->name, sizeof(m.name)) != CKPT_OK || m.name[0] == '\0')
        return ckpt__error(CKPT_EINVAL, "ipc begin: checkpoint name '%s' empty or too long",
                           begin->name);
    m.update_id = begin->update_id;
    m.version = begin->version;
    m.nbuckets = begin->nbuckets;
    m.flags = (begin->verify ? CKPT_IPC_BEGIN_VERIFY : 0) | (prepare ? CKPT_IPC_BEGIN_PREPARE : 0) |
              (begin->stable ? CKPT_IPC_BEGIN_STABLE : 0) |
              (begin->partial ? CKPT_IPC_BEGIN_PARTIAL : 0);
    if (!prepare && begin->manifest_count > 0) {
        if (begin->manifest == NULL || begin->manifest_count > UINT32_MAX)
            return ckpt__error(CKPT_EINVAL, "ipc begin: manifest of %zu tensors",
                               begin->manifest_count);
        m.manifest = begin->manifest;
        m.manifest_count = (uint32_t)begin->manifest_count;
    }
    m.nbuffers = (uint32_t)begin->nbuffers;
    m.max_tensors = begin->max_tensors;
    for (int i = 0; i < begin->nbuffers; i++) {
        m.buffer_sizes[i] = begin->buffer_sizes[i];
        m.buffer_kinds[i] = begin->buffer_kinds[i];
        memcpy(m.buffer_handles[i], begin->buffer_handles[i], CKPT_IPC_HANDLE_BYTES);
    }
    /* Size the BUCKET buffer once now, so send_bucket does not allocate on the data path. */
    if (begin->max_tensors > 0) {
        size_t want = 12 + (size_t)begin->max_tensors * MAX_RECORD;
        rc = ckpt__ipc_conn_tx_reserve(&srv->conn, CKPT_MIN(want, CKPT_IPC_MAX_PAYLOAD), &p);
        if (rc) return rc;
    }
    if (ckpt__ipc_begin_size(&m) > CKPT_IPC_MAX_PAYLOAD)
        return ckpt__error(CKPT_ETOOBIG, "update %llu: BEGIN with a manifest of %u tensors "
                           "takes %zu bytes, more than the protocol's %u",
                           (unsigned long long)m.update_id, m.manifest_count,
                           ckpt__ipc_begin_size(&m), CKPT_IPC_MAX_PAYLOAD);
    rc = ckpt__ipc_conn_tx_reserve(&srv->conn, ckpt__ipc_begin_size(&m), &p);
    if (rc) return rc;
    ckpt__ipc_begin_encode(&m, p);
    /* A PREPARE fits at once in the socket buffer of a worker that reads it; when it does
     * not, the worker is not reading and registration does not wait for it. */
    rc = ckpt__ipc_conn_send(&srv->conn, CKPT_IPC_MSG_BEGIN, ckpt__ipc_begin_size(&m),
                             fds, nfds,
                             prepare ? PREPARE_SEND_MS : ckpt__ipc_ms_left(deadline));
    if (rc) return fail_drop(srv, rc);
    if (prepare) { /* its READY/ERR is read later: drain_prepares */
        srv->prepares++;
        srv->prepare_sent_ns = ckpt__now_ns();
        return CKPT_OK;
    }
    rc = recv_reply(srv, ckpt__ipc_ms_left(deadline), &hdr);
    if (rc) return fail_drop(srv, ckpt__error_prefix(rc, "update %llu BEGIN: ",
                                                     (unsigned long long)m.update_id));
    if (hdr.type == CKPT_IPC_MSG_ERR) return worker_error(srv, "BEGIN");
    if (hdr.type != CKPT_IPC_MSG_READY) return unexpected(srv, &hdr, "BEGIN");
    srv->state = ST_UPDATE;
    srv->update_id = m.update_id;
    srv->nbuffers = begin->nbuffers;
    return CKPT_OK;
}

int ckpt_ipc_send_bucket(ckpt_ipc_server_t *srv, uint32_t bucket, int buffer,
                         const ckpt_tensor_meta_t *tensors, size_t count)
{
    return ckpt_ipc_send_bucket_parts(srv, bucket, buffer, tensors, NULL, count);
}

int ckpt_ipc_send_bucket_parts(ckpt_ipc_server_t *srv, uint32_t bucket, int buffer,
                               const ckpt_tensor_meta_t *tensors, const ckpt__ipc_part_t *parts,
                               size_t count)
{
    ckpt__ipc_bucket_hdr_t h = {bucket, (uint32_t)buffer, (uint32_t)count};
    size_t len = 12;
    uint8_t *p;
    int rc;
    if (srv == NULL || (tensors == NULL && count > 0))
        return ckpt__error(CKPT_EINVAL, "ipc send_bucket: NULL argument");
    if (srv->state == ST_NONE)
        return ckpt__error(CKPT_EPEER, "ipc %s: no worker connected", srv->path);
    if (srv->state == ST_BUCKET)
        return ckpt__error(CKPT_ESTATE, "%s: bucket %u: the ack of bucket %u is outstanding",
                           srv->conn.peer, bucket, srv->bucket);
    if (srv->state != ST_UPDATE)
        return ckpt__error(CKPT_ESTATE, "%s: bucket %u: no update in progress", srv->conn.peer,
                           bucket);
    if (buffer < 0 || buffer >= srv->nbuffers)
        return ckpt__error(CKPT_EINVAL, "%s: bucket %u: buffer %d of %d", srv->conn.peer,
                           bucket, buffer, srv->nbuffers);
    for (size_t i = 0; i < count; i++) len += ckpt__ipc_tensor_size(&tensors[i]);
    rc = ckpt__ipc_conn_tx_reserve(&srv->conn, len, &p);
    if (rc) return rc;
    p += ckpt__ipc_bucket_encode_hdr(&h, p);
    for (size_t i = 0; i < count; i++)
        p += ckpt__ipc_tensor_encode(&tensors[i], parts ? &parts[i] : NULL, p);
    rc = ckpt__ipc_conn_send(&srv->conn, CKPT_IPC_MSG_BUCKET, len, NULL, 0,
                             srv->send_timeout_ms);
    if (rc) return fail_drop(srv, ckpt__error_prefix(rc, "bucket %u: ", bucket));
    srv->state = ST_BUCKET;
    srv->bucket = bucket;
    srv->ack_late = 0;
    return CKPT_OK;
}

int ckpt_ipc_wait_ack(ckpt_ipc_server_t *srv, int timeout_ms)
{
    ckpt__ipc_hdr_t hdr;
    char what[48];
    if (srv == NULL) return ckpt__error(CKPT_EINVAL, "ipc wait_ack: NULL server");
    if (srv->state == ST_NONE)
        return ckpt__error(CKPT_EPEER, "ipc %s: no worker connected", srv->path);
    if (srv->state != ST_BUCKET)
        return ckpt__error(CKPT_ESTATE, "%s: no bucket outstanding", srv->conn.peer);
    snprintf(what, sizeof(what), "bucket %u", srv->bucket);
    int rc = recv_reply(srv, timeout_ms, &hdr);
    if (rc == CKPT_ETIMEDOUT) { /* keep the connection: the engine decides to wait or abort */
        srv->ack_late = 1;
        return ckpt__error(CKPT_ETIMEDOUT, "%s: no answer to %s within %d ms", srv->conn.peer,
                           what, timeout_ms);
    }
    if (rc) return fail_drop(srv, ckpt__error_prefix(rc, "%s: ", what));
    if (hdr.type != CKPT_IPC_MSG_OK && hdr.type != CKPT_IPC_MSG_ERR)
        return unexpected(srv, &hdr, what);
    srv->state = ST_UPDATE;
    return hdr.type == CKPT_IPC_MSG_OK ? CKPT_OK : worker_error(srv, what);
}

int ckpt_ipc_finish(ckpt_ipc_server_t *srv, int commit, const char *reason, int timeout_ms)
{
    ckpt__ipc_hdr_t hdr;
    uint64_t deadline = ckpt__ipc_deadline(timeout_ms);
    const char *what = commit ? "FINISH" : "ABORT";
    int rc;
    if (srv == NULL) return ckpt__error(CKPT_EINVAL, "ipc finish: NULL server");
    if (srv->state == ST_NONE)
        return ckpt__error(CKPT_EPEER, "ipc %s: no worker connected", srv->path);
    if (srv->state == ST_IDLE)
        return ckpt__error(CKPT_ESTATE, "%s: %s without an update", srv->conn.peer, what);
    if (srv->state == ST_DECIDE) {
        if (commit)
            return ckpt__error(CKPT_ESTATE, "%s: FINISH already answered; commit or abort",
                               srv->conn.peer);
        /* The decision after FINISH: not answered, so nothing to wait for. */
        rc = ckpt__ipc_conn_send_text(&srv->conn, CKPT_IPC_MSG_ABORT, 0,
                                      reason ? reason : "aborted", timeout_ms);
        if (rc) return fail_drop(srv, rc);
        srv->state = ST_IDLE;
        return CKPT_OK;
    }
    if (srv->state == ST_BUCKET) {
        if (commit)
            return ckpt__error(CKPT_ESTATE, "%s: FINISH while the ack of bucket %u is outstanding",
                               srv->conn.peer, srv->bucket);
        /* A worker that already missed its ack deadline had its chance: waiting again would
         * double the time a stalled worker holds every rank, so it is dropped (it sees EOF
         * and marks the update incomplete). Otherwise its bucket answer comes before it
         * reads ABORT, so collect it first. */
        if (srv->ack_late) {
            drop_worker(srv, "no answer to the last bucket before ABORT");
            return ckpt__error(CKPT_ETIMEDOUT, "ipc %s: ABORT: worker dropped, it did not "
                               "answer bucket %u in time", srv->path, srv->bucket);
        }
        rc = ckpt_ipc_wait_ack(srv, ckpt__ipc_ms_left(deadline));
        if (rc == CKPT_ETIMEDOUT || rc == CKPT_EPEER || rc == CKPT_EPROTO)
            return fail_drop(srv, rc);
    }
    rc = ckpt__ipc_conn_send_text(&srv->conn, commit ? CKPT_IPC_MSG_FINISH : CKPT_IPC_MSG_ABORT,
                                  0, reason ? reason : "aborted", ckpt__ipc_ms_left(deadline));
    if (rc) return fail_drop(srv, rc);
    rc = recv_reply(srv, ckpt__ipc_ms_left(deadline), &hdr);
    if (rc) return fail_drop(srv, ckpt__error_prefix(rc, "%s: ", what));
    /* A FINISH answer is not the end: the ranks agree on every worker's answer first, then
     * COMMIT or ABORT follows (one outcome for every worker). */
    srv->state = commit ? ST_DECIDE : ST_IDLE;
    if (hdr.type == CKPT_IPC_MSG_OK) return CKPT_OK;
    if (hdr.type == CKPT_IPC_MSG_ERR) return worker_error(srv, commit ? "post-hook" : what);
    return unexpected(srv, &hdr, what);
}

int ckpt_ipc_deciding(ckpt_ipc_server_t *srv) { return srv && srv->state == ST_DECIDE; }

int ckpt_ipc_commit(ckpt_ipc_server_t *srv, int timeout_ms)
{
    if (srv == NULL) return ckpt__error(CKPT_EINVAL, "ipc commit: NULL server");
    if (srv->state == ST_NONE)
        return ckpt__error(CKPT_EPEER, "ipc %s: no worker connected", srv->path);
    if (srv->state != ST_DECIDE)
        return ckpt__error(CKPT_ESTATE, "%s: COMMIT before the FINISH answer", srv->conn.peer);
    int rc = ckpt__ipc_conn_send_text(&srv->conn, CKPT_IPC_MSG_COMMIT, 0, NULL, timeout_ms);
    if (rc) return fail_drop(srv, ckpt__error_prefix(rc, "COMMIT: "));
    srv->state = ST_IDLE;
    return CKPT_OK;
}
