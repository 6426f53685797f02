/*
 * The ref backend: the oracle behind the backend table. Buffers are plain arrays of
 * double and every op calls its twin in ref/, so `--backend ref` runs exactly the
 * reference and any other backend can be compared with it op by op.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "ref/moa.h"
#include "ref/model_ops.h"
#include "ref/ref.h"
#include "ref/ref_backend.h"

struct moe_bplan {
    moe_plan *p;
    int64_t T, k; /* as allocated: moe_ref_route sizes its [T, k] arrays from the plan's T·k on entry */
};

struct moe_event {
    int unused;
};

static moe_status ref_alloc(moe_backend *b, moe_dtype t, int64_t n, moe_buf **out)
{
    *out = NULL;
    if (t != MOE_F64 && t != MOE_I32)
        return moe_error(MOE_ERR_ARG, "ref backend: buffers hold f64 or i32, not %s (the oracle computes in double)",
                         moe_dtype_name(t));
    if (n < 0 || (uint64_t)n > SIZE_MAX / sizeof(double))
        return moe_error(MOE_ERR_ARG, "ref backend: cannot allocate %lld elements", (long long)n);
    const int64_t mem = moe_host_memory();
    if ((uint64_t)n > SIZE_MAX / sizeof(double) || (mem > 0 && (double)n * sizeof(double) > (double)mem))
        return moe_error(MOE_ERR_NOMEM, "ref backend: %lld doubles (%.3g GiB) are more than this machine's memory "
                         "(%.3g GiB)", (long long)n, (double)n * sizeof(double) / (1 << 30), (double)mem / (1 << 30));
    moe_buf *buf = malloc(sizeof *buf);
    void *d = calloc(n ? (size_t)n : 1, moe_dtype_size(t));
    if (!buf || !d) {
        free(buf);
        free(d);
        return moe_error(MOE_ERR_NOMEM, "ref backend: out of memory for %lld doubles (%.3g GiB)", (long long)n,
                         (double)n * sizeof(double) / (1 << 30));
    }
    buf->type = t;
    buf->n = n;
    buf->d = d;
    *out = buf;
    return MOE_OK;
}

static void ref_free(moe_backend *b, moe_buf *buf)
{
    if (buf) {
        free(buf->d);
        free(buf);
    }
}

static moe_dtype ref_dtype(moe_backend *b, const moe_buf *buf)
{
    return buf->type;
}

static moe_status check_range(moe_tensor t, int64_t n, const char *what)
{
    if (!t.buf || t.off < 0 || n < 0 || t.off > t.buf->n - n)
        return moe_error(MOE_ERR_ARG, "ref backend: %s of %lld elements at %lld is outside the buffer", what,
                         (long long)n, (long long)t.off);
    return MOE_OK;
}

static void *at(moe_tensor t)
{
    return (char *)t.buf->d + (size_t)t.off * moe_dtype_size(t.buf->type);
}

static moe_status ref_upload(moe_backend *b, moe_tensor dst, const void *src, moe_dtype st, int64_t n)
{
    moe_status s = check_range(dst, n, "upload");
    return s ? s : moe_convert(at(dst), dst.buf->type, src, st, n);
}

static moe_status ref_download(moe_backend *b, void *dst, moe_dtype dt, moe_tensor src, int64_t n)
{
    moe_status s = moe_backend_take_error(b);
    if (s == MOE_OK)
        s = check_range(src, n, "download");
    return s ? s : moe_convert(dst, dt, at(src), src.buf->type, n);
}

static void ref_fill(moe_backend *b, moe_tensor t, double v, int64_t n)
{
    double *d = D(t);
    for (int64_t i = 0; i < n; i++)
        d[i] = v;
}

static void ref_copy(moe_backend *b, moe_tensor dst, moe_tensor src, int64_t n)
{
    if (dst.buf->type != src.buf->type) {
        moe_backend_fail(b, "copy", MOE_ERR_ARG, "from %s to %s", moe_dtype_name(src.buf->type),
                         moe_dtype_name(dst.buf->type));
        return;
    }
    memmove(at(dst), at(src), (size_t)n * moe_dtype_size(dst.buf->type));
}

static moe_status ref_sync(moe_backend *b)
{
    return moe_backend_take_error(b);
}

static void ref_set_stream(moe_backend *b, int stream)
{
}

static moe_status ref_event_create(moe_backend *b, moe_event **out)
{
    *out = calloc(1, sizeof **out);
    return *out ? MOE_OK : moe_error(MOE_ERR_NOMEM, "ref backend: out of memory for an event");
}

static void ref_event_free(moe_backend *b, moe_event *ev)
{
    free(ev);
}

static void ref_event_nop(moe_backend *b, moe_event *ev)
{
}

double *moe_ref_scratch(moe_backend *b, int64_t n, const char *op)
{
    moe_ref_state *st = b->impl;
    if (n <= st->scratch_n)
        return st->scratch;
    moe_backend_fail(b, op, MOE_ERR_ARG, "needs %lld doubles of scratch, %lld were reserved", (long long)n,
                     (long long)st->scratch_n);
    return NULL;
}

/* Only attention needs scratch here; the reference MoE ops allocate their own temporaries. */
static moe_status ref_reserve(moe_backend *b, const moe_workload *w)
{
    moe_ref_state *st = b->impl;
    int64_t n = w && w->batch > 0 ? w->batch * w->heads * w->seq * w->seq : 0;
    if (n <= st->scratch_n)
        return MOE_OK;
    double *p = malloc((size_t)n * sizeof *p);
    if (!p)
        return moe_error(MOE_ERR_NOMEM, "ref backend: out of memory for %lld doubles of scratch", (long long)n);
    free(st->scratch);
    st->scratch = p;
    st->scratch_n = n;
    return MOE_OK;
}

static int ref_set_threads(moe_backend *b, int n)
{
    return n > 0 ? n : 1;
}

static void ref_matmul_forward(moe_backend *b, moe_tensor out, moe_tensor x, moe_tensor w, int64_t T, int64_t K,
                               int64_t N)
{
    moe_ref_matmul_forward(D(out), D(x), D(w), T, K, N);
}

static void ref_matmul_backward(moe_backend *b, moe_tensor *dx, moe_tensor *dw, moe_tensor dout, moe_tensor x,
                                moe_tensor w, int64_t T, int64_t K, int64_t N)
{
    moe_ref_matmul_backward(dx ? D(*dx) : NULL, dw ? D(*dw) : NULL, D(dout), D(x), D(w), T, K, N);
}

static void ref_scores_forward(moe_backend *b, moe_tensor s, moe_tensor h, moe_score_fn fn, int64_t T, int64_t E)
{
    if (fn == MOE_SCORE_SOFTMAX)
        moe_ref_softmax_forward(D(s), D(h), T, E);
    else
        moe_ref_sigmoid_forward(D(s), D(h), T * E);
}

static void ref_scores_backward(moe_backend *b, moe_tensor dh, moe_tensor ds, moe_tensor s, moe_score_fn fn,
                                int64_t T, int64_t E)
{
    if (fn == MOE_SCORE_SOFTMAX)
        moe_ref_softmax_backward(D(dh), D(ds), D(s), T, E);
    else
        moe_ref_sigmoid_backward(D(dh), D(ds), D(s), T * E);
}

/* Assignments a plan must hold for up to max_tokens tokens, and its k. */
static void plan_size(const moe_layer_config *c, int64_t max_tokens, int64_t *max_n, int64_t *k)
{
    if (c->router == MOE_ROUTER_EXPERT_CHOICE) {
        *k = moe_capacity(c, max_tokens);
        *max_n = c->n_experts * *k;
    } else {
        *k = c->top_k;
        *max_n = max_tokens * c->top_k;
    }
}

static moe_status ref_plan_create(moe_backend *b, const moe_layer_config *c, int64_t max_tokens, moe_bplan **out)
{
    *out = NULL;
    moe_status s = moe_layer_config_validate(c, max_tokens);
    if (s != MOE_OK)
        return s;
    int64_t max_n, k;
    plan_size(c, max_tokens, &max_n, &k);
    moe_bplan *bp = malloc(sizeof *bp);
    if (!bp)
        return moe_error(MOE_ERR_NOMEM, "ref backend: out of memory for a plan");
    if ((s = moe_plan_create(max_n, max_tokens, c->n_experts, k, &bp->p)) != MOE_OK) {
        free(bp);
        return s;
    }
    bp->T = max_tokens;
    bp->k = k;
    *out = bp;
    return MOE_OK;
}

static void ref_plan_free(moe_backend *b, moe_bplan *p)
{
    if (p) {
        moe_plan_free(p->p);
        free(p);
    }
}

/* Copies the plan's scalars and arrays into a host plan allocated at least as large. */
static moe_status ref_plan_download(moe_backend *b, moe_plan *h, const moe_bplan *bp)
{
    const moe_plan *p = bp->p;
    if (h->cap_n < p->n || h->E != p->E || h->T * h->k < p->T * p->k)
        return moe_error(MOE_ERR_ARG, "ref backend: host plan too small for %lld assignments", (long long)p->n);
    int64_t n = p->n, tk = p->T * p->k;
    h->T = p->T;
    h->k = p->k;
    h->n = n;
    h->capacity = p->capacity;
    h->dropped = p->dropped;
    memcpy(h->token, p->token, (size_t)n * sizeof *h->token);
    memcpy(h->expert, p->expert, (size_t)n * sizeof *h->expert);
    memcpy(h->weight, p->weight, (size_t)n * sizeof *h->weight);
    memcpy(h->src, p->src, (size_t)n * sizeof *h->src);
    memcpy(h->choice, p->choice, (size_t)n * sizeof *h->choice);
    memcpy(h->offsets, p->offsets, (size_t)(p->E + 1) * sizeof *h->offsets);
    memcpy(h->count, p->count, (size_t)p->E * sizeof *h->count);
    memcpy(h->selected, p->selected, (size_t)p->E * sizeof *h->selected);
    memcpy(h->choice_expert, p->choice_expert, (size_t)tk * sizeof *h->choice_expert);
    memcpy(h->choice_weight, p->choice_weight, (size_t)tk * sizeof *h->choice_weight);
    memcpy(h->choice_kept, p->choice_kept, (size_t)tk * sizeof *h->choice_kept);
    return MOE_OK;
}

static void ref_route(moe_backend *b, moe_bplan *p, moe_tensor s, moe_tensor h, moe_tensor *bias,
                      moe_tensor *token_ids, const moe_layer_config *c, moe_key key, int64_t T)
{
    p->p->T = p->T;
    p->p->k = p->k;
    if (moe_ref_route(p->p, D(s), D(h), bias ? D(*bias) : NULL, token_ids ? IDS(*token_ids) : NULL, c, key, T))
        moe_backend_fail(b, "route", MOE_ERR_ARG, "%s", moe_last_error());
}

static moe_status ref_plan_upload(moe_backend *b, moe_bplan *bp, const moe_plan *h)
{
    moe_status st = moe_plan_check(h);
    if (st)
        return st;
    if (h->E != bp->p->E || h->n > bp->p->cap_n || h->T * h->k > bp->T * bp->k)
        return moe_error(MOE_ERR_ARG, "ref backend: plan of %lld assignments, T·k = %lld does not fit",
                         (long long)h->n, (long long)(h->T * h->k));
    bp->p->T = bp->T;
    bp->p->k = bp->k;
    return ref_plan_download(b, bp->p, &(moe_bplan){(moe_plan *)h, h->T, h->k});
}

static moe_status ref_plan_set_segments(moe_backend *b, moe_bplan *bp, const int64_t *begin, const int64_t *rows)
{
    moe_plan *p = bp->p;
    int64_t n = 0;
    for (int64_t e = 0; e < p->E; e++) {
        if (begin[e] < 0 || rows[e] < 0 || rows[e] > p->cap_n - n)
            return moe_error(MOE_ERR_ARG, "ref backend: expert %lld's %lld rows at %lld do not fit a plan of %lld",
                             (long long)e, (long long)rows[e], (long long)begin[e], (long long)p->cap_n);
        p->offsets[e] = begin[e];
        p->count[e] = p->selected[e] = rows[e];
        n += rows[e];
    }
    p->offsets[p->E] = -1; /* segments need not be contiguous: there is no end offset */
    p->n = n;
    p->dropped = 0;
    return MOE_OK;
}

static void ref_plan_counts(moe_backend *b, moe_tensor out, const moe_bplan *bp)
{
    const moe_plan *p = bp->p;
    double *o = D(out);
    for (int64_t e = 0; e < p->E; e++) {
        o[e] = (double)p->count[e];
        o[p->E + e] = (double)p->selected[e];
    }
    o[2 * p->E] = (double)p->n;
    o[2 * p->E + 1] = (double)p->dropped;
}

static void ref_plan_fill(moe_backend *b, moe_tensor t, double v, const moe_bplan *bp, int64_t width)
{
    for (int64_t e = 0; e < bp->p->E; e++)
        ref_fill(b, moe_tensor_at(t, bp->p->offsets[e] * width), v, bp->p->count[e] * width);
}

static void ref_bias_update(moe_backend *b, moe_tensor bias, moe_tensor counts, double rate, int64_t E)
{
    double *bb = D(bias);
    const double *c = D(counts);
    double mean = 0;
    for (int64_t e = 0; e < E; e++)
        mean += c[e];
    mean /= (double)E;
    for (int64_t e = 0; e < E; e++) {
        const double err = mean - c[e];
        bb[e] += rate * (double)((err > 0) - (err < 0));
    }
}

#define OPT(t) DOPT(t)

static void ref_route_backward(moe_backend *b, moe_tensor ds, moe_tensor *dweight, moe_tensor *dchoice,
                               const moe_bplan *p, moe_tensor s, moe_tensor *bias, const moe_layer_config *c)
{
    moe_ref_route_backward(D(ds), OPT(dweight), OPT(dchoice), p->p, D(s), OPT(bias), c);
}

static void ref_dispatch_forward(moe_backend *b, moe_tensor xe, moe_tensor x, const moe_bplan *p, int64_t d)
{
    moe_ref_dispatch_forward(D(xe), D(x), p->p, d);
}

static void ref_dispatch_backward(moe_backend *b, moe_tensor dx, moe_tensor dxe, const moe_bplan *p, int64_t d)
{
    moe_ref_dispatch_backward(D(dx), D(dxe), p->p, d);
}

static void ref_combine_forward(moe_backend *b, moe_tensor y, moe_tensor ye, const moe_bplan *p, int64_t d)
{
    moe_ref_combine_forward(D(y), D(ye), p->p, d);
}

static void ref_combine_backward(moe_backend *b, moe_tensor dye, moe_tensor dweight, moe_tensor dy, moe_tensor ye,
                                 const moe_bplan *p, int64_t d)
{
    moe_ref_combine_backward(D(dye), D(dweight), D(dy), D(ye), p->p, d);
}

/* The experts run over each expert's segment of the plan, one reference FFN each. */
static void ref_experts_forward(moe_backend *b, moe_tensor ye, moe_tensor h1, moe_tensor h3, moe_tensor a,
                                moe_tensor xe, moe_tensor w1, moe_tensor *w3, moe_tensor w2, const moe_bplan *bp,
                                moe_activation act, int64_t d, int64_t f)
{
    const moe_plan *p = bp->p;
    const int glu = moe_act_is_glu(act);
    for (int64_t e = 0; e < p->E; e++) {
        const int64_t r = p->offsets[e];
        moe_ref_ffn_forward(D(ye) + r * d, D(h1) + r * f, glu ? D(h3) + r * f : NULL, D(a) + r * f, D(xe) + r * d,
                            D(w1) + e * d * f, glu ? D(*w3) + e * d * f : NULL, D(w2) + e * f * d, act, p->count[e],
                            d, f);
    }
}

static void ref_experts_backward_data(moe_backend *b, moe_tensor dxe, moe_tensor dg1, moe_tensor *dg3, moe_tensor dye,
                                      moe_tensor h1, moe_tensor h3, moe_tensor w1, moe_tensor *w3, moe_tensor w2,
                                      const moe_bplan *bp, moe_activation act, int64_t d, int64_t f)
{
    const moe_plan *p = bp->p;
    const int glu = moe_act_is_glu(act);
    for (int64_t e = 0; e < p->E; e++) {
        const int64_t r = p->offsets[e];
        moe_ref_ffn_backward_data(dxe.buf ? D(dxe) + r * d : NULL, D(dg1) + r * f, glu ? D(*dg3) + r * f : NULL, D(dye) + r * d,
                                  D(h1) + r * f, glu ? D(h3) + r * f : NULL, D(w1) + e * d * f,
                                  glu ? D(*w3) + e * d * f : NULL, D(w2) + e * f * d, act, p->count[e], d, f);
    }
}

static void ref_experts_backward_weights(moe_backend *b, moe_tensor dw1, moe_tensor *dw3, moe_tensor dw2,
                                         moe_tensor dg1, moe_tensor *dg3, moe_tensor dye, moe_tensor a, moe_tensor xe,
                                         const moe_bplan *bp, moe_activation act, int64_t d, int64_t f)
{
    const moe_plan *p = bp->p;
    const int glu = moe_act_is_glu(act);
    for (int64_t e = 0; e < p->E; e++) {
        const int64_t r = p->offsets[e];
        moe_ref_ffn_backward_weights(D(dw1) + e * d * f, glu ? D(*dw3) + e * d * f : NULL, D(dw2) + e * f * d,
                                     D(dg1) + r * f, glu ? D(*dg3) + r * f : NULL, D(dye) + r * d, D(a) + r * f,
                                     D(xe) + r * d, act, p->count[e], d, f);
    }
}

/* mixture of attention heads: the oracle's plan ops (ref/moa.h) */
static void ref_experts_linear_forward(moe_backend *b, moe_tensor ye, moe_tensor xe, moe_tensor w, const moe_bplan *bp,
                                       int64_t K, int64_t N)
{
    moe_ref_experts_linear_forward(D(ye), D(xe), D(w), bp->p, K, N);
}

static void ref_experts_linear_backward(moe_backend *b, moe_tensor *dxe, moe_tensor dw, moe_tensor dye, moe_tensor xe,
                                        moe_tensor w, const moe_bplan *bp, int64_t K, int64_t N)
{
    moe_ref_experts_linear_backward(OPT(dxe), D(dw), D(dye), D(xe), D(w), bp->p, K, N);
}

static void ref_choice_scatter(moe_backend *b, moe_tensor slots, moe_tensor rows, const moe_bplan *bp, int64_t w)
{
    if (bp->p->n > 0 && bp->p->choice[0] < 0)
        moe_backend_fail(b, "choice_scatter", MOE_ERR_ARG, "an expert-choice plan has no choice slots");
    else
        moe_ref_choice_scatter(D(slots), D(rows), bp->p, w);
}

static void ref_choice_gather(moe_backend *b, moe_tensor rows, moe_tensor slots, const moe_bplan *bp, int64_t w)
{
    if (bp->p->n > 0 && bp->p->choice[0] < 0)
        moe_backend_fail(b, "choice_gather", MOE_ERR_ARG, "an expert-choice plan has no choice slots");
    else
        moe_ref_choice_gather(D(rows), D(slots), bp->p, w);
}

static void ref_lb_forward(moe_backend *b, moe_tensor out, moe_tensor s, const moe_bplan *p, int64_t T, int64_t E)
{
    D(out)[0] = moe_ref_lb_loss_forward(D(s), p->p, T, E);
}

static void ref_lb_backward(moe_backend *b, moe_tensor ds, double coef, const moe_bplan *p, int64_t T, int64_t E)
{
    moe_ref_lb_loss_backward(D(ds), coef, p->p, T, E);
}

static void ref_z_forward(moe_backend *b, moe_tensor out, moe_tensor z, int64_t T, int64_t E)
{
    D(out)[0] = moe_ref_z_loss_forward(D(z), T, E);
}

static void ref_cv2_forward(moe_backend *b, moe_tensor out, moe_tensor v, int64_t E)
{
    D(out)[0] = moe_ref_cv2_forward(D(v), E);
}

static void ref_cv2_backward(moe_backend *b, moe_tensor dv, double coef, moe_tensor v, int64_t E)
{
    moe_ref_cv2_backward(D(dv), coef, D(v), E);
}

static void ref_z_backward(moe_backend *b, moe_tensor dz, double coef, moe_tensor z, int64_t T, int64_t E)
{
    moe_ref_z_loss_backward(D(dz), coef, D(z), T, E);
}

static void ref_rowscale_forward(moe_backend *b, moe_tensor y, moe_tensor v, moe_tensor a, int64_t as, int64_t T,
                                 int64_t d)
{
    double *yy = D(y);
    const double *vv = D(v), *aa = D(a);
    for (int64_t t = 0; t < T; t++)
        for (int64_t i = 0; i < d; i++)
            yy[t * d + i] += aa[t * as] * vv[t * d + i];
}

static void ref_rowscale_backward(moe_backend *b, moe_tensor *dv, moe_tensor *da, moe_tensor dy, moe_tensor v,
                                  moe_tensor a, int64_t as, int64_t T, int64_t d)
{
    const double *g = D(dy), *vv = D(v), *aa = D(a);
    for (int64_t t = 0; t < T; t++) {
        double acc = 0;
        for (int64_t i = 0; i < d; i++) {
            if (dv)
                D(*dv)[t * d + i] += aa[t * as] * g[t * d + i];
            acc += g[t * d + i] * vv[t * d + i];
        }
        if (da)
            D(*da)[t * as] += acc;
    }
}

static void ref_add(moe_backend *b, moe_tensor y, moe_tensor x, int64_t n)
{
    moe_ref_add_forward(D(y), D(y), D(x), n);
}

static void ref_jitter_forward(moe_backend *b, moe_tensor xr, moe_tensor u, moe_tensor x, double eps, uint64_t seed,
                               int64_t layer, moe_key key, int64_t T, int64_t d)
{
    moe_ref_jitter_forward(D(xr), D(u), D(x), eps, seed, layer, key, T, d);
}

static void ref_jitter_backward(moe_backend *b, moe_tensor dx, moe_tensor dxr, moe_tensor u, int64_t T, int64_t d)
{
    moe_ref_jitter_backward(D(dx), D(dxr), D(u), T, d);
}

static void ref_noisy_logits_forward(moe_backend *b, moe_tensor h, moe_tensor eps, moe_tensor z, moe_tensor zn,
                                     int training, uint64_t seed, int64_t layer, moe_key key, int64_t T, int64_t E)
{
    moe_ref_noisy_logits_forward(D(h), D(eps), D(z), D(zn), training, seed, layer, key, T, E);
}

static void ref_noisy_logits_backward(moe_backend *b, moe_tensor *dz, moe_tensor *dzn, moe_tensor dh, moe_tensor eps,
                                      moe_tensor zn, int64_t T, int64_t E)
{
    moe_ref_noisy_logits_backward(OPT(dz), OPT(dzn), D(dh), D(eps), D(zn), T, E);
}

static void ref_noisy_load_forward(moe_backend *b, moe_tensor load, moe_tensor z, moe_tensor zn, moe_tensor h,
                                   int64_t k, int64_t T, int64_t E)
{
    moe_ref_noisy_load_forward(D(load), D(z), D(zn), D(h), k, T, E);
}

static void ref_noisy_load_backward(moe_backend *b, moe_tensor *dz, moe_tensor *dzn, moe_tensor *dh,
                                    moe_tensor dload, moe_tensor z, moe_tensor zn, moe_tensor h, int64_t k,
                                    int64_t T, int64_t E)
{
    moe_ref_noisy_load_backward(OPT(dz), OPT(dzn), OPT(dh), D(dload), D(z), D(zn), D(h), k, T, E);
}

static void ref_ffn_forward(moe_backend *b, moe_tensor out, moe_tensor h1, moe_tensor h3, moe_tensor a, moe_tensor x,
                            moe_tensor w1, moe_tensor *w3, moe_tensor w2, moe_activation act, int64_t n, int64_t d,
                            int64_t f)
{
    moe_ref_ffn_forward(D(out), D(h1), D(h3), D(a), D(x), D(w1), OPT(w3), D(w2), act, n, d, f);
}

static void ref_ffn_backward(moe_backend *b, moe_tensor *dx, moe_tensor dw1, moe_tensor *dw3, moe_tensor dw2,
                             moe_tensor dout, moe_tensor h1, moe_tensor h3, moe_tensor a, moe_tensor x, moe_tensor w1,
                             moe_tensor *w3, moe_tensor w2, moe_activation act, int64_t n, int64_t d, int64_t f)
{
    moe_ref_ffn_backward(OPT(dx), D(dw1), OPT(dw3), D(dw2), D(dout), D(h1), D(h3), D(a), D(x), D(w1), OPT(w3),
                         D(w2), act, n, d, f);
}

static void ref_importance_forward(moe_backend *b, moe_tensor imp, const moe_bplan *p)
{
    moe_ref_importance_forward(D(imp), p->p);
}

static void ref_importance_backward(moe_backend *b, moe_tensor *dweight, moe_tensor *dchoice, moe_tensor dimp,
                                    const moe_bplan *p)
{
    moe_ref_importance_backward(OPT(dweight), OPT(dchoice), D(dimp), p->p);
}

static void ref_mi_forward(moe_backend *b, moe_tensor out, moe_tensor s, moe_tensor task, int64_t M, int64_t T,
                           int64_t E)
{
    D(out)[0] = moe_ref_mi_loss_forward(D(s), IDS(task), M, T, E);
}

static void ref_mi_backward(moe_backend *b, moe_tensor ds, double coef, moe_tensor s, moe_tensor task, int64_t M,
                            int64_t T, int64_t E)
{
    moe_ref_mi_loss_backward(D(ds), coef, D(s), IDS(task), M, T, E);
}

static void ref_destroy(moe_backend *b)
{
    moe_ref_state *st = b->impl;
    free(st->scratch);
    free(st);
    free(b);
}

moe_status moe_backend_ref_create(const moe_backend_options *o, moe_backend **out)
{
    *out = NULL;
    if (o && o->dtype && strcmp(o->dtype, "f64"))
        return moe_error(MOE_ERR_ARG, "ref backend: the oracle computes in double (f64), not '%s'", o->dtype);
    moe_backend *b = calloc(1, sizeof *b);
    moe_ref_state *st = calloc(1, sizeof *st);
    *out = NULL;
    if (!b || !st) {
        free(b);
        free(st);
        return moe_error(MOE_ERR_NOMEM, "ref backend: out of memory");
    }
    b->name = "ref";
    b->float_type = MOE_F64;
    b->impl = st;
    b->alloc = ref_alloc;
    b->free = ref_free;
    b->dtype = ref_dtype;
    b->upload = ref_upload;
    b->download = ref_download;
    b->fill = ref_fill;
    b->copy = ref_copy;
    b->sync = ref_sync;
    b->set_stream = ref_set_stream;
    b->event_create = ref_event_create;
    b->event_free = ref_event_free;
    b->event_record = ref_event_nop;
    b->stream_wait = ref_event_nop;
    b->reserve = ref_reserve;
    b->set_threads = ref_set_threads;
    b->matmul_forward = ref_matmul_forward;
    b->matmul_backward = ref_matmul_backward;
    b->rowscale_forward = ref_rowscale_forward;
    b->rowscale_backward = ref_rowscale_backward;
    b->add = ref_add;
    b->jitter_forward = ref_jitter_forward;
    b->jitter_backward = ref_jitter_backward;
    b->scores_forward = ref_scores_forward;
    b->scores_backward = ref_scores_backward;
    b->noisy_logits_forward = ref_noisy_logits_forward;
    b->noisy_logits_backward = ref_noisy_logits_backward;
    b->noisy_load_forward = ref_noisy_load_forward;
    b->noisy_load_backward = ref_noisy_load_backward;
    b->plan_create = ref_plan_create;
    b->plan_free = ref_plan_free;
    b->plan_download = ref_plan_download;
    b->plan_upload = ref_plan_upload;
    b->plan_set_segments = ref_plan_set_segments;
    b->plan_counts = ref_plan_counts;
    b->plan_fill = ref_plan_fill;
    b->route = ref_route;
    b->route_backward = ref_route_backward;
    b->bias_update = ref_bias_update;
    b->dispatch_forward = ref_dispatch_forward;
    b->dispatch_backward = ref_dispatch_backward;
    b->combine_forward = ref_combine_forward;
    b->combine_backward = ref_combine_backward;
    b->ffn_forward = ref_ffn_forward;
    b->ffn_backward = ref_ffn_backward;
    b->experts_forward = ref_experts_forward;
    b->experts_backward_data = ref_experts_backward_data;
    b->experts_backward_weights = ref_experts_backward_weights;
    b->experts_linear_forward = ref_experts_linear_forward;
    b->experts_linear_backward = ref_experts_linear_backward;
    b->choice_scatter = ref_choice_scatter;
    b->choice_gather = ref_choice_gather;
    b->lb_loss_forward = ref_lb_forward;
    b->lb_loss_backward = ref_lb_backward;
    b->z_loss_forward = ref_z_forward;
    b->z_loss_backward = ref_z_backward;
    b->importance_forward = ref_importance_forward;
    b->importance_backward = ref_importance_backward;
    b->cv2_forward = ref_cv2_forward;
    b->cv2_backward = ref_cv2_backward;
    b->mi_loss_forward = ref_mi_forward;
    b->mi_loss_backward = ref_mi_backward;
    b->destroy = ref_destroy;
    moe_ref_model_ops(b);
    *out = b;
    return MOE_OK;
}
