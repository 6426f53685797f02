/* The cmoe subcommands. Each returns the process exit code: 0 ok, 1 failure, 2 usage. */
#ifndef CMOE_CLI_COMMANDS_H
#define CMOE_CLI_COMMANDS_H

enum { EXIT_OK = 0, EXIT_FAIL = 1, EXIT_USAGE = 2 };

int cmd_oracle(int argc, char **argv);
void help_oracle(void);
int cmd_bench(int argc, char **argv);
void help_bench(void);

#endif
