/*
 * The per-step statistics of a training run and the metrics.jsonl record they become
 * (rundir.h; the keys are listed in README.md and `cmoe help train`).
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include <jansson.h>

#include "io/rundir.h"

typedef struct {
    int64_t layer, E;
    int64_t *counts; /* [E] kept assignments, summed over micro-batches */
    int64_t kept, dropped;
    moe_aux_losses aux; /* summed over micro-batches */
} layer_acc;

struct moe_step_stats {
    int n;
    layer_acc *l;
    int64_t *scratch; /* [max E] */
};

moe_status moe_step_stats_create(const moe_model_config *c, moe_step_stats **out)
{
    moe_step_stats *a = calloc(1, sizeof *a);
    *out = a;
    if (!a)
        return moe_error(MOE_ERR_NOMEM, "out of memory");
    int64_t maxE = 1;
    a->l = calloc((size_t)c->num_hidden_layers + 1, sizeof *a->l);
    if (!a->l)
        return moe_error(MOE_ERR_NOMEM, "out of memory");
    for (int64_t l = 0; l < c->num_hidden_layers; l++) {
        int64_t E = moe_model_layer_experts(c, l);
        if (E <= 0)
            continue;
        layer_acc *x = &a->l[a->n++];
        x->layer = l;
        x->E = E;
        if (!(x->counts = calloc((size_t)E, sizeof *x->counts)))
            return moe_error(MOE_ERR_NOMEM, "out of memory");
        if (E > maxE)
            maxE = E;
    }
    a->scratch = calloc((size_t)maxE, sizeof *a->scratch);
    return a->scratch ? MOE_OK : moe_error(MOE_ERR_NOMEM, "out of memory");
}

void moe_step_stats_free(moe_step_stats *a)
{
    if (!a)
        return;
    for (int i = 0; a->l && i < a->n; i++)
        free(a->l[i].counts);
    free(a->l);
    free(a->scratch);
    free(a);
}

int moe_step_stats_moe_layers(const moe_step_stats *a)
{
    return a->n;
}

void moe_step_stats_zero(moe_step_stats *a)
{
    for (int i = 0; i < a->n; i++) {
        layer_acc *x = &a->l[i];
        memset(x->counts, 0, (size_t)x->E * sizeof *x->counts);
        x->kept = x->dropped = 0;
        memset(&x->aux, 0, sizeof x->aux);
    }
}

moe_status moe_step_stats_add(moe_step_stats *a, moe_model *m)
{
    for (int i = 0; i < a->n; i++) {
        layer_acc *x = &a->l[i];
        moe_model_layer_stats st;
        moe_status s = moe_model_get_layer_stats(m, x->layer, MOE_SPAN_STEP, &st, a->scratch);
        if (s)
            return s;
        for (int64_t e = 0; e < x->E; e++)
            x->counts[e] += a->scratch[e];
        x->kept += st.assignments;
        x->dropped += st.dropped;
        x->aux.lb += st.aux.lb;
        x->aux.importance += st.aux.importance;
        x->aux.load += st.aux.load;
        x->aux.z += st.aux.z;
        x->aux.mi += st.aux.mi;
        x->aux.total += st.aux.total;
    }
    return MOE_OK;
}

void moe_step_stats_summary(const moe_step_stats *a, double *max_over_mean, double *dropped_frac)
{
    double r = 0, kept = 0, dropped = 0;
    for (int i = 0; i < a->n; i++) {
        const layer_acc *x = &a->l[i];
        int64_t mx = 0, sum = 0;
        for (int64_t e = 0; e < x->E; e++) {
            sum += x->counts[e];
            mx = x->counts[e] > mx ? x->counts[e] : mx;
        }
        r += sum > 0 ? (double)mx * (double)x->E / (double)sum : 0;
        kept += (double)x->kept;
        dropped += (double)x->dropped;
    }
    *max_over_mean = a->n ? r / a->n : 0;
    *dropped_frac = kept + dropped > 0 ? dropped / (kept + dropped) : 0;
}

static json_t *layers_json(const moe_step_stats *a, int64_t micro)
{
    json_t *arr = json_array();
    for (int i = 0; i < a->n; i++) {
        const layer_acc *x = &a->l[i];
        json_t *load = json_array(), *aux = json_object(), *o = json_object();
        for (int64_t e = 0; e < x->E; e++)
            json_array_append_new(load, json_integer(x->counts[e]));
        json_object_set_new(aux, "lb", json_real(x->aux.lb / micro));
        json_object_set_new(aux, "importance", json_real(x->aux.importance / micro));
        json_object_set_new(aux, "load", json_real(x->aux.load / micro));
        json_object_set_new(aux, "z", json_real(x->aux.z / micro));
        json_object_set_new(aux, "mi", json_real(x->aux.mi / micro));
        json_object_set_new(aux, "total", json_real(x->aux.total / micro));
        json_object_set_new(o, "layer", json_integer(x->layer));
        json_object_set_new(o, "experts", json_integer(x->E));
        json_object_set_new(o, "load", load);
        double tot = (double)(x->kept + x->dropped);
        json_object_set_new(o, "dropped", json_real(tot > 0 ? (double)x->dropped / tot : 0));
        json_object_set_new(o, "aux", aux);
        json_array_append_new(arr, o);
    }
    return arr;
}

moe_status moe_step_record_json(const moe_step_record *r, const moe_step_stats *a, int64_t micro, char **out)
{
    double lmm, dfrac;
    moe_step_stats_summary(a, &lmm, &dfrac);
    json_t *j = json_object();
    json_object_set_new(j, "step", json_integer(r->step));
    json_object_set_new(j, "loss", json_real(r->loss));
    json_object_set_new(j, "ce", json_real(r->ce));
    json_object_set_new(j, "aux", json_real(r->aux));
    json_object_set_new(j, "lr", json_real(r->lr));
    json_object_set_new(j, "grad_norm", json_real(r->grad_norm));
    json_object_set_new(j, "tokens", json_integer(r->tokens));
    json_object_set_new(j, "tokens_per_s", json_real((double)r->tokens / r->step_time_s));
    json_object_set_new(j, "step_time_s", json_real(r->step_time_s));
    json_object_set_new(j, "elapsed_s", json_real(r->elapsed_s));
    if (r->val_tokens > 0) {
        json_object_set_new(j, "val_loss", json_real(r->val_loss));
        json_object_set_new(j, "val_tokens", json_integer(r->val_tokens));
    }
    json_object_set_new(j, "load_max_over_mean", json_real(lmm));
    json_object_set_new(j, "dropped_frac", json_real(dfrac));
    json_object_set_new(j, "layers", layers_json(a, micro));
    *out = json_dumps(j, JSON_COMPACT | JSON_PRESERVE_ORDER);
    json_decref(j);
    return *out ? MOE_OK : moe_error(MOE_ERR_NOMEM, "out of memory");
}

moe_status moe_val_loss(moe_model *m, const moe_dataset *d, int64_t B, int64_t S, int64_t max_batches, int32_t *in,
                        int32_t *tg, int32_t *task, double *loss, int64_t *n_tokens)
{
    moe_val_iter it;
    moe_val_iter_init(&it);
    double sum = 0;
    int64_t total = 0;
    for (int64_t b = 0; max_batches <= 0 || b < max_batches; b++) {
        int64_t n;
        moe_status s = moe_dataset_val_next(d, &it, B, S, in, tg, task, &n);
        if (s)
            return s;
        if (n == 0)
            break;
        moe_model_losses L;
        if ((s = moe_model_forward(m, in, tg, task, B, S, MOE_KEY_STEP(0), 0, &L)))
            return s;
        sum += L.ce * (double)L.n_targets;
        total += L.n_targets;
    }
    *loss = total ? sum / (double)total : NAN;
    *n_tokens = total;
    return MOE_OK;
}
