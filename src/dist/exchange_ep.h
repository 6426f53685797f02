/*
 * exchange_ep.h — the expert-parallel exchange (layer/exchange.h) over a communicator
 * (comm.h): the P ranks of an expert-parallel group each hold E/P experts (shard = the
 * rank in the group) and send every routed row to the rank that owns its expert.
 *
 * Per forward (plan): the rows per (peer, local expert) are exchanged (MPI_Alltoall; the
 * hierarchical mode gathers the whole P × E matrix instead, which its two steps need).
 * Per chunk: the rows, with MPI_Ialltoallv on a row datatype (several rounds when a block
 * would pass max_rows rows), staged through host memory, so any backend works and the
 * ref backend (double) runs the same exchange as the oracle. Chunk c of a source's rows of
 * an expert is the c-th of D runs of whole MOE_ROW_BLOCK blocks of that segment, so
 * chunking moves no row within its GEMM blocks; chunk c+1's rows travel while chunk c's
 * experts compute (Tutel's pipelining; MPI progresses them inside its calls).
 *
 * The expert side is laid out expert-major: for each local expert, the segment of every
 * source in rank order, each source's rows in its plan order, each chunk's slice in place.
 * So source s's rows of expert e are exactly the rows of e in s's own plan, at the same
 * positions from the segment's start: the experts run once per source (exchange.h's
 * sources) and give the bits of s's single-process pass.
 *
 * Hierarchical all-to-all (Tutel's 2D, hier = 1): the P ranks as Nn nodes × L local ranks
 * (consecutive ranks share a node): first an all-to-all inside each node that gathers on
 * local rank l the rows bound for local rank l of every node, then one between the ranks of
 * the same local rank across nodes. Nodes come from MPI_Comm_split_type(SHARED), or every
 * ranks_per_node consecutive ranks (simulating nodes on one machine). Same bits as flat.
 *
 * The aux losses and routing stay per source group (sum is a no-op): counts over ranks are
 * the training loop's business (groups.h).
 */
#ifndef CMOE_DIST_EXCHANGE_EP_H
#define CMOE_DIST_EXCHANGE_EP_H

#include "dist/comm.h"
#include "layer/exchange.h"

typedef struct {
    int64_t chunks;         /* D in [1, max_chunks] */
    int64_t max_chunks;     /* the layers' states are sized for up to this many (<= 64) */
    int hier;               /* 0: flat MPI_Ialltoallv, 1: hierarchical (two steps) */
    int64_t ranks_per_node; /* hier: ranks per node; 0: from MPI_COMM_TYPE_SHARED */
    int64_t max_rows;       /* rows of one block per message at most (0: 2^31 - 1); tests use a few */
} moe_ep_options;

void moe_ep_options_default(moe_ep_options *o);
/* ep: the expert-parallel group (kept, not owned). MOE_ERR_ARG when hier cannot split ep
 * into equal nodes of consecutive ranks (the message says what would work). */
moe_status moe_exchange_ep_create(moe_comm *ep, const moe_ep_options *o, moe_exchange **out);
/* D for the next forwards (1..max_chunks): changes no bit (--a2a-chunks auto tries a few). */
moe_status moe_exchange_ep_set_chunks(moe_exchange *ex, int64_t D);
/* Ranks per node of the hierarchical mode (1 node: P; flat: 0). */
int64_t moe_exchange_ep_ranks_per_node(const moe_exchange *ex);

/* Rows moved to and from other ranks since the last reset (self-sends not counted). */
typedef struct {
    int64_t bytes_sent, bytes_received; /* to / from other ranks */
    int64_t rows_sent, rows_received;
    int64_t messages;                   /* Ialltoallv calls */
    double seconds;                     /* inside the exchange: counts, packing, waiting, unpacking */
} moe_ep_traffic;

void moe_exchange_ep_traffic(const moe_exchange *ex, moe_ep_traffic *t, int reset);

#endif
