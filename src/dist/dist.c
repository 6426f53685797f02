/* The layout of a job over ranks, its checks and the start-up agreement (dist.h). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <zlib.h>

#include "dist/dist.h"

void moe_dist_options_default(moe_dist_options *o)
{
    memset(o, 0, sizeof *o);
    o->chunks = 1;
}

static int pow2(int64_t v)
{
    return v > 0 && (v & (v - 1)) == 0;
}

/* "1, 2, 4" — the divisors of n (at most a few), for the messages */
static void divisors(int64_t n, char *buf, size_t len)
{
    size_t at = 0;
    buf[0] = 0;
    for (int64_t k = 1; k <= n && at + 24 < len; k++)
        if (n % k == 0)
            at += (size_t)snprintf(buf + at, len - at, "%s%lld", at ? ", " : "", (long long)k);
}

moe_status moe_dist_check(const moe_dist_options *o, int W, const moe_model_config *c, int64_t batch, int64_t *EP,
                          int64_t *G)
{
    char opts[256];
    *EP = o->ep > 0 ? o->ep : W;
    *G = o->groups > 0 ? o->groups : W;
    if (!pow2(W))
        return moe_error(MOE_ERR_ARG, "%d ranks: groups (--groups) are a power of two that the ranks divide, so run "
                         "1, 2, 4, 8, ... ranks", W);
    if (W % *EP) {
        divisors(W, opts, sizeof opts);
        return moe_error(MOE_ERR_ARG, "--ep %lld does not divide the %d rank%s (world = EP x DP): use one of %s%s",
                         (long long)*EP, W, W == 1 ? "" : "s", opts,
                         W == 1 ? " (cmoe runs one process unless started by mpirun or srun)" : "");
    }
    for (int64_t l = 0; l < c->num_hidden_layers; l++) {
        const int64_t E = moe_model_layer_experts(c, l);
        if (E > 0 && E % *EP) {
            int64_t g = E;
            for (int64_t a = W; a;) { /* gcd(E, W): what --ep may be here */
                int64_t t = g % a;
                g = a;
                a = t;
            }
            divisors(g, opts, sizeof opts);
            return moe_error(MOE_ERR_ARG, "--ep %lld does not divide the %lld experts of layer %lld: use one of %s "
                             "(divisors of both the experts and the %d ranks)", (long long)*EP, (long long)E,
                             (long long)l, opts, W);
        }
    }
    if (!pow2(*G) || *G % W)
        return moe_error(MOE_ERR_ARG, "--groups %lld must be a power of two and a multiple of the %d ranks: use %d, "
                         "%d, %d, ...", (long long)*G, W, W, 2 * W, 4 * W);
    if (batch % *G) {
        int64_t fit = 1;
        while (fit * 2 <= batch && batch % (fit * 2) == 0 && fit < *G)
            fit *= 2;
        return moe_error(MOE_ERR_ARG, "--batch %lld does not split into %lld groups of whole sequences: use a batch "
                         "that is a multiple of %lld (e.g. %lld), or fewer groups%s", (long long)batch, (long long)*G,
                         (long long)*G, (long long)*G * ((batch + *G - 1) / *G),
                         fit >= W ? "" : " (a power of two that the ranks divide)");
    }
    if (o->chunks < 0 || o->chunks > 64)
        return moe_error(MOE_ERR_ARG, "--a2a-chunks %lld is not in [1, 64] (or auto)", (long long)o->chunks);
    return MOE_OK;
}

moe_status moe_dist_create(moe_comm *world, const moe_dist_options *o, const moe_model_config *c, int64_t batch,
                           moe_dist **out)
{
    *out = NULL;
    const int W = moe_comm_size(world), r = moe_comm_rank(world);
    int64_t EP, G;
    moe_status s = moe_dist_check(o, W, c, batch, &EP, &G);
    if (s)
        return s;
    moe_dist *d = calloc(1, sizeof *d);
    if (!d)
        return moe_error(MOE_ERR_NOMEM, "out of memory");
    d->o = *o;
    d->world = world;
    d->rank = r;
    d->size = W;
    d->EP = EP;
    d->DP = W / EP;
    d->ep_rank = r % EP;
    d->dp_rank = r / EP;
    d->G = G;
    d->passes = G / W;
    d->batch = batch;
    d->pass_batch = batch / G;
    d->auto_chunks = o->chunks == 0;
    if ((s = moe_comm_split(world, (int)d->dp_rank, r, &d->ep)) ||
        (s = moe_comm_split(world, (int)d->ep_rank, r, &d->dp))) {
        moe_dist_free(d);
        return s;
    }
    if (EP > 1) {
        moe_ep_options eo;
        moe_ep_options_default(&eo);
        eo.chunks = d->auto_chunks ? 1 : o->chunks;
        eo.max_chunks = d->auto_chunks ? 4 : o->chunks;
        eo.hier = o->hier;
        eo.ranks_per_node = o->ranks_per_node;
        eo.max_rows = o->max_rows;
        if ((s = moe_exchange_ep_create(d->ep, &eo, &d->ex))) {
            moe_dist_free(d);
            return s;
        }
    }
    *out = d;
    return MOE_OK;
}

void moe_dist_free(moe_dist *d)
{
    if (!d)
        return;
    moe_exchange_free(d->ex);
    moe_comm_free(d->ep);
    moe_comm_free(d->dp);
    free(d);
}

int64_t moe_dist_group(const moe_dist *d, int64_t pass)
{
    return d->rank * d->passes + pass;
}

void moe_dist_describe(const moe_dist *d, char *buf, size_t n)
{
    char a2a[96] = "no all-to-all (EP 1)";
    if (d->ex) {
        const int64_t L = moe_exchange_ep_ranks_per_node(d->ex);
        char chunks[32];
        if (d->auto_chunks)
            snprintf(chunks, sizeof chunks, "chunks auto");
        else
            snprintf(chunks, sizeof chunks, "%lld chunk%s", (long long)d->ex->chunks, d->ex->chunks == 1 ? "" : "s");
        if (L)
            snprintf(a2a, sizeof a2a, "all-to-all hier (%lld ranks per node), %s", (long long)L, chunks);
        else
            snprintf(a2a, sizeof a2a, "all-to-all flat, %s", chunks);
    }
    snprintf(buf, n, "%d rank%s = EP %lld x DP %lld, %lld group%s of %lld sequence%s (%lld pass%s per rank), %s%s",
             d->size, d->size == 1 ? "" : "s", (long long)d->EP, (long long)d->DP, (long long)d->G,
             d->G == 1 ? "" : "s", (long long)d->pass_batch, d->pass_batch == 1 ? "" : "s", (long long)d->passes,
             d->passes == 1 ? "" : "es", a2a, d->o.zero ? ", ZeRO-1" : "");
}

moe_status moe_dist_agree(moe_comm *world, int n, const char *const *names, const char *const *texts)
{
    const int W = moe_comm_size(world);
    if (W == 1)
        return MOE_OK;
    uint32_t *mine = calloc((size_t)n, sizeof *mine), *all = calloc((size_t)(n * W), sizeof *all);
    if (!mine || !all) {
        free(mine);
        free(all);
        return moe_error(MOE_ERR_NOMEM, "out of memory");
    }
    for (int i = 0; i < n; i++)
        mine[i] = (uint32_t)crc32(0L, (const Bytef *)texts[i], (uInt)strlen(texts[i]));
    moe_status s = moe_comm_allgather(world, mine, (int64_t)n * 4, all, "the start-up comparison of settings");
    for (int i = 0; !s && i < n; i++) {
        char ranks[128] = "";
        size_t at = 0;
        int bad = 0;
        for (int r = 1; r < W; r++)
            if (all[r * n + i] != all[i]) {
                if (at + 16 < sizeof ranks)
                    at += (size_t)snprintf(ranks + at, sizeof ranks - at, "%s%d", bad ? ", " : "", r);
                bad++;
            }
        if (bad)
            s = moe_error(MOE_ERR_ARG, "the ranks disagree on %s: rank%s %s differ%s from rank 0 (CRC-32 %08lx here, "
                          "%08lx on rank 0); every rank must run the same command on the same files",
                          names[i], bad == 1 ? "" : "s", ranks, bad == 1 ? "s" : "",
                          (unsigned long)mine[i], (unsigned long)all[i]);
    }
    free(mine);
    free(all);
    return s;
}

moe_status moe_dist_all_ok(moe_comm *world, moe_status mine, const char *what)
{
    const int W = moe_comm_size(world);
    if (W == 1)
        return mine;
    int64_t *all = calloc((size_t)W, sizeof *all);
    if (!all)
        return moe_error(MOE_ERR_NOMEM, "out of memory");
    int64_t v = mine;
    char why[1024];
    snprintf(why, sizeof why, "%s", mine ? moe_last_error() : "");
    moe_status s = moe_comm_allgather(world, &v, 8, all, what);
    if (!s) {
        char ranks[160] = "";
        size_t at = 0;
        int bad = 0;
        moe_status first = MOE_OK;
        for (int r = 0; r < W; r++)
            if (all[r]) {
                if (!first)
                    first = (moe_status)all[r];
                if (at + 16 < sizeof ranks)
                    at += (size_t)snprintf(ranks + at, sizeof ranks - at, "%s%d", bad ? ", " : "", r);
                bad++;
            }
        if (bad && mine)
            s = moe_error(mine, "%s", why); /* this rank's own reason */
        else if (bad)
            s = moe_error(first, "%s failed on rank%s %s (see %s message%s)", what, bad == 1 ? "" : "s", ranks,
                          bad == 1 ? "its" : "their", bad == 1 ? "" : "s");
    }
    free(all);
    return s;
}
