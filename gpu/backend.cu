/*
 * The cuda backend: device buffers (f32, bf16, i32), two streams (compute, communication)
 * with events between them, cuBLAS for the dense GEMMs, and the op files beside this one
 * (router.cu, select.cu, aux_loss.cu, dispatch.cu, ffn.cu + gemm.cu, attention.cu, and the
 * language model's rmsnorm.cu, rope.cu, embedding.cu, crossentropy.cu, adamw.cu), named as
 * their ref/ and src/cpu/ twins.
 *
 * Created with a compute type (moe_backend_options.dtype): "fp32" — every GEMM in plain
 * fp32 (cuBLAS's pedantic fp32, TF32 off), for the cross-checks against ref — or "bf16" —
 * weights and activations in bf16 on the tensor cores with fp32 accumulation, while the
 * router, the losses, the master weights and AdamW's moments stay fp32 (the layer and the
 * optimizer allocate those in f32; every op reads the type of each tensor it is given).
 *
 * Memory is taken when a model or layer is built (alloc, reserve, plan_create), never by
 * an op: ops enqueue kernels and return. Out of memory is an error naming the size asked,
 * what is free, and what to lower.
 */
#include <cstdio>
#include <cstdlib>
#include <cstring>

#include <cub/device/device_radix_sort.cuh>
#include <cub/device/device_scan.cuh>

#include "gpu/cuda.h"

/* ---- errors ------------------------------------------------------------------------------- */

int moe_cu_ok(moe_backend *b, const char *op, cudaError_t e, const char *what)
{
    if (e == cudaSuccess)
        return 1;
    moe_backend_fail(b, op, MOE_ERR_CUDA, "%s: %s", what, cudaGetErrorString(e));
    return 0;
}

int moe_cu_check(moe_backend *b, const char *op)
{
    cudaError_t e = cudaGetLastError();
    if (e != cudaSuccess) {
        moe_backend_fail(b, op, MOE_ERR_CUDA, "kernel launch: %s", cudaGetErrorString(e));
        return 0;
    }
    if (moe_cu(b)->sync_ops) {
        e = cudaStreamSynchronize(moe_cu_stream(b));
        if (e != cudaSuccess) {
            moe_backend_fail(b, op, MOE_ERR_CUDA, "%s", cudaGetErrorString(e));
            return 0;
        }
    }
    return 1;
}

void *moe_cu_scratch(moe_backend *b, size_t bytes, const char *op)
{
    moe_cuda_state *st = moe_cu(b);
    if (st->cur != MOE_STREAM_COMPUTE) {
        moe_backend_fail(b, op, MOE_ERR_ARG, "needs scratch, which only the compute stream has (run it there)");
        return nullptr;
    }
    if (bytes <= st->scratch_bytes)
        return st->scratch;
    moe_backend_fail(b, op, MOE_ERR_ARG,
                     "needs %.1f MiB of scratch, %.1f MiB were reserved for the workloads it was given (a layer or "
                     "model asked for less than it runs)",
                     (double)bytes / 1048576.0, (double)st->scratch_bytes / 1048576.0);
    return nullptr;
}

/* ---- memory ---------------------------------------------------------------------------------- */

static moe_status nomem(size_t bytes, const char *what)
{
    size_t freeb = 0, total = 0;
    cudaGetLastError();
    cudaMemGetInfo(&freeb, &total);
    return moe_error(MOE_ERR_NOMEM,
                     "cuda backend: out of device memory for %s of %.1f MiB (%.1f MiB free of %.1f MiB); lower the "
                     "batch (--batch), the sequence (--seq), the tokens of a layer (--tokens) or the model size",
                     what, (double)bytes / 1048576.0, (double)freeb / 1048576.0, (double)total / 1048576.0);
}

static moe_status cu_alloc(moe_backend *b, moe_dtype t, int64_t n, moe_buf **out)
{
    *out = nullptr;
    if (t != MOE_F32 && t != MOE_BF16 && t != MOE_I32)
        return moe_error(MOE_ERR_ARG, "cuda backend: buffers hold f32, bf16 or i32, not %s", moe_dtype_name(t));
    if (n < 0 || (uint64_t)n > ((uint64_t)1 << 40))
        return moe_error(MOE_ERR_ARG, "cuda backend: cannot allocate %lld elements", (long long)n);
    moe_buf *buf = (moe_buf *)malloc(sizeof *buf);
    if (!buf)
        return moe_error(MOE_ERR_NOMEM, "cuda backend: out of host memory");
    const size_t bytes = ((size_t)(n ? n : 1) * moe_cu_size(t) + 255) / 256 * 256;
    void *d = nullptr;
    if (cudaMalloc(&d, bytes) != cudaSuccess) {
        free(buf);
        return nomem(bytes, "a buffer");
    }
    /* zero-filled, as the table promises, and done before anything on either stream */
    if (cudaMemset(d, 0, bytes) != cudaSuccess || cudaDeviceSynchronize() != cudaSuccess) {
        cudaFree(d);
        free(buf);
        return moe_error(MOE_ERR_CUDA, "cuda backend: cudaMemset: %s", cudaGetErrorString(cudaGetLastError()));
    }
    buf->type = t;
    buf->n = n;
    buf->d = d;
    *out = buf;
    return MOE_OK;
}

static void cu_free(moe_backend *b, moe_buf *buf)
{
    if (!buf)
        return;
    /* a kernel still reading it must finish first */
    cudaDeviceSynchronize();
    cudaFree(buf->d);
    free(buf);
}

static moe_dtype cu_dtype(moe_backend *b, const moe_buf *buf)
{
    return buf->type;
}

static moe_status check_range(moe_tensor t, int64_t n, const char *what)
{
    if (!t.buf || t.off < 0 || n < 0 || t.off > t.buf->n - n)
        return moe_error(MOE_ERR_ARG, "cuda backend: %s of %lld elements at %lld is outside the buffer", what,
                         (long long)n, (long long)t.off);
    return MOE_OK;
}

/* Host temporaries of enqueued copies, freed at the next sync (or sooner, once many bytes
 * are pending, after waiting for the streams). */
static void drain_pending(moe_cuda_state *st)
{
    for (int i = 0; i < st->npending; i++)
        free(st->pending[i]);
    st->npending = 0;
    st->pending_bytes = 0;
}

int moe_cu_copy_in(moe_backend *b, const char *op, void *dst, void *tmp, size_t bytes)
{
    moe_cuda_state *st = moe_cu(b);
    cudaError_t e = cudaMemcpyAsync(dst, tmp, bytes, cudaMemcpyHostToDevice, moe_cu_stream(b));
    if (e != cudaSuccess) {
        free(tmp);
        return moe_cu_ok(b, op, e, "cudaMemcpyAsync");
    }
    if (st->npending == st->cap_pending) {
        int cap = st->cap_pending ? 2 * st->cap_pending : 64;
        void **p = (void **)realloc(st->pending, (size_t)cap * sizeof *p);
        if (!p) { /* no room to remember it: wait for the copy instead */
            cudaStreamSynchronize(moe_cu_stream(b));
            free(tmp);
            return 1;
        }
        st->pending = p;
        st->cap_pending = cap;
    }
    st->pending[st->npending++] = tmp;
    st->pending_bytes += bytes;
    if (st->pending_bytes > ((size_t)256 << 20)) {
        for (int i = 0; i < MOE_NSTREAMS; i++)
            cudaStreamSynchronize(st->stream[i]);
        drain_pending(st);
    }
    return 1;
}

/* Host data is converted on the host to the buffer's type into a temporary, then copied on
 * the current stream, in order with its kernels; the temporary lives until the next sync. */
static moe_status cu_upload(moe_backend *b, moe_tensor dst, const void *src, moe_dtype stype, int64_t n)
{
    moe_status s = check_range(dst, n, "upload");
    if (s || n == 0)
        return s;
    const size_t bytes = (size_t)n * moe_cu_size(dst.buf->type);
    void *tmp = malloc(bytes);
    if (!tmp)
        return moe_error(MOE_ERR_NOMEM, "cuda backend: out of host memory for an upload of %lld elements",
                         (long long)n);
    if (stype == dst.buf->type)
        memcpy(tmp, src, bytes);
    else if ((s = moe_convert(tmp, dst.buf->type, src, stype, n))) {
        free(tmp);
        return s;
    }
    if (!moe_cu_copy_in(b, "upload", DP(dst).p, tmp, bytes))
        return moe_backend_take_error(b);
    return MOE_OK;
}

static moe_status cu_sync(moe_backend *b)
{
    moe_cuda_state *st = moe_cu(b);
    for (int i = 0; i < MOE_NSTREAMS; i++) {
        cudaError_t e = cudaStreamSynchronize(st->stream[i]);
        if (e != cudaSuccess)
            moe_backend_fail(b, "sync", MOE_ERR_CUDA, "%s", cudaGetErrorString(e));
    }
    cudaError_t e = cudaGetLastError();
    if (e != cudaSuccess)
        moe_backend_fail(b, "sync", MOE_ERR_CUDA, "%s", cudaGetErrorString(e));
    drain_pending(st);
    return moe_backend_take_error(b);
}

static moe_status cu_download(moe_backend *b, void *dst, moe_dtype dtype, moe_tensor src, int64_t n)
{
    moe_status s = cu_sync(b);
    if (s == MOE_OK)
        s = check_range(src, n, "download");
    if (s || n == 0)
        return s;
    const size_t bytes = (size_t)n * moe_cu_size(src.buf->type);
    void *tmp = dtype == src.buf->type ? dst : malloc(bytes);
    if (!tmp)
        return moe_error(MOE_ERR_NOMEM, "cuda backend: out of host memory for a download of %lld elements",
                         (long long)n);
    cudaError_t e = cudaMemcpy(tmp, DP(src).p, bytes, cudaMemcpyDeviceToHost);
    if (e != cudaSuccess)
        s = moe_error(MOE_ERR_CUDA, "cuda backend: download of %lld elements: %s", (long long)n,
                      cudaGetErrorString(e));
    else if (tmp != dst)
        s = moe_convert(dst, dtype, tmp, src.buf->type, n);
    if (tmp != dst)
        free(tmp);
    return s;
}

/* ---- elementwise ------------------------------------------------------------------------------ */

__global__ void k_fill(dptr t, float v, int64_t n)
{
    CU_LOOP(i, n)
    stf(t, i, v);
}

__global__ void k_fill_i32(int32_t *t, int32_t v, int64_t n)
{
    CU_LOOP(i, n)
    t[i] = v;
}

static void cu_fill(moe_backend *b, moe_tensor t, double v, int64_t n)
{
    if (n <= 0)
        return;
    if (v == 0.0) { /* +0 is all zero bits in every type: a memset runs at the copy engine's rate */
        moe_cu_ok(b, "fill", cudaMemsetAsync(DP(t).p, 0, (size_t)n * moe_cu_size(t.buf->type), moe_cu_stream(b)),
                  "cudaMemsetAsync");
        return;
    }
    if (t.buf->type == MOE_I32)
        k_fill_i32<<<moe_cu_blocks(n, 256), 256, 0, moe_cu_stream(b)>>>((int32_t *)DP(t).p, (int32_t)v, n);
    else
        k_fill<<<moe_cu_blocks(n, 256), 256, 0, moe_cu_stream(b)>>>(DP(t), (float)v, n);
    moe_cu_check(b, "fill");
}

/* dst = src converted (f32 <-> bf16); the same type is a plain copy */
__global__ void k_convert(dptr dst, dptr src, int64_t n)
{
    CU_LOOP(i, n)
    stf(dst, i, ldf(src, i));
}

static void cu_copy(moe_backend *b, moe_tensor dst, moe_tensor src, int64_t n)
{
    if (n <= 0)
        return;
    if (dst.buf->type == src.buf->type) {
        moe_cu_ok(b, "copy",
                  cudaMemcpyAsync(DP(dst).p, DP(src).p, (size_t)n * moe_cu_size(dst.buf->type),
                                  cudaMemcpyDeviceToDevice, moe_cu_stream(b)),
                  "cudaMemcpyAsync");
        return;
    }
    if (dst.buf->type == MOE_I32 || src.buf->type == MOE_I32) {
        moe_backend_fail(b, "copy", MOE_ERR_ARG, "from %s to %s", moe_dtype_name(src.buf->type),
                         moe_dtype_name(dst.buf->type));
        return;
    }
    k_convert<<<moe_cu_blocks(n, 256), 256, 0, moe_cu_stream(b)>>>(DP(dst), DP(src), n);
    moe_cu_check(b, "copy");
}

__global__ void k_add(dptr y, dptr x, int64_t n)
{
    CU_LOOP(i, n)
    stf(y, i, ldf(y, i) + ldf(x, i));
}

/* y += x for one type T, 16 bytes at a time (both 16-byte aligned), the tail one by one */
template <typename T> __global__ void k_add_v(T *y, const T *x, int64_t n)
{
    const int W = vrow<T>::W;
    CU_LOOP(q, n / W)
    {
        float a[W], c[W];
        vrow<T>::load(y + q * W, a);
        vrow<T>::load(x + q * W, c);
#pragma unroll
        for (int j = 0; j < W; j++)
            a[j] += c[j];
        vrow<T>::store(y + q * W, a);
    }
    CU_LOOP(k, n % W)
    y[n / W * W + k] = fromf<T>(tof<T>(y[n / W * W + k]) + tof<T>(x[n / W * W + k]));
}

static void cu_add(moe_backend *b, moe_tensor y, moe_tensor x, int64_t n)
{
    if (n <= 0)
        return;
    const dptr Y = DP(y), X = DP(x);
    cudaStream_t s = moe_cu_stream(b);
    if (Y.t == X.t && Y.t != DT_I32 && moe_cu_aligned16(Y.p) && moe_cu_aligned16(X.p)) {
        if (Y.t == DT_BF16)
            k_add_v<__nv_bfloat16><<<moe_cu_blocks(n / 8 + 1, 256), 256, 0, s>>>((__nv_bfloat16 *)Y.p,
                                                                                (const __nv_bfloat16 *)X.p, n);
        else
            k_add_v<float><<<moe_cu_blocks(n / 4 + 1, 256), 256, 0, s>>>((float *)Y.p, (const float *)X.p, n);
    } else {
        k_add<<<moe_cu_blocks(n, 256), 256, 0, s>>>(Y, X, n);
    }
    moe_cu_check(b, "add");
}

__global__ void k_rowscale(dptr y, dptr v, dptr a, int64_t as, int64_t T, int64_t d)
{
    CU_LOOP(i, T * d)
    {
        const int64_t t = i / d;
        stf(y, i, ldf(y, i) + ldf(a, t * as) * ldf(v, i));
    }
}

static void cu_rowscale_forward(moe_backend *b, moe_tensor y, moe_tensor v, moe_tensor a, int64_t as, int64_t T,
                                int64_t d)
{
    if (T * d <= 0)
        return;
    k_rowscale<<<moe_cu_blocks(T * d, 256), 256, 0, moe_cu_stream(b)>>>(DP(y), DP(v), DP(a), as, T, d);
    moe_cu_check(b, "rowscale_forward");
}

/* one block per row: dv += a·dy; da += Σ dy·v (fixed tree, double) */
__global__ void k_rowscale_bwd(dptr dv, dptr da, dptr dy, dptr v, dptr a, int64_t as, int64_t d)
{
    __shared__ double sh[256];
    const int64_t t = blockIdx.x;
    const float at = ldf(a, t * as);
    double acc = 0;
    for (int64_t i = threadIdx.x; i < d; i += blockDim.x) {
        const float g = ldf(dy, t * d + i);
        if (dv.p)
            stf(dv, t * d + i, ldf(dv, t * d + i) + at * g);
        acc += (double)g * ldf(v, t * d + i);
    }
    acc = block_sum(acc, sh);
    if (da.p && threadIdx.x == 0)
        stf(da, t * as, ldf(da, t * as) + (float)acc);
}

static void cu_rowscale_backward(moe_backend *b, moe_tensor *dv, moe_tensor *da, moe_tensor dy, moe_tensor v,
                                 moe_tensor a, int64_t as, int64_t T, int64_t d)
{
    if (T <= 0 || d <= 0 || (!dv && !da))
        return;
    k_rowscale_bwd<<<(unsigned)T, 256, 0, moe_cu_stream(b)>>>(DPOPT(dv), DPOPT(da), DP(dy), DP(v), DP(a), as, d);
    moe_cu_check(b, "rowscale_backward");
}

/* ---- GEMMs through cuBLAS ---------------------------------------------------------------------- */

static cudaDataType cu_type(int t)
{
    return t == DT_BF16 ? CUDA_R_16BF : CUDA_R_32F;
}

/* C[M, N] (row-major) *= beta, for K = 0 where a GEMM has nothing to add */
__global__ void k_scale(dptr C, int64_t M, int64_t N, int64_t ldc, float beta)
{
    CU_LOOP(i, M * N)
    {
        const int64_t r = i / N, c = i % N;
        stf(C, r * ldc + c, beta == 0.0f ? 0.0f : beta * ldf(C, r * ldc + c));
    }
}

void moe_cu_gemm(moe_backend *b, const char *op, int ta, int tb, int64_t M, int64_t N, int64_t K, float alpha,
                 dptr A, int64_t lda, dptr B, int64_t ldb, float beta, dptr C, int64_t ldc)
{
    if (M <= 0 || N <= 0)
        return;
    if (K <= 0) {
        k_scale<<<moe_cu_blocks(M * N, 256), 256, 0, moe_cu_stream(b)>>>(C, M, N, ldc, beta);
        moe_cu_check(b, op);
        return;
    }
    if (A.t != B.t) {
        moe_backend_fail(b, op, MOE_ERR_ARG, "GEMM operands of two types (%s, %s)", A.t == DT_BF16 ? "bf16" : "f32",
                         B.t == DT_BF16 ? "bf16" : "f32");
        return;
    }
    moe_cuda_state *st = moe_cu(b);
    cublasSetStream(st->blas, moe_cu_stream(b));
    cublasSetWorkspace(st->blas, st->side_cur >= 0 ? st->side_ws[st->side_cur] : st->blas_ws[st->cur],
                       st->blas_ws_bytes);
    /* row-major C = op(A)·op(B) is column-major Cᵀ = op(B)ᵀ·op(A)ᵀ */
    cublasStatus_t s = cublasGemmEx_64(
        st->blas, tb ? CUBLAS_OP_T : CUBLAS_OP_N, ta ? CUBLAS_OP_T : CUBLAS_OP_N, N, M, K, &alpha, B.p, cu_type(B.t),
        ldb, A.p, cu_type(A.t), lda, &beta, C.p, cu_type(C.t), ldc,
        A.t == DT_BF16 ? CUBLAS_COMPUTE_32F : CUBLAS_COMPUTE_32F_PEDANTIC, CUBLAS_GEMM_DEFAULT);
    if (s != CUBLAS_STATUS_SUCCESS) {
        moe_backend_fail(b, op, MOE_ERR_CUDA, "cublasGemmEx %lldx%lldx%lld: %s", (long long)M, (long long)N,
                         (long long)K, cublasGetStatusString(s));
        return;
    }
    moe_cu_check(b, op);
}

void moe_cu_gemm_batched(moe_backend *b, const char *op, int ta, int tb, int64_t M, int64_t N, int64_t K,
                         float alpha, const void *const *A, int at, int64_t lda, const void *const *B, int bt,
                         int64_t ldb, float beta, void *const *C, int ct, int64_t ldc, int64_t batch)
{
    if (M <= 0 || N <= 0 || batch <= 0 || K <= 0)
        return;
    moe_cuda_state *st = moe_cu(b);
    cublasSetStream(st->blas, moe_cu_stream(b));
    cublasSetWorkspace(st->blas, st->blas_ws[st->cur], st->blas_ws_bytes);
    cublasStatus_t s = cublasGemmBatchedEx_64(
        st->blas, tb ? CUBLAS_OP_T : CUBLAS_OP_N, ta ? CUBLAS_OP_T : CUBLAS_OP_N, N, M, K, &alpha, B, cu_type(bt),
        ldb, A, cu_type(at), lda, &beta, C, cu_type(ct), ldc, batch,
        at == DT_BF16 ? CUBLAS_COMPUTE_32F : CUBLAS_COMPUTE_32F_PEDANTIC, CUBLAS_GEMM_DEFAULT);
    if (s != CUBLAS_STATUS_SUCCESS) {
        moe_backend_fail(b, op, MOE_ERR_CUDA, "cublasGemmBatchedEx %lldx%lldx%lld x %lld: %s", (long long)M,
                         (long long)N, (long long)K, (long long)batch, cublasGetStatusString(s));
        return;
    }
    moe_cu_check(b, op);
}

static void cu_matmul_forward(moe_backend *b, moe_tensor out, moe_tensor x, moe_tensor w, int64_t T, int64_t K,
                              int64_t N)
{
    moe_cu_gemm(b, "matmul_forward", 0, 0, T, N, K, 1.0f, DP(x), K, DP(w), N, 0.0f, DP(out), N);
}

static void cu_matmul_backward(moe_backend *b, moe_tensor *dx, moe_tensor *dw, moe_tensor dout, moe_tensor x,
                               moe_tensor w, int64_t T, int64_t K, int64_t N)
{
    if (dx) /* dx [T, K] += dout [T, N] · wᵀ */
        moe_cu_gemm(b, "matmul_backward", 0, 1, T, K, N, 1.0f, DP(dout), N, DP(w), N, 1.0f, DP(*dx), K);
    if (dw) /* dw [K, N] += xᵀ · dout */
        moe_cu_gemm(b, "matmul_backward", 1, 0, K, N, T, 1.0f, DP(x), K, DP(dout), N, 1.0f, DP(*dw), N);
}

/* ---- sorts and scans (CUB: stable, deterministic) ------------------------------------------------ */

size_t moe_cu_sort_bytes(int64_t n)
{
    size_t a = 0, c = 0;
    if (n < 1)
        n = 1;
    cub::DeviceRadixSort::SortPairs(nullptr, a, (const unsigned long long *)nullptr, (unsigned long long *)nullptr,
                                    (const int32_t *)nullptr, (int32_t *)nullptr, (int)n, 0, 64);
    cub::DeviceScan::ExclusiveSum(nullptr, c, (const int32_t *)nullptr, (int32_t *)nullptr, (int)n);
    return (a > c ? a : c) + 256;
}

int moe_cu_sort(moe_backend *b, const char *op, void *tmp, size_t tmp_bytes, const unsigned long long *kin,
                unsigned long long *kout, const int32_t *vin, int32_t *vout, int64_t n, int lo, int hi)
{
    if (n <= 0)
        return 1;
    size_t bytes = tmp_bytes;
    return moe_cu_ok(b, op,
                     cub::DeviceRadixSort::SortPairs(tmp, bytes, kin, kout, vin, vout, (int)n, lo, hi,
                                                     moe_cu_stream(b)),
                     "radix sort") &&
           moe_cu_check(b, op);
}

int moe_cu_scan(moe_backend *b, const char *op, void *tmp, size_t tmp_bytes, const int32_t *in, int32_t *out,
                int64_t n)
{
    if (n <= 0)
        return 1;
    size_t bytes = tmp_bytes;
    return moe_cu_ok(b, op, cub::DeviceScan::ExclusiveSum(tmp, bytes, in, out, (int)n, moe_cu_stream(b)), "scan") &&
           moe_cu_check(b, op);
}

/* ---- streams, events, scratch --------------------------------------------------------------------- */

static void cu_set_stream(moe_backend *b, int stream)
{
    if (stream >= 0 && stream < MOE_NSTREAMS)
        moe_cu(b)->cur = stream;
    else
        moe_backend_fail(b, "set_stream", MOE_ERR_ARG, "stream %d outside [0, %d)", stream, MOE_NSTREAMS);
}

static moe_status cu_event_create(moe_backend *b, moe_event **out)
{
    moe_event *ev = (moe_event *)calloc(1, sizeof *ev);
    if (!ev)
        return moe_error(MOE_ERR_NOMEM, "cuda backend: out of memory for an event");
    if (cudaEventCreateWithFlags(&ev->ev, cudaEventDisableTiming) != cudaSuccess) {
        free(ev);
        return moe_error(MOE_ERR_CUDA, "cuda backend: cudaEventCreate: %s", cudaGetErrorString(cudaGetLastError()));
    }
    *out = ev;
    return MOE_OK;
}

static void cu_event_free(moe_backend *b, moe_event *ev)
{
    if (ev) {
        cudaEventDestroy(ev->ev);
        free(ev);
    }
}

static void cu_event_record(moe_backend *b, moe_event *ev)
{
    moe_cu_ok(b, "event_record", cudaEventRecord(ev->ev, moe_cu_stream(b)), "cudaEventRecord");
}

static void cu_stream_wait(moe_backend *b, moe_event *ev)
{
    moe_cu_ok(b, "stream_wait", cudaStreamWaitEvent(moe_cu_stream(b), ev->ev, 0), "cudaStreamWaitEvent");
}

static size_t max2(size_t a, size_t b)
{
    return a > b ? a : b;
}

static moe_status cu_reserve(moe_backend *b, const moe_workload *w)
{
    moe_cuda_state *st = moe_cu(b);
    if (!w)
        return MOE_OK;
    size_t need = moe_cu_router_scratch(w);
    need = max2(need, moe_cu_aux_scratch(w));
    need = max2(need, moe_cu_select_scratch(w));
    need = max2(need, moe_cu_experts_scratch(w, b->float_type));
    need = max2(need, moe_cu_model_scratch(w, b->float_type));
    need = max2(need, moe_cu_attention_scratch(w, b->float_type));
    need = (need + 255) / 256 * 256;
    if (need <= st->scratch_bytes)
        return MOE_OK;
    void *p = nullptr;
    cudaDeviceSynchronize(); /* the old scratch may still be in use */
    if (cudaMalloc(&p, need) != cudaSuccess)
        return nomem(need, "the ops' scratch");
    cudaFree(st->scratch);
    st->scratch = (char *)p;
    st->scratch_bytes = need;
    return MOE_OK;
}

static int cu_set_threads(moe_backend *b, int n)
{
    return 1; /* one host thread enqueues; the device's parallelism is not a thread count */
}

static void cu_destroy(moe_backend *b)
{
    moe_cuda_state *st = moe_cu(b);
    if (st) {
        cudaDeviceSynchronize();
        if (st->blas)
            cublasDestroy(st->blas);
        for (int i = 0; i < MOE_NSTREAMS; i++) {
            cudaFree(st->blas_ws[i]);
            if (st->stream[i])
                cudaStreamDestroy(st->stream[i]);
        }
        for (int i = 0; i < MOE_CU_SIDE; i++) {
            cudaFree(st->side_ws[i]);
            if (st->side[i])
                cudaStreamDestroy(st->side[i]);
            if (st->join_ev[i])
                cudaEventDestroy(st->join_ev[i]);
        }
        if (st->fork_ev)
            cudaEventDestroy(st->fork_ev);
        cudaFree(st->scratch);
        drain_pending(st);
        free(st->pending);
        free(st);
    }
    free(b);
}

static int env_is(const char *name, const char *value)
{
    const char *v = getenv(name);
    return v && !strcmp(v, value);
}

extern "C" moe_status moe_backend_cuda_create(const moe_backend_options *o, moe_backend **out)
{
    *out = nullptr;
    moe_dtype ft = MOE_F32;
    if (o && o->dtype && !strcmp(o->dtype, "bf16"))
        ft = MOE_BF16;
    else if (o && o->dtype && strcmp(o->dtype, "fp32"))
        return moe_error(MOE_ERR_ARG, "cuda backend: dtype must be fp32 or bf16 (got '%s')", o->dtype);
    int count = 0;
    cudaError_t e = cudaGetDeviceCount(&count);
    if (e != cudaSuccess || count == 0) {
        cudaGetLastError();
        return moe_error(MOE_ERR_CUDA, "cuda backend: no device answers (%s)",
                         e != cudaSuccess ? cudaGetErrorString(e) : "0 devices");
    }
    const int dev = o ? o->device : 0;
    if (dev < 0 || dev >= count)
        return moe_error(MOE_ERR_ARG, "cuda backend: device %d outside [0, %d)", dev, count);
    if ((e = cudaSetDevice(dev)) != cudaSuccess)
        return moe_error(MOE_ERR_CUDA, "cuda backend: cudaSetDevice(%d): %s", dev, cudaGetErrorString(e));
    moe_backend *b = (moe_backend *)calloc(1, sizeof *b);
    moe_cuda_state *st = (moe_cuda_state *)calloc(1, sizeof *st);
    if (!b || !st) {
        free(b);
        free(st);
        return moe_error(MOE_ERR_NOMEM, "cuda backend: out of memory");
    }
    b->name = "cuda";
    b->float_type = ft;
    b->impl = st;
    st->device = dev;
    cudaDeviceGetAttribute(&st->sm_count, cudaDevAttrMultiProcessorCount, dev);
    int major = 0, minor = 0;
    cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev);
    cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev);
    st->sm90 = major == 9 && minor == 0;
    st->sync_ops = env_is("CMOE_CUDA_SYNC", "1");
    st->gemm = env_is("CMOE_CUDA_GEMM", "simt")     ? MOE_CU_GEMM_SIMT
               : env_is("CMOE_CUDA_GEMM", "mma")    ? MOE_CU_GEMM_MMA
               : env_is("CMOE_CUDA_GEMM", "cublas") ? MOE_CU_GEMM_CUBLAS
               : env_is("CMOE_CUDA_GEMM", "wgmma")  ? MOE_CU_GEMM_WGMMA
                                                    : MOE_CU_GEMM_AUTO;
    st->blas_ws_bytes = (size_t)32 << 20;
    moe_status s = MOE_OK;
    for (int i = 0; i < MOE_NSTREAMS && !s; i++) {
        if (cudaStreamCreateWithFlags(&st->stream[i], cudaStreamNonBlocking) != cudaSuccess)
            s = moe_error(MOE_ERR_CUDA, "cuda backend: cudaStreamCreate: %s",
                          cudaGetErrorString(cudaGetLastError()));
        else if (cudaMalloc(&st->blas_ws[i], st->blas_ws_bytes) != cudaSuccess)
            s = nomem(st->blas_ws_bytes, "cuBLAS's workspace");
    }
    st->side_cur = -1;
    for (int i = 0; i < MOE_CU_SIDE && !s; i++) {
        if (cudaStreamCreateWithFlags(&st->side[i], cudaStreamNonBlocking) != cudaSuccess ||
            cudaEventCreateWithFlags(&st->join_ev[i], cudaEventDisableTiming) != cudaSuccess)
            s = moe_error(MOE_ERR_CUDA, "cuda backend: a side stream: %s", cudaGetErrorString(cudaGetLastError()));
        else if (cudaMalloc(&st->side_ws[i], st->blas_ws_bytes) != cudaSuccess)
            s = nomem(st->blas_ws_bytes, "cuBLAS's workspace of a side stream");
    }
    if (!s && cudaEventCreateWithFlags(&st->fork_ev, cudaEventDisableTiming) != cudaSuccess)
        s = moe_error(MOE_ERR_CUDA, "cuda backend: cudaEventCreate: %s", cudaGetErrorString(cudaGetLastError()));
    if (!s && cublasCreate(&st->blas) != CUBLAS_STATUS_SUCCESS)
        s = moe_error(MOE_ERR_CUDA, "cuda backend: cublasCreate failed");
    if (!s) {
        /* explicit: no TF32 behind fp32 GEMMs, no atomics (deterministic), host scalars */
        cublasSetMathMode(st->blas, CUBLAS_DEFAULT_MATH);
        cublasSetAtomicsMode(st->blas, CUBLAS_ATOMICS_NOT_ALLOWED);
        cublasSetPointerMode(st->blas, CUBLAS_POINTER_MODE_HOST);
    }
    if (s) {
        cu_destroy(b);
        return s;
    }
    b->alloc = cu_alloc;
    b->free = cu_free;
    b->dtype = cu_dtype;
    b->upload = cu_upload;
    b->download = cu_download;
    b->fill = cu_fill;
    b->copy = cu_copy;
    b->sync = cu_sync;
    b->set_stream = cu_set_stream;
    b->event_create = cu_event_create;
    b->event_free = cu_event_free;
    b->event_record = cu_event_record;
    b->stream_wait = cu_stream_wait;
    b->reserve = cu_reserve;
    b->set_threads = cu_set_threads;
    b->matmul_forward = cu_matmul_forward;
    b->matmul_backward = cu_matmul_backward;
    b->rowscale_forward = cu_rowscale_forward;
    b->rowscale_backward = cu_rowscale_backward;
    b->add = cu_add;
    b->destroy = cu_destroy;
    moe_cu_router_ops(b);
    moe_cu_plan_ops(b);
    moe_cu_select_ops(b);
    moe_cu_aux_ops(b);
    moe_cu_experts_ops(b);
    moe_cu_moa_ops(b);
    moe_cu_dispatch_ops(b);
    moe_cu_model_ops(b);
    *out = b;
    return MOE_OK;
}
