/*
 * moe_layer.h — the MoE layer, written once against the backend table (backend.h).
 *
 * It computes exactly what ref/moe_layer.c computes (same parameters by name and
 * layout, same saved tensors, same order of operations), on any backend: with the ref
 * backend it reproduces moe_ref_layer to rounding, with cpu it is the fast fp32 path.
 * Every buffer (parameters, gradients, saved activations, backward scratch, the plan,
 * the ops' scratch) is sized at create time from max_tokens: forward and backward
 * allocate nothing.
 *
 * The two exchanges of expert parallelism (dispatch and combine, and their backwards)
 * go through one moe_exchange: the local one calls the backend's ops; the MPI one
 * replaces it with MPI_Alltoallv without touching the layer.
 */
#ifndef CMOE_MOE_LAYER_H
#define CMOE_MOE_LAYER_H

#include "backend/backend.h"

typedef struct moe_exchange moe_exchange;
struct moe_exchange {
    /* xe [n, d] = the rows of x [T, d] that the plan sends to (this rank's) experts */
    void (*dispatch_forward)(const moe_exchange *ex, moe_backend *b, moe_tensor xe, moe_tensor x,
                             const moe_bplan *p, int64_t d);
    /* dx [T, d] += the rows of dxe sent back to their tokens */
    void (*dispatch_backward)(const moe_exchange *ex, moe_backend *b, moe_tensor dx, moe_tensor dxe,
                              const moe_bplan *p, int64_t d);
    /* y [T, d] = Σ weight·ye over each token's rows, in plan order */
    void (*combine_forward)(const moe_exchange *ex, moe_backend *b, moe_tensor y, moe_tensor ye,
                            const moe_bplan *p, int64_t d);
    /* dye [n, d] += weight·dy[token], dweight [n] += dy[token]·ye */
    void (*combine_backward)(const moe_exchange *ex, moe_backend *b, moe_tensor dye, moe_tensor dweight,
                             moe_tensor dy, moe_tensor ye, const moe_bplan *p, int64_t d);
    void *ctx;
};

/* Single process: the backend's own dispatch/combine. */
const moe_exchange *moe_exchange_local(void);

/* Phases timed by every forward and backward (seconds of the last call). */
enum {
    MOE_PH_ROUTER,      /* jitter, logits GEMM, noise, scores */
    MOE_PH_PLAN,        /* selection, capacity, plan layout */
    MOE_PH_AUX,         /* aux losses */
    MOE_PH_DISPATCH,
    MOE_PH_EXPERTS,
    MOE_PH_COMBINE,
    MOE_PH_SHARED,      /* shared experts and the residual branch */
    MOE_PH_B_SHARED,    /* backward of the same */
    MOE_PH_B_COMBINE,
    MOE_PH_B_EXPERTS,
    MOE_PH_B_DISPATCH,
    MOE_PH_B_ROUTER,    /* aux losses, route, scores, logits */
    MOE_PH_COUNT
};
const char *moe_layer_phase_name(int phase);

typedef struct moe_layer moe_layer;

/* ex NULL: moe_exchange_local(). The backend must outlive the layer. */
moe_status moe_layer_create(const moe_layer_config *c, moe_backend *b, int64_t max_tokens, const moe_exchange *ex,
                            moe_layer **out);
void moe_layer_free(moe_layer *l);
const moe_layer_config *moe_layer_config_of(const moe_layer *l);
/* Parameter names and shapes (the same views as moe_ref_layer's). */
const moe_arena *moe_layer_params(const moe_layer *l);

/* Host <-> backend copies of one parameter or gradient by name (n = the view's numel). */
moe_status moe_layer_set_param(moe_layer *l, const char *name, const double *v);
moe_status moe_layer_get_param(moe_layer *l, const char *name, double *v);
moe_status moe_layer_get_grad(moe_layer *l, const char *name, double *v);
/* A tensor saved by the last forward (names as moe_ref_layer_saved); n elements. */
moe_status moe_layer_get_saved(moe_layer *l, const char *name, double *v, int64_t n);
/* The same initialisation as moe_ref_layer_init (same draws per view). */
moe_status moe_layer_init(moe_layer *l, double init_scale);
void moe_layer_zero_grad(moe_layer *l);

/* As moe_ref_layer_forward / _backward, with x, y, dx, dy in backend memory. */
moe_status moe_layer_forward(moe_layer *l, moe_tensor y /* [T, d] */, moe_tensor x /* [T, d] */,
                             const int32_t *token_ids, const int32_t *task_ids, int64_t T, uint64_t step,
                             int training);
moe_status moe_layer_backward(moe_layer *l, moe_tensor dx /* [T, d] */, moe_tensor dy /* [T, d] */);

const moe_bplan *moe_layer_plan(const moe_layer *l);
moe_aux_losses moe_layer_aux(const moe_layer *l);
/* Seconds per phase of the last forward and backward, [MOE_PH_COUNT]. */
const double *moe_layer_phase_seconds(const moe_layer *l);
void moe_layer_update_bias(moe_layer *l);
/* The parameter and gradient buffers in backend memory (each view of moe_layer_params at
 * its offset), so that an optimizer can step them in place (the model's AdamW). */
void moe_layer_buffers(const moe_layer *l, moe_tensor *params, moe_tensor *grads);

#endif
