/* What `ckpt-engine plan` costs: the tensors of a checkpoint directory (its safetensors
 * headers only) or of a model description (the files under bench/models: templates expanded over
 * layers and experts, see bench/models/README.md). */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cjson/cJSON.h>

#include "ckpt/safetensors.h"
#include "plan_input.h"

static int grow(plan_input_t *in, size_t more)
{
    if (in->count + more <= in->cap) return 0;
    size_t cap = in->cap ? in->cap * 2 : 1024;
    while (cap < in->count + more) cap *= 2;
    ckpt_tensor_meta_t *m = realloc(in->metas, cap * sizeof(*m));
    if (!m) return -1;
    in->metas = m;
    in->cap = cap;
    return 0;
}

/* Replaces the first "{key}" in tmpl with value into out. */
static int expand(char *out, size_t cap, const char *tmpl, const char *key, long value)
{
    const char *at = strstr(tmpl, key);
    if (!at) return snprintf(out, cap, "%s", tmpl) < (int)cap ? 0 : -1;
    int n = snprintf(out, cap, "%.*s%ld%s", (int)(at - tmpl), tmpl, value, at + strlen(key));
    return n >= 0 && (size_t)n < cap ? 0 : -1;
}

/* 1 with [first, end) when the entry has `field`, 0 without it ([0, 1)), -1 when bad. */
static int range_of(const cJSON *entry, size_t k, const char *field, long *first, long *end,
                    char *err, size_t errcap)
{
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(entry, field);
    *first = 0, *end = 1;
    if (!v) return 0;
    if (strcmp(field, "experts") == 0 && cJSON_IsNumber(v) && v->valuedouble >= 1) {
        *end = (long)v->valuedouble;
        return 1;
    }
    if (strcmp(field, "layers") == 0 && cJSON_IsArray(v) && cJSON_GetArraySize(v) == 2 &&
        cJSON_IsNumber(cJSON_GetArrayItem(v, 0)) && cJSON_IsNumber(cJSON_GetArrayItem(v, 1))) {
        *first = (long)cJSON_GetArrayItem(v, 0)->valuedouble;
        *end = (long)cJSON_GetArrayItem(v, 1)->valuedouble;
        if (*first >= 0 && *end > *first) return 1;
    }
    snprintf(err, errcap, "tensor entry %zu: \"%s\" must be %s", k, field,
             strcmp(field, "layers") == 0 ? "[first, end) with 0 <= first < end"
                                          : "a number of experts >= 1");
    return -1;
}

static int add_entry(plan_input_t *in, const cJSON *entry, size_t k, char *err, size_t errcap)
{
    const cJSON *name = cJSON_GetObjectItemCaseSensitive(entry, "name");
    const cJSON *shape = cJSON_GetObjectItemCaseSensitive(entry, "shape");
    const cJSON *dtype = cJSON_GetObjectItemCaseSensitive(entry, "dtype");
    if (!cJSON_IsString(name) || !cJSON_IsArray(shape) || !cJSON_IsString(dtype)) {
        snprintf(err, errcap, "tensor entry %zu needs \"name\" (string), \"shape\" (array) and "
                 "\"dtype\" (string)", k);
        return -1;
    }
    int dt = ckpt_dtype_from_name(dtype->valuestring);
    if (dt == CKPT_DTYPE_INVALID) {
        snprintf(err, errcap, "tensor entry %zu ('%s'): unknown dtype '%s'", k,
                 name->valuestring, dtype->valuestring);
        return -1;
    }
    int64_t dims[CKPT_MAX_DIMS];
    int ndim = cJSON_GetArraySize(shape);
    if (ndim > CKPT_MAX_DIMS) {
        snprintf(err, errcap, "tensor entry %zu ('%s'): %d dimensions", k, name->valuestring, ndim);
        return -1;
    }
    for (int i = 0; i < ndim; i++) {
        const cJSON *d = cJSON_GetArrayItem(shape, i);
        if (!cJSON_IsNumber(d) || d->valuedouble < 0) {
            snprintf(err, errcap, "tensor entry %zu ('%s'): shape[%d] is not a size", k,
                     name->valuestring, i);
            return -1;
        }
        dims[i] = (int64_t)d->valuedouble;
    }
    long l0, l1, e0, e1;
    int has_layers = range_of(entry, k, "layers", &l0, &l1, err, errcap);
    if (has_layers < 0) return -1;
    int has_experts = range_of(entry, k, "experts", &e0, &e1, err, errcap);
    if (has_experts < 0) return -1;
    if (has_layers != (strstr(name->valuestring, "{layer}") != NULL) ||
        has_experts != (strstr(name->valuestring, "{expert}") != NULL)) {
        snprintf(err, errcap, "tensor entry %zu ('%s'): {layer} goes with \"layers\" and "
                 "{expert} with \"experts\"", k, name->valuestring);
        return -1;
    }
    if (grow(in, (size_t)((l1 - l0) * (e1 - e0))) < 0) {
        snprintf(err, errcap, "no memory for the tensors of entry %zu", k);
        return -1;
    }
    for (long l = l0; l < l1; l++)
        for (long e = e0; e < e1; e++) {
            char a[CKPT_NAME_MAX], b[CKPT_NAME_MAX];
            if (expand(a, sizeof(a), name->valuestring, "{layer}", l) < 0 ||
                expand(b, sizeof(b), a, "{expert}", e) < 0 ||
                ckpt_tensor_meta_init(&in->metas[in->count], b, dt, dims, ndim) < 0) {
                snprintf(err, errcap, "tensor entry %zu ('%s'): %s", k, name->valuestring,
                         ckpt_last_error());
                return -1;
            }
            in->count++;
        }
    return 0;
}

static int config_int(const cJSON *config, const char *const *keys)
{
    for (; *keys; keys++) {
        const cJSON *v = cJSON_GetObjectItemCaseSensitive(config, *keys);
        if (cJSON_IsNumber(v)) return (int)v->valuedouble;
    }
    return 0;
}

static int load_description(const char *path, plan_input_t *in, char *err, size_t errcap)
{
    FILE *f = fopen(path, "rb");
    if (!f) {
        snprintf(err, errcap, "%s: %s", path, strerror(errno));
        return -1;
    }
    fseek(f, 0, SEEK_END);
    long len = ftell(f);
    fseek(f, 0, SEEK_SET);
    char *text = len > 0 ? malloc((size_t)len + 1) : NULL;
    size_t got = text ? fread(text, 1, (size_t)len, f) : 0;
    fclose(f);
    if (!text || got != (size_t)len) {
        free(text);
        snprintf(err, errcap, "%s: cannot read it", path);
        return -1;
    }
    text[len] = '\0';
    cJSON *root = cJSON_Parse(text);
    free(text);
    const cJSON *tensors = root ? cJSON_GetObjectItemCaseSensitive(root, "tensors") : NULL;
    if (!cJSON_IsArray(tensors)) {
        snprintf(err, errcap, "%s: not a model description (a JSON object with a \"tensors\" "
                 "array; see bench/models/README.md)", path);
        cJSON_Delete(root);
        return -1;
    }
    const cJSON *name = cJSON_GetObjectItemCaseSensitive(root, "name");
    snprintf(in->name, sizeof(in->name), "%s", cJSON_IsString(name) ? name->valuestring : path);
    const cJSON *config = cJSON_GetObjectItemCaseSensitive(root, "config");
    static const char *const layers[] = {"num_hidden_layers", NULL};
    static const char *const experts[] = {"n_routed_experts", "num_experts", "num_local_experts", NULL};
    static const char *const kv[] = {"num_key_value_heads", NULL};
    in->num_layers = config_int(config, layers);
    in->num_experts = config_int(config, experts);
    in->kv_heads = config_int(config, kv);
    size_t k = 0;
    int rc = 0;
    for (const cJSON *e = tensors->child; e && rc == 0; e = e->next, k++)
        rc = add_entry(in, e, k, err, errcap);
    cJSON_Delete(root);
    if (rc == 0 && in->count == 0) {
        snprintf(err, errcap, "%s: the description lists no tensor", path);
        rc = -1;
    }
    return rc;
}

static int load_checkpoint(const char *path, plan_input_t *in, char *err, size_t errcap)
{
    char **paths = NULL;
    size_t n = 0;
    if (ckpt_st_list_files(path, &paths, &n) < 0) {
        snprintf(err, errcap, "%s", ckpt_last_error());
        return -1;
    }
    int rc = 0;
    for (size_t i = 0; i < n && rc == 0; i++) {
        ckpt_st_file_t *f = NULL;
        if (ckpt_st_open(paths[i], &f) < 0) {
            snprintf(err, errcap, "%s", ckpt_last_error());
            rc = -1;
            break;
        }
        size_t t = ckpt_st_num_tensors(f);
        if (grow(in, t) < 0) {
            snprintf(err, errcap, "no memory for %zu tensors", t);
            rc = -1;
        }
        for (size_t j = 0; rc == 0 && j < t; j++) in->metas[in->count++] = *ckpt_st_tensor(f, j);
        ckpt_st_close(f);
    }
    ckpt_st_paths_free(paths, n);
    snprintf(in->name, sizeof(in->name), "%s", path);
    if (rc == 0 && in->count == 0) {
        snprintf(err, errcap, "%s: no tensors", path);
        rc = -1;
    }
    return rc;
}

int plan_input_load(const char *path, plan_input_t *in, char *err, size_t errcap)
{
    memset(in, 0, sizeof(*in));
    size_t len = strlen(path);
    int rc = len > 5 && strcmp(path + len - 5, ".json") == 0 &&
                     strstr(path, "safetensors.index.json") == NULL
                 ? load_description(path, in, err, errcap)
                 : load_checkpoint(path, in, err, errcap);
    if (rc < 0) plan_input_free(in);
    return rc;
}

void plan_input_free(plan_input_t *in)
{
    free(in->metas);
    in->metas = NULL;
    in->count = in->cap = 0;
}
