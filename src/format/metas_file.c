/* The metas file (docs/METAS.md): JSON encode, strict decode and base64 for its blobs.
 * Everything in it comes from another deployment, possibly over HTTP, so decode trusts
 * nothing: every count, range and blob is checked and errors name the JSON path. */
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cjson/cJSON.h>

#include "format/metas_file.h"

/* JSON numbers are doubles: integers above 2^53 would silently lose bits, so larger
 * values (addresses, checksums, version ids) travel as strings. */
#define JSON_INT_MAX 9007199254740992.0

/* ---- base64 ----------------------------------------------------------------------------- */

static const char b64_alphabet[] =
    "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

size_t ckpt__base64_encoded_len(size_t n) { return (n + 2) / 3 * 4; }

void ckpt__base64_encode(const uint8_t *src, size_t n, char *dst)
{
    size_t i = 0;
    for (; i + 3 <= n; i += 3) {
        uint32_t v = (uint32_t)src[i] << 16 | (uint32_t)src[i + 1] << 8 | src[i + 2];
        *dst++ = b64_alphabet[v >> 18];
        *dst++ = b64_alphabet[(v >> 12) & 63];
        *dst++ = b64_alphabet[(v >> 6) & 63];
        *dst++ = b64_alphabet[v & 63];
    }
    if (i < n) {
        uint32_t v = (uint32_t)src[i] << 16 | (i + 1 < n ? (uint32_t)src[i + 1] << 8 : 0);
        *dst++ = b64_alphabet[v >> 18];
        *dst++ = b64_alphabet[(v >> 12) & 63];
        *dst++ = i + 1 < n ? b64_alphabet[(v >> 6) & 63] : '=';
        *dst++ = '=';
    }
    *dst = '\0';
}

static int b64_value(char c)
{
    if (c >= 'A' && c <= 'Z') return c - 'A';
    if (c >= 'a' && c <= 'z') return c - 'a' + 26;
    if (c >= '0' && c <= '9') return c - '0' + 52;
    if (c == '+') return 62;
    if (c == '/') return 63;
    return -1;
}

long ckpt__base64_decode(const char *src, size_t n, uint8_t *dst, size_t cap)
{
    if (n % 4) return -1;
    size_t out = 0;
    for (size_t i = 0; i < n; i += 4) {
        int v[4], pad = 0;
        for (int k = 0; k < 4; k++) {
            char c = src[i + k];
            /* '=' only in the last group, only at its end */
            if (c == '=' && i + 4 == n && k >= 2 && (k == 3 || src[i + 3] == '=')) {
                v[k] = 0;
                pad++;
            } else if ((v[k] = b64_value(c)) < 0) {
                return -1;
            }
        }
        uint32_t w = (uint32_t)v[0] << 18 | (uint32_t)v[1] << 12 | (uint32_t)v[2] << 6 | (uint32_t)v[3];
        /* Bits below the last full byte must be zero, so each blob has one spelling. */
        if ((pad == 1 && (w & 0xff)) || (pad == 2 && (w & 0xffff))) return -1;
        size_t nb = 3u - (size_t)pad;
        if (out + nb > cap) return -1;
        for (size_t k = 0; k < nb; k++) dst[out++] = (uint8_t)(w >> (16 - 8 * k));
    }
    return (long)out;
}

/* ---- validation shared by encode and decode --------------------------------------------- */

static int check_tensor(const ckpt__metas_t *m, size_t i)
{
    const ckpt__metas_tensor_t *t = &m->tensors[i];
    const ckpt_tensor_meta_t *x = &t->meta;
    if (!memchr(x->name, '\0', sizeof(x->name)) || !x->name[0])
        return ckpt__error(CKPT_EFORMAT, "metas: tensors[%zu].name: empty or too long", i);
    ckpt_tensor_meta_t check;
    if (ckpt_tensor_meta_init(&check, x->name, x->dtype, x->shape, x->ndim))
        return ckpt__error_prefix(CKPT_EFORMAT, "metas: tensors[%zu] '%s': ", i, x->name);
    if (check.nbytes != x->nbytes)
        return ckpt__error(CKPT_EFORMAT, "metas: tensors[%zu] '%s': nbytes %" PRIu64 " but shape "
                           "and dtype give %" PRIu64, i, x->name, x->nbytes, check.nbytes);
    if (x->owner < 0 || (uint32_t)x->owner >= m->nranks)
        return ckpt__error(CKPT_EFORMAT, "metas: tensors[%zu] '%s': rank %d outside 0..%u", i,
                           x->name, x->owner, m->nranks - 1);
    const ckpt__metas_rank_t *r = &m->ranks[x->owner];
    if (t->region >= r->nregions)
        return ckpt__error(CKPT_EFORMAT, "metas: tensors[%zu] '%s': region %u but rank %d has %u",
                           i, x->name, t->region, x->owner, r->nregions);
    uint64_t size = r->regions[t->region].size;
    if (x->offset > size || x->nbytes > size - x->offset)
        return ckpt__error(CKPT_EFORMAT, "metas: tensors[%zu] '%s': bytes %" PRIu64 "+%" PRIu64
                           " outside region %u of rank %d (%" PRIu64 " bytes)", i, x->name,
                           x->offset, x->nbytes, t->region, x->owner, size);
    return CKPT_OK;
}

static int check_metas(const ckpt__metas_t *m)
{
    if (!m->name[0] || !memchr(m->name, '\0', sizeof(m->name)))
        return ckpt__error(CKPT_EFORMAT, "metas: name: empty or too long");
    if (m->nranks == 0 || m->nranks > CKPT__METAS_MAX_RANKS || !m->ranks)
        return ckpt__error(CKPT_EFORMAT, "metas: ranks: %u ranks (want 1..%u)", m->nranks,
                           CKPT__METAS_MAX_RANKS);
    for (uint32_t r = 0; r < m->nranks; r++) {
        const ckpt__metas_rank_t *rk = &m->ranks[r];
        if (!rk->address_len || rk->address_len > CKPT__METAS_MAX_BLOB || !rk->address)
            return ckpt__error(CKPT_EFORMAT, "metas: ranks[%u].address: %zu bytes", r, rk->address_len);
        if (rk->nregions > CKPT__METAS_MAX_REGIONS || (rk->nregions && !rk->regions))
            return ckpt__error(CKPT_EFORMAT, "metas: ranks[%u].regions: %u regions (max %u)", r,
                               rk->nregions, CKPT__METAS_MAX_REGIONS);
        for (uint32_t g = 0; g < rk->nregions; g++) {
            const ckpt__metas_region_t *rg = &rk->regions[g];
            if (!rg->size || rg->base + rg->size < rg->base)
                return ckpt__error(CKPT_EFORMAT, "metas: ranks[%u].regions[%u]: range 0x%" PRIx64
                                   "+%" PRIu64 " is empty or wraps", r, g, rg->base, rg->size);
            if (!rg->rkey_len || rg->rkey_len > CKPT__METAS_MAX_BLOB || !rg->rkey)
                return ckpt__error(CKPT_EFORMAT, "metas: ranks[%u].regions[%u].rkey: %zu bytes",
                                   r, g, rg->rkey_len);
        }
    }
    if (m->ntensors > CKPT__METAS_MAX_TENSORS || (m->ntensors && !m->tensors))
        return ckpt__error(CKPT_EFORMAT, "metas: tensors: %zu tensors (max %u)", m->ntensors,
                           CKPT__METAS_MAX_TENSORS);
    for (size_t i = 0; i < m->ntensors; i++) {
        int rc = check_tensor(m, i);
        if (rc) return rc;
    }
    return CKPT_OK;
}

/* ---- encode ----------------------------------------------------------------------------- */

static cJSON *blob_json(const uint8_t *p, size_t n)
{
    char *text = ckpt__malloc(ckpt__base64_encoded_len(n) + 1);
    if (!text) return NULL;
    ckpt__base64_encode(p, n, text);
    cJSON *s = cJSON_CreateString(text);
    ckpt__free(text);
    return s;
}

static cJSON *u64_string(const char *fmt, uint64_t v)
{
    char buf[32];
    snprintf(buf, sizeof(buf), fmt, v);
    return cJSON_CreateString(buf);
}

/* cJSON_Add* return NULL on allocation failure; one flag collects them. */
#define ADD(obj, key, item) ok &= cJSON_AddItemToObject((obj), (key), (item)) != 0
#define PUSH(arr, item) ok &= cJSON_AddItemToArray((arr), (item)) != 0

int ckpt__metas_encode(const ckpt__metas_t *m, char **json_out, size_t *len_out)
{
    if (!m || !json_out || !len_out) return ckpt__error(CKPT_EINVAL, "metas encode: NULL argument");
    int rc = check_metas(m);
    if (rc) return rc;
    int ok = 1;
    cJSON *root = cJSON_CreateObject(), *ranks = cJSON_CreateArray(), *tensors = cJSON_CreateArray();
    if (!root || !ranks || !tensors) {
        cJSON_Delete(root);
        cJSON_Delete(ranks);
        cJSON_Delete(tensors);
        return ckpt__error(CKPT_ENOMEM, "metas encode '%s': out of memory", m->name);
    }
    {
        ADD(root, "format", cJSON_CreateString(CKPT__METAS_FORMAT));
        ADD(root, "format_version", cJSON_CreateNumber(CKPT__METAS_FORMAT_VERSION));
        ADD(root, "name", cJSON_CreateString(m->name));
        ADD(root, "version", u64_string("%" PRIu64, m->version));
        ADD(root, "ranks", ranks);
        ADD(root, "tensors", tensors);
    }
    for (uint32_t r = 0; ok && r < m->nranks; r++) {
        const ckpt__metas_rank_t *rk = &m->ranks[r];
        cJSON *jr = cJSON_CreateObject(), *regions = cJSON_CreateArray();
        ok &= jr && regions;
        if (!ok) {
            cJSON_Delete(jr);
            cJSON_Delete(regions);
            break;
        }
        PUSH(ranks, jr);
        ADD(jr, "rank", cJSON_CreateNumber(r));
        ADD(jr, "address", blob_json(rk->address, rk->address_len));
        ADD(jr, "regions", regions);
        for (uint32_t g = 0; ok && g < rk->nregions; g++) {
            const ckpt__metas_region_t *rg = &rk->regions[g];
            cJSON *jg = cJSON_CreateObject();
            ok &= jg != NULL;
            if (!ok) break;
            PUSH(regions, jg);
            ADD(jg, "base", u64_string("0x%" PRIx64, rg->base));
            ADD(jg, "size", cJSON_CreateNumber((double)rg->size));
            ADD(jg, "rkey", blob_json(rg->rkey, rg->rkey_len));
        }
    }
    for (size_t i = 0; ok && i < m->ntensors; i++) {
        const ckpt__metas_tensor_t *t = &m->tensors[i];
        cJSON *jt = cJSON_CreateObject(), *shape = cJSON_CreateArray();
        ok &= jt && shape;
        if (!ok) {
            cJSON_Delete(jt);
            cJSON_Delete(shape);
            break;
        }
        PUSH(tensors, jt);
        for (int d = 0; d < t->meta.ndim; d++) PUSH(shape, cJSON_CreateNumber((double)t->meta.shape[d]));
        ADD(jt, "name", cJSON_CreateString(t->meta.name));
        ADD(jt, "dtype", cJSON_CreateString(ckpt_dtype_name(t->meta.dtype)));
        ADD(jt, "shape", shape);
        ADD(jt, "nbytes", cJSON_CreateNumber((double)t->meta.nbytes));
        ADD(jt, "rank", cJSON_CreateNumber(t->meta.owner));
        ADD(jt, "region", cJSON_CreateNumber(t->region));
        ADD(jt, "offset", cJSON_CreateNumber((double)t->meta.offset));
        ADD(jt, "checksum", u64_string("%016" PRIx64, t->meta.checksum));
    }
    char *text = ok ? cJSON_PrintUnformatted(root) : NULL;
    cJSON_Delete(root);
    if (!text) return ckpt__error(CKPT_ENOMEM, "metas encode '%s': out of memory", m->name);
    size_t len = strlen(text);
    char *copy = ckpt__malloc(len + 1);
    if (copy) memcpy(copy, text, len + 1);
    cJSON_free(text);
    if (!copy) return ckpt__error(CKPT_ENOMEM, "metas encode '%s': out of memory", m->name);
    *json_out = copy;
    *len_out = len;
    return CKPT_OK;
}

#undef ADD
#undef PUSH

/* ---- decode ----------------------------------------------------------------------------- */

/* Field readers: each names the JSON path (path + key) in its error. */
static int get_item(const cJSON *obj, const char *path, const char *key, int type, const cJSON **out)
{
    const cJSON *it = cJSON_GetObjectItemCaseSensitive(obj, key);
    if (!it) return ckpt__error(CKPT_EFORMAT, "metas: %s%s: missing", path, key);
    if (!(it->type & type))
        return ckpt__error(CKPT_EFORMAT, "metas: %s%s: wrong JSON type", path, key);
    *out = it;
    return CKPT_OK;
}

static int get_uint(const cJSON *obj, const char *path, const char *key, double max, uint64_t *out)
{
    const cJSON *it = NULL;
    int rc = get_item(obj, path, key, cJSON_Number, &it);
    if (rc) return rc;
    double v = it->valuedouble;
    if (!(v >= 0 && v <= max) || v != (double)(uint64_t)v)
        return ckpt__error(CKPT_EFORMAT, "metas: %s%s: %g is not an integer in 0..%.0f", path, key, v, max);
    *out = (uint64_t)v;
    return CKPT_OK;
}

/* "123" (base 10) or "0x7f.." (base 16), the whole string, no sign, fits 64 bits. */
static int get_u64_string(const cJSON *obj, const char *path, const char *key, int base, uint64_t *out)
{
    const cJSON *it = NULL;
    int rc = get_item(obj, path, key, cJSON_String, &it);
    if (rc) return rc;
    const char *s = it->valuestring, *digits = s;
    if (base == 16 && strncmp(s, "0x", 2) == 0) digits = s + 2;
    char *end = NULL;
    errno = 0;
    unsigned long long v = *digits && *digits != '-' && *digits != '+' && *digits != ' '
                               ? strtoull(digits, &end, base) : 0;
    if (!end || *end || errno || end == digits)
        return ckpt__error(CKPT_EFORMAT, "metas: %s%s: \"%.40s\" is not a %s 64-bit integer", path,
                           key, s, base == 16 ? "hexadecimal" : "decimal");
    *out = v;
    return CKPT_OK;
}

static int get_blob(const cJSON *obj, const char *path, const char *key, uint8_t **out, size_t *len)
{
    const cJSON *it = NULL;
    int rc = get_item(obj, path, key, cJSON_String, &it);
    if (rc) return rc;
    size_t n = strlen(it->valuestring);
    if (n == 0 || n / 4 * 3 > CKPT__METAS_MAX_BLOB)
        return ckpt__error(CKPT_EFORMAT, "metas: %s%s: %zu base64 characters (want 1..%u bytes)",
                           path, key, n, CKPT__METAS_MAX_BLOB);
    uint8_t *buf = ckpt__malloc(n / 4 * 3 + 1);
    if (!buf) return ckpt__error(CKPT_ENOMEM, "metas: %s%s: out of memory", path, key);
    long got = ckpt__base64_decode(it->valuestring, n, buf, n / 4 * 3);
    if (got <= 0) {
        ckpt__free(buf);
        return ckpt__error(CKPT_EFORMAT, "metas: %s%s: invalid base64", path, key);
    }
    *out = buf;
    *len = (size_t)got;
    return CKPT_OK;
}

static int get_array(const cJSON *obj, const char *path, const char *key, size_t max,
                     const cJSON **out, size_t *n)
{
    int rc = get_item(obj, path, key, cJSON_Array, out);
    if (rc) return rc;
    /* cJSON_GetArraySize is an int: count ourselves and stop early past max. */
    size_t c = 0;
    for (const cJSON *e = (*out)->child; e; e = e->next)
        if (++c > max)
            return ckpt__error(CKPT_EFORMAT, "metas: %s%s: more than %zu entries", path, key, max);
    *n = c;
    return CKPT_OK;
}

static int decode_rank(const cJSON *jr, uint32_t r, ckpt__metas_rank_t *rk)
{
    char path[64], sub[96];
    const cJSON *regions = NULL;
    size_t n;
    uint64_t idx;
    snprintf(path, sizeof(path), "ranks[%u].", r);
    if (!cJSON_IsObject(jr)) return ckpt__error(CKPT_EFORMAT, "metas: ranks[%u]: not an object", r);
    int rc = get_uint(jr, path, "rank", JSON_INT_MAX, &idx);
    if (rc) return rc;
    if (idx != r) return ckpt__error(CKPT_EFORMAT, "metas: %srank: %" PRIu64 " out of order", path, idx);
    if ((rc = get_blob(jr, path, "address", &rk->address, &rk->address_len))) return rc;
    if ((rc = get_array(jr, path, "regions", CKPT__METAS_MAX_REGIONS, &regions, &n))) return rc;
    if (n) {
        rk->regions = ckpt__calloc(n, sizeof(*rk->regions));
        if (!rk->regions) return ckpt__error(CKPT_ENOMEM, "metas: %sregions: out of memory", path);
    }
    const cJSON *jg = regions->child;
    for (uint32_t g = 0; g < n; g++, jg = jg->next) {
        ckpt__metas_region_t *rg = &rk->regions[g];
        rk->nregions = g + 1; /* so free releases what this one gets */
        snprintf(sub, sizeof(sub), "%sregions[%u].", path, g);
        if (!cJSON_IsObject(jg)) return ckpt__error(CKPT_EFORMAT, "metas: %s: not an object", sub);
        if ((rc = get_u64_string(jg, sub, "base", 16, &rg->base))) return rc;
        if ((rc = get_uint(jg, sub, "size", JSON_INT_MAX, &rg->size))) return rc;
        if ((rc = get_blob(jg, sub, "rkey", &rg->rkey, &rg->rkey_len))) return rc;
    }
    return CKPT_OK;
}

static int decode_tensor(const cJSON *jt, size_t i, ckpt__metas_tensor_t *t)
{
    char path[64];
    const cJSON *it = NULL, *shape = NULL;
    size_t ndim;
    uint64_t v;
    int rc;
    snprintf(path, sizeof(path), "tensors[%zu].", i);
    if (!cJSON_IsObject(jt)) return ckpt__error(CKPT_EFORMAT, "metas: tensors[%zu]: not an object", i);
    if ((rc = get_item(jt, path, "name", cJSON_String, &it))) return rc;
    if (!it->valuestring[0] || ckpt__strlcpy(t->meta.name, it->valuestring, sizeof(t->meta.name)))
        return ckpt__error(CKPT_EFORMAT, "metas: %sname: empty or longer than %d bytes", path,
                           CKPT_NAME_MAX - 1);
    if ((rc = get_item(jt, path, "dtype", cJSON_String, &it))) return rc;
    t->meta.dtype = ckpt_dtype_from_name(it->valuestring);
    if (t->meta.dtype == CKPT_DTYPE_INVALID)
        return ckpt__error(CKPT_EFORMAT, "metas: %sdtype: unknown dtype \"%.32s\"", path, it->valuestring);
    if ((rc = get_array(jt, path, "shape", CKPT_MAX_DIMS, &shape, &ndim))) return rc;
    t->meta.ndim = (int32_t)ndim;
    const cJSON *d = shape->child;
    for (size_t k = 0; k < ndim; k++, d = d->next) {
        double x = d->valuedouble;
        if (!cJSON_IsNumber(d) || !(x >= 0 && x <= JSON_INT_MAX) || x != (double)(int64_t)x)
            return ckpt__error(CKPT_EFORMAT, "metas: %sshape[%zu]: not a non-negative integer", path, k);
        t->meta.shape[k] = (int64_t)x;
    }
    if ((rc = get_uint(jt, path, "nbytes", JSON_INT_MAX, &t->meta.nbytes))) return rc;
    if ((rc = get_uint(jt, path, "rank", CKPT__METAS_MAX_RANKS, &v))) return rc;
    t->meta.owner = (int32_t)v;
    if ((rc = get_uint(jt, path, "region", CKPT__METAS_MAX_REGIONS, &v))) return rc;
    t->region = (uint32_t)v;
    if ((rc = get_uint(jt, path, "offset", JSON_INT_MAX, &t->meta.offset))) return rc;
    return get_u64_string(jt, path, "checksum", 16, &t->meta.checksum);
}

int ckpt__metas_decode(const void *data, size_t len, ckpt__metas_t *out)
{
    ckpt__metas_t m;
    const cJSON *it = NULL, *ranks = NULL, *tensors = NULL;
    size_t n;
    uint64_t fv;
    int rc;
    memset(&m, 0, sizeof(m));
    if (!data || !out) return ckpt__error(CKPT_EINVAL, "metas decode: NULL argument");
    /* parse_end rather than cJSON_GetErrorPtr, which is one global for all threads. */
    const char *end = NULL;
    cJSON *root = cJSON_ParseWithLengthOpts(data, len, &end, 0);
    if (!root) {
        size_t off = end ? (size_t)(end - (const char *)data) : 0;
        return ckpt__error(CKPT_EFORMAT, "metas: not valid JSON (near byte %zu of %zu)", off, len);
    }
    for (const char *p = end; p && p < (const char *)data + len; p++) {
        if (*p != ' ' && *p != '\n' && *p != '\r' && *p != '\t' && *p != '\0') {
            rc = ckpt__error(CKPT_EFORMAT, "metas: bytes after the JSON object (at byte %zu)",
                             (size_t)(p - (const char *)data));
            goto fail;
        }
    }
    if (!cJSON_IsObject(root)) {
        rc = ckpt__error(CKPT_EFORMAT, "metas: top level is not a JSON object");
        goto fail;
    }
    if ((rc = get_item(root, "", "format", cJSON_String, &it))) goto fail;
    if (strcmp(it->valuestring, CKPT__METAS_FORMAT) != 0) {
        rc = ckpt__error(CKPT_EFORMAT, "metas: format: \"%.32s\", want \"%s\"", it->valuestring,
                         CKPT__METAS_FORMAT);
        goto fail;
    }
    if ((rc = get_uint(root, "", "format_version", JSON_INT_MAX, &fv))) goto fail;
    if (fv != CKPT__METAS_FORMAT_VERSION) {
        rc = ckpt__error(CKPT_EUNSUPPORTED, "metas: format_version %" PRIu64 " (this build reads %d)",
                         fv, CKPT__METAS_FORMAT_VERSION);
        goto fail;
    }
    if ((rc = get_item(root, "", "name", cJSON_String, &it))) goto fail;
    if (!it->valuestring[0] || ckpt__strlcpy(m.name, it->valuestring, sizeof(m.name))) {
        rc = ckpt__error(CKPT_EFORMAT, "metas: name: empty or longer than %d bytes", CKPT_NAME_MAX - 1);
        goto fail;
    }
    if ((rc = get_u64_string(root, "", "version", 10, &m.version))) goto fail;
    if ((rc = get_array(root, "", "ranks", CKPT__METAS_MAX_RANKS, &ranks, &n))) goto fail;
    if (n == 0) {
        rc = ckpt__error(CKPT_EFORMAT, "metas: ranks: empty");
        goto fail;
    }
    m.ranks = ckpt__calloc(n, sizeof(*m.ranks));
    if (!m.ranks) {
        rc = ckpt__error(CKPT_ENOMEM, "metas: ranks: out of memory");
        goto fail;
    }
    const cJSON *jr = ranks->child;
    for (uint32_t r = 0; r < n; r++, jr = jr->next) {
        m.nranks = r + 1;
        if ((rc = decode_rank(jr, r, &m.ranks[r]))) goto fail;
    }
    if ((rc = get_array(root, "", "tensors", CKPT__METAS_MAX_TENSORS, &tensors, &n))) goto fail;
    if (n) {
        m.tensors = ckpt__calloc(n, sizeof(*m.tensors));
        if (!m.tensors) {
            rc = ckpt__error(CKPT_ENOMEM, "metas: tensors: out of memory for %zu", n);
            goto fail;
        }
    }
    m.ntensors = n;
    const cJSON *jt = tensors->child;
    for (size_t i = 0; i < n; i++, jt = jt->next)
        if ((rc = decode_tensor(jt, i, &m.tensors[i]))) goto fail;
    if ((rc = check_metas(&m))) goto fail;
    cJSON_Delete(root);
    *out = m;
    return CKPT_OK;
fail:
    cJSON_Delete(root);
    ckpt__metas_free(&m);
    return rc;
}

void ckpt__metas_free(ckpt__metas_t *m)
{
    if (!m) return;
    for (uint32_t r = 0; m->ranks && r < m->nranks; r++) {
        ckpt__metas_rank_t *rk = &m->ranks[r];
        for (uint32_t g = 0; rk->regions && g < rk->nregions; g++) ckpt__free(rk->regions[g].rkey);
        ckpt__free(rk->regions);
        ckpt__free(rk->address);
    }
    ckpt__free(m->ranks);
    ckpt__free(m->tensors);
    memset(m, 0, sizeof(*m));
}
