/* The store: options, the list of registered checkpoints, queries and unregistration.
 * Registration paths live in load.c (files) and register_mem.c (buffers, fds). */
#include <stdlib.h>
#include <string.h>

#include "store/store_int.h"

int ckpt_store_create(const ckpt_store_options_t *opts, ckpt_store_t **store_out)
{
    static const ckpt_store_options_t defaults = CKPT_STORE_OPTIONS_INIT;
    ckpt_store_t *s;

    if (!store_out) return ckpt__error(CKPT_EINVAL, "store create: NULL store_out");
    if (opts && ckpt__check_field_mask(opts->field_mask, (CKPT_STORE_OPT_POOL_ALLOCATOR << 1) - 1,
                                       "ckpt_store_options_t") < 0)
        return CKPT_EINVAL;
    s = ckpt__calloc(1, sizeof(*s));
    if (!s) return ckpt__error(CKPT_ENOMEM, "store create: out of memory");
    s->opts = defaults;
    if (opts) {
        uint64_t m = opts->field_mask;
        if (m & CKPT_STORE_OPT_IO_DEPTH) s->opts.io_depth = opts->io_depth;
        if (m & CKPT_STORE_OPT_IO_THREADS) s->opts.io_threads = opts->io_threads;
        if (m & CKPT_STORE_OPT_USE_DIRECT) s->opts.use_direct = opts->use_direct;
        if (m & CKPT_STORE_OPT_PIN_CUDA) s->opts.pin_cuda = opts->pin_cuda;
        if (m & CKPT_STORE_OPT_CHUNK_BYTES) s->opts.chunk_bytes = opts->chunk_bytes;
        if (m & CKPT_STORE_OPT_REUSE_POOL) s->opts.reuse_pool = opts->reuse_pool;
        if (m & CKPT_STORE_OPT_USE_URING) s->opts.use_uring = opts->use_uring;
        if (m & CKPT_STORE_OPT_MAP_TMPFS) s->opts.map_tmpfs = opts->map_tmpfs;
        if ((m & CKPT_STORE_OPT_POOL_ALLOCATOR) && opts->pool_allocator.alloc &&
            opts->pool_allocator.release)
            s->opts.pool_allocator = opts->pool_allocator;
    }
    /* Clamp rather than fail: these are performance knobs, not correctness. */
    s->opts.io_depth = CKPT_MIN(CKPT_MAX(s->opts.io_depth, 1), 4096);
    s->opts.io_threads = CKPT_MIN(CKPT_MAX(s->opts.io_threads, 1), 256);
    if (s->opts.chunk_bytes < CKPT__DIO_ALIGN) s->opts.chunk_bytes = CKPT__DIO_ALIGN;
    if (s->opts.chunk_bytes > (1u << 30)) s->opts.chunk_bytes = 1u << 30;
    s->opts.chunk_bytes = CKPT_ALIGN_UP(s->opts.chunk_bytes, (uint64_t)CKPT__DIO_ALIGN);
    s->opts.field_mask = 0;
    *store_out = s;
    return CKPT_OK;
}

static void ckpt_free(ckpt_store_t *store, ckpt__ckpt_t *c)
{
    if (!c) return;
    for (size_t i = 0; i < c->nregions; i++) ckpt__store_pool_release(store, &c->rg[i]);
    ckpt__free(c->rg);
    ckpt__free(c->regions);
    ckpt__free(c->metas);
    ckpt__free(c->data);
    ckpt__free(c->name);
    ckpt__free(c);
}

void ckpt_store_destroy(ckpt_store_t *store)
{
    if (!store) return;
    for (size_t i = 0; i < store->count; i++) ckpt_free(store, store->ckpts[i]);
    ckpt__free(store->ckpts);
    if (store->has_spare) {
        if (store->spare.pub.pinned) ckpt__cuda_unpin(store->spare.pub.base);
        ckpt__region_release(&store->spare);
    }
    ckpt__free(store);
}

int ckpt__store_pool_alloc(ckpt_store_t *store, uint64_t size, const char *label,
                           ckpt__region_t *out)
{
    uint64_t want = CKPT_ALIGN_UP(CKPT_MAX(size, 1), (uint64_t)CKPT__HUGE_PAGE);
    if (store->has_spare) {
        /* Reuse only when it fits without wasting more than it holds. */
        if (store->spare.map_len >= want && store->spare.map_len <= 2 * want) {
            *out = store->spare;
            out->pub.offset = 0;
            out->pub.size = want; /* the layout's size: offsets beyond belong to no one */
            store->has_spare = 0;
            ckpt_debug("%s: reusing a %llu-byte pool region", label,
                       (unsigned long long)out->pub.size);
            return CKPT_OK;
        }
        if (store->spare.pub.pinned) ckpt__cuda_unpin(store->spare.pub.base);
        ckpt__region_release(&store->spare);
        store->has_spare = 0;
    }
    int rc = ckpt__region_alloc(want, label, &store->opts.pool_allocator, out);
    if (rc) return rc;
    if (store->opts.pin_cuda) out->pub.pinned = ckpt__cuda_pin(out->pub.base, out->pub.size, 0);
    return CKPT_OK;
}

void ckpt__store_pool_release(ckpt_store_t *store, ckpt__region_t *r)
{
    if (!r->pub.base && r->pub.fd < 0) return;
    if (store->opts.reuse_pool && r->memfd && !store->has_spare) {
        store->spare = *r;
        store->has_spare = 1;
    } else {
        if (r->pub.pinned) ckpt__cuda_unpin(r->pub.base);
        ckpt__region_release(r);
    }
    r->pub.base = NULL;
    r->pub.fd = -1;
    r->map_len = 0;
}

static ckpt__ckpt_t *find(ckpt_store_t *store, const char *name, size_t *index_out)
{
    if (!store || !name) return NULL;
    for (size_t i = 0; i < store->count; i++)
        if (strcmp(store->ckpts[i]->name, name) == 0) {
            if (index_out) *index_out = i;
            return store->ckpts[i];
        }
    return NULL;
}

int ckpt__store_check_name(ckpt_store_t *store, const char *name)
{
    if (!store || !name || !name[0] || strlen(name) >= CKPT_NAME_MAX)
        return ckpt__error(CKPT_EINVAL, "register: %s", !store ? "NULL store" : "checkpoint name empty or too long");
    if (find(store, name, NULL))
        return ckpt__error(CKPT_EEXIST, "register '%s': a checkpoint of that name is registered", name);
    return CKPT_OK;
}

static int by_name(const void *a, const void *b, void *ctx)
{
    const ckpt_tensor_meta_t *m = ctx;
    return strncmp(m[*(const size_t *)a].name, m[*(const size_t *)b].name, CKPT_NAME_MAX);
}

int ckpt__store_add(ckpt_store_t *store, const char *name, ckpt_tensor_meta_t *metas,
                    const void **data, size_t count, ckpt__region_t *rg, size_t nregions)
{
    int rc = CKPT_OK;
    size_t *perm = ckpt__malloc(count * sizeof(*perm));
    ckpt__ckpt_t *c = ckpt__calloc(1, sizeof(*c));
    ckpt_tensor_meta_t *sorted = ckpt__malloc(count * sizeof(*sorted));
    const void **sdata = ckpt__malloc(count * sizeof(*sdata));
    ckpt_pool_region_t *pub = ckpt__calloc(nregions, sizeof(*pub));
    char *dup = ckpt__strdup(name);

    if (!perm || !c || !sorted || !sdata || !pub || !dup) {
        rc = ckpt__error(CKPT_ENOMEM, "registering '%s': out of memory", name);
        goto fail;
    }
    if (store->count == store->cap) {
        size_t cap = store->cap ? 2 * store->cap : 8;
        ckpt__ckpt_t **grown = ckpt__realloc(store->ckpts, cap * sizeof(*grown));
        if (!grown) {
            rc = ckpt__error(CKPT_ENOMEM, "registering '%s': out of memory", name);
            goto fail;
        }
        store->ckpts = grown;
        store->cap = cap;
    }
    for (size_t i = 0; i < count; i++) perm[i] = i;
    qsort_r(perm, count, sizeof(*perm), by_name, metas);
    for (size_t i = 0; i < count; i++) {
        sorted[i] = metas[perm[i]];
        sdata[i] = data[perm[i]];
        if (i && strncmp(sorted[i - 1].name, sorted[i].name, CKPT_NAME_MAX) == 0) {
            rc = ckpt__error(CKPT_EINVAL, "registering '%s': tensor '%s' appears twice", name,
                             sorted[i].name);
            goto fail;
        }
        if (sdata[i]) c->local_bytes += sorted[i].nbytes;
        c->total_bytes += sorted[i].nbytes;
    }
    for (size_t i = 0; i < nregions; i++) pub[i] = rg[i].pub;
    c->name = dup;
    c->metas = sorted;
    c->data = sdata;
    c->count = count;
    c->rg = rg;
    c->regions = pub;
    c->nregions = nregions;
    store->ckpts[store->count++] = c;
    ckpt__free(perm);
    ckpt__free(metas);
    ckpt__free(data);
    return CKPT_OK;
fail:
    for (size_t i = 0; i < nregions; i++) ckpt__store_pool_release(store, &rg[i]);
    ckpt__free(rg);
    ckpt__free(perm);
    ckpt__free(c);
    ckpt__free(sorted);
    ckpt__free(sdata);
    ckpt__free(pub);
    ckpt__free(dup);
    ckpt__free(metas);
    ckpt__free(data);
    return rc;
}

int ckpt_store_unregister(ckpt_store_t *store, const char *name)
{
    size_t i;
    ckpt__ckpt_t *c = find(store, name, &i);
    if (!c) return ckpt__error(CKPT_ENOENT, "unregister '%s': no such checkpoint", name ? name : "(null)");
    memmove(&store->ckpts[i], &store->ckpts[i + 1], (store->count - i - 1) * sizeof(*store->ckpts));
    store->count--;
    ckpt_free(store, c);
    return CKPT_OK;
}

int ckpt_store_rename(ckpt_store_t *store, const char *from, const char *to)
{
    ckpt__ckpt_t *c = find(store, from, NULL);
    if (!c) return ckpt__error(CKPT_ENOENT, "rename '%s': no such checkpoint", from ? from : "(null)");
    int rc = ckpt__store_check_name(store, to);
    if (rc) return rc;
    char *dup = ckpt__strdup(to);
    if (!dup) return ckpt__error(CKPT_ENOMEM, "rename '%s': out of memory", from);
    ckpt__free(c->name);
    c->name = dup;
    return CKPT_OK;
}

int ckpt_store_tensors(ckpt_store_t *store, const char *name,
                       const ckpt_tensor_meta_t **metas_out, size_t *count_out)
{
    ckpt__ckpt_t *c = find(store, name, NULL);
    if (!c) return ckpt__error(CKPT_ENOENT, "checkpoint '%s' is not registered", name ? name : "(null)");
    if (metas_out) *metas_out = c->metas;
    if (count_out) *count_out = c->count;
    return CKPT_OK;
}

int ckpt_store_tensor_data(ckpt_store_t *store, const char *name, size_t index,
                           const void **data_out)
{
    ckpt__ckpt_t *c = find(store, name, NULL);
    if (!c) return ckpt__error(CKPT_ENOENT, "checkpoint '%s' is not registered", name ? name : "(null)");
    if (index >= c->count)
        return ckpt__error(CKPT_EINVAL, "checkpoint '%s': tensor index %zu out of %zu", name,
                           index, c->count);
    if (!c->data[index])
        return ckpt__error(CKPT_ENOENT, "checkpoint '%s': tensor '%s' is held by rank %d", name,
                           c->metas[index].name, (int)c->metas[index].owner);
    if (data_out) *data_out = c->data[index];
    return CKPT_OK;
}

int ckpt_store_regions(ckpt_store_t *store, const char *name,
                       const ckpt_pool_region_t **regions_out, size_t *count_out)
{
    ckpt__ckpt_t *c = find(store, name, NULL);
    if (!c) return ckpt__error(CKPT_ENOENT, "checkpoint '%s' is not registered", name ? name : "(null)");
    if (regions_out) *regions_out = c->regions;
    if (count_out) *count_out = c->nregions;
    return CKPT_OK;
}

size_t ckpt_store_count(ckpt_store_t *store) { return store ? store->count : 0; }

int ckpt_store_info(ckpt_store_t *store, size_t index, const char **name_out,
                    uint64_t *local_bytes_out, uint64_t *total_bytes_out, size_t *tensors_out)
{
    if (!store || index >= store->count)
        return ckpt__error(CKPT_ENOENT, "store info: index %zu out of %zu", index, ckpt_store_count(store));
    ckpt__ckpt_t *c = store->ckpts[index];
    if (name_out) *name_out = c->name;
    if (local_bytes_out) *local_bytes_out = c->local_bytes;
    if (total_bytes_out) *total_bytes_out = c->total_bytes;
    if (tensors_out) *tensors_out = c->count;
    return CKPT_OK;
}

int ckpt_store_last_stats(ckpt_store_t *store, ckpt_store_stats_t *stats_out)
{
    if (!store || !stats_out) return ckpt__error(CKPT_EINVAL, "store stats: NULL argument");
    if (!store->has_stats) return ckpt__error(CKPT_ENOENT, "store stats: nothing registered yet");
    *stats_out = store->stats;
    return CKPT_OK;
}
