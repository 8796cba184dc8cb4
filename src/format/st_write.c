/* Writing safetensors files: header JSON, space padding to an 8-byte data start (as the
 * reference writer does), data in the given order, then an atomic rename. */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "format/st_internal.h"

/* Chunk used when the data comes from a fill callback. */
#define FILL_CHUNK ((size_t)8 << 20)

typedef struct {
    char *p;
    size_t n, cap;
    int oom;
} sbuf_t;

static void sb_put(sbuf_t *b, const char *s, size_t len)
{
    if (b->oom) return;
    if (b->n + len + 1 > b->cap) {
        size_t cap = b->cap ? b->cap : 4096;
        while (cap < b->n + len + 1) cap *= 2;
        char *p = ckpt__realloc(b->p, cap);
        if (!p) {
            b->oom = 1;
            return;
        }
        b->p = p;
        b->cap = cap;
    }
    memcpy(b->p + b->n, s, len);
    b->n += len;
    b->p[b->n] = '\0';
}

static void sb_puts(sbuf_t *b, const char *s) { sb_put(b, s, strlen(s)); }

static void sb_u64(sbuf_t *b, uint64_t v)
{
    char tmp[32];
    int n = snprintf(tmp, sizeof(tmp), "%llu", (unsigned long long)v);
    sb_put(b, tmp, (size_t)n);
}

/* JSON string with the escapes RFC 8259 requires; UTF-8 passes through unchanged. */
static void sb_json_str(sbuf_t *b, const char *s)
{
    sb_put(b, "\"", 1);
    for (const unsigned char *p = (const unsigned char *)s; *p; p++) {
        char esc[8];
        if (*p == '"' || *p == '\\') {
            esc[0] = '\\';
            esc[1] = (char)*p;
            sb_put(b, esc, 2);
        } else if (*p < 0x20) {
            snprintf(esc, sizeof(esc), "\\u%04x", *p);
            sb_put(b, esc, 6);
        } else {
            sb_put(b, (const char *)p, 1);
        }
    }
    sb_put(b, "\"", 1);
}

static int cmp_name_ptr(const void *a, const void *b)
{
    return strcmp((*(const ckpt_tensor_meta_t *const *)a)->name,
                  (*(const ckpt_tensor_meta_t *const *)b)->name);
}

/* Refuses what would produce a file our own reader rejects: bad metas, duplicate names. */
static int check_metas(const char *path, const ckpt_tensor_meta_t *metas, size_t count)
{
    for (size_t i = 0; i < count; i++) {
        ckpt_tensor_meta_t m;
        const ckpt_tensor_meta_t *in = &metas[i];
        if (memchr(in->name, '\0', CKPT_NAME_MAX) == NULL ||
            strcmp(in->name, "__metadata__") == 0)
            return ckpt__error(CKPT_EINVAL, "%s: tensor %zu has a bad name", path, i);
        int rc = ckpt_tensor_meta_init(&m, in->name, in->dtype, in->shape, in->ndim);
        if (rc < 0) return ckpt__error_prefix(rc, "%s: ", path);
        if (m.nbytes != in->nbytes)
            return ckpt__error(CKPT_EINVAL, "%s: tensor '%s': nbytes %llu does not match its "
                               "shape and dtype (%llu)", path, in->name,
                               (unsigned long long)in->nbytes, (unsigned long long)m.nbytes);
    }
    const ckpt_tensor_meta_t **byname = ckpt__calloc(count, sizeof(*byname));
    if (!byname) return ckpt__error(CKPT_ENOMEM, "%s: no memory", path);
    for (size_t i = 0; i < count; i++) byname[i] = &metas[i];
    qsort(byname, count, sizeof(*byname), cmp_name_ptr);
    int rc = CKPT_OK;
    for (size_t i = 1; i < count && rc == CKPT_OK; i++)
        if (strcmp(byname[i - 1]->name, byname[i]->name) == 0)
            rc = ckpt__error(CKPT_EINVAL, "%s: tensor '%s' given twice", path, byname[i]->name);
    ckpt__free(byname);
    return rc;
}

/* Header JSON padded with spaces so that 8 + length is a multiple of `align`. */
static int build_header(const char *path, const ckpt_tensor_meta_t *metas, size_t count,
                        const char *const *keys, const char *const *values, size_t nmeta,
                        size_t align, sbuf_t *b)
{
    sb_puts(b, "{");
    if (nmeta) {
        sb_puts(b, "\"__metadata__\":{");
        for (size_t i = 0; i < nmeta; i++) {
            if (!keys[i] || !values[i])
                return ckpt__error(CKPT_EINVAL, "%s: metadata entry %zu is NULL", path, i);
            if (i) sb_puts(b, ",");
            sb_json_str(b, keys[i]);
            sb_puts(b, ":");
            sb_json_str(b, values[i]);
        }
        sb_puts(b, "}");
    }
    uint64_t pos = 0;
    for (size_t i = 0; i < count; i++) {
        const ckpt_tensor_meta_t *m = &metas[i];
        if (i || nmeta) sb_puts(b, ",");
        sb_json_str(b, m->name);
        sb_puts(b, ":{\"dtype\":");
        sb_json_str(b, ckpt_dtype_name(m->dtype));
        sb_puts(b, ",\"shape\":[");
        for (int d = 0; d < m->ndim; d++) {
            if (d) sb_puts(b, ",");
            sb_u64(b, (uint64_t)m->shape[d]);
        }
        sb_puts(b, "],\"data_offsets\":[");
        sb_u64(b, pos);
        sb_puts(b, ",");
        pos += m->nbytes;
        sb_u64(b, pos);
        sb_puts(b, "]}");
    }
    sb_puts(b, "}");
    while (!b->oom && (8 + b->n) % align != 0) sb_puts(b, " ");
    if (b->oom) return ckpt__error(CKPT_ENOMEM, "%s: no memory for the header", path);
    if (b->n > CKPT_ST_MAX_HEADER)
        return ckpt__error(CKPT_ETOOBIG, "%s: header of %zu bytes exceeds the limit of %u",
                           path, b->n, CKPT_ST_MAX_HEADER);
    return CKPT_OK;
}

static int write_full(int fd, const char *path, const void *buf, size_t len, uint64_t *pos)
{
    const char *p = buf;
    while (len) {
        ssize_t n = write(fd, p, len);
        if (n < 0 && errno == EINTR) continue;
        if (n < 0)
            return ckpt__error(CKPT_EIO, "%s: write at offset %llu: %s", path,
                               (unsigned long long)*pos, strerror(errno));
        p += n;
        len -= (size_t)n;
        *pos += (uint64_t)n;
    }
    return CKPT_OK;
}

/* Shared body of both writers: `data` when the bytes are in memory, else `fill`. */
static int write_file(const char *path, const ckpt_tensor_meta_t *metas, size_t count,
                      const char *const *keys, const char *const *values, size_t nmeta,
                      const void *const *data, ckpt_st_fill_fn fill, void *user)
{
    if (!path || (count && !metas) || (nmeta && (!keys || !values)) || (!data && !fill && count))
        return ckpt__error(CKPT_EINVAL, "ckpt_st_write: NULL argument");
    sbuf_t hdr = {0};
    char *tmp = NULL, *chunk = NULL;
    int fd = -1;
    uint64_t pos = 0;
    int rc = check_metas(path, metas, count);
    if (rc < 0) goto out;
    rc = build_header(path, metas, count, keys, values, nmeta, 8, &hdr);
    if (rc < 0) goto out;
    if (!data && fill) {
        chunk = ckpt__malloc(FILL_CHUNK);
        if (!chunk) {
            rc = ckpt__error(CKPT_ENOMEM, "%s: no memory for a write buffer", path);
            goto out;
        }
    }
    size_t plen = strlen(path);
    tmp = ckpt__malloc(plen + 5);
    if (!tmp) {
        rc = ckpt__error(CKPT_ENOMEM, "%s: no memory", path);
        goto out;
    }
    memcpy(tmp, path, plen);
    memcpy(tmp + plen, ".tmp", 5);
    fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd < 0) {
        rc = ckpt__error(errno == ENOENT ? CKPT_ENOENT : CKPT_EIO, "%s: cannot create: %s", tmp,
                         strerror(errno));
        goto out;
    }
    unsigned char lenbuf[8];
    for (int i = 0; i < 8; i++) lenbuf[i] = (unsigned char)((uint64_t)hdr.n >> (8 * i));
    rc = write_full(fd, tmp, lenbuf, 8, &pos);
    if (rc == CKPT_OK) rc = write_full(fd, tmp, hdr.p, hdr.n, &pos);
    for (size_t i = 0; i < count && rc == CKPT_OK; i++) {
        uint64_t nb = metas[i].nbytes;
        if (data) {
            if (nb && !data[i]) {
                rc = ckpt__error(CKPT_EINVAL, "%s: tensor '%s' has no data", path,
                                 metas[i].name);
                break;
            }
            rc = write_full(fd, tmp, data[i], (size_t)nb, &pos);
            continue;
        }
        for (uint64_t off = 0; off < nb && rc == CKPT_OK; off += FILL_CHUNK) {
            size_t len = (size_t)CKPT_MIN((uint64_t)FILL_CHUNK, nb - off);
            rc = fill(user, i, off, chunk, len);
            if (rc < 0) rc = ckpt__error_prefix(rc, "%s: tensor '%s': ", path, metas[i].name);
            else rc = write_full(fd, tmp, chunk, len, &pos);
        }
    }
    if (rc < 0) goto out;
    /* fsync before rename: otherwise a crash can leave PATH naming an empty file. */
    if (fsync(fd) < 0) {
        rc = ckpt__error(CKPT_EIO, "%s: fsync: %s", tmp, strerror(errno));
        goto out;
    }
    if (close(fd) < 0) {
        fd = -1;
        rc = ckpt__error(CKPT_EIO, "%s: close: %s", tmp, strerror(errno));
        goto out;
    }
    fd = -1;
    if (rename(tmp, path) < 0) {
        rc = ckpt__error(CKPT_EIO, "%s: rename to %s: %s", tmp, path, strerror(errno));
        goto out;
    }
out:
    if (fd >= 0) close(fd);
    if (rc < 0 && tmp) unlink(tmp);
    ckpt__free(tmp);
    ckpt__free(chunk);
    ckpt__free(hdr.p);
    return rc;
}

int ckpt__st_header_json(const char *label, const ckpt_tensor_meta_t *metas, size_t count,
                         size_t data_align, char **json_out, size_t *len_out)
{
    sbuf_t hdr = {0};
    if (data_align < 8 || data_align % 8 != 0)
        return ckpt__error(CKPT_EINVAL, "%s: data alignment %zu is not a multiple of 8", label,
                           data_align);
    int rc = check_metas(label, metas, count);
    if (rc == CKPT_OK) rc = build_header(label, metas, count, NULL, NULL, 0, data_align, &hdr);
    if (rc < 0) {
        ckpt__free(hdr.p);
        return rc;
    }
    *json_out = hdr.p;
    *len_out = hdr.n;
    return CKPT_OK;
}

int ckpt_st_write(const char *path, const ckpt_tensor_meta_t *metas, const void *const *data,
                  size_t count, const char *const *meta_keys, const char *const *meta_values,
                  size_t meta_count)
{
    return write_file(path, metas, count, meta_keys, meta_values, meta_count, data, NULL, NULL);
}

int ckpt_st_write_fill(const char *path, const ckpt_tensor_meta_t *metas, size_t count,
                       const char *const *meta_keys, const char *const *meta_values,
                       size_t meta_count, ckpt_st_fill_fn fill, void *user)
{
    if (!fill) return ckpt__error(CKPT_EINVAL, "ckpt_st_write_fill: fill is NULL");
    return write_file(path, metas, count, meta_keys, meta_values, meta_count, NULL, fill, user);
}
