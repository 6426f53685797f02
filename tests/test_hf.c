/*
 * Hugging Face interoperability (src/io/hf.h): export -> import round
 * trips that are bitwise (parameters, config, logits) for Mixtral and Qwen2-MoE, the
 * layouts in the file (transposes, per-expert slices), sharded checkpoints, BF16, the
 * refusal of configs with no HF equivalent, and bad HF inputs. The config.json keys
 * and the logits against PyTorch and transformers 5 are in tests/test_hf_config.c.
 */
#define _POSIX_C_SOURCE 200809L
#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "core/dtype.h"
#include "io/hf.h"
#include "testutil.h"

static char dir[256];

static const char *tmp(const char *name)
{
    static char path[4][512];
    static int slot;
    slot = (slot + 1) % 4;
    snprintf(path[slot], sizeof path[slot], "%s/%s", dir, name);
    return path[slot];
}

static void mixtral_cfg(moe_model_config *c)
{
    moe_model_config_tiny(c);
    c->num_hidden_layers = 2;
    c->n_experts_per_layer = 0;
    c->first_k_dense_replace = 0;
    c->qkv_bias = 0;
    c->moe.n_experts = 4;
    c->moe.top_k = 2;
    c->moe.renormalize = 1;
}

static void qwen_cfg(moe_model_config *c)
{
    moe_model_config_tiny(c);
    c->n_experts_per_layer = 0;
    c->first_k_dense_replace = 1;
    c->qkv_bias = 1;
    c->moe.n_experts = 4;
    c->moe.top_k = 2;
    c->moe.renormalize = 0;
    c->moe.n_shared = 1;
    c->moe.d_ff_shared = 24;
    c->moe.shared_gate = 1;
}

static moe_model *make(const moe_model_config *c, const char *backend, moe_backend **b, uint64_t seed)
{
    moe_model *m;
    ck_assert_int_eq(moe_backend_create(backend, &(moe_backend_options){.threads = 1}, b), MOE_OK);
    ck_assert_msg(moe_model_create(c, *b, NULL, 2, 8, &m) == MOE_OK, "%s", moe_last_error());
    if (seed)
        ck_assert_int_eq(moe_model_init(m, seed), MOE_OK);
    return m;
}

static json_t *load_json(const char *path)
{
    json_t *j = json_load_file(path, 0, NULL);
    ck_assert_msg(j != NULL, "cannot read %s", path);
    return j;
}

/* export, import, compare: parameters bitwise, config identical, logits identical */
static void roundtrip(const moe_model_config *c, const char *name, moe_hf_arch want)
{
    moe_backend *b1, *b2;
    moe_model *m1 = make(c, "cpu", &b1, 11);
    const char *out = tmp(name);
    ck_assert_msg(moe_hf_export(m1, out, MOE_ST_F32) == MOE_OK, "%s", moe_last_error());
    moe_model_config c2;
    moe_hf_arch arch;
    ck_assert_msg(moe_hf_read_config(out, &c2, &arch, NULL, 0) == MOE_OK, "%s", moe_last_error());
    ck_assert_int_eq(arch, want);
    char *j1, *j2;
    ck_assert_int_eq(moe_model_config_to_json(c, 0, &j1), MOE_OK);
    ck_assert_int_eq(moe_model_config_to_json(&c2, 0, &j2), MOE_OK);
    ck_assert_str_eq(j1, j2);
    free(j1);
    free(j2);
    moe_model *m2 = make(&c2, "cpu", &b2, 0);
    ck_assert_msg(moe_hf_load_weights(out, m2, arch) == MOE_OK, "%s", moe_last_error());
    const int n = moe_model_n_params(m1);
    ck_assert_int_eq(n, moe_model_n_params(m2));
    for (int i = 0; i < n; i++) {
        const moe_param_info *p = moe_model_param(m1, i);
        double *a = tu_alloc(2 * p->numel);
        moe_model_get_param(m1, i, a);
        moe_model_get_param(m2, i, a + p->numel);
        ck_assert_str_eq(p->name, moe_model_param(m2, i)->name);
        ck_assert_msg(!memcmp(a, a + p->numel, (size_t)p->numel * sizeof *a), "%s differs after the round trip",
                      p->name);
        free(a);
    }
    int32_t in[16];
    for (int i = 0; i < 16; i++)
        in[i] = (int32_t)((i * 11 + 3) % c->vocab_size);
    const int64_t nl = 16 * c->vocab_size;
    double *l1 = tu_alloc(nl), *l2 = tu_alloc(nl);
    ck_assert_int_eq(moe_model_forward(m1, in, NULL, NULL, 2, 8, MOE_KEY_STEP(0), 0, NULL), MOE_OK);
    ck_assert_int_eq(moe_model_get_logits(m1, l1), MOE_OK);
    ck_assert_int_eq(moe_model_forward(m2, in, NULL, NULL, 2, 8, MOE_KEY_STEP(0), 0, NULL), MOE_OK);
    ck_assert_int_eq(moe_model_get_logits(m2, l2), MOE_OK);
    ck_assert(!memcmp(l1, l2, (size_t)nl * sizeof *l1));
    free(l1);
    free(l2);
    moe_model_free(m1);
    moe_model_free(m2);
    moe_backend_free(b1);
    moe_backend_free(b2);
}

START_TEST(test_roundtrip_mixtral)
{
    moe_model_config c;
    mixtral_cfg(&c);
    c.moe.z_coef = 0.125; /* training-only keys come back through "cmoe" */
    c.moe.seed = 4242;
    roundtrip(&c, "mixtral", MOE_HF_MIXTRAL);
    c.tie_word_embeddings = 1;
    roundtrip(&c, "mixtral-tied", MOE_HF_MIXTRAL);
}
END_TEST

START_TEST(test_roundtrip_qwen)
{
    moe_model_config c;
    qwen_cfg(&c);
    roundtrip(&c, "qwen", MOE_HF_QWEN2_MOE);
    c.moe.n_shared = 2; /* two shared experts become one HF shared expert of twice the width */
    c.moe.d_ff_shared = 12;
    c.moe.act = MOE_ACT_GEGLU;
    roundtrip(&c, "qwen2", MOE_HF_QWEN2_MOE);
}
END_TEST

/* the file holds HF names and layouts: [out, in] matrices, one tensor per expert */
START_TEST(test_layout)
{
    moe_model_config c;
    mixtral_cfg(&c);
    moe_backend *b;
    moe_model *m = make(&c, "cpu", &b, 5);
    ck_assert_int_eq(moe_hf_export(m, tmp("layout"), MOE_ST_F32), MOE_OK);
    char path[600];
    snprintf(path, sizeof path, "%s/model.safetensors", tmp("layout"));
    moe_st_file *f;
    ck_assert_int_eq(moe_st_read(path, &f), MOE_OK);
    ck_assert_str_eq(moe_st_meta(f, "format"), "pt");
    /* experts.w2 [E, f, C] of layer 1, expert 3 -> block_sparse_moe.experts.3.w2.weight [C, f] */
    int i = moe_model_param_index(m, "model.layers.1.block_sparse_moe.experts.w2");
    ck_assert_int_ge(i, 0);
    const int64_t E = 4, F = 16, C = 16;
    double *w = tu_alloc(E * F * C), *h = tu_alloc(C * F);
    moe_model_get_param(m, i, w);
    int64_t sh[2] = {C, F};
    ck_assert_int_eq(moe_st_get_f64(f, "model.layers.1.block_sparse_moe.experts.3.w2.weight", 2, sh, h), MOE_OK);
    for (int64_t r = 0; r < F; r++)
        for (int64_t k = 0; k < C; k++)
            ck_assert(h[k * F + r] == w[3 * F * C + r * C + k]);
    /* router [C, E] -> gate.weight [E, C] */
    i = moe_model_param_index(m, "model.layers.0.block_sparse_moe.router.weight");
    moe_model_get_param(m, i, w);
    int64_t gs[2] = {E, C};
    ck_assert_int_eq(moe_st_get_f64(f, "model.layers.0.block_sparse_moe.gate.weight", 2, gs, h), MOE_OK);
    for (int64_t e = 0; e < E; e++)
        for (int64_t k = 0; k < C; k++)
            ck_assert(h[e * C + k] == w[k * E + e]);
    /* k_proj [C, Hkv·hd] -> [Hkv·hd, C] */
    int64_t ks[2] = {8, C};
    ck_assert_int_eq(moe_st_get_f64(f, "model.layers.0.self_attn.k_proj.weight", 2, ks, h), MOE_OK);
    ck_assert_ptr_nonnull(moe_st_find(f, "lm_head.weight"));
    ck_assert_ptr_nonnull(moe_st_find(f, "model.embed_tokens.weight"));
    ck_assert_ptr_null(moe_st_find(f, "model.layers.0.block_sparse_moe.experts.w1"));
    ck_assert_int_eq(f->n, 1 + 2 * (2 + 4 + 1 + 3 * 4) + 1 + 1);
    moe_st_free(f);
    free(w);
    free(h);
    moe_model_free(m);
    moe_backend_free(b);
}
END_TEST

/* the Qwen2-MoE names, and a model without q/k/v biases exported with zero biases */
START_TEST(test_qwen_names)
{
    moe_model_config c;
    qwen_cfg(&c);
    c.qkv_bias = 0;
    moe_backend *b, *b2;
    moe_model *m = make(&c, "cpu", &b, 5);
    ck_assert_msg(moe_hf_export(m, tmp("qnames"), MOE_ST_F32) == MOE_OK, "%s", moe_last_error());
    char path[600];
    snprintf(path, sizeof path, "%s/model.safetensors", tmp("qnames"));
    moe_st_file *f;
    ck_assert_int_eq(moe_st_read(path, &f), MOE_OK);
    static const char *const names[] = {
        "model.layers.0.mlp.gate_proj.weight", "model.layers.0.mlp.up_proj.weight",
        "model.layers.0.mlp.down_proj.weight", "model.layers.1.mlp.gate.weight",
        "model.layers.1.mlp.experts.3.gate_proj.weight", "model.layers.1.mlp.experts.3.up_proj.weight",
        "model.layers.2.mlp.experts.0.down_proj.weight", "model.layers.1.mlp.shared_expert.gate_proj.weight",
        "model.layers.1.mlp.shared_expert.up_proj.weight", "model.layers.1.mlp.shared_expert.down_proj.weight",
        "model.layers.1.mlp.shared_expert_gate.weight", "model.layers.2.self_attn.q_proj.bias", NULL};
    for (int i = 0; names[i]; i++)
        ck_assert_msg(moe_st_find(f, names[i]) != NULL, "%s missing", names[i]);
    const moe_st_tensor *t = moe_st_find(f, "model.layers.1.mlp.shared_expert_gate.weight");
    ck_assert_int_eq(t->ndim, 2);
    ck_assert_int_eq(t->shape[0], 1);
    ck_assert_int_eq(t->shape[1], 16);
    t = moe_st_find(f, "model.layers.1.mlp.shared_expert.down_proj.weight");
    ck_assert_int_eq(t->shape[0], 16);
    ck_assert_int_eq(t->shape[1], 24);
    moe_st_free(f);
    /* imported: biases present and zero, logits equal */
    moe_model_config c2;
    moe_hf_arch a;
    ck_assert_int_eq(moe_hf_read_config(tmp("qnames"), &c2, &a, NULL, 0), MOE_OK);
    ck_assert_int_eq(c2.qkv_bias, 1);
    moe_model *m2 = make(&c2, "cpu", &b2, 0);
    ck_assert_msg(moe_hf_load_weights(tmp("qnames"), m2, a) == MOE_OK, "%s", moe_last_error());
    int32_t in[8] = {1, 5, 9, 2, 7, 31, 0, 4};
    double *l1 = tu_alloc(8 * 32), *l2 = tu_alloc(8 * 32);
    moe_model_forward(m, in, NULL, NULL, 1, 8, MOE_KEY_STEP(0), 0, NULL);
    moe_model_get_logits(m, l1);
    moe_model_forward(m2, in, NULL, NULL, 1, 8, MOE_KEY_STEP(0), 0, NULL);
    moe_model_get_logits(m2, l2);
    ck_assert_double_le(tu_rel_err(l2, l1, 8 * 32), 1e-6); /* + 0 is exact; the order of sums may not be */
    free(l1);
    free(l2);
    moe_model_free(m);
    moe_model_free(m2);
    moe_backend_free(b);
    moe_backend_free(b2);
}
END_TEST

START_TEST(test_bf16)
{
    moe_model_config c;
    mixtral_cfg(&c);
    moe_backend *b, *b2;
    moe_model *m = make(&c, "cpu", &b, 9);
    ck_assert_int_eq(moe_hf_export(m, tmp("bf16"), MOE_ST_BF16), MOE_OK);
    moe_model_config c2;
    moe_hf_arch a;
    ck_assert_int_eq(moe_hf_read_config(tmp("bf16"), &c2, &a, NULL, 0), MOE_OK);
    moe_model *m2 = make(&c2, "cpu", &b2, 0);
    ck_assert_msg(moe_hf_load_weights(tmp("bf16"), m2, a) == MOE_OK, "%s", moe_last_error());
    for (int i = 0; i < moe_model_n_params(m); i++) {
        int64_t n = moe_model_param(m, i)->numel;
        double *x = tu_alloc(2 * n);
        uint16_t *h = malloc((size_t)n * 2);
        moe_model_get_param(m, i, x);
        moe_model_get_param(m2, i, x + n);
        moe_st_from_f64(MOE_ST_BF16, x, n, h);
        for (int64_t k = 0; k < n; k++)
            ck_assert(x[n + k] == moe_bf16_to_f64(h[k]));
        free(x);
        free(h);
    }
    moe_model_free(m);
    moe_model_free(m2);
    moe_backend_free(b);
    moe_backend_free(b2);
}
END_TEST

/* ---- refusals ------------------------------------------------------------------------ */

typedef void (*cfg_fn)(moe_model_config *c);
static void r_expert_choice(moe_model_config *c) { c->moe.router = MOE_ROUTER_EXPERT_CHOICE; c->moe.capacity_factor = 1; }
static void r_hash(moe_model_config *c) { c->moe.router = MOE_ROUTER_HASH; }
static void r_sinkhorn(moe_model_config *c) { c->moe.router = MOE_ROUTER_SINKHORN; }
static void r_noisy(moe_model_config *c) { c->moe.router = MOE_ROUTER_NOISY_TOPK; }
static void r_sigmoid(moe_model_config *c) { c->moe.score = MOE_SCORE_SIGMOID; }
static void r_capacity(moe_model_config *c) { c->moe.capacity_factor = 1.25; }
static void r_second(moe_model_config *c) { c->moe.second_policy = MOE_SECOND_SAMPLING; }
static void r_bias(moe_model_config *c) { c->moe.use_bias = 1; }
static void r_residual(moe_model_config *c) { c->moe.residual = 1; }
static void r_relu(moe_model_config *c) { c->moe.act = MOE_ACT_RELU; }
static void r_dense(moe_model_config *c) { c->first_k_dense_replace = 1; }
static void r_qkv(moe_model_config *c) { c->qkv_bias = 1; }
static void r_norm(moe_model_config *c) { c->moe.renormalize = 0; }
static void r_ungated(moe_model_config *c) { c->moe.n_shared = 1; c->moe.shared_gate = 0; }
static void r_pyramid(moe_model_config *c)
{
    c->n_experts_per_layer = 2;
    c->num_experts_per_layer[0] = 4;
    c->num_experts_per_layer[1] = 8;
}
static void r_qwen_headdim(moe_model_config *c)
{
    c->moe.n_shared = 1;
    c->moe.shared_gate = 1;
    c->head_dim = 8;
}

START_TEST(test_refusals)
{
    static const struct {
        cfg_fn f;
        const char *want;
    } cases[] = {
        {r_expert_choice, "router 'expert_choice'"}, {r_hash, "router 'hash'"},
        {r_sinkhorn, "router 'sinkhorn'"},         {r_noisy, "router 'noisy_topk'"},
        {r_sigmoid, "scoring_func 'sigmoid'"},      {r_capacity, "capacity_factor 1.25"},
        {r_second, "second_expert_policy 'sampling'"}, {r_bias, "use_expert_bias"},
        {r_residual, "residual_moe"},               {r_relu, "hidden_act 'relu'"},
        {r_dense, "1 dense layers"},                {r_qkv, "qkv_bias (Mixtral has no"},
        {r_norm, "norm_topk_prob false"},           {r_ungated, "shared experts without shared_expert_gate"},
        {r_pyramid, "pyramid MoE"},                 {r_qwen_headdim, "Qwen2-MoE requires them equal"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        moe_model_config c;
        mixtral_cfg(&c);
        cases[i].f(&c);
        moe_hf_arch a;
        ck_assert_int_eq(moe_hf_arch_of(&c, &a), MOE_ERR_UNSUPPORTED);
        ck_assert_msg(strstr(moe_last_error(), cases[i].want), "case %zu: '%s' lacks '%s'", i, moe_last_error(),
                      cases[i].want);
        ck_assert_ptr_nonnull(strstr(moe_last_error(), "no Hugging Face equivalent"));
        /* export refuses before writing anything */
        moe_backend *b;
        moe_model *m;
        if (moe_backend_create("ref", &(moe_backend_options){.threads = 1}, &b) == MOE_OK && moe_model_create(&c, b, NULL, 1, 4, &m) == MOE_OK) {
            char name[32];
            snprintf(name, sizeof name, "refused%zu", i);
            ck_assert_int_eq(moe_hf_export(m, tmp(name), MOE_ST_F32), MOE_ERR_UNSUPPORTED);
            ck_assert_int_eq(access(tmp(name), F_OK), -1);
            moe_model_free(m);
        }
        moe_backend_free(b);
    }
    printf("hf: %zu configs refused, each naming what has no equivalent\n", sizeof cases / sizeof cases[0]);
    /* all reasons at once */
    moe_model_config c;
    mixtral_cfg(&c);
    r_sigmoid(&c);
    r_residual(&c);
    ck_assert_int_eq(moe_hf_arch_of(&c, NULL), MOE_ERR_UNSUPPORTED);
    ck_assert_ptr_nonnull(strstr(moe_last_error(), "sigmoid"));
    ck_assert_ptr_nonnull(strstr(moe_last_error(), "residual_moe"));
}
END_TEST

/* ---- bad HF inputs ----------------------------------------------------------------- */

/* DIR/config.json of the exported mixtral with key k set to the JSON value v */
static moe_status config_with(const char *src, const char *k, const char *v)
{
    char path[600];
    snprintf(path, sizeof path, "%s/config.json", src);
    json_t *j = load_json(path);
    json_object_set_new(j, k, json_loads(v, JSON_DECODE_ANY, NULL));
    char *t = json_dumps(j, 0);
    json_decref(j);
    moe_model_config c;
    moe_hf_arch a;
    moe_status s = moe_hf_config_from_json(t, &c, &a, NULL, 0);
    free(t);
    return s;
}

/* copies the exported weights of src into dst with one tensor dropped, renamed or reshaped */
static void weights_with(const char *src, const char *dst, const char *drop, const char *add_as, int reshape)
{
    char p[600], q[600];
    snprintf(p, sizeof p, "%s/model.safetensors", src);
    moe_st_file *f;
    ck_assert_int_eq(moe_st_read(p, &f), MOE_OK);
    moe_st_writer *w;
    moe_st_writer_create(&w);
    for (int i = 0; i < f->n; i++) {
        const moe_st_tensor *t = &f->tensors[i];
        if (drop && !strcmp(t->name, drop))
            continue;
        int64_t sh[4] = {t->shape[0], t->shape[1], t->shape[2], t->shape[3]};
        if (reshape && !strcmp(t->name, "model.norm.weight"))
            sh[0] = 8; /* [16] -> read the first 8 only */
        if (reshape && !strcmp(t->name, "model.norm.weight"))
            ck_assert_int_eq(moe_st_writer_add_copy(w, t->name, t->dtype, 1, sh, t->data), MOE_OK);
        else
            ck_assert_int_eq(moe_st_writer_add_copy(w, t->name, t->dtype, t->ndim, sh, t->data), MOE_OK);
    }
    if (add_as) {
        float z[2] = {0, 0};
        int64_t sh[1] = {2};
        moe_st_writer_add_copy(w, add_as, MOE_ST_F32, 1, sh, z);
    }
    snprintf(q, sizeof q, "mkdir -p '%s' && cp '%s/config.json' '%s/'", dst, src, dst);
    ck_assert_int_eq(system(q), 0);
    snprintf(q, sizeof q, "%s/model.safetensors", dst);
    ck_assert_int_eq(moe_st_writer_write(w, q), MOE_OK);
    moe_st_writer_free(w);
    moe_st_free(f);
}

static void expect_load_fails(const char *d, const char *want)
{
    moe_model_config c;
    moe_hf_arch a;
    moe_backend *b;
    ck_assert_int_eq(moe_hf_read_config(d, &c, &a, NULL, 0), MOE_OK);
    moe_model *m = make(&c, "cpu", &b, 3);
    double before[16], after[16];
    int i = moe_model_param_index(m, "model.norm.weight");
    moe_model_get_param(m, i, before);
    ck_assert_int_ne(moe_hf_load_weights(d, m, a), MOE_OK);
    ck_assert_msg(strstr(moe_last_error(), want), "'%s' lacks '%s'", moe_last_error(), want);
    moe_model_get_param(m, i, after);
    ck_assert(!memcmp(before, after, sizeof before)); /* nothing set */
    moe_model_free(m);
    moe_backend_free(b);
}

START_TEST(test_bad_inputs)
{
    moe_model_config c;
    mixtral_cfg(&c);
    moe_backend *b;
    moe_model *m = make(&c, "cpu", &b, 7);
    char src[512]; /* tmp() reuses its buffers */
    snprintf(src, sizeof src, "%s", tmp("src"));
    ck_assert_int_eq(moe_hf_export(m, src, MOE_ST_F32), MOE_OK);
    moe_model_free(m);
    moe_backend_free(b);
    /* configs */
    ck_assert_int_eq(config_with(src, "model_type", "\"llama\""), MOE_ERR_UNSUPPORTED);
    ck_assert_ptr_nonnull(strstr(moe_last_error(), "model_type 'llama'"));
    ck_assert_int_eq(config_with(src, "rope_scaling", "{\"type\": \"linear\", \"factor\": 2.0}"), MOE_ERR_UNSUPPORTED);
    ck_assert_ptr_nonnull(strstr(moe_last_error(), "rope_scaling"));
    ck_assert_int_eq(config_with(src, "hidden_act", "\"gelu_pytorch_tanh\""), MOE_ERR_UNSUPPORTED);
    ck_assert_ptr_nonnull(strstr(moe_last_error(), "gelu_pytorch_tanh"));
    ck_assert_int_eq(config_with(src, "sliding_window", "16"), MOE_ERR_UNSUPPORTED);
    ck_assert_ptr_nonnull(strstr(moe_last_error(), "sliding_window 16"));
    ck_assert_int_ne(config_with(src, "num_attention_heads", "3"), MOE_OK);
    ck_assert_int_eq(config_with(src, "sliding_window", "4096"), MOE_OK); /* longer than any sequence */
    /* weights */
    weights_with(src, tmp("missing"), "model.layers.1.block_sparse_moe.experts.2.w3.weight", NULL, 0);
    expect_load_fails(tmp("missing"), "'model.layers.1.block_sparse_moe.experts.2.w3.weight' is missing");
    weights_with(src, tmp("extra"), NULL, "model.layers.0.mlp.weird.weight", 0);
    expect_load_fails(tmp("extra"), "unexpected tensor 'model.layers.0.mlp.weird.weight'");
    weights_with(src, tmp("shape"), NULL, NULL, 1);
    expect_load_fails(tmp("shape"), "model.norm.weight");
    /* a rotary buffer of old checkpoints is ignored */
    weights_with(src, tmp("rotary"), NULL, "model.layers.0.self_attn.rotary_emb.inv_freq", 0);
    moe_model_config c2;
    moe_hf_arch a;
    ck_assert_int_eq(moe_hf_read_config(tmp("rotary"), &c2, &a, NULL, 0), MOE_OK);
    m = make(&c2, "cpu", &b, 0);
    ck_assert_msg(moe_hf_load_weights(tmp("rotary"), m, a) == MOE_OK, "%s", moe_last_error());
    moe_model_free(m);
    moe_backend_free(b);
    /* no weights at all */
    char cmd[1200];
    snprintf(cmd, sizeof cmd, "mkdir -p '%s' && cp '%s/config.json' '%s/'", tmp("noweights"), src, tmp("noweights"));
    ck_assert_int_eq(system(cmd), 0);
    expect_load_fails(tmp("noweights"), "neither model.safetensors nor model.safetensors.index.json");
}
END_TEST

/* model.safetensors.index.json with two shards loads the same parameters */
START_TEST(test_sharded)
{
    moe_model_config c;
    mixtral_cfg(&c);
    moe_backend *b, *b2;
    moe_model *m = make(&c, "cpu", &b, 13);
    char src[512], sd[512];
    snprintf(src, sizeof src, "%s", tmp("one"));
    snprintf(sd, sizeof sd, "%s", tmp("sharded"));
    ck_assert_int_eq(moe_hf_export(m, src, MOE_ST_F32), MOE_OK);
    char p[600];
    snprintf(p, sizeof p, "%s/model.safetensors", src);
    moe_st_file *f;
    ck_assert_int_eq(moe_st_read(p, &f), MOE_OK);
    char cmd[1600];
    snprintf(cmd, sizeof cmd, "mkdir -p '%s' && cp '%s/config.json' '%s/'", sd, src, sd);
    ck_assert_int_eq(system(cmd), 0);
    moe_st_writer *w[2];
    moe_st_writer_create(&w[0]);
    moe_st_writer_create(&w[1]);
    json_t *map = json_object();
    for (int i = 0; i < f->n; i++) {
        const moe_st_tensor *t = &f->tensors[i];
        moe_st_writer_add_copy(w[i % 2], t->name, t->dtype, t->ndim, t->shape, t->data);
        json_object_set_new(map, t->name, json_string(i % 2 ? "model-00002-of-00002.safetensors"
                                                            : "model-00001-of-00002.safetensors"));
    }
    snprintf(p, sizeof p, "%s/model-00001-of-00002.safetensors", sd);
    ck_assert_int_eq(moe_st_writer_write(w[0], p), MOE_OK);
    snprintf(p, sizeof p, "%s/model-00002-of-00002.safetensors", sd);
    ck_assert_int_eq(moe_st_writer_write(w[1], p), MOE_OK);
    json_t *idx = json_object();
    json_object_set_new(idx, "metadata", json_object());
    json_object_set(idx, "weight_map", map);
    snprintf(p, sizeof p, "%s/model.safetensors.index.json", sd);
    ck_assert_int_eq(json_dump_file(idx, p, 0), 0);
    moe_model_config c2;
    moe_hf_arch a;
    ck_assert_int_eq(moe_hf_read_config(sd, &c2, &a, NULL, 0), MOE_OK);
    moe_model *m2 = make(&c2, "cpu", &b2, 0);
    ck_assert_msg(moe_hf_load_weights(sd, m2, a) == MOE_OK, "%s", moe_last_error());
    for (int i = 0; i < moe_model_n_params(m); i++) {
        int64_t n = moe_model_param(m, i)->numel;
        double *x = tu_alloc(2 * n);
        moe_model_get_param(m, i, x);
        moe_model_get_param(m2, i, x + n);
        ck_assert(!memcmp(x, x + n, (size_t)n * sizeof *x));
        free(x);
    }
    /* a map that puts a tensor in the wrong shard */
    json_object_set_new(map, "lm_head.weight", json_string("model-00001-of-00002.safetensors"));
    json_object_set_new(map, "model.norm.weight", json_string("model-00002-of-00002.safetensors"));
    ck_assert_int_eq(json_dump_file(idx, p, 0), 0);
    ck_assert_int_ne(moe_hf_load_weights(sd, m2, a), MOE_OK);
    ck_assert_ptr_nonnull(strstr(moe_last_error(), "where weight_map puts it"));
    json_object_set_new(map, "model.norm.weight", json_string("../x.safetensors"));
    ck_assert_int_eq(json_dump_file(idx, p, 0), 0);
    ck_assert_int_ne(moe_hf_load_weights(sd, m2, a), MOE_OK);
    ck_assert_ptr_nonnull(strstr(moe_last_error(), "not a file name in the directory"));
    json_decref(idx);
    json_decref(map);
    moe_st_writer_free(w[0]);
    moe_st_writer_free(w[1]);
    moe_st_free(f);
    moe_model_free(m);
    moe_model_free(m2);
    moe_backend_free(b);
    moe_backend_free(b2);
}
END_TEST

int main(void)
{
    snprintf(dir, sizeof dir, "%s/cmoe-hf-XXXXXX", getenv("TMPDIR") ? getenv("TMPDIR") : "/tmp");
    if (!mkdtemp(dir))
        return 99;
    Suite *s = suite_create("hf");
    TCase *tc = tcase_create("hf");
    tcase_set_timeout(tc, 120);
    tcase_add_test(tc, test_roundtrip_mixtral);
    tcase_add_test(tc, test_roundtrip_qwen);
    tcase_add_test(tc, test_layout);
    tcase_add_test(tc, test_qwen_names);
    tcase_add_test(tc, test_bf16);
    tcase_add_test(tc, test_refusals);
    tcase_add_test(tc, test_bad_inputs);
    tcase_add_test(tc, test_sharded);
    suite_add_tcase(s, tc);
    int rc = tu_run(s);
    char cmd[600];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", dir);
    if (system(cmd) != 0)
        fprintf(stderr, "cannot remove %s\n", dir);
    return rc;
}
