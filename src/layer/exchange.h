/*
 * exchange.h — how the routed rows of an MoE layer reach their experts and come back.
 *
 * Two sides. The source side is this rank's tokens: the plan's n rows in plan order
 * (sorted by expert, so by owner rank, then token). The expert side is this rank's
 * local experts: the rows every source sent them, expert-contiguous, described by a
 * receive-side plan (offsets of the local experts; no tokens or weights). An exchange
 * moves rows between the two — dispatch's x and the combine backward's dy to the
 * experts, the experts' y and the dispatch backward's dx back — non-blocking, in chunks
 * (Tutel's pipelining: chunk c's rows travel while chunk c−1's experts compute).
 *
 * A chunk is the c-th of `chunks` slices of every expert's rows, cut at multiples of
 * MOE_ROW_BLOCK (backend.h: the blocks of the experts' GEMMs). The expert side is laid out expert by
 * expert, each expert's chunks in order, so a chunk's rows sit where they would without
 * chunks: chunking moves no row to another GEMM block, the weight gradients run once over
 * every row after the last chunk, and no bit changes.
 *
 * Sources. Under expert parallelism a rank's experts hold rows from every rank of its
 * expert-parallel group (`sources` of them, in rank order), each source's rows of an
 * expert one segment of their own, in the source's plan order: the experts run once per
 * source, on that source's plan, so that a row sits at the same place in its GEMM blocks
 * as in the source's own single-process pass (the unit of determinism, src/dist/groups.h)
 * and each source's expert weight gradient can be kept apart (moe_layer_set_source_hook).
 *
 * Implementations: local (one process, the rows never move: the expert side is the
 * source side), loopback (one process that splits the experts over N fake owners and
 * copies every chunk through its own receive buffers and plans: a test of everything
 * but the wire), and MPI (src/dist/exchange_ep.c). All give the same bits.
 */
#ifndef CMOE_EXCHANGE_H
#define CMOE_EXCHANGE_H

#include "backend/backend.h"

typedef struct moe_exchange moe_exchange;
typedef struct moe_xstate moe_xstate; /* one layer's buffers and plans in an exchange */

struct moe_exchange {
    const char *name;
    int64_t shards; /* the experts' weights are split over this many ranks (EP) */
    int64_t shard;  /* this rank's: global experts [shard·E/shards, (shard+1)·E/shards) */
    int64_t chunks; /* D, the pipeline depth (may change between forwards, up to the
                     * states' max_chunks) */
    int64_t sources; /* ranks whose rows reach this rank's experts (1 in one process) */
    int in_place;   /* the expert side is the source side: no expert-side buffers needed */

    /* A layer's state, sized for max_tokens when the layer is built (never in a step). */
    moe_status (*state_create)(moe_exchange *ex, moe_backend *b, const moe_layer_config *c, int64_t max_tokens,
                               moe_xstate **out);
    void (*state_free)(moe_xstate *s);
    /* Rows the expert side may hold at most (its buffers' size). */
    int64_t (*expert_rows)(const moe_xstate *s);
    /* Once per forward, after routing: who sends what where (may wait for counts). */
    moe_status (*plan)(moe_xstate *s, const moe_bplan *plan, int64_t T);
    /* The expert-side plan (segments of the local experts' rows) of chunk c, and of all of
     * them together (c = -1), of source src in [0, sources). */
    const moe_bplan *(*chunk)(const moe_xstate *s, int64_t c, int64_t src);
    /* chunk c's rows of width elements: source side [n, width] → expert side, and back */
    void (*to_experts_start)(moe_xstate *s, int64_t c, moe_tensor expert_side, moe_tensor source_side, int64_t width);
    moe_status (*to_experts_wait)(moe_xstate *s, int64_t c);
    void (*to_sources_start)(moe_xstate *s, int64_t c, moe_tensor source_side, moe_tensor expert_side, int64_t width);
    moe_status (*to_sources_wait)(moe_xstate *s, int64_t c);
    /* v [n] summed over every rank (expert counts: exact in any order) */
    moe_status (*sum)(moe_exchange *ex, moe_backend *b, moe_tensor v, int64_t n);
    void (*free)(moe_exchange *ex);
    void *ctx;
};

/* One process, D = 1: the backend's dispatch/combine, no rows moved. */
moe_status moe_exchange_local_create(moe_exchange **out);
/* One process playing `owners` expert owners, in `chunks` chunks (tests). */
moe_status moe_exchange_loopback_create(int64_t owners, int64_t chunks, moe_exchange **out);
void moe_exchange_free(moe_exchange *ex);

#endif
