/*
 * Checkpoints of the full training state (checkpoint.h). Writing converts nothing the
 * backend holds exactly (F32 for fp32 backends, F64 for double), so a restore puts
 * back the very bits; reading validates all of the file before it touches the model.
 */
#define _POSIX_C_SOURCE 200809L
#include <errno.h>
#include <inttypes.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <jansson.h>

#include "io/checkpoint.h"

#define FMT(...) moe_error(MOE_ERR_FORMAT, __VA_ARGS__)

/* ---- writing --------------------------------------------------------------------- */


/* The whole tensor a (possibly sharded) parameter belongs to. */
void moe_ckpt_full_info(const moe_param_info *p, moe_param_info *full)
{
    *full = *p;
    if (p->shards > 1) {
        full->shape[0] = p->shape[0] * p->shards;
        full->numel = p->numel * p->shards;
        full->shard = 0;
        full->shards = 1;
    }
}

/* The metadata of a checkpoint, and the file written. */
static moe_status finish(moe_st_writer *w, const char *path, const moe_model *m, moe_st_dtype dt,
                         const moe_ckpt_state *st)
{
    char *cfg = NULL, num[32];
    moe_status s = moe_model_config_to_json(moe_model_config_of(m), 0, &cfg);
#define META(k, v) (s = moe_st_writer_add_meta(w, k, v))
    if (s || META("format", MOE_CKPT_FORMAT) || META("dtype", moe_st_dtype_name(dt)) || META("config", cfg) ||
        META("cmoe_version", moe_version()))
        goto done;
    snprintf(num, sizeof num, "%" PRId64, st->step);
    if (META("step", num) || META("data_step", num))
        goto done;
    snprintf(num, sizeof num, "%" PRId64, st->optim_steps);
    if (META("optim_steps", num))
        goto done;
    snprintf(num, sizeof num, "%" PRIu64, st->seed);
    if (META("seed", num) || (st->train_json && META("train", st->train_json)) ||
        (st->state_json && META("state", st->state_json)))
        goto done;
#undef META
    s = moe_st_writer_write(w, path);
done:
    free(cfg);
    return s;
}

/* fp32 whatever the backend computes in (the oracle's f64 excepted): a run saved on a GPU
 * in bf16 resumes on the CPU */
static moe_st_dtype file_type(const moe_model *m)
{
    return moe_model_backend(m)->float_type == MOE_F64 ? MOE_ST_F64 : MOE_ST_F32;
}

/* One tensor of the training state, read from the backend when the file is written. */
typedef struct {
    moe_backend *b;
    moe_tensor t;
    moe_dtype type;
    int64_t n;
} ckpt_tensor;

static moe_status fill_tensor(void *ctx, void *dst)
{
    const ckpt_tensor *x = ctx;
    return x->b->download(x->b, dst, x->type, x->t, x->n);
}

moe_status moe_ckpt_save(const char *path, moe_model *m, moe_optim *o, const moe_ckpt_state *st)
{
    if (!path || !m || !o || !st)
        return moe_error(MOE_ERR_ARG, "checkpoint save: path, model, optimizer and state must not be NULL");
    for (int i = 0; i < moe_model_n_params(m); i++)
        if (moe_model_param(m, i)->shards > 1)
            return moe_error(MOE_ERR_ARG, "checkpoint save: '%s' is a shard: gather it (src/dist/dist_io.h)",
                             moe_model_param(m, i)->name);
    moe_backend *b = moe_model_backend(m);
    const moe_st_dtype dt = file_type(m);
    const int n = moe_model_n_params(m);
    ckpt_tensor *xs = calloc((size_t)(3 * n + 1), sizeof *xs);
    moe_st_writer *w = NULL;
    char name[160];
    moe_status s = xs ? moe_st_writer_create(&w) : moe_error(MOE_ERR_NOMEM, "checkpoint save: out of memory");
    /* lazy: one tensor in host memory at a time; the weights are those the optimizer
     * steps (the fp32 master copy of bf16 parameters), so that a resume continues the run */
    for (int i = 0; i < n && !s; i++) {
        const moe_param_info *p = moe_model_param(m, i);
        ckpt_tensor *x = &xs[3 * i];
        x[0] = x[1] = x[2] = (ckpt_tensor){b, {NULL, 0}, dt == MOE_ST_F64 ? MOE_F64 : MOE_F32, p->numel};
        if ((s = moe_optim_tensors(o, i, &x[0].t, &x[1].t, &x[2].t)) ||
            (s = moe_st_writer_add_lazy(w, p->name, dt, p->ndim, p->shape, fill_tensor, &x[0])))
            break;
        snprintf(name, sizeof name, "optim.m.%s", p->name);
        if ((s = moe_st_writer_add_lazy(w, name, dt, p->ndim, p->shape, fill_tensor, &x[1])))
            break;
        snprintf(name, sizeof name, "optim.v.%s", p->name);
        s = moe_st_writer_add_lazy(w, name, dt, p->ndim, p->shape, fill_tensor, &x[2]);
    }
    if (!s)
        s = finish(w, path, m, dt, st);
    moe_st_writer_free(w);
    free(xs);
    return s;
}

moe_status moe_ckpt_save_with(const char *path, const moe_model *m, moe_ckpt_get_fn get, void *ctx,
                              const moe_ckpt_state *st)
{
    /* get may be collective (a gather over ranks): it is called once per parameter in
     * table order, and the file is assembled in host memory before it is written */
    const moe_st_dtype dt = file_type(m);
    const int n = moe_model_n_params(m);
    int64_t big = 1;
    moe_param_info fi;
    for (int i = 0; i < n; i++) {
        moe_ckpt_full_info(moe_model_param(m, i), &fi);
        big = fi.numel > big ? fi.numel : big;
    }
    double *pv = malloc((size_t)big * sizeof *pv), *mv = malloc((size_t)big * sizeof *mv),
           *vv = malloc((size_t)big * sizeof *vv);
    void *scratch = malloc((size_t)big * 8);
    moe_st_writer *w = NULL;
    char name[160];
    moe_status s = pv && mv && vv && scratch ? moe_st_writer_create(&w)
                                             : moe_error(MOE_ERR_NOMEM, "checkpoint save: out of memory");
    for (int i = 0; i < n && !s; i++) {
        moe_ckpt_full_info(moe_model_param(m, i), &fi);
        if ((s = get(ctx, i, pv, mv, vv)))
            break;
        for (int k = 0; k < 3 && !s; k++) {
            snprintf(name, sizeof name, "%s%s", k == 0 ? "" : k == 1 ? "optim.m." : "optim.v.", fi.name);
            if (!(s = moe_st_from_f64(dt, k == 0 ? pv : k == 1 ? mv : vv, fi.numel, scratch)))
                s = moe_st_writer_add_copy(w, name, dt, fi.ndim, fi.shape, scratch);
        }
    }
    if (!s)
        s = finish(w, path, m, dt, st);
    moe_st_writer_free(w);
    free(pv);
    free(mv);
    free(vv);
    free(scratch);
    return s;
}

/* ---- reading ----------------------------------------------------------------------- */

void moe_ckpt_free(moe_ckpt *c)
{
    if (!c)
        return;
    moe_st_free(c->f);
    free(c->config_json);
    free(c->train_json);
    free(c->state_json);
    free(c);
}

/* A decimal integer in [0, INT64_MAX], digits only. */
static int parse_count(const char *s, uint64_t max, uint64_t *out)
{
    if (!s || !*s || strlen(s) > 20)
        return 0;
    for (const char *p = s; *p; p++)
        if (*p < '0' || *p > '9')
            return 0;
    errno = 0;
    unsigned long long v = strtoull(s, NULL, 10);
    if (errno || v > max)
        return 0;
    *out = v;
    return 1;
}

static moe_status meta_count(const moe_ckpt *c, const char *key, uint64_t max, uint64_t *out)
{
    const char *v = moe_st_meta(c->f, key);
    if (!v)
        return FMT("%s: not a complete checkpoint: metadata '%s' is missing", c->f->path, key);
    if (!parse_count(v, max, out))
        return FMT("%s: metadata '%s' = '%.40s' is not a whole number in [0, %llu]", c->f->path, key, v,
                   (unsigned long long)max);
    return MOE_OK;
}

/* An optional metadata value that must be a JSON object; copied into *out. */
static moe_status meta_object(const moe_ckpt *c, const char *key, char **out)
{
    const char *v = moe_st_meta(c->f, key);
    *out = NULL;
    if (!v)
        return MOE_OK;
    json_error_t err;
    json_t *j = json_loads(v, JSON_REJECT_DUPLICATES, &err);
    int ok = j && json_is_object(j);
    json_decref(j);
    if (!ok)
        return FMT("%s: metadata '%s' is not a JSON object%s%s", c->f->path, key, j ? "" : ": ", j ? "" : err.text);
    if (!(*out = strdup(v)))
        return moe_error(MOE_ERR_NOMEM, "out of memory");
    return MOE_OK;
}

static moe_status open_meta(moe_ckpt *c)
{
    const char *path = c->f->path;
    const char *fmt = moe_st_meta(c->f, "format");
    if (!fmt)
        return FMT("%s: not a cmoe checkpoint: metadata 'format' is missing (a weights-only file? resume needs a "
                   "ckpt-STEP.safetensors written by --save-every)", path);
    if (!strcmp(fmt, "cmoe-weights-1"))
        return FMT("%s: a weights-only file (model.safetensors), not a checkpoint: resume needs a "
                   "ckpt-STEP.safetensors written by --save-every", path);
    if (strcmp(fmt, MOE_CKPT_FORMAT))
        return FMT("%s: checkpoint format '%.40s' is not supported (this cmoe reads %s)", path, fmt,
                   MOE_CKPT_FORMAT);
    if (!moe_st_meta(c->f, "crc32"))
        return FMT("%s: metadata 'crc32' is missing: the data cannot be verified", path);
    const char *dt = moe_st_meta(c->f, "dtype");
    if (!dt)
        return FMT("%s: not a complete checkpoint: metadata 'dtype' is missing", path);
    if (strcmp(dt, "F32") && strcmp(dt, "F64"))
        return FMT("%s: metadata dtype '%.20s' must be F32 or F64", path, dt);
    c->dtype = strcmp(dt, "F32") ? MOE_ST_F64 : MOE_ST_F32;
    uint64_t step, t, ds, seed;
    moe_status s;
    if ((s = meta_count(c, "step", INT64_MAX, &step)) || (s = meta_count(c, "optim_steps", INT64_MAX, &t)) ||
        (s = meta_count(c, "data_step", INT64_MAX, &ds)) || (s = meta_count(c, "seed", UINT64_MAX, &seed)))
        return s;
    if (t > step)
        return FMT("%s: metadata optim_steps %llu exceeds step %llu (one optimizer step per training step)", path,
                   (unsigned long long)t, (unsigned long long)step);
    if (ds != step)
        return FMT("%s: metadata data_step %llu differs from step %llu (batches are keyed by the step)", path,
                   (unsigned long long)ds, (unsigned long long)step);
    c->step = (int64_t)step;
    c->optim_steps = (int64_t)t;
    c->data_step = (int64_t)ds;
    c->seed = seed;
    const char *cfg = moe_st_meta(c->f, "config");
    if (!cfg)
        return FMT("%s: not a complete checkpoint: metadata 'config' is missing", path);
    moe_model_config_default(&c->cfg);
    if ((s = moe_model_config_from_json(cfg, &c->cfg)) || (s = moe_model_config_validate(&c->cfg))) {
        /* moe_error formats into the buffer moe_last_error returns: copy it first */
        char why[1024];
        snprintf(why, sizeof why, "%s", moe_last_error());
        return FMT("%s: metadata 'config': %s", path, why);
    }
    if (!(c->config_json = strdup(cfg)))
        return moe_error(MOE_ERR_NOMEM, "out of memory");
    if ((s = meta_object(c, "train", &c->train_json)) || (s = meta_object(c, "state", &c->state_json)))
        return s;
    for (int i = 0; i < c->f->n; i++)
        if (c->f->tensors[i].dtype != c->dtype)
            return FMT("%s: tensor '%s' has dtype %s but the checkpoint's dtype is %s", path, c->f->tensors[i].name,
                       moe_st_dtype_name(c->f->tensors[i].dtype), moe_st_dtype_name(c->dtype));
    return MOE_OK;
}

moe_status moe_ckpt_open(const char *path, moe_ckpt **out)
{
    if (!out || !path)
        return moe_error(MOE_ERR_ARG, "checkpoint open: path and out must not be NULL");
    *out = NULL;
    moe_ckpt *c = calloc(1, sizeof *c);
    if (!c)
        return moe_error(MOE_ERR_NOMEM, "out of memory");
    moe_status s = moe_st_read(path, &c->f);
    if (!s)
        s = open_meta(c);
    if (s) {
        moe_ckpt_free(c);
        return s;
    }
    *out = c;
    return MOE_OK;
}

/* ---- against the model ------------------------------------------------------------- */

/* The first key whose value differs between two config JSON texts, for the message. */
static void config_diff(const char *a, const char *b, char *buf, size_t n)
{
    json_t *ja = json_loads(a, 0, NULL), *jb = json_loads(b, 0, NULL);
    snprintf(buf, n, "?");
    const char *key;
    json_t *v;
    if (ja && jb) {
        json_object_foreach(ja, key, v) {
            json_t *w = json_object_get(jb, key);
            if (!w || !json_equal(v, w)) {
                char *sa = json_dumps(v, JSON_ENCODE_ANY | JSON_COMPACT), *sb = w ? json_dumps(w, JSON_ENCODE_ANY | JSON_COMPACT) : NULL;
                snprintf(buf, n, "%s: %.60s here, %.60s in the model", key, sa ? sa : "?", sb ? sb : "absent");
                free(sa);
                free(sb);
                break;
            }
        }
    }
    json_decref(ja);
    json_decref(jb);
}

static moe_status check_values(const moe_ckpt *c, const moe_st_tensor *t)
{
    for (int64_t i = 0; i < t->numel; i++) {
        double x;
        if (c->dtype == MOE_ST_F64) {
            memcpy(&x, (const uint8_t *)t->data + 8 * i, 8);
        } else {
            float f;
            memcpy(&f, (const uint8_t *)t->data + 4 * i, 4);
            x = f;
        }
        if (!isfinite(x))
            return FMT("%s: tensor '%s' element %lld is %g (not finite: the run had diverged or the file is corrupt)",
                       c->f->path, t->name, (long long)i, x);
    }
    return MOE_OK;
}

static moe_status check_tensor(const moe_ckpt *c, const char *name, const moe_param_info *shard)
{
    moe_param_info full, *p = &full; /* a checkpoint holds whole tensors, whatever the layout */
    moe_ckpt_full_info(shard, &full);
    const moe_st_tensor *t = moe_st_find(c->f, name);
    if (!t)
        return FMT("%s: tensor '%s' is missing (the model has parameter '%s')", c->f->path, name, p->name);
    int ok = t->ndim == p->ndim;
    for (int d = 0; ok && d < p->ndim; d++)
        ok = t->shape[d] == p->shape[d];
    if (!ok) {
        char have[96], want[96];
        moe_st_shape_str(t->ndim, t->shape, have, sizeof have);
        moe_st_shape_str(p->ndim, p->shape, want, sizeof want);
        return FMT("%s: tensor '%s' has shape %s but the config gives %s", c->f->path, name, have, want);
    }
    return check_values(c, t);
}

moe_status moe_ckpt_check(const moe_ckpt *c, const moe_model *m)
{
    if (!c || !m)
        return moe_error(MOE_ERR_ARG, "checkpoint check: checkpoint and model must not be NULL");
    char *mine = NULL, diff[200];
    moe_status s = moe_model_config_to_json(moe_model_config_of(m), 0, &mine);
    if (s)
        return s;
    char *theirs = NULL;
    if ((s = moe_model_config_to_json(&c->cfg, 0, &theirs))) {
        free(mine);
        return s;
    }
    if (strcmp(mine, theirs)) {
        config_diff(theirs, mine, diff, sizeof diff);
        s = FMT("%s: the checkpoint's config does not match the model (%s)", c->f->path, diff);
    }
    free(mine);
    free(theirs);
    if (s)
        return s;
    const int n = moe_model_n_params(m);
    char name[160];
    for (int i = 0; i < n; i++) {
        const moe_param_info *p = moe_model_param(m, i);
        if ((s = check_tensor(c, p->name, p)))
            return s;
        snprintf(name, sizeof name, "optim.m.%s", p->name);
        if ((s = check_tensor(c, name, p)))
            return s;
        snprintf(name, sizeof name, "optim.v.%s", p->name);
        if ((s = check_tensor(c, name, p)))
            return s;
    }
    /* every tensor is one of the 3n checked above unless there are more */
    if (c->f->n != 3 * n) {
        for (int i = 0; i < c->f->n; i++) {
            const char *tn = c->f->tensors[i].name;
            const char *base = !strncmp(tn, "optim.m.", 8) || !strncmp(tn, "optim.v.", 8) ? tn + 8 : tn;
            if (moe_model_param_index(m, base) < 0)
                return FMT("%s: unexpected tensor '%s' (not a parameter of the model its config describes, nor "
                           "a moment of one)", c->f->path, tn);
        }
        return FMT("%s: %d tensors, expected %d", c->f->path, c->f->n, 3 * n);
    }
    return MOE_OK;
}


/* The elements [lo, hi) of a parameter's whole tensor v (host) into the optimizer's fp32
 * master copy of them, when it keeps one apart from the parameter. */
static moe_status put_master(moe_model *m, moe_optim *o, int i, const double *v)
{
    moe_tensor w, p;
    int64_t lo, hi;
    moe_status s = moe_optim_tensors(o, i, &w, NULL, NULL);
    if (s || (s = moe_model_param_tensors(m, i, &p, NULL)) || (w.buf == p.buf && w.off == p.off))
        return s;
    moe_optim_part(o, i, &lo, &hi);
    return hi > lo ? moe_upload_f64(moe_model_backend(m), w, v + lo, hi - lo) : MOE_OK;
}

moe_status moe_ckpt_restore(const moe_ckpt *c, moe_model *m, moe_optim *o)
{
    moe_status s = moe_ckpt_check(c, m); /* all of the file, before anything is touched */
    if (s)
        return s;
    const int n = moe_model_n_params(m);
    int64_t big = 1;
    moe_param_info fi;
    for (int i = 0; i < n; i++) {
        moe_ckpt_full_info(moe_model_param(m, i), &fi);
        big = fi.numel > big ? fi.numel : big;
    }
    /* one whole tensor at a time (a shard takes its slice), never the model */
    double *pv = malloc((size_t)big * sizeof *pv), *mv = malloc((size_t)big * sizeof *mv),
           *vv = malloc((size_t)big * sizeof *vv);
    char name[160];
    if (!pv || !mv || !vv)
        s = moe_error(MOE_ERR_NOMEM, "checkpoint restore: out of memory for a tensor of %lld elements", (long long)big);
    if (!s && o) /* first: the steps decide whether the weights have an fp32 master copy yet */
        moe_optim_set_steps(o, c->optim_steps);
    for (int i = 0; i < n && !s; i++) {
        const moe_param_info *p = moe_model_param(m, i);
        const int64_t at = p->shard * p->numel;
        if ((s = moe_st_tensor_f64(c->f, moe_st_find(c->f, p->name), pv)) ||
            (s = moe_model_set_param(m, i, pv + at)) || !o || (s = put_master(m, o, i, pv + at)))
            continue;
        snprintf(name, sizeof name, "optim.m.%s", p->name);
        if ((s = moe_st_tensor_f64(c->f, moe_st_find(c->f, name), mv)))
            break;
        snprintf(name, sizeof name, "optim.v.%s", p->name);
        if ((s = moe_st_tensor_f64(c->f, moe_st_find(c->f, name), vv)) ||
            (s = moe_optim_set_moments(o, i, mv + at, vv + at)))
            break;
    }
    free(pv);
    free(mv);
    free(vv);
    return s;
}
