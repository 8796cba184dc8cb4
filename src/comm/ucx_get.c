/* The pulling data path: batched, chunked one-sided gets from one or several peers. */
#include <poll.h>

#include "comm/ucx_impl.h"

/* How long a batch polls without progress before it sleeps on the worker's fd. */
#define CKPT__UCX_BATCH_SPIN_NS 50000u

static void get_done_cb(void *request, ucs_status_t status, void *user_data)
{
    (void)request;
    ckpt__ucx_slot_t *s = user_data;
    s->status = status;
    s->done = 1;
}

/* Makes room for max_in_flight slots before the first chunk is posted. */
static int reserve_slots(ckpt__ucx_t *u, size_t want)
{
    if (u->slot_cap >= want) return CKPT_OK;
    ckpt__ucx_slot_t *s = ckpt__calloc(want, sizeof(*s));
    struct pollfd *pfds = ckpt__calloc(want + 1, sizeof(*pfds));
    if (!s || !pfds) {
        ckpt__free(s);
        ckpt__free(pfds);
        return ckpt__error(CKPT_ENOMEM, "ucx get batch: out of memory for %zu slots", want);
    }
    ckpt__free(u->slots);
    ckpt__free(u->pfds);
    u->slots = s;
    u->pfds = pfds;
    u->slot_cap = want;
    return CKPT_OK;
}

static int check_get(const ckpt__ucx_get_t *g, size_t i)
{
    if (!g->peer || !g->rkey || (!g->dst && g->len))
        return ckpt__error(CKPT_EINVAL, "ucx get batch: get %zu lacks peer, rkey or dst", i);
    if (g->rkey->peer != g->peer)
        return ckpt__error(CKPT_EINVAL, "ucx get batch: get %zu: rkey was unpacked for rank %d, "
                           "not rank %d", i, g->rkey->peer->rank, g->peer->rank);
    if (g->remote_addr + g->len < g->remote_addr)
        return ckpt__error(CKPT_EINVAL, "ucx get batch: get %zu: remote range wraps", i);
    return CKPT_OK;
}

/* Sleeps up to 1 ms on the worker's fd (when it can be armed) and, in the same poll, on
 * the pidfds of the peers with chunks outstanding: a peer whose process exits wakes the
 * batch at once, transports that cannot detect it (shared memory) notwithstanding.
 * Returns the first peer found dead, or NULL. */
static ckpt__ucx_peer_t *idle_wait(ckpt__ucx_t *u, size_t nslots)
{
    nfds_t n = 0;
    int armed = u->efd >= 0 && ucp_worker_arm(u->worker) == UCS_OK;
    if (armed) u->pfds[n++] = (struct pollfd){.fd = u->efd, .events = POLLIN};
    const nfds_t first_pid = n;
    for (size_t i = 0; i < nslots; i++) {
        ckpt__ucx_peer_t *p = u->slots[i].req ? u->slots[i].peer : NULL;
        if (!p || p->pidfd < 0 || p->exited) continue;
        nfds_t k = first_pid;
        while (k < n && u->pfds[k].fd != p->pidfd) k++;
        if (k == n) u->pfds[n++] = (struct pollfd){.fd = p->pidfd, .events = POLLIN};
    }
    if (n == 0 || poll(u->pfds, n, armed ? 1 : 0) <= 0) return NULL;
    for (nfds_t k = first_pid; k < n; k++) {
        if (!(u->pfds[k].revents & (POLLIN | POLLHUP))) continue;
        for (size_t i = 0; i < nslots; i++) {
            ckpt__ucx_peer_t *p = u->slots[i].req ? u->slots[i].peer : NULL;
            if (p && p->pidfd == u->pfds[k].fd) {
                ckpt__ucx_peer_mark_exited(p);
                return p;
            }
        }
    }
    return NULL;
}

/* Forces the endpoints that still have chunks outstanding closed, so UCX completes those
 * chunks (with an error) and none can write into dst after we return. */
static void abort_outstanding(ckpt__ucx_t *u, size_t nslots)
{
    for (size_t i = 0; i < nslots; i++) {
        ckpt__ucx_slot_t *s = &u->slots[i];
        if (s->req && !s->peer->closing) ckpt__ucx_peer_close_start(s->peer, 1);
    }
}

int ckpt__ucx_get_batch(ckpt__ucx_t *u, const ckpt__ucx_get_t *gets, size_t n, int max_in_flight,
                        int timeout_ms)
{
    if (!u || (n && !gets)) return ckpt__error(CKPT_EINVAL, "ucx get batch: NULL argument");
    for (size_t i = 0; i < n; i++) {
        int rc = check_get(&gets[i], i);
        if (rc) return rc;
    }
    size_t nslots = (size_t)(max_in_flight > 0 ? max_in_flight : CKPT__UCX_INFLIGHT_DEFAULT);
    int rc = reserve_slots(u, nslots);
    if (rc) return rc;

    const uint64_t t0 = ckpt__now_ns();
    const uint64_t deadline = timeout_ms > 0 ? t0 + (uint64_t)timeout_ms * 1000000u : UINT64_MAX;
    /* Slots are scanned linearly: max_in_flight is small (tens), a scan is cheaper than a
     * free list kept in sync with callbacks. */
    size_t next = 0, active = 0;
    size_t off = 0;     /* offset inside gets[next] of the next chunk to post */
    int aborted = 0;
    uint64_t abort_deadline = 0;
    size_t free_hint = 0;
    uint64_t idle_since = 0;

    for (;;) {
        /* Post chunks while there is room and nothing has failed. */
        while (rc == CKPT_OK && active < nslots && next < n) {
            const ckpt__ucx_get_t *g = &gets[next];
            if (off >= g->len) {
                next++;
                off = 0;
                continue;
            }
            /* Once per range (not per chunk): a poll of the peer's pidfd. */
            if (off == 0) ckpt__ucx_peer_exited(g->peer);
            if (ckpt__ucx_peer_failed(g->peer)) {
                char why[96];
                rc = ckpt__error(CKPT_EPEER, "ucx get from rank %d: %s", g->peer->rank,
                                 ckpt__ucx_peer_fail_text(g->peer, why, sizeof(why)));
                break;
            }
            size_t len = CKPT_MIN(u->chunk, g->len - off);
            while (u->slots[free_hint].req) free_hint = (free_hint + 1) % nslots;
            ckpt__ucx_slot_t *s = &u->slots[free_hint];
            s->done = 0;
            s->status = UCS_OK;
            s->peer = g->peer;
            s->get_index = next;
            ucp_request_param_t rp;
            rp.op_attr_mask = UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_USER_DATA;
            rp.cb.send = get_done_cb;
            rp.user_data = s;
            if (g->local) {
                rp.op_attr_mask |= UCP_OP_ATTR_FIELD_MEMH;
                rp.memh = g->local->memh;
            }
            ucs_status_ptr_t sp = ucp_get_nbx(g->peer->ep, (char *)g->dst + off, len,
                                              g->remote_addr + off, g->rkey->rkey, &rp);
            if (UCS_PTR_IS_ERR(sp)) {
                ucs_status_t st = UCS_PTR_STATUS(sp);
                rc = ckpt__error(g->peer->fail_status != UCS_OK ? CKPT_EPEER : ckpt__ucx_status(st),
                                 "ucx get from rank %d (get %zu, %zu bytes at 0x%llx): %s",
                                 g->peer->rank, next, len,
                                 (unsigned long long)(g->remote_addr + off), ucs_status_string(st));
                break;
            }
            if (sp != NULL) { /* NULL: completed in place, the callback will not run */
                s->req = sp;
                active++;
            }
            off += len;
        }
        if (active == 0 && (rc != CKPT_OK || next >= n)) break;

        ckpt__ucx_peer_t *dead = NULL;
        if (ucp_worker_progress(u->worker)) {
            idle_since = 0;
        } else if (active) {
            /* Nothing moved: after a short spin, sleep until the worker has an event (or
             * 1 ms), so the peer's side of a software-emulated get gets the CPU; and look
             * whether a peer we wait for has died. */
            uint64_t now = ckpt__now_ns();
            if (!idle_since) idle_since = now;
            if (now - idle_since > CKPT__UCX_BATCH_SPIN_NS) {
                dead = idle_wait(u, nslots);
                idle_since = 0;
            }
        }
        if (dead && rc == CKPT_OK)
            rc = ckpt__error(CKPT_EPEER, "ucx get from rank %d: its process (pid %d) exited "
                             "with %zu chunks outstanding", dead->rank, dead->pid, active);

        for (size_t i = 0; i < nslots && active; i++) {
            ckpt__ucx_slot_t *s = &u->slots[i];
            if (!s->req || !s->done) continue;
            if (s->status != UCS_OK && rc == CKPT_OK) {
                const ckpt__ucx_get_t *g = &gets[s->get_index];
                rc = ckpt__error(s->peer->fail_status != UCS_OK ? CKPT_EPEER
                                                                : ckpt__ucx_status(s->status),
                                 "ucx get from rank %d (get %zu, %zu bytes at 0x%llx): %s",
                                 s->peer->rank, s->get_index, g->len,
                                 (unsigned long long)g->remote_addr, ucs_status_string(s->status));
            }
            ucp_request_free(s->req);
            s->req = NULL;
            active--;
        }

        /* A dead process never completes its chunks (shared memory has no error path):
         * abort them now, as at the deadline. */
        if (!aborted && active && (dead || ckpt__now_ns() > deadline)) {
            if (rc == CKPT_OK) {
                ckpt__ucx_peer_t *late = NULL;
                for (size_t i = 0; i < nslots && !late; i++)
                    if (u->slots[i].req) late = u->slots[i].peer;
                rc = ckpt__error(CKPT_ETIMEDOUT,
                                 "ucx get batch: rank %d did not answer within %d ms (%zu chunks "
                                 "outstanding)", late->rank, timeout_ms, active);
            }
            /* A forced close completes PEER-mode chunks at once. Without peer error
             * handling (shm in UCX 1.13) UCX keeps them pending for good, so don't wait
             * long for them: they are abandoned below. */
            uint64_t wait_ns = 200000000ull;
            for (size_t i = 0; i < nslots; i++)
                if (u->slots[i].req && !u->slots[i].peer->no_peer_errors) wait_ns = 5000000000ull;
            abort_outstanding(u, nslots);
            aborted = 1;
            abort_deadline = ckpt__now_ns() + wait_ns;
        } else if (aborted && active && ckpt__now_ns() > abort_deadline) {
            /* UCX still holds requests: keep their slots alive (leak them) so a late
             * callback can never write into memory that is reused. Their data can land
             * in dst only inside a later progress of this worker, and only if the peer
             * is in fact alive; callers treat dst as undefined after a failure. */
            ckpt_debug("ucx get batch: abandoning %zu chunks after abort", active);
            u->slots = NULL;
            u->slot_cap = 0;
            break;
        }
    }
    /* Peers closed by the abort stay in the list, failed; the caller disconnects them. */
    return rc;
}
