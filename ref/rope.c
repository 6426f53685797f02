/* Rotary position embedding, Llama / Mixtral's rotate_half pairing (i, i + hd/2), in double. */
#include <math.h>

#include "ref/model_ops.h"

/* sign = +1 rotates by +angle (forward), −1 by −angle (the transpose, for backward). */
static void rope_apply(double *out, const double *x, int accumulate, double sign, int64_t pos0, double theta,
                       int64_t B, int64_t S, int64_t nh, int64_t hd)
{
    const int64_t half = hd / 2;
#pragma omp parallel for collapse(2) schedule(static)
    for (int64_t b = 0; b < B; b++)
        for (int64_t s = 0; s < S; s++) {
            double pos = (double)(pos0 + s);
            for (int64_t h = 0; h < nh; h++) {
                int64_t base = ((b * S + s) * nh + h) * hd;
                for (int64_t i = 0; i < half; i++) {
                    double ang = pos * pow(theta, -2.0 * (double)i / (double)hd);
                    double c = cos(ang), sn = sign * sin(ang);
                    double x1 = x[base + i], x2 = x[base + i + half];
                    double y1 = x1 * c - x2 * sn, y2 = x2 * c + x1 * sn;
                    if (accumulate) {
                        out[base + i] += y1;
                        out[base + i + half] += y2;
                    } else {
                        out[base + i] = y1;
                        out[base + i + half] = y2;
                    }
                }
            }
        }
}

void moe_ref_rope_forward(double *out, const double *x, int64_t pos0, double theta, int64_t B, int64_t S,
                          int64_t nh, int64_t hd)
{
    rope_apply(out, x, 0, 1.0, pos0, theta, B, S, nh, hd);
}

void moe_ref_rope_backward(double *dx, const double *dout, int64_t pos0, double theta, int64_t B, int64_t S,
                           int64_t nh, int64_t hd)
{
    rope_apply(dx, dout, 1, -1.0, pos0, theta, B, S, nh, hd);
}
