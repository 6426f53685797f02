/*
 * hf.h — Hugging Face interoperability: a cmoe model as a transformers checkpoint
 * (config.json + model.safetensors) of MixtralForCausalLM or Qwen2MoeForCausalLM, and
 * back.
 *
 *     moe_hf_arch arch;
 *     if (moe_hf_arch_of(&cfg, &arch)) puts(moe_last_error());   // names what has no equivalent
 *     moe_hf_export(model, "out-hf", MOE_ST_F32);                  // config.json, model.safetensors
 *
 *     moe_model_config c;
 *     moe_hf_read_config("some-hf-dir", &c, &arch, NULL, 0);       // config.json -> cmoe config
 *     moe_model_create(&c, backend, NULL, B, S, &m);
 *     moe_hf_load_weights("some-hf-dir", m, arch);                 // model.safetensors or shards
 *
 * Name mapping (cmoe layout [in, out]; HF nn.Linear weights are [out, in], so every
 * matrix is transposed; N = layer, e = expert):
 *
 *   cmoe                                          Mixtral                                     Qwen2-MoE
 *   model.embed_tokens.weight [V, C]              same, [V, C]                                same
 *   model.layers.N.input_layernorm.weight         same                                        same
 *   model.layers.N.post_attention_layernorm.weight same                                       same
 *   model.layers.N.self_attn.{q,k,v,o}_proj.weight same name, transposed                      same
 *   model.layers.N.self_attn.{q,k,v}_proj.bias    — (Mixtral has none)                        same
 *   model.layers.N.mlp.{gate,up,down}_proj.weight — (every Mixtral layer is MoE)              same, transposed (dense layers)
 *   model.layers.N.block_sparse_moe.
 *     router.weight [C, E]                        ...block_sparse_moe.gate.weight [E, C]      ...mlp.gate.weight [E, C]
 *     experts.w1 [E, C, f]  (slice e)             ...block_sparse_moe.experts.e.w1.weight [f, C]   ...mlp.experts.e.gate_proj.weight [f, C]
 *     experts.w3 [E, C, f]                        ...block_sparse_moe.experts.e.w3.weight [f, C]   ...mlp.experts.e.up_proj.weight [f, C]
 *     experts.w2 [E, f, C]                        ...block_sparse_moe.experts.e.w2.weight [C, f]   ...mlp.experts.e.down_proj.weight [C, f]
 *     shared.w1 / shared.w3 [C, Fs]               —                                           ...mlp.shared_expert.gate_proj / up_proj.weight [Fs, C]
 *     shared.w2 [Fs, C]                           —                                           ...mlp.shared_expert.down_proj.weight [C, Fs]
 *     shared.gate [C]                             —                                           ...mlp.shared_expert_gate.weight [1, C]
 *   model.norm.weight                             same                                        same
 *   lm_head.weight [V, C]                         same (absent when tie_word_embeddings)       same
 *
 * Architecture: Mixtral when there is no shared expert; Qwen2-MoE when there is one
 * with a sigmoid gate (Fs = n_shared·shared_expert_intermediate_size becomes the one
 * HF shared expert). A model without q/k/v biases exports to Qwen2-MoE with zero
 * biases (exact). Refused (no HF equivalent): routers other than top-k, sigmoid
 * scores, capacity dropping, GShard's second-expert sampling/random policies, the
 * aux-loss-free router bias, noisy gating, Residual-MoE, pyramid MoE (different expert
 * counts), non-gated experts (relu, gelu, gelu_tanh), shared experts without a gate;
 * for Mixtral also dense layers, q/k/v biases and un-renormalised top-k weights; for
 * Qwen2-MoE a head_dim other than hidden_size / num_attention_heads.
 * Training-only keys with no HF meaning (z-loss and other aux coefficients, jitter,
 * the layers' seed, ...) travel in config.json under "cmoe", which transformers keeps
 * as an attribute and ignores, and come back on import.
 */
#ifndef CMOE_HF_H
#define CMOE_HF_H

#include "model/model.h"
#include "io/safetensors.h"

typedef enum { MOE_HF_MIXTRAL = 1, MOE_HF_QWEN2_MOE = 2 } moe_hf_arch;

/* "MixtralForCausalLM" / "Qwen2MoeForCausalLM". */
const char *moe_hf_arch_name(moe_hf_arch a);

/* The HF architecture of a cmoe config; MOE_ERR_UNSUPPORTED names every feature
 * that has no equivalent. */
moe_status moe_hf_arch_of(const moe_model_config *c, moe_hf_arch *arch);

/* HF config.json text for c (moe_hf_arch_of must accept it), readable by transformers 4
 * and 5: rope_theta and rope_parameters, torch_dtype and dtype (from dtype). */
moe_status moe_hf_config_to_json(const moe_model_config *c, moe_st_dtype dtype, char **out);

/*
 * HF config.json text -> cmoe config (validated). Both transformers 4's and 5's forms:
 * rope_theta or rope_parameters {rope_type, rope_theta} (they must agree), torch_dtype
 * or dtype (unused: the weights carry their dtype), head_dim null (= hidden_size /
 * num_attention_heads), layer_types. Refuses, by name, what cmoe cannot run: other model
 * types, rope types other than "default" (linear, dynamic, yarn, llama3, longrope, ...),
 * partial rotary factors, sliding windows, activations other than silu and gelu.
 * notes [notes_n] (may be NULL): the keys left out of the config that change the math
 * and the class default taken for each, "; "-separated ("" when none) — for the caller
 * to show.
 */
moe_status moe_hf_config_from_json(const char *text, moe_model_config *c, moe_hf_arch *arch, char *notes,
                                   size_t notes_n);
/* DIR/config.json */
moe_status moe_hf_read_config(const char *dir, moe_model_config *c, moe_hf_arch *arch, char *notes, size_t notes_n);

/* Writes DIR/config.json and DIR/model.safetensors (dtype F32, BF16 or F16), both
 * atomically; DIR is created. */
moe_status moe_hf_export(moe_model *m, const char *dir, moe_st_dtype dtype);

/* Sets every parameter of m from DIR/model.safetensors, or from the shards that
 * DIR/model.safetensors.index.json lists. Every tensor must be there with the HF shape
 * of the config, and finite (NaN or Inf is refused, naming the tensor and the first bad
 * element); an unknown tensor is an error (rotary inv_freq buffers are ignored).
 * Nothing of m is set when a check fails. */
moe_status moe_hf_load_weights(const char *dir, moe_model *m, moe_hf_arch arch);

#endif
