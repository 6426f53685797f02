/*
 * Communicators (comm.h): MPI's, with every call checked and every wait a poll against a
 * deadline, or the one process of a job that was not launched by MPI.
 */
#define _POSIX_C_SOURCE 200809L
#include "config.h"

#include <limits.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#ifdef HAVE_MPI
#include <mpi.h>
#endif

#include "dist/comm.h"

struct moe_comm {
    int rank, size;
#ifdef HAVE_MPI
    MPI_Comm comm; /* MPI_COMM_NULL: one process */
#endif
};

struct moe_comm_req {
    int max, n; /* rounds allowed, posted */
    char what[128];
#ifdef HAVE_MPI
    MPI_Request *r;
    MPI_Datatype row;  /* the row type of the last exchange (MPI_DATATYPE_NULL: none) */
    int64_t row_bytes; /* its size */
#endif
};

static int world_rank;
static double timeout_s = -1;
static double waited_s;

#ifdef HAVE_MPI
static int mpi_started; /* this process called MPI_Init */

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}
#endif

double moe_comm_timeout(void)
{
    if (timeout_s < 0) {
        const char *v = getenv("CMOE_MPI_TIMEOUT");
        char *end;
        double t = v ? strtod(v, &end) : 0;
        timeout_s = v && *v && !*end && t > 0 ? t : 20.0;
    }
    return timeout_s;
}

void moe_comm_set_timeout(double s)
{
    timeout_s = s;
}

double moe_comm_wait_seconds(void)
{
    return waited_s;
}

void moe_comm_reset_wait_seconds(void)
{
    waited_s = 0;
}

int moe_comm_world_rank(void)
{
    return world_rank;
}

int moe_comm_rank(const moe_comm *c)
{
    return c->rank;
}

int moe_comm_size(const moe_comm *c)
{
    return c->size;
}

int moe_comm_launched(void)
{
#ifdef HAVE_MPI
    const char *force = getenv("CMOE_MPI");
    if (force && *force)
        return strcmp(force, "0") != 0;
    /* Open MPI's mpirun, PMIx (Open MPI 5, srun --mpi=pmix), PMI-1/2 (srun, MPICH's hydra) */
    static const char *const vars[] = {"OMPI_COMM_WORLD_SIZE", "PMIX_RANK", "PMI_RANK", "PMI_SIZE",
                                       "MV2_COMM_WORLD_SIZE"};
    for (size_t i = 0; i < sizeof vars / sizeof vars[0]; i++)
        if (getenv(vars[i]))
            return 1;
#endif
    return 0;
}

static moe_comm *one_process(void)
{
    moe_comm *c = calloc(1, sizeof *c);
    if (c) {
        c->rank = 0;
        c->size = 1;
#ifdef HAVE_MPI
        c->comm = MPI_COMM_NULL;
#endif
    }
    return c;
}

#ifdef HAVE_MPI

static moe_status mpi_fail(int rc, const char *call, const char *what)
{
    char msg[MPI_MAX_ERROR_STRING];
    int len = 0;
    if (MPI_Error_string(rc, msg, &len) != MPI_SUCCESS)
        snprintf(msg, sizeof msg, "error %d", rc);
    return moe_error(MOE_ERR_MPI, "rank %d: %s (%s): %s", world_rank, call, what ? what : "?", msg);
}

/* The watchdog's own communicator: a rank that waits too long asks its group's ranks
 * whether they are alive; every rank answers from inside its waits. */
static MPI_Comm wd = MPI_COMM_NULL;
enum { TAG_PING = 1, TAG_PONG = 2 };

static void serve_pings(void)
{
    static int pong;
    for (;;) {
        int flag = 0, ping;
        MPI_Status st;
        if (wd == MPI_COMM_NULL || MPI_Iprobe(MPI_ANY_SOURCE, TAG_PING, wd, &flag, &st) != MPI_SUCCESS || !flag)
            return;
        if (MPI_Recv(&ping, 1, MPI_INT, st.MPI_SOURCE, TAG_PING, wd, MPI_STATUS_IGNORE) == MPI_SUCCESS)
            MPI_Send(&pong, 1, MPI_INT, st.MPI_SOURCE, TAG_PONG, wd); /* one int: sent eagerly */
    }
}

/* The world ranks of c that do not answer a ping within a few seconds, into buf. */
static void silent_ranks(const moe_comm *c, char *buf, size_t n)
{
    const int P = c->size;
    int *mine = calloc((size_t)P, sizeof *mine), *world = calloc((size_t)P, sizeof *world), ping = 0;
    int *pongs = calloc((size_t)P, sizeof *pongs);
    MPI_Request *r = calloc((size_t)(2 * P), sizeof *r);
    MPI_Group g, wg;
    buf[0] = 0;
    if (!mine || !world || !pongs || !r || wd == MPI_COMM_NULL || MPI_Comm_group(c->comm, &g) != MPI_SUCCESS) {
        free(mine), free(world), free(pongs), free(r);
        return;
    }
    MPI_Comm_group(wd, &wg);
    for (int i = 0; i < P; i++)
        mine[i] = i;
    MPI_Group_translate_ranks(g, P, mine, wg, world);
    MPI_Group_free(&g);
    MPI_Group_free(&wg);
    for (int i = 0; i < P; i++) {
        r[2 * i] = r[2 * i + 1] = MPI_REQUEST_NULL;
        if (i != c->rank && world[i] != MPI_UNDEFINED) {
            MPI_Irecv(&pongs[i], 1, MPI_INT, world[i], TAG_PONG, wd, &r[2 * i]);
            MPI_Isend(&ping, 1, MPI_INT, world[i], TAG_PING, wd, &r[2 * i + 1]);
        }
    }
    const double t0 = now();
    int left = 1;
    while (left && now() - t0 < 3.0) {
        serve_pings();
        left = 0;
        for (int i = 0; i < P; i++) {
            int done = 1;
            if (r[2 * i] != MPI_REQUEST_NULL)
                MPI_Test(&r[2 * i], &done, MPI_STATUS_IGNORE);
            left |= !done;
        }
        nanosleep(&(struct timespec){0, 1000000}, NULL);
    }
    size_t at = 0;
    for (int i = 0; i < P && at + 16 < n; i++)
        if (r[2 * i] != MPI_REQUEST_NULL) /* still pending: no answer */
            at += (size_t)snprintf(buf + at, n - at, "%s%d", at ? ", " : "", world[i]);
    /* the pending requests are left to MPI_Abort, which follows */
    free(mine), free(world), free(r);
    (void)pongs; /* may still be written by a late answer: kept (a few bytes) */
}

#define CALL(call, what, ...)                                                                                      \
    do {                                                                                                           \
        int rc_ = call(__VA_ARGS__);                                                                               \
        if (rc_ != MPI_SUCCESS)                                                                                    \
            return mpi_fail(rc_, #call, what);                                                                     \
    } while (0)

/* Waits for n requests, polling, until the deadline: then an error naming what is waited
 * for (peer >= 0: that rank of c; else the group of c). */
static moe_status poll(const moe_comm *c, int n, MPI_Request *r, double timeout, const char *what, int peer)
{
    const double t0 = now(), deadline = t0 + timeout;
    for (;;) {
        int done = 0;
        int rc = MPI_Testall(n, r, &done, MPI_STATUSES_IGNORE);
        if (rc != MPI_SUCCESS)
            return mpi_fail(rc, "MPI_Testall", what);
        if (done)
            break;
        serve_pings();
        const double t = now();
        if (t > deadline) {
            char silent[256];
            silent_ranks(c, silent, sizeof silent);
            if (silent[0])
                return moe_error(MOE_ERR_MPI, "rank %d: %s: no answer within %.0f s; rank %s of the job does not "
                                 "respond (it hangs or died; CMOE_MPI_TIMEOUT sets the limit)", world_rank, what,
                                 timeout, silent);
            return moe_error(MOE_ERR_MPI, "rank %d: %s: no answer within %.0f s from %s, although every rank "
                             "responds (they wait in different places: ranks out of step; CMOE_MPI_TIMEOUT sets "
                             "the limit)", world_rank, what, timeout, peer >= 0 ? "its peer" : "its group");
        }
        /* yield while a peer may answer soon (oversubscribed ranks share cores, and a
         * yield lets the peer run), then sleep between polls so that a long wait (a rank
         * saving a checkpoint) costs no core */
        if (t - t0 < 0.05)
            sched_yield();
        else
            nanosleep(&(struct timespec){0, 200000}, NULL);
    }
    waited_s += now() - t0;
    return MOE_OK;
}

/* bytes as (count, type) with count <= INT_MAX: MPI_BYTE, else contiguous units that
 * divide it (the same on every rank for the same bytes). *made: the caller frees *t. */
static moe_status as_units(int64_t bytes, int *count, MPI_Datatype *t, int *made, const char *what)
{
    *made = 0;
    if (bytes <= INT_MAX) {
        *count = (int)bytes;
        *t = MPI_BYTE;
        return MOE_OK;
    }
    for (int64_t u = (int64_t)1 << 20; u >= 2; u /= 2)
        if (bytes % u == 0 && bytes / u <= INT_MAX) {
            CALL(MPI_Type_contiguous, what, (int)u, MPI_BYTE, t);
            CALL(MPI_Type_commit, what, t);
            *count = (int)(bytes / u);
            *made = 1;
            return MOE_OK;
        }
    return moe_error(MOE_ERR_MPI, "rank %d: %s: %lld bytes in one message cannot be expressed", world_rank, what,
                     (long long)bytes);
}

moe_status moe_comm_world(moe_comm **out)
{
    *out = NULL;
    if (!moe_comm_launched()) {
        *out = one_process();
        return *out ? MOE_OK : moe_error(MOE_ERR_NOMEM, "out of memory");
    }
    int init = 0, fin = 0;
    MPI_Initialized(&init);
    MPI_Finalized(&fin);
    if (fin)
        return moe_error(MOE_ERR_MPI, "MPI was finalized already");
    if (!init) {
        int provided;
        int rc = MPI_Init_thread(NULL, NULL, MPI_THREAD_FUNNELED, &provided);
        if (rc != MPI_SUCCESS)
            return moe_error(MOE_ERR_MPI, "MPI_Init_thread failed (error %d)", rc);
        mpi_started = 1;
    }
    /* errors return to cmoe (which names them) instead of aborting inside MPI */
    MPI_Comm_set_errhandler(MPI_COMM_WORLD, MPI_ERRORS_RETURN);
    moe_comm *c = calloc(1, sizeof *c);
    if (!c)
        return moe_error(MOE_ERR_NOMEM, "out of memory");
    c->comm = MPI_COMM_NULL;
    int rc = MPI_Comm_dup(MPI_COMM_WORLD, &c->comm);
    if (rc == MPI_SUCCESS)
        rc = MPI_Comm_set_errhandler(c->comm, MPI_ERRORS_RETURN);
    if (rc == MPI_SUCCESS)
        rc = MPI_Comm_rank(c->comm, &c->rank);
    if (rc == MPI_SUCCESS)
        rc = MPI_Comm_size(c->comm, &c->size);
    if (rc != MPI_SUCCESS) {
        moe_comm_free(c);
        return mpi_fail(rc, "MPI_Comm_dup", "the world communicator");
    }
    world_rank = c->rank;
    if (wd == MPI_COMM_NULL && MPI_Comm_dup(MPI_COMM_WORLD, &wd) == MPI_SUCCESS)
        MPI_Comm_set_errhandler(wd, MPI_ERRORS_RETURN);
    *out = c;
    return MOE_OK;
}

void moe_comm_finalize(void)
{
    int init = 0, fin = 0;
    MPI_Initialized(&init);
    MPI_Finalized(&fin);
    if (wd != MPI_COMM_NULL && init && !fin)
        MPI_Comm_free(&wd);
    if (mpi_started && init && !fin)
        MPI_Finalize();
}

void moe_comm_abort(moe_comm *c, int code)
{
    int init = 0, fin = 0;
    MPI_Initialized(&init);
    MPI_Finalized(&fin);
    if (init && !fin) {
        fflush(stdout);
        fflush(stderr);
        MPI_Abort(MPI_COMM_WORLD, code);
    }
}

static moe_status wrap(MPI_Comm nc, moe_comm **out, const char *what)
{
    moe_comm *c = calloc(1, sizeof *c);
    if (!c) {
        MPI_Comm_free(&nc);
        return moe_error(MOE_ERR_NOMEM, "out of memory");
    }
    c->comm = nc;
    int rc = MPI_Comm_set_errhandler(nc, MPI_ERRORS_RETURN);
    if (rc == MPI_SUCCESS)
        rc = MPI_Comm_rank(nc, &c->rank);
    if (rc == MPI_SUCCESS)
        rc = MPI_Comm_size(nc, &c->size);
    if (rc != MPI_SUCCESS) {
        moe_comm_free(c);
        return mpi_fail(rc, "MPI_Comm_rank", what);
    }
    *out = c;
    return MOE_OK;
}

moe_status moe_comm_split(moe_comm *c, int color, int key, moe_comm **out)
{
    *out = NULL;
    if (c->comm == MPI_COMM_NULL) {
        *out = one_process();
        return *out ? MOE_OK : moe_error(MOE_ERR_NOMEM, "out of memory");
    }
    MPI_Comm nc;
    CALL(MPI_Comm_split, "process groups", c->comm, color, key, &nc);
    return wrap(nc, out, "process groups");
}

moe_status moe_comm_split_node(moe_comm *c, moe_comm **out)
{
    *out = NULL;
    if (c->comm == MPI_COMM_NULL) {
        *out = one_process();
        return *out ? MOE_OK : moe_error(MOE_ERR_NOMEM, "out of memory");
    }
    MPI_Comm nc;
    CALL(MPI_Comm_split_type, "node detection", c->comm, MPI_COMM_TYPE_SHARED, c->rank, MPI_INFO_NULL, &nc);
    return wrap(nc, out, "node detection");
}

void moe_comm_free(moe_comm *c)
{
    if (!c)
        return;
    int fin = 0;
    MPI_Finalized(&fin);
    if (c->comm != MPI_COMM_NULL && !fin)
        MPI_Comm_free(&c->comm);
    free(c);
}

moe_status moe_comm_barrier(moe_comm *c, double timeout, const char *what)
{
    if (c->size == 1)
        return MOE_OK;
    MPI_Request r;
    CALL(MPI_Ibarrier, what, c->comm, &r);
    return poll(c, 1, &r, timeout > 0 ? timeout : moe_comm_timeout(), what, -1);
}

moe_status moe_comm_bcast(moe_comm *c, void *buf, int64_t bytes, int root, const char *what)
{
    return moe_comm_bcast_within(c, buf, bytes, root, moe_comm_timeout(), what);
}

moe_status moe_comm_bcast_within(moe_comm *c, void *buf, int64_t bytes, int root, double timeout, const char *what)
{
    if (c->size == 1 || bytes == 0)
        return MOE_OK;
    int n, made;
    MPI_Datatype t;
    moe_status s = as_units(bytes, &n, &t, &made, what);
    if (s)
        return s;
    MPI_Request r;
    int rc = MPI_Ibcast(buf, n, t, root, c->comm, &r);
    s = rc == MPI_SUCCESS ? poll(c, 1, &r, timeout, what, root == c->rank ? -1 : root) : mpi_fail(rc, "MPI_Ibcast", what);
    if (made)
        MPI_Type_free(&t);
    return s;
}

moe_status moe_comm_allgather(moe_comm *c, const void *send, int64_t bytes, void *recv, const char *what)
{
    if (c->size == 1) {
        if (bytes && send != recv)
            memmove(recv, send, (size_t)bytes);
        return MOE_OK;
    }
    int n, made;
    MPI_Datatype t;
    moe_status s = as_units(bytes, &n, &t, &made, what);
    if (s)
        return s;
    MPI_Request r;
    int rc = MPI_Iallgather(send, n, t, recv, n, t, c->comm, &r);
    s = rc == MPI_SUCCESS ? poll(c, 1, &r, moe_comm_timeout(), what, -1) : mpi_fail(rc, "MPI_Iallgather", what);
    if (made)
        MPI_Type_free(&t);
    return s;
}

moe_status moe_comm_alltoall(moe_comm *c, const void *send, int64_t bytes, void *recv, const char *what)
{
    if (c->size == 1) {
        if (bytes && send != recv)
            memmove(recv, send, (size_t)bytes);
        return MOE_OK;
    }
    int n, made;
    MPI_Datatype t;
    moe_status s = as_units(bytes, &n, &t, &made, what);
    if (s)
        return s;
    MPI_Request r;
    int rc = MPI_Ialltoall(send, n, t, recv, n, t, c->comm, &r);
    s = rc == MPI_SUCCESS ? poll(c, 1, &r, moe_comm_timeout(), what, -1) : mpi_fail(rc, "MPI_Ialltoall", what);
    if (made)
        MPI_Type_free(&t);
    return s;
}

moe_status moe_comm_allreduce_i64(moe_comm *c, int64_t *v, int n, int op, const char *what)
{
    if (c->size == 1 || n == 0)
        return MOE_OK;
    MPI_Request r;
    CALL(MPI_Iallreduce, what, MPI_IN_PLACE, v, n, MPI_INT64_T, op == MOE_COMM_MAX ? MPI_MAX : MPI_SUM, c->comm, &r);
    return poll(c, 1, &r, moe_comm_timeout(), what, -1);
}

static moe_status p2p(moe_comm *c, void *buf, int64_t bytes, int peer, int send, const char *what)
{
    int n, made;
    MPI_Datatype t;
    moe_status s = as_units(bytes, &n, &t, &made, what);
    if (s)
        return s;
    MPI_Request r;
    int rc = send ? MPI_Isend(buf, n, t, peer, 0, c->comm, &r) : MPI_Irecv(buf, n, t, peer, 0, c->comm, &r);
    s = rc == MPI_SUCCESS ? poll(c, 1, &r, moe_comm_timeout(), what, peer)
                          : mpi_fail(rc, send ? "MPI_Isend" : "MPI_Irecv", what);
    if (made)
        MPI_Type_free(&t);
    return s;
}

moe_status moe_comm_send(moe_comm *c, const void *buf, int64_t bytes, int peer, const char *what)
{
    return p2p(c, (void *)buf, bytes, peer, 1, what);
}

moe_status moe_comm_recv(moe_comm *c, void *buf, int64_t bytes, int peer, const char *what)
{
    return p2p(c, buf, bytes, peer, 0, what);
}

moe_status moe_comm_req_create(int max_rounds, moe_comm_req **out)
{
    moe_comm_req *r = calloc(1, sizeof *r);
    *out = r;
    if (!r || !(r->r = calloc((size_t)(max_rounds > 0 ? max_rounds : 1), sizeof *r->r))) {
        free(r);
        *out = NULL;
        return moe_error(MOE_ERR_NOMEM, "out of memory");
    }
    r->max = max_rounds > 0 ? max_rounds : 1;
    r->row = MPI_DATATYPE_NULL;
    return MOE_OK;
}

void moe_comm_req_free(moe_comm_req *r)
{
    if (!r)
        return;
    int fin = 0;
    MPI_Finalized(&fin);
    if (r->row != MPI_DATATYPE_NULL && !fin)
        MPI_Type_free(&r->row);
    free(r->r);
    free(r);
}

moe_status moe_comm_ialltoallv(moe_comm *c, const void *send, const int64_t *scount, const int64_t *sdispl, void *recv,
                               const int64_t *rcount, const int64_t *rdispl, int64_t row_bytes, int64_t max_rows,
                               int64_t bound, moe_comm_req *req, const char *what)
{
    const int P = c->size;
    snprintf(req->what, sizeof req->what, "%s", what);
    req->n = 0;
    if (P == 1) {
        if (scount[0] && row_bytes)
            memmove((char *)recv + rdispl[0] * row_bytes, (const char *)send + sdispl[0] * row_bytes,
                    (size_t)(scount[0] * row_bytes));
        return MOE_OK;
    }
    if (max_rows < 1 || max_rows > INT_MAX)
        max_rows = INT_MAX;
    const int64_t rounds = bound <= 0 ? 1 : (bound + max_rows - 1) / max_rows;
    if (rounds > req->max)
        return moe_error(MOE_ERR_MPI, "rank %d: %s: %lld rounds of at most %lld rows exceed the %d planned", world_rank,
                         what, (long long)rounds, (long long)max_rows, req->max);
    if (row_bytes > INT_MAX)
        return moe_error(MOE_ERR_MPI, "rank %d: %s: a row of %lld bytes is too wide", world_rank, what,
                         (long long)row_bytes);
    if (req->row == MPI_DATATYPE_NULL || req->row_bytes != row_bytes) {
        if (req->row != MPI_DATATYPE_NULL)
            MPI_Type_free(&req->row);
        CALL(MPI_Type_contiguous, what, (int)row_bytes, MPI_BYTE, &req->row);
        CALL(MPI_Type_commit, what, &req->row);
        req->row_bytes = row_bytes;
    }
    int sc[P], sd[P], rcn[P], rd[P];
    for (int64_t k = 0; k < rounds; k++) {
        /* round k carries rows [k·max_rows, (k+1)·max_rows) of every block: displacements
         * are counted in rows from the block's own base pointer, so they stay small */
        const int64_t lo = k * max_rows;
        int64_t sbase = INT64_MAX, rbase = INT64_MAX;
        for (int p = 0; p < P; p++) {
            sbase = sdispl[p] + lo < sbase ? sdispl[p] + lo : sbase;
            rbase = rdispl[p] + lo < rbase ? rdispl[p] + lo : rbase;
        }
        for (int p = 0; p < P; p++) {
            const int64_t s = scount[p] - lo, r = rcount[p] - lo;
            sc[p] = (int)(s <= 0 ? 0 : s < max_rows ? s : max_rows);
            rcn[p] = (int)(r <= 0 ? 0 : r < max_rows ? r : max_rows);
            if (sdispl[p] + lo - sbase > INT_MAX || rdispl[p] + lo - rbase > INT_MAX)
                return moe_error(MOE_ERR_MPI, "rank %d: %s: a displacement past 2^31 rows", world_rank, what);
            sd[p] = (int)(sdispl[p] + lo - sbase);
            rd[p] = (int)(rdispl[p] + lo - rbase);
        }
        CALL(MPI_Ialltoallv, what, (const char *)send + sbase * row_bytes, sc, sd, req->row,
             (char *)recv + rbase * row_bytes, rcn, rd, req->row, c->comm, &req->r[req->n]);
        req->n++;
    }
    return MOE_OK;
}

moe_status moe_comm_wait(moe_comm *c, moe_comm_req *req)
{
    if (c->size == 1 || req->n == 0)
        return MOE_OK;
    moe_status s = poll(c, req->n, req->r, moe_comm_timeout(), req->what, -1);
    req->n = 0;
    return s;
}

#else /* one process only: every collective is a copy */

moe_status moe_comm_world(moe_comm **out)
{
    /* started as one of several ranks: each would think itself alone and train alone */
    static const char *const vars[] = {"OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "MV2_COMM_WORLD_SIZE"};
    *out = NULL;
    for (size_t i = 0; i < sizeof vars / sizeof vars[0]; i++) {
        const char *v = getenv(vars[i]);
        if (v && atoi(v) > 1)
            return moe_error(MOE_ERR_UNSUPPORTED, "started as one of %s ranks (%s), but this cmoe was built without "
                             "MPI: install libopenmpi-dev and build again (cmoe --version says MPI: yes)", v, vars[i]);
    }
    *out = one_process();
    return *out ? MOE_OK : moe_error(MOE_ERR_NOMEM, "out of memory");
}

void moe_comm_finalize(void)
{
}

void moe_comm_abort(moe_comm *c, int code)
{
}

moe_status moe_comm_split(moe_comm *c, int color, int key, moe_comm **out)
{
    *out = one_process();
    return *out ? MOE_OK : moe_error(MOE_ERR_NOMEM, "out of memory");
}

moe_status moe_comm_split_node(moe_comm *c, moe_comm **out)
{
    return moe_comm_split(c, 0, 0, out);
}

void moe_comm_free(moe_comm *c)
{
    free(c);
}

moe_status moe_comm_barrier(moe_comm *c, double timeout, const char *what)
{
    return MOE_OK;
}

moe_status moe_comm_bcast(moe_comm *c, void *buf, int64_t bytes, int root, const char *what)
{
    return MOE_OK;
}

moe_status moe_comm_bcast_within(moe_comm *c, void *buf, int64_t bytes, int root, double timeout, const char *what)
{
    return MOE_OK;
}

moe_status moe_comm_allgather(moe_comm *c, const void *send, int64_t bytes, void *recv, const char *what)
{
    if (bytes && send != recv)
        memmove(recv, send, (size_t)bytes);
    return MOE_OK;
}

moe_status moe_comm_alltoall(moe_comm *c, const void *send, int64_t bytes, void *recv, const char *what)
{
    return moe_comm_allgather(c, send, bytes, recv, what);
}

moe_status moe_comm_allreduce_i64(moe_comm *c, int64_t *v, int n, int op, const char *what)
{
    return MOE_OK;
}

moe_status moe_comm_send(moe_comm *c, const void *buf, int64_t bytes, int peer, const char *what)
{
    return moe_error(MOE_ERR_UNSUPPORTED, "%s: no other rank in a build without MPI", what);
}

moe_status moe_comm_recv(moe_comm *c, void *buf, int64_t bytes, int peer, const char *what)
{
    return moe_error(MOE_ERR_UNSUPPORTED, "%s: no other rank in a build without MPI", what);
}

moe_status moe_comm_req_create(int max_rounds, moe_comm_req **out)
{
    *out = calloc(1, sizeof **out);
    return *out ? MOE_OK : moe_error(MOE_ERR_NOMEM, "out of memory");
}

void moe_comm_req_free(moe_comm_req *r)
{
    free(r);
}

moe_status moe_comm_ialltoallv(moe_comm *c, const void *send, const int64_t *scount, const int64_t *sdispl, void *recv,
                               const int64_t *rcount, const int64_t *rdispl, int64_t row_bytes, int64_t max_rows,
                               int64_t bound, moe_comm_req *req, const char *what)
{
    if (scount[0] && row_bytes)
        memmove((char *)recv + rdispl[0] * row_bytes, (const char *)send + sdispl[0] * row_bytes,
                (size_t)(scount[0] * row_bytes));
    return MOE_OK;
}

moe_status moe_comm_wait(moe_comm *c, moe_comm_req *req)
{
    return MOE_OK;
}

#endif
