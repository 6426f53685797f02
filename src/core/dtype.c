/* Float format conversions and little-endian bytes (dtype.h). */
#include <math.h>
#include <string.h>

#include "core/dtype.h"

int moe_host_is_le(void)
{
    const uint16_t one = 1;
    return *(const uint8_t *)&one == 1;
}

uint64_t moe_load_le(const uint8_t *p, size_t size)
{
    uint64_t v = 0;
    for (size_t i = 0; i < size; i++)
        v |= (uint64_t)p[i] << (8 * i);
    return v;
}

void moe_store_le(uint8_t *dst, const uint8_t *src, size_t size)
{
    if (moe_host_is_le())
        memcpy(dst, src, size);
    else
        for (size_t i = 0; i < size; i++)
            dst[i] = src[size - 1 - i];
}

double moe_f16_to_f64(uint16_t h)
{
    int sign = h >> 15, exp = (h >> 10) & 0x1f, mant = h & 0x3ff;
    double v;
    if (exp == 0)
        v = ldexp(mant, -24);
    else if (exp == 31)
        v = mant ? NAN : INFINITY;
    else
        v = ldexp(mant + 1024, exp - 25);
    return sign ? -v : v;
}

double moe_bf16_to_f64(uint16_t h)
{
    uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

/* Rounds v to the nearest (ties to even) binary float with mbits mantissa and ebits
 * exponent bits; returns its bit pattern. Direct from double, so no double rounding. */
static uint32_t encode_float(double v, int mbits, int ebits)
{
    const int bias = (1 << (ebits - 1)) - 1;
    const uint32_t sign = signbit(v) ? 1u << (mbits + ebits) : 0;
    const uint32_t inf = ((1u << ebits) - 1) << mbits;
    if (isnan(v))
        return sign | inf | (1u << (mbits - 1));
    double a = fabs(v);
    if (isinf(a))
        return sign | inf;
    if (a == 0)
        return sign;
    int e;
    double m = frexp(a, &e); /* a = m·2^e, m in [0.5, 1) */
    int E = e - 1 + bias;
    if (E < 1) /* subnormal, in units of 2^(1 - bias - mbits); 2^mbits rounds up to the least normal */
        return sign | (uint32_t)nearbyint(ldexp(a, bias - 1 + mbits));
    double r = nearbyint(ldexp(m, mbits + 1)); /* in [2^mbits, 2^(mbits+1)] */
    if (r == ldexp(1, mbits + 1)) {
        r = ldexp(1, mbits);
        E++;
    }
    if (E >= (1 << ebits) - 1)
        return sign | inf;
    return sign | ((uint32_t)E << mbits) | ((uint32_t)r - (1u << mbits));
}

uint16_t moe_f64_to_f16(double v)
{
    return (uint16_t)encode_float(v, 10, 5);
}

uint16_t moe_f64_to_bf16(double v)
{
    return (uint16_t)encode_float(v, 7, 8);
}
