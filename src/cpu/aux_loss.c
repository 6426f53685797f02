/*
 * Aux losses on the cpu backend: the definitions are ref/aux_loss.c's (read its header
 * for the load-balance convention). Values are fp32 inputs summed in double: they are
 * reported losses, and a [T, E] sum in float would lose digits for no speed.
 */
#include <math.h>
#include <stdlib.h>

#include "cpu/cpu.h"

static int plan_is_token_choice(const moe_bplan *p)
{
    return p->n > 0 && p->choice[0] >= 0;
}

static double lb_fraction(const moe_bplan *p, int64_t e, int64_t T)
{
    if (plan_is_token_choice(p))
        return (double)p->selected[e] / (double)(T * p->k);
    return p->n > 0 ? (double)p->count[e] / (double)p->n : 0.0;
}

static void cpu_lb_forward(moe_backend *b, moe_tensor out, moe_tensor s_t, const moe_bplan *p, int64_t T, int64_t E)
{
    const float *s = F(s_t);
    double loss = 0;
    for (int64_t e = 0; e < E; e++) {
        double P = 0;
        for (int64_t t = 0; t < T; t++)
            P += s[t * E + e];
        loss += lb_fraction(p, e, T) * (P / (double)T);
    }
    F(out)[0] = (float)((double)E * loss);
}

static void cpu_lb_backward(moe_backend *b, moe_tensor ds_t, double dloss, const moe_bplan *p, int64_t T, int64_t E)
{
    float *ds = F(ds_t);
    float *g = moe_cpu_scratch(b, E, "lb_loss_backward");
    if (!g)
        return;
    for (int64_t e = 0; e < E; e++)
        g[e] = (float)(dloss * (double)E * lb_fraction(p, e, T) / (double)T);
#pragma omp parallel for schedule(static)
    for (int64_t t = 0; t < T; t++)
        for (int64_t e = 0; e < E; e++)
            ds[t * E + e] += g[e];
}

static double logsumexp(const float *zt, int64_t E)
{
    double m = zt[0], acc = 0;
    for (int64_t e = 1; e < E; e++)
        m = zt[e] > m ? zt[e] : m;
    for (int64_t e = 0; e < E; e++)
        acc += exp(zt[e] - m);
    return m + log(acc);
}

/* Token blocks of the z-loss sum, added in block order: the same bits at any thread count
 * (an OpenMP reduction adds the threads' parts in an order of its choosing). */
#define Z_BLOCKS 64

static void cpu_z_forward(moe_backend *b, moe_tensor out, moe_tensor z_t, int64_t T, int64_t E)
{
    const float *z = F(z_t);
    double part[Z_BLOCKS] = {0};
#pragma omp parallel for schedule(static)
    for (int64_t blk = 0; blk < Z_BLOCKS; blk++)
        for (int64_t t = T * blk / Z_BLOCKS; t < T * (blk + 1) / Z_BLOCKS; t++) {
            double l = logsumexp(z + t * E, E);
            part[blk] += l * l;
        }
    double acc = 0;
    for (int64_t blk = 0; blk < Z_BLOCKS; blk++)
        acc += part[blk];
    F(out)[0] = (float)(acc / (double)T);
}

static void cpu_z_backward(moe_backend *b, moe_tensor dz_t, double dloss, moe_tensor z_t, int64_t T, int64_t E)
{
    const float *z = F(z_t);
    float *dz = F(dz_t);
#pragma omp parallel for schedule(static)
    for (int64_t t = 0; t < T; t++) {
        const float *zt = z + t * E;
        double l = logsumexp(zt, E);
        for (int64_t e = 0; e < E; e++)
            dz[t * E + e] += (float)(dloss * 2.0 * l * exp(zt[e] - l) / (double)T);
    }
}

static void cpu_importance_forward(moe_backend *b, moe_tensor imp_t, const moe_bplan *p)
{
    float *imp = F(imp_t);
    double *acc = (double *)moe_cpu_scratch(b, 2 * p->E, "importance_forward");
    if (!acc)
        return;
    for (int64_t e = 0; e < p->E; e++)
        acc[e] = 0;
    if (plan_is_token_choice(p)) {
        for (int64_t i = 0; i < p->T * p->k; i++)
            if (p->choice_expert[i] >= 0)
                acc[p->choice_expert[i]] += p->choice_weight[i];
    } else {
        for (int64_t i = 0; i < p->n; i++)
            acc[p->expert[i]] += p->weight[i];
    }
    for (int64_t e = 0; e < p->E; e++)
        imp[e] = (float)acc[e];
}

static void cpu_importance_backward(moe_backend *b, moe_tensor *dweight_t, moe_tensor *dchoice_t, moe_tensor dimp_t,
                                    const moe_bplan *p)
{
    const float *dimp = F(dimp_t);
    float *dweight = FOPT(dweight_t), *dchoice = FOPT(dchoice_t);
    if (plan_is_token_choice(p)) {
        if (dchoice)
            for (int64_t i = 0; i < p->T * p->k; i++)
                if (p->choice_expert[i] >= 0)
                    dchoice[i] += dimp[p->choice_expert[i]];
    } else if (dweight) {
        for (int64_t i = 0; i < p->n; i++)
            dweight[i] += dimp[p->expert[i]];
    }
}

/* The MI terms of ref/aux_loss.c, in double over the small [M, E] tables. */
typedef struct {
    double *pm, *q, *sm, *pe;
} mi_terms;

static int mi_compute(moe_backend *b, mi_terms *m, const float *s, const int32_t *task, int64_t M, int64_t T,
                      int64_t E, const char *op)
{
    /* scratch: pm [M], q [M, E], sm [M], pe [E], g [M, E], gq [M] in doubles */
    double *w = (double *)moe_cpu_scratch(b, 2 * (3 * M + 2 * M * E + E), op);
    if (!w)
        return 0;
    m->pm = w;
    m->q = m->pm + M;
    m->sm = m->q + M * E;
    m->pe = m->sm + M;
    for (int64_t i = 0; i < 3 * M + 2 * M * E + E; i++)
        w[i] = 0;
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

static void cpu_mi_forward(moe_backend *b, moe_tensor out, moe_tensor s, moe_tensor task, int64_t M, int64_t T,
                           int64_t E)
{
    mi_terms m;
    if (!mi_compute(b, &m, F(s), I32(task), M, T, E, "mi_loss_forward"))
        return;
    double mi = 0;
    for (int64_t a = 0; a < M; a++)
        for (int64_t e = 0; e < E; e++) {
            double pme = m.pm[a] * m.q[a * E + e];
            if (pme > 0)
                mi += pme * (log(m.q[a * E + e]) - log(m.pe[e]));
        }
    F(out)[0] = (float)-mi;
}

static void cpu_mi_backward(moe_backend *b, moe_tensor ds_t, double dloss, moe_tensor s, moe_tensor task_t,
                            int64_t M, int64_t T, int64_t E)
{
    mi_terms m;
    const int32_t *task = I32(task_t);
    if (!mi_compute(b, &m, F(s), task, M, T, E, "mi_loss_backward"))
        return;
    double *g = m.pe + E, *gq = g + M * E;
    for (int64_t a = 0; a < M; a++) {
        gq[a] = 0;
        if (m.pm[a] == 0)
            continue;
        for (int64_t e = 0; e < E; e++) {
            double q = m.q[a * E + e];
            g[a * E + e] = q > 0 ? m.pm[a] * (log(q) - log(m.pe[e])) : 0.0;
            gq[a] += g[a * E + e] * q;
        }
    }
    float *ds = F(ds_t);
#pragma omp parallel for schedule(static)
    for (int64_t t = 0; t < T; t++) {
        int32_t id = task ? task[t] : 0;
        if (id < 0 || id >= M)
            continue;
        for (int64_t e = 0; e < E; e++)
            ds[t * E + e] -= (float)(dloss * (g[id * E + e] - gq[id]) / m.sm[id]);
    }
}

/* cv² in double over a vector of E (moe_ref_cv2_forward's formula) */
static void cv2_terms(const float *v, int64_t E, double *mean, double *var)
{
    double m = 0, s = 0;
    for (int64_t e = 0; e < E; e++)
        m += v[e];
    m /= (double)E;
    for (int64_t e = 0; e < E; e++)
        s += ((double)v[e] - m) * ((double)v[e] - m);
    *mean = m;
    *var = s / (double)E;
}

static void cpu_cv2_forward(moe_backend *b, moe_tensor out, moe_tensor v, int64_t E)
{
    double mean, var;
    cv2_terms(F(v), E, &mean, &var);
    F(out)[0] = (float)(var / (mean * mean + 1e-10));
}

static void cpu_cv2_backward(moe_backend *b, moe_tensor dv_t, double dloss, moe_tensor v_t, int64_t E)
{
    const float *v = F(v_t);
    float *dv = F(dv_t);
    double mean, var;
    cv2_terms(v, E, &mean, &var);
    const double D = mean * mean + 1e-10;
    for (int64_t e = 0; e < E; e++)
        dv[e] += (float)(dloss * (2.0 * ((double)v[e] - mean) / (double)E / D - var * 2.0 * mean / (double)E / (D * D)));
}

void moe_cpu_aux_ops(moe_backend *b)
{
    b->cv2_forward = cpu_cv2_forward;
    b->cv2_backward = cpu_cv2_backward;
    b->lb_loss_forward = cpu_lb_forward;
    b->lb_loss_backward = cpu_lb_backward;
    b->z_loss_forward = cpu_z_forward;
    b->z_loss_backward = cpu_z_backward;
    b->importance_forward = cpu_importance_forward;
    b->importance_backward = cpu_importance_backward;
    b->mi_loss_forward = cpu_mi_forward;
    b->mi_loss_backward = cpu_mi_backward;
}
