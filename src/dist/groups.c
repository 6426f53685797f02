/* Training steps over groups, summed in fixed trees (groups.h). */
#define _POSIX_C_SOURCE 200809L
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "dist/groups.h"
#include "dist/tree.h"

typedef struct moe_gtrain moe_gtrain;

typedef struct {
    moe_gtrain *g;
    moe_layer *layer;
    moe_tree *t; /* its expert weight gradients over the group ids of the expert-parallel group */
} layer_tree;

struct moe_gtrain {
    moe_dist *d;
    moe_model *m;
    moe_backend *b;
    moe_optim *opt;
    int64_t S, accum, pass; /* the pass running (the hook's group ids) */
    moe_tree *ne, *sc;
    moe_piece *ne_pieces; /* the non-expert gradients, zeroed before each pass (the layers zero
                           * the experts' before each source) */
    int ne_np;
    moe_buf *xbuf;   /* the trees' sums cross ranks through these (one tree at a time) */
    void *xhost;
    int64_t xn;
    layer_tree *lt;
    int nlt;
    int32_t *in, *tg, *task;    /* [pass_batch, S] */
    int32_t *vin, *vtg, *vtask; /* [batch, S]: a whole validation batch */
    /* the gradient norm: a sum of squares per piece (a tensor, or one expert of one) */
    int64_t npieces, nexp;      /* pieces; expert tensors */
    int64_t *piece0;            /* [n params] first piece of each */
    moe_buf *pbuf;              /* [npieces] */
    double *ph, *xsend, *xrecv; /* [npieces]; [nexp·El]; [EP·nexp·El] */
    /* ZeRO-1 */
    int64_t *lo, *hi, *start;   /* [n params]: the part updated here; non-expert global index (-1: expert) */
    int64_t ne_total, block, zlo, zhi;
    double *zsend, *zrecv;
    /* --a2a-chunks auto */
    int tried;
    double times[3];
    char note[160];
    int note_new;
};

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* The owner of an expert shard took source src's weight gradients: leaf (group of src). */
static moe_status take_source(void *ctx, moe_layer *l, int64_t src)
{
    layer_tree *t = ctx;
    const moe_dist *d = t->g->d;
    return moe_tree_push(t->t, (d->dp_rank * d->EP + src) * d->passes + t->g->pass);
}

/* ---- the gradient norm ---------------------------------------------------------------- */

static moe_status sumsq(void *ctx, moe_tensor acc)
{
    moe_gtrain *g = ctx;
    moe_backend *b = g->b;
    const moe_dist *d = g->d;
    const int n = moe_model_n_params(g->m);
    moe_tensor slots = {g->pbuf, 0};
    b->fill(b, slots, 0.0, g->npieces);
    for (int i = 0; i < n; i++) {
        const moe_param_info *p = moe_model_param(g->m, i);
        moe_tensor gt;
        moe_model_param_tensors(g->m, i, NULL, &gt);
        if (!p->expert) {
            b->grad_sumsq(b, moe_tensor_at(slots, g->piece0[i]), gt, p->numel);
            continue;
        }
        const int64_t El = p->shape[0], per = p->numel / El;
        for (int64_t el = 0; el < El; el++) /* per expert: the same pieces whatever the shards */
            b->grad_sumsq(b, moe_tensor_at(slots, g->piece0[i] + p->shard * El + el), moe_tensor_at(gt, el * per), per);
    }
    if (d->EP > 1) { /* the other shards' pieces, exact copies */
        moe_status s = moe_download_f64(b, g->ph, slots, g->npieces);
        int64_t k = 0;
        for (int i = 0; !s && i < n; i++) {
            const moe_param_info *p = moe_model_param(g->m, i);
            for (int64_t el = 0; p->expert && el < p->shape[0]; el++)
                g->xsend[k++] = g->ph[g->piece0[i] + p->shard * p->shape[0] + el];
        }
        if (!s)
            s = moe_comm_allgather(d->ep, g->xsend, k * 8, g->xrecv, "the gradient norm's expert pieces");
        for (int64_t q = 0; !s && q < d->EP; q++) {
            int64_t j = q * k;
            for (int i = 0; i < n; i++) {
                const moe_param_info *p = moe_model_param(g->m, i);
                for (int64_t el = 0; p->expert && el < p->shape[0]; el++)
                    g->ph[g->piece0[i] + q * p->shape[0] + el] = g->xrecv[j++];
            }
        }
        if (s || (s = moe_upload_f64(b, slots, g->ph, g->npieces)))
            return s;
    }
    for (int64_t k = 0; k < g->npieces; k++) /* one chain in table order, on every rank */
        b->add(b, acc, moe_tensor_at(slots, k), 1);
    return MOE_OK;
}

/* ---- ZeRO-1: the parts updated here, and the parameters whole again ----------------------- */

static moe_status gather(void *ctx)
{
    moe_gtrain *g = ctx;
    moe_backend *b = g->b;
    const moe_dist *d = g->d;
    const int n = moe_model_n_params(g->m);
    moe_status s = MOE_OK;
    for (int i = 0; i < n && !s; i++)
        if (g->start[i] >= 0 && g->hi[i] > g->lo[i]) {
            moe_tensor p;
            moe_model_param_tensors(g->m, i, &p, NULL);
            s = moe_download_f64(b, g->zsend + g->start[i] + g->lo[i] - g->zlo, moe_tensor_at(p, g->lo[i]),
                                 g->hi[i] - g->lo[i]);
        }
    if (s || (s = moe_comm_allgather(d->world, g->zsend, g->block * 8, g->zrecv, "ZeRO-1's all-gather of parameters")))
        return s;
    for (int r = 0; r < d->size && !s; r++) {
        if (r == d->rank)
            continue;
        const int64_t rlo = g->ne_total * r / d->size, rhi = g->ne_total * (r + 1) / d->size;
        for (int i = 0; i < n && !s; i++) {
            const moe_param_info *p = moe_model_param(g->m, i);
            if (g->start[i] < 0)
                continue;
            const int64_t a = rlo > g->start[i] ? rlo : g->start[i];
            const int64_t e = rhi < g->start[i] + p->numel ? rhi : g->start[i] + p->numel;
            if (e <= a)
                continue;
            moe_tensor pt;
            moe_model_param_tensors(g->m, i, &pt, NULL);
            s = moe_upload_f64(b, moe_tensor_at(pt, a - g->start[i]), g->zrecv + r * g->block + (a - rlo), e - a);
        }
    }
    return s ? s : b->sync(b);
}

/* ---- create / free ------------------------------------------------------------------- */

void moe_gtrain_free(moe_gtrain *g)
{
    if (!g)
        return;
    moe_optim_free(g->opt);
    moe_tree_free(g->ne);
    moe_tree_free(g->sc);
    for (int i = 0; g->lt && i < g->nlt; i++) {
        moe_layer_set_source_hook(g->lt[i].layer, NULL, NULL);
        moe_tree_free(g->lt[i].t);
    }
    if (g->pbuf)
        g->b->free(g->b, g->pbuf);
    if (g->xbuf)
        g->b->free(g->b, g->xbuf);
    free(g->xhost);
    free(g->lt);
    free(g->ne_pieces);
    free(g->in);
    free(g->tg);
    free(g->task);
    free(g->vin);
    free(g->vtg);
    free(g->vtask);
    free(g->piece0);
    free(g->ph);
    free(g->xsend);
    free(g->xrecv);
    free(g->lo);
    free(g->hi);
    free(g->start);
    free(g->zsend);
    free(g->zrecv);
    free(g);
}

moe_optim *moe_gtrain_optim(moe_gtrain *g)
{
    return g->opt;
}

/* Leaves [base, base + count) arriving in `order`: the tree, its partial sums planned. */
static moe_status make_tree(moe_gtrain *g, const moe_piece *pieces, int np, int64_t base, int64_t count,
                            const int64_t *order, moe_tree **out)
{
    moe_status s = moe_tree_create(g->b, pieces, np, base, count, moe_tree_slots(order, count, base, count),
                                   g->accum > 1, out);
    if (!s && moe_tree_numel(*out) > g->xn)
        g->xn = moe_tree_numel(*out);
    return s;
}

static moe_status make_trees(moe_gtrain *g)
{
    moe_dist *d = g->d;
    moe_model *m = g->m;
    const int n = moe_model_n_params(m);
    const int64_t P = d->passes, cnt = d->EP * P;
    moe_piece *pc = calloc((size_t)n + 1, sizeof *pc);
    int64_t *order = calloc((size_t)cnt, sizeof *order);
    moe_status s = pc && order ? MOE_OK : moe_error(MOE_ERR_NOMEM, "out of memory");
    int np = 0;
    for (int i = 0; !s && i < n; i++)
        if (!moe_model_param(m, i)->expert) {
            moe_model_param_tensors(m, i, NULL, &pc[np].t);
            pc[np++].n = moe_model_param(m, i)->numel;
        }
    for (int64_t i = 0; i < P; i++)
        order[i] = d->rank * P + i;
    if (!s)
        s = make_tree(g, pc, np, d->rank * P, P, order, &g->ne);
    if (!s && !(g->ne_pieces = malloc((size_t)(np > 0 ? np : 1) * sizeof *pc)))
        s = moe_error(MOE_ERR_NOMEM, "out of memory");
    if (!s) {
        memcpy(g->ne_pieces, pc, (size_t)np * sizeof *pc);
        g->ne_np = np;
    }
    int64_t ns;
    moe_piece scal = {moe_model_scalars(m, MOE_SPAN_LAST, &ns), 0};
    scal.n = ns;
    if (!s)
        s = make_tree(g, &scal, 1, d->rank * P, P, order, &g->sc);
    /* the owner's leaves: pass i brings source s's group (dp·EP + s)·P + i */
    for (int64_t i = 0, k = 0; i < P; i++)
        for (int64_t src = 0; src < d->EP; src++)
            order[k++] = (d->dp_rank * d->EP + src) * P + i;
    const moe_model_config *c = moe_model_config_of(m);
    g->lt = calloc((size_t)c->num_hidden_layers + 1, sizeof *g->lt);
    if (!s && !g->lt)
        s = moe_error(MOE_ERR_NOMEM, "out of memory");
    for (int64_t l = 0; !s && l < c->num_hidden_layers; l++) {
        moe_layer *ly = moe_model_moe_layer(m, l);
        if (!ly)
            continue;
        const moe_arena *A = moe_layer_params(ly);
        np = 0;
        for (int v = 0; v < A->n; v++)
            if (!strncmp(A->views[v].name, "experts.", 8)) {
                moe_layer_param_tensors(ly, A->views[v].name, NULL, &pc[np].t);
                pc[np++].n = A->views[v].numel;
            }
        layer_tree *t = &g->lt[g->nlt++];
        t->g = g;
        t->layer = ly;
        if (!(s = make_tree(g, pc, np, d->dp_rank * cnt, cnt, order, &t->t)))
            moe_layer_set_source_hook(ly, take_source, t);
    }
    free(pc);
    free(order);
    return s;
}

/* The pieces of the norm, and ZeRO-1's parts. */
static moe_status plan_optim(moe_gtrain *g, moe_optim_dist *od)
{
    moe_dist *d = g->d;
    const int n = moe_model_n_params(g->m);
    g->piece0 = calloc((size_t)n + 1, sizeof *g->piece0);
    g->lo = calloc((size_t)n + 1, sizeof *g->lo);
    g->hi = calloc((size_t)n + 1, sizeof *g->hi);
    g->start = calloc((size_t)n + 1, sizeof *g->start);
    if (!g->piece0 || !g->lo || !g->hi || !g->start)
        return moe_error(MOE_ERR_NOMEM, "out of memory");
    int64_t k = 0, local = 0;
    for (int i = 0; i < n; i++) {
        const moe_param_info *p = moe_model_param(g->m, i);
        g->piece0[i] = k;
        k += p->expert ? p->shape[0] * p->shards : 1;
        if (p->expert) {
            g->nexp++;
            local += p->shape[0];
            g->start[i] = -1;
        } else {
            g->start[i] = g->ne_total;
            g->ne_total += p->numel;
        }
    }
    g->npieces = k;
    g->ph = calloc((size_t)k, sizeof *g->ph);
    g->xsend = calloc((size_t)local + 1, sizeof *g->xsend);
    g->xrecv = calloc((size_t)(local * d->EP) + 1, sizeof *g->xrecv);
    if (!g->ph || !g->xsend || !g->xrecv)
        return moe_error(MOE_ERR_NOMEM, "out of memory");
    moe_backend *b = g->b;
    moe_status s = b->alloc(b, b->float_type == MOE_F64 ? MOE_F64 : MOE_F32, k, &g->pbuf);
    if (s)
        return s;
    *od = (moe_optim_dist){.sumsq = sumsq, .ctx = g};
    if (!d->o.zero)
        return MOE_OK;
    g->zlo = g->ne_total * d->rank / d->size;
    g->zhi = g->ne_total * (d->rank + 1) / d->size;
    g->block = (g->ne_total + d->size - 1) / d->size;
    for (int i = 0; i < n; i++) {
        const moe_param_info *p = moe_model_param(g->m, i);
        if (g->start[i] < 0) {
            g->hi[i] = p->numel;
            continue;
        }
        const int64_t a = g->zlo - g->start[i], e = g->zhi - g->start[i];
        g->lo[i] = a < 0 ? 0 : a > p->numel ? p->numel : a;
        g->hi[i] = e < 0 ? 0 : e > p->numel ? p->numel : e;
        if (g->hi[i] < g->lo[i])
            g->hi[i] = g->lo[i];
    }
    g->zsend = calloc((size_t)g->block + 1, sizeof *g->zsend);
    g->zrecv = calloc((size_t)(g->block * d->size) + 1, sizeof *g->zrecv);
    if (!g->zsend || !g->zrecv)
        return moe_error(MOE_ERR_NOMEM, "out of memory");
    od->lo = g->lo;
    od->hi = g->hi;
    od->gather = gather;
    return MOE_OK;
}

moe_status moe_gtrain_create(moe_dist *d, moe_model *m, const moe_optim_config *oc, int64_t S, int64_t accum,
                             moe_gtrain **out)
{
    *out = NULL;
    moe_gtrain *g = calloc(1, sizeof *g);
    if (!g)
        return moe_error(MOE_ERR_NOMEM, "out of memory");
    g->d = d;
    g->m = m;
    g->b = moe_model_backend(m);
    g->S = S;
    g->accum = accum < 1 ? 1 : accum;
    const size_t pn = (size_t)(d->pass_batch * S), vn = (size_t)(d->batch * S);
    g->in = malloc(pn * sizeof *g->in);
    g->tg = malloc(pn * sizeof *g->tg);
    g->task = malloc(pn * sizeof *g->task);
    g->vin = malloc(vn * sizeof *g->vin);
    g->vtg = malloc(vn * sizeof *g->vtg);
    g->vtask = malloc(vn * sizeof *g->vtask);
    moe_optim_dist od;
    moe_status s = g->in && g->tg && g->task && g->vin && g->vtg && g->vtask
                       ? MOE_OK
                       : moe_error(MOE_ERR_NOMEM, "out of memory for batches of %lld x %lld",
                                   (long long)d->batch, (long long)S);
    if (!s)
        s = make_trees(g);
    /* across ranks: one receive buffer and one host staging for every tree, as large as the largest */
    if (!s && d->size > 1 && !(s = g->b->alloc(g->b, g->b->float_type, g->xn, &g->xbuf)) &&
        !(g->xhost = malloc((size_t)g->xn * moe_dtype_size(g->b->float_type))))
        s = moe_error(MOE_ERR_NOMEM, "out of memory for %lld elements", (long long)g->xn);
    if (!s)
        s = plan_optim(g, &od);
    if (!s)
        s = moe_optim_create_dist(m, oc, &od, &g->opt);
    if (s) {
        moe_gtrain_free(g);
        return s;
    }
    *out = g;
    return MOE_OK;
}

/* ---- a step ------------------------------------------------------------------------- */

static moe_status micro_batch(moe_gtrain *g, const moe_dataset *data, uint64_t seed, int64_t step, int64_t micro)
{
    moe_dist *d = g->d;
    moe_model *m = g->m;
    const int64_t Bg = d->pass_batch, S = g->S;
    moe_status s;
    moe_tree_reset(g->ne);
    moe_tree_reset(g->sc);
    for (int i = 0; i < g->nlt; i++)
        moe_tree_reset(g->lt[i].t);
    for (g->pass = 0; g->pass < d->passes; g->pass++) {
        const int64_t gid = moe_dist_group(d, g->pass);
        const moe_key key = {(uint64_t)step, (uint32_t)micro, (uint64_t)(gid * Bg * S)};
        for (int i = 0; i < g->ne_np; i++) /* a pass's own gradient (backward adds) */
            g->b->fill(g->b, g->ne_pieces[i].t, 0.0, g->ne_pieces[i].n);
        if ((s = moe_dataset_batch_rows(data, seed, step, micro, gid * Bg, Bg, S, g->in, g->tg, g->task)) ||
            (s = moe_model_forward(m, g->in, g->tg, g->task, Bg, S, key, 1, NULL)) || (s = moe_model_backward(m)) ||
            (s = moe_tree_push(g->ne, gid)) || (s = moe_tree_push(g->sc, gid)))
            return s;
    }
    const int first = micro == 0;
    const moe_tensor x = {g->xbuf, 0};
    if ((s = moe_tree_finish(g->ne, d->world, first, x, g->xhost, "the non-expert gradients' tree across ranks")) ||
        (s = moe_tree_finish(g->sc, d->world, first, x, g->xhost, "the step's scalars' tree across ranks")))
        return s;
    for (int i = 0; i < g->nlt; i++)
        if ((s = moe_tree_finish(g->lt[i].t, d->dp, first, x, g->xhost, "the expert gradients' tree across replicas")))
            return s;
    return MOE_OK;
}

/* --a2a-chunks auto: steps 0, 1, 2 of this process try D = 1, 2, 4; the fastest (the
 * slowest rank's time of each) is kept. D changes no bit. */
static moe_status auto_chunks(moe_gtrain *g, double t)
{
    moe_dist *d = g->d;
    int64_t us = (int64_t)(t * 1e6);
    moe_status s = moe_comm_allreduce_i64(d->world, &us, 1, MOE_COMM_MAX, "--a2a-chunks auto's timing");
    if (s)
        return s;
    g->times[g->tried++] = (double)us * 1e-6;
    if (g->tried < 3)
        return moe_exchange_ep_set_chunks(d->ex, (int64_t)1 << g->tried);
    int best = 0;
    for (int k = 1; k < 3; k++)
        if (g->times[k] < g->times[best])
            best = k;
    snprintf(g->note, sizeof g->note, "--a2a-chunks auto: %d chunk%s (steps took %.3f s with 1, %.3f s with 2, "
             "%.3f s with 4)", 1 << best, best ? "s" : "", g->times[0], g->times[1], g->times[2]);
    g->note_new = 1;
    return moe_exchange_ep_set_chunks(d->ex, (int64_t)1 << best);
}

moe_status moe_gtrain_step(moe_gtrain *g, const moe_dataset *data, uint64_t seed, int64_t step, int64_t accum,
                           moe_optim_result *r)
{
    moe_dist *d = g->d;
    moe_model *m = g->m;
    moe_backend *b = g->b;
    const double t0 = now();
    moe_status s;
    if (accum != g->accum)
        return moe_error(MOE_ERR_ARG, "groups: a step of %lld micro-batches, the trainer was made for %lld",
                         (long long)accum, (long long)g->accum);
    for (int64_t micro = 0; micro < accum; micro++)
        if ((s = micro_batch(g, data, seed, step, micro)))
            return s;
    /* the sums become the model's: gradients, then the scalars (last micro-batch and step) */
    moe_tree_scatter(g->ne);
    for (int i = 0; i < g->nlt; i++)
        moe_tree_scatter(g->lt[i].t);
    int64_t ns;
    const moe_tensor last = moe_model_scalars(m, MOE_SPAN_LAST, &ns), sums = moe_model_scalars(m, MOE_SPAN_STEP, &ns);
    b->copy(b, last, moe_tree_root(g->sc), ns);
    b->copy(b, sums, moe_tree_acc(g->sc), ns);
    moe_model_scalars_to_layers(m); /* the bias update reads the last micro-batch's counts over all groups */
    if ((s = moe_optim_step(g->opt, 1.0 / (double)(accum * d->G), r)))
        return s;
    if (d->ex && d->auto_chunks && g->tried < 3)
        return auto_chunks(g, now() - t0);
    return MOE_OK;
}

const char *moe_gtrain_note(moe_gtrain *g)
{
    if (!g->note_new)
        return NULL;
    g->note_new = 0;
    return g->note;
}

/* ---- validation ------------------------------------------------------------------------ */

moe_status moe_gtrain_val_loss(moe_gtrain *g, const moe_dataset *data, int64_t max_batches, double *loss,
                               int64_t *n_tokens)
{
    moe_dist *d = g->d;
    const int64_t Bg = d->pass_batch, S = g->S, P = d->passes;
    double *v = calloc((size_t)(2 * P), sizeof *v), sum = 0;
    if (!v)
        return moe_error(MOE_ERR_NOMEM, "out of memory");
    int64_t total = 0;
    moe_val_iter it;
    moe_val_iter_init(&it);
    moe_status s = MOE_OK;
    for (int64_t bi = 0; !s && (max_batches <= 0 || bi < max_batches); bi++) {
        int64_t n;
        /* every rank walks the whole batch (the iterator is sequential) and runs its groups */
        if ((s = moe_dataset_val_next(data, &it, d->batch, S, g->vin, g->vtg, g->vtask, &n)) || n == 0)
            break;
        for (int64_t i = 0; !s && i < P; i++) {
            const int64_t gid = moe_dist_group(d, i), at = gid * Bg * S;
            const moe_key key = {0, 0, (uint64_t)at};
            moe_model_losses L;
            if (!(s = moe_model_forward(g->m, g->vin + at, g->vtg + at, g->vtask + at, Bg, S, key, 0, &L))) {
                v[i] = L.n_targets ? L.ce * (double)L.n_targets : 0.0;
                v[P + i] = (double)L.n_targets;
            }
        }
        double r[2] = {moe_tree_sum_host(v, P), moe_tree_sum_host(v + P, P)};
        if (!s && !(s = moe_tree_across_host(d->world, r, 2, "the validation loss's tree across ranks"))) {
            sum += r[0];
            total += (int64_t)r[1];
        }
    }
    free(v);
    *loss = total ? sum / (double)total : NAN;
    *n_tokens = total;
    return s;
}

void moe_gtrain_memory_of(const moe_gtrain *g, moe_gtrain_memory *mem)
{
    const int64_t es = (int64_t)moe_dtype_size(g->b->float_type);
    const moe_backend *b = g->b;
    memset(mem, 0, sizeof *mem);
    mem->params = moe_model_numel(g->m) * es;
    mem->grads = mem->params;
    mem->trees = moe_tree_bytes(g->ne) + moe_tree_bytes(g->sc) + (g->xbuf ? 2 * g->xn * es : 0);
    for (int i = 0; i < g->nlt; i++)
        mem->trees += moe_tree_bytes(g->lt[i].t);
    mem->optim = 2 * moe_optim_numel(g->opt) * (b->float_type == MOE_F64 ? 8 : 4);
}
