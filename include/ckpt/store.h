/*
 * The checkpoint store: the host memory pool of one rank and the checkpoints registered in
 * it (from safetensors files, from caller buffers, or from a caller's memfd).
 *
 * A checkpoint registered by rank r of n holds the bytes of rank r's share only (see
 * ckpt_plan_shares), but its tensor list names every tensor of the checkpoint with the rank
 * that owns it, so the ranks together hold every byte exactly once.
 *
 * Pool memory is memfd-backed (so local processes can map it by fd), rounded to 2 MiB for
 * huge pages, and every tensor that the store copies starts on a CKPT_ALIGN boundary.
 * Files on tmpfs (/dev/shm) are mapped in place instead: their tensors keep the alignment
 * they have in the file.
 *
 * A store is used by one thread at a time (the engine serialises calls); stores share no
 * state with each other.
 */
#ifndef CKPT_STORE_H
#define CKPT_STORE_H

#include "ckpt/ckpt.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct ckpt_store ckpt_store_t;

/* Bits of ckpt_store_options_t.field_mask: a field is read only when its bit is set, so
 * callers built against an older header keep working when fields are added. */
enum {
    CKPT_STORE_OPT_IO_DEPTH = 1u << 0,
    CKPT_STORE_OPT_IO_THREADS = 1u << 1,
    CKPT_STORE_OPT_USE_DIRECT = 1u << 2,
    CKPT_STORE_OPT_PIN_CUDA = 1u << 3,
    CKPT_STORE_OPT_CHUNK_BYTES = 1u << 4,
    CKPT_STORE_OPT_REUSE_POOL = 1u << 5,
    CKPT_STORE_OPT_USE_URING = 1u << 6,
    CKPT_STORE_OPT_MAP_TMPFS = 1u << 7,
    CKPT_STORE_OPT_POOL_ALLOCATOR = 1u << 8,
};

/* Where the pool regions of registrations come from, instead of the store's own memfds.
 * alloc returns a read-write MAP_SHARED mapping of at least len bytes at *base_out, an fd
 * (owned by the store from then on) that maps the same pages for other local processes,
 * and an opaque handle passed back to release. A non-zero return makes the store fall back
 * to a memfd for that region. The engine uses it to let UCX allocate pools that same-host
 * peers then read straight out of a shared segment (see docs/DESIGN-NOTES.md). */
typedef struct ckpt_pool_allocator {
    int (*alloc)(void *ctx, uint64_t len, void **base_out, int *fd_out, void **handle_out);
    void (*release)(void *ctx, void *base, uint64_t len, void *handle);
    void *ctx;
} ckpt_pool_allocator_t;

typedef struct ckpt_store_options {
    uint64_t field_mask;
    int io_depth;         /* reads in flight; default 32 */
    int io_threads;       /* threads of the pread fallback; default 8 */
    int use_direct;       /* O_DIRECT: -1 auto (where the file system allows), 0 off, 1 on */
    int pin_cuda;         /* cudaHostRegister pool regions when libcudart loads; default 1 */
    uint64_t chunk_bytes; /* largest single read, rounded to 4096; default 8 MiB */
    int reuse_pool;       /* keep a freed pool region for the next checkpoint; default 0 */
    int use_uring;        /* -1 auto (io_uring, else pread pool), 0 force the pread pool */
    int map_tmpfs;        /* map files on tmpfs in place instead of copying; default 1 */
    ckpt_pool_allocator_t pool_allocator; /* default: none (memfds) */
} ckpt_store_options_t;

#define CKPT_STORE_OPTIONS_INIT                                                              \
    {                                                                                        \
        0, 32, 8, -1, 1, 8u << 20, 0, -1, 1, {NULL, NULL, NULL}                              \
    }

/* Statistics of the last successful registration of a store. */
typedef struct ckpt_store_stats {
    uint64_t bytes_local;   /* tensor bytes this rank holds (its share) */
    uint64_t bytes_read;    /* tensor bytes read from disk (0 for buffers, fds, tmpfs) */
    uint64_t bytes_io;      /* bytes transferred, incl. the 4 KiB-alignment margins */
    uint64_t bytes_direct;  /* of bytes_io, bytes read with O_DIRECT */
    uint64_t bytes_mapped;  /* tensor bytes mapped in place from tmpfs files */
    double seconds;         /* wall time of the registration */
    char io_path[32];       /* "io_uring+O_DIRECT", "io_uring", "pread+O_DIRECT", "pread",
                               "mmap" (tmpfs only), "copy" or "fd" */
} ckpt_store_stats_t;

/* A piece of a checkpoint's host memory. `offset` is where the region starts in the
 * checkpoint's pool offsets (tensor metas' `offset` fall in [offset, offset + size) of the
 * region holding them); `fd` maps it (owned by the store: do not close). */
typedef struct ckpt_pool_region {
    void *base;
    uint64_t size;
    int fd;
    int pinned;     /* 1 when registered with CUDA */
    uint64_t offset;
} ckpt_pool_region_t;

/* Creates an empty store. opts may be NULL (defaults). */
CKPT_API int ckpt_store_create(const ckpt_store_options_t *opts, ckpt_store_t **store_out);
/* Unregisters every checkpoint and frees the store. NULL is a no-op. */
CKPT_API void ckpt_store_destroy(ckpt_store_t *store);

/* Registers checkpoint `name` from PATH (a .safetensors file, a directory of them or an
 * index.json), reading only the share of rank `rank` of `nranks` (ckpt_plan_shares over all
 * tensors of all files). Other ranks' tensors are listed with owner = their rank and the
 * offset they get in their pool, without data. Checksums of local tensors are computed as
 * their bytes land. CKPT_EEXIST if the name is taken; on any failure (naming the file and
 * the cause) nothing is registered and every resource is returned. */
CKPT_API int ckpt_store_register_files(ckpt_store_t *store, const char *name, const char *path, int rank,
                              int nranks);
/* The same from a list of safetensors files (checkpoint-engine's register request): the
 * list is sorted first, so its order does not change the layout. A file listed twice is
 * refused (CKPT_EINVAL). */
CKPT_API int ckpt_store_register_file_list(ckpt_store_t *store, const char *name,
                                           const char *const *paths, size_t count, int rank,
                                           int nranks);
/* Registers `count` tensors by copying caller buffers into a new pool region: metas give
 * name, dtype and shape (offset/checksum/owner ignored), data[i] the nbytes bytes.
 * All tensors are local (owner 0). */
CKPT_API int ckpt_store_register_buffers(ckpt_store_t *store, const char *name,
                                const ckpt_tensor_meta_t *metas, const void *const *data,
                                size_t count);
/* Adopts fd (a memfd or a /dev/shm file of `size` bytes) without copying: metas[i].offset
 * is where tensor i lies in it. Tensors must lie within `size` and not overlap. Takes
 * ownership of fd on success only (closed at unregister). */
CKPT_API int ckpt_store_register_fd(ckpt_store_t *store, const char *name, int fd, uint64_t size,
                           const ckpt_tensor_meta_t *metas, size_t count);
/* One fd of a registration from several fds (ckpt_store_register_fds): `size` bytes of fd
 * are mapped read-only; metas[i].offset is where tensor i lies in the fd; the region starts
 * at pool offset `offset` of the checkpoint (ranges of the parts must not overlap). */
typedef struct ckpt_store_fd_part {
    int fd;
    uint64_t size;
    uint64_t offset;
    const ckpt_tensor_meta_t *metas;
    size_t count;
} ckpt_store_fd_part_t;

/* Adopts several fds under one name without copying (e.g. the parts several trainer ranks
 * published to this engine rank): the tensors of the parts are local (owner = `rank`, pool
 * offset = part offset + offset in the fd). `remote` lists tensors held by other ranks
 * (owner and pool offset taken as given, no data), so the tensor list names the whole
 * checkpoint. nparts may be 0 (this rank holds none of it). Tensor names must be unique
 * over parts and remote. A part's meta with a non-zero `checksum` is taken as the XXH3-64
 * of its bytes (the caller computed it while writing them; a wrong one fails the workers'
 * verification, never silently); 0: computed here. Takes ownership of every fd on success
 * only. */
CKPT_API int ckpt_store_register_fds(ckpt_store_t *store, const char *name, int rank,
                                     const ckpt_store_fd_part_t *parts, size_t nparts,
                                     const ckpt_tensor_meta_t *remote, size_t nremote);
/* Renames a registered checkpoint (its memory stays where it is); CKPT_ENOENT if `from` is
 * unknown, CKPT_EEXIST if `to` is taken. Lets a caller register a new version under a
 * scratch name and swap it in once every rank has it. */
CKPT_API int ckpt_store_rename(ckpt_store_t *store, const char *from, const char *to);
/* Unregisters a checkpoint and frees its memory; CKPT_ENOENT if unknown. */
CKPT_API int ckpt_store_unregister(ckpt_store_t *store, const char *name);

/* All tensors of a checkpoint (every rank's), sorted by name: owner = the rank holding it,
 * offset = its offset in that owner's pool, checksum filled for local tensors (0 for
 * others). Valid until the checkpoint is unregistered. */
CKPT_API int ckpt_store_tensors(ckpt_store_t *store, const char *name,
                       const ckpt_tensor_meta_t **metas_out, size_t *count_out);
/* Host address of tensor `index` (of ckpt_store_tensors) of a checkpoint; CKPT_ENOENT when
 * that tensor is held by another rank. */
CKPT_API int ckpt_store_tensor_data(ckpt_store_t *store, const char *name, size_t index,
                           const void **data_out);
/* Memory regions of a checkpoint (to register with UCX, to map by fd). Valid until
 * unregister. */
CKPT_API int ckpt_store_regions(ckpt_store_t *store, const char *name,
                       const ckpt_pool_region_t **regions_out, size_t *count_out);

/* Number of registered checkpoints. */
CKPT_API size_t ckpt_store_count(ckpt_store_t *store);
/* The index-th checkpoint (registration order): its name, tensor bytes held locally, tensor
 * bytes of the whole checkpoint and number of tensors. Any output may be NULL. */
CKPT_API int ckpt_store_info(ckpt_store_t *store, size_t index, const char **name_out,
                    uint64_t *local_bytes_out, uint64_t *total_bytes_out, size_t *tensors_out);
/* Statistics of the last successful registration; CKPT_ENOENT before the first one. */
CKPT_API int ckpt_store_last_stats(ckpt_store_t *store, ckpt_store_stats_t *stats_out);

/* The share policy: assigns each of `count` tensors (name and nbytes read from metas) to
 * one of `nranks` ranks so that bytes are balanced: largest first onto the least-loaded
 * rank, ties broken by name and lowest rank. Deterministic; max - min load <= the largest
 * tensor. owners_out has `count` entries. */
CKPT_API int ckpt_plan_shares(const ckpt_tensor_meta_t *metas, size_t count, int nranks,
                     int32_t *owners_out);

#ifdef __cplusplus
}
#endif

#endif /* CKPT_STORE_H */
