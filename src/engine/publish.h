/* Publishing (publish.c): this rank's publish socket (e->pub), where trainers hand sealed
 * memfds, and the command that registers what they published (CKPT__CMD_PUBLISH). Not
 * include/ckpt/publish.h, the trainers' API. */
#ifndef CKPT_ENGINE_PUBLISH_H
#define CKPT_ENGINE_PUBLISH_H

#include "engine/engine_internal.h"

/* Opens DIR/publish-<rank>.sock (called by create when there is a socket dir). */
int ckpt__publish_open(ckpt_engine_t *e);
void ckpt__publish_close(ckpt_engine_t *e);
/* Collective (CKPT__CMD_PUBLISH): registers every checkpoint whose published parts are all
 * in, refuses or expires the others. Rank 0 gets the events and the parts still pending. */
int ckpt__publish_run(ckpt_engine_t *e, const ckpt__cmd_t *cmd, ckpt_publish_event_t *events,
                      size_t cap, size_t *nevents_out, size_t *pending_out);

#endif
