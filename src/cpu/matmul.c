/* Linear layers in fp32: every product is one cblas_sgemm, threaded by OpenBLAS. */
#include <cblas.h>

#include "cpu/model_ops.h"

void moe_cpu_matmul_forward(float *out, const float *x, const float *w, int64_t T, int64_t K, int64_t N)
{
    if (T <= 0 || N <= 0)
        return;
    if (K <= 0) { /* an empty sum; BLAS with K = 0 would leave out unwritten */
        for (int64_t i = 0; i < T * N; i++)
            out[i] = 0;
        return;
    }
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, (blasint)T, (blasint)N, (blasint)K, 1.0f, x,
                (blasint)K, w, (blasint)N, 0.0f, out, (blasint)N);
}

void moe_cpu_matmul_backward(float *dx, float *dw, const float *dout, const float *x, const float *w, int64_t T,
                             int64_t K, int64_t N)
{
    /* beta = 1: both gradients accumulate; a zero-sized side has nothing to add */
    if (T <= 0 || K <= 0 || N <= 0)
        return;
    if (dx) /* dx [T, K] += dout [T, N] · wᵀ */
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (blasint)T, (blasint)K, (blasint)N, 1.0f, dout,
                    (blasint)N, w, (blasint)N, 1.0f, dx, (blasint)K);
    if (dw) /* dw [K, N] += xᵀ · dout */
        cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, (blasint)K, (blasint)N, (blasint)T, 1.0f, x,
                    (blasint)K, dout, (blasint)N, 1.0f, dw, (blasint)N);
}
