/*
 * The bf16 grouped GEMMs of large experts (gemm.h): one cuBLAS GEMM per expert and operand,
 * from the plan's segments on the host, spread over the side streams, with the FFN's
 * activation (forward) or its gradient (backward) as a pass of its own. gemm.cu's kernels
 * take the rest.
 */
#include "gpu/act.cuh"
#include "gpu/gemm.h"

typedef __nv_bfloat16 bf16;

/* The FFN's epilogues as passes of their own over a contiguous run of n elements (rows
 * [lo, hi) of buffers whose rows are N wide): a = act(h1) [⊙ h3] from the stored (rounded)
 * h1, h3; and from da (in g1's place) g1 and g3. Memory-bound, so each thread moves 8 bf16
 * (16 bytes) at a time where every pointer allows it. */
template <bool GLU> __device__ __forceinline__ void glu_fwd_at(const bf16 *h1, const bf16 *h3, bf16 *a, long long i,
                                                                int act)
{
    float v = act_fwd(act, tof<bf16>(h1[i]));
    if (GLU)
        v *= tof<bf16>(h3[i]);
    a[i] = fromf<bf16>(v);
}

template <bool GLU> __global__ void glu_fwd(const bf16 *h1, const bf16 *h3, bf16 *a, long long n, int act, bool vec)
{
    const int W = vrow<bf16>::W;
    const long long stride = (long long)gridDim.x * blockDim.x;
    long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x;
    if (vec) {
        for (; i < n / W; i += stride) {
            float x1[W], x3[W], y[W];
            vrow<bf16>::load(h1 + i * W, x1);
            if (GLU)
                vrow<bf16>::load(h3 + i * W, x3);
#pragma unroll
            for (int j = 0; j < W; j++)
                y[j] = GLU ? act_fwd(act, x1[j]) * x3[j] : act_fwd(act, x1[j]);
            vrow<bf16>::store(a + i * W, y);
        }
        i = n / W * W + blockIdx.x * (long long)blockDim.x + threadIdx.x; /* the tail */
        if (i < n)
            glu_fwd_at<GLU>(h1, h3, a, i, act);
        return;
    }
    for (; i < n; i += stride)
        glu_fwd_at<GLU>(h1, h3, a, i, act);
}

template <bool GLU> __device__ __forceinline__ void glu_bwd_at(bf16 *g1, bf16 *g3, const bf16 *H1, const bf16 *H3,
                                                                long long i, int act)
{
    float d1 = 0.0f, d3 = 0.0f;
    act_bwd(act, tof<bf16>(g1[i]), tof<bf16>(H1[i]), GLU ? tof<bf16>(H3[i]) : 0.0f, &d1, &d3);
    g1[i] = fromf<bf16>(d1);
    if (GLU)
        g3[i] = fromf<bf16>(d3);
}

template <bool GLU>
__global__ void glu_bwd(bf16 *g1, bf16 *g3, const bf16 *H1, const bf16 *H3, long long n, int act, bool vec)
{
    const int W = vrow<bf16>::W;
    const long long stride = (long long)gridDim.x * blockDim.x;
    long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x;
    if (vec) {
        for (; i < n / W; i += stride) {
            float da[W], x1[W], x3[W] = {}, o1[W], o3[W];
            vrow<bf16>::load(g1 + i * W, da);
            vrow<bf16>::load(H1 + i * W, x1);
            if (GLU)
                vrow<bf16>::load(H3 + i * W, x3);
#pragma unroll
            for (int j = 0; j < W; j++) {
                o3[j] = 0.0f;
                act_bwd(act, da[j], x1[j], x3[j], &o1[j], &o3[j]);
            }
            vrow<bf16>::store(g1 + i * W, o1);
            if (GLU)
                vrow<bf16>::store(g3 + i * W, o3);
        }
        i = n / W * W + blockIdx.x * (long long)blockDim.x + threadIdx.x;
        if (i < n)
            glu_bwd_at<GLU>(g1, g3, H1, H3, i, act);
        return;
    }
    for (; i < n; i += stride)
        glu_bwd_at<GLU>(g1, g3, H1, H3, i, act);
}

/* The activation pass after the GEMMs of rows [lo, hi) (the FFN's buffers are dense: ldc = N). */
static void glu_pass(moe_backend *b, const char *op, const moe_cu_gemm_args *a, long long lo, long long hi)
{
    if (a->ldc != a->N) {
        moe_backend_fail(b, op, MOE_ERR_ARG, "activation pass over rows %lld wide stored %lld apart", (long long)a->N,
                         (long long)a->ldc);
        return;
    }
    const long long off = lo * a->ldc, n = (hi - lo) * a->N;
    const bool glu = a->epi == EPI_FWD ? a->nb == 2 : a->C1 != nullptr;
    const bf16 *h1 = (const bf16 *)a->C0 + off, *h3 = glu ? (const bf16 *)a->C1 + off : nullptr;
    bf16 *c2 = a->epi == EPI_FWD ? (bf16 *)a->C2 + off : nullptr;
    const bf16 *H1 = a->epi == EPI_BWD ? (const bf16 *)a->H1 + off : nullptr;
    const bf16 *H3 = a->epi == EPI_BWD && glu ? (const bf16 *)a->H3 + off : nullptr;
    const bool vec = moe_cu_aligned16(h1) && moe_cu_aligned16(h3) && moe_cu_aligned16(c2) && moe_cu_aligned16(H1) && moe_cu_aligned16(H3);
    const long long work = vec ? n / 8 + 1 : n;
    const unsigned blocks = (unsigned)(work / 256 + 1 < 16384 ? work / 256 + 1 : 16384);
    cudaStream_t s = moe_cu_stream(b);
    if (a->epi == EPI_FWD) {
        if (glu)
            glu_fwd<true><<<blocks, 256, 0, s>>>(h1, h3, c2, n, a->act, vec);
        else
            glu_fwd<false><<<blocks, 256, 0, s>>>(h1, h3, c2, n, a->act, vec);
    } else {
        bf16 *g1 = (bf16 *)a->C0 + off, *g3 = glu ? (bf16 *)a->C1 + off : nullptr;
        if (glu)
            glu_bwd<true><<<blocks, 256, 0, s>>>(g1, g3, H1, H3, n, a->act, vec);
        else
            glu_bwd<false><<<blocks, 256, 0, s>>>(g1, g3, H1, H3, n, a->act, vec);
    }
    moe_cu_check(b, op);
}

static dptr bp(const void *p, long long off)
{
    return dptr{(void *)((const bf16 *)p + off), DT_BF16};
}

/* bf16 grouped GEMMs as cuBLAS GEMMs, one per expert and operand, from the plan's segments
 * on the host (read back once per route, cuda.h). Measured on an H200 (bench/grouped_gemm.cu,
 * BENCHMARKS.md): the read back costs ~10 µs, and per-expert cuBLAS runs the expert GEMMs of a
 * 64-expert layer ~3x faster than cmoe's mma.sync kernel (and faster than
 * cublasGemmGroupedBatchedEx). */
static void cublas_grouped(moe_backend *b, const char *op, const moe_cu_group *grp, const moe_cu_gemm_args *a)
{
    const int64_t E = grp->E;
    const int32_t *hb = moe_cu_plan_segments(b, op, grp->plan);
    if (!hb)
        return;
    const int32_t *hc = hb + E;
    const float first = a->epi == EPI_ACC ? 1.0f : 0.0f;
    const void *B[2] = {a->B0, a->B1};
    void *C[2] = {a->C0, a->C1};
    /* The experts' GEMMs are independent (disjoint outputs; an expert's two GEMMs into one
     * accumulator stay on one stream, in order), so they are spread over the side streams:
     * one expert's tail overlaps the next one's start. Each GEMM computes the same bits on any
     * stream; the join makes the current stream wait for all of them. */
    moe_cuda_state *st = moe_cu(b);
    cudaStream_t main_s = moe_cu_stream(b);
    int nside = 0;
    for (int64_t e = 0; e < E && nside < 2; e++)
        nside += hc[e] > 0;
    nside = nside > 1 ? MOE_CU_SIDE : 0;
    if (nside && !moe_cu_ok(b, op, cudaEventRecord(st->fork_ev, main_s), "fork"))
        return;
    for (int i = 0; i < nside; i++)
        moe_cu_ok(b, op, cudaStreamWaitEvent(st->side[i], st->fork_ev, 0), "fork");
    long long lo = -1, hi = 0;
    int next = 0;
    for (int64_t e = 0; e < E; e++) {
        const long long r0 = hb[e], m = hc[e];
        if (m <= 0)
            continue;
        lo = lo < 0 || r0 < lo ? r0 : lo;
        hi = r0 + m > hi ? r0 + m : hi;
        if (nside)
            st->side_cur = next++ % nside;
        if (a->mode == GM_ROWS) { /* C[r0.., N] = A[r0.., K] · B_e (+ A1 · B1_e) */
            for (int j = 0; j < a->nb; j++)
                moe_cu_gemm(b, op, 0, a->bt, m, a->N, a->K, 1.0f, bp(a->A0, r0 * a->lda), a->lda,
                            bp(B[j], e * a->b_es), a->ldb, first, bp(C[j], r0 * a->ldc), a->ldc);
            if (a->nk == 2)
                moe_cu_gemm(b, op, 0, a->bt, m, a->N, a->K, 1.0f, bp(a->A1, r0 * a->lda), a->lda,
                            bp(a->B1, e * a->b_es), a->ldb, 1.0f, bp(a->C0, r0 * a->ldc), a->ldc);
        } else { /* C_e[M, N] (+)= A[r0.., M]ᵀ · B[r0.., N] */
            for (int j = 0; j < a->nb; j++)
                moe_cu_gemm(b, op, 1, 0, a->M, a->N, m, 1.0f, bp(a->A0, r0 * a->lda), a->lda, bp(B[j], r0 * a->ldb),
                            a->ldb, first, bp(C[j], e * a->c_es), a->ldc);
        }
    }
    st->side_cur = -1;
    for (int i = 0; i < nside; i++)
        if (moe_cu_ok(b, op, cudaEventRecord(st->join_ev[i], st->side[i]), "join"))
            moe_cu_ok(b, op, cudaStreamWaitEvent(main_s, st->join_ev[i], 0), "join");
    if (lo >= 0 && (a->epi == EPI_FWD || a->epi == EPI_BWD))
        glu_pass(b, op, a, lo, hi);
}

/* cuBLAS pays a read-back of the segments, which drains the stream, and a launch per expert:
 * worth it when the experts' GEMMs are large. (On Hopper the own kernel below the line is
 * gemm_sm90.cu's: layer (b) 12.5 ms against cuBLAS's 11.4, layer (a) 71 against 55.) Measured on an H200 (BENCHMARKS.md): a layer of
 * 64 experts averaging 1536 x 2048 x 1408 (4.4e9 multiply-adds each) runs 2.3x faster through
 * cuBLAS, while training gpu-100m (8 experts of 4096 x 512 x 640, 1.3e9) runs 1.7x slower, its
 * small kernels starved of the queue the read-backs empty. The line is drawn between them. */
int moe_cu_grouped_cublas(moe_backend *b, const char *op, const moe_cu_group *grp, const moe_cu_gemm_args *a)
{
    const int mode = moe_cu(b)->gemm;
    if (!grp->plan || mode == MOE_CU_GEMM_MMA || mode == MOE_CU_GEMM_SIMT || mode == MOE_CU_GEMM_WGMMA)
        return 0;
    const double rows = (double)grp->rows_bound / (double)grp->E;
    const double macs = a->mode == GM_ROWS ? rows * (double)a->N * (double)a->K : rows * (double)a->M * (double)a->N;
    if (mode != MOE_CU_GEMM_CUBLAS && macs < MOE_CU_CUBLAS_MACS)
        return 0;
    cublas_grouped(b, op, grp, a);
    return 1;
}
