/* One framed, non-blocking Unix-socket connection: send a message (optionally with fds),
 * receive a message with a deadline. Receiving is resumable: a timeout in the middle of a
 * frame keeps what was read, so the next call continues where this one stopped. Buffers
 * grow rarely (doubling) and are reused, so steady-state traffic allocates nothing. */
#ifndef CKPT_IPC_CONN_H
#define CKPT_IPC_CONN_H

#include <stddef.h>
#include <stdint.h>

#include "ipc/wire.h"

#pragma GCC visibility push(hidden)

typedef struct {
    int fd;           /* -1 when closed */
    int broken;       /* a send was cut mid-frame: the stream cannot be trusted any more */
    char peer[320];   /* names the other side in every error ("worker on /run/x.sock") */
    /* receive state */
    uint8_t hdr[CKPT_IPC_HDR_SIZE];
    size_t rx_got;    /* bytes of the current frame read so far (header included) */
    ckpt__ipc_hdr_t rx_hdr;
    uint8_t *rx_buf;
    size_t rx_cap;
    int rx_fds[CKPT_IPC_MAX_BUFFERS];
    int rx_nfds;
    /* send buffer: header + payload, built in place */
    uint8_t *tx_buf;
    size_t tx_cap;
} ckpt__ipc_conn_t;

/* Optional extra fd to watch while waiting (the server's listening socket): when it
 * becomes readable, `cb(arg)` runs and the wait goes on. */
typedef struct {
    int fd;
    void (*cb)(void *arg);
    void *arg;
} ckpt__ipc_watch_t;

void ckpt__ipc_conn_init(ckpt__ipc_conn_t *c, int fd, const char *peer);
/* Closes the socket and any received fds; keeps the buffers for the next connection. */
void ckpt__ipc_conn_reset(ckpt__ipc_conn_t *c);
/* Frees the buffers too. */
void ckpt__ipc_conn_destroy(ckpt__ipc_conn_t *c);

/* Payload area of at least `len` bytes in the send buffer. */
int ckpt__ipc_conn_tx_reserve(ckpt__ipc_conn_t *c, size_t len, uint8_t **payload_out);
/* Sends header + the `len` payload bytes placed by tx_reserve, with `nfds` fds attached.
 * CKPT_EPEER on EOF/EPIPE, CKPT_ETIMEDOUT (and `broken`) if the peer stops reading. */
int ckpt__ipc_conn_send(ckpt__ipc_conn_t *c, uint32_t type, size_t len, const int *fds,
                        int nfds, int timeout_ms);
/* Sends a message with an empty payload or a status+text payload. */
int ckpt__ipc_conn_send_text(ckpt__ipc_conn_t *c, uint32_t type, int32_t status,
                             const char *text, int timeout_ms);

/* Waits for one complete frame. On success *hdr_out gives type and length and the payload
 * is in c->rx_buf (valid until the next receive); fds that came with it are in c->rx_fds.
 * timeout_ms < 0 waits forever (only for idle waits). */
int ckpt__ipc_conn_recv(ckpt__ipc_conn_t *c, int timeout_ms, const ckpt__ipc_watch_t *watch,
                        ckpt__ipc_hdr_t *hdr_out);
/* Closes fds received with the last frame that nobody took. */
void ckpt__ipc_conn_drop_fds(ckpt__ipc_conn_t *c);

/* Milliseconds left until `deadline_ns` (0 = none, returns -1 = forever). */
int ckpt__ipc_ms_left(uint64_t deadline_ns);
uint64_t ckpt__ipc_deadline(int timeout_ms);

#pragma GCC visibility pop

#endif /* CKPT_IPC_CONN_H */
