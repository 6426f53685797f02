/*
 * gemm_epi.cuh — what the grouped GEMM kernels (gemm.cu, gemm_sm90.cu) share: their
 * arguments on the device and the epilogues that turn an output's accumulators into the
 * stored results (store, accumulate, the FFN's activation and its gradient).
 */
#ifndef CMOE_GPU_GEMM_EPI_CUH
#define CMOE_GPU_GEMM_EPI_CUH

#include "gpu/act.cuh"
#include "gpu/gemm.h"

typedef __nv_bfloat16 bf16;

struct GA {
    const void *A0, *A1, *B0, *B1;
    long long lda, ldb, b_es;
    void *C0, *C1, *C2;
    const void *H1, *H3;
    long long ldc, c_es;
    long long M, N, K;
    const int32_t *begin, *count;
    int E, act;
    int pairs; /* tensor cores: outputs stored two neighbours at a time (4-byte aligned) */
    int split; /* KSEG on tensor cores: each expert's rows in this many parts (kseg_split) */
    float *part; /* split > 1: the parts' fp32 sums [NB][split][E][M][N], added in order after */
};

/* The kernels' arguments from the host's (pairs, split and part left for the caller) */
static inline GA ga_of(const moe_cu_group *grp, const moe_cu_gemm_args *a)
{
    GA g = {};
    g.A0 = a->A0, g.A1 = a->A1, g.B0 = a->B0, g.B1 = a->B1;
    g.lda = a->lda, g.ldb = a->ldb, g.b_es = a->b_es;
    g.C0 = a->C0, g.C1 = a->C1, g.C2 = a->C2, g.H1 = a->H1, g.H3 = a->H3;
    g.ldc = a->ldc, g.c_es = a->c_es;
    g.M = a->M, g.N = a->N, g.K = a->K;
    g.begin = grp->begin, g.count = grp->count;
    g.E = (int)grp->E, g.act = a->act;
    g.split = 1;
    return g;
}

/* One output element: C index ci, the block's accumulators v[NB]. */
template <typename T, int EPI, int NB>
__device__ __forceinline__ void epilogue(const GA &g, long long ci, const float *v)
{
    T *C0 = (T *)g.C0, *C1 = (T *)g.C1, *C2 = (T *)g.C2;
    if (EPI == EPI_STORE) {
        C0[ci] = fromf<T>(v[0]);
        if (NB == 2)
            C1[ci] = fromf<T>(v[1]);
    } else if (EPI == EPI_ACC) {
        C0[ci] = fromf<T>(tof<T>(C0[ci]) + v[0]);
        if (NB == 2)
            C1[ci] = fromf<T>(tof<T>(C1[ci]) + v[1]);
    } else if (EPI == EPI_FWD) {
        /* a from the stored (rounded) h1, h3: what the backward will read */
        const T h1 = fromf<T>(v[0]);
        C0[ci] = h1;
        float a = act_fwd(g.act, tof<T>(h1));
        if (NB == 2) {
            const T h3 = fromf<T>(v[1]);
            C1[ci] = h3;
            a *= tof<T>(h3);
        }
        C2[ci] = fromf<T>(a);
    } else { /* EPI_BWD: v[0] = da */
        const float x = tof<T>(((const T *)g.H1)[ci]);
        const float h3 = g.H3 ? tof<T>(((const T *)g.H3)[ci]) : 0.0f;
        float g1 = 0.0f, g3 = 0.0f;
        act_bwd(g.act, v[0], x, h3, &g1, &g3);
        C0[ci] = fromf<T>(g1);
        if (C1)
            C1[ci] = fromf<T>(g3);
    }
}

/* The same for two neighbouring bf16 outputs (ci, ci + 1; v0, v1 their accumulators) with
 * 4-byte loads and stores of the pairs: the same bits, half the memory instructions. In two
 * parts, so that a kernel can issue all its loads before the first store: what the epilogue
 * reads (C0, C1 to accumulate into; H1, H3 for the activation's gradient), then the rest. */
template <int EPI, int NB>
__device__ __forceinline__ void epilogue2_load(const GA &g, long long ci, __nv_bfloat162 *in)
{
    typedef __nv_bfloat162 b2;
    if (EPI == EPI_ACC) {
        in[0] = *(const b2 *)((const bf16 *)g.C0 + ci);
        if (NB == 2)
            in[1] = *(const b2 *)((const bf16 *)g.C1 + ci);
    } else if (EPI == EPI_BWD) {
        in[0] = *(const b2 *)((const bf16 *)g.H1 + ci);
        in[1] = g.H3 ? *(const b2 *)((const bf16 *)g.H3 + ci) : __floats2bfloat162_rn(0.0f, 0.0f);
    }
}

/* ACT >= 0: the activation known when compiled (the kernel holds that one's code only) */
template <int EPI, int NB, int ACT = -1>
__device__ __forceinline__ void epilogue2_store(const GA &g, long long ci, const float *v0, const float *v1,
                                                const __nv_bfloat162 *in)
{
    typedef __nv_bfloat162 b2;
    const int act = ACT >= 0 ? ACT : g.act;
    b2 *C0 = (b2 *)((bf16 *)g.C0 + ci), *C1 = g.C1 ? (b2 *)((bf16 *)g.C1 + ci) : nullptr;
    if (EPI == EPI_STORE) {
        *C0 = __floats2bfloat162_rn(v0[0], v1[0]);
        if (NB == 2)
            *C1 = __floats2bfloat162_rn(v0[1], v1[1]);
    } else if (EPI == EPI_ACC) {
        const float2 o = __bfloat1622float2(in[0]);
        *C0 = __floats2bfloat162_rn(o.x + v0[0], o.y + v1[0]);
        if (NB == 2) {
            const float2 o1 = __bfloat1622float2(in[1]);
            *C1 = __floats2bfloat162_rn(o1.x + v0[1], o1.y + v1[1]);
        }
    } else if (EPI == EPI_FWD) {
        const b2 h1 = __floats2bfloat162_rn(v0[0], v1[0]);
        *C0 = h1;
        const float2 x = __bfloat1622float2(h1);
        float a0 = act_fwd(act, x.x), a1 = act_fwd(act, x.y);
        if (NB == 2) {
            const b2 h3 = __floats2bfloat162_rn(v0[1], v1[1]);
            *C1 = h3;
            const float2 y = __bfloat1622float2(h3);
            a0 *= y.x;
            a1 *= y.y;
        }
        *(b2 *)((bf16 *)g.C2 + ci) = __floats2bfloat162_rn(a0, a1);
    } else { /* EPI_BWD */
        const float2 x = __bfloat1622float2(in[0]), h3 = __bfloat1622float2(in[1]);
        float a1 = 0.0f, a3 = 0.0f, b1 = 0.0f, b3 = 0.0f;
        act_bwd(act, v0[0], x.x, h3.x, &a1, &a3);
        act_bwd(act, v1[0], x.y, h3.y, &b1, &b3);
        *C0 = __floats2bfloat162_rn(a1, b1);
        if (C1)
            *C1 = __floats2bfloat162_rn(a3, b3);
    }
}

template <int EPI, int NB>
__device__ __forceinline__ void epilogue2(const GA &g, long long ci, const float *v0, const float *v1)
{
    __nv_bfloat162 in[2];
    epilogue2_load<EPI, NB>(g, ci, in);
    epilogue2_store<EPI, NB>(g, ci, v0, v1, in);
}

#endif
