/* `ckpt-engine bench <part>`: each part's benchmark lives in its own bench_<part>.c. */
#ifndef CKPT_TOOLS_BENCH_H
#define CKPT_TOOLS_BENCH_H

/* Same conventions as the subcommands: argv[0] is the part name; 0/1/2 exit status. */
int bench_load(int argc, char **argv);
int bench_ucx_get(int argc, char **argv);

#endif
