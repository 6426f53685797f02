/*
 * The experts: one feed-forward network per expert, no biases (Mixtral has none).
 *
 *   h1 = x·w1, [h3 = x·w3], a = act(h1) [⊙ h3], out = a·w2
 *
 * The backward needs no scratch: the gradient at the activation, da = dout·w2ᵀ, is
 * recomputed one element at a time (it costs one more n·f·d pass) so that the
 * reference never allocates inside a training step.
 */
#include <math.h>
#include <stddef.h>
#include <stdlib.h>

#include "ref/ref.h"

#define SQRT_2_OVER_PI 0.79788456080286535587989211986876
#define INV_SQRT_2 0.70710678118654752440084436210485
#define INV_SQRT_2PI 0.39894228040143267793994605993438
#define GELU_TANH_C 0.044715

int moe_act_is_glu(moe_activation a)
{
    return a == MOE_ACT_GEGLU || a == MOE_ACT_SWIGLU;
}

static double sigmoid(double x)
{
    /* Both branches stay finite for any x. */
    if (x >= 0)
        return 1.0 / (1.0 + exp(-x));
    double e = exp(x);
    return e / (1.0 + e);
}

static double gelu(double x)
{
    return 0.5 * x * (1.0 + erf(x * INV_SQRT_2));
}

static double gelu_grad(double x)
{
    /* Φ(x) + x·φ(x) */
    return 0.5 * (1.0 + erf(x * INV_SQRT_2)) + x * INV_SQRT_2PI * exp(-0.5 * x * x);
}

static double gelu_tanh(double x)
{
    return 0.5 * x * (1.0 + tanh(SQRT_2_OVER_PI * (x + GELU_TANH_C * x * x * x)));
}

static double gelu_tanh_grad(double x)
{
    double th = tanh(SQRT_2_OVER_PI * (x + GELU_TANH_C * x * x * x));
    double du = SQRT_2_OVER_PI * (1.0 + 3.0 * GELU_TANH_C * x * x);
    return 0.5 * (1.0 + th) + 0.5 * x * (1.0 - th * th) * du;
}

double moe_ref_act(moe_activation a, double x)
{
    switch (a) {
    case MOE_ACT_RELU: return x < 0 ? 0 : x; /* NaN stays NaN, as torch.relu */
    case MOE_ACT_GELU:
    case MOE_ACT_GEGLU: return gelu(x);
    case MOE_ACT_GELU_TANH: return gelu_tanh(x);
    case MOE_ACT_SWIGLU: return x * sigmoid(x);
    }
    return NAN;
}

/* ReLU's derivative at the kink is taken as 0 (PyTorch's convention). */
double moe_ref_act_grad(moe_activation a, double x)
{
    switch (a) {
    case MOE_ACT_RELU: return x > 0 ? 1 : 0;
    case MOE_ACT_GELU:
    case MOE_ACT_GEGLU: return gelu_grad(x);
    case MOE_ACT_GELU_TANH: return gelu_tanh_grad(x);
    case MOE_ACT_SWIGLU: {
        double sg = sigmoid(x);
        return sg * (1.0 + x * (1.0 - sg));
    }
    }
    return NAN;
}

void moe_ref_ffn_forward(double *out, double *h1, double *h3, double *a, const double *x, const double *w1,
                         const double *w3, const double *w2, moe_activation act, int64_t n, int64_t d, int64_t f)
{
    if (n <= 0)
        return;
    int glu = moe_act_is_glu(act);
    moe_ref_matmul_forward(h1, x, w1, n, d, f);
    if (glu)
        moe_ref_matmul_forward(h3, x, w3, n, d, f);
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < n * f; i++)
        a[i] = glu ? moe_ref_act(act, h1[i]) * h3[i] : moe_ref_act(act, h1[i]);
    moe_ref_matmul_forward(out, a, w2, n, f, d);
}

/* ∂L/∂a at (row t, column j): Σ_k dout[t,k]·w2[j,k]. */
static double act_grad_at(const double *dout, const double *w2, int64_t t, int64_t j, int64_t d)
{
    double acc = 0;
    for (int64_t k = 0; k < d; k++)
        acc += dout[t * d + k] * w2[j * d + k];
    return acc;
}

/* Gradients at the pre-activations h1 (and h3) of one element. */
static void pre_act_grads(double *g1, double *g3, double da, const double *h1, const double *h3, int64_t i,
                          moe_activation act)
{
    if (moe_act_is_glu(act)) {
        *g1 = da * h3[i] * moe_ref_act_grad(act, h1[i]);
        *g3 = da * moe_ref_act(act, h1[i]);
    } else {
        *g1 = da * moe_ref_act_grad(act, h1[i]);
        *g3 = 0;
    }
}

void moe_ref_ffn_backward_data(double *dx, double *dg1, double *dg3, const double *dout, const double *h1,
                               const double *h3,
                               const double *w1, const double *w3, const double *w2, moe_activation act, int64_t n,
                               int64_t d, int64_t f)
{
    const int glu = moe_act_is_glu(act);
    /* rows are independent, so parallel over rows */
#pragma omp parallel for schedule(static)
    for (int64_t t = 0; t < n; t++)
        for (int64_t j = 0; j < f; j++) {
            double g1, g3;
            pre_act_grads(&g1, &g3, act_grad_at(dout, w2, t, j, d), h1, h3, t * f + j, act);
            dg1[t * f + j] = g1;
            if (glu)
                dg3[t * f + j] = g3;
            for (int64_t k = 0; dx && k < d; k++) {
                double v = g1 * w1[k * f + j];
                if (glu)
                    v += g3 * w3[k * f + j];
                dx[t * d + k] += v;
            }
        }
}

void moe_ref_ffn_backward_weights(double *dw1, double *dw3, double *dw2, const double *dg1, const double *dg3,
                                  const double *dout,
                                  const double *a, const double *x, moe_activation act, int64_t n, int64_t d,
                                  int64_t f)
{
    const int glu = moe_act_is_glu(act);
    /* dw2 += aᵀ·dout */
    moe_ref_matmul_backward(NULL, dw2, dout, a, NULL, n, f, d);
    /* dw1 (dw3) += xᵀ·g1 (g3): columns j are independent, so parallel over columns (no races) */
#pragma omp parallel for schedule(static)
    for (int64_t j = 0; j < f; j++)
        for (int64_t t = 0; t < n; t++)
            for (int64_t k = 0; k < d; k++) {
                dw1[k * f + j] += x[t * d + k] * dg1[t * f + j];
                if (glu)
                    dw3[k * f + j] += x[t * d + k] * dg3[t * f + j];
            }
}

void moe_ref_ffn_backward(double *dx, double *dw1, double *dw3, double *dw2, const double *dout, const double *h1,
                          const double *h3, const double *a, const double *x, const double *w1, const double *w3,
                          const double *w2, moe_activation act, int64_t n, int64_t d, int64_t f)
{
    if (n <= 0)
        return;
    double *dg = malloc((size_t)((moe_act_is_glu(act) ? 2 : 1) * n * f) * sizeof *dg);
    if (!dg) { /* the oracle's own temporary; poison rather than leave gradients silently short */
        for (int64_t i = 0; i < d * f; i++)
            dw1[i] = NAN;
        return;
    }
    double *dg3 = moe_act_is_glu(act) ? dg + n * f : NULL;
    moe_ref_ffn_backward_data(dx, dg, dg3, dout, h1, h3, w1, w3, w2, act, n, d, f);
    moe_ref_ffn_backward_weights(dw1, dw3, dw2, dg, dg3, dout, a, x, act, n, d, f);
    free(dg);
}

void moe_ref_experts_forward(double *ye, double *h1, double *h3, double *a, const double *xe, const double *w1,
                             const double *w3, const double *w2, const int64_t *offsets, moe_activation act,
                             int64_t E, int64_t d, int64_t f)
{
    int glu = moe_act_is_glu(act);
    for (int64_t e = 0; e < E; e++) {
        int64_t r = offsets[e], n = offsets[e + 1] - offsets[e];
        moe_ref_ffn_forward(ye + r * d, h1 + r * f, glu ? h3 + r * f : NULL, a + r * f, xe + r * d,
                            w1 + e * d * f, glu ? w3 + e * d * f : NULL, w2 + e * f * d, act, n, d, f);
    }
}

void moe_ref_experts_backward(double *dxe, double *dw1, double *dw3, double *dw2, const double *dye,
                              const double *h1, const double *h3, const double *a, const double *xe,
                              const double *w1, const double *w3, const double *w2, const int64_t *offsets,
                              moe_activation act, int64_t E, int64_t d, int64_t f)
{
    int glu = moe_act_is_glu(act);
    for (int64_t e = 0; e < E; e++) {
        int64_t r = offsets[e], n = offsets[e + 1] - offsets[e];
        moe_ref_ffn_backward(dxe ? dxe + r * d : NULL, dw1 + e * d * f, glu ? dw3 + e * d * f : NULL,
                             dw2 + e * f * d, dye + r * d, h1 + r * f, glu ? h3 + r * f : NULL, a + r * f,
                             xe + r * d, w1 + e * d * f, glu ? w3 + e * d * f : NULL, w2 + e * f * d, act, n, d,
                             f);
    }
}
