/*
 * AdamW over the model's parameter table (model.h): moments in two backend buffers laid
 * out like the table (f32, or the backend's float type when it computes in f64), and
 * master weights of their own when the parameters are stored narrower (bf16). The
 * global-norm clip is summed on the backend in table order (the same on every run) and
 * applied there, so a step never waits for the host; the warmup + cosine schedule is a
 * pure function of the step.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "model/model.h"

struct moe_optim {
    moe_model *m;
    moe_optim_config c;
    int64_t t;           /* steps taken */
    moe_buf *mbuf, *vbuf, *wbuf; /* moments; master weights (NULL: the parameters are their own) */
    int64_t *off;        /* [n params + 1] offset of each parameter's part in mbuf / vbuf */
    int64_t *lo, *hi;    /* [n params] the elements of each parameter this rank updates */
    moe_optim_dist dist; /* .sumsq NULL: one process's step */
    int n;
};

void moe_optim_config_default(moe_optim_config *o)
{
    memset(o, 0, sizeof *o);
    o->lr = 3e-3;
    o->min_lr_ratio = 0.1;
    o->beta1 = 0.9;
    o->beta2 = 0.95;
    o->eps = 1e-8;
    o->weight_decay = 0.1;
    o->grad_clip = 1.0;
}

moe_status moe_optim_config_validate(const moe_optim_config *o)
{
#define BAD(...) return moe_error(MOE_ERR_ARG, __VA_ARGS__)
    if (!o)
        BAD("optimizer: no configuration");
    /* AdamW moves every weight by about lr per step, whatever the gradient's scale, so a
     * rate above 1 is no schedule at all (and 1e308 overflows the first update) */
    if (!(o->lr >= 0 && o->lr <= 1))
        BAD("optimizer: lr (--lr) must be in [0, 1] (AdamW moves each weight by about lr per step; got %g)", o->lr);
    if (!isfinite(o->min_lr_ratio) || o->min_lr_ratio < 0 || o->min_lr_ratio > 1)
        BAD("optimizer: min_lr_ratio must be in [0, 1] (got %g)", o->min_lr_ratio);
    if (o->warmup_steps < 0 || o->total_steps < 0)
        BAD("optimizer: warmup_steps and total_steps must be >= 0");
    if (!(o->beta1 >= 0 && o->beta1 < 1) || !(o->beta2 >= 0 && o->beta2 < 1))
        BAD("optimizer: beta1 and beta2 must be in [0, 1) (got %g, %g)", o->beta1, o->beta2);
    if (!(o->eps > 0 && o->eps <= 1))
        BAD("optimizer: eps must be in (0, 1] (1e-8 is usual; got %g)", o->eps);
    /* decoupled decay multiplies the weights by 1 − lr·weight_decay each step */
    if (!(o->weight_decay >= 0 && o->weight_decay * o->lr <= 1))
        BAD("optimizer: weight_decay must be >= 0 with lr·weight_decay <= 1 (got %g, lr %g)", o->weight_decay, o->lr);
    if (!isfinite(o->grad_clip))
        BAD("optimizer: grad_clip must be finite (<= 0: off; got %g)", o->grad_clip);
#undef BAD
    return MOE_OK;
}

double moe_lr_at(const moe_optim_config *o, int64_t step)
{
    if (step < 0)
        step = 0;
    if (o->warmup_steps > 0 && step < o->warmup_steps)
        return o->lr * (double)(step + 1) / (double)o->warmup_steps;
    if (o->total_steps <= o->warmup_steps)
        return o->lr;
    double p = (double)(step - o->warmup_steps) / (double)(o->total_steps - o->warmup_steps);
    if (p > 1)
        p = 1;
    const double lo = o->min_lr_ratio * o->lr;
    return lo + 0.5 * (1.0 + cos(3.14159265358979323846 * p)) * (o->lr - lo);
}

moe_status moe_optim_create(moe_model *m, const moe_optim_config *c, moe_optim **out)
{
    return moe_optim_create_dist(m, c, NULL, out);
}

moe_status moe_optim_create_dist(moe_model *m, const moe_optim_config *c, const moe_optim_dist *d, moe_optim **out)
{
    if (!out)
        return moe_error(MOE_ERR_ARG, "optimizer: out must not be NULL");
    *out = NULL;
    if (!m)
        return moe_error(MOE_ERR_ARG, "optimizer: model must not be NULL");
    moe_status s = moe_optim_config_validate(c);
    if (s)
        return s;
    moe_optim *o = calloc(1, sizeof *o);
    if (!o)
        return moe_error(MOE_ERR_NOMEM, "optimizer: out of memory");
    o->m = m;
    o->c = *c;
    o->n = moe_model_n_params(m);
    if (d)
        o->dist = *d;
    o->off = calloc((size_t)o->n + 1, sizeof *o->off);
    o->lo = calloc((size_t)o->n + 1, sizeof *o->lo);
    o->hi = calloc((size_t)o->n + 1, sizeof *o->hi);
    if (!o->off || !o->lo || !o->hi) {
        moe_optim_free(o);
        return moe_error(MOE_ERR_NOMEM, "optimizer: out of memory");
    }
    for (int i = 0; i < o->n; i++) {
        const int64_t numel = moe_model_param(m, i)->numel;
        o->lo[i] = d && d->lo ? d->lo[i] : 0;
        o->hi[i] = d && d->hi ? d->hi[i] : numel;
        if (o->lo[i] < 0 || o->hi[i] < o->lo[i] || o->hi[i] > numel) {
            moe_optim_free(o);
            return moe_error(MOE_ERR_ARG, "optimizer: part [%lld, %lld) of parameter %d outside [0, %lld]",
                             (long long)o->lo[i], (long long)o->hi[i], i, (long long)numel);
        }
        o->off[i + 1] = o->off[i] + o->hi[i] - o->lo[i];
    }
    moe_backend *b = moe_model_backend(m);
    /* optimizer state in f32 at least (the oracle keeps its f64) */
    const moe_dtype st = b->float_type == MOE_F64 ? MOE_F64 : MOE_F32;
    moe_tensor p0;
    moe_model_param_tensors(m, 0, &p0, NULL);
    const int narrow = o->n > 0 && b->dtype(b, p0.buf) != st;
    const int64_t total = o->off[o->n] > 0 ? o->off[o->n] : 1; /* a rank's part may be empty */
    if ((s = b->alloc(b, st, total, &o->mbuf)) || (s = b->alloc(b, st, total, &o->vbuf)) ||
        (narrow && (s = b->alloc(b, st, total, &o->wbuf)))) {
        moe_optim_free(o);
        return s;
    }
    for (int i = 0; narrow && i < o->n; i++) { /* the master weights start as the parameters */
        moe_tensor p;
        moe_model_param_tensors(m, i, &p, NULL);
        b->copy(b, (moe_tensor){o->wbuf, o->off[i]}, moe_tensor_at(p, o->lo[i]), o->off[i + 1] - o->off[i]);
    }
    *out = o;
    return MOE_OK;
}

void moe_optim_free(moe_optim *o)
{
    if (!o)
        return;
    moe_backend *b = moe_model_backend(o->m);
    if (o->mbuf)
        b->free(b, o->mbuf);
    if (o->vbuf)
        b->free(b, o->vbuf);
    if (o->wbuf)
        b->free(b, o->wbuf);
    free(o->off);
    free(o->lo);
    free(o->hi);
    free(o);
}

int64_t moe_optim_numel(const moe_optim *o)
{
    return o->off[o->n];
}

void moe_optim_part(const moe_optim *o, int i, int64_t *lo, int64_t *hi)
{
    *lo = i >= 0 && i < o->n ? o->lo[i] : 0;
    *hi = i >= 0 && i < o->n ? o->hi[i] : 0;
}

moe_status moe_optim_step(moe_optim *o, double grad_scale, moe_optim_result *r)
{
    if (!o || !isfinite(grad_scale) || grad_scale <= 0)
        return moe_error(MOE_ERR_ARG, "optimizer step: grad_scale must be a finite number > 0 (got %g)", grad_scale);
    moe_backend *b = moe_model_backend(o->m);
    if (o->wbuf && o->t == 0) /* nothing stepped yet: the master weights are the parameters as they are now, */
        for (int i = 0; i < o->n; i++) { /* however they were set after the optimizer was made (init, a load) */
            moe_tensor p;
            moe_model_param_tensors(o->m, i, &p, NULL);
            b->copy(b, (moe_tensor){o->wbuf, o->off[i]}, moe_tensor_at(p, o->lo[i]), o->off[i + 1] - o->off[i]);
        }
    moe_tensor sumsq = moe_model_scalar(o->m, MOE_SCALAR_GRAD_SUMSQ), scale = moe_model_scalar(o->m, MOE_SCALAR_CLIP);
    b->fill(b, sumsq, 0.0, 1);
    moe_status s;
    if (o->dist.sumsq && (s = o->dist.sumsq(o->dist.ctx, sumsq)))
        return s;
    for (int i = 0; !o->dist.sumsq && i < o->n; i++) { /* in table order: the same sum on every run */
        moe_tensor g;
        moe_model_param_tensors(o->m, i, NULL, &g);
        b->grad_sumsq(b, sumsq, g, moe_model_param(o->m, i)->numel);
    }
    /* grad_scale · the clip factor, or NaN when the norm is not finite: AdamW then skips */
    b->clip_scale(b, scale, sumsq, grad_scale, o->c.grad_clip);
    const double lr = moe_lr_at(&o->c, o->t);
    const int64_t t = o->t + 1;
    for (int i = 0; i < o->n; i++) {
        const moe_param_info *p = moe_model_param(o->m, i);
        const int64_t lo = o->lo[i], n = o->hi[i] - o->lo[i];
        moe_tensor pt, g, w = {o->wbuf, o->off[i]};
        moe_model_param_tensors(o->m, i, &pt, &g);
        if (n > 0) /* AdamW is elementwise: a part updates as it would in the whole */
            b->adamw_step(b, moe_tensor_at(pt, lo), o->wbuf ? &w : NULL, (moe_tensor){o->mbuf, o->off[i]},
                          (moe_tensor){o->vbuf, o->off[i]}, moe_tensor_at(g, lo), scale, lr, o->c.beta1, o->c.beta2,
                          o->c.eps, p->decay ? o->c.weight_decay : 0.0, t, n);
    }
    if (o->dist.gather && (s = o->dist.gather(o->dist.ctx)))
        return s;
    o->t = t;
    moe_model_update_bias(o->m);
    if (!r)
        return MOE_OK;
    s = moe_model_read_scalars(o->m);
    if (s)
        return s;
    const double norm = grad_scale * sqrt(moe_model_host_scalar(o->m, MOE_SCALAR_GRAD_SUMSQ));
    if (!isfinite(norm))
        o->t = t - 1; /* AdamW left the parameters and moments as they were */
    r->lr = lr;
    r->grad_norm = norm;
    r->clip_scale = moe_model_host_scalar(o->m, MOE_SCALAR_CLIP) / grad_scale;
    return MOE_OK;
}

int64_t moe_optim_steps(const moe_optim *o)
{
    return o->t;
}

void moe_optim_set_steps(moe_optim *o, int64_t t)
{
    o->t = t < 0 ? 0 : t;
}

const moe_optim_config *moe_optim_config_of(const moe_optim *o)
{
    return &o->c;
}

moe_status moe_optim_set_config(moe_optim *o, const moe_optim_config *c)
{
    moe_status s = moe_optim_config_validate(c);
    if (!s)
        o->c = *c;
    return s;
}

moe_status moe_optim_tensors(moe_optim *o, int i, moe_tensor *weights, moe_tensor *m, moe_tensor *v)
{
    if (!o || i < 0 || i >= o->n)
        return moe_error(MOE_ERR_ARG, "optimizer: parameter index %d outside [0, %d)", i, o ? o->n : 0);
    if (weights) { /* until the first step the parameters are authoritative (moe_optim_step) */
        if (o->wbuf && o->t > 0) {
            *weights = (moe_tensor){o->wbuf, o->off[i]};
        } else {
            moe_model_param_tensors(o->m, i, weights, NULL);
            *weights = moe_tensor_at(*weights, o->lo[i]);
        }
    }
    if (m)
        *m = (moe_tensor){o->mbuf, o->off[i]};
    if (v)
        *v = (moe_tensor){o->vbuf, o->off[i]};
    return MOE_OK;
}

moe_status moe_optim_get_weights(moe_optim *o, int i, double *w)
{
    moe_tensor t;
    moe_status s = moe_optim_tensors(o, i, &t, NULL, NULL);
    const int64_t n = s ? 0 : o->hi[i] - o->lo[i];
    return s || !n ? s : moe_download_f64(moe_model_backend(o->m), w + o->lo[i], t, n);
}

moe_status moe_optim_get_moments(moe_optim *o, int i, double *m, double *v)
{
    if (!o || i < 0 || i >= o->n)
        return moe_error(MOE_ERR_ARG, "optimizer: parameter index %d outside [0, %d)", i, o ? o->n : 0);
    moe_backend *b = moe_model_backend(o->m);
    const int64_t n = o->off[i + 1] - o->off[i], lo = o->lo[i];
    moe_status s = m && n ? moe_download_f64(b, m + lo, (moe_tensor){o->mbuf, o->off[i]}, n) : MOE_OK;
    return s || !v || !n ? s : moe_download_f64(b, v + lo, (moe_tensor){o->vbuf, o->off[i]}, n);
}

moe_status moe_optim_set_moments(moe_optim *o, int i, const double *m, const double *v)
{
    if (!o || i < 0 || i >= o->n)
        return moe_error(MOE_ERR_ARG, "optimizer: parameter index %d outside [0, %d)", i, o ? o->n : 0);
    moe_backend *b = moe_model_backend(o->m);
    const int64_t n = o->off[i + 1] - o->off[i], lo = o->lo[i];
    moe_status s = m && n ? moe_upload_f64(b, (moe_tensor){o->mbuf, o->off[i]}, m + lo, n) : MOE_OK;
    return s || !v || !n ? s : moe_upload_f64(b, (moe_tensor){o->vbuf, o->off[i]}, v + lo, n);
}

