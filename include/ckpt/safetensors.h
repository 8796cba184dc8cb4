/*
 * safetensors files: reading, validating and writing.
 *
 * Format: 8-byte little-endian header length N, N bytes of JSON, then the data region.
 * The JSON maps tensor names to {"dtype", "shape", "data_offsets": [begin, end]} (offsets
 * relative to the data region) plus an optional "__metadata__" object of string values.
 * The reader validates everything before any tensor is trusted: header length bounds,
 * JSON syntax, known dtypes, shape overflow, offsets inside the file, no overlaps, the data
 * region fully covered, unique names.
 */
#ifndef CKPT_SAFETENSORS_H
#define CKPT_SAFETENSORS_H

#include "ckpt/ckpt.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Largest header accepted (the reference implementation uses 100 MB as well). */
#define CKPT_ST_MAX_HEADER (100u * 1000u * 1000u)

typedef struct ckpt_st_file ckpt_st_file_t;

/* Opens and validates one safetensors file. On failure, ckpt_last_error() names the
 * file and the problem ("model.safetensors: tensor 'w': data_offsets [0, 12] ..."). */
CKPT_API int ckpt_st_open(const char *path, ckpt_st_file_t **file_out);
CKPT_API void ckpt_st_close(ckpt_st_file_t *file);

CKPT_API const char *ckpt_st_path(const ckpt_st_file_t *file);
CKPT_API uint64_t ckpt_st_file_size(const ckpt_st_file_t *file);
/* Offset where the data region starts (8 + header length). */
CKPT_API uint64_t ckpt_st_data_offset(const ckpt_st_file_t *file);
/* Tensors in order of their data offset. meta->offset is the ABSOLUTE file offset. */
CKPT_API size_t ckpt_st_num_tensors(const ckpt_st_file_t *file);
CKPT_API const ckpt_tensor_meta_t *ckpt_st_tensor(const ckpt_st_file_t *file, size_t index);
/* Index of a tensor by name, or CKPT_ENOENT. */
CKPT_API int ckpt_st_find(const ckpt_st_file_t *file, const char *name, size_t *index_out);
/* "__metadata__" entries (string to string); count and i-th key/value. */
CKPT_API size_t ckpt_st_num_metadata(const ckpt_st_file_t *file);
CKPT_API int ckpt_st_metadata(const ckpt_st_file_t *file, size_t index, const char **key_out,
                              const char **value_out);
/* Reads one tensor's bytes into buf (cap >= nbytes). Fails with CKPT_EIO naming the file
 * and offset if the file is shorter than its header promised. */
CKPT_API int ckpt_st_read_tensor(const ckpt_st_file_t *file, size_t index, void *buf,
                                 size_t cap);

/* Validates a header held in memory: `json` of `len` bytes, for a file of `file_size`
 * bytes whose data starts at 8 + len. Used by ckpt_st_open and by the fuzzer.
 * `label` names the source in error texts. */
CKPT_API int ckpt_st_parse_header(const char *label, const char *json, size_t len,
                                  uint64_t file_size, ckpt_st_file_t **file_out);

/* ---- checkpoints made of several files ---- */

/* Resolves PATH (one .safetensors file, a directory of them, or a
 * model.safetensors.index.json) to the list of files, sorted, without duplicates.
 * The list is freed with ckpt_st_paths_free. */
CKPT_API int ckpt_st_list_files(const char *path, char ***paths_out, size_t *count_out);
CKPT_API void ckpt_st_paths_free(char **paths, size_t count);

/* ---- writing ---- */

/* Writes a safetensors file holding `count` tensors: metas[i] gives name, dtype and shape
 * (offset and checksum are ignored), data[i] its nbytes bytes. Tensors are laid out in the
 * given order, 8-byte aligned as the reference writer does. Optional metadata:
 * `meta_keys`/`meta_values` of `meta_count` strings. Writes to PATH.tmp then renames, so a
 * failed write never leaves a partial file under PATH. */
CKPT_API int ckpt_st_write(const char *path, const ckpt_tensor_meta_t *metas,
                           const void *const *data, size_t count, const char *const *meta_keys,
                           const char *const *meta_values, size_t meta_count);

/* Supplies bytes [offset, offset + len) of tensor `index` into buf; returns 0, or a negative
 * CKPT_E* status that aborts the write (set ckpt_last_error's text through the caller). */
typedef int (*ckpt_st_fill_fn)(void *user, size_t index, uint64_t offset, void *buf,
                               size_t len);

/* Like ckpt_st_write, but the data comes from `fill`, called in file order with chunks of
 * at most a few MiB, so a checkpoint larger than memory can be written (ckpt-engine gen).
 * The callback is optional machinery: ckpt_st_write needs none. */
CKPT_API int ckpt_st_write_fill(const char *path, const ckpt_tensor_meta_t *metas, size_t count,
                                const char *const *meta_keys, const char *const *meta_values,
                                size_t meta_count, ckpt_st_fill_fn fill, void *user);

#ifdef __cplusplus
}
#endif

#endif /* CKPT_SAFETENSORS_H */
