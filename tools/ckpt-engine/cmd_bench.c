/* ckpt-engine bench: dispatches to one benchmark; each measures a part of ckpt-engine
 * against its physical floor in the same run (so noisy machines still give a fair ratio). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "bench.h"
#include "commands.h"

static const struct {
    const char *name;
    int (*fn)(int, char **);
    const char *summary;
} benches[] = {
    {"load", bench_load, "registration from files vs a raw sequential read of the same bytes"},
    {"ucx-get", bench_ucx_get, "UCX one-sided pull (P2P) vs ucx_perftest -t ucp_get"},
    {"p2p", bench_p2p, "a whole P2P update (pull phase vs ucx_perftest) beside broadcast updates"},
};

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

double bench_median(const double *v, int n)
{
    double *s = malloc((size_t)n * sizeof(*s));
    if (!s || n <= 0) {
        free(s);
        return 0;
    }
    memcpy(s, v, (size_t)n * sizeof(*s));
    qsort(s, (size_t)n, sizeof(*s), cmp_double);
    double m = n % 2 ? s[n / 2] : 0.5 * (s[n / 2 - 1] + s[n / 2]);
    free(s);
    return m;
}

static void usage(FILE *out)
{
    fprintf(out, "usage: ckpt-engine bench <part> [options]\n\nparts:\n");
    for (size_t i = 0; i < sizeof(benches) / sizeof(benches[0]); i++)
        fprintf(out, "  %-6s %s\n", benches[i].name, benches[i].summary);
    fprintf(out, "\n'ckpt-engine bench <part> --help' explains a part.\n");
}

int cmd_bench(int argc, char **argv)
{
    if (argc < 2) {
        usage(stderr);
        return 2;
    }
    if (strcmp(argv[1], "--help") == 0 || strcmp(argv[1], "-h") == 0) {
        usage(stdout);
        return 0;
    }
    for (size_t i = 0; i < sizeof(benches) / sizeof(benches[0]); i++)
        if (strcmp(argv[1], benches[i].name) == 0) return benches[i].fn(argc - 1, argv + 1);
    fprintf(stderr, "ckpt-engine bench: unknown part '%s' (see ckpt-engine bench --help)\n", argv[1]);
    return 2;
}
