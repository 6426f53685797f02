/*
 * The cpu backend: fp32 buffers, OpenBLAS for every GEMM, OpenMP for the rest.
 * This file holds memory, synchronisation, scratch and the dense ops; router,
 * selection, aux losses, experts and dispatch live beside it, one file per component,
 * named as their ref/ twins.
 *
 * Threads: OpenMP's team does all the work, GEMMs included: each op cuts its GEMMs into
 * blocks fixed by the shape (cpu.h) and every block is one single-threaded cblas_sgemm.
 * Debian's OpenBLAS is the pthreads build, whose pool would otherwise oversubscribe the
 * cores under OpenMP's; so the backend sets OpenBLAS to one thread once, when it is
 * created, and no op touches that setting again.
 *
 * Ops run at once on the calling thread (one stream; events are no-ops). A failure is
 * recorded as the backend's sticky error and reported by the next sync or download.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include <cblas.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#include "cpu/cpu.h"
#include "ref/ref.h" /* moe_act_is_glu */

struct moe_event {
    int unused;
};

static moe_status cpu_alloc(moe_backend *b, moe_dtype t, int64_t n, moe_buf **out)
{
    *out = NULL;
    if (t != MOE_F32 && t != MOE_I32)
        return moe_error(MOE_ERR_ARG, "cpu backend: buffers hold f32 or i32, not %s (bf16 needs --backend cuda)",
                         moe_dtype_name(t));
    const int64_t mem = moe_host_memory();
    if (n < 0)
        return moe_error(MOE_ERR_ARG, "cpu backend: cannot allocate %lld elements", (long long)n);
    if ((uint64_t)n > SIZE_MAX / sizeof(float) - 16 || (mem > 0 && (double)n * sizeof(float) > (double)mem))
        return moe_error(MOE_ERR_NOMEM, "cpu backend: %lld elements (%.3g GiB) are more than this machine's memory "
                         "(%.3g GiB)", (long long)n, (double)n * sizeof(float) / (1 << 30), (double)mem / (1 << 30));
    moe_buf *buf = malloc(sizeof *buf);
    /* 64-byte alignment: whole cache lines and AVX-512 loads for every buffer. */
    size_t bytes = ((size_t)(n ? n : 1) * sizeof(float) + 63) / 64 * 64;
    float *d = aligned_alloc(64, bytes);
    if (!buf || !d) {
        free(buf);
        free(d);
        return moe_error(MOE_ERR_NOMEM, "cpu backend: out of memory for %lld elements (%.3g GiB)", (long long)n,
                         (double)n * sizeof(float) / (1 << 30));
    }
    memset(d, 0, bytes);
    buf->type = t;
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

static moe_dtype cpu_dtype(moe_backend *b, const moe_buf *buf)
{
    return buf->type;
}

static moe_status check_range(moe_tensor t, int64_t n, const char *what)
{
    if (!t.buf || t.off < 0 || n < 0 || t.off > t.buf->n - n)
        return moe_error(MOE_ERR_ARG, "cpu backend: %s of %lld elements at %lld is outside the buffer", what,
                         (long long)n, (long long)t.off);
    return MOE_OK;
}

static moe_status cpu_upload(moe_backend *b, moe_tensor dst, const void *src, moe_dtype st, int64_t n)
{
    moe_status s = check_range(dst, n, "upload");
    return s ? s : moe_convert(dst.buf->d + dst.off, dst.buf->type, src, st, n);
}

static moe_status cpu_download(moe_backend *b, void *dst, moe_dtype dt, moe_tensor src, int64_t n)
{
    moe_status s = moe_backend_take_error(b);
    if (s == MOE_OK)
        s = check_range(src, n, "download");
    return s ? s : moe_convert(dst, dt, src.buf->d + src.off, src.buf->type, n);
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
    if (dst.buf->type != src.buf->type) {
        moe_backend_fail(b, "copy", MOE_ERR_ARG, "from %s to %s", moe_dtype_name(src.buf->type),
                         moe_dtype_name(dst.buf->type));
        return;
    }
    memmove(dst.buf->d + dst.off, src.buf->d + src.off, (size_t)n * sizeof(float));
}

static moe_status cpu_sync(moe_backend *b)
{
    return moe_backend_take_error(b);
}

static void cpu_set_stream(moe_backend *b, int stream)
{
}

static moe_status cpu_event_create(moe_backend *b, moe_event **out)
{
    *out = calloc(1, sizeof **out);
    return *out ? MOE_OK : moe_error(MOE_ERR_NOMEM, "cpu backend: out of memory for an event");
}

static void cpu_event_free(moe_backend *b, moe_event *ev)
{
    free(ev);
}

/* One stream that runs each op before returning: every event has happened already. */
static void cpu_event_nop(moe_backend *b, moe_event *ev)
{
}

float *moe_cpu_scratch(moe_backend *b, int64_t n, const char *op)
{
    moe_cpu_state *st = moe_cpu(b);
    if (n <= st->scratch_n)
        return st->scratch;
    moe_backend_fail(b, op, MOE_ERR_ARG, "needs %lld floats of scratch, %lld were reserved for the workloads it was "
                     "given (a layer or model asked for less than it runs)", (long long)n, (long long)st->scratch_n);
    return NULL;
}

static int64_t max3(int64_t a, int64_t b, int64_t c)
{
    int64_t m = a > b ? a : b;
    return m > c ? m : c;
}

/* The scratch each op family takes at most for a workload (floats); the ops' own files
 * say what they use it for. */
static int64_t scratch_for(const moe_workload *w)
{
    int64_t need = 0;
    if (w->layer) {
        const moe_layer_config *c = w->layer;
        const int64_t E = c->n_experts, T = w->tokens;
        const int64_t glu = moe_act_is_glu(c->act) ? 2 : 1;
        const int64_t Fs = c->n_shared * (c->d_ff_shared > 0 ? c->d_ff_shared : c->d_ff);
        const int64_t Fd = c->residual ? (c->d_ff_dense > 0 ? c->d_ff_dense : c->d_ff) : 0;
        const int64_t M = c->n_tasks > 0 ? c->n_tasks : 1;
        need = max3(0, glu * T * Fs, glu * T * Fd); /* shared / residual ffn backward: g1, g3 */
        need = max3(need, T * c->top_k, 2 * (3 * M + 2 * M * E + E));   /* route backward; MI loss */
        need = max3(need, 2 * 512 * E, 0);                             /* noisy load: per-thread sums */
    }
    if (w->rows_ffn > 0)
        need = max3(need, 2 * w->rows_ffn * w->d_ff, 0);
    if (w->batch > 0) /* attention backward's dP and dS, decode's probabilities */
        need = max3(need, w->batch * w->heads * w->seq * w->seq, w->heads * w->seq);
    return need;
}

static moe_status cpu_reserve(moe_backend *b, const moe_workload *w)
{
    moe_cpu_state *st = moe_cpu(b);
    const int64_t n = w ? scratch_for(w) : 0;
    if (n <= st->scratch_n)
        return MOE_OK;
    float *p = aligned_alloc(64, ((size_t)n * sizeof(float) + 63) / 64 * 64);
    if (!p)
        return moe_error(MOE_ERR_NOMEM, "cpu backend: out of memory for %lld floats (%.1f MiB) of scratch",
                         (long long)n, (double)n * 4 / 1048576.0);
    free(st->scratch);
    st->scratch = p;
    st->scratch_n = n;
    return MOE_OK;
}

static int cpu_set_threads(moe_backend *b, int n)
{
    moe_cpu_state *st = moe_cpu(b);
    if (n > 0)
        st->threads = n;
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

/* Columns per block when C has too few rows to split by rows. */
#define COLS 256

void moe_cpu_sgemm_par(int nt, int ta, int tb, int64_t M, int64_t N, int64_t K, float alpha, const float *A,
                       int64_t lda, const float *B, int64_t ldb, float beta, float *C, int64_t ldc)
{
    /* Rows of C in blocks of MOE_CPU_ROWS when there are at least two such blocks, else
     * columns in blocks of COLS: bounds from the shape alone, so the bits do not depend
     * on nt (see cpu.h). */
    const int by_rows = M >= 2 * MOE_CPU_ROWS || N < 2 * COLS;
    const int64_t len = by_rows ? MOE_CPU_ROWS : COLS, span = by_rows ? M : N;
    const int64_t parts = (span + len - 1) / len;
#pragma omp parallel for schedule(dynamic, 1) num_threads(nt) if (parts > 1 && nt > 1)
    for (int64_t q = 0; q < parts; q++) {
        const int64_t lo = q * len, w = lo + len < span ? len : span - lo;
        if (by_rows)
            moe_cpu_sgemm(ta, tb, w, N, K, alpha, A + lo * (ta ? 1 : lda), lda, B, ldb, beta, C + lo * ldc, ldc);
        else
            moe_cpu_sgemm(ta, tb, M, w, K, alpha, A, lda, B + lo * (tb ? ldb : 1), ldb, beta, C + lo, ldc);
    }
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

moe_status moe_backend_cpu_create(const moe_backend_options *o, moe_backend **out)
{
    *out = NULL;
    if (o && o->dtype && strcmp(o->dtype, "fp32"))
        return moe_error(MOE_ERR_ARG, "cpu backend: it computes in fp32, not '%s' (bf16 needs --backend cuda)",
                         o->dtype);
    moe_backend *b = calloc(1, sizeof *b);
    moe_cpu_state *st = calloc(1, sizeof *st);
    if (!b || !st) {
        free(b);
        free(st);
        return moe_error(MOE_ERR_NOMEM, "cpu backend: out of memory");
    }
    b->name = "cpu";
    b->float_type = MOE_F32;
    b->impl = st;
#ifdef _OPENMP
    st->threads = o && o->threads > 0 ? o->threads : omp_get_max_threads();
#else
    st->threads = 1;
#endif
    openblas_set_num_threads(1); /* once, here: see the top of this file */
    b->alloc = cpu_alloc;
    b->free = cpu_free;
    b->dtype = cpu_dtype;
    b->upload = cpu_upload;
    b->download = cpu_download;
    b->fill = cpu_fill;
    b->copy = cpu_copy;
    b->sync = cpu_sync;
    b->set_stream = cpu_set_stream;
    b->event_create = cpu_event_create;
    b->event_free = cpu_event_free;
    b->event_record = cpu_event_nop;
    b->stream_wait = cpu_event_nop;
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
    moe_cpu_model_ops(b);
    moe_cpu_moa_ops(b);
    *out = b;
    return MOE_OK;
}
