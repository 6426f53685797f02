/* Softmax cross-entropy of the LM head on the device, PyTorch's ignore_index = −1
 * (src/cpu/crossentropy.c): per-row losses in double, then one fixed-order sum. */
#include "gpu/cuda.h"

/* one block per row; probs may alias logits: every element is read before it is written,
 * by the thread that writes it, and the target's logit before the first barrier */
__global__ void k_ce_rows(double *rowloss, dptr probs, dptr logits, const int32_t *targets, int64_t V)
{
    __shared__ double sh[256];
    __shared__ float shf[256];
    const int64_t t = blockIdx.x, o = t * V;
    const int32_t tg = targets[t];
    const double zt = tg >= 0 ? (double)ldf(logits, o + tg) : 0.0;
    float mx = -INFINITY;
    for (int64_t j = threadIdx.x; j < V; j += blockDim.x)
        mx = fmaxf(mx, ldf(logits, o + j));
    shf[threadIdx.x] = mx;
    __syncthreads();
    for (unsigned s = blockDim.x / 2; s > 0; s >>= 1) {
        if (threadIdx.x < s)
            shf[threadIdx.x] = fmaxf(shf[threadIdx.x], shf[threadIdx.x + s]);
        __syncthreads();
    }
    mx = shf[0];
    double sum = 0;
    for (int64_t j = threadIdx.x; j < V; j += blockDim.x)
        sum += expf(ldf(logits, o + j) - mx);
    sum = block_sum(sum, sh);
    const float inv = (float)(1.0 / sum);
    for (int64_t j = threadIdx.x; j < V; j += blockDim.x)
        stf(probs, o + j, expf(ldf(logits, o + j) - mx) * inv);
    if (threadIdx.x == 0)
        rowloss[t] = tg >= 0 ? -(zt - mx - log(sum)) : 0.0;
}

/* loss = Σ rowloss / (rows with a target), one block */
__global__ void k_ce_mean(dptr loss, const double *rowloss, const int32_t *targets, int64_t N)
{
    __shared__ double sh[1024];
    double acc = 0, n = 0;
    for (int64_t t = threadIdx.x; t < N; t += blockDim.x) {
        acc += rowloss[t];
        n += targets[t] >= 0;
    }
    acc = block_sum(acc, sh);
    n = block_sum(n, sh);
    if (threadIdx.x == 0)
        stf(loss, 0, (float)(n > 0 ? acc / n : 0.0));
}

static void crossentropy_forward(moe_backend *b, moe_tensor loss, moe_tensor probs, moe_tensor logits,
                                 moe_tensor targets, int64_t N, int64_t V)
{
    if (N <= 0)
        return;
    double *rl = (double *)moe_cu_scratch(b, (size_t)N * sizeof(double), "crossentropy_forward");
    if (!rl)
        return;
    k_ce_rows<<<(unsigned)N, 256, 0, moe_cu_stream(b)>>>(rl, DP(probs), DP(logits), I32P(targets), V);
    k_ce_mean<<<1, 1024, 0, moe_cu_stream(b)>>>(DP(loss), rl, I32P(targets), N);
    moe_cu_check(b, "crossentropy_forward");
}

__global__ void k_ce_count(int32_t *n, const int32_t *targets, int64_t N)
{
    __shared__ int32_t sh[1024];
    int32_t c = 0;
    for (int64_t t = threadIdx.x; t < N; t += blockDim.x)
        c += targets[t] >= 0;
    c = block_sum(c, sh);
    if (threadIdx.x == 0)
        *n = c;
}

__global__ void k_ce_bwd(dptr dlogits, dptr probs, const int32_t *targets, const int32_t *n, double dloss, int64_t N,
                         int64_t V)
{
    if (*n == 0)
        return;
    const float s = (float)(dloss / (double)*n);
    CU_LOOP(i, N * V)
    {
        const int64_t t = i / V, j = i % V;
        const int32_t tg = targets[t];
        if (tg < 0)
            continue;
        float g = ldf(dlogits, i) + s * ldf(probs, i);
        if (j == tg)
            g -= s;
        stf(dlogits, i, g);
    }
}

static void crossentropy_backward(moe_backend *b, moe_tensor dlogits, moe_tensor probs, moe_tensor targets,
                                  double dloss, int64_t N, int64_t V)
{
    if (N <= 0)
        return;
    int32_t *n = (int32_t *)moe_cu_scratch(b, 256, "crossentropy_backward");
    if (!n)
        return;
    k_ce_count<<<1, 1024, 0, moe_cu_stream(b)>>>(n, I32P(targets), N);
    k_ce_bwd<<<moe_cu_blocks(N * V, 256), 256, 0, moe_cu_stream(b)>>>(DP(dlogits), DP(probs), I32P(targets), n, dloss,
                                                                      N, V);
    moe_cu_check(b, "crossentropy_backward");
}

void moe_cu_crossentropy_ops(moe_backend *b)
{
    b->crossentropy_forward = crossentropy_forward;
    b->crossentropy_backward = crossentropy_backward;
}
