/*
 * Routing plans on the device (cuda.h's moe_bplan): storage sized once at creation, the
 * host copies either way, the segments an exchange sets, and the per-expert ops over a
 * plan's segments (counts, fills, the loss-free balancing bias), whose row counts are read
 * on the device. gpu/select.cu fills plans from scores.
 */
#include <cstdlib>
#include <cstring>

#include "gpu/cuda.h"

/* ---- storage -------------------------------------------------------------------------------- */

static void plan_free(moe_backend *b, moe_bplan *p)
{
    if (!p)
        return;
    cudaDeviceSynchronize();
    void *ptrs[] = {p->token, p->expert, p->choice, p->src, p->weight, p->offsets, p->count, p->selected, p->start,
                    p->nd, p->choice_expert, p->choice_weight, p->choice_kept, p->tok_off, p->tok_row, p->keys_in,
                    p->keys_out, p->vals_in, p->vals_out, p->flags, p->pos, p->bal, p->d0, p->d1, p->mx, p->cub_tmp};
    for (size_t i = 0; i < sizeof ptrs / sizeof ptrs[0]; i++)
        cudaFree(ptrs[i]);
    cudaFreeHost(p->seg_h);
    if (p->seg_ev)
        cudaEventDestroy(p->seg_ev);
    free(p);
}

static moe_status plan_create(moe_backend *b, const moe_layer_config *c, int64_t max_tokens, moe_bplan **out)
{
    *out = nullptr;
    moe_status s = moe_layer_config_validate(c, max_tokens);
    if (s)
        return s;
    if (c->router != MOE_ROUTER_EXPERT_CHOICE && c->top_k > MOE_CU_MAX_K)
        return moe_error(MOE_ERR_ARG, "cuda backend: top_k = %lld; its selection takes at most %d experts per token",
                         (long long)c->top_k, MOE_CU_MAX_K);
    if (max_tokens * c->n_experts > INT32_MAX / 2)
        return moe_error(MOE_ERR_ARG, "cuda backend: T·E = %lld·%lld exceeds its int32 indices", (long long)max_tokens,
                         (long long)c->n_experts);
    moe_bplan *p = (moe_bplan *)calloc(1, sizeof *p);
    if (!p)
        return moe_error(MOE_ERR_NOMEM, "cuda backend: out of memory for a plan");
    const int64_t T = max_tokens, E = c->n_experts;
    const int ec = c->router == MOE_ROUTER_EXPERT_CHOICE;
    const int64_t k = ec ? moe_capacity(c, T) : c->top_k, n = ec ? E * k : T * k;
    p->E = E;
    p->T = p->max_T = T;
    p->k = p->max_k = k;
    p->cap_n = n;
    p->rows_bound = n > 0 ? n : 1;
    const int64_t tk = ec ? 1 : T * k, te = ec || c->router == MOE_ROUTER_SINKHORN ? T * E : 1;
    int64_t sortn = n > tk ? n : tk;
    sortn = sortn > te ? sortn : te;
    p->sortn = sortn < 1 ? 1 : sortn;
    p->cub_bytes = moe_cu_sort_bytes(p->sortn);
    const size_t nn = (size_t)(n ? n : 1);
    size_t total = 0;
    bool ok = true;
#define ALLOC(ptr, count)                                                                                           \
    do {                                                                                                            \
        const size_t by_ = (size_t)(count) * sizeof *(ptr);                                                         \
        total += by_;                                                                                               \
        ok = ok && cudaMalloc((void **)&(ptr), by_ ? by_ : 4) == cudaSuccess;                                        \
    } while (0)
    ALLOC(p->token, nn);
    ALLOC(p->expert, nn);
    ALLOC(p->choice, nn);
    ALLOC(p->src, nn);
    ALLOC(p->weight, nn);
    ALLOC(p->tok_row, nn);
    ALLOC(p->offsets, E + 1);
    ALLOC(p->count, E);
    ALLOC(p->selected, E);
    ALLOC(p->start, E + 1);
    ALLOC(p->nd, 2);
    ALLOC(p->choice_expert, tk);
    ALLOC(p->choice_weight, tk);
    ALLOC(p->choice_kept, tk);
    ALLOC(p->tok_off, T + 1);
    ALLOC(p->keys_in, p->sortn);
    ALLOC(p->keys_out, p->sortn);
    ALLOC(p->vals_in, p->sortn);
    ALLOC(p->vals_out, p->sortn);
    if (ec) {
        ALLOC(p->flags, T * E);
        ALLOC(p->pos, T * E);
    }
    if (c->router == MOE_ROUTER_SINKHORN) {
        ALLOC(p->bal, T * E);
        ALLOC(p->d0, T);
        ALLOC(p->d1, E);
        ALLOC(p->mx, 1);
    }
#undef ALLOC
    ok = ok && cudaMalloc(&p->cub_tmp, p->cub_bytes) == cudaSuccess;
    total += p->cub_bytes;
    ok = ok && cudaMallocHost((void **)&p->seg_h, (size_t)(2 * E) * sizeof(int32_t)) == cudaSuccess &&
         cudaEventCreateWithFlags(&p->seg_ev, cudaEventDisableTiming) == cudaSuccess;
    if (!ok) {
        cudaGetLastError();
        plan_free(b, p);
        size_t fr = 0, tot = 0;
        cudaMemGetInfo(&fr, &tot);
        return moe_error(MOE_ERR_NOMEM,
                         "cuda backend: out of device memory for a plan of %lld assignments (%.1f MiB; %.1f MiB "
                         "free): lower the tokens per batch",
                         (long long)n, (double)total / 1048576.0, (double)fr / 1048576.0);
    }
    cudaMemset(p->nd, 0, 2 * sizeof(int32_t));
    cudaMemset(p->count, 0, (size_t)E * sizeof(int32_t));
    cudaMemset(p->selected, 0, (size_t)E * sizeof(int32_t));
    cudaMemset(p->offsets, 0, (size_t)(E + 1) * sizeof(int32_t));
    cudaDeviceSynchronize();
    *out = p;
    return MOE_OK;
}

/* ---- the segments on the host (cuda.h) ------------------------------------------------------ */

void moe_cu_plan_segments_async(moe_backend *b, moe_bplan *p)
{
    cudaStream_t s = moe_cu_stream(b);
    const size_t by = (size_t)p->E * sizeof(int32_t);
    if (moe_cu_ok(b, "route", cudaMemcpyAsync(p->seg_h, p->offsets, by, cudaMemcpyDeviceToHost, s), "segments") &&
        moe_cu_ok(b, "route", cudaMemcpyAsync(p->seg_h + p->E, p->count, by, cudaMemcpyDeviceToHost, s), "segments") &&
        moe_cu_ok(b, "route", cudaEventRecord(p->seg_ev, s), "segments"))
        p->seg_state = SEG_COPYING;
    else
        p->seg_state = SEG_NONE;
}

const int32_t *moe_cu_plan_segments(moe_backend *b, const char *op, const moe_bplan *p)
{
    moe_bplan *q = (moe_bplan *)p; /* the wait only settles the copy's state */
    if (q->seg_state == SEG_COPYING) {
        if (!moe_cu_ok(b, op, cudaEventSynchronize(q->seg_ev), "reading the segments back"))
            return nullptr;
        q->seg_state = SEG_READY;
    }
    if (q->seg_state != SEG_READY) {
        moe_backend_fail(b, op, MOE_ERR_ARG, "a plan with no segments (neither routed nor uploaded)");
        return nullptr;
    }
    return q->seg_h;
}

/* The host made the segments: no copy from the device, once an earlier copy has landed. */
static moe_status segments_from_host(moe_bplan *p, const int64_t *begin, const int64_t *count)
{
    if (p->seg_state == SEG_COPYING) {
        const cudaError_t e = cudaEventSynchronize(p->seg_ev);
        p->seg_state = SEG_NONE;
        if (e != cudaSuccess)
            return moe_error(MOE_ERR_CUDA, "cuda backend: a plan's segments: %s", cudaGetErrorString(e));
    }
    for (int64_t e = 0; e < p->E; e++) {
        p->seg_h[e] = (int32_t)begin[e];
        p->seg_h[p->E + e] = (int32_t)count[e];
    }
    p->seg_state = SEG_READY;
    return MOE_OK;
}

/* device -> host copies of a plan's arrays (waits) */
template <typename T> static moe_status fetch(T *dst, const T *src, int64_t n)
{
    if (n <= 0)
        return MOE_OK;
    cudaError_t e = cudaMemcpy(dst, src, (size_t)n * sizeof *dst, cudaMemcpyDeviceToHost);
    return e == cudaSuccess ? MOE_OK : moe_error(MOE_ERR_CUDA, "cuda backend: plan download: %s", cudaGetErrorString(e));
}

static moe_status plan_download(moe_backend *b, moe_plan *h, const moe_bplan *p)
{
    moe_status s = b->sync(b);
    if (s)
        return s;
    int32_t nd[2];
    if ((s = fetch(nd, p->nd, 2)))
        return s;
    const int64_t n = nd[0], E = p->E;
    const int64_t tk = !p->ec && p->T * p->k <= p->max_T * p->max_k ? p->T * p->k : 0;
    if (h->cap_n < n || h->E != E || h->T * h->k < tk)
        return moe_error(MOE_ERR_ARG, "cuda backend: host plan too small for %lld assignments", (long long)n);
    const int64_t big = n > tk ? n : tk;
    int32_t *i32 = (int32_t *)malloc((size_t)(big + 2 * E + 2) * sizeof *i32);
    float *f32 = (float *)malloc((size_t)(big + 1) * sizeof *f32);
    uint8_t *u8 = (uint8_t *)malloc((size_t)(tk + 1));
    if (!i32 || !f32 || !u8) {
        free(i32), free(f32), free(u8);
        return moe_error(MOE_ERR_NOMEM, "cuda backend: out of host memory for a plan download");
    }
    h->T = p->T;
    h->k = p->k;
    h->n = n;
    h->capacity = p->capacity;
    h->dropped = nd[1];
    if (!(s = fetch(i32, p->token, n)))
        for (int64_t i = 0; i < n; i++)
            h->token[i] = i32[i];
    if (!s && !(s = fetch(i32, p->expert, n)))
        for (int64_t i = 0; i < n; i++)
            h->expert[i] = i32[i];
    if (!s && !(s = fetch(i32, p->src, n)))
        for (int64_t i = 0; i < n; i++)
            h->src[i] = i32[i];
    if (!s && !(s = fetch(i32, p->choice, n)))
        for (int64_t i = 0; i < n; i++)
            h->choice[i] = i32[i];
    if (!s && !(s = fetch(f32, p->weight, n)))
        for (int64_t i = 0; i < n; i++)
            h->weight[i] = f32[i];
    if (!s && !(s = fetch(i32, p->offsets, E + 1)))
        for (int64_t e = 0; e <= E; e++)
            h->offsets[e] = i32[e];
    if (!s && !(s = fetch(i32, p->count, E)))
        for (int64_t e = 0; e < E; e++)
            h->count[e] = i32[e];
    if (!s && !(s = fetch(i32, p->selected, E)))
        for (int64_t e = 0; e < E; e++)
            h->selected[e] = i32[e];
    if (!s && tk && !(s = fetch(i32, p->choice_expert, tk)) && !(s = fetch(f32, p->choice_weight, tk)) &&
        !(s = fetch(u8, p->choice_kept, tk)))
        for (int64_t i = 0; i < tk; i++) {
            h->choice_expert[i] = i32[i];
            h->choice_weight[i] = f32[i];
            h->choice_kept[i] = u8[i];
        }
    free(i32), free(f32), free(u8);
    return s;
}

/* host array -> a device array of the plan, enqueued (the temporary is freed at the next sync) */
template <typename D, typename S> static int put(moe_backend *b, D *dst, const S *src, int64_t n)
{
    if (n <= 0)
        return 1;
    D *tmp = (D *)malloc((size_t)n * sizeof *tmp);
    if (!tmp) {
        moe_backend_fail(b, "plan upload", MOE_ERR_NOMEM, "out of host memory");
        return 0;
    }
    for (int64_t i = 0; i < n; i++)
        tmp[i] = (D)src[i];
    return moe_cu_copy_in(b, "plan upload", dst, tmp, (size_t)n * sizeof *tmp);
}

static moe_status plan_upload(moe_backend *b, moe_bplan *p, const moe_plan *h)
{
    moe_status st = moe_plan_check(h);
    if (st)
        return st;
    const int ec = h->n > 0 && h->choice[0] < 0;
    if (h->E != p->E || h->n > p->cap_n || h->T > p->max_T || (!ec && h->T * h->k > p->max_T * p->max_k))
        return moe_error(MOE_ERR_ARG, "cuda backend: plan of %lld assignments, T = %lld, k = %lld does not fit",
                         (long long)h->n, (long long)h->T, (long long)h->k);
    const int64_t T = h->T, n = h->n, E = h->E;
    /* the token index on the host: a counting sort of the rows by token */
    int64_t *off = (int64_t *)calloc((size_t)T + 1, sizeof *off), *fill = (int64_t *)malloc((size_t)(T + 1) * sizeof *fill);
    int64_t *row = (int64_t *)malloc((size_t)(n ? n : 1) * sizeof *row);
    if (!off || !fill || !row) {
        free(off), free(fill), free(row);
        return moe_error(MOE_ERR_NOMEM, "cuda backend: out of host memory for a plan upload");
    }
    for (int64_t i = 0; i < n; i++)
        off[h->token[i] + 1]++;
    for (int64_t t = 0; t < T; t++)
        off[t + 1] += off[t];
    for (int64_t t = 0; t <= T; t++)
        fill[t] = off[t];
    for (int64_t i = 0; i < n; i++)
        row[fill[h->token[i]]++] = i;
    const int32_t nd[2] = {(int32_t)n, (int32_t)h->dropped};
    int ok = put(b, p->token, h->token, n) && put(b, p->expert, h->expert, n) && put(b, p->weight, h->weight, n) &&
             put(b, p->src, h->src, n) && put(b, p->choice, h->choice, n) && put(b, p->offsets, h->offsets, E + 1) &&
             put(b, p->count, h->count, E) && put(b, p->selected, h->selected, E) && put(b, p->nd, nd, 2) &&
             put(b, p->tok_off, off, T + 1) && put(b, p->tok_row, row, n);
    if (ok && !ec)
        ok = put(b, p->choice_expert, h->choice_expert, T * h->k) && put(b, p->choice_weight, h->choice_weight, T * h->k) &&
             put(b, p->choice_kept, h->choice_kept, T * h->k);
    free(off), free(fill), free(row);
    if (!ok)
        return moe_backend_take_error(b);
    p->T = T;
    p->k = h->k;
    p->capacity = h->capacity;
    p->ec = ec;
    p->rows_bound = n > 0 ? n : 1;
    return segments_from_host(p, h->offsets, h->count);
}

static moe_status plan_set_segments(moe_backend *b, moe_bplan *p, const int64_t *begin, const int64_t *rows)
{
    int64_t n = 0, end = 1;
    for (int64_t e = 0; e < p->E; e++) {
        if (begin[e] < 0 || rows[e] < 0 || rows[e] > p->cap_n - n || begin[e] + rows[e] > INT32_MAX)
            return moe_error(MOE_ERR_ARG, "cuda backend: expert %lld's %lld rows at %lld do not fit a plan of %lld",
                             (long long)e, (long long)rows[e], (long long)begin[e], (long long)p->cap_n);
        n += rows[e];
        end = begin[e] + rows[e] > end ? begin[e] + rows[e] : end;
    }
    int32_t *off = (int32_t *)malloc((size_t)(p->E + 1) * sizeof *off);
    if (!off)
        return moe_error(MOE_ERR_NOMEM, "cuda backend: out of host memory");
    for (int64_t e = 0; e < p->E; e++)
        off[e] = (int32_t)begin[e];
    off[p->E] = -1; /* segments need not be contiguous: there is no end offset */
    const int32_t nd[2] = {(int32_t)n, 0};
    const int ok = moe_cu_copy_in(b, "plan_set_segments", p->offsets, off, (size_t)(p->E + 1) * sizeof *off) &&
                   put(b, p->count, rows, p->E) && put(b, p->selected, rows, p->E) && put(b, p->nd, nd, 2);
    if (!ok)
        return moe_backend_take_error(b);
    p->rows_bound = end;
    return segments_from_host(p, begin, rows);
}

__global__ void k_plan_counts(dptr out, const int32_t *count, const int32_t *selected, const int32_t *nd, int64_t E)
{
    CU_LOOP(e, E)
    {
        stf(out, e, (float)count[e]);
        stf(out, E + e, (float)selected[e]);
        if (e == 0) {
            stf(out, 2 * E, (float)nd[0]);
            stf(out, 2 * E + 1, (float)nd[1]);
        }
    }
}

static void plan_counts(moe_backend *b, moe_tensor out, const moe_bplan *p)
{
    k_plan_counts<<<moe_cu_blocks(p->E, 128), 128, 0, moe_cu_stream(b)>>>(DP(out), p->count, p->selected, p->nd,
                                                                          p->E);
    moe_cu_check(b, "plan_counts");
}

/* blockIdx.y = expert: its segment's rows × width */
__global__ void k_plan_fill(dptr t, float v, const int32_t *begin, const int32_t *count, int64_t width)
{
    const int64_t e = blockIdx.y, n = (int64_t)count[e] * width, o = (int64_t)begin[e] * width;
    CU_LOOP(i, n)
    stf(t, o + i, v);
}

static void plan_fill(moe_backend *b, moe_tensor t, double v, const moe_bplan *p, int64_t width)
{
    if (width <= 0 || p->E <= 0)
        return;
    const unsigned per = moe_cu_blocks(p->rows_bound * width / p->E + 1, 256);
    dim3 grid(per < 64 ? per : 64, (unsigned)p->E);
    k_plan_fill<<<grid, 256, 0, moe_cu_stream(b)>>>(DP(t), (float)v, p->offsets, p->count, width);
    moe_cu_check(b, "plan_fill");
}

__global__ void k_bias_update(dptr bias, dptr counts, double rate, int64_t E)
{
    if (threadIdx.x || blockIdx.x)
        return;
    double mean = 0;
    for (int64_t e = 0; e < E; e++)
        mean += ldf(counts, e);
    mean /= (double)E;
    for (int64_t e = 0; e < E; e++) {
        const double err = mean - ldf(counts, e);
        stf(bias, e, (float)((double)ldf(bias, e) + rate * (double)((err > 0) - (err < 0))));
    }
}

static void bias_update(moe_backend *b, moe_tensor bias, moe_tensor counts, double rate, int64_t E)
{
    k_bias_update<<<1, 1, 0, moe_cu_stream(b)>>>(DP(bias), DP(counts), rate, E);
    moe_cu_check(b, "bias_update");
}

void moe_cu_plan_ops(moe_backend *b)
{
    b->plan_create = plan_create;
    b->plan_free = plan_free;
    b->plan_download = plan_download;
    b->plan_upload = plan_upload;
    b->plan_set_segments = plan_set_segments;
    b->plan_counts = plan_counts;
    b->plan_fill = plan_fill;
    b->bias_update = bias_update;
}
