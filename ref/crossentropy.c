/* Softmax cross-entropy of the LM head, in double, with PyTorch's ignore_index = −1. */
#include <math.h>

#include "ref/model_ops.h"

static int64_t counted_rows(const int32_t *targets, int64_t N)
{
    int64_t n = 0;
    for (int64_t t = 0; t < N; t++)
        n += targets[t] >= 0;
    return n;
}

double moe_ref_crossentropy_forward(double *probs, const double *logits, const int32_t *targets, int64_t N,
                                    int64_t V)
{
    int64_t n = counted_rows(targets, N);
    double loss = 0;
    /* sequential: the loss is summed in one order whatever the thread count */
    for (int64_t t = 0; t < N; t++) {
        const double *z = logits + t * V;
        double *p = probs + t * V;
        double mx = -INFINITY, sum = 0;
        for (int64_t j = 0; j < V; j++)
            mx = z[j] > mx ? z[j] : mx;
        /* read the target's logit before p may overwrite it (probs may alias logits) */
        double zt = targets[t] >= 0 ? z[targets[t]] : 0;
        for (int64_t j = 0; j < V; j++) {
            p[j] = exp(z[j] - mx);
            sum += p[j];
        }
        for (int64_t j = 0; j < V; j++)
            p[j] /= sum;
        if (targets[t] >= 0)
            loss += -(zt - mx - log(sum)); /* log-sum-exp form: no log of a tiny probability */
    }
    return n > 0 ? loss / (double)n : 0.0;
}

void moe_ref_crossentropy_backward(double *dlogits, const double *probs, const int32_t *targets, double dloss,
                                   int64_t N, int64_t V)
{
    int64_t n = counted_rows(targets, N);
    if (n == 0)
        return;
    const double s = dloss / (double)n;
#pragma omp parallel for schedule(static)
    for (int64_t t = 0; t < N; t++) {
        if (targets[t] < 0)
            continue;
        for (int64_t j = 0; j < V; j++)
            dlogits[t * V + j] += s * (probs[t * V + j] - (j == targets[t]));
    }
}
