/*
 * Mixture of attention heads in double (moa.h): the plan ops the backends compose it from,
 * and the whole layer written directly, one (token, expert) assignment at a time.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "ref/model_ops.h"
#include "ref/moa.h"
#include "ref/ref.h"

/* ---- ops over a routing plan ----------------------------------------------------- */

void moe_ref_experts_linear_forward(double *ye, const double *xe, const double *w, const moe_plan *p, int64_t K,
                                    int64_t N)
{
    for (int64_t e = 0; e < p->E; e++) {
        const int64_t r = p->offsets[e];
        moe_ref_matmul_forward(ye + r * N, xe + r * K, w + e * K * N, p->count[e], K, N);
    }
}

void moe_ref_experts_linear_backward(double *dxe, double *dw, const double *dye, const double *xe, const double *w,
                                     const moe_plan *p, int64_t K, int64_t N)
{
    for (int64_t e = 0; e < p->E; e++) {
        const int64_t r = p->offsets[e];
        moe_ref_matmul_backward(dxe ? dxe + r * K : NULL, dw + e * K * N, dye + r * N, xe + r * K, w + e * K * N,
                                p->count[e], K, N);
    }
}

void moe_ref_choice_scatter(double *slots, const double *rows, const moe_plan *p, int64_t w)
{
    memset(slots, 0, (size_t)(p->T * p->k * w) * sizeof *slots);
    for (int64_t i = 0; i < p->n; i++)
        memcpy(slots + p->choice[i] * w, rows + i * w, (size_t)w * sizeof *rows);
}

void moe_ref_choice_gather(double *rows, const double *slots, const moe_plan *p, int64_t w)
{
    for (int64_t i = 0; i < p->n; i++)
        for (int64_t j = 0; j < w; j++)
            rows[i * w + j] += slots[p->choice[i] * w + j];
}

/* ---- the reference MoA layer -------------------------------------------------------- */

void moe_moa_router_config(const moe_moa_dims *d, int64_t layer, uint64_t seed, moe_layer_config *c)
{
    moe_layer_config_default(c);
    c->d_model = d->C;
    c->d_ff = d->hd;
    c->n_experts = d->E;
    c->top_k = d->k;
    c->router = MOE_ROUTER_TOPK;
    c->score = MOE_SCORE_SOFTMAX;
    c->renormalize = 1; /* MoA: softmax over the top-k logits */
    c->capacity_factor = 0;
    c->jitter_eps = 0;
    c->lb_coef = d->lb_coef;
    c->z_coef = d->z_coef;
    c->importance_coef = c->load_coef = c->mi_coef = 0;
    c->seed = seed;
    c->layer = layer;
}

struct moe_ref_moa {
    moe_moa_dims d;
    moe_layer_config lc;
    moe_plan *plan;
    int have; /* a forward ran */
    /* saved: router logits and scores [N, E]; K (rotated), V [N, hd]; per assignment the
     * rotated query [n, hd], the probabilities [n, S], the head output [n, hd] and its
     * projection [n, C] */
    double *z, *s, *kr, *v, *q, *p, *o, *u;
};

moe_status moe_ref_moa_create(const moe_moa_dims *d, moe_ref_moa **out)
{
    *out = NULL;
    if (d->B < 1 || d->S < 1 || d->C < 1 || d->hd < 2 || d->hd % 2 || d->E < 1 || d->k < 1 || d->k > d->E)
        return moe_error(MOE_ERR_ARG, "moa: dimensions B %lld, S %lld, C %lld, hd %lld (even), E %lld, k %lld "
                         "(1 <= k <= E)", (long long)d->B, (long long)d->S, (long long)d->C, (long long)d->hd,
                         (long long)d->E, (long long)d->k);
    moe_ref_moa *a = calloc(1, sizeof *a);
    if (!a)
        return moe_error(MOE_ERR_NOMEM, "moa: out of memory");
    a->d = *d;
    moe_moa_router_config(d, 0, 1, &a->lc);
    const int64_t N = d->B * d->S, n = N * d->k;
    moe_status s = moe_plan_create(n, N, d->E, d->k, &a->plan);
    a->z = calloc((size_t)(N * d->E), sizeof *a->z);
    a->s = calloc((size_t)(N * d->E), sizeof *a->s);
    a->kr = calloc((size_t)(N * d->hd), sizeof *a->kr);
    a->v = calloc((size_t)(N * d->hd), sizeof *a->v);
    a->q = calloc((size_t)(n * d->hd), sizeof *a->q);
    a->p = calloc((size_t)(n * d->S), sizeof *a->p);
    a->o = calloc((size_t)(n * d->hd), sizeof *a->o);
    a->u = calloc((size_t)(n * d->C), sizeof *a->u);
    if (s || !a->z || !a->s || !a->kr || !a->v || !a->q || !a->p || !a->o || !a->u) {
        moe_ref_moa_free(a);
        return s ? s : moe_error(MOE_ERR_NOMEM, "moa: out of memory");
    }
    *out = a;
    return MOE_OK;
}

void moe_ref_moa_free(moe_ref_moa *a)
{
    if (!a)
        return;
    moe_plan_free(a->plan);
    free(a->z), free(a->s), free(a->kr), free(a->v), free(a->q), free(a->p), free(a->o), free(a->u);
    free(a);
}

const moe_plan *moe_ref_moa_plan(const moe_ref_moa *a)
{
    return a->have ? a->plan : NULL;
}

/* v [n] rotated as RoPE rotates a head at position pos */
static void rope1(double *out, const double *v, int64_t pos, double theta, int64_t hd)
{
    moe_ref_rope_forward(out, v, pos, theta, 1, 1, 1, hd);
}

moe_status moe_ref_moa_forward(moe_ref_moa *a, double *y, double aux[2], const double *x, const moe_moa_weights *w)
{
    const moe_moa_dims *d = &a->d;
    const int64_t S = d->S, C = d->C, hd = d->hd, E = d->E, N = d->B * S;
    const double scale = 1.0 / sqrt((double)hd);
    moe_ref_matmul_forward(a->z, x, w->wr, N, C, E);
    moe_ref_softmax_forward(a->s, a->z, N, E);
    moe_status st = moe_ref_route(a->plan, a->s, a->z, NULL, NULL, &a->lc, MOE_KEY_STEP(0), N);
    if (st)
        return st;
    aux[0] = moe_ref_lb_loss_forward(a->s, a->plan, N, E);
    aux[1] = moe_ref_z_loss_forward(a->z, N, E);
    double *tmp = malloc((size_t)hd * sizeof *tmp);
    if (!tmp)
        return moe_error(MOE_ERR_NOMEM, "moa: out of memory");
    moe_ref_matmul_forward(a->v, x, w->wv, N, C, hd);
    moe_ref_matmul_forward(a->kr, x, w->wk, N, C, hd);
    for (int64_t t = 0; t < N; t++) {
        rope1(tmp, a->kr + t * hd, t % S, d->rope_theta, hd);
        memcpy(a->kr + t * hd, tmp, (size_t)hd * sizeof *tmp);
    }
    memset(y, 0, (size_t)(N * C) * sizeof *y);
    const moe_plan *p = a->plan;
    for (int64_t i = 0; i < p->n; i++) {
        const int64_t t = p->token[i], e = p->expert[i], b = t / S, pos = t % S;
        double *q = a->q + i * hd, *pr = a->p + i * S, *o = a->o + i * hd, *u = a->u + i * C;
        moe_ref_matmul_forward(tmp, x + t * C, w->wq + e * C * hd, 1, C, hd);
        rope1(q, tmp, pos, d->rope_theta, hd);
        double mx = -INFINITY, sum = 0;
        for (int64_t j = 0; j <= pos; j++) {
            double sc = 0;
            for (int64_t c = 0; c < hd; c++)
                sc += q[c] * a->kr[(b * S + j) * hd + c];
            pr[j] = sc * scale;
            mx = pr[j] > mx ? pr[j] : mx;
        }
        for (int64_t j = 0; j <= pos; j++) {
            pr[j] = exp(pr[j] - mx);
            sum += pr[j];
        }
        for (int64_t j = 0; j < S; j++)
            pr[j] = j <= pos ? pr[j] / sum : 0;
        for (int64_t c = 0; c < hd; c++) {
            double acc = 0;
            for (int64_t j = 0; j <= pos; j++)
                acc += pr[j] * a->v[(b * S + j) * hd + c];
            o[c] = acc;
        }
        moe_ref_matmul_forward(u, o, w->wo + e * hd * C, 1, hd, C);
        for (int64_t c = 0; c < C; c++)
            y[t * C + c] += p->weight[i] * u[c];
    }
    free(tmp);
    a->have = 1;
    return MOE_OK;
}

moe_status moe_ref_moa_backward(moe_ref_moa *a, double *dx, moe_moa_grads *g, const double *dy, const double *x,
                                const moe_moa_weights *w)
{
    if (!a->have)
        return moe_error(MOE_ERR_ARG, "moa backward: no forward to differentiate");
    const moe_moa_dims *d = &a->d;
    const int64_t S = d->S, C = d->C, hd = d->hd, E = d->E, N = d->B * S;
    const double scale = 1.0 / sqrt((double)hd);
    const moe_plan *p = a->plan;
    double *dweight = calloc((size_t)(p->n + 1), sizeof *dweight), *dk = calloc((size_t)(N * hd), sizeof *dk),
           *dv = calloc((size_t)(N * hd), sizeof *dv), *du = malloc((size_t)C * sizeof *du),
           *dout = calloc((size_t)hd, sizeof *dout), *dq = calloc((size_t)hd, sizeof *dq),
           *dqp = calloc((size_t)hd, sizeof *dqp), *dp = malloc((size_t)S * sizeof *dp),
           *dkp = calloc((size_t)(N * hd), sizeof *dkp), *ds = calloc((size_t)(N * E), sizeof *ds),
           *dz = calloc((size_t)(N * E), sizeof *dz);
    if (!dweight || !dk || !dv || !du || !dout || !dq || !dqp || !dp || !dkp || !ds || !dz) {
        free(dweight), free(dk), free(dv), free(du), free(dout), free(dq), free(dqp), free(dp), free(dkp), free(ds),
            free(dz);
        return moe_error(MOE_ERR_NOMEM, "moa backward: out of memory");
    }
    for (int64_t i = 0; i < p->n; i++) {
        const int64_t t = p->token[i], e = p->expert[i], b = t / S, pos = t % S;
        const double *q = a->q + i * hd, *pr = a->p + i * S, *o = a->o + i * hd, *u = a->u + i * C;
        double acc = 0;
        for (int64_t c = 0; c < C; c++) {
            acc += dy[t * C + c] * u[c];
            du[c] = p->weight[i] * dy[t * C + c];
        }
        dweight[i] = acc;
        /* u = o·Wo[e] */
        memset(dout, 0, (size_t)hd * sizeof *dout);
        moe_ref_matmul_backward(dout, g->wo + e * hd * C, du, o, w->wo + e * hd * C, 1, hd, C);
        /* o = Σ_j p_j v_j, p = softmax(q·k_j·scale) */
        double pdp = 0;
        for (int64_t j = 0; j <= pos; j++) {
            const double *vj = a->v + (b * S + j) * hd;
            double s = 0;
            for (int64_t c = 0; c < hd; c++) {
                s += dout[c] * vj[c];
                dv[(b * S + j) * hd + c] += pr[j] * dout[c];
            }
            dp[j] = s;
            pdp += pr[j] * s;
        }
        memset(dq, 0, (size_t)hd * sizeof *dq);
        for (int64_t j = 0; j <= pos; j++) {
            const double dsc = pr[j] * (dp[j] - pdp) * scale;
            const double *kj = a->kr + (b * S + j) * hd;
            for (int64_t c = 0; c < hd; c++) {
                dq[c] += dsc * kj[c];
                dk[(b * S + j) * hd + c] += dsc * q[c];
            }
        }
        /* q = rope(x_t·Wq[e]) */
        memset(dqp, 0, (size_t)hd * sizeof *dqp);
        moe_ref_rope_backward(dqp, dq, pos, d->rope_theta, 1, 1, 1, hd);
        moe_ref_matmul_backward(dx + t * C, g->wq + e * C * hd, dqp, x + t * C, w->wq + e * C * hd, 1, C, hd);
    }
    /* K = rope(x·Wk), V = x·Wv */
    for (int64_t t = 0; t < N; t++)
        moe_ref_rope_backward(dkp + t * hd, dk + t * hd, t % S, d->rope_theta, 1, 1, 1, hd);
    moe_ref_matmul_backward(dx, g->wk, dkp, x, w->wk, N, C, hd);
    moe_ref_matmul_backward(dx, g->wv, dv, x, w->wv, N, C, hd);
    /* the router: gate weights, load-balance loss, softmax, z-loss, logits */
    if (d->lb_coef > 0)
        moe_ref_lb_loss_backward(ds, d->lb_coef, p, N, E);
    moe_ref_route_backward(ds, dweight, NULL, p, a->s, NULL, &a->lc);
    moe_ref_softmax_backward(dz, ds, a->s, N, E);
    if (d->z_coef > 0)
        moe_ref_z_loss_backward(dz, d->z_coef, a->z, N, E);
    moe_ref_matmul_backward(dx, g->wr, dz, x, w->wr, N, C, E);
    free(dweight), free(dk), free(dv), free(du), free(dout), free(dq), free(dqp), free(dp), free(dkp), free(ds),
        free(dz);
    return MOE_OK;
}
