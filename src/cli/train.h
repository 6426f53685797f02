/*
 * train.h — cmoe train's two halves: the command line (train_options.c) and the run
 * (train.c: setup, the loop, saving).
 */
#ifndef CMOE_CLI_TRAIN_H
#define CMOE_CLI_TRAIN_H

#include "io/rundir.h"
#include "train_dist.h"

/* The command line: the settings (io/rundir.h) and what only this process cares about. */
typedef struct {
    moe_train_settings t;
    const char *config, *preset, *data, *out, *resume, *init_from;
    int64_t log_every, warmup;
    int have_seq, have_warmup, have_groups, force;
    moe_dist_options dist; /* --ep, --a2a, --ranks-per-node, --a2a-chunks, --zero */
    unsigned given;    /* MOE_TS_*: the settings a resumed run takes from the command line */
    const char *fixed; /* the first option given that a resumed run cannot change, or NULL */
} train_opts;

/* Runs the training the options describe; the exit status (EXIT_*). */
int cli_train_run(const train_opts *o);
/* "cmoe train: MESSAGE" and the hint to the help on stderr; EXIT_USAGE. */
int cli_train_usage(const char *fmt, ...);

#endif
