/* Registration from files, format-independent core (ckpt__store_load): every byte lands,
 * checksums, shares, the O_DIRECT/buffered/pread/tmpfs paths, and failure safety. */
#include <fcntl.h>
#include <grp.h>
#include <sys/stat.h>
#include <sys/wait.h>

#include "core/testing.h"
#include "store_fixture.h"

#define MAXT 64
#define NFILES 3

static char dir[128], shm_dir[128];
static char paths[NFILES][256];
static ckpt__load_tensor_t tensors[MAXT];
static size_t ntensors;
static uint64_t total;

static ckpt_store_t *new_store(int uring, int direct)
{
    ckpt_store_options_t o = CKPT_STORE_OPTIONS_INIT;
    o.field_mask = CKPT_STORE_OPT_USE_URING | CKPT_STORE_OPT_USE_DIRECT |
                   CKPT_STORE_OPT_CHUNK_BYTES | CKPT_STORE_OPT_IO_DEPTH;
    o.use_uring = uring;
    o.use_direct = direct;
    o.chunk_bytes = 64 * 1024; /* many chunks per run, so their completion order varies */
    o.io_depth = 8;
    ckpt_store_t *s = NULL;
    CHECK_OK(ckpt_store_create(&o, &s));
    return s;
}

static int load(ckpt_store_t *s, const char *name, char p[][256], int rank, int nranks)
{
    char *pp[NFILES];
    for (int f = 0; f < NFILES; f++) pp[f] = p[f];
    return ckpt__store_load(s, name, pp, NFILES, tensors, ntensors, rank, nranks);
}

/* Checks every local tensor against the file bytes; returns local tensor bytes. */
static uint64_t verify(ckpt_store_t *s, const char *name, int rank, int nranks, int aligned)
{
    const ckpt_tensor_meta_t *t;
    size_t n;
    uint64_t local = 0;
    int32_t owners[MAXT];
    ckpt_tensor_meta_t in[MAXT];
    for (size_t i = 0; i < ntensors; i++) in[i] = tensors[i].meta;
    CHECK_OK(ckpt_plan_shares(in, ntensors, nranks, owners));
    CHECK_OK(ckpt_store_tensors(s, name, &t, &n));
    CHECK(n == ntensors);
    for (size_t i = 0; i < n; i++) {
        size_t src = 0;
        while (src < ntensors && strcmp(tensors[src].meta.name, t[i].name) != 0) src++;
        CHECK(src < ntensors);
        if (src >= ntensors) continue;
        CHECK(t[i].owner == owners[src]);
        CHECK(t[i].nbytes == tensors[src].meta.nbytes && t[i].dtype == tensors[src].meta.dtype);
        const void *p;
        int rc = ckpt_store_tensor_data(s, name, i, &p);
        if (t[i].owner != rank) {
            CHECK(rc == CKPT_ENOENT);
            CHECK(t[i].checksum == 0);
            continue;
        }
        CHECK(rc == CKPT_OK);
        if (aligned) CHECK(t[i].offset % CKPT_ALIGN == 0);
        uint8_t *want = malloc(t[i].nbytes + 1);
        for (uint64_t k = 0; k < t[i].nbytes; k++)
            want[k] = pattern_byte(tensors[src].file, tensors[src].meta.offset + k);
        if (memcmp(p, want, t[i].nbytes) != 0) {
            fprintf(stderr, "tensor %s (%llu bytes) differs\n", t[i].name, (unsigned long long)t[i].nbytes);
            CHECK(0);
        }
        CHECK(t[i].checksum == ckpt_checksum(want, t[i].nbytes));
        free(want);
        local += t[i].nbytes;
    }
    return local;
}

/* Whether this file system takes O_DIRECT reads of the fixture (ext4, xfs do; tmpfs and
 * some overlay setups refuse the open). Probed independently of the store. */
static int fs_allows_direct(void)
{
    int fd = open(paths[0], O_RDONLY | O_DIRECT);
    if (fd < 0) return 0;
    void *buf = NULL;
    int ok = posix_memalign(&buf, 4096, 4096) == 0 && pread(fd, buf, 4096, 0) > 0;
    free(buf);
    close(fd);
    return ok;
}

static void test_paths(void)
{
    int direct_ok = fs_allows_direct();
    fprintf(stderr, "  file system %s O_DIRECT\n", direct_ok ? "allows" : "refuses");
    static const struct { int uring, direct; const char *path; } cases[] = {
        {-1, -1, "io_uring+O_DIRECT"}, {-1, 0, "io_uring"}, {0, -1, "pread+O_DIRECT"}, {0, 0, "pread"}};
    for (size_t c = 0; c < CKPT_ARRAY_SIZE(cases); c++) {
        ckpt_store_t *s = new_store(cases[c].uring, cases[c].direct);
        CHECK_OK(load(s, "ck", paths, 0, 1));
        ckpt_store_stats_t st;
        CHECK_OK(ckpt_store_last_stats(s, &st));
        fprintf(stderr, "  %-18s io %llu bytes (direct %llu) for %llu\n", st.io_path,
                (unsigned long long)st.bytes_io, (unsigned long long)st.bytes_direct,
                (unsigned long long)st.bytes_read);
        /* O_DIRECT may be refused by the file system (auto falls back to buffered). */
        if (cases[c].direct == 0 || direct_ok) CHECK_STR(st.io_path, cases[c].path);
        if (cases[c].direct == 0) CHECK(st.bytes_direct == 0);
        /* Where O_DIRECT works, auto uses it: most bytes bypass the page cache (the unaligned
         * head and tail of a run may go buffered). */
        if (cases[c].direct != 0 && direct_ok)
            CHECK(st.bytes_direct > 0 && st.bytes_direct * 2 >= st.bytes_io);
        CHECK(st.bytes_read == total && st.bytes_local == total);
        CHECK(verify(s, "ck", 0, 1, 1) == total);
        ckpt_store_destroy(s);
    }
}

static void test_shares_read_once(void)
{
    for (int n = 1; n <= 8; n++) {
        uint64_t sum = 0, sum_stats = 0;
        for (int r = 0; r < n; r++) {
            ckpt_store_t *s = new_store(-1, -1);
            CHECK_OK(load(s, "ck", paths, r, n));
            ckpt_store_stats_t st;
            CHECK_OK(ckpt_store_last_stats(s, &st));
            sum += verify(s, "ck", r, n, 1);
            sum_stats += st.bytes_read;
            ckpt_store_destroy(s);
        }
        CHECK(sum == total);
        CHECK(sum_stats == total);
    }
}

static void test_tmpfs_in_place(void)
{
    char shm_paths[NFILES][256];
    uint64_t tot2;
    ckpt__load_tensor_t t2[MAXT];
    fixture_write(shm_dir, shm_paths, NFILES, t2, MAXT, &tot2);
    ckpt_store_t *s = new_store(-1, -1);
    CHECK_OK(load(s, "shm", shm_paths, 1, 2));
    ckpt_store_stats_t st;
    CHECK_OK(ckpt_store_last_stats(s, &st));
    CHECK_STR(st.io_path, "mmap");
    CHECK(st.bytes_read == 0 && st.bytes_mapped == st.bytes_local && st.bytes_local > 0);
    verify(s, "shm", 1, 2, 0);
    const ckpt_pool_region_t *r;
    size_t n;
    CHECK_OK(ckpt_store_regions(s, "shm", &r, &n));
    CHECK(n >= 1);
    ckpt_store_destroy(s);
    for (int f = 0; f < NFILES; f++) unlink(shm_paths[f]);
}

static void test_failures_leave_store_unchanged(void)
{
    ckpt_store_t *s = new_store(-1, -1);
    CHECK_OK(load(s, "ok", paths, 0, 1));
    int fds0 = count_fds();
    char bad[NFILES][256];
    memcpy(bad, paths, sizeof(bad));

    /* Truncated after its header was read: the middle file is cut short. */
    char cut[300];
    snprintf(cut, sizeof(cut), "%s/cut.bin", dir);
    char cmd[1024];
    snprintf(cmd, sizeof(cmd), "cp %s %s && truncate -s 500000 %s", paths[1], cut, cut);
    CHECK(system(cmd) == 0);
    strcpy(bad[1], cut);
    CHECK_RC(load(s, "bad", bad, 0, 1), CKPT_EIO);
    CHECK_ERR_HAS("cut.bin");
    CHECK_ERR_HAS("truncated");

    /* A directory where a file should be. */
    snprintf(bad[1], 256, "%s", dir);
    CHECK_RC(load(s, "bad", bad, 0, 1), CKPT_EIO);
    CHECK_ERR_HAS("not a regular file");

    /* Missing file. */
    snprintf(bad[1], 256, "%s/missing.bin", dir);
    CHECK(load(s, "bad", bad, 0, 1) < 0);
    CHECK_ERR_HAS("missing.bin");

    /* No read permission. Root reads anyway (CAP_DAC_OVERRIDE), so the load runs in a child
     * that drops to nobody (65534) first: it must read the readable files (the control) and
     * be refused the chmod-000 one, naming it. */
    chmod(cut, 0);
    chmod(dir, 0755);
    fflush(NULL);
    pid_t pid = fork();
    if (pid == 0) {
        if (geteuid() == 0 && (setgroups(0, NULL) != 0 || setgid(65534) != 0 || setuid(65534) != 0)) {
            fprintf(stderr, "  cannot drop to uid 65534\n");
            _exit(2);
        }
        CHECK(geteuid() != 0);
        ckpt_store_t *c = new_store(-1, -1);
        CHECK_OK(load(c, "readable", paths, 0, 1));
        strcpy(bad[1], cut);
        CHECK_RC(load(c, "bad", bad, 0, 1), CKPT_EPERM);
        CHECK_ERR_HAS("cut.bin");
        ckpt_store_destroy(c);
        fflush(NULL);
        _exit(test__failures ? 1 : 0);
    }
    int wst = 0;
    CHECK(pid > 0 && waitpid(pid, &wst, 0) == pid);
    CHECK(WIFEXITED(wst) && WEXITSTATUS(wst) == 0);
    chmod(dir, 0700);
    CHECK_RC(load(s, "ok", paths, 0, 1), CKPT_EEXIST);
    CHECK(ckpt_store_count(s) == 1);
    CHECK(count_fds() == fds0);
    unlink(cut);
    ckpt_store_destroy(s);
}

static void test_cycles_no_leak(void)
{
    ckpt_store_t *s = new_store(-1, -1);
    int fds0 = count_fds();
    for (int i = 0; i < 100; i++) {
        CHECK_OK(load(s, "cyc", paths, i % 3, 3));
        CHECK_OK(ckpt_store_unregister(s, "cyc"));
    }
    CHECK(count_fds() == fds0);
    CHECK(ckpt_store_count(s) == 0);
    ckpt_store_destroy(s);
}

static void test_fail_alloc(void)
{
    ckpt_store_t *s = new_store(-1, -1);
    int fds0 = count_fds();
    long k;
    for (k = 0; k < 200; k++) {
        ckpt_testing_fail_alloc_after(k);
        int rc = load(s, "x", paths, 1, 2);
        ckpt_testing_fail_alloc_after(-1);
        if (rc == CKPT_OK) break;
        CHECK(rc == CKPT_ENOMEM);
        CHECK(ckpt_store_count(s) == 0);
        CHECK(count_fds() == fds0);
    }
    CHECK(k < 200 && ckpt_store_count(s) == 1);
    verify(s, "x", 1, 2, 1);
    ckpt_store_destroy(s);
}

int main(void)
{
    snprintf(dir, sizeof(dir), "/tmp/ckpt-test-store-%d", (int)getpid());
    snprintf(shm_dir, sizeof(shm_dir), "/dev/shm/ckpt-test-store-%d", (int)getpid());
    mkdir(dir, 0700);
    mkdir(shm_dir, 0700);
    ntensors = fixture_write(dir, paths, NFILES, tensors, MAXT, &total);
    RUN_TEST(test_paths);
    RUN_TEST(test_shares_read_once);
    RUN_TEST(test_tmpfs_in_place);
    RUN_TEST(test_failures_leave_store_unchanged);
    RUN_TEST(test_cycles_no_leak);
    RUN_TEST(test_fail_alloc);
    for (int f = 0; f < NFILES; f++) unlink(paths[f]);
    rmdir(dir);
    rmdir(shm_dir);
    TEST_EXIT();
}
