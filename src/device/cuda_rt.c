/* The CUDA runtime's table (cuda_rt.h): dlopen once, every symbol or none. */
#include <dlfcn.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "device/cuda_rt.h"

#ifdef CKPT_HAVE_CUDA_HEADERS
/* The table mirrors the runtime's prototypes by hand (the calls need no headers); where
 * the toolkit's headers exist the build checks the mirror's sizes and constants. */
#include <cuda_runtime_api.h>
_Static_assert(sizeof(cudaIpcMemHandle_t) == sizeof(ckpt__cuda_ipc_t), "IPC handle size");
_Static_assert(cudaMemcpyHostToDevice == CKPT__CUDA_H2D && cudaMemcpyDefault == CKPT__CUDA_DEFAULT &&
               cudaMemcpyDeviceToHost == CKPT__CUDA_D2H, "cudaMemcpyKind");
_Static_assert(cudaErrorNotReady == CKPT__CUDA_NOT_READY, "cudaErrorNotReady");
_Static_assert(cudaStreamNonBlocking == CKPT__CUDA_STREAM_NONBLOCKING &&
               cudaEventDisableTiming == CKPT__CUDA_EVENT_DISABLE_TIMING &&
               cudaIpcMemLazyEnablePeerAccess == CKPT__CUDA_IPC_LAZY_PEER &&
               cudaHostRegisterPortable == CKPT__CUDA_HOST_REGISTER_PORTABLE &&
               cudaHostRegisterReadOnly == CKPT__CUDA_HOST_REGISTER_READ_ONLY, "flags");
#endif

static pthread_once_t once = PTHREAD_ONCE_INIT;
static ckpt__cudart_t table;
static char load_error[512];

static void load(void)
{
    const char *env = getenv("CKPT_CUDART");
    const char *names[] = {env && *env ? env : NULL, "libcudart.so.13", "libcudart.so.12",
                           "libcudart.so"};
    char tried[256] = "";
    for (size_t i = 0; i < CKPT_ARRAY_SIZE(names) && !table.lib; i++) {
        if (!names[i]) continue;
        table.lib = dlopen(names[i], RTLD_NOW | RTLD_LOCAL);
        if (table.lib) snprintf(table.path, sizeof(table.path), "%s", names[i]);
        else if (strlen(tried) + strlen(names[i]) + 3 < sizeof(tried))
            strcat(strcat(tried, tried[0] ? ", " : ""), names[i]);
    }
    if (!table.lib) {
        snprintf(load_error, sizeof(load_error), "no CUDA runtime: dlopen found none of %s "
                 "(install the CUDA runtime, or point CKPT_CUDART at a libcudart.so)", tried);
        return;
    }
    struct {
        void **slot;
        const char *name;
    } syms[] = {
#define SYM(f) {(void **)&table.f, "cuda" #f}
        SYM(GetDeviceCount), SYM(SetDevice), SYM(MemGetInfo), SYM(Malloc), SYM(Free),
        SYM(HostRegister), SYM(HostUnregister), SYM(Memcpy), SYM(MemcpyAsync),
        SYM(StreamCreateWithFlags), SYM(StreamDestroy), SYM(StreamWaitEvent),
        SYM(EventCreateWithFlags), SYM(EventDestroy), SYM(EventRecord), SYM(EventQuery),
        SYM(EventElapsedTime), SYM(IpcGetMemHandle), SYM(IpcOpenMemHandle),
        SYM(IpcCloseMemHandle), SYM(GetErrorString), SYM(GetErrorName),
#undef SYM
    };
    for (size_t i = 0; i < CKPT_ARRAY_SIZE(syms); i++) {
        *syms[i].slot = dlsym(table.lib, syms[i].name);
        if (!*syms[i].slot) {
            snprintf(load_error, sizeof(load_error), "%s lacks %s (CUDA runtime too old?)",
                     table.path, syms[i].name);
            dlclose(table.lib);
            table.lib = NULL;
            return;
        }
    }
}

int ckpt__cudart(const ckpt__cudart_t **out)
{
    pthread_once(&once, load);
    if (!table.lib) return ckpt__error(CKPT_EUNSUPPORTED, "%s", load_error);
    *out = &table;
    return CKPT_OK;
}

int ckpt__cuda_fail(const ckpt__cudart_t *rt, int e, const char *what)
{
    int status = e == 100 /* cudaErrorNoDevice */ || e == 35 /* InsufficientDriver */ ||
                         e == 34 /* StubLibrary */
                     ? CKPT_EUNSUPPORTED
                     : e == 2 /* cudaErrorMemoryAllocation */ ? CKPT_ENOMEM : CKPT_EIO;
    return ckpt__error(status, "%s: CUDA error %d %s (%s)", what, e, rt->GetErrorName(e),
                       rt->GetErrorString(e));
}

int ckpt__cuda_devices(void)
{
    const ckpt__cudart_t *rt;
    int rc = ckpt__cudart(&rt);
    if (rc < 0) return rc;
    int n = 0, e = rt->GetDeviceCount(&n);
    if (e == 35 || e == 100) /* insufficient driver, no device: what a machine without one says */
        return ckpt__error(CKPT_EUNSUPPORTED, "no GPU is visible: cudaGetDeviceCount: CUDA error "
                           "%d %s (%s)", e, rt->GetErrorName(e), rt->GetErrorString(e));
    if (e != 0) return ckpt__cuda_fail(rt, e, "cudaGetDeviceCount");
    if (n == 0) return ckpt__error(CKPT_EUNSUPPORTED, "no GPU is visible (cudaGetDeviceCount: 0)");
    return n;
}

int ckpt__cuda_copy(void *dst, const void *src, size_t len)
{
    const ckpt__cudart_t *rt;
    int rc = ckpt__cudart(&rt);
    if (rc < 0) return rc;
    int e = rt->Memcpy(dst, src, len, CKPT__CUDA_DEFAULT);
    return e ? ckpt__cuda_fail(rt, e, "cudaMemcpy") : CKPT_OK;
}

int ckpt__cuda_pin(void *base, uint64_t size, int read_only)
{
    const ckpt__cudart_t *rt;
    if (!base || !size || ckpt__cudart(&rt) < 0) {
        ckpt__error_clear();
        return 0;
    }
    unsigned flags = CKPT__CUDA_HOST_REGISTER_PORTABLE;
    if (read_only) flags |= CKPT__CUDA_HOST_REGISTER_READ_ONLY;
    int e = rt->HostRegister(base, (size_t)size, flags);
    if (e != 0) {
        ckpt_debug("pool: cudaHostRegister(%llu bytes) failed with CUDA error %d (%s), not "
                   "pinned", (unsigned long long)size, e, rt->GetErrorName(e));
        return 0;
    }
    return 1;
}

void ckpt__cuda_unpin(void *base)
{
    const ckpt__cudart_t *rt;
    if (base && ckpt__cudart(&rt) == CKPT_OK) rt->HostUnregister(base);
    ckpt__error_clear();
}
