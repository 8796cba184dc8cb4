/* Engine <-> worker protocol with real processes: the parent is the engine (sender API),
 * forked children are workers (receiver API); the IPC buffers are memfds the parent fills. */
#include <dirent.h>
#include <errno.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "ckpt/receiver.h"
#include "core/internal.h"
#include "ipc/sender.h"
#include "ipc/wire.h"
#include "test.h"

#define BUF_SIZE (64 * 1024)
#define NTENS 3

enum { W_NORMAL, W_FAIL, W_STALL, W_EXPECT_ABORT };

static char sock_path[108];
static int buf_fd[2] = {-1, -1};
static uint8_t *buf_map[2];

static double now_ms(void) { return (double)ckpt__now_ns() / 1e6; }

/* ---- the worker (child) ---- */

/* Runs `updates` updates; mode applies to bucket `arg`. Exit status 0 = behaved as expected. */
static int worker_main(int mode, uint32_t arg, int updates)
{
    ckpt_receiver_t *r;
    ckpt_update_info_t info;
    if (ckpt_receiver_connect(sock_path, 5000, &r) != 0) return 10;
    for (int u = 0; u < updates; u++) {
        if (ckpt_receiver_wait_update(r, 10000, &info) != 0) return 11;
        uint32_t seen = 0;
        for (;;) {
            int ev;
            uint32_t b;
            const ckpt_tensor_view_t *v;
            size_t n;
            if (ckpt_receiver_next(r, 10000, &ev, &b, &v, &n) != 0) return 12;
            if (ev == CKPT_RECV_BUCKET) {
                if (b == arg && mode == W_STALL) pause();
                if (b == arg && mode == W_FAIL) {
                    ckpt_receiver_fail(r, "injected failure");
                    continue;
                }
                int bad = 0;
                for (size_t i = 0; i < n && !bad; i++) {
                    if (ckpt_receiver_verify(&v[i]) != 0) {
                        ckpt_receiver_fail_status(r, CKPT_ECHECKSUM, ckpt_last_error());
                        bad = 1;
                    }
                }
                if (!bad) ckpt_receiver_ack(r);
                seen++;
            } else if (ev == CKPT_RECV_FINISH) {
                if (ckpt_receiver_finish_reply(r, 1, NULL) != 0) return 13;
                int done = 0;
                if (ckpt_receiver_last_update(r, &info, &done) != 0 || !done) return 14;
                if (seen != info.nbuckets) return 15;
                break;
            } else {
                int done = 1;
                ckpt_receiver_last_update(r, &info, &done);
                if (done || strstr(ckpt_receiver_reason(r), "engine says no") == NULL) return 16;
                break;
            }
        }
    }
    ckpt_receiver_close(r);
    return 0;
}

static pid_t spawn_worker(int mode, uint32_t arg, int updates)
{
    fflush(stderr);
    pid_t pid = fork();
    if (pid == 0) _exit(worker_main(mode, arg, updates));
    return pid;
}

static int reap(pid_t pid)
{
    int st;
    if (waitpid(pid, &st, 0) != pid) return -1;
    return WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
}

/* ---- the engine (parent) ---- */

static void setup_buffers(void)
{
    for (int i = 0; i < 2; i++) {
        buf_fd[i] = memfd_create("ckpt-test-buf", MFD_CLOEXEC);
        CHECK(buf_fd[i] >= 0 && ftruncate(buf_fd[i], BUF_SIZE) == 0);
        buf_map[i] = mmap(NULL, BUF_SIZE, PROT_READ | PROT_WRITE, MAP_SHARED, buf_fd[i], 0);
        CHECK(buf_map[i] != MAP_FAILED);
    }
}

/* Fills buffer b % 2 with bucket b's tensors (distinct bytes per bucket) and their metas. */
static void fill_bucket(uint32_t b, ckpt_tensor_meta_t *m)
{
    uint8_t *base = buf_map[b % 2];
    uint64_t off = 0;
    for (int i = 0; i < NTENS; i++) {
        char name[64];
        int64_t shape[2] = {16 + i * 8, 32};
        snprintf(name, sizeof(name), "layer.%u.w%d", b, i);
        ckpt_tensor_meta_init(&m[i], name, CKPT_DTYPE_F32, shape, 2);
        m[i].offset = off;
        for (uint64_t k = 0; k < m[i].nbytes; k++)
            base[off + k] = (uint8_t)(k * 31 + b * 7 + (uint64_t)i);
        m[i].checksum = ckpt_checksum(base + off, m[i].nbytes);
        off += ckpt_aligned_size(m[i].nbytes);
    }
}

static ckpt_ipc_begin_t make_begin(uint64_t id, uint32_t nbuckets, int verify)
{
    ckpt_ipc_begin_t b = {.update_id = id, .version = 100 + id, .name = "demo",
                          .nbuckets = nbuckets, .verify = verify, .nbuffers = 2,
                          .buffer_fds = {buf_fd[0], buf_fd[1]},
                          .buffer_sizes = {BUF_SIZE, BUF_SIZE}, .max_tensors = NTENS};
    return b;
}

/* Connects the worker, begins update `id` and sends bucket 0 from buffer 0 (filled into m). */
static void start_update(ckpt_ipc_server_t *srv, uint64_t id, uint32_t nbuckets, int verify,
                         ckpt_tensor_meta_t *m)
{
    ckpt_ipc_begin_t begin = make_begin(id, nbuckets, verify);
    CHECK_OK(ckpt_ipc_server_wait_worker(srv, 5000));
    CHECK_OK(ckpt_ipc_begin(srv, &begin, 5000));
    fill_bucket(0, m);
}

/* A whole update, overlapping: bucket b+1 is filled while the worker reloads bucket b. */
static void run_update(ckpt_ipc_server_t *srv, uint64_t id, uint32_t nbuckets)
{
    ckpt_tensor_meta_t m[2][NTENS];
    ckpt_ipc_begin_t begin = make_begin(id, nbuckets, 1);
    CHECK_OK(ckpt_ipc_server_wait_worker(srv, 5000));
    CHECK_OK(ckpt_ipc_begin(srv, &begin, 5000));
    fill_bucket(0, m[0]);
    for (uint32_t b = 0; b < nbuckets; b++) {
        CHECK_OK(ckpt_ipc_send_bucket(srv, b, (int)(b % 2), m[b % 2], NTENS));
        if (b + 1 < nbuckets) fill_bucket(b + 1, m[(b + 1) % 2]);
        CHECK_OK(ckpt_ipc_wait_ack(srv, 5000));
    }
    CHECK_OK(ckpt_ipc_finish(srv, 1, NULL, 5000));
    CHECK_OK(ckpt_ipc_commit(srv, 5000)); /* protocol 3: the decision after FINISH */
}

static ckpt_ipc_server_t *open_server(void)
{
    static int n;
    ckpt_ipc_server_t *srv = NULL;
    snprintf(sock_path, sizeof(sock_path), "/tmp/ckpt-test-ipc-%d-%d.sock", (int)getpid(), n++);
    CHECK_OK(ckpt_ipc_server_open(sock_path, &srv));
    return srv;
}

static void test_full_update_and_reconnect(void)
{
    ckpt_ipc_server_t *srv = open_server();
    struct stat st;
    CHECK(stat(sock_path, &st) == 0 && (st.st_mode & 0777) == 0600);
    pid_t w = spawn_worker(W_NORMAL, 0, 2);
    run_update(srv, 1, 6);
    run_update(srv, 2, 5);
    CHECK(reap(w) == 0);
    /* The worker exited between updates: the next wait_worker notices and takes a new one. */
    w = spawn_worker(W_NORMAL, 0, 1);
    run_update(srv, 3, 4);
    CHECK(reap(w) == 0);
    ckpt_ipc_server_close(srv);
    CHECK(access(sock_path, F_OK) != 0);
}

/* PREPARE maps the buffers ahead of an update; the worker stays idle, counts no update,
 * and the update that follows (same files) runs as usual, bytes verified by the worker. */
static void test_prepare_then_update(void)
{
    ckpt_ipc_server_t *srv = open_server();
    pid_t w = spawn_worker(W_NORMAL, 0, 1); /* exits 0 after exactly one verified update */
    ckpt_ipc_begin_t prep = make_begin(20, 0, 0);
    CHECK_OK(ckpt_ipc_server_wait_worker(srv, 5000));
    CHECK_OK(ckpt_ipc_prepare(srv, &prep, 5000));
    CHECK_OK(ckpt_ipc_prepare(srv, &prep, 5000)); /* again: mappings reused */
    run_update(srv, 21, 3);
    CHECK(reap(w) == 0);
    ckpt_ipc_server_close(srv);
}

static void test_worker_error_then_abort(void)
{
    ckpt_ipc_server_t *srv = open_server();
    ckpt_tensor_meta_t m[NTENS];
    pid_t w = spawn_worker(W_FAIL, 1, 1); /* then expects our ABORT with its reason */
    start_update(srv, 7, 3, 0, m);
    CHECK_OK(ckpt_ipc_send_bucket(srv, 0, 0, m, NTENS));
    CHECK_OK(ckpt_ipc_wait_ack(srv, 5000));
    fill_bucket(1, m);
    CHECK_OK(ckpt_ipc_send_bucket(srv, 1, 1, m, NTENS));
    CHECK_RC(ckpt_ipc_wait_ack(srv, 5000), CKPT_EIO);
    CHECK_ERR_HAS("injected failure");
    CHECK_ERR_HAS("bucket 1");
    CHECK_OK(ckpt_ipc_finish(srv, 0, "engine says no", 5000));
    CHECK(ckpt_ipc_server_has_worker(srv));
    CHECK(reap(w) == 0);
    ckpt_ipc_server_close(srv);
}

static void test_worker_killed(void)
{
    ckpt_ipc_server_t *srv = open_server();
    ckpt_tensor_meta_t m[NTENS];
    pid_t w = spawn_worker(W_STALL, 1, 1);
    start_update(srv, 8, 3, 0, m);
    CHECK_OK(ckpt_ipc_send_bucket(srv, 0, 0, m, NTENS));
    CHECK_OK(ckpt_ipc_wait_ack(srv, 5000));
    CHECK_OK(ckpt_ipc_send_bucket(srv, 1, 1, m, NTENS));
    kill(w, SIGKILL);
    double t0 = now_ms();
    CHECK_RC(ckpt_ipc_wait_ack(srv, 3000), CKPT_EPEER);
    CHECK(now_ms() - t0 < 3000);
    CHECK_ERR_HAS(sock_path);
    CHECK(!ckpt_ipc_server_has_worker(srv));
    CHECK(reap(w) == 128 + SIGKILL);
    ckpt_ipc_server_close(srv);
}

static void test_worker_stalls_then_new_worker(void)
{
    ckpt_ipc_server_t *srv = open_server();
    ckpt_tensor_meta_t m[NTENS];
    pid_t w = spawn_worker(W_STALL, 0, 1);
    start_update(srv, 9, 2, 0, m);
    CHECK_OK(ckpt_ipc_send_bucket(srv, 0, 0, m, NTENS));
    double t0 = now_ms();
    CHECK_RC(ckpt_ipc_wait_ack(srv, 300), CKPT_ETIMEDOUT);
    double dt = now_ms() - t0;
    CHECK(dt >= 290 && dt < 1500);
    CHECK_RC(ckpt_ipc_send_bucket(srv, 1, 1, m, NTENS), CKPT_ESTATE);
    CHECK_RC(ckpt_ipc_finish(srv, 1, NULL, 100), CKPT_ESTATE);
    t0 = now_ms();
    CHECK_RC(ckpt_ipc_finish(srv, 0, "worker stalled", 5000), CKPT_ETIMEDOUT);
    CHECK(now_ms() - t0 < 100); /* dropped at once, not waited for again */
    CHECK(!ckpt_ipc_server_has_worker(srv));
    kill(w, SIGKILL);
    reap(w);
    w = spawn_worker(W_NORMAL, 0, 1);
    run_update(srv, 10, 3);
    CHECK(reap(w) == 0);
    ckpt_ipc_server_close(srv);
}

static void test_checksum_mismatch_names_tensor(void)
{
    ckpt_ipc_server_t *srv = open_server();
    ckpt_tensor_meta_t m[NTENS];
    pid_t w = spawn_worker(W_EXPECT_ABORT, 99, 1);
    start_update(srv, 11, 1, 1, m);
    buf_map[0][m[1].offset + 5] ^= 0x40; /* one flipped bit after the checksum was taken */
    CHECK_OK(ckpt_ipc_send_bucket(srv, 0, 0, m, NTENS));
    CHECK_RC(ckpt_ipc_wait_ack(srv, 5000), CKPT_ECHECKSUM);
    CHECK_ERR_HAS("layer.0.w1");
    CHECK_OK(ckpt_ipc_finish(srv, 0, "engine says no: checksum", 5000));
    CHECK(reap(w) == 0);
    ckpt_ipc_server_close(srv);
}

/* Second concurrent worker: refused with a message naming the one that holds the socket. */
static void test_second_worker_refused(void)
{
    ckpt_ipc_server_t *srv = open_server();
    ckpt_receiver_t *second = NULL;
    ckpt_update_info_t info;
    pid_t w = spawn_worker(W_NORMAL, 0, 1);
    CHECK_OK(ckpt_ipc_server_wait_worker(srv, 5000));
    CHECK_OK(ckpt_receiver_connect(sock_path, 1000, &second));
    run_update(srv, 12, 2); /* waits inside the update notice and refuse the second one */
    CHECK(reap(w) == 0);
    CHECK_RC(ckpt_receiver_wait_update(second, 2000, &info), CKPT_EBUSY);
    CHECK_ERR_HAS("one worker per socket");
    ckpt_receiver_close(second);
    ckpt_ipc_server_close(srv);
}

/* A raw peer that writes `hdr` as its answer to BEGIN. */
static void raw_reply(const uint8_t *hdr, int want, const char *fragment)
{
    ckpt_ipc_server_t *srv = open_server();
    struct sockaddr_un a = {.sun_family = AF_UNIX};
    ckpt_ipc_begin_t begin = make_begin(13, 1, 0);
    int fd = socket(AF_UNIX, SOCK_STREAM, 0);
    snprintf(a.sun_path, sizeof(a.sun_path), "%s", sock_path);
    CHECK(connect(fd, (struct sockaddr *)&a, sizeof(a)) == 0);
    CHECK_OK(ckpt_ipc_server_wait_worker(srv, 1000));
    CHECK(write(fd, hdr, CKPT_IPC_HDR_SIZE) == CKPT_IPC_HDR_SIZE);
    CHECK_RC(ckpt_ipc_begin(srv, &begin, 1000), want);
    CHECK_ERR_HAS(fragment);
    CHECK(!ckpt_ipc_server_has_worker(srv));
    close(fd);
    ckpt_ipc_server_close(srv);
}

/* A raw "engine": a plain listening socket the receiver `*r` connects to; returns the
 * accepted end, on which the test writes whatever frames it likes. */
static int raw_engine(int *lfd_out, ckpt_receiver_t **r)
{
    snprintf(sock_path, sizeof(sock_path), "/tmp/ckpt-test-ipc-%d-raw.sock", (int)getpid());
    unlink(sock_path);
    struct sockaddr_un a = {.sun_family = AF_UNIX};
    snprintf(a.sun_path, sizeof(a.sun_path), "%s", sock_path);
    int lfd = socket(AF_UNIX, SOCK_STREAM, 0);
    CHECK(bind(lfd, (struct sockaddr *)&a, sizeof(a)) == 0 && listen(lfd, 1) == 0);
    CHECK_OK(ckpt_receiver_connect(sock_path, 1000, r));
    *lfd_out = lfd;
    return accept(lfd, NULL, NULL);
}

static void test_raw_garbage_rejected(void)
{
    uint8_t h[CKPT_IPC_HDR_SIZE];
    ckpt__ipc_hdr_encode(h, CKPT_IPC_MSG_READY, 0);
    h[0] = 'X';
    raw_reply(h, CKPT_EPROTO, "bad magic");
    ckpt__ipc_hdr_encode(h, CKPT_IPC_MSG_READY, 0);
    h[4] = 9;
    raw_reply(h, CKPT_EPROTO, "protocol version 9");
    ckpt__ipc_hdr_encode(h, CKPT_IPC_MSG_READY, CKPT_IPC_MAX_PAYLOAD + 1);
    raw_reply(h, CKPT_ETOOBIG, "exceeds");
    ckpt__ipc_hdr_encode(h, CKPT_IPC_MSG_BUCKET, 0); /* valid frame, wrong answer */
    raw_reply(h, CKPT_EPROTO, "in answer to BEGIN");

    /* And the receiver side: an "engine" that speaks garbage. */
    ckpt_receiver_t *r = NULL;
    ckpt_update_info_t info;
    int lfd, cfd = raw_engine(&lfd, &r);
    CHECK(write(cfd, "GET / HTTP/1.1\r\n", 16) == 16);
    CHECK_RC(ckpt_receiver_wait_update(r, 1000, &info), CKPT_EPROTO);
    CHECK_ERR_HAS("bad magic");
    CHECK_RC(ckpt_receiver_wait_update(r, 1000, &info), CKPT_EPEER);
    ckpt_receiver_close(r);
    close(cfd);
    close(lfd);
    unlink(sock_path);
}

/* SO_PEERCRED: a process of another uid is refused even if the file mode lets it connect. */
static void test_other_uid_refused(void)
{
    if (geteuid() != 0) {
        fprintf(stderr, "skip test_other_uid_refused: needs root to run a second uid\n");
        return;
    }
    ckpt_ipc_server_t *srv = open_server();
    CHECK(chmod(sock_path, 0666) == 0); /* only the uid check stands in the way now */
    fflush(stderr);
    pid_t pid = fork();
    if (pid == 0) {
        ckpt_receiver_t *r;
        ckpt_update_info_t info;
        if (setgid(65534) != 0 || setuid(65534) != 0) _exit(20);
        if (ckpt_receiver_connect(sock_path, 2000, &r) != 0) _exit(21);
        int rc = ckpt_receiver_wait_update(r, 5000, &info);
        _exit(rc == CKPT_EPERM && strstr(ckpt_last_error(), "uid 65534") ? 0 : 22);
    }
    CHECK_RC(ckpt_ipc_server_wait_worker(srv, 500), CKPT_ETIMEDOUT);
    CHECK(reap(pid) == 0);
    ckpt_ipc_server_close(srv);
}

static void test_socket_in_use(void)
{
    ckpt_ipc_server_t *srv = open_server(), *other = NULL;
    CHECK_RC(ckpt_ipc_server_open(sock_path, &other), CKPT_EEXIST);
    CHECK_ERR_HAS("in use");
    ckpt_ipc_server_close(srv);
}

/* ---- many buffers: the IPC buffers plus, on one host, the pool regions of local ranks ---- */

#define NMANY 5
/* Announced sizes share no multiple; some files are larger than what is announced. */
static const uint64_t many_size[NMANY] = {4096 * 3 + 17, 1001, 65536 + 5, 12345, 7};
static const uint64_t many_file[NMANY] = {4096 * 4, 1001, 65536 + 4096, 12345, 4096};
static int many_fd[NMANY];
static uint8_t *many_map[NMANY];

static void setup_many(void)
{
    for (int i = 0; i < NMANY; i++) {
        many_fd[i] = memfd_create("ckpt-test-pool", MFD_CLOEXEC);
        CHECK(many_fd[i] >= 0 && ftruncate(many_fd[i], (off_t)many_file[i]) == 0);
        many_map[i] = mmap(NULL, many_file[i], PROT_READ | PROT_WRITE, MAP_SHARED,
                           many_fd[i], 0);
        CHECK(many_map[i] != MAP_FAILED);
    }
}

/* Update 3 sends the same files in another order: index i is file (i + rot) % NMANY. */
static uint32_t many_rot(uint64_t update_id) { return update_id == 3 ? 2 : 0; }
static uint32_t many_file_of(uint64_t update_id, uint32_t bucket)
{
    return (bucket % NMANY + many_rot(update_id)) % NMANY;
}

static uint8_t many_byte(uint64_t update_id, uint32_t bucket, uint64_t k)
{
    return (uint8_t)(k * 131 + bucket * 29 + update_id * 7 + 1);
}

/* The worker: checks every byte of every bucket (through the verified copy) and that a file
 * keeps its mapping across updates, at whatever index it comes. */
static int worker_many(int updates)
{
    ckpt_receiver_t *r;
    ckpt_update_info_t info;
    const uint8_t *base_of[NMANY] = {0};
    if (ckpt_receiver_connect(sock_path, 5000, &r) != 0) return 10;
    for (int u = 0; u < updates; u++) {
        if (ckpt_receiver_wait_update(r, 10000, &info) != 0) return 11;
        for (;;) {
            int ev;
            uint32_t b;
            const ckpt_tensor_view_t *v;
            size_t n;
            if (ckpt_receiver_next(r, 10000, &ev, &b, &v, &n) != 0) return 12;
            if (ev != CKPT_RECV_BUCKET) {
                if (ev != CKPT_RECV_FINISH || ckpt_receiver_finish_reply(r, 1, NULL)) return 13;
                break;
            }
            uint8_t dst[65536 + 8];
            const char *bad = NULL;
            uint32_t f = many_file_of(info.update_id, b);
            const uint8_t *base = (const uint8_t *)v[0].data - v[0].meta.offset;
            if (n != 1 || v[0].meta.nbytes > sizeof(dst)) bad = "unexpected bucket";
            else if (ckpt_receiver_copy(&v[0], 0, dst, v[0].meta.nbytes, 1) != 0)
                bad = ckpt_last_error();
            for (uint64_t k = 0; bad == NULL && k < v[0].meta.nbytes; k++)
                if (dst[k] != many_byte(info.update_id, b, k)) bad = "wrong bytes";
            if (bad == NULL && base_of[f] != NULL && base_of[f] != base)
                bad = "file mapped again instead of reused";
            base_of[f] = base;
            if (bad) ckpt_receiver_fail(r, bad);
            else ckpt_receiver_ack(r);
        }
    }
    ckpt_receiver_close(r);
    return 0;
}

/* Bucket b lives in buffer index b % NMANY: one U8 tensor from offset 3 (0 in a buffer of
 * 3 bytes or less) to the announced end, so the bounds are exercised to the last byte. */
static void many_fill(uint64_t update_id, uint32_t b, ckpt_tensor_meta_t *m)
{
    uint32_t f = many_file_of(update_id, b);
    uint64_t off = many_size[f] > 3 ? 3 : 0;
    int64_t shape[1] = {(int64_t)(many_size[f] - off)};
    char name[64];
    snprintf(name, sizeof(name), "pool.%u", b);
    ckpt_tensor_meta_init(m, name, CKPT_DTYPE_U8, shape, 1);
    m->offset = off;
    for (uint64_t k = 0; k < m->nbytes; k++) many_map[f][off + k] = many_byte(update_id, b, k);
    m->checksum = ckpt_checksum(many_map[f] + off, m->nbytes);
}

static void test_many_buffers(void)
{
    ckpt_ipc_server_t *srv = open_server();
    ckpt_tensor_meta_t m;
    fflush(stderr);
    pid_t w = fork();
    if (w == 0) _exit(worker_many(3));
    for (uint64_t id = 1; id <= 3; id++) {
        ckpt_ipc_begin_t begin = {.update_id = id, .version = id, .name = "pools",
                                  .nbuckets = 2 * NMANY, .verify = 1, .nbuffers = NMANY,
                                  .max_tensors = 1};
        for (int i = 0; i < NMANY; i++) {
            begin.buffer_fds[i] = many_fd[(i + many_rot(id)) % NMANY];
            begin.buffer_sizes[i] = many_size[(i + many_rot(id)) % NMANY];
        }
        CHECK_OK(ckpt_ipc_server_wait_worker(srv, 5000));
        CHECK_OK(ckpt_ipc_begin(srv, &begin, 5000));
        many_fill(id, 0, &m);
        CHECK_RC(ckpt_ipc_send_bucket(srv, 0, NMANY, &m, 1), CKPT_EINVAL);
        CHECK_ERR_HAS("buffer 5 of 5");
        for (uint32_t b = 0; b < 2 * NMANY; b++) {
            many_fill(id, b, &m);
            CHECK_OK(ckpt_ipc_send_bucket(srv, b, (int)(b % NMANY), &m, 1));
            CHECK_OK(ckpt_ipc_wait_ack(srv, 5000));
        }
        CHECK_OK(ckpt_ipc_finish(srv, 1, NULL, 5000));
        CHECK_OK(ckpt_ipc_commit(srv, 5000)); /* protocol 3: the decision after FINISH */
    }
    CHECK(reap(w) == 0);
    ckpt_ipc_server_close(srv);
}

static int count_fds(void)
{
    int n = 0;
    DIR *d = opendir("/proc/self/fd");
    while (d && readdir(d)) n++;
    if (d) closedir(d);
    return n;
}

/* One frame with any number of fds attached (conn_send refuses more than the limit). */
static void raw_send(int fd, uint32_t type, const uint8_t *payload, size_t len, int nfds)
{
    uint8_t frame[2048];
    int fds[80];
    union {
        struct cmsghdr align;
        char buf[CMSG_SPACE(sizeof(fds))];
    } ctl;
    struct iovec iov = {frame, CKPT_IPC_HDR_SIZE + len};
    struct msghdr mh = {.msg_iov = &iov, .msg_iovlen = 1};
    ckpt__ipc_hdr_encode(frame, type, (uint32_t)len);
    memcpy(frame + CKPT_IPC_HDR_SIZE, payload, len);
    for (int i = 0; i < nfds; i++) fds[i] = many_fd[i % NMANY];
    if (nfds > 0) {
        memset(&ctl, 0, sizeof(ctl));
        mh.msg_control = ctl.buf;
        mh.msg_controllen = CMSG_SPACE(sizeof(int) * (size_t)nfds);
        struct cmsghdr *cm = CMSG_FIRSTHDR(&mh);
        cm->cmsg_level = SOL_SOCKET;
        cm->cmsg_type = SCM_RIGHTS;
        cm->cmsg_len = CMSG_LEN(sizeof(int) * (size_t)nfds);
        memcpy(CMSG_DATA(cm), fds, sizeof(int) * (size_t)nfds);
    }
    CHECK(sendmsg(fd, &mh, 0) == (ssize_t)(CKPT_IPC_HDR_SIZE + len));
}

/* Reads one frame and returns its type. */
static uint32_t raw_recv(int fd)
{
    uint8_t h[CKPT_IPC_HDR_SIZE], payload[CKPT_IPC_MAX_TEXT + 64];
    ckpt__ipc_hdr_t hdr = {0, 0};
    CHECK(recv(fd, h, sizeof(h), MSG_WAITALL) == (ssize_t)sizeof(h));
    CHECK_OK(ckpt__ipc_hdr_decode(h, "raw", &hdr));
    CHECK(hdr.length <= sizeof(payload));
    if (hdr.length) CHECK(recv(fd, payload, hdr.length, MSG_WAITALL) == (ssize_t)hdr.length);
    return hdr.type;
}

static void raw_begin(int cfd, uint32_t nbuffers, int nfds)
{
    ckpt__ipc_begin_msg_t m = {.update_id = 20, .version = 1, .nbuckets = 1,
                               .nbuffers = nbuffers, .max_tensors = 1, .name = "raw"};
    uint8_t p[1024];
    for (uint32_t i = 0; i < nbuffers; i++) m.buffer_sizes[i] = many_size[i];
    ckpt__ipc_begin_encode(&m, p);
    raw_send(cfd, CKPT_IPC_MSG_BEGIN, p, ckpt__ipc_begin_size(&m), nfds);
}

/* NEED from a raw worker, read while it is idle: a good one is kept (and replaced by the
 * next), a malformed one drops the worker (the stream cannot be trusted). */
static void test_need_from_a_raw_worker(void)
{
    ckpt_ipc_server_t *srv = open_server();
    struct sockaddr_un addr = {.sun_family = AF_UNIX};
    snprintf(addr.sun_path, sizeof(addr.sun_path), "%s", sock_path);
    int cfd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    CHECK(connect(cfd, (struct sockaddr *)&addr, sizeof(addr)) == 0);
    ckpt_ipc_server_poll(srv); /* accepts it */
    const ckpt_need_decl_t *got = NULL;
    uint32_t n = 0;
    CHECK(ckpt_ipc_server_need(srv, &got, &n) == 0); /* undeclared: needs everything */
    ckpt_need_decl_t d[2] = {{.name = "w", .dim = 0, .start = 2, .length = 3},
                             {.name = "b", .dim = -1}};
    uint8_t p[256];
    ckpt__ipc_need_encode(d, 2, p);
    raw_send(cfd, CKPT_IPC_MSG_NEED, p, ckpt__ipc_need_size(d, 2), 0);
    ckpt_ipc_server_poll(srv);
    CHECK(ckpt_ipc_server_need(srv, &got, &n) == 1 && n == 2);
    CHECK(n == 2 && strcmp(got[0].name, "w") == 0 && got[0].start == 2 && got[0].length == 3);
    CHECK(n == 2 && strcmp(got[1].name, "b") == 0 && got[1].dim == -1);
    ckpt__ipc_need_encode(d, 0, p); /* replaced: needs nothing */
    raw_send(cfd, CKPT_IPC_MSG_NEED, p, ckpt__ipc_need_size(d, 0), 0);
    ckpt_ipc_server_poll(srv);
    CHECK(ckpt_ipc_server_need(srv, &got, &n) == 1 && n == 0);
    d[0].dim = 9; /* malformed: the worker is dropped */
    ckpt__ipc_need_encode(d, 1, p);
    raw_send(cfd, CKPT_IPC_MSG_NEED, p, ckpt__ipc_need_size(d, 1), 0);
    ckpt_ipc_server_poll(srv);
    CHECK(!ckpt_ipc_server_has_worker(srv));
    CHECK(ckpt_ipc_server_need(srv, &got, &n) == 0);
    close(cfd);
    ckpt_ipc_server_close(srv);
}

/* A BEGIN whose fds do not match its count, and a BUCKET naming a buffer past the count:
 * clean errors, no fd left open, and (but for too many fds) the stream stays in step. */
static void test_buffer_count_mismatch(void)
{
    ckpt_receiver_t *r = NULL;
    ckpt_update_info_t info;
    int ev, lfd, cfd = raw_engine(&lfd, &r), before = count_fds();
    uint32_t b;
    const ckpt_tensor_view_t *v;
    size_t n;
    raw_begin(cfd, 3, 2);
    CHECK_RC(ckpt_receiver_wait_update(r, 1000, &info), CKPT_EPROTO);
    CHECK_ERR_HAS("3 host buffers announced, 2 fds came");
    CHECK(raw_recv(cfd) == CKPT_IPC_MSG_ERR);
    CHECK(count_fds() == before);
    raw_begin(cfd, 3, 4);
    CHECK_RC(ckpt_receiver_wait_update(r, 1000, &info), CKPT_EPROTO);
    CHECK_ERR_HAS("3 host buffers announced, 4 fds came");
    CHECK(raw_recv(cfd) == CKPT_IPC_MSG_ERR);
    CHECK(count_fds() == before);

    raw_begin(cfd, 3, 3);
    CHECK_OK(ckpt_receiver_wait_update(r, 1000, &info));
    CHECK(raw_recv(cfd) == CKPT_IPC_MSG_READY);
    uint8_t p[512];
    ckpt__ipc_bucket_hdr_t h = {0, 3, 1};
    ckpt_tensor_meta_t m;
    int64_t shape[1] = {4};
    ckpt_tensor_meta_init(&m, "w", CKPT_DTYPE_U8, shape, 1);
    size_t len = ckpt__ipc_bucket_encode_hdr(&h, p);
    len += ckpt__ipc_tensor_encode(&m, NULL, p + len);
    raw_send(cfd, CKPT_IPC_MSG_BUCKET, p, len, 0);
    CHECK_RC(ckpt_receiver_next(r, 1000, &ev, &b, &v, &n), CKPT_EPROTO);
    CHECK_ERR_HAS("buffer 3 of 3");
    CHECK(raw_recv(cfd) == CKPT_IPC_MSG_ERR);
    ckpt__ipc_text_encode(0, "raw says no", p);
    raw_send(cfd, CKPT_IPC_MSG_ABORT, p, ckpt__ipc_text_size("raw says no"), 0);
    CHECK_OK(ckpt_receiver_next(r, 1000, &ev, &b, &v, &n));
    CHECK(ev == CKPT_RECV_ABORT);
    CHECK(raw_recv(cfd) == CKPT_IPC_MSG_OK);

    /* More fds than any BEGIN may carry: all closed, the connection is given up. */
    raw_begin(cfd, 2, CKPT_IPC_MAX_BUFFERS + 1);
    CHECK_RC(ckpt_receiver_wait_update(r, 1000, &info), CKPT_EPROTO);
    CHECK_ERR_HAS("fds attached");
    CHECK_RC(ckpt_receiver_wait_update(r, 1000, &info), CKPT_EPEER);
    ckpt_receiver_close(r);
    CHECK(count_fds() == before - 1);
    close(cfd);
    close(lfd);
    unlink(sock_path);
}

/* ckpt_receiver_copy_slice: a 4x6 u16 tensor (value = row * 100 + column) as a whole view,
 * as rows [1, 3) and as columns [2, 5) packed; a TP shard of rows or columns takes what a
 * view holds of it, leaves the rest, and says how many indices it copied. */
static void test_copy_slice(void)
{
    uint16_t full[4][6], rows[2][6], cols[4][3], got[4][6];
    for (int r = 0; r < 4; r++)
        for (int c = 0; c < 6; c++) full[r][c] = (uint16_t)(r * 100 + c);
    for (int r = 0; r < 2; r++) memcpy(rows[r], full[1 + r], sizeof(rows[r]));
    for (int r = 0; r < 4; r++) memcpy(cols[r], &full[r][2], sizeof(cols[r]));
    const int64_t shape[2] = {4, 6};
    ckpt_tensor_view_t whole, prow, pcol;
    memset(&whole, 0, sizeof(whole));
    CHECK_OK(ckpt_tensor_meta_init(&whole.meta, "t", CKPT_DTYPE_U16, shape, 2));
    whole.data = full;
    whole.part_dim = -1;
    prow = pcol = whole;
    prow.meta.shape[0] = 2, prow.meta.nbytes = sizeof(rows);
    prow.data = rows, prow.part_dim = 0, prow.part_start = 1, prow.part_full = 4;
    pcol.meta.shape[1] = 3, pcol.meta.nbytes = sizeof(cols);
    pcol.data = cols, pcol.part_dim = 1, pcol.part_start = 2, pcol.part_full = 6;
    /* rows [2, 4) (TP rank 1 of 2): all from the whole view, row 2 only from the part */
    memset(got, 0xff, sizeof(got));
    CHECK(ckpt_receiver_copy_slice(&whole, 0, 2, 2, got) == 2);
    CHECK(memcmp(got, full[2], 2 * sizeof(full[0])) == 0);
    memset(got, 0xff, sizeof(got));
    CHECK(ckpt_receiver_copy_slice(&prow, 0, 2, 2, got) == 1);
    CHECK(memcmp(got[0], full[2], sizeof(full[0])) == 0 && got[1][0] == 0xffff);
    CHECK(ckpt_receiver_copy_slice(&prow, 0, 3, 1, got) == 0); /* the part lies elsewhere */
    /* columns [3, 6) of every row, packed 4x3: columns 3 and 4 come from the column part */
    uint16_t shard[4][3];
    memset(shard, 0xff, sizeof(shard));
    CHECK(ckpt_receiver_copy_slice(&pcol, 1, 3, 3, shard) == 2);
    for (int r = 0; r < 4; r++)
        CHECK(shard[r][0] == full[r][3] && shard[r][1] == full[r][4] && shard[r][2] == 0xffff);
    CHECK(ckpt_receiver_copy_slice(&whole, 1, 3, 3, shard) == 3);
    for (int r = 0; r < 4; r++) CHECK(shard[r][2] == full[r][5]);
    /* refused by name: a part along the other dimension, a range or dim outside */
    CHECK(ckpt_receiver_copy_slice(&pcol, 0, 0, 2, got) == CKPT_EINVAL);
    CHECK_ERR_HAS("part along dimension 1, the slice is along 0");
    CHECK(ckpt_receiver_copy_slice(&whole, 0, 3, 2, got) == CKPT_EINVAL);
    CHECK_ERR_HAS("outside its 4 indices");
    CHECK(ckpt_receiver_copy_slice(&whole, 2, 0, 1, got) == CKPT_EINVAL);
    CHECK_ERR_HAS("dimension 2 of a 2-dimensional");
}

int main(void)
{
    signal(SIGPIPE, SIG_DFL); /* prove MSG_NOSIGNAL: a SIGPIPE would kill the test */
    setup_buffers();
    setup_many();
    RUN_TEST(test_full_update_and_reconnect);
    RUN_TEST(test_prepare_then_update);
    RUN_TEST(test_worker_error_then_abort);
    RUN_TEST(test_worker_killed);
    RUN_TEST(test_worker_stalls_then_new_worker);
    RUN_TEST(test_checksum_mismatch_names_tensor);
    RUN_TEST(test_second_worker_refused);
    RUN_TEST(test_raw_garbage_rejected);
    RUN_TEST(test_many_buffers);
    RUN_TEST(test_buffer_count_mismatch);
    RUN_TEST(test_need_from_a_raw_worker);
    RUN_TEST(test_copy_slice);
    RUN_TEST(test_other_uid_refused);
    RUN_TEST(test_socket_in_use);
    TEST_EXIT();
}
