/* Private to src/comm/ucx*.c: the structures behind the handles of ucx.h. */
#ifndef CKPT_COMM_UCX_IMPL_H
#define CKPT_COMM_UCX_IMPL_H

#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include <ucp/api/ucp.h>

#include "comm/ucx.h"

struct ckpt__ucx_mem {
    ucp_mem_h memh;
    void *base;
    size_t len;
    int allocated; /* UCX allocated the memory (ckpt__ucx_mem_alloc_shared): unmap frees it */
    struct ckpt__ucx_mem *next;
};

struct ckpt__ucx_rkey {
    ucp_rkey_h rkey;
    struct ckpt__ucx_peer *peer;
    struct ckpt__ucx_rkey *next;
};

struct ckpt__ucx_peer {
    struct ckpt__ucx *ucx;
    ucp_ep_h ep;
    int rank;
    ucs_status_t fail_status; /* set by the error handler; UCS_OK while healthy */
    int no_peer_errors;       /* endpoint created without PEER error mode (shm in UCX 1.13) */
    int closing;              /* ucp_ep_close_nbx was called: no more operations */
    int pidfd;                /* the peer's process when it runs on this host, else -1 */
    int pid;
    int exited;               /* its pidfd said the process is gone (ucx_addr.c) */
    void *close_req;
    struct ckpt__ucx_rkey *rkeys;
    struct ckpt__ucx_peer *next;
};

/* One outstanding chunk of a get batch. The array lives as long as the context and is
 * sized once per batch (grown only), so the data path never allocates. */
typedef struct ckpt__ucx_slot {
    void *req;                    /* UCX request; NULL when the slot is free */
    volatile int done;            /* set by the completion callback */
    ucs_status_t status;
    struct ckpt__ucx_peer *peer;
    size_t get_index;
} ckpt__ucx_slot_t;

struct ckpt__ucx {
    ucp_context_h context;
    ucp_worker_h worker;
    ucp_address_t *address;
    size_t address_len;
    void *pub_address;        /* what ckpt__ucx_address publishes: identity + address */
    size_t pub_address_len;
    int serving;
    int shared_alloc;
    size_t chunk;
    uint64_t spin_ns;
    struct ckpt__ucx_mem *mems;
    struct ckpt__ucx_peer *peers;
    ckpt__ucx_slot_t *slots;
    size_t slot_cap;
    struct pollfd *pfds;      /* slot_cap + 1: the worker fd and the pidfds of slot peers */
    /* progress thread */
    pthread_t thread;
    int thread_running;
    int efd;
    _Atomic int stop;
};

CKPT_HIDDEN int ckpt__ucx_status(ucs_status_t st);
/* ucx_addr.c: the published address carries the process's identity, so that a peer on
 * this host is known dead by its pidfd even where the transport cannot tell. */
CKPT_HIDDEN int ckpt__ucx_addr_build(struct ckpt__ucx *u);
/* Splits a published address into the UCX part and, for a process on this host and in
 * this pid namespace, a pidfd of it (else -1). CKPT_EPEER when that process is gone. */
CKPT_HIDDEN int ckpt__ucx_addr_parse(const void *addr, size_t len, int rank, const void **ucx_addr,
                                     size_t *ucx_len, int *pidfd_out, int *pid_out);
/* 1 once the peer's process exited (its pidfd is readable); then marks the peer failed. */
CKPT_HIDDEN int ckpt__ucx_peer_exited(struct ckpt__ucx_peer *p);
CKPT_HIDDEN void ckpt__ucx_peer_mark_exited(struct ckpt__ucx_peer *p);
/* Why a failed peer failed, for error texts. */
CKPT_HIDDEN const char *ckpt__ucx_peer_fail_text(const struct ckpt__ucx_peer *p, char *buf,
                                                 size_t size);
CKPT_HIDDEN void ckpt__ucx_peer_close_start(struct ckpt__ucx_peer *p, int force);

#endif
