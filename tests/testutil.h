/* Shared helpers of the Check suites: random fills, normalised errors, finite differences. */
#ifndef CMOE_TESTUTIL_H
#define CMOE_TESTUTIL_H

#include <check.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cmoe.h"

/* Deterministic test data from Philox: N(0, scale²). */
static inline void tu_randn(double *x, int64_t n, double scale, uint64_t seed)
{
    for (int64_t i = 0; i < n; i++)
        x[i] = scale * moe_rand_normal(seed, 99, 0, (uint32_t)i, (uint32_t)(i >> 32));
}

static inline void tu_nan_fill(double *x, int64_t n)
{
    for (int64_t i = 0; i < n; i++)
        x[i] = NAN;
}

/* ‖a − r‖ / ‖r‖ (plain ‖a − r‖ when r is 0); any NaN gives +inf so it never passes. */
static inline double tu_rel_err(const double *a, const double *r, int64_t n)
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

static inline double tu_max_abs(const double *a, const double *r, int64_t n)
{
    double m = 0;
    for (int64_t i = 0; i < n; i++) {
        double d = fabs(a[i] - r[i]);
        if (isnan(d))
            return INFINITY;
        if (d > m)
            m = d;
    }
    return m;
}

static inline double *tu_alloc(int64_t n)
{
    double *p = calloc(n > 0 ? (size_t)n : 1, sizeof *p);
    ck_assert_ptr_nonnull(p);
    return p;
}

/*
 * Central finite differences of a scalar loss in double.
 * loss(ctx, &ok) evaluates the loss at the current values of p; it sets ok = 0 when a
 * discrete decision (the routing plan, a ReLU kink) differs from the unperturbed one,
 * and such coordinates are skipped and counted. grad is the analytic gradient.
 * Returns the normalised error ‖fd − grad‖ / ‖grad‖ over the coordinates checked.
 */
typedef double (*tu_loss_fn)(void *ctx, int *ok);

typedef struct {
    int64_t checked, skipped;
    double worst; /* worst normalised error over calls */
} tu_fd_stats;

static inline double tu_fd_check(double *p, int64_t n, const double *grad, tu_loss_fn loss, void *ctx,
                                 double h, tu_fd_stats *st)
{
    double num = 0, den = 0;
    for (int64_t i = 0; i < n; i++) {
        double keep = p[i];
        int ok1 = 1, ok2 = 1;
        p[i] = keep + h;
        double lp = loss(ctx, &ok1);
        p[i] = keep - h;
        double lm = loss(ctx, &ok2);
        p[i] = keep;
        if (!ok1 || !ok2) {
            if (st)
                st->skipped++;
            continue;
        }
        double fd = (lp - lm) / (2 * h);
        num += (fd - grad[i]) * (fd - grad[i]);
        den += grad[i] * grad[i];
        if (st)
            st->checked++;
    }
    double err = den > 0 ? sqrt(num / den) : sqrt(num);
    if (st && err > st->worst)
        st->worst = err;
    return err;
}

/* Runs a suite; the exit status is what automake's test driver expects. */
static inline int tu_run(Suite *s)
{
    SRunner *sr = srunner_create(s);
    srunner_run_all(sr, CK_NORMAL);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed ? EXIT_FAILURE : EXIT_SUCCESS;
}

#endif
