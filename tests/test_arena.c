/* Arenas with named views, the plan's invariant checker, error reporting, and the
 * capacity formula (with routing at its boundary). */
#include <float.h>
#include <math.h>
#include "ref/ref.h"
#include "testutil.h"

START_TEST(test_arena_views)
{
    moe_arena a;
    moe_arena_init(&a, sizeof(double));
    int64_t s1[2] = {3, 4}, s2[3] = {2, 5, 7}, s3[1] = {1};
    ck_assert_int_eq(moe_arena_add(&a, "w", 2, s1), MOE_OK);
    ck_assert_int_eq(moe_arena_add(&a, "experts.w1", 3, s2), MOE_OK);
    ck_assert_int_eq(moe_arena_add(&a, "b", 1, s3), MOE_OK);
    ck_assert_int_eq(a.numel, 12 + 70 + 1);
    ck_assert_int_eq(moe_arena_alloc(&a), MOE_OK);
    const moe_view *v = moe_arena_find(&a, "experts.w1");
    ck_assert_ptr_nonnull(v);
    ck_assert_int_eq(v->offset, 12);
    ck_assert_int_eq(v->numel, 70);
    double *p = moe_arena_ptr(&a, v);
    ck_assert_ptr_eq(p, (double *)a.data + 12);
    for (int64_t i = 0; i < a.numel; i++)
        ck_assert(((double *)a.data)[i] == 0.0);
    ck_assert_ptr_null(moe_arena_find(&a, "nope"));
    /* no adding after allocation */
    ck_assert_int_eq(moe_arena_add(&a, "late", 1, s3), MOE_ERR_ARG);
    moe_arena_free(&a);
    moe_arena_free(NULL);
}
END_TEST

START_TEST(test_arena_bad)
{
    moe_arena a;
    moe_arena_init(&a, sizeof(float));
    int64_t zero[2] = {3, 0}, neg[1] = {-1}, ok[1] = {2}, huge[2] = {INT64_MAX / 2, 8};
    ck_assert_int_eq(moe_arena_add(&a, "z", 2, zero), MOE_ERR_ARG);
    ck_assert_ptr_nonnull(strstr(moe_last_error(), "'z'"));
    ck_assert_int_eq(moe_arena_add(&a, "n", 1, neg), MOE_ERR_ARG);
    ck_assert_int_eq(moe_arena_add(&a, "h", 2, huge), MOE_ERR_ARG);
    ck_assert_int_eq(moe_arena_add(&a, "d", 0, ok), MOE_ERR_ARG);
    ck_assert_int_eq(moe_arena_add(&a, "d", 5, ok), MOE_ERR_ARG);
    ck_assert_int_eq(moe_arena_add(&a, "x", 1, ok), MOE_OK);
    ck_assert_int_eq(moe_arena_add(&a, "x", 1, ok), MOE_ERR_ARG);
    ck_assert_ptr_nonnull(strstr(moe_last_error(), "twice"));
    char longname[MOE_NAME_MAX + 8];
    memset(longname, 'a', sizeof longname - 1);
    longname[sizeof longname - 1] = 0;
    ck_assert_int_eq(moe_arena_add(&a, longname, 1, ok), MOE_ERR_ARG);
    moe_arena_free(&a);
}
END_TEST

START_TEST(test_plan_check)
{
    moe_plan *p;
    ck_assert_int_eq(moe_plan_create(4, 3, 2, 2, &p), MOE_OK);
    /* tokens 0,2 -> expert 0; token 1 -> expert 1 */
    int32_t tok[3] = {0, 2, 1}, ex[3] = {0, 0, 1};
    for (int i = 0; i < 3; i++) {
        p->token[i] = tok[i];
        p->expert[i] = ex[i];
        p->src[i] = (int64_t)tok[i] * 2 + ex[i];
        p->weight[i] = 1;
    }
    p->n = 3;
    p->offsets[0] = 0;
    p->offsets[1] = 2;
    p->offsets[2] = 3;
    p->count[0] = 2;
    p->count[1] = 1;
    ck_assert_int_eq(moe_plan_check(p), MOE_OK);
    p->capacity = 1;
    ck_assert_int_eq(moe_plan_check(p), MOE_ERR_ARG);
    ck_assert_ptr_nonnull(strstr(moe_last_error(), "capacity"));
    p->capacity = 0;
    p->token[1] = 3;
    p->src[1] = 6;
    ck_assert_int_eq(moe_plan_check(p), MOE_ERR_ARG);
    p->token[1] = 0;
    p->src[1] = 0;
    ck_assert_int_eq(moe_plan_check(p), MOE_ERR_ARG); /* not increasing within expert 0 */
    p->token[1] = 2;
    p->src[1] = 4;
    p->offsets[2] = 2;
    ck_assert_int_eq(moe_plan_check(p), MOE_ERR_ARG);
    moe_plan_free(p);
    moe_plan_free(NULL);
    ck_assert_int_eq(moe_plan_create(4, 0, 2, 2, &p), MOE_ERR_ARG);
    ck_assert_ptr_null(p);
}
END_TEST

START_TEST(test_errors)
{
    ck_assert_str_eq(moe_strerror(MOE_OK), "success");
    ck_assert_int_eq(moe_error(MOE_ERR_FORMAT, "file %s: %d", "x.st", 3), MOE_ERR_FORMAT);
    ck_assert_str_eq(moe_last_error(), "file x.st: 3");
    moe_error(MOE_ERR_IO, "loading y: %s", moe_last_error()); /* context around the last message */
    ck_assert_str_eq(moe_last_error(), "loading y: file x.st: 3");
    ck_assert_str_ne(moe_strerror(MOE_ERR_IO), moe_strerror(MOE_ERR_FORMAT));
    ck_assert_str_eq(moe_strerror((moe_status)-99), "unknown error");
}
END_TEST

START_TEST(test_config_validate)
{
    moe_layer_config c;
    moe_layer_config_default(&c);
    ck_assert_int_eq(moe_layer_config_validate(&c, 16), MOE_OK);
    c.top_k = 9;
    ck_assert_int_eq(moe_layer_config_validate(&c, 16), MOE_ERR_ARG);
    ck_assert_ptr_nonnull(strstr(moe_last_error(), "num_experts_per_tok"));
    moe_layer_config_default(&c);
    c.capacity_factor = NAN;
    ck_assert_int_eq(moe_layer_config_validate(&c, 16), MOE_ERR_ARG);
    ck_assert_ptr_nonnull(strstr(moe_last_error(), "capacity_factor"));
    moe_layer_config_default(&c);
    c.d_model = 0;
    ck_assert_int_eq(moe_layer_config_validate(&c, 16), MOE_ERR_ARG);
    ck_assert_ptr_nonnull(strstr(moe_last_error(), "hidden_size"));
    moe_layer_config_default(&c);
    c.top_k = 8;
    ck_assert_int_eq(moe_layer_config_validate(&c, INT32_MAX / 4), MOE_ERR_ARG);
    ck_assert_ptr_nonnull(strstr(moe_last_error(), "overflows int32"));
    moe_layer_config_default(&c);
    ck_assert_int_eq(moe_layer_config_validate(&c, 0), MOE_ERR_ARG);
    c.router = (moe_router_kind)17;
    ck_assert_int_eq(moe_layer_config_validate(&c, 4), MOE_ERR_ARG);
    ck_assert_ptr_nonnull(strstr(moe_last_error(), "router"));
}
END_TEST

/* An arena larger than the machine is refused before allocating: the message gives the
 * size in bytes and the tensor that takes most of it */
START_TEST(test_arena_too_big)
{
    moe_arena a;
    moe_arena_init(&a, sizeof(double));
    int64_t small[1] = {10}, big[3] = {64, 65536, 1 << 20};
    ck_assert_int_eq(moe_arena_add(&a, "bias", 1, small), MOE_OK);
    ck_assert_int_eq(moe_arena_add(&a, "experts.w1", 3, big), MOE_OK);
    ck_assert_int_eq(moe_arena_alloc(&a), MOE_ERR_NOMEM);
    ck_assert_ptr_null(a.data);
    const char *e = moe_last_error();
    ck_assert_msg(strstr(e, "4398046511114 elements of 8 bytes (3.28e+04 GiB)") &&
                      strstr(e, "more than this machine's memory") &&
                      strstr(e, "the largest tensor is 'experts.w1' [64, 65536, 1048576]"), "%s", e);
    ck_assert_int_gt(moe_host_memory(), 0);
    moe_arena_free(&a);
}
END_TEST

START_TEST(test_capacity_formula)
{
    moe_layer_config c;
    moe_layer_config_default(&c); /* E = 8, k = 2 */
    ck_assert_int_eq(moe_capacity(&c, 100), 0); /* dropless */
    c.capacity_factor = 1.25;
    ck_assert_int_eq(moe_capacity(&c, 100), 32); /* ceil(1.25·100·2/8) = ceil(31.25) */
    c.min_capacity = 40;
    ck_assert_int_eq(moe_capacity(&c, 100), 40);
    c.router = MOE_ROUTER_EXPERT_CHOICE;
    c.min_capacity = 0;
    c.capacity_factor = 2;
    ck_assert_int_eq(moe_capacity(&c, 100), 25); /* ceil(2·100/8) */
    ck_assert_int_eq(moe_capacity(&c, 3), 1);
    c.capacity_factor = 100;
    ck_assert_int_eq(moe_capacity(&c, 10), 10); /* never more than T */
}
END_TEST

/* At and past C = T a capacity means "never drop": it stays T, however large the
 * capacity_factor (1e19 used to wrap through the int64 conversion to 1 or min_capacity) */
START_TEST(test_capacity_boundary)
{
    moe_layer_config c;
    moe_layer_config_default(&c); /* E = 8, k = 2: cf = 4 gives C = T */
    const int64_t T = 64;
    static const struct { double cf; int64_t want; } tc[] = {
        {3.9, 63}, {3.99, 64}, {4.0, 64}, {4.01, 64}, {1e6, 64}, {1e19, 64}, {1e300, 64}, {DBL_MAX, 64},
    };
    static const int64_t mins[] = {0, 3, 1000};
    for (size_t i = 0; i < sizeof tc / sizeof tc[0]; i++)
        for (size_t m = 0; m < 3; m++) {
            const int64_t minc = mins[m];
            c.router = MOE_ROUTER_TOPK;
            c.capacity_factor = tc[i].cf;
            c.min_capacity = minc;
            ck_assert_int_eq(moe_layer_config_validate(&c, T), MOE_OK);
            int64_t want = tc[i].want > minc ? tc[i].want : (minc < T ? minc : T);
            ck_assert_msg(moe_capacity(&c, T) == want, "top-2, cf %g, min %lld: capacity %lld, want %lld", tc[i].cf,
                          (long long)minc, (long long)moe_capacity(&c, T), (long long)want);
            c.router = MOE_ROUTER_EXPERT_CHOICE; /* C = ceil(cf·T/E): T from cf = 8 on */
            int64_t ec = tc[i].cf >= 8 ? T : (int64_t)ceil(tc[i].cf * (double)T / 8);
            ec = ec > minc ? ec : (minc < T ? minc : T);
            ck_assert_msg(moe_capacity(&c, T) == ec, "expert choice, cf %g, min %lld: capacity %lld, want %lld",
                          tc[i].cf, (long long)minc, (long long)moe_capacity(&c, T), (long long)ec);
        }
}
END_TEST

static void route_config(moe_layer_config *c, moe_router_kind r, int64_t E, int64_t k)
{
    moe_layer_config_default(c);
    c->router = r;
    c->n_experts = E;
    c->top_k = k;
}

/* a plan sized as the layer sizes it: T·k rows, or E·C for expert choice */
static moe_plan *plan_for(const moe_layer_config *c, int64_t T)
{
    moe_plan *p = NULL;
    int64_t k = c->router == MOE_ROUTER_EXPERT_CHOICE ? moe_capacity(c, T) : c->top_k;
    int64_t n = c->router == MOE_ROUTER_EXPERT_CHOICE ? c->n_experts * k : T * k;
    ck_assert_int_eq(moe_plan_create(n, T, c->n_experts, k, &p), MOE_OK);
    return p;
}

static void route(moe_plan *p, const double *s, const moe_layer_config *c, int64_t T)
{
    ck_assert_msg(moe_ref_route(p, s, NULL, NULL, NULL, c, MOE_KEY_STEP(0), T) == MOE_OK, "%s", moe_last_error());
    ck_assert_msg(moe_plan_check(p) == MOE_OK, "%s", moe_last_error());
}

/* A capacity factor far past "never drop" (1e19 and up: the capacity is clamped to T,
 * no longer wrapped through int64) drops nothing, even with every token on one expert;
 * just below the boundary C = T, the one overloaded expert drops. */
START_TEST(huge_capacity_factor)
{
    const int64_t T = 64, E = 8;
    double *s = tu_alloc(T * E);
    for (int64_t t = 0; t < T; t++)
        for (int64_t e = 0; e < E; e++)
            s[t * E + e] = e == 0 ? 0.5 : e == 1 + t % 7 ? 0.3 : 0.2 / 6; /* all on expert 0 first */
    static const double cfs[] = {4.0, 1e19, 1e300, DBL_MAX};
    for (size_t i = 0; i < sizeof cfs / sizeof cfs[0]; i++) {
        moe_layer_config c;
        route_config(&c, MOE_ROUTER_TOPK, E, 2);
        c.capacity_factor = cfs[i];
        c.min_capacity = 3;
        moe_plan *p = plan_for(&c, T);
        route(p, s, &c, T);
        ck_assert_msg(p->dropped == 0 && p->n == 2 * T && p->capacity == T, "cf %g: capacity %lld, dropped %lld",
                      cfs[i], (long long)p->capacity, (long long)p->dropped);
        moe_plan_free(p);
        route_config(&c, MOE_ROUTER_EXPERT_CHOICE, E, 2);
        c.capacity_factor = cfs[i] * 2; /* C = ceil(8·64/8) = T */
        p = plan_for(&c, T);
        route(p, s, &c, T);
        ck_assert_msg(p->capacity == T && p->n == E * T, "expert choice, cf %g: capacity %lld", cfs[i] * 2,
                      (long long)p->capacity);
        moe_plan_free(p);
    }
    moe_layer_config c;
    route_config(&c, MOE_ROUTER_TOPK, E, 2);
    c.capacity_factor = 3.9; /* C = 63: expert 0 drops one */
    moe_plan *p = plan_for(&c, T);
    route(p, s, &c, T);
    ck_assert_int_eq(p->capacity, 63);
    ck_assert_int_eq(p->dropped, 1);
    moe_plan_free(p);
    free(s);
}
END_TEST

int main(void)
{
    Suite *s = suite_create("arena");
    TCase *tc = tcase_create("core");
    tcase_add_test(tc, test_arena_views);
    tcase_add_test(tc, test_arena_bad);
    tcase_add_test(tc, test_plan_check);
    tcase_add_test(tc, test_errors);
    tcase_add_test(tc, test_config_validate);
    tcase_add_test(tc, test_arena_too_big);
    tcase_add_test(tc, test_capacity_formula);
    tcase_add_test(tc, test_capacity_boundary);
    tcase_add_test(tc, huge_capacity_factor);
    suite_add_tcase(s, tc);
    return tu_run(s);
}
