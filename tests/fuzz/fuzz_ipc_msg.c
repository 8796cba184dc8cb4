/* libFuzzer target: the worker protocol decoders (frame header, BEGIN, BUCKET, NEED, status text)
 * over arbitrary bytes. Byte 0 picks the decoder; the rest is the frame or payload. The
 * decoders must reject garbage with a status, never crash, read out of bounds or leak. */
#include <stdint.h>
#include <string.h>

#include "ipc/wire.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size < 1) return 0;
    const uint8_t *p = data + 1;
    size_t len = size - 1;
    switch (data[0] % 5) {
    case 0: {
        ckpt__ipc_hdr_t h;
        if (len >= CKPT_IPC_HDR_SIZE) ckpt__ipc_hdr_decode(p, "fuzz", &h);
        break;
    }
    case 1: {
        /* An accepted BEGIN has a sane buffer count and re-encodes to the same bytes (the
         * layout is canonical: nothing was skipped or read twice). */
        static uint8_t again[CKPT_IPC_MAX_PAYLOAD / 1024];
        /* The fuzzer's inputs stay under 4 KiB: at most 4096 / CKPT_IPC_MANIFEST_MIN
         * manifest records fit in one. */
        static ckpt_tensor_meta_t manifest[4096 / CKPT_IPC_MANIFEST_MIN + 1];
        ckpt__ipc_begin_msg_t m;
        if (ckpt__ipc_begin_decode(p, len, &m) != CKPT_OK) break;
        /* The decoder validated the manifest and left it in place (manifest_pos): read it
         * back as the receiver does, so the re-encoding below covers it too. */
        if (m.manifest_count > CKPT_ARRAY_SIZE(manifest)) __builtin_trap();
        ckpt__ipc_reader_t rd = {p, len, m.manifest_pos};
        for (uint32_t i = 0; i < m.manifest_count; i++)
            if (ckpt__ipc_manifest_decode(&rd, &manifest[i]) != CKPT_OK) __builtin_trap();
        m.manifest = manifest;
        if (strlen(m.name) >= CKPT_NAME_MAX || m.nbuffers < 1 ||
            m.nbuffers > CKPT_IPC_MAX_BUFFERS || ckpt__ipc_begin_size(&m) != len ||
            len > sizeof(again))
            __builtin_trap();
        ckpt__ipc_begin_encode(&m, again);
        if (memcmp(again, p, len) != 0) __builtin_trap();
        break;
    }
    case 2: {
        /* Like the receiver: decode records against a buffer of a size taken from the
         * input, and check every accepted tensor really lies inside it. */
        ckpt__ipc_bucket_hdr_t h;
        ckpt__ipc_reader_t rd;
        ckpt_tensor_meta_t meta;
        ckpt__ipc_part_t part;
        uint64_t bufsize = 1u << 20;
        if (ckpt__ipc_bucket_decode_hdr(p, len, &h, &rd) != CKPT_OK) break;
        for (uint32_t i = 0; i < h.count; i++) {
            if (ckpt__ipc_tensor_decode(&rd, bufsize, &meta, &part) != CKPT_OK) break;
            if (meta.offset + meta.nbytes > bufsize || meta.ndim > CKPT_MAX_DIMS)
                __builtin_trap();
            if (part.dim >= 0 && (part.dim >= meta.ndim ||
                                  part.start + (uint64_t)meta.shape[part.dim] > (uint64_t)part.full))
                __builtin_trap();
        }
        ckpt__ipc_reader_done(&rd, "fuzz");
        break;
    }
    case 3: {
        /* An accepted NEED re-encodes to the same bytes and holds only sane records. */
        static ckpt_need_decl_t needs[4096 / CKPT_IPC_NEED_MIN + 1];
        static uint8_t again[8192];
        uint32_t n = 0;
        if (ckpt__ipc_need_decode(p, len, NULL, &n) != CKPT_OK) break;
        if (n > CKPT_ARRAY_SIZE(needs) || ckpt__ipc_need_decode(p, len, needs, &n) != CKPT_OK) {
            if (n > CKPT_ARRAY_SIZE(needs)) __builtin_trap();
            break; /* a name given twice: only the second pass looks */
        }
        for (uint32_t i = 0; i < n; i++)
            if (needs[i].dim < -1 || needs[i].dim >= CKPT_MAX_DIMS ||
                strlen(needs[i].name) >= CKPT_NAME_MAX)
                __builtin_trap();
        if (ckpt__ipc_need_size(needs, n) != len || len > sizeof(again)) __builtin_trap();
        ckpt__ipc_need_encode(needs, n, again);
        if (memcmp(again, p, len) != 0) __builtin_trap();
        break;
    }
    default: {
        int32_t status;
        char text[64];
        if (ckpt__ipc_text_decode(p, len, &status, text, sizeof(text)) == CKPT_OK &&
            strlen(text) >= sizeof(text))
            __builtin_trap();
        break;
    }
    }
    return 0;
}
