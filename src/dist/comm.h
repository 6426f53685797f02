/*
 * comm.h — the processes of a job and the messages between them: MPI when cmoe was
 * launched by mpirun or srun (and built with MPI), else one process whose collectives are
 * copies. cmoe has no launcher of its own.
 *
 *     moe_comm *world;
 *     moe_comm_world(&world);                   // MPI_Init_thread when launched by MPI
 *     moe_comm *ep;
 *     moe_comm_split(world, dp, rank, &ep);     // MPI_Comm_split
 *     moe_comm_allgather(ep, mine, 8, all, "counts");
 *     moe_comm_free(ep); moe_comm_free(world);
 *     moe_comm_finalize();
 *
 * Faults. cmoe's communicators return errors (MPI_ERRORS_RETURN) and every call is
 * checked: a failure is MOE_ERR_MPI with the call, the operation (`what`) and MPI's own
 * message. Every wait is a poll with a deadline (the watchdog; moe_comm_timeout, 20 s by
 * default, CMOE_MPI_TIMEOUT=SECONDS overrides): a rank that died or hangs makes the others
 * fail within it, naming the peer they wait for (point to point) or the operation and its
 * group (collectives), and the caller ends the job (moe_comm_abort: MPI_Abort, which
 * mpirun reports with the rank). Open MPI's own runtime also ends the job when a rank is
 * killed, naming it.
 *
 * Floats are never summed by MPI here: sums of floats run in cmoe's fixed trees
 * (tree.h), so no result depends on an order MPI chooses. Integer sums (expert counts)
 * are exact in any order and may use moe_comm_allreduce_i64.
 */
#ifndef CMOE_DIST_COMM_H
#define CMOE_DIST_COMM_H

#include "cmoe.h"

typedef struct moe_comm moe_comm;
typedef struct moe_comm_req moe_comm_req; /* a pending exchange of rows */

/* 1 when this process was started by an MPI launcher (mpirun, srun with PMI/PMIx) and
 * the build has MPI; CMOE_MPI=0 or 1 overrides the detection. */
int moe_comm_launched(void);
/* The job's processes. Under an MPI launcher: MPI is initialised (once; MPI_THREAD_FUNNELED)
 * and the world communicator duplicated with MPI_ERRORS_RETURN; else a world of one. */
moe_status moe_comm_world(moe_comm **out);
/* MPI_Finalize when MPI was initialised (after every communicator is freed). */
void moe_comm_finalize(void);
/* Ends every process of the job with code (MPI_Abort; exit() in one process). */
void moe_comm_abort(moe_comm *c, int code);

int moe_comm_rank(const moe_comm *c);
int moe_comm_size(const moe_comm *c);
/* This process's rank in the world (for messages). */
int moe_comm_world_rank(void);

/* Ranks with the same color, ordered by key (MPI_Comm_split). */
moe_status moe_comm_split(moe_comm *c, int color, int key, moe_comm **out);
/* The ranks of c that share this node's memory (MPI_Comm_split_type(MPI_COMM_TYPE_SHARED)). */
moe_status moe_comm_split_node(moe_comm *c, moe_comm **out);
void moe_comm_free(moe_comm *c);

/* Seconds a wait may take before it fails (the watchdog). */
double moe_comm_timeout(void);
void moe_comm_set_timeout(double seconds);

moe_status moe_comm_barrier(moe_comm *c, double timeout, const char *what);
moe_status moe_comm_bcast(moe_comm *c, void *buf, int64_t bytes, int root, const char *what);
/* The same with its own deadline (the others wait while the root writes a checkpoint). */
moe_status moe_comm_bcast_within(moe_comm *c, void *buf, int64_t bytes, int root, double timeout, const char *what);
/* recv [size × bytes]: every rank's send, in rank order */
moe_status moe_comm_allgather(moe_comm *c, const void *send, int64_t bytes, void *recv, const char *what);
/* send [size × bytes]: block p to rank p; recv [size × bytes]: block p from rank p */
moe_status moe_comm_alltoall(moe_comm *c, const void *send, int64_t bytes, void *recv, const char *what);
enum { MOE_COMM_SUM, MOE_COMM_MAX };
/* Integers only (exact in any order). */
moe_status moe_comm_allreduce_i64(moe_comm *c, int64_t *v, int n, int op, const char *what);
moe_status moe_comm_send(moe_comm *c, const void *buf, int64_t bytes, int peer, const char *what);
moe_status moe_comm_recv(moe_comm *c, void *buf, int64_t bytes, int peer, const char *what);

/*
 * Rows of row_bytes each: block p of send (scount[p] rows at row sdispl[p]) to rank p, and
 * block p of recv (rcount[p] rows at rdispl[p]) from rank p (MPI_Ialltoallv on a row
 * datatype, so byte sizes past 2^31 are fine). A block of more than max_rows rows goes in
 * several rounds of at most max_rows (every rank must give the same max_rows and the same
 * bound on any block, `bound`, which fixes the number of rounds). Completes in
 * moe_comm_wait; the buffers stay untouched until then.
 */
moe_status moe_comm_req_create(int max_rounds, moe_comm_req **out);
void moe_comm_req_free(moe_comm_req *r);
moe_status moe_comm_ialltoallv(moe_comm *c, const void *send, const int64_t *scount, const int64_t *sdispl, void *recv,
                               const int64_t *rcount, const int64_t *rdispl, int64_t row_bytes, int64_t max_rows,
                               int64_t bound, moe_comm_req *req, const char *what);
moe_status moe_comm_wait(moe_comm *c, moe_comm_req *req);
/* Seconds this process spent waiting in moe_comm_wait (since the last reset). */
double moe_comm_wait_seconds(void);
void moe_comm_reset_wait_seconds(void);

#endif
