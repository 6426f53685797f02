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
 * target's logit before the first barrier. CACHE (rows of at most CE_NV 16-byte vectors a
 * thread, vec): the first pass keeps the row in registers and the second reads them there,
 * so the logits cross the memory bus once (a step of gpu-100m: its 16384 × 50304 bf16
 * logits, 1.6 GB). */
#define CE_T 512
#define CE_NV 16

template <typename T> __device__ __forceinline__ void ce_online(float x, float &m, float &sum)
{
    if (x > m) {
        sum = sum * expf(m - x) + 1.0f; /* expf(-inf) = 0 for the first */
        m = x;
    } else {
        sum += expf(x - m);
    }
}

template <typename T, bool CACHE>
__global__ void __launch_bounds__(CE_T) k_ce_rows(double *rowloss, T *probs, const T *logits, const int32_t *targets,
                                                  int64_t V, bool vec)
{
    __shared__ float shm[CE_T];
    __shared__ double shs[CE_T];
    const int W = vrow<T>::W;
    const int64_t t = blockIdx.x;
    const T *row = logits + t * V;
    const int32_t tg = targets[t];
    const double zt = tg >= 0 ? (double)tof<T>(row[tg]) : 0.0;
    float m = -INFINITY, sum = 0.0f;
    uint4 reg[CACHE ? CE_NV : 1];
    if (CACHE) {
#pragma unroll
        for (int u = 0; u < CE_NV; u++) {
            const int64_t q = threadIdx.x + (int64_t)u * CE_T;
            if (q < V / W) {
                reg[u] = *(const uint4 *)(row + q * W);
                const T *x = (const T *)&reg[u];
#pragma unroll
                for (int j = 0; j < W; j++)
                    ce_online<T>(tof<T>(x[j]), m, sum);
            }
        }
    } else {
        ce_each<T>(row, V, vec, [&](int64_t, float x) { ce_online<T>(x, m, sum); });
    }
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
    if (CACHE) {
#pragma unroll
        for (int u = 0; u < CE_NV; u++) {
            const int64_t q = threadIdx.x + (int64_t)u * CE_T;
            if (q < V / W) {
                const T *x = (const T *)&reg[u];
                float y[W];
#pragma unroll
                for (int j = 0; j < W; j++)
                    y[j] = expf(tof<T>(x[j]) - mx) * inv;
                vrow<T>::store(out + q * W, y);
            }
        }
    } else {
        ce_each<T>(row, V, vec, [&](int64_t j, float x) { out[j] = fromf<T>(expf(x - mx) * inv); });
    }
    if (threadIdx.x == 0)
        rowloss[t] = tg >= 0 ? -(zt - mx - log(S)) : 0.0;
}

template <typename T>
static void ce_rows(cudaStream_t st, bool cache, int64_t N, double *rl, T *pr, const T *lg, const int32_t *tg, int64_t V,
                    bool vec)
{
    if (cache)
        k_ce_rows<T, true><<<(unsigned)N, CE_T, 0, st>>>(rl, pr, lg, tg, V, vec);
    else
        k_ce_rows<T, false><<<(unsigned)N, CE_T, 0, st>>>(rl, pr, lg, tg, V, vec);
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
    const bool vec = moe_cu_rows16(pr.p, V, moe_cu_size(probs.buf->type)) && moe_cu_rows16(lg.p, V, moe_cu_size(probs.buf->type));
    cudaStream_t st = moe_cu_stream(b);
    const bool cache = vec && V * (int64_t)moe_cu_size(probs.buf->type) <= (int64_t)16 * CE_NV * CE_T;
    if (lg.t == DT_BF16)
        ce_rows<__nv_bfloat16>(st, cache, N, rl, (__nv_bfloat16 *)pr.p, (const __nv_bfloat16 *)lg.p, I32P(targets), V,
                               vec);
    else
        ce_rows<float>(st, cache, N, rl, (float *)pr.p, (const float *)lg.p, I32P(targets), V, vec);
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

/* one block per row: dlogits += s·probs, less s at the target (rows without one untouched);
 * 16 bytes of each at a time where both allow it (vec) */
template <typename T>
__global__ void k_ce_bwd(T *dlogits, const T *probs, const int32_t *targets, const int32_t *n, double dloss, int64_t V,
                         bool vec)
{
    const int W = vrow<T>::W;
    const int64_t t = blockIdx.x, o = t * V;
    const int32_t tg = targets[t];
    if (*n == 0 || tg < 0)
        return;
    const float s = (float)(dloss / (double)*n);
    int64_t j0 = 0;
    if (vec) {
        for (int64_t q = threadIdx.x; q < V / W; q += blockDim.x) {
            float d[W], p[W];
            vrow<T>::load(dlogits + o + q * W, d);
            vrow<T>::load(probs + o + q * W, p);
#pragma unroll
            for (int j = 0; j < W; j++) {
                d[j] += s * p[j];
                if (q * W + j == tg)
                    d[j] -= s;
            }
            vrow<T>::store(dlogits + o + q * W, d);
        }
        j0 = V / W * W;
    }
    for (int64_t j = j0 + threadIdx.x; j < V; j += blockDim.x) {
        float g = tof<T>(dlogits[o + j]) + s * tof<T>(probs[o + j]);
        if (j == tg)
            g -= s;
        dlogits[o + j] = fromf<T>(g);
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
    const dptr d = DP(dlogits), p = DP(probs);
    if (d.t != p.t) {
        moe_backend_fail(b, "crossentropy_backward", MOE_ERR_ARG, "gradient and probabilities of two types");
        return;
    }
    const size_t es = moe_cu_size(dlogits.buf->type);
    const bool vec = moe_cu_rows16(d.p, V, es) && moe_cu_rows16(p.p, V, es);
    cudaStream_t st = moe_cu_stream(b);
    if (d.t == DT_BF16)
        k_ce_bwd<__nv_bfloat16><<<(unsigned)N, 512, 0, st>>>((__nv_bfloat16 *)d.p, (const __nv_bfloat16 *)p.p,
                                                             I32P(targets), n, dloss, V, vec);
    else
        k_ce_bwd<float><<<(unsigned)N, 512, 0, st>>>((float *)d.p, (const float *)p.p, I32P(targets), n, dloss, V, vec);
    moe_cu_check(b, "crossentropy_backward");
}

void moe_cu_crossentropy_ops(moe_backend *b)
{
    b->crossentropy_forward = crossentropy_forward;
    b->crossentropy_backward = crossentropy_backward;
}
