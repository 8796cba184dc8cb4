/* Who the ranks are (peers.c): every rank's pid and host, gathered at start into e->peers,
 * so that a rank that does not answer is named with what can be known about it. */
#ifndef CKPT_ENGINE_PEERS_H
#define CKPT_ENGINE_PEERS_H

#include "engine/engine_internal.h"

int ckpt__peers_init(ckpt_engine_t *e);
/* "rank R (pid P on host H)", with what /proc says when R runs on this host. */
size_t ckpt__peer_describe(const ckpt_engine_t *e, int r, char *out, size_t cap);
/* Ranks on this host whose process exited or is stopped ("" when none). */
size_t ckpt__peers_local_suspects(const ckpt_engine_t *e, char *out, size_t cap);

#endif
