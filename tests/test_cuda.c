/*
 * The cuda backend (gpu/), when a device answers; otherwise the suite exits 77 (SKIP), as on
 * CI and on machines without a GPU.
 *  - every op against ref (src/backend/check.h) in fp32 (<= 1e-5) and bf16 (<= 2e-2);
 *  - training: 10 AdamW steps of a small MoE model on cuda fp32, cpu and ref give the same
 *    losses (<= 1e-4 relative), and cuda bf16 stays near them;
 *  - two identical runs give the same bits (a layer under every router; training);
 *  - bad requests are refused with messages (types, dtype names, out of memory).
 */
#include "backend/check.h"
#include "layer/moe_layer.h"
#include "model/model.h"
#include "testutil.h"

static moe_backend *cuda(const char *dtype)
{
    moe_backend *b = NULL;
    moe_status s = moe_backend_create("cuda", &(moe_backend_options){.dtype = dtype}, &b);
    ck_assert_msg(s == MOE_OK, "%s", moe_last_error());
    return b;
}

static void print_failure(const moe_check_row *r, void *ctx)
{
    int *shown = ctx;
    if (!r->ok && (*shown)++ < 40)
        printf("FAIL %-28s %-40s %.3e > %.1e%s%s\n", r->op, r->shape, r->err, r->tol, r->note ? "  " : "",
               r->note ? r->note : "");
}

static void ops(const char *dtype)
{
    moe_backend *b = cuda(dtype);
    int failed = -1, rows = 0, shown = 0;
    const moe_check_options o = {.seed = 20240521};
    ck_assert_msg(moe_backend_check(b, &o, print_failure, &shown, &failed, &rows) == MOE_OK, "%s", moe_last_error());
    printf("cuda %s vs ref: %d of %d comparisons failed\n", dtype, failed, rows);
    ck_assert_int_gt(rows, 1000);
    ck_assert_int_eq(failed, 0);
    moe_backend_free(b);
}

START_TEST(test_ops_fp32)
{
    ops("fp32");
}
END_TEST

START_TEST(test_ops_bf16)
{
    ops("bf16");
}
END_TEST

/* ---- training -------------------------------------------------------------------------------- */

#define STEPS 10

static void small_model(moe_model_config *c)
{
    moe_model_config_tiny(c);
    c->hidden_size = 64;
    c->head_dim = 16;
    c->intermediate_size = 96;
    c->moe_intermediate_size = 64;
    c->moe.jitter_eps = 0.01;
}

/* per-step losses (ce + aux, averaged over 2 micro-batches) and, in params, the weights;
 * init_after: the optimizer is made before the weights are initialised (as cmoe train does) */
static void train_order(const char *backend, const char *dtype, double *losses, double **params, int64_t *n,
                        int init_after)
{
    moe_model_config c;
    small_model(&c);
    moe_backend *b;
    ck_assert_msg(moe_backend_create(backend, &(moe_backend_options){.threads = 2, .dtype = dtype}, &b) == MOE_OK,
                  "%s", moe_last_error());
    moe_model *m;
    const int64_t B = 4, S = 32;
    ck_assert_msg(moe_model_create(&c, b, NULL, B, S, &m) == MOE_OK, "%s", moe_last_error());
    if (!init_after)
        ck_assert_int_eq(moe_model_init(m, 5), MOE_OK);
    moe_optim_config oc;
    moe_optim_config_default(&oc);
    oc.lr = 3e-3;
    oc.warmup_steps = 2;
    oc.total_steps = STEPS;
    moe_optim *o;
    ck_assert_int_eq(moe_optim_create(m, &oc, &o), MOE_OK);
    if (init_after)
        ck_assert_int_eq(moe_model_init(m, 5), MOE_OK);
    int32_t in[128], tg[128];
    for (int step = 0; step < STEPS; step++) {
        moe_model_zero_grad(m);
        double tot = 0;
        for (int micro = 0; micro < 2; micro++) {
            for (int i = 0; i < B * S; i++) { /* a learnable stream: each token predicts the next */
                in[i] = (int32_t)((i * 7 + step * 5 + micro * 3) % c.vocab_size);
                tg[i] = (int32_t)((in[i] * 3 + 1) % c.vocab_size);
            }
            moe_model_losses L;
            ck_assert_msg(moe_model_forward(m, in, tg, NULL, B, S, (moe_key){(uint64_t)step, (uint32_t)micro, 0}, 1,
                                            &L) == MOE_OK,
                          "%s", moe_last_error());
            ck_assert_msg(moe_model_backward(m) == MOE_OK, "%s", moe_last_error());
            tot += L.total / 2;
        }
        moe_optim_result r;
        ck_assert_msg(moe_optim_step(o, 0.5, &r) == MOE_OK, "%s", moe_last_error());
        losses[step] = tot;
    }
    if (params) {
        *n = moe_model_numel(m);
        *params = tu_alloc(*n);
        int64_t at = 0;
        for (int i = 0; i < moe_model_n_params(m); i++) {
            moe_tensor w;
            ck_assert_int_eq(moe_optim_tensors(o, i, &w, NULL, NULL), MOE_OK);
            ck_assert_int_eq(moe_download_f64(b, *params + at, w, moe_model_param(m, i)->numel), MOE_OK);
            at += moe_model_param(m, i)->numel;
        }
    }
    moe_optim_free(o);
    moe_model_free(m);
    moe_backend_free(b);
}

static void train(const char *backend, const char *dtype, double *losses, double **params, int64_t *n)
{
    train_order(backend, dtype, losses, params, n, 0);
}

START_TEST(test_train_vs_cpu_ref)
{
    double lg[STEPS], lc[STEPS], lr[STEPS], lb[STEPS];
    train("cuda", "fp32", lg, NULL, NULL);
    train("cpu", NULL, lc, NULL, NULL);
    train("ref", NULL, lr, NULL, NULL);
    train("cuda", "bf16", lb, NULL, NULL);
    for (int s = 0; s < STEPS; s++) {
        printf("step %2d  loss: ref %.8f  cpu %.8f  cuda fp32 %.8f (rel %.1e)  cuda bf16 %.6f (rel %.1e)\n", s + 1,
               lr[s], lc[s], lg[s], fabs(lg[s] - lr[s]) / lr[s], lb[s], fabs(lb[s] - lr[s]) / lr[s]);
        ck_assert_msg(fabs(lg[s] - lr[s]) <= 1e-4 * fabs(lr[s]), "step %d: cuda fp32 %.10g vs ref %.10g", s + 1,
                      lg[s], lr[s]);
        ck_assert_msg(fabs(lg[s] - lc[s]) <= 1e-4 * fabs(lc[s]), "step %d: cuda fp32 %.10g vs cpu %.10g", s + 1,
                      lg[s], lc[s]);
        ck_assert_msg(fabs(lb[s] - lr[s]) <= 2e-2 * fabs(lr[s]), "step %d: cuda bf16 %.10g vs ref %.10g", s + 1,
                      lb[s], lr[s]);
    }
}
END_TEST

/* ---- determinism -------------------------------------------------------------------------------- */

static void same_bits(const char *what, const double *a, const double *b, int64_t n)
{
    for (int64_t i = 0; i < n; i++)
        ck_assert_msg(memcmp(&a[i], &b[i], sizeof a[i]) == 0, "%s[%lld]: %.17g then %.17g", what, (long long)i, a[i],
                      b[i]);
}

START_TEST(test_train_bits)
{
    const char *dtype = _i ? "bf16" : "fp32";
    double l1[STEPS], l2[STEPS], *p1, *p2;
    int64_t n1, n2;
    train("cuda", dtype, l1, &p1, &n1);
    train("cuda", dtype, l2, &p2, &n2);
    ck_assert_int_eq(n1, n2);
    same_bits("losses", l1, l2, STEPS);
    same_bits("weights", p1, p2, n1);
    free(p1);
    free(p2);
}
END_TEST

static const moe_router_kind routers[] = {MOE_ROUTER_TOPK, MOE_ROUTER_NOISY_TOPK, MOE_ROUTER_EXPERT_CHOICE,
                                          MOE_ROUTER_HASH, MOE_ROUTER_SINKHORN};

/* y, dx, every gradient and the stats of one forward/backward */
static double *layer_run(const moe_layer_config *c, const char *dtype, int64_t T, int64_t *n)
{
    const int64_t d = c->d_model;
    moe_backend *b = cuda(dtype);
    moe_layer *L;
    ck_assert_msg(moe_layer_create(c, b, T, NULL, &L) == MOE_OK, "%s", moe_last_error());
    ck_assert_int_eq(moe_layer_init(L, 1.0), MOE_OK);
    const moe_arena *P = moe_layer_params(L);
    *n = 2 * T * d + P->numel + MOE_LAYER_NSTATS(c->n_experts);
    double *out = tu_alloc(*n), *h = tu_alloc(T * d);
    moe_buf *io;
    ck_assert_int_eq(b->alloc(b, b->float_type, 4 * T * d, &io), MOE_OK);
    moe_tensor x = {io, 0}, y = {io, T * d}, dy = {io, 2 * T * d}, dx = {io, 3 * T * d};
    tu_randn(h, T * d, 1.0, 11);
    moe_upload_f64(b, x, h, T * d);
    tu_randn(h, T * d, 1.0, 12);
    moe_upload_f64(b, dy, h, T * d);
    moe_layer_zero_grad(L);
    ck_assert_int_eq(moe_layer_forward(L, y, x, NULL, NULL, T, MOE_KEY_STEP(2), 1), MOE_OK);
    ck_assert_int_eq(moe_layer_backward(L, dx, dy), MOE_OK);
    ck_assert_msg(moe_download_f64(b, out, y, T * d) == MOE_OK, "%s", moe_last_error());
    ck_assert_int_eq(moe_download_f64(b, out + T * d, dx, T * d), MOE_OK);
    for (int i = 0; i < P->n; i++)
        ck_assert_int_eq(moe_layer_get_grad(L, P->views[i].name, out + 2 * T * d + P->views[i].offset), MOE_OK);
    ck_assert_int_eq(moe_download_f64(b, out + 2 * T * d + P->numel, moe_layer_stats(L),
                                      MOE_LAYER_NSTATS(c->n_experts)),
                     MOE_OK);
    free(h);
    b->free(b, io);
    moe_layer_free(L);
    moe_backend_free(b);
    return out;
}

START_TEST(test_layer_bits)
{
    const moe_router_kind r = routers[_i / 2];
    const char *dtype = _i % 2 ? "bf16" : "fp32";
    moe_layer_config c;
    moe_layer_config_default(&c);
    c.d_model = 64;
    c.d_ff = 136;
    c.n_experts = 8;
    c.top_k = r == MOE_ROUTER_HASH ? 1 : 2;
    c.router = r;
    c.capacity_factor = r == MOE_ROUTER_EXPERT_CHOICE ? 1.25 : 0;
    c.act = MOE_ACT_SWIGLU;
    c.lb_coef = r == MOE_ROUTER_HASH ? 0 : 0.01;
    c.z_coef = r == MOE_ROUTER_HASH ? 0 : 0.001;
    c.load_coef = r == MOE_ROUTER_NOISY_TOPK ? 0.02 : 0;
    c.jitter_eps = r == MOE_ROUTER_TOPK ? 0.01 : 0;
    c.n_shared = 1;
    c.residual = r == MOE_ROUTER_TOPK;
    const int64_t T = 1021;
    int64_t n1, n2;
    double *a = layer_run(&c, dtype, T, &n1), *b = layer_run(&c, dtype, T, &n2);
    ck_assert_int_eq(n1, n2);
    same_bits(moe_router_name(r), a, b, n1);
    free(a);
    free(b);
}
END_TEST

/* bf16 parameters with fp32 master weights: the weights set after the optimizer was made
 * (cmoe train initialises after creating it) are the ones stepped, not the zeros the
 * optimizer copied when it was made */
START_TEST(test_master_weights_order)
{
    double l1[STEPS], l2[STEPS], *p1, *p2;
    int64_t n1, n2;
    train_order("cuda", "bf16", l1, &p1, &n1, 0);
    train_order("cuda", "bf16", l2, &p2, &n2, 1);
    ck_assert_int_eq(n1, n2);
    same_bits("losses", l1, l2, STEPS);
    same_bits("weights", p1, p2, n1);
    free(p1);
    free(p2);
}
END_TEST

/* ---- bad requests ---------------------------------------------------------------------------- */

START_TEST(test_bad_input)
{
    moe_backend *b = NULL;
    ck_assert_int_eq(moe_backend_create("cuda", &(moe_backend_options){.dtype = "fp16"}, &b), MOE_ERR_ARG);
    ck_assert_ptr_null(b);
    ck_assert_ptr_nonnull(strstr(moe_last_error(), "fp16"));
    b = cuda("bf16");
    ck_assert_int_eq(b->float_type, MOE_BF16);
    moe_buf *buf = NULL;
    ck_assert_int_eq(b->alloc(b, MOE_F64, 4, &buf), MOE_ERR_ARG);
    /* far more than the device has: an error naming the size and what to lower */
    ck_assert_int_eq(b->alloc(b, MOE_F32, (int64_t)1 << 39, &buf), MOE_ERR_NOMEM);
    ck_assert_ptr_nonnull(strstr(moe_last_error(), "MiB"));
    ck_assert_ptr_nonnull(strstr(moe_last_error(), "lower"));
    ck_assert_ptr_null(buf);
    /* the backend still works afterwards, and a sticky error names its op */
    ck_assert_int_eq(b->alloc(b, MOE_F32, 16, &buf), MOE_OK);
    double h[16] = {1, 2, 3};
    ck_assert_int_eq(moe_upload_f64(b, (moe_tensor){buf, 0}, h, 16), MOE_OK);
    ck_assert_int_eq(moe_upload_f64(b, (moe_tensor){buf, 8}, h, 16), MOE_ERR_ARG); /* past the end */
    b->set_stream(b, 7);
    ck_assert_int_eq(b->sync(b), MOE_ERR_ARG);
    ck_assert_ptr_nonnull(strstr(moe_last_error(), "set_stream"));
    ck_assert_int_eq(b->sync(b), MOE_OK);
    ck_assert_int_eq(moe_download_f64(b, h, (moe_tensor){buf, 0}, 16), MOE_OK);
    ck_assert(h[0] == 1 && h[2] == 3);
    b->free(b, buf);
    moe_backend_free(b);
}
END_TEST

int main(void)
{
    moe_backend *probe = NULL;
    if (moe_backend_create("cuda", NULL, &probe) != MOE_OK) {
        printf("test_cuda: skipped: %s\n", moe_last_error());
        return 77; /* no cuda backend in this build, or no device answers */
    }
    moe_backend_free(probe);
    Suite *s = suite_create("cuda");
    TCase *tc = tcase_create("cuda");
    tcase_set_timeout(tc, 900);
    tcase_add_test(tc, test_bad_input);
    tcase_add_test(tc, test_ops_fp32);
    tcase_add_test(tc, test_ops_bf16);
    tcase_add_test(tc, test_train_vs_cpu_ref);
    tcase_add_loop_test(tc, test_train_bits, 0, 2);
    tcase_add_test(tc, test_master_weights_order);
    tcase_add_loop_test(tc, test_layer_bits, 0, 2 * (int)(sizeof routers / sizeof routers[0]));
    suite_add_tcase(s, tc);
    /* no fork: a CUDA context does not survive into a forked child (the probe made one) */
    SRunner *sr = srunner_create(s);
    srunner_set_fork_status(sr, CK_NOFORK);
    srunner_run_all(sr, CK_NORMAL);
    const int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed ? EXIT_FAILURE : EXIT_SUCCESS;
}
