/* Whole tensors gathered from shards and ZeRO parts, written by rank 0 (dist_io.h). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "dist/dist_io.h"

typedef struct {
    moe_dist *d;
    moe_model *m;
    moe_optim *o;
    int next;          /* parameters gathered so far */
    double *p, *mm, *vv; /* [biggest whole tensor] */
    double *shard;     /* [biggest shard] */
} gather_ctx;

/* The shard x [numel] of every rank of the expert-parallel group, whole into out. */
static moe_status gather_shards(gather_ctx *g, const double *x, int64_t numel, double *out, const char *what)
{
    return moe_comm_allgather(g->d->ep, x, numel * 8, out, what);
}

/* The optimizer's state of a non-expert parameter — its weights as stepped (the fp32
 * master copy of bf16 parameters) and moments — whole on rank 0: under ZeRO-1 every
 * rank's part [lo, hi) goes there. */
static moe_status gather_parts(gather_ctx *g, int i, double *p, double *mm, double *vv)
{
    moe_dist *d = g->d;
    const int64_t numel = moe_model_param(g->m, i)->numel;
    moe_status s = moe_optim_get_weights(g->o, i, p);
    if (!s)
        s = moe_optim_get_moments(g->o, i, mm, vv);
    if (s || d->size == 1 || !d->o.zero) /* without ZeRO every rank holds them whole */
        return s;
    /* this rank's part: the elements get_moments wrote (the partition is contiguous) */
    int64_t part[2] = {0, 0};
    moe_optim_part(g->o, i, &part[0], &part[1]);
    if (d->rank != 0) {
        if ((s = moe_comm_send(d->world, part, sizeof part, 0, "ZeRO-1's gather of moments")) || part[1] <= part[0])
            return s;
        for (int k = 0; k < 3 && !s; k++)
            s = moe_comm_send(d->world, (k == 0 ? p : k == 1 ? mm : vv) + part[0], (part[1] - part[0]) * 8, 0,
                              "ZeRO-1's gather of optimizer state");
        return s;
    }
    for (int r = 1; r < d->size && !s; r++) {
        int64_t q[2];
        if ((s = moe_comm_recv(d->world, q, sizeof q, r, "ZeRO-1's gather of moments")))
            break;
        if (q[0] < 0 || q[1] > numel || q[1] < q[0])
            return moe_error(MOE_ERR_MPI, "rank %d sent a part [%lld, %lld) of a parameter of %lld", r,
                             (long long)q[0], (long long)q[1], (long long)numel);
        for (int k = 0; k < 3 && q[1] > q[0] && !s; k++)
            s = moe_comm_recv(d->world, (k == 0 ? p : k == 1 ? mm : vv) + q[0], (q[1] - q[0]) * 8, r,
                              "ZeRO-1's gather of optimizer state");
    }
    return s;
}

/* Parameter i whole (and its moments when asked), on rank 0; collective. */
static moe_status get_whole(void *ctx, int i, double *p, double *mm, double *vv)
{
    gather_ctx *g = ctx;
    const moe_param_info *pi = moe_model_param(g->m, i);
    const int moments = mm && vv && g->o;
    moe_status s;
    g->next = i + 1;
    if (pi->shards > 1) { /* experts: not partitioned by ZeRO, each rank holds its shard's state */
        if ((s = moments ? moe_optim_get_weights(g->o, i, g->shard) : moe_model_get_param(g->m, i, g->shard)) ||
            (s = gather_shards(g, g->shard, pi->numel, p, "the gather of expert shards")))
            return s;
        if (!moments)
            return MOE_OK;
        if ((s = moe_optim_get_moments(g->o, i, g->shard, NULL)) ||
            (s = gather_shards(g, g->shard, pi->numel, mm, "the gather of expert moments")) ||
            (s = moe_optim_get_moments(g->o, i, NULL, g->shard)))
            return s;
        return gather_shards(g, g->shard, pi->numel, vv, "the gather of expert moments");
    }
    if (!moments) /* a weights file: the parameters as the model computes with them */
        return moe_model_get_param(g->m, i, p);
    return gather_parts(g, i, p, mm, vv);
}

moe_status moe_dist_write(moe_dist *d, moe_model *m, moe_optim *o, moe_dist_writer write, void *wctx)
{
    const int n = moe_model_n_params(m);
    int64_t big = 1, shard = 1;
    for (int i = 0; i < n; i++) {
        moe_param_info fi;
        moe_ckpt_full_info(moe_model_param(m, i), &fi);
        big = fi.numel > big ? fi.numel : big;
        shard = moe_model_param(m, i)->numel > shard ? moe_model_param(m, i)->numel : shard;
    }
    gather_ctx g = {d, m, o, 0, malloc((size_t)big * 8), malloc((size_t)big * 8), malloc((size_t)big * 8),
                    malloc((size_t)shard * 8)};
    moe_status s = g.p && g.mm && g.vv && g.shard ? MOE_OK : moe_error(MOE_ERR_NOMEM, "out of memory");
    if (!s && d->rank == 0)
        s = write(wctx, get_whole, &g);
    /* every gather is collective: the others take part in each; rank 0 finishes them when
     * its writer stopped early */
    moe_status g2 = MOE_OK;
    for (int i = g.next; !g2 && (g.p && g.mm && g.vv && g.shard) && i < n; i++)
        g2 = get_whole(&g, i, g.p, o ? g.mm : NULL, o ? g.vv : NULL);
    free(g.p);
    free(g.mm);
    free(g.vv);
    free(g.shard);
    if (g2)
        return g2;
    /* rank 0's outcome on every rank */
    int64_t st = d->rank == 0 ? s : 0;
    char why[1024];
    snprintf(why, sizeof why, "%s", s ? moe_last_error() : "");
    /* rank 0 writes (fsync, rename) while the others wait: a writer's time, not a hang's */
    const double t = moe_comm_timeout() > 600 ? moe_comm_timeout() : 600;
    moe_status b = moe_comm_bcast_within(d->world, &st, sizeof st, 0, t, "the outcome of a save on rank 0");
    if (b)
        return b;
    if (st && d->rank == 0)
        return moe_error((moe_status)st, "%s", why);
    return st ? moe_error((moe_status)st, "rank 0 could not write (see its message)") : MOE_OK;
}

typedef struct {
    const char *path;
    const moe_model *m;
    const moe_ckpt_state *st;
} ckpt_writer;

static moe_status write_ckpt(void *wctx, moe_ckpt_get_fn get, void *gctx)
{
    ckpt_writer *w = wctx;
    return moe_ckpt_save_with(w->path, w->m, get, gctx, w->st);
}

moe_status moe_dist_ckpt_save(moe_dist *d, const char *path, moe_model *m, moe_optim *o, const moe_ckpt_state *st)
{
    ckpt_writer w = {path, m, st};
    return moe_dist_write(d, m, o, write_ckpt, &w);
}
