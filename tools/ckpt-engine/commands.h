/* Subcommands of the ckpt-engine tool; each lives in its own cmd_<name>.c. */
#ifndef CKPT_TOOLS_COMMANDS_H
#define CKPT_TOOLS_COMMANDS_H

/* Each takes the arguments after its name (argv[0] is the subcommand name) and returns the
 * process exit status: 0 success, 1 failure, 2 usage error. */
int cmd_inspect(int argc, char **argv);
int cmd_bench(int argc, char **argv);
int cmd_serve(int argc, char **argv);
int cmd_gen(int argc, char **argv);
int cmd_verify(int argc, char **argv);
int cmd_client(int argc, char **argv);
int cmd_plan(int argc, char **argv);

#endif
