/* ckpt-engine serve: one engine rank. All ranks of a deployment form one MPI job; rank 0
 * reads commands (a file or stdin, one per line) and/or serves the HTTP API
 * (serve_http.c) and leads, the others follow. */
#include <errno.h>
#include <getopt.h>
#include <mpi.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cjson/cJSON.h>

#include "ckpt/ckpt.h"
#include "ckpt/engine.h"
#include "commands.h"
#include "serve.h"
#include "server/result_json.h"

static void serve_usage(FILE *out)
{
    fprintf(out,
        "usage: mpirun -np N ckpt-engine serve [options]\n\n"
        "Runs one engine rank per process. Rank 0 reads commands, one per line, and/or serves\n"
        "the HTTP API (--http); every rank executes them together. Each rank serves the\n"
        "inference worker that connects to DIR/rank-<r>.sock (ckpt-worker, or a vLLM/SGLang\n"
        "worker via the receiver API). Trainers on the host publish checkpoints from memory\n"
        "to DIR/publish-<r>.sock (ckpt_engine.publish in Python, include/ckpt/publish.h in C;\n"
        "docs/PUBLISH.md): sealed memfds adopted in place, registered once every part is in\n"
        "(with --http while idle; otherwise by await-published). Publishing a registered name\n"
        "again replaces its version once no update runs.\n\n"
        "options:\n"
        "  --socket-dir DIR     worker sockets DIR/rank-<r>.sock and publish sockets\n"
        "                       DIR/publish-<r>.sock (default: no worker, no publishing)\n"
        "  --commands FILE      read commands from FILE on rank 0 ('-' = stdin, the default\n"
        "                       without --http); with --http the file runs first, then HTTP\n"
        "  --http [ADDR:]PORT   rank 0 serves the HTTP control API (docs/HTTP.md) until\n"
        "                       SIGINT/SIGTERM; ADDR defaults to 127.0.0.1 (use 0.0.0.0 or\n"
        "                       [::] to listen on every interface), PORT 0 picks a free port;\n"
        "                       prints 'http: listening on http://ADDR:PORT'\n"
        "  --token-file FILE    with --http: every request but /v1/healthz must carry\n"
        "                       'Authorization: Bearer <token>' (the file's text, trimmed);\n"
        "                       required when ADDR is not loopback (127.0.0.0/8, ::1,\n"
        "                       localhost): serve refuses (exit 2) to expose the API bare\n"
        "  --insecure-no-token  listen beyond loopback without a token anyway (a warning)\n"
        "  --http-request-timeout S\n"
        "                       a client must send a whole request within S seconds of\n"
        "                       connecting or of its previous answer, however it trickles;\n"
        "                       past it: 408 and the connection is closed (default 10)\n"
        "  --http-per-ip N      open connections per client address (default 32; beyond:\n"
        "                       refused at once; 512 in all)\n"
        "  --bucket-max SIZE    largest bucket, e.g. 256MiB (default 256MiB; never below the\n"
        "                       largest tensor; lowered to fit free memory)\n"
        "  --memory-limit SIZE  memory the IPC buffers may use (default: half of free memory;\n"
        "                       on a GPU, half of its free memory)\n"
        "  --device auto|cpu|cuda|sim\n"
        "                       where buckets go: auto (default) takes each rank's GPU (its\n"
        "                       local rank's, one rank per GPU) when every rank sees one and\n"
        "                       the CUDA runtime and NCCL load ($CKPT_CUDART, $CKPT_NCCL name\n"
        "                       them), else host memory; cuda insists (fails naming why);\n"
        "                       cpu: host memory; sim: the GPU path in host memory (tests)\n"
        "  --timeout-ms N       bound of every wait during a command (default 30000)\n"
        "  --verify             workers verify every tensor's XXH3-64 checksum\n"
        "  --share node|rank    node: ranks of a host share one pair of IPC buffers and only\n"
        "                       host leaders broadcast (default); rank: one pair per rank\n"
        "  --direct auto|off    auto: when all ranks share one host, workers read tensors\n"
        "                       straight out of the owners' pools (no staging copy, the\n"
        "                       default); off: always stage through the IPC buffers\n"
        "  --ucx-pools auto|off auto: pools come from UCX's POSIX shared memory where UCX\n"
        "                       has it, so P2P joiners on this host copy straight out of\n"
        "                       them (the default); off: plain memfds (gets are emulated)\n"
        "  --json               print results as JSON lines instead of tables\n"
        "  -h, --help           this text\n\n"
        "commands (rank 0's input; '#' starts a comment):\n"
        "  register NAME PATH   each rank loads its share of PATH (file, directory or index)\n"
        "  update NAME [bucket=SIZE] [timeout=MS] [verify=0|1] [direct=0|1] [trace=FILE]\n"
        "              [partial=1] [isolate=1] [unneeded=ignore]\n"
        "                       broadcast update of every worker; trace= writes the timeline\n"
        "                       as Chrome trace JSON (open it in ui.perfetto.dev); partial:\n"
        "                       the checkpoint is a subset of the workers' models on purpose;\n"
        "                       isolate: a worker that fails, stalls or dies is cut out and\n"
        "                       listed under \"isolated\", the others complete (default: one\n"
        "                       fails, all abort); unneeded=ignore: when every worker declared\n"
        "                       its need, tensors none needs are left out (default: an error)\n"
        "  unregister NAME      frees the checkpoint on every rank\n"
        "  export NAME FILE     P2P: registers NAME's pools with UCX and writes the metas a\n"
        "                       joining deployment needs to FILE (docs/METAS.md)\n"
        "  p2p-update FILE [bucket=SIZE] [timeout=MS] [verify=0|1] [trace=FILE]\n"
        "              [partial=1] [isolate=1]\n"
        "                       P2P: pulls the checkpoint FILE describes from the serving\n"
        "                       ranks (one-sided UCX gets) and updates this deployment\n"
        "  floors               measures memcpy and MPI_Bcast bandwidth for comparison\n"
        "  await-published NAME [timeout=MS]\n"
        "                       waits until every part trainers publish under NAME is in and\n"
        "                       registers it (default timeout: --timeout-ms); parts still\n"
        "                       missing then are named and the others dropped\n"
        "  list                 registered checkpoints\n"
        "  quit                 stops every rank (also with --http)\n\n"
        "SIGINT or SIGTERM (to mpirun or rank 0) stops every rank cleanly.\n"
        "exit status: 0 when every command succeeded, 1 when one failed (or the HTTP server\n"
        "could not start; HTTP jobs report to their clients, not here), 2 on usage errors,\n"
        "3 when the deployment broke (a rank died): restart the whole MPI job.\n");
}

volatile sig_atomic_t serve_stop;

static void on_stop_signal(int sig)
{
    serve_stop = sig;
}

static double gbps(uint64_t bytes, double s) { return s > 0 ? (double)bytes / s / 1e9 : 0; }

/* Prints one JSON line (cJSON escapes names and reasons) and frees it. */
static void print_json_line(cJSON *o)
{
    char *text = cJSON_PrintUnformatted(o);
    if (text) printf("%s\n", text);
    cJSON_free(text);
    cJSON_Delete(o);
}

void serve_print_update(const serve_state_t *st, const ckpt_update_result_t *r)
{
    char bsize[32], total[32];
    double per_worker = gbps(r->bytes, r->total_s);
    if (st->json) {
        cJSON *o = cJSON_CreateObject();
        cJSON_AddStringToObject(o, "command", "update");
        cJSON_AddStringToObject(o, "name", r->name);
        cJSON_AddBoolToObject(o, "ok", r->status == 0);
        cJSON_AddStringToObject(o, "status", ckpt_status_name(r->status));
        cJSON_AddNumberToObject(o, "failed_rank", r->failed_rank);
        cJSON_AddStringToObject(o, "reason", r->reason);
        cJSON_AddNumberToObject(o, "update_id", (double)r->update_id);
        ckpt__update_result_json(o, r);
        cJSON_AddNumberToObject(o, "per_worker_gbps", per_worker);
        cJSON_AddNumberToObject(o, "memcpy_gbps", st->floors.memcpy_gbps);
        cJSON_AddNumberToObject(o, "memcpy_concurrent_gbps", st->floors.memcpy_concurrent_gbps);
        cJSON_AddNumberToObject(o, "stream_gbps", st->floors.stream_gbps);
        cJSON_AddNumberToObject(o, "stream_concurrent_gbps", st->floors.stream_concurrent_gbps);
        cJSON_AddNumberToObject(o, "bcast_gbps", st->floors.bcast_gbps);
        print_json_line(o);
        return;
    }
    for (uint32_t i = 0; i < r->nisolated && i < CKPT_ISOLATED_MAX; i++)
        printf("update '%s' #%llu: isolated rank %d's worker (pid %d): %s\n", r->name,
               (unsigned long long)r->update_id, r->isolated[i].rank, r->isolated[i].worker_pid,
               r->isolated[i].reason);
    if (r->nisolated > CKPT_ISOLATED_MAX)
        printf("update '%s' #%llu: ... %u workers isolated in all\n", r->name,
               (unsigned long long)r->update_id, r->nisolated);
    if (r->status != 0) {
        printf("update '%s' #%llu FAILED after %.3f s: %s\n", r->name,
               (unsigned long long)r->update_id, r->total_s, r->reason);
        return;
    }
    printf("update '%s' #%llu (version %llu): ok%s\n", r->name, (unsigned long long)r->update_id,
           (unsigned long long)r->version,
           r->nisolated ? " for every worker but the isolated ones" : "");
    printf("  %-28s %d\n", "ranks (workers)", r->nranks);
    printf("  %-28s %s in %u tensors\n", "checkpoint",
           ckpt_format_size(r->bytes, total, sizeof(total)), r->ntensors);
    if (r->direct)
        printf("  %-28s %u x <= %s, read in place from the owners' pools\n", "buckets",
               r->nbuckets, ckpt_format_size(r->bucket_size, bsize, sizeof(bsize)));
    else
        printf("  %-28s %u x <= %s, %d %sbuffer%s\n", "buckets", r->nbuckets,
               ckpt_format_size(r->bucket_size, bsize, sizeof(bsize)), r->nbuffers,
               r->device == 1 ? "GPU " : r->device == 2 ? "simulated device " : "",
               r->nbuffers == 1 ? " (memory short: no overlap)" : "s (pipelined)");
    printf("  %-28s %8.3f s\n", "gather metas", r->gather_s);
    printf("  %-28s %8.3f s\n", "plan + buffers", r->plan_s);
    printf("  %-28s %8.3f s\n", "workers ready", r->begin_s);
    printf("  %-28s %8.3f s\n", "pipeline", r->pipeline_s);
    printf("  %-28s %8.3f s\n", "finish (post-hooks)", r->finish_s);
    printf("  %-28s %8.3f s\n", "update time", r->total_s);
    printf("  %-28s %8.2f GB/s\n", "delivered per worker", per_worker);
    if (r->device == 1 && r->stage_s > 0)
        printf("  %-28s %8.2f GB/s   (%.3f s of GPU time for %llu bytes)\n", "H2D staging",
               gbps(r->stage_bytes, r->stage_s), r->stage_s, (unsigned long long)r->stage_bytes);
    if (r->p2p)
        printf("  %-28s %8.2f GB/s   (%.3f s pulling %llu bytes)\n", "P2P pull phase",
               gbps(r->pull_bytes, r->pull_s), r->pull_s, (unsigned long long)r->pull_bytes);
    if (st->have_floors) {
        printf("  %-28s %8.2f GB/s   ratio %.2f\n", "memcpy, 1 core (floor)",
               st->floors.memcpy_gbps, per_worker / st->floors.memcpy_gbps);
        if (st->floors.stream_gbps > 0)
            printf("  %-28s %8.2f GB/s   ratio %.2f\n", "streaming copy, 1 core",
                   st->floors.stream_gbps, per_worker / st->floors.stream_gbps);
        if (r->nranks > 1 && st->floors.memcpy_concurrent_gbps > 0)
            printf("  %-28s %8.2f GB/s   ratio %.2f\n", "memcpy from shm, all at once",
                   st->floors.memcpy_concurrent_gbps,
                   per_worker / st->floors.memcpy_concurrent_gbps);
        if (r->nranks > 1 && st->floors.stream_concurrent_gbps > 0)
            printf("  %-28s %8.2f GB/s   ratio %.2f\n", "stream from shm, all at once",
                   st->floors.stream_concurrent_gbps,
                   per_worker / st->floors.stream_concurrent_gbps);
        if (st->floors.bcast_gbps > 0)
            printf("  %-28s %8.2f GB/s   ratio %.2f\n", "MPI_Bcast (floor)",
                   st->floors.bcast_gbps, per_worker / st->floors.bcast_gbps);
        else
            printf("  %-28s      n/a (one rank)\n", "MPI_Bcast (floor)");
    }
}

void serve_print_simple(const serve_state_t *st, const char *cmd, const char *name, int rc,
                        const char *reason, double seconds)
{
    if (rc != 0 && !reason) reason = ckpt_last_error();
    if (st->json) {
        cJSON *o = cJSON_CreateObject();
        cJSON_AddStringToObject(o, "command", cmd);
        cJSON_AddStringToObject(o, "name", name);
        cJSON_AddBoolToObject(o, "ok", rc == 0);
        cJSON_AddStringToObject(o, "status", ckpt_status_name(rc));
        cJSON_AddStringToObject(o, "reason", rc == 0 ? "" : reason);
        cJSON_AddNumberToObject(o, "seconds", seconds);
        print_json_line(o);
    } else if (rc == 0) {
        printf("%s '%s': ok (%.3f s)\n", cmd, name, seconds);
    } else {
        printf("%s '%s' FAILED: %s\n", cmd, name, reason);
    }
}

uint64_t serve_version_of(ckpt_engine_t *engine, const char *name)
{
    for (size_t i = 0; i < ckpt_engine_checkpoint_count(engine); i++) {
        const char *n;
        uint64_t v;
        if (ckpt_engine_checkpoint_info(engine, i, &n, &v) == 0 && strcmp(n, name) == 0)
            return v;
    }
    return 0;
}

void serve_publish(serve_state_t *st, ckpt_engine_t *engine, const char *name)
{
    if (!st->srv) return;
    ckpt_http_checkpoint_t c;
    memset(&c, 0, sizeof c);
    snprintf(c.name, sizeof c.name, "%s", name);
    size_t tensors = 0;
    if (ckpt_engine_checkpoint_stats(engine, name, &c.bytes, &tensors) == 0)
        c.ntensors = (uint32_t)tensors;
    c.version = serve_version_of(engine, name);
    if (ckpt_http_set_checkpoint(st->srv, &c) != 0)
        fprintf(stderr, "ckpt-engine serve: cannot publish '%s': %s\n", name, ckpt_last_error());
    serve_publish_metas(st, engine, name);
}

/* Every checkpoint registered while the HTTP API runs is exported for P2P joiners at once, so
 * that GET /v1/checkpoints/{name}/metas serves it. A failed export (no usable UCX transport)
 * costs only the metas: the checkpoint stays registered for broadcast updates. */
void serve_publish_metas(serve_state_t *st, ckpt_engine_t *engine, const char *name)
{
    char *metas = NULL;
    size_t len = 0;
    if (ckpt_engine_export_metas(engine, name, &metas, &len) == 0)
        ckpt_http_set_metas(st->srv, name, metas, len);
    else
        fprintf(stderr, "ckpt-engine serve: P2P export of '%s' failed: %s\n", name,
                ckpt_last_error());
    free(metas);
}


static double now_s(void) { return MPI_Wtime(); }

/* key=value options of update and p2p-update. */
static int parse_update_opts(const char *name, char **save, ckpt_update_options_t *uo)
{
    char *opt;
    while ((opt = strtok_r(NULL, " \t\r\n", save)) != NULL) {
        if (strncmp(opt, "bucket=", 7) == 0) {
            if (ckpt_parse_size(opt + 7, &uo->bucket_max) < 0) {
                printf("update '%s': bucket=: %s\n", name, ckpt_last_error());
                return -1;
            }
        } else if (strncmp(opt, "timeout=", 8) == 0) {
            uo->timeout_ms = atoi(opt + 8);
        } else if (strncmp(opt, "verify=", 7) == 0) {
            uo->verify = atoi(opt + 7) != 0;
        } else if (strncmp(opt, "direct=", 7) == 0) {
            uo->direct = atoi(opt + 7) != 0;
        } else if (strncmp(opt, "trace=", 6) == 0) {
            uo->trace_path = opt + 6;
        } else if (strncmp(opt, "partial=", 8) == 0) {
            uo->partial = atoi(opt + 8) != 0;
        } else if (strncmp(opt, "isolate=", 8) == 0) {
            uo->isolate = atoi(opt + 8) != 0;
        } else if (strcmp(opt, "unneeded=ignore") == 0 || strcmp(opt, "unneeded=error") == 0) {
            uo->ignore_unneeded = strcmp(opt, "unneeded=ignore") == 0;
        } else {
            printf("update '%s': unknown option '%s' (bucket=, timeout=, verify=, direct=, "
                   "trace=, partial=, isolate=, unneeded=ignore|error)\n", name, opt);
            return -1;
        }
    }
    return 0;
}

/* Executes one command line on rank 0. Returns 0/-1 for success/failure, 1 for quit. */
static int run_line(ckpt_engine_t *engine, serve_state_t *st, char *line)
{
    char *save = NULL;
    char *cmd = strtok_r(line, " \t\r\n", &save);
    if (!cmd || cmd[0] == '#') return 0;
    char *name = strtok_r(NULL, " \t\r\n", &save);
    double t = now_s();
    int rc;
    if (strcmp(cmd, "quit") == 0 || strcmp(cmd, "exit") == 0) return 1;
    if (strcmp(cmd, "list") == 0) {
        for (size_t i = 0; i < ckpt_engine_checkpoint_count(engine); i++) {
            const char *n;
            uint64_t v;
            ckpt_engine_checkpoint_info(engine, i, &n, &v);
            printf("%s\tversion %llu\n", n, (unsigned long long)v);
        }
        return 0;
    }
    if (strcmp(cmd, "floors") == 0) {
        rc = ckpt_engine_floors(engine, &st->floors);
        st->have_floors = rc == 0;
        if (st->json) {
            cJSON *o = cJSON_CreateObject();
            cJSON_AddStringToObject(o, "command", "floors");
            cJSON_AddBoolToObject(o, "ok", rc == 0);
            cJSON_AddNumberToObject(o, "memcpy_gbps", st->floors.memcpy_gbps);
            cJSON_AddNumberToObject(o, "memcpy_concurrent_gbps",
                                    st->floors.memcpy_concurrent_gbps);
            cJSON_AddNumberToObject(o, "stream_gbps", st->floors.stream_gbps);
            cJSON_AddNumberToObject(o, "stream_concurrent_gbps",
                                    st->floors.stream_concurrent_gbps);
            cJSON_AddNumberToObject(o, "bcast_gbps", st->floors.bcast_gbps);
            print_json_line(o);
        } else {
            printf("floors: memcpy (1 core) %.2f GB/s, memcpy from shared memory (all ranks at "
                   "once) %.2f GB/s each; streaming copy %.2f / %.2f GB/s; MPI_Bcast (%llu "
                   "MiB) %.2f GB/s\n",
                   st->floors.memcpy_gbps, st->floors.memcpy_concurrent_gbps,
                   st->floors.stream_gbps, st->floors.stream_concurrent_gbps,
                   (unsigned long long)(st->floors.bcast_bytes >> 20), st->floors.bcast_gbps);
        }
        return rc == 0 ? 0 : -1;
    }
    if (!name) {
        printf("%s: missing checkpoint name (see ckpt-engine serve --help)\n", cmd);
        return -1;
    }
    if (strcmp(cmd, "await-published") == 0) return serve_publish_await(st, engine, name, &save);
    if (strcmp(cmd, "export") == 0) {
        char *file = strtok_r(NULL, " \t\r\n", &save);
        char *metas = NULL;
        size_t len = 0;
        if (!file) {
            printf("export '%s': missing FILE\n", name);
            return -1;
        }
        rc = ckpt_engine_export_metas(engine, name, &metas, &len);
        if (rc == 0) {
            FILE *f = fopen(file, "w");
            if (!f || fwrite(metas, 1, len, f) != len) rc = CKPT_EIO;
            if (f && fclose(f) != 0) rc = CKPT_EIO;
            if (rc) fprintf(stderr, "ckpt-engine serve: writing %s: %m\n", file);
        }
        free(metas);
        serve_print_simple(st, "export", name, rc, NULL, now_s() - t);
        return rc == 0 ? 0 : -1;
    }
    if (strcmp(cmd, "p2p-update") == 0) {
        /* `name` is the metas file here. */
        ckpt_update_options_t uo = CKPT_UPDATE_OPTIONS_INIT;
        ckpt_update_result_t res;
        memset(&res, 0, sizeof(res));
        if (parse_update_opts(name, &save, &uo) < 0) return -1;
        FILE *f = fopen(name, "r");
        char *metas = NULL;
        long len = -1;
        if (f && fseek(f, 0, SEEK_END) == 0 && (len = ftell(f)) > 0 && fseek(f, 0, SEEK_SET) == 0) {
            metas = malloc((size_t)len);
            if (!metas || fread(metas, 1, (size_t)len, f) != (size_t)len) len = -1;
        }
        if (f) fclose(f);
        if (len <= 0) {
            printf("p2p-update: cannot read metas file %s\n", name);
            free(metas);
            return -1;
        }
        rc = ckpt_engine_p2p_update(engine, metas, (size_t)len, &uo, &res);
        free(metas);
        serve_print_update(st, &res);
        return rc == 0 ? 0 : -1;
    }
    if (strcmp(cmd, "register") == 0) {
        char *path = strtok_r(NULL, " \t\r\n", &save);
        if (!path) {
            printf("register '%s': missing PATH\n", name);
            return -1;
        }
        rc = ckpt_engine_register(engine, name, path);
        serve_print_simple(st, "register", name, rc, NULL, now_s() - t);
        if (rc == 0) serve_publish(st, engine, name);
    } else if (strcmp(cmd, "unregister") == 0) {
        rc = ckpt_engine_unregister(engine, name);
        serve_print_simple(st, "unregister", name, rc, NULL, now_s() - t);
        if (rc == 0 && st->srv) ckpt_http_remove_checkpoint(st->srv, name);
    } else if (strcmp(cmd, "update") == 0) {
        ckpt_update_options_t uo = CKPT_UPDATE_OPTIONS_INIT;
        ckpt_update_result_t res;
        memset(&res, 0, sizeof(res));
        if (parse_update_opts(name, &save, &uo) < 0) return -1;
        rc = ckpt_engine_update(engine, name, &uo, &res);
        if (rc < 0 && res.update_id == 0) {
            serve_print_simple(st, "update", name, rc, NULL, now_s() - t);
        } else {
            serve_print_update(st, &res);
        }
    } else {
        printf("unknown command '%s' (see ckpt-engine serve --help)\n", cmd);
        return -1;
    }
    return rc == 0 ? 0 : -1;
}

/* Rank 0 runs the command file; returns the number of failed commands, and sets *quit
 * when it said quit (or a signal came). */
static int run_commands(ckpt_engine_t *engine, serve_state_t *st, const char *commands,
                        int *quit)
{
    FILE *in = strcmp(commands, "-") == 0 ? stdin : fopen(commands, "r");
    if (!in) {
        fprintf(stderr, "ckpt-engine serve: cannot open commands file %s: %m\n", commands);
        return 1;
    }
    int failures = 0;
    char line[8192];
    /* A signal interrupts the read (the handler is installed without SA_RESTART). */
    while (!serve_stop && fgets(line, sizeof(line), in)) {
        int r = run_line(engine, st, line);
        if (r == 1) {
            *quit = 1;
            break;
        }
        if (r < 0) failures++;
    }
    if (serve_stop) *quit = 1;
    if (in != stdin) fclose(in);
    return failures;
}

/* Rank 0 stops on SIGINT/SIGTERM (mpirun forwards them to every rank) and then shuts the
 * others down; they ignore both and wait for that command, so no rank leaves while the
 * others still expect it in a collective. The signals are blocked while MPI's and the
 * HTTP server's threads start, so they reach rank 0's main thread and interrupt its read
 * of the command file. */
static void block_stop_signals(int how)
{
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, SIGINT);
    sigaddset(&set, SIGTERM);
    pthread_sigmask(how, &set, NULL);
}

static void install_stop_signals(int leader)
{
    struct sigaction sa;
    memset(&sa, 0, sizeof(sa));
    sigemptyset(&sa.sa_mask);
    sa.sa_handler = leader ? on_stop_signal : SIG_IGN;
    sa.sa_flags = 0; /* no SA_RESTART: a blocking read of the command file must return */
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGTERM, &sa, NULL);
}

int cmd_serve(int argc, char **argv)
{
    ckpt_engine_options_t opts = CKPT_ENGINE_OPTIONS_INIT;
    const char *commands = NULL, *http = NULL, *token_file = NULL;
    serve_state_t st;
    memset(&st, 0, sizeof(st));
    enum { O_HTTP = 256, O_TOKEN, O_UCX_POOLS, O_INSECURE, O_REQ_TIMEOUT, O_PER_IP, O_DEVICE };
    int insecure_no_token = 0;
    ckpt_http_options_t http_limits = CKPT_HTTP_OPTIONS_INIT;
    static const struct option longopts[] = {
        {"socket-dir", required_argument, NULL, 's'}, {"commands", required_argument, NULL, 'c'},
        {"bucket-max", required_argument, NULL, 'b'}, {"memory-limit", required_argument, NULL, 'm'},
        {"timeout-ms", required_argument, NULL, 't'}, {"verify", no_argument, NULL, 'v'},
        {"share", required_argument, NULL, 'S'},      {"json", no_argument, NULL, 'j'},
        {"direct", required_argument, NULL, 'D'},     {"ucx-pools", required_argument, NULL, O_UCX_POOLS},
        {"http", required_argument, NULL, O_HTTP},    {"token-file", required_argument, NULL, O_TOKEN},
        {"insecure-no-token", no_argument, NULL, O_INSECURE},
        {"http-request-timeout", required_argument, NULL, O_REQ_TIMEOUT},
        {"http-per-ip", required_argument, NULL, O_PER_IP},
        {"device", required_argument, NULL, O_DEVICE},
        {"help", no_argument, NULL, 'h'},             {NULL, 0, NULL, 0}};
    int c;
    optind = 1;
    while ((c = getopt_long(argc, argv, "h", longopts, NULL)) != -1) {
        switch (c) {
        case 's': opts.socket_dir = optarg; break;
        case 'c': commands = optarg; break;
        case 'b':
        case 'm':
            if (ckpt_parse_size(optarg, c == 'b' ? &opts.bucket_max : &opts.memory_limit) < 0) {
                fprintf(stderr, "ckpt-engine serve: %s\n", ckpt_last_error());
                return 2;
            }
            break;
        case 't': opts.timeout_ms = atoi(optarg); break;
        case 'v': opts.verify = 1; break;
        case 'S':
            if (strcmp(optarg, "node") == 0) opts.share_mode = CKPT_SHARE_NODE;
            else if (strcmp(optarg, "rank") == 0) opts.share_mode = CKPT_SHARE_RANK;
            else {
                fprintf(stderr, "ckpt-engine serve: --share takes node or rank, not '%s'\n", optarg);
                return 2;
            }
            break;
        case 'j': st.json = 1; break;
        case 'D':
            if (strcmp(optarg, "auto") == 0) opts.direct = -1;
            else if (strcmp(optarg, "off") == 0) opts.direct = 0;
            else {
                fprintf(stderr, "ckpt-engine serve: --direct takes auto or off, not '%s'\n", optarg);
                return 2;
            }
            break;
        case O_UCX_POOLS:
            if (strcmp(optarg, "auto") == 0) opts.ucx_pools = -1;
            else if (strcmp(optarg, "off") == 0) opts.ucx_pools = 0;
            else {
                fprintf(stderr, "ckpt-engine serve: --ucx-pools takes auto or off, not '%s'\n",
                        optarg);
                return 2;
            }
            break;
        case O_DEVICE:
            if (strcmp(optarg, "auto") && strcmp(optarg, "cpu") && strcmp(optarg, "cuda") &&
                strcmp(optarg, "sim")) {
                fprintf(stderr, "ckpt-engine serve: --device takes auto, cpu, cuda or sim, not "
                        "'%s'\n", optarg);
                return 2;
            }
            opts.device = optarg;
            break;
        case O_HTTP: http = optarg; break;
        case O_TOKEN: token_file = optarg; break;
        case O_INSECURE: insecure_no_token = 1; break;
        case O_REQ_TIMEOUT:
        case O_PER_IP: {
            char *end;
            errno = 0;
            double v = strtod(optarg, &end);
            int per_ip = c == O_PER_IP;
            if (!*optarg || *end || errno || !(v > 0) || v > (per_ip ? 100000 : 86400) ||
                (per_ip && v != (double)(unsigned)v)) {
                fprintf(stderr, "ckpt-engine serve: --%s takes %s, not '%s'\n",
                        per_ip ? "http-per-ip" : "http-request-timeout",
                        per_ip ? "a count from 1 to 100000" : "seconds in (0, 86400]", optarg);
                return 2;
            }
            if (per_ip) http_limits.per_ip_limit = (unsigned)v;
            else http_limits.request_timeout_s = v;
            break;
        }
        case 'h': serve_usage(stdout); return 0;
        default: serve_usage(stderr); return 2;
        }
    }
    if (optind < argc) {
        fprintf(stderr, "ckpt-engine serve: unexpected argument '%s'\n", argv[optind]);
        return 2;
    }
    if (token_file && !http) {
        fprintf(stderr, "ckpt-engine serve: --token-file needs --http\n");
        return 2;
    }
    char http_addr[64];
    int http_port = 0;
    if (http && serve_http_parse_listen(http, http_addr, sizeof http_addr, &http_port) < 0)
        return 2;
    /* Before MPI starts, so a refused exposure costs nothing and exits 2 at once. */
    if (http && serve_http_check_exposure(http_addr, token_file != NULL, insecure_no_token) < 0)
        return 2;
    /* Without --http rank 0 reads stdin by default; with it, only a file asked for. */
    if (!commands && !http) commands = "-";
    st.socket_dir = opts.socket_dir;
    st.timeout_ms = opts.timeout_ms;

    block_stop_signals(SIG_BLOCK);
    MPI_Init(NULL, NULL);
    int world_rank = 0;
    MPI_Comm_rank(MPI_COMM_WORLD, &world_rank);
    install_stop_signals(world_rank == 0);
    ckpt_engine_t *engine = NULL;
    int rc = ckpt_engine_create(&opts, &engine);
    if (rc < 0) {
        fprintf(stderr, "ckpt-engine serve: %s\n", ckpt_last_error());
        MPI_Finalize();
        return 1;
    }
    int failures = 0;
    if (ckpt_engine_rank(engine) == 0) {
        setvbuf(stdout, NULL, _IOLBF, 0);
        serve_publish_announce(&st, engine);
        /* Listen before the command file runs, so a busy port fails at once; requests
         * wait in the queue until the file is done. The server's threads start with the
         * stop signals still blocked. */
        if (http && serve_http_start(&st, http_addr, http_port, token_file, &http_limits) < 0)
            failures++;
        /* After the 'http: listening' line, which scripts read first. */
        printf("device: %s\n", ckpt_engine_device(engine));
        block_stop_signals(SIG_UNBLOCK);
        int quit = 0;
        if (!failures && commands) failures += run_commands(engine, &st, commands, &quit);
        if (st.srv && !quit) serve_http_run(&st, engine);
        else if (st.srv) {
            ckpt_http_stop(st.srv);
            st.srv = NULL;
        }
        if (serve_stop)
            fprintf(stderr, "ckpt-engine serve: %s: stopping every rank\n",
                    serve_stop == SIGINT ? "SIGINT" : "SIGTERM");
        rc = ckpt_engine_shutdown(engine);
        if (rc < 0) fprintf(stderr, "ckpt-engine serve: shutdown: %s\n", ckpt_last_error());
    } else {
        block_stop_signals(SIG_UNBLOCK);
        rc = ckpt_engine_follow(engine);
        if (rc < 0) fprintf(stderr, "ckpt-engine serve: %s\n", ckpt_last_error());
    }
    ckpt_engine_destroy(engine);
    MPI_Finalize();
    return failures ? 1 : 0;
}
