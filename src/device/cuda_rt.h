/* The CUDA runtime, opened with dlopen (never linked): libckpt, the tools and the CPU tests
 * load on machines without CUDA, and a GPU machine's runtime is found at run time (a pip
 * wheel's libcudart.so.13 as well as the toolkit's). Used by the store (pinning pools), the
 * engine's CUDA sink (engine/sink_cuda.c) and the receiver (opening CUDA IPC handles).
 *
 * Where to look: $CKPT_CUDART (a path) first, then libcudart.so.13, .so.12 and .so by the
 * loader's search path. The table's types are checked against the toolkit's headers when
 * the build has them (cuda_rt.c); the calls never need them. */
#ifndef CKPT_DEVICE_CUDA_RT_H
#define CKPT_DEVICE_CUDA_RT_H

#include <stddef.h>
#include <stdint.h>

#include "core/internal.h"

#pragma GCC visibility push(hidden)

#define CKPT__CUDA_IPC_HANDLE 64 /* bytes of a cudaIpcMemHandle_t */

/* cudaMemcpyKind's values used here. */
#define CKPT__CUDA_H2D 1
#define CKPT__CUDA_D2H 2
#define CKPT__CUDA_DEFAULT 4

typedef struct {
    char bytes[CKPT__CUDA_IPC_HANDLE];
} ckpt__cuda_ipc_t;

typedef struct ckpt__cudart {
    void *lib;
    char path[256]; /* what was opened */
    int (*GetDeviceCount)(int *);
    int (*SetDevice)(int);
    int (*MemGetInfo)(size_t *, size_t *);
    int (*Malloc)(void **, size_t);
    int (*Free)(void *);
    int (*HostRegister)(void *, size_t, unsigned);
    int (*HostUnregister)(void *);
    int (*Memcpy)(void *, const void *, size_t, int);
    int (*MemcpyAsync)(void *, const void *, size_t, int, void *);
    int (*StreamCreateWithFlags)(void **, unsigned);
    int (*StreamDestroy)(void *);
    int (*StreamWaitEvent)(void *, void *, unsigned);
    int (*EventCreateWithFlags)(void **, unsigned);
    int (*EventDestroy)(void *);
    int (*EventRecord)(void *, void *);
    int (*EventQuery)(void *);
    int (*EventElapsedTime)(float *, void *, void *);
    int (*IpcGetMemHandle)(ckpt__cuda_ipc_t *, void *);
    int (*IpcOpenMemHandle)(void **, ckpt__cuda_ipc_t, unsigned);
    int (*IpcCloseMemHandle)(void *);
    const char *(*GetErrorString)(int);
    const char *(*GetErrorName)(int);
} ckpt__cudart_t;

#define CKPT__CUDA_NOT_READY 600       /* cudaErrorNotReady: an event not reached yet */
#define CKPT__CUDA_STREAM_NONBLOCKING 1
#define CKPT__CUDA_EVENT_DISABLE_TIMING 2
#define CKPT__CUDA_IPC_LAZY_PEER 1     /* cudaIpcMemLazyEnablePeerAccess */
#define CKPT__CUDA_HOST_REGISTER_PORTABLE 1
#define CKPT__CUDA_HOST_REGISTER_READ_ONLY 8

/* The process's table, loaded once (thread-safe). CKPT_EUNSUPPORTED naming the cause (no
 * libcudart found where it looked, a symbol missing) when there is none. */
int ckpt__cudart(const ckpt__cudart_t **out);
/* Sets this thread's error to "what: <CUDA's name and text>" and returns a status:
 * CKPT_EUNSUPPORTED for no device / no driver, CKPT_ENOMEM for out of memory, else EIO. */
int ckpt__cuda_fail(const ckpt__cudart_t *rt, int e, const char *what);
/* Number of visible devices; < 0 with the cause (no runtime, no driver, no GPU: then
 * CKPT_EUNSUPPORTED) as this thread's error. */
int ckpt__cuda_devices(void);
/* Copies len bytes between two addresses CUDA knows (host or device), synchronously. */
int ckpt__cuda_copy(void *dst, const void *src, size_t len);

/* Pins [base, base + size) of host memory for fast, asynchronous copies to the GPU: 1 when
 * pinned, 0 when not (no runtime, no GPU, the driver refused: logged at debug level, never
 * an error, the memory works unpinned). */
int ckpt__cuda_pin(void *base, uint64_t size, int read_only);
void ckpt__cuda_unpin(void *base);

#pragma GCC visibility pop

#endif
