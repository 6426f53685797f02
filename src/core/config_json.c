/*
 * The MoE layer configuration as JSON: Hugging Face keys where HF has one, cmoe's own
 * otherwise. One table drives parsing, the error messages and serialisation, so the
 * three cannot disagree.
 */
#define _POSIX_C_SOURCE 200809L /* stat */
#include <errno.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include <jansson.h>

#include "cmoe.h"
#include "core/input.h"

typedef enum { K_INT, K_U64, K_NUM, K_BOOL, K_ENUM } key_kind;

static const char *const routers[] = {"topk", "noisy_topk", "expert_choice", "hash", "sinkhorn", NULL};
static const char *const scores[] = {"softmax", "sigmoid", NULL};
static const char *const seconds[] = {"all", "sampling", "random", NULL};
static const char *const drops[] = {"position", "probability", NULL};
static const char *const acts[] = {"relu", "gelu", "gelu_tanh", "geglu", "swiglu", NULL};

typedef struct {
    const char *name;
    key_kind kind;
    size_t off;
    int64_t min, max;           /* K_INT, K_U64 */
    const char *const *names;   /* K_ENUM, in enum order */
} key_spec;

_Static_assert(sizeof(moe_router_kind) == sizeof(int) && sizeof(moe_score_fn) == sizeof(int) &&
                   sizeof(moe_second_policy) == sizeof(int) && sizeof(moe_drop_policy) == sizeof(int) &&
                   sizeof(moe_activation) == sizeof(int),
               "enum fields are stored through int");

#define F(field) offsetof(moe_layer_config, field)
#define I32MAX ((int64_t)INT32_MAX)

static const key_spec keys[] = {
    {"hidden_size", K_INT, F(d_model), 1, I32MAX, NULL},
    {"intermediate_size", K_INT, F(d_ff), 1, I32MAX, NULL},
    {"num_local_experts", K_INT, F(n_experts), 1, I32MAX, NULL},
    {"num_experts_per_tok", K_INT, F(top_k), 1, I32MAX, NULL},
    {"router", K_ENUM, F(router), 0, 0, routers},
    {"scoring_func", K_ENUM, F(score), 0, 0, scores},
    {"norm_topk_prob", K_BOOL, F(renormalize), 0, 0, NULL},
    {"second_expert_policy", K_ENUM, F(second_policy), 0, 0, seconds},
    {"capacity_factor", K_NUM, F(capacity_factor), 0, 0, NULL},
    {"min_capacity", K_INT, F(min_capacity), 0, I32MAX, NULL},
    {"drop_policy", K_ENUM, F(drop_policy), 0, 0, drops},
    {"router_jitter_noise", K_NUM, F(jitter_eps), 0, 0, NULL},
    {"sinkhorn_iters", K_INT, F(sinkhorn_iters), 0, 1000000, NULL},
    {"use_expert_bias", K_BOOL, F(use_bias), 0, 0, NULL},
    {"bias_update_rate", K_NUM, F(bias_rate), 0, 0, NULL},
    {"router_aux_loss_coef", K_NUM, F(lb_coef), 0, 0, NULL},
    {"importance_loss_coef", K_NUM, F(importance_coef), 0, 0, NULL},
    {"load_loss_coef", K_NUM, F(load_coef), 0, 0, NULL},
    {"router_z_loss_coef", K_NUM, F(z_coef), 0, 0, NULL},
    {"mi_loss_coef", K_NUM, F(mi_coef), 0, 0, NULL},
    {"num_tasks", K_INT, F(n_tasks), 0, I32MAX, NULL},
    {"hidden_act", K_ENUM, F(act), 0, 0, acts},
    {"n_shared_experts", K_INT, F(n_shared), 0, I32MAX, NULL},
    {"shared_expert_intermediate_size", K_INT, F(d_ff_shared), 0, I32MAX, NULL},
    {"shared_expert_gate", K_BOOL, F(shared_gate), 0, 0, NULL},
    {"residual_moe", K_BOOL, F(residual), 0, 0, NULL},
    {"residual_intermediate_size", K_INT, F(d_ff_dense), 0, I32MAX, NULL},
    {"seed", K_U64, F(seed), 0, INT64_MAX, NULL},
    {"layer_index", K_INT, F(layer), 0, 0xFFFFFF, NULL},
};
#define NKEYS ((int)(sizeof keys / sizeof keys[0]))

static const char *json_type_name(const json_t *v)
{
    switch (json_typeof(v)) {
    case JSON_OBJECT: return "an object";
    case JSON_ARRAY: return "an array";
    case JSON_STRING: return "a string";
    case JSON_INTEGER: return "an integer";
    case JSON_REAL: return "a number";
    case JSON_TRUE:
    case JSON_FALSE: return "a boolean";
    case JSON_NULL: return "null";
    }
    return "?";
}

static void list_names(const char *const *names, char *buf, size_t len)
{
    size_t at = 0;
    buf[0] = 0;
    for (int i = 0; names[i] && at < len; i++)
        at += (size_t)snprintf(buf + at, len - at, "%s\"%s\"", i ? ", " : "", names[i]);
}

static moe_status set_key(const key_spec *k, json_t *v, moe_layer_config *c)
{
    char *field = (char *)c + k->off;
    switch (k->kind) {
    case K_INT:
    case K_U64: {
        if (json_is_real(v)) {
            double r = json_real_value(v);
            return moe_error(MOE_ERR_ARG, "config: %s must be an integer (got %g)", k->name, r);
        }
        if (!json_is_integer(v))
            return moe_error(MOE_ERR_ARG, "config: %s must be an integer, not %s", k->name, json_type_name(v));
        json_int_t x = json_integer_value(v);
        if (x < k->min || x > k->max)
            return moe_error(MOE_ERR_ARG, "config: %s must be an integer in [%lld, %lld] (got %lld)", k->name,
                             (long long)k->min, (long long)k->max, (long long)x);
        if (k->kind == K_U64)
            *(uint64_t *)field = (uint64_t)x;
        else
            *(int64_t *)field = (int64_t)x;
        return MOE_OK;
    }
    case K_NUM:
        if (!json_is_number(v))
            return moe_error(MOE_ERR_ARG, "config: %s must be a number, not %s", k->name, json_type_name(v));
        *(double *)field = json_number_value(v);
        return MOE_OK;
    case K_BOOL:
        if (!json_is_boolean(v))
            return moe_error(MOE_ERR_ARG, "config: %s must be true or false, not %s", k->name, json_type_name(v));
        *(int *)field = json_is_true(v);
        return MOE_OK;
    case K_ENUM: {
        char allowed[256];
        list_names(k->names, allowed, sizeof allowed);
        if (!json_is_string(v))
            return moe_error(MOE_ERR_ARG, "config: %s must be a string, one of %s (got %s)", k->name, allowed,
                             json_type_name(v));
        const char *s = json_string_value(v);
        for (int i = 0; k->names[i]; i++)
            if (strcmp(s, k->names[i]) == 0) {
                /* every enum field of the config is a plain C enum, stored as int */
                *(int *)field = i;
                return MOE_OK;
            }
        return moe_error(MOE_ERR_ARG, "config: %s: unknown value \"%s\" (allowed: %s)", k->name, s, allowed);
    }
    }
    return MOE_ERR_ARG;
}

static const key_spec *find_key(const char *name)
{
    for (int i = 0; i < NKEYS; i++)
        if (strcmp(keys[i].name, name) == 0)
            return &keys[i];
    return NULL;
}

moe_status moe_layer_config_from_json(const char *text, moe_layer_config *out)
{
    if (!text)
        return moe_error(MOE_ERR_ARG, "config: no JSON text");
    json_error_t err;
    json_t *root = json_loads(text, JSON_REJECT_DUPLICATES | JSON_DECODE_ANY, &err);
    if (!root)
        return moe_error(MOE_ERR_FORMAT, "config: invalid JSON at line %d, column %d: %s", err.line, err.column,
                         err.text);
    moe_status s = MOE_OK;
    moe_layer_config c;
    moe_layer_config_default(&c);
    if (!json_is_object(root)) {
        s = moe_error(MOE_ERR_ARG, "config: the top level must be a JSON object, not %s", json_type_name(root));
        goto done;
    }
    const char *name;
    json_t *v;
    json_object_foreach(root, name, v) {
        const key_spec *k = find_key(name);
        if (!k) {
            s = moe_error(MOE_ERR_ARG, "config: unknown key \"%s\" (the keys are listed in README.md, "
                          "e.g. hidden_size, num_local_experts, num_experts_per_tok, router)", name);
            goto done;
        }
        if ((s = set_key(k, v, &c)))
            goto done;
    }
    if ((s = moe_layer_config_validate(&c, 1)) == MOE_OK)
        *out = c;
done:
    json_decref(root);
    return s;
}

moe_status moe_layer_config_load(const char *path, moe_layer_config *c)
{
    char *text = NULL;
    size_t len = 0;
    /* bounded, and never blocking on a FIFO before it is known to be one (core/input.h) */
    moe_status rs = moe_read_all(path, "config", MOE_JSON_MAX, MOE_IN_STREAM, &text, &len);
    if (rs)
        return rs;
    if (strlen(text) != len) {
        free(text);
        return moe_error(MOE_ERR_FORMAT, "config: %s contains a NUL byte; not a JSON text file", path);
    }
    moe_status s = moe_layer_config_from_json(text, c);
    free(text);
    if (s) {
        char msg[1024];
        snprintf(msg, sizeof msg, "%s", moe_last_error());
        /* keep "config: ..." readable as "config PATH: ..." */
        moe_error(s, "config %s: %s", path, strncmp(msg, "config: ", 8) == 0 ? msg + 8 : msg);
    }
    return s;
}

moe_status moe_layer_config_to_json(const moe_layer_config *c, int pretty, char **out)
{
    *out = NULL;
    json_t *root = json_object();
    if (!root)
        return moe_error(MOE_ERR_NOMEM, "config: out of memory");
    for (int i = 0; i < NKEYS; i++) {
        const key_spec *k = &keys[i];
        const char *field = (const char *)c + k->off;
        json_t *v = NULL;
        switch (k->kind) {
        case K_INT: v = json_integer((json_int_t) * (const int64_t *)field); break;
        case K_U64:
            if (*(const uint64_t *)field > (uint64_t)INT64_MAX) {
                json_decref(root);
                return moe_error(MOE_ERR_ARG, "config: %s %llu does not fit in a JSON integer", k->name,
                                 (unsigned long long)*(const uint64_t *)field);
            }
            v = json_integer((json_int_t) * (const uint64_t *)field);
            break;
        case K_NUM: v = json_real(*(const double *)field); break;
        case K_BOOL: v = json_boolean(*(const int *)field); break;
        case K_ENUM: {
            int e = *(const int *)field, n = 0;
            while (k->names[n])
                n++;
            if (e < 0 || e >= n) {
                json_decref(root);
                return moe_error(MOE_ERR_ARG, "config: %s has no name for value %d", k->name, e);
            }
            v = json_string(k->names[e]);
            break;
        }
        }
        if (!v || json_object_set_new(root, k->name, v)) {
            json_decref(root);
            return moe_error(MOE_ERR_ARG, "config: %s cannot be written as JSON (not finite, or out of memory)",
                             k->name);
        }
    }
    *out = json_dumps(root, (pretty ? JSON_INDENT(2) : JSON_COMPACT) | JSON_PRESERVE_ORDER | JSON_REAL_PRECISION(17));
    json_decref(root);
    return *out ? MOE_OK : moe_error(MOE_ERR_NOMEM, "config: out of memory");
}

/* For configs that embed the layer keys in a larger flat object (the model's, src/model/model.h):
 * the layer keys present are set over c, the caller's extra keys are left to the caller. */
moe_status moe_layer_config_from_json_obj(void *obj, moe_layer_config *c, const char *const *extra_keys)
{
    json_t *root = obj;
    if (!json_is_object(root))
        return moe_error(MOE_ERR_ARG, "config: the top level must be a JSON object");
    const char *name;
    json_t *v;
    json_object_foreach(root, name, v) {
        const key_spec *k = find_key(name);
        if (!k) {
            int extra = 0;
            for (int i = 0; extra_keys && extra_keys[i] && !extra; i++)
                extra = strcmp(extra_keys[i], name) == 0;
            if (extra)
                continue;
            return moe_error(MOE_ERR_ARG, "config: unknown key \"%s\" (the keys are listed in README.md, "
                             "e.g. hidden_size, num_hidden_layers, num_local_experts, num_experts_per_tok)", name);
        }
        moe_status s = set_key(k, v, c);
        if (s)
            return s;
    }
    return MOE_OK;
}
