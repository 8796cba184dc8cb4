/* Validation of a safetensors header (the JSON that follows the 8-byte length).
 *
 * Everything a later reader trusts is checked here, once: names, dtypes, shapes, byte
 * ranges. After ckpt_st_parse_header succeeds, every tensor range lies inside the data
 * region, the ranges tile the region exactly (no overlap, no gap, as the reference
 * library demands) and names are unique, so readers can pread blindly. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cjson/cJSON.h>

#include "format/st_internal.h"

/* cJSON turns every number into a double and forgets its spelling, so "1.0", "1e3" and
 * "-0" would slip through as integers. The reference reads these fields as unsigned
 * integers and rejects such spellings; this scan does the same before cJSON runs. It
 * only has to skip strings (with their escapes) and look at what follows a digit run. */
static int check_number_spelling(const char *label, const char *json, size_t len)
{
    size_t i = 0;
    while (i < len) {
        char c = json[i];
        if (c == '"') {
            for (i++; i < len && json[i] != '"'; i++)
                if (json[i] == '\\') i++;
            i++;
            continue;
        }
        if (c == '-')
            return ckpt__error(CKPT_EFORMAT,
                               "%s: header: negative number at byte %zu (sizes and offsets "
                               "must be non-negative integers)", label, i);
        if (c >= '0' && c <= '9') {
            size_t start = i;
            while (i < len && json[i] >= '0' && json[i] <= '9') i++;
            if (i < len && (json[i] == '.' || json[i] == 'e' || json[i] == 'E'))
                return ckpt__error(CKPT_EFORMAT,
                                   "%s: header: non-integer number at byte %zu (sizes and "
                                   "offsets must be integers)", label, start);
            continue;
        }
        i++;
    }
    return CKPT_OK;
}

/* A JSON number that is a non-negative integer below 2^53 (exact in a double). */
static int get_uint(const cJSON *item, uint64_t *out)
{
    if (!cJSON_IsNumber(item)) return -1;
    double d = item->valuedouble;
    /* The range test comes first (it is false for NaN too) so the cast below is defined;
     * the round trip then rejects fractions. No libm needed. */
    if (!(d >= 0 && d < (double)CKPT__ST_MAX_INT)) return -1;
    if ((double)(uint64_t)d != d) return -1;
    *out = (uint64_t)d;
    return 0;
}

static int parse_metadata(ckpt_st_file_t *f, const cJSON *md)
{
    if (!cJSON_IsObject(md))
        return ckpt__error(CKPT_EFORMAT, "%s: __metadata__ is not an object", f->path);
    size_t n = 0;
    for (const cJSON *it = md->child; it; it = it->next) {
        if (!cJSON_IsString(it))
            return ckpt__error(CKPT_EFORMAT, "%s: __metadata__ entry '%s' is not a string",
                               f->path, it->string ? it->string : "");
        n++;
    }
    f->meta_keys = ckpt__calloc(n, sizeof(char *));
    f->meta_values = ckpt__calloc(n, sizeof(char *));
    if (!f->meta_keys || !f->meta_values)
        return ckpt__error(CKPT_ENOMEM, "%s: no memory for %zu metadata entries", f->path, n);
    for (const cJSON *it = md->child; it; it = it->next) {
        /* Counted as soon as the key exists so close frees whatever was allocated. */
        f->meta_keys[f->num_metadata] = ckpt__strdup(it->string ? it->string : "");
        f->meta_values[f->num_metadata] = ckpt__strdup(it->valuestring);
        f->num_metadata++;
        if (!f->meta_keys[f->num_metadata - 1] || !f->meta_values[f->num_metadata - 1])
            return ckpt__error(CKPT_ENOMEM, "%s: no memory for metadata", f->path);
    }
    return CKPT_OK;
}

static int parse_shape(const ckpt_st_file_t *f, const char *name, const cJSON *shape,
                       ckpt_tensor_meta_t *m)
{
    if (!cJSON_IsArray(shape))
        return ckpt__error(CKPT_EFORMAT, "%s: tensor '%s': shape is not an array", f->path,
                           name);
    int ndim = cJSON_GetArraySize(shape);
    if (ndim > CKPT_MAX_DIMS)
        return ckpt__error(CKPT_EFORMAT, "%s: tensor '%s': shape has %d dimensions (at most %d)",
                           f->path, name, ndim, CKPT_MAX_DIMS);
    int i = 0;
    for (const cJSON *d = shape->child; d; d = d->next, i++) {
        uint64_t v;
        if (get_uint(d, &v) < 0)
            return ckpt__error(CKPT_EFORMAT,
                               "%s: tensor '%s': shape dimension %d is not a non-negative "
                               "integer below 2^53", f->path, name, i);
        m->shape[i] = (int64_t)v;
    }
    m->ndim = ndim;
    uint64_t numel;
    if (ckpt_shape_numel(m->shape, ndim, &numel) < 0)
        return ckpt__error(CKPT_EFORMAT, "%s: tensor '%s': shape product overflows", f->path,
                           name);
    size_t esize = ckpt_dtype_size(m->dtype);
    if (numel > CKPT__ST_MAX_INT / esize)
        return ckpt__error(CKPT_EFORMAT, "%s: tensor '%s': byte size overflows", f->path, name);
    m->nbytes = numel * esize;
    return CKPT_OK;
}

/* Formats "[2, 2]" for error texts. */
static void shape_text(const ckpt_tensor_meta_t *m, char *buf, size_t cap)
{
    size_t n = (size_t)snprintf(buf, cap, "[");
    for (int i = 0; i < m->ndim && n < cap; i++)
        n += (size_t)snprintf(buf + n, cap - n, "%s%lld", i ? ", " : "", (long long)m->shape[i]);
    if (n < cap) snprintf(buf + n, cap - n, "]");
}

/* One tensor entry. `begin` is relative to the data region; the caller tiles the ranges. */
static int parse_tensor(const ckpt_st_file_t *f, const char *name, const cJSON *entry,
                        uint64_t data_len, ckpt_tensor_meta_t *m, uint64_t *begin_out)
{
    if (strlen(name) >= CKPT_NAME_MAX)
        return ckpt__error(CKPT_EFORMAT, "%s: tensor name longer than %d bytes: '%.48s...'",
                           f->path, CKPT_NAME_MAX - 1, name);
    if (!cJSON_IsObject(entry))
        return ckpt__error(CKPT_EFORMAT, "%s: tensor '%s': entry is not an object", f->path,
                           name);
    const cJSON *dtype = NULL, *shape = NULL, *offs = NULL;
    /* Walk the fields ourselves: cJSON lookups return the first of duplicated keys, and a
     * field given twice is as malformed as one missing. */
    for (const cJSON *it = entry->child; it; it = it->next) {
        const cJSON **slot = NULL;
        if (strcmp(it->string, "dtype") == 0) slot = &dtype;
        else if (strcmp(it->string, "shape") == 0) slot = &shape;
        else if (strcmp(it->string, "data_offsets") == 0) slot = &offs;
        if (!slot) continue; /* unknown fields are ignored, as by the reference */
        if (*slot)
            return ckpt__error(CKPT_EFORMAT, "%s: tensor '%s': field '%s' given twice", f->path,
                               name, it->string);
        *slot = it;
    }
    if (!dtype || !shape || !offs)
        return ckpt__error(CKPT_EFORMAT, "%s: tensor '%s': missing field '%s'", f->path, name,
                           !dtype ? "dtype" : !shape ? "shape" : "data_offsets");
    memset(m, 0, sizeof(*m));
    memcpy(m->name, name, strlen(name) + 1);
    m->owner = -1;
    m->dtype = cJSON_IsString(dtype) ? ckpt_dtype_from_name(dtype->valuestring)
                                     : CKPT_DTYPE_INVALID;
    if (m->dtype == CKPT_DTYPE_INVALID)
        return ckpt__error(CKPT_EFORMAT, "%s: tensor '%s': unknown dtype '%.32s'", f->path,
                           name, cJSON_IsString(dtype) ? dtype->valuestring : "(not a string)");
    int rc = parse_shape(f, name, shape, m);
    if (rc < 0) return rc;
    uint64_t begin, end;
    if (!cJSON_IsArray(offs) || cJSON_GetArraySize(offs) != 2 ||
        get_uint(offs->child, &begin) < 0 || get_uint(offs->child->next, &end) < 0)
        return ckpt__error(CKPT_EFORMAT,
                           "%s: tensor '%s': data_offsets is not [begin, end] of non-negative "
                           "integers", f->path, name);
    if (begin > end || end > data_len)
        return ckpt__error(CKPT_EFORMAT,
                           "%s: tensor '%s': data_offsets [%llu, %llu] out of range (data "
                           "region is %llu bytes)", f->path, name, (unsigned long long)begin,
                           (unsigned long long)end, (unsigned long long)data_len);
    if (end - begin != m->nbytes) {
        char st[160];
        shape_text(m, st, sizeof(st));
        return ckpt__error(CKPT_EFORMAT,
                           "%s: tensor '%s': data_offsets [%llu, %llu] do not match shape %s "
                           "of %s (%llu bytes)", f->path, name, (unsigned long long)begin,
                           (unsigned long long)end, st, ckpt_dtype_name(m->dtype),
                           (unsigned long long)m->nbytes);
    }
    *begin_out = begin;
    return CKPT_OK;
}

static int cmp_offset(const void *a, const void *b)
{
    const ckpt_tensor_meta_t *x = a, *y = b;
    if (x->offset != y->offset) return x->offset < y->offset ? -1 : 1;
    if (x->nbytes != y->nbytes) return x->nbytes < y->nbytes ? -1 : 1;
    return strcmp(x->name, y->name);
}

static int cmp_name(const void *a, const void *b)
{
    const ckpt_tensor_meta_t *const *x = a, *const *y = b;
    return strcmp((*x)->name, (*y)->name);
}

/* Sorts by offset and proves the ranges tile [data_offset, file_size) exactly. */
static int check_layout(ckpt_st_file_t *f)
{
    size_t n = f->num_tensors;
    qsort(f->metas, n, sizeof(*f->metas), cmp_offset);
    uint64_t pos = f->data_offset;
    for (size_t i = 0; i < n; i++) {
        const ckpt_tensor_meta_t *m = &f->metas[i];
        if (m->offset < pos)
            return ckpt__error(CKPT_EFORMAT,
                               "%s: tensor '%s' overlaps tensor '%s' (data bytes [%llu, %llu))",
                               f->path, m->name, f->metas[i - 1].name,
                               (unsigned long long)(m->offset - f->data_offset),
                               (unsigned long long)(pos - f->data_offset));
        if (m->offset > pos)
            return ckpt__error(CKPT_EFORMAT,
                               "%s: data region not covered: bytes [%llu, %llu) belong to no "
                               "tensor", f->path, (unsigned long long)(pos - f->data_offset),
                               (unsigned long long)(m->offset - f->data_offset));
        pos = m->offset + m->nbytes;
    }
    if (pos != f->file_size)
        return ckpt__error(CKPT_EFORMAT,
                           "%s: data region not covered: bytes [%llu, %llu) belong to no tensor",
                           f->path, (unsigned long long)(pos - f->data_offset),
                           (unsigned long long)(f->file_size - f->data_offset));

    f->by_name = ckpt__calloc(n, sizeof(*f->by_name));
    if (!f->by_name) return ckpt__error(CKPT_ENOMEM, "%s: no memory for the name index", f->path);
    for (size_t i = 0; i < n; i++) f->by_name[i] = &f->metas[i];
    qsort(f->by_name, n, sizeof(*f->by_name), cmp_name);
    for (size_t i = 1; i < n; i++)
        if (strcmp(f->by_name[i - 1]->name, f->by_name[i]->name) == 0)
            return ckpt__error(CKPT_EFORMAT, "%s: tensor '%s' appears more than once", f->path,
                               f->by_name[i]->name);
    return CKPT_OK;
}

static int parse_root(ckpt_st_file_t *f, const cJSON *root)
{
    if (!cJSON_IsObject(root))
        return ckpt__error(CKPT_EFORMAT, "%s: header is not a JSON object", f->path);
    size_t count = 0, nmeta = 0;
    for (const cJSON *it = root->child; it; it = it->next) {
        if (strcmp(it->string, "__metadata__") == 0) nmeta++;
        else count++;
    }
    if (nmeta > 1)
        return ckpt__error(CKPT_EFORMAT, "%s: __metadata__ appears more than once", f->path);
    f->metas = ckpt__calloc(count, sizeof(*f->metas));
    if (!f->metas)
        return ckpt__error(CKPT_ENOMEM, "%s: no memory for %zu tensor descriptions", f->path,
                           count);
    uint64_t data_len = f->file_size - f->data_offset;
    for (const cJSON *it = root->child; it; it = it->next) {
        int rc;
        if (strcmp(it->string, "__metadata__") == 0) {
            rc = parse_metadata(f, it);
        } else {
            uint64_t begin = 0;
            ckpt_tensor_meta_t *m = &f->metas[f->num_tensors];
            rc = parse_tensor(f, it->string, it, data_len, m, &begin);
            m->offset = f->data_offset + begin;
            f->num_tensors++;
        }
        if (rc < 0) return rc;
    }
    return check_layout(f);
}

int ckpt_st_parse_header(const char *label, const char *json, size_t len, uint64_t file_size,
                         ckpt_st_file_t **file_out)
{
    if (!label || (!json && len) || !file_out)
        return ckpt__error(CKPT_EINVAL, "ckpt_st_parse_header: NULL argument");
    if (len == 0) return ckpt__error(CKPT_EFORMAT, "%s: header length is 0", label);
    if (len > CKPT_ST_MAX_HEADER)
        return ckpt__error(CKPT_EFORMAT, "%s: header length %zu exceeds the limit of %u bytes",
                           label, len, CKPT_ST_MAX_HEADER);
    if (file_size < 8 || len > file_size - 8)
        return ckpt__error(CKPT_EFORMAT,
                           "%s: header length %zu runs past the end of the file (%llu bytes)",
                           label, len, (unsigned long long)file_size);
    int rc = CKPT_OK;
    cJSON *root = NULL;
    ckpt_st_file_t *f = ckpt__calloc(1, sizeof(*f));
    if (!f) return ckpt__error(CKPT_ENOMEM, "%s: no memory", label);
    f->fd = -1;
    f->file_size = file_size;
    f->data_offset = 8 + (uint64_t)len;
    f->path = ckpt__strdup(label);
    if (!f->path) {
        rc = ckpt__error(CKPT_ENOMEM, "%s: no memory", label);
        goto fail;
    }
    /* cJSON stops at a NUL; a NUL inside the header is malformed either way. */
    if (memchr(json, '\0', len)) {
        rc = ckpt__error(CKPT_EFORMAT, "%s: header contains a NUL byte at byte %zu", label,
                         (size_t)((const char *)memchr(json, '\0', len) - json));
        goto fail;
    }
    rc = check_number_spelling(label, json, len);
    if (rc < 0) goto fail;
    const char *end = NULL;
    root = cJSON_ParseWithLengthOpts(json, len, &end, 0);
    if (!root) {
        size_t at = end && end >= json && end <= json + len ? (size_t)(end - json) : 0;
        rc = ckpt__error(CKPT_EFORMAT, "%s: header is not valid JSON (error near byte %zu of %zu)",
                         label, at, len);
        goto fail;
    }
    /* The reference writer pads the header with spaces; anything else after the JSON
     * value is garbage the reference parser would reject too. */
    for (const char *p = end; p < json + len; p++) {
        if (*p != ' ' && *p != '\t' && *p != '\n' && *p != '\r') {
            rc = ckpt__error(CKPT_EFORMAT, "%s: header has trailing bytes after the JSON at byte %zu",
                             label, (size_t)(p - json));
            goto fail;
        }
    }
    rc = parse_root(f, root);
    if (rc < 0) goto fail;
    cJSON_Delete(root);
    *file_out = f;
    return CKPT_OK;
fail:
    cJSON_Delete(root);
    ckpt_st_close(f);
    return rc;
}
