/*
 * Causal attention as fused (flash) kernels for bf16 (FlashAttention-2's algorithm: Dao,
 * 2023): the S×S scores never leave the registers. Tiles of 64 query rows and 64 keys, four
 * warps of 16 rows, mma.sync m16n8k16 with fp32 accumulation, K and V (or Q and dO) tiles
 * double-buffered through cp.async.
 *
 *   forward (a block per 64 queries of one head): O = Σ_j softmax-so-far(Q·K_jᵀ)·V_j with
 *     the running maximum and sum of each row (online softmax); saves the rows' base-2
 *     log-sum-exp of the scaled scores, LSE2 = log2 Σ_j 2^(s_j), s = q·k/√hd·log2 e.
 *   backward, with P = 2^(s − LSE2) recomputed and D = rowsum(dO ⊙ O):
 *     dk, dv (a block per 64 keys of one KV head, over every query tile of every query head
 *       sharing it, in head order): dV += Pᵀ·dO, dK += dSᵀ·Q/√hd, dS = P ⊙ (dO·Vᵀ − D);
 *     dq (a block per 64 queries): dQ += dS·K/√hd, recomputing P and dO·Vᵀ.
 *   dq gets a pass of its own rather than FlashAttention-2's atomic adds, so each output
 *   element is summed by one thread in a fixed order: the same bits on every run.
 *
 * P and dS are rounded to bf16 for the second GEMM of each pair, as FlashAttention does;
 * everything else is fp32. Head dims 32, 64 and 128; every tensor bf16 and 16-byte aligned.
 */
#include <cmath>

#include "gpu/cuda.h"
#include "gpu/mma.cuh"

typedef __nv_bfloat16 bf16;

#define FA_B 64   /* query rows and keys per tile */
#define FA_T 128  /* four warps of 16 rows */
#define LOG2E 1.4426950408889634

struct fa_args {
    const bf16 *q, *k, *v, *o, *dout;
    bf16 *out, *dq, *dk, *dv;
    float *lse, *dsum;    /* [B·H, S] */
    int64_t S, H, Hkv;
    float scale2;         /* log2(e)/√hd */
    float scale;          /* 1/√hd */
};

__device__ __forceinline__ uint32_t fa_pack(float lo, float hi)
{
    __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    return *(uint32_t *)&h;
}

/* A 64-row tile of a [rows, ld] operand into shared memory rows of HD + 8 elements (16 bytes of
 * padding: ldmatrix's eight rows fall in distinct banks); rows at or past S are zeros. */
template <int HD> __device__ __forceinline__ void fa_load(bf16 *dst, const bf16 *src, int64_t ld, int64_t r0, int64_t S)
{
    constexpr int CH = HD / 8;
    for (int c = threadIdx.x; c < FA_B * CH; c += FA_T) {
        const int r = c / CH, cc = (c % CH) * 8;
        const bool ok = r0 + r < S;
        cp_async16(dst + r * (HD + 8) + cc, ok ? src + (r0 + r) * ld + cc : src, ok);
    }
}

/* The warp's 16 rows of a [64][HD + 8] tile as A fragments over the HD reduction: f[HD/16][4] */
template <int HD> __device__ __forceinline__ void fa_afrag(uint32_t (*f)[4], const bf16 *t)
{
    const int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
#pragma unroll
    for (int ks = 0; ks < HD / 16; ks++)
        ldsm_x4(f[ks], t + (w * 16 + (lane & 15)) * (HD + 8) + ks * 16 + (lane >> 4) * 8);
}

/* acc[8][4] (16 × 64) = A (16 × HD, fragments) · Tᵀ, T a [64][HD + 8] tile (its rows are the 64
 * output columns): scores q·kᵀ, dO·vᵀ */
template <int HD>
__device__ __forceinline__ void fa_abt(float (*acc)[4], const uint32_t (*a)[4], const bf16 *t)
{
    const int lane = threadIdx.x & 31;
#pragma unroll
    for (int n = 0; n < 8; n++)
#pragma unroll
        for (int c = 0; c < 4; c++)
            acc[n][c] = 0.0f;
#pragma unroll
    for (int ks = 0; ks < HD / 16; ks++)
#pragma unroll
        for (int np = 0; np < 4; np++) {
            uint32_t r[4];
            ldsm_x4(r, t + (np * 16 + (lane & 7) + (lane >> 4) * 8) * (HD + 8) + ks * 16 + ((lane >> 3) & 1) * 8);
            mma_bf16(acc[2 * np], a[ks], r);
            mma_bf16(acc[2 * np + 1], a[ks], r + 2);
        }
}

/* acc[HD/8][4] (16 × HD) += P (16 × 64, as fp32 accumulators p[8][4], rounded to bf16) · T,
 * T a [64][HD + 8] tile whose rows are the 64 reduced positions: P·V, dS·K, Pᵀ·dO, dSᵀ·Q */
template <int HD>
__device__ __forceinline__ void fa_pt(float (*acc)[4], const float (*p)[4], const bf16 *t)
{
    const int lane = threadIdx.x & 31;
#pragma unroll
    for (int ks = 0; ks < 4; ks++) {
        /* an m16n8 accumulator pair is an m16k16 A fragment (FlashAttention-2's register reuse) */
        const uint32_t a[4] = {fa_pack(p[2 * ks][0], p[2 * ks][1]), fa_pack(p[2 * ks][2], p[2 * ks][3]),
                               fa_pack(p[2 * ks + 1][0], p[2 * ks + 1][1]),
                               fa_pack(p[2 * ks + 1][2], p[2 * ks + 1][3])};
#pragma unroll
        for (int np = 0; np < HD / 16; np++) {
            uint32_t r[4];
            ldsm_x4_t(r, t + (ks * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * (HD + 8) + np * 16 + (lane >> 4) * 8);
            mma_bf16(acc[2 * np], a, r);
            mma_bf16(acc[2 * np + 1], a, r + 2);
        }
    }
}

/* out[row, :] (+)= v·alpha for the thread's two rows of 16 × HD accumulators; rows at or past S
 * are not stored */
template <int HD, bool ADD>
__device__ __forceinline__ void fa_store(bf16 *out, int64_t ld, int64_t r0, int64_t S, const float (*acc)[4], float alpha)
{
    const int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
#pragma unroll
    for (int h = 0; h < 2; h++) {
        const int64_t r = r0 + w * 16 + (lane >> 2) + 8 * h;
        if (r >= S)
            continue;
#pragma unroll
        for (int n = 0; n < HD / 8; n++) {
            __nv_bfloat162 *p = (__nv_bfloat162 *)(out + r * ld + n * 8 + (lane & 3) * 2);
            float x = acc[n][2 * h] * alpha, y = acc[n][2 * h + 1] * alpha;
            if (ADD) {
                const float2 old = __bfloat1622float2(*p);
                x += old.x;
                y += old.y;
            }
            *p = __floats2bfloat162_rn(x, y);
        }
    }
}

/* Step j of the forward's and the dq pass's loop over key tiles 0..last: queue tile j + 1's
 * keys and values into the other buffer, then wait for tile j's */
template <int HD>
__device__ __forceinline__ void fa_kv_next(bf16 *sK, bf16 *sV, const bf16 *K, const bf16 *V, int64_t ldk, int64_t j,
                                           int64_t last, int64_t S)
{
    constexpr int TS = FA_B * (HD + 8);
    if (j < last) {
        fa_load<HD>(sK + ((j + 1) & 1) * TS, K, ldk, (j + 1) * FA_B, S);
        fa_load<HD>(sV + ((j + 1) & 1) * TS, V, ldk, (j + 1) * FA_B, S);
    }
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();
}

/* ---- forward --------------------------------------------------------------------------------- */

template <int HD> __global__ void __launch_bounds__(FA_T) k_flash_fwd(fa_args a)
{
    extern __shared__ __align__(16) unsigned char fa_smem[];
    bf16 *sQ = (bf16 *)fa_smem, *sK = sQ + FA_B * (HD + 8), *sV = sK + 2 * FA_B * (HD + 8);
    const int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
    const int64_t it = gridDim.x - 1 - blockIdx.x; /* the longest rows first */
    const int64_t bh = blockIdx.y, bb = bh / a.H, h = bh % a.H, g = h / (a.H / a.Hkv);
    const int64_t q0 = it * FA_B, ldq = a.H * HD, ldk = a.Hkv * HD;
    const bf16 *Q = a.q + bb * a.S * ldq + h * HD, *K = a.k + bb * a.S * ldk + g * HD,
               *V = a.v + bb * a.S * ldk + g * HD;
    constexpr int TS = FA_B * (HD + 8);
    fa_load<HD>(sQ, Q, ldq, q0, a.S);
    fa_load<HD>(sK, K, ldk, 0, a.S);
    fa_load<HD>(sV, V, ldk, 0, a.S);
    cp_async_commit();

    uint32_t qf[HD / 16][4];
    float o[HD / 8][4], m[2] = {-INFINITY, -INFINITY}, l[2] = {0.0f, 0.0f};
#pragma unroll
    for (int n = 0; n < HD / 8; n++)
#pragma unroll
        for (int c = 0; c < 4; c++)
            o[n][c] = 0.0f;
    for (int64_t j = 0; j <= it; j++) {
        fa_kv_next<HD>(sK, sV, K, V, ldk, j, it, a.S);
        if (j == 0)
            fa_afrag<HD>(qf, sQ);
        float s[8][4];
        fa_abt<HD>(s, qf, sK + (j & 1) * TS);
#pragma unroll
        for (int h2 = 0; h2 < 2; h2++) {
            const int64_t r = q0 + w * 16 + (lane >> 2) + 8 * h2;
            float mx = m[h2];
#pragma unroll
            for (int n = 0; n < 8; n++)
#pragma unroll
                for (int c = 0; c < 2; c++) {
                    float x = s[n][2 * h2 + c] * a.scale2;
                    if (j == it && j * FA_B + n * 8 + (lane & 3) * 2 + c > r)
                        x = -INFINITY; /* the causal mask, on the diagonal tile */
                    s[n][2 * h2 + c] = x;
                    mx = fmaxf(mx, x);
                }
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
            const float alpha = exp2f(m[h2] - mx); /* 0 on the first tile: m = -inf */
            m[h2] = mx;
            float sum = 0.0f;
#pragma unroll
            for (int n = 0; n < 8; n++)
#pragma unroll
                for (int c = 0; c < 2; c++) {
                    const float p = exp2f(s[n][2 * h2 + c] - mx);
                    s[n][2 * h2 + c] = p;
                    sum += p;
                }
            l[h2] = l[h2] * alpha + sum; /* the thread's share of the row; lanes join at the end */
#pragma unroll
            for (int n = 0; n < HD / 8; n++) {
                o[n][2 * h2] *= alpha;
                o[n][2 * h2 + 1] *= alpha;
            }
        }
        fa_pt<HD>(o, s, sV + (j & 1) * TS);
        __syncthreads(); /* the next iteration's loads overwrite this buffer */
    }
#pragma unroll
    for (int h2 = 0; h2 < 2; h2++) {
        l[h2] += __shfl_xor_sync(0xffffffffu, l[h2], 1);
        l[h2] += __shfl_xor_sync(0xffffffffu, l[h2], 2);
        const int64_t r = q0 + w * 16 + (lane >> 2) + 8 * h2;
        if ((lane & 3) == 0 && r < a.S)
            a.lse[bh * a.S + r] = m[h2] + log2f(l[h2]);
    }
    /* each row's own 1/l: the store takes one factor, so the rows are stored one half at a time */
    bf16 *O = a.out + bb * a.S * ldq + h * HD;
#pragma unroll
    for (int h2 = 0; h2 < 2; h2++) {
        const float inv = 1.0f / l[h2];
#pragma unroll
        for (int n = 0; n < HD / 8; n++) {
            o[n][2 * h2] *= inv;
            o[n][2 * h2 + 1] *= inv;
        }
    }
    fa_store<HD, false>(O, ldq, q0, a.S, o, 1.0f);
}

/* ---- backward -------------------------------------------------------------------------------- */

/* D[bh, s] = Σ_d dO·O over the row (fp32), a warp per row */
template <int HD> __global__ void k_flash_dsum(fa_args a, int64_t B)
{
    const int64_t r = (int64_t)blockIdx.x * (blockDim.x / 32) + (threadIdx.x >> 5), lane = threadIdx.x & 31;
    if (r >= B * a.S * a.H)
        return;
    const int64_t bb = r / (a.S * a.H), s = r / a.H % a.S, h = r % a.H; /* r = (b·S + s)·H + h */
    const bf16 *o = a.o + r * HD, *d = a.dout + r * HD;
    float acc = 0.0f;
    for (int i = lane; i < HD; i += 32)
        acc += __bfloat162float(o[i]) * __bfloat162float(d[i]);
    acc = warp_sum(acc);
    if (lane == 0)
        a.dsum[(bb * a.H + h) * a.S + s] = acc;
}

/* P = 2^(s·scale2 − LSE2) of the thread's accumulators, 0 where masked; then dS = P ⊙ (dP − D)
 * when dp is given (in its place). T: the accumulators are transposed (rows keys, columns
 * queries: the dk/dv kernel). */
template <bool T>
__device__ __forceinline__ void fa_probs(float (*s)[4], float (*dp)[4], const float *lse, const float *dsum,
                                         int64_t qr0, int64_t kr0, int64_t S, float scale2, bool mask)
{
    const int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
#pragma unroll
    for (int n = 0; n < 8; n++)
#pragma unroll
        for (int c = 0; c < 4; c++) {
            const int row = w * 16 + (lane >> 2) + 8 * (c >> 1), col = n * 8 + (lane & 3) * 2 + (c & 1);
            const int qi = T ? col : row, ki = T ? row : col; /* within the tiles */
            float p = exp2f(s[n][c] * scale2 - lse[qi]);
            if (mask && (kr0 + ki > qr0 + qi || qr0 + qi >= S))
                p = 0.0f;
            s[n][c] = p;
            if (dp)
                dp[n][c] = p * (dp[n][c] - dsum[qi]);
        }
}

/* dk, dv of 64 keys of KV head g: over the query heads sharing it and their query tiles from the
 * diagonal on */
template <int HD> __global__ void __launch_bounds__(FA_T) k_flash_dkv(fa_args a)
{
    extern __shared__ __align__(16) unsigned char fa_smem[];
    constexpr int TS = FA_B * (HD + 8);
    bf16 *sK = (bf16 *)fa_smem, *sV = sK + TS, *sQ = sV + TS, *sD = sQ + 2 * TS;
    float *sL = (float *)(sD + 2 * TS), *sS = sL + 2 * FA_B;
    const int64_t jt = blockIdx.x, bg = blockIdx.y, bb = bg / a.Hkv, g = bg % a.Hkv, grp = a.H / a.Hkv;
    const int64_t k0 = jt * FA_B, ldq = a.H * HD, ldk = a.Hkv * HD, nq = (a.S + FA_B - 1) / FA_B;
    const int64_t per = nq - jt, total = grp * per; /* (head, query tile) pairs, in that order */
    fa_load<HD>(sK, a.k + bb * a.S * ldk + g * HD, ldk, k0, a.S);
    fa_load<HD>(sV, a.v + bb * a.S * ldk + g * HD, ldk, k0, a.S);
    auto load = [&](int64_t t, int buf) {
        const int64_t h = g * grp + t / per, q0 = (jt + t % per) * FA_B, bh = bb * a.H + h;
        fa_load<HD>(sQ + buf * TS, a.q + bb * a.S * ldq + h * HD, ldq, q0, a.S);
        fa_load<HD>(sD + buf * TS, a.dout + bb * a.S * ldq + h * HD, ldq, q0, a.S);
        for (int i = threadIdx.x; i < FA_B; i += FA_T) {
            const bool ok = q0 + i < a.S;
            sL[buf * FA_B + i] = ok ? a.lse[bh * a.S + q0 + i] : 0.0f;
            sS[buf * FA_B + i] = ok ? a.dsum[bh * a.S + q0 + i] : 0.0f;
        }
    };
    load(0, 0);
    cp_async_commit();
    float dk[HD / 8][4], dv[HD / 8][4];
#pragma unroll
    for (int n = 0; n < HD / 8; n++)
#pragma unroll
        for (int c = 0; c < 4; c++)
            dk[n][c] = dv[n][c] = 0.0f;
    uint32_t kf[HD / 16][4], vf[HD / 16][4];
    for (int64_t t = 0; t < total; t++) {
        const int buf = t & 1;
        if (t + 1 < total)
            load(t + 1, buf ^ 1);
        cp_async_commit();
        cp_async_wait<1>();
        __syncthreads();
        const int64_t q0 = (jt + t % per) * FA_B;
        const bf16 *tQ = sQ + buf * TS, *tD = sD + buf * TS;
        float s[8][4], dp[8][4];
        /* K's and V's fragments stay in registers, but for HD = 128, where the four 16 × 128
         * accumulators leave no room: they are read again from shared memory each tile */
        if (HD < 128 ? t == 0 : true)
            fa_afrag<HD>(kf, sK);
        fa_abt<HD>(s, kf, tQ); /* sᵀ = K·Qᵀ */
        if (HD < 128 ? t == 0 : true)
            fa_afrag<HD>(vf, sV);
        fa_abt<HD>(dp, vf, tD); /* dPᵀ = V·dOᵀ */
        fa_probs<true>(s, nullptr, sL + buf * FA_B, sS + buf * FA_B, q0, k0, a.S, a.scale2,
                       q0 == k0 || q0 + FA_B > a.S);
        fa_pt<HD>(dv, s, tD); /* dV += Pᵀ·dO */
#pragma unroll
        for (int n = 0; n < 8; n++)
#pragma unroll
            for (int c = 0; c < 4; c++) {
                const int col = n * 8 + ((threadIdx.x & 31) & 3) * 2 + (c & 1);
                s[n][c] *= dp[n][c] - sS[buf * FA_B + col]; /* dSᵀ */
            }
        fa_pt<HD>(dk, s, tQ); /* dK += dSᵀ·Q */
        __syncthreads();
    }
    fa_store<HD, true>(a.dk + bb * a.S * ldk + g * HD, ldk, k0, a.S, dk, a.scale);
    fa_store<HD, true>(a.dv + bb * a.S * ldk + g * HD, ldk, k0, a.S, dv, 1.0f);
}

/* dq of 64 queries of head h: over the key tiles up to the diagonal */
template <int HD> __global__ void __launch_bounds__(FA_T) k_flash_dq(fa_args a)
{
    extern __shared__ __align__(16) unsigned char fa_smem[];
    constexpr int TS = FA_B * (HD + 8);
    bf16 *sQ = (bf16 *)fa_smem, *sD = sQ + TS, *sK = sD + TS, *sV = sK + 2 * TS;
    float *sL = (float *)(sV + 2 * TS), *sS = sL + FA_B;
    const int64_t it = gridDim.x - 1 - blockIdx.x;
    const int64_t bh = blockIdx.y, bb = bh / a.H, h = bh % a.H, g = h / (a.H / a.Hkv);
    const int64_t q0 = it * FA_B, ldq = a.H * HD, ldk = a.Hkv * HD;
    const bf16 *K = a.k + bb * a.S * ldk + g * HD, *V = a.v + bb * a.S * ldk + g * HD;
    fa_load<HD>(sQ, a.q + bb * a.S * ldq + h * HD, ldq, q0, a.S);
    fa_load<HD>(sD, a.dout + bb * a.S * ldq + h * HD, ldq, q0, a.S);
    fa_load<HD>(sK, K, ldk, 0, a.S);
    fa_load<HD>(sV, V, ldk, 0, a.S);
    for (int i = threadIdx.x; i < FA_B; i += FA_T) {
        const bool ok = q0 + i < a.S;
        sL[i] = ok ? a.lse[bh * a.S + q0 + i] : 0.0f;
        sS[i] = ok ? a.dsum[bh * a.S + q0 + i] : 0.0f;
    }
    cp_async_commit();
    uint32_t qf[HD / 16][4], df[HD / 16][4];
    float dq[HD / 8][4];
#pragma unroll
    for (int n = 0; n < HD / 8; n++)
#pragma unroll
        for (int c = 0; c < 4; c++)
            dq[n][c] = 0.0f;
    for (int64_t j = 0; j <= it; j++) {
        fa_kv_next<HD>(sK, sV, K, V, ldk, j, it, a.S);
        if (j == 0) {
            fa_afrag<HD>(qf, sQ);
            fa_afrag<HD>(df, sD);
        }
        float s[8][4], dp[8][4];
        fa_abt<HD>(s, qf, sK + (j & 1) * TS);  /* S = Q·Kᵀ */
        fa_abt<HD>(dp, df, sV + (j & 1) * TS); /* dP = dO·Vᵀ */
        fa_probs<false>(s, dp, sL, sS, q0, j * FA_B, a.S, a.scale2, j == it || q0 + FA_B > a.S);
        fa_pt<HD>(dq, dp, sK + (j & 1) * TS); /* dQ += dS·K */
        __syncthreads();
    }
    fa_store<HD, true>(a.dq + bb * a.S * ldq + h * HD, ldq, q0, a.S, dq, a.scale);
}

/* ---- launch ---------------------------------------------------------------------------------- */

static bool fa_aligned(dptr p)
{
    return p.t == DT_BF16 && p.p && moe_cu_aligned16(p.p);
}

int moe_cu_flash_ok(int64_t hd, int64_t B, int64_t H, dptr q, dptr k, dptr v, dptr out, dptr saved)
{
    return (hd == 32 || hd == 64 || hd == 128) && B * H <= 65535 && fa_aligned(q) && fa_aligned(k) &&
           fa_aligned(v) && fa_aligned(out) && saved.p && moe_cu_aligned4(saved.p);
}

int moe_cu_flash_ok_bwd(dptr dq, dptr dk, dptr dv, dptr dout)
{
    return fa_aligned(dq) && fa_aligned(dk) && fa_aligned(dv) && fa_aligned(dout);
}

template <typename K> static void fa_launch(K kernel, dim3 grid, size_t bytes, cudaStream_t s, const fa_args &a)
{
    cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)bytes);
    kernel<<<grid, FA_T, bytes, s>>>(a);
}

static fa_args fa_make(dptr q, dptr k, dptr v, int64_t S, int64_t H, int64_t Hkv, int64_t hd)
{
    fa_args a = {};
    a.q = (const bf16 *)q.p, a.k = (const bf16 *)k.p, a.v = (const bf16 *)v.p;
    a.S = S, a.H = H, a.Hkv = Hkv;
    a.scale = (float)(1.0 / sqrt((double)hd));
    a.scale2 = (float)(LOG2E / sqrt((double)hd));
    return a;
}

template <int HD> static void fa_forward(cudaStream_t st, const fa_args &a, int64_t B)
{
    const dim3 grid((unsigned)((a.S + FA_B - 1) / FA_B), (unsigned)(B * a.H));
    fa_launch(k_flash_fwd<HD>, grid, (size_t)5 * FA_B * (HD + 8) * sizeof(bf16), st, a);
}

template <int HD> static void fa_backward(cudaStream_t st, const fa_args &a, int64_t B)
{
    const int64_t nq = (a.S + FA_B - 1) / FA_B, rows = B * a.S * a.H;
    k_flash_dsum<HD><<<(unsigned)((rows + 7) / 8), 256, 0, st>>>(a, B);
    const size_t tiles = (size_t)6 * FA_B * (HD + 8) * sizeof(bf16);
    fa_launch(k_flash_dkv<HD>, dim3((unsigned)nq, (unsigned)(B * a.Hkv)), tiles + 4 * FA_B * sizeof(float), st, a);
    fa_launch(k_flash_dq<HD>, dim3((unsigned)nq, (unsigned)(B * a.H)), tiles + 2 * FA_B * sizeof(float), st, a);
}

void moe_cu_flash_forward(moe_backend *b, dptr out, dptr lse, dptr q, dptr k, dptr v, int64_t B, int64_t S, int64_t H,
                          int64_t Hkv, int64_t hd)
{
    fa_args a = fa_make(q, k, v, S, H, Hkv, hd);
    a.out = (bf16 *)out.p;
    a.lse = (float *)lse.p;
    cudaStream_t st = moe_cu_stream(b);
    if (hd == 32)
        fa_forward<32>(st, a, B);
    else if (hd == 64)
        fa_forward<64>(st, a, B);
    else
        fa_forward<128>(st, a, B);
    moe_cu_check(b, "attention_forward");
}

void moe_cu_flash_backward(moe_backend *b, dptr dq, dptr dk, dptr dv, dptr dout, dptr out, dptr lse, dptr q, dptr k,
                           dptr v, float *dsum, int64_t B, int64_t S, int64_t H, int64_t Hkv, int64_t hd)
{
    fa_args a = fa_make(q, k, v, S, H, Hkv, hd);
    a.o = (const bf16 *)out.p, a.dout = (const bf16 *)dout.p;
    a.dq = (bf16 *)dq.p, a.dk = (bf16 *)dk.p, a.dv = (bf16 *)dv.p;
    a.lse = (float *)lse.p, a.dsum = dsum;
    cudaStream_t st = moe_cu_stream(b);
    if (hd == 32)
        fa_backward<32>(st, a, B);
    else if (hd == 64)
        fa_backward<64>(st, a, B);
    else
        fa_backward<128>(st, a, B);
    moe_cu_check(b, "attention_backward");
}
