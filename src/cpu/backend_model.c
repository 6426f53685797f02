/*
 * The language model's ops on the cpu backend: each calls its fp32 twin in
 * src/cpu/model_ops.h. The LM head with the weight in [N, K] layout is one sgemm with
 * the weight transposed; the bias add reduces over tokens per column, in token order,
 * so the result does not depend on the thread count.
 */
#include <math.h>

#include "cpu/cpu.h"
#include "cpu/model_ops.h"

static void embedding_forward(moe_backend *b, moe_tensor out, moe_tensor tokens, moe_tensor wte, int64_t N,
                              int64_t C)
{
    moe_cpu_embedding_forward(F(out), I32(tokens), F(wte), N, C);
}

static void embedding_backward(moe_backend *b, moe_tensor dwte, moe_tensor dout, moe_tensor tokens, int64_t N,
                               int64_t C)
{
    moe_cpu_embedding_backward(F(dwte), F(dout), I32(tokens), N, C);
}

static void rmsnorm_forward(moe_backend *b, moe_tensor out, moe_tensor rstd, moe_tensor x, moe_tensor w, double eps,
                            int64_t N, int64_t C)
{
    moe_cpu_rmsnorm_forward(F(out), F(rstd), F(x), F(w), eps, N, C);
}

static void rmsnorm_backward(moe_backend *b, moe_tensor *dx, moe_tensor *dw, moe_tensor dout, moe_tensor x,
                             moe_tensor w, moe_tensor rstd, int64_t N, int64_t C)
{
    moe_cpu_rmsnorm_backward(FOPT(dx), FOPT(dw), F(dout), F(x), F(w), F(rstd), N, C);
}

static void rope_forward(moe_backend *b, moe_tensor out, moe_tensor x, int64_t pos0, double theta, int64_t B,
                         int64_t S, int64_t nh, int64_t hd)
{
    moe_cpu_rope_forward(F(out), F(x), pos0, theta, B, S, nh, hd);
}

static void rope_backward(moe_backend *b, moe_tensor dx, moe_tensor dout, int64_t pos0, double theta, int64_t B,
                          int64_t S, int64_t nh, int64_t hd)
{
    moe_cpu_rope_backward(F(dx), F(dout), pos0, theta, B, S, nh, hd);
}

/* cpu saves the probabilities: [B, H, S, S] */
static int64_t attention_saved(moe_backend *b, int64_t B, int64_t S, int64_t H)
{
    return B * H * S * S;
}

static void attention_forward(moe_backend *b, moe_tensor out, moe_tensor saved, moe_tensor q, moe_tensor k,
                              moe_tensor v, int64_t B, int64_t S, int64_t H, int64_t Hkv, int64_t hd)
{
    moe_cpu_attention_forward(F(out), F(saved), F(q), F(k), F(v), B, S, H, Hkv, hd);
}

static void attention_backward(moe_backend *b, moe_tensor dq, moe_tensor dk, moe_tensor dv, moe_tensor dout,
                               moe_tensor out, moe_tensor saved, moe_tensor q, moe_tensor k, moe_tensor v, int64_t B,
                               int64_t S, int64_t H, int64_t Hkv, int64_t hd)
{
    float *datt = moe_cpu_scratch(b, B * H * S * S, "attention_backward");
    if (datt)
        moe_cpu_attention_backward(F(dq), F(dk), F(dv), datt, F(dout), F(saved), F(q), F(k), F(v), B, S, H, Hkv,
                                   hd);
}

static void attention_decode(moe_backend *b, moe_tensor out, moe_tensor q, moe_tensor kc, moe_tensor vc, int64_t pos,
                             int64_t H, int64_t Hkv, int64_t hd)
{
    float *att = moe_cpu_scratch(b, H * (pos + 1), "attention_decode");
    if (att)
        moe_cpu_attention_decode(F(out), att, F(q), F(kc), F(vc), pos, H, Hkv, hd);
}

static void matmul_t_forward(moe_backend *b, moe_tensor out, moe_tensor x, moe_tensor w, int64_t T, int64_t K,
                             int64_t N)
{
    moe_cpu_sgemm_par(moe_cpu(b)->threads, 0, 1, T, N, K, 1.0f, F(x), K, F(w), K, 0.0f, F(out), N);
}

static void matmul_t_backward(moe_backend *b, moe_tensor *dx, moe_tensor *dw, moe_tensor dout, moe_tensor x,
                              moe_tensor w, int64_t T, int64_t K, int64_t N)
{
    const int nt = moe_cpu(b)->threads;
    if (dx) /* [T, K] += [T, N]·[N, K] */
        moe_cpu_sgemm_par(nt, 0, 0, T, K, N, 1.0f, F(dout), N, F(w), K, 1.0f, F(*dx), K);
    if (dw) /* [N, K] += [T, N]ᵀ·[T, K] */
        moe_cpu_sgemm_par(nt, 1, 0, N, K, T, 1.0f, F(dout), N, F(x), K, 1.0f, F(*dw), K);
}

static void bias_forward(moe_backend *b, moe_tensor y, moe_tensor bias, int64_t T, int64_t N)
{
    float *yy = F(y);
    const float *bb = F(bias);
#pragma omp parallel for schedule(static) if (T * N > 65536)
    for (int64_t t = 0; t < T; t++)
        for (int64_t n = 0; n < N; n++)
            yy[t * N + n] += bb[n];
}

static void bias_backward(moe_backend *b, moe_tensor dbias, moe_tensor dy, int64_t T, int64_t N)
{
    float *db = F(dbias);
    const float *g = F(dy);
#pragma omp parallel for schedule(static) if (T * N > 65536)
    for (int64_t n = 0; n < N; n++) {
        double s = 0;
        for (int64_t t = 0; t < T; t++)
            s += g[t * N + n];
        db[n] += (float)s;
    }
}

static void crossentropy_forward(moe_backend *b, moe_tensor loss, moe_tensor probs, moe_tensor logits,
                                 moe_tensor targets, int64_t N, int64_t V)
{
    F(loss)[0] = (float)moe_cpu_crossentropy_forward(F(probs), F(logits), I32(targets), N, V);
}

static void crossentropy_backward(moe_backend *b, moe_tensor dlogits, moe_tensor probs, moe_tensor targets,
                                  double dloss, int64_t N, int64_t V)
{
    moe_cpu_crossentropy_backward(F(dlogits), F(probs), I32(targets), dloss, N, V);
}

static void grad_sumsq(moe_backend *b, moe_tensor acc, moe_tensor g, int64_t n)
{
    /* the running sum stays in float between tensors; each tensor's own sum is double */
    F(acc)[0] = (float)((double)F(acc)[0] + moe_cpu_grad_sumsq(F(g), n));
}

static void clip_scale(moe_backend *b, moe_tensor scale, moe_tensor sumsq, double grad_scale, double max_norm)
{
    const double s2 = grad_scale * grad_scale * (double)F(sumsq)[0];
    F(scale)[0] = isfinite(s2) ? (float)(grad_scale * moe_cpu_clip_scale(s2, max_norm)) : NAN;
}

static void adamw_step(moe_backend *b, moe_tensor p, moe_tensor *master, moe_tensor m, moe_tensor v, moe_tensor g,
                       moe_tensor scale, double lr, double beta1, double beta2, double eps, double wd, int64_t t,
                       int64_t n)
{
    const float sc = F(scale)[0];
    if (!isfinite(sc)) /* a non-finite gradient norm: the step is skipped, the host reports it */
        return;
    moe_cpu_adamw_step(master ? F(*master) : F(p), F(m), F(v), F(g), lr, beta1, beta2, eps, wd, sc, t, n);
    if (master)
        b->copy(b, p, *master, n);
}

void moe_cpu_model_ops(moe_backend *b)
{
    b->embedding_forward = embedding_forward;
    b->embedding_backward = embedding_backward;
    b->rmsnorm_forward = rmsnorm_forward;
    b->rmsnorm_backward = rmsnorm_backward;
    b->rope_forward = rope_forward;
    b->rope_backward = rope_backward;
    b->attention_saved = attention_saved;
    b->attention_forward = attention_forward;
    b->attention_backward = attention_backward;
    b->attention_decode = attention_decode;
    b->matmul_t_forward = matmul_t_forward;
    b->matmul_t_backward = matmul_t_backward;
    b->bias_forward = bias_forward;
    b->bias_backward = bias_backward;
    b->crossentropy_forward = crossentropy_forward;
    b->crossentropy_backward = crossentropy_backward;
    b->grad_sumsq = grad_sumsq;
    b->clip_scale = clip_scale;
    b->adamw_step = adamw_step;
}
