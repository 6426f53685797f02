/* Token embedding in double: a gather forward, a scatter-add backward. */
#include "ref/model_ops.h"

void moe_ref_embedding_forward(double *out, const int32_t *tokens, const double *wte, int64_t N, int64_t C)
{
#pragma omp parallel for schedule(static)
    for (int64_t t = 0; t < N; t++) {
        const double *row = wte + (int64_t)tokens[t] * C;
        for (int64_t c = 0; c < C; c++)
            out[t * C + c] = row[c];
    }
}

void moe_ref_embedding_backward(double *dwte, const double *dout, const int32_t *tokens, int64_t N, int64_t C)
{
    /* Repeated tokens add into the same row: sequential over t keeps it race-free and
     * the summation order fixed. */
    for (int64_t t = 0; t < N; t++) {
        double *row = dwte + (int64_t)tokens[t] * C;
        for (int64_t c = 0; c < C; c++)
            row[c] += dout[t * C + c];
    }
}
