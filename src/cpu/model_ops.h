/*
 * model_ops.h (cpu) — the fp32 twins of ref/model_ops.h: every non-MoE op of the language
 * model on raw float buffers (OpenBLAS cblas_sgemm + OpenMP), for the cpu backend.
 *
 * Each function has its ref twin's argument list with float* for double*; scalars
 * (eps, theta, lr, dloss, ...) stay double in both, and returned sums are double.
 * Layouts, semantics and aliasing rules are those documented in ref/model_ops.h;
 * backward ACCUMULATES (+=). Nothing here allocates: scratch comes from the caller.
 * Reductions (dw of RMSNorm, the loss, the gradient norm) are summed in double in a
 * fixed order that does not depend on the thread count, so two runs are bitwise equal.
 * Attention runs single-threaded sgemms per (batch, head) inside an OpenMP loop (the
 * backend keeps OpenBLAS at one thread, src/cpu/backend.c).
 */
#ifndef CMOE_CPU_MODEL_OPS_H
#define CMOE_CPU_MODEL_OPS_H

#include "cmoe.h"

/* ---- token embedding (src/cpu/embedding.c) --------------------------------- */

/* out[t] = wte[tokens[t]]; token ids are validated by the caller (0 <= id < V). */
void moe_cpu_embedding_forward(float *out /* [N, C] */, const int32_t *tokens /* [N] */,
                               const float *wte /* [V, C] */, int64_t N, int64_t C);
/* dwte[tokens[t]] += dout[t] */
void moe_cpu_embedding_backward(float *dwte /* [V, C] */, const float *dout /* [N, C] */,
                                const int32_t *tokens /* [N] */, int64_t N, int64_t C);

/* ---- RMSNorm (src/cpu/rmsnorm.c) ------------------------------------------------ */

/* out = x · rstd · w, rstd = 1/sqrt(mean(x²) + eps) per row (saved for backward) */
void moe_cpu_rmsnorm_forward(float *out /* [N, C] */, float *rstd /* [N] */, const float *x /* [N, C] */,
                             const float *w /* [C] */, double eps, int64_t N, int64_t C);
/* dx += ∂/∂x, dw += ∂/∂w; dx or dw may be NULL */
void moe_cpu_rmsnorm_backward(float *dx /* [N, C] */, float *dw /* [C] */, const float *dout /* [N, C] */,
                              const float *x /* [N, C] */, const float *w /* [C] */,
                              const float *rstd /* [N] */, int64_t N, int64_t C);

/* ---- rotary position embedding (src/cpu/rope.c) -------------------------------- */

/*
 * Llama / Mixtral "rotate_half": dimension i < hd/2 pairs with i + hd/2, both rotated
 * by angle (pos0 + s) · theta^(−2i/hd) for the token at sequence index s. hd is even.
 * x is [B, S, nh, hd] (nh = H for q, Hkv for k); out may alias x.
 * pos0 is the position of s = 0: 0 in training, the cache length when decoding.
 */
void moe_cpu_rope_forward(float *out /* [B, S, nh, hd] */, const float *x /* [B, S, nh, hd] */,
                          int64_t pos0, double theta, int64_t B, int64_t S, int64_t nh, int64_t hd);
/* dx += R(−angle) · dout: the inverse rotation (dx must not alias dout) */
void moe_cpu_rope_backward(float *dx /* [B, S, nh, hd] */, const float *dout /* [B, S, nh, hd] */,
                           int64_t pos0, double theta, int64_t B, int64_t S, int64_t nh, int64_t hd);

/* ---- causal grouped-query attention (src/cpu/attention.c) ---------------------- */

/* out = softmax(q·kᵀ/√hd + causal mask)·v per (batch, head); att saves the probabilities. */
void moe_cpu_attention_forward(float *out /* [B, S, H, hd] */, float *att /* [B, H, S, S] */,
                               const float *q /* [B, S, H, hd] */, const float *k /* [B, S, Hkv, hd] */,
                               const float *v /* [B, S, Hkv, hd] */, int64_t B, int64_t S, int64_t H,
                               int64_t Hkv, int64_t hd);
/*
 * dq += ∂/∂q, dk += ∂/∂k, dv += ∂/∂v (dk, dv summed over the H/Hkv query heads sharing
 * a KV head). datt is scratch (overwritten with dP, then dS); att from forward.
 */
void moe_cpu_attention_backward(float *dq /* [B, S, H, hd] */, float *dk /* [B, S, Hkv, hd] */,
                                float *dv /* [B, S, Hkv, hd] */, float *datt /* [B, H, S, S] scratch */,
                                const float *dout /* [B, S, H, hd] */, const float *att /* [B, H, S, S] */,
                                const float *q, const float *k, const float *v, int64_t B, int64_t S,
                                int64_t H, int64_t Hkv, int64_t hd);
/*
 * One decode step for sampling: the query of position pos against a KV cache that
 * already holds positions 0..pos (the new token's k, v included). Forward only.
 * att is scratch for the probabilities of each head.
 */
void moe_cpu_attention_decode(float *out /* [H, hd] */, float *att /* [H, pos + 1] scratch */,
                              const float *q /* [H, hd] */, const float *kcache /* [S_max, Hkv, hd] */,
                              const float *vcache /* [S_max, Hkv, hd] */, int64_t pos, int64_t H,
                              int64_t Hkv, int64_t hd);

/* ---- cross-entropy (src/cpu/crossentropy.c) ------------------------------------ */

/*
 * Mean over the rows whose target is not −1 (PyTorch's ignore_index = −1: the mean
 * divides by the number of counted rows) of −log softmax(logits)[target]. probs is
 * saved for backward and may alias logits. Returns 0 when no row counts.
 */
double moe_cpu_crossentropy_forward(float *probs /* [N, V] */, const float *logits /* [N, V] */,
                                    const int32_t *targets /* [N] */, int64_t N, int64_t V);
/* dlogits += dloss · (probs − onehot(target)) / n_counted on counted rows (no alias with probs) */
void moe_cpu_crossentropy_backward(float *dlogits /* [N, V] */, const float *probs /* [N, V] */,
                                   const int32_t *targets /* [N] */, double dloss, int64_t N, int64_t V);

/* ---- optimizer (src/cpu/adamw.c) ----------------------------------------------- */

/*
 * One AdamW step (Loshchilov & Hutter; PyTorch's AdamW) on n parameters with gradient
 * g·grad_scale (grad_scale carries clipping and accumulation averaging):
 *   m = β1·m + (1−β1)·g,  v = β2·v + (1−β2)·g²,  m̂ = m/(1−β1^t),  v̂ = v/(1−β2^t),
 *   p −= lr·(m̂/(√v̂ + eps) + wd·p)                 t is the 1-based step.
 * Parameters exempt from decay are stepped with wd = 0.
 */
void moe_cpu_adamw_step(float *p /* [n] */, float *m /* [n] */, float *v /* [n] */, const float *g /* [n] */,
                        double lr, double beta1, double beta2, double eps, double wd, double grad_scale,
                        int64_t t, int64_t n);
/* Σ g² over n (add the tensors' sums for the global norm) */
double moe_cpu_grad_sumsq(const float *g /* [n] */, int64_t n);
/* min(1, max_norm / (‖g‖ + 1e-6)) as torch.nn.utils.clip_grad_norm_; 1 when max_norm <= 0 */
double moe_cpu_clip_scale(double sumsq, double max_norm);

#endif
