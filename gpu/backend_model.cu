/*
 * The language model's ops on the device that are not a file of their own: the LM head
 * with its weight in [N, K] layout (one cuBLAS GEMM with the weight transposed) and the
 * q/k/v biases, whose gradient reduces over tokens in two fixed-order passes. Fills the
 * model part of the table from the op files (embedding, rmsnorm, rope, crossentropy,
 * attention, adamw).
 */
#include "gpu/cuda.h"

size_t moe_cu_embedding_scratch(int64_t N);

static void matmul_t_forward(moe_backend *b, moe_tensor out, moe_tensor x, moe_tensor w, int64_t T, int64_t K,
                             int64_t N)
{
    moe_cu_gemm(b, "matmul_t_forward", 0, 1, T, N, K, 1.0f, DP(x), K, DP(w), K, 0.0f, DP(out), N);
}

static void matmul_t_backward(moe_backend *b, moe_tensor *dx, moe_tensor *dw, moe_tensor dout, moe_tensor x,
                              moe_tensor w, int64_t T, int64_t K, int64_t N)
{
    if (dx) /* [T, K] += [T, N]·[N, K] */
        moe_cu_gemm(b, "matmul_t_backward", 0, 0, T, K, N, 1.0f, DP(dout), N, DP(w), K, 1.0f, DP(*dx), K);
    if (dw) /* [N, K] += [T, N]ᵀ·[T, K] */
        moe_cu_gemm(b, "matmul_t_backward", 1, 0, N, K, T, 1.0f, DP(dout), N, DP(x), K, 1.0f, DP(*dw), K);
}

__global__ void k_bias_fwd(dptr y, dptr bias, int64_t T, int64_t N)
{
    CU_LOOP(i, T * N)
    stf(y, i, ldf(y, i) + ldf(bias, i % N));
}

static void bias_forward(moe_backend *b, moe_tensor y, moe_tensor bias, int64_t T, int64_t N)
{
    if (T * N <= 0)
        return;
    k_bias_fwd<<<moe_cu_blocks(T * N, 256), 256, 0, moe_cu_stream(b)>>>(DP(y), DP(bias), T, N);
    moe_cu_check(b, "bias_forward");
}

__global__ void k_bias_part(double *part, dptr dy, int64_t T, int64_t N)
{
    const int64_t n = (int64_t)blockIdx.x * blockDim.x + threadIdx.x, rb = blockIdx.y;
    if (n >= N)
        return;
    double acc = 0;
    for (int64_t t = T * rb / MOE_CU_RB; t < T * (rb + 1) / MOE_CU_RB; t++)
        acc += ldf(dy, t * N + n);
    part[rb * N + n] = acc;
}

__global__ void k_bias_add(dptr db, const double *part, int64_t N)
{
    CU_LOOP(n, N)
    {
        double s = 0;
        for (int rb = 0; rb < MOE_CU_RB; rb++)
            s += part[rb * N + n];
        stf(db, n, ldf(db, n) + (float)s);
    }
}

static void bias_backward(moe_backend *b, moe_tensor dbias, moe_tensor dy, int64_t T, int64_t N)
{
    if (T <= 0 || N <= 0)
        return;
    double *part = (double *)moe_cu_scratch(b, (size_t)(MOE_CU_RB * N) * sizeof(double), "bias_backward");
    if (!part)
        return;
    dim3 grid((unsigned)((N + 127) / 128), MOE_CU_RB);
    k_bias_part<<<grid, 128, 0, moe_cu_stream(b)>>>(part, DP(dy), T, N);
    k_bias_add<<<moe_cu_blocks(N, 256), 256, 0, moe_cu_stream(b)>>>(DP(dbias), part, N);
    moe_cu_check(b, "bias_backward");
}

static size_t max2(size_t a, size_t b)
{
    return a > b ? a : b;
}

size_t moe_cu_model_scratch(const moe_workload *w, moe_dtype ft)
{
    size_t need = 256 * sizeof(double) + 256; /* the gradient norm's partial sums */
    const int64_t N = w->batch * w->seq;
    const int64_t cols = max2((size_t)w->d_model, (size_t)(w->heads * w->head_dim));
    need = max2(need, (size_t)(MOE_CU_RB * cols) * sizeof(double)); /* RMSNorm dw, bias gradients */
    if (N > 0) {
        need = max2(need, (size_t)N * sizeof(double) + 256); /* cross-entropy rows */
        need = max2(need, moe_cu_embedding_scratch(N));
    }
    if (w->layer) /* the layer's RMSNorm-free ops use the others' estimates; its d_model for the sums */
        need = max2(need, (size_t)(MOE_CU_RB * w->layer->d_model) * sizeof(double));
    return need;
}

void moe_cu_model_ops(moe_backend *b)
{
    moe_cu_embedding_ops(b);
    moe_cu_rmsnorm_ops(b);
    moe_cu_rope_ops(b);
    moe_cu_crossentropy_ops(b);
    moe_cu_attention_ops(b);
    moe_cu_adamw_ops(b);
    b->matmul_t_forward = matmul_t_forward;
    b->matmul_t_backward = matmul_t_backward;
    b->bias_forward = bias_forward;
    b->bias_backward = bias_backward;
}
