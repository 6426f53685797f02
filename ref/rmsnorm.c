/* RMSNorm with a learned gain (Zhang & Sennrich 2019; Llama, Mixtral), in double. */
#include <math.h>

#include "ref/model_ops.h"

void moe_ref_rmsnorm_forward(double *out, double *rstd, const double *x, const double *w, double eps, int64_t N,
                             int64_t C)
{
#pragma omp parallel for schedule(static)
    for (int64_t t = 0; t < N; t++) {
        const double *xr = x + t * C;
        double ss = 0;
        for (int64_t c = 0; c < C; c++)
            ss += xr[c] * xr[c];
        double r = 1.0 / sqrt(ss / (double)C + eps);
        rstd[t] = r;
        for (int64_t c = 0; c < C; c++)
            out[t * C + c] = xr[c] * r * w[c];
    }
}

/*
 * With n = x·r and y = n ⊙ w:  ∂r/∂x = −r³·x/C, so
 * dx = r·(w⊙dy) − r³/C · x · Σ_c (w⊙dy)_c x_c;  dw = Σ_t dy ⊙ n.
 */
void moe_ref_rmsnorm_backward(double *dx, double *dw, const double *dout, const double *x, const double *w,
                              const double *rstd, int64_t N, int64_t C)
{
    if (dx) {
#pragma omp parallel for schedule(static)
        for (int64_t t = 0; t < N; t++) {
            const double *xr = x + t * C, *g = dout + t * C;
            double r = rstd[t], dot = 0;
            for (int64_t c = 0; c < C; c++)
                dot += w[c] * g[c] * xr[c];
            double k = r * r * r * dot / (double)C;
            for (int64_t c = 0; c < C; c++)
                dx[t * C + c] += r * w[c] * g[c] - k * xr[c];
        }
    }
    if (dw) {
#pragma omp parallel for schedule(static)
        for (int64_t c = 0; c < C; c++) {
            double acc = 0;
            for (int64_t t = 0; t < N; t++)
                acc += dout[t * C + c] * x[t * C + c] * rstd[t];
            dw[c] += acc;
        }
    }
}
