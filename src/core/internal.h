/* Internal helpers shared by every part of libckpt. Never included by tools or bindings. */
#ifndef CKPT_CORE_INTERNAL_H
#define CKPT_CORE_INTERNAL_H

#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include "ckpt/ckpt.h"

#define CKPT_HIDDEN __attribute__((visibility("hidden")))

/* Records the detail text of a failure on this thread and returns `status`, so error
 * paths read `return ckpt__error(CKPT_EIO, "%s: read at offset %llu: %s", ...)`. */
CKPT_HIDDEN int ckpt__error(int status, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));
/* Like ckpt__error but keeps the current detail text and puts `fmt` in front of it
 * ("registering 'demo': " + inner text), so outer layers add context without losing it. */
CKPT_HIDDEN int ckpt__error_prefix(int status, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));
CKPT_HIDDEN void ckpt__error_clear(void);

/* Logging: check the level first so disabled lines cost nothing to format. */
CKPT_HIDDEN void ckpt__log(int level, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
#define CKPT_LOG(level, ...)                                                                 \
    do {                                                                                     \
        if ((level) <= ckpt_log_get_level()) ckpt__log((level), __VA_ARGS__);                 \
    } while (0)
#define ckpt_error_log(...) CKPT_LOG(CKPT_LOG_ERROR, __VA_ARGS__)
#define ckpt_warn(...) CKPT_LOG(CKPT_LOG_WARN, __VA_ARGS__)
#define ckpt_info(...) CKPT_LOG(CKPT_LOG_INFO, __VA_ARGS__)
#define ckpt_debug(...) CKPT_LOG(CKPT_LOG_DEBUG, __VA_ARGS__)
#define ckpt_trace(...) CKPT_LOG(CKPT_LOG_TRACE, __VA_ARGS__)

/* All allocation goes through these, so tests can fail the Nth allocation
 * (ckpt__alloc_fail_after) and prove every error path cleans up. */
CKPT_HIDDEN void *ckpt__malloc(size_t size);
CKPT_HIDDEN void *ckpt__calloc(size_t count, size_t size);
CKPT_HIDDEN void *ckpt__realloc(void *ptr, size_t size);
CKPT_HIDDEN char *ckpt__strdup(const char *s);
CKPT_HIDDEN void ckpt__free(void *ptr);

/* Streaming XXH3-64, equal to ckpt_checksum over the concatenated input. The state can
 * live on the stack (no allocation per tensor). */
#define XXH_STATIC_LINKING_ONLY
#include <xxhash.h>
CKPT_HIDDEN void ckpt__checksum_reset(XXH3_state_t *state);
CKPT_HIDDEN void ckpt__checksum_update(XXH3_state_t *state, const void *data, size_t len);
CKPT_HIDDEN uint64_t ckpt__checksum_digest(const XXH3_state_t *state);

/* Bulk copies (copy.c). ckpt__copy_stream writes with non-temporal stores, which are
 * weakly ordered: call ckpt__copy_fence before the destination is handed to anyone.
 * ckpt__copy_bulk streams copies of CKPT__STREAM_MIN bytes or more (and fences them),
 * memcpy below. */
#define CKPT__STREAM_MIN (256u * 1024u)
CKPT_HIDDEN void ckpt__copy_stream(void *dst, const void *src, size_t n);
CKPT_HIDDEN void ckpt__copy_fence(void);
CKPT_HIDDEN void ckpt__copy_bulk(void *dst, const void *src, size_t n);

/* The name of the memfds a publish listener fills by pulling and refills later
 * (src/publish/publish_server.c); workers keep their mapping of those one version longer
 * (src/ipc/receiver.c), recognising them by it. */
#define CKPT__PULLED_MEMFD "ckpt-pulled"

/* Monotonic clock in nanoseconds and seconds. */
CKPT_HIDDEN uint64_t ckpt__now_ns(void);
CKPT_HIDDEN double ckpt__now_s(void);

/* Copies src into dst of size cap, always NUL-terminated; returns CKPT_ETOOBIG if cut. */
/* Option structs reserve field_mask for growth (ckpt.h): a bit this library does not know
 * means the caller filled a field it cannot honour, which is refused rather than ignored:
 * CKPT_EINVAL naming the struct and the bits. */
CKPT_HIDDEN int ckpt__check_field_mask(uint64_t mask, uint64_t known, const char *what);
CKPT_HIDDEN int ckpt__strlcpy(char *dst, const char *src, size_t cap);

#define CKPT_MIN(a, b) ((a) < (b) ? (a) : (b))
#define CKPT_MAX(a, b) ((a) > (b) ? (a) : (b))
#define CKPT_ALIGN_UP(x, a) ((((x) + (a)-1) / (a)) * (a))
#define CKPT_ARRAY_SIZE(a) (sizeof(a) / sizeof((a)[0]))

#endif /* CKPT_CORE_INTERNAL_H */
