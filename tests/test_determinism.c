/*
 * Bit-identical results at any thread count (cpu backend): every reduction runs over
 * fixed blocks in a fixed order and every GEMM is cut into blocks fixed by its shape, so
 * 1, 2, 3, 4 and 8 threads (oversubscribed here) give the same bits — for the MoE layer
 * under each router, and for a model trained a few steps with gradient accumulation.
 */
#include "layer/moe_layer.h"
#include "model/model.h"
#include "testutil.h"

static const int threads[] = {1, 2, 3, 4, 8};
#define NTHREADS (int)(sizeof threads / sizeof threads[0])

static void same_bits(const char *what, const double *a, const double *b, int64_t n, int nt)
{
    for (int64_t i = 0; i < n; i++)
        ck_assert_msg(memcmp(&a[i], &b[i], sizeof a[i]) == 0, "%d threads: %s[%lld] = %.17g, 1 thread: %.17g", nt,
                      what, (long long)i, a[i], b[i]);
}

/* y, dx, then every gradient of the layer after one forward/backward */
static double *layer_run(const moe_layer_config *c, int nt, int64_t T, int64_t *n)
{
    const int64_t d = c->d_model;
    moe_backend *b;
    ck_assert_int_eq(moe_backend_create("cpu", &(moe_backend_options){.threads = nt}, &b), MOE_OK);
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

static const moe_router_kind routers[] = {MOE_ROUTER_TOPK, MOE_ROUTER_NOISY_TOPK, MOE_ROUTER_EXPERT_CHOICE,
                                          MOE_ROUTER_HASH, MOE_ROUTER_SINKHORN};

START_TEST(test_layer_threads)
{
    moe_layer_config c;
    moe_layer_config_default(&c);
    c.d_model = 72;
    c.d_ff = 136;
    c.n_experts = 4;
    c.top_k = routers[_i] == MOE_ROUTER_HASH ? 1 : 2;
    c.router = routers[_i];
    c.capacity_factor = routers[_i] == MOE_ROUTER_EXPERT_CHOICE ? 1.25 : 0;
    c.act = MOE_ACT_SWIGLU;
    c.lb_coef = c.router == MOE_ROUTER_HASH ? 0 : 0.01;
    c.z_coef = c.router == MOE_ROUTER_HASH ? 0 : 0.001;
    c.load_coef = c.router == MOE_ROUTER_NOISY_TOPK ? 0.02 : 0;
    c.jitter_eps = c.router == MOE_ROUTER_TOPK ? 0.01 : 0;
    c.n_shared = 1;
    c.residual = c.router == MOE_ROUTER_TOPK;
    const int64_t T = 1543; /* several row blocks (MOE_ROW_BLOCK) per expert, partial ones at the ends */
    int64_t n;
    double *ref = layer_run(&c, 1, T, &n);
    for (int i = 1; i < NTHREADS; i++) {
        int64_t n2;
        double *r = layer_run(&c, threads[i], T, &n2);
        same_bits(moe_router_name(c.router), r, ref, n, threads[i]);
        free(r);
    }
    free(ref);
}
END_TEST

/* losses of 3 steps (2 micro-batches each) and the final parameters */
static double *train(int nt, int64_t *n)
{
    moe_model_config c;
    moe_model_config_tiny(&c);
    c.hidden_size = 48;
    c.head_dim = 12;
    c.intermediate_size = 80;
    c.moe_intermediate_size = 72;
    c.moe.jitter_eps = 0.01;
    moe_backend *b;
    ck_assert_int_eq(moe_backend_create("cpu", &(moe_backend_options){.threads = nt}, &b), MOE_OK);
    moe_model *m;
    const int64_t B = 4, S = 40;
    ck_assert_msg(moe_model_create(&c, b, NULL, B, S, &m) == MOE_OK, "%s", moe_last_error());
    ck_assert_int_eq(moe_model_init(m, 9), MOE_OK);
    moe_optim_config oc;
    moe_optim_config_default(&oc);
    moe_optim *o;
    ck_assert_int_eq(moe_optim_create(m, &oc, &o), MOE_OK);
    *n = 3 + moe_model_numel(m);
    double *out = tu_alloc(*n);
    int32_t in[160], tg[160];
    for (int step = 0; step < 3; step++) {
        moe_model_zero_grad(m);
        for (int micro = 0; micro < 2; micro++) {
            for (int i = 0; i < B * S; i++) {
                in[i] = (int32_t)((i * 7 + step * 5 + micro * 3) % c.vocab_size);
                tg[i] = (int32_t)((i * 11 + step) % c.vocab_size);
            }
            ck_assert_int_eq(moe_model_forward(m, in, tg, NULL, B, S, (moe_key){(uint64_t)step, (uint32_t)micro, 0},
                                               1, NULL),
                             MOE_OK);
            ck_assert_int_eq(moe_model_backward(m), MOE_OK);
        }
        moe_optim_result r;
        ck_assert_msg(moe_optim_step(o, 0.5, &r) == MOE_OK, "%s", moe_last_error());
        moe_model_stats st;
        ck_assert_int_eq(moe_model_get_stats(m, MOE_SPAN_STEP, &st), MOE_OK);
        out[step] = st.ce + st.aux_total + r.grad_norm;
    }
    int64_t at = 3;
    for (int i = 0; i < moe_model_n_params(m); i++) {
        ck_assert_int_eq(moe_model_get_param(m, i, out + at), MOE_OK);
        at += moe_model_param(m, i)->numel;
    }
    moe_optim_free(o);
    moe_model_free(m);
    moe_backend_free(b);
    return out;
}

START_TEST(test_training_threads)
{
    int64_t n;
    double *ref = train(1, &n);
    for (int i = 1; i < NTHREADS; i++) {
        int64_t n2;
        double *r = train(threads[i], &n2);
        same_bits("losses, then parameters", r, ref, n, threads[i]);
        free(r);
    }
    free(ref);
}
END_TEST

int main(void)
{
    Suite *s = suite_create("determinism");
    TCase *tc = tcase_create("threads");
    tcase_set_timeout(tc, 120);
    tcase_add_loop_test(tc, test_layer_threads, 0, (int)(sizeof routers / sizeof routers[0]));
    tcase_add_test(tc, test_training_threads);
    suite_add_tcase(s, tc);
    return tu_run(s);
}
