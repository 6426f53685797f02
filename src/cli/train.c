/*
 * cmoe train — trains the MoE language model (src/model/model.h) on a dataset (src/io/data.h)
 * into a run directory (src/io/rundir.h: the settings, the directory checks and lock,
 * metrics.jsonl, checkpoint rotation and the choice of checkpoint to resume from). This file
 * sets the run up, prints progress and runs the loop; train_options.c parses the options.
 *
 * SIGINT, SIGTERM and SIGHUP (Ctrl-C, kill, docker stop, Slurm's --signal) stop the run after
 * the current step with the weights and a checkpoint saved, exit 128 + the signal; a second
 * signal exits at once.
 */
#define _POSIX_C_SOURCE 200809L
#include "config.h"

#include <errno.h>
#include <inttypes.h>
#include <limits.h>
#include <math.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <jansson.h>

#include "cmoe.h"
#include "commands.h"
#include "io/checkpoint.h"
#include "io/data.h"
#include "io/rundir.h"
#include "model/model.h"
#include "presets.h"
#include "run.h"
#include "signals.h"
#include "train.h"

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* ---- progress ----------------------------------------------------------------------- */

typedef struct {
    int64_t step, steps;
    double loss, val_loss, tok_s, eta, load, dropped;
    int moe;
} progress;

static void progress_text(char *buf, size_t n, const progress *p)
{
    char eta[32], val[32] = "";
    cli_fmt_duration(eta, sizeof eta, p->eta);
    if (!isnan(p->val_loss))
        snprintf(val, sizeof val, "  val %.4f", p->val_loss);
    int k = snprintf(buf, n, "step %*" PRId64 "/%" PRId64 "  loss %.4f%s  %.0f tok/s  ETA %s",
                     (int)snprintf(NULL, 0, "%" PRId64, p->steps), p->step, p->steps, p->loss, val, p->tok_s, eta);
    if (p->moe && k > 0 && (size_t)k < n)
        snprintf(buf + k, n - (size_t)k, "  load max/mean %.2f  dropped %.1f%%", p->load, 100 * p->dropped);
}

/* ---- the run ---------------------------------------------------------------------- */

typedef struct {
    train_opts o;
    moe_train_settings t; /* what this run trains with (from the checkpoint when resuming) */
    moe_model_config cfg;
    moe_rundir rd;
    moe_dataset *d;
    moe_backend *b;
    moe_model *m;
    moe_optim *opt;
    int32_t *in, *tg, *task;
    char *train_json;
    moe_step_stats *acc;
    moe_resume_point rp;   /* --resume: the checkpoint, validated */
    moe_run_record rec;    /* --resume: what it says about the run */
    int64_t start_step;    /* steps already done (0, or the checkpoint's) */
    double elapsed0;       /* seconds the run had taken before this process */
    cli_run init;          /* --init-from: the weights to start from */
    int usage_error;       /* the failure is the command line's: exit 2 */
    cli_dist dist;         /* the ranks, and the group path (several ranks or --groups > 1) */
    int stop_sig;          /* the stop signal the ranks agreed on */
    int global_error;      /* every rank failed alike (a divergence): rank 0 speaks */
} train_run;

static void run_free(train_run *r)
{
    if (r->dist.g) { /* the trainer owns the optimizer; the model holds the layout's exchange */
        moe_gtrain_free(r->dist.g);
        r->dist.g = NULL;
        r->opt = NULL;
    }
    moe_optim_free(r->opt);
    moe_model_free(r->m);
    cli_dist_free(&r->dist);
    moe_backend_free(r->b);
    moe_dataset_free(r->d);
    free(r->in);
    free(r->tg);
    free(r->task);
    free(r->train_json);
    moe_step_stats_free(r->acc);
    moe_resume_point_free(&r->rp);
    cli_run_free(&r->init);
}

/* --resume: lock the run, choose the checkpoint, take the settings from it. */
static moe_status resume_open(train_run *r)
{
    const train_opts *o = &r->o;
    char dir[4096], path[4200] = "";
    moe_status s = MOE_OK;
    /* locked before anything is read, so a run still training is found out at once; rank 0
     * chooses the checkpoint, the other ranks read that one */
    if (r->dist.rank == 0 && !(s = moe_resume_dir(o->resume, dir, sizeof dir)) &&
        !(s = moe_rundir_open(dir, &r->rd)) && !(s = moe_resume_find(o->resume, &r->rp)))
        snprintf(path, sizeof path, "%s", r->rp.path);
    if ((s = cli_dist_share(&r->dist, s, path, sizeof path, "choosing the checkpoint")) ||
        (r->dist.rank != 0 && ((s = moe_resume_dir(path, r->rd.dir, sizeof r->rd.dir)) ||
                               (s = moe_resume_find(path, &r->rp)))))
        return s;
    const moe_ckpt *ck = r->rp.ck;
    for (char *p = r->rp.notes, *nl; p && *p; p = nl + 1) {
        nl = strchr(p, '\n');
        printf("cmoe train: note: skipped a checkpoint that failed: %.*s\n", (int)(nl - p), p);
    }
    if (r->rp.notes)
        printf("cmoe train: note: continuing from the newest valid one, %s\n", r->rp.path);
    if ((s = moe_run_record_parse(ck->train_json, r->rp.path, &r->rec)))
        return s;
    if (r->rec.t.seed != ck->seed)
        return moe_error(MOE_ERR_FORMAT, "%s: metadata seed %" PRIu64 " differs from the train settings' seed %" PRIu64,
                         r->rp.path, ck->seed, r->rec.t.seed);
    moe_train_settings_resume(&r->t, &r->rec, &o->t, o->given);
    if (o->data)
        snprintf(r->t.data, sizeof r->t.data, "%s", o->data);
    if (strcmp(r->t.backend, r->rec.t.backend))
        printf("cmoe train: note: the run trained on backend %s, continuing on %s (not bitwise the same)\n",
               r->rec.t.backend, r->t.backend);
    if (ck->step > r->t.steps)
        return moe_error(MOE_ERR_ARG, "the checkpoint is at step %lld, beyond --steps %lld", (long long)ck->step,
                         (long long)r->t.steps);
    if (r->t.steps != r->rec.t.steps)
        printf("cmoe train: note: --steps %lld changes the cosine schedule's horizon (was %lld)\n",
               (long long)r->t.steps, (long long)r->rec.t.steps);
    json_t *st = ck->state_json ? json_loads(ck->state_json, 0, NULL) : NULL, *v;
    if ((v = json_object_get(st, "elapsed_s")) && json_is_number(v))
        r->elapsed0 = json_number_value(v);
    json_decref(st);
    r->cfg = ck->cfg;
    r->start_step = ck->step;
    return MOE_OK;
}

/* A new run: the model config and a run directory that may be written (locked). */
static moe_status fresh_open(train_run *r)
{
    const train_opts *o = &r->o;
    moe_status s;
    r->t = o->t;
    if (o->init_from) {
        if ((s = cli_run_open(o->init_from, &r->init)))
            return s;
        r->cfg = r->init.cfg;
        snprintf(r->t.model, sizeof r->t.model, "%s", r->init.path);
        snprintf(r->t.init_from, sizeof r->t.init_from, "%s", r->init.path);
    } else if (o->config) {
        snprintf(r->t.model, sizeof r->t.model, "%s", o->config);
        s = moe_model_config_load(o->config, &r->cfg);
    } else {
        s = cli_preset_load(o->preset ? o->preset : "laptop", &r->cfg, r->t.model, sizeof r->t.model);
    }
    if (s || (s = moe_model_config_validate(&r->cfg)))
        return s;
    if (r->t.seq > r->cfg.max_position_embeddings) {
        if (o->have_seq) {
            r->usage_error = 1;
            return moe_error(MOE_ERR_ARG, "--seq %lld is longer than the model's max_position_embeddings %lld",
                             (long long)r->t.seq, (long long)r->cfg.max_position_embeddings);
        }
        r->t.seq = r->cfg.max_position_embeddings; /* the default S fits the model, not the other way */
    }
    r->t.oc.warmup_steps = o->have_warmup ? o->warmup : (r->t.steps / 10 < 100 ? r->t.steps / 10 : 100);
    if (!o->have_groups) /* one group per rank: one pass each */
        r->t.groups = r->dist.size;
    char dir[4096] = "";
    if (r->dist.rank == 0) {
        if (o->out)
            snprintf(dir, sizeof dir, "%s", o->out);
        else
            s = moe_rundir_default_name(dir, sizeof dir);
        /* checked and locked before the data is read or the model built: a refusal is quick */
        if (!s)
            s = moe_rundir_create(dir, o->force, &r->rd);
    }
    if ((s = cli_dist_share(&r->dist, s, dir, sizeof dir, "creating the run directory")) || r->dist.rank == 0)
        return s;
    snprintf(r->rd.dir, sizeof r->rd.dir, "%s", dir); /* rank 0 writes there; the others only name it */
    return MOE_OK;
}

/* The data and the settings (every rank alike). */
static moe_status setup_data(train_run *r)
{
    const moe_train_settings *t = &r->t;
    moe_status s;
    char data[4096];
    if (r->o.resume || r->o.data)
        snprintf(data, sizeof data, "%s", r->o.resume && !r->o.data ? t->data : r->o.data);
    else if ((s = cli_default_data(data, sizeof data)))
        return s;
    moe_data_options dopt;
    moe_data_options_default(&dopt);
    dopt.vocab = r->cfg.vocab_size <= 65536 ? r->cfg.vocab_size : 65536;
    if ((s = moe_dataset_open(data, &dopt, &r->d))) {
        if (s == MOE_ERR_IO && r->o.resume && !r->o.data) {
            char why[1024];
            snprintf(why, sizeof why, "%s", moe_last_error());
            return moe_error(s, "%s; if the data moved, pass --data NEWPATH (checked to be the same data)", why);
        }
        return s;
    }
    if (r->o.resume && (s = moe_run_record_check_data(&r->rec, r->d)))
        return s;
    if (moe_dataset_vocab(r->d) > r->cfg.vocab_size)
        return moe_error(MOE_ERR_ARG, "data '%s' has vocabulary %lld but the model's vocab_size is %lld", data,
                         (long long)moe_dataset_vocab(r->d), (long long)r->cfg.vocab_size);
    /* the resolved path (a relative one would not survive `cmoe eval` from elsewhere) */
    snprintf(r->t.data, sizeof r->t.data, "%s",
             moe_dataset_kind(r->d) == MOE_DATA_SYNTH ? data : moe_dataset_identity(r->d)->path);
    int64_t ep, g;
    if (cli_dist_active(&r->dist, t->groups) &&
        (s = moe_dist_check(&(moe_dist_options){.ep = r->dist.o.ep, .groups = t->groups, .chunks = r->dist.o.chunks},
                            r->dist.size, &r->cfg, t->batch, &ep, &g))) {
        r->usage_error = 1;
        return s;
    }
    if ((s = moe_train_settings_validate(t, &r->cfg)))
        return s;
    const size_t n = (size_t)(t->batch * t->seq);
    r->in = malloc(n * sizeof *r->in);
    r->tg = malloc(n * sizeof *r->tg);
    r->task = malloc(n * sizeof *r->task);
    if (!r->in || !r->tg || !r->task)
        return moe_error(MOE_ERR_NOMEM, "out of memory for a batch of %lld x %lld", (long long)t->batch,
                         (long long)t->seq);
    /* fails here, not at step 1, when the data is shorter than one row */
    return moe_dataset_batch(r->d, t->seed, 0, 0, t->batch, t->seq, r->in, r->tg, r->task);
}

/* The ranks agree, then the model, its state and (rank 0) the run directory's files. */
static moe_status setup_model(train_run *r)
{
    const moe_train_settings *t = &r->t;
    moe_status s;
    if ((s = cli_dist_agree(&r->dist, &r->cfg, t, r->d)) ||
        (s = cli_backend_create(t->backend, (int)t->threads, t->dtype[0] ? t->dtype : NULL, &r->b)))
        return s;
    if (cli_dist_active(&r->dist, t->groups))
        s = cli_dist_setup(&r->dist, &r->cfg, r->b, t, &r->m, &r->opt);
    else if (!(s = moe_model_create(&r->cfg, r->b, NULL, t->batch, t->seq, &r->m)))
        s = moe_optim_create(r->m, &t->oc, &r->opt);
    if (s || (s = moe_step_stats_create(&r->cfg, &r->acc)))
        return s;
    /* the state: a checkpoint (validated as a whole before anything is set or written; a
     * shard takes its slice of each tensor), the weights of another run, or a fresh
     * initialisation */
    if (r->o.resume)
        s = moe_ckpt_restore(r->rp.ck, r->m, r->opt);
    else if (r->o.init_from)
        s = cli_run_load_into(&r->init, r->m);
    else
        s = moe_model_init(r->m, t->seed);
    if (s || (s = moe_train_settings_to_json(t, r->d, r->o.resume ? r->rp.path : NULL, &r->train_json)) ||
        r->dist.rank != 0)
        return s;
    if (r->o.resume) {
        int later = 0;
        if ((s = moe_ckpt_prune(r->rd.dir, r->start_step, 0, &later)))
            return s;
        if (later)
            printf("cmoe train: removed %d checkpoint%s after the resume point\n", later, later == 1 ? "" : "s");
        return moe_rundir_start(&r->rd, NULL, r->train_json, r->start_step);
    }
    char *cfg_json;
    if ((s = moe_model_config_to_json(&r->cfg, 1, &cfg_json)))
        return s;
    s = moe_rundir_start(&r->rd, cfg_json, r->train_json, -1);
    free(cfg_json);
    return s;
}

static moe_status save_ckpt(train_run *r, int64_t done, double elapsed)
{
    char path[4200], state[128];
    moe_status s = MOE_OK;
    if (r->dist.rank == 0 && !(s = moe_ckpt_path(path, sizeof path, r->rd.dir, done)))
        s = moe_rundir_sync_metrics(&r->rd);
    snprintf(state, sizeof state, "{\"elapsed_s\": %.17g}", elapsed);
    moe_ckpt_state st = {done, moe_optim_steps(r->opt), r->t.seed, r->train_json, state};
    if (r->dist.d) /* whole tensors gathered; every rank takes part, rank 0 writes */
        s = cli_dist_save_ckpt(&r->dist, path, r->m, r->opt, &st, s);
    else if (!s)
        s = moe_ckpt_save(path, r->m, r->opt, &st);
    if (s || r->dist.rank != 0)
        return s;
    r->rd.saved = 1;
    return moe_ckpt_prune(r->rd.dir, -1, r->t.keep, NULL);
}

static moe_status diverged(train_run *r, int64_t step, double total, double ce, double aux, double lr, double norm)
{
    char why[600], head[200];
    int bad = 0;
    const int grads = isfinite(total); /* called after the update: the gradient is the news */
    if (moe_model_explain_nonfinite(r->m, grads, why, sizeof why, &bad))
        snprintf(why, sizeof why, "(the values could not be scanned: %s)", moe_last_error());
    snprintf(head, sizeof head, "training diverged at step %lld: the loss is %g (ce %g, aux %g)", (long long)step + 1,
             total, ce, aux);
    if (grads)
        return moe_error(MOE_ERR_ARG, "training diverged at step %lld: the gradient norm is %g although the loss %g is "
                         "finite: %s", (long long)step + 1, norm, total, why);
    if (bad && step == r->start_step) {
        char from[64];
        snprintf(from, sizeof from, "the initialisation, initializer_range %g", r->cfg.initializer_range);
        return moe_error(MOE_ERR_ARG, "%s: %s before the first update, in the weights the run started from (%s)", head,
                         why, r->o.resume ? "the --resume checkpoint" : r->o.init_from ? "--init-from" : from);
    }
    if (bad)
        return moe_error(MOE_ERR_ARG, "%s: %s after the update of step %lld (lr %g, gradient norm %g); try a lower "
                         "--lr", head, why, (long long)step, lr, norm);
    return moe_error(MOE_ERR_ARG, "%s: %s, so the forward pass overflowed (initializer_range %g, lr %g)", head, why,
                     r->cfg.initializer_range, r->t.oc.lr);
}

static moe_status train_loop(train_run *r, int *stopped)
{
    const moe_train_settings *t = &r->t;
    /* under mpirun a rank's stdout may be a pseudo-terminal whatever mpirun's own is: plain lines */
    const int tty = isatty(STDOUT_FILENO) && r->dist.size == 1;
    const int64_t tokens_per_step = t->batch * t->seq * t->accum;
    const int n_moe = moe_step_stats_moe_layers(r->acc);
    double train_time = 0, t_start = now(), last_draw = 0, val_loss = NAN, last_loss = NAN;
    double rate = 0, win_time = 0;
    int64_t win_step = r->start_step;
    moe_status s;
    printf("cmoe train: %s\n  model: %s, %lld parameters (%lld layers, hidden %lld, %d MoE layers)\n"
           "  data: %s\n  %lld steps x %lld tokens (batch %lld x seq %lld x accum %lld), lr %g, warmup %lld,"
           " backend %s, seed %" PRIu64 "\n",
           r->rd.dir, t->model, (long long)moe_model_numel(r->m), (long long)r->cfg.num_hidden_layers,
           (long long)r->cfg.hidden_size, n_moe, moe_dataset_describe(r->d), (long long)t->steps,
           (long long)tokens_per_step, (long long)t->batch, (long long)t->seq, (long long)t->accum, t->oc.lr,
           (long long)t->oc.warmup_steps, t->backend, t->seed);
    if (r->o.resume)
        printf("  resumed from %s at step %lld\n", r->rp.path, (long long)r->start_step);
    const moe_layer_config *mc = &r->cfg.moe;
    if (n_moe > 0 && mc->top_k == 1 && mc->renormalize &&
        (mc->router == MOE_ROUTER_TOPK || mc->router == MOE_ROUTER_NOISY_TOPK))
        printf("  note: top-1 with norm_topk_prob true: the gate is p/p = 1, so the router learns only from the "
               "auxiliary losses; norm_topk_prob false gives Switch's gate p\n");
    if (r->dist.d)
        cli_dist_describe(&r->dist, stdout);
    fflush(stdout);
    if ((r->stop_sig = cli_dist_max(&r->dist, cli_stop_signal()))) { /* before the first step: nothing to save */
        *stopped = 1;
        return MOE_OK;
    }
    double prev_lr = 0, prev_norm = 0; /* of the last update, for a divergence message */
    /* the step's sums run over accum micro-batches x G groups */
    const double per_step = (double)(t->accum * t->groups);
    for (int64_t step = r->start_step; step < t->steps; step++) {
        double t0 = now();
        moe_optim_result res;
        moe_model_stats ms;
        moe_step_stats_zero(r->acc);
        if (r->dist.g) {
            if ((s = moe_gtrain_step(r->dist.g, r->d, t->seed, step, t->accum, &res)))
                return s;
        } else {
            moe_model_zero_grad(r->m);
            /* nothing in the step waits for the backend until the optimizer's result is read */
            for (int64_t micro = 0; micro < t->accum; micro++) {
                const moe_key key = {(uint64_t)step, (uint32_t)micro, 0};
                if ((s = moe_dataset_batch(r->d, t->seed, step, micro, t->batch, t->seq, r->in, r->tg, r->task)) ||
                    (s = moe_model_forward(r->m, r->in, r->tg, r->task, t->batch, t->seq, key, 1, NULL)) ||
                    (s = moe_model_backward(r->m)))
                    return s;
            }
            if ((s = moe_optim_step(r->opt, 1.0 / (double)t->accum, &res)))
                return s;
        }
        if ((s = moe_model_get_stats(r->m, MOE_SPAN_STEP, &ms)) || (s = moe_step_stats_add(r->acc, r->m)))
            return s;
        const char *note = r->dist.g ? moe_gtrain_note(r->dist.g) : NULL;
        if (note)
            printf("%scmoe train: %s\n", tty ? "\r\033[K" : "", note);
        const double ce = ms.ce / per_step, aux = ms.aux_total / per_step, total = ce + aux;
        /* a non-finite gradient norm made AdamW skip the update: the weights are those the
         * step started from, and the message names what went wrong (alike on every rank) */
        r->global_error = 1;
        if (!isfinite(total))
            return diverged(r, step, total, ce, aux, prev_lr, prev_norm);
        if (!isfinite(res.grad_norm))
            return diverged(r, step, total, ce, aux, res.lr, res.grad_norm);
        r->global_error = 0;
        prev_lr = res.lr;
        prev_norm = res.grad_norm;
        last_loss = total;
        double dt = now() - t0;
        train_time += dt;
        const int64_t done = step + 1;
        /* read the flag once: a signal landing later in this step must not stop the run
         * after a step whose checkpoint was not written; every rank stops after the same
         * step (a signal reaches each at its own time) */
        r->stop_sig = cli_dist_max(&r->dist, cli_stop_signal());
        const int stop = r->stop_sig != 0;
        const int last = done == t->steps || stop;
        const int eval = last || (t->eval_every > 0 && done % t->eval_every == 0);
        int64_t val_n = 0;
        if (eval && (s = r->dist.g ? moe_gtrain_val_loss(r->dist.g, r->d, t->eval_batches, &val_loss, &val_n)
                                   : moe_val_loss(r->m, r->d, t->batch, t->seq, t->eval_batches, r->in, r->tg,
                                                  r->task, &val_loss, &val_n)))
            return s;
        /* the step's line first: a checkpoint is never ahead of the log */
        moe_step_record rec = {done, tokens_per_step, eval ? val_n : 0, total, ce, aux, res.lr, res.grad_norm, dt,
                               r->elapsed0 + now() - t_start, val_loss};
        char *line;
        if ((s = moe_step_record_json(&rec, r->acc, t->accum * t->groups, &line)))
            return s;
        s = r->dist.rank == 0 ? moe_rundir_append_metrics(&r->rd, line) : MOE_OK;
        free(line);
        if (s)
            return s;
        if (eval) {
            if ((s = r->dist.d ? cli_dist_save_weights(&r->dist, r->rd.dir, r->m, r->train_json, done)
                               : cli_run_save(r->rd.dir, r->m, r->train_json, done)))
                return s;
            r->rd.saved = r->dist.rank == 0;
        }
        /* a checkpoint every save_every steps, at the end when saving at all, and when
         * stopped by a signal (so that the run can be resumed) */
        if (((t->save_every > 0 && (done % t->save_every == 0 || done == t->steps)) || stop) &&
            (s = save_ckpt(r, done, r->elapsed0 + now() - t_start)))
            return s;

        const int show = tty ? eval || now() - last_draw > 0.1 : eval || done % r->o.log_every == 0 || done == 1;
        if (show) {
            /* speed over the steps since the last line: the first step and evaluations
             * would otherwise drag the average for the whole run */
            if (train_time > win_time) {
                rate = (double)((done - win_step) * tokens_per_step) / (train_time - win_time);
                win_time = train_time;
                win_step = done;
            }
            double lmm, dfrac;
            moe_step_stats_summary(r->acc, &lmm, &dfrac);
            progress p = {done, t->steps, total, val_loss, rate, (double)((t->steps - done) * tokens_per_step) / rate,
                          lmm,  dfrac,    n_moe > 0};
            char text[256];
            progress_text(text, sizeof text, &p);
            /* a terminal gets one line redrawn (at most ~10 times a second), and keeps
             * the lines of evaluations; a file or pipe gets plain lines */
            if (tty)
                printf("\r%s\033[K%s", text, eval ? "\n" : "");
            else
                printf("%s\n", text);
            fflush(stdout);
            last_draw = now();
        }
        if (stop) {
            *stopped = 1;
            break;
        }
    }
    printf("cmoe train: %s in %.1f s (%.0f tok/s), final loss %.4f, val loss %.4f; weights in %s/%s\n",
           *stopped ? "stopped by a signal" : "done", now() - t_start,
           train_time > 0 ? (double)((moe_optim_steps(r->opt) - r->start_step) * tokens_per_step) / train_time : 0.0,
           last_loss, val_loss, r->rd.dir, CLI_RUN_WEIGHTS);
    cli_dist_report(&r->dist, r->m, moe_optim_steps(r->opt) - r->start_step, train_time, stdout);
    return MOE_OK;
}

int cli_train_run(const train_opts *o)
{
    train_run r;
    memset(&r, 0, sizeof r);
    r.rd.lock_fd = r.rd.metrics_fd = -1;
    r.o = *o;
    struct sigaction old[3];
    cli_stop_catch(old); /* from the start: a signal during setup stops before step one */
    int stopped = 0, removed = 0, in_loop = 0;
    /* under mpirun or srun: every rank runs this; rank 0 owns the run directory and speaks,
     * and at each stage the ranks learn whether any failed */
    moe_status mine = cli_dist_init(&r.dist), s;
    r.dist.o = o->dist;
    if (!mine)
        mine = o->resume ? resume_open(&r) : fresh_open(&r);
    s = cli_dist_all_ok(&r.dist, mine, "opening the run");
    if (!s && o->resume && r.start_step >= r.t.steps) {
        printf("cmoe train: %s is complete at step %lld; pass --steps N (> %lld) to train further\n", r.rd.dir,
               (long long)r.start_step, (long long)r.start_step);
    } else if (!s && !(s = cli_dist_all_ok(&r.dist, mine = setup_data(&r), "opening the data")) &&
               !(s = cli_dist_all_ok(&r.dist, mine = setup_model(&r), "building the model"))) {
        in_loop = 1;
        mine = s = train_loop(&r, &stopped);
    }
    char why[1024] = "";
    if (s)
        snprintf(why, sizeof why, "%s", moe_last_error());
    if (s && in_loop && !r.global_error && r.dist.size > 1)
        cli_dist_abort(&r.dist, why); /* one rank failed inside a step, the others wait in it */
    /* a new run that failed, or was stopped before it saved anything, leaves nothing behind */
    moe_rundir_close(&r.rd, s != MOE_OK || (stopped && !r.rd.saved), &removed);
    const int quiet = r.dist.rank != 0 && (!mine || r.global_error); /* rank 0 speaks for all */
    run_free(&r);
    cli_stop_restore(old);
    int rc = stopped ? 128 + r.stop_sig : EXIT_OK;
    char line[1100];
    cli_dist_who(&r.dist, why, line, sizeof line);
    if (s && r.usage_error) {
        rc = quiet ? EXIT_USAGE : cli_train_usage("%s", line);
    } else if (s) {
        if (!quiet)
            fprintf(stderr, "cmoe train: %s\n", line);
        if (removed)
            fprintf(stderr, "cmoe train: removed what this run had written to %s (nothing was saved)\n", r.rd.dir);
        rc = EXIT_FAIL;
    } else if (stopped) {
        printf("cmoe train: stopped by signal %d (%s)%s\n", r.stop_sig,
               r.stop_sig == SIGINT ? "INT" : r.stop_sig == SIGTERM ? "TERM" : "HUP",
               r.rd.saved || o->resume ? "; --resume DIR continues" : " before the first step: nothing was saved");
    }
    /* every rank has said what it had to before any exits (mpirun ends the job at the
     * first non-zero exit) */
    cli_dist_finish(&r.dist);
    return rc;
}
