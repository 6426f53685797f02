/*
 * The ref backend: the oracle behind the backend table. Buffers are plain arrays of
 * double and every op calls its twin in ref/, so `--backend ref` runs exactly the
 * reference and any other backend can be compared with it op by op.
 */
#include <stdlib.h>
#include <string.h>

#include "backend/backend.h"
#include "ref/ref.h"

struct moe_buf {
    int64_t n;
    double *d;
};

struct moe_bplan {
    moe_plan *p;
    int64_t T, k; /* as allocated: moe_ref_route sizes its [T, k] arrays from the plan's T·k on entry */
};

#define D(t) ((t).buf ? (t).buf->d + (t).off : NULL)

static moe_status ref_alloc(moe_backend *b, int64_t n, moe_buf **out)
{
    *out = NULL;
    if (n < 0)
        return moe_error(MOE_ERR_ARG, "ref backend: cannot allocate %lld elements", (long long)n);
    const int64_t mem = moe_host_memory();
    if ((uint64_t)n > SIZE_MAX / sizeof(double) || (mem > 0 && (double)n * sizeof(double) > (double)mem))
        return moe_error(MOE_ERR_NOMEM, "ref backend: %lld doubles (%.3g GiB) are more than this machine's memory "
                         "(%.3g GiB)", (long long)n, (double)n * sizeof(double) / (1 << 30), (double)mem / (1 << 30));
    moe_buf *buf = malloc(sizeof *buf);
    double *d = calloc(n ? (size_t)n : 1, sizeof *d);
    if (!buf || !d) {
        free(buf);
        free(d);
        return moe_error(MOE_ERR_NOMEM, "ref backend: out of memory for %lld doubles (%.3g GiB)", (long long)n,
                         (double)n * sizeof(double) / (1 << 30));
    }
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

static moe_status check_range(moe_tensor t, int64_t n, const char *what)
{
    if (!t.buf || t.off < 0 || n < 0 || t.off > t.buf->n - n)
        return moe_error(MOE_ERR_ARG, "ref backend: %s of %lld elements at %lld is outside the buffer", what,
                         (long long)n, (long long)t.off);
    return MOE_OK;
}

static moe_status ref_upload(moe_backend *b, moe_tensor dst, const double *src, int64_t n)
{
    moe_status s = check_range(dst, n, "upload");
    if (s == MOE_OK)
        memcpy(dst.buf->d + dst.off, src, (size_t)n * sizeof *src);
    return s;
}

static moe_status ref_download(moe_backend *b, double *dst, moe_tensor src, int64_t n)
{
    moe_status s = check_range(src, n, "download");
    if (s == MOE_OK)
        memcpy(dst, src.buf->d + src.off, (size_t)n * sizeof *dst);
    return s;
}

static void ref_fill(moe_backend *b, moe_tensor t, double v, int64_t n)
{
    double *d = D(t);
    for (int64_t i = 0; i < n; i++)
        d[i] = v;
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

static moe_status ref_route(moe_backend *b, moe_bplan *p, moe_tensor s, moe_tensor h, moe_tensor *bias,
                            const int32_t *token_ids, const moe_layer_config *c, uint64_t step, int64_t T)
{
    p->p->T = p->T;
    p->p->k = p->k;
    return moe_ref_route(p->p, D(s), D(h), bias ? D(*bias) : NULL, token_ids, c, step, T);
}

static moe_status ref_plan_upload(moe_backend *b, moe_bplan *bp, const moe_plan *h)
{
    if (h->E != bp->p->E || h->n > bp->p->cap_n || h->T * h->k > bp->T * bp->k)
        return moe_error(MOE_ERR_ARG, "ref backend: plan of %lld assignments, T·k = %lld does not fit",
                         (long long)h->n, (long long)(h->T * h->k));
    bp->p->T = bp->T;
    bp->p->k = bp->k;
    return ref_plan_download(b, bp->p, &(moe_bplan){(moe_plan *)h, h->T, h->k});
}

static void ref_plan_stats(moe_backend *b, const moe_bplan *bp, int64_t *n, int64_t *dropped, int64_t *count,
                           int64_t *selected)
{
    const moe_plan *p = bp->p;
    if (n)
        *n = p->n;
    if (dropped)
        *dropped = p->dropped;
    if (count)
        memcpy(count, p->count, (size_t)p->E * sizeof *count);
    if (selected)
        memcpy(selected, p->selected, (size_t)p->E * sizeof *selected);
}

#define OPT(t) ((t) ? D(*(t)) : NULL)

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

static void ref_experts_forward(moe_backend *b, moe_tensor ye, moe_tensor h1, moe_tensor h3, moe_tensor a,
                                moe_tensor xe, moe_tensor w1, moe_tensor *w3, moe_tensor w2, const moe_bplan *p,
                                moe_activation act, int64_t d, int64_t f)
{
    moe_ref_experts_forward(D(ye), D(h1), D(h3), D(a), D(xe), D(w1), w3 ? D(*w3) : NULL, D(w2), p->p->offsets,
                            act, p->p->E, d, f);
}

static void ref_experts_backward(moe_backend *b, moe_tensor dxe, moe_tensor dw1, moe_tensor *dw3, moe_tensor dw2,
                                 moe_tensor dye, moe_tensor h1, moe_tensor h3, moe_tensor a, moe_tensor xe,
                                 moe_tensor w1, moe_tensor *w3, moe_tensor w2, const moe_bplan *p,
                                 moe_activation act, int64_t d, int64_t f)
{
    moe_ref_experts_backward(D(dxe), D(dw1), dw3 ? D(*dw3) : NULL, D(dw2), D(dye), D(h1), D(h3), D(a), D(xe),
                             D(w1), w3 ? D(*w3) : NULL, D(w2), p->p->offsets, act, p->p->E, d, f);
}

static double ref_lb_forward(moe_backend *b, moe_tensor s, const moe_bplan *p, int64_t T, int64_t E)
{
    return moe_ref_lb_loss_forward(D(s), p->p, T, E);
}

static void ref_lb_backward(moe_backend *b, moe_tensor ds, double coef, const moe_bplan *p, int64_t T, int64_t E)
{
    moe_ref_lb_loss_backward(D(ds), coef, p->p, T, E);
}

static double ref_z_forward(moe_backend *b, moe_tensor z, int64_t T, int64_t E)
{
    return moe_ref_z_loss_forward(D(z), T, E);
}

static void ref_z_backward(moe_backend *b, moe_tensor dz, double coef, moe_tensor z, int64_t T, int64_t E)
{
    moe_ref_z_loss_backward(D(dz), coef, D(z), T, E);
}

static void ref_copy(moe_backend *b, moe_tensor dst, moe_tensor src, int64_t n)
{
    memmove(dst.buf->d + dst.off, src.buf->d + src.off, (size_t)n * sizeof(double));
}

static moe_status ref_reserve(moe_backend *b, int64_t n)
{
    return MOE_OK; /* the reference ops need no scratch */
}

static int ref_set_threads(moe_backend *b, int n)
{
    return n > 0 ? n : 1;
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
    double *yy = D(y);
    const double *xx = D(x);
    for (int64_t i = 0; i < n; i++)
        yy[i] += xx[i];
}

static void ref_jitter_forward(moe_backend *b, moe_tensor xr, moe_tensor u, moe_tensor x, double eps, uint64_t seed,
                               int64_t layer, uint64_t step, int64_t T, int64_t d)
{
    moe_ref_jitter_forward(D(xr), D(u), D(x), eps, seed, layer, step, T, d);
}

static void ref_jitter_backward(moe_backend *b, moe_tensor dx, moe_tensor dxr, moe_tensor u, int64_t T, int64_t d)
{
    moe_ref_jitter_backward(D(dx), D(dxr), D(u), T, d);
}

static void ref_noisy_logits_forward(moe_backend *b, moe_tensor h, moe_tensor eps, moe_tensor z, moe_tensor zn,
                                     int training, uint64_t seed, int64_t layer, uint64_t step, int64_t T, int64_t E)
{
    moe_ref_noisy_logits_forward(D(h), D(eps), D(z), D(zn), training, seed, layer, step, T, E);
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

static double ref_mi_forward(moe_backend *b, moe_tensor s, const int32_t *task, int64_t M, int64_t T, int64_t E)
{
    return moe_ref_mi_loss_forward(D(s), task, M, T, E);
}

static void ref_mi_backward(moe_backend *b, moe_tensor ds, double coef, moe_tensor s, const int32_t *task, int64_t M,
                            int64_t T, int64_t E)
{
    moe_ref_mi_loss_backward(D(ds), coef, D(s), task, M, T, E);
}

static void ref_destroy(moe_backend *b)
{
    free(b);
}

moe_status moe_backend_ref_create(moe_backend **out)
{
    moe_backend *b = calloc(1, sizeof *b);
    *out = NULL;
    if (!b)
        return moe_error(MOE_ERR_NOMEM, "ref backend: out of memory");
    b->name = "ref";
    b->elem_size = sizeof(double);
    b->alloc = ref_alloc;
    b->free = ref_free;
    b->upload = ref_upload;
    b->download = ref_download;
    b->fill = ref_fill;
    b->matmul_forward = ref_matmul_forward;
    b->matmul_backward = ref_matmul_backward;
    b->scores_forward = ref_scores_forward;
    b->scores_backward = ref_scores_backward;
    b->plan_create = ref_plan_create;
    b->plan_free = ref_plan_free;
    b->plan_download = ref_plan_download;
    b->plan_upload = ref_plan_upload;
    b->plan_stats = ref_plan_stats;
    b->route = ref_route;
    b->route_backward = ref_route_backward;
    b->dispatch_forward = ref_dispatch_forward;
    b->dispatch_backward = ref_dispatch_backward;
    b->combine_forward = ref_combine_forward;
    b->combine_backward = ref_combine_backward;
    b->experts_forward = ref_experts_forward;
    b->experts_backward = ref_experts_backward;
    b->lb_loss_forward = ref_lb_forward;
    b->lb_loss_backward = ref_lb_backward;
    b->z_loss_forward = ref_z_forward;
    b->z_loss_backward = ref_z_backward;
    b->copy = ref_copy;
    b->reserve = ref_reserve;
    b->set_threads = ref_set_threads;
    b->rowscale_forward = ref_rowscale_forward;
    b->rowscale_backward = ref_rowscale_backward;
    b->add = ref_add;
    b->jitter_forward = ref_jitter_forward;
    b->jitter_backward = ref_jitter_backward;
    b->noisy_logits_forward = ref_noisy_logits_forward;
    b->noisy_logits_backward = ref_noisy_logits_backward;
    b->noisy_load_forward = ref_noisy_load_forward;
    b->noisy_load_backward = ref_noisy_load_backward;
    b->ffn_forward = ref_ffn_forward;
    b->ffn_backward = ref_ffn_backward;
    b->importance_forward = ref_importance_forward;
    b->importance_backward = ref_importance_backward;
    b->mi_loss_forward = ref_mi_forward;
    b->mi_loss_backward = ref_mi_backward;
    b->destroy = ref_destroy;
    moe_backend_ref_model_ops(b);
    *out = b;
    return MOE_OK;
}

moe_status moe_backend_create(const char *name, int threads, moe_backend **out)
{
    *out = NULL;
    if (name && !strcmp(name, "ref"))
        return moe_backend_ref_create(out);
    if (name && !strcmp(name, "cpu"))
        return moe_backend_cpu_create(threads, out);
    return moe_error(MOE_ERR_ARG, "backend: unknown backend '%s' (ref or cpu)", name ? name : "(null)");
}

void moe_backend_free(moe_backend *b)
{
    if (b)
        b->destroy(b);
}
