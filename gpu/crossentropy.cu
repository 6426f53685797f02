/* Softmax cross-entropy of the LM head on the device, PyTorch's ignore_index = −1
 * (src/cpu/crossentropy.c): per-row losses in double, then one fixed-order sum. */
#include "gpu/cuda.h"

/* f(j, x) over the row's elements [0, V) that this thread owns: 16 bytes at a time where the
 * rows allow it (vec), else one element at a time */
template <typename T, typename F> __device__ __forceinline__ void ce_each(const T *row, int64_t V, bool vec, F f)
{
    const int W = vrow<T>::W;
    if (vec) {
        for (int64_t q = threadIdx.x; q < V / W; q += blockDim.x) {
            float x[W];
            vrow<T>::load(row + q * W, x);
#pragma unroll
            for (int j = 0; j < W; j++)
                f(q * W + j, x[j]);
        }
    } else {
        for (int64_t j = threadIdx.x; j < V; j += blockDim.x)
            f(j, tof<T>(row[j]));
    }
}

/* One block per row: the row's maximum and sum of exponentials in one pass over the logits
 * (each thread keeps its own running maximum, rescaling its sum when it grows), combined in
 * a fixed order in double; then the probabilities in a second pass. probs may alias logits:
 * every element is read before it is written, by the thread that writes it, and the
 * target's logit before the first barrier. */
template <typename T>
__global__ void __launch_bounds__(512) k_ce_rows(double *rowloss, T *probs, const T *logits, const int32_t *targets,
                                                 int64_t V, bool vec)
{
    __shared__ float shm[512];
    __shared__ double shs[512];
    const int64_t t = blockIdx.x;
    const T *row = logits + t * V;
    const int32_t tg = targets[t];
    const double zt = tg >= 0 ? (double)tof<T>(row[tg]) : 0.0;
    float m = -INFINITY, sum = 0.0f;
    ce_each<T>(row, V, vec, [&](int64_t, float x) {
        if (x > m) {
            sum = sum * expf(m - x) + 1.0f; /* expf(-inf) = 0 for the first */
            m = x;
        } else {
            sum += expf(x - m);
        }
    });
    shm[threadIdx.x] = m;
    __syncthreads();
    for (unsigned s = blockDim.x / 2; s > 0; s >>= 1) {
        if (threadIdx.x < s)
            shm[threadIdx.x] = fmaxf(shm[threadIdx.x], shm[threadIdx.x + s]);
        __syncthreads();
    }
    const float mx = shm[0];
    const double S = block_sum(m == -INFINITY ? 0.0 : (double)sum * exp((double)(m - mx)), shs);
    const float inv = (float)(1.0 / S);
    T *out = probs + t * V;
    ce_each<T>(row, V, vec, [&](int64_t j, float x) { out[j] = fromf<T>(expf(x - mx) * inv); });
    if (threadIdx.x == 0)
        rowloss[t] = tg >= 0 ? -(zt - mx - log(S)) : 0.0;
}

static bool rows_vec(const void *p, int64_t V, size_t es)
{
    return ((uintptr_t)p & 15) == 0 && (V * (int64_t)es) % 16 == 0;
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
    const dptr pr = DP(probs), lg = DP(logits);
    if (pr.t != lg.t) {
        moe_backend_fail(b, "crossentropy_forward", MOE_ERR_ARG, "probabilities and logits of two types");
        return;
    }
    const bool vec = rows_vec(pr.p, V, moe_cu_size(probs.buf->type)) && rows_vec(lg.p, V, moe_cu_size(probs.buf->type));
    if (lg.t == DT_BF16)
        k_ce_rows<__nv_bfloat16><<<(unsigned)N, 512, 0, moe_cu_stream(b)>>>(rl, (__nv_bfloat16 *)pr.p,
                                                                            (const __nv_bfloat16 *)lg.p, I32P(targets), V,
                                                                            vec);
    else
        k_ce_rows<float><<<(unsigned)N, 512, 0, moe_cu_stream(b)>>>(rl, (float *)pr.p, (const float *)lg.p,
                                                                    I32P(targets), V, vec);
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

/* one block per row: dlogits += s·probs, less s at the target (rows without one untouched) */
__global__ void k_ce_bwd(dptr dlogits, dptr probs, const int32_t *targets, const int32_t *n, double dloss, int64_t V)
{
    const int64_t t = blockIdx.x, o = t * V;
    const int32_t tg = targets[t];
    if (*n == 0 || tg < 0)
        return;
    const float s = (float)(dloss / (double)*n);
    for (int64_t j = threadIdx.x; j < V; j += blockDim.x) {
        float g = ldf(dlogits, o + j) + s * ldf(probs, o + j);
        if (j == tg)
            g -= s;
        stf(dlogits, o + j, g);
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
    k_ce_bwd<<<(unsigned)N, 512, 0, moe_cu_stream(b)>>>(DP(dlogits), DP(probs), I32P(targets), n, dloss, V);
    moe_cu_check(b, "crossentropy_backward");
}

void moe_cu_crossentropy_ops(moe_backend *b)
{
    b->crossentropy_forward = crossentropy_forward;
    b->crossentropy_backward = crossentropy_backward;
}
