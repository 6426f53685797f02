/* Selection: exact plans on hand-made scores, plan invariants on random ones, route backward. */
#include "testutil.h"

#include "ref/ref.h"

#ifdef _OPENMP
#include <omp.h>
#endif

#define FD_H 1e-6
#define FD_TOL 1e-6

static tu_fd_stats fd_all;

static void config(moe_layer_config *c, moe_router_kind r, int64_t E, int64_t k)
{
    moe_layer_config_default(c);
    c->router = r;
    c->n_experts = E;
    c->top_k = k;
    c->renormalize = 0;
    c->capacity_factor = 0;
}

/* A plan sized as the layer sizes it: T·k assignments, or E·C for expert choice. */
static moe_plan *make_plan(const moe_layer_config *c, int64_t T)
{
    moe_plan *p = NULL;
    int64_t k = c->router == MOE_ROUTER_EXPERT_CHOICE ? moe_capacity(c, T) : (c->router == MOE_ROUTER_HASH ? 1 : c->top_k);
    int64_t n = c->router == MOE_ROUTER_EXPERT_CHOICE ? c->n_experts * k : T * k;
    ck_assert_int_eq(moe_plan_create(n, T, c->n_experts, k, &p), MOE_OK);
    return p;
}

static void route_ok(moe_plan *p, const double *s, const double *h, const double *bias, const int32_t *ids,
                     const moe_layer_config *c, uint64_t step, int64_t T)
{
    moe_status st = moe_ref_route(p, s, h, bias, ids, c, step, T);
    ck_assert_msg(st == MOE_OK, "route failed: %s", moe_last_error());
    ck_assert_msg(moe_plan_check(p) == MOE_OK, "plan check: %s", moe_last_error());
}

/* The plan's rows as (token, expert) pairs must be exactly `want` (in plan order). */
static void expect_rows(const moe_plan *p, int64_t n, const int32_t *tok, const int32_t *ex, const double *w)
{
    ck_assert_int_eq(p->n, n);
    for (int64_t i = 0; i < n; i++) {
        ck_assert_msg(p->token[i] == tok[i] && p->expert[i] == ex[i], "row %lld: (t %d, e %d), want (t %d, e %d)",
                      (long long)i, p->token[i], p->expert[i], tok[i], ex[i]);
        if (w)
            ck_assert_double_eq_tol(p->weight[i], w[i], 1e-15);
    }
}

/* ---- hand-made selections ------------------------------------------------- */

static const double S4x3[12] = {
    0.7, 0.2, 0.1, /* t0 -> e0 */
    0.1, 0.6, 0.3, /* t1 -> e1 */
    0.8, 0.1, 0.1, /* t2 -> e0, stronger than t0 */
    0.2, 0.2, 0.6, /* t3 -> e2 */
};

START_TEST(top1_switch)
{
    moe_layer_config c;
    config(&c, MOE_ROUTER_TOPK, 3, 1);
    moe_plan *p = make_plan(&c, 4);
    route_ok(p, S4x3, NULL, NULL, NULL, &c, 0, 4);
    expect_rows(p, 4, (int32_t[]){0, 2, 1, 3}, (int32_t[]){0, 0, 1, 2}, (double[]){0.7, 0.8, 0.6, 0.6});
    ck_assert_int_eq(p->dropped, 0);
    ck_assert_int_eq(p->capacity, 0);
    /* renormalised top-1 weights are 1 */
    c.renormalize = 1;
    route_ok(p, S4x3, NULL, NULL, NULL, &c, 0, 4);
    for (int i = 0; i < 4; i++)
        ck_assert_double_eq(p->weight[i], 1.0);
    /* ties go to the lower expert */
    const double tie[3] = {0.4, 0.4, 0.2};
    route_ok(p, tie, NULL, NULL, NULL, &c, 0, 1);
    ck_assert_int_eq(p->expert[0], 0);
    moe_plan_free(p);
}
END_TEST

START_TEST(top1_capacity_policies)
{
    /* C = ceil(0.75·4·1/3) = 1: e0 is wanted by t0 (0.7) and t2 (0.8). Position keeps the
     * earlier token t0; probability keeps the stronger t2. */
    moe_layer_config c;
    config(&c, MOE_ROUTER_TOPK, 3, 1);
    c.capacity_factor = 0.75;
    ck_assert_int_eq(moe_capacity(&c, 4), 1);
    moe_plan *p = make_plan(&c, 4);
    route_ok(p, S4x3, NULL, NULL, NULL, &c, 0, 4);
    expect_rows(p, 3, (int32_t[]){0, 1, 3}, (int32_t[]){0, 1, 2}, NULL);
    ck_assert_int_eq(p->dropped, 1);
    ck_assert_int_eq(p->choice_kept[2], 0);
    ck_assert_int_eq(p->selected[0], 2);
    ck_assert_int_eq(p->count[0], 1);
    c.drop_policy = MOE_DROP_PROBABILITY;
    route_ok(p, S4x3, NULL, NULL, NULL, &c, 0, 4);
    expect_rows(p, 3, (int32_t[]){2, 1, 3}, (int32_t[]){0, 1, 2}, NULL);
    ck_assert_int_eq(p->dropped, 1);
    ck_assert_int_eq(p->choice_kept[0], 0);
    moe_plan_free(p);
}
END_TEST

START_TEST(top2_capacity_policies)
{
    /* k = E = 2, C = ceil(0.5·3·2/2) = 2. Position: all first choices (t0→0, t1→0, t2→1)
     * then the seconds in token order (t0→1 fits, t1→1 full, t2→0 full).
     * Probability: 0.9 (t0,0), 0.7 (t2,1), 0.6 (t1,0), 0.4 (t1,1) kept; 0.3 (t2,0) and
     * 0.1 (t0,1) find their experts full. */
    const double s[6] = {0.9, 0.1, 0.6, 0.4, 0.3, 0.7};
    moe_layer_config c;
    config(&c, MOE_ROUTER_TOPK, 2, 2);
    c.capacity_factor = 0.5;
    moe_plan *p = make_plan(&c, 3);
    route_ok(p, s, NULL, NULL, NULL, &c, 0, 3);
    ck_assert_int_eq(p->capacity, 2);
    expect_rows(p, 4, (int32_t[]){0, 1, 0, 2}, (int32_t[]){0, 0, 1, 1}, (double[]){0.9, 0.6, 0.1, 0.7});
    ck_assert_int_eq(p->dropped, 2);
    ck_assert_int_eq(p->choice_kept[1 * 2 + 1], 0);
    ck_assert_int_eq(p->choice_kept[2 * 2 + 1], 0);
    c.drop_policy = MOE_DROP_PROBABILITY;
    route_ok(p, s, NULL, NULL, NULL, &c, 0, 3);
    expect_rows(p, 4, (int32_t[]){0, 1, 1, 2}, (int32_t[]){0, 0, 1, 1}, (double[]){0.9, 0.6, 0.4, 0.7});
    ck_assert_int_eq(p->dropped, 2);
    ck_assert_int_eq(p->choice_kept[0 * 2 + 1], 0);
    ck_assert_int_eq(p->choice_kept[2 * 2 + 1], 0);
    for (int e = 0; e < 2; e++)
        ck_assert_int_eq(p->selected[e], 3);
    moe_plan_free(p);
}
END_TEST

START_TEST(top2_all_and_topk_renorm)
{
    moe_layer_config c;
    config(&c, MOE_ROUTER_TOPK, 4, 2);
    c.renormalize = 1;
    moe_plan *p = make_plan(&c, 1);
    route_ok(p, (double[]){0.4, 0.3, 0.2, 0.1}, NULL, NULL, NULL, &c, 0, 1);
    expect_rows(p, 2, (int32_t[]){0, 0}, (int32_t[]){0, 1}, (double[]){0.4 / 0.7, 0.3 / 0.7});
    moe_plan_free(p);

    /* k = 3 with a tie (e1 and e4 at 0.3): order e1, e4, e2; plan rows sorted by expert */
    const double s[5] = {0.1, 0.3, 0.25, 0.05, 0.3};
    config(&c, MOE_ROUTER_TOPK, 5, 3);
    p = make_plan(&c, 1);
    route_ok(p, s, NULL, NULL, NULL, &c, 0, 1);
    ck_assert_int_eq(p->choice_expert[0], 1);
    ck_assert_int_eq(p->choice_expert[1], 4);
    ck_assert_int_eq(p->choice_expert[2], 2);
    expect_rows(p, 3, (int32_t[]){0, 0, 0}, (int32_t[]){1, 2, 4}, (double[]){0.3, 0.25, 0.3});
    c.renormalize = 1;
    route_ok(p, s, NULL, NULL, NULL, &c, 0, 1);
    expect_rows(p, 3, (int32_t[]){0, 0, 0}, (int32_t[]){1, 2, 4}, (double[]){0.3 / 0.85, 0.25 / 0.85, 0.3 / 0.85});
    /* the choice (rank) index of each row */
    ck_assert_int_eq(p->choice[0], 0);
    ck_assert_int_eq(p->choice[1], 2);
    ck_assert_int_eq(p->choice[2], 1);
    moe_plan_free(p);
}
END_TEST

START_TEST(bias_changes_selection_not_weights)
{
    const double s[3] = {0.5, 0.3, 0.2}, bias[3] = {0, 0, 0.4};
    moe_layer_config c;
    config(&c, MOE_ROUTER_TOPK, 3, 2);
    c.renormalize = 1;
    moe_plan *p = make_plan(&c, 1);
    route_ok(p, s, NULL, NULL, NULL, &c, 0, 1);
    expect_rows(p, 2, (int32_t[]){0, 0}, (int32_t[]){0, 1}, (double[]){0.5 / 0.8, 0.3 / 0.8});
    route_ok(p, s, NULL, bias, NULL, &c, 0, 1); /* s + bias = (0.5, 0.3, 0.6) */
    expect_rows(p, 2, (int32_t[]){0, 0}, (int32_t[]){0, 2}, (double[]){0.5 / 0.7, 0.2 / 0.7});
    c.renormalize = 0;
    route_ok(p, s, NULL, bias, NULL, &c, 0, 1);
    expect_rows(p, 2, (int32_t[]){0, 0}, (int32_t[]){0, 2}, (double[]){0.5, 0.2});
    moe_plan_free(p);
}
END_TEST

/* Random logits and their softmax for T tokens. */
static void random_scores(double *s, double *h, int64_t T, int64_t E, double scale, uint64_t seed)
{
    tu_randn(h, T * E, scale, seed);
    moe_ref_softmax_forward(s, h, T, E);
}

START_TEST(top2_sampling)
{
    enum { T = 64, E = 6 };
    double s[T * E], h[T * E];
    random_scores(s, h, T, E, 1.0, 7);
    moe_layer_config c;
    config(&c, MOE_ROUTER_TOPK, E, 2);
    c.second_policy = MOE_SECOND_SAMPLING;
    c.renormalize = 1;
    c.seed = 77;
    c.layer = 3;
    moe_plan *p = make_plan(&c, T), *q = make_plan(&c, T);
    route_ok(p, s, h, NULL, NULL, &c, 5, T);
    route_ok(q, s, h, NULL, NULL, &c, 5, T);
    ck_assert_mem_eq(p->choice_expert, q->choice_expert, T * 2 * sizeof(int32_t)); /* deterministic */
    int not_top2 = 0;
    for (int t = 0; t < T; t++) {
        const double *st = s + t * E, *ht = h + t * E;
        int first = 0;
        for (int e = 1; e < E; e++)
            if (st[e] > st[first])
                first = e;
        /* the rule: second = argmax over e != first of h + Gumbel(u(t, e)) */
        int second = -1;
        double best = 0;
        for (int e = 0; e < E; e++) {
            if (e == first)
                continue;
            double u = moe_rand_uniform(77, MOE_RNG_GUMBEL | (3 << 8), 5, (uint32_t)t, (uint32_t)e);
            double v = ht[e] - log(-log(u));
            if (second < 0 || v > best)
                second = e, best = v;
        }
        ck_assert_int_eq(p->choice_expert[t * 2], first);
        ck_assert_int_eq(p->choice_expert[t * 2 + 1], second);
        ck_assert_double_eq_tol(p->choice_weight[t * 2 + 1], st[second] / (st[first] + st[second]), 1e-15);
        int rank2 = 0; /* is the sampled second the deterministic runner-up? */
        for (int e = 0; e < E; e++)
            rank2 += e != first && st[e] > st[second];
        not_top2 += rank2 > 0;
    }
    ck_assert_msg(not_top2 > 0, "sampling never picked anything but the runner-up in %d tokens", T);
    route_ok(q, s, h, NULL, NULL, &c, 6, T); /* another step, other draws */
    ck_assert(memcmp(p->choice_expert, q->choice_expert, T * 2 * sizeof(int32_t)) != 0);
    moe_plan_free(p);
    moe_plan_free(q);
}
END_TEST

START_TEST(top2_random)
{
    enum { T = 200, E = 4 };
    double s[T * E], h[T * E];
    random_scores(s, h, T, E, 1.0, 8);
    moe_layer_config c;
    config(&c, MOE_ROUTER_TOPK, E, 2);
    c.second_policy = MOE_SECOND_RANDOM;
    c.renormalize = 1;
    c.seed = 5;
    c.layer = 1;
    moe_plan *p = make_plan(&c, T), *q = make_plan(&c, T);
    route_ok(p, s, NULL, NULL, NULL, &c, 9, T);
    route_ok(q, s, NULL, NULL, NULL, &c, 9, T);
    ck_assert_mem_eq(p->choice_expert, q->choice_expert, T * 2 * sizeof(int32_t));
    int64_t kept2 = 0, skipped2 = 0, sel[E] = {0};
    for (int t = 0; t < T; t++) {
        int a = 0, b = -1;
        for (int e = 1; e < E; e++)
            if (s[t * E + e] > s[t * E + a])
                a = e;
        for (int e = 0; e < E; e++)
            if (e != a && (b < 0 || s[t * E + e] > s[t * E + b]))
                b = e;
        double S = s[t * E + a] + s[t * E + b], w2 = s[t * E + b] / S;
        double u = moe_rand_uniform(5, MOE_RNG_RANDOM2 | (1 << 8), 9, (uint32_t)t, 0);
        ck_assert_int_eq(p->choice_expert[t * 2], a);
        /* the skip leaves the first weight at s1/(s1+s2) */
        ck_assert_double_eq_tol(p->choice_weight[t * 2], s[t * E + a] / S, 1e-15);
        sel[a]++;
        if (2 * w2 > u) {
            ck_assert_int_eq(p->choice_expert[t * 2 + 1], b);
            ck_assert_double_eq_tol(p->choice_weight[t * 2 + 1], w2, 1e-15);
            sel[b]++;
            kept2++;
        } else {
            ck_assert_int_eq(p->choice_expert[t * 2 + 1], -1);
            ck_assert_double_eq(p->choice_weight[t * 2 + 1], 0.0);
            ck_assert_int_eq(p->choice_kept[t * 2 + 1], 0);
            skipped2++;
        }
    }
    ck_assert(kept2 > 0 && skipped2 > 0);
    ck_assert_int_eq(p->n, T + kept2);
    ck_assert_int_eq(p->dropped, 0); /* a skip is not a drop */
    for (int e = 0; e < E; e++)
        ck_assert_int_eq(p->selected[e], sel[e]);
    moe_plan_free(p);
    moe_plan_free(q);
}
END_TEST

START_TEST(expert_choice)
{
    /* C = ceil(1·4/2) = 2. e0 takes t0, t2 (0.9 each); e1 takes t1 (0.8) then the tie at
     * 0.5 between t0 and t3 goes to the lower token t0. */
    const double s[8] = {0.9, 0.5, 0.2, 0.8, 0.9, 0.1, 0.5, 0.5};
    moe_layer_config c;
    config(&c, MOE_ROUTER_EXPERT_CHOICE, 2, 1);
    c.capacity_factor = 1.0;
    moe_plan *p = make_plan(&c, 4);
    route_ok(p, s, NULL, NULL, NULL, &c, 0, 4);
    ck_assert_int_eq(p->k, 2);
    ck_assert_int_eq(p->capacity, 2);
    expect_rows(p, 4, (int32_t[]){0, 2, 0, 1}, (int32_t[]){0, 0, 1, 1}, (double[]){0.9, 0.9, 0.5, 0.8});
    for (int e = 0; e < 2; e++) {
        ck_assert_int_eq(p->selected[e], 2);
        ck_assert_int_eq(p->count[e], 2);
    }
    ck_assert_int_eq(p->dropped, 0);
    moe_plan_free(p);
}
END_TEST

START_TEST(hash)
{
    /* splitmix64 finaliser: mix(1) = 0x5692161d100b05e5, mix(42) = 0xa759ea27d4727622 */
    ck_assert_uint_eq(moe_hash_token(0), 0);
    ck_assert_uint_eq(moe_hash_token(1), 0x5692161d100b05e5ull);
    ck_assert_uint_eq(moe_hash_token(42), 0xa759ea27d4727622ull);
    moe_layer_config c;
    config(&c, MOE_ROUTER_HASH, 5, 1);
    const int32_t ids[6] = {0, 1, 2, 3, 42, 1000}; /* -> experts 0 4 0 1 2 1 */
    moe_plan *p = make_plan(&c, 6);
    route_ok(p, NULL, NULL, NULL, ids, &c, 0, 6);
    expect_rows(p, 6, (int32_t[]){0, 2, 3, 5, 4, 1}, (int32_t[]){0, 0, 1, 1, 2, 4}, (double[]){1, 1, 1, 1, 1, 1});
    route_ok(p, NULL, NULL, NULL, NULL, &c, 0, 4); /* no ids: the position is the id */
    expect_rows(p, 4, (int32_t[]){0, 2, 3, 1}, (int32_t[]){0, 0, 1, 4}, NULL);
    moe_plan_free(p);
}
END_TEST

START_TEST(sinkhorn)
{
    /* Both tokens prefer e0, t0 strongly (h = 2 vs 0), t1 weakly (1 vs 0). Balancing
     * sends t1 to e1; its weight is still its score s. */
    const double h[4] = {2, 0, 1, 0};
    double s[4];
    moe_ref_softmax_forward(s, h, 2, 2);
    moe_layer_config c;
    config(&c, MOE_ROUTER_SINKHORN, 2, 1);
    moe_plan *p = make_plan(&c, 2);
    route_ok(p, s, h, NULL, NULL, &c, 0, 2);
    expect_rows(p, 2, (int32_t[]){0, 1}, (int32_t[]){0, 1}, (double[]){s[0], s[3]});
    /* top-1 by score alone would send both to e0 */
    config(&c, MOE_ROUTER_TOPK, 2, 1);
    route_ok(p, s, h, NULL, NULL, &c, 0, 2);
    expect_rows(p, 2, (int32_t[]){0, 1}, (int32_t[]){0, 0}, NULL);
    moe_plan_free(p);
}
END_TEST

START_TEST(bad_plans)
{
    double s[8 * 4], h[8 * 4];
    random_scores(s, h, 8, 4, 1.0, 3);
    moe_layer_config c;
    config(&c, MOE_ROUTER_TOPK, 4, 2);
    moe_plan *p;
    ck_assert_int_eq(moe_plan_create(15, 8, 4, 2, &p), MOE_OK); /* one assignment short */
    ck_assert_int_eq(moe_ref_route(p, s, h, NULL, NULL, &c, 0, 8), MOE_ERR_ARG);
    ck_assert_ptr_nonnull(strstr(moe_last_error(), "assignments"));
    moe_plan_free(p);
    ck_assert_int_eq(moe_plan_create(16, 4, 4, 2, &p), MOE_OK); /* choice arrays for T = 4 */
    ck_assert_int_eq(moe_ref_route(p, s, h, NULL, NULL, &c, 0, 8), MOE_ERR_ARG);
    ck_assert_ptr_nonnull(strstr(moe_last_error(), "choice arrays"));
    moe_plan_free(p);
    ck_assert_int_eq(moe_plan_create(16, 8, 3, 2, &p), MOE_OK); /* wrong E */
    ck_assert_int_eq(moe_ref_route(p, s, h, NULL, NULL, &c, 0, 8), MOE_ERR_ARG);
    ck_assert_ptr_nonnull(strstr(moe_last_error(), "n_experts"));
    moe_plan_free(p);
    /* with capacity 2 the plan needs only E·C = 8 */
    c.capacity_factor = 0.5;
    ck_assert_int_eq(moe_plan_create(8, 8, 4, 2, &p), MOE_OK);
    ck_assert_int_eq(moe_ref_route(p, s, h, NULL, NULL, &c, 0, 8), MOE_OK);
    ck_assert_int_eq(moe_plan_check(p), MOE_OK);
    moe_plan_free(p);
    /* expert choice: E·C = 4·2 */
    config(&c, MOE_ROUTER_EXPERT_CHOICE, 4, 1);
    c.capacity_factor = 1.0;
    ck_assert_int_eq(moe_plan_create(7, 8, 4, 2, &p), MOE_OK);
    ck_assert_int_eq(moe_ref_route(p, s, h, NULL, NULL, &c, 0, 8), MOE_ERR_ARG);
    moe_plan_free(p);
    /* sampling and sinkhorn need h; T must be positive */
    config(&c, MOE_ROUTER_TOPK, 4, 2);
    c.second_policy = MOE_SECOND_SAMPLING;
    ck_assert_int_eq(moe_plan_create(16, 8, 4, 2, &p), MOE_OK);
    ck_assert_int_eq(moe_ref_route(p, s, NULL, NULL, NULL, &c, 0, 8), MOE_ERR_ARG);
    c.router = MOE_ROUTER_SINKHORN;
    c.second_policy = MOE_SECOND_ALL;
    ck_assert_int_eq(moe_ref_route(p, s, NULL, NULL, NULL, &c, 0, 8), MOE_ERR_ARG);
    ck_assert_int_eq(moe_ref_route(p, s, h, NULL, NULL, &c, 0, 0), MOE_ERR_ARG);
    moe_plan_free(p);
}
END_TEST

/* ---- invariants on random inputs ------------------------------------------- */

static int64_t check_invariants(const moe_plan *p, const moe_layer_config *c, int64_t T)
{
    const int64_t E = c->n_experts, C = moe_capacity(c, T);
    ck_assert_msg(moe_plan_check(p) == MOE_OK, "%s", moe_last_error());
    ck_assert_int_eq(p->T, T);
    ck_assert_int_eq(p->capacity, C);
    int64_t sum = 0;
    for (int64_t e = 0; e < E; e++) {
        ck_assert(C == 0 || p->count[e] <= C);
        ck_assert(p->count[e] <= p->selected[e]);
        sum += p->count[e];
    }
    ck_assert_int_eq(sum, p->n);
    for (int64_t i = 0; i < p->n; i++) {
        ck_assert(p->token[i] >= 0 && p->token[i] < T && p->expert[i] >= 0 && p->expert[i] < E);
        ck_assert_int_eq(p->src[i], (int64_t)p->token[i] * E + p->expert[i]);
    }
    if (c->router == MOE_ROUTER_EXPERT_CHOICE) {
        ck_assert_int_eq(p->n, E * C);
        ck_assert_int_eq(p->dropped, 0);
        return 0;
    }
    const int64_t k = p->k;
    int64_t kept = 0, dropped = 0, sel[64] = {0};
    for (int64_t t = 0; t < T; t++)
        for (int64_t j = 0; j < k; j++) {
            int32_t e = p->choice_expert[t * k + j];
            if (e < 0) {
                ck_assert(c->second_policy == MOE_SECOND_RANDOM && j == 1 && !p->choice_kept[t * k + j]);
                continue;
            }
            ck_assert(e < E);
            for (int64_t q = 0; q < j; q++) /* distinct experts per token */
                ck_assert_int_ne(p->choice_expert[t * k + q], e);
            sel[e]++;
            kept += p->choice_kept[t * k + j];
            dropped += !p->choice_kept[t * k + j];
        }
    for (int64_t e = 0; e < E; e++)
        ck_assert_int_eq(sel[e], p->selected[e]);
    ck_assert_int_eq(kept, p->n);
    ck_assert_int_eq(dropped, p->dropped);
    if (C == 0)
        ck_assert_int_eq(dropped, 0);
    /* every kept choice is one row, with its weight */
    for (int64_t i = 0; i < p->n; i++) {
        int64_t ch = p->choice[i];
        ck_assert(ch >= 0 && ch < T * k);
        ck_assert_int_eq(ch / k, p->token[i]);
        ck_assert_int_eq(p->choice_expert[ch], p->expert[i]);
        ck_assert(p->choice_kept[ch]);
        ck_assert_double_eq(p->choice_weight[ch], p->weight[i]);
    }
    /* a drop only happens to a full expert, and the policy's order decides who stays */
    for (int64_t a = 0; a < T * k; a++) {
        int32_t e = p->choice_expert[a];
        if (e < 0 || p->choice_kept[a])
            continue;
        ck_assert_int_eq(p->count[e], C);
        for (int64_t b = 0; b < T * k; b++) {
            if (p->choice_expert[b] != e || !p->choice_kept[b])
                continue;
            int64_t ja = a % k, ta = a / k, jb = b % k, tb = b / k;
            if (c->drop_policy == MOE_DROP_POSITION)
                ck_assert(jb < ja || (jb == ja && tb < ta));
            else
                ck_assert(p->choice_weight[b] >= p->choice_weight[a]);
        }
    }
    return dropped;
}

START_TEST(invariants_random)
{
    const int64_t Es[] = {1, 2, 3, 5, 8}, Ts[] = {1, 7, 13, 37};
    const double cfs[] = {0, 0.5, 1.0, 1.25};
    const moe_router_kind routers[] = {MOE_ROUTER_TOPK, MOE_ROUTER_NOISY_TOPK, MOE_ROUTER_SINKHORN,
                                       MOE_ROUTER_EXPERT_CHOICE, MOE_ROUTER_HASH};
    int64_t plans = 0, drops = 0;
    uint64_t seed = 100;
    for (size_t ie = 0; ie < sizeof Es / sizeof *Es; ie++)
        for (size_t it = 0; it < sizeof Ts / sizeof *Ts; it++)
            for (size_t ir = 0; ir < sizeof routers / sizeof *routers; ir++)
                for (int64_t k = 1; k <= Es[ie]; k = k < 3 ? k + 1 : (k == Es[ie] ? k + 1 : Es[ie])) {
                    const int64_t E = Es[ie], T = Ts[it];
                    moe_router_kind r = routers[ir];
                    if ((r == MOE_ROUTER_HASH || r == MOE_ROUTER_EXPERT_CHOICE) && k > 1)
                        continue;
                    double *s = tu_alloc(T * E), *h = tu_alloc(T * E), *bias = tu_alloc(E);
                    random_scores(s, h, T, E, 1.5, seed++);
                    tu_randn(bias, E, 0.2, seed++);
                    for (size_t ic = 0; ic < sizeof cfs / sizeof *cfs; ic++)
                        for (int pol = 0; pol < 3; pol++)
                            for (int drop = 0; drop < 2; drop++) {
                                moe_layer_config c;
                                config(&c, r, E, k);
                                c.capacity_factor = cfs[ic];
                                c.drop_policy = drop;
                                c.renormalize = (pol + drop) % 2;
                                c.second_policy = pol;
                                if (pol && (k != 2 || r == MOE_ROUTER_SINKHORN || r == MOE_ROUTER_HASH ||
                                            r == MOE_ROUTER_EXPERT_CHOICE))
                                    continue;
                                if (r == MOE_ROUTER_HASH && cfs[ic] > 0)
                                    continue;
                                if (r == MOE_ROUTER_EXPERT_CHOICE && cfs[ic] <= 0)
                                    continue;
                                ck_assert_msg(moe_layer_config_validate(&c, T) == MOE_OK, "%s", moe_last_error());
                                moe_plan *p = make_plan(&c, T);
                                const double *b = r == MOE_ROUTER_TOPK && drop ? bias : NULL;
                                route_ok(p, s, h, b, NULL, &c, seed, T);
                                drops += check_invariants(p, &c, T);
                                plans++;
                                moe_plan_free(p);
                            }
                    free(s), free(h), free(bias);
                }
    printf("select: %lld random plans checked, %lld drops among them\n", (long long)plans, (long long)drops);
    ck_assert(plans > 500 && drops > 0);
}
END_TEST

START_TEST(overflow_one_expert)
{
    /* every token prefers e0: top-1 keeps C of them there and drops the rest */
    enum { T = 37, E = 4 };
    double s[T * E];
    for (int t = 0; t < T; t++)
        for (int e = 0; e < E; e++)
            s[t * E + e] = e == 0 ? 0.7 : 0.1;
    moe_layer_config c;
    config(&c, MOE_ROUTER_TOPK, E, 1);
    c.capacity_factor = 1.0;
    moe_plan *p = make_plan(&c, T);
    route_ok(p, s, NULL, NULL, NULL, &c, 0, T);
    ck_assert_int_eq(p->capacity, 10); /* ceil(37/4) */
    ck_assert_int_eq(p->count[0], 10);
    ck_assert_int_eq(p->n, 10);
    ck_assert_int_eq(p->dropped, 27);
    for (int i = 0; i < 10; i++) /* position policy: the first ten tokens */
        ck_assert_int_eq(p->token[i], i);
    check_invariants(p, &c, T);
    /* dropless keeps all of them */
    c.capacity_factor = 0;
    route_ok(p, s, NULL, NULL, NULL, &c, 0, T);
    ck_assert_int_eq(p->count[0], T);
    ck_assert_int_eq(p->dropped, 0);
    moe_plan_free(p);
}
END_TEST

START_TEST(threads_same_plan)
{
    /* Large enough for the parallel paths: 1 thread and 2 threads give the same plan. */
    enum { T = 4096, E = 8 };
    double *s = tu_alloc(T * E), *h = tu_alloc(T * E);
    random_scores(s, h, T, E, 2.0, 900);
    const moe_router_kind routers[3] = {MOE_ROUTER_TOPK, MOE_ROUTER_SINKHORN, MOE_ROUTER_EXPERT_CHOICE};
    for (int r = 0; r < 3; r++) {
        moe_layer_config c;
        config(&c, routers[r], E, r == 2 ? 1 : 2);
        c.capacity_factor = 1.0;
        c.renormalize = 1;
        c.second_policy = r == 0 ? MOE_SECOND_RANDOM : MOE_SECOND_ALL;
        moe_plan *p1 = make_plan(&c, T), *p2 = make_plan(&c, T);
#ifdef _OPENMP
        int nt = omp_get_max_threads();
        omp_set_num_threads(1);
#endif
        route_ok(p1, s, h, NULL, NULL, &c, 1, T);
#ifdef _OPENMP
        omp_set_num_threads(2);
#endif
        route_ok(p2, s, h, NULL, NULL, &c, 1, T);
#ifdef _OPENMP
        omp_set_num_threads(nt);
#endif
        check_invariants(p1, &c, T);
        ck_assert_int_eq(p1->n, p2->n);
        ck_assert_mem_eq(p1->token, p2->token, (size_t)p1->n * sizeof *p1->token);
        ck_assert_mem_eq(p1->expert, p2->expert, (size_t)p1->n * sizeof *p1->expert);
        ck_assert_mem_eq(p1->weight, p2->weight, (size_t)p1->n * sizeof *p1->weight);
        moe_plan_free(p1);
        moe_plan_free(p2);
    }
    free(s);
    free(h);
}
END_TEST

/* ---- route backward by finite differences ----------------------------------- */

typedef struct {
    moe_layer_config c;
    int64_t T, E;
    double *s, *h, *bias, *dw, *dch;
    moe_plan *p0, *p1;
} fd_ctx;

static int same_plan(const moe_plan *a, const moe_plan *b, int token_choice)
{
    if (a->n != b->n || memcmp(a->token, b->token, (size_t)a->n * sizeof *a->token) ||
        memcmp(a->expert, b->expert, (size_t)a->n * sizeof *a->expert))
        return 0;
    if (!token_choice)
        return 1;
    size_t tk = (size_t)(a->T * a->k);
    return !memcmp(a->choice_expert, b->choice_expert, tk * sizeof *a->choice_expert) &&
           !memcmp(a->choice_kept, b->choice_kept, tk);
}

static double loss_route(void *vc, int *ok)
{
    fd_ctx *x = vc;
    int tc = x->c.router != MOE_ROUTER_EXPERT_CHOICE;
    ck_assert_int_eq(moe_ref_route(x->p1, x->s, x->h, x->bias, NULL, &x->c, 3, x->T), MOE_OK);
    if (!same_plan(x->p0, x->p1, tc))
        *ok = 0;
    double l = 0;
    for (int64_t i = 0; i < x->p1->n; i++)
        l += x->dw[i] * x->p1->weight[i];
    if (tc)
        for (int64_t i = 0; i < x->T * x->p1->k; i++)
            l += x->dch[i] * x->p1->choice_weight[i];
    return l;
}

/* FD check of moe_ref_route_backward on random scores, or on s_in / bias_in when given.
 * Returns how many RANDOM second choices the unperturbed plan skipped. */
static int64_t fd_route_case_with(const char *name, moe_layer_config c, int64_t T, int use_bias,
                                  const double *s_in, const double *bias_in, tu_fd_stats *st)
{
    fd_ctx x = {.c = c, .T = T, .E = c.n_experts};
    int64_t n = T * x.E;
    x.s = tu_alloc(n), x.h = tu_alloc(n), x.bias = use_bias ? tu_alloc(x.E) : NULL;
    random_scores(x.s, x.h, T, x.E, 1.0, 500 + (uint64_t)T);
    if (use_bias)
        tu_randn(x.bias, x.E, 0.1, 600);
    if (s_in)
        memcpy(x.s, s_in, (size_t)n * sizeof *x.s);
    if (bias_in)
        memcpy(x.bias, bias_in, (size_t)x.E * sizeof *x.bias);
    x.p0 = make_plan(&c, T);
    x.p1 = make_plan(&c, T);
    route_ok(x.p0, x.s, x.h, x.bias, NULL, &c, 3, T);
    x.dw = tu_alloc(x.p0->cap_n);
    x.dch = tu_alloc(T * x.p0->k);
    tu_randn(x.dw, x.p0->n, 1.0, 700);
    if (c.router != MOE_ROUTER_EXPERT_CHOICE)
        tu_randn(x.dch, T * x.p0->k, 1.0, 701);
    double *ds = tu_alloc(n);
    moe_ref_route_backward(ds, x.dw, c.router != MOE_ROUTER_EXPERT_CHOICE ? x.dch : NULL, x.p0, x.s, x.bias, &c);
    int64_t skipped0 = st->skipped;
    double err = tu_fd_check(x.s, n, ds, loss_route, &x, FD_H, st);
    printf("fd: select %-28s rel err %.2e, skipped %lld, dropped %lld\n", name, err,
           (long long)(st->skipped - skipped0), (long long)x.p0->dropped);
    ck_assert_msg(err <= FD_TOL, "route backward %s: rel err %g", name, err);
    double nrm = 0;
    for (int64_t i = 0; i < n; i++)
        nrm += fabs(ds[i]);
    ck_assert_msg(nrm > 0, "route backward %s: no gradient at all", name);
    int64_t skips = 0;
    if (c.router != MOE_ROUTER_EXPERT_CHOICE)
        for (int64_t i = 0; i < T * x.p0->k; i++)
            skips += x.p0->choice_expert[i] < 0;
    free(x.s), free(x.h), free(x.bias), free(x.dw), free(x.dch), free(ds);
    moe_plan_free(x.p0);
    moe_plan_free(x.p1);
    return skips;
}

static void fd_route_case(const char *name, moe_layer_config c, int64_t T, int use_bias, tu_fd_stats *st)
{
    fd_route_case_with(name, c, T, use_bias, NULL, NULL, st);
}

START_TEST(route_backward_fd)
{
    tu_fd_stats st = {0};
    moe_layer_config c;
    config(&c, MOE_ROUTER_TOPK, 6, 2);
    c.renormalize = 1;
    fd_route_case("top2 renorm", c, 9, 0, &st);
    c.capacity_factor = 0.5;
    fd_route_case("top2 renorm cap position", c, 9, 0, &st);
    c.drop_policy = MOE_DROP_PROBABILITY;
    fd_route_case("top2 renorm cap probability", c, 9, 1, &st);
    config(&c, MOE_ROUTER_TOPK, 5, 3);
    fd_route_case("top3 plain", c, 8, 0, &st);
    c.renormalize = 1;
    c.capacity_factor = 0.6;
    fd_route_case("top3 renorm cap", c, 8, 1, &st);
    config(&c, MOE_ROUTER_TOPK, 4, 2);
    c.renormalize = 1;
    c.second_policy = MOE_SECOND_RANDOM;
    fd_route_case("top2 random renorm bias", c, 12, 1, &st);
    ck_assert(fd_route_case_with("top2 random renorm", c, 12, 0, NULL, NULL, &st) > 0);
    {
        /* The bias reorders the runner-up: s + bias = (0.5, 0.1, 0.2) makes e2, not e1, the
         * second, so a skipped second must renormalise through s[e2]. A backward that forgot
         * the bias would put that gradient on e1. */
        enum { TB = 10 };
        double sb[TB * 3];
        tu_randn(sb, TB * 3, 0.01, 800);
        for (int t = 0; t < TB; t++)
            sb[t * 3] += 0.5, sb[t * 3 + 1] += 0.3, sb[t * 3 + 2] += 0.2;
        moe_layer_config cb = c;
        cb.n_experts = 3;
        ck_assert(fd_route_case_with("top2 random bias reorders", cb, TB, 1, sb, (double[]){0, -0.2, 0}, &st) > 0);
    }
    c.renormalize = 0;
    fd_route_case("top2 random", c, 12, 0, &st);
    c.renormalize = 1;
    c.second_policy = MOE_SECOND_SAMPLING;
    fd_route_case("top2 sampling renorm", c, 10, 0, &st);
    config(&c, MOE_ROUTER_NOISY_TOPK, 4, 1);
    fd_route_case("noisy top1", c, 7, 0, &st);
    config(&c, MOE_ROUTER_SINKHORN, 4, 2);
    c.renormalize = 1;
    fd_route_case("sinkhorn top2 renorm", c, 7, 0, &st);
    config(&c, MOE_ROUTER_EXPERT_CHOICE, 4, 1);
    c.capacity_factor = 1.0;
    fd_route_case("expert choice", c, 9, 0, &st);
    printf("fd: select route backward worst rel err %.2e, checked %lld, skipped %lld\n", st.worst,
           (long long)st.checked, (long long)st.skipped);
    fd_all = st;

    /* hash routing has no gradient into s */
    config(&c, MOE_ROUTER_HASH, 3, 1);
    moe_plan *p = make_plan(&c, 4);
    double ds[12] = {0}, dw[4] = {1, 1, 1, 1}, s[12];
    tu_randn(s, 12, 1.0, 1);
    route_ok(p, NULL, NULL, NULL, NULL, &c, 0, 4);
    moe_ref_route_backward(ds, dw, NULL, p, s, NULL, &c);
    for (int i = 0; i < 12; i++)
        ck_assert_double_eq(ds[i], 0.0);
    moe_plan_free(p);
}
END_TEST

static Suite *select_suite(void)
{
    Suite *s = suite_create("select");
    TCase *tc = tcase_create("hand-made");
    tcase_add_test(tc, top1_switch);
    tcase_add_test(tc, top1_capacity_policies);
    tcase_add_test(tc, top2_capacity_policies);
    tcase_add_test(tc, top2_all_and_topk_renorm);
    tcase_add_test(tc, bias_changes_selection_not_weights);
    tcase_add_test(tc, top2_sampling);
    tcase_add_test(tc, top2_random);
    tcase_add_test(tc, expert_choice);
    tcase_add_test(tc, hash);
    tcase_add_test(tc, sinkhorn);
    tcase_add_test(tc, bad_plans);
    suite_add_tcase(s, tc);
    tc = tcase_create("invariants");
    tcase_set_timeout(tc, 60);
    tcase_add_test(tc, invariants_random);
    tcase_add_test(tc, overflow_one_expert);
    tcase_add_test(tc, threads_same_plan);
    suite_add_tcase(s, tc);
    tc = tcase_create("gradients");
    tcase_add_test(tc, route_backward_fd);
    suite_add_tcase(s, tc);
    return s;
}

int main(void)
{
    /* No fork, so the FD totals gathered by the tests can be printed at the end. */
    SRunner *sr = srunner_create(select_suite());
    srunner_set_fork_status(sr, CK_NOFORK);
    srunner_run_all(sr, CK_NORMAL);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    printf("fd: select suite worst rel err %.2e, checked %lld, skipped %lld\n", fd_all.worst,
           (long long)fd_all.checked, (long long)fd_all.skipped);
    return failed ? EXIT_FAILURE : EXIT_SUCCESS;
}
