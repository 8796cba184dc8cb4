/* Bulk copies of weights: streaming (non-temporal) stores for large copies.
 *
 * A worker writes a tensor once and does not read it back during the update, and the
 * owner stages a bucket that other processes read later: neither destination belongs in
 * this core's cache. Measured on the 2-core EPYC VM (256 MiB, memfd source, several
 * source/destination page offsets): glibc's memcpy 7.3-12.8 GB/s (rep movsb; 8.1-9.5
 * GB/s whenever the destination sits 1-4 KiB past the source modulo a page, 4K
 * aliasing), this loop 9.6-16.7 GB/s at every offset. Small copies keep memcpy: their
 * destination is likely read soon and the fence would cost more than it saves. */
#include <string.h>

#include "core/internal.h"

#if defined(__SSE2__)
#include <emmintrin.h>

void ckpt__copy_stream(void *dst, const void *src, size_t n)
{
    uint8_t *d = dst;
    const uint8_t *s = src;
    /* memcpy up to the first 64-byte aligned byte of d, so every streamed line is
     * written whole and _mm_stream_si128 gets its 16-byte alignment */
    size_t head = CKPT_MIN((size_t)(-(uintptr_t)d & 63u), n);
    memcpy(d, s, head);
    d += head;
    s += head;
    n -= head;
    size_t body = n & ~(size_t)63;
    for (size_t i = 0; i < body; i += 64) {
        __m128i a = _mm_loadu_si128((const __m128i *)(s + i));
        __m128i b = _mm_loadu_si128((const __m128i *)(s + i + 16));
        __m128i c = _mm_loadu_si128((const __m128i *)(s + i + 32));
        __m128i e = _mm_loadu_si128((const __m128i *)(s + i + 48));
        _mm_stream_si128((__m128i *)(d + i), a);
        _mm_stream_si128((__m128i *)(d + i + 16), b);
        _mm_stream_si128((__m128i *)(d + i + 32), c);
        _mm_stream_si128((__m128i *)(d + i + 48), e);
    }
    memcpy(d + body, s + body, n - body);
}

void ckpt__copy_fence(void) { _mm_sfence(); }
#else
void ckpt__copy_stream(void *dst, const void *src, size_t n) { memcpy(dst, src, n); }
void ckpt__copy_fence(void) {}
#endif

void ckpt__copy_bulk(void *dst, const void *src, size_t n)
{
    if (n < CKPT__STREAM_MIN) {
        if (n > 0) memcpy(dst, src, n);
        return;
    }
    ckpt__copy_stream(dst, src, n);
    ckpt__copy_fence();
}
