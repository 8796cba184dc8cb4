/* The store from caller memory (register_buffers, register_fd), lookups, unregistration,
 * pool reuse, and failure safety of those paths. */
#include <sys/mman.h>

#include "core/testing.h"
#include "store_fixture.h"

static ckpt_store_t *new_store(int reuse)
{
    ckpt_store_options_t o = CKPT_STORE_OPTIONS_INIT;
    o.field_mask = CKPT_STORE_OPT_REUSE_POOL;
    o.reuse_pool = reuse;
    ckpt_store_t *s = NULL;
    CHECK_OK(ckpt_store_create(&o, &s));
    return s;
}

/* Three tensors of different dtypes and their bytes. */
static void sample(ckpt_tensor_meta_t m[3], uint8_t *buf[3])
{
    int64_t s0[2] = {3, 5}, s1[1] = {1000}, s2[1] = {0};
    memset(m, 0, 3 * sizeof(*m));
    ckpt_tensor_meta_init(&m[0], "z.weight", CKPT_DTYPE_BF16, s0, 2);
    ckpt_tensor_meta_init(&m[1], "a.bias", CKPT_DTYPE_F32, s1, 1);
    ckpt_tensor_meta_init(&m[2], "m.empty", CKPT_DTYPE_F64, s2, 1);
    for (int i = 0; i < 3; i++) {
        buf[i] = malloc(m[i].nbytes + 1);
        for (uint64_t k = 0; k < m[i].nbytes; k++) buf[i][k] = (uint8_t)(k * 7 + i);
    }
}

static void test_buffers_roundtrip(void)
{
    ckpt_tensor_meta_t m[3];
    uint8_t *buf[3];
    sample(m, buf);
    ckpt_store_t *s = new_store(0);
    CHECK_OK(ckpt_store_register_buffers(s, "demo", m, (const void *const *)buf, 3));
    CHECK_RC(ckpt_store_register_buffers(s, "demo", m, (const void *const *)buf, 3), CKPT_EEXIST);
    const ckpt_tensor_meta_t *t;
    size_t n;
    CHECK_OK(ckpt_store_tensors(s, "demo", &t, &n));
    CHECK(n == 3);
    CHECK_STR(t[0].name, "a.bias"); /* sorted by name */
    CHECK_STR(t[2].name, "z.weight");
    for (size_t i = 0; i < n; i++) {
        const void *p;
        int src = strcmp(t[i].name, "a.bias") == 0 ? 1 : strcmp(t[i].name, "m.empty") == 0 ? 2 : 0;
        CHECK_OK(ckpt_store_tensor_data(s, "demo", i, &p));
        CHECK(t[i].offset % CKPT_ALIGN == 0);
        CHECK(t[i].nbytes == m[src].nbytes);
        CHECK(memcmp(p, buf[src], t[i].nbytes) == 0);
        CHECK(t[i].checksum == ckpt_checksum(buf[src], m[src].nbytes));
        CHECK(t[i].owner == 0);
    }
    const ckpt_pool_region_t *r;
    CHECK_OK(ckpt_store_regions(s, "demo", &r, &n));
    CHECK(n == 1 && r[0].fd >= 0 && r[0].size % (2u << 20) == 0);
    /* Local processes map the pool by fd and see the same bytes. */
    void *view = mmap(NULL, r[0].size, PROT_READ, MAP_SHARED, r[0].fd, 0);
    CHECK(view != MAP_FAILED && memcmp((uint8_t *)view + t[0].offset, buf[1], t[0].nbytes) == 0);
    munmap(view, r[0].size);
    const char *nm;
    uint64_t lb, tb;
    CHECK(ckpt_store_count(s) == 1);
    CHECK_OK(ckpt_store_info(s, 0, &nm, &lb, &tb, &n));
    CHECK_STR(nm, "demo");
    CHECK(lb == tb && tb == 30 + 4000 && n == 3);
    ckpt_store_stats_t st;
    CHECK_OK(ckpt_store_last_stats(s, &st));
    CHECK_STR(st.io_path, "copy");
    CHECK_RC(ckpt_store_tensors(s, "nope", &t, &n), CKPT_ENOENT);
    CHECK_RC(ckpt_store_unregister(s, "nope"), CKPT_ENOENT);
    CHECK_OK(ckpt_store_unregister(s, "demo"));
    CHECK(ckpt_store_count(s) == 0);
    ckpt_store_destroy(s);
    for (int i = 0; i < 3; i++) free(buf[i]);
}

/* A pool allocator: memfd-backed like the store's own, counting calls; refuses when told. */
typedef struct {
    int allocs, releases, refuse;
    void *last;
} counting_alloc_t;

static int counting_alloc(void *ctx, uint64_t len, void **base_out, int *fd_out, void **handle_out)
{
    counting_alloc_t *c = ctx;
    if (c->refuse) return CKPT_EUNSUPPORTED;
    int fd = memfd_create("test-alloc", MFD_CLOEXEC);
    if (fd < 0 || ftruncate(fd, (off_t)len) != 0) return CKPT_ENOMEM;
    void *p = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (p == MAP_FAILED) return CKPT_ENOMEM;
    c->allocs++;
    c->last = p;
    *base_out = p;
    *fd_out = fd;
    *handle_out = c;
    return CKPT_OK;
}

static void counting_release(void *ctx, void *base, uint64_t len, void *handle)
{
    counting_alloc_t *c = ctx;
    CHECK(handle == ctx && base == c->last);
    munmap(base, len);
    c->releases++;
}

static void test_pool_allocator(void)
{
    ckpt_tensor_meta_t m[3];
    uint8_t *buf[3];
    sample(m, buf);
    counting_alloc_t c = {0};
    ckpt_store_options_t o = CKPT_STORE_OPTIONS_INIT;
    o.field_mask = CKPT_STORE_OPT_POOL_ALLOCATOR;
    o.pool_allocator = (ckpt_pool_allocator_t){counting_alloc, counting_release, &c};
    ckpt_store_t *s = NULL;
    CHECK_OK(ckpt_store_create(&o, &s));
    CHECK_OK(ckpt_store_register_buffers(s, "a", m, (const void *const *)buf, 3));
    CHECK(c.allocs == 1);
    const ckpt_pool_region_t *r;
    size_t n;
    CHECK_OK(ckpt_store_regions(s, "a", &r, &n));
    CHECK(n == 1 && r[0].base == c.last && r[0].fd >= 0);
    const ckpt_tensor_meta_t *t;
    CHECK_OK(ckpt_store_tensors(s, "a", &t, &n));
    const void *p;
    CHECK_OK(ckpt_store_tensor_data(s, "a", 0, &p)); /* a.bias */
    CHECK(memcmp(p, buf[1], m[1].nbytes) == 0);
    /* Refused: the store falls back to a memfd of its own, the registration still works. */
    c.refuse = 1;
    CHECK_OK(ckpt_store_register_buffers(s, "b", m, (const void *const *)buf, 3));
    CHECK(c.allocs == 1);
    CHECK_OK(ckpt_store_regions(s, "b", &r, &n));
    CHECK(n == 1 && r[0].base != c.last && r[0].fd >= 0);
    CHECK_OK(ckpt_store_unregister(s, "a"));
    CHECK(c.releases == 1);
    CHECK_OK(ckpt_store_unregister(s, "b"));
    CHECK(c.releases == 1); /* the memfd region is not the allocator's */
    /* Destroying the store releases what is still registered. */
    c.refuse = 0;
    CHECK_OK(ckpt_store_register_buffers(s, "c", m, (const void *const *)buf, 3));
    ckpt_store_destroy(s);
    CHECK(c.allocs == 2 && c.releases == 2);
    for (int i = 0; i < 3; i++) free(buf[i]);
}

static void test_buffers_invalid(void)
{
    ckpt_tensor_meta_t m[3];
    uint8_t *buf[3];
    sample(m, buf);
    ckpt_store_t *s = new_store(0);
    strcpy(m[1].name, m[0].name);
    CHECK_RC(ckpt_store_register_buffers(s, "dup", m, (const void *const *)buf, 3), CKPT_EINVAL);
    CHECK_ERR_HAS("appears twice");
    m[1].dtype = 999;
    CHECK(ckpt_store_register_buffers(s, "bad", m, (const void *const *)buf, 3) < 0);
    CHECK_RC(ckpt_store_register_buffers(s, "", m, (const void *const *)buf, 3), CKPT_EINVAL);
    CHECK(ckpt_store_count(s) == 0);
    ckpt_store_destroy(s);
    for (int i = 0; i < 3; i++) free(buf[i]);
}

static void test_fd_roundtrip(void)
{
    int fds0 = count_fds();
    int fd = memfd_create("trainer", MFD_CLOEXEC);
    const uint64_t size = 1 << 16;
    CHECK(ftruncate(fd, size) == 0);
    uint8_t *w = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    for (uint64_t i = 0; i < size; i++) w[i] = (uint8_t)(i * 13);
    ckpt_tensor_meta_t m[2];
    int64_t s0[1] = {1024}, s1[2] = {16, 16};
    memset(m, 0, sizeof(m));
    ckpt_tensor_meta_init(&m[0], "x", CKPT_DTYPE_F32, s0, 1);
    ckpt_tensor_meta_init(&m[1], "y", CKPT_DTYPE_F16, s1, 2);
    m[0].offset = 4096;
    m[1].offset = 100; /* 100 + 512 <= 4096: no overlap */
    ckpt_store_t *s = new_store(0);
    /* Overlap and out of range fail, and leave the fd with the caller. */
    m[1].offset = 4000;
    CHECK_RC(ckpt_store_register_fd(s, "t", fd, size, m, 2), CKPT_EINVAL);
    CHECK_ERR_HAS("overlap");
    m[1].offset = size - 10;
    CHECK_RC(ckpt_store_register_fd(s, "t", fd, size, m, 2), CKPT_EINVAL);
    CHECK_ERR_HAS("outside");
    CHECK_RC(ckpt_store_register_fd(s, "t", fd, size * 2, m, 2), CKPT_EINVAL);
    CHECK(fcntl(fd, F_GETFD) >= 0);
    m[1].offset = 100;
    CHECK_OK(ckpt_store_register_fd(s, "t", fd, size, m, 2));
    const ckpt_tensor_meta_t *t;
    size_t n;
    CHECK_OK(ckpt_store_tensors(s, "t", &t, &n));
    for (size_t i = 0; i < n; i++) {
        const void *p;
        CHECK_OK(ckpt_store_tensor_data(s, "t", i, &p));
        CHECK(p == NULL || memcmp(p, w + t[i].offset, t[i].nbytes) == 0);
        CHECK(t[i].checksum == ckpt_checksum(w + t[i].offset, t[i].nbytes));
    }
    /* Zero copy: the trainer's later writes show through. */
    const void *p0;
    CHECK_OK(ckpt_store_tensor_data(s, "t", 0, &p0));
    w[4096] ^= 0xff;
    CHECK(((const uint8_t *)p0)[0] == w[4096]);
    const ckpt_pool_region_t *r;
    CHECK_OK(ckpt_store_regions(s, "t", &r, &n));
    CHECK(n == 1 && r[0].fd == fd);
    munmap(w, size);
    CHECK_OK(ckpt_store_unregister(s, "t")); /* closes fd: it was adopted */
    CHECK(count_fds() == fds0);
    ckpt_store_destroy(s);
}

static void test_reuse_pool(void)
{
    ckpt_tensor_meta_t m[3];
    uint8_t *buf[3];
    sample(m, buf);
    ckpt_store_t *s = new_store(1);
    const ckpt_pool_region_t *r;
    size_t n;
    CHECK_OK(ckpt_store_register_buffers(s, "a", m, (const void *const *)buf, 3));
    CHECK_OK(ckpt_store_regions(s, "a", &r, &n));
    int fd_a = r[0].fd;
    CHECK_OK(ckpt_store_unregister(s, "a"));
    CHECK_OK(ckpt_store_register_buffers(s, "b", m, (const void *const *)buf, 3));
    CHECK_OK(ckpt_store_regions(s, "b", &r, &n));
    CHECK(r[0].fd == fd_a); /* the same memfd, reused */
    const void *p;
    CHECK_OK(ckpt_store_tensor_data(s, "b", 0, &p));
    CHECK(memcmp(p, buf[1], m[1].nbytes) == 0);
    ckpt_store_destroy(s);
    for (int i = 0; i < 3; i++) free(buf[i]);
}

static void test_fail_alloc(void)
{
    ckpt_tensor_meta_t m[3];
    uint8_t *buf[3];
    sample(m, buf);
    ckpt_store_t *s = new_store(0);
    int fds0 = count_fds();
    for (long k = 0;; k++) {
        ckpt_testing_fail_alloc_after(k);
        int rc = ckpt_store_register_buffers(s, "x", m, (const void *const *)buf, 3);
        ckpt_testing_fail_alloc_after(-1);
        if (rc == CKPT_OK) break;
        CHECK(rc == CKPT_ENOMEM);
        CHECK(ckpt_store_count(s) == 0);
        CHECK(count_fds() == fds0);
        if (k > 100) break;
    }
    CHECK(ckpt_store_count(s) == 1);
    ckpt_store_destroy(s);
    for (int i = 0; i < 3; i++) free(buf[i]);
}

/* A field_mask bit this library does not know is refused by name, not ignored; the store's
 * own bits are accepted, and so is an HTTP server's 0 (ckpt_http_start has no bits yet). */
static void test_unknown_field_mask_refused(void)
{
    ckpt_store_options_t o = CKPT_STORE_OPTIONS_INIT;
    ckpt_store_t *s = NULL;
    o.field_mask = CKPT_STORE_OPT_POOL_ALLOCATOR << 1;
    CHECK_RC(ckpt_store_create(&o, &s), CKPT_EINVAL);
    CHECK_ERR_HAS("ckpt_store_options_t: field_mask bits 0x200 are not known");
    CHECK(s == NULL);
    o.field_mask = CKPT_STORE_OPT_IO_DEPTH | CKPT_STORE_OPT_REUSE_POOL;
    CHECK_OK(ckpt_store_create(&o, &s));
    ckpt_store_destroy(s);
}

int main(void)
{
    RUN_TEST(test_unknown_field_mask_refused);
    RUN_TEST(test_buffers_roundtrip);
    RUN_TEST(test_buffers_invalid);
    RUN_TEST(test_pool_allocator);
    RUN_TEST(test_fd_roundtrip);
    RUN_TEST(test_reuse_pool);
    RUN_TEST(test_fail_alloc);
    TEST_EXIT();
}
