/* Internals shared by the safetensors reader, index resolver and writer. */
#ifndef CKPT_FORMAT_ST_INTERNAL_H
#define CKPT_FORMAT_ST_INTERNAL_H

#include <stddef.h>
#include <stdint.h>

#include "core/internal.h"

struct ckpt_st_file {
    char *path;              /* label used in every error text (the path for opened files) */
    int fd;                  /* -1 when the header was parsed from memory only */
    uint64_t file_size;
    uint64_t data_offset;    /* 8 + header length */
    ckpt_tensor_meta_t *metas; /* sorted by offset; offset is absolute in the file */
    size_t num_tensors;
    /* metas sorted by name, for ckpt_st_find and for the duplicate-name check */
    const ckpt_tensor_meta_t **by_name;
    char **meta_keys;        /* "__metadata__", in header order */
    char **meta_values;
    size_t num_metadata;
};

/* Numbers in a header must be plain non-negative integers that a double holds exactly:
 * the reference parser reads them as u64/usize, and cJSON only keeps a double. */
#define CKPT__ST_MAX_INT ((uint64_t)1 << 53)

/* Largest model.safetensors.index.json we read; real ones are a few hundred KiB. */
#define CKPT__ST_MAX_INDEX (256u * 1024u * 1024u)

/* Reads a whole small file (an index json) into a NUL-terminated buffer. */
CKPT_HIDDEN int ckpt__st_read_small_file(const char *path, size_t max, char **buf_out,
                                         size_t *len_out);

/* The JSON header of a safetensors file holding `count` tensors laid out in the given order
 * (data_offsets packed, as the format demands), padded with spaces so that the data region
 * (8 + length) starts on a multiple of `data_align` (8, 64, 4096...). Checks the metas like
 * the writer does. *json_out is ckpt__malloc'd, NUL-terminated; *len_out excludes the NUL.
 * Used by the trainer-side publisher, which lays a file out in a memfd. */
CKPT_HIDDEN int ckpt__st_header_json(const char *label, const ckpt_tensor_meta_t *metas,
                                     size_t count, size_t data_align, char **json_out,
                                     size_t *len_out);

#endif
