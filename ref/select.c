/*
 * Selection: router scores -> routing plan, in double. Every router ends in the same
 * plan (kept assignments sorted by expert, then by token), so dispatch, experts and
 * combine never need to know which router made it.
 *
 * Decisions that every backend must reproduce bit for bit:
 *  - Ties go to the lower expert index (token choice) or the lower token (expert choice).
 *  - Token choice: weights are s of the chosen experts, renormalised over the k chosen
 *    BEFORE capacity dropping (GShard, fairseq), so a dropped choice does not raise the
 *    weight of the kept ones.
 *  - GShard's RANDOM policy: the renormalisation set is the two experts chosen before the
 *    random skip, so skipping the second leaves the first weight at s1/(s1+s2), as in
 *    GShard's Algorithm 1. Backward therefore needs the skipped expert, which the plan
 *    does not keep (choice_expert = -1): moe_ref_route_backward takes the same bias and
 *    recomputes it (the second of the top 2 of s + bias).
 *  - Sinkhorn runs a fixed number of iterations (not a tolerance) so every backend makes
 *    the same selection. It selects on the balanced matrix alone (no bias, no second-
 *    expert policy); its weights are s like every token-choice router's.
 *  - The bias (aux-loss-free balancing) changes only which experts are chosen, never a
 *    weight. Under SAMPLING it picks the first expert; the second comes from h + Gumbel.
 *  - moe_ref_route sets p->T = T, p->k (k; expert choice: C) and p->capacity = C. The
 *    choice arrays are taken to hold p->T·p->k entries as the plan is on entry.
 *  - Capacity: POSITION keeps candidates in order (choice rank, token) — every first
 *    choice before any second one (GShard); PROBABILITY by weight descending, ties (j, t).
 *  - Expert-choice plans mark themselves with choice[i] = -1 (there is no token-choice
 *    index); the aux losses use that to tell them from token choice.
 */
#include <math.h>
#include <stdlib.h>

#include "ref/ref.h"

/* Below this many elements a thread team costs more than it saves (and on a busy
 * machine its spinning barriers cost far more). */
#define PAR_MIN 16384

/* splitmix64's finaliser: a fixed, well-mixed hash so that hash routing spreads ids
 * evenly and every backend agrees on it. */
uint64_t moe_hash_token(uint32_t token_id)
{
    uint64_t z = token_id;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

static int is_token_choice(moe_router_kind r)
{
    return r == MOE_ROUTER_TOPK || r == MOE_ROUTER_NOISY_TOPK || r == MOE_ROUTER_SINKHORN;
}

/* The top k of v[0..E) in order (value descending, ties to the lower index).
 * Repeated argmax: k is small and this is obviously right. */
static void topk(int64_t *idx, const double *v, int64_t E, int64_t k)
{
    for (int64_t j = 0; j < k; j++) {
        int64_t best = -1;
        for (int64_t e = 0; e < E; e++) {
            int taken = 0;
            for (int64_t q = 0; q < j; q++)
                taken |= idx[q] == e;
            if (!taken && (best < 0 || v[e] > v[best]))
                best = e;
        }
        idx[j] = best;
    }
}

/* v = s_t + bias (bias may be NULL) */
static void biased_row(double *v, const double *st, const double *bias, int64_t E)
{
    for (int64_t e = 0; e < E; e++)
        v[e] = st[e] + (bias ? bias[e] : 0.0);
}

/* The renormalisation denominator of a token: Σ s over its renormalisation set e[0..k),
 * or 0 for "weights are s as they are" (not renormalising, or the degenerate all-zero set). */
static double renorm_sum(const double *st, const int64_t *e, int64_t k, int renormalize)
{
    if (!renormalize)
        return 0.0;
    double S = 0;
    for (int64_t j = 0; j < k; j++)
        S += st[e[j]];
    return S > 0 ? S : 0.0;
}

/* The second of the top 2 of s_t + bias: RANDOM's second choice before its skip, found
 * exactly as forward's top-k finds it (same sums, ties to the lower index). */
static int64_t second_of_top2(const double *st, const double *bias, int64_t E)
{
    int64_t a = -1, b = -1;
    double va = 0, vb = 0;
    for (int64_t e = 0; e < E; e++) {
        double v = st[e] + (bias ? bias[e] : 0.0);
        if (a < 0 || v > va) {
            b = a, vb = va;
            a = e, va = v;
        } else if (b < 0 || v > vb) {
            b = e, vb = v;
        }
    }
    return b;
}

/*
 * Sinkhorn balancing as Megatron's sinkhorn router: cost = exp(h), alternately
 * normalising tokens (d0) and experts (d1). exp(h − max h) instead of exp(h) keeps it
 * finite; the global factor is absorbed by d0 and d1 (up to the 1e-8 guards).
 * Writes the balanced matrix d1_e·cost_te·d0_t into b. Returns 0 on out of memory.
 */
static int sinkhorn(double *b /* [T, E] */, const double *h, int64_t iters, int64_t T, int64_t E)
{
    double *d0 = malloc((size_t)T * sizeof *d0), *d1 = malloc((size_t)E * sizeof *d1);
    if (!d0 || !d1) {
        free(d0);
        free(d1);
        return 0;
    }
    double m = h[0];
    for (int64_t i = 1; i < T * E; i++)
        if (h[i] > m)
            m = h[i];
#pragma omp parallel for schedule(static) if (T * E >= PAR_MIN)
    for (int64_t i = 0; i < T * E; i++)
        b[i] = exp(h[i] - m); /* the cost, for now */
    for (int64_t t = 0; t < T; t++)
        d0[t] = 1.0;
    for (int64_t e = 0; e < E; e++)
        d1[e] = 1.0;
    for (int64_t it = 0; it < iters; it++) {
#pragma omp parallel for schedule(static) if (T * E >= PAR_MIN)
        for (int64_t t = 0; t < T; t++) {
            double acc = 0;
            for (int64_t e = 0; e < E; e++)
                acc += d1[e] * b[t * E + e];
            d0[t] = (1.0 / (double)T) * 1.0 / (acc + 1e-8);
        }
#pragma omp parallel for schedule(static) if (T * E >= PAR_MIN)
        for (int64_t e = 0; e < E; e++) {
            double acc = 0;
            for (int64_t t = 0; t < T; t++)
                acc += d0[t] * b[t * E + e];
            d1[e] = (1.0 / (double)E) * 1.0 / (acc + 1e-8);
        }
    }
#pragma omp parallel for schedule(static) if (T * E >= PAR_MIN)
    for (int64_t t = 0; t < T; t++)
        for (int64_t e = 0; e < E; e++)
            b[t * E + e] = d1[e] * b[t * E + e] * d0[t];
    free(d0);
    free(d1);
    return 1;
}

/* One token's choices into the plan's [T, k] arrays (before capacity). */
static void choose_token(moe_plan *p, int64_t t, const double *st, const double *sel /* [E] selection values */,
                         const double *ht, const moe_layer_config *c, moe_key key, int64_t *idx)
{
    const int64_t E = p->E, k = p->k;
    const moe_second_policy pol = c->router == MOE_ROUTER_SINKHORN ? MOE_SECOND_ALL : c->second_policy;
    if (pol == MOE_SECOND_SAMPLING) {
        /* GShard: the second expert is drawn from softmax(h) over the others, by the
         * Gumbel-max trick; the draw is keyed (t, e) so it is the same on every backend. */
        const uint32_t stream = moe_rng_stream(MOE_RNG_GUMBEL, c->layer, key);
        topk(idx, sel, E, 1);
        int64_t best = -1;
        double bv = 0;
        for (int64_t e = 0; e < E; e++) {
            if (e == idx[0])
                continue;
            double u = moe_rand_uniform(c->seed, stream, (uint32_t)key.step, key.token0 + (uint32_t)t, (uint32_t)e);
            double v = ht[e] - log(-log(u));
            if (best < 0 || v > bv) {
                best = e;
                bv = v;
            }
        }
        idx[1] = best;
    } else {
        topk(idx, sel, E, k);
    }
    double S = renorm_sum(st, idx, k, c->renormalize);
    for (int64_t j = 0; j < k; j++) {
        p->choice_expert[t * k + j] = (int32_t)idx[j];
        p->choice_weight[t * k + j] = S > 0 ? st[idx[j]] / S : st[idx[j]];
        p->choice_kept[t * k + j] = 1;
    }
    if (pol == MOE_SECOND_RANDOM) {
        /* Keep the second with probability min(1, 2·w2) (w2 <= 1/2 when renormalised). */
        const uint32_t stream = moe_rng_stream(MOE_RNG_RANDOM2, c->layer, key);
        double u = moe_rand_uniform(c->seed, stream, (uint32_t)key.step, key.token0 + (uint32_t)t, 0);
        if (!(2.0 * p->choice_weight[t * k + 1] > u)) {
            p->choice_expert[t * k + 1] = -1;
            p->choice_weight[t * k + 1] = 0.0;
            p->choice_kept[t * k + 1] = 0;
        }
    }
}

/* A capacity candidate: choice (t, j) with its weight. */
typedef struct {
    double w;
    int64_t j, t;
} candidate;

/* Weight descending, then choice rank, then token: a total order, so qsort's lack of
 * stability cannot change the result. */
static int by_probability(const void *a, const void *b)
{
    const candidate *x = a, *y = b;
    if (x->w != y->w)
        return x->w > y->w ? -1 : 1;
    if (x->j != y->j)
        return x->j < y->j ? -1 : 1;
    return (x->t > y->t) - (x->t < y->t);
}

/* Applies capacity C (0: dropless) to the [T, k] choices, then lays out the plan. */
static moe_status token_choice_plan(moe_plan *p, moe_drop_policy drop_policy, int64_t C)
{
    const int64_t T = p->T, E = p->E, k = p->k;
    for (int64_t e = 0; e < E; e++)
        p->selected[e] = p->count[e] = 0;
    p->dropped = 0;
    for (int64_t i = 0; i < T * k; i++)
        if (p->choice_expert[i] >= 0)
            p->selected[p->choice_expert[i]]++;
    if (C > 0) {
        candidate *cand = malloc((size_t)(T * k) * sizeof *cand);
        if (!cand)
            return moe_error(MOE_ERR_NOMEM, "route: out of memory for %lld capacity candidates", (long long)(T * k));
        int64_t nc = 0;
        for (int64_t j = 0; j < k; j++)
            for (int64_t t = 0; t < T; t++)
                if (p->choice_expert[t * k + j] >= 0)
                    cand[nc++] = (candidate){p->choice_weight[t * k + j], j, t};
        if (drop_policy == MOE_DROP_PROBABILITY)
            qsort(cand, (size_t)nc, sizeof *cand, by_probability);
        for (int64_t q = 0; q < nc; q++) {
            int64_t i = cand[q].t * k + cand[q].j, e = p->choice_expert[i];
            if (p->count[e] < C) {
                p->count[e]++;
            } else {
                p->choice_kept[i] = 0;
                p->dropped++;
            }
        }
        free(cand);
    } else {
        for (int64_t e = 0; e < E; e++)
            p->count[e] = p->selected[e];
    }
    /* Counting sort on expert; the token loop outside keeps each expert's rows in token order. */
    p->offsets[0] = 0;
    for (int64_t e = 0; e < E; e++)
        p->offsets[e + 1] = p->offsets[e] + p->count[e];
    p->n = p->offsets[E];
    int64_t *fill = calloc((size_t)E, sizeof *fill);
    if (!fill)
        return moe_error(MOE_ERR_NOMEM, "route: out of memory");
    for (int64_t t = 0; t < T; t++)
        for (int64_t j = 0; j < k; j++) {
            int64_t i = t * k + j;
            if (!p->choice_kept[i])
                continue;
            int64_t e = p->choice_expert[i], r = p->offsets[e] + fill[e]++;
            p->token[r] = (int32_t)t;
            p->expert[r] = (int32_t)e;
            p->weight[r] = p->choice_weight[i];
            p->src[r] = t * E + e;
            p->choice[r] = i;
        }
    free(fill);
    return MOE_OK;
}

static moe_status route_token_choice(moe_plan *p, const double *s, const double *h, const double *bias,
                                     const moe_layer_config *c, moe_key key, int64_t C)
{
    const int64_t T = p->T, E = p->E, k = p->k;
    double *bal = NULL;
    if (c->router == MOE_ROUTER_SINKHORN) {
        bal = malloc((size_t)(T * E) * sizeof *bal);
        if (!bal || !sinkhorn(bal, h, c->sinkhorn_iters, T, E)) {
            free(bal);
            return moe_error(MOE_ERR_NOMEM, "route: out of memory for the Sinkhorn matrix [%lld, %lld]",
                             (long long)T, (long long)E);
        }
    }
    int oom = 0;
#pragma omp parallel if (T * E >= PAR_MIN)
    {
        double *v = malloc((size_t)E * sizeof *v);
        int64_t *idx = malloc((size_t)(k > 2 ? k : 2) * sizeof *idx);
        if (!v || !idx) {
#pragma omp atomic write
            oom = 1;
        }
#pragma omp for schedule(static)
        for (int64_t t = 0; t < T; t++) {
            if (!v || !idx)
                continue;
            const double *sel = bal ? bal + t * E : v;
            if (!bal)
                biased_row(v, s + t * E, bias, E);
            choose_token(p, t, s + t * E, sel, h ? h + t * E : NULL, c, key, idx);
        }
        free(v);
        free(idx);
    }
    free(bal);
    if (oom)
        return moe_error(MOE_ERR_NOMEM, "route: out of memory");
    return token_choice_plan(p, c->drop_policy, C);
}

typedef struct {
    double v;
    int64_t t;
} scored_token;

static int by_score(const void *a, const void *b)
{
    const scored_token *x = a, *y = b;
    if (x->v != y->v)
        return x->v > y->v ? -1 : 1;
    return (x->t > y->t) - (x->t < y->t);
}

/* Expert choice (Zhou et al. 2022): expert e takes the C tokens with the highest s[:, e]. */
static moe_status route_expert_choice(moe_plan *p, const double *s, int64_t C)
{
    const int64_t T = p->T, E = p->E;
    int oom = 0;
#pragma omp parallel if (T * E >= PAR_MIN)
    {
        scored_token *col = malloc((size_t)T * sizeof *col);
        unsigned char *take = malloc((size_t)T);
        if (!col || !take) {
#pragma omp atomic write
            oom = 1;
        }
#pragma omp for schedule(static)
        for (int64_t e = 0; e < E; e++) {
            if (!col || !take)
                continue;
            for (int64_t t = 0; t < T; t++) {
                col[t] = (scored_token){s[t * E + e], t};
                take[t] = 0;
            }
            qsort(col, (size_t)T, sizeof *col, by_score);
            for (int64_t q = 0; q < C; q++)
                take[col[q].t] = 1;
            int64_t r = e * C;
            for (int64_t t = 0; t < T; t++)
                if (take[t]) {
                    p->token[r] = (int32_t)t;
                    p->expert[r] = (int32_t)e;
                    p->weight[r] = s[t * E + e];
                    p->src[r] = t * E + e;
                    p->choice[r] = -1; /* marks an expert-choice plan */
                    r++;
                }
            p->count[e] = p->selected[e] = C;
        }
        free(col);
        free(take);
    }
    if (oom)
        return moe_error(MOE_ERR_NOMEM, "route: out of memory");
    for (int64_t e = 0; e <= E; e++)
        p->offsets[e] = e * C;
    p->n = E * C;
    p->dropped = 0;
    return MOE_OK;
}

/* Hash routing (Roller et al. 2021): a fixed expert per token id, weight 1, no drops. */
static moe_status route_hash(moe_plan *p, const int32_t *token_ids, uint32_t token0)
{
    const int64_t T = p->T, E = p->E;
    for (int64_t t = 0; t < T; t++) {
        uint32_t id = token_ids ? (uint32_t)token_ids[t] : token0 + (uint32_t)t;
        p->choice_expert[t] = (int32_t)(moe_hash_token(id) % (uint64_t)E);
        p->choice_weight[t] = 1.0;
        p->choice_kept[t] = 1;
    }
    return token_choice_plan(p, MOE_DROP_POSITION, 0);
}

moe_status moe_ref_route(moe_plan *p, const double *s, const double *h, const double *bias,
                         const int32_t *token_ids, const moe_layer_config *c, moe_key key, int64_t T)
{
    if (!p || !c)
        return moe_error(MOE_ERR_ARG, "route: plan and config must not be NULL");
    const int64_t E = c->n_experts;
    if (E != p->E)
        return moe_error(MOE_ERR_ARG, "route: config has n_experts = %lld but the plan was made for E = %lld",
                         (long long)E, (long long)p->E);
    if (T <= 0 || T > INT32_MAX)
        return moe_error(MOE_ERR_ARG, "route: T = %lld tokens outside [1, INT32_MAX]", (long long)T);
    /* The [T, k] choice arrays were allocated for the plan's T·k as it is on entry. */
    const int64_t tk_alloc = p->T * p->k;
    const int64_t C = moe_capacity(c, T);

    if (c->router == MOE_ROUTER_EXPERT_CHOICE) {
        if (!s)
            return moe_error(MOE_ERR_ARG, "route: expert choice needs the scores s");
        if (p->cap_n < E * C)
            return moe_error(MOE_ERR_ARG, "route: plan holds %lld assignments, expert choice needs E·C = %lld·%lld",
                             (long long)p->cap_n, (long long)E, (long long)C);
        p->T = T;
        p->k = C; /* expert choice: "choices per token" is the capacity */
        p->capacity = C;
        return route_expert_choice(p, s, C);
    }

    const int64_t k = c->router == MOE_ROUTER_HASH ? 1 : c->top_k;
    if (k < 1 || k > E)
        return moe_error(MOE_ERR_ARG, "route: top_k = %lld outside [1, n_experts = %lld]", (long long)k, (long long)E);
    if (T * k > tk_alloc)
        return moe_error(MOE_ERR_ARG, "route: plan's choice arrays hold %lld entries, T·k = %lld·%lld needs more",
                         (long long)tk_alloc, (long long)T, (long long)k);
    int64_t need = T * k;
    if (C > 0 && E * C < need)
        need = E * C;
    if (p->cap_n < need)
        return moe_error(MOE_ERR_ARG, "route: plan holds %lld assignments, this routing can keep %lld",
                         (long long)p->cap_n, (long long)need);
    p->T = T;
    p->k = k;
    p->capacity = C;
    if (c->router == MOE_ROUTER_HASH)
        return route_hash(p, token_ids, key.token0);

    if (!s)
        return moe_error(MOE_ERR_ARG, "route: %s routing needs the scores s", moe_router_name(c->router));
    if (c->router != MOE_ROUTER_SINKHORN && c->second_policy != MOE_SECOND_ALL && k != 2)
        return moe_error(MOE_ERR_ARG, "route: second_expert_policy needs top_k = 2 (got %lld)", (long long)k);
    if (!h && (c->router == MOE_ROUTER_SINKHORN ||
               (c->router != MOE_ROUTER_SINKHORN && c->second_policy == MOE_SECOND_SAMPLING)))
        return moe_error(MOE_ERR_ARG, "route: %s needs the logits h",
                         c->router == MOE_ROUTER_SINKHORN ? "sinkhorn routing" : "second_expert_policy sampling");
    if (c->router == MOE_ROUTER_SINKHORN && c->sinkhorn_iters < 1)
        return moe_error(MOE_ERR_ARG, "route: sinkhorn_iters must be >= 1 (got %lld)", (long long)c->sinkhorn_iters);
    return route_token_choice(p, s, h, bias, c, key, C);
}

/*
 * Token choice: with g_j the gradient on w_j (combine's dweight of the kept row plus the
 * importance loss's dchoice_weight), w_j = s_j / S over the renormalisation set R gives
 * ∂w_j/∂s_i = (δ_ij − w_j)/S. R holds every choice the token made before capacity (so a
 * dropped choice still pulls on the others through S); under RANDOM a skipped second is
 * in R too but its weight is the constant 0, so it only enters through S.
 */
void moe_ref_route_backward(double *ds, const double *dweight, const double *dchoice_weight, const moe_plan *p,
                            const double *s, const double *bias, const moe_layer_config *c)
{
    const int64_t T = p->T, E = p->E, k = p->k;
    if (c->router == MOE_ROUTER_HASH)
        return;
    if (!is_token_choice(c->router)) {
        if (dweight)
            for (int64_t i = 0; i < p->n; i++)
                ds[p->src[i]] += dweight[i];
        return;
    }
    double *g = calloc((size_t)(T * k), sizeof *g);
    if (!g)
        return;
    if (dchoice_weight)
        for (int64_t i = 0; i < T * k; i++)
            g[i] = dchoice_weight[i];
    if (dweight)
        for (int64_t r = 0; r < p->n; r++)
            g[p->choice[r]] += dweight[r];
    const int random2 = c->router != MOE_ROUTER_SINKHORN && c->second_policy == MOE_SECOND_RANDOM && k == 2;
#pragma omp parallel for schedule(static) if (T * E >= PAR_MIN)
    for (int64_t t = 0; t < T; t++) {
        const double *st = s + t * E, *gt = g + t * k;
        const int32_t *ce = p->choice_expert + t * k;
        /* A skipped RANDOM second is recomputed as forward chose it; it enters only through S. */
        const int64_t skipped = random2 && ce[1] < 0 ? second_of_top2(st, bias, E) : -1;
        double S = 0;
        if (c->renormalize) {
            for (int64_t j = 0; j < k; j++)
                S += st[ce[j] >= 0 ? ce[j] : skipped];
            if (!(S > 0))
                S = 0; /* forward's degenerate case: weights were s unchanged */
        }
        if (S == 0) {
            for (int64_t j = 0; j < k; j++)
                if (ce[j] >= 0)
                    ds[t * E + ce[j]] += gt[j];
            continue;
        }
        double gw = 0; /* Σ_j g_j·w_j */
        for (int64_t j = 0; j < k; j++)
            if (ce[j] >= 0)
                gw += gt[j] * p->choice_weight[t * k + j];
        for (int64_t j = 0; j < k; j++) {
            if (ce[j] >= 0)
                ds[t * E + ce[j]] += (gt[j] - gw) / S;
            else
                ds[t * E + skipped] -= gw / S;
        }
    }
    free(g);
}
