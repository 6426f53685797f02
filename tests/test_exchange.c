/*
 * The exchange (src/layer/exchange.h): the MoE layer run through the loopback exchange —
 * experts split over N fake owners, rows copied chunk by chunk through receive buffers
 * and receive-side plans — gives bit-identical outputs, gradients, aux losses and counts
 * to the plain local exchange, for every router, on the cpu and ref backends; and so
 * does a whole model trained for a few steps. Bad splits are refused with a message.
 */
#include "layer/moe_layer.h"
#include "model/model.h"
#include "testutil.h"

typedef struct {
    moe_router_kind router;
    int64_t E, k, shared, residual;
    double cf;
} variant;

static const variant variants[] = {
    {MOE_ROUTER_TOPK, 8, 2, 0, 0, 0},         {MOE_ROUTER_TOPK, 8, 2, 1, 1, 1.0},
    {MOE_ROUTER_NOISY_TOPK, 4, 2, 0, 0, 0},   {MOE_ROUTER_EXPERT_CHOICE, 8, 1, 0, 0, 1.5},
    {MOE_ROUTER_HASH, 4, 1, 1, 0, 0},         {MOE_ROUTER_SINKHORN, 8, 2, 0, 1, 1.0},
    {MOE_ROUTER_TOPK, 4, 4, 0, 0, 0},
};
#define NVARIANTS (int)(sizeof variants / sizeof variants[0])

static void config(moe_layer_config *c, const variant *v)
{
    moe_layer_config_default(c);
    c->d_model = 24;
    c->d_ff = 40;
    c->n_experts = v->E;
    c->top_k = v->k;
    c->router = v->router;
    c->capacity_factor = v->cf;
    c->renormalize = v->router == MOE_ROUTER_TOPK;
    c->act = MOE_ACT_SWIGLU;
    c->lb_coef = v->router == MOE_ROUTER_HASH ? 0 : 0.01;
    c->z_coef = v->router == MOE_ROUTER_HASH ? 0 : 0.001;
    c->importance_coef = v->router == MOE_ROUTER_HASH ? 0 : 0.02;
    c->load_coef = v->router == MOE_ROUTER_NOISY_TOPK ? 0.03 : 0;
    c->jitter_eps = v->router == MOE_ROUTER_TOPK ? 0.01 : 0;
    c->n_shared = v->shared;
    c->residual = (int)v->residual;
    c->use_bias = v->router == MOE_ROUTER_TOPK && v->k == 2;
}

/* One run of the layer: y, dx and every gradient, as doubles (exact copies of floats). */
typedef struct {
    double *y, *dx, *grads, *stats;
    int64_t ng, ns;
} result;

static result run_layer(moe_backend *b, const moe_layer_config *c, moe_exchange *ex, int64_t T)
{
    const int64_t d = c->d_model;
    moe_layer *L;
    ck_assert_msg(moe_layer_create(c, b, T, ex, &L) == MOE_OK, "%s", moe_last_error());
    ck_assert_int_eq(moe_layer_init(L, 1.0), MOE_OK);
    moe_buf *io, *ids;
    ck_assert_int_eq(b->alloc(b, b->float_type, 4 * T * d, &io), MOE_OK);
    ck_assert_int_eq(b->alloc(b, MOE_I32, T, &ids), MOE_OK);
    double *h = tu_alloc(T * d);
    int32_t *tok = malloc((size_t)T * sizeof *tok);
    for (int64_t t = 0; t < T; t++)
        tok[t] = (int32_t)(t * 13 + 7);
    moe_tensor x = {io, 0}, y = {io, T * d}, dy = {io, 2 * T * d}, dx = {io, 3 * T * d}, tid = {ids, 0};
    tu_randn(h, T * d, 1.0, 5);
    moe_upload_f64(b, x, h, T * d);
    tu_randn(h, T * d, 1.0, 6);
    moe_upload_f64(b, dy, h, T * d);
    ck_assert_int_eq(b->upload(b, tid, tok, MOE_I32, T), MOE_OK);
    moe_layer_zero_grad(L);
    ck_assert_msg(moe_layer_forward(L, y, x, &tid, NULL, T, (moe_key){3, 1, 100}, 1) == MOE_OK, "%s",
                  moe_last_error());
    ck_assert_msg(moe_layer_backward(L, dx, dy) == MOE_OK, "%s", moe_last_error());
    moe_layer_update_bias(L);
    result r = {tu_alloc(T * d), tu_alloc(T * d), NULL, NULL, 0, MOE_LAYER_NSTATS(c->n_experts)};
    ck_assert_msg(moe_download_f64(b, r.y, y, T * d) == MOE_OK, "%s", moe_last_error());
    ck_assert_int_eq(moe_download_f64(b, r.dx, dx, T * d), MOE_OK);
    const moe_arena *P = moe_layer_params(L);
    r.ng = 2 * P->numel;
    r.grads = tu_alloc(r.ng);
    for (int i = 0; i < P->n; i++) {
        ck_assert_int_eq(moe_layer_get_grad(L, P->views[i].name, r.grads + P->views[i].offset), MOE_OK);
        ck_assert_int_eq(moe_layer_get_param(L, P->views[i].name, r.grads + P->numel + P->views[i].offset), MOE_OK);
    }
    r.stats = tu_alloc(r.ns);
    ck_assert_int_eq(moe_download_f64(b, r.stats, moe_layer_stats(L), r.ns), MOE_OK);
    free(h);
    free(tok);
    b->free(b, io);
    b->free(b, ids);
    moe_layer_free(L);
    return r;
}

static void free_result(result *r)
{
    free(r->y);
    free(r->dx);
    free(r->grads);
    free(r->stats);
}

static void same_bits(const char *what, const double *a, const double *b, int64_t n, int v, int64_t owners,
                      int64_t chunks)
{
    for (int64_t i = 0; i < n; i++)
        ck_assert_msg(memcmp(&a[i], &b[i], sizeof a[i]) == 0,
                      "variant %d, %lld owners, %lld chunks: %s[%lld] = %.17g, local %.17g", v, (long long)owners,
                      (long long)chunks, what, (long long)i, a[i], b[i]);
}

/* _i: variant × backend */
START_TEST(test_loopback_bits)
{
    const int v = _i / 2;
    const char *bname = _i % 2 ? "cpu" : "ref";
    moe_layer_config c;
    config(&c, &variants[v]);
    const int64_t T = 1031; /* prime: uneven chunks and partial row blocks (MOE_ROW_BLOCK) */
    moe_backend *b;
    ck_assert_int_eq(moe_backend_create(bname, &(moe_backend_options){.threads = 2}, &b), MOE_OK);
    result plain = run_layer(b, &c, NULL, T);
    const int64_t owners[] = {1, 2, 4}, chunks[] = {1, 2, 3};
    for (int oi = 0; oi < 3; oi++)
        for (int ci = 0; ci < 3; ci++) {
            if (c.n_experts % owners[oi])
                continue;
            moe_exchange *ex;
            ck_assert_int_eq(moe_exchange_loopback_create(owners[oi], chunks[ci], &ex), MOE_OK);
            result r = run_layer(b, &c, ex, T);
            same_bits("y", r.y, plain.y, T * c.d_model, v, owners[oi], chunks[ci]);
            same_bits("dx", r.dx, plain.dx, T * c.d_model, v, owners[oi], chunks[ci]);
            same_bits("grads and updated parameters", r.grads, plain.grads, r.ng, v, owners[oi], chunks[ci]);
            same_bits("stats", r.stats, plain.stats, r.ns, v, owners[oi], chunks[ci]);
            free_result(&r);
            moe_exchange_free(ex);
        }
    free_result(&plain);
    moe_backend_free(b);
}
END_TEST

/* A tiny model, 4 steps through the loopback exchange: the same losses and parameters. */
static void train(moe_exchange *ex, double *losses, double *params)
{
    moe_model_config c;
    moe_model_config_tiny(&c);
    c.moe.jitter_eps = 0.01;
    moe_backend *b;
    ck_assert_int_eq(moe_backend_create("cpu", &(moe_backend_options){.threads = 2}, &b), MOE_OK);
    moe_model *m;
    const int64_t B = 3, S = 11;
    ck_assert_msg(moe_model_create(&c, b, ex, B, S, &m) == MOE_OK, "%s", moe_last_error());
    ck_assert_int_eq(moe_model_init(m, 5), MOE_OK);
    moe_optim_config oc;
    moe_optim_config_default(&oc);
    moe_optim *o;
    ck_assert_int_eq(moe_optim_create(m, &oc, &o), MOE_OK);
    int32_t in[33], tg[33];
    for (int step = 0; step < 4; step++) {
        moe_model_zero_grad(m);
        for (int micro = 0; micro < 2; micro++) {
            for (int i = 0; i < B * S; i++) {
                in[i] = (int32_t)((i * 7 + step * 3 + micro) % c.vocab_size);
                tg[i] = (int32_t)((i * 5 + step + 1) % c.vocab_size);
            }
            ck_assert_int_eq(moe_model_forward(m, in, tg, NULL, B, S, (moe_key){(uint64_t)step, (uint32_t)micro, 0},
                                               1, NULL),
                             MOE_OK);
            ck_assert_int_eq(moe_model_backward(m), MOE_OK);
        }
        moe_optim_result r;
        ck_assert_msg(moe_optim_step(o, 0.5, &r) == MOE_OK, "%s", moe_last_error());
        moe_model_stats st;
        ck_assert_int_eq(moe_model_get_stats(m, MOE_SPAN_STEP, &st), MOE_OK);
        losses[step] = st.ce + st.aux_total;
    }
    int64_t at = 0;
    for (int i = 0; i < moe_model_n_params(m); i++) {
        ck_assert_int_eq(moe_model_get_param(m, i, params + at), MOE_OK);
        at += moe_model_param(m, i)->numel;
    }
    moe_optim_free(o);
    moe_model_free(m);
    moe_backend_free(b);
}

START_TEST(test_model_loopback)
{
    moe_model_config c;
    moe_model_config_tiny(&c);
    const int64_t n = moe_model_config_param_count(&c);
    double l0[4], l1[4], *p0 = tu_alloc(n), *p1 = tu_alloc(n);
    train(NULL, l0, p0);
    moe_exchange *ex;
    ck_assert_int_eq(moe_exchange_loopback_create(2, 2, &ex), MOE_OK);
    train(ex, l1, p1);
    same_bits("loss", l1, l0, 4, 0, 2, 2);
    same_bits("parameters", p1, p0, n, 0, 2, 2);
    moe_exchange_free(ex);
    free(p0);
    free(p1);
}
END_TEST

START_TEST(test_bad_splits)
{
    moe_layer_config c;
    config(&c, &variants[0]);
    c.n_experts = 6;
    moe_backend *b;
    ck_assert_int_eq(moe_backend_create("cpu", NULL, &b), MOE_OK);
    moe_exchange *ex;
    moe_layer *L = NULL;
    ck_assert_int_eq(moe_exchange_loopback_create(4, 1, &ex), MOE_OK);
    ck_assert_int_eq(moe_layer_create(&c, b, 16, ex, &L), MOE_ERR_ARG);
    ck_assert_ptr_null(L);
    ck_assert_msg(strstr(moe_last_error(), "6 experts") != NULL, "%s", moe_last_error());
    moe_exchange_free(ex);
    ck_assert_int_eq(moe_exchange_loopback_create(0, 1, &ex), MOE_ERR_ARG);
    ck_assert_int_eq(moe_exchange_loopback_create(2, 0, &ex), MOE_ERR_ARG);
    moe_backend_free(b);
}
END_TEST

int main(void)
{
    Suite *s = suite_create("exchange");
    TCase *tc = tcase_create("loopback");
    tcase_set_timeout(tc, 120);
    tcase_add_loop_test(tc, test_loopback_bits, 0, 2 * NVARIANTS);
    tcase_add_test(tc, test_model_loopback);
    tcase_add_test(tc, test_bad_splits);
    suite_add_tcase(s, tc);
    return tu_run(s);
}
