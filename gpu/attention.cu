/*
 * Causal grouped-query attention on the device. bf16 with head dims 32, 64 or 128 runs the
 * fused (flash) kernels of gpu/flash.cu; everything else (fp32 for the cross-checks, other
 * head dims, unaligned tensors) cuBLAS batched GEMMs over (batch, head) with a masked
 * softmax pass between them:
 *
 *   forward:  Sc = q·kᵀ/√hd (f32), P = causal softmax(Sc) (compute type), out = P·v
 *   backward: Sc and P again, bit for bit as the forward made them (same GEMM, same pass);
 *             dP = dout·vᵀ, dv += Pᵀ·dout, dS = P ⊙ (dP − rowsum(P ⊙ dP))/√hd,
 *             dq += dS·k, dk += dSᵀ·q
 * Either way the forward saves only [B, H, S] floats (attention_saved): the flash kernels
 * the rows' log-sum-exp; the batched path, which recomputes P, nothing. Pointers of the
 * batched GEMMs are built on the device from the tensors' addresses (grouped-query heads are
 * not a fixed stride apart). The query heads sharing a KV head add into its dk, dv in
 * separate launches, in head order: no two GEMMs of one launch write the same output, so the
 * sums are deterministic and in the cpu's order.
 *
 * The S×S scratch of the batched path (Sc in f32, P in the compute type) is reserved for the
 * model's batch and sequence when it is built.
 */
#include <cmath>

#include "gpu/cuda.h"

static size_t a256(size_t n)
{
    return (n + 255) / 256 * 256;
}

size_t moe_cu_attention_scratch(const moe_workload *w, moe_dtype ft)
{
    if (w->batch <= 0)
        return 0;
    const size_t BH = (size_t)(w->batch * w->heads), SS = (size_t)(w->seq * w->seq);
    const size_t att = 3 * a256(BH * sizeof(void *)) + a256(BH * SS * 4) + a256(BH * SS * moe_cu_size(ft));
    const size_t dec = a256((size_t)(w->heads * w->seq) * sizeof(float));
    return att > dec ? att : dec;
}

struct pdesc {
    const char *base;
    long long es, sb, sh, hdiv;
};

static pdesc pd(dptr t, int64_t sb, int64_t sh, int64_t hdiv)
{
    return pdesc{(const char *)t.p, t.t == DT_BF16 ? 2 : 4, sb, sh, hdiv};
}

/* batch index i = b·Hn + hh, head h = hh·hmul + hadd */
__global__ void k_ptrs(const void **pa, const void **pb, void **pc, pdesc a, pdesc b, pdesc c, int64_t B, int64_t Hn,
                       int64_t hmul, int64_t hadd)
{
    CU_LOOP(i, B * Hn)
    {
        const long long bb = i / Hn, h = (i % Hn) * hmul + hadd;
        pa[i] = a.base + a.es * (bb * a.sb + h / a.hdiv * a.sh);
        pb[i] = b.base + b.es * (bb * b.sb + h / b.hdiv * b.sh);
        pc[i] = (void *)(c.base + c.es * (bb * c.sb + h / c.hdiv * c.sh));
    }
}

typedef struct {
    const void **pa, **pb;
    void **pc;
    float *sc; /* [B·H, S, S] f32 */
    dptr p;    /* [B·H, S, S] compute type */
    float *dec;
} att_scratch;

static int scratch_of(moe_backend *b, att_scratch *s, int64_t B, int64_t H, int64_t S, const char *op)
{
    const size_t BH = (size_t)(B * H), SS = (size_t)(S * S);
    const moe_dtype ft = b->float_type;
    char *base = (char *)moe_cu_scratch(b, 3 * a256(BH * sizeof(void *)) + a256(BH * SS * 4) +
                                               a256(BH * SS * moe_cu_size(ft)),
                                        op);
    if (!base)
        return 0;
    s->pa = (const void **)base;
    s->pb = (const void **)(base + a256(BH * sizeof(void *)));
    s->pc = (void **)(base + 2 * a256(BH * sizeof(void *)));
    s->sc = (float *)(base + 3 * a256(BH * sizeof(void *)));
    s->p = dptr{base + 3 * a256(BH * sizeof(void *)) + a256(BH * SS * 4), moe_cu_dt(ft)};
    return 1;
}

/* one batched GEMM over (b, hh): operands a, b, c described by pd() */
static void batched(moe_backend *b, const char *op, att_scratch *s, int ta, int tb, int64_t M, int64_t N, int64_t K,
                    float alpha, pdesc A, int at, int64_t lda, pdesc Bd, int bt, int64_t ldb, float beta, pdesc C,
                    int ct, int64_t ldc, int64_t Bn, int64_t Hn, int64_t hmul, int64_t hadd)
{
    k_ptrs<<<moe_cu_blocks(Bn * Hn, 128), 128, 0, moe_cu_stream(b)>>>(s->pa, s->pb, s->pc, A, Bd, C, Bn, Hn, hmul,
                                                                       hadd);
    if (!moe_cu_check(b, op))
        return;
    moe_cu_gemm_batched(b, op, ta, tb, M, N, K, alpha, s->pa, at, lda, s->pb, bt, ldb, beta, s->pc, ct, ldc, Bn * Hn);
}

/* A warp per row (bh, i) of the [B·H·S, S] scores, 8 rows to a block of 256 threads: the rows
 * are short (S) and a warp reduces them with shuffles, without block barriers. The butterfly
 * (__shfl_xor) combines the lanes in the same order on every run. */
#define SM_ROWS 8

/* P[bh, i, j] = causal softmax of Sc's row (0 past the diagonal), in one pass for the maximum
 * and the sum (each lane rescales its sum as its maximum grows) and one for P. (Lanes reading 4 neighbours at once with 16-byte
 * loads measured slower, 5.2 against 4.4 ms a step of gpu-100m: their 2-byte stores of P
 * then spread over 4x the bytes per warp instruction.) */
__global__ void __launch_bounds__(256) k_softmax_causal(dptr P, const float *sc, int64_t rows, int64_t S)
{
    const int lane = threadIdx.x & 31;
    const int64_t r = (int64_t)blockIdx.x * SM_ROWS + (threadIdx.x >> 5);
    if (r >= rows)
        return;
    const int64_t i = r % S;
    const float *row = sc + r * S;
    float m = -INFINITY, sum = 0.0f;
    for (int64_t j = lane; j <= i; j += 32) {
        const float x = row[j];
        if (x > m) {
            sum = sum * expf(m - x) + 1.0f; /* expf(-inf) = 0 for the first */
            m = x;
        } else {
            sum += expf(x - m);
        }
    }
    float mx = m;
    for (int o = 16; o > 0; o >>= 1)
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
    const double tot = warp_sum(m == -INFINITY ? 0.0 : (double)sum * exp((double)(m - mx)));
    const float inv = (float)(1.0 / tot);
    for (int64_t j = lane; j < S; j += 32)
        stf(P, r * S + j, j <= i ? expf(row[j] - mx) * inv : 0.0f);
}

/* dS = P ⊙ (dP − Σ P ⊙ dP)·scale, in place of P; dP (f32) in sc; one block per row (a warp
 * per row, as above, measured 2x slower here: 5.1 against 2.4 ms a step of gpu-100m) */
__global__ void k_dsoftmax(dptr P, const float *dp, int64_t S, float scale)
{
    __shared__ double sh[128];
    const int64_t r = blockIdx.x, i = r % S;
    double pdp = 0;
    for (int64_t j = threadIdx.x; j <= i; j += blockDim.x)
        pdp += (double)ldf(P, r * S + j) * dp[r * S + j];
    pdp = block_sum(pdp, sh);
    const float c = (float)pdp;
    for (int64_t j = threadIdx.x; j < S; j += blockDim.x)
        stf(P, r * S + j, j <= i ? ldf(P, r * S + j) * (dp[r * S + j] - c) * scale : 0.0f);
}

static unsigned softmax_blocks(int64_t rows)
{
    return (unsigned)((rows + SM_ROWS - 1) / SM_ROWS);
}

/* B·H·S floats, in elements of the compute type */
static int64_t attention_saved(moe_backend *b, int64_t B, int64_t S, int64_t H)
{
    return B * H * S * (b->float_type == MOE_BF16 ? 2 : 1);
}

/* Sc = q·kᵀ/√hd and P: the forward's first half, also the backward's */
static int scores(moe_backend *b, const char *op, att_scratch *s, moe_tensor q, moe_tensor k, int64_t B, int64_t S,
                  int64_t H, int64_t Hkv, int64_t hd)
{
    const int64_t group = H / Hkv;
    const float scale = (float)(1.0 / sqrt((double)hd));
    const dptr Q = DP(q), K = DP(k), SC = {s->sc, DT_F32};
    batched(b, op, s, 0, 1, S, S, hd, scale, pd(Q, S * H * hd, hd, 1), Q.t, H * hd, pd(K, S * Hkv * hd, hd, group),
            K.t, Hkv * hd, 0.0f, pd(SC, H * S * S, S * S, 1), DT_F32, S, B, H, 1, 0);
    k_softmax_causal<<<softmax_blocks(B * H * S), 256, 0, moe_cu_stream(b)>>>(s->p, s->sc, B * H * S, S);
    return moe_cu_check(b, op);
}

static void attention_forward(moe_backend *b, moe_tensor out, moe_tensor saved, moe_tensor q, moe_tensor k,
                              moe_tensor v, int64_t B, int64_t S, int64_t H, int64_t Hkv, int64_t hd)
{
    if (B * S * H <= 0)
        return;
    if (moe_cu_flash_ok(hd, B, H, DP(q), DP(k), DP(v), DP(out), DP(saved))) {
        moe_cu_flash_forward(b, DP(out), DP(saved), DP(q), DP(k), DP(v), B, S, H, Hkv, hd);
        return;
    }
    att_scratch s;
    if (!scratch_of(b, &s, B, H, S, "attention_forward") || !scores(b, "attention_forward", &s, q, k, B, S, H, Hkv, hd))
        return;
    const dptr V = DP(v), O = DP(out);
    batched(b, "attention_forward", &s, 0, 0, S, hd, S, 1.0f, pd(s.p, H * S * S, S * S, 1), s.p.t, S,
            pd(V, S * Hkv * hd, hd, H / Hkv), V.t, Hkv * hd, 0.0f, pd(O, S * H * hd, hd, 1), O.t, H * hd, B, H, 1, 0);
}

static void attention_backward(moe_backend *b, moe_tensor dq, moe_tensor dk, moe_tensor dv, moe_tensor dout,
                               moe_tensor out, moe_tensor saved, moe_tensor q, moe_tensor k, moe_tensor v, int64_t B,
                               int64_t S, int64_t H, int64_t Hkv, int64_t hd)
{
    const char *op = "attention_backward";
    if (B * S * H <= 0)
        return;
    /* the flash forward ran on these tensors (the same test) and saved the log-sum-exp */
    if (moe_cu_flash_ok(hd, B, H, DP(q), DP(k), DP(v), DP(out), DP(saved)) &&
        moe_cu_flash_ok_bwd(DP(dq), DP(dk), DP(dv), DP(dout))) {
        float *dsum = (float *)moe_cu_scratch(b, (size_t)(B * H * S) * sizeof(float), op);
        if (dsum)
            moe_cu_flash_backward(b, DP(dq), DP(dk), DP(dv), DP(dout), DP(out), DP(saved), DP(q), DP(k), DP(v), dsum,
                                  B, S, H, Hkv, hd);
        return;
    }
    att_scratch s;
    if (!scratch_of(b, &s, B, H, S, op) || !scores(b, op, &s, q, k, B, S, H, Hkv, hd))
        return;
    const int64_t group = H / Hkv;
    const float scale = (float)(1.0 / sqrt((double)hd));
    const dptr Q = DP(q), K = DP(k), V = DP(v), DO = DP(dout), DQ = DP(dq), DK = DP(dk), DV = DP(dv);
    const dptr DPS = {s.sc, DT_F32};
    /* dP = dout·vᵀ into the Sc buffer */
    batched(b, op, &s, 0, 1, S, S, hd, 1.0f, pd(DO, S * H * hd, hd, 1), DO.t, H * hd, pd(V, S * Hkv * hd, hd, group),
            V.t, Hkv * hd, 0.0f, pd(DPS, H * S * S, S * S, 1), DT_F32, S, B, H, 1, 0);
    /* dv += Pᵀ·dout, one launch per query head of each KV head */
    for (int64_t j = 0; j < group; j++)
        batched(b, op, &s, 1, 0, S, hd, S, 1.0f, pd(s.p, H * S * S, S * S, 1), s.p.t, S,
                pd(DO, S * H * hd, hd, 1), DO.t, H * hd, 1.0f, pd(DV, S * Hkv * hd, hd, group), DV.t, Hkv * hd, B,
                Hkv, group, j);
    k_dsoftmax<<<(unsigned)(B * H * S), 128, 0, moe_cu_stream(b)>>>(s.p, s.sc, S, scale);
    if (!moe_cu_check(b, op))
        return;
    /* dq += dS·k */
    batched(b, op, &s, 0, 0, S, hd, S, 1.0f, pd(s.p, H * S * S, S * S, 1), s.p.t, S, pd(K, S * Hkv * hd, hd, group),
            K.t, Hkv * hd, 1.0f, pd(DQ, S * H * hd, hd, 1), DQ.t, H * hd, B, H, 1, 0);
    /* dk += dSᵀ·q, per query head of each KV head */
    for (int64_t j = 0; j < group; j++)
        batched(b, op, &s, 1, 0, S, hd, S, 1.0f, pd(s.p, H * S * S, S * S, 1), s.p.t, S, pd(Q, S * H * hd, hd, 1),
                Q.t, H * hd, 1.0f, pd(DK, S * Hkv * hd, hd, group), DK.t, Hkv * hd, B, Hkv, group, j);
}

/* one block per head: scores of the new query against positions 0..pos, softmax, weighted sum */
__global__ void k_decode(dptr out, float *att, dptr q, dptr kc, dptr vc, int64_t pos, int64_t H, int64_t Hkv,
                         int64_t hd, float scale)
{
    __shared__ float shf[256];
    __shared__ double shd[256];
    const int64_t h = blockIdx.x, g = h / (H / Hkv), n = pos + 1;
    float *p = att + h * n;
    for (int64_t j = threadIdx.x; j < n; j += blockDim.x) {
        float acc = 0.0f;
        for (int64_t d = 0; d < hd; d++)
            acc += ldf(q, h * hd + d) * ldf(kc, (j * Hkv + g) * hd + d);
        p[j] = acc * scale;
    }
    __syncthreads();
    float mx = -INFINITY;
    for (int64_t j = threadIdx.x; j < n; j += blockDim.x)
        mx = fmaxf(mx, p[j]);
    shf[threadIdx.x] = mx;
    __syncthreads();
    for (unsigned s = blockDim.x / 2; s > 0; s >>= 1) {
        if (threadIdx.x < s)
            shf[threadIdx.x] = fmaxf(shf[threadIdx.x], shf[threadIdx.x + s]);
        __syncthreads();
    }
    mx = shf[0];
    double sum = 0;
    for (int64_t j = threadIdx.x; j < n; j += blockDim.x)
        sum += expf(p[j] - mx);
    sum = block_sum(sum, shd);
    const float inv = (float)(1.0 / sum);
    for (int64_t j = threadIdx.x; j < n; j += blockDim.x)
        p[j] = expf(p[j] - mx) * inv;
    __syncthreads();
    for (int64_t d = threadIdx.x; d < hd; d += blockDim.x) {
        float acc = 0.0f;
        for (int64_t j = 0; j < n; j++)
            acc += p[j] * ldf(vc, (j * Hkv + g) * hd + d);
        stf(out, h * hd + d, acc);
    }
}

static void attention_decode(moe_backend *b, moe_tensor out, moe_tensor q, moe_tensor kc, moe_tensor vc, int64_t pos,
                             int64_t H, int64_t Hkv, int64_t hd)
{
    float *att = (float *)moe_cu_scratch(b, (size_t)(H * (pos + 1)) * sizeof(float), "attention_decode");
    if (!att)
        return;
    k_decode<<<(unsigned)H, 128, 0, moe_cu_stream(b)>>>(DP(out), att, DP(q), DP(kc), DP(vc), pos, H, Hkv, hd,
                                                        (float)(1.0 / sqrt((double)hd)));
    moe_cu_check(b, "attention_decode");
}

void moe_cu_attention_ops(moe_backend *b)
{
    b->attention_saved = attention_saved;
    b->attention_forward = attention_forward;
    b->attention_backward = attention_backward;
    b->attention_decode = attention_decode;
}
