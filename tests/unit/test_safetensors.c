/* safetensors reader and writer: round trips, sharded checkpoints, and a malformed corpus
 * built here so that every rejection names the file and its cause. */
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include "test.h"
#include "core/testing.h"

static char dir[64];

static const char *tpath(const char *name)
{
    static char buf[8][256];
    static int next;
    char *p = buf[next++ % 8];
    snprintf(p, 256, "%s/%s", dir, name);
    return p;
}

/* Writes the 8-byte length (hlen, possibly a lie), the header text and `data_len` bytes. */
static void write_raw(const char *path, uint64_t hlen, const char *header, size_t data_len)
{
    FILE *f = fopen(path, "wb");
    unsigned char len[8];
    for (int i = 0; i < 8; i++) len[i] = (unsigned char)(hlen >> (8 * i));
    fwrite(len, 1, 8, f);
    fwrite(header, 1, strlen(header), f);
    for (size_t i = 0; i < data_len; i++) fputc((int)(i & 0xff), f);
    fclose(f);
}

static void write_hdr(const char *path, const char *header, size_t data_len)
{
    write_raw(path, strlen(header), header, data_len);
}

static void test_round_trip_all_dtypes(void)
{
    ckpt_tensor_meta_t metas[CKPT_DTYPE_COUNT + 2];
    void *data[CKPT_DTYPE_COUNT + 2];
    size_t n = 0;
    for (int dt = 1; dt < CKPT_DTYPE_COUNT; dt++, n++) {
        char name[32];
        int64_t shape[2] = {3, dt};
        snprintf(name, sizeof(name), "t.%s", ckpt_dtype_name(dt));
        CHECK_OK(ckpt_tensor_meta_init(&metas[n], name, dt, shape, 2));
        data[n] = malloc(metas[n].nbytes);
        for (uint64_t b = 0; b < metas[n].nbytes; b++) ((unsigned char *)data[n])[b] = (unsigned char)(b * 7 + dt);
    }
    CHECK_OK(ckpt_tensor_meta_init(&metas[n], "scalar", CKPT_DTYPE_F64, NULL, 0));
    data[n] = malloc(8);
    memcpy(data[n], "\1\2\3\4\5\6\7\x08", 8);
    n++;
    int64_t zshape[3] = {4, 0, 2};
    CHECK_OK(ckpt_tensor_meta_init(&metas[n], "empty", CKPT_DTYPE_F32, zshape, 3));
    data[n] = NULL;
    n++;
    const char *keys[] = {"format", "quote\"d"}, *vals[] = {"pt", "line\nbreak"};
    const char *p = tpath("all.safetensors");
    CHECK_OK(ckpt_st_write(p, metas, (const void *const *)data, n, keys, vals, 2));
    CHECK(access(tpath("all.safetensors.tmp"), F_OK) != 0);

    ckpt_st_file_t *f = NULL;
    CHECK_OK(ckpt_st_open(p, &f));
    if (!f) return;
    CHECK(ckpt_st_num_tensors(f) == n);
    CHECK(ckpt_st_data_offset(f) % 8 == 0);
    CHECK_STR(ckpt_st_path(f), p);
    uint64_t prev = 0;
    for (size_t i = 0; i < n; i++) {
        size_t idx;
        CHECK_OK(ckpt_st_find(f, metas[i].name, &idx));
        const ckpt_tensor_meta_t *m = ckpt_st_tensor(f, idx);
        CHECK(m->dtype == metas[i].dtype && m->ndim == metas[i].ndim);
        CHECK(m->nbytes == metas[i].nbytes);
        CHECK(memcmp(m->shape, metas[i].shape, sizeof(int64_t) * (size_t)m->ndim) == 0);
        CHECK(ckpt_st_tensor(f, i)->offset >= prev);
        prev = ckpt_st_tensor(f, i)->offset;
        unsigned char *buf = malloc(m->nbytes + 1);
        CHECK_OK(ckpt_st_read_tensor(f, idx, buf, m->nbytes + 1));
        if (m->nbytes) CHECK(memcmp(buf, data[i], m->nbytes) == 0);
        free(buf);
    }
    size_t idx;
    CHECK_RC(ckpt_st_find(f, "nope", &idx), CKPT_ENOENT);
    CHECK_ERR_HAS("nope");
    CHECK(ckpt_st_tensor(f, n) == NULL);
    CHECK(ckpt_st_num_metadata(f) == 2);
    const char *k, *v;
    CHECK_OK(ckpt_st_metadata(f, 1, &k, &v));
    CHECK_STR(k, "quote\"d");
    CHECK_STR(v, "line\nbreak");
    char small[4];
    CHECK_OK(ckpt_st_find(f, "scalar", &idx));
    CHECK_RC(ckpt_st_read_tensor(f, idx, small, sizeof(small)), CKPT_EINVAL);
    ckpt_st_close(f);
    for (size_t i = 0; i < n; i++) free(data[i]);

    /* A duplicate name is refused by the writer and leaves nothing behind. */
    CHECK_RC(ckpt_st_write(tpath("dup.safetensors"), metas, (const void *const *)data, 0, NULL,
                           NULL, 0), CKPT_OK);
    ckpt_tensor_meta_t two[2];
    int64_t s1 = 1;
    CHECK_OK(ckpt_tensor_meta_init(&two[0], "x", CKPT_DTYPE_U8, &s1, 1));
    two[1] = two[0];
    const void *d2[2] = {"a", "b"};
    CHECK_RC(ckpt_st_write(tpath("dup2.safetensors"), two, d2, 2, NULL, NULL, 0), CKPT_EINVAL);
    CHECK_ERR_HAS("'x' given twice");
    CHECK(access(tpath("dup2.safetensors"), F_OK) != 0);
    CHECK(access(tpath("dup2.safetensors.tmp"), F_OK) != 0);
}

static void test_empty_file_and_truncated_data(void)
{
    ckpt_st_file_t *f = NULL;
    write_hdr(tpath("empty.safetensors"), "{}      ", 0);
    CHECK_OK(ckpt_st_open(tpath("empty.safetensors"), &f));
    CHECK(f && ckpt_st_num_tensors(f) == 0);
    ckpt_st_close(f);

    /* Valid when opened; the file is cut afterwards: reading names file and offset. */
    const char *p = tpath("cut.safetensors");
    write_hdr(p, "{\"w\":{\"dtype\":\"F32\",\"shape\":[4],\"data_offsets\":[0,16]}}", 16);
    CHECK_OK(ckpt_st_open(p, &f));
    if (!f) return;
    CHECK(truncate(p, (off_t)ckpt_st_data_offset(f) + 6) == 0);
    char buf[16];
    CHECK_RC(ckpt_st_read_tensor(f, 0, buf, sizeof(buf)), CKPT_EIO);
    CHECK_ERR_HAS("cut.safetensors");
    CHECK_ERR_HAS("offset");
    ckpt_st_close(f);
}

struct bad_case {
    const char *name;
    const char *header; /* NULL: special-cased by name */
    size_t data_len;
    const char *fragment;
};

static const struct bad_case bad_cases[] = {
    {"bad_json", "{\"w\": {\"dtype\": \"F32\",", 0, "not valid JSON"},
    {"not_object", "[1, 2, 3]", 0, "not a JSON object"},
    {"entry_not_object", "{\"w\": 3}", 0, "not an object"},
    {"unknown_dtype", "{\"w\":{\"dtype\":\"F12\",\"shape\":[1],\"data_offsets\":[0,4]}}", 4,
     "unknown dtype 'F12'"},
    {"shape_negative", "{\"w\":{\"dtype\":\"F32\",\"shape\":[-1],\"data_offsets\":[0,4]}}", 4,
     "negative"},
    {"shape_fraction", "{\"w\":{\"dtype\":\"F32\",\"shape\":[1.5],\"data_offsets\":[0,4]}}", 4,
     "non-integer"},
    {"shape_string", "{\"w\":{\"dtype\":\"F32\",\"shape\":[\"1\"],\"data_offsets\":[0,4]}}", 4,
     "shape dimension 0"},
    {"shape_huge", "{\"w\":{\"dtype\":\"F32\",\"shape\":[99999999999999999999],"
                   "\"data_offsets\":[0,4]}}", 4, "shape dimension 0"},
    {"shape_overflow", "{\"w\":{\"dtype\":\"F32\",\"shape\":[4294967296,4294967296,4294967296],"
                       "\"data_offsets\":[0,4]}}", 4, "overflows"},
    {"too_many_dims", "{\"w\":{\"dtype\":\"U8\",\"shape\":[1,1,1,1,1,1,1,1,1],"
                      "\"data_offsets\":[0,1]}}", 1, "9 dimensions"},
    {"offsets_out_of_range", "{\"w\":{\"dtype\":\"F32\",\"shape\":[4],\"data_offsets\":[0,16]}}", 8,
     "out of range"},
    {"offsets_reversed", "{\"w\":{\"dtype\":\"U8\",\"shape\":[0],\"data_offsets\":[4,0]}}", 4,
     "out of range"},
    {"offsets_mismatch", "{\"w\":{\"dtype\":\"F32\",\"shape\":[2,2],\"data_offsets\":[0,12]}}", 12,
     "data_offsets [0, 12] do not match shape [2, 2] of F32 (16 bytes)"},
    {"offsets_three", "{\"w\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[0,1,2]}}", 1,
     "data_offsets is not"},
    {"missing_shape", "{\"w\":{\"dtype\":\"U8\",\"data_offsets\":[0,1]}}", 1, "missing field 'shape'"},
    {"field_twice", "{\"w\":{\"dtype\":\"U8\",\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[0,1]}}",
     1, "given twice"},
    {"overlap", "{\"a\":{\"dtype\":\"U8\",\"shape\":[4],\"data_offsets\":[0,4]},"
                "\"b\":{\"dtype\":\"U8\",\"shape\":[4],\"data_offsets\":[2,6]}}", 6, "overlaps"},
    {"gap", "{\"a\":{\"dtype\":\"U8\",\"shape\":[2],\"data_offsets\":[0,2]},"
            "\"b\":{\"dtype\":\"U8\",\"shape\":[2],\"data_offsets\":[4,6]}}", 6, "not covered"},
    {"trailing_data", "{\"a\":{\"dtype\":\"U8\",\"shape\":[2],\"data_offsets\":[0,2]}}", 5,
     "not covered"},
    {"duplicate_name", "{\"a\":{\"dtype\":\"U8\",\"shape\":[2],\"data_offsets\":[0,2]},"
                       "\"a\":{\"dtype\":\"U8\",\"shape\":[2],\"data_offsets\":[2,4]}}", 4,
     "'a' appears more than once"},
    {"metadata_not_object", "{\"__metadata__\":[1]}", 0, "__metadata__ is not an object"},
    {"metadata_not_string", "{\"__metadata__\":{\"k\":1}}", 0, "'k' is not a string"},
    {"metadata_twice", "{\"__metadata__\":{},\"__metadata__\":{}}", 0, "more than once"},
    {"trailing_garbage", "{}  x", 0, "trailing bytes"},
    {"name_too_long", NULL, 0, "longer than 255"},
    {"too_short", NULL, 0, "too short"},
    {"length_zero", NULL, 0, "header length is 0"},
    {"length_past_end", NULL, 0, "runs past the end"},
    {"length_absurd", NULL, 0, "exceeds the limit"},
};

static void test_malformed_corpus(void)
{
    for (size_t i = 0; i < sizeof(bad_cases) / sizeof(bad_cases[0]); i++) {
        const struct bad_case *c = &bad_cases[i];
        char file[96];
        snprintf(file, sizeof(file), "%s.safetensors", c->name);
        const char *p = tpath(file);
        if (c->header) {
            write_hdr(p, c->header, c->data_len);
        } else if (strcmp(c->name, "name_too_long") == 0) {
            char h[600], name[300];
            memset(name, 'n', 256);
            name[256] = '\0';
            snprintf(h, sizeof(h), "{\"%s\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[0,1]}}",
                     name);
            write_hdr(p, h, 1);
        } else if (strcmp(c->name, "too_short") == 0) {
            FILE *f = fopen(p, "wb");
            fwrite("\x02\0\0", 1, 3, f);
            fclose(f);
        } else if (strcmp(c->name, "length_zero") == 0) {
            write_raw(p, 0, "{}", 0);
        } else if (strcmp(c->name, "length_past_end") == 0) {
            write_raw(p, 100, "{}", 0);
        } else {
            write_raw(p, (uint64_t)1 << 62, "{}", 0);
        }
        ckpt_st_file_t *f = NULL;
        int rc = ckpt_st_open(p, &f);
        if (rc != CKPT_EFORMAT) {
            fprintf(stderr, "case %s: got %s (%s)\n", c->name, ckpt_status_name(rc),
                    ckpt_last_error());
            test__failures++;
        }
        CHECK(f == NULL);
        ckpt_st_close(f);
        CHECK_ERR_HAS(file);
        if (!strstr(ckpt_last_error(), c->fragment)) {
            fprintf(stderr, "case %s: error \"%s\" lacks \"%s\"\n", c->name, ckpt_last_error(),
                    c->fragment);
            test__failures++;
        }
    }
    ckpt_st_file_t *f = NULL;
    CHECK_RC(ckpt_st_open(tpath("does_not_exist.safetensors"), &f), CKPT_ENOENT);
    CHECK_ERR_HAS("does_not_exist.safetensors");
    CHECK_RC(ckpt_st_open(dir, &f), CKPT_EINVAL);
    CHECK_RC(ckpt_st_parse_header("mem", "{}", 2, 5, &f), CKPT_EFORMAT);
    CHECK_ERR_HAS("mem: header length 2 runs past");
}

static void write_small(const char *path, const char *name)
{
    ckpt_tensor_meta_t m;
    int64_t s = 2;
    CHECK_OK(ckpt_tensor_meta_init(&m, name, CKPT_DTYPE_U8, &s, 1));
    const void *d[1] = {"hi"};
    CHECK_OK(ckpt_st_write(path, &m, d, 1, NULL, NULL, 0));
}

static void test_list_files(void)
{
    char **paths = NULL;
    size_t n = 0;
    char sub[128];
    snprintf(sub, sizeof(sub), "%s/shards", dir);
    CHECK(mkdir(sub, 0755) == 0);
    const char *a = tpath("shards/b.safetensors"), *b = tpath("shards/a.safetensors");
    write_small(a, "x");
    write_small(b, "y");
    write_hdr(tpath("shards/notes.txt"), "{}", 0);

    CHECK_OK(ckpt_st_list_files(a, &paths, &n));
    CHECK(n == 1 && strcmp(paths[0], a) == 0);
    ckpt_st_paths_free(paths, n);

    CHECK_OK(ckpt_st_list_files(sub, &paths, &n));
    CHECK(n == 2 && strstr(paths[0], "a.safetensors") && strstr(paths[1], "b.safetensors"));
    ckpt_st_paths_free(paths, n);

    /* With an index, the directory means what the index names (duplicates folded). */
    const char *idx = tpath("shards/model.safetensors.index.json");
    FILE *f = fopen(idx, "w");
    fprintf(f, "{\"metadata\":{\"total_size\":4},\"weight_map\":{\"x\":\"b.safetensors\","
               "\"z\":\"b.safetensors\"}}");
    fclose(f);
    CHECK_OK(ckpt_st_list_files(sub, &paths, &n));
    CHECK(n == 1 && strcmp(paths[0], a) == 0);
    ckpt_st_paths_free(paths, n);
    CHECK_OK(ckpt_st_list_files(idx, &paths, &n));
    CHECK(n == 1 && strcmp(paths[0], a) == 0);
    ckpt_st_paths_free(paths, n);

    f = fopen(idx, "w");
    fprintf(f, "{\"weight_map\":{\"x\":\"b.safetensors\",\"q\":\"missing-shard.safetensors\"}}");
    fclose(f);
    CHECK_RC(ckpt_st_list_files(idx, &paths, &n), CKPT_ENOENT);
    CHECK_ERR_HAS("missing-shard.safetensors");
    CHECK_ERR_HAS("'q'");
    f = fopen(idx, "w");
    fprintf(f, "{\"weight\":{}}");
    fclose(f);
    CHECK_RC(ckpt_st_list_files(sub, &paths, &n), CKPT_EFORMAT);
    CHECK_ERR_HAS("weight_map");
    CHECK_RC(ckpt_st_list_files(tpath("nowhere"), &paths, &n), CKPT_ENOENT);
    char empty[128];
    snprintf(empty, sizeof(empty), "%s/empty", dir);
    CHECK(mkdir(empty, 0755) == 0);
    CHECK_RC(ckpt_st_list_files(empty, &paths, &n), CKPT_ENOENT);
    CHECK_ERR_HAS("no *.safetensors");
}

/* Fail the Nth allocation for every N until open succeeds: each failure must be a clean
 * CKPT_ENOMEM with nothing leaked (ASan's leak check proves the second half). */
static void test_alloc_failures(void)
{
    const char *p = tpath("all.safetensors");
    int succeeded = 0;
    for (long n = 0; n < 10000 && !succeeded; n++) {
        ckpt_st_file_t *f = NULL;
        ckpt_testing_fail_alloc_after(n);
        int rc = ckpt_st_open(p, &f);
        ckpt_testing_fail_alloc_after(-1);
        if (rc == CKPT_OK) {
            succeeded = 1;
            CHECK(n > 3);
        } else {
            CHECK_RC(rc, CKPT_ENOMEM);
            CHECK(f == NULL);
        }
        ckpt_st_close(f);
    }
    CHECK(succeeded);
    for (long n = 0; n < 100; n++) {
        char **paths = NULL;
        size_t cnt = 0;
        ckpt_testing_fail_alloc_after(n);
        int rc = ckpt_st_list_files(tpath("shards"), &paths, &cnt);
        ckpt_testing_fail_alloc_after(-1);
        if (rc == CKPT_OK) ckpt_st_paths_free(paths, cnt);
    }
}

static int failing_fill(void *user, size_t index, uint64_t offset, void *buf, size_t len)
{
    (void)user, (void)index, (void)offset;
    memset(buf, 0, len);
    return CKPT_EIO;
}

static void test_write_failures_leave_nothing(void)
{
    ckpt_tensor_meta_t m;
    int64_t s = 16;
    CHECK_OK(ckpt_tensor_meta_init(&m, "w", CKPT_DTYPE_F32, &s, 1));
    const char *p = tpath("fail.safetensors");
    CHECK_RC(ckpt_st_write_fill(p, &m, 1, NULL, NULL, 0, failing_fill, NULL), CKPT_EIO);
    CHECK_ERR_HAS("tensor 'w'");
    CHECK(access(p, F_OK) != 0);
    CHECK(access(tpath("fail.safetensors.tmp"), F_OK) != 0);
    CHECK_RC(ckpt_st_write(tpath("no/such/dir.safetensors"), &m, NULL, 1, NULL, NULL, 0),
             CKPT_EINVAL);
    float data[16] = {0};
    const void *d[1] = {data};
    CHECK_RC(ckpt_st_write(tpath("no/such/dir.safetensors"), &m, d, 1, NULL, NULL, 0),
             CKPT_ENOENT);
    CHECK_ERR_HAS("no/such/dir.safetensors.tmp");
    /* Every allocation failure inside the writer is a clean ENOMEM. */
    int ok = 0;
    for (long n = 0; n < 100 && !ok; n++) {
        ckpt_testing_fail_alloc_after(n);
        int rc = ckpt_st_write(p, &m, d, 1, NULL, NULL, 0);
        ckpt_testing_fail_alloc_after(-1);
        if (rc == CKPT_OK) ok = 1;
        else CHECK_RC(rc, CKPT_ENOMEM);
    }
    CHECK(ok);

    /* A header parsed from memory validates but has no bytes behind it. */
    ckpt_st_file_t *f = NULL;
    const char *h = "{\"w\":{\"dtype\":\"U8\",\"shape\":[3],\"data_offsets\":[0,3]}}";
    CHECK_OK(ckpt_st_parse_header("mem", h, strlen(h), 8 + strlen(h) + 3, &f));
    char buf[3];
    if (f) CHECK_RC(ckpt_st_read_tensor(f, 0, buf, 3), CKPT_ESTATE);
    ckpt_st_close(f);
}

int main(void)
{
    snprintf(dir, sizeof(dir), "/tmp/ckpt_test_st_XXXXXX");
    if (!mkdtemp(dir)) return 1;
    RUN_TEST(test_round_trip_all_dtypes);
    RUN_TEST(test_empty_file_and_truncated_data);
    RUN_TEST(test_malformed_corpus);
    RUN_TEST(test_list_files);
    RUN_TEST(test_alloc_failures);
    RUN_TEST(test_write_failures_leave_nothing);
    char cmd[128];
    snprintf(cmd, sizeof(cmd), "rm -rf '%s'", dir);
    if (system(cmd) != 0) fprintf(stderr, "could not remove %s\n", dir);
    TEST_EXIT();
}
