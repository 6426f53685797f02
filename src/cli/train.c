/*
 * cmoe train — trains the MoE language model (src/model/model.h) on a dataset (src/io/data.h)
 * and writes a run directory (src/cli/run.h): config.json, train.json, metrics.jsonl
 * (one JSON object per step), model.safetensors (the weights, at every evaluation
 * and at the end) and, with --save-every, checkpoints ckpt-STEP.safetensors of the
 * full training state (src/io/checkpoint.h) that --resume continues bitwise.
 */
#define _POSIX_C_SOURCE 200809L
#include "config.h"

#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <limits.h>
#include <math.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <jansson.h>

#include <dirent.h>

#include "io/checkpoint.h"
#include "cmoe.h"
#include "commands.h"
#include "io/data.h"
#include "model/model.h"
#include "presets.h"
#include "run.h"

#define DEFAULT_DATA "datasets/brown/brown.txt.gz"

/* Training settings; the model's own come from the config. */
typedef struct {
    const char *config, *preset, *data, *backend, *dtype, *out, *resume, *init_from;
    int64_t steps, batch, seq, accum, warmup, threads;
    int64_t eval_every, eval_batches, log_every, save_every, keep;
    double lr;
    uint64_t seed;
    int have_seq, have_lr, have_warmup, force;
    int have_steps, have_backend, have_dtype, have_threads, have_eval_every, have_eval_batches, have_save_every, have_keep;
    const char *fixed; /* the first option given that a resumed run cannot change, or NULL */
} train_opts;

static void defaults(train_opts *o)
{
    memset(o, 0, sizeof *o);
    o->backend = "cpu";
    /* the laptop default: 2M tokens, about three minutes on 2 cores (BENCHMARKS.md) */
    o->steps = 2000;
    o->batch = 8;
    o->seq = 128;
    o->accum = 1;
    o->seed = 1337;
    o->eval_every = 250;
    o->eval_batches = 10;
    o->log_every = 25;
    o->lr = 3e-3;
    o->keep = 3;
}

void help_train(void)
{
    train_opts d;
    defaults(&d);
    printf("usage: cmoe train [OPTIONS]\n\n"
           "Trains a Mixture-of-Experts language model. With no options: the default laptop\n"
           "model (byte-level, vocabulary 256) on the Brown Corpus (%s).\n"
           "Writes a run directory: config.json (the model), train.json (these settings),\n"
           "metrics.jsonl (one JSON object per step) and model.safetensors (the weights,\n"
           "written at every evaluation and at the end). Then: cmoe sample DIR, cmoe eval DIR.\n\n"
           "Model:\n"
           "  --config FILE       model configuration (JSON, Hugging Face keys)\n"
           "  --preset NAME       configs/NAME.json, looked up in ./configs, $CMOE_CONFIGS and\n"
           "                      the installed presets, else built in (laptop, tiny); default:\n"
           "                      laptop (cmoe info lists them)\n"
           "Data:\n"
           "  --data PATH         text (plain or gzip; bytes are tokens), an llm.c shard (.bin),\n"
           "                      a directory of shards, or synth[:tasks=4,vocab=32,seed=1,val=64]\n"
           "                      (default: %s, found in the current directory,\n"
           "                      then under $CMOE_DATA)\n"
           "Training (default):\n"
           "  --steps N           optimizer steps (%" PRId64 ")\n"
           "  --batch B           sequences per micro-batch (%" PRId64 ")\n"
           "  --seq S             tokens per sequence, <= max_position_embeddings (%" PRId64 ")\n"
           "  --accum N           micro-batches accumulated per step (%" PRId64 ")\n"
           "  --lr LR             peak learning rate, AdamW, cosine decay to 0.1·LR (%g)\n"
           "  --warmup N          linear warmup steps (min(100, steps/10))\n"
           "  --seed S            initialisation and batch order (%" PRIu64 ")\n"
           "  --backend NAME      cpu (fp32, OpenBLAS), ref (double, the oracle; slow) or cuda\n"
           "                      (%s)\n"
           "  --dtype TYPE        compute type: fp32, or bf16 on cuda (bf16 weights and\n"
           "                      activations; router, master weights and AdamW state fp32;\n"
           "                      checkpoints fp32 either way) (the backend's own: fp32)\n"
           "  --threads N         worker threads (OpenMP's default, OMP_NUM_THREADS)\n"
           "Output:\n"
           "  --out DIR           run directory (runs/YYYYmmdd-HHMMSS); must not hold a run\n"
           "  --force             write into DIR even when it holds a run (overwrites it)\n"
           "  --eval-every N      validation loss and weights every N steps, 0: at the end\n"
           "                      only (%" PRId64 ")\n"
           "  --eval-batches N    validation batches per evaluation, 0: the whole split (%" PRId64 ")\n"
           "  --log-every N       a plain progress line every N steps when stdout is not a\n"
           "                      terminal (%" PRId64 "); a terminal gets a live line\n"
           "Checkpoints:\n"
           "  --save-every N      write DIR/ckpt-STEP.safetensors every N steps and at the end:\n"
           "                      parameters, AdamW moments, step, seed, config and settings (F32\n"
           "                      on cpu, F64 on ref: exactly the values held); 0: only when\n"
           "                      interrupted (default)\n"
           "  --keep N            keep the newest N checkpoints, 0: all (%" PRId64 ")\n"
           "  --resume PATH       continue the run in directory PATH from its newest checkpoint\n"
           "                      (or from the checkpoint file PATH): every later step is bitwise\n"
           "                      the step of the uninterrupted run. Settings come from the\n"
           "                      checkpoint; only --steps (a new cosine horizon), --threads,\n"
           "                      --backend, --dtype, --eval-every, --eval-batches, --log-every,\n"
           "                      --save-every and --keep may be given. metrics.jsonl is cut back\n"
           "                      to the checkpoint's step and continues; later checkpoints are\n"
           "                      removed. A checkpoint that fails validation changes nothing.\n"
           "  --init-from DIR     start from the weights of run DIR (its model.safetensors, e.g. a\n"
           "                      model from 'cmoe import'), with a fresh optimizer: fine-tuning.\n"
           "                      The model config is DIR's; --config/--preset are refused.\n"
           "  --help              this text\n\n"
           "metrics.jsonl: step, loss (ce + aux), ce, aux, lr, grad_norm, tokens_per_s,\n"
           "elapsed_s, load_max_over_mean, dropped_frac, val_loss (evaluation steps), and\n"
           "\"layers\": [{\"layer\", \"experts\", \"load\": [kept per expert], \"dropped\", \"aux\": {lb,\n"
           "importance, load, z, mi, total}}] for each MoE layer.\n\n"
           "Ctrl-C stops after the current step, saves the weights and a checkpoint, and exits\n"
           "with 130; --resume DIR continues.\n"
           "Exit status: 0 ok, 1 failure (bad data or config; the reason on stderr), 2 usage.\n",
           DEFAULT_DATA, DEFAULT_DATA, d.steps, d.batch, d.seq, d.accum, d.lr, d.seed, d.backend, d.eval_every,
           d.eval_batches, d.log_every, d.keep);
}

static int usage(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    fputs("cmoe train: ", stderr);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fputs("\nTry 'cmoe help train'.\n", stderr);
    return EXIT_USAGE;
}

static int failed(void)
{
    fprintf(stderr, "cmoe train: %s\n", moe_last_error());
    return EXIT_FAIL;
}

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static int file_exists(const char *path)
{
    struct stat sb;
    return stat(path, &sb) == 0 && S_ISREG(sb.st_mode);
}

/* ---- where the model and the data come from --------------------------------- */

/* The default dataset: ./datasets/brown, then $CMOE_DATA (a file, or a directory that
 * holds brown/brown.txt.gz like the source tree's datasets/). */
static moe_status find_default_data(char *out, size_t n)
{
    const char *env = getenv("CMOE_DATA");
    char env_brown[4096] = "";
    if (env && *env)
        snprintf(env_brown, sizeof env_brown, "%s/brown/brown.txt.gz", env);
    const char *cand[3] = {DEFAULT_DATA, env && *env ? env : "", env_brown};
    for (int i = 0; i < 3; i++)
        if (*cand[i] && strlen(cand[i]) < n && file_exists(cand[i])) {
            memcpy(out, cand[i], strlen(cand[i]) + 1);
            return MOE_OK;
        }
#ifdef CMOE_PKGDATADIR
    snprintf(out, n, "%s/datasets/brown/brown.txt.gz", CMOE_PKGDATADIR);
    if (file_exists(out))
        return MOE_OK;
#endif
    return moe_error(MOE_ERR_IO,
                     "no --data given and the default dataset %s is not here%s; run from the cmoe source "
                     "tree, set CMOE_DATA to its datasets/ directory, or pass --data PATH (text, .gz, an llm.c "
                     "shard, a directory of shards, or synth)",
                     DEFAULT_DATA, env && *env ? " nor under $CMOE_DATA" : " (and CMOE_DATA is not set)");
}

/* ---- statistics of one step, accumulated over its micro-batches ------------------ */

typedef struct {
    int64_t layer, E;
    int64_t *counts; /* [E] kept assignments, summed over micro-batches */
    int64_t kept, dropped;
    moe_aux_losses aux; /* summed over micro-batches */
} layer_acc;

typedef struct {
    int n;
    layer_acc *l;
    int64_t *scratch; /* [max E] */
} step_acc;

static moe_status acc_create(const moe_model_config *c, step_acc *a)
{
    memset(a, 0, sizeof *a);
    int64_t maxE = 1;
    a->l = calloc((size_t)c->num_hidden_layers + 1, sizeof *a->l);
    if (!a->l)
        return moe_error(MOE_ERR_NOMEM, "out of memory");
    for (int64_t l = 0; l < c->num_hidden_layers; l++) {
        int64_t E = moe_model_layer_experts(c, l);
        if (E <= 0)
            continue;
        layer_acc *x = &a->l[a->n++];
        x->layer = l;
        x->E = E;
        if (!(x->counts = calloc((size_t)E, sizeof *x->counts)))
            return moe_error(MOE_ERR_NOMEM, "out of memory");
        if (E > maxE)
            maxE = E;
    }
    a->scratch = calloc((size_t)maxE, sizeof *a->scratch);
    return a->scratch ? MOE_OK : moe_error(MOE_ERR_NOMEM, "out of memory");
}

static void acc_free(step_acc *a)
{
    for (int i = 0; a->l && i < a->n; i++)
        free(a->l[i].counts);
    free(a->l);
    free(a->scratch);
}

static void acc_zero(step_acc *a)
{
    for (int i = 0; i < a->n; i++) {
        layer_acc *x = &a->l[i];
        memset(x->counts, 0, (size_t)x->E * sizeof *x->counts);
        x->kept = x->dropped = 0;
        memset(&x->aux, 0, sizeof x->aux);
    }
}

/* The step's statistics, summed over its micro-batches on the backend (one read). */
static moe_status acc_add(step_acc *a, moe_model *m)
{
    for (int i = 0; i < a->n; i++) {
        layer_acc *x = &a->l[i];
        moe_model_layer_stats st;
        moe_status s = moe_model_get_layer_stats(m, x->layer, MOE_SPAN_STEP, &st, a->scratch);
        if (s)
            return s;
        for (int64_t e = 0; e < x->E; e++)
            x->counts[e] += a->scratch[e];
        x->kept += st.assignments;
        x->dropped += st.dropped;
        x->aux.lb += st.aux.lb;
        x->aux.importance += st.aux.importance;
        x->aux.load += st.aux.load;
        x->aux.z += st.aux.z;
        x->aux.mi += st.aux.mi;
        x->aux.total += st.aux.total;
    }
    return MOE_OK;
}

/* Mean over MoE layers of max/mean expert load (1 = balanced), and the dropped share. */
static void acc_summary(const step_acc *a, double *max_over_mean, double *dropped_frac)
{
    double r = 0, kept = 0, dropped = 0;
    for (int i = 0; i < a->n; i++) {
        const layer_acc *x = &a->l[i];
        int64_t mx = 0, sum = 0;
        for (int64_t e = 0; e < x->E; e++) {
            sum += x->counts[e];
            mx = x->counts[e] > mx ? x->counts[e] : mx;
        }
        r += sum > 0 ? (double)mx * (double)x->E / (double)sum : 0;
        kept += (double)x->kept;
        dropped += (double)x->dropped;
    }
    *max_over_mean = a->n ? r / a->n : 0;
    *dropped_frac = kept + dropped > 0 ? dropped / (kept + dropped) : 0;
}

static json_t *acc_layers_json(const step_acc *a, int64_t micro)
{
    json_t *arr = json_array();
    for (int i = 0; i < a->n; i++) {
        const layer_acc *x = &a->l[i];
        json_t *load = json_array(), *aux = json_object(), *o = json_object();
        for (int64_t e = 0; e < x->E; e++)
            json_array_append_new(load, json_integer(x->counts[e]));
        json_object_set_new(aux, "lb", json_real(x->aux.lb / micro));
        json_object_set_new(aux, "importance", json_real(x->aux.importance / micro));
        json_object_set_new(aux, "load", json_real(x->aux.load / micro));
        json_object_set_new(aux, "z", json_real(x->aux.z / micro));
        json_object_set_new(aux, "mi", json_real(x->aux.mi / micro));
        json_object_set_new(aux, "total", json_real(x->aux.total / micro));
        json_object_set_new(o, "layer", json_integer(x->layer));
        json_object_set_new(o, "experts", json_integer(x->E));
        json_object_set_new(o, "load", load);
        double tot = (double)(x->kept + x->dropped);
        json_object_set_new(o, "dropped", json_real(tot > 0 ? (double)x->dropped / tot : 0));
        json_object_set_new(o, "aux", aux);
        json_array_append_new(arr, o);
    }
    return arr;
}

/* ---- validation ------------------------------------------------------------------ */

/* Mean cross-entropy over the validation split (the first max_batches batches; 0: all). */
static moe_status validate(moe_model *m, const moe_dataset *d, int64_t B, int64_t S, int64_t max_batches,
                           int32_t *in, int32_t *tg, int32_t *task, double *loss, int64_t *n_tokens)
{
    moe_val_iter it;
    moe_val_iter_init(&it);
    double sum = 0;
    int64_t total = 0;
    for (int64_t b = 0; max_batches <= 0 || b < max_batches; b++) {
        int64_t n;
        moe_status s = moe_dataset_val_next(d, &it, B, S, in, tg, task, &n);
        if (s)
            return s;
        if (n == 0)
            break;
        moe_model_losses L;
        if ((s = moe_model_forward(m, in, tg, task, B, S, MOE_KEY_STEP(0), 0, &L)))
            return s;
        sum += L.ce * (double)L.n_targets;
        total += L.n_targets;
    }
    *loss = total ? sum / (double)total : NAN;
    *n_tokens = total;
    return MOE_OK;
}

/* ---- progress ----------------------------------------------------------------------- */

static void fmt_duration(char *buf, size_t n, double s)
{
    if (!(s >= 0) || s > 1e8)
        snprintf(buf, n, "?");
    else if (s < 60)
        snprintf(buf, n, "%ds", (int)s);
    else if (s < 3600)
        snprintf(buf, n, "%dm%02ds", (int)s / 60, (int)s % 60);
    else
        snprintf(buf, n, "%dh%02dm", (int)s / 3600, ((int)s / 60) % 60);
}

typedef struct {
    int64_t step, steps;
    double loss, val_loss, tok_s, eta, load, dropped;
    int moe;
} progress;

static void progress_text(char *buf, size_t n, const progress *p)
{
    char eta[32], val[32] = "";
    fmt_duration(eta, sizeof eta, p->eta);
    if (!isnan(p->val_loss))
        snprintf(val, sizeof val, "  val %.4f", p->val_loss);
    int k = snprintf(buf, n, "step %*" PRId64 "/%" PRId64 "  loss %.4f%s  %.0f tok/s  ETA %s",
                     (int)snprintf(NULL, 0, "%" PRId64, p->steps), p->step, p->steps, p->loss, val, p->tok_s, eta);
    if (p->moe && k > 0 && (size_t)k < n)
        snprintf(buf + k, n - (size_t)k, "  load max/mean %.2f  dropped %.1f%%", p->load, 100 * p->dropped);
}

/* ---- the run ---------------------------------------------------------------------- */

static volatile sig_atomic_t interrupted;

static void on_sigint(int sig)
{
    (void)sig;
    interrupted = 1;
}

typedef struct {
    train_opts o;
    moe_model_config cfg;
    char cfg_src[4200];
    char data[4096];
    char dir[4096];
    moe_dataset *d;
    moe_backend *b;
    moe_model *m;
    moe_optim *opt;
    moe_optim_config oc;
    int32_t *in, *tg, *task;
    FILE *metrics;
    char *train_json;
    step_acc acc;
    moe_ckpt *ck;          /* --resume: the checkpoint, validated */
    char ck_path[4200];
    char *ck_dataset;      /* --resume: the data the run trained on (moe_dataset_describe) */
    int64_t start_step;    /* steps already done (0, or the checkpoint's) */
    double elapsed0;       /* seconds the run had taken before this process */
    cli_run init;          /* --init-from: the weights to start from */
} train_run;

static void run_free(train_run *r)
{
    if (r->metrics)
        fclose(r->metrics);
    moe_optim_free(r->opt);
    moe_model_free(r->m);
    moe_backend_free(r->b);
    moe_dataset_free(r->d);
    free(r->in);
    free(r->tg);
    free(r->task);
    free(r->train_json);
    acc_free(&r->acc);
    moe_ckpt_free(r->ck);
    free(r->ck_dataset);
    cli_run_free(&r->init);
}

/* runs/YYYYmmdd-HHMMSS, with -2, -3, ... when that exists already */
static moe_status default_out(char *buf, size_t n)
{
    time_t t = time(NULL);
    struct tm tm;
    char stamp[32];
    localtime_r(&t, &tm);
    strftime(stamp, sizeof stamp, "%Y%m%d-%H%M%S", &tm);
    struct stat sb;
    for (int i = 1; i < 1000; i++) {
        if (i == 1)
            snprintf(buf, n, "runs/%s", stamp);
        else
            snprintf(buf, n, "runs/%s-%d", stamp, i);
        if (stat(buf, &sb) != 0)
            return MOE_OK;
    }
    return moe_error(MOE_ERR_IO, "cannot find a free name runs/%s-N; pass --out DIR", stamp);
}

static moe_status write_text(const char *dir, const char *name, const char *text)
{
    char path[4096], tmp[4200];
    moe_status s = cli_path(path, sizeof path, dir, name);
    if (s)
        return s;
    snprintf(tmp, sizeof tmp, "%s.tmp", path);
    FILE *f = fopen(tmp, "w");
    if (!f)
        return moe_error(MOE_ERR_IO, "cannot write '%s': %s", tmp, strerror(errno));
    int bad = fputs(text, f) < 0 || fputc('\n', f) == EOF;
    bad |= fclose(f) != 0;
    if (bad || rename(tmp, path) != 0) {
        remove(tmp);
        return moe_error(MOE_ERR_IO, "cannot write '%s': %s", path, strerror(errno));
    }
    return MOE_OK;
}

static moe_status make_train_json(train_run *r)
{
    const train_opts *o = &r->o;
    json_t *j = json_object();
    json_object_set_new(j, "data", json_string(r->data));
    json_object_set_new(j, "model", json_string(r->cfg_src));
    json_object_set_new(j, "steps", json_integer(o->steps));
    json_object_set_new(j, "batch", json_integer(o->batch));
    json_object_set_new(j, "seq", json_integer(o->seq));
    json_object_set_new(j, "accum", json_integer(o->accum));
    json_object_set_new(j, "lr", json_real(r->oc.lr));
    json_object_set_new(j, "min_lr_ratio", json_real(r->oc.min_lr_ratio));
    json_object_set_new(j, "warmup_steps", json_integer(r->oc.warmup_steps));
    json_object_set_new(j, "beta1", json_real(r->oc.beta1));
    json_object_set_new(j, "beta2", json_real(r->oc.beta2));
    json_object_set_new(j, "weight_decay", json_real(r->oc.weight_decay));
    json_object_set_new(j, "eps", json_real(r->oc.eps));
    json_object_set_new(j, "grad_clip", json_real(r->oc.grad_clip));
    json_object_set_new(j, "seed", json_integer((json_int_t)o->seed));
    json_object_set_new(j, "backend", json_string(o->backend));
    /* the compute type the backend ran in (f64 ref, f32 cpu, f32 or bf16 cuda) */
    json_object_set_new(j, "dtype", json_string(moe_dtype_name(r->b->float_type)));
    json_object_set_new(j, "threads", json_integer(o->threads));
    json_object_set_new(j, "eval_every", json_integer(o->eval_every));
    json_object_set_new(j, "eval_batches", json_integer(o->eval_batches));
    json_object_set_new(j, "save_every", json_integer(o->save_every));
    json_object_set_new(j, "keep", json_integer(o->keep));
    if (o->init_from)
        json_object_set_new(j, "init_from", json_string(r->init.path));
    if (r->ck)
        json_object_set_new(j, "resumed_from", json_string(r->ck_path));
    json_object_set_new(j, "dataset", json_string(moe_dataset_describe(r->d)));
    json_object_set_new(j, "cmoe_version", json_string(moe_version()));
    r->train_json = json_dumps(j, JSON_INDENT(2) | JSON_PRESERVE_ORDER);
    json_decref(j);
    return r->train_json ? MOE_OK : moe_error(MOE_ERR_NOMEM, "out of memory");
}

/* The run directory: created, refused when it holds a run (unless --force). */
static moe_status prepare_dir(train_run *r)
{
    moe_status s;
    if (r->o.out)
        snprintf(r->dir, sizeof r->dir, "%s", r->o.out);
    else if ((s = default_out(r->dir, sizeof r->dir)))
        return s;
    char path[4096];
    if ((s = cli_path(path, sizeof path, r->dir, "metrics.jsonl")))
        return s;
    if (!r->o.force && (file_exists(path) || (cli_path(path, sizeof path, r->dir, CLI_RUN_WEIGHTS) == MOE_OK &&
                                              file_exists(path))))
        return moe_error(MOE_ERR_IO, "'%s' already holds a run; pass another --out DIR, or --force to overwrite it",
                         r->dir);
    if ((s = cli_mkdirs(r->dir)))
        return s;
    /* --force: the old weights must not pass for this run's before its first save */
    if ((s = cli_path(path, sizeof path, r->dir, CLI_RUN_WEIGHTS)))
        return s;
    if (remove(path) != 0 && errno != ENOENT)
        return moe_error(MOE_ERR_IO, "cannot remove the old '%s': %s", path, strerror(errno));
    char *cfg_json;
    if ((s = moe_model_config_to_json(&r->cfg, 1, &cfg_json)))
        return s;
    s = write_text(r->dir, "config.json", cfg_json);
    free(cfg_json);
    if (s || (s = make_train_json(r)) || (s = write_text(r->dir, "train.json", r->train_json)))
        return s;
    if ((s = cli_path(path, sizeof path, r->dir, "metrics.jsonl")))
        return s;
    if (!(r->metrics = fopen(path, "w")))
        return moe_error(MOE_ERR_IO, "cannot write '%s': %s", path, strerror(errno));
    return MOE_OK;
}

/* ---- checkpoints and --resume ------------------------------------------------------ */

#define CKPT_PREFIX "ckpt-"
#define CKPT_SUFFIX ".safetensors"

/* STEP of a name "ckpt-STEP.safetensors", or -1 */
static int64_t ckpt_step_of(const char *name)
{
    const size_t np = strlen(CKPT_PREFIX), ns = strlen(CKPT_SUFFIX), n = strlen(name);
    if (n <= np + ns || strncmp(name, CKPT_PREFIX, np) || strcmp(name + n - ns, CKPT_SUFFIX))
        return -1;
    char num[32];
    if (n - np - ns >= sizeof num)
        return -1;
    memcpy(num, name + np, n - np - ns);
    num[n - np - ns] = '\0';
    int64_t v;
    return cli_parse_i64(num, 0, INT64_MAX, &v) && num[0] != '-' ? v : -1;
}

/* The checkpoint steps in dir, ascending; *n of them (free the result). */
static moe_status list_ckpts(const char *dir, int64_t **steps, int *n)
{
    *steps = NULL;
    *n = 0;
    DIR *d = opendir(dir);
    if (!d)
        return moe_error(MOE_ERR_IO, "cannot read directory '%s': %s", dir, strerror(errno));
    int cap = 0;
    struct dirent *e;
    moe_status s = MOE_OK;
    while ((e = readdir(d))) {
        int64_t st = ckpt_step_of(e->d_name);
        if (st < 0)
            continue;
        if (*n == cap) {
            int64_t *ns = realloc(*steps, (size_t)(cap = cap ? 2 * cap : 16) * sizeof *ns);
            if (!ns) {
                s = moe_error(MOE_ERR_NOMEM, "out of memory");
                break;
            }
            *steps = ns;
        }
        (*steps)[(*n)++] = st;
    }
    closedir(d);
    for (int i = 1; i < *n; i++) /* insertion sort: a handful of files */
        for (int j = i; j > 0 && (*steps)[j - 1] > (*steps)[j]; j--) {
            int64_t t = (*steps)[j];
            (*steps)[j] = (*steps)[j - 1];
            (*steps)[j - 1] = t;
        }
    return s;
}

static void ckpt_name(char *buf, size_t n, const char *dir, int64_t step)
{
    snprintf(buf, n, "%s/" CKPT_PREFIX "%" PRId64 CKPT_SUFFIX, dir, step);
}

/* Removes checkpoints: those after step `after` (>= 0), then all but the newest keep. */
static moe_status prune_ckpts(const char *dir, int64_t after, int64_t keep, int verbose)
{
    int64_t *steps;
    int n;
    moe_status s = list_ckpts(dir, &steps, &n);
    if (s)
        return s;
    char path[4200];
    int kept = 0;
    for (int i = n - 1; i >= 0; i--) {
        const int later = after >= 0 && steps[i] > after;
        if (!later && (keep <= 0 || kept < keep)) {
            kept++;
            continue;
        }
        ckpt_name(path, sizeof path, dir, steps[i]);
        if (remove(path) != 0 && errno != ENOENT) {
            s = moe_error(MOE_ERR_IO, "cannot remove '%s': %s", path, strerror(errno));
            break;
        }
        if (verbose && later)
            printf("cmoe train: removed %s (after the resume point)\n", path);
    }
    free(steps);
    return s;
}

static moe_status save_ckpt(train_run *r, int64_t done, double elapsed)
{
    char path[4200], state[128];
    ckpt_name(path, sizeof path, r->dir, done);
    snprintf(state, sizeof state, "{\"elapsed_s\": %.17g}", elapsed);
    moe_ckpt_state st = {done, moe_optim_steps(r->opt), r->o.seed, r->train_json, state};
    moe_status s = moe_ckpt_save(path, r->m, r->opt, &st);
    return s ? s : prune_ckpts(r->dir, -1, r->o.keep, 0);
}

/* --resume PATH: the run directory and the checkpoint to continue from */
static moe_status find_resume(train_run *r)
{
    const char *p = r->o.resume;
    struct stat sb;
    if (stat(p, &sb) != 0)
        return moe_error(MOE_ERR_IO, "--resume '%s': %s", p, strerror(errno));
    if (S_ISREG(sb.st_mode)) {
        snprintf(r->ck_path, sizeof r->ck_path, "%s", p);
        const char *slash = strrchr(p, '/');
        if (slash)
            snprintf(r->dir, sizeof r->dir, "%.*s", (int)(slash - p), p);
        else
            snprintf(r->dir, sizeof r->dir, ".");
        if (!r->dir[0])
            snprintf(r->dir, sizeof r->dir, "/");
        return MOE_OK;
    }
    snprintf(r->dir, sizeof r->dir, "%s", p);
    int64_t *steps;
    int n;
    moe_status s = list_ckpts(p, &steps, &n);
    if (s)
        return s;
    if (n)
        ckpt_name(r->ck_path, sizeof r->ck_path, p, steps[n - 1]);
    free(steps);
    if (!n)
        return moe_error(MOE_ERR_IO, "--resume '%s': no checkpoint (ckpt-STEP.safetensors) in it; 'cmoe train "
                         "--save-every N' writes them (and Ctrl-C does)", p);
    return MOE_OK;
}

static moe_status need(json_t *o, const char *key, int type, const char *path, json_t **out)
{
    json_t *v = json_object_get(o, key);
    int ok = v && (type == JSON_REAL ? json_is_number(v) : json_typeof(v) == (json_type)type);
    if (!ok)
        return moe_error(MOE_ERR_FORMAT, "%s: the checkpoint's train settings lack '%s' (or it has the wrong type)",
                         path, key);
    *out = v;
    return MOE_OK;
}

/* The settings of the run, from the checkpoint's 'train' metadata; the options that may
 * change on resume keep their command-line values when given. */
static moe_status resume_settings(train_run *r)
{
    const char *path = r->ck_path;
    if (!r->ck->train_json)
        return moe_error(MOE_ERR_FORMAT, "%s: no 'train' settings in the metadata: cannot resume", path);
    json_t *t = json_loads(r->ck->train_json, 0, NULL), *v = NULL;
    train_opts *o = &r->o;
    moe_status s = MOE_OK;
    static char data[4096], model[4200], backend[16];
    const char *dtype = NULL;
#define INT(key, field) \
    if (!s && !(s = need(t, key, JSON_INTEGER, path, &v))) field = json_integer_value(v);
#define NUM(key, field) \
    if (!s && !(s = need(t, key, JSON_REAL, path, &v))) field = json_number_value(v);
    if (!(s = need(t, "data", JSON_STRING, path, &v)))
        snprintf(data, sizeof data, "%s", json_string_value(v));
    if (!s && !(s = need(t, "dataset", JSON_STRING, path, &v)) && !(r->ck_dataset = strdup(json_string_value(v))))
        s = moe_error(MOE_ERR_NOMEM, "out of memory");
    if (!s && (v = json_object_get(t, "model")) && json_is_string(v))
        snprintf(model, sizeof model, "%s", json_string_value(v));
    int64_t steps = 0, seed = 0, threads = 0, ee = 0, eb = 0, se = 0, keep = 0;
    INT("steps", steps) INT("batch", o->batch) INT("seq", o->seq) INT("accum", o->accum)
    INT("seed", seed) INT("threads", threads) INT("eval_every", ee) INT("eval_batches", eb)
    INT("warmup_steps", r->oc.warmup_steps)
    NUM("lr", r->oc.lr) NUM("min_lr_ratio", r->oc.min_lr_ratio) NUM("beta1", r->oc.beta1)
    NUM("beta2", r->oc.beta2) NUM("weight_decay", r->oc.weight_decay) NUM("grad_clip", r->oc.grad_clip)
    if (!s && (v = json_object_get(t, "eps")) && json_is_number(v))
        r->oc.eps = json_number_value(v);
    if (!s && (v = json_object_get(t, "save_every")) && json_is_integer(v))
        se = json_integer_value(v);
    if (!s && (v = json_object_get(t, "keep")) && json_is_integer(v))
        keep = json_integer_value(v);
    if (!s && !(s = need(t, "backend", JSON_STRING, path, &v)))
        snprintf(backend, sizeof backend, "%s", json_string_value(v));
    if (!s && (v = json_object_get(t, "dtype")) && json_is_string(v) && !strcmp(json_string_value(v), "bf16"))
        dtype = "bf16"; /* else the backend's own type (runs before --dtype have no key) */
#undef INT
#undef NUM
    json_decref(t);
    if (s)
        return s;
    if (o->batch < 1 || o->seq < 1 || o->accum < 1 || steps < 1 || seed < 0)
        return moe_error(MOE_ERR_FORMAT, "%s: the checkpoint's train settings are out of range", path);
    if ((uint64_t)seed != r->ck->seed)
        return moe_error(MOE_ERR_FORMAT, "%s: metadata seed %" PRIu64 " differs from the train settings' seed %lld",
                         path, r->ck->seed, (long long)seed);
    o->data = data;
    snprintf(r->cfg_src, sizeof r->cfg_src, "%s", model);
    o->seed = (uint64_t)seed;
    if (!o->have_steps)
        o->steps = steps;
    if (!o->have_threads)
        o->threads = threads;
    if (!o->have_eval_every)
        o->eval_every = ee;
    if (!o->have_eval_batches)
        o->eval_batches = eb;
    if (!o->have_save_every)
        o->save_every = se;
    if (!o->have_keep)
        o->keep = keep;
    if (!o->have_dtype) /* another backend computes in its own type unless told */
        o->dtype = o->have_backend && strcmp(o->backend, backend) ? NULL : dtype;
    if (!o->have_backend)
        o->backend = backend;
    else if (strcmp(o->backend, backend))
        printf("cmoe train: note: the run trained on backend %s, continuing on %s (not bitwise the same)\n", backend,
               o->backend);
    r->oc.total_steps = o->steps;
    if (r->ck->step > o->steps)
        return moe_error(MOE_ERR_ARG, "the checkpoint is at step %lld, beyond --steps %lld", (long long)r->ck->step,
                         (long long)o->steps);
    if (o->have_steps && o->steps != steps)
        printf("cmoe train: note: --steps %lld changes the cosine schedule's horizon (was %lld)\n",
               (long long)o->steps, (long long)steps);
    if (r->ck->state_json && (t = json_loads(r->ck->state_json, 0, NULL))) {
        if ((v = json_object_get(t, "elapsed_s")) && json_is_number(v))
            r->elapsed0 = json_number_value(v);
        json_decref(t);
    }
    r->start_step = r->ck->step;
    return moe_optim_config_validate(&r->oc);
}

/* The checkpoint and the run directory agree: same model as config.json. */
static moe_status resume_open(train_run *r)
{
    moe_status s;
    if ((s = find_resume(r)) || (s = moe_ckpt_open(r->ck_path, &r->ck)))
        return s;
    char path[4200];
    if ((s = cli_path(path, sizeof path, r->dir, "config.json")))
        return s;
    moe_model_config dc;
    if ((s = moe_model_config_load(path, &dc))) {
        char why[1024]; /* moe_error writes into the buffer moe_last_error returns */
        snprintf(why, sizeof why, "%s", moe_last_error());
        return moe_error(s, "--resume: the run's %s: %s", path, why);
    }
    char *a = NULL, *b = NULL;
    if (!(s = moe_model_config_to_json(&dc, 0, &a)) && !(s = moe_model_config_to_json(&r->ck->cfg, 0, &b)) &&
        strcmp(a, b))
        s = moe_error(MOE_ERR_FORMAT, "%s: the checkpoint's config does not match the run's %s (another run's "
                      "checkpoint?)", r->ck_path, path);
    free(a);
    free(b);
    if (s)
        return s;
    r->cfg = r->ck->cfg;
    moe_optim_config_default(&r->oc);
    return resume_settings(r);
}

/* metrics.jsonl cut back to the lines of steps <= step (atomically), then reopened for append. */
static moe_status cut_metrics(train_run *r, int64_t step)
{
    char path[4200], tmp[4300];
    moe_status s = cli_path(path, sizeof path, r->dir, "metrics.jsonl");
    if (s)
        return s;
    snprintf(tmp, sizeof tmp, "%s.tmp", path);
    FILE *in = fopen(path, "r"), *out = fopen(tmp, "w");
    if (!out) {
        if (in)
            fclose(in);
        return moe_error(MOE_ERR_IO, "cannot write '%s': %s", tmp, strerror(errno));
    }
    char *line = NULL;
    size_t cap = 0;
    ssize_t n;
    int bad = 0;
    while (in && (n = getline(&line, &cap, in)) > 0) {
        json_t *j = line[n - 1] == '\n' ? json_loads(line, 0, NULL) : NULL; /* a torn last line goes */
        json_t *st = j ? json_object_get(j, "step") : NULL;
        if (st && json_is_integer(st) && json_integer_value(st) <= step)
            bad |= fputs(line, out) == EOF;
        json_decref(j);
    }
    free(line);
    if (in)
        fclose(in);
    bad |= fflush(out) != 0 || fsync(fileno(out)) != 0;
    bad |= fclose(out) != 0;
    if (bad || rename(tmp, path) != 0) {
        remove(tmp);
        return moe_error(MOE_ERR_IO, "cannot rewrite '%s': %s", path, strerror(errno));
    }
    if (!(r->metrics = fopen(path, "a")))
        return moe_error(MOE_ERR_IO, "cannot append to '%s': %s", path, strerror(errno));
    return MOE_OK;
}

/* After everything was validated and restored: the run directory continues. */
static moe_status resume_dir(train_run *r)
{
    moe_status s;
    if ((s = prune_ckpts(r->dir, r->start_step, 0, 1)) || (s = make_train_json(r)) ||
        (s = write_text(r->dir, "train.json", r->train_json)))
        return s;
    return cut_metrics(r, r->start_step);
}

static moe_status setup(train_run *r)
{
    const train_opts *o = &r->o;
    moe_status s;
    if (o->data)
        snprintf(r->data, sizeof r->data, "%s", o->data);
    else if ((s = find_default_data(r->data, sizeof r->data)))
        return s;
    moe_data_options dopt;
    moe_data_options_default(&dopt);
    dopt.vocab = r->cfg.vocab_size <= 65536 ? r->cfg.vocab_size : 65536;
    if ((s = moe_dataset_open(r->data, &dopt, &r->d)))
        return s;
    if (r->ck && strcmp(moe_dataset_describe(r->d), r->ck_dataset))
        return moe_error(MOE_ERR_ARG, "--resume: the data changed: the run trained on %s, '%s' is now %s", r->ck_dataset,
                         r->data, moe_dataset_describe(r->d));
    if (moe_dataset_vocab(r->d) > r->cfg.vocab_size)
        return moe_error(MOE_ERR_ARG, "data '%s' has vocabulary %lld but the model's vocab_size is %lld", r->data,
                         (long long)moe_dataset_vocab(r->d), (long long)r->cfg.vocab_size);
    /* a relative path would not survive `cmoe eval` from another directory */
    if (strncmp(r->data, "synth", 5) != 0) {
        char *abs = realpath(r->data, NULL);
        if (abs) {
            snprintf(r->data, sizeof r->data, "%s", abs);
            free(abs);
        }
    }
    const size_t n = (size_t)(o->batch * o->seq);
    r->in = malloc(n * sizeof *r->in);
    r->tg = malloc(n * sizeof *r->tg);
    r->task = malloc(n * sizeof *r->task);
    if (!r->in || !r->tg || !r->task)
        return moe_error(MOE_ERR_NOMEM, "out of memory for a batch of %lld x %lld", (long long)o->batch,
                         (long long)o->seq);
    /* fails here, not at step 1, when the data is shorter than one row */
    if ((s = moe_dataset_batch(r->d, o->seed, 0, 0, o->batch, o->seq, r->in, r->tg, r->task)))
        return s;
    if (!r->ck) {
        moe_optim_config_default(&r->oc);
        r->oc.lr = o->lr;
        r->oc.total_steps = o->steps;
        r->oc.warmup_steps = o->have_warmup ? o->warmup : (o->steps / 10 < 100 ? o->steps / 10 : 100);
    }
    if ((s = moe_optim_config_validate(&r->oc)))
        return s;
    if ((s = cli_backend_create(o->backend, (int)o->threads, o->dtype, &r->b)) ||
        (s = moe_model_create(&r->cfg, r->b, NULL, o->batch, o->seq, &r->m)) ||
        (s = moe_optim_create(r->m, &r->oc, &r->opt)) || (s = acc_create(&r->cfg, &r->acc)))
        return s;
    /* the state: a checkpoint (validated as a whole before anything is set or written),
     * the weights of another run, or a fresh initialisation */
    if (r->ck)
        s = moe_ckpt_restore(r->ck, r->m, r->opt);
    else if (o->init_from)
        s = cli_run_load_into(&r->init, r->m);
    else
        s = moe_model_init(r->m, o->seed);
    if (s)
        return s;
    return r->ck ? resume_dir(r) : prepare_dir(r);
}

static moe_status write_metrics(train_run *r, json_t *j)
{
    if (json_dumpf(j, r->metrics, JSON_COMPACT | JSON_PRESERVE_ORDER) != 0 || fputc('\n', r->metrics) == EOF ||
        fflush(r->metrics) != 0)
        return moe_error(MOE_ERR_IO, "cannot write %s/metrics.jsonl: %s", r->dir, strerror(errno));
    return MOE_OK;
}

static moe_status train_loop(train_run *r, int *stopped)
{
    const train_opts *o = &r->o;
    const int tty = isatty(STDOUT_FILENO);
    const int64_t tokens_per_step = o->batch * o->seq * o->accum;
    double train_time = 0, t_start = now(), last_draw = 0, val_loss = NAN, last_loss = NAN;
    double rate = 0, win_time = 0;
    int64_t win_step = r->start_step;
    moe_status s;
    printf("cmoe train: %s\n  model: %s, %lld parameters (%lld layers, hidden %lld, %lld MoE layers)\n"
           "  data: %s\n  %lld steps x %lld tokens (batch %lld x seq %lld x accum %lld), lr %g, warmup %lld,"
           " backend %s, seed %" PRIu64 "\n",
           r->dir, r->cfg_src, (long long)moe_model_numel(r->m), (long long)r->cfg.num_hidden_layers,
           (long long)r->cfg.hidden_size, (long long)r->acc.n, moe_dataset_describe(r->d), (long long)o->steps,
           (long long)tokens_per_step, (long long)o->batch, (long long)o->seq, (long long)o->accum, r->oc.lr,
           (long long)r->oc.warmup_steps, o->backend, o->seed);
    if (r->ck)
        printf("  resumed from %s at step %lld\n", r->ck_path, (long long)r->start_step);
    fflush(stdout);
    for (int64_t step = r->start_step; step < o->steps; step++) {
        double t0 = now();
        moe_model_zero_grad(r->m);
        acc_zero(&r->acc);
        /* nothing in the step waits for the backend until the optimizer's result is read */
        for (int64_t micro = 0; micro < o->accum; micro++) {
            const moe_key key = {(uint64_t)step, (uint32_t)micro, 0};
            if ((s = moe_dataset_batch(r->d, o->seed, step, micro, o->batch, o->seq, r->in, r->tg, r->task)) ||
                (s = moe_model_forward(r->m, r->in, r->tg, r->task, o->batch, o->seq, key, 1, NULL)) ||
                (s = moe_model_backward(r->m)))
                return s;
        }
        moe_optim_result res;
        moe_model_stats ms;
        if ((s = moe_optim_step(r->opt, 1.0 / (double)o->accum, &res)) ||
            (s = moe_model_get_stats(r->m, MOE_SPAN_STEP, &ms)) || (s = acc_add(&r->acc, r->m)))
            return s;
        const double ce = ms.ce / (double)o->accum, aux = ms.aux_total / (double)o->accum, total = ce + aux;
        if (!isfinite(total))
            return moe_error(MOE_ERR_ARG, "the loss is %g at step %lld: training diverged; try a lower --lr (now %g)",
                             total, (long long)step + 1, r->oc.lr);
        last_loss = total;
        double dt = now() - t0;
        train_time += dt;
        const int64_t done = step + 1;
        /* read the flag once: a Ctrl-C landing later in this step must not stop the run
         * after a step whose checkpoint was not written */
        const int stop = interrupted;
        const int last = done == o->steps || stop;
        const int eval = last || (o->eval_every > 0 && done % o->eval_every == 0);
        int64_t val_n = 0;
        if (eval) {
            if ((s = validate(r->m, r->d, o->batch, o->seq, o->eval_batches, r->in, r->tg, r->task, &val_loss,
                              &val_n)) ||
                (s = cli_run_save(r->dir, r->m, r->train_json, done)))
                return s;
        }
        /* a checkpoint every save_every steps, at the end when saving at all, and when
         * interrupted (so that Ctrl-C can be resumed) */
        if ((o->save_every > 0 && (done % o->save_every == 0 || done == o->steps)) || stop) {
            if ((s = save_ckpt(r, done, r->elapsed0 + now() - t_start)))
                return s;
        }
        double lmm, dfrac;
        acc_summary(&r->acc, &lmm, &dfrac);
        json_t *j = json_object();
        json_object_set_new(j, "step", json_integer(done));
        json_object_set_new(j, "loss", json_real(total));
        json_object_set_new(j, "ce", json_real(ce));
        json_object_set_new(j, "aux", json_real(aux));
        json_object_set_new(j, "lr", json_real(res.lr));
        json_object_set_new(j, "grad_norm", json_real(res.grad_norm));
        json_object_set_new(j, "tokens", json_integer(tokens_per_step));
        json_object_set_new(j, "tokens_per_s", json_real((double)tokens_per_step / dt));
        json_object_set_new(j, "step_time_s", json_real(dt));
        json_object_set_new(j, "elapsed_s", json_real(r->elapsed0 + now() - t_start));
        if (eval && val_n > 0) {
            json_object_set_new(j, "val_loss", json_real(val_loss));
            json_object_set_new(j, "val_tokens", json_integer(val_n));
        }
        json_object_set_new(j, "load_max_over_mean", json_real(lmm));
        json_object_set_new(j, "dropped_frac", json_real(dfrac));
        json_object_set_new(j, "layers", acc_layers_json(&r->acc, o->accum));
        s = write_metrics(r, j);
        json_decref(j);
        if (s)
            return s;

        const int show = tty ? eval || now() - last_draw > 0.1 : eval || done % o->log_every == 0 || done == 1;
        if (show) {
            /* speed over the steps since the last line: the first step and evaluations
             * would otherwise drag the average for the whole run */
            if (train_time > win_time) {
                rate = (double)((done - win_step) * tokens_per_step) / (train_time - win_time);
                win_time = train_time;
                win_step = done;
            }
            progress p = {done,  o->steps, total, val_loss, rate, (double)((o->steps - done) * tokens_per_step) / rate,
                          lmm,   dfrac,    r->acc.n > 0};
            char line[256];
            progress_text(line, sizeof line, &p);
            /* a terminal gets one line redrawn (at most ~10 times a second), and keeps
             * the lines of evaluations; a file or pipe gets plain lines */
            if (tty)
                printf("\r%s\033[K%s", line, eval ? "\n" : "");
            else
                printf("%s\n", line);
            fflush(stdout);
            last_draw = now();
        }
        if (stop) {
            *stopped = 1;
            break;
        }
    }
    printf("cmoe train: %s in %.1f s (%.0f tok/s), final loss %.4f, val loss %.4f; weights in %s/%s\n",
           *stopped ? "interrupted" : "done", now() - t_start,
           train_time > 0 ? (double)((moe_optim_steps(r->opt) - r->start_step) * tokens_per_step) / train_time : 0.0,
           last_loss, val_loss, r->dir, CLI_RUN_WEIGHTS);
    return MOE_OK;
}

static int run_train(train_opts *o)
{
    train_run r;
    memset(&r, 0, sizeof r);
    r.o = *o;
    moe_status s;
    if (o->resume) {
        if ((s = resume_open(&r))) {
            run_free(&r);
            return failed();
        }
        if (r.start_step >= r.o.steps) {
            printf("cmoe train: %s is complete at step %lld; pass --steps N (> %lld) to train further\n", r.dir,
                   (long long)r.start_step, (long long)r.start_step);
            run_free(&r);
            return EXIT_OK;
        }
        o = &r.o;
        s = MOE_OK;
    } else if (o->init_from) {
        if ((s = cli_run_open(o->init_from, &r.init))) {
            run_free(&r);
            return failed();
        }
        r.cfg = r.init.cfg;
        snprintf(r.cfg_src, sizeof r.cfg_src, "%s", r.init.path);
    } else if (o->config) {
        snprintf(r.cfg_src, sizeof r.cfg_src, "%s", o->config);
        s = moe_model_config_load(o->config, &r.cfg);
    } else if (o->preset) {
        s = cli_preset_load(o->preset, &r.cfg, r.cfg_src, sizeof r.cfg_src);
    } else {
        s = cli_preset_load("laptop", &r.cfg, r.cfg_src, sizeof r.cfg_src);
    }
    if (s || (s = moe_model_config_validate(&r.cfg))) {
        run_free(&r);
        return failed();
    }
    if (o->seq > r.cfg.max_position_embeddings) {
        if (o->have_seq)
            return usage("--seq %lld is longer than the model's max_position_embeddings %lld", (long long)o->seq,
                         (long long)r.cfg.max_position_embeddings);
        r.o.seq = r.cfg.max_position_embeddings; /* the default S fits the model, not the other way */
    }
    struct sigaction sa, old;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_sigint;
    sigemptyset(&sa.sa_mask);
    interrupted = 0;
    int stopped = 0;
    if (!(s = setup(&r))) {
        sigaction(SIGINT, &sa, &old);
        s = train_loop(&r, &stopped);
        sigaction(SIGINT, &old, NULL);
    }
    run_free(&r);
    if (s)
        return failed();
    return stopped ? 130 : EXIT_OK;
}

/* ---- command line ----------------------------------------------------------------- */

enum {
    OPT_CONFIG = 256, OPT_PRESET, OPT_DATA, OPT_STEPS, OPT_BATCH, OPT_SEQ, OPT_ACCUM, OPT_LR, OPT_WARMUP,
    OPT_BACKEND, OPT_THREADS, OPT_SEED, OPT_OUT, OPT_FORCE, OPT_EVAL_EVERY, OPT_EVAL_BATCHES, OPT_LOG_EVERY,
    OPT_SAVE_EVERY, OPT_KEEP, OPT_RESUME, OPT_INIT_FROM, OPT_DTYPE, OPT_HELP
};

static int int_opt(const char *name, const char *arg, int64_t lo, int64_t hi, int64_t *out)
{
    if (cli_parse_i64(arg, lo, hi, out))
        return 0;
    usage("%s: '%s' is not an integer in [%lld, %lld]", name, arg, (long long)lo, (long long)hi);
    return -1;
}

int cmd_train(int argc, char **argv)
{
    static const struct option longopts[] = {
        {"config", required_argument, NULL, OPT_CONFIG},
        {"preset", required_argument, NULL, OPT_PRESET},
        {"data", required_argument, NULL, OPT_DATA},
        {"steps", required_argument, NULL, OPT_STEPS},
        {"batch", required_argument, NULL, OPT_BATCH},
        {"seq", required_argument, NULL, OPT_SEQ},
        {"accum", required_argument, NULL, OPT_ACCUM},
        {"lr", required_argument, NULL, OPT_LR},
        {"warmup", required_argument, NULL, OPT_WARMUP},
        {"backend", required_argument, NULL, OPT_BACKEND},
        {"dtype", required_argument, NULL, OPT_DTYPE},
        {"threads", required_argument, NULL, OPT_THREADS},
        {"seed", required_argument, NULL, OPT_SEED},
        {"out", required_argument, NULL, OPT_OUT},
        {"force", no_argument, NULL, OPT_FORCE},
        {"eval-every", required_argument, NULL, OPT_EVAL_EVERY},
        {"eval-batches", required_argument, NULL, OPT_EVAL_BATCHES},
        {"log-every", required_argument, NULL, OPT_LOG_EVERY},
        {"save-every", required_argument, NULL, OPT_SAVE_EVERY},
        {"keep", required_argument, NULL, OPT_KEEP},
        {"resume", required_argument, NULL, OPT_RESUME},
        {"init-from", required_argument, NULL, OPT_INIT_FROM},
        {"help", no_argument, NULL, OPT_HELP},
        {NULL, 0, NULL, 0},
    };
    train_opts o;
    defaults(&o);
    optind = 0; /* glibc: a full restart, so options may follow RUN_DIR (main() ran getopt with "+") */
    opterr = 0;
    int opt;
    int64_t v;
    const int64_t big = (int64_t)1 << 40;
    while ((opt = getopt_long(argc, argv, ":", longopts, NULL)) != -1) {
        /* what a resumed run takes from its checkpoint */
        if (!o.fixed && opt != ':' && opt != '?')
            for (int i = 0; longopts[i].name; i++)
                if (longopts[i].val == opt &&
                    (opt == OPT_CONFIG || opt == OPT_PRESET || opt == OPT_DATA || opt == OPT_BATCH ||
                     opt == OPT_SEQ || opt == OPT_ACCUM || opt == OPT_LR || opt == OPT_WARMUP || opt == OPT_SEED ||
                     opt == OPT_OUT || opt == OPT_FORCE || opt == OPT_INIT_FROM))
                    o.fixed = longopts[i].name;
        switch (opt) {
        case OPT_CONFIG: o.config = optarg; break;
        case OPT_PRESET: o.preset = optarg; break;
        case OPT_DATA: o.data = optarg; break;
        case OPT_OUT: o.out = optarg; break;
        case OPT_FORCE: o.force = 1; break;
        case OPT_BACKEND:
            if (strcmp(optarg, "cpu") && strcmp(optarg, "ref") && strcmp(optarg, "cuda"))
                return usage("--backend: '%s' is not one of cpu, ref, cuda", optarg);
            o.backend = optarg;
            o.have_backend = 1;
            break;
        case OPT_DTYPE:
            if (strcmp(optarg, "fp32") && strcmp(optarg, "bf16"))
                return usage("--dtype: '%s' is not one of fp32, bf16", optarg);
            o.dtype = optarg;
            o.have_dtype = 1;
            break;
        case OPT_STEPS:
            if (int_opt("--steps", optarg, 1, big, &o.steps))
                return EXIT_USAGE;
            o.have_steps = 1;
            break;
        case OPT_SAVE_EVERY:
            if (int_opt("--save-every", optarg, 0, big, &o.save_every))
                return EXIT_USAGE;
            o.have_save_every = 1;
            break;
        case OPT_KEEP:
            if (int_opt("--keep", optarg, 0, big, &o.keep))
                return EXIT_USAGE;
            o.have_keep = 1;
            break;
        case OPT_RESUME: o.resume = optarg; break;
        case OPT_INIT_FROM: o.init_from = optarg; break;
        case OPT_BATCH:
            if (int_opt("--batch", optarg, 1, 1 << 20, &o.batch))
                return EXIT_USAGE;
            break;
        case OPT_SEQ:
            if (int_opt("--seq", optarg, 1, 1 << 20, &o.seq))
                return EXIT_USAGE;
            o.have_seq = 1;
            break;
        case OPT_ACCUM:
            if (int_opt("--accum", optarg, 1, 1 << 20, &o.accum))
                return EXIT_USAGE;
            break;
        case OPT_WARMUP:
            if (int_opt("--warmup", optarg, 0, big, &o.warmup))
                return EXIT_USAGE;
            o.have_warmup = 1;
            break;
        case OPT_THREADS:
            if (int_opt("--threads", optarg, 0, 4096, &o.threads))
                return EXIT_USAGE;
            o.have_threads = 1;
            break;
        case OPT_SEED:
            if (int_opt("--seed", optarg, 0, INT64_MAX, &v))
                return EXIT_USAGE;
            o.seed = (uint64_t)v;
            break;
        case OPT_EVAL_EVERY:
            if (int_opt("--eval-every", optarg, 0, big, &o.eval_every))
                return EXIT_USAGE;
            o.have_eval_every = 1;
            break;
        case OPT_EVAL_BATCHES:
            if (int_opt("--eval-batches", optarg, 0, big, &o.eval_batches))
                return EXIT_USAGE;
            o.have_eval_batches = 1;
            break;
        case OPT_LOG_EVERY:
            if (int_opt("--log-every", optarg, 1, big, &o.log_every))
                return EXIT_USAGE;
            break;
        case OPT_LR:
            if (!cli_parse_double(optarg, &o.lr) || !(o.lr > 0))
                return usage("--lr: '%s' is not a number > 0", optarg);
            o.have_lr = 1;
            break;
        case OPT_HELP: help_train(); return EXIT_OK;
        case ':': return usage("option '%s' needs an argument", argv[optind - 1]);
        default: return usage("unknown option '%s'", argv[optind - 1]);
        }
    }
    if (optind < argc)
        return usage("unexpected argument '%s'", argv[optind]);
    if (o.config && o.preset)
        return usage("give --config FILE or --preset NAME, not both");
    if (o.resume && o.fixed)
        return usage("--%s cannot be given with --resume: a resumed run keeps its checkpoint's settings (only "
                     "--steps, --threads, --backend, --dtype, --eval-every, --eval-batches, --log-every, --save-every and "
                     "--keep may change)", o.fixed);
    if (o.init_from && (o.config || o.preset))
        return usage("--init-from DIR takes the model config from DIR; drop --%s", o.config ? "config" : "preset");
    if (o.batch * o.seq > ((int64_t)1 << 31))
        return usage("--batch x --seq = %lld tokens is too many", (long long)(o.batch * o.seq));
    return run_train(&o);
}
