/* ckpt-engine plan: plans an update of a checkpoint on a deployment and predicts its time
 * per stage from link figures (the cost model: src/plan/cost.c), for a full broadcast and
 * for need-routed transfer. */
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "commands.h"
#include "plan/cost.h"
#include "plan_input.h"

static void usage(FILE *out)
{
    fprintf(out,
"usage: ckpt-engine plan MODEL [deployment] [links] [--json]\n"
"\n"
"Plans an update of MODEL the way the engine does (shares, buckets) and predicts how long\n"
"each stage takes, for a full broadcast (every host receives every byte: the engine today,\n"
"and the reference system) and for need-routed transfer (each host receives only what its\n"
"workers need, every owner sending at once).\n"
"\n"
"MODEL: a checkpoint (safetensors directory, file or index; only headers are read) or a\n"
"  model description (bench/models/*.json: kimi-k2, qwen3-235b-a22b, glm-4.5-air).\n"
"\n"
"deployment (one engine rank and one inference worker per rank, i.e. per GPU):\n"
"  --hosts N            hosts (default 1)\n"
"  --ranks-per-host N   ranks (GPUs) per host (default 1)\n"
"  --tp N --pp N --ep N worker layout: instances of tp*pp consecutive ranks; ep splits\n"
"                       the experts over ep of the tp ranks (default 1 1 1)\n"
"  --gpu                device path: H2D, device broadcast, reload in device memory\n"
"  --direct on|off      one host without GPU: workers read the pools in place (default on\n"
"                       where it applies, as the engine does)\n"
"  --bucket-max SIZE    largest bucket (default 256MiB, the engine's default)\n"
"\n"
"links (GB/s are 1e9 bytes per second):\n"
"  --disk GBPS          per host, reading checkpoint files (default 2)\n"
"  --copy GBPS          one copy stream in host memory, the memcpy floor (default 10)\n"
"  --host-copy GBPS     all copy streams of a host together (default 2 x --copy)\n"
"  --inter GBPS         per host, between hosts: the broadcast floor (default 12.5)\n"
"  --latency-us US      per hop between hosts (default 20)\n"
"  --h2d GBPS           --gpu: per GPU, pinned host memory to device (default 50)\n"
"  --intra GBPS         --gpu: per GPU, between the GPUs of a host (default 150)\n"
"  --d2d GBPS           --gpu: per GPU, copy inside device memory (default 1500)\n"
"  --bucket-us US       fixed cost per bucket: worker round trip, agreement (default 1000)\n"
"  --update-ms MS       fixed cost per update: metas, plan, BEGIN, FINISH and the workers'\n"
"                       post-hook (default 12: ckpt-worker's post-hook sleeps 10 ms)\n"
"  --cores N            host memory: cores per host that copy and carry TCP; bounds the\n"
"                       update by the core time its copies and transfers need (default 0:\n"
"                       no bound)\n"
"  --one-machine        the hosts are namespaces of one machine and share its --cores\n"
"  --tcp-core GBPS      with --cores: what one core carries over TCP (default --inter; give\n"
"                       it where the link is slower than a core, e.g. a shaped link)\n"
"\n"
"  --json               print the prediction as one JSON object\n"
"\n"
"Example (Kimi-K2 on 256 GPUs, TP16): ckpt-engine plan bench/models/kimi-k2.json --gpu \\\n"
"    --hosts 32 --ranks-per-host 8 --tp 16 --bucket-max 8GiB --inter 80\n");
}

static int parse_double(const char *opt, const char *text, double *out)
{
    char *end = NULL;
    double v = strtod(text, &end);
    if (!end || *end || v < 0) {
        fprintf(stderr, "ckpt-engine plan: %s wants a number >= 0, not '%s'\n", opt, text);
        return -1;
    }
    *out = v;
    return 0;
}

static int parse_int(const char *opt, const char *text, int *out)
{
    char *end = NULL;
    long v = strtol(text, &end, 10);
    if (!end || *end || v < 1 || v > 1 << 20) {
        fprintf(stderr, "ckpt-engine plan: %s wants a whole number >= 1, not '%s'\n", opt, text);
        return -1;
    }
    *out = (int)v;
    return 0;
}

static const char *gib(uint64_t bytes, char *buf, size_t cap)
{
    return ckpt_format_size(bytes, buf, cap);
}

static void print_text(const plan_input_t *in, const ckpt_cost_deploy_t *d,
                       const ckpt_cost_links_t *L, const ckpt_cost_result_t *r)
{
    char a[32], b[32], c[32];
    int inst = d->layout.tp * d->layout.pp;
    printf("model: %s: %zu tensors, %s\n", in->name, r->ntensors, gib(r->total_bytes, a, sizeof(a)));
    printf("deployment: %d host%s x %d rank%s, %s; %d instance%s of TP=%d PP=%d EP=%d\n",
           d->hosts, d->hosts > 1 ? "s" : "", d->ranks_per_host, d->ranks_per_host > 1 ? "s" : "",
           d->gpu ? "GPU workers" : d->direct ? "host memory, direct (pools read in place)"
                                              : "host memory, staged",
           d->hosts * d->ranks_per_host / inst, d->hosts * d->ranks_per_host / inst > 1 ? "s" : "",
           d->layout.tp, d->layout.pp, d->layout.ep);
    printf("links: disk %.2f GB/s per host, copy %.2f, host copy %.2f", L->disk_gbps, L->copy_gbps,
           L->host_copy_gbps);
    if (d->hosts > 1) printf(", between hosts %.2f GB/s per host (%.0f us per hop)", L->inter_gbps, L->inter_latency_us);
    if (d->gpu) printf(", h2d %.1f, intra %.1f, d2d %.0f GB/s per GPU", L->h2d_gbps, L->intra_gbps, L->d2d_gbps);
    printf(", %.0f us per bucket, %.1f ms per update", L->bucket_us, L->update_ms);
    if (d->cores > 0 && !d->gpu)
        printf(", %d cores per %s", d->cores, d->one_machine ? "machine (hosts share it)" : "host");
    printf("\n");
    printf("plan: shares of up to %s per rank; %zu %s of up to %s (largest %s)\n",
           gib(r->share_max, a, sizeof(a)), r->nbuckets, d->direct ? "windows" : "buckets",
           gib(r->bucket_size, b, sizeof(b)), gib(r->largest_bucket, c, sizeof(c)));
    printf("registration (each host reads its ranks' shares from disk): %.2f s\n\n", r->disk_s);
    printf("  %-34s %18s %18s\n", "", "full broadcast", "need-routed");
    const ckpt_cost_way_t *f = &r->full, *n = &r->routed;
    printf("  %-34s %18s %18s\n", "bytes into the busiest host", gib(f->host_in_max, a, sizeof(a)),
           gib(n->host_in_max, b, sizeof(b)));
    printf("  %-34s %18s %18s\n", "bytes out of the busiest host", gib(f->host_out_max, a, sizeof(a)),
           gib(n->host_out_max, b, sizeof(b)));
    printf("  %-34s %18s %18s\n", "bytes over all inter-host links", gib(f->link_bytes, a, sizeof(a)),
           gib(n->link_bytes, b, sizeof(b)));
    printf("  %-34s %18s %18s\n", "bytes the busiest worker copies", gib(f->worker_max, a, sizeof(a)),
           gib(n->worker_max, b, sizeof(b)));
    printf("  %-34s %16.3f s %16.3f s\n", d->gpu ? "stage (H2D), busiest owner" : "stage (owner's copy)",
           f->stage_s, n->stage_s);
    printf("  %-34s %16.3f s %16.3f s\n", "broadcast / transfer", f->bcast_s, n->bcast_s);
    printf("  %-34s %16.3f s %16.3f s\n", "reload (workers' copies)", f->reload_s, n->reload_s);
    printf("  %-34s %16.3f s %16.3f s\n", "fixed costs (buckets, update)", f->overhead_s, n->overhead_s);
    if (d->cores > 0 && !d->gpu)
        printf("  %-34s %16.3f s %16.3f s\n", "core time / cores", f->cpu_s, n->cpu_s);
    printf("  %-34s %16.3f s %16.3f s\n", "predicted update", f->total_s, n->total_s);
    printf("  %-34s %18s %18s\n", "bound by", f->bound, n->bound);
    if (d->hosts > 1 && d->hosts <= 16) {
        printf("\n  bytes each host receives:");
        for (int h = 0; h < d->hosts; h++)
            printf(" h%d %s/%s", h, gib(r->host_in_full[h], a, sizeof(a)),
                   gib(r->host_in_routed[h], b, sizeof(b)));
        printf(" (full/routed)\n");
    }
    if (inst > 1) {
        printf("\n  bytes each worker of an instance needs:");
        for (int w = 0; w < inst && w < 16; w++) printf(" w%d %s", w, gib(r->worker_need[w], a, sizeof(a)));
        printf("%s\n", inst > 16 ? " ..." : "");
    }
}

static void way_json(const char *name, const ckpt_cost_way_t *w, int last)
{
    printf("\"%s\":{\"stage_s\":%.6f,\"bcast_s\":%.6f,\"reload_s\":%.6f,\"overhead_s\":%.6f,"
           "\"cpu_s\":%.6f,\"total_s\":%.6f,\"bound\":\"%s\",\"host_in_max\":%llu,\"host_out_max\":%llu,"
           "\"link_bytes\":%llu,\"worker_max\":%llu}%s",
           name, w->stage_s, w->bcast_s, w->reload_s, w->overhead_s, w->cpu_s, w->total_s, w->bound,
           (unsigned long long)w->host_in_max, (unsigned long long)w->host_out_max,
           (unsigned long long)w->link_bytes, (unsigned long long)w->worker_max, last ? "" : ",");
}

static void print_json(const ckpt_cost_result_t *r)
{
    printf("{\"ntensors\":%zu,\"total_bytes\":%llu,\"bucket_size\":%llu,\"nbuckets\":%zu,"
           "\"share_max\":%llu,\"disk_s\":%.6f,",
           r->ntensors, (unsigned long long)r->total_bytes, (unsigned long long)r->bucket_size,
           r->nbuckets, (unsigned long long)r->share_max, r->disk_s);
    way_json("full", &r->full, 0);
    way_json("routed", &r->routed, 1);
    printf("}\n");
}

int cmd_plan(int argc, char **argv)
{
    enum { O_HOSTS = 256, O_RPH, O_TP, O_PP, O_EP, O_GPU, O_DIRECT, O_BUCKET, O_DISK, O_COPY,
           O_HOSTCOPY, O_INTER, O_LAT, O_H2D, O_INTRA, O_D2D, O_BUS, O_UPD, O_CORES, O_ONE,
           O_TCP, O_JSON, O_HELP };
    static const struct option opts[] = {
        {"hosts", 1, 0, O_HOSTS}, {"ranks-per-host", 1, 0, O_RPH}, {"tp", 1, 0, O_TP},
        {"pp", 1, 0, O_PP}, {"ep", 1, 0, O_EP}, {"gpu", 0, 0, O_GPU}, {"direct", 1, 0, O_DIRECT},
        {"bucket-max", 1, 0, O_BUCKET}, {"disk", 1, 0, O_DISK}, {"copy", 1, 0, O_COPY},
        {"host-copy", 1, 0, O_HOSTCOPY}, {"inter", 1, 0, O_INTER}, {"latency-us", 1, 0, O_LAT},
        {"h2d", 1, 0, O_H2D}, {"intra", 1, 0, O_INTRA}, {"d2d", 1, 0, O_D2D},
        {"bucket-us", 1, 0, O_BUS}, {"update-ms", 1, 0, O_UPD}, {"cores", 1, 0, O_CORES},
        {"one-machine", 0, 0, O_ONE}, {"tcp-core", 1, 0, O_TCP}, {"json", 0, 0, O_JSON},
        {"help", 0, 0, O_HELP}, {0, 0, 0, 0}};
    ckpt_cost_deploy_t d = {.hosts = 1, .ranks_per_host = 1,
                            .layout = {.tp = 1, .pp = 1, .ep = 1}, .bucket_max = 256ull << 20};
    ckpt_cost_links_t L = {.disk_gbps = 2, .copy_gbps = 10, .inter_gbps = 12.5,
                           .inter_latency_us = 20, .h2d_gbps = 50, .intra_gbps = 150,
                           .d2d_gbps = 1500, .bucket_us = 1000, .update_ms = 12};
    int direct = -1, json = 0, c, bad = 0;
    optind = 1;
    while (!bad && (c = getopt_long(argc, argv, "h", opts, NULL)) != -1) {
        switch (c) {
        case O_HOSTS: bad = parse_int("--hosts", optarg, &d.hosts); break;
        case O_RPH: bad = parse_int("--ranks-per-host", optarg, &d.ranks_per_host); break;
        case O_TP: bad = parse_int("--tp", optarg, &d.layout.tp); break;
        case O_PP: bad = parse_int("--pp", optarg, &d.layout.pp); break;
        case O_EP: bad = parse_int("--ep", optarg, &d.layout.ep); break;
        case O_GPU: d.gpu = 1; break;
        case O_DIRECT:
            if (strcmp(optarg, "on") && strcmp(optarg, "off")) {
                fprintf(stderr, "ckpt-engine plan: --direct is on or off, not '%s'\n", optarg);
                bad = -1;
            }
            direct = strcmp(optarg, "on") == 0;
            break;
        case O_BUCKET:
            if (ckpt_parse_size(optarg, &d.bucket_max) < 0 || d.bucket_max == 0) {
                fprintf(stderr, "ckpt-engine plan: --bucket-max: %s\n",
                        d.bucket_max ? ckpt_last_error() : "must be > 0");
                bad = -1;
            }
            break;
        case O_DISK: bad = parse_double("--disk", optarg, &L.disk_gbps); break;
        case O_COPY: bad = parse_double("--copy", optarg, &L.copy_gbps); break;
        case O_HOSTCOPY: bad = parse_double("--host-copy", optarg, &L.host_copy_gbps); break;
        case O_INTER: bad = parse_double("--inter", optarg, &L.inter_gbps); break;
        case O_LAT: bad = parse_double("--latency-us", optarg, &L.inter_latency_us); break;
        case O_H2D: bad = parse_double("--h2d", optarg, &L.h2d_gbps); break;
        case O_INTRA: bad = parse_double("--intra", optarg, &L.intra_gbps); break;
        case O_D2D: bad = parse_double("--d2d", optarg, &L.d2d_gbps); break;
        case O_BUS: bad = parse_double("--bucket-us", optarg, &L.bucket_us); break;
        case O_UPD: bad = parse_double("--update-ms", optarg, &L.update_ms); break;
        case O_CORES: bad = parse_int("--cores", optarg, &d.cores); break;
        case O_ONE: d.one_machine = 1; break;
        case O_TCP: bad = parse_double("--tcp-core", optarg, &L.tcp_core_gbps); break;
        case O_JSON: json = 1; break;
        case 'h': case O_HELP: usage(stdout); return 0;
        default: usage(stderr); return 2;
        }
    }
    if (bad) return 2;
    if (optind != argc - 1) {
        fprintf(stderr, "ckpt-engine plan: give one MODEL (a checkpoint or bench/models/*.json)\n");
        usage(stderr);
        return 2;
    }
    if (L.host_copy_gbps == 0) L.host_copy_gbps = 2 * L.copy_gbps;
    d.bucket_max = ckpt_aligned_size(d.bucket_max); /* as the engine rounds it */
    int can_direct = d.hosts == 1 && !d.gpu;
    if (direct == 1 && !can_direct) {
        fprintf(stderr, "ckpt-engine plan: --direct on is for one host without --gpu\n");
        return 2;
    }
    d.direct = direct == -1 ? can_direct : direct;
    plan_input_t in;
    char err[512];
    if (plan_input_load(argv[optind], &in, err, sizeof(err)) < 0) {
        fprintf(stderr, "ckpt-engine plan: %s\n", err);
        return 1;
    }
    d.layout.kv_heads = in.kv_heads;
    ckpt_layout_t scanned = d.layout;
    ckpt__layout_scan(in.metas, in.count, &scanned);
    d.layout.num_layers = in.num_layers ? in.num_layers : scanned.num_layers;
    d.layout.num_experts = in.num_experts ? in.num_experts : scanned.num_experts;
    ckpt_cost_result_t r;
    if (ckpt__cost_predict(in.metas, in.count, &d, &L, &r) < 0) {
        fprintf(stderr, "ckpt-engine plan: %s\n", ckpt_last_error());
        plan_input_free(&in);
        return 1;
    }
    if (json) print_json(&r);
    else print_text(&in, &d, &L, &r);
    ckpt__cost_free(&r);
    plan_input_free(&in);
    return 0;
}
