/* Opening a safetensors file, looking tensors up and reading their bytes. */
#include <errno.h>
#include <fcntl.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "format/st_internal.h"

/* pread until `len` bytes arrived; a short file is an error naming where it ended. */
static int pread_full(int fd, const char *label, void *buf, size_t len, uint64_t offset)
{
    char *p = buf;
    size_t done = 0;
    while (done < len) {
        ssize_t n = pread(fd, p + done, len - done, (off_t)(offset + done));
        if (n < 0 && errno == EINTR) continue;
        if (n < 0)
            return ckpt__error(CKPT_EIO, "%s: read at offset %llu: %s", label,
                               (unsigned long long)(offset + done), strerror(errno));
        if (n == 0)
            return ckpt__error(CKPT_EIO,
                               "%s: file ends at offset %llu, %zu bytes short of the %zu "
                               "expected at offset %llu", label,
                               (unsigned long long)(offset + done), len - done, len,
                               (unsigned long long)offset);
        done += (size_t)n;
    }
    return CKPT_OK;
}

int ckpt_st_open(const char *path, ckpt_st_file_t **file_out)
{
    if (!path || !file_out) return ckpt__error(CKPT_EINVAL, "ckpt_st_open: NULL argument");
    int rc = CKPT_OK;
    char *header = NULL;
    ckpt_st_file_t *f = NULL;
    int fd = open(path, O_RDONLY | O_CLOEXEC | O_NONBLOCK); /* a FIFO must not hang us */
    if (fd < 0)
        return ckpt__error(errno == ENOENT ? CKPT_ENOENT : errno == EACCES ? CKPT_EPERM
                                                                           : CKPT_EIO,
                           "%s: cannot open: %s", path, strerror(errno));
    struct stat st;
    if (fstat(fd, &st) < 0) {
        rc = ckpt__error(CKPT_EIO, "%s: stat: %s", path, strerror(errno));
        goto fail;
    }
    if (!S_ISREG(st.st_mode)) {
        rc = ckpt__error(CKPT_EINVAL, "%s: not a regular file", path);
        goto fail;
    }
    uint64_t size = (uint64_t)st.st_size;
    if (size < 8) {
        rc = ckpt__error(CKPT_EFORMAT,
                         "%s: file is %llu bytes, too short for the 8-byte header length", path,
                         (unsigned long long)size);
        goto fail;
    }
    unsigned char lenbuf[8];
    rc = pread_full(fd, path, lenbuf, 8, 0);
    if (rc < 0) goto fail;
    uint64_t hlen = 0;
    for (int i = 7; i >= 0; i--) hlen = (hlen << 8) | lenbuf[i]; /* little endian */
    /* Bounds are checked before allocating so a hostile length cannot force a huge
     * allocation; ckpt_st_parse_header repeats them for in-memory callers. */
    if (hlen == 0) {
        rc = ckpt__error(CKPT_EFORMAT, "%s: header length is 0", path);
        goto fail;
    }
    if (hlen > CKPT_ST_MAX_HEADER) {
        rc = ckpt__error(CKPT_EFORMAT, "%s: header length %llu exceeds the limit of %u bytes",
                         path, (unsigned long long)hlen, CKPT_ST_MAX_HEADER);
        goto fail;
    }
    if (hlen > size - 8) {
        rc = ckpt__error(CKPT_EFORMAT,
                         "%s: header length %llu runs past the end of the file (%llu bytes)",
                         path, (unsigned long long)hlen, (unsigned long long)size);
        goto fail;
    }
    header = ckpt__malloc((size_t)hlen);
    if (!header) {
        rc = ckpt__error(CKPT_ENOMEM, "%s: no memory for a %llu-byte header", path,
                         (unsigned long long)hlen);
        goto fail;
    }
    rc = pread_full(fd, path, header, (size_t)hlen, 8);
    if (rc < 0) goto fail;
    rc = ckpt_st_parse_header(path, header, (size_t)hlen, size, &f);
    if (rc < 0) goto fail;
    f->fd = fd;
    ckpt__free(header);
    *file_out = f;
    return CKPT_OK;
fail:
    ckpt__free(header);
    close(fd);
    return rc;
}

void ckpt_st_close(ckpt_st_file_t *f)
{
    if (!f) return;
    if (f->fd >= 0) close(f->fd);
    for (size_t i = 0; i < f->num_metadata; i++) {
        ckpt__free(f->meta_keys[i]);
        ckpt__free(f->meta_values[i]);
    }
    ckpt__free(f->meta_keys);
    ckpt__free(f->meta_values);
    ckpt__free(f->by_name);
    ckpt__free(f->metas);
    ckpt__free(f->path);
    ckpt__free(f);
}

const char *ckpt_st_path(const ckpt_st_file_t *f) { return f ? f->path : ""; }
uint64_t ckpt_st_file_size(const ckpt_st_file_t *f) { return f ? f->file_size : 0; }
uint64_t ckpt_st_data_offset(const ckpt_st_file_t *f) { return f ? f->data_offset : 0; }
size_t ckpt_st_num_tensors(const ckpt_st_file_t *f) { return f ? f->num_tensors : 0; }
size_t ckpt_st_num_metadata(const ckpt_st_file_t *f) { return f ? f->num_metadata : 0; }

const ckpt_tensor_meta_t *ckpt_st_tensor(const ckpt_st_file_t *f, size_t index)
{
    if (!f || index >= f->num_tensors) return NULL;
    return &f->metas[index];
}

int ckpt_st_find(const ckpt_st_file_t *f, const char *name, size_t *index_out)
{
    if (!f || !name || !index_out) return ckpt__error(CKPT_EINVAL, "ckpt_st_find: NULL argument");
    size_t lo = 0, hi = f->num_tensors;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        int c = strcmp(f->by_name[mid]->name, name);
        if (c == 0) {
            *index_out = (size_t)(f->by_name[mid] - f->metas);
            return CKPT_OK;
        }
        if (c < 0) lo = mid + 1;
        else hi = mid;
    }
    return ckpt__error(CKPT_ENOENT, "%s: no tensor named '%s'", f->path, name);
}

int ckpt_st_metadata(const ckpt_st_file_t *f, size_t index, const char **key_out,
                     const char **value_out)
{
    if (!f || index >= f->num_metadata)
        return ckpt__error(CKPT_EINVAL, "metadata index %zu out of range", index);
    if (key_out) *key_out = f->meta_keys[index];
    if (value_out) *value_out = f->meta_values[index];
    return CKPT_OK;
}

int ckpt_st_read_tensor(const ckpt_st_file_t *f, size_t index, void *buf, size_t cap)
{
    if (!f || index >= f->num_tensors || (!buf && cap))
        return ckpt__error(CKPT_EINVAL, "ckpt_st_read_tensor: bad file, index or buffer");
    const ckpt_tensor_meta_t *m = &f->metas[index];
    if (f->fd < 0)
        return ckpt__error(CKPT_ESTATE, "%s: header parsed from memory has no data to read",
                           f->path);
    if (cap < m->nbytes)
        return ckpt__error(CKPT_EINVAL, "%s: tensor '%s' needs %llu bytes, buffer holds %zu",
                           f->path, m->name, (unsigned long long)m->nbytes, cap);
    int rc = pread_full(f->fd, f->path, buf, (size_t)m->nbytes, m->offset);
    if (rc < 0) return ckpt__error_prefix(rc, "tensor '%s': ", m->name);
    return CKPT_OK;
}
