/*
 * The cpu router ops in fp32: jitter, softmax / sigmoid scores, noisy gating and its
 * smooth load. Same draws (Philox keyed by (t, i)) and the same tie rules as ref/router.c;
 * the router GEMM itself is matmul_forward (cblas_sgemm). These ops touch T·E values,
 * a small fraction of the layer's time, so transcendental functions stay scalar.
 */
#include <math.h>
#include <stdlib.h>

#include "cpu/cpu.h"

static float softplusf(float x)
{
    return x > 0 ? x + log1pf(expf(-x)) : log1pf(expf(x));
}

/* in double for the smooth load: softplusf underflows to 0 below about −104 */
static double softplus(double x)
{
    return x > 0 ? x + log1p(exp(-x)) : log1p(exp(x));
}

static double sigmoid(double x)
{
    if (x >= 0)
        return 1.0 / (1.0 + exp(-x));
    double ex = exp(x);
    return ex / (1.0 + ex);
}

static float sigmoidf(float x)
{
    if (x >= 0)
        return 1.0f / (1.0f + expf(-x));
    float ex = expf(x);
    return ex / (1.0f + ex);
}

static void cpu_jitter_forward(moe_backend *b, moe_tensor xr, moe_tensor u, moe_tensor x, double eps, uint64_t seed,
                               int64_t layer, moe_key key, int64_t T, int64_t d)
{
    const uint32_t stream = moe_rng_stream(MOE_RNG_JITTER, layer, key);
    float *xrr = F(xr), *uu = F(u);
    const float *xx = F(x);
#pragma omp parallel for schedule(static)
    for (int64_t t = 0; t < T; t++)
        for (int64_t i = 0; i < d; i++) {
            double r = moe_rand_uniform(seed, stream, (uint32_t)key.step, key.token0 + (uint32_t)t, (uint32_t)i);
            float ui = (float)(1.0 - eps + 2.0 * eps * r);
            uu[t * d + i] = ui;
            xrr[t * d + i] = xx[t * d + i] * ui;
        }
}

static void cpu_jitter_backward(moe_backend *b, moe_tensor dx, moe_tensor dxr, moe_tensor u, int64_t T, int64_t d)
{
    float *g = F(dx);
    const float *gr = F(dxr), *uu = F(u);
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < T * d; i++)
        g[i] += gr[i] * uu[i];
}

static void cpu_scores_forward(moe_backend *b, moe_tensor s, moe_tensor h, moe_score_fn fn, int64_t T, int64_t E)
{
    float *ss = F(s);
    const float *hh = F(h);
    if (fn == MOE_SCORE_SIGMOID) {
#pragma omp parallel for schedule(static)
        for (int64_t i = 0; i < T * E; i++)
            ss[i] = sigmoidf(hh[i]);
        return;
    }
#pragma omp parallel for schedule(static)
    for (int64_t t = 0; t < T; t++) {
        const float *zt = hh + t * E;
        float *st = ss + t * E;
        float m = zt[0];
        for (int64_t e = 1; e < E; e++)
            m = zt[e] > m ? zt[e] : m;
        float sum = 0;
        for (int64_t e = 0; e < E; e++) {
            st[e] = expf(zt[e] - m);
            sum += st[e];
        }
        const float inv = 1.0f / sum;
        for (int64_t e = 0; e < E; e++)
            st[e] *= inv;
    }
}

static void cpu_scores_backward(moe_backend *b, moe_tensor dh, moe_tensor ds, moe_tensor s, moe_score_fn fn,
                                int64_t T, int64_t E)
{
    float *dz = F(dh);
    const float *g = F(ds), *ss = F(s);
    if (fn == MOE_SCORE_SIGMOID) {
#pragma omp parallel for schedule(static)
        for (int64_t i = 0; i < T * E; i++)
            dz[i] += g[i] * ss[i] * (1.0f - ss[i]);
        return;
    }
#pragma omp parallel for schedule(static)
    for (int64_t t = 0; t < T; t++) {
        const float *st = ss + t * E, *gt = g + t * E;
        float dot = 0;
        for (int64_t e = 0; e < E; e++)
            dot += gt[e] * st[e];
        for (int64_t e = 0; e < E; e++)
            dz[t * E + e] += st[e] * (gt[e] - dot);
    }
}

static void cpu_noisy_logits_forward(moe_backend *b, moe_tensor h, moe_tensor eps, moe_tensor z, moe_tensor zn,
                                     int training, uint64_t seed, int64_t layer, moe_key key, int64_t T, int64_t E)
{
    const uint32_t stream = moe_rng_stream(MOE_RNG_NOISE, layer, key);
    float *hh = F(h), *ee = F(eps);
    const float *zz = F(z), *zzn = F(zn);
#pragma omp parallel for schedule(static)
    for (int64_t t = 0; t < T; t++)
        for (int64_t e = 0; e < E; e++) {
            int64_t i = t * E + e;
            ee[i] = training ? (float)moe_rand_normal(seed, stream, (uint32_t)key.step, key.token0 + (uint32_t)t, (uint32_t)e) : 0.0f;
            hh[i] = zz[i] + ee[i] * softplusf(zzn[i]);
        }
}

static void cpu_noisy_logits_backward(moe_backend *b, moe_tensor *dz, moe_tensor *dzn, moe_tensor dh, moe_tensor eps,
                                      moe_tensor zn, int64_t T, int64_t E)
{
    float *gz = FOPT(dz), *gzn = FOPT(dzn);
    const float *g = F(dh), *ee = F(eps), *zzn = F(zn);
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < T * E; i++) {
        if (gz)
            gz[i] += g[i];
        if (gzn)
            gzn[i] += g[i] * ee[i] * sigmoidf(zzn[i]);
    }
}

/*
 * The k-th and (k+1)-th largest of a row (ties to the lower index), and whether e is in
 * the top k, as ref/router.c's kth_indices: k and E are small, so repeated argmax over a
 * stack bitmap of taken experts is enough. Threshold of e: index, or -1 when k >= E.
 */
static void row_thresholds(int64_t *thr /* [E] */, const float *ht, int64_t E, int64_t k, unsigned char *taken)
{
    int64_t ik = -1, ik1 = -1;
    for (int64_t e = 0; e < E; e++)
        taken[e] = 0;
    for (int64_t r = 0; r <= k && r < E; r++) {
        int64_t best = -1;
        for (int64_t e = 0; e < E; e++)
            if (!taken[e] && (best < 0 || ht[e] > ht[best]))
                best = e;
        taken[best] = (unsigned char)(r < k ? 1 : 2); /* 1: in the top k; 2: the (k+1)-th */
        if (r == k - 1)
            ik = best;
        if (r == k)
            ik1 = best;
    }
    for (int64_t e = 0; e < E; e++)
        thr[e] = k >= E ? -1 : (taken[e] == 1 ? ik1 : ik);
}

static double norm_pdf(double x)
{
    return 0.39894228040143267794 * exp(-0.5 * x * x);
}

static double norm_cdf(double x)
{
    return 0.5 * erfc(-x * 0.70710678118654752440);
}

/*
 * Φ(a/sd) with sd = softplus(zn), and ∂Φ/∂a = φ(a/sd)/sd, written so that sd may
 * underflow to 0 (zn below about −745 in double; about −104 in float, which is why these
 * run in double here as in ref/router.c): then the noise is nil and Φ(a/sd) is the step
 * at a = 0, flat on both sides. Neither divides by zero nor forms 0·∞; NaN in, NaN out.
 */
static double noisy_cdf(double a, double zn)
{
    double sd = softplus(zn);
    if (sd == 0)
        return a > 0 ? 1.0 : a < 0 ? 0.0 : 0.5;
    return norm_cdf(a / sd); /* a/sd may be ±inf: Φ is 0 or 1 there */
}

/* ∂Φ(a/sd)/∂a, and u = a/sd where that is not 0 (else u = 0, so g·u stays 0) */
static double noisy_pdf(double a, double zn, double *u)
{
    double sd = softplus(zn);
    *u = 0;
    if (sd == 0)
        return 0;
    double v = a / sd, p = norm_pdf(v);
    if (p == 0)
        return 0;
    *u = v;
    return p / sd;
}

/* Per-thread rows of thresholds need E int64 and E bytes; E is at most a few hundred,
 * so a VLA-free fixed split: experts beyond this many use the heap once per thread. */
#define STACK_E 1024
/* Token blocks of the load's sum (the scratch reserve() sizes: 2·512·E floats). */
#define LOAD_BLOCKS 512

static void cpu_noisy_load_forward(moe_backend *b, moe_tensor load, moe_tensor z, moe_tensor zn, moe_tensor h,
                                   int64_t k, int64_t T, int64_t E)
{
    const float *zz = F(z), *zzn = F(zn), *hh = F(h);
    float *ld = F(load);
    /* Partial loads over LOAD_BLOCKS fixed token blocks, added in block order: the same
     * bits at any thread count. */
    double *part = (double *)moe_cpu_scratch(b, 2 * LOAD_BLOCKS * E, "noisy_load_forward");
    if (!part)
        return;
    for (int64_t i = 0; i < LOAD_BLOCKS * E; i++)
        part[i] = 0;
#pragma omp parallel
    {
        int64_t thr_s[STACK_E];
        unsigned char taken_s[STACK_E];
        int64_t *thr = E <= STACK_E ? thr_s : malloc((size_t)E * sizeof *thr);
        unsigned char *taken = E <= STACK_E ? taken_s : malloc((size_t)E);
#pragma omp for schedule(static)
        for (int64_t blk = 0; blk < LOAD_BLOCKS; blk++) {
            double *acc = part + blk * E;
            for (int64_t t = T * blk / LOAD_BLOCKS; t < T * (blk + 1) / LOAD_BLOCKS && thr && taken; t++) {
                row_thresholds(thr, hh + t * E, E, k, taken);
                for (int64_t e = 0; e < E; e++) {
                    int64_t i = t * E + e, j = thr[e];
                    acc[e] += j < 0 ? 1.0 : noisy_cdf((double)zz[i] - hh[t * E + j], zzn[i]);
                }
            }
        }
        if (E > STACK_E) {
            free(thr);
            free(taken);
        }
    }
    for (int64_t e = 0; e < E; e++) {
        double s = 0;
        for (int64_t blk = 0; blk < LOAD_BLOCKS; blk++)
            s += part[blk * E + e];
        ld[e] = (float)s;
    }
}

static void cpu_noisy_load_backward(moe_backend *b, moe_tensor *dz, moe_tensor *dzn, moe_tensor *dh,
                                    moe_tensor dload, moe_tensor z, moe_tensor zn, moe_tensor h, int64_t k,
                                    int64_t T, int64_t E)
{
    const float *zz = F(z), *zzn = F(zn), *hh = F(h), *dl = F(dload);
    float *gz = FOPT(dz), *gzn = FOPT(dzn), *gh = FOPT(dh);
#pragma omp parallel
    {
        int64_t thr_s[STACK_E];
        unsigned char taken_s[STACK_E];
        int64_t *thr = E <= STACK_E ? thr_s : malloc((size_t)E * sizeof *thr);
        unsigned char *taken = E <= STACK_E ? taken_s : malloc((size_t)E);
#pragma omp for schedule(static)
        for (int64_t t = 0; t < T; t++) {
            if (!thr || !taken)
                continue;
            row_thresholds(thr, hh + t * E, E, k, taken);
            for (int64_t e = 0; e < E; e++) {
                int64_t i = t * E + e, j = thr[e];
                if (j < 0)
                    continue;
                double u, g = dl[e] * noisy_pdf((double)zz[i] - hh[t * E + j], zzn[i], &u);
                if (gz)
                    gz[i] += (float)g;
                if (gh)
                    gh[t * E + j] -= (float)g;
                if (gzn)
                    gzn[i] -= (float)(g * u * sigmoid(zzn[i]));
            }
        }
        if (E > STACK_E) {
            free(thr);
            free(taken);
        }
    }
}

void moe_cpu_router_ops(moe_backend *b)
{
    b->jitter_forward = cpu_jitter_forward;
    b->jitter_backward = cpu_jitter_backward;
    b->scores_forward = cpu_scores_forward;
    b->scores_backward = cpu_scores_backward;
    b->noisy_logits_forward = cpu_noisy_logits_forward;
    b->noisy_logits_backward = cpu_noisy_logits_backward;
    b->noisy_load_forward = cpu_noisy_load_forward;
    b->noisy_load_backward = cpu_noisy_load_backward;
}
