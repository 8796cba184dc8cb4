/* The update cost model (see cost.h). */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "plan/bucket.h"
#include "plan/cost.h"
#include "plan/share.h"

#define MAX_PARTS 64 /* parts tracked exactly per host; more are counted as distinct */

typedef struct model {
    const ckpt_cost_deploy_t *d;
    const ckpt_cost_links_t *L;
    int nranks, inst;
    ckpt_bucket_plan_t plan;
    ckpt_need_t *needs; /* plan tensor i, instance position w: needs[i * inst + w] */
    int32_t *owners;
    uint64_t *loads;
} model_t;

static double secs(uint64_t bytes, double gbps) { return gbps > 0 ? (double)bytes / gbps / 1e9 : 0; }

static int position(const model_t *m, int host, int r)
{
    return (host * m->d->ranks_per_host + r) % m->inst;
}

/* Bytes of tensor i that the workers of `host` need together; *mask collects the parts
 * (bit k: part k), *whole is set when one of them needs the whole tensor. */
static uint64_t host_union(const model_t *m, size_t i, int host, uint64_t *mask, int *whole)
{
    const ckpt_tensor_meta_t *t = &m->plan.tensors[i];
    uint64_t part_bytes = 0, many = 0;
    for (int r = 0; r < m->d->ranks_per_host; r++) {
        const ckpt_need_t *n = &m->needs[i * (size_t)m->inst + (size_t)position(m, host, r)];
        if (!n->needed) continue;
        if (n->dim < 0) {
            *whole = 1;
            continue;
        }
        part_bytes = ckpt__need_bytes(t, n);
        if (n->index < MAX_PARTS) *mask |= 1ull << n->index;
        else many++;
    }
    if (*whole) return t->nbytes;
    uint64_t bytes = part_bytes * ((uint64_t)__builtin_popcountll(*mask) + many);
    return bytes < t->nbytes ? bytes : t->nbytes;
}

static uint64_t mask_bytes(const ckpt_tensor_meta_t *t, const ckpt_need_t *any, uint64_t mask,
                           int whole)
{
    if (whole) return t->nbytes;
    uint64_t b = ckpt__need_bytes(t, any) * (uint64_t)__builtin_popcountll(mask);
    return b < t->nbytes ? b : t->nbytes;
}

/* Per host bytes between hosts, both ways; per worker need. */
static void count_bytes(model_t *m, ckpt_cost_result_t *r, uint64_t *out_routed,
                        uint64_t *copy_routed, uint64_t *owned)
{
    int H = m->d->hosts, rph = m->d->ranks_per_host;
    for (size_t i = 0; i < m->plan.ntensors; i++) {
        const ckpt_tensor_meta_t *t = &m->plan.tensors[i];
        int oh = t->owner / rph;
        owned[oh] += t->nbytes;
        uint64_t others = 0;
        int others_whole = 0;
        const ckpt_need_t *any = NULL;
        for (int w = 0; w < m->inst; w++) {
            const ckpt_need_t *n = &m->needs[i * (size_t)m->inst + (size_t)w];
            r->worker_need[w] += ckpt__need_bytes(t, n);
            if (n->needed && n->dim >= 0) any = n;
        }
        for (int h = 0; h < H; h++) {
            uint64_t mask = 0;
            int whole = 0;
            uint64_t u = host_union(m, i, h, &mask, &whole);
            if (h == oh) {
                copy_routed[h] += u; /* the owner stages what its host needs too */
                continue;
            }
            r->host_in_full[h] += t->nbytes;
            r->host_in_routed[h] += u;
            others |= mask;
            others_whole |= whole;
        }
        if (any || others_whole) out_routed[oh] += mask_bytes(t, any, others, others_whole);
    }
}

/* Bytes each position copies out of bucket b, and the stage times of bucket b. */
static void bucket_times(const model_t *m, size_t b, uint64_t *per_worker, double *stage,
                         double *bcast, double *reload)
{
    const ckpt_cost_deploy_t *d = m->d;
    const ckpt_cost_links_t *L = m->L;
    const ckpt_bucket_t *bk = &m->plan.buckets[b];
    memset(per_worker, 0, sizeof(*per_worker) * (size_t)m->inst);
    for (uint32_t k = 0; k < bk->count; k++) {
        size_t i = bk->first + k;
        for (int w = 0; w < m->inst; w++)
            per_worker[w] += ckpt__need_bytes(&m->plan.tensors[i], &m->needs[i * (size_t)m->inst + (size_t)w]);
    }
    uint64_t most = 0, host_most = 0;
    for (int h = 0; h < d->hosts; h++) {
        uint64_t sum = 0;
        for (int r = 0; r < d->ranks_per_host; r++) {
            uint64_t w = per_worker[position(m, h, r)];
            sum += w;
            if (w > most) most = w;
        }
        if (sum > host_most) host_most = sum;
    }
    *stage = d->direct ? 0 : secs(bk->bytes, d->gpu ? L->h2d_gbps : L->copy_gbps);
    *bcast = 0;
    if (d->hosts > 1)
        *bcast = secs(bk->bytes, L->inter_gbps) +
                 L->inter_latency_us * 1e-6 * ceil(log2((double)d->hosts));
    if (d->gpu && d->ranks_per_host > 1 && secs(bk->bytes, L->intra_gbps) > *bcast)
        *bcast = secs(bk->bytes, L->intra_gbps);
    if (d->gpu) {
        *reload = secs(most, L->d2d_gbps);
    } else {
        double one = secs(most, L->copy_gbps), all = secs(host_most, L->host_copy_gbps);
        *reload = one > all ? one : all;
    }
}

static const char *bound_of(double stage, double bcast, double reload, double overhead)
{
    if (overhead >= stage && overhead >= bcast && overhead >= reload) return "fixed costs";
    if (stage >= bcast && stage >= reload) return "stage";
    return bcast >= reload ? "broadcast" : "reload";
}

/* The cores bound: a host's copies and its TCP traffic need core time; hosts that are
 * namespaces of one machine share its cores. Raises w->total_s when that is the bound. */
static void cpu_bound(const model_t *m, ckpt_cost_way_t *w, const uint64_t *copy_bytes,
                      const uint64_t *link_bytes)
{
    const ckpt_cost_deploy_t *d = m->d;
    if (d->gpu || d->cores <= 0) return;
    double busiest = 0, machine = 0;
    for (int h = 0; h < d->hosts; h++) {
        double tcp = m->L->tcp_core_gbps > 0 ? m->L->tcp_core_gbps : m->L->inter_gbps;
        double core_s = secs(copy_bytes[h], m->L->copy_gbps) +
                        (d->hosts > 1 ? secs(link_bytes[h], tcp) : 0);
        busiest = fmax(busiest, core_s);
        machine += core_s;
    }
    w->cpu_s = (d->one_machine ? machine : busiest) / d->cores;
    if (w->cpu_s + w->overhead_s > w->total_s) {
        w->total_s = w->cpu_s + w->overhead_s;
        w->bound = "cores";
    }
}

/* The full broadcast, bucket by bucket through the pipeline. */
static int simulate_full(model_t *m, ckpt_cost_result_t *r, const uint64_t *owned)
{
    const ckpt_cost_deploy_t *d = m->d;
    size_t nb = m->plan.nbuckets;
    uint64_t *per_worker = calloc((size_t)m->inst, sizeof(uint64_t));
    size_t *order = calloc(nb ? nb : 1, sizeof(size_t));
    double *owner_free = calloc((size_t)m->nranks, sizeof(double));
    double *owner_busy = calloc((size_t)m->nranks, sizeof(double));
    uint64_t *host_copy = calloc((size_t)d->hosts, sizeof(uint64_t));
    uint64_t *wire = calloc((size_t)d->hosts, sizeof(uint64_t));
    if (!per_worker || !order || !owner_free || !owner_busy || !host_copy || !wire) {
        free(per_worker), free(order), free(owner_free), free(owner_busy), free(host_copy);
        free(wire);
        return ckpt__error(CKPT_ENOMEM, "cost model: no memory for %zu buckets", nb);
    }
    /* GPU: owners take turns bucket by bucket, so their H2D copies overlap. */
    size_t n = 0;
    if (d->gpu) {
        for (size_t round = 0; n < nb; round++)
            for (int o = 0; o < m->nranks; o++) {
                size_t seen = 0;
                for (size_t b = 0; b < nb; b++)
                    if (m->plan.buckets[b].owner == o && seen++ == round) order[n++] = b;
            }
    } else {
        for (; n < nb; n++) order[n] = n;
    }
    double p_end = 0, r_prev = 0, r_prev2 = 0, c_prev = 0, stage_sum = 0, bcast_sum = 0,
           reload_sum = 0;
    for (size_t k = 0; k < nb; k++) {
        size_t b = order[k];
        double stage, bcast, reload;
        bucket_times(m, b, per_worker, &stage, &bcast, &reload);
        int o = m->plan.buckets[b].owner;
        stage_sum += stage, bcast_sum += bcast, reload_sum += reload;
        owner_busy[o] += stage;
        double r_end;
        if (d->direct) {
            r_end = r_prev + reload; /* one window at a time, read in place */
        } else if (d->gpu) {
            /* one staging buffer per owner, free once its last bucket is broadcast; the
             * receiving buffer b % 2 is free once bucket b - 2 is reloaded */
            double s_end = owner_free[o] + stage;
            double c_start = fmax(fmax(s_end, c_prev), r_prev2);
            c_prev = c_start + bcast;
            owner_free[o] = c_prev;
            r_end = fmax(c_prev, r_prev) + reload;
        } else {
            /* host memory: stage and broadcast run in turn in the engine's loop */
            p_end = fmax(p_end, r_prev2) + stage + bcast;
            r_end = fmax(p_end, r_prev) + reload;
        }
        r_prev2 = r_prev;
        r_prev = r_end;
        if (!d->direct) host_copy[o / d->ranks_per_host] += m->plan.buckets[b].bytes;
    }
    ckpt_cost_way_t *f = &r->full;
    f->overhead_s = (double)nb * m->L->bucket_us * 1e-6 + m->L->update_ms * 1e-3;
    f->stage_s = stage_sum;
    if (d->gpu) {
        f->stage_s = 0;
        for (int o = 0; o < m->nranks; o++) f->stage_s = fmax(f->stage_s, owner_busy[o]);
    }
    f->bcast_s = bcast_sum;
    f->reload_s = reload_sum;
    f->total_s = r_prev + f->overhead_s;
    f->bound = bound_of(f->stage_s, f->bcast_s, f->reload_s, f->overhead_s);
    if (!d->gpu) {
        /* the copies of a host share its memory bandwidth: staging, the workers' copies,
         * and what arrives from other hosts (the kernel copies it in) */
        for (int h = 0; h < d->hosts; h++) {
            uint64_t in = r->host_in_full[h];
            /* two hosts send each other what they own; more relay what they receive */
            uint64_t out = d->hosts == 2 ? owned[h] : in;
            for (int q = 0; q < d->ranks_per_host; q++) host_copy[h] += r->worker_need[position(m, h, q)];
            double t = secs(host_copy[h] + in, m->L->host_copy_gbps) + f->overhead_s;
            if (t > f->total_s) {
                f->total_s = t;
                f->bound = "host memory bandwidth";
            }
            wire[h] = in + out;
        }
        cpu_bound(m, f, host_copy, wire);
    }
    free(per_worker), free(order), free(owner_free), free(owner_busy), free(host_copy);
    free(wire);
    return CKPT_OK;
}

/* Need-routed: every owner sends at once, each host receives what its workers need. */
static void predict_routed(model_t *m, ckpt_cost_result_t *r, const uint64_t *out_routed,
                           const uint64_t *copy_routed)
{
    const ckpt_cost_deploy_t *d = m->d;
    const ckpt_cost_links_t *L = m->L;
    ckpt_cost_way_t *w = &r->routed;
    size_t nb = m->plan.nbuckets ? m->plan.nbuckets : 1;
    w->overhead_s = (double)m->plan.nbuckets * L->bucket_us * 1e-6 + L->update_ms * 1e-3;
    /* an owner stages what any worker needs of its share: at most its share */
    uint64_t staged_max = 0;
    for (int o = 0; o < m->nranks; o++)
        if (m->loads[o] > staged_max) staged_max = m->loads[o];
    w->stage_s = d->direct ? 0 : secs(staged_max, d->gpu ? L->h2d_gbps : L->copy_gbps);
    double link = 0;
    for (int h = 0; h < d->hosts; h++) {
        uint64_t in = r->host_in_routed[h], out = out_routed[h];
        if (in > w->host_in_max) w->host_in_max = in;
        if (out > w->host_out_max) w->host_out_max = out;
        w->link_bytes += in;
        link = fmax(link, secs(in > out ? in : out, L->inter_gbps));
    }
    if (d->hosts > 1) link += L->inter_latency_us * 1e-6 * ceil(log2((double)d->hosts));
    w->bcast_s = d->hosts > 1 ? link : 0;
    uint64_t most = 0;
    for (int q = 0; q < m->inst; q++)
        if (r->worker_need[q] > most) most = r->worker_need[q];
    w->worker_max = most;
    if (d->gpu && d->ranks_per_host > 1) w->bcast_s = fmax(w->bcast_s, secs(most, L->intra_gbps));
    w->reload_s = secs(most, d->gpu ? L->d2d_gbps : L->copy_gbps);
    double host_s = 0;
    if (!d->gpu)
        for (int h = 0; h < d->hosts; h++) {
            uint64_t bytes = r->host_in_routed[h] + (d->direct ? 0 : copy_routed[h]);
            for (int q = 0; q < d->ranks_per_host; q++) bytes += r->worker_need[position(m, h, q)];
            host_s = fmax(host_s, secs(bytes, L->host_copy_gbps));
        }
    w->reload_s = fmax(w->reload_s, host_s);
    double slowest = fmax(fmax(w->stage_s, w->bcast_s), w->reload_s);
    /* fill and drain: one bucket's worth of the other stages */
    double fill = (w->stage_s + w->bcast_s + w->reload_s - slowest) / (double)nb;
    w->total_s = slowest + fill + w->overhead_s;
    w->bound = bound_of(w->stage_s, w->bcast_s, w->reload_s, w->overhead_s);
    uint64_t *copy = calloc((size_t)d->hosts, sizeof(uint64_t));
    uint64_t *wire = calloc((size_t)d->hosts, sizeof(uint64_t));
    if (copy && wire) {
        for (int h = 0; h < d->hosts; h++) {
            copy[h] = d->direct ? 0 : copy_routed[h];
            for (int q = 0; q < d->ranks_per_host; q++) copy[h] += r->worker_need[position(m, h, q)];
            wire[h] = r->host_in_routed[h] + out_routed[h];
        }
        cpu_bound(m, w, copy, wire);
    }
    free(copy), free(wire);
}

static int check_links(const ckpt_cost_deploy_t *d, const ckpt_cost_links_t *L)
{
    struct { const char *name; double v; int needed; } need[] = {
        {"copy (one host-memory copy stream)", L->copy_gbps, 1},
        {"host-copy (all copies of a host)", L->host_copy_gbps, !d->gpu},
        {"inter (between hosts)", L->inter_gbps, d->hosts > 1},
        {"h2d", L->h2d_gbps, d->gpu},
        {"intra (between the GPUs of a host)", L->intra_gbps, d->gpu && d->ranks_per_host > 1},
        {"d2d", L->d2d_gbps, d->gpu},
    };
    for (size_t i = 0; i < sizeof(need) / sizeof(need[0]); i++)
        if (need[i].needed && !(need[i].v > 0))
            return ckpt__error(CKPT_EINVAL, "link speed %s is %g GB/s: give a positive figure",
                               need[i].name, need[i].v);
    return CKPT_OK;
}

int ckpt__cost_predict(const ckpt_tensor_meta_t *metas, size_t count,
                       const ckpt_cost_deploy_t *d, const ckpt_cost_links_t *L,
                       ckpt_cost_result_t *out)
{
    memset(out, 0, sizeof(*out));
    if (d->hosts < 1 || d->ranks_per_host < 1)
        return ckpt__error(CKPT_EINVAL, "deployment of %d hosts x %d ranks: both must be >= 1",
                           d->hosts, d->ranks_per_host);
    if (count == 0) return ckpt__error(CKPT_EINVAL, "the checkpoint has no tensors");
    if (d->direct && (d->hosts > 1 || d->gpu))
        return ckpt__error(CKPT_EINVAL, "direct updates are for one host without GPU");
    model_t m = {.d = d, .L = L, .nranks = d->hosts * d->ranks_per_host,
                 .inst = d->layout.tp * d->layout.pp};
    ckpt_need_t probe;
    int rc = ckpt__layout_need(&d->layout, 0, &metas[0], &probe);
    if (rc < 0) return rc;
    if (m.nranks % m.inst != 0)
        return ckpt__error(CKPT_EINVAL,
                           "%d ranks do not make whole instances of tp*pp = %d workers",
                           m.nranks, m.inst);
    if ((rc = check_links(d, L)) < 0) return rc;
    ckpt_tensor_meta_t *all = malloc(count * sizeof(*all));
    m.owners = malloc(count * sizeof(int32_t));
    m.loads = calloc((size_t)m.nranks, sizeof(uint64_t));
    out->host_in_full = calloc((size_t)d->hosts, sizeof(uint64_t));
    out->host_in_routed = calloc((size_t)d->hosts, sizeof(uint64_t));
    out->worker_need = calloc((size_t)m.inst, sizeof(uint64_t));
    uint64_t *out_routed = calloc((size_t)d->hosts, sizeof(uint64_t));
    uint64_t *copy_routed = calloc((size_t)d->hosts, sizeof(uint64_t));
    uint64_t *owned = calloc((size_t)d->hosts, sizeof(uint64_t));
    rc = CKPT_OK;
    if (!all || !m.owners || !m.loads || !out->host_in_full || !out->host_in_routed ||
        !out->worker_need || !out_routed || !copy_routed || !owned)
        rc = ckpt__error(CKPT_ENOMEM, "cost model: no memory for %zu tensors", count);
    if (rc == CKPT_OK) rc = ckpt__plan_shares(metas, count, m.nranks, m.owners, m.loads);
    uint64_t total = 0;
    for (size_t i = 0; rc == CKPT_OK && i < count; i++) {
        all[i] = metas[i];
        all[i].owner = m.owners[i];
        total += metas[i].nbytes;
    }
    if (rc == CKPT_OK) {
        uint64_t limit = d->direct ? d->bucket_max : ckpt__plan_pipeline_limit(total, d->bucket_max);
        uint64_t largest = ckpt__plan_min_bucket(all, count);
        if (limit < largest) limit = largest;
        rc = ckpt__plan_buckets(all, NULL, count, m.nranks, limit, &m.plan);
    }
    if (rc == CKPT_OK) {
        m.needs = malloc(m.plan.ntensors * (size_t)m.inst * sizeof(ckpt_need_t));
        if (!m.needs) rc = ckpt__error(CKPT_ENOMEM, "cost model: no memory for the needs");
    }
    for (size_t i = 0; rc == CKPT_OK && i < m.plan.ntensors; i++)
        for (int w = 0; rc == CKPT_OK && w < m.inst; w++)
            rc = ckpt__layout_need(&d->layout, w, &m.plan.tensors[i], &m.needs[i * (size_t)m.inst + (size_t)w]);
    if (rc == CKPT_OK) {
        out->ntensors = count;
        out->total_bytes = total;
        out->bucket_size = m.plan.bucket_size;
        out->nbuckets = m.plan.nbuckets;
        out->largest_bucket = m.plan.largest_bucket;
        for (int h = 0; h < d->hosts; h++) {
            uint64_t host = 0;
            for (int q = 0; q < d->ranks_per_host; q++) {
                uint64_t l = m.loads[h * d->ranks_per_host + q];
                host += l;
                if (l > out->share_max) out->share_max = l;
            }
            out->disk_s = fmax(out->disk_s, secs(host, L->disk_gbps));
        }
        count_bytes(&m, out, out_routed, copy_routed, owned);
        rc = simulate_full(&m, out, owned);
    }
    if (rc == CKPT_OK) {
        ckpt_cost_way_t *f = &out->full;
        for (int h = 0; h < d->hosts; h++) {
            f->link_bytes += out->host_in_full[h];
            if (out->host_in_full[h] > f->host_in_max) f->host_in_max = out->host_in_full[h];
        }
        f->host_out_max = d->hosts > 1 ? f->host_in_max : 0; /* a pipelined broadcast relays */
        for (int q = 0; q < m.inst; q++)
            if (out->worker_need[q] > f->worker_max) f->worker_max = out->worker_need[q];
        predict_routed(&m, out, out_routed, copy_routed);
    }
    free(all), free(m.owners), free(m.loads), free(m.needs), free(out_routed), free(copy_routed);
    free(owned);
    ckpt__plan_free(&m.plan);
    if (rc < 0) ckpt__cost_free(out);
    return rc;
}

void ckpt__cost_free(ckpt_cost_result_t *r)
{
    free(r->host_in_full), free(r->host_in_routed), free(r->worker_need);
    r->host_in_full = r->host_in_routed = r->worker_need = NULL;
}
