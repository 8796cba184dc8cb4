/* The command stream (command.c): rank 0 broadcasts each command (ckpt__cmd_t) and every
 * rank executes it; what rank 0 sends and keeps besides the command (ckpt__cmd_io_t); the
 * registered checkpoints' versions (e->checkpoints, e->next_version), which command.c
 * fixes. */
#ifndef CKPT_ENGINE_COMMAND_H
#define CKPT_ENGINE_COMMAND_H

#include "engine/engine_internal.h"

/* Every command runs the same way on every rank: rank 0 builds it and calls
 * ckpt__cmd_lead (broadcast, then execute), a follower receives it and calls
 * ckpt__cmd_execute with an empty io. What differs on rank 0 is only in the io: the
 * payload it sends and the outputs it keeps. */
typedef struct ckpt__cmd_io {
    const char *payload;           /* rank 0: cmd->payload_len bytes to broadcast (a file
                                    * list, P2P metas); followers receive theirs */
    const char *trace_path;        /* update, P2P update: where rank 0 writes the trace */
    ckpt_update_result_t *result;  /* update, P2P update */
    ckpt_floors_t *floors;         /* floors */
    char **export_out;             /* export: rank 0 gets the metas (malloc'ed) */
    size_t *export_len;
    ckpt_publish_event_t *events;  /* publish: rank 0 gets the events and pending parts */
    size_t events_cap;
    size_t *nevents_out, *pending_out;
} ckpt__cmd_io_t;

int ckpt__cmd_recv(ckpt_engine_t *e, ckpt__cmd_t *cmd);
/* Rank 0: broadcasts cmd (a broken broadcast is fatal) and executes it. */
int ckpt__cmd_lead(ckpt_engine_t *e, ckpt__cmd_t *cmd, ckpt__cmd_io_t *io);
/* Executes a command on this rank (io NULL on followers). */
int ckpt__cmd_execute(ckpt_engine_t *e, const ckpt__cmd_t *cmd, ckpt__cmd_io_t *io);

/* Version of a registered checkpoint (fixed by rank 0, carried in the register command so
 * every rank agrees); 0 when not registered. */
uint64_t ckpt__engine_version_of(const ckpt_engine_t *e, const char *name);

#endif
