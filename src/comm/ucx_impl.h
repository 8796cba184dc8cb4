/* Private to src/comm/ucx*.c: the structures behind the handles of ucx.h. */
#ifndef CKPT_COMM_UCX_IMPL_H
#define CKPT_COMM_UCX_IMPL_H

#include <errno.h>
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
    int serving;
    int shared_alloc;
    size_t chunk;
    uint64_t spin_ns;
    struct ckpt__ucx_mem *mems;
    struct ckpt__ucx_peer *peers;
    ckpt__ucx_slot_t *slots;
    size_t slot_cap;
    /* progress thread */
    pthread_t thread;
    int thread_running;
    int efd;
    _Atomic int stop;
};

CKPT_HIDDEN int ckpt__ucx_status(ucs_status_t st);
CKPT_HIDDEN void ckpt__ucx_peer_close_start(struct ckpt__ucx_peer *p, int force);

#endif
