/*
 * cpu.h — internals shared by the cpu backend's files (src/cpu/: backend.c and the op files).
 *
 * Buffers hold float. Every op mirrors its ref/ twin (same selection rules, ties,
 * capacity order, Philox draws, plan layout) in fp32; sums over more than a few
 * hundred terms that decide nothing discrete are accumulated in double where it is
 * free, and every GEMM goes through cblas_sgemm.
 */
#ifndef CMOE_CPU_H
#define CMOE_CPU_H

#include "backend/backend.h"

struct moe_buf {
    moe_dtype type; /* MOE_F32, or MOE_I32 for ids */
    int64_t n;
    float *d;       /* the elements (int32_t for MOE_I32, same size) */
};

/*
 * A routing plan in fp32, laid out as moe_plan (sorted by expert, then token), plus
 * the inverse index token → its rows in plan order (tok_off/tok_row), so that combine
 * and the dispatch backward run in parallel over tokens and still add each token's
 * rows in the plan's fixed order.
 */
struct moe_bplan {
    int64_t T, E, k, n, capacity, dropped;
    int64_t max_T, max_k, cap_n; /* as allocated */
    int32_t *token, *expert;     /* [n] */
    float *weight;               /* [n] */
    int64_t *src, *choice;       /* [n] */
    int64_t *offsets;            /* [E+1] */
    int64_t *count, *selected;   /* [E] */
    int32_t *choice_expert;      /* [T, k] */
    float *choice_weight;        /* [T, k] */
    uint8_t *choice_kept;        /* [T, k] */
    int64_t *tok_off;            /* [T+1] */
    int64_t *tok_row;            /* [n] */
    /* route's workspace, sized at creation */
    int64_t *fill;               /* [max(E, T) + 1] */
    int64_t *cand;               /* [max_T·max_k] capacity candidates / sort keys */
    int64_t *cand2;              /* [max_T·max_k] */
    float *bal;                  /* [max_T, E] Sinkhorn matrix, or NULL */
    double *d0, *d1;             /* [max_T], [E] Sinkhorn scalings */
};

typedef struct {
    int threads;
    float *scratch; /* the ops' workspace, sized by reserve() from the workloads */
    int64_t scratch_n;
} moe_cpu_state;

#define F(t) ((t).buf ? (t).buf->d + (t).off : NULL)
#define FOPT(t) ((t) ? F(*(t)) : NULL)
#define I32(t) ((t).buf ? (const int32_t *)(t).buf->d + (t).off : NULL)

static inline moe_cpu_state *moe_cpu(moe_backend *b)
{
    return (moe_cpu_state *)b->impl;
}

/* Scratch of at least n floats, as reserved; NULL (and the sticky error set, naming op)
 * when the workloads given to reserve() did not ask for that much. */
float *moe_cpu_scratch(moe_backend *b, int64_t n, const char *op);

/* C = alpha·op(A)·op(B) + beta·C, row-major, one single-threaded cblas_sgemm call. */
void moe_cpu_sgemm(int ta, int tb, int64_t M, int64_t N, int64_t K, float alpha, const float *A, int64_t lda,
                   const float *B, int64_t ldb, float beta, float *C, int64_t ldc);
/*
 * The same over the team: C is cut into blocks whose bounds depend on the shape only —
 * never on the thread count — because OpenBLAS's result for an element depends on where
 * the element's block starts; fixed blocks make every thread count give the same bits.
 */
void moe_cpu_sgemm_par(int nt, int ta, int tb, int64_t M, int64_t N, int64_t K, float alpha, const float *A,
                       int64_t lda, const float *B, int64_t ldb, float beta, float *C, int64_t ldc);
/* Rows per block of those splits. The experts' GEMMs run in blocks of MOE_ROW_BLOCK
 * (backend.h), large enough that packing a weight matrix (OpenBLAS packs B on every
 * call) is paid over many rows. */
#define MOE_CPU_ROWS 128

/* one table filler per file */
void moe_cpu_router_ops(moe_backend *b);
void moe_cpu_select_ops(moe_backend *b);
void moe_cpu_aux_ops(moe_backend *b);
void moe_cpu_experts_ops(moe_backend *b);
void moe_cpu_dispatch_ops(moe_backend *b);
void moe_cpu_model_ops(moe_backend *b);
void moe_cpu_moa_ops(moe_backend *b);

#endif
