/*
 * info.h — what a model configuration costs: parameters (total and active per
 * token), FLOPs per token, and training memory. `cmoe info` prints it.
 *
 * Counting rules (README.md, "cmoe info"):
 * - Parameters are counted exactly as the model allocates them (moe_model_numel of a
 *   created model equals total_params), including norms, biases, routers, shared experts
 *   and the Residual-MoE branch.
 * - Active parameters per token: everything a token touches. The embedding matrix and the
 *   LM head count whole (the convention behind Mixtral's "12.9B active"); each MoE layer
 *   counts its router whole, `experts_per_token` of its routed experts, and every shared
 *   expert, shared gate and residual branch. A mixture of attention heads counts its router
 *   and the shared k and v projections whole and attention_experts_per_tok experts' q and o,
 *   and attends with that many query heads. experts_per_token is top_k for token choice
 *   (an upper bound when a capacity factor drops tokens), 1 for hash routing and
 *   capacity_factor for expert choice (E·C/T assignments per token on average).
 * - FLOPs per token: 2 per multiply-add of every matrix product a token goes through
 *   (q, k, v, o projections, dense FFN, router, the routed experts it is sent to, shared
 *   experts and gate, residual branch and its mixing coefficients, LM head), plus
 *   attention's two products (q·kᵀ and p·v: 2·2·H·head_dim per key). With causal masking
 *   the query at position i sees i+1 keys, so a token of a length-S sequence sees
 *   (S+1)/2 keys on average; that is what is counted (counting S per token, as PaLM's MFU
 *   formula does, doubles the attention term). Elementwise work (norms, RoPE,
 *   activations, softmax, residual adds, the embedding lookup) is not counted.
 *   Backward is twice the forward, so forward+backward = 3 × forward.
 * - Memory for training state, activations not included: fp32 keeps weights, gradients
 *   and AdamW's m and v in fp32 (16 bytes per parameter); bf16 mixed precision keeps bf16
 *   weights and gradients and fp32 master weights, m and v (2+2+4+4+4 = 16 bytes, the
 *   ZeRO paper's accounting).
 */
#ifndef CMOE_MODEL_INFO_H
#define CMOE_MODEL_INFO_H

#include "model/model.h"

typedef struct {
    int64_t seq;              /* sequence length the attention FLOPs are counted at */
    int64_t n_layers, n_moe_layers, n_dense_layers;

    /* parameters by part; they sum to total_params */
    int64_t embed_params;     /* embed_tokens [V, C] */
    int64_t lm_head_params;   /* lm_head [V, C]; 0 when tied */
    int64_t norm_params;      /* every RMSNorm weight, the final one included */
    int64_t attn_params;      /* q, k, v, o projections and q/k/v biases (MoA: the shared k
                               * and v and every expert's q and o) */
    int64_t attn_expert_params; /* MoA: the experts' q and o (part of attn_params) */
    int64_t attention_experts, attention_experts_per_tok; /* MoA's E and k; 0 without */
    int64_t dense_ffn_params; /* the dense layers' FFNs */
    int64_t router_params;    /* router weights, noise weights, expert biases (MoA's routers too) */
    int64_t expert_params;    /* routed experts */
    int64_t shared_params;    /* shared experts and their gate */
    int64_t residual_params;  /* Residual-MoE dense branch and its mixing coefficients */
    int64_t total_params;

    double experts_per_token;       /* routed experts a token goes through, per MoE layer
                                     * (mean over MoE layers) */
    int64_t active_params;          /* per token, embedding and LM head included */
    int64_t active_params_nonembed; /* the same without embedding and LM head */
    int64_t total_params_nonembed;

    double flops_fwd;         /* per token, forward */
    double flops_fwdbwd;      /* per token, forward + backward (3 × forward) */
    double flops_attn_fwd;    /* the attention-products part of flops_fwd */

    /* training state in bytes (activations not included) */
    double mem_fp32_params, mem_fp32_grads, mem_fp32_adam, mem_fp32_total;
    double mem_bf16_params, mem_bf16_grads, mem_bf16_master, mem_bf16_adam, mem_bf16_total;
} moe_model_info;

/*
 * Fills info for config c at sequence length seq (1 <= seq; 0 takes
 * max_position_embeddings). The config must be valid (moe_model_config_validate).
 */
moe_status moe_model_info_compute(const moe_model_config *c, int64_t seq, moe_model_info *info);

#endif
