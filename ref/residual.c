/* Elementwise sum in double: the residual connections. */
#include "ref/model_ops.h"

void moe_ref_add_forward(double *out, const double *a, const double *b, int64_t n)
{
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < n; i++)
        out[i] = a[i] + b[i];
}

void moe_ref_add_backward(double *da, double *db, const double *dout, int64_t n)
{
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < n; i++) {
        if (da)
            da[i] += dout[i];
        if (db)
            db[i] += dout[i];
    }
}
