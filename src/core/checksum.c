/* XXH3-64 checksums. On x86-64, libxxhash's dispatch entry points pick the widest vector
 * unit at run time (AVX2 where present): about 1.5x faster than the generic SSE2 build on
 * the machines we measured, and the checksum is on the update's data path. */
#include "core/internal.h"

#if defined(__x86_64__)
#include <xxh_x86dispatch.h>
#define CKPT__XXH3(p, n) XXH3_64bits_dispatch((p), (n))
#define CKPT__XXH3_UPDATE(s, p, n) XXH3_64bits_update_dispatch((s), (p), (n))
#else
#define CKPT__XXH3(p, n) XXH3_64bits((p), (n))
#define CKPT__XXH3_UPDATE(s, p, n) XXH3_64bits_update((s), (p), (n))
#endif

uint64_t ckpt_checksum(const void *data, size_t len) { return CKPT__XXH3(data, len); }

void ckpt__checksum_reset(XXH3_state_t *state) { XXH3_64bits_reset(state); }

void ckpt__checksum_update(XXH3_state_t *state, const void *data, size_t len)
{
    CKPT__XXH3_UPDATE(state, data, len);
}

uint64_t ckpt__checksum_digest(const XXH3_state_t *state) { return XXH3_64bits_digest(state); }
