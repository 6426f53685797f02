/*
 * The cpu backend against the ref backend, op by op (ggml's test-backend-ops): random
 * inputs rounded to float so both start from identical values, cpu outputs NaN-poisoned
 * before each op, gradients pre-filled with the same random values (backward adds),
 * the same routing plan (ref's plan uploaded to cpu) for everything after selection,
 * normalised error <= 1e-5. Selection itself is compared exactly (token, expert, kept,
 * dropped) on scores whose top-k margins are clear in float.
 */
#define _POSIX_C_SOURCE 200809L /* setenv */
#include "backend/backend.h"
#include "cpu/fastmath.h"
#include "ref/ref.h"
#include "testutil.h"

#include <float.h>

#include <unistd.h>

/*
 * OpenMP threads that spin-wait between the many tiny parallel regions of these tests
 * cost 10x the run time on a loaded machine (make -j, other jobs). libgomp reads
 * OMP_WAIT_POLICY when it loads, so set it and re-execute once.
 */
static void passive_omp(char **argv)
{
    if (getenv("OMP_WAIT_POLICY"))
        return;
    setenv("OMP_WAIT_POLICY", "passive", 1);
    execv("/proc/self/exe", argv);
}

#define TOL 1e-5

typedef struct {
    moe_buf *r, *c;
    int64_t n;
} pair;

static moe_backend *R, *C;

static void setup(void)
{
    ck_assert_int_eq(moe_backend_create("ref", NULL, &R), MOE_OK);
    ck_assert_int_eq(moe_backend_create("cpu", &(moe_backend_options){.threads = 2}, &C), MOE_OK);
    /* the ops here run outside a layer: scratch for the largest shape of the table (1M floats) */
    const moe_workload w = {.rows_ffn = 4096, .d_model = 64, .d_ff = 128};
    ck_assert_int_eq(C->reserve(C, &w), MOE_OK);
    ck_assert_int_eq(R->reserve(R, &w), MOE_OK);
}

static void teardown(void)
{
    moe_backend_free(R);
    moe_backend_free(C);
}

static void round_f(double *x, int64_t n)
{
    for (int64_t i = 0; i < n; i++)
        x[i] = (float)x[i];
}

/* Both sides hold the same values: host data rounded to float, or NaN on cpu (poison). */
static pair mk(int64_t n, const double *host)
{
    pair p = {NULL, NULL, n};
    ck_assert_int_eq(R->alloc(R, R->float_type, n, &p.r), MOE_OK);
    ck_assert_int_eq(C->alloc(C, C->float_type, n, &p.c), MOE_OK);
    double *h = tu_alloc(n);
    if (host) {
        memcpy(h, host, (size_t)n * sizeof *h);
        round_f(h, n);
        moe_upload_f64(R, (moe_tensor){p.r, 0}, h, n);
        moe_upload_f64(C, (moe_tensor){p.c, 0}, h, n);
    } else {
        tu_nan_fill(h, n);
        moe_upload_f64(R, (moe_tensor){p.r, 0}, h, n);
        moe_upload_f64(C, (moe_tensor){p.c, 0}, h, n);
    }
    free(h);
    return p;
}

static pair mk_rand(int64_t n, double scale, uint64_t seed)
{
    double *h = tu_alloc(n);
    tu_randn(h, n, scale, seed);
    pair p = mk(n, h);
    free(h);
    return p;
}

static void rel(pair p, const char *what, double tol)
{
    double *a = tu_alloc(p.n), *r = tu_alloc(p.n);
    ck_assert_msg(moe_download_f64(C, a, (moe_tensor){p.c, 0}, p.n) == MOE_OK, "%s: %s", what, moe_last_error());
    ck_assert_msg(moe_download_f64(R, r, (moe_tensor){p.r, 0}, p.n) == MOE_OK, "%s: %s", what, moe_last_error());
    double e = tu_rel_err(a, r, p.n);
    ck_assert_msg(e <= tol, "%s: cpu vs ref rel err %.3e (n %lld)", what, e, (long long)p.n);
    free(a);
    free(r);
}

/* ids in i32 buffers on both sides */
static pair mk_ids(const int32_t *ids, int64_t n)
{
    pair p = {NULL, NULL, n};
    ck_assert_int_eq(R->alloc(R, MOE_I32, n, &p.r), MOE_OK);
    ck_assert_int_eq(C->alloc(C, MOE_I32, n, &p.c), MOE_OK);
    ck_assert_int_eq(R->upload(R, (moe_tensor){p.r, 0}, ids, MOE_I32, n), MOE_OK);
    ck_assert_int_eq(C->upload(C, (moe_tensor){p.c, 0}, ids, MOE_I32, n), MOE_OK);
    return p;
}

/* element 0 of a pair, as ref and cpu hold it */
static void first(pair p, double *r, double *c)
{
    ck_assert_int_eq(moe_download_f64(R, r, (moe_tensor){p.r, 0}, 1), MOE_OK);
    ck_assert_int_eq(moe_download_f64(C, c, (moe_tensor){p.c, 0}, 1), MOE_OK);
}

static void drop(pair p)
{
    R->free(R, p.r);
    C->free(C, p.c);
}

#define TR(p) ((moe_tensor){(p).r, 0})
#define TC(p) ((moe_tensor){(p).c, 0})

/* ---- shapes --------------------------------------------------------------- */

typedef struct {
    int64_t T, d, f, E, k;
    double cf;  /* capacity factor */
    int skew;   /* 0 random scores; 1 experts E/2.. get no token; 2 all tokens to expert 0 first */
} shape;

static const shape shapes[] = {
    {37, 24, 40, 8, 2, 0, 0},    /* T prime, dropless */
    {13, 16, 24, 1, 1, 0, 0},    /* E = 1 */
    {11, 12, 20, 4, 4, 0, 0},    /* k = E */
    {29, 20, 36, 6, 2, 0, 1},    /* experts with no token */
    {23, 16, 24, 5, 1, 0, 2},    /* all tokens to one expert */
    {41, 16, 28, 4, 2, 0.5, 0},  /* capacity overflow */
    {31, 8, 12, 3, 2, 0.75, 2},  /* overflow of one expert */
};
#define NSHAPES (int)(sizeof shapes / sizeof shapes[0])

static void base_config(moe_layer_config *c, const shape *s)
{
    moe_layer_config_default(c);
    c->d_model = s->d;
    c->d_ff = s->f;
    c->n_experts = s->E;
    c->top_k = s->k;
    c->capacity_factor = s->cf;
}

/* Logits whose skew sends tokens where the shape asks. */
static double *logits(const shape *s, uint64_t seed)
{
    double *z = tu_alloc(s->T * s->E);
    tu_randn(z, s->T * s->E, 1.0, seed);
    for (int64_t t = 0; t < s->T; t++)
        for (int64_t e = 0; e < s->E; e++) {
            if (s->skew == 1 && e >= s->E / 2 && s->E > 1)
                z[t * s->E + e] -= 20;
            if (s->skew == 2 && e == 0) /* first everywhere, with weights that still differ */
                z[t * s->E + e] = 6 + 0.5 * z[t * s->E + e];
        }
    round_f(z, s->T * s->E);
    return z;
}

/* ---- dense and router ops ---------------------------------------------------- */

START_TEST(test_matmul)
{
    const shape *s = &shapes[_i];
    pair x = mk_rand(s->T * s->d, 1, 1), w = mk_rand(s->d * s->f, 0.3, 2), out = mk(s->T * s->f, NULL);
    R->matmul_forward(R, TR(out), TR(x), TR(w), s->T, s->d, s->f);
    C->matmul_forward(C, TC(out), TC(x), TC(w), s->T, s->d, s->f);
    rel(out, "matmul out", TOL);
    pair dout = mk_rand(s->T * s->f, 1, 3), dx = mk_rand(s->T * s->d, 1, 4), dw = mk_rand(s->d * s->f, 1, 5);
    moe_tensor rdx = TR(dx), rdw = TR(dw), cdx = TC(dx), cdw = TC(dw);
    R->matmul_backward(R, &rdx, &rdw, TR(dout), TR(x), TR(w), s->T, s->d, s->f);
    C->matmul_backward(C, &cdx, &cdw, TC(dout), TC(x), TC(w), s->T, s->d, s->f);
    rel(dx, "matmul dx", TOL);
    rel(dw, "matmul dw", TOL);
    /* rowscale (shared gate, residual mix) and add */
    pair a = mk_rand(s->T * 2, 1, 6), y = mk_rand(s->T * s->f, 1, 7), da = mk_rand(s->T * 2, 1, 8);
    R->rowscale_forward(R, TR(y), TR(out), moe_tensor_at(TR(a), 1), 2, s->T, s->f);
    C->rowscale_forward(C, TC(y), TC(out), moe_tensor_at(TC(a), 1), 2, s->T, s->f);
    rel(y, "rowscale y", TOL);
    moe_tensor rda = moe_tensor_at(TR(da), 1), cda = moe_tensor_at(TC(da), 1), rdv = TR(dout), cdv = TC(dout);
    R->rowscale_backward(R, &rdv, &rda, TR(y), TR(out), moe_tensor_at(TR(a), 1), 2, s->T, s->f);
    C->rowscale_backward(C, &cdv, &cda, TC(y), TC(out), moe_tensor_at(TC(a), 1), 2, s->T, s->f);
    rel(dout, "rowscale dv", TOL);
    rel(da, "rowscale da", TOL);
    R->add(R, TR(y), TR(dout), s->T * s->f);
    C->add(C, TC(y), TC(dout), s->T * s->f);
    rel(y, "add", TOL);
    pair all[] = {x, w, out, dout, dx, dw, a, y, da};
    for (size_t i = 0; i < sizeof all / sizeof all[0]; i++)
        drop(all[i]);
}
END_TEST

START_TEST(test_router_ops)
{
    const shape *s = &shapes[_i];
    const int64_t T = s->T, E = s->E, d = s->d;
    double *zh = logits(s, 10);
    pair z = mk(T * E, zh), sc = mk(T * E, NULL);
    for (int fn = 0; fn < 2; fn++) {
        R->scores_forward(R, TR(sc), TR(z), (moe_score_fn)fn, T, E);
        C->scores_forward(C, TC(sc), TC(z), (moe_score_fn)fn, T, E);
        rel(sc, fn ? "sigmoid" : "softmax", TOL);
        pair ds = mk_rand(T * E, 1, 12), dz = mk_rand(T * E, 1, 13);
        R->scores_backward(R, TR(dz), TR(ds), TR(sc), (moe_score_fn)fn, T, E);
        C->scores_backward(C, TC(dz), TC(ds), TC(sc), (moe_score_fn)fn, T, E);
        rel(dz, fn ? "sigmoid backward" : "softmax backward", TOL);
        drop(ds);
        drop(dz);
    }
    /* jitter */
    pair x = mk_rand(T * d, 1, 14), xr = mk(T * d, NULL), u = mk(T * d, NULL), dx = mk_rand(T * d, 1, 15);
    R->jitter_forward(R, TR(xr), TR(u), TR(x), 0.1, 77, 3, MOE_KEY_STEP(5), T, d);
    C->jitter_forward(C, TC(xr), TC(u), TC(x), 0.1, 77, 3, MOE_KEY_STEP(5), T, d);
    rel(xr, "jitter xr", TOL);
    rel(u, "jitter u", TOL);
    R->jitter_backward(R, TR(dx), TR(xr), TR(u), T, d);
    C->jitter_backward(C, TC(dx), TC(xr), TC(u), T, d);
    rel(dx, "jitter dx", TOL);
    pair dz = mk_rand(T * E, 1, 17);
    /* z-loss and MI */
    pair out = mk(1, NULL);
    double zr, zc;
    R->z_loss_forward(R, TR(out), TR(z), T, E);
    C->z_loss_forward(C, TC(out), TC(z), T, E);
    first(out, &zr, &zc);
    ck_assert_msg(fabs(zr - zc) <= TOL * fabs(zr), "z loss %g vs %g", zc, zr);
    R->z_loss_backward(R, TR(dz), 0.3, TR(z), T, E);
    C->z_loss_backward(C, TC(dz), 0.3, TC(z), T, E);
    rel(dz, "z loss dz", TOL);
    int32_t *task_h = malloc((size_t)T * sizeof *task_h);
    for (int64_t t = 0; t < T; t++)
        task_h[t] = (int32_t)(t * 7 % 3);
    pair task = mk_ids(task_h, T);
    R->scores_forward(R, TR(sc), TR(z), MOE_SCORE_SOFTMAX, T, E);
    C->scores_forward(C, TC(sc), TC(z), MOE_SCORE_SOFTMAX, T, E);
    double mr, mc;
    R->mi_loss_forward(R, TR(out), TR(sc), TR(task), 3, T, E);
    C->mi_loss_forward(C, TC(out), TC(sc), TC(task), 3, T, E);
    first(out, &mr, &mc);
    ck_assert_msg(fabs(mr - mc) <= TOL * fabs(mr) + 1e-7, "mi loss %g vs %g", mc, mr);
    R->mi_loss_backward(R, TR(dz), 0.7, TR(sc), TR(task), 3, T, E);
    C->mi_loss_backward(C, TC(dz), 0.7, TC(sc), TC(task), 3, T, E);
    rel(dz, "mi loss ds", TOL);
    free(task_h);
    free(zh);
    pair all[] = {z, sc, x, xr, u, dx, dz, out, task};
    for (size_t i = 0; i < sizeof all / sizeof all[0]; i++)
        drop(all[i]);
}
END_TEST

/*
 * Noisy gating and the smooth load with the noise logits zn = x·W_noise spread around
 * an offset: ordinary ones, and extremes where softplus(zn) underflows to 0 in float
 * (below about −104: router.noise = −7 on a few features gets there) or in double
 * (below about −745), and large positive ones (noise far wider than the logits).
 */
static const double noise_cases[][2] = {{0, 1}, {-110, 3}, {-2000, 100}, {60, 10}, {1e4, 100}};
#define NNOISE (int)(sizeof noise_cases / sizeof noise_cases[0])

START_TEST(test_noisy_router)
{
    const shape *s = &shapes[_i / NNOISE];
    const double off = noise_cases[_i % NNOISE][0], scale = noise_cases[_i % NNOISE][1];
    const int64_t T = s->T, E = s->E;
    double *zh = logits(s, 10), *znh = tu_alloc(T * E);
    tu_randn(znh, T * E, scale, 11);
    for (int64_t i = 0; i < T * E; i++)
        znh[i] += off;
    pair z = mk(T * E, zh), zn = mk(T * E, znh);
    pair h = mk(T * E, NULL), eps = mk(T * E, NULL), load = mk(E, NULL);
    for (int training = 0; training < 2; training++) {
        R->noisy_logits_forward(R, TR(h), TR(eps), TR(z), TR(zn), training, 9, 1, MOE_KEY_STEP(2), T, E);
        C->noisy_logits_forward(C, TC(h), TC(eps), TC(z), TC(zn), training, 9, 1, MOE_KEY_STEP(2), T, E);
        rel(h, "noisy h", TOL);
        rel(eps, "noisy eps", TOL);
    }
    pair dh = mk_rand(T * E, 1, 16), dz = mk_rand(T * E, 1, 17), dzn = mk_rand(T * E, 1, 18);
    moe_tensor rz = TR(dz), rzn = TR(dzn), cz = TC(dz), czn = TC(dzn), rh = TR(dh), ch = TC(dh);
    R->noisy_logits_backward(R, &rz, &rzn, TR(dh), TR(eps), TR(zn), T, E);
    C->noisy_logits_backward(C, &cz, &czn, TC(dh), TC(eps), TC(zn), T, E);
    rel(dz, "noisy dz", TOL);
    rel(dzn, "noisy dzn", TOL);
    R->noisy_load_forward(R, TR(load), TR(z), TR(zn), TR(h), s->k, T, E);
    C->noisy_load_forward(C, TC(load), TC(z), TC(zn), TC(h), s->k, T, E);
    rel(load, "noisy load", TOL);
    pair dload = mk_rand(E, 1, 19);
    R->noisy_load_backward(R, &rz, &rzn, &rh, TR(dload), TR(z), TR(zn), TR(h), s->k, T, E);
    C->noisy_load_backward(C, &cz, &czn, &ch, TC(dload), TC(z), TC(zn), TC(h), s->k, T, E);
    rel(dz, "noisy load dz", TOL);
    rel(dzn, "noisy load dzn", TOL);
    rel(dh, "noisy load dh", TOL);
    /* nothing of it may be NaN or infinite (rel() already refuses NaN) */
    pair outs[] = {h, load, dz, dzn, dh};
    for (size_t o = 0; o < sizeof outs / sizeof outs[0]; o++) {
        double *a = tu_alloc(outs[o].n);
        ck_assert_int_eq(moe_download_f64(C, a, TC(outs[o]), outs[o].n), MOE_OK);
        for (int64_t i = 0; i < outs[o].n; i++)
            ck_assert_msg(isfinite(a[i]), "zn around %g: cpu output %zu [%lld] = %g", off, o, (long long)i, a[i]);
        free(a);
    }
    free(zh);
    free(znh);
    pair all[] = {z, zn, h, eps, load, dh, dz, dzn, dload};
    for (size_t i = 0; i < sizeof all / sizeof all[0]; i++)
        drop(all[i]);
}
END_TEST

/* ---- selection ----------------------------------------------------------------- */

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
static int route_config(moe_layer_config *c, const shape *s, const route_case *rc)
{
    base_config(c, s);
    c->router = rc->router;
    c->second_policy = rc->second;
    c->drop_policy = rc->drop;
    c->use_bias = rc->bias;
    c->renormalize = rc->renorm;
    c->score = rc->score;
    if (rc->router == MOE_ROUTER_EXPERT_CHOICE && c->capacity_factor <= 0)
        c->capacity_factor = 1.5;
    if (rc->router == MOE_ROUTER_HASH) {
        c->top_k = 1;
        c->capacity_factor = 0;
    }
    return moe_layer_config_validate(c, s->T) == MOE_OK;
}

static moe_plan *host_plan(const moe_layer_config *c, int64_t T)
{
    int64_t k = c->router == MOE_ROUTER_EXPERT_CHOICE ? moe_capacity(c, T) : c->top_k;
    int64_t n = c->router == MOE_ROUTER_EXPERT_CHOICE ? c->n_experts * k : T * k;
    moe_plan *p;
    ck_assert_int_eq(moe_plan_create(n, T, c->n_experts, k, &p), MOE_OK);
    return p;
}

static void same_plan(const moe_plan *a, const moe_plan *r, const char *what)
{
    ck_assert_int_eq(moe_plan_check(a), MOE_OK);
    ck_assert_msg(a->n == r->n && a->dropped == r->dropped && a->capacity == r->capacity,
                  "%s: n %lld/%lld dropped %lld/%lld", what, (long long)a->n, (long long)r->n, (long long)a->dropped,
                  (long long)r->dropped);
    for (int64_t i = 0; i < r->n; i++) {
        ck_assert_msg(a->token[i] == r->token[i] && a->expert[i] == r->expert[i] && a->choice[i] == r->choice[i],
                      "%s: row %lld differs", what, (long long)i);
        ck_assert_msg(fabs(a->weight[i] - r->weight[i]) <= TOL * (fabs(r->weight[i]) + 1e-3),
                      "%s: weight %lld %g vs %g", what, (long long)i, a->weight[i], r->weight[i]);
    }
    for (int64_t e = 0; e <= r->E; e++)
        ck_assert_int_eq(a->offsets[e], r->offsets[e]);
}

START_TEST(test_route)
{
    const shape *s = &shapes[_i / NROUTE];
    const route_case *rc = &route_cases[_i % NROUTE];
    moe_layer_config c;
    if (!route_config(&c, s, rc))
        return;
    const int64_t T = s->T, E = s->E;
    double *zh = logits(s, 20 + (uint64_t)_i);
    pair z = mk(T * E, zh), sc = mk(T * E, NULL);
    R->scores_forward(R, TR(sc), TR(z), c.score, T, E);
    C->scores_forward(C, TC(sc), TC(z), c.score, T, E);
    double *bh = tu_alloc(E);
    tu_randn(bh, E, 0.05, 21);
    pair bias = mk(E, bh);
    moe_tensor rb = TR(bias), cb = TC(bias);
    moe_bplan *pr, *pc;
    ck_assert_int_eq(R->plan_create(R, &c, T, &pr), MOE_OK);
    ck_assert_int_eq(C->plan_create(C, &c, T, &pc), MOE_OK);
    int32_t *ids_h = malloc((size_t)T * sizeof *ids_h);
    for (int64_t t = 0; t < T; t++)
        ids_h[t] = (int32_t)(t * 31 + 5);
    pair ids = mk_ids(ids_h, T);
    moe_tensor rid = TR(ids), cid = TC(ids);
    R->route(R, pr, TR(sc), TR(z), rc->bias ? &rb : NULL, &rid, &c, MOE_KEY_STEP(4), T);
    C->route(C, pc, TC(sc), TC(z), rc->bias ? &cb : NULL, &cid, &c, MOE_KEY_STEP(4), T);
    ck_assert_msg(R->sync(R) == MOE_OK && C->sync(C) == MOE_OK, "%s", moe_last_error());
    moe_plan *hr = host_plan(&c, T), *hc = host_plan(&c, T);
    ck_assert_int_eq(R->plan_download(R, hr, pr), MOE_OK);
    ck_assert_int_eq(C->plan_download(C, hc, pc), MOE_OK);
    same_plan(hc, hr, moe_router_name(c.router));

    /* route backward on ref's plan, uploaded: the same plan on both sides */
    ck_assert_int_eq(C->plan_upload(C, pc, hr), MOE_OK);
    const int64_t n = hr->n, tk = T * hr->k;
    pair dw = mk_rand(n > 0 ? n : 1, 1, 22), dch = mk_rand(tk, 1, 23), ds = mk_rand(T * E, 1, 24);
    moe_tensor rdw = TR(dw), cdw = TC(dw), rdc = TR(dch), cdc = TC(dch);
    const int tc = c.router != MOE_ROUTER_EXPERT_CHOICE && c.router != MOE_ROUTER_HASH;
    R->route_backward(R, TR(ds), &rdw, tc ? &rdc : NULL, pr, TR(sc), rc->bias ? &rb : NULL, &c);
    C->route_backward(C, TC(ds), &cdw, tc ? &cdc : NULL, pc, TC(sc), rc->bias ? &cb : NULL, &c);
    rel(ds, "route backward", TOL);
    /* plan-based losses */
    pair out = mk(1, NULL);
    double lr, lc;
    R->lb_loss_forward(R, TR(out), TR(sc), pr, T, E);
    C->lb_loss_forward(C, TC(out), TC(sc), pc, T, E);
    first(out, &lr, &lc);
    ck_assert_msg(fabs(lr - lc) <= TOL * fabs(lr) + 1e-9, "lb %g vs %g", lc, lr);
    R->lb_loss_backward(R, TR(ds), 0.1, pr, T, E);
    C->lb_loss_backward(C, TC(ds), 0.1, pc, T, E);
    rel(ds, "lb backward", TOL);
    pair imp = mk(E, NULL), dimp = mk_rand(E, 1, 25);
    R->importance_forward(R, TR(imp), pr);
    C->importance_forward(C, TC(imp), pc);
    rel(imp, "importance", TOL);
    R->importance_backward(R, &rdw, &rdc, TR(dimp), pr);
    C->importance_backward(C, &cdw, &cdc, TC(dimp), pc);
    rel(dw, "importance dweight", TOL);
    if (tc)
        rel(dch, "importance dchoice", TOL);

    free(ids_h);
    free(zh);
    free(bh);
    moe_plan_free(hr);
    moe_plan_free(hc);
    R->plan_free(R, pr);
    C->plan_free(C, pc);
    pair all[] = {z, sc, bias, dw, dch, ds, imp, dimp, ids, out};
    for (size_t i = 0; i < sizeof all / sizeof all[0]; i++)
        drop(all[i]);
}
END_TEST

/* ---- dispatch, experts, combine on one plan ----------------------------------------- */

START_TEST(test_experts)
{
    const shape *s = &shapes[_i / 5];
    const moe_activation act = (moe_activation)(_i % 5);
    moe_layer_config c;
    base_config(&c, s);
    c.act = act;
    const int64_t T = s->T, E = s->E, d = s->d, f = s->f;
    double *zh = logits(s, 30 + (uint64_t)_i);
    pair z = mk(T * E, zh), sc = mk(T * E, NULL);
    R->scores_forward(R, TR(sc), TR(z), c.score, T, E);
    moe_bplan *pr, *pc;
    ck_assert_int_eq(R->plan_create(R, &c, T, &pr), MOE_OK);
    ck_assert_int_eq(C->plan_create(C, &c, T, &pc), MOE_OK);
    R->route(R, pr, TR(sc), TR(z), NULL, NULL, &c, MOE_KEY_STEP(0), T);
    ck_assert_int_eq(R->sync(R), MOE_OK);
    moe_plan *hp = host_plan(&c, T);
    ck_assert_int_eq(R->plan_download(R, hp, pr), MOE_OK);
    ck_assert_int_eq(C->plan_upload(C, pc, hp), MOE_OK);
    const int64_t n = hp->n > 0 ? hp->n : 1;

    pair x = mk_rand(T * d, 1, 31), xe = mk(n * d, NULL);
    R->dispatch_forward(R, TR(xe), TR(x), pr, d);
    C->dispatch_forward(C, TC(xe), TC(x), pc, d);
    if (hp->n)
        rel(xe, "dispatch", TOL);
    pair w1 = mk_rand(E * d * f, 0.3, 32), w3 = mk_rand(E * d * f, 0.3, 33), w2 = mk_rand(E * f * d, 0.3, 34);
    pair ye = mk(n * d, NULL), h1 = mk(n * f, NULL), h3 = mk(n * f, NULL), a = mk(n * f, NULL);
    moe_tensor rw3 = TR(w3), cw3 = TC(w3);
    const int glu = moe_act_is_glu(act);
    R->experts_forward(R, TR(ye), TR(h1), TR(h3), TR(a), TR(xe), TR(w1), glu ? &rw3 : NULL, TR(w2), pr, act, d, f);
    C->experts_forward(C, TC(ye), TC(h1), TC(h3), TC(a), TC(xe), TC(w1), glu ? &cw3 : NULL, TC(w2), pc, act, d, f);
    if (hp->n) {
        rel(ye, "experts ye", TOL);
        rel(h1, "experts h1", TOL);
        rel(a, "experts a", TOL);
    }
    pair y = mk(T * d, NULL);
    R->combine_forward(R, TR(y), TR(ye), pr, d);
    C->combine_forward(C, TC(y), TC(ye), pc, d);
    rel(y, "combine", TOL);

    pair dy = mk_rand(T * d, 1, 35), dye = mk_rand(n * d, 1, 36), dwt = mk_rand(n, 1, 37);
    R->combine_backward(R, TR(dye), TR(dwt), TR(dy), TR(ye), pr, d);
    C->combine_backward(C, TC(dye), TC(dwt), TC(dy), TC(ye), pc, d);
    rel(dye, "combine dye", TOL);
    rel(dwt, "combine dweight", TOL);
    pair dxe = mk_rand(n * d, 1, 38), dw1 = mk_rand(E * d * f, 1, 39), dw3 = mk_rand(E * d * f, 1, 40),
         dw2 = mk_rand(E * f * d, 1, 41);
    pair dg1 = mk(n * f, NULL), dg3 = mk(n * f, NULL); /* written by the data half: poisoned */
    moe_tensor rdw3 = TR(dw3), cdw3 = TC(dw3), rg3 = TR(dg3), cg3 = TC(dg3);
    R->experts_backward_data(R, TR(dxe), TR(dg1), glu ? &rg3 : NULL, TR(dye), TR(h1), TR(h3), TR(w1),
                             glu ? &rw3 : NULL, TR(w2), pr, act, d, f);
    C->experts_backward_data(C, TC(dxe), TC(dg1), glu ? &cg3 : NULL, TC(dye), TC(h1), TC(h3), TC(w1),
                             glu ? &cw3 : NULL, TC(w2), pc, act, d, f);
    rel(dxe, "experts dxe", TOL);
    if (hp->n) {
        rel(dg1, "experts dg1", TOL);
        if (glu)
            rel(dg3, "experts dg3", TOL);
    }
    R->experts_backward_weights(R, TR(dw1), glu ? &rdw3 : NULL, TR(dw2), TR(dg1), glu ? &rg3 : NULL, TR(dye), TR(a),
                                TR(xe), pr, act, d, f);
    C->experts_backward_weights(C, TC(dw1), glu ? &cdw3 : NULL, TC(dw2), TC(dg1), glu ? &cg3 : NULL, TC(dye), TC(a),
                                TC(xe), pc, act, d, f);
    drop(dg1);
    drop(dg3);
    rel(dw1, "experts dw1", TOL);
    rel(dw2, "experts dw2", TOL);
    if (glu)
        rel(dw3, "experts dw3", TOL);
    pair dx = mk_rand(T * d, 1, 42);
    R->dispatch_backward(R, TR(dx), TR(dxe), pr, d);
    C->dispatch_backward(C, TC(dx), TC(dxe), pc, d);
    rel(dx, "dispatch dx", TOL);

    /* the single FFN (shared experts, dense branch) over all T rows */
    pair o = mk(T * d, NULL), g1 = mk(T * f, NULL), g3 = mk(T * f, NULL), ga = mk(T * f, NULL);
    R->ffn_forward(R, TR(o), TR(g1), TR(g3), TR(ga), TR(x), TR(w1), glu ? &rw3 : NULL, TR(w2), act, T, d, f);
    C->ffn_forward(C, TC(o), TC(g1), TC(g3), TC(ga), TC(x), TC(w1), glu ? &cw3 : NULL, TC(w2), act, T, d, f);
    rel(o, "ffn out", TOL);
    moe_tensor rdx = TR(dx), cdx = TC(dx);
    R->ffn_backward(R, &rdx, TR(dw1), glu ? &rdw3 : NULL, TR(dw2), TR(dy), TR(g1), TR(g3), TR(ga), TR(x), TR(w1),
                    glu ? &rw3 : NULL, TR(w2), act, T, d, f);
    C->ffn_backward(C, &cdx, TC(dw1), glu ? &cdw3 : NULL, TC(dw2), TC(dy), TC(g1), TC(g3), TC(ga), TC(x), TC(w1),
                    glu ? &cw3 : NULL, TC(w2), act, T, d, f);
    rel(dx, "ffn dx", TOL);
    rel(dw1, "ffn dw1", TOL);
    rel(dw2, "ffn dw2", TOL);

    free(zh);
    moe_plan_free(hp);
    R->plan_free(R, pr);
    C->plan_free(C, pc);
    pair all[] = {z, sc, x, xe, w1, w3, w2, ye, h1, h3, a, y, dy, dye, dwt, dxe, dw1, dw3, dw2, dx, o, g1, g3, ga};
    for (size_t i = 0; i < sizeof all / sizeof all[0]; i++)
        drop(all[i]);
}
END_TEST

/* ---- the fast exp of the activations -------------------------------------------- */

/* moe_exp_fast against exp over its whole range and at the special values: NaN in,
 * NaN out; overflow to inf and underflow to 0 as expf (and no undefined behaviour on
 * the way, which the sanitizer build checks: -fsanitize=float-cast-overflow) */
START_TEST(test_exp_fast)
{
    double worst = 0;
    for (double x = -110; x <= 95; x += 1.0 / 1024) {
        float y = moe_exp_fast((float)x);
        double e = exp((double)(float)x), want = (double)(float)e;
        if (want > FLT_MAX) {
            ck_assert_msg(isinf(y) && y > 0, "exp_fast(%.9g) = %g, want inf", x, y);
            continue;
        }
        double err = fabs(y - e);
        ck_assert_msg(err <= 4e-7 * e + 0x1p-148, "exp_fast(%.9g) = %.9g, exp %.9g", x, y, e);
        if (e >= FLT_MIN && err / e > worst)
            worst = err / e;
    }
    printf("exp_fast: max rel err %.2e over [-110, 95] (normal results)\n", worst);
    static const float big[] = {88.75f, 89.0f, 100.0f, 1e10f, 1e30f, FLT_MAX, INFINITY};
    for (size_t i = 0; i < sizeof big / sizeof big[0]; i++)
        ck_assert_msg(isinf(moe_exp_fast(big[i])) && moe_exp_fast(big[i]) > 0, "exp_fast(%g)", big[i]);
    static const float tiny[] = {-104.0f, -110.0f, -1e10f, -1e30f, -FLT_MAX, -INFINITY};
    for (size_t i = 0; i < sizeof tiny / sizeof tiny[0]; i++)
        ck_assert_msg(moe_exp_fast(tiny[i]) == 0.0f, "exp_fast(%g) = %g", tiny[i], moe_exp_fast(tiny[i]));
    ck_assert(isnan(moe_exp_fast(NAN)));
    ck_assert(isnan(moe_exp_fast(-NAN)));
    ck_assert(moe_exp_fast(0.0f) == 1.0f);
}
END_TEST

/* A NaN row of the FFN's input gives a NaN row out, under every activation; the
 * other rows are untouched and still match ref */
START_TEST(test_ffn_nan_row)
{
    const moe_activation act = (moe_activation)_i;
    const int glu = act == MOE_ACT_GEGLU || act == MOE_ACT_SWIGLU;
    const int64_t T = 9, d = 8, f = 12;
    double *xh = tu_alloc(T * d);
    tu_randn(xh, T * d, 1, 50);
    for (int64_t j = 0; j < d; j++)
        xh[2 * d + j] = NAN;
    pair x = mk(T * d, xh), w1 = mk_rand(d * f, 0.4, 51), w3 = mk_rand(d * f, 0.4, 52), w2 = mk_rand(f * d, 0.4, 53);
    pair o = mk(T * d, NULL), g1 = mk(T * f, NULL), g3 = mk(T * f, NULL), ga = mk(T * f, NULL);
    moe_tensor rw3 = TR(w3), cw3 = TC(w3);
    R->ffn_forward(R, TR(o), TR(g1), TR(g3), TR(ga), TR(x), TR(w1), glu ? &rw3 : NULL, TR(w2), act, T, d, f);
    C->ffn_forward(C, TC(o), TC(g1), TC(g3), TC(ga), TC(x), TC(w1), glu ? &cw3 : NULL, TC(w2), act, T, d, f);
    double *a = tu_alloc(T * d), *r = tu_alloc(T * d);
    ck_assert_int_eq(moe_download_f64(C, a, TC(o), T * d), MOE_OK);
    ck_assert_int_eq(moe_download_f64(R, r, TR(o), T * d), MOE_OK);
    for (int64_t t = 0; t < T; t++)
        for (int64_t j = 0; j < d; j++) {
            double v = a[t * d + j];
            if (t == 2)
                ck_assert_msg(isnan(v), "act %d: row 2 (NaN in) gives %g", (int)act, v);
            else
                ck_assert_msg(fabs(v - r[t * d + j]) <= 1e-4 * (fabs(r[t * d + j]) + 1), "act %d: [%lld, %lld] %g vs %g",
                              (int)act, (long long)t, (long long)j, v, r[t * d + j]);
        }
    free(a);
    free(r);
    free(xh);
    pair all[] = {x, w1, w3, w2, o, g1, g3, ga};
    for (size_t i = 0; i < sizeof all / sizeof all[0]; i++)
        drop(all[i]);
}
END_TEST

int main(int argc, char **argv)
{
    (void)argc;
    passive_omp(argv);
    Suite *s = suite_create("cpu");
    TCase *tc = tcase_create("ops");
    tcase_add_checked_fixture(tc, setup, teardown);
    tcase_set_timeout(tc, 60);
    tcase_add_loop_test(tc, test_matmul, 0, NSHAPES);
    tcase_add_loop_test(tc, test_router_ops, 0, NSHAPES);
    tcase_add_loop_test(tc, test_noisy_router, 0, NSHAPES * NNOISE);
    tcase_add_loop_test(tc, test_route, 0, NSHAPES * NROUTE);
    tcase_add_loop_test(tc, test_experts, 0, NSHAPES * 5);
    tcase_add_test(tc, test_exp_fast);
    tcase_add_loop_test(tc, test_ffn_nan_row, 0, 5);
    suite_add_tcase(s, tc);
    return tu_run(s);
}
