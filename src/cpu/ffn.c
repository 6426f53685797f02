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

/* Task lists live on the stack; block_len keeps them within this. */
#define MAX_TASKS 4096
/* Columns of f per task of the weight-gradient pass: half of f (at least 64), fixed
 * by the shape; fewer, wider tasks pack x·ᵀ fewer times. */
static int64_t cols_per_task(int64_t f)
{
    int64_t c = (f / 2 + 63) / 64 * 64;
    return c < 64 ? 64 : c;
}

static int team_size(moe_backend *b)
{
    int nt = moe_cpu(b)->threads;
    return nt > 0 ? nt : 1;
}

/* Block length: a fixed function of the shape, never of the thread count (an element's
 * bits in OpenBLAS depend on where its block starts, cpu.h): `base`, doubled while the
 * task list would overflow. */
static int64_t block_len(int64_t total, int64_t E, int64_t base)
{
    int64_t len = base;
    while ((total + len - 1) / len + E > MAX_TASKS)
        len *= 2;
    return len;
}

/* Splits each expert's [0, rows[e]) (span 0) or [0, span) into blocks of `len`. */
static int64_t make_tasks(task *t, const int64_t *rows, int64_t E, int64_t span /* 0: rows */, int64_t len)
{
    int64_t n = 0;
    for (int64_t e = 0; e < E; e++) {
        if (rows[e] == 0)
            continue;
        int64_t m = span ? span : rows[e];
        for (int64_t lo = 0; lo < m; lo += len)
            t[n++] = (task){e, lo, lo + len < m ? lo + len : m};
    }
    return n;
}

static int64_t total_rows(const int64_t *rows, int64_t E)
{
    int64_t n = 0;
    for (int64_t e = 0; e < E; e++)
        n += rows[e];
    return n;
}

/* ---- the engine ------------------------------------------------------------------ */

/*
 * Expert e owns rows [begin[e], begin[e] + rows[e]) of every row-indexed buffer (a plan's
 * segments); its weights are slice e of w1, w3, w2 and of their gradients.
 */
typedef struct {
    const int64_t *begin, *rows;
    int64_t E, d, f;
    moe_activation act;
} groups;

static void grouped_forward(moe_backend *b, const groups *G, float *ye, float *h1, float *h3, float *a,
                            const float *xe, const float *w1, const float *w3, const float *w2)
{
    const int glu = moe_act_is_glu(G->act);
    const int64_t d = G->d, f = G->f, n = total_rows(G->rows, G->E);
    if (n == 0)
        return;
    task tasks[MAX_TASKS];
    const int64_t nts = make_tasks(tasks, G->rows, G->E, 0, block_len(n, G->E, MOE_ROW_BLOCK));
#pragma omp parallel for schedule(dynamic, 1) num_threads(team_size(b))
    for (int64_t q = 0; q < nts; q++) {
        const task tk = tasks[q];
        const int64_t r = G->begin[tk.e] + tk.lo, m = tk.hi - tk.lo;
        float *hr1 = h1 + r * f, *hr3 = glu ? h3 + r * f : NULL, *ar = a + r * f;
        moe_cpu_sgemm(0, 0, m, f, d, 1.0f, xe + r * d, d, w1 + tk.e * d * f, f, 0.0f, hr1, f);
        if (glu)
            moe_cpu_sgemm(0, 0, m, f, d, 1.0f, xe + r * d, d, w3 + tk.e * d * f, f, 0.0f, hr3, f);
        act_forward(ar, hr1, hr3, m * f, G->act);
        moe_cpu_sgemm(0, 0, m, d, f, 1.0f, ar, f, w2 + tk.e * f * d, d, 0.0f, ye + r * d, d);
    }
}

/* by rows: g1 = dy·w2ᵀ through the activation's backward (g3 with GLU), dx += g1·w1ᵀ [+ g3·w3ᵀ] */
static void grouped_backward_data(moe_backend *b, const groups *G, float *dxe, float *g1, float *g3, const float *dye,
                                  const float *h1, const float *h3, const float *w1, const float *w3,
                                  const float *w2)
{
    const int glu = moe_act_is_glu(G->act);
    const int64_t d = G->d, f = G->f, n = total_rows(G->rows, G->E);
    if (n == 0)
        return;
    task tasks[MAX_TASKS];
    const int64_t nts = make_tasks(tasks, G->rows, G->E, 0, block_len(n, G->E, MOE_ROW_BLOCK));
#pragma omp parallel for schedule(dynamic, 1) num_threads(team_size(b))
    for (int64_t q = 0; q < nts; q++) {
        const task tk = tasks[q];
        const int64_t r = G->begin[tk.e] + tk.lo, m = tk.hi - tk.lo;
        float *gr1 = g1 + r * f, *gr3 = glu ? g3 + r * f : NULL;
        moe_cpu_sgemm(0, 1, m, f, d, 1.0f, dye + r * d, d, w2 + tk.e * f * d, d, 0.0f, gr1, f);
        act_backward(gr1, gr3, h1 + r * f, glu ? h3 + r * f : NULL, m * f, G->act);
        if (dxe) {
            moe_cpu_sgemm(0, 1, m, d, f, 1.0f, gr1, f, w1 + tk.e * d * f, f, 1.0f, dxe + r * d, d);
            if (glu)
                moe_cpu_sgemm(0, 1, m, d, f, 1.0f, gr3, f, w3 + tk.e * d * f, f, 1.0f, dxe + r * d, d);
        }
    }
}

/* by columns of f: dW1[:, c] += xᵀ·g1[:, c], dW3 likewise, dW2[c, :] += a[:, c]ᵀ·dy — each
 * element one sum over all of its expert's rows */
static void grouped_backward_weights(moe_backend *b, const groups *G, float *dw1, float *dw3, float *dw2,
                                     const float *g1, const float *g3, const float *dye, const float *a,
                                     const float *xe)
{
    const int glu = moe_act_is_glu(G->act);
    const int64_t d = G->d, f = G->f;
    int64_t active = 0;
    for (int64_t e = 0; e < G->E; e++)
        active += G->rows[e] > 0;
    if (!active)
        return;
    int64_t clen = cols_per_task(f);
    while (((f + clen - 1) / clen) * active > MAX_TASKS)
        clen *= 2;
    task tasks[MAX_TASKS];
    const int64_t nts = make_tasks(tasks, G->rows, G->E, f, clen);
#pragma omp parallel for schedule(dynamic, 1) num_threads(team_size(b))
    for (int64_t q = 0; q < nts; q++) {
        const task tk = tasks[q];
        const int64_t r = G->begin[tk.e], m = G->rows[tk.e], c = tk.lo, w = tk.hi - tk.lo;
        const float *x = xe + r * d;
        moe_cpu_sgemm(1, 0, d, w, m, 1.0f, x, d, g1 + r * f + c, f, 1.0f, dw1 + tk.e * d * f + c, f);
        if (glu)
            moe_cpu_sgemm(1, 0, d, w, m, 1.0f, x, d, g3 + r * f + c, f, 1.0f, dw3 + tk.e * d * f + c, f);
        moe_cpu_sgemm(1, 0, w, d, m, 1.0f, a + r * f + c, f, dye + r * d, d, 1.0f, dw2 + tk.e * f * d + c * d, d);
    }
}

/* ---- the table's ops ------------------------------------------------------------ */

static groups plan_groups(const moe_bplan *p, moe_activation act, int64_t d, int64_t f)
{
    return (groups){p->offsets, p->count, p->E, d, f, act};
}

static void cpu_experts_forward(moe_backend *b, moe_tensor ye, moe_tensor h1, moe_tensor h3, moe_tensor a,
                                moe_tensor xe, moe_tensor w1, moe_tensor *w3, moe_tensor w2, const moe_bplan *p,
                                moe_activation act, int64_t d, int64_t f)
{
    const int glu = moe_act_is_glu(act);
    const groups G = plan_groups(p, act, d, f);
    grouped_forward(b, &G, F(ye), F(h1), glu ? F(h3) : NULL, F(a), F(xe), F(w1), glu ? FOPT(w3) : NULL, F(w2));
}

static void cpu_experts_backward_data(moe_backend *b, moe_tensor dxe, moe_tensor dg1, moe_tensor *dg3, moe_tensor dye,
                                      moe_tensor h1, moe_tensor h3, moe_tensor w1, moe_tensor *w3, moe_tensor w2,
                                      const moe_bplan *p, moe_activation act, int64_t d, int64_t f)
{
    const int glu = moe_act_is_glu(act);
    const groups G = plan_groups(p, act, d, f);
    grouped_backward_data(b, &G, F(dxe), F(dg1), glu ? FOPT(dg3) : NULL, F(dye), F(h1), glu ? F(h3) : NULL, F(w1),
                          glu ? FOPT(w3) : NULL, F(w2));
}

static void cpu_experts_backward_weights(moe_backend *b, moe_tensor dw1, moe_tensor *dw3, moe_tensor dw2,
                                         moe_tensor dg1, moe_tensor *dg3, moe_tensor dye, moe_tensor a, moe_tensor xe,
                                         const moe_bplan *p, moe_activation act, int64_t d, int64_t f)
{
    const int glu = moe_act_is_glu(act);
    const groups G = plan_groups(p, act, d, f);
    grouped_backward_weights(b, &G, F(dw1), glu ? FOPT(dw3) : NULL, F(dw2), F(dg1), glu ? FOPT(dg3) : NULL, F(dye),
                             F(a), F(xe));
}

static void cpu_ffn_forward(moe_backend *b, moe_tensor out, moe_tensor h1, moe_tensor h3, moe_tensor a, moe_tensor x,
                            moe_tensor w1, moe_tensor *w3, moe_tensor w2, moe_activation act, int64_t n, int64_t d,
                            int64_t f)
{
    const int glu = moe_act_is_glu(act);
    const int64_t begin = 0;
    const groups G = {&begin, &n, 1, d, f, act};
    grouped_forward(b, &G, F(out), F(h1), glu ? F(h3) : NULL, F(a), F(x), F(w1), glu ? FOPT(w3) : NULL, F(w2));
}

/* One FFN: both halves in turn, the pre-activation gradients in the backend's scratch. */
static void cpu_ffn_backward(moe_backend *b, moe_tensor *dx, moe_tensor dw1, moe_tensor *dw3, moe_tensor dw2,
                             moe_tensor dout, moe_tensor h1, moe_tensor h3, moe_tensor a, moe_tensor x, moe_tensor w1,
                             moe_tensor *w3, moe_tensor w2, moe_activation act, int64_t n, int64_t d, int64_t f)
{
    const int glu = moe_act_is_glu(act);
    if (n <= 0)
        return;
    float *g1 = moe_cpu_scratch(b, (glu ? 2 : 1) * n * f, "ffn_backward");
    if (!g1)
        return;
    float *g3 = glu ? g1 + n * f : NULL;
    const int64_t begin = 0;
    const groups G = {&begin, &n, 1, d, f, act};
    grouped_backward_data(b, &G, FOPT(dx), g1, g3, F(dout), F(h1), glu ? F(h3) : NULL, F(w1), glu ? FOPT(w3) : NULL,
                          F(w2));
    grouped_backward_weights(b, &G, F(dw1), glu ? FOPT(dw3) : NULL, F(dw2), g1, g3, F(dout), F(a), F(x));
}

void moe_cpu_experts_ops(moe_backend *b)
{
    b->experts_forward = cpu_experts_forward;
    b->experts_backward_data = cpu_experts_backward_data;
    b->experts_backward_weights = cpu_experts_backward_weights;
    b->ffn_forward = cpu_ffn_forward;
    b->ffn_backward = cpu_ffn_backward;
}
