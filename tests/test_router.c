/* The reference router: jitter, softmax/sigmoid scores, noisy gating, noisy load. */
#include "testutil.h"

#include "ref/ref.h"

#define FD_H 1e-5
#define FD_TOL 1e-6

/* Suite totals; the suite runs without fork so they survive the tests. */
static tu_fd_stats fd_all;

static void fd_report(const char *what, const tu_fd_stats *st)
{
    printf("fd: router %-22s worst rel err %.2e, checked %lld, skipped %lld\n", what, st->worst,
           (long long)st->checked, (long long)st->skipped);
    if (st->worst > fd_all.worst)
        fd_all.worst = st->worst;
    fd_all.checked += st->checked;
    fd_all.skipped += st->skipped;
}

static double dot(const double *a, const double *b, int64_t n)
{
    double acc = 0;
    for (int64_t i = 0; i < n; i++)
        acc += a[i] * b[i];
    return acc;
}

/* ---- forward values ----------------------------------------------------- */

START_TEST(softmax_values)
{
    const double z[6] = {0, log(2.0), log(3.0), 1000, 1000 + log(2.0), 1000 + log(3.0)};
    double s[6];
    moe_ref_softmax_forward(s, z, 2, 3);
    for (int r = 0; r < 2; r++) /* the second row would overflow without the max shift */
        for (int e = 0; e < 3; e++)
            ck_assert_double_eq_tol(s[r * 3 + e], (e + 1) / 6.0, 1e-12); /* 1000 + log 2 rounds */
}
END_TEST

START_TEST(sigmoid_values)
{
    const double z[5] = {0, log(3.0), -log(3.0), 800, -800};
    double s[5];
    moe_ref_sigmoid_forward(s, z, 5);
    ck_assert_double_eq_tol(s[0], 0.5, 1e-15);
    ck_assert_double_eq_tol(s[1], 0.75, 1e-15);
    ck_assert_double_eq_tol(s[2], 0.25, 1e-15);
    ck_assert_double_eq(s[3], 1.0);
    ck_assert(s[4] >= 0 && s[4] < 1e-300 && !isnan(s[4]));
}
END_TEST

START_TEST(jitter_values)
{
    enum { T = 5, D = 7 };
    double x[T * D], xr[T * D], u[T * D], xr2[T * D], u2[T * D];
    tu_randn(x, T * D, 1.0, 1);
    /* eps = 0 is the identity */
    moe_ref_jitter_forward(xr, u, x, 0.0, 9, 2, MOE_KEY_STEP(3), T, D);
    for (int i = 0; i < T * D; i++) {
        ck_assert_double_eq(u[i], 1.0);
        ck_assert_double_eq(xr[i], x[i]);
    }
    /* the documented draw, reproducible, and a new one at the next step */
    const double eps = 0.1;
    moe_ref_jitter_forward(xr, u, x, eps, 9, 2, MOE_KEY_STEP(3), T, D);
    for (int t = 0; t < T; t++)
        for (int i = 0; i < D; i++) {
            double r = moe_rand_uniform(9, MOE_RNG_JITTER | (2 << 8), 3, (uint32_t)t, (uint32_t)i);
            ck_assert_double_eq(u[t * D + i], 1 - eps + 2 * eps * r);
            ck_assert(u[t * D + i] > 1 - eps && u[t * D + i] < 1 + eps);
            ck_assert_double_eq(xr[t * D + i], x[t * D + i] * u[t * D + i]);
        }
    moe_ref_jitter_forward(xr2, u2, x, eps, 9, 2, MOE_KEY_STEP(3), T, D);
    ck_assert_mem_eq(u, u2, sizeof u);
    moe_ref_jitter_forward(xr2, u2, x, eps, 9, 2, MOE_KEY_STEP(4), T, D);
    ck_assert(tu_max_abs(u, u2, T * D) > 0);
}
END_TEST

/* Draws are keyed by global identity: the tokens of a batch split in two (as two ranks
 * hold them) see the draws of the whole batch; another micro-batch sees new draws. */
START_TEST(draws_by_global_identity)
{
    enum { T = 6, D = 5, E = 4 };
    double x[T * D], xr[T * D], u[T * D], u2[T * D];
    double z[T * E], zn[T * E], h[T * E], eps[T * E], eps2[T * E];
    tu_randn(x, T * D, 1.0, 3);
    tu_randn(z, T * E, 1.0, 4);
    tu_randn(zn, T * E, 1.0, 5);
    const moe_key whole = {7, 2, 40}, first = {7, 2, 40}, second = {7, 2, 43};
    moe_ref_jitter_forward(xr, u, x, 0.1, 9, 1, whole, T, D);
    moe_ref_jitter_forward(xr, u2, x, 0.1, 9, 1, first, 3, D);
    moe_ref_jitter_forward(xr, u2 + 3 * D, x + 3 * D, 0.1, 9, 1, second, 3, D);
    ck_assert_mem_eq(u, u2, sizeof u);
    moe_ref_noisy_logits_forward(h, eps, z, zn, 1, 9, 1, whole, T, E);
    moe_ref_noisy_logits_forward(h, eps2, z, zn, 1, 9, 1, first, 3, E);
    moe_ref_noisy_logits_forward(h, eps2 + 3 * E, z + 3 * E, zn + 3 * E, 1, 9, 1, second, 3, E);
    ck_assert_mem_eq(eps, eps2, sizeof eps);
    /* the next micro-batch of the same step draws anew */
    moe_ref_jitter_forward(xr, u2, x, 0.1, 9, 1, (moe_key){7, 3, 40}, T, D);
    ck_assert(tu_max_abs(u, u2, T * D) > 0);
    moe_ref_noisy_logits_forward(h, eps2, z, zn, 1, 9, 1, (moe_key){7, 3, 40}, T, E);
    ck_assert(tu_max_abs(eps, eps2, T * E) > 0);
}
END_TEST

START_TEST(noisy_logits_values)
{
    enum { T = 3, E = 4 };
    double z[T * E], zn[T * E], h[T * E], eps[T * E];
    tu_randn(z, T * E, 1.0, 2);
    for (int i = 0; i < T * E; i++)
        zn[i] = 0; /* softplus(0) = log 2 */
    moe_ref_noisy_logits_forward(h, eps, z, zn, 0, 5, 1, MOE_KEY_STEP(7), T, E);
    for (int i = 0; i < T * E; i++) {
        ck_assert_double_eq(h[i], z[i]);
        ck_assert_double_eq(eps[i], 0.0);
    }
    moe_ref_noisy_logits_forward(h, eps, z, zn, 1, 5, 1, MOE_KEY_STEP(7), T, E);
    for (int t = 0; t < T; t++)
        for (int e = 0; e < E; e++) {
            double n = moe_rand_normal(5, MOE_RNG_NOISE | (1 << 8), 7, (uint32_t)t, (uint32_t)e);
            ck_assert_double_eq(eps[t * E + e], n);
            ck_assert_double_eq_tol(h[t * E + e], z[t * E + e] + n * log(2.0), 1e-14);
        }
    /* softplus must not overflow for large inputs */
    zn[0] = 1000;
    moe_ref_noisy_logits_forward(h, eps, z, zn, 1, 5, 1, MOE_KEY_STEP(7), T, E);
    ck_assert_double_eq_tol(h[0], z[0] + eps[0] * 1000.0, 1e-9);
}
END_TEST

START_TEST(noisy_load_values)
{
    /* One token, E = 3, h = z = (2, 1, 0), softplus(zn) = 1. Top-1 is expert 0, so its
     * threshold is h1 = 1 and the others' is h0 = 2: Φ(1), Φ(-1), Φ(-2). */
    const double z[3] = {2, 1, 0}, zn1 = log(exp(1.0) - 1);
    const double zn[3] = {zn1, zn1, zn1};
    double load[3];
    moe_ref_noisy_load_forward(load, z, zn, z, 1, 1, 3);
    ck_assert_double_eq_tol(load[0], 0.8413447460685429, 1e-13);
    ck_assert_double_eq_tol(load[1], 0.15865525393145707, 1e-13);
    ck_assert_double_eq_tol(load[2], 0.022750131948179209, 1e-13);
    /* k = 2: experts 0 and 1 in the top 2, threshold h2 = 0 for them; expert 2's is h1 = 1 */
    moe_ref_noisy_load_forward(load, z, zn, z, 2, 1, 3);
    ck_assert_double_eq_tol(load[0], 0.9772498680518208, 1e-13);
    ck_assert_double_eq_tol(load[1], 0.8413447460685429, 1e-13);
    ck_assert_double_eq_tol(load[2], 0.15865525393145707, 1e-13);
    /* k = E: every expert is always selected */
    double z2[6] = {0.3, -1, 2, 0, 0, 0}, zn2[6] = {0}, load2[3];
    moe_ref_noisy_load_forward(load2, z2, zn2, z2, 3, 2, 3);
    for (int e = 0; e < 3; e++)
        ck_assert_double_eq(load2[e], 2.0);
}
END_TEST

/* ---- gradients ------------------------------------------------------------- */

typedef struct {
    int64_t T, E, n;
    double *z, *zn, *h, *w, *out, *eps;
    int64_t k;
    int which; /* 0 softmax, 1 sigmoid */
    int32_t *order0; /* noisy load: the top k+1 of each row of h, unperturbed */
} ctx_t;

static double loss_scores(void *vc, int *ok)
{
    ctx_t *c = vc;
    (void)ok;
    if (c->which == 0)
        moe_ref_softmax_forward(c->out, c->z, c->T, c->E);
    else
        moe_ref_sigmoid_forward(c->out, c->z, c->T * c->E);
    return dot(c->out, c->w, c->T * c->E);
}

START_TEST(scores_grad)
{
    for (int which = 0; which < 2; which++) {
        ctx_t c = {.T = 6, .E = 5, .which = which};
        int64_t n = c.T * c.E;
        c.z = tu_alloc(n);
        c.w = tu_alloc(n);
        c.out = tu_alloc(n);
        double *s = tu_alloc(n), *dz = tu_alloc(n);
        tu_randn(c.z, n, 2.0, 10 + which);
        tu_randn(c.w, n, 1.0, 20 + which);
        if (which == 0)
            moe_ref_softmax_forward(s, c.z, c.T, c.E);
        else
            moe_ref_sigmoid_forward(s, c.z, n);
        for (int64_t i = 0; i < n; i++)
            dz[i] = 0.5; /* backward accumulates: start from a known value */
        if (which == 0)
            moe_ref_softmax_backward(dz, c.w, s, c.T, c.E);
        else
            moe_ref_sigmoid_backward(dz, c.w, s, n);
        for (int64_t i = 0; i < n; i++)
            dz[i] -= 0.5;
        tu_fd_stats st = {0};
        double err = tu_fd_check(c.z, n, dz, loss_scores, &c, FD_H, &st);
        fd_report(which ? "sigmoid" : "softmax", &st);
        ck_assert_msg(err <= FD_TOL, "%s grad rel err %g", which ? "sigmoid" : "softmax", err);
        free(c.z), free(c.w), free(c.out), free(s), free(dz);
    }
}
END_TEST

static double loss_jitter(void *vc, int *ok)
{
    ctx_t *c = vc;
    (void)ok;
    moe_ref_jitter_forward(c->out, c->eps, c->z, 0.2, 3, 1, MOE_KEY_STEP(5), c->T, c->E);
    return dot(c->out, c->w, c->T * c->E);
}

START_TEST(jitter_grad)
{
    ctx_t c = {.T = 4, .E = 9};
    int64_t n = c.T * c.E;
    c.z = tu_alloc(n), c.w = tu_alloc(n), c.out = tu_alloc(n), c.eps = tu_alloc(n);
    double *dx = tu_alloc(n);
    tu_randn(c.z, n, 1.0, 30);
    tu_randn(c.w, n, 1.0, 31);
    moe_ref_jitter_forward(c.out, c.eps, c.z, 0.2, 3, 1, MOE_KEY_STEP(5), c.T, c.E);
    moe_ref_jitter_backward(dx, c.w, c.eps, c.T, c.E);
    tu_fd_stats st = {0};
    double err = tu_fd_check(c.z, n, dx, loss_jitter, &c, FD_H, &st);
    fd_report("jitter", &st);
    ck_assert_msg(err <= FD_TOL, "jitter grad rel err %g", err);
    free(c.z), free(c.w), free(c.out), free(c.eps), free(dx);
}
END_TEST

static double loss_noisy_logits(void *vc, int *ok)
{
    ctx_t *c = vc;
    (void)ok;
    moe_ref_noisy_logits_forward(c->out, c->eps, c->z, c->zn, 1, 3, 2, MOE_KEY_STEP(11), c->T, c->E);
    return dot(c->out, c->w, c->T * c->E);
}

START_TEST(noisy_logits_grad)
{
    ctx_t c = {.T = 5, .E = 6};
    int64_t n = c.T * c.E;
    c.z = tu_alloc(n), c.zn = tu_alloc(n), c.w = tu_alloc(n), c.out = tu_alloc(n), c.eps = tu_alloc(n);
    double *dz = tu_alloc(n), *dzn = tu_alloc(n);
    tu_randn(c.z, n, 1.0, 40);
    tu_randn(c.zn, n, 2.0, 41);
    tu_randn(c.w, n, 1.0, 42);
    moe_ref_noisy_logits_forward(c.out, c.eps, c.z, c.zn, 1, 3, 2, MOE_KEY_STEP(11), c.T, c.E);
    moe_ref_noisy_logits_backward(dz, dzn, c.w, c.eps, c.zn, c.T, c.E);
    tu_fd_stats st = {0};
    double e1 = tu_fd_check(c.z, n, dz, loss_noisy_logits, &c, FD_H, &st);
    double e2 = tu_fd_check(c.zn, n, dzn, loss_noisy_logits, &c, FD_H, &st);
    fd_report("noisy logits", &st);
    ck_assert_msg(e1 <= FD_TOL && e2 <= FD_TOL, "noisy logits grad rel err dz %g dzn %g", e1, e2);
    free(c.z), free(c.zn), free(c.w), free(c.out), free(c.eps), free(dz), free(dzn);
}
END_TEST

/* The top k+1 of each row (value descending, ties low index): the threshold identities. */
static void top_order(int32_t *o, const double *h, int64_t T, int64_t E, int64_t m)
{
    for (int64_t t = 0; t < T; t++)
        for (int64_t r = 0; r < m; r++) {
            int64_t best = -1;
            for (int64_t e = 0; e < E; e++) {
                int used = 0;
                for (int64_t q = 0; q < r; q++)
                    used |= o[t * m + q] == e;
                if (!used && (best < 0 || h[t * E + e] > h[t * E + best]))
                    best = e;
            }
            o[t * m + r] = (int32_t)best;
        }
}

static double loss_noisy_load(void *vc, int *ok)
{
    ctx_t *c = vc;
    int64_t m = c->k + 1 < c->E ? c->k + 1 : c->E;
    int32_t *o = malloc((size_t)(c->T * m) * sizeof *o);
    top_order(o, c->h, c->T, c->E, m);
    if (memcmp(o, c->order0, (size_t)(c->T * m) * sizeof *o) != 0)
        *ok = 0; /* a threshold changed identity: the estimator jumps there */
    free(o);
    moe_ref_noisy_load_forward(c->out, c->z, c->zn, c->h, c->k, c->T, c->E);
    return dot(c->out, c->w, c->E);
}

START_TEST(noisy_load_grad)
{
    tu_fd_stats st = {0};
    for (int64_t k = 1; k <= 4; k++) {
        ctx_t c = {.T = 7, .E = 4, .k = k};
        int64_t n = c.T * c.E, m = k + 1 < c.E ? k + 1 : c.E;
        c.z = tu_alloc(n), c.zn = tu_alloc(n), c.h = tu_alloc(n), c.w = tu_alloc(c.E), c.out = tu_alloc(c.E);
        c.order0 = malloc((size_t)(c.T * m) * sizeof *c.order0);
        double *dz = tu_alloc(n), *dzn = tu_alloc(n), *dh = tu_alloc(n);
        tu_randn(c.z, n, 1.0, 50 + k);
        tu_randn(c.zn, n, 1.0, 60 + k);
        tu_randn(c.h, n, 1.0, 70 + k);
        tu_randn(c.w, c.E, 1.0, 80 + k);
        /* A near tie in token 0: perturbing either entry swaps them, so those are skipped. */
        c.h[0] = 3.0;
        c.h[1] = 3.0 + 1e-7;
        top_order(c.order0, c.h, c.T, c.E, m);
        moe_ref_noisy_load_backward(dz, dzn, dh, c.w, c.z, c.zn, c.h, k, c.T, c.E);
        int64_t skipped0 = st.skipped;
        double e1 = tu_fd_check(c.z, n, dz, loss_noisy_load, &c, FD_H, &st);
        double e2 = tu_fd_check(c.zn, n, dzn, loss_noisy_load, &c, FD_H, &st);
        double e3 = tu_fd_check(c.h, n, dh, loss_noisy_load, &c, FD_H, &st);
        ck_assert_msg(e1 <= FD_TOL && e2 <= FD_TOL && e3 <= FD_TOL,
                      "noisy load k=%lld grad rel err dz %g dzn %g dh %g", (long long)k, e1, e2, e3);
        if (k < c.E)
            ck_assert_msg(st.skipped > skipped0, "the planted near tie was not skipped");
        else
            ck_assert(tu_max_abs(dz, dh, n) == 0); /* k = E: constant, no gradient */
        free(c.z), free(c.zn), free(c.h), free(c.w), free(c.out), free(c.order0), free(dz), free(dzn), free(dh);
    }
    fd_report("noisy load", &st);
}
END_TEST

static Suite *router_suite(void)
{
    Suite *s = suite_create("router");
    TCase *tc = tcase_create("forward");
    tcase_add_test(tc, softmax_values);
    tcase_add_test(tc, sigmoid_values);
    tcase_add_test(tc, jitter_values);
    tcase_add_test(tc, noisy_logits_values);
    tcase_add_test(tc, draws_by_global_identity);
    tcase_add_test(tc, noisy_load_values);
    suite_add_tcase(s, tc);
    tc = tcase_create("gradients");
    tcase_add_test(tc, scores_grad);
    tcase_add_test(tc, jitter_grad);
    tcase_add_test(tc, noisy_logits_grad);
    tcase_add_test(tc, noisy_load_grad);
    suite_add_tcase(s, tc);
    return s;
}

int main(void)
{
    /* No fork, so the FD totals gathered by the tests can be printed at the end. */
    SRunner *sr = srunner_create(router_suite());
    srunner_set_fork_status(sr, CK_NOFORK);
    srunner_run_all(sr, CK_NORMAL);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    printf("fd: router suite worst rel err %.2e, checked %lld, skipped %lld\n", fd_all.worst,
           (long long)fd_all.checked, (long long)fd_all.skipped);
    return failed ? EXIT_FAILURE : EXIT_SUCCESS;
}
