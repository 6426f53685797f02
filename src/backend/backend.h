/*
 * backend.h — the table of operations that model and layer code are written against.
 *
 * A backend owns its memory. Model code holds moe_tensor handles (a buffer and an
 * element offset) and never dereferences them; values cross to the host only through
 * upload and download, in the host's own element type (dtype.h), converted on the way.
 * Backends register by name (moe_backend_register; ggml-backend-reg is the model):
 * ref (double, the oracle in ref/), cpu (fp32, OpenBLAS + OpenMP), cuda (gpu/, --with-cuda).
 *
 * Types per tensor. Every buffer carries a dtype, chosen by whoever allocates it: the
 * model asks for its parameters, activations, master weights and optimizer state in the
 * types its precision policy names (model.h), and an op works on the types of the
 * buffers it is given. cpu and ref each support one float type (f32, f64) plus i32 ids;
 * a GPU backend adds bf16 beside an f32 router, master weights and moments.
 *
 * Asynchronous by design. Ops are enqueued on the backend's current stream and return
 * nothing: a failure is recorded (moe_backend_fail), sticky, and reported with the op
 * that caused it by the next sync() or download(). cpu and ref run each op at once; the
 * interface also allows a device stream plus a second (communication) stream with events
 * between them. Nothing inside a training step needs the host: ids live in i32 buffers,
 * losses and norms are written to scalar tensors, the clipping factor and the
 * aux-loss-free bias update are computed on the backend, and the host reads a step's
 * scalars once, for its log.
 *
 * Scratch. Ops take no scratch arguments: when a layer or model is built it tells the
 * backend the largest shapes it will run (moe_workload), and the backend reserves what
 * its own ops need (per instance, i.e. per stream). An op that finds too little is an
 * error, never a silent skip. Ops never change process-wide settings (BLAS threads).
 *
 * Conventions (ref/ref.h's, llm.c's): outputs, saved buffers, inputs, parameters, sizes;
 * backward ops ACCUMULATE (+=) into gradients; a shape comment on every tensor argument.
 * Random draws are keyed by moe_key (cmoe.h), never by thread, rank or layout.
 */
#ifndef CMOE_BACKEND_H
#define CMOE_BACKEND_H

#include "cmoe.h"
#include "core/dtype.h"

typedef struct moe_buf moe_buf;     /* backend memory, opaque */
typedef struct moe_bplan moe_bplan; /* a routing plan in backend memory, opaque */
typedef struct moe_event moe_event; /* a point in a stream, opaque */

/* A view into a buffer: elements [off, ...) of buf. Passed by value. */
typedef struct {
    moe_buf *buf;
    int64_t off;
} moe_tensor;

static inline moe_tensor moe_tensor_at(moe_tensor t, int64_t off)
{
    t.off += off;
    return t;
}

/* Rows per block at which a backend may cut an expert's GEMMs, counted from the start of
 * the expert's segment: an exchange cuts its chunks at multiples of it, so that chunking
 * never moves a row into another block (and never changes a bit). */
#define MOE_ROW_BLOCK 512

/* Streams of a backend: ops go to the current one (set_stream). */
enum { MOE_STREAM_COMPUTE, MOE_STREAM_COMM, MOE_NSTREAMS };

/*
 * The largest work a backend will be asked to do for one layer or model, given once when
 * it is built, so that reserve() can size the ops' scratch. Unused fields are 0.
 */
typedef struct {
    const moe_layer_config *layer; /* an MoE layer (with its d_model, d_ff, E, k) */
    int64_t tokens;                /* T through that layer */
    int64_t rows;                  /* routed rows its experts see (plan or received) */
    int64_t batch, seq, heads, kv_heads, head_dim; /* attention */
    int64_t rows_ffn, d_model, d_ff;               /* a dense FFN over rows_ffn rows */
} moe_workload;

typedef struct moe_backend moe_backend;

/*
 * The op table. Every entry is required: moe_backend_create refuses a backend that leaves
 * one NULL, naming it (MOE_BACKEND_OPS lists them).
 */
struct moe_backend {
    const char *name;
    moe_dtype float_type; /* its native float type: what it computes in (f64 ref, f32 cpu) */
    void *impl;           /* the backend's own state */
    /* the sticky error: the first failure since the last sync */
    moe_status err;
    char err_msg[512];

    /* ---- memory, transfers, synchronisation ------------------------------------ */
    /* n elements of type t, zero-filled; a type the backend does not store is MOE_ERR_ARG */
    moe_status (*alloc)(moe_backend *b, moe_dtype t, int64_t n, moe_buf **out);
    void (*free)(moe_backend *b, moe_buf *buf);
    moe_dtype (*dtype)(moe_backend *b, const moe_buf *buf);
    /* host src (type st) → dst, converted; enqueued: src must stay valid until the next sync */
    moe_status (*upload)(moe_backend *b, moe_tensor dst, const void *src, moe_dtype st, int64_t n);
    /* src → host dst (type dt), converted; waits for every stream and returns the sticky error */
    moe_status (*download)(moe_backend *b, void *dst, moe_dtype dt, moe_tensor src, int64_t n);
    void (*fill)(moe_backend *b, moe_tensor t, double v, int64_t n);
    /* dst = src, converted when the buffers' types differ (master weights → working copy) */
    void (*copy)(moe_backend *b, moe_tensor dst, moe_tensor src, int64_t n);
    /* Waits for every stream; returns the sticky error (and clears it). */
    moe_status (*sync)(moe_backend *b);
    void (*set_stream)(moe_backend *b, int stream);
    moe_status (*event_create)(moe_backend *b, moe_event **out);
    void (*event_free)(moe_backend *b, moe_event *ev);
    void (*event_record)(moe_backend *b, moe_event *ev); /* on the current stream */
    void (*stream_wait)(moe_backend *b, moe_event *ev);  /* the current stream waits for ev */
    /* Grow-only scratch for the ops of this workload (layer or model creation time). */
    moe_status (*reserve)(moe_backend *b, const moe_workload *w);
    /* Worker threads (<= 0: leave as it is); returns the count in use. */
    int (*set_threads)(moe_backend *b, int n);

    /* ---- dense ------------------------------------------------------------------- */
    /* out = x·w; dx += dout·wᵀ, dw += xᵀ·dout (either may be NULL) */
    void (*matmul_forward)(moe_backend *b, moe_tensor out /* [T, N] */, moe_tensor x /* [T, K] */,
                           moe_tensor w /* [K, N] */, int64_t T, int64_t K, int64_t N);
    void (*matmul_backward)(moe_backend *b, moe_tensor *dx /* [T, K] */, moe_tensor *dw /* [K, N] */,
                            moe_tensor dout, moe_tensor x, moe_tensor w, int64_t T, int64_t K, int64_t N);
    /* y[t, :] += a[t·as]·v[t, :] — shared-expert gates and the Residual-MoE mix */
    void (*rowscale_forward)(moe_backend *b, moe_tensor y /* [T, d] */, moe_tensor v /* [T, d] */,
                             moe_tensor a /* [T, as] */, int64_t as, int64_t T, int64_t d);
    /* dv += a·dy (dv may be NULL); da[t·as] += dy[t]·v[t] (da may be NULL) */
    void (*rowscale_backward)(moe_backend *b, moe_tensor *dv, moe_tensor *da, moe_tensor dy, moe_tensor v,
                              moe_tensor a, int64_t as, int64_t T, int64_t d);
    /* y += x */
    void (*add)(moe_backend *b, moe_tensor y, moe_tensor x, int64_t n);

    /* ---- router -------------------------------------------------------------------- */
    /* Switch's jitter: xr = x ⊙ u, u ~ U(1-eps, 1+eps) saved */
    void (*jitter_forward)(moe_backend *b, moe_tensor xr /* [T, d] */, moe_tensor u /* [T, d] */, moe_tensor x,
                           double eps, uint64_t seed, int64_t layer, moe_key key, int64_t T, int64_t d);
    void (*jitter_backward)(moe_backend *b, moe_tensor dx, moe_tensor dxr, moe_tensor u, int64_t T, int64_t d);
    /* s = softmax(h) or sigmoid(h); dh += ∂/∂h */
    void (*scores_forward)(moe_backend *b, moe_tensor s /* [T, E] */, moe_tensor h /* [T, E] */,
                           moe_score_fn fn, int64_t T, int64_t E);
    void (*scores_backward)(moe_backend *b, moe_tensor dh, moe_tensor ds, moe_tensor s, moe_score_fn fn,
                            int64_t T, int64_t E);
    /* noisy gating (Shazeer): h = z + ε·softplus(zn), ε saved; and its smooth load [E] */
    void (*noisy_logits_forward)(moe_backend *b, moe_tensor h, moe_tensor eps, moe_tensor z, moe_tensor zn,
                                 int training, uint64_t seed, int64_t layer, moe_key key, int64_t T, int64_t E);
    void (*noisy_logits_backward)(moe_backend *b, moe_tensor *dz, moe_tensor *dzn, moe_tensor dh, moe_tensor eps,
                                  moe_tensor zn, int64_t T, int64_t E);
    void (*noisy_load_forward)(moe_backend *b, moe_tensor load /* [E] */, moe_tensor z, moe_tensor zn,
                               moe_tensor h, int64_t k, int64_t T, int64_t E);
    void (*noisy_load_backward)(moe_backend *b, moe_tensor *dz, moe_tensor *dzn, moe_tensor *dh,
                                moe_tensor dload /* [E] */, moe_tensor z, moe_tensor zn, moe_tensor h, int64_t k,
                                int64_t T, int64_t E);

    /* ---- routing plans ------------------------------------------------------------- */
    moe_status (*plan_create)(moe_backend *b, const moe_layer_config *c, int64_t max_tokens, moe_bplan **out);
    void (*plan_free)(moe_backend *b, moe_bplan *p);
    /* The whole plan to the host (waits; tests, statistics, an exchange that needs it). */
    moe_status (*plan_download)(moe_backend *b, moe_plan *host, const moe_bplan *p);
    /* A host plan to the backend, checked first (moe_plan_check): runs two backends on one plan. */
    moe_status (*plan_upload)(moe_backend *b, moe_bplan *p, const moe_plan *host);
    /* An expert-side plan of rows that arrived through an exchange: expert e holds rows
     * [begin[e], begin[e] + rows[e]) of the expert-side buffers (segments only; no tokens or
     * weights). The experts ops, plan_fill and plan_counts read every plan as such segments. */
    moe_status (*plan_set_segments)(moe_backend *b, moe_bplan *p, const int64_t *begin /* host [E] */,
                                    const int64_t *rows /* host [E] */);
    /* out[0..E) kept per expert, out[E..2E) selected per expert, out[2E] = n, out[2E+1] = dropped */
    void (*plan_counts)(moe_backend *b, moe_tensor out /* [2E + 2] */, const moe_bplan *p);
    /* t = v on the plan's rows (each expert's segment), width elements per row */
    void (*plan_fill)(moe_backend *b, moe_tensor t /* [n, width] */, double v, const moe_bplan *p, int64_t width);
    /* the plan from scores s and selection logits h (ref/ref.h: moe_ref_route) */
    void (*route)(moe_backend *b, moe_bplan *p, moe_tensor s /* [T, E] */, moe_tensor h /* [T, E] */,
                  moe_tensor *bias /* [E] or NULL */, moe_tensor *token_ids /* i32 [T] or NULL */,
                  const moe_layer_config *c, moe_key key, int64_t T);
    /* ds += ∂/∂s of the plan's weights; dchoice [T, k] may be NULL; bias as given to route */
    void (*route_backward)(moe_backend *b, moe_tensor ds /* [T, E] */, moe_tensor *dweight /* [n] or NULL */,
                           moe_tensor *dchoice /* [T, k] or NULL */, const moe_bplan *p, moe_tensor s,
                           moe_tensor *bias, const moe_layer_config *c);
    /* aux-loss-free balancing (DeepSeek-V3): bias_e += rate·sign(mean(counts) − counts_e) */
    void (*bias_update)(moe_backend *b, moe_tensor bias /* [E] */, moe_tensor counts /* [E] */, double rate,
                        int64_t E);

    /* ---- dispatch / combine (the pair an exchange carries across ranks) ------------- */
    void (*dispatch_forward)(moe_backend *b, moe_tensor xe /* [n, d] */, moe_tensor x /* [T, d] */,
                             const moe_bplan *p, int64_t d);
    void (*dispatch_backward)(moe_backend *b, moe_tensor dx, moe_tensor dxe, const moe_bplan *p, int64_t d);
    void (*combine_forward)(moe_backend *b, moe_tensor y /* [T, d] */, moe_tensor ye /* [n, d] */,
                            const moe_bplan *p, int64_t d);
    void (*combine_backward)(moe_backend *b, moe_tensor dye, moe_tensor dweight /* [n] */, moe_tensor dy,
                             moe_tensor ye, const moe_bplan *p, int64_t d);

    /* ---- feed-forward -------------------------------------------------------------- */
    /* one FFN over n rows (shared experts, dense layers, the residual branch); h1, h3, a saved [n, f] */
    void (*ffn_forward)(moe_backend *b, moe_tensor out /* [n, d] */, moe_tensor h1, moe_tensor h3, moe_tensor a,
                        moe_tensor x /* [n, d] */, moe_tensor w1 /* [d, f] */, moe_tensor *w3 /* or NULL */,
                        moe_tensor w2 /* [f, d] */, moe_activation act, int64_t n, int64_t d, int64_t f);
    void (*ffn_backward)(moe_backend *b, moe_tensor *dx /* or NULL */, moe_tensor dw1, moe_tensor *dw3,
                         moe_tensor dw2, moe_tensor dout, moe_tensor h1, moe_tensor h3, moe_tensor a, moe_tensor x,
                         moe_tensor w1, moe_tensor *w3, moe_tensor w2, moe_activation act, int64_t n, int64_t d,
                         int64_t f);
    /* grouped expert FFN over a plan's segments (expert e's rows); h1, h3, a saved [n, f] */
    void (*experts_forward)(moe_backend *b, moe_tensor ye, moe_tensor h1, moe_tensor h3, moe_tensor a,
                            moe_tensor xe, moe_tensor w1 /* [E, d, f] */, moe_tensor *w3 /* or NULL */,
                            moe_tensor w2 /* [E, f, d] */, const moe_bplan *p, moe_activation act,
                            int64_t d, int64_t f);
    /* The backward in two halves (ref's moe_ref_ffn_backward_data / _weights per expert):
     * dg1, dg3 [n, f] = the pre-activation gradients (dg3 only with GLU) and dxe += …, per
     * chunk while the next travels; then the weight gradients once, over every row. */
    void (*experts_backward_data)(moe_backend *b, moe_tensor dxe, moe_tensor dg1, moe_tensor *dg3, moe_tensor dye,
                                  moe_tensor h1, moe_tensor h3, moe_tensor w1, moe_tensor *w3, moe_tensor w2,
                                  const moe_bplan *p, moe_activation act, int64_t d, int64_t f);
    void (*experts_backward_weights)(moe_backend *b, moe_tensor dw1, moe_tensor *dw3, moe_tensor dw2,
                                     moe_tensor dg1, moe_tensor *dg3, moe_tensor dye, moe_tensor a, moe_tensor xe,
                                     const moe_bplan *p, moe_activation act, int64_t d, int64_t f);

    /* ---- mixture of attention heads (layer/moa.h; ref/moa.h has their oracles) ------- */
    /* ye[i] = xe[i]·w[e] over each expert e's segment: a grouped linear map (MoA's per-expert
     * query and output projections) */
    void (*experts_linear_forward)(moe_backend *b, moe_tensor ye /* [n, N] */, moe_tensor xe /* [n, K] */,
                                   moe_tensor w /* [E, K, N] */, const moe_bplan *p, int64_t K, int64_t N);
    /* dxe += dye·w[e]ᵀ (dxe may be NULL); dw[e] += xeᵀ·dye over e's segment */
    void (*experts_linear_backward)(moe_backend *b, moe_tensor *dxe /* [n, K] */, moe_tensor dw /* [E, K, N] */,
                                    moe_tensor dye /* [n, N] */, moe_tensor xe, moe_tensor w, const moe_bplan *p,
                                    int64_t K, int64_t N);
    /* Token-choice plans: slots[choice[i]] = rows[i] for every kept assignment, 0 in the slots
     * of choices without one; slots is [T·k, w] with the plan's T and k (token t's j-th choice
     * at row t·k + j: the plan's rows as k "heads" per token) */
    void (*choice_scatter)(moe_backend *b, moe_tensor slots /* [T·k, w] */, moe_tensor rows /* [n, w] */,
                           const moe_bplan *p, int64_t w);
    /* rows[i] += slots[choice[i]] (choice_scatter's adjoint) */
    void (*choice_gather)(moe_backend *b, moe_tensor rows /* [n, w] */, moe_tensor slots /* [T·k, w] */,
                          const moe_bplan *p, int64_t w);

    /* ---- aux losses: the unscaled value to out [1]; backward adds coef·∂ ------------ */
    void (*lb_loss_forward)(moe_backend *b, moe_tensor out, moe_tensor s, const moe_bplan *p, int64_t T,
                            int64_t E);
    void (*lb_loss_backward)(moe_backend *b, moe_tensor ds, double coef, const moe_bplan *p, int64_t T, int64_t E);
    void (*z_loss_forward)(moe_backend *b, moe_tensor out, moe_tensor z, int64_t T, int64_t E);
    void (*z_loss_backward)(moe_backend *b, moe_tensor dz, double coef, moe_tensor z, int64_t T, int64_t E);
    /* importance [E] (moe_ref_importance_forward); backward adds dimp to dweight or dchoice */
    void (*importance_forward)(moe_backend *b, moe_tensor imp /* [E] */, const moe_bplan *p);
    void (*importance_backward)(moe_backend *b, moe_tensor *dweight /* [n] */, moe_tensor *dchoice /* [T, k] */,
                                moe_tensor dimp /* [E] */, const moe_bplan *p);
    /* cv² of a vector of E (importance, load) */
    void (*cv2_forward)(moe_backend *b, moe_tensor out, moe_tensor v /* [E] */, int64_t E);
    void (*cv2_backward)(moe_backend *b, moe_tensor dv /* [E] */, double coef, moe_tensor v, int64_t E);
    /* −MI(task; expert) over task ids in [0, n_tasks) */
    void (*mi_loss_forward)(moe_backend *b, moe_tensor out, moe_tensor s, moe_tensor task /* i32 [T] */,
                            int64_t n_tasks, int64_t T, int64_t E);
    void (*mi_loss_backward)(moe_backend *b, moe_tensor ds, double coef, moe_tensor s, moe_tensor task,
                             int64_t n_tasks, int64_t T, int64_t E);

    /* ---- the language model (ref/model_ops.h, src/cpu/model_ops.h) ------------------ */
    void (*embedding_forward)(moe_backend *b, moe_tensor out /* [N, C] */, moe_tensor tokens /* i32 [N] */,
                              moe_tensor wte /* [V, C] */, int64_t N, int64_t C);
    void (*embedding_backward)(moe_backend *b, moe_tensor dwte /* [V, C] */, moe_tensor dout /* [N, C] */,
                               moe_tensor tokens /* i32 [N] */, int64_t N, int64_t C);
    void (*rmsnorm_forward)(moe_backend *b, moe_tensor out /* [N, C] */, moe_tensor rstd /* [N] */,
                            moe_tensor x /* [N, C] */, moe_tensor w /* [C] */, double eps, int64_t N, int64_t C);
    void (*rmsnorm_backward)(moe_backend *b, moe_tensor *dx /* [N, C] or NULL */, moe_tensor *dw /* [C] or NULL */,
                             moe_tensor dout, moe_tensor x, moe_tensor w, moe_tensor rstd, int64_t N, int64_t C);
    /* out may alias x; dx must not alias dout */
    void (*rope_forward)(moe_backend *b, moe_tensor out /* [B, S, nh, hd] */, moe_tensor x, int64_t pos0,
                         double theta, int64_t B, int64_t S, int64_t nh, int64_t hd);
    void (*rope_backward)(moe_backend *b, moe_tensor dx /* [B, S, nh, hd] */, moe_tensor dout, int64_t pos0,
                          double theta, int64_t B, int64_t S, int64_t nh, int64_t hd);
    /* Elements (of the compute type) of the tensor that attention_forward saves for its
     * backward: the [B, H, S, S] probabilities (cpu, ref), or only the rows' fp32 log-sum-exp
     * [B, H, S] (cuda's flash kernels; 2·B·H·S bf16 elements hold it in bf16). The contents
     * are the backend's own. */
    int64_t (*attention_saved)(moe_backend *b, int64_t B, int64_t S, int64_t H);
    void (*attention_forward)(moe_backend *b, moe_tensor out /* [B, S, H, hd] */, moe_tensor saved,
                              moe_tensor q /* [B, S, H, hd] */, moe_tensor k /* [B, S, Hkv, hd] */,
                              moe_tensor v /* [B, S, Hkv, hd] */, int64_t B, int64_t S, int64_t H, int64_t Hkv,
                              int64_t hd);
    void (*attention_backward)(moe_backend *b, moe_tensor dq, moe_tensor dk, moe_tensor dv, moe_tensor dout,
                               moe_tensor out, moe_tensor saved, moe_tensor q, moe_tensor k, moe_tensor v, int64_t B,
                               int64_t S, int64_t H, int64_t Hkv, int64_t hd);
    /* one query position against a KV cache holding positions 0..pos */
    void (*attention_decode)(moe_backend *b, moe_tensor out /* [H, hd] */, moe_tensor q /* [H, hd] */,
                             moe_tensor kcache /* [S_max, Hkv, hd] */, moe_tensor vcache /* [S_max, Hkv, hd] */,
                             int64_t pos, int64_t H, int64_t Hkv, int64_t hd);
    /* out = x·wᵀ with w [N, K] (the LM head, HF layout); dx += dout·w, dw += doutᵀ·x */
    void (*matmul_t_forward)(moe_backend *b, moe_tensor out /* [T, N] */, moe_tensor x /* [T, K] */,
                             moe_tensor w /* [N, K] */, int64_t T, int64_t K, int64_t N);
    void (*matmul_t_backward)(moe_backend *b, moe_tensor *dx /* [T, K] */, moe_tensor *dw /* [N, K] */,
                              moe_tensor dout /* [T, N] */, moe_tensor x, moe_tensor w, int64_t T, int64_t K,
                              int64_t N);
    /* y[t, :] += bias; dbias += Σ_t dy[t, :] (the q/k/v biases) */
    void (*bias_forward)(moe_backend *b, moe_tensor y /* [T, N] */, moe_tensor bias /* [N] */, int64_t T, int64_t N);
    void (*bias_backward)(moe_backend *b, moe_tensor dbias /* [N] */, moe_tensor dy /* [T, N] */, int64_t T,
                          int64_t N);
    /* loss [1] = mean CE over targets != −1 (probs may alias logits);
     * dlogits += dloss·(probs − onehot)/n_counted */
    void (*crossentropy_forward)(moe_backend *b, moe_tensor loss, moe_tensor probs /* [N, V] */,
                                 moe_tensor logits /* [N, V] */, moe_tensor targets /* i32 [N] */, int64_t N,
                                 int64_t V);
    void (*crossentropy_backward)(moe_backend *b, moe_tensor dlogits /* [N, V] */, moe_tensor probs,
                                  moe_tensor targets /* i32 [N] */, double dloss, int64_t N, int64_t V);

    /* ---- optimizer ------------------------------------------------------------------ */
    /* acc[0] += Σ g² (each tensor's sum in a fixed order, the same at any thread count) */
    void (*grad_sumsq)(moe_backend *b, moe_tensor acc /* [1] */, moe_tensor g /* [n] */, int64_t n);
    /* scale[0] = grad_scale · min(1, max_norm / (‖grad_scale·g‖ + 1e-6)) from sumsq = Σ g²
     * (torch.nn.utils.clip_grad_norm_; max_norm <= 0: no clipping); NaN when the norm
     * is not finite, which makes adamw_step leave everything as it is */
    void (*clip_scale)(moe_backend *b, moe_tensor scale /* [1] */, moe_tensor sumsq /* [1] */, double grad_scale,
                       double max_norm);
    /* AdamW on master weights (f32, or the parameters themselves when master is NULL) with
     * gradient g·scale[0]; then p = master (converted) when they differ */
    void (*adamw_step)(moe_backend *b, moe_tensor p /* [n] */, moe_tensor *master /* [n] or NULL */,
                       moe_tensor m /* [n] */, moe_tensor v /* [n] */, moe_tensor g /* [n] */,
                       moe_tensor scale /* [1] */, double lr, double beta1, double beta2, double eps, double wd,
                       int64_t t, int64_t n);

    void (*destroy)(moe_backend *b);
};

/* Every op of the table, for the completeness check and for messages. */
#define MOE_BACKEND_OPS(X)                                                                                       \
    X(alloc) X(free) X(dtype) X(upload) X(download) X(fill) X(copy) X(sync) X(set_stream) X(event_create)         \
    X(event_free) X(event_record) X(stream_wait) X(reserve) X(set_threads) X(matmul_forward) X(matmul_backward)  \
    X(rowscale_forward) X(rowscale_backward) X(add) X(jitter_forward) X(jitter_backward) X(scores_forward)       \
    X(scores_backward) X(noisy_logits_forward) X(noisy_logits_backward) X(noisy_load_forward)                    \
    X(noisy_load_backward) X(plan_create) X(plan_free) X(plan_download) X(plan_upload) X(plan_set_segments)         \
    X(plan_counts) X(plan_fill) X(route) X(route_backward) X(bias_update) X(dispatch_forward)                    \
    X(dispatch_backward) X(combine_forward) X(combine_backward) X(ffn_forward) X(ffn_backward)                   \
    X(experts_forward) X(experts_backward_data) X(experts_backward_weights) X(experts_linear_forward)             \
    X(experts_linear_backward) X(choice_scatter) X(choice_gather) X(lb_loss_forward) X(lb_loss_backward) X(z_loss_forward) \
    X(z_loss_backward) X(importance_forward) X(importance_backward) X(cv2_forward) X(cv2_backward)               \
    X(mi_loss_forward) X(mi_loss_backward) X(embedding_forward) X(embedding_backward) X(rmsnorm_forward)         \
    X(rmsnorm_backward) X(rope_forward) X(rope_backward) X(attention_saved) X(attention_forward)                  \
    X(attention_backward) X(attention_decode) X(matmul_t_forward) X(matmul_t_backward) X(bias_forward)           \
    X(bias_backward) X(crossentropy_forward) X(crossentropy_backward) X(grad_sumsq) X(clip_scale) X(adamw_step)  \
    X(destroy)

/* ---- errors of enqueued ops ------------------------------------------------------- */

/* Records the first failure since the last sync (later ones are dropped): "OP: message". */
void moe_backend_fail(moe_backend *b, const char *op, moe_status s, const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 4, 5)))
#endif
    ;
/* The sticky error as a moe_status with its message (moe_last_error), then cleared;
 * what a backend's sync() returns once its streams are idle. */
moe_status moe_backend_take_error(moe_backend *b);

/* Host transfers of doubles, for tests and tools. */
static inline moe_status moe_upload_f64(moe_backend *b, moe_tensor dst, const double *src, int64_t n)
{
    return b->upload(b, dst, src, MOE_F64, n);
}
static inline moe_status moe_download_f64(moe_backend *b, double *dst, moe_tensor src, int64_t n)
{
    return b->download(b, dst, MOE_F64, src, n);
}

/* ---- the registry ------------------------------------------------------------------- */

typedef struct {
    int threads;       /* worker threads; <= 0: the backend's default (OpenMP's) */
    int device;        /* device index (GPU backends) */
    const char *dtype; /* compute type of weights and activations: "fp32" or "bf16" (a GPU
                        * backend; the router, losses, master weights and optimizer state
                        * stay fp32); NULL: the backend's own (cpu fp32, ref f64) */
} moe_backend_options;

typedef moe_status (*moe_backend_create_fn)(const moe_backend_options *o, moe_backend **out);

/* Adds a backend under name (the built-in ones are there from the start); a name taken
 * already is MOE_ERR_ARG. */
moe_status moe_backend_register(const char *name, const char *about, moe_backend_create_fn create);
int moe_backend_count(void);
/* Name and one-line description of backend i (NULL outside [0, count)). */
const char *moe_backend_name(int i);
const char *moe_backend_about(int i);
/* "ref, cpu" — the names this build has, for messages and --help. */
const char *moe_backend_list(void);
/* Creates a registered backend by name (o may be NULL); checks that it fills every op. */
moe_status moe_backend_create(const char *name, const moe_backend_options *o, moe_backend **out);
void moe_backend_free(moe_backend *b);

/* The built-in backends' creators (registered by name in src/backend/registry.c). */
moe_status moe_backend_ref_create(const moe_backend_options *o, moe_backend **out);
moe_status moe_backend_cpu_create(const moe_backend_options *o, moe_backend **out);
/* Only in a --with-cuda build (gpu/backend.cu); MOE_ERR_CUDA when no device answers. */
moe_status moe_backend_cuda_create(const moe_backend_options *o, moe_backend **out);

#endif
