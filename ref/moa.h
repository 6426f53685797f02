/*
 * moa.h — the oracle of mixture of attention heads (MoA, Zhang et al. 2022, "Mixture of
 * Attention Heads: Selecting Attention Heads Per Token"), in double.
 *
 * A router picks k of E attention-head experts per token (softmax of x·Wr, top k,
 * renormalised over the k). Key and value projections are shared by every expert (one
 * head each: K = rope(x·Wk), V = x·Wv); expert e has its own query and output projections:
 *
 *     y_t = Σ_{e ∈ topk(t)} g_te · attend(rope(x_t·Wq[e]), K, V)·Wo[e]
 *
 * causal over the positions of t's sequence, plus the router's load-balance loss and
 * z-loss (each times its coefficient). Shapes: x, y [N, C] with N = B·S; Wr [C, E], Wk and
 * Wv [C, hd], Wq [E, C, hd], Wo [E, hd, C].
 *
 * Two parts:
 *  - the ops a backend composes MoA from (backend.h: experts_linear_forward/backward,
 *    choice_scatter, choice_gather), here in their reference form;
 *  - the whole MoA layer written directly, one assignment at a time (no slots, no grouped
 *    GEMM): the oracle the composed layer (src/layer/moa.c) is checked against, with its
 *    backward checked by finite differences.
 */
#ifndef CMOE_REF_MOA_H
#define CMOE_REF_MOA_H

#include "cmoe.h"

/* ---- ops over a routing plan ----------------------------------------------------- */

/* ye[i] = xe[i]·w[e] for every row i of expert e's segment ([offsets[e], +count[e])) */
void moe_ref_experts_linear_forward(double *ye /* [n, N] */, const double *xe /* [n, K] */,
                                    const double *w /* [E, K, N] */, const moe_plan *p, int64_t K, int64_t N);
/* dxe[i] += dye[i]·w[e]ᵀ (dxe may be NULL), dw[e] += Σ_i xe[i]ᵀ·dye[i] over e's segment */
void moe_ref_experts_linear_backward(double *dxe /* [n, K] */, double *dw /* [E, K, N] */,
                                     const double *dye /* [n, N] */, const double *xe /* [n, K] */,
                                     const double *w /* [E, K, N] */, const moe_plan *p, int64_t K, int64_t N);
/* Token-choice plans: slots[choice[i]] = rows[i] for every kept assignment i, and 0 in the
 * slots of choices that have none (dropped); slots is [T, k] rows of w. */
void moe_ref_choice_scatter(double *slots /* [T·k, w] */, const double *rows /* [n, w] */, const moe_plan *p,
                            int64_t w);
/* rows[i] += slots[choice[i]] (the adjoint of choice_scatter) */
void moe_ref_choice_gather(double *rows /* [n, w] */, const double *slots /* [T·k, w] */, const moe_plan *p,
                           int64_t w);

/* ---- the reference MoA layer -------------------------------------------------------- */

typedef struct {
    int64_t B, S;        /* sequences and their length: N = B·S tokens */
    int64_t C, hd;       /* model width, head dimension (even) */
    int64_t E, k;        /* attention experts, experts per token (1 <= k <= E) */
    double rope_theta;
    double lb_coef, z_coef; /* the router's load-balance loss and z-loss coefficients */
} moe_moa_dims;

/* The router's layer config: top-k of softmax, renormalised, dropless, no noise. */
void moe_moa_router_config(const moe_moa_dims *d, int64_t layer, uint64_t seed, moe_layer_config *c);

typedef struct {
    const double *wr; /* [C, E] router.weight */
    const double *wk; /* [C, hd] k_proj.weight */
    const double *wv; /* [C, hd] v_proj.weight */
    const double *wq; /* [E, C, hd] experts.q_proj */
    const double *wo; /* [E, hd, C] experts.o_proj */
} moe_moa_weights;

typedef struct {
    double *wr, *wk, *wv, *wq, *wo; /* as moe_moa_weights; accumulated (+=) */
} moe_moa_grads;

typedef struct moe_ref_moa moe_ref_moa;

moe_status moe_ref_moa_create(const moe_moa_dims *d, moe_ref_moa **out);
void moe_ref_moa_free(moe_ref_moa *a);
/* y = MoA(x); aux[0] = the load-balance loss, aux[1] the z-loss (unscaled). */
moe_status moe_ref_moa_forward(moe_ref_moa *a, double *y /* [N, C] */, double aux[2], const double *x /* [N, C] */,
                               const moe_moa_weights *w);
/* dx += ∂L/∂x and g += ∂L/∂w for L = Σ dy·y + lb_coef·lb + z_coef·z, at the last forward. */
moe_status moe_ref_moa_backward(moe_ref_moa *a, double *dx /* [N, C] */, moe_moa_grads *g, const double *dy,
                                const double *x, const moe_moa_weights *w);
/* The routing plan of the last forward. */
const moe_plan *moe_ref_moa_plan(const moe_ref_moa *a);

#endif
