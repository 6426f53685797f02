/*
 * The spec of `cmoe sweep` (sweep.h): read, checked and resolved into runs before anything
 * is trained, so that a bad key stops the sweep at once with a message naming it.
 *
 *   {
 *     "description": "...",
 *     "preset": "laptop" | "config": "FILE",        the starting model (default: laptop)
 *     "model": {HF keys},                            overrides for every run
 *     "train": {"batch": 8, "seq": 128, ...},        settings for every run
 *     "budget": {"flops": 2e13},                     each run's steps spend this much compute
 *     "runs": [{"name": "dense", "preset"|"config", "model": {...}, "train": {...}}, ...],
 *     "grid": {"model.num_local_experts": [1, 2, 4], "train.lr": [1e-3, 3e-3]},
 *     "analysis": {"baseline": "dense", "fit": "clark", "load": true}
 *   }
 *
 * Every run of "runs" (one run of the top level alone when there is none) is crossed with
 * every point of "grid" (its keys' values, the last key changing fastest). A run's model is
 * its preset or config, then the top level's "model", its own, the grid's "model.*" keys;
 * its settings likewise. "{key}" in a run's name is replaced by the grid value of key;
 * without a placeholder the grid values are appended ("name-key=value").
 */
#define _POSIX_C_SOURCE 200809L
#include "config.h"

#include <errno.h>
#include <inttypes.h>
#include <limits.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <jansson.h>
#include <zlib.h>

#include "cmoe.h"
#include "core/input.h"
#include "presets.h"
#include "sweep.h"

#define BAD(...) return moe_error(MOE_ERR_ARG, __VA_ARGS__)

static const char *const top_keys[] = {"description", "preset", "config", "model", "train",
                                       "budget",      "runs",   "grid",   "analysis", NULL};
static const char *const run_keys[] = {"name", "preset", "config", "model", "train", NULL};
static const char *const train_keys[] = {"steps",        "batch",      "seq",   "accum", "lr",    "warmup",
                                         "seed",         "data",       "evals", "eval_every",
                                         "eval_batches", "save_every", "keep",  "threads", "backend", NULL};
static const char *const analysis_keys[] = {"baseline", "fit", "load", NULL};

static int listed(const char *const *keys, const char *k)
{
    for (int i = 0; keys[i]; i++)
        if (!strcmp(keys[i], k))
            return 1;
    return 0;
}

static void join_keys(const char *const *keys, char *buf, size_t n)
{
    buf[0] = 0;
    for (int i = 0; keys[i]; i++) {
        strncat(buf, i ? ", " : "", n - strlen(buf) - 1);
        strncat(buf, keys[i], n - strlen(buf) - 1);
    }
}

/* Every key of object o must be in keys; where names o ("runs[1].train"). */
static moe_status only_keys(json_t *o, const char *const *keys, const char *where)
{
    const char *k;
    json_t *v;
    json_object_foreach(o, k, v) {
        if (!listed(keys, k)) {
            char all[512];
            join_keys(keys, all, sizeof all);
            BAD("%s%s%s: unknown key (known: %s)", where, *where ? "." : "", k, all);
        }
    }
    return MOE_OK;
}

static moe_status need_object(json_t *v, const char *where)
{
    if (v && !json_is_object(v))
        BAD("%s: must be a JSON object", where);
    return MOE_OK;
}

int64_t sweep_budget_steps(double flops, double flops_per_token, int64_t tokens_per_step)
{
    const double per_step = flops_per_token * (double)tokens_per_step;
    if (!(flops > 0) || !(per_step > 0))
        return 0;
    const double steps = flops / per_step;
    if (steps < 0.5)
        return 0;
    return steps > 1e15 ? (int64_t)1e15 : llround(steps);
}

sweep_run *sweep_find(sweep_spec *s, const char *name)
{
    for (int i = 0; i < s->n; i++)
        if (!strcmp(s->runs[i].name, name))
            return &s->runs[i];
    return NULL;
}

void sweep_spec_free(sweep_spec *s)
{
    for (int i = 0; i < s->n; i++) {
        free(s->runs[i].cfg_json);
        json_decref(s->runs[i].grid);
        json_decref(s->runs[i].record);
    }
    free(s->runs);
    free(s->text);
    memset(s, 0, sizeof *s);
}

/* ---- the model ------------------------------------------------------------------------ */

/* The starting config of a run (preset or config at the run's level, else the top level's,
 * else laptop) as a JSON object. */
static moe_status base_model(json_t *top, json_t *run, const char *where, json_t **out)
{
    json_t *src = run && (json_object_get(run, "preset") || json_object_get(run, "config")) ? run : top;
    json_t *preset = json_object_get(src, "preset"), *config = json_object_get(src, "config");
    const char *lvl = src == run ? where : "the top level";
    if (preset && config)
        BAD("%s: give \"preset\" or \"config\", not both", lvl);
    if ((preset && !json_is_string(preset)) || (config && !json_is_string(config)))
        BAD("%s.%s: must be a string (a preset name or a config file)", lvl, preset ? "preset" : "config");
    moe_model_config c;
    char src_name[4200];
    moe_status s = config ? moe_model_config_load(json_string_value(config), &c)
                          : cli_preset_load(preset ? json_string_value(preset) : "laptop", &c, src_name,
                                            sizeof src_name);
    if (s) {
        char msg[1024];
        snprintf(msg, sizeof msg, "%s", moe_last_error());
        BAD("%s.%s: %s", lvl, config ? "config" : "preset", msg);
    }
    char *text;
    if ((s = moe_model_config_to_json(&c, 0, &text)))
        return s;
    *out = json_loads(text, 0, NULL);
    free(text);
    return *out ? MOE_OK : moe_error(MOE_ERR_NOMEM, "out of memory");
}

/* Overlays the keys of o (a "model" object, may be NULL) onto m. */
static moe_status overlay(json_t *m, json_t *o, const char *where)
{
    moe_status s = need_object(o, where);
    if (s || !o)
        return s;
    return json_object_update(m, o) ? moe_error(MOE_ERR_NOMEM, "out of memory") : MOE_OK;
}

/* ---- the settings --------------------------------------------------------------------- */

typedef struct {
    moe_train_settings t;
    int have_steps, have_seq, have_warmup, have_evals, have_eval_every, have_save_every, have_data, have_threads;
    int64_t warmup, evals;
} settings;

static moe_status int_value(json_t *v, const char *where, const char *k, int64_t lo, int64_t *out)
{
    if (!json_is_integer(v) || json_integer_value(v) < lo)
        BAD("%s.%s: must be an integer >= %lld", where, k, (long long)lo);
    *out = (int64_t)json_integer_value(v);
    return MOE_OK;
}

/* One setting of "train" (or a grid's "train.k"). */
static moe_status set_train(settings *st, const char *k, json_t *v, const char *where)
{
    moe_train_settings *t = &st->t;
    if (!listed(train_keys, k)) {
        char all[512];
        join_keys(train_keys, all, sizeof all);
        BAD("%s.%s: unknown key (known: %s)", where, k, all);
    }
    int64_t x = 0;
    moe_status s = MOE_OK;
    if (!strcmp(k, "lr")) {
        if (!json_is_number(v) || !(json_number_value(v) > 0))
            BAD("%s.lr: must be a number > 0", where);
        t->oc.lr = json_number_value(v);
    } else if (!strcmp(k, "data") || !strcmp(k, "backend")) {
        if (!json_is_string(v) || !json_string_length(v))
            BAD("%s.%s: must be a non-empty string", where, k);
        const char *str = json_string_value(v);
        char *dst = !strcmp(k, "data") ? t->data : t->backend;
        const size_t cap = !strcmp(k, "data") ? sizeof t->data : sizeof t->backend;
        if (strlen(str) >= cap)
            BAD("%s.%s: '%s' is too long", where, k, str);
        snprintf(dst, cap, "%s", str);
        st->have_data |= !strcmp(k, "data");
    } else if (!strcmp(k, "steps")) {
        s = int_value(v, where, k, 1, &t->steps);
        st->have_steps = 1;
    } else if (!strcmp(k, "batch")) {
        s = int_value(v, where, k, 1, &t->batch);
    } else if (!strcmp(k, "seq")) {
        s = int_value(v, where, k, 1, &t->seq);
        st->have_seq = 1;
    } else if (!strcmp(k, "accum")) {
        s = int_value(v, where, k, 1, &t->accum);
    } else if (!strcmp(k, "warmup")) {
        s = int_value(v, where, k, 0, &st->warmup);
        st->have_warmup = 1;
    } else if (!strcmp(k, "seed")) {
        s = int_value(v, where, k, 0, &x);
        t->seed = (uint64_t)x;
    } else if (!strcmp(k, "evals")) {
        s = int_value(v, where, k, 1, &st->evals);
        st->have_evals = 1;
    } else if (!strcmp(k, "eval_every")) {
        s = int_value(v, where, k, 0, &t->eval_every);
        st->have_eval_every = 1;
    } else if (!strcmp(k, "eval_batches")) {
        s = int_value(v, where, k, 0, &t->eval_batches);
    } else if (!strcmp(k, "save_every")) {
        s = int_value(v, where, k, 0, &t->save_every);
        st->have_save_every = 1;
    } else if (!strcmp(k, "keep")) {
        s = int_value(v, where, k, 0, &t->keep);
    } else if (!strcmp(k, "threads")) {
        s = int_value(v, where, k, 0, &t->threads);
        st->have_threads = 1;
    }
    return s;
}

static moe_status apply_train(settings *st, json_t *o, const char *where)
{
    moe_status s = need_object(o, where);
    const char *k;
    json_t *v;
    if (s || !o)
        return s;
    json_object_foreach(o, k, v) {
        if ((s = set_train(st, k, v, where)))
            return s;
    }
    return MOE_OK;
}

/* ---- the grid -------------------------------------------------------------------------- */

typedef struct {
    const char *key; /* "model.x" or "train.x" */
    json_t *values;  /* non-empty array */
} axis;

static moe_status read_grid(json_t *g, axis **out, int *n, int64_t *points)
{
    *out = NULL;
    *n = 0;
    *points = 1;
    moe_status s = need_object(g, "grid");
    if (s || !g)
        return s;
    axis *ax = calloc(json_object_size(g) + 1, sizeof *ax);
    if (!ax)
        return moe_error(MOE_ERR_NOMEM, "out of memory");
    const char *k;
    json_t *v;
    json_object_foreach(g, k, v) {
        if (strncmp(k, "model.", 6) && strncmp(k, "train.", 6)) {
            free(ax);
            BAD("grid.%s: a grid key is \"model.KEY\" or \"train.KEY\"", k);
        }
        if (!json_is_array(v) || json_array_size(v) == 0) {
            free(ax);
            BAD("grid.%s: must be a non-empty array of values", k);
        }
        ax[*n].key = k;
        ax[*n].values = v;
        (*n)++;
        *points *= (int64_t)json_array_size(v);
        if (*points > 10000) {
            free(ax);
            BAD("grid: more than 10000 points");
        }
    }
    *out = ax;
    return MOE_OK;
}

/* The grid value as text for a run name: integers and strings as they are, reals by %g. */
static void value_text(json_t *v, char *buf, size_t n)
{
    if (json_is_integer(v))
        snprintf(buf, n, "%lld", (long long)json_integer_value(v));
    else if (json_is_real(v))
        snprintf(buf, n, "%g", json_real_value(v));
    else if (json_is_string(v))
        snprintf(buf, n, "%s", json_string_value(v));
    else if (json_is_boolean(v))
        snprintf(buf, n, "%s", json_is_true(v) ? "true" : "false");
    else {
        char *d = json_dumps(v, JSON_COMPACT);
        snprintf(buf, n, "%s", d ? d : "?");
        free(d);
        for (char *p = buf; *p; p++) /* [1,2] -> 1_2 */
            if (*p == '[' || *p == ']' || *p == ',' || *p == ' ')
                *p = *p == ',' ? '_' : '-';
    }
}

/* name with {key} placeholders filled from the grid point (key without "model."/"train."),
 * or the values appended when it has none. */
static moe_status run_name(const char *base, json_t *point, const char *where, char *out, size_t n)
{
    char buf[1024] = "";
    size_t len = 0;
    const int templ = strchr(base, '{') != NULL;
    for (const char *p = base; *p && len + 1 < sizeof buf;) {
        if (*p != '{') {
            buf[len++] = *p++;
            continue;
        }
        const char *end = strchr(p, '}');
        if (!end)
            BAD("%s.name: '%s' has a '{' without '}'", where, base);
        char key[128];
        snprintf(key, sizeof key, "%.*s", (int)(end - p - 1), p + 1);
        json_t *v = NULL;
        const char *k;
        json_t *x;
        json_object_foreach(point, k, x) {
            if (!strcmp(k + 6, key) || !strcmp(k, key))
                v = x;
        }
        if (!v)
            BAD("%s.name: '{%s}' is not a grid key", where, key);
        char t[256];
        value_text(v, t, sizeof t);
        len += (size_t)snprintf(buf + len, sizeof buf - len, "%s", t);
        if (len >= sizeof buf)
            len = sizeof buf - 1;
        p = end + 1;
    }
    buf[len] = 0;
    if (!templ) {
        const char *k;
        json_t *x;
        json_object_foreach(point, k, x) {
            char t[256];
            value_text(x, t, sizeof t);
            len = strlen(buf);
            snprintf(buf + len, sizeof buf - len, "%s%s=%s", len ? "-" : "", k + 6, t);
        }
    }
    if (!*buf)
        snprintf(buf, sizeof buf, "run");
    if (strlen(buf) > SWEEP_NAME_MAX)
        BAD("%s: the run name '%s' is longer than %d characters", where, buf, SWEEP_NAME_MAX);
    if (buf[0] == '.')
        BAD("%s: the run name '%s' must not start with '.'", where, buf);
    for (const char *p = buf; *p; p++)
        if (!(*p >= 'a' && *p <= 'z') && !(*p >= 'A' && *p <= 'Z') && !(*p >= '0' && *p <= '9') &&
            !strchr("._=+-", *p))
            BAD("%s: the run name '%s' has '%c': names are directory names, of letters, digits and . _ = + -",
                where, buf, *p);
    snprintf(out, n, "%s", buf);
    return MOE_OK;
}

/* ---- one run -------------------------------------------------------------------------- */

static moe_status absolute_data(char *data, size_t n)
{
    if (!strncmp(data, "synth", 5) && (data[5] == 0 || data[5] == ':'))
        return MOE_OK;
    char *abs = realpath(data, NULL);
    if (!abs)
        BAD("data '%s': %s", data, strerror(errno));
    if (strlen(abs) >= n) {
        free(abs);
        BAD("data '%s': the path is too long", data);
    }
    snprintf(data, n, "%s", abs);
    free(abs);
    return MOE_OK;
}

/* What decides the run's training, hashed: the model config and every setting but threads,
 * keep and save_every (which change no result). */
static void run_key(sweep_run *r)
{
    const moe_train_settings *t = &r->t;
    char buf[8192];
    snprintf(buf, sizeof buf, "steps=%lld batch=%lld seq=%lld accum=%lld lr=%.17g warmup=%lld seed=%llu data=%s "
                              "eval_every=%lld eval_batches=%lld backend=%s",
             (long long)t->steps, (long long)t->batch, (long long)t->seq, (long long)t->accum, t->oc.lr,
             (long long)t->oc.warmup_steps, (unsigned long long)t->seed, t->data, (long long)t->eval_every,
             (long long)t->eval_batches, t->backend);
    uLong c = crc32(0L, Z_NULL, 0);
    c = crc32(c, (const Bytef *)r->cfg_json, (uInt)strlen(r->cfg_json));
    c = crc32(c, (const Bytef *)buf, (uInt)strlen(buf));
    snprintf(r->key, sizeof r->key, "%08lx", (unsigned long)c);
}

static moe_status resolve(sweep_spec *sp, json_t *top, json_t *run, const char *rwhere, json_t *point,
                          const char *base_name, int64_t threads, sweep_run *r)
{
    moe_status s;
    char where[200];
    snprintf(where, sizeof where, "%s", rwhere);
    if ((s = run_name(base_name, point, where, r->name, sizeof r->name)))
        return s;
    if (*rwhere)
        snprintf(r->where, sizeof r->where, "%s (\"%s\")", rwhere, r->name);
    else
        snprintf(r->where, sizeof r->where, "run \"%s\"", r->name);
    r->grid = json_deep_copy(point);
    json_t *m = NULL;
    if ((s = base_model(top, run, where, &m)))
        return s;
    char mw[220];
    snprintf(mw, sizeof mw, "%s%smodel", where, *where ? "." : "");
    s = overlay(m, json_object_get(top, "model"), "model");
    if (!s && run)
        s = overlay(m, json_object_get(run, "model"), mw);
    const char *k;
    json_t *v;
    json_object_foreach(point, k, v) {
        if (!s && !strncmp(k, "model.", 6))
            s = json_object_set(m, k + 6, v) ? moe_error(MOE_ERR_NOMEM, "out of memory") : MOE_OK;
    }
    if (!s) {
        char *text = json_dumps(m, JSON_COMPACT | JSON_PRESERVE_ORDER | JSON_REAL_PRECISION(17));
        s = text ? moe_model_config_from_json(text, &r->cfg) : moe_error(MOE_ERR_NOMEM, "out of memory");
        free(text);
        if (s) {
            char msg[1024];
            snprintf(msg, sizeof msg, "%s", moe_last_error());
            s = moe_error(MOE_ERR_ARG, "%s: model: %s", r->where, strncmp(msg, "config: ", 8) ? msg : msg + 8);
        }
    }
    json_decref(m);
    if (s || (s = moe_model_config_to_json(&r->cfg, 1, &r->cfg_json)))
        return s;

    settings st;
    memset(&st, 0, sizeof st);
    moe_train_settings_default(&st.t);
    st.t.keep = 1;
    st.t.eval_batches = 20;
    char tw[220];
    snprintf(tw, sizeof tw, "%s%strain", where, *where ? "." : "");
    if ((s = apply_train(&st, json_object_get(top, "train"), "train")) ||
        (run && (s = apply_train(&st, json_object_get(run, "train"), tw))))
        return s;
    json_object_foreach(point, k, v) {
        if (!strncmp(k, "train.", 6) && (s = set_train(&st, k + 6, v, "grid.train")))
            return s;
    }
    moe_train_settings *t = &st.t;
    if (threads >= 0)
        t->threads = threads;
    if (!st.have_data && (s = cli_default_data(t->data, sizeof t->data)))
        return s;
    if ((s = absolute_data(t->data, sizeof t->data))) {
        char msg[1024];
        snprintf(msg, sizeof msg, "%s", moe_last_error());
        BAD("%s: train.%s", r->where, msg);
    }
    if (!st.have_seq && t->seq > r->cfg.max_position_embeddings) /* the default fits the model (as cmoe train's) */
        t->seq = r->cfg.max_position_embeddings;
    r->tokens_per_step = t->batch * t->seq * t->accum;
    if (t->seq > r->cfg.max_position_embeddings)
        BAD("%s: train.seq %lld is longer than the model's max_position_embeddings %lld", r->where,
            (long long)t->seq, (long long)r->cfg.max_position_embeddings);
    if ((s = moe_model_info_compute(&r->cfg, t->seq, &r->info)))
        return s;
    r->flops_per_token = r->info.flops_fwdbwd;
    if (sp->budget_flops > 0) {
        if (st.have_steps)
            BAD("%s: train.steps cannot be given with budget.flops (the budget sets every run's steps)", r->where);
        t->steps = sweep_budget_steps(sp->budget_flops, r->flops_per_token, r->tokens_per_step);
        if (t->steps < 1)
            BAD("budget.flops: %g is less than half a step of %s (one step of %lld tokens is %.4g FLOPs)",
                sp->budget_flops, r->where, (long long)r->tokens_per_step,
                r->flops_per_token * (double)r->tokens_per_step);
    }
    if (st.have_evals && st.have_eval_every)
        BAD("%s: train.evals and train.eval_every are exclusive", r->where);
    if (!st.have_eval_every) /* evaluations at evals evenly spaced steps (10 by default) */
        t->eval_every = (t->steps + (st.have_evals ? st.evals : 10) - 1) / (st.have_evals ? st.evals : 10);
    if (!st.have_save_every) /* a checkpoint every quarter: a killed run loses at most that */
        t->save_every = (t->steps + 3) / 4;
    t->oc.warmup_steps = st.have_warmup ? st.warmup : (t->steps / 10 < 100 ? t->steps / 10 : 100);
    t->oc.total_steps = t->steps;
    if ((s = moe_train_settings_validate(t, &r->cfg))) {
        char msg[1024];
        snprintf(msg, sizeof msg, "%s", moe_last_error());
        BAD("%s: train: %s", r->where, msg);
    }
    r->t = *t;
    r->tokens = t->steps * r->tokens_per_step;
    r->train_flops = r->flops_per_token * (double)r->tokens;
    r->experts = r->info.n_moe_layers ? r->cfg.moe.n_experts : 1;
    r->base_params = r->info.active_params_nonembed - r->info.router_params;
    run_key(r);
    return MOE_OK;
}

/* ---- the whole spec ----------------------------------------------------------------- */

static moe_status read_analysis(sweep_spec *s, json_t *a)
{
    moe_status st = need_object(a, "analysis");
    if (st || !a || (st = only_keys(a, analysis_keys, "analysis")))
        return st;
    json_t *v;
    if ((v = json_object_get(a, "baseline"))) {
        if (!json_is_string(v) || strlen(json_string_value(v)) > SWEEP_NAME_MAX)
            BAD("analysis.baseline: must be the name of a run");
        snprintf(s->baseline, sizeof s->baseline, "%s", json_string_value(v));
    }
    if ((v = json_object_get(a, "fit"))) {
        if (!json_is_string(v) || strcmp(json_string_value(v), "clark"))
            BAD("analysis.fit: must be \"clark\" (log L = a·log N + b·log E + c·log N·log E + d)");
        s->fit_clark = 1;
    }
    if ((v = json_object_get(a, "load"))) {
        if (!json_is_boolean(v))
            BAD("analysis.load: must be true or false");
        s->load = json_is_true(v);
    }
    return MOE_OK;
}

static moe_status parse(sweep_spec *s, json_t *top, int64_t threads)
{
    moe_status st;
    if (!json_is_object(top))
        BAD("the top level must be a JSON object");
    if ((st = only_keys(top, top_keys, "")))
        return st;
    json_t *v = json_object_get(top, "description");
    if (v && !json_is_string(v))
        BAD("description: must be a string");
    snprintf(s->description, sizeof s->description, "%s", v ? json_string_value(v) : "");
    if ((st = need_object(json_object_get(top, "train"), "train")) ||
        (st = need_object(json_object_get(top, "model"), "model")) ||
        (st = need_object(json_object_get(top, "budget"), "budget")))
        return st;
    if ((v = json_object_get(top, "budget"))) {
        static const char *const budget_keys[] = {"flops", NULL};
        if ((st = only_keys(v, budget_keys, "budget")))
            return st;
        json_t *f = json_object_get(v, "flops");
        if (!f || !json_is_number(f) || !(json_number_value(f) > 0) || !isfinite(json_number_value(f)))
            BAD("budget.flops: must be a number > 0 (training FLOPs of every run)");
        s->budget_flops = json_number_value(f);
    }
    if ((st = read_analysis(s, json_object_get(top, "analysis"))))
        return st;
    json_t *runs = json_object_get(top, "runs");
    if (runs && (!json_is_array(runs) || json_array_size(runs) == 0))
        BAD("runs: must be a non-empty array of objects");
    axis *ax;
    int nax;
    int64_t points;
    if ((st = read_grid(json_object_get(top, "grid"), &ax, &nax, &points)))
        return st;
    const int64_t nrun = runs ? (int64_t)json_array_size(runs) : 1;
    if (nrun * points > 10000) {
        free(ax);
        BAD("runs x grid: more than 10000 runs");
    }
    s->runs = calloc((size_t)(nrun * points), sizeof *s->runs);
    if (!s->runs) {
        free(ax);
        return moe_error(MOE_ERR_NOMEM, "out of memory");
    }
    for (int64_t i = 0; i < nrun && !st; i++) {
        json_t *run = runs ? json_array_get(runs, (size_t)i) : NULL;
        char where[64] = "";
        if (runs)
            snprintf(where, sizeof where, "runs[%lld]", (long long)i);
        if (runs && !json_is_object(run)) {
            st = moe_error(MOE_ERR_ARG, "%s: must be a JSON object", where);
            break;
        }
        if (run && (st = only_keys(run, run_keys, where)))
            break;
        json_t *nm = run ? json_object_get(run, "name") : NULL;
        if (nm && !json_is_string(nm)) {
            st = moe_error(MOE_ERR_ARG, "%s.name: must be a string", where);
            break;
        }
        char base[128];
        if (nm)
            snprintf(base, sizeof base, "%s", json_string_value(nm));
        else if (runs && nrun > 1)
            snprintf(base, sizeof base, "run%lld", (long long)i);
        else
            base[0] = 0;
        for (int64_t p = 0; p < points && !st; p++) {
            json_t *point = json_object();
            int64_t rest = p;
            for (int a = nax - 1; a >= 0; a--) { /* the last key changes fastest */
                const int64_t nv = (int64_t)json_array_size(ax[a].values);
                json_object_set(point, ax[a].key, json_array_get(ax[a].values, (size_t)(rest % nv)));
                rest /= nv;
            }
            /* in the grid's key order, for names and the report */
            json_t *ordered = json_object();
            for (int a = 0; a < nax; a++)
                json_object_set(ordered, ax[a].key, json_object_get(point, ax[a].key));
            json_decref(point);
            st = resolve(s, top, run, where, ordered, base, threads, &s->runs[s->n]);
            json_decref(ordered);
            if (!st && sweep_find(s, s->runs[s->n].name))
                st = moe_error(MOE_ERR_ARG, "%s: the run name \"%s\" is taken by an earlier run (names must be "
                               "unique: they name the run directories)", where[0] ? where : "grid",
                               s->runs[s->n].name);
            s->n++;
        }
    }
    free(ax);
    if (!st && s->baseline[0] && !sweep_find(s, s->baseline))
        st = moe_error(MOE_ERR_ARG, "analysis.baseline: no run is named \"%s\"", s->baseline);
    return st;
}

moe_status sweep_spec_load(const char *path, int64_t threads, sweep_spec *s)
{
    memset(s, 0, sizeof *s);
    snprintf(s->path, sizeof s->path, "%s", path);
    size_t len;
    moe_status st = moe_read_all(path, "sweep spec", MOE_JSON_MAX, MOE_IN_STREAM, &s->text, &len);
    if (st)
        return st;
    json_error_t err;
    json_t *top = json_loadb(s->text, len, JSON_REJECT_DUPLICATES, &err);
    if (!top)
        return moe_error(MOE_ERR_FORMAT, "%s: invalid JSON at line %d, column %d: %s", path, err.line, err.column,
                         err.text);
    st = parse(s, top, threads);
    json_decref(top);
    if (st) {
        char msg[1536];
        snprintf(msg, sizeof msg, "%s", moe_last_error());
        moe_error(st, "%s: %s", path, msg);
    }
    return st;
}
