/*
 * Dispatch and combine on the device. The scatter-adds (combine, the dispatch backward)
 * are gathers through the plan's token -> rows index: one block per token adds its rows in
 * plan order, as ref/dispatch.c's sequential loop does, so no two threads ever add into one
 * element (no atomics) and the bits do not depend on scheduling. Rows past the plan's n
 * (read on the device) are left alone.
 *
 * Rows are moved 16 bytes at a time (the v* kernels, templated on the element type) when
 * every tensor is of one type and its rows start on 16-byte boundaries, as the layer's are;
 * otherwise an element at a time through dptr (the k_* kernels).
 */
#include "gpu/cuda.h"

typedef __nv_bfloat16 bf16;

template <typename T> __global__ void v_dispatch(T *xe, const T *x, const int32_t *token, const int32_t *nd, int64_t d)
{
    const int W = vrow<T>::W;
    const int64_t i = blockIdx.x;
    if (i >= nd[0])
        return;
    const uint4 *src = (const uint4 *)(x + (int64_t)token[i] * d);
    uint4 *dst = (uint4 *)(xe + i * d);
    for (int64_t c = threadIdx.x; c < d / W; c += blockDim.x)
        dst[c] = src[c];
}

template <typename T>
__global__ void v_dispatch_bwd(T *dx, const T *dxe, const int32_t *tok_off, const int32_t *tok_row, int64_t d)
{
    const int W = vrow<T>::W;
    const int64_t t = blockIdx.x, q0 = tok_off[t], q1 = tok_off[t + 1];
    for (int64_t c = threadIdx.x * W; c < d; c += blockDim.x * W) {
        float acc[W], v[W];
        vrow<T>::load(dx + t * d + c, acc);
        for (int64_t q = q0; q < q1; q++) {
            vrow<T>::load(dxe + (int64_t)tok_row[q] * d + c, v);
#pragma unroll
            for (int j = 0; j < W; j++)
                acc[j] += v[j];
        }
        vrow<T>::store(dx + t * d + c, acc);
    }
}

template <typename T>
__global__ void v_combine(T *y, const T *ye, const float *weight, const int32_t *tok_off, const int32_t *tok_row,
                          int64_t d)
{
    const int W = vrow<T>::W;
    const int64_t t = blockIdx.x, q0 = tok_off[t], q1 = tok_off[t + 1];
    for (int64_t c = threadIdx.x * W; c < d; c += blockDim.x * W) {
        float acc[W] = {}, v[W];
        for (int64_t q = q0; q < q1; q++) {
            const int64_t i = tok_row[q];
            const float w = weight[i];
            vrow<T>::load(ye + i * d + c, v);
#pragma unroll
            for (int j = 0; j < W; j++)
                acc[j] += w * v[j];
        }
        vrow<T>::store(y + t * d + c, acc);
    }
}

template <typename T>
__global__ void v_combine_bwd(T *dye, dptr dweight, const T *dy, const T *ye, const float *weight,
                              const int32_t *token, const int32_t *nd, int64_t d)
{
    __shared__ float sh[256];
    const int W = vrow<T>::W;
    const int64_t i = blockIdx.x;
    if (i >= nd[0])
        return;
    const int64_t t = token[i];
    const float w = weight[i];
    float acc = 0.0f;
    for (int64_t c = threadIdx.x * W; c < d; c += blockDim.x * W) {
        float g[W], v[W];
        vrow<T>::load(dy + t * d + c, g);
        if (dye) {
            vrow<T>::load(dye + i * d + c, v);
#pragma unroll
            for (int j = 0; j < W; j++)
                v[j] += w * g[j];
            vrow<T>::store(dye + i * d + c, v);
        }
        if (dweight.p) {
            vrow<T>::load(ye + i * d + c, v);
#pragma unroll
            for (int j = 0; j < W; j++)
                acc += g[j] * v[j];
        }
    }
    if (dweight.p) {
        acc = block_sum(acc, sh);
        if (threadIdx.x == 0)
            stf(dweight, i, ldf(dweight, i) + acc);
    }
}

/* Whether rows of d elements of the tensors (same type, 16-byte aligned rows) take the v* kernels */
static bool vec_rows(int64_t d, std::initializer_list<dptr> ts)
{
    int t = -1;
    for (const dptr &a : ts) {
        if (!a.p)
            continue;
        if ((t >= 0 && a.t != t) || ((uintptr_t)a.p & 15))
            return false;
        t = a.t;
    }
    return t >= 0 && (d * (t == DT_BF16 ? 2 : 4)) % 16 == 0;
}

/* threads for rows of d elements moved W at a time */
static int vthreads(int64_t d, int t)
{
    const int64_t n = d / (t == DT_BF16 ? 8 : 4);
    return n >= 256 ? 256 : (n >= 128 ? 128 : (n >= 64 ? 64 : 32));
}

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
    const dptr XE = DP(xe), X = DP(x);
    cudaStream_t s = moe_cu_stream(b);
    const unsigned g = (unsigned)p->rows_bound;
    if (!vec_rows(d, {XE, X}))
        k_dispatch<<<g, threads_for(d), 0, s>>>(XE, X, p->token, p->nd, d);
    else if (X.t == DT_BF16)
        v_dispatch<bf16><<<g, vthreads(d, X.t), 0, s>>>((bf16 *)XE.p, (const bf16 *)X.p, p->token, p->nd, d);
    else
        v_dispatch<float><<<g, vthreads(d, X.t), 0, s>>>((float *)XE.p, (const float *)X.p, p->token, p->nd, d);
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
    const dptr DX = DP(dx), DXE = DP(dxe);
    cudaStream_t s = moe_cu_stream(b);
    const unsigned g = (unsigned)p->T;
    if (!vec_rows(d, {DX, DXE}))
        k_dispatch_bwd<<<g, threads_for(d), 0, s>>>(DX, DXE, p->tok_off, p->tok_row, d);
    else if (DX.t == DT_BF16)
        v_dispatch_bwd<bf16><<<g, vthreads(d, DX.t), 0, s>>>((bf16 *)DX.p, (const bf16 *)DXE.p, p->tok_off, p->tok_row,
                                                            d);
    else
        v_dispatch_bwd<float><<<g, vthreads(d, DX.t), 0, s>>>((float *)DX.p, (const float *)DXE.p, p->tok_off,
                                                             p->tok_row, d);
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
    const dptr Y = DP(y), YE = DP(ye);
    cudaStream_t s = moe_cu_stream(b);
    const unsigned g = (unsigned)p->T;
    if (!vec_rows(d, {Y, YE}))
        k_combine<<<g, threads_for(d), 0, s>>>(Y, YE, p->weight, p->tok_off, p->tok_row, d);
    else if (Y.t == DT_BF16)
        v_combine<bf16><<<g, vthreads(d, Y.t), 0, s>>>((bf16 *)Y.p, (const bf16 *)YE.p, p->weight, p->tok_off,
                                                      p->tok_row, d);
    else
        v_combine<float><<<g, vthreads(d, Y.t), 0, s>>>((float *)Y.p, (const float *)YE.p, p->weight, p->tok_off,
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
    const dptr DYE = DP(dye), DW = DP(dweight), DY = DP(dy), YE = DP(ye);
    cudaStream_t s = moe_cu_stream(b);
    const unsigned g = (unsigned)p->rows_bound;
    if (!vec_rows(d, {DYE, DY, DW.p ? YE : dptr{nullptr, DT_F32}}))
        k_combine_bwd<<<g, threads_for(d), 0, s>>>(DYE, DW, DY, YE, p->weight, p->token, p->nd, d);
    else if (DY.t == DT_BF16)
        v_combine_bwd<bf16><<<g, vthreads(d, DY.t), 0, s>>>((bf16 *)DYE.p, DW, (const bf16 *)DY.p, (const bf16 *)YE.p,
                                                           p->weight, p->token, p->nd, d);
    else
        v_combine_bwd<float><<<g, vthreads(d, DY.t), 0, s>>>((float *)DYE.p, DW, (const float *)DY.p,
                                                            (const float *)YE.p, p->weight, p->token, p->nd, d);
    moe_cu_check(b, "combine_backward");
}

void moe_cu_dispatch_ops(moe_backend *b)
{
    b->dispatch_forward = cu_dispatch_forward;
    b->dispatch_backward = cu_dispatch_backward;
    b->combine_forward = cu_combine_forward;
    b->combine_backward = cu_combine_backward;
}
