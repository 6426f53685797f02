/*
 * grouped_gemm.cu — what cuBLAS would give cmoe's expert GEMMs: the nine GEMMs of a SwiGLU
 * expert layer's forward and backward (x·W1, x·W3, a·W2; dy·W2ᵀ, g1·W1ᵀ + g3·W3ᵀ; aᵀ·dy,
 * xᵀ·g1, xᵀ·g3), bf16 operands with fp32 accumulation, over E experts whose row counts come
 * from a random top-k routing of T tokens, timed four ways:
 *   grouped  one cublasGemmGroupedBatchedEx per GEMM kind (the row counts on the host: the
 *            layer would copy them from the device and wait, timed here as "round trip");
 *   loop     one cublasGemmEx per expert and kind;
 *   padded   cublasGemmStridedBatchedEx with every expert padded to the largest count
 *            (capacity-style; the padding's FLOPs are wasted, not counted);
 *   dense    the same FLOPs as one GEMM per kind over all T·k rows: the ceiling.
 * Rates count only the real rows' FLOPs (2·m·n·k per GEMM). Not part of the build: on the
 * GPU machine, `nvcc -O2 -arch=sm_90 bench/grouped_gemm.cu -lcublas -o grouped_gemm` and
 * `./grouped_gemm [T d f E k iters]` (default: BENCHMARKS.md's layer (b), 16384 2048 1408 64 6 10).
 * Row-major matrices are handed to column-major cuBLAS as their transposes:
 * C[m,n] = A[m,k]·B[k,n] is Cᵀ = Bᵀ·Aᵀ.
 */
#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <vector>

#define CK(x)                                                                                                  \
    do {                                                                                                       \
        cudaError_t e_ = (x);                                                                                  \
        if (e_ != cudaSuccess) {                                                                               \
            fprintf(stderr, "%s:%d: %s\n", __FILE__, __LINE__, cudaGetErrorString(e_));                        \
            exit(1);                                                                                           \
        }                                                                                                      \
    } while (0)
#define CB(x)                                                                                                  \
    do {                                                                                                       \
        cublasStatus_t s_ = (x);                                                                               \
        if (s_ != CUBLAS_STATUS_SUCCESS) {                                                                     \
            fprintf(stderr, "%s:%d: cuBLAS status %d\n", __FILE__, __LINE__, (int)s_);                         \
            exit(1);                                                                                           \
        }                                                                                                      \
    } while (0)

/* One GEMM kind in row-major terms: C[M,N] (+)= op(A)·op(B) per expert. ROWS: M = the expert's
 * rows, A its row block [m, K], B its weight [K, N] (or [N, K] with bt). KSEG: the weight
 * gradient C[M, N] = Aᵀ·B with A [m, M] and B [m, N], the reduction over the expert's rows. */
struct kind {
    const char *name;
    bool kseg, bt, acc;
    int M, N, K; /* ROWS: N, K used; KSEG: M, N used */
};

struct bufs {
    __nv_bfloat16 *rowsA, *rowsC, *W, *G; /* row buffers [T·k, maxdim], weights/grads [E, d·f] */
};

static int T = 16384, D = 2048, F = 1408, E = 64, K = 6, ITERS = 10;

__global__ void fill(__nv_bfloat16 *p, size_t n, uint32_t seed)
{
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        uint32_t h = (uint32_t)i * 2654435761u ^ seed;
        h ^= h >> 15, h *= 2246822519u, h ^= h >> 13;
        p[i] = __float2bfloat16(((h & 0xffff) / 65536.0f - 0.5f) * 0.1f);
    }
}

/* Per expert e: the cuBLAS column-major call's (opA, opB, m, n, k, A, lda, B, ldb, C, ldc). */
struct call {
    cublasOperation_t ta, tb;
    int m, n, k, lda, ldb, ldc;
    const void *a, *b;
    void *c;
};

static call make_call(const kind &kd, const bufs &bf, int64_t begin, int rows, int e, int64_t w_es)
{
    call c{};
    const __nv_bfloat16 *Arow = bf.rowsA + begin * std::max(D, F);
    __nv_bfloat16 *Crow = bf.rowsC + begin * std::max(D, F);
    if (!kd.kseg) { /* Cᵀ[N, m] = op(B)ᵀ[N, K] · Aᵀ[K, m] */
        c.ta = kd.bt ? CUBLAS_OP_T : CUBLAS_OP_N;
        c.tb = CUBLAS_OP_N;
        c.m = kd.N, c.n = rows, c.k = kd.K;
        c.a = bf.W + e * w_es, c.lda = kd.bt ? kd.K : kd.N;
        c.b = Arow, c.ldb = kd.K;
        c.c = Crow, c.ldc = kd.N;
    } else { /* Cᵀ[N, M] = Bᵀ[N, m] · A[m, M]: B's rows [m, N] are col-major [N, m]; A [m, M] needs op T */
        c.ta = CUBLAS_OP_N, c.tb = CUBLAS_OP_T;
        c.m = kd.N, c.n = kd.M, c.k = rows;
        c.a = Crow, c.lda = kd.N;
        c.b = Arow, c.ldb = kd.M;
        c.c = bf.G + e * w_es, c.ldc = kd.N;
    }
    return c;
}

static float ms_median(std::vector<float> v)
{
    std::sort(v.begin(), v.end());
    return v[v.size() / 2];
}

int main(int argc, char **argv)
{
    int *args[] = {&T, &D, &F, &E, &K, &ITERS};
    for (int i = 1; i < argc && i <= 6; i++)
        *args[i - 1] = atoi(argv[i]);
    if (T <= 0 || D <= 0 || F <= 0 || E <= 0 || K <= 0 || K > E || ITERS <= 0) {
        fprintf(stderr, "usage: grouped_gemm [T d f E k iters], all positive, k <= E\n");
        return 2;
    }
    /* a random top-k routing: k distinct experts per token (fixed seed) */
    std::vector<int> count(E, 0);
    uint64_t s = 88172645463325252ull;
    auto rnd = [&]() { s ^= s << 13, s ^= s >> 7, s ^= s << 17; return s; };
    std::vector<int> pick(E);
    for (int t = 0; t < T; t++) {
        for (int e = 0; e < E; e++) pick[e] = e;
        for (int j = 0; j < K; j++) {
            int r = j + (int)(rnd() % (uint64_t)(E - j));
            std::swap(pick[j], pick[r]);
            count[pick[j]]++;
        }
    }
    std::vector<int64_t> begin(E + 1, 0);
    for (int e = 0; e < E; e++) begin[e + 1] = begin[e] + count[e];
    const int64_t rows = begin[E];
    const int maxc = *std::max_element(count.begin(), count.end());
    const int minc = *std::min_element(count.begin(), count.end());

    const kind kinds[9] = {
        {"fwd x·W1", false, false, false, 0, F, D},  {"fwd x·W3", false, false, false, 0, F, D},
        {"fwd a·W2", false, false, false, 0, D, F},  {"bwd dy·W2ᵀ", false, true, false, 0, F, D},
        {"bwd g1·W1ᵀ", false, true, false, 0, D, F}, {"bwd + g3·W3ᵀ", false, true, true, 0, D, F},
        {"bwd dW2", true, false, false, F, D, 0},    {"bwd dW1", true, false, false, D, F, 0},
        {"bwd dW3", true, false, false, D, F, 0},
    };
    const int64_t w_es = (int64_t)D * F, rowdim = std::max(D, F);
    const int64_t nrows = std::max<int64_t>(rows, (int64_t)E * maxc); /* room for the padded layout */
    bufs bf;
    CK(cudaMalloc(&bf.rowsA, (size_t)nrows * rowdim * 2));
    CK(cudaMalloc(&bf.rowsC, (size_t)nrows * rowdim * 2));
    CK(cudaMalloc(&bf.W, (size_t)E * w_es * 2));
    CK(cudaMalloc(&bf.G, (size_t)E * w_es * 2));
    fill<<<1024, 256>>>(bf.rowsA, (size_t)nrows * rowdim, 1);
    fill<<<1024, 256>>>(bf.rowsC, (size_t)nrows * rowdim, 2);
    fill<<<1024, 256>>>(bf.W, (size_t)E * w_es, 3);
    CK(cudaMemset(bf.G, 0, (size_t)E * w_es * 2));
    CK(cudaDeviceSynchronize());

    cublasHandle_t h;
    CB(cublasCreate(&h));
    void *ws;
    const size_t ws_bytes = 64u << 20;
    CK(cudaMalloc(&ws, ws_bytes));
    CB(cublasSetWorkspace(h, ws, ws_bytes));
    cudaStream_t st;
    CK(cudaStreamCreate(&st));
    CB(cublasSetStream(h, st));
    cudaEvent_t e0, e1;
    CK(cudaEventCreate(&e0));
    CK(cudaEventCreate(&e1));
    const float one = 1.0f, zero = 0.0f;

    /* device pointer arrays for the grouped calls, one set per kind */
    const void **dptr;
    CK(cudaMalloc(&dptr, sizeof(void *) * 3 * E * 9));
    std::vector<call> calls((size_t)9 * E);
    std::vector<const void *> hptr((size_t)3 * E * 9);
    for (int q = 0; q < 9; q++)
        for (int e = 0; e < E; e++) {
            call c = make_call(kinds[q], bf, begin[e], count[e], e, w_es);
            calls[(size_t)q * E + e] = c;
            hptr[(size_t)q * 3 * E + e] = c.a;
            hptr[(size_t)q * 3 * E + E + e] = c.b;
            hptr[(size_t)q * 3 * E + 2 * E + e] = c.c;
        }
    CK(cudaMemcpy(dptr, hptr.data(), sizeof(void *) * hptr.size(), cudaMemcpyHostToDevice));

    const double gflop_total = 9 * 2.0 * rows * D * F / 1e9;

    auto time_it = [&](auto &&body) {
        std::vector<float> t;
        for (int it = 0; it < ITERS + 3; it++) {
            CK(cudaEventRecord(e0, st));
            body();
            CK(cudaEventRecord(e1, st));
            CK(cudaEventSynchronize(e1));
            float ms;
            CK(cudaEventElapsedTime(&ms, e0, e1));
            if (it >= 3) t.push_back(ms);
        }
        CK(cudaGetLastError());
        return ms_median(t);
    };

    printf("T=%d d=%d f=%d E=%d k=%d: %lld rows, %d..%d per expert; 9 GEMMs, %.1f GFLOP; median of %d\n", T, D, F,
           E, K, (long long)rows, minc, maxc, gflop_total, ITERS);
    std::vector<float> per_kind(9);
    float grouped = 0;
    for (int q = 0; q < 9; q++) {
        std::vector<cublasOperation_t> ta(E), tb(E);
        std::vector<int> m(E), n(E), k(E), lda(E), ldb(E), ldc(E), gs(E, 1);
        std::vector<float> al(E, 1.0f), be(E, kinds[q].acc ? 1.0f : 0.0f);
        for (int e = 0; e < E; e++) {
            const call &c = calls[(size_t)q * E + e];
            ta[e] = c.ta, tb[e] = c.tb, m[e] = c.m, n[e] = c.n, k[e] = c.k;
            lda[e] = c.lda, ldb[e] = c.ldb, ldc[e] = c.ldc;
        }
        const void *const *A = dptr + (size_t)q * 3 * E, *const *B = A + E;
        void *const *C = (void *const *)(A + 2 * E);
        per_kind[q] = time_it([&] {
            CB(cublasGemmGroupedBatchedEx(h, ta.data(), tb.data(), m.data(), n.data(), k.data(), al.data(), A,
                                          CUDA_R_16BF, lda.data(), B, CUDA_R_16BF, ldb.data(), be.data(), C,
                                          CUDA_R_16BF, ldc.data(), E, gs.data(), CUBLAS_COMPUTE_32F));
        });
        grouped += per_kind[q];
    }
    float loop = time_it([&] {
        for (int q = 0; q < 9; q++)
            for (int e = 0; e < E; e++) {
                const call &c = calls[(size_t)q * E + e];
                CB(cublasGemmEx(h, c.ta, c.tb, c.m, c.n, c.k, &one, c.a, CUDA_R_16BF, c.lda, c.b, CUDA_R_16BF, c.ldb,
                                kinds[q].acc ? &one : &zero, c.c, CUDA_R_16BF, c.ldc, CUBLAS_COMPUTE_32F,
                                CUBLAS_GEMM_DEFAULT));
            }
    });
    /* padded: every expert maxc rows at a stride of maxc rows (the buffers hold E·maxc rows) */
    float padded = time_it([&] {
        for (int q = 0; q < 9; q++) {
            call c = make_call(kinds[q], bf, 0, maxc, 0, w_es);
            const int64_t sa = kinds[q].kseg ? (int64_t)maxc * kinds[q].N : w_es;
            const int64_t sb = (int64_t)maxc * (kinds[q].kseg ? kinds[q].M : kinds[q].K);
            const int64_t sc = kinds[q].kseg ? w_es : (int64_t)maxc * kinds[q].N;
            CB(cublasGemmStridedBatchedEx(h, c.ta, c.tb, c.m, c.n, c.k, &one, c.a, CUDA_R_16BF, c.lda, sa, c.b,
                                          CUDA_R_16BF, c.ldb, sb, kinds[q].acc ? &one : &zero, c.c, CUDA_R_16BF,
                                          c.ldc, sc, E, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
        }
    });
    /* dense: the same rows as one expert (weights of expert 0) */
    float dense = time_it([&] {
        for (int q = 0; q < 9; q++) {
            call c = make_call(kinds[q], bf, 0, (int)rows, 0, w_es);
            CB(cublasGemmEx(h, c.ta, c.tb, c.m, c.n, c.k, &one, c.a, CUDA_R_16BF, c.lda, c.b, CUDA_R_16BF, c.ldb,
                            kinds[q].acc ? &one : &zero, c.c, CUDA_R_16BF, c.ldc, CUBLAS_COMPUTE_32F,
                            CUBLAS_GEMM_DEFAULT));
        }
    });
    /* the round trip a host-sized grouped GEMM needs per layer and pass: counts to the host, wait */
    int *dcount, *hcount;
    CK(cudaMalloc(&dcount, sizeof(int) * E));
    CK(cudaMallocHost(&hcount, sizeof(int) * E));
    float trip = time_it([&] {
        CK(cudaMemcpyAsync(hcount, dcount, sizeof(int) * E, cudaMemcpyDeviceToHost, st));
        CK(cudaStreamSynchronize(st));
    });

    auto row = [&](const char *name, float ms) {
        printf("  %-36s %9.3f ms  %6.1f TFLOP/s\n", name, ms, gflop_total / ms);
    };
    for (int q = 0; q < 9; q++)
        printf("    grouped %-24s %9.3f ms  %6.1f TFLOP/s\n", kinds[q].name, per_kind[q],
               2.0 * rows * D * F / 1e9 / per_kind[q]);
    row("cublasGemmGroupedBatchedEx (9 calls)", grouped);
    row("cublasGemmEx per expert (9 x E)", loop);
    row("strided batched, padded to max rows", padded);
    row("dense: one GEMM per kind (ceiling)", dense);
    printf("  counts to the host and wait: %.3f ms per trip\n", trip);
    return 0;
}
