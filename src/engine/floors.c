/* Physical floors measured in the same run as the update they are compared with:
 * single-core copy bandwidth (rank 0 alone, large buffers, so it measures memory, not
 * cache), with memcpy and with streaming stores (core/copy.c), alternating, and MPI_Bcast
 * bandwidth over all ranks. */
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "engine/coll.h"
#include "engine/floors.h"

#define FLOOR_BYTES (256ull << 20)
#define FLOOR_REPS 5

/* Best of FLOOR_REPS copies of FLOOR_BYTES, with memcpy (out[0]) and with streaming
 * stores (out[1]) in turn, so drift hits both alike. With from_shm the source is a memfd mapping,
 * as the IPC buffers and pools that workers read are. The destination is page-aligned
 * like the source: a malloc'd one starts 16 bytes into a page, and a copy whose
 * destination is a little more than a multiple of 4 KiB past its source runs 2-3x slower
 * on x86 (4K aliasing). That, not shared memory, is what made this floor read 3.5-3.9
 * GB/s before (docs/DESIGN-NOTES.md). */
static void copy_gbps(int from_shm, double out[2])
{
    char *a = NULL, *b = mmap(NULL, FLOOR_BYTES, PROT_READ | PROT_WRITE,
                              MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (b == MAP_FAILED) b = NULL;
    out[0] = out[1] = 0;
    if (from_shm) {
        int fd = memfd_create("ckpt-floor", MFD_CLOEXEC);
        if (fd >= 0 && ftruncate(fd, FLOOR_BYTES) == 0) {
            a = mmap(NULL, FLOOR_BYTES, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
            if (a == MAP_FAILED) a = NULL;
        }
        if (fd >= 0) close(fd);
    } else {
        a = ckpt__malloc(FLOOR_BYTES);
    }
    if (a && b) {
        memset(a, 1, FLOOR_BYTES);
        memset(b, 2, FLOOR_BYTES); /* fault the pages in before timing */
        for (int i = 0; i < 2 * FLOOR_REPS; i++) {
            int stream = i % 2;
            /* shared memory is the source, as for workers; else back and forth */
            char *dst = from_shm ? b : (i / 2) % 2 ? a : b;
            const char *src = from_shm ? a : (i / 2) % 2 ? b : a;
            double t = ckpt__now_s();
            if (stream) {
                ckpt__copy_stream(dst, src, FLOOR_BYTES);
                ckpt__copy_fence();
            } else {
                memcpy(dst, src, FLOOR_BYTES);
            }
            double dt = ckpt__now_s() - t;
            double gbps = (double)FLOOR_BYTES / dt / 1e9;
            if (gbps > out[stream]) out[stream] = gbps;
        }
    }
    if (from_shm && a) munmap(a, FLOOR_BYTES);
    else ckpt__free(a);
    if (b) munmap(b, FLOOR_BYTES);
}

int ckpt__floors_run(ckpt_engine_t *e, ckpt_floors_t *floors)
{
    memset(floors, 0, sizeof(*floors));
    double one[2];
    if (e->rank == 0) {
        copy_gbps(0, one);
        floors->memcpy_gbps = one[0];
        floors->stream_gbps = one[1];
    }
    /* All ranks at once out of shared memory, like the workers of an update. */
    int rc = ckpt__barrier(e, e->world, e->opts.timeout_ms, "floor barrier");
    if (rc < 0) ckpt__engine_fatal(e, ckpt_last_error());
    double mine[2], slowest[2] = {0, 0};
    copy_gbps(1, mine);
    MPI_Allreduce(mine, slowest, 2, MPI_DOUBLE, MPI_MIN, e->world);
    floors->memcpy_concurrent_gbps = slowest[0];
    floors->stream_concurrent_gbps = slowest[1];
    const uint64_t bytes = 64ull << 20;
    if (e->size == 1) return CKPT_OK; /* no broadcast with one rank: reported as n/a */
    char *buf = ckpt__malloc(bytes);
    int ok = buf != NULL, all_ok = 0;
    MPI_Allreduce(&ok, &all_ok, 1, MPI_INT, MPI_MIN, e->world);
    if (!all_ok) {
        ckpt__free(buf);
        return ckpt__error(CKPT_ENOMEM, "rank %d: no memory for the MPI_Bcast floor", e->rank);
    }
    memset(buf, e->rank, bytes);
    double best = 0;
    for (int i = 0; i < FLOOR_REPS; i++) {
        int rc = ckpt__barrier(e, e->world, e->opts.timeout_ms, "floor barrier");
        if (rc < 0) ckpt__engine_fatal(e, ckpt_last_error());
        double t = ckpt__now_s();
        /* A plain blocking MPI_Bcast: the floor is what MPI itself achieves. */
        MPI_Bcast(buf, (int)bytes, MPI_BYTE, i % e->size, e->world);
        double dt = ckpt__now_s() - t, slowest = 0;
        MPI_Allreduce(&dt, &slowest, 1, MPI_DOUBLE, MPI_MAX, e->world);
        double gbps = (double)bytes / slowest / 1e9;
        if (gbps > best) best = gbps;
    }
    ckpt__free(buf);
    floors->bcast_gbps = best;
    floors->bcast_bytes = bytes;
    return CKPT_OK;
}
