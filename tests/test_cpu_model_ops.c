/* The language model's non-MoE ops in cpu (fp32) against ref (double); token sampling. */
#include "testutil.h"
#ifdef _OPENMP
#include <omp.h>
#endif
#include "ref/ref.h"
#include "ref/model_ops.h"
#include "cpu/model_ops.h"
#include "model/sample.h"

#define TOL 1e-5

/* ---- fp32 <-> double helpers ---------------------------------------------------- */

static float *f_alloc(int64_t n)
{
    float *p = calloc(n > 0 ? (size_t)n : 1, sizeof *p);
    ck_assert_ptr_nonnull(p);
    return p;
}

static void f_nan(float *x, int64_t n)
{
    for (int64_t i = 0; i < n; i++)
        x[i] = NAN;
}

/* random values rounded to fp32, the same numbers on both sides */
static void rand_pair(double *d, float *f, int64_t n, double scale, uint64_t seed)
{
    tu_randn(d, n, scale, seed);
    for (int64_t i = 0; i < n; i++) {
        f[i] = (float)d[i];
        d[i] = f[i];
    }
}

static double worst_err; /* of the current test (Check forks per test) */

/* ‖cpu − ref‖/‖ref‖ over n, NaN fails; checked against TOL and recorded */
static void expect_close(const char *what, const float *a, const double *r, int64_t n)
{
    double *ad = tu_alloc(n);
    for (int64_t i = 0; i < n; i++)
        ad[i] = a[i];
    double e = tu_rel_err(ad, r, n);
    free(ad);
    if (e > worst_err)
        worst_err = e;
    ck_assert_msg(e <= TOL, "%s: cpu vs ref rel err %.3e > %.0e", what, e, TOL);
}

static void report(const char *op)
{
    printf("cpu vs ref: %s worst rel err %.2e\n", op, worst_err);
}

/* ---- embedding ------------------------------------------------------------- */

static const int64_t EMB[][3] = {{1, 1, 1}, {9, 5, 4}, {100, 67, 257}, {300, 300, 50}, {64, 513, 3}};

START_TEST(test_embedding)
{
    const int64_t N = EMB[_i][0], C = EMB[_i][1], V = EMB[_i][2];
    int32_t *tok = malloc((size_t)N * sizeof *tok);
    for (int64_t t = 0; t < N; t++) /* skewed: some rows repeat many times */
        tok[t] = (int32_t)((uint64_t)(moe_rand_uniform(5, 1, 0, (uint32_t)t, 0) * moe_rand_uniform(5, 2, 0, (uint32_t)t, 0) * V) % V);
    double *wte = tu_alloc(V * C), *out = tu_alloc(N * C), *g = tu_alloc(N * C), *dwte = tu_alloc(V * C);
    float *wtef = f_alloc(V * C), *outf = f_alloc(N * C), *gf = f_alloc(N * C), *dwtef = f_alloc(V * C);
    rand_pair(wte, wtef, V * C, 1, 110);
    rand_pair(g, gf, N * C, 1, 111);
    rand_pair(dwte, dwtef, V * C, 1, 112);
    f_nan(outf, N * C);
    moe_ref_embedding_forward(out, tok, wte, N, C);
    moe_cpu_embedding_forward(outf, tok, wtef, N, C);
    expect_close("embedding out", outf, out, N * C);
    moe_ref_embedding_backward(dwte, g, tok, N, C);
    moe_cpu_embedding_backward(dwtef, gf, tok, N, C);
    expect_close("embedding dwte", dwtef, dwte, V * C);
    report("embedding");
    free(tok), free(wte), free(out), free(g), free(dwte), free(wtef), free(outf), free(gf), free(dwtef);
}
END_TEST

/* ---- RMSNorm ------------------------------------------------------------------------ */

static const int64_t RMS[][2] = {{1, 1}, {5, 7}, {64, 300}, {129, 65}, {3, 1000}};

START_TEST(test_rmsnorm)
{
    const int64_t N = RMS[_i][0], C = RMS[_i][1];
    double *x = tu_alloc(N * C), *w = tu_alloc(C), *out = tu_alloc(N * C), *rstd = tu_alloc(N);
    double *g = tu_alloc(N * C), *dx = tu_alloc(N * C), *dw = tu_alloc(C);
    float *xf = f_alloc(N * C), *wf = f_alloc(C), *outf = f_alloc(N * C), *rstdf = f_alloc(N);
    float *gf = f_alloc(N * C), *dxf = f_alloc(N * C), *dwf = f_alloc(C);
    rand_pair(x, xf, N * C, 2, 130);
    rand_pair(w, wf, C, 1, 131);
    rand_pair(g, gf, N * C, 1, 132);
    rand_pair(dx, dxf, N * C, 1, 133);
    rand_pair(dw, dwf, C, 1, 134);
    f_nan(outf, N * C);
    f_nan(rstdf, N);
    moe_ref_rmsnorm_forward(out, rstd, x, w, 1e-5, N, C);
    moe_cpu_rmsnorm_forward(outf, rstdf, xf, wf, 1e-5, N, C);
    expect_close("rmsnorm out", outf, out, N * C);
    expect_close("rmsnorm rstd", rstdf, rstd, N);
    moe_ref_rmsnorm_backward(dx, dw, g, x, w, rstd, N, C);
    moe_cpu_rmsnorm_backward(dxf, dwf, gf, xf, wf, rstdf, N, C);
    expect_close("rmsnorm dx", dxf, dx, N * C);
    expect_close("rmsnorm dw", dwf, dw, C);
    report("rmsnorm");
    free(x), free(w), free(out), free(rstd), free(g), free(dx), free(dw);
    free(xf), free(wf), free(outf), free(rstdf), free(gf), free(dxf), free(dwf);
}
END_TEST

/* ---- RoPE ----------------------------------------------------------------------------- */

static const struct {
    int64_t B, S, nh, hd, pos0;
    double theta;
} ROPE[] = {
    {1, 1, 1, 2, 0, 1e4}, {2, 5, 3, 8, 0, 1e4}, {1, 7, 2, 64, 3000, 1e6}, {3, 4, 1, 6, 17, 1e4}, {2, 33, 5, 16, 1, 1e6},
};

START_TEST(test_rope)
{
    const int64_t B = ROPE[_i].B, S = ROPE[_i].S, nh = ROPE[_i].nh, hd = ROPE[_i].hd, p0 = ROPE[_i].pos0;
    const double th = ROPE[_i].theta;
    const int64_t n = B * S * nh * hd;
    double *x = tu_alloc(n), *y = tu_alloc(n), *g = tu_alloc(n), *dx = tu_alloc(n);
    float *xf = f_alloc(n), *yf = f_alloc(n), *gf = f_alloc(n), *dxf = f_alloc(n);
    rand_pair(x, xf, n, 1, 140);
    rand_pair(g, gf, n, 1, 141);
    rand_pair(dx, dxf, n, 1, 142);
    f_nan(yf, n);
    moe_ref_rope_forward(y, x, p0, th, B, S, nh, hd);
    moe_cpu_rope_forward(yf, xf, p0, th, B, S, nh, hd);
    expect_close("rope out", yf, y, n);
    moe_cpu_rope_forward(xf, xf, p0, th, B, S, nh, hd); /* in place */
    expect_close("rope out (in place)", xf, y, n);
    moe_ref_rope_backward(dx, g, p0, th, B, S, nh, hd);
    moe_cpu_rope_backward(dxf, gf, p0, th, B, S, nh, hd);
    expect_close("rope dx", dxf, dx, n);
    report("rope");
    free(x), free(y), free(g), free(dx), free(xf), free(yf), free(gf), free(dxf);
}
END_TEST

/* ---- attention -------------------------------------------------------------------------- */

static const int64_t ATT[][5] = {
    /* B, S, H, Hkv, hd */
    {1, 1, 1, 1, 2}, {2, 1, 4, 2, 8}, {2, 7, 4, 2, 6}, {1, 13, 3, 1, 8},
    {3, 9, 4, 4, 4}, {2, 64, 4, 2, 32}, {2, 65, 4, 1, 8}, {1, 130, 2, 1, 16},
};

START_TEST(test_attention)
{
    const int64_t B = ATT[_i][0], S = ATT[_i][1], H = ATT[_i][2], Hkv = ATT[_i][3], hd = ATT[_i][4];
    const int64_t nq = B * S * H * hd, nk = B * S * Hkv * hd, na = B * H * S * S;
    double *q = tu_alloc(nq), *k = tu_alloc(nk), *v = tu_alloc(nk), *out = tu_alloc(nq), *att = tu_alloc(na);
    double *g = tu_alloc(nq), *dq = tu_alloc(nq), *dk = tu_alloc(nk), *dv = tu_alloc(nk), *datt = tu_alloc(na);
    float *qf = f_alloc(nq), *kf = f_alloc(nk), *vf = f_alloc(nk), *outf = f_alloc(nq), *attf = f_alloc(na);
    float *gf = f_alloc(nq), *dqf = f_alloc(nq), *dkf = f_alloc(nk), *dvf = f_alloc(nk), *dattf = f_alloc(na);
    rand_pair(q, qf, nq, 1.5, 150);
    rand_pair(k, kf, nk, 1.5, 151);
    rand_pair(v, vf, nk, 1, 152);
    rand_pair(g, gf, nq, 1, 153);
    rand_pair(dq, dqf, nq, 1, 154);
    rand_pair(dk, dkf, nk, 1, 155);
    rand_pair(dv, dvf, nk, 1, 156);
    f_nan(outf, nq);
    f_nan(attf, na);
    f_nan(dattf, na);
    moe_ref_attention_forward(out, att, q, k, v, B, S, H, Hkv, hd);
    moe_cpu_attention_forward(outf, attf, qf, kf, vf, B, S, H, Hkv, hd);
    expect_close("attention out", outf, out, nq);
    expect_close("attention probabilities", attf, att, na);
    moe_ref_attention_backward(dq, dk, dv, datt, g, att, q, k, v, B, S, H, Hkv, hd);
    moe_cpu_attention_backward(dqf, dkf, dvf, dattf, gf, attf, qf, kf, vf, B, S, H, Hkv, hd);
    expect_close("attention dq", dqf, dq, nq);
    expect_close("attention dk", dkf, dk, nk);
    expect_close("attention dv", dvf, dv, nk);
    printf("B=%lld S=%lld H=%lld Hkv=%lld hd=%lld: ", (long long)B, (long long)S, (long long)H, (long long)Hkv,
           (long long)hd);
    report("attention");
    free(q), free(k), free(v), free(out), free(att), free(g), free(dq), free(dk), free(dv), free(datt);
    free(qf), free(kf), free(vf), free(outf), free(attf), free(gf), free(dqf), free(dkf), free(dvf), free(dattf);
}
END_TEST

START_TEST(test_attention_decode)
{
    /* the cpu decode step against the ref decode step and against the cpu full
     * attention's row, at every position, with NaN past the cache's end */
    const int64_t S = ATT[_i][1], H = ATT[_i][2], Hkv = ATT[_i][3], hd = ATT[_i][4], Smax = S + 3;
    const int64_t nq = S * H * hd, nk = S * Hkv * hd, nc = Smax * Hkv * hd;
    double *q = tu_alloc(nq), *k = tu_alloc(nc), *v = tu_alloc(nc), *o = tu_alloc(H * hd), *a = tu_alloc(H * S);
    double *full = tu_alloc(nq);
    float *qf = f_alloc(nq), *kf = f_alloc(nc), *vf = f_alloc(nc), *of = f_alloc(H * hd), *af = f_alloc(H * S);
    float *fullf = f_alloc(nq), *attf = f_alloc(H * S * S);
    rand_pair(q, qf, nq, 1.5, 160);
    rand_pair(k, kf, nk, 1.5, 161);
    rand_pair(v, vf, nk, 1, 162);
    tu_nan_fill(k + nk, nc - nk), tu_nan_fill(v + nk, nc - nk);
    f_nan(kf + nk, nc - nk), f_nan(vf + nk, nc - nk);
    moe_cpu_attention_forward(fullf, attf, qf, kf, vf, 1, S, H, Hkv, hd);
    for (int64_t i = 0; i < nq; i++)
        full[i] = fullf[i];
    for (int64_t pos = 0; pos < S; pos++) {
        f_nan(of, H * hd);
        moe_ref_attention_decode(o, a, q + pos * H * hd, k, v, pos, H, Hkv, hd);
        moe_cpu_attention_decode(of, af, qf + pos * H * hd, kf, vf, pos, H, Hkv, hd);
        expect_close("decode vs ref decode", of, o, H * hd);
        expect_close("cpu decode vs cpu full attention", of, full + pos * H * hd, H * hd);
    }
    report("attention decode");
    free(q), free(k), free(v), free(o), free(a), free(full);
    free(qf), free(kf), free(vf), free(of), free(af), free(fullf), free(attf);
}
END_TEST

/* ---- cross-entropy -------------------------------------------------------------------------- */

static const int64_t CE[][2] = {{1, 1}, {1, 2}, {7, 13}, {65, 257}, {100, 1000}, {3000, 37}};

START_TEST(test_crossentropy)
{
    const int64_t N = CE[_i][0], V = CE[_i][1];
    int32_t *tgt = malloc((size_t)N * sizeof *tgt);
    for (int64_t t = 0; t < N; t++)
        tgt[t] = (N > 1 && t % 5 == 3) ? -1 : (int32_t)((t * 7919) % V);
    double *z = tu_alloc(N * V), *p = tu_alloc(N * V), *d = tu_alloc(N * V);
    float *zf = f_alloc(N * V), *pf = f_alloc(N * V), *df = f_alloc(N * V);
    rand_pair(z, zf, N * V, 3, 170);
    rand_pair(d, df, N * V, 1, 171);
    f_nan(pf, N * V);
    double l = moe_ref_crossentropy_forward(p, z, tgt, N, V);
    double lf = moe_cpu_crossentropy_forward(pf, zf, tgt, N, V);
    ck_assert_msg(fabs(lf - l) <= TOL * fabs(l) + 1e-12, "loss %.9g vs ref %.9g", lf, l);
    expect_close("crossentropy probs", pf, p, N * V);
    moe_ref_crossentropy_backward(d, p, tgt, 0.37, N, V);
    moe_cpu_crossentropy_backward(df, pf, tgt, 0.37, N, V);
    expect_close("crossentropy dlogits", df, d, N * V);
    /* probs over the logits in place: same loss bits, same probs bits */
    float *pf2 = f_alloc(N * V);
    memcpy(pf2, pf, (size_t)(N * V) * sizeof *pf);
    double lf2 = moe_cpu_crossentropy_forward(zf, zf, tgt, N, V);
    ck_assert(lf2 == lf);
    ck_assert(memcmp(zf, pf2, (size_t)(N * V) * sizeof *zf) == 0);
    printf("N=%lld V=%lld: loss cpu %.9g ref %.9g; ", (long long)N, (long long)V, lf, l);
    report("crossentropy");
    free(tgt), free(z), free(p), free(d), free(zf), free(pf), free(df), free(pf2);
}
END_TEST

/* ---- AdamW, norm, clipping ---------------------------------------------------------------- */

START_TEST(test_adamw)
{
    const int64_t sizes[] = {1, 1000, 4097};
    for (int s = 0; s < 3; s++) {
        const int64_t n = sizes[s];
        double *p = tu_alloc(n), *m = tu_alloc(n), *v = tu_alloc(n), *g = tu_alloc(n);
        float *pf = f_alloc(n), *mf = f_alloc(n), *vf = f_alloc(n), *gf = f_alloc(n);
        rand_pair(p, pf, n, 1, 180);
        rand_pair(m, mf, n, 0.1, 181);
        rand_pair(g, gf, n, 1, 183);
        for (int64_t i = 0; i < n; i++) /* a second moment is >= 0 */
            v[i] = vf[i] = (float)(0.01 * m[i] * m[i] + 1e-4);
        for (int64_t t = 1; t <= 3; t++) {
            moe_ref_adamw_step(p, m, v, g, 3e-3, 0.9, 0.95, 1e-8, 0.1, 0.7, t, n);
            moe_cpu_adamw_step(pf, mf, vf, gf, 3e-3, 0.9, 0.95, 1e-8, 0.1, 0.7, t, n);
        }
        expect_close("adamw p", pf, p, n);
        expect_close("adamw m", mf, m, n);
        expect_close("adamw v", vf, v, n);
        free(p), free(m), free(v), free(g), free(pf), free(mf), free(vf), free(gf);
    }
    report("adamw");
}
END_TEST

START_TEST(test_grad_norm)
{
    const int64_t sizes[] = {0, 1, 100003};
    for (int s = 0; s < 3; s++) {
        const int64_t n = sizes[s];
        double *g = tu_alloc(n);
        float *gf = f_alloc(n);
        rand_pair(g, gf, n, 1, 190);
        double r = moe_ref_grad_sumsq(g, n), c = moe_cpu_grad_sumsq(gf, n);
        ck_assert_msg(fabs(c - r) <= 1e-12 * r, "sumsq n=%lld: %.17g vs %.17g", (long long)n, c, r);
        ck_assert_double_eq(moe_cpu_clip_scale(r, 1.0), moe_ref_clip_scale(r, 1.0));
        free(g), free(gf);
    }
    ck_assert_double_eq(moe_cpu_clip_scale(4, 0), 1);
    ck_assert_double_eq(moe_cpu_clip_scale(0.25, 1), 1);
}
END_TEST

/* ---- the same bits on any thread count ------------------------------------------------ */

START_TEST(test_thread_invariance)
{
#ifdef _OPENMP
    /* the reductions (dw, loss, norm, scatter-add) and per-head GEMMs must not depend on
     * how the work is split: run everything on 1 thread and on 3, compare the bits */
    const int64_t B = 2, S = 37, H = 4, Hkv = 2, hd = 8, C = 70, N = B * S, V = 29;
    const int64_t nq = N * H * hd, nk = N * Hkv * hd, na = B * H * S * S;
    double *tmp = tu_alloc(na);
    float *q = f_alloc(nq), *k = f_alloc(nk), *v = f_alloc(nk), *g = f_alloc(nq), *x = f_alloc(N * C);
    float *w = f_alloc(C), *z = f_alloc(N * V);
    rand_pair(tmp, q, nq, 1, 200), rand_pair(tmp, k, nk, 1, 201), rand_pair(tmp, v, nk, 1, 202);
    rand_pair(tmp, g, nq, 1, 203), rand_pair(tmp, x, N * C, 1, 204), rand_pair(tmp, w, C, 1, 205);
    rand_pair(tmp, z, N * V, 1, 206);
    int32_t *tok = malloc((size_t)N * sizeof *tok);
    for (int64_t t = 0; t < N; t++)
        tok[t] = (int32_t)((t * t) % V);
    float *res[2][9];
    double loss[2], norm[2];
    const int threads[2] = {1, 3};
    int old = omp_get_max_threads();
    for (int r = 0; r < 2; r++) {
        omp_set_num_threads(threads[r]);
        float *out = f_alloc(nq), *att = f_alloc(na), *dq = f_alloc(nq), *dk = f_alloc(nk), *dv = f_alloc(nk);
        float *datt = f_alloc(na), *dw = f_alloc(C), *dwte = f_alloc(V * C), *p = f_alloc(N * V);
        float *rstd = f_alloc(N), *y = f_alloc(N * C);
        moe_cpu_attention_forward(out, att, q, k, v, B, S, H, Hkv, hd);
        moe_cpu_attention_backward(dq, dk, dv, datt, g, att, q, k, v, B, S, H, Hkv, hd);
        moe_cpu_rmsnorm_forward(y, rstd, x, w, 1e-5, N, C);
        moe_cpu_rmsnorm_backward(NULL, dw, x, x, w, rstd, N, C);
        moe_cpu_embedding_backward(dwte, x, tok, N, C);
        loss[r] = moe_cpu_crossentropy_forward(p, z, tok, N, V);
        norm[r] = moe_cpu_grad_sumsq(x, N * C);
        float *keep[9] = {out, att, dq, dk, dv, dw, dwte, p, y};
        memcpy(res[r], keep, sizeof keep);
        free(datt), free(rstd);
    }
    omp_set_num_threads(old);
    const int64_t sizes[9] = {nq, na, nq, nk, nk, C, V * C, N * V, N * C};
    for (int i = 0; i < 9; i++) {
        ck_assert_msg(memcmp(res[0][i], res[1][i], (size_t)sizes[i] * sizeof(float)) == 0, "output %d differs", i);
        free(res[0][i]), free(res[1][i]);
    }
    ck_assert(loss[0] == loss[1] && norm[0] == norm[1]);
    free(tmp), free(q), free(k), free(v), free(g), free(x), free(w), free(z), free(tok);
#endif
}
END_TEST

/* ---- sampling ---------------------------------------------------------------------------- */

START_TEST(test_sample)
{
    const double z[6] = {1.0, 3.0, 2.0, 3.0, -1.0, 0.5};
    double p[6];
    int32_t tok = -1;
    /* greedy: the argmax, lower id on ties */
    ck_assert_int_eq(moe_sample_token(&tok, p, z, 6, 0.0, 0, 1.0, 0.99), MOE_OK);
    ck_assert_int_eq(tok, 1);
    /* plain softmax at temperature 2 */
    ck_assert_int_eq(moe_sample_probs(p, z, 6, 2.0, 0, 1.0), MOE_OK);
    double sum = 0;
    for (int j = 0; j < 6; j++)
        sum += exp(z[j] / 2);
    for (int j = 0; j < 6; j++)
        ck_assert_double_eq_tol(p[j], exp(z[j] / 2) / sum, 1e-15);
    /* top-k 3: ids 1, 3 (tied), then 2; renormalised */
    ck_assert_int_eq(moe_sample_probs(p, z, 6, 1.0, 3, 1.0), MOE_OK);
    double s3 = 2 * exp(3.0) + exp(2.0);
    ck_assert_double_eq_tol(p[1], exp(3.0) / s3, 1e-15);
    ck_assert_double_eq_tol(p[3], exp(3.0) / s3, 1e-15);
    ck_assert_double_eq_tol(p[2], exp(2.0) / s3, 1e-15);
    ck_assert(p[0] == 0 && p[4] == 0 && p[5] == 0);
    /* top-k 1 is greedy whatever u */
    ck_assert_int_eq(moe_sample_token(&tok, p, z, 6, 1.0, 1, 1.0, 0.999), MOE_OK);
    ck_assert_int_eq(tok, 1);
    /* top-p: the two tied tokens hold 2e³/Σ ≈ 0.73 of the mass; p = 0.5 keeps both
     * (the second crosses), p = 0.3 keeps the first alone */
    ck_assert_int_eq(moe_sample_probs(p, z, 6, 1.0, 0, 0.5), MOE_OK);
    ck_assert_double_eq_tol(p[1], 0.5, 1e-15);
    ck_assert_double_eq_tol(p[3], 0.5, 1e-15);
    ck_assert_int_eq(moe_sample_probs(p, z, 6, 1.0, 0, 0.3), MOE_OK);
    ck_assert_double_eq(p[1], 1);
    /* picking: cumulative in id order */
    const double q[4] = {0.25, 0, 0.5, 0.25};
    ck_assert_int_eq(moe_sample_pick(q, 4, 0.0), 0);
    ck_assert_int_eq(moe_sample_pick(q, 4, 0.2499), 0);
    ck_assert_int_eq(moe_sample_pick(q, 4, 0.25), 2);
    ck_assert_int_eq(moe_sample_pick(q, 4, 0.7499), 2);
    ck_assert_int_eq(moe_sample_pick(q, 4, 0.75), 3);
    ck_assert_int_eq(moe_sample_pick(q, 4, 0.9999999999), 3);
    /* frequencies follow the distribution over a grid of u */
    int hits[6] = {0};
    ck_assert_int_eq(moe_sample_probs(p, z, 6, 1.0, 0, 1.0), MOE_OK);
    for (int i = 0; i < 10000; i++) {
        ck_assert_int_eq(moe_sample_token(&tok, p, z, 6, 1.0, 0, 1.0, (i + 0.5) / 10000), MOE_OK);
        hits[tok]++;
    }
    double p_ref[6];
    moe_sample_probs(p_ref, z, 6, 1.0, 0, 1.0);
    for (int j = 0; j < 6; j++)
        ck_assert_double_eq_tol(hits[j] / 10000.0, p_ref[j], 2e-4);
    /* bad arguments name the field */
    double bad[3] = {0, NAN, 1};
    ck_assert_int_eq(moe_sample_probs(p, bad, 3, 1.0, 0, 1.0), MOE_ERR_ARG);
    ck_assert_ptr_nonnull(strstr(moe_last_error(), "logits[1]"));
    ck_assert_int_eq(moe_sample_probs(p, z, 6, -1.0, 0, 1.0), MOE_ERR_ARG);
    ck_assert_ptr_nonnull(strstr(moe_last_error(), "temperature"));
    ck_assert_int_eq(moe_sample_probs(p, z, 6, 1.0, 0, 0.0), MOE_ERR_ARG);
    ck_assert_ptr_nonnull(strstr(moe_last_error(), "top_p"));
    ck_assert_int_eq(moe_sample_probs(p, z, 0, 1.0, 0, 1.0), MOE_ERR_ARG);
    ck_assert_int_eq(moe_sample_token(&tok, p, z, 6, 1.0, 0, 1.0, 1.0), MOE_ERR_ARG);
    ck_assert_ptr_nonnull(strstr(moe_last_error(), "u ="));
}
END_TEST

#define NELEM(a) ((int)(sizeof(a) / sizeof((a)[0])))

static Suite *suite(void)
{
    Suite *s = suite_create("cpu_model_ops");
    TCase *tc = tcase_create("cpu_vs_ref");
    tcase_set_timeout(tc, 60);
    tcase_add_loop_test(tc, test_embedding, 0, NELEM(EMB));
    tcase_add_loop_test(tc, test_rmsnorm, 0, NELEM(RMS));
    tcase_add_loop_test(tc, test_rope, 0, NELEM(ROPE));
    tcase_add_loop_test(tc, test_attention, 0, NELEM(ATT));
    tcase_add_loop_test(tc, test_attention_decode, 0, NELEM(ATT));
    tcase_add_loop_test(tc, test_crossentropy, 0, NELEM(CE));
    tcase_add_test(tc, test_adamw);
    tcase_add_test(tc, test_grad_norm);
    tcase_add_test(tc, test_thread_invariance);
    suite_add_tcase(s, tc);
    TCase *ts = tcase_create("sample");
    tcase_add_test(ts, test_sample);
    suite_add_tcase(s, ts);
    return s;
}

int main(void)
{
    return tu_run(suite());
}
