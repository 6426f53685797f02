/*
 * dist.h — the layout of a training job over ranks, and the groups that make its results
 * independent of it.
 *
 * Process groups: world = EP × DP, rank = dp·EP + ep (the EP peers are consecutive ranks,
 * so an all-to-all stays inside a node when a node holds at least EP ranks). The ep
 * communicator joins the ranks of one dp (they split the experts: shard = ep); the dp
 * communicator joins the ranks of one ep (replicas of the same experts).
 *
 * Groups, the unit of determinism: the global micro-batch of B sequences is cut into G
 * groups of B/G consecutive sequences (G a power of two, a multiple of the world size,
 * dividing B; default G = world size). Rank r holds groups [r·G/W, (r+1)·G/W) and runs one
 * forward/backward pass per group, all ranks their i-th pass together. Routing, capacity
 * and the aux losses are per group (GShard's groups), and everything summed over tokens is
 * summed per group, then over groups in one fixed tree (tree.h) — so `cmoe train --groups
 * G` gives the same bits in one process and under any layout of ranks. One process with
 * G = 1 is the plain path: nothing of this runs.
 */
#ifndef CMOE_DIST_DIST_H
#define CMOE_DIST_DIST_H

#include "dist/comm.h"
#include "dist/exchange_ep.h"
#include "model/model.h"

typedef struct {
    int64_t ep;             /* expert-parallel ranks (divides the world and every layer's E); 0: world */
    int64_t groups;         /* G; 0: the world size */
    int64_t chunks;         /* the all-to-all's pipeline depth D; 0: auto (D = 1, 2, 4 timed, fastest kept) */
    int hier;               /* hierarchical (2D) all-to-all */
    int64_t ranks_per_node; /* hier: 0 = detect (MPI_COMM_TYPE_SHARED) */
    int zero;               /* ZeRO-1: non-expert optimizer state partitioned over the ranks */
    int64_t max_rows;       /* rows per all-to-all block per message (0: 2^31 - 1); tests */
} moe_dist_options;

void moe_dist_options_default(moe_dist_options *o);

typedef struct {
    moe_comm *world, *ep, *dp;
    int rank, size;              /* in the world */
    int64_t EP, DP, ep_rank, dp_rank;
    int64_t G, passes;           /* groups, and per rank (G / world) */
    int64_t batch, pass_batch;   /* the global micro-batch, and a group's sequences */
    moe_exchange *ex;            /* the expert-parallel exchange; NULL when EP = 1 (local) */
    int auto_chunks;
    moe_dist_options o;
} moe_dist;

/*
 * Checks the layout against the model and the batch — world = EP × DP, E % EP for every
 * MoE layer, G a power of two that the world divides and that divides the batch — with a
 * message that says what would work (the same on every rank, so every rank refuses), then
 * splits the communicators and makes the exchange. world is kept (not owned).
 */
moe_status moe_dist_create(moe_comm *world, const moe_dist_options *o, const moe_model_config *c, int64_t batch,
                           moe_dist **out);
/* The checks alone, for W ranks; *EP and *G as they resolve (0 → W). */
moe_status moe_dist_check(const moe_dist_options *o, int W, const moe_model_config *c, int64_t batch, int64_t *EP,
                          int64_t *G);
void moe_dist_free(moe_dist *d);
/* The group id of this rank's pass i. */
int64_t moe_dist_group(const moe_dist *d, int64_t pass);
/* One line: "4 ranks = EP 2 × DP 2, 8 groups of 2 sequences (2 passes per rank), all-to-all flat, 1 chunk". */
void moe_dist_describe(const moe_dist *d, char *buf, size_t n);

/*
 * Before anything else runs together: every rank's CRC-32 of each text (the model config,
 * the settings, the data's identity, the layout options, cmoe's version) against rank
 * 0's; MOE_ERR_ARG naming what differs and on which ranks.
 */
moe_status moe_dist_agree(moe_comm *world, int n, const char *const *names, const char *const *texts);

/* Every rank's status: MOE_OK when all are OK; else the lowest failing rank's code, with
 * a message naming the ranks that failed (each said why on its own stderr). */
moe_status moe_dist_all_ok(moe_comm *world, moe_status mine, const char *what);

#endif
