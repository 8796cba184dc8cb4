/* Publishing, trainer side and the engine rank's listener, without MPI: the memfd layout
 * parses with the safetensors reader, the seals are there, bad inputs are refused with
 * their cause, and the listener checks what it is sent (seals, uid rule, steps) and answers
 * a waiting publisher with what registration decided. */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "ckpt/publish.h"
#include "ckpt/store.h"
#include "ipc/conn.h"
#include "publish/publish_int.h"
#include "test.h"

#define NT 5

static void sample(ckpt_tensor_meta_t m[NT])
{
    int64_t s0[2] = {3, 5}, s1[1] = {7}, s2[2] = {2, 3}, s3[1] = {0}, s4[1] = {0};
    memset(m, 0, NT * sizeof(*m));
    ckpt_tensor_meta_init(&m[0], "layers.0.w", CKPT_DTYPE_F32, s0, 2);
    ckpt_tensor_meta_init(&m[1], "odd.i8", CKPT_DTYPE_I8, s1, 1);
    ckpt_tensor_meta_init(&m[2], "bf", CKPT_DTYPE_BF16, s2, 2);
    ckpt_tensor_meta_init(&m[3], "empty", CKPT_DTYPE_U8, s3, 1);
    ckpt_tensor_meta_init(&m[4], "scalar", CKPT_DTYPE_F64, s4, 0); /* ndim 0: one element */
}

static uint8_t pattern(size_t t, uint64_t k) { return (uint8_t)(k * 13 + t * 31 + 1); }

static ckpt_publication_t *filled(const char *name)
{
    ckpt_tensor_meta_t m[NT];
    ckpt_publication_t *pub = NULL;
    sample(m);
    CHECK_OK(ckpt_publish_begin(name, m, NT, &pub));
    if (!pub) return NULL;
    for (size_t t = 0; t < NT; t++) {
        uint8_t *p = ckpt_publish_tensor_ptr(pub, t);
        CHECK(p != NULL);
        for (uint64_t k = 0; p && k < m[t].nbytes; k++) p[k] = pattern(t, k);
    }
    return pub;
}

static void test_layout_parses_and_is_sealed(void)
{
    ckpt_tensor_meta_t m[NT];
    sample(m);
    ckpt_publication_t *pub = filled("demo");
    if (!pub) return;
    int fd = ckpt_publish_fd(pub);
    CHECK_OK(ckpt_publish_seal(pub));
    CHECK_OK(ckpt_publish_seal(pub)); /* twice: no-op */
    CHECK(ckpt_publish_tensor_ptr(pub, 0) == NULL);
    int seals = fcntl(fd, F_GET_SEALS);
    CHECK(seals >= 0 && (seals & F_SEAL_WRITE) && (seals & F_SEAL_SHRINK) && (seals & F_SEAL_GROW));
    /* Sealed for everyone: no writable mapping, no write, no resize. */
    CHECK(mmap(NULL, 4096, PROT_WRITE, MAP_SHARED, fd, 0) == MAP_FAILED);
    CHECK(pwrite(fd, "x", 1, 0) < 0 && errno == EPERM);
    CHECK(ftruncate(fd, 0) < 0);

    char path[64];
    snprintf(path, sizeof(path), "/proc/self/fd/%d", fd);
    ckpt_st_file_t *f = NULL;
    CHECK_OK(ckpt_st_open(path, &f));
    if (!f) return;
    CHECK(ckpt_st_file_size(f) == ckpt_publish_size(pub));
    CHECK(ckpt_st_data_offset(f) % CKPT_PUBLISH_DATA_ALIGN == 0);
    CHECK(ckpt_st_num_tensors(f) == NT);
    for (size_t t = 0; t < NT; t++) {
        size_t i = 0;
        CHECK_OK(ckpt_st_find(f, m[t].name, &i));
        const ckpt_tensor_meta_t *got = ckpt_st_tensor(f, i);
        CHECK(got->dtype == m[t].dtype && got->ndim == m[t].ndim && got->nbytes == m[t].nbytes);
        CHECK(got->offset == ckpt_publish_tensor_offset(pub, t));
        /* every tensor starts on a multiple of its element size */
        CHECK(got->offset % ckpt_dtype_size(got->dtype) == 0);
        uint8_t buf[256];
        CHECK(got->nbytes <= sizeof(buf));
        CHECK_OK(ckpt_st_read_tensor(f, i, buf, sizeof(buf)));
        for (uint64_t k = 0; k < got->nbytes; k++) CHECK(buf[k] == pattern(t, k));
    }
    ckpt_st_close(f);

    /* What the engine rank checks on arrival accepts it and finds the same tensors. */
    ckpt_tensor_meta_t *metas = NULL;
    size_t count = 0;
    CHECK_OK(ckpt__pub_inspect_fd(fd, "demo", ckpt_publish_size(pub), &metas, &count));
    CHECK(count == NT);
    ckpt__free(metas);
    /* And the store adopts it in place. */
    ckpt_store_t *s = NULL;
    CHECK_OK(ckpt_store_create(NULL, &s));
    int dup = fcntl(fd, F_DUPFD_CLOEXEC, 0);
    ckpt_store_fd_part_t part = {dup, ckpt_publish_size(pub), 0, NULL, 0};
    CHECK_OK(ckpt__pub_inspect_fd(dup, "demo", part.size, &metas, &count));
    part.metas = metas;
    part.count = count;
    CHECK_OK(ckpt_store_register_fds(s, "demo", 3, &part, 1, NULL, 0));
    const ckpt_tensor_meta_t *t;
    size_t n = 0;
    CHECK_OK(ckpt_store_tensors(s, "demo", &t, &n));
    CHECK(n == NT && t[0].owner == 3);
    ckpt__free(metas);
    ckpt_store_destroy(s);
    ckpt_publish_free(pub);
}

static void test_bad_inputs(void)
{
    ckpt_tensor_meta_t m[NT];
    ckpt_publication_t *pub = NULL;
    sample(m);
    CHECK_RC(ckpt_publish_begin("", m, NT, &pub), CKPT_EINVAL);
    CHECK_RC(ckpt_publish_begin("a\nb", m, NT, &pub), CKPT_EINVAL);
    CHECK_ERR_HAS("control character");
    CHECK_RC(ckpt_publish_begin("\001publish-next", m, NT, &pub), CKPT_EINVAL);
    CHECK_RC(ckpt_publish_begin("x", NULL, 2, &pub), CKPT_EINVAL);
    ckpt_tensor_meta_t twice[2] = {m[0], m[0]};
    CHECK_RC(ckpt_publish_begin("x", twice, 2, &pub), CKPT_EINVAL);
    CHECK_ERR_HAS("layers.0.w");
    ckpt_tensor_meta_t bad = m[0];
    bad.dtype = 99;
    CHECK(ckpt_publish_begin("x", &bad, 1, &pub) < 0);
    CHECK(pub == NULL);

    pub = filled("x");
    ckpt_publish_options_t o = CKPT_PUBLISH_OPTIONS_INIT;
    o.part = 2;
    o.nparts = 2;
    CHECK_RC(ckpt_publish_send(pub, "/nonexistent/publish-0.sock", &o, NULL), CKPT_EINVAL);
    o.part = 0;
    o.timeout_ms = 1000;
    ckpt_publish_reply_t reply;
    CHECK_RC(ckpt_publish_send(pub, "/nonexistent/publish-0.sock", &o, &reply), CKPT_EPEER);
    CHECK_ERR_HAS("/nonexistent/publish-0.sock");
    CHECK_ERR_HAS("ckpt-engine serve --socket-dir");
    CHECK(reply.status == CKPT_EPEER && strstr(reply.text, "publish-0.sock"));
    ckpt_publish_free(pub);
    ckpt_publish_free(NULL);
}

/* A memfd holding a valid safetensors header for one U8 tensor of 16 bytes. */
static int raw_memfd(unsigned seals, uint64_t *size_out)
{
    const char *json = "{\"t\":{\"dtype\":\"U8\",\"shape\":[16],\"data_offsets\":[0,16]}}";
    size_t jl = strlen(json), pad = (8 - (8 + jl) % 8) % 8;
    uint64_t hl = jl + pad, size = 8 + hl + 16;
    int fd = memfd_create("raw", MFD_CLOEXEC | (seals ? MFD_ALLOW_SEALING : 0));
    uint8_t buf[256];
    memset(buf, ' ', sizeof(buf));
    for (int i = 0; i < 8; i++) buf[i] = (uint8_t)(hl >> (8 * i));
    memcpy(buf + 8, json, jl);
    memset(buf + 8 + hl, 0xab, 16);
    CHECK(pwrite(fd, buf, size, 0) == (ssize_t)size);
    if (seals) CHECK(fcntl(fd, F_ADD_SEALS, seals) == 0);
    *size_out = size;
    return fd;
}

static void test_inspect_refuses(void)
{
    ckpt_tensor_meta_t *m = NULL;
    size_t n = 0;
    uint64_t size = 0;
    int fd = raw_memfd(F_SEAL_WRITE | F_SEAL_SHRINK | F_SEAL_GROW, &size);
    CHECK_OK(ckpt__pub_inspect_fd(fd, "ok", size, &m, &n));
    CHECK(n == 1 && m[0].nbytes == 16);
    ckpt__free(m);
    CHECK_RC(ckpt__pub_inspect_fd(fd, "size", size + 1, &m, &n), CKPT_EINVAL);
    CHECK_ERR_HAS("announced");
    close(fd);

    /* Unsealed: refused naming the seals and the fix. */
    fd = raw_memfd(0, &size);
    CHECK_RC(ckpt__pub_inspect_fd(fd, "unsealed", size, &m, &n), CKPT_EPERM);
    CHECK_ERR_HAS("MFD_ALLOW_SEALING");
    close(fd);
    fd = open("/tmp", O_TMPFILE | O_RDWR | O_CLOEXEC, 0600); /* not a memfd at all */
    if (fd >= 0) {
        CHECK(ckpt__pub_inspect_fd(fd, "file", 0, &m, &n) < 0);
        CHECK_ERR_HAS("memfd");
        close(fd);
    }
    fd = raw_memfd(F_SEAL_SHRINK | F_SEAL_GROW, &size); /* sealable, but writable */
    CHECK_RC(ckpt__pub_inspect_fd(fd, "half", size, &m, &n), CKPT_EPERM);
    CHECK_ERR_HAS("F_SEAL_WRITE");
    CHECK_ERR_HAS("F_ADD_SEALS");
    close(fd);

    /* Sealed, but not a safetensors layout. */
    fd = memfd_create("junk", MFD_CLOEXEC | MFD_ALLOW_SEALING);
    CHECK(pwrite(fd, "\xff\xff\xff\xff\xff\xff\xff\x7fjunkjunk", 16, 0) == 16);
    fcntl(fd, F_ADD_SEALS, F_SEAL_WRITE | F_SEAL_SHRINK | F_SEAL_GROW);
    CHECK_RC(ckpt__pub_inspect_fd(fd, "junk", 16, &m, &n), CKPT_EFORMAT);
    CHECK_ERR_HAS("junk");
    close(fd);
}

/* Sends one PUBLISH request over a raw connection, with `fd` attached unless it is -1,
 * and reads the first answer. */
static int raw_request(const char *path, const ckpt__pub_request_t *r, int fd, char *text,
                       size_t cap)
{
    struct sockaddr_un a = {.sun_family = AF_UNIX};
    snprintf(a.sun_path, sizeof(a.sun_path), "%s", path);
    int s = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    CHECK(connect(s, (struct sockaddr *)&a, sizeof(a)) == 0);
    ckpt__ipc_conn_t c;
    memset(&c, 0, sizeof(c));
    ckpt__ipc_conn_init(&c, s, "test");
    uint8_t *p = NULL;
    size_t len = ckpt__pub_request_size(r);
    CHECK_OK(ckpt__ipc_conn_tx_reserve(&c, len, &p));
    ckpt__pub_request_encode(r, p);
    CHECK_OK(ckpt__ipc_conn_send(&c, CKPT_IPC_MSG_PUBLISH, len, fd >= 0 ? &fd : NULL,
                                 fd >= 0 ? 1 : 0, 2000));
    ckpt__ipc_hdr_t h;
    int32_t status = -999;
    uint32_t kind = 0;
    uint64_t version = 0;
    CHECK_OK(ckpt__ipc_conn_recv(&c, 5000, NULL, &h));
    CHECK(h.type == CKPT_IPC_MSG_PUBLISH_REPLY);
    CHECK_OK(ckpt__pub_reply_decode(c.rx_buf, h.length, &status, &kind, &version, text, cap));
    ckpt__ipc_conn_destroy(&c);
    return status;
}

/* One PUBLISH carrying `fd`: part `part` of 2 of `name` at `step`. */
static int raw_publish(const char *path, const char *name, int fd, uint64_t size, uint32_t part,
                       uint64_t step, char *text, size_t cap)
{
    ckpt__pub_request_t r;
    memset(&r, 0, sizeof(r));
    r.part = part;
    r.nparts = 2;
    r.step = step;
    r.size = size;
    snprintf(r.name, sizeof(r.name), "%s", name);
    return raw_request(path, &r, fd, text, cap);
}

static void test_listener(void)
{
    char dir[] = "/tmp/ckpt-test-publish-XXXXXX", path[128];
    CHECK(mkdtemp(dir) != NULL);
    snprintf(path, sizeof(path), "%s/publish-0.sock", dir);
    ckpt__pub_server_t *srv = NULL;
    CHECK_OK(ckpt__pub_server_open(path, 5000, &srv));
    if (!srv) return;
    struct stat st;
    CHECK(stat(path, &st) == 0 && (st.st_mode & 0777) == 0600);
    char text[1024];

    /* An unsealed memfd: refused, the text names the missing seals and the fix. */
    uint64_t size = 0;
    int fd = raw_memfd(0, &size);
    CHECK(raw_publish(path, "m", fd, size, 0, 0, text, sizeof(text)) == CKPT_EPERM);
    CHECK(strstr(text, "not sealed") && strstr(text, "F_SEAL_WRITE"));
    close(fd);
    fd = raw_memfd(F_SEAL_GROW, &size);
    CHECK(raw_publish(path, "m", fd, size, 0, 0, text, sizeof(text)) == CKPT_EPERM);
    CHECK(strstr(text, "not sealed") && strstr(text, "F_ADD_SEALS"));
    close(fd);
    CHECK(ckpt__pub_server_pending(srv) == 0);

    /* Part 0 at step 1, then step 2 replaces it; step 0 after that is refused as older. */
    unsigned sealed = F_SEAL_WRITE | F_SEAL_SHRINK | F_SEAL_GROW;
    fd = raw_memfd(sealed, &size);
    CHECK(raw_publish(path, "m", fd, size, 0, 1, text, sizeof(text)) == 0);
    CHECK(strstr(text, "accepted") != NULL);
    CHECK(raw_publish(path, "m", fd, size, 0, 2, text, sizeof(text)) == 0);
    CHECK(ckpt__pub_server_pending(srv) == 1);
    CHECK(raw_publish(path, "m", fd, size, 0, 0, text, sizeof(text)) == CKPT_EINVAL);
    CHECK(strstr(text, "older") != NULL);
    CHECK(raw_publish(path, "m", fd, size, 1, 2, text, sizeof(text)) == 0);
    close(fd);
    ckpt__pub_part_t *parts = NULL;
    size_t n = 0;
    CHECK_OK(ckpt__pub_server_take(srv, &parts, &n));
    CHECK(n == 2 && ckpt__pub_server_pending(srv) == 0);
    for (size_t i = 0; i < n; i++) {
        CHECK(parts[i].req.step == 2 && parts[i].count == 1 && parts[i].fd >= 0);
        if (i == 0) ckpt__pub_server_put_back(srv, &parts[i]); /* still incomplete */
        else ckpt__pub_part_finish(&parts[i], CKPT_ETIMEDOUT, 0, "dropped");
    }
    ckpt__free(parts);
    CHECK(ckpt__pub_server_pending(srv) == 1);

    /* A publisher that waits gets what registration decided (here: version 42). */
    pid_t child = fork();
    if (child == 0) {
        ckpt_tensor_meta_t m[NT];
        sample(m);
        ckpt_publication_t *pub = filled("w");
        ckpt_publish_options_t o = CKPT_PUBLISH_OPTIONS_INIT;
        ckpt_publish_reply_t reply;
        o.timeout_ms = 10000;
        int rc = ckpt_publish_send(pub, path, &o, &reply);
        ckpt_publish_free(pub);
        _exit(rc == 0 && reply.registered && reply.version == 42 ? 0 : 1);
    }
    for (int i = 0; i < 500 && ckpt__pub_server_pending(srv) < 2; i++) usleep(10000);
    CHECK_OK(ckpt__pub_server_take(srv, &parts, &n));
    CHECK(n == 2);
    for (size_t i = 0; i < n; i++) {
        if (strcmp(parts[i].req.name, "w") == 0) {
            CHECK(parts[i].reply_fd >= 0 && parts[i].count == NT);
            ckpt__pub_part_finish(&parts[i], 0, 42, "registered");
        } else {
            ckpt__pub_part_finish(&parts[i], CKPT_ECANCELED, 0, "test");
        }
    }
    ckpt__free(parts);
    int status = -1;
    CHECK(waitpid(child, &status, 0) == child && WIFEXITED(status) && WEXITSTATUS(status) == 0);

    /* The test hook refuses a uid (this one) as the uid rule refuses another user. */
    ckpt__pub_server_close(srv);
    CHECK(access(path, F_OK) != 0); /* unlinked */
    char uid[32];
    snprintf(uid, sizeof(uid), "%u", (unsigned)geteuid());
    setenv("CKPT_TEST_PUBLISH_DENY_UID", uid, 1);
    CHECK_OK(ckpt__pub_server_open(path, 5000, &srv));
    unsetenv("CKPT_TEST_PUBLISH_DENY_UID");
    fd = raw_memfd(sealed, &size);
    CHECK(raw_publish(path, "m", fd, size, 0, 0, text, sizeof(text)) == CKPT_EPERM);
    CHECK(strstr(text, "may not publish") != NULL);
    close(fd);
    ckpt__pub_server_close(srv);
    rmdir(dir);
}

/* Pulled publishing (no fd): the listener reads this process's tensors into a memfd of
 * its own (the same pid both ways here), the bytes and checksums are right, a memfd given
 * back is refilled at the next pull (same inode), and a bad source address or a lying pid
 * is refused with its cause. The request codec round-trips and refuses a short trailer. */
static void test_pull(void)
{
    char dir[] = "/tmp/ckpt-test-pull-XXXXXX", path[128];
    CHECK(mkdtemp(dir) != NULL);
    snprintf(path, sizeof(path), "%s/publish-0.sock", dir);
    ckpt__pub_server_t *srv = NULL;
    CHECK_OK(ckpt__pub_server_open(path, 5000, &srv));
    if (!srv) return;
    ckpt_tensor_meta_t m[NT];
    sample(m);
    static uint8_t src[NT][64];
    ino_t first_ino = 0;
    for (int round = 0; round < 2; round++) {
        ckpt_publication_t *pub = NULL;
        CHECK_OK(ckpt_publish_begin_pull("p", m, NT, &pub));
        if (!pub) break;
        CHECK(ckpt_publish_tensor_ptr(pub, 0) == NULL);
        for (size_t t = 0; t < NT; t++) {
            for (uint64_t k = 0; k < m[t].nbytes; k++) src[t][k] = pattern(t, k + (uint64_t)round);
            CHECK_OK(ckpt_publish_set_source(pub, t, src[t]));
        }
        ckpt_publish_options_t o = CKPT_PUBLISH_OPTIONS_INIT;
        o.wait = 0;
        o.step = (uint64_t)round + 1;
        ckpt_publish_reply_t reply;
        CHECK_OK(ckpt_publish_send(pub, path, &o, &reply));
        ckpt_publish_free(pub);
        ckpt__pub_part_t *parts = NULL;
        size_t n = 0;
        CHECK_OK(ckpt__pub_server_take(srv, &parts, &n));
        CHECK(n == 1);
        if (n != 1) break;
        ckpt__pub_part_t *pt = &parts[0];
        CHECK(pt->count == NT && pt->fd >= 0);
        struct stat st;
        CHECK(fstat(pt->fd, &st) == 0);
        if (round == 0) first_ino = st.st_ino;
        else CHECK(st.st_ino == first_ino); /* refilled, not new */
        for (size_t i = 0; i < pt->count; i++) {
            size_t t = 0;
            while (t < NT && strcmp(m[t].name, pt->metas[i].name) != 0) t++;
            CHECK(t < NT && pt->metas[i].nbytes == m[t].nbytes);
            if (t >= NT) continue;
            uint8_t got[64];
            CHECK(pread(pt->fd, got, m[t].nbytes, (off_t)pt->metas[i].offset) ==
                  (ssize_t)m[t].nbytes);
            CHECK(memcmp(got, src[t], m[t].nbytes) == 0);
            CHECK(pt->metas[i].checksum == ckpt_checksum(src[t], m[t].nbytes));
        }
        /* The store would hold it; here it goes back as a replaced version's would. */
        ckpt__pub_server_recycle(srv, dup(pt->fd));
        ckpt__pub_part_finish(pt, 0, 1, "ok");
        ckpt__free(parts);
    }

    /* A source this process does not map: refused, naming the tensor. */
    ckpt_publication_t *pub = NULL;
    CHECK_OK(ckpt_publish_begin_pull("p", m, NT, &pub));
    for (size_t t = 0; pub && t < NT; t++)
        CHECK_OK(ckpt_publish_set_source(pub, t, t == 0 ? (const void *)0x1000 : src[t]));
    ckpt_publish_options_t o = CKPT_PUBLISH_OPTIONS_INIT;
    o.wait = 0;
    o.step = 9;
    ckpt_publish_reply_t reply;
    CHECK(ckpt_publish_send(pub, path, &o, &reply) == CKPT_EINVAL);
    CHECK(strstr(reply.text, "tensor 'layers.0.w'") && strstr(reply.text, "does not map"));
    ckpt_publish_free(pub);
    CHECK(ckpt__pub_server_pending(srv) == 0);
    /* A tensor without a source is refused before anything is sent. */
    CHECK_OK(ckpt_publish_begin_pull("p", m, NT, &pub));
    CHECK(ckpt_publish_send(pub, path, &o, &reply) == CKPT_EINVAL);
    CHECK(strstr(reply.text, "no source") != NULL);
    ckpt_publish_free(pub);

    /* Raw pull requests: a pid that is not the peer's (another pid namespace), and
     * segments that do not match the header's tensors, are refused by name. */
    uint8_t hdr[4096];
    uint64_t hlen = 0, fsize = 0;
    {
        /* the layout a pulled publication sends: taken from a memfd publication's file */
        ckpt_publication_t *mp = filled("p");
        fsize = ckpt_publish_size(mp);
        uint8_t lenbuf[8];
        CHECK(pread(ckpt_publish_fd(mp), lenbuf, 8, 0) == 8);
        for (int i = 7; i >= 0; i--) hlen = (hlen << 8) | lenbuf[i];
        hlen += 8;
        CHECK(hlen <= sizeof(hdr));
        CHECK(pread(ckpt_publish_fd(mp), hdr, (size_t)hlen, 0) == (ssize_t)hlen);
        ckpt_publish_free(mp);
    }
    uint8_t segs[NT * CKPT__PUB_SEG_BYTES];
    ckpt_publication_t *lay = NULL;
    CHECK_OK(ckpt_publish_begin_pull("p", m, NT, &lay));
    for (size_t t = 0; lay && t < NT; t++) {
        uint64_t off = ckpt_publish_tensor_offset(lay, t), addr = (uint64_t)(uintptr_t)src[t];
        for (int b = 0; b < 8; b++) {
            segs[t * CKPT__PUB_SEG_BYTES + (size_t)b] = (uint8_t)(off >> (8 * b));
            segs[t * CKPT__PUB_SEG_BYTES + 8 + (size_t)b] = (uint8_t)(addr >> (8 * b));
        }
    }
    ckpt_publish_free(lay);
    ckpt__pub_request_t pr;
    memset(&pr, 0, sizeof(pr));
    pr.nparts = 1;
    pr.size = fsize;
    pr.flags = CKPT__PUB_FLAG_PULL;
    pr.pid = (uint32_t)getpid();
    pr.nsegs = NT;
    pr.header_len = hlen;
    pr.header = hdr;
    pr.segs = segs;
    snprintf(pr.name, sizeof(pr.name), "raw");
    char text[1024];
    CHECK(raw_request(path, &pr, -1, text, sizeof(text)) == 0); /* well formed: accepted */
    pr.pid = (uint32_t)getpid() + 1;
    CHECK(raw_request(path, &pr, -1, text, sizeof(text)) == CKPT_EINVAL);
    CHECK(strstr(text, "another pid namespace") && strstr(text, "publish without pull"));
    pr.pid = (uint32_t)getpid();
    segs[0] ^= 8; /* the first segment no longer starts its tensor */
    CHECK(raw_request(path, &pr, -1, text, sizeof(text)) == CKPT_EINVAL);
    CHECK(strstr(text, "does not start a tensor") != NULL);
    pr.nsegs = NT - 1;
    CHECK(raw_request(path, &pr, -1, text, sizeof(text)) == CKPT_EINVAL);
    CHECK(strstr(text, "segments for the header's") != NULL);
    ckpt__pub_part_t *parts = NULL;
    size_t np = 0;
    CHECK_OK(ckpt__pub_server_take(srv, &parts, &np));
    CHECK(np == 1); /* only the well-formed one is pending */
    for (size_t i = 0; i < np; i++) ckpt__pub_part_finish(&parts[i], CKPT_ECANCELED, 0, "test");
    ckpt__free(parts);

    /* Codec: round trip, then a trailer one byte short is refused. */
    ckpt__pub_request_t r, back;
    memset(&r, 0, sizeof(r));
    uint8_t header[16] = {8}, csegs[2 * CKPT__PUB_SEG_BYTES] = {0};
    r.nparts = 1;
    r.size = 4096;
    r.flags = CKPT__PUB_FLAG_PULL;
    r.pid = 77;
    r.nsegs = 2;
    r.header_len = sizeof(header);
    r.header = header;
    r.segs = csegs;
    snprintf(r.name, sizeof(r.name), "codec");
    uint8_t buf[256];
    size_t len = ckpt__pub_request_size(&r);
    CHECK(len <= sizeof(buf));
    ckpt__pub_request_encode(&r, buf);
    CHECK_OK(ckpt__pub_request_decode(buf, len, &back));
    CHECK(back.pid == 77 && back.nsegs == 2 && back.header_len == sizeof(header) &&
          back.header == buf + len - sizeof(csegs) - sizeof(header) &&
          back.segs == buf + len - sizeof(csegs) && strcmp(back.name, "codec") == 0);
    CHECK(ckpt__pub_request_decode(buf, len - 1, &back) == CKPT_EPROTO);
    ckpt__pub_server_close(srv);
    rmdir(dir);
}

int main(void)
{
    RUN_TEST(test_layout_parses_and_is_sealed);
    RUN_TEST(test_bad_inputs);
    RUN_TEST(test_inspect_refuses);
    RUN_TEST(test_listener);
    RUN_TEST(test_pull);
    TEST_EXIT();
}
