/* The real ckpt-worker binary against the sender API: a tensor-parallel update (rank 1 of 2)
 * whose --checksum-out must match the slices the TP rule says it keeps, then an injected
 * bucket failure that the engine sees with the worker's text. */
#include <signal.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#include "core/internal.h"
#include "ipc/sender.h"
#include "test.h"

#define BUF (1 << 16)

static char worker_bin[1024], sock[108], sums[256];

static pid_t spawn(const char *extra1, const char *extra2)
{
    fflush(stderr);
    pid_t pid = fork();
    if (pid == 0) {
        execl(worker_bin, worker_bin, "--socket", sock, "--tp-rank", "1", "--tp-size", "2",
              "--verify", "--checksum-out", sums, "--updates", "1", "--timeout-ms", "5000",
              "--post-hook-sleep-ms", "1", extra1, extra2, (char *)NULL);
        _exit(127);
    }
    return pid;
}

/* Three tensors in one bucket: [16,32] F32 is sharded, [15,4] (15 % 2 != 0) and [10] are not. */
static size_t fill(uint8_t *base, ckpt_tensor_meta_t *m)
{
    static const int64_t shapes[3][2] = {{16, 32}, {15, 4}, {10, 0}};
    static const char *names[3] = {"w.sharded", "w.odd", "b.vector"};
    uint64_t off = 0;
    for (int i = 0; i < 3; i++) {
        ckpt_tensor_meta_init(&m[i], names[i], CKPT_DTYPE_F32, shapes[i], i == 2 ? 1 : 2);
        m[i].offset = off;
        for (uint64_t k = 0; k < m[i].nbytes; k++) base[off + k] = (uint8_t)(k * 13 + i);
        m[i].checksum = ckpt_checksum(base + off, m[i].nbytes);
        off += ckpt_aligned_size(m[i].nbytes);
    }
    return 3;
}

static int reap(pid_t pid)
{
    int st;
    waitpid(pid, &st, 0);
    return WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
}

static void expect_sum(const char *json, const char *name, const void *data, size_t len)
{
    char want[300];
    snprintf(want, sizeof(want), "\"%s\": \"%016llx\"", name,
             (unsigned long long)ckpt_checksum(data, len));
    if (strstr(json, want) == NULL) {
        fprintf(stderr, "checksum file lacks %s:\n%s\n", want, json);
        CHECK(0);
    }
}

static void test_tp_update_and_failure(void)
{
    ckpt_ipc_server_t *srv = NULL;
    ckpt_tensor_meta_t m[3];
    int fd = memfd_create("buf", MFD_CLOEXEC);
    CHECK(ftruncate(fd, BUF) == 0);
    uint8_t *base = mmap(NULL, BUF, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    size_t n = fill(base, m);
    ckpt_ipc_begin_t begin = {.update_id = 5, .version = 9, .name = "tp", .nbuckets = 1,
                              .verify = 0, .nbuffers = 1, .buffer_fds = {fd, -1},
                              .buffer_sizes = {BUF, 0}};
    CHECK_OK(ckpt_ipc_server_open(sock, &srv));
    pid_t w = spawn("--dump", "/nonexistent-but-unused-on-failure");
    /* --dump needs the safetensors writer; without it the worker's exit status says so, but
     * the update itself still completes and the checksums are written first. */
    CHECK_OK(ckpt_ipc_server_wait_worker(srv, 5000));
    CHECK_OK(ckpt_ipc_begin(srv, &begin, 5000));
    CHECK_OK(ckpt_ipc_send_bucket(srv, 0, 0, m, n));
    CHECK_OK(ckpt_ipc_wait_ack(srv, 5000));
    CHECK_OK(ckpt_ipc_finish(srv, 1, NULL, 5000));
    CHECK_OK(ckpt_ipc_commit(srv, 5000)); /* protocol 3: the decision after FINISH */
    reap(w);
    FILE *f = fopen(sums, "r");
    CHECK(f != NULL);
    if (f) {
        char json[8192] = {0};
        CHECK(fread(json, 1, sizeof(json) - 1, f) > 0);
        fclose(f);
        size_t half = m[0].nbytes / 2; /* rank 1 keeps rows 8..15 */
        expect_sum(json, "w.sharded", base + m[0].offset + half, half);
        expect_sum(json, "w.odd", base + m[1].offset, m[1].nbytes);
        expect_sum(json, "b.vector", base + m[2].offset, m[2].nbytes);
    }

    w = spawn("--fail-on-bucket", "0");
    begin.update_id = 6;
    CHECK_OK(ckpt_ipc_server_wait_worker(srv, 5000));
    CHECK_OK(ckpt_ipc_begin(srv, &begin, 5000));
    CHECK_OK(ckpt_ipc_send_bucket(srv, 0, 0, m, n));
    CHECK_RC(ckpt_ipc_wait_ack(srv, 5000), CKPT_EIO);
    CHECK_ERR_HAS("injected failure");
    CHECK_OK(ckpt_ipc_finish(srv, 0, "rank 0 says abort", 5000));
    CHECK(reap(w) == 1); /* its one update was aborted */
    ckpt_ipc_server_close(srv);
    munmap(base, BUF);
    close(fd);
}

int main(void)
{
    const char *build = getenv("CKPT_BUILD_DIR");
    snprintf(worker_bin, sizeof(worker_bin), "%s/tools/ckpt-worker", build ? build : ".");
    if (build == NULL || access(worker_bin, X_OK) != 0) {
        fprintf(stderr, "skip: ckpt-worker not built (%s)\n", worker_bin);
        return 77;
    }
    snprintf(sock, sizeof(sock), "/tmp/ckpt-test-worker-%d.sock", (int)getpid());
    snprintf(sums, sizeof(sums), "/tmp/ckpt-test-worker-%d.json", (int)getpid());
    RUN_TEST(test_tp_update_and_failure);
    unlink(sums);
    TEST_EXIT();
}
