/* Dense products in double: the router's and the experts' projections. */
#include "ref/ref.h"

void moe_ref_matmul_forward(double *out, const double *x, const double *w, int64_t T, int64_t K, int64_t N)
{
#pragma omp parallel for schedule(static)
    for (int64_t t = 0; t < T; t++) {
        double *o = out + t * N;
        for (int64_t j = 0; j < N; j++)
            o[j] = 0;
        for (int64_t k = 0; k < K; k++) {
            double xv = x[t * K + k];
            const double *wr = w + k * N;
            for (int64_t j = 0; j < N; j++)
                o[j] += xv * wr[j];
        }
    }
}

void moe_ref_matmul_backward(double *dx, double *dw, const double *dout, const double *x, const double *w,
                             int64_t T, int64_t K, int64_t N)
{
    if (dx) {
#pragma omp parallel for schedule(static)
        for (int64_t t = 0; t < T; t++)
            for (int64_t k = 0; k < K; k++) {
                double acc = 0;
                for (int64_t j = 0; j < N; j++)
                    acc += dout[t * N + j] * w[k * N + j];
                dx[t * K + k] += acc;
            }
    }
    if (dw) {
#pragma omp parallel for schedule(static)
        for (int64_t k = 0; k < K; k++)
            for (int64_t t = 0; t < T; t++) {
                double xv = x[t * K + k];
                for (int64_t j = 0; j < N; j++)
                    dw[k * N + j] += xv * dout[t * N + j];
            }
    }
}
