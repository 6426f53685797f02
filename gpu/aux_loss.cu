/*
 * Aux losses on the device, as ref/aux_loss.c defines them (read its header for the
 * load-balance convention). Sums over tokens are one block per expert (or per row), a
 * fixed tree in double, then the small per-expert results combined by one thread in index
 * order: deterministic, and to double rounding what the cpu backend computes. Whether a
 * plan is token choice is read on the device (n > 0 and choice[0] >= 0), as the cpu reads it.
 */
#include "gpu/cuda.h"

/* f_e of the load balance: selected / (T·k) for token choice, count / n for expert choice */
__device__ __forceinline__ double lb_frac(const moe_bplan &p, int64_t e, int64_t T)
{
    const int32_t n = p.nd[0];
    const bool tc = n > 0 && p.choice[0] >= 0;
    if (tc)
        return (double)p.selected[e] / (double)(T * p.k);
    return n > 0 ? (double)p.count[e] / (double)n : 0.0;
}

/* col[e] = Σ_t s[t, e] (one block per expert) */
__global__ void k_colsum(double *col, dptr s, int64_t T, int64_t E)
{
    __shared__ double sh[256];
    const int64_t e = blockIdx.x;
    double acc = 0;
    for (int64_t t = threadIdx.x; t < T; t += blockDim.x)
        acc += ldf(s, t * E + e);
    acc = block_sum(acc, sh);
    if (threadIdx.x == 0)
        col[e] = acc;
}

__global__ void k_lb_final(dptr out, const double *col, moe_bplan p, int64_t T, int64_t E)
{
    if (threadIdx.x || blockIdx.x)
        return;
    double loss = 0;
    for (int64_t e = 0; e < E; e++)
        loss += lb_frac(p, e, T) * (col[e] / (double)T);
    stf(out, 0, (float)((double)E * loss));
}

size_t moe_cu_aux_scratch(const moe_workload *w)
{
    if (!w->layer)
        return 0;
    const int64_t E = w->layer->n_experts, M = w->layer->n_tasks > 0 ? w->layer->n_tasks : 1;
    size_t need = (size_t)(E > w->tokens ? E : w->tokens) * sizeof(double);
    const size_t mi = (size_t)(3 * M + 3 * M * E + E + M) * sizeof(double);
    return (need > mi ? need : mi) + 512;
}

static void cu_lb_forward(moe_backend *b, moe_tensor out, moe_tensor s, const moe_bplan *p, int64_t T, int64_t E)
{
    double *col = (double *)moe_cu_scratch(b, (size_t)E * sizeof(double), "lb_loss_forward");
    if (!col)
        return;
    k_colsum<<<(unsigned)E, 256, 0, moe_cu_stream(b)>>>(col, DP(s), T, E);
    k_lb_final<<<1, 1, 0, moe_cu_stream(b)>>>(DP(out), col, *p, T, E);
    moe_cu_check(b, "lb_loss_forward");
}

__global__ void k_lb_bwd(dptr ds, double dloss, moe_bplan p, int64_t T, int64_t E)
{
    CU_LOOP(i, T * E)
    {
        const int64_t e = i % E;
        const float g = (float)(dloss * (double)E * lb_frac(p, e, T) / (double)T);
        stf(ds, i, ldf(ds, i) + g);
    }
}

static void cu_lb_backward(moe_backend *b, moe_tensor ds, double dloss, const moe_bplan *p, int64_t T, int64_t E)
{
    k_lb_bwd<<<moe_cu_blocks(T * E, 256), 256, 0, moe_cu_stream(b)>>>(DP(ds), dloss, *p, T, E);
    moe_cu_check(b, "lb_loss_backward");
}

__device__ double logsumexp_row(dptr z, int64_t o, int64_t E)
{
    double m = ldf(z, o), acc = 0;
    for (int64_t e = 1; e < E; e++)
        m = fmax(m, (double)ldf(z, o + e));
    for (int64_t e = 0; e < E; e++)
        acc += exp(ldf(z, o + e) - m);
    return m + log(acc);
}

__global__ void k_z_rows(double *l2, dptr z, int64_t T, int64_t E)
{
    CU_LOOP(t, T)
    {
        const double l = logsumexp_row(z, t * E, E);
        l2[t] = l * l;
    }
}

/* out[0] = Σ v / div, one block, fixed tree */
__global__ void k_sum_div(dptr out, const double *v, int64_t n, double div)
{
    __shared__ double sh[1024];
    double acc = 0;
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x)
        acc += v[i];
    acc = block_sum(acc, sh);
    if (threadIdx.x == 0)
        stf(out, 0, (float)(acc / div));
}

static void cu_z_forward(moe_backend *b, moe_tensor out, moe_tensor z, int64_t T, int64_t E)
{
    double *l2 = (double *)moe_cu_scratch(b, (size_t)T * sizeof(double), "z_loss_forward");
    if (!l2)
        return;
    k_z_rows<<<moe_cu_blocks(T, 128), 128, 0, moe_cu_stream(b)>>>(l2, DP(z), T, E);
    k_sum_div<<<1, 1024, 0, moe_cu_stream(b)>>>(DP(out), l2, T, (double)T);
    moe_cu_check(b, "z_loss_forward");
}

__global__ void k_z_bwd(dptr dz, double dloss, dptr z, int64_t T, int64_t E)
{
    CU_LOOP(t, T)
    {
        const double l = logsumexp_row(z, t * E, E);
        for (int64_t e = 0; e < E; e++) {
            const int64_t i = t * E + e;
            stf(dz, i, ldf(dz, i) + (float)(dloss * 2.0 * l * exp(ldf(z, i) - l) / (double)T));
        }
    }
}

static void cu_z_backward(moe_backend *b, moe_tensor dz, double dloss, moe_tensor z, int64_t T, int64_t E)
{
    k_z_bwd<<<moe_cu_blocks(T, 128), 128, 0, moe_cu_stream(b)>>>(DP(dz), dloss, DP(z), T, E);
    moe_cu_check(b, "z_loss_backward");
}

/* importance[e]: token choice sums the choice weights of e over the T·k choices (before
 * dropping), expert choice the weights of its rows; one block of 1024 per expert (the E
 * blocks each scan all T·k choices, which stay in L2) */
__global__ void __launch_bounds__(1024) k_importance(dptr imp, moe_bplan p, int64_t tk)
{
    __shared__ double sh[1024];
    const int64_t e = blockIdx.x;
    const int32_t n = p.nd[0];
    const bool tc = n > 0 && p.choice[0] >= 0;
    double acc = 0;
    if (tc) {
        for (int64_t i = threadIdx.x; i < tk; i += blockDim.x)
            if (p.choice_expert[i] == e)
                acc += p.choice_weight[i];
    } else {
        for (int64_t i = threadIdx.x; i < n; i += blockDim.x)
            if (p.expert[i] == e)
                acc += p.weight[i];
    }
    acc = block_sum(acc, sh);
    if (threadIdx.x == 0)
        stf(imp, e, (float)acc);
}

static void cu_importance_forward(moe_backend *b, moe_tensor imp, const moe_bplan *p)
{
    k_importance<<<(unsigned)p->E, 1024, 0, moe_cu_stream(b)>>>(DP(imp), *p, p->ec ? 0 : p->T * p->k);
    moe_cu_check(b, "importance_forward");
}

__global__ void k_importance_bwd(dptr dweight, dptr dchoice, dptr dimp, moe_bplan p, int64_t tk, int64_t R)
{
    const int32_t n = p.nd[0];
    const bool tc = n > 0 && p.choice[0] >= 0;
    if (tc) {
        if (dchoice.p)
            CU_LOOP(i, tk)
            if (p.choice_expert[i] >= 0) stf(dchoice, i, ldf(dchoice, i) + ldf(dimp, p.choice_expert[i]));
    } else if (dweight.p) {
        CU_LOOP(i, R)
        if (i < n)
            stf(dweight, i, ldf(dweight, i) + ldf(dimp, p.expert[i]));
    }
}

static void cu_importance_backward(moe_backend *b, moe_tensor *dweight, moe_tensor *dchoice, moe_tensor dimp,
                                   const moe_bplan *p)
{
    const int64_t tk = p->ec ? 0 : p->T * p->k, R = p->rows_bound;
    k_importance_bwd<<<moe_cu_blocks(tk > R ? tk : R, 256), 256, 0, moe_cu_stream(b)>>>(DPOPT(dweight), DPOPT(dchoice),
                                                                                       DP(dimp), *p, tk, R);
    moe_cu_check(b, "importance_backward");
}

/* ---- cv² of a vector of E: one thread, in index order (E is small) ---------------------------------- */

__device__ void cv2_terms(dptr v, int64_t E, double *mean, double *var)
{
    double m = 0, s = 0;
    for (int64_t e = 0; e < E; e++)
        m += ldf(v, e);
    m /= (double)E;
    for (int64_t e = 0; e < E; e++)
        s += ((double)ldf(v, e) - m) * ((double)ldf(v, e) - m);
    *mean = m;
    *var = s / (double)E;
}

__global__ void k_cv2(dptr out, dptr v, int64_t E)
{
    if (threadIdx.x || blockIdx.x)
        return;
    double mean, var;
    cv2_terms(v, E, &mean, &var);
    stf(out, 0, (float)(var / (mean * mean + 1e-10)));
}

__global__ void k_cv2_bwd(dptr dv, double dloss, dptr v, int64_t E)
{
    if (threadIdx.x || blockIdx.x)
        return;
    double mean, var;
    cv2_terms(v, E, &mean, &var);
    const double D = mean * mean + 1e-10;
    for (int64_t e = 0; e < E; e++)
        stf(dv, e,
            ldf(dv, e) + (float)(dloss * (2.0 * ((double)ldf(v, e) - mean) / (double)E / D -
                                          var * 2.0 * mean / (double)E / (D * D))));
}

static void cu_cv2_forward(moe_backend *b, moe_tensor out, moe_tensor v, int64_t E)
{
    k_cv2<<<1, 1, 0, moe_cu_stream(b)>>>(DP(out), DP(v), E);
    moe_cu_check(b, "cv2_forward");
}

static void cu_cv2_backward(moe_backend *b, moe_tensor dv, double dloss, moe_tensor v, int64_t E)
{
    k_cv2_bwd<<<1, 1, 0, moe_cu_stream(b)>>>(DP(dv), dloss, DP(v), E);
    moe_cu_check(b, "cv2_backward");
}

/* ---- mutual information (Mod-Squad): the [M, E] tables, then one thread for the rest ---------------- */

/* scratch layout (doubles): cnt [M], q [M, E], then mi_tail's pm [M], sm [M], pe [E], g [M, E], gq [M] */

/* blockIdx.x = a·E + e: q[a, e] = Σ_{t: task t = a} s[t, e]; blocks with e = 0 also count the tokens */
__global__ void k_mi_tables(double *cnt, double *q, dptr s, const int32_t *task, int64_t M, int64_t T, int64_t E)
{
    __shared__ double sh[256];
    const int64_t a = blockIdx.x / E, e = blockIdx.x % E;
    double acc = 0, c = 0;
    for (int64_t t = threadIdx.x; t < T; t += blockDim.x) {
        const int32_t id = task ? task[t] : 0;
        if (id != a)
            continue;
        acc += ldf(s, t * E + e);
        c += 1.0;
    }
    acc = block_sum(acc, sh);
    c = block_sum(c, sh);
    if (threadIdx.x == 0) {
        q[a * E + e] = acc;
        if (e == 0)
            cnt[a] = c;
    }
}

/* ref's mi terms from the tables: pm, q normalised, sm, pe; then the loss or the per-(a, e) gradient terms */
__global__ void k_mi_tail(dptr out, double *w, int64_t M, int64_t E, int want_grad)
{
    if (threadIdx.x || blockIdx.x)
        return;
    double *cnt = w, *q = cnt + M, *pm = q + M * E, *sm = pm + M, *pe = sm + M, *g = pe + E, *gq = g + M * E;
    double counted = 0;
    for (int64_t a = 0; a < M; a++)
        counted += cnt[a];
    for (int64_t e = 0; e < E; e++)
        pe[e] = 0;
    for (int64_t a = 0; a < M; a++) {
        pm[a] = cnt[a];
        sm[a] = 0;
        if (pm[a] == 0)
            continue;
        pm[a] /= counted;
        for (int64_t e = 0; e < E; e++)
            sm[a] += q[a * E + e];
        for (int64_t e = 0; e < E; e++) {
            q[a * E + e] /= sm[a];
            pe[e] += pm[a] * q[a * E + e];
        }
    }
    if (!want_grad) {
        double mi = 0;
        for (int64_t a = 0; a < M; a++)
            for (int64_t e = 0; e < E; e++) {
                const double pme = pm[a] * q[a * E + e];
                if (pme > 0)
                    mi += pme * (log(q[a * E + e]) - log(pe[e]));
            }
        stf(out, 0, (float)-mi);
        return;
    }
    for (int64_t a = 0; a < M; a++) {
        gq[a] = 0;
        if (pm[a] == 0)
            continue;
        for (int64_t e = 0; e < E; e++) {
            const double qq = q[a * E + e];
            g[a * E + e] = qq > 0 ? pm[a] * (log(qq) - log(pe[e])) : 0.0;
            gq[a] += g[a * E + e] * qq;
        }
    }
}

__global__ void k_mi_bwd(dptr ds, double dloss, const double *w, const int32_t *task, int64_t M, int64_t T,
                         int64_t E)
{
    const double *sm = w + M + M * E + M, *g = sm + M + E, *gq = g + M * E;
    CU_LOOP(i, T * E)
    {
        const int64_t t = i / E, e = i % E;
        const int32_t id = task ? task[t] : 0;
        if (id < 0 || id >= M)
            continue;
        stf(ds, i, ldf(ds, i) - (float)(dloss * (g[id * E + e] - gq[id]) / sm[id]));
    }
}

static double *mi_tables(moe_backend *b, moe_tensor s, moe_tensor task, int64_t M, int64_t T, int64_t E,
                         const char *op)
{
    double *w = (double *)moe_cu_scratch(b, (size_t)(3 * M + 3 * M * E + E + M) * sizeof(double), op);
    if (w)
        k_mi_tables<<<(unsigned)(M * E), 256, 0, moe_cu_stream(b)>>>(w, w + M, DP(s), I32P(task), M, T, E);
    return w;
}

static void cu_mi_forward(moe_backend *b, moe_tensor out, moe_tensor s, moe_tensor task, int64_t M, int64_t T,
                          int64_t E)
{
    double *w = mi_tables(b, s, task, M, T, E, "mi_loss_forward");
    if (!w)
        return;
    k_mi_tail<<<1, 1, 0, moe_cu_stream(b)>>>(DP(out), w, M, E, 0);
    moe_cu_check(b, "mi_loss_forward");
}

static void cu_mi_backward(moe_backend *b, moe_tensor ds, double dloss, moe_tensor s, moe_tensor task, int64_t M,
                           int64_t T, int64_t E)
{
    double *w = mi_tables(b, s, task, M, T, E, "mi_loss_backward");
    if (!w)
        return;
    k_mi_tail<<<1, 1, 0, moe_cu_stream(b)>>>(dptr{nullptr, DT_F32}, w, M, E, 1);
    k_mi_bwd<<<moe_cu_blocks(T * E, 256), 256, 0, moe_cu_stream(b)>>>(DP(ds), dloss, w, I32P(task), M, T, E);
    moe_cu_check(b, "mi_loss_backward");
}

void moe_cu_aux_ops(moe_backend *b)
{
    b->cv2_forward = cu_cv2_forward;
    b->cv2_backward = cu_cv2_backward;
    b->lb_loss_forward = cu_lb_forward;
    b->lb_loss_backward = cu_lb_backward;
    b->z_loss_forward = cu_z_forward;
    b->z_loss_backward = cu_z_backward;
    b->importance_forward = cu_importance_forward;
    b->importance_backward = cu_importance_backward;
    b->mi_loss_forward = cu_mi_forward;
    b->mi_loss_backward = cu_mi_backward;
}
