/*
 * fastmath.h — e^x in fp32 without calls, for the cpu backend's activation loops
 * (src/cpu/ffn.c), which `omp simd` vectorises only when nothing in them is a call.
 * Include it after `#pragma GCC optimize("no-trapping-math")`, as ffn.c does: the
 * clamps are float compares, which otherwise stop if-conversion.
 */
#ifndef CMOE_CPU_FASTMATH_H
#define CMOE_CPU_FASTMATH_H

#include <stdint.h>

/*
 * e^x, ~2 ulp, total: NaN gives NaN, +inf and x above ln(FLT_MAX) give +inf, −inf and x
 * below the smallest denormal's log give 0, and no input reaches undefined behaviour.
 * Cody–Waite reduction by ln 2 and a degree-6 polynomial; 2^n is applied as two
 * factors 2^(n/2)·2^(n−n/2), each a normal float built from its exponent bits, so the
 * product overflows to inf and underflows through the denormals as expf does. x is
 * clamped to [−104, 89] first (NaN lands on −104: every compare with it is false), so
 * the integer conversion and the shifts stay in range; NaN is put back at the end.
 */
static inline float moe_exp_fast(float x)
{
    const float xc = x > -104.0f ? (x < 89.0f ? x : 89.0f) : -104.0f;
    const float magic = 12582912.0f; /* 1.5·2^23: adding it rounds to an integer */
    float n = (xc * 1.44269504088896341f + magic) - magic;
    float r = xc - n * 0.693359375f;
    r = r - n * -2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    const int32_t ni = (int32_t)n, n1 = ni / 2, n2 = ni - n1; /* ni in [−150, 128] */
    union { float f; int32_t i; } u1, u2;
    u1.i = (n1 + 127) * (1 << 23); /* n1, n2 in [−75, 64]: positive biased exponents */
    u2.i = (n2 + 127) * (1 << 23);
    const float y = p * u1.f * u2.f;
    return x == x ? y : x;
}

#endif
