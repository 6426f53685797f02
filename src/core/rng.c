/*
 * Philox-4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC'11),
 * the counter-based generator of Random123. A draw is a pure function of
 * (seed, counter), so every backend and every split of the work over ranks
 * sees the same numbers for the same (stream, step, i, j).
 */
#include <math.h>

#include "cmoe.h"

#define PHILOX_M0 0xD2511F53u
#define PHILOX_M1 0xCD9E8D57u
#define PHILOX_W0 0x9E3779B9u
#define PHILOX_W1 0xBB67AE85u

static inline uint32_t mulhilo(uint32_t a, uint32_t b, uint32_t *hi)
{
    uint64_t p = (uint64_t)a * b;
    *hi = (uint32_t)(p >> 32);
    return (uint32_t)p;
}

void moe_philox4x32_10(const uint32_t ctr[4], const uint32_t key[2], uint32_t out[4])
{
    uint32_t c0 = ctr[0], c1 = ctr[1], c2 = ctr[2], c3 = ctr[3];
    uint32_t k0 = key[0], k1 = key[1];
    for (int r = 0; r < 10; r++) {
        uint32_t hi0, hi1;
        uint32_t lo0 = mulhilo(PHILOX_M0, c0, &hi0);
        uint32_t lo1 = mulhilo(PHILOX_M1, c2, &hi1);
        uint32_t n0 = hi1 ^ c1 ^ k0, n1 = lo1, n2 = hi0 ^ c3 ^ k1, n3 = lo0;
        c0 = n0; c1 = n1; c2 = n2; c3 = n3;
        k0 += PHILOX_W0;
        k1 += PHILOX_W1;
    }
    out[0] = c0; out[1] = c1; out[2] = c2; out[3] = c3;
}

static void block(uint64_t seed, uint32_t stream, uint32_t step, uint32_t i, uint32_t j, uint32_t out[4])
{
    const uint32_t ctr[4] = {i, j, step, stream};
    const uint32_t key[2] = {(uint32_t)seed, (uint32_t)(seed >> 32)};
    moe_philox4x32_10(ctr, key, out);
}

/* 53 bits from two words, shifted by half an ulp so the result is never 0 or 1. */
static double u53(uint32_t a, uint32_t b)
{
    uint64_t m = ((uint64_t)a << 21) ^ (b >> 11);
    m &= (1ull << 53) - 1;
    return ((double)m + 0.5) * (1.0 / 9007199254740992.0);
}

double moe_rand_uniform(uint64_t seed, uint32_t stream, uint32_t step, uint32_t i, uint32_t j)
{
    uint32_t o[4];
    block(seed, stream, step, i, j, o);
    return u53(o[0], o[1]);
}

double moe_rand_normal(uint64_t seed, uint32_t stream, uint32_t step, uint32_t i, uint32_t j)
{
    uint32_t o[4];
    block(seed, stream, step, i, j, o);
    double u1 = u53(o[0], o[1]), u2 = u53(o[2], o[3]);
    return sqrt(-2.0 * log(u1)) * cos(6.283185307179586476925286766559 * u2);
}
