/* Engine lifecycle and the leader's command entry points (see include/ckpt/engine.h). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>

#include "engine/buffers.h"
#include "engine/command.h"
#include "engine/p2p.h"
#include "engine/peers.h"
#include "engine/publish.h"
#include "engine/sink.h"
#include "plan/bucket.h"

static int make_groups(ckpt_engine_t *e)
{
    if (e->opts.share_mode == CKPT_SHARE_NODE)
        MPI_Comm_split_type(e->world, MPI_COMM_TYPE_SHARED, e->rank, MPI_INFO_NULL, &e->group);
    else
        MPI_Comm_split(e->world, e->rank, 0, &e->group);
    MPI_Comm_rank(e->group, &e->group_rank);
    MPI_Comm_size(e->group, &e->group_size);
    int leader = e->group_rank == 0;
    MPI_Comm_split(e->world, leader ? 0 : MPI_UNDEFINED, e->rank, &e->leaders);
    /* Every rank learns the leaders-communicator index of every rank's group. */
    int my_group = -1;
    if (leader) MPI_Comm_rank(e->leaders, &my_group);
    MPI_Bcast(&my_group, 1, MPI_INT, 0, e->group);
    e->group_of_rank = ckpt__calloc((size_t)e->size, sizeof(int));
    if (!e->group_of_rank) return ckpt__error(CKPT_ENOMEM, "engine groups");
    MPI_Allgather(&my_group, 1, MPI_INT, e->group_of_rank, 1, MPI_INT, e->world);
    int ngroups = 0;
    for (int r = 0; r < e->size; r++) ngroups = CKPT_MAX(ngroups, e->group_of_rank[r] + 1);
    e->ngroups = ngroups;
    return CKPT_OK;
}

int ckpt_engine_create(const ckpt_engine_options_t *opts, ckpt_engine_t **engine_out)
{
    ckpt_engine_options_t defaults = CKPT_ENGINE_OPTIONS_INIT;
    int initialized = 0, rc = CKPT_OK;
    MPI_Initialized(&initialized);
    if (!initialized) return ckpt__error(CKPT_ESTATE, "MPI_Init must be called first");
    if (opts && ckpt__check_field_mask(opts->field_mask, 0, "ckpt_engine_options_t") < 0)
        return CKPT_EINVAL;
    ckpt_engine_t *e = ckpt__calloc(1, sizeof(*e));
    if (!e) return ckpt__error(CKPT_ENOMEM, "engine");
    e->opts = opts ? *opts : defaults;
    if (e->opts.bucket_max == 0) e->opts.bucket_max = defaults.bucket_max;
    if (e->opts.timeout_ms <= 0) e->opts.timeout_ms = defaults.timeout_ms;
    for (int i = 0; i < CKPT__HOST_BUFFERS_MAX; i++) e->buffers.fds[i] = -1;
    e->leaders = MPI_COMM_NULL;
    e->agree_comm = MPI_COMM_NULL;
    e->group = MPI_COMM_NULL;
    MPI_Comm_dup(MPI_COMM_WORLD, &e->world);
    MPI_Comm_rank(e->world, &e->rank);
    MPI_Comm_size(e->world, &e->size);
    ckpt_log_set_rank(e->rank);
    /* Versions stay unique across engine restarts: they start from the wall clock. */
    e->next_version = (uint64_t)time(NULL) << 16;
    e->next_update_id = 1;

    rc = make_groups(e);
    MPI_Comm_dup(e->world, &e->agree_comm);
    if (rc == CKPT_OK) rc = ckpt__peers_init(e);
    ckpt_store_options_t sopts = CKPT_STORE_OPTIONS_INIT;
    if (rc == CKPT_OK) rc = ckpt__p2p_init(e);
    sopts.field_mask |= CKPT_STORE_OPT_POOL_ALLOCATOR;
    sopts.pool_allocator = ckpt__p2p_pool_allocator(e);
    if (rc == CKPT_OK) rc = ckpt_store_create(&sopts, &e->store);
    if (rc == CKPT_OK && e->opts.socket_dir) {
        char path[CKPT__PATH_MAX + 32];
        ckpt__strlcpy(e->socket_dir, e->opts.socket_dir, sizeof(e->socket_dir));
        e->opts.socket_dir = e->socket_dir;
        mkdir(e->socket_dir, 0700);
        snprintf(path, sizeof(path), "%s/rank-%d.sock", e->socket_dir, e->rank);
        rc = ckpt_ipc_server_open(path, &e->ipc);
        if (rc == CKPT_OK) rc = ckpt__publish_open(e);
    }
    if (rc == CKPT_OK) rc = ckpt__sink_open(e, e->opts.device, e->opts.timeout_ms);
    /* IPC buffers are made once, at start, sized by the bucket maximum and free memory, so
     * that updates do not pay for allocating and faulting them in. An update whose largest
     * tensor needs bigger buckets re-makes them. On a device they are made by the first
     * update that needs them (P2P pulls land in them before going to the device). */
    if (rc == CKPT_OK && !e->sink) {
        uint64_t budget = 0, size = 0;
        int nbuffers = 0;
        rc = ckpt__buffer_budget(e, e->opts.timeout_ms, &budget);
        if (rc == CKPT_OK)
            rc = ckpt__plan_bucket_size(CKPT_ALIGN, e->opts.bucket_max, budget, &size, &nbuffers);
        if (rc == CKPT_OK) rc = ckpt__buffers_ensure(e, size, nbuffers, e->opts.timeout_ms);
    }
    /* Creation is collective: fail everywhere if it failed anywhere. */
    int ok = rc == CKPT_OK, all_ok = 0;
    MPI_Allreduce(&ok, &all_ok, 1, MPI_INT, MPI_MIN, e->world);
    if (!all_ok) {
        if (rc == CKPT_OK) rc = ckpt__error(CKPT_EPEER, "engine creation failed on another rank");
        ckpt_engine_destroy(e);
        return rc;
    }
    ckpt_info("engine rank %d/%d up: %d group(s), group of %d, worker socket %s", e->rank,
              e->size, e->ngroups, e->group_size, e->ipc ? e->socket_dir : "(none)");
    *engine_out = e;
    return CKPT_OK;
}

void ckpt_engine_destroy(ckpt_engine_t *e)
{
    if (!e) return;
    ckpt__p2p_unexport_all(e);
    ckpt__buffers_release(e);
    ckpt__sink_close(e);
    if (e->ipc) ckpt_ipc_server_close(e->ipc);
    ckpt__publish_close(e); /* answers trainers still waiting */
    if (e->store) ckpt_store_destroy(e->store); /* frees the pools UCX allocated */
    ckpt__p2p_shutdown(e);
    ckpt__free(e->serving);
    if (e->leaders != MPI_COMM_NULL) MPI_Comm_free(&e->leaders);
    if (e->group != MPI_COMM_NULL) MPI_Comm_free(&e->group);
    if (e->agree_comm != MPI_COMM_NULL) MPI_Comm_free(&e->agree_comm);
    MPI_Comm_free(&e->world);
    ckpt__free(e->group_of_rank);
    ckpt__free(e->peers);
    ckpt__free(e);
}

int ckpt_engine_rank(const ckpt_engine_t *e) { return e->rank; }
int ckpt_engine_size(const ckpt_engine_t *e) { return e->size; }
const char *ckpt_engine_device(const ckpt_engine_t *e) { return e->device_text; }

int ckpt_engine_follow(ckpt_engine_t *e)
{
    for (;;) {
        ckpt__cmd_t cmd;
        int rc = ckpt__cmd_recv(e, &cmd);
        if (rc < 0) return rc;
        if (cmd.op == CKPT__CMD_SHUTDOWN) return CKPT_OK;
        rc = ckpt__cmd_execute(e, &cmd, NULL);
        if (rc < 0) ckpt_debug("command %d on '%s' failed here: %s", cmd.op, cmd.name,
                               ckpt_last_error());
    }
}

static int leader_only(const ckpt_engine_t *e, const char *what)
{
    if (e->rank != 0)
        return ckpt__error(CKPT_ESTATE, "%s is a leader command: call it on rank 0 (rank %d "
                           "follows with ckpt_engine_follow)", what, e->rank);
    return CKPT_OK;
}

static int set_name(ckpt__cmd_t *cmd, const char *name)
{
    if (!name || !*name) return ckpt__error(CKPT_EINVAL, "checkpoint name is empty");
    if (ckpt__strlcpy(cmd->name, name, sizeof(cmd->name)) < 0)
        return ckpt__error(CKPT_ETOOBIG, "checkpoint name longer than %d bytes",
                           CKPT_NAME_MAX - 1);
    return CKPT_OK;
}

int ckpt_engine_register(ckpt_engine_t *e, const char *name, const char *path)
{
    ckpt__cmd_t cmd;
    memset(&cmd, 0, sizeof(cmd));
    int rc = leader_only(e, "register");
    if (rc == CKPT_OK) rc = set_name(&cmd, name);
    if (rc < 0) return rc;
    if (!path || ckpt__strlcpy(cmd.path, path, sizeof(cmd.path)) < 0)
        return ckpt__error(CKPT_EINVAL, "checkpoint path is empty or too long");
    if (ckpt__engine_version_of(e, name) != 0)
        return ckpt__error(CKPT_EEXIST, "checkpoint '%s' is already registered; unregister it "
                           "first", name);
    cmd.op = CKPT__CMD_REGISTER;
    cmd.version = e->next_version++;
    cmd.direct = e->opts.direct != 0;
    return ckpt__cmd_lead(e, &cmd, NULL);
}

int ckpt_engine_register_list(ckpt_engine_t *e, const char *name, const char *const *paths,
                              size_t count)
{
    ckpt__cmd_t cmd;
    memset(&cmd, 0, sizeof(cmd));
    int rc = leader_only(e, "register");
    if (rc == CKPT_OK) rc = set_name(&cmd, name);
    if (rc < 0) return rc;
    if (!paths || count == 0) return ckpt__error(CKPT_EINVAL, "register: an empty list of files");
    if (ckpt__engine_version_of(e, name) != 0)
        return ckpt__error(CKPT_EEXIST, "checkpoint '%s' is already registered; unregister it "
                           "first", name);
    size_t len = 0;
    for (size_t i = 0; i < count; i++) {
        if (!paths[i] || !paths[i][0])
            return ckpt__error(CKPT_EINVAL, "register '%s': file %zu of the list is empty", name, i);
        len += strlen(paths[i]) + 1;
    }
    char *list = ckpt__malloc(len);
    if (!list) return ckpt__error(CKPT_ENOMEM, "register '%s': out of memory", name);
    for (size_t i = 0, at = 0; i < count; i++) {
        size_t n = strlen(paths[i]) + 1;
        memcpy(list + at, paths[i], n);
        at += n;
    }
    cmd.op = CKPT__CMD_REGISTER;
    cmd.version = e->next_version++;
    cmd.direct = e->opts.direct != 0;
    cmd.payload_len = len;
    ckpt__cmd_io_t io = {.payload = list};
    rc = ckpt__cmd_lead(e, &cmd, &io);
    ckpt__free(list);
    return rc;
}

int ckpt_engine_unregister(ckpt_engine_t *e, const char *name)
{
    ckpt__cmd_t cmd;
    memset(&cmd, 0, sizeof(cmd));
    int rc = leader_only(e, "unregister");
    if (rc == CKPT_OK) rc = set_name(&cmd, name);
    if (rc < 0) return rc;
    if (ckpt__engine_version_of(e, name) == 0)
        return ckpt__error(CKPT_ENOENT, "checkpoint '%s' is not registered", name);
    cmd.op = CKPT__CMD_UNREGISTER;
    return ckpt__cmd_lead(e, &cmd, NULL);
}

int ckpt_engine_update(ckpt_engine_t *e, const char *name, const ckpt_update_options_t *opts,
                       ckpt_update_result_t *result)
{
    ckpt_update_options_t defaults = CKPT_UPDATE_OPTIONS_INIT;
    ckpt__cmd_t cmd;
    memset(&cmd, 0, sizeof(cmd));
    if (!opts) opts = &defaults;
    if (ckpt__check_field_mask(opts->field_mask, 0, "ckpt_update_options_t") < 0)
        return CKPT_EINVAL;
    int rc = leader_only(e, "update");
    if (rc == CKPT_OK) rc = set_name(&cmd, name);
    if (rc < 0) return rc;
    uint64_t version = ckpt__engine_version_of(e, name);
    if (version == 0)
        return ckpt__error(CKPT_ENOENT, "checkpoint '%s' is not registered", name);
    cmd.op = CKPT__CMD_UPDATE;
    cmd.version = version;
    cmd.update_id = e->next_update_id++;
    cmd.bucket_max = opts->bucket_max ? opts->bucket_max : e->opts.bucket_max;
    cmd.timeout_ms = opts->timeout_ms > 0 ? opts->timeout_ms : e->opts.timeout_ms;
    cmd.verify = opts->verify >= 0 ? opts->verify : e->opts.verify;
    cmd.partial = opts->partial != 0;
    cmd.isolate = opts->isolate != 0;
    cmd.ignore_unneeded = opts->ignore_unneeded != 0;
    cmd.direct = opts->direct >= 0 ? opts->direct : e->opts.direct != 0;
    ckpt__cmd_io_t io = {.trace_path = opts->trace_path, .result = result};
    rc = ckpt__cmd_lead(e, &cmd, &io);
    if (rc < 0 && result && result->reason[0])
        ckpt__error(rc, "update of '%s' failed: %s", name, result->reason);
    return rc;
}

int ckpt_engine_floors(ckpt_engine_t *e, ckpt_floors_t *floors)
{
    ckpt__cmd_t cmd;
    memset(&cmd, 0, sizeof(cmd));
    int rc = leader_only(e, "floors");
    if (rc < 0) return rc;
    cmd.op = CKPT__CMD_FLOORS;
    ckpt__cmd_io_t io = {.floors = floors};
    return ckpt__cmd_lead(e, &cmd, &io);
}

int ckpt_engine_export_metas(ckpt_engine_t *e, const char *name, char **metas_out,
                             size_t *len_out)
{
    ckpt__cmd_t cmd;
    memset(&cmd, 0, sizeof(cmd));
    int rc = leader_only(e, "export");
    if (rc == CKPT_OK) rc = set_name(&cmd, name);
    if (rc < 0) return rc;
    if (ckpt__engine_version_of(e, name) == 0)
        return ckpt__error(CKPT_ENOENT, "checkpoint '%s' is not registered", name);
    cmd.op = CKPT__CMD_EXPORT;
    /* Handed out with malloc so the caller frees it with free(). */
    ckpt__cmd_io_t io = {.export_out = metas_out, .export_len = len_out};
    return ckpt__cmd_lead(e, &cmd, &io);
}

int ckpt_engine_p2p_update(ckpt_engine_t *e, const void *metas, size_t len,
                           const ckpt_update_options_t *opts, ckpt_update_result_t *result)
{
    ckpt_update_options_t defaults = CKPT_UPDATE_OPTIONS_INIT;
    ckpt__cmd_t cmd;
    memset(&cmd, 0, sizeof(cmd));
    if (!opts) opts = &defaults;
    if (ckpt__check_field_mask(opts->field_mask, 0, "ckpt_update_options_t") < 0)
        return CKPT_EINVAL;
    int rc = leader_only(e, "p2p update");
    if (rc < 0) return rc;
    if (metas == NULL || len == 0) return ckpt__error(CKPT_EINVAL, "p2p update: no metas");
    cmd.op = CKPT__CMD_P2P_UPDATE;
    cmd.update_id = e->next_update_id++;
    cmd.bucket_max = opts->bucket_max ? opts->bucket_max : e->opts.bucket_max;
    cmd.timeout_ms = opts->timeout_ms > 0 ? opts->timeout_ms : e->opts.timeout_ms;
    cmd.verify = opts->verify >= 0 ? opts->verify : e->opts.verify;
    cmd.partial = opts->partial != 0;
    cmd.isolate = opts->isolate != 0;
    cmd.ignore_unneeded = opts->ignore_unneeded != 0;
    cmd.payload_len = len;
    ckpt__cmd_io_t io = {.payload = metas, .trace_path = opts->trace_path, .result = result};
    rc = ckpt__cmd_lead(e, &cmd, &io);
    if (rc < 0 && result && result->reason[0])
        ckpt__error(rc, "p2p update failed: %s", result->reason);
    return rc;
}

int ckpt_engine_shutdown(ckpt_engine_t *e)
{
    ckpt__cmd_t cmd;
    memset(&cmd, 0, sizeof(cmd));
    int rc = leader_only(e, "shutdown");
    if (rc < 0) return rc;
    cmd.op = CKPT__CMD_SHUTDOWN;
    return ckpt__cmd_lead(e, &cmd, NULL);
}

size_t ckpt_engine_checkpoint_count(const ckpt_engine_t *e) { return e->ncheckpoints; }

int ckpt_engine_checkpoint_info(const ckpt_engine_t *e, size_t index, const char **name_out,
                                uint64_t *version_out)
{
    if (index >= e->ncheckpoints)
        return ckpt__error(CKPT_EINVAL, "checkpoint index %zu out of range", index);
    if (name_out) *name_out = e->checkpoints[index].name;
    if (version_out) *version_out = e->checkpoints[index].version;
    return CKPT_OK;
}

int ckpt_engine_progress(const ckpt_engine_t *e, ckpt_update_progress_t *out)
{
    /* The fields are read one by one: a reader may see bucket k of N with the bytes of
     * bucket k+1, which is fine for a progress display. */
    ckpt_engine_t *m = (ckpt_engine_t *)e;
    memset(out, 0, sizeof(*out));
    out->update_id = atomic_load(&m->progress.update_id);
    out->running = atomic_load(&m->progress.running);
    out->buckets_done = atomic_load(&m->progress.buckets_done);
    out->nbuckets = atomic_load(&m->progress.nbuckets);
    out->bytes_done = atomic_load(&m->progress.bytes_done);
    out->bytes_total = atomic_load(&m->progress.bytes_total);
    uint64_t start = atomic_load(&m->progress.start_ns);
    uint64_t end = out->running ? ckpt__now_ns() : atomic_load(&m->progress.end_ns);
    out->elapsed_s = start && end > start ? (double)(end - start) * 1e-9 : 0;
    return CKPT_OK;
}

int ckpt_engine_checkpoint_stats(const ckpt_engine_t *e, const char *name, uint64_t *bytes_out,
                                 size_t *tensors_out)
{
    if (!e || !name) return ckpt__error(CKPT_EINVAL, "ckpt_engine_checkpoint_stats: NULL argument");
    size_t n = ckpt_store_count(e->store);
    for (size_t i = 0; i < n; i++) {
        const char *nm;
        uint64_t total;
        size_t tensors;
        if (ckpt_store_info(e->store, i, &nm, NULL, &total, &tensors) == CKPT_OK &&
            strcmp(nm, name) == 0) {
            if (bytes_out) *bytes_out = total;
            if (tensors_out) *tensors_out = tensors;
            return CKPT_OK;
        }
    }
    return ckpt__error(CKPT_ENOENT, "checkpoint '%s' is not registered", name);
}
