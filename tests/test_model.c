/*
 * The MoE language model (src/model/model.c) and AdamW (src/model/optim.c):
 *  - cpu against ref on the whole model: logits, loss, every parameter gradient (<= 1e-5),
 *    from the same (fp32-representable) parameters;
 *  - central finite differences of the whole model's loss in ref (double), a sample of
 *    coordinates of every parameter tensor, skipping (and counting) those whose routing
 *    plan changes;
 *  - 50 AdamW steps on the synthetic tasks bring the loss under a bound;
 *  - the same seed gives bitwise-identical losses at every step, twice;
 *  - decode through the KV cache gives the full forward's logits at every position;
 *  - bad model configs are rejected, naming the key.
 */
#define _POSIX_C_SOURCE 200809L /* setenv */
#include "io/data.h"
#include "model/model.h"
#include "testutil.h"

#include <unistd.h>

/* Spin-waiting OpenMP threads cost 10x on a loaded 2-core machine; see test_cpu_layer.c. */
static void passive_omp(char **argv)
{
    if (getenv("OMP_WAIT_POLICY"))
        return;
    setenv("OMP_WAIT_POLICY", "passive", 1);
    execv("/proc/self/exe", argv);
}

/* tiny: layer 0 dense, layers 1-2 MoE with 4 and 6 experts, GQA 4/2, q/k/v biases */
static void tiny(moe_model_config *c)
{
    moe_model_config_tiny(c);
    c->moe.lb_coef = 0.01;
    c->moe.z_coef = 0.001;
}

/* a second shape: tied embeddings, GELU, MoE every 2nd layer with shared experts, MHA */
static void tiny2(moe_model_config *c)
{
    moe_model_config_tiny(c);
    c->num_hidden_layers = 4;
    c->n_experts_per_layer = 0;
    c->first_k_dense_replace = 0;
    c->decoder_sparse_step = 2;
    c->num_key_value_heads = 4;
    c->qkv_bias = 0;
    c->tie_word_embeddings = 1;
    c->moe.act = MOE_ACT_GELU;
    c->moe.n_shared = 1;
    c->moe.shared_gate = 1;
    c->moe.top_k = 2;
    c->moe.n_experts = 4;
    c->moe.importance_coef = 0.01;
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
    if (s)
        fprintf(stderr, "%s\n", moe_last_error());
    ck_assert_int_eq(s, MOE_OK);
    return m;
}

/* Copies every parameter of `from` into `to` (both the same config). */
static void copy_params(moe_model *to, moe_model *from)
{
    ck_assert_int_eq(moe_model_n_params(to), moe_model_n_params(from));
    for (int i = 0; i < moe_model_n_params(from); i++) {
        const moe_param_info *p = moe_model_param(from, i);
        double *w = tu_alloc(p->numel);
        ck_assert_int_eq(moe_model_get_param(from, i, w), MOE_OK);
        ck_assert_int_eq(moe_model_set_param(to, i, w), MOE_OK);
        free(w);
    }
}

static void cpu_vs_ref(void (*cfg)(moe_model_config *))
{
    const int64_t B = 2, S = 7;
    moe_model_config c;
    cfg(&c);
    moe_backend *bc, *br;
    moe_model *mc = make(&c, "cpu", B, S, &bc), *mr = make(&c, "ref", B, S, &br);
    ck_assert_int_eq(moe_model_init(mc, 5), MOE_OK);
    copy_params(mr, mc); /* ref starts from the fp32-rounded values */
    const int64_t N = B * S, V = c.vocab_size;
    int32_t in[14], tg[14];
    tokens(in, N, V, 1);
    tokens(tg, N, V, 2);
    tg[3] = -1;
    double *lc = tu_alloc(N * V), *lr = tu_alloc(N * V);
    tu_nan_fill(lc, N * V);
    ck_assert_int_eq(moe_model_forward(mc, in, NULL, NULL, B, S, MOE_KEY_STEP(3), 1, NULL), MOE_OK);
    ck_assert_int_eq(moe_model_forward(mr, in, NULL, NULL, B, S, MOE_KEY_STEP(3), 1, NULL), MOE_OK);
    ck_assert_int_eq(moe_model_get_logits(mc, lc), MOE_OK);
    ck_assert_int_eq(moe_model_get_logits(mr, lr), MOE_OK);
    double e = tu_rel_err(lc, lr, N * V);
    printf("cpu vs ref: logits rel err %.2e\n", e);
    ck_assert_double_le(e, 1e-5);

    moe_model_losses Lc, Lr;
    moe_model_zero_grad(mc);
    moe_model_zero_grad(mr);
    ck_assert_int_eq(moe_model_forward(mc, in, tg, NULL, B, S, MOE_KEY_STEP(3), 1, &Lc), MOE_OK);
    ck_assert_int_eq(moe_model_forward(mr, in, tg, NULL, B, S, MOE_KEY_STEP(3), 1, &Lr), MOE_OK);
    ck_assert_int_eq(Lr.n_targets, N - 1);
    ck_assert(Lr.aux > 0);
    printf("cpu vs ref: ce %.9f vs %.9f, aux %.3e vs %.3e\n", Lc.ce, Lr.ce, Lc.aux, Lr.aux);
    ck_assert_double_le(fabs(Lc.ce - Lr.ce), 1e-5 * fabs(Lr.ce));
    ck_assert_double_le(fabs(Lc.aux - Lr.aux), 1e-5 * fabs(Lr.aux));
    ck_assert_int_eq(moe_model_backward(mc), MOE_OK);
    ck_assert_int_eq(moe_model_backward(mr), MOE_OK);
    double worst = 0;
    const char *wname = "";
    for (int i = 0; i < moe_model_n_params(mr); i++) {
        const moe_param_info *p = moe_model_param(mr, i);
        double *gc = tu_alloc(p->numel), *gr = tu_alloc(p->numel);
        tu_nan_fill(gc, p->numel);
        ck_assert_int_eq(moe_model_get_grad(mc, i, gc), MOE_OK);
        ck_assert_int_eq(moe_model_get_grad(mr, i, gr), MOE_OK);
        double err = tu_rel_err(gc, gr, p->numel), nr = 0;
        for (int64_t j = 0; j < p->numel; j++)
            nr += gr[j] * gr[j];
        if (nr == 0) /* a gradient that is exactly zero would hide a missing path */
            ck_abort_msg("gradient of %s is zero", p->name);
        if (err > worst) {
            worst = err;
            wname = p->name;
        }
        if (err > 1e-5)
            ck_abort_msg("gradient of %s: rel err %.2e", p->name, err);
        free(gc);
        free(gr);
    }
    printf("cpu vs ref: %d parameter gradients, worst rel err %.2e (%s)\n", moe_model_n_params(mr), worst, wname);
    free(lc);
    free(lr);
    moe_model_free(mc);
    moe_model_free(mr);
    moe_backend_free(bc);
    moe_backend_free(br);
}

START_TEST(test_cpu_vs_ref)
{
    cpu_vs_ref(tiny);
}
END_TEST

START_TEST(test_cpu_vs_ref_variant)
{
    cpu_vs_ref(tiny2);
}
END_TEST

/* ---- finite differences in ref ------------------------------------------------------ */

typedef struct {
    moe_model *m;
    const int32_t *in, *tg;
    int64_t B, S;
    int pi;         /* the perturbed parameter */
    double *w;      /* its host values, perturbed in place by tu_fd_check */
    moe_plan *plan0[MOE_MODEL_MAX_LAYERS], *plan1[MOE_MODEL_MAX_LAYERS];
} fd_ctx;

static int same_plan(const moe_plan *a, const moe_plan *b)
{
    if (a->n != b->n || a->dropped != b->dropped)
        return 0;
    for (int64_t i = 0; i < a->n; i++)
        if (a->token[i] != b->token[i] || a->expert[i] != b->expert[i])
            return 0;
    return 1;
}

static double fd_loss(void *vctx, int *ok)
{
    fd_ctx *x = vctx;
    ck_assert_int_eq(moe_model_set_param(x->m, x->pi, x->w), MOE_OK);
    moe_model_losses L;
    ck_assert_int_eq(moe_model_forward(x->m, x->in, x->tg, NULL, x->B, x->S, MOE_KEY_STEP(0), 1, &L), MOE_OK);
    moe_backend *b = moe_model_backend(x->m);
    for (int64_t l = 0; l < moe_model_config_of(x->m)->num_hidden_layers; l++) {
        moe_layer *ly = moe_model_moe_layer(x->m, l);
        if (!ly)
            continue;
        ck_assert_int_eq(b->plan_download(b, x->plan1[l], moe_layer_plan(ly)), MOE_OK);
        if (!same_plan(x->plan0[l], x->plan1[l]))
            *ok = 0;
    }
    return L.total;
}

START_TEST(test_fd)
{
    const int64_t B = 2, S = 5, N = B * S;
    moe_model_config c;
    tiny(&c);
    c.moe.jitter_eps = 0;
    /* a larger init than 0.02 so that no gradient is negligible */
    c.initializer_range = 0.3;
    moe_backend *b;
    moe_model *m = make(&c, "ref", B, S, &b);
    ck_assert_int_eq(moe_model_init(m, 11), MOE_OK);
    int32_t in[10], tg[10];
    tokens(in, N, c.vocab_size, 3);
    tokens(tg, N, c.vocab_size, 4);
    fd_ctx x = {.m = m, .in = in, .tg = tg, .B = B, .S = S};
    moe_model_losses L;
    moe_model_zero_grad(m);
    ck_assert_int_eq(moe_model_forward(m, in, tg, NULL, B, S, MOE_KEY_STEP(0), 1, &L), MOE_OK);
    ck_assert_int_eq(moe_model_backward(m), MOE_OK);
    for (int64_t l = 0; l < c.num_hidden_layers; l++) {
        moe_layer *ly = moe_model_moe_layer(m, l);
        if (!ly)
            continue;
        const moe_layer_config *lc = moe_layer_config_of(ly);
        ck_assert_int_eq(moe_plan_create(N * lc->top_k, N, lc->n_experts, lc->top_k, &x.plan0[l]), MOE_OK);
        ck_assert_int_eq(b->plan_download(b, x.plan0[l], moe_layer_plan(ly)), MOE_OK);
        ck_assert_int_eq(moe_plan_create(N * lc->top_k, N, lc->n_experts, lc->top_k, &x.plan1[l]), MOE_OK);
    }
    tu_fd_stats st = {0};
    double worst = 0;
    const char *wname = "";
    for (int i = 0; i < moe_model_n_params(m); i++) {
        const moe_param_info *p = moe_model_param(m, i);
        double *w = tu_alloc(p->numel), *g = tu_alloc(p->numel);
        ck_assert_int_eq(moe_model_get_param(m, i, w), MOE_OK);
        ck_assert_int_eq(moe_model_get_grad(m, i, g), MOE_OK);
        x.pi = i;
        x.w = w;
        /* a sample of up to 5 coordinates spread over the tensor, central differences */
        const int64_t K = p->numel < 5 ? p->numel : 5;
        double num = 0, den = 0;
        for (int64_t j = 0; j < K; j++) {
            const int64_t idx = (j * 7919 + i * 31) % p->numel;
            const double keep = w[idx], h = 1e-5;
            int ok = 1;
            w[idx] = keep + h;
            double lp = fd_loss(&x, &ok);
            w[idx] = keep - h;
            double lm = fd_loss(&x, &ok);
            w[idx] = keep;
            if (!ok) {
                st.skipped++;
                continue;
            }
            st.checked++;
            double fd = (lp - lm) / (2 * h);
            num += (fd - g[idx]) * (fd - g[idx]);
            den += g[idx] * g[idx];
        }
        double rel = den > 0 ? sqrt(num / den) : sqrt(num);
        if (rel > worst) {
            worst = rel;
            wname = p->name;
        }
        if (rel > 1e-6)
            ck_abort_msg("fd: %s rel err %.2e", p->name, rel);
        ck_assert_int_eq(moe_model_set_param(m, i, w), MOE_OK);
        free(w);
        free(g);
    }
    printf("fd: whole model (ref) worst rel err %.2e (%s), %lld coordinates checked, skipped %lld\n", worst, wname,
           (long long)st.checked, (long long)st.skipped);
    ck_assert_int_gt(st.checked, 50);
    for (int64_t l = 0; l < c.num_hidden_layers; l++)
    {
        moe_plan_free(x.plan0[l]);
        moe_plan_free(x.plan1[l]);
    }
    moe_model_free(m);
    moe_backend_free(b);
}
END_TEST

/* ---- training ------------------------------------------------------------------------- */

/* Trains `steps` steps of AdamW on synth; losses[step] = training loss (total). */
static void train(const char *backend, int steps, double *losses, double *val)
{
    const int64_t B = 8, S = 16;
    moe_model_config c;
    tiny(&c);
    c.hidden_size = 32;
    c.moe_intermediate_size = 32;
    c.intermediate_size = 64;
    c.head_dim = 8;
    c.moe.d_model = 32;
    c.moe.d_ff = 32;
    moe_dataset *d;
    ck_assert_int_eq(moe_dataset_open("synth", NULL, &d), MOE_OK);
    ck_assert_int_eq(moe_dataset_vocab(d), c.vocab_size);
    moe_backend *b;
    moe_model *m = make(&c, backend, B, S, &b);
    ck_assert_int_eq(moe_model_init(m, 42), MOE_OK);
    moe_optim_config oc;
    moe_optim_config_default(&oc);
    oc.lr = 1e-2;
    oc.warmup_steps = 5;
    oc.total_steps = steps;
    moe_optim *o;
    ck_assert_int_eq(moe_optim_create(m, &oc, &o), MOE_OK);
    int32_t in[128], tg[128], task[128];
    for (int step = 0; step < steps; step++) {
        moe_model_zero_grad(m);
        double tot = 0;
        for (int micro = 0; micro < 2; micro++) { /* gradient accumulation over 2 micro-batches */
            ck_assert_int_eq(moe_dataset_batch(d, 7, step, micro, B, S, in, tg, task), MOE_OK);
            moe_model_losses L;
            ck_assert_int_eq(moe_model_forward(m, in, tg, task, B, S, MOE_KEY_STEP((uint64_t)step), 1, &L), MOE_OK);
            ck_assert_int_eq(moe_model_backward(m), MOE_OK);
            tot += L.total / 2;
        }
        moe_optim_result r;
        ck_assert_int_eq(moe_optim_step(o, 0.5, &r), MOE_OK);
        ck_assert(isfinite(r.grad_norm) && r.lr > 0);
        losses[step] = tot;
    }
    ck_assert_int_eq(moe_optim_steps(o), steps);
    /* validation: the held-out synth sequences */
    moe_val_iter it;
    moe_val_iter_init(&it);
    int64_t n;
    double sum = 0, cnt = 0;
    while (moe_dataset_val_next(d, &it, B, S, in, tg, NULL, &n) == MOE_OK && n > 0) {
        moe_model_losses L;
        ck_assert_int_eq(moe_model_forward(m, in, tg, NULL, B, S, MOE_KEY_STEP(0), 0, &L), MOE_OK);
        sum += L.ce * (double)L.n_targets;
        cnt += (double)L.n_targets;
    }
    *val = sum / cnt;
    moe_model_stats ms;
    ck_assert_int_eq(moe_model_get_stats(m, MOE_SPAN_LAST, &ms), MOE_OK);
    ck_assert_int_eq(ms.n_moe_layers, 2);
    ck_assert(ms.load_max_over_mean >= 1.0);
    moe_optim_free(o);
    moe_model_free(m);
    moe_backend_free(b);
    moe_dataset_free(d);
}

#define TRAIN_STEPS 50
/* ln 32 = 3.47 at the start; measured 0.86 (train) and 0.94 (validation) after 50 steps. */
#define TRAIN_BOUND 2.0

START_TEST(test_train_synth)
{
    double l1[TRAIN_STEPS], l2[TRAIN_STEPS], v1, v2;
    train("cpu", TRAIN_STEPS, l1, &v1);
    printf("train (cpu, synth): loss %.4f at step 0, %.4f at step %d, validation ce %.4f (bound %.1f)\n", l1[0],
           l1[TRAIN_STEPS - 1], TRAIN_STEPS - 1, v1, TRAIN_BOUND);
    ck_assert_double_gt(l1[0], 3.0);
    ck_assert_double_lt(l1[TRAIN_STEPS - 1], TRAIN_BOUND);
    ck_assert_double_lt(v1, TRAIN_BOUND);
    train("cpu", TRAIN_STEPS, l2, &v2);
    for (int i = 0; i < TRAIN_STEPS; i++)
        if (memcmp(&l1[i], &l2[i], sizeof l1[i]) != 0)
            ck_abort_msg("cpu: step %d loss %.17g then %.17g: not bitwise identical", i, l1[i], l2[i]);
    ck_assert(memcmp(&v1, &v2, sizeof v1) == 0);
}
END_TEST

START_TEST(test_train_ref_deterministic)
{
    double l1[8], l2[8], v1, v2;
    train("ref", 8, l1, &v1);
    train("ref", 8, l2, &v2);
    for (int i = 0; i < 8; i++)
        if (memcmp(&l1[i], &l2[i], sizeof l1[i]) != 0)
            ck_abort_msg("ref: step %d loss %.17g then %.17g: not bitwise identical", i, l1[i], l2[i]);
    ck_assert_double_lt(l1[7], l1[0]);
}
END_TEST

/* ---- decode ------------------------------------------------------------------------------ */

static void decode_matches(const char *backend, double tol)
{
    const int64_t S = 12;
    moe_model_config c;
    tiny(&c);
    moe_backend *b;
    moe_model *m = make(&c, backend, 2, S, &b);
    ck_assert_int_eq(moe_model_init(m, 9), MOE_OK);
    const int64_t V = c.vocab_size;
    int32_t in[12];
    tokens(in, S, V, 8);
    double *full = tu_alloc(S * V), *one = tu_alloc(V);
    ck_assert_int_eq(moe_model_forward(m, in, NULL, NULL, 1, S, MOE_KEY_STEP(0), 0, NULL), MOE_OK);
    ck_assert_int_eq(moe_model_get_logits(m, full), MOE_OK);
    double worst = 0;
    for (int64_t p = 0; p < S; p++) {
        tu_nan_fill(one, V);
        ck_assert_int_eq(moe_model_decode(m, in[p], p, one), MOE_OK);
        double e = tu_rel_err(one, full + p * V, V);
        worst = e > worst ? e : worst;
        if (e > tol)
            ck_abort_msg("%s decode: position %lld rel err %.2e", backend, (long long)p, e);
    }
    printf("decode (%s): worst rel err against the full forward %.2e over %lld positions\n", backend, worst,
           (long long)S);
    ck_assert_int_ne(moe_model_backward(m), MOE_OK); /* decode invalidated the saved forward */
    free(full);
    free(one);
    moe_model_free(m);
    moe_backend_free(b);
}

START_TEST(test_decode)
{
    decode_matches("ref", 1e-12);
    decode_matches("cpu", 1e-5);
}
END_TEST

/* ---- config ------------------------------------------------------------------------------- */

static void bad(const char *json, const char *key)
{
    moe_model_config c;
    moe_status s = moe_model_config_from_json(json, &c);
    ck_assert_int_ne(s, MOE_OK);
    if (!strstr(moe_last_error(), key))
        ck_abort_msg("config %s: message '%s' does not name %s", json, moe_last_error(), key);
}

START_TEST(test_config)
{
    bad("{\"vocab_size\": 1}", "vocab_size");
    bad("{\"num_key_value_heads\": 3}", "num_key_value_heads");
    bad("{\"num_hidden_layers\": 0}", "num_hidden_layers");
    bad("{\"num_hidden_layers\": 1000}", "num_hidden_layers");
    bad("{\"head_dim\": 7}", "head_dim");
    bad("{\"rope_theta\": \"big\"}", "rope_theta");
    bad("{\"rms_norm_eps\": 0}", "rms_norm_eps");
    bad("{\"tie_word_embeddings\": 1}", "tie_word_embeddings");
    bad("{\"num_experts_per_layer\": [8, 8]}", "num_experts_per_layer");
    bad("{\"num_experts_per_layer\": [8, 8, -1, 8]}", "num_experts_per_layer");
    bad("{\"num_experts_per_layer\": [8, 1, 8, 8]}", "num_experts_per_tok");
    bad("{\"first_k_dense_replace\": 9}", "first_k_dense_replace");
    bad("{\"decoder_sparse_step\": 0}", "decoder_sparse_step");
    bad("{\"hidden_size\": 0}", "hidden_size");
    bad("{\"num_local_experts\": 1}", "num_experts_per_tok");
    bad("{\"hiden_size\": 64}", "hiden_size");
    bad("{\"initializer_range\": -1}", "initializer_range");
    bad("{\"initializer_range\": 1e300}", "initializer_range"); /* overflowed the first forward */
    bad("{\"initializer_range\": 2}", "initializer_range");
    bad("{\"switch_init_scale\": 1e6}", "switch_init_scale");
    bad("{\"bias_update_rate\": 5}", "bias_update_rate");
    bad("{\"hidden_act\": \"tanh\"}", "hidden_act");
    bad("[1, 2]", "object");

    /* round trip, and the Mixtral reading of intermediate_size */
    moe_model_config c, d;
    moe_model_config_tiny(&c);
    c.switch_init_scale = 0.1;
    char *j;
    ck_assert_int_eq(moe_model_config_to_json(&c, 1, &j), MOE_OK);
    ck_assert_int_eq(moe_model_config_from_json(j, &d), MOE_OK);
    free(j);
    ck_assert_int_eq(d.hidden_size, c.hidden_size);
    ck_assert_int_eq(d.intermediate_size, c.intermediate_size);
    ck_assert_int_eq(d.moe_intermediate_size, c.moe_intermediate_size);
    ck_assert_int_eq(d.n_experts_per_layer, 3);
    ck_assert_int_eq(d.num_experts_per_layer[2], 6);
    ck_assert_int_eq(d.num_key_value_heads, 2);
    ck_assert_int_eq(d.qkv_bias, 1);
    ck_assert_double_eq(d.switch_init_scale, 0.1);
    ck_assert_int_eq(moe_model_config_param_count(&c), moe_model_config_param_count(&d));
    ck_assert_int_eq(moe_model_config_from_json("{\"intermediate_size\": 96}", &d), MOE_OK);
    ck_assert_int_eq(d.moe_intermediate_size, 96);
    ck_assert_int_eq(moe_model_layer_experts(&d, 0), 8);

    /* the layer rule: first_k_dense_replace, decoder_sparse_step, per-layer counts */
    moe_model_config_default(&c);
    c.num_hidden_layers = 6;
    c.first_k_dense_replace = 1;
    c.decoder_sparse_step = 2;
    ck_assert_int_eq(moe_model_layer_experts(&c, 0), 0);
    ck_assert_int_eq(moe_model_layer_experts(&c, 1), 8);
    ck_assert_int_eq(moe_model_layer_experts(&c, 2), 0);
    ck_assert_int_eq(moe_model_layer_experts(&c, 5), 8);

    /* the model's parameter count agrees with the config's */
    moe_model_config_tiny(&c);
    moe_backend *b;
    moe_model *m = make(&c, "cpu", 1, 4, &b);
    ck_assert_int_eq(moe_model_numel(m), moe_model_config_param_count(&c));
    ck_assert_int_ge(moe_model_param_index(m, "model.layers.1.block_sparse_moe.experts.w1"), 0);
    ck_assert_int_ge(moe_model_param_index(m, "model.layers.0.mlp.down_proj.weight"), 0);
    ck_assert_int_ge(moe_model_param_index(m, "lm_head.weight"), 0);
    int i = moe_model_param_index(m, "model.layers.0.input_layernorm.weight");
    ck_assert_int_eq(moe_model_param(m, i)->decay, 0);
    i = moe_model_param_index(m, "model.layers.0.self_attn.q_proj.bias");
    ck_assert_int_eq(moe_model_param(m, i)->decay, 0);
    i = moe_model_param_index(m, "model.layers.0.self_attn.q_proj.weight");
    ck_assert_int_eq(moe_model_param(m, i)->decay, 1);
    /* bad ids are rejected */
    int32_t in[4] = {0, 1, 2, 32}, tg[4] = {0, 1, 2, -2};
    ck_assert_int_ne(moe_model_forward(m, in, NULL, NULL, 1, 4, MOE_KEY_STEP(0), 1, NULL), MOE_OK);
    ck_assert_ptr_nonnull(strstr(moe_last_error(), "inputs[3]"));
    in[3] = 3;
    ck_assert_int_ne(moe_model_forward(m, in, tg, NULL, 1, 4, MOE_KEY_STEP(0), 1, NULL), MOE_OK);
    ck_assert_ptr_nonnull(strstr(moe_last_error(), "targets[3]"));
    ck_assert_int_ne(moe_model_forward(m, in, NULL, NULL, 2, 4, MOE_KEY_STEP(0), 1, NULL), MOE_OK);
    moe_model_free(m);
    moe_backend_free(b);
}
END_TEST

START_TEST(test_schedule)
{
    moe_optim_config o;
    moe_optim_config_default(&o);
    o.lr = 1.0;
    o.warmup_steps = 10;
    o.total_steps = 110;
    o.min_lr_ratio = 0.1;
    ck_assert_double_eq_tol(moe_lr_at(&o, 0), 0.1, 1e-15);
    ck_assert_double_eq_tol(moe_lr_at(&o, 9), 1.0, 1e-15);
    ck_assert_double_eq_tol(moe_lr_at(&o, 10), 1.0, 1e-15);
    ck_assert_double_eq_tol(moe_lr_at(&o, 60), 0.55, 1e-12);
    ck_assert_double_eq_tol(moe_lr_at(&o, 110), 0.1, 1e-15);
    ck_assert_double_eq_tol(moe_lr_at(&o, 500), 0.1, 1e-15);
    o.total_steps = 0;
    ck_assert_double_eq_tol(moe_lr_at(&o, 500), 1.0, 1e-15);
    o.beta1 = 1.0;
    ck_assert_int_ne(moe_optim_config_validate(&o), MOE_OK);
}
END_TEST

/* the optimizer's keys: finite and in the ranges where AdamW is AdamW, each named */
START_TEST(test_optim_ranges)
{
    static const struct { double lr, eps, wd, b1, b2; const char *key; } cases[] = {
        {1e308, 1e-8, 0.1, 0.9, 0.95, "lr"}, {2, 1e-8, 0.1, 0.9, 0.95, "lr"},
        {-1, 1e-8, 0.1, 0.9, 0.95, "lr"},    {NAN, 1e-8, 0.1, 0.9, 0.95, "lr"},
        {1e-3, 0, 0.1, 0.9, 0.95, "eps"},    {1e-3, 1e300, 0.1, 0.9, 0.95, "eps"},
        {1e-3, NAN, 0.1, 0.9, 0.95, "eps"},  {0.5, 1e-8, 3, 0.9, 0.95, "weight_decay"},
        {1e-3, 1e-8, NAN, 0.9, 0.95, "weight_decay"}, {1e-3, 1e-8, 0.1, 1, 0.95, "beta1"},
        {1e-3, 1e-8, 0.1, 0.9, NAN, "beta2"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        moe_optim_config o;
        moe_optim_config_default(&o);
        o.lr = cases[i].lr;
        o.eps = cases[i].eps;
        o.weight_decay = cases[i].wd;
        o.beta1 = cases[i].b1;
        o.beta2 = cases[i].b2;
        ck_assert_int_eq(moe_optim_config_validate(&o), MOE_ERR_ARG);
        ck_assert_msg(strstr(moe_last_error(), cases[i].key), "case %zu: '%s' does not name %s", i, moe_last_error(),
                      cases[i].key);
    }
    moe_optim_config o;
    moe_optim_config_default(&o);
    o.lr = 1;
    o.weight_decay = 1;
    ck_assert_int_eq(moe_optim_config_validate(&o), MOE_OK); /* the edges are allowed */
}
END_TEST

/* What the divergence message of cmoe train says: the first non-finite parameter or
 * gradient by name and element, or the largest |parameter| when all are finite */
START_TEST(test_explain_nonfinite)
{
    moe_model_config c;
    moe_model_config_tiny(&c);
    moe_backend *b;
    moe_model *m = make(&c, "cpu", 1, 4, &b);
    ck_assert_int_eq(moe_model_init(m, 5), MOE_OK);
    moe_model_zero_grad(m);
    char why[512];
    int found = -1;
    ck_assert_int_eq(moe_model_explain_nonfinite(m, 0, why, sizeof why, &found), MOE_OK);
    ck_assert_int_eq(found, 0);
    ck_assert_msg(strstr(why, "every parameter is finite") && strstr(why, "largest |parameter|"), "%s", why);
    ck_assert_int_eq(moe_model_explain_nonfinite(m, 1, why, sizeof why, &found), MOE_OK);
    ck_assert_msg(!found && strstr(why, "every gradient is finite"), "%s", why);
    /* a NaN weight and an infinite gradient, each named with its element */
    const int pi = moe_model_param_index(m, "model.layers.1.block_sparse_moe.experts.w2");
    const moe_param_info *p = moe_model_param(m, pi);
    double *v = tu_alloc(p->numel);
    ck_assert_int_eq(moe_model_get_param(m, pi, v), MOE_OK);
    v[7] = NAN;
    ck_assert_int_eq(moe_model_set_param(m, pi, v), MOE_OK);
    ck_assert_int_eq(moe_model_explain_nonfinite(m, 0, why, sizeof why, &found), MOE_OK);
    ck_assert_msg(found && strstr(why, "parameter 'model.layers.1.block_sparse_moe.experts.w2'") &&
                      strstr(why, "element 7 ") && strstr(why, "nan"), "%s", why);
    moe_tensor g;
    ck_assert_int_eq(moe_model_param_tensors(m, 0, NULL, &g), MOE_OK);
    double *gz = calloc((size_t)moe_model_param(m, 0)->numel, sizeof *gz);
    gz[3] = -INFINITY;
    ck_assert_int_eq(moe_upload_f64(b, g, gz, moe_model_param(m, 0)->numel), MOE_OK);
    ck_assert_int_eq(moe_model_explain_nonfinite(m, 1, why, sizeof why, &found), MOE_OK);
    ck_assert_msg(found && strstr(why, moe_model_param(m, 0)->name) && strstr(why, "element 3 ") &&
                      strstr(why, "-inf"), "%s", why);
    free(gz);
    free(v);
    moe_model_free(m);
    moe_backend_free(b);
}
END_TEST

/* Switch's init: truncated normal, σ = sqrt(scale / fan_in), nothing beyond 2σ */
START_TEST(test_switch_init)
{
    moe_model_config c;
    moe_model_config_default(&c);
    c.num_hidden_layers = 1;
    c.switch_init_scale = 0.1;
    moe_backend *b;
    moe_model *m = make(&c, "ref", 1, 4, &b);
    ck_assert_int_eq(moe_model_init(m, 3), MOE_OK);
    const struct { const char *name; int64_t fan_in; } t[] = {
        {"model.layers.0.self_attn.q_proj.weight", 128},
        {"model.layers.0.block_sparse_moe.experts.w2", 256},
        {"lm_head.weight", 128},
    };
    for (int k = 0; k < 3; k++) {
        int i = moe_model_param_index(m, t[k].name);
        ck_assert_int_ge(i, 0);
        const moe_param_info *p = moe_model_param(m, i);
        double *w = tu_alloc(p->numel), ss = 0, mx = 0;
        ck_assert_int_eq(moe_model_get_param(m, i, w), MOE_OK);
        for (int64_t j = 0; j < p->numel; j++) {
            ss += w[j] * w[j];
            mx = fabs(w[j]) > mx ? fabs(w[j]) : mx;
        }
        const double sd = sqrt(0.1 / (double)t[k].fan_in), got = sqrt(ss / (double)p->numel);
        /* a normal truncated at ±2σ has standard deviation 0.880σ */
        ck_assert_double_le(fabs(got / sd - 0.880), 0.02);
        ck_assert_double_le(mx, 2 * sd);
        free(w);
    }
    int i = moe_model_param_index(m, "model.norm.weight");
    double nw[128];
    ck_assert_int_eq(moe_model_get_param(m, i, nw), MOE_OK);
    ck_assert_double_eq(nw[5], 1.0);
    moe_model_free(m);
    moe_backend_free(b);
}
END_TEST

/* Gradient accumulation: two half batches with grad_scale 1/2 step exactly like one batch
 * (a dense model, whose loss is a plain mean over tokens; in double, to rounding). */
START_TEST(test_accumulation)
{
    moe_model_config c;
    tiny(&c);
    c.first_k_dense_replace = 3;
    c.n_experts_per_layer = 0;
    moe_backend *b1, *b2;
    moe_model *m1 = make(&c, "ref", 4, 6, &b1), *m2 = make(&c, "ref", 4, 6, &b2);
    ck_assert_int_eq(moe_model_init(m1, 2), MOE_OK);
    ck_assert_int_eq(moe_model_init(m2, 2), MOE_OK);
    int32_t in[24], tg[24];
    tokens(in, 24, c.vocab_size, 5);
    tokens(tg, 24, c.vocab_size, 6);
    moe_optim_config oc;
    moe_optim_config_default(&oc);
    oc.grad_clip = 0.5; /* active: the clip must see the averaged gradient */
    moe_optim *o1, *o2;
    ck_assert_int_eq(moe_optim_create(m1, &oc, &o1), MOE_OK);
    ck_assert_int_eq(moe_optim_create(m2, &oc, &o2), MOE_OK);
    moe_model_zero_grad(m1);
    moe_model_zero_grad(m2);
    ck_assert_int_eq(moe_model_forward(m1, in, tg, NULL, 4, 6, MOE_KEY_STEP(0), 1, NULL), MOE_OK);
    ck_assert_int_eq(moe_model_backward(m1), MOE_OK);
    for (int h = 0; h < 2; h++) {
        ck_assert_int_eq(moe_model_forward(m2, in + 12 * h, tg + 12 * h, NULL, 2, 6, MOE_KEY_STEP(0), 1, NULL), MOE_OK);
        ck_assert_int_eq(moe_model_backward(m2), MOE_OK);
    }
    moe_optim_result r1, r2;
    ck_assert_int_eq(moe_optim_step(o1, 1.0, &r1), MOE_OK);
    ck_assert_int_eq(moe_optim_step(o2, 0.5, &r2), MOE_OK);
    ck_assert_double_eq_tol(r1.grad_norm, r2.grad_norm, 1e-12 * r1.grad_norm);
    ck_assert_double_lt(r1.clip_scale, 1.0);
    for (int i = 0; i < moe_model_n_params(m1); i++) {
        const moe_param_info *p = moe_model_param(m1, i);
        double *w1 = tu_alloc(p->numel), *w2 = tu_alloc(p->numel);
        ck_assert_int_eq(moe_model_get_param(m1, i, w1), MOE_OK);
        ck_assert_int_eq(moe_model_get_param(m2, i, w2), MOE_OK);
        if (tu_rel_err(w2, w1, p->numel) > 1e-12)
            ck_abort_msg("accumulation: %s differs (%.2e)", p->name, tu_rel_err(w2, w1, p->numel));
        free(w1);
        free(w2);
    }
    moe_optim_free(o1);
    moe_optim_free(o2);
    moe_model_free(m1);
    moe_model_free(m2);
    moe_backend_free(b1);
    moe_backend_free(b2);
}
END_TEST

int main(int argc, char **argv)
{
    (void)argc;
    passive_omp(argv);
    Suite *s = suite_create("model");
    TCase *tc = tcase_create("model");
    tcase_set_timeout(tc, 120);
    tcase_add_test(tc, test_config);
    tcase_add_test(tc, test_schedule);
    tcase_add_test(tc, test_optim_ranges);
    tcase_add_test(tc, test_explain_nonfinite);
    tcase_add_test(tc, test_switch_init);
    tcase_add_test(tc, test_accumulation);
    tcase_add_test(tc, test_cpu_vs_ref);
    tcase_add_test(tc, test_cpu_vs_ref_variant);
    tcase_add_test(tc, test_fd);
    tcase_add_test(tc, test_decode);
    tcase_add_test(tc, test_train_synth);
    tcase_add_test(tc, test_train_ref_deterministic);
    suite_add_tcase(s, tc);
    return tu_run(s);
}
