/* Elementwise sum in fp32: the residual connections. */
#include "cpu/model_ops.h"

void moe_cpu_add_forward(float *out, const float *a, const float *b, int64_t n)
{
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < n; i++)
        out[i] = a[i] + b[i];
}

void moe_cpu_add_backward(float *da, float *db, const float *dout, int64_t n)
{
    if (da) {
#pragma omp parallel for schedule(static)
        for (int64_t i = 0; i < n; i++)
            da[i] += dout[i];
    }
    if (db) {
#pragma omp parallel for schedule(static)
        for (int64_t i = 0; i < n; i++)
            db[i] += dout[i];
    }
}
