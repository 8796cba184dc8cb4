/* ckpt_store_register_files: the safetensors side. Reads every header (cheap) through the
 * format reader and hands the tensor list to the format-independent loader (load.c). */
#include <string.h>

#include "store/store_int.h"

int ckpt_store_register_files(ckpt_store_t *store, const char *name, const char *path, int rank,
                              int nranks)
{
    char **paths = NULL;
    size_t nfiles = 0, count = 0, cap = 0;
    ckpt__load_tensor_t *tensors = NULL;
    int rc = ckpt__store_check_name(store, name);

    if (rc) return rc;
    if (!path) return ckpt__error(CKPT_EINVAL, "registering '%s': NULL path", name);
    if ((rc = ckpt_st_list_files(path, &paths, &nfiles)))
        return ckpt__error_prefix(rc, "registering '%s': ", name);
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
    ckpt_st_paths_free(paths, nfiles);
    return rc;
}
