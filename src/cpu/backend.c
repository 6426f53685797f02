/*
 * The cpu backend: fp32 buffers, OpenBLAS for every GEMM, OpenMP for the rest.
 * This file holds memory, threads and the dense ops; router, selection, aux losses,
 * experts and dispatch live in cpu_*.c, one file per component.
 *
 * Threads: OpenMP's team does all the work, GEMMs included: each op cuts its GEMMs into
 * blocks and every block is one single-threaded cblas_sgemm. OpenBLAS is switched to one
 * thread for the duration of such an op and back afterwards (Debian's OpenBLAS is the
 * pthreads build: its pool and OpenMP's would otherwise oversubscribe the cores), so
 * code outside this backend that relies on OpenBLAS's own threading keeps it.
 */
#include <stdlib.h>
#include <string.h>

#include <cblas.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#include "cpu/cpu.h"

static moe_status cpu_alloc(moe_backend *b, int64_t n, moe_buf **out)
{
    *out = NULL;
    const int64_t mem = moe_host_memory();
    if (n < 0)
        return moe_error(MOE_ERR_ARG, "cpu backend: cannot allocate %lld floats", (long long)n);
    if ((uint64_t)n > SIZE_MAX / sizeof(float) - 16 || (mem > 0 && (double)n * sizeof(float) > (double)mem))
        return moe_error(MOE_ERR_NOMEM, "cpu backend: %lld floats (%.3g GiB) are more than this machine's memory "
                         "(%.3g GiB)", (long long)n, (double)n * sizeof(float) / (1 << 30), (double)mem / (1 << 30));
    moe_buf *buf = malloc(sizeof *buf);
    /* 64-byte alignment: whole cache lines and AVX-512 loads for every buffer. */
    size_t bytes = ((size_t)(n ? n : 1) * sizeof(float) + 63) / 64 * 64;
    float *d = aligned_alloc(64, bytes);
    if (!buf || !d) {
        free(buf);
        free(d);
        return moe_error(MOE_ERR_NOMEM, "cpu backend: out of memory for %lld floats (%.3g GiB)", (long long)n,
                         (double)n * sizeof(float) / (1 << 30));
    }
    memset(d, 0, bytes);
    buf->n = n;
    buf->d = d;
    *out = buf;
    return MOE_OK;
}

static void cpu_free(moe_backend *b, moe_buf *buf)
{
    if (buf) {
        free(buf->d);
        free(buf);
    }
}

static moe_status check_range(moe_tensor t, int64_t n, const char *what)
{
    if (!t.buf || t.off < 0 || n < 0 || t.off > t.buf->n - n)
        return moe_error(MOE_ERR_ARG, "cpu backend: %s of %lld elements at %lld is outside the buffer", what,
                         (long long)n, (long long)t.off);
    return MOE_OK;
}

static moe_status cpu_upload(moe_backend *b, moe_tensor dst, const double *src, int64_t n)
{
    moe_status s = check_range(dst, n, "upload");
    if (s != MOE_OK)
        return s;
    float *d = F(dst);
#pragma omp parallel for schedule(static) if (n > 65536)
    for (int64_t i = 0; i < n; i++)
        d[i] = (float)src[i];
    return MOE_OK;
}

static moe_status cpu_download(moe_backend *b, double *dst, moe_tensor src, int64_t n)
{
    moe_status s = check_range(src, n, "download");
    if (s != MOE_OK)
        return s;
    const float *d = F(src);
#pragma omp parallel for schedule(static) if (n > 65536)
    for (int64_t i = 0; i < n; i++)
        dst[i] = d[i];
    return MOE_OK;
}

static void cpu_fill(moe_backend *b, moe_tensor t, double v, int64_t n)
{
    float *d = F(t), fv = (float)v;
#pragma omp parallel for schedule(static) if (n > 65536)
    for (int64_t i = 0; i < n; i++)
        d[i] = fv;
}

static void cpu_copy(moe_backend *b, moe_tensor dst, moe_tensor src, int64_t n)
{
    memmove(dst.buf->d + dst.off, src.buf->d + src.off, (size_t)n * sizeof(float));
}

float *moe_cpu_scratch(moe_backend *b, int64_t n)
{
    moe_cpu_state *st = moe_cpu(b);
    if (n <= st->scratch_n)
        return st->scratch;
    /* Only reached when reserve() was not told enough: grows once, then stays. */
    float *p = aligned_alloc(64, ((size_t)n * sizeof(float) + 63) / 64 * 64);
    if (!p)
        return NULL;
    free(st->scratch);
    st->scratch = p;
    st->scratch_n = n;
    return p;
}

static moe_status cpu_reserve(moe_backend *b, int64_t n)
{
    if (n < 0)
        return moe_error(MOE_ERR_ARG, "cpu backend: reserve of %lld floats", (long long)n);
    if (!moe_cpu_scratch(b, n))
        return moe_error(MOE_ERR_NOMEM, "cpu backend: out of memory for %lld floats of scratch", (long long)n);
    return MOE_OK;
}

int moe_cpu_blas_threads(int n)
{
    int old = openblas_get_num_threads();
    if (n > 0 && n != old)
        openblas_set_num_threads(n);
    return old;
}

static int cpu_set_threads(moe_backend *b, int n)
{
    moe_cpu_state *st = moe_cpu(b);
    if (n > 0) {
        st->threads = n;
#ifdef _OPENMP
        omp_set_num_threads(n);
#endif
        moe_cpu_blas_threads(n);
    }
    return st->threads;
}

void moe_cpu_sgemm(int ta, int tb, int64_t M, int64_t N, int64_t K, float alpha, const float *A, int64_t lda,
                   const float *B, int64_t ldb, float beta, float *C, int64_t ldc)
{
    if (M <= 0 || N <= 0)
        return;
    if (K <= 0) { /* BLAS leaves C alone for K = 0 only when beta = 1; make it explicit */
        for (int64_t i = 0; i < M; i++)
            for (int64_t j = 0; j < N; j++)
                C[i * ldc + j] = beta == 0 ? 0 : beta * C[i * ldc + j];
        return;
    }
    cblas_sgemm(CblasRowMajor, ta ? CblasTrans : CblasNoTrans, tb ? CblasTrans : CblasNoTrans, (blasint)M,
                (blasint)N, (blasint)K, alpha, A, (blasint)lda, B, (blasint)ldb, beta, C, (blasint)ldc);
}

void moe_cpu_sgemm_par(int nt, int ta, int tb, int64_t M, int64_t N, int64_t K, float alpha, const float *A,
                       int64_t lda, const float *B, int64_t ldb, float beta, float *C, int64_t ldc)
{
    /* Split the rows of C when there are enough, else its columns; each block is one
     * single-threaded sgemm, so the split never changes a single element's sum. */
    const int by_rows = M >= N || M >= 64 * (int64_t)nt;
    const int64_t span = by_rows ? M : N;
    int parts = nt;
    if (span < 32 * (int64_t)parts)
        parts = (int)(span / 32) > 0 ? (int)(span / 32) : 1;
    const int old = parts > 1 ? moe_cpu_blas_threads(1) : 0;
#pragma omp parallel for schedule(static) num_threads(parts) if (parts > 1)
    for (int q = 0; q < parts; q++) {
        int64_t lo = span * q / parts, hi = span * (q + 1) / parts;
        if (by_rows)
            moe_cpu_sgemm(ta, tb, hi - lo, N, K, alpha, A + lo * (ta ? 1 : lda), lda, B, ldb, beta, C + lo * ldc,
                          ldc);
        else
            moe_cpu_sgemm(ta, tb, M, hi - lo, K, alpha, A, lda, B + lo * (tb ? ldb : 1), ldb, beta, C + lo, ldc);
    }
    if (parts > 1)
        moe_cpu_blas_threads(old);
}

static void cpu_matmul_forward(moe_backend *b, moe_tensor out, moe_tensor x, moe_tensor w, int64_t T, int64_t K,
                               int64_t N)
{
    moe_cpu_sgemm_par(moe_cpu(b)->threads, 0, 0, T, N, K, 1.0f, F(x), K, F(w), N, 0.0f, F(out), N);
}

static void cpu_matmul_backward(moe_backend *b, moe_tensor *dx, moe_tensor *dw, moe_tensor dout, moe_tensor x,
                                moe_tensor w, int64_t T, int64_t K, int64_t N)
{
    const int nt = moe_cpu(b)->threads;
    if (dx) /* dx [T, K] += dout [T, N] · wᵀ */
        moe_cpu_sgemm_par(nt, 0, 1, T, K, N, 1.0f, F(dout), N, F(w), N, 1.0f, F(*dx), K);
    if (dw) /* dw [K, N] += xᵀ · dout */
        moe_cpu_sgemm_par(nt, 1, 0, K, N, T, 1.0f, F(x), K, F(dout), N, 1.0f, F(*dw), N);
}

static void cpu_rowscale_forward(moe_backend *b, moe_tensor y, moe_tensor v, moe_tensor a, int64_t as, int64_t T,
                                 int64_t d)
{
    float *yy = F(y);
    const float *vv = F(v), *aa = F(a);
#pragma omp parallel for schedule(static)
    for (int64_t t = 0; t < T; t++) {
        const float at = aa[t * as];
        for (int64_t i = 0; i < d; i++)
            yy[t * d + i] += at * vv[t * d + i];
    }
}

static void cpu_rowscale_backward(moe_backend *b, moe_tensor *dv, moe_tensor *da, moe_tensor dy, moe_tensor v,
                                  moe_tensor a, int64_t as, int64_t T, int64_t d)
{
    const float *g = F(dy), *vv = F(v), *aa = F(a);
    float *dvv = FOPT(dv), *daa = FOPT(da);
#pragma omp parallel for schedule(static)
    for (int64_t t = 0; t < T; t++) {
        const float at = aa[t * as];
        double acc = 0;
        for (int64_t i = 0; i < d; i++) {
            if (dvv)
                dvv[t * d + i] += at * g[t * d + i];
            acc += (double)g[t * d + i] * vv[t * d + i];
        }
        if (daa)
            daa[t * as] += (float)acc;
    }
}

static void cpu_add(moe_backend *b, moe_tensor y, moe_tensor x, int64_t n)
{
    float *yy = F(y);
    const float *xx = F(x);
#pragma omp parallel for schedule(static) if (n > 65536)
    for (int64_t i = 0; i < n; i++)
        yy[i] += xx[i];
}

static void cpu_destroy(moe_backend *b)
{
    moe_cpu_state *st = moe_cpu(b);
    free(st->scratch);
    free(st);
    free(b);
}

moe_status moe_backend_cpu_create(int threads, moe_backend **out)
{
    *out = NULL;
    moe_backend *b = calloc(1, sizeof *b);
    moe_cpu_state *st = calloc(1, sizeof *st);
    if (!b || !st) {
        free(b);
        free(st);
        return moe_error(MOE_ERR_NOMEM, "cpu backend: out of memory");
    }
    b->name = "cpu";
    b->elem_size = sizeof(float);
    b->impl = st;
#ifdef _OPENMP
    st->threads = omp_get_max_threads();
#else
    st->threads = 1;
#endif
    b->alloc = cpu_alloc;
    b->free = cpu_free;
    b->upload = cpu_upload;
    b->download = cpu_download;
    b->fill = cpu_fill;
    b->copy = cpu_copy;
    b->reserve = cpu_reserve;
    b->set_threads = cpu_set_threads;
    b->matmul_forward = cpu_matmul_forward;
    b->matmul_backward = cpu_matmul_backward;
    b->rowscale_forward = cpu_rowscale_forward;
    b->rowscale_backward = cpu_rowscale_backward;
    b->add = cpu_add;
    b->destroy = cpu_destroy;
    moe_cpu_router_ops(b);
    moe_cpu_select_ops(b);
    moe_cpu_aux_ops(b);
    moe_cpu_experts_ops(b);
    moe_cpu_dispatch_ops(b);
    moe_backend_cpu_model_ops(b);
    cpu_set_threads(b, threads > 0 ? threads : st->threads);
    *out = b;
    return MOE_OK;
}
