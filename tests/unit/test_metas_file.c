/* The metas file: round trip, and every malformed input rejected with a text naming the
 * field. metas_file.c is compiled in directly: it needs only libckpt's core and cJSON, so
 * this test (and the fuzzer) run even where the UCX/MPI engine library is not built. */
#include "test.h"

#include "format/metas_file.h"

static uint8_t addr0[40], addr1[7], rkey0[33], rkey1[1], rkey2[2];

static void make(ckpt__metas_t *m, ckpt__metas_rank_t ranks[2], ckpt__metas_region_t regions[3],
                 ckpt__metas_tensor_t tensors[3])
{
    for (size_t i = 0; i < sizeof(addr0); i++) addr0[i] = (uint8_t)(i * 7 + 1);
    for (size_t i = 0; i < sizeof(rkey0); i++) rkey0[i] = (uint8_t)(255 - i);
    memset(addr1, 0xab, sizeof(addr1));
    rkey1[0] = 0;
    rkey2[0] = 0xff, rkey2[1] = 0x10;
    memset(m, 0, sizeof(*m));
    strcpy(m->name, "llama-8b");
    m->version = UINT64_MAX - 5; /* above 2^53: must survive as a string */
    regions[0] = (ckpt__metas_region_t){0x7f0000001000ull, 1u << 20, rkey0, sizeof(rkey0)};
    regions[1] = (ckpt__metas_region_t){0x7f1000000000ull, 4096, rkey1, sizeof(rkey1)};
    regions[2] = (ckpt__metas_region_t){0xffffffff00000000ull, 8192, rkey2, sizeof(rkey2)};
    ranks[0] = (ckpt__metas_rank_t){addr0, sizeof(addr0), 2, regions};
    ranks[1] = (ckpt__metas_rank_t){addr1, sizeof(addr1), 1, regions + 2};
    m->nranks = 2;
    m->ranks = ranks;
    int64_t s0[2] = {256, 1024}, s1[1] = {3};
    memset(tensors, 0, 3 * sizeof(*tensors));
    ckpt_tensor_meta_init(&tensors[0].meta, "model.embed.weight", CKPT_DTYPE_BF16, s0, 2);
    tensors[0].meta.owner = 0, tensors[0].region = 0, tensors[0].meta.offset = 0;
    tensors[0].meta.checksum = 0xfedcba9876543210ull;
    ckpt_tensor_meta_init(&tensors[1].meta, "model.norm.bias", CKPT_DTYPE_F32, s1, 1);
    tensors[1].meta.owner = 1, tensors[1].region = 0, tensors[1].meta.offset = 8192 - 12;
    ckpt_tensor_meta_init(&tensors[2].meta, "scalar", CKPT_DTYPE_F64, NULL, 0);
    tensors[2].meta.owner = 0, tensors[2].region = 1, tensors[2].meta.offset = 256;
    m->ntensors = 3;
    m->tensors = tensors;
}

static void test_base64(void)
{
    const char *plain[] = {"", "f", "fo", "foo", "foob", "fooba", "foobar"};
    const char *coded[] = {"", "Zg==", "Zm8=", "Zm9v", "Zm9vYg==", "Zm9vYmE=", "Zm9vYmFy"};
    for (size_t i = 0; i < CKPT_ARRAY_SIZE(plain); i++) {
        char out[16];
        uint8_t back[16];
        ckpt__base64_encode((const uint8_t *)plain[i], strlen(plain[i]), out);
        CHECK_STR(out, coded[i]);
        long n = ckpt__base64_decode(coded[i], strlen(coded[i]), back, sizeof(back));
        CHECK(n == (long)strlen(plain[i]) && memcmp(back, plain[i], (size_t)n) == 0);
    }
    uint8_t b[8];
    const char *bad[] = {"Zg=", "Z===", "Zg=a", "Zh==", "Zm9=", "Zm 9", "=Zg=", "Zg==Zg==", "Zm9v!A=="};
    for (size_t i = 0; i < CKPT_ARRAY_SIZE(bad); i++)
        CHECK(ckpt__base64_decode(bad[i], strlen(bad[i]), b, sizeof(b)) == -1);
    CHECK(ckpt__base64_decode("Zm9vYmFy", 8, b, 5) == -1); /* too small a buffer */
}

static void test_round_trip(void)
{
    ckpt__metas_t m, back;
    ckpt__metas_rank_t ranks[2];
    ckpt__metas_region_t regions[3];
    ckpt__metas_tensor_t tensors[3];
    make(&m, ranks, regions, tensors);
    char *json = NULL;
    size_t len = 0;
    CHECK_OK(ckpt__metas_encode(&m, &json, &len));
    CHECK(json && strlen(json) == len);
    CHECK_OK(ckpt__metas_decode(json, len, &back));
    CHECK_STR(back.name, "llama-8b");
    CHECK(back.version == m.version);
    CHECK(back.nranks == 2 && back.ntensors == 3);
    for (uint32_t r = 0; r < 2; r++) {
        CHECK(back.ranks[r].address_len == ranks[r].address_len);
        CHECK(memcmp(back.ranks[r].address, ranks[r].address, ranks[r].address_len) == 0);
        CHECK(back.ranks[r].nregions == ranks[r].nregions);
        for (uint32_t g = 0; g < ranks[r].nregions; g++) {
            const ckpt__metas_region_t *a = &ranks[r].regions[g], *b = &back.ranks[r].regions[g];
            CHECK(a->base == b->base && a->size == b->size && a->rkey_len == b->rkey_len);
            CHECK(memcmp(a->rkey, b->rkey, a->rkey_len) == 0);
        }
    }
    for (int i = 0; i < 3; i++) {
        const ckpt_tensor_meta_t *a = &tensors[i].meta, *b = &back.tensors[i].meta;
        CHECK_STR(a->name, b->name);
        CHECK(a->dtype == b->dtype && a->ndim == b->ndim && a->nbytes == b->nbytes);
        CHECK(memcmp(a->shape, b->shape, sizeof(a->shape)) == 0);
        CHECK(a->offset == b->offset && a->owner == b->owner && a->checksum == b->checksum);
        CHECK(tensors[i].region == back.tensors[i].region);
    }
    /* Encoding the decoded form gives the same bytes. */
    char *json2 = NULL;
    size_t len2 = 0;
    CHECK_OK(ckpt__metas_encode(&back, &json2, &len2));
    CHECK(len2 == len && json2 && memcmp(json, json2, len) == 0);
    /* Trailing whitespace is fine (files end in a newline). */
    char *nl = malloc(len + 2);
    memcpy(nl, json, len);
    nl[len] = '\n';
    ckpt__metas_t again;
    CHECK_OK(ckpt__metas_decode(nl, len + 1, &again));
    ckpt__metas_free(&again);
    free(nl);
    ckpt__metas_free(&back);
    CHECK(back.ranks == NULL && back.nranks == 0);
    ckpt__metas_free(NULL);
    ckpt__free(json);
    ckpt__free(json2);
}

/* Each case edits the valid document once (first occurrence of `from` -> `to`). */
typedef struct bad_case {
    const char *from, *to;
    int rc;
    const char *fragment;
} bad_case_t;

static const bad_case_t bad_cases[] = {
    {"{\"format\"", "[{\"format\"", CKPT_EFORMAT, "not valid JSON"},
    {"\"format\":\"ckpt-metas\"", "\"format\":\"other\"", CKPT_EFORMAT, "format: \"other\""},
    {"\"format\":\"ckpt-metas\",", "", CKPT_EFORMAT, "format: missing"},
    {"\"format_version\":1", "\"format_version\":2", CKPT_EUNSUPPORTED, "format_version 2"},
    {"\"format_version\":1", "\"format_version\":1.5", CKPT_EFORMAT, "format_version: 1.5"},
    {"\"name\":\"llama-8b\"", "\"name\":\"\"", CKPT_EFORMAT, "name: empty"},
    {"\"name\":\"llama-8b\"", "\"name\":7", CKPT_EFORMAT, "name: wrong JSON type"},
    {"\"version\":\"18446744073709551610\"", "\"version\":\"18446744073709551616\"", CKPT_EFORMAT,
     "version: \"18446744073709551616\" is not a decimal"},
    {"\"version\":\"18446744073709551610\"", "\"version\":\"-1\"", CKPT_EFORMAT, "version"},
    {"\"ranks\":[", "\"ranks\":[],\"x\":[", CKPT_EFORMAT, "ranks: empty"},
    {"\"rank\":0", "\"rank\":1", CKPT_EFORMAT, "ranks[0].rank: 1 out of order"},
    {"\"address\":\"", "\"address\":\"!", CKPT_EFORMAT, "ranks[0].address: invalid base64"},
    {"\"address\":\"", "\"addr\":\"", CKPT_EFORMAT, "ranks[0].address: missing"},
    {"\"base\":\"0x7f0000001000\"", "\"base\":\"7f0000001000z\"", CKPT_EFORMAT,
     "ranks[0].regions[0].base"},
    {"\"base\":\"0xffffffff00000000\",\"size\":8192", "\"base\":\"0xffffffffffffff00\",\"size\":8192",
     CKPT_EFORMAT, "ranks[1].regions[0]: range"},
    {"\"size\":4096", "\"size\":0", CKPT_EFORMAT, "ranks[0].regions[1]: range"},
    {"\"size\":4096", "\"size\":-4096", CKPT_EFORMAT, "ranks[0].regions[1].size"},
    {"\"rkey\":\"AA==\"", "\"rkey\":\"AA=\"", CKPT_EFORMAT, "ranks[0].regions[1].rkey: invalid base64"},
    {"\"rkey\":\"AA==\"", "\"rkey\":\"\"", CKPT_EFORMAT, "ranks[0].regions[1].rkey"},
    {"\"dtype\":\"BF16\"", "\"dtype\":\"BF17\"", CKPT_EFORMAT, "tensors[0].dtype: unknown dtype \"BF17\""},
    {"\"shape\":[256,1024]", "\"shape\":[256,1024,1,1,1,1,1,1,1]", CKPT_EFORMAT,
     "tensors[0].shape: more than 8"},
    {"\"shape\":[256,1024]", "\"shape\":[256,-1024]", CKPT_EFORMAT, "tensors[0].shape[1]"},
    {"\"shape\":[256,1024]", "\"shape\":[256,\"1024\"]", CKPT_EFORMAT, "tensors[0].shape[1]"},
    {"\"shape\":[256,1024]", "\"shape\":[256,1023]", CKPT_EFORMAT, "'model.embed.weight': nbytes 524288"},
    {"\"shape\":[256,1024]", "\"shape\":[4294967296,4294967296]", CKPT_EFORMAT, "tensors[0]"},
    {"\"name\":\"model.norm.bias\"", "\"name\":\"\"", CKPT_EFORMAT, "tensors[1].name: empty"},
    {"\"rank\":1,\"region\":0", "\"rank\":2,\"region\":0", CKPT_EFORMAT, "tensors[1] 'model.norm.bias': rank 2"},
    {"\"rank\":1,\"region\":0", "\"rank\":1,\"region\":1", CKPT_EFORMAT, "region 1 but rank 1 has 1"},
    {"\"offset\":8180", "\"offset\":8184", CKPT_EFORMAT, "'model.norm.bias': bytes 8184+12 outside region 0 of rank 1"},
    {"\"offset\":8180", "\"offset\":1e300", CKPT_EFORMAT, "tensors[1].offset"},
    {"\"checksum\":\"fedcba9876543210\"", "\"checksum\":\"xyz\"", CKPT_EFORMAT, "tensors[0].checksum"},
    {"\"checksum\":\"fedcba9876543210\"", "\"checksum\":\"1fedcba9876543210\"", CKPT_EFORMAT,
     "tensors[0].checksum"},
    {"\"tensors\":[", "\"tensors\":{}, \"t\":[", CKPT_EFORMAT, "tensors: wrong JSON type"},
};

static char *replace_once(const char *s, const char *from, const char *to)
{
    const char *at = strstr(s, from);
    if (!at) return NULL;
    size_t n = strlen(s) - strlen(from) + strlen(to);
    char *out = malloc(n + 1);
    size_t pre = (size_t)(at - s);
    memcpy(out, s, pre);
    strcpy(out + pre, to);
    strcat(out, at + strlen(from));
    return out;
}

static void test_malformed(void)
{
    ckpt__metas_t m, out;
    ckpt__metas_rank_t ranks[2];
    ckpt__metas_region_t regions[3];
    ckpt__metas_tensor_t tensors[3];
    make(&m, ranks, regions, tensors);
    char *json = NULL;
    size_t len;
    CHECK_OK(ckpt__metas_encode(&m, &json, &len));
    for (size_t i = 0; i < CKPT_ARRAY_SIZE(bad_cases); i++) {
        const bad_case_t *c = &bad_cases[i];
        char *doc = replace_once(json, c->from, c->to);
        if (!doc) {
            fprintf(stderr, "case %zu: \"%s\" not in the document\n", i, c->from);
            CHECK(doc != NULL);
            continue;
        }
        memset(&out, 0x5a, sizeof(out));
        int rc = ckpt__metas_decode(doc, strlen(doc), &out);
        if (rc != c->rc || !strstr(ckpt_last_error(), c->fragment))
            fprintf(stderr, "case %zu (%s -> %s): %s \"%s\"\n", i, c->from, c->to,
                    ckpt_status_name(rc), ckpt_last_error());
        CHECK_RC(rc, c->rc);
        CHECK_ERR_HAS(c->fragment);
        CHECK(((unsigned char *)&out)[0] == 0x5a); /* untouched on failure */
        free(doc);
    }
    /* Truncations anywhere never crash and always fail. */
    for (size_t cut = 0; cut < len; cut += 7) CHECK(ckpt__metas_decode(json, cut, &out) == CKPT_EFORMAT);
    CHECK_RC(ckpt__metas_decode("{} x", 4, &out), CKPT_EFORMAT);
    /* Encode validates too. */
    tensors[1].meta.offset = 8190;
    char *j2 = NULL;
    CHECK_RC(ckpt__metas_encode(&m, &j2, &len), CKPT_EFORMAT);
    CHECK_ERR_HAS("outside region 0 of rank 1");
    ckpt__free(json);
}

int main(void)
{
    RUN_TEST(test_base64);
    RUN_TEST(test_round_trip);
    RUN_TEST(test_malformed);
    TEST_EXIT();
}
