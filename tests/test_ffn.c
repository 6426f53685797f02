/* The experts: activations, one FFN, the grouped experts; values and finite-difference gradients. */
#include "testutil.h"
#include "ref/ref.h"
#ifdef _OPENMP
#include <omp.h>
#endif

static const moe_activation ACTS[] = {MOE_ACT_RELU, MOE_ACT_GELU, MOE_ACT_GELU_TANH, MOE_ACT_GEGLU, MOE_ACT_SWIGLU};
#define N_ACTS 5

/* Check forks a process per test, so each FD test keeps and prints its own counters. */
static tu_fd_stats g_stats;

/* ---- activations ------------------------------------------------------------ */

START_TEST(test_act_values)
{
    /* Reference values from Python's math.erf / math.tanh / math.exp. */
    static const struct { double x, gelu, gelu_tanh, silu; } v[] = {
        {1.0, 0.8413447460685429, 0.8411919906082768, 0.7310585786300049},
        {-1.0, -0.15865525393145707, -0.15880800939172324, -0.2689414213699951},
        {2.5, 2.4844758366855597, 2.484915733910001, 2.3103545499468914},
        {-0.5, -0.15426876936299344, -0.15428599017485606, -0.1887703343990727},
    };
    for (size_t i = 0; i < sizeof v / sizeof v[0]; i++) {
        double x = v[i].x;
        ck_assert_double_eq_tol(moe_ref_act(MOE_ACT_GELU, x), v[i].gelu, 1e-15);
        ck_assert_double_eq_tol(moe_ref_act(MOE_ACT_GEGLU, x), v[i].gelu, 1e-15);
        ck_assert_double_eq_tol(moe_ref_act(MOE_ACT_GELU_TANH, x), v[i].gelu_tanh, 1e-15);
        ck_assert_double_eq_tol(moe_ref_act(MOE_ACT_SWIGLU, x), v[i].silu, 1e-15);
        ck_assert_double_eq(moe_ref_act(MOE_ACT_RELU, x), x > 0 ? x : 0);
    }
    for (int a = 0; a < N_ACTS; a++)
        ck_assert_double_eq(moe_ref_act(ACTS[a], 0.0), 0.0);
    /* Far tails stay finite: no overflow in exp. */
    ck_assert(isfinite(moe_ref_act(MOE_ACT_SWIGLU, -800.0)));
    ck_assert(isfinite(moe_ref_act_grad(MOE_ACT_SWIGLU, -800.0)));
    ck_assert_double_eq_tol(moe_ref_act(MOE_ACT_SWIGLU, 800.0), 800.0, 1e-12);
    ck_assert_double_eq(moe_ref_act_grad(MOE_ACT_RELU, -1.0), 0.0);
    ck_assert_double_eq(moe_ref_act_grad(MOE_ACT_RELU, 3.0), 1.0);
    ck_assert(moe_act_is_glu(MOE_ACT_GEGLU) && moe_act_is_glu(MOE_ACT_SWIGLU));
    ck_assert(!moe_act_is_glu(MOE_ACT_RELU) && !moe_act_is_glu(MOE_ACT_GELU) && !moe_act_is_glu(MOE_ACT_GELU_TANH));
}
END_TEST

START_TEST(test_act_grad_fd)
{
    const double h = 1e-5;
    double worst = 0;
    for (int a = 0; a < N_ACTS; a++)
        for (double x = -4.05; x < 4.0; x += 0.1) { /* never exactly at ReLU's kink */
            double fd = (moe_ref_act(ACTS[a], x + h) - moe_ref_act(ACTS[a], x - h)) / (2 * h);
            double g = moe_ref_act_grad(ACTS[a], x);
            double err = fabs(fd - g) / fmax(1e-3, fabs(g));
            if (err > worst)
                worst = err;
            ck_assert_msg(err <= 1e-7, "%s'(%g): analytic %.12g, fd %.12g", moe_activation_name(ACTS[a]), x, g, fd);
        }
    printf("fd: activation derivatives worst rel err %.2e\n", worst);
}
END_TEST

/* ---- one FFN ---------------------------------------------------------------- */

START_TEST(test_ffn_by_hand)
{
    /* n = 1, d = 2, f = 2, ReLU: h1 = [1, -2] -> a = [1, 0] -> out = first row of w2. */
    const double x[2] = {1, 2}, w1[4] = {1, 0, 0, -1}, w2[4] = {1, 2, 3, 4};
    double out[2], h1[2], a[2];
    tu_nan_fill(out, 2);
    moe_ref_ffn_forward(out, h1, NULL, a, x, w1, NULL, w2, MOE_ACT_RELU, 1, 2, 2);
    ck_assert_double_eq(h1[0], 1);
    ck_assert_double_eq(h1[1], -2);
    ck_assert_double_eq(a[0], 1);
    ck_assert_double_eq(a[1], 0);
    ck_assert_double_eq(out[0], 1);
    ck_assert_double_eq(out[1], 2);
    /* SwiGLU with w3 = I: a = silu(h1) ⊙ x. */
    const double w3[4] = {1, 0, 0, 1};
    double h3[2];
    moe_ref_ffn_forward(out, h1, h3, a, x, w1, w3, w2, MOE_ACT_SWIGLU, 1, 2, 2);
    double a0 = 1.0 / (1.0 + exp(-1.0)) * 1.0, a1 = -2.0 / (1.0 + exp(2.0)) * 2.0;
    ck_assert_double_eq_tol(out[0], a0 * 1 + a1 * 3, 1e-15);
    ck_assert_double_eq_tol(out[1], a0 * 2 + a1 * 4, 1e-15);
}
END_TEST

/* A direct triple loop, independent of the matmul helpers. */
static void ffn_naive(double *out, const double *x, const double *w1, const double *w3, const double *w2,
                      moe_activation act, int64_t n, int64_t d, int64_t f)
{
    for (int64_t t = 0; t < n; t++)
        for (int64_t k = 0; k < d; k++) {
            double acc = 0;
            for (int64_t j = 0; j < f; j++) {
                double p1 = 0, p3 = 0;
                for (int64_t i = 0; i < d; i++) {
                    p1 += x[t * d + i] * w1[i * f + j];
                    if (w3)
                        p3 += x[t * d + i] * w3[i * f + j];
                }
                double av = moe_ref_act(act, p1) * (w3 ? p3 : 1.0);
                acc += av * w2[j * d + k];
            }
            out[t * d + k] = acc;
        }
}

START_TEST(test_ffn_matches_naive)
{
    const int64_t n = 5, d = 4, f = 3;
    double x[20], w1[12], w3[12], w2[12], out[20], ref[20], h1[15], h3[15], a[15];
    tu_randn(x, n * d, 1, 1);
    tu_randn(w1, d * f, 0.7, 2);
    tu_randn(w3, d * f, 0.7, 3);
    tu_randn(w2, f * d, 0.7, 4);
    for (int ai = 0; ai < N_ACTS; ai++) {
        moe_activation act = ACTS[ai];
        const double *w3p = moe_act_is_glu(act) ? w3 : NULL;
        tu_nan_fill(out, n * d);
        moe_ref_ffn_forward(out, h1, h3, a, x, w1, w3p, w2, act, n, d, f);
        ffn_naive(ref, x, w1, w3p, w2, act, n, d, f);
        ck_assert_msg(tu_rel_err(out, ref, n * d) <= 1e-14, "%s: rel err %g", moe_activation_name(act),
                      tu_rel_err(out, ref, n * d));
    }
}
END_TEST

/* ---- FD gradients of one FFN and of the grouped experts ------------------- */

typedef struct {
    int64_t n, d, f, E;
    const int64_t *offsets; /* NULL: a single FFN */
    moe_activation act;
    double *x, *w1, *w3, *w2, *dout;
    double *out, *h1, *h3, *a;
    double *h1_base; /* pre-activations of the unperturbed point, to spot ReLU kinks */
} ffn_ctx;

static void ctx_forward(ffn_ctx *c)
{
    const double *w3 = moe_act_is_glu(c->act) ? c->w3 : NULL;
    if (c->offsets)
        moe_ref_experts_forward(c->out, c->h1, c->h3, c->a, c->x, c->w1, w3, c->w2, c->offsets, c->act, c->E, c->d,
                                c->f);
    else
        moe_ref_ffn_forward(c->out, c->h1, c->h3, c->a, c->x, c->w1, w3, c->w2, c->act, c->n, c->d, c->f);
}

static double ffn_loss(void *vc, int *ok)
{
    ffn_ctx *c = vc;
    ctx_forward(c);
    double l = 0;
    for (int64_t i = 0; i < c->n * c->d; i++)
        l += c->dout[i] * c->out[i];
    if (c->act == MOE_ACT_RELU)
        for (int64_t i = 0; i < c->n * c->f; i++)
            if ((c->h1[i] > 0) != (c->h1_base[i] > 0))
                *ok = 0;
    return l;
}

static void check_ffn_grads(int64_t E, const int64_t *offsets, int64_t n, moe_activation act, uint64_t seed)
{
    const int64_t d = 4, f = 3;
    int glu = moe_act_is_glu(act);
    ffn_ctx c = {.n = n, .d = d, .f = f, .E = E, .offsets = offsets, .act = act};
    c.x = tu_alloc(n * d);
    c.w1 = tu_alloc(E * d * f);
    c.w3 = tu_alloc(E * d * f);
    c.w2 = tu_alloc(E * f * d);
    c.dout = tu_alloc(n * d);
    c.out = tu_alloc(n * d);
    c.h1 = tu_alloc(n * f);
    c.h3 = tu_alloc(n * f);
    c.a = tu_alloc(n * f);
    c.h1_base = tu_alloc(n * f);
    tu_randn(c.x, n * d, 1, seed);
    tu_randn(c.w1, E * d * f, 0.6, seed + 1);
    tu_randn(c.w3, E * d * f, 0.6, seed + 2);
    tu_randn(c.w2, E * f * d, 0.6, seed + 3);
    tu_randn(c.dout, n * d, 1, seed + 4);
    double *dx = tu_alloc(n * d), *dw1 = tu_alloc(E * d * f), *dw3 = tu_alloc(E * d * f), *dw2 = tu_alloc(E * f * d);
    ctx_forward(&c);
    memcpy(c.h1_base, c.h1, (size_t)(n * f) * sizeof(double));
    /* Backward accumulates: start from 1 and subtract it afterwards, so a '=' instead of '+=' fails. */
    for (int64_t i = 0; i < n * d; i++)
        dx[i] = 1;
    for (int64_t i = 0; i < E * d * f; i++)
        dw1[i] = dw3[i] = dw2[i] = 1;
    const double *w3 = glu ? c.w3 : NULL;
    if (offsets)
        moe_ref_experts_backward(dx, dw1, glu ? dw3 : NULL, dw2, c.dout, c.h1, c.h3, c.a, c.x, c.w1, w3, c.w2,
                                 offsets, act, E, d, f);
    else
        moe_ref_ffn_backward(dx, dw1, glu ? dw3 : NULL, dw2, c.dout, c.h1, c.h3, c.a, c.x, c.w1, w3, c.w2, act, n, d,
                             f);
    for (int64_t i = 0; i < n * d; i++)
        dx[i] -= 1;
    for (int64_t i = 0; i < E * d * f; i++) {
        dw1[i] -= 1;
        dw3[i] -= 1;
        dw2[i] -= 1;
    }
    struct { const char *name; double *p, *g; int64_t n; } t[] = {
        {"dx", c.x, dx, n * d}, {"dw1", c.w1, dw1, E * d * f}, {"dw2", c.w2, dw2, E * f * d}, {"dw3", c.w3, dw3, E * d * f}};
    for (int i = 0; i < (glu ? 4 : 3); i++) {
        double err = tu_fd_check(t[i].p, t[i].n, t[i].g, ffn_loss, &c, 1e-5, &g_stats);
        ck_assert_msg(err <= 1e-6, "%s %s %s: fd rel err %.3e", offsets ? "experts" : "ffn", moe_activation_name(act),
                      t[i].name, err);
    }
    if (!glu) /* dw3 is untouched without a GLU */
        for (int64_t i = 0; i < E * d * f; i++)
            ck_assert_double_eq(dw3[i], 0);
    free(c.x); free(c.w1); free(c.w3); free(c.w2); free(c.dout); free(c.out); free(c.h1); free(c.h3); free(c.a);
    free(c.h1_base); free(dx); free(dw1); free(dw3); free(dw2);
}

static void report(const char *what)
{
    printf("fd: %s worst rel err %.2e, checked %lld, skipped %lld (ReLU kinks)\n", what, g_stats.worst,
           (long long)g_stats.checked, (long long)g_stats.skipped);
    ck_assert(g_stats.checked > 0);
}

START_TEST(test_ffn_backward_fd)
{
    memset(&g_stats, 0, sizeof g_stats);
    for (int a = 0; a < N_ACTS; a++)
        check_ffn_grads(1, NULL, 6, ACTS[a], 100 + 10 * (uint64_t)a);
    report("ffn");
}
END_TEST

START_TEST(test_experts_backward_fd)
{
    /* Four experts over 9 rows, one of them empty. */
    static const int64_t offsets[5] = {0, 3, 3, 7, 9};
    memset(&g_stats, 0, sizeof g_stats);
    for (int a = 0; a < N_ACTS; a++)
        check_ffn_grads(4, offsets, 9, ACTS[a], 200 + 10 * (uint64_t)a);
    report("experts");
}
END_TEST

START_TEST(test_experts_match_per_expert_ffn)
{
    /* The grouped op is exactly one FFN per expert on its rows. */
    static const int64_t offsets[4] = {0, 2, 5, 5};
    const int64_t E = 3, n = 5, d = 4, f = 3;
    double xe[20], w1[36], w3[36], w2[36], ye[20], ref[20], h1[15], h3[15], a[15];
    tu_randn(xe, n * d, 1, 7);
    tu_randn(w1, E * d * f, 1, 8);
    tu_randn(w3, E * d * f, 1, 9);
    tu_randn(w2, E * f * d, 1, 10);
    tu_nan_fill(ye, n * d);
    moe_ref_experts_forward(ye, h1, h3, a, xe, w1, w3, w2, offsets, MOE_ACT_GEGLU, E, d, f);
    for (int64_t e = 0; e < E; e++)
        ffn_naive(ref + offsets[e] * d, xe + offsets[e] * d, w1 + e * d * f, w3 + e * d * f, w2 + e * f * d,
                  MOE_ACT_GEGLU, offsets[e + 1] - offsets[e], d, f);
    ck_assert(tu_rel_err(ye, ref, n * d) <= 1e-14);
}
END_TEST

int main(void)
{
#ifdef _OPENMP
    omp_set_num_threads(1); /* tiny tensors: threads only add overhead */
#endif
    Suite *s = suite_create("ffn");
    TCase *tc = tcase_create("ffn");
    tcase_set_timeout(tc, 60);
    tcase_add_test(tc, test_act_values);
    tcase_add_test(tc, test_act_grad_fd);
    tcase_add_test(tc, test_ffn_by_hand);
    tcase_add_test(tc, test_ffn_matches_naive);
    tcase_add_test(tc, test_experts_match_per_expert_ffn);
    suite_add_tcase(s, tc);
    TCase *fd = tcase_create("fd");
    tcase_set_timeout(fd, 60);
    tcase_add_test(fd, test_ffn_backward_fd);
    tcase_add_test(fd, test_experts_backward_fd);
    suite_add_tcase(s, fd);
    return tu_run(s);
}
