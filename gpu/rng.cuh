/*
 * rng.cuh — the device twin of src/core/rng.c: Philox-4x32-10 with the same counter layout
 * (i, j, step, stream) and key (seed), the same 53-bit uniforms and Box–Muller normals, and
 * ref/select.c's token hash. A draw is a pure function of its counter, so the GPU draws
 * exactly the numbers the CPU draws (the transcendental functions in double round to the
 * same float almost always; the draws themselves are bit-identical).
 */
#ifndef CMOE_GPU_RNG_CUH
#define CMOE_GPU_RNG_CUH

#include <cstdint>

__device__ __forceinline__ void philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0,
                                              uint32_t k1, uint32_t out[4])
{
#pragma unroll
    for (int r = 0; r < 10; r++) {
        const uint32_t lo0 = 0xD2511F53u * c0, hi0 = __umulhi(0xD2511F53u, c0);
        const uint32_t lo1 = 0xCD9E8D57u * c2, hi1 = __umulhi(0xCD9E8D57u, c2);
        const uint32_t n0 = hi1 ^ c1 ^ k0, n1 = lo1, n2 = hi0 ^ c3 ^ k1, n3 = lo0;
        c0 = n0;
        c1 = n1;
        c2 = n2;
        c3 = n3;
        k0 += 0x9E3779B9u;
        k1 += 0xBB67AE85u;
    }
    out[0] = c0;
    out[1] = c1;
    out[2] = c2;
    out[3] = c3;
}

__device__ __forceinline__ double rng_u53(uint32_t a, uint32_t b)
{
    unsigned long long m = ((unsigned long long)a << 21) ^ (b >> 11);
    m &= (1ull << 53) - 1;
    return ((double)m + 0.5) * (1.0 / 9007199254740992.0);
}

__device__ __forceinline__ double rng_uniform(uint64_t seed, uint32_t stream, uint32_t step, uint32_t i, uint32_t j)
{
    uint32_t o[4];
    philox4x32_10(i, j, step, stream, (uint32_t)seed, (uint32_t)(seed >> 32), o);
    return rng_u53(o[0], o[1]);
}

__device__ __forceinline__ double rng_normal(uint64_t seed, uint32_t stream, uint32_t step, uint32_t i, uint32_t j)
{
    uint32_t o[4];
    philox4x32_10(i, j, step, stream, (uint32_t)seed, (uint32_t)(seed >> 32), o);
    const double u1 = rng_u53(o[0], o[1]), u2 = rng_u53(o[2], o[3]);
    return sqrt(-2.0 * log(u1)) * cos(6.283185307179586476925286766559 * u2);
}

__device__ __forceinline__ unsigned long long rng_hash_token(uint32_t id)
{
    unsigned long long z = id;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

#endif
