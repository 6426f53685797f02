/* The language model's non-MoE ops in ref: known values and finite-difference gradients. */
#include "testutil.h"
#ifdef _OPENMP
#include <omp.h>
#endif
#include "ref/model_ops.h"

/* Check forks a process per test, so each FD test keeps and prints its own counters. */
static tu_fd_stats g_stats;

#define FD_H 1e-5
#define FD_TOL 1e-6

static double dotp(const double *a, const double *b, int64_t n)
{
    double s = 0;
    for (int64_t i = 0; i < n; i++)
        s += a[i] * b[i];
    return s;
}

/* Checks one analytic gradient against central differences of loss and records it. */
static void fd_expect(const char *what, double *p, int64_t n, const double *grad, tu_loss_fn loss, void *ctx)
{
    double err = tu_fd_check(p, n, grad, loss, ctx, FD_H, &g_stats);
    ck_assert_msg(err <= FD_TOL, "%s: fd rel err %.3e > %.0e", what, err, FD_TOL);
}

static void fd_report(const char *op)
{
    printf("fd: %s worst rel err %.2e over %lld coordinates, skipped %lld\n", op, g_stats.worst,
           (long long)g_stats.checked, (long long)g_stats.skipped);
}

/* ---- embedding and residual --------------------------------------------------- */

typedef struct {
    int64_t N, C, V;
    int32_t *tok;
    double *wte, *out, *dout;
} emb_ctx;

static double emb_loss(void *c_, int *ok)
{
    emb_ctx *c = c_;
    moe_ref_embedding_forward(c->out, c->tok, c->wte, c->N, c->C);
    return dotp(c->out, c->dout, c->N * c->C);
}

START_TEST(test_embedding)
{
    emb_ctx c = {.N = 9, .C = 5, .V = 4};
    int32_t tok[9] = {0, 3, 3, 1, 0, 3, 2, 2, 3};
    c.tok = tok;
    c.wte = tu_alloc(c.V * c.C);
    c.out = tu_alloc(c.N * c.C);
    c.dout = tu_alloc(c.N * c.C);
    double *dwte = tu_alloc(c.V * c.C);
    tu_randn(c.wte, c.V * c.C, 1.0, 1);
    tu_randn(c.dout, c.N * c.C, 1.0, 2);
    tu_nan_fill(c.out, c.N * c.C);
    emb_loss(&c, NULL);
    for (int64_t t = 0; t < c.N; t++)
        for (int64_t j = 0; j < c.C; j++)
            ck_assert_double_eq(c.out[t * c.C + j], c.wte[tok[t] * c.C + j]);
    /* backward accumulates: start from 1 and subtract it after */
    for (int64_t i = 0; i < c.V * c.C; i++)
        dwte[i] = 1;
    moe_ref_embedding_backward(dwte, c.dout, c.tok, c.N, c.C);
    for (int64_t i = 0; i < c.V * c.C; i++)
        dwte[i] -= 1;
    fd_expect("embedding dwte", c.wte, c.V * c.C, dwte, emb_loss, &c);
    fd_report("embedding");
    free(c.wte), free(c.out), free(c.dout), free(dwte);
}
END_TEST

START_TEST(test_add)
{
    const int64_t n = 7;
    double a[7], b[7], out[7], g[7], da[7], db[7];
    tu_randn(a, n, 1, 3);
    tu_randn(b, n, 1, 4);
    tu_randn(g, n, 1, 5);
    moe_ref_add_forward(out, a, b, n);
    for (int64_t i = 0; i < n; i++)
        ck_assert_double_eq(out[i], a[i] + b[i]);
    moe_ref_add_forward(a, a, b, n); /* in place */
    for (int64_t i = 0; i < n; i++)
        ck_assert_double_eq(a[i], out[i]);
    for (int64_t i = 0; i < n; i++)
        da[i] = db[i] = 0.5;
    moe_ref_add_backward(da, db, g, n);
    moe_ref_add_backward(NULL, db, g, n);
    for (int64_t i = 0; i < n; i++) {
        ck_assert_double_eq(da[i], 0.5 + g[i]);
        ck_assert_double_eq(db[i], 0.5 + g[i] + g[i]);
    }
}
END_TEST

/* ---- RMSNorm ------------------------------------------------------------------ */

typedef struct {
    int64_t N, C;
    double eps;
    double *x, *w, *out, *rstd, *dout;
} rms_ctx;

static double rms_loss(void *c_, int *ok)
{
    rms_ctx *c = c_;
    moe_ref_rmsnorm_forward(c->out, c->rstd, c->x, c->w, c->eps, c->N, c->C);
    return dotp(c->out, c->dout, c->N * c->C);
}

START_TEST(test_rmsnorm)
{
    rms_ctx c = {.N = 6, .C = 7, .eps = 1e-5};
    c.x = tu_alloc(c.N * c.C);
    c.w = tu_alloc(c.C);
    c.out = tu_alloc(c.N * c.C);
    c.rstd = tu_alloc(c.N);
    c.dout = tu_alloc(c.N * c.C);
    double *dx = tu_alloc(c.N * c.C), *dw = tu_alloc(c.C);
    tu_randn(c.x, c.N * c.C, 1.5, 6);
    tu_randn(c.w, c.C, 1.0, 7);
    tu_randn(c.dout, c.N * c.C, 1.0, 8);
    rms_loss(&c, NULL);
    /* by definition: mean of (out / w)² over a row is mean(x²) / (mean(x²) + eps) */
    for (int64_t t = 0; t < c.N; t++) {
        double ms = dotp(c.x + t * c.C, c.x + t * c.C, c.C) / c.C, m2 = 0;
        for (int64_t j = 0; j < c.C; j++)
            m2 += pow(c.out[t * c.C + j] / c.w[j], 2) / c.C;
        ck_assert_double_eq_tol(m2, ms / (ms + c.eps), 1e-13);
        ck_assert_double_eq_tol(c.rstd[t], 1 / sqrt(ms + c.eps), 1e-13);
    }
    moe_ref_rmsnorm_backward(dx, dw, c.dout, c.x, c.w, c.rstd, c.N, c.C);
    fd_expect("rmsnorm dx", c.x, c.N * c.C, dx, rms_loss, &c);
    fd_expect("rmsnorm dw", c.w, c.C, dw, rms_loss, &c);
    /* NULL skips a gradient and leaves the other unchanged */
    double *dx2 = tu_alloc(c.N * c.C);
    moe_ref_rmsnorm_backward(dx2, NULL, c.dout, c.x, c.w, c.rstd, c.N, c.C);
    ck_assert_double_le(tu_rel_err(dx2, dx, c.N * c.C), 0);
    fd_report("rmsnorm");
    free(c.x), free(c.w), free(c.out), free(c.rstd), free(c.dout), free(dx), free(dw), free(dx2);
}
END_TEST

/* ---- RoPE ---------------------------------------------------------------------- */

typedef struct {
    int64_t B, S, nh, hd, pos0;
    double theta;
    double *x, *out, *dout;
} rope_ctx;

static double rope_loss(void *c_, int *ok)
{
    rope_ctx *c = c_;
    moe_ref_rope_forward(c->out, c->x, c->pos0, c->theta, c->B, c->S, c->nh, c->hd);
    return dotp(c->out, c->dout, c->B * c->S * c->nh * c->hd);
}

START_TEST(test_rope_values)
{
    const int64_t B = 2, S = 6, nh = 3, hd = 8, n = B * S * nh * hd;
    double *x = tu_alloc(n), *y = tu_alloc(n), *back = tu_alloc(n);
    tu_randn(x, n, 1, 9);
    /* position 0 is the identity */
    moe_ref_rope_forward(y, x, 0, 10000.0, 1, 1, nh, hd);
    for (int64_t i = 0; i < nh * hd; i++)
        ck_assert_double_eq(y[i], x[i]);
    /* a rotation: every (i, i + hd/2) pair keeps its length */
    moe_ref_rope_forward(y, x, 5, 10000.0, B, S, nh, hd);
    for (int64_t r = 0; r < B * S * nh; r++)
        for (int64_t i = 0; i < hd / 2; i++) {
            const double *a = x + r * hd, *b = y + r * hd;
            ck_assert_double_eq_tol(hypot(b[i], b[i + hd / 2]), hypot(a[i], a[i + hd / 2]), 1e-13);
        }
    /* the pair (i, i + hd/2) by hand: pair 1 of token s = 2 of batch 0, head 0, pos0 = 5 */
    {
        double ang = 7.0 * pow(10000.0, -2.0 / hd);
        const double *a = x + 2 * nh * hd, *b = y + 2 * nh * hd;
        ck_assert_double_eq_tol(b[1], a[1] * cos(ang) - a[1 + hd / 2] * sin(ang), 1e-14);
        ck_assert_double_eq_tol(b[1 + hd / 2], a[1 + hd / 2] * cos(ang) + a[1] * sin(ang), 1e-14);
    }
    /* backward is the inverse rotation */
    moe_ref_rope_backward(back, y, 5, 10000.0, B, S, nh, hd);
    ck_assert_double_le(tu_rel_err(back, x, n), 1e-14);
    /* in place equals out of place */
    memcpy(back, x, n * sizeof *x);
    moe_ref_rope_forward(back, back, 5, 10000.0, B, S, nh, hd);
    ck_assert_double_le(tu_rel_err(back, y, n), 0);
    /* relative positions: q(m)·k(n) depends on m − n only (same vectors at shifted positions) */
    {
        double q[8], k[8], qa[8], ka[8], qb[8], kb[8];
        tu_randn(q, hd, 1, 10);
        tu_randn(k, hd, 1, 11);
        moe_ref_rope_forward(qa, q, 7, 1e6, 1, 1, 1, hd);
        moe_ref_rope_forward(ka, k, 3, 1e6, 1, 1, 1, hd);
        moe_ref_rope_forward(qb, q, 104, 1e6, 1, 1, 1, hd);
        moe_ref_rope_forward(kb, k, 100, 1e6, 1, 1, 1, hd);
        ck_assert_double_eq_tol(dotp(qa, ka, hd), dotp(qb, kb, hd), 1e-12);
    }
    free(x), free(y), free(back);
}
END_TEST

START_TEST(test_rope_fd)
{
    rope_ctx c = {.B = 2, .S = 3, .nh = 2, .hd = 6, .pos0 = 4, .theta = 1e6};
    int64_t n = c.B * c.S * c.nh * c.hd;
    c.x = tu_alloc(n);
    c.out = tu_alloc(n);
    c.dout = tu_alloc(n);
    double *dx = tu_alloc(n);
    tu_randn(c.x, n, 1, 12);
    tu_randn(c.dout, n, 1, 13);
    moe_ref_rope_backward(dx, c.dout, c.pos0, c.theta, c.B, c.S, c.nh, c.hd);
    fd_expect("rope dx", c.x, n, dx, rope_loss, &c);
    fd_report("rope");
    free(c.x), free(c.out), free(c.dout), free(dx);
}
END_TEST

/* ---- attention ------------------------------------------------------------------ */

typedef struct {
    int64_t B, S, H, Hkv, hd;
    double *q, *k, *v, *out, *att, *dout;
} att_ctx;

static double att_loss(void *c_, int *ok)
{
    att_ctx *c = c_;
    moe_ref_attention_forward(c->out, c->att, c->q, c->k, c->v, c->B, c->S, c->H, c->Hkv, c->hd);
    return dotp(c->out, c->dout, c->B * c->S * c->H * c->hd);
}

static const struct {
    int64_t B, S, H, Hkv, hd;
} ATT_SHAPES[] = {
    {2, 5, 4, 2, 4}, /* grouped */
    {1, 4, 3, 1, 6}, /* multi-query */
    {2, 3, 2, 2, 2}, /* multi-head */
    {3, 1, 2, 1, 4}, /* one position */
};
#define N_ATT_SHAPES ((int)(sizeof ATT_SHAPES / sizeof ATT_SHAPES[0]))

START_TEST(test_attention_fd)
{
    att_ctx c = {.B = ATT_SHAPES[_i].B, .S = ATT_SHAPES[_i].S, .H = ATT_SHAPES[_i].H,
                 .Hkv = ATT_SHAPES[_i].Hkv, .hd = ATT_SHAPES[_i].hd};
    const int64_t nq = c.B * c.S * c.H * c.hd, nk = c.B * c.S * c.Hkv * c.hd, na = c.B * c.H * c.S * c.S;
    c.q = tu_alloc(nq), c.k = tu_alloc(nk), c.v = tu_alloc(nk);
    c.out = tu_alloc(nq), c.att = tu_alloc(na), c.dout = tu_alloc(nq);
    double *dq = tu_alloc(nq), *dk = tu_alloc(nk), *dv = tu_alloc(nk), *datt = tu_alloc(na);
    tu_randn(c.q, nq, 1, 20 + _i);
    tu_randn(c.k, nk, 1, 30 + _i);
    tu_randn(c.v, nk, 1, 40 + _i);
    tu_randn(c.dout, nq, 1, 50 + _i);
    tu_nan_fill(c.out, nq);
    tu_nan_fill(c.att, na);
    tu_nan_fill(datt, na);
    att_loss(&c, NULL);
    /* rows of att are distributions over the past, exactly zero over the future */
    for (int64_t r = 0; r < c.B * c.H * c.S; r++) {
        int64_t i = r % c.S;
        double s = 0;
        for (int64_t j = 0; j < c.S; j++) {
            ck_assert(j <= i || c.att[r * c.S + j] == 0);
            s += c.att[r * c.S + j];
        }
        ck_assert_double_eq_tol(s, 1, 1e-14);
    }
    moe_ref_attention_backward(dq, dk, dv, datt, c.dout, c.att, c.q, c.k, c.v, c.B, c.S, c.H, c.Hkv, c.hd);
    fd_expect("attention dq", c.q, nq, dq, att_loss, &c);
    fd_expect("attention dk", c.k, nk, dk, att_loss, &c);
    fd_expect("attention dv", c.v, nk, dv, att_loss, &c);
    printf("shape B=%lld S=%lld H=%lld Hkv=%lld hd=%lld: ", (long long)c.B, (long long)c.S, (long long)c.H,
           (long long)c.Hkv, (long long)c.hd);
    fd_report("attention");
    free(c.q), free(c.k), free(c.v), free(c.out), free(c.att), free(c.dout);
    free(dq), free(dk), free(dv), free(datt);
}
END_TEST

START_TEST(test_attention_values)
{
    /* S = 1: the only key is itself, so every head returns its KV head's v */
    const int64_t B = 2, H = 6, Hkv = 3, hd = 4;
    double q[2 * 6 * 4], k[2 * 3 * 4], v[2 * 3 * 4], out[2 * 6 * 4], att[2 * 6];
    tu_randn(q, B * H * hd, 3, 60);
    tu_randn(k, B * Hkv * hd, 3, 61);
    tu_randn(v, B * Hkv * hd, 1, 62);
    tu_nan_fill(out, B * H * hd);
    moe_ref_attention_forward(out, att, q, k, v, B, 1, H, Hkv, hd);
    for (int64_t b = 0; b < B; b++)
        for (int64_t h = 0; h < H; h++)
            for (int64_t d = 0; d < hd; d++)
                ck_assert_double_eq_tol(out[(b * H + h) * hd + d], v[(b * Hkv + h / 2) * hd + d], 1e-15);
    /* equal keys: uniform weights, so position i returns the mean of v over 0..i */
    {
        const int64_t S = 4;
        double q1[4 * 2], k1[4 * 2], v1[4 * 2], o1[4 * 2], a1[16];
        tu_randn(q1, S * 2, 1, 63);
        for (int64_t i = 0; i < S * 2; i++)
            k1[i] = 0.7;
        tu_randn(v1, S * 2, 1, 64);
        moe_ref_attention_forward(o1, a1, q1, k1, v1, 1, S, 1, 1, 2);
        for (int64_t i = 0; i < S; i++)
            for (int64_t d = 0; d < 2; d++) {
                double m = 0;
                for (int64_t j = 0; j <= i; j++)
                    m += v1[j * 2 + d] / (i + 1);
                ck_assert_double_eq_tol(o1[i * 2 + d], m, 1e-14);
            }
    }
}
END_TEST

START_TEST(test_attention_decode)
{
    /* decoding position S−1 against the cache equals the last row of full attention */
    const int64_t B = 1, S = 7, H = 4, Hkv = 2, hd = 6, Smax = 10;
    const int64_t nq = S * H * hd, nk = S * Hkv * hd;
    double *q = tu_alloc(nq), *k = tu_alloc(Smax * Hkv * hd), *v = tu_alloc(Smax * Hkv * hd);
    double *out = tu_alloc(nq), *att = tu_alloc(B * H * S * S), *o1 = tu_alloc(H * hd), *a1 = tu_alloc(H * S);
    tu_randn(q, nq, 1, 70);
    tu_randn(k, nk, 1, 71);
    tu_randn(v, nk, 1, 72);
    /* cache slots past pos hold garbage that must not be read */
    tu_nan_fill(k + nk, (Smax - S) * Hkv * hd);
    tu_nan_fill(v + nk, (Smax - S) * Hkv * hd);
    moe_ref_attention_forward(out, att, q, k, v, B, S, H, Hkv, hd);
    for (int64_t pos = 0; pos < S; pos++) {
        tu_nan_fill(o1, H * hd);
        moe_ref_attention_decode(o1, a1, q + pos * H * hd, k, v, pos, H, Hkv, hd);
        /* full attention over the prefix 0..pos: row pos of a causal run of length pos+1 */
        ck_assert_double_le(tu_rel_err(o1, out + pos * H * hd, H * hd), 1e-14);
    }
    free(q), free(k), free(v), free(out), free(att), free(o1), free(a1);
}
END_TEST

/* ---- cross-entropy ---------------------------------------------------------------- */

typedef struct {
    int64_t N, V;
    double dloss;
    int32_t *tgt;
    double *logits, *probs;
} ce_ctx;

static double ce_loss(void *c_, int *ok)
{
    ce_ctx *c = c_;
    return c->dloss * moe_ref_crossentropy_forward(c->probs, c->logits, c->tgt, c->N, c->V);
}

START_TEST(test_crossentropy_values)
{
    const int64_t N = 3, V = 11;
    double logits[33], probs[33];
    int32_t tgt[3] = {0, 5, 10};
    for (int64_t i = 0; i < N * V; i++)
        logits[i] = 2.5; /* uniform */
    ck_assert_double_eq_tol(moe_ref_crossentropy_forward(probs, logits, tgt, N, V), log((double)V), 1e-14);
    for (int64_t i = 0; i < N * V; i++)
        ck_assert_double_eq_tol(probs[i], 1.0 / V, 1e-15);
    /* huge logits do not overflow; the target with a +1000 margin costs ~0 */
    logits[5 + V] = 1000;
    tgt[0] = -1, tgt[2] = -1;
    double l = moe_ref_crossentropy_forward(probs, logits, tgt, N, V);
    ck_assert(isfinite(l) && l >= 0 && l < 1e-300);
    /* all rows ignored: loss 0 and no gradient */
    int32_t none[3] = {-1, -1, -1};
    double d[33] = {0};
    ck_assert_double_eq(moe_ref_crossentropy_forward(probs, logits, none, N, V), 0);
    moe_ref_crossentropy_backward(d, probs, none, 1.0, N, V);
    for (int64_t i = 0; i < N * V; i++)
        ck_assert_double_eq(d[i], 0);
    /* in place: probs over logits */
    double z[33];
    tu_randn(z, N * V, 2, 80);
    int32_t t3[3] = {1, 2, 3};
    double l1 = moe_ref_crossentropy_forward(probs, z, t3, N, V);
    double l2 = moe_ref_crossentropy_forward(z, z, t3, N, V);
    ck_assert_double_eq(l1, l2);
    ck_assert_double_le(tu_rel_err(z, probs, N * V), 0);
}
END_TEST

START_TEST(test_crossentropy_fd)
{
    ce_ctx c = {.N = 7, .V = 13, .dloss = 1.7};
    int32_t tgt[7] = {3, -1, 0, 12, 12, -1, 5};
    c.tgt = tgt;
    c.logits = tu_alloc(c.N * c.V);
    c.probs = tu_alloc(c.N * c.V);
    double *dl = tu_alloc(c.N * c.V);
    tu_randn(c.logits, c.N * c.V, 2, 81);
    ce_loss(&c, NULL);
    moe_ref_crossentropy_backward(dl, c.probs, c.tgt, c.dloss, c.N, c.V);
    fd_expect("crossentropy dlogits", c.logits, c.N * c.V, dl, ce_loss, &c);
    /* ignored rows get exactly no gradient */
    for (int64_t j = 0; j < c.V; j++)
        ck_assert(dl[1 * c.V + j] == 0 && dl[5 * c.V + j] == 0);
    fd_report("crossentropy");
    free(c.logits), free(c.probs), free(dl);
}
END_TEST

/* ---- AdamW, norm, clipping --------------------------------------------------------- */

START_TEST(test_adamw)
{
    /* two steps by hand (Python, the formulas of the header): p = 1, lr 0.1, wd 0.01,
     * betas (0.9, 0.999), eps 1e-8, g = 0.5 then −0.25 */
    double p = 1, m = 0, v = 0, g = 0.5;
    moe_ref_adamw_step(&p, &m, &v, &g, 0.1, 0.9, 0.999, 1e-8, 0.01, 1.0, 1, 1);
    ck_assert_double_eq_tol(p, 0.899000002, 1e-15);
    ck_assert_double_eq_tol(m, 0.05, 1e-16);
    ck_assert_double_eq_tol(v, 0.00025, 1e-18);
    g = -0.5; /* with grad_scale 0.5: the gradient −0.25 */
    moe_ref_adamw_step(&p, &m, &v, &g, 0.1, 0.9, 0.999, 1e-8, 0.01, 0.5, 2, 1);
    ck_assert_double_eq_tol(p, 0.8714672987058464, 1e-15);
    ck_assert_double_eq_tol(m, 0.02, 1e-16);
    ck_assert_double_eq_tol(v, 0.00031225, 1e-18);
    /* zero gradient and no decay: nothing moves; decay alone shrinks p by lr·wd */
    double p2[2] = {3, -2}, m2[2] = {0}, v2[2] = {0}, g2[2] = {0};
    moe_ref_adamw_step(p2, m2, v2, g2, 0.01, 0.9, 0.95, 1e-8, 0.0, 1.0, 1, 2);
    ck_assert_double_eq(p2[0], 3);
    moe_ref_adamw_step(p2, m2, v2, g2, 0.01, 0.9, 0.95, 1e-8, 0.1, 1.0, 2, 2);
    ck_assert_double_eq_tol(p2[0], 3 * (1 - 0.001), 1e-15);
    ck_assert_double_eq_tol(p2[1], -2 * (1 - 0.001), 1e-15);
}
END_TEST

START_TEST(test_grad_norm)
{
    double g[4] = {3, -4, 0, 12};
    ck_assert_double_eq(moe_ref_grad_sumsq(g, 4), 169);
    ck_assert_double_eq(moe_ref_grad_sumsq(g, 0), 0);
    ck_assert_double_eq_tol(moe_ref_clip_scale(169, 1.3), 1.3 / (13 + 1e-6), 1e-16);
    ck_assert_double_eq(moe_ref_clip_scale(169, 100), 1);
    ck_assert_double_eq(moe_ref_clip_scale(169, 0), 1);
    ck_assert_double_eq(moe_ref_clip_scale(0, 1), 1);
}
END_TEST

static Suite *suite(void)
{
    Suite *s = suite_create("model_ops");
    TCase *tc = tcase_create("ref");
    tcase_set_timeout(tc, 60);
    tcase_add_test(tc, test_embedding);
    tcase_add_test(tc, test_add);
    tcase_add_test(tc, test_rmsnorm);
    tcase_add_test(tc, test_rope_values);
    tcase_add_test(tc, test_rope_fd);
    tcase_add_loop_test(tc, test_attention_fd, 0, N_ATT_SHAPES);
    tcase_add_test(tc, test_attention_values);
    tcase_add_test(tc, test_attention_decode);
    tcase_add_test(tc, test_crossentropy_values);
    tcase_add_test(tc, test_crossentropy_fd);
    tcase_add_test(tc, test_adamw);
    tcase_add_test(tc, test_grad_norm);
    suite_add_tcase(s, tc);
    return s;
}

int main(void)
{
#ifdef _OPENMP
    /* The FD loops call tiny ops thousands of times; with busy-waiting OpenMP threads on
     * a loaded machine that costs seconds for nothing. The ref ops' threaded paths are
     * exercised by test_cpu_model_ops, which runs them on the whole team. */
    omp_set_num_threads(1);
#endif
    return tu_run(suite());
}
