/*
 * AdamW on the device (src/cpu/adamw.c's fp32 arithmetic) with fp32 master weights and
 * moments beside bf16 parameters, the gradient norm summed in double over a fixed grid and
 * then in a fixed tree (the same bits on every run), and the clipping factor computed on
 * the device, so that a step never waits for the host.
 */
#include "gpu/cuda.h"

/* a fixed grid of 1024 blocks (eight per SM and more): enough loads in flight to stream a
 * billion-element gradient at the memory's rate (256 blocks of scalar loads ran 10x slower) */
#define NORM_BLOCKS 1024

/* Σ g² of the elements this thread owns, in double: 16 bytes at a time where g allows (vec) */
template <typename T> __device__ double sumsq_own(const T *g, int64_t n, bool vec)
{
    const int W = vrow<T>::W;
    const int64_t stride = (int64_t)blockDim.x * gridDim.x;
    int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x, i0 = 0;
    double acc = 0;
    if (vec) {
        for (int64_t q = i; q < n / W; q += stride) {
            float v[W];
            vrow<T>::load(g + q * W, v);
#pragma unroll
            for (int j = 0; j < W; j++)
                acc += (double)v[j] * v[j];
        }
        i0 = n / W * W;
    }
    for (int64_t k = i0 + i; k < n; k += stride) {
        const double v = tof<T>(g[k]);
        acc += v * v;
    }
    return acc;
}

template <typename T> __global__ void k_sumsq_part(double *part, const T *g, int64_t n, bool vec)
{
    __shared__ double sh[256];
    const double acc = block_sum(sumsq_own<T>(g, n, vec), sh);
    if (threadIdx.x == 0)
        part[blockIdx.x] = acc;
}

/* acc[0] += Σ part: the running sum stays f32 between tensors, each tensor's own is double */
__global__ void __launch_bounds__(NORM_BLOCKS) k_sumsq_final(dptr acc, const double *part)
{
    __shared__ double sh[NORM_BLOCKS];
    const double s = block_sum(part[threadIdx.x], sh);
    if (threadIdx.x == 0)
        stf(acc, 0, (float)((double)ldf(acc, 0) + s));
}

static void grad_sumsq(moe_backend *b, moe_tensor acc, moe_tensor g, int64_t n)
{
    if (n <= 0)
        return;
    double *part = (double *)moe_cu_scratch(b, NORM_BLOCKS * sizeof(double), "grad_sumsq");
    if (!part)
        return;
    const dptr G = DP(g);
    const bool vec = moe_cu_aligned16(G.p);
    cudaStream_t st = moe_cu_stream(b);
    if (G.t == DT_BF16)
        k_sumsq_part<__nv_bfloat16><<<NORM_BLOCKS, 256, 0, st>>>(part, (const __nv_bfloat16 *)G.p, n, vec);
    else
        k_sumsq_part<float><<<NORM_BLOCKS, 256, 0, st>>>(part, (const float *)G.p, n, vec);
    k_sumsq_final<<<1, NORM_BLOCKS, 0, st>>>(DP(acc), part);
    moe_cu_check(b, "grad_sumsq");
}

__global__ void k_clip(dptr scale, dptr sumsq, double gs, double max_norm)
{
    if (threadIdx.x || blockIdx.x)
        return;
    const double s2 = gs * gs * (double)ldf(sumsq, 0);
    double c = 1.0;
    if (max_norm > 0) {
        const double r = max_norm / (sqrt(s2) + 1e-6);
        c = r < 1.0 ? r : 1.0;
    }
    stf(scale, 0, isfinite(s2) ? (float)(gs * c) : __int_as_float(0x7fc00000));
}

static void clip_scale(moe_backend *b, moe_tensor scale, moe_tensor sumsq, double grad_scale, double max_norm)
{
    k_clip<<<1, 1, 0, moe_cu_stream(b)>>>(DP(scale), DP(sumsq), grad_scale, max_norm);
    moe_cu_check(b, "clip_scale");
}

struct adam_args {
    dptr p, master, m, v, g, scale;
    float b1, b2, a1, a2, ib1, ib2, lr, eps, wd;
    int64_t n;
};

__global__ void k_adamw(adam_args a)
{
    const float sc = ldf(a.scale, 0);
    if (!isfinite(sc)) /* a non-finite gradient norm: the step is skipped, the host reports it */
        return;
    const dptr w = a.master.p ? a.master : a.p;
    CU_LOOP(i, a.n)
    {
        const float gi = ldf(a.g, i) * sc;
        const float mi = a.b1 * ldf(a.m, i) + a.a1 * gi, vi = a.b2 * ldf(a.v, i) + a.a2 * gi * gi;
        stf(a.m, i, mi);
        stf(a.v, i, vi);
        const float wi = ldf(w, i);
        const float nw = wi - a.lr * ((mi * a.ib1) / (sqrtf(vi * a.ib2) + a.eps) + a.wd * wi);
        stf(w, i, nw);
        if (a.master.p)
            stf(a.p, i, nw);
    }
}

static void adamw_step(moe_backend *b, moe_tensor p, moe_tensor *master, moe_tensor m, moe_tensor v, moe_tensor g,
                       moe_tensor scale, double lr, double beta1, double beta2, double eps, double wd, int64_t t,
                       int64_t n)
{
    if (n <= 0)
        return;
    const double bc1 = 1.0 - pow(beta1, (double)t), bc2 = 1.0 - pow(beta2, (double)t);
    adam_args a;
    a.p = DP(p);
    a.master = DPOPT(master);
    a.m = DP(m);
    a.v = DP(v);
    a.g = DP(g);
    a.scale = DP(scale);
    a.b1 = (float)beta1;
    a.b2 = (float)beta2;
    a.a1 = (float)(1.0 - beta1);
    a.a2 = (float)(1.0 - beta2);
    a.ib1 = (float)(1.0 / bc1);
    a.ib2 = (float)(1.0 / bc2);
    a.lr = (float)lr;
    a.eps = (float)eps;
    a.wd = (float)wd;
    a.n = n;
    k_adamw<<<moe_cu_blocks(n, 256), 256, 0, moe_cu_stream(b)>>>(a);
    moe_cu_check(b, "adamw_step");
}

void moe_cu_adamw_ops(moe_backend *b)
{
    b->grad_sumsq = grad_sumsq;
    b->clip_scale = clip_scale;
    b->adamw_step = adamw_step;
}
