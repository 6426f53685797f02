/* Causal multi-head attention with grouped-query heads, in double (llm.c's attention layer). */
#include <math.h>

#include "ref/model_ops.h"

/* softmax of scores[0..n) in place */
static void softmax_inplace(double *p, int64_t n)
{
    double mx = -INFINITY, sum = 0;
    for (int64_t j = 0; j < n; j++)
        mx = p[j] > mx ? p[j] : mx;
    for (int64_t j = 0; j < n; j++) {
        p[j] = exp(p[j] - mx);
        sum += p[j];
    }
    for (int64_t j = 0; j < n; j++)
        p[j] /= sum;
}

static double dot(const double *a, const double *b, int64_t n)
{
    double acc = 0;
    for (int64_t i = 0; i < n; i++)
        acc += a[i] * b[i];
    return acc;
}

void moe_ref_attention_forward(double *out, double *att, const double *q, const double *k, const double *v,
                               int64_t B, int64_t S, int64_t H, int64_t Hkv, int64_t hd)
{
    const int64_t group = H / Hkv;
    const double scale = 1.0 / sqrt((double)hd);
#pragma omp parallel for collapse(2) schedule(static)
    for (int64_t b = 0; b < B; b++)
        for (int64_t h = 0; h < H; h++) {
            const int64_t g = h / group;
            for (int64_t i = 0; i < S; i++) {
                const double *qi = q + ((b * S + i) * H + h) * hd;
                double *p = att + ((b * H + h) * S + i) * S;
                for (int64_t j = 0; j <= i; j++)
                    p[j] = dot(qi, k + ((b * S + j) * Hkv + g) * hd, hd) * scale;
                softmax_inplace(p, i + 1);
                for (int64_t j = i + 1; j < S; j++)
                    p[j] = 0; /* masked: exactly zero, so backward can read whole rows */
                double *o = out + ((b * S + i) * H + h) * hd;
                for (int64_t d = 0; d < hd; d++)
                    o[d] = 0;
                for (int64_t j = 0; j <= i; j++) {
                    const double *vj = v + ((b * S + j) * Hkv + g) * hd;
                    for (int64_t d = 0; d < hd; d++)
                        o[d] += p[j] * vj[d];
                }
            }
        }
}

/*
 * dp_ij = dout_i·v_j, dv_j += p_ij·dout_i, ds_ij = p_ij·(dp_ij − Σ_l p_il·dp_il),
 * dq_i += scale·Σ_j ds_ij·k_j, dk_j += scale·ds_ij·q_i.
 * One task per (batch, KV head) runs its query heads in order, so the heads that
 * share dk/dv never race and the sum order is fixed.
 */
void moe_ref_attention_backward(double *dq, double *dk, double *dv, double *datt, const double *dout,
                                const double *att, const double *q, const double *k, const double *v, int64_t B,
                                int64_t S, int64_t H, int64_t Hkv, int64_t hd)
{
    const int64_t group = H / Hkv;
    const double scale = 1.0 / sqrt((double)hd);
#pragma omp parallel for collapse(2) schedule(static)
    for (int64_t b = 0; b < B; b++)
        for (int64_t g = 0; g < Hkv; g++)
            for (int64_t h = g * group; h < (g + 1) * group; h++)
                for (int64_t i = 0; i < S; i++) {
                    const double *p = att + ((b * H + h) * S + i) * S;
                    double *dp = datt + ((b * H + h) * S + i) * S;
                    const double *go = dout + ((b * S + i) * H + h) * hd;
                    const double *qi = q + ((b * S + i) * H + h) * hd;
                    double *dqi = dq + ((b * S + i) * H + h) * hd;
                    double pdp = 0;
                    for (int64_t j = 0; j <= i; j++) {
                        const int64_t kv = ((b * S + j) * Hkv + g) * hd;
                        dp[j] = dot(go, v + kv, hd);
                        pdp += p[j] * dp[j];
                        for (int64_t d = 0; d < hd; d++)
                            dv[kv + d] += p[j] * go[d];
                    }
                    for (int64_t j = 0; j <= i; j++) {
                        const int64_t kv = ((b * S + j) * Hkv + g) * hd;
                        double ds = p[j] * (dp[j] - pdp) * scale;
                        dp[j] = ds;
                        for (int64_t d = 0; d < hd; d++) {
                            dqi[d] += ds * k[kv + d];
                            dk[kv + d] += ds * qi[d];
                        }
                    }
                    for (int64_t j = i + 1; j < S; j++)
                        dp[j] = 0;
                }
}

void moe_ref_attention_decode(double *out, double *att, const double *q, const double *kcache,
                              const double *vcache, int64_t pos, int64_t H, int64_t Hkv, int64_t hd)
{
    const int64_t group = H / Hkv, n = pos + 1;
    const double scale = 1.0 / sqrt((double)hd);
#pragma omp parallel for schedule(static)
    for (int64_t h = 0; h < H; h++) {
        const int64_t g = h / group;
        double *p = att + h * n;
        for (int64_t j = 0; j < n; j++)
            p[j] = dot(q + h * hd, kcache + (j * Hkv + g) * hd, hd) * scale;
        softmax_inplace(p, n);
        double *o = out + h * hd;
        for (int64_t d = 0; d < hd; d++)
            o[d] = 0;
        for (int64_t j = 0; j < n; j++)
            for (int64_t d = 0; d < hd; d++)
                o[d] += p[j] * vcache[(j * Hkv + g) * hd + d];
    }
}
