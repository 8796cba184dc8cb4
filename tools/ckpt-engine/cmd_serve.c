/* ckpt-engine serve: one engine rank. All ranks of a deployment form one MPI job; rank 0
 * reads commands (a file or stdin, one per line) and leads, the others follow. */
#include <getopt.h>
#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ckpt/ckpt.h"
#include "ckpt/engine.h"
#include "commands.h"

static void serve_usage(FILE *out)
{
    fprintf(out,
        "usage: mpirun -np N ckpt-engine serve [options]\n\n"
        "Runs one engine rank per process. Rank 0 reads commands, one per line, and every\n"
        "rank executes them together. Each rank serves the inference worker that connects\n"
        "to DIR/rank-<r>.sock (ckpt-worker, or a vLLM/SGLang worker via the receiver API).\n\n"
        "options:\n"
        "  --socket-dir DIR     worker sockets DIR/rank-<r>.sock (default: ranks have no worker)\n"
        "  --commands FILE      read commands from FILE on rank 0 ('-' = stdin, the default)\n"
        "  --bucket-max SIZE    largest bucket, e.g. 256MiB (default 256MiB; never below the\n"
        "                       largest tensor; lowered to fit free memory)\n"
        "  --memory-limit SIZE  memory the IPC buffers may use (default: half of free memory)\n"
        "  --timeout-ms N       bound of every wait during a command (default 30000)\n"
        "  --verify             workers verify every tensor's XXH3-64 checksum\n"
        "  --share node|rank    node: ranks of a host share one pair of IPC buffers and only\n"
        "                       host leaders broadcast (default); rank: one pair per rank\n"
        "  --direct auto|off    auto: when all ranks share one host, workers read tensors\n"
        "                       straight out of the owners' pools (no staging copy, the\n"
        "                       default); off: always stage through the IPC buffers\n"
        "  --json               print results as JSON lines instead of tables\n"
        "  -h, --help           this text\n\n"
        "commands (rank 0's input; '#' starts a comment):\n"
        "  register NAME PATH   each rank loads its share of PATH (file, directory or index)\n"
        "  update NAME [bucket=SIZE] [timeout=MS] [verify=0|1] [direct=0|1] [trace=FILE]\n"
        "                       broadcast update of every worker; trace= writes the timeline\n"
        "                       as Chrome trace JSON (open it in ui.perfetto.dev)\n"
        "  unregister NAME      frees the checkpoint on every rank\n"
        "  export NAME FILE     P2P: registers NAME's pools with UCX and writes the metas a\n"
        "                       joining deployment needs to FILE (docs/METAS.md)\n"
        "  p2p-update FILE [bucket=SIZE] [timeout=MS] [verify=0|1] [trace=FILE]\n"
        "                       P2P: pulls the checkpoint FILE describes from the serving\n"
        "                       ranks (one-sided UCX gets) and updates this deployment\n"
        "  floors               measures memcpy and MPI_Bcast bandwidth for comparison\n"
        "  list                 registered checkpoints\n"
        "  quit                 stops every rank\n\n"
        "exit status: 0 when every command succeeded, 1 when one failed, 2 on usage errors,\n"
        "3 when the deployment broke (a rank died): restart the whole MPI job.\n");
}

typedef struct {
    int json;
    ckpt_floors_t floors;
    int have_floors;
} serve_state_t;

static double gbps(uint64_t bytes, double s) { return s > 0 ? (double)bytes / s / 1e9 : 0; }

static void print_update(serve_state_t *st, const ckpt_update_result_t *r)
{
    char bsize[32], total[32];
    double per_worker = gbps(r->bytes, r->total_s);
    if (st->json) {
        printf("{\"command\":\"update\",\"name\":\"%s\",\"ok\":%s,\"status\":\"%s\","
               "\"failed_rank\":%d,\"reason\":\"%s\",\"version\":%llu,\"update_id\":%llu,"
               "\"ranks\":%d,\"bytes\":%llu,\"tensors\":%u,\"buckets\":%u,\"bucket_size\":%llu,"
               "\"buffers\":%d,\"direct\":%d,\"gather_s\":%.6f,\"plan_s\":%.6f,\"begin_s\":%.6f,"
               "\"pipeline_s\":%.6f,\"finish_s\":%.6f,\"total_s\":%.6f,"
               "\"p2p\":%d,\"pull_s\":%.6f,\"pull_bytes\":%llu,\"per_worker_gbps\":%.4f,\"memcpy_gbps\":%.4f,\"bcast_gbps\":%.4f}\n",
               r->name, r->status == 0 ? "true" : "false", ckpt_status_name(r->status),
               r->failed_rank, r->reason, (unsigned long long)r->version,
               (unsigned long long)r->update_id, r->nranks, (unsigned long long)r->bytes,
               r->ntensors, r->nbuckets, (unsigned long long)r->bucket_size, r->nbuffers, r->direct,
               r->gather_s, r->plan_s, r->begin_s, r->pipeline_s, r->finish_s, r->total_s,
               r->p2p, r->pull_s, (unsigned long long)r->pull_bytes, per_worker,
               st->floors.memcpy_gbps, st->floors.bcast_gbps);
        return;
    }
    if (r->status != 0) {
        printf("update '%s' #%llu FAILED after %.3f s: %s\n", r->name,
               (unsigned long long)r->update_id, r->total_s, r->reason);
        return;
    }
    printf("update '%s' #%llu (version %llu): ok\n", r->name, (unsigned long long)r->update_id,
           (unsigned long long)r->version);
    printf("  %-28s %d\n", "ranks (workers)", r->nranks);
    printf("  %-28s %s in %u tensors\n", "checkpoint",
           ckpt_format_size(r->bytes, total, sizeof(total)), r->ntensors);
    if (r->direct)
        printf("  %-28s %u x <= %s, read in place from the owners' pools\n", "buckets",
               r->nbuckets, ckpt_format_size(r->bucket_size, bsize, sizeof(bsize)));
    else
        printf("  %-28s %u x <= %s, %d buffer%s\n", "buckets", r->nbuckets,
               ckpt_format_size(r->bucket_size, bsize, sizeof(bsize)), r->nbuffers,
               r->nbuffers == 1 ? " (memory short: no overlap)" : "s (pipelined)");
    printf("  %-28s %8.3f s\n", "gather metas", r->gather_s);
    printf("  %-28s %8.3f s\n", "plan + buffers", r->plan_s);
    printf("  %-28s %8.3f s\n", "workers ready", r->begin_s);
    printf("  %-28s %8.3f s\n", "pipeline", r->pipeline_s);
    printf("  %-28s %8.3f s\n", "finish (post-hooks)", r->finish_s);
    printf("  %-28s %8.3f s\n", "update time", r->total_s);
    printf("  %-28s %8.2f GB/s\n", "delivered per worker", per_worker);
    if (r->p2p)
        printf("  %-28s %8.2f GB/s   (%.3f s pulling %llu bytes)\n", "P2P pull phase",
               gbps(r->pull_bytes, r->pull_s), r->pull_s, (unsigned long long)r->pull_bytes);
    if (st->have_floors) {
        printf("  %-28s %8.2f GB/s   ratio %.2f\n", "memcpy, 1 core (floor)",
               st->floors.memcpy_gbps, per_worker / st->floors.memcpy_gbps);
        if (st->floors.bcast_gbps > 0)
            printf("  %-28s %8.2f GB/s   ratio %.2f\n", "MPI_Bcast (floor)",
                   st->floors.bcast_gbps, per_worker / st->floors.bcast_gbps);
        else
            printf("  %-28s      n/a (one rank)\n", "MPI_Bcast (floor)");
    }
}

static void print_simple(serve_state_t *st, const char *cmd, const char *name, int rc,
                         double seconds)
{
    if (st->json)
        printf("{\"command\":\"%s\",\"name\":\"%s\",\"ok\":%s,\"status\":\"%s\",\"reason\":\"%s\","
               "\"seconds\":%.6f}\n",
               cmd, name, rc == 0 ? "true" : "false", ckpt_status_name(rc),
               rc == 0 ? "" : ckpt_last_error(), seconds);
    else if (rc == 0)
        printf("%s '%s': ok (%.3f s)\n", cmd, name, seconds);
    else
        printf("%s '%s' FAILED: %s\n", cmd, name, ckpt_last_error());
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
        } else {
            printf("update '%s': unknown option '%s' (bucket=, timeout=, verify=, direct=, "
                   "trace=)\n", name, opt);
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
        if (st->json)
            printf("{\"command\":\"floors\",\"ok\":%s,\"memcpy_gbps\":%.4f,\"bcast_gbps\":%.4f}\n",
                   rc == 0 ? "true" : "false", st->floors.memcpy_gbps, st->floors.bcast_gbps);
        else
            printf("floors: memcpy (1 core) %.2f GB/s, MPI_Bcast (%llu MiB) %.2f GB/s\n",
                   st->floors.memcpy_gbps, (unsigned long long)(st->floors.bcast_bytes >> 20),
                   st->floors.bcast_gbps);
        return rc == 0 ? 0 : -1;
    }
    if (!name) {
        printf("%s: missing checkpoint name (see ckpt-engine serve --help)\n", cmd);
        return -1;
    }
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
        print_simple(st, "export", name, rc, now_s() - t);
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
        print_update(st, &res);
        return rc == 0 ? 0 : -1;
    }
    if (strcmp(cmd, "register") == 0) {
        char *path = strtok_r(NULL, " \t\r\n", &save);
        if (!path) {
            printf("register '%s': missing PATH\n", name);
            return -1;
        }
        rc = ckpt_engine_register(engine, name, path);
        print_simple(st, "register", name, rc, now_s() - t);
    } else if (strcmp(cmd, "unregister") == 0) {
        rc = ckpt_engine_unregister(engine, name);
        print_simple(st, "unregister", name, rc, now_s() - t);
    } else if (strcmp(cmd, "update") == 0) {
        ckpt_update_options_t uo = CKPT_UPDATE_OPTIONS_INIT;
        ckpt_update_result_t res;
        memset(&res, 0, sizeof(res));
        if (parse_update_opts(name, &save, &uo) < 0) return -1;
        rc = ckpt_engine_update(engine, name, &uo, &res);
        if (rc < 0 && res.update_id == 0) {
            print_simple(st, "update", name, rc, now_s() - t);
        } else {
            print_update(st, &res);
        }
    } else {
        printf("unknown command '%s' (see ckpt-engine serve --help)\n", cmd);
        return -1;
    }
    return rc == 0 ? 0 : -1;
}

int cmd_serve(int argc, char **argv)
{
    ckpt_engine_options_t opts = CKPT_ENGINE_OPTIONS_INIT;
    const char *commands = "-";
    serve_state_t st;
    memset(&st, 0, sizeof(st));
    static const struct option longopts[] = {
        {"socket-dir", required_argument, NULL, 's'}, {"commands", required_argument, NULL, 'c'},
        {"bucket-max", required_argument, NULL, 'b'}, {"memory-limit", required_argument, NULL, 'm'},
        {"timeout-ms", required_argument, NULL, 't'}, {"verify", no_argument, NULL, 'v'},
        {"share", required_argument, NULL, 'S'},      {"json", no_argument, NULL, 'j'},
        {"direct", required_argument, NULL, 'D'},
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
        case 'h': serve_usage(stdout); return 0;
        default: serve_usage(stderr); return 2;
        }
    }
    if (optind < argc) {
        fprintf(stderr, "ckpt-engine serve: unexpected argument '%s'\n", argv[optind]);
        return 2;
    }

    MPI_Init(NULL, NULL);
    ckpt_engine_t *engine = NULL;
    int rc = ckpt_engine_create(&opts, &engine);
    if (rc < 0) {
        fprintf(stderr, "ckpt-engine serve: %s\n", ckpt_last_error());
        MPI_Finalize();
        return 1;
    }
    int failures = 0;
    if (ckpt_engine_rank(engine) == 0) {
        FILE *in = strcmp(commands, "-") == 0 ? stdin : fopen(commands, "r");
        if (!in) {
            fprintf(stderr, "ckpt-engine serve: cannot open commands file %s: %m\n", commands);
            failures++;
        } else {
            setvbuf(stdout, NULL, _IOLBF, 0);
            char line[8192];
            while (fgets(line, sizeof(line), in)) {
                int r = run_line(engine, &st, line);
                if (r == 1) break;
                if (r < 0) failures++;
            }
            if (in != stdin) fclose(in);
        }
        ckpt_engine_shutdown(engine);
    } else {
        rc = ckpt_engine_follow(engine);
        if (rc < 0) fprintf(stderr, "ckpt-engine serve: %s\n", ckpt_last_error());
    }
    ckpt_engine_destroy(engine);
    MPI_Finalize();
    return failures ? 1 : 0;
}
