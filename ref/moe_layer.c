/*
 * The whole MoE layer in double, composed from the reference ops:
 *
 *   xr = jitter(x)                      (training, jitter_eps > 0; feeds the router only)
 *   z  = xr·Wr,  h = z [+ ε·softplus(xr·Wnoise)],  s = softmax(h) or sigmoid(h)
 *   plan = route(s, h, bias)            aux losses from s, z, h and the plan
 *   moe = combine(experts(dispatch(x))) [+ sigmoid(x·g) ⊙] shared(x)
 *   y  = moe, or with Residual-MoE  c = softmax(x·coef), y = c0·moe + c1·mlp(x)
 *
 * Parameters (and their gradients, same views): router.weight [d, E] (not for hash),
 * router.noise [d, E] (noisy_topk), router.bias [E] (use_bias; selection only, its
 * gradient stays 0), experts.w1 [E, d, f], experts.w3 [E, d, f] (GLU), experts.w2
 * [E, f, d]; shared.w1 [d, Fs], shared.w3 (GLU), shared.w2 [Fs, d], shared.gate [d]
 * with Fs = n_shared·(d_ff_shared or d_ff) — one FFN equal to the sum of n_shared;
 * residual.w1 [d, Fd], residual.w3 (GLU), residual.w2 [Fd, d], residual.coef [d, 2]
 * with Fd = d_ff_dense or d_ff.
 *
 * Every buffer is laid out at create time for max_tokens (one arena of saved
 * activations and backward scratch, llm.c style), so forward and backward allocate
 * nothing themselves (the router's selection in select.c keeps its own scratch).
 * The saved tensors are readable by name through moe_ref_layer_saved (ref.h).
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ref/ref.h"

struct moe_ref_layer {
    moe_layer_config c;
    int64_t max_T;
    int64_t T;                /* tokens of the last successful forward; 0: none yet */
    int64_t d, f, E, Fs, Fd;  /* Fs, Fd: shared and residual widths, 0 when absent */
    int glu, router;          /* router: 0 for hash (no learned router) */
    int token_choice;         /* plan has [T, k] choices (topk, noisy_topk, sinkhorn) */
    int jittered;             /* the last forward jittered the router input */
    int64_t plan_T, plan_k;   /* the plan's sizes as allocated: route rewrites p->T, p->k */
    moe_plan *plan;
    moe_arena params, grads, acts;
    int32_t *task;            /* [max_T] copy of the task ids (zeros when none) */
    moe_aux_losses aux;

    /* parameters and their gradients (NULL when the option is off) */
    double *wr, *wn, *bias, *w1, *w3, *w2, *sw1, *sw3, *sw2, *sgate, *rw1, *rw3, *rw2, *rcoef;
    double *gwr, *gwn, *gbias, *gw1, *gw3, *gw2, *gsw1, *gsw3, *gsw2, *gsgate, *grw1, *grw3, *grw2, *grcoef;
    /* saved for backward */
    double *x, *xr, *u, *z, *zn, *eps, *h, *s, *imp, *load;
    double *xe, *eh1, *eh3, *ea, *ye, *moe;
    double *sh1, *sh3, *sa, *sy, *sg;
    double *rh1, *rh3, *ra, *ry, *rlogit, *rc;
    /* backward scratch */
    double *dmoe, *dsy, *dry, *drc, *drlogit, *dxe, *dye, *dweight, *dchoice;
    double *ds, *dh, *dz, *dzn, *dxr, *dimp, *dload;
};

/* ---- create / free ------------------------------------------------------------ */

static moe_status add(moe_arena *a, const char *name, int ndim, int64_t d0, int64_t d1, int64_t d2)
{
    const int64_t shape[3] = {d0, d1, d2};
    return moe_arena_add(a, name, ndim, shape);
}

static double *ptr(const moe_arena *a, const char *name)
{
    return moe_arena_ptr(a, moe_arena_find(a, name)); /* NULL when absent */
}

/* The parameter views (declared in cmoe.h). The backend layer (src/layer/moe_layer.c) lays its
 * parameters out with this too, so both name, shape and order them identically. */
moe_status moe_layer_param_layout(const moe_layer_config *c, moe_arena *a)
{
    return moe_layer_param_layout_local(c, c->n_experts, a);
}

/* The same with the experts' tensors holding El of the E experts (an expert-parallel shard). */
moe_status moe_layer_param_layout_local(const moe_layer_config *c, int64_t El, moe_arena *a)
{
    const int64_t d = c->d_model, f = c->d_ff, E = c->n_experts;
    const int64_t Fs = c->n_shared * (c->d_ff_shared > 0 ? c->d_ff_shared : f);
    const int64_t Fd = c->residual ? (c->d_ff_dense > 0 ? c->d_ff_dense : f) : 0;
    const int glu = moe_act_is_glu(c->act);
    moe_status s = MOE_OK;
    if (c->router != MOE_ROUTER_HASH && !s)
        s = add(a, "router.weight", 2, d, E, 0);
    if (c->router == MOE_ROUTER_NOISY_TOPK && !s)
        s = add(a, "router.noise", 2, d, E, 0);
    if (c->use_bias && !s)
        s = add(a, "router.bias", 1, E, 0, 0);
    if (!s)
        s = add(a, "experts.w1", 3, El, d, f);
    if (glu && !s)
        s = add(a, "experts.w3", 3, El, d, f);
    if (!s)
        s = add(a, "experts.w2", 3, El, f, d);
    if (Fs) {
        if (!s)
            s = add(a, "shared.w1", 2, d, Fs, 0);
        if (glu && !s)
            s = add(a, "shared.w3", 2, d, Fs, 0);
        if (!s)
            s = add(a, "shared.w2", 2, Fs, d, 0);
        if (c->shared_gate && !s)
            s = add(a, "shared.gate", 1, d, 0, 0);
    }
    if (Fd) {
        if (!s)
            s = add(a, "residual.w1", 2, d, Fd, 0);
        if (glu && !s)
            s = add(a, "residual.w3", 2, d, Fd, 0);
        if (!s)
            s = add(a, "residual.w2", 2, Fd, d, 0);
        if (!s)
            s = add(a, "residual.coef", 2, d, 2, 0);
    }
    return s;
}

/* Saved activations and backward scratch, all sized for max_T tokens and N assignments. */
static moe_status layout_acts(moe_arena *a, const moe_ref_layer *l, int64_t N)
{
    const int64_t T = l->max_T, d = l->d, f = l->f, E = l->E;
    const struct { const char *name; int64_t rows, cols; int on; } v[] = {
        {"x", T, d, 1},
        {"router.xr", T, d, l->router},
        {"router.u", T, d, l->router},
        {"router.z", T, E, 1}, /* hash: zeros, handed to route as scores */
        {"router.zn", T, E, l->router},
        {"router.eps", T, E, l->router},
        {"router.h", T, E, 1},
        {"router.s", T, E, 1},
        {"aux.importance", 1, E, 1},
        {"aux.load", 1, E, 1},
        {"experts.x", N, d, 1},
        {"experts.h1", N, f, 1},
        {"experts.h3", N, f, l->glu},
        {"experts.a", N, f, 1},
        {"experts.y", N, d, 1},
        {"moe.y", T, d, 1},
        {"shared.h1", T, l->Fs, l->Fs > 0},
        {"shared.h3", T, l->Fs, l->Fs > 0 && l->glu},
        {"shared.a", T, l->Fs, l->Fs > 0},
        {"shared.y", T, d, l->Fs > 0},
        {"shared.g", T, 1, l->Fs > 0 && l->c.shared_gate},
        {"residual.h1", T, l->Fd, l->Fd > 0},
        {"residual.h3", T, l->Fd, l->Fd > 0 && l->glu},
        {"residual.a", T, l->Fd, l->Fd > 0},
        {"residual.y", T, d, l->Fd > 0},
        {"residual.logit", T, 2, l->Fd > 0},
        {"residual.c", T, 2, l->Fd > 0},
        /* backward scratch */
        {"d.moe", T, d, l->Fd > 0},
        {"d.shared", T, d, l->Fs > 0 && l->c.shared_gate},
        {"d.residual", T, d, l->Fd > 0},
        {"d.residual.c", T, 2, l->Fd > 0},
        {"d.residual.logit", T, 2, l->Fd > 0},
        {"d.experts.x", N, d, 1},
        {"d.experts.y", N, d, 1},
        {"d.weight", 1, N, 1},
        {"d.choice", T, l->c.top_k, l->token_choice},
        {"d.s", T, E, l->router},
        {"d.h", T, E, l->router},
        {"d.z", T, E, l->router},
        {"d.zn", T, E, l->router},
        {"d.xr", T, d, l->router},
        {"d.importance", 1, E, l->router},
        {"d.load", 1, E, l->router},
    };
    for (size_t i = 0; i < sizeof v / sizeof v[0]; i++) {
        if (!v[i].on)
            continue;
        moe_status s = add(a, v[i].name, 2, v[i].rows, v[i].cols, 0);
        if (s)
            return s;
    }
    return MOE_OK;
}

static void bind(moe_ref_layer *l)
{
    const moe_arena *P = &l->params, *G = &l->grads, *A = &l->acts;
#define BIND(field, gfield, name) (l->field = ptr(P, name), l->gfield = ptr(G, name))
    BIND(wr, gwr, "router.weight");
    BIND(wn, gwn, "router.noise");
    BIND(bias, gbias, "router.bias");
    BIND(w1, gw1, "experts.w1");
    BIND(w3, gw3, "experts.w3");
    BIND(w2, gw2, "experts.w2");
    BIND(sw1, gsw1, "shared.w1");
    BIND(sw3, gsw3, "shared.w3");
    BIND(sw2, gsw2, "shared.w2");
    BIND(sgate, gsgate, "shared.gate");
    BIND(rw1, grw1, "residual.w1");
    BIND(rw3, grw3, "residual.w3");
    BIND(rw2, grw2, "residual.w2");
    BIND(rcoef, grcoef, "residual.coef");
#undef BIND
    l->x = ptr(A, "x");
    l->xr = ptr(A, "router.xr");
    l->u = ptr(A, "router.u");
    l->z = ptr(A, "router.z");
    l->zn = ptr(A, "router.zn");
    l->eps = ptr(A, "router.eps");
    l->h = ptr(A, "router.h");
    l->s = ptr(A, "router.s");
    l->imp = ptr(A, "aux.importance");
    l->load = ptr(A, "aux.load");
    l->xe = ptr(A, "experts.x");
    l->eh1 = ptr(A, "experts.h1");
    l->eh3 = ptr(A, "experts.h3");
    l->ea = ptr(A, "experts.a");
    l->ye = ptr(A, "experts.y");
    l->moe = ptr(A, "moe.y");
    l->sh1 = ptr(A, "shared.h1");
    l->sh3 = ptr(A, "shared.h3");
    l->sa = ptr(A, "shared.a");
    l->sy = ptr(A, "shared.y");
    l->sg = ptr(A, "shared.g");
    l->rh1 = ptr(A, "residual.h1");
    l->rh3 = ptr(A, "residual.h3");
    l->ra = ptr(A, "residual.a");
    l->ry = ptr(A, "residual.y");
    l->rlogit = ptr(A, "residual.logit");
    l->rc = ptr(A, "residual.c");
    l->dmoe = ptr(A, "d.moe");
    l->dsy = ptr(A, "d.shared");
    l->dry = ptr(A, "d.residual");
    l->drc = ptr(A, "d.residual.c");
    l->drlogit = ptr(A, "d.residual.logit");
    l->dxe = ptr(A, "d.experts.x");
    l->dye = ptr(A, "d.experts.y");
    l->dweight = ptr(A, "d.weight");
    l->dchoice = ptr(A, "d.choice");
    l->ds = ptr(A, "d.s");
    l->dh = ptr(A, "d.h");
    l->dz = ptr(A, "d.z");
    l->dzn = ptr(A, "d.zn");
    l->dxr = ptr(A, "d.xr");
    l->dimp = ptr(A, "d.importance");
    l->dload = ptr(A, "d.load");
}

moe_status moe_ref_layer_create(const moe_layer_config *c, int64_t max_tokens, moe_ref_layer **out)
{
    if (!out)
        return moe_error(MOE_ERR_ARG, "layer: out must not be NULL");
    *out = NULL;
    if (!c)
        return moe_error(MOE_ERR_ARG, "layer: config must not be NULL");
    moe_status st = moe_layer_config_validate(c, max_tokens);
    if (st)
        return st;
    moe_ref_layer *l = calloc(1, sizeof *l);
    if (!l)
        return moe_error(MOE_ERR_NOMEM, "layer: out of memory");
    l->c = *c;
    l->max_T = max_tokens;
    l->d = c->d_model;
    l->f = c->d_ff;
    l->E = c->n_experts;
    l->glu = moe_act_is_glu(c->act);
    l->router = c->router != MOE_ROUTER_HASH;
    l->token_choice = c->router == MOE_ROUTER_TOPK || c->router == MOE_ROUTER_NOISY_TOPK ||
                      c->router == MOE_ROUTER_SINKHORN;
    l->Fs = c->n_shared * (c->d_ff_shared > 0 ? c->d_ff_shared : c->d_ff);
    l->Fd = c->residual ? (c->d_ff_dense > 0 ? c->d_ff_dense : c->d_ff) : 0;
    moe_arena_init(&l->params, sizeof(double));
    moe_arena_init(&l->grads, sizeof(double));
    moe_arena_init(&l->acts, sizeof(double));

    /* Expert choice's k is its capacity C, which grows with T: size for max_tokens. */
    int64_t k, N;
    if (c->router == MOE_ROUTER_EXPERT_CHOICE) {
        k = moe_capacity(c, max_tokens);
        N = l->E * k;
    } else {
        k = c->router == MOE_ROUTER_HASH ? 1 : c->top_k;
        N = max_tokens * k;
    }
    l->plan_T = max_tokens;
    l->plan_k = k;
    if ((st = moe_plan_create(N, max_tokens, l->E, k, &l->plan)) || (st = moe_layer_param_layout(c, &l->params)) ||
        (st = moe_layer_param_layout(c, &l->grads)) || (st = layout_acts(&l->acts, l, N)) ||
        (st = moe_arena_alloc(&l->params)) || (st = moe_arena_alloc(&l->grads)) ||
        (st = moe_arena_alloc(&l->acts))) {
        if (st == MOE_ERR_NOMEM) {
            char why[1024];
            snprintf(why, sizeof why, "%s", moe_last_error());
            st = moe_error(st, "layer (hidden_size %lld, intermediate_size %lld, num_local_experts %lld, %lld tokens): "
                           "%s", (long long)c->d_model, (long long)c->d_ff, (long long)c->n_experts,
                           (long long)max_tokens, why);
        }
        goto fail;
    }
    l->task = calloc((size_t)max_tokens, sizeof *l->task);
    if (!l->task) {
        st = moe_error(MOE_ERR_NOMEM, "layer: out of memory for %lld task ids", (long long)max_tokens);
        goto fail;
    }
    bind(l);
    *out = l;
    return MOE_OK;
fail:
    moe_ref_layer_free(l);
    return st;
}

void moe_ref_layer_free(moe_ref_layer *l)
{
    if (!l)
        return;
    moe_plan_free(l->plan);
    moe_arena_free(&l->params);
    moe_arena_free(&l->grads);
    moe_arena_free(&l->acts);
    free(l->task);
    free(l);
}

/* ---- accessors -------------------------------------------------------------- */

const moe_layer_config *moe_ref_layer_config(const moe_ref_layer *l)
{
    return &l->c;
}

const moe_arena *moe_ref_layer_params(const moe_ref_layer *l)
{
    return &l->params;
}

const moe_arena *moe_ref_layer_grads(const moe_ref_layer *l)
{
    return &l->grads;
}

static double *find(const moe_arena *a, const char *name, const moe_view **view)
{
    const moe_view *v = name ? moe_arena_find(a, name) : NULL;
    if (view)
        *view = v;
    return moe_arena_ptr(a, v);
}

double *moe_ref_layer_param(moe_ref_layer *l, const char *name, const moe_view **view)
{
    return find(&l->params, name, view);
}

double *moe_ref_layer_grad(moe_ref_layer *l, const char *name, const moe_view **view)
{
    return find(&l->grads, name, view);
}

const double *moe_ref_layer_saved(const moe_ref_layer *l, const char *name, const moe_view **view)
{
    return find(&l->acts, name, view);
}

const moe_plan *moe_ref_layer_plan(const moe_ref_layer *l)
{
    return l->T ? l->plan : NULL;
}

moe_aux_losses moe_ref_layer_aux(const moe_ref_layer *l)
{
    return l->aux;
}

void moe_ref_layer_zero_grad(moe_ref_layer *l)
{
    memset(l->grads.data, 0, (size_t)l->grads.numel * sizeof(double));
}

/*
 * W[in, out] ~ N(0, (scale/√in)²), per expert for [E, in, out]; a 1-D [d] vector (the
 * shared gate, a [d, 1] projection) has in = d. Draws are keyed by (view index, element),
 * so every backend that lays out the same views initialises the same values.
 */
void moe_ref_layer_init(moe_ref_layer *l, double scale)
{
    const uint32_t stream = MOE_RNG_INIT | (uint32_t)(l->c.layer << 8);
    for (int vi = 0; vi < l->params.n; vi++) {
        const moe_view *v = &l->params.views[vi];
        double *w = moe_arena_ptr(&l->params, v);
        if (strcmp(v->name, "router.bias") == 0) {
            memset(w, 0, (size_t)v->numel * sizeof *w);
            continue;
        }
        int64_t fan_in = v->ndim == 3 ? v->shape[1] : v->shape[0];
        double std = scale / sqrt((double)fan_in);
        for (int64_t i = 0; i < v->numel; i++)
            w[i] = std * moe_rand_normal(l->c.seed, stream, (uint32_t)vi, (uint32_t)i, (uint32_t)(i >> 32));
    }
}

/* ---- forward ---------------------------------------------------------------- */

static moe_status check_ids(const moe_ref_layer *l, const int32_t *token_ids, const int32_t *task_ids, int64_t T)
{
    if (token_ids)
        for (int64_t t = 0; t < T; t++)
            if (token_ids[t] < 0)
                return moe_error(MOE_ERR_ARG, "layer: token_ids[%lld] = %d is negative", (long long)t, token_ids[t]);
    /* Task ids only feed the MI loss; without tasks (n_tasks = 0) they are ignored. */
    if (task_ids && l->c.n_tasks >= 1)
        for (int64_t t = 0; t < T; t++)
            if (task_ids[t] < 0 || task_ids[t] >= l->c.n_tasks)
                return moe_error(MOE_ERR_ARG, "layer: task_ids[%lld] = %d outside [0, n_tasks = %lld)", (long long)t,
                                 task_ids[t], (long long)l->c.n_tasks);
    return MOE_OK;
}

/* Logits, noise and scores: xr, z, zn, eps, h, s. */
static void router_forward(moe_ref_layer *l, int64_t T, moe_key key, int training)
{
    const moe_layer_config *c = &l->c;
    const int64_t d = l->d, E = l->E;
    l->jittered = training && c->jitter_eps > 0;
    if (l->jittered)
        moe_ref_jitter_forward(l->xr, l->u, l->x, c->jitter_eps, c->seed, c->layer, key, T, d);
    else
        memcpy(l->xr, l->x, (size_t)(T * d) * sizeof *l->x);
    moe_ref_matmul_forward(l->z, l->xr, l->wr, T, d, E);
    if (c->router == MOE_ROUTER_NOISY_TOPK) {
        moe_ref_matmul_forward(l->zn, l->xr, l->wn, T, d, E);
        moe_ref_noisy_logits_forward(l->h, l->eps, l->z, l->zn, training, c->seed, c->layer, key, T, E);
    } else {
        memcpy(l->h, l->z, (size_t)(T * E) * sizeof *l->h);
    }
    if (c->score == MOE_SCORE_SIGMOID)
        moe_ref_sigmoid_forward(l->s, l->h, T * E);
    else
        moe_ref_softmax_forward(l->s, l->h, T, E);
}

/* Every aux loss is computed for reporting; only total (Σ coef·loss) enters the objective. */
static void aux_forward(moe_ref_layer *l, int64_t T)
{
    const moe_layer_config *c = &l->c;
    const int64_t E = l->E;
    moe_aux_losses a = {0};
    if (l->router) {
        a.lb = moe_ref_lb_loss_forward(l->s, l->plan, T, E);
        moe_ref_importance_forward(l->imp, l->plan);
        a.importance = moe_ref_cv2_forward(l->imp, E);
        if (c->router == MOE_ROUTER_NOISY_TOPK)
            moe_ref_noisy_load_forward(l->load, l->z, l->zn, l->h, c->top_k, T, E);
        else /* the selected counts: a plain count, no gradient */
            for (int64_t e = 0; e < E; e++)
                l->load[e] = (double)l->plan->selected[e];
        a.load = moe_ref_cv2_forward(l->load, E);
        a.z = moe_ref_z_loss_forward(l->z, T, E);
        if (c->n_tasks >= 1)
            a.mi = moe_ref_mi_loss_forward(l->s, l->task, c->n_tasks, T, E);
    }
    a.total = c->lb_coef * a.lb + c->importance_coef * a.importance + c->load_coef * a.load + c->z_coef * a.z +
              c->mi_coef * a.mi;
    l->aux = a;
}

static double sigmoid(double x)
{
    if (x >= 0)
        return 1.0 / (1.0 + exp(-x));
    double e = exp(x);
    return e / (1.0 + e);
}

/* moe += [sigmoid(x·gate) ⊙] shared(x) */
static void shared_forward(moe_ref_layer *l, int64_t T)
{
    const int64_t d = l->d;
    moe_ref_ffn_forward(l->sy, l->sh1, l->sh3, l->sa, l->x, l->sw1, l->sw3, l->sw2, l->c.act, T, d, l->Fs);
    for (int64_t t = 0; t < T; t++) {
        double g = 1.0;
        if (l->sgate) {
            double acc = 0;
            for (int64_t i = 0; i < d; i++)
                acc += l->x[t * d + i] * l->sgate[i];
            g = l->sg[t] = sigmoid(acc);
        }
        for (int64_t i = 0; i < d; i++)
            l->moe[t * d + i] += g * l->sy[t * d + i];
    }
}

/* y = c0·moe + c1·mlp(x), c = softmax(x·coef) */
static void residual_forward(moe_ref_layer *l, double *y, int64_t T)
{
    const int64_t d = l->d;
    moe_ref_ffn_forward(l->ry, l->rh1, l->rh3, l->ra, l->x, l->rw1, l->rw3, l->rw2, l->c.act, T, d, l->Fd);
    moe_ref_matmul_forward(l->rlogit, l->x, l->rcoef, T, d, 2);
    moe_ref_softmax_forward(l->rc, l->rlogit, T, 2);
    for (int64_t t = 0; t < T; t++)
        for (int64_t i = 0; i < d; i++)
            y[t * d + i] = l->rc[2 * t] * l->moe[t * d + i] + l->rc[2 * t + 1] * l->ry[t * d + i];
}

moe_status moe_ref_layer_forward(moe_ref_layer *l, double *y, const double *x, const int32_t *token_ids,
                                 const int32_t *task_ids, int64_t T, moe_key key, int training)
{
    if (!l || !y || !x)
        return moe_error(MOE_ERR_ARG, "layer forward: layer, y and x must not be NULL");
    if (T <= 0 || T > l->max_T)
        return moe_error(MOE_ERR_ARG, "layer forward: T = %lld tokens outside [1, max_tokens = %lld]", (long long)T,
                         (long long)l->max_T);
    moe_status st = moe_layer_config_validate(&l->c, T);
    if (!st)
        st = check_ids(l, token_ids, task_ids, T);
    if (st)
        return st;
    const moe_layer_config *c = &l->c;
    const int64_t d = l->d;
    l->T = 0; /* no backward until this forward has succeeded */
    memcpy(l->x, x, (size_t)(T * d) * sizeof *x);
    if (task_ids && c->n_tasks >= 1)
        memcpy(l->task, task_ids, (size_t)T * sizeof *task_ids);
    else
        memset(l->task, 0, (size_t)T * sizeof *l->task);

    if (l->router)
        router_forward(l, T, key, training);
    l->plan->T = l->plan_T;
    l->plan->k = l->plan_k;
    st = moe_ref_route(l->plan, l->s, l->h, l->bias, token_ids, c, key, T);
    if (st)
        return st;
    aux_forward(l, T);

    const moe_plan *p = l->plan;
    moe_ref_dispatch_forward(l->xe, l->x, p, d);
    moe_ref_experts_forward(l->ye, l->eh1, l->eh3, l->ea, l->xe, l->w1, l->w3, l->w2, p->offsets, c->act, l->E, d,
                            l->f);
    moe_ref_combine_forward(l->moe, l->ye, p, d);
    if (l->Fs)
        shared_forward(l, T);
    if (l->Fd)
        residual_forward(l, y, T);
    else
        memcpy(y, l->moe, (size_t)(T * d) * sizeof *y);
    l->T = T;
    return MOE_OK;
}

/* ---- backward --------------------------------------------------------------- */

static void zero(double *p, int64_t n)
{
    memset(p, 0, (size_t)n * sizeof *p);
}

/* From dy to dmoe (returned) through y = c0·moe + c1·mlp; dx and the residual grads accumulate. */
static const double *residual_backward(moe_ref_layer *l, double *dx, const double *dy, int64_t T)
{
    const int64_t d = l->d;
    for (int64_t t = 0; t < T; t++) {
        double g0 = 0, g1 = 0;
        for (int64_t i = 0; i < d; i++) {
            double g = dy[t * d + i];
            g0 += g * l->moe[t * d + i];
            g1 += g * l->ry[t * d + i];
            l->dmoe[t * d + i] = l->rc[2 * t] * g;
            l->dry[t * d + i] = l->rc[2 * t + 1] * g;
        }
        l->drc[2 * t] = g0;
        l->drc[2 * t + 1] = g1;
    }
    zero(l->drlogit, 2 * T);
    moe_ref_softmax_backward(l->drlogit, l->drc, l->rc, T, 2);
    moe_ref_matmul_backward(dx, l->grcoef, l->drlogit, l->x, l->rcoef, T, d, 2);
    moe_ref_ffn_backward(dx, l->grw1, l->grw3, l->grw2, l->dry, l->rh1, l->rh3, l->ra, l->x, l->rw1, l->rw3, l->rw2,
                         l->c.act, T, d, l->Fd);
    return l->dmoe;
}

static void shared_backward(moe_ref_layer *l, double *dx, const double *dmoe, int64_t T)
{
    const int64_t d = l->d;
    const double *dsy = dmoe;
    if (l->sgate) {
        for (int64_t t = 0; t < T; t++) {
            double g = l->sg[t], dg = 0;
            for (int64_t i = 0; i < d; i++) {
                dg += dmoe[t * d + i] * l->sy[t * d + i];
                l->dsy[t * d + i] = g * dmoe[t * d + i];
            }
            double dpre = dg * g * (1.0 - g);
            for (int64_t i = 0; i < d; i++) {
                dx[t * d + i] += dpre * l->sgate[i];
                l->gsgate[i] += dpre * l->x[t * d + i];
            }
        }
        dsy = l->dsy;
    }
    moe_ref_ffn_backward(dx, l->gsw1, l->gsw3, l->gsw2, dsy, l->sh1, l->sh3, l->sa, l->x, l->sw1, l->sw3, l->sw2,
                         l->c.act, T, d, l->Fs);
}

/* Aux losses, route, scores, noise and logits back to dx; dweight holds combine's part. */
static void router_backward(moe_ref_layer *l, double *dx, int64_t T)
{
    const moe_layer_config *c = &l->c;
    const moe_plan *p = l->plan;
    const int64_t d = l->d, E = l->E;
    zero(l->ds, T * E);
    zero(l->dh, T * E);
    zero(l->dz, T * E);
    zero(l->dzn, T * E);
    zero(l->dxr, T * d);
    if (l->dchoice)
        zero(l->dchoice, T * c->top_k);
    if (c->lb_coef > 0)
        moe_ref_lb_loss_backward(l->ds, c->lb_coef, p, T, E);
    if (c->importance_coef > 0) {
        zero(l->dimp, E);
        moe_ref_cv2_backward(l->dimp, c->importance_coef, l->imp, E);
        moe_ref_importance_backward(l->dweight, l->dchoice, l->dimp, p);
    }
    if (c->load_coef > 0 && c->router == MOE_ROUTER_NOISY_TOPK) {
        zero(l->dload, E);
        moe_ref_cv2_backward(l->dload, c->load_coef, l->load, E);
        moe_ref_noisy_load_backward(l->dz, l->dzn, l->dh, l->dload, l->z, l->zn, l->h, c->top_k, T, E);
    }
    if (c->z_coef > 0)
        moe_ref_z_loss_backward(l->dz, c->z_coef, l->z, T, E);
    if (c->mi_coef > 0)
        moe_ref_mi_loss_backward(l->ds, c->mi_coef, l->s, l->task, c->n_tasks, T, E);
    moe_ref_route_backward(l->ds, l->dweight, l->dchoice, p, l->s, l->bias, c);
    if (c->score == MOE_SCORE_SIGMOID)
        moe_ref_sigmoid_backward(l->dh, l->ds, l->s, T * E);
    else
        moe_ref_softmax_backward(l->dh, l->ds, l->s, T, E);
    if (c->router == MOE_ROUTER_NOISY_TOPK) {
        moe_ref_noisy_logits_backward(l->dz, l->dzn, l->dh, l->eps, l->zn, T, E);
        moe_ref_matmul_backward(l->dxr, l->gwn, l->dzn, l->xr, l->wn, T, d, E);
    } else {
        for (int64_t i = 0; i < T * E; i++)
            l->dz[i] += l->dh[i];
    }
    moe_ref_matmul_backward(l->dxr, l->gwr, l->dz, l->xr, l->wr, T, d, E);
    if (l->jittered)
        moe_ref_jitter_backward(dx, l->dxr, l->u, T, d);
    else
        for (int64_t i = 0; i < T * d; i++)
            dx[i] += l->dxr[i];
}

moe_status moe_ref_layer_backward(moe_ref_layer *l, double *dx, const double *dy)
{
    if (!l || !dx || !dy)
        return moe_error(MOE_ERR_ARG, "layer backward: layer, dx and dy must not be NULL");
    if (!l->T)
        return moe_error(MOE_ERR_ARG, "layer backward: no successful forward to differentiate");
    const moe_layer_config *c = &l->c;
    const moe_plan *p = l->plan;
    const int64_t T = l->T, d = l->d;
    zero(dx, T * d);
    const double *dmoe = l->Fd ? residual_backward(l, dx, dy, T) : dy;
    if (l->Fs)
        shared_backward(l, dx, dmoe, T);
    zero(l->dye, p->n * d);
    zero(l->dweight, p->n);
    zero(l->dxe, p->n * d);
    moe_ref_combine_backward(l->dye, l->dweight, dmoe, l->ye, p, d);
    moe_ref_experts_backward(l->dxe, l->gw1, l->gw3, l->gw2, l->dye, l->eh1, l->eh3, l->ea, l->xe, l->w1, l->w3,
                             l->w2, p->offsets, c->act, l->E, d, l->f);
    moe_ref_dispatch_backward(dx, l->dxe, p, d);
    if (l->router)
        router_backward(l, dx, T);
    return MOE_OK;
}

/* DeepSeek-V3's aux-loss-free balancing: under-loaded experts get a higher bias. */
void moe_ref_layer_update_bias(moe_ref_layer *l)
{
    if (!l || !l->bias || !l->T)
        return;
    const int64_t E = l->E;
    double mean = 0;
    for (int64_t e = 0; e < E; e++)
        mean += (double)l->plan->selected[e];
    mean /= (double)E;
    for (int64_t e = 0; e < E; e++) {
        double err = mean - (double)l->plan->selected[e];
        l->bias[e] += l->c.bias_rate * (double)((err > 0) - (err < 0));
    }
}
