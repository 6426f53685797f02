/* RMSNorm with a learned gain in fp32; row sums in double. */
#include <math.h>

#include "cpu/model_ops.h"

/* Columns per task of the dw reduction: a thread keeps this many double sums. */
#define RMS_COLS 64

void moe_cpu_rmsnorm_forward(float *out, float *rstd, const float *x, const float *w, double eps, int64_t N,
                             int64_t C)
{
#pragma omp parallel for schedule(static)
    for (int64_t t = 0; t < N; t++) {
        const float *xr = x + t * C;
        double ss = 0;
        for (int64_t c = 0; c < C; c++)
            ss += (double)xr[c] * xr[c];
        const float r = (float)(1.0 / sqrt(ss / (double)C + eps));
        rstd[t] = r;
        for (int64_t c = 0; c < C; c++)
            out[t * C + c] = xr[c] * r * w[c];
    }
}

/* The same formulas as ref/rmsnorm.c; dw is split by columns so that each sum runs
 * over t in order, whatever the thread count. */
void moe_cpu_rmsnorm_backward(float *dx, float *dw, const float *dout, const float *x, const float *w,
                              const float *rstd, int64_t N, int64_t C)
{
    if (dx) {
#pragma omp parallel for schedule(static)
        for (int64_t t = 0; t < N; t++) {
            const float *xr = x + t * C, *g = dout + t * C;
            const double r = rstd[t];
            double dot = 0;
            for (int64_t c = 0; c < C; c++)
                dot += (double)(w[c] * g[c]) * xr[c];
            const float k = (float)(r * r * r * dot / (double)C), rf = (float)r;
            for (int64_t c = 0; c < C; c++)
                dx[t * C + c] += rf * w[c] * g[c] - k * xr[c];
        }
    }
    if (dw) {
        const int64_t nblk = (C + RMS_COLS - 1) / RMS_COLS;
#pragma omp parallel for schedule(static)
        for (int64_t blk = 0; blk < nblk; blk++) {
            const int64_t c0 = blk * RMS_COLS, nc = C - c0 < RMS_COLS ? C - c0 : RMS_COLS;
            double acc[RMS_COLS] = {0};
            for (int64_t t = 0; t < N; t++) {
                const float *g = dout + t * C + c0, *xr = x + t * C + c0;
                const float r = rstd[t];
                for (int64_t c = 0; c < nc; c++)
                    acc[c] += (double)(g[c] * xr[c] * r);
            }
            for (int64_t c = 0; c < nc; c++)
                dw[c0 + c] += (float)acc[c];
        }
    }
}
