/*
 * The expert-parallel exchange (src/dist/exchange_ep.h) under mpirun -np 1, 2, 4: each
 * rank runs the MoE layer on its group of tokens with the experts split over its
 * expert-parallel group, and every output is compared bit for bit with the single-process
 * layer run on that group alone — y, dx, the aux losses and counts, the non-expert
 * gradients, and each source's expert weight gradients (taken by the layer's source hook
 * on the expert's owner). For every router; on cpu and on ref (the oracle's doubles); flat
 * and hierarchical all-to-all, 1 to 3 chunks, messages cut into rounds of a few rows (the
 * path of blocks past 2^31 bytes); expert groups of the whole world and of half of it (E+D);
 * and the edge cases: experts with no rows, ranks that receive nothing, every token to one
 * rank, capacity drops. Check runs without fork (Open MPI does not support fork after
 * MPI_Init); the shell wrapper (mpi_exchange.sh) runs it under a timeout.
 */
#include "dist/comm.h"
#include "dist/exchange_ep.h"
#include "layer/moe_layer.h"
#include "ref/ref.h"
#include "testutil.h"

static moe_comm *world;
static int W, me;

typedef struct {
    moe_router_kind router;
    int64_t E, k, shared;
    double cf;
    int64_t favour; /* >= 0: a router bias makes every token pick experts favour.. favour+k-1 */
} variant;

static const variant variants[] = {
    {MOE_ROUTER_TOPK, 8, 2, 1, 0, -1},     {MOE_ROUTER_NOISY_TOPK, 4, 2, 0, 0, -1},
    {MOE_ROUTER_EXPERT_CHOICE, 8, 1, 0, 1.5, -1}, {MOE_ROUTER_HASH, 4, 1, 1, 0, -1},
    {MOE_ROUTER_SINKHORN, 4, 2, 0, 1.0, -1}, {MOE_ROUTER_TOPK, 4, 1, 0, 0, 0},
    {MOE_ROUTER_TOPK, 4, 2, 0, 1.0, 2},
};
#define NVARIANTS (int)(sizeof variants / sizeof variants[0])

typedef struct {
    int hier;
    int64_t rpn, chunks, max_rows;
} mode;

static const mode modes[] = {{0, 0, 1, 0}, {0, 0, 3, 0}, {0, 0, 2, 7}, {1, 2, 2, 0}, {1, 1, 1, 5}, {1, 0, 3, 0}};
#define NMODES (int)(sizeof modes / sizeof modes[0])

static const int64_t T = 1171; /* tokens per group: 150-600 rows per expert, E = 4 past a GEMM block (512 rows) */

static void config(moe_layer_config *c, const variant *v)
{
    moe_layer_config_default(c);
    c->d_model = 24;
    c->d_ff = 40;
    c->n_experts = v->E;
    c->top_k = v->k;
    c->router = v->router;
    c->capacity_factor = v->cf;
    c->act = MOE_ACT_SWIGLU;
    const int learned = v->router != MOE_ROUTER_HASH;
    c->lb_coef = learned ? 0.01 : 0;
    c->z_coef = learned ? 0.001 : 0;
    c->importance_coef = learned ? 0.02 : 0;
    c->load_coef = v->router == MOE_ROUTER_NOISY_TOPK ? 0.03 : 0;
    c->jitter_eps = v->router == MOE_ROUTER_TOPK ? 0.01 : 0;
    c->n_shared = v->shared;
    c->use_bias = v->favour >= 0;
}

/* What one layer run gives, as doubles (exact copies of the backend's values). */
typedef struct {
    double *y, *dx, *stats, *params, *grads; /* params/grads: the layer's arena layout */
    double *src_grads;                       /* [sources, expert numel of the shard]: per source */
    int64_t np, ns, nexp;
} result;

typedef struct {
    result *r;
    const moe_arena *P;
} hook_ctx;

/* The expert weight gradients of source src, copied out (layer order of experts.*). */
static moe_status take(void *ctx, moe_layer *l, int64_t src)
{
    hook_ctx *h = ctx;
    int64_t at = src * h->r->nexp;
    for (int i = 0; i < h->P->n; i++) {
        const moe_view *v = &h->P->views[i];
        if (strncmp(v->name, "experts.", 8))
            continue;
        moe_status s = moe_layer_get_grad(l, v->name, h->r->src_grads + at);
        if (s)
            return s;
        at += v->numel;
    }
    return MOE_OK;
}

static void inputs(moe_backend *b, moe_tensor x, moe_tensor dy, moe_tensor tid, int64_t g, int64_t d)
{
    double *h = tu_alloc(T * d);
    int32_t *tok = malloc((size_t)T * sizeof *tok);
    for (int64_t t = 0; t < T; t++)
        tok[t] = (int32_t)((g * T + t) * 13 + 7);
    tu_randn(h, T * d, 1.0, 100 + (uint64_t)g);
    ck_assert_int_eq(moe_upload_f64(b, x, h, T * d), MOE_OK);
    tu_randn(h, T * d, 1.0, 200 + (uint64_t)g);
    ck_assert_int_eq(moe_upload_f64(b, dy, h, T * d), MOE_OK);
    ck_assert_int_eq(b->upload(b, tid, tok, MOE_I32, T), MOE_OK);
    free(h);
    free(tok);
}

/* Group g's tokens through a layer on ex (NULL: one process, every expert local). */
static result run(moe_backend *b, const moe_layer_config *c, const variant *v, moe_exchange *ex, int64_t g)
{
    const int64_t d = c->d_model;
    moe_layer *L;
    ck_assert_msg(moe_layer_create(c, b, T, ex, &L) == MOE_OK, "%s", moe_last_error());
    ck_assert_int_eq(moe_layer_init(L, 1.0), MOE_OK);
    if (v->favour >= 0) {
        double bias[16] = {0};
        for (int64_t j = 0; j < v->k; j++)
            bias[v->favour + j] = 100.0 - (double)j;
        ck_assert_int_eq(moe_layer_set_param(L, "router.bias", bias), MOE_OK);
    }
    const moe_arena *P = moe_layer_params(L);
    result r = {0};
    r.np = P->numel;
    r.ns = MOE_LAYER_NSTATS(c->n_experts);
    for (int i = 0; i < P->n; i++)
        if (!strncmp(P->views[i].name, "experts.", 8))
            r.nexp += P->views[i].numel;
    const int64_t sources = ex ? ex->sources : 1;
    r.src_grads = tu_alloc(sources * r.nexp);
    hook_ctx hc = {&r, P};
    if (ex)
        moe_layer_set_source_hook(L, take, &hc);
    moe_buf *io, *ids;
    ck_assert_int_eq(b->alloc(b, b->float_type, 4 * T * d, &io), MOE_OK);
    ck_assert_int_eq(b->alloc(b, MOE_I32, T, &ids), MOE_OK);
    moe_tensor x = {io, 0}, y = {io, T * d}, dy = {io, 2 * T * d}, dx = {io, 3 * T * d}, tid = {ids, 0};
    inputs(b, x, dy, tid, g, d);
    moe_layer_zero_grad(L);
    const moe_key key = {3, 1, (uint64_t)(g * T)};
    ck_assert_msg(moe_layer_forward(L, y, x, &tid, NULL, T, key, 1) == MOE_OK, "%s", moe_last_error());
    ck_assert_msg(moe_layer_backward(L, dx, dy) == MOE_OK, "%s", moe_last_error());
    r.y = tu_alloc(T * d);
    r.dx = tu_alloc(T * d);
    r.stats = tu_alloc(r.ns);
    r.params = tu_alloc(r.np);
    r.grads = tu_alloc(r.np);
    ck_assert_msg(moe_download_f64(b, r.y, y, T * d) == MOE_OK, "%s", moe_last_error());
    ck_assert_int_eq(moe_download_f64(b, r.dx, dx, T * d), MOE_OK);
    ck_assert_int_eq(moe_download_f64(b, r.stats, moe_layer_stats(L), r.ns), MOE_OK);
    for (int i = 0; i < P->n; i++) {
        ck_assert_int_eq(moe_layer_get_param(L, P->views[i].name, r.params + P->views[i].offset), MOE_OK);
        ck_assert_int_eq(moe_layer_get_grad(L, P->views[i].name, r.grads + P->views[i].offset), MOE_OK);
    }
    b->free(b, io);
    b->free(b, ids);
    moe_layer_free(L);
    return r;
}

static void free_result(result *r)
{
    free(r->y);
    free(r->dx);
    free(r->stats);
    free(r->params);
    free(r->grads);
    free(r->src_grads);
}

/* one assertion per array (each ck_assert is a write in Check's log of locations) */
static void same(const char *what, const double *a, const double *b, int64_t n, const char *ctx)
{
    int64_t i = 0;
    while (i < n && memcmp(&a[i], &b[i], sizeof a[i]) == 0)
        i++;
    if (i < n)
        ck_abort_msg("rank %d, %s: %s[%lld] = %.17g, one process %.17g", me, ctx, what, (long long)i, a[i], b[i]);
}

/* The layer's parameter views in the reference (full experts) and in a shard. */
static void compare(const result *got, const result *ref, const result *refs, const moe_layer_config *c,
                    moe_backend *b, int64_t ep, int64_t shard, int64_t dp, const char *ctx)
{
    const int64_t d = c->d_model, El = c->n_experts / ep;
    same("y", got->y, ref->y, T * d, ctx);
    same("dx", got->dx, ref->dx, T * d, ctx);
    same("stats", got->stats, ref->stats, got->ns, ctx);
    /* walk both layouts: the same views in the same order, experts.* cut to the shard */
    moe_arena full, part;
    moe_arena_init(&full, 8);
    moe_arena_init(&part, 8);
    ck_assert_int_eq(moe_layer_param_layout(c, &full), MOE_OK);
    ck_assert_int_eq(moe_layer_param_layout_local(c, El, &part), MOE_OK);
    ck_assert_int_eq(full.n, part.n);
    int64_t at = 0;
    for (int i = 0; i < part.n; i++) {
        const moe_view *fv = &full.views[i], *pv = &part.views[i];
        const int expert = !strncmp(pv->name, "experts.", 8);
        const int64_t off = expert ? shard * pv->numel : 0;
        char what[96];
        snprintf(what, sizeof what, "param %s", pv->name);
        same(what, got->params + pv->offset, ref->params + fv->offset + off, pv->numel, ctx);
        if (!expert) {
            snprintf(what, sizeof what, "grad %s", pv->name);
            same(what, got->grads + pv->offset, ref->grads + fv->offset, pv->numel, ctx);
            continue;
        }
        for (int64_t src = 0; src < ep; src++) { /* source src is group dp·ep + src */
            const result *rs = &refs[dp * ep + src];
            snprintf(what, sizeof what, "grad %s of source %lld", pv->name, (long long)src);
            same(what, got->src_grads + src * got->nexp + at, rs->grads + fv->offset + off, pv->numel, ctx);
        }
        at += pv->numel;
    }
    moe_arena_free(&full);
    moe_arena_free(&part);
    (void)b;
}

/* _i: variant × backend */
START_TEST(test_ep_bits)
{
    const variant *v = &variants[_i / 2];
    const char *bname = _i % 2 ? "cpu" : "ref";
    moe_layer_config c;
    config(&c, v);
    moe_backend *b;
    ck_assert_int_eq(moe_backend_create(bname, &(moe_backend_options){.threads = 1}, &b), MOE_OK);
    /* each rank runs its own group alone; the others' gradients come by all-gather */
    result refs[4] = {{0}};
    refs[me] = run(b, &c, v, NULL, me);
    const int64_t np = refs[me].np;
    double *all = tu_alloc(W * np);
    ck_assert_int_eq(moe_comm_allgather(world, refs[me].grads, np * 8, all, "reference gradients"), MOE_OK);
    for (int g = 0; g < W; g++)
        if (g != me) {
            refs[g].grads = tu_alloc(np);
            memcpy(refs[g].grads, all + g * np, (size_t)np * 8);
        }
    free(all);
    for (int64_t ep = W; ep >= 1 && ep >= W / 2; ep /= 2) {
        if (c.n_experts % ep)
            continue;
        const int64_t dp = me / ep, shard = me % ep;
        moe_comm *epc;
        ck_assert_int_eq(moe_comm_split(world, (int)dp, me, &epc), MOE_OK);
        for (int mi = 0; mi < NMODES; mi++) {
            const mode *m = &modes[mi];
            moe_ep_options o;
            moe_ep_options_default(&o);
            o.hier = m->hier;
            o.ranks_per_node = m->rpn > ep ? ep : m->rpn;
            o.chunks = o.max_chunks = m->chunks;
            o.max_rows = m->max_rows;
            moe_exchange *ex;
            ck_assert_msg(moe_exchange_ep_create(epc, &o, &ex) == MOE_OK, "%s", moe_last_error());
            char ctx[160];
            snprintf(ctx, sizeof ctx, "%s, %s, router %s, ep %lld of %d, %s rpn %lld, %lld chunks, rows/msg %lld",
                     bname, v->favour >= 0 ? "skewed" : "even", moe_router_name(c.router), (long long)ep, W,
                     m->hier ? "hier" : "flat", (long long)o.ranks_per_node, (long long)m->chunks,
                     (long long)m->max_rows);
            result r = run(b, &c, v, ex, me);
            compare(&r, &refs[me], refs, &c, b, ep, shard, dp, ctx);
            free_result(&r);
            moe_exchange_free(ex);
        }
        moe_comm_free(epc);
        if (ep == 1)
            break;
    }
    for (int g = 0; g < W; g++)
        free_result(&refs[g]);
    moe_backend_free(b);
}
END_TEST

/* An expert count that does not split over the group, and hier on nodes that do not fit. */
START_TEST(test_ep_refusals)
{
    moe_ep_options o;
    moe_ep_options_default(&o);
    moe_exchange *ex;
    if (W > 1) {
        o.hier = 1;
        o.ranks_per_node = W + 1;
        ck_assert_int_eq(moe_exchange_ep_create(world, &o, &ex), MOE_ERR_ARG);
        ck_assert_msg(strstr(moe_last_error(), "--ranks-per-node"), "%s", moe_last_error());
        o.hier = 0;
        ck_assert_int_eq(moe_exchange_ep_create(world, &o, &ex), MOE_OK);
        moe_layer_config c;
        config(&c, &variants[0]);
        c.n_experts = 3 * W + 1;
        moe_backend *b;
        ck_assert_int_eq(moe_backend_create("cpu", NULL, &b), MOE_OK);
        moe_layer *L;
        ck_assert_int_eq(moe_layer_create(&c, b, T, ex, &L), MOE_ERR_ARG);
        ck_assert_msg(strstr(moe_last_error(), "experts do not split"), "%s", moe_last_error());
        moe_backend_free(b);
        moe_exchange_free(ex);
    }
    o.chunks = 5;
    o.max_chunks = 4;
    ck_assert_int_eq(moe_exchange_ep_create(world, &o, &ex), MOE_ERR_ARG);
}
END_TEST

int main(void)
{
    if (moe_comm_world(&world)) {
        fprintf(stderr, "mpi_exchange: %s\n", moe_last_error());
        return 1;
    }
    W = moe_comm_size(world);
    me = moe_comm_rank(world);
    if (W > 4 || (W & (W - 1))) {
        fprintf(stderr, "mpi_exchange: run with 1, 2 or 4 ranks\n");
        return 2;
    }
    Suite *s = suite_create("mpi_exchange");
    TCase *tc = tcase_create("exchange");
    tcase_set_timeout(tc, 300);
    tcase_add_loop_test(tc, test_ep_bits, 0, 2 * NVARIANTS);
    tcase_add_test(tc, test_ep_refusals);
    suite_add_tcase(s, tc);
    SRunner *sr = srunner_create(s);
    srunner_set_fork_status(sr, CK_NOFORK); /* Open MPI: no fork() after MPI_Init */
    srunner_run_all(sr, me == 0 ? CK_NORMAL : CK_SILENT);
    const int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    if (failed)
        fprintf(stderr, "mpi_exchange: rank %d of %d: %d test(s) failed\n", me, W, failed);
    moe_comm_free(world);
    moe_comm_finalize();
    return failed ? EXIT_FAILURE : EXIT_SUCCESS;
}
