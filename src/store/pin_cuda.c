/* Pins pool regions for the GPU when the CUDA runtime is present at run time. libckpt never
 * links CUDA (the CPU build and CPU-only hosts must load it), so libcudart is opened with
 * dlopen on first use and pinning is skipped quietly when it is absent. */
#include <dlfcn.h>

#include "store/store_int.h"

#define CKPT__CUDA_HOST_REGISTER_PORTABLE 0x01
#define CKPT__CUDA_HOST_REGISTER_READ_ONLY 0x08

static void cuda_load(ckpt__cuda_t *cuda)
{
    static const char *const names[] = {"libcudart.so", "libcudart.so.12", "libcudart.so.11.0"};
    cuda->tried = 1;
    for (size_t i = 0; i < CKPT_ARRAY_SIZE(names) && !cuda->lib; i++)
        cuda->lib = dlopen(names[i], RTLD_LAZY | RTLD_LOCAL);
    if (!cuda->lib) {
        ckpt_debug("pool: libcudart not found, pool memory is not pinned");
        return;
    }
    *(void **)&cuda->host_register = dlsym(cuda->lib, "cudaHostRegister");
    *(void **)&cuda->host_unregister = dlsym(cuda->lib, "cudaHostUnregister");
    if (!cuda->host_register || !cuda->host_unregister) {
        ckpt_debug("pool: libcudart lacks cudaHostRegister, pool memory is not pinned");
        dlclose(cuda->lib);
        cuda->lib = NULL;
    }
}

int ckpt__cuda_pin(ckpt__cuda_t *cuda, void *base, uint64_t size, int read_only)
{
    if (!base || !size) return 0;
    if (!cuda->tried) cuda_load(cuda);
    if (!cuda->lib) return 0;
    unsigned flags = CKPT__CUDA_HOST_REGISTER_PORTABLE;
    if (read_only) flags |= CKPT__CUDA_HOST_REGISTER_READ_ONLY;
    int err = cuda->host_register(base, (size_t)size, flags);
    if (err != 0) {
        ckpt_debug("pool: cudaHostRegister(%llu bytes) failed with CUDA error %d, not pinned",
                   (unsigned long long)size, err);
        return 0;
    }
    return 1;
}

void ckpt__cuda_unpin(ckpt__cuda_t *cuda, void *base)
{
    if (cuda->lib && base) cuda->host_unregister(base);
}

void ckpt__cuda_close(ckpt__cuda_t *cuda)
{
    if (cuda->lib) dlclose(cuda->lib);
    cuda->lib = NULL;
    cuda->tried = 0;
}
