/* Internals of publishing (docs/PUBLISH.md): the messages of the publish socket, the check
 * of a received memfd, and the engine rank's listener with its table of pending parts.
 * libckpt only (no MPI); the engine (src/engine/publish.c) drives registration. */
#ifndef CKPT_PUBLISH_PUBLISH_INT_H
#define CKPT_PUBLISH_PUBLISH_INT_H

#include <stddef.h>
#include <stdint.h>

#include "core/internal.h"

#pragma GCC visibility push(hidden)

/* Seals a publication must carry: without them the trainer could change or truncate the
 * bytes while workers read them (a truncation would even SIGBUS the engine). */
#define CKPT__PUB_SEALS_REQUIRED_TEXT "F_SEAL_WRITE|F_SEAL_SHRINK|F_SEAL_GROW"

#ifndef MADV_POPULATE_WRITE
#define MADV_POPULATE_WRITE 23 /* Linux 5.14; older kernels answer EINVAL: pages fault later */
#endif

#define CKPT__PUB_FLAG_WAIT 1u     /* PUBLISH flags: answer again once registered/refused */
#define CKPT__PUB_FLAG_PULL 2u     /* no fd: the engine reads the tensors from the trainer */
#define CKPT__PUB_MAX_SPARE 8      /* pulled memfds kept for reuse, per rank */
#define CKPT__PUB_SPARE_KEEP_S 120 /* ... for at most this long without a pull */
#define CKPT__PUB_MAX_PARTS 4096u  /* nparts above this is refused */
#define CKPT__PUB_MAX_PENDING 256  /* parts one rank holds pending at most */

typedef enum {
    CKPT__PUB_ACCEPTED = 1,   /* pending on this rank; a final answer follows with WAIT */
    CKPT__PUB_REGISTERED = 2, /* final: the checkpoint is registered as `version` */
    CKPT__PUB_REFUSED = 3,    /* final: status and text say why; nothing was kept */
} ckpt__pub_kind_t;

typedef struct {
    uint32_t part, nparts;
    uint64_t step;
    uint64_t size; /* bytes of the memfd the trainer sends */
    uint32_t flags;
    char name[CKPT_NAME_MAX];
    /* PULL only. header: the safetensors header (8-byte length + JSON) the memfd starts
     * with; segs: nsegs x (u64 offset in the memfd, u64 address in the trainer), one per
     * tensor; pid: the trainer's pid as it sees itself. Both point into the message. */
    uint32_t pid, nsegs;
    uint64_t header_len;
    const uint8_t *header;
    const uint8_t *segs;
} ckpt__pub_request_t;

#define CKPT__PUB_SEG_BYTES 16u

/* ---- messages (publish_wire.c): pure codecs over bytes, little-endian ---- */
size_t ckpt__pub_request_size(const ckpt__pub_request_t *r);
void ckpt__pub_request_encode(const ckpt__pub_request_t *r, uint8_t *out);
int ckpt__pub_request_decode(const uint8_t *p, size_t len, ckpt__pub_request_t *out);
size_t ckpt__pub_reply_size(const char *text);
void ckpt__pub_reply_encode(int32_t status, uint32_t kind, uint64_t version, const char *text,
                            uint8_t *out);
int ckpt__pub_reply_decode(const uint8_t *p, size_t len, int32_t *status, uint32_t *kind,
                           uint64_t *version, char *text, size_t cap);
/* A checkpoint name a publisher may use: 1..CKPT_NAME_MAX-1 bytes, no control characters
 * (the engine keeps names starting with a control character for itself). */
int ckpt__pub_check_name(const char *name);

/* Checks a received fd before anything trusts it: a memfd with the required seals, of the
 * announced size, holding a safetensors header that parses and covers it exactly. On
 * success *metas_out (ckpt__free) lists the tensors with their absolute offsets in the fd. */
int ckpt__pub_inspect_fd(int fd, const char *label, uint64_t announced,
                         ckpt_tensor_meta_t **metas_out, size_t *count_out);

/* Parses the safetensors header at the start of fd (of `size` bytes) into metas with
 * absolute offsets (ckpt__free). */
int ckpt__pub_parse_fd(int fd, const char *label, uint64_t size, ckpt_tensor_meta_t **metas_out,
                       size_t *count_out);

/* ---- pulling (publish_pull.c): the engine reads a trainer's tensors into a memfd ---- */

/* Fills memfd `fd` (already `req->size` bytes, mapped read-write at `base`) from the
 * trainer `pid`: the header, then
 * every tensor of the header from the address its segment names (process_vm_readv). On
 * success *metas_out lists the tensors (absolute offsets). Errors name the tensor and the
 * cause (the trainer exited, an address it does not map, a segment that does not match
 * the header). */
int ckpt__pub_pull(int fd, uint8_t *base, int pid, const ckpt__pub_request_t *req,
                   const char *label, ckpt_tensor_meta_t **metas_out, size_t *count_out);

/* ---- the engine rank's listener (publish_server.c) ---- */

/* A part that arrived and waits until every part of its checkpoint is in. */
typedef struct ckpt__pub_part {
    ckpt__pub_request_t req;
    int fd;                    /* the sealed memfd (owned) */
    ckpt_tensor_meta_t *metas; /* offset = absolute offset in fd */
    size_t count;
    uint64_t arrived_ns;       /* ckpt__now_ns() at arrival */
    int reply_fd;              /* connection waiting for the final answer (WAIT); -1 none */
    int pid;                   /* the publisher (for logs) */
} ckpt__pub_part_t;

typedef struct ckpt__pub_server ckpt__pub_server_t;

/* Listens on `path` (mode 0600; only this uid may connect) on a thread of its own that
 * accepts, checks and keeps parts. recv_timeout_ms bounds the wait for one request. */
int ckpt__pub_server_open(const char *path, int recv_timeout_ms, ckpt__pub_server_t **out);
/* Stops the thread, answers every waiting publisher, closes and unlinks. NULL: no-op. */
void ckpt__pub_server_close(ckpt__pub_server_t *srv);
const char *ckpt__pub_server_path(const ckpt__pub_server_t *srv);
/* Parts pending now. */
size_t ckpt__pub_server_pending(ckpt__pub_server_t *srv);
/* Moves every pending part out (the caller owns them and the array: ckpt__free). */
int ckpt__pub_server_take(ckpt__pub_server_t *srv, ckpt__pub_part_t **parts_out,
                          size_t *count_out);
/* Puts a part back as pending. A part of the same name and index that arrived meanwhile
 * is newer: the older step loses (ties: the one in the table, which came later). */
void ckpt__pub_server_put_back(ckpt__pub_server_t *srv, ckpt__pub_part_t *part);
/* Gives back the fd of a replaced version's region (the caller's dup; always taken): a
 * memfd this listener filled by pulling is kept for the next pull (up to
 * CKPT__PUB_MAX_SPARE), so a step's publish reuses pages that are already allocated;
 * anything else is closed. */
void ckpt__pub_server_recycle(ckpt__pub_server_t *srv, int fd);
/* Sends the final answer to the part's waiting publisher (if any) and releases the part's
 * fds and metas (not the struct). status 0 means registered as `version`. */
void ckpt__pub_part_finish(ckpt__pub_part_t *part, int status, uint64_t version,
                           const char *text);

#pragma GCC visibility pop

#endif
