/*
 * The router in double: input jitter (Switch), softmax / sigmoid scores, noisy gating
 * and Shazeer's smooth load estimator (Shazeer et al. 2017, "Outrageously large
 * neural networks", appendix A). Selection itself lives in select.c.
 */
#include <math.h>
#include <stdlib.h>

#include "ref/ref.h"

/* Below this many elements a thread team costs more than it saves (and on a busy
 * machine its spinning barriers cost far more). */
#define PAR_MIN 16384

/* softplus(x) = log(1 + e^x) without overflow for large x or loss of digits for small. */
static double softplus(double x)
{
    return x > 0 ? x + log1p(exp(-x)) : log1p(exp(x));
}

/* softplus'(x) = sigmoid(x), written so neither branch overflows. */
static double sigmoid(double x)
{
    if (x >= 0)
        return 1.0 / (1.0 + exp(-x));
    double ex = exp(x);
    return ex / (1.0 + ex);
}

/* ---- jitter ------------------------------------------------------------- */

void moe_ref_jitter_forward(double *xr, double *u, const double *x, double eps, uint64_t seed, int64_t layer,
                            moe_key key, int64_t T, int64_t d)
{
    /* The draw is keyed by (t, i), not by thread or position in a loop, so any split
     * of the tokens (threads, ranks, backends) multiplies by the same numbers. */
    const uint32_t stream = moe_rng_stream(MOE_RNG_JITTER, layer, key);
#pragma omp parallel for schedule(static) if (T * d >= PAR_MIN)
    for (int64_t t = 0; t < T; t++)
        for (int64_t i = 0; i < d; i++) {
            double r = moe_rand_uniform(seed, stream, (uint32_t)key.step, key.token0 + (uint32_t)t, (uint32_t)i);
            double ui = 1.0 - eps + 2.0 * eps * r;
            u[t * d + i] = ui;
            xr[t * d + i] = x[t * d + i] * ui;
        }
}

void moe_ref_jitter_backward(double *dx, const double *dxr, const double *u, int64_t T, int64_t d)
{
#pragma omp parallel for schedule(static) if (T * d >= PAR_MIN)
    for (int64_t i = 0; i < T * d; i++)
        dx[i] += dxr[i] * u[i];
}

/* ---- scores --------------------------------------------------------------- */

void moe_ref_softmax_forward(double *s, const double *z, int64_t T, int64_t E)
{
#pragma omp parallel for schedule(static) if (T * E >= PAR_MIN)
    for (int64_t t = 0; t < T; t++) {
        const double *zt = z + t * E;
        double *st = s + t * E;
        /* Subtracting the row max keeps exp() from overflowing; the result is unchanged. */
        double m = zt[0];
        for (int64_t e = 1; e < E; e++)
            if (zt[e] > m)
                m = zt[e];
        double sum = 0;
        for (int64_t e = 0; e < E; e++) {
            st[e] = exp(zt[e] - m);
            sum += st[e];
        }
        for (int64_t e = 0; e < E; e++)
            st[e] /= sum;
    }
}

void moe_ref_softmax_backward(double *dz, const double *ds, const double *s, int64_t T, int64_t E)
{
#pragma omp parallel for schedule(static) if (T * E >= PAR_MIN)
    for (int64_t t = 0; t < T; t++) {
        const double *st = s + t * E, *dst = ds + t * E;
        double dot = 0;
        for (int64_t e = 0; e < E; e++)
            dot += dst[e] * st[e];
        for (int64_t e = 0; e < E; e++)
            dz[t * E + e] += st[e] * (dst[e] - dot);
    }
}

void moe_ref_sigmoid_forward(double *s, const double *z, int64_t n)
{
#pragma omp parallel for schedule(static) if (n >= PAR_MIN)
    for (int64_t i = 0; i < n; i++)
        s[i] = sigmoid(z[i]);
}

void moe_ref_sigmoid_backward(double *dz, const double *ds, const double *s, int64_t n)
{
#pragma omp parallel for schedule(static) if (n >= PAR_MIN)
    for (int64_t i = 0; i < n; i++)
        dz[i] += ds[i] * s[i] * (1.0 - s[i]);
}

/* ---- noisy gating ------------------------------------------------------------ */

void moe_ref_noisy_logits_forward(double *h, double *eps, const double *z, const double *zn, int training,
                                  uint64_t seed, int64_t layer, moe_key key, int64_t T, int64_t E)
{
    const uint32_t stream = moe_rng_stream(MOE_RNG_NOISE, layer, key);
#pragma omp parallel for schedule(static) if (T * E >= PAR_MIN)
    for (int64_t t = 0; t < T; t++)
        for (int64_t e = 0; e < E; e++) {
            int64_t i = t * E + e;
            /* eps is saved (0 at inference) so backward needs no second draw. */
            eps[i] = training ? moe_rand_normal(seed, stream, (uint32_t)key.step, key.token0 + (uint32_t)t, (uint32_t)e) : 0.0;
            h[i] = z[i] + eps[i] * softplus(zn[i]);
        }
}

void moe_ref_noisy_logits_backward(double *dz, double *dzn, const double *dh, const double *eps,
                                   const double *zn, int64_t T, int64_t E)
{
#pragma omp parallel for schedule(static) if (T * E >= PAR_MIN)
    for (int64_t i = 0; i < T * E; i++) {
        if (dz)
            dz[i] += dh[i];
        if (dzn)
            dzn[i] += dh[i] * eps[i] * sigmoid(zn[i]);
    }
}

/*
 * The k-th and (k+1)-th largest entries of one row (0-based ranks k-1 and k), ties to
 * the lower index, as selection orders them. The threshold of expert e is the k-th
 * largest of the row without e: the (k+1)-th of the row when e itself ranks in the
 * top k, else the k-th. Returned as indices because the gradient flows into h there.
 */
static void kth_indices(const double *ht, int64_t E, int64_t k, int64_t *ik, int64_t *ik1, int64_t *rank_of)
{
    for (int64_t e = 0; e < E; e++)
        rank_of[e] = -1;
    for (int64_t r = 0; r <= k && r < E; r++) {
        int64_t best = -1;
        for (int64_t e = 0; e < E; e++)
            if (rank_of[e] < 0 && (best < 0 || ht[e] > ht[best]))
                best = e;
        rank_of[best] = r;
        if (r == k - 1)
            *ik = best;
        if (r == k)
            *ik1 = best;
    }
}

/* Index of the threshold of (t, e), or -1 when every expert is in the top k (k >= E). */
static int64_t threshold_index(int64_t e, int64_t k, int64_t E, int64_t ik, int64_t ik1, const int64_t *rank_of)
{
    if (k >= E)
        return -1;
    return (rank_of[e] >= 0 && rank_of[e] < k) ? ik1 : ik;
}

/* The standard normal pdf and cdf; erfc keeps the far left tail accurate. */
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
 * underflow to 0 (zn below about −745 in double; about −104 in float, which is why the
 * cpu twin computes these in double too): then the noise is nil and Φ(a/sd) is the step
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

/* Per token, the threshold index of every expert: thr[t·E + e] (-1: always selected). */
static int64_t *threshold_indices(const double *h, int64_t k, int64_t T, int64_t E)
{
    int64_t *thr = malloc((size_t)(T * E) * sizeof *thr);
    if (!thr)
        return NULL;
#pragma omp parallel if (T * E >= PAR_MIN)
    {
        int64_t *rank_of = malloc((size_t)E * sizeof *rank_of);
#pragma omp for schedule(static)
        for (int64_t t = 0; t < T; t++) {
            int64_t ik = -1, ik1 = -1;
            if (rank_of)
                kth_indices(h + t * E, E, k, &ik, &ik1, rank_of);
            for (int64_t e = 0; e < E; e++)
                thr[t * E + e] = rank_of ? threshold_index(e, k, E, ik, ik1, rank_of) : -2;
        }
        free(rank_of);
    }
    return thr;
}

/*
 * load_e = Σ_t P(z_te + ε·softplus(zn_te) > thr_te) with the noise of the other experts
 * held at its drawn value: a smooth stand-in for "how many tokens chose e" whose
 * gradient reaches the router. Sums run over t in order, so the result does not depend
 * on the number of threads.
 */
void moe_ref_noisy_load_forward(double *load, const double *z, const double *zn, const double *h, int64_t k,
                                int64_t T, int64_t E)
{
    int64_t *thr = threshold_indices(h, k, T, E);
#pragma omp parallel for schedule(static) if (T * E >= PAR_MIN)
    for (int64_t e = 0; e < E; e++) {
        double acc = 0;
        for (int64_t t = 0; t < T; t++) {
            int64_t i = t * E + e, j = thr ? thr[i] : -2;
            if (j == -2) {
                acc = NAN; /* out of memory: poison rather than return a wrong number */
                break;
            }
            acc += j < 0 ? 1.0 : noisy_cdf(z[i] - h[t * E + j], zn[i]);
        }
        load[e] = acc;
    }
    free(thr);
}

void moe_ref_noisy_load_backward(double *dz, double *dzn, double *dh, const double *dload, const double *z,
                                 const double *zn, const double *h, int64_t k, int64_t T, int64_t E)
{
    int64_t *thr = threshold_indices(h, k, T, E);
    if (!thr)
        return;
    /* Parallel over tokens: each token writes only its own row of dz, dzn and dh. */
#pragma omp parallel for schedule(static) if (T * E >= PAR_MIN)
    for (int64_t t = 0; t < T; t++)
        for (int64_t e = 0; e < E; e++) {
            int64_t i = t * E + e, j = thr[i];
            if (j < 0)
                continue; /* a constant 1: no gradient */
            double u, g = dload[e] * noisy_pdf(z[i] - h[t * E + j], zn[i], &u); /* ∂/∂z of Φ(a/sd) */
            if (dz)
                dz[i] += g;
            if (dh)
                dh[t * E + j] -= g;
            if (dzn) /* ∂/∂zn = −φ(u)/sd · u · softplus'(zn) */
                dzn[i] -= g * u * sigmoid(zn[i]);
        }
    free(thr);
}
