/*
 * The grouped expert FFN on the cpu backend (and the single FFN of shared experts and
 * the dense residual branch, which is the same code with one "expert").
 *
 *   h1 = x·w1, [h3 = x·w3], a = act(h1) [⊙ h3], out = a·w2      per expert, over its rows
 *
 * Work is cut into independent tasks run by one OpenMP team, each task calling
 * single-threaded cblas_sgemm (OpenBLAS is kept at one thread: its own pthreads pool
 * and OpenMP's would fight over the cores):
 *  - forward and the input-gradient half of backward are row-independent, so a task is a
 *    block of one expert's rows doing the whole chain (GEMM, fused activation, GEMM) while
 *    its rows are in cache;
 *  - weight gradients reduce over rows, so a task is a block of one expert's f columns
 *    (dW1[:, cols] += xᵀ·g1[:, cols], dW2[cols, :] += a[:, cols]ᵀ·dy) — no two tasks
 *    write the same element, and every element's sum runs over rows in one fixed order.
 * Blocks are sized so there are several tasks per thread (dynamic schedule balances the
 * ragged experts) while each GEMM keeps at least 64 rows or columns.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "cpu/cpu.h"
#include "ref/ref.h"

/* ---- activations: vectorisable fp32 ------------------------------------------ */

/* The clamps below are float compares; with GCC's default -ftrapping-math a compare
 * "may trap", which stops if-conversion and so vectorisation of the activation loops
 * (measured: scalar SwiGLU passes). Nothing here relies on FP traps. */
#pragma GCC optimize("no-trapping-math")

#include "cpu/fastmath.h"

static inline float sigmoid_fast(float x)
{
    return 1.0f / (1.0f + moe_exp_fast(-x));
}

#define SQRT_2_OVER_PI 0.79788456080286535588f
#define GELU_TANH_C 0.044715f

/* tanh(u) = 1 − 2/(e^{2u} + 1), exact at both ends in float */
static inline float tanh_fast(float u)
{
    return 1.0f - 2.0f / (moe_exp_fast(2.0f * u) + 1.0f);
}

/* The activation passes are the only non-BLAS arithmetic of the experts: compiled for
 * AVX-512 and AVX2 too, picked at load time (GCC function multi-versioning). */
#if defined(__GNUC__) && defined(__x86_64__) && !defined(__clang__)
#define MOE_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define MOE_CLONES
#endif

/* a = act(h1) [⊙ h3] over m elements */
MOE_CLONES static void act_forward(float *a, const float *h1, const float *h3, int64_t m, moe_activation act)
{
    switch (act) {
    case MOE_ACT_SWIGLU:
#pragma omp simd
        for (int64_t i = 0; i < m; i++)
            a[i] = h1[i] * sigmoid_fast(h1[i]) * h3[i];
        break;
    case MOE_ACT_RELU:
#pragma omp simd
        for (int64_t i = 0; i < m; i++)
            a[i] = h1[i] < 0 ? 0.0f : h1[i]; /* NaN stays NaN, as torch.relu */
        break;
    case MOE_ACT_GELU_TANH:
#pragma omp simd
        for (int64_t i = 0; i < m; i++) {
            float x = h1[i];
            a[i] = 0.5f * x * (1.0f + tanh_fast(SQRT_2_OVER_PI * (x + GELU_TANH_C * x * x * x)));
        }
        break;
    case MOE_ACT_GELU:
    case MOE_ACT_GEGLU:
        for (int64_t i = 0; i < m; i++) {
            float g = 0.5f * h1[i] * (1.0f + erff(h1[i] * 0.70710678118654752440f));
            a[i] = act == MOE_ACT_GEGLU ? g * h3[i] : g;
        }
        break;
    }
}

/* From da (in g1): g1 = ∂L/∂h1, and g3 = ∂L/∂h3 for GLU kinds; one pass. */
MOE_CLONES static void act_backward(float *g1, float *g3, const float *h1, const float *h3, int64_t m, moe_activation act)
{
    switch (act) {
    case MOE_ACT_SWIGLU:
#pragma omp simd
        for (int64_t i = 0; i < m; i++) {
            float x = h1[i], sg = sigmoid_fast(x), da = g1[i];
            g3[i] = da * x * sg;
            g1[i] = da * h3[i] * sg * (1.0f + x * (1.0f - sg));
        }
        break;
    case MOE_ACT_RELU:
#pragma omp simd
        for (int64_t i = 0; i < m; i++)
            g1[i] = h1[i] > 0 ? g1[i] : 0.0f;
        break;
    case MOE_ACT_GELU_TANH:
#pragma omp simd
        for (int64_t i = 0; i < m; i++) {
            float x = h1[i];
            float th = tanh_fast(SQRT_2_OVER_PI * (x + GELU_TANH_C * x * x * x));
            float du = SQRT_2_OVER_PI * (1.0f + 3.0f * GELU_TANH_C * x * x);
            g1[i] *= 0.5f * (1.0f + th) + 0.5f * x * (1.0f - th * th) * du;
        }
        break;
    case MOE_ACT_GELU:
    case MOE_ACT_GEGLU:
        for (int64_t i = 0; i < m; i++) {
            float x = h1[i], cdf = 0.5f * (1.0f + erff(x * 0.70710678118654752440f));
            float grad = cdf + x * 0.39894228040143267794f * expf(-0.5f * x * x);
            if (act == MOE_ACT_GEGLU) {
                g3[i] = g1[i] * x * cdf;
                g1[i] *= h3[i] * grad;
            } else {
                g1[i] *= grad;
            }
        }
        break;
    }
}

/* ---- task lists -------------------------------------------------------------- */

typedef struct {
    int64_t e, lo, hi; /* expert, and a block [lo, hi) of its rows or of its f columns */
} task;

static int team_size(moe_backend *b)
{
    int nt = moe_cpu(b)->threads;
    return nt > 0 ? nt : 1;
}

/* Block length so that total/len is about 8 tasks per thread, at least `floor`. */
static int64_t block_len(int64_t total, int nt, int64_t floor)
{
    int64_t len = (total + 8 * nt - 1) / (8 * nt);
    len = (len + 15) / 16 * 16;
    return len < floor ? floor : len;
}

/* Splits each expert's [0, len_e) into blocks of `len`; tasks go into t (capacity given). */
static int64_t make_tasks(task *t, const int64_t *offsets, int64_t E, int64_t span /* 0: rows */, int64_t len)
{
    int64_t n = 0;
    for (int64_t e = 0; e < E; e++) {
        int64_t rows = offsets[e + 1] - offsets[e];
        if (rows == 0)
            continue;
        int64_t m = span ? span : rows;
        for (int64_t lo = 0; lo < m; lo += len)
            t[n++] = (task){e, lo, lo + len < m ? lo + len : m};
    }
    return n;
}

/* Task lists live on the stack when small; this bound covers E·blocks for the shapes
 * a layer makes (blocks <= 8·threads + E). */
#define MAX_TASKS 4096

/* ---- the engine ------------------------------------------------------------------ */

typedef struct {
    float *ye, *h1, *h3, *a;
    const float *xe, *w1, *w3, *w2;
    const int64_t *offsets;
    int64_t E, d, f;
    moe_activation act;
} ffn_args;

static void grouped_forward(moe_backend *b, const ffn_args *A)
{
    const int glu = moe_act_is_glu(A->act);
    const int64_t d = A->d, f = A->f, n = A->offsets[A->E];
    if (n == 0)
        return;
    const int nt = team_size(b);
    task tasks[MAX_TASKS];
    int64_t len = block_len(n, nt, 64);
    while ((n + len - 1) / len + A->E > MAX_TASKS)
        len *= 2;
    int64_t nts = make_tasks(tasks, A->offsets, A->E, 0, len);
    const int old = moe_cpu_blas_threads(1);
#pragma omp parallel for schedule(dynamic, 1) num_threads(nt)
    for (int64_t q = 0; q < nts; q++) {
        const task tk = tasks[q];
        const int64_t r = A->offsets[tk.e] + tk.lo, m = tk.hi - tk.lo;
        const float *x = A->xe + r * d, *w1 = A->w1 + tk.e * d * f, *w2 = A->w2 + tk.e * f * d;
        float *h1 = A->h1 + r * f, *h3 = glu ? A->h3 + r * f : NULL, *a = A->a + r * f;
        moe_cpu_sgemm(0, 0, m, f, d, 1.0f, x, d, w1, f, 0.0f, h1, f);
        if (glu)
            moe_cpu_sgemm(0, 0, m, f, d, 1.0f, x, d, A->w3 + tk.e * d * f, f, 0.0f, h3, f);
        act_forward(a, h1, h3, m * f, A->act);
        moe_cpu_sgemm(0, 0, m, d, f, 1.0f, a, f, w2, d, 0.0f, A->ye + r * d, d);
    }
    moe_cpu_blas_threads(old);
}

typedef struct {
    float *dxe, *dw1, *dw3, *dw2;
    const float *dye, *h1, *h3, *a, *xe, *w1, *w3, *w2;
    const int64_t *offsets;
    int64_t E, d, f;
    moe_activation act;
} ffn_grad_args;

static void grouped_backward(moe_backend *b, const ffn_grad_args *A)
{
    const int glu = moe_act_is_glu(A->act);
    const int64_t d = A->d, f = A->f, E = A->E, n = A->offsets[E];
    if (n == 0)
        return;
    float *G1 = moe_cpu_scratch(b, (glu ? 2 : 1) * n * f);
    if (!G1)
        return;
    float *G3 = glu ? G1 + n * f : NULL;
    const int nt = team_size(b);
    task tasks[MAX_TASKS];

    /* rows: da = dy·w2ᵀ, the activation's backward, dx += g1·w1ᵀ [+ g3·w3ᵀ] */
    int64_t len = block_len(n, nt, 64);
    while ((n + len - 1) / len + E > MAX_TASKS)
        len *= 2;
    int64_t nts = make_tasks(tasks, A->offsets, E, 0, len);
    const int old = moe_cpu_blas_threads(1);
#pragma omp parallel for schedule(dynamic, 1) num_threads(nt)
    for (int64_t q = 0; q < nts; q++) {
        const task tk = tasks[q];
        const int64_t r = A->offsets[tk.e] + tk.lo, m = tk.hi - tk.lo;
        float *g1 = G1 + r * f, *g3 = glu ? G3 + r * f : NULL;
        moe_cpu_sgemm(0, 1, m, f, d, 1.0f, A->dye + r * d, d, A->w2 + tk.e * f * d, d, 0.0f, g1, f);
        act_backward(g1, g3, A->h1 + r * f, glu ? A->h3 + r * f : NULL, m * f, A->act);
        if (A->dxe) {
            moe_cpu_sgemm(0, 1, m, d, f, 1.0f, g1, f, A->w1 + tk.e * d * f, f, 1.0f, A->dxe + r * d, d);
            if (glu)
                moe_cpu_sgemm(0, 1, m, d, f, 1.0f, g3, f, A->w3 + tk.e * d * f, f, 1.0f, A->dxe + r * d, d);
        }
    }

    /* columns of f: dW1[:, c] += xᵀ·g1[:, c], dW3 likewise, dW2[c, :] += a[:, c]ᵀ·dy */
    int64_t active = 0;
    for (int64_t e = 0; e < E; e++)
        active += A->offsets[e + 1] > A->offsets[e];
    int64_t clen = block_len(f * active, nt, 64);
    while (((f + clen - 1) / clen) * active > MAX_TASKS)
        clen *= 2;
    nts = make_tasks(tasks, A->offsets, E, f, clen);
#pragma omp parallel for schedule(dynamic, 1) num_threads(nt)
    for (int64_t q = 0; q < nts; q++) {
        const task tk = tasks[q];
        const int64_t r = A->offsets[tk.e], m = A->offsets[tk.e + 1] - r, c = tk.lo, w = tk.hi - tk.lo;
        const float *x = A->xe + r * d;
        moe_cpu_sgemm(1, 0, d, w, m, 1.0f, x, d, G1 + r * f + c, f, 1.0f, A->dw1 + tk.e * d * f + c, f);
        if (glu)
            moe_cpu_sgemm(1, 0, d, w, m, 1.0f, x, d, G3 + r * f + c, f, 1.0f, A->dw3 + tk.e * d * f + c, f);
        moe_cpu_sgemm(1, 0, w, d, m, 1.0f, A->a + r * f + c, f, A->dye + r * d, d, 1.0f,
                      A->dw2 + tk.e * f * d + c * d, d);
    }
    moe_cpu_blas_threads(old);
}

/* ---- the table's ops ------------------------------------------------------------ */

static void cpu_experts_forward(moe_backend *b, moe_tensor ye, moe_tensor h1, moe_tensor h3, moe_tensor a,
                                moe_tensor xe, moe_tensor w1, moe_tensor *w3, moe_tensor w2, const moe_bplan *p,
                                moe_activation act, int64_t d, int64_t f)
{
    const int glu = moe_act_is_glu(act);
    ffn_args A = {F(ye), F(h1), glu ? F(h3) : NULL, F(a), F(xe), F(w1), glu ? FOPT(w3) : NULL, F(w2),
                  p->offsets, p->E, d, f, act};
    grouped_forward(b, &A);
}

static void cpu_experts_backward(moe_backend *b, moe_tensor dxe, moe_tensor dw1, moe_tensor *dw3, moe_tensor dw2,
                                 moe_tensor dye, moe_tensor h1, moe_tensor h3, moe_tensor a, moe_tensor xe,
                                 moe_tensor w1, moe_tensor *w3, moe_tensor w2, const moe_bplan *p,
                                 moe_activation act, int64_t d, int64_t f)
{
    const int glu = moe_act_is_glu(act);
    ffn_grad_args A = {F(dxe), F(dw1), glu ? FOPT(dw3) : NULL, F(dw2), F(dye), F(h1), glu ? F(h3) : NULL, F(a),
                       F(xe), F(w1), glu ? FOPT(w3) : NULL, F(w2), p->offsets, p->E, d, f, act};
    grouped_backward(b, &A);
}

static void cpu_ffn_forward(moe_backend *b, moe_tensor out, moe_tensor h1, moe_tensor h3, moe_tensor a, moe_tensor x,
                            moe_tensor w1, moe_tensor *w3, moe_tensor w2, moe_activation act, int64_t n, int64_t d,
                            int64_t f)
{
    const int glu = moe_act_is_glu(act);
    const int64_t offsets[2] = {0, n};
    ffn_args A = {F(out), F(h1), glu ? F(h3) : NULL, F(a), F(x), F(w1), glu ? FOPT(w3) : NULL, F(w2),
                  offsets, 1, d, f, act};
    grouped_forward(b, &A);
}

static void cpu_ffn_backward(moe_backend *b, moe_tensor *dx, moe_tensor dw1, moe_tensor *dw3, moe_tensor dw2,
                             moe_tensor dout, moe_tensor h1, moe_tensor h3, moe_tensor a, moe_tensor x, moe_tensor w1,
                             moe_tensor *w3, moe_tensor w2, moe_activation act, int64_t n, int64_t d, int64_t f)
{
    const int glu = moe_act_is_glu(act);
    const int64_t offsets[2] = {0, n};
    ffn_grad_args A = {FOPT(dx), F(dw1), glu ? FOPT(dw3) : NULL, F(dw2), F(dout), F(h1), glu ? F(h3) : NULL, F(a),
                       F(x), F(w1), glu ? FOPT(w3) : NULL, F(w2), offsets, 1, d, f, act};
    grouped_backward(b, &A);
}

void moe_cpu_experts_ops(moe_backend *b)
{
    b->experts_forward = cpu_experts_forward;
    b->experts_backward = cpu_experts_backward;
    b->ffn_forward = cpu_ffn_forward;
    b->ffn_backward = cpu_ffn_backward;
}
