/* Dispatch and combine over a routing plan: exact round trip, sums of weights, FD gradients. */
#include "testutil.h"
#include "ref/ref.h"
#ifdef _OPENMP
#include <omp.h>
#endif

/*
 * A plan with every token sent to k <= E distinct experts, (t·7 + j) mod E for j < k,
 * sorted by expert then token as the routers lay it out; random weights in (0.5, 1.5).
 */
static moe_plan *make_plan(int64_t T, int64_t E, int64_t k, uint64_t seed)
{
    moe_plan *p;
    ck_assert_int_eq(moe_plan_create(T * k, T, E, k, &p), MOE_OK);
    p->T = T;
    p->E = E;
    p->k = k;
    p->capacity = 0;
    p->dropped = 0;
    int64_t n = 0;
    p->offsets[0] = 0;
    for (int64_t e = 0; e < E; e++) {
        for (int64_t t = 0; t < T; t++)
            for (int64_t j = 0; j < k; j++)
                if ((t * 7 + j) % E == e) {
                    p->token[n] = (int32_t)t;
                    p->expert[n] = (int32_t)e;
                    p->src[n] = t * E + e;
                    p->choice[n] = t * k + j;
                    p->weight[n] = 0.5 + moe_rand_uniform(seed, 98, 0, (uint32_t)n, 0);
                    n++;
                }
        p->count[e] = p->selected[e] = n - p->offsets[e];
        p->offsets[e + 1] = n;
    }
    p->n = n;
    ck_assert_int_eq(n, T * k); /* (t·7 + j) mod E is distinct over j < k <= E */
    ck_assert_int_eq(moe_plan_check(p), MOE_OK);
    return p;
}

START_TEST(test_round_trip_exact)
{
    const int64_t T = 9, E = 4, d = 5;
    moe_plan *p = make_plan(T, E, 1, 1);
    for (int64_t i = 0; i < p->n; i++)
        p->weight[i] = 1.0;
    double *x = tu_alloc(T * d), *xe = tu_alloc(p->n * d), *y = tu_alloc(T * d);
    tu_randn(x, T * d, 3.0, 11);
    x[3] = -0.0; /* signed zero and tiny values survive too */
    x[4] = 1e-310;
    tu_nan_fill(xe, p->n * d);
    tu_nan_fill(y, T * d);
    moe_ref_dispatch_forward(xe, x, p, d);
    for (int64_t i = 0; i < p->n; i++) /* expert-contiguous copy of the token's row */
        ck_assert(memcmp(xe + i * d, x + p->token[i] * d, (size_t)d * sizeof *x) == 0);
    moe_ref_combine_forward(y, xe, p, d);
    for (int64_t i = 0; i < T * d; i++)
        ck_assert_msg(y[i] == x[i] && !isnan(y[i]), "element %lld: %g != %g", (long long)i, y[i], x[i]);
    free(x); free(xe); free(y);
    moe_plan_free(p);
}
END_TEST

START_TEST(test_combine_sums_weights)
{
    const int64_t T = 6, E = 5, d = 3;
    for (int64_t k = 1; k <= 4; k++) {
        moe_plan *p = make_plan(T, E, k, 20 + (uint64_t)k);
        double *x = tu_alloc(T * d), *xe = tu_alloc(p->n * d), *y = tu_alloc(T * d), *wsum = tu_alloc(T);
        tu_randn(x, T * d, 1.0, 12);
        tu_nan_fill(xe, p->n * d);
        tu_nan_fill(y, T * d);
        moe_ref_dispatch_forward(xe, x, p, d);
        moe_ref_combine_forward(y, xe, p, d);
        for (int64_t i = 0; i < p->n; i++)
            wsum[p->token[i]] += p->weight[i];
        for (int64_t t = 0; t < T; t++)
            for (int64_t c = 0; c < d; c++)
                ck_assert_double_eq_tol(y[t * d + c], wsum[t] * x[t * d + c], 1e-13);
        free(x); free(xe); free(y); free(wsum);
        moe_plan_free(p);
    }
}
END_TEST

START_TEST(test_dropped_tokens_get_zero)
{
    /* A token with no kept assignment combines to 0 (it is written, not left stale). */
    const int64_t T = 4, E = 2, d = 2;
    moe_plan *p = make_plan(T, E, 1, 3);
    /* Keep only the first row of the plan. */
    int64_t keep_e = p->expert[0];
    p->n = 1;
    for (int64_t e = 0; e < E; e++) {
        p->count[e] = e == keep_e ? 1 : 0;
        p->offsets[e + 1] = e >= keep_e ? 1 : 0;
    }
    ck_assert_int_eq(moe_plan_check(p), MOE_OK);
    double x[8], xe[8], y[8];
    tu_randn(x, T * d, 1, 5);
    tu_nan_fill(y, T * d);
    moe_ref_dispatch_forward(xe, x, p, d);
    moe_ref_combine_forward(y, xe, p, d);
    for (int64_t t = 0; t < T; t++)
        for (int64_t c = 0; c < d; c++)
            if (t == p->token[0])
                ck_assert_double_eq_tol(y[t * d + c], p->weight[0] * x[t * d + c], 1e-15);
            else
                ck_assert_double_eq(y[t * d + c], 0.0);
    moe_plan_free(p);
}
END_TEST

/* ---- FD of the backward passes --------------------------------------------- */

typedef struct {
    moe_plan *p;
    int64_t T, d;
    double *x, *xe, *ye, *y, *dy, *g;
} dc_ctx;

/* L = Σ g·dispatch(x) + Σ dy·combine(ye) */
static double dc_loss(void *vc, int *ok)
{
    dc_ctx *c = vc;
    (void)ok; /* no discrete decisions here */
    moe_ref_dispatch_forward(c->xe, c->x, c->p, c->d);
    moe_ref_combine_forward(c->y, c->ye, c->p, c->d);
    double l = 0;
    for (int64_t i = 0; i < c->p->n * c->d; i++)
        l += c->g[i] * c->xe[i];
    for (int64_t i = 0; i < c->T * c->d; i++)
        l += c->dy[i] * c->y[i];
    return l;
}

START_TEST(test_backward_fd)
{
    const int64_t T = 7, E = 4, d = 3;
    tu_fd_stats st = {0};
    for (int64_t k = 1; k <= 3; k++) {
        moe_plan *p = make_plan(T, E, k, 40 + (uint64_t)k);
        int64_t n = p->n;
        dc_ctx c = {.p = p, .T = T, .d = d};
        c.x = tu_alloc(T * d);
        c.xe = tu_alloc(n * d);
        c.ye = tu_alloc(n * d);
        c.y = tu_alloc(T * d);
        c.dy = tu_alloc(T * d);
        c.g = tu_alloc(n * d);
        tu_randn(c.x, T * d, 1, 50);
        tu_randn(c.ye, n * d, 1, 51);
        tu_randn(c.dy, T * d, 1, 52);
        tu_randn(c.g, n * d, 1, 53);
        double *dx = tu_alloc(T * d), *dye = tu_alloc(n * d), *dw = tu_alloc(n);
        /* Start from 1 so that '=' instead of '+=' fails. */
        for (int64_t i = 0; i < T * d; i++)
            dx[i] = 1;
        for (int64_t i = 0; i < n * d; i++)
            dye[i] = 1;
        for (int64_t i = 0; i < n; i++)
            dw[i] = 1;
        moe_ref_dispatch_backward(dx, c.g, p, d);
        moe_ref_combine_backward(dye, dw, c.dy, c.ye, p, d);
        for (int64_t i = 0; i < T * d; i++)
            dx[i] -= 1;
        for (int64_t i = 0; i < n * d; i++)
            dye[i] -= 1;
        for (int64_t i = 0; i < n; i++)
            dw[i] -= 1;
        double e1 = tu_fd_check(c.x, T * d, dx, dc_loss, &c, 1e-5, &st);
        double e2 = tu_fd_check(c.ye, n * d, dye, dc_loss, &c, 1e-5, &st);
        double e3 = tu_fd_check(p->weight, n, dw, dc_loss, &c, 1e-5, &st);
        ck_assert_msg(e1 <= 1e-6 && e2 <= 1e-6 && e3 <= 1e-6, "k=%lld: dx %.2e dye %.2e dweight %.2e", (long long)k,
                      e1, e2, e3);
        /* Either output of combine backward may be skipped. */
        double *dye2 = tu_alloc(n * d), *dw2 = tu_alloc(n);
        moe_ref_combine_backward(dye2, NULL, c.dy, c.ye, p, d);
        moe_ref_combine_backward(NULL, dw2, c.dy, c.ye, p, d);
        ck_assert(tu_rel_err(dye2, dye, n * d) <= 1e-15 && tu_rel_err(dw2, dw, n) <= 1e-15);
        free(dye2); free(dw2);
        free(c.x); free(c.xe); free(c.ye); free(c.y); free(c.dy); free(c.g); free(dx); free(dye); free(dw);
        moe_plan_free(p);
    }
    printf("fd: dispatch/combine worst rel err %.2e, checked %lld, skipped %lld\n", st.worst, (long long)st.checked,
           (long long)st.skipped);
}
END_TEST

START_TEST(test_empty_plan)
{
    /* Every assignment dropped: dispatch writes nothing, combine writes zeros. */
    const int64_t T = 3, E = 2, d = 2;
    moe_plan *p = make_plan(T, E, 1, 4);
    p->n = 0;
    memset(p->offsets, 0, (size_t)(E + 1) * sizeof *p->offsets);
    memset(p->count, 0, (size_t)E * sizeof *p->count);
    double x[6] = {1, 2, 3, 4, 5, 6}, y[6], dx[6] = {0};
    tu_nan_fill(y, T * d);
    moe_ref_dispatch_forward(NULL, x, p, d);
    moe_ref_combine_forward(y, NULL, p, d);
    moe_ref_dispatch_backward(dx, NULL, p, d);
    for (int i = 0; i < 6; i++)
        ck_assert(y[i] == 0 && dx[i] == 0);
    moe_plan_free(p);
}
END_TEST

int main(void)
{
#ifdef _OPENMP
    omp_set_num_threads(1); /* tiny tensors: threads only add overhead */
#endif
    Suite *s = suite_create("dispatch");
    TCase *tc = tcase_create("dispatch");
    tcase_set_timeout(tc, 60);
    tcase_add_test(tc, test_round_trip_exact);
    tcase_add_test(tc, test_combine_sums_weights);
    tcase_add_test(tc, test_dropped_tokens_get_zero);
    tcase_add_test(tc, test_backward_fd);
    tcase_add_test(tc, test_empty_plan);
    suite_add_tcase(s, tc);
    return tu_run(s);
}
