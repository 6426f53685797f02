/*
 * The language model's ops on the ref backend: each calls its double twin in
 * ref/model_ops.h. The LM head with the weight in [N, K] layout and the bias add have no
 * twin there; they are the obvious loops, here.
 */
#include <math.h>

#include "ref/model_ops.h"
#include "ref/ref_backend.h"

static void embedding_forward(moe_backend *b, moe_tensor out, moe_tensor tokens, moe_tensor wte, int64_t N,
                              int64_t C)
{
    moe_ref_embedding_forward(D(out), IDS(tokens), D(wte), N, C);
}

static void embedding_backward(moe_backend *b, moe_tensor dwte, moe_tensor dout, moe_tensor tokens, int64_t N,
                               int64_t C)
{
    moe_ref_embedding_backward(D(dwte), D(dout), IDS(tokens), N, C);
}

static void rmsnorm_forward(moe_backend *b, moe_tensor out, moe_tensor rstd, moe_tensor x, moe_tensor w, double eps,
                            int64_t N, int64_t C)
{
    moe_ref_rmsnorm_forward(D(out), D(rstd), D(x), D(w), eps, N, C);
}

static void rmsnorm_backward(moe_backend *b, moe_tensor *dx, moe_tensor *dw, moe_tensor dout, moe_tensor x,
                             moe_tensor w, moe_tensor rstd, int64_t N, int64_t C)
{
    moe_ref_rmsnorm_backward(DOPT(dx), DOPT(dw), D(dout), D(x), D(w), D(rstd), N, C);
}

static void rope_forward(moe_backend *b, moe_tensor out, moe_tensor x, int64_t pos0, double theta, int64_t B,
                         int64_t S, int64_t nh, int64_t hd)
{
    moe_ref_rope_forward(D(out), D(x), pos0, theta, B, S, nh, hd);
}

static void rope_backward(moe_backend *b, moe_tensor dx, moe_tensor dout, int64_t pos0, double theta, int64_t B,
                          int64_t S, int64_t nh, int64_t hd)
{
    moe_ref_rope_backward(D(dx), D(dout), pos0, theta, B, S, nh, hd);
}

/* the oracle saves the probabilities [B, H, S, S] */
static int64_t attention_saved(moe_backend *b, int64_t B, int64_t S, int64_t H)
{
    return B * H * S * S;
}

static void attention_forward(moe_backend *b, moe_tensor out, moe_tensor att, moe_tensor q, moe_tensor k,
                              moe_tensor v, int64_t B, int64_t S, int64_t H, int64_t Hkv, int64_t hd)
{
    moe_ref_attention_forward(D(out), D(att), D(q), D(k), D(v), B, S, H, Hkv, hd);
}

static void attention_backward(moe_backend *b, moe_tensor dq, moe_tensor dk, moe_tensor dv, moe_tensor dout,
                               moe_tensor out, moe_tensor att, moe_tensor q, moe_tensor k, moe_tensor v, int64_t B,
                               int64_t S, int64_t H, int64_t Hkv, int64_t hd)
{
    double *datt = moe_ref_scratch(b, B * H * S * S, "attention_backward");
    if (datt)
        moe_ref_attention_backward(D(dq), D(dk), D(dv), datt, D(dout), D(att), D(q), D(k), D(v), B, S, H, Hkv, hd);
}

static void attention_decode(moe_backend *b, moe_tensor out, moe_tensor q, moe_tensor kc, moe_tensor vc, int64_t pos,
                             int64_t H, int64_t Hkv, int64_t hd)
{
    double *att = moe_ref_scratch(b, H * (pos + 1), "attention_decode");
    if (att)
        moe_ref_attention_decode(D(out), att, D(q), D(kc), D(vc), pos, H, Hkv, hd);
}

static void matmul_t_forward(moe_backend *b, moe_tensor out, moe_tensor x, moe_tensor w, int64_t T, int64_t K,
                             int64_t N)
{
    double *o = D(out);
    const double *xx = D(x), *ww = D(w);
#pragma omp parallel for schedule(static)
    for (int64_t t = 0; t < T; t++)
        for (int64_t n = 0; n < N; n++) {
            double s = 0;
            for (int64_t k = 0; k < K; k++)
                s += xx[t * K + k] * ww[n * K + k];
            o[t * N + n] = s;
        }
}

static void matmul_t_backward(moe_backend *b, moe_tensor *dx, moe_tensor *dw, moe_tensor dout, moe_tensor x,
                              moe_tensor w, int64_t T, int64_t K, int64_t N)
{
    const double *g = D(dout), *xx = D(x), *ww = D(w);
    if (dx) {
        double *d = D(*dx);
#pragma omp parallel for schedule(static)
        for (int64_t t = 0; t < T; t++)
            for (int64_t n = 0; n < N; n++)
                for (int64_t k = 0; k < K; k++)
                    d[t * K + k] += g[t * N + n] * ww[n * K + k];
    }
    if (dw) {
        double *d = D(*dw);
#pragma omp parallel for schedule(static)
        for (int64_t n = 0; n < N; n++)
            for (int64_t t = 0; t < T; t++)
                for (int64_t k = 0; k < K; k++)
                    d[n * K + k] += g[t * N + n] * xx[t * K + k];
    }
}

static void bias_forward(moe_backend *b, moe_tensor y, moe_tensor bias, int64_t T, int64_t N)
{
    double *yy = D(y);
    const double *bb = D(bias);
    for (int64_t t = 0; t < T; t++)
        for (int64_t n = 0; n < N; n++)
            yy[t * N + n] += bb[n];
}

static void bias_backward(moe_backend *b, moe_tensor dbias, moe_tensor dy, int64_t T, int64_t N)
{
    double *db = D(dbias);
    const double *g = D(dy);
    for (int64_t t = 0; t < T; t++)
        for (int64_t n = 0; n < N; n++)
            db[n] += g[t * N + n];
}

static void crossentropy_forward(moe_backend *b, moe_tensor loss, moe_tensor probs, moe_tensor logits,
                                 moe_tensor targets, int64_t N, int64_t V)
{
    D(loss)[0] = moe_ref_crossentropy_forward(D(probs), D(logits), IDS(targets), N, V);
}

static void crossentropy_backward(moe_backend *b, moe_tensor dlogits, moe_tensor probs, moe_tensor targets,
                                  double dloss, int64_t N, int64_t V)
{
    moe_ref_crossentropy_backward(D(dlogits), D(probs), IDS(targets), dloss, N, V);
}

static void grad_sumsq(moe_backend *b, moe_tensor acc, moe_tensor g, int64_t n)
{
    D(acc)[0] += moe_ref_grad_sumsq(D(g), n);
}

static void clip_scale(moe_backend *b, moe_tensor scale, moe_tensor sumsq, double grad_scale, double max_norm)
{
    const double s2 = grad_scale * grad_scale * D(sumsq)[0];
    D(scale)[0] = isfinite(s2) ? (grad_scale * moe_ref_clip_scale(s2, max_norm)) : NAN;
}

static void adamw_step(moe_backend *b, moe_tensor p, moe_tensor *master, moe_tensor m, moe_tensor v, moe_tensor g,
                       moe_tensor scale, double lr, double beta1, double beta2, double eps, double wd, int64_t t,
                       int64_t n)
{
    const double sc = D(scale)[0];
    if (!isfinite(sc)) /* a non-finite gradient norm: the step is skipped, the host reports it */
        return;
    moe_ref_adamw_step(master ? D(*master) : D(p), D(m), D(v), D(g), lr, beta1, beta2, eps, wd, sc, t, n);
    if (master)
        b->copy(b, p, *master, n);
}

void moe_ref_model_ops(moe_backend *b)
{
    b->attention_saved = attention_saved;
    b->clip_scale = clip_scale;
    b->embedding_forward = embedding_forward;
    b->embedding_backward = embedding_backward;
    b->rmsnorm_forward = rmsnorm_forward;
    b->rmsnorm_backward = rmsnorm_backward;
    b->rope_forward = rope_forward;
    b->rope_backward = rope_backward;
    b->attention_forward = attention_forward;
    b->attention_backward = attention_backward;
    b->attention_decode = attention_decode;
    b->matmul_t_forward = matmul_t_forward;
    b->matmul_t_backward = matmul_t_backward;
    b->bias_forward = bias_forward;
    b->bias_backward = bias_backward;
    b->crossentropy_forward = crossentropy_forward;
    b->crossentropy_backward = crossentropy_backward;
    b->adamw_step = adamw_step;
    b->grad_sumsq = grad_sumsq;
}
