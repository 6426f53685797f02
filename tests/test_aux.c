/* Aux losses: hand-computed values and finite-difference gradients. */
#include "testutil.h"

#include "ref/ref.h"

#define FD_H 1e-6
#define FD_TOL 1e-6

static tu_fd_stats fd_all;

static void fd_report(const char *what, const tu_fd_stats *st)
{
    printf("fd: aux %-18s worst rel err %.2e, checked %lld, skipped %lld\n", what, st->worst,
           (long long)st->checked, (long long)st->skipped);
    if (st->worst > fd_all.worst)
        fd_all.worst = st->worst;
    fd_all.checked += st->checked;
    fd_all.skipped += st->skipped;
}

static moe_plan *routed(const double *s, int64_t T, int64_t E, int64_t k, moe_router_kind r, double cf)
{
    moe_layer_config c;
    moe_layer_config_default(&c);
    c.router = r;
    c.n_experts = E;
    c.top_k = k;
    c.renormalize = 0;
    c.capacity_factor = cf;
    int64_t kk = r == MOE_ROUTER_EXPERT_CHOICE ? moe_capacity(&c, T) : k;
    moe_plan *p;
    ck_assert_int_eq(moe_plan_create(r == MOE_ROUTER_EXPERT_CHOICE ? E * kk : T * kk, T, E, kk, &p), MOE_OK);
    ck_assert_msg(moe_ref_route(p, s, NULL, NULL, NULL, &c, MOE_KEY_STEP(0), T) == MOE_OK, "%s", moe_last_error());
    return p;
}

/* ---- values ---------------------------------------------------------------- */

START_TEST(lb_values)
{
    /* balanced: f = P = (1/2, 1/2) -> 1 */
    const double bal[8] = {0.6, 0.4, 0.4, 0.6, 0.6, 0.4, 0.4, 0.6};
    moe_plan *p = routed(bal, 4, 2, 1, MOE_ROUTER_TOPK, 0);
    ck_assert_double_eq_tol(moe_ref_lb_loss_forward(bal, p, 4, 2), 1.0, 1e-15);
    moe_plan_free(p);
    /* both tokens on e0: f = (1, 0), P = (0.7, 0.3) -> 2·0.7 */
    const double one[4] = {0.8, 0.2, 0.6, 0.4};
    p = routed(one, 2, 2, 1, MOE_ROUTER_TOPK, 0);
    ck_assert_double_eq_tol(moe_ref_lb_loss_forward(one, p, 2, 2), 1.4, 1e-15);
    moe_plan_free(p);
    /* top-2, E = 3: selected (1, 2, 1) of T·k = 4, P = (0.35, 0.4, 0.25) -> 3·0.35 = 1.05,
     * the same when capacity 1 drops one of e1's two (f counts before dropping) */
    const double s2[6] = {0.5, 0.3, 0.2, 0.2, 0.5, 0.3};
    p = routed(s2, 2, 3, 2, MOE_ROUTER_TOPK, 0);
    ck_assert_double_eq_tol(moe_ref_lb_loss_forward(s2, p, 2, 3), 1.05, 1e-14);
    moe_plan_free(p);
    p = routed(s2, 2, 3, 2, MOE_ROUTER_TOPK, 0.34);
    ck_assert_int_eq(p->capacity, 1);
    ck_assert_int_eq(p->dropped, 1);
    ck_assert_double_eq_tol(moe_ref_lb_loss_forward(s2, p, 2, 3), 1.05, 1e-14);
    moe_plan_free(p);
    /* expert choice is balanced by construction: f = 1/E, so lb = Σ_e P_e = 1 for softmax */
    p = routed(s2, 2, 3, 1, MOE_ROUTER_EXPERT_CHOICE, 1.0);
    ck_assert_double_eq_tol(moe_ref_lb_loss_forward(s2, p, 2, 3), 1.0, 1e-15);
    moe_plan_free(p);
}
END_TEST

START_TEST(cv2_values)
{
    ck_assert_double_eq(moe_ref_cv2_forward((double[]){1, 1, 1}, 3), 0.0);
    ck_assert_double_eq_tol(moe_ref_cv2_forward((double[]){1, 3}, 2), 0.25, 1e-10);
    ck_assert_double_eq(moe_ref_cv2_forward((double[]){0, 0}, 2), 0.0); /* no 0/0 */
    /* mean 2, population variance 2/3 */
    ck_assert_double_eq_tol(moe_ref_cv2_forward((double[]){1, 2, 3}, 3), (2.0 / 3) / 4, 1e-10);
}
END_TEST

START_TEST(importance_values)
{
    /* top-2 with capacity 2 drops (t1, e1) and (t2, e0); importance still counts them */
    const double s[6] = {0.9, 0.1, 0.6, 0.4, 0.3, 0.7};
    moe_plan *p = routed(s, 3, 2, 2, MOE_ROUTER_TOPK, 0.5);
    ck_assert_int_eq(p->dropped, 2);
    double imp[2];
    moe_ref_importance_forward(imp, p);
    ck_assert_double_eq_tol(imp[0], 1.8, 1e-15);
    ck_assert_double_eq_tol(imp[1], 1.2, 1e-15);
    moe_plan_free(p);
    /* expert choice: the kept weights. C = 2: e0 takes t0 (0.9), t1 (0.6); e1 t2 (0.7), t1 (0.4) */
    p = routed(s, 3, 2, 1, MOE_ROUTER_EXPERT_CHOICE, 1.0);
    moe_ref_importance_forward(imp, p);
    ck_assert_double_eq_tol(imp[0], 1.5, 1e-15);
    ck_assert_double_eq_tol(imp[1], 1.1, 1e-15);
    moe_plan_free(p);
}
END_TEST

START_TEST(z_values)
{
    const double z0[8] = {0};
    ck_assert_double_eq_tol(moe_ref_z_loss_forward(z0, 2, 4), log(4.0) * log(4.0), 1e-14);
    /* rows (0, log 3) and (1000, 1000 + log 3): lse = log 4 and 1000 + log 4 */
    const double z[4] = {0, log(3.0), 1000, 1000 + log(3.0)};
    double want = (log(4.0) * log(4.0) + (1000 + log(4.0)) * (1000 + log(4.0))) / 2;
    ck_assert_double_eq_tol(moe_ref_z_loss_forward(z, 2, 2), want, 1e-9);
}
END_TEST

START_TEST(mi_values)
{
    /* the same distribution for every task: MI = 0 */
    const double u[8] = {0.25, 0.75, 0.25, 0.75, 0.25, 0.75, 0.25, 0.75};
    const int32_t task[4] = {0, 1, 1, 0};
    ck_assert_double_eq_tol(moe_ref_mi_loss_forward(u, task, 2, 4, 2), 0.0, 1e-15);
    /* each task on its own expert: MI = log 2. A third task with no tokens is skipped,
     * a token with an id outside [0, n_tasks) is ignored. */
    const double sp[6] = {1, 0, 0, 1, 0.5, 0.5};
    ck_assert_double_eq_tol(moe_ref_mi_loss_forward(sp, (int32_t[]){0, 1, 7}, 3, 3, 2), -log(2.0), 1e-15);
    /* q0 = (3/4, 1/4), q1 = (1/4, 3/4), P(e) = 1/2: MI = 3/4·log 1.5 + 1/4·log 0.5 */
    const double soft[4] = {0.75, 0.25, 0.25, 0.75};
    double want = -(0.75 * log(1.5) + 0.25 * log(0.5));
    ck_assert_double_eq_tol(moe_ref_mi_loss_forward(soft, (int32_t[]){0, 1}, 2, 2, 2), want, 1e-15);
    /* sigmoid-like scores that do not sum to 1 are normalised per task: same value */
    const double sig[4] = {0.6, 0.2, 0.1, 0.3};
    ck_assert_double_eq_tol(moe_ref_mi_loss_forward(sig, (int32_t[]){0, 1}, 2, 2, 2), want, 1e-15);
    /* P(m) weighs tasks by their tokens: task 0 has 3 of 4 tokens */
    const double w3[8] = {0.75, 0.25, 0.75, 0.25, 0.75, 0.25, 0.25, 0.75};
    double pe0 = 0.75 * 0.75 + 0.25 * 0.25, pe1 = 1 - pe0;
    double mi = 0.75 * (0.75 * log(0.75 / pe0) + 0.25 * log(0.25 / pe1)) +
                0.25 * (0.25 * log(0.25 / pe0) + 0.75 * log(0.75 / pe1));
    ck_assert_double_eq_tol(moe_ref_mi_loss_forward(w3, (int32_t[]){0, 0, 0, 1}, 2, 4, 2), -mi, 1e-15);
}
END_TEST

/* ---- gradients -------------------------------------------------------------- */

typedef struct {
    double *x;       /* the perturbed input */
    double *w;       /* random weights of a linear read-out, where the loss is a vector */
    moe_plan *p;
    const int32_t *task;
    int64_t T, E, n_tasks;
    int which;
} ctx_t;

enum { LB, CV2, IMP, IMP_CV2, ZL, MI };

static double loss_aux(void *vc, int *ok)
{
    ctx_t *c = vc;
    (void)ok;
    double v[64];
    switch (c->which) {
    case LB: return moe_ref_lb_loss_forward(c->x, c->p, c->T, c->E);
    case CV2: return moe_ref_cv2_forward(c->x, c->E);
    case IMP: {
        double acc = 0;
        moe_ref_importance_forward(v, c->p);
        for (int64_t e = 0; e < c->E; e++)
            acc += c->w[e] * v[e];
        return acc;
    }
    case IMP_CV2: moe_ref_importance_forward(v, c->p); return moe_ref_cv2_forward(v, c->E);
    case ZL: return moe_ref_z_loss_forward(c->x, c->T, c->E);
    case MI: return moe_ref_mi_loss_forward(c->x, c->task, c->n_tasks, c->T, c->E);
    }
    return NAN;
}

/* The gradient starts at 0.25 everywhere so that "accumulates" is checked too. */
static double *grad_buf(int64_t n)
{
    double *g = tu_alloc(n);
    for (int64_t i = 0; i < n; i++)
        g[i] = 0.25;
    return g;
}

static void unbias(double *g, int64_t n)
{
    for (int64_t i = 0; i < n; i++)
        g[i] -= 0.25;
}

START_TEST(lb_grad)
{
    enum { T = 9, E = 5 };
    tu_fd_stats st = {0};
    for (int k = 1; k <= 3; k++) {
        double z[T * E], s[T * E];
        tu_randn(z, T * E, 1.0, 10 + k);
        moe_ref_softmax_forward(s, z, T, E);
        moe_plan *p = routed(s, T, E, k, MOE_ROUTER_TOPK, k == 2 ? 0.5 : 0);
        ctx_t c = {.x = s, .p = p, .T = T, .E = E, .which = LB};
        double *ds = grad_buf(T * E);
        moe_ref_lb_loss_backward(ds, 1.7, p, T, E);
        unbias(ds, T * E);
        for (int i = 0; i < T * E; i++)
            ds[i] /= 1.7;
        double err = tu_fd_check(s, T * E, ds, loss_aux, &c, FD_H, &st);
        ck_assert_msg(err <= FD_TOL, "lb grad k=%d rel err %g", k, err);
        free(ds);
        moe_plan_free(p);
    }
    fd_report("load balance", &st);
}
END_TEST

START_TEST(cv2_grad)
{
    tu_fd_stats st = {0};
    for (int E = 1; E <= 6; E++) {
        double v[6];
        tu_randn(v, E, 1.0, 20 + E);
        for (int e = 0; e < E; e++)
            v[e] = fabs(v[e]) + 0.1; /* importance and load are positive */
        ctx_t c = {.x = v, .E = E, .which = CV2};
        double *dv = grad_buf(E);
        moe_ref_cv2_backward(dv, 1.0, v, E);
        unbias(dv, E);
        double err = tu_fd_check(v, E, dv, loss_aux, &c, FD_H, &st);
        ck_assert_msg(err <= FD_TOL, "cv2 grad E=%d rel err %g", E, err);
        free(dv);
    }
    fd_report("cv2", &st);
}
END_TEST

START_TEST(importance_grad)
{
    enum { T = 11, E = 4 };
    tu_fd_stats st = {0};
    double z[T * E], s[T * E], w[E];
    tu_randn(z, T * E, 1.0, 30);
    tu_randn(w, E, 1.0, 31);
    moe_ref_softmax_forward(s, z, T, E);
    const moe_router_kind routers[2] = {MOE_ROUTER_TOPK, MOE_ROUTER_EXPERT_CHOICE};
    for (int r = 0; r < 2; r++)
        for (int which = IMP; which <= IMP_CV2; which++) {
            moe_plan *p = routed(s, T, E, r ? 1 : 2, routers[r], r ? 1.0 : 0.5);
            int tc = routers[r] != MOE_ROUTER_EXPERT_CHOICE;
            int64_t n = tc ? T * p->k : p->n;
            double *x = tc ? p->choice_weight : p->weight;
            ctx_t c = {.x = x, .w = w, .p = p, .T = T, .E = E, .which = which};
            double imp[E], dimp[E];
            if (which == IMP) {
                memcpy(dimp, w, sizeof dimp);
            } else {
                moe_ref_importance_forward(imp, p);
                memset(dimp, 0, sizeof dimp);
                moe_ref_cv2_backward(dimp, 1.0, imp, E);
            }
            double *dw = grad_buf(p->cap_n), *dch = grad_buf(T * p->k);
            moe_ref_importance_backward(dw, dch, dimp, p);
            unbias(dw, p->cap_n);
            unbias(dch, T * p->k);
            double err = tu_fd_check(x, n, tc ? dch : dw, loss_aux, &c, FD_H, &st);
            ck_assert_msg(err <= FD_TOL, "importance grad router %d loss %d rel err %g", r, which, err);
            /* the other array is untouched */
            const double *other = tc ? dw : dch;
            for (int64_t i = 0; i < (tc ? p->cap_n : T * p->k); i++)
                ck_assert_double_eq(other[i], 0.0);
            free(dw), free(dch);
            moe_plan_free(p);
        }
    fd_report("importance", &st);
}
END_TEST

START_TEST(z_grad)
{
    enum { T = 7, E = 5 };
    tu_fd_stats st = {0};
    double z[T * E];
    tu_randn(z, T * E, 3.0, 40);
    ctx_t c = {.x = z, .T = T, .E = E, .which = ZL};
    double *dz = grad_buf(T * E);
    moe_ref_z_loss_backward(dz, 1.0, z, T, E);
    unbias(dz, T * E);
    double err = tu_fd_check(z, T * E, dz, loss_aux, &c, FD_H, &st);
    ck_assert_msg(err <= FD_TOL, "z-loss grad rel err %g", err);
    free(dz);
    fd_report("z-loss", &st);
}
END_TEST

START_TEST(mi_grad)
{
    enum { T = 13, E = 4 };
    tu_fd_stats st = {0};
    double z[T * E], s[T * E];
    int32_t task[T];
    for (int t = 0; t < T; t++)
        task[t] = t % 3 == 2 ? (t == 5 ? 9 : 2) : t % 2; /* tasks 0, 1, 2, one stray id, task 3 empty */
    for (int sig = 0; sig < 2; sig++) {
        tu_randn(z, T * E, 1.0, 50 + sig);
        if (sig)
            moe_ref_sigmoid_forward(s, z, T * E);
        else
            moe_ref_softmax_forward(s, z, T, E);
        ctx_t c = {.x = s, .task = task, .T = T, .E = E, .n_tasks = 4, .which = MI};
        double *ds = grad_buf(T * E);
        moe_ref_mi_loss_backward(ds, 1.0, s, task, 4, T, E);
        unbias(ds, T * E);
        double err = tu_fd_check(s, T * E, ds, loss_aux, &c, FD_H, &st);
        ck_assert_msg(err <= FD_TOL, "MI grad (%s) rel err %g", sig ? "sigmoid" : "softmax", err);
        for (int e = 0; e < E; e++) /* the stray token gets nothing */
            ck_assert_double_eq(ds[5 * E + e], 0.0);
        free(ds);
    }
    fd_report("mutual information", &st);
}
END_TEST

static Suite *aux_suite(void)
{
    Suite *s = suite_create("aux");
    TCase *tc = tcase_create("values");
    tcase_add_test(tc, lb_values);
    tcase_add_test(tc, cv2_values);
    tcase_add_test(tc, importance_values);
    tcase_add_test(tc, z_values);
    tcase_add_test(tc, mi_values);
    suite_add_tcase(s, tc);
    tc = tcase_create("gradients");
    tcase_add_test(tc, lb_grad);
    tcase_add_test(tc, cv2_grad);
    tcase_add_test(tc, importance_grad);
    tcase_add_test(tc, z_grad);
    tcase_add_test(tc, mi_grad);
    suite_add_tcase(s, tc);
    return s;
}

int main(void)
{
    /* No fork, so the FD totals gathered by the tests can be printed at the end. */
    SRunner *sr = srunner_create(aux_suite());
    srunner_set_fork_status(sr, CK_NOFORK);
    srunner_run_all(sr, CK_NORMAL);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    printf("fd: aux suite worst rel err %.2e, checked %lld, skipped %lld\n", fd_all.worst,
           (long long)fd_all.checked, (long long)fd_all.skipped);
    return failed ? EXIT_FAILURE : EXIT_SUCCESS;
}
