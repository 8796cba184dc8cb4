/* The address a ckpt UCX worker publishes, and the liveness of the process behind it.
 *
 * Why: UCX 1.13's shared-memory transports cannot tell that the process at the other end
 * died (no peer-failure detection; PEER error mode leaves them out), so a get from a dead
 * peer over shm stayed pending until the batch timed out, and a dead owner was reported as
 * a slow one (CKPT_ETIMEDOUT). Shared memory means the same host, where the kernel knows:
 * the published address carries the process's identity (pid, its start time, the pid
 * namespace and the boot id), and a connecting process on the same host and in the same
 * pid namespace holds a pidfd of its peer, which becomes readable the moment that process
 * exits. Anywhere else the UCX transports are the only judges, as before. */
#include <fcntl.h>
#include <poll.h>
#include <stdio.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "comm/ucx_impl.h"

#define ADDR_MAGIC 0x41554b43u /* "CKUA" */

/* Prefix of the published address; the UCX worker address follows it. */
typedef struct addr_header {
    uint32_t magic;
    uint32_t header_len;  /* sizeof(addr_header_t) when written: where the UCX address starts */
    int32_t pid;
    uint32_t reserved;
    uint64_t start_ticks; /* field 22 of /proc/<pid>/stat: tells a reused pid apart */
    uint64_t pidns;       /* inode of /proc/self/ns/pid: pids mean the same thing to both */
    char boot_id[40];     /* /proc/sys/kernel/random/boot_id: the same host (kernel) */
} addr_header_t;

static uint64_t start_ticks(pid_t pid)
{
    char path[64], buf[1024];
    snprintf(path, sizeof(path), "/proc/%d/stat", (int)pid);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return 0;
    ssize_t n = read(fd, buf, sizeof(buf) - 1);
    close(fd);
    if (n <= 0) return 0;
    buf[n] = 0;
    /* The command name (field 2) may hold spaces and parentheses: count from the last ')'. */
    char *p = strrchr(buf, ')');
    for (int field = 2; p && field < 22; field++) p = strchr(p + 1, ' ');
    return p ? strtoull(p + 1, NULL, 10) : 0;
}

static void identity(addr_header_t *h)
{
    memset(h, 0, sizeof(*h));
    h->magic = ADDR_MAGIC;
    h->header_len = sizeof(*h);
    h->pid = (int32_t)getpid();
    h->start_ticks = start_ticks(getpid());
    struct stat st;
    if (stat("/proc/self/ns/pid", &st) == 0) h->pidns = (uint64_t)st.st_ino;
    int fd = open("/proc/sys/kernel/random/boot_id", O_RDONLY | O_CLOEXEC);
    if (fd >= 0) {
        ssize_t n = read(fd, h->boot_id, sizeof(h->boot_id) - 1);
        close(fd);
        if (n <= 0) memset(h->boot_id, 0, sizeof(h->boot_id));
    }
}

int ckpt__ucx_addr_build(ckpt__ucx_t *u)
{
    addr_header_t h;
    identity(&h);
    u->pub_address = ckpt__malloc(sizeof(h) + u->address_len);
    if (!u->pub_address) return ckpt__error(CKPT_ENOMEM, "ucx address: out of memory");
    memcpy(u->pub_address, &h, sizeof(h));
    memcpy((char *)u->pub_address + sizeof(h), u->address, u->address_len);
    u->pub_address_len = sizeof(h) + u->address_len;
    return CKPT_OK;
}

int ckpt__ucx_addr_parse(const void *addr, size_t len, int rank, const void **ucx_addr,
                         size_t *ucx_len, int *pidfd_out, int *pid_out)
{
    addr_header_t h;
    *pidfd_out = -1;
    *pid_out = 0;
    *ucx_addr = addr;
    *ucx_len = len;
    if (len < sizeof(h) || (memcpy(&h, addr, sizeof(h)), h.magic != ADDR_MAGIC) ||
        h.header_len < sizeof(h) || h.header_len >= len) {
        /* A bare UCX worker address (metas of an older engine): no identity to watch. */
        ckpt_debug("ucx connect rank %d: bare UCX address; a dead peer over shared memory "
                   "shows as a timeout", rank);
        return CKPT_OK;
    }
    *ucx_addr = (const char *)addr + h.header_len;
    *ucx_len = len - h.header_len;
    addr_header_t me;
    identity(&me);
    if (!h.pidns || h.pidns != me.pidns || !me.boot_id[0] ||
        memcmp(h.boot_id, me.boot_id, sizeof(h.boot_id)) != 0)
        return CKPT_OK; /* another host or pid namespace: the transports judge liveness */
    int fd = -1;
#ifdef SYS_pidfd_open
    fd = (int)syscall(SYS_pidfd_open, (pid_t)h.pid, 0);
#else
    errno = ENOSYS;
#endif
    if (fd < 0 && errno != ESRCH) {
        ckpt_debug("ucx connect rank %d: no pidfd of pid %d (%s); a dead peer over shared "
                   "memory shows as a timeout", rank, h.pid, strerror(errno));
        return CKPT_OK;
    }
    /* The pidfd pins the process it was opened for; a start time that differs means the
     * pid already belongs to someone else, i.e. the peer is gone. */
    if (fd < 0 || (h.start_ticks && start_ticks(h.pid) != h.start_ticks)) {
        if (fd >= 0) close(fd);
        return ckpt__error(CKPT_EPEER, "ucx connect rank %d: its process (pid %d) has exited",
                           rank, h.pid);
    }
    fcntl(fd, F_SETFD, FD_CLOEXEC);
    *pidfd_out = fd;
    *pid_out = h.pid;
    return CKPT_OK;
}

int ckpt__ucx_peer_exited(ckpt__ucx_peer_t *p)
{
    if (p->exited) return 1;
    if (p->pidfd < 0) return 0;
    struct pollfd pfd = {.fd = p->pidfd, .events = POLLIN};
    if (poll(&pfd, 1, 0) <= 0 || !(pfd.revents & (POLLIN | POLLHUP))) return 0;
    ckpt__ucx_peer_mark_exited(p);
    return 1;
}

void ckpt__ucx_peer_mark_exited(ckpt__ucx_peer_t *p)
{
    p->exited = 1;
    /* What the error handler would have recorded had the transport noticed: the peer
     * counts as failed, and disconnecting closes its endpoint without a flush. */
    if (p->fail_status == UCS_OK) p->fail_status = UCS_ERR_CONNECTION_RESET;
}

const char *ckpt__ucx_peer_fail_text(const ckpt__ucx_peer_t *p, char *buf, size_t size)
{
    if (p->exited)
        snprintf(buf, size, "its process (pid %d) exited", p->pid);
    else
        snprintf(buf, size, "peer failed: %s",
                 ucs_status_string(p->fail_status != UCS_OK ? p->fail_status : UCS_ERR_CANCELED));
    return buf;
}
