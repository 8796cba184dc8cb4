/* IPC buffers shared by the ranks of a group and handed to their workers as fds.
 *
 * The group leader creates a POSIX shared-memory file with a unique name, the other ranks
 * of the group open it by name, and the leader unlinks it once everyone holds an fd: the
 * memory lives exactly as long as some process maps it, and nothing is left in /dev/shm
 * if a rank dies. Buffers are kept from one update to the next and re-made only when the
 * planned size changes. */
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/statvfs.h>
#include <unistd.h>

#include "device/cuda_rt.h"
#include "engine/buffers.h"
#include "engine/coll.h"

uint64_t ckpt__host_available_bytes(void)
{
    uint64_t avail = 0;
    FILE *f = fopen("/proc/meminfo", "r");
    if (f) {
        char line[256];
        unsigned long long kb;
        while (fgets(line, sizeof(line), f))
            if (sscanf(line, "MemAvailable: %llu kB", &kb) == 1) avail = kb * 1024ull;
        fclose(f);
    }
    struct statvfs vfs;
    if (statvfs("/dev/shm", &vfs) == 0) {
        uint64_t shm = (uint64_t)vfs.f_bavail * vfs.f_frsize;
        if (avail == 0 || shm < avail) avail = shm;
    }
    return avail;
}

void ckpt__buffers_release(ckpt_engine_t *e)
{
    ckpt__buffers_t *b = &e->buffers;
    for (int i = 0; i < CKPT__HOST_BUFFERS_MAX; i++) {
        if (b->pinned[i]) ckpt__cuda_unpin(b->ptr[i]);
        b->pinned[i] = 0;
        if (b->ptr[i]) munmap(b->ptr[i], b->size);
        if (b->fds[i] >= 0) close(b->fds[i]);
        b->ptr[i] = NULL;
        b->fds[i] = -1;
    }
    b->nbuffers = 0;
    b->size = 0;
}

static int open_one(ckpt_engine_t *e, int index, uint64_t size, int timeout_ms)
{
    char name[96];
    int rc = CKPT_OK, fd = -1;
    if (e->group_rank == 0) {
        static unsigned seq;
        snprintf(name, sizeof(name), "/ckpt-engine-%d-%u-%d", (int)getpid(), seq++, index);
        fd = shm_open(name, O_CREAT | O_EXCL | O_RDWR | O_CLOEXEC, 0600);
        if (fd < 0) {
            rc = ckpt__error(CKPT_EIO, "rank %d: shm_open(%s): %m", e->rank, name);
        } else if (ftruncate(fd, (off_t)size) != 0) {
            rc = ckpt__error(CKPT_ENOMEM, "rank %d: sizing IPC buffer %s to %llu bytes: %m",
                             e->rank, name, (unsigned long long)size);
        }
        if (rc < 0) name[0] = '\0'; /* tells the others that creation failed */
    }
    int brc = ckpt__bcast_bytes(e, name, sizeof(name), 0, e->group, timeout_ms, "buffer setup");
    if (brc < 0) rc = brc;
    if (rc == CKPT_OK && e->group_rank != 0) {
        if (name[0] == '\0') {
            rc = ckpt__error(CKPT_EIO, "rank %d: the group leader could not create the IPC "
                             "buffer", e->rank);
        } else {
            fd = shm_open(name, O_RDWR | O_CLOEXEC, 0600);
            if (fd < 0) rc = ckpt__error(CKPT_EIO, "rank %d: shm_open(%s): %m", e->rank, name);
        }
    }
    /* Everyone holds an fd (or failed) before the name disappears. */
    brc = ckpt__barrier(e, e->group, timeout_ms, "buffer setup");
    if (brc < 0) rc = brc;
    if (e->group_rank == 0 && name[0] != '\0') shm_unlink(name);
    if (rc < 0) goto fail;
    /* Pre-fault the pages (every rank maps its own page tables) so the first bucket does
     * not pay one fault per 4 KiB. */
    int flags = MAP_SHARED | MAP_POPULATE;
    void *p = mmap(NULL, size, PROT_READ | PROT_WRITE, flags, fd, 0);
    if (p == MAP_FAILED) {
        rc = ckpt__error(CKPT_ENOMEM, "rank %d: mapping IPC buffer of %llu bytes: %m", e->rank,
                         (unsigned long long)size);
        goto fail;
    }
    e->buffers.fds[index] = fd;
    e->buffers.ptr[index] = p;
    return CKPT_OK;
fail:
    if (fd >= 0) close(fd);
    return rc;
}

int ckpt__buffers_ensure(ckpt_engine_t *e, uint64_t size, int nbuffers, int timeout_ms)
{
    ckpt__buffers_t *b = &e->buffers;
    /* Larger buffers serve smaller buckets: re-made only when a bucket does not fit. */
    if (b->size >= size && b->nbuffers == nbuffers) return CKPT_OK;
    ckpt__buffers_release(e);
    int rc = CKPT_OK;
    b->size = size;
    for (int i = 0; i < nbuffers && rc == CKPT_OK; i++) rc = open_one(e, i, size, timeout_ms);
    if (rc < 0) {
        ckpt__buffers_release(e);
        return rc;
    }
    b->nbuffers = nbuffers;
    ckpt_debug("IPC buffers: %d x %llu bytes", nbuffers, (unsigned long long)size);
    return CKPT_OK;
}

int ckpt__buffer_budget(ckpt_engine_t *e, int timeout_ms, uint64_t *budget_out)
{
    /* A configured limit is the total the buffers may use. Otherwise half of what is free
     * (the rest is for the pools, the workers and everything else), on top of the buffers
     * already held. */
    uint64_t avail = e->opts.memory_limit ? e->opts.memory_limit
                                          : ckpt__host_available_bytes() / 2;
    uint64_t min_avail = avail;
    MPI_Request req;
    MPI_Iallreduce(&avail, &min_avail, 1, MPI_UINT64_T, MPI_MIN, e->world, &req);
    int rc = ckpt__mpi_wait(e, &req, timeout_ms, 200, "memory agreement");
    if (rc == CKPT_OK) *budget_out = min_avail;
    return rc;
}
