/*
 * The router ops on the device: Switch's jitter, softmax / sigmoid scores, noisy gating and
 * its smooth load — ref/router.c's definitions and src/cpu/router.c's fp32 arithmetic, with
 * the same Philox draws (rng.cuh) keyed by (token, draw). The router GEMM is matmul_forward.
 * Each sum that decides nothing discrete is a fixed tree (no atomics).
 */
#include "gpu/cuda.h"
#include "gpu/rng.cuh"

__device__ __forceinline__ float softplusf_(float x)
{
    return x > 0.0f ? x + log1pf(expf(-x)) : log1pf(expf(x));
}

__device__ __forceinline__ float sigmoidf_(float x)
{
    if (x >= 0.0f)
        return 1.0f / (1.0f + expf(-x));
    const float ex = expf(x);
    return ex / (1.0f + ex);
}

__global__ void k_jitter(dptr xr, dptr u, dptr x, double eps, uint64_t seed, uint32_t stream, uint32_t step,
                         uint32_t token0, int64_t T, int64_t d)
{
    CU_LOOP(i, T * d)
    {
        const int64_t t = i / d, c = i % d;
        const double r = rng_uniform(seed, stream, step, token0 + (uint32_t)t, (uint32_t)c);
        const float ui = (float)(1.0 - eps + 2.0 * eps * r);
        stf(u, i, ui);
        stf(xr, i, ldf(x, i) * ui);
    }
}

static void cu_jitter_forward(moe_backend *b, moe_tensor xr, moe_tensor u, moe_tensor x, double eps, uint64_t seed,
                              int64_t layer, moe_key key, int64_t T, int64_t d)
{
    if (T * d <= 0)
        return;
    k_jitter<<<moe_cu_blocks(T * d, 256), 256, 0, moe_cu_stream(b)>>>(
        DP(xr), DP(u), DP(x), eps, seed, moe_rng_stream(MOE_RNG_JITTER, layer, key), (uint32_t)key.step, key.token0,
        T, d);
    moe_cu_check(b, "jitter_forward");
}

__global__ void k_mul_add(dptr dx, dptr g, dptr u, int64_t n)
{
    CU_LOOP(i, n)
    stf(dx, i, ldf(dx, i) + ldf(g, i) * ldf(u, i));
}

static void cu_jitter_backward(moe_backend *b, moe_tensor dx, moe_tensor dxr, moe_tensor u, int64_t T, int64_t d)
{
    if (T * d <= 0)
        return;
    k_mul_add<<<moe_cu_blocks(T * d, 256), 256, 0, moe_cu_stream(b)>>>(DP(dx), DP(dxr), DP(u), T * d);
    moe_cu_check(b, "jitter_backward");
}

/* one thread per row: E is at most a few hundred */
__global__ void k_softmax_rows(dptr s, dptr h, int64_t T, int64_t E)
{
    CU_LOOP(t, T)
    {
        const int64_t o = t * E;
        float m = ldf(h, o);
        for (int64_t e = 1; e < E; e++)
            m = fmaxf(m, ldf(h, o + e));
        float sum = 0.0f;
        for (int64_t e = 0; e < E; e++)
            sum += expf(ldf(h, o + e) - m);
        const float inv = 1.0f / sum;
        for (int64_t e = 0; e < E; e++)
            stf(s, o + e, expf(ldf(h, o + e) - m) * inv);
    }
}

__global__ void k_sigmoid(dptr s, dptr h, int64_t n)
{
    CU_LOOP(i, n)
    stf(s, i, sigmoidf_(ldf(h, i)));
}

static void cu_scores_forward(moe_backend *b, moe_tensor s, moe_tensor h, moe_score_fn fn, int64_t T, int64_t E)
{
    if (T * E <= 0)
        return;
    if (fn == MOE_SCORE_SIGMOID)
        k_sigmoid<<<moe_cu_blocks(T * E, 256), 256, 0, moe_cu_stream(b)>>>(DP(s), DP(h), T * E);
    else
        k_softmax_rows<<<moe_cu_blocks(T, 128), 128, 0, moe_cu_stream(b)>>>(DP(s), DP(h), T, E);
    moe_cu_check(b, "scores_forward");
}

__global__ void k_softmax_bwd(dptr dh, dptr ds, dptr s, int64_t T, int64_t E)
{
    CU_LOOP(t, T)
    {
        const int64_t o = t * E;
        float dot = 0.0f;
        for (int64_t e = 0; e < E; e++)
            dot += ldf(ds, o + e) * ldf(s, o + e);
        for (int64_t e = 0; e < E; e++)
            stf(dh, o + e, ldf(dh, o + e) + ldf(s, o + e) * (ldf(ds, o + e) - dot));
    }
}

__global__ void k_sigmoid_bwd(dptr dh, dptr ds, dptr s, int64_t n)
{
    CU_LOOP(i, n)
    {
        const float si = ldf(s, i);
        stf(dh, i, ldf(dh, i) + ldf(ds, i) * si * (1.0f - si));
    }
}

static void cu_scores_backward(moe_backend *b, moe_tensor dh, moe_tensor ds, moe_tensor s, moe_score_fn fn,
                               int64_t T, int64_t E)
{
    if (T * E <= 0)
        return;
    if (fn == MOE_SCORE_SIGMOID)
        k_sigmoid_bwd<<<moe_cu_blocks(T * E, 256), 256, 0, moe_cu_stream(b)>>>(DP(dh), DP(ds), DP(s), T * E);
    else
        k_softmax_bwd<<<moe_cu_blocks(T, 128), 128, 0, moe_cu_stream(b)>>>(DP(dh), DP(ds), DP(s), T, E);
    moe_cu_check(b, "scores_backward");
}

__global__ void k_noisy(dptr h, dptr eps, dptr z, dptr zn, int training, uint64_t seed, uint32_t stream,
                        uint32_t step, uint32_t token0, int64_t T, int64_t E)
{
    CU_LOOP(i, T * E)
    {
        const int64_t t = i / E, e = i % E;
        const float ei = training ? (float)rng_normal(seed, stream, step, token0 + (uint32_t)t, (uint32_t)e) : 0.0f;
        stf(eps, i, ei);
        stf(h, i, ldf(z, i) + ei * softplusf_(ldf(zn, i)));
    }
}

static void cu_noisy_logits_forward(moe_backend *b, moe_tensor h, moe_tensor eps, moe_tensor z, moe_tensor zn,
                                    int training, uint64_t seed, int64_t layer, moe_key key, int64_t T, int64_t E)
{
    if (T * E <= 0)
        return;
    k_noisy<<<moe_cu_blocks(T * E, 256), 256, 0, moe_cu_stream(b)>>>(
        DP(h), DP(eps), DP(z), DP(zn), training, seed, moe_rng_stream(MOE_RNG_NOISE, layer, key), (uint32_t)key.step,
        key.token0, T, E);
    moe_cu_check(b, "noisy_logits_forward");
}

__global__ void k_noisy_bwd(dptr gz, dptr gzn, dptr g, dptr eps, dptr zn, int64_t n)
{
    CU_LOOP(i, n)
    {
        const float gi = ldf(g, i);
        if (gz.p)
            stf(gz, i, ldf(gz, i) + gi);
        if (gzn.p)
            stf(gzn, i, ldf(gzn, i) + gi * ldf(eps, i) * sigmoidf_(ldf(zn, i)));
    }
}

static void cu_noisy_logits_backward(moe_backend *b, moe_tensor *dz, moe_tensor *dzn, moe_tensor dh, moe_tensor eps,
                                     moe_tensor zn, int64_t T, int64_t E)
{
    if (T * E <= 0 || (!dz && !dzn))
        return;
    k_noisy_bwd<<<moe_cu_blocks(T * E, 256), 256, 0, moe_cu_stream(b)>>>(DPOPT(dz), DPOPT(dzn), DP(dh), DP(eps),
                                                                         DP(zn), T * E);
    moe_cu_check(b, "noisy_logits_backward");
}

/* ---- the smooth load (Shazeer): thresholds per token, then a fixed-order sum per expert ---- */

#define MAX_K 32

/* The first min(k + 1, E) experts of row ht by repeated argmax (ties to the lower index):
 * sel[0..k) is the top k, sel[k] the (k+1)-th. Returns how many were picked. */
__device__ int row_picks(int32_t *sel, dptr h, int64_t o, int64_t E, int64_t k)
{
    const int64_t n = k + 1 < E ? k + 1 : E;
    for (int64_t r = 0; r < n; r++) {
        int64_t best = -1;
        float bv = 0.0f;
        for (int64_t e = 0; e < E; e++) {
            bool taken = false;
            for (int64_t q = 0; q < r; q++)
                taken |= sel[q] == e;
            const float v = ldf(h, o + e);
            if (!taken && (best < 0 || v > bv)) {
                best = e;
                bv = v;
            }
        }
        sel[r] = (int32_t)best;
    }
    return (int)n;
}

/* the threshold expert of e: the (k+1)-th for a member of the top k, the k-th otherwise; -1 when k >= E */
__device__ __forceinline__ int64_t thr_of(const int32_t *sel, int64_t e, int64_t E, int64_t k)
{
    if (k >= E)
        return -1;
    for (int64_t q = 0; q < k; q++)
        if (sel[q] == e)
            return sel[k];
    return sel[k - 1];
}

__global__ void k_load_picks(int32_t *sel, dptr h, int64_t T, int64_t E, int64_t k)
{
    CU_LOOP(t, T)
    row_picks(sel + t * (k + 1), h, t * E, E, k);
}

__device__ __forceinline__ double norm_cdf_(double x)
{
    return 0.5 * erfc(-x * 0.70710678118654752440);
}

__device__ __forceinline__ double norm_pdf_(double x)
{
    return 0.39894228040143267794 * exp(-0.5 * x * x);
}

/* one block per expert */
__global__ void k_load_sum(dptr load, const int32_t *sel, dptr z, dptr zn, dptr h, int64_t T, int64_t E, int64_t k)
{
    __shared__ double sh[256];
    const int64_t e = blockIdx.x;
    double acc = 0;
    for (int64_t t = threadIdx.x; t < T; t += blockDim.x) {
        const int64_t i = t * E + e, j = thr_of(sel + t * (k + 1), e, E, k);
        acc += j < 0 ? 1.0 : norm_cdf_(((double)ldf(z, i) - ldf(h, t * E + j)) / softplusf_(ldf(zn, i)));
    }
    acc = block_sum(acc, sh);
    if (threadIdx.x == 0)
        stf(load, e, (float)acc);
}

size_t moe_cu_router_scratch(const moe_workload *w)
{
    if (!w->layer)
        return 0;
    const int64_t k = w->layer->top_k < MAX_K ? w->layer->top_k : MAX_K;
    return (size_t)(w->tokens * (k + 1)) * sizeof(int32_t) + 256;
}

static int check_k(moe_backend *b, const char *op, int64_t k)
{
    if (k >= 1 && k <= MAX_K)
        return 1;
    moe_backend_fail(b, op, MOE_ERR_ARG, "top_k = %lld: the cuda backend's noisy load takes 1 to %d", (long long)k,
                     MAX_K);
    return 0;
}

static void cu_noisy_load_forward(moe_backend *b, moe_tensor load, moe_tensor z, moe_tensor zn, moe_tensor h,
                                  int64_t k, int64_t T, int64_t E)
{
    if (T <= 0 || E <= 0 || !check_k(b, "noisy_load_forward", k))
        return;
    int32_t *sel = (int32_t *)moe_cu_scratch(b, (size_t)(T * (k + 1)) * sizeof(int32_t), "noisy_load_forward");
    if (!sel)
        return;
    k_load_picks<<<moe_cu_blocks(T, 128), 128, 0, moe_cu_stream(b)>>>(sel, DP(h), T, E, k);
    k_load_sum<<<(unsigned)E, 256, 0, moe_cu_stream(b)>>>(DP(load), sel, DP(z), DP(zn), DP(h), T, E, k);
    moe_cu_check(b, "noisy_load_forward");
}

/* one thread per token: its row's writes (gh[t, j] from several e) stay in one thread, in order */
__global__ void k_load_bwd(dptr gz, dptr gzn, dptr gh, dptr dl, dptr z, dptr zn, dptr h, int64_t T, int64_t E,
                           int64_t k)
{
    CU_LOOP(t, T)
    {
        int32_t sel[MAX_K + 1];
        row_picks(sel, h, t * E, E, k);
        for (int64_t e = 0; e < E; e++) {
            const int64_t i = t * E + e, j = thr_of(sel, e, E, k);
            if (j < 0)
                continue;
            const double sd = softplusf_(ldf(zn, i)), a = (double)ldf(z, i) - ldf(h, t * E + j);
            const double g = ldf(dl, e) * norm_pdf_(a / sd) / sd;
            if (gz.p)
                stf(gz, i, ldf(gz, i) + (float)g);
            if (gh.p)
                stf(gh, t * E + j, ldf(gh, t * E + j) - (float)g);
            if (gzn.p)
                stf(gzn, i, ldf(gzn, i) - (float)(g * a / sd * sigmoidf_(ldf(zn, i))));
        }
    }
}

static void cu_noisy_load_backward(moe_backend *b, moe_tensor *dz, moe_tensor *dzn, moe_tensor *dh, moe_tensor dload,
                                   moe_tensor z, moe_tensor zn, moe_tensor h, int64_t k, int64_t T, int64_t E)
{
    if (T <= 0 || E <= 0 || !check_k(b, "noisy_load_backward", k))
        return;
    k_load_bwd<<<moe_cu_blocks(T, 64), 64, 0, moe_cu_stream(b)>>>(DPOPT(dz), DPOPT(dzn), DPOPT(dh), DP(dload), DP(z),
                                                                   DP(zn), DP(h), T, E, k);
    moe_cu_check(b, "noisy_load_backward");
}

void moe_cu_router_ops(moe_backend *b)
{
    b->jitter_forward = cu_jitter_forward;
    b->jitter_backward = cu_jitter_backward;
    b->scores_forward = cu_scores_forward;
    b->scores_backward = cu_scores_backward;
    b->noisy_logits_forward = cu_noisy_logits_forward;
    b->noisy_logits_backward = cu_noisy_logits_backward;
    b->noisy_load_forward = cu_noisy_load_forward;
    b->noisy_load_backward = cu_noisy_load_backward;
}
