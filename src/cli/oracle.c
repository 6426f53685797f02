/*
 * cmoe oracle: runs the reference MoE layer (double precision) on tensors from a
 * safetensors file and writes everything a user needs to check their own MoE against
 * it: the output, every aux loss, the routing plan and every gradient.
 */
#define _POSIX_C_SOURCE 200809L
#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cmoe.h"
#include "core/durable.h"
#include "commands.h"
#include "io/safetensors.h"

void help_oracle(void)
{
    printf("Usage: cmoe oracle --config LAYER.json --inputs IN.safetensors --out OUT.safetensors\n"
           "                   [--step N] [--micro M] [--token0 K] [--eval] [--allow-nonfinite]\n"
           "       cmoe oracle --example-inputs IN.safetensors --config LAYER.json --tokens T [--seed S]\n"
           "\n"
           "Runs the reference MoE layer (plain C, double precision) on the tensors of IN and\n"
           "writes OUT: y, the aux losses, the routing plan and, when IN holds dy, the gradient\n"
           "of every input and parameter. Check your own MoE layer against it.\n"
           "\n"
           "  --config FILE          the layer configuration (JSON; keys in README.md)\n"
           "  --inputs FILE          x [T, hidden_size] (F32/F64), optional dy [T, hidden_size],\n"
           "                         token_ids [T] and task_ids [T] (I32/I64), and every parameter\n"
           "                         of the layer by name with its exact shape\n"
           "  --out FILE             where to write the results (safetensors, F64 unless integer)\n"
           "  --step N               step number keying the random draws (default 0)\n"
           "  --micro M              micro-batch keying them (gradient accumulation; default 0)\n"
           "  --token0 K             global index of the first token, as a rank holding tokens\n"
           "                         K.. of a batch sees it (default 0)\n"
           "  --eval                 evaluation mode: no router jitter, no gate noise\n"
           "  --allow-nonfinite      run on NaN or Inf in x, dy or a parameter (refused otherwise,\n"
           "                         naming the tensor and the first bad element): for checking\n"
           "                         how a layer propagates them\n"
           "  --example-inputs FILE  write a valid inputs file instead: random x, dy, token_ids\n"
           "                         (and task_ids with num_tasks), initialised parameters\n"
           "  --tokens T             tokens in the example inputs\n"
           "  --seed S               seed of the example x, dy and ids (default: the config's seed;\n"
           "                         the parameters always use the config's seed)\n"
           "  --help                 this text\n"
           "\n"
           "Exit status: 0 ok, 1 failure (bad config or file; the reason on stderr), 2 usage.\n");
}

static int usage(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    fputs("cmoe oracle: ", stderr);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fputs("\nTry 'cmoe help oracle'.\n", stderr);
    return EXIT_USAGE;
}

static int failed(void)
{
    fprintf(stderr, "cmoe oracle: %s\n", moe_last_error());
    return EXIT_FAIL;
}

/* Decimal digits only: strtoull alone would accept "-1", " 7" and "0x10". */
static int parse_u64(const char *s, uint64_t max, uint64_t *out)
{
    if (!*s)
        return 0;
    for (const char *p = s; *p; p++)
        if (*p < '0' || *p > '9')
            return 0;
    errno = 0;
    unsigned long long v = strtoull(s, NULL, 10);
    if (errno || v > max)
        return 0;
    *out = v;
    return 1;
}

typedef struct {
    const char *config, *inputs, *out, *example;
    uint64_t step, micro, token0, seed, tokens;
    int eval, have_step, have_seed, have_tokens, allow_nonfinite;
} oracle_opts;

/* ---- running the layer ------------------------------------------------------ */

typedef struct {
    moe_layer_config cfg;
    moe_st_file *in;
    moe_ref_layer *layer;
    int64_t T;
    double *x, *dy, *y, *dx; /* [T, d] */
    int32_t *token_ids, *task_ids; /* [T] or NULL */
} oracle_run;

static void run_free(oracle_run *r)
{
    moe_st_free(r->in);
    moe_ref_layer_free(r->layer);
    free(r->x);
    free(r->dy);
    free(r->y);
    free(r->dx);
    free(r->token_ids);
    free(r->task_ids);
}

static int is_input_name(const char *name)
{
    return !strcmp(name, "x") || !strcmp(name, "dy") || !strcmp(name, "token_ids") || !strcmp(name, "task_ids");
}

/* Every tensor of the file must be an input or a parameter: a misspelt name is not ignored. */
static moe_status check_names(const moe_st_file *in, const moe_arena *params)
{
    for (int i = 0; i < in->n; i++) {
        const char *name = in->tensors[i].name;
        if (is_input_name(name) || moe_arena_find(params, name))
            continue;
        char list[1024];
        size_t at = 0;
        list[0] = 0;
        for (int j = 0; j < params->n && at < sizeof list; j++)
            at += (size_t)snprintf(list + at, sizeof list - at, ", %s", params->views[j].name);
        return moe_error(MOE_ERR_FORMAT, "%s: unknown tensor '%s' (this layer takes x, dy, token_ids, task_ids%s)",
                         in->path, name, list);
    }
    return MOE_OK;
}

/* no_tasks: said after a task id out of range when the config has no tasks, where
 * "[0, 0]" alone would read as a bound to meet */
static moe_status load_ids(const moe_st_file *in, const char *name, int64_t T, int32_t lo, int32_t hi,
                           const char *no_tasks, int32_t **out)
{
    if (!moe_st_find(in, name))
        return MOE_OK;
    if (!(*out = malloc((size_t)T * sizeof **out)))
        return moe_error(MOE_ERR_NOMEM, "out of memory for %s", name);
    int64_t shape[1] = {T};
    moe_status s = moe_st_get_i32(in, name, 1, shape, *out);
    for (int64_t t = 0; s == MOE_OK && t < T; t++)
        if ((*out)[t] < lo || (*out)[t] > hi)
            s = moe_error(MOE_ERR_FORMAT, "%s: %s[%lld] = %d is outside [%d, %d]%s", in->path, name, (long long)t,
                          (int)(*out)[t], (int)lo, (int)hi, no_tasks ? no_tasks : "");
    return s;
}

/* NaN or Inf in an input would run silently into NaN outputs: refused unless asked for */
static moe_status finite(const char *path, const char *kind, const char *name, const double *v, int64_t n, int allow)
{
    char what[512];
    snprintf(what, sizeof what, "%s: %s '%s'", path, kind, name);
    if (allow || !moe_check_finite(MOE_ERR_FORMAT, what, v, n))
        return MOE_OK;
    return moe_error(MOE_ERR_FORMAT, "%s (--allow-nonfinite runs on it anyway)", moe_last_error());
}

static moe_status load_inputs(oracle_run *r, const char *path, int allow)
{
    moe_status s;
    if ((s = moe_st_read(path, &r->in)))
        return s;
    const int64_t d = r->cfg.d_model;
    const moe_st_tensor *tx = moe_st_find(r->in, "x");
    if (!tx)
        return moe_error(MOE_ERR_FORMAT, "%s: tensor 'x' [T, hidden_size = %lld] is missing", path, (long long)d);
    if (tx->ndim != 2 || tx->shape[1] != d || tx->shape[0] < 1) {
        char sh[128];
        return moe_error(MOE_ERR_FORMAT, "%s: tensor 'x' has shape %s, expected [T, hidden_size = %lld] with T >= 1",
                         path, moe_st_shape_str(tx->ndim, tx->shape, sh, sizeof sh), (long long)d);
    }
    r->T = tx->shape[0];
    if ((s = moe_layer_config_validate(&r->cfg, r->T)) || (s = moe_ref_layer_create(&r->cfg, r->T, &r->layer)))
        return s;
    const moe_arena *params = moe_ref_layer_params(r->layer);
    if ((s = check_names(r->in, params)))
        return s;
    for (int i = 0; i < params->n; i++) {
        const moe_view *v = &params->views[i];
        if (!moe_st_find(r->in, v->name)) {
            char sh[128];
            return moe_error(MOE_ERR_FORMAT, "%s: parameter '%s' %s is missing", path, v->name,
                             moe_st_shape_str(v->ndim, v->shape, sh, sizeof sh));
        }
        double *p = moe_ref_layer_param(r->layer, v->name, NULL);
        if ((s = moe_st_get_f64(r->in, v->name, v->ndim, v->shape, p)) ||
            (s = finite(path, "parameter", v->name, p, v->numel, allow)))
            return s;
    }
    size_t n = (size_t)(r->T * d);
    int64_t shape[2] = {r->T, d};
    r->x = malloc(n * sizeof *r->x);
    r->y = malloc(n * sizeof *r->y);
    if (!r->x || !r->y)
        return moe_error(MOE_ERR_NOMEM, "out of memory for x and y");
    if ((s = moe_st_get_f64(r->in, "x", 2, shape, r->x)) || (s = finite(path, "input", "x", r->x, r->T * d, allow)))
        return s;
    if (moe_st_find(r->in, "dy")) {
        r->dy = malloc(n * sizeof *r->dy);
        r->dx = malloc(n * sizeof *r->dx);
        if (!r->dy || !r->dx)
            return moe_error(MOE_ERR_NOMEM, "out of memory for dy and dx");
        if ((s = moe_st_get_f64(r->in, "dy", 2, shape, r->dy)) ||
            (s = finite(path, "input", "dy", r->dy, r->T * d, allow)))
            return s;
    }
    int32_t max_task = r->cfg.n_tasks > 0 ? (int32_t)(r->cfg.n_tasks - 1) : 0;
    const char *no_tasks = r->cfg.n_tasks > 0 ? NULL
                                              : ": the config has no tasks (num_tasks = 0), so every task id is 0; "
                                                "set num_tasks (the MI loss needs it), or leave task_ids out";
    if ((s = load_ids(r->in, "token_ids", r->T, 0, INT32_MAX, NULL, &r->token_ids)) ||
        (s = load_ids(r->in, "task_ids", r->T, 0, max_task, no_tasks, &r->task_ids)))
        return s;
    return MOE_OK;
}

/* ---- writing the results ------------------------------------------------------ */

typedef struct {
    double aux[6];
} oracle_scalars;

static moe_status add_results(moe_st_writer *w, oracle_run *r, oracle_scalars *sc)
{
    const int64_t T = r->T, d = r->cfg.d_model;
    const moe_plan *p = moe_ref_layer_plan(r->layer);
    moe_aux_losses a = moe_ref_layer_aux(r->layer);
    double vals[6] = {a.lb, a.importance, a.load, a.z, a.mi, a.total};
    static const char *const aux_names[6] = {"aux.lb", "aux.importance", "aux.load", "aux.z", "aux.mi", "aux.total"};
    memcpy(sc->aux, vals, sizeof vals);
    int64_t td[2] = {T, d}, one[1] = {1}, n[1] = {p->n}, E[1] = {p->E}, tk[2] = {p->T, p->k};
    moe_status s;
    if ((s = moe_st_writer_add(w, "y", MOE_ST_F64, 2, td, r->y)))
        return s;
    for (int i = 0; i < 6; i++)
        if ((s = moe_st_writer_add(w, aux_names[i], MOE_ST_F64, 1, one, &sc->aux[i])))
            return s;
    if ((s = moe_st_writer_add(w, "plan.token", MOE_ST_I32, 1, n, p->token)) ||
        (s = moe_st_writer_add(w, "plan.expert", MOE_ST_I32, 1, n, p->expert)) ||
        (s = moe_st_writer_add(w, "plan.weight", MOE_ST_F64, 1, n, p->weight)) ||
        (s = moe_st_writer_add(w, "plan.counts", MOE_ST_I64, 1, E, p->count)) ||
        (s = moe_st_writer_add(w, "plan.selected", MOE_ST_I64, 1, E, p->selected)) ||
        (s = moe_st_writer_add(w, "plan.dropped", MOE_ST_I64, 1, one, &p->dropped)) ||
        (s = moe_st_writer_add(w, "plan.capacity", MOE_ST_I64, 1, one, &p->capacity)))
        return s;
    /* the plan may carry [T, k] arrays for any router; they mean something for token choice only */
    moe_router_kind rk = r->cfg.router;
    int token_choice = rk == MOE_ROUTER_TOPK || rk == MOE_ROUTER_NOISY_TOPK || rk == MOE_ROUTER_SINKHORN;
    if (token_choice && p->choice_expert &&
        ((s = moe_st_writer_add(w, "plan.choice_expert", MOE_ST_I32, 2, tk, p->choice_expert)) ||
         (s = moe_st_writer_add(w, "plan.choice_weight", MOE_ST_F64, 2, tk, p->choice_weight)) ||
         (s = moe_st_writer_add(w, "plan.choice_kept", MOE_ST_U8, 2, tk, p->choice_kept))))
        return s;
    if (!r->dy)
        return MOE_OK;
    if ((s = moe_st_writer_add(w, "grad.x", MOE_ST_F64, 2, td, r->dx)))
        return s;
    const moe_arena *g = moe_ref_layer_grads(r->layer);
    for (int i = 0; i < g->n; i++) {
        char name[MOE_NAME_MAX + 8];
        snprintf(name, sizeof name, "grad.%s", g->views[i].name);
        if ((s = moe_st_writer_add(w, name, MOE_ST_F64, g->views[i].ndim, g->views[i].shape,
                                   moe_arena_ptr(g, &g->views[i]))))
            return s;
    }
    return MOE_OK;
}

/* Metadata shared by both modes: the effective configuration (defaults filled in) and the version. */
static moe_status add_common_meta(moe_st_writer *w, const moe_layer_config *c)
{
    char *json;
    moe_status s = moe_layer_config_to_json(c, 0, &json);
    if (s)
        return s;
    s = moe_st_writer_add_meta(w, "config", json);
    free(json);
    return s ? s : moe_st_writer_add_meta(w, "cmoe_version", moe_version());
}

static void print_counts(const char *label, const int64_t *v, int64_t E)
{
    printf("  %-9s", label);
    for (int64_t e = 0; e < E; e++)
        printf(" %lld", (long long)v[e]);
    printf("\n");
}

static void print_summary(const oracle_run *r, const oracle_scalars *sc, const char *out)
{
    const moe_layer_config *c = &r->cfg;
    const moe_plan *p = moe_ref_layer_plan(r->layer);
    printf("cmoe oracle: T=%lld hidden_size=%lld experts=%lld k=%lld router=%s act=%s\n", (long long)r->T,
           (long long)c->d_model, (long long)c->n_experts, (long long)c->top_k, moe_router_name(c->router),
           moe_activation_name(c->act));
    printf("  aux      lb=%.6g importance=%.6g load=%.6g z=%.6g mi=%.6g total=%.6g\n", sc->aux[0], sc->aux[1],
           sc->aux[2], sc->aux[3], sc->aux[4], sc->aux[5]);
    print_counts("kept", p->count, p->E);
    print_counts("selected", p->selected, p->E);
    if (p->capacity > 0)
        printf("  capacity %lld per expert, dropped %lld of %lld assignments\n", (long long)p->capacity,
               (long long)p->dropped, (long long)(p->n + p->dropped));
    else
        printf("  dropless, %lld assignments, dropped %lld\n", (long long)p->n, (long long)p->dropped);
    printf("  wrote %s (%s)\n", out, r->dy ? "with gradients" : "no dy: no gradients");
}

static int run_oracle(const oracle_opts *o)
{
    oracle_run r;
    memset(&r, 0, sizeof r);
    oracle_scalars sc;
    moe_st_writer *w = NULL;
    moe_status s;
    if ((s = moe_layer_config_load(o->config, &r.cfg)) || (s = load_inputs(&r, o->inputs, o->allow_nonfinite)))
        goto done;
    if ((s = moe_ref_layer_forward(r.layer, r.y, r.x, r.token_ids, r.task_ids, r.T,
                                   (moe_key){o->step, (uint32_t)o->micro, (uint32_t)o->token0}, !o->eval)))
        goto done;
    if (r.dy) {
        moe_ref_layer_zero_grad(r.layer);
        if ((s = moe_ref_layer_backward(r.layer, r.dx, r.dy)))
            goto done;
    }
    char num[32];
    snprintf(num, sizeof num, "%" PRIu64, o->step);
    if ((s = moe_st_writer_create(&w)) || (s = add_results(w, &r, &sc)) || (s = add_common_meta(w, &r.cfg)) ||
        (s = moe_st_writer_add_meta(w, "step", num)) ||
        (s = moe_st_writer_add_meta(w, "training", o->eval ? "0" : "1")) || (s = moe_st_writer_write(w, o->out)))
        goto done;
    print_summary(&r, &sc, o->out);
done:
    moe_st_writer_free(w);
    run_free(&r);
    return s ? failed() : EXIT_OK;
}

/* ---- example inputs ---------------------------------------------------------- */

static int write_example(const oracle_opts *o)
{
    moe_layer_config c;
    moe_ref_layer *l = NULL;
    moe_st_writer *w = NULL;
    double *x = NULL, *dy = NULL;
    int32_t *tok = NULL, *task = NULL;
    moe_status s;
    if ((s = moe_layer_config_load(o->config, &c)))
        return failed();
    const int64_t T = (int64_t)o->tokens, d = c.d_model;
    const uint64_t seed = o->have_seed ? o->seed : c.seed;
    if ((s = moe_layer_config_validate(&c, T)) || (s = moe_ref_layer_create(&c, T, &l)))
        goto done;
    moe_ref_layer_init(l, 1.0);
    x = malloc((size_t)(T * d) * sizeof *x);
    dy = malloc((size_t)(T * d) * sizeof *dy);
    tok = malloc((size_t)T * sizeof *tok);
    task = malloc((size_t)T * sizeof *task);
    if (!x || !dy || !tok || !task) {
        s = moe_error(MOE_ERR_NOMEM, "out of memory for %lld tokens", (long long)T);
        goto done;
    }
    /* (seed, DATA, step) with step 0..3 keeps x, dy and the two id streams apart */
    for (int64_t t = 0; t < T; t++) {
        for (int64_t i = 0; i < d; i++) {
            x[t * d + i] = moe_rand_normal(seed, MOE_RNG_DATA, 0, (uint32_t)t, (uint32_t)i);
            dy[t * d + i] = moe_rand_normal(seed, MOE_RNG_DATA, 1, (uint32_t)t, (uint32_t)i);
        }
        tok[t] = (int32_t)(moe_rand_uniform(seed, MOE_RNG_DATA, 2, (uint32_t)t, 0) * 32000);
        task[t] = c.n_tasks > 0 ? (int32_t)(moe_rand_uniform(seed, MOE_RNG_DATA, 3, (uint32_t)t, 0) * (double)c.n_tasks)
                                : 0;
    }
    int64_t td[2] = {T, d}, t1[1] = {T};
    if ((s = moe_st_writer_create(&w)) || (s = moe_st_writer_add(w, "x", MOE_ST_F64, 2, td, x)) ||
        (s = moe_st_writer_add(w, "dy", MOE_ST_F64, 2, td, dy)) ||
        (s = moe_st_writer_add(w, "token_ids", MOE_ST_I32, 1, t1, tok)) ||
        (c.n_tasks > 0 && (s = moe_st_writer_add(w, "task_ids", MOE_ST_I32, 1, t1, task))))
        goto done;
    const moe_arena *params = moe_ref_layer_params(l);
    for (int i = 0; i < params->n; i++) {
        const moe_view *v = &params->views[i];
        if ((s = moe_st_writer_add(w, v->name, MOE_ST_F64, v->ndim, v->shape, moe_arena_ptr(params, v))))
            goto done;
    }
    char num[32];
    snprintf(num, sizeof num, "%" PRIu64, seed);
    if ((s = add_common_meta(w, &c)) || (s = moe_st_writer_add_meta(w, "seed", num)) ||
        (s = moe_st_writer_write(w, o->example)))
        goto done;
    printf("cmoe oracle: wrote %s: x and dy [%lld, %lld], token_ids%s, %d parameters\n", o->example, (long long)T,
           (long long)d, c.n_tasks > 0 ? ", task_ids" : "", params->n);
done:
    moe_st_writer_free(w);
    moe_ref_layer_free(l);
    free(x);
    free(dy);
    free(tok);
    free(task);
    return s ? failed() : EXIT_OK;
}

/* ---- command line -------------------------------------------------------------- */

enum {
    OPT_CONFIG = 256, OPT_INPUTS, OPT_OUT, OPT_STEP, OPT_MICRO, OPT_TOKEN0, OPT_EVAL, OPT_EXAMPLE, OPT_TOKENS,
    OPT_SEED, OPT_ALLOW_NONFINITE, OPT_HELP
};

int cmd_oracle(int argc, char **argv)
{
    static const struct option longopts[] = {
        {"config", required_argument, NULL, OPT_CONFIG},
        {"inputs", required_argument, NULL, OPT_INPUTS},
        {"out", required_argument, NULL, OPT_OUT},
        {"step", required_argument, NULL, OPT_STEP},
        {"micro", required_argument, NULL, OPT_MICRO},
        {"token0", required_argument, NULL, OPT_TOKEN0},
        {"eval", no_argument, NULL, OPT_EVAL},
        {"allow-nonfinite", no_argument, NULL, OPT_ALLOW_NONFINITE},
        {"example-inputs", required_argument, NULL, OPT_EXAMPLE},
        {"tokens", required_argument, NULL, OPT_TOKENS},
        {"seed", required_argument, NULL, OPT_SEED},
        {"help", no_argument, NULL, OPT_HELP},
        {NULL, 0, NULL, 0},
    };
    oracle_opts o;
    memset(&o, 0, sizeof o);
    optind = 1; /* main() may have run getopt already */
    opterr = 0; /* our own messages, naming the option */
    int opt;
    while ((opt = getopt_long(argc, argv, ":", longopts, NULL)) != -1) {
        switch (opt) {
        case OPT_CONFIG: o.config = optarg; break;
        case OPT_INPUTS: o.inputs = optarg; break;
        case OPT_OUT: o.out = optarg; break;
        case OPT_EXAMPLE: o.example = optarg; break;
        case OPT_EVAL: o.eval = 1; break;
        case OPT_ALLOW_NONFINITE: o.allow_nonfinite = 1; break;
        case OPT_STEP:
            if (!parse_u64(optarg, UINT32_MAX, &o.step))
                return usage("--step: '%s' is not an integer in [0, %u]", optarg, (unsigned)UINT32_MAX);
            o.have_step = 1;
            break;
        case OPT_MICRO:
            if (!parse_u64(optarg, 4095, &o.micro))
                return usage("--micro: '%s' is not an integer in [0, 4095]", optarg);
            o.have_step = 1;
            break;
        case OPT_TOKEN0:
            if (!parse_u64(optarg, UINT32_MAX, &o.token0))
                return usage("--token0: '%s' is not an integer in [0, %u]", optarg, (unsigned)UINT32_MAX);
            o.have_step = 1;
            break;
        case OPT_TOKENS:
            if (!parse_u64(optarg, INT32_MAX, &o.tokens) || o.tokens == 0)
                return usage("--tokens: '%s' is not an integer in [1, %d]", optarg, INT32_MAX);
            o.have_tokens = 1;
            break;
        case OPT_SEED:
            if (!parse_u64(optarg, UINT64_MAX, &o.seed))
                return usage("--seed: '%s' is not a non-negative integer", optarg);
            o.have_seed = 1;
            break;
        case OPT_HELP: help_oracle(); return EXIT_OK;
        case ':': return usage("option '%s' needs an argument", argv[optind - 1]);
        default: return usage("unknown option '%s'", argv[optind - 1]);
        }
    }
    if (optind < argc)
        return usage("unexpected argument '%s'", argv[optind]);
    if (!o.config)
        return usage("--config LAYER.json is required");
    if (o.example) {
        if (o.inputs || o.out || o.have_step || o.eval || o.allow_nonfinite)
            return usage("--example-inputs writes an inputs file; it takes --config, --tokens and --seed only");
        if (!o.have_tokens)
            return usage("--example-inputs needs --tokens T");
        if (moe_refuse_same_file(o.example, o.config, "--config"))
            return failed();
        return write_example(&o);
    }
    if (o.have_tokens || o.have_seed)
        return usage("--tokens and --seed go with --example-inputs");
    if (!o.inputs)
        return usage("--inputs IN.safetensors is required");
    if (!o.out)
        return usage("--out OUT.safetensors is required");
    if (moe_refuse_same_file(o.out, o.inputs, "--inputs") || moe_refuse_same_file(o.out, o.config, "--config"))
        return failed();
    return run_oracle(&o);
}
