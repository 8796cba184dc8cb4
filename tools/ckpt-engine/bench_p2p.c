/* ckpt-engine bench p2p: a whole P2P update on this machine, measured against its floors in
 * the same run. A serving deployment (N ranks, N workers) registers a checkpoint, runs the
 * broadcast updates (direct and staged) and exports its metas; a joining deployment (N
 * ranks, N workers) pulls it over UCX. Printed: the pull phase (bytes pulled over the time
 * spent pulling) beside `ucx_perftest -t ucp_get` on the same transport, and the P2P
 * update's time and per-worker bandwidth beside the broadcast updates'. */
#include <cjson/cJSON.h>
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <getopt.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "bench.h"
#include "ckpt/ckpt.h"

#define CKPT_MAX(a, b) ((a) > (b) ? (a) : (b))

typedef struct {
    const char *path, *tls, *ucx_pools;
    char size[32], bucket[32];
    int ranks, keep, repeat;
    char self[2048], worker[2048], work[256];
} p2p_opts_t;

static void usage(FILE *out)
{
    fprintf(out,
            "usage: ckpt-engine bench p2p [PATH] [--size 1GiB] [--ranks N] [--tls shm|tcp]\n"
            "                             [--bucket SIZE] [--ucx-pools auto|off] [--repeat N]\n"
            "                             [--keep]\n\n"
            "Runs a serving deployment (N ranks + N workers) and a joining one (N ranks + N\n"
            "workers) on this machine under mpirun; the joiner pulls the checkpoint (PATH, or a\n"
            "synthetic one of --size) over UCX. Prints the pull phase against ucx_perftest's\n"
            "get bandwidth on the same transport, and the P2P update beside the broadcast\n"
            "updates of the serving deployment. The floor is measured twice: on an idle host,\n"
            "and beside N processes copying memory as the joining workers do while the pull\n"
            "of the next bucket runs (on a host with fewer cores than processes the pull\n"
            "shares them). --ucx-pools is passed to the serving deployment's `serve`.\n"
            "The joiner runs --repeat P2P updates (default 3) and each floor runs as often:\n"
            "medians are printed. A second joiner runs with room for one buffer only (the\n"
            "pull of a bucket no longer overlaps the reload of the previous one): its pull\n"
            "phase shows what the pull path reaches when it has the cores to itself.\n"
            "--keep keeps the work folder.\n");
}

static pid_t spawn(char *const argv[], const char *out_path)
{
    fflush(NULL);
    pid_t pid = fork();
    if (pid == 0) {
        if (out_path) {
            int fd = open(out_path, O_WRONLY | O_CREAT | O_TRUNC, 0644);
            if (fd >= 0) {
                dup2(fd, 1);
                dup2(fd, 2);
            }
        }
        execvp(argv[0], argv);
        fprintf(stderr, "bench p2p: cannot run %s: %s\n", argv[0], strerror(errno));
        _exit(127);
    }
    return pid;
}

static int run_wait(char *const argv[], const char *out_path)
{
    int st = 0;
    pid_t pid = spawn(argv, out_path);
    if (pid < 0 || waitpid(pid, &st, 0) < 0) return -1;
    return WIFEXITED(st) ? WEXITSTATUS(st) : -1;
}

static void start_workers(const p2p_opts_t *o, const char *dir, const char *model, int updates,
                          pid_t *pids)
{
    char sock[4200], log[4200], upd[16];
    snprintf(upd, sizeof(upd), "%d", updates);
    for (int r = 0; r < o->ranks; r++) {
        snprintf(sock, sizeof(sock), "%s/rank-%d.sock", dir, r);
        snprintf(log, sizeof(log), "%s/worker-%d.log", dir, r);
        char *argv[] = {(char *)o->worker, "--socket", sock, "--layout", (char *)model,
                        "--updates", upd, "--timeout-ms", "120000", NULL};
        pids[r] = spawn(argv, log);
    }
}

/* The JSON result lines `serve --json` wrote to path, as a cJSON array. */
static cJSON *json_lines(const char *path)
{
    cJSON *all = cJSON_CreateArray();
    FILE *f = fopen(path, "r");
    char line[16384];
    while (f && fgets(line, sizeof(line), f)) {
        cJSON *j = line[0] == '{' ? cJSON_Parse(line) : NULL;
        if (j) cJSON_AddItemToArray(all, j);
    }
    if (f) fclose(f);
    return all;
}

/* Runs `serve` with a command file; returns its JSON result lines as a cJSON array. */
static cJSON *serve(const p2p_opts_t *o, const char *dir, const char *commands,
                    const char *memory_limit)
{
    char cmdfile[4200], out[4200], np[16];
    snprintf(cmdfile, sizeof(cmdfile), "%s/commands", dir);
    snprintf(out, sizeof(out), "%s/serve.out", dir);
    snprintf(np, sizeof(np), "%d", o->ranks);
    FILE *f = fopen(cmdfile, "w");
    if (!f) return NULL;
    fputs(commands, f);
    fclose(f);
    char *argv[] = {"mpirun", "-np", np, "--oversubscribe", "--bind-to", "none",
                    (char *)o->self, "serve", "--socket-dir", (char *)dir, "--commands", cmdfile,
                    "--json", memory_limit ? "--memory-limit" : NULL, (char *)memory_limit, NULL};
    int rc = run_wait(argv, out);
    cJSON *all = json_lines(out);
    if (rc != 0) fprintf(stderr, "bench p2p: serve in %s exited %d (see %s)\n", dir, rc, out);
    return all;
}

static cJSON *nth_update(cJSON *results, int n)
{
    cJSON *it;
    cJSON_ArrayForEach(it, results)
    {
        cJSON *c = cJSON_GetObjectItem(it, "command");
        if (cJSON_IsString(c) && strcmp(c->valuestring, "update") == 0 && n-- == 0) return it;
    }
    return NULL;
}

static double num(cJSON *o, const char *k)
{
    cJSON *v = o ? cJSON_GetObjectItem(o, k) : NULL;
    return cJSON_IsNumber(v) ? v->valuedouble : 0;
}

static int ok(cJSON *o) { return o && cJSON_IsTrue(cJSON_GetObjectItem(o, "ok")); }

static void row(const char *what, cJSON *u)
{
    if (!ok(u)) {
        cJSON *r = u ? cJSON_GetObjectItem(u, "reason") : NULL;
        printf("  %-30s FAILED: %s\n", what, cJSON_IsString(r) ? r->valuestring : "no result");
        return;
    }
    printf("  %-30s %8.3f s   %8.2f GB/s per worker\n", what, num(u, "total_s"),
           num(u, "per_worker_gbps"));
}

/* A joining deployment in dir: o->repeat P2P updates from metas; its JSON results. */
static cJSON *join(const p2p_opts_t *o, const char *dir, const char *model, const char *metas,
                   const char *memory_limit)
{
    pid_t pids[64];
    char cmds[16384];
    start_workers(o, dir, model, o->repeat, pids);
    size_t len = 0;
    for (int i = 0; i < o->repeat; i++)
        len += (size_t)snprintf(cmds + len, sizeof(cmds) - len, "p2p-update %s bucket=%s\n",
                                metas, o->bucket);
    snprintf(cmds + len, sizeof(cmds) - len, "quit\n");
    cJSON *res = serve(o, dir, cmds, memory_limit);
    for (int r = 0; r < o->ranks; r++) waitpid(pids[r], NULL, 0);
    return res;
}

/* Median pull rate (GB/s) of the P2P updates in res, their rates in order in rates[], the
 * update of median time in *row; 0 when any update failed (*row then is a failed one). */
static int pulls_of(cJSON *res, int repeat, double *median_out, double *rates, int *nrates,
                    cJSON **row)
{
    double totals[50];
    int nok = 0, all_ok = res != NULL;
    *row = NULL;
    for (int i = 0; i < repeat; i++) {
        cJSON *u = res ? nth_update(res, i) : NULL;
        if (!ok(u) || num(u, "pull_s") <= 0) {
            all_ok = 0;
            if (!*row) *row = u; /* its reason is printed */
            continue;
        }
        rates[nok] = num(u, "pull_bytes") / num(u, "pull_s") / 1e9;
        totals[nok++] = num(u, "total_s");
    }
    *nrates = nok;
    *median_out = nok ? bench_median(rates, nok) : 0;
    if (all_ok) { /* the update whose time is nearest the median time */
        double mid = bench_median(totals, nok), best = -1;
        for (int i = 0; i < nok; i++)
            if (best < 0 || fabs(totals[i] - mid) < best) {
                best = fabs(totals[i] - mid);
                *row = nth_update(res, i);
            }
    }
    return all_ok;
}

static int parse(int argc, char **argv, p2p_opts_t *o)
{
    static const struct option longopts[] = {
        {"size", required_argument, NULL, 's'}, {"ranks", required_argument, NULL, 'n'},
        {"tls", required_argument, NULL, 't'},  {"bucket", required_argument, NULL, 'b'},
        {"keep", no_argument, NULL, 'k'},       {"help", no_argument, NULL, 'h'},
        {"ucx-pools", required_argument, NULL, 'u'}, {"repeat", required_argument, NULL, 'r'},
        {NULL, 0, NULL, 0}};
    int c;
    uint64_t v;
    optind = 1;
    while ((c = getopt_long(argc, argv, "h", longopts, NULL)) != -1) {
        switch (c) {
        case 's':
        case 'b':
            if (ckpt_parse_size(optarg, &v) < 0) {
                fprintf(stderr, "bench p2p: %s\n", ckpt_last_error());
                return 2;
            }
            snprintf(c == 's' ? o->size : o->bucket, sizeof(o->size), "%s", optarg);
            break;
        case 'n': o->ranks = atoi(optarg); break;
        case 't': o->tls = optarg; break;
        case 'k': o->keep = 1; break;
        case 'u': o->ucx_pools = optarg; break;
        case 'r': o->repeat = atoi(optarg); break;
        case 'h': usage(stdout); return 1;
        default: usage(stderr); return 2;
        }
    }
    if (optind < argc) o->path = argv[optind++];
    if (optind < argc || o->ranks < 1 || o->repeat < 1 || o->repeat > 50) {
        usage(stderr);
        return 2;
    }
    return 0;
}

int bench_p2p(int argc, char **argv)
{
    p2p_opts_t o;
    memset(&o, 0, sizeof(o));
    o.ranks = 2;
    o.repeat = 3;
    snprintf(o.size, sizeof(o.size), "1GiB");
    snprintf(o.bucket, sizeof(o.bucket), "64MiB");
    int rc = parse(argc, argv, &o);
    if (rc) return rc == 1 ? 0 : rc;
    /* Our own binaries, next to each other in the build or install tree. */
    ssize_t n = readlink("/proc/self/exe", o.self, sizeof(o.self) - 1);
    if (n <= 0) return 1;
    o.self[n] = '\0';
    snprintf(o.worker, sizeof(o.worker), "%s", o.self);
    char *slash = strrchr(o.worker, '/');
    snprintf(slash + 1, sizeof(o.worker) - (size_t)(slash + 1 - o.worker), "ckpt-worker");
    if (access(o.worker, X_OK) != 0) {
        fprintf(stderr, "bench p2p: %s not found (build ckpt-worker next to ckpt-engine)\n",
                o.worker);
        return 1;
    }
    if (o.tls) setenv("UCX_TLS", strcmp(o.tls, "shm") == 0   ? "shm,self"
                                 : strcmp(o.tls, "tcp") == 0 ? "tcp,self"
                                                             : o.tls, 1);
    if (geteuid() == 0) { /* Open MPI refuses root without these; the user ran us as root */
        setenv("OMPI_ALLOW_RUN_AS_ROOT", "1", 0);
        setenv("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1", 0);
    }
    snprintf(o.work, sizeof(o.work), "/tmp/ckpt-bench-p2p.XXXXXX");
    if (!mkdtemp(o.work)) {
        perror("bench p2p: mkdtemp");
        return 1;
    }
    char model[4200], sdir[512], jdir[512], metas[512], cmds[16384];
    snprintf(sdir, sizeof(sdir), "%s/serving", o.work);
    snprintf(jdir, sizeof(jdir), "%s/joining", o.work);
    snprintf(metas, sizeof(metas), "%s/metas.json", o.work);
    mkdir(sdir, 0700);
    mkdir(jdir, 0700);
    if (o.path) {
        snprintf(model, sizeof(model), "%s", o.path);
    } else {
        snprintf(model, sizeof(model), "%s/model", o.work);
        char *gen[] = {o.self, "gen", "--out", model, "--size", o.size, "--shards", "4", NULL};
        if (run_wait(gen, NULL) != 0) return 1;
    }
    printf("bench p2p: %d serving + %d joining ranks, UCX_TLS=%s, work %s\n", o.ranks, o.ranks,
           getenv("UCX_TLS") ? getenv("UCX_TLS") : "(UCX default)", o.work);

    /* Serving: broadcast updates (direct, staged), then export. Its workers take 2 updates;
     * the joiner runs while the serving deployment is still up (it waits on `sleep`). */
    pid_t spids[64];
    if (o.ranks > 64) o.ranks = 64;
    start_workers(&o, sdir, model, 2, spids);
    char fifo[512];
    snprintf(fifo, sizeof(fifo), "%s/go", o.work);
    mkfifo(fifo, 0600);
    snprintf(cmds, sizeof(cmds),
             "floors\nregister m %s\nupdate m bucket=%s\nupdate m direct=0 bucket=%s\n"
             "export m %s\n",
             model, o.bucket, o.bucket, metas);
    /* The serving job must outlive the pull: its command file ends by blocking on a FIFO
     * that this process opens only after the joiner finished. */
    char sfile[600];
    snprintf(sfile, sizeof(sfile), "%s/commands", sdir);
    FILE *f = fopen(sfile, "w");
    if (!f) return 1;
    fputs(cmds, f);
    fclose(f);
    char np[16], sout[600];
    snprintf(np, sizeof(np), "%d", o.ranks);
    snprintf(sout, sizeof(sout), "%s/serve.out", sdir);
    /* commands = the file, then whatever arrives on the FIFO ("quit" at the end). */
    char shell[16384];
    snprintf(shell, sizeof(shell), "cat '%s' '%s' | mpirun -np %s --oversubscribe --bind-to none "
             "'%s' serve --socket-dir '%s' --commands - --json --ucx-pools '%s'",
             sfile, fifo, np, o.self, sdir, o.ucx_pools ? o.ucx_pools : "auto");
    char *sh[] = {"sh", "-c", shell, NULL};
    pid_t serving = spawn(sh, sout);
    /* Wait for the metas (the export is the last command before the FIFO). */
    for (int i = 0; i < 6000 && access(metas, R_OK) != 0; i++) usleep(50000);
    usleep(200000);
    cJSON *jres = NULL, *jres1 = NULL;
    if (access(metas, R_OK) == 0) {
        jres = join(&o, jdir, model, metas, NULL);
        /* Again with room for one buffer only: the pull of bucket b+1 then waits for the
         * reload of bucket b instead of sharing the cores with it. */
        cJSON *first = nth_update(jres, 0);
        if (ok(first)) {
            char limit[32], dir1[600];
            snprintf(limit, sizeof(limit), "%.0f", num(first, "bucket_size") * 1.5);
            snprintf(dir1, sizeof(dir1), "%s-1buf", jdir);
            mkdir(dir1, 0700);
            jres1 = join(&o, dir1, model, metas, limit);
        }
    } else {
        fprintf(stderr, "bench p2p: the serving deployment exported no metas (see %s)\n", sout);
    }
    int go = open(fifo, O_WRONLY);
    if (go >= 0) {
        if (write(go, "quit\n", 5) != 5) perror("bench p2p: fifo");
        close(go);
    }
    waitpid(serving, NULL, 0);
    for (int r = 0; r < o.ranks; r++) waitpid(spids[r], NULL, 0);

    cJSON *sres = json_lines(sout);
    cJSON *direct = nth_update(sres, 0), *staged = nth_update(sres, 1);
    /* Medians over the repeated P2P updates: the pull rate, and the update of median time
     * for its row. Any failed update fails the benchmark. */
    double pulls[50], pulls1[50], pull_gbps = 0, pull1_gbps = 0, floor_gbps = -1;
    int nok = 0, nok1 = 0;
    cJSON *p2p = NULL, *p2p1 = NULL;
    int all_ok = pulls_of(jres, o.repeat, &pull_gbps, pulls, &nok, &p2p);
    all_ok &= pulls_of(jres1, o.repeat, &pull1_gbps, pulls1, &nok1, &p2p1);
    uint64_t bytes = ok(p2p) ? (uint64_t)num(p2p, "pull_bytes") : (1ull << 30);
    /* The floor pulls messages of one bucket, as the update does per bucket. (With 8 MiB
     * messages ucx_perftest re-reads one buffer that stays in a 32 MiB L3 cache: that
     * measures the cache, not what streaming a checkpoint out of memory can reach.) */
    uint64_t bucket_bytes = 64ull << 20;
    ckpt_parse_size(o.bucket, &bucket_bytes);
    double idle[50], busy[50];
    int nidle = 0, nbusy = 0;
    for (int i = 0; i < o.repeat; i++) {
        double g = bench_ucx_perftest(bucket_bytes, CKPT_MAX(bytes, 4 * bucket_bytes));
        if (g > 0) idle[nidle++] = g;
        g = bench_ucx_perftest_busy(bucket_bytes, CKPT_MAX(bytes, 4 * bucket_bytes), o.ranks);
        if (g > 0) busy[nbusy++] = g;
    }
    floor_gbps = nidle ? bench_median(idle, nidle) : -1;
    double busy_gbps = nbusy ? bench_median(busy, nbusy) : -1;

    printf("\n  %-30s %8.2f GB/s   (median of %d updates: bytes pulled / time spent pulling,\n"
           "  %-30s                  summed over ranks;", "P2P pull phase", pull_gbps, nok, "");
    for (int i = 0; i < nok; i++) printf(" %.2f", pulls[i]);
    printf(")\n");
    if (floor_gbps > 0)
        printf("  %-30s %8.2f GB/s   ratio %.2f (median of %d)\n",
               "ucx_perftest -t ucp_get (-s bucket)", floor_gbps, pull_gbps / floor_gbps, nidle);
    else
        printf("  %-30s no result (is ucx-utils installed?)\n", "ucx_perftest -t ucp_get");
    if (busy_gbps > 0) {
        char what[64];
        snprintf(what, sizeof(what), "  same, beside %d copy loop%s", o.ranks, o.ranks > 1 ? "s" : "");
        printf("  %-30s %8.2f GB/s   ratio %.2f (median of %d)\n", what, busy_gbps,
               pull_gbps / busy_gbps, nbusy);
    }
    printf("  %-30s %8.2f GB/s   ratio %.2f to the idle floor (median;", "  one buffer, no overlap",
           pull1_gbps, floor_gbps > 0 ? pull1_gbps / floor_gbps : 0);
    for (int i = 0; i < nok1; i++) printf(" %.2f", pulls1[i]);
    printf(")\n");
    row("P2P update (joining, median)", p2p);
    row("  one buffer, no overlap", p2p1);
    row("broadcast update, direct", direct);
    row("broadcast update, staged", staged);
    int failed = !all_ok || !ok(p2p) || !ok(direct) || !ok(staged);
    cJSON_Delete(sres);
    cJSON_Delete(jres);
    cJSON_Delete(jres1);
    if (!o.keep) {
        char *rm[] = {"rm", "-rf", o.work, NULL};
        run_wait(rm, NULL);
    } else {
        printf("bench p2p: kept %s\n", o.work);
    }
    return failed ? 1 : 0;
}
