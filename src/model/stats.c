/*
 * The step's scalars (model.h): one backend buffer, read by the host once per step —
 * the last forward's cross-entropy and MoE layer statistics, their sums over a step's
 * forwards, and the optimizer's gradient norm and clipping scale.
 */
#include <string.h>

#include "model/model_impl.h"

moe_tensor moe_model_scalar(const moe_model *m, int which)
{
    return (moe_tensor){m->sbuf, 2 * m->ns + which};
}

double moe_model_host_scalar(const moe_model *m, int which)
{
    return m->shost[2 * m->ns + which];
}

moe_tensor moe_model_scalars(moe_model *m, int span, int64_t *n)
{
    m->shost_fresh = 0;
    if (n)
        *n = m->ns;
    return (moe_tensor){m->sbuf, span == MOE_SPAN_STEP ? m->ns : 0};
}

void moe_model_scalars_to_layers(moe_model *m)
{
    for (int64_t l = 0; l < m->L; l++)
        if (m->blk[l].moe)
            m->b->copy(m->b, moe_layer_stats(m->blk[l].moe), (moe_tensor){m->sbuf, m->blk[l].stat0},
                       MOE_LAYER_NSTATS(m->blk[l].E));
}

moe_status moe_model_read_scalars(moe_model *m)
{
    if (m->shost_fresh)
        return MOE_OK;
    moe_status s = moe_download_f64(m->b, m->shost, (moe_tensor){m->sbuf, 0}, m->n_scalars);
    m->shost_fresh = s == MOE_OK;
    return s;
}

/* Σ over MoE layers of each layer's aux.total, from the host copy of the scalars v. */
static double aux_total(const moe_model *m, const double *v)
{
    double aux = 0;
    for (int64_t l = 0; l < m->L; l++) {
        if (m->blk[l].moe)
            aux += moe_layer_aux_of(moe_layer_config_of(m->blk[l].moe), v + m->blk[l].stat0).total;
        if (m->blk[l].moa) /* the attention router's load-balance and z-loss */
            aux += moe_layer_aux_of(moe_moa_router(m->blk[l].moa), v + m->blk[l].moa_stat0).total;
    }
    return aux;
}

moe_status moe_model_get_losses(moe_model *m, moe_model_losses *out)
{
    moe_status s = moe_model_read_scalars(m);
    if (s)
        return s;
    moe_model_losses L = {0};
    L.ce = m->can_backward ? m->shost[0] : 0.0;
    L.aux = aux_total(m, m->shost);
    L.total = L.ce + L.aux;
    L.n_targets = m->can_backward ? m->n_targets : 0;
    *out = L;
    return MOE_OK;
}

/* ---- statistics ------------------------------------------------------------------------ */

moe_status moe_model_get_layer_stats(moe_model *m, int64_t layer, moe_span span, moe_model_layer_stats *st,
                                     int64_t *counts)
{
    if (!m || !st || layer < 0 || layer >= m->L)
        return moe_error(MOE_ERR_ARG, "model: layer %lld outside [0, %lld)", (long long)layer,
                         (long long)(m ? m->L : 0));
    memset(st, 0, sizeof *st);
    mblock *k = &m->blk[layer];
    if (!k->moe)
        return MOE_OK;
    st->n_experts = k->E;
    if (!moe_layer_plan(k->moe))
        return MOE_OK;
    moe_status s = moe_model_read_scalars(m);
    if (s)
        return s;
    const double *v = m->shost + (span == MOE_SPAN_STEP ? m->ns : 0) + k->stat0, *count = v + MOE_STAT_COUNTS;
    st->aux = moe_layer_aux_of(moe_layer_config_of(k->moe), v);
    st->assignments = (int64_t)count[2 * k->E];
    st->dropped = (int64_t)count[2 * k->E + 1];
    double mx = 0, sum = 0;
    for (int64_t e = 0; e < k->E; e++) {
        sum += count[e];
        mx = count[e] > mx ? count[e] : mx;
        if (counts)
            counts[e] = (int64_t)count[e];
    }
    st->load_max = mx;
    st->load_mean = sum / (double)k->E;
    return MOE_OK;
}

moe_status moe_model_get_stats(moe_model *m, moe_span span, moe_model_stats *st)
{
    if (!m || !st)
        return moe_error(MOE_ERR_ARG, "model stats: model and stats must not be NULL");
    memset(st, 0, sizeof *st);
    moe_status s0 = moe_model_read_scalars(m);
    if (s0)
        return s0;
    st->ce = m->shost[span == MOE_SPAN_STEP ? m->ns : 0];
    st->forwards = span == MOE_SPAN_STEP ? m->forwards : 1;
    double kept = 0, dropped = 0, ratio = 0;
    for (int64_t l = 0; l < m->L; l++) {
        moe_model_layer_stats ls;
        moe_status s = moe_model_get_layer_stats(m, l, span, &ls, NULL);
        if (s)
            return s;
        if (!ls.n_experts)
            continue;
        st->n_moe_layers++;
        st->load_max += ls.load_max;
        st->load_mean += ls.load_mean;
        ratio += ls.load_mean > 0 ? ls.load_max / ls.load_mean : 0;
        kept += (double)ls.assignments;
        dropped += (double)ls.dropped;
        st->aux_lb += ls.aux.lb;
        st->aux_importance += ls.aux.importance;
        st->aux_load += ls.aux.load;
        st->aux_z += ls.aux.z;
        st->aux_mi += ls.aux.mi;
        st->aux_total += ls.aux.total;
    }
    for (int64_t l = 0; l < m->L; l++) { /* the attention routers' losses are in the objective too */
        if (!m->blk[l].moa)
            continue;
        const moe_aux_losses a = moe_layer_aux_of(moe_moa_router(m->blk[l].moa),
                                                  m->shost + (span == MOE_SPAN_STEP ? m->ns : 0) + m->blk[l].moa_stat0);
        st->aux_lb += a.lb;
        st->aux_z += a.z;
        st->aux_total += a.total;
    }
    if (st->n_moe_layers)
        st->load_max_over_mean = ratio / (double)st->n_moe_layers;
    st->dropped_frac = kept + dropped > 0 ? dropped / (kept + dropped) : 0;
    return MOE_OK;
}

