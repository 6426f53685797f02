/*
 * Selection on the cpu backend: fp32 scores -> routing plan, with exactly the rules of
 * ref/select.c (read its header for the decisions): ties to the lower expert (token for
 * expert choice), renormalisation before dropping, GShard's policies with the same
 * Philox draws, capacity in (choice rank, token) order or by weight, Sinkhorn with a
 * fixed iteration count. Differences are in how, not what:
 *  - the plan is laid out by a counting sort on expert id (offsets from counts, then one
 *    pass in token order), and the inverse index token -> rows by a second counting sort;
 *  - the orders by weight (drop by probability, expert choice) are stable LSD radix
 *    sorts on the float bits, so equal weights keep their (choice rank, token) order
 *    as ref's comparison asks — no qsort, and O(n);
 *  - all workspace is allocated with the plan, none per call.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "cpu/cpu.h"
#include "ref/ref.h"

static int is_token_choice(moe_router_kind r)
{
    return r == MOE_ROUTER_TOPK || r == MOE_ROUTER_NOISY_TOPK || r == MOE_ROUTER_SINKHORN;
}

/* ---- plan storage ------------------------------------------------------------ */

static void plan_free(moe_backend *b, moe_bplan *p)
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
    free(p->tok_off);
    free(p->tok_row);
    free(p->fill);
    free(p->cand);
    free(p->cand2);
    free(p->bal);
    free(p->d0);
    free(p->d1);
    free(p);
}

static moe_status plan_create(moe_backend *b, const moe_layer_config *c, int64_t max_tokens, moe_bplan **out)
{
    *out = NULL;
    moe_status s = moe_layer_config_validate(c, max_tokens);
    if (s != MOE_OK)
        return s;
    moe_bplan *p = calloc(1, sizeof *p);
    if (!p)
        return moe_error(MOE_ERR_NOMEM, "cpu backend: out of memory for a plan");
    const int64_t T = max_tokens, E = c->n_experts;
    int64_t k = c->router == MOE_ROUTER_EXPERT_CHOICE ? moe_capacity(c, T) : c->top_k;
    int64_t n = c->router == MOE_ROUTER_EXPERT_CHOICE ? E * k : T * k;
    p->T = p->max_T = T;
    p->E = E;
    p->k = p->max_k = k;
    p->cap_n = n;
    size_t nn = (size_t)(n ? n : 1), tk = (size_t)(T * k), big = (size_t)(T > E ? T : E) + 1;
    size_t sortn = tk > big ? tk : big;
    p->token = malloc(nn * sizeof *p->token);
    p->expert = malloc(nn * sizeof *p->expert);
    p->weight = malloc(nn * sizeof *p->weight);
    p->src = malloc(nn * sizeof *p->src);
    p->choice = malloc(nn * sizeof *p->choice);
    p->tok_row = malloc(nn * sizeof *p->tok_row);
    p->offsets = calloc((size_t)E + 1, sizeof *p->offsets);
    p->count = calloc((size_t)E, sizeof *p->count);
    p->selected = calloc((size_t)E, sizeof *p->selected);
    p->choice_expert = calloc(tk, sizeof *p->choice_expert);
    p->choice_weight = calloc(tk, sizeof *p->choice_weight);
    p->choice_kept = calloc(tk, sizeof *p->choice_kept);
    p->tok_off = calloc((size_t)T + 1, sizeof *p->tok_off);
    p->fill = calloc(big, sizeof *p->fill);
    p->cand = malloc(sortn * sizeof *p->cand);
    p->cand2 = malloc(sortn * sizeof *p->cand2);
    int ok = p->token && p->expert && p->weight && p->src && p->choice && p->tok_row && p->offsets && p->count &&
             p->selected && p->choice_expert && p->choice_weight && p->choice_kept && p->tok_off && p->fill &&
             p->cand && p->cand2;
    if (ok && c->router == MOE_ROUTER_SINKHORN) {
        p->bal = malloc((size_t)(T * E) * sizeof *p->bal);
        p->d0 = malloc((size_t)T * sizeof *p->d0);
        p->d1 = malloc((size_t)E * sizeof *p->d1);
        ok = p->bal && p->d0 && p->d1;
    }
    if (!ok) {
        plan_free(b, p);
        return moe_error(MOE_ERR_NOMEM, "cpu backend: out of memory for a plan of %lld assignments", (long long)n);
    }
    *out = p;
    return MOE_OK;
}

/* token -> its rows in plan order: a counting sort of rows by token, stable in i. */
static void build_token_index(moe_bplan *p)
{
    const int64_t T = p->T, n = p->n;
    int64_t *off = p->tok_off, *fill = p->fill;
    for (int64_t t = 0; t <= T; t++)
        off[t] = 0;
    for (int64_t i = 0; i < n; i++)
        off[p->token[i] + 1]++;
    for (int64_t t = 0; t < T; t++)
        off[t + 1] += off[t];
    for (int64_t t = 0; t < T; t++)
        fill[t] = off[t];
    for (int64_t i = 0; i < n; i++)
        p->tok_row[fill[p->token[i]]++] = i;
}

static moe_status plan_download(moe_backend *b, moe_plan *h, const moe_bplan *p)
{
    const int64_t tk = p->choice_expert && p->T * p->k <= p->max_T * p->max_k ? p->T * p->k : 0;
    if (h->cap_n < p->n || h->E != p->E || h->T * h->k < tk)
        return moe_error(MOE_ERR_ARG, "cpu backend: host plan too small for %lld assignments", (long long)p->n);
    h->T = p->T;
    h->k = p->k;
    h->n = p->n;
    h->capacity = p->capacity;
    h->dropped = p->dropped;
    for (int64_t i = 0; i < p->n; i++) {
        h->token[i] = p->token[i];
        h->expert[i] = p->expert[i];
        h->weight[i] = p->weight[i];
        h->src[i] = p->src[i];
        h->choice[i] = p->choice[i];
    }
    memcpy(h->offsets, p->offsets, (size_t)(p->E + 1) * sizeof *h->offsets);
    memcpy(h->count, p->count, (size_t)p->E * sizeof *h->count);
    memcpy(h->selected, p->selected, (size_t)p->E * sizeof *h->selected);
    for (int64_t i = 0; i < tk; i++) {
        h->choice_expert[i] = p->choice_expert[i];
        h->choice_weight[i] = p->choice_weight[i];
        h->choice_kept[i] = p->choice_kept[i];
    }
    return MOE_OK;
}

static moe_status plan_upload(moe_backend *b, moe_bplan *p, const moe_plan *h)
{
    moe_status st = moe_plan_check(h);
    if (st)
        return st;
    const int ec = h->n > 0 && h->choice[0] < 0;
    if (h->E != p->E || h->n > p->cap_n || h->T > p->max_T || (!ec && h->T * h->k > p->max_T * p->max_k))
        return moe_error(MOE_ERR_ARG, "cpu backend: plan of %lld assignments, T = %lld, k = %lld does not fit",
                         (long long)h->n, (long long)h->T, (long long)h->k);
    p->T = h->T;
    p->k = h->k;
    p->n = h->n;
    p->capacity = h->capacity;
    p->dropped = h->dropped;
    for (int64_t i = 0; i < h->n; i++) {
        p->token[i] = h->token[i];
        p->expert[i] = h->expert[i];
        p->weight[i] = (float)h->weight[i];
        p->src[i] = h->src[i];
        p->choice[i] = h->choice[i];
    }
    memcpy(p->offsets, h->offsets, (size_t)(h->E + 1) * sizeof *p->offsets);
    memcpy(p->count, h->count, (size_t)h->E * sizeof *p->count);
    memcpy(p->selected, h->selected, (size_t)h->E * sizeof *p->selected);
    if (!ec)
        for (int64_t i = 0; i < h->T * h->k; i++) {
            p->choice_expert[i] = h->choice_expert[i];
            p->choice_weight[i] = (float)h->choice_weight[i];
            p->choice_kept[i] = h->choice_kept[i];
        }
    build_token_index(p);
    return MOE_OK;
}

static moe_status plan_set_segments(moe_backend *b, moe_bplan *p, const int64_t *begin, const int64_t *rows)
{
    int64_t n = 0;
    for (int64_t e = 0; e < p->E; e++) {
        if (begin[e] < 0 || rows[e] < 0 || rows[e] > p->cap_n - n)
            return moe_error(MOE_ERR_ARG, "cpu backend: expert %lld's %lld rows at %lld do not fit a plan of %lld",
                             (long long)e, (long long)rows[e], (long long)begin[e], (long long)p->cap_n);
        p->offsets[e] = begin[e];
        p->count[e] = p->selected[e] = rows[e];
        n += rows[e];
    }
    p->offsets[p->E] = -1; /* segments need not be contiguous: there is no end offset */
    p->n = n;
    p->dropped = 0;
    return MOE_OK;
}

static void plan_counts(moe_backend *b, moe_tensor out, const moe_bplan *p)
{
    float *o = F(out);
    for (int64_t e = 0; e < p->E; e++) {
        o[e] = (float)p->count[e];
        o[p->E + e] = (float)p->selected[e];
    }
    o[2 * p->E] = (float)p->n;
    o[2 * p->E + 1] = (float)p->dropped;
}

static void plan_fill(moe_backend *b, moe_tensor t, double v, const moe_bplan *p, int64_t width)
{
    for (int64_t e = 0; e < p->E; e++)
        b->fill(b, moe_tensor_at(t, p->offsets[e] * width), v, p->count[e] * width);
}

/* aux-loss-free balancing: the sign of (mean − count) per expert, in the bias's type */
static void bias_update(moe_backend *b, moe_tensor bias, moe_tensor counts, double rate, int64_t E)
{
    float *bb = F(bias);
    const float *c = F(counts);
    double mean = 0;
    for (int64_t e = 0; e < E; e++)
        mean += c[e];
    mean /= (double)E;
    for (int64_t e = 0; e < E; e++) {
        const double err = mean - c[e];
        bb[e] = (float)((double)bb[e] + rate * (double)((err > 0) - (err < 0)));
    }
}

/* ---- stable radix sort by float, descending ----------------------------------- */

/* Maps a float to a key whose unsigned order is the float's DEScending order. */
static inline uint32_t desc_key(float v)
{
    uint32_t u;
    memcpy(&u, &v, sizeof u);
    u = (u & 0x80000000u) ? ~u : (u | 0x80000000u);
    return ~u;
}

/*
 * Sorts idx[0..n) by val[idx] descending, stably (LSD, four 8-bit passes), using tmp.
 * The result is in idx. Stability is what makes equal values keep the caller's order.
 */
static void radix_sort_desc(int64_t *idx, int64_t *tmp, int64_t n, const float *val)
{
    int64_t *from = idx, *to = tmp;
    for (int pass = 0; pass < 4; pass++) {
        int64_t cnt[257] = {0};
        const int sh = 8 * pass;
        for (int64_t q = 0; q < n; q++)
            cnt[((desc_key(val[from[q]]) >> sh) & 0xff) + 1]++;
        for (int c = 0; c < 256; c++)
            cnt[c + 1] += cnt[c];
        for (int64_t q = 0; q < n; q++)
            to[cnt[(desc_key(val[from[q]]) >> sh) & 0xff]++] = from[q];
        int64_t *sw = from;
        from = to;
        to = sw;
    }
    /* four passes: the data is back in idx */
}

/* ---- token choice --------------------------------------------------------------- */

/* top k of v (value descending, ties to the lower index) by repeated argmax, as ref */
static void topk(int64_t *idx, const float *v, int64_t E, int64_t k)
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

static int64_t second_of_top2(const float *st, const float *bias, int64_t E)
{
    int64_t a = -1, bb = -1;
    float va = 0, vb = 0;
    for (int64_t e = 0; e < E; e++) {
        float v = st[e] + (bias ? bias[e] : 0.0f);
        if (a < 0 || v > va) {
            bb = a;
            vb = va;
            a = e;
            va = v;
        } else if (bb < 0 || v > vb) {
            bb = e;
            vb = v;
        }
    }
    return bb;
}

/* Megatron's Sinkhorn as ref/select.c: the balanced matrix into p->bal (fp32), the
 * scalings and their sums in double. */
static void sinkhorn(moe_bplan *p, const float *h, int64_t iters, int64_t T, int64_t E)
{
    float *bal = p->bal;
    double *d0 = p->d0, *d1 = p->d1;
    float m = h[0];
    for (int64_t i = 1; i < T * E; i++)
        m = h[i] > m ? h[i] : m;
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < T * E; i++)
        bal[i] = expf(h[i] - m);
    for (int64_t t = 0; t < T; t++)
        d0[t] = 1.0;
    for (int64_t e = 0; e < E; e++)
        d1[e] = 1.0;
    for (int64_t it = 0; it < iters; it++) {
#pragma omp parallel for schedule(static)
        for (int64_t t = 0; t < T; t++) {
            double acc = 0;
            for (int64_t e = 0; e < E; e++)
                acc += d1[e] * bal[t * E + e];
            d0[t] = (1.0 / (double)T) * 1.0 / (acc + 1e-8);
        }
        for (int64_t e = 0; e < E; e++) {
            double acc = 0;
            for (int64_t t = 0; t < T; t++)
                acc += d0[t] * bal[t * E + e];
            d1[e] = (1.0 / (double)E) * 1.0 / (acc + 1e-8);
        }
    }
#pragma omp parallel for schedule(static)
    for (int64_t t = 0; t < T; t++)
        for (int64_t e = 0; e < E; e++)
            bal[t * E + e] = (float)(d1[e] * bal[t * E + e] * d0[t]);
}

/* Token t's choices into the [T, k] arrays, before capacity (ref's choose_token). */
static void choose_token(moe_bplan *p, int64_t t, const float *st, const float *sel, const float *ht,
                         const moe_layer_config *c, moe_key key, int64_t *idx)
{
    const int64_t E = p->E, k = p->k;
    const moe_second_policy pol = c->router == MOE_ROUTER_SINKHORN ? MOE_SECOND_ALL : c->second_policy;
    if (pol == MOE_SECOND_SAMPLING) {
        const uint32_t stream = moe_rng_stream(MOE_RNG_GUMBEL, c->layer, key);
        topk(idx, sel, E, 1);
        int64_t best = -1;
        double bv = 0;
        for (int64_t e = 0; e < E; e++) {
            if (e == idx[0])
                continue;
            double u = moe_rand_uniform(c->seed, stream, (uint32_t)key.step, key.token0 + (uint32_t)t, (uint32_t)e);
            double v = (double)ht[e] - log(-log(u));
            if (best < 0 || v > bv) {
                best = e;
                bv = v;
            }
        }
        idx[1] = best;
    } else {
        topk(idx, sel, E, k);
    }
    float S = 0;
    if (c->renormalize) {
        for (int64_t j = 0; j < k; j++)
            S += st[idx[j]];
        if (!(S > 0))
            S = 0;
    }
    for (int64_t j = 0; j < k; j++) {
        p->choice_expert[t * k + j] = (int32_t)idx[j];
        p->choice_weight[t * k + j] = S > 0 ? st[idx[j]] / S : st[idx[j]];
        p->choice_kept[t * k + j] = 1;
    }
    if (pol == MOE_SECOND_RANDOM) {
        const uint32_t stream = moe_rng_stream(MOE_RNG_RANDOM2, c->layer, key);
        double u = moe_rand_uniform(c->seed, stream, (uint32_t)key.step, key.token0 + (uint32_t)t, 0);
        if (!(2.0 * (double)p->choice_weight[t * k + 1] > u)) {
            p->choice_expert[t * k + 1] = -1;
            p->choice_weight[t * k + 1] = 0.0f;
            p->choice_kept[t * k + 1] = 0;
        }
    }
}

/* Capacity C (0: dropless) over the [T, k] choices, then the expert-sorted layout. */
static void token_choice_plan(moe_bplan *p, moe_drop_policy drop_policy, int64_t C)
{
    const int64_t T = p->T, E = p->E, k = p->k;
    for (int64_t e = 0; e < E; e++)
        p->selected[e] = p->count[e] = 0;
    p->dropped = 0;
    for (int64_t i = 0; i < T * k; i++)
        if (p->choice_expert[i] >= 0)
            p->selected[p->choice_expert[i]]++;
    if (C > 0) {
        /* candidates in (choice rank, token) order: that IS the position policy's order,
         * and the tie order of the probability policy after a stable sort by weight */
        int64_t nc = 0;
        for (int64_t j = 0; j < k; j++)
            for (int64_t t = 0; t < T; t++)
                if (p->choice_expert[t * k + j] >= 0)
                    p->cand[nc++] = t * k + j;
        if (drop_policy == MOE_DROP_PROBABILITY)
            radix_sort_desc(p->cand, p->cand2, nc, p->choice_weight);
        for (int64_t q = 0; q < nc; q++) {
            int64_t i = p->cand[q], e = p->choice_expert[i];
            if (p->count[e] < C) {
                p->count[e]++;
            } else {
                p->choice_kept[i] = 0;
                p->dropped++;
            }
        }
    } else {
        for (int64_t e = 0; e < E; e++)
            p->count[e] = p->selected[e];
    }
    /* counting sort on expert id; the token-major walk keeps each expert's rows in token order */
    p->offsets[0] = 0;
    for (int64_t e = 0; e < E; e++)
        p->offsets[e + 1] = p->offsets[e] + p->count[e];
    p->n = p->offsets[E];
    int64_t *fill = p->fill;
    for (int64_t e = 0; e < E; e++)
        fill[e] = p->offsets[e];
    for (int64_t t = 0; t < T; t++)
        for (int64_t j = 0; j < k; j++) {
            int64_t i = t * k + j;
            if (!p->choice_kept[i])
                continue;
            int64_t e = p->choice_expert[i], r = fill[e]++;
            p->token[r] = (int32_t)t;
            p->expert[r] = (int32_t)e;
            p->weight[r] = p->choice_weight[i];
            p->src[r] = t * E + e;
            p->choice[r] = i;
        }
}

/* Small stacks for a row of selection values and the top-k indices; larger E or k use
 * the plan's workspace rows (sequentially). */
#define ROW_MAX 512

static void route_token_choice(moe_bplan *p, const float *s, const float *h, const float *bias,
                               const moe_layer_config *c, moe_key key, int64_t C)
{
    const int64_t T = p->T, E = p->E, k = p->k;
    if (c->router == MOE_ROUTER_SINKHORN)
        sinkhorn(p, h, c->sinkhorn_iters, T, E);
    const float *bal = c->router == MOE_ROUTER_SINKHORN ? p->bal : NULL;
    const int small = E <= ROW_MAX && k <= ROW_MAX;
#pragma omp parallel if (small)
    {
        float v_s[ROW_MAX];
        int64_t idx_s[ROW_MAX > 2 ? ROW_MAX : 2];
        /* large E: rows of the selection value go through fill (sequential region) */
        float *v = small ? v_s : (float *)p->cand2;
        int64_t *idx = small ? idx_s : p->cand;
#pragma omp for schedule(static)
        for (int64_t t = 0; t < T; t++) {
            const float *st = s + t * E;
            const float *sel = v;
            if (bal) {
                sel = bal + t * E;
            } else if (bias) {
                for (int64_t e = 0; e < E; e++)
                    v[e] = st[e] + bias[e];
            } else {
                sel = st;
            }
            choose_token(p, t, st, sel, h ? h + t * E : NULL, c, key, idx);
        }
    }
    token_choice_plan(p, c->drop_policy, C);
}

/* Expert choice: expert e takes its C highest s[:, e] (ties to the lower token), in token order. */
static void route_expert_choice(moe_bplan *p, const float *s, int64_t C)
{
    const int64_t T = p->T, E = p->E;
    float *col = (float *)p->fill; /* unused by this router otherwise; T + 1 int64 >= T floats */
    int64_t *mark = p->tok_off;    /* rebuilt by build_token_index afterwards */
    for (int64_t e = 0; e < E; e++) {
        for (int64_t t = 0; t < T; t++) {
            col[t] = s[t * E + e];
            p->cand[t] = t;
            mark[t] = 0;
        }
        radix_sort_desc(p->cand, p->cand2, T, col);
        for (int64_t q = 0; q < C; q++)
            mark[p->cand[q]] = 1;
        int64_t r = e * C;
        for (int64_t t = 0; t < T; t++)
            if (mark[t]) {
                p->token[r] = (int32_t)t;
                p->expert[r] = (int32_t)e;
                p->weight[r] = s[t * E + e];
                p->src[r] = t * E + e;
                p->choice[r] = -1;
                r++;
            }
        p->count[e] = p->selected[e] = C;
    }
    for (int64_t e = 0; e <= E; e++)
        p->offsets[e] = e * C;
    p->n = E * C;
    p->dropped = 0;
}

static void route_hash(moe_bplan *p, const int32_t *token_ids, uint32_t token0)
{
    const int64_t T = p->T, E = p->E;
    for (int64_t t = 0; t < T; t++) {
        uint32_t id = token_ids ? (uint32_t)token_ids[t] : token0 + (uint32_t)t;
        p->choice_expert[t] = (int32_t)(moe_hash_token(id) % (uint64_t)E);
        p->choice_weight[t] = 1.0f;
        p->choice_kept[t] = 1;
    }
    token_choice_plan(p, MOE_DROP_POSITION, 0);
}

#define FAIL(...)                                              \
    do {                                                       \
        moe_backend_fail(b, "route", MOE_ERR_ARG, __VA_ARGS__); \
        return;                                                \
    } while (0)

static void route(moe_backend *b, moe_bplan *p, moe_tensor s, moe_tensor h, moe_tensor *bias, moe_tensor *token_ids,
                  const moe_layer_config *c, moe_key key, int64_t T)
{
    const int64_t E = c->n_experts;
    if (E != p->E)
        FAIL("config has n_experts = %lld but the plan was made for E = %lld", (long long)E, (long long)p->E);
    if (T <= 0 || T > p->max_T)
        FAIL("T = %lld tokens outside [1, %lld] (the plan's size)", (long long)T, (long long)p->max_T);
    const int64_t C = moe_capacity(c, T);
    if (c->router == MOE_ROUTER_EXPERT_CHOICE) {
        if (E * C > p->cap_n)
            FAIL("plan holds %lld assignments, expert choice needs E·C = %lld·%lld", (long long)p->cap_n,
                 (long long)E, (long long)C);
        if (!s.buf)
            FAIL("expert choice needs the scores s");
        p->T = T;
        p->k = C;
        p->capacity = C;
        route_expert_choice(p, F(s), C);
        build_token_index(p);
        return;
    }
    const int64_t k = c->router == MOE_ROUTER_HASH ? 1 : c->top_k;
    if (k < 1 || k > E)
        FAIL("top_k = %lld outside [1, n_experts = %lld]", (long long)k, (long long)E);
    if (T * k > p->max_T * p->max_k)
        FAIL("plan's choice arrays hold %lld entries, T·k = %lld·%lld needs more", (long long)(p->max_T * p->max_k),
             (long long)T, (long long)k);
    if (c->router != MOE_ROUTER_HASH && c->router != MOE_ROUTER_SINKHORN && c->second_policy != MOE_SECOND_ALL &&
        k != 2)
        FAIL("second_expert_policy needs top_k = 2 (got %lld)", (long long)k);
    if (c->router == MOE_ROUTER_SINKHORN && (c->sinkhorn_iters < 1 || !p->bal))
        FAIL("sinkhorn routing needs sinkhorn_iters >= 1 and a plan made for it");
    if (c->router != MOE_ROUTER_HASH &&
        (!s.buf || (!h.buf && (c->router == MOE_ROUTER_SINKHORN || c->second_policy == MOE_SECOND_SAMPLING))))
        FAIL("%s routing needs the scores s (and the logits h for Sinkhorn or sampling)", moe_router_name(c->router));
    p->T = T;
    p->k = k;
    p->capacity = C;
    if (c->router == MOE_ROUTER_HASH)
        route_hash(p, token_ids ? I32(*token_ids) : NULL, key.token0);
    else
        route_token_choice(p, F(s), h.buf ? F(h) : NULL, bias ? F(*bias) : NULL, c, key, C);
    build_token_index(p);
}

#undef FAIL

/* ref's moe_ref_route_backward in fp32: see the derivation there. */
static void route_backward(moe_backend *b, moe_tensor ds_t, moe_tensor *dweight_t, moe_tensor *dchoice_t,
                           const moe_bplan *p, moe_tensor s_t, moe_tensor *bias_t, const moe_layer_config *c)
{
    const int64_t T = p->T, E = p->E, k = p->k;
    float *ds = F(ds_t);
    const float *s = F(s_t), *dweight = FOPT(dweight_t), *dchoice = FOPT(dchoice_t), *bias = FOPT(bias_t);
    if (c->router == MOE_ROUTER_HASH)
        return;
    if (!is_token_choice(c->router)) {
        if (dweight)
            for (int64_t i = 0; i < p->n; i++)
                ds[p->src[i]] += dweight[i];
        return;
    }
    float *g = moe_cpu_scratch(b, T * k, "route_backward");
    if (!g)
        return;
    for (int64_t i = 0; i < T * k; i++)
        g[i] = dchoice ? dchoice[i] : 0.0f;
    if (dweight)
        for (int64_t r = 0; r < p->n; r++)
            g[p->choice[r]] += dweight[r];
    const int random2 = c->router != MOE_ROUTER_SINKHORN && c->second_policy == MOE_SECOND_RANDOM && k == 2;
#pragma omp parallel for schedule(static)
    for (int64_t t = 0; t < T; t++) {
        const float *st = s + t * E, *gt = g + t * k;
        const int32_t *ce = p->choice_expert + t * k;
        const int64_t skipped = random2 && ce[1] < 0 ? second_of_top2(st, bias, E) : -1;
        float S = 0;
        if (c->renormalize) {
            for (int64_t j = 0; j < k; j++)
                S += st[ce[j] >= 0 ? ce[j] : skipped];
            if (!(S > 0))
                S = 0;
        }
        if (S == 0) {
            for (int64_t j = 0; j < k; j++)
                if (ce[j] >= 0)
                    ds[t * E + ce[j]] += gt[j];
            continue;
        }
        float gw = 0;
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
}

void moe_cpu_select_ops(moe_backend *b)
{
    b->plan_create = plan_create;
    b->plan_free = plan_free;
    b->plan_download = plan_download;
    b->plan_upload = plan_upload;
    b->plan_set_segments = plan_set_segments;
    b->plan_counts = plan_counts;
    b->plan_fill = plan_fill;
    b->bias_update = bias_update;
    b->route = route;
    b->route_backward = route_backward;
}
