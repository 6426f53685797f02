/*
 * sweep.h — `cmoe sweep SPEC.json --out DIR`: a list or grid of training runs, each an ordinary
 * run directory trained by this build's own `cmoe train` in a child process.
 *
 *   sweep_spec.c    the spec: reading, checking (messages name the key), resolving every run's
 *                   model config and settings, the equal-FLOPs steps of "budget"
 *   sweep.c         the command: DIR and its lock, the children, resume, progress
 *   sweep_record.c  sweep.jsonl: read back, appended; a run's record from its metrics
 *   sweep_report.c  DIR/report.html and DIR/plots/NAME.svg, the baseline comparison and the fit
 *
 * DIR holds spec.json (the spec of the last invocation), sweep.jsonl (one record per finished
 * or failed run, appended), configs/NAME.json (each run's model config), keys/NAME (the key
 * of the model and settings its run directory was started with: a checkpoint is resumed
 * only under the same key), logs/NAME.log (its `cmoe train` output), runs/NAME/ (its run
 * directory), report.html, plots/ and, with a fit, fit.json.
 */
#ifndef CMOE_CLI_SWEEP_H
#define CMOE_CLI_SWEEP_H

#include <stdint.h>

#include <jansson.h>

#include "io/rundir.h"
#include "model/info.h"
#include "model/model.h"

#define SWEEP_NAME_MAX 80

typedef struct {
    char name[SWEEP_NAME_MAX + 1];
    char where[200];          /* "runs[2] (name)" / "grid point 3" for messages */
    moe_model_config cfg;
    char *cfg_json;           /* the resolved model config, pretty JSON (malloc'd) */
    json_t *grid;             /* this run's grid values, "model.x"/"train.x" → value (object) */
    moe_train_settings t;     /* steps, batch, seq, accum, lr, warmup, seed, data, evals, saves */
    moe_model_info info;      /* at the run's seq */
    int64_t tokens_per_step, tokens;
    double flops_per_token;   /* forward + backward, info.flops_fwdbwd */
    double train_flops;       /* flops_per_token × tokens */
    int64_t experts;          /* num_local_experts of its MoE layers; 1 when it has none */
    int64_t base_params;      /* active non-embedding parameters without the routers: the
                               * dense model it is built on (Clark et al.'s N) */
    char key[9];              /* CRC-32 (hex) of everything that decides its training */
    /* state, from DIR */
    int done;                 /* sweep.jsonl records it finished, with this key */
    json_t *record;           /* that record (owned) */
} sweep_run;

typedef struct {
    char path[4096];
    char *text;               /* the spec as read */
    char description[512];
    double budget_flops;      /* 0: none */
    char baseline[SWEEP_NAME_MAX + 1]; /* analysis.baseline, "" when none */
    int fit_clark;            /* analysis.fit = "clark" */
    int load;                 /* analysis.load */
    int n;
    sweep_run *runs;
} sweep_spec;

/* Reads and resolves SPEC; MOE_ERR_ARG / MOE_ERR_FORMAT naming the file and the key. threads
 * >= 0 overrides every run's "threads" (it changes no result, so no key). */
moe_status sweep_spec_load(const char *path, int64_t threads, sweep_spec *s);
void sweep_spec_free(sweep_spec *s);
/* Steps that spend `flops` of training compute at flops_per_token (forward + backward) and
 * tokens_per_step: the nearest integer, at least 1 (0 when even one step is over twice the
 * budget, which the spec refuses). */
int64_t sweep_budget_steps(double flops, double flops_per_token, int64_t tokens_per_step);
/* The run named name, or NULL. */
sweep_run *sweep_find(sweep_spec *s, const char *name);

/* ---- records (sweep_record.c) ------------------------------------------------------------ */

/* dir/sub/name+ext into buf [n] (sub may be ""); "" when it does not fit (DIR is checked to
 * leave room at the start). */
void sweep_path(char *buf, size_t n, const char *dir, const char *sub, const char *name, const char *ext);
/* DIR/sweep.jsonl: each run's last record with the run's key sets run->record and run->done.
 * A line that does not parse (torn by a crash) is dropped with a warning, and with fix the
 * file is rewritten without it. No file: nothing done. */
moe_status sweep_read_records(sweep_spec *s, const char *dir, int fix);
/* Appends rec as one line, in one write, fsync'd. */
moe_status sweep_append_record(const char *dir, json_t *rec);
/* A record of r with status ("done", "failed"): name, key, run_dir, grid, config, train,
 * experts, parameters, FLOPs per token, tokens, training FLOPs. */
json_t *sweep_record_new(const sweep_run *r, const char *status);
/* The record of a finished run with its wall time and losses, from rundir's metrics.jsonl;
 * NULL (message set) when they do not show the run complete. */
json_t *sweep_record_done(const sweep_run *r, const char *rundir);

/* ---- the report (sweep_report.c) -------------------------------------------------------- */

/* DIR/report.html, DIR/plots/NAME.svg and, with a fit, DIR/fit.json, from the runs that are
 * done (their records and run directories). Prints the baseline comparison and the fit
 * to stdout. */
moe_status sweep_report(const sweep_spec *s, const char *dir);

#endif
