/* Engine <-> worker protocol with real processes: the parent is the engine (sender API),
 * forked children are workers (receiver API); the IPC buffers are memfds the parent fills. */
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
    snprintf(sock_path, sizeof(sock_path), "/tmp/ckpt-test-ipc-%d-raw.sock", (int)getpid());
    unlink(sock_path);
    struct sockaddr_un a = {.sun_family = AF_UNIX};
    snprintf(a.sun_path, sizeof(a.sun_path), "%s", sock_path);
    int lfd = socket(AF_UNIX, SOCK_STREAM, 0);
    CHECK(bind(lfd, (struct sockaddr *)&a, sizeof(a)) == 0 && listen(lfd, 1) == 0);
    ckpt_receiver_t *r = NULL;
    ckpt_update_info_t info;
    CHECK_OK(ckpt_receiver_connect(sock_path, 1000, &r));
    int cfd = accept(lfd, NULL, NULL);
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

int main(void)
{
    signal(SIGPIPE, SIG_DFL); /* prove MSG_NOSIGNAL: a SIGPIPE would kill the test */
    setup_buffers();
    RUN_TEST(test_full_update_and_reconnect);
    RUN_TEST(test_worker_error_then_abort);
    RUN_TEST(test_worker_killed);
    RUN_TEST(test_worker_stalls_then_new_worker);
    RUN_TEST(test_checksum_mismatch_names_tensor);
    RUN_TEST(test_second_worker_refused);
    RUN_TEST(test_raw_garbage_rejected);
    RUN_TEST(test_other_uid_refused);
    RUN_TEST(test_socket_in_use);
    TEST_EXIT();
}
