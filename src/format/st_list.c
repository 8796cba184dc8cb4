/* Resolving a checkpoint path (file, directory or model.safetensors.index.json) to the
 * list of its safetensors files. */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cjson/cJSON.h>

#include "format/st_internal.h"

#define INDEX_NAME "model.safetensors.index.json"

/* A growable list of owned strings. */
typedef struct {
    char **v;
    size_t n, cap;
} strlist_t;

static int strlist_push_owned(strlist_t *l, char *s)
{
    if (!s) return ckpt__error(CKPT_ENOMEM, "no memory for a path");
    if (l->n == l->cap) {
        size_t cap = l->cap ? l->cap * 2 : 16;
        char **v = ckpt__realloc(l->v, cap * sizeof(*v));
        if (!v) {
            ckpt__free(s);
            return ckpt__error(CKPT_ENOMEM, "no memory for a list of %zu paths", cap);
        }
        l->v = v;
        l->cap = cap;
    }
    l->v[l->n++] = s;
    return CKPT_OK;
}

static char *path_join(const char *dir, const char *name)
{
    size_t a = strlen(dir), b = strlen(name);
    char *p = ckpt__malloc(a + b + 2);
    if (!p) return NULL;
    memcpy(p, dir, a);
    size_t n = a;
    if (a && dir[a - 1] != '/') p[n++] = '/';
    memcpy(p + n, name, b + 1);
    return p;
}

static int cmp_str(const void *a, const void *b)
{
    return strcmp(*(char *const *)a, *(char *const *)b);
}

/* Sorts, drops duplicates and hands the list over. */
static void strlist_finish(strlist_t *l, char ***paths_out, size_t *count_out)
{
    qsort(l->v, l->n, sizeof(*l->v), cmp_str);
    size_t w = 0;
    for (size_t i = 0; i < l->n; i++) {
        if (w && strcmp(l->v[w - 1], l->v[i]) == 0) ckpt__free(l->v[i]);
        else l->v[w++] = l->v[i];
    }
    *paths_out = l->v;
    *count_out = w;
}

int ckpt__st_read_small_file(const char *path, size_t max, char **buf_out, size_t *len_out)
{
    int rc = CKPT_OK;
    char *buf = NULL;
    int fd = open(path, O_RDONLY | O_CLOEXEC | O_NONBLOCK); /* a FIFO must not hang us */
    if (fd < 0)
        return ckpt__error(errno == ENOENT ? CKPT_ENOENT : CKPT_EIO, "%s: cannot open: %s", path,
                           strerror(errno));
    struct stat st;
    if (fstat(fd, &st) < 0 || !S_ISREG(st.st_mode)) {
        rc = ckpt__error(CKPT_EIO, "%s: not a readable regular file", path);
        goto out;
    }
    if ((uint64_t)st.st_size > max) {
        rc = ckpt__error(CKPT_ETOOBIG, "%s: %lld bytes, more than the %zu accepted", path,
                         (long long)st.st_size, max);
        goto out;
    }
    size_t len = (size_t)st.st_size, done = 0;
    buf = ckpt__malloc(len + 1);
    if (!buf) {
        rc = ckpt__error(CKPT_ENOMEM, "%s: no memory for %zu bytes", path, len);
        goto out;
    }
    while (done < len) {
        ssize_t n = read(fd, buf + done, len - done);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) {
            rc = ckpt__error(CKPT_EIO, "%s: read at offset %zu: %s", path, done,
                             n < 0 ? strerror(errno) : "unexpected end of file");
            goto out;
        }
        done += (size_t)n;
    }
    buf[len] = '\0';
    *buf_out = buf;
    *len_out = len;
    buf = NULL;
out:
    ckpt__free(buf);
    close(fd);
    return rc;
}

static char *dir_of(const char *path)
{
    const char *slash = strrchr(path, '/');
    if (!slash) return ckpt__strdup(".");
    if (slash == path) return ckpt__strdup("/");
    size_t n = (size_t)(slash - path);
    char *d = ckpt__malloc(n + 1);
    if (d) {
        memcpy(d, path, n);
        d[n] = '\0';
    }
    return d;
}

static int is_regular(const char *path)
{
    struct stat st;
    return stat(path, &st) == 0 && S_ISREG(st.st_mode);
}

/* 1 when an index entry leaves the index's folder by its text: absolute, or a ".."
 * component. Whoever can write an index could otherwise make the engine read (and serve
 * to workers) any file rank 0 can open. Symlinks inside the folder are followed: the
 * Hugging Face cache links every shard of a snapshot to ../../blobs/<hash>, and a link
 * is put there by whoever owns the folder, not by the index's text. */
static int leaves_dir(const char *name)
{
    if (name[0] == '/') return 1;
    for (const char *p = name; *p;) {
        size_t n = strcspn(p, "/");
        if (n == 2 && p[0] == '.' && p[1] == '.') return 1;
        p += n;
        while (*p == '/') p++;
    }
    return 0;
}

/* The files named by an index's "weight_map", relative to the index's folder. */
static int list_index(const char *index, strlist_t *l)
{
    char *text = NULL, *dir = NULL;
    size_t len = 0;
    cJSON *root = NULL;
    int rc = ckpt__st_read_small_file(index, CKPT__ST_MAX_INDEX, &text, &len);
    if (rc < 0) return rc;
    root = cJSON_ParseWithLength(text, len);
    const cJSON *map = cJSON_GetObjectItemCaseSensitive(root, "weight_map");
    if (!cJSON_IsObject(root) || !cJSON_IsObject(map)) {
        rc = ckpt__error(CKPT_EFORMAT, "%s: not a JSON object with a \"weight_map\" object",
                         index);
        goto out;
    }
    dir = dir_of(index);
    if (!dir) {
        rc = ckpt__error(CKPT_ENOMEM, "%s: no memory", index);
        goto out;
    }
    for (const cJSON *it = map->child; it; it = it->next) {
        if (!cJSON_IsString(it) || it->valuestring[0] == '\0') {
            rc = ckpt__error(CKPT_EFORMAT, "%s: weight_map entry '%s' is not a file name", index,
                             it->string);
            goto out;
        }
        if (leaves_dir(it->valuestring)) {
            rc = ckpt__error(CKPT_EFORMAT,
                             "%s: weight_map entry '%s' names '%s', outside the index's "
                             "folder (absolute or '..'): shards must be files beside the "
                             "index or below it",
                             index, it->string, it->valuestring);
            goto out;
        }
        char *p = path_join(dir, it->valuestring);
        if (p && !is_regular(p)) {
            rc = ckpt__error(CKPT_ENOENT, "%s: shard '%s' (holding tensor '%s') not found at %s",
                             index, it->valuestring, it->string, p);
            ckpt__free(p);
            goto out;
        }
        rc = strlist_push_owned(l, p);
        if (rc < 0) goto out;
    }
    if (l->n == 0) rc = ckpt__error(CKPT_EFORMAT, "%s: weight_map names no file", index);
out:
    cJSON_Delete(root);
    ckpt__free(dir);
    ckpt__free(text);
    return rc;
}

static int ends_with(const char *s, const char *suffix)
{
    size_t a = strlen(s), b = strlen(suffix);
    return a >= b && strcmp(s + a - b, suffix) == 0;
}

static int list_dir(const char *dir, strlist_t *l)
{
    char *index = path_join(dir, INDEX_NAME);
    if (!index) return ckpt__error(CKPT_ENOMEM, "%s: no memory", dir);
    /* An index is authoritative: a folder may hold stale shards it no longer names. */
    if (is_regular(index)) {
        int rc = list_index(index, l);
        ckpt__free(index);
        return rc;
    }
    ckpt__free(index);
    DIR *d = opendir(dir);
    if (!d) return ckpt__error(CKPT_EIO, "%s: cannot list: %s", dir, strerror(errno));
    int rc = CKPT_OK;
    struct dirent *e;
    while ((e = readdir(d)) != NULL) {
        if (e->d_name[0] == '.' || !ends_with(e->d_name, ".safetensors")) continue;
        char *p = path_join(dir, e->d_name);
        if (p && !is_regular(p)) {
            ckpt__free(p);
            continue;
        }
        rc = strlist_push_owned(l, p);
        if (rc < 0) break;
    }
    closedir(d);
    if (rc == CKPT_OK && l->n == 0)
        rc = ckpt__error(CKPT_ENOENT, "%s: no *.safetensors files in this directory", dir);
    return rc;
}

int ckpt_st_list_files(const char *path, char ***paths_out, size_t *count_out)
{
    if (!path || !paths_out || !count_out)
        return ckpt__error(CKPT_EINVAL, "ckpt_st_list_files: NULL argument");
    strlist_t l = {0};
    int rc;
    struct stat st;
    if (stat(path, &st) < 0)
        return ckpt__error(errno == ENOENT ? CKPT_ENOENT : CKPT_EIO, "%s: %s", path,
                           strerror(errno));
    if (S_ISDIR(st.st_mode)) rc = list_dir(path, &l);
    else if (ends_with(path, ".json")) rc = list_index(path, &l);
    else rc = strlist_push_owned(&l, ckpt__strdup(path));
    if (rc < 0) {
        ckpt_st_paths_free(l.v, l.n);
        return rc;
    }
    strlist_finish(&l, paths_out, count_out);
    return CKPT_OK;
}

void ckpt_st_paths_free(char **paths, size_t count)
{
    if (!paths) return;
    for (size_t i = 0; i < count; i++) ckpt__free(paths[i]);
    ckpt__free(paths);
}
