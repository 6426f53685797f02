/*
 * The MoE layer on any backend. The composition is ref/moe_layer.c's, op for op:
 *
 *   xr = jitter(x)                      (training, jitter_eps > 0; feeds the router only)
 *   z  = xr·Wr,  h = z [+ ε·softplus(xr·Wnoise)],  s = softmax(h) or sigmoid(h)
 *   plan = route(s, h, bias)            aux losses from s, z, h and the plan
 *   moe = combine(experts(dispatch(x))) [+ sigmoid(x·g) ⊙] shared(x)
 *   y  = moe, or with Residual-MoE  c = softmax(x·coef), y = c0·moe + c1·mlp(x)
 *
 * Tensors live in three backend buffers laid out by arenas at create time (parameters,
 * gradients, saved activations + backward scratch) under the reference layer's names.
 * Only E-sized vectors cross to the host (importance, load, counts: the cv² losses and
 * the bias update are computed there), so the layer never dereferences backend memory.
 */
#define _POSIX_C_SOURCE 200809L /* clock_gettime */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "layer/moe_layer.h"
#include "ref/ref.h"

/* ---- the local exchange ------------------------------------------------------- */

static void local_dispatch_forward(const moe_exchange *ex, moe_backend *b, moe_tensor xe, moe_tensor x,
                                   const moe_bplan *p, int64_t d)
{
    b->dispatch_forward(b, xe, x, p, d);
}

static void local_dispatch_backward(const moe_exchange *ex, moe_backend *b, moe_tensor dx, moe_tensor dxe,
                                    const moe_bplan *p, int64_t d)
{
    b->dispatch_backward(b, dx, dxe, p, d);
}

static void local_combine_forward(const moe_exchange *ex, moe_backend *b, moe_tensor y, moe_tensor ye,
                                  const moe_bplan *p, int64_t d)
{
    b->combine_forward(b, y, ye, p, d);
}

static void local_combine_backward(const moe_exchange *ex, moe_backend *b, moe_tensor dye, moe_tensor dweight,
                                   moe_tensor dy, moe_tensor ye, const moe_bplan *p, int64_t d)
{
    b->combine_backward(b, dye, dweight, dy, ye, p, d);
}

static const moe_exchange local_exchange = {local_dispatch_forward, local_dispatch_backward, local_combine_forward,
                                            local_combine_backward, NULL};

const moe_exchange *moe_exchange_local(void)
{
    return &local_exchange;
}

const char *moe_layer_phase_name(int ph)
{
    static const char *names[MOE_PH_COUNT] = {
        "router", "plan", "aux", "dispatch", "experts", "combine", "shared",
        "bwd.shared", "bwd.combine", "bwd.experts", "bwd.dispatch", "bwd.router",
    };
    return ph >= 0 && ph < MOE_PH_COUNT ? names[ph] : "?";
}

/* ---- the layer ------------------------------------------------------------------ */

typedef struct {
    moe_tensor t;
    int on;
} opt_tensor;

struct moe_layer {
    moe_layer_config c;
    moe_backend *b;
    const moe_exchange *ex;
    int64_t max_T, T;        /* T: tokens of the last successful forward, 0: none */
    int64_t d, f, E, Fs, Fd, k_tc;
    int glu, router, token_choice, jittered;
    moe_bplan *plan;
    moe_arena params, grads, acts; /* layouts only; the memory is the backend's */
    moe_buf *pbuf, *gbuf, *abuf;
    int32_t *task;           /* [max_T] */
    double *imp_h, *load_h, *dv_h; /* [E] host copies of importance and load, and scratch */
    int64_t *sel_h;          /* [E] */
    moe_aux_losses aux;
    double phase[MOE_PH_COUNT];

    /* parameters and gradients; .buf NULL when the option is off */
    moe_tensor wr, wn, bias, w1, w3, w2, sw1, sw3, sw2, sgate, rw1, rw3, rw2, rcoef;
    moe_tensor gwr, gwn, gbias, gw1, gw3, gw2, gsw1, gsw3, gsw2, gsgate, grw1, grw3, grw2, grcoef;
    /* saved */
    moe_tensor x, xr, u, z, zn, eps, h, s, imp, load;
    moe_tensor xe, eh1, eh3, ea, ye, moe;
    moe_tensor sh1, sh3, sa, sy, sgz, sg, rh1, rh3, ra, ry, rlogit, rc;
    /* backward scratch */
    moe_tensor dmoe, dsy, dsg, dsgz, dry, drc, drlogit, dxe, dye, dweight, dchoice;
    moe_tensor ds, dh, dz, dzn, dxr, dimp, dload;
};

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static moe_status add(moe_arena *a, const char *name, int ndim, int64_t d0, int64_t d1, int64_t d2)
{
    const int64_t shape[3] = {d0, d1, d2};
    return moe_arena_add(a, name, ndim, shape);
}

static moe_status layout_acts(moe_arena *a, const moe_layer *l, int64_t N)
{
    const int64_t T = l->max_T, d = l->d, f = l->f, E = l->E;
    const int sh = l->Fs > 0, gate = sh && l->c.shared_gate, res = l->Fd > 0;
    const struct { const char *name; int64_t rows, cols; int on; } v[] = {
        {"x", T, d, 1},
        {"router.xr", T, d, l->router},
        {"router.u", T, d, l->router},
        {"router.z", T, E, 1},
        {"router.zn", T, E, l->router},
        {"router.eps", T, E, l->router},
        {"router.h", T, E, 1},
        {"router.s", T, E, 1},
        {"aux.importance", 1, E, 1},
        {"aux.load", 1, E, 1},
        {"experts.x", N, d, 1},
        {"experts.h1", N, f, 1},
        {"experts.h3", N, f, l->glu},
        {"experts.a", N, f, 1},
        {"experts.y", N, d, 1},
        {"moe.y", T, d, 1},
        {"shared.h1", T, l->Fs, sh},
        {"shared.h3", T, l->Fs, sh && l->glu},
        {"shared.a", T, l->Fs, sh},
        {"shared.y", T, d, sh},
        {"shared.gz", T, 1, gate},
        {"shared.g", T, 1, gate},
        {"residual.h1", T, l->Fd, res},
        {"residual.h3", T, l->Fd, res && l->glu},
        {"residual.a", T, l->Fd, res},
        {"residual.y", T, d, res},
        {"residual.logit", T, 2, res},
        {"residual.c", T, 2, res},
        {"d.moe", T, d, res},
        {"d.shared", T, d, gate},
        {"d.shared.g", T, 1, gate},
        {"d.shared.gz", T, 1, gate},
        {"d.residual", T, d, res},
        {"d.residual.c", T, 2, res},
        {"d.residual.logit", T, 2, res},
        {"d.experts.x", N, d, 1},
        {"d.experts.y", N, d, 1},
        {"d.weight", 1, N, 1},
        {"d.choice", T, l->k_tc, l->token_choice},
        {"d.s", T, E, l->router},
        {"d.h", T, E, l->router},
        {"d.z", T, E, l->router},
        {"d.zn", T, E, l->router},
        {"d.xr", T, d, l->router},
        {"d.importance", 1, E, l->router},
        {"d.load", 1, E, l->router},
    };
    for (size_t i = 0; i < sizeof v / sizeof v[0]; i++) {
        if (!v[i].on)
            continue;
        moe_status s = add(a, v[i].name, 2, v[i].rows, v[i].cols, 0);
        if (s)
            return s;
    }
    return MOE_OK;
}

static moe_tensor at(const moe_arena *a, moe_buf *buf, const char *name)
{
    const moe_view *v = moe_arena_find(a, name);
    return v ? (moe_tensor){buf, v->offset} : (moe_tensor){NULL, 0};
}

static void bind(moe_layer *l)
{
    const moe_arena *P = &l->params, *A = &l->acts;
#define BIND(field, gfield, name) (l->field = at(P, l->pbuf, name), l->gfield = at(P, l->gbuf, name))
    BIND(wr, gwr, "router.weight");
    BIND(wn, gwn, "router.noise");
    BIND(bias, gbias, "router.bias");
    BIND(w1, gw1, "experts.w1");
    BIND(w3, gw3, "experts.w3");
    BIND(w2, gw2, "experts.w2");
    BIND(sw1, gsw1, "shared.w1");
    BIND(sw3, gsw3, "shared.w3");
    BIND(sw2, gsw2, "shared.w2");
    BIND(sgate, gsgate, "shared.gate");
    BIND(rw1, grw1, "residual.w1");
    BIND(rw3, grw3, "residual.w3");
    BIND(rw2, grw2, "residual.w2");
    BIND(rcoef, grcoef, "residual.coef");
#undef BIND
#define S(field, name) (l->field = at(A, l->abuf, name))
    S(x, "x"); S(xr, "router.xr"); S(u, "router.u"); S(z, "router.z"); S(zn, "router.zn");
    S(eps, "router.eps"); S(h, "router.h"); S(s, "router.s"); S(imp, "aux.importance"); S(load, "aux.load");
    S(xe, "experts.x"); S(eh1, "experts.h1"); S(eh3, "experts.h3"); S(ea, "experts.a"); S(ye, "experts.y");
    S(moe, "moe.y"); S(sh1, "shared.h1"); S(sh3, "shared.h3"); S(sa, "shared.a"); S(sy, "shared.y");
    S(sgz, "shared.gz"); S(sg, "shared.g"); S(rh1, "residual.h1"); S(rh3, "residual.h3"); S(ra, "residual.a");
    S(ry, "residual.y"); S(rlogit, "residual.logit"); S(rc, "residual.c");
    S(dmoe, "d.moe"); S(dsy, "d.shared"); S(dsg, "d.shared.g"); S(dsgz, "d.shared.gz"); S(dry, "d.residual");
    S(drc, "d.residual.c"); S(drlogit, "d.residual.logit"); S(dxe, "d.experts.x"); S(dye, "d.experts.y");
    S(dweight, "d.weight"); S(dchoice, "d.choice"); S(ds, "d.s"); S(dh, "d.h"); S(dz, "d.z"); S(dzn, "d.zn");
    S(dxr, "d.xr"); S(dimp, "d.importance"); S(dload, "d.load");
#undef S
}

/* Scratch (elements) the ops may ask for, at most, for this layer. */
static int64_t scratch_need(const moe_layer *l, int64_t N)
{
    int64_t m = 2 * N * l->f;
    if (2 * l->max_T * l->Fs > m)
        m = 2 * l->max_T * l->Fs;
    if (2 * l->max_T * l->Fd > m)
        m = 2 * l->max_T * l->Fd;
    if (l->max_T * l->k_tc > m)
        m = l->max_T * l->k_tc;
    const int64_t M = l->c.n_tasks > 0 ? l->c.n_tasks : 1;
    int64_t mi = 2 * (3 * M + 2 * M * l->E + l->E), load = 2 * 512 * l->E;
    m = mi > m ? mi : m;
    return load > m ? load : m;
}

moe_status moe_layer_create(const moe_layer_config *c, moe_backend *b, int64_t max_tokens, const moe_exchange *ex,
                            moe_layer **out)
{
    if (!out)
        return moe_error(MOE_ERR_ARG, "layer: out must not be NULL");
    *out = NULL;
    if (!c || !b)
        return moe_error(MOE_ERR_ARG, "layer: config and backend must not be NULL");
    moe_status st = moe_layer_config_validate(c, max_tokens);
    if (st)
        return st;
    moe_layer *l = calloc(1, sizeof *l);
    if (!l)
        return moe_error(MOE_ERR_NOMEM, "layer: out of memory");
    l->c = *c;
    l->b = b;
    l->ex = ex ? ex : moe_exchange_local();
    l->max_T = max_tokens;
    l->d = c->d_model;
    l->f = c->d_ff;
    l->E = c->n_experts;
    l->glu = moe_act_is_glu(c->act);
    l->router = c->router != MOE_ROUTER_HASH;
    l->token_choice = c->router == MOE_ROUTER_TOPK || c->router == MOE_ROUTER_NOISY_TOPK ||
                      c->router == MOE_ROUTER_SINKHORN;
    l->k_tc = c->top_k;
    l->Fs = c->n_shared * (c->d_ff_shared > 0 ? c->d_ff_shared : c->d_ff);
    l->Fd = c->residual ? (c->d_ff_dense > 0 ? c->d_ff_dense : c->d_ff) : 0;
    const int64_t N = c->router == MOE_ROUTER_EXPERT_CHOICE ? l->E * moe_capacity(c, max_tokens)
                                                             : max_tokens * (c->router == MOE_ROUTER_HASH ? 1 : c->top_k);
    moe_arena_init(&l->params, b->elem_size);
    moe_arena_init(&l->grads, b->elem_size);
    moe_arena_init(&l->acts, b->elem_size);
    l->task = calloc((size_t)max_tokens, sizeof *l->task);
    l->imp_h = calloc((size_t)(3 * l->E), sizeof *l->imp_h);
    l->sel_h = calloc((size_t)l->E, sizeof *l->sel_h);
    if (!l->task || !l->imp_h || !l->sel_h) {
        moe_layer_free(l);
        return moe_error(MOE_ERR_NOMEM, "layer: out of memory");
    }
    l->load_h = l->imp_h + l->E;
    l->dv_h = l->load_h + l->E;
    if ((st = b->plan_create(b, c, max_tokens, &l->plan)) || (st = moe_layer_param_layout(c, &l->params)) ||
        (st = moe_layer_param_layout(c, &l->grads)) || (st = layout_acts(&l->acts, l, N)) ||
        (st = b->alloc(b, l->params.numel, &l->pbuf)) || (st = b->alloc(b, l->grads.numel, &l->gbuf)) ||
        (st = b->alloc(b, l->acts.numel, &l->abuf)) || (st = b->reserve(b, scratch_need(l, N)))) {
        if (st == MOE_ERR_NOMEM) {
            char why[1024];
            snprintf(why, sizeof why, "%s", moe_last_error());
            st = moe_error(st, "MoE layer %lld (hidden_size %lld, moe_intermediate_size %lld, num_local_experts %lld, "
                           "%lld tokens): %s", (long long)c->layer, (long long)c->d_model, (long long)c->d_ff,
                           (long long)c->n_experts, (long long)max_tokens, why);
        }
        moe_layer_free(l);
        return st;
    }
    bind(l);
    *out = l;
    return MOE_OK;
}

void moe_layer_free(moe_layer *l)
{
    if (!l)
        return;
    moe_backend *b = l->b;
    if (l->plan)
        b->plan_free(b, l->plan);
    if (l->pbuf)
        b->free(b, l->pbuf);
    if (l->gbuf)
        b->free(b, l->gbuf);
    if (l->abuf)
        b->free(b, l->abuf);
    moe_arena_free(&l->params);
    moe_arena_free(&l->grads);
    moe_arena_free(&l->acts);
    free(l->task);
    free(l->imp_h);
    free(l->sel_h);
    free(l);
}

const moe_layer_config *moe_layer_config_of(const moe_layer *l)
{
    return &l->c;
}

const moe_arena *moe_layer_params(const moe_layer *l)
{
    return &l->params;
}

static moe_status named(const moe_arena *a, const char *name, const moe_view **v)
{
    *v = name ? moe_arena_find(a, name) : NULL;
    if (!*v)
        return moe_error(MOE_ERR_ARG, "layer: no tensor named '%s'", name ? name : "(null)");
    return MOE_OK;
}

moe_status moe_layer_set_param(moe_layer *l, const char *name, const double *v)
{
    const moe_view *w;
    moe_status s = named(&l->params, name, &w);
    return s ? s : l->b->upload(l->b, (moe_tensor){l->pbuf, w->offset}, v, w->numel);
}

moe_status moe_layer_get_param(moe_layer *l, const char *name, double *v)
{
    const moe_view *w;
    moe_status s = named(&l->params, name, &w);
    return s ? s : l->b->download(l->b, v, (moe_tensor){l->pbuf, w->offset}, w->numel);
}

moe_status moe_layer_get_grad(moe_layer *l, const char *name, double *v)
{
    const moe_view *w;
    moe_status s = named(&l->params, name, &w);
    return s ? s : l->b->download(l->b, v, (moe_tensor){l->gbuf, w->offset}, w->numel);
}

moe_status moe_layer_get_saved(moe_layer *l, const char *name, double *v, int64_t n)
{
    const moe_view *w;
    moe_status s = named(&l->acts, name, &w);
    if (s)
        return s;
    if (n > w->numel)
        return moe_error(MOE_ERR_ARG, "layer: '%s' holds %lld elements, %lld asked", name, (long long)w->numel,
                         (long long)n);
    return l->b->download(l->b, v, (moe_tensor){l->abuf, w->offset}, n);
}

moe_status moe_layer_init(moe_layer *l, double scale)
{
    const uint32_t stream = MOE_RNG_INIT | (uint32_t)(l->c.layer << 8);
    for (int vi = 0; vi < l->params.n; vi++) {
        const moe_view *v = &l->params.views[vi];
        double *w = calloc((size_t)v->numel, sizeof *w);
        if (!w)
            return moe_error(MOE_ERR_NOMEM, "layer init: out of memory for '%s'", v->name);
        if (strcmp(v->name, "router.bias") != 0) {
            int64_t fan_in = v->ndim == 3 ? v->shape[1] : v->shape[0];
            double std = scale / sqrt((double)fan_in);
            for (int64_t i = 0; i < v->numel; i++)
                w[i] = std * moe_rand_normal(l->c.seed, stream, (uint32_t)vi, (uint32_t)i, (uint32_t)(i >> 32));
        }
        moe_status s = l->b->upload(l->b, (moe_tensor){l->pbuf, v->offset}, w, v->numel);
        free(w);
        if (s)
            return s;
    }
    return MOE_OK;
}

void moe_layer_zero_grad(moe_layer *l)
{
    l->b->fill(l->b, (moe_tensor){l->gbuf, 0}, 0.0, l->grads.numel);
}

const moe_bplan *moe_layer_plan(const moe_layer *l)
{
    return l->T ? l->plan : NULL;
}

moe_aux_losses moe_layer_aux(const moe_layer *l)
{
    return l->aux;
}

const double *moe_layer_phase_seconds(const moe_layer *l)
{
    return l->phase;
}

/* ---- forward ------------------------------------------------------------------- */

static moe_tensor *opt(moe_tensor *t)
{
    return t->buf ? t : NULL;
}

static void router_forward(moe_layer *l, int64_t T, uint64_t step, int training)
{
    moe_backend *b = l->b;
    const moe_layer_config *c = &l->c;
    const int64_t d = l->d, E = l->E;
    l->jittered = training && c->jitter_eps > 0;
    if (l->jittered)
        b->jitter_forward(b, l->xr, l->u, l->x, c->jitter_eps, c->seed, c->layer, step, T, d);
    else
        b->copy(b, l->xr, l->x, T * d);
    b->matmul_forward(b, l->z, l->xr, l->wr, T, d, E);
    if (c->router == MOE_ROUTER_NOISY_TOPK) {
        b->matmul_forward(b, l->zn, l->xr, l->wn, T, d, E);
        b->noisy_logits_forward(b, l->h, l->eps, l->z, l->zn, training, c->seed, c->layer, step, T, E);
    } else {
        b->copy(b, l->h, l->z, T * E);
    }
    b->scores_forward(b, l->s, l->h, c->score, T, E);
}

static moe_status aux_forward(moe_layer *l, int64_t T)
{
    moe_backend *b = l->b;
    const moe_layer_config *c = &l->c;
    const int64_t E = l->E;
    moe_aux_losses a = {0};
    moe_status st = MOE_OK;
    if (l->router) {
        a.lb = b->lb_loss_forward(b, l->s, l->plan, T, E);
        b->importance_forward(b, l->imp, l->plan);
        if ((st = b->download(b, l->imp_h, l->imp, E)))
            return st;
        a.importance = moe_ref_cv2_forward(l->imp_h, E);
        if (c->router == MOE_ROUTER_NOISY_TOPK) {
            b->noisy_load_forward(b, l->load, l->z, l->zn, l->h, c->top_k, T, E);
            st = b->download(b, l->load_h, l->load, E);
        } else { /* the selected counts: a plain count, no gradient */
            b->plan_stats(b, l->plan, NULL, NULL, NULL, l->sel_h);
            for (int64_t e = 0; e < E; e++)
                l->load_h[e] = (double)l->sel_h[e];
            st = b->upload(b, l->load, l->load_h, E);
        }
        if (st)
            return st;
        a.load = moe_ref_cv2_forward(l->load_h, E);
        a.z = b->z_loss_forward(b, l->z, T, E);
        if (c->n_tasks >= 1)
            a.mi = b->mi_loss_forward(b, l->s, l->task, c->n_tasks, T, E);
    }
    a.total = c->lb_coef * a.lb + c->importance_coef * a.importance + c->load_coef * a.load + c->z_coef * a.z +
              c->mi_coef * a.mi;
    l->aux = a;
    return MOE_OK;
}

/* moe += [sigmoid(x·gate) ⊙] shared(x) */
static void shared_forward(moe_layer *l, int64_t T)
{
    moe_backend *b = l->b;
    const int64_t d = l->d;
    b->ffn_forward(b, l->sy, l->sh1, l->sh3, l->sa, l->x, l->sw1, opt(&l->sw3), l->sw2, l->c.act, T, d, l->Fs);
    if (l->sgate.buf) {
        b->matmul_forward(b, l->sgz, l->x, l->sgate, T, d, 1);
        b->scores_forward(b, l->sg, l->sgz, MOE_SCORE_SIGMOID, T, 1);
        b->rowscale_forward(b, l->moe, l->sy, l->sg, 1, T, d);
    } else {
        b->add(b, l->moe, l->sy, T * d);
    }
}

/* y = c0·moe + c1·mlp(x), c = softmax(x·coef) */
static void residual_forward(moe_layer *l, moe_tensor y, int64_t T)
{
    moe_backend *b = l->b;
    const int64_t d = l->d;
    b->ffn_forward(b, l->ry, l->rh1, l->rh3, l->ra, l->x, l->rw1, opt(&l->rw3), l->rw2, l->c.act, T, d, l->Fd);
    b->matmul_forward(b, l->rlogit, l->x, l->rcoef, T, d, 2);
    b->scores_forward(b, l->rc, l->rlogit, MOE_SCORE_SOFTMAX, T, 2);
    b->fill(b, y, 0.0, T * d);
    b->rowscale_forward(b, y, l->moe, l->rc, 2, T, d);
    b->rowscale_forward(b, y, l->ry, moe_tensor_at(l->rc, 1), 2, T, d);
}

moe_status moe_layer_forward(moe_layer *l, moe_tensor y, moe_tensor x, const int32_t *token_ids,
                             const int32_t *task_ids, int64_t T, uint64_t step, int training)
{
    if (!l || !y.buf || !x.buf)
        return moe_error(MOE_ERR_ARG, "layer forward: layer, y and x must not be NULL");
    if (T <= 0 || T > l->max_T)
        return moe_error(MOE_ERR_ARG, "layer forward: T = %lld tokens outside [1, max_tokens = %lld]", (long long)T,
                         (long long)l->max_T);
    moe_status st = moe_layer_config_validate(&l->c, T);
    if (st)
        return st;
    const moe_layer_config *c = &l->c;
    if (token_ids)
        for (int64_t t = 0; t < T; t++)
            if (token_ids[t] < 0)
                return moe_error(MOE_ERR_ARG, "layer: token_ids[%lld] = %d is negative", (long long)t, token_ids[t]);
    if (task_ids && c->n_tasks >= 1)
        for (int64_t t = 0; t < T; t++)
            if (task_ids[t] < 0 || task_ids[t] >= c->n_tasks)
                return moe_error(MOE_ERR_ARG, "layer: task_ids[%lld] = %d outside [0, n_tasks = %lld)", (long long)t,
                                 task_ids[t], (long long)c->n_tasks);
    moe_backend *b = l->b;
    const int64_t d = l->d;
    l->T = 0;
    for (int i = 0; i < MOE_PH_COUNT; i++)
        l->phase[i] = 0;
    if (task_ids && c->n_tasks >= 1)
        memcpy(l->task, task_ids, (size_t)T * sizeof *task_ids);
    else
        memset(l->task, 0, (size_t)T * sizeof *l->task);

    double t0 = now(), t1;
    b->copy(b, l->x, x, T * d);
    if (l->router)
        router_forward(l, T, step, training);
    t1 = now();
    l->phase[MOE_PH_ROUTER] = t1 - t0;
    if ((st = b->route(b, l->plan, l->s, l->h, opt(&l->bias), token_ids, c, step, T)))
        return st;
    t0 = now();
    l->phase[MOE_PH_PLAN] = t0 - t1;
    if ((st = aux_forward(l, T)))
        return st;
    t1 = now();
    l->phase[MOE_PH_AUX] = t1 - t0;
    l->ex->dispatch_forward(l->ex, b, l->xe, l->x, l->plan, d);
    t0 = now();
    l->phase[MOE_PH_DISPATCH] = t0 - t1;
    b->experts_forward(b, l->ye, l->eh1, l->eh3, l->ea, l->xe, l->w1, opt(&l->w3), l->w2, l->plan, c->act, d, l->f);
    t1 = now();
    l->phase[MOE_PH_EXPERTS] = t1 - t0;
    l->ex->combine_forward(l->ex, b, l->moe, l->ye, l->plan, d);
    t0 = now();
    l->phase[MOE_PH_COMBINE] = t0 - t1;
    if (l->Fs)
        shared_forward(l, T);
    if (l->Fd)
        residual_forward(l, y, T);
    else
        b->copy(b, y, l->moe, T * d);
    l->phase[MOE_PH_SHARED] = now() - t0;
    l->T = T;
    return MOE_OK;
}

/* ---- backward ------------------------------------------------------------------- */

static moe_tensor residual_backward(moe_layer *l, moe_tensor dx, moe_tensor dy, int64_t T)
{
    moe_backend *b = l->b;
    const int64_t d = l->d;
    b->fill(b, l->dmoe, 0.0, T * d);
    b->fill(b, l->dry, 0.0, T * d);
    b->fill(b, l->drc, 0.0, 2 * T);
    moe_tensor drc1 = moe_tensor_at(l->drc, 1);
    b->rowscale_backward(b, &l->dmoe, &l->drc, dy, l->moe, l->rc, 2, T, d);
    b->rowscale_backward(b, &l->dry, &drc1, dy, l->ry, moe_tensor_at(l->rc, 1), 2, T, d);
    b->fill(b, l->drlogit, 0.0, 2 * T);
    b->scores_backward(b, l->drlogit, l->drc, l->rc, MOE_SCORE_SOFTMAX, T, 2);
    b->matmul_backward(b, &dx, &l->grcoef, l->drlogit, l->x, l->rcoef, T, d, 2);
    b->ffn_backward(b, &dx, l->grw1, opt(&l->grw3), l->grw2, l->dry, l->rh1, l->rh3, l->ra, l->x, l->rw1,
                    opt(&l->rw3), l->rw2, l->c.act, T, d, l->Fd);
    return l->dmoe;
}

static void shared_backward(moe_layer *l, moe_tensor dx, moe_tensor dmoe, int64_t T)
{
    moe_backend *b = l->b;
    const int64_t d = l->d;
    moe_tensor dsy = dmoe;
    if (l->sgate.buf) {
        b->fill(b, l->dsy, 0.0, T * d);
        b->fill(b, l->dsg, 0.0, T);
        b->fill(b, l->dsgz, 0.0, T);
        b->rowscale_backward(b, &l->dsy, &l->dsg, dmoe, l->sy, l->sg, 1, T, d);
        b->scores_backward(b, l->dsgz, l->dsg, l->sg, MOE_SCORE_SIGMOID, T, 1);
        b->matmul_backward(b, &dx, &l->gsgate, l->dsgz, l->x, l->sgate, T, d, 1);
        dsy = l->dsy;
    }
    b->ffn_backward(b, &dx, l->gsw1, opt(&l->gsw3), l->gsw2, dsy, l->sh1, l->sh3, l->sa, l->x, l->sw1, opt(&l->sw3),
                    l->sw2, l->c.act, T, d, l->Fs);
}

static moe_status router_backward(moe_layer *l, moe_tensor dx, int64_t T)
{
    moe_backend *b = l->b;
    const moe_layer_config *c = &l->c;
    const int64_t d = l->d, E = l->E;
    moe_status st;
    b->fill(b, l->ds, 0.0, T * E);
    b->fill(b, l->dh, 0.0, T * E);
    b->fill(b, l->dz, 0.0, T * E);
    b->fill(b, l->dzn, 0.0, T * E);
    b->fill(b, l->dxr, 0.0, T * d);
    if (l->dchoice.buf)
        b->fill(b, l->dchoice, 0.0, T * c->top_k);
    if (c->lb_coef > 0)
        b->lb_loss_backward(b, l->ds, c->lb_coef, l->plan, T, E);
    if (c->importance_coef > 0) {
        memset(l->dv_h, 0, (size_t)E * sizeof *l->dv_h);
        moe_ref_cv2_backward(l->dv_h, c->importance_coef, l->imp_h, E);
        if ((st = b->upload(b, l->dimp, l->dv_h, E)))
            return st;
        b->importance_backward(b, &l->dweight, opt(&l->dchoice), l->dimp, l->plan);
    }
    if (c->load_coef > 0 && c->router == MOE_ROUTER_NOISY_TOPK) {
        memset(l->dv_h, 0, (size_t)E * sizeof *l->dv_h);
        moe_ref_cv2_backward(l->dv_h, c->load_coef, l->load_h, E);
        if ((st = b->upload(b, l->dload, l->dv_h, E)))
            return st;
        b->noisy_load_backward(b, &l->dz, &l->dzn, &l->dh, l->dload, l->z, l->zn, l->h, c->top_k, T, E);
    }
    if (c->z_coef > 0)
        b->z_loss_backward(b, l->dz, c->z_coef, l->z, T, E);
    if (c->mi_coef > 0)
        b->mi_loss_backward(b, l->ds, c->mi_coef, l->s, l->task, c->n_tasks, T, E);
    b->route_backward(b, l->ds, &l->dweight, opt(&l->dchoice), l->plan, l->s, opt(&l->bias), c);
    b->scores_backward(b, l->dh, l->ds, l->s, c->score, T, E);
    if (c->router == MOE_ROUTER_NOISY_TOPK) {
        b->noisy_logits_backward(b, &l->dz, &l->dzn, l->dh, l->eps, l->zn, T, E);
        b->matmul_backward(b, &l->dxr, &l->gwn, l->dzn, l->xr, l->wn, T, d, E);
    } else {
        b->add(b, l->dz, l->dh, T * E);
    }
    b->matmul_backward(b, &l->dxr, &l->gwr, l->dz, l->xr, l->wr, T, d, E);
    if (l->jittered)
        b->jitter_backward(b, dx, l->dxr, l->u, T, d);
    else
        b->add(b, dx, l->dxr, T * d);
    return MOE_OK;
}

moe_status moe_layer_backward(moe_layer *l, moe_tensor dx, moe_tensor dy)
{
    if (!l || !dx.buf || !dy.buf)
        return moe_error(MOE_ERR_ARG, "layer backward: layer, dx and dy must not be NULL");
    if (!l->T)
        return moe_error(MOE_ERR_ARG, "layer backward: no successful forward to differentiate");
    moe_backend *b = l->b;
    const moe_layer_config *c = &l->c;
    const int64_t T = l->T, d = l->d;
    int64_t n = 0;
    b->plan_stats(b, l->plan, &n, NULL, NULL, NULL);

    double t0 = now(), t1;
    b->fill(b, dx, 0.0, T * d);
    moe_tensor dmoe = l->Fd ? residual_backward(l, dx, dy, T) : dy;
    if (l->Fs)
        shared_backward(l, dx, dmoe, T);
    t1 = now();
    l->phase[MOE_PH_B_SHARED] = t1 - t0;
    b->fill(b, l->dye, 0.0, n * d);
    b->fill(b, l->dweight, 0.0, n);
    b->fill(b, l->dxe, 0.0, n * d);
    l->ex->combine_backward(l->ex, b, l->dye, l->dweight, dmoe, l->ye, l->plan, d);
    t0 = now();
    l->phase[MOE_PH_B_COMBINE] = t0 - t1;
    b->experts_backward(b, l->dxe, l->gw1, opt(&l->gw3), l->gw2, l->dye, l->eh1, l->eh3, l->ea, l->xe, l->w1,
                        opt(&l->w3), l->w2, l->plan, c->act, d, l->f);
    t1 = now();
    l->phase[MOE_PH_B_EXPERTS] = t1 - t0;
    l->ex->dispatch_backward(l->ex, b, dx, l->dxe, l->plan, d);
    t0 = now();
    l->phase[MOE_PH_B_DISPATCH] = t0 - t1;
    moe_status st = l->router ? router_backward(l, dx, T) : MOE_OK;
    l->phase[MOE_PH_B_ROUTER] = now() - t0;
    return st;
}

void moe_layer_update_bias(moe_layer *l)
{
    if (!l || !l->bias.buf || !l->T)
        return;
    const int64_t E = l->E;
    moe_backend *b = l->b;
    b->plan_stats(b, l->plan, NULL, NULL, NULL, l->sel_h);
    if (b->download(b, l->dv_h, l->bias, E))
        return;
    double mean = 0;
    for (int64_t e = 0; e < E; e++)
        mean += (double)l->sel_h[e];
    mean /= (double)E;
    for (int64_t e = 0; e < E; e++) {
        double err = mean - (double)l->sel_h[e];
        l->dv_h[e] += l->c.bias_rate * (double)((err > 0) - (err < 0));
    }
    b->upload(b, l->bias, l->dv_h, E);
}

void moe_layer_buffers(const moe_layer *l, moe_tensor *params, moe_tensor *grads)
{
    if (params)
        *params = (moe_tensor){l->pbuf, 0};
    if (grads)
        *grads = (moe_tensor){l->gbuf, 0};
}
