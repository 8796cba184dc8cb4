/* The CUDA back end, as a module of its own (libckpt_cuda.so): built only when the CUDA
 * toolkit is present, loaded with dlopen by whoever needs a GPU, so libckpt, the tools and
 * the CPU tests never link CUDA (UCX keeps its CUDA transports apart the same way).
 *
 * It holds what the device path of an update needs from the runtime: probing the devices,
 * pinning host memory (so host-to-device copies run at full speed and asynchronously) and
 * staging a host bucket into device memory on a stream. Every call returns 0 or a negative
 * CKPT_E* status and writes a text naming the CUDA error into err. */
#include <cuda_runtime_api.h>
#include <stdio.h>

#include "ckpt/ckpt.h"

#define CKPT_CUDA_EXPORT __attribute__((visibility("default")))

static int fail(cudaError_t e, const char *what, char *err, size_t cap)
{
    if (err && cap)
        snprintf(err, cap, "%s: %s (%s)", what, cudaGetErrorString(e), cudaGetErrorName(e));
    return e == cudaErrorNoDevice || e == cudaErrorInsufficientDriver ? CKPT_EUNSUPPORTED
                                                                      : CKPT_EIO;
}

/* Number of usable devices and the first one's name; CKPT_EUNSUPPORTED when the machine
 * has no GPU or no driver (the text says which). */
CKPT_CUDA_EXPORT int ckpt_cuda_probe(int *ndevices_out, char *name, size_t name_cap, char *err,
                                     size_t err_cap)
{
    int n = 0;
    cudaError_t e = cudaGetDeviceCount(&n);
    if (e != cudaSuccess) return fail(e, "cudaGetDeviceCount", err, err_cap);
    struct cudaDeviceProp prop;
    e = cudaGetDeviceProperties(&prop, 0);
    if (e != cudaSuccess) return fail(e, "cudaGetDeviceProperties", err, err_cap);
    if (name && name_cap) snprintf(name, name_cap, "%s", prop.name);
    *ndevices_out = n;
    return CKPT_OK;
}

/* Pins [ptr, ptr+len) of host memory (a pool region or an IPC buffer) for the GPU. */
CKPT_CUDA_EXPORT int ckpt_cuda_pin(void *ptr, size_t len, char *err, size_t err_cap)
{
    cudaError_t e = cudaHostRegister(ptr, len, cudaHostRegisterPortable);
    return e == cudaSuccess ? CKPT_OK : fail(e, "cudaHostRegister", err, err_cap);
}

CKPT_CUDA_EXPORT int ckpt_cuda_unpin(void *ptr, char *err, size_t err_cap)
{
    cudaError_t e = cudaHostUnregister(ptr);
    return e == cudaSuccess ? CKPT_OK : fail(e, "cudaHostUnregister", err, err_cap);
}

/* Device memory for a staging buffer (a bucket) and its release. */
CKPT_CUDA_EXPORT int ckpt_cuda_alloc(void **dev_out, size_t len, char *err, size_t err_cap)
{
    cudaError_t e = cudaMalloc(dev_out, len);
    return e == cudaSuccess ? CKPT_OK : fail(e, "cudaMalloc", err, err_cap);
}

CKPT_CUDA_EXPORT void ckpt_cuda_free(void *dev) { cudaFree(dev); }

/* Stages a host bucket into device memory and waits for it: the *stage* step of an update
 * on a GPU (the broadcast then runs device to device). */
CKPT_CUDA_EXPORT int ckpt_cuda_stage(void *dev_dst, const void *host_src, size_t len,
                                     char *err, size_t err_cap)
{
    cudaStream_t s;
    cudaError_t e = cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking);
    if (e != cudaSuccess) return fail(e, "cudaStreamCreate", err, err_cap);
    e = cudaMemcpyAsync(dev_dst, host_src, len, cudaMemcpyHostToDevice, s);
    if (e == cudaSuccess) e = cudaStreamSynchronize(s);
    cudaStreamDestroy(s);
    return e == cudaSuccess ? CKPT_OK : fail(e, "cudaMemcpyAsync host to device", err, err_cap);
}

/* Reads device bytes back (verification in tests). */
CKPT_CUDA_EXPORT int ckpt_cuda_read(void *host_dst, const void *dev_src, size_t len, char *err,
                                    size_t err_cap)
{
    cudaError_t e = cudaMemcpy(host_dst, dev_src, len, cudaMemcpyDeviceToHost);
    return e == cudaSuccess ? CKPT_OK : fail(e, "cudaMemcpy device to host", err, err_cap);
}
