/* cmoe train over ranks and groups (train_dist.h). */
#define _POSIX_C_SOURCE 200809L
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "dist/dist_io.h"
#include "ref/ref.h"
#include "run.h"
#include "train_dist.h"

int cli_dist_option(const char *name, const char *arg, moe_dist_options *o, int64_t *groups, char *err, size_t n)
{
    int64_t v = 0;
    const int num = arg && cli_parse_i64(arg, 1, INT32_MAX, &v);
    if (!strcmp(name, "zero")) {
        o->zero = 1;
        return 0;
    }
    if (!strcmp(name, "a2a")) {
        if (strcmp(arg, "flat") && strcmp(arg, "hier")) {
            snprintf(err, n, "--a2a: '%s' is not flat or hier", arg);
            return 1;
        }
        o->hier = !strcmp(arg, "hier");
        return 0;
    }
    if (!strcmp(name, "a2a-chunks") && !strcmp(arg, "auto")) {
        o->chunks = 0;
        return 0;
    }
    const int64_t hi = !strcmp(name, "a2a-chunks") ? 64 : !strcmp(name, "a2a-max-rows") ? INT32_MAX : 1 << 20;
    if (!num || v > hi) {
        snprintf(err, n, "--%s: '%s' is not an integer in [1, %lld]%s", name, arg, (long long)hi,
                 !strcmp(name, "a2a-chunks") ? " or auto" : "");
        return 1;
    }
    if (!strcmp(name, "ep"))
        o->ep = v;
    else if (!strcmp(name, "groups"))
        *groups = v;
    else if (!strcmp(name, "ranks-per-node"))
        o->ranks_per_node = v;
    else if (!strcmp(name, "a2a-chunks"))
        o->chunks = v;
    else
        o->max_rows = v;
    return 0;
}

moe_status cli_dist_init(cli_dist *c)
{
    moe_status s = moe_comm_world(&c->world);
    if (s)
        return s;
    c->rank = moe_comm_rank(c->world);
    c->size = moe_comm_size(c->world);
    if (c->rank != 0 && !freopen("/dev/null", "w", stdout))
        return moe_error(MOE_ERR_IO, "rank %d: cannot silence stdout", c->rank);
    return MOE_OK;
}

void cli_dist_free(cli_dist *c)
{
    moe_gtrain_free(c->g);
    moe_dist_free(c->d);
    c->g = NULL;
    c->d = NULL;
}

void cli_dist_finish(cli_dist *c)
{
    cli_dist_free(c);
    fflush(stdout);
    fflush(stderr);
    if (c->world && c->size > 1) /* no rank leaves before every rank has spoken */
        moe_comm_barrier(c->world, 10.0, "the end of the job");
    moe_comm_free(c->world);
    c->world = NULL;
    moe_comm_finalize();
}

int cli_dist_active(const cli_dist *c, int64_t groups)
{
    return c->size > 1 || groups > 1;
}

const char *cli_dist_who(const cli_dist *c, const char *why, char *buf, size_t n)
{
    if (c->rank == 0 || !strncmp(why, "rank ", 5))
        snprintf(buf, n, "%s", why);
    else
        snprintf(buf, n, "rank %d: %s", c->rank, why);
    return buf;
}

void cli_dist_abort(cli_dist *c, const char *why)
{
    if (strncmp(why, "rank ", 5)) /* the aborting rank is named, rank 0 too */
        fprintf(stderr, "cmoe train: rank %d: %s\n", c->rank, why);
    else
        fprintf(stderr, "cmoe train: %s\n", why);
    moe_comm_abort(c->world, 1);
}

moe_status cli_dist_all_ok(cli_dist *c, moe_status s, const char *what)
{
    return c->size > 1 ? moe_dist_all_ok(c->world, s, what) : s;
}

moe_status cli_dist_share(cli_dist *c, moe_status s, char *buf, size_t n, const char *what)
{
    if (c->size == 1)
        return s;
    int64_t st = s;
    char why[1024];
    snprintf(why, sizeof why, "%s", s ? moe_last_error() : "");
    moe_status b = moe_comm_bcast(c->world, &st, sizeof st, 0, what);
    if (!b && !st)
        b = moe_comm_bcast(c->world, buf, (int64_t)n, 0, what);
    if (b)
        return b;
    if (st)
        return c->rank == 0 ? moe_error(s, "%s", why) : moe_error((moe_status)st, "%s failed on rank 0", what);
    return MOE_OK;
}

int cli_dist_max(cli_dist *c, int v)
{
    int64_t x = v;
    if (c->size > 1 && moe_comm_allreduce_i64(c->world, &x, 1, MOE_COMM_MAX, "the agreement to stop"))
        return v;
    return (int)x;
}

moe_status cli_dist_agree(cli_dist *c, const moe_model_config *cfg, const moe_train_settings *t,
                          const moe_dataset *d)
{
    if (c->size == 1)
        return MOE_OK;
    char *cj = NULL, *tj = NULL, data[128], layout[256];
    /* the settings, less what may differ between nodes: paths (the data is compared by
     * what it is) and the thread count */
    moe_train_settings tt = *t;
    tt.data[0] = tt.model[0] = tt.init_from[0] = 0;
    tt.threads = 0;
    moe_status s = moe_model_config_to_json(cfg, 0, &cj);
    if (!s)
        s = moe_train_settings_to_json(&tt, NULL, NULL, &tj);
    if (!s) {
        /* the identity without its path: kind, size and checksum */
        const moe_data_identity *id = moe_dataset_identity(d);
        if (moe_dataset_kind(d) == MOE_DATA_SYNTH)
            snprintf(data, sizeof data, "%.120s", id->path);
        else
            snprintf(data, sizeof data, "%s %" PRIu64 " %08lx", id->kind, id->size, (unsigned long)id->crc32);
        snprintf(layout, sizeof layout, "ep %lld groups %lld a2a %s rpn %lld chunks %lld zero %d rows %lld",
                 (long long)c->o.ep, (long long)t->groups, c->o.hier ? "hier" : "flat", (long long)c->o.ranks_per_node,
                 (long long)c->o.chunks, c->o.zero, (long long)c->o.max_rows);
        const char *names[] = {"the model configuration", "the training settings", "the data (size and CRC-32)",
                               "the layout options (--ep, --groups, --a2a, --ranks-per-node, --a2a-chunks, --zero)",
                               "the cmoe version"};
        const char *texts[] = {cj, tj, data, layout, moe_version()};
        s = moe_dist_agree(c->world, 5, names, texts);
    }
    free(cj);
    free(tj);
    return s;
}

moe_status cli_dist_setup(cli_dist *c, const moe_model_config *cfg, moe_backend *b, const moe_train_settings *t,
                          moe_model **m, moe_optim **opt)
{
    moe_dist_options o = c->o;
    o.groups = t->groups;
    moe_status s = moe_dist_create(c->world, &o, cfg, t->batch, &c->d);
    if (s || (s = moe_model_create(cfg, b, c->d->ex, c->d->pass_batch, t->seq, m)) ||
        (s = moe_gtrain_create(c->d, *m, &t->oc, t->seq, t->accum, &c->g)))
        return s;
    *opt = moe_gtrain_optim(c->g);
    return MOE_OK;
}

static double mib(int64_t bytes)
{
    return (double)bytes / (1024.0 * 1024.0);
}

void cli_dist_describe(const cli_dist *c, FILE *out)
{
    char line[256];
    moe_dist_describe(c->d, line, sizeof line);
    moe_gtrain_memory mem;
    moe_gtrain_memory_of(c->g, &mem);
    fprintf(out, "  layout: %s\n  memory per rank: parameters %.1f MiB, gradients %.1f MiB, reduction trees %.1f MiB, "
            "optimizer state %.1f MiB (activations and the all-to-all's buffers apart)\n", line, mib(mem.params),
            mib(mem.grads), mib(mem.trees), mib(mem.optim));
}

void cli_dist_report(cli_dist *c, const moe_model *m, int64_t steps, double train_time, FILE *out)
{
    if (!c->d || !c->d->ex || steps < 1 || train_time <= 0)
        return;
    moe_ep_traffic t;
    moe_exchange_ep_traffic(c->d->ex, &t, 0);
    /* data parallelism instead: every rank holds every expert and all-reduces their
     * gradients, a ring moving 2(W-1)/W of them per rank per step */
    const moe_model_config *cfg = moe_model_config_of(m);
    const int64_t es = (int64_t)moe_dtype_size(moe_model_backend(m)->float_type);
    double expert = 0;
    for (int64_t l = 0; l < cfg->num_hidden_layers; l++)
        expert += (double)moe_model_layer_experts(cfg, l) * (double)cfg->hidden_size *
                  (double)cfg->moe_intermediate_size * (moe_act_is_glu(cfg->moe.act) ? 3 : 2);
    const double W = c->size, dp = 2.0 * (W - 1) / W * expert * (double)es;
    fprintf(out, "  all-to-all: %.2f MB sent per rank per step (%.0f%% of the step time in the exchange); data "
            "parallelism would all-reduce %.2f MB of expert gradients per rank per step instead\n",
            (double)t.bytes_sent / (double)steps / 1e6, 100.0 * t.seconds / train_time, dp / 1e6);
}

typedef struct {
    const char *dir;
    const moe_model *m;
    const char *train_json;
    int64_t step;
    moe_status before;
} weights_writer;

static moe_status write_weights(void *wctx, moe_ckpt_get_fn get, void *gctx)
{
    weights_writer *w = wctx;
    return cli_run_save_with(w->dir, w->m, get, gctx, w->train_json, w->step);
}

moe_status cli_dist_save_weights(cli_dist *c, const char *dir, moe_model *m, const char *train_json, int64_t step)
{
    weights_writer w = {dir, m, train_json, step, MOE_OK};
    return moe_dist_write(c->d, m, NULL, write_weights, &w);
}

typedef struct {
    const char *path;
    const moe_model *m;
    const moe_ckpt_state *st;
    moe_status before;
    char why[1024];
} ckpt_writer;

static moe_status write_ckpt(void *wctx, moe_ckpt_get_fn get, void *gctx)
{
    ckpt_writer *w = wctx;
    if (w->before) /* what failed on rank 0 before the save (the metrics' fsync) */
        return moe_error(w->before, "%s", w->why);
    return moe_ckpt_save_with(w->path, w->m, get, gctx, w->st);
}

moe_status cli_dist_save_ckpt(cli_dist *c, const char *path, moe_model *m, moe_optim *o, const moe_ckpt_state *st,
                              moe_status before)
{
    ckpt_writer w = {path, m, st, before, ""};
    if (before)
        snprintf(w.why, sizeof w.why, "%s", moe_last_error());
    return moe_dist_write(c->d, m, o, write_ckpt, &w);
}
