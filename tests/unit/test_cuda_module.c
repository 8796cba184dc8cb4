/* The optional CUDA module (libckpt_cuda.so): loads with dlopen; without a GPU it says so
 * clearly (skip); with one, a host bucket staged to the device reads back identical. */
#include <dlfcn.h>

#include "test.h"

typedef int (*probe_fn)(int *, char *, size_t, char *, size_t);
typedef int (*pin_fn)(void *, size_t, char *, size_t);
typedef int (*unpin_fn)(void *, char *, size_t);
typedef int (*alloc_fn)(void **, size_t, char *, size_t);
typedef void (*free_fn)(void *);
typedef int (*copy_fn)(void *, const void *, size_t, char *, size_t);

int main(void)
{
    char path[4096], err[512] = "", name[256] = "";
    const char *build = getenv("CKPT_BUILD_DIR");
    snprintf(path, sizeof(path), "%s/src/libckpt_cuda.so", build ? build : ".");
    void *h = dlopen(path, RTLD_NOW | RTLD_LOCAL);
    if (!h) {
        printf("skip: no CUDA module (%s): built without the CUDA toolkit\n", dlerror());
        return 77;
    }
    probe_fn probe = (probe_fn)dlsym(h, "ckpt_cuda_probe");
    pin_fn pin = (pin_fn)dlsym(h, "ckpt_cuda_pin");
    unpin_fn unpin = (unpin_fn)dlsym(h, "ckpt_cuda_unpin");
    alloc_fn dalloc = (alloc_fn)dlsym(h, "ckpt_cuda_alloc");
    free_fn dfree = (free_fn)dlsym(h, "ckpt_cuda_free");
    copy_fn stage = (copy_fn)dlsym(h, "ckpt_cuda_stage");
    copy_fn readback = (copy_fn)dlsym(h, "ckpt_cuda_read");
    CHECK(probe && pin && unpin && dalloc && dfree && stage && readback);
    if (!probe) return 1;
    int n = 0;
    int rc = probe(&n, name, sizeof(name), err, sizeof(err));
    if (rc == CKPT_EUNSUPPORTED) {
        CHECK(strstr(err, "cudaGetDeviceCount") != NULL); /* names the call and the cause */
        printf("skip: %s\n", err);
        dlclose(h);
        return test__failures ? 1 : 77;
    }
    CHECK_OK(rc);
    printf("CUDA: %d device(s), %s\n", n, name);
    const size_t len = 8u << 20;
    unsigned char *host = malloc(len), *back = malloc(len);
    for (size_t i = 0; i < len; i++) host[i] = (unsigned char)(i * 131 + 7);
    CHECK_OK(pin(host, len, err, sizeof(err)));
    void *dev = NULL;
    CHECK_OK(dalloc(&dev, len, err, sizeof(err)));
    CHECK_OK(stage(dev, host, len, err, sizeof(err)));
    CHECK_OK(readback(back, dev, len, err, sizeof(err)));
    CHECK(memcmp(host, back, len) == 0);
    dfree(dev);
    CHECK_OK(unpin(host, err, sizeof(err)));
    free(host);
    free(back);
    dlclose(h);
    TEST_EXIT();
}
