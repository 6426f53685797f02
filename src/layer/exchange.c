/*
 * The single-process exchanges (exchange.h): local, where rows stay put, and loopback,
 * which plays several expert owners in one process and copies every chunk through
 * receive buffers and receive-side plans of its own, as a wire exchange would.
 */
#include <stdlib.h>
#include <string.h>

#include "layer/exchange.h"

void moe_exchange_free(moe_exchange *ex)
{
    if (ex)
        ex->free(ex);
}

static moe_status sum_nothing(moe_exchange *ex, moe_backend *b, moe_tensor v, int64_t n)
{
    return MOE_OK; /* one process holds every token: its counts are the global ones */
}

static void free_exchange(moe_exchange *ex)
{
    free(ex);
}

/* ---- local ------------------------------------------------------------------------ */

struct moe_xstate {
    moe_exchange *ex;
    moe_backend *b;
    /* local: the source plan of the last forward */
    const moe_bplan *src;
    /* loopback */
    int64_t E, max_rows;
    moe_plan *host;      /* the source plan, read back to cut the chunks */
    moe_bplan **recv;    /* [chunks + 1] receive-side plans: each chunk's, then all of them */
    int64_t *lo, *hi;    /* [chunks, E] rows of each expert in each chunk (either side) */
    int64_t *begin, *rows; /* [E] one plan's segments */
};

static moe_status local_state_create(moe_exchange *ex, moe_backend *b, const moe_layer_config *c,
                                     int64_t max_tokens, moe_xstate **out)
{
    *out = calloc(1, sizeof **out);
    if (!*out)
        return moe_error(MOE_ERR_NOMEM, "exchange: out of memory");
    (*out)->ex = ex;
    (*out)->b = b;
    return MOE_OK;
}

static void local_state_free(moe_xstate *s)
{
    free(s);
}

static int64_t local_expert_rows(const moe_xstate *s)
{
    return 0; /* in place: the layer's source-side buffers serve */
}

static moe_status local_plan(moe_xstate *s, const moe_bplan *plan, int64_t T)
{
    s->src = plan;
    return MOE_OK;
}

static const moe_bplan *local_chunk(const moe_xstate *s, int64_t c, int64_t src)
{
    return s->src;
}

/* In place: the layer passes one tensor as both sides, and nothing moves. */
static void local_move(moe_xstate *s, int64_t c, moe_tensor dst, moe_tensor src, int64_t width)
{
}

static moe_status local_wait(moe_xstate *s, int64_t c)
{
    return MOE_OK;
}

moe_status moe_exchange_local_create(moe_exchange **out)
{
    moe_exchange *ex = calloc(1, sizeof *ex);
    *out = ex;
    if (!ex)
        return moe_error(MOE_ERR_NOMEM, "exchange: out of memory");
    ex->name = "local";
    ex->shards = 1;
    ex->chunks = 1;
    ex->sources = 1;
    ex->in_place = 1;
    ex->state_create = local_state_create;
    ex->state_free = local_state_free;
    ex->expert_rows = local_expert_rows;
    ex->plan = local_plan;
    ex->chunk = local_chunk;
    ex->to_experts_start = local_move;
    ex->to_experts_wait = local_wait;
    ex->to_sources_start = local_move;
    ex->to_sources_wait = local_wait;
    ex->sum = sum_nothing;
    ex->free = free_exchange;
    return MOE_OK;
}

/* ---- loopback ------------------------------------------------------------------------ */

typedef struct {
    int64_t owners;
} loopback_ctx;

static void loop_state_free(moe_xstate *s)
{
    if (!s)
        return;
    for (int64_t c = 0; s->recv && c <= s->ex->chunks; c++)
        if (s->recv[c])
            s->b->plan_free(s->b, s->recv[c]);
    moe_plan_free(s->host);
    free(s->recv);
    free(s->lo);
    free(s->hi);
    free(s->begin);
    free(s->rows);
    free(s);
}

static moe_status loop_state_create(moe_exchange *ex, moe_backend *b, const moe_layer_config *c, int64_t max_tokens,
                                    moe_xstate **out)
{
    const loopback_ctx *x = ex->ctx;
    const int64_t E = c->n_experts, D = ex->chunks;
    *out = NULL;
    if (E % x->owners)
        return moe_error(MOE_ERR_ARG, "exchange: %lld experts do not split over %lld owners (use a divisor of %lld)",
                         (long long)E, (long long)x->owners, (long long)E);
    moe_xstate *s = calloc(1, sizeof *s);
    if (!s)
        return moe_error(MOE_ERR_NOMEM, "exchange: out of memory");
    s->ex = ex;
    s->b = b;
    s->E = E;
    const int ec = c->router == MOE_ROUTER_EXPERT_CHOICE;
    const int64_t k = ec ? moe_capacity(c, max_tokens) : c->router == MOE_ROUTER_HASH ? 1 : c->top_k;
    s->max_rows = ec ? E * k : max_tokens * k;
    s->recv = calloc((size_t)D + 1, sizeof *s->recv);
    s->lo = calloc((size_t)(D * E), sizeof *s->lo);
    s->hi = calloc((size_t)(D * E), sizeof *s->hi);
    s->begin = calloc((size_t)E, sizeof *s->begin);
    s->rows = calloc((size_t)E, sizeof *s->rows);
    moe_status st = !s->recv || !s->lo || !s->hi || !s->begin || !s->rows
                        ? moe_error(MOE_ERR_NOMEM, "exchange: out of memory")
                        : moe_plan_create(s->max_rows, max_tokens, E, k, &s->host);
    for (int64_t i = 0; !st && i <= D; i++)
        st = b->plan_create(b, c, max_tokens, &s->recv[i]);
    if (st) {
        loop_state_free(s);
        return st;
    }
    *out = s;
    return MOE_OK;
}

static int64_t loop_expert_rows(const moe_xstate *s)
{
    return s->max_rows;
}

/* Chunk c of an expert's R rows: the c-th of D runs of whole MOE_ROW_BLOCK blocks. */
static void slice(int64_t R, int64_t c, int64_t D, int64_t *lo, int64_t *hi)
{
    const int64_t blocks = (R + MOE_ROW_BLOCK - 1) / MOE_ROW_BLOCK;
    *lo = blocks * c / D * MOE_ROW_BLOCK;
    *hi = blocks * (c + 1) / D * MOE_ROW_BLOCK;
    *lo = *lo < R ? *lo : R;
    *hi = *hi < R ? *hi : R;
}

/* One process is the only source, so the expert side mirrors the source side row for
 * row; the chunks are its slices, each copied through as its own message would be. */
static moe_status loop_plan(moe_xstate *s, const moe_bplan *plan, int64_t T)
{
    moe_backend *b = s->b;
    const int64_t D = s->ex->chunks, E = s->E;
    moe_status st = b->plan_download(b, s->host, plan);
    for (int64_t c = 0; !st && c < D; c++) {
        for (int64_t e = 0; e < E; e++) {
            const int64_t off = s->host->offsets[e];
            int64_t lo, hi;
            slice(s->host->offsets[e + 1] - off, c, D, &lo, &hi);
            s->lo[c * E + e] = s->begin[e] = off + lo;
            s->hi[c * E + e] = off + hi;
            s->rows[e] = hi - lo;
        }
        st = b->plan_set_segments(b, s->recv[c], s->begin, s->rows);
    }
    for (int64_t e = 0; !st && e < E; e++) {
        s->begin[e] = s->host->offsets[e];
        s->rows[e] = s->host->offsets[e + 1] - s->host->offsets[e];
    }
    return st ? st : b->plan_set_segments(b, s->recv[D], s->begin, s->rows);
}

static const moe_bplan *loop_chunk(const moe_xstate *s, int64_t c, int64_t src)
{
    return s->recv[c < 0 ? s->ex->chunks : c];
}

/* Every owner's experts in turn, as one message each would carry them. */
static void loop_move(moe_xstate *s, int64_t c, moe_tensor expert_side, moe_tensor source_side, int64_t width,
                      int to_experts)
{
    const loopback_ctx *x = s->ex->ctx;
    const int64_t E = s->E, per = E / x->owners;
    for (int64_t o = 0; o < x->owners; o++)
        for (int64_t e = o * per; e < (o + 1) * per; e++) {
            const int64_t lo = s->lo[c * E + e], rows = s->hi[c * E + e] - lo;
            moe_tensor es = moe_tensor_at(expert_side, lo * width), ss = moe_tensor_at(source_side, lo * width);
            if (rows > 0)
                s->b->copy(s->b, to_experts ? es : ss, to_experts ? ss : es, rows * width);
        }
}

static void loop_to_experts(moe_xstate *s, int64_t c, moe_tensor expert_side, moe_tensor source_side, int64_t width)
{
    loop_move(s, c, expert_side, source_side, width, 1);
}

static void loop_to_sources(moe_xstate *s, int64_t c, moe_tensor source_side, moe_tensor expert_side, int64_t width)
{
    loop_move(s, c, expert_side, source_side, width, 0);
}

static moe_status loop_wait(moe_xstate *s, int64_t c)
{
    return MOE_OK; /* the copies were enqueued on the one stream, in order */
}

static void loop_free(moe_exchange *ex)
{
    free(ex->ctx);
    free(ex);
}

moe_status moe_exchange_loopback_create(int64_t owners, int64_t chunks, moe_exchange **out)
{
    *out = NULL;
    if (owners < 1 || chunks < 1 || chunks > 64)
        return moe_error(MOE_ERR_ARG, "loopback exchange: owners must be >= 1 and chunks in [1, 64] (got %lld, %lld)",
                         (long long)owners, (long long)chunks);
    moe_exchange *ex = calloc(1, sizeof *ex);
    loopback_ctx *x = calloc(1, sizeof *x);
    if (!ex || !x) {
        free(ex);
        free(x);
        return moe_error(MOE_ERR_NOMEM, "exchange: out of memory");
    }
    x->owners = owners;
    ex->name = "loopback";
    ex->shards = 1; /* one process holds every expert's weights */
    ex->chunks = chunks;
    ex->sources = 1;
    ex->state_create = loop_state_create;
    ex->state_free = loop_state_free;
    ex->expert_rows = loop_expert_rows;
    ex->plan = loop_plan;
    ex->chunk = loop_chunk;
    ex->to_experts_start = loop_to_experts;
    ex->to_experts_wait = loop_wait;
    ex->to_sources_start = loop_to_sources;
    ex->to_sources_wait = loop_wait;
    ex->sum = sum_nothing;
    ex->free = loop_free;
    ex->ctx = x;
    *out = ex;
    return MOE_OK;
}
