/* RMSNorm with a learned gain on the device; row sums in double, fixed trees (src/cpu/rmsnorm.c). */
#include "gpu/cuda.h"

/* one block per row */
__global__ void k_rms_fwd(dptr out, dptr rstd, dptr x, dptr w, double eps, int64_t C)
{
    __shared__ double sh[256];
    const int64_t t = blockIdx.x, o = t * C;
    double ss = 0;
    for (int64_t c = threadIdx.x; c < C; c += blockDim.x) {
        const double v = ldf(x, o + c);
        ss += v * v;
    }
    ss = block_sum(ss, sh);
    const float r = (float)(1.0 / sqrt(ss / (double)C + eps));
    if (threadIdx.x == 0)
        stf(rstd, t, r);
    for (int64_t c = threadIdx.x; c < C; c += blockDim.x)
        stf(out, o + c, ldf(x, o + c) * r * ldf(w, c));
}

static void rmsnorm_forward(moe_backend *b, moe_tensor out, moe_tensor rstd, moe_tensor x, moe_tensor w, double eps,
                            int64_t N, int64_t C)
{
    if (N <= 0 || C <= 0)
        return;
    k_rms_fwd<<<(unsigned)N, 256, 0, moe_cu_stream(b)>>>(DP(out), DP(rstd), DP(x), DP(w), eps, C);
    moe_cu_check(b, "rmsnorm_forward");
}

__global__ void k_rms_dx(dptr dx, dptr dout, dptr x, dptr w, dptr rstd, int64_t C)
{
    __shared__ double sh[256];
    const int64_t t = blockIdx.x, o = t * C;
    const double r = ldf(rstd, t);
    double dot = 0;
    for (int64_t c = threadIdx.x; c < C; c += blockDim.x)
        dot += (double)(ldf(w, c) * ldf(dout, o + c)) * ldf(x, o + c);
    dot = block_sum(dot, sh);
    const float k = (float)(r * r * r * dot / (double)C), rf = (float)r;
    for (int64_t c = threadIdx.x; c < C; c += blockDim.x)
        stf(dx, o + c, ldf(dx, o + c) + rf * ldf(w, c) * ldf(dout, o + c) - k * ldf(x, o + c));
}

/* partial column sums over MOE_CU_RB fixed row ranges: grid (column blocks, RB) */
__global__ void k_rms_dw_part(double *part, dptr dout, dptr x, dptr rstd, int64_t N, int64_t C)
{
    const int64_t c = (int64_t)blockIdx.x * blockDim.x + threadIdx.x, rb = blockIdx.y;
    if (c >= C)
        return;
    double acc = 0;
    for (int64_t t = N * rb / MOE_CU_RB; t < N * (rb + 1) / MOE_CU_RB; t++)
        acc += (double)(ldf(dout, t * C + c) * ldf(x, t * C + c) * ldf(rstd, t));
    part[rb * C + c] = acc;
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
    if (dx)
        k_rms_dx<<<(unsigned)N, 256, 0, s>>>(DP(*dx), DP(dout), DP(x), DP(w), DP(rstd), C);
    if (dw) {
        double *part = (double *)moe_cu_scratch(b, (size_t)(MOE_CU_RB * C) * sizeof(double), "rmsnorm_backward");
        if (!part)
            return;
        dim3 grid((unsigned)((C + 127) / 128), MOE_CU_RB);
        k_rms_dw_part<<<grid, 128, 0, s>>>(part, DP(dout), DP(x), DP(rstd), N, C);
        k_colparts_add<<<moe_cu_blocks(C, 256), 256, 0, s>>>(DP(*dw), part, C);
    }
    moe_cu_check(b, "rmsnorm_backward");
}

void moe_cu_rmsnorm_ops(moe_backend *b)
{
    b->rmsnorm_forward = rmsnorm_forward;
    b->rmsnorm_backward = rmsnorm_backward;
}
