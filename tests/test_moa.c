/*
 * Mixture of attention heads (ref/moa.h, src/layer/moa.h, src/cpu/moa.c):
 *  - the oracle's backward against central finite differences in double, every coordinate
 *    of x and of every weight (those that change the routing skipped and counted);
 *  - its plan ops: the grouped linear map's backward by finite differences, choice_scatter
 *    and choice_gather adjoint, dropped choices' slots zero;
 *  - the cpu twins of those ops against ref on one plan, outputs NaN-poisoned first;
 *  - the layer composed from backend ops against the oracle: on ref to 1e-12, on cpu to
 *    1e-5 (output, aux losses, every gradient), and its decode against its forward;
 *  - the language model with attention_experts (test_moa_model.c).
 */
#define _POSIX_C_SOURCE 200809L
#include "layer/moa.h"
#include "layer/moe_layer.h"
#include "ref/moa.h"
#include "ref/ref.h"
#include "testutil.h"

static const moe_moa_dims DIMS = {.B = 2, .S = 5, .C = 8, .hd = 4, .E = 4, .k = 2, .rope_theta = 10000.0,
                                  .lb_coef = 0.1, .z_coef = 0.01};

/* weights and inputs, drawn once per seed; float-representable so that cpu starts exact */
typedef struct {
    moe_moa_dims d;
    int64_t N, nw[5];
    double *x, *dy, *w[5];
} problem;

static const char *const wname[5] = {"router.weight", "k_proj.weight", "v_proj.weight", "experts.q_proj",
                                     "experts.o_proj"};

static void to_float(double *v, int64_t n)
{
    for (int64_t i = 0; i < n; i++)
        v[i] = (float)v[i];
}

static problem make_problem(const moe_moa_dims *d, uint64_t seed)
{
    problem p = {.d = *d, .N = d->B * d->S};
    const int64_t C = d->C, hd = d->hd, E = d->E;
    const int64_t nw[5] = {C * E, C * hd, C * hd, E * C * hd, E * hd * C};
    p.x = tu_alloc(p.N * C);
    p.dy = tu_alloc(p.N * C);
    tu_randn(p.x, p.N * C, 1.0, seed);
    tu_randn(p.dy, p.N * C, 1.0, seed + 1);
    to_float(p.x, p.N * C);
    to_float(p.dy, p.N * C);
    for (int i = 0; i < 5; i++) {
        p.nw[i] = nw[i];
        p.w[i] = tu_alloc(nw[i]);
        tu_randn(p.w[i], nw[i], i == 0 ? 1.0 : 0.6, seed + 2 + (uint64_t)i);
        to_float(p.w[i], nw[i]);
    }
    return p;
}

static void free_problem(problem *p)
{
    free(p->x), free(p->dy);
    for (int i = 0; i < 5; i++)
        free(p->w[i]);
}

static moe_moa_weights weights(const problem *p)
{
    return (moe_moa_weights){p->w[0], p->w[1], p->w[2], p->w[3], p->w[4]};
}

static int same_routing(const moe_plan *a, const moe_plan *b)
{
    if (a->n != b->n)
        return 0;
    for (int64_t i = 0; i < a->n; i++)
        if (a->token[i] != b->token[i] || a->expert[i] != b->expert[i])
            return 0;
    return 1;
}

/* ---- the oracle's backward by finite differences ----------------------------------- */

typedef struct {
    problem *p;
    moe_ref_moa *a;
    moe_plan *plan0; /* the unperturbed routing */
} fd_ctx;

static double loss(void *vctx, int *ok)
{
    fd_ctx *c = vctx;
    const int64_t n = c->p->N * c->p->d.C;
    double *y = tu_alloc(n), aux[2];
    moe_moa_weights w = weights(c->p);
    ck_assert_int_eq(moe_ref_moa_forward(c->a, y, aux, c->p->x, &w), MOE_OK);
    if (!same_routing(moe_ref_moa_plan(c->a), c->plan0))
        *ok = 0;
    double L = c->p->d.lb_coef * aux[0] + c->p->d.z_coef * aux[1];
    for (int64_t i = 0; i < n; i++)
        L += c->p->dy[i] * y[i];
    free(y);
    return L;
}

START_TEST(test_ref_fd)
{
    problem p = make_problem(&DIMS, 10);
    moe_ref_moa *a;
    ck_assert_int_eq(moe_ref_moa_create(&p.d, &a), MOE_OK);
    const int64_t NC = p.N * p.d.C;
    double *y = tu_alloc(NC), *dx = tu_alloc(NC), aux[2], *g[5];
    for (int i = 0; i < 5; i++)
        g[i] = tu_alloc(p.nw[i]);
    moe_moa_weights w = weights(&p);
    moe_moa_grads gr = {g[0], g[1], g[2], g[3], g[4]};
    ck_assert_int_eq(moe_ref_moa_forward(a, y, aux, p.x, &w), MOE_OK);
    ck_assert(aux[0] > 0 && aux[1] > 0);
    ck_assert_int_eq(moe_ref_moa_backward(a, dx, &gr, p.dy, p.x, &w), MOE_OK);
    moe_plan *plan0;
    ck_assert_int_eq(moe_plan_create(p.N * p.d.k, p.N, p.d.E, p.d.k, &plan0), MOE_OK);
    const moe_plan *pl = moe_ref_moa_plan(a);
    plan0->n = pl->n;
    memcpy(plan0->token, pl->token, (size_t)pl->n * sizeof *pl->token);
    memcpy(plan0->expert, pl->expert, (size_t)pl->n * sizeof *pl->expert);
    fd_ctx c = {&p, a, plan0};
    tu_fd_stats st = {0};
    double e = tu_fd_check(p.x, NC, dx, loss, &c, 1e-5, &st);
    printf("moa oracle fd: x rel err %.2e\n", e);
    ck_assert_double_le(e, 1e-6);
    for (int i = 0; i < 5; i++) {
        e = tu_fd_check(p.w[i], p.nw[i], g[i], loss, &c, 1e-5, &st);
        printf("moa oracle fd: %s rel err %.2e\n", wname[i], e);
        ck_assert_double_le(e, 1e-6);
    }
    printf("moa oracle fd: %lld coordinates checked, %lld skipped (routing changed), worst %.2e\n",
           (long long)st.checked, (long long)st.skipped, st.worst);
    ck_assert_int_gt(st.checked, 400);
    moe_plan_free(plan0);
    moe_ref_moa_free(a);
    free(y), free(dx);
    for (int i = 0; i < 5; i++)
        free(g[i]);
    free_problem(&p);
}
END_TEST

/* ---- the plan ops ---------------------------------------------------------------------- */

/* A top-2 plan over T tokens of E experts; with capacity 1.0 some choices are dropped. */
static moe_plan *a_plan(int64_t T, int64_t E, int64_t k, double cf, uint64_t seed)
{
    moe_layer_config c;
    moe_layer_config_default(&c);
    c.n_experts = E;
    c.top_k = k;
    c.d_model = 4;
    c.d_ff = 4;
    c.capacity_factor = cf;
    double *z = tu_alloc(T * E), *s = tu_alloc(T * E);
    tu_randn(z, T * E, 1.0, seed);
    moe_ref_softmax_forward(s, z, T, E);
    moe_plan *p;
    ck_assert_int_eq(moe_plan_create(T * k, T, E, k, &p), MOE_OK);
    ck_assert_int_eq(moe_ref_route(p, s, z, NULL, NULL, &c, MOE_KEY_STEP(0), T), MOE_OK);
    free(z), free(s);
    return p;
}

typedef struct {
    const moe_plan *p;
    double *xe, *w, *dye;
    int64_t K, N;
} lin_ctx;

static double lin_loss(void *vctx, int *ok)
{
    lin_ctx *c = vctx;
    double *ye = tu_alloc(c->p->n * c->N), L = 0;
    moe_ref_experts_linear_forward(ye, c->xe, c->w, c->p, c->K, c->N);
    for (int64_t i = 0; i < c->p->n * c->N; i++)
        L += c->dye[i] * ye[i];
    free(ye);
    (void)ok;
    return L;
}

START_TEST(test_ref_ops)
{
    const int64_t T = 12, E = 4, k = 2, K = 5, N = 3, w = 3;
    moe_plan *p = a_plan(T, E, k, 1.0, 3);
    ck_assert_int_gt(p->dropped, 0); /* some choices have no row */
    const int64_t n = p->n;
    lin_ctx c = {p, tu_alloc(n * K), tu_alloc(E * K * N), tu_alloc(n * N), K, N};
    tu_randn(c.xe, n * K, 1, 4);
    tu_randn(c.w, E * K * N, 1, 5);
    tu_randn(c.dye, n * N, 1, 6);
    double *dxe = tu_alloc(n * K), *dw = tu_alloc(E * K * N);
    moe_ref_experts_linear_backward(dxe, dw, c.dye, c.xe, c.w, p, K, N);
    double e1 = tu_fd_check(c.xe, n * K, dxe, lin_loss, &c, 1e-5, NULL);
    double e2 = tu_fd_check(c.w, E * K * N, dw, lin_loss, &c, 1e-5, NULL);
    printf("experts_linear fd: dxe %.2e, dw %.2e\n", e1, e2);
    ck_assert_double_le(e1, 1e-8);
    ck_assert_double_le(e2, 1e-8);

    /* scatter then gather restores the rows; dropped slots are zero; <scatter r, s> = <r, gather s> */
    double *rows = tu_alloc(n * w), *slots = tu_alloc(T * k * w), *back = tu_alloc(n * w), *s2 = tu_alloc(T * k * w);
    tu_randn(rows, n * w, 1, 7);
    tu_nan_fill(slots, T * k * w);
    moe_ref_choice_scatter(slots, rows, p, w);
    moe_ref_choice_gather(back, slots, p, w);
    ck_assert_double_eq(tu_max_abs(back, rows, n * w), 0);
    int64_t empty = 0;
    for (int64_t t = 0; t < T * k; t++)
        if (!p->choice_kept[t]) {
            empty++;
            for (int64_t j = 0; j < w; j++)
                ck_assert_double_eq(slots[t * w + j], 0);
        }
    ck_assert_int_eq(empty, p->dropped);
    tu_randn(s2, T * k * w, 1, 8);
    memset(back, 0, (size_t)(n * w) * sizeof *back);
    moe_ref_choice_gather(back, s2, p, w);
    double a = 0, b = 0;
    for (int64_t i = 0; i < T * k * w; i++)
        a += slots[i] * s2[i];
    for (int64_t i = 0; i < n * w; i++)
        b += rows[i] * back[i];
    ck_assert_double_le(fabs(a - b), 1e-12 * (1 + fabs(a)));
    moe_plan_free(p);
    free(c.xe), free(c.w), free(c.dye), free(dxe), free(dw), free(rows), free(slots), free(back), free(s2);
}
END_TEST

/* ---- backends ------------------------------------------------------------------------------ */

static moe_backend *backend(const char *name)
{
    moe_backend *b;
    ck_assert_int_eq(moe_backend_create(name, &(moe_backend_options){.threads = 2}, &b), MOE_OK);
    return b;
}

static moe_tensor upload(moe_backend *b, const double *v, int64_t n)
{
    moe_buf *buf;
    ck_assert_int_eq(b->alloc(b, b->float_type, n > 0 ? n : 1, &buf), MOE_OK);
    moe_tensor t = {buf, 0};
    if (v)
        ck_assert_int_eq(moe_upload_f64(b, t, v, n), MOE_OK);
    return t;
}

static double *download(moe_backend *b, moe_tensor t, int64_t n)
{
    double *v = tu_alloc(n);
    ck_assert_msg(moe_download_f64(b, v, t, n) == MOE_OK, "%s", moe_last_error());
    return v;
}

/* cpu's ops against ref's on one plan (ref's, uploaded to cpu), outputs poisoned */
START_TEST(test_cpu_ops)
{
    const int64_t T = 150, E = 6, k = 2, K = 40, N = 24; /* more than one 64-row block per expert */
    moe_plan *hp = a_plan(T, E, k, 1.1, 9);
    ck_assert_int_gt(hp->dropped, 0);
    moe_backend *R = backend("ref"), *C = backend("cpu");
    moe_layer_config lc;
    moe_layer_config_default(&lc);
    lc.n_experts = E, lc.top_k = k, lc.d_model = 4, lc.d_ff = 4, lc.capacity_factor = 1.1;
    moe_bplan *pr, *pc;
    ck_assert_int_eq(R->plan_create(R, &lc, T, &pr), MOE_OK);
    ck_assert_int_eq(C->plan_create(C, &lc, T, &pc), MOE_OK);
    ck_assert_int_eq(R->plan_upload(R, pr, hp), MOE_OK);
    ck_assert_int_eq(C->plan_upload(C, pc, hp), MOE_OK);
    const int64_t n = hp->n;
    double *xe = tu_alloc(n * K), *wt = tu_alloc(E * K * N), *dye = tu_alloc(n * N), *poison = tu_alloc(T * k * K);
    tu_randn(xe, n * K, 1, 10);
    tu_randn(wt, E * K * N, 1, 11);
    tu_randn(dye, n * N, 1, 12);
    to_float(xe, n * K), to_float(wt, E * K * N), to_float(dye, n * N);
    tu_nan_fill(poison, T * k * K);
    moe_backend *bs[2] = {R, C};
    double *out[2][5];
    for (int i = 0; i < 2; i++) {
        moe_backend *b = bs[i];
        moe_bplan *p = i ? pc : pr;
        moe_tensor x = upload(b, xe, n * K), W = upload(b, wt, E * K * N), g = upload(b, dye, n * N);
        moe_tensor y = upload(b, poison, n * N), dx = upload(b, NULL, n * K), dW = upload(b, NULL, E * K * N);
        moe_tensor sl = upload(b, poison, T * k * K), rows = upload(b, NULL, n * K);
        b->experts_linear_forward(b, y, x, W, p, K, N);
        b->experts_linear_backward(b, &dx, dW, g, x, W, p, K, N);
        b->choice_scatter(b, sl, x, p, K);
        b->choice_gather(b, rows, sl, p, K);
        b->choice_gather(b, rows, sl, p, K); /* accumulates: twice the rows */
        out[i][0] = download(b, y, n * N);
        out[i][1] = download(b, dx, n * K);
        out[i][2] = download(b, dW, E * K * N);
        out[i][3] = download(b, sl, T * k * K);
        out[i][4] = download(b, rows, n * K);
        moe_tensor all[] = {x, W, g, y, dx, dW, sl, rows};
        for (size_t j = 0; j < sizeof all / sizeof all[0]; j++)
            b->free(b, all[j].buf);
    }
    static const char *what[5] = {"experts_linear_forward", "experts_linear_backward dxe",
                                  "experts_linear_backward dw", "choice_scatter", "choice_gather"};
    const int64_t len[5] = {n * N, n * K, E * K * N, T * k * K, n * K};
    for (int j = 0; j < 5; j++) {
        double e = tu_rel_err(out[1][j], out[0][j], len[j]);
        printf("cpu vs ref: %s rel err %.2e\n", what[j], e);
        ck_assert_double_le(e, 1e-5);
        free(out[0][j]), free(out[1][j]);
    }
    R->plan_free(R, pr);
    C->plan_free(C, pc);
    moe_backend_free(R);
    moe_backend_free(C);
    moe_plan_free(hp);
    free(xe), free(wt), free(dye), free(poison);
}
END_TEST

/* ---- the composed layer against the oracle ---------------------------------------------- */

typedef struct {
    double *y, *dx, *g[5], aux[2];
    moe_plan *plan;
} result;

static void free_result(result *r)
{
    free(r->y), free(r->dx);
    for (int i = 0; i < 5; i++)
        free(r->g[i]);
    moe_plan_free(r->plan);
}

static result oracle(problem *p)
{
    result r = {0};
    moe_ref_moa *a;
    ck_assert_int_eq(moe_ref_moa_create(&p->d, &a), MOE_OK);
    const int64_t NC = p->N * p->d.C;
    r.y = tu_alloc(NC);
    r.dx = tu_alloc(NC);
    for (int i = 0; i < 5; i++)
        r.g[i] = tu_alloc(p->nw[i]);
    moe_moa_weights w = weights(p);
    moe_moa_grads g = {r.g[0], r.g[1], r.g[2], r.g[3], r.g[4]};
    ck_assert_int_eq(moe_ref_moa_forward(a, r.y, r.aux, p->x, &w), MOE_OK);
    ck_assert_int_eq(moe_ref_moa_backward(a, r.dx, &g, p->dy, p->x, &w), MOE_OK);
    const moe_plan *pl = moe_ref_moa_plan(a);
    ck_assert_int_eq(moe_plan_create(pl->n, pl->T, pl->E, pl->k, &r.plan), MOE_OK);
    r.plan->n = pl->n;
    memcpy(r.plan->token, pl->token, (size_t)pl->n * sizeof *pl->token);
    memcpy(r.plan->expert, pl->expert, (size_t)pl->n * sizeof *pl->expert);
    moe_ref_moa_free(a);
    return r;
}

static moe_moa *layer_with(moe_backend *b, const problem *p)
{
    moe_moa *a;
    moe_status s = moe_moa_create(&p->d, 1, 7, b, &a);
    ck_assert_msg(s == MOE_OK, "%s", moe_last_error());
    for (int i = 0; i < 5; i++) {
        moe_tensor t;
        ck_assert_int_eq(moe_moa_param_tensors(a, wname[i], &t, NULL), MOE_OK);
        ck_assert_int_eq(moe_upload_f64(b, t, p->w[i], p->nw[i]), MOE_OK);
    }
    moe_moa_zero_grad(a);
    return a;
}

static result composed(const char *name, problem *p)
{
    result r = {0};
    moe_backend *b = backend(name);
    moe_moa *a = layer_with(b, p);
    const int64_t NC = p->N * p->d.C;
    double *poison = tu_alloc(NC);
    tu_nan_fill(poison, NC);
    moe_tensor x = upload(b, p->x, NC), dy = upload(b, p->dy, NC), y = upload(b, poison, NC), dx = upload(b, NULL, NC);
    ck_assert_int_eq(moe_moa_forward(a, y, x, p->d.B, p->d.S, MOE_KEY_STEP(0)), MOE_OK);
    ck_assert_int_eq(moe_moa_backward(a, dx, dy), MOE_OK);
    r.y = download(b, y, NC);
    r.dx = download(b, dx, NC);
    double *st = download(b, moe_moa_stats(a), MOE_LAYER_NSTATS(p->d.E));
    r.aux[0] = st[MOE_STAT_LB];
    r.aux[1] = st[MOE_STAT_Z];
    ck_assert_double_eq(st[MOE_STAT_COUNTS + 2 * p->d.E], (double)(p->N * p->d.k)); /* n: dropless */
    free(st);
    for (int i = 0; i < 5; i++) {
        moe_tensor g;
        ck_assert_int_eq(moe_moa_param_tensors(a, wname[i], NULL, &g), MOE_OK);
        r.g[i] = download(b, g, p->nw[i]);
    }
    ck_assert_int_eq(moe_plan_create(p->N * p->d.k, p->N, p->d.E, p->d.k, &r.plan), MOE_OK);
    ck_assert_int_eq(b->plan_download(b, r.plan, moe_moa_plan(a)), MOE_OK);
    moe_tensor all[] = {x, dy, y, dx};
    for (int i = 0; i < 4; i++)
        b->free(b, all[i].buf);
    free(poison);
    moe_moa_free(a);
    moe_backend_free(b);
    return r;
}

static void against_oracle(const char *name, const moe_moa_dims *d, double tol)
{
    problem p = make_problem(d, 20);
    result o = oracle(&p), c = composed(name, &p);
    ck_assert_msg(same_routing(o.plan, c.plan), "%s: the composed layer routed differently", name);
    double worst = tu_rel_err(c.y, o.y, p.N * d->C);
    printf("moa on %s vs oracle: y %.2e", name, worst);
    ck_assert_double_le(worst, tol);
    for (int j = 0; j < 2; j++)
        ck_assert_double_le(fabs(c.aux[j] - o.aux[j]), tol * fabs(o.aux[j]));
    double e = tu_rel_err(c.dx, o.dx, p.N * d->C);
    printf(", dx %.2e", e);
    ck_assert_double_le(e, tol);
    for (int i = 0; i < 5; i++) {
        e = tu_rel_err(c.g[i], o.g[i], p.nw[i]);
        printf(", %s %.2e", wname[i], e);
        ck_assert_msg(e <= tol, "%s: gradient of %s rel err %.2e", name, wname[i], e);
    }
    printf("\n");
    free_result(&o);
    free_result(&c);
    free_problem(&p);
}

START_TEST(test_layer_ref)
{
    against_oracle("ref", &DIMS, 1e-12);
    moe_moa_dims d = DIMS;
    d.k = 1, d.E = 3, d.B = 1, d.S = 9; /* top-1, one sequence */
    against_oracle("ref", &d, 1e-12);
}
END_TEST

START_TEST(test_layer_cpu)
{
    against_oracle("cpu", &DIMS, 1e-5);
    moe_moa_dims d = DIMS;
    d.C = 24, d.hd = 8, d.E = 8, d.k = 3, d.B = 3, d.S = 11;
    against_oracle("cpu", &d, 1e-5);
}
END_TEST

/* decode of one sequence, position by position, gives the forward's outputs */
static void decode_matches(const char *name, double tol)
{
    moe_moa_dims d = DIMS;
    d.B = 1, d.S = 7;
    problem p = make_problem(&d, 30);
    moe_backend *b = backend(name);
    moe_moa *a = layer_with(b, &p);
    const int64_t C = d.C;
    moe_tensor x = upload(b, p.x, d.S * C), y = upload(b, NULL, d.S * C), y1 = upload(b, NULL, C);
    ck_assert_int_eq(moe_moa_forward(a, y, x, 1, d.S, MOE_KEY_STEP(0)), MOE_OK);
    double *full = download(b, y, d.S * C), *step = tu_alloc(d.S * C);
    for (int64_t pos = 0; pos < d.S; pos++) {
        ck_assert_int_eq(moe_moa_decode(a, y1, moe_tensor_at(x, pos * C), pos), MOE_OK);
        double *v = download(b, y1, C);
        memcpy(step + pos * C, v, (size_t)C * sizeof *v);
        free(v);
    }
    double e = tu_rel_err(step, full, d.S * C);
    printf("moa decode on %s vs forward: rel err %.2e\n", name, e);
    ck_assert_double_le(e, tol);
    moe_tensor dx = upload(b, NULL, d.S * C);
    ck_assert_int_eq(moe_moa_backward(a, dx, y), MOE_ERR_ARG); /* decode overwrote the forward */
    moe_tensor all[] = {x, y, y1, dx};
    for (int i = 0; i < 4; i++)
        b->free(b, all[i].buf);
    free(full), free(step);
    moe_moa_free(a);
    moe_backend_free(b);
    free_problem(&p);
}

START_TEST(test_decode)
{
    decode_matches("ref", 1e-12);
    decode_matches("cpu", 1e-5);
}
END_TEST

START_TEST(test_bad)
{
    moe_backend *b = backend("ref");
    moe_moa *a;
    moe_moa_dims d = DIMS;
    d.k = 5; /* more than E */
    ck_assert_int_eq(moe_moa_create(&d, 0, 1, b, &a), MOE_ERR_ARG);
    ck_assert_ptr_nonnull(strstr(moe_last_error(), "attention_experts_per_tok"));
    d = DIMS;
    d.hd = 3;
    ck_assert_int_eq(moe_moa_create(&d, 0, 1, b, &a), MOE_ERR_ARG);
    moe_backend_free(b);
}
END_TEST

int main(void)
{
    Suite *s = suite_create("moa");
    TCase *t = tcase_create("moa");
    tcase_set_timeout(t, 120);
    tcase_add_test(t, test_ref_fd);
    tcase_add_test(t, test_ref_ops);
    tcase_add_test(t, test_cpu_ops);
    tcase_add_test(t, test_layer_ref);
    tcase_add_test(t, test_layer_cpu);
    tcase_add_test(t, test_decode);
    tcase_add_test(t, test_bad);
    suite_add_tcase(s, t);
    return tu_run(s);
}
