/* IPC buffers (buffers.c): the shared-memory buffers of this rank's group (e->buffers),
 * handed to the workers as fds, and the memory the ranks may use for them. */
#ifndef CKPT_ENGINE_BUFFERS_H
#define CKPT_ENGINE_BUFFERS_H

#include "engine/engine_internal.h"

/* Collective over the world: makes sure the group has `nbuffers` buffers of at least
 * `size` bytes (existing larger ones are kept). */
int ckpt__buffers_ensure(ckpt_engine_t *e, uint64_t size, int nbuffers, int timeout_ms);
void ckpt__buffers_release(ckpt_engine_t *e);
/* Bytes available for IPC buffers on this host (MemAvailable, /dev/shm free). */
uint64_t ckpt__host_available_bytes(void);
/* Memory every rank may use for IPC buffers: the smallest over all ranks (collective). */
int ckpt__buffer_budget(ckpt_engine_t *e, int timeout_ms, uint64_t *budget_out);

#endif
