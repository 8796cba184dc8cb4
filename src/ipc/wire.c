/* Codecs of the engine <-> worker protocol. Decoders treat the payload as hostile: every
 * read is bounds-checked, every count is checked against the bytes that could hold it, and
 * every failure says which field of which message was wrong. */
#include <stdlib.h>
#include <string.h>

#include "core/le.h"
#include "ipc/wire.h"

/* Reader helpers return 0 when the field is present, -1 when the payload is too short. */
static int rd_take(ckpt__ipc_reader_t *rd, size_t n, const uint8_t **out)
{
    if (rd->len - rd->pos < n) return -1;
    *out = rd->p + rd->pos;
    rd->pos += n;
    return 0;
}

static int rd_u16(ckpt__ipc_reader_t *rd, uint16_t *v)
{
    const uint8_t *p;
    if (rd_take(rd, 2, &p)) return -1;
    *v = get_u16(p);
    return 0;
}

static int rd_u32(ckpt__ipc_reader_t *rd, uint32_t *v)
{
    const uint8_t *p;
    if (rd_take(rd, 4, &p)) return -1;
    *v = get_u32(p);
    return 0;
}

static int rd_u64(ckpt__ipc_reader_t *rd, uint64_t *v)
{
    const uint8_t *p;
    if (rd_take(rd, 8, &p)) return -1;
    *v = get_u64(p);
    return 0;
}

/* A name on the wire: u16 length (1 .. CKPT_NAME_MAX-1) then the bytes, no NUL inside. */
static int rd_name(ckpt__ipc_reader_t *rd, char *out, const char *what)
{
    uint16_t n;
    const uint8_t *p;
    if (rd_u16(rd, &n) || rd_take(rd, n, &p))
        return ckpt__error(CKPT_EPROTO, "%s: truncated name", what);
    if (n == 0 || n >= CKPT_NAME_MAX)
        return ckpt__error(CKPT_EPROTO, "%s: name length %u outside 1..%d", what, n,
                           CKPT_NAME_MAX - 1);
    if (memchr(p, '\0', n) != NULL)
        return ckpt__error(CKPT_EPROTO, "%s: name contains a NUL byte", what);
    memcpy(out, p, n);
    out[n] = '\0';
    return CKPT_OK;
}

static size_t put_name(uint8_t *p, const char *name)
{
    size_t n = strlen(name);
    put_u16(p, (uint16_t)n);
    memcpy(p + 2, name, n);
    return 2 + n;
}

/* ---- header ---- */

const char *ckpt__ipc_msg_name(uint32_t type)
{
    static const char *names[] = {"?", "BEGIN", "READY", "BUCKET", "OK",
                                  "ERR", "FINISH", "ABORT", "REFUSE",
                                  "PUBLISH", "PUBLISH_REPLY", "COMMIT", "NEED"};
    return type < CKPT_ARRAY_SIZE(names) ? names[type] : "?";
}

void ckpt__ipc_hdr_encode(uint8_t *out, uint32_t type, uint32_t length)
{
    put_u32(out, CKPT_IPC_MAGIC);
    put_u16(out + 4, (uint16_t)CKPT_IPC_VERSION);
    put_u16(out + 6, (uint16_t)type);
    put_u32(out + 8, length);
}

int ckpt__ipc_hdr_decode(const uint8_t *in, const char *peer, ckpt__ipc_hdr_t *out)
{
    uint32_t magic = get_u32(in), length = get_u32(in + 8);
    uint16_t version = get_u16(in + 4), type = get_u16(in + 6);
    if (magic != CKPT_IPC_MAGIC)
        return ckpt__error(CKPT_EPROTO,
                           "%s: bad magic 0x%08x (not a ckpt-engine protocol peer?)", peer,
                           magic);
    if (version != CKPT_IPC_VERSION)
        return ckpt__error(CKPT_EPROTO, "%s: protocol version %u, this side speaks %u", peer,
                           version, CKPT_IPC_VERSION);
    if (type < CKPT_IPC_MSG_BEGIN || type > CKPT_IPC_MSG_LAST)
        return ckpt__error(CKPT_EPROTO, "%s: unknown message type %u", peer, type);
    if (length > CKPT_IPC_MAX_PAYLOAD)
        return ckpt__error(CKPT_ETOOBIG, "%s: %s payload of %u bytes exceeds the %u limit",
                           peer, ckpt__ipc_msg_name(type), length, CKPT_IPC_MAX_PAYLOAD);
    out->type = type;
    out->length = length;
    return CKPT_OK;
}

/* ---- BEGIN: u64 update_id, u64 version, u32 nbuckets, u32 flags, u32 nbuffers,
 *             u32 max_tensors, {u64 size, u32 kind, [64-byte handle unless kind is
 *             HOST]}[nbuffers] (kind, handle: version 4), name,
 *             u32 manifest_count, manifest records (version 3) ---- */

#define BEGIN_FIXED (8 + 8 + 4 * 4)

size_t ckpt__ipc_begin_size(const ckpt__ipc_begin_msg_t *m)
{
    uint32_t n = CKPT_MIN(m->nbuffers, (uint32_t)CKPT_IPC_MAX_BUFFERS);
    size_t size = BEGIN_FIXED + 12 * (size_t)n + 2 + strlen(m->name) + 4;
    for (uint32_t i = 0; i < n; i++)
        if (m->buffer_kinds[i] != CKPT_IPC_BUFFER_HOST) size += CKPT_IPC_HANDLE_BYTES;
    for (uint32_t i = 0; m->manifest && i < m->manifest_count; i++)
        size += ckpt__ipc_manifest_size(&m->manifest[i]);
    return size;
}

void ckpt__ipc_begin_encode(const ckpt__ipc_begin_msg_t *m, uint8_t *out)
{
    uint32_t n = CKPT_MIN(m->nbuffers, (uint32_t)CKPT_IPC_MAX_BUFFERS);
    uint32_t count = m->manifest ? m->manifest_count : 0;
    put_u64(out, m->update_id);
    put_u64(out + 8, m->version);
    put_u32(out + 16, m->nbuckets);
    put_u32(out + 20, m->flags);
    put_u32(out + 24, n);
    put_u32(out + 28, m->max_tensors);
    out += BEGIN_FIXED;
    for (uint32_t i = 0; i < n; i++, out += 12) {
        put_u64(out, m->buffer_sizes[i]);
        put_u32(out + 8, m->buffer_kinds[i]);
        if (m->buffer_kinds[i] == CKPT_IPC_BUFFER_HOST) continue;
        memcpy(out + 12, m->buffer_handles[i], CKPT_IPC_HANDLE_BYTES);
        out += CKPT_IPC_HANDLE_BYTES;
    }
    out += put_name(out, m->name);
    put_u32(out, count);
    out += 4;
    for (uint32_t i = 0; i < count; i++) out += ckpt__ipc_manifest_encode(&m->manifest[i], out);
}

int ckpt__ipc_begin_decode(const uint8_t *p, size_t len, ckpt__ipc_begin_msg_t *out)
{
    ckpt__ipc_reader_t rd = {p, len, 0};
    ckpt__ipc_begin_msg_t m;
    memset(&m, 0, sizeof(m));
    if (rd_u64(&rd, &m.update_id) || rd_u64(&rd, &m.version) || rd_u32(&rd, &m.nbuckets) ||
        rd_u32(&rd, &m.flags) || rd_u32(&rd, &m.nbuffers) || rd_u32(&rd, &m.max_tensors))
        return ckpt__error(CKPT_EPROTO, "BEGIN: truncated payload (%zu bytes)", len);
    /* Bound the count before reading the sizes it announces. */
    if (m.nbuffers < 1 || m.nbuffers > CKPT_IPC_MAX_BUFFERS)
        return ckpt__error(CKPT_EPROTO, "BEGIN: %u buffers, want 1..%d", m.nbuffers,
                           CKPT_IPC_MAX_BUFFERS);
    for (uint32_t i = 0; i < m.nbuffers; i++) {
        uint32_t kind;
        if (rd_u64(&rd, &m.buffer_sizes[i]) || rd_u32(&rd, &kind))
            return ckpt__error(CKPT_EPROTO, "BEGIN: truncated payload (%zu bytes, %u buffers)",
                               len, m.nbuffers);
        if (kind > CKPT_IPC_BUFFER_SIM)
            return ckpt__error(CKPT_EPROTO, "BEGIN: buffer %u is of kind %u: this receiver "
                               "knows host (0), CUDA (1) and simulated device (2) buffers",
                               i, kind);
        m.buffer_kinds[i] = kind;
        if (kind != CKPT_IPC_BUFFER_HOST) {
            if (len - rd.pos < CKPT_IPC_HANDLE_BYTES)
                return ckpt__error(CKPT_EPROTO, "BEGIN: buffer %u: truncated handle", i);
            memcpy(m.buffer_handles[i], rd.p + rd.pos, CKPT_IPC_HANDLE_BYTES);
            rd.pos += CKPT_IPC_HANDLE_BYTES;
        }
        if (m.buffer_sizes[i] == 0 || m.buffer_sizes[i] > (uint64_t)SIZE_MAX / 2)
            return ckpt__error(CKPT_EPROTO, "BEGIN: buffer %u has size %llu", i,
                               (unsigned long long)m.buffer_sizes[i]);
    }
    int rc = rd_name(&rd, m.name, "BEGIN");
    if (rc) return rc;
    if (rd_u32(&rd, &m.manifest_count))
        return ckpt__error(CKPT_EPROTO, "BEGIN: truncated payload (no manifest count)");
    /* Bound the count by the bytes present before anyone sizes an array from it. */
    if ((uint64_t)m.manifest_count * CKPT_IPC_MANIFEST_MIN > len - rd.pos)
        return ckpt__error(CKPT_EPROTO, "BEGIN: %u manifest records cannot fit in %zu bytes",
                           m.manifest_count, len - rd.pos);
    m.manifest_pos = rd.pos;
    for (uint32_t i = 0; i < m.manifest_count; i++) {
        ckpt_tensor_meta_t t;
        if ((rc = ckpt__ipc_manifest_decode(&rd, &t)) != 0) return rc;
    }
    rc = ckpt__ipc_reader_done(&rd, "BEGIN");
    if (rc) return rc;
    *out = m;
    return CKPT_OK;
}

/* ---- NEED: u32 count, records {name, i32 dim, u64 start, u64 length} ---- */

size_t ckpt__ipc_need_size(const ckpt_need_decl_t *needs, size_t count)
{
    size_t size = 4;
    for (size_t i = 0; i < count; i++)
        size += 2 + strnlen(needs[i].name, CKPT_NAME_MAX - 1) + 4 + 8 + 8;
    return size;
}

void ckpt__ipc_need_encode(const ckpt_need_decl_t *needs, size_t count, uint8_t *out)
{
    put_u32(out, (uint32_t)count);
    out += 4;
    for (size_t i = 0; i < count; i++) {
        size_t n = strnlen(needs[i].name, CKPT_NAME_MAX - 1);
        put_u16(out, (uint16_t)n);
        memcpy(out + 2, needs[i].name, n);
        out += 2 + n;
        put_u32(out, (uint32_t)needs[i].dim);
        put_u64(out + 4, needs[i].start);
        put_u64(out + 12, needs[i].length);
        out += 20;
    }
}

static int name_cmp(const void *a, const void *b)
{
    return strcmp(*(const char *const *)a, *(const char *const *)b);
}

int ckpt__ipc_need_decode(const uint8_t *p, size_t len, ckpt_need_decl_t *out,
                          uint32_t *count_out)
{
    ckpt__ipc_reader_t rd = {p, len, 0};
    uint32_t count;
    if (rd_u32(&rd, &count)) return ckpt__error(CKPT_EPROTO, "NEED: truncated payload");
    if ((uint64_t)count * CKPT_IPC_NEED_MIN > len - rd.pos)
        return ckpt__error(CKPT_EPROTO, "NEED: %u records cannot fit in %zu bytes", count,
                           len - rd.pos);
    for (uint32_t i = 0; i < count; i++) {
        ckpt_need_decl_t d;
        uint32_t dim;
        memset(&d, 0, sizeof(d));
        int rc = rd_name(&rd, d.name, "NEED");
        if (rc) return rc;
        if (rd_u32(&rd, &dim) || rd_u64(&rd, &d.start) || rd_u64(&rd, &d.length))
            return ckpt__error(CKPT_EPROTO, "NEED: truncated record %u ('%s')", i, d.name);
        d.dim = (int32_t)dim;
        if (d.dim < -1 || d.dim >= CKPT_MAX_DIMS)
            return ckpt__error(CKPT_EPROTO, "NEED: tensor '%s': dimension %d (want -1 for the "
                               "whole tensor, or 0..%d)", d.name, d.dim, CKPT_MAX_DIMS - 1);
        if (d.dim < 0 ? d.start || d.length : d.length == 0 || d.start + d.length < d.start)
            return ckpt__error(CKPT_EPROTO, "NEED: tensor '%s': range [%llu, +%llu) of "
                               "dimension %d", d.name, (unsigned long long)d.start,
                               (unsigned long long)d.length, d.dim);
        if (out) out[i] = d;
    }
    int rc = ckpt__ipc_reader_done(&rd, "NEED");
    if (rc) return rc;
    if (out && count > 1) {
        const char **names = malloc(count * sizeof(*names));
        if (!names) return ckpt__error(CKPT_ENOMEM, "NEED: %u records", count);
        for (uint32_t i = 0; i < count; i++) names[i] = out[i].name;
        qsort(names, count, sizeof(*names), name_cmp);
        for (uint32_t i = 1; i < count; i++)
            if (strcmp(names[i - 1], names[i]) == 0) {
                rc = ckpt__error(CKPT_EPROTO, "NEED: tensor '%s' declared twice", names[i]);
                break;
            }
        free(names);
        if (rc) return rc;
    }
    *count_out = count;
    return CKPT_OK;
}

/* ---- manifest record: name, i32 dtype, u32 ndim, i64 shape[ndim], u64 nbytes,
 *      u64 checksum ---- */

size_t ckpt__ipc_manifest_size(const ckpt_tensor_meta_t *m)
{
    int ndim = m->ndim < 0 ? 0 : CKPT_MIN(m->ndim, CKPT_MAX_DIMS);
    return 2 + strnlen(m->name, CKPT_NAME_MAX - 1) + 4 + 4 + 8 * (size_t)ndim + 8 + 8;
}

size_t ckpt__ipc_manifest_encode(const ckpt_tensor_meta_t *m, uint8_t *out)
{
    int ndim = m->ndim < 0 ? 0 : CKPT_MIN(m->ndim, CKPT_MAX_DIMS);
    size_t n = strnlen(m->name, CKPT_NAME_MAX - 1);
    uint8_t *p = out;
    put_u16(p, (uint16_t)n);
    memcpy(p + 2, m->name, n);
    p += 2 + n;
    put_u32(p, (uint32_t)m->dtype);
    put_u32(p + 4, (uint32_t)ndim);
    p += 8;
    for (int d = 0; d < ndim; d++, p += 8) put_u64(p, (uint64_t)m->shape[d]);
    put_u64(p, m->nbytes);
    put_u64(p + 8, m->checksum);
    return (size_t)(p + 16 - out);
}

/* dtype, ndim and shape of a record, then nbytes checked against them. */
static int rd_dtype_shape(ckpt__ipc_reader_t *rd, ckpt_tensor_meta_t *meta, const char *what)
{
    uint32_t dtype, ndim;
    if (rd_u32(rd, &dtype) || rd_u32(rd, &ndim))
        return ckpt__error(CKPT_EPROTO, "%s '%s': truncated record", what, meta->name);
    if (ckpt_dtype_size((int)dtype) == 0)
        return ckpt__error(CKPT_EPROTO, "%s '%s': unknown dtype %u", what, meta->name, dtype);
    if (ndim > CKPT_MAX_DIMS)
        return ckpt__error(CKPT_EPROTO, "%s '%s': %u dims (max %d)", what, meta->name, ndim,
                           CKPT_MAX_DIMS);
    meta->dtype = (int32_t)dtype;
    meta->ndim = (int32_t)ndim;
    memset(meta->shape, 0, sizeof(meta->shape));
    for (uint32_t d = 0; d < ndim; d++) {
        uint64_t v;
        if (rd_u64(rd, &v))
            return ckpt__error(CKPT_EPROTO, "%s '%s': truncated shape", what, meta->name);
        if (v > (uint64_t)INT64_MAX)
            return ckpt__error(CKPT_EPROTO, "%s '%s': negative dim %u", what, meta->name, d);
        meta->shape[d] = (int64_t)v;
    }
    return CKPT_OK;
}

static int check_nbytes(const ckpt_tensor_meta_t *meta, const char *what)
{
    uint64_t numel, expect;
    if (ckpt_shape_numel(meta->shape, meta->ndim, &numel) != CKPT_OK ||
        numel > UINT64_MAX / ckpt_dtype_size(meta->dtype))
        return ckpt__error(CKPT_EPROTO, "%s '%s': shape overflows", what, meta->name);
    expect = numel * ckpt_dtype_size(meta->dtype);
    if (meta->nbytes != expect)
        return ckpt__error(CKPT_EPROTO, "%s '%s': nbytes %llu, shape says %llu", what,
                           meta->name, (unsigned long long)meta->nbytes,
                           (unsigned long long)expect);
    return CKPT_OK;
}

int ckpt__ipc_manifest_decode(ckpt__ipc_reader_t *rd, ckpt_tensor_meta_t *meta)
{
    const char *what = "BEGIN manifest tensor";
    memset(meta, 0, sizeof(*meta));
    int rc = rd_name(rd, meta->name, "BEGIN manifest tensor");
    if (rc == CKPT_OK) rc = rd_dtype_shape(rd, meta, what);
    if (rc) return rc;
    if (rd_u64(rd, &meta->nbytes) || rd_u64(rd, &meta->checksum))
        return ckpt__error(CKPT_EPROTO, "%s '%s': truncated record", what, meta->name);
    if ((rc = check_nbytes(meta, what)) != 0) return rc;
    meta->owner = -1;
    return CKPT_OK;
}

/* ---- BUCKET: u32 bucket, u32 buffer, u32 count, then count records of
 *      name, i32 dtype, u32 ndim, i64 shape[ndim], u64 offset, u64 nbytes, u64 checksum,
 *      i32 part dim, u64 part start, i64 part full ---- */

#define TENSOR_FIXED (4 + 4 + 8 + 8 + 8 + 4 + 8 + 8)
#define TENSOR_MIN (2 + 1 + TENSOR_FIXED) /* shortest record: 1-byte name, 0 dims */

size_t ckpt__ipc_tensor_size(const ckpt_tensor_meta_t *m)
{
    int ndim = m->ndim < 0 ? 0 : CKPT_MIN(m->ndim, CKPT_MAX_DIMS);
    return 2 + strnlen(m->name, CKPT_NAME_MAX - 1) + TENSOR_FIXED + 8 * (size_t)ndim;
}

size_t ckpt__ipc_bucket_encode_hdr(const ckpt__ipc_bucket_hdr_t *h, uint8_t *out)
{
    put_u32(out, h->bucket);
    put_u32(out + 4, h->buffer);
    put_u32(out + 8, h->count);
    return 12;
}

size_t ckpt__ipc_tensor_encode(const ckpt_tensor_meta_t *m, const ckpt__ipc_part_t *part,
                               uint8_t *out)
{
    static const ckpt__ipc_part_t whole = {-1, 0, 0};
    if (part == NULL) part = &whole;
    int ndim = m->ndim < 0 ? 0 : CKPT_MIN(m->ndim, CKPT_MAX_DIMS);
    size_t n = strnlen(m->name, CKPT_NAME_MAX - 1);
    uint8_t *p = out;
    put_u16(p, (uint16_t)n);
    memcpy(p + 2, m->name, n);
    p += 2 + n;
    put_u32(p, (uint32_t)m->dtype);
    put_u32(p + 4, (uint32_t)ndim);
    p += 8;
    for (int d = 0; d < ndim; d++, p += 8) put_u64(p, (uint64_t)m->shape[d]);
    put_u64(p, m->offset);
    put_u64(p + 8, m->nbytes);
    put_u64(p + 16, m->checksum);
    put_u32(p + 24, (uint32_t)part->dim);
    put_u64(p + 28, part->start);
    put_u64(p + 36, (uint64_t)part->full);
    return (size_t)(p + 44 - out);
}

int ckpt__ipc_bucket_decode_hdr(const uint8_t *p, size_t len, ckpt__ipc_bucket_hdr_t *out,
                                ckpt__ipc_reader_t *rd)
{
    ckpt__ipc_reader_t r = {p, len, 0};
    ckpt__ipc_bucket_hdr_t h;
    if (rd_u32(&r, &h.bucket) || rd_u32(&r, &h.buffer) || rd_u32(&r, &h.count))
        return ckpt__error(CKPT_EPROTO, "BUCKET: truncated header (%zu bytes)", len);
    if (h.buffer >= CKPT_IPC_MAX_BUFFERS)
        return ckpt__error(CKPT_EPROTO, "BUCKET %u: buffer index %u", h.bucket, h.buffer);
    /* Bound count by what the payload could hold before anyone sizes an array from it. */
    if ((uint64_t)h.count * TENSOR_MIN > len - r.pos)
        return ckpt__error(CKPT_EPROTO, "BUCKET %u: %u tensors cannot fit in %zu bytes",
                           h.bucket, h.count, len);
    *out = h;
    *rd = r;
    return CKPT_OK;
}

int ckpt__ipc_tensor_decode(ckpt__ipc_reader_t *rd, uint64_t buffer_size,
                            ckpt_tensor_meta_t *meta, ckpt__ipc_part_t *part)
{
    int rc = rd_name(rd, meta->name, "BUCKET tensor");
    if (rc == CKPT_OK) rc = rd_dtype_shape(rd, meta, "BUCKET tensor");
    if (rc) return rc;
    uint32_t dim;
    uint64_t start, full;
    if (rd_u64(rd, &meta->offset) || rd_u64(rd, &meta->nbytes) || rd_u64(rd, &meta->checksum) ||
        rd_u32(rd, &dim) || rd_u64(rd, &start) || rd_u64(rd, &full))
        return ckpt__error(CKPT_EPROTO, "BUCKET tensor '%s': truncated record", meta->name);
    part->dim = (int32_t)dim;
    part->start = start;
    part->full = (int64_t)full;
    if (part->dim == -1 ? start != 0 || full != 0
                        : part->dim < 0 || part->dim >= meta->ndim || (int64_t)full < 0 ||
                              start > full || (uint64_t)meta->shape[part->dim] > full - start)
        return ckpt__error(CKPT_EPROTO, "BUCKET tensor '%s': part [%llu, +%lld) of dimension "
                           "%d (extent %lld) does not fit its %d-dimensional shape", meta->name,
                           (unsigned long long)start,
                           (long long)(part->dim >= 0 && part->dim < meta->ndim
                                           ? meta->shape[part->dim] : 0),
                           part->dim, (long long)full, meta->ndim);
    if ((rc = check_nbytes(meta, "BUCKET tensor")) != 0) return rc;
    if (meta->offset > buffer_size || meta->nbytes > buffer_size - meta->offset)
        return ckpt__error(CKPT_EPROTO,
                           "BUCKET tensor '%s': bytes [%llu, +%llu) outside the %llu-byte buffer",
                           meta->name, (unsigned long long)meta->offset,
                           (unsigned long long)meta->nbytes, (unsigned long long)buffer_size);
    meta->owner = -1;
    meta->reserved = 0;
    return CKPT_OK;
}

int ckpt__ipc_reader_done(const ckpt__ipc_reader_t *rd, const char *what)
{
    if (rd->pos != rd->len)
        return ckpt__error(CKPT_EPROTO, "%s: %zu trailing bytes", what, rd->len - rd->pos);
    return CKPT_OK;
}

/* ---- status + text: i32 status, u32 length, bytes ---- */

size_t ckpt__ipc_text_size(const char *text)
{
    return 8 + strnlen(text ? text : "", CKPT_IPC_MAX_TEXT);
}

void ckpt__ipc_text_encode(int32_t status, const char *text, uint8_t *out)
{
    size_t n = strnlen(text ? text : "", CKPT_IPC_MAX_TEXT);
    put_u32(out, (uint32_t)status);
    put_u32(out + 4, (uint32_t)n);
    if (n) memcpy(out + 8, text, n);
}

int ckpt__ipc_text_decode(const uint8_t *p, size_t len, int32_t *status_out, char *text,
                          size_t cap)
{
    ckpt__ipc_reader_t rd = {p, len, 0};
    uint32_t status, n;
    const uint8_t *s;
    if (rd_u32(&rd, &status) || rd_u32(&rd, &n) || rd_take(&rd, n, &s))
        return ckpt__error(CKPT_EPROTO, "status message: truncated (%zu bytes)", len);
    size_t keep = CKPT_MIN((size_t)n, cap - 1);
    memcpy(text, s, keep);
    text[keep] = '\0';
    /* A NUL inside would silently hide the rest of the message: show it as '?'. */
    for (size_t i = 0; i < keep; i++)
        if (text[i] == '\0') text[i] = '?';
    *status_out = (int32_t)status;
    return ckpt__ipc_reader_done(&rd, "status message");
}
