/*
 * Token embedding on the device: a gather forward; the backward a scatter-add made a
 * gather: the token ids are sorted (stably, CUB) and one block per distinct id adds its
 * tokens' rows in token order — the cpu's order of summation, without atomics.
 */
#include "gpu/cuda.h"

__global__ void k_emb_fwd(dptr out, const int32_t *tokens, dptr wte, int64_t N, int64_t C)
{
    CU_LOOP(i, N * C)
    {
        const int64_t t = i / C, c = i % C;
        stf(out, i, ldf(wte, (int64_t)tokens[t] * C + c));
    }
}

static void embedding_forward(moe_backend *b, moe_tensor out, moe_tensor tokens, moe_tensor wte, int64_t N, int64_t C)
{
    if (N * C <= 0)
        return;
    k_emb_fwd<<<moe_cu_blocks(N * C, 256), 256, 0, moe_cu_stream(b)>>>(DP(out), I32P(tokens), DP(wte), N, C);
    moe_cu_check(b, "embedding_forward");
}

__global__ void k_emb_keys(unsigned long long *keys, int32_t *vals, const int32_t *tokens, int64_t N)
{
    CU_LOOP(t, N)
    {
        keys[t] = (unsigned long long)(uint32_t)tokens[t];
        vals[t] = (int32_t)t;
    }
}

/* one block per sorted position; the first of each run of one id adds the run */
__global__ void k_emb_bwd(dptr dwte, dptr dout, const unsigned long long *keys, const int32_t *vals, int64_t N,
                          int64_t C)
{
    const int64_t q = blockIdx.x;
    if (q > 0 && keys[q - 1] == keys[q])
        return;
    const unsigned long long v = keys[q];
    for (int64_t c = threadIdx.x; c < C; c += blockDim.x) {
        float acc = ldf(dwte, (int64_t)v * C + c);
        for (int64_t r = q; r < N && keys[r] == v; r++)
            acc += ldf(dout, (int64_t)vals[r] * C + c);
        stf(dwte, (int64_t)v * C + c, acc);
    }
}

static size_t align256(size_t n)
{
    return (n + 255) / 256 * 256;
}

size_t moe_cu_embedding_scratch(int64_t N)
{
    return 2 * align256((size_t)N * 8) + 2 * align256((size_t)N * 4) + moe_cu_sort_bytes(N);
}

static void embedding_backward(moe_backend *b, moe_tensor dwte, moe_tensor dout, moe_tensor tokens, int64_t N,
                               int64_t C)
{
    if (N <= 0 || C <= 0)
        return;
    char *s = (char *)moe_cu_scratch(b, moe_cu_embedding_scratch(N), "embedding_backward");
    if (!s)
        return;
    unsigned long long *kin = (unsigned long long *)s, *kout = (unsigned long long *)(s + align256((size_t)N * 8));
    int32_t *vin = (int32_t *)(s + 2 * align256((size_t)N * 8));
    int32_t *vout = (int32_t *)((char *)vin + align256((size_t)N * 4));
    void *tmp = (char *)vout + align256((size_t)N * 4);
    cudaStream_t st = moe_cu_stream(b);
    k_emb_keys<<<moe_cu_blocks(N, 256), 256, 0, st>>>(kin, vin, I32P(tokens), N);
    if (!moe_cu_check(b, "embedding_backward") ||
        !moe_cu_sort(b, "embedding_backward", tmp, moe_cu_sort_bytes(N), kin, kout, vin, vout, N, 0, 32))
        return;
    k_emb_bwd<<<(unsigned)N, C >= 256 ? 256 : 64, 0, st>>>(DP(dwte), DP(dout), kout, vout, N, C);
    moe_cu_check(b, "embedding_backward");
}

void moe_cu_embedding_ops(moe_backend *b)
{
    b->embedding_forward = embedding_forward;
    b->embedding_backward = embedding_backward;
}
