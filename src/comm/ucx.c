/* UCX context, worker, registrations, endpoints and the serving progress thread. The
 * pulling data path (batched gets) is in ucx_get.c. */
#include <dirent.h>
#include <fcntl.h>
#include <poll.h>
#include <stdatomic.h>
#include <stdio.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <unistd.h>

#include <ucs/config/global_opts.h>

#include "comm/ucx_impl.h"

static int ucs_to_ckpt(ucs_status_t st)
{
    switch (st) {
    case UCS_ERR_NO_MEMORY: return CKPT_ENOMEM;
    case UCS_ERR_TIMED_OUT:
    case UCS_ERR_ENDPOINT_TIMEOUT: return CKPT_ETIMEDOUT;
    case UCS_ERR_UNREACHABLE:
    case UCS_ERR_CONNECTION_RESET:
    case UCS_ERR_REJECTED:
    case UCS_ERR_CANCELED: return CKPT_EPEER;
    case UCS_ERR_UNSUPPORTED:
    case UCS_ERR_NO_DEVICE:
    case UCS_ERR_NO_RESOURCE: return CKPT_EUNSUPPORTED;
    default: return CKPT_ECOMM;
    }
}

int ckpt__ucx_status(ucs_status_t st) { return ucs_to_ckpt(st); }

int ckpt__ucx_create(const ckpt__ucx_options_t *opts, ckpt__ucx_t **out)
{
    ckpt__ucx_options_t o = CKPT__UCX_OPTIONS_INIT;
    ucp_config_t *config = NULL;
    ucs_status_t st;
    int rc = CKPT_OK;

    if (opts) o = *opts;
    if (!out) return ckpt__error(CKPT_EINVAL, "ucx create: NULL output");
    ckpt__ucx_t *u = ckpt__calloc(1, sizeof(*u));
    if (!u) return ckpt__error(CKPT_ENOMEM, "ucx create: out of memory");
    u->serving = o.progress_thread != 0;
    u->chunk = o.chunk_size ? o.chunk_size : CKPT__UCX_CHUNK_DEFAULT;
    u->spin_ns = o.spin_us < 0 ? 0 : (uint64_t)(o.spin_us ? o.spin_us : CKPT__UCX_SPIN_US_DEFAULT) * 1000u;

    st = ucp_config_read(NULL, NULL, &config);
    if (st != UCS_OK) {
        rc = ckpt__error(ucs_to_ckpt(st), "ucx create: ucp_config_read: %s", ucs_status_string(st));
        goto fail;
    }
    u->shared_alloc = o.shared_alloc != 0;
    /* POSIX shared memory only: its segments are files this process holds an fd of (in
     * UCX's default proc-link mode), which is what lets the store hand pools to local
     * workers; SysV segments have no fd. */
    if (u->shared_alloc) {
        st = ucp_config_modify(config, "ALLOC_PRIO", "md:posix");
        if (st != UCS_OK) ckpt_debug("ucx create: shared allocation not configurable: %s",
                                     ucs_status_string(st));
    }
    ucp_params_t params = {0};
    params.field_mask = UCP_PARAM_FIELD_FEATURES | UCP_PARAM_FIELD_MT_WORKERS_SHARED;
    /* WAKEUP on both sides: the serving progress thread sleeps on the worker fd, and a
     * pulling batch sleeps on it while it waits for a transport that needs the serving
     * side to work (TCP), instead of spinning on the core that side needs. */
    params.features = UCP_FEATURE_RMA | UCP_FEATURE_WAKEUP;
    /* Registration (context) may run on the caller's thread while the progress thread
     * drives the worker, so the context must lock. */
    params.mt_workers_shared = u->serving;
    st = ucp_init(&params, config, &u->context);
    ucp_config_release(config);
    if (st != UCS_OK) {
        rc = ckpt__error(ucs_to_ckpt(st), "ucx create: ucp_init (UCX_TLS=%s): %s",
                         getenv("UCX_TLS") ? getenv("UCX_TLS") : "default", ucs_status_string(st));
        goto fail;
    }
    ucp_worker_params_t wp = {0};
    wp.field_mask = UCP_WORKER_PARAM_FIELD_THREAD_MODE;
    wp.thread_mode = u->serving ? UCS_THREAD_MODE_MULTI : UCS_THREAD_MODE_SINGLE;
    st = ucp_worker_create(u->context, &wp, &u->worker);
    if (st != UCS_OK) {
        rc = ckpt__error(ucs_to_ckpt(st), "ucx create: ucp_worker_create: %s", ucs_status_string(st));
        goto fail;
    }
    u->efd = -1;
    if (!u->serving && ucp_worker_get_efd(u->worker, &u->efd) != UCS_OK) u->efd = -1;
    st = ucp_worker_get_address(u->worker, &u->address, &u->address_len);
    if (st != UCS_OK) {
        rc = ckpt__error(ucs_to_ckpt(st), "ucx create: ucp_worker_get_address: %s",
                         ucs_status_string(st));
        goto fail;
    }
    rc = ckpt__ucx_addr_build(u);
    if (rc < 0) goto fail;
    *out = u;
    return CKPT_OK;
fail:
    ckpt__ucx_destroy(u);
    return rc;
}

void ckpt__ucx_destroy(ckpt__ucx_t *u)
{
    if (!u) return;
    ckpt__ucx_progress_stop(u);
    while (u->peers) ckpt__ucx_disconnect(u->peers, 1000);
    while (u->mems) ckpt__ucx_mem_unregister(u, u->mems);
    if (u->address) ucp_worker_release_address(u->worker, u->address);
    ckpt__free(u->pub_address);
    if (u->worker) ucp_worker_destroy(u->worker);
    if (u->context) ucp_cleanup(u->context);
    ckpt__free(u->slots);
    ckpt__free(u->pfds);
    ckpt__free(u);
}

int ckpt__ucx_address(ckpt__ucx_t *u, const void **addr_out, size_t *len_out)
{
    if (!u || !addr_out || !len_out) return ckpt__error(CKPT_EINVAL, "ucx address: NULL argument");
    *addr_out = u->pub_address;
    *len_out = u->pub_address_len;
    return CKPT_OK;
}

/* ---- registrations ---------------------------------------------------------------------- */

int ckpt__ucx_mem_register(ckpt__ucx_t *u, void *base, size_t len, ckpt__ucx_mem_t **mem_out)
{
    if (!u || !base || !len || !mem_out)
        return ckpt__error(CKPT_EINVAL, "ucx mem register: NULL or empty range");
    ckpt__ucx_mem_t *m = ckpt__calloc(1, sizeof(*m));
    if (!m) return ckpt__error(CKPT_ENOMEM, "ucx mem register: out of memory");
    ucp_mem_map_params_t mp = {0};
    /* No ALLOCATE flag: the pool already exists (memfd-backed); we only register it. */
    mp.field_mask = UCP_MEM_MAP_PARAM_FIELD_ADDRESS | UCP_MEM_MAP_PARAM_FIELD_LENGTH;
    mp.address = base;
    mp.length = len;
    ucs_status_t st = ucp_mem_map(u->context, &mp, &m->memh);
    if (st != UCS_OK) {
        ckpt__free(m);
        return ckpt__error(ucs_to_ckpt(st), "ucx mem register %p+%zu: ucp_mem_map: %s", base, len,
                           ucs_status_string(st));
    }
    m->base = base;
    m->len = len;
    m->next = u->mems;
    u->mems = m;
    *mem_out = m;
    return CKPT_OK;
}

/* The fd of this process that maps the shared mapping starting at base: the mapping's
 * device and inode from /proc/self/maps, matched against fstat of every open fd. */
static int fd_of_mapping(const void *base, int *fd_out)
{
    FILE *f = fopen("/proc/self/maps", "r");
    if (!f) return ckpt__error(CKPT_EIO, "ucx mem alloc: /proc/self/maps: %s", strerror(errno));
    char line[512];
    unsigned long start = 0, end = 0, ino = 0;
    unsigned maj = 0, min = 0;
    char perms[8] = "";
    int found = 0;
    while (!found && fgets(line, sizeof(line), f))
        found = sscanf(line, "%lx-%lx %7s %*x %x:%x %lu", &start, &end, perms, &maj, &min, &ino) == 6 &&
                start == (unsigned long)(uintptr_t)base;
    fclose(f);
    if (!found || perms[3] != 's' || ino == 0)
        return ckpt__error(CKPT_EUNSUPPORTED, "ucx mem alloc: the memory UCX allocated at %p is "
                           "not a shared file mapping", base);
    DIR *d = opendir("/proc/self/fd");
    if (!d) return ckpt__error(CKPT_EIO, "ucx mem alloc: /proc/self/fd: %s", strerror(errno));
    int fd = -1;
    struct dirent *de;
    while (fd < 0 && (de = readdir(d)) != NULL) {
        struct stat st;
        int n = atoi(de->d_name);
        if (de->d_name[0] < '0' || de->d_name[0] > '9' || n == dirfd(d)) continue;
        if (fstat(n, &st) == 0 && S_ISREG(st.st_mode) && st.st_ino == (ino_t)ino &&
            major(st.st_dev) == maj && minor(st.st_dev) == min)
            fd = fcntl(n, F_DUPFD_CLOEXEC, 0);
    }
    closedir(d);
    if (fd < 0)
        return ckpt__error(CKPT_EUNSUPPORTED, "ucx mem alloc: no fd of this process maps the "
                           "memory UCX allocated at %p", base);
    *fd_out = fd;
    return CKPT_OK;
}

int ckpt__ucx_mem_alloc_shared(ckpt__ucx_t *u, size_t len, ckpt__ucx_mem_t **mem_out, int *fd_out)
{
    if (!u || !len || !mem_out || !fd_out)
        return ckpt__error(CKPT_EINVAL, "ucx mem alloc: empty range");
    if (!u->shared_alloc)
        return ckpt__error(CKPT_EUNSUPPORTED, "ucx mem alloc: context made without shared_alloc");
    ckpt__ucx_mem_t *m = ckpt__calloc(1, sizeof(*m));
    if (!m) return ckpt__error(CKPT_ENOMEM, "ucx mem alloc: out of memory");
    ucp_mem_map_params_t mp = {0};
    mp.field_mask = UCP_MEM_MAP_PARAM_FIELD_ADDRESS | UCP_MEM_MAP_PARAM_FIELD_LENGTH |
                    UCP_MEM_MAP_PARAM_FIELD_FLAGS;
    mp.address = NULL;
    mp.length = len;
    mp.flags = UCP_MEM_MAP_ALLOCATE;
    /* A refusal (no room in /dev/shm, no POSIX transport) is expected and handled by the
     * caller's fallback: keep UCX from logging it as an error. */
    ucs_log_level_t saved = ucs_global_opts.log_component.log_level;
    ucs_global_opts.log_component.log_level = UCS_LOG_LEVEL_FATAL;
    ucs_status_t st = ucp_mem_map(u->context, &mp, &m->memh);
    ucs_global_opts.log_component.log_level = saved;
    ucp_mem_attr_t attr = {.field_mask = UCP_MEM_ATTR_FIELD_ADDRESS | UCP_MEM_ATTR_FIELD_LENGTH};
    if (st == UCS_OK) {
        ucs_status_t qst = ucp_mem_query(m->memh, &attr);
        if (qst != UCS_OK) {
            ucp_mem_unmap(u->context, m->memh);
            st = qst;
        }
    }
    if (st != UCS_OK) {
        ckpt__free(m);
        /* UCX answers "Out of memory" when no allowed method can allocate (no POSIX shared
         * memory transport loaded, e.g. UCX_TLS=tcp): the caller falls back either way. */
        return ckpt__error(CKPT_EUNSUPPORTED, "ucx mem alloc of %zu bytes from POSIX shared "
                           "memory: %s", len, ucs_status_string(st));
    }
    int fd = -1;
    int rc = attr.length >= len ? fd_of_mapping(attr.address, &fd)
                                : ckpt__error(CKPT_EUNSUPPORTED, "ucx mem alloc: %zu bytes "
                                              "asked, %zu given", len, attr.length);
    /* UCX only sizes the file: on a tmpfs short of room (a container's 64 MiB /dev/shm)
     * the first write past the room would be a SIGBUS. Reserve the pages now instead, so
     * a lack of room is an error here and the caller falls back to its own memory. */
    if (rc == CKPT_OK && fallocate(fd, 0, 0, (off_t)attr.length) != 0) {
        rc = ckpt__error(CKPT_EUNSUPPORTED, "ucx mem alloc: reserving %zu bytes of POSIX shared "
                         "memory: %s", attr.length, strerror(errno));
        close(fd);
    }
    if (rc < 0) {
        ucp_mem_unmap(u->context, m->memh);
        ckpt__free(m);
        return rc;
    }
    m->base = attr.address;
    m->len = attr.length;
    m->allocated = 1;
    m->next = u->mems;
    u->mems = m;
    *mem_out = m;
    *fd_out = fd;
    return CKPT_OK;
}

ckpt__ucx_mem_t *ckpt__ucx_mem_find_allocated(ckpt__ucx_t *u, const void *base)
{
    for (ckpt__ucx_mem_t *m = u ? u->mems : NULL; m; m = m->next)
        if (m->allocated && m->base == base) return m;
    return NULL;
}

void *ckpt__ucx_mem_base(const ckpt__ucx_mem_t *m) { return m ? m->base : NULL; }
int ckpt__ucx_mem_allocated(const ckpt__ucx_mem_t *m) { return m && m->allocated; }

void ckpt__ucx_mem_unregister(ckpt__ucx_t *u, ckpt__ucx_mem_t *m)
{
    if (!u || !m) return;
    for (ckpt__ucx_mem_t **pp = &u->mems; *pp; pp = &(*pp)->next) {
        if (*pp == m) {
            *pp = m->next;
            break;
        }
    }
    ucp_mem_unmap(u->context, m->memh);
    ckpt__free(m);
}

int ckpt__ucx_rkey_pack(ckpt__ucx_t *u, const ckpt__ucx_mem_t *m, void **buf_out, size_t *len_out)
{
    void *packed = NULL;
    size_t len = 0;
    if (!u || !m || !buf_out || !len_out) return ckpt__error(CKPT_EINVAL, "ucx rkey pack: NULL argument");
    ucs_status_t st = ucp_rkey_pack(u->context, m->memh, &packed, &len);
    if (st != UCS_OK)
        return ckpt__error(ucs_to_ckpt(st), "ucx rkey pack %p+%zu: %s", m->base, m->len,
                           ucs_status_string(st));
    /* Copy into our allocator so callers free every buffer the same way. */
    void *copy = ckpt__malloc(len);
    if (copy) memcpy(copy, packed, len);
    ucp_rkey_buffer_release(packed);
    if (!copy) return ckpt__error(CKPT_ENOMEM, "ucx rkey pack: out of memory");
    *buf_out = copy;
    *len_out = len;
    return CKPT_OK;
}

/* ---- progress thread ------------------------------------------------------------------- */

static void *progress_main(void *arg)
{
    ckpt__ucx_t *u = arg;
    struct pollfd pfd = {.fd = u->efd, .events = POLLIN};

    int ticked = 0; /* the last poll ended by its timeout, not by an event */
    while (!atomic_load_explicit(&u->stop, memory_order_acquire)) {
        /* Poll while there is traffic, and a little longer: re-arming and sleeping between
         * the chunks of one pull would add a wakeup latency to every chunk. After a bare
         * timeout tick, spin only if progress finds work, so idle stays near 0 % CPU. */
        uint64_t last = ckpt__now_ns() - (ticked ? u->spin_ns : 0);
        for (;;) {
            if (ucp_worker_progress(u->worker)) {
                last = ckpt__now_ns();
                continue;
            }
            if (atomic_load_explicit(&u->stop, memory_order_acquire)) return NULL;
            if (ckpt__now_ns() - last >= u->spin_ns) break;
        }
        ucs_status_t st = ucp_worker_arm(u->worker);
        if (st == UCS_ERR_BUSY) continue; /* events arrived while arming: progress again */
        /* If arming is not supported, fall back to a 1 ms tick rather than spinning. The
         * 10 ms bound otherwise is a safety net: with UCX 1.13's shared-memory transports
         * we saw pulls stall for tens of ms per chunk, as if a wakeup were missed; a
         * tick every 10 ms costs nothing measurable when idle. */
        int rc = poll(&pfd, 1, st == UCS_OK ? 10 : 1);
        ticked = rc == 0;
        if (rc < 0 && errno != EINTR) {
            ckpt_error_log("ucx progress thread: poll: %s", strerror(errno));
            poll(NULL, 0, 1);
        }
    }
    return NULL;
}

int ckpt__ucx_progress_start(ckpt__ucx_t *u)
{
    if (!u) return ckpt__error(CKPT_EINVAL, "ucx progress start: NULL");
    if (!u->serving)
        return ckpt__error(CKPT_ESTATE, "ucx progress start: created without progress_thread");
    if (u->thread_running) return CKPT_OK;
    ucs_status_t st = ucp_worker_get_efd(u->worker, &u->efd);
    if (st != UCS_OK)
        return ckpt__error(ucs_to_ckpt(st), "ucx progress start: ucp_worker_get_efd: %s",
                           ucs_status_string(st));
    atomic_store(&u->stop, 0);
    int err = pthread_create(&u->thread, NULL, progress_main, u);
    if (err) return ckpt__error(CKPT_ENOMEM, "ucx progress start: pthread_create: %s", strerror(err));
    u->thread_running = 1;
    return CKPT_OK;
}

void ckpt__ucx_progress_stop(ckpt__ucx_t *u)
{
    if (!u || !u->thread_running) return;
    atomic_store_explicit(&u->stop, 1, memory_order_release);
    ucp_worker_signal(u->worker); /* wakes the poll on the worker fd */
    pthread_join(u->thread, NULL);
    u->thread_running = 0;
}

/* ---- peers ------------------------------------------------------------------------------ */

static void peer_failed_cb(void *arg, ucp_ep_h ep, ucs_status_t status)
{
    (void)ep;
    ckpt__ucx_peer_t *p = arg;
    /* Runs inside ucp_worker_progress; only record: outstanding requests on the endpoint
     * complete with an error status on their own, and the endpoint is closed (forced)
     * by ckpt__ucx_disconnect. */
    if (p->fail_status == UCS_OK) p->fail_status = status;
    ckpt_debug("ucx: peer rank %d failed: %s", p->rank, ucs_status_string(status));
}

int ckpt__ucx_connect(ckpt__ucx_t *u, const void *addr, size_t len, int rank, int peer_errors,
                      ckpt__ucx_peer_t **peer_out)
{
    if (!u || !addr || !len || !peer_out)
        return ckpt__error(CKPT_EINVAL, "ucx connect rank %d: empty address", rank);
    ckpt__ucx_peer_t *p = ckpt__calloc(1, sizeof(*p));
    if (!p) return ckpt__error(CKPT_ENOMEM, "ucx connect rank %d: out of memory", rank);
    p->ucx = u;
    p->rank = rank;
    p->fail_status = UCS_OK;
    const void *ucx_addr = NULL;
    size_t ucx_len = 0;
    int rc = ckpt__ucx_addr_parse(addr, len, rank, &ucx_addr, &ucx_len, &p->pidfd, &p->pid);
    if (rc < 0) {
        ckpt__free(p);
        return rc;
    }
    ucp_ep_params_t ep = {0};
    ep.field_mask = UCP_EP_PARAM_FIELD_REMOTE_ADDRESS | UCP_EP_PARAM_FIELD_ERR_HANDLING_MODE |
                    UCP_EP_PARAM_FIELD_ERR_HANDLER;
    ep.address = ucx_addr;
    /* PEER mode: a dead owner fails our gets (keepalive, connection reset) instead of
     * leaving them pending forever. */
    ep.err_mode = UCP_ERR_HANDLING_MODE_PEER;
    ep.err_handler.cb = peer_failed_cb;
    ep.err_handler.arg = p;
    /* UCX 1.13's shared-memory transports cannot detect a dead peer, so with PEER mode
     * the endpoint is unreachable over shm. Fall back to NONE there: the peer's pidfd
     * (same host, see ucx_addr.c) then tells a dead owner (CKPT_EPEER), and where there
     * is none the batch timeout bounds it (CKPT_ETIMEDOUT). UCX logs the failed
     * selection as an error; it is expected, so silence it for the attempt. */
    ucs_status_t st = UCS_ERR_UNREACHABLE;
    if (peer_errors) {
        ucs_log_level_t saved = ucs_global_opts.log_component.log_level;
        ucs_global_opts.log_component.log_level = UCS_LOG_LEVEL_FATAL;
        st = ucp_ep_create(u->worker, &ep, &p->ep);
        ucs_global_opts.log_component.log_level = saved;
    }
    if (st == UCS_ERR_UNREACHABLE) {
        ep.field_mask &= ~(uint64_t)UCP_EP_PARAM_FIELD_ERR_HANDLER;
        ep.err_mode = UCP_ERR_HANDLING_MODE_NONE;
        st = ucp_ep_create(u->worker, &ep, &p->ep);
        if (st == UCS_OK) {
            p->no_peer_errors = 1;
            if (peer_errors)
                ckpt_debug("ucx connect rank %d: transports lack peer failure detection; a "
                           "dead peer shows %s", rank,
                           p->pidfd >= 0 ? "by its pidfd" : "as a timeout");
        }
    }
    if (st != UCS_OK) {
        if (p->pidfd >= 0) close(p->pidfd);
        ckpt__free(p);
        return ckpt__error(st == UCS_ERR_UNREACHABLE ? CKPT_EPEER : ucs_to_ckpt(st),
                           "ucx connect rank %d: ucp_ep_create: %s", rank, ucs_status_string(st));
    }
    p->next = u->peers;
    u->peers = p;
    *peer_out = p;
    return CKPT_OK;
}

int ckpt__ucx_peer_failed(const ckpt__ucx_peer_t *p)
{
    return p && (p->fail_status != UCS_OK || p->closing || p->exited);
}

/* Starts closing the endpoint; forced means: don't flush, complete outstanding requests
 * with an error now. Callers progress the worker until p->close_req is done. */
void ckpt__ucx_peer_close_start(ckpt__ucx_peer_t *p, int force)
{
    if (p->closing) return;
    p->closing = 1;
    ucp_request_param_t rp = {0};
    rp.op_attr_mask = UCP_OP_ATTR_FIELD_FLAGS;
    rp.flags = force ? UCP_EP_CLOSE_FLAG_FORCE : 0;
    void *req = ucp_ep_close_nbx(p->ep, &rp);
    p->close_req = UCS_PTR_IS_PTR(req) ? req : NULL;
}

void ckpt__ucx_disconnect(ckpt__ucx_peer_t *p, int timeout_ms)
{
    if (!p) return;
    ckpt__ucx_t *u = p->ucx;
    while (p->rkeys) ckpt__ucx_rkey_destroy(p->rkeys);
    ckpt__ucx_peer_close_start(p, p->fail_status != UCS_OK);
    uint64_t deadline = ckpt__now_ns() + (uint64_t)(timeout_ms > 0 ? timeout_ms : 5000) * 1000000u;
    while (p->close_req) {
        ucp_worker_progress(u->worker);
        if (ucp_request_check_status(p->close_req) != UCS_INPROGRESS) {
            ucp_request_free(p->close_req);
            p->close_req = NULL;
        } else if (ckpt__now_ns() > deadline) {
            /* A flush that never ends (peer silent, no error yet): leave the request to the
             * worker's destruction rather than blocking the caller forever. */
            ckpt_warn("ucx: closing the endpoint of rank %d timed out", p->rank);
            break;
        }
    }
    for (ckpt__ucx_peer_t **pp = &u->peers; *pp; pp = &(*pp)->next) {
        if (*pp == p) {
            *pp = p->next;
            break;
        }
    }
    if (p->pidfd >= 0) close(p->pidfd);
    ckpt__free(p);
}

/* ---- remote keys ------------------------------------------------------------------------ */

int ckpt__ucx_rkey_unpack(ckpt__ucx_peer_t *p, const void *packed, size_t len,
                          ckpt__ucx_rkey_t **rkey_out)
{
    if (!p || !packed || !len || !rkey_out)
        return ckpt__error(CKPT_EINVAL, "ucx rkey unpack: empty key");
    ckpt__ucx_rkey_t *r = ckpt__calloc(1, sizeof(*r));
    if (!r) return ckpt__error(CKPT_ENOMEM, "ucx rkey unpack rank %d: out of memory", p->rank);
    ucs_status_t st = ucp_ep_rkey_unpack(p->ep, packed, &r->rkey);
    if (st != UCS_OK) {
        ckpt__free(r);
        return ckpt__error(ucs_to_ckpt(st), "ucx rkey unpack rank %d (%zu bytes): %s", p->rank,
                           len, ucs_status_string(st));
    }
    r->peer = p;
    r->next = p->rkeys;
    p->rkeys = r;
    *rkey_out = r;
    return CKPT_OK;
}

void ckpt__ucx_rkey_destroy(ckpt__ucx_rkey_t *r)
{
    if (!r) return;
    for (ckpt__ucx_rkey_t **pp = &r->peer->rkeys; *pp; pp = &(*pp)->next) {
        if (*pp == r) {
            *pp = r->next;
            break;
        }
    }
    ucp_rkey_destroy(r->rkey);
    ckpt__free(r);
}

int ckpt__ucx_rkey_prefault(ckpt__ucx_rkey_t *r, uint64_t remote_addr, size_t len)
{
    void *p = NULL;
    if (!r || !len || ucp_rkey_ptr(r->rkey, remote_addr, &p) != UCS_OK || !p) return 0;
#ifdef MADV_POPULATE_READ
    uintptr_t start = (uintptr_t)p & ~(uintptr_t)4095;
    if (madvise((void *)start, len + ((uintptr_t)p - start), MADV_POPULATE_READ) == 0) return 1;
    ckpt_debug("ucx prefault of rank %d: madvise: %s", r->peer->rank, strerror(errno));
#endif
    return 0;
}
