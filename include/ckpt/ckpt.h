/*
 * ckpt-engine public API: the umbrella header and the conventions every part follows.
 *
 * Conventions (read these once, they hold everywhere):
 *  - Heavy objects are opaque handles: ckpt_<noun>_t *, created by ckpt_<noun>_open/create
 *    and released by ckpt_<noun>_close/destroy.
 *  - Every function that can fail returns int: 0 (CKPT_OK) or a negative CKPT_E* status.
 *    Output arguments come last and are written only on success.
 *  - On failure, ckpt_last_error() returns a thread-local text that names what failed
 *    (which file, which tensor, which byte offset, which rank). ckpt_strerror() gives the
 *    generic text of a status.
 *  - Everything is plain C types and arrays of structs, so a ctypes binding can call it
 *    without a compiler; no callback is ever mandatory.
 *  - Option structs start with a field_mask so that new fields never break old callers:
 *    the store's options are read only where their bit is set (store.h); every other
 *    struct has no bits yet, and a bit this library does not know is refused
 *    (CKPT_EINVAL naming the struct) rather than silently ignored.
 */
#ifndef CKPT_CKPT_H
#define CKPT_CKPT_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#if defined(__GNUC__)
#define CKPT_API __attribute__((visibility("default")))
#else
#define CKPT_API
#endif

#define CKPT_VERSION_MAJOR 0
#define CKPT_VERSION_MINOR 1
#define CKPT_VERSION_PATCH 0

/* ---- status codes ------------------------------------------------------------------- */

/* One list: the enum, the names and the messages are all generated from it. */
#define CKPT_STATUS_MAP(X)                                                                   \
    X(OK, 0, "success")                                                                      \
    X(EINVAL, -1, "invalid argument")                                                        \
    X(ENOMEM, -2, "out of memory")                                                           \
    X(EIO, -3, "input/output error")                                                         \
    X(EFORMAT, -4, "malformed file or message")                                              \
    X(ENOENT, -5, "not found")                                                               \
    X(EEXIST, -6, "already exists")                                                          \
    X(ETIMEDOUT, -7, "timed out")                                                            \
    X(EPEER, -8, "peer failed or disconnected")                                              \
    X(ECHECKSUM, -9, "checksum mismatch")                                                    \
    X(EUNSUPPORTED, -10, "not supported")                                                    \
    X(ESTATE, -11, "operation not valid in the current state")                               \
    X(EBUSY, -12, "busy")                                                                    \
    X(EPERM, -13, "permission denied")                                                       \
    X(ETOOBIG, -14, "too large")                                                             \
    X(EPROTO, -15, "protocol error")                                                         \
    X(ECOMM, -16, "communication layer error")                                               \
    X(ECANCELED, -17, "canceled")

typedef enum {
#define CKPT__STATUS_ENUM(name, value, msg) CKPT_##name = (value),
    CKPT_STATUS_MAP(CKPT__STATUS_ENUM)
#undef CKPT__STATUS_ENUM
} ckpt_status_t;

/* Generic message for a status ("invalid argument"); never NULL. */
CKPT_API const char *ckpt_strerror(int status);
/* Symbolic name of a status ("CKPT_EINVAL"); never NULL. */
CKPT_API const char *ckpt_status_name(int status);
/* Detail text of the last failure on this thread (names file, tensor, offset, rank);
 * "" when none. Valid until the next failing call on this thread. */
CKPT_API const char *ckpt_last_error(void);
/* Library version as "major.minor.patch". */
CKPT_API const char *ckpt_version(void);

/* ---- dtypes --------------------------------------------------------------------------- */

/* Every dtype the safetensors format defines. Values are stable (they cross processes). */
#define CKPT_DTYPE_MAP(X)                                                                    \
    X(BOOL, 1, 1)                                                                            \
    X(U8, 2, 1)                                                                              \
    X(I8, 3, 1)                                                                              \
    X(U16, 4, 2)                                                                             \
    X(I16, 5, 2)                                                                             \
    X(F16, 6, 2)                                                                             \
    X(BF16, 7, 2)                                                                            \
    X(U32, 8, 4)                                                                             \
    X(I32, 9, 4)                                                                             \
    X(F32, 10, 4)                                                                            \
    X(U64, 11, 8)                                                                            \
    X(I64, 12, 8)                                                                            \
    X(F64, 13, 8)                                                                            \
    X(F8_E4M3, 14, 1)                                                                        \
    X(F8_E5M2, 15, 1)                                                                        \
    X(F8_E8M0, 16, 1)                                                                        \
    X(C64, 17, 8)

typedef enum {
    CKPT_DTYPE_INVALID = 0,
#define CKPT__DTYPE_ENUM(name, value, size) CKPT_DTYPE_##name = (value),
    CKPT_DTYPE_MAP(CKPT__DTYPE_ENUM)
#undef CKPT__DTYPE_ENUM
    CKPT_DTYPE_COUNT
} ckpt_dtype_t;

/* Element size in bytes, 0 for an invalid dtype. */
CKPT_API size_t ckpt_dtype_size(int dtype);
/* safetensors name ("BF16"); "INVALID" for an unknown value. */
CKPT_API const char *ckpt_dtype_name(int dtype);
/* Parses a safetensors dtype name; CKPT_DTYPE_INVALID when unknown. */
CKPT_API int ckpt_dtype_from_name(const char *name);

/* ---- tensor metadata ------------------------------------------------------------------ */

#define CKPT_NAME_MAX 256 /* bytes including the NUL; longer names are rejected */
#define CKPT_MAX_DIMS 8
#define CKPT_ALIGN 256 /* every tensor starts on this boundary in pools and buckets */

/* A tensor's description. Plain struct so it can be allgathered between ranks and read
 * by ctypes. `offset` means: for a safetensors file, the absolute byte offset of the data
 * in the file; for a registered checkpoint, the offset in the owner's pool; in a bucket,
 * the offset in the bucket buffer. */
typedef struct ckpt_tensor_meta {
    char name[CKPT_NAME_MAX];
    int32_t dtype;      /* ckpt_dtype_t */
    int32_t ndim;       /* 0 .. CKPT_MAX_DIMS */
    int64_t shape[CKPT_MAX_DIMS];
    uint64_t nbytes;    /* product(shape) * dtype size */
    uint64_t offset;
    uint64_t checksum;  /* XXH3-64 of the data; 0 when not computed */
    int32_t owner;      /* rank that holds the bytes; -1 when not applicable */
    int32_t reserved;
} ckpt_tensor_meta_t;

/* nbytes rounded up to CKPT_ALIGN. */
CKPT_API uint64_t ckpt_aligned_size(uint64_t nbytes);
/* Number of elements; returns CKPT_ETOOBIG if the product overflows 63 bits. */
CKPT_API int ckpt_shape_numel(const int64_t *shape, int ndim, uint64_t *numel_out);
/* Fills meta (name, dtype, shape, nbytes) after validating them. */
CKPT_API int ckpt_tensor_meta_init(ckpt_tensor_meta_t *meta, const char *name, int dtype,
                                   const int64_t *shape, int ndim);
/* XXH3-64 of a byte range: the checksum that registration stores and receivers verify. */
CKPT_API uint64_t ckpt_checksum(const void *data, size_t len);

/* Parses a byte size: a number with an optional suffix B, K/KB/KiB, M/MB/MiB, G/GB/GiB,
 * T/TB/TiB (all powers of 1024; "1.5GiB" allowed). CKPT_EINVAL names the bad text. */
CKPT_API int ckpt_parse_size(const char *text, uint64_t *bytes_out);
/* Formats bytes as "1.50 GiB" into buf. Returns buf. */
CKPT_API const char *ckpt_format_size(uint64_t bytes, char *buf, size_t cap);

/* ---- logging -------------------------------------------------------------------------- */

typedef enum {
    CKPT_LOG_ERROR = 0,
    CKPT_LOG_WARN = 1,
    CKPT_LOG_INFO = 2,
    CKPT_LOG_DEBUG = 3,
    CKPT_LOG_TRACE = 4
} ckpt_log_level_t;

/* The level comes from CKPT_LOG_LEVEL (error|warn|info|debug|trace or 0..4; default warn).
 * Lines go to stderr as "[ckpt <level> r<rank>] text". */
CKPT_API void ckpt_log_set_level(int level);
CKPT_API int ckpt_log_get_level(void);
/* Rank shown in the prefix; -1 (the default) hides it. */
CKPT_API void ckpt_log_set_rank(int rank);

#ifdef __cplusplus
}
#endif

#include "ckpt/safetensors.h"

#endif /* CKPT_CKPT_H */
