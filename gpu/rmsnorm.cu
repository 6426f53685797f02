/*
 * RMSNorm with a learned gain on the device; row sums in double, in a fixed order
 * (src/cpu/rmsnorm.c). A warp per row, eight rows a block: the rows are short (C in the
 * hundreds to a few thousand), so a warp's shuffles reduce them without block barriers.
 * Where the row tensors share the type T and their rows are 16-byte aligned (vec), lanes
 * move 16 bytes at a time; else one element, through ldf/stf.
 */
#include "gpu/cuda.h"

#define RMS_ROWS 8

/* f(c, x[W], W) over the lane's share of row o of a (W = 16 bytes of T when vec, else 1) */
template <typename T, typename F> __device__ __forceinline__ void rms_each(dptr a, int64_t o, int64_t C, bool vec, F f)
{
    const int lane = threadIdx.x & 31, W = vrow<T>::W;
    if (vec) {
        for (int64_t q = lane; q < C / W; q += 32) {
            float v[W];
            vrow<T>::load((const T *)a.p + o + q * W, v);
            f(q * W, v, W);
        }
    } else {
        for (int64_t c = lane; c < C; c += 32) {
            float v[1] = {ldf(a, o + c)};
            f(c, v, 1);
        }
    }
}

template <typename T> __global__ void k_rms_fwd(dptr out, dptr rstd, dptr x, dptr w, double eps, int64_t N, int64_t C,
                                                bool vec)
{
    const int64_t t = (int64_t)blockIdx.x * RMS_ROWS + (threadIdx.x >> 5), o = t * C;
    if (t >= N)
        return;
    double ss = 0;
    rms_each<T>(x, o, C, vec, [&](int64_t, const float *v, int n) {
        for (int j = 0; j < n; j++)
            ss += (double)v[j] * v[j];
    });
    ss = warp_sum(ss);
    const float r = (float)(1.0 / sqrt(ss / (double)C + eps));
    if ((threadIdx.x & 31) == 0)
        stf(rstd, t, r);
    rms_each<T>(x, o, C, vec, [&](int64_t c, const float *v, int n) {
        float y[vrow<T>::W];
        for (int j = 0; j < n; j++)
            y[j] = v[j] * r * ldf(w, c + j);
        if (n > 1)
            vrow<T>::store((T *)out.p + o + c, y);
        else
            stf(out, o + c, y[0]);
    });
}

static bool rows16(dptr a, int64_t C, int t)
{
    return a.t == t && moe_cu_rows16(a.p, C, t == DT_BF16 ? 2 : 4);
}

static void rmsnorm_forward(moe_backend *b, moe_tensor out, moe_tensor rstd, moe_tensor x, moe_tensor w, double eps,
                            int64_t N, int64_t C)
{
    if (N <= 0 || C <= 0)
        return;
    const dptr X = DP(x), O = DP(out);
    const bool vec = rows16(X, C, X.t) && rows16(O, C, X.t);
    const unsigned blocks = (unsigned)((N + RMS_ROWS - 1) / RMS_ROWS);
    if (X.t == DT_BF16)
        k_rms_fwd<__nv_bfloat16><<<blocks, 32 * RMS_ROWS, 0, moe_cu_stream(b)>>>(O, DP(rstd), X, DP(w), eps, N, C, vec);
    else
        k_rms_fwd<float><<<blocks, 32 * RMS_ROWS, 0, moe_cu_stream(b)>>>(O, DP(rstd), X, DP(w), eps, N, C, vec);
    moe_cu_check(b, "rmsnorm_forward");
}

/* dx += r·w·dout − (r³·Σ w·dout·x / C)·x, a warp per row; the lane reads its dout and x again
 * for the second pass (L1 holds them) */
template <typename T> __global__ void k_rms_dx(dptr dx, dptr dout, dptr x, dptr w, dptr rstd, int64_t N, int64_t C,
                                               bool vec)
{
    const int64_t t = (int64_t)blockIdx.x * RMS_ROWS + (threadIdx.x >> 5), o = t * C;
    if (t >= N)
        return;
    const int W = vrow<T>::W;
    const double r = ldf(rstd, t);
    double dot = 0;
    rms_each<T>(dout, o, C, vec, [&](int64_t c, const float *g, int n) {
        float xv[W];
        if (n > 1)
            vrow<T>::load((const T *)x.p + o + c, xv);
        else
            xv[0] = ldf(x, o + c);
        for (int j = 0; j < n; j++)
            dot += (double)(ldf(w, c + j) * g[j]) * xv[j];
    });
    dot = warp_sum(dot);
    const float k = (float)(r * r * r * dot / (double)C), rf = (float)r;
    rms_each<T>(dout, o, C, vec, [&](int64_t c, const float *g, int n) {
        float xv[W], d[W];
        if (n > 1) {
            vrow<T>::load((const T *)x.p + o + c, xv);
            vrow<T>::load((const T *)dx.p + o + c, d);
        } else {
            xv[0] = ldf(x, o + c);
            d[0] = ldf(dx, o + c);
        }
        for (int j = 0; j < n; j++)
            d[j] = d[j] + rf * ldf(w, c + j) * g[j] - k * xv[j];
        if (n > 1)
            vrow<T>::store((T *)dx.p + o + c, d);
        else
            stf(dx, o + c, d[0]);
    });
}

/* Partial column sums of dout·x·r over MOE_CU_RB fixed row ranges: grid (column blocks of
 * 64, RB), four row groups of 64 columns a block, each summing every fourth row of the range;
 * the groups are added in order. */
__global__ void __launch_bounds__(256) k_rms_dw_part(double *part, dptr dout, dptr x, dptr rstd, int64_t N, int64_t C)
{
    __shared__ double sh[4][64];
    const int64_t c = (int64_t)blockIdx.x * 64 + (threadIdx.x & 63), rb = blockIdx.y;
    const int grp = threadIdx.x >> 6;
    double acc = 0;
    if (c < C)
        for (int64_t t = N * rb / MOE_CU_RB + grp; t < N * (rb + 1) / MOE_CU_RB; t += 4)
            acc += (double)(ldf(dout, t * C + c) * ldf(x, t * C + c) * ldf(rstd, t));
    sh[grp][threadIdx.x & 63] = acc;
    __syncthreads();
    if (grp == 0 && c < C)
        part[rb * C + c] = ((sh[0][threadIdx.x] + sh[1][threadIdx.x]) + sh[2][threadIdx.x]) + sh[3][threadIdx.x];
}

__global__ void k_colparts_add(dptr dst, const double *part, int64_t C)
{
    CU_LOOP(c, C)
    {
        double s = 0;
        for (int rb = 0; rb < MOE_CU_RB; rb++)
            s += part[rb * C + c];
        stf(dst, c, ldf(dst, c) + (float)s);
    }
}

static void rmsnorm_backward(moe_backend *b, moe_tensor *dx, moe_tensor *dw, moe_tensor dout, moe_tensor x,
                             moe_tensor w, moe_tensor rstd, int64_t N, int64_t C)
{
    if (N <= 0 || C <= 0)
        return;
    cudaStream_t s = moe_cu_stream(b);
    if (dx) {
        const dptr X = DP(x), G = DP(dout), D = DP(*dx);
        const bool vec = rows16(X, C, X.t) && rows16(G, C, X.t) && rows16(D, C, X.t);
        const unsigned blocks = (unsigned)((N + RMS_ROWS - 1) / RMS_ROWS);
        if (X.t == DT_BF16)
            k_rms_dx<__nv_bfloat16><<<blocks, 32 * RMS_ROWS, 0, s>>>(D, G, X, DP(w), DP(rstd), N, C, vec);
        else
            k_rms_dx<float><<<blocks, 32 * RMS_ROWS, 0, s>>>(D, G, X, DP(w), DP(rstd), N, C, vec);
    }
    if (dw) {
        double *part = (double *)moe_cu_scratch(b, (size_t)(MOE_CU_RB * C) * sizeof(double), "rmsnorm_backward");
        if (!part)
            return;
        dim3 grid((unsigned)((C + 63) / 64), MOE_CU_RB);
        k_rms_dw_part<<<grid, 256, 0, s>>>(part, DP(dout), DP(x), DP(rstd), N, C);
        k_colparts_add<<<moe_cu_blocks(C, 256), 256, 0, s>>>(DP(*dw), part, C);
    }
    moe_cu_check(b, "rmsnorm_backward");
}

void moe_cu_rmsnorm_ops(moe_backend *b)
{
    b->rmsnorm_forward = rmsnorm_forward;
    b->rmsnorm_backward = rmsnorm_backward;
}
