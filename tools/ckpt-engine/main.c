/* ckpt-engine: the command-line entry point; dispatches to one subcommand. */
#include <stdio.h>
#include <string.h>

#include "ckpt/ckpt.h"
#include "commands.h"

static const struct {
    const char *name;
    int (*fn)(int, char **);
    const char *summary;
} commands[] = {
    {"inspect", cmd_inspect, "list the tensors of a safetensors file, directory or index"},
    {"serve", cmd_serve, "run an engine rank (all ranks of a deployment form one MPI job)"},
    {"bench", cmd_bench, "measure a part against its physical floor (bench load, ...)"},
    {"gen", cmd_gen, "generate a synthetic checkpoint with transformer-like shapes"},
    {"plan", cmd_plan, "predict an update's time per stage on a deployment (cost model)"},
    {"verify", cmd_verify, "compare two checkpoints tensor by tensor, byte for byte"},
    {"register", cmd_client, "client: register a checkpoint on a running server (--server URL)"},
    {"update", cmd_client, "client: start an update (--wait shows progress)"},
    {"status", cmd_client, "client: state of an update, or of the server"},
    {"unregister", cmd_client, "client: free a checkpoint on every rank"},
    {"list", cmd_client, "client: registered checkpoints"},
    {"metas", cmd_client, "client: the P2P metas of a checkpoint"},
};

static void usage(FILE *out)
{
    fprintf(out,
            "usage: ckpt-engine <command> [options]\n\n"
            "ckpt-engine updates the weights of running LLM inference engines in place.\n\n"
            "commands:\n");
    for (size_t i = 0; i < sizeof(commands) / sizeof(commands[0]); i++)
        fprintf(out, "  %-9s %s\n", commands[i].name, commands[i].summary);
    fprintf(out, "\n'ckpt-engine <command> --help' explains a command.\n"
                 "Environment: CKPT_LOG_LEVEL=error|warn|info|debug|trace (default warn).\n");
}

int main(int argc, char **argv)
{
    if (argc < 2) {
        usage(stderr);
        return 2;
    }
    if (strcmp(argv[1], "--help") == 0 || strcmp(argv[1], "-h") == 0 ||
        strcmp(argv[1], "help") == 0) {
        usage(stdout);
        return 0;
    }
    if (strcmp(argv[1], "--version") == 0) {
        printf("ckpt-engine %s\n", ckpt_version());
        return 0;
    }
    for (size_t i = 0; i < sizeof(commands) / sizeof(commands[0]); i++)
        if (strcmp(argv[1], commands[i].name) == 0) return commands[i].fn(argc - 1, argv + 1);
    fprintf(stderr, "ckpt-engine: unknown command '%s' (see ckpt-engine --help)\n", argv[1]);
    return 2;
}
