/* Codecs of the worker protocol, version 4 (src/ipc/wire.h, docs/PROTOCOL.md): BEGIN with
 * its manifest and flags, the frame header (COMMIT, version refusal), BUCKET and the status
 * texts, each round trip; and the refusals of malformed payloads, with the status and the
 * field they name. No sockets: test_ipc.c drives the same codecs over real connections. */
#include "test.h"

#include "ipc/wire.h"

static ckpt_tensor_meta_t meta(const char *name, int dtype, int ndim, const int64_t *shape,
                               uint64_t checksum)
{
    ckpt_tensor_meta_t m;
    memset(&m, 0, sizeof(m));
    snprintf(m.name, sizeof(m.name), "%s", name);
    m.dtype = dtype;
    m.ndim = ndim;
    uint64_t numel = 1;
    for (int d = 0; d < ndim; d++) {
        m.shape[d] = shape[d];
        numel *= (uint64_t)shape[d];
    }
    m.nbytes = numel * ckpt_dtype_size(dtype);
    m.checksum = checksum;
    m.offset = 12345; /* not on the wire: the decoder must not invent it */
    m.owner = 7;
    return m;
}

/* Three tensors: a matrix, a scalar (0 dims) and one with every dim allowed. */
static const int64_t SHAPE_2D[] = {3, 5};
static const int64_t SHAPE_8D[] = {1, 2, 1, 2, 1, 2, 1, 3};

typedef struct {
    ckpt_tensor_meta_t manifest[3];
    ckpt__ipc_begin_msg_t m;
    uint8_t buf[4096];
    size_t len;
} begin_fixture_t;

static void begin_fixture(begin_fixture_t *f, uint32_t flags)
{
    memset(f, 0, sizeof(*f));
    f->manifest[0] = meta("model.layers.0.mlp.up_proj.weight", CKPT_DTYPE_BF16, 2, SHAPE_2D,
                          0x0123456789abcdefull);
    f->manifest[1] = meta("s", CKPT_DTYPE_F32, 0, NULL, 0);
    f->manifest[2] = meta("eight.dims", CKPT_DTYPE_I64, 8, SHAPE_8D, 0xffffffffffffffffull);
    f->m.update_id = 0x1122334455667788ull;
    f->m.version = 0x8877665544332211ull;
    f->m.nbuckets = 9;
    f->m.flags = flags;
    f->m.nbuffers = 3;
    f->m.max_tensors = 4;
    f->m.buffer_sizes[0] = 4096;
    f->m.buffer_sizes[1] = 1u << 20;
    f->m.buffer_sizes[2] = 1;
    snprintf(f->m.name, sizeof(f->m.name), "ckpt-v3");
    f->m.manifest = f->manifest;
    f->m.manifest_count = 3;
    f->len = ckpt__ipc_begin_size(&f->m);
    CHECK(f->len <= sizeof(f->buf));
    ckpt__ipc_begin_encode(&f->m, f->buf);
}

/* Offset of the manifest count in the fixture's payload (after sizes and name). */
static size_t count_pos(const begin_fixture_t *f)
{
    return 32 + 12 * f->m.nbuffers + 2 + strlen(f->m.name);
}

static void put32(uint8_t *p, uint32_t v)
{
    for (int i = 0; i < 4; i++) p[i] = (uint8_t)(v >> (8 * i));
}

static void test_begin_round_trip(void)
{
    begin_fixture_t f;
    begin_fixture(&f, CKPT_IPC_BEGIN_VERIFY | CKPT_IPC_BEGIN_STABLE | CKPT_IPC_BEGIN_PARTIAL);
    ckpt__ipc_begin_msg_t d;
    CHECK_OK(ckpt__ipc_begin_decode(f.buf, f.len, &d));
    CHECK(d.update_id == f.m.update_id && d.version == f.m.version);
    CHECK(d.nbuckets == 9 && d.nbuffers == 3 && d.max_tensors == 4);
    CHECK(d.flags == (CKPT_IPC_BEGIN_VERIFY | CKPT_IPC_BEGIN_STABLE | CKPT_IPC_BEGIN_PARTIAL));
    CHECK(d.buffer_sizes[0] == 4096 && d.buffer_sizes[1] == (1u << 20) && d.buffer_sizes[2] == 1);
    CHECK_STR(d.name, "ckpt-v3");
    CHECK(d.manifest_count == 3);
    CHECK(d.manifest == NULL); /* the decoder allocates nothing: records are read again */
    CHECK(d.manifest_pos == count_pos(&f) + 4);
    ckpt__ipc_reader_t rd = {f.buf, f.len, d.manifest_pos};
    for (int i = 0; i < 3; i++) {
        ckpt_tensor_meta_t t;
        CHECK_OK(ckpt__ipc_manifest_decode(&rd, &t));
        const ckpt_tensor_meta_t *w = &f.manifest[i];
        CHECK_STR(t.name, w->name);
        CHECK(t.dtype == w->dtype && t.ndim == w->ndim && t.nbytes == w->nbytes);
        CHECK(t.checksum == w->checksum);
        CHECK(memcmp(t.shape, w->shape, sizeof(t.shape)) == 0);
        CHECK(t.offset == 0 && t.owner == -1); /* not carried by a manifest record */
    }
    CHECK_OK(ckpt__ipc_reader_done(&rd, "manifest"));
    /* The layout is canonical: the decoded message with its records re-encodes byte for
     * byte (what the fuzzer checks for any accepted BEGIN). */
    ckpt_tensor_meta_t again_manifest[3];
    rd.pos = d.manifest_pos;
    for (int i = 0; i < 3; i++) CHECK_OK(ckpt__ipc_manifest_decode(&rd, &again_manifest[i]));
    d.manifest = again_manifest;
    uint8_t again[sizeof(f.buf)];
    CHECK(ckpt__ipc_begin_size(&d) == f.len);
    ckpt__ipc_begin_encode(&d, again);
    CHECK(memcmp(again, f.buf, f.len) == 0);
}

/* PREPARE: buffers, no update and no manifest (count 0). */
static void test_prepare_begin(void)
{
    ckpt__ipc_begin_msg_t m, d;
    memset(&m, 0, sizeof(m));
    m.flags = CKPT_IPC_BEGIN_PREPARE;
    m.nbuffers = 1;
    m.buffer_sizes[0] = 8192;
    snprintf(m.name, sizeof(m.name), "p");
    uint8_t buf[128];
    size_t len = ckpt__ipc_begin_size(&m);
    CHECK(len == 32 + 12 + 2 + 1 + 4);
    ckpt__ipc_begin_encode(&m, buf);
    CHECK_OK(ckpt__ipc_begin_decode(buf, len, &d));
    CHECK(d.flags == CKPT_IPC_BEGIN_PREPARE && d.manifest_count == 0 && d.manifest_pos == len);
    /* A version-2 BEGIN is this one without its manifest count: refused, by name. */
    CHECK_RC(ckpt__ipc_begin_decode(buf, len - 4, &d), CKPT_EPROTO);
    CHECK_ERR_HAS("no manifest count");
    /* A kind this receiver does not know is refused, naming the buffer and kind. */
    ckpt__ipc_begin_encode(&m, buf);
    put32(buf + 32 + 8, 3);
    CHECK_RC(ckpt__ipc_begin_decode(buf, len, &d), CKPT_EPROTO);
    CHECK_ERR_HAS("buffer 0 is of kind 3");
    /* A device kind announces a 64-byte handle: without it the payload is short. */
    ckpt__ipc_begin_encode(&m, buf);
    put32(buf + 32 + 8, CKPT_IPC_BUFFER_CUDA);
    CHECK_RC(ckpt__ipc_begin_decode(buf, len, &d), CKPT_EPROTO);
}

/* Device buffers (the GPU path): kinds and handles round trip; host buffers carry none. */
static void test_device_buffers(void)
{
    ckpt__ipc_begin_msg_t m, d;
    memset(&m, 0, sizeof(m));
    m.nbuffers = 3;
    m.buffer_sizes[0] = m.buffer_sizes[1] = 1 << 20;
    m.buffer_sizes[2] = 4096;
    m.buffer_kinds[0] = CKPT_IPC_BUFFER_CUDA;
    m.buffer_kinds[1] = CKPT_IPC_BUFFER_SIM;
    m.buffer_kinds[2] = CKPT_IPC_BUFFER_HOST;
    for (int i = 0; i < CKPT_IPC_HANDLE_BYTES; i++) {
        m.buffer_handles[0][i] = (uint8_t)(i + 1);
        m.buffer_handles[1][i] = (uint8_t)(200 - i);
        m.buffer_handles[2][i] = 0x55; /* not sent: a host buffer's fd travels instead */
    }
    snprintf(m.name, sizeof(m.name), "dev");
    uint8_t buf[512];
    size_t len = ckpt__ipc_begin_size(&m);
    CHECK(len == 32 + 3 * 12 + 2 * CKPT_IPC_HANDLE_BYTES + 2 + 3 + 4);
    ckpt__ipc_begin_encode(&m, buf);
    CHECK_OK(ckpt__ipc_begin_decode(buf, len, &d));
    CHECK(d.nbuffers == 3);
    for (int i = 0; i < 3; i++) {
        CHECK(d.buffer_kinds[i] == m.buffer_kinds[i]);
        CHECK(d.buffer_sizes[i] == m.buffer_sizes[i]);
    }
    CHECK(memcmp(d.buffer_handles[0], m.buffer_handles[0], CKPT_IPC_HANDLE_BYTES) == 0);
    CHECK(memcmp(d.buffer_handles[1], m.buffer_handles[1], CKPT_IPC_HANDLE_BYTES) == 0);
    CHECK(d.buffer_handles[2][0] == 0);
    /* Cut anywhere inside the handles: refused, never read past the payload. */
    for (size_t cut = 32 + 12; cut < 32 + 2 * 12 + 2 * CKPT_IPC_HANDLE_BYTES; cut += 7)
        CHECK_RC(ckpt__ipc_begin_decode(buf, cut, &d), CKPT_EPROTO);
}

/* NEED: round trip; every refusal names the record. */
static void test_need(void)
{
    ckpt_need_decl_t in[3], out[3];
    memset(in, 0, sizeof(in));
    snprintf(in[0].name, sizeof(in[0].name), "model.layers.0.self_attn.q_proj.weight");
    in[0].dim = 0, in[0].start = 64, in[0].length = 64;
    snprintf(in[1].name, sizeof(in[1].name), "model.norm.weight");
    in[1].dim = -1;
    snprintf(in[2].name, sizeof(in[2].name), "o");
    in[2].dim = 1, in[2].start = 0, in[2].length = 1;
    uint8_t buf[512];
    size_t len = ckpt__ipc_need_size(in, 3);
    CHECK(len == 4 + (2 + strlen(in[0].name) + 20) + (2 + 17 + 20) + (2 + 1 + 20));
    ckpt__ipc_need_encode(in, 3, buf);
    uint32_t n = 0;
    CHECK_OK(ckpt__ipc_need_decode(buf, len, out, &n));
    CHECK(n == 3);
    for (int i = 0; i < 3; i++) {
        CHECK_STR(out[i].name, in[i].name);
        CHECK(out[i].dim == in[i].dim && out[i].start == in[i].start &&
              out[i].length == in[i].length);
    }
    CHECK_OK(ckpt__ipc_need_decode(buf, len, NULL, &n)); /* validate only */
    for (size_t cut = 0; cut < len; cut++) /* every prefix refused, never read past it */
        CHECK_RC(ckpt__ipc_need_decode(buf, cut, out, &n), CKPT_EPROTO);
    /* an empty declaration: needs nothing */
    len = ckpt__ipc_need_size(in, 0);
    ckpt__ipc_need_encode(in, 0, buf);
    CHECK_OK(ckpt__ipc_need_decode(buf, len, out, &n));
    CHECK(n == 0 && len == 4);
    /* refusals */
    ckpt_need_decl_t bad = in[0];
    bad.dim = 8;
    ckpt__ipc_need_encode(&bad, 1, buf);
    CHECK_RC(ckpt__ipc_need_decode(buf, ckpt__ipc_need_size(&bad, 1), out, &n), CKPT_EPROTO);
    CHECK_ERR_HAS("dimension 8");
    bad.dim = 0, bad.length = 0;
    ckpt__ipc_need_encode(&bad, 1, buf);
    CHECK_RC(ckpt__ipc_need_decode(buf, ckpt__ipc_need_size(&bad, 1), out, &n), CKPT_EPROTO);
    CHECK_ERR_HAS("range [64, +0)");
    bad = in[1], bad.start = 3; /* whole, with a range */
    ckpt__ipc_need_encode(&bad, 1, buf);
    CHECK_RC(ckpt__ipc_need_decode(buf, ckpt__ipc_need_size(&bad, 1), out, &n), CKPT_EPROTO);
    ckpt_need_decl_t twice[2] = {in[1], in[1]};
    ckpt__ipc_need_encode(twice, 2, buf);
    CHECK_RC(ckpt__ipc_need_decode(buf, ckpt__ipc_need_size(twice, 2), out, &n), CKPT_EPROTO);
    CHECK_ERR_HAS("'model.norm.weight' declared twice");
    /* a count the bytes cannot hold is refused before anything is read */
    put32(buf, 1000);
    CHECK_RC(ckpt__ipc_need_decode(buf, 40, out, &n), CKPT_EPROTO);
    CHECK_ERR_HAS("1000 records cannot fit");
}

/* Every proper prefix of a valid BEGIN is refused with EPROTO (never read past the end:
 * the ASan tree runs this), and a cut inside the manifest says what is missing. */
static void test_begin_truncated(void)
{
    begin_fixture_t f;
    begin_fixture(&f, CKPT_IPC_BEGIN_VERIFY);
    ckpt__ipc_begin_msg_t d;
    for (size_t n = 0; n < f.len; n++) {
        uint8_t *cut = malloc(n ? n : 1); /* exact size: ASan sees any overread */
        memcpy(cut, f.buf, n);
        int rc = ckpt__ipc_begin_decode(cut, n, &d);
        if (rc != CKPT_EPROTO) {
            fprintf(stderr, "  prefix of %zu/%zu bytes: %s\n", n, f.len, ckpt_status_name(rc));
            CHECK_RC(rc, CKPT_EPROTO);
        }
        free(cut);
    }
    /* Cut in the last record's checksum: the record count still fits, the record not. */
    CHECK_RC(ckpt__ipc_begin_decode(f.buf, f.len - 3, &d), CKPT_EPROTO);
    CHECK_ERR_HAS("BEGIN manifest tensor 'eight.dims': truncated record");
    /* Cuts in the last record that leave room for the count (3 x the shortest record): in
     * its shape, and in its name. Shorter cuts are refused by the count bound below. */
    const size_t last = f.len - ckpt__ipc_manifest_size(&f.manifest[2]);
    CHECK_RC(ckpt__ipc_begin_decode(f.buf, last + 2 + 10 + 8 + 20, &d), CKPT_EPROTO);
    CHECK_ERR_HAS("'eight.dims': truncated shape");
    CHECK_RC(ckpt__ipc_begin_decode(f.buf, last + 5, &d), CKPT_EPROTO);
    CHECK_ERR_HAS("BEGIN manifest tensor: truncated name");
    CHECK_RC(ckpt__ipc_begin_decode(f.buf, count_pos(&f) + 4 + 30, &d), CKPT_EPROTO);
    CHECK_ERR_HAS("3 manifest records cannot fit in 30 bytes");
}

/* Manifest counts that cannot be true are refused before anyone sizes an array from them,
 * whatever 32-bit product they would make. */
static void test_begin_manifest_counts(void)
{
    const uint32_t bad[] = {4, 1000, 0x09b00000u /* x 27 wraps 32 bits */, 0x80000000u,
                            0xffffffffu};
    for (size_t i = 0; i < CKPT_ARRAY_SIZE(bad); i++) {
        begin_fixture_t f;
        begin_fixture(&f, 0);
        put32(f.buf + count_pos(&f), bad[i]);
        ckpt__ipc_begin_msg_t d;
        CHECK_RC(ckpt__ipc_begin_decode(f.buf, f.len, &d), CKPT_EPROTO);
        if (bad[i] > 4) CHECK_ERR_HAS("manifest records cannot fit");
        else CHECK_ERR_HAS("truncated"); /* 4 fits by size, the 4th record is missing */
    }
    /* Fewer records announced than sent: the rest are trailing bytes. */
    begin_fixture_t f;
    begin_fixture(&f, 0);
    put32(f.buf + count_pos(&f), 2);
    ckpt__ipc_begin_msg_t d;
    CHECK_RC(ckpt__ipc_begin_decode(f.buf, f.len, &d), CKPT_EPROTO);
    CHECK_ERR_HAS("trailing bytes");
    /* Buffer counts outside 1..64, read before the sizes they announce. */
    begin_fixture(&f, 0);
    put32(f.buf + 24, 0);
    CHECK_RC(ckpt__ipc_begin_decode(f.buf, f.len, &d), CKPT_EPROTO);
    CHECK_ERR_HAS("0 buffers, want 1..64");
    put32(f.buf + 24, CKPT_IPC_MAX_BUFFERS + 1);
    CHECK_RC(ckpt__ipc_begin_decode(f.buf, f.len, &d), CKPT_EPROTO);
    CHECK_ERR_HAS("65 buffers");
    put32(f.buf + 24, 0xffffffffu);
    CHECK_RC(ckpt__ipc_begin_decode(f.buf, f.len, &d), CKPT_EPROTO);
}

/* One manifest record, encoded alone, then spoiled field by field. */
static size_t record(uint8_t *out, const ckpt_tensor_meta_t *m)
{
    return ckpt__ipc_manifest_encode(m, out);
}

static int decode_record(const uint8_t *p, size_t len)
{
    ckpt__ipc_reader_t rd = {p, len, 0};
    ckpt_tensor_meta_t t;
    int rc = ckpt__ipc_manifest_decode(&rd, &t);
    return rc ? rc : ckpt__ipc_reader_done(&rd, "record");
}

static void test_manifest_record_refusals(void)
{
    uint8_t b[512];
    ckpt_tensor_meta_t m = meta("w", CKPT_DTYPE_F16, 2, SHAPE_2D, 42);
    size_t n = record(b, &m);
    CHECK(n == ckpt__ipc_manifest_size(&m) && n == 2 + 1 + 4 + 4 + 16 + 8 + 8);
    CHECK_OK(decode_record(b, n));
    /* name: u16 length 0, or a NUL inside */
    b[0] = 0;
    CHECK_RC(decode_record(b, n), CKPT_EPROTO);
    CHECK_ERR_HAS("name length 0 outside 1..255");
    record(b, &m);
    b[2] = 0;
    CHECK_RC(decode_record(b, n), CKPT_EPROTO);
    CHECK_ERR_HAS("NUL");
    /* dtype unknown */
    record(b, &m);
    put32(b + 3, 99);
    CHECK_RC(decode_record(b, n), CKPT_EPROTO);
    CHECK_ERR_HAS("'w': unknown dtype 99");
    /* ndim over the limit */
    record(b, &m);
    put32(b + 7, CKPT_MAX_DIMS + 1);
    CHECK_RC(decode_record(b, n), CKPT_EPROTO);
    CHECK_ERR_HAS("'w': 9 dims (max 8)");
    /* nbytes that the shape does not give */
    ckpt_tensor_meta_t wrong = m;
    wrong.nbytes += 2;
    n = record(b, &wrong);
    CHECK_RC(decode_record(b, n), CKPT_EPROTO);
    CHECK_ERR_HAS("'w': nbytes 32, shape says 30");
    /* a negative dim, and dims whose product overflows 64 bits */
    ckpt_tensor_meta_t neg = m;
    neg.shape[1] = -1;
    n = record(b, &neg);
    CHECK_RC(decode_record(b, n), CKPT_EPROTO);
    CHECK_ERR_HAS("'w': negative dim 1");
    const int64_t huge[] = {INT64_MAX / 2, INT64_MAX / 2, 4};
    ckpt_tensor_meta_t big = meta("w", CKPT_DTYPE_F64, 3, huge, 0);
    n = record(b, &big);
    CHECK_RC(decode_record(b, n), CKPT_EPROTO);
    CHECK_ERR_HAS("'w': shape overflows");
    /* the largest dims whose bytes still fit are accepted */
    const int64_t edge[] = {(int64_t)(UINT64_MAX / 8)};
    ckpt_tensor_meta_t e = meta("w", CKPT_DTYPE_F64, 1, edge, 0);
    n = record(b, &e);
    CHECK_OK(decode_record(b, n));
    /* A bad record inside a BEGIN is refused the same way. */
    begin_fixture_t f;
    begin_fixture(&f, 0);
    f.manifest[1].nbytes = 8;
    f.len = ckpt__ipc_begin_size(&f.m);
    ckpt__ipc_begin_encode(&f.m, f.buf);
    ckpt__ipc_begin_msg_t d;
    CHECK_RC(ckpt__ipc_begin_decode(f.buf, f.len, &d), CKPT_EPROTO);
    CHECK_ERR_HAS("BEGIN manifest tensor 's': nbytes 8, shape says 4");
}

static void test_header(void)
{
    uint8_t h[CKPT_IPC_HDR_SIZE];
    ckpt__ipc_hdr_t d;
    /* Version 4 frames of every type, NEED (new in 4) included. */
    for (uint32_t t = CKPT_IPC_MSG_BEGIN; t <= CKPT_IPC_MSG_LAST; t++) {
        ckpt__ipc_hdr_encode(h, t, 77);
        CHECK(h[4] == 4 && h[5] == 0);
        CHECK_OK(ckpt__ipc_hdr_decode(h, "peer", &d));
        CHECK(d.type == t && d.length == 77);
    }
    CHECK(CKPT_IPC_MSG_LAST == CKPT_IPC_MSG_NEED);
    CHECK_STR(ckpt__ipc_msg_name(CKPT_IPC_MSG_COMMIT), "COMMIT");
    CHECK_STR(ckpt__ipc_msg_name(CKPT_IPC_MSG_NEED), "NEED");
    /* Another version: refused naming both, whatever it carries. */
    const uint16_t other[] = {1, 2, 3, 5, 0xffff};
    for (size_t i = 0; i < CKPT_ARRAY_SIZE(other); i++) {
        ckpt__ipc_hdr_encode(h, CKPT_IPC_MSG_BEGIN, 10);
        h[4] = (uint8_t)other[i];
        h[5] = (uint8_t)(other[i] >> 8);
        CHECK_RC(ckpt__ipc_hdr_decode(h, "rank-0.sock", &d), CKPT_EPROTO);
        char want[64];
        snprintf(want, sizeof(want), "rank-0.sock: protocol version %u, this side speaks 4",
                 other[i]);
        CHECK_ERR_HAS(want);
    }
    ckpt__ipc_hdr_encode(h, CKPT_IPC_MSG_LAST + 1, 0);
    CHECK_RC(ckpt__ipc_hdr_decode(h, "peer", &d), CKPT_EPROTO);
    CHECK_ERR_HAS("unknown message type 13");
    ckpt__ipc_hdr_encode(h, 0, 0);
    CHECK_RC(ckpt__ipc_hdr_decode(h, "peer", &d), CKPT_EPROTO);
    ckpt__ipc_hdr_encode(h, CKPT_IPC_MSG_BUCKET, CKPT_IPC_MAX_PAYLOAD + 1);
    CHECK_RC(ckpt__ipc_hdr_decode(h, "peer", &d), CKPT_ETOOBIG);
    CHECK_ERR_HAS("BUCKET payload");
    ckpt__ipc_hdr_encode(h, CKPT_IPC_MSG_OK, 0);
    h[0] ^= 1;
    CHECK_RC(ckpt__ipc_hdr_decode(h, "peer", &d), CKPT_EPROTO);
    CHECK_ERR_HAS("bad magic");
}

static void test_bucket(void)
{
    uint8_t b[1024];
    ckpt__ipc_bucket_hdr_t h = {5, 1, 2}, dh;
    ckpt_tensor_meta_t t[2] = {meta("a", CKPT_DTYPE_F32, 2, SHAPE_2D, 9),
                               meta("b", CKPT_DTYPE_U8, 0, NULL, 0)};
    t[0].offset = 0;
    t[1].offset = 60;
    size_t n = ckpt__ipc_bucket_encode_hdr(&h, b);
    for (int i = 0; i < 2; i++) {
        CHECK(ckpt__ipc_tensor_size(&t[i]) == ckpt__ipc_tensor_encode(&t[i], NULL, b + n));
        n += ckpt__ipc_tensor_size(&t[i]);
    }
    ckpt__ipc_reader_t rd;
    CHECK_OK(ckpt__ipc_bucket_decode_hdr(b, n, &dh, &rd));
    CHECK(dh.bucket == 5 && dh.buffer == 1 && dh.count == 2);
    ckpt_tensor_meta_t d;
    ckpt__ipc_part_t part;
    CHECK_OK(ckpt__ipc_tensor_decode(&rd, 61, &d, &part));
    CHECK(strcmp(d.name, "a") == 0 && d.offset == 0 && d.nbytes == 60 && d.checksum == 9);
    CHECK(part.dim == -1 && part.start == 0 && part.full == 0);
    CHECK_OK(ckpt__ipc_tensor_decode(&rd, 61, &d, &part));
    CHECK(strcmp(d.name, "b") == 0 && d.offset == 60 && d.nbytes == 1 && d.ndim == 0);
    CHECK_OK(ckpt__ipc_reader_done(&rd, "BUCKET"));
    /* A tensor that ends one byte past its buffer. */
    CHECK_OK(ckpt__ipc_bucket_decode_hdr(b, n, &dh, &rd));
    CHECK_OK(ckpt__ipc_tensor_decode(&rd, 60, &d, &part));
    CHECK_RC(ckpt__ipc_tensor_decode(&rd, 60, &d, &part), CKPT_EPROTO);
    CHECK_ERR_HAS("'b': bytes [60, +1) outside the 60-byte buffer");
    /* A record cut short. */
    CHECK_OK(ckpt__ipc_bucket_decode_hdr(b, n - 1, &dh, &rd));
    CHECK_OK(ckpt__ipc_tensor_decode(&rd, 61, &d, &part));
    CHECK_RC(ckpt__ipc_tensor_decode(&rd, 61, &d, &part), CKPT_EPROTO);
    CHECK_ERR_HAS("'b': truncated record");
    /* Parts: rows [4, 4 + shape[0]) of 9 along dim 0 decode; a part past its extent, a
     * dim outside the shape and a whole record with a start are refused by name. */
    ckpt_tensor_meta_t pm = t[0];
    const ckpt__ipc_part_t good = {0, 4, 9}, past = {0, 8, 9}, baddim = {2, 0, 9},
                           wholestart = {-1, 3, 0};
    const ckpt__ipc_part_t *cases[] = {&good, &past, &baddim, &wholestart};
    for (int c = 0; c < 4; c++) {
        size_t m = ckpt__ipc_bucket_encode_hdr(&(ckpt__ipc_bucket_hdr_t){0, 0, 1}, b);
        m += ckpt__ipc_tensor_encode(&pm, cases[c], b + m);
        CHECK_OK(ckpt__ipc_bucket_decode_hdr(b, m, &dh, &rd));
        if (c == 0) {
            CHECK_OK(ckpt__ipc_tensor_decode(&rd, 61, &d, &part));
            CHECK(part.dim == 0 && part.start == 4 && part.full == 9 && d.nbytes == 60);
        } else {
            CHECK_RC(ckpt__ipc_tensor_decode(&rd, 61, &d, &part), CKPT_EPROTO);
            CHECK_ERR_HAS("does not fit its 2-dimensional shape");
        }
    }
    n = ckpt__ipc_bucket_encode_hdr(&h, b);
    for (int i = 0; i < 2; i++) n += ckpt__ipc_tensor_encode(&t[i], NULL, b + n);
    /* Counts the payload cannot hold (one more than sent; products that wrap 32 bits). */
    const uint32_t bad[] = {3, 0x0a000000u, 0xffffffffu};
    for (size_t i = 0; i < CKPT_ARRAY_SIZE(bad); i++) {
        put32(b + 8, bad[i]);
        CHECK_RC(ckpt__ipc_bucket_decode_hdr(b, n, &dh, &rd), CKPT_EPROTO);
        CHECK_ERR_HAS("tensors cannot fit");
    }
    /* A buffer index past the protocol's limit. */
    put32(b + 8, 2);
    put32(b + 4, CKPT_IPC_MAX_BUFFERS);
    CHECK_RC(ckpt__ipc_bucket_decode_hdr(b, n, &dh, &rd), CKPT_EPROTO);
    CHECK_ERR_HAS("buffer index 64");
}

/* ERR / REFUSE / ABORT payloads. */
static void test_text(void)
{
    uint8_t b[64];
    int32_t st;
    char text[32];
    const char *reason = "aborted: rank 1 failed";
    ckpt__ipc_text_encode(0, reason, b);
    size_t n = ckpt__ipc_text_size(reason);
    CHECK(n == 8 + strlen(reason));
    CHECK_OK(ckpt__ipc_text_decode(b, n, &st, text, sizeof(text)));
    CHECK(st == 0);
    CHECK_STR(text, reason);
    ckpt__ipc_text_encode(CKPT_EPROTO, "x", b);
    CHECK_OK(ckpt__ipc_text_decode(b, 9, &st, text, sizeof(text)));
    CHECK(st == CKPT_EPROTO);
    CHECK_RC(ckpt__ipc_text_decode(b, 8, &st, text, sizeof(text)), CKPT_EPROTO);
    CHECK_ERR_HAS("truncated");
    CHECK_RC(ckpt__ipc_text_decode(b, 10, &st, text, sizeof(text)), CKPT_EPROTO);
    CHECK_ERR_HAS("trailing bytes");
    put32(b + 4, 0xffffffffu); /* a length that would wrap a 32-bit position */
    CHECK_RC(ckpt__ipc_text_decode(b, 9, &st, text, sizeof(text)), CKPT_EPROTO);
}

int main(void)
{
    RUN_TEST(test_begin_round_trip);
    RUN_TEST(test_prepare_begin);
    RUN_TEST(test_device_buffers);
    RUN_TEST(test_need);
    RUN_TEST(test_begin_truncated);
    RUN_TEST(test_begin_manifest_counts);
    RUN_TEST(test_manifest_record_refusals);
    RUN_TEST(test_header);
    RUN_TEST(test_bucket);
    RUN_TEST(test_text);
    TEST_EXIT();
}
