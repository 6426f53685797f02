/*
 * Selection on the device: scores -> routing plan, with exactly ref/select.c's rules (read
 * its header): ties to the lower expert (token for expert choice), renormalisation before
 * dropping, GShard's policies with the same Philox draws, capacity in (choice rank, token)
 * order or by weight, Sinkhorn with a fixed iteration count, expert choice. How, on a GPU,
 * without a host round trip:
 *  - each token picks its experts in one thread (repeated argmax: k and E are small);
 *  - capacity: a stable radix sort of the candidates by (expert, policy key) in the
 *    policy's order gives each candidate its rank within its expert; rank < C is kept;
 *  - the layout: a stable radix sort of the kept choices by expert in token-major order
 *    puts row r where the cpu's counting sort puts it; offsets by a scan of the counts;
 *  - the inverse index token -> rows: a stable sort of the rows by token, then a binary
 *    search per token;
 *  - expert choice: one sort by (expert, score descending), the first C of each expert
 *    marked, rows numbered by a scan of the marks in (expert, token) order.
 * Radix sorts and scans are CUB's (stable, deterministic); counts use integer atomics,
 * which are exact in any order. All workspace is allocated with the plan.
 */
#include <cstdlib>
#include <cstring>

#include "gpu/cuda.h"
#include "gpu/rng.cuh"


static int is_token_choice(moe_router_kind r)
{
    return r == MOE_ROUTER_TOPK || r == MOE_ROUTER_NOISY_TOPK || r == MOE_ROUTER_SINKHORN;
}

/* ---- token choice ---------------------------------------------------------------------------------- */

/* float -> a key whose unsigned order is the float's descending order (src/cpu/select.c) */
__device__ __forceinline__ uint32_t desc_key(float v)
{
    uint32_t u = __float_as_uint(v);
    u = (u & 0x80000000u) ? ~u : (u | 0x80000000u);
    return ~u;
}

/* top k of row sel (value descending, ties to the lower index) by repeated argmax */
__device__ void topk_row(int32_t *idx, dptr sel, int64_t o, const float *bias, int64_t E, int64_t k)
{
    for (int64_t j = 0; j < k; j++) {
        int64_t best = -1;
        float bv = 0.0f;
        for (int64_t e = 0; e < E; e++) {
            bool taken = false;
            for (int64_t q = 0; q < j; q++)
                taken |= idx[q] == e;
            const float v = ldf(sel, o + e) + (bias ? bias[e] : 0.0f);
            if (!taken && (best < 0 || v > bv)) {
                best = e;
                bv = v;
            }
        }
        idx[j] = (int32_t)best;
    }
}

struct choose_args {
    dptr s, h, sel; /* scores, logits, selection values (s, or Sinkhorn's balanced matrix) */
    const float *bias;
    const int32_t *ids;
    int32_t *ce;
    float *cw;
    uint8_t *kept;
    int64_t T, E, k;
    int hash, renorm, policy; /* policy: moe_second_policy (ALL for Sinkhorn) */
    uint64_t seed;
    uint32_t gumbel, random2, step, token0;
};

/* token t's choices into the [T, k] arrays, before capacity (ref's choose_token) */
__global__ void k_choose(choose_args a)
{
    CU_LOOP(t, a.T)
    {
        const int64_t E = a.E, k = a.k, o = t * E;
        if (a.hash) {
            const uint32_t id = a.ids ? (uint32_t)a.ids[t] : a.token0 + (uint32_t)t;
            a.ce[t] = (int32_t)(rng_hash_token(id) % (unsigned long long)E);
            a.cw[t] = 1.0f;
            a.kept[t] = 1;
            continue;
        }
        int32_t idx[MOE_CU_MAX_K];
        if (a.policy == MOE_SECOND_SAMPLING) {
            topk_row(idx, a.sel, o, a.bias, E, 1);
            int64_t best = -1;
            double bv = 0;
            for (int64_t e = 0; e < E; e++) {
                if (e == idx[0])
                    continue;
                const double u = rng_uniform(a.seed, a.gumbel, a.step, a.token0 + (uint32_t)t, (uint32_t)e);
                const double v = (double)ldf(a.h, o + e) - log(-log(u));
                if (best < 0 || v > bv) {
                    best = e;
                    bv = v;
                }
            }
            idx[1] = (int32_t)best;
        } else {
            topk_row(idx, a.sel, o, a.bias, E, k);
        }
        float S = 0.0f;
        if (a.renorm) {
            for (int64_t j = 0; j < k; j++)
                S += ldf(a.s, o + idx[j]);
            if (!(S > 0.0f))
                S = 0.0f;
        }
        for (int64_t j = 0; j < k; j++) {
            const float sv = ldf(a.s, o + idx[j]);
            a.ce[t * k + j] = idx[j];
            a.cw[t * k + j] = S > 0.0f ? sv / S : sv;
            a.kept[t * k + j] = 1;
        }
        if (a.policy == MOE_SECOND_RANDOM) {
            const double u = rng_uniform(a.seed, a.random2, a.step, a.token0 + (uint32_t)t, 0);
            if (!(2.0 * (double)a.cw[t * k + 1] > u)) {
                a.ce[t * k + 1] = -1;
                a.cw[t * k + 1] = 0.0f;
                a.kept[t * k + 1] = 0;
            }
        }
    }
}

__global__ void k_histogram(int32_t *selected, const int32_t *ce, int64_t n)
{
    CU_LOOP(i, n)
    if (ce[i] >= 0)
        atomicAdd(&selected[ce[i]], 1); /* integers: exact in any order */
}

/* candidates in (choice rank, token) order: key (expert, [weight descending]), value t·k + j */
__global__ void k_cap_keys(unsigned long long *keys, int32_t *vals, const int32_t *ce, const float *cw, int64_t T,
                           int64_t E, int64_t k, int by_weight)
{
    CU_LOOP(q, T * k)
    {
        const int64_t j = q / T, t = q % T, i = t * k + j;
        const int32_t e = ce[i];
        keys[q] = e < 0 ? (unsigned long long)E << 32
                        : ((unsigned long long)e << 32) | (by_weight ? desc_key(cw[i]) : 0u);
        vals[q] = (int32_t)i;
    }
}

/* single thread: counts after capacity C (0: dropless), the expert starts, offsets, n, dropped */
__global__ void k_counts(int32_t *count, int32_t *start, int32_t *offsets, int32_t *nd, const int32_t *selected,
                         int64_t E, int64_t C)
{
    if (threadIdx.x || blockIdx.x)
        return;
    int32_t acc = 0, sel = 0, dropped = 0;
    for (int64_t e = 0; e < E; e++) {
        const int32_t s = selected[e], c = C > 0 && s > C ? (int32_t)C : s;
        start[e] = sel;
        sel += s;
        count[e] = c;
        offsets[e] = acc;
        acc += c;
        dropped += s - c;
    }
    start[E] = sel;
    offsets[E] = acc;
    nd[0] = acc;
    nd[1] = dropped;
}

/* sorted candidate q: rank within its expert = q − start[e]; past the capacity it is dropped */
__global__ void k_cap_drop(uint8_t *kept, const unsigned long long *keys, const int32_t *vals, const int32_t *start,
                           int64_t n, int64_t E, int64_t C)
{
    CU_LOOP(q, n)
    {
        const int64_t e = (int64_t)(keys[q] >> 32);
        if (e < E && q - start[e] >= C)
            kept[vals[q]] = 0;
    }
}

/* token-major choices: key = expert when kept, else E (last) */
__global__ void k_layout_keys(unsigned long long *keys, int32_t *vals, const int32_t *ce, const uint8_t *kept,
                              int64_t n, int64_t E)
{
    CU_LOOP(i, n)
    {
        keys[i] = kept[i] ? (unsigned long long)ce[i] : (unsigned long long)E;
        vals[i] = (int32_t)i;
    }
}

__global__ void k_layout_rows(moe_bplan p, const unsigned long long *keys, const int32_t *vals, int64_t n, int64_t E,
                              int64_t k)
{
    CU_LOOP(r, n)
    {
        if (r >= p.nd[0])
            continue;
        const int32_t i = vals[r], e = (int32_t)keys[r], t = (int32_t)(i / k);
        p.token[r] = t;
        p.expert[r] = e;
        p.weight[r] = p.choice_weight[i];
        p.src[r] = (int32_t)(t * E + e);
        p.choice[r] = i;
    }
}

/* ---- the token index: rows sorted by token (stably), then a lower bound per token ---------------- */

__global__ void k_tok_keys(unsigned long long *keys, int32_t *vals, const int32_t *token, const int32_t *nd,
                           int64_t R, int64_t T)
{
    CU_LOOP(r, R)
    {
        keys[r] = r < nd[0] ? (unsigned long long)token[r] : (unsigned long long)T;
        vals[r] = (int32_t)r;
    }
}

__global__ void k_tok_index(int32_t *tok_off, int32_t *tok_row, const unsigned long long *keys, const int32_t *vals,
                            int64_t R, int64_t T)
{
    CU_LOOP(i, R)
    tok_row[i] = vals[i];
    CU_LOOP(t, T + 1)
    {
        int64_t lo = 0, hi = R; /* first position whose key >= t */
        while (lo < hi) {
            const int64_t mid = (lo + hi) / 2;
            if (keys[mid] < (unsigned long long)t)
                lo = mid + 1;
            else
                hi = mid;
        }
        tok_off[t] = (int32_t)lo;
    }
}

static int build_token_index(moe_backend *b, moe_bplan *p, int64_t R)
{
    cudaStream_t s = moe_cu_stream(b);
    k_tok_keys<<<moe_cu_blocks(R, 256), 256, 0, s>>>(p->keys_in, p->vals_in, p->token, p->nd, R, p->T);
    return moe_cu_check(b, "route") &&
           moe_cu_sort(b, "route", p->cub_tmp, p->cub_bytes, p->keys_in, p->keys_out, p->vals_in, p->vals_out, R, 0,
                       moe_cu_bits(p->T)) &&
           (k_tok_index<<<moe_cu_blocks(R > p->T + 1 ? R : p->T + 1, 256), 256, 0, s>>>(p->tok_off, p->tok_row,
                                                                                          p->keys_out, p->vals_out, R,
                                                                                          p->T),
            moe_cu_check(b, "route"));
}

/* capacity and layout of the [T, k] choices (ref's token_choice_plan) */
static void token_choice_plan(moe_backend *b, moe_bplan *p, moe_drop_policy drop, int64_t C)
{
    cudaStream_t s = moe_cu_stream(b);
    const int64_t T = p->T, E = p->E, k = p->k, n = T * k;
    if (!moe_cu_ok(b, "route", cudaMemsetAsync(p->selected, 0, (size_t)E * sizeof(int32_t), s), "memset"))
        return;
    k_histogram<<<moe_cu_blocks(n, 256), 256, 0, s>>>(p->selected, p->choice_expert, n);
    k_counts<<<1, 1, 0, s>>>(p->count, p->start, p->offsets, p->nd, p->selected, E, C);
    if (!moe_cu_check(b, "route"))
        return;
    if (C > 0) {
        const int by_weight = drop == MOE_DROP_PROBABILITY;
        k_cap_keys<<<moe_cu_blocks(n, 256), 256, 0, s>>>(p->keys_in, p->vals_in, p->choice_expert, p->choice_weight,
                                                         T, E, k, by_weight);
        if (!moe_cu_check(b, "route") ||
            !moe_cu_sort(b, "route", p->cub_tmp, p->cub_bytes, p->keys_in, p->keys_out, p->vals_in, p->vals_out, n,
                         by_weight ? 0 : 32, 32 + moe_cu_bits(E)))
            return;
        k_cap_drop<<<moe_cu_blocks(n, 256), 256, 0, s>>>(p->choice_kept, p->keys_out, p->vals_out, p->start, n, E, C);
    }
    k_layout_keys<<<moe_cu_blocks(n, 256), 256, 0, s>>>(p->keys_in, p->vals_in, p->choice_expert, p->choice_kept, n,
                                                        E);
    if (!moe_cu_check(b, "route") || !moe_cu_sort(b, "route", p->cub_tmp, p->cub_bytes, p->keys_in, p->keys_out,
                                                   p->vals_in, p->vals_out, n, 0, moe_cu_bits(E)))
        return;
    k_layout_rows<<<moe_cu_blocks(n, 256), 256, 0, s>>>(*p, p->keys_out, p->vals_out, n, E, k);
    if (moe_cu_check(b, "route"))
        build_token_index(b, p, n);
}

/* ---- Sinkhorn (Megatron's, as ref/select.c): fp32 matrix, double scalings ------------------------- */

__global__ void k_max(float *mx, dptr h, int64_t n)
{
    __shared__ float sh[1024];
    float m = -INFINITY;
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x)
        m = fmaxf(m, ldf(h, i));
    sh[threadIdx.x] = m;
    __syncthreads();
    for (unsigned s = blockDim.x / 2; s > 0; s >>= 1) {
        if (threadIdx.x < s)
            sh[threadIdx.x] = fmaxf(sh[threadIdx.x], sh[threadIdx.x + s]);
        __syncthreads();
    }
    if (threadIdx.x == 0)
        *mx = sh[0];
}

__global__ void k_sk_init(float *bal, double *d0, double *d1, dptr h, const float *mx, int64_t T, int64_t E)
{
    CU_LOOP(i, T * E)
    {
        bal[i] = expf(ldf(h, i) - *mx);
        if (i < T)
            d0[i] = 1.0;
        if (i < E)
            d1[i] = 1.0;
    }
}

__global__ void k_sk_rows(double *d0, const double *d1, const float *bal, int64_t T, int64_t E)
{
    CU_LOOP(t, T)
    {
        double acc = 0;
        for (int64_t e = 0; e < E; e++)
            acc += d1[e] * bal[t * E + e];
        d0[t] = (1.0 / (double)T) * 1.0 / (acc + 1e-8);
    }
}

__global__ void k_sk_cols(double *d1, const double *d0, const float *bal, int64_t T, int64_t E)
{
    __shared__ double sh[256];
    const int64_t e = blockIdx.x;
    double acc = 0;
    for (int64_t t = threadIdx.x; t < T; t += blockDim.x)
        acc += d0[t] * bal[t * E + e];
    acc = block_sum(acc, sh);
    if (threadIdx.x == 0)
        d1[e] = (1.0 / (double)E) * 1.0 / (acc + 1e-8);
}

__global__ void k_sk_final(float *bal, const double *d0, const double *d1, int64_t T, int64_t E)
{
    CU_LOOP(i, T * E)
    bal[i] = (float)(d1[i % E] * bal[i] * d0[i / E]);
}

static int sinkhorn(moe_backend *b, moe_bplan *p, moe_tensor h, int64_t iters, int64_t T, int64_t E)
{
    cudaStream_t s = moe_cu_stream(b);
    k_max<<<1, 1024, 0, s>>>(p->mx, DP(h), T * E);
    k_sk_init<<<moe_cu_blocks(T * E, 256), 256, 0, s>>>(p->bal, p->d0, p->d1, DP(h), p->mx, T, E);
    for (int64_t it = 0; it < iters; it++) {
        k_sk_rows<<<moe_cu_blocks(T, 128), 128, 0, s>>>(p->d0, p->d1, p->bal, T, E);
        k_sk_cols<<<(unsigned)E, 256, 0, s>>>(p->d1, p->d0, p->bal, T, E);
    }
    k_sk_final<<<moe_cu_blocks(T * E, 256), 256, 0, s>>>(p->bal, p->d0, p->d1, T, E);
    return moe_cu_check(b, "route");
}

/* ---- expert choice ---------------------------------------------------------------------------------- */

__global__ void k_ec_keys(unsigned long long *keys, int32_t *vals, int32_t *flags, dptr s, int64_t T, int64_t E)
{
    CU_LOOP(q, T * E)
    {
        const int64_t e = q / T, t = q % T;
        keys[q] = ((unsigned long long)e << 32) | desc_key(ldf(s, t * E + e));
        vals[q] = (int32_t)t;
        flags[q] = 0;
    }
}

__global__ void k_ec_mark(int32_t *flags, const unsigned long long *keys, const int32_t *vals, int64_t T, int64_t C,
                          int64_t n)
{
    CU_LOOP(q, n)
    {
        const int64_t e = (int64_t)(keys[q] >> 32);
        if (q - e * T < C)
            flags[e * T + vals[q]] = 1;
    }
}

__global__ void k_ec_rows(moe_bplan p, const int32_t *flags, const int32_t *pos, dptr s, int64_t T, int64_t E,
                          int64_t C)
{
    CU_LOOP(q, T * E)
    {
        if (!flags[q])
            continue;
        const int64_t e = q / T, t = q % T, r = pos[q];
        p.token[r] = (int32_t)t;
        p.expert[r] = (int32_t)e;
        p.weight[r] = ldf(s, t * E + e);
        p.src[r] = (int32_t)(t * E + e);
        p.choice[r] = -1;
    }
    if (blockIdx.x == 0 && threadIdx.x == 0) {
        p.offsets[E] = (int32_t)(E * C);
        p.nd[0] = (int32_t)(E * C);
        p.nd[1] = 0;
    }
}

__global__ void k_ec_experts(moe_bplan p, int64_t E, int64_t C)
{
    CU_LOOP(e, E)
    {
        p.count[e] = p.selected[e] = (int32_t)C;
        p.offsets[e] = (int32_t)(e * C);
    }
}

static void route_expert_choice(moe_backend *b, moe_bplan *p, moe_tensor s, int64_t C)
{
    cudaStream_t st = moe_cu_stream(b);
    const int64_t T = p->T, E = p->E, n = T * E;
    k_ec_keys<<<moe_cu_blocks(n, 256), 256, 0, st>>>(p->keys_in, p->vals_in, p->flags, DP(s), T, E);
    if (!moe_cu_check(b, "route") || !moe_cu_sort(b, "route", p->cub_tmp, p->cub_bytes, p->keys_in, p->keys_out,
                                                   p->vals_in, p->vals_out, n, 0, 32 + moe_cu_bits(E)))
        return;
    k_ec_mark<<<moe_cu_blocks(n, 256), 256, 0, st>>>(p->flags, p->keys_out, p->vals_out, T, C, n);
    if (!moe_cu_check(b, "route") || !moe_cu_scan(b, "route", p->cub_tmp, p->cub_bytes, p->flags, p->pos, n))
        return;
    k_ec_rows<<<moe_cu_blocks(n, 256), 256, 0, st>>>(*p, p->flags, p->pos, DP(s), T, E, C);
    k_ec_experts<<<moe_cu_blocks(E, 128), 128, 0, st>>>(*p, E, C);
    if (moe_cu_check(b, "route"))
        build_token_index(b, p, E * C);
}

/* ---- route ------------------------------------------------------------------------------------------- */

#define FAIL(...)                                                                                                   \
    do {                                                                                                            \
        moe_backend_fail(b, "route", MOE_ERR_ARG, __VA_ARGS__);                                                     \
        return;                                                                                                     \
    } while (0)

static void route_plan(moe_backend *b, moe_bplan *p, moe_tensor s, moe_tensor h, moe_tensor *bias,
                       moe_tensor *token_ids, const moe_layer_config *c, moe_key key, int64_t T)
{
    const int64_t E = c->n_experts;
    if (E != p->E)
        FAIL("config has n_experts = %lld but the plan was made for E = %lld", (long long)E, (long long)p->E);
    if (T <= 0 || T > p->max_T)
        FAIL("T = %lld tokens outside [1, %lld] (the plan's size)", (long long)T, (long long)p->max_T);
    const int64_t C = moe_capacity(c, T);
    if (c->router == MOE_ROUTER_EXPERT_CHOICE) {
        if (E * C > p->cap_n || !p->flags)
            FAIL("plan holds %lld assignments, expert choice needs E·C = %lld·%lld", (long long)p->cap_n,
                 (long long)E, (long long)C);
        if (!s.buf)
            FAIL("expert choice needs the scores s");
        p->T = T;
        p->k = C;
        p->capacity = C;
        p->ec = 1;
        p->rows_bound = E * C > 0 ? E * C : 1;
        route_expert_choice(b, p, s, C);
        return;
    }
    const int64_t k = c->router == MOE_ROUTER_HASH ? 1 : c->top_k;
    if (k < 1 || k > E || k > MOE_CU_MAX_K)
        FAIL("top_k = %lld outside [1, min(n_experts = %lld, %d)]", (long long)k, (long long)E, MOE_CU_MAX_K);
    if (T * k > p->max_T * p->max_k)
        FAIL("plan's choice arrays hold %lld entries, T·k = %lld·%lld needs more", (long long)(p->max_T * p->max_k),
             (long long)T, (long long)k);
    if (c->router != MOE_ROUTER_HASH && c->router != MOE_ROUTER_SINKHORN && c->second_policy != MOE_SECOND_ALL &&
        k != 2)
        FAIL("second_expert_policy needs top_k = 2 (got %lld)", (long long)k);
    if (c->router == MOE_ROUTER_SINKHORN && (c->sinkhorn_iters < 1 || !p->bal))
        FAIL("sinkhorn routing needs sinkhorn_iters >= 1 and a plan made for it");
    if (c->router != MOE_ROUTER_HASH &&
        (!s.buf || (!h.buf && (c->router == MOE_ROUTER_SINKHORN || c->second_policy == MOE_SECOND_SAMPLING))))
        FAIL("%s routing needs the scores s (and the logits h for Sinkhorn or sampling)", moe_router_name(c->router));
    if (bias && bias->buf->type != MOE_F32)
        FAIL("the bias must be f32 (got %s)", moe_dtype_name(bias->buf->type));
    p->T = T;
    p->k = k;
    p->capacity = C;
    p->ec = 0;
    p->rows_bound = T * k;
    choose_args a;
    memset(&a, 0, sizeof a);
    a.s = DP(s);
    a.h = DP(h);
    a.sel = a.s;
    a.bias = bias ? (const float *)DP(*bias).p : nullptr;
    a.ids = token_ids ? I32P(*token_ids) : nullptr;
    a.ce = p->choice_expert;
    a.cw = p->choice_weight;
    a.kept = p->choice_kept;
    a.T = T;
    a.E = E;
    a.k = k;
    a.hash = c->router == MOE_ROUTER_HASH;
    a.renorm = c->renormalize;
    a.policy = c->router == MOE_ROUTER_SINKHORN ? MOE_SECOND_ALL : c->second_policy;
    a.seed = c->seed;
    a.gumbel = moe_rng_stream(MOE_RNG_GUMBEL, c->layer, key);
    a.random2 = moe_rng_stream(MOE_RNG_RANDOM2, c->layer, key);
    a.step = (uint32_t)key.step;
    a.token0 = key.token0;
    if (c->router == MOE_ROUTER_SINKHORN) {
        if (!sinkhorn(b, p, h, c->sinkhorn_iters, T, E))
            return;
        a.sel = dptr{p->bal, DT_F32};
        a.bias = nullptr;
    }
    k_choose<<<moe_cu_blocks(T, 128), 128, 0, moe_cu_stream(b)>>>(a);
    if (moe_cu_check(b, "route"))
        token_choice_plan(b, p, c->router == MOE_ROUTER_HASH ? MOE_DROP_POSITION : c->drop_policy, C);
}

#undef FAIL

/* ---- route backward (ref's moe_ref_route_backward in fp32: see the derivation there) ---------------- */

__global__ void k_rb_init(float *g, dptr dchoice, int64_t n)
{
    CU_LOOP(i, n)
    g[i] = dchoice.p ? ldf(dchoice, i) : 0.0f;
}

/* each choice index appears once in the plan: no two rows write one g */
__global__ void k_rb_scatter(float *g, dptr dweight, const int32_t *choice, const int32_t *nd, int64_t R)
{
    CU_LOOP(r, R)
    if (r < nd[0])
        g[choice[r]] += ldf(dweight, r);
}

__device__ int64_t second_of_top2(dptr s, int64_t o, const float *bias, int64_t E)
{
    int64_t a = -1, bb = -1;
    float va = 0, vb = 0;
    for (int64_t e = 0; e < E; e++) {
        const float v = ldf(s, o + e) + (bias ? bias[e] : 0.0f);
        if (a < 0 || v > va) {
            bb = a;
            vb = va;
            a = e;
            va = v;
        } else if (bb < 0 || v > vb) {
            bb = e;
            vb = v;
        }
    }
    return bb;
}

__global__ void k_rb_tokens(dptr ds, const float *g, dptr s, const float *bias, const int32_t *ce, const float *cw,
                            int64_t T, int64_t E, int64_t k, int renorm, int random2)
{
    CU_LOOP(t, T)
    {
        const int64_t o = t * E;
        const float *gt = g + t * k;
        const int32_t *c = ce + t * k;
        const int64_t skipped = random2 && c[1] < 0 ? second_of_top2(s, o, bias, E) : -1;
        float S = 0.0f;
        if (renorm) {
            for (int64_t j = 0; j < k; j++)
                S += ldf(s, o + (c[j] >= 0 ? c[j] : skipped));
            if (!(S > 0.0f))
                S = 0.0f;
        }
        if (S == 0.0f) {
            for (int64_t j = 0; j < k; j++)
                if (c[j] >= 0)
                    stf(ds, o + c[j], ldf(ds, o + c[j]) + gt[j]);
            continue;
        }
        float gw = 0.0f;
        for (int64_t j = 0; j < k; j++)
            if (c[j] >= 0)
                gw += gt[j] * cw[t * k + j];
        for (int64_t j = 0; j < k; j++) {
            if (c[j] >= 0)
                stf(ds, o + c[j], ldf(ds, o + c[j]) + (gt[j] - gw) / S);
            else
                stf(ds, o + skipped, ldf(ds, o + skipped) - gw / S);
        }
    }
}

/* expert choice: (t, e) appears once per plan, so ds[src] += dweight is a scatter without collisions */
__global__ void k_rb_ec(dptr ds, dptr dweight, const int32_t *src, const int32_t *nd, int64_t R)
{
    CU_LOOP(r, R)
    if (r < nd[0])
        stf(ds, src[r], ldf(ds, src[r]) + ldf(dweight, r));
}

/* The plan, then its segments on their way to the host (cuda.h) */
static void route(moe_backend *b, moe_bplan *p, moe_tensor s, moe_tensor h, moe_tensor *bias, moe_tensor *token_ids,
                  const moe_layer_config *c, moe_key key, int64_t T)
{
    p->seg_state = SEG_NONE;
    route_plan(b, p, s, h, bias, token_ids, c, key, T);
    if (!b->err)
        moe_cu_plan_segments_async(b, p);
}

size_t moe_cu_select_scratch(const moe_workload *w)
{
    return w->layer ? (size_t)(w->tokens * w->layer->top_k) * sizeof(float) + 256 : 0;
}

static void route_backward(moe_backend *b, moe_tensor ds, moe_tensor *dweight, moe_tensor *dchoice,
                           const moe_bplan *p, moe_tensor s, moe_tensor *bias, const moe_layer_config *c)
{
    const int64_t T = p->T, E = p->E, k = p->k;
    cudaStream_t st = moe_cu_stream(b);
    if (c->router == MOE_ROUTER_HASH)
        return;
    if (!is_token_choice(c->router)) {
        if (dweight)
            k_rb_ec<<<moe_cu_blocks(p->rows_bound, 256), 256, 0, st>>>(DP(ds), DP(*dweight), p->src, p->nd,
                                                                        p->rows_bound);
        moe_cu_check(b, "route_backward");
        return;
    }
    float *g = (float *)moe_cu_scratch(b, (size_t)(T * k) * sizeof(float), "route_backward");
    if (!g)
        return;
    k_rb_init<<<moe_cu_blocks(T * k, 256), 256, 0, st>>>(g, DPOPT(dchoice), T * k);
    if (dweight)
        k_rb_scatter<<<moe_cu_blocks(p->rows_bound, 256), 256, 0, st>>>(g, DP(*dweight), p->choice, p->nd,
                                                                         p->rows_bound);
    const int random2 = c->router != MOE_ROUTER_SINKHORN && c->second_policy == MOE_SECOND_RANDOM && k == 2;
    k_rb_tokens<<<moe_cu_blocks(T, 128), 128, 0, st>>>(DP(ds), g, DP(s), bias ? (const float *)DP(*bias).p : nullptr,
                                                       p->choice_expert, p->choice_weight, T, E, k, c->renormalize,
                                                       random2);
    moe_cu_check(b, "route_backward");
}

void moe_cu_select_ops(moe_backend *b)
{
    b->route = route;
    b->route_backward = route_backward;
}
