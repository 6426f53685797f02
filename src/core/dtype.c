/* Element types and host conversions (dtype.h). */
#include <math.h>
#include <string.h>

#include "core/dtype.h"

static const struct {
    const char *name;
    size_t size;
    int is_float;
} types[MOE_NDTYPES] = {
    [MOE_F64] = {"f64", 8, 1},
    [MOE_F32] = {"f32", 4, 1},
    [MOE_BF16] = {"bf16", 2, 1},
    [MOE_I32] = {"i32", 4, 0},
};

size_t moe_dtype_size(moe_dtype t)
{
    return (unsigned)t < MOE_NDTYPES ? types[t].size : 0;
}

const char *moe_dtype_name(moe_dtype t)
{
    return (unsigned)t < MOE_NDTYPES ? types[t].name : "?";
}

int moe_dtype_is_float(moe_dtype t)
{
    return (unsigned)t < MOE_NDTYPES && types[t].is_float;
}

float moe_bf16_to_f32(uint16_t h)
{
    uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

uint16_t moe_f32_to_bf16(float f)
{
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    if ((u & 0x7fffffffu) > 0x7f800000u) /* NaN: keep the sign, force a quiet mantissa bit */
        return (uint16_t)((u >> 16) | 0x40);
    /* round to nearest even on the 16 dropped bits; a carry into the exponent is right
     * (it rounds up to the next binade, or to inf past the largest finite bf16) */
    u += 0x7fffu + ((u >> 16) & 1);
    return (uint16_t)(u >> 16);
}

/* Rounds v to the nearest (ties to even) binary float with mbits mantissa and ebits
 * exponent bits and returns its bit pattern; straight from double, so no double rounding. */
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

uint16_t moe_f64_to_bf16(double v)
{
    return (uint16_t)encode_float(v, 7, 8);
}

uint16_t moe_f64_to_f16(double v)
{
    return (uint16_t)encode_float(v, 10, 5);
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
    return moe_bf16_to_f32(h);
}

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

/* One element as double (exact for every type here). src may be unaligned (a tensor in
 * a mapped safetensors file sits wherever its offset puts it): loads go through memcpy. */
static double load(const void *src, moe_dtype t, int64_t i)
{
    const char *p = (const char *)src + (size_t)i * types[t].size;
    switch (t) {
    case MOE_F64: {
        double v;
        memcpy(&v, p, sizeof v);
        return v;
    }
    case MOE_F32: {
        float v;
        memcpy(&v, p, sizeof v);
        return v;
    }
    case MOE_BF16: {
        uint16_t v;
        memcpy(&v, p, sizeof v);
        return moe_bf16_to_f32(v);
    }
    default: {
        int32_t v;
        memcpy(&v, p, sizeof v);
        return v;
    }
    }
}

/* One element stored to dst[i] (possibly unaligned), from a value already of type t. */
#define STORE(dst, i, type, v)                                                   \
    do {                                                                         \
        const type v_ = (v);                                                     \
        memcpy((char *)(dst) + (size_t)(i) * sizeof(type), &v_, sizeof(type)); \
    } while (0)

moe_status moe_convert(void *dst, moe_dtype dt, const void *src, moe_dtype st, int64_t n)
{
    if ((unsigned)dt >= MOE_NDTYPES || (unsigned)st >= MOE_NDTYPES || n < 0 || (n > 0 && (!dst || !src)))
        return moe_error(MOE_ERR_ARG, "convert: bad arguments (%s to %s, %lld elements)", moe_dtype_name(st),
                         moe_dtype_name(dt), (long long)n);
    if (dt == st) {
        memcpy(dst, src, (size_t)n * types[dt].size);
        return MOE_OK;
    }
    /* elementwise, so threads change no bit; they matter for the GiB-sized expert tensors
     * of a GPU model loaded from double */
    switch (dt) {
    case MOE_F64:
#pragma omp parallel for schedule(static) if (n > (1 << 20))
        for (int64_t i = 0; i < n; i++)
            STORE(dst, i, double, load(src, st, i));
        return MOE_OK;
    case MOE_F32: /* from double: one rounding, as the C cast does */
#pragma omp parallel for schedule(static) if (n > (1 << 20))
        for (int64_t i = 0; i < n; i++)
            STORE(dst, i, float, (float)load(src, st, i));
        return MOE_OK;
    case MOE_BF16: /* straight from the exact value: one rounding, not two */
#pragma omp parallel for schedule(static) if (n > (1 << 20))
        for (int64_t i = 0; i < n; i++)
            STORE(dst, i, uint16_t, moe_f64_to_bf16(load(src, st, i)));
        return MOE_OK;
    default: /* to i32: only integral values in range */
        for (int64_t i = 0; i < n; i++) {
            const double v = load(src, st, i);
            if (!(v >= INT32_MIN && v <= INT32_MAX) || v != floor(v))
                return moe_error(MOE_ERR_ARG, "convert: element %lld (%g) is not an int32", (long long)i, v);
            STORE(dst, i, int32_t, (int32_t)v);
        }
        return MOE_OK;
    }
}
