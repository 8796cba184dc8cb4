/* The cost model behind `ckpt-engine plan`: given every tensor of a checkpoint, a
 * deployment and the speed of its links, it plans the update the way the engine does
 * (shares: plan/share.c, buckets: plan/bucket.c) and predicts how long each stage takes
 * and the whole update, for two ways of moving the bytes:
 *  - full:   every byte reaches every host (broadcast; what the engine does today and what
 *            the reference system does), each worker copies what it needs out of it;
 *  - routed: each host receives only the bytes its workers need (layout.h), every owner
 *            sends at once (all links busy), each worker copies its need.
 * A bucket's way through the pipeline is simulated stage by stage (stage: owner's copy
 * into the bucket, or H2D on GPUs; bcast: between hosts, and between GPUs of a host;
 * reload: the workers' copies), with the engine's two buffers; a host's memory bandwidth
 * shared by its copies bounds the result from below. */
#ifndef CKPT_PLAN_COST_H
#define CKPT_PLAN_COST_H

#include "plan/layout.h"

typedef struct ckpt_cost_links {
    double disk_gbps;        /* per host: reading checkpoint files (registration) */
    double copy_gbps;        /* one copy stream in host memory (memcpy floor) */
    double host_copy_gbps;   /* all copy streams of one host together */
    double inter_gbps;       /* per host, between hosts (the MPI_Bcast / NCCL floor) */
    double inter_latency_us; /* per hop between hosts */
    double tcp_core_gbps;    /* what one core carries over TCP (--cores): 0 = inter_gbps,
                              * right where the link is as fast as TCP on a core; a slower
                              * link (shaped, or a NIC slower than a core) costs less core
                              * time per byte than 1/inter_gbps */
    double h2d_gbps;         /* gpu: per GPU, pinned host memory to device */
    double intra_gbps;       /* gpu: per GPU, between the GPUs of a host (NVLink) */
    double d2d_gbps;         /* gpu: per GPU, a worker's copy inside device memory */
    double bucket_us;        /* fixed cost per bucket: worker round trip, agreement */
    double update_ms;        /* fixed cost per update: metas, plan, BEGIN, FINISH with the
                              * workers' post-hook */
} ckpt_cost_links_t;

typedef struct ckpt_cost_deploy {
    int hosts, ranks_per_host; /* one engine rank and one worker per rank (per GPU) */
    ckpt_layout_t layout;      /* instances of tp*pp consecutive ranks */
    int gpu;                   /* device path: H2D, device broadcast, device reload */
    int direct;                /* one host without GPU: workers read the pools in place */
    uint64_t bucket_max;
    int cores;                 /* host memory: cores per host that copy and move bytes over
                                * TCP (0: not a limit). A core copies at copy_gbps; a byte
                                * sent or received between hosts costs a core
                                * 1/tcp_core_gbps (TCP: the kernel copies it; the unshaped
                                * broadcast floor keeps one core busy on each side) */
    int one_machine;           /* every host is a namespace of one machine: they share its
                                * `cores` (the multi-host tests) */
} ckpt_cost_deploy_t;

typedef struct ckpt_cost_way {
    double stage_s, bcast_s, reload_s; /* busy time of each stage (the busiest host) */
    double overhead_s;                 /* nbuckets x bucket_us + update_ms */
    double cpu_s;                      /* cores: busiest host's core-seconds / cores */
    double total_s;                    /* predicted update time */
    const char *bound;                 /* what bounds total_s */
    uint64_t host_in_max;              /* bytes the busiest host receives between hosts */
    uint64_t host_out_max;             /* bytes the busiest host sends between hosts */
    uint64_t link_bytes;               /* bytes over all inter-host links */
    uint64_t worker_max;               /* bytes the busiest worker copies */
} ckpt_cost_way_t;

typedef struct ckpt_cost_result {
    size_t ntensors;
    uint64_t total_bytes;
    uint64_t bucket_size;
    size_t nbuckets;
    uint64_t largest_bucket;
    uint64_t share_max;  /* bytes of the most loaded rank (what it reads at registration) */
    double disk_s;       /* registration: each host reads its ranks' shares */
    ckpt_cost_way_t full, routed;
    uint64_t *host_in_full, *host_in_routed; /* per host */
    uint64_t *worker_need;                   /* per worker of an instance (tp*pp) */
} ckpt_cost_result_t;

/* Plans and predicts; CKPT_EINVAL names a deployment or link figure that cannot be
 * used (hosts*ranks_per_host not a multiple of tp*pp, a needed speed that is 0). */
int ckpt__cost_predict(const ckpt_tensor_meta_t *metas, size_t count,
                       const ckpt_cost_deploy_t *deploy, const ckpt_cost_links_t *links,
                       ckpt_cost_result_t *out);
void ckpt__cost_free(ckpt_cost_result_t *result);

#endif
