/*
 * Dispatch and combine over a routing plan. Combine and the dispatch backward
 * scatter-add into token rows; they run through the plan in order, so a token's
 * sum always adds its assignments in the same order (by expert) whatever the
 * batch around it: the result is reproducible and invariant under token permutation.
 */
#include <string.h>

#include "ref/ref.h"

void moe_ref_dispatch_forward(double *xe, const double *x, const moe_plan *p, int64_t d)
{
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < p->n; i++)
        memcpy(xe + i * d, x + (int64_t)p->token[i] * d, (size_t)d * sizeof *xe);
}

void moe_ref_dispatch_backward(double *dx, const double *dxe, const moe_plan *p, int64_t d)
{
    /* Several rows may land on one token: a plain loop keeps the order fixed. */
    for (int64_t i = 0; i < p->n; i++) {
        double *r = dx + (int64_t)p->token[i] * d;
        const double *g = dxe + i * d;
        for (int64_t k = 0; k < d; k++)
            r[k] += g[k];
    }
}

void moe_ref_combine_forward(double *y, const double *ye, const moe_plan *p, int64_t d)
{
    memset(y, 0, (size_t)(p->T * d) * sizeof *y);
    for (int64_t i = 0; i < p->n; i++) {
        double *r = y + (int64_t)p->token[i] * d;
        const double *v = ye + i * d;
        double w = p->weight[i];
        for (int64_t k = 0; k < d; k++)
            r[k] += w * v[k];
    }
}

void moe_ref_combine_backward(double *dye, double *dweight, const double *dy, const double *ye, const moe_plan *p,
                              int64_t d)
{
    /* Each assignment owns its row of dye and its dweight: no races. */
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < p->n; i++) {
        const double *g = dy + (int64_t)p->token[i] * d;
        if (dye) {
            double w = p->weight[i];
            for (int64_t k = 0; k < d; k++)
                dye[i * d + k] += w * g[k];
        }
        if (dweight) {
            double acc = 0;
            for (int64_t k = 0; k < d; k++)
                acc += g[k] * ye[i * d + k];
            dweight[i] += acc;
        }
    }
}
