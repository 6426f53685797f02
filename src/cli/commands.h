/* The cmoe subcommands. Each returns the process exit code: 0 ok, 1 failure, 2 usage. */
#ifndef CMOE_CLI_COMMANDS_H
#define CMOE_CLI_COMMANDS_H

enum { EXIT_OK = 0, EXIT_FAIL = 1, EXIT_USAGE = 2 };

int cmd_oracle(int argc, char **argv);
void help_oracle(void);
int cmd_bench(int argc, char **argv);
void help_bench(void);
int cmd_bench_a2a(int argc, char **argv);
void help_bench_a2a(void);
int cmd_train(int argc, char **argv);
void help_train(void);
int cmd_sample(int argc, char **argv);
void help_sample(void);
int cmd_eval(int argc, char **argv);
void help_eval(void);
int cmd_info(int argc, char **argv);
void help_info(void);
int cmd_report(int argc, char **argv);
void help_report(void);
int cmd_export(int argc, char **argv);
void help_export(void);
int cmd_import(int argc, char **argv);
void help_import(void);
int cmd_check(int argc, char **argv);
void help_check(void);
int cmd_sweep(int argc, char **argv);
void help_sweep(void);

#endif
