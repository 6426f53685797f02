/* AdamW with decoupled weight decay, gradient norm and clipping scale, in double. */
#include <math.h>

#include "ref/model_ops.h"

void moe_ref_adamw_step(double *p, double *m, double *v, const double *g, double lr, double beta1, double beta2,
                        double eps, double wd, double grad_scale, int64_t t, int64_t n)
{
    const double bc1 = 1.0 - pow(beta1, (double)t), bc2 = 1.0 - pow(beta2, (double)t);
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < n; i++) {
        double gi = g[i] * grad_scale;
        m[i] = beta1 * m[i] + (1.0 - beta1) * gi;
        v[i] = beta2 * v[i] + (1.0 - beta2) * gi * gi;
        double mh = m[i] / bc1, vh = v[i] / bc2;
        p[i] -= lr * (mh / (sqrt(vh) + eps) + wd * p[i]);
    }
}

double moe_ref_grad_sumsq(const double *g, int64_t n)
{
    /* sequential: the oracle's sum has one order whatever the thread count */
    double acc = 0;
    for (int64_t i = 0; i < n; i++)
        acc += g[i] * g[i];
    return acc;
}

double moe_ref_clip_scale(double sumsq, double max_norm)
{
    if (max_norm <= 0)
        return 1.0;
    double s = max_norm / (sqrt(sumsq) + 1e-6);
    return s < 1.0 ? s : 1.0;
}
