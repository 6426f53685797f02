/*
 * Mixture of attention heads on the cpu backend: the plan ops of ref/moa.h in fp32.
 *
 * The grouped linear map runs as ffn.c's experts do: tasks of one expert's block of rows
 * (forward, input gradient) or of its block of output columns (weight gradient, each
 * element one sum over all of its expert's rows), one single-threaded sgemm each, blocks
 * fixed by the shape so that every thread count gives the same bits. Scatter and gather to
 * the choice slots are copies and (one term per element) adds: no order to fix.
 */
#include <string.h>

#include "cpu/cpu.h"

typedef struct {
    int64_t e, lo, hi; /* expert, and a block [lo, hi) of its rows or of the output columns */
} task;

#define MAX_TASKS 4096

static int team_size(moe_backend *b)
{
    int nt = moe_cpu(b)->threads;
    return nt > 0 ? nt : 1;
}

/* Blocks of `len` over each expert's rows (span 0) or over [0, span); len a function of the
 * shape only (MOE_CPU_ROWS, doubled while the list would overflow). */
static int64_t make_tasks(task *t, const moe_bplan *p, int64_t span)
{
    int64_t total = 0, active = 0;
    for (int64_t e = 0; e < p->E; e++) {
        total += p->count[e];
        active += p->count[e] > 0;
    }
    int64_t len = MOE_CPU_ROWS;
    while ((span ? active * ((span + len - 1) / len) : (total + len - 1) / len + p->E) > MAX_TASKS)
        len *= 2;
    int64_t n = 0;
    for (int64_t e = 0; e < p->E; e++) {
        if (!p->count[e])
            continue;
        const int64_t m = span ? span : p->count[e];
        for (int64_t lo = 0; lo < m; lo += len)
            t[n++] = (task){e, lo, lo + len < m ? lo + len : m};
    }
    return n;
}

static void cpu_experts_linear_forward(moe_backend *b, moe_tensor ye_t, moe_tensor xe_t, moe_tensor w_t,
                                       const moe_bplan *p, int64_t K, int64_t N)
{
    float *ye = F(ye_t);
    const float *xe = F(xe_t), *w = F(w_t);
    task tasks[MAX_TASKS];
    const int64_t nt = make_tasks(tasks, p, 0);
#pragma omp parallel for schedule(dynamic, 1) num_threads(team_size(b))
    for (int64_t q = 0; q < nt; q++) {
        const task tk = tasks[q];
        const int64_t r = p->offsets[tk.e] + tk.lo;
        moe_cpu_sgemm(0, 0, tk.hi - tk.lo, N, K, 1.0f, xe + r * K, K, w + tk.e * K * N, N, 0.0f, ye + r * N, N);
    }
}

static void cpu_experts_linear_backward(moe_backend *b, moe_tensor *dxe_t, moe_tensor dw_t, moe_tensor dye_t,
                                        moe_tensor xe_t, moe_tensor w_t, const moe_bplan *p, int64_t K, int64_t N)
{
    float *dxe = FOPT(dxe_t), *dw = F(dw_t);
    const float *dye = F(dye_t), *xe = F(xe_t), *w = F(w_t);
    task tasks[MAX_TASKS];
    int64_t nt;
    if (dxe) { /* by rows: dxe[r] += dye[r]·w[e]ᵀ */
        nt = make_tasks(tasks, p, 0);
#pragma omp parallel for schedule(dynamic, 1) num_threads(team_size(b))
        for (int64_t q = 0; q < nt; q++) {
            const task tk = tasks[q];
            const int64_t r = p->offsets[tk.e] + tk.lo;
            moe_cpu_sgemm(0, 1, tk.hi - tk.lo, K, N, 1.0f, dye + r * N, N, w + tk.e * K * N, N, 1.0f, dxe + r * K, K);
        }
    }
    /* by output columns: dw[e][:, c] += xe[seg]ᵀ·dye[seg][:, c], each element one sum over the segment */
    nt = make_tasks(tasks, p, N);
#pragma omp parallel for schedule(dynamic, 1) num_threads(team_size(b))
    for (int64_t q = 0; q < nt; q++) {
        const task tk = tasks[q];
        const int64_t r = p->offsets[tk.e], m = p->count[tk.e], c = tk.lo;
        moe_cpu_sgemm(1, 0, K, tk.hi - c, m, 1.0f, xe + r * K, K, dye + r * N + c, N, 1.0f, dw + tk.e * K * N + c, N);
    }
}

/* an expert-choice plan (choice[i] = -1) has no slots */
static int token_choice(moe_backend *b, const moe_bplan *p, const char *op)
{
    if (p->n > 0 && p->choice[0] < 0) {
        moe_backend_fail(b, op, MOE_ERR_ARG, "an expert-choice plan has no choice slots");
        return 0;
    }
    return 1;
}

static void cpu_choice_scatter(moe_backend *b, moe_tensor slots_t, moe_tensor rows_t, const moe_bplan *p, int64_t w)
{
    if (!token_choice(b, p, "choice_scatter"))
        return;
    float *slots = F(slots_t);
    const float *rows = F(rows_t);
    memset(slots, 0, (size_t)(p->T * p->k * w) * sizeof *slots);
#pragma omp parallel for schedule(static) num_threads(team_size(b))
    for (int64_t i = 0; i < p->n; i++)
        memcpy(slots + p->choice[i] * w, rows + i * w, (size_t)w * sizeof *rows);
}

static void cpu_choice_gather(moe_backend *b, moe_tensor rows_t, moe_tensor slots_t, const moe_bplan *p, int64_t w)
{
    if (!token_choice(b, p, "choice_gather"))
        return;
    float *rows = F(rows_t);
    const float *slots = F(slots_t);
#pragma omp parallel for schedule(static) num_threads(team_size(b))
    for (int64_t i = 0; i < p->n; i++) {
        float *r = rows + i * w;
        const float *s = slots + p->choice[i] * w;
#pragma omp simd
        for (int64_t j = 0; j < w; j++)
            r[j] += s[j];
    }
}

void moe_cpu_moa_ops(moe_backend *b)
{
    b->experts_linear_forward = cpu_experts_linear_forward;
    b->experts_linear_backward = cpu_experts_linear_backward;
    b->choice_scatter = cpu_choice_scatter;
    b->choice_gather = cpu_choice_gather;
}
