/*
 * tree.h — sums of gradients (and of the step's scalars) over groups of tokens in one
 * fixed binary tree, whatever the ranks that computed them.
 *
 * A group is a fixed run of sequences of the global micro-batch (groups.h). Its gradient
 * is a leaf, identified by the group id; leaves combine pairwise, left = lower ids, level
 * by level (IEEE + is commutative, so only the shape of the tree fixes the bits). A rank
 * pushes the leaves it computed, in any order, and keeps at most a few partial sums
 * (siblings combine as soon as both are there); its leaves form an aligned subtree, whose
 * root then meets the other ranks' in the same tree across ranks (moe_tree_across:
 * recursive halving with pairing fixed by rank, the result broadcast), never in an
 * MPI_Allreduce whose order MPI chooses. One process with G groups builds the same tree.
 *
 *     moe_tree *t;   // leaves [base, base + count), count a power of two, base a multiple
 *     moe_tree_create(b, pieces, np, base, count, moe_tree_slots(order, n, base, count), accum > 1, &t);
 *     for each micro-batch m: moe_tree_reset(t);
 *         for each leaf id: (pieces hold its gradient) moe_tree_push(t, id);
 *         moe_tree_finish(t, comm, m == 0, scratch, host, "what");  // across ranks, then acc (+)= the sum
 *     moe_tree_scatter(t);                    // the pieces = acc
 */
#ifndef CMOE_DIST_TREE_H
#define CMOE_DIST_TREE_H

#include "backend/backend.h"
#include "dist/comm.h"

/* A tensor of a set (a gradient, the scalars): n elements at t. */
typedef struct {
    moe_tensor t;
    int64_t n;
} moe_piece;

typedef struct moe_tree moe_tree;

/* Partial sums kept at once when leaves [base, base + count) arrive in this order. */
int moe_tree_slots(const int64_t *order, int64_t n, int64_t base, int64_t count);
/* Buffers (backend memory of the backend's float type): slots partial sums, and an
 * accumulator when micro-batches chain (acc = 0: the last micro-batch's sum is the sum),
 * each of Σ n over the pieces. */
moe_status moe_tree_create(moe_backend *b, const moe_piece *pieces, int np, int64_t base, int64_t count, int slots,
                           int acc, moe_tree **out);
void moe_tree_free(moe_tree *t);
/* Elements of the set; bytes of the tree's buffers. */
int64_t moe_tree_numel(const moe_tree *t);
int64_t moe_tree_bytes(const moe_tree *t);
/* Forgets the partial sums (a new micro-batch). */
void moe_tree_reset(moe_tree *t);
/* The pieces' current values are leaf id. */
moe_status moe_tree_push(moe_tree *t, int64_t id);
/* Every leaf pushed: the root meets the other ranks' of c (moe_tree_across, through
 * scratch [n] and host [n elements], which trees may share; unused in one process), then
 * the accumulator = the sum (first) or += it. */
moe_status moe_tree_finish(moe_tree *t, moe_comm *c, int first, moe_tensor scratch, void *host, const char *what);
/* The sum of the last micro-batch (after finish), and the accumulator. */
moe_tensor moe_tree_root(const moe_tree *t);
moe_tensor moe_tree_acc(const moe_tree *t);
/* The pieces = the accumulator. */
void moe_tree_scatter(moe_tree *t);

/* t [n] summed over the ranks of c (a power of two) in the tree over ranks: rank r adds
 * rank r + 2^j's partial sum into its own (r a multiple of 2^(j+1)), then rank 0's result
 * goes to every rank. scratch [n] receives; host [n elements of t's type] stages. */
moe_status moe_tree_across(moe_comm *c, moe_backend *b, moe_tensor t, moe_tensor scratch, int64_t n, void *host,
                           const char *what);

/* The same for host doubles v [n] (the validation loss's sums). */
moe_status moe_tree_across_host(moe_comm *c, double *v, int n, const char *what);
/* v [count] summed pairwise, level by level (left = lower index): the tree over leaves. */
double moe_tree_sum_host(const double *v, int64_t count);

#endif
