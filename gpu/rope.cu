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

static void rope_forward(moe_backend *b, moe_tensor out, moe_tensor x, int64_t pos0, double theta, int64_t B,
                         int64_t S, int64_t nh, int64_t hd)
{
    const int64_t n = B * S * (hd / 2);
    if (n <= 0)
        return;
    k_rope<<<moe_cu_blocks(n, 128), 128, 0, moe_cu_stream(b)>>>(DP(out), DP(x), 0, 1.0, pos0, theta, B, S, nh, hd);
    moe_cu_check(b, "rope_forward");
}

static void rope_backward(moe_backend *b, moe_tensor dx, moe_tensor dout, int64_t pos0, double theta, int64_t B,
                          int64_t S, int64_t nh, int64_t hd)
{
    const int64_t n = B * S * (hd / 2);
    if (n <= 0)
        return;
    k_rope<<<moe_cu_blocks(n, 128), 128, 0, moe_cu_stream(b)>>>(DP(dx), DP(dout), 1, -1.0, pos0, theta, B, S, nh,
                                                                hd);
    moe_cu_check(b, "rope_backward");
}

void moe_cu_rope_ops(moe_backend *b)
{
    b->rope_forward = rope_forward;
    b->rope_backward = rope_backward;
}
