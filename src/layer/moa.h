/*
 * moa.h — mixture of attention heads (MoA, Zhang et al. 2022) written once against the
 * backend table, as the MoE layer is (moe_layer.h). ref/moa.h defines what it computes and
 * holds the oracle it is checked against.
 *
 * A router (softmax top-k, renormalised; its load-balance loss and z-loss) sends each token
 * to k of E attention-head experts. The composition reuses the MoE machinery and the
 * model's attention:
 *
 *   z = x·Wr, s = softmax(z), plan = route(s)            the MoE router ops
 *   K = rope(x·Wk), V = x·Wv                              shared by every expert (one head)
 *   qe = experts_linear(dispatch(x), Wq)                  each kept (token, expert): [n, hd]
 *   q  = rope(choice_scatter(qe))                         [B, S, k, hd]: a token's k choices
 *                                                         as k query heads
 *   o  = attention(q, K, V) with H = k, Hkv = 1           causal, the model's attention op
 *   y  = combine(experts_linear(choice_gather(o), Wo))    weighted by the gate
 *
 * so the only new ops are the grouped linear map and the moves between plan rows and
 * choice slots (backend.h). Every buffer is sized at create for max_batch × max_seq
 * tokens; forward, backward and decode allocate nothing and never wait for the host.
 *
 * Parameters (names below "model.layers.N.self_attn." in a model): router.weight [C, E],
 * k_proj.weight [C, hd], v_proj.weight [C, hd], experts.q_proj [E, C, hd],
 * experts.o_proj [E, hd, C].
 */
#ifndef CMOE_LAYER_MOA_H
#define CMOE_LAYER_MOA_H

#include "backend/backend.h"
#include "ref/moa.h"

typedef struct moe_moa moe_moa;

/* d->B, d->S: the largest batch and sequence it will run (decode positions < d->S); layer
 * and seed key the router's config (MoA draws nothing at random). */
moe_status moe_moa_create(const moe_moa_dims *d, int64_t layer, uint64_t seed, moe_backend *b, moe_moa **out);
void moe_moa_free(moe_moa *a);
/* The router's layer config (E, k, the aux-loss coefficients): moe_layer_aux_of of the stats. */
const moe_layer_config *moe_moa_router(const moe_moa *a);
/* Parameter names and shapes (the order of initialisation and checkpoints). */
const moe_arena *moe_moa_params(const moe_moa *a);
moe_status moe_moa_param_tensors(const moe_moa *a, const char *name, moe_tensor *param, moe_tensor *grad);
void moe_moa_zero_grad(moe_moa *a);

/* y [B·S, C] = MoA(x [B·S, C]) for B <= max batch, S <= max seq. key: the router's draws
 * (none: MoA routing is deterministic). Nothing waits for the backend. */
moe_status moe_moa_forward(moe_moa *a, moe_tensor y, moe_tensor x, int64_t B, int64_t S, moe_key key);
/* dx += ∂L/∂x, parameter gradients += ∂L/∂w for L = Σ dy·y + the coefficients × aux losses. */
moe_status moe_moa_backward(moe_moa *a, moe_tensor dx, moe_tensor dy);
/* One token at position pos against the layer's KV cache (positions 0..pos-1 decoded
 * before); y [1, C]. Overwrites the last forward (a backward needs a new one). */
moe_status moe_moa_decode(moe_moa *a, moe_tensor y, moe_tensor x, int64_t pos);

/* The last forward's scalars on the backend, as an MoE layer's (moe_layer.h): the aux losses
 * (MOE_STAT_LB, MOE_STAT_Z; the others 0), then counts: [MOE_LAYER_NSTATS(E)]. */
moe_tensor moe_moa_stats(const moe_moa *a);
/* The last forward's routing plan (NULL before one). */
const moe_bplan *moe_moa_plan(const moe_moa *a);

#endif
