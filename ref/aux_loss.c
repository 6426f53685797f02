/*
 * Auxiliary router losses in double. Each forward returns the unscaled loss; the layer
 * multiplies by its coefficient and hands the coefficient in as dloss.
 *
 * Load balance, cmoe's convention:  lb = E · Σ_e f_e · P_e,
 *   f_e = selected_e / (T·k)  — the fraction of ALL k choices that went to e, counted
 *         before capacity dropping (a dropped token still asked for e);
 *   P_e = mean_t s_te        — the mean router probability of e.
 *   Perfect balance (f_e = P_e = 1/E) gives lb = 1, for every k.
 * How it relates to the others (same inputs):
 *   - Switch Transformer (k = 1): identical.
 *   - Megatron-core switch_load_balancing_loss_func: identical (it counts all top-k
 *     choices and divides by T·k, times E).
 *   - Hugging Face transformers' Mixtral/Qwen2-MoE load_balancing_loss_func: k × this
 *     (its f_e is the mean over tokens of the k-hot mask, which sums to k).
 *   - GShard / DeepSpeed top-2 (top2gating): f_e from the FIRST choice only,
 *     loss = E · Σ me·ce with ce = mean of the top-1 mask; equal to this with k = 1
 *     on the first choices, not to this with k = 2.
 * Expert choice and hash plans have no "choices before dropping": f_e = count_e / n.
 * f_e is a count, so only P_e carries a gradient (as in every implementation above).
 *
 * Expert-choice plans are told apart by choice[i] = -1 (see select.c).
 */
#include <math.h>
#include <stdlib.h>

#include "ref/ref.h"

/* Below this many elements a thread team costs more than it saves (and on a busy
 * machine its spinning barriers cost far more). */
#define PAR_MIN 16384

static int plan_is_token_choice(const moe_plan *p)
{
    return p->n > 0 && p->choice[0] >= 0;
}

/* f_e of the load-balance loss (see the top of this file). */
static double lb_fraction(const moe_plan *p, int64_t e, int64_t T)
{
    if (plan_is_token_choice(p))
        return (double)p->selected[e] / (double)(T * p->k);
    return p->n > 0 ? (double)p->count[e] / (double)p->n : 0.0;
}

double moe_ref_lb_loss_forward(const double *s, const moe_plan *p, int64_t T, int64_t E)
{
    double loss = 0;
    for (int64_t e = 0; e < E; e++) {
        double P = 0;
        for (int64_t t = 0; t < T; t++)
            P += s[t * E + e];
        loss += lb_fraction(p, e, T) * (P / (double)T);
    }
    return (double)E * loss;
}

void moe_ref_lb_loss_backward(double *ds, double dloss, const moe_plan *p, int64_t T, int64_t E)
{
#pragma omp parallel for schedule(static) if (T * E >= PAR_MIN)
    for (int64_t t = 0; t < T; t++)
        for (int64_t e = 0; e < E; e++)
            ds[t * E + e] += dloss * (double)E * lb_fraction(p, e, T) / (double)T;
}

/* ---- importance and load (Shazeer 2017): cv² of a per-expert vector ---------- */

double moe_ref_cv2_forward(const double *v, int64_t E)
{
    double mean = 0, var = 0;
    for (int64_t e = 0; e < E; e++)
        mean += v[e];
    mean /= (double)E;
    for (int64_t e = 0; e < E; e++)
        var += (v[e] - mean) * (v[e] - mean);
    var /= (double)E; /* population variance, as torch.var(unbiased=False) */
    return var / (mean * mean + 1e-10);
}

void moe_ref_cv2_backward(double *dv, double dloss, const double *v, int64_t E)
{
    double mean = 0, var = 0;
    for (int64_t e = 0; e < E; e++)
        mean += v[e];
    mean /= (double)E;
    for (int64_t e = 0; e < E; e++)
        var += (v[e] - mean) * (v[e] - mean);
    var /= (double)E;
    double D = mean * mean + 1e-10;
    /* ∂var/∂v_e = 2(v_e − mean)/E (the mean's own term sums to zero); ∂mean/∂v_e = 1/E. */
    for (int64_t e = 0; e < E; e++)
        dv[e] += dloss * (2.0 * (v[e] - mean) / (double)E / D - var * 2.0 * mean / (double)E / (D * D));
}

/* Token choice counts the gates the router produced (before capacity), as Shazeer's
 * importance is a property of the gate, not of what fitted; a RANDOM-skipped second has
 * gate 0. Other plans have only their kept assignments. */
void moe_ref_importance_forward(double *imp, const moe_plan *p)
{
    for (int64_t e = 0; e < p->E; e++)
        imp[e] = 0;
    if (plan_is_token_choice(p)) {
        for (int64_t i = 0; i < p->T * p->k; i++)
            if (p->choice_expert[i] >= 0)
                imp[p->choice_expert[i]] += p->choice_weight[i];
    } else {
        for (int64_t i = 0; i < p->n; i++)
            imp[p->expert[i]] += p->weight[i];
    }
}

void moe_ref_importance_backward(double *dweight, double *dchoice_weight, const double *dimp, const moe_plan *p)
{
    if (plan_is_token_choice(p)) {
        if (dchoice_weight)
            for (int64_t i = 0; i < p->T * p->k; i++)
                if (p->choice_expert[i] >= 0)
                    dchoice_weight[i] += dimp[p->choice_expert[i]];
    } else if (dweight) {
        for (int64_t i = 0; i < p->n; i++)
            dweight[i] += dimp[p->expert[i]];
    }
}

/* ---- router z-loss (ST-MoE) ------------------------------------------------- */

static double logsumexp(const double *zt, int64_t E)
{
    double m = zt[0], acc = 0;
    for (int64_t e = 1; e < E; e++)
        if (zt[e] > m)
            m = zt[e];
    for (int64_t e = 0; e < E; e++)
        acc += exp(zt[e] - m);
    return m + log(acc);
}

double moe_ref_z_loss_forward(const double *z, int64_t T, int64_t E)
{
    double acc = 0;
    for (int64_t t = 0; t < T; t++) {
        double l = logsumexp(z + t * E, E);
        acc += l * l;
    }
    return acc / (double)T;
}

void moe_ref_z_loss_backward(double *dz, double dloss, const double *z, int64_t T, int64_t E)
{
#pragma omp parallel for schedule(static) if (T * E >= PAR_MIN)
    for (int64_t t = 0; t < T; t++) {
        const double *zt = z + t * E;
        double l = logsumexp(zt, E);
        /* ∂lse/∂z_e = softmax(z)_e */
        for (int64_t e = 0; e < E; e++)
            dz[t * E + e] += dloss * 2.0 * l * exp(zt[e] - l) / (double)T;
    }
}

/* ---- mutual information (Mod-Squad) ---------------------------------------------
 *
 * With tasks m (tokens carrying a task id in [0, n_tasks)):
 *   P(m) = n_m / T',  T' = tokens with a task id;
 *   P(e|m) = A_me / S_m,  A_me = Σ_{t∈m} s_te,  S_m = Σ_e A_me (so sigmoid scores work too);
 *   P(m,e) = P(m)·P(e|m),  P(e) = Σ_m P(m,e);
 *   MI = Σ_{m,e} P(m,e)·(log P(e|m) − log P(e));  loss = −MI.
 * Tasks without tokens are skipped; ids outside [0, n_tasks) are ignored (the layer
 * rejects them). Terms with P(m,e) = 0 are 0 (0·log 0).
 */
typedef struct {
    double *pm;   /* [M] P(m) */
    double *q;    /* [M, E] P(e|m) */
    double *sm;   /* [M] S_m */
    double *pe;   /* [E] P(e) */
} mi_terms;

static void mi_free(mi_terms *m)
{
    free(m->pm);
    free(m->q);
    free(m->sm);
    free(m->pe);
}

static int mi_compute(mi_terms *m, const double *s, const int32_t *task, int64_t M, int64_t T, int64_t E)
{
    m->pm = calloc((size_t)M, sizeof *m->pm);
    m->q = calloc((size_t)(M * E), sizeof *m->q);
    m->sm = calloc((size_t)M, sizeof *m->sm);
    m->pe = calloc((size_t)E, sizeof *m->pe);
    if (!m->pm || !m->q || !m->sm || !m->pe) {
        mi_free(m);
        return 0;
    }
    int64_t counted = 0;
    for (int64_t t = 0; t < T; t++) {
        int32_t id = task ? task[t] : 0;
        if (id < 0 || id >= M)
            continue;
        counted++;
        m->pm[id] += 1.0;
        for (int64_t e = 0; e < E; e++)
            m->q[id * E + e] += s[t * E + e];
    }
    for (int64_t a = 0; a < M; a++) {
        if (m->pm[a] == 0)
            continue;
        m->pm[a] /= (double)counted;
        for (int64_t e = 0; e < E; e++)
            m->sm[a] += m->q[a * E + e];
        for (int64_t e = 0; e < E; e++) {
            m->q[a * E + e] /= m->sm[a];
            m->pe[e] += m->pm[a] * m->q[a * E + e];
        }
    }
    return 1;
}

double moe_ref_mi_loss_forward(const double *s, const int32_t *task, int64_t n_tasks, int64_t T, int64_t E)
{
    mi_terms m;
    if (!mi_compute(&m, s, task, n_tasks, T, E))
        return NAN;
    double mi = 0;
    for (int64_t a = 0; a < n_tasks; a++)
        for (int64_t e = 0; e < E; e++) {
            double pme = m.pm[a] * m.q[a * E + e];
            if (pme > 0)
                mi += pme * (log(m.q[a * E + e]) - log(m.pe[e]));
        }
    mi_free(&m);
    return -mi;
}

/*
 * MI = Σ_m P(m)·Σ_e q_me log q_me − Σ_e P(e) log P(e), so ∂MI/∂q_me = P(m)(log q_me − log P(e))
 * =: g_me (the +1 of each x·log x derivative cancels between the two sums), and
 * q_me = A_me/S_m gives, for t in task m, ∂MI/∂s_te = (g_me − Σ_e' g_me' q_me') / S_m.
 */
void moe_ref_mi_loss_backward(double *ds, double dloss, const double *s, const int32_t *task, int64_t n_tasks,
                              int64_t T, int64_t E)
{
    mi_terms m;
    if (!mi_compute(&m, s, task, n_tasks, T, E))
        return;
    double *g = calloc((size_t)(n_tasks * E), sizeof *g), *gq = calloc((size_t)n_tasks, sizeof *gq);
    if (g && gq) {
        for (int64_t a = 0; a < n_tasks; a++) {
            if (m.pm[a] == 0)
                continue;
            for (int64_t e = 0; e < E; e++) {
                double q = m.q[a * E + e];
                g[a * E + e] = q > 0 ? m.pm[a] * (log(q) - log(m.pe[e])) : 0.0;
                gq[a] += g[a * E + e] * q;
            }
        }
#pragma omp parallel for schedule(static) if (T * E >= PAR_MIN)
        for (int64_t t = 0; t < T; t++) {
            int32_t id = task ? task[t] : 0;
            if (id < 0 || id >= n_tasks)
                continue;
            for (int64_t e = 0; e < E; e++)
                ds[t * E + e] -= dloss * (g[id * E + e] - gq[id]) / m.sm[id];
        }
    }
    free(g);
    free(gq);
    mi_free(&m);
}
