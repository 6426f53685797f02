/*
 * Every op of a backend against the ref backend (check.h): the dense and router ops,
 * selection, the plan-based losses, dispatch / experts / combine (and the mixture of attention
 * heads' grouped linear map and choice slots), over a table of shapes
 * (T prime, E = 1, k = E, experts without tokens, all tokens to one expert, capacity
 * overflow, and larger shapes that take the fast GEMM paths). The language model's ops and
 * the MoE layer as a whole are in check_model.c.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "backend/check_impl.h"
#include "ref/ref.h"

/* ---- the harness ---------------------------------------------------------------------- */

void ck_shape(ck *c, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(c->shape, sizeof c->shape, fmt, ap);
    va_end(ap);
}

int ck_want(const ck *c, const char *op)
{
    return !c->only || !strncmp(op, c->only, strlen(c->only));
}

void ck_row(ck *c, const char *op, double err, double tol, const char *note)
{
    if (!ck_want(c, op))
        return;
    moe_check_row r = {op, c->shape, err, tol, err <= tol, note};
    c->rows++;
    if (!r.ok)
        c->failed++;
    if (c->report)
        c->report(&r, c->ctx);
}

/* A backend error (sticky) as a failed row; 1 when there was one. */
static int op_error(ck *c, moe_backend *b, const char *op)
{
    moe_status s = b->sync(b);
    if (s == MOE_OK)
        return 0;
    char note[600];
    snprintf(note, sizeof note, "%s: %s", b == c->R ? "ref" : "backend", moe_last_error());
    ck_row(c, op, INFINITY, c->tol, note);
    return 1;
}

pair ck_mk(ck *c, moe_dtype t, int64_t n, const double *host)
{
    pair p = {NULL, NULL, n > 0 ? n : 1};
    double *h = malloc((size_t)p.n * sizeof *h);
    if (!h || c->B->alloc(c->B, t, p.n, &p.b) || c->R->alloc(c->R, c->R->float_type, p.n, &p.r)) {
        c->oom = 1;
        free(h);
        return p;
    }
    if (host && n > 0) {
        /* the backend's own rounding of the values, then the same numbers to ref */
        moe_upload_f64(c->B, (moe_tensor){p.b, 0}, host, n);
        moe_download_f64(c->B, h, (moe_tensor){p.b, 0}, n);
        moe_upload_f64(c->R, (moe_tensor){p.r, 0}, h, n);
    } else {
        for (int64_t i = 0; i < p.n; i++)
            h[i] = NAN; /* poison: an element the backend leaves unwritten fails */
        moe_upload_f64(c->B, (moe_tensor){p.b, 0}, h, p.n);
        moe_upload_f64(c->R, (moe_tensor){p.r, 0}, h, p.n);
    }
    free(h);
    return p;
}

void ck_randn(double *x, int64_t n, double scale, uint64_t seed)
{
    for (int64_t i = 0; i < n; i++)
        x[i] = scale * moe_rand_normal(seed, 77, 0, (uint32_t)i, (uint32_t)(i >> 32));
}

pair ck_rand(ck *c, moe_dtype t, int64_t n, double scale)
{
    double *h = malloc((size_t)(n > 0 ? n : 1) * sizeof *h);
    if (!h) {
        c->oom = 1;
        return (pair){NULL, NULL, 0};
    }
    ck_randn(h, n, scale, c->seed + (uint64_t)c->draws++);
    pair p = ck_mk(c, t, n, h);
    free(h);
    return p;
}

pair ck_ids(ck *c, const int32_t *ids, int64_t n)
{
    pair p = {NULL, NULL, n};
    if (c->B->alloc(c->B, MOE_I32, n, &p.b) || c->R->alloc(c->R, MOE_I32, n, &p.r)) {
        c->oom = 1;
        return p;
    }
    c->B->upload(c->B, (moe_tensor){p.b, 0}, ids, MOE_I32, n);
    c->R->upload(c->R, (moe_tensor){p.r, 0}, ids, MOE_I32, n);
    return p;
}

void ck_drop(ck *c, pair p)
{
    if (p.b)
        c->B->free(c->B, p.b);
    if (p.r)
        c->R->free(c->R, p.r);
}

/* ‖a − r‖ / ‖r‖ (‖a − r‖ when r is 0), NaN -> inf */
double ck_rel(const double *a, const double *r, int64_t n)
{
    double num = 0, den = 0;
    for (int64_t i = 0; i < n; i++) {
        if (isnan(a[i]) || isnan(r[i]))
            return INFINITY;
        num += (a[i] - r[i]) * (a[i] - r[i]);
        den += r[i] * r[i];
    }
    return den > 0 ? sqrt(num / den) : sqrt(num);
}

void ck_cmp_n(ck *c, const char *op, pair p, int64_t n)
{
    if (!ck_want(c, op) || n <= 0)
        return;
    if (op_error(c, c->B, op) || op_error(c, c->R, op))
        return;
    double *a = malloc((size_t)n * sizeof *a), *r = malloc((size_t)n * sizeof *r);
    if (!a || !r) {
        c->oom = 1;
        free(a);
        free(r);
        return;
    }
    moe_status s = moe_download_f64(c->B, a, (moe_tensor){p.b, 0}, n);
    if (!s)
        s = moe_download_f64(c->R, r, (moe_tensor){p.r, 0}, n);
    if (s)
        ck_row(c, op, INFINITY, c->tol, moe_last_error());
    else
        ck_row(c, op, ck_rel(a, r, n), c->tol, NULL);
    free(a);
    free(r);
}

void ck_cmp(ck *c, const char *op, pair p)
{
    ck_cmp_n(c, op, p, p.n);
}

/* ---- shapes ------------------------------------------------------------------------------ */

typedef struct {
    int64_t T, d, f, E, k;
    double cf;   /* capacity factor */
    int skew;    /* 0 random scores; 1 experts E/2.. get no token; 2 all tokens to expert 0 first */
    int big;     /* left out of --quick */
} shape;

static const shape shapes[] = {
    {37, 24, 40, 8, 2, 0, 0, 0},     /* T prime, dropless */
    {13, 16, 24, 1, 1, 0, 0, 0},     /* E = 1 */
    {11, 12, 20, 4, 4, 0, 0, 0},     /* k = E */
    {29, 20, 36, 6, 2, 0, 1, 0},     /* experts with no token */
    {23, 16, 24, 5, 1, 0, 2, 0},     /* all tokens to one expert */
    {41, 16, 28, 4, 2, 0.5, 0, 0},   /* capacity overflow */
    {31, 8, 12, 3, 2, 0.75, 2, 0},   /* overflow of one expert */
    {67, 64, 136, 4, 2, 0, 0, 0},    /* several tiles of N and K on the fast GEMM paths */
    {2053, 64, 136, 4, 2, 0, 1, 0},  /* rows enough to split the weight gradients (gpu/gemm.cu), 2 experts empty */
    {509, 64, 136, 8, 2, 0, 0, 1},   /* T prime, several tiles per expert */
    {1031, 128, 256, 16, 4, 1.0, 0, 1}, /* many experts, capacity */
};
#define NSHAPES (int)(sizeof shapes / sizeof shapes[0])

static void base_config(moe_layer_config *lc, const shape *s)
{
    moe_layer_config_default(lc);
    lc->d_model = s->d;
    lc->d_ff = s->f;
    lc->n_experts = s->E;
    lc->top_k = s->k;
    lc->capacity_factor = s->cf;
}

/* Logits whose skew sends tokens where the shape asks. */
static double *logits(const shape *s, uint64_t seed)
{
    double *z = malloc((size_t)(s->T * s->E) * sizeof *z);
    if (!z)
        return NULL;
    ck_randn(z, s->T * s->E, 1.0, seed);
    for (int64_t t = 0; t < s->T; t++)
        for (int64_t e = 0; e < s->E; e++) {
            if (s->skew == 1 && e >= s->E / 2 && s->E > 1)
                z[t * s->E + e] -= 20;
            if (s->skew == 2 && e == 0)
                z[t * s->E + e] = 6 + 0.5 * z[t * s->E + e];
        }
    return z;
}

#define W MOE_F32
#define TB(p) ((moe_tensor){(p).b, 0})
#define TR(p) ((moe_tensor){(p).r, 0})

/* ---- dense ops ---------------------------------------------------------------------------- */

static void check_dense(ck *c, const shape *s)
{
    moe_backend *B = c->B, *R = c->R;
    const moe_dtype C = c->ct;
    pair x = ck_rand(c, C, s->T * s->d, 1), w = ck_rand(c, C, s->d * s->f, 0.3), out = ck_mk(c, C, s->T * s->f, NULL);
    B->matmul_forward(B, TB(out), TB(x), TB(w), s->T, s->d, s->f);
    R->matmul_forward(R, TR(out), TR(x), TR(w), s->T, s->d, s->f);
    ck_cmp(c, "matmul", out);
    pair dout = ck_rand(c, C, s->T * s->f, 1), dx = ck_rand(c, C, s->T * s->d, 1), dw = ck_rand(c, C, s->d * s->f, 1);
    moe_tensor bdx = TB(dx), bdw = TB(dw), rdx = TR(dx), rdw = TR(dw);
    B->matmul_backward(B, &bdx, &bdw, TB(dout), TB(x), TB(w), s->T, s->d, s->f);
    R->matmul_backward(R, &rdx, &rdw, TR(dout), TR(x), TR(w), s->T, s->d, s->f);
    ck_cmp(c, "matmul dx", dx);
    ck_cmp(c, "matmul dw", dw);
    /* rowscale (shared gate, residual mix) and add; the scale read with a stride */
    pair a = ck_rand(c, C, s->T * 2, 1), y = ck_rand(c, C, s->T * s->f, 1), da = ck_rand(c, C, s->T * 2, 1);
    B->rowscale_forward(B, TB(y), TB(out), moe_tensor_at(TB(a), 1), 2, s->T, s->f);
    R->rowscale_forward(R, TR(y), TR(out), moe_tensor_at(TR(a), 1), 2, s->T, s->f);
    ck_cmp(c, "rowscale", y);
    moe_tensor bda = moe_tensor_at(TB(da), 1), rda = moe_tensor_at(TR(da), 1), bdv = TB(dout), rdv = TR(dout);
    B->rowscale_backward(B, &bdv, &bda, TB(y), TB(out), moe_tensor_at(TB(a), 1), 2, s->T, s->f);
    R->rowscale_backward(R, &rdv, &rda, TR(y), TR(out), moe_tensor_at(TR(a), 1), 2, s->T, s->f);
    ck_cmp(c, "rowscale dv", dout);
    ck_cmp(c, "rowscale da", da);
    B->add(B, TB(y), TB(dout), s->T * s->f);
    R->add(R, TR(y), TR(dout), s->T * s->f);
    ck_cmp(c, "add", y);
    /* a converting copy: compute type -> f32 (the router's input) */
    pair xw = ck_mk(c, W, s->T * s->d, NULL);
    B->copy(B, TB(xw), TB(x), s->T * s->d);
    R->copy(R, TR(xw), TR(x), s->T * s->d);
    ck_cmp(c, "copy", xw);
    pair all[] = {x, w, out, dout, dx, dw, a, y, da, xw};
    for (size_t i = 0; i < sizeof all / sizeof all[0]; i++)
        ck_drop(c, all[i]);
}

/* ---- router ops ---------------------------------------------------------------------------- */

static void check_router(ck *c, const shape *s)
{
    moe_backend *B = c->B, *R = c->R;
    const int64_t T = s->T, E = s->E, d = s->d;
    double *zh = logits(s, c->seed + 1000);
    if (!zh) {
        c->oom = 1;
        return;
    }
    pair z = ck_mk(c, W, T * E, zh), zn = ck_rand(c, W, T * E, 1), sc = ck_mk(c, W, T * E, NULL);
    for (int fn = 0; fn < 2; fn++) {
        B->scores_forward(B, TB(sc), TB(z), (moe_score_fn)fn, T, E);
        R->scores_forward(R, TR(sc), TR(z), (moe_score_fn)fn, T, E);
        ck_cmp(c, fn ? "sigmoid" : "softmax", sc);
        pair ds = ck_rand(c, W, T * E, 1), dz = ck_rand(c, W, T * E, 1);
        B->scores_backward(B, TB(dz), TB(ds), TB(sc), (moe_score_fn)fn, T, E);
        R->scores_backward(R, TR(dz), TR(ds), TR(sc), (moe_score_fn)fn, T, E);
        ck_cmp(c, fn ? "sigmoid backward" : "softmax backward", dz);
        ck_drop(c, ds);
        ck_drop(c, dz);
    }
    /* the shared-expert gate and the residual mix score in the compute type */
    pair zc = ck_rand(c, c->ct, T * 2, 1), sc2 = ck_mk(c, c->ct, T * 2, NULL);
    B->scores_forward(B, TB(sc2), TB(zc), MOE_SCORE_SOFTMAX, T, 2);
    R->scores_forward(R, TR(sc2), TR(zc), MOE_SCORE_SOFTMAX, T, 2);
    ck_cmp(c, "softmax (compute type)", sc2);
    /* jitter: x and dx in the compute type, the router's side in f32 */
    pair x = ck_rand(c, c->ct, T * d, 1), xr = ck_mk(c, W, T * d, NULL), u = ck_mk(c, W, T * d, NULL);
    pair dx = ck_rand(c, c->ct, T * d, 1);
    B->jitter_forward(B, TB(xr), TB(u), TB(x), 0.1, 77, 3, (moe_key){5, 1, 100}, T, d);
    R->jitter_forward(R, TR(xr), TR(u), TR(x), 0.1, 77, 3, (moe_key){5, 1, 100}, T, d);
    ck_cmp(c, "jitter xr", xr);
    ck_cmp(c, "jitter u", u);
    B->jitter_backward(B, TB(dx), TB(xr), TB(u), T, d);
    R->jitter_backward(R, TR(dx), TR(xr), TR(u), T, d);
    ck_cmp(c, "jitter dx", dx);
    /* noisy logits and the smooth load */
    pair h = ck_mk(c, W, T * E, NULL), eps = ck_mk(c, W, T * E, NULL), load = ck_mk(c, W, E, NULL);
    for (int training = 0; training < 2; training++) {
        B->noisy_logits_forward(B, TB(h), TB(eps), TB(z), TB(zn), training, 9, 1, MOE_KEY_STEP(2), T, E);
        R->noisy_logits_forward(R, TR(h), TR(eps), TR(z), TR(zn), training, 9, 1, MOE_KEY_STEP(2), T, E);
        ck_cmp(c, "noisy h", h);
        ck_cmp(c, "noisy eps", eps);
    }
    pair dh = ck_rand(c, W, T * E, 1), dz = ck_rand(c, W, T * E, 1), dzn = ck_rand(c, W, T * E, 1);
    moe_tensor bz = TB(dz), bzn = TB(dzn), rz = TR(dz), rzn = TR(dzn), bh = TB(dh), rh = TR(dh);
    B->noisy_logits_backward(B, &bz, &bzn, TB(dh), TB(eps), TB(zn), T, E);
    R->noisy_logits_backward(R, &rz, &rzn, TR(dh), TR(eps), TR(zn), T, E);
    ck_cmp(c, "noisy dz", dz);
    ck_cmp(c, "noisy dzn", dzn);
    B->noisy_load_forward(B, TB(load), TB(z), TB(zn), TB(h), s->k, T, E);
    R->noisy_load_forward(R, TR(load), TR(z), TR(zn), TR(h), s->k, T, E);
    ck_cmp(c, "noisy load", load);
    pair dload = ck_rand(c, W, E, 1);
    B->noisy_load_backward(B, &bz, &bzn, &bh, TB(dload), TB(z), TB(zn), TB(h), s->k, T, E);
    R->noisy_load_backward(R, &rz, &rzn, &rh, TR(dload), TR(z), TR(zn), TR(h), s->k, T, E);
    ck_cmp(c, "noisy load dz", dz);
    ck_cmp(c, "noisy load dzn", dzn);
    ck_cmp(c, "noisy load dh", dh);
    /* z-loss and mutual information */
    pair out = ck_mk(c, W, 1, NULL);
    B->z_loss_forward(B, TB(out), TB(z), T, E);
    R->z_loss_forward(R, TR(out), TR(z), T, E);
    ck_cmp(c, "z loss", out);
    B->z_loss_backward(B, TB(dz), 0.3, TB(z), T, E);
    R->z_loss_backward(R, TR(dz), 0.3, TR(z), T, E);
    ck_cmp(c, "z loss dz", dz);
    int32_t *task_h = malloc((size_t)T * sizeof *task_h);
    if (task_h) {
        for (int64_t t = 0; t < T; t++)
            task_h[t] = (int32_t)(t * 7 % 3);
        pair task = ck_ids(c, task_h, T);
        B->scores_forward(B, TB(sc), TB(z), MOE_SCORE_SOFTMAX, T, E);
        R->scores_forward(R, TR(sc), TR(z), MOE_SCORE_SOFTMAX, T, E);
        B->mi_loss_forward(B, TB(out), TB(sc), TB(task), 3, T, E);
        R->mi_loss_forward(R, TR(out), TR(sc), TR(task), 3, T, E);
        ck_cmp(c, "mi loss", out);
        B->mi_loss_backward(B, TB(dz), 0.7, TB(sc), TB(task), 3, T, E);
        R->mi_loss_backward(R, TR(dz), 0.7, TR(sc), TR(task), 3, T, E);
        ck_cmp(c, "mi loss ds", dz);
        ck_drop(c, task);
        free(task_h);
    }
    free(zh);
    pair all[] = {z, zn, sc, zc, sc2, x, xr, u, dx, h, eps, load, dh, dz, dzn, dload, out};
    for (size_t i = 0; i < sizeof all / sizeof all[0]; i++)
        ck_drop(c, all[i]);
}

/* ---- selection ---------------------------------------------------------------------------- */

typedef struct {
    moe_router_kind router;
    moe_second_policy second;
    moe_drop_policy drop;
    int bias, renorm;
    moe_score_fn score;
} route_case;

static const route_case route_cases[] = {
    {MOE_ROUTER_TOPK, MOE_SECOND_ALL, MOE_DROP_POSITION, 0, 1, MOE_SCORE_SOFTMAX},
    {MOE_ROUTER_TOPK, MOE_SECOND_ALL, MOE_DROP_PROBABILITY, 0, 0, MOE_SCORE_SOFTMAX},
    {MOE_ROUTER_TOPK, MOE_SECOND_ALL, MOE_DROP_POSITION, 1, 1, MOE_SCORE_SIGMOID},
    {MOE_ROUTER_TOPK, MOE_SECOND_SAMPLING, MOE_DROP_POSITION, 0, 1, MOE_SCORE_SOFTMAX},
    {MOE_ROUTER_TOPK, MOE_SECOND_RANDOM, MOE_DROP_PROBABILITY, 1, 1, MOE_SCORE_SOFTMAX},
    {MOE_ROUTER_NOISY_TOPK, MOE_SECOND_ALL, MOE_DROP_POSITION, 0, 1, MOE_SCORE_SOFTMAX},
    {MOE_ROUTER_EXPERT_CHOICE, MOE_SECOND_ALL, MOE_DROP_POSITION, 0, 0, MOE_SCORE_SOFTMAX},
    {MOE_ROUTER_HASH, MOE_SECOND_ALL, MOE_DROP_POSITION, 0, 0, MOE_SCORE_SOFTMAX},
    {MOE_ROUTER_SINKHORN, MOE_SECOND_ALL, MOE_DROP_POSITION, 0, 1, MOE_SCORE_SOFTMAX},
};
#define NROUTE (int)(sizeof route_cases / sizeof route_cases[0])

/* Config of (shape, route case), or 0 when the combination is not a valid config. */
static int route_config(moe_layer_config *lc, const shape *s, const route_case *rc)
{
    base_config(lc, s);
    lc->router = rc->router;
    lc->second_policy = rc->second;
    lc->drop_policy = rc->drop;
    lc->use_bias = rc->bias;
    lc->renormalize = rc->renorm;
    lc->score = rc->score;
    if (rc->router == MOE_ROUTER_EXPERT_CHOICE && lc->capacity_factor <= 0)
        lc->capacity_factor = 1.5;
    if (rc->router == MOE_ROUTER_HASH) {
        lc->top_k = 1;
        lc->capacity_factor = 0;
    }
    return moe_layer_config_validate(lc, s->T) == MOE_OK;
}

moe_plan *ck_host_plan(const moe_layer_config *lc, int64_t T)
{
    const int64_t k = lc->router == MOE_ROUTER_EXPERT_CHOICE ? moe_capacity(lc, T) : lc->top_k;
    const int64_t n = lc->router == MOE_ROUTER_EXPERT_CHOICE ? lc->n_experts * k : T * k;
    moe_plan *p = NULL;
    moe_plan_create(n, T, lc->n_experts, k, &p);
    return p;
}

/* exact: n, dropped, capacity, token, expert, choice, offsets; weights to the tolerance */
static void same_plan(ck *c, const char *op, const moe_plan *a, const moe_plan *r)
{
    char note[200] = "";
    if (moe_plan_check(a))
        snprintf(note, sizeof note, "invalid plan: %s", moe_last_error());
    else if (a->n != r->n || a->dropped != r->dropped || a->capacity != r->capacity)
        snprintf(note, sizeof note, "n %lld/%lld dropped %lld/%lld capacity %lld/%lld", (long long)a->n,
                 (long long)r->n, (long long)a->dropped, (long long)r->dropped, (long long)a->capacity,
                 (long long)r->capacity);
    for (int64_t i = 0; !*note && i < r->n; i++)
        if (a->token[i] != r->token[i] || a->expert[i] != r->expert[i] || a->choice[i] != r->choice[i])
            snprintf(note, sizeof note, "row %lld: token %d/%d expert %d/%d choice %lld/%lld", (long long)i,
                     a->token[i], r->token[i], a->expert[i], r->expert[i], (long long)a->choice[i],
                     (long long)r->choice[i]);
    for (int64_t e = 0; !*note && e <= r->E; e++)
        if (a->offsets[e] != r->offsets[e])
            snprintf(note, sizeof note, "offsets[%lld] %lld/%lld", (long long)e, (long long)a->offsets[e],
                     (long long)r->offsets[e]);
    if (*note) {
        ck_row(c, op, INFINITY, 0, note);
        return;
    }
    ck_row(c, op, ck_rel(a->weight, r->weight, r->n), c->tol, NULL);
}

static void check_route(ck *c, const shape *s, const route_case *rc)
{
    moe_backend *B = c->B, *R = c->R;
    moe_layer_config lc;
    if (!route_config(&lc, s, rc))
        return;
    const int64_t T = s->T, E = s->E;
    char op[96];
    snprintf(op, sizeof op, "route %s%s%s%s", moe_router_name(lc.router),
             rc->second == MOE_SECOND_SAMPLING ? "/sampling" : rc->second == MOE_SECOND_RANDOM ? "/random" : "",
             rc->drop == MOE_DROP_PROBABILITY && lc.capacity_factor > 0 ? "/by-weight" : "", rc->bias ? "/bias" : "");
    double *zh = logits(s, c->seed + 2000 + (uint64_t)(rc - route_cases));
    double *sh = malloc((size_t)(T * E) * sizeof *sh), *bh = malloc((size_t)E * sizeof *bh);
    int32_t *ids_h = malloc((size_t)T * sizeof *ids_h);
    moe_plan *hr = ck_host_plan(&lc, T), *hb = ck_host_plan(&lc, T);
    moe_bplan *pr = NULL, *pb = NULL;
    if (!zh || !sh || !bh || !ids_h || !hr || !hb || R->plan_create(R, &lc, T, &pr) || B->plan_create(B, &lc, T, &pb)) {
        if (pb)
            B->plan_free(B, pb);
        if (pr)
            R->plan_free(R, pr);
        free(zh), free(sh), free(bh), free(ids_h), moe_plan_free(hr), moe_plan_free(hb);
        ck_row(c, op, INFINITY, 0, moe_last_error());
        return;
    }
    /* the same scores on both sides: ref's, as f32 */
    pair z = ck_mk(c, W, T * E, zh), sc0 = ck_mk(c, W, T * E, NULL);
    R->scores_forward(R, TR(sc0), TR(z), lc.score, T, E);
    moe_download_f64(R, sh, TR(sc0), T * E);
    pair sc = ck_mk(c, W, T * E, sh);
    ck_randn(bh, E, 0.05, c->seed + 3000);
    pair bias = ck_mk(c, W, E, bh);
    for (int64_t t = 0; t < T; t++)
        ids_h[t] = (int32_t)(t * 31 + 5);
    pair ids = ck_ids(c, ids_h, T);
    moe_tensor bb = TB(bias), rb = TR(bias), bid = TB(ids), rid = TR(ids);
    const moe_key key = {4, 2, 17};
    B->route(B, pb, TB(sc), TB(z), rc->bias ? &bb : NULL, &bid, &lc, key, T);
    R->route(R, pr, TR(sc), TR(z), rc->bias ? &rb : NULL, &rid, &lc, key, T);
    if (!op_error(c, B, op) && !op_error(c, R, op)) {
        moe_status st = R->plan_download(R, hr, pr);
        if (!st)
            st = B->plan_download(B, hb, pb);
        if (st)
            ck_row(c, op, INFINITY, 0, moe_last_error());
        else
            same_plan(c, op, hb, hr);
        /* the plan's counts */
        pair cnt = ck_mk(c, W, 2 * E + 2, NULL);
        B->plan_counts(B, TB(cnt), pb);
        R->plan_counts(R, TR(cnt), pr);
        ck_cmp(c, "plan counts", cnt);
        ck_drop(c, cnt);
    }
    /* everything after selection on ref's plan, uploaded: the same plan on both sides */
    if (!hr->T || B->plan_upload(B, pb, hr)) {
        ck_row(c, "plan upload", INFINITY, 0, moe_last_error());
    } else {
        const int64_t n = hr->n, tk = T * hr->k;
        const int tc = lc.router != MOE_ROUTER_EXPERT_CHOICE && lc.router != MOE_ROUTER_HASH;
        pair dw = ck_rand(c, W, n, 1), dch = ck_rand(c, W, tk, 1), ds = ck_rand(c, W, T * E, 1);
        moe_tensor bdw = TB(dw), rdw = TR(dw), bdc = TB(dch), rdc = TR(dch);
        B->route_backward(B, TB(ds), &bdw, tc ? &bdc : NULL, pb, TB(sc), rc->bias ? &bb : NULL, &lc);
        R->route_backward(R, TR(ds), &rdw, tc ? &rdc : NULL, pr, TR(sc), rc->bias ? &rb : NULL, &lc);
        ck_cmp(c, "route backward", ds);
        pair out = ck_mk(c, W, 1, NULL);
        B->lb_loss_forward(B, TB(out), TB(sc), pb, T, E);
        R->lb_loss_forward(R, TR(out), TR(sc), pr, T, E);
        ck_cmp(c, "lb loss", out);
        B->lb_loss_backward(B, TB(ds), 0.1, pb, T, E);
        R->lb_loss_backward(R, TR(ds), 0.1, pr, T, E);
        ck_cmp(c, "lb loss ds", ds);
        pair imp = ck_mk(c, W, E, NULL), dimp = ck_rand(c, W, E, 1);
        B->importance_forward(B, TB(imp), pb);
        R->importance_forward(R, TR(imp), pr);
        ck_cmp(c, "importance", imp);
        B->importance_backward(B, &bdw, &bdc, TB(dimp), pb);
        R->importance_backward(R, &rdw, &rdc, TR(dimp), pr);
        ck_cmp_n(c, "importance dweight", dw, n);
        if (tc)
            ck_cmp(c, "importance dchoice", dch);
        B->cv2_forward(B, TB(out), TB(imp), E);
        R->cv2_forward(R, TR(out), TR(imp), E);
        ck_cmp(c, "cv2", out);
        B->cv2_backward(B, TB(dimp), 0.2, TB(imp), E);
        R->cv2_backward(R, TR(dimp), 0.2, TR(imp), E);
        ck_cmp(c, "cv2 backward", dimp);
        if (rc->bias) { /* aux-loss-free balancing from the selected counts */
            pair cnt = ck_mk(c, W, 2 * E + 2, NULL);
            B->plan_counts(B, TB(cnt), pb);
            R->plan_counts(R, TR(cnt), pr);
            B->bias_update(B, TB(bias), moe_tensor_at(TB(cnt), E), 0.01, E);
            R->bias_update(R, TR(bias), moe_tensor_at(TR(cnt), E), 0.01, E);
            ck_cmp(c, "bias update", bias);
            ck_drop(c, cnt);
        }
        pair all[] = {dw, dch, ds, out, imp, dimp};
        for (size_t i = 0; i < sizeof all / sizeof all[0]; i++)
            ck_drop(c, all[i]);
    }
    pair all[] = {z, sc0, sc, bias, ids};
    for (size_t i = 0; i < sizeof all / sizeof all[0]; i++)
        ck_drop(c, all[i]);
    B->plan_free(B, pb);
    R->plan_free(R, pr);
    free(zh), free(sh), free(bh), free(ids_h), moe_plan_free(hr), moe_plan_free(hb);
}

/* ---- dispatch, experts, combine on one plan ------------------------------------------------ */

/* MoA's grouped linear map (xe [n, K] · w[e] [K, N]) and the choice slots, on the plan */
static void check_moa(ck *c, const moe_plan *hp, moe_bplan *pb, moe_bplan *pr, pair xe, pair w, int64_t K, int64_t N)
{
    moe_backend *B = c->B, *R = c->R;
    const moe_dtype C = c->ct;
    const int64_t n = hp->n > 0 ? hp->n : 1, E = hp->E;
    pair y = ck_mk(c, C, n * N, NULL), dy = ck_rand(c, C, n * N, 1), dx = ck_rand(c, C, n * K, 1),
         dw = ck_rand(c, C, E * K * N, 1);
    B->experts_linear_forward(B, TB(y), TB(xe), TB(w), pb, K, N);
    R->experts_linear_forward(R, TR(y), TR(xe), TR(w), pr, K, N);
    ck_cmp_n(c, "experts_linear", y, hp->n * N);
    moe_tensor bdx = TB(dx), rdx = TR(dx);
    B->experts_linear_backward(B, &bdx, TB(dw), TB(dy), TB(xe), TB(w), pb, K, N);
    R->experts_linear_backward(R, &rdx, TR(dw), TR(dy), TR(xe), TR(w), pr, K, N);
    ck_cmp_n(c, "experts_linear dxe", dx, hp->n * K);
    ck_cmp(c, "experts_linear dw", dw);
    /* slots [T·k, K] from the rows, and the rows back (+=) */
    pair slots = ck_mk(c, C, hp->T * hp->k * K, NULL);
    B->choice_scatter(B, TB(slots), TB(xe), pb, K);
    R->choice_scatter(R, TR(slots), TR(xe), pr, K);
    ck_cmp(c, "choice scatter", slots);
    B->choice_gather(B, TB(dx), TB(slots), pb, K);
    R->choice_gather(R, TR(dx), TR(slots), pr, K);
    ck_cmp_n(c, "choice gather", dx, hp->n * K);
    pair all[] = {y, dy, dx, dw, slots};
    for (size_t i = 0; i < sizeof all / sizeof all[0]; i++)
        ck_drop(c, all[i]);
}

static void check_experts(ck *c, const shape *s, moe_activation act)
{
    moe_backend *B = c->B, *R = c->R;
    const moe_dtype C = c->ct;
    moe_layer_config lc;
    base_config(&lc, s);
    lc.act = act;
    const int64_t T = s->T, E = s->E, d = s->d, f = s->f;
    double *zh = logits(s, c->seed + 4000 + (uint64_t)act);
    moe_plan *hp = ck_host_plan(&lc, T);
    moe_bplan *pr = NULL, *pb = NULL;
    if (!zh || !hp || R->plan_create(R, &lc, T, &pr) || B->plan_create(B, &lc, T, &pb)) {
        if (pr)
            R->plan_free(R, pr);
        free(zh);
        moe_plan_free(hp);
        ck_row(c, "experts", INFINITY, 0, moe_last_error());
        return;
    }
    pair z = ck_mk(c, W, T * E, zh), sc = ck_mk(c, W, T * E, NULL);
    R->scores_forward(R, TR(sc), TR(z), lc.score, T, E);
    R->route(R, pr, TR(sc), TR(z), NULL, NULL, &lc, MOE_KEY_STEP(0), T);
    if (R->sync(R) || R->plan_download(R, hp, pr) || B->plan_upload(B, pb, hp)) {
        ck_row(c, "experts", INFINITY, 0, moe_last_error());
        goto done;
    }
    const int64_t n = hp->n > 0 ? hp->n : 1;
    const int glu = moe_act_is_glu(act);
    char op[64];
#define OP(what) (snprintf(op, sizeof op, "%s %s", what, moe_activation_name(act)), op)
    pair x = ck_rand(c, C, T * d, 1), xe = ck_mk(c, C, n * d, NULL);
    B->dispatch_forward(B, TB(xe), TB(x), pb, d);
    R->dispatch_forward(R, TR(xe), TR(x), pr, d);
    ck_cmp_n(c, "dispatch", xe, hp->n * d);
    pair w1 = ck_rand(c, C, E * d * f, 0.3), w3 = ck_rand(c, C, E * d * f, 0.3), w2 = ck_rand(c, C, E * f * d, 0.3);
    pair ye = ck_mk(c, C, n * d, NULL), h1 = ck_mk(c, C, n * f, NULL), h3 = ck_mk(c, C, n * f, NULL),
         a = ck_mk(c, C, n * f, NULL);
    moe_tensor bw3 = TB(w3), rw3 = TR(w3);
    B->experts_forward(B, TB(ye), TB(h1), TB(h3), TB(a), TB(xe), TB(w1), glu ? &bw3 : NULL, TB(w2), pb, act, d, f);
    R->experts_forward(R, TR(ye), TR(h1), TR(h3), TR(a), TR(xe), TR(w1), glu ? &rw3 : NULL, TR(w2), pr, act, d, f);
    ck_cmp_n(c, OP("experts h1"), h1, hp->n * f);
    if (glu)
        ck_cmp_n(c, OP("experts h3"), h3, hp->n * f);
    ck_cmp_n(c, OP("experts a"), a, hp->n * f);
    ck_cmp_n(c, OP("experts ye"), ye, hp->n * d);
    pair y = ck_mk(c, C, T * d, NULL);
    B->combine_forward(B, TB(y), TB(ye), pb, d);
    R->combine_forward(R, TR(y), TR(ye), pr, d);
    ck_cmp(c, "combine", y);
    pair dy = ck_rand(c, C, T * d, 1), dye = ck_rand(c, C, n * d, 1), dwt = ck_rand(c, W, n, 1);
    B->combine_backward(B, TB(dye), TB(dwt), TB(dy), TB(ye), pb, d);
    R->combine_backward(R, TR(dye), TR(dwt), TR(dy), TR(ye), pr, d);
    ck_cmp_n(c, "combine dye", dye, hp->n * d);
    ck_cmp_n(c, "combine dweight", dwt, hp->n);
    pair dxe = ck_rand(c, C, n * d, 1), dw1 = ck_rand(c, C, E * d * f, 1), dw3 = ck_rand(c, C, E * d * f, 1),
         dw2 = ck_rand(c, C, E * f * d, 1);
    pair dg1 = ck_mk(c, C, n * f, NULL), dg3 = ck_mk(c, C, n * f, NULL);
    moe_tensor bdw3 = TB(dw3), rdw3 = TR(dw3), bg3 = TB(dg3), rg3 = TR(dg3);
    B->experts_backward_data(B, TB(dxe), TB(dg1), glu ? &bg3 : NULL, TB(dye), TB(h1), TB(h3), TB(w1),
                             glu ? &bw3 : NULL, TB(w2), pb, act, d, f);
    R->experts_backward_data(R, TR(dxe), TR(dg1), glu ? &rg3 : NULL, TR(dye), TR(h1), TR(h3), TR(w1),
                             glu ? &rw3 : NULL, TR(w2), pr, act, d, f);
    ck_cmp_n(c, OP("experts dxe"), dxe, hp->n * d);
    ck_cmp_n(c, OP("experts dg1"), dg1, hp->n * f);
    if (glu)
        ck_cmp_n(c, OP("experts dg3"), dg3, hp->n * f);
    B->experts_backward_weights(B, TB(dw1), glu ? &bdw3 : NULL, TB(dw2), TB(dg1), glu ? &bg3 : NULL, TB(dye), TB(a),
                                TB(xe), pb, act, d, f);
    R->experts_backward_weights(R, TR(dw1), glu ? &rdw3 : NULL, TR(dw2), TR(dg1), glu ? &rg3 : NULL, TR(dye), TR(a),
                                TR(xe), pr, act, d, f);
    ck_cmp(c, OP("experts dw1"), dw1);
    if (glu)
        ck_cmp(c, OP("experts dw3"), dw3);
    ck_cmp(c, OP("experts dw2"), dw2);
    if (act == MOE_ACT_RELU) /* the plan ops of the mixture of attention heads, once per shape */
        check_moa(c, hp, pb, pr, xe, w1, d, f);
    pair dx = ck_rand(c, C, T * d, 1);
    B->dispatch_backward(B, TB(dx), TB(dxe), pb, d);
    R->dispatch_backward(R, TR(dx), TR(dxe), pr, d);
    ck_cmp(c, "dispatch dx", dx);
    /* the plan's rows only: a fill of them, the rows outside keep their values */
    B->plan_fill(B, TB(dxe), 0.5, pb, d);
    R->plan_fill(R, TR(dxe), 0.5, pr, d);
    ck_cmp(c, "plan fill", dxe);
    /* the single FFN (shared experts, dense branch) over all T rows */
    pair o = ck_mk(c, C, T * d, NULL), g1 = ck_mk(c, C, T * f, NULL), g3 = ck_mk(c, C, T * f, NULL),
         ga = ck_mk(c, C, T * f, NULL);
    B->ffn_forward(B, TB(o), TB(g1), TB(g3), TB(ga), TB(x), TB(w1), glu ? &bw3 : NULL, TB(w2), act, T, d, f);
    R->ffn_forward(R, TR(o), TR(g1), TR(g3), TR(ga), TR(x), TR(w1), glu ? &rw3 : NULL, TR(w2), act, T, d, f);
    ck_cmp(c, OP("ffn out"), o);
    moe_tensor bdx = TB(dx), rdx = TR(dx);
    B->ffn_backward(B, &bdx, TB(dw1), glu ? &bdw3 : NULL, TB(dw2), TB(dy), TB(g1), TB(g3), TB(ga), TB(x), TB(w1),
                    glu ? &bw3 : NULL, TB(w2), act, T, d, f);
    R->ffn_backward(R, &rdx, TR(dw1), glu ? &rdw3 : NULL, TR(dw2), TR(dy), TR(g1), TR(g3), TR(ga), TR(x), TR(w1),
                    glu ? &rw3 : NULL, TR(w2), act, T, d, f);
    ck_cmp(c, OP("ffn dx"), dx);
    ck_cmp(c, OP("ffn dw1"), dw1);
    ck_cmp(c, OP("ffn dw2"), dw2);
#undef OP
    pair all[] = {x, xe, w1, w3, w2, ye, h1, h3, a, y, dy, dye, dwt, dxe, dw1, dw3, dw2, dg1, dg3, dx, o, g1, g3, ga};
    for (size_t i = 0; i < sizeof all / sizeof all[0]; i++)
        ck_drop(c, all[i]);
done:
    ck_drop(c, z);
    ck_drop(c, sc);
    free(zh);
    moe_plan_free(hp);
    R->plan_free(R, pr);
    B->plan_free(B, pb);
}

/* ---- the table ------------------------------------------------------------------------------- */

/* Whether a section with these op names has a row that --only asks for. */
int ck_section(const ck *c, const char *const *ops)
{
    if (!c->only)
        return 1;
    const size_t n = strlen(c->only);
    for (; *ops; ops++) {
        const size_t m = strlen(*ops);
        if (!strncmp(c->only, *ops, n < m ? n : m))
            return 1;
    }
    return 0;
}

moe_status moe_backend_check(moe_backend *b, const moe_check_options *o, moe_check_report report, void *ctx,
                             int *failed, int *rows)
{
    const moe_check_options def = {0};
    if (!o)
        o = &def;
    ck c;
    memset(&c, 0, sizeof c);
    c.B = b;
    c.report = report;
    c.ctx = ctx;
    c.seed = o->seed;
    c.only = o->only && *o->only ? o->only : NULL;
    c.ct = b->float_type == MOE_F64 ? MOE_F64 : b->float_type;
    c.tol = o->tol > 0 ? o->tol : (b->float_type == MOE_BF16 ? 2e-2 : 1e-5);
    moe_status s = moe_backend_create("ref", NULL, &c.R);
    if (s)
        return s;
    /* scratch for the ops outside a layer: the largest shape of the tables */
    const moe_workload w = {.rows_ffn = 1031, .d_model = 256, .d_ff = 256, .batch = 2, .seq = 130, .heads = 4,
                            .kv_heads = 4, .head_dim = 32};
    if ((s = b->reserve(b, &w)) || (s = c.R->reserve(c.R, &w)))
        goto out;
    for (int i = 0; i < NSHAPES && !c.oom; i++) {
        const shape *sh = &shapes[i];
        if (o->quick && sh->big)
            continue;
        moe_layer_config lc;
        base_config(&lc, sh);
        lc.top_k = sh->k;
        const moe_workload lw = {.layer = &lc, .tokens = sh->T, .rows = sh->T * sh->k, .rows_ffn = sh->T,
                                 .d_model = sh->d, .d_ff = sh->f};
        if ((s = b->reserve(b, &lw)) || (s = c.R->reserve(c.R, &lw)))
            goto out;
        ck_shape(&c, "T=%lld d=%lld f=%lld E=%lld k=%lld%s%s", (long long)sh->T, (long long)sh->d, (long long)sh->f,
                 (long long)sh->E, (long long)sh->k, sh->cf > 0 ? " cf" : "",
                 sh->skew == 1 ? " skew" : sh->skew == 2 ? " one-expert" : "");
        static const char *const dense[] = {"matmul", "rowscale", "add", "copy", NULL};
        static const char *const router[] = {"softmax", "sigmoid", "jitter", "noisy", "z loss", "mi loss", NULL};
        static const char *const route[] = {"route", "plan counts", "plan upload", "lb loss", "importance", "cv2",
                                            "bias update", NULL};
        static const char *const experts[] = {"dispatch", "experts", "combine", "plan fill", "ffn", "choice", NULL};
        if (ck_section(&c, dense))
            check_dense(&c, sh);
        if (ck_section(&c, router))
            check_router(&c, sh);
        for (int r = 0; r < NROUTE && ck_section(&c, route); r++)
            check_route(&c, sh, &route_cases[r]);
        for (int act = 0; act < 5 && ck_section(&c, experts); act++)
            check_experts(&c, sh, (moe_activation)act);
    }
    static const char *const model[] = {"embedding", "rmsnorm", "rope", "attention", "matmul_t", "bias",
                                        "crossentropy", "grad_sumsq", "clip_scale", "adamw", NULL};
    static const char *const layer[] = {"layer", NULL};
    if (!c.oom && ck_section(&c, model))
        s = moe_check_model(&c, o->quick);
    if (!c.oom && !s && ck_section(&c, layer))
        s = moe_check_layers(&c, o->quick);
    if (c.oom && !s)
        s = moe_error(MOE_ERR_NOMEM, "check: out of memory for the inputs");
out:
    moe_backend_free(c.R);
    if (failed)
        *failed = c.failed;
    if (rows)
        *rows = c.rows;
    return s;
}
