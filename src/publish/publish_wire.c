/* Messages of the publish socket (docs/PUBLISH.md), framed like the worker protocol
 * (src/ipc/wire.h: 12-byte header, types PUBLISH and PUBLISH_REPLY). Pure codecs: every
 * length is checked against the bytes present before it is used.
 *
 * PUBLISH (+ exactly one fd):  u32 part, u32 nparts, u64 step, u64 size, u32 flags,
 *                              u16 name_len, name bytes (no NUL)
 *   with flag PULL (no fd):    then u32 pid, u32 nsegs, u64 header_len, header bytes,
 *                              nsegs x (u64 offset, u64 address)
 * PUBLISH_REPLY:               i32 status, u32 kind, u64 version, u16 text_len, text */
#include <string.h>

#include "publish/publish_int.h"
#include "core/le.h"

#define REQUEST_FIXED 30u
#define REPLY_FIXED 18u
#define TEXT_MAX 1023u


int ckpt__pub_check_name(const char *name)
{
    if (!name || !name[0])
        return ckpt__error(CKPT_EINVAL, "publish: the checkpoint name is empty");
    size_t n = strnlen(name, CKPT_NAME_MAX);
    if (n >= CKPT_NAME_MAX)
        return ckpt__error(CKPT_ETOOBIG, "publish: checkpoint name longer than %d bytes",
                           CKPT_NAME_MAX - 1);
    for (size_t i = 0; i < n; i++)
        if ((unsigned char)name[i] < 0x20 || name[i] == 0x7f)
            return ckpt__error(CKPT_EINVAL, "publish: checkpoint name '%s' holds a control "
                               "character at byte %zu", name, i);
    return CKPT_OK;
}

#define PULL_FIXED 16u

size_t ckpt__pub_request_size(const ckpt__pub_request_t *r)
{
    size_t n = REQUEST_FIXED + strnlen(r->name, CKPT_NAME_MAX - 1);
    if (r->flags & CKPT__PUB_FLAG_PULL)
        n += PULL_FIXED + (size_t)r->header_len + (size_t)r->nsegs * CKPT__PUB_SEG_BYTES;
    return n;
}

void ckpt__pub_request_encode(const ckpt__pub_request_t *r, uint8_t *out)
{
    size_t n = strnlen(r->name, CKPT_NAME_MAX - 1);
    put_u32(out, r->part);
    put_u32(out + 4, r->nparts);
    put_u64(out + 8, r->step);
    put_u64(out + 16, r->size);
    put_u32(out + 24, r->flags);
    put_u16(out + 28, (uint16_t)n);
    memcpy(out + REQUEST_FIXED, r->name, n);
    if (!(r->flags & CKPT__PUB_FLAG_PULL)) return;
    uint8_t *q = out + REQUEST_FIXED + n;
    put_u32(q, r->pid);
    put_u32(q + 4, r->nsegs);
    put_u64(q + 8, r->header_len);
    memcpy(q + PULL_FIXED, r->header, (size_t)r->header_len);
    memcpy(q + PULL_FIXED + r->header_len, r->segs, (size_t)r->nsegs * CKPT__PUB_SEG_BYTES);
}

int ckpt__pub_request_decode(const uint8_t *p, size_t len, ckpt__pub_request_t *out)
{
    if (len < REQUEST_FIXED)
        return ckpt__error(CKPT_EPROTO, "PUBLISH: %zu bytes, at least %u expected", len,
                           REQUEST_FIXED);
    memset(out, 0, sizeof(*out));
    out->part = get_u32(p);
    out->nparts = get_u32(p + 4);
    out->step = get_u64(p + 8);
    out->size = get_u64(p + 16);
    out->flags = get_u32(p + 24);
    size_t n = get_u16(p + 28);
    int pull = (out->flags & CKPT__PUB_FLAG_PULL) != 0;
    if (pull ? n + PULL_FIXED > len - REQUEST_FIXED : n != len - REQUEST_FIXED)
        return ckpt__error(CKPT_EPROTO, "PUBLISH: name of %zu bytes in a %zu-byte message", n,
                           len);
    if (pull) {
        const uint8_t *q = p + REQUEST_FIXED + n;
        size_t rest = len - REQUEST_FIXED - n - PULL_FIXED;
        out->pid = get_u32(q);
        out->nsegs = get_u32(q + 4);
        out->header_len = get_u64(q + 8);
        if (out->header_len < 8 || out->header_len > rest ||
            (rest - out->header_len) / CKPT__PUB_SEG_BYTES != out->nsegs ||
            (rest - out->header_len) % CKPT__PUB_SEG_BYTES != 0)
            return ckpt__error(CKPT_EPROTO, "PUBLISH (pull): a %llu-byte header and %u segments "
                               "do not fill the %zu bytes after the name",
                               (unsigned long long)out->header_len, out->nsegs, rest);
        out->header = q + PULL_FIXED;
        out->segs = out->header + out->header_len;
    }
    if (n >= CKPT_NAME_MAX)
        return ckpt__error(CKPT_ETOOBIG, "PUBLISH: checkpoint name longer than %d bytes",
                           CKPT_NAME_MAX - 1);
    memcpy(out->name, p + REQUEST_FIXED, n);
    if (memchr(out->name, '\0', n) != NULL)
        return ckpt__error(CKPT_EPROTO, "PUBLISH: checkpoint name holds a NUL byte");
    int rc = ckpt__pub_check_name(out->name);
    if (rc) return rc;
    if (out->nparts == 0 || out->nparts > CKPT__PUB_MAX_PARTS)
        return ckpt__error(CKPT_EINVAL, "PUBLISH '%s': %u parts (1..%u allowed)", out->name,
                           out->nparts, CKPT__PUB_MAX_PARTS);
    if (out->part >= out->nparts)
        return ckpt__error(CKPT_EINVAL, "PUBLISH '%s': part %u of %u (parts count from 0)",
                           out->name, out->part, out->nparts);
    if (out->flags & ~(CKPT__PUB_FLAG_WAIT | CKPT__PUB_FLAG_PULL))
        return ckpt__error(CKPT_EPROTO, "PUBLISH '%s': unknown flags 0x%x", out->name,
                           out->flags);
    return CKPT_OK;
}

size_t ckpt__pub_reply_size(const char *text)
{
    return REPLY_FIXED + (text ? strnlen(text, TEXT_MAX) : 0);
}

void ckpt__pub_reply_encode(int32_t status, uint32_t kind, uint64_t version, const char *text,
                            uint8_t *out)
{
    size_t n = text ? strnlen(text, TEXT_MAX) : 0;
    put_u32(out, (uint32_t)status);
    put_u32(out + 4, kind);
    put_u64(out + 8, version);
    put_u16(out + 16, (uint16_t)n);
    if (n) memcpy(out + REPLY_FIXED, text, n);
}

int ckpt__pub_reply_decode(const uint8_t *p, size_t len, int32_t *status, uint32_t *kind,
                           uint64_t *version, char *text, size_t cap)
{
    if (len < REPLY_FIXED)
        return ckpt__error(CKPT_EPROTO, "PUBLISH_REPLY: %zu bytes, at least %u expected", len,
                           REPLY_FIXED);
    size_t n = get_u16(p + 16);
    if (n != len - REPLY_FIXED)
        return ckpt__error(CKPT_EPROTO, "PUBLISH_REPLY: text of %zu bytes in a %zu-byte "
                           "message", n, len);
    *status = (int32_t)get_u32(p);
    *kind = get_u32(p + 4);
    *version = get_u64(p + 8);
    if (*kind < CKPT__PUB_ACCEPTED || *kind > CKPT__PUB_REFUSED)
        return ckpt__error(CKPT_EPROTO, "PUBLISH_REPLY: unknown kind %u", *kind);
    if (*status > 0 || (*kind == CKPT__PUB_REFUSED) != (*status < 0))
        return ckpt__error(CKPT_EPROTO, "PUBLISH_REPLY: status %d does not fit kind %u",
                           (int)*status, *kind);
    if (cap) {
        size_t c = CKPT_MIN(n, cap - 1);
        memcpy(text, p + REPLY_FIXED, c);
        text[c] = '\0';
    }
    return CKPT_OK;
}
