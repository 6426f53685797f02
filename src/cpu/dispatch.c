/*
 * Dispatch and combine on the cpu backend. The scatter-adds (combine, dispatch's
 * backward) run in parallel over tokens through the plan's token -> rows index, and each
 * token adds its rows in plan order, as ref/dispatch.c's sequential loop does: results
 * do not depend on the thread count, and equal ref's order of summation.
 */
#include <string.h>

#include "cpu/cpu.h"

static void cpu_dispatch_forward(moe_backend *b, moe_tensor xe_t, moe_tensor x_t, const moe_bplan *p, int64_t d)
{
    float *xe = F(xe_t);
    const float *x = F(x_t);
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < p->n; i++)
        memcpy(xe + i * d, x + (int64_t)p->token[i] * d, (size_t)d * sizeof *xe);
}

static void cpu_dispatch_backward(moe_backend *b, moe_tensor dx_t, moe_tensor dxe_t, const moe_bplan *p, int64_t d)
{
    float *dx = F(dx_t);
    const float *dxe = F(dxe_t);
#pragma omp parallel for schedule(static)
    for (int64_t t = 0; t < p->T; t++) {
        float *r = dx + t * d;
        for (int64_t q = p->tok_off[t]; q < p->tok_off[t + 1]; q++) {
            const float *g = dxe + p->tok_row[q] * d;
#pragma omp simd
            for (int64_t k = 0; k < d; k++)
                r[k] += g[k];
        }
    }
}

static void cpu_combine_forward(moe_backend *b, moe_tensor y_t, moe_tensor ye_t, const moe_bplan *p, int64_t d)
{
    float *y = F(y_t);
    const float *ye = F(ye_t);
#pragma omp parallel for schedule(static)
    for (int64_t t = 0; t < p->T; t++) {
        float *r = y + t * d;
        memset(r, 0, (size_t)d * sizeof *r);
        for (int64_t q = p->tok_off[t]; q < p->tok_off[t + 1]; q++) {
            const int64_t i = p->tok_row[q];
            const float w = p->weight[i], *v = ye + i * d;
#pragma omp simd
            for (int64_t k = 0; k < d; k++)
                r[k] += w * v[k];
        }
    }
}

static void cpu_combine_backward(moe_backend *b, moe_tensor dye_t, moe_tensor dweight_t, moe_tensor dy_t,
                                 moe_tensor ye_t, const moe_bplan *p, int64_t d)
{
    float *dye = dye_t.buf ? F(dye_t) : NULL, *dweight = dweight_t.buf ? F(dweight_t) : NULL;
    const float *dy = F(dy_t), *ye = F(ye_t);
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < p->n; i++) {
        const float *g = dy + (int64_t)p->token[i] * d;
        if (dye) {
            const float w = p->weight[i];
            float *o = dye + i * d;
#pragma omp simd
            for (int64_t k = 0; k < d; k++)
                o[k] += w * g[k];
        }
        if (dweight) {
            const float *v = ye + i * d;
            float acc = 0;
#pragma omp simd reduction(+ : acc)
            for (int64_t k = 0; k < d; k++)
                acc += g[k] * v[k];
            dweight[i] += acc;
        }
    }
}

void moe_cpu_dispatch_ops(moe_backend *b)
{
    b->dispatch_forward = cpu_dispatch_forward;
    b->dispatch_backward = cpu_dispatch_backward;
    b->combine_forward = cpu_combine_forward;
    b->combine_backward = cpu_combine_backward;
}
