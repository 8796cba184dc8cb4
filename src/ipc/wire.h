/* Wire format of the engine <-> worker protocol (docs/PROTOCOL.md): the frame header and
 * the payload codecs. Pure functions over byte arrays, no I/O, so the fuzzer can drive the
 * decoders directly. Every integer is little-endian on the wire. */
#ifndef CKPT_IPC_WIRE_H
#define CKPT_IPC_WIRE_H

#include <stddef.h>
#include <stdint.h>

#include "ckpt/ckpt.h"
#include "ckpt/receiver.h"
#include "core/internal.h"

/* Everything below is internal to libckpt (and tests linking the static archive). */
#pragma GCC visibility push(hidden)

#define CKPT_IPC_MAGIC 0x54504b43u /* "CKPT" as bytes on the wire */
/* 3: BEGIN carries the update's manifest and PARTIAL; FINISH is answered and then
 * decided by COMMIT or ABORT. 4: NEED (a worker declares which tensors and slices it
 * needs) and a kind per BEGIN buffer (docs/PROTOCOL.md, "Versioning"). */
#define CKPT_IPC_VERSION 4u
#define CKPT_IPC_HDR_SIZE 12u
/* Largest payload either side accepts. A BUCKET record is at most ~330 bytes, so this
 * allows ~200k tensors per bucket while bounding what a broken peer can make us allocate. */
#define CKPT_IPC_MAX_PAYLOAD (64u << 20)
#define CKPT_IPC_MAX_TEXT 1024u /* error / abort texts are cut to this */
/* Buffers one BEGIN may carry: the engine's own IPC buffers plus, on a single host, the
 * pool regions of every local engine rank (workers read tensors straight out of them).
 * SCM_RIGHTS takes up to 253 fds per message; 64 keeps the control buffers small. */
#define CKPT_IPC_MAX_BUFFERS 64

typedef enum {
    CKPT_IPC_MSG_BEGIN = 1,  /* engine -> worker, carries the buffer fds */
    CKPT_IPC_MSG_READY = 2,  /* worker -> engine: buffers mapped */
    CKPT_IPC_MSG_BUCKET = 3, /* engine -> worker */
    CKPT_IPC_MSG_OK = 4,     /* worker -> engine: bucket / finish / abort done */
    CKPT_IPC_MSG_ERR = 5,    /* worker -> engine: status + text */
    CKPT_IPC_MSG_FINISH = 6, /* engine -> worker: commit */
    CKPT_IPC_MSG_ABORT = 7,  /* engine -> worker: text = reason */
    CKPT_IPC_MSG_REFUSE = 8, /* engine -> worker: status + text, then the engine closes */
    /* The trainer-side publish socket (docs/PUBLISH.md) speaks the same framing: */
    CKPT_IPC_MSG_PUBLISH = 9,        /* trainer -> engine: name, part, step + a sealed memfd */
    CKPT_IPC_MSG_PUBLISH_REPLY = 10, /* engine -> trainer: accepted / registered / refused */
    /* engine -> worker, after every rank collected every worker's FINISH answer: the update
     * is complete. ABORT in its place says it is not (not answered either way). */
    CKPT_IPC_MSG_COMMIT = 11,
    /* worker -> engine, between updates: the tensors (and slices) it needs; not answered */
    CKPT_IPC_MSG_NEED = 12,
    CKPT_IPC_MSG_LAST = CKPT_IPC_MSG_NEED,
} ckpt__ipc_msg_type_t;

#define CKPT_IPC_BEGIN_VERIFY 1u /* BEGIN flags */
/* BEGIN with PREPARE: map these buffers now (answer READY) but start no update; the
 * worker stays between updates. Sent after a registration so that the first update does
 * not pay for mapping the pools. */
#define CKPT_IPC_BEGIN_PREPARE 2u
/* BEGIN with STABLE: the buffers hold the update's bytes unchanged until FINISH or ABORT
 * (direct updates: they are the owners' pools), so a worker may keep views of a bucket
 * after acknowledging it (vLLM's layer-wise reload does) without copying them. */
#define CKPT_IPC_BEGIN_STABLE 4u
/* BEGIN with PARTIAL: the update carries a subset of the model on purpose; the worker only
 * checks that the manifest's tensors exist in its model with the same dtype and shape. */
#define CKPT_IPC_BEGIN_PARTIAL 8u
/* Kinds of BEGIN buffers (version 4). HOST: host memory, its fd attached to the message
 * (in the order of the host buffers). The others attach no fd; a 64-byte handle follows
 * the buffer's kind instead. CUDA: device memory of the engine rank's GPU, the handle a
 * cudaIpcMemHandle_t (the worker opens it with cudaIpcOpenMemHandle). SIM: the GPU path
 * run on a CPU (engine/sink_sim.c), a rank's own buffer standing in for device memory;
 * the handle holds the rank's pid and fd (u32, u32), opened at /proc/PID/fd/FD. The
 * numbers are the receiver's CKPT_MEMORY_* of the views into them. */
#define CKPT_IPC_BUFFER_HOST 0u
#define CKPT_IPC_BUFFER_CUDA 1u
#define CKPT_IPC_BUFFER_SIM 2u
#define CKPT_IPC_HANDLE_BYTES 64
/* Shortest NEED record: 1-byte name, dim, start, length. */
#define CKPT_IPC_NEED_MIN (2 + 1 + 4 + 8 + 8)
/* Shortest manifest record: 1-byte name, 0 dims (name 2+1, dtype, ndim, nbytes, checksum). */
#define CKPT_IPC_MANIFEST_MIN (2 + 1 + 4 + 4 + 8 + 8)

typedef struct {
    uint32_t type;
    uint32_t length; /* payload bytes */
} ckpt__ipc_hdr_t;

typedef struct {
    uint64_t update_id;
    uint64_t version;
    uint32_t nbuckets;
    uint32_t flags;
    uint32_t nbuffers;    /* 1 .. CKPT_IPC_MAX_BUFFERS; the host ones' fds are attached */
    uint32_t max_tensors; /* most tensors in one bucket; 0 = unknown (receiver grows) */
    uint64_t buffer_sizes[CKPT_IPC_MAX_BUFFERS]; /* the first nbuffers are on the wire */
    uint32_t buffer_kinds[CKPT_IPC_MAX_BUFFERS];  /* CKPT_IPC_BUFFER_* */
    uint8_t buffer_handles[CKPT_IPC_MAX_BUFFERS][CKPT_IPC_HANDLE_BYTES]; /* kinds != HOST */
    char name[CKPT_NAME_MAX];
    /* Manifest: every tensor of the update (name, dtype, shape, nbytes, checksum). Encode:
     * `manifest` points at manifest_count metas (offset, owner ignored). Decode: every
     * record was validated; manifest_pos is its first byte in the payload, to be read
     * again with ckpt__ipc_manifest_decode (the decoder allocates nothing). */
    uint32_t manifest_count;
    const ckpt_tensor_meta_t *manifest;
    size_t manifest_pos;
} ckpt__ipc_begin_msg_t;

typedef struct {
    uint32_t bucket;
    uint32_t buffer;
    uint32_t count;
} ckpt__ipc_bucket_hdr_t;

/* Cursor over a payload; decoders check `pos` against `len` before every read. */
typedef struct {
    const uint8_t *p;
    size_t len;
    size_t pos;
} ckpt__ipc_reader_t;

/* Writes the 12-byte header into out. */
void ckpt__ipc_hdr_encode(uint8_t *out, uint32_t type, uint32_t length);
/* Validates magic, version, type and length; the error names `peer`. */
int ckpt__ipc_hdr_decode(const uint8_t *in, const char *peer, ckpt__ipc_hdr_t *out);
const char *ckpt__ipc_msg_name(uint32_t type);

size_t ckpt__ipc_begin_size(const ckpt__ipc_begin_msg_t *m);
void ckpt__ipc_begin_encode(const ckpt__ipc_begin_msg_t *m, uint8_t *out);
int ckpt__ipc_begin_decode(const uint8_t *p, size_t len, ckpt__ipc_begin_msg_t *out);
/* Bytes one manifest record takes, and its codec (the decoder validates as for BUCKET:
 * dtype known, ndim <= 8, nbytes = product(shape) x dtype size; offset and owner are 0/-1). */
size_t ckpt__ipc_manifest_size(const ckpt_tensor_meta_t *m);
size_t ckpt__ipc_manifest_encode(const ckpt_tensor_meta_t *m, uint8_t *out);
int ckpt__ipc_manifest_decode(ckpt__ipc_reader_t *rd, ckpt_tensor_meta_t *meta);

/* Which part of a tensor a BUCKET record holds (version 4): dim -1 the whole tensor;
 * otherwise indices [start, start + the record's shape[dim]) of dimension dim, packed,
 * out of `full` (the whole tensor's extent along dim). */
typedef struct {
    int32_t dim;
    uint64_t start;
    int64_t full;
} ckpt__ipc_part_t;

/* Bytes one tensor record takes; the BUCKET payload is 12 + the sum of these. */
size_t ckpt__ipc_tensor_size(const ckpt_tensor_meta_t *m);
size_t ckpt__ipc_bucket_encode_hdr(const ckpt__ipc_bucket_hdr_t *h, uint8_t *out);
/* A record of meta m; part NULL = the whole tensor, else m describes the part (its shape
 * and nbytes) and part where it lies in the tensor. */
size_t ckpt__ipc_tensor_encode(const ckpt_tensor_meta_t *m, const ckpt__ipc_part_t *part,
                               uint8_t *out);
/* Reads the bucket header and sets up `rd` at the first record. Checks `count` against
 * the bytes present, so callers may size arrays from it without trusting the peer. */
int ckpt__ipc_bucket_decode_hdr(const uint8_t *p, size_t len, ckpt__ipc_bucket_hdr_t *out,
                                ckpt__ipc_reader_t *rd);
/* Decodes and validates one record into `meta` (name, dtype, shape, nbytes consistent;
 * offset + nbytes <= buffer_size) and `part` (dim -1 with start = full = 0, or a dim of the
 * record's shape with start + shape[dim] <= full). owner is set to -1. */
int ckpt__ipc_tensor_decode(ckpt__ipc_reader_t *rd, uint64_t buffer_size,
                            ckpt_tensor_meta_t *meta, ckpt__ipc_part_t *part);
/* Says whether the reader consumed the payload exactly. */
int ckpt__ipc_reader_done(const ckpt__ipc_reader_t *rd, const char *what);

/* NEED: u32 count, then per tensor name, i32 dim (-1: whole), u64 start, u64 length
 * (along dim). The decoder validates each record (a name, dim in -1..7, whole records with
 * start = length = 0, length > 0 otherwise) and rejects a name given twice or trailing
 * bytes; decoded records go to out[0 .. count) (out may be NULL to validate only). */
size_t ckpt__ipc_need_size(const ckpt_need_decl_t *needs, size_t count);
void ckpt__ipc_need_encode(const ckpt_need_decl_t *needs, size_t count, uint8_t *out);
int ckpt__ipc_need_decode(const uint8_t *p, size_t len, ckpt_need_decl_t *out,
                          uint32_t *count_out);

/* Status payloads (ERR, REFUSE: status + text; ABORT: status 0 + reason). */
size_t ckpt__ipc_text_size(const char *text);
void ckpt__ipc_text_encode(int32_t status, const char *text, uint8_t *out);
/* Copies the text (cut to cap-1 bytes, NUL-terminated) into `text`. */
int ckpt__ipc_text_decode(const uint8_t *p, size_t len, int32_t *status_out, char *text,
                          size_t cap);

#pragma GCC visibility pop

#endif /* CKPT_IPC_WIRE_H */
