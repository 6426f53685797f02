/*
 * The FFNs on the device.
 *
 *   h1 = x·w1, [h3 = x·w3], a = act(h1) [⊙ h3], out = a·w2        per expert, over its rows
 *
 * The routed experts are grouped GEMMs over the plan's segments (gemm.h), whose row counts
 * stay on the device: forward is two launches (h1, h3 and a together; then a·w2), the data
 * half of the backward two (da = dy·w2ᵀ straight into g1, g3 through the activation's
 * backward; then dx += g1·w1ᵀ + g3·w3ᵀ), the weight half two (dw1, dw3 from one pass over
 * x; dw2). The single FFN of shared experts, dense layers and the residual branch has its
 * row count on the host, so it runs on cuBLAS with the activation as its own pass.
 */
#include "gpu/act.cuh"
#include "gpu/gemm.h"

static int glu_of(moe_activation act)
{
    return act == MOE_ACT_SWIGLU || act == MOE_ACT_GEGLU;
}

static int same_type(moe_backend *b, const char *op, moe_dtype t, const moe_tensor *const *ts, int n)
{
    for (int i = 0; i < n; i++)
        if (ts[i] && ts[i]->buf && ts[i]->buf->type != t) {
            moe_backend_fail(b, op, MOE_ERR_ARG, "tensors of two types (%s and %s)", moe_dtype_name(t),
                             moe_dtype_name(ts[i]->buf->type));
            return 0;
        }
    if (t != MOE_F32 && t != MOE_BF16) {
        moe_backend_fail(b, op, MOE_ERR_ARG, "%s tensors (f32 or bf16 expected)", moe_dtype_name(t));
        return 0;
    }
    return 1;
}

static void cu_experts_forward(moe_backend *b, moe_tensor ye, moe_tensor h1, moe_tensor h3, moe_tensor a,
                               moe_tensor xe, moe_tensor w1, moe_tensor *w3, moe_tensor w2, const moe_bplan *p,
                               moe_activation act, int64_t d, int64_t f)
{
    const int glu = glu_of(act) && w3;
    const moe_tensor *ts[] = {&ye, &h1, glu ? &h3 : nullptr, &a, &xe, &w1, glu ? w3 : nullptr, &w2};
    const moe_dtype t = xe.buf->type;
    if (!same_type(b, "experts_forward", t, ts, 8))
        return;
    const moe_cu_group g = moe_cu_group_of(p);
    moe_cu_gemm_args x = {};
    x.mode = GM_ROWS;
    x.nb = glu ? 2 : 1;
    x.nk = 1;
    x.epi = EPI_FWD;
    x.act = act;
    x.A0 = DP(xe).p;
    x.lda = d;
    x.B0 = DP(w1).p;
    x.B1 = glu ? DP(*w3).p : nullptr;
    x.ldb = f;
    x.b_es = d * f;
    x.C0 = DP(h1).p;
    x.C1 = glu ? DP(h3).p : nullptr;
    x.C2 = DP(a).p;
    x.ldc = f;
    x.N = f;
    x.K = d;
    moe_cu_grouped_gemm(b, "experts_forward", &g, &x, t);
    moe_cu_gemm_args y = {};
    y.mode = GM_ROWS;
    y.nb = 1;
    y.nk = 1;
    y.epi = EPI_STORE;
    y.A0 = DP(a).p;
    y.lda = f;
    y.B0 = DP(w2).p;
    y.ldb = d;
    y.b_es = f * d;
    y.C0 = DP(ye).p;
    y.ldc = d;
    y.N = d;
    y.K = f;
    moe_cu_grouped_gemm(b, "experts_forward", &g, &y, t);
}

static void cu_experts_backward_data(moe_backend *b, moe_tensor dxe, moe_tensor dg1, moe_tensor *dg3, moe_tensor dye,
                                     moe_tensor h1, moe_tensor h3, moe_tensor w1, moe_tensor *w3, moe_tensor w2,
                                     const moe_bplan *p, moe_activation act, int64_t d, int64_t f)
{
    const int glu = glu_of(act) && w3 && dg3;
    const moe_tensor *ts[] = {dxe.buf ? &dxe : nullptr, &dg1, glu ? dg3 : nullptr, &dye, &h1, glu ? &h3 : nullptr,
                              &w1, glu ? w3 : nullptr, &w2};
    const moe_dtype t = dye.buf->type;
    if (!same_type(b, "experts_backward_data", t, ts, 9))
        return;
    const moe_cu_group g = moe_cu_group_of(p);
    /* g1 (g3) = act'(dy·w2ᵀ): w2[e] is [f, d], i.e. B stored [N = f, K = d] */
    moe_cu_gemm_args x = {};
    x.mode = GM_ROWS;
    x.bt = 1;
    x.nb = 1;
    x.nk = 1;
    x.epi = EPI_BWD;
    x.act = act;
    x.A0 = DP(dye).p;
    x.lda = d;
    x.B0 = DP(w2).p;
    x.ldb = d;
    x.b_es = f * d;
    x.C0 = DP(dg1).p;
    x.C1 = glu ? DP(*dg3).p : nullptr;
    x.H1 = DP(h1).p;
    x.H3 = glu ? DP(h3).p : nullptr;
    x.ldc = f;
    x.N = f;
    x.K = d;
    moe_cu_grouped_gemm(b, "experts_backward_data", &g, &x, t);
    if (!dxe.buf)
        return;
    /* dx += g1·w1ᵀ [+ g3·w3ᵀ]: w1[e] is [d, f], B stored [N = d, K = f] */
    moe_cu_gemm_args y = {};
    y.mode = GM_ROWS;
    y.bt = 1;
    y.nb = 1;
    y.nk = glu ? 2 : 1;
    y.epi = EPI_ACC;
    y.A0 = DP(dg1).p;
    y.A1 = glu ? DP(*dg3).p : nullptr;
    y.lda = f;
    y.B0 = DP(w1).p;
    y.B1 = glu ? DP(*w3).p : nullptr;
    y.ldb = f;
    y.b_es = d * f;
    y.C0 = DP(dxe).p;
    y.ldc = d;
    y.N = d;
    y.K = f;
    moe_cu_grouped_gemm(b, "experts_backward_data", &g, &y, t);
}

static void cu_experts_backward_weights(moe_backend *b, moe_tensor dw1, moe_tensor *dw3, moe_tensor dw2,
                                        moe_tensor dg1, moe_tensor *dg3, moe_tensor dye, moe_tensor a, moe_tensor xe,
                                        const moe_bplan *p, moe_activation act, int64_t d, int64_t f)
{
    const int glu = glu_of(act) && dw3 && dg3;
    const moe_tensor *ts[] = {&dw1, glu ? dw3 : nullptr, &dw2, &dg1, glu ? dg3 : nullptr, &dye, &a, &xe};
    const moe_dtype t = xe.buf->type;
    if (!same_type(b, "experts_backward_weights", t, ts, 8))
        return;
    const moe_cu_group g = moe_cu_group_of(p);
    /* dw1[e] (dw3[e]) += xeᵀ·g1 (g3): A stored [rows, d], B [rows, f] */
    moe_cu_gemm_args x = {};
    x.mode = GM_KSEG;
    x.nb = glu ? 2 : 1;
    x.nk = 1;
    x.epi = EPI_ACC;
    x.A0 = DP(xe).p;
    x.lda = d;
    x.B0 = DP(dg1).p;
    x.B1 = glu ? DP(*dg3).p : nullptr;
    x.ldb = f;
    x.C0 = DP(dw1).p;
    x.C1 = glu ? DP(*dw3).p : nullptr;
    x.ldc = f;
    x.c_es = d * f;
    x.M = d;
    x.N = f;
    moe_cu_grouped_gemm(b, "experts_backward_weights", &g, &x, t);
    /* dw2[e] += aᵀ·dy: A stored [rows, f], B [rows, d] */
    moe_cu_gemm_args y = {};
    y.mode = GM_KSEG;
    y.nb = 1;
    y.nk = 1;
    y.epi = EPI_ACC;
    y.A0 = DP(a).p;
    y.lda = f;
    y.B0 = DP(dye).p;
    y.ldb = d;
    y.C0 = DP(dw2).p;
    y.ldc = d;
    y.c_es = f * d;
    y.M = f;
    y.N = d;
    moe_cu_grouped_gemm(b, "experts_backward_weights", &g, &y, t);
}

/* ---- the single FFN (cuBLAS) ------------------------------------------------------------------------ */

__global__ void k_act_fwd(dptr a, dptr h1, dptr h3, int act, int64_t n)
{
    CU_LOOP(i, n)
    {
        float v = act_fwd(act, ldf(h1, i));
        if (h3.p)
            v *= ldf(h3, i);
        stf(a, i, v);
    }
}

/* g1 holds da on entry; g1, g3 = the pre-activation gradients on return */
__global__ void k_act_bwd(dptr g1, dptr g3, dptr h1, dptr h3, int act, int64_t n)
{
    CU_LOOP(i, n)
    {
        float o1 = 0.0f, o3 = 0.0f;
        act_bwd(act, ldf(g1, i), ldf(h1, i), h3.p ? ldf(h3, i) : 0.0f, &o1, &o3);
        stf(g1, i, o1);
        if (g3.p)
            stf(g3, i, o3);
    }
}

static void cu_ffn_forward(moe_backend *b, moe_tensor out, moe_tensor h1, moe_tensor h3, moe_tensor a, moe_tensor x,
                           moe_tensor w1, moe_tensor *w3, moe_tensor w2, moe_activation act, int64_t n, int64_t d,
                           int64_t f)
{
    if (n <= 0)
        return;
    const int glu = glu_of(act) && w3;
    moe_cu_gemm(b, "ffn_forward", 0, 0, n, f, d, 1.0f, DP(x), d, DP(w1), f, 0.0f, DP(h1), f);
    if (glu)
        moe_cu_gemm(b, "ffn_forward", 0, 0, n, f, d, 1.0f, DP(x), d, DP(*w3), f, 0.0f, DP(h3), f);
    k_act_fwd<<<moe_cu_blocks(n * f, 256), 256, 0, moe_cu_stream(b)>>>(DP(a), DP(h1), glu ? DP(h3) : dptr{nullptr, 0},
                                                                       act, n * f);
    moe_cu_check(b, "ffn_forward");
    moe_cu_gemm(b, "ffn_forward", 0, 0, n, d, f, 1.0f, DP(a), f, DP(w2), d, 0.0f, DP(out), d);
}

size_t moe_cu_experts_scratch(const moe_workload *w, moe_dtype ft)
{
    int64_t m = 0;
    if (w->layer) {
        const moe_layer_config *c = w->layer;
        const int64_t Fs = c->n_shared * (c->d_ff_shared > 0 ? c->d_ff_shared : c->d_ff);
        const int64_t Fd = c->residual ? (c->d_ff_dense > 0 ? c->d_ff_dense : c->d_ff) : 0;
        m = w->tokens * (Fs > Fd ? Fs : Fd);
    }
    if (w->rows_ffn * w->d_ff > m)
        m = w->rows_ffn * w->d_ff;
    size_t need = (size_t)(2 * m) * moe_cu_size(ft) + 512;
    if (w->layer && ft == MOE_BF16) { /* the split weight gradients of small experts (gemm.cu) */
        const moe_layer_config *c = w->layer;
        const double E = (double)c->n_experts, rows = (double)w->tokens * (double)c->top_k / (E > 0 ? E : 1);
        const size_t part = (size_t)MOE_CU_KSEG_SPLIT * 2 * (size_t)(c->n_experts * c->d_model * c->d_ff) * sizeof(float);
        if (rows * (double)c->d_model * (double)c->d_ff < MOE_CU_CUBLAS_MACS && part > need)
            need = part;
    }
    return need;
}

static void cu_ffn_backward(moe_backend *b, moe_tensor *dx, moe_tensor dw1, moe_tensor *dw3, moe_tensor dw2,
                            moe_tensor dout, moe_tensor h1, moe_tensor h3, moe_tensor a, moe_tensor x, moe_tensor w1,
                            moe_tensor *w3, moe_tensor w2, moe_activation act, int64_t n, int64_t d, int64_t f)
{
    if (n <= 0)
        return;
    const int glu = glu_of(act) && w3;
    const moe_dtype t = h1.buf->type;
    const size_t es = moe_cu_size(t), half = ((size_t)(n * f) * es + 255) / 256 * 256;
    char *s = (char *)moe_cu_scratch(b, (glu ? 2 : 1) * half, "ffn_backward");
    if (!s)
        return;
    const dptr g1 = {s, moe_cu_dt(t)}, g3 = {glu ? s + half : nullptr, moe_cu_dt(t)};
    /* da = dout·w2ᵀ into g1, then through the activation */
    moe_cu_gemm(b, "ffn_backward", 0, 1, n, f, d, 1.0f, DP(dout), d, DP(w2), d, 0.0f, g1, f);
    k_act_bwd<<<moe_cu_blocks(n * f, 256), 256, 0, moe_cu_stream(b)>>>(g1, g3, DP(h1), glu ? DP(h3) : dptr{nullptr, 0},
                                                                       act, n * f);
    moe_cu_check(b, "ffn_backward");
    if (dx) {
        moe_cu_gemm(b, "ffn_backward", 0, 1, n, d, f, 1.0f, g1, f, DP(w1), f, 1.0f, DP(*dx), d);
        if (glu)
            moe_cu_gemm(b, "ffn_backward", 0, 1, n, d, f, 1.0f, g3, f, DP(*w3), f, 1.0f, DP(*dx), d);
    }
    moe_cu_gemm(b, "ffn_backward", 1, 0, d, f, n, 1.0f, DP(x), d, g1, f, 1.0f, DP(dw1), f);
    if (glu && dw3)
        moe_cu_gemm(b, "ffn_backward", 1, 0, d, f, n, 1.0f, DP(x), d, g3, f, 1.0f, DP(*dw3), f);
    moe_cu_gemm(b, "ffn_backward", 1, 0, f, d, n, 1.0f, DP(a), f, DP(dout), d, 1.0f, DP(dw2), d);
}

void moe_cu_experts_ops(moe_backend *b)
{
    b->experts_forward = cu_experts_forward;
    b->experts_backward_data = cu_experts_backward_data;
    b->experts_backward_weights = cu_experts_backward_weights;
    b->ffn_forward = cu_ffn_forward;
    b->ffn_backward = cu_ffn_backward;
}
