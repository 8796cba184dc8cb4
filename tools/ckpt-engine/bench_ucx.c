/* ckpt-engine bench ucx-get: the P2P pull phase against its floor, ucx_perftest's ucp_get
 * bandwidth on the same transport, measured in the same run (a forked server serves a
 * registered buffer; this process pulls it with ckpt__ucx_get_batch). */
#include <stdio.h>

#include "bench.h"

#include <getopt.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include "comm/ucx.h"

typedef struct bench_opts {
    uint64_t size, chunk;
    int inflight, repeat, perftest;
    int reuse; /* read one chunk-sized range over and over, as ucx_perftest does */
    int memfd; /* bit 0: source, bit 1: destination in shared memfd memory, as in the engine */
    const char *tls;
} bench_opts_t;

/* Private anonymous memory, or a shared memfd mapping as the store's pools and the IPC
 * buffers are (shared memory reads and writes are slower than private ones on some VMs). */
static char *alloc_buf(size_t size, int shared)
{
    if (!shared) return malloc(size);
    int fd = memfd_create("bench-ucx", MFD_CLOEXEC);
    if (fd < 0 || ftruncate(fd, (off_t)size) != 0) return NULL;
    void *p = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    close(fd);
    return p == MAP_FAILED ? NULL : p;
}

static void free_buf(char *p, size_t size, int shared)
{
    if (p && shared) munmap(p, size);
    else free(p);
}

static int xfer(int fd, void *p, size_t n, int out)
{
    for (char *c = p; n;) {
        ssize_t k = out ? write(fd, c, n) : read(fd, c, n);
        if (k <= 0) return -1;
        c += k, n -= (size_t)k;
    }
    return 0;
}

/* Server: register a filled buffer, serve it from the progress thread until the parent
 * closes the socket. Sends {status, addr_len, rkey_len, base} then addr, rkey. */
static int serve(int fd, const bench_opts_t *o)
{
    ckpt__ucx_options_t uo = CKPT__UCX_OPTIONS_INIT;
    uo.progress_thread = 1;
    ckpt__ucx_t *u = NULL;
    ckpt__ucx_mem_t *mem = NULL;
    const void *addr = NULL;
    void *rkey = NULL;
    size_t alen = 0, rlen = 0;
    /* --memfd src: memory of our own, registered; otherwise UCX's shared memory, as the
     * engine's pools are (plain malloc memory when UCX has no shared allocation). */
    char *buf = NULL;
    uo.shared_alloc = !(o->memfd & 1);
    int rc = ckpt__ucx_create(&uo, &u), sfd = -1;
    if (!rc && uo.shared_alloc && ckpt__ucx_mem_alloc_shared(u, o->size, &mem, &sfd) == CKPT_OK) {
        buf = ckpt__ucx_mem_base(mem);
        close(sfd);
    }
    int own = buf == NULL;
    if (!rc && own) {
        buf = alloc_buf(o->size, o->memfd & 1);
        rc = buf ? ckpt__ucx_mem_register(u, buf, o->size, &mem) : CKPT_ENOMEM;
    }
    if (!rc) memset(buf, 0x5c, o->size); /* touch every page before serving */
    if (!rc) rc = ckpt__ucx_rkey_pack(u, mem, &rkey, &rlen);
    if (!rc) rc = ckpt__ucx_address(u, &addr, &alen);
    if (!rc) rc = ckpt__ucx_progress_start(u);
    if (rc) fprintf(stderr, "bench ucx-get server: %s\n", ckpt_last_error());
    uint64_t hdr[4] = {(uint64_t)(int64_t)rc, alen, rlen, (uint64_t)(uintptr_t)buf};
    xfer(fd, hdr, sizeof(hdr), 1);
    if (!rc) {
        xfer(fd, (void *)addr, alen, 1);
        xfer(fd, rkey, rlen, 1);
        char c;
        xfer(fd, &c, 1, 0); /* returns at EOF: the parent is done */
    }
    ckpt__free(rkey);
    ckpt__ucx_destroy(u);
    if (own) free_buf(buf, o->size, o->memfd & 1);
    return rc ? 1 : 0;
}

/* Median GB/s (1e9 bytes/s) of o->repeat pulls of the whole buffer, after one warm-up. */
static int pull(const bench_opts_t *o, double *gbps_out)
{
    int sv[2], rc = 1;
    if (socketpair(AF_UNIX, SOCK_STREAM, 0, sv)) return 1;
    fflush(NULL);
    pid_t pid = fork();
    if (pid == 0) {
        close(sv[0]);
        _exit(serve(sv[1], o));
    }
    close(sv[1]);
    ckpt__ucx_t *u = NULL;
    ckpt__ucx_peer_t *peer = NULL;
    ckpt__ucx_rkey_t *rkey = NULL;
    ckpt__ucx_mem_t *local = NULL;
    uint64_t hdr[4];
    char *addr = NULL, *packed = NULL, *dst = NULL;
    double *gbps = calloc((size_t)o->repeat, sizeof(double));
    if (xfer(sv[0], hdr, sizeof(hdr), 0) || hdr[0]) goto done;
    addr = malloc(hdr[1]);
    packed = malloc(hdr[2]);
    if (xfer(sv[0], addr, hdr[1], 0) || xfer(sv[0], packed, hdr[2], 0)) goto done;
    ckpt__ucx_options_t uo = CKPT__UCX_OPTIONS_INIT;
    uo.chunk_size = o->chunk;
    dst = alloc_buf(o->size, o->memfd & 2);
    if (!dst) goto done;
    memset(dst, 0, o->size);
    if (ckpt__ucx_create(&uo, &u) || ckpt__ucx_connect(u, addr, hdr[1], 0, 0, &peer) ||
        ckpt__ucx_rkey_unpack(peer, packed, hdr[2], &rkey) ||
        ckpt__ucx_mem_register(u, dst, o->size, &local)) {
        fprintf(stderr, "bench ucx-get: %s\n", ckpt_last_error());
        goto done;
    }
    /* --reuse: size/chunk gets of the first chunk, so source and destination stay in the
     * cache exactly as in ucx_perftest (one message buffer on each side); otherwise one
     * get of the whole buffer, which streams from memory as a real pull does. */
    size_t ngets = o->reuse ? (size_t)CKPT_MAX(o->size / o->chunk, 1) : 1;
    ckpt__ucx_get_t *g = calloc(ngets, sizeof(*g));
    for (size_t i = 0; i < ngets; i++)
        g[i] = (ckpt__ucx_get_t){peer, rkey, hdr[3], dst, o->reuse ? o->chunk : o->size, local};
    for (int i = -1; i < o->repeat; i++) {
        uint64_t t0 = ckpt__now_ns();
        if (ckpt__ucx_get_batch(u, g, ngets, o->inflight, 120000)) {
            fprintf(stderr, "bench ucx-get: %s\n", ckpt_last_error());
            free(g);
            goto done;
        }
        if (i >= 0) gbps[i] = (double)(ngets * g[0].len) / (double)(ckpt__now_ns() - t0);
    }
    free(g);
    if (dst[0] != 0x5c || dst[(o->reuse ? CKPT_MIN(o->chunk, o->size) : o->size) - 1] != 0x5c) {
        fprintf(stderr, "bench ucx-get: pulled bytes are wrong\n");
        goto done;
    }
    *gbps_out = bench_median(gbps, o->repeat);
    rc = 0;
done:
    if (peer) ckpt__ucx_disconnect(peer, 2000);
    ckpt__ucx_destroy(u);
    close(sv[0]);
    waitpid(pid, NULL, 0);
    free(addr), free(packed), free(gbps);
    free_buf(dst, o->size, o->memfd & 2);
    return rc;
}

static int free_port(void)
{
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t len = sizeof(a);
    int fd = socket(AF_INET, SOCK_STREAM, 0), port = -1;
    if (fd >= 0 && bind(fd, (struct sockaddr *)&a, sizeof(a)) == 0 &&
        getsockname(fd, (struct sockaddr *)&a, &len) == 0)
        port = ntohs(a.sin_port);
    if (fd >= 0) close(fd);
    return port;
}

/* One ucx_perftest ucp_get run (server + client on localhost, message = our chunk size,
 * the same bytes in total); returns its overall bandwidth in GB/s, or < 0. */
static double perftest_once(const bench_opts_t *o)
{
    return bench_ucx_perftest(o->chunk, o->size);
}

double bench_ucx_perftest(uint64_t chunk, uint64_t size)
{
    int port = free_port();
    char portbuf[16], sizebuf[32], itbuf[32], cmd[256];
    uint64_t iters = CKPT_MAX(size / chunk, 16);
    snprintf(portbuf, sizeof(portbuf), "%d", port);
    fflush(NULL);
    pid_t srv = fork();
    if (srv == 0) {
        freopen("/dev/null", "w", stdout);
        execlp("ucx_perftest", "ucx_perftest", "-p", portbuf, (char *)NULL);
        _exit(127);
    }
    snprintf(sizebuf, sizeof(sizebuf), "%llu", (unsigned long long)chunk);
    snprintf(itbuf, sizeof(itbuf), "%llu", (unsigned long long)iters);
    snprintf(cmd, sizeof(cmd), "ucx_perftest localhost -p %s -t ucp_get -s %s -n %s -w 16 2>&1",
             portbuf, sizebuf, itbuf);
    double mbps = -1;
    /* The server may not listen yet: the client then fails at once; try again. */
    for (int attempt = 0; attempt < 50 && mbps < 0; attempt++) {
        FILE *p = popen(cmd, "r");
        char line[512];
        while (p && fgets(line, sizeof(line), p)) {
            double f[5];
            /* "Final: iters lat50 lat_avg lat_overall bw_avg bw_overall ..." (MB/s = 2^20) */
            if (sscanf(line, " Final: %lf %lf %lf %lf %lf %lf", &f[0], &f[1], &f[2], &f[3], &f[4],
                       &mbps) != 6)
                mbps = -1;
            else
                break;
        }
        if (p) pclose(p);
        if (mbps < 0) usleep(100000);
    }
    kill(srv, SIGTERM);
    waitpid(srv, NULL, 0);
    return mbps < 0 ? -1 : mbps * 1048576.0 / 1e9;
}

double bench_ucx_perftest_busy(uint64_t chunk, uint64_t size, int busy)
{
    pid_t pids[64];
    int n = 0;
    fflush(NULL);
    for (; n < busy && n < 64; n++) {
        pids[n] = fork();
        if (pids[n] == 0) {
            size_t len = 64u << 20;
            char *a = malloc(len), *b = malloc(len);
            if (!a || !b) _exit(1);
            memset(a, 1, len);
            for (;;) {
                memcpy(b, a, len);
                __asm__ volatile("" ::"r"(b) : "memory"); /* keep the copy */
            }
        }
        if (pids[n] < 0) break;
    }
    double gbps = bench_ucx_perftest(chunk, size);
    for (int i = 0; i < n; i++) kill(pids[i], SIGKILL);
    for (int i = 0; i < n; i++) waitpid(pids[i], NULL, 0);
    return gbps;
}

static void usage(void)
{
    fprintf(stderr,
            "usage: ckpt-engine bench ucx-get [--size BYTES] [--chunk BYTES] [--inflight N]\n"
            "                                 [--tls shm|tcp|UCX_TLS] [--repeat N] [--no-perftest]\n"
            "                                 [--reuse] [--memfd src|dst|both]\n"
            "Pulls --size (default 1GiB) from a forked server with our batched UCX gets and\n"
            "compares with `ucx_perftest -t ucp_get` on the same transport. --reuse reads one\n"
            "chunk over and over, as ucx_perftest does (cache-resident, like for like).\n"
            "The source is UCX-allocated shared memory, as the engine's pools are (falls\n"
            "back to malloc when UCX cannot allocate shared memory); --memfd src serves a\n"
            "memfd of our own registered with UCX instead, --memfd dst pulls into one.\n");
}

int bench_ucx_get(int argc, char **argv)
{
    bench_opts_t o = {1ull << 30, CKPT__UCX_CHUNK_DEFAULT, CKPT__UCX_INFLIGHT_DEFAULT, 5, 1, 0, 0, NULL};
    static const struct option longopts[] = {
        {"size", required_argument, NULL, 's'},   {"chunk", required_argument, NULL, 'c'},
        {"inflight", required_argument, NULL, 'i'}, {"tls", required_argument, NULL, 't'},
        {"repeat", required_argument, NULL, 'r'}, {"no-perftest", no_argument, NULL, 'n'},
        {"reuse", no_argument, NULL, 'u'},        {"memfd", required_argument, NULL, 'm'},
        {"help", no_argument, NULL, 'h'},
        {NULL, 0, NULL, 0}};
    int c;
    optind = 1;
    while ((c = getopt_long(argc, argv, "s:c:i:t:r:num:h", longopts, NULL)) != -1) {
        switch (c) {
        case 's':
        case 'c':
            if (ckpt_parse_size(optarg, c == 's' ? &o.size : &o.chunk)) {
                fprintf(stderr, "bench ucx-get: %s\n", ckpt_last_error());
                return 2;
            }
            break;
        case 'i': o.inflight = atoi(optarg); break;
        case 't': o.tls = optarg; break;
        case 'r': o.repeat = atoi(optarg); break;
        case 'n': o.perftest = 0; break;
        case 'u': o.reuse = 1; break;
        case 'm':
            o.memfd = !strcmp(optarg, "src") ? 1 : !strcmp(optarg, "dst") ? 2 : !strcmp(optarg, "both") ? 3 : -1;
            if (o.memfd < 0) {
                fprintf(stderr, "bench ucx-get: --memfd takes src, dst or both, not '%s'\n", optarg);
                return 2;
            }
            break;
        default: usage(); return c == 'h' ? 0 : 2;
        }
    }
    if (o.size == 0 || o.chunk == 0 || o.inflight <= 0 || o.repeat <= 0) {
        usage();
        return 2;
    }
    if (o.tls) /* set before any ucp_init here, in the server and in ucx_perftest */
        setenv("UCX_TLS", !strcmp(o.tls, "shm") ? "shm,self" : !strcmp(o.tls, "tcp") ? "tcp,self" : o.tls, 1);
    const char *tls = getenv("UCX_TLS") ? getenv("UCX_TLS") : "(default)";
    char sz[32], ch[32];
    printf("ucx-get: UCX_TLS=%s size %s chunk %s in-flight %d repeat %d%s\n", tls,
           ckpt_format_size(o.size, sz, sizeof(sz)), ckpt_format_size(o.chunk, ch, sizeof(ch)),
           o.inflight, o.repeat, o.reuse ? " reuse" : "");
    double ours = 0;
    if (pull(&o, &ours)) return 1;
    printf("ours      %8.2f GB/s (median)\n", ours);
    if (!o.perftest) return 0;
    double pt[5];
    int npt = o.repeat < 5 ? o.repeat : 5;
    for (int i = 0; i < npt; i++) {
        if ((pt[i] = perftest_once(&o)) < 0) {
            fprintf(stderr, "bench ucx-get: ucx_perftest gave no result (is ucx-utils installed?)\n");
            return 1;
        }
    }
    double floor = bench_median(pt, npt);
    printf("perftest  %8.2f GB/s (median of %d, ucp_get -s %llu)\n", floor, npt,
           (unsigned long long)o.chunk);
    printf("ratio     %8.2f\n", ours / floor);
    return 0;
}
