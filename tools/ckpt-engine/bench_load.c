/* ckpt-engine bench load: registration of a checkpoint share against the floor, a plain
 * sequential read of the same bytes by one thread, both from a cold page cache. */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "bench.h"
#include "ckpt/ckpt.h"
#include "ckpt/store.h"

#define RAW_BLOCK (16u << 20)
#define MAX_REPEAT 100

typedef struct range {
    int file;
    uint64_t begin, end;
} range_t;

typedef struct bench {
    const char *path;
    int rank, nranks, repeat, io_depth, json;
    char **files;
    size_t nfiles, ntensors;
    range_t *ranges; /* this share's bytes, merged, in file order */
    size_t nranges;
    uint64_t share_bytes, total_bytes;
} bench_t;

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static void usage(FILE *out)
{
    fprintf(out,
            "usage: ckpt-engine bench load PATH [--share r/n] [--repeat K] [--io-depth D] [--json]\n\n"
            "Registers the checkpoint at PATH (file, directory or index.json) as rank r of n\n"
            "would, and reads the same bytes with one thread and large sequential reads (the\n"
            "floor), both with a cold page cache (POSIX_FADV_DONTNEED before every run).\n"
            "Prints the median GB/s of each over K runs (default 3), their ratio, and the\n"
            "bytes read: summed over r = 0..n-1 they equal the checkpoint's tensor bytes.\n");
}

static int cmp_range(const void *a, const void *b)
{
    const range_t *x = a, *y = b;
    if (x->file != y->file) return x->file - y->file;
    return x->begin < y->begin ? -1 : x->begin > y->begin;
}

/* The share's byte ranges, from the headers and the same share policy the store uses. */
static int plan_share(bench_t *b)
{
    ckpt_tensor_meta_t *all = NULL;
    int *file_of = NULL;
    int32_t *owner = NULL;
    size_t n = 0, cap = 0;
    int rc = ckpt_st_list_files(b->path, &b->files, &b->nfiles);
    if (rc) return rc;
    for (size_t f = 0; f < b->nfiles && rc == 0; f++) {
        ckpt_st_file_t *st;
        if ((rc = ckpt_st_open(b->files[f], &st))) break;
        size_t k = ckpt_st_num_tensors(st);
        if (n + k > cap) {
            cap = 2 * (n + k);
            all = realloc(all, cap * sizeof(*all));
            file_of = realloc(file_of, cap * sizeof(*file_of));
            if (!all || !file_of) abort();
        }
        for (size_t i = 0; i < k; i++, n++) {
            all[n] = *ckpt_st_tensor(st, i);
            file_of[n] = (int)f;
        }
        ckpt_st_close(st);
    }
    if (rc == 0) {
        owner = malloc((n ? n : 1) * sizeof(*owner));
        b->ranges = malloc((n ? n : 1) * sizeof(*b->ranges));
        if (!owner || !b->ranges) abort();
        rc = ckpt_plan_shares(all, n, b->nranks, owner);
    }
    for (size_t i = 0; rc == 0 && i < n; i++) {
        b->total_bytes += all[i].nbytes;
        if (owner[i] != b->rank || !all[i].nbytes) continue;
        b->share_bytes += all[i].nbytes;
        b->ranges[b->nranges++] = (range_t){file_of[i], all[i].offset, all[i].offset + all[i].nbytes};
    }
    if (rc == 0) {
        qsort(b->ranges, b->nranges, sizeof(*b->ranges), cmp_range);
        size_t m = 0;
        for (size_t i = 0; i < b->nranges; i++) {
            if (m && b->ranges[m - 1].file == b->ranges[i].file && b->ranges[m - 1].end == b->ranges[i].begin)
                b->ranges[m - 1].end = b->ranges[i].end;
            else
                b->ranges[m++] = b->ranges[i];
        }
        b->nranges = m;
        b->ntensors = n;
    }
    free(all);
    free(file_of);
    free(owner);
    return rc;
}

static void drop_cache(const bench_t *b)
{
    for (size_t f = 0; f < b->nfiles; f++) {
        int fd = open(b->files[f], O_RDONLY | O_CLOEXEC);
        if (fd < 0) continue;
        fdatasync(fd);
        posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED);
        close(fd);
    }
}

/* The floor: one thread, 16 MiB O_DIRECT reads (buffered where O_DIRECT is refused) of
 * the 4 KiB-aligned ranges covering this share. Returns seconds, < 0 on error. */
static double raw_read(const bench_t *b, void *buf, int *direct_out)
{
    double t0 = now_s();
    int direct_all = 1;
    for (size_t i = 0; i < b->nranges;) {
        int f = b->ranges[i].file, direct = 1;
        int fd = open(b->files[f], O_RDONLY | O_CLOEXEC | O_DIRECT);
        if (fd < 0) {
            direct = direct_all = 0;
            fd = open(b->files[f], O_RDONLY | O_CLOEXEC);
        }
        if (fd < 0) return -1;
        for (; i < b->nranges && b->ranges[i].file == f; i++) {
            uint64_t pos = direct ? b->ranges[i].begin & ~4095ull : b->ranges[i].begin;
            while (pos < b->ranges[i].end) {
                ssize_t got = pread(fd, buf, RAW_BLOCK, (off_t)pos);
                if (got <= 0) break; /* end of file */
                pos += (uint64_t)got;
            }
        }
        close(fd);
    }
    *direct_out = direct_all;
    return now_s() - t0;
}

static int parse_args(bench_t *b, int argc, char **argv)
{
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (!strcmp(a, "--help") || !strcmp(a, "-h")) {
            usage(stdout);
            exit(0);
        } else if (!strcmp(a, "--json")) {
            b->json = 1;
        } else if (!strcmp(a, "--share") && i + 1 < argc) {
            if (sscanf(argv[++i], "%d/%d", &b->rank, &b->nranks) != 2 || b->nranks < 1 ||
                b->rank < 0 || b->rank >= b->nranks)
                return fprintf(stderr, "bench load: --share wants r/n with 0 <= r < n\n"), 2;
        } else if (!strcmp(a, "--repeat") && i + 1 < argc) {
            b->repeat = atoi(argv[++i]);
            if (b->repeat < 1 || b->repeat > MAX_REPEAT)
                return fprintf(stderr, "bench load: --repeat wants 1..%d\n", MAX_REPEAT), 2;
        } else if (!strcmp(a, "--io-depth") && i + 1 < argc) {
            b->io_depth = atoi(argv[++i]);
            if (b->io_depth < 1) return fprintf(stderr, "bench load: --io-depth wants >= 1\n"), 2;
        } else if (a[0] != '-' && !b->path) {
            b->path = a;
        } else {
            fprintf(stderr, "bench load: unexpected argument '%s'\n", a);
            usage(stderr);
            return 2;
        }
    }
    if (!b->path) {
        usage(stderr);
        return 2;
    }
    return 0;
}

int bench_load(int argc, char **argv)
{
    bench_t b = {.rank = 0, .nranks = 1, .repeat = 3, .io_depth = 32};
    double raw_s[MAX_REPEAT], reg_s[MAX_REPEAT];
    ckpt_store_stats_t st = {0};
    ckpt_store_t *store = NULL;
    void *buf = NULL;
    int rc = parse_args(&b, argc, argv), raw_direct = 0, status = 1;
    if (rc) return rc;
    if ((rc = plan_share(&b))) {
        fprintf(stderr, "bench load: %s\n", ckpt_last_error());
        goto out;
    }
    if (posix_memalign(&buf, 4096, RAW_BLOCK)) goto out;
    ckpt_store_options_t o = CKPT_STORE_OPTIONS_INIT;
    o.field_mask = CKPT_STORE_OPT_IO_DEPTH;
    o.io_depth = b.io_depth;
    if ((rc = ckpt_store_create(&o, &store))) goto out;
    for (int k = 0; k < b.repeat; k++) {
        /* Alternate the two so that drift in the device's speed hits both alike. */
        drop_cache(&b);
        raw_s[k] = raw_read(&b, buf, &raw_direct);
        if (raw_s[k] < 0) {
            fprintf(stderr, "bench load: raw read failed: %s\n", strerror(errno));
            goto out;
        }
        drop_cache(&b);
        double t0 = now_s();
        if ((rc = ckpt_store_register_files(store, "bench", b.path, b.rank, b.nranks))) {
            fprintf(stderr, "bench load: %s: %s\n", ckpt_strerror(rc), ckpt_last_error());
            goto out;
        }
        reg_s[k] = now_s() - t0;
        ckpt_store_last_stats(store, &st);
        ckpt_store_unregister(store, "bench");
        if (!b.json && isatty(2))
            fprintf(stderr, "\rrun %d/%d: raw %.2f s, register %.2f s", k + 1, b.repeat, raw_s[k], reg_s[k]);
    }
    if (!b.json && isatty(2)) fprintf(stderr, "\n");
    double raw_med = bench_median(raw_s, b.repeat), reg_med = bench_median(reg_s, b.repeat);
    double gb = (double)b.share_bytes / 1e9;
    double raw_gbps = raw_med > 0 ? gb / raw_med : 0, reg_gbps = reg_med > 0 ? gb / reg_med : 0;
    double ratio = raw_gbps > 0 ? reg_gbps / raw_gbps : 0;
    if (b.json) {
        printf("{\"path\": \"%s\", \"rank\": %d, \"nranks\": %d, \"files\": %zu, \"tensors\": %zu, "
               "\"total_bytes\": %llu, \"bytes_read\": %llu, \"bytes_io\": %llu, \"repeat\": %d, "
               "\"raw_seconds\": %.6f, \"register_seconds\": %.6f, \"raw_gbps\": %.4f, "
               "\"register_gbps\": %.4f, \"ratio\": %.4f, \"io_path\": \"%s\", \"raw_direct\": %s}\n",
               b.path, b.rank, b.nranks, b.nfiles, b.ntensors, (unsigned long long)b.total_bytes,
               (unsigned long long)st.bytes_read, (unsigned long long)st.bytes_io, b.repeat, raw_med,
               reg_med, raw_gbps, reg_gbps, ratio, st.io_path, raw_direct ? "true" : "false");
    } else {
        printf("checkpoint   %s: %zu files, %zu tensors, %.3f GB\n", b.path, b.nfiles, b.ntensors,
               (double)b.total_bytes / 1e9);
        printf("share        %d/%d: %.3f GB\n", b.rank, b.nranks, gb);
        printf("raw read     %.3f GB/s  (median of %d, one thread, %s 16 MiB reads)\n", raw_gbps,
               b.repeat, raw_direct ? "O_DIRECT" : "buffered");
        printf("registration %.3f GB/s  (median of %d, %s, io depth %d)\n", reg_gbps, b.repeat,
               st.io_path, b.io_depth);
        printf("ratio        %.3f (registration / raw)\n", ratio);
        printf("bytes read   %llu (share %d/%d; %llu with 4 KiB alignment margins)\n",
               (unsigned long long)st.bytes_read, b.rank, b.nranks, (unsigned long long)st.bytes_io);
    }
    status = 0;
out:
    ckpt_store_destroy(store);
    free(buf);
    ckpt_st_paths_free(b.files, b.nfiles);
    free(b.ranges);
    return status;
}
