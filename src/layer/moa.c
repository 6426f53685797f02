/*
 * Mixture of attention heads on any backend (moa.h): the router and its losses are the MoE
 * layer's ops, the heads the model's attention op with a token's k choices as k query heads
 * against one shared key/value head.
 */
#include <stdlib.h>
#include <string.h>

#include "layer/moa.h"
#include "layer/moe_layer.h"
#include "ref/ref.h"

struct moe_moa {
    moe_moa_dims d;       /* B, S: the maxima */
    moe_layer_config lc;  /* the router's */
    moe_backend *b;
    int64_t maxN, B, S;   /* B, S of the last forward (0: none, or a decode since) */
    moe_bplan *plan;
    moe_arena params, acts;
    moe_buf *pbuf, *gbuf, *abuf;
    moe_tensor wr, wk, wv, wq, wo, gwr, gwk, gwv, gwq, gwo;
    /* saved */
    moe_tensor x, z, s, stats, kk, v, xe, qe, q, att, ao, oe, ye, kc, vc;
    /* backward scratch */
    moe_tensor dye, dweight, doe, dao, dq, dk, dv, dqp, dkp, dqe, dxe, ds, dz;
};

static moe_status view(moe_arena *a, const char *name, int ndim, int64_t d0, int64_t d1, int64_t d2)
{
    const int64_t shape[3] = {d0, d1, d2};
    return moe_arena_add(a, name, ndim, shape);
}

static moe_tensor at(const moe_arena *a, moe_buf *buf, const char *name)
{
    const moe_view *v = moe_arena_find(a, name);
    return v ? (moe_tensor){buf, v->offset} : (moe_tensor){NULL, 0};
}

static moe_status layout(moe_moa *a)
{
    const moe_moa_dims *d = &a->d;
    const int64_t C = d->C, hd = d->hd, E = d->E, k = d->k, N = a->maxN, n = N * k;
    const int64_t att = a->b->attention_saved(a->b, d->B, d->S, k);
    moe_status s;
    if ((s = view(&a->params, "router.weight", 2, C, E, 0)) || (s = view(&a->params, "k_proj.weight", 2, C, hd, 0)) ||
        (s = view(&a->params, "v_proj.weight", 2, C, hd, 0)) ||
        (s = view(&a->params, "experts.q_proj", 3, E, C, hd)) || (s = view(&a->params, "experts.o_proj", 3, E, hd, C)))
        return s;
    const struct { const char *name; int64_t rows, cols; } v[] = {
        {"x", N, C},       {"z", N, E},       {"s", N, E},       {"stats", 1, MOE_LAYER_NSTATS(E)},
        {"k", N, hd},      {"v", N, hd},      {"xe", n, C},      {"qe", n, hd},
        {"q", n, hd},      {"att", 1, att},   {"ao", n, hd},     {"oe", n, hd},
        {"ye", n, C},      {"kc", d->S, hd},  {"vc", d->S, hd},  {"d.ye", n, C},
        {"d.weight", 1, n}, {"d.oe", n, hd},  {"d.ao", n, hd},   {"d.q", n, hd},
        {"d.k", N, hd},    {"d.v", N, hd},    {"d.qp", n, hd},   {"d.kp", N, hd},
        {"d.qe", n, hd},   {"d.xe", n, C},    {"d.s", N, E},     {"d.z", N, E},
    };
    for (size_t i = 0; i < sizeof v / sizeof v[0]; i++)
        if ((s = view(&a->acts, v[i].name, 2, v[i].rows, v[i].cols, 0)))
            return s;
    return MOE_OK;
}

static void bind(moe_moa *a)
{
    const moe_arena *P = &a->params, *A = &a->acts;
    a->wr = at(P, a->pbuf, "router.weight"), a->gwr = at(P, a->gbuf, "router.weight");
    a->wk = at(P, a->pbuf, "k_proj.weight"), a->gwk = at(P, a->gbuf, "k_proj.weight");
    a->wv = at(P, a->pbuf, "v_proj.weight"), a->gwv = at(P, a->gbuf, "v_proj.weight");
    a->wq = at(P, a->pbuf, "experts.q_proj"), a->gwq = at(P, a->gbuf, "experts.q_proj");
    a->wo = at(P, a->pbuf, "experts.o_proj"), a->gwo = at(P, a->gbuf, "experts.o_proj");
#define S(field, name) (a->field = at(A, a->abuf, name))
    S(x, "x"); S(z, "z"); S(s, "s"); S(stats, "stats"); S(kk, "k"); S(v, "v"); S(xe, "xe"); S(qe, "qe"); S(q, "q");
    S(att, "att"); S(ao, "ao"); S(oe, "oe"); S(ye, "ye"); S(kc, "kc"); S(vc, "vc"); S(dye, "d.ye");
    S(dweight, "d.weight"); S(doe, "d.oe"); S(dao, "d.ao"); S(dq, "d.q"); S(dk, "d.k"); S(dv, "d.v"); S(dqp, "d.qp");
    S(dkp, "d.kp"); S(dqe, "d.qe"); S(dxe, "d.xe"); S(ds, "d.s"); S(dz, "d.z");
#undef S
}

moe_status moe_moa_create(const moe_moa_dims *d, int64_t layer, uint64_t seed, moe_backend *b, moe_moa **out)
{
    if (!out)
        return moe_error(MOE_ERR_ARG, "moa: out must not be NULL");
    *out = NULL;
    if (!d || !b)
        return moe_error(MOE_ERR_ARG, "moa: dimensions and backend must not be NULL");
    if (d->B < 1 || d->S < 1 || d->C < 1 || d->hd < 2 || d->hd % 2 || d->E < 1 || d->k < 1 || d->k > d->E ||
        d->B > INT32_MAX / d->S / d->k)
        return moe_error(MOE_ERR_ARG, "moa: attention_experts %lld, attention_experts_per_tok %lld (1 <= k <= E), "
                         "head_dim %lld (even), batch %lld x seq %lld", (long long)d->E, (long long)d->k,
                         (long long)d->hd, (long long)d->B, (long long)d->S);
    moe_moa *a = calloc(1, sizeof *a);
    if (!a)
        return moe_error(MOE_ERR_NOMEM, "moa: out of memory");
    a->d = *d;
    a->b = b;
    a->maxN = d->B * d->S;
    moe_moa_router_config(d, layer, seed, &a->lc);
    const moe_dtype ft = b->float_type;
    moe_arena_init(&a->params, moe_dtype_size(ft));
    moe_arena_init(&a->acts, moe_dtype_size(ft));
    const moe_workload w = {.layer = &a->lc, .tokens = a->maxN, .rows = a->maxN * d->k, .batch = d->B, .seq = d->S,
                            .heads = d->k, .kv_heads = 1, .head_dim = d->hd};
    moe_status s;
    if ((s = moe_layer_config_validate(&a->lc, a->maxN)) || (s = layout(a)) ||
        (s = b->alloc(b, ft, a->params.numel, &a->pbuf)) || (s = b->alloc(b, ft, a->params.numel, &a->gbuf)) ||
        (s = b->alloc(b, ft, a->acts.numel, &a->abuf)) || (s = b->plan_create(b, &a->lc, a->maxN, &a->plan)) ||
        (s = b->reserve(b, &w))) {
        moe_moa_free(a);
        return s;
    }
    bind(a);
    *out = a;
    return MOE_OK;
}

void moe_moa_free(moe_moa *a)
{
    if (!a)
        return;
    moe_backend *b = a->b;
    if (a->plan)
        b->plan_free(b, a->plan);
    if (a->pbuf)
        b->free(b, a->pbuf);
    if (a->gbuf)
        b->free(b, a->gbuf);
    if (a->abuf)
        b->free(b, a->abuf);
    moe_arena_free(&a->params);
    moe_arena_free(&a->acts);
    free(a);
}

const moe_layer_config *moe_moa_router(const moe_moa *a)
{
    return &a->lc;
}

const moe_arena *moe_moa_params(const moe_moa *a)
{
    return &a->params;
}

moe_status moe_moa_param_tensors(const moe_moa *a, const char *name, moe_tensor *param, moe_tensor *grad)
{
    if (!name || !moe_arena_find(&a->params, name))
        return moe_error(MOE_ERR_ARG, "moa: no parameter named '%s'", name ? name : "(null)");
    if (param)
        *param = at(&a->params, a->pbuf, name);
    if (grad)
        *grad = at(&a->params, a->gbuf, name);
    return MOE_OK;
}

void moe_moa_zero_grad(moe_moa *a)
{
    a->b->fill(a->b, (moe_tensor){a->gbuf, 0}, 0.0, a->params.numel);
}

moe_tensor moe_moa_stats(const moe_moa *a)
{
    return a->stats;
}

const moe_bplan *moe_moa_plan(const moe_moa *a)
{
    return a->B ? a->plan : NULL;
}

/* The router over T tokens of x: logits, scores, the plan, its counts and the aux losses. */
static void route(moe_moa *a, int64_t T, moe_key key)
{
    moe_backend *b = a->b;
    const int64_t C = a->d.C, E = a->d.E;
    b->matmul_forward(b, a->z, a->x, a->wr, T, C, E);
    b->scores_forward(b, a->s, a->z, MOE_SCORE_SOFTMAX, T, E);
    b->route(b, a->plan, a->s, a->z, NULL, NULL, &a->lc, key, T);
    b->fill(b, a->stats, 0.0, MOE_LAYER_NSTATS(E));
    b->plan_counts(b, moe_tensor_at(a->stats, MOE_STAT_COUNTS), a->plan);
    b->lb_loss_forward(b, moe_tensor_at(a->stats, MOE_STAT_LB), a->s, a->plan, T, E);
    b->z_loss_forward(b, moe_tensor_at(a->stats, MOE_STAT_Z), a->z, T, E);
}

/* qe = x_t·Wq[e] for each kept (token, expert), in plan order, then into the choice slots */
static void queries(moe_moa *a)
{
    moe_backend *b = a->b;
    const int64_t C = a->d.C, hd = a->d.hd;
    b->dispatch_forward(b, a->xe, a->x, a->plan, C);
    b->experts_linear_forward(b, a->qe, a->xe, a->wq, a->plan, C, hd);
    b->choice_scatter(b, a->q, a->qe, a->plan, hd);
}

/* y = Σ_e g·(o_e·Wo[e]) from the heads' outputs in the choice slots */
static void outputs(moe_moa *a, moe_tensor y)
{
    moe_backend *b = a->b;
    const int64_t C = a->d.C, hd = a->d.hd;
    b->plan_fill(b, a->oe, 0.0, a->plan, hd);
    b->choice_gather(b, a->oe, a->ao, a->plan, hd);
    b->experts_linear_forward(b, a->ye, a->oe, a->wo, a->plan, hd, C);
    b->combine_forward(b, y, a->ye, a->plan, C);
}

moe_status moe_moa_forward(moe_moa *a, moe_tensor y, moe_tensor x, int64_t B, int64_t S, moe_key key)
{
    if (!a || !y.buf || !x.buf)
        return moe_error(MOE_ERR_ARG, "moa forward: layer, y and x must not be NULL");
    if (B < 1 || B > a->d.B || S < 1 || S > a->d.S)
        return moe_error(MOE_ERR_ARG, "moa forward: batch %lld x sequence %lld outside [1, %lld] x [1, %lld]",
                         (long long)B, (long long)S, (long long)a->d.B, (long long)a->d.S);
    moe_backend *b = a->b;
    const int64_t N = B * S, C = a->d.C, hd = a->d.hd, k = a->d.k;
    const double theta = a->d.rope_theta;
    a->B = 0;
    b->copy(b, a->x, x, N * C);
    route(a, N, key);
    b->matmul_forward(b, a->kk, a->x, a->wk, N, C, hd);
    b->rope_forward(b, a->kk, a->kk, 0, theta, B, S, 1, hd);
    b->matmul_forward(b, a->v, a->x, a->wv, N, C, hd);
    queries(a);
    b->rope_forward(b, a->q, a->q, 0, theta, B, S, k, hd);
    b->attention_forward(b, a->ao, a->att, a->q, a->kk, a->v, B, S, k, 1, hd);
    outputs(a, y);
    a->B = B;
    a->S = S;
    return MOE_OK;
}

moe_status moe_moa_backward(moe_moa *a, moe_tensor dx, moe_tensor dy)
{
    if (!a || !dx.buf || !dy.buf)
        return moe_error(MOE_ERR_ARG, "moa backward: layer, dx and dy must not be NULL");
    if (!a->B)
        return moe_error(MOE_ERR_ARG, "moa backward: no forward to differentiate (or a decode overwrote it)");
    moe_backend *b = a->b;
    const int64_t B = a->B, S = a->S, N = B * S, C = a->d.C, hd = a->d.hd, E = a->d.E, k = a->d.k;
    const double theta = a->d.rope_theta;
    /* y = combine(oe·Wo): the rows' gradients, the gates', then the heads' outputs in their slots */
    b->plan_fill(b, a->dye, 0.0, a->plan, C);
    b->plan_fill(b, a->dweight, 0.0, a->plan, 1);
    b->combine_backward(b, a->dye, a->dweight, dy, a->ye, a->plan, C);
    b->plan_fill(b, a->doe, 0.0, a->plan, hd);
    b->experts_linear_backward(b, &a->doe, a->gwo, a->dye, a->oe, a->wo, a->plan, hd, C);
    b->choice_scatter(b, a->dao, a->doe, a->plan, hd);
    /* the heads */
    b->fill(b, a->dq, 0.0, N * k * hd);
    b->fill(b, a->dk, 0.0, N * hd);
    b->fill(b, a->dv, 0.0, N * hd);
    b->attention_backward(b, a->dq, a->dk, a->dv, a->dao, a->ao, a->att, a->q, a->kk, a->v, B, S, k, 1, hd);
    b->fill(b, a->dqp, 0.0, N * k * hd);
    b->fill(b, a->dkp, 0.0, N * hd);
    b->rope_backward(b, a->dqp, a->dq, 0, theta, B, S, k, hd);
    b->rope_backward(b, a->dkp, a->dk, 0, theta, B, S, 1, hd);
    /* the queries back to the plan's rows, through Wq, to x */
    b->plan_fill(b, a->dqe, 0.0, a->plan, hd);
    b->choice_gather(b, a->dqe, a->dqp, a->plan, hd);
    b->plan_fill(b, a->dxe, 0.0, a->plan, C);
    b->experts_linear_backward(b, &a->dxe, a->gwq, a->dqe, a->xe, a->wq, a->plan, C, hd);
    b->dispatch_backward(b, dx, a->dxe, a->plan, C);
    b->matmul_backward(b, &dx, &a->gwk, a->dkp, a->x, a->wk, N, C, hd);
    b->matmul_backward(b, &dx, &a->gwv, a->dv, a->x, a->wv, N, C, hd);
    /* the router: gates, load-balance loss, softmax, z-loss, logits */
    b->fill(b, a->ds, 0.0, N * E);
    b->fill(b, a->dz, 0.0, N * E);
    if (a->lc.lb_coef > 0)
        b->lb_loss_backward(b, a->ds, a->lc.lb_coef, a->plan, N, E);
    b->route_backward(b, a->ds, &a->dweight, NULL, a->plan, a->s, NULL, &a->lc);
    b->scores_backward(b, a->dz, a->ds, a->s, MOE_SCORE_SOFTMAX, N, E);
    if (a->lc.z_coef > 0)
        b->z_loss_backward(b, a->dz, a->lc.z_coef, a->z, N, E);
    b->matmul_backward(b, &dx, &a->gwr, a->dz, a->x, a->wr, N, C, E);
    return MOE_OK;
}

moe_status moe_moa_decode(moe_moa *a, moe_tensor y, moe_tensor x, int64_t pos)
{
    if (!a || !y.buf || !x.buf)
        return moe_error(MOE_ERR_ARG, "moa decode: layer, y and x must not be NULL");
    if (pos < 0 || pos >= a->d.S)
        return moe_error(MOE_ERR_ARG, "moa decode: position %lld outside [0, %lld)", (long long)pos,
                         (long long)a->d.S);
    moe_backend *b = a->b;
    const int64_t C = a->d.C, hd = a->d.hd, k = a->d.k;
    const double theta = a->d.rope_theta;
    a->B = 0;
    b->copy(b, a->x, x, C);
    route(a, 1, MOE_KEY_STEP(0));
    b->matmul_forward(b, a->kk, a->x, a->wk, 1, C, hd);
    b->rope_forward(b, a->kk, a->kk, pos, theta, 1, 1, 1, hd);
    b->copy(b, moe_tensor_at(a->kc, pos * hd), a->kk, hd);
    b->matmul_forward(b, moe_tensor_at(a->vc, pos * hd), a->x, a->wv, 1, C, hd);
    queries(a);
    b->rope_forward(b, a->q, a->q, pos, theta, 1, 1, k, hd);
    b->attention_decode(b, a->ao, a->q, a->kc, a->vc, pos, k, 1, hd);
    outputs(a, y);
    return MOE_OK;
}
