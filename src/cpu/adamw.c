/* AdamW in fp32 (master weights, gradients and both moments fp32), gradient norm. */
#include <math.h>

#include "cpu/model_ops.h"

/* The norm is summed per block, then over the blocks in order: the same bits on any
 * thread count. */
#define NORM_BLOCKS 64

void moe_cpu_adamw_step(float *p, float *m, float *v, const float *g, double lr, double beta1, double beta2,
                        double eps, double wd, double grad_scale, int64_t t, int64_t n)
{
    /* the step-dependent scalars once, in double */
    const double bc1 = 1.0 - pow(beta1, (double)t), bc2 = 1.0 - pow(beta2, (double)t);
    const float b1 = (float)beta1, b2 = (float)beta2, a1 = (float)(1.0 - beta1), a2 = (float)(1.0 - beta2);
    const float ib1 = (float)(1.0 / bc1), ib2 = (float)(1.0 / bc2), gs = (float)grad_scale;
    const float lrf = (float)lr, epsf = (float)eps, wdf = (float)wd;
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < n; i++) {
        const float gi = g[i] * gs;
        const float mi = b1 * m[i] + a1 * gi, vi = b2 * v[i] + a2 * gi * gi;
        m[i] = mi;
        v[i] = vi;
        p[i] -= lrf * ((mi * ib1) / (sqrtf(vi * ib2) + epsf) + wdf * p[i]);
    }
}

double moe_cpu_grad_sumsq(const float *g, int64_t n)
{
    double part[NORM_BLOCKS] = {0};
#pragma omp parallel for schedule(static)
    for (int64_t blk = 0; blk < NORM_BLOCKS; blk++) {
        const int64_t i0 = n * blk / NORM_BLOCKS, i1 = n * (blk + 1) / NORM_BLOCKS;
        double acc = 0;
        for (int64_t i = i0; i < i1; i++)
            acc += (double)g[i] * g[i];
        part[blk] = acc;
    }
    double s = 0;
    for (int64_t blk = 0; blk < NORM_BLOCKS; blk++)
        s += part[blk];
    return s;
}

double moe_cpu_clip_scale(double sumsq, double max_norm)
{
    if (max_norm <= 0)
        return 1.0;
    double s = max_norm / (sqrt(sumsq) + 1e-6);
    return s < 1.0 ? s : 1.0;
}
