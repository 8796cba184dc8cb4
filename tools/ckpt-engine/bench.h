/* `ckpt-engine bench <part>`: each part's benchmark lives in its own bench_<part>.c. */
#ifndef CKPT_TOOLS_BENCH_H
#define CKPT_TOOLS_BENCH_H

/* Same conventions as the subcommands: argv[0] is the part name; 0/1/2 exit status. */
int bench_load(int argc, char **argv);
int bench_ucx_get(int argc, char **argv);
int bench_p2p(int argc, char **argv);

/* Median of n > 0 values (v is left as it is): every benchmark reports medians. */
double bench_median(const double *v, int n);

/* One `ucx_perftest -t ucp_get` run on localhost over the current UCX_TLS: messages of
 * `chunk` bytes, `size` bytes in all. Its bandwidth in GB/s, or < 0 when it gave none. */
#include <stdint.h>
double bench_ucx_perftest(uint64_t chunk, uint64_t size);
/* The same while `busy` processes copy memory without pause (64 MiB memcpy loops), as a
 * host whose inference workers reload weights is busy. */
double bench_ucx_perftest_busy(uint64_t chunk, uint64_t size, int busy);

#endif
