/* Parameter, FLOP and memory counts of a model configuration (rules in info.h). */
#include <string.h>

#include "model/info.h"
#include "ref/ref.h"

/* Weights of one FFN of width F: w1, w2 and, for GLU activations, w3. */
static int64_t ffn_params(int glu, int64_t C, int64_t F)
{
    return (glu ? 3 : 2) * C * F;
}

/* Routed experts a token goes through in one MoE layer, on average. */
static double experts_per_token(const moe_layer_config *lc)
{
    switch (lc->router) {
    case MOE_ROUTER_HASH: return 1.0;
    case MOE_ROUTER_EXPERT_CHOICE: return lc->capacity_factor;
    default: return (double)lc->top_k;
    }
}

moe_status moe_model_info_compute(const moe_model_config *c, int64_t seq, moe_model_info *info)
{
    if (!c || !info)
        return moe_error(MOE_ERR_ARG, "model info: config and info must not be NULL");
    moe_status s = moe_model_config_validate(c);
    if (s)
        return s;
    if (seq < 0)
        return moe_error(MOE_ERR_ARG, "model info: seq must be >= 1 (0: max_position_embeddings; got %lld)",
                         (long long)seq);
    memset(info, 0, sizeof *info);
    const int64_t V = c->vocab_size, C = c->hidden_size, H = c->num_attention_heads, Hkv = c->num_key_value_heads;
    const int64_t hd = c->head_dim ? c->head_dim : C / H;
    const int glu = moe_act_is_glu(c->moe.act);
    const int64_t S = seq ? seq : c->max_position_embeddings;
    /* causal attention: the query at position i sees i+1 keys; mean over i < S */
    const double keys_per_token = 0.5 * (double)(S + 1);

    info->seq = S;
    info->n_layers = c->num_hidden_layers;
    info->embed_params = V * C;
    info->lm_head_params = c->tie_word_embeddings ? 0 : V * C;
    info->norm_params = C; /* the final norm */

    double active = 0, flops = 2.0 * (double)(V * C), ept_sum = 0; /* the LM head's product */
    const int64_t Ea = c->attention_experts, ka = c->attention_experts_per_tok;
    info->attention_experts = Ea;
    info->attention_experts_per_tok = Ea > 0 ? ka : 0;
    for (int64_t l = 0; l < c->num_hidden_layers; l++) {
        info->norm_params += 2 * C;
        active += (double)(2 * C);
        if (Ea > 0) {
            /* mixture of attention heads: a router, shared k and v (one head), each expert's
             * q and o; a token goes through the router, k, v and ka experts, and attends with
             * ka query heads */
            const int64_t router = C * Ea, kv = 2 * C * hd, expert = 2 * C * hd;
            info->router_params += router;
            info->attn_params += kv + Ea * expert;
            info->attn_expert_params += Ea * expert;
            active += (double)(router + kv + ka * expert);
            flops += 2.0 * (double)(router + kv + ka * expert);
            info->flops_attn_fwd += 2.0 * 2.0 * (double)(ka * hd) * keys_per_token;
        } else {
            const int64_t attn = C * (H + 2 * Hkv) * hd + H * hd * C;
            const int64_t bias = c->qkv_bias ? (H + 2 * Hkv) * hd : 0;
            info->attn_params += attn + bias;
            active += (double)(attn + bias);
            flops += 2.0 * (double)attn;
            info->flops_attn_fwd += 2.0 * 2.0 * (double)(H * hd) * keys_per_token;
        }

        const int64_t E = moe_model_layer_experts(c, l);
        if (E <= 0) {
            const int64_t f = ffn_params(glu, C, c->intermediate_size);
            info->n_dense_layers++;
            info->dense_ffn_params += f;
            active += (double)f;
            flops += 2.0 * (double)f;
            continue;
        }
        moe_layer_config lc;
        if ((s = moe_model_layer_config(c, l, &lc)))
            return s;
        info->n_moe_layers++;
        /* router: logits (and the noise projection of noisy top-k) over all E experts */
        const int64_t nproj = lc.router == MOE_ROUTER_HASH ? 0 : (lc.router == MOE_ROUTER_NOISY_TOPK ? 2 : 1);
        const int64_t router = nproj * C * E + (lc.use_bias ? E : 0);
        const int64_t expert = ffn_params(glu, C, lc.d_ff);
        const int64_t Fs = lc.n_shared * (lc.d_ff_shared > 0 ? lc.d_ff_shared : lc.d_ff);
        const int64_t gate = lc.shared_gate && Fs ? C : 0;
        const int64_t Fd = lc.residual ? (lc.d_ff_dense > 0 ? lc.d_ff_dense : lc.d_ff) : 0;
        const int64_t coef = Fd ? 2 * C : 0; /* Residual-MoE's mixing projection [C, 2] */
        const double ept = experts_per_token(&lc);
        ept_sum += ept;
        info->router_params += router;
        info->expert_params += E * expert;
        info->shared_params += ffn_params(glu, C, Fs) + gate;
        info->residual_params += ffn_params(glu, C, Fd) + coef;
        const double dense_part = (double)(ffn_params(glu, C, Fs) + gate + ffn_params(glu, C, Fd) + coef);
        active += (double)router + ept * (double)expert + dense_part;
        flops += 2.0 * ((double)(nproj * C * E) + ept * (double)expert + dense_part);
    }
    info->total_params_nonembed = info->norm_params + info->attn_params + info->dense_ffn_params +
                                  info->router_params + info->expert_params + info->shared_params +
                                  info->residual_params;
    info->total_params = info->total_params_nonembed + info->embed_params + info->lm_head_params;
    info->experts_per_token = info->n_moe_layers ? ept_sum / (double)info->n_moe_layers : 0;
    /* active counts the final norm too */
    info->active_params_nonembed = (int64_t)(active + 0.5) + C;
    info->active_params = info->active_params_nonembed + info->embed_params + info->lm_head_params;

    info->flops_fwd = flops + info->flops_attn_fwd;
    info->flops_fwdbwd = 3.0 * info->flops_fwd;

    const double P = (double)info->total_params;
    info->mem_fp32_params = 4 * P;
    info->mem_fp32_grads = 4 * P;
    info->mem_fp32_adam = 8 * P;
    info->mem_fp32_total = 16 * P;
    info->mem_bf16_params = 2 * P;
    info->mem_bf16_grads = 2 * P;
    info->mem_bf16_master = 4 * P;
    info->mem_bf16_adam = 8 * P;
    info->mem_bf16_total = 16 * P;
    return MOE_OK;
}
