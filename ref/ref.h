/*
 * ref.h — the oracle: every MoE op forward and backward, plain C11 + OpenMP, in double.
 *
 * Conventions (llm.c): a forward/backward pair takes outputs, buffers saved for
 * backward, inputs, parameters, then dimensions. Backward ACCUMULATES (+=) into
 * every gradient it writes, inputs' gradients included. Row-major; weights are
 * [in, out] so that out = in · W.
 */
#ifndef CMOE_REF_H
#define CMOE_REF_H

#include "cmoe.h"

/* ---- dense algebra (ref/matmul.c) ---------------------------------------- */

/* out = x · w */
void moe_ref_matmul_forward(double *out /* [T, N] */, const double *x /* [T, K] */,
                            const double *w /* [K, N] */, int64_t T, int64_t K, int64_t N);
/* dx += dout · wᵀ (dx may be NULL), dw += xᵀ · dout (dw may be NULL) */
void moe_ref_matmul_backward(double *dx /* [T, K] */, double *dw /* [K, N] */,
                             const double *dout /* [T, N] */, const double *x /* [T, K] */,
                             const double *w /* [K, N] */, int64_t T, int64_t K, int64_t N);

/* ---- router (ref/router.c) ------------------------------------------------ */

/* Switch's jitter: xr = x ⊙ u, u ~ U(1-eps, 1+eps) keyed (seed, JITTER|layer|micro, step,
 * token0 + t, i). */
void moe_ref_jitter_forward(double *xr /* [T, d] */, double *u /* [T, d] saved */,
                            const double *x /* [T, d] */, double eps, uint64_t seed,
                            int64_t layer, moe_key key, int64_t T, int64_t d);
void moe_ref_jitter_backward(double *dx /* [T, d] */, const double *dxr /* [T, d] */,
                             const double *u /* [T, d] */, int64_t T, int64_t d);

/* s = softmax(z) over each row */
void moe_ref_softmax_forward(double *s /* [T, E] */, const double *z /* [T, E] */, int64_t T, int64_t E);
void moe_ref_softmax_backward(double *dz /* [T, E] */, const double *ds /* [T, E] */,
                              const double *s /* [T, E] */, int64_t T, int64_t E);
/* s = sigmoid(z) elementwise */
void moe_ref_sigmoid_forward(double *s, const double *z, int64_t n);
void moe_ref_sigmoid_backward(double *dz, const double *ds, const double *s, int64_t n);

/* Noisy gating: h = z + ε·softplus(zn), ε ~ N(0,1) keyed (seed, NOISE|layer|micro, step, token0 + t, e).
 * Not training: h = z and eps is filled with 0. */
void moe_ref_noisy_logits_forward(double *h /* [T, E] */, double *eps /* [T, E] saved */,
                                  const double *z /* [T, E] clean */, const double *zn /* [T, E] x·Wnoise */,
                                  int training, uint64_t seed, int64_t layer, moe_key key,
                                  int64_t T, int64_t E);
void moe_ref_noisy_logits_backward(double *dz, double *dzn, const double *dh,
                                   const double *eps, const double *zn, int64_t T, int64_t E);

/* Shazeer's smooth load estimator: load_e = Σ_t Φ((z_te − thr_te) / softplus(zn_te)),
 * thr_te = the k-th largest h_t· excluding e (the (k+1)-th if e is in the top k).
 * Gradients flow to z, zn and, through thr, to h. */
void moe_ref_noisy_load_forward(double *load /* [E] */, const double *z, const double *zn,
                                const double *h, int64_t k, int64_t T, int64_t E);
void moe_ref_noisy_load_backward(double *dz, double *dzn, double *dh, const double *dload /* [E] */,
                                 const double *z, const double *zn, const double *h,
                                 int64_t k, int64_t T, int64_t E);

/* ---- selection: scores -> routing plan (ref/select.c) --------------------- */

/*
 * Builds the plan from scores s [T, E] (softmax or sigmoid of the selection logits h).
 * Token choice picks the top k of s + bias (bias may be NULL; it changes selection only),
 * weight = s (renormalised over the k chosen when c->renormalize), then capacity.
 * Expert choice: each expert its top-C tokens of s[:, e]. Hash: expert = moe_hash(token_ids[t]) mod E,
 * weight 1. Sinkhorn: top k of the Sinkhorn-balanced exp(h), weight = s.
 * h is needed for GShard's Gumbel sampling (second_policy == SAMPLING) and Sinkhorn.
 * Ties go to the lower expert index (or lower token index for expert choice).
 */
moe_status moe_ref_route(moe_plan *p, const double *s /* [T, E] */, const double *h /* [T, E] */,
                         const double *bias /* [E] or NULL */, const int32_t *token_ids /* [T] or NULL */,
                         const moe_layer_config *c, moe_key key, int64_t T);
/* ds += ∂(Σ_i dweight_i·weight_i + Σ_tj dchoice_tj·choice_weight_tj)/∂s, through the
 * renormalisation when used. dweight [n] comes from combine, dchoice_weight [T, k] from
 * the importance loss; either may be NULL (dchoice_weight is ignored without choice arrays).
 * bias must be the one given to moe_ref_route: under GShard's RANDOM policy a skipped
 * second expert still renormalises the first weight, and backward re-finds it from s + bias. */
void moe_ref_route_backward(double *ds /* [T, E] */, const double *dweight /* [n] */,
                            const double *dchoice_weight /* [T, k] */, const moe_plan *p,
                            const double *s /* [T, E] */, const double *bias /* [E] or NULL */,
                            const moe_layer_config *c);
/* The fixed hash of hash routing (splitmix64 finaliser). */
uint64_t moe_hash_token(uint32_t token_id);

/* ---- aux losses (ref/aux_loss.c); each returns the unscaled loss --------- */

/* E·Σ_e f_e·P_e, f_e = selected_e / (T·k) over all k choices before dropping, P_e = mean_t s_te. */
double moe_ref_lb_loss_forward(const double *s /* [T, E] */, const moe_plan *p, int64_t T, int64_t E);
void moe_ref_lb_loss_backward(double *ds /* [T, E] */, double dloss, const moe_plan *p, int64_t T, int64_t E);

/* cv² = var/mean² (population variance, +1e-10 in the denominator) of a vector of E. */
double moe_ref_cv2_forward(const double *v /* [E] */, int64_t E);
void moe_ref_cv2_backward(double *dv /* [E] */, double dloss, const double *v, int64_t E);
/* importance_e = Σ_t gate_te: for token choice the choice weights before dropping,
 * otherwise the kept assignments' weights. The backward writes dchoice_weight [T, k]
 * (token choice) or dweight [n] (the others). */
void moe_ref_importance_forward(double *imp /* [E] */, const moe_plan *p);
void moe_ref_importance_backward(double *dweight /* [n] */, double *dchoice_weight /* [T, k] */,
                                 const double *dimp /* [E] */, const moe_plan *p);

/* mean_t (logsumexp_e z_te)² */
double moe_ref_z_loss_forward(const double *z /* [T, E] */, int64_t T, int64_t E);
void moe_ref_z_loss_backward(double *dz, double dloss, const double *z, int64_t T, int64_t E);

/* −MI(task; expert) with P(e|task) = mean of s over the task's tokens (Mod-Squad). */
double moe_ref_mi_loss_forward(const double *s /* [T, E] */, const int32_t *task /* [T] */,
                               int64_t n_tasks, int64_t T, int64_t E);
void moe_ref_mi_loss_backward(double *ds, double dloss, const double *s, const int32_t *task,
                              int64_t n_tasks, int64_t T, int64_t E);

/* ---- experts (ref/ffn.c) --------------------------------------------------- */

/* Number of columns of the first projection's output that are saved per row. */
int moe_act_is_glu(moe_activation a);
/* One FFN over n rows: h1 = x·w1, [h3 = x·w3], a = act(h1) [⊙ h3], out = a·w2.
 * h1, h3, a are saved [n, f] (h3 unused without GLU). */
void moe_ref_ffn_forward(double *out /* [n, d] */, double *h1 /* [n, f] */, double *h3 /* [n, f] */,
                         double *a /* [n, f] */, const double *x /* [n, d] */,
                         const double *w1 /* [d, f] */, const double *w3 /* [d, f] or NULL */,
                         const double *w2 /* [f, d] */, moe_activation act, int64_t n, int64_t d, int64_t f);
void moe_ref_ffn_backward(double *dx /* [n, d] */, double *dw1, double *dw3, double *dw2,
                          const double *dout /* [n, d] */, const double *h1, const double *h3,
                          const double *a, const double *x, const double *w1, const double *w3,
                          const double *w2, moe_activation act, int64_t n, int64_t d, int64_t f);
/* The backward in its two halves (what moe_ref_ffn_backward does in turn): the data half
 * writes the pre-activation gradients dg1 [n, f] (and dg3 [n, f] with GLU, else NULL) and
 * adds dx (may be NULL); the weights half adds dw1, dw3, dw2 from them. Pipelined expert
 * parallelism runs the first per chunk and the second once, over every row. */
void moe_ref_ffn_backward_data(double *dx /* [n, d] */, double *dg1 /* [n, f] */, double *dg3 /* [n, f] */,
                               const double *dout /* [n, d] */, const double *h1, const double *h3,
                               const double *w1, const double *w3, const double *w2, moe_activation act,
                               int64_t n, int64_t d, int64_t f);
void moe_ref_ffn_backward_weights(double *dw1, double *dw3, double *dw2, const double *dg1, const double *dg3,
                                  const double *dout,
                                  const double *a, const double *x, moe_activation act, int64_t n, int64_t d,
                                  int64_t f);
/* All experts over the plan's expert-contiguous rows: expert e owns rows offsets[e]..offsets[e+1]. */
void moe_ref_experts_forward(double *ye /* [n, d] */, double *h1 /* [n, f] */, double *h3, double *a,
                             const double *xe /* [n, d] */, const double *w1 /* [E, d, f] */,
                             const double *w3 /* [E, d, f] or NULL */, const double *w2 /* [E, f, d] */,
                             const int64_t *offsets /* [E+1] */, moe_activation act,
                             int64_t E, int64_t d, int64_t f);
void moe_ref_experts_backward(double *dxe, double *dw1, double *dw3, double *dw2, const double *dye,
                              const double *h1, const double *h3, const double *a, const double *xe,
                              const double *w1, const double *w3, const double *w2,
                              const int64_t *offsets, moe_activation act, int64_t E, int64_t d, int64_t f);
/* Scalar activation and its derivative (GLU kinds use their gate function). */
double moe_ref_act(moe_activation a, double x);
double moe_ref_act_grad(moe_activation a, double x);

/* ---- dispatch / combine (ref/dispatch.c) --------------------------------- */

/* xe[i] = x[token[i]] */
void moe_ref_dispatch_forward(double *xe /* [n, d] */, const double *x /* [T, d] */, const moe_plan *p, int64_t d);
void moe_ref_dispatch_backward(double *dx /* [T, d] */, const double *dxe /* [n, d] */, const moe_plan *p, int64_t d);
/* y[t] = Σ_{i: token[i] = t} weight[i]·ye[i], summed in plan order; y is overwritten. */
void moe_ref_combine_forward(double *y /* [T, d] */, const double *ye /* [n, d] */, const moe_plan *p, int64_t d);
/* dye[i] += weight[i]·dy[token[i]]; dweight[i] += dy[token[i]]·ye[i] */
void moe_ref_combine_backward(double *dye /* [n, d] */, double *dweight /* [n] */, const double *dy /* [T, d] */,
                              const double *ye /* [n, d] */, const moe_plan *p, int64_t d);

/* ---- the composed layer (ref/moe_layer.c) --------------------------------- */

/* moe_layer_param_layout (cmoe.h) with the experts' tensors holding local_experts of the
 * config's experts: the shard of one rank under expert parallelism. */
moe_status moe_layer_param_layout_local(const moe_layer_config *c, int64_t local_experts, moe_arena *a);

/* A tensor the reference layer saved in its last forward, for tests and the oracle tool
 * (NULL when absent): "x", "router.xr", "router.z", "router.zn", "router.eps", "router.h",
 * "router.s" [T, E], "aux.importance", "aux.load" [E], "experts.x", "experts.h1",
 * "experts.h3", "experts.a", "experts.y" [n, ·], "moe.y" (MoE branch incl. shared),
 * "shared.h1", "shared.y", "shared.g", "residual.h1", "residual.y", "residual.c" [T, 2].
 * Views are sized for max_tokens; the first T rows (n for experts.*) are the last forward's. */
const double *moe_ref_layer_saved(const moe_ref_layer *l, const char *name, const moe_view **view);

#endif
