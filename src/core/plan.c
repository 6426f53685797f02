/* The routing plan: storage and its invariants. */
#include <stdlib.h>
#include <string.h>

#include "cmoe.h"

moe_status moe_plan_create(int64_t max_n, int64_t T, int64_t E, int64_t k, moe_plan **out)
{
    *out = NULL;
    if (max_n < 0 || T <= 0 || E <= 0 || k <= 0)
        return moe_error(MOE_ERR_ARG, "plan: bad sizes (max_n %lld, T %lld, E %lld, k %lld)",
                         (long long)max_n, (long long)T, (long long)E, (long long)k);
    moe_plan *p = calloc(1, sizeof *p);
    if (!p)
        return moe_error(MOE_ERR_NOMEM, "plan: out of memory");
    size_t n = max_n ? (size_t)max_n : 1, tk = (size_t)(T * k);
    p->T = T;
    p->E = E;
    p->k = k;
    p->cap_n = max_n;
    p->token = malloc(n * sizeof *p->token);
    p->expert = malloc(n * sizeof *p->expert);
    p->weight = malloc(n * sizeof *p->weight);
    p->src = malloc(n * sizeof *p->src);
    p->choice = malloc(n * sizeof *p->choice);
    p->offsets = calloc((size_t)E + 1, sizeof *p->offsets);
    p->count = calloc((size_t)E, sizeof *p->count);
    p->selected = calloc((size_t)E, sizeof *p->selected);
    p->choice_expert = malloc(tk * sizeof *p->choice_expert);
    p->choice_weight = malloc(tk * sizeof *p->choice_weight);
    p->choice_kept = malloc(tk * sizeof *p->choice_kept);
    if (!p->token || !p->expert || !p->weight || !p->src || !p->choice || !p->offsets || !p->count ||
        !p->selected || !p->choice_expert || !p->choice_weight || !p->choice_kept) {
        moe_plan_free(p);
        return moe_error(MOE_ERR_NOMEM, "plan: out of memory for %lld assignments", (long long)max_n);
    }
    *out = p;
    return MOE_OK;
}

void moe_plan_free(moe_plan *p)
{
    if (!p)
        return;
    free(p->token);
    free(p->expert);
    free(p->weight);
    free(p->src);
    free(p->choice);
    free(p->offsets);
    free(p->count);
    free(p->selected);
    free(p->choice_expert);
    free(p->choice_weight);
    free(p->choice_kept);
    free(p);
}

moe_status moe_plan_check(const moe_plan *p)
{
    if (p->n < 0 || p->n > p->cap_n)
        return moe_error(MOE_ERR_ARG, "plan: n = %lld outside [0, %lld]", (long long)p->n, (long long)p->cap_n);
    if (p->offsets[0] != 0 || p->offsets[p->E] != p->n)
        return moe_error(MOE_ERR_ARG, "plan: offsets[0] = %lld, offsets[E] = %lld, n = %lld",
                         (long long)p->offsets[0], (long long)p->offsets[p->E], (long long)p->n);
    for (int64_t e = 0; e < p->E; e++) {
        int64_t c = p->offsets[e + 1] - p->offsets[e];
        if (c < 0 || c != p->count[e])
            return moe_error(MOE_ERR_ARG, "plan: expert %lld has %lld rows but count %lld", (long long)e,
                             (long long)c, (long long)p->count[e]);
        if (p->capacity > 0 && c > p->capacity)
            return moe_error(MOE_ERR_ARG, "plan: expert %lld has %lld rows over capacity %lld", (long long)e,
                             (long long)c, (long long)p->capacity);
        for (int64_t i = p->offsets[e]; i < p->offsets[e + 1]; i++) {
            if (p->expert[i] != e)
                return moe_error(MOE_ERR_ARG, "plan: row %lld in expert %lld's range names expert %d",
                                 (long long)i, (long long)e, p->expert[i]);
            if (p->token[i] < 0 || p->token[i] >= p->T)
                return moe_error(MOE_ERR_ARG, "plan: row %lld has token %d outside [0, %lld)", (long long)i,
                                 p->token[i], (long long)p->T);
            if (p->src[i] != (int64_t)p->token[i] * p->E + e)
                return moe_error(MOE_ERR_ARG, "plan: row %lld has src %lld, expected %lld", (long long)i,
                                 (long long)p->src[i], (long long)p->token[i] * p->E + e);
            if (i > p->offsets[e] && p->token[i] <= p->token[i - 1])
                return moe_error(MOE_ERR_ARG, "plan: expert %lld's rows are not in increasing token order",
                                 (long long)e);
        }
    }
    return MOE_OK;
}
