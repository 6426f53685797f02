/*
 * The MoE layer on any backend. The composition is ref/moe_layer.c's, op for op:
 *
 *   xr = jitter(x)                      (training, jitter_eps > 0; feeds the router only)
 *   z  = xr·Wr,  h = z [+ ε·softplus(xr·Wnoise)],  s = softmax(h) or sigmoid(h)
 *   plan = route(s, h, bias)            aux losses from s, z, h and the plan
 *   moe = combine(experts(dispatch(x))) [+ sigmoid(x·g) ⊙] shared(x)
 *   y  = moe, or with Residual-MoE  c = softmax(x·coef), y = c0·moe + c1·mlp(x)
 *
 * Tensors live in backend buffers laid out by arenas at create time (parameters,
 * gradients, saved activations + backward scratch, the scalars) under the reference
 * layer's names. Nothing crosses to the host inside forward or backward: the aux losses,
 * the cv² of importance and load, the counts and the bias update are backend ops, and
 * the layer never dereferences backend memory.
 *
 * The experts' rows travel through the exchange (exchange.h): dispatch gathers the
 * source-side rows in plan order, the exchange moves each chunk to the expert side,
 * the experts run on it while the next chunk travels, and the results come back the
 * same way before combine. With the local exchange both sides are one buffer.
 */
#define _POSIX_C_SOURCE 200809L /* clock_gettime */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "layer/moe_layer.h"
#include "ref/ref.h"

const char *moe_layer_phase_name(int ph)
{
    static const char *names[MOE_PH_COUNT] = {
        "router", "plan", "aux", "dispatch", "experts", "combine", "shared",
        "bwd.shared", "bwd.combine", "bwd.experts", "bwd.dispatch", "bwd.router",
    };
    return ph >= 0 && ph < MOE_PH_COUNT ? names[ph] : "?";
}

/* ---- the layer ------------------------------------------------------------------ */

struct moe_layer {
    moe_layer_config c;
    moe_backend *b;
    moe_exchange *ex, *own_ex; /* own_ex: the local exchange made when none was given */
    moe_xstate *xs;
    int64_t max_T, T;        /* T: tokens of the last successful forward, 0: none */
    int64_t d, f, E, El, Fs, Fd, k_tc, N, R; /* El local experts; N source rows, R expert-side rows */
    int glu, router, token_choice, jittered;
    moe_bplan *plan;
    /* Layouts only; the memory is the backend's. params: every parameter (names, shapes);
     * pw/pc its router part, in the wide type, and the rest, in the compute type (the same
     * type on cpu and ref; fp32 beside bf16 on a GPU); aw/ac the activations likewise. */
    moe_arena params, pw, pc, aw, ac;
    moe_buf *pwbuf, *pcbuf, *gwbuf, *gcbuf, *awbuf, *acbuf;
    moe_tensor task;         /* the last forward's task ids (.buf NULL: none) */
    double phase[MOE_PH_COUNT];
    moe_layer_source_fn source_hook; /* takes each source's expert weight gradients (NULL: they add up) */
    void *source_ctx;

    /* parameters and gradients; .buf NULL when the option is off */
    moe_tensor wr, wn, bias, w1, w3, w2, sw1, sw3, sw2, sgate, rw1, rw3, rw2, rcoef;
    moe_tensor gwr, gwn, gbias, gw1, gw3, gw2, gsw1, gsw3, gsw2, gsgate, grw1, grw3, grw2, grcoef;
    /* saved: router, source side (plan order), expert side, shared and residual branches */
    moe_tensor x, xr, u, z, zn, eps, h, s, imp, load, stats;
    moe_tensor xsrc, ysrc, xe, eh1, eh3, ea, ye, moe;
    moe_tensor sh1, sh3, sa, sy, sgz, sg, rh1, rh3, ra, ry, rlogit, rc;
    /* backward scratch */
    moe_tensor dmoe, dsy, dsg, dsgz, dry, drc, drlogit, dxsrc, dysrc, dxe, dye, dg1, dg3, dweight, dchoice;
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

/* The router's tensors, the losses and the counts are kept in the wide type. */
static int is_wide(const char *name)
{
    static const char *const wide[] = {"router.", "aux.", "stats", "d.s", "d.h", "d.z", "d.zn", "d.xr",
                                       "d.importance", "d.load", "d.weight", "d.choice"};
    for (size_t i = 0; i < sizeof wide / sizeof wide[0]; i++) {
        const size_t n = strlen(wide[i]);
        if (!strncmp(name, wide[i], n) && (wide[i][n - 1] == '.' || name[n] == 0))
            return 1;
    }
    return 0;
}

static moe_status layout_acts(moe_arena *aw, moe_arena *ac, const moe_layer *l)
{
    const int64_t T = l->max_T, d = l->d, f = l->f, E = l->E, N = l->N, R = l->R;
    const int sh = l->Fs > 0, gate = sh && l->c.shared_gate, res = l->Fd > 0, apart = !l->ex->in_place;
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
        {"stats", 1, MOE_LAYER_NSTATS(E), 1},
        /* the source side in plan order; the expert side is the same buffer when in place */
        {"dispatch.x", N, d, apart},
        {"combine.y", N, d, apart},
        {"experts.x", R, d, 1},
        {"experts.h1", R, f, 1},
        {"experts.h3", R, f, l->glu},
        {"experts.a", R, f, 1},
        {"experts.y", R, d, 1},
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
        {"d.dispatch.x", N, d, apart},
        {"d.combine.y", N, d, apart},
        {"d.experts.x", R, d, 1},
        {"d.experts.y", R, d, 1},
        {"d.experts.g1", R, f, 1},
        {"d.experts.g3", R, f, l->glu},
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
        moe_status s = add(is_wide(v[i].name) ? aw : ac, v[i].name, 2, v[i].rows, v[i].cols, 0);
        if (s)
            return s;
    }
    return MOE_OK;
}

/* pw, pc: the parameters of the full layout split by type, in its order. */
static moe_status layout_params(moe_layer *l)
{
    for (int i = 0; i < l->params.n; i++) {
        const moe_view *v = &l->params.views[i];
        moe_status s = moe_arena_add(is_wide(v->name) ? &l->pw : &l->pc, v->name, v->ndim, v->shape);
        if (s)
            return s;
    }
    return MOE_OK;
}

/* Where a parameter (and its gradient) or an activation lives. */
static moe_tensor at2(const moe_layer *l, const char *name, int grad)
{
    const moe_view *v = moe_arena_find(&l->pw, name);
    if (v)
        return (moe_tensor){grad ? l->gwbuf : l->pwbuf, v->offset};
    v = moe_arena_find(&l->pc, name);
    return v ? (moe_tensor){grad ? l->gcbuf : l->pcbuf, v->offset} : (moe_tensor){NULL, 0};
}

static moe_tensor act(const moe_layer *l, const char *name)
{
    const moe_view *v = moe_arena_find(&l->aw, name);
    if (v)
        return (moe_tensor){l->awbuf, v->offset};
    v = moe_arena_find(&l->ac, name);
    return v ? (moe_tensor){l->acbuf, v->offset} : (moe_tensor){NULL, 0};
}

static void bind(moe_layer *l)
{
#define BIND(field, gfield, name) (l->field = at2(l, name, 0), l->gfield = at2(l, name, 1))
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
#define S(field, name) (l->field = act(l, name))
    S(x, "x"); S(xr, "router.xr"); S(u, "router.u"); S(z, "router.z"); S(zn, "router.zn");
    S(eps, "router.eps"); S(h, "router.h"); S(s, "router.s"); S(imp, "aux.importance"); S(load, "aux.load");
    S(stats, "stats");
    S(xe, "experts.x"); S(eh1, "experts.h1"); S(eh3, "experts.h3"); S(ea, "experts.a"); S(ye, "experts.y");
    S(moe, "moe.y"); S(sh1, "shared.h1"); S(sh3, "shared.h3"); S(sa, "shared.a"); S(sy, "shared.y");
    S(sgz, "shared.gz"); S(sg, "shared.g"); S(rh1, "residual.h1"); S(rh3, "residual.h3"); S(ra, "residual.a");
    S(ry, "residual.y"); S(rlogit, "residual.logit"); S(rc, "residual.c");
    S(dmoe, "d.moe"); S(dsy, "d.shared"); S(dsg, "d.shared.g"); S(dsgz, "d.shared.gz"); S(dry, "d.residual");
    S(drc, "d.residual.c"); S(drlogit, "d.residual.logit"); S(dxe, "d.experts.x"); S(dye, "d.experts.y");
    S(dg1, "d.experts.g1"); S(dg3, "d.experts.g3");
    S(dweight, "d.weight"); S(dchoice, "d.choice"); S(ds, "d.s"); S(dh, "d.h"); S(dz, "d.z"); S(dzn, "d.zn");
    S(dxr, "d.xr"); S(dimp, "d.importance"); S(dload, "d.load");
    if (l->ex->in_place) { /* one buffer serves both sides */
        l->xsrc = l->xe; l->ysrc = l->ye; l->dxsrc = l->dxe; l->dysrc = l->dye;
    } else {
        S(xsrc, "dispatch.x"); S(ysrc, "combine.y"); S(dxsrc, "d.dispatch.x"); S(dysrc, "d.combine.y");
    }
#undef S
}

moe_status moe_layer_create(const moe_layer_config *c, moe_backend *b, int64_t max_tokens, moe_exchange *ex,
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
    if (ex && (ex->shards < 1 || c->n_experts % ex->shards || ex->shard < 0 || ex->shard >= ex->shards))
        return moe_error(MOE_ERR_ARG, "layer: %lld experts do not split over %lld expert-parallel ranks (use a "
                         "divisor of %lld)", (long long)c->n_experts, (long long)ex->shards,
                         (long long)c->n_experts);
    moe_layer *l = calloc(1, sizeof *l);
    if (!l)
        return moe_error(MOE_ERR_NOMEM, "layer: out of memory");
    l->c = *c;
    l->b = b;
    if (!ex && (st = moe_exchange_local_create(&l->own_ex))) {
        free(l);
        return st;
    }
    l->ex = ex ? ex : l->own_ex;
    l->max_T = max_tokens;
    l->d = c->d_model;
    l->f = c->d_ff;
    l->E = c->n_experts;
    l->El = l->E / l->ex->shards;
    l->glu = moe_act_is_glu(c->act);
    l->router = c->router != MOE_ROUTER_HASH;
    l->token_choice = c->router == MOE_ROUTER_TOPK || c->router == MOE_ROUTER_NOISY_TOPK ||
                      c->router == MOE_ROUTER_SINKHORN;
    l->k_tc = c->top_k;
    l->Fs = c->n_shared * (c->d_ff_shared > 0 ? c->d_ff_shared : c->d_ff);
    l->Fd = c->residual ? (c->d_ff_dense > 0 ? c->d_ff_dense : c->d_ff) : 0;
    l->N = c->router == MOE_ROUTER_EXPERT_CHOICE ? l->E * moe_capacity(c, max_tokens)
                                                  : max_tokens * (c->router == MOE_ROUTER_HASH ? 1 : c->top_k);
    const moe_dtype ct = b->float_type, wt = ct == MOE_F64 ? MOE_F64 : MOE_F32;
    moe_arena_init(&l->params, moe_dtype_size(ct));
    moe_arena_init(&l->pw, moe_dtype_size(wt));
    moe_arena_init(&l->pc, moe_dtype_size(ct));
    moe_arena_init(&l->aw, moe_dtype_size(wt));
    moe_arena_init(&l->ac, moe_dtype_size(ct));
    if ((st = l->ex->state_create(l->ex, b, c, max_tokens, &l->xs))) {
        moe_layer_free(l);
        return st;
    }
    l->R = l->ex->in_place ? l->N : l->ex->expert_rows(l->xs);
    const moe_workload w = {.layer = c, .tokens = max_tokens, .rows = l->N > l->R ? l->N : l->R};
    if ((st = b->plan_create(b, c, max_tokens, &l->plan)) ||
        (st = moe_layer_param_layout_local(c, l->El, &l->params)) || (st = layout_params(l)) ||
        (st = layout_acts(&l->aw, &l->ac, l)) || (st = b->alloc(b, wt, l->pw.numel, &l->pwbuf)) ||
        (st = b->alloc(b, wt, l->pw.numel, &l->gwbuf)) || (st = b->alloc(b, ct, l->pc.numel, &l->pcbuf)) ||
        (st = b->alloc(b, ct, l->pc.numel, &l->gcbuf)) || (st = b->alloc(b, wt, l->aw.numel, &l->awbuf)) ||
        (st = b->alloc(b, ct, l->ac.numel, &l->acbuf)) || (st = b->reserve(b, &w))) {
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
    if (l->xs)
        l->ex->state_free(l->xs);
    moe_exchange_free(l->own_ex);
    moe_buf *bufs[] = {l->pwbuf, l->gwbuf, l->pcbuf, l->gcbuf, l->awbuf, l->acbuf};
    for (size_t i = 0; i < sizeof bufs / sizeof bufs[0]; i++)
        if (bufs[i])
            b->free(b, bufs[i]);
    moe_arena *arenas[] = {&l->params, &l->pw, &l->pc, &l->aw, &l->ac};
    for (size_t i = 0; i < sizeof arenas / sizeof arenas[0]; i++)
        moe_arena_free(arenas[i]);
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

moe_status moe_layer_param_tensors(const moe_layer *l, const char *name, moe_tensor *param, moe_tensor *grad)
{
    const moe_view *w;
    moe_status s = named(&l->params, name, &w);
    if (s)
        return s;
    if (param)
        *param = at2(l, name, 0);
    if (grad)
        *grad = at2(l, name, 1);
    return MOE_OK;
}

moe_status moe_layer_set_param(moe_layer *l, const char *name, const double *v)
{
    const moe_view *w;
    moe_status s = named(&l->params, name, &w);
    return s ? s : moe_upload_f64(l->b, at2(l, name, 0), v, w->numel);
}

moe_status moe_layer_get_param(moe_layer *l, const char *name, double *v)
{
    const moe_view *w;
    moe_status s = named(&l->params, name, &w);
    return s ? s : moe_download_f64(l->b, v, at2(l, name, 0), w->numel);
}

moe_status moe_layer_get_grad(moe_layer *l, const char *name, double *v)
{
    const moe_view *w;
    moe_status s = named(&l->params, name, &w);
    return s ? s : moe_download_f64(l->b, v, at2(l, name, 1), w->numel);
}

moe_status moe_layer_get_saved(moe_layer *l, const char *name, double *v, int64_t n)
{
    const moe_view *w = name ? moe_arena_find(&l->aw, name) : NULL;
    moe_status s = w ? MOE_OK : named(&l->ac, name, &w);
    if (s)
        return s;
    if (n > w->numel)
        return moe_error(MOE_ERR_ARG, "layer: '%s' holds %lld elements, %lld asked", name, (long long)w->numel,
                         (long long)n);
    return moe_download_f64(l->b, v, act(l, name), n);
}

moe_status moe_layer_init(moe_layer *l, double scale)
{
    const uint32_t stream = moe_rng_stream(MOE_RNG_INIT, l->c.layer, MOE_KEY_STEP(0));
    for (int vi = 0; vi < l->params.n; vi++) {
        const moe_view *v = &l->params.views[vi];
        double *w = calloc((size_t)v->numel, sizeof *w);
        if (!w)
            return moe_error(MOE_ERR_NOMEM, "layer init: out of memory for '%s'", v->name);
        /* a shard draws the elements it holds of the whole tensor: the same weights under any split */
        const int64_t base = strncmp(v->name, "experts.", 8) ? 0 : l->ex->shard * v->numel;
        if (strcmp(v->name, "router.bias") != 0) {
            int64_t fan_in = v->ndim == 3 ? v->shape[1] : v->shape[0];
            double std = scale / sqrt((double)fan_in);
            /* counter-based draws: any thread count gives the same numbers */
#pragma omp parallel for schedule(static) if (v->numel > (1 << 16))
            for (int64_t i = 0; i < v->numel; i++) {
                const int64_t g = base + i;
                w[i] = std * moe_rand_normal(l->c.seed, stream, (uint32_t)vi, (uint32_t)g, (uint32_t)(g >> 32));
            }
        }
        moe_status s = moe_upload_f64(l->b, at2(l, v->name, 0), w, v->numel);
        free(w);
        if (s)
            return s;
    }
    return l->b->sync(l->b);
}

void moe_layer_zero_grad(moe_layer *l)
{
    l->b->fill(l->b, (moe_tensor){l->gwbuf, 0}, 0.0, l->pw.numel);
    l->b->fill(l->b, (moe_tensor){l->gcbuf, 0}, 0.0, l->pc.numel);
}

const moe_bplan *moe_layer_plan(const moe_layer *l)
{
    return l->T ? l->plan : NULL;
}

moe_tensor moe_layer_stats(const moe_layer *l)
{
    return l->stats;
}

moe_aux_losses moe_layer_aux_of(const moe_layer_config *c, const double *st)
{
    moe_aux_losses a = {st[MOE_STAT_LB], st[MOE_STAT_IMPORTANCE], st[MOE_STAT_LOAD], st[MOE_STAT_Z], st[MOE_STAT_MI],
                        0};
    a.total = c->lb_coef * a.lb + c->importance_coef * a.importance + c->load_coef * a.load + c->z_coef * a.z +
              c->mi_coef * a.mi;
    return a;
}

moe_status moe_layer_aux(moe_layer *l, moe_aux_losses *out)
{
    double st[MOE_STAT_COUNTS];
    moe_status s = moe_download_f64(l->b, st, l->stats, MOE_STAT_COUNTS);
    if (!s)
        *out = moe_layer_aux_of(&l->c, st);
    return s;
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

static moe_tensor stat(const moe_layer *l, int i)
{
    return moe_tensor_at(l->stats, i);
}

static void router_forward(moe_layer *l, int64_t T, moe_key key, int training)
{
    moe_backend *b = l->b;
    const moe_layer_config *c = &l->c;
    const int64_t d = l->d, E = l->E;
    l->jittered = training && c->jitter_eps > 0;
    if (l->jittered)
        b->jitter_forward(b, l->xr, l->u, l->x, c->jitter_eps, c->seed, c->layer, key, T, d);
    else
        b->copy(b, l->xr, l->x, T * d);
    b->matmul_forward(b, l->z, l->xr, l->wr, T, d, E);
    if (c->router == MOE_ROUTER_NOISY_TOPK) {
        b->matmul_forward(b, l->zn, l->xr, l->wn, T, d, E);
        b->noisy_logits_forward(b, l->h, l->eps, l->z, l->zn, training, c->seed, c->layer, key, T, E);
    } else {
        b->copy(b, l->h, l->z, T * E);
    }
    b->scores_forward(b, l->s, l->h, c->score, T, E);
}

/* The plan's counts, summed over every rank, then the aux losses into the stats. */
static moe_status aux_forward(moe_layer *l, int64_t T)
{
    moe_backend *b = l->b;
    const moe_layer_config *c = &l->c;
    const int64_t E = l->E;
    b->fill(b, l->stats, 0.0, MOE_STAT_COUNTS);
    b->plan_counts(b, stat(l, MOE_STAT_COUNTS), l->plan);
    moe_status st = l->ex->sum(l->ex, b, stat(l, MOE_STAT_COUNTS), 2 * E + 2);
    if (st || !l->router)
        return st;
    b->lb_loss_forward(b, stat(l, MOE_STAT_LB), l->s, l->plan, T, E);
    b->importance_forward(b, l->imp, l->plan);
    b->cv2_forward(b, stat(l, MOE_STAT_IMPORTANCE), l->imp, E);
    if (c->router == MOE_ROUTER_NOISY_TOPK) /* Shazeer's smooth estimator */
        b->noisy_load_forward(b, l->load, l->z, l->zn, l->h, c->top_k, T, E);
    else /* the selected counts: a plain count, no gradient */
        b->copy(b, l->load, stat(l, MOE_STAT_COUNTS + E), E);
    b->cv2_forward(b, stat(l, MOE_STAT_LOAD), l->load, E);
    b->z_loss_forward(b, stat(l, MOE_STAT_Z), l->z, T, E);
    if (c->n_tasks >= 1)
        b->mi_loss_forward(b, stat(l, MOE_STAT_MI), l->s, l->task, c->n_tasks, T, E);
    return MOE_OK;
}

/* The experts on the rows of the last plan, through the exchange in chunks: chunk c's
 * experts run while the next chunks travel. */
static moe_status experts_forward(moe_layer *l)
{
    moe_backend *b = l->b;
    moe_exchange *ex = l->ex;
    const int64_t d = l->d, f = l->f, D = ex->chunks;
    moe_status st = MOE_OK;
    for (int64_t c = 0; c < D; c++)
        ex->to_experts_start(l->xs, c, l->xe, l->xsrc, d);
    for (int64_t c = 0; c < D && !st; c++) {
        if ((st = ex->to_experts_wait(l->xs, c)))
            break;
        for (int64_t src = 0; src < ex->sources; src++)
            b->experts_forward(b, l->ye, l->eh1, l->eh3, l->ea, l->xe, l->w1, opt(&l->w3), l->w2,
                               ex->chunk(l->xs, c, src), l->c.act, d, f);
        ex->to_sources_start(l->xs, c, l->ysrc, l->ye, d);
    }
    for (int64_t c = 0; c < D && !st; c++)
        st = ex->to_sources_wait(l->xs, c);
    return st;
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

moe_status moe_layer_forward(moe_layer *l, moe_tensor y, moe_tensor x, const moe_tensor *token_ids,
                             const moe_tensor *task_ids, int64_t T, moe_key key, int training)
{
    if (!l || !y.buf || !x.buf)
        return moe_error(MOE_ERR_ARG, "layer forward: layer, y and x must not be NULL");
    if (T <= 0 || T > l->max_T)
        return moe_error(MOE_ERR_ARG, "layer forward: T = %lld tokens outside [1, max_tokens = %lld]", (long long)T,
                         (long long)l->max_T);
    if (key.micro > 0xFFF)
        return moe_error(MOE_ERR_ARG, "layer forward: micro-batch %u outside [0, 4095]", key.micro);
    moe_status st = moe_layer_config_validate(&l->c, T);
    if (st)
        return st;
    const moe_layer_config *c = &l->c;
    if (c->mi_coef > 0 && c->n_tasks >= 1 && !task_ids)
        return moe_error(MOE_ERR_ARG, "layer forward: the mutual-information loss needs task ids (num_tasks = %lld)",
                         (long long)c->n_tasks);
    moe_backend *b = l->b;
    const int64_t d = l->d;
    l->T = 0;
    l->task = task_ids ? *task_ids : (moe_tensor){NULL, 0};
    for (int i = 0; i < MOE_PH_COUNT; i++)
        l->phase[i] = 0;

    double t0 = now(), t1;
    b->copy(b, l->x, x, T * d);
    if (l->router)
        router_forward(l, T, key, training);
    t1 = now();
    l->phase[MOE_PH_ROUTER] = t1 - t0;
    b->route(b, l->plan, l->s, l->h, opt(&l->bias), (moe_tensor *)token_ids, c, key, T);
    t0 = now();
    l->phase[MOE_PH_PLAN] = t0 - t1;
    if ((st = aux_forward(l, T)))
        return st;
    t1 = now();
    l->phase[MOE_PH_AUX] = t1 - t0;
    b->dispatch_forward(b, l->xsrc, l->x, l->plan, d);
    if ((st = l->ex->plan(l->xs, l->plan, T)))
        return st;
    t0 = now();
    l->phase[MOE_PH_DISPATCH] = t0 - t1;
    if ((st = experts_forward(l)))
        return st;
    t1 = now();
    l->phase[MOE_PH_EXPERTS] = t1 - t0;
    b->combine_forward(b, l->moe, l->ysrc, l->plan, d);
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

/* dye from the sources; per chunk the data half of the experts' backward, dxe going back
 * while the next chunk computes; then the weight gradients once, over every row. */
static moe_status experts_backward(moe_layer *l)
{
    moe_backend *b = l->b;
    moe_exchange *ex = l->ex;
    const int64_t d = l->d, f = l->f, D = ex->chunks;
    moe_status st = MOE_OK;
    for (int64_t c = 0; c < D; c++)
        ex->to_experts_start(l->xs, c, l->dye, l->dysrc, d);
    for (int64_t c = 0; c < D && !st; c++) {
        if ((st = ex->to_experts_wait(l->xs, c)))
            break;
        for (int64_t src = 0; src < ex->sources; src++) {
            const moe_bplan *p = ex->chunk(l->xs, c, src);
            b->plan_fill(b, l->dxe, 0.0, p, d);
            b->experts_backward_data(b, l->dxe, l->dg1, opt(&l->dg3), l->dye, l->eh1, l->eh3, l->w1, opt(&l->w3),
                                     l->w2, p, l->c.act, d, f);
        }
        ex->to_sources_start(l->xs, c, l->dxsrc, l->dxe, d);
    }
    /* with a hook, each source's weight gradients alone in the (zeroed) gradient tensors */
    const int64_t n1 = l->El * d * f;
    for (int64_t src = 0; src < ex->sources && !st; src++) {
        if (l->source_hook) {
            b->fill(b, l->gw1, 0.0, n1);
            if (l->gw3.buf)
                b->fill(b, l->gw3, 0.0, n1);
            b->fill(b, l->gw2, 0.0, n1);
        }
        b->experts_backward_weights(b, l->gw1, opt(&l->gw3), l->gw2, l->dg1, opt(&l->dg3), l->dye, l->ea, l->xe,
                                    ex->chunk(l->xs, -1, src), l->c.act, d, f);
        if (l->source_hook)
            st = l->source_hook(l->source_ctx, l, src);
    }
    for (int64_t c = 0; c < D && !st; c++)
        st = ex->to_sources_wait(l->xs, c);
    return st;
}

void moe_layer_set_source_hook(moe_layer *l, moe_layer_source_fn fn, void *ctx)
{
    l->source_hook = fn;
    l->source_ctx = ctx;
}

static void router_backward(moe_layer *l, moe_tensor dx, int64_t T)
{
    moe_backend *b = l->b;
    const moe_layer_config *c = &l->c;
    const int64_t d = l->d, E = l->E;
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
        b->fill(b, l->dimp, 0.0, E);
        b->cv2_backward(b, l->dimp, c->importance_coef, l->imp, E);
        b->importance_backward(b, &l->dweight, opt(&l->dchoice), l->dimp, l->plan);
    }
    if (c->load_coef > 0 && c->router == MOE_ROUTER_NOISY_TOPK) {
        b->fill(b, l->dload, 0.0, E);
        b->cv2_backward(b, l->dload, c->load_coef, l->load, E);
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
}

moe_status moe_layer_backward(moe_layer *l, moe_tensor dx, moe_tensor dy)
{
    if (!l || !dx.buf || !dy.buf)
        return moe_error(MOE_ERR_ARG, "layer backward: layer, dx and dy must not be NULL");
    if (!l->T)
        return moe_error(MOE_ERR_ARG, "layer backward: no successful forward to differentiate");
    moe_backend *b = l->b;
    const int64_t T = l->T, d = l->d;

    double t0 = now(), t1;
    b->fill(b, dx, 0.0, T * d);
    moe_tensor dmoe = l->Fd ? residual_backward(l, dx, dy, T) : dy;
    if (l->Fs)
        shared_backward(l, dx, dmoe, T);
    t1 = now();
    l->phase[MOE_PH_B_SHARED] = t1 - t0;
    b->plan_fill(b, l->dysrc, 0.0, l->plan, d);
    b->plan_fill(b, l->dweight, 0.0, l->plan, 1);
    b->combine_backward(b, l->dysrc, l->dweight, dmoe, l->ysrc, l->plan, d);
    t0 = now();
    l->phase[MOE_PH_B_COMBINE] = t0 - t1;
    moe_status st = experts_backward(l);
    if (st)
        return st;
    t1 = now();
    l->phase[MOE_PH_B_EXPERTS] = t1 - t0;
    b->dispatch_backward(b, dx, l->dxsrc, l->plan, d);
    t0 = now();
    l->phase[MOE_PH_B_DISPATCH] = t0 - t1;
    if (l->router)
        router_backward(l, dx, T);
    l->phase[MOE_PH_B_ROUTER] = now() - t0;
    return MOE_OK;
}

void moe_layer_update_bias(moe_layer *l)
{
    if (l && l->bias.buf && l->T) /* the selected counts, global since aux_forward summed them */
        l->b->bias_update(l->b, l->bias, stat(l, MOE_STAT_COUNTS + l->E), l->c.bias_rate, l->E);
}
