/*
 * Dispatch and combine on the device. The scatter-adds (combine, the dispatch backward)
 * are gathers through the plan's token -> rows index: one block per token adds its rows in
 * plan order, as ref/dispatch.c's sequential loop does, so no two threads ever add into one
 * element (no atomics) and the bits do not depend on scheduling. Rows past the plan's n
 * (read on the device) are left alone.
 */
#include "gpu/cuda.h"

/* one block per row of the plan */
__global__ void k_dispatch(dptr xe, dptr x, const int32_t *token, const int32_t *nd, int64_t d)
{
    const int64_t i = blockIdx.x;
    if (i >= nd[0])
        return;
    const int64_t t = token[i];
    for (int64_t c = threadIdx.x; c < d; c += blockDim.x)
        stf(xe, i * d + c, ldf(x, t * d + c));
}

static int threads_for(int64_t d)
{
    return d >= 256 ? 256 : (d >= 128 ? 128 : (d >= 64 ? 64 : 32));
}

static void cu_dispatch_forward(moe_backend *b, moe_tensor xe, moe_tensor x, const moe_bplan *p, int64_t d)
{
    if (d <= 0)
        return;
    k_dispatch<<<(unsigned)p->rows_bound, threads_for(d), 0, moe_cu_stream(b)>>>(DP(xe), DP(x), p->token, p->nd, d);
    moe_cu_check(b, "dispatch_forward");
}

/* one block per token: dx[t] += Σ over its rows in plan order */
__global__ void k_dispatch_bwd(dptr dx, dptr dxe, const int32_t *tok_off, const int32_t *tok_row, int64_t d)
{
    const int64_t t = blockIdx.x, q0 = tok_off[t], q1 = tok_off[t + 1];
    for (int64_t c = threadIdx.x; c < d; c += blockDim.x) {
        float acc = ldf(dx, t * d + c);
        for (int64_t q = q0; q < q1; q++)
            acc += ldf(dxe, (int64_t)tok_row[q] * d + c);
        stf(dx, t * d + c, acc);
    }
}

static void cu_dispatch_backward(moe_backend *b, moe_tensor dx, moe_tensor dxe, const moe_bplan *p, int64_t d)
{
    if (d <= 0 || p->T <= 0)
        return;
    k_dispatch_bwd<<<(unsigned)p->T, threads_for(d), 0, moe_cu_stream(b)>>>(DP(dx), DP(dxe), p->tok_off, p->tok_row,
                                                                            d);
    moe_cu_check(b, "dispatch_backward");
}

/* one block per token: y[t] = Σ weight·ye over its rows in plan order (0 without rows) */
__global__ void k_combine(dptr y, dptr ye, const float *weight, const int32_t *tok_off, const int32_t *tok_row,
                          int64_t d)
{
    const int64_t t = blockIdx.x, q0 = tok_off[t], q1 = tok_off[t + 1];
    for (int64_t c = threadIdx.x; c < d; c += blockDim.x) {
        float acc = 0.0f;
        for (int64_t q = q0; q < q1; q++) {
            const int64_t i = tok_row[q];
            acc += weight[i] * ldf(ye, i * d + c);
        }
        stf(y, t * d + c, acc);
    }
}

static void cu_combine_forward(moe_backend *b, moe_tensor y, moe_tensor ye, const moe_bplan *p, int64_t d)
{
    if (d <= 0 || p->T <= 0)
        return;
    k_combine<<<(unsigned)p->T, threads_for(d), 0, moe_cu_stream(b)>>>(DP(y), DP(ye), p->weight, p->tok_off,
                                                                       p->tok_row, d);
    moe_cu_check(b, "combine_forward");
}

/* one block per row: dye += w·dy[token]; dweight += dy[token]·ye (a fixed tree) */
__global__ void k_combine_bwd(dptr dye, dptr dweight, dptr dy, dptr ye, const float *weight, const int32_t *token,
                              const int32_t *nd, int64_t d)
{
    __shared__ float sh[256];
    const int64_t i = blockIdx.x;
    if (i >= nd[0])
        return;
    const int64_t t = token[i];
    const float w = weight[i];
    float acc = 0.0f;
    for (int64_t c = threadIdx.x; c < d; c += blockDim.x) {
        const float g = ldf(dy, t * d + c);
        if (dye.p)
            stf(dye, i * d + c, ldf(dye, i * d + c) + w * g);
        if (dweight.p)
            acc += g * ldf(ye, i * d + c);
    }
    if (dweight.p) {
        acc = block_sum(acc, sh);
        if (threadIdx.x == 0)
            stf(dweight, i, ldf(dweight, i) + acc);
    }
}

static void cu_combine_backward(moe_backend *b, moe_tensor dye, moe_tensor dweight, moe_tensor dy, moe_tensor ye,
                                const moe_bplan *p, int64_t d)
{
    if (d <= 0)
        return;
    k_combine_bwd<<<(unsigned)p->rows_bound, threads_for(d), 0, moe_cu_stream(b)>>>(
        DP(dye), DP(dweight), DP(dy), DP(ye), p->weight, p->token, p->nd, d);
    moe_cu_check(b, "combine_backward");
}

void moe_cu_dispatch_ops(moe_backend *b)
{
    b->dispatch_forward = cu_dispatch_forward;
    b->dispatch_backward = cu_dispatch_backward;
    b->combine_forward = cu_combine_forward;
    b->combine_backward = cu_combine_backward;
}
