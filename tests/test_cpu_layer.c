/*
 * The MoE layer written against the backend table (src/layer/moe_layer.c), checked twice
 * against the reference layer (ref/moe_layer.c) with the same parameters and inputs:
 *  - on the ref backend it must agree with moe_ref_layer to rounding (<= 1e-12): the
 *    composition is the same;
 *  - on the cpu backend (fp32) to <= 1e-5: output, dx, every parameter gradient and the
 *    aux losses, with the same routing plan (compared exactly).
 * For every router and activation, with the options spread over the cases.
 */
#define _POSIX_C_SOURCE 200809L /* setenv */
#include "layer/moe_layer.h"
#include "testutil.h"

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

typedef struct {
    moe_router_kind router;
    int variant;
} layer_case;

/* Config for (router, activation, variant): options rotate so each one is on somewhere. */
static void make_config(moe_layer_config *c, moe_router_kind r, moe_activation act, int v)
{
    moe_layer_config_default(c);
    c->d_model = 12;
    c->d_ff = 20;
    c->n_experts = 5;
    c->top_k = 2;
    c->router = r;
    c->act = act;
    c->seed = 99 + (uint64_t)v;
    switch (r) {
    case MOE_ROUTER_TOPK:
        c->capacity_factor = v % 2 ? 1.0 : 0;
        c->drop_policy = v % 3 == 1 ? MOE_DROP_PROBABILITY : MOE_DROP_POSITION;
        c->second_policy = (moe_second_policy)(v % 3);
        c->use_bias = v % 2;
        c->score = v == 3 ? MOE_SCORE_SIGMOID : MOE_SCORE_SOFTMAX;
        c->renormalize = v != 4;
        c->jitter_eps = v == 2 ? 0.05 : 0;
        break;
    case MOE_ROUTER_NOISY_TOPK:
        c->capacity_factor = v % 2 ? 1.25 : 0;
        c->top_k = v % 2 ? 2 : 3;
        c->jitter_eps = 0.02;
        break;
    case MOE_ROUTER_EXPERT_CHOICE:
        c->capacity_factor = 1.5;
        c->renormalize = 0;
        break;
    case MOE_ROUTER_HASH:
        c->top_k = 1;
        break;
    case MOE_ROUTER_SINKHORN:
        c->capacity_factor = v % 2 ? 1.0 : 0;
        c->sinkhorn_iters = 5;
        break;
    }
    if (r != MOE_ROUTER_HASH) {
        c->lb_coef = 0.01;
        c->importance_coef = 0.02;
        c->load_coef = 0.03;
        c->z_coef = 0.001;
        c->mi_coef = v % 2 ? 0.05 : 0;
        c->n_tasks = v % 2 ? 3 : 0;
    }
    c->n_shared = v % 2 ? 0 : 1 + v % 3 / 2;
    c->d_ff_shared = 8;
    c->shared_gate = c->n_shared && v % 4 == 0;
    c->residual = v % 3 == 0;
    c->d_ff_dense = 10;
}

static void check_close(const char *what, const double *a, const double *r, int64_t n, double tol, int i)
{
    double e = tu_rel_err(a, r, n);
    ck_assert_msg(e <= tol, "case %d: %s rel err %.3e > %.0e", i, what, e, tol);
}

typedef struct {
    moe_backend *b;
    moe_layer *L;
    moe_buf *io, *ids; /* x, y, dy, dx; token and task ids */
} side;

static void side_run(side *sd, moe_ref_layer *ref, const moe_layer_config *c, int64_t T, const double *x,
                     const double *dy, const int32_t *ids, const int32_t *tasks, double *y, double *dx)
{
    const int64_t d = c->d_model;
    ck_assert_int_eq(moe_layer_create(c, sd->b, T, NULL, &sd->L), MOE_OK);
    const moe_arena *P = moe_ref_layer_params(ref);
    for (int i = 0; i < P->n; i++)
        ck_assert_int_eq(moe_layer_set_param(sd->L, P->views[i].name, moe_arena_ptr(P, &P->views[i])), MOE_OK);
    ck_assert_int_eq(sd->b->alloc(sd->b, sd->b->float_type, 4 * T * d, &sd->io), MOE_OK);
    moe_tensor tx = {sd->io, 0}, ty = {sd->io, T * d}, tdy = {sd->io, 2 * T * d}, tdx = {sd->io, 3 * T * d};
    ck_assert_int_eq(moe_upload_f64(sd->b, tx, x, T * d), MOE_OK);
    ck_assert_int_eq(moe_upload_f64(sd->b, tdy, dy, T * d), MOE_OK);
    double *nan = tu_alloc(T * d);
    tu_nan_fill(nan, T * d);
    moe_upload_f64(sd->b, ty, nan, T * d); /* poison */
    moe_upload_f64(sd->b, tdx, nan, T * d);
    free(nan);
    ck_assert_int_eq(sd->b->alloc(sd->b, MOE_I32, 2 * T, &sd->ids), MOE_OK);
    moe_tensor tid = {sd->ids, 0}, ttask = {sd->ids, T};
    ck_assert_int_eq(sd->b->upload(sd->b, tid, ids, MOE_I32, T), MOE_OK);
    ck_assert_int_eq(sd->b->upload(sd->b, ttask, tasks, MOE_I32, T), MOE_OK);
    moe_layer_zero_grad(sd->L);
    ck_assert_msg(moe_layer_forward(sd->L, ty, tx, &tid, &ttask, T, MOE_KEY_STEP(3), 1) == MOE_OK, "%s",
                  moe_last_error());
    ck_assert_msg(moe_layer_backward(sd->L, tdx, tdy) == MOE_OK, "%s", moe_last_error());
    ck_assert_msg(moe_download_f64(sd->b, y, ty, T * d) == MOE_OK, "%s", moe_last_error());
    moe_download_f64(sd->b, dx, tdx, T * d);
}

static void side_free(side *sd)
{
    moe_layer_free(sd->L);
    sd->b->free(sd->b, sd->io);
    sd->b->free(sd->b, sd->ids);
    moe_backend_free(sd->b);
}

static void compare(side *sd, moe_ref_layer *ref, const moe_layer_config *c, int64_t T, const double *y,
                    const double *dx, const double *yr, const double *dxr, double tol, int i)
{
    const int64_t d = c->d_model;
    char what[96];
    snprintf(what, sizeof what, "%s %s/%s y", sd->b->name, moe_router_name(c->router), moe_activation_name(c->act));
    check_close(what, y, yr, T * d, tol, i);
    snprintf(what, sizeof what, "%s %s/%s dx", sd->b->name, moe_router_name(c->router), moe_activation_name(c->act));
    check_close(what, dx, dxr, T * d, tol, i);
    const moe_arena *G = moe_ref_layer_grads(ref);
    for (int v = 0; v < G->n; v++) {
        const moe_view *w = &G->views[v];
        double *g = tu_alloc(w->numel);
        ck_assert_int_eq(moe_layer_get_grad(sd->L, w->name, g), MOE_OK);
        snprintf(what, sizeof what, "%s %s/%s grad %s", sd->b->name, moe_router_name(c->router),
                 moe_activation_name(c->act), w->name);
        check_close(what, g, moe_arena_ptr(G, w), w->numel, tol, i);
        free(g);
    }
    moe_aux_losses a, r = moe_ref_layer_aux(ref);
    ck_assert_int_eq(moe_layer_aux(sd->L, &a), MOE_OK);
    const double av[] = {a.lb, a.importance, a.load, a.z, a.mi, a.total};
    const double rv[] = {r.lb, r.importance, r.load, r.z, r.mi, r.total};
    for (int q = 0; q < 6; q++)
        ck_assert_msg(fabs(av[q] - rv[q]) <= tol * (fabs(rv[q]) + 1e-6), "case %d %s: aux %d %.10g vs %.10g", i,
                      sd->b->name, q, av[q], rv[q]);
    /* the same plan */
    const moe_plan *rp = moe_ref_layer_plan(ref);
    moe_plan *hp;
    ck_assert_int_eq(moe_plan_create(rp->cap_n, rp->T, rp->E, rp->k, &hp), MOE_OK);
    ck_assert_int_eq(sd->b->plan_download(sd->b, hp, moe_layer_plan(sd->L)), MOE_OK);
    ck_assert_int_eq(hp->n, rp->n);
    ck_assert_int_eq(hp->dropped, rp->dropped);
    for (int64_t q = 0; q < rp->n; q++)
        ck_assert(hp->token[q] == rp->token[q] && hp->expert[q] == rp->expert[q]);
    moe_plan_free(hp);
}

#define NVAR 4

START_TEST(test_layer)
{
    const moe_router_kind r = (moe_router_kind)(_i / (5 * NVAR));
    const moe_activation act = (moe_activation)(_i / NVAR % 5);
    const int v = _i % NVAR;
    moe_layer_config c;
    make_config(&c, r, act, v);
    ck_assert_msg(moe_layer_config_validate(&c, 23) == MOE_OK, "case %d: %s", _i, moe_last_error());
    const int64_t T = 23, d = c.d_model;
    moe_ref_layer *ref;
    ck_assert_int_eq(moe_ref_layer_create(&c, T, &ref), MOE_OK);
    moe_ref_layer_init(ref, 1.0);
    if (c.use_bias) { /* a non-zero bias so that it matters */
        double *bias = moe_ref_layer_param(ref, "router.bias", NULL);
        tu_randn(bias, c.n_experts, 0.05, 7);
    }
    double *x = tu_alloc(T * d), *dy = tu_alloc(T * d), *yr = tu_alloc(T * d), *dxr = tu_alloc(T * d);
    double *y = tu_alloc(T * d), *dx = tu_alloc(T * d);
    tu_randn(x, T * d, 1.0, 1 + (uint64_t)_i);
    tu_randn(dy, T * d, 1.0, 2 + (uint64_t)_i);
    for (int64_t q = 0; q < T * d; q++) { /* float-exact inputs: both sides see the same values */
        x[q] = (float)x[q];
        dy[q] = (float)dy[q];
    }
    const moe_arena *P = moe_ref_layer_params(ref);
    for (int q = 0; q < P->n; q++) {
        double *w = moe_arena_ptr(P, &P->views[q]);
        for (int64_t e = 0; e < P->views[q].numel; e++)
            w[e] = (float)w[e];
    }
    int32_t ids[23], tasks[23];
    for (int q = 0; q < 23; q++) {
        ids[q] = q * 17 + 3;
        tasks[q] = q % 3;
    }
    moe_ref_layer_zero_grad(ref);
    ck_assert_msg(moe_ref_layer_forward(ref, yr, x, ids, tasks, T, MOE_KEY_STEP(3), 1) == MOE_OK, "%s", moe_last_error());
    ck_assert_int_eq(moe_ref_layer_backward(ref, dxr, dy), MOE_OK);

    side sr = {0}, sc = {0};
    ck_assert_int_eq(moe_backend_create("ref", NULL, &sr.b), MOE_OK);
    side_run(&sr, ref, &c, T, x, dy, ids, tasks, y, dx);
    compare(&sr, ref, &c, T, y, dx, yr, dxr, 1e-12, _i);
    ck_assert_int_eq(moe_backend_create("cpu", &(moe_backend_options){.threads = 2}, &sc.b), MOE_OK);
    side_run(&sc, ref, &c, T, x, dy, ids, tasks, y, dx);
    compare(&sc, ref, &c, T, y, dx, yr, dxr, 1e-5, _i);

    /* the aux-loss-free bias update moves both the same way */
    if (c.use_bias) {
        double *b0 = tu_alloc(c.n_experts), *b1 = tu_alloc(c.n_experts);
        moe_ref_layer_update_bias(ref);
        moe_layer_update_bias(sc.L);
        ck_assert_int_eq(moe_layer_get_param(sc.L, "router.bias", b1), MOE_OK);
        memcpy(b0, moe_ref_layer_param(ref, "router.bias", NULL), (size_t)c.n_experts * sizeof *b0);
        check_close("bias update", b1, b0, c.n_experts, 1e-6, _i);
        free(b0);
        free(b1);
    }
    side_free(&sr);
    side_free(&sc);
    moe_ref_layer_free(ref);
    free(x);
    free(dy);
    free(yr);
    free(dxr);
    free(y);
    free(dx);
}
END_TEST

/* Bad input is refused with a message, not a crash. */
START_TEST(test_bad_input)
{
    moe_layer_config c;
    moe_layer_config_default(&c);
    moe_backend *b;
    ck_assert_int_eq(moe_backend_create("cpu", &(moe_backend_options){.threads = 1}, &b), MOE_OK);
    moe_layer *L = NULL;
    c.top_k = 9;
    ck_assert_int_eq(moe_layer_create(&c, b, 16, NULL, &L), MOE_ERR_ARG);
    ck_assert_ptr_null(L);
    moe_layer_config_default(&c);
    ck_assert_int_eq(moe_layer_create(&c, b, 0, NULL, &L), MOE_ERR_ARG);
    ck_assert_int_eq(moe_layer_create(&c, b, 16, NULL, &L), MOE_OK);
    moe_buf *io;
    ck_assert_int_eq(b->alloc(b, b->float_type, 64 * 64, &io), MOE_OK);
    moe_tensor t = {io, 0};
    ck_assert_int_eq(moe_layer_forward(L, t, t, NULL, NULL, 17, MOE_KEY_STEP(0), 1), MOE_ERR_ARG);
    ck_assert_int_eq(moe_layer_backward(L, t, t), MOE_ERR_ARG); /* no forward yet */
    ck_assert_int_eq(moe_layer_set_param(L, "no.such", NULL), MOE_ERR_ARG);
    b->free(b, io);
    moe_layer_free(L);
    moe_backend_free(b);
}
END_TEST

int main(int argc, char **argv)
{
    (void)argc;
    passive_omp(argv);
    Suite *s = suite_create("cpu_layer");
    TCase *tc = tcase_create("layer");
    tcase_set_timeout(tc, 60);
    tcase_add_loop_test(tc, test_layer, 0, 5 * 5 * NVAR);
    tcase_add_test(tc, test_bad_input);
    suite_add_tcase(s, tc);
    return tu_run(s);
}
