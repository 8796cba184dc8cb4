/* UCX one-sided layer with real processes: forked servers register and serve a buffer,
 * this process pulls it with batched gets, over shared memory and over TCP. */
#include "test.h"

#include <fcntl.h>
#include <pthread.h>
#include <sys/mman.h>
#include <signal.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "comm/ucx.h"

typedef struct server {
    pid_t pid;
    int fd;
    void *addr;
    size_t addr_len;
    void *rkey;
    size_t rkey_len;
    uint64_t base;
    uint64_t size;
} server_t;

static int write_all(int fd, const void *p, size_t n)
{
    for (const char *c = p; n;) {
        ssize_t w = write(fd, c, n);
        if (w <= 0) return -1;
        c += w, n -= (size_t)w;
    }
    return 0;
}

static int read_all(int fd, void *p, size_t n)
{
    for (char *c = p; n;) {
        ssize_t r = read(fd, c, n);
        if (r <= 0) return -1;
        c += r, n -= (size_t)r;
    }
    return 0;
}

static uint8_t pattern(uint64_t i, int seed) { return (uint8_t)((i * 2654435761u) >> 13) ^ (uint8_t)seed; }

/* Server process: fill, register, publish, serve until told to quit. shared: the buffer
 * comes from UCX's shared memory as the engine's pools do (malloc where UCX has none). */
static int server_main(int fd, size_t size, int seed, int shared)
{
    ckpt__ucx_options_t o = CKPT__UCX_OPTIONS_INIT;
    o.progress_thread = 1;
    o.shared_alloc = shared;
    ckpt__ucx_t *u = NULL;
    ckpt__ucx_mem_t *mem = NULL;
    const void *addr;
    size_t addr_len, rkey_len;
    void *rkey = NULL;
    uint8_t *buf = NULL, *own = NULL;
    int rc = ckpt__ucx_create(&o, &u), sfd = -1;
    if (!rc && shared && ckpt__ucx_mem_alloc_shared(u, size, &mem, &sfd) == CKPT_OK) {
        buf = ckpt__ucx_mem_base(mem);
        close(sfd);
    } else if (!rc) {
        buf = own = malloc(size);
        if (!buf) return 1;
        rc = ckpt__ucx_mem_register(u, buf, size, &mem);
    }
    if (!rc)
        for (size_t i = 0; i < size; i++) buf[i] = pattern(i, seed);
    if (!rc) rc = ckpt__ucx_rkey_pack(u, mem, &rkey, &rkey_len);
    if (!rc) rc = ckpt__ucx_address(u, &addr, &addr_len);
    if (!rc) rc = ckpt__ucx_progress_start(u);
    int32_t status = rc;
    write_all(fd, &status, sizeof(status));
    if (rc) {
        fprintf(stderr, "server: %s\n", ckpt_last_error());
        return 1;
    }
    uint64_t hdr[4] = {addr_len, rkey_len, (uint64_t)(uintptr_t)buf, size};
    write_all(fd, hdr, sizeof(hdr));
    write_all(fd, addr, addr_len);
    write_all(fd, rkey, rkey_len);
    for (;;) {
        char cmd;
        if (read_all(fd, &cmd, 1)) break;
        if (cmd == 'I') { /* CPU seconds all our threads use over one idle second */
            struct rusage a, b;
            getrusage(RUSAGE_SELF, &a);
            struct timespec ts = {1, 0};
            nanosleep(&ts, NULL);
            getrusage(RUSAGE_SELF, &b);
            double cpu = (double)(b.ru_utime.tv_sec - a.ru_utime.tv_sec) +
                         (double)(b.ru_stime.tv_sec - a.ru_stime.tv_sec) +
                         (double)(b.ru_utime.tv_usec - a.ru_utime.tv_usec) / 1e6 +
                         (double)(b.ru_stime.tv_usec - a.ru_stime.tv_usec) / 1e6;
            write_all(fd, &cpu, sizeof(cpu));
        } else {
            break;
        }
    }
    ckpt__free(rkey);
    ckpt__ucx_destroy(u);
    free(own);
    return 0;
}

static int server_start(server_t *s, size_t size, int seed, int shared)
{
    int sv[2];
    memset(s, 0, sizeof(*s));
    if (socketpair(AF_UNIX, SOCK_STREAM, 0, sv)) return -1;
    fflush(NULL);
    pid_t pid = fork();
    if (pid < 0) return -1;
    if (pid == 0) {
        close(sv[0]);
        _exit(server_main(sv[1], size, seed, shared));
    }
    close(sv[1]);
    s->pid = pid;
    s->fd = sv[0];
    int32_t status;
    uint64_t hdr[4];
    if (read_all(s->fd, &status, sizeof(status)) || status) return status ? status : -1;
    if (read_all(s->fd, hdr, sizeof(hdr))) return -1;
    s->addr_len = hdr[0], s->rkey_len = hdr[1], s->base = hdr[2], s->size = hdr[3];
    s->addr = malloc(s->addr_len);
    s->rkey = malloc(s->rkey_len);
    if (read_all(s->fd, s->addr, s->addr_len) || read_all(s->fd, s->rkey, s->rkey_len)) return -1;
    return 0;
}

static void server_stop(server_t *s)
{
    if (s->pid > 0) {
        write_all(s->fd, "Q", 1);
        int st;
        waitpid(s->pid, &st, 0);
    }
    if (s->fd > 0) close(s->fd);
    free(s->addr);
    free(s->rkey);
    memset(s, 0, sizeof(*s));
}

/* Two servers, three ranges each (odd sizes and offsets), small chunks so that ranges
 * split and chunks of both peers are in flight together. */
static void test_pull_two_peers(void)
{
    enum { NPEER = 2 };
    server_t s[NPEER];
    ckpt__ucx_t *u = NULL;
    ckpt__ucx_peer_t *peer[NPEER] = {0};
    ckpt__ucx_rkey_t *rkey[NPEER] = {0};
    ckpt__ucx_mem_t *local = NULL;
    const size_t size = (24u << 20) + 4099;
    /* Peer 0 serves memory of its own, registered; peer 1 memory UCX allocated. */
    for (int i = 0; i < NPEER; i++) CHECK(server_start(&s[i], size, 17 + i, i == 1) == 0);
    ckpt__ucx_options_t o = CKPT__UCX_OPTIONS_INIT;
    o.chunk_size = 1u << 20;
    CHECK_OK(ckpt__ucx_create(&o, &u));
    uint8_t *dst = calloc(NPEER, size);
    CHECK_OK(ckpt__ucx_mem_register(u, dst, NPEER * size, &local));
    ckpt__ucx_get_t gets[NPEER * 3];
    size_t cut[4] = {0, 1000, (9u << 20) + 7, size};
    for (int i = 0; i < NPEER; i++) {
        CHECK_OK(ckpt__ucx_connect(u, s[i].addr, s[i].addr_len, i, i == 0, &peer[i]));
        CHECK_OK(ckpt__ucx_rkey_unpack(peer[i], s[i].rkey, s[i].rkey_len, &rkey[i]));
        for (int k = 0; k < 3; k++) {
            /* interleave peers: get order 0,1,0,1,... */
            ckpt__ucx_get_t *g = &gets[k * NPEER + i];
            g->peer = peer[i];
            g->rkey = rkey[i];
            g->remote_addr = s[i].base + cut[k];
            g->dst = dst + (size_t)i * size + cut[k];
            g->len = cut[k + 1] - cut[k];
            g->local = local;
        }
    }
    CHECK_OK(ckpt__ucx_get_batch(u, gets, NPEER * 3, 6, 20000));
    for (int i = 0; i < NPEER; i++) {
        size_t bad = size;
        for (size_t b = 0; b < size; b++)
            if (dst[(size_t)i * size + b] != pattern(b, 17 + i)) {
                bad = b;
                break;
            }
        if (bad != size) fprintf(stderr, "peer %d: first wrong byte at %zu\n", i, bad);
        CHECK(bad == size);
    }
    /* A mismatched rkey is refused before anything is posted. */
    ckpt__ucx_get_t wrong = gets[0];
    wrong.rkey = rkey[1];
    CHECK_RC(ckpt__ucx_get_batch(u, &wrong, 1, 4, 1000), CKPT_EINVAL);
    CHECK_ERR_HAS("rank 1");

    /* The serving progress thread sleeps when idle. */
    double cpu = 1;
    write_all(s[0].fd, "I", 1);
    CHECK(read_all(s[0].fd, &cpu, sizeof(cpu)) == 0);
    fprintf(stderr, "  idle server used %.3f CPU s over 1 s\n", cpu);
    CHECK(cpu < 0.1);

    for (int i = 0; i < NPEER; i++) ckpt__ucx_disconnect(peer[i], 2000);
    ckpt__ucx_mem_unregister(u, local);
    ckpt__ucx_destroy(u);
    for (int i = 0; i < NPEER; i++) server_stop(&s[i]);
    free(dst);
}

/* UCX-allocated shared memory comes with an fd mapping the same pages (what the store
 * hands to workers), is found again by its base, and is refused cleanly where the context
 * was not made for it. */
static void test_shared_alloc(void)
{
    ckpt__ucx_options_t o = CKPT__UCX_OPTIONS_INIT;
    o.shared_alloc = 1;
    ckpt__ucx_t *u = NULL;
    ckpt__ucx_mem_t *mem = NULL;
    int fd = -1;
    const size_t size = (3u << 20) + 12345;
    CHECK_OK(ckpt__ucx_create(&o, &u));
    int rc = ckpt__ucx_mem_alloc_shared(u, size, &mem, &fd);
    /* Over shared memory it must work (it is what P2P pulls rely on); UCX_TLS=tcp,self
     * loads no shared-memory allocator, and the engine then falls back to memfds. */
    const char *tls = getenv("UCX_TLS");
    if (tls && strstr(tls, "shm")) CHECK_OK(rc);
    if (rc == CKPT_EUNSUPPORTED) {
        fprintf(stderr, "  no UCX shared allocation here: %s\n", ckpt_last_error());
        CHECK_ERR_HAS("ucx mem alloc");
    } else {
        CHECK_OK(rc);
        uint8_t *base = rc == CKPT_OK ? ckpt__ucx_mem_base(mem) : NULL;
        CHECK(base != NULL && fd >= 0);
        if (!base) {
            ckpt__ucx_destroy(u);
            return;
        }
        CHECK(ckpt__ucx_mem_find_allocated(u, base) == mem);
        CHECK(ckpt__ucx_mem_find_allocated(u, base + 4096) == NULL);
        for (size_t i = 0; i < size; i += 4096) base[i] = pattern(i, 9);
        uint8_t *view = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
        CHECK(view != MAP_FAILED);
        size_t bad = size;
        for (size_t i = 0; view != MAP_FAILED && i < size && bad == size; i += 4096)
            if (view[i] != pattern(i, 9)) bad = i;
        CHECK(bad == size);
        if (view != MAP_FAILED) {
            view[size - 1] = 0xa5; /* and the other way round */
            CHECK(base[size - 1] == 0xa5);
            munmap(view, size);
        }
        CHECK(fcntl(fd, F_GETFD) & FD_CLOEXEC);
        close(fd);
        ckpt__ucx_mem_unregister(u, mem);
        CHECK(ckpt__ucx_mem_find_allocated(u, base) == NULL);
    }
    ckpt__ucx_destroy(u);
    /* A context made without shared_alloc refuses, naming why. */
    CHECK_OK(ckpt__ucx_create(NULL, &u));
    CHECK_RC(ckpt__ucx_mem_alloc_shared(u, size, &mem, &fd), CKPT_EUNSUPPORTED);
    CHECK_ERR_HAS("shared_alloc");
    ckpt__ucx_destroy(u);
}

typedef struct killer {
    pid_t pid;
    int delay_ms;
} killer_t;

static void *killer_main(void *arg)
{
    killer_t *k = arg;
    struct timespec ts = {0, (long)k->delay_ms * 1000000L};
    nanosleep(&ts, NULL);
    kill(k->pid, SIGKILL);
    return NULL;
}

/* The server dies mid-transfer: the batch fails with EPEER naming the rank, well before
 * its timeout, over every transport. Shared memory in UCX 1.13 cannot detect a dead peer
 * (the endpoint falls back to no error handling), so there it is the peer's pidfd that
 * tells (ucx_addr.c); without it the batch would end in CKPT_ETIMEDOUT. */
static void test_peer_killed(void)
{
    server_t s;
    ckpt__ucx_t *u = NULL;
    ckpt__ucx_peer_t *peer = NULL;
    ckpt__ucx_rkey_t *rkey = NULL;
    const size_t size = 32u << 20;
    CHECK(server_start(&s, size, 3, 0) == 0);
    ckpt__ucx_options_t o = CKPT__UCX_OPTIONS_INIT;
    o.chunk_size = 256u << 10;
    CHECK_OK(ckpt__ucx_create(&o, &u));
    CHECK_OK(ckpt__ucx_connect(u, s.addr, s.addr_len, 5, 1, &peer));
    CHECK_OK(ckpt__ucx_rkey_unpack(peer, s.rkey, s.rkey_len, &rkey));
    uint8_t *dst = malloc(size);
    /* Far more bytes than can move before the kill: the same range, many times. */
    enum { REPEAT = 512 };
    static ckpt__ucx_get_t gets[REPEAT];
    for (int i = 0; i < REPEAT; i++)
        gets[i] = (ckpt__ucx_get_t){peer, rkey, s.base, dst, size, NULL};
    killer_t k = {s.pid, 50};
    pthread_t th;
    pthread_create(&th, NULL, killer_main, &k);
    const int timeout_ms = 3000;
    uint64_t t0 = ckpt__now_ns();
    int rc = ckpt__ucx_get_batch(u, gets, REPEAT, 8, timeout_ms);
    double took = (double)(ckpt__now_ns() - t0) / 1e9;
    pthread_join(th, NULL);
    fprintf(stderr, "  killed peer: %s after %.2f s: %s\n", ckpt_status_name(rc), took,
            ckpt_last_error());
    CHECK_RC(rc, CKPT_EPEER);
    CHECK_ERR_HAS("rank 5");
    CHECK(took < timeout_ms / 1000.0);
    CHECK(ckpt__ucx_peer_failed(peer));
    /* Later batches on the dead peer fail at once. */
    CHECK_RC(ckpt__ucx_get_batch(u, gets, 1, 8, timeout_ms), CKPT_EPEER);
    CHECK_ERR_HAS("rank 5");
    ckpt__ucx_disconnect(peer, 1000);
    int st;
    waitpid(s.pid, &st, 0);
    /* Connecting to the address of a process that is gone is refused there, by name. */
    ckpt__ucx_peer_t *late = NULL;
    CHECK_RC(ckpt__ucx_connect(u, s.addr, s.addr_len, 6, 1, &late), CKPT_EPEER);
    CHECK_ERR_HAS("rank 6");
    CHECK_ERR_HAS("has exited");
    ckpt__ucx_destroy(u);
    s.pid = 0;
    server_stop(&s);
    free(dst);
}

/* A peer that is alive but does not answer (stopped) is a timeout, not a dead peer: the
 * batch ends at its deadline with CKPT_ETIMEDOUT naming the rank. */
static void test_peer_stalled(void)
{
    server_t s;
    ckpt__ucx_t *u = NULL;
    ckpt__ucx_peer_t *peer = NULL;
    ckpt__ucx_rkey_t *rkey = NULL;
    const size_t size = 8u << 20;
    CHECK(server_start(&s, size, 4, 0) == 0);
    ckpt__ucx_options_t o = CKPT__UCX_OPTIONS_INIT;
    o.chunk_size = 256u << 10;
    CHECK_OK(ckpt__ucx_create(&o, &u));
    CHECK_OK(ckpt__ucx_connect(u, s.addr, s.addr_len, 7, 1, &peer));
    CHECK_OK(ckpt__ucx_rkey_unpack(peer, s.rkey, s.rkey_len, &rkey));
    uint8_t *dst = malloc(size);
    ckpt__ucx_get_t g = {peer, rkey, s.base, dst, size, NULL};
    kill(s.pid, SIGSTOP);
    const int timeout_ms = 1000;
    uint64_t t0 = ckpt__now_ns();
    int rc = ckpt__ucx_get_batch(u, &g, 1, 8, timeout_ms);
    double took = (double)(ckpt__now_ns() - t0) / 1e9;
    fprintf(stderr, "  stopped peer: %s after %.2f s: %s\n", ckpt_status_name(rc), took,
            ckpt_last_error());
    CHECK_RC(rc, CKPT_ETIMEDOUT);
    CHECK_ERR_HAS("rank 7 did not answer");
    CHECK(took >= timeout_ms / 1000.0 && took < timeout_ms / 1000.0 + 6);
    ckpt__ucx_disconnect(peer, 1000);
    ckpt__ucx_destroy(u);
    /* Resumed, the server would find our endpoint gone and UCX complains loudly: it has
     * served its purpose, so it goes without resuming. */
    kill(s.pid, SIGKILL);
    int st;
    waitpid(s.pid, &st, 0);
    s.pid = 0;
    server_stop(&s);
    free(dst);
}

/* Runs the tests for one transport selection in a child, so UCX_TLS is read fresh by
 * every ucp_init. Returns 0 pass, 1 fail. Both selections are what the engine runs on
 * (shared memory on one host, TCP across hosts), so one that cannot start is a failure. */
static int run_for_tls(const char *label, const char *tls)
{
    fflush(NULL);
    pid_t pid = fork();
    if (pid == 0) {
        setenv("UCX_TLS", tls, 1);
        /* Let a dead shared-memory peer be noticed in about a second, not the default 20. */
        setenv("UCX_KEEPALIVE_INTERVAL", "200ms", 0);
        ckpt__ucx_t *probe = NULL;
        if (ckpt__ucx_create(NULL, &probe)) {
            fprintf(stderr, "FAIL: UCX over %s (UCX_TLS=%s) cannot start: %s\n", label, tls,
                    ckpt_last_error());
            _exit(1);
        }
        ckpt__ucx_destroy(probe);
        fprintf(stderr, "== %s (UCX_TLS=%s)\n", label, tls);
        RUN_TEST(test_shared_alloc);
        RUN_TEST(test_pull_two_peers);
        RUN_TEST(test_peer_killed);
        RUN_TEST(test_peer_stalled);
        _exit(test__failures ? 1 : 0);
    }
    int st = 0;
    waitpid(pid, &st, 0);
    if (!WIFEXITED(st)) return 1;
    return WEXITSTATUS(st);
}

int main(void)
{
    signal(SIGPIPE, SIG_IGN);
    int shm = run_for_tls("shared memory", "shm,self");
    int tcp = run_for_tls("tcp", "tcp,self");
    return shm == 0 && tcp == 0 ? 0 : 1;
}
