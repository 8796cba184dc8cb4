/*
 * The metas file: what a serving deployment publishes so that a new deployment can pull
 * its weights with one-sided UCX gets (DESIGN.md §3, P2P update). The format is JSON,
 * specified in docs/METAS.md; this is its in-memory form, plain arrays throughout.
 */
#ifndef CKPT_COMM_METAS_FILE_H
#define CKPT_COMM_METAS_FILE_H

#include <stddef.h>
#include <stdint.h>

#include "core/internal.h"

#define CKPT__METAS_FORMAT "ckpt-metas"
#define CKPT__METAS_FORMAT_VERSION 1
/* Limits that keep a hostile file from asking for absurd allocations. */
#define CKPT__METAS_MAX_RANKS 65536u
#define CKPT__METAS_MAX_REGIONS 4096u     /* per rank */
#define CKPT__METAS_MAX_BLOB 65536u       /* decoded bytes of one address or rkey */
#define CKPT__METAS_MAX_TENSORS 10000000u

/* One registered region of a rank's host pool. */
typedef struct ckpt__metas_region {
    uint64_t base;  /* virtual address in the owner process */
    uint64_t size;  /* bytes; base + size does not overflow */
    uint8_t *rkey;  /* packed UCX remote key */
    size_t rkey_len;
} ckpt__metas_region_t;

typedef struct ckpt__metas_rank {
    uint8_t *address;  /* UCX worker address */
    size_t address_len;
    uint32_t nregions;
    ckpt__metas_region_t *regions;
} ckpt__metas_rank_t;

/* A tensor: meta.owner is the rank holding it, meta.offset its offset inside
 * ranks[owner].regions[region]; meta.checksum its XXH3-64. */
typedef struct ckpt__metas_tensor {
    ckpt_tensor_meta_t meta;
    uint32_t region;
} ckpt__metas_tensor_t;

typedef struct ckpt__metas {
    char name[CKPT_NAME_MAX]; /* checkpoint name */
    uint64_t version;         /* version id of the checkpoint */
    uint32_t nranks;
    ckpt__metas_rank_t *ranks;
    size_t ntensors;
    ckpt__metas_tensor_t *tensors;
} ckpt__metas_t;

/* Validates m (the same rules decode applies) and writes it as JSON: *json_out is a
 * NUL-terminated buffer of *len_out bytes (NUL not counted), released with ckpt__free. */
CKPT_HIDDEN int ckpt__metas_encode(const ckpt__metas_t *m, char **json_out, size_t *len_out);
/* Parses and fully validates len bytes (no NUL needed). On success *out owns its arrays
 * (release with ckpt__metas_free); on failure *out is untouched and CKPT_EFORMAT (or
 * CKPT_EUNSUPPORTED for a newer format version) names the offending field. */
CKPT_HIDDEN int ckpt__metas_decode(const void *data, size_t len, ckpt__metas_t *out);
/* Releases what decode allocated and zeroes *m. NULL is ignored. */
CKPT_HIDDEN void ckpt__metas_free(ckpt__metas_t *m);

/* Strict standard base64 (RFC 4648, '=' padding), for the binary blobs. encode writes
 * ckpt__base64_encoded_len(n) bytes plus a NUL; decode returns the byte count or -1. */
CKPT_HIDDEN size_t ckpt__base64_encoded_len(size_t n);
CKPT_HIDDEN void ckpt__base64_encode(const uint8_t *src, size_t n, char *dst);
CKPT_HIDDEN long ckpt__base64_decode(const char *src, size_t n, uint8_t *dst, size_t cap);

#endif /* CKPT_COMM_METAS_FILE_H */
