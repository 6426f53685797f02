/*
 * backend.h — the table of operations that model and layer code are written against.
 *
 * A backend owns its buffers: model code holds moe_tensor handles (a buffer and an
 * element offset) and never dereferences them; values cross to the host only through
 * upload/download. Three backends share this table: ref (double, the oracle in ref/),
 * cpu (fp32, OpenBLAS), cuda (device memory). ggml's backend split and llm.c's
 * forward/backward pairs are the models.
 *
 * Ops follow ref/ref.h's conventions: outputs, saved buffers, inputs, parameters, sizes;
 * backward ops accumulate into gradients. A routing plan lives on the backend too
 * (moe_bplan) and is read back on the host with plan_download for statistics and tests,
 * or written from the host with plan_upload so two backends can run on the same plan.
 *
 * Every op exists on every backend so that every router and option of the reference
 * runs on each of them: jitter, noisy logits and their smooth load, every selection,
 * capacity and drop policy, the aux losses, the expert FFNs (routed, shared, dense).
 * Scalars that the layer needs on the host (loss values, per-expert vectors of E) are
 * returned or downloaded; E-sized math (cv², the bias update) is done on the host.
 */
#ifndef CMOE_BACKEND_H
#define CMOE_BACKEND_H

#include "cmoe.h"

typedef struct moe_buf moe_buf;     /* backend memory, opaque */
typedef struct moe_bplan moe_bplan; /* a routing plan in backend memory, opaque */

/* A view into a buffer: elements [off, off + n) of buf. Passed by value. */
typedef struct {
    moe_buf *buf;
    int64_t off;
} moe_tensor;

static inline moe_tensor moe_tensor_at(moe_tensor t, int64_t off)
{
    t.off += off;
    return t;
}

typedef struct moe_backend moe_backend;

struct moe_backend {
    const char *name;
    size_t elem_size; /* bytes per element in backend memory */

    /* memory */
    moe_status (*alloc)(moe_backend *b, int64_t n, moe_buf **out); /* zero-filled */
    void (*free)(moe_backend *b, moe_buf *buf);
    moe_status (*upload)(moe_backend *b, moe_tensor dst, const double *src, int64_t n);
    moe_status (*download)(moe_backend *b, double *dst, moe_tensor src, int64_t n);
    void (*fill)(moe_backend *b, moe_tensor t, double v, int64_t n);
    void (*copy)(moe_backend *b, moe_tensor dst, moe_tensor src, int64_t n);
    /* Scratch the ops may need (elements); called when a layer is created so that no op
     * allocates inside a training step. Backends without scratch return MOE_OK. */
    moe_status (*reserve)(moe_backend *b, int64_t n);
    /* Worker threads the backend uses (<= 0: leave as it is); returns the count in use. */
    int (*set_threads)(moe_backend *b, int n);

    /* dense: out = x·w; dx += dout·wᵀ, dw += xᵀ·dout */
    void (*matmul_forward)(moe_backend *b, moe_tensor out /* [T, N] */, moe_tensor x /* [T, K] */,
                           moe_tensor w /* [K, N] */, int64_t T, int64_t K, int64_t N);
    void (*matmul_backward)(moe_backend *b, moe_tensor *dx /* [T, K] or NULL */, moe_tensor *dw /* [K, N] or NULL */,
                            moe_tensor dout, moe_tensor x, moe_tensor w, int64_t T, int64_t K, int64_t N);
    /* y[t, :] += a[t·as]·v[t, :] — shared-expert gates and the Residual-MoE mix */
    void (*rowscale_forward)(moe_backend *b, moe_tensor y /* [T, d] */, moe_tensor v /* [T, d] */,
                             moe_tensor a /* [T, as] */, int64_t as, int64_t T, int64_t d);
    /* dv += a·dy (dv may be NULL); da[t·as] += dy[t]·v[t] (da may be NULL) */
    void (*rowscale_backward)(moe_backend *b, moe_tensor *dv, moe_tensor *da, moe_tensor dy, moe_tensor v,
                              moe_tensor a, int64_t as, int64_t T, int64_t d);
    /* y += x */
    void (*add)(moe_backend *b, moe_tensor y, moe_tensor x, int64_t n);

    /* router input jitter (Switch): xr = x ⊙ u, u saved */
    void (*jitter_forward)(moe_backend *b, moe_tensor xr /* [T, d] */, moe_tensor u /* [T, d] */, moe_tensor x,
                           double eps, uint64_t seed, int64_t layer, uint64_t step, int64_t T, int64_t d);
    void (*jitter_backward)(moe_backend *b, moe_tensor dx, moe_tensor dxr, moe_tensor u, int64_t T, int64_t d);

    /* router scores: s = softmax(h) or sigmoid(h), and back (dh +=) */
    void (*scores_forward)(moe_backend *b, moe_tensor s /* [T, E] */, moe_tensor h /* [T, E] */,
                           moe_score_fn fn, int64_t T, int64_t E);
    void (*scores_backward)(moe_backend *b, moe_tensor dh, moe_tensor ds, moe_tensor s, moe_score_fn fn,
                            int64_t T, int64_t E);

    /* noisy gating (Shazeer): h = z + ε·softplus(zn), ε saved; and its smooth load [E] */
    void (*noisy_logits_forward)(moe_backend *b, moe_tensor h, moe_tensor eps, moe_tensor z, moe_tensor zn,
                                 int training, uint64_t seed, int64_t layer, uint64_t step, int64_t T, int64_t E);
    void (*noisy_logits_backward)(moe_backend *b, moe_tensor *dz, moe_tensor *dzn, moe_tensor dh, moe_tensor eps,
                                  moe_tensor zn, int64_t T, int64_t E);
    void (*noisy_load_forward)(moe_backend *b, moe_tensor load /* [E] */, moe_tensor z, moe_tensor zn,
                               moe_tensor h, int64_t k, int64_t T, int64_t E);
    void (*noisy_load_backward)(moe_backend *b, moe_tensor *dz, moe_tensor *dzn, moe_tensor *dh,
                                moe_tensor dload /* [E] */, moe_tensor z, moe_tensor zn, moe_tensor h, int64_t k,
                                int64_t T, int64_t E);

    /* routing plans */
    moe_status (*plan_create)(moe_backend *b, const moe_layer_config *c, int64_t max_tokens, moe_bplan **out);
    void (*plan_free)(moe_backend *b, moe_bplan *p);
    moe_status (*plan_download)(moe_backend *b, moe_plan *host, const moe_bplan *p);
    moe_status (*plan_upload)(moe_backend *b, moe_bplan *p, const moe_plan *host);
    /* The plan's sizes and per-expert counts (either array may be NULL), cheap to read. */
    void (*plan_stats)(moe_backend *b, const moe_bplan *p, int64_t *n, int64_t *dropped,
                       int64_t *count /* [E] */, int64_t *selected /* [E] */);
    moe_status (*route)(moe_backend *b, moe_bplan *p, moe_tensor s /* [T, E] */, moe_tensor h /* [T, E] */,
                        moe_tensor *bias /* [E] or NULL */, const int32_t *token_ids /* host [T] or NULL */,
                        const moe_layer_config *c, uint64_t step, int64_t T);
    /* ds += ∂/∂s of the plan's weights; dchoice [T, k] may be NULL; bias as given to route */
    void (*route_backward)(moe_backend *b, moe_tensor ds /* [T, E] */, moe_tensor *dweight /* [n] or NULL */,
                           moe_tensor *dchoice /* [T, k] or NULL */, const moe_bplan *p, moe_tensor s,
                           moe_tensor *bias, const moe_layer_config *c);

    /* dispatch / combine over a plan: the pair that expert parallelism replaces */
    void (*dispatch_forward)(moe_backend *b, moe_tensor xe /* [n, d] */, moe_tensor x /* [T, d] */,
                             const moe_bplan *p, int64_t d);
    void (*dispatch_backward)(moe_backend *b, moe_tensor dx, moe_tensor dxe, const moe_bplan *p, int64_t d);
    void (*combine_forward)(moe_backend *b, moe_tensor y /* [T, d] */, moe_tensor ye /* [n, d] */,
                            const moe_bplan *p, int64_t d);
    void (*combine_backward)(moe_backend *b, moe_tensor dye, moe_tensor dweight /* [n] */, moe_tensor dy,
                             moe_tensor ye, const moe_bplan *p, int64_t d);

    /* one FFN over n rows (shared experts, the dense residual branch); h1, h3, a saved [n, f] */
    void (*ffn_forward)(moe_backend *b, moe_tensor out /* [n, d] */, moe_tensor h1, moe_tensor h3, moe_tensor a,
                        moe_tensor x /* [n, d] */, moe_tensor w1 /* [d, f] */, moe_tensor *w3 /* or NULL */,
                        moe_tensor w2 /* [f, d] */, moe_activation act, int64_t n, int64_t d, int64_t f);
    void (*ffn_backward)(moe_backend *b, moe_tensor *dx /* or NULL */, moe_tensor dw1, moe_tensor *dw3,
                         moe_tensor dw2, moe_tensor dout, moe_tensor h1, moe_tensor h3, moe_tensor a, moe_tensor x,
                         moe_tensor w1, moe_tensor *w3, moe_tensor w2, moe_activation act, int64_t n, int64_t d,
                         int64_t f);
    /* grouped expert FFN over the plan's expert-contiguous rows; h1, h3, a saved [n, f] */
    void (*experts_forward)(moe_backend *b, moe_tensor ye, moe_tensor h1, moe_tensor h3, moe_tensor a,
                            moe_tensor xe, moe_tensor w1 /* [E, d, f] */, moe_tensor *w3 /* or NULL */,
                            moe_tensor w2 /* [E, f, d] */, const moe_bplan *p, moe_activation act,
                            int64_t d, int64_t f);
    void (*experts_backward)(moe_backend *b, moe_tensor dxe, moe_tensor dw1, moe_tensor *dw3, moe_tensor dw2,
                             moe_tensor dye, moe_tensor h1, moe_tensor h3, moe_tensor a, moe_tensor xe,
                             moe_tensor w1, moe_tensor *w3, moe_tensor w2, const moe_bplan *p,
                             moe_activation act, int64_t d, int64_t f);

    /* losses: value returned to the host, gradient scaled by coef (= dloss) */
    double (*lb_loss_forward)(moe_backend *b, moe_tensor s, const moe_bplan *p, int64_t T, int64_t E);
    void (*lb_loss_backward)(moe_backend *b, moe_tensor ds, double coef, const moe_bplan *p, int64_t T, int64_t E);
    double (*z_loss_forward)(moe_backend *b, moe_tensor z, int64_t T, int64_t E);
    void (*z_loss_backward)(moe_backend *b, moe_tensor dz, double coef, moe_tensor z, int64_t T, int64_t E);
    /* importance [E] (see moe_ref_importance_forward); backward adds dimp to dweight or dchoice */
    void (*importance_forward)(moe_backend *b, moe_tensor imp /* [E] */, const moe_bplan *p);
    void (*importance_backward)(moe_backend *b, moe_tensor *dweight /* [n] */, moe_tensor *dchoice /* [T, k] */,
                                moe_tensor dimp /* [E] */, const moe_bplan *p);
    /* −MI(task; expert); task ids live on the host */
    double (*mi_loss_forward)(moe_backend *b, moe_tensor s, const int32_t *task, int64_t n_tasks, int64_t T,
                              int64_t E);
    void (*mi_loss_backward)(moe_backend *b, moe_tensor ds, double coef, moe_tensor s, const int32_t *task,
                             int64_t n_tasks, int64_t T, int64_t E);

    void (*destroy)(moe_backend *b);
    void *impl; /* the backend's own state */

    /* ---- the language model's ops (src/model/model.c; ref/model_ops.h, src/cpu/model_ops.h) ----
     * Filled by moe_backend_ref_model_ops / moe_backend_cpu_model_ops (ref/backend_model.c,
     * src/cpu/backend_model.c). Layouts and semantics as ref/model_ops.h; token and target ids
     * live on the host; backward ops accumulate. */
    void (*embedding_forward)(moe_backend *b, moe_tensor out /* [N, C] */, const int32_t *tokens /* host [N] */,
                              moe_tensor wte /* [V, C] */, int64_t N, int64_t C);
    void (*embedding_backward)(moe_backend *b, moe_tensor dwte /* [V, C] */, moe_tensor dout /* [N, C] */,
                               const int32_t *tokens /* host [N] */, int64_t N, int64_t C);
    void (*rmsnorm_forward)(moe_backend *b, moe_tensor out /* [N, C] */, moe_tensor rstd /* [N] */,
                            moe_tensor x /* [N, C] */, moe_tensor w /* [C] */, double eps, int64_t N, int64_t C);
    void (*rmsnorm_backward)(moe_backend *b, moe_tensor *dx /* [N, C] or NULL */, moe_tensor *dw /* [C] or NULL */,
                             moe_tensor dout, moe_tensor x, moe_tensor w, moe_tensor rstd, int64_t N, int64_t C);
    /* out may alias x; dx must not alias dout */
    void (*rope_forward)(moe_backend *b, moe_tensor out /* [B, S, nh, hd] */, moe_tensor x, int64_t pos0,
                         double theta, int64_t B, int64_t S, int64_t nh, int64_t hd);
    void (*rope_backward)(moe_backend *b, moe_tensor dx /* [B, S, nh, hd] */, moe_tensor dout, int64_t pos0,
                          double theta, int64_t B, int64_t S, int64_t nh, int64_t hd);
    void (*attention_forward)(moe_backend *b, moe_tensor out /* [B, S, H, hd] */, moe_tensor att /* [B, H, S, S] */,
                              moe_tensor q /* [B, S, H, hd] */, moe_tensor k /* [B, S, Hkv, hd] */,
                              moe_tensor v /* [B, S, Hkv, hd] */, int64_t B, int64_t S, int64_t H, int64_t Hkv,
                              int64_t hd);
    void (*attention_backward)(moe_backend *b, moe_tensor dq, moe_tensor dk, moe_tensor dv,
                               moe_tensor datt /* [B, H, S, S] scratch */, moe_tensor dout, moe_tensor att,
                               moe_tensor q, moe_tensor k, moe_tensor v, int64_t B, int64_t S, int64_t H,
                               int64_t Hkv, int64_t hd);
    void (*attention_decode)(moe_backend *b, moe_tensor out /* [H, hd] */, moe_tensor att /* [H, pos+1] scratch */,
                             moe_tensor q /* [H, hd] */, moe_tensor kcache /* [S_max, Hkv, hd] */,
                             moe_tensor vcache /* [S_max, Hkv, hd] */, int64_t pos, int64_t H, int64_t Hkv,
                             int64_t hd);
    /* out = x·wᵀ with w [N, K] (the LM head in Hugging Face layout, tied or not);
     * dx += dout·w, dw += doutᵀ·x (either may be NULL) */
    void (*matmul_t_forward)(moe_backend *b, moe_tensor out /* [T, N] */, moe_tensor x /* [T, K] */,
                             moe_tensor w /* [N, K] */, int64_t T, int64_t K, int64_t N);
    void (*matmul_t_backward)(moe_backend *b, moe_tensor *dx /* [T, K] */, moe_tensor *dw /* [N, K] */,
                              moe_tensor dout /* [T, N] */, moe_tensor x, moe_tensor w, int64_t T, int64_t K,
                              int64_t N);
    /* y[t, :] += bias; dbias += Σ_t dy[t, :] (the q/k/v biases) */
    void (*bias_forward)(moe_backend *b, moe_tensor y /* [T, N] */, moe_tensor bias /* [N] */, int64_t T, int64_t N);
    void (*bias_backward)(moe_backend *b, moe_tensor dbias /* [N] */, moe_tensor dy /* [T, N] */, int64_t T,
                          int64_t N);
    /* mean CE over targets != -1, probs may alias logits; dlogits += dloss·(probs − onehot)/n */
    double (*crossentropy_forward)(moe_backend *b, moe_tensor probs /* [N, V] */, moe_tensor logits /* [N, V] */,
                                   const int32_t *targets /* host [N] */, int64_t N, int64_t V);
    void (*crossentropy_backward)(moe_backend *b, moe_tensor dlogits /* [N, V] */, moe_tensor probs,
                                  const int32_t *targets /* host [N] */, double dloss, int64_t N, int64_t V);
    void (*adamw_step)(moe_backend *b, moe_tensor p /* [n] */, moe_tensor m /* [n] */, moe_tensor v /* [n] */,
                       moe_tensor g /* [n] */, double lr, double beta1, double beta2, double eps, double wd,
                       double grad_scale, int64_t t, int64_t n);
    /* Σ g² in a fixed order (the same on every run and thread count) */
    double (*grad_sumsq)(moe_backend *b, moe_tensor g /* [n] */, int64_t n);
};

/* The language-model ops of each backend (the table filler called by its create). */
void moe_backend_ref_model_ops(moe_backend *b);
void moe_backend_cpu_model_ops(moe_backend *b);

/* The oracle as a backend: buffers hold double, every op is the one in ref/. */
moe_status moe_backend_ref_create(moe_backend **out);
/* fp32, OpenBLAS and OpenMP; threads <= 0 takes OpenMP's default. */
moe_status moe_backend_cpu_create(int threads, moe_backend **out);
/* By name: "ref" or "cpu". */
moe_status moe_backend_create(const char *name, int threads, moe_backend **out);
void moe_backend_free(moe_backend *b);

#endif
