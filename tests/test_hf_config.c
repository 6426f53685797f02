/*
 * Hugging Face config.json (src/io/hf_config.c) and the logits of imported models
 * against two outside references:
 *   - tests/fixtures/hf-*: checkpoints and float64 logits from tests/hf_reference.py, a
 *     plain-PyTorch forward written from modeling_mixtral.py / modeling_qwen2_moe.py;
 *   - tests/fixtures/hf5/hf5-*: tiny random MixtralForCausalLM and Qwen2MoeForCausalLM
 *     saved by the real transformers 5.17 (save_pretrained) and their float64 logits and
 *     per-token cross-entropy from transformers itself (eager attention and experts),
 *     made by tests/fixtures/hf5/make_fixtures.py. Their config.json is transformers 5's
 *     form: rope_parameters instead of rope_theta, "head_dim": null, "dtype", layer_types,
 *     with rope thetas that are neither class default, so a θ read wrongly shows.
 *   - tests/fixtures/hf5/export-check: transformers 5's logits of what `cmoe export` wrote
 *     for the hf-* models (the same script, --exports), so transformers 5 reads cmoe's
 *     config.json as cmoe means it.
 * And the config forms one by one: both RoPE forms (agreeing or not), the rope types
 * and keys cmoe refuses by name, the notes for defaulted keys, layer_types, head_dim null.
 */
#define _POSIX_C_SOURCE 200809L
#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "io/hf.h"
#include "testutil.h"

static const char *srcdir(void)
{
    return getenv("top_srcdir") ? getenv("top_srcdir") : ".";
}

static json_t *load_json(const char *path)
{
    json_t *j = json_load_file(path, 0, NULL);
    ck_assert_msg(j != NULL, "cannot read %s", path);
    return j;
}

static int64_t jint(json_t *o, const char *k)
{
    json_t *v = json_object_get(o, k);
    ck_assert_msg(json_is_integer(v), "config.json: '%s' is not an integer", k);
    return json_integer_value(v);
}

static const char *jstr(json_t *o, const char *k)
{
    json_t *v = json_object_get(o, k);
    ck_assert_msg(json_is_string(v), "config.json: '%s' is not a string", k);
    return json_string_value(v);
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

START_TEST(test_config_keys)
{
    moe_model_config c;
    mixtral_cfg(&c);
    c.tie_word_embeddings = 0;
    char *t;
    ck_assert_msg(moe_hf_config_to_json(&c, MOE_ST_F32, &t) == MOE_OK, "%s", moe_last_error());
    json_t *j = json_loads(t, 0, NULL);
    free(t);
    ck_assert_str_eq(json_string_value(json_array_get(json_object_get(j, "architectures"), 0)), "MixtralForCausalLM");
    ck_assert_str_eq(jstr(j, "model_type"), "mixtral");
    ck_assert_int_eq(jint(j, "vocab_size"), 32);
    ck_assert_int_eq(jint(j, "hidden_size"), 16);
    ck_assert_int_eq(jint(j, "intermediate_size"), 16); /* Mixtral's intermediate_size is the expert's */
    ck_assert_int_eq(jint(j, "num_hidden_layers"), 2);
    ck_assert_int_eq(jint(j, "num_attention_heads"), 4);
    ck_assert_int_eq(jint(j, "num_key_value_heads"), 2);
    ck_assert_int_eq(jint(j, "head_dim"), 4);
    ck_assert_int_eq(jint(j, "num_local_experts"), 4);
    ck_assert_int_eq(jint(j, "num_experts_per_tok"), 2);
    ck_assert_int_eq(jint(j, "max_position_embeddings"), 64);
    ck_assert_str_eq(jstr(j, "hidden_act"), "silu");
    ck_assert_str_eq(jstr(j, "torch_dtype"), "float32");
    ck_assert(json_is_false(json_object_get(j, "tie_word_embeddings")));
    ck_assert(json_is_null(json_object_get(j, "sliding_window")));
    /* both RoPE and dtype forms, so transformers 4 and 5 read the same model */
    ck_assert(json_is_number(json_object_get(j, "rope_theta")));
    json_t *rp = json_object_get(j, "rope_parameters");
    ck_assert(json_is_object(rp));
    ck_assert_str_eq(jstr(rp, "rope_type"), "default");
    ck_assert(json_number_value(json_object_get(rp, "rope_theta")) == c.rope_theta);
    ck_assert(json_number_value(json_object_get(j, "rope_theta")) == c.rope_theta);
    ck_assert_str_eq(jstr(j, "dtype"), "float32");
    ck_assert(json_is_number(json_object_get(j, "rms_norm_eps")));
    ck_assert(json_is_number(json_object_get(j, "router_aux_loss_coef")));
    ck_assert(json_is_object(json_object_get(j, "cmoe")));
    ck_assert_ptr_null(json_object_get(j, "num_experts"));
    json_decref(j);

    qwen_cfg(&c);
    ck_assert_msg(moe_hf_config_to_json(&c, MOE_ST_BF16, &t) == MOE_OK, "%s", moe_last_error());
    j = json_loads(t, 0, NULL);
    free(t);
    ck_assert_str_eq(json_string_value(json_array_get(json_object_get(j, "architectures"), 0)), "Qwen2MoeForCausalLM");
    ck_assert_str_eq(jstr(j, "model_type"), "qwen2_moe");
    ck_assert_int_eq(jint(j, "intermediate_size"), 32); /* the dense layers' */
    ck_assert_int_eq(jint(j, "moe_intermediate_size"), 16);
    ck_assert_int_eq(jint(j, "shared_expert_intermediate_size"), 24);
    ck_assert_int_eq(jint(j, "num_experts"), 4);
    ck_assert_int_eq(jint(j, "decoder_sparse_step"), 1);
    ck_assert_str_eq(jstr(j, "torch_dtype"), "bfloat16");
    ck_assert_str_eq(jstr(j, "dtype"), "bfloat16");
    ck_assert(json_is_false(json_object_get(j, "norm_topk_prob")));
    ck_assert(json_is_true(json_object_get(j, "qkv_bias")));
    json_t *mlp = json_object_get(j, "mlp_only_layers");
    ck_assert_int_eq(json_array_size(mlp), 1);
    ck_assert_int_eq(json_integer_value(json_array_get(mlp, 0)), 0);
    json_decref(j);
}
END_TEST

/* ---- the config forms of transformers 4 and 5 ------------------------------------------ */

/* the transformers 5 Mixtral config of the fixture, with key k set to the JSON value v
 * (NULL deletes it); read with notes */
static moe_status hf5_with(const char *k, const char *v, moe_model_config *c, char *notes, size_t nn)
{
    char path[1024];
    snprintf(path, sizeof path, "%s/tests/fixtures/hf5/hf5-mixtral/config.json", srcdir());
    json_t *j = load_json(path);
    if (k && v)
        json_object_set_new(j, k, json_loads(v, JSON_DECODE_ANY, NULL));
    else if (k)
        json_object_del(j, k);
    char *t = json_dumps(j, 0);
    json_decref(j);
    moe_hf_arch a;
    moe_status s = moe_hf_config_from_json(t, c, &a, notes, nn);
    free(t);
    return s;
}

static void expect_refused(const char *k, const char *v, moe_status want, const char *msg)
{
    moe_model_config c;
    moe_status s = hf5_with(k, v, &c, NULL, 0);
    ck_assert_msg(s == want, "%s = %s: status %d, want %d (%s)", k, v, s, want, s ? moe_last_error() : "accepted");
    ck_assert_msg(strstr(moe_last_error(), msg), "%s = %s: '%s' lacks '%s'", k, v, moe_last_error(), msg);
}

START_TEST(test_rope_forms)
{
    moe_model_config c;
    char notes[1024];
    /* transformers 5: rope_parameters only, head_dim null, dtype, no torch_dtype */
    ck_assert_msg(hf5_with(NULL, NULL, &c, notes, sizeof notes) == MOE_OK, "%s", moe_last_error());
    ck_assert(c.rope_theta == 500.0);
    ck_assert_int_eq(c.head_dim, 4); /* null: hidden_size / num_attention_heads */
    ck_assert(c.rms_norm_eps == 1e-6);
    ck_assert_str_eq(notes, "");
    /* transformers 4: top-level rope_theta only */
    ck_assert_int_eq(hf5_with("rope_parameters", NULL, &c, notes, sizeof notes), MOE_OK);
    ck_assert(c.rope_theta == 1e6); /* the fixture has none left: the class default, said */
    ck_assert_msg(strstr(notes, "rope_theta") && strstr(notes, "1e+06"), "notes: '%s'", notes);
    ck_assert_int_eq(hf5_with("rope_parameters", "{\"rope_type\": \"default\"}", &c, notes, sizeof notes), MOE_OK);
    ck_assert(c.rope_theta == 1e6);
    ck_assert_ptr_nonnull(strstr(notes, "rope_theta"));
    /* both, agreeing, and a top-level form alone */
    ck_assert_int_eq(hf5_with("rope_theta", "500.0", &c, notes, sizeof notes), MOE_OK);
    ck_assert(c.rope_theta == 500.0);
    expect_refused("rope_theta", "10000.0", MOE_ERR_FORMAT, "disagree");
    ck_assert_ptr_nonnull(strstr(moe_last_error(), "rope_parameters.rope_theta"));
    expect_refused("rope_theta", "-1", MOE_ERR_FORMAT, "rope_theta is not a positive number");
    expect_refused("rope_parameters", "{\"rope_type\": \"default\", \"rope_theta\": \"big\"}", MOE_ERR_FORMAT,
                   "rope_parameters.rope_theta is not a positive number");
    expect_refused("rope_parameters", "[1]", MOE_ERR_FORMAT, "rope_parameters is not an object");
    /* the scaled rope types, in either form, refused by name */
    static const char *const types[] = {"linear", "dynamic", "yarn", "llama3", "longrope", "proportional"};
    for (size_t i = 0; i < sizeof types / sizeof types[0]; i++) {
        char v[256], want[128];
        snprintf(v, sizeof v, "{\"rope_type\": \"%s\", \"rope_theta\": 500.0, \"factor\": 4.0}", types[i]);
        snprintf(want, sizeof want, "rope_parameters has rope_type '%s'", types[i]);
        expect_refused("rope_parameters", v, MOE_ERR_UNSUPPORTED, want);
        snprintf(v, sizeof v, "{\"type\": \"%s\", \"factor\": 4.0}", types[i]);
        snprintf(want, sizeof want, "rope_scaling has rope_type '%s'", types[i]);
        expect_refused("rope_scaling", v, MOE_ERR_UNSUPPORTED, want);
    }
    /* keys plain RoPE does not have, and partial rotation */
    expect_refused("rope_parameters", "{\"rope_type\": \"default\", \"rope_theta\": 500.0, \"factor\": 2.0}",
                   MOE_ERR_UNSUPPORTED, "rope_parameters.factor");
    expect_refused("rope_parameters",
                   "{\"rope_type\": \"default\", \"rope_theta\": 500.0, \"partial_rotary_factor\": 0.5}",
                   MOE_ERR_UNSUPPORTED, "partial_rotary_factor");
    expect_refused("partial_rotary_factor", "0.25", MOE_ERR_UNSUPPORTED, "partial_rotary_factor");
    ck_assert_int_eq(hf5_with("rope_parameters",
                              "{\"rope_type\": \"default\", \"rope_theta\": 500.0, \"partial_rotary_factor\": 1.0}",
                              &c, NULL, 0), MOE_OK);
    ck_assert_int_eq(hf5_with("rope_scaling", "null", &c, NULL, 0), MOE_OK);
    /* transformers 5's layer_types: sliding layers are refused */
    ck_assert_int_eq(hf5_with("layer_types", "[\"full_attention\", \"full_attention\"]", &c, NULL, 0), MOE_OK);
    expect_refused("layer_types", "[\"full_attention\", \"sliding_attention\"]", MOE_ERR_UNSUPPORTED,
                   "layer_types[1] is 'sliding_attention'");
    /* a head_dim given is taken as it is; torch_dtype and dtype both accepted */
    ck_assert_int_eq(hf5_with("head_dim", "8", &c, NULL, 0), MOE_OK);
    ck_assert_int_eq(c.head_dim, 8);
    ck_assert_int_eq(hf5_with("torch_dtype", "\"bfloat16\"", &c, NULL, 0), MOE_OK);
}
END_TEST

/* every key left out that changes the math is named in the notes, with its default */
START_TEST(test_notes)
{
    moe_model_config c;
    char notes[1024];
    static const char *const keys[] = {"rms_norm_eps", "hidden_act", "num_experts_per_tok"};
    for (size_t i = 0; i < sizeof keys / sizeof keys[0]; i++) {
        ck_assert_msg(hf5_with(keys[i], NULL, &c, notes, sizeof notes) == MOE_OK, "%s", moe_last_error());
        ck_assert_msg(strstr(notes, keys[i]), "no %s: notes '%s'", keys[i], notes);
    }
    ck_assert(c.moe.top_k == 2);
    ck_assert_int_eq(hf5_with("rms_norm_eps", NULL, &c, notes, sizeof notes), MOE_OK);
    ck_assert(c.rms_norm_eps == 1e-5);
    ck_assert_ptr_nonnull(strstr(notes, "1e-05"));
    /* a small buffer is cut, never overrun */
    char small[8];
    ck_assert_int_eq(hf5_with("rope_parameters", NULL, &c, small, sizeof small), MOE_OK);
    ck_assert(strlen(small) < sizeof small);
}
END_TEST

/* ---- logits against outside references ------------------------------------------------ */

/* a path under tests/fixtures */
static const char *fx(const char *rel)
{
    static char path[4][1024];
    static int slot;
    slot = (slot + 1) % 4;
    snprintf(path[slot], sizeof path[slot], "%s/tests/fixtures/%s", srcdir(), rel);
    return path[slot];
}

/*
 * DIR (under tests/fixtures): an HF checkpoint. TOKENS: "tokens" [B, S]; LOGITS:
 * "logits" [B·S, V] in float64 and, when there, "ce" [B·(S−1)], the next-token
 * cross-entropy. cmoe's logits (rel. error <= tol on ref, double; <= 1e-5 on cpu, fp32)
 * and mean cross-entropy (abs. error <= tol, 1e-5) after import, against them.
 *
 * tol: 1e-9 against hf_reference.py, float64 throughout. Against transformers 1e-6:
 * a float64 transformers model still computes RMSNorm, the RoPE cos/sin and both
 * softmaxes (attention, router) in float32 (modeling_mixtral.py casts to float32 there),
 * which leaves ~2e-7 of relative error in the logits (measured: 1.2e-7 on the hf5
 * fixtures; 2.2e-7 for transformers 5 on the hf-* weights that cmoe matches to 1e-15
 * against hf_reference.py). A wrong rope_theta (MixtralConfig's 1e6 for the fixture's
 * 500) gives 1.8e-1.
 */
static void against(const char *dir, const char *tokens, const char *logits, double tol)
{
    moe_st_file *ft, *f;
    ck_assert_msg(moe_st_read(fx(tokens), &ft) == MOE_OK, "%s", moe_last_error());
    ck_assert_msg(moe_st_read(fx(logits), &f) == MOE_OK, "%s", moe_last_error());
    const moe_st_tensor *tt = moe_st_find(ft, "tokens"), *tl = moe_st_find(f, "logits"), *tc = moe_st_find(f, "ce");
    ck_assert(tt && tl && tt->ndim == 2 && tl->ndim == 2);
    const int64_t Bn = tt->shape[0], Sn = tt->shape[1], V = tl->shape[1];
    ck_assert_int_eq(tl->shape[0], Bn * Sn);
    int32_t *tok = malloc((size_t)(Bn * Sn) * sizeof *tok), *tgt = malloc((size_t)(Bn * Sn) * sizeof *tgt);
    double *want = tu_alloc(Bn * Sn * V), *have = tu_alloc(Bn * Sn * V), *ce = tu_alloc(Bn * Sn);
    ck_assert_int_eq(moe_st_tensor_i32(ft, tt, tok), MOE_OK);
    ck_assert_int_eq(moe_st_tensor_f64(f, tl, want), MOE_OK);
    double want_ce = NAN;
    if (tc) {
        ck_assert_int_eq(tc->shape[0], Bn * (Sn - 1));
        ck_assert_int_eq(moe_st_tensor_f64(f, tc, ce), MOE_OK);
        want_ce = 0;
        for (int64_t i = 0; i < Bn * (Sn - 1); i++)
            want_ce += ce[i] / (double)(Bn * (Sn - 1));
    }
    for (int64_t b = 0; b < Bn; b++)
        for (int64_t s = 0; s < Sn; s++)
            tgt[b * Sn + s] = s + 1 < Sn ? tok[b * Sn + s + 1] : -1;
    static const char *const backends[] = {"ref", "cpu"};
    const double tols[] = {tol, 1e-5};
    for (int k = 0; k < 2; k++) {
        moe_model_config c;
        moe_hf_arch a;
        char notes[512];
        ck_assert_msg(moe_hf_read_config(fx(dir), &c, &a, notes, sizeof notes) == MOE_OK, "%s", moe_last_error());
        moe_backend *b;
        moe_model *m;
        ck_assert_int_eq(moe_backend_create(backends[k], &(moe_backend_options){.threads = 1}, &b), MOE_OK);
        ck_assert_int_eq(moe_model_create(&c, b, NULL, Bn, Sn, &m), MOE_OK);
        ck_assert_msg(moe_hf_load_weights(fx(dir), m, a) == MOE_OK, "%s", moe_last_error());
        ck_assert_int_eq(moe_model_forward(m, tok, NULL, NULL, Bn, Sn, MOE_KEY_STEP(0), 0, NULL), MOE_OK);
        ck_assert_int_eq(moe_model_get_logits(m, have), MOE_OK);
        double e = tu_rel_err(have, want, Bn * Sn * V);
        printf("hf: %s logits on %s vs %s: rel err %.2e (rope_theta %g)\n", dir, backends[k], logits, e,
               c.rope_theta);
        fflush(stdout);
        ck_assert_double_le(e, tols[k]);
        if (tc) {
            moe_model_losses L;
            ck_assert_int_eq(moe_model_forward(m, tok, tgt, NULL, Bn, Sn, MOE_KEY_STEP(0), 0, &L), MOE_OK);
            printf("hf: %s mean cross-entropy on %s %.12f, reference %.12f\n", dir, backends[k], L.ce, want_ce);
            fflush(stdout);
            ck_assert_double_le(fabs(L.ce - want_ce), tols[k]);
        }
        moe_model_free(m);
        moe_backend_free(b);
    }
    free(tok);
    free(tgt);
    free(want);
    free(have);
    free(ce);
    moe_st_free(f);
    moe_st_free(ft);
}

START_TEST(test_fixture_mixtral)
{
    against("hf-mixtral", "hf-mixtral/logits.safetensors", "hf-mixtral/logits.safetensors", 1e-9);
}
END_TEST

START_TEST(test_fixture_qwen)
{
    against("hf-qwen2moe", "hf-qwen2moe/logits.safetensors", "hf-qwen2moe/logits.safetensors", 1e-9);
}
END_TEST

START_TEST(test_hf5_mixtral)
{
    against("hf5/hf5-mixtral", "hf5/hf5-mixtral/logits.safetensors", "hf5/hf5-mixtral/logits.safetensors", 1e-6);
}
END_TEST

START_TEST(test_hf5_qwen)
{
    against("hf5/hf5-qwen2moe", "hf5/hf5-qwen2moe/logits.safetensors", "hf5/hf5-qwen2moe/logits.safetensors", 1e-6);
}
END_TEST

/* transformers 5 loaded what `cmoe export` wrote for the hf-* models (the same weights,
 * on the hf-* tokens): its logits against cmoe's of the model exported */
START_TEST(test_export_read_by_transformers5)
{
    against("hf-mixtral", "hf-mixtral/logits.safetensors", "hf5/export-check/export-mixtral-logits.safetensors", 1e-6);
    against("hf-qwen2moe", "hf-qwen2moe/logits.safetensors", "hf5/export-check/export-qwen2moe-logits.safetensors", 1e-6);
}
END_TEST

int main(void)
{
    Suite *s = suite_create("hf_config");
    TCase *tc = tcase_create("hf_config");
    tcase_set_timeout(tc, 120);
    tcase_add_test(tc, test_config_keys);
    tcase_add_test(tc, test_rope_forms);
    tcase_add_test(tc, test_notes);
    tcase_add_test(tc, test_fixture_mixtral);
    tcase_add_test(tc, test_fixture_qwen);
    tcase_add_test(tc, test_hf5_mixtral);
    tcase_add_test(tc, test_hf5_qwen);
    tcase_add_test(tc, test_export_read_by_transformers5);
    suite_add_tcase(s, tc);
    return tu_run(s);
}
