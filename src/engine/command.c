/* The command stream: rank 0 broadcasts each command; followers wait for the next one
 * without spinning (see coll.c) and execute it. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "engine/coll.h"
#include "engine/command.h"
#include "engine/floors.h"
#include "engine/p2p.h"
#include "engine/publish.h"
#include "engine/update.h"

static int cmd_send(ckpt_engine_t *e, ckpt__cmd_t *cmd)
{
    MPI_Request req;
    /* Rank 0 waits for every follower to finish the last command. That is a wait between
     * ranks, so it gets their bound (3 x timeout + 5 s) over the larger of the serve timeout
     * and the last command's: whatever a follower still waits on its worker for (at most one
     * timeout) can never look like a dead rank. */
    int worker_ms = CKPT_MAX(e->opts.timeout_ms, e->last_cmd_timeout_ms);
    e->last_cmd_timeout_ms = cmd->timeout_ms;
    MPI_Ibcast(cmd, (int)sizeof(*cmd), MPI_BYTE, 0, e->world, &req);
    return ckpt__mpi_wait(e, &req, ckpt__peer_timeout_ms(worker_ms), 1000, "command broadcast");
}

int ckpt__cmd_recv(ckpt_engine_t *e, ckpt__cmd_t *cmd)
{
    MPI_Request req;
    memset(cmd, 0, sizeof(*cmd));
    MPI_Ibcast(cmd, (int)sizeof(*cmd), MPI_BYTE, 0, e->world, &req);
    /* Waiting for the next command is the idle state: no timeout, 20 ms naps at most. */
    return ckpt__mpi_wait(e, &req, -1, 20000, "waiting for a command");
}

/* The bytes that follow a command (cmd->payload_len), broadcast from rank 0's `mine`: the
 * returned buffer holds them on every rank (rank 0: `mine` itself; followers: a new one,
 * freed with payload_free). */
static char *payload_take(ckpt_engine_t *e, const ckpt__cmd_t *cmd, const char *mine)
{
    char *payload = (char *)mine;
    if (e->rank != 0) {
        payload = ckpt__malloc(cmd->payload_len + 1);
        if (payload == NULL) ckpt__engine_fatal(e, "no memory for a command payload");
    }
    int rc = ckpt__bcast_bytes(e, payload, cmd->payload_len, 0, e->world, cmd->timeout_ms,
                               "command payload");
    if (rc < 0) ckpt__engine_fatal(e, ckpt_last_error());
    return payload;
}

static void payload_free(const char *payload, const char *mine)
{
    if (payload != mine) ckpt__free((char *)payload);
}

static int find_checkpoint(ckpt_engine_t *e, const char *name)
{
    for (size_t i = 0; i < e->ncheckpoints; i++)
        if (strcmp(e->checkpoints[i].name, name) == 0) return (int)i;
    return -1;
}

/* A list payload: its paths, pointing into it. */
static int register_list(ckpt_engine_t *e, const ckpt__cmd_t *cmd, const char *list)
{
    size_t count = 0;
    for (uint64_t i = 0; i < cmd->payload_len; i++) count += list[i] == '\0';
    const char **paths = ckpt__calloc(count ? count : 1, sizeof(*paths));
    if (!paths) return ckpt__error(CKPT_ENOMEM, "registering '%s': out of memory", cmd->name);
    size_t n = 0;
    for (uint64_t i = 0; i < cmd->payload_len && n < count; i += strlen(list + i) + 1)
        paths[n++] = list + i;
    int rc = ckpt_store_register_file_list(e->store, cmd->name, paths, n, e->rank, e->size);
    ckpt__free(paths);
    return rc;
}

/* What a rank registered, as one number: every tensor's name, dtype, shape, size, owner and
 * pool offset (the plan every rank computes for all ranks). Each rank lists and reads the
 * files itself; ranks that saw different files (a shard added or removed while they listed,
 * different file systems) would otherwise hold shares of two different checkpoints. */
static uint64_t registered_fingerprint(ckpt_engine_t *e, const char *name, size_t *count_out)
{
    const ckpt_tensor_meta_t *m = NULL;
    size_t n = 0;
    *count_out = 0;
    if (ckpt_store_tensors(e->store, name, &m, &n) != CKPT_OK) return 0;
    uint64_t fp = 0x9e3779b97f4a7c15ull ^ n;
    for (size_t i = 0; i < n; i++) {
        struct {
            int32_t dtype, ndim, owner, pad;
            int64_t shape[CKPT_MAX_DIMS];
            uint64_t nbytes, offset, name_hash;
        } rec;
        memset(&rec, 0, sizeof(rec));
        rec.dtype = m[i].dtype;
        rec.ndim = m[i].ndim;
        rec.owner = m[i].owner;
        for (int d = 0; d < m[i].ndim && d < CKPT_MAX_DIMS; d++) rec.shape[d] = m[i].shape[d];
        rec.nbytes = m[i].nbytes;
        rec.offset = m[i].offset;
        rec.name_hash = ckpt_checksum(m[i].name, strnlen(m[i].name, CKPT_NAME_MAX));
        fp = (fp ^ ckpt_checksum(&rec, sizeof(rec))) * 0x100000001b3ull;
    }
    *count_out = n;
    return fp ? fp : 1; /* 0 stands for "this rank registered nothing" */
}

/* Every rank that registered checks it holds a share of the same checkpoint as the others:
 * one allreduce of (max fp, max ~fp); a rank whose fp is not both maxima disagrees. */
static int check_same_checkpoint(ckpt_engine_t *e, const ckpt__cmd_t *cmd, int local)
{
    size_t n = 0;
    uint64_t fp = local == CKPT_OK ? registered_fingerprint(e, cmd->name, &n) : 0;
    uint64_t mine[2] = {fp, fp ? ~fp : 0}, all[2] = {0, 0};
    MPI_Request req;
    MPI_Iallreduce(mine, all, 2, MPI_UINT64_T, MPI_MAX, e->world, &req);
    int wait_ms = cmd->timeout_ms > INT32_MAX - 600000 ? INT32_MAX : cmd->timeout_ms + 600000;
    int rc = ckpt__mpi_wait(e, &req, wait_ms, 500, "registration fingerprint");
    if (rc < 0) return rc;
    if (local != CKPT_OK || (all[0] == mine[0] && all[1] == mine[1])) return local;
    return ckpt__error(CKPT_EIO, "registering '%s': rank %d read %zu tensors, another rank read a "
                       "different checkpoint from the same path (files added, removed or "
                       "replaced while the ranks listed them, or ranks that see different file "
                       "systems); register it again once the files are complete and the same "
                       "on every host", cmd->name, e->rank, n);
}

static int exec_register(ckpt_engine_t *e, const ckpt__cmd_t *cmd, const char *list)
{
    int rc;
    char reason[CKPT__REASON_MAX];
    int failed = -1;
    if (find_checkpoint(e, cmd->name) >= 0)
        return ckpt__error(CKPT_EEXIST, "checkpoint '%s' is already registered", cmd->name);
    if (e->ncheckpoints == CKPT__MAX_CHECKPOINTS)
        return ckpt__error(CKPT_EBUSY, "%d checkpoints are registered; unregister one first",
                           CKPT__MAX_CHECKPOINTS);
    int local = cmd->payload_len
                    ? register_list(e, cmd, list)
                    : ckpt_store_register_files(e->store, cmd->name, cmd->path, e->rank, e->size);
    int registered = local == CKPT_OK;
    local = check_same_checkpoint(e, cmd, local);
    if (local == CKPT_ETIMEDOUT && e->broken) {
        if (registered) ckpt_store_unregister(e->store, cmd->name);
        return local;
    }
    /* Ranks wait for each other while the slowest reads its share from disk: the bound is
     * generous (10 minutes on top of the timeout), but there is one. */
    int wait_ms = cmd->timeout_ms > INT32_MAX - 600000 ? INT32_MAX : cmd->timeout_ms + 600000;
    rc = ckpt__agree(e, local, local < 0 ? ckpt_last_error() : NULL, wait_ms, &failed, reason,
                     sizeof(reason));
    if (rc == CKPT_ETIMEDOUT && e->broken) return rc;
    if (rc < 0) {
        /* Nobody keeps a share of a checkpoint that failed on some rank. */
        if (registered) ckpt_store_unregister(e->store, cmd->name);
        return ckpt__error(rc, "registering '%s' failed on %s", cmd->name, reason);
    }
    ckpt__checkpoint_entry_t *c = &e->checkpoints[e->ncheckpoints++];
    memset(c, 0, sizeof(*c));
    ckpt__strlcpy(c->name, cmd->name, sizeof(c->name));
    c->version = cmd->version;
    c->guard_slot = -1;
    ckpt__prepare_workers(e, cmd);
    return CKPT_OK;
}

/* REGISTER. With cmd->payload_len, the files are a list broadcast after the command
 * (NUL-terminated paths back to back). */
static int cmd_register(ckpt_engine_t *e, const ckpt__cmd_t *cmd, const char *mine)
{
    /* The payload travels before any check, so every rank takes part in its broadcast. */
    const char *list = cmd->payload_len ? payload_take(e, cmd, mine) : NULL;
    int rc = exec_register(e, cmd, list);
    payload_free(list, mine);
    return rc;
}

/* EXPORT: every rank's part of the metas goes to rank 0, which hands them out malloc'ed. */
static int cmd_export(ckpt_engine_t *e, const ckpt__cmd_t *cmd, ckpt__cmd_io_t *io)
{
    char *bytes = NULL;
    size_t len = 0;
    int rc = ckpt__p2p_export(e, cmd, &bytes, &len);
    if (rc == CKPT_OK && io->export_out) {
        *io->export_out = malloc(len + 1);
        if (*io->export_out == NULL) {
            rc = ckpt__error(CKPT_ENOMEM, "metas of '%s'", cmd->name);
        } else {
            memcpy(*io->export_out, bytes, len);
            (*io->export_out)[len] = '\0';
            *io->export_len = len;
        }
    }
    ckpt__free(bytes);
    return rc;
}

static int exec_unregister(ckpt_engine_t *e, const ckpt__cmd_t *cmd)
{
    int idx = find_checkpoint(e, cmd->name);
    if (idx < 0) return ckpt__error(CKPT_ENOENT, "checkpoint '%s' is not registered", cmd->name);
    ckpt__p2p_unexport(e, &e->checkpoints[idx]); /* joiners refuse it from now on */
    ckpt_store_unregister(e->store, cmd->name);
    e->checkpoints[idx] = e->checkpoints[--e->ncheckpoints];
    return CKPT_OK;
}

int ckpt__cmd_execute(ckpt_engine_t *e, const ckpt__cmd_t *cmd, ckpt__cmd_io_t *io)
{
    ckpt__cmd_io_t none;
    memset(&none, 0, sizeof(none));
    if (io == NULL) io = &none;
    ckpt_update_result_t result;
    ckpt_update_result_t *res = io->result ? io->result : &result;
    switch (cmd->op) {
    case CKPT__CMD_REGISTER: return cmd_register(e, cmd, io->payload);
    case CKPT__CMD_UNREGISTER: return exec_unregister(e, cmd);
    case CKPT__CMD_UPDATE:
        if (find_checkpoint(e, cmd->name) < 0)
            return ckpt__error(CKPT_ENOENT, "checkpoint '%s' is not registered", cmd->name);
        return ckpt__update_run(e, cmd, io->trace_path, res);
    case CKPT__CMD_FLOORS: {
        ckpt_floors_t floors;
        return ckpt__floors_run(e, io->floors ? io->floors : &floors);
    }
    case CKPT__CMD_SHUTDOWN: return CKPT_OK;
    case CKPT__CMD_EXPORT: return cmd_export(e, cmd, io);
    case CKPT__CMD_P2P_UPDATE: {
        const char *metas = payload_take(e, cmd, io->payload);
        int rc = ckpt__update_run_p2p(e, cmd, metas, cmd->payload_len, io->trace_path, res);
        payload_free(metas, io->payload);
        return rc;
    }
    case CKPT__CMD_PUBLISH:
        return ckpt__publish_run(e, cmd, io->events, io->events_cap, io->nevents_out,
                                 io->pending_out);
    default: return ckpt__error(CKPT_EPROTO, "unknown command %d from rank 0", cmd->op);
    }
}

int ckpt__cmd_lead(ckpt_engine_t *e, ckpt__cmd_t *cmd, ckpt__cmd_io_t *io)
{
    cmd->timeout_ms = cmd->timeout_ms > 0 ? cmd->timeout_ms : e->opts.timeout_ms;
    if (cmd_send(e, cmd) < 0) ckpt__engine_fatal(e, ckpt_last_error());
    return ckpt__cmd_execute(e, cmd, io);
}

uint64_t ckpt__engine_version_of(const ckpt_engine_t *e, const char *name)
{
    for (size_t i = 0; i < e->ncheckpoints; i++)
        if (strcmp(e->checkpoints[i].name, name) == 0) return e->checkpoints[i].version;
    return 0;
}
