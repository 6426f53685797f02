/* The MoE layer configuration: defaults, validation, capacity. */
#include <math.h>
#include <string.h>

#include "cmoe.h"

void moe_layer_config_default(moe_layer_config *c)
{
    memset(c, 0, sizeof *c);
    c->d_model = 64;
    c->d_ff = 128;
    c->n_experts = 8;
    c->top_k = 2;
    c->router = MOE_ROUTER_TOPK;
    c->score = MOE_SCORE_SOFTMAX;
    c->renormalize = 1;
    c->second_policy = MOE_SECOND_ALL;
    c->capacity_factor = 0; /* dropless, as Mixtral */
    c->min_capacity = 0;
    c->drop_policy = MOE_DROP_POSITION;
    c->sinkhorn_iters = 8;
    c->bias_rate = 1e-3;
    c->act = MOE_ACT_SWIGLU;
    c->seed = 1234;
}

const char *moe_router_name(moe_router_kind r)
{
    switch (r) {
    case MOE_ROUTER_TOPK: return "topk";
    case MOE_ROUTER_NOISY_TOPK: return "noisy_topk";
    case MOE_ROUTER_EXPERT_CHOICE: return "expert_choice";
    case MOE_ROUTER_HASH: return "hash";
    case MOE_ROUTER_SINKHORN: return "sinkhorn";
    }
    return "?";
}

const char *moe_activation_name(moe_activation a)
{
    switch (a) {
    case MOE_ACT_RELU: return "relu";
    case MOE_ACT_GELU: return "gelu";
    case MOE_ACT_GELU_TANH: return "gelu_tanh";
    case MOE_ACT_GEGLU: return "geglu";
    case MOE_ACT_SWIGLU: return "swiglu";
    }
    return "?";
}

static int token_choice(moe_router_kind r)
{
    return r == MOE_ROUTER_TOPK || r == MOE_ROUTER_NOISY_TOPK || r == MOE_ROUTER_SINKHORN;
}

/*
 * Token choice: C = max(min_capacity, ceil(capacity_factor · T · k / E)), 0 (dropless)
 * when capacity_factor <= 0. Expert choice: C = max(min_capacity, ceil(capacity_factor
 * · T / E)), capacity_factor being the mean experts per token. Both at most T: an
 * expert can receive every token once and no more, so a larger capacity (a huge
 * capacity_factor or min_capacity) means "never drop" and is reported as T. The product
 * is compared in double before any conversion, so no capacity_factor overflows it.
 * Hash routing never drops.
 */
static int64_t clamp_capacity(double want, int64_t min_capacity, int64_t T)
{
    int64_t C = want >= (double)T ? T : (int64_t)want; /* want >= 0 here */
    if (C < min_capacity)
        C = min_capacity;
    if (C < 1)
        C = 1;
    return C > T ? T : C;
}

int64_t moe_capacity(const moe_layer_config *c, int64_t T)
{
    if (c->router == MOE_ROUTER_HASH)
        return 0;
    if (c->router == MOE_ROUTER_EXPERT_CHOICE)
        return clamp_capacity(ceil(c->capacity_factor * (double)T / (double)c->n_experts), c->min_capacity, T);
    if (!(c->capacity_factor > 0))
        return 0;
    return clamp_capacity(ceil(c->capacity_factor * (double)T * (double)c->top_k / (double)c->n_experts),
                          c->min_capacity, T);
}

#define BAD(...) return moe_error(MOE_ERR_ARG, __VA_ARGS__)

static moe_status check_coef(const char *name, double v)
{
    if (!isfinite(v) || v < 0)
        BAD("config: %s must be a finite number >= 0 (got %g)", name, v);
    return MOE_OK;
}

moe_status moe_layer_config_validate(const moe_layer_config *c, int64_t T)
{
    if (c->d_model <= 0) BAD("config: hidden_size (d_model) must be > 0 (got %lld)", (long long)c->d_model);
    if (c->d_ff <= 0) BAD("config: intermediate_size (d_ff) must be > 0 (got %lld)", (long long)c->d_ff);
    if (c->n_experts <= 0) BAD("config: num_local_experts must be > 0 (got %lld)", (long long)c->n_experts);
    if (c->n_experts > INT32_MAX) BAD("config: num_local_experts %lld too large", (long long)c->n_experts);
    if (c->top_k <= 0) BAD("config: num_experts_per_tok must be > 0 (got %lld)", (long long)c->top_k);
    if ((unsigned)c->router > MOE_ROUTER_SINKHORN) BAD("config: unknown router (%d)", (int)c->router);
    if ((unsigned)c->score > MOE_SCORE_SIGMOID) BAD("config: unknown score function (%d)", (int)c->score);
    if ((unsigned)c->act > MOE_ACT_SWIGLU) BAD("config: unknown activation (%d)", (int)c->act);
    if ((unsigned)c->second_policy > MOE_SECOND_RANDOM) BAD("config: unknown second_expert_policy (%d)", (int)c->second_policy);
    if ((unsigned)c->drop_policy > MOE_DROP_PROBABILITY) BAD("config: unknown drop_policy (%d)", (int)c->drop_policy);
    if (token_choice(c->router) && c->top_k > c->n_experts)
        BAD("config: num_experts_per_tok (top_k = %lld) exceeds num_local_experts (%lld)",
            (long long)c->top_k, (long long)c->n_experts);
    if (c->router == MOE_ROUTER_HASH && c->top_k != 1)
        BAD("config: hash routing sends each token to one expert; num_experts_per_tok must be 1 (got %lld)",
            (long long)c->top_k);
    if (!isfinite(c->capacity_factor))
        BAD("config: capacity_factor must be finite (got %g)", c->capacity_factor);
    if (c->router == MOE_ROUTER_HASH && c->capacity_factor > 0)
        BAD("config: capacity_factor: hash routing is dropless; set it to 0");
    if (c->router == MOE_ROUTER_EXPERT_CHOICE && c->capacity_factor <= 0)
        BAD("config: capacity_factor must be > 0 with expert_choice (it is the mean number of experts per token)");
    if (c->min_capacity < 0) BAD("config: min_capacity must be >= 0 (got %lld)", (long long)c->min_capacity);
    if (!isfinite(c->jitter_eps) || c->jitter_eps < 0 || c->jitter_eps >= 1)
        BAD("config: router_jitter_noise must be in [0, 1) (got %g)", c->jitter_eps);
    if (c->router == MOE_ROUTER_SINKHORN && c->sinkhorn_iters < 1)
        BAD("config: sinkhorn_iters must be >= 1 (got %lld)", (long long)c->sinkhorn_iters);
    if (c->second_policy != MOE_SECOND_ALL &&
        (c->top_k != 2 || (c->router != MOE_ROUTER_TOPK && c->router != MOE_ROUTER_NOISY_TOPK)))
        BAD("config: second_expert_policy applies to top-2 token choice (topk or noisy_topk with num_experts_per_tok = 2)");
    if (c->use_bias && c->router != MOE_ROUTER_TOPK && c->router != MOE_ROUTER_NOISY_TOPK)
        BAD("config: use_bias (aux-loss-free balancing) applies to topk and noisy_topk routers");
    moe_status s;
    if (c->bias_rate > 1)
        BAD("config: bias_update_rate must be in [0, 1] (DeepSeek-V3 uses 0.001; got %g)", c->bias_rate);
    if ((s = check_coef("bias_update_rate", c->bias_rate)) || (s = check_coef("router_aux_loss_coef", c->lb_coef)) ||
        (s = check_coef("importance_loss_coef", c->importance_coef)) || (s = check_coef("load_loss_coef", c->load_coef)) ||
        (s = check_coef("router_z_loss_coef", c->z_coef)) || (s = check_coef("mi_loss_coef", c->mi_coef)))
        return s;
    if (c->router == MOE_ROUTER_HASH &&
        (c->lb_coef > 0 || c->importance_coef > 0 || c->load_coef > 0 || c->z_coef > 0 || c->mi_coef > 0))
        BAD("config: hash routing has no router to balance; set every aux loss coefficient to 0");
    if (c->n_tasks < 0) BAD("config: num_tasks must be >= 0 (got %lld)", (long long)c->n_tasks);
    if (c->mi_coef > 0 && c->n_tasks < 1) BAD("config: mi_loss_coef > 0 needs num_tasks >= 1");
    if (c->n_shared < 0) BAD("config: n_shared_experts must be >= 0 (got %lld)", (long long)c->n_shared);
    if (c->d_ff_shared < 0) BAD("config: shared_expert_intermediate_size must be >= 0 (got %lld)", (long long)c->d_ff_shared);
    if (c->shared_gate && c->n_shared == 0) BAD("config: shared_expert_gate needs n_shared_experts >= 1");
    if (c->d_ff_dense < 0) BAD("config: residual_intermediate_size must be >= 0 (got %lld)", (long long)c->d_ff_dense);
    if (c->layer < 0 || c->layer > 0xFFF) BAD("config: layer index %lld outside [0, 4095]", (long long)c->layer);
    if (T <= 0) BAD("tokens: T must be > 0 (got %lld)", (long long)T);
    if (T > INT32_MAX) BAD("tokens: T = %lld exceeds the int32 token index", (long long)T);
    if (token_choice(c->router) && c->top_k > INT32_MAX / T)
        BAD("tokens: T·k = %lld·%lld overflows int32 assignment indices", (long long)T, (long long)c->top_k);
    if (c->router == MOE_ROUTER_EXPERT_CHOICE && moe_capacity(c, T) > INT32_MAX / c->n_experts)
        BAD("tokens: E·C overflows int32 assignment indices");
    if (c->n_experts > INT64_MAX / T / 8) BAD("tokens: T·E = %lld·%lld too large", (long long)T, (long long)c->n_experts);
    return MOE_OK;
}
