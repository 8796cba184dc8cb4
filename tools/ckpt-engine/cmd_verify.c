/* ckpt-engine verify MODEL REFERENCE: compares two checkpoints tensor by tensor, byte for
 * byte (e.g. a worker's dump against the files it was updated from). */
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ckpt/ckpt.h"
#include "commands.h"

typedef struct {
    ckpt_st_file_t **files;
    size_t nfiles;
} ckpt_set_t;

static void set_close(ckpt_set_t *s)
{
    for (size_t i = 0; i < s->nfiles; i++) ckpt_st_close(s->files[i]);
    free(s->files);
    memset(s, 0, sizeof(*s));
}

static int set_open(const char *path, ckpt_set_t *s)
{
    char **paths = NULL;
    size_t n = 0;
    memset(s, 0, sizeof(*s));
    int rc = ckpt_st_list_files(path, &paths, &n);
    if (rc < 0) return rc;
    s->files = calloc(n + 1, sizeof(*s->files));
    for (size_t i = 0; rc == 0 && i < n; i++) {
        rc = ckpt_st_open(paths[i], &s->files[i]);
        if (rc == 0) s->nfiles++;
    }
    ckpt_st_paths_free(paths, n);
    if (rc < 0) set_close(s);
    return rc;
}

static int set_find(const ckpt_set_t *s, const char *name, ckpt_st_file_t **file_out,
                    size_t *index_out)
{
    for (size_t i = 0; i < s->nfiles; i++)
        if (ckpt_st_find(s->files[i], name, index_out) == 0) {
            *file_out = s->files[i];
            return 0;
        }
    return -1;
}

static void verify_usage(FILE *out)
{
    fprintf(out, "usage: ckpt-engine verify [--quiet] MODEL REFERENCE\n\n"
                 "Compares every tensor of REFERENCE (a safetensors file, directory or index)\n"
                 "with the tensor of the same name in MODEL: dtype, shape and every byte.\n"
                 "Prints 'verified' and exits 0 when all match; names the first differing\n"
                 "tensor and byte offset and exits 1 otherwise.\n");
}

int cmd_verify(int argc, char **argv)
{
    int quiet = 0;
    for (int i = 1; i < argc; i++)
        if (strcmp(argv[i], "-h") == 0 || strcmp(argv[i], "--help") == 0) {
            verify_usage(stdout);
            return 0;
        }
    int first = 1;
    if (argc > 1 && strcmp(argv[1], "--quiet") == 0) {
        quiet = 1;
        first = 2;
    }
    if (argc - first != 2) {
        verify_usage(stderr);
        return 2;
    }
    const char *model_path = argv[first], *ref_path = argv[first + 1];
    ckpt_set_t model, ref;
    if (set_open(model_path, &model) < 0 ) {
        fprintf(stderr, "ckpt-engine verify: %s\n", ckpt_last_error());
        return 1;
    }
    if (set_open(ref_path, &ref) < 0) {
        fprintf(stderr, "ckpt-engine verify: %s\n", ckpt_last_error());
        set_close(&model);
        return 1;
    }
    int bad = 0;
    size_t ntensors = 0;
    uint64_t nbytes = 0;
    void *a = NULL, *b = NULL;
    for (size_t f = 0; f < ref.nfiles && !bad; f++) {
        for (size_t i = 0; i < ckpt_st_num_tensors(ref.files[f]) && !bad; i++) {
            const ckpt_tensor_meta_t *rm = ckpt_st_tensor(ref.files[f], i);
            ckpt_st_file_t *mf;
            size_t mi;
            if (set_find(&model, rm->name, &mf, &mi) < 0) {
                fprintf(stderr, "ckpt-engine verify: %s lacks tensor '%s'\n", model_path, rm->name);
                bad = 1;
                break;
            }
            const ckpt_tensor_meta_t *mm = ckpt_st_tensor(mf, mi);
            if (mm->dtype != rm->dtype || mm->ndim != rm->ndim ||
                memcmp(mm->shape, rm->shape, sizeof(int64_t) * (size_t)rm->ndim) != 0) {
                fprintf(stderr, "ckpt-engine verify: tensor '%s': dtype or shape differs\n",
                        rm->name);
                bad = 1;
                break;
            }
            a = realloc(a, rm->nbytes + 1);
            b = realloc(b, rm->nbytes + 1);
            if (ckpt_st_read_tensor(mf, mi, a, rm->nbytes) < 0 ||
                ckpt_st_read_tensor(ref.files[f], i, b, rm->nbytes) < 0) {
                fprintf(stderr, "ckpt-engine verify: %s\n", ckpt_last_error());
                bad = 1;
                break;
            }
            if (memcmp(a, b, rm->nbytes) != 0) {
                uint64_t off = 0;
                while (((char *)a)[off] == ((char *)b)[off]) off++;
                fprintf(stderr, "ckpt-engine verify: tensor '%s' differs at byte %llu\n",
                        rm->name, (unsigned long long)off);
                bad = 1;
                break;
            }
            ntensors++;
            nbytes += rm->nbytes;
        }
    }
    free(a);
    free(b);
    set_close(&model);
    set_close(&ref);
    if (!bad && !quiet)
        printf("verified: %zu tensors, %llu bytes identical\n", ntensors,
               (unsigned long long)nbytes);
    return bad ? 1 : 0;
}
