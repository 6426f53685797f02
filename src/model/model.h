/*
 * model.h — the MoE language model and its optimizer, written once against the backend
 * table (backend.h): the same code trains on ref (double, the oracle) and cpu (fp32).
 *
 *     moe_model_config c;
 *     moe_model_config_default(&c);                    // the laptop preset (configs/laptop.json)
 *     // or moe_model_config_load("configs/tiny.json", &c)
 *     moe_backend *b;  moe_backend_create("cpu", &(moe_backend_options){.threads = 2}, &b);
 *     moe_model *m;    moe_model_create(&c, b, NULL, B, S, &m);       // NULL: one process
 *     moe_model_init(m, seed);
 *     moe_optim_config oc;  moe_optim_config_default(&oc);  oc.total_steps = steps;
 *     moe_optim *opt;  moe_optim_create(m, &oc, &opt);
 *     for (step = 0; step < steps; step++) {
 *         moe_model_zero_grad(m);
 *         for (micro = 0; micro < accum; micro++) {
 *             moe_dataset_batch(d, seed, step, micro, B, S, in, tg, task);
 *             moe_key key = {step, micro, 0};
 *             moe_model_forward(m, in, tg, task, B, S, key, 1, NULL); // nothing waits
 *             moe_model_backward(m);                                 // grads += ∂L.total
 *         }
 *         moe_optim_result r;
 *         moe_optim_step(opt, 1.0 / accum, &r);       // r.lr, r.grad_norm: the step's one read
 *         moe_model_stats st; moe_model_get_stats(m, &st);  // loss, expert load, dropped (same read)
 *     }
 *     // sampling: one token at a time through the KV cache
 *     for (pos = 0; ...; pos++) moe_model_decode(m, tok, pos, logits);  // logits [V] on host
 *
 * Architecture. Token embedding; L blocks of
 *     x += o_proj(attention(rope(q_proj(n)), rope(k_proj(n)), v_proj(n))),  n = rmsnorm(x)
 *     x += ffn(rmsnorm(x))
 * or, with attention_experts > 0, x += MoA(n): a mixture of attention heads (layer/moa.h;
 * attention_experts_per_tok of attention_experts heads of head_dim per token, one shared
 * key/value head, the router's load-balance and z-loss with the MoE layers' coefficients;
 * num_attention_heads and num_key_value_heads then only set head_dim when it is 0)
 * then a final RMSNorm and the LM head. Causal attention with RoPE (Llama "rotate_half")
 * and grouped-query attention (num_key_value_heads divides num_attention_heads); optional
 * q/k/v biases (Qwen2-MoE). The FFN of layer l is an MoE layer (src/layer/moe_layer.h: any
 * router, shared experts, Residual-MoE, per its keys) when
 *     l >= first_k_dense_replace  and  (l + 1) % decoder_sparse_step == 0
 *     and (num_experts_per_layer is empty or num_experts_per_layer[l] > 0),
 * with num_experts_per_layer[l] experts (pyramid MoE) or num_local_experts; otherwise a
 * dense FFN of intermediate_size with the same hidden_act. With hidden_act "swiglu",
 * top-2 softmax routing with norm_topk_prob, no shared experts, no biases, dropless
 * (capacity_factor 0) and untied embeddings this is exactly Mixtral.
 *
 * Parameters (cmoe names = the checkpoint names; [in, out] layout unless said):
 *   model.embed_tokens.weight                        [V, C]       HF: same
 *   model.layers.N.input_layernorm.weight            [C]          HF: same
 *   model.layers.N.self_attn.q_proj.weight           [C, H·hd]    HF: transposed ([out, in])
 *   model.layers.N.self_attn.k_proj.weight           [C, Hkv·hd]  HF: transposed
 *   model.layers.N.self_attn.v_proj.weight           [C, Hkv·hd]  HF: transposed
 *   model.layers.N.self_attn.{q,k,v}_proj.bias       [out]        qkv_bias only; HF: same
 *   model.layers.N.self_attn.o_proj.weight           [H·hd, C]    HF: transposed
 *   MoA layers instead (no HF twin): model.layers.N.self_attn. + router.weight [C, Ea],
 *     k_proj.weight [C, hd], v_proj.weight [C, hd], experts.q_proj [Ea, C, hd],
 *     experts.o_proj [Ea, hd, C]
 *   model.layers.N.post_attention_layernorm.weight   [C]          HF: same
 *   dense layers (Llama/Qwen2 MLP names):
 *   model.layers.N.mlp.gate_proj.weight              [C, F]       w1; HF: transposed
 *   model.layers.N.mlp.up_proj.weight                [C, F]       w3 (GLU only); HF: transposed
 *   model.layers.N.mlp.down_proj.weight              [F, C]       w2; HF: transposed
 *   MoE layers: "model.layers.N.block_sparse_moe." + the MoE layer's own names:
 *     router.weight  [C, E]      → HF Mixtral block_sparse_moe.gate.weight [E, C] (transposed)
 *     experts.w1     [E, C, f]   → block_sparse_moe.experts.e.w1.weight [f, C] (slice e, transposed)
 *     experts.w3     [E, C, f]   → block_sparse_moe.experts.e.w3.weight [f, C]
 *     experts.w2     [E, f, C]   → block_sparse_moe.experts.e.w2.weight [C, f]
 *     router.noise, router.bias, shared.*, residual.* : cmoe's own (no Mixtral twin;
 *     shared.w1/w3/w2 map to Qwen2-MoE mlp.shared_expert.gate/up/down_proj, shared.gate
 *     to mlp.shared_expert_gate)
 *   model.norm.weight                                [C]          HF: same
 *   lm_head.weight                                   [V, C]       HF layout ([out, in]);
 *                                                                 absent when tied (uses embed_tokens)
 *
 * Loss = mean cross-entropy over targets that are not −1 + Σ over MoE layers of that
 * layer's aux.total (each aux loss times its coefficient). All reported separately.
 *
 * Memory: every buffer (parameters, gradients, activations for max_batch × max_seq
 * tokens, the ids, the KV cache, the ops' scratch) is allocated by moe_model_create;
 * forward, backward, decode and the optimizer step allocate nothing. The model never
 * dereferences backend memory, and a training step never waits for the backend: the
 * step's scalars (losses, aux losses, expert counts, gradient norm) gather in one
 * backend buffer that the host reads once, when it asks (losses, stats, optim result).
 * Same seed and backend → bitwise-identical losses at any thread count.
 */
#ifndef CMOE_MODEL_H
#define CMOE_MODEL_H

#include "backend/backend.h"
#include "layer/moa.h"
#include "layer/moe_layer.h"

#define MOE_MODEL_MAX_LAYERS 64

/* ---- configuration ------------------------------------------------------------ */

/*
 * One flat JSON object with Hugging Face keys (the model's below, plus every MoE-layer
 * key of README.md: num_local_experts, num_experts_per_tok, router, hidden_act,
 * capacity_factor, router_aux_loss_coef, ... and seed). Missing keys keep the default
 * (laptop) values; unknown keys are errors that name the key.
 */
typedef struct {
    int64_t vocab_size;              /* "vocab_size" */
    int64_t hidden_size;             /* "hidden_size" C (also the MoE layers' d_model) */
    int64_t intermediate_size;       /* "intermediate_size": the dense FFN layers' F */
    int64_t moe_intermediate_size;   /* "moe_intermediate_size": each expert's f;
                                      * absent in JSON → intermediate_size (Mixtral) */
    int64_t num_hidden_layers;       /* "num_hidden_layers" L, <= MOE_MODEL_MAX_LAYERS */
    int64_t num_attention_heads;     /* "num_attention_heads" H */
    int64_t num_key_value_heads;     /* "num_key_value_heads" Hkv, divides H */
    int64_t head_dim;                /* "head_dim" hd, even; 0 → C / H */
    int64_t max_position_embeddings; /* "max_position_embeddings": longest sequence */
    double rope_theta;               /* "rope_theta" */
    double rms_norm_eps;             /* "rms_norm_eps" */
    int tie_word_embeddings;         /* "tie_word_embeddings": lm head = embed_tokens */
    int qkv_bias;                    /* "qkv_bias": q/k/v projection biases (Qwen2-MoE) */
    int64_t decoder_sparse_step;     /* "decoder_sparse_step": MoE every n-th layer (1: all) */
    int64_t first_k_dense_replace;   /* "first_k_dense_replace": first k layers dense */
    int64_t n_experts_per_layer;     /* length of the array below; 0: not given */
    int64_t num_experts_per_layer[MOE_MODEL_MAX_LAYERS]; /* "num_experts_per_layer": [L]
                                      * pyramid MoE; 0 makes that layer dense */
    double initializer_range;        /* "initializer_range": N(0, σ²) init of weights */
    double switch_init_scale;        /* "switch_init_scale": > 0 → Switch's init instead:
                                      * truncated normal (±2σ), σ = sqrt(scale / fan_in) */
    int64_t attention_experts;       /* "attention_experts": > 0 makes every layer's attention
                                      * a mixture of attention heads (layer/moa.h) of this many
                                      * head experts; 0: multi-head attention */
    int64_t attention_experts_per_tok; /* "attention_experts_per_tok": heads per token (k) */
    moe_layer_config moe;            /* the MoE layers' keys; d_model, d_ff, n_experts and
                                      * layer are filled in per layer by the model */
} moe_model_config;

/* The default laptop preset: byte-level (vocab 256), see configs/laptop.json. */
void moe_model_config_default(moe_model_config *c);
/* A tiny preset for tests (configs/tiny.json): MoE and dense layers, GQA. */
void moe_model_config_tiny(moe_model_config *c);
/* By name: "laptop" or "tiny". */
moe_status moe_model_config_preset(const char *name, moe_model_config *c);
/* Checks every field; the message names the JSON key. */
moe_status moe_model_config_validate(const moe_model_config *c);
moe_status moe_model_config_from_json(const char *text, moe_model_config *c);
moe_status moe_model_config_load(const char *path, moe_model_config *c);
/* Every key, HF names; free() the result. */
moe_status moe_model_config_to_json(const moe_model_config *c, int pretty, char **out);
/* Experts of layer l: 0 for a dense FFN layer. */
int64_t moe_model_layer_experts(const moe_model_config *c, int64_t layer);
/* The MoE layer config of layer l (d_model, d_ff, n_experts, layer filled in). */
moe_status moe_model_layer_config(const moe_model_config *c, int64_t layer, moe_layer_config *out);
/* Total number of parameters of the model the config describes. */
int64_t moe_model_config_param_count(const moe_model_config *c);

/*
 * The parser of the MoE-layer keys (src/core/config_json.c) over an already-parsed jansson
 * object (json_t *): sets c's fields from the layer keys present, skips the keys listed
 * in extra_keys (NULL-terminated; may be NULL), rejects any other key by name. It does
 * not fill defaults (c's current values stay) and does not validate.
 */
moe_status moe_layer_config_from_json_obj(void *json_object, moe_layer_config *c, const char *const *extra_keys);

/* ---- the model ----------------------------------------------------------------- */

typedef struct moe_model moe_model;

/* Sized for forward/backward of up to max_batch × max_seq tokens (max_seq <=
 * max_position_embeddings; decode positions < max_seq). Every MoE layer moves its rows
 * through ex (NULL: one process). The backend and ex must outlive it. */
moe_status moe_model_create(const moe_model_config *c, moe_backend *b, moe_exchange *ex, int64_t max_batch,
                            int64_t max_seq, moe_model **out);
void moe_model_free(moe_model *m);
const moe_model_config *moe_model_config_of(const moe_model *m);
moe_backend *moe_model_backend(const moe_model *m);

/*
 * Weights N(0, initializer_range²) (or Switch's init), norm weights 1, biases 0, the
 * router bias 0. Every draw is Philox(seed, parameter index, element), so ref and cpu
 * start from the same values.
 */
moe_status moe_model_init(moe_model *m, uint64_t seed);

typedef struct {
    double ce;         /* mean cross-entropy over counted targets; 0 without targets */
    double aux;        /* Σ over MoE layers of aux.total (coefficients applied) */
    double total;      /* ce + aux: what backward differentiates */
    int64_t n_targets; /* targets that are not −1 */
} moe_model_losses;

/*
 * inputs, targets, task_ids: host [B, S] (targets: −1 ignored; NULL → no loss, and the
 * logits stay readable with moe_model_get_logits; task_ids NULL → task 0). key keys the
 * MoE layers' random draws (jitter, noise: step, micro-batch, and the global index of
 * this batch's first token); training = 0 turns them off. losses NULL: nothing waits for
 * the backend; else the losses are read (one wait). Errors name the bad argument (token
 * id outside [0, V), B or S too large, ...).
 */
moe_status moe_model_forward(moe_model *m, const int32_t *inputs /* [B, S] */, const int32_t *targets /* [B, S] */,
                             const int32_t *task_ids /* [B, S] */, int64_t B, int64_t S, moe_key key,
                             int training, moe_model_losses *losses);
/* Gradients += ∂(losses.total)/∂parameters of the last forward (which needs targets). */
moe_status moe_model_backward(moe_model *m);
/* The last forward's losses (reads the step's scalars if they are not read yet). */
moe_status moe_model_get_losses(moe_model *m, moe_model_losses *out);

/*
 * The step's scalars live in one backend buffer, read by the host at most once per step
 * (when it asks for losses, stats or the optimizer's result): the last forward's
 * cross-entropy and each MoE layer's moe_layer_stats, their sums over every forward
 * since moe_model_zero_grad (a step's micro-batches), and the optimizer's Σ g² and
 * clipping scale.
 */
enum { MOE_SCALAR_GRAD_SUMSQ, MOE_SCALAR_CLIP };
/* The optimizer's scalar `which` on the backend (written by moe_optim_step). */
moe_tensor moe_model_scalar(const moe_model *m, int which);
/* Reads the scalars to the host if anything wrote them since the last read, and reports
 * any failure of the backend's ops since then (the sticky error). */
moe_status moe_model_read_scalars(moe_model *m);
/* The scalars themselves [*n]: the last forward's (MOE_SPAN_LAST) or their step sums
 * (MOE_SPAN_STEP), for a distributed step that replaces them with sums over every group
 * (src/dist/groups.h); the host copy counts as stale. */
moe_tensor moe_model_scalars(moe_model *m, int span, int64_t *n);
/* Every MoE layer's statistics (what its bias update reads) = the last forward's scalars
 * as they now are. */
void moe_model_scalars_to_layers(moe_model *m);
/* As last read: the optimizer's scalar `which`. */
double moe_model_host_scalar(const moe_model *m, int which);
void moe_model_zero_grad(moe_model *m);
/* Logits [B·S, V] of the last forward made without targets. */
moe_status moe_model_get_logits(moe_model *m, double *dst /* [B·S, V] */);

/*
 * One decode step for sampling (batch 1, training off): runs token at position pos,
 * stores its k, v in the KV cache, attends to positions 0..pos and writes the logits of
 * the next token. Positions 0..pos−1 must have been decoded before (with the same
 * model, since the last forward is irrelevant: the cache is separate); 0 <= pos < max_seq.
 * Overwrites the saved activations (a following backward needs a new forward).
 */
moe_status moe_model_decode(moe_model *m, int32_t token, int64_t pos, double *logits /* [V] */);

/* ---- MoE statistics of the last forward --------------------------------------- */

typedef struct {
    int64_t n_experts;   /* 0: a dense layer (the rest is zero) */
    moe_aux_losses aux;  /* each aux loss unscaled, and aux.total (coefficients applied) */
    int64_t assignments; /* kept (token, expert) pairs, over every rank */
    int64_t dropped;     /* selected but dropped by capacity, over every rank */
    double load_max;     /* max over experts of the kept count */
    double load_mean;    /* mean over experts of the kept count */
} moe_model_layer_stats;

/* What statistics cover: the last forward, or the sum over every forward since
 * moe_model_zero_grad (a step's micro-batches). */
typedef enum { MOE_SPAN_LAST, MOE_SPAN_STEP } moe_span;

/* counts [n_experts] (may be NULL): kept assignments per expert. Reads the scalars once. */
moe_status moe_model_get_layer_stats(moe_model *m, int64_t layer, moe_span span, moe_model_layer_stats *s,
                                     int64_t *counts);

typedef struct {
    double ce;                 /* cross-entropy (summed over the span's forwards) */
    int64_t forwards;          /* forwards in the span */
    int64_t n_moe_layers;
    double load_max_over_mean; /* mean over MoE layers of load_max / load_mean (1 = balanced) */
    double load_max, load_mean; /* summed over MoE layers, for "max/mean" displays */
    double dropped_frac;       /* Σ dropped / Σ (kept + dropped) over MoE layers */
    double aux_lb, aux_importance, aux_load, aux_z, aux_mi; /* summed over layers, unscaled */
    double aux_total;          /* Σ coef·aux (= losses.aux) */
} moe_model_stats;

moe_status moe_model_get_stats(moe_model *m, moe_span span, moe_model_stats *s);
/* The MoE layer of layer l (its plan, phase timings, saved tensors); NULL for a dense layer. */
moe_layer *moe_model_moe_layer(moe_model *m, int64_t layer);
/* The mixture of attention heads of layer l; NULL without attention_experts. */
moe_moa *moe_model_moa(moe_model *m, int64_t layer);

/* ---- parameters as named tensors (checkpoints) --------------------------------- */

typedef struct {
    char name[96];               /* cmoe / checkpoint name (table at the top) */
    int ndim;
    int64_t shape[MOE_MAX_DIMS];
    int64_t numel;
    int decay;                   /* 1: AdamW weight decay applies (matrices); 0 for norm
                                  * weights, biases and the router bias */
    int expert;                  /* 1: an expert's weights (experts.*): this rank holds shard
                                  * `shard` of them, and data-parallel replicas of that shard
                                  * reduce its gradient; 0: every rank holds it all */
    int64_t shard;               /* the expert shard (0 when expert is 0) */
    int64_t shards;              /* shards of the whole tensor (1: this is all of it); the
                                  * whole tensor's dim 0 is shards × shape[0], and this
                                  * rank's part starts at element shard × numel */
} moe_param_info;

int moe_model_n_params(const moe_model *m);
const moe_param_info *moe_model_param(const moe_model *m, int i);
/* Index of a parameter by name, −1 when absent. */
int moe_model_param_index(const moe_model *m, const char *name);
/* Total elements over all parameters. */
int64_t moe_model_numel(const moe_model *m);
/* Host copies of parameter i (numel elements) and of its gradient. */
moe_status moe_model_get_param(moe_model *m, int i, double *dst);
moe_status moe_model_set_param(moe_model *m, int i, const double *src);
/* The same from host data of any dtype (a checkpoint's tensor as it is in the file). */
moe_status moe_model_set_param_raw(moe_model *m, int i, const void *src, moe_dtype type);
moe_status moe_model_get_grad(moe_model *m, int i, double *dst);
/* The backend tensors of parameter i and its gradient (for the optimizer). */
moe_status moe_model_param_tensors(moe_model *m, int i, moe_tensor *param, moe_tensor *grad);
/* Aux-loss-free balancing: each MoE layer with use_expert_bias updates its bias from the
 * last forward's loads (moe_optim_step calls it). */
void moe_model_update_bias(moe_model *m);

/*
 * Why the numbers went bad, in words for the message that stops a diverging run: the
 * first parameter (grads = 0) or gradient (grads = 1) holding NaN or ±Inf, with its name,
 * element and value; else "every parameter is finite" and the largest |value| and where
 * it is. found (may be NULL): 1 when a non-finite value was found.
 */
moe_status moe_model_explain_nonfinite(moe_model *m, int grads, char *buf, size_t n, int *found);
/* The last error (an allocation that failed) with the config keys that sized the model:
 * what moe_model_create says when the model does not fit the machine. */
moe_status moe_model_size_error(const moe_model_config *c, int64_t tokens);

/* ---- AdamW ---------------------------------------------------------------------- */

/*
 * AdamW (PyTorch's: decoupled weight decay p −= lr·wd·p) over every parameter. Exempt
 * from weight decay: RMSNorm weights, biases (q/k/v), the router bias (and every 1-D
 * tensor: moe_param_info.decay). Gradients are clipped by their global L2 norm (after
 * the accumulation scale). Learning rate: linear warmup from lr/warmup_steps to lr over
 * warmup_steps, then cosine decay to min_lr_ratio·lr at total_steps (constant after
 * warmup when total_steps <= warmup_steps), the schedule of llm.c / nanoGPT.
 */
typedef struct {
    double lr;            /* peak learning rate */
    double min_lr_ratio;  /* final lr = min_lr_ratio · lr */
    int64_t warmup_steps;
    int64_t total_steps;  /* cosine horizon */
    double beta1, beta2, eps;
    double weight_decay;
    double grad_clip;     /* max global norm; <= 0: no clipping */
} moe_optim_config;

/* lr 3e-3, min ratio 0.1, warmup 0, total 0, betas (0.9, 0.95), eps 1e-8, wd 0.1, clip 1. */
void moe_optim_config_default(moe_optim_config *o);
moe_status moe_optim_config_validate(const moe_optim_config *o);
/* The learning rate of 0-based step. */
double moe_lr_at(const moe_optim_config *o, int64_t step);

typedef struct moe_optim moe_optim;

/* m, v (zero) in backend buffers laid out like the model's parameters. */
moe_status moe_optim_create(moe_model *m, const moe_optim_config *o, moe_optim **out);

/*
 * A step over several ranks (src/dist/groups.h): how the global gradient norm is summed
 * (acc [1] = Σ g² over the whole model, the same bits on every rank), which elements of
 * each parameter this rank updates — ZeRO-1: the moments of the rest are not kept here —
 * and how the parameters become whole again after the update.
 */
typedef struct {
    moe_status (*sumsq)(void *ctx, moe_tensor acc);
    const int64_t *lo, *hi; /* [n params] elements [lo[i], hi[i]) of parameter i; NULL: all */
    moe_status (*gather)(void *ctx);
    void *ctx;
} moe_optim_dist;

moe_status moe_optim_create_dist(moe_model *m, const moe_optim_config *o, const moe_optim_dist *d, moe_optim **out);
/* Elements of optimizer state this rank keeps (both moments; master weights alike). */
int64_t moe_optim_numel(const moe_optim *o);
/* The elements [*lo, *hi) of parameter i this rank updates. */
void moe_optim_part(const moe_optim *o, int i, int64_t *lo, int64_t *hi);
void moe_optim_free(moe_optim *o);

typedef struct {
    double lr;         /* the rate used */
    double grad_norm;  /* global norm of grad·grad_scale, before clipping; when it is not
                        * finite the step was skipped: parameters, moments and the step
                        * count are as they were (the caller reports the divergence) */
    double clip_scale; /* the clipping factor applied (1: none) */
} moe_optim_result;

/*
 * One step with gradient grad·grad_scale (grad_scale = 1/accum averages accumulated
 * micro-batches): clip, AdamW at moe_lr_at(steps done), then the steps count += 1 and
 * the router biases update (moe_model_update_bias). r may be NULL. Gradients are left as
 * they are (zero them before the next accumulation).
 */
moe_status moe_optim_step(moe_optim *o, double grad_scale, moe_optim_result *r);
/* Steps taken (AdamW's t after the last step); set when resuming from a checkpoint. */
int64_t moe_optim_steps(const moe_optim *o);
void moe_optim_set_steps(moe_optim *o, int64_t t);
const moe_optim_config *moe_optim_config_of(const moe_optim *o);
/* Change lr and schedule in place (e.g. from the command line on resume). */
moe_status moe_optim_set_config(moe_optim *o, const moe_optim_config *c);
/* Parameter i's weights as the optimizer steps them and its moments, on the backend,
 * elements [lo, hi) of it (moe_optim_part; all of it in one process): the weights are the
 * fp32 master copy when the model stores them narrower (bf16) — except before the first
 * step, when the parameters are authoritative (the first step takes the master copies
 * from them, however they were set after the optimizer was created). A checkpoint saves
 * these and restores into them (after moe_optim_set_steps). */
moe_status moe_optim_tensors(moe_optim *o, int i, moe_tensor *weights, moe_tensor *m, moe_tensor *v);
/* Host copies of elements [lo, hi) of those weights, into w + lo (the rest untouched). */
moe_status moe_optim_get_weights(moe_optim *o, int i, double *w);
/* Host copies of the moments of parameter i (numel each; checkpoints: "optim.m.NAME").
 * With a partition (moe_optim_dist) only elements [lo, hi) are kept: get writes those of
 * m and v and leaves the rest, set reads those. */
moe_status moe_optim_get_moments(moe_optim *o, int i, double *m, double *v);
moe_status moe_optim_set_moments(moe_optim *o, int i, const double *m, const double *v);

#endif
