/*
 * gemm.h — grouped GEMMs over a plan's segments, with the segment sizes read on the
 * device (nothing waits for the host to learn how many rows each expert got).
 *
 * Two shapes of problem, each expert e owning rows [begin[e], begin[e] + count[e]) of the
 * row-indexed buffers and slice e of the weights:
 *  - ROWS: C_e[m_e, N] = A_e[m_e, K] · B_e[K, N] with A, C row buffers (m_e from the
 *    plan) and B the expert's weights, stored [K, N] or transposed [N, K] (bt);
 *  - KSEG: C_e[M, N] += A_eᵀ · B_e, the reduction running over the expert's rows (its
 *    count), A stored [rows, M] and B [rows, N]: the weight gradients.
 * Options: two B operands with an accumulator each (x·W1 and x·W3 in one pass; dW1 and
 * dW3), or two (A, B) pairs summed into one accumulator (dx = g1·W1ᵀ + g3·W3ᵀ); and an
 * epilogue: store, accumulate (+=), the FFN's forward activation (h1, h3 and a = act(h1)
 * [⊙ h3] written together), or its backward (da -> g1, g3 reading h1, h3).
 *
 * Every output element is computed by one thread block in one fixed order over K: no
 * split-K, no atomics, the same bits on every run. bf16 operands whose dimensions and
 * pointers are multiples of 8 elements take tensor cores: large experts cuBLAS (one GEMM
 * each, gemm_cublas.cu), the rest wgmma fed by TMA on Hopper (gemm_sm90.cu) or mma.sync
 * m16n8k16 with a cp.async pipeline (gemm.cu), fp32 accumulation; everything else, fp32
 * included, a tiled fp32 kernel (TF32 off: the fp32 cross-checks see plain fp32 arithmetic).
 */
#ifndef CMOE_GPU_GEMM_H
#define CMOE_GPU_GEMM_H

#include "gpu/cuda.h"

enum { GM_ROWS = 0, GM_KSEG = 1 };
enum { EPI_STORE = 0, EPI_ACC = 1, EPI_FWD = 2, EPI_BWD = 3 };

typedef struct {
    int mode;           /* GM_ROWS or GM_KSEG */
    int bt;             /* ROWS: B stored [N, K] (the expert's weights transposed) */
    int nb;             /* B operands, each with its own accumulator and output (1 or 2) */
    int nk;             /* (A, B) pairs summed into one accumulator (1 or 2) */
    int epi, act;
    const void *A0, *A1, *B0, *B1;
    int64_t lda, ldb;   /* leading dimensions (elements), the same for both operands of a kind */
    int64_t b_es;       /* ROWS: elements between two experts' B */
    void *C0, *C1, *C2; /* outputs (EPI_FWD: h1, h3, a; EPI_BWD: g1, g3) */
    const void *H1, *H3; /* EPI_BWD: the saved pre-activations */
    int64_t ldc, c_es;  /* KSEG: elements between two experts' C */
    int64_t M, N, K;    /* ROWS: N, K (M per expert); KSEG: M, N (K per expert) */
} moe_cu_gemm_args;

/* bf16 experts whose GEMMs average this many multiply-adds or more run through cuBLAS, one
 * GEMM per expert; smaller ones through the own tensor-core kernel (gemm.cu, use_cublas) */
#define MOE_CU_CUBLAS_MACS 2.5e9
/* The most parts the own kernel cuts an expert's rows into for its weight gradients
 * (gemm.cu, kseg_split): scratch of MOE_CU_KSEG_SPLIT · 2 · E · d · f floats */
#define MOE_CU_KSEG_SPLIT 4

/* The segments of plan p as a group */
static inline moe_cu_group moe_cu_group_of(const moe_bplan *p)
{
    return moe_cu_group{p->offsets, p->count, p->E, p->rows_bound, p};
}

/* All operands of type t (f32 or bf16). */
void moe_cu_grouped_gemm(moe_backend *b, const char *op, const moe_cu_group *g, const moe_cu_gemm_args *a,
                         moe_dtype t);
/* bf16 operands: runs them through cuBLAS and returns 1 when the experts are large enough
 * (or CMOE_CUDA_GEMM=cublas), else 0 and does nothing (gemm_cublas.cu) */
int moe_cu_grouped_cublas(moe_backend *b, const char *op, const moe_cu_group *g, const moe_cu_gemm_args *a);
/* bf16 operands on a Hopper GPU (sm_90a build): runs them through wgmma and TMA and returns
 * 1, else 0 and does nothing (gemm_sm90.cu). Its copies read whole tiles of rows up to the
 * group's rows_bound, which the row buffers hold. */
int moe_cu_grouped_sm90(moe_backend *b, const char *op, const moe_cu_group *g, const moe_cu_gemm_args *a);

#endif
