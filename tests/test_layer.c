/*
 * The composed reference MoE layer: finite-difference gradients of every input and
 * parameter over every router × activation × option, batch invariance, T < max_tokens,
 * bad ids and bad configs.
 *
 * FD loss: L = Σ dy·y + aux.total. A perturbed evaluation is skipped (and counted) when a
 * discrete decision differs from the unperturbed one: which (token, expert) pairs were
 * selected / kept / dropped, the ranking that Shazeer's load estimator thresholds on
 * (noisy_topk), GShard RANDOM's skipped second expert, or the sign of a ReLU input.
 */
#include "testutil.h"
#include "ref/ref.h"
#ifdef _OPENMP
#include <omp.h>
#endif

enum { T0 = 7, D = 4, F = 3, E = 4 };

static const moe_activation ACTS[] = {MOE_ACT_RELU, MOE_ACT_GELU, MOE_ACT_GELU_TANH, MOE_ACT_GEGLU, MOE_ACT_SWIGLU};
#define N_ACTS 5

/* The suite runs without fork (see main), so these add up over every test. */
static tu_fd_stats g_fd;
static int64_t g_configs;

static moe_layer_config base(moe_router_kind r, int64_t k, moe_activation act)
{
    moe_layer_config c;
    moe_layer_config_default(&c);
    c.d_model = D;
    c.d_ff = F;
    c.n_experts = E;
    c.top_k = k;
    c.router = r;
    c.act = act;
    c.seed = 77;
    c.layer = 3;
    if (r == MOE_ROUTER_EXPERT_CHOICE)
        c.capacity_factor = 2.0; /* C = ceil(2·7/4) = 4 */
    return c;
}

/* ---- snapshots of the discrete decisions ----------------------------------- */

#define MAX_SIGNS 2048

typedef struct {
    uint8_t state[T0 * E * 4];   /* per (t, e): 0 not selected, 1 kept, 2 dropped */
    int8_t rank[T0 * E * 4];     /* noisy_topk: position of e in h_t's descending order */
    int8_t second[T0 * 4 * 2];   /* RANDOM: the top 2 of s_t + bias, in order */
    uint8_t sign[MAX_SIGNS];     /* ReLU inputs > 0 */
    int64_t nsign;
} snap;

typedef struct {
    moe_ref_layer *l;
    int64_t T;
    uint64_t step;
    int training;
    const double *x;
    double *y;
    const double *dy;
    const int32_t *tok, *task;
    snap base, cur;
} fd_ctx;

static void order_desc(int8_t *rank, const double *v, int64_t n)
{
    /* rank[e] = number of entries ahead of e (ties: lower index first) */
    for (int64_t e = 0; e < n; e++) {
        int r = 0;
        for (int64_t q = 0; q < n; q++)
            if (v[q] > v[e] || (v[q] == v[e] && q < e))
                r++;
        rank[e] = (int8_t)r;
    }
}

static void add_signs(snap *s, const moe_ref_layer *l, const char *name, int64_t rows)
{
    const moe_view *v;
    const double *h = moe_ref_layer_saved(l, name, &v);
    if (!h)
        return;
    int64_t n = rows * v->shape[1];
    ck_assert(s->nsign + n <= MAX_SIGNS);
    for (int64_t i = 0; i < n; i++)
        s->sign[s->nsign++] = h[i] > 0;
}

static void take(snap *s, const fd_ctx *c)
{
    const moe_ref_layer *l = c->l;
    const moe_layer_config *cf = moe_ref_layer_config(l);
    const moe_plan *p = moe_ref_layer_plan(l);
    const int64_t T = c->T;
    ck_assert_ptr_nonnull(p);
    memset(s, 0, sizeof *s);
    int token_choice = cf->router != MOE_ROUTER_EXPERT_CHOICE && cf->router != MOE_ROUTER_HASH;
    if (token_choice) {
        for (int64_t i = 0; i < T * p->k; i++)
            if (p->choice_expert[i] >= 0)
                s->state[(i / p->k) * E + p->choice_expert[i]] = p->choice_kept[i] ? 1 : 2;
    } else {
        for (int64_t i = 0; i < p->n; i++)
            s->state[p->token[i] * E + p->expert[i]] = 1;
    }
    if (cf->router == MOE_ROUTER_NOISY_TOPK) {
        const double *h = moe_ref_layer_saved(l, "router.h", NULL);
        for (int64_t t = 0; t < T; t++)
            order_desc(s->rank + t * E, h + t * E, E);
    }
    if (cf->second_policy == MOE_SECOND_RANDOM) {
        const double *sc = moe_ref_layer_saved(l, "router.s", NULL);
        const moe_arena *P = moe_ref_layer_params(l);
        const double *bias = moe_arena_ptr(P, moe_arena_find(P, "router.bias")); /* NULL without */
        for (int64_t t = 0; t < T; t++) {
            int8_t r[E];
            double v[E];
            for (int e = 0; e < E; e++)
                v[e] = sc[t * E + e] + (bias ? bias[e] : 0);
            order_desc(r, v, E);
            for (int e = 0; e < E; e++)
                if (r[e] < 2)
                    s->second[t * 2 + r[e]] = (int8_t)e;
        }
    }
    if (cf->act == MOE_ACT_RELU) {
        add_signs(s, l, "experts.h1", p->n);
        add_signs(s, l, "shared.h1", T);
        add_signs(s, l, "residual.h1", T);
    }
}

static int same(const snap *a, const snap *b)
{
    return a->nsign == b->nsign && memcmp(a, b, offsetof(snap, sign) + (size_t)a->nsign) == 0;
}

static double objective(fd_ctx *c)
{
    moe_status st = moe_ref_layer_forward(c->l, c->y, c->x, c->tok, c->task, c->T, MOE_KEY_STEP(c->step), c->training);
    ck_assert_msg(st == MOE_OK, "forward: %s", moe_last_error());
    double L = moe_ref_layer_aux(c->l).total;
    for (int64_t i = 0; i < c->T * D; i++)
        L += c->dy[i] * c->y[i];
    return L;
}

static double fd_loss(void *vc, int *ok)
{
    fd_ctx *c = vc;
    double L = objective(c);
    take(&c->cur, c);
    if (!same(&c->cur, &c->base))
        *ok = 0;
    return L;
}

/* The layer's FD check for one configuration with step h; returns its worst error. */
static double check_config_h(const char *label, const moe_layer_config *cfg, int training, double bias_scale, double h,
                             double tol, tu_fd_stats *fds)
{
    const int64_t T = T0;
    moe_ref_layer *l;
    moe_status st = moe_ref_layer_create(cfg, T, &l);
    ck_assert_msg(st == MOE_OK, "%s: create: %s", label, moe_last_error());
    moe_ref_layer_init(l, 1.0);
    if (cfg->use_bias) {
        const moe_view *v;
        double *b = moe_ref_layer_param(l, "router.bias", &v);
        ck_assert_ptr_nonnull(b);
        tu_randn(b, v->numel, bias_scale, 4242);
    }
    double x[T0 * D], y[T0 * D], dy[T0 * D], dx[T0 * D];
    int32_t tok[T0], task[T0];
    tu_randn(x, T * D, 1.0, 1000 + (uint64_t)g_configs);
    tu_randn(dy, T * D, 1.0, 2000 + (uint64_t)g_configs);
    for (int64_t t = 0; t < T; t++) {
        tok[t] = (int32_t)((t * 37 + 11) % 101);
        task[t] = (int32_t)(t % 3);
    }
    fd_ctx c = {.l = l, .T = T, .step = 5, .training = training, .x = x, .y = y, .dy = dy, .tok = tok,
                .task = cfg->n_tasks >= 3 ? task : NULL};
    objective(&c);
    take(&c.base, &c);
    moe_ref_layer_zero_grad(l);
    tu_nan_fill(dx, T * D);
    ck_assert_int_eq(moe_ref_layer_backward(l, dx, dy), MOE_OK);

    double worst = 0;
    char what[160];
    double err = tu_fd_check(x, T * D, dx, fd_loss, &c, h, fds);
    snprintf(what, sizeof what, "%s: dx", label);
    ck_assert_msg(err <= tol, "%s: fd rel err %.3e", what, err);
    worst = err;
    const moe_arena *P = moe_ref_layer_params(l);
    for (int i = 0; i < P->n; i++) {
        const char *name = P->views[i].name;
        const moe_view *v;
        double *p = moe_ref_layer_param(l, name, &v);
        double *g = moe_ref_layer_grad(l, name, NULL);
        ck_assert_ptr_nonnull(g);
        err = tu_fd_check(p, v->numel, g, fd_loss, &c, h, fds);
        ck_assert_msg(err <= tol, "%s: d%s fd rel err %.3e", label, name, err);
        if (err > worst)
            worst = err;
        if (strcmp(name, "router.bias") == 0) /* selection only: never trained by gradient */
            for (int64_t j = 0; j < v->numel; j++)
                ck_assert_double_eq(g[j], 0.0);
    }
    g_configs++;
    moe_ref_layer_free(l);
    return worst;
}

static double check_config(const char *label, const moe_layer_config *cfg, int training, double bias_scale)
{
    return check_config_h(label, cfg, training, bias_scale, 1e-5, 1e-6, &g_fd);
}

/* ---- the FD sweep ------------------------------------------------------------- */

typedef struct {
    const char *name;
    moe_router_kind r;
    int64_t k;
} router_case;

static const router_case ROUTERS[] = {
    {"topk1", MOE_ROUTER_TOPK, 1},          {"topk2", MOE_ROUTER_TOPK, 2},
    {"topkE", MOE_ROUTER_TOPK, E},          {"noisy_topk", MOE_ROUTER_NOISY_TOPK, 2},
    {"expert_choice", MOE_ROUTER_EXPERT_CHOICE, 1}, {"hash", MOE_ROUTER_HASH, 1},
    {"sinkhorn", MOE_ROUTER_SINKHORN, 2},
};
#define N_ROUTERS 7

static int has_router(const router_case *rc)
{
    return rc->r != MOE_ROUTER_HASH;
}

static int token_choice(const router_case *rc)
{
    return rc->r == MOE_ROUTER_TOPK || rc->r == MOE_ROUTER_NOISY_TOPK || rc->r == MOE_ROUTER_SINKHORN;
}

static int n_act; /* cycles the activation over option cases */

static moe_activation next_act(void)
{
    return ACTS[n_act++ % N_ACTS];
}

static void run(const char *group, const router_case *rc, moe_layer_config *c, int training, double bias_scale)
{
    char label[128];
    snprintf(label, sizeof label, "%s/%s/%s", group, rc->name, moe_activation_name(c->act));
    check_config(label, c, training, bias_scale);
}

START_TEST(test_fd_router_x_activation)
{
    for (int r = 0; r < N_ROUTERS; r++)
        for (int a = 0; a < N_ACTS; a++) {
            moe_layer_config c = base(ROUTERS[r].r, ROUTERS[r].k, ACTS[a]);
            run("plain", &ROUTERS[r], &c, 1, 0);
        }
}
END_TEST

START_TEST(test_fd_scores_and_renorm)
{
    for (int r = 0; r < N_ROUTERS; r++) {
        const router_case *rc = &ROUTERS[r];
        if (!has_router(rc))
            continue;
        moe_layer_config c = base(rc->r, rc->k, next_act());
        c.score = MOE_SCORE_SIGMOID;
        run("sigmoid", rc, &c, 1, 0);
        if (token_choice(rc)) {
            c = base(rc->r, rc->k, next_act());
            c.renormalize = 0;
            run("no_renorm", rc, &c, 1, 0);
            c.score = MOE_SCORE_SIGMOID;
            run("no_renorm_sigmoid", rc, &c, 1, 0);
        }
    }
}
END_TEST

START_TEST(test_fd_capacity)
{
    for (int r = 0; r < N_ROUTERS; r++) {
        const router_case *rc = &ROUTERS[r];
        if (!token_choice(rc))
            continue;
        for (int pol = 0; pol < 2; pol++) {
            moe_layer_config c = base(rc->r, rc->k, next_act());
            c.capacity_factor = 1.0; /* k = 2: C = ceil(7·2/4) = 4 of 14 choices, so some drop */
            c.drop_policy = pol ? MOE_DROP_PROBABILITY : MOE_DROP_POSITION;
            run(pol ? "capacity_probability" : "capacity_position", rc, &c, 1, 0);
        }
        moe_layer_config c = base(rc->r, rc->k, next_act());
        c.capacity_factor = 0.25; /* ceil(0.25·7·k/4) = 1 or 2, raised to 3 */
        c.min_capacity = 3;
        run("min_capacity", rc, &c, 1, 0);
    }
    moe_layer_config c = base(MOE_ROUTER_EXPERT_CHOICE, 1, next_act());
    c.capacity_factor = 0.5; /* C = 1, raised to 3 */
    c.min_capacity = 3;
    run("min_capacity", &ROUTERS[4], &c, 1, 0);
    c = base(MOE_ROUTER_EXPERT_CHOICE, 1, next_act());
    c.capacity_factor = 1.0; /* C = 2: some tokens go nowhere */
    run("capacity", &ROUTERS[4], &c, 1, 0);
}
END_TEST

START_TEST(test_fd_jitter_noise_policies_bias)
{
    for (int r = 0; r < N_ROUTERS; r++) {
        const router_case *rc = &ROUTERS[r];
        if (!has_router(rc))
            continue;
        moe_layer_config c = base(rc->r, rc->k, next_act());
        c.jitter_eps = 0.1;
        run("jitter", rc, &c, 1, 0);
    }
    /* noisy_topk outside training: h = z, but the load estimator still sees the noise scale */
    moe_layer_config c = base(MOE_ROUTER_NOISY_TOPK, 2, next_act());
    c.load_coef = 0.3;
    run("eval", &ROUTERS[3], &c, 0, 0);
    /* GShard's second-expert policies */
    const router_case *top2[2] = {&ROUTERS[1], &ROUTERS[3]};
    for (int i = 0; i < 2; i++)
        for (int pol = 1; pol <= 2; pol++)
            for (int renorm = 0; renorm < 2; renorm++) {
                c = base(top2[i]->r, 2, next_act());
                c.second_policy = pol == 1 ? MOE_SECOND_SAMPLING : MOE_SECOND_RANDOM;
                c.renormalize = renorm;
                run(pol == 1 ? "second_sampling" : "second_random", top2[i], &c, 1, 0);
            }
    /* Aux-loss-free bias: changes selection only */
    const router_case *biased[3] = {&ROUTERS[0], &ROUTERS[1], &ROUTERS[3]};
    for (int i = 0; i < 3; i++) {
        c = base(biased[i]->r, biased[i]->k, next_act());
        c.use_bias = 1;
        run("bias", biased[i], &c, 1, 0.3);
        c.capacity_factor = 1.0;
        run("bias_capacity", biased[i], &c, 1, 0.3);
    }
    c = base(MOE_ROUTER_TOPK, 2, next_act());
    c.use_bias = 1;
    c.second_policy = MOE_SECOND_SAMPLING;
    run("bias_sampling", &ROUTERS[1], &c, 1, 0.3);
    c.second_policy = MOE_SECOND_RANDOM;
    run("bias_random", &ROUTERS[1], &c, 1, 0.3);
    c.renormalize = 0;
    run("bias_random_no_renorm", &ROUTERS[1], &c, 1, 0.3);
}
END_TEST

START_TEST(test_fd_aux_losses)
{
    for (int r = 0; r < N_ROUTERS; r++) {
        const router_case *rc = &ROUTERS[r];
        if (!has_router(rc))
            continue;
        for (int which = 0; which < 6; which++) { /* each coefficient alone, then all together */
            moe_layer_config c = base(rc->r, rc->k, next_act());
            c.n_tasks = 3;
            if (which == 0 || which == 5) c.lb_coef = 0.3;
            if (which == 1 || which == 5) c.importance_coef = 0.2;
            if (which == 2 || which == 5) c.load_coef = 0.25;
            if (which == 3 || which == 5) c.z_coef = 0.1;
            if (which == 4 || which == 5) c.mi_coef = 0.5;
            static const char *names[6] = {"aux_lb", "aux_importance", "aux_load", "aux_z", "aux_mi", "aux_all"};
            run(names[which], rc, &c, 1, 0);
        }
    }
    /* all of them on top of capacity, jitter and sigmoid scores */
    moe_layer_config c = base(MOE_ROUTER_NOISY_TOPK, 2, next_act());
    c.n_tasks = 3;
    c.lb_coef = 0.3; c.importance_coef = 0.2; c.load_coef = 0.25; c.z_coef = 0.1; c.mi_coef = 0.5;
    c.capacity_factor = 1.0;
    c.jitter_eps = 0.05;
    c.score = MOE_SCORE_SIGMOID;
    run("aux_all_capacity_jitter_sigmoid", &ROUTERS[3], &c, 1, 0);
}
END_TEST

START_TEST(test_fd_shared_residual)
{
    for (int r = 0; r < N_ROUTERS; r++) {
        const router_case *rc = &ROUTERS[r];
        for (int v = 0; v < 5; v++) {
            moe_layer_config c = base(rc->r, rc->k, next_act());
            const char *name = "";
            switch (v) {
            case 0: c.n_shared = 1; name = "shared"; break;
            case 1: c.n_shared = 2; c.d_ff_shared = 2; c.shared_gate = 1; name = "shared_gate"; break;
            case 2: c.residual = 1; name = "residual"; break;
            case 3: c.residual = 1; c.d_ff_dense = 5; c.n_shared = 1; name = "shared_residual"; break;
            case 4: c.residual = 1; c.n_shared = 2; c.shared_gate = 1; name = "shared_gate_residual"; break;
            }
            run(name, rc, &c, 1, 0);
        }
    }
}
END_TEST

/*
 * The skip detection itself: with a step of 3e-2 many decisions flip. Were one missed,
 * its coordinate's difference quotient would jump by O(1/h) and the error with it; what
 * is left must be the smooth O(h²) truncation error.
 */
START_TEST(test_fd_skip_detection)
{
    tu_fd_stats st = {0};
    for (int r = 0; r < N_ROUTERS; r++) {
        moe_layer_config c = base(ROUTERS[r].r, ROUTERS[r].k, MOE_ACT_RELU);
        if (ROUTERS[r].r == MOE_ROUTER_TOPK && ROUTERS[r].k == 2)
            c.capacity_factor = 1.0;
        if (ROUTERS[r].r == MOE_ROUTER_NOISY_TOPK)
            c.load_coef = 0.5;
        check_config_h(ROUTERS[r].name, &c, 1, 0, 3e-2, 2e-2, &st);
    }
    printf("fd: layer skip detection at h = 3e-2: worst rel err %.2e, checked %lld, skipped %lld\n", st.worst,
           (long long)st.checked, (long long)st.skipped);
    ck_assert_int_gt(st.skipped, 10);
}
END_TEST

START_TEST(test_fd_report)
{
    printf("fd: layer worst rel err %.2e over %lld configs, checked %lld, skipped %lld\n", g_fd.worst,
           (long long)g_configs, (long long)g_fd.checked, (long long)g_fd.skipped);
    ck_assert_int_gt(g_configs, 100);
    ck_assert(g_fd.worst <= 1e-6);
    /* skips are the exception: a sweep that skips most coordinates checks nothing */
    ck_assert(g_fd.skipped * 10 < g_fd.checked);
}
END_TEST

/* ---- forward by hand ----------------------------------------------------------- */

START_TEST(test_forward_by_hand)
{
    /* top-2, softmax, renormalised, shared expert with gate, residual: recompute y from
     * the parameters with the single-FFN op and compare. */
    moe_layer_config c = base(MOE_ROUTER_TOPK, 2, MOE_ACT_SWIGLU);
    c.n_shared = 1;
    c.shared_gate = 1;
    c.residual = 1;
    moe_ref_layer *l;
    ck_assert_int_eq(moe_ref_layer_create(&c, T0, &l), MOE_OK);
    moe_ref_layer_init(l, 1.0);
    double x[T0 * D], y[T0 * D];
    tu_randn(x, T0 * D, 1, 5);
    tu_nan_fill(y, T0 * D);
    ck_assert_int_eq(moe_ref_layer_forward(l, y, x, NULL, NULL, T0, MOE_KEY_STEP(0), 0), MOE_OK);
    const double *wr = moe_ref_layer_param(l, "router.weight", NULL), *w1 = moe_ref_layer_param(l, "experts.w1", NULL),
                 *w3 = moe_ref_layer_param(l, "experts.w3", NULL), *w2 = moe_ref_layer_param(l, "experts.w2", NULL),
                 *sw1 = moe_ref_layer_param(l, "shared.w1", NULL), *sw3 = moe_ref_layer_param(l, "shared.w3", NULL),
                 *sw2 = moe_ref_layer_param(l, "shared.w2", NULL), *sg = moe_ref_layer_param(l, "shared.gate", NULL),
                 *rw1 = moe_ref_layer_param(l, "residual.w1", NULL), *rw3 = moe_ref_layer_param(l, "residual.w3", NULL),
                 *rw2 = moe_ref_layer_param(l, "residual.w2", NULL), *rc = moe_ref_layer_param(l, "residual.coef", NULL);
    ck_assert(wr && w1 && w3 && w2 && sw1 && sw3 && sw2 && sg && rw1 && rw3 && rw2 && rc);
    ck_assert_ptr_null(moe_ref_layer_param(l, "router.noise", NULL));
    ck_assert_ptr_null(moe_ref_layer_param(l, "router.bias", NULL));
    for (int64_t t = 0; t < T0; t++) {
        const double *xt = x + t * D;
        double z[E], m = -INFINITY, sum = 0;
        for (int e = 0; e < E; e++) {
            z[e] = 0;
            for (int i = 0; i < D; i++)
                z[e] += xt[i] * wr[i * E + e];
            m = fmax(m, z[e]);
        }
        for (int e = 0; e < E; e++)
            sum += exp(z[e] - m);
        int b1 = 0, b2 = -1;
        for (int e = 1; e < E; e++)
            if (z[e] > z[b1])
                b1 = e;
        for (int e = 0; e < E; e++)
            if (e != b1 && (b2 < 0 || z[e] > z[b2]))
                b2 = e;
        double p1 = exp(z[b1] - m) / sum, p2 = exp(z[b2] - m) / sum;
        double moe[D] = {0}, o[D], h1[F + 1], h3[F + 1], a[F + 1];
        int es[2] = {b1, b2};
        double ws[2] = {p1 / (p1 + p2), p2 / (p1 + p2)};
        for (int j = 0; j < 2; j++) {
            int e = es[j];
            moe_ref_ffn_forward(o, h1, h3, a, xt, w1 + e * D * F, w3 + e * D * F, w2 + e * F * D, MOE_ACT_SWIGLU, 1, D, F);
            for (int i = 0; i < D; i++)
                moe[i] += ws[j] * o[i];
        }
        double gl = 0;
        for (int i = 0; i < D; i++)
            gl += xt[i] * sg[i];
        moe_ref_ffn_forward(o, h1, h3, a, xt, sw1, sw3, sw2, MOE_ACT_SWIGLU, 1, D, F);
        for (int i = 0; i < D; i++)
            moe[i] += o[i] / (1 + exp(-gl));
        double l0 = 0, l1 = 0;
        for (int i = 0; i < D; i++) {
            l0 += xt[i] * rc[2 * i];
            l1 += xt[i] * rc[2 * i + 1];
        }
        double c0 = 1 / (1 + exp(l1 - l0));
        moe_ref_ffn_forward(o, h1, h3, a, xt, rw1, rw3, rw2, MOE_ACT_SWIGLU, 1, D, F);
        for (int i = 0; i < D; i++)
            ck_assert_msg(fabs(y[t * D + i] - (c0 * moe[i] + (1 - c0) * o[i])) <= 1e-13, "y[%lld, %d] = %.17g vs %.17g",
                          (long long)t, i, y[t * D + i], c0 * moe[i] + (1 - c0) * o[i]);
    }
    moe_ref_layer_free(l);
}
END_TEST

START_TEST(test_aux_total_and_hash)
{
    moe_layer_config c = base(MOE_ROUTER_TOPK, 2, MOE_ACT_GELU);
    c.n_tasks = 3;
    c.lb_coef = 0.3; c.importance_coef = 0.2; c.load_coef = 0.25; c.z_coef = 0.1; c.mi_coef = 0.5;
    moe_ref_layer *l;
    ck_assert_int_eq(moe_ref_layer_create(&c, T0, &l), MOE_OK);
    moe_ref_layer_init(l, 1.0);
    double x[T0 * D], y[T0 * D];
    int32_t task[T0] = {0, 1, 2, 0, 1, 2, 2};
    tu_randn(x, T0 * D, 1, 6);
    ck_assert_int_eq(moe_ref_layer_forward(l, y, x, NULL, task, T0, MOE_KEY_STEP(0), 1), MOE_OK);
    moe_aux_losses a = moe_ref_layer_aux(l);
    ck_assert(a.lb > 0 && a.importance >= 0 && a.load >= 0 && a.z > 0 && isfinite(a.mi));
    ck_assert_double_eq_tol(a.total, 0.3 * a.lb + 0.2 * a.importance + 0.25 * a.load + 0.1 * a.z + 0.5 * a.mi, 1e-14);
    /* load = cv² of the selected counts without noisy gating */
    const moe_plan *p = moe_ref_layer_plan(l);
    double cnt[E];
    for (int e = 0; e < E; e++)
        cnt[e] = (double)p->selected[e];
    ck_assert_double_eq_tol(a.load, moe_ref_cv2_forward(cnt, E), 1e-15);
    moe_ref_layer_free(l);

    c = base(MOE_ROUTER_HASH, 1, MOE_ACT_RELU);
    ck_assert_int_eq(moe_ref_layer_create(&c, T0, &l), MOE_OK);
    ck_assert_ptr_null(moe_ref_layer_param(l, "router.weight", NULL));
    ck_assert_ptr_null(moe_ref_layer_plan(l));
    moe_ref_layer_init(l, 1.0);
    int32_t tok[T0] = {5, 9, 5, 1000, 0, 9, 77};
    ck_assert_int_eq(moe_ref_layer_forward(l, y, x, tok, NULL, T0, MOE_KEY_STEP(0), 1), MOE_OK);
    a = moe_ref_layer_aux(l);
    ck_assert(a.lb == 0 && a.importance == 0 && a.load == 0 && a.z == 0 && a.mi == 0 && a.total == 0);
    p = moe_ref_layer_plan(l);
    ck_assert_int_eq(p->n, T0);
    for (int64_t i = 0; i < p->n; i++)
        ck_assert_int_eq(p->expert[i], (int32_t)(moe_hash_token((uint32_t)tok[p->token[i]]) % E));
    /* weight 1: with equal rows of x, equal token ids give equal rows of y */
    for (int i = 0; i < D; i++)
        x[2 * D + i] = x[i];
    ck_assert_int_eq(moe_ref_layer_forward(l, y, x, tok, NULL, T0, MOE_KEY_STEP(0), 1), MOE_OK);
    ck_assert(memcmp(y + 0 * D, y + 2 * D, D * sizeof *y) == 0);
    for (int64_t i = 0; i < p->n; i++)
        ck_assert_double_eq(p->weight[i], 1.0);
    moe_ref_layer_free(l);
}
END_TEST

/* ---- batch invariance ----------------------------------------------------------- */

/*
 * Permuting the tokens (with their token and task ids) permutes y exactly: every
 * row's computation and its combine order (by expert) are independent of the batch.
 * Only for dropless token choice and hash routing, and outside training (jitter and
 * gate noise are keyed by position). Capacity is order-dependent by design (who is
 * dropped depends on position or on the rest of the batch), and expert choice and
 * Sinkhorn couple the tokens of a batch, so they are not part of this check.
 */
START_TEST(test_batch_invariance)
{
    static const int perm[T0] = {3, 6, 0, 5, 1, 4, 2};
    const router_case *rcs[4] = {&ROUTERS[0], &ROUTERS[1], &ROUTERS[3], &ROUTERS[5]};
    for (int i = 0; i < 4; i++) {
        moe_layer_config c = base(rcs[i]->r, rcs[i]->k, ACTS[i + 1]);
        c.n_shared = 1;
        c.shared_gate = 1;
        c.residual = 1;
        if (rcs[i]->r != MOE_ROUTER_HASH) {
            c.n_tasks = 3;
            c.lb_coef = 0.3; c.importance_coef = 0.2; c.load_coef = 0.25; c.z_coef = 0.1; c.mi_coef = 0.5;
        }
        moe_ref_layer *l;
        ck_assert_int_eq(moe_ref_layer_create(&c, T0, &l), MOE_OK);
        moe_ref_layer_init(l, 1.0);
        double x[T0 * D], xp[T0 * D], y[T0 * D], yp[T0 * D];
        int32_t tok[T0], tokp[T0], task[T0], taskp[T0];
        tu_randn(x, T0 * D, 1, 8);
        for (int t = 0; t < T0; t++) {
            tok[t] = t * 13 + 2;
            task[t] = t % 3;
        }
        for (int t = 0; t < T0; t++) {
            memcpy(xp + t * D, x + perm[t] * D, D * sizeof *x);
            tokp[t] = tok[perm[t]];
            taskp[t] = task[perm[t]];
        }
        ck_assert_int_eq(moe_ref_layer_forward(l, y, x, tok, task, T0, MOE_KEY_STEP(0), 0), MOE_OK);
        moe_aux_losses a = moe_ref_layer_aux(l);
        ck_assert_int_eq(moe_ref_layer_forward(l, yp, xp, tokp, taskp, T0, MOE_KEY_STEP(0), 0), MOE_OK);
        moe_aux_losses ap = moe_ref_layer_aux(l);
        for (int t = 0; t < T0; t++)
            ck_assert_msg(memcmp(yp + t * D, y + perm[t] * D, D * sizeof *y) == 0, "%s: row %d not permuted exactly",
                          rcs[i]->name, t);
        ck_assert_double_eq_tol(ap.total, a.total, 1e-12 * fmax(1, fabs(a.total)));
        moe_ref_layer_free(l);
    }
}
END_TEST

/* ---- T < max_tokens ------------------------------------------------------------- */

START_TEST(test_fewer_tokens)
{
    /* A layer made for 12 tokens run on T = 7, 12, 3, 7 gives what a layer made for
     * exactly T gives (same init), values and gradients; expert choice's capacity follows T. */
    const moe_router_kind rs[3] = {MOE_ROUTER_TOPK, MOE_ROUTER_EXPERT_CHOICE, MOE_ROUTER_NOISY_TOPK};
    const int64_t Ts[4] = {7, 12, 3, 7};
    for (int r = 0; r < 3; r++) {
        moe_layer_config c = base(rs[r], 2, MOE_ACT_GEGLU);
        c.capacity_factor = rs[r] == MOE_ROUTER_EXPERT_CHOICE ? 1.5 : 1.25;
        c.lb_coef = 0.1;
        c.importance_coef = 0.1;
        c.jitter_eps = 0.05;
        moe_ref_layer *big;
        ck_assert_int_eq(moe_ref_layer_create(&c, 12, &big), MOE_OK);
        moe_ref_layer_init(big, 1.0);
        for (int i = 0; i < 4; i++) {
            int64_t T = Ts[i];
            moe_ref_layer *one;
            ck_assert_int_eq(moe_ref_layer_create(&c, T, &one), MOE_OK);
            moe_ref_layer_init(one, 1.0);
            double x[12 * D], dy[12 * D], y1[12 * D], y2[12 * D], dx1[12 * D], dx2[12 * D];
            tu_randn(x, T * D, 1, 30 + (uint64_t)i);
            tu_randn(dy, T * D, 1, 40 + (uint64_t)i);
            tu_nan_fill(y1, 12 * D);
            ck_assert_int_eq(moe_ref_layer_forward(big, y1, x, NULL, NULL, T, MOE_KEY_STEP(9), 1), MOE_OK);
            ck_assert_int_eq(moe_ref_layer_forward(one, y2, x, NULL, NULL, T, MOE_KEY_STEP(9), 1), MOE_OK);
            ck_assert(memcmp(y1, y2, (size_t)(T * D) * sizeof *y1) == 0);
            if (T < 12)
                ck_assert(isnan(y1[T * D])); /* rows past T untouched */
            ck_assert_int_eq(moe_ref_layer_plan(big)->n, moe_ref_layer_plan(one)->n);
            ck_assert_int_eq(moe_ref_layer_plan(big)->capacity, moe_capacity(&c, T));
            moe_ref_layer_zero_grad(big);
            moe_ref_layer_zero_grad(one);
            ck_assert_int_eq(moe_ref_layer_backward(big, dx1, dy), MOE_OK);
            ck_assert_int_eq(moe_ref_layer_backward(one, dx2, dy), MOE_OK);
            ck_assert(tu_rel_err(dx1, dx2, T * D) <= 1e-14);
            const moe_arena *g1 = moe_ref_layer_grads(big), *g2 = moe_ref_layer_grads(one);
            ck_assert(g1->numel == g2->numel);
            ck_assert(tu_rel_err(g1->data, g2->data, g1->numel) <= 1e-14);
            moe_ref_layer_free(one);
        }
        moe_ref_layer_free(big);
    }
}
END_TEST

/* ---- bad input ------------------------------------------------------------------- */

#define expect_arg(call, field)                                                                                 \
    do {                                                                                                        \
        moe_status st_ = (call);                                                                                \
        ck_assert_msg(st_ == MOE_ERR_ARG, "%s gave %d, not MOE_ERR_ARG", #call, (int)st_);                      \
        ck_assert_msg(strstr(moe_last_error(), field) != NULL, "%s: message '%s' does not name '%s'", #call,    \
                      moe_last_error(), field);                                                                 \
    } while (0)

START_TEST(test_bad_ids_and_sizes)
{
    moe_layer_config c = base(MOE_ROUTER_HASH, 1, MOE_ACT_RELU);
    c.n_tasks = 3;
    moe_ref_layer *l;
    ck_assert_int_eq(moe_ref_layer_create(&c, T0, &l), MOE_OK);
    moe_ref_layer_init(l, 1.0);
    double x[(T0 + 1) * D], y[(T0 + 1) * D], dx[T0 * D];
    tu_randn(x, (T0 + 1) * D, 1, 9);
    int32_t tok[T0] = {1, 2, 3, -4, 5, 6, 7}, task[T0] = {0, 1, 2, 0, 1, 2, 0};
    /* backward before any forward */
    expect_arg(moe_ref_layer_backward(l, dx, y), "forward");
    expect_arg(moe_ref_layer_forward(l, y, x, tok, task, T0, MOE_KEY_STEP(0), 0), "token_ids[3]");
    tok[3] = 4;
    task[2] = 3;
    expect_arg(moe_ref_layer_forward(l, y, x, tok, task, T0, MOE_KEY_STEP(0), 0), "task_ids[2]");
    task[2] = -1;
    expect_arg(moe_ref_layer_forward(l, y, x, tok, task, T0, MOE_KEY_STEP(0), 0), "task_ids[2]");
    task[2] = 2;
    expect_arg(moe_ref_layer_forward(l, y, x, NULL, NULL, T0 + 1, MOE_KEY_STEP(0), 0), "max_tokens");
    expect_arg(moe_ref_layer_forward(l, y, x, NULL, NULL, 0, MOE_KEY_STEP(0), 0), "T = 0");
    ck_assert_int_eq(moe_ref_layer_forward(l, y, x, tok, task, T0, MOE_KEY_STEP(0), 0), MOE_OK);
    /* a forward refused for its arguments changes nothing: the last one can still be differentiated */
    ck_assert_int_eq(moe_ref_layer_forward(l, y, x, NULL, NULL, T0 + 1, MOE_KEY_STEP(0), 0), MOE_ERR_ARG);
    ck_assert_int_eq(moe_ref_layer_backward(l, dx, y), MOE_OK);
    moe_ref_layer_free(l);
    moe_ref_layer_free(NULL);
}
END_TEST

START_TEST(test_bad_configs)
{
    moe_ref_layer *l = (moe_ref_layer *)&l; /* must come back NULL */
    moe_layer_config c = base(MOE_ROUTER_TOPK, E + 1, MOE_ACT_RELU);
    expect_arg(moe_ref_layer_create(&c, T0, &l), "num_experts_per_tok");
    ck_assert_ptr_null(l);
    c = base(MOE_ROUTER_TOPK, 2, MOE_ACT_RELU);
    c.d_model = 0;
    expect_arg(moe_ref_layer_create(&c, T0, &l), "hidden_size");
    c = base(MOE_ROUTER_TOPK, 2, MOE_ACT_RELU);
    c.d_ff = -3;
    expect_arg(moe_ref_layer_create(&c, T0, &l), "intermediate_size");
    c = base(MOE_ROUTER_TOPK, 2, MOE_ACT_RELU);
    c.n_experts = 0;
    expect_arg(moe_ref_layer_create(&c, T0, &l), "num_local_experts");
    c = base(MOE_ROUTER_TOPK, 0, MOE_ACT_RELU);
    expect_arg(moe_ref_layer_create(&c, T0, &l), "num_experts_per_tok");
    c = base(MOE_ROUTER_TOPK, 2, MOE_ACT_RELU);
    c.capacity_factor = NAN;
    expect_arg(moe_ref_layer_create(&c, T0, &l), "capacity_factor");
    c.capacity_factor = INFINITY;
    expect_arg(moe_ref_layer_create(&c, T0, &l), "capacity_factor");
    c = base(MOE_ROUTER_TOPK, 2, MOE_ACT_RELU);
    c.act = (moe_activation)42;
    expect_arg(moe_ref_layer_create(&c, T0, &l), "activation");
    c = base(MOE_ROUTER_TOPK, 2, MOE_ACT_RELU);
    expect_arg(moe_ref_layer_create(&c, 0, &l), "T");
    expect_arg(moe_ref_layer_create(NULL, T0, &l), "config");
    ck_assert_ptr_null(l);
}
END_TEST

/* ---- init and the balancing bias -------------------------------------------------- */

START_TEST(test_init)
{
    moe_layer_config c = base(MOE_ROUTER_NOISY_TOPK, 2, MOE_ACT_SWIGLU);
    c.d_model = 16;
    c.d_ff = 32;
    c.use_bias = 1;
    c.n_shared = 1;
    c.shared_gate = 1;
    c.residual = 1;
    moe_ref_layer *a, *b;
    ck_assert_int_eq(moe_ref_layer_create(&c, 4, &a), MOE_OK);
    ck_assert_int_eq(moe_ref_layer_create(&c, 4, &b), MOE_OK);
    moe_ref_layer_init(a, 0.5);
    moe_ref_layer_init(b, 0.5);
    const moe_arena *pa = moe_ref_layer_params(a), *pb = moe_ref_layer_params(b);
    ck_assert(memcmp(pa->data, pb->data, (size_t)pa->numel * sizeof(double)) == 0); /* deterministic */
    static const char *names[] = {"router.weight", "router.noise", "router.bias", "experts.w1", "experts.w3",
                                  "experts.w2", "shared.w1", "shared.w3", "shared.w2", "shared.gate",
                                  "residual.w1", "residual.w3", "residual.w2", "residual.coef"};
    ck_assert_int_eq(pa->n, 14);
    for (int i = 0; i < 14; i++) {
        const moe_view *v;
        const double *w = moe_ref_layer_param(a, names[i], &v);
        ck_assert_msg(w != NULL, "%s missing", names[i]);
        ck_assert_ptr_nonnull(moe_ref_layer_grad(a, names[i], NULL));
        double ss = 0;
        for (int64_t j = 0; j < v->numel; j++)
            ss += w[j] * w[j];
        double sd = sqrt(ss / (double)v->numel);
        if (i == 2) {
            ck_assert_double_eq(sd, 0.0);
            continue;
        }
        int64_t fan_in = v->ndim == 3 ? v->shape[1] : v->shape[0];
        double want = 0.5 / sqrt((double)fan_in);
        /* at least 16 draws each: a loose band around the target std */
        ck_assert_msg(sd > 0.6 * want && sd < 1.4 * want, "%s: std %g, want %g", names[i], sd, want);
    }
    const moe_view *v;
    moe_ref_layer_param(a, "experts.w2", &v);
    ck_assert(v->ndim == 3 && v->shape[0] == E && v->shape[1] == 32 && v->shape[2] == 16);
    moe_ref_layer_param(a, "residual.coef", &v);
    ck_assert(v->ndim == 2 && v->shape[0] == 16 && v->shape[1] == 2);
    /* another seed, other values */
    moe_layer_config c2 = c;
    c2.seed = 78;
    moe_ref_layer *d;
    ck_assert_int_eq(moe_ref_layer_create(&c2, 4, &d), MOE_OK);
    moe_ref_layer_init(d, 0.5);
    ck_assert(memcmp(pa->data, moe_ref_layer_params(d)->data, (size_t)pa->numel * sizeof(double)) != 0);
    moe_ref_layer_free(a);
    moe_ref_layer_free(b);
    moe_ref_layer_free(d);
}
END_TEST

START_TEST(test_update_bias)
{
    moe_layer_config c = base(MOE_ROUTER_TOPK, 1, MOE_ACT_GELU);
    c.use_bias = 1;
    c.bias_rate = 0.01;
    moe_ref_layer *l;
    ck_assert_int_eq(moe_ref_layer_create(&c, T0, &l), MOE_OK);
    moe_ref_layer_init(l, 1.0);
    double *b = moe_ref_layer_param(l, "router.bias", NULL);
    moe_ref_layer_update_bias(l); /* no forward yet: nothing to balance */
    for (int e = 0; e < E; e++)
        ck_assert_double_eq(b[e], 0.0);
    double x[T0 * D], y[T0 * D], dx[T0 * D];
    tu_randn(x, T0 * D, 1, 10);
    ck_assert_int_eq(moe_ref_layer_forward(l, y, x, NULL, NULL, T0, MOE_KEY_STEP(0), 1), MOE_OK);
    const moe_plan *p = moe_ref_layer_plan(l);
    double mean = (double)T0 / E, want[E];
    for (int e = 0; e < E; e++)
        want[e] = 0.01 * (p->selected[e] < mean ? 1 : p->selected[e] > mean ? -1 : 0);
    moe_ref_layer_update_bias(l);
    for (int e = 0; e < E; e++)
        ck_assert_double_eq(b[e], want[e]);
    /* Repeated updates on a fixed batch reach balance (7 tokens over 4 experts: at best
     * 2, 2, 2, 1). Sign updates oscillate around it rather than settle, so look for the
     * best state visited. */
    int64_t worst0 = 0, best = T0;
    for (int e = 0; e < E; e++)
        worst0 = p->selected[e] > worst0 ? p->selected[e] : worst0;
    for (int it = 0; it < 400; it++) {
        ck_assert_int_eq(moe_ref_layer_forward(l, y, x, NULL, NULL, T0, MOE_KEY_STEP(0), 1), MOE_OK);
        int64_t m = 0;
        for (int e = 0; e < E; e++)
            m = p->selected[e] > m ? p->selected[e] : m;
        best = m < best ? m : best;
        moe_ref_layer_update_bias(l);
    }
    ck_assert_int_gt(worst0, 2);
    ck_assert_int_eq(best, 2);
    /* the bias gets no gradient */
    double dy[T0 * D];
    tu_randn(dy, T0 * D, 1, 11);
    moe_ref_layer_zero_grad(l);
    ck_assert_int_eq(moe_ref_layer_backward(l, dx, dy), MOE_OK);
    const double *gb = moe_ref_layer_grad(l, "router.bias", NULL);
    for (int e = 0; e < E; e++)
        ck_assert_double_eq(gb[e], 0.0);
    moe_ref_layer_free(l);
}
END_TEST

START_TEST(test_backward_accumulates)
{
    /* Two backward passes give twice the parameter gradients; dx is overwritten. */
    moe_layer_config c = base(MOE_ROUTER_TOPK, 2, MOE_ACT_GEGLU);
    c.lb_coef = 0.2;
    c.n_shared = 1;
    c.residual = 1;
    moe_ref_layer *l;
    ck_assert_int_eq(moe_ref_layer_create(&c, T0, &l), MOE_OK);
    moe_ref_layer_init(l, 1.0);
    double x[T0 * D], y[T0 * D], dy[T0 * D], dx1[T0 * D], dx2[T0 * D];
    tu_randn(x, T0 * D, 1, 12);
    tu_randn(dy, T0 * D, 1, 13);
    ck_assert_int_eq(moe_ref_layer_forward(l, y, x, NULL, NULL, T0, MOE_KEY_STEP(0), 1), MOE_OK);
    moe_ref_layer_zero_grad(l);
    ck_assert_int_eq(moe_ref_layer_backward(l, dx1, dy), MOE_OK);
    const moe_arena *g = moe_ref_layer_grads(l);
    double *once = tu_alloc(g->numel);
    memcpy(once, g->data, (size_t)g->numel * sizeof(double));
    for (int i = 0; i < T0 * D; i++)
        dx2[i] = 1e30;
    ck_assert_int_eq(moe_ref_layer_backward(l, dx2, dy), MOE_OK);
    ck_assert(memcmp(dx1, dx2, sizeof dx1) == 0);
    const double *twice = g->data;
    for (int64_t i = 0; i < g->numel; i++)
        ck_assert_double_eq_tol(twice[i], 2 * once[i], 1e-14 * (1 + fabs(once[i])));
    moe_ref_layer_zero_grad(l);
    for (int64_t i = 0; i < g->numel; i++)
        ck_assert_double_eq(((double *)g->data)[i], 0.0);
    free(once);
    moe_ref_layer_free(l);
}
END_TEST

int main(void)
{
    Suite *s = suite_create("layer");
    TCase *tc = tcase_create("layer");
    tcase_set_timeout(tc, 60);
    tcase_add_test(tc, test_forward_by_hand);
    tcase_add_test(tc, test_aux_total_and_hash);
    tcase_add_test(tc, test_batch_invariance);
    tcase_add_test(tc, test_fewer_tokens);
    tcase_add_test(tc, test_bad_ids_and_sizes);
    tcase_add_test(tc, test_bad_configs);
    tcase_add_test(tc, test_init);
    tcase_add_test(tc, test_update_bias);
    tcase_add_test(tc, test_backward_accumulates);
    suite_add_tcase(s, tc);
    TCase *fd = tcase_create("fd");
    tcase_set_timeout(fd, 300);
    tcase_add_test(fd, test_fd_router_x_activation);
    tcase_add_test(fd, test_fd_scores_and_renorm);
    tcase_add_test(fd, test_fd_capacity);
    tcase_add_test(fd, test_fd_jitter_noise_policies_bias);
    tcase_add_test(fd, test_fd_aux_losses);
    tcase_add_test(fd, test_fd_shared_residual);
    tcase_add_test(fd, test_fd_report);
    tcase_add_test(fd, test_fd_skip_detection);
    suite_add_tcase(s, fd);
#ifdef _OPENMP
    /* The tensors here are tiny: threads would only add overhead (and contend on a busy CI box). */
    omp_set_num_threads(1);
#endif
    /* Without fork, so that the FD counters add up over the sweep for the report. */
    SRunner *sr = srunner_create(s);
    srunner_set_fork_status(sr, CK_NOFORK);
    srunner_run_all(sr, CK_NORMAL);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed ? EXIT_FAILURE : EXIT_SUCCESS;
}
