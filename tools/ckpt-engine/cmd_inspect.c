/* Placeholder until the subcommand lands. */
#include <stdio.h>
#include "commands.h"
int cmd_inspect(int argc, char **argv)
{
    (void)argc; (void)argv;
    fprintf(stderr, "ckpt-engine inspect: not built yet\n");
    return 1;
}
