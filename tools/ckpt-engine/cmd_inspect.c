/* ckpt-engine inspect: lists the tensors of a safetensors file, a directory of shards or a
 * model.safetensors.index.json, as a table or as one JSON document. Hidden helpers for
 * tests (--checksums, --dump-tensor, --dump-all) expose exactly the bytes the library
 * reads, so they can be compared with the reference implementation. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ckpt/ckpt.h"
#include "commands.h"

typedef struct {
    const ckpt_tensor_meta_t *meta;
    size_t file;  /* index into the opened files */
    size_t index; /* index inside its file */
    uint64_t checksum;
} entry_t;

typedef struct {
    const char *path;
    int json, checksums, dump_all;
    const char *dump_name, *out;
    char **paths;
    size_t num_files;
    ckpt_st_file_t **files;
    entry_t *entries;
    size_t num_entries;
} inspect_t;

static void usage(FILE *out)
{
    fprintf(out,
            "usage: ckpt-engine inspect PATH [--json] [--checksums]\n\n"
            "Lists the tensors of a checkpoint: PATH is one .safetensors file, a directory of\n"
            "them, or a model.safetensors.index.json (the index decides which shards count).\n"
            "Every header is validated first; a malformed file is an error naming the cause.\n\n"
            "  --json         print one JSON document (tensors, files, totals, dtypes)\n"
            "  --checksums    add each tensor's XXH3-64 (reads all data)\n"
            "  --dump-tensor NAME --out FILE   write one tensor's raw bytes to FILE\n"
            "  --dump-all --out FILE           write every tensor's bytes, in listing order\n"
            "  -h, --help     this text\n\n"
            "Exit status: 0 ok, 1 bad or unreadable checkpoint, 2 usage error.\n");
}

/* One line on stderr, always: tensor names in the text may hold control characters. */
static int fail(const char *what)
{
    fputs("ckpt-engine inspect: ", stderr);
    for (const unsigned char *p = (const unsigned char *)what; *p; p++)
        fputc(*p < 0x20 || *p == 0x7f ? '?' : *p, stderr);
    fputc('\n', stderr);
    return 1;
}

static void json_str(FILE *out, const char *s)
{
    fputc('"', out);
    for (const unsigned char *p = (const unsigned char *)s; *p; p++) {
        if (*p == '"' || *p == '\\') fprintf(out, "\\%c", *p);
        else if (*p < 0x20) fprintf(out, "\\u%04x", *p);
        else fputc(*p, out);
    }
    fputc('"', out);
}

static void shape_str(const ckpt_tensor_meta_t *m, char *buf, size_t cap)
{
    size_t n = (size_t)snprintf(buf, cap, "[");
    for (int i = 0; i < m->ndim && n < cap; i++)
        n += (size_t)snprintf(buf + n, cap - n, "%s%lld", i ? ", " : "", (long long)m->shape[i]);
    if (n < cap) snprintf(buf + n, cap - n, "]");
}

static const char *human(uint64_t b, char *buf, size_t cap)
{
    static const char *units[] = {"B", "KiB", "MiB", "GiB", "TiB", "PiB"};
    double v = (double)b;
    int u = 0;
    while (v >= 1024 && u < 5) {
        v /= 1024;
        u++;
    }
    if (u == 0) snprintf(buf, cap, "%llu B", (unsigned long long)b);
    else snprintf(buf, cap, "%.2f %s", v, units[u]);
    return buf;
}

static int cmp_entry_name(const void *a, const void *b)
{
    return strcmp((*(entry_t *const *)a)->meta->name, (*(entry_t *const *)b)->meta->name);
}

/* Opens every file and lists their tensors; a name in two shards is an error, since a
 * loader could not tell which copy is meant. */
static int load(inspect_t *s)
{
    char msg[1200];
    if (ckpt_st_list_files(s->path, &s->paths, &s->num_files) < 0) return fail(ckpt_last_error());
    s->files = calloc(s->num_files, sizeof(*s->files));
    if (!s->files) return fail("out of memory");
    size_t total = 0;
    for (size_t i = 0; i < s->num_files; i++) {
        if (ckpt_st_open(s->paths[i], &s->files[i]) < 0) return fail(ckpt_last_error());
        total += ckpt_st_num_tensors(s->files[i]);
    }
    s->entries = calloc(total ? total : 1, sizeof(*s->entries));
    entry_t **sorted = calloc(total ? total : 1, sizeof(*sorted));
    if (!s->entries || !sorted) {
        free(sorted);
        return fail("out of memory");
    }
    for (size_t i = 0; i < s->num_files; i++)
        for (size_t t = 0; t < ckpt_st_num_tensors(s->files[i]); t++) {
            entry_t *e = &s->entries[s->num_entries++];
            e->meta = ckpt_st_tensor(s->files[i], t);
            e->file = i;
            e->index = t;
            sorted[s->num_entries - 1] = e;
        }
    qsort(sorted, total, sizeof(*sorted), cmp_entry_name);
    for (size_t i = 1; i < total; i++) {
        if (strcmp(sorted[i - 1]->meta->name, sorted[i]->meta->name) != 0) continue;
        snprintf(msg, sizeof(msg), "%s: tensor '%s' appears in both %s and %s", s->path,
                 sorted[i]->meta->name, s->paths[sorted[i - 1]->file], s->paths[sorted[i]->file]);
        free(sorted);
        return fail(msg);
    }
    free(sorted);
    return 0;
}

static int read_entry(const inspect_t *s, const entry_t *e, void **buf_out)
{
    void *buf = malloc(e->meta->nbytes ? e->meta->nbytes : 1);
    if (!buf) return fail("out of memory");
    if (ckpt_st_read_tensor(s->files[e->file], e->index, buf, e->meta->nbytes) < 0) {
        free(buf);
        return fail(ckpt_last_error());
    }
    *buf_out = buf;
    return 0;
}

/* --dump-tensor / --dump-all: raw bytes to a file, nothing else on stdout. */
static int dump(inspect_t *s)
{
    FILE *out = fopen(s->out, "wb");
    if (!out) {
        char msg[600];
        snprintf(msg, sizeof(msg), "%s: cannot create", s->out);
        return fail(msg);
    }
    int rc = 0, found = 0;
    for (size_t i = 0; i < s->num_entries && rc == 0; i++) {
        const entry_t *e = &s->entries[i];
        if (!s->dump_all && strcmp(e->meta->name, s->dump_name) != 0) continue;
        found = 1;
        void *buf = NULL;
        rc = read_entry(s, e, &buf);
        if (rc == 0 && fwrite(buf, 1, e->meta->nbytes, out) != e->meta->nbytes)
            rc = fail("write to the dump file failed");
        free(buf);
    }
    if (fclose(out) != 0 && rc == 0) rc = fail("write to the dump file failed");
    if (rc == 0 && !found) {
        char msg[600];
        snprintf(msg, sizeof(msg), "%s: no tensor named '%s'", s->path, s->dump_name);
        rc = fail(msg);
    }
    return rc;
}

static void print_json(const inspect_t *s, const uint64_t *dcount, const uint64_t *dbytes,
                       uint64_t total)
{
    printf("{\"path\": ");
    json_str(stdout, s->path);
    printf(",\n \"files\": [");
    for (size_t i = 0; i < s->num_files; i++) {
        const ckpt_st_file_t *f = s->files[i];
        printf("%s\n  {\"path\": ", i ? "," : "");
        json_str(stdout, s->paths[i]);
        printf(", \"tensors\": %zu, \"file_size\": %llu, \"data_offset\": %llu, \"metadata\": {",
               ckpt_st_num_tensors(f), (unsigned long long)ckpt_st_file_size(f),
               (unsigned long long)ckpt_st_data_offset(f));
        for (size_t k = 0; k < ckpt_st_num_metadata(f); k++) {
            const char *key, *val;
            ckpt_st_metadata(f, k, &key, &val);
            printf("%s", k ? ", " : "");
            json_str(stdout, key);
            printf(": ");
            json_str(stdout, val);
        }
        printf("}}");
    }
    printf("],\n \"tensors\": [");
    for (size_t i = 0; i < s->num_entries; i++) {
        const entry_t *e = &s->entries[i];
        printf("%s\n  {\"name\": ", i ? "," : "");
        json_str(stdout, e->meta->name);
        printf(", \"dtype\": \"%s\", \"shape\": [", ckpt_dtype_name(e->meta->dtype));
        for (int d = 0; d < e->meta->ndim; d++)
            printf("%s%lld", d ? ", " : "", (long long)e->meta->shape[d]);
        printf("], \"nbytes\": %llu, \"file\": ", (unsigned long long)e->meta->nbytes);
        json_str(stdout, s->paths[e->file]);
        printf(", \"offset\": %llu", (unsigned long long)e->meta->offset);
        if (s->checksums) printf(", \"checksum\": \"%016llx\"", (unsigned long long)e->checksum);
        printf("}");
    }
    printf("],\n \"totals\": {\"tensors\": %zu, \"bytes\": %llu, \"files\": %zu},\n \"dtypes\": {",
           s->num_entries, (unsigned long long)total, s->num_files);
    int first = 1;
    for (int d = 0; d < CKPT_DTYPE_COUNT; d++) {
        if (!dcount[d]) continue;
        printf("%s\"%s\": {\"count\": %llu, \"bytes\": %llu}", first ? "" : ", ",
               ckpt_dtype_name(d), (unsigned long long)dcount[d], (unsigned long long)dbytes[d]);
        first = 0;
    }
    printf("}}\n");
}

static void print_table(const inspect_t *s, const uint64_t *dcount, const uint64_t *dbytes,
                        uint64_t total)
{
    int w = 4;
    for (size_t i = 0; i < s->num_entries; i++) {
        int len = (int)strlen(s->entries[i].meta->name);
        if (len > w) w = len;
    }
    if (w > 72) w = 72;
    printf("%-*s  %-7s  %-22s  %14s", w, "NAME", "DTYPE", "SHAPE", "BYTES");
    if (s->checksums) printf("  %-16s", "XXH3-64");
    if (s->num_files > 1) printf("  FILE");
    printf("\n");
    for (size_t i = 0; i < s->num_entries; i++) {
        const entry_t *e = &s->entries[i];
        char shape[200];
        shape_str(e->meta, shape, sizeof(shape));
        printf("%-*s  %-7s  %-22s  %14llu", w, e->meta->name, ckpt_dtype_name(e->meta->dtype),
               shape, (unsigned long long)e->meta->nbytes);
        if (s->checksums) printf("  %016llx", (unsigned long long)e->checksum);
        if (s->num_files > 1) {
            const char *slash = strrchr(s->paths[e->file], '/');
            printf("  %s", slash ? slash + 1 : s->paths[e->file]);
        }
        printf("\n");
    }
    char h[32];
    printf("\ntensors: %zu  bytes: %llu (%s)  files: %zu\n", s->num_entries,
           (unsigned long long)total, human(total, h, sizeof(h)), s->num_files);
    printf("\n%-8s  %8s  %14s\n", "DTYPE", "TENSORS", "BYTES");
    for (int d = 0; d < CKPT_DTYPE_COUNT; d++)
        if (dcount[d])
            printf("%-8s  %8llu  %14llu\n", ckpt_dtype_name(d), (unsigned long long)dcount[d],
                   (unsigned long long)dbytes[d]);
}

static int parse_args(inspect_t *s, int argc, char **argv)
{
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (strcmp(a, "-h") == 0 || strcmp(a, "--help") == 0) {
            usage(stdout);
            return 0;
        } else if (strcmp(a, "--json") == 0) {
            s->json = 1;
        } else if (strcmp(a, "--checksums") == 0) {
            s->checksums = 1;
        } else if (strcmp(a, "--dump-all") == 0) {
            s->dump_all = 1;
        } else if ((strcmp(a, "--dump-tensor") == 0 || strcmp(a, "--out") == 0) && i + 1 < argc) {
            *(a[2] == 'd' ? &s->dump_name : &s->out) = argv[++i];
        } else if (a[0] == '-' && a[1] != '\0') {
            fprintf(stderr, "ckpt-engine inspect: unknown option or missing value '%s'\n", a);
            usage(stderr);
            return 2;
        } else if (!s->path) {
            s->path = a;
        } else {
            fprintf(stderr, "ckpt-engine inspect: more than one PATH ('%s')\n", a);
            return 2;
        }
    }
    if (!s->path || ((s->dump_name || s->dump_all) && !s->out) ||
        (s->out && !s->dump_name && !s->dump_all)) {
        fprintf(stderr, "ckpt-engine inspect: %s\n",
                !s->path ? "PATH is required" : "--out goes with --dump-tensor or --dump-all");
        usage(stderr);
        return 2;
    }
    return -1; /* go on */
}

int cmd_inspect(int argc, char **argv)
{
    inspect_t s = {0};
    int rc = parse_args(&s, argc, argv);
    if (rc >= 0) return rc;
    rc = load(&s);
    if (rc == 0 && (s.dump_name || s.dump_all)) {
        rc = dump(&s);
    } else if (rc == 0) {
        uint64_t dcount[CKPT_DTYPE_COUNT] = {0}, dbytes[CKPT_DTYPE_COUNT] = {0}, total = 0;
        for (size_t i = 0; i < s.num_entries && rc == 0; i++) {
            entry_t *e = &s.entries[i];
            dcount[e->meta->dtype]++;
            dbytes[e->meta->dtype] += e->meta->nbytes;
            total += e->meta->nbytes;
            if (s.checksums) {
                void *buf = NULL;
                rc = read_entry(&s, e, &buf);
                if (rc == 0) e->checksum = ckpt_checksum(buf, e->meta->nbytes);
                free(buf);
            }
        }
        if (rc == 0 && s.json) print_json(&s, dcount, dbytes, total);
        else if (rc == 0) print_table(&s, dcount, dbytes, total);
    }
    for (size_t i = 0; s.files && i < s.num_files; i++) ckpt_st_close(s.files[i]);
    free(s.files);
    free(s.entries);
    ckpt_st_paths_free(s.paths, s.num_files);
    return rc;
}
