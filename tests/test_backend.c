/*
 * The backend table is enough to run a MoE layer: a top-2 layer composed from the ref
 * backend's ops (buffers only touched through upload/download) must give the same
 * output, aux losses and gradients as the reference layer itself.
 */
#include "backend/backend.h"
#include "testutil.h"

typedef struct {
    moe_backend *b;
    moe_buf *buf;
    int64_t used, cap;
} pool;

static moe_tensor take(pool *p, int64_t n)
{
    ck_assert(p->used + n <= p->cap);
    moe_tensor t = {p->buf, p->used};
    p->used += n;
    return t;
}

static moe_tensor put(pool *p, const double *src, int64_t n)
{
    moe_tensor t = take(p, n);
    ck_assert_int_eq(moe_upload_f64(p->b, t, src, n), MOE_OK);
    return t;
}

static double *get(pool *p, moe_tensor t, int64_t n)
{
    double *h = tu_alloc(n);
    ck_assert_int_eq(moe_download_f64(p->b, h, t, n), MOE_OK);
    return h;
}

static void expect_close(const char *what, const double *a, const double *r, int64_t n)
{
    double e = tu_rel_err(a, r, n);
    ck_assert_msg(e <= 1e-12, "%s: rel err %.3e", what, e);
}

START_TEST(test_layer_through_backend)
{
    const int64_t T = 9, d = 5, f = 6, E = 4;
    moe_layer_config c;
    moe_layer_config_default(&c);
    c.d_model = d;
    c.d_ff = f;
    c.n_experts = E;
    c.top_k = 2;
    c.capacity_factor = 1.0;
    c.lb_coef = 0.01;
    c.z_coef = 0.001;
    c.act = MOE_ACT_SWIGLU;

    moe_ref_layer *L;
    ck_assert_int_eq(moe_ref_layer_create(&c, T, &L), MOE_OK);
    moe_ref_layer_init(L, 1.0);
    double *x = tu_alloc(T * d), *dy = tu_alloc(T * d), *y = tu_alloc(T * d), *dx = tu_alloc(T * d);
    tu_randn(x, T * d, 1.0, 1);
    tu_randn(dy, T * d, 1.0, 2);
    ck_assert_int_eq(moe_ref_layer_forward(L, y, x, NULL, NULL, T, MOE_KEY_STEP(0), 1), MOE_OK);
    moe_ref_layer_zero_grad(L);
    ck_assert_int_eq(moe_ref_layer_backward(L, dx, dy), MOE_OK);
    const moe_plan *rp = moe_ref_layer_plan(L);
    moe_aux_losses aux = moe_ref_layer_aux(L);

    moe_backend *b;
    ck_assert_int_eq(moe_backend_create("ref", NULL, &b), MOE_OK);
    ck_assert_str_eq(b->name, "ref");
    pool P = {b, NULL, 0, 1 << 16};
    ck_assert_int_eq(b->alloc(b, b->float_type, P.cap, &P.buf), MOE_OK);
    moe_bplan *plan;
    ck_assert_int_eq(b->plan_create(b, &c, T, &plan), MOE_OK);

    moe_tensor tx = put(&P, x, T * d), tdy = put(&P, dy, T * d);
    moe_tensor wr = put(&P, moe_ref_layer_param(L, "router.weight", NULL), d * E);
    moe_tensor w1 = put(&P, moe_ref_layer_param(L, "experts.w1", NULL), E * d * f);
    moe_tensor w3 = put(&P, moe_ref_layer_param(L, "experts.w3", NULL), E * d * f);
    moe_tensor w2 = put(&P, moe_ref_layer_param(L, "experts.w2", NULL), E * f * d);
    const int64_t N = T * c.top_k;
    moe_tensor z = take(&P, T * E), s = take(&P, T * E), xe = take(&P, N * d), ye = take(&P, N * d);
    moe_tensor h1 = take(&P, N * f), h3 = take(&P, N * f), a = take(&P, N * f), ty = take(&P, T * d);

    /* forward */
    b->matmul_forward(b, z, tx, wr, T, d, E);
    b->scores_forward(b, s, z, c.score, T, E);
    b->route(b, plan, s, z, NULL, NULL, &c, MOE_KEY_STEP(0), T);
    ck_assert_int_eq(b->sync(b), MOE_OK);
    b->dispatch_forward(b, xe, tx, plan, d);
    b->experts_forward(b, ye, h1, h3, a, xe, w1, &w3, w2, plan, c.act, d, f);
    b->combine_forward(b, ty, ye, plan, d);
    moe_tensor losses = take(&P, 2);
    b->lb_loss_forward(b, losses, s, plan, T, E);
    b->z_loss_forward(b, moe_tensor_at(losses, 1), z, T, E);
    double *lz = get(&P, losses, 2), lb = lz[0], zl = lz[1];
    free(lz);

    moe_plan *hp;
    ck_assert_int_eq(moe_plan_create(N, T, E, c.top_k, &hp), MOE_OK);
    ck_assert_int_eq(b->plan_download(b, hp, plan), MOE_OK);
    ck_assert_int_eq(moe_plan_check(hp), MOE_OK);
    ck_assert_int_eq(hp->n, rp->n);
    ck_assert_int_eq(hp->dropped, rp->dropped);
    for (int64_t i = 0; i < hp->n; i++) {
        ck_assert_int_eq(hp->token[i], rp->token[i]);
        ck_assert_int_eq(hp->expert[i], rp->expert[i]);
    }
    double *yb = get(&P, ty, T * d);
    expect_close("y", yb, y, T * d);
    ck_assert_double_eq_tol(lb, aux.lb, 1e-12);
    ck_assert_double_eq_tol(zl, aux.z, 1e-12);

    /* backward: combine, experts, dispatch; the router through its weights and losses */
    moe_tensor dye = take(&P, N * d), dw = take(&P, N), dxe = take(&P, N * d), ds = take(&P, T * E);
    moe_tensor dz = take(&P, T * E), tdx = take(&P, T * d), dwr = take(&P, d * E);
    moe_tensor dw1 = take(&P, E * d * f), dw3 = take(&P, E * d * f), dw2 = take(&P, E * f * d);
    b->combine_backward(b, dye, dw, tdy, ye, plan, d);
    moe_tensor dg1 = take(&P, N * f), dg3 = take(&P, N * f);
    b->experts_backward_data(b, dxe, dg1, &dg3, dye, h1, h3, w1, &w3, w2, plan, c.act, d, f);
    b->experts_backward_weights(b, dw1, &dw3, dw2, dg1, &dg3, dye, a, xe, plan, c.act, d, f);
    b->dispatch_backward(b, tdx, dxe, plan, d);
    b->lb_loss_backward(b, ds, c.lb_coef, plan, T, E);
    b->route_backward(b, ds, &dw, NULL, plan, s, NULL, &c);
    b->scores_backward(b, dz, ds, s, c.score, T, E);
    b->z_loss_backward(b, dz, c.z_coef, z, T, E);
    b->matmul_backward(b, &tdx, &dwr, dz, tx, wr, T, d, E);

    struct { const char *name; moe_tensor t; int64_t n; } g[] = {
        {"router.weight", dwr, d * E}, {"experts.w1", dw1, E * d * f},
        {"experts.w3", dw3, E * d * f}, {"experts.w2", dw2, E * f * d},
    };
    for (size_t i = 0; i < sizeof g / sizeof g[0]; i++) {
        double *hg = get(&P, g[i].t, g[i].n);
        expect_close(g[i].name, hg, moe_ref_layer_grad(L, g[i].name, NULL), g[i].n);
        free(hg);
    }
    double *dxb = get(&P, tdx, T * d);
    expect_close("dx", dxb, dx, T * d);

    /* out-of-range transfers are refused, not performed */
    moe_tensor past = {P.buf, P.cap - 2};
    ck_assert_int_eq(moe_upload_f64(b, past, x, 3), MOE_ERR_ARG);
    ck_assert_int_eq(moe_download_f64(b, dxb, past, 3), MOE_ERR_ARG);

    free(dxb);
    free(yb);
    moe_plan_free(hp);
    b->plan_free(b, plan);
    b->free(b, P.buf);
    moe_backend_free(b);
    moe_ref_layer_free(L);
    free(x);
    free(dy);
    free(y);
    free(dx);
}
END_TEST

/* A backend that leaves an op out: the cpu backend with its route removed. */
static moe_status partial_create(const moe_backend_options *o, moe_backend **out)
{
    moe_status s = moe_backend_cpu_create(o, out);
    if (!s)
        (*out)->route = NULL;
    return s;
}

START_TEST(test_registry)
{
    /* the built-in ones, by name */
    ck_assert_int_ge(moe_backend_count(), 2);
    ck_assert_str_eq(moe_backend_name(0), "ref");
    ck_assert_str_eq(moe_backend_name(1), "cpu");
    ck_assert_ptr_null(moe_backend_name(-1));
    ck_assert_msg(strstr(moe_backend_list(), "ref, cpu") != NULL, "%s", moe_backend_list());
    moe_backend *b = NULL;
    ck_assert_int_eq(moe_backend_create("tpu", NULL, &b), MOE_ERR_ARG);
    ck_assert_ptr_null(b);
    ck_assert_msg(strstr(moe_last_error(), "'tpu'") && strstr(moe_last_error(), "ref, cpu"), "%s", moe_last_error());
    /* a registered backend missing an op is refused when created, naming the op */
    ck_assert_int_eq(moe_backend_register("partial", "cpu without route", partial_create), MOE_OK);
    ck_assert_int_eq(moe_backend_register("partial", "again", partial_create), MOE_ERR_ARG);
    ck_assert_int_eq(moe_backend_register("cpu", "taken", partial_create), MOE_ERR_ARG);
    ck_assert_int_eq(moe_backend_create("partial", NULL, &b), MOE_ERR_UNSUPPORTED);
    ck_assert_ptr_null(b);
    ck_assert_msg(strstr(moe_last_error(), "'route'") != NULL, "%s", moe_last_error());
}
END_TEST

/* A failing op is reported by the next sync, naming the op; later ops do not overwrite it. */
START_TEST(test_sticky_error)
{
    moe_backend *b;
    ck_assert_int_eq(moe_backend_create("cpu", NULL, &b), MOE_OK);
    moe_layer_config c;
    moe_layer_config_default(&c);
    moe_bplan *p;
    ck_assert_int_eq(b->plan_create(b, &c, 8, &p), MOE_OK);
    moe_buf *buf;
    ck_assert_int_eq(b->alloc(b, MOE_F32, 64, &buf), MOE_OK);
    moe_tensor t = {buf, 0};
    b->route(b, p, t, t, NULL, NULL, &c, MOE_KEY_STEP(0), 9); /* more tokens than the plan holds */
    b->route(b, p, t, t, NULL, NULL, &c, MOE_KEY_STEP(0), 0);
    double v;
    ck_assert_int_eq(moe_download_f64(b, &v, t, 1), MOE_ERR_ARG); /* a download reports it too */
    ck_assert_msg(strstr(moe_last_error(), "route") && strstr(moe_last_error(), "T = 9"), "%s", moe_last_error());
    ck_assert_int_eq(b->sync(b), MOE_OK); /* reported once */
    ck_assert_int_eq(b->alloc(b, MOE_BF16, 4, &buf), MOE_ERR_ARG); /* cpu stores f32 and i32 */
    ck_assert_msg(strstr(moe_last_error(), "bf16") != NULL, "%s", moe_last_error());
    b->plan_free(b, p);
    b->free(b, (moe_buf *)t.buf);
    moe_backend_free(b);
}
END_TEST

/* Scratch that was not reserved is an error naming the op, never a silent skip; a host plan
 * that does not hold together is refused by plan_upload, saying what is wrong. */
START_TEST(test_scratch_and_bad_plan)
{
    moe_backend *b;
    ck_assert_int_eq(moe_backend_create("cpu", NULL, &b), MOE_OK);
    moe_layer_config c;
    moe_layer_config_default(&c);
    const int64_t T = 8, E = c.n_experts, k = c.top_k;
    moe_bplan *p;
    ck_assert_int_eq(b->plan_create(b, &c, T, &p), MOE_OK);
    moe_buf *buf;
    ck_assert_int_eq(b->alloc(b, MOE_F32, T * E, &buf), MOE_OK);
    moe_tensor ds = {buf, 0};
    b->lb_loss_backward(b, ds, 0.01, p, T, E); /* nothing reserved */
    ck_assert_int_eq(b->sync(b), MOE_ERR_ARG);
    ck_assert_msg(strstr(moe_last_error(), "lb_loss_backward") && strstr(moe_last_error(), "scratch"), "%s",
                  moe_last_error());

    /* one row per token on expert 0, then broken three ways */
    moe_plan *h;
    ck_assert_int_eq(moe_plan_create(T * k, T, E, k, &h), MOE_OK);
    h->n = T;
    for (int64_t t = 0; t < T; t++)
        h->token[t] = (int32_t)t, h->expert[t] = 0, h->weight[t] = 1.0, h->src[t] = t * E;
    for (int64_t e = 0; e <= E; e++)
        h->offsets[e] = e == 0 ? 0 : T;
    for (int64_t e = 0; e < E; e++)
        h->count[e] = e == 0 ? T : 0;
    ck_assert_int_eq(b->plan_upload(b, p, h), MOE_OK);
    h->token[3] = (int32_t)T;
    ck_assert_int_eq(b->plan_upload(b, p, h), MOE_ERR_ARG);
    ck_assert_msg(strstr(moe_last_error(), "token 8 outside [0, 8)") != NULL, "%s", moe_last_error());
    h->token[3] = 3, h->expert[5] = 1;
    ck_assert_int_eq(b->plan_upload(b, p, h), MOE_ERR_ARG);
    ck_assert_msg(strstr(moe_last_error(), "names expert 1") != NULL, "%s", moe_last_error());
    h->expert[5] = 0, h->count[0] = T - 1;
    ck_assert_int_eq(b->plan_upload(b, p, h), MOE_ERR_ARG);
    ck_assert_msg(strstr(moe_last_error(), "count 7") != NULL, "%s", moe_last_error());
    ck_assert_int_eq(b->sync(b), MOE_OK); /* a refused upload is an error of the call, not sticky */
    moe_plan_free(h);
    b->plan_free(b, p);
    b->free(b, buf);
    moe_backend_free(b);
}
END_TEST

int main(void)
{
    Suite *s = suite_create("backend");
    TCase *tc = tcase_create("ref");
    tcase_add_test(tc, test_layer_through_backend);
    tcase_add_test(tc, test_registry);
    tcase_add_test(tc, test_sticky_error);
    tcase_add_test(tc, test_scratch_and_bad_plan);
    suite_add_tcase(s, tc);
    return tu_run(s);
}
