/* Helpers shared by the store tests: open-fd counting and raw checkpoint files written
 * without the safetensors writer, so the loader core is tested on its own. */
#ifndef CKPT_TEST_STORE_FIXTURE_H
#define CKPT_TEST_STORE_FIXTURE_H

#include <dirent.h>
#include <fcntl.h>
#include <unistd.h>

#include "ckpt/store.h"
#include "store/store_int.h"
#include "test.h"

static inline int count_fds(void)
{
    int n = 0;
    DIR *d = opendir("/proc/self/fd");
    if (!d) return -1;
    while (readdir(d)) n++;
    closedir(d);
    return n;
}

static inline uint8_t pattern_byte(uint64_t file, uint64_t off)
{
    uint64_t x = (file + 1) * 0x9e3779b97f4a7c15ull ^ (off * 0xbf58476d1ce4e5b9ull);
    return (uint8_t)(x >> 29);
}

/* Writes `nfiles` files in dir; each starts with a header-like prefix of an odd length
 * and holds tensors back to back with varied sizes: tiny, unaligned, 256-multiples that
 * coalesce, and some above the chunk size. Fills tensors (offset = file offset). */
static inline size_t fixture_write(const char *dir, char paths[][256], size_t nfiles,
                            ckpt__load_tensor_t *tensors, size_t cap, uint64_t *total_out)
{
    static const uint64_t sizes[] = {4, 1000, 256 * 1024, 3 * 256 * 1024, 1u << 20, 77,
                                     (1u << 20) + 512, 2, 600000, 8192, 512 * 1024, 6};
    static const int dtypes[] = {CKPT_DTYPE_U8, CKPT_DTYPE_F16, CKPT_DTYPE_BF16, CKPT_DTYPE_F32,
                                 CKPT_DTYPE_I64, CKPT_DTYPE_F8_E4M3, CKPT_DTYPE_F64, CKPT_DTYPE_BOOL,
                                 CKPT_DTYPE_I32, CKPT_DTYPE_C64, CKPT_DTYPE_U16, CKPT_DTYPE_I16};
    size_t count = 0;
    uint64_t total = 0;
    for (size_t f = 0; f < nfiles; f++) {
        snprintf(paths[f], 256, "%s/part-%zu.bin", dir, f);
        uint64_t off = 8 + 120 + 8 * f; /* the data region starts unaligned */
        size_t per = CKPT_ARRAY_SIZE(sizes);
        for (size_t k = 0; k < per && count < cap; k++) {
            size_t j = (k + f) % per;
            int dt = dtypes[j];
            int64_t shape[1] = {(int64_t)(sizes[j] / ckpt_dtype_size(dt))};
            char nm[64];
            snprintf(nm, sizeof(nm), "f%zu.t%02zu", f, k);
            ckpt_tensor_meta_init(&tensors[count].meta, nm, dt, shape, 1);
            tensors[count].meta.offset = off;
            tensors[count].file = (uint32_t)f;
            off += tensors[count].meta.nbytes;
            total += tensors[count].meta.nbytes;
            count++;
        }
        FILE *fp = fopen(paths[f], "wb");
        for (uint64_t o = 0; o < off; o++) fputc(pattern_byte(f, o), fp);
        fclose(fp);
    }
    *total_out = total;
    return count;
}

#endif
