/* The CUDA device query behind `cmoe --version` (which GPUs this build can see) and the
 * cuBLAS GEMM ceiling that the benchmarks measure beside themselves. */
#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cmoe.h"

/* Appends to buf at *used; a full buffer truncates quietly, the text is only for people. */
static void append(char *buf, size_t n, size_t *used, const char *fmt, ...)
{
    if (*used >= n)
        return;
    va_list ap;
    va_start(ap, fmt);
    int w = vsnprintf(buf + *used, n - *used, fmt, ap);
    va_end(ap);
    if (w > 0)
        *used += (size_t)w < n - *used ? (size_t)w : n - *used - 1;
}

extern "C" moe_status moe_cuda_device_info(char *buf, size_t n)
{
    if (!buf || n == 0)
        return moe_error(MOE_ERR_ARG, "moe_cuda_device_info: buf is NULL or n is 0");
    buf[0] = '\0';
    size_t used = 0;
    int runtime = 0, driver = 0;
    cudaRuntimeGetVersion(&runtime);
    cudaDriverGetVersion(&driver); /* 0 when no driver is installed */

    int count = 0;
    cudaError_t err = cudaGetDeviceCount(&count);
    if (err != cudaSuccess || count == 0) {
        /* No GPU (or no driver) is a normal state for a CUDA build, e.g. on CI. */
        append(buf, n, &used, "CUDA runtime %d.%d, driver %d.%d: no device answers (%s)",
               runtime / 1000, runtime % 1000 / 10, driver / 1000, driver % 1000 / 10,
               err != cudaSuccess ? cudaGetErrorString(err) : "0 devices");
        cudaGetLastError(); /* clear the sticky error so later calls start clean */
        return moe_error(MOE_ERR_CUDA, "%s", buf);
    }
    append(buf, n, &used, "CUDA runtime %d.%d, driver %d.%d: %d device%s", runtime / 1000,
           runtime % 1000 / 10, driver / 1000, driver % 1000 / 10, count, count == 1 ? "" : "s");
    for (int i = 0; i < count; i++) {
        cudaDeviceProp p;
        if (cudaGetDeviceProperties(&p, i) != cudaSuccess) {
            append(buf, n, &used, "\n  device %d: properties unavailable", i);
            continue;
        }
        append(buf, n, &used, "\n  device %d: %s, %.1f GiB, compute capability %d.%d, %d SMs",
               i, p.name, (double)p.totalGlobalMem / (1024.0 * 1024.0 * 1024.0), p.major,
               p.minor, p.multiProcessorCount);
    }
    return MOE_OK;
}

/* ---- the GEMM ceiling of bench layer and bench/gpu_bench.py ----------------------------- */

__global__ static void k_random(void *p, int bf16, long long n, unsigned seed)
{
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (long long)blockDim.x * gridDim.x) {
        unsigned h = (unsigned)i * 2654435761u ^ seed;
        h ^= h >> 15;
        h *= 2246822519u;
        h ^= h >> 13;
        const float v = ((float)(h & 0xffff) / 65536.0f - 0.5f); /* never zeros: they run faster */
        if (bf16)
            ((__nv_bfloat16 *)p)[i] = __float2bfloat16_rn(v);
        else
            ((float *)p)[i] = v;
    }
}

static int cmp_float(const void *a, const void *b)
{
    const float x = *(const float *)a, y = *(const float *)b;
    return (x > y) - (x < y);
}

extern "C" moe_status moe_cuda_gemm_ceiling(const char *dtype, double flops, double *gflops, int64_t *side)
{
    const int bf16 = dtype && !strcmp(dtype, "bf16");
    long long m = (long long)cbrt(flops / 2.0);
    m = m < 1024 ? 1024 : (m > 16384 ? 16384 : m);
    m = m / 256 * 256;
    *side = m;
    *gflops = 0;
    const size_t es = bf16 ? 2 : 4, bytes = (size_t)(m * m) * es;
    void *A = NULL, *B = NULL, *C = NULL;
    cublasHandle_t h = NULL;
    cudaEvent_t e0 = NULL, e1 = NULL;
    moe_status s = MOE_OK;
    if (cudaMalloc(&A, bytes) != cudaSuccess || cudaMalloc(&B, bytes) != cudaSuccess ||
        cudaMalloc(&C, (size_t)(m * m) * 4) != cudaSuccess || cublasCreate(&h) != CUBLAS_STATUS_SUCCESS ||
        cudaEventCreate(&e0) != cudaSuccess || cudaEventCreate(&e1) != cudaSuccess) {
        s = moe_error(MOE_ERR_CUDA, "GEMM ceiling: %s", cudaGetErrorString(cudaGetLastError()));
        goto done;
    }
    {
        k_random<<<1024, 256>>>(A, bf16, m * m, 1);
        k_random<<<1024, 256>>>(B, bf16, m * m, 2);
        const float one = 1.0f, zero = 0.0f;
        const cudaDataType t = bf16 ? CUDA_R_16BF : CUDA_R_32F;
        float ms[6];
        for (int r = 0; r < 6 && !s; r++) {
            cudaEventRecord(e0);
            cublasStatus_t st =
                cublasGemmEx(h, CUBLAS_OP_N, CUBLAS_OP_N, (int)m, (int)m, (int)m, &one, A, t, (int)m, B, t, (int)m,
                             &zero, C, bf16 ? CUDA_R_16BF : CUDA_R_32F, (int)m,
                             bf16 ? CUBLAS_COMPUTE_32F : CUBLAS_COMPUTE_32F_PEDANTIC, CUBLAS_GEMM_DEFAULT);
            cudaEventRecord(e1);
            if (st != CUBLAS_STATUS_SUCCESS || cudaEventSynchronize(e1) != cudaSuccess)
                s = moe_error(MOE_ERR_CUDA, "GEMM ceiling: cublasGemmEx failed");
            else
                cudaEventElapsedTime(&ms[r], e0, e1);
        }
        if (!s) {
            qsort(ms + 1, 5, sizeof ms[0], cmp_float); /* the first one warms up */
            *gflops = 2.0 * (double)m * m * m / (ms[3] * 1e-3) / 1e9;
        }
    }
done:
    if (e0)
        cudaEventDestroy(e0);
    if (e1)
        cudaEventDestroy(e1);
    if (h)
        cublasDestroy(h);
    cudaFree(A);
    cudaFree(B);
    cudaFree(C);
    return s;
}
