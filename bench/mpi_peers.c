/* What a user writing the weight sync by hand with MPI would do, for bench/peers.py:
 *
 *   mpirun -np N+1 mpi_peers --mode pertensor|bucketed|floor CHECKPOINT [--bucket SIZE]
 *          [--repeat R]
 *
 * Rank 0 is the trainer: it reads the checkpoint (a safetensors file, directory or index)
 * into one buffer per tensor before anything is timed. Ranks 1..N are the workers, each
 * holding its own buffer per tensor, allocated and touched before the clock starts (a
 * serving worker's tensors exist already). Timed, from a barrier to the last rank done:
 *
 *   pertensor  one MPI_Bcast per tensor, straight from the trainer's tensor into each
 *              worker's tensor (the naive loop);
 *   bucketed   the tensors packed into a bucket buffer, one MPI_Bcast per bucket, every
 *              worker unpacking into its tensors (what a careful hand-written sync does);
 *   floor      MPI_Bcast of the same bytes from one flat buffer into flat buffers, in
 *              bucket-sized calls: what MPI itself delivers, no packing at all.
 *
 * After each repeat every worker's tensors are checksummed (XXH3-64, as the engine does)
 * and compared with the trainer's, then overwritten, so every repeat is verified on its
 * own. Rank 0 prints one JSON line per repeat. Exit status 0 when every repeat verified. */
#include <inttypes.h>
#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "ckpt/ckpt.h"
#include "ckpt/safetensors.h"

#define CHUNK (1u << 30) /* MPI counts are ints: larger tensors go in 1 GiB calls */

typedef struct {
    uint64_t nbytes;
    char *data;
} tensor_t;

static double now_s(void)
{
    /* CLOCK_MONOTONIC is one clock for every process of the host, so the start of rank 0
     * and the end of the last rank can be subtracted. */
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static void die(const char *what)
{
    fprintf(stderr, "mpi_peers: %s\n", what);
    MPI_Abort(MPI_COMM_WORLD, 2);
}

static char *alloc_touched(uint64_t n)
{
    void *p = NULL;
    if (posix_memalign(&p, 4096, n ? n : 1) != 0) die("out of memory allocating tensors");
    memset(p, 0, n);
    return p;
}

static void bcast(char *p, uint64_t n)
{
    for (uint64_t off = 0; off < n; off += CHUNK) {
        uint64_t len = n - off < CHUNK ? n - off : CHUNK;
        MPI_Bcast(p + off, (int)len, MPI_BYTE, 0, MPI_COMM_WORLD);
    }
}

/* Loads every tensor of every file of PATH: rank 0 with its bytes, the others sized only. */
static tensor_t *load(const char *path, int rank, size_t *count_out)
{
    char **files = NULL;
    size_t nfiles = 0, n = 0, cap = 0;
    tensor_t *t = NULL;
    if (ckpt_st_list_files(path, &files, &nfiles) < 0) die(ckpt_last_error());
    for (size_t f = 0; f < nfiles; f++) {
        ckpt_st_file_t *st = NULL;
        if (ckpt_st_open(files[f], &st) < 0) die(ckpt_last_error());
        for (size_t i = 0; i < ckpt_st_num_tensors(st); i++) {
            if (n == cap) {
                cap = cap ? 2 * cap : 1024;
                t = realloc(t, cap * sizeof(*t));
                if (!t) die("out of memory");
            }
            t[n].nbytes = ckpt_st_tensor(st, i)->nbytes;
            t[n].data = alloc_touched(t[n].nbytes);
            if (rank == 0 && ckpt_st_read_tensor(st, i, t[n].data, t[n].nbytes) < 0)
                die(ckpt_last_error());
            n++;
        }
        ckpt_st_close(st);
    }
    ckpt_st_paths_free(files, nfiles);
    *count_out = n;
    return t;
}

/* Bucketed: the tensors as one byte stream cut into buckets (a tensor larger than the
 * bucket spans several). `pack` copies tensors -> bucket on rank 0, else bucket -> tensors. */
static void run_bucketed(tensor_t *t, size_t n, char *bucket, uint64_t bsize, int rank)
{
    size_t ti = 0;
    uint64_t toff = 0;
    while (ti < n) {
        uint64_t used = 0;
        size_t si = ti;
        uint64_t soff = toff;
        while (ti < n && used < bsize) {
            uint64_t take = t[ti].nbytes - toff;
            if (take > bsize - used) take = bsize - used;
            if (rank == 0) memcpy(bucket + used, t[ti].data + toff, take);
            used += take;
            toff += take;
            if (toff == t[ti].nbytes) { ti++; toff = 0; }
        }
        bcast(bucket, used);
        if (rank != 0) {
            uint64_t pos = 0;
            while (pos < used) {
                uint64_t take = t[si].nbytes - soff;
                if (take > used - pos) take = used - pos;
                memcpy(t[si].data + soff, bucket + pos, take);
                pos += take;
                soff += take;
                if (soff == t[si].nbytes) { si++; soff = 0; }
            }
        }
    }
}

int main(int argc, char **argv)
{
    MPI_Init(&argc, &argv);
    int rank, size;
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &size);
    const char *mode = NULL, *path = NULL;
    uint64_t bsize = 256ull << 20;
    int repeat = 1;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--mode") && i + 1 < argc) mode = argv[++i];
        else if (!strcmp(argv[i], "--bucket") && i + 1 < argc) {
            if (ckpt_parse_size(argv[++i], &bsize) < 0 || bsize == 0) die(ckpt_last_error());
        } else if (!strcmp(argv[i], "--repeat") && i + 1 < argc) repeat = atoi(argv[++i]);
        else if (argv[i][0] != '-' && !path) path = argv[i];
        else die("usage: mpirun -np N+1 mpi_peers --mode pertensor|bucketed|floor CHECKPOINT "
                 "[--bucket SIZE] [--repeat R]");
    }
    if (!mode || !path || repeat < 1) die("--mode and a checkpoint path are required");
    int m = !strcmp(mode, "pertensor") ? 0 : !strcmp(mode, "bucketed") ? 1
          : !strcmp(mode, "floor") ? 2 : -1;
    if (m < 0) die("--mode is one of pertensor, bucketed, floor");
    if (size < 2) die("needs at least 2 ranks: rank 0 is the trainer, the others workers");

    size_t n = 0;
    tensor_t *t = load(path, rank, &n);
    uint64_t total = 0;
    for (size_t i = 0; i < n; i++) total += t[i].nbytes;
    char *flat = NULL, *bucket = NULL;
    if (m == 2) {
        /* The floor moves the same bytes, laid out flat on every rank. */
        flat = alloc_touched(total);
        if (rank == 0) {
            uint64_t off = 0;
            for (size_t i = 0; i < n; i++) {
                memcpy(flat + off, t[i].data, t[i].nbytes);
                off += t[i].nbytes;
            }
        }
        for (size_t i = 0; i < n; i++) free(t[i].data);
    } else if (m == 1) {
        bucket = alloc_touched(bsize);
    }
    /* The trainer's checksums, once: what every worker must hold. */
    size_t nsum = m == 2 ? 1 : n;
    uint64_t *want = calloc(nsum, sizeof(*want)), *got = calloc(nsum, sizeof(*got));
    if (!want || !got) die("out of memory");
    if (rank == 0)
        for (size_t i = 0; i < nsum; i++)
            want[i] = m == 2 ? ckpt_checksum(flat, total) : ckpt_checksum(t[i].data, t[i].nbytes);
    MPI_Bcast(want, (int)nsum, MPI_UINT64_T, 0, MPI_COMM_WORLD);

    int all_ok = 1;
    for (int r = 0; r < repeat; r++) {
        MPI_Barrier(MPI_COMM_WORLD);
        double t0 = now_s();
        if (m == 0)
            for (size_t i = 0; i < n; i++) bcast(t[i].data, t[i].nbytes);
        else if (m == 1)
            run_bucketed(t, n, bucket, bsize, rank);
        else
            for (uint64_t off = 0; off < total; off += bsize)
                bcast(flat + off, total - off < bsize ? total - off : bsize);
        double t1 = now_s(), end = 0;
        MPI_Reduce(&t1, &end, 1, MPI_DOUBLE, MPI_MAX, 0, MPI_COMM_WORLD);
        /* Verification, untimed: every worker's bytes against the trainer's checksums. */
        long bad = 0, bad_all = 0;
        if (rank != 0) {
            for (size_t i = 0; i < nsum; i++) {
                got[i] = m == 2 ? ckpt_checksum(flat, total) : ckpt_checksum(t[i].data, t[i].nbytes);
                if (got[i] != want[i]) bad++;
            }
            /* Overwrite, so the next repeat has to deliver every byte again. */
            if (m == 2) memset(flat, 0xa5, total);
            else for (size_t i = 0; i < n; i++) memset(t[i].data, 0xa5, t[i].nbytes);
        }
        MPI_Reduce(&bad, &bad_all, 1, MPI_LONG, MPI_SUM, 0, MPI_COMM_WORLD);
        if (rank == 0) {
            printf("{\"mode\":\"%s\",\"repeat\":%d,\"seconds\":%.6f,\"bytes\":%" PRIu64
                   ",\"tensors\":%zu,\"workers\":%d,\"verified\":%s,\"mismatches\":%ld}\n",
                   mode, r, end - t0, total, n, size - 1, bad_all ? "false" : "true", bad_all);
            fflush(stdout);
        }
        if (bad_all) all_ok = 0;
    }
    MPI_Bcast(&all_ok, 1, MPI_INT, 0, MPI_COMM_WORLD);
    MPI_Finalize();
    return all_ok ? 0 : 1;
}
