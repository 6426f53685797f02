/* Rotary position embedding in fp32, rotate_half pairing (i, i + hd/2). */
#include <math.h>

#include "cpu/model_ops.h"

/*
 * The angles are computed in double and rounded once: pos·θ^(−2i/hd) in fp32 loses
 * ~pos·6e-8 rad, which at a few thousand positions is past the 1e-5 budget. One
 * cos/sin per (token, frequency), shared by all nh heads of the token.
 */
static void rope_apply(float *out, const float *x, int accumulate, double sign, int64_t pos0, double theta,
                       int64_t B, int64_t S, int64_t nh, int64_t hd)
{
    const int64_t half = hd / 2;
#pragma omp parallel for collapse(2) schedule(static)
    for (int64_t b = 0; b < B; b++)
        for (int64_t s = 0; s < S; s++) {
            const double pos = (double)(pos0 + s);
            const int64_t row = (b * S + s) * nh * hd;
            for (int64_t i = 0; i < half; i++) {
                const double ang = pos * pow(theta, -2.0 * (double)i / (double)hd);
                const float c = (float)cos(ang), sn = (float)(sign * sin(ang));
                for (int64_t h = 0; h < nh; h++) {
                    const int64_t at = row + h * hd + i;
                    const float x1 = x[at], x2 = x[at + half];
                    const float y1 = x1 * c - x2 * sn, y2 = x2 * c + x1 * sn;
                    if (accumulate) {
                        out[at] += y1;
                        out[at + half] += y2;
                    } else {
                        out[at] = y1;
                        out[at + half] = y2;
                    }
                }
            }
        }
}

void moe_cpu_rope_forward(float *out, const float *x, int64_t pos0, double theta, int64_t B, int64_t S,
                          int64_t nh, int64_t hd)
{
    rope_apply(out, x, 0, 1.0, pos0, theta, B, S, nh, hd);
}

void moe_cpu_rope_backward(float *dx, const float *dout, int64_t pos0, double theta, int64_t B, int64_t S,
                           int64_t nh, int64_t hd)
{
    rope_apply(dx, dout, 1, -1.0, pos0, theta, B, S, nh, hd);
}
