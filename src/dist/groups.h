/*
 * groups.h — training steps over groups of tokens (dist.h), the same bits in any layout.
 *
 * A step: for each micro-batch, each of this rank's groups in one pass (its rows of the
 * global batch, moe_dataset_batch_rows; its random draws keyed by its global first token),
 * its gradients and scalars taken apart as leaves of fixed trees (tree.h):
 *  - non-expert gradients: the pass's gradient → a tree over this rank's groups → the tree
 *    across all ranks (result on every rank);
 *  - expert gradients: the owner computes the weight gradients of each source group apart
 *    (moe_layer_set_source_hook) → a tree over its expert-parallel group's group ids → the
 *    tree across its data-parallel replicas;
 *  - the step's scalars (cross-entropy, aux losses, expert counts) alike, over all ranks.
 * Micro-batches chain in order (acc = R0, acc += R1, ...). Then AdamW with gradient
 * 1/(accum·G) × the sum (the mean over groups of each group's mean loss): the global
 * gradient norm from per-tensor (per-expert for expert weights) sums of squares chained in
 * table order on every rank; with ZeRO-1 each rank updates its part of the non-expert
 * parameters (keeping only that part's moments) and the parts are all-gathered.
 *
 *     moe_gtrain *g;
 *     moe_gtrain_create(dist, model, &optim_config, S, accum, &g);  // model on dist->ex, batch dist->pass_batch
 *     for step: moe_gtrain_step(g, data, seed, step, accum, &result);
 *               moe_model_get_stats(model, MOE_SPAN_STEP, &st);  // sums over accum × G groups
 */
#ifndef CMOE_DIST_GROUPS_H
#define CMOE_DIST_GROUPS_H

#include "dist/dist.h"
#include "io/data.h"

typedef struct moe_gtrain moe_gtrain;

/* The trees, the optimizer (with the distributed norm and ZeRO-1 when d->o.zero), the
 * batch buffers for sequences of S tokens; steps of accum micro-batches. */
moe_status moe_gtrain_create(moe_dist *d, moe_model *m, const moe_optim_config *oc, int64_t S, int64_t accum,
                             moe_gtrain **out);
void moe_gtrain_free(moe_gtrain *g);
moe_optim *moe_gtrain_optim(moe_gtrain *g);

/* One optimizer step over accum micro-batches of the global batch; r as moe_optim_step's.
 * The model's step scalars then hold the sums over every group (moe_model_get_stats). */
moe_status moe_gtrain_step(moe_gtrain *g, const moe_dataset *data, uint64_t seed, int64_t step, int64_t accum,
                           moe_optim_result *r);
/* Mean cross-entropy over the validation split in batches of the global batch, each batch's
 * groups summed in the fixed tree: the same bits in any layout. */
moe_status moe_gtrain_val_loss(moe_gtrain *g, const moe_dataset *data, int64_t max_batches, double *loss,
                               int64_t *n_tokens);

/* Bytes this rank holds: parameters, gradients, the trees' partial sums, accumulators and
 * cross-rank buffers, optimizer state. */
typedef struct {
    int64_t params, grads, trees, optim;
} moe_gtrain_memory;

void moe_gtrain_memory_of(const moe_gtrain *g, moe_gtrain_memory *mem);
/* A line for the log when something was decided (--a2a-chunks auto), else NULL; once. */
const char *moe_gtrain_note(moe_gtrain *g);

#endif
