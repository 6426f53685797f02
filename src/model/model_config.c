/*
 * The language model's configuration: presets, validation, JSON with Hugging Face keys.
 * The MoE-layer keys are parsed by the layer's own table (config_json.c) from the same
 * flat object, so the model config is one HF-style object (as Mixtral's config.json).
 */
#define _POSIX_C_SOURCE 200809L /* stat */
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include <jansson.h>

#include "core/input.h"
#include "model/model.h"
#include "ref/ref.h"

static void common_defaults(moe_model_config *c)
{
    memset(c, 0, sizeof *c);
    moe_layer_config_default(&c->moe);
    c->rope_theta = 10000.0;
    c->rms_norm_eps = 1e-5;
    c->decoder_sparse_step = 1;
    c->attention_experts_per_tok = 2;
    c->initializer_range = 0.02;
    c->moe.act = MOE_ACT_SWIGLU;
    c->moe.top_k = 2;
    c->moe.renormalize = 1;
    c->moe.capacity_factor = 0; /* dropless, as Mixtral */
    c->moe.lb_coef = 0.01;      /* Mixtral's router_aux_loss_coef is 0.02 at E = 8; 0.01 as Switch */
    c->moe.z_coef = 0.001;      /* ST-MoE */
}

void moe_model_config_default(moe_model_config *c)
{
    common_defaults(c);
    c->vocab_size = 256;
    c->hidden_size = 128;
    c->intermediate_size = 512;
    c->moe_intermediate_size = 256;
    c->num_hidden_layers = 4;
    c->num_attention_heads = 4;
    c->num_key_value_heads = 4;
    c->head_dim = 32;
    c->max_position_embeddings = 128; /* what cmoe train trains it on (--seq 128): no position it never saw */
    c->moe.n_experts = 8;
    c->moe.d_model = c->hidden_size;
    c->moe.d_ff = c->moe_intermediate_size;
}

void moe_model_config_tiny(moe_model_config *c)
{
    common_defaults(c);
    c->vocab_size = 32;
    c->hidden_size = 16;
    c->intermediate_size = 32;
    c->moe_intermediate_size = 16;
    c->num_hidden_layers = 3;
    c->num_attention_heads = 4;
    c->num_key_value_heads = 2;
    c->head_dim = 4;
    c->max_position_embeddings = 64;
    c->qkv_bias = 1;
    c->first_k_dense_replace = 1;
    c->n_experts_per_layer = 3;
    c->num_experts_per_layer[0] = 0;
    c->num_experts_per_layer[1] = 4;
    c->num_experts_per_layer[2] = 6;
    c->moe.n_experts = 4;
    c->moe.d_model = c->hidden_size;
    c->moe.d_ff = c->moe_intermediate_size;
}

moe_status moe_model_config_preset(const char *name, moe_model_config *c)
{
    if (name && !strcmp(name, "laptop"))
        moe_model_config_default(c);
    else if (name && !strcmp(name, "tiny"))
        moe_model_config_tiny(c);
    else
        return moe_error(MOE_ERR_ARG, "config: unknown preset '%s' (laptop or tiny)", name ? name : "(null)");
    return MOE_OK;
}

int64_t moe_model_layer_experts(const moe_model_config *c, int64_t l)
{
    if (l < 0 || l >= c->num_hidden_layers || l < c->first_k_dense_replace || c->decoder_sparse_step < 1 ||
        (l + 1) % c->decoder_sparse_step != 0)
        return 0;
    if (c->n_experts_per_layer > 0)
        return l < c->n_experts_per_layer ? c->num_experts_per_layer[l] : 0;
    return c->moe.n_experts;
}

moe_status moe_model_layer_config(const moe_model_config *c, int64_t l, moe_layer_config *out)
{
    int64_t E = moe_model_layer_experts(c, l);
    *out = c->moe;
    out->d_model = c->hidden_size;
    out->d_ff = c->moe_intermediate_size;
    out->n_experts = E > 0 ? E : c->moe.n_experts;
    out->layer = l;
    if (E <= 0)
        return moe_error(MOE_ERR_ARG, "config: layer %lld is a dense layer, not MoE", (long long)l);
    return MOE_OK;
}

#define BAD(...) return moe_error(MOE_ERR_ARG, __VA_ARGS__)

moe_status moe_model_config_validate(const moe_model_config *c)
{
    if (c->vocab_size < 2 || c->vocab_size > INT32_MAX)
        BAD("config: vocab_size must be in [2, 2^31) (got %lld)", (long long)c->vocab_size);
    if (c->hidden_size < 1 || c->hidden_size > 1 << 20)
        BAD("config: hidden_size must be in [1, 2^20] (got %lld)", (long long)c->hidden_size);
    if (c->intermediate_size < 1 || c->intermediate_size > 1 << 24)
        BAD("config: intermediate_size must be in [1, 2^24] (got %lld)", (long long)c->intermediate_size);
    if (c->moe_intermediate_size < 1 || c->moe_intermediate_size > 1 << 24)
        BAD("config: moe_intermediate_size must be in [1, 2^24] (got %lld)", (long long)c->moe_intermediate_size);
    if (c->num_hidden_layers < 1 || c->num_hidden_layers > MOE_MODEL_MAX_LAYERS)
        BAD("config: num_hidden_layers must be in [1, %d] (got %lld)", MOE_MODEL_MAX_LAYERS,
            (long long)c->num_hidden_layers);
    if (c->num_attention_heads < 1 || c->num_attention_heads > 4096)
        BAD("config: num_attention_heads must be in [1, 4096] (got %lld)", (long long)c->num_attention_heads);
    if (c->num_key_value_heads < 1 || c->num_attention_heads % c->num_key_value_heads != 0)
        BAD("config: num_key_value_heads (%lld) must be >= 1 and divide num_attention_heads (%lld)",
            (long long)c->num_key_value_heads, (long long)c->num_attention_heads);
    if (c->head_dim < 0 || c->head_dim > 4096)
        BAD("config: head_dim must be in [0, 4096] (0: hidden_size / num_attention_heads; got %lld)",
            (long long)c->head_dim);
    int64_t hd = c->head_dim ? c->head_dim : c->hidden_size / c->num_attention_heads;
    if (!c->head_dim && c->hidden_size % c->num_attention_heads)
        BAD("config: head_dim: hidden_size (%lld) is not a multiple of num_attention_heads (%lld); give head_dim",
            (long long)c->hidden_size, (long long)c->num_attention_heads);
    if (hd < 2 || hd % 2)
        BAD("config: head_dim must be even and >= 2 for rotary embeddings (got %lld)", (long long)hd);
    if (c->max_position_embeddings < 1 || c->max_position_embeddings > 1 << 20)
        BAD("config: max_position_embeddings must be in [1, 2^20] (got %lld)", (long long)c->max_position_embeddings);
    if (!isfinite(c->rope_theta) || c->rope_theta <= 1)
        BAD("config: rope_theta must be a finite number > 1 (got %g)", c->rope_theta);
    if (!isfinite(c->rms_norm_eps) || c->rms_norm_eps <= 0 || c->rms_norm_eps > 1)
        BAD("config: rms_norm_eps must be in (0, 1] (got %g)", c->rms_norm_eps);
    if (c->decoder_sparse_step < 1 || c->decoder_sparse_step > MOE_MODEL_MAX_LAYERS)
        BAD("config: decoder_sparse_step must be in [1, %d] (got %lld)", MOE_MODEL_MAX_LAYERS,
            (long long)c->decoder_sparse_step);
    if (c->first_k_dense_replace < 0 || c->first_k_dense_replace > c->num_hidden_layers)
        BAD("config: first_k_dense_replace must be in [0, num_hidden_layers = %lld] (got %lld)",
            (long long)c->num_hidden_layers, (long long)c->first_k_dense_replace);
    if (c->n_experts_per_layer < 0 || c->n_experts_per_layer > MOE_MODEL_MAX_LAYERS ||
        (c->n_experts_per_layer > 0 && c->n_experts_per_layer != c->num_hidden_layers))
        BAD("config: num_experts_per_layer must have num_hidden_layers = %lld entries (got %lld)",
            (long long)c->num_hidden_layers, (long long)c->n_experts_per_layer);
    for (int64_t l = 0; l < c->n_experts_per_layer; l++)
        if (c->num_experts_per_layer[l] < 0 || c->num_experts_per_layer[l] > INT32_MAX)
            BAD("config: num_experts_per_layer[%lld] must be >= 0 (0: dense layer; got %lld)", (long long)l,
                (long long)c->num_experts_per_layer[l]);
    /* the standard deviation of the initial weights: Hugging Face's default is 0.02, and
     * above 1 the first forward pass of a deep model overflows rather than learns */
    if (!(c->initializer_range > 0 && c->initializer_range <= 1))
        BAD("config: initializer_range must be in (0, 1] (a standard deviation; 0.02 is usual; got %g)",
            c->initializer_range);
    if (!(c->switch_init_scale >= 0 && c->switch_init_scale <= 10))
        BAD("config: switch_init_scale must be in [0, 10] (0: off; Switch uses 0.1; got %g)", c->switch_init_scale);
    if (c->attention_experts < 0 || c->attention_experts > 1 << 20)
        BAD("config: attention_experts must be in [0, 2^20] (0: multi-head attention; got %lld)",
            (long long)c->attention_experts);
    if (c->attention_experts > 0) {
        if (c->attention_experts_per_tok < 1 || c->attention_experts_per_tok > c->attention_experts)
            BAD("config: attention_experts_per_tok must be in [1, attention_experts = %lld] (got %lld)",
                (long long)c->attention_experts, (long long)c->attention_experts_per_tok);
        if (c->qkv_bias)
            BAD("config: qkv_bias: a mixture of attention heads (attention_experts) has no q/k/v biases; "
                "set it to false");
    }
    /* the MoE keys (and hidden_act, which the dense layers use too) */
    moe_layer_config lc = c->moe;
    lc.d_model = c->hidden_size;
    lc.d_ff = c->moe_intermediate_size;
    lc.layer = 0;
    moe_status s = moe_layer_config_validate(&lc, 1);
    if (s)
        return s;
    for (int64_t l = 0; l < c->num_hidden_layers; l++) {
        if (moe_model_layer_experts(c, l) <= 0)
            continue;
        moe_model_layer_config(c, l, &lc);
        if ((s = moe_layer_config_validate(&lc, 1))) {
            char msg[512];
            snprintf(msg, sizeof msg, "%s", moe_last_error());
            return moe_error(s, "config: layer %lld (num_experts_per_layer[%lld] = %lld): %s", (long long)l,
                             (long long)l, (long long)lc.n_experts,
                             strncmp(msg, "config: ", 8) == 0 ? msg + 8 : msg);
        }
    }
    return MOE_OK;
}

/* ---- JSON ------------------------------------------------------------------------ */

typedef enum { M_INT, M_NUM, M_BOOL } mkind;

typedef struct {
    const char *name;
    mkind kind;
    size_t off;
} mkey;

#define O(f) offsetof(moe_model_config, f)
/* the model's own keys; hidden_size and intermediate_size belong to the layer's table */
static const mkey mkeys[] = {
    {"vocab_size", M_INT, O(vocab_size)},
    {"moe_intermediate_size", M_INT, O(moe_intermediate_size)},
    {"num_hidden_layers", M_INT, O(num_hidden_layers)},
    {"num_attention_heads", M_INT, O(num_attention_heads)},
    {"num_key_value_heads", M_INT, O(num_key_value_heads)},
    {"head_dim", M_INT, O(head_dim)},
    {"max_position_embeddings", M_INT, O(max_position_embeddings)},
    {"rope_theta", M_NUM, O(rope_theta)},
    {"rms_norm_eps", M_NUM, O(rms_norm_eps)},
    {"tie_word_embeddings", M_BOOL, O(tie_word_embeddings)},
    {"qkv_bias", M_BOOL, O(qkv_bias)},
    {"decoder_sparse_step", M_INT, O(decoder_sparse_step)},
    {"first_k_dense_replace", M_INT, O(first_k_dense_replace)},
    {"initializer_range", M_NUM, O(initializer_range)},
    {"switch_init_scale", M_NUM, O(switch_init_scale)},
};
#define NMKEYS ((int)(sizeof mkeys / sizeof mkeys[0]))

static const char *const extra_keys[] = {
    "vocab_size", "moe_intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
    "head_dim", "max_position_embeddings", "rope_theta", "rms_norm_eps", "tie_word_embeddings", "qkv_bias",
    "decoder_sparse_step", "first_k_dense_replace", "initializer_range", "switch_init_scale",
    "num_experts_per_layer", "model_type", "architectures", "attention_experts", "attention_experts_per_tok", NULL,
};

static moe_status set_mkey(const mkey *k, json_t *v, moe_model_config *c)
{
    char *f = (char *)c + k->off;
    switch (k->kind) {
    case M_INT:
        if (!json_is_integer(v))
            BAD("config: %s must be an integer", k->name);
        if (json_integer_value(v) < 0 || json_integer_value(v) > INT32_MAX)
            BAD("config: %s must be an integer in [0, 2^31) (got %lld)", k->name, (long long)json_integer_value(v));
        *(int64_t *)f = (int64_t)json_integer_value(v);
        return MOE_OK;
    case M_NUM:
        if (!json_is_number(v))
            BAD("config: %s must be a number", k->name);
        *(double *)f = json_number_value(v);
        return MOE_OK;
    case M_BOOL:
        if (!json_is_boolean(v))
            BAD("config: %s must be true or false", k->name);
        *(int *)f = json_is_true(v);
        return MOE_OK;
    }
    return MOE_ERR_ARG;
}

static moe_status parse_obj(json_t *root, moe_model_config *out)
{
    if (!json_is_object(root))
        BAD("config: the top level must be a JSON object");
    moe_model_config c;
    moe_model_config_default(&c);
    c.moe.d_model = c.hidden_size;
    c.moe.d_ff = c.intermediate_size;
    moe_status s = moe_layer_config_from_json_obj(root, &c.moe, extra_keys);
    if (s)
        return s;
    c.hidden_size = c.moe.d_model;
    int has_inter = json_object_get(root, "intermediate_size") != NULL;
    if (has_inter)
        c.intermediate_size = c.moe.d_ff;
    for (int i = 0; i < NMKEYS; i++) {
        json_t *v = json_object_get(root, mkeys[i].name);
        if (v && (s = set_mkey(&mkeys[i], v, &c)))
            return s;
    }
    /* mixture of attention heads: cmoe's own keys, written only when used */
    static const char *const moa_keys[2] = {"attention_experts", "attention_experts_per_tok"};
    int64_t *moa_field[2] = {&c.attention_experts, &c.attention_experts_per_tok};
    for (int i = 0; i < 2; i++) {
        json_t *v = json_object_get(root, moa_keys[i]);
        if (v && (!json_is_integer(v) || json_integer_value(v) < 0 || json_integer_value(v) > INT32_MAX))
            BAD("config: %s must be an integer in [0, 2^31)", moa_keys[i]);
        if (v)
            *moa_field[i] = (int64_t)json_integer_value(v);
    }
    if (has_inter && !json_object_get(root, "moe_intermediate_size"))
        c.moe_intermediate_size = c.intermediate_size; /* Mixtral: the experts' size */
    json_t *arr = json_object_get(root, "num_experts_per_layer");
    if (arr && !json_is_null(arr)) {
        if (!json_is_array(arr))
            BAD("config: num_experts_per_layer must be an array of integers (one per layer, 0 = dense)");
        size_t n = json_array_size(arr);
        if (n > MOE_MODEL_MAX_LAYERS)
            BAD("config: num_experts_per_layer has %zu entries, at most %d", n, MOE_MODEL_MAX_LAYERS);
        for (size_t i = 0; i < n; i++) {
            json_t *e = json_array_get(arr, i);
            if (!json_is_integer(e) || json_integer_value(e) < 0 || json_integer_value(e) > INT32_MAX)
                BAD("config: num_experts_per_layer[%zu] must be an integer >= 0", i);
            c.num_experts_per_layer[i] = (int64_t)json_integer_value(e);
        }
        c.n_experts_per_layer = (int64_t)n;
    }
    c.moe.d_model = c.hidden_size;
    c.moe.d_ff = c.moe_intermediate_size;
    if ((s = moe_model_config_validate(&c)))
        return s;
    *out = c;
    return MOE_OK;
}

moe_status moe_model_config_from_json(const char *text, moe_model_config *c)
{
    if (!text)
        BAD("config: no JSON text");
    json_error_t err;
    json_t *root = json_loads(text, JSON_REJECT_DUPLICATES | JSON_DECODE_ANY, &err);
    if (!root)
        return moe_error(MOE_ERR_FORMAT, "config: invalid JSON at line %d, column %d: %s", err.line, err.column,
                         err.text);
    moe_status s = parse_obj(root, c);
    json_decref(root);
    return s;
}

moe_status moe_model_config_load(const char *path, moe_model_config *c)
{
    if (!path)
        BAD("config: no path");
    struct stat sb;
    if (stat(path, &sb) == 0 && S_ISDIR(sb.st_mode)) /* jansson would say "invalid JSON at line 1" */
        return moe_error(MOE_ERR_IO, "config %s: is a directory, not a JSON file", path);
    json_error_t err;
    char *text;
    size_t len;
    /* bounded, and never blocking on a FIFO before it is known to be one (core/input.h) */
    moe_status rs = moe_read_all(path, "config", MOE_JSON_MAX, MOE_IN_STREAM, &text, &len);
    if (rs)
        return rs;
    json_t *root = json_loadb(text, len, JSON_REJECT_DUPLICATES | JSON_DECODE_ANY, &err);
    free(text);
    if (!root)
        return moe_error(MOE_ERR_FORMAT, "config %s: invalid JSON at line %d, column %d: %s", path, err.line,
                         err.column, err.text);
    moe_status s = parse_obj(root, c);
    json_decref(root);
    if (s) {
        char msg[1024];
        snprintf(msg, sizeof msg, "%s", moe_last_error());
        moe_error(s, "config %s: %s", path, strncmp(msg, "config: ", 8) == 0 ? msg + 8 : msg);
    }
    return s;
}

static int put(json_t *o, const char *k, json_t *v)
{
    return !v || json_object_set_new(o, k, v);
}

moe_status moe_model_config_to_json(const moe_model_config *c, int pretty, char **out)
{
    *out = NULL;
    moe_layer_config lc = c->moe;
    lc.d_model = c->hidden_size;
    lc.d_ff = c->intermediate_size;
    char *ltext = NULL;
    moe_status s = moe_layer_config_to_json(&lc, 0, &ltext);
    if (s)
        return s;
    json_t *layer = json_loads(ltext, 0, NULL);
    free(ltext);
    json_t *root = json_object();
    int bad = !layer || !root;
    bad = bad || put(root, "model_type", json_string("cmoe"));
    bad = bad || put(root, "vocab_size", json_integer(c->vocab_size));
    bad = bad || put(root, "hidden_size", json_integer(c->hidden_size));
    bad = bad || put(root, "intermediate_size", json_integer(c->intermediate_size));
    for (int i = 0; i < NMKEYS && !bad; i++) {
        const mkey *k = &mkeys[i];
        const char *f = (const char *)c + k->off;
        json_t *v = k->kind == M_INT ? json_integer(*(const int64_t *)f)
                    : k->kind == M_NUM ? json_real(*(const double *)f)
                                       : json_boolean(*(const int *)f);
        bad = put(root, k->name, v);
    }
    if (!bad) {
        json_t *arr = json_array();
        for (int64_t l = 0; arr && l < c->n_experts_per_layer; l++)
            json_array_append_new(arr, json_integer(c->num_experts_per_layer[l]));
        bad = put(root, "num_experts_per_layer", arr);
    }
    if (!bad && c->attention_experts > 0) /* absent when off: configs without MoA stay as they were */
        bad = put(root, "attention_experts", json_integer(c->attention_experts)) ||
              put(root, "attention_experts_per_tok", json_integer(c->attention_experts_per_tok));
    const char *key;
    json_t *v;
    if (!bad)
        json_object_foreach(layer, key, v) {
            if (json_object_get(root, key) || !strcmp(key, "layer_index"))
                continue;
            if ((bad = json_object_set(root, key, v)))
                break;
        }
    if (!bad)
        *out = json_dumps(root, (pretty ? JSON_INDENT(2) : JSON_COMPACT) | JSON_PRESERVE_ORDER |
                                    JSON_REAL_PRECISION(17));
    json_decref(layer);
    json_decref(root);
    return *out ? MOE_OK : moe_error(MOE_ERR_NOMEM, "config: cannot write the model config as JSON");
}

int64_t moe_model_config_param_count(const moe_model_config *c)
{
    const int64_t V = c->vocab_size, C = c->hidden_size, H = c->num_attention_heads, Hkv = c->num_key_value_heads;
    const int64_t hd = c->head_dim ? c->head_dim : C / H;
    const int glu = moe_act_is_glu(c->moe.act);
    int64_t n = V * C * (c->tie_word_embeddings ? 1 : 2) + C;
    const int64_t Ea = c->attention_experts;
    for (int64_t l = 0; l < c->num_hidden_layers; l++) {
        if (Ea > 0) /* router, shared k and v, each expert's q and o */
            n += 2 * C + C * Ea + 2 * C * hd + Ea * 2 * C * hd;
        else
            n += 2 * C + C * (H + 2 * Hkv) * hd + H * hd * C + (c->qkv_bias ? (H + 2 * Hkv) * hd : 0);
        int64_t E = moe_model_layer_experts(c, l);
        if (!E) {
            n += (glu ? 3 : 2) * C * c->intermediate_size;
            continue;
        }
        moe_layer_config lc;
        moe_model_layer_config(c, l, &lc);
        const int64_t f = lc.d_ff, Fs = lc.n_shared * (lc.d_ff_shared > 0 ? lc.d_ff_shared : lc.d_ff);
        const int64_t Fd = lc.residual ? (lc.d_ff_dense > 0 ? lc.d_ff_dense : lc.d_ff) : 0;
        n += lc.router != MOE_ROUTER_HASH ? C * E : 0;
        n += lc.router == MOE_ROUTER_NOISY_TOPK ? C * E : 0;
        n += lc.use_bias ? E : 0;
        n += E * (glu ? 3 : 2) * C * f;
        n += (glu ? 3 : 2) * C * Fs + (lc.shared_gate && Fs ? C : 0);
        n += Fd ? (glu ? 3 : 2) * C * Fd + 2 * C : 0;
    }
    return n;
}
