/* Internals of the checkpoint store, shared by its files (never by other parts). */
#ifndef CKPT_STORE_STORE_INT_H
#define CKPT_STORE_STORE_INT_H

#include <stdatomic.h>

#include "core/internal.h"
#include "ckpt/store.h"
#include "device/cuda_rt.h"

/* ---- regions (pool.c) ---- */

#define CKPT__HUGE_PAGE (2u << 20)
#define CKPT__DIO_ALIGN 4096u

typedef struct ckpt__region {
    ckpt_pool_region_t pub;
    uint64_t map_len; /* bytes mapped at pub.base */
    int memfd;        /* 1: a memfd the store created (reusable); 0: an adopted file */
    int keep_fd;      /* 1: release leaves pub.fd open (a caller's fd, not ours yet) */
    /* Set when the pool allocator made it: released through it, never munmapped here. */
    const ckpt_pool_allocator_t *allocator;
    void *alloc_handle;
} ckpt__region_t;

/* A new region of at least `size` bytes (rounded to 2 MiB), mapped read-write: from the
 * allocator when it has one and it succeeds, else a memfd. */
int ckpt__region_alloc(uint64_t size, const char *label, const ckpt_pool_allocator_t *allocator,
                       ckpt__region_t *out);
/* Maps `size` bytes of an existing fd read-only (MAP_SHARED); does not take the fd (the
 * caller stores it in out->pub.fd when the region should own it). */
int ckpt__region_map(int fd, uint64_t size, const char *label, ckpt__region_t *out);
/* Unmaps and closes pub.fd (when >= 0 and not keep_fd). */
void ckpt__region_release(ckpt__region_t *r);

/* ---- store bookkeeping (store.c) ---- */

typedef struct ckpt__ckpt {
    char *name;
    ckpt_tensor_meta_t *metas;  /* sorted by name */
    const void **data;          /* per tensor: host address, NULL when remote */
    size_t count;
    ckpt__region_t *rg;
    ckpt_pool_region_t *regions; /* public copy of rg[i].pub */
    size_t nregions;
    uint64_t local_bytes, total_bytes;
} ckpt__ckpt_t;

struct ckpt_store {
    ckpt_store_options_t opts;
    ckpt__ckpt_t **ckpts;
    size_t count, cap;
    ckpt__region_t spare; /* reuse_pool: one freed memfd region kept for the next one */
    int has_spare;
    ckpt_store_stats_t stats;
    int has_stats;
};

/* Pool memory for a checkpoint: the spare region when reuse_pool is on and it fits,
 * otherwise a new one; pinned when pin_cuda is on. */
int ckpt__store_pool_alloc(ckpt_store_t *store, uint64_t size, const char *label,
                           ckpt__region_t *out);
/* Returns a region: kept as the spare (reuse_pool) or unpinned and released. */
void ckpt__store_pool_release(ckpt_store_t *store, ckpt__region_t *r);
/* Fails with CKPT_EEXIST when `name` is registered, CKPT_EINVAL when it is unusable. */
int ckpt__store_check_name(ckpt_store_t *store, const char *name);

/* The common end of every registration. Takes `metas` (offset, owner, checksum filled),
 * `data` (per tensor or NULL) and `rg` (nregions) whatever the outcome; sorts the tensors
 * by name, rejects duplicates, and adds the checkpoint. On failure the regions are
 * released and the store is unchanged. */
int ckpt__store_add(ckpt_store_t *store, const char *name, ckpt_tensor_meta_t *metas,
                    const void **data, size_t count, ckpt__region_t *rg, size_t nregions);

/* ---- registration from files (load.c, io.c) ---- */

/* A tensor of a file, as the loader needs it. */
typedef struct ckpt__load_tensor {
    ckpt_tensor_meta_t meta; /* offset = absolute offset in its file */
    uint32_t file;           /* index into the file list */
} ckpt__load_tensor_t;

/* Core of ckpt_store_register_files, independent of the file format: `tensors` lists every
 * tensor of `nfiles` files (`paths`). Computes the shares and the pool layout of every
 * rank, reads rank `rank`'s tensors and registers the checkpoint. */
int ckpt__store_load(ckpt_store_t *store, const char *name, char *const *paths, size_t nfiles,
                     const ckpt__load_tensor_t *tensors, size_t count, int rank, int nranks);

/* One read of the plan (a chunk of a run). */
typedef struct ckpt__io_chunk {
    uint64_t file_off;
    uint64_t len;      /* bytes to transfer; O_DIRECT chunks: a multiple of 4096 */
    uint64_t need;     /* bytes of len that must arrive (O_DIRECT may stop at EOF after) */
    uint64_t done;     /* bytes already transferred (short reads continue from here) */
    uint8_t *dst;
    uint32_t run;
    int fd;
    int direct;
} ckpt__io_chunk_t;

/* A run: file-contiguous tensors read together, then finished (shifted into place and
 * checksummed) as soon as its last chunk lands. */
typedef struct ckpt__io_run {
    uint32_t first, count;  /* local tensors [first, first+count) of the loader's list */
    uint32_t file;
    atomic_uint pending;    /* chunks not landed yet */
    uint8_t *land;          /* where the run's first byte lands */
    uint8_t *final;         /* where it must end (CKPT_ALIGN); == land unless O_DIRECT */
    uint64_t len;
} ckpt__io_run_t;

typedef struct ckpt__io_job {
    ckpt__io_chunk_t *chunks;
    size_t nchunks;
    ckpt__io_run_t *runs;
    size_t nruns;
    ckpt_tensor_meta_t *const *tensors; /* local tensors in run order: checksums land here */
    uint8_t *pool_base;                 /* meta->offset is relative to it */
    char *const *paths;
    int io_depth, io_threads, use_uring;
    const char *path_used; /* out: "io_uring" or "pread" */
} ckpt__io_job_t;

/* Runs every chunk of the job; finishes each run as it completes. Fails with CKPT_EIO
 * naming the file and offset (truncated file, read error); every read has ended on
 * return, so the caller may free the destination. */
int ckpt__io_run(ckpt__io_job_t *job);
/* Finishes a run whose chunks all landed: moves it into place, checksums its tensors. */
void ckpt__io_finish_run(ckpt__io_job_t *job, ckpt__io_run_t *run);

#endif
