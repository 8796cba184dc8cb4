/*
 * Publishing from a trainer: hand in-memory tensors to the engine rank on this host without
 * writing files and with one copy (into shared memory).
 *
 *   ckpt_publish_begin()       makes a memfd laid out as a safetensors file for the given
 *                              tensors and maps it
 *   ckpt_publish_tensor_ptr()  where to write tensor i (the one copy: from host memory, or
 *                              cudaMemcpy straight from the GPU)
 *   ckpt_publish_send()        unmaps, seals (F_SEAL_WRITE | F_SEAL_SHRINK | F_SEAL_GROW:
 *                              nobody can change the bytes afterwards, this process
 *                              included) and passes the fd to the engine rank's publish
 *                              socket (DIR/publish-<rank>.sock of `ckpt-engine serve
 *                              --socket-dir DIR`), which adopts it in place
 *
 * Several trainer ranks may each publish a part (disjoint tensor sets) of one checkpoint:
 * part k of n. The engine registers the checkpoint when every part is in, refuses parts
 * that share a tensor, and drops parts still incomplete after its bound. Publishing again
 * under a registered name replaces that version once no update runs (at most two versions
 * are held). Protocol and rules: docs/PUBLISH.md.
 *
 * No MPI: this is part of libckpt (and of the Python binding, ckpt_engine.publish).
 */
#ifndef CKPT_PUBLISH_H
#define CKPT_PUBLISH_H

#include "ckpt/ckpt.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct ckpt_publication ckpt_publication_t;

/* Bytes the data region of a publication starts on (the header is padded with spaces to
 * reach it): page-aligned, so large tensors keep their page offset in the engine's pool. */
#define CKPT_PUBLISH_DATA_ALIGN 4096

typedef struct ckpt_publish_options {
    uint64_t field_mask; /* reserved for growth; set 0 */
    uint32_t part;       /* this publication is part `part` of `nparts` (default 0 of 1) */
    uint32_t nparts;
    /* The training step (any increasing number; default 0). A part of a newer step
     * replaces a pending part of an older one; parts of one checkpoint must agree. */
    uint64_t step;
    /* 1 (default): return once the checkpoint is registered (every part in) or refused;
     * 0: return once this rank accepted the part (it is then pending). */
    int wait;
    int timeout_ms;      /* bound of connecting and of every answer (default 60000) */
} ckpt_publish_options_t;

#define CKPT_PUBLISH_OPTIONS_INIT {0, 0, 1, 0, 1, 60000}

/* What the engine rank answered. */
typedef struct ckpt_publish_reply {
    int status;         /* 0, or the CKPT_E* status of the refusal */
    int registered;     /* 1: the checkpoint is registered (with wait) */
    uint64_t version;   /* the version it was registered as */
    char text[1024];    /* "accepted ...", "registered ...", or why it was refused */
} ckpt_publish_reply_t;

/* Makes the memfd for `count` tensors (metas give name, dtype and shape; offset, checksum
 * and owner are ignored) and maps it writable. Tensors are laid out in order of falling
 * element size (then as given), so every tensor starts on a multiple of its element size;
 * the data region starts on CKPT_PUBLISH_DATA_ALIGN. Pages are allocated up front
 * (MADV_POPULATE_WRITE) so the copy does not take one page fault per 4 KiB. `name` is the
 * checkpoint's name (1..255 bytes, no control characters). */
CKPT_API int ckpt_publish_begin(const char *name, const ckpt_tensor_meta_t *metas, size_t count,
                                ckpt_publication_t **pub_out);
/* Where tensor `index` (of the metas given to begin) goes: nbytes writable bytes. NULL when
 * index is out of range or the publication is sealed. */
CKPT_API void *ckpt_publish_tensor_ptr(ckpt_publication_t *pub, size_t index);
/* Pulled publishing: the same layout, but no memfd here. The caller names where each
 * tensor lies in its own memory (ckpt_publish_set_source) and ckpt_publish_send asks the
 * engine rank to read them itself (process_vm_readv) into a memfd it owns and refills at
 * the next step but one: no new pages per step, the one copy is the engine's read. The
 * sources must stay valid and unchanged until ckpt_publish_send returns. The engine must
 * see this process under the same pid (same pid namespace) and be allowed to read its
 * memory (same user; under Yama ptrace_scope 1 the send names the engine rank as the
 * allowed tracer until the answer). ckpt_publish_tensor_ptr is NULL for these. */
CKPT_API int ckpt_publish_begin_pull(const char *name, const ckpt_tensor_meta_t *metas,
                                     size_t count, ckpt_publication_t **pub_out);
CKPT_API int ckpt_publish_set_source(ckpt_publication_t *pub, size_t index, const void *data);
/* Offset of tensor `index` in the memfd (the safetensors file), or UINT64_MAX. */
CKPT_API uint64_t ckpt_publish_tensor_offset(const ckpt_publication_t *pub, size_t index);
/* Size of the memfd in bytes (the safetensors file's size). */
CKPT_API uint64_t ckpt_publish_size(const ckpt_publication_t *pub);
/* The memfd (owned by the publication). */
CKPT_API int ckpt_publish_fd(const ckpt_publication_t *pub);
/* Unmaps and seals the memfd; tensor pointers are invalid from here on. Sending seals by
 * itself; call this to hand the fd elsewhere. Sealing twice is a no-op. */
CKPT_API int ckpt_publish_seal(ckpt_publication_t *pub);
/* Seals (if not yet) and publishes to the engine rank listening on `socket_path`
 * (DIR/publish-<rank>.sock). opts may be NULL (defaults). Returns 0 when the engine
 * accepted the part (and, with wait, registered the checkpoint); otherwise the refusal's
 * status, with its text in ckpt_last_error() and reply->text. reply may be NULL. The
 * publication can be sent once; free it afterwards. */
CKPT_API int ckpt_publish_send(ckpt_publication_t *pub, const char *socket_path,
                               const ckpt_publish_options_t *opts, ckpt_publish_reply_t *reply);
/* Unmaps and closes the memfd (the engine keeps its own reference). NULL is a no-op. */
CKPT_API void ckpt_publish_free(ckpt_publication_t *pub);

/* All of the above in one call: copies data[i] (metas[i].nbytes bytes each) into a new
 * publication and sends it. */
CKPT_API int ckpt_publish_buffers(const char *socket_path, const char *name,
                                  const ckpt_tensor_meta_t *metas, const void *const *data,
                                  size_t count, const ckpt_publish_options_t *opts,
                                  ckpt_publish_reply_t *reply);

#ifdef __cplusplus
}
#endif

#endif /* CKPT_PUBLISH_H */
