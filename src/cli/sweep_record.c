/*
 * The records of `cmoe sweep` (sweep.h): DIR/sweep.jsonl read back (the last record of each
 * run, torn lines dropped) and appended one whole line per run, and a run's record made
 * from its settings and its run directory's metrics.jsonl.
 */
#define _POSIX_C_SOURCE 200809L
#include "config.h"

#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <jansson.h>

#include "cmoe.h"
#include "core/durable.h"
#include "core/input.h"
#include "report.h"
#include "sweep.h"

void sweep_path(char *buf, size_t n, const char *dir, const char *sub, const char *name, const char *ext)
{
    int k = snprintf(buf, n, "%s/%s%s%s%s", dir, sub, *sub ? "/" : "", name, ext);
    if (k < 0 || (size_t)k >= n)
        buf[0] = 0;
}

moe_status sweep_read_records(sweep_spec *s, const char *dir, int fix)
{
    char p[4200], *text;
    size_t len;
    sweep_path(p, sizeof p, dir, "", "sweep.jsonl", "");
    if (access(p, F_OK) != 0)
        return MOE_OK;
    moe_status st = moe_read_all(p, "sweep.jsonl", (size_t)1 << 30, MOE_IN_REGULAR, &text, &len);
    if (st)
        return st;
    int torn = 0;
    char *keep = malloc(len + 1);
    size_t kn = 0;
    for (char *line = text, *nl; keep && line < text + len; line = nl + 1) {
        nl = memchr(line, '\n', (size_t)(text + len - line));
        if (!nl)
            nl = text + len;
        json_t *r = json_loadb(line, (size_t)(nl - line), 0, NULL);
        const char *name = json_string_value(json_object_get(r, "name"));
        if (!r || !name) {
            torn += nl > line;
            json_decref(r);
            continue;
        }
        memcpy(keep + kn, line, (size_t)(nl - line));
        kn += (size_t)(nl - line);
        keep[kn++] = '\n';
        sweep_run *run = sweep_find(s, name);
        const char *key = json_string_value(json_object_get(r, "key"));
        const char *status = json_string_value(json_object_get(r, "status"));
        if (run && key && !strcmp(key, run->key)) {
            json_decref(run->record);
            run->record = r;
            run->done = status && !strcmp(status, "done");
        } else {
            json_decref(r);
        }
    }
    if (torn && keep && fix) {
        fprintf(stderr, "cmoe sweep: warning: %s: dropped %d line(s) that do not parse (a write cut short)\n", p,
                torn);
        keep[kn] = 0;
        st = moe_durable_write(p, keep, kn);
    }
    free(keep);
    free(text);
    return st;
}

moe_status sweep_append_record(const char *dir, json_t *rec)
{
    char p[4200];
    sweep_path(p, sizeof p, dir, "", "sweep.jsonl", "");
    char *line = json_dumps(rec, JSON_COMPACT | JSON_PRESERVE_ORDER | JSON_REAL_PRECISION(10));
    if (!line)
        return moe_error(MOE_ERR_NOMEM, "out of memory");
    int fd = open(p, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0644);
    moe_status st = MOE_OK;
    if (fd < 0) {
        st = moe_error(MOE_ERR_IO, "%s: %s", p, strerror(errno));
    } else {
        size_t n = strlen(line);
        line[n] = '\n'; /* one write: a reader sees the whole line or none of it */
        if (write(fd, line, n + 1) != (ssize_t)(n + 1) || fsync(fd) != 0)
            st = moe_error(MOE_ERR_IO, "%s: %s", p, strerror(errno));
        line[n] = 0;
        close(fd);
    }
    free(line);
    return st;
}

static json_t *settings_json(const moe_train_settings *t)
{
    return json_pack("{s:I, s:I, s:I, s:I, s:f, s:I, s:I, s:s, s:I, s:I, s:s}", "steps", (json_int_t)t->steps,
                     "batch", (json_int_t)t->batch, "seq", (json_int_t)t->seq, "accum", (json_int_t)t->accum, "lr",
                     t->oc.lr, "warmup", (json_int_t)t->oc.warmup_steps, "seed", (json_int_t)t->seed, "data",
                     t->data, "eval_every", (json_int_t)t->eval_every, "eval_batches", (json_int_t)t->eval_batches,
                     "backend", t->backend);
}

json_t *sweep_record_new(const sweep_run *r, const char *status)
{
    json_t *rec = json_object(), *cfg = json_loads(r->cfg_json, 0, NULL);
    char rd[SWEEP_NAME_MAX + 8];
    snprintf(rd, sizeof rd, "runs/%s", r->name);
    json_object_set_new(rec, "name", json_string(r->name));
    json_object_set_new(rec, "key", json_string(r->key));
    json_object_set_new(rec, "status", json_string(status));
    json_object_set_new(rec, "run_dir", json_string(rd));
    json_object_set_new(rec, "grid", json_deep_copy(r->grid));
    json_object_set_new(rec, "config", cfg ? cfg : json_null());
    json_object_set_new(rec, "train", settings_json(&r->t));
    json_object_set_new(rec, "experts", json_integer(r->experts));
    json_object_set_new(rec, "experts_per_token", json_real(r->info.experts_per_token));
    json_object_set_new(rec, "moe_layers", json_integer(r->info.n_moe_layers));
    json_object_set_new(rec, "total_params", json_integer(r->info.total_params));
    json_object_set_new(rec, "active_params", json_integer(r->info.active_params));
    json_object_set_new(rec, "active_params_nonembed", json_integer(r->info.active_params_nonembed));
    json_object_set_new(rec, "base_params", json_integer(r->base_params));
    json_object_set_new(rec, "flops_per_token", json_real(r->flops_per_token));
    json_object_set_new(rec, "tokens", json_integer(r->tokens));
    json_object_set_new(rec, "train_flops", json_real(r->train_flops));
    return rec;
}

static double fin(double v)
{
    return isfinite(v) ? v : NAN;
}

json_t *sweep_record_done(const sweep_run *r, const char *rundir)
{
    char p[4200];
    sweep_path(p, sizeof p, rundir, "", "metrics.jsonl", "");
    metrics m;
    if (report_load_metrics(p, &m)) {
        report_metrics_free(&m);
        moe_error(MOE_ERR_FORMAT, "%s: cannot be read", p);
        return NULL;
    }
    const int64_t last = m.n ? (int64_t)m.s[S_STEP].v[m.n - 1] : 0;
    double final_val = NAN, best = NAN, best_step = NAN, wall = NAN, ce = 0, lmm = 0;
    int64_t nce = 0, nl = 0;
    for (int64_t i = 0; i < m.n; i++) {
        const double v = m.s[S_VAL].v[i];
        if (isfinite(v)) {
            final_val = v;
            if (!(best <= v)) {
                best = v;
                best_step = m.s[S_STEP].v[i];
            }
        }
        if (isfinite(m.s[S_ELAPSED].v[i]))
            wall = m.s[S_ELAPSED].v[i];
        if (i >= m.n - (m.n + 9) / 10) { /* the last tenth of the steps */
            const double c = m.has[S_CE] ? m.s[S_CE].v[i] : m.s[S_LOSS].v[i];
            if (isfinite(c))
                ce += c, nce++;
            if (isfinite(m.s[S_LMM].v[i]))
                lmm += m.s[S_LMM].v[i], nl++;
        }
    }
    report_metrics_free(&m);
    if (last != r->t.steps || !isfinite(final_val)) {
        moe_error(MOE_ERR_FORMAT, "%s: ends at step %lld of %lld%s", p, (long long)last, (long long)r->t.steps,
                  isfinite(final_val) ? "" : " without a validation loss");
        return NULL;
    }
    json_t *rec = sweep_record_new(r, "done");
    json_object_set_new(rec, "wall_s", json_real(fin(wall)));
    json_object_set_new(rec, "final_val_loss", json_real(final_val));
    json_object_set_new(rec, "best_val_loss", json_real(best));
    json_object_set_new(rec, "best_val_step", json_integer((json_int_t)best_step));
    json_object_set_new(rec, "final_train_loss", nce ? json_real(ce / (double)nce) : json_null());
    json_object_set_new(rec, "load_max_over_mean", nl ? json_real(lmm / (double)nl) : json_null());
    return rec;
}

