/* Softmax cross-entropy of the LM head in fp32, with PyTorch's ignore_index = −1. */
#include <math.h>

#include "cpu/model_ops.h"

/* The loss is summed per block of rows, then over the blocks in order: the same
 * bits on any thread count. */
#define CE_BLOCKS 64

static int64_t counted_rows(const int32_t *targets, int64_t N)
{
    int64_t n = 0;
    for (int64_t t = 0; t < N; t++)
        n += targets[t] >= 0;
    return n;
}

/* softmax of one row into p (may alias z); returns −log p[target] (0 for target −1) */
static double ce_row(float *p, const float *z, int32_t target, int64_t V)
{
    float mx = -INFINITY;
    for (int64_t j = 0; j < V; j++)
        mx = z[j] > mx ? z[j] : mx;
    const double zt = target >= 0 ? z[target] : 0;
    double sum = 0;
    for (int64_t j = 0; j < V; j++) {
        p[j] = expf(z[j] - mx);
        sum += p[j];
    }
    const float inv = (float)(1.0 / sum);
    for (int64_t j = 0; j < V; j++)
        p[j] *= inv;
    return target >= 0 ? -(zt - mx - log(sum)) : 0.0;
}

double moe_cpu_crossentropy_forward(float *probs, const float *logits, const int32_t *targets, int64_t N,
                                    int64_t V)
{
    const int64_t n = counted_rows(targets, N);
    double part[CE_BLOCKS] = {0};
#pragma omp parallel for schedule(static)
    for (int64_t blk = 0; blk < CE_BLOCKS; blk++) {
        const int64_t t0 = N * blk / CE_BLOCKS, t1 = N * (blk + 1) / CE_BLOCKS;
        for (int64_t t = t0; t < t1; t++)
            part[blk] += ce_row(probs + t * V, logits + t * V, targets[t], V);
    }
    double loss = 0;
    for (int64_t blk = 0; blk < CE_BLOCKS; blk++)
        loss += part[blk];
    return n > 0 ? loss / (double)n : 0.0;
}

void moe_cpu_crossentropy_backward(float *dlogits, const float *probs, const int32_t *targets, double dloss,
                                   int64_t N, int64_t V)
{
    const int64_t n = counted_rows(targets, N);
    if (n == 0)
        return;
    const float s = (float)(dloss / (double)n);
#pragma omp parallel for schedule(static)
    for (int64_t t = 0; t < N; t++) {
        if (targets[t] < 0)
            continue;
        float *d = dlogits + t * V;
        const float *p = probs + t * V;
        for (int64_t j = 0; j < V; j++)
            d[j] += s * p[j];
        d[targets[t]] -= s;
    }
}
