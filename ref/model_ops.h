/*
 * model_ops.h — the oracle of every non-MoE op of the language model, in double.
 *
 * Same conventions as ref.h (llm.c): a forward/backward pair takes outputs, buffers
 * saved for backward, inputs, parameters, then dimensions; backward ACCUMULATES (+=)
 * into every gradient it writes. The fp32 twins in src/cpu/model_ops.h have the same
 * argument lists with float for double, so that a backend wraps either one.
 *
 * Layouts (row-major, N = B·S tokens):
 *   activations        [B, S, C]            = [N, C]
 *   q, attention out   [B, S, H, hd]        = [N, H·hd]   (x·Wq with Wq [C, H·hd])
 *   k, v               [B, S, Hkv, hd]      = [N, Hkv·hd]
 *   probabilities      [B, H, S, S]         row i holds softmax over keys 0..i, zeros after
 *   KV cache           [S_max, Hkv, hd]     the k/v layout with B = 1
 * Query head h reads key/value head h / (H / Hkv) (grouped-query attention, Hkv | H).
 * Dimensions are validated by the model's config, not here: these are void.
 */
#ifndef CMOE_REF_MODEL_OPS_H
#define CMOE_REF_MODEL_OPS_H

#include "cmoe.h"

/* ---- token embedding (ref/embedding.c) ------------------------------------- */

/* out[t] = wte[tokens[t]]; token ids are validated by the caller (0 <= id < V). */
void moe_ref_embedding_forward(double *out /* [N, C] */, const int32_t *tokens /* [N] */,
                               const double *wte /* [V, C] */, int64_t N, int64_t C);
/* dwte[tokens[t]] += dout[t] */
void moe_ref_embedding_backward(double *dwte /* [V, C] */, const double *dout /* [N, C] */,
                                const int32_t *tokens /* [N] */, int64_t N, int64_t C);

/* ---- elementwise (ref/residual.c) ------------------------------------------ */

/* out = a + b (out may alias a or b): the residual connection */
void moe_ref_add_forward(double *out /* [n] */, const double *a /* [n] */, const double *b /* [n] */, int64_t n);
/* da += dout, db += dout; either may be NULL */
void moe_ref_add_backward(double *da /* [n] */, double *db /* [n] */, const double *dout /* [n] */, int64_t n);

/* ---- RMSNorm (ref/rmsnorm.c) ------------------------------------------------ */

/* out = x · rstd · w, rstd = 1/sqrt(mean(x²) + eps) per row (saved for backward) */
void moe_ref_rmsnorm_forward(double *out /* [N, C] */, double *rstd /* [N] */, const double *x /* [N, C] */,
                             const double *w /* [C] */, double eps, int64_t N, int64_t C);
/* dx += ∂/∂x, dw += ∂/∂w; dx or dw may be NULL */
void moe_ref_rmsnorm_backward(double *dx /* [N, C] */, double *dw /* [C] */, const double *dout /* [N, C] */,
                              const double *x /* [N, C] */, const double *w /* [C] */,
                              const double *rstd /* [N] */, int64_t N, int64_t C);

/* ---- rotary position embedding (ref/rope.c) -------------------------------- */

/*
 * Llama / Mixtral "rotate_half": dimension i < hd/2 pairs with i + hd/2, both rotated
 * by angle (pos0 + s) · theta^(−2i/hd) for the token at sequence index s. hd is even.
 * x is [B, S, nh, hd] (nh = H for q, Hkv for k); out may alias x.
 * pos0 is the position of s = 0: 0 in training, the cache length when decoding.
 */
void moe_ref_rope_forward(double *out /* [B, S, nh, hd] */, const double *x /* [B, S, nh, hd] */,
                          int64_t pos0, double theta, int64_t B, int64_t S, int64_t nh, int64_t hd);
/* dx += R(−angle) · dout: the inverse rotation (dx must not alias dout) */
void moe_ref_rope_backward(double *dx /* [B, S, nh, hd] */, const double *dout /* [B, S, nh, hd] */,
                           int64_t pos0, double theta, int64_t B, int64_t S, int64_t nh, int64_t hd);

/* ---- causal grouped-query attention (ref/attention.c) ---------------------- */

/* out = softmax(q·kᵀ/√hd + causal mask)·v per (batch, head); att saves the probabilities. */
void moe_ref_attention_forward(double *out /* [B, S, H, hd] */, double *att /* [B, H, S, S] */,
                               const double *q /* [B, S, H, hd] */, const double *k /* [B, S, Hkv, hd] */,
                               const double *v /* [B, S, Hkv, hd] */, int64_t B, int64_t S, int64_t H,
                               int64_t Hkv, int64_t hd);
/*
 * dq += ∂/∂q, dk += ∂/∂k, dv += ∂/∂v (dk, dv summed over the H/Hkv query heads sharing
 * a KV head). datt is scratch (overwritten; the cpu twin keeps dS there); att from forward.
 */
void moe_ref_attention_backward(double *dq /* [B, S, H, hd] */, double *dk /* [B, S, Hkv, hd] */,
                                double *dv /* [B, S, Hkv, hd] */, double *datt /* [B, H, S, S] scratch */,
                                const double *dout /* [B, S, H, hd] */, const double *att /* [B, H, S, S] */,
                                const double *q, const double *k, const double *v, int64_t B, int64_t S,
                                int64_t H, int64_t Hkv, int64_t hd);
/*
 * One decode step for sampling: the query of position pos against a KV cache that
 * already holds positions 0..pos (the new token's k, v included). Forward only.
 * att is scratch for the probabilities of each head.
 */
void moe_ref_attention_decode(double *out /* [H, hd] */, double *att /* [H, pos + 1] scratch */,
                              const double *q /* [H, hd] */, const double *kcache /* [S_max, Hkv, hd] */,
                              const double *vcache /* [S_max, Hkv, hd] */, int64_t pos, int64_t H,
                              int64_t Hkv, int64_t hd);

/* ---- cross-entropy (ref/crossentropy.c) ------------------------------------ */

/*
 * Mean over the rows whose target is not −1 (PyTorch's ignore_index = −1: the mean
 * divides by the number of counted rows) of −log softmax(logits)[target]. probs is
 * saved for backward and may alias logits. Returns 0 when no row counts.
 */
double moe_ref_crossentropy_forward(double *probs /* [N, V] */, const double *logits /* [N, V] */,
                                    const int32_t *targets /* [N] */, int64_t N, int64_t V);
/* dlogits += dloss · (probs − onehot(target)) / n_counted on counted rows (no alias with probs) */
void moe_ref_crossentropy_backward(double *dlogits /* [N, V] */, const double *probs /* [N, V] */,
                                   const int32_t *targets /* [N] */, double dloss, int64_t N, int64_t V);

/* ---- optimizer (ref/adamw.c) ----------------------------------------------- */

/*
 * One AdamW step (Loshchilov & Hutter; PyTorch's AdamW) on n parameters with gradient
 * g·grad_scale (grad_scale carries clipping and accumulation averaging):
 *   m = β1·m + (1−β1)·g,  v = β2·v + (1−β2)·g²,  m̂ = m/(1−β1^t),  v̂ = v/(1−β2^t),
 *   p −= lr·(m̂/(√v̂ + eps) + wd·p)                 t is the 1-based step.
 * Parameters exempt from decay are stepped with wd = 0.
 */
void moe_ref_adamw_step(double *p /* [n] */, double *m /* [n] */, double *v /* [n] */, const double *g /* [n] */,
                        double lr, double beta1, double beta2, double eps, double wd, double grad_scale,
                        int64_t t, int64_t n);
/* Σ g² over n (add the tensors' sums for the global norm) */
double moe_ref_grad_sumsq(const double *g /* [n] */, int64_t n);
/* min(1, max_norm / (‖g‖ + 1e-6)) as torch.nn.utils.clip_grad_norm_; 1 when max_norm <= 0 */
double moe_ref_clip_scale(double sumsq, double max_norm);

#endif
