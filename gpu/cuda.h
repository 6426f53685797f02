/*
 * cuda.h — internals shared by the cuda backend's files (gpu/: backend.cu and the op files,
 * named as their ref/ and src/cpu/ twins).
 *
 * Buffers live in device memory and carry their dtype (f32, bf16, i32). Every op is
 * enqueued on the backend's current stream and returns at once; a failed launch (or, with
 * CMOE_CUDA_SYNC=1, a failed run) is recorded as the backend's sticky error naming the op.
 * Ops read the types of the tensors they are given, so one op serves the fp32 router next
 * to bf16 experts (moe_layer.c's wide and compute types): element loads and stores go
 * through ldf/stf, which convert, and every sum is kept in fp32 or fp64 registers.
 *
 * Determinism: no floating-point atomics anywhere. Reductions run in a fixed order
 * (a fixed grid, a fixed tree per block, then the partial sums in index order), scatters
 * are turned into gathers through the plan's token index, and cuBLAS is deterministic
 * with the explicit workspace it is given. Two identical runs give the same bits.
 */
#ifndef CMOE_GPU_CUDA_H
#define CMOE_GPU_CUDA_H

#include <cstdint>
#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

extern "C" {
#include "backend/backend.h"
}

struct moe_buf {
    moe_dtype type; /* MOE_F32, MOE_BF16 or MOE_I32 */
    int64_t n;
    void *d;
};

struct moe_event {
    cudaEvent_t ev;
};

/*
 * A routing plan in device memory, laid out as moe_plan (sorted by expert, then token),
 * with int32 indices (moe_layer_config_validate keeps T·k and E·C below 2^31), the
 * inverse index token -> rows (tok_off/tok_row) that combine and the dispatch backward
 * gather through, and the workspace route needs (radix sorts, Sinkhorn), all sized at
 * creation. The count of kept rows n and of dropped ones live on the device (nd); the
 * host knows T, k, the capacity and bounds (rows_bound) that size the launches.
 */
/* The most experts a token-choice selection takes per token (one thread picks them). */
#define MOE_CU_MAX_K 32
enum { MOE_CU_GEMM_AUTO = 0, MOE_CU_GEMM_CUBLAS = 1, MOE_CU_GEMM_MMA = 2, MOE_CU_GEMM_SIMT = 3, MOE_CU_GEMM_WGMMA = 4 };

struct moe_bplan {
    int64_t E, max_T, max_k, cap_n, sortn; /* as allocated */
    int64_t T, k, capacity;                /* of the last route / upload */
    int64_t rows_bound;                    /* rows the plan may hold: launch bound over its rows */
    int ec;                                /* expert-choice plan (choice = -1) */
    int32_t *token, *expert, *choice, *src; /* [cap_n] */
    float *weight;                          /* [cap_n] */
    int32_t *offsets;                       /* [E + 1]; offsets[E] = -1 for segments */
    int32_t *count, *selected, *start;      /* [E], start [E + 1] */
    int32_t *nd;                            /* [2]: n, dropped */
    int32_t *choice_expert;                 /* [max_T · max_k] */
    float *choice_weight;
    uint8_t *choice_kept;
    int32_t *tok_off; /* [max_T + 1] */
    int32_t *tok_row; /* [cap_n] */
    /* route's workspace */
    unsigned long long *keys_in, *keys_out; /* [sortn] */
    int32_t *vals_in, *vals_out;            /* [sortn] */
    int32_t *flags, *pos;                   /* [max_T · E] expert choice */
    float *bal;                             /* [max_T · E] Sinkhorn */
    double *d0, *d1;                        /* [max_T], [E] */
    float *mx;                              /* [1] */
    void *cub_tmp;
    size_t cub_bytes;
    /* The segments (begin, count) on the host, for the grouped GEMMs that launch a cuBLAS
     * GEMM per expert: copied back as soon as a route has made them, so that the host waits
     * for the plan only, not for the kernels queued behind it, and once per plan rather than
     * once per GEMM (moe_cu_plan_segments); written directly where the host made them. */
    int32_t *seg_h;     /* pinned [2 · E] */
    cudaEvent_t seg_ev; /* recorded after the copy */
    int seg_state;      /* SEG_NONE, SEG_COPYING (wait on seg_ev), SEG_READY */
};
enum { SEG_NONE, SEG_COPYING, SEG_READY };

/* After a route: queue the copy of p's segments to the host (gpu/plan.cu). */
void moe_cu_plan_segments_async(moe_backend *b, moe_bplan *p);
/* p's segments on the host, waiting for their copy if it is under way; NULL after an error
 * (reported on b under op). begin = the result, count = the result + E. */
const int32_t *moe_cu_plan_segments(moe_backend *b, const char *op, const moe_bplan *p);

/* Side streams over which the cuBLAS path of the grouped GEMMs spreads the experts (gemm.cu) */
#define MOE_CU_SIDE 4

typedef struct {
    int device, sm_count;
    int sm90; /* compute capability 9.0: the Hopper grouped GEMM (gemm_sm90.cu) may run */
    cudaStream_t stream[MOE_NSTREAMS];
    int cur;
    /* the side streams, each with its own cuBLAS workspace, forked from the current stream and
     * joined back into it by events around a grouped GEMM; side_cur >= 0 sends ops to one */
    cudaStream_t side[MOE_CU_SIDE];
    void *side_ws[MOE_CU_SIDE];
    cudaEvent_t fork_ev, join_ev[MOE_CU_SIDE];
    int side_cur;
    cublasHandle_t blas;
    void *blas_ws[MOE_NSTREAMS];
    size_t blas_ws_bytes;
    char *scratch; /* the ops' workspace (compute stream), sized by reserve() */
    size_t scratch_bytes;
    int sync_ops;  /* CMOE_CUDA_SYNC=1: wait after every op (errors name their op exactly) */
    int gemm;      /* how bf16 grouped GEMMs run (CMOE_CUDA_GEMM, gemm.h): MOE_CU_GEMM_* */
    void **pending; /* host temporaries of enqueued uploads, freed at the next sync */
    int npending, cap_pending;
    size_t pending_bytes;
} moe_cuda_state;

static inline moe_cuda_state *moe_cu(moe_backend *b)
{
    return (moe_cuda_state *)b->impl;
}

static inline cudaStream_t moe_cu_stream(moe_backend *b)
{
    moe_cuda_state *st = moe_cu(b);
    return st->side_cur >= 0 ? st->side[st->side_cur] : st->stream[st->cur];
}

/* ---- typed device pointers ----------------------------------------------------------- */

enum { DT_F32 = 0, DT_BF16 = 1, DT_I32 = 2 };

/* An element pointer and its storage type, passed to kernels by value. */
struct dptr {
    void *p;
    int t;
};

static inline int moe_cu_dt(moe_dtype t)
{
    return t == MOE_BF16 ? DT_BF16 : (t == MOE_I32 ? DT_I32 : DT_F32);
}

static inline size_t moe_cu_size(moe_dtype t)
{
    return t == MOE_BF16 ? 2 : 4;
}

/* The element pointer of a tensor (NULL when its buffer is). */
static inline dptr DP(moe_tensor t)
{
    dptr d = {nullptr, DT_F32};
    if (t.buf) {
        d.p = (char *)t.buf->d + (size_t)t.off * moe_cu_size(t.buf->type);
        d.t = moe_cu_dt(t.buf->type);
    }
    return d;
}

static inline dptr DPOPT(const moe_tensor *t)
{
    return t ? DP(*t) : dptr{nullptr, DT_F32};
}

static inline const int32_t *I32P(moe_tensor t)
{
    return t.buf ? (const int32_t *)t.buf->d + t.off : nullptr;
}

#ifdef __CUDACC__
__device__ __forceinline__ float ldf(dptr a, int64_t i)
{
    return a.t == DT_BF16 ? __bfloat162float(((const __nv_bfloat16 *)a.p)[i]) : ((const float *)a.p)[i];
}

__device__ __forceinline__ void stf(dptr a, int64_t i, float v)
{
    if (a.t == DT_BF16)
        ((__nv_bfloat16 *)a.p)[i] = __float2bfloat16_rn(v);
    else
        ((float *)a.p)[i] = v;
}

/* v as it reads back from a's storage (bf16 rounding), for values used again downstream */
__device__ __forceinline__ float roundt(int t, float v)
{
    return t == DT_BF16 ? __bfloat162float(__float2bfloat16_rn(v)) : v;
}

/* An element of T as float and back (bf16: round to nearest even) */
template <typename T> __device__ __forceinline__ float tof(T v);
template <> __device__ __forceinline__ float tof<float>(float v)
{
    return v;
}
template <> __device__ __forceinline__ float tof<__nv_bfloat16>(__nv_bfloat16 v)
{
    return __bfloat162float(v);
}
template <typename T> __device__ __forceinline__ T fromf(float v);
template <> __device__ __forceinline__ float fromf<float>(float v)
{
    return v;
}
template <> __device__ __forceinline__ __nv_bfloat16 fromf<__nv_bfloat16>(float v)
{
    return __float2bfloat16_rn(v);
}

/* W = 16 / sizeof(T) elements of T at p (16-byte aligned) as floats, and back: one 16-byte
 * access, for the memory-bound row kernels */
template <typename T> struct vrow {
    static const int W = 16 / sizeof(T);
    __device__ static void load(const T *p, float *v)
    {
        const uint4 u = *(const uint4 *)p;
        const T *x = (const T *)&u;
#pragma unroll
        for (int j = 0; j < W; j++)
            v[j] = tof<T>(x[j]);
    }
    __device__ static void store(T *p, const float *v)
    {
        uint4 u;
        T *x = (T *)&u;
#pragma unroll
        for (int j = 0; j < W; j++)
            x[j] = fromf<T>(v[j]);
        *(uint4 *)p = u;
    }
};

/* Sum of v over the warp's 32 lanes by a butterfly of shuffles: the same order, so the same
 * bits, on every run; every lane gets the result. */
template <typename T> __device__ __forceinline__ T warp_sum(T v)
{
    for (int o = 16; o > 0; o >>= 1)
        v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

/* A grid-stride loop over [0, n). */
#define CU_LOOP(i, n)                                                                                               \
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < (n); i += (int64_t)blockDim.x * gridDim.x)

/* Block-wide sum of v in a fixed order (blockDim.x a power of two <= 1024): the same bits
 * on every run. Each warp sums its lanes by a butterfly of shuffles, then every thread adds
 * the warps' sums in warp order. sh holds blockDim.x values; the result is returned to every
 * thread. */
template <typename T> __device__ T block_sum(T v, T *sh)
{
    if (blockDim.x < 32) { /* a partial warp: a tree in shared memory */
        sh[threadIdx.x] = v;
        __syncthreads();
        for (unsigned s = blockDim.x / 2; s > 0; s >>= 1) {
            if (threadIdx.x < s)
                sh[threadIdx.x] += sh[threadIdx.x + s];
            __syncthreads();
        }
        T r = sh[0];
        __syncthreads();
        return r;
    }
    v = warp_sum(v);
    if (blockDim.x == 32)
        return v;
    if ((threadIdx.x & 31) == 0)
        sh[threadIdx.x >> 5] = v;
    __syncthreads();
    T r = sh[0];
    for (unsigned w = 1; w < blockDim.x / 32; w++)
        r += sh[w];
    __syncthreads();
    return r;
}
#endif

/* p is NULL or 16 (4) -byte aligned */
static inline bool moe_cu_aligned16(const void *p)
{
    return !p || ((uintptr_t)p & 15) == 0;
}

static inline bool moe_cu_aligned4(const void *p)
{
    return !p || ((uintptr_t)p & 3) == 0;
}

/* Rows of n elements of es bytes from p, each starting 16-byte aligned: the 16-byte row kernels */
static inline bool moe_cu_rows16(const void *p, int64_t n, size_t es)
{
    return moe_cu_aligned16(p) && n * (int64_t)es % 16 == 0;
}

/* Blocks of a grid-stride launch over n elements (at most 4 per SM-ish, at least 1). */
static inline unsigned moe_cu_blocks(int64_t n, int threads)
{
    int64_t g = (n + threads - 1) / threads;
    if (g < 1)
        g = 1;
    if (g > 65535)
        g = 65535;
    return (unsigned)g;
}

/* ---- errors and scratch ---------------------------------------------------------------- */

/* After a launch: a launch error (or with sync_ops, a run error) becomes the sticky error
 * of op. Returns 1 when all is well. */
int moe_cu_check(moe_backend *b, const char *op);
/* A CUDA runtime call's status as the sticky error of op; returns 1 when cudaSuccess. */
int moe_cu_ok(moe_backend *b, const char *op, cudaError_t e, const char *what);
/* Enqueues the copy of bytes from the malloc'd host temporary tmp to device dst on the
 * current stream; tmp is freed once the copy is done (at the next sync). 0 on failure. */
int moe_cu_copy_in(moe_backend *b, const char *op, void *dst, void *tmp, size_t bytes);
/* bytes of scratch (256-byte aligned) as reserved, or NULL with the sticky error set */
void *moe_cu_scratch(moe_backend *b, size_t bytes, const char *op);

/*
 * Row-major C[M, N] = alpha·op(A)·op(B) + beta·C through cuBLAS (ta: A is stored [K, M];
 * tb: B is stored [N, K]). A and B share a type; C may be f32 beside bf16 operands.
 * fp32 operands run without TF32 (pedantic fp32), bf16 on the tensor cores with fp32
 * accumulation.
 */
void moe_cu_gemm(moe_backend *b, const char *op, int ta, int tb, int64_t M, int64_t N, int64_t K, float alpha,
                 dptr A, int64_t lda, dptr B, int64_t ldb, float beta, dptr C, int64_t ldc);
/* The same for a batch of row-major problems whose pointers are in device arrays. */
void moe_cu_gemm_batched(moe_backend *b, const char *op, int ta, int tb, int64_t M, int64_t N, int64_t K,
                         float alpha, const void *const *A, int at, int64_t lda, const void *const *B, int bt,
                         int64_t ldb, float beta, void *const *C, int ct, int64_t ldc, int64_t batch);

/* Bytes of temporary storage of the radix sorts (64-bit keys, int32 values) and scans of
 * up to n items. */
size_t moe_cu_sort_bytes(int64_t n);
/* Stable sort of (keys, vals) over bits [lo, hi); 0 on a CUDA failure (sticky error set). */
int moe_cu_sort(moe_backend *b, const char *op, void *tmp, size_t tmp_bytes, const unsigned long long *kin,
                unsigned long long *kout, const int32_t *vin, int32_t *vout, int64_t n, int lo, int hi);
/* out = exclusive prefix sums of in (int32) over n */
int moe_cu_scan(moe_backend *b, const char *op, void *tmp, size_t tmp_bytes, const int32_t *in, int32_t *out,
                int64_t n);
/* bits needed for values in [0, v] */
static inline int moe_cu_bits(int64_t v)
{
    int n = 1;
    while (n < 63 && (1LL << n) <= v)
        n++;
    return n;
}

/* ---- one table filler per file --------------------------------------------------------- */
void moe_cu_router_ops(moe_backend *b);
void moe_cu_plan_ops(moe_backend *b);
void moe_cu_select_ops(moe_backend *b);
void moe_cu_aux_ops(moe_backend *b);
void moe_cu_experts_ops(moe_backend *b);
void moe_cu_moa_ops(moe_backend *b);
void moe_cu_dispatch_ops(moe_backend *b);
void moe_cu_model_ops(moe_backend *b); /* calls the five below */
void moe_cu_embedding_ops(moe_backend *b);
void moe_cu_rmsnorm_ops(moe_backend *b);
void moe_cu_rope_ops(moe_backend *b);
void moe_cu_crossentropy_ops(moe_backend *b);
void moe_cu_attention_ops(moe_backend *b);
void moe_cu_adamw_ops(moe_backend *b);

/* Row blocks of the two-pass column sums (RMSNorm's dw, the bias gradient): each column is
 * summed over RB fixed row ranges, then the RB partial sums in order. */
#define MOE_CU_RB 32

/* Scratch each file's ops need for a workload (bytes). */
size_t moe_cu_router_scratch(const moe_workload *w);
size_t moe_cu_aux_scratch(const moe_workload *w);
size_t moe_cu_experts_scratch(const moe_workload *w, moe_dtype ft);
size_t moe_cu_select_scratch(const moe_workload *w);
size_t moe_cu_model_scratch(const moe_workload *w, moe_dtype ft);
size_t moe_cu_attention_scratch(const moe_workload *w, moe_dtype ft);

/* Fused causal attention for bf16 (gpu/flash.cu): whether it takes these tensors (head dims 32,
 * 64, 128; bf16, 16-byte aligned; saved, 4-byte aligned, holds the rows' fp32 log-sum-exp), and
 * the kernels. dsum is scratch of B·H·S floats. */
int moe_cu_flash_ok(int64_t hd, int64_t B, int64_t H, dptr q, dptr k, dptr v, dptr out, dptr saved);
int moe_cu_flash_ok_bwd(dptr dq, dptr dk, dptr dv, dptr dout);
void moe_cu_flash_forward(moe_backend *b, dptr out, dptr lse, dptr q, dptr k, dptr v, int64_t B, int64_t S, int64_t H,
                          int64_t Hkv, int64_t hd);
void moe_cu_flash_backward(moe_backend *b, dptr dq, dptr dk, dptr dv, dptr dout, dptr out, dptr lse, dptr q, dptr k,
                           dptr v, float *dsum, int64_t B, int64_t S, int64_t H, int64_t Hkv, int64_t hd);

/* Grouped expert GEMMs (gpu/gemm.cu): see there. */
struct moe_cu_group {
    const int32_t *begin, *count; /* [E] the plan's segments */
    int64_t E, rows_bound;        /* experts; a bound on the rows of all segments */
    const moe_bplan *plan;        /* the plan they belong to (its segments on the host) */
};

#endif
