/* dtypes of the safetensors format and tensor metadata helpers. */
#include <string.h>

#include "core/internal.h"

size_t ckpt_dtype_size(int dtype)
{
    switch (dtype) {
#define CKPT__DTYPE_SIZE(name, value, size)                                                  \
    case (value): return (size);
        CKPT_DTYPE_MAP(CKPT__DTYPE_SIZE)
#undef CKPT__DTYPE_SIZE
    default: return 0;
    }
}

const char *ckpt_dtype_name(int dtype)
{
    switch (dtype) {
#define CKPT__DTYPE_NAME(name, value, size)                                                  \
    case (value): return #name;
        CKPT_DTYPE_MAP(CKPT__DTYPE_NAME)
#undef CKPT__DTYPE_NAME
    default: return "INVALID";
    }
}

int ckpt_dtype_from_name(const char *name)
{
    if (name == NULL) return CKPT_DTYPE_INVALID;
#define CKPT__DTYPE_PARSE(dname, value, size)                                                \
    if (strcmp(name, #dname) == 0) return (value);
    CKPT_DTYPE_MAP(CKPT__DTYPE_PARSE)
#undef CKPT__DTYPE_PARSE
    return CKPT_DTYPE_INVALID;
}

uint64_t ckpt_aligned_size(uint64_t nbytes) { return CKPT_ALIGN_UP(nbytes, (uint64_t)CKPT_ALIGN); }

int ckpt_shape_numel(const int64_t *shape, int ndim, uint64_t *numel_out)
{
    if (ndim < 0 || ndim > CKPT_MAX_DIMS || (ndim > 0 && shape == NULL))
        return ckpt__error(CKPT_EINVAL, "shape has %d dimensions (allowed 0..%d)", ndim,
                           CKPT_MAX_DIMS);
    uint64_t numel = 1;
    for (int i = 0; i < ndim; i++) {
        if (shape[i] < 0) return ckpt__error(CKPT_EINVAL, "shape dimension %d is negative", i);
        uint64_t d = (uint64_t)shape[i];
        if (d != 0 && numel > (UINT64_MAX >> 1) / d)
            return ckpt__error(CKPT_ETOOBIG, "shape product overflows at dimension %d", i);
        numel *= d;
    }
    *numel_out = numel;
    return CKPT_OK;
}

int ckpt_tensor_meta_init(ckpt_tensor_meta_t *meta, const char *name, int dtype,
                          const int64_t *shape, int ndim)
{
    if (meta == NULL || name == NULL) return ckpt__error(CKPT_EINVAL, "meta or name is NULL");
    size_t esize = ckpt_dtype_size(dtype);
    if (esize == 0) return ckpt__error(CKPT_EINVAL, "tensor '%s': unknown dtype %d", name, dtype);
    if (strlen(name) >= CKPT_NAME_MAX)
        return ckpt__error(CKPT_ETOOBIG, "tensor name longer than %d bytes: '%.64s...'",
                           CKPT_NAME_MAX - 1, name);
    uint64_t numel;
    int rc = ckpt_shape_numel(shape, ndim, &numel);
    if (rc < 0) return ckpt__error_prefix(rc, "tensor '%s': ", name);
    if (numel > (UINT64_MAX >> 1) / esize)
        return ckpt__error(CKPT_ETOOBIG, "tensor '%s': byte size overflows", name);
    memset(meta, 0, sizeof(*meta));
    memcpy(meta->name, name, strlen(name) + 1);
    meta->dtype = dtype;
    meta->ndim = ndim;
    for (int i = 0; i < ndim; i++) meta->shape[i] = shape[i];
    meta->nbytes = numel * esize;
    meta->owner = -1;
    return CKPT_OK;
}

