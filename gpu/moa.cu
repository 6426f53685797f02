/*
 * Mixture of attention heads on the device: the plan ops of ref/moa.h.
 *
 * The grouped linear map is the experts' grouped GEMM (gemm.h) with one weight operand:
 * forward and the input gradient over each expert's rows, the weight gradient reducing
 * over them; the row counts stay on the device. Scatter and gather to the choice slots
 * are one block per plan row, reading the plan's n on the device: each slot is written by
 * the one row that chose it, so no two threads touch one element and no order matters.
 */
#include "gpu/gemm.h"

/* every tensor of op's type t, f32 or bf16 */
static int typed(moe_backend *b, const char *op, const moe_tensor *const *ts, int n)
{
    const moe_dtype t = ts[0]->buf->type;
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

/* ye[i] = xe[i]·w[e] over each expert's segment; w[e] is [K, N] */
static void cu_experts_linear_forward(moe_backend *b, moe_tensor ye, moe_tensor xe, moe_tensor w, const moe_bplan *p,
                                      int64_t K, int64_t N)
{
    const moe_tensor *ts[] = {&xe, &ye, &w};
    if (K <= 0 || N <= 0 || !typed(b, "experts_linear_forward", ts, 3))
        return;
    const moe_cu_group g = moe_cu_group_of(p);
    moe_cu_gemm_args x = {};
    x.mode = GM_ROWS;
    x.nb = 1;
    x.nk = 1;
    x.epi = EPI_STORE;
    x.A0 = DP(xe).p;
    x.lda = K;
    x.B0 = DP(w).p;
    x.ldb = N;
    x.b_es = K * N;
    x.C0 = DP(ye).p;
    x.ldc = N;
    x.N = N;
    x.K = K;
    moe_cu_grouped_gemm(b, "experts_linear_forward", &g, &x, xe.buf->type);
}

static void cu_experts_linear_backward(moe_backend *b, moe_tensor *dxe, moe_tensor dw, moe_tensor dye, moe_tensor xe,
                                       moe_tensor w, const moe_bplan *p, int64_t K, int64_t N)
{
    const moe_tensor *ts[] = {&dye, dxe, &dw, &xe, &w};
    if (K <= 0 || N <= 0 || !typed(b, "experts_linear_backward", ts, 5))
        return;
    const moe_dtype t = dye.buf->type;
    const moe_cu_group g = moe_cu_group_of(p);
    if (dxe) { /* dxe += dye·w[e]ᵀ: w[e] is B stored [N_out = K, K_red = N] */
        moe_cu_gemm_args x = {};
        x.mode = GM_ROWS;
        x.bt = 1;
        x.nb = 1;
        x.nk = 1;
        x.epi = EPI_ACC;
        x.A0 = DP(dye).p;
        x.lda = N;
        x.B0 = DP(w).p;
        x.ldb = N;
        x.b_es = K * N;
        x.C0 = DP(*dxe).p;
        x.ldc = K;
        x.N = K;
        x.K = N;
        moe_cu_grouped_gemm(b, "experts_linear_backward", &g, &x, t);
    }
    /* dw[e] += xeᵀ·dye, reducing over e's rows: A stored [rows, K], B [rows, N] */
    moe_cu_gemm_args y = {};
    y.mode = GM_KSEG;
    y.nb = 1;
    y.nk = 1;
    y.epi = EPI_ACC;
    y.A0 = DP(xe).p;
    y.lda = K;
    y.B0 = DP(dye).p;
    y.ldb = N;
    y.C0 = DP(dw).p;
    y.ldc = N;
    y.c_es = K * N;
    y.M = K;
    y.N = N;
    moe_cu_grouped_gemm(b, "experts_linear_backward", &g, &y, t);
}

/* an expert-choice plan (choice[i] = -1) has no slots */
static int token_choice(moe_backend *b, const moe_bplan *p, const char *op)
{
    if (p->ec) {
        moe_backend_fail(b, op, MOE_ERR_ARG, "an expert-choice plan has no choice slots");
        return 0;
    }
    return 1;
}

static int threads_for(int64_t w)
{
    return w >= 256 ? 256 : (w >= 128 ? 128 : (w >= 64 ? 64 : 32));
}

/* one block per plan row: slots[choice[i]] = rows[i] (add: +=, the other way) */
__global__ void k_choice_move(dptr dst, dptr src, const int32_t *choice, const int32_t *nd, int64_t w, int gather)
{
    const int64_t i = blockIdx.x;
    if (i >= nd[0])
        return;
    const int64_t s = choice[i];
    for (int64_t c = threadIdx.x; c < w; c += blockDim.x)
        if (gather)
            stf(dst, i * w + c, ldf(dst, i * w + c) + ldf(src, s * w + c));
        else
            stf(dst, s * w + c, ldf(src, i * w + c));
}

static void cu_choice_scatter(moe_backend *b, moe_tensor slots, moe_tensor rows, const moe_bplan *p, int64_t w)
{
    const moe_tensor *ts[] = {&slots, &rows};
    if (w <= 0 || !token_choice(b, p, "choice_scatter") || !typed(b, "choice_scatter", ts, 2))
        return;
    b->fill(b, slots, 0.0, p->T * p->k * w);
    if (p->rows_bound <= 0)
        return;
    k_choice_move<<<(unsigned)p->rows_bound, threads_for(w), 0, moe_cu_stream(b)>>>(DP(slots), DP(rows), p->choice,
                                                                                     p->nd, w, 0);
    moe_cu_check(b, "choice_scatter");
}

static void cu_choice_gather(moe_backend *b, moe_tensor rows, moe_tensor slots, const moe_bplan *p, int64_t w)
{
    const moe_tensor *ts[] = {&rows, &slots};
    if (w <= 0 || p->rows_bound <= 0 || !token_choice(b, p, "choice_gather") || !typed(b, "choice_gather", ts, 2))
        return;
    k_choice_move<<<(unsigned)p->rows_bound, threads_for(w), 0, moe_cu_stream(b)>>>(DP(rows), DP(slots), p->choice,
                                                                                     p->nd, w, 1);
    moe_cu_check(b, "choice_gather");
}

void moe_cu_moa_ops(moe_backend *b)
{
    b->experts_linear_forward = cu_experts_linear_forward;
    b->experts_linear_backward = cu_experts_linear_backward;
    b->choice_scatter = cu_choice_scatter;
    b->choice_gather = cu_choice_gather;
}
