/* A CPU stand-in for the CUDA runtime, for tests only: the symbols src/device/cuda_rt.c
 * opens with dlopen, implemented over host memory, so CI (no GPU) runs the engine's CUDA
 * sink (src/engine/sink_cuda.c) and the receiver's CUDA IPC path end to end through
 * CKPT_CUDART=.../libfake_cudart.so. Device memory is a memfd mapping; an IPC handle holds
 * the allocating process's pid and fd, which another process opens at /proc/PID/fd/FD.
 * Copies are synchronous, so every event is complete once recorded. Never shipped. */
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define EXPORT __attribute__((visibility("default")))
#define MAX_ALLOCS 64
#define HANDLE_MAGIC 0x46414b45u /* "FAKE" */

typedef struct {
    void *ptr;
    size_t size;
    int fd;
} alloc_t;

static alloc_t allocs[MAX_ALLOCS];
static int current_device;

typedef struct {
    double t;
} event_t;

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static alloc_t *find(const void *p)
{
    for (int i = 0; i < MAX_ALLOCS; i++)
        if (allocs[i].ptr && (const char *)p >= (const char *)allocs[i].ptr &&
            (const char *)p < (const char *)allocs[i].ptr + allocs[i].size)
            return &allocs[i];
    return NULL;
}

static alloc_t *slot(void)
{
    for (int i = 0; i < MAX_ALLOCS; i++)
        if (!allocs[i].ptr) return &allocs[i];
    return NULL;
}

EXPORT int cudaGetDeviceCount(int *n) { *n = 1; return 0; }
EXPORT int cudaSetDevice(int d) { if (d != 0) return 101; current_device = d; return 0; }
EXPORT int cudaMemGetInfo(size_t *free_b, size_t *total)
{
    *free_b = (size_t)1 << 30;
    *total = (size_t)2 << 30;
    return 0;
}

EXPORT int cudaMalloc(void **p, size_t size)
{
    alloc_t *a = slot();
    if (!a) return 2;
    int fd = memfd_create("fake-cuda", MFD_CLOEXEC);
    if (fd < 0 || ftruncate(fd, (off_t)size) != 0) return 2;
    void *m = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (m == MAP_FAILED) return 2;
    *a = (alloc_t){m, size, fd};
    *p = m;
    return 0;
}

EXPORT int cudaFree(void *p)
{
    alloc_t *a = find(p);
    if (!a || a->ptr != p) return 1;
    munmap(a->ptr, a->size);
    if (a->fd >= 0) close(a->fd);
    memset(a, 0, sizeof(*a));
    return 0;
}

EXPORT int cudaHostRegister(void *p, size_t n, unsigned flags) { (void)p, (void)n, (void)flags; return 0; }
EXPORT int cudaHostUnregister(void *p) { (void)p; return 0; }
EXPORT int cudaMemcpy(void *d, const void *s, size_t n, int kind) { (void)kind; memcpy(d, s, n); return 0; }
EXPORT int cudaMemcpyAsync(void *d, const void *s, size_t n, int kind, void *stream)
{
    (void)stream;
    /* Host to device must land in device memory, as on a GPU (catches a put to the host). */
    if (kind == 1 && !find(d)) return 1;
    memcpy(d, s, n);
    return 0;
}

EXPORT int cudaStreamCreateWithFlags(void **s, unsigned f) { (void)f; *s = malloc(1); return 0; }
EXPORT int cudaStreamDestroy(void *s) { free(s); return 0; }
EXPORT int cudaStreamWaitEvent(void *s, void *e, unsigned f) { (void)s, (void)e, (void)f; return 0; }
EXPORT int cudaEventCreateWithFlags(void **e, unsigned f) { (void)f; *e = calloc(1, sizeof(event_t)); return 0; }
EXPORT int cudaEventDestroy(void *e) { free(e); return 0; }
EXPORT int cudaEventRecord(void *e, void *s) { (void)s; ((event_t *)e)->t = now(); return 0; }
EXPORT int cudaEventQuery(void *e) { (void)e; return 0; }
EXPORT int cudaEventElapsedTime(float *ms, void *a, void *b)
{
    *ms = (float)((((event_t *)b)->t - ((event_t *)a)->t) * 1e3);
    if (*ms <= 0) *ms = 1e-3f;
    return 0;
}

typedef struct {
    char bytes[64];
} handle_t;

EXPORT int cudaIpcGetMemHandle(handle_t *h, void *p)
{
    alloc_t *a = find(p);
    if (!a) return 1;
    uint32_t v[3] = {HANDLE_MAGIC, (uint32_t)getpid(), (uint32_t)a->fd};
    uint64_t size = a->size;
    memset(h, 0, sizeof(*h));
    memcpy(h->bytes, v, sizeof(v));
    memcpy(h->bytes + 16, &size, 8);
    return 0;
}

EXPORT int cudaIpcOpenMemHandle(void **p, handle_t h, unsigned flags)
{
    (void)flags;
    uint32_t v[3];
    uint64_t size;
    memcpy(v, h.bytes, sizeof(v));
    memcpy(&size, h.bytes + 16, 8);
    if (v[0] != HANDLE_MAGIC) return 400; /* cudaErrorInvalidResourceHandle */
    char path[64];
    snprintf(path, sizeof(path), "/proc/%u/fd/%u", v[1], v[2]);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return 400;
    void *m = mmap(NULL, size, PROT_READ, MAP_SHARED, fd, 0);
    close(fd);
    if (m == MAP_FAILED) return 2;
    alloc_t *a = slot();
    if (!a) return 2;
    *a = (alloc_t){m, size, -1};
    *p = m;
    return 0;
}

EXPORT int cudaIpcCloseMemHandle(void *p) { return cudaFree(p); }
EXPORT const char *cudaGetErrorString(int e) { return e ? "fake CUDA runtime error" : "no error"; }
EXPORT const char *cudaGetErrorName(int e) { return e ? "cudaErrorFake" : "cudaSuccess"; }
