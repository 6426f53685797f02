/*
 * Causal grouped-query attention in fp32: sgemms per (batch, head) inside an OpenMP
 * loop over heads. The causal mask is exploited by blocks of ATT_BLOCK rows: the query
 * rows [r0, r1) only meet keys [0, r1), so the GEMMs skip the future beyond the
 * diagonal block (about half the flops at long S); inside that block the masked
 * scores are computed and then zeroed.
 */
#include <math.h>

#include <cblas.h>

#include "cpu/model_ops.h"

/* Rows (and keys) per causal block. */
#define ATT_BLOCK 64

/* C = alpha·op(A)·op(B) + beta·C, row-major with leading dimensions */
static void gemm(int ta, int tb, int64_t M, int64_t N, int64_t K, float alpha, const float *A, int64_t lda,
                 const float *B, int64_t ldb, float beta, float *C, int64_t ldc)
{
    cblas_sgemm(CblasRowMajor, ta ? CblasTrans : CblasNoTrans, tb ? CblasTrans : CblasNoTrans, (blasint)M,
                (blasint)N, (blasint)K, alpha, A, (blasint)lda, B, (blasint)ldb, beta, C, (blasint)ldc);
}

/* causal softmax of row i of the scores in place; masked entries become exactly 0 */
static void causal_softmax_row(float *p, int64_t i, int64_t S)
{
    float mx = -INFINITY;
    for (int64_t j = 0; j <= i; j++)
        mx = p[j] > mx ? p[j] : mx;
    double sum = 0;
    for (int64_t j = 0; j <= i; j++) {
        p[j] = expf(p[j] - mx);
        sum += p[j];
    }
    const float inv = (float)(1.0 / sum);
    for (int64_t j = 0; j <= i; j++)
        p[j] *= inv;
    for (int64_t j = i + 1; j < S; j++)
        p[j] = 0;
}

void moe_cpu_attention_forward(float *out, float *att, const float *q, const float *k, const float *v, int64_t B,
                               int64_t S, int64_t H, int64_t Hkv, int64_t hd)
{
    const int64_t group = H / Hkv, ldq = H * hd, ldk = Hkv * hd;
    const float scale = (float)(1.0 / sqrt((double)hd));
#pragma omp parallel for collapse(2) schedule(static)
    for (int64_t b = 0; b < B; b++)
        for (int64_t h = 0; h < H; h++) {
            const int64_t g = h / group;
            const float *qh = q + b * S * ldq + h * hd;
            const float *kg = k + b * S * ldk + g * hd, *vg = v + b * S * ldk + g * hd;
            float *p = att + (b * H + h) * S * S;
            float *oh = out + b * S * ldq + h * hd;
            for (int64_t r0 = 0; r0 < S; r0 += ATT_BLOCK) {
                const int64_t r1 = r0 + ATT_BLOCK < S ? r0 + ATT_BLOCK : S;
                gemm(0, 1, r1 - r0, r1, hd, scale, qh + r0 * ldq, ldq, kg, ldk, 0.0f, p + r0 * S, S); /* q·kᵀ/√hd */
                for (int64_t i = r0; i < r1; i++)
                    causal_softmax_row(p + i * S, i, S);
                gemm(0, 0, r1 - r0, hd, r1, 1.0f, p + r0 * S, S, vg, ldk, 0.0f, oh + r0 * ldq, ldq); /* p·v */
            }
        }
}

/*
 * Two passes. Per (batch, head): dP = dout·vᵀ, dS = p ⊙ (dP − rowsum(p ⊙ dP))/√hd in
 * datt, dq += dS·k. Per (batch, KV head), its query heads in order: dv += pᵀ·dout,
 * dk += dSᵀ·q; so the heads sharing a KV head never race and add in a fixed order.
 */
void moe_cpu_attention_backward(float *dq, float *dk, float *dv, float *datt, const float *dout, const float *att,
                                const float *q, const float *k, const float *v, int64_t B, int64_t S, int64_t H,
                                int64_t Hkv, int64_t hd)
{
    const int64_t group = H / Hkv, ldq = H * hd, ldk = Hkv * hd;
    const float scale = (float)(1.0 / sqrt((double)hd));
#pragma omp parallel for collapse(2) schedule(static)
    for (int64_t b = 0; b < B; b++)
        for (int64_t h = 0; h < H; h++) {
            const int64_t g = h / group;
            const float *p = att + (b * H + h) * S * S;
            float *ds = datt + (b * H + h) * S * S;
            const float *go = dout + b * S * ldq + h * hd;
            const float *kg = k + b * S * ldk + g * hd, *vg = v + b * S * ldk + g * hd;
            float *dqh = dq + b * S * ldq + h * hd;
            for (int64_t r0 = 0; r0 < S; r0 += ATT_BLOCK) {
                const int64_t r1 = r0 + ATT_BLOCK < S ? r0 + ATT_BLOCK : S;
                gemm(0, 1, r1 - r0, r1, hd, 1.0f, go + r0 * ldq, ldq, vg, ldk, 0.0f, ds + r0 * S, S); /* dP */
                for (int64_t i = r0; i < r1; i++) {
                    const float *pr = p + i * S;
                    float *dr = ds + i * S;
                    double pdp = 0;
                    for (int64_t j = 0; j <= i; j++)
                        pdp += (double)pr[j] * dr[j];
                    const float c = (float)pdp;
                    for (int64_t j = 0; j <= i; j++)
                        dr[j] = pr[j] * (dr[j] - c) * scale;
                    for (int64_t j = i + 1; j < S; j++)
                        dr[j] = 0;
                }
                gemm(0, 0, r1 - r0, hd, r1, 1.0f, ds + r0 * S, S, kg, ldk, 1.0f, dqh + r0 * ldq, ldq); /* dq += dS·k */
            }
        }
#pragma omp parallel for collapse(2) schedule(static)
    for (int64_t b = 0; b < B; b++)
        for (int64_t g = 0; g < Hkv; g++)
            for (int64_t h = g * group; h < (g + 1) * group; h++) {
                const float *p = att + (b * H + h) * S * S, *ds = datt + (b * H + h) * S * S;
                const float *go = dout + b * S * ldq + h * hd, *qh = q + b * S * ldq + h * hd;
                float *dvg = dv + b * S * ldk + g * hd, *dkg = dk + b * S * ldk + g * hd;
                /* keys [c0, c1) are only seen by queries i >= c0 */
                for (int64_t c0 = 0; c0 < S; c0 += ATT_BLOCK) {
                    const int64_t c1 = c0 + ATT_BLOCK < S ? c0 + ATT_BLOCK : S;
                    gemm(1, 0, c1 - c0, hd, S - c0, 1.0f, p + c0 * S + c0, S, go + c0 * ldq, ldq, 1.0f,
                         dvg + c0 * ldk, ldk); /* dv += pᵀ·dout */
                    gemm(1, 0, c1 - c0, hd, S - c0, 1.0f, ds + c0 * S + c0, S, qh + c0 * ldq, ldq, 1.0f,
                         dkg + c0 * ldk, ldk); /* dk += dSᵀ·q */
                }
            }
}

/* A single query row: plain dot products beat BLAS calls on vectors this short. */
void moe_cpu_attention_decode(float *out, float *att, const float *q, const float *kcache, const float *vcache,
                              int64_t pos, int64_t H, int64_t Hkv, int64_t hd)
{
    const int64_t group = H / Hkv, n = pos + 1;
    const float scale = (float)(1.0 / sqrt((double)hd));
#pragma omp parallel for schedule(static)
    for (int64_t h = 0; h < H; h++) {
        const int64_t g = h / group;
        const float *qh = q + h * hd;
        float *p = att + h * n;
        for (int64_t j = 0; j < n; j++) {
            const float *kj = kcache + (j * Hkv + g) * hd;
            float acc = 0;
            for (int64_t d = 0; d < hd; d++)
                acc += qh[d] * kj[d];
            p[j] = acc * scale;
        }
        causal_softmax_row(p, n - 1, n);
        float *o = out + h * hd;
        for (int64_t d = 0; d < hd; d++)
            o[d] = 0;
        for (int64_t j = 0; j < n; j++) {
            const float *vj = vcache + (j * Hkv + g) * hd;
            for (int64_t d = 0; d < hd; d++)
                o[d] += p[j] * vj[d];
        }
    }
}
