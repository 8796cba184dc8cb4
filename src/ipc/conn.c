/* Framed message I/O over a non-blocking Unix stream socket, with deadlines and SCM_RIGHTS.
 * Every wait is a poll() bounded by the caller's deadline; writes use MSG_NOSIGNAL so a
 * dead peer is an EPIPE status, never a SIGPIPE that kills the process. */
#include <errno.h>
#include <poll.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "ipc/conn.h"

/* SCM_RIGHTS carries at most SCM_MAX_FD (253) fds per message on Linux; the control
 * buffers below hold CKPT_IPC_MAX_BUFFERS of them (a few hundred bytes on the stack). */
_Static_assert(CKPT_IPC_MAX_BUFFERS >= 1 && CKPT_IPC_MAX_BUFFERS <= 253,
               "CKPT_IPC_MAX_BUFFERS must fit one SCM_RIGHTS message");

uint64_t ckpt__ipc_deadline(int timeout_ms)
{
    if (timeout_ms < 0) return 0;
    return ckpt__now_ns() + (uint64_t)timeout_ms * 1000000ull;
}

int ckpt__ipc_ms_left(uint64_t deadline_ns)
{
    if (deadline_ns == 0) return -1;
    uint64_t now = ckpt__now_ns();
    if (now >= deadline_ns) return 0;
    /* Round up so a 0.4 ms remainder still polls once instead of spinning at 0. */
    uint64_t ms = (deadline_ns - now + 999999ull) / 1000000ull;
    return ms > 0x7fffffff ? 0x7fffffff : (int)ms;
}

void ckpt__ipc_conn_init(ckpt__ipc_conn_t *c, int fd, const char *peer)
{
    c->fd = fd;
    c->broken = 0;
    c->rx_got = 0;
    c->rx_nfds = 0;
    ckpt__strlcpy(c->peer, peer, sizeof(c->peer));
}

void ckpt__ipc_conn_drop_fds(ckpt__ipc_conn_t *c)
{
    for (int i = 0; i < c->rx_nfds; i++) close(c->rx_fds[i]);
    c->rx_nfds = 0;
}

void ckpt__ipc_conn_reset(ckpt__ipc_conn_t *c)
{
    if (c->fd >= 0) close(c->fd);
    c->fd = -1;
    c->broken = 0;
    c->rx_got = 0;
    ckpt__ipc_conn_drop_fds(c);
}

void ckpt__ipc_conn_destroy(ckpt__ipc_conn_t *c)
{
    ckpt__ipc_conn_reset(c);
    ckpt__free(c->rx_buf);
    ckpt__free(c->tx_buf);
    c->rx_buf = c->tx_buf = NULL;
    c->rx_cap = c->tx_cap = 0;
}

static int grow(uint8_t **buf, size_t *cap, size_t need)
{
    if (need <= *cap) return CKPT_OK;
    size_t n = *cap ? *cap : 4096;
    while (n < need) n *= 2;
    uint8_t *p = ckpt__realloc(*buf, n);
    if (p == NULL) return ckpt__error(CKPT_ENOMEM, "ipc: %zu-byte message buffer", n);
    *buf = p;
    *cap = n;
    return CKPT_OK;
}

int ckpt__ipc_conn_tx_reserve(ckpt__ipc_conn_t *c, size_t len, uint8_t **payload_out)
{
    if (len > CKPT_IPC_MAX_PAYLOAD)
        return ckpt__error(CKPT_ETOOBIG, "%s: message of %zu bytes exceeds the %u limit",
                           c->peer, len, CKPT_IPC_MAX_PAYLOAD);
    int rc = grow(&c->tx_buf, &c->tx_cap, CKPT_IPC_HDR_SIZE + len);
    if (rc) return rc;
    *payload_out = c->tx_buf + CKPT_IPC_HDR_SIZE;
    return CKPT_OK;
}

/* Waits until fd is ready for `events` or the deadline passes; services `watch` meanwhile. */
static int wait_fd(ckpt__ipc_conn_t *c, short events, uint64_t deadline,
                   const ckpt__ipc_watch_t *watch, const char *doing)
{
    for (;;) {
        struct pollfd pf[2] = {{c->fd, events, 0}, {watch ? watch->fd : -1, POLLIN, 0}};
        int n = poll(pf, watch && watch->fd >= 0 ? 2 : 1, ckpt__ipc_ms_left(deadline));
        if (n < 0) {
            if (errno == EINTR) continue;
            return ckpt__error(CKPT_EIO, "%s: poll: %s", c->peer, strerror(errno));
        }
        if (n == 0) return ckpt__error(CKPT_ETIMEDOUT, "%s: timed out %s", c->peer, doing);
        if (watch && watch->fd >= 0 && (pf[1].revents & POLLIN)) watch->cb(watch->arg);
        if (pf[0].revents) return CKPT_OK; /* ready, or HUP/ERR that the I/O call reports */
    }
}

int ckpt__ipc_conn_send(ckpt__ipc_conn_t *c, uint32_t type, size_t len, const int *fds,
                        int nfds, int timeout_ms)
{
    if (c->fd < 0) return ckpt__error(CKPT_EPEER, "%s: not connected", c->peer);
    if (c->broken) return ckpt__error(CKPT_EPEER, "%s: connection broken", c->peer);
    if (nfds < 0 || nfds > CKPT_IPC_MAX_BUFFERS)
        return ckpt__error(CKPT_EINVAL, "%s: %d fds to attach, at most %d", c->peer, nfds,
                           CKPT_IPC_MAX_BUFFERS);
    uint64_t deadline = ckpt__ipc_deadline(timeout_ms);
    size_t total = CKPT_IPC_HDR_SIZE + len, sent = 0;
    union {
        struct cmsghdr align;
        char buf[CMSG_SPACE(sizeof(int) * CKPT_IPC_MAX_BUFFERS)];
    } ctl;
    ckpt__ipc_hdr_encode(c->tx_buf, type, (uint32_t)len);
    while (sent < total) {
        struct iovec iov = {c->tx_buf + sent, total - sent};
        struct msghdr mh = {.msg_iov = &iov, .msg_iovlen = 1};
        if (sent == 0 && nfds > 0) { /* fds travel with the first byte of the frame */
            memset(&ctl, 0, sizeof(ctl));
            mh.msg_control = ctl.buf;
            mh.msg_controllen = CMSG_SPACE(sizeof(int) * (size_t)nfds);
            struct cmsghdr *cm = CMSG_FIRSTHDR(&mh);
            cm->cmsg_level = SOL_SOCKET;
            cm->cmsg_type = SCM_RIGHTS;
            cm->cmsg_len = CMSG_LEN(sizeof(int) * (size_t)nfds);
            memcpy(CMSG_DATA(cm), fds, sizeof(int) * (size_t)nfds);
        }
        ssize_t n = sendmsg(c->fd, &mh, MSG_NOSIGNAL | MSG_DONTWAIT);
        if (n > 0) {
            sent += (size_t)n;
            continue;
        }
        if (n < 0 && errno == EINTR) continue;
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
            int rc = wait_fd(c, POLLOUT, deadline, NULL, "sending");
            if (rc) {
                if (sent) c->broken = 1;
                return ckpt__error_prefix(rc, "%s message: ", ckpt__ipc_msg_name(type));
            }
            continue;
        }
        if (sent) c->broken = 1;
        if (n < 0 && (errno == EPIPE || errno == ECONNRESET || errno == ENOTCONN))
            return ckpt__error(CKPT_EPEER, "%s: disconnected (sending %s)", c->peer,
                               ckpt__ipc_msg_name(type));
        return ckpt__error(CKPT_EIO, "%s: sending %s: %s", c->peer, ckpt__ipc_msg_name(type),
                           strerror(errno));
    }
    return CKPT_OK;
}

int ckpt__ipc_conn_send_text(ckpt__ipc_conn_t *c, uint32_t type, int32_t status,
                             const char *text, int timeout_ms)
{
    uint8_t *p = NULL;
    size_t len = (type == CKPT_IPC_MSG_ERR || type == CKPT_IPC_MSG_ABORT ||
                  type == CKPT_IPC_MSG_REFUSE)
                     ? ckpt__ipc_text_size(text)
                     : 0;
    int rc = ckpt__ipc_conn_tx_reserve(c, len, &p);
    if (rc) return rc;
    if (len) ckpt__ipc_text_encode(status, text, p);
    return ckpt__ipc_conn_send(c, type, len, NULL, 0, timeout_ms);
}

/* Moves fds from a control message into c->rx_fds; any beyond CKPT_IPC_MAX_BUFFERS are
 * closed and make the frame a protocol error (a well-behaved engine never sends more). Fds
 * that did not even fit the control buffer (MSG_CTRUNC) were closed by the kernel. Whether
 * the count matches what the message announces is the caller's check (map_buffers). */
static int take_fds(ckpt__ipc_conn_t *c, struct msghdr *mh)
{
    int extra = 0;
    if (mh->msg_flags & MSG_CTRUNC) extra = 1;
    for (struct cmsghdr *cm = CMSG_FIRSTHDR(mh); cm; cm = CMSG_NXTHDR(mh, cm)) {
        if (cm->cmsg_level != SOL_SOCKET || cm->cmsg_type != SCM_RIGHTS) continue;
        size_t n = (cm->cmsg_len - CMSG_LEN(0)) / sizeof(int);
        for (size_t i = 0; i < n; i++) {
            int fd;
            memcpy(&fd, CMSG_DATA(cm) + i * sizeof(int), sizeof(int));
            if (c->rx_nfds < CKPT_IPC_MAX_BUFFERS) c->rx_fds[c->rx_nfds++] = fd;
            else {
                close(fd);
                extra = 1;
            }
        }
    }
    if (extra) { /* the frame is garbage: keep none of its fds */
        ckpt__ipc_conn_drop_fds(c);
        return ckpt__error(CKPT_EPROTO, "%s: more than %d fds attached to one message",
                           c->peer, CKPT_IPC_MAX_BUFFERS);
    }
    return CKPT_OK;
}

int ckpt__ipc_conn_recv(ckpt__ipc_conn_t *c, int timeout_ms, const ckpt__ipc_watch_t *watch,
                        ckpt__ipc_hdr_t *hdr_out)
{
    if (c->fd < 0) return ckpt__error(CKPT_EPEER, "%s: not connected", c->peer);
    uint64_t deadline = ckpt__ipc_deadline(timeout_ms);
    if (c->rx_got == 0) ckpt__ipc_conn_drop_fds(c); /* fds of a frame nobody took */
    for (;;) {
        size_t want;
        uint8_t *dst;
        if (c->rx_got < CKPT_IPC_HDR_SIZE) {
            want = CKPT_IPC_HDR_SIZE - c->rx_got;
            dst = c->hdr + c->rx_got;
        } else {
            size_t have = c->rx_got - CKPT_IPC_HDR_SIZE;
            if (have == c->rx_hdr.length) break;
            want = c->rx_hdr.length - have;
            dst = c->rx_buf + have;
        }
        union {
            struct cmsghdr align;
            char buf[CMSG_SPACE(sizeof(int) * CKPT_IPC_MAX_BUFFERS)];
        } ctl;
        struct iovec iov = {dst, want};
        struct msghdr mh = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = ctl.buf,
                            .msg_controllen = sizeof(ctl.buf)};
        ssize_t n = recvmsg(c->fd, &mh, MSG_DONTWAIT | MSG_CMSG_CLOEXEC);
        if (n < 0 && errno == EINTR) continue;
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
            int rc = wait_fd(c, POLLIN, deadline, watch, "waiting for a message");
            if (rc) return rc;
            continue;
        }
        if (n == 0 || (n < 0 && errno == ECONNRESET))
            return ckpt__error(CKPT_EPEER, "%s: disconnected%s", c->peer,
                               c->rx_got ? " in the middle of a message" : "");
        if (n < 0) return ckpt__error(CKPT_EIO, "%s: recv: %s", c->peer, strerror(errno));
        if (mh.msg_controllen > 0) {
            int rc = take_fds(c, &mh);
            if (rc) return rc;
        }
        c->rx_got += (size_t)n;
        if (c->rx_got == CKPT_IPC_HDR_SIZE) {
            int rc = ckpt__ipc_hdr_decode(c->hdr, c->peer, &c->rx_hdr);
            if (rc == CKPT_OK) rc = grow(&c->rx_buf, &c->rx_cap, c->rx_hdr.length);
            if (rc) return rc; /* the stream is unusable: callers drop the connection */
        }
    }
    c->rx_got = 0;
    *hdr_out = c->rx_hdr;
    return CKPT_OK;
}
