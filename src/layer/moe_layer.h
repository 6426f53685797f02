/*
 * moe_layer.h — the MoE layer, written once against the backend table (backend.h).
 *
 * It computes exactly what ref/moe_layer.c computes (same parameters by name and
 * layout, same saved tensors, same order of operations), on any backend: with the ref
 * backend it reproduces moe_ref_layer to rounding, with cpu it is the fast fp32 path.
 * Every buffer (parameters, gradients, saved activations, backward scratch, the plan,
 * the exchange's buffers, the ops' scratch) is sized at create time from max_tokens:
 * forward and backward allocate nothing, and they never wait for the host (the aux
 * losses and expert counts stay on the backend, in moe_layer_stats, until a caller
 * reads them).
 *
 * The rows reach the experts through an exchange (exchange.h): local (one process),
 * loopback (tests) or MPI, which holds only its shard of the experts' weights.
 */
#ifndef CMOE_MOE_LAYER_H
#define CMOE_MOE_LAYER_H

#include "backend/backend.h"
#include "layer/exchange.h"

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

/* The layer's scalars on the backend, in moe_layer_stats: the aux losses (unscaled),
 * then the plan's counts summed over every rank (backend.h's plan_counts layout). */
enum {
    MOE_STAT_LB,
    MOE_STAT_IMPORTANCE,
    MOE_STAT_LOAD,
    MOE_STAT_Z,
    MOE_STAT_MI,
    MOE_STAT_COUNTS, /* count [E], selected [E], n, dropped */
};
#define MOE_LAYER_NSTATS(E) (MOE_STAT_COUNTS + 2 * (E) + 2)

/* ex NULL: a local exchange of the layer's own. The backend and ex must outlive the layer. */
moe_status moe_layer_create(const moe_layer_config *c, moe_backend *b, int64_t max_tokens, moe_exchange *ex,
                            moe_layer **out);
void moe_layer_free(moe_layer *l);
const moe_layer_config *moe_layer_config_of(const moe_layer *l);
/* Parameter names and shapes (moe_ref_layer's views; experts.* hold this rank's shard). */
const moe_arena *moe_layer_params(const moe_layer *l);

/* Host <-> backend copies of one parameter or gradient by name (n = the view's numel). */
moe_status moe_layer_set_param(moe_layer *l, const char *name, const double *v);
moe_status moe_layer_get_param(moe_layer *l, const char *name, double *v);
moe_status moe_layer_get_grad(moe_layer *l, const char *name, double *v);
/* A tensor saved by the last forward (names as moe_ref_layer_saved); n elements. */
moe_status moe_layer_get_saved(moe_layer *l, const char *name, double *v, int64_t n);
/* The same initialisation as moe_ref_layer_init (same draws per view and element,
 * whatever the shard). */
moe_status moe_layer_init(moe_layer *l, double init_scale);
void moe_layer_zero_grad(moe_layer *l);

/*
 * As moe_ref_layer_forward / _backward, with x, y, dx, dy and the ids in backend memory
 * (token_ids, task_ids: i32 [T] or NULL; task ids must lie in [0, n_tasks), and both stay
 * valid until the backward). Errors of the ops surface at the next sync or download.
 */
moe_status moe_layer_forward(moe_layer *l, moe_tensor y /* [T, d] */, moe_tensor x /* [T, d] */,
                             const moe_tensor *token_ids, const moe_tensor *task_ids, int64_t T, moe_key key,
                             int training);
moe_status moe_layer_backward(moe_layer *l, moe_tensor dx /* [T, d] */, moe_tensor dy /* [T, d] */);

const moe_bplan *moe_layer_plan(const moe_layer *l);
/* The scalars of the last forward, on the backend: [MOE_LAYER_NSTATS(E)] (enum above). */
moe_tensor moe_layer_stats(const moe_layer *l);
/* The aux losses of the last forward, read from the backend (waits), coefficients applied
 * in .total. */
moe_status moe_layer_aux(moe_layer *l, moe_aux_losses *out);
/* Σ coef·loss from the stats as read to the host. */
moe_aux_losses moe_layer_aux_of(const moe_layer_config *c, const double *stats);
/* Seconds per phase of the last forward and backward, [MOE_PH_COUNT] (host time of
 * enqueueing; on cpu and ref, of running). */
const double *moe_layer_phase_seconds(const moe_layer *l);
/* Aux-loss-free balancing from the last forward's global counts, on the backend. */
void moe_layer_update_bias(moe_layer *l);
/* Parameter `name` and its gradient in backend memory (either may be NULL), so that an
 * optimizer can step them in place (the model's AdamW). */
moe_status moe_layer_param_tensors(const moe_layer *l, const char *name, moe_tensor *param, moe_tensor *grad);

/*
 * Expert weight gradients per source (src/dist/groups.h): with a hook set, backward
 * computes the weight gradients of each source of the exchange (exchange.h) alone, in
 * the layer's zeroed experts.* gradients, and calls fn(ctx, l, src) after each, which
 * takes them away (a source is a group of tokens, and the groups' gradients are summed in
 * a fixed tree). Without a hook (NULL) the sources' gradients accumulate there.
 */
typedef moe_status (*moe_layer_source_fn)(void *ctx, moe_layer *l, int64_t src);
void moe_layer_set_source_hook(moe_layer *l, moe_layer_source_fn fn, void *ctx);

#endif
