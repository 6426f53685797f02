/*
 * The second half of the cross-check (check.h): the language model's ops (embedding,
 * RMSNorm, RoPE, attention and its decode step, the LM head, biases, cross-entropy, the
 * gradient norm, clipping and AdamW with master weights), then the MoE layer as a whole on
 * the backend against the same layer on ref, for every router with the options spread
 * over the cases.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "backend/check_impl.h"
#include "layer/moe_layer.h"
#include "ref/ref.h"

#define W MOE_F32
#define TB(p) ((moe_tensor){(p).b, 0})
#define TR(p) ((moe_tensor){(p).r, 0})

static void drop_all(ck *c, pair *p, size_t n)
{
    for (size_t i = 0; i < n; i++)
        ck_drop(c, p[i]);
}

static void check_embedding(ck *c, int64_t N, int64_t C, int64_t V)
{
    moe_backend *B = c->B, *R = c->R;
    ck_shape(c, "N=%lld C=%lld V=%lld", (long long)N, (long long)C, (long long)V);
    int32_t *tok = malloc((size_t)N * sizeof *tok);
    if (!tok) {
        c->oom = 1;
        return;
    }
    for (int64_t t = 0; t < N; t++) /* skewed: some rows repeat many times */
        tok[t] = (int32_t)((uint64_t)(moe_rand_uniform(c->seed, 1, 0, (uint32_t)t, 0) *
                                      moe_rand_uniform(c->seed, 2, 0, (uint32_t)t, 0) * (double)V) %
                           (uint64_t)V);
    pair ids = ck_ids(c, tok, N), wte = ck_rand(c, c->ct, V * C, 1), out = ck_mk(c, c->ct, N * C, NULL);
    B->embedding_forward(B, TB(out), TB(ids), TB(wte), N, C);
    R->embedding_forward(R, TR(out), TR(ids), TR(wte), N, C);
    ck_cmp(c, "embedding", out);
    pair g = ck_rand(c, c->ct, N * C, 1), dw = ck_rand(c, c->ct, V * C, 1);
    B->embedding_backward(B, TB(dw), TB(g), TB(ids), N, C);
    R->embedding_backward(R, TR(dw), TR(g), TR(ids), N, C);
    ck_cmp(c, "embedding dwte", dw);
    pair all[] = {ids, wte, out, g, dw};
    drop_all(c, all, 5);
    free(tok);
}

static void check_rmsnorm(ck *c, int64_t N, int64_t C)
{
    moe_backend *B = c->B, *R = c->R;
    ck_shape(c, "N=%lld C=%lld", (long long)N, (long long)C);
    pair x = ck_rand(c, c->ct, N * C, 2), w = ck_rand(c, c->ct, C, 1), out = ck_mk(c, c->ct, N * C, NULL),
         rstd = ck_mk(c, c->ct, N, NULL);
    B->rmsnorm_forward(B, TB(out), TB(rstd), TB(x), TB(w), 1e-5, N, C);
    R->rmsnorm_forward(R, TR(out), TR(rstd), TR(x), TR(w), 1e-5, N, C);
    ck_cmp(c, "rmsnorm", out);
    ck_cmp(c, "rmsnorm rstd", rstd);
    pair g = ck_rand(c, c->ct, N * C, 1), dx = ck_rand(c, c->ct, N * C, 1), dw = ck_rand(c, c->ct, C, 1);
    moe_tensor bdx = TB(dx), bdw = TB(dw), rdx = TR(dx), rdw = TR(dw);
    B->rmsnorm_backward(B, &bdx, &bdw, TB(g), TB(x), TB(w), TB(rstd), N, C);
    R->rmsnorm_backward(R, &rdx, &rdw, TR(g), TR(x), TR(w), TR(rstd), N, C);
    ck_cmp(c, "rmsnorm dx", dx);
    ck_cmp(c, "rmsnorm dw", dw);
    pair all[] = {x, w, out, rstd, g, dx, dw};
    drop_all(c, all, 7);
}

static void check_rope(ck *c, int64_t Bn, int64_t S, int64_t nh, int64_t hd, int64_t pos0, double theta)
{
    moe_backend *B = c->B, *R = c->R;
    ck_shape(c, "B=%lld S=%lld nh=%lld hd=%lld pos0=%lld theta=%g", (long long)Bn, (long long)S, (long long)nh,
             (long long)hd, (long long)pos0, theta);
    const int64_t n = Bn * S * nh * hd;
    pair x = ck_rand(c, c->ct, n, 1), y = ck_mk(c, c->ct, n, NULL), dx = ck_rand(c, c->ct, n, 1);
    B->rope_forward(B, TB(y), TB(x), pos0, theta, Bn, S, nh, hd);
    R->rope_forward(R, TR(y), TR(x), pos0, theta, Bn, S, nh, hd);
    ck_cmp(c, "rope", y);
    B->rope_forward(B, TB(x), TB(x), pos0, theta, Bn, S, nh, hd); /* in place */
    R->rope_forward(R, TR(x), TR(x), pos0, theta, Bn, S, nh, hd);
    ck_cmp(c, "rope in place", x);
    B->rope_backward(B, TB(dx), TB(y), pos0, theta, Bn, S, nh, hd);
    R->rope_backward(R, TR(dx), TR(y), pos0, theta, Bn, S, nh, hd);
    ck_cmp(c, "rope backward", dx);
    pair all[] = {x, y, dx};
    drop_all(c, all, 3);
}

static void check_attention(ck *c, int64_t Bn, int64_t S, int64_t H, int64_t Hkv, int64_t hd)
{
    moe_backend *B = c->B, *R = c->R;
    ck_shape(c, "B=%lld S=%lld H=%lld Hkv=%lld hd=%lld", (long long)Bn, (long long)S, (long long)H, (long long)Hkv,
             (long long)hd);
    const int64_t nq = Bn * S * H * hd, nk = Bn * S * Hkv * hd;
    pair q = ck_rand(c, c->ct, nq, 1.5), k = ck_rand(c, c->ct, nk, 1.5), v = ck_rand(c, c->ct, nk, 1),
         out = ck_mk(c, c->ct, nq, NULL);
    /* each side saves what it saves: its own buffer */
    moe_buf *sb = NULL, *sr = NULL;
    if (B->alloc(B, c->ct, B->attention_saved(B, Bn, S, H), &sb) ||
        R->alloc(R, R->float_type, R->attention_saved(R, Bn, S, H), &sr)) {
        c->oom = 1;
        if (sb)
            B->free(B, sb);
        pair all[] = {q, k, v, out};
        drop_all(c, all, 4);
        return;
    }
    B->attention_forward(B, TB(out), (moe_tensor){sb, 0}, TB(q), TB(k), TB(v), Bn, S, H, Hkv, hd);
    R->attention_forward(R, TR(out), (moe_tensor){sr, 0}, TR(q), TR(k), TR(v), Bn, S, H, Hkv, hd);
    ck_cmp(c, "attention", out);
    pair g = ck_rand(c, c->ct, nq, 1), dq = ck_rand(c, c->ct, nq, 1), dk = ck_rand(c, c->ct, nk, 1),
         dv = ck_rand(c, c->ct, nk, 1);
    B->attention_backward(B, TB(dq), TB(dk), TB(dv), TB(g), TB(out), (moe_tensor){sb, 0}, TB(q), TB(k), TB(v), Bn, S,
                          H, Hkv, hd);
    R->attention_backward(R, TR(dq), TR(dk), TR(dv), TR(g), TR(out), (moe_tensor){sr, 0}, TR(q), TR(k), TR(v), Bn, S,
                          H, Hkv, hd);
    ck_cmp(c, "attention dq", dq);
    ck_cmp(c, "attention dk", dk);
    ck_cmp(c, "attention dv", dv);
    /* decode: batch 0's queries one position at a time against a cache of its keys and values */
    pair o = ck_mk(c, c->ct, H * hd, NULL);
    for (int64_t pos = 0; pos < S; pos += S > 8 ? S / 4 : 1) {
        const moe_tensor bq = moe_tensor_at(TB(q), pos * H * hd), rq = moe_tensor_at(TR(q), pos * H * hd);
        B->attention_decode(B, TB(o), bq, TB(k), TB(v), pos, H, Hkv, hd);
        R->attention_decode(R, TR(o), rq, TR(k), TR(v), pos, H, Hkv, hd);
        ck_cmp(c, "attention decode", o);
    }
    B->free(B, sb);
    R->free(R, sr);
    pair all[] = {q, k, v, out, g, dq, dk, dv, o};
    drop_all(c, all, 9);
}

static void check_head(ck *c, int64_t T, int64_t K, int64_t N)
{
    moe_backend *B = c->B, *R = c->R;
    ck_shape(c, "T=%lld K=%lld N=%lld", (long long)T, (long long)K, (long long)N);
    pair x = ck_rand(c, c->ct, T * K, 1), w = ck_rand(c, c->ct, N * K, 0.3), out = ck_mk(c, c->ct, T * N, NULL);
    B->matmul_t_forward(B, TB(out), TB(x), TB(w), T, K, N);
    R->matmul_t_forward(R, TR(out), TR(x), TR(w), T, K, N);
    ck_cmp(c, "matmul_t", out);
    pair dout = ck_rand(c, c->ct, T * N, 1), dx = ck_rand(c, c->ct, T * K, 1), dw = ck_rand(c, c->ct, N * K, 1);
    moe_tensor bdx = TB(dx), bdw = TB(dw), rdx = TR(dx), rdw = TR(dw);
    B->matmul_t_backward(B, &bdx, &bdw, TB(dout), TB(x), TB(w), T, K, N);
    R->matmul_t_backward(R, &rdx, &rdw, TR(dout), TR(x), TR(w), T, K, N);
    ck_cmp(c, "matmul_t dx", dx);
    ck_cmp(c, "matmul_t dw", dw);
    pair bias = ck_rand(c, c->ct, N, 1), db = ck_rand(c, c->ct, N, 1);
    B->bias_forward(B, TB(out), TB(bias), T, N);
    R->bias_forward(R, TR(out), TR(bias), T, N);
    ck_cmp(c, "bias", out);
    B->bias_backward(B, TB(db), TB(dout), T, N);
    R->bias_backward(R, TR(db), TR(dout), T, N);
    ck_cmp(c, "bias backward", db);
    pair all[] = {x, w, out, dout, dx, dw, bias, db};
    drop_all(c, all, 8);
}

static void check_crossentropy(ck *c, int64_t N, int64_t V)
{
    moe_backend *B = c->B, *R = c->R;
    ck_shape(c, "N=%lld V=%lld", (long long)N, (long long)V);
    int32_t *tg = malloc((size_t)N * sizeof *tg);
    if (!tg) {
        c->oom = 1;
        return;
    }
    for (int64_t t = 0; t < N; t++) /* every 7th ignored (-1) */
        tg[t] = t % 7 == 3 ? -1 : (int32_t)((t * 13 + 5) % V);
    pair tgt = ck_ids(c, tg, N), z = ck_rand(c, c->ct, N * V, 2), probs = ck_mk(c, c->ct, N * V, NULL),
         loss = ck_mk(c, W, 1, NULL);
    B->crossentropy_forward(B, TB(loss), TB(probs), TB(z), TB(tgt), N, V);
    R->crossentropy_forward(R, TR(loss), TR(probs), TR(z), TR(tgt), N, V);
    ck_cmp(c, "crossentropy", loss);
    ck_cmp(c, "crossentropy probs", probs);
    pair dz = ck_rand(c, c->ct, N * V, 1);
    B->crossentropy_backward(B, TB(dz), TB(probs), TB(tgt), 0.7, N, V);
    R->crossentropy_backward(R, TR(dz), TR(probs), TR(tgt), 0.7, N, V);
    ck_cmp(c, "crossentropy dlogits", dz);
    /* probabilities in place of the logits, as the model runs it */
    B->crossentropy_forward(B, TB(loss), TB(z), TB(z), TB(tgt), N, V);
    R->crossentropy_forward(R, TR(loss), TR(z), TR(z), TR(tgt), N, V);
    ck_cmp(c, "crossentropy in place", z);
    pair all[] = {tgt, z, probs, loss, dz};
    drop_all(c, all, 5);
    free(tg);
}

static void check_optimizer(ck *c, int64_t n)
{
    moe_backend *B = c->B, *R = c->R;
    ck_shape(c, "n=%lld", (long long)n);
    const int narrow = c->ct != W && c->ct != MOE_F64;
    double *h = malloc((size_t)n * sizeof *h);
    if (!h) {
        c->oom = 1;
        return;
    }
    ck_randn(h, n, 0.5, c->seed + 5000);
    /* the master weights (f32) hold the values; the parameters are their rounding */
    pair master = ck_mk(c, W, n, h), p = ck_mk(c, c->ct, n, h);
    pair g = ck_rand(c, c->ct, n, 1), m = ck_rand(c, W, n, 0.1), v = ck_mk(c, W, n, NULL);
    for (int64_t i = 0; i < n; i++)
        h[i] = 0.01 * (1.0 + (double)(i % 5));
    ck_drop(c, v);
    v = ck_mk(c, W, n, h);
    pair acc = ck_mk(c, W, 1, (double[]){0.5}), scale = ck_mk(c, W, 1, NULL);
    B->grad_sumsq(B, TB(acc), TB(g), n);
    R->grad_sumsq(R, TR(acc), TR(g), n);
    ck_cmp(c, "grad_sumsq", acc);
    for (int clip = 0; clip < 2; clip++) {
        B->clip_scale(B, TB(scale), TB(acc), 0.5, clip ? 1.0 : 0.0);
        R->clip_scale(R, TR(scale), TR(acc), 0.5, clip ? 1.0 : 0.0);
        ck_cmp(c, clip ? "clip_scale" : "clip_scale off", scale);
    }
    moe_tensor bm = TB(master), rm = TR(master);
    B->adamw_step(B, narrow ? TB(p) : TB(master), narrow ? &bm : NULL, TB(m), TB(v), TB(g), TB(scale), 1e-2, 0.9,
                  0.95, 1e-8, 0.1, 3, n);
    R->adamw_step(R, TR(master), NULL, TR(m), TR(v), TR(g), TR(scale), 1e-2, 0.9, 0.95, 1e-8, 0.1, 3, n);
    (void)rm;
    ck_cmp(c, narrow ? "adamw master" : "adamw", master);
    ck_cmp(c, "adamw m", m);
    ck_cmp(c, "adamw v", v);
    if (narrow) { /* the parameters: the master weights, rounded; compared with ref's */
        pair all_p = {p.b, master.r, n};
        ck_cmp(c, "adamw param", all_p);
    }
    pair all[] = {master, p, g, m, v, acc, scale};
    drop_all(c, all, 7);
    free(h);
}

moe_status moe_check_model(ck *c, int quick)
{
    static const int64_t EMB[][3] = {{9, 5, 4}, {100, 67, 257}, {300, 300, 50}};
    static const int64_t RMS[][2] = {{5, 7}, {64, 300}, {129, 65}, {3, 1000}};
    static const struct {
        int64_t B, S, nh, hd, pos0;
        double theta;
    } ROPE[] = {{2, 5, 3, 8, 0, 1e4}, {1, 7, 2, 64, 3000, 1e6}, {2, 33, 5, 16, 1, 1e6}};
    /* head dims 32, 64, 128 take the cuda backend's flash kernels in bf16: one tile, a partial
     * second, several, and grouped-query heads */
    static const int64_t ATT[][5] = {{1, 1, 1, 1, 2},   {2, 7, 4, 2, 6},    {1, 13, 3, 1, 8},
                                     {2, 64, 4, 2, 32}, {2, 65, 4, 1, 8},   {1, 130, 2, 1, 16},
                                     {3, 70, 2, 2, 64}, {2, 200, 4, 2, 64}, {1, 129, 4, 2, 128}};
    static const int64_t HEAD[][3] = {{37, 24, 40}, {130, 64, 257}};
    /* V = 1000 and 70000: the cuda backend's rows held in registers and rows read twice */
    static const int64_t CE[][2] = {{7, 13}, {65, 257}, {100, 1000}, {3000, 37}, {3, 70000}};
    static const int64_t OPT[] = {1, 1000, 100003};
    const moe_workload w = {.batch = 24, .seq = 130, .heads = 4, .kv_heads = 4, .head_dim = 32, .d_model = 1024,
                            .rows_ffn = 1, .d_ff = 1};
    moe_status s;
    if ((s = c->B->reserve(c->B, &w)) || (s = c->R->reserve(c->R, &w)))
        return s;
    for (size_t i = 0; i < sizeof EMB / sizeof EMB[0] && !c->oom; i++)
        check_embedding(c, EMB[i][0], EMB[i][1], EMB[i][2]);
    for (size_t i = 0; i < sizeof RMS / sizeof RMS[0] && !c->oom; i++)
        check_rmsnorm(c, RMS[i][0], RMS[i][1]);
    for (size_t i = 0; i < sizeof ROPE / sizeof ROPE[0] && !c->oom; i++)
        check_rope(c, ROPE[i].B, ROPE[i].S, ROPE[i].nh, ROPE[i].hd, ROPE[i].pos0, ROPE[i].theta);
    for (size_t i = 0; i < sizeof ATT / sizeof ATT[0] && !c->oom; i++)
        if (!quick || ATT[i][1] < 100)
            check_attention(c, ATT[i][0], ATT[i][1], ATT[i][2], ATT[i][3], ATT[i][4]);
    for (size_t i = 0; i < sizeof HEAD / sizeof HEAD[0] && !c->oom; i++)
        check_head(c, HEAD[i][0], HEAD[i][1], HEAD[i][2]);
    for (size_t i = 0; i < sizeof CE / sizeof CE[0] && !c->oom; i++)
        check_crossentropy(c, CE[i][0], CE[i][1]);
    for (size_t i = 0; i < sizeof OPT / sizeof OPT[0] && !c->oom; i++)
        check_optimizer(c, OPT[i]);
    return MOE_OK;
}

/* ---- the MoE layer ------------------------------------------------------------------------------ */

/* (router, activation, variant): the options rotate so each is on somewhere (test_cpu_layer.c) */
static void layer_config(moe_layer_config *lc, moe_router_kind r, moe_activation act, int v, int big)
{
    moe_layer_config_default(lc);
    lc->d_model = big ? 64 : 12;
    lc->d_ff = big ? 128 : 20;
    lc->n_experts = big ? 8 : 5;
    lc->top_k = 2;
    lc->router = r;
    lc->act = act;
    lc->seed = 99 + (uint64_t)v;
    switch (r) {
    case MOE_ROUTER_TOPK:
        lc->capacity_factor = v % 2 ? 1.0 : 0;
        lc->drop_policy = v % 3 == 1 ? MOE_DROP_PROBABILITY : MOE_DROP_POSITION;
        lc->second_policy = (moe_second_policy)(v % 3);
        lc->use_bias = v % 2;
        lc->score = v == 3 ? MOE_SCORE_SIGMOID : MOE_SCORE_SOFTMAX;
        lc->renormalize = v != 4;
        lc->jitter_eps = v == 2 ? 0.05 : 0;
        break;
    case MOE_ROUTER_NOISY_TOPK:
        lc->capacity_factor = v % 2 ? 1.25 : 0;
        lc->top_k = v % 2 ? 2 : 3;
        lc->jitter_eps = 0.02;
        break;
    case MOE_ROUTER_EXPERT_CHOICE:
        lc->capacity_factor = 1.5;
        lc->renormalize = 0;
        break;
    case MOE_ROUTER_HASH:
        lc->top_k = 1;
        break;
    case MOE_ROUTER_SINKHORN:
        lc->capacity_factor = v % 2 ? 1.0 : 0;
        lc->sinkhorn_iters = 5;
        break;
    }
    if (r != MOE_ROUTER_HASH) {
        lc->lb_coef = 0.01;
        lc->importance_coef = 0.02;
        lc->load_coef = 0.03;
        lc->z_coef = 0.001;
        lc->mi_coef = v % 2 ? 0.05 : 0;
        lc->n_tasks = v % 2 ? 3 : 0;
    }
    lc->n_shared = v % 2 ? 0 : 1 + v % 3 / 2;
    lc->d_ff_shared = big ? 64 : 8;
    lc->shared_gate = lc->n_shared && v % 4 == 0;
    lc->residual = v % 3 == 0;
    lc->d_ff_dense = big ? 96 : 10;
}

/* one row over the named tensor of both layers (grad or param) */
static void layer_cmp(ck *c, const char *op, moe_layer *lb, moe_layer *lr, const char *name, int64_t n, int grad)
{
    double *a = malloc((size_t)n * sizeof *a), *r = malloc((size_t)n * sizeof *r);
    if (!a || !r) {
        c->oom = 1;
        free(a), free(r);
        return;
    }
    moe_status s = grad ? moe_layer_get_grad(lb, name, a) : moe_layer_get_param(lb, name, a);
    if (!s)
        s = grad ? moe_layer_get_grad(lr, name, r) : moe_layer_get_param(lr, name, r);
    ck_row(c, op, s ? INFINITY : ck_rel(a, r, n), c->tol, s ? moe_last_error() : NULL);
    free(a), free(r);
}

static void check_layer(ck *c, const moe_layer_config *lc, int64_t T)
{
    moe_backend *B = c->B, *R = c->R;
    ck_shape(c, "%s/%s T=%lld d=%lld f=%lld E=%lld k=%lld%s%s%s%s", moe_router_name(lc->router),
             moe_activation_name(lc->act), (long long)T, (long long)lc->d_model, (long long)lc->d_ff,
             (long long)lc->n_experts, (long long)lc->top_k, lc->capacity_factor > 0 ? " cf" : "",
             lc->n_shared ? " shared" : "", lc->residual ? " residual" : "", lc->use_bias ? " bias" : "");
    const int64_t d = lc->d_model;
    moe_layer *lb = NULL, *lr = NULL;
    if (moe_layer_create(lc, B, T, NULL, &lb) || moe_layer_create(lc, R, T, NULL, &lr) || moe_layer_init(lb, 1.0)) {
        ck_row(c, "layer", INFINITY, 0, moe_last_error());
        moe_layer_free(lb);
        return;
    }
    /* ref takes the backend's parameters, as the backend stores them */
    const moe_arena *P = moe_layer_params(lb);
    for (int i = 0; i < P->n && !c->oom; i++) {
        const moe_view *v = &P->views[i];
        double *h = malloc((size_t)v->numel * sizeof *h);
        if (!h) {
            c->oom = 1;
            break;
        }
        if (!strcmp(v->name, "router.bias")) { /* a non-zero bias, so that it matters */
            ck_randn(h, v->numel, 0.05, c->seed + 6000);
            moe_layer_set_param(lb, v->name, h);
        }
        moe_layer_get_param(lb, v->name, h);
        moe_layer_set_param(lr, v->name, h);
        free(h);
    }
    int32_t *ids = malloc((size_t)(2 * T) * sizeof *ids);
    if (!ids) {
        c->oom = 1;
        moe_layer_free(lb), moe_layer_free(lr);
        return;
    }
    for (int64_t q = 0; q < T; q++) {
        ids[q] = (int32_t)(q * 17 + 3);
        ids[T + q] = (int32_t)(q % 3);
    }
    pair x = ck_rand(c, c->ct, T * d, 1), dy = ck_rand(c, c->ct, T * d, 1), y = ck_mk(c, c->ct, T * d, NULL),
         dx = ck_mk(c, c->ct, T * d, NULL), id = ck_ids(c, ids, 2 * T);
    const moe_tensor bid = TB(id), btask = moe_tensor_at(TB(id), T), rid = TR(id), rtask = moe_tensor_at(TR(id), T);
    moe_layer_zero_grad(lb);
    moe_layer_zero_grad(lr);
    moe_status s = moe_layer_forward(lb, TB(y), TB(x), &bid, &btask, T, (moe_key){3, 0, 0}, 1);
    if (!s)
        s = moe_layer_backward(lb, TB(dx), TB(dy));
    if (!s)
        s = moe_layer_forward(lr, TR(y), TR(x), &rid, &rtask, T, (moe_key){3, 0, 0}, 1);
    if (!s)
        s = moe_layer_backward(lr, TR(dx), TR(dy));
    if (s) {
        ck_row(c, "layer", INFINITY, 0, moe_last_error());
    } else {
        /* the same plan, then the numbers */
        moe_plan *hb = ck_host_plan(lc, T), *hr = ck_host_plan(lc, T);
        char note[160] = "";
        if (!hb || !hr || B->plan_download(B, hb, moe_layer_plan(lb)) || R->plan_download(R, hr, moe_layer_plan(lr)))
            snprintf(note, sizeof note, "plan download: %s", moe_last_error());
        else if (hb->n != hr->n || hb->dropped != hr->dropped)
            snprintf(note, sizeof note, "n %lld/%lld dropped %lld/%lld", (long long)hb->n, (long long)hr->n,
                     (long long)hb->dropped, (long long)hr->dropped);
        for (int64_t q = 0; !*note && q < hr->n; q++)
            if (hb->token[q] != hr->token[q] || hb->expert[q] != hr->expert[q])
                snprintf(note, sizeof note, "row %lld: token %d/%d expert %d/%d", (long long)q, hb->token[q],
                         hr->token[q], hb->expert[q], hr->expert[q]);
        ck_row(c, "layer plan", *note ? INFINITY : 0.0, c->tol, *note ? note : NULL);
        moe_plan_free(hb), moe_plan_free(hr);
        ck_cmp(c, "layer y", y);
        ck_cmp(c, "layer dx", dx);
        for (int i = 0; i < P->n; i++) {
            char op[96];
            snprintf(op, sizeof op, "layer grad %s", P->views[i].name);
            layer_cmp(c, op, lb, lr, P->views[i].name, P->views[i].numel, 1);
        }
        moe_aux_losses ab, ar;
        if (!moe_layer_aux(lb, &ab) && !moe_layer_aux(lr, &ar)) {
            const double av[] = {ab.lb, ab.importance, ab.load, ab.z, ab.mi, ab.total};
            const double rv[] = {ar.lb, ar.importance, ar.load, ar.z, ar.mi, ar.total};
            ck_row(c, "layer aux losses", ck_rel(av, rv, 6), c->tol, NULL);
        }
        if (lc->use_bias) { /* the aux-loss-free bias moves both the same way */
            moe_layer_update_bias(lb);
            moe_layer_update_bias(lr);
            layer_cmp(c, "layer bias update", lb, lr, "router.bias", lc->n_experts, 0);
        }
    }
    pair all[] = {x, dy, y, dx, id};
    drop_all(c, all, 5);
    free(ids);
    moe_layer_free(lb);
    moe_layer_free(lr);
}

moe_status moe_check_layers(ck *c, int quick)
{
    for (int r = 0; r <= MOE_ROUTER_SINKHORN && !c->oom; r++)
        for (int v = 0; v < 4 && !c->oom; v++) {
            moe_layer_config lc;
            layer_config(&lc, (moe_router_kind)r, (moe_activation)((r + v) % 5), v, 0);
            if (moe_layer_config_validate(&lc, 23) == MOE_OK)
                check_layer(c, &lc, 23);
        }
    if (!quick && !c->oom) {
        moe_layer_config lc;
        layer_config(&lc, MOE_ROUTER_TOPK, MOE_ACT_SWIGLU, 0, 1);
        check_layer(c, &lc, 257);
        layer_config(&lc, MOE_ROUTER_TOPK, MOE_ACT_GELU, 1, 1);
        check_layer(c, &lc, 263);
    }
    return MOE_OK;
}
