/*
 * Hugging Face config.json (hf.h): which HF architecture a cmoe config is, the
 * config.json an export writes, and the cmoe config an HF config.json describes.
 * The weights are in hf.c.
 */
#define _POSIX_C_SOURCE 200809L
#include <errno.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <jansson.h>

#include "io/hf.h"

#define UNSUP(...) moe_error(MOE_ERR_UNSUPPORTED, __VA_ARGS__)
#define FMT(...) moe_error(MOE_ERR_FORMAT, __VA_ARGS__)

const char *moe_hf_arch_name(moe_hf_arch a)
{
    return a == MOE_HF_MIXTRAL ? "MixtralForCausalLM" : a == MOE_HF_QWEN2_MOE ? "Qwen2MoeForCausalLM" : "?";
}

/* ---- which architecture ------------------------------------------------------------ */

static int64_t head_dim(const moe_model_config *c)
{
    return c->head_dim ? c->head_dim : c->hidden_size / c->num_attention_heads;
}

static int64_t shared_width(const moe_model_config *c)
{
    const moe_layer_config *m = &c->moe;
    return m->n_shared * (m->d_ff_shared ? m->d_ff_shared : c->moe_intermediate_size);
}

static void add_reason(char *buf, size_t n, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static void add_reason(char *buf, size_t n, const char *fmt, ...)
{
    size_t at = strlen(buf);
    if (at + 3 >= n)
        return;
    if (at)
        at += (size_t)snprintf(buf + at, n - at, "; ");
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf + at, n - at, fmt, ap);
    va_end(ap);
}

moe_status moe_hf_arch_of(const moe_model_config *c, moe_hf_arch *arch)
{
    static const char *const routers[] = {"topk", "noisy_topk", "expert_choice", "hash", "sinkhorn"};
    static const char *const acts[] = {"relu", "gelu", "gelu_tanh", "geglu", "swiglu"};
    static const char *const seconds[] = {"all", "sampling", "random"};
    const moe_layer_config *m = &c->moe;
    char why[1024] = "";
    int64_t E = 0, n_moe = 0, n_dense = 0;
    for (int64_t l = 0; l < c->num_hidden_layers; l++) {
        int64_t e = moe_model_layer_experts(c, l);
        if (!e) {
            n_dense++;
            continue;
        }
        n_moe++;
        if (E && e != E)
            add_reason(why, sizeof why, "num_experts_per_layer with different expert counts (pyramid MoE; HF has one "
                       "num_experts for every layer)");
        E = E ? E : e;
    }
    if (!n_moe)
        add_reason(why, sizeof why, "no MoE layer (a dense model is not a Mixtral or Qwen2-MoE model)");
    if (m->router != MOE_ROUTER_TOPK)
        add_reason(why, sizeof why, "router '%s' (HF routes token choice top-k by softmax)", routers[m->router]);
    if (m->score != MOE_SCORE_SOFTMAX)
        add_reason(why, sizeof why, "scoring_func 'sigmoid' (HF scores by softmax)");
    if (m->capacity_factor > 0)
        add_reason(why, sizeof why, "capacity_factor %g (token dropping; HF is dropless)", m->capacity_factor);
    if (m->top_k == 2 && m->second_policy != MOE_SECOND_ALL)
        add_reason(why, sizeof why, "second_expert_policy '%s' (HF always dispatches the second expert)",
                   seconds[m->second_policy]);
    if (m->use_bias)
        add_reason(why, sizeof why, "use_expert_bias (the aux-loss-free router bias changes the selection)");
    if (m->residual)
        add_reason(why, sizeof why, "residual_moe (Residual-MoE / Arctic dense branch)");
    if (c->attention_experts > 0)
        add_reason(why, sizeof why, "attention_experts (a mixture of attention heads; HF attention is multi-head)");
    if (m->act != MOE_ACT_SWIGLU && m->act != MOE_ACT_GEGLU)
        add_reason(why, sizeof why, "hidden_act '%s' (HF experts are gated: swiglu = silu, geglu = gelu)",
                   acts[m->act]);
    moe_hf_arch a;
    if (m->n_shared > 0) {
        a = MOE_HF_QWEN2_MOE;
        if (!m->shared_gate)
            add_reason(why, sizeof why, "shared experts without shared_expert_gate (DeepSeek-MoE style; only "
                       "Qwen2-MoE's sigmoid-gated shared expert has an HF equivalent here)");
        if (head_dim(c) * c->num_attention_heads != c->hidden_size)
            add_reason(why, sizeof why, "head_dim %lld x num_attention_heads %lld != hidden_size %lld (Qwen2-MoE "
                       "requires them equal)", (long long)head_dim(c), (long long)c->num_attention_heads,
                       (long long)c->hidden_size);
    } else {
        a = MOE_HF_MIXTRAL;
        if (n_dense)
            add_reason(why, sizeof why, "%lld dense layers (first_k_dense_replace, decoder_sparse_step or zeros "
                       "in num_experts_per_layer; every Mixtral layer is MoE, and Qwen2-MoE needs a shared expert)",
                       (long long)n_dense);
        if (c->qkv_bias)
            add_reason(why, sizeof why, "qkv_bias (Mixtral has no q/k/v biases; Qwen2-MoE has them but needs a "
                       "gated shared expert)");
        if (!m->renormalize)
            add_reason(why, sizeof why, "norm_topk_prob false (Mixtral always renormalises the top-k weights)");
    }
    if (why[0])
        return UNSUP("no Hugging Face equivalent (MixtralForCausalLM or Qwen2MoeForCausalLM): %s", why);
    if (arch)
        *arch = a;
    return MOE_OK;
}

/* ---- config.json -------------------------------------------------------------------- */

/* cmoe keys with no HF meaning (training only) that ride along under "cmoe" */
static const char *const cmoe_only[] = {
    "router_jitter_noise", "router_z_loss_coef", "importance_loss_coef", "load_loss_coef", "mi_loss_coef",
    "num_tasks", "bias_update_rate", "seed", "min_capacity", "drop_policy", "sinkhorn_iters", "switch_init_scale",
    "n_shared_experts", NULL,
};

static const char *torch_dtype(moe_st_dtype d)
{
    return d == MOE_ST_BF16 ? "bfloat16" : d == MOE_ST_F16 ? "float16" : "float32";
}

moe_status moe_hf_config_to_json(const moe_model_config *c, moe_st_dtype dtype, char **out)
{
    *out = NULL;
    moe_hf_arch a;
    moe_status s = moe_hf_arch_of(c, &a);
    if (s)
        return s;
    char *ctext;
    if ((s = moe_model_config_to_json(c, 0, &ctext)))
        return s;
    json_t *cm = json_loads(ctext, 0, NULL);
    free(ctext);
    if (!cm)
        return moe_error(MOE_ERR_NOMEM, "out of memory");
    const moe_layer_config *m = &c->moe;
    json_t *j = json_object(), *extra = json_object();
    const int q = a == MOE_HF_QWEN2_MOE;
#define SET(k, v) json_object_set_new(j, k, v)
    json_t *arch = json_array();
    json_array_append_new(arch, json_string(moe_hf_arch_name(a)));
    SET("architectures", arch);
    SET("model_type", json_string(q ? "qwen2_moe" : "mixtral"));
    SET("vocab_size", json_integer(c->vocab_size));
    SET("hidden_size", json_integer(c->hidden_size));
    SET("intermediate_size", json_integer(q ? c->intermediate_size : c->moe_intermediate_size));
    if (q) {
        SET("moe_intermediate_size", json_integer(c->moe_intermediate_size));
        SET("shared_expert_intermediate_size", json_integer(shared_width(c)));
    }
    SET("num_hidden_layers", json_integer(c->num_hidden_layers));
    SET("num_attention_heads", json_integer(c->num_attention_heads));
    SET("num_key_value_heads", json_integer(c->num_key_value_heads));
    SET("head_dim", json_integer(head_dim(c)));
    SET("hidden_act", json_string(m->act == MOE_ACT_GEGLU ? "gelu" : "silu"));
    SET("max_position_embeddings", json_integer(c->max_position_embeddings));
    SET("initializer_range", json_real(c->initializer_range));
    SET("rms_norm_eps", json_real(c->rms_norm_eps));
    /* both RoPE forms: transformers 4 reads rope_theta, transformers 5 rope_parameters */
    SET("rope_theta", json_real(c->rope_theta));
    SET("rope_parameters", json_pack("{s:s, s:f}", "rope_type", "default", "rope_theta", c->rope_theta));
    SET("tie_word_embeddings", json_boolean(c->tie_word_embeddings));
    SET("use_cache", json_true());
    SET("attention_dropout", json_real(0.0));
    SET("sliding_window", json_null());
    SET(q ? "num_experts" : "num_local_experts", json_integer(m->n_experts));
    SET("num_experts_per_tok", json_integer(m->top_k));
    SET("output_router_logits", json_false());
    SET("router_aux_loss_coef", json_real(m->lb_coef));
    if (q) {
        SET("norm_topk_prob", json_boolean(m->renormalize));
        SET("decoder_sparse_step", json_integer(c->decoder_sparse_step));
        json_t *dense = json_array();
        for (int64_t l = 0; l < c->num_hidden_layers; l++)
            if (!moe_model_layer_experts(c, l) && (l + 1) % c->decoder_sparse_step == 0)
                json_array_append_new(dense, json_integer(l));
        SET("mlp_only_layers", dense);
        SET("qkv_bias", json_true());
        SET("use_sliding_window", json_false());
        SET("max_window_layers", json_integer(c->num_hidden_layers));
    } else {
        /* cmoe's jitter feeds the router only, Mixtral's also the experts: not the same */
        SET("router_jitter_noise", json_real(0.0));
    }
    /* transformers 4 reads torch_dtype, transformers 5 dtype */
    SET("torch_dtype", json_string(torch_dtype(dtype)));
    SET("dtype", json_string(torch_dtype(dtype)));
    for (int i = 0; cmoe_only[i]; i++) {
        json_t *v = json_object_get(cm, cmoe_only[i]);
        if (v)
            json_object_set(extra, cmoe_only[i], v);
    }
    if (!c->qkv_bias && q)
        json_object_set_new(extra, "qkv_bias", json_false());
    if (!q) /* the dense FFN width: unused by a model that is MoE in every layer, kept for the round trip */
        json_object_set_new(extra, "intermediate_size", json_integer(c->intermediate_size));
    SET("cmoe", extra);
#undef SET
    *out = json_dumps(j, JSON_INDENT(2) | JSON_PRESERVE_ORDER);
    json_decref(j);
    json_decref(cm);
    return *out ? MOE_OK : moe_error(MOE_ERR_NOMEM, "out of memory");
}

/* ---- reading an HF config ------------------------------------------------------------ */

static json_t *get(json_t *o, const char *k)
{
    json_t *v = json_object_get(o, k);
    return v && !json_is_null(v) ? v : NULL;
}

/* copies HF key hk (when present) to cmoe key ck */
static void copy_key(json_t *hf, json_t *cm, const char *hk, const char *ck)
{
    json_t *v = get(hf, hk);
    if (v)
        json_object_set(cm, ck, v);
}

/* a note for the caller: a key the config leaves out that changes the math, and the
 * class default taken for it (what transformers itself would use) */
#define NOTE(...) (notes ? add_reason(notes, notes_n, __VA_ARGS__) : (void)0)

static int positive_number(json_t *v)
{
    return json_is_number(v) && json_number_value(v) > 0 && isfinite(json_number_value(v));
}

/*
 * RoPE: transformers 4 writes a top-level rope_theta (and rope_scaling for the scaled
 * variants), transformers 5 rope_parameters {rope_type, rope_theta, ...}. Both are read
 * and must agree. Every rope type but "default" changes the frequencies or the
 * positions in ways cmoe does not implement, and so does a partial rotary factor: they
 * are refused by name, never run as plain RoPE.
 */
static moe_status read_rope(json_t *hf, int q, json_t *cm, char *notes, size_t notes_n)
{
    static const char *const forms[] = {"rope_parameters", "rope_scaling"};
    double theta = 0;
    char from[64] = "";
    json_t *v = get(hf, "rope_theta");
    if (v) {
        if (!positive_number(v))
            return FMT("HF config: rope_theta is not a positive number");
        theta = json_number_value(v);
        snprintf(from, sizeof from, "rope_theta");
    }
    if ((v = get(hf, "partial_rotary_factor")) && !(json_is_number(v) && json_number_value(v) == 1.0))
        return UNSUP("HF config: partial_rotary_factor has no cmoe equivalent (cmoe rotates every dimension of "
                     "a head, a factor of 1.0)");
    for (int i = 0; i < 2; i++) {
        json_t *o = get(hf, forms[i]), *x;
        if (!o)
            continue;
        if (!json_is_object(o))
            return FMT("HF config: %s is not an object", forms[i]);
        json_t *t = get(o, "rope_type") ? get(o, "rope_type") : get(o, "type");
        if (t && !json_is_string(t))
            return FMT("HF config: %s.rope_type is not a string", forms[i]);
        if (t && strcmp(json_string_value(t), "default"))
            return UNSUP("HF config: %s has rope_type '%s'; cmoe implements plain RoPE only (rope_type "
                         "\"default\"), none of the scaled variants (linear, dynamic, yarn, longrope, llama3, ...)",
                         forms[i], json_string_value(t));
        const char *key;
        json_object_foreach(o, key, x) {
            if (!strcmp(key, "rope_type") || !strcmp(key, "type") || json_is_null(x))
                continue;
            if (!strcmp(key, "rope_theta")) {
                if (!positive_number(x))
                    return FMT("HF config: %s.rope_theta is not a positive number", forms[i]);
                if (from[0] && json_number_value(x) != theta)
                    return FMT("HF config: %s.rope_theta = %.17g and %s = %.17g disagree", forms[i],
                               json_number_value(x), from, theta);
                theta = json_number_value(x);
                snprintf(from, sizeof from, "%s.rope_theta", forms[i]);
            } else if (!strcmp(key, "partial_rotary_factor")) {
                if (!(json_is_number(x) && json_number_value(x) == 1.0))
                    return UNSUP("HF config: %s.partial_rotary_factor has no cmoe equivalent (cmoe rotates every "
                                 "dimension of a head, a factor of 1.0)", forms[i]);
            } else {
                return UNSUP("HF config: %s.%s has no cmoe equivalent (cmoe implements plain RoPE: rope_type "
                             "\"default\" with rope_theta)", forms[i], key);
            }
        }
    }
    if (!from[0]) {
        theta = q ? 10000.0 : 1e6;
        NOTE("no rope_theta (top-level or in rope_parameters): %s's default %g, as transformers takes",
             q ? "Qwen2MoeConfig" : "MixtralConfig", theta);
    }
    json_object_set_new(cm, "rope_theta", json_real(theta));
    return MOE_OK;
}

/* transformers 5's layer_types: every layer must be full attention */
static moe_status read_layer_types(json_t *hf)
{
    json_t *lt = get(hf, "layer_types");
    if (!lt)
        return MOE_OK;
    if (!json_is_array(lt))
        return FMT("HF config: layer_types is not an array");
    for (size_t i = 0; i < json_array_size(lt); i++) {
        const char *t = json_string_value(json_array_get(lt, i));
        if (!t)
            return FMT("HF config: layer_types[%zu] is not a string", i);
        if (strcmp(t, "full_attention"))
            return UNSUP("HF config: layer_types[%zu] is '%s'; cmoe has full causal attention only "
                         "(\"full_attention\")", i, t);
    }
    return MOE_OK;
}

static moe_status from_hf(json_t *hf, json_t *cm, moe_hf_arch *arch, char *notes, size_t notes_n)
{
    json_t *mt = get(hf, "model_type");
    const char *t = json_is_string(mt) ? json_string_value(mt) : NULL;
    if (!t)
        return FMT("HF config: no \"model_type\" string");
    int q;
    if (!strcmp(t, "mixtral"))
        q = 0;
    else if (!strcmp(t, "qwen2_moe"))
        q = 1;
    else
        return UNSUP("HF config: model_type '%s' is not supported (cmoe imports \"mixtral\" and \"qwen2_moe\")", t);
    *arch = q ? MOE_HF_QWEN2_MOE : MOE_HF_MIXTRAL;
    json_t *v;
    moe_status s;
    if ((s = read_rope(hf, q, cm, notes, notes_n)) || (s = read_layer_types(hf)))
        return s;
    if (q && (v = get(hf, "use_sliding_window")) && json_is_true(v))
        return UNSUP("HF config: use_sliding_window has no cmoe equivalent (full causal attention only)");
    if (!q && (v = get(hf, "sliding_window")) && json_is_integer(v) && get(hf, "max_position_embeddings") &&
        json_integer_value(v) < json_integer_value(get(hf, "max_position_embeddings")))
        return UNSUP("HF config: sliding_window %lld is shorter than max_position_embeddings: no cmoe equivalent "
                     "(full causal attention only)", (long long)json_integer_value(v));
    if ((v = get(hf, "hidden_act")) && !json_is_string(v))
        return FMT("HF config: hidden_act is not a string");
    if (!v)
        NOTE("no hidden_act: silu, the default of both classes");
    const char *act = v ? json_string_value(v) : "silu";
    if (!strcmp(act, "silu") || !strcmp(act, "swish"))
        json_object_set_new(cm, "hidden_act", json_string("swiglu"));
    else if (!strcmp(act, "gelu"))
        json_object_set_new(cm, "hidden_act", json_string("geglu"));
    else
        return UNSUP("HF config: hidden_act '%s' has no cmoe equivalent (silu or gelu)", act);
    /* the HF classes' defaults for keys a config.json leaves out (MixtralConfig,
     * Qwen2MoeConfig __init__), then the keys it has */
    static const char *const dkeys[] = {"vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                        "num_attention_heads", "num_key_value_heads", "max_position_embeddings",
                                        "num_experts_per_tok", "moe_intermediate_size",
                                        "shared_expert_intermediate_size", "num_experts", "num_local_experts",
                                        NULL};
    static const json_int_t dmix[] = {32000, 4096, 14336, 32, 32, 8, 131072, 2, 0, 0, 0, 8};
    static const json_int_t dqwen[] = {151936, 2048, 5632, 24, 16, 16, 32768, 4, 1408, 5632, 60, 0};
    /* most of them fix tensor shapes, which the weights are checked against; top-k
     * and eps change the math and nothing else would show it, so they are noted */
    for (int i = 0; dkeys[i]; i++)
        if (!get(hf, dkeys[i]) && (q ? dqwen[i] : dmix[i])) {
            json_object_set_new(hf, dkeys[i], json_integer(q ? dqwen[i] : dmix[i]));
            if (!strcmp(dkeys[i], "num_experts_per_tok"))
                NOTE("no num_experts_per_tok: the class default %lld", (long long)(q ? dqwen[i] : dmix[i]));
        }
    if (!get(hf, "rms_norm_eps")) {
        json_object_set_new(hf, "rms_norm_eps", json_real(q ? 1e-6 : 1e-5));
        NOTE("no rms_norm_eps: the class default %g", q ? 1e-6 : 1e-5);
    }
    if (!get(hf, "initializer_range"))
        json_object_set_new(hf, "initializer_range", json_real(0.02));
    if (!get(hf, "router_aux_loss_coef"))
        json_object_set_new(hf, "router_aux_loss_coef", json_real(0.001));
    json_t *jc = get(hf, "hidden_size"), *jh = get(hf, "num_attention_heads");
    if (!get(hf, "head_dim") && json_is_integer(jc) && json_is_integer(jh) && json_integer_value(jh) > 0)
        json_object_set_new(hf, "head_dim", json_integer(json_integer_value(jc) / json_integer_value(jh)));
    static const char *const same[] = {"vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                                       "num_key_value_heads", "head_dim", "max_position_embeddings",
                                       "rms_norm_eps", "initializer_range", "num_experts_per_tok",
                                       "router_aux_loss_coef", NULL};
    for (int i = 0; same[i]; i++)
        copy_key(hf, cm, same[i], same[i]);
    json_object_set_new(cm, "tie_word_embeddings", json_boolean(json_is_true(get(hf, "tie_word_embeddings"))));
    /* MoE keys HF fixes: every one set, so no cmoe default leaks in */
    json_object_set_new(cm, "router", json_string("topk"));
    json_object_set_new(cm, "scoring_func", json_string("softmax"));
    json_object_set_new(cm, "second_expert_policy", json_string("all"));
    json_object_set_new(cm, "capacity_factor", json_real(0));
    json_object_set_new(cm, "use_expert_bias", json_false());
    json_object_set_new(cm, "residual_moe", json_false());
    json_object_set_new(cm, "router_jitter_noise", json_real(0));
    json_object_set_new(cm, "router_z_loss_coef", json_real(0));
    json_object_set_new(cm, "importance_loss_coef", json_real(0));
    json_object_set_new(cm, "load_loss_coef", json_real(0));
    json_object_set_new(cm, "mi_loss_coef", json_real(0));
    json_object_set_new(cm, "switch_init_scale", json_real(0));
    if (!q) {
        copy_key(hf, cm, "intermediate_size", "intermediate_size");
        copy_key(hf, cm, "intermediate_size", "moe_intermediate_size");
        copy_key(hf, cm, "num_local_experts", "num_local_experts");
        copy_key(hf, cm, "router_jitter_noise", "router_jitter_noise");
        json_object_set_new(cm, "norm_topk_prob", json_true());
        json_object_set_new(cm, "qkv_bias", json_false());
        json_object_set_new(cm, "decoder_sparse_step", json_integer(1));
        json_object_set_new(cm, "first_k_dense_replace", json_integer(0));
        json_object_set_new(cm, "n_shared_experts", json_integer(0));
        json_object_set_new(cm, "shared_expert_intermediate_size", json_integer(0));
        json_object_set_new(cm, "shared_expert_gate", json_false());
        return MOE_OK;
    }
    copy_key(hf, cm, "intermediate_size", "intermediate_size");
    copy_key(hf, cm, "moe_intermediate_size", "moe_intermediate_size");
    copy_key(hf, cm, "num_experts", "num_local_experts");
    copy_key(hf, cm, "decoder_sparse_step", "decoder_sparse_step");
    if (!get(hf, "norm_topk_prob"))
        NOTE("no norm_topk_prob: false, Qwen2MoeConfig's default");
    json_object_set_new(cm, "norm_topk_prob", json_boolean(json_is_true(get(hf, "norm_topk_prob"))));
    v = get(hf, "qkv_bias");
    json_object_set_new(cm, "qkv_bias", json_boolean(!v || json_is_true(v)));
    json_t *fs = get(hf, "shared_expert_intermediate_size");
    if (!json_is_integer(fs) || json_integer_value(fs) < 1)
        return FMT("HF config: qwen2_moe needs shared_expert_intermediate_size >= 1");
    json_object_set_new(cm, "n_shared_experts", json_integer(1));
    json_object_set(cm, "shared_expert_intermediate_size", fs);
    json_object_set_new(cm, "shared_expert_gate", json_true());
    /* mlp_only_layers: a prefix 0..k-1 is first_k_dense_replace, anything else a per-layer list */
    json_t *mlp = get(hf, "mlp_only_layers");
    json_object_set_new(cm, "first_k_dense_replace", json_integer(0));
    if (mlp && !json_is_array(mlp))
        return FMT("HF config: mlp_only_layers is not an array");
    size_t n = mlp ? json_array_size(mlp) : 0, i;
    int prefix = 1;
    for (i = 0; i < n; i++)
        if (!json_is_integer(json_array_get(mlp, i)))
            return FMT("HF config: mlp_only_layers[%zu] is not an integer", i);
        else if (json_integer_value(json_array_get(mlp, i)) != (json_int_t)i)
            prefix = 0;
    if (prefix) {
        json_object_set_new(cm, "first_k_dense_replace", json_integer((json_int_t)n));
        return MOE_OK;
    }
    json_t *L = get(hf, "num_hidden_layers"), *E = get(hf, "num_experts");
    if (!json_is_integer(L) || !json_is_integer(E) || json_integer_value(L) > MOE_MODEL_MAX_LAYERS ||
        json_integer_value(L) < 1)
        return FMT("HF config: num_hidden_layers and num_experts must be integers (layers <= %d)",
                   MOE_MODEL_MAX_LAYERS);
    json_t *per = json_array();
    for (json_int_t l = 0; l < json_integer_value(L); l++) {
        int dense = 0;
        for (i = 0; i < n; i++)
            dense |= json_integer_value(json_array_get(mlp, i)) == l;
        json_array_append_new(per, json_integer(dense ? 0 : json_integer_value(E)));
    }
    json_object_set_new(cm, "num_experts_per_layer", per);
    return MOE_OK;
}

moe_status moe_hf_config_from_json(const char *text, moe_model_config *c, moe_hf_arch *arch, char *notes,
                                   size_t notes_n)
{
    if (notes && notes_n)
        notes[0] = '\0';
    else
        notes = NULL;
    json_error_t err;
    json_t *hf = json_loads(text, JSON_REJECT_DUPLICATES, &err);
    if (!hf || !json_is_object(hf)) {
        json_decref(hf);
        return FMT("HF config: not a JSON object%s%s", hf ? "" : ": ", hf ? "" : err.text);
    }
    json_t *cm = json_object();
    moe_hf_arch a = MOE_HF_MIXTRAL;
    moe_status s = from_hf(hf, cm, &a, notes, notes_n);
    /* the training-only keys an export carried along */
    json_t *extra = get(hf, "cmoe"), *v;
    const char *key;
    if (!s && extra && json_is_object(extra)) {
        json_object_foreach(extra, key, v) {
            if (!strcmp(key, "n_shared_experts") && a == MOE_HF_QWEN2_MOE) {
                json_int_t k = json_is_integer(v) ? json_integer_value(v) : 0;
                json_int_t fs = json_integer_value(json_object_get(cm, "shared_expert_intermediate_size"));
                if (k >= 1 && fs % k == 0) {
                    json_object_set(cm, key, v);
                    json_object_set_new(cm, "shared_expert_intermediate_size", json_integer(fs / k));
                }
            } else if (!strcmp(key, "qkv_bias")) {
                /* a model without biases exported with zero biases: keep them (they are parameters now) */
            } else if (!strcmp(key, "intermediate_size") && a == MOE_HF_QWEN2_MOE) {
                /* Qwen2-MoE's own key says it */
            } else if (strcmp(key, "n_shared_experts")) {
                json_object_set(cm, key, v);
            }
        }
    }
    char *ctext = s ? NULL : json_dumps(cm, JSON_COMPACT);
    json_decref(cm);
    json_decref(hf);
    if (s)
        return s;
    if (!ctext)
        return moe_error(MOE_ERR_NOMEM, "out of memory");
    moe_model_config_default(c);
    s = moe_model_config_from_json(ctext, c);
    free(ctext);
    if (s || (s = moe_model_config_validate(c))) {
        char why[1024]; /* moe_error writes into the buffer moe_last_error returns */
        snprintf(why, sizeof why, "%s", moe_last_error());
        return moe_error(s, "HF config: %s", why);
    }
    if (arch)
        *arch = a;
    return MOE_OK;
}

static moe_status slurp(const char *path, char **out)
{
    *out = NULL;
    FILE *f = fopen(path, "rb");
    if (!f)
        return moe_error(MOE_ERR_IO, "cannot open '%s': %s", path, strerror(errno));
    size_t cap = 1 << 14, n = 0;
    char *buf = malloc(cap);
    size_t got;
    while (buf && (got = fread(buf + n, 1, cap - n - 1, f)) > 0) {
        n += got;
        if (n + 1 == cap) {
            if (cap > ((size_t)1 << 28)) {
                free(buf);
                fclose(f);
                return FMT("'%s' is larger than 256 MiB: not a config", path);
            }
            char *nb = realloc(buf, cap *= 2);
            if (!nb)
                free(buf);
            buf = nb;
        }
    }
    int err = ferror(f);
    fclose(f);
    if (!buf)
        return moe_error(MOE_ERR_NOMEM, "out of memory reading '%s'", path);
    if (err) {
        free(buf);
        return moe_error(MOE_ERR_IO, "cannot read '%s'", path);
    }
    buf[n] = '\0';
    *out = buf;
    return MOE_OK;
}

static moe_status join(char *buf, size_t n, const char *dir, const char *name)
{
    int k = snprintf(buf, n, "%s/%s", dir, name);
    return k < 0 || (size_t)k >= n ? moe_error(MOE_ERR_ARG, "path '%s/%s' is too long", dir, name) : MOE_OK;
}

moe_status moe_hf_read_config(const char *dir, moe_model_config *c, moe_hf_arch *arch, char *notes, size_t notes_n)
{
    char path[4096], *text;
    moe_status s = join(path, sizeof path, dir, "config.json");
    if (s || (s = slurp(path, &text)))
        return s;
    s = moe_hf_config_from_json(text, c, arch, notes, notes_n);
    free(text);
    if (!s)
        return MOE_OK;
    char why[1024];
    snprintf(why, sizeof why, "%s", moe_last_error());
    return moe_error(s, "%s: %s", path, why);
}

