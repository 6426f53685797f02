/* Decoding within the trained context, and temperature, top-k and top-p sampling of one
 * logits row (host side, double). */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "model/sample.h"

typedef struct {
    double p;
    int32_t id;
} ranked;

/* most probable first; ties to the lower id, so the order is total and deterministic */
static int by_prob_desc(const void *a, const void *b)
{
    const ranked *x = a, *y = b;
    if (x->p != y->p)
        return x->p > y->p ? -1 : 1;
    return (x->id > y->id) - (x->id < y->id);
}

moe_status moe_sample_probs(double *probs, const double *logits, int64_t V, double temperature, int64_t top_k,
                            double top_p)
{
    if (V <= 0 || V > INT32_MAX)
        return moe_error(MOE_ERR_ARG, "sample: vocabulary size %lld out of range", (long long)V);
    if (!(temperature >= 0) || isinf(temperature))
        return moe_error(MOE_ERR_ARG, "sample: temperature %g must be finite and >= 0", temperature);
    if (!(top_p > 0))
        return moe_error(MOE_ERR_ARG, "sample: top_p %g must be > 0", top_p);
    int64_t best = 0;
    for (int64_t j = 0; j < V; j++) {
        if (!isfinite(logits[j]))
            return moe_error(MOE_ERR_ARG, "sample: logits[%lld] is not finite", (long long)j);
        if (logits[j] > logits[best])
            best = j;
    }
    if (temperature == 0) {
        for (int64_t j = 0; j < V; j++)
            probs[j] = j == best;
        return MOE_OK;
    }
    double sum = 0;
    for (int64_t j = 0; j < V; j++) {
        probs[j] = exp((logits[j] - logits[best]) / temperature);
        sum += probs[j];
    }
    for (int64_t j = 0; j < V; j++)
        probs[j] /= sum;
    const int use_k = top_k > 0 && top_k < V, use_p = top_p < 1;
    if (!use_k && !use_p)
        return MOE_OK;

    ranked *r = malloc((size_t)V * sizeof *r);
    if (!r)
        return moe_error(MOE_ERR_NOMEM, "sample: out of memory ranking %lld tokens", (long long)V);
    for (int64_t j = 0; j < V; j++)
        r[j] = (ranked){probs[j], (int32_t)j};
    qsort(r, (size_t)V, sizeof *r, by_prob_desc);
    int64_t keep = use_k ? top_k : V;
    if (use_p) {
        /* top-p on the top-k distribution renormalised, as the warpers chain */
        double mass = 0, kept = 0;
        for (int64_t i = 0; i < keep; i++)
            mass += r[i].p;
        int64_t i = 0;
        while (i < keep) {
            kept += r[i].p;
            i++;
            if (kept >= top_p * mass)
                break;
        }
        keep = i;
    }
    double total = 0;
    for (int64_t i = 0; i < keep; i++)
        total += r[i].p;
    for (int64_t j = 0; j < V; j++)
        probs[j] = 0;
    for (int64_t i = 0; i < keep; i++)
        probs[r[i].id] = r[i].p / total;
    free(r);
    return MOE_OK;
}

int32_t moe_sample_pick(const double *probs, int64_t V, double u)
{
    double total = 0;
    for (int64_t j = 0; j < V; j++)
        total += probs[j];
    const double target = u * total;
    double cum = 0;
    int32_t last = 0;
    for (int64_t j = 0; j < V; j++) {
        if (probs[j] <= 0)
            continue;
        cum += probs[j];
        last = (int32_t)j;
        if (cum > target)
            return last;
    }
    return last; /* u·total rounded up to the total: the last possible token */
}

moe_status moe_sample_token(int32_t *token, double *probs, const double *logits, int64_t V, double temperature,
                            int64_t top_k, double top_p, double u)
{
    if (!(u >= 0 && u < 1))
        return moe_error(MOE_ERR_ARG, "sample: uniform draw u = %g is not in [0, 1)", u);
    moe_status st = moe_sample_probs(probs, logits, V, temperature, top_k, top_p);
    if (st != MOE_OK)
        return st;
    *token = moe_sample_pick(probs, V, u);
    return MOE_OK;
}

/* ---- decoding within the trained context ------------------------------------------------- */

moe_status moe_decoder_init(moe_decoder *d, moe_model *m, int64_t W)
{
    memset(d, 0, sizeof *d);
    const int64_t maxp = moe_model_config_of(m)->max_position_embeddings;
    if (W < 1 || W > maxp)
        return moe_error(MOE_ERR_ARG, "decoder: context %lld is not in [1, max_position_embeddings = %lld]",
                         (long long)W, (long long)maxp);
    if (!(d->win = malloc((size_t)W * sizeof *d->win)))
        return moe_error(MOE_ERR_NOMEM, "decoder: out of memory for a context of %lld tokens", (long long)W);
    d->m = m;
    d->W = W;
    d->keep = W / 2;
    return MOE_OK;
}

moe_status moe_decoder_push(moe_decoder *d, int32_t token, double *logits)
{
    moe_status s;
    if (d->n == d->W) {
        memmove(d->win, d->win + d->W - d->keep, (size_t)d->keep * sizeof *d->win);
        d->n = d->keep;
        d->slides++;
        for (int64_t i = 0; i < d->keep; i++) /* the cache is rewritten from position 0 */
            if ((s = moe_model_decode(d->m, d->win[i], i, logits)))
                return s;
    }
    if ((s = moe_model_decode(d->m, token, d->n, logits)))
        return s;
    d->win[d->n++] = token;
    return MOE_OK;
}

void moe_decoder_free(moe_decoder *d)
{
    free(d->win);
    memset(d, 0, sizeof *d);
}
