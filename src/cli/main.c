/*
 * cmoe — the command-line tool. Global options are parsed here with
 * getopt_long; everything after the command name belongs to the command.
 * Exit codes: 0 ok, 1 failure, 2 usage (see usage_exit_codes below).
 */
#include "config.h"

#include <getopt.h>
#include <stdio.h>
#include <string.h>

#include "cmoe.h"
#include "commands.h"

static int cmd_help(int argc, char **argv);
static int cmd_version(int argc, char **argv);
static void help_help(void);
static void help_version(void);

typedef struct {
    const char *name;
    int (*run)(int argc, char **argv); /* argv[0] is the command name */
    void (*help)(void);                /* prints to stdout */
    const char *summary;
} command;

static const command commands[] = {
    {"oracle", cmd_oracle, help_oracle,
     "run the reference MoE layer (double) on given tensors; write outputs, plan, gradients"},
    {"bench", cmd_bench, help_bench, "time the MoE layer (forward + backward) against the sgemm ceiling"},
    {"check", cmd_check, help_check, "every op of a backend (cpu, cuda) against the oracle, on random inputs"},
    {"train", cmd_train, help_train, "train an MoE language model (default: the laptop model on Brown)"},
    {"sweep", cmd_sweep, help_sweep, "train a list or grid of runs (resumable), compare them on one page"},
    {"sample", cmd_sample, help_sample, "generate text from a trained run"},
    {"eval", cmd_eval, help_eval, "validation loss, perplexity, bits per byte of a trained run"},
    {"info", cmd_info, help_info, "parameters, active parameters, FLOPs per token and memory of a model config"},
    {"report", cmd_report, help_report, "write RUN_DIR/report.html: loss, learning rate, speed, expert load"},
    {"export", cmd_export, help_export, "write a run's model as a Hugging Face checkpoint (Mixtral, Qwen2-MoE)"},
    {"import", cmd_import, help_import, "make a run directory from a Hugging Face Mixtral / Qwen2-MoE checkpoint"},
    {"version", cmd_version, help_version, "print the version and what this build has"},
    {"help", cmd_help, help_help, "show help for cmoe or for one command"},
};
enum { N_COMMANDS = sizeof commands / sizeof commands[0] };

static const command *find_command(const char *name)
{
    for (int i = 0; i < N_COMMANDS; i++)
        if (strcmp(commands[i].name, name) == 0)
            return &commands[i];
    return NULL;
}

static void usage_exit_codes(FILE *f)
{
    fprintf(f, "Exit status:\n"
               "  0  success\n"
               "  1  failure: invalid configuration or input file, I/O error; the message\n"
               "     on stderr names the field or file\n"
               "  2  usage error: unknown command or option, missing or malformed argument\n");
}

static void usage(FILE *f)
{
    fprintf(f, "usage: cmoe [--version] [--help] COMMAND [ARGS...]\n\n"
               "cmoe trains Mixture-of-Experts models in C; its reference layer (the\n"
               "oracle, in double precision) checks other MoE implementations.\n\n"
               "Commands:\n");
    for (int i = 0; i < N_COMMANDS; i++)
        fprintf(f, "  %-8s %s\n", commands[i].name, commands[i].summary);
    fprintf(f, "\nOptions:\n"
               "  -h, --help     show this help and exit\n"
               "  -V, --version  print the version and what this build has, then exit\n\n"
               "Run 'cmoe help COMMAND' or 'cmoe COMMAND --help' for a command's options.\n\n");
    usage_exit_codes(f);
}

static int usage_error(const char *fmt, const char *arg)
{
    fprintf(stderr, "cmoe: ");
    fprintf(stderr, fmt, arg);
    fprintf(stderr, "\nrun 'cmoe help' for the commands and options\n");
    return EXIT_USAGE;
}

static int print_version(void)
{
    printf("cmoe %s\n%s\n", moe_version(), moe_build_info());
    char devices[4096];
    /* Not built: moe_build_info already said so. No device is not a failure:
     * a CUDA build on a machine without a GPU still runs every CPU path. */
    if (moe_cuda_device_info(devices, sizeof devices) != MOE_ERR_UNSUPPORTED)
        printf("%s\n", devices);
    return EXIT_OK;
}

static void help_version(void)
{
    printf("usage: cmoe version   (same as cmoe --version)\n\n"
           "Prints the version of cmoe and what this build has: the BLAS library and its\n"
           "version, OpenMP and its maximum thread count (OMP_NUM_THREADS), the MPI\n"
           "library, and whether CUDA was built, with the devices it finds.\n");
}

static int cmd_version(int argc, char **argv)
{
    if (argc > 1)
        return usage_error("version takes no arguments, got '%s'", argv[1]);
    return print_version();
}

static void help_help(void)
{
    printf("usage: cmoe help [COMMAND]\n\n"
           "Without COMMAND, lists the commands, global options and exit codes;\n"
           "with COMMAND, shows that command's usage and options.\n");
}

static int cmd_help(int argc, char **argv)
{
    if (argc < 2) {
        usage(stdout);
        return EXIT_OK;
    }
    if (argc > 2)
        return usage_error("help takes one COMMAND, got also '%s'", argv[2]);
    const command *c = find_command(argv[1]);
    if (!c)
        return usage_error("no command '%s'", argv[1]);
    c->help();
    return EXIT_OK;
}

/* `cmoe COMMAND --help` anywhere before "--" shows the command's help. */
static int wants_help(int argc, char **argv)
{
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--") == 0)
            return 0;
        if (strcmp(argv[i], "--help") == 0 || strcmp(argv[i], "-h") == 0)
            return 1;
    }
    return 0;
}

int main(int argc, char **argv)
{
    static const struct option options[] = {
        {"help", no_argument, NULL, 'h'},
        {"version", no_argument, NULL, 'V'},
        {NULL, 0, NULL, 0},
    };
    opterr = 0; /* our own messages, each pointing to 'cmoe help' */
    int opt;
    /* '+': stop at the command name, its options are its own. */
    while ((opt = getopt_long(argc, argv, "+hV", options, NULL)) != -1) {
        switch (opt) {
        case 'h':
            usage(stdout);
            return EXIT_OK;
        case 'V':
            return print_version();
        default: {
            /* glibc sets optopt for an unknown short option, 0 for a long one. */
            char shortopt[3] = {'-', (char)optopt, '\0'};
            return usage_error("unknown option '%s'", optopt ? shortopt : argv[optind - 1]);
        }
        }
    }
    if (optind >= argc) {
        fprintf(stderr, "cmoe: no command given\n\n");
        usage(stderr);
        return EXIT_USAGE;
    }
    const char *name = argv[optind];
    const command *c = find_command(name);
    if (!c)
        return usage_error("unknown command '%s'", name);
    int cargc = argc - optind;
    char **cargv = argv + optind;
    if (c->run != cmd_help && wants_help(cargc, cargv)) {
        c->help();
        return EXIT_OK;
    }
    optind = 0; /* glibc: the command's own getopt_long starts afresh */
    return c->run(cargc, cargv);
}
