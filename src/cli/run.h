/*
 * run.h — the run directory shared by `cmoe train`, `cmoe sample` and `cmoe eval`.
 *
 * A run directory holds
 *   config.json        the model configuration (HF keys; `cmoe train --config` reads it back)
 *   train.json         the training settings (data, steps, batch, seq, lr, seed, ...)
 *   metrics.jsonl      one JSON object per training step
 *   model.safetensors  the parameters (F32, cmoe names), written atomically at every
 *                      evaluation and at the end; __metadata__ holds "config" (the model
 *                      JSON), "train" (the settings), "step" and "cmoe_version", so the
 *                      file alone is enough to sample from or evaluate the model.
 *   ckpt-STEP.safetensors  with --save-every (and on Ctrl-C): the full training state
 *                      (src/io/checkpoint.h), what `cmoe train --resume DIR` continues from.
 */
#ifndef CMOE_CLI_RUN_H
#define CMOE_CLI_RUN_H

#include <stdint.h>

#include "backend/backend.h"
#include "io/checkpoint.h"
#include "model/model.h"

#define CLI_RUN_WEIGHTS "model.safetensors"

/* Decimal integer in [lo, hi] (no sign tricks, no hex, no trailing junk): 1 ok, 0 not. */
int cli_parse_i64(const char *s, int64_t lo, int64_t hi, int64_t *out);
/* Finite decimal number: 1 ok, 0 not. */
int cli_parse_double(const char *s, double *out);

/* A backend by name (moe_backend_create); dtype: its compute type ("fp32", "bf16"; NULL: the
 * backend's own). */
moe_status cli_backend_create(const char *name, int threads, const char *dtype, moe_backend **out);
/* Whether this build registers a backend of that name (moe_backend_list() has them all). */
int cli_backend_known(const char *name);

/* Seconds as "42s", "3m07s", "2h05m" ("?" when negative or absurd). */
void cli_fmt_duration(char *buf, size_t n, double s);

/* dir/name into buf [n]; MOE_ERR_ARG when it does not fit. */
moe_status cli_path(char *buf, size_t n, const char *dir, const char *name);

/*
 * Writes DIR/model.safetensors atomically: every parameter as F32, and metadata config
 * (the model JSON), train (train_json, may be NULL), step.
 */
moe_status cli_run_save(const char *dir, moe_model *m, const char *train_json, int64_t step);
/* The same with every parameter's whole tensor from get (m, v NULL): a model split over
 * ranks (src/dist/dist_io.h). */
moe_status cli_run_save_with(const char *dir, const moe_model *m, moe_ckpt_get_fn get, void *ctx,
                             const char *train_json, int64_t step);

/* A run directory read back: open it (file + settings), then build the model. */
typedef struct {
    char path[4096];         /* DIR/model.safetensors */
    moe_model_config cfg;
    int64_t step;            /* optimizer steps done when the weights were written */
    char *data;              /* the training data (train settings), NULL when absent */
    int64_t seq, batch;      /* the training seq and batch, 0 when absent */
    moe_backend *backend;    /* after cli_run_build */
    moe_model *model;
    void *file;              /* moe_st_file, until cli_run_build has copied the weights */
} cli_run;

/* Reads DIR/model.safetensors and its metadata; the message names what is missing. */
moe_status cli_run_open(const char *dir, cli_run *r);
/* Builds the model on the named backend for max_batch x max_seq tokens and sets every
 * parameter from the file (each must be there with its shape, and finite). */
moe_status cli_run_build(cli_run *r, const char *backend, int threads, int64_t max_batch, int64_t max_seq);
/* Sets every parameter of model (built from r->cfg by the caller) from the file opened
 * by cli_run_open, which it then releases. NaN or Inf in a parameter is refused (the
 * message names it and the first bad element). */
moe_status cli_run_load_into(cli_run *r, moe_model *model);
void cli_run_free(cli_run *r);

#endif
