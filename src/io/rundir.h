/*
 * rundir.h — the run directory of `cmoe train` as a library: the settings every rank must
 * agree on, the directory checks and the lock, metrics.jsonl, checkpoint rotation and the
 * choice of the checkpoint to resume from. The CLI (src/cli/train.c) parses options and
 * runs the loop; what it writes and when it may write goes through here.
 *
 * A run directory holds
 *   config.json          the model configuration
 *   train.json           the settings (moe_train_settings_to_json), the dataset's identity
 *   metrics.jsonl        one JSON object per step, appended one whole line per write
 *   model.safetensors    the weights (at every evaluation and at the end)
 *   ckpt-STEP.safetensors  the full training state (io/checkpoint.h), the newest --keep
 *   .cmoe.lock           while a process trains in it: flock'd, holding its pid
 *
 *     moe_rundir rd;
 *     if (moe_rundir_create("runs/a", force, &rd)) ...      // checked, created, locked
 *     moe_rundir_start(&rd, config_json, train_json, -1);    // config.json, train.json, metrics
 *     ... moe_rundir_append_metrics(&rd, line); ...
 *     moe_rundir_close(&rd, failed);                         // a failed new run leaves nothing
 *
 * Files are written through core/durable.h.
 */
#ifndef CMOE_IO_RUNDIR_H
#define CMOE_IO_RUNDIR_H

#include <stdio.h>

#include "core/durable.h"
#include "io/checkpoint.h"
#include "io/data.h"
#include "model/model.h"

#define MOE_RUN_WEIGHTS "model.safetensors"
#define MOE_RUN_METRICS "metrics.jsonl"
#define MOE_RUN_LOCK ".cmoe.lock"

/* ---- settings (train_settings.c) ------------------------------------------------------ */

typedef struct {
    int64_t steps, batch, seq, accum, threads;
    int64_t groups;      /* G, the groups of each micro-batch (src/dist/dist.h); 1: the plain path */
    int64_t eval_every, eval_batches, save_every, keep;
    uint64_t seed;
    char backend[16];
    char dtype[8];       /* the backend's compute type, "fp32" or "bf16"; "": its own */
    moe_optim_config oc; /* lr, warmup, schedule (total_steps = steps), AdamW */
    char data[4096];     /* the data: an absolute path, a stream's path, or synth[:spec] */
    char model[4200];    /* where the model config came from (for the log) */
    char init_from[4096]; /* --init-from's weights, "" when none */
} moe_train_settings;

/* The settings a resumed run may change (the rest come from its checkpoint). */
enum {
    MOE_TS_STEPS = 1 << 0,
    MOE_TS_THREADS = 1 << 1,
    MOE_TS_BACKEND = 1 << 2,
    MOE_TS_EVAL_EVERY = 1 << 3,
    MOE_TS_EVAL_BATCHES = 1 << 4,
    MOE_TS_SAVE_EVERY = 1 << 5,
    MOE_TS_KEEP = 1 << 6,
    MOE_TS_DTYPE = 1 << 7,
};

/* The laptop defaults (2000 steps of 8 x 128, lr 3e-3, seed 1337, cpu, keep 3, ...). */
void moe_train_settings_default(moe_train_settings *t);
/* What every rank must agree on before the first step, checked against the model: batch,
 * seq (<= max_position_embeddings), accum, batch x seq, steps, the intervals, the backend
 * name, the optimizer. MOE_ERR_ARG names the setting. */
moe_status moe_train_settings_validate(const moe_train_settings *t, const moe_model_config *c);
/* train.json: the settings, the dataset (description and identity), resumed_from (NULL:
 * a new run) and cmoe_version; *out is malloc'd. */
moe_status moe_train_settings_to_json(const moe_train_settings *t, const moe_dataset *d, const char *resumed_from,
                                      char **out);

/* What a checkpoint's train settings say about the run. */
typedef struct {
    moe_train_settings t;
    moe_data_identity data_id;
    int have_data_id;     /* 0: a checkpoint from before identities; desc is all there is */
    char data_desc[512];  /* moe_dataset_describe of the data it trained on */
} moe_run_record;

/* Parses the train settings stored in a checkpoint (where names it in messages). */
moe_status moe_run_record_parse(const char *train_json, const char *where, moe_run_record *rec);
/* Settings for a resumed run: rec's, except those in `given` (MOE_TS_*), which come from
 * cli. total_steps follows steps. */
void moe_train_settings_resume(moe_train_settings *out, const moe_run_record *rec, const moe_train_settings *cli,
                               unsigned given);
/* MOE_OK when d is the data rec trained on (its identity, whatever the path's spelling);
 * else MOE_ERR_ARG saying what differs (path, size, checksum). */
moe_status moe_run_record_check_data(const moe_run_record *rec, const moe_dataset *d);

/* ---- the directory (rundir.c) ------------------------------------------------------------ */

typedef struct {
    char dir[4096];
    int lock_fd;         /* the flock'd .cmoe.lock, -1 when not held */
    int fresh;           /* a new run (not --resume): a failure removes what it wrote */
    int saved;           /* weights or a checkpoint were written: the run is kept */
    unsigned wrote;      /* which of config.json, train.json, metrics.jsonl this process wrote */
    moe_made_dirs made;  /* directories this process created */
    int metrics_fd;      /* metrics.jsonl, O_APPEND; -1 when not open */
} moe_rundir;

/* runs/YYYYmmdd-HHMMSS (-2, -3, ... when taken) into buf [n]. */
moe_status moe_rundir_default_name(char *buf, size_t n);
/* A new run in dir: refused when dir is '/', not a directory, holds a run, or holds
 * anything else (unless force); then created (mkdir -p, remembered), locked, and checked
 * again under the lock, so that of two processes started together one fails. With force
 * the old weights are removed, so they cannot pass for this run's. */
moe_status moe_rundir_create(const char *dir, int force, moe_rundir *r);
/* An existing run (--resume): locked. */
moe_status moe_rundir_open(const char *dir, moe_rundir *r);
/* The lock: MOE_ERR_IO naming the pid that holds it. A lock left by a dead process is no
 * obstacle (flock dies with its process). */
moe_status moe_rundir_lock(moe_rundir *r);
/* config.json and train.json (durable), and metrics.jsonl: a new run (resume_step < 0)
 * starts it empty; a resumed one cuts it back to the lines of steps <= resume_step, a
 * torn last line dropped, then appends. config_json NULL: config.json is left as it is. */
moe_status moe_rundir_start(moe_rundir *r, const char *config_json, const char *train_json, int64_t resume_step);
/* One record (a JSON object without newline) as one whole line, in one write. */
moe_status moe_rundir_append_metrics(moe_rundir *r, const char *record);
/* fsync of metrics.jsonl (before a checkpoint, so the log is never behind it on disk). */
moe_status moe_rundir_sync_metrics(moe_rundir *r);
/* Closes metrics and releases the lock. failed on a new run that saved nothing: removes
 * the files it wrote and the directories it created (the next attempt needs no --force);
 * *removed (may be NULL) is set when it did. */
void moe_rundir_close(moe_rundir *r, int failed, int *removed);

/* An output directory of `cmoe export` / `cmoe import` (which write the files in names,
 * NULL-terminated): refused when it is '/', holds a run, or holds one of those files,
 * unless force. */
moe_status moe_rundir_check_output(const char *dir, const char *const *names, int force);

/* Cuts metrics.jsonl at path back to the lines of steps <= step (durably); a torn or
 * unparsable line is dropped. *dropped_torn counts those. */
moe_status moe_metrics_cut(const char *path, int64_t step, int *dropped_torn);

/* ---- checkpoints (rundir_ckpt.c) ----------------------------------------------------------- */

/* dir/ckpt-STEP.safetensors */
moe_status moe_ckpt_path(char *buf, size_t n, const char *dir, int64_t step);
/* The checkpoint steps in dir, ascending; free *steps. */
moe_status moe_ckpt_list(const char *dir, int64_t **steps, int *n);
/* Removes the checkpoints after step `after` (>= 0; -1: none), then all but the newest
 * keep (0: keep all). *removed_after (may be NULL) counts the first kind. */
moe_status moe_ckpt_prune(const char *dir, int64_t after, int64_t keep, int *removed_after);

/* --resume PATH: the run directory and the checkpoint to continue from. */
typedef struct {
    char dir[4096];
    char path[4200];
    moe_ckpt *ck;   /* opened and checked (CRC, metadata, config = the run's config.json) */
    char *notes;    /* the newer checkpoints that failed and why, one line each; NULL if none */
} moe_resume_point;

/* PATH a directory: its newest checkpoint that opens and matches the run's config.json,
 * saying in notes which newer ones failed and why; MOE_ERR_FORMAT listing every failure
 * when none is valid. PATH a file: that checkpoint or its error (no fallback: the user
 * named it). */
moe_status moe_resume_find(const char *path, moe_resume_point *rp);
/* The run directory of --resume PATH (PATH, or the directory of the file PATH). */
moe_status moe_resume_dir(const char *path, char *dir, size_t n);
void moe_resume_point_free(moe_resume_point *rp);

/* ---- per-step statistics and records (rundir_metrics.c) ------------------------------------- */

typedef struct moe_step_stats moe_step_stats;

moe_status moe_step_stats_create(const moe_model_config *c, moe_step_stats **out);
void moe_step_stats_free(moe_step_stats *a);
int moe_step_stats_moe_layers(const moe_step_stats *a);
void moe_step_stats_zero(moe_step_stats *a);
/* Adds the last forward's per-layer statistics (one micro-batch). */
moe_status moe_step_stats_add(moe_step_stats *a, moe_model *m);
/* Mean over MoE layers of max/mean expert load (1 = balanced), and the dropped share. */
void moe_step_stats_summary(const moe_step_stats *a, double *max_over_mean, double *dropped_frac);

typedef struct {
    int64_t step, tokens, val_tokens;
    double loss, ce, aux, lr, grad_norm, step_time_s, elapsed_s, val_loss;
} moe_step_record;

/* One metrics.jsonl record (README lists the keys); *out malloc'd, no newline. micro: the
 * micro-batches the stats hold (their aux losses are averaged). */
moe_status moe_step_record_json(const moe_step_record *r, const moe_step_stats *a, int64_t micro, char **out);

/* Mean cross-entropy over the validation split (its first max_batches batches of B x S;
 * 0: all of it) in *loss (NaN when empty), over *n_tokens targets. in, tg, task: [B, S]. */
moe_status moe_val_loss(moe_model *m, const moe_dataset *d, int64_t B, int64_t S, int64_t max_batches, int32_t *in,
                        int32_t *tg, int32_t *task, double *loss, int64_t *n_tokens);

#endif
