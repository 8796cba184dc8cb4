/* ckpt_receiver_copy: bytes and verdicts at every alignment (the streaming-store copy has
 * a memcpy head up to a 64-byte boundary of dst and a memcpy tail), and a speed print. */
#include <stdlib.h>

#include "ckpt/receiver.h"
#include "core/internal.h"
#include "test.h"

#define BIG ((1u << 20) + 7) /* 1 MiB + 7: several chunks and an odd tail */
#define GUARD 64

static uint8_t *src_bytes;

static ckpt_tensor_view_t make_view(const uint8_t *data, uint64_t nbytes)
{
    ckpt_tensor_view_t v;
    int64_t shape[1] = {(int64_t)nbytes};
    ckpt_tensor_meta_init(&v.meta, "model.layers.3.mlp.w", CKPT_DTYPE_U8, shape, 1);
    v.meta.checksum = ckpt_checksum(data, nbytes);
    v.data = data;
    return v;
}

/* Copies [off, off + len) into a dst misaligned by `mis` with guard bytes on both sides. */
static void copy_case(const ckpt_tensor_view_t *v, uint64_t off, uint64_t len, size_t mis,
                      int verify)
{
    uint8_t *raw = aligned_alloc(64, CKPT_ALIGN_UP(len + mis + 2 * GUARD, 64));
    uint8_t *dst = raw + GUARD + mis;
    memset(raw, 0xa5, len + mis + 2 * GUARD);
    CHECK_OK(ckpt_receiver_copy(v, off, dst, len, verify));
    CHECK(memcmp(dst, (const uint8_t *)v->data + off, len) == 0);
    for (size_t i = 0; i < GUARD + mis; i++) CHECK(raw[i] == 0xa5);
    for (size_t i = 0; i < GUARD; i++) CHECK(dst[len + i] == 0xa5);
    free(raw);
}

static void test_alignments(void)
{
    static const uint64_t lens[] = {0, 1, 63, 64, 65, 4096 + 3, BIG};
    ckpt_tensor_view_t v = make_view(src_bytes, BIG);
    for (size_t l = 0; l < CKPT_ARRAY_SIZE(lens); l++) {
        uint64_t len = lens[l];
        /* Offsets from the start, odd ones, and the very end of the tensor. */
        uint64_t offs[] = {0, 1, 13, BIG - len};
        for (size_t o = 0; o < CKPT_ARRAY_SIZE(offs); o++) {
            if (offs[o] + len > BIG) continue;
            for (size_t mis = 0; mis < 16; mis++)
                for (int verify = 0; verify < 2; verify++)
                    copy_case(&v, offs[o], len, mis, verify);
        }
    }
    /* A tensor that is all tail (shorter than one line) and a dst 1 byte off a line. */
    ckpt_tensor_view_t small = make_view(src_bytes + 5, 33);
    for (size_t mis = 0; mis < 16; mis++) copy_case(&small, 2, 31, mis, 1);
    copy_case(&v, 0, BIG, 63, 1);
}

static void test_checksum_mismatch(void)
{
    ckpt_tensor_view_t v = make_view(src_bytes, BIG);
    uint8_t *dst = malloc(BIG);
    v.meta.checksum ^= 1;
    /* Verify on: detected whatever range is copied, even an empty one. */
    CHECK_RC(ckpt_receiver_copy(&v, 0, dst + 1, BIG - 1, 1), CKPT_ECHECKSUM);
    CHECK_ERR_HAS("model.layers.3.mlp.w");
    CHECK_RC(ckpt_receiver_copy(&v, 100, dst, 0, 1), CKPT_ECHECKSUM);
    CHECK_RC(ckpt_receiver_copy(&v, 1000, dst + 3, 70000, 1), CKPT_ECHECKSUM);
    CHECK(memcmp(dst + 3, src_bytes + 1000, 70000) == 0); /* bytes are copied regardless */
    /* Verify off, or no checksum: not checked. */
    CHECK_OK(ckpt_receiver_copy(&v, 0, dst, BIG, 0));
    v.meta.checksum = 0;
    CHECK_OK(ckpt_receiver_copy(&v, 0, dst, BIG, 1));
    /* A flipped byte outside the copied range is still caught: the whole tensor is hashed. */
    uint8_t *copy = malloc(BIG);
    memcpy(copy, src_bytes, BIG);
    v = make_view(copy, BIG);
    copy[BIG - 2] ^= 0x10;
    CHECK_RC(ckpt_receiver_copy(&v, 0, dst, 4096, 1), CKPT_ECHECKSUM);
    CHECK_ERR_HAS("expected");
    copy[BIG - 2] ^= 0x10;
    copy[0] ^= 0x01;
    CHECK_RC(ckpt_receiver_copy(&v, 4096, dst, 4096, 1), CKPT_ECHECKSUM);
    /* Out of range is EINVAL naming the tensor. */
    CHECK_RC(ckpt_receiver_copy(&v, BIG - 3, dst, 4, 1), CKPT_EINVAL);
    CHECK_ERR_HAS("model.layers.3.mlp.w");
    free(copy);
    free(dst);
}

static double gbps(uint64_t bytes, uint64_t t0)
{
    return (double)bytes / (double)(ckpt__now_ns() - t0);
}

/* Not an assertion: prints the speeds so a change that slows the data path shows up. The
 * tensor is twice a large L3 so the source comes from memory as it does in an update. */
static void test_speed_print(void)
{
    const uint64_t n = 64u << 20;
    uint8_t *s = malloc(n), *d = malloc(n);
    double best[4] = {0, 0, 0, 0};
    memset(s, 0x3c, n);
    memset(d, 0, n);
    ckpt_tensor_view_t v = make_view(s, n);
    for (int rep = 0; rep < 3; rep++) {
        uint64_t t0 = ckpt__now_ns();
        memcpy(d, s, n);
        best[0] = CKPT_MAX(best[0], gbps(n, t0));
        t0 = ckpt__now_ns();
        CHECK_OK(ckpt_receiver_copy(&v, 0, d, n, 0));
        best[1] = CKPT_MAX(best[1], gbps(n, t0));
        t0 = ckpt__now_ns();
        CHECK_OK(ckpt_receiver_copy(&v, 0, d, n, 1));
        best[2] = CKPT_MAX(best[2], gbps(n, t0));
        /* The previous scheme, for comparison: memcpy a chunk, then hash it from dst. */
        XXH3_state_t st;
        t0 = ckpt__now_ns();
        ckpt__checksum_reset(&st);
        for (uint64_t off = 0; off < n; off += 128u << 10) {
            memcpy(d + off, s + off, 128u << 10);
            ckpt__checksum_update(&st, d + off, 128u << 10);
        }
        CHECK(ckpt__checksum_digest(&st) == v.meta.checksum);
        best[3] = CKPT_MAX(best[3], gbps(n, t0));
    }
    fprintf(stderr, "copy of 64 MiB (best of 3): memcpy %.2f GB/s, copy %.2f GB/s, "
            "verified copy %.2f GB/s (memcpy then hash dst: %.2f GB/s)\n",
            best[0], best[1], best[2], best[3]);
    free(s);
    free(d);
}

int main(void)
{
    src_bytes = malloc(BIG);
    for (uint32_t i = 0; i < BIG; i++) src_bytes[i] = (uint8_t)(i * 2654435761u >> 24);
    RUN_TEST(test_alignments);
    RUN_TEST(test_checksum_mismatch);
    RUN_TEST(test_speed_print);
    free(src_bytes);
    TEST_EXIT();
}
