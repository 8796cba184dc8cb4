/* ckpt_store_register_files: the safetensors side. Reads every header (cheap) through the
 * format reader and hands the tensor list to the format-independent loader (load.c). */
#include <stdlib.h>
#include <string.h>

#include "store/store_int.h"

/* Reads every file's header and loads the tensors of all of them as one checkpoint. */
static int register_paths(ckpt_store_t *store, const char *name, char **paths, size_t nfiles,
                          int rank, int nranks)
{
    size_t count = 0, cap = 0;
    ckpt__load_tensor_t *tensors = NULL;
    int rc = CKPT_OK;
    for (size_t f = 0; f < nfiles; f++) {
        ckpt_st_file_t *file = NULL;
        if ((rc = ckpt_st_open(paths[f], &file))) {
            ckpt__error_prefix(rc, "registering '%s': ", name);
            goto out;
        }
        size_t n = ckpt_st_num_tensors(file);
        if (count + n > cap) {
            size_t ncap = CKPT_MAX(2 * cap, count + n);
            ckpt__load_tensor_t *grown = ckpt__realloc(tensors, ncap * sizeof(*grown));
            if (!grown) {
                ckpt_st_close(file);
                rc = ckpt__error(CKPT_ENOMEM, "registering '%s': out of memory", name);
                goto out;
            }
            tensors = grown;
            cap = ncap;
        }
        for (size_t i = 0; i < n; i++) {
            tensors[count].meta = *ckpt_st_tensor(file, i);
            tensors[count].file = (uint32_t)f;
            count++;
        }
        ckpt_st_close(file);
    }
    rc = ckpt__store_load(store, name, paths, nfiles, tensors, count, rank, nranks);
out:
    ckpt__free(tensors);
    return rc;
}

/* A directory (or index) is listed once, before the reads: a shard that appeared or vanished
 * meanwhile means the registered files are not the checkpoint that is there now (rm -rf
 * while registering, a writer still adding shards). Listed again after the reads. */
static int check_same_files(const char *path, char *const *paths, size_t nfiles)
{
    char **now = NULL;
    size_t n = 0;
    int rc = ckpt_st_list_files(path, &now, &n);
    if (rc) return ckpt__error(CKPT_EIO, "%s changed while it was registered (%s); register it "
                               "again once it is complete", path, ckpt_last_error());
    for (size_t i = 0; i < CKPT_MAX(n, nfiles) && rc == CKPT_OK; i++)
        if (i >= n || i >= nfiles || strcmp(now[i], paths[i]) != 0)
            rc = ckpt__error(CKPT_EIO, "%s changed while it was registered: %s %s; register it "
                             "again once it is complete", path,
                             i >= n || (i < nfiles && strcmp(now[i], paths[i]) > 0) ? paths[i] : now[i],
                             i >= n || (i < nfiles && strcmp(now[i], paths[i]) > 0) ? "vanished" : "appeared");
    ckpt_st_paths_free(now, n);
    return rc;
}

int ckpt_store_register_files(ckpt_store_t *store, const char *name, const char *path, int rank,
                              int nranks)
{
    char **paths = NULL;
    size_t nfiles = 0;
    int rc = ckpt__store_check_name(store, name);

    if (rc) return rc;
    if (!path) return ckpt__error(CKPT_EINVAL, "registering '%s': NULL path", name);
    if ((rc = ckpt_st_list_files(path, &paths, &nfiles)))
        return ckpt__error_prefix(rc, "registering '%s': ", name);
    rc = register_paths(store, name, paths, nfiles, rank, nranks);
    if (rc == CKPT_OK && (rc = check_same_files(path, paths, nfiles))) {
        ckpt_store_unregister(store, name); /* succeeds: the check's error stays the last */
        ckpt__error_prefix(rc, "registering '%s': ", name);
    }
    ckpt_st_paths_free(paths, nfiles);
    return rc;
}

static int cmp_path(const void *a, const void *b)
{
    return strcmp(*(char *const *)a, *(char *const *)b);
}

int ckpt_store_register_file_list(ckpt_store_t *store, const char *name,
                                  const char *const *paths, size_t count, int rank, int nranks)
{
    int rc = ckpt__store_check_name(store, name);
    if (rc) return rc;
    if (!paths || count == 0)
        return ckpt__error(CKPT_EINVAL, "registering '%s': an empty list of files", name);
    char **sorted = ckpt__calloc(count, sizeof(*sorted));
    if (!sorted) return ckpt__error(CKPT_ENOMEM, "registering '%s': out of memory", name);
    for (size_t i = 0; i < count && rc == CKPT_OK; i++)
        if (!paths[i] || !(sorted[i] = ckpt__strdup(paths[i])))
            rc = ckpt__error(paths[i] ? CKPT_ENOMEM : CKPT_EINVAL,
                             "registering '%s': %s", name, paths[i] ? "out of memory" : "NULL path");
    /* Sorted as a directory's files are, so the same files give the same layout (and the
     * same shares on every rank) whatever order the list named them in. */
    if (rc == CKPT_OK) qsort(sorted, count, sizeof(*sorted), cmp_path);
    for (size_t i = 1; i < count && rc == CKPT_OK; i++)
        if (strcmp(sorted[i - 1], sorted[i]) == 0)
            rc = ckpt__error(CKPT_EINVAL, "registering '%s': %s is listed twice", name, sorted[i]);
    if (rc == CKPT_OK) rc = register_paths(store, name, sorted, count, rank, nranks);
    ckpt_st_paths_free(sorted, count);
    return rc;
}
