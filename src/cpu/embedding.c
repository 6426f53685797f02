/* Token embedding in fp32: a gather forward, a scatter-add backward. */
#include "cpu/model_ops.h"

/* Columns per task of the scatter-add: 16 cache lines of floats. */
#define EMB_COLS 256

void moe_cpu_embedding_forward(float *out, const int32_t *tokens, const float *wte, int64_t N, int64_t C)
{
#pragma omp parallel for schedule(static)
    for (int64_t t = 0; t < N; t++) {
        const float *row = wte + (int64_t)tokens[t] * C;
        for (int64_t c = 0; c < C; c++)
            out[t * C + c] = row[c];
    }
}

void moe_cpu_embedding_backward(float *dwte, const float *dout, const int32_t *tokens, int64_t N, int64_t C)
{
    /* Repeated tokens hit the same row, so threads split the columns, not the tokens:
     * no races, and each element sums its tokens in order t = 0..N-1 on any thread count. */
    const int64_t nblk = (C + EMB_COLS - 1) / EMB_COLS;
#pragma omp parallel for schedule(static)
    for (int64_t blk = 0; blk < nblk; blk++) {
        const int64_t c0 = blk * EMB_COLS, c1 = c0 + EMB_COLS < C ? c0 + EMB_COLS : C;
        for (int64_t t = 0; t < N; t++) {
            float *row = dwte + (int64_t)tokens[t] * C;
            const float *g = dout + t * C;
            for (int64_t c = c0; c < c1; c++)
                row[c] += g[c];
        }
    }
}
