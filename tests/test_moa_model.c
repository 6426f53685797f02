/*
 * The language model with a mixture of attention heads (attention_experts):
 *  - cpu against ref: logits, losses (the attention routers' aux losses included), every
 *    parameter gradient (<= 1e-5), none of them zero;
 *  - central finite differences of the whole model's loss on ref, a sample of coordinates of
 *    every parameter, skipping those that change a routing plan (MoE or MoA);
 *  - decode through the layers' KV caches gives the full forward's logits;
 *  - cmoe info's counts: total = the parameters the model allocates, active and FLOPs by the
 *    rules of info.h;
 *  - the config keys: written only when used, read back, bad values named;
 *  - a short training run brings the loss down, and gives the same bits at 1 and 3 threads.
 */
#define _POSIX_C_SOURCE 200809L /* setenv */
#include "model/info.h"
#include "model/model.h"
#include "testutil.h"

#include <unistd.h>

/* tiny with MoA in every layer: 4 head experts of head_dim 4, 2 per token; layer 0 dense FFN */
static void tiny_moa(moe_model_config *c)
{
    moe_model_config_tiny(c);
    c->qkv_bias = 0;
    c->attention_experts = 4;
    c->attention_experts_per_tok = 2;
    c->moe.lb_coef = 0.05;
    c->moe.z_coef = 0.01;
}

static void tokens(int32_t *x, int64_t n, int64_t V, uint64_t seed)
{
    for (int64_t i = 0; i < n; i++)
        x[i] = (int32_t)(moe_rand_uniform(seed, 77, 0, (uint32_t)i, 0) * (double)V);
}

static moe_model *make(const moe_model_config *c, const char *backend, int64_t B, int64_t S, moe_backend **bp)
{
    ck_assert_int_eq(moe_backend_create(backend, &(moe_backend_options){.threads = 2}, bp), MOE_OK);
    moe_model *m = NULL;
    moe_status s = moe_model_create(c, *bp, NULL, B, S, &m);
    ck_assert_msg(s == MOE_OK, "%s", moe_last_error());
    return m;
}

static void free_model(moe_model *m, moe_backend *b)
{
    moe_model_free(m);
    moe_backend_free(b);
}

START_TEST(test_cpu_vs_ref)
{
    const int64_t B = 2, S = 7, N = B * S;
    moe_model_config c;
    tiny_moa(&c);
    moe_backend *bc, *br;
    moe_model *mc = make(&c, "cpu", B, S, &bc), *mr = make(&c, "ref", B, S, &br);
    ck_assert_int_eq(moe_model_init(mc, 5), MOE_OK);
    for (int i = 0; i < moe_model_n_params(mc); i++) { /* ref from cpu's fp32 values */
        const moe_param_info *p = moe_model_param(mc, i);
        double *w = tu_alloc(p->numel);
        ck_assert_int_eq(moe_model_get_param(mc, i, w), MOE_OK);
        ck_assert_int_eq(moe_model_set_param(mr, i, w), MOE_OK);
        free(w);
    }
    int32_t in[14], tg[14];
    tokens(in, N, c.vocab_size, 1);
    tokens(tg, N, c.vocab_size, 2);
    double *lc = tu_alloc(N * c.vocab_size), *lr = tu_alloc(N * c.vocab_size);
    tu_nan_fill(lc, N * c.vocab_size);
    ck_assert_int_eq(moe_model_forward(mc, in, NULL, NULL, B, S, MOE_KEY_STEP(1), 1, NULL), MOE_OK);
    ck_assert_int_eq(moe_model_forward(mr, in, NULL, NULL, B, S, MOE_KEY_STEP(1), 1, NULL), MOE_OK);
    ck_assert_int_eq(moe_model_get_logits(mc, lc), MOE_OK);
    ck_assert_int_eq(moe_model_get_logits(mr, lr), MOE_OK);
    double e = tu_rel_err(lc, lr, N * c.vocab_size);
    printf("moa model cpu vs ref: logits %.2e\n", e);
    ck_assert_double_le(e, 1e-5);
    moe_model_losses Lc, Lr;
    moe_model_zero_grad(mc);
    moe_model_zero_grad(mr);
    ck_assert_int_eq(moe_model_forward(mc, in, tg, NULL, B, S, MOE_KEY_STEP(1), 1, &Lc), MOE_OK);
    ck_assert_int_eq(moe_model_forward(mr, in, tg, NULL, B, S, MOE_KEY_STEP(1), 1, &Lr), MOE_OK);
    /* the objective holds every router's losses: the MoE layers' and the attention's */
    double moe_aux = 0;
    for (int64_t l = 0; l < c.num_hidden_layers; l++) {
        moe_model_layer_stats ls;
        ck_assert_int_eq(moe_model_get_layer_stats(mr, l, MOE_SPAN_LAST, &ls, NULL), MOE_OK);
        moe_aux += ls.aux.total;
    }
    printf("moa model: aux %.6f of which the attention routers' %.6f\n", Lr.aux, Lr.aux - moe_aux);
    ck_assert_double_gt(Lr.aux - moe_aux, 1e-4);
    ck_assert_double_le(fabs(Lc.ce - Lr.ce), 1e-5 * fabs(Lr.ce));
    ck_assert_double_le(fabs(Lc.aux - Lr.aux), 1e-5 * fabs(Lr.aux));
    moe_model_stats st;
    ck_assert_int_eq(moe_model_get_stats(mr, MOE_SPAN_LAST, &st), MOE_OK);
    ck_assert_double_le(fabs(st.aux_total - Lr.aux), 1e-12);
    ck_assert_int_eq(moe_model_backward(mc), MOE_OK);
    ck_assert_int_eq(moe_model_backward(mr), MOE_OK);
    double worst = 0;
    int nmoa = 0;
    for (int i = 0; i < moe_model_n_params(mr); i++) {
        const moe_param_info *p = moe_model_param(mr, i);
        double *gc = tu_alloc(p->numel), *gr = tu_alloc(p->numel), nr = 0;
        ck_assert_int_eq(moe_model_get_grad(mc, i, gc), MOE_OK);
        ck_assert_int_eq(moe_model_get_grad(mr, i, gr), MOE_OK);
        for (int64_t j = 0; j < p->numel; j++)
            nr += gr[j] * gr[j];
        ck_assert_msg(nr > 0, "the gradient of %s is zero", p->name);
        e = tu_rel_err(gc, gr, p->numel);
        ck_assert_msg(e <= 1e-5, "gradient of %s: rel err %.2e", p->name, e);
        worst = e > worst ? e : worst;
        nmoa += strstr(p->name, "self_attn.experts.q_proj") != NULL;
        ck_assert(!p->expert || !strstr(p->name, "self_attn")); /* replicated, never sharded */
        free(gc), free(gr);
    }
    ck_assert_int_eq(nmoa, c.num_hidden_layers);
    printf("moa model cpu vs ref: %d gradients, worst %.2e\n", moe_model_n_params(mr), worst);
    free(lc), free(lr);
    free_model(mc, bc);
    free_model(mr, br);
}
END_TEST

/* ---- finite differences -------------------------------------------------------------- */

typedef struct {
    moe_model *m;
    const int32_t *in, *tg;
    int64_t B, S, L;
    moe_plan *p0[2 * MOE_MODEL_MAX_LAYERS], *p1[2 * MOE_MODEL_MAX_LAYERS];
} fd_ctx;

/* every plan of the model (MoE layers, then MoA layers) into ps; NULL slots where absent */
static void plans(fd_ctx *x, moe_plan **ps)
{
    moe_backend *b = moe_model_backend(x->m);
    for (int64_t l = 0; l < x->L; l++) {
        moe_layer *ly = moe_model_moe_layer(x->m, l);
        moe_moa *a = moe_model_moa(x->m, l);
        if (ly)
            ck_assert_int_eq(b->plan_download(b, ps[l], moe_layer_plan(ly)), MOE_OK);
        if (a)
            ck_assert_int_eq(b->plan_download(b, ps[x->L + l], moe_moa_plan(a)), MOE_OK);
    }
}

static int same(const moe_plan *a, const moe_plan *b)
{
    if (a->n != b->n)
        return 0;
    for (int64_t i = 0; i < a->n; i++)
        if (a->token[i] != b->token[i] || a->expert[i] != b->expert[i])
            return 0;
    return 1;
}

static double fd_loss(fd_ctx *x, int *ok)
{
    moe_model_losses L;
    ck_assert_int_eq(moe_model_forward(x->m, x->in, x->tg, NULL, x->B, x->S, MOE_KEY_STEP(0), 1, &L), MOE_OK);
    plans(x, x->p1);
    for (int64_t i = 0; i < 2 * x->L; i++)
        if (x->p0[i] && !same(x->p0[i], x->p1[i]))
            *ok = 0;
    return L.total;
}

START_TEST(test_fd)
{
    const int64_t B = 2, S = 5, N = B * S;
    moe_model_config c;
    tiny_moa(&c);
    c.initializer_range = 0.3; /* no negligible gradient */
    moe_backend *b;
    moe_model *m = make(&c, "ref", B, S, &b);
    ck_assert_int_eq(moe_model_init(m, 11), MOE_OK);
    int32_t in[10], tg[10];
    tokens(in, N, c.vocab_size, 3);
    tokens(tg, N, c.vocab_size, 4);
    fd_ctx x = {.m = m, .in = in, .tg = tg, .B = B, .S = S, .L = c.num_hidden_layers};
    for (int64_t l = 0; l < x.L; l++) {
        moe_layer *ly = moe_model_moe_layer(m, l);
        if (ly) {
            const moe_layer_config *lc = moe_layer_config_of(ly);
            ck_assert_int_eq(moe_plan_create(N * lc->top_k, N, lc->n_experts, lc->top_k, &x.p0[l]), MOE_OK);
            ck_assert_int_eq(moe_plan_create(N * lc->top_k, N, lc->n_experts, lc->top_k, &x.p1[l]), MOE_OK);
        }
        const int64_t E = c.attention_experts, k = c.attention_experts_per_tok;
        ck_assert_int_eq(moe_plan_create(N * k, N, E, k, &x.p0[x.L + l]), MOE_OK);
        ck_assert_int_eq(moe_plan_create(N * k, N, E, k, &x.p1[x.L + l]), MOE_OK);
    }
    moe_model_losses L;
    moe_model_zero_grad(m);
    ck_assert_int_eq(moe_model_forward(m, in, tg, NULL, B, S, MOE_KEY_STEP(0), 1, &L), MOE_OK);
    ck_assert_int_eq(moe_model_backward(m), MOE_OK);
    plans(&x, x.p0);
    int64_t checked = 0, skipped = 0;
    double worst = 0;
    for (int i = 0; i < moe_model_n_params(m); i++) {
        const moe_param_info *p = moe_model_param(m, i);
        double *w = tu_alloc(p->numel), *g = tu_alloc(p->numel), num = 0, den = 0;
        ck_assert_int_eq(moe_model_get_param(m, i, w), MOE_OK);
        ck_assert_int_eq(moe_model_get_grad(m, i, g), MOE_OK);
        const int64_t K = p->numel < 5 ? p->numel : 5;
        for (int64_t j = 0; j < K; j++) {
            const int64_t idx = (j * 7919 + i * 31) % p->numel;
            const double keep = w[idx], h = 1e-5;
            int ok = 1;
            w[idx] = keep + h;
            ck_assert_int_eq(moe_model_set_param(m, i, w), MOE_OK);
            const double lp = fd_loss(&x, &ok);
            w[idx] = keep - h;
            ck_assert_int_eq(moe_model_set_param(m, i, w), MOE_OK);
            const double lm = fd_loss(&x, &ok);
            w[idx] = keep;
            ck_assert_int_eq(moe_model_set_param(m, i, w), MOE_OK);
            if (!ok) {
                skipped++;
                continue;
            }
            checked++;
            const double fd = (lp - lm) / (2 * h);
            num += (fd - g[idx]) * (fd - g[idx]);
            den += g[idx] * g[idx];
        }
        const double rel = den > 0 ? sqrt(num / den) : sqrt(num);
        ck_assert_msg(rel <= 1e-6, "fd: %s rel err %.2e", p->name, rel);
        worst = rel > worst ? rel : worst;
        free(w), free(g);
    }
    printf("moa model fd (ref): worst rel err %.2e, %lld coordinates checked, %lld skipped\n", worst,
           (long long)checked, (long long)skipped);
    ck_assert_int_gt(checked, 60);
    for (int64_t i = 0; i < 2 * x.L; i++) {
        moe_plan_free(x.p0[i]);
        moe_plan_free(x.p1[i]);
    }
    free_model(m, b);
}
END_TEST

/* ---- decode ------------------------------------------------------------------------------- */

static void decode_matches(const char *backend, double tol)
{
    const int64_t S = 9;
    moe_model_config c;
    tiny_moa(&c);
    moe_backend *b;
    moe_model *m = make(&c, backend, 1, S, &b);
    ck_assert_int_eq(moe_model_init(m, 2), MOE_OK);
    int32_t in[9];
    tokens(in, S, c.vocab_size, 5);
    const int64_t V = c.vocab_size;
    double *full = tu_alloc(S * V), *one = tu_alloc(S * V);
    ck_assert_int_eq(moe_model_forward(m, in, NULL, NULL, 1, S, MOE_KEY_STEP(0), 0, NULL), MOE_OK);
    ck_assert_int_eq(moe_model_get_logits(m, full), MOE_OK);
    for (int64_t pos = 0; pos < S; pos++)
        ck_assert_int_eq(moe_model_decode(m, in[pos], pos, one + pos * V), MOE_OK);
    const double e = tu_rel_err(one, full, S * V);
    printf("moa model decode on %s vs forward: %.2e\n", backend, e);
    ck_assert_double_le(e, tol);
    free(full), free(one);
    free_model(m, b);
}

START_TEST(test_decode)
{
    decode_matches("ref", 1e-12);
    decode_matches("cpu", 1e-5);
}
END_TEST

/* ---- counts and config -------------------------------------------------------------------- */

START_TEST(test_info)
{
    moe_model_config c;
    tiny_moa(&c);
    moe_backend *b;
    moe_model *m = make(&c, "ref", 1, 8, &b);
    moe_model_info in;
    ck_assert_int_eq(moe_model_info_compute(&c, 8, &in), MOE_OK);
    ck_assert_int_eq(in.total_params, moe_model_numel(m));
    ck_assert_int_eq(in.total_params, moe_model_config_param_count(&c));
    const int64_t C = c.hidden_size, hd = c.head_dim, E = c.attention_experts, k = c.attention_experts_per_tok;
    const int64_t L = c.num_hidden_layers;
    ck_assert_int_eq(in.attn_expert_params, L * E * 2 * C * hd);
    ck_assert_int_eq(in.attn_params, L * (2 * C * hd + E * 2 * C * hd));
    /* the same model with MHA of k heads: MoA's active attention is its router, one k/v head
     * and k query/output heads, and it attends with k heads */
    moe_model_config mha = c;
    mha.attention_experts = 0;
    mha.num_attention_heads = k;
    mha.num_key_value_heads = 1;
    moe_model_info im;
    ck_assert_int_eq(moe_model_info_compute(&mha, 8, &im), MOE_OK);
    ck_assert_int_eq(in.active_params - im.active_params, L * C * E);
    ck_assert_double_eq_tol(in.flops_fwd - im.flops_fwd, 2.0 * (double)(L * C * E), 1e-6);
    ck_assert_double_eq_tol(in.flops_attn_fwd, im.flops_attn_fwd, 1e-9);
    free_model(m, b);
}
END_TEST

START_TEST(test_config)
{
    moe_model_config c, back;
    tiny_moa(&c);
    char *json;
    ck_assert_int_eq(moe_model_config_to_json(&c, 0, &json), MOE_OK);
    ck_assert_ptr_nonnull(strstr(json, "\"attention_experts\":4"));
    ck_assert_int_eq(moe_model_config_from_json(json, &back), MOE_OK);
    ck_assert_int_eq(back.attention_experts, 4);
    ck_assert_int_eq(back.attention_experts_per_tok, 2);
    free(json);
    moe_model_config_tiny(&c); /* off: the keys are not written, so old configs stay as they were */
    ck_assert_int_eq(moe_model_config_to_json(&c, 0, &json), MOE_OK);
    ck_assert_ptr_null(strstr(json, "attention_experts"));
    free(json);
    static const struct { const char *json, *key; } bad[] = {
        {"{\"attention_experts\": 4, \"attention_experts_per_tok\": 5}", "attention_experts_per_tok"},
        {"{\"attention_experts\": 4, \"attention_experts_per_tok\": 0}", "attention_experts_per_tok"},
        {"{\"attention_experts\": -1}", "attention_experts"},
        {"{\"attention_experts\": 2.5}", "attention_experts"},
        {"{\"attention_experts\": 4, \"qkv_bias\": true}", "qkv_bias"},
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        ck_assert_int_eq(moe_model_config_from_json(bad[i].json, &back), MOE_ERR_ARG);
        ck_assert_msg(strstr(moe_last_error(), bad[i].key), "'%s': the message '%s' does not name %s", bad[i].json,
                      moe_last_error(), bad[i].key);
    }
}
END_TEST

/* ---- training --------------------------------------------------------------------------------- */

START_TEST(test_train)
{
    const int64_t B = 8, S = 16, steps = 150;
    moe_model_config c;
    tiny_moa(&c);
    moe_backend *b;
    moe_model *m = make(&c, "cpu", B, S, &b);
    ck_assert_int_eq(moe_model_init(m, 3), MOE_OK);
    moe_optim_config oc;
    moe_optim_config_default(&oc);
    oc.total_steps = steps;
    oc.warmup_steps = 5;
    moe_optim *opt;
    ck_assert_int_eq(moe_optim_create(m, &oc, &opt), MOE_OK);
    int32_t in[128], tg[128];
    double first = 0, last = 0;
    for (int64_t step = 0; step < steps; step++) {
        /* a learnable task: the next token is the current one plus one, mod V */
        for (int64_t i = 0; i < B * S; i++) {
            in[i] = (int32_t)((step * 7 + i * 3 + (i / S) * 5) % c.vocab_size);
            tg[i] = (in[i] + 1) % (int32_t)c.vocab_size;
        }
        moe_model_zero_grad(m);
        moe_model_losses L;
        ck_assert_int_eq(moe_model_forward(m, in, tg, NULL, B, S, MOE_KEY_STEP(step), 1, &L), MOE_OK);
        ck_assert_int_eq(moe_model_backward(m), MOE_OK);
        ck_assert_int_eq(moe_optim_step(opt, 1.0, NULL), MOE_OK);
        if (step < 5)
            first += L.ce / 5;
        if (step >= steps - 5)
            last += L.ce / 5;
    }
    printf("moa model training: cross-entropy %.3f -> %.3f\n", first, last);
    ck_assert_double_lt(last, 0.5 * first);
    moe_optim_free(opt);
    free_model(m, b);
}
END_TEST

/* the same losses, bit for bit, at 1 and 3 threads (fixed GEMM blocks, fixed sums) */
static void losses_at(int threads, double *out, int steps)
{
    const int64_t B = 4, S = 16;
    moe_model_config c;
    tiny_moa(&c);
    moe_backend *b;
    ck_assert_int_eq(moe_backend_create("cpu", &(moe_backend_options){.threads = threads}, &b), MOE_OK);
    moe_model *m;
    ck_assert_int_eq(moe_model_create(&c, b, NULL, B, S, &m), MOE_OK);
    ck_assert_int_eq(moe_model_init(m, 4), MOE_OK);
    moe_optim_config oc;
    moe_optim_config_default(&oc);
    moe_optim *opt;
    ck_assert_int_eq(moe_optim_create(m, &oc, &opt), MOE_OK);
    int32_t in[64], tg[64];
    for (int step = 0; step < steps; step++) {
        tokens(in, B * S, c.vocab_size, 100 + (uint64_t)step);
        tokens(tg, B * S, c.vocab_size, 200 + (uint64_t)step);
        moe_model_zero_grad(m);
        moe_model_losses L;
        ck_assert_int_eq(moe_model_forward(m, in, tg, NULL, B, S, MOE_KEY_STEP(step), 1, &L), MOE_OK);
        ck_assert_int_eq(moe_model_backward(m), MOE_OK);
        ck_assert_int_eq(moe_optim_step(opt, 1.0, NULL), MOE_OK);
        out[step] = L.total;
    }
    moe_optim_free(opt);
    free_model(m, b);
}

START_TEST(test_threads)
{
    double a[4], b[4];
    losses_at(1, a, 4);
    losses_at(3, b, 4);
    for (int i = 0; i < 4; i++)
        ck_assert_msg(a[i] == b[i], "step %d: loss %.17g at 1 thread, %.17g at 3", i, a[i], b[i]);
}
END_TEST

int main(int argc, char **argv)
{
    (void)argc;
    if (!getenv("OMP_WAIT_POLICY")) { /* spinning OpenMP threads cost 10x on a loaded machine */
        setenv("OMP_WAIT_POLICY", "passive", 1);
        execv("/proc/self/exe", argv);
    }
    Suite *s = suite_create("moa_model");
    TCase *t = tcase_create("moa_model");
    tcase_set_timeout(t, 300);
    tcase_add_test(t, test_cpu_vs_ref);
    tcase_add_test(t, test_fd);
    tcase_add_test(t, test_decode);
    tcase_add_test(t, test_info);
    tcase_add_test(t, test_config);
    tcase_add_test(t, test_train);
    tcase_add_test(t, test_threads);
    suite_add_tcase(s, t);
    return tu_run(s);
}
