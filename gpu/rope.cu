/*
 * Rotary position embedding on the device, rotate_half pairing (i, i + hd/2). The angles
 * are computed in double and rounded once, as src/cpu/rope.c does (in fp32 they drift past
 * the 1e-5 budget at a few thousand positions). One thread per (token, frequency) rotates
 * that pair in every head; out may alias x.
 */
#include "gpu/cuda.h"

__global__ void k_rope(dptr out, dptr x, int accumulate, double sign, int64_t pos0, double theta, int64_t B,
                       int64_t S, int64_t nh, int64_t hd)
{
    const int64_t half = hd / 2;
    CU_LOOP(q, B * S * half)
    {
        const int64_t i = q % half, bs = q / half, s = bs % S;
        const double ang = (double)(pos0 + s) * pow(theta, -2.0 * (double)i / (double)hd);
        const float c = (float)cos(ang), sn = (float)(sign * sin(ang));
        const int64_t row = bs * nh * hd;
        for (int64_t h = 0; h < nh; h++) {
            const int64_t at = row + h * hd + i;
            const float x1 = ldf(x, at), x2 = ldf(x, at + half);
            const float y1 = x1 * c - x2 * sn, y2 = x2 * c + x1 * sn;
            if (accumulate) {
                stf(out, at, ldf(out, at) + y1);
                stf(out, at + half, ldf(out, at + half) + y2);
            } else {
                stf(out, at, y1);
                stf(out, at + half, y2);
            }
        }
    }
}

/* The fast path: the angles' cosines and sines once per position and frequency into a table
 * (the same double arithmetic, rounded the same), then a thread per 16 bytes of a head's two
 * halves. (k_rope's loop over the heads waits on memory once per head: out may alias x.) */
__global__ void k_rope_table(float2 *cs, int64_t pos0, double theta, int64_t S, int64_t hd)
{
    const int64_t half = hd / 2;
    CU_LOOP(q, S * half)
    {
        const double ang = (double)(pos0 + q / half) * pow(theta, -2.0 * (double)(q % half) / (double)hd);
        cs[q] = make_float2((float)cos(ang), (float)sin(ang));
    }
}

template <typename T>
__global__ void k_rope_v(T *out, const T *x, const float2 *cs, int accumulate, float sign, int64_t rows, int64_t S,
                         int64_t nh, int64_t hd)
{
    const int W = vrow<T>::W;
    const int64_t half = hd / 2, groups = half / W;
    CU_LOOP(q, rows * groups) /* rows = B·S·nh */
    {
        const int64_t gi = q % groups, r = q / groups, s = r / nh % S, at = r * hd + gi * W;
        const float2 *c = cs + s * half + gi * W;
        float x1[W], x2[W], y1[W], y2[W];
        vrow<T>::load(x + at, x1);
        vrow<T>::load(x + at + half, x2);
        if (accumulate) {
            vrow<T>::load(out + at, y1);
            vrow<T>::load(out + at + half, y2);
        }
#pragma unroll
        for (int j = 0; j < W; j++) {
            const float cj = c[j].x, sj = sign * c[j].y;
            const float a = x1[j] * cj - x2[j] * sj, b = x2[j] * cj + x1[j] * sj;
            y1[j] = accumulate ? y1[j] + a : a;
            y2[j] = accumulate ? y2[j] + b : b;
        }
        vrow<T>::store(out + at, y1);
        vrow<T>::store(out + at + half, y2);
    }
}

static void rope(moe_backend *b, const char *op, moe_tensor out, moe_tensor x, int accumulate, double sign,
                 int64_t pos0, double theta, int64_t B, int64_t S, int64_t nh, int64_t hd)
{
    const int64_t n = B * S * (hd / 2);
    if (n <= 0)
        return;
    const dptr O = DP(out), X = DP(x);
    const int64_t W = O.t == DT_BF16 ? 8 : 4;
    cudaStream_t st = moe_cu_stream(b);
    const size_t tb = (size_t)(S * (hd / 2)) * sizeof(float2);
    if (O.t == X.t && O.t != DT_I32 && (hd / 2) % W == 0 && moe_cu_aligned16(O.p) && moe_cu_aligned16(X.p) &&
        moe_cu(b)->cur == MOE_STREAM_COMPUTE && moe_cu(b)->side_cur < 0 && tb <= moe_cu(b)->scratch_bytes) {
        float2 *cs = (float2 *)moe_cu_scratch(b, tb, op);
        k_rope_table<<<moe_cu_blocks(S * (hd / 2), 256), 256, 0, st>>>(cs, pos0, theta, S, hd);
        const int64_t work = B * S * nh * (hd / 2 / W);
        if (O.t == DT_BF16)
            k_rope_v<__nv_bfloat16><<<moe_cu_blocks(work, 256), 256, 0, st>>>(
                (__nv_bfloat16 *)O.p, (const __nv_bfloat16 *)X.p, cs, accumulate, (float)sign, B * S * nh, S, nh, hd);
        else
            k_rope_v<float><<<moe_cu_blocks(work, 256), 256, 0, st>>>((float *)O.p, (const float *)X.p, cs, accumulate,
                                                                      (float)sign, B * S * nh, S, nh, hd);
    } else {
        k_rope<<<moe_cu_blocks(n, 128), 128, 0, st>>>(O, X, accumulate, sign, pos0, theta, B, S, nh, hd);
    }
    moe_cu_check(b, op);
}

static void rope_forward(moe_backend *b, moe_tensor out, moe_tensor x, int64_t pos0, double theta, int64_t B,
                         int64_t S, int64_t nh, int64_t hd)
{
    rope(b, "rope_forward", out, x, 0, 1.0, pos0, theta, B, S, nh, hd);
}

static void rope_backward(moe_backend *b, moe_tensor dx, moe_tensor dout, int64_t pos0, double theta, int64_t B,
                          int64_t S, int64_t nh, int64_t hd)
{
    rope(b, "rope_backward", dx, dout, 1, -1.0, pos0, theta, B, S, nh, hd);
}

void moe_cu_rope_ops(moe_backend *b)
{
    b->rope_forward = rope_forward;
    b->rope_backward = rope_backward;
}
