/* libFuzzer target for the safetensors header validator, two ways:
 *  1. the input as a header held in memory (ckpt_st_parse_header), with a data region of
 *     a size taken from the input, so offsets near the region's end are reachable;
 *  2. the input as a whole file in a memfd, opened through /proc/self/fd like any path,
 *     with every tensor read back, so the reader's bounds are exercised too. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <unistd.h>

#include "ckpt/ckpt.h"

static void whole_file(const uint8_t *data, size_t size)
{
    int fd = memfd_create("fuzz.safetensors", MFD_CLOEXEC);
    if (fd < 0) return;
    if (write(fd, data, size) != (ssize_t)size) {
        close(fd);
        return;
    }
    char path[64];
    snprintf(path, sizeof(path), "/proc/self/fd/%d", fd);
    ckpt_st_file_t *f = NULL;
    if (ckpt_st_open(path, &f) == CKPT_OK) {
        for (size_t i = 0; i < ckpt_st_num_tensors(f); i++) {
            const ckpt_tensor_meta_t *m = ckpt_st_tensor(f, i);
            size_t idx;
            if (ckpt_st_find(f, m->name, &idx) != CKPT_OK || idx != i) abort();
            if (m->offset + m->nbytes > ckpt_st_file_size(f)) abort();
            void *buf = malloc(m->nbytes ? m->nbytes : 1);
            if (ckpt_st_read_tensor(f, i, buf, m->nbytes) != CKPT_OK) abort();
            free(buf);
        }
        for (size_t i = 0; i < ckpt_st_num_metadata(f); i++) {
            const char *k, *v;
            if (ckpt_st_metadata(f, i, &k, &v) != CKPT_OK || !k || !v) abort();
        }
        ckpt_st_close(f);
    }
    close(fd);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    ckpt_log_set_level(-1); /* errors are expected by the million; keep the log quiet */
    if (size > 0) {
        uint64_t data_len = data[size - 1] * 17u;
        ckpt_st_file_t *f = NULL;
        if (ckpt_st_parse_header("fuzz", (const char *)data, size - 1, 8 + (size - 1) + data_len,
                                 &f) == CKPT_OK) {
            uint64_t covered = 0;
            for (size_t i = 0; i < ckpt_st_num_tensors(f); i++)
                covered += ckpt_st_tensor(f, i)->nbytes;
            if (covered != data_len) abort(); /* the tiling check must guarantee this */
            ckpt_st_close(f);
        }
    }
    whole_file(data, size);
    return 0;
}
