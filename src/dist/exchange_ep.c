/*
 * The expert-parallel exchange over a communicator (exchange_ep.h).
 *
 * Directions: 0 carries source-side rows to the experts (dispatch's x, the combine
 * backward's dy), 1 brings expert-side rows back (the experts' y, the dispatch backward's
 * dx). Both stage through host buffers laid out chunk by chunk; inside a chunk, the rows
 * for (from) each peer form one block, and inside a block each local expert's slice in
 * turn. Counts are rows; MPI moves them as a row datatype.
 */
#define _POSIX_C_SOURCE 200809L
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "dist/exchange_ep.h"

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

#define MAXD 64

typedef struct {
    moe_comm *ep, *node, *across; /* node/across: hier only */
    int P, me, L, Nn;             /* L ranks per node, Nn nodes (hier) */
    int hier;
    int64_t max_chunks, max_rows;
    moe_ep_traffic traffic;
} ep_ctx;

enum { SEND, RECV };

struct moe_xstate {
    moe_exchange *ex;
    ep_ctx *x;
    moe_backend *b;
    moe_dtype dt;
    int64_t es, d;                 /* element size, row width */
    int64_t E, El, P, N, R, D;     /* N: rows of a source's plan at most; R = P·N; D of this pass */
    moe_buf *cbuf;                 /* [2E + 2] the plan's counts */
    double *ch;                    /* [2E + 2] read back */
    int64_t *cs, *cr, *all;        /* [E] my rows per expert; [P, El] rows from each source; hier: [P, E] */
    int64_t *soff, *seg;           /* [E] my plan's expert starts; [El, P] expert-side source segments */
    moe_bplan **plans;             /* [(max_chunks + 1) · P]: chunk c (max_chunks: all) of source s */
    int64_t *begin, *rows;         /* [El] */
    int *order;                    /* [P] the order of the blocks sent (flat: by rank; hier: local rank first) */
    char *stage[2][2];             /* [direction][SEND / RECV] host rows */
    int64_t *cnt[2][2], *dsp[2][2]; /* [max_chunks, P]: rows per peer block of chunk c, and where it starts */
    int64_t width[2][MAXD];        /* of the chunk in flight */
    moe_tensor to[2][MAXD];        /* where its rows go when they arrive */
    moe_comm_req *req[2][MAXD];
    /* hierarchical steps */
    char *mid[2];                  /* [R rows] step one's receive buffers, chunk after chunk */
    int64_t mid_base[2][MAXD];     /* where chunk c's start in them */
    char *regroup;                 /* [R rows] step two's send buffer */
    moe_comm_req *req2;
    int64_t *h[8];                 /* [P] counts and displacements of the steps */
};

void moe_ep_options_default(moe_ep_options *o)
{
    memset(o, 0, sizeof *o);
    o->chunks = 1;
    o->max_chunks = 1;
}

/* Chunk c of R rows: the c-th of D runs of whole MOE_ROW_BLOCK blocks (as the loopback). */
static void slice(int64_t R, int64_t c, int64_t D, int64_t *lo, int64_t *hi)
{
    const int64_t blocks = (R + MOE_ROW_BLOCK - 1) / MOE_ROW_BLOCK;
    *lo = blocks * c / D * MOE_ROW_BLOCK;
    *hi = blocks * (c + 1) / D * MOE_ROW_BLOCK;
    *lo = *lo < R ? *lo : R;
    *hi = *hi < R ? *hi : R;
}

static int64_t slice_rows(int64_t R, int64_t c, int64_t D)
{
    int64_t lo, hi;
    slice(R, c, D, &lo, &hi);
    return hi - lo;
}

static void state_free(moe_xstate *s)
{
    if (!s)
        return;
    moe_backend *b = s->b;
    const int64_t nplans = (s->x->max_chunks + 1) * s->P;
    for (int64_t i = 0; s->plans && i < nplans; i++)
        if (s->plans[i])
            b->plan_free(b, s->plans[i]);
    if (s->cbuf)
        b->free(b, s->cbuf);
    for (int d = 0; d < 2; d++) {
        for (int k = 0; k < 2; k++) {
            free(s->stage[d][k]);
            free(s->cnt[d][k]);
            free(s->dsp[d][k]);
        }
        for (int c = 0; c < MAXD; c++)
            moe_comm_req_free(s->req[d][c]);
        free(s->mid[d]);
    }
    free(s->regroup);
    moe_comm_req_free(s->req2);
    for (int i = 0; i < 8; i++)
        free(s->h[i]);
    free(s->plans);
    free(s->ch);
    free(s->cs);
    free(s->cr);
    free(s->all);
    free(s->soff);
    free(s->seg);
    free(s->begin);
    free(s->rows);
    free(s->order);
    free(s);
}

static moe_status state_create(moe_exchange *ex, moe_backend *b, const moe_layer_config *c, int64_t max_tokens,
                               moe_xstate **out)
{
    ep_ctx *x = ex->ctx;
    const int64_t E = c->n_experts, P = x->P;
    *out = NULL;
    if (E % P)
        return moe_error(MOE_ERR_ARG, "expert parallelism: %lld experts do not split over %lld ranks (use --ep that "
                         "divides %lld)", (long long)E, (long long)P, (long long)E);
    moe_xstate *s = calloc(1, sizeof *s);
    if (!s)
        return moe_error(MOE_ERR_NOMEM, "exchange: out of memory");
    s->ex = ex;
    s->x = x;
    s->b = b;
    s->dt = b->float_type;
    s->es = (int64_t)moe_dtype_size(s->dt);
    s->d = c->d_model;
    s->E = E;
    s->El = E / P;
    s->P = P;
    const int ec = c->router == MOE_ROUTER_EXPERT_CHOICE;
    s->N = ec ? E * moe_capacity(c, max_tokens) : max_tokens * (c->router == MOE_ROUTER_HASH ? 1 : c->top_k);
    s->R = P * s->N;
    const int64_t Dm = x->max_chunks, nplans = (Dm + 1) * P;
    const int64_t bound = s->R, maxr = x->max_rows, rounds = (bound + maxr - 1) / maxr;
    moe_status st = MOE_OK;
#define ALLOC(p, n) (st = st ? st : ((p) = calloc((size_t)((n) > 0 ? (n) : 1), sizeof *(p))) ? MOE_OK : moe_error(MOE_ERR_NOMEM, "exchange: out of memory"))
    ALLOC(s->plans, nplans);
    ALLOC(s->ch, 2 * E + 2);
    ALLOC(s->cs, E);
    ALLOC(s->cr, E);
    ALLOC(s->all, P * E);
    ALLOC(s->soff, E);
    ALLOC(s->seg, E);
    ALLOC(s->begin, s->El);
    ALLOC(s->rows, s->El);
    ALLOC(s->order, P);
    for (int i = 0; i < 8; i++)
        ALLOC(s->h[i], P);
    for (int d = 0; d < 2; d++)
        for (int k = 0; k < 2; k++) {
            ALLOC(s->cnt[d][k], Dm * P);
            ALLOC(s->dsp[d][k], Dm * P);
            /* the source side holds N rows, the expert side R */
            const int64_t rows = (d == 0) == (k == SEND) ? s->N : s->R;
            ALLOC(s->stage[d][k], rows * s->d * s->es);
        }
    for (int d = 0; x->hier && d < 2; d++)
        ALLOC(s->mid[d], s->R * s->d * s->es);
    if (x->hier)
        ALLOC(s->regroup, s->R * s->d * s->es);
#undef ALLOC
    for (int d = 0; !st && d < 2; d++)
        for (int64_t ch = 0; !st && ch < Dm; ch++)
            st = moe_comm_req_create((int)rounds, &s->req[d][ch]);
    if (!st)
        st = moe_comm_req_create((int)rounds, &s->req2);
    if (!st)
        st = b->alloc(b, s->dt, 2 * E + 2, &s->cbuf);
    /* expert-side plans: segments of the El local experts, at most N rows from one source */
    moe_layer_config pc;
    moe_layer_config_default(&pc);
    pc.d_model = c->d_model;
    pc.d_ff = c->d_ff;
    pc.n_experts = s->El;
    pc.router = MOE_ROUTER_HASH;
    pc.top_k = 1;
    for (int64_t i = 0; !st && i < nplans; i++)
        st = b->plan_create(b, &pc, s->N, &s->plans[i]);
    if (st) {
        state_free(s);
        return st;
    }
    /* blocks in rank order, or (hier) by local rank, then node: step one's blocks are runs */
    for (int k = 0, l = 0; l < (x->hier ? x->L : 1); l++)
        for (int n = 0; n < (x->hier ? x->Nn : (int)P); n++)
            s->order[k++] = x->hier ? n * x->L + l : n;
    *out = s;
    return MOE_OK;
}

static int64_t expert_rows(const moe_xstate *s)
{
    return s->R;
}

/* Rows of chunk c that rank src sends rank dst in direction dir (hier: from the matrix). */
static int64_t block_rows(const moe_xstate *s, int dir, int64_t src, int64_t dst, int64_t c)
{
    const int64_t tok = dir == 0 ? src : dst, own = dir == 0 ? dst : src;
    int64_t n = 0;
    for (int64_t el = 0; el < s->El; el++)
        n += slice_rows(s->all[tok * s->E + own * s->El + el], c, s->D);
    return n;
}

/* Counts and displacements of both directions' blocks, chunk by chunk; the expert side's
 * segments and the expert-side plans. */
static moe_status layout(moe_xstate *s)
{
    const int64_t P = s->P, El = s->El, D = s->D;
    moe_backend *b = s->b;
    moe_status st;
    for (int64_t el = 0, at = 0; el < El; el++) /* expert-major: every source's segment in rank order */
        for (int64_t src = 0; src < P; src++) {
            s->seg[el * P + src] = at;
            at += s->cr[src * El + el];
        }
    for (int dir = 0; dir < 2; dir++) {
        int64_t at[2] = {0, 0};
        for (int64_t c = 0; c < D; c++) {
            for (int64_t k = 0; k < P; k++) { /* sends in block order */
                const int64_t p = s->order[k];
                int64_t n = 0;
                for (int64_t el = 0; el < El; el++)
                    n += slice_rows(dir == 0 ? s->cs[p * El + el] : s->cr[p * El + el], c, D);
                s->cnt[dir][SEND][c * P + p] = n;
                s->dsp[dir][SEND][c * P + p] = at[SEND];
                at[SEND] += n;
            }
            for (int64_t p = 0; p < P; p++) { /* receives in rank order */
                int64_t n = 0;
                for (int64_t el = 0; el < El; el++)
                    n += slice_rows(dir == 0 ? s->cr[p * El + el] : s->cs[p * El + el], c, D);
                s->cnt[dir][RECV][c * P + p] = n;
                s->dsp[dir][RECV][c * P + p] = at[RECV];
                at[RECV] += n;
            }
        }
    }
    if (s->x->hier) { /* step one's receives of every chunk in flight at once: one region each */
        const int L = s->x->L, Nn = s->x->Nn, myl = s->x->me % L, myn = s->x->me / L;
        for (int dir = 0; dir < 2; dir++)
            for (int64_t c = 0, at = 0; c < D; c++) {
                s->mid_base[dir][c] = at;
                for (int l = 0; l < L; l++)
                    for (int n = 0; n < Nn; n++)
                        at += block_rows(s, dir, (int64_t)myn * L + l, (int64_t)n * L + myl, c);
            }
    }
    const int64_t Dm = s->x->max_chunks;
    for (int64_t src = 0; src < P; src++) {
        for (int64_t c = 0; c < D; c++) {
            for (int64_t el = 0; el < El; el++) {
                int64_t lo, hi;
                slice(s->cr[src * El + el], c, D, &lo, &hi);
                s->begin[el] = s->seg[el * P + src] + lo;
                s->rows[el] = hi - lo;
            }
            if ((st = b->plan_set_segments(b, s->plans[c * P + src], s->begin, s->rows)))
                return st;
        }
        for (int64_t el = 0; el < El; el++) {
            s->begin[el] = s->seg[el * P + src];
            s->rows[el] = s->cr[src * El + el];
        }
        if ((st = b->plan_set_segments(b, s->plans[Dm * P + src], s->begin, s->rows)))
            return st;
    }
    return MOE_OK;
}

static moe_status plan_counts(moe_xstate *s, const moe_bplan *p);

static moe_status plan(moe_xstate *s, const moe_bplan *p, int64_t T)
{
    const double t0 = now();
    moe_status st = plan_counts(s, p);
    s->x->traffic.seconds += now() - t0;
    return st;
}

static moe_status plan_counts(moe_xstate *s, const moe_bplan *p)
{
    ep_ctx *x = s->x;
    moe_backend *b = s->b;
    const int64_t E = s->E, El = s->El, P = s->P;
    s->D = s->ex->chunks;
    b->plan_counts(b, (moe_tensor){s->cbuf, 0}, p);
    moe_status st = moe_download_f64(b, s->ch, (moe_tensor){s->cbuf, 0}, 2 * E + 2);
    if (st)
        return st;
    for (int64_t e = 0, at = 0; e < E; e++) {
        s->cs[e] = (int64_t)s->ch[e];
        s->soff[e] = at;
        at += s->cs[e];
    }
    if (x->hier) { /* both steps need every pair's rows */
        if ((st = moe_comm_allgather(x->ep, s->cs, E * 8, s->all, "the expert counts (all-gather)")))
            return st;
        for (int64_t src = 0; src < P; src++)
            for (int64_t el = 0; el < El; el++)
                s->cr[src * El + el] = s->all[src * E + x->me * El + el];
    } else if ((st = moe_comm_alltoall(x->ep, s->cs, El * 8, s->cr, "the expert counts (all-to-all)"))) {
        return st;
    }
    for (int64_t i = 0; i < P * El; i++)
        if (s->cr[i] < 0 || s->cr[i] > s->N)
            return moe_error(MOE_ERR_MPI, "exchange: rank %lld announced %lld rows for one expert (at most %lld)",
                             (long long)(i / El), (long long)s->cr[i], (long long)s->N);
    return layout(s);
}

static const moe_bplan *chunk(const moe_xstate *s, int64_t c, int64_t src)
{
    return s->plans[(c < 0 ? s->x->max_chunks : c) * s->P + src];
}

/* Rows of one direction's side tensor to or from the staging (pack: tensor → host). */
static moe_status move_rows(moe_xstate *s, char *host, moe_tensor t, int64_t row, int64_t n, int64_t width, int pack)
{
    if (n <= 0)
        return MOE_OK;
    moe_tensor at = moe_tensor_at(t, row * width);
    return pack ? s->b->download(s->b, host, s->dt, at, n * width) : s->b->upload(s->b, at, host, s->dt, n * width);
}

/* Packs (pack = 1) the send blocks of chunk c, or unpacks its received blocks. Direction
 * 0 packs from the source side (my plan, expert p·El + el) and unpacks into the expert
 * side (source s's segment); direction 1 the other way round. */
static moe_status pack(moe_xstate *s, int dir, int64_t c, moe_tensor t, int64_t width, int packing)
{
    const int64_t P = s->P, El = s->El, D = s->D;
    const int k = packing ? SEND : RECV;
    const int64_t rb = width * s->es;
    const int source_side = (dir == 0) == packing;
    moe_status st = MOE_OK;
    for (int64_t p = 0; p < P && !st; p++) {
        int64_t at = s->dsp[dir][k][c * P + p];
        for (int64_t el = 0; el < El && !st; el++) {
            int64_t lo, hi, row;
            if (source_side) { /* my plan's rows of expert p·El + el */
                const int64_t e = p * El + el;
                slice(s->cs[e], c, D, &lo, &hi);
                row = s->soff[e] + lo;
            } else { /* source p's segment of my expert el */
                slice(s->cr[p * El + el], c, D, &lo, &hi);
                row = s->seg[el * P + p] + lo;
            }
            st = move_rows(s, s->stage[dir][k] + at * rb, t, row, hi - lo, width, packing);
            at += hi - lo;
        }
    }
    return st;
}

static const char *dir_name(int dir)
{
    return dir == 0 ? "the all-to-all to the experts" : "the all-to-all back from the experts";
}

static moe_status start(moe_xstate *s, int dir, int64_t c, moe_tensor side, int64_t width)
{
    ep_ctx *x = s->x;
    const int64_t P = s->P, rb = width * s->es;
    if (c < 0 || c >= s->D || width > s->d)
        return moe_error(MOE_ERR_ARG, "exchange: chunk %lld of %lld, width %lld", (long long)c, (long long)s->D,
                         (long long)width);
    s->width[dir][c] = width;
    moe_status st = pack(s, dir, c, side, width, 1);
    if (st)
        return st;
    const int64_t *sc = s->cnt[dir][SEND] + c * P, *rc = s->cnt[dir][RECV] + c * P;
    for (int64_t p = 0; p < P; p++)
        if (p != x->me) {
            x->traffic.rows_sent += sc[p];
            x->traffic.rows_received += rc[p];
            x->traffic.bytes_sent += sc[p] * rb;
            x->traffic.bytes_received += rc[p] * rb;
        }
    x->traffic.messages++;
    if (!x->hier)
        return moe_comm_ialltoallv(x->ep, s->stage[dir][SEND], sc, s->dsp[dir][SEND] + c * P, s->stage[dir][RECV], rc,
                                   s->dsp[dir][RECV] + c * P, rb, x->max_rows, s->R, s->req[dir][c], dir_name(dir));
    /* step one, inside the node: to local rank l the blocks for local rank l of every node
     * (a run of the send order), from local rank l what it has for my local rank */
    const int L = x->L, Nn = x->Nn, myl = x->me % L, myn = x->me / L;
    int64_t *c1 = s->h[0], *d1 = s->h[1], *c2 = s->h[2], *d2 = s->h[3];
    for (int64_t l = 0, at = s->mid_base[dir][c]; l < L; l++) {
        c1[l] = 0;
        d1[l] = s->dsp[dir][SEND][c * P + s->order[l * Nn]];
        for (int n = 0; n < Nn; n++)
            c1[l] += sc[n * L + l];
        c2[l] = 0;
        d2[l] = at;
        for (int n = 0; n < Nn; n++)
            c2[l] += block_rows(s, dir, (int64_t)myn * L + l, (int64_t)n * L + myl, c);
        at += c2[l];
    }
    return moe_comm_ialltoallv(x->node, s->stage[dir][SEND], c1, d1, s->mid[dir], c2, d2, rb, x->max_rows, s->R,
                               s->req[dir][c], dir_name(dir));
}

/* hier: step two, across nodes between ranks of my local rank: step one brought, per
 * local source l, its blocks for every node n; regrouped by node they go there, and what
 * arrives from node n is its L ranks' blocks in rank order — the flat receive layout. */
static moe_status step_two(moe_xstate *s, int dir, int64_t c)
{
    ep_ctx *x = s->x;
    const int L = x->L, Nn = x->Nn, myl = x->me % L, myn = x->me / L;
    const int64_t P = s->P, rb = s->width[dir][c] * s->es;
    int64_t *c3 = s->h[4], *d3 = s->h[5], *c4 = s->h[6], *d4 = s->h[7];
    int64_t at = 0;
    for (int n = 0; n < Nn; n++) {
        c3[n] = 0;
        d3[n] = at;
        /* local source l's block for node n sits after its blocks for nodes 0..n-1 */
        for (int l = 0; l < L; l++) {
            int64_t m = s->mid_base[dir][c];
            for (int l2 = 0; l2 < L; l2++)
                for (int n2 = 0; n2 < Nn && (l2 < l || (l2 == l && n2 < n)); n2++)
                    m += block_rows(s, dir, (int64_t)myn * L + l2, (int64_t)n2 * L + myl, c);
            const int64_t k = block_rows(s, dir, (int64_t)myn * L + l, (int64_t)n * L + myl, c);
            if (k)
                memcpy(s->regroup + at * rb, s->mid[dir] + m * rb, (size_t)(k * rb));
            at += k;
            c3[n] += k;
        }
        c4[n] = 0;
        d4[n] = s->dsp[dir][RECV][c * P + (int64_t)n * L];
        for (int l = 0; l < L; l++)
            c4[n] += s->cnt[dir][RECV][c * P + (int64_t)n * L + l];
    }
    moe_status st = moe_comm_ialltoallv(x->across, s->regroup, c3, d3, s->stage[dir][RECV], c4, d4, rb, x->max_rows,
                                        s->R, s->req2, dir_name(dir));
    return st ? st : moe_comm_wait(x->across, s->req2);
}

static moe_status finish(moe_xstate *s, int dir, int64_t c, moe_tensor side)
{
    ep_ctx *x = s->x;
    const double t0 = now();
    moe_status st = moe_comm_wait(x->hier ? x->node : x->ep, s->req[dir][c]);
    if (!st && x->hier)
        st = step_two(s, dir, c);
    if (!st)
        st = pack(s, dir, c, side, s->width[dir][c], 0);
    x->traffic.seconds += now() - t0;
    return st;
}

/* The layer gives the tensor the rows go to at the start; they land there in the wait. */
static void to_experts_start(moe_xstate *s, int64_t c, moe_tensor expert_side, moe_tensor source_side, int64_t width)
{
    const double t0 = now();
    moe_status st = start(s, 0, c, source_side, width);
    s->x->traffic.seconds += now() - t0;
    if (st)
        moe_backend_fail(s->b, "exchange", st, "%s", moe_last_error());
    else
        s->to[0][c] = expert_side;
}

static moe_status to_experts_wait(moe_xstate *s, int64_t c)
{
    moe_status st = moe_backend_take_error(s->b);
    return st ? st : finish(s, 0, c, s->to[0][c]);
}

static void to_sources_start(moe_xstate *s, int64_t c, moe_tensor source_side, moe_tensor expert_side, int64_t width)
{
    const double t0 = now();
    moe_status st = start(s, 1, c, expert_side, width);
    s->x->traffic.seconds += now() - t0;
    if (st)
        moe_backend_fail(s->b, "exchange", st, "%s", moe_last_error());
    else
        s->to[1][c] = source_side;
}

static moe_status to_sources_wait(moe_xstate *s, int64_t c)
{
    moe_status st = moe_backend_take_error(s->b);
    return st ? st : finish(s, 1, c, s->to[1][c]);
}

/* Routing, capacity and the aux losses are per source group (groups.h): nothing to sum. */
static moe_status sum(moe_exchange *ex, moe_backend *b, moe_tensor v, int64_t n)
{
    return MOE_OK;
}

static void ex_free(moe_exchange *ex)
{
    ep_ctx *x = ex->ctx;
    if (x) {
        moe_comm_free(x->node);
        moe_comm_free(x->across);
        free(x);
    }
    free(ex);
}

/* hier: nodes of L consecutive ranks (given, or found by MPI_COMM_TYPE_SHARED and checked). */
static moe_status make_nodes(ep_ctx *x, int64_t ranks_per_node)
{
    moe_status st;
    int L = (int)ranks_per_node;
    if (L > 0) {
        if (x->P % L)
            return moe_error(MOE_ERR_ARG, "--ranks-per-node %d does not divide the %d ranks of an expert-parallel "
                             "group (--ep): use a divisor of %d", L, x->P, x->P);
        if ((st = moe_comm_split(x->ep, x->me / L, x->me, &x->node)))
            return st;
    } else {
        if ((st = moe_comm_split_node(x->ep, &x->node)))
            return st;
        L = moe_comm_size(x->node);
        int64_t mine[2] = {L, moe_comm_rank(x->node)}, *all = calloc((size_t)x->P * 2, sizeof *all);
        if (!all)
            return moe_error(MOE_ERR_NOMEM, "out of memory");
        st = moe_comm_allgather(x->ep, mine, sizeof mine, all, "node detection");
        for (int r = 0; !st && r < x->P; r++)
            if (all[2 * r] != L || all[2 * r + 1] != r % L)
                st = moe_error(MOE_ERR_ARG, "--a2a hier needs the ranks of an expert-parallel group on nodes of equal "
                               "size, consecutive ranks together, but rank %d is rank %lld of %lld on its node: place "
                               "consecutive ranks on a node (mpirun --map-by core, srun --distribution=block), or "
                               "give --ranks-per-node, or use --a2a flat", r, (long long)all[2 * r + 1],
                               (long long)all[2 * r]);
        free(all);
        if (st)
            return st;
    }
    x->L = L;
    x->Nn = x->P / L;
    return moe_comm_split(x->ep, x->me % L, x->me, &x->across);
}

moe_status moe_exchange_ep_create(moe_comm *ep, const moe_ep_options *o, moe_exchange **out)
{
    *out = NULL;
    moe_ep_options def;
    if (!o) {
        moe_ep_options_default(&def);
        o = &def;
    }
    if (o->max_chunks < 1 || o->max_chunks > MAXD || o->chunks < 1 || o->chunks > o->max_chunks)
        return moe_error(MOE_ERR_ARG, "expert parallelism: chunks %lld must be in [1, %lld] (at most %d)",
                         (long long)o->chunks, (long long)o->max_chunks, MAXD);
    moe_exchange *ex = calloc(1, sizeof *ex);
    ep_ctx *x = calloc(1, sizeof *x);
    if (!ex || !x) {
        free(ex);
        free(x);
        return moe_error(MOE_ERR_NOMEM, "exchange: out of memory");
    }
    ex->ctx = x;
    x->ep = ep;
    x->P = moe_comm_size(ep);
    x->me = moe_comm_rank(ep);
    x->hier = o->hier;
    x->max_chunks = o->max_chunks;
    x->max_rows = o->max_rows > 0 && o->max_rows < ((int64_t)1 << 31) - 1 ? o->max_rows : ((int64_t)1 << 31) - 1;
    moe_status st = x->hier ? make_nodes(x, o->ranks_per_node) : MOE_OK;
    if (st) {
        ex_free(ex);
        return st;
    }
    ex->name = x->hier ? "mpi-hier" : "mpi";
    ex->shards = x->P;
    ex->shard = x->me;
    ex->chunks = o->chunks;
    ex->sources = x->P;
    ex->in_place = 0;
    ex->state_create = state_create;
    ex->state_free = state_free;
    ex->expert_rows = expert_rows;
    ex->plan = plan;
    ex->chunk = chunk;
    ex->to_experts_start = to_experts_start;
    ex->to_experts_wait = to_experts_wait;
    ex->to_sources_start = to_sources_start;
    ex->to_sources_wait = to_sources_wait;
    ex->sum = sum;
    ex->free = ex_free;
    *out = ex;
    return MOE_OK;
}

moe_status moe_exchange_ep_set_chunks(moe_exchange *ex, int64_t D)
{
    const ep_ctx *x = ex->ctx;
    if (D < 1 || D > x->max_chunks)
        return moe_error(MOE_ERR_ARG, "expert parallelism: %lld chunks outside [1, %lld]", (long long)D,
                         (long long)x->max_chunks);
    ex->chunks = D;
    return MOE_OK;
}

int64_t moe_exchange_ep_ranks_per_node(const moe_exchange *ex)
{
    const ep_ctx *x = ex->ctx;
    return x->hier ? x->L : 0;
}

void moe_exchange_ep_traffic(const moe_exchange *ex, moe_ep_traffic *t, int reset)
{
    ep_ctx *x = ex->ctx;
    *t = x->traffic;
    if (reset)
        memset(&x->traffic, 0, sizeof x->traffic);
}
