/*
 * Grouped GEMMs over plan segments (gemm.h): a tiled fp32 kernel for any type and shape,
 * and a tensor-core kernel for bf16 (mma.sync.m16n8k16 with ldmatrix fragments and a
 * three-stage cp.async pipeline; the layout follows CUTLASS's sm80 "multistage" GEMMs).
 *
 * The grid is sized from host-known bounds: ROWS launches rows_bound/BM + E row tiles
 * (Σ_e ceil(m_e/BM) never exceeds that) and each block finds its expert by scanning the
 * counts on the device; blocks past the last tile return. KSEG launches one z-slice per
 * expert (and part of its rows, kseg_split); an expert without rows returns at once (its
 * gradient is left as it is). Large bf16 experts go to cuBLAS instead (gemm_cublas.cu), the
 * rest on a Hopper GPU to its own kernel (gemm_sm90.cu).
 */
#include "gpu/gemm_epi.cuh"
#include "gpu/mma.cuh"

/* Expert and row tile of block blockIdx.x in ROWS mode; e = -1 past the last tile. */
__device__ __forceinline__ void rows_tile(const GA &g, int BM, int *s_info)
{
    if (threadIdx.x == 0) {
        long long tile = blockIdx.x, acc = 0;
        s_info[0] = -1;
        for (int x = 0; x < g.E; x++) {
            const long long t = ((long long)g.count[x] + BM - 1) / BM;
            if (tile < acc + t) {
                s_info[0] = x;
                s_info[1] = (int)(tile - acc);
                break;
            }
            acc += t;
        }
    }
    __syncthreads();
}

/* ---- the tiled fp32 kernel (any type, any shape) ------------------------------------------ */

#define S_BM 64
#define S_BN 64
#define S_BK 16

template <typename T, int MODE, int BT, int NB, int NK, int EPI>
__global__ void __launch_bounds__(256) simt_gemm(GA g)
{
    __shared__ float As[S_BK][S_BM + 1];
    __shared__ float Bs[NB][S_BK][S_BN + 1];
    __shared__ int s_info[2];
    const int tid = threadIdx.x, tx = tid & 15, ty = tid >> 4;
    int e;
    long long m0, Mx, Kx, row0;
    const long long n0 = (long long)blockIdx.y * S_BN;
    if (MODE == GM_ROWS) {
        rows_tile(g, S_BM, s_info);
        e = s_info[0];
        if (e < 0)
            return;
        m0 = (long long)s_info[1] * S_BM;
        Mx = g.count[e];
        Kx = g.K;
    } else {
        e = blockIdx.z;
        Kx = g.count[e];
        if (Kx == 0)
            return;
        m0 = (long long)blockIdx.x * S_BM;
        Mx = g.M;
    }
    row0 = g.begin[e];
    float acc[NB][4][4];
#pragma unroll
    for (int i = 0; i < NB; i++)
#pragma unroll
        for (int r = 0; r < 4; r++)
#pragma unroll
            for (int c = 0; c < 4; c++)
                acc[i][r][c] = 0.0f;
    for (int pp = 0; pp < NK; pp++) {
        const T *Ap = (const T *)(pp ? g.A1 : g.A0);
        for (long long k0 = 0; k0 < Kx; k0 += S_BK) {
#pragma unroll
            for (int q = 0; q < 4; q++) {
                const int idx = tid + 256 * q;
                int mm, kk;
                if (MODE == GM_ROWS) { /* A rows [rows, K]: k fastest */
                    mm = idx / S_BK;
                    kk = idx % S_BK;
                } else { /* A stored [rows, M]: m fastest */
                    kk = idx / S_BM;
                    mm = idx % S_BM;
                }
                const long long m = m0 + mm, k = k0 + kk;
                float v = 0.0f;
                if (m < Mx && k < Kx)
                    v = tof<T>(MODE == GM_ROWS ? Ap[(row0 + m) * g.lda + k] : Ap[(row0 + k) * g.lda + m]);
                As[kk][mm] = v;
            }
#pragma unroll
            for (int i = 0; i < NB; i++) {
                const T *Bp = (const T *)(NK == 2 ? (pp ? g.B1 : g.B0) : (i ? g.B1 : g.B0));
#pragma unroll
                for (int q = 0; q < 4; q++) {
                    const int idx = tid + 256 * q;
                    int nn, kk;
                    if (MODE == GM_ROWS && BT) {
                        nn = idx / S_BK;
                        kk = idx % S_BK;
                    } else {
                        kk = idx / S_BN;
                        nn = idx % S_BN;
                    }
                    const long long n = n0 + nn, k = k0 + kk;
                    float v = 0.0f;
                    if (n < g.N && k < Kx) {
                        if (MODE == GM_ROWS)
                            v = tof<T>(Bp[e * g.b_es + (BT ? n * g.ldb + k : k * g.ldb + n)]);
                        else
                            v = tof<T>(Bp[(row0 + k) * g.ldb + n]);
                    }
                    Bs[i][kk][nn] = v;
                }
            }
            __syncthreads();
#pragma unroll
            for (int kk = 0; kk < S_BK; kk++) {
                float a[4];
#pragma unroll
                for (int r = 0; r < 4; r++)
                    a[r] = As[kk][ty + 16 * r];
#pragma unroll
                for (int i = 0; i < NB; i++)
#pragma unroll
                    for (int c = 0; c < 4; c++) {
                        const float bv = Bs[i][kk][tx + 16 * c];
#pragma unroll
                        for (int r = 0; r < 4; r++)
                            acc[i][r][c] = fmaf(a[r], bv, acc[i][r][c]);
                    }
            }
            __syncthreads();
        }
    }
#pragma unroll
    for (int r = 0; r < 4; r++)
#pragma unroll
        for (int c = 0; c < 4; c++) {
            const long long m = m0 + ty + 16 * r, n = n0 + tx + 16 * c;
            if (m < Mx && n < g.N) {
                float v[NB];
#pragma unroll
                for (int i = 0; i < NB; i++)
                    v[i] = acc[i][r][c];
                const long long ci = MODE == GM_ROWS ? (row0 + m) * g.ldc + n : e * g.c_es + m * g.ldc + n;
                epilogue<T, EPI, NB>(g, ci, v);
            }
        }
}

/* ---- the bf16 tensor-core kernel ------------------------------------------------------------ */

#define T_BM 128
#define T_BK 32
#define T_ST 3
#define T_PAD 8

/* 128 × 128 outputs per block (two accumulators: 128 × 64 each), 2 × 4 warps of 64 × 32,
 * two blocks per SM, three stages deep. (128 × 256 blocks of 64 × 64 warp tiles, one per SM,
 * four stages, measured no faster on the H200: 34.6 against 32.7 ms for layer (b).) */
template <int NB> struct tc_shape {
    static constexpr int BN = NB == 2 ? 64 : 128;
    static constexpr int WN = BN / 4; /* a warp owns 64 × WN */
    static constexpr int NT = WN / 8; /* n8 tiles per warp */
};

/* elements of one stage: A (AT: [BK][BM], else [BM][BK]) and NB B tiles (BT: [BN][BK],
 * else [BK][BN]), rows padded by 8 elements (16 bytes) so ldmatrix meets no bank conflict */
template <int MODE, int BT, int NB> struct tc_smem {
    static constexpr int BN = tc_shape<NB>::BN;
    static constexpr int AS = MODE == GM_KSEG ? T_BK * (T_BM + T_PAD) : T_BM * (T_BK + T_PAD);
    static constexpr int BS = (MODE == GM_ROWS && BT) ? BN * (T_BK + T_PAD) : T_BK * (BN + T_PAD);
    static constexpr int BYTES = T_ST * (AS + NB * BS) * 2;
};

template <int MODE, int BT, int NB, int NK, int EPI>
__global__ void __launch_bounds__(256, 2) tc_gemm(GA g)
{
    constexpr int BN = tc_shape<NB>::BN, WN = tc_shape<NB>::WN, NT = tc_shape<NB>::NT;
    constexpr int AS = tc_smem<MODE, BT, NB>::AS, BS = tc_smem<MODE, BT, NB>::BS;
    constexpr bool AT = MODE == GM_KSEG, BTT = MODE == GM_ROWS && BT;
    extern __shared__ __align__(16) unsigned char smem_raw[];
    bf16 *sA = (bf16 *)smem_raw;
    bf16 *sB = sA + T_ST * AS;
    __shared__ int s_info[2];
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, wm = warp >> 2, wn = warp & 3;
    int e;
    long long m0, Mx, Kx, row0;
    const long long n0 = (long long)blockIdx.y * BN;
    if (MODE == GM_ROWS) {
        rows_tile(g, T_BM, s_info);
        e = s_info[0];
        if (e < 0)
            return;
        m0 = (long long)s_info[1] * T_BM;
        Mx = g.count[e];
        Kx = g.K;
    } else {
        e = blockIdx.z / g.split;
        Kx = g.count[e];
        if (Kx == 0)
            return;
        m0 = (long long)blockIdx.x * T_BM;
        Mx = g.M;
    }
    row0 = g.begin[e];
    /* KSEG split: part sp runs over the k tiles [kt0, kt1) of the expert's rows */
    const int sp = MODE == GM_KSEG ? (int)(blockIdx.z % g.split) : 0;
    const int kt_all = (int)((Kx + T_BK - 1) / T_BK);
    const int kt0 = (int)((long long)kt_all * sp / g.split), kt1 = (int)((long long)kt_all * (sp + 1) / g.split);
    const int ktiles = kt1 - kt0;
    const int total = NK * ktiles;

    auto load = [&](int slot, int t) {
        const int pp = NK == 2 ? t / ktiles : 0;
        const long long k0 = (long long)(kt0 + (NK == 2 ? t % ktiles : t)) * T_BK;
        const bf16 *Ap = (const bf16 *)(pp ? g.A1 : g.A0);
        bf16 *dA = sA + slot * AS;
#pragma unroll
        for (int q = 0; q < 2; q++) { /* BM·BK/8 = 512 chunks of 16 bytes */
            const int c = tid + 256 * q;
            int mm, kk;
            if (!AT) {
                mm = c >> 2;
                kk = (c & 3) * 8;
            } else {
                kk = c >> 4;
                mm = (c & 15) * 8;
            }
            const long long m = m0 + mm, k = k0 + kk;
            const bool ok = m < Mx && k < Kx;
            const bf16 *src = !AT ? Ap + (row0 + m) * g.lda + k : Ap + (row0 + k) * g.lda + m;
            bf16 *dst = !AT ? dA + mm * (T_BK + T_PAD) + kk : dA + kk * (T_BM + T_PAD) + mm;
            cp_async16(dst, ok ? src : Ap, ok);
        }
        constexpr int BCH = BN * T_BK / 8;
#pragma unroll
        for (int i = 0; i < NB; i++) {
            const bf16 *Bp = (const bf16 *)(NK == 2 ? (pp ? g.B1 : g.B0) : (i ? g.B1 : g.B0));
            bf16 *dB = sB + (slot * NB + i) * BS;
#pragma unroll
            for (int c = tid; c < BCH; c += 256) {
                int nn, kk;
                if (BTT) {
                    nn = c >> 2;
                    kk = (c & 3) * 8;
                } else {
                    kk = c / (BN / 8);
                    nn = (c % (BN / 8)) * 8;
                }
                const long long n = n0 + nn, k = k0 + kk;
                const bool ok = n < g.N && k < Kx;
                const bf16 *src = MODE == GM_ROWS ? Bp + e * g.b_es + (BTT ? n * g.ldb + k : k * g.ldb + n)
                                                  : Bp + (row0 + k) * g.ldb + n;
                bf16 *dst = BTT ? dB + nn * (T_BK + T_PAD) + kk : dB + kk * (BN + T_PAD) + nn;
                cp_async16(dst, ok ? src : Bp, ok);
            }
        }
    };

    float acc[NB][4][NT][4];
#pragma unroll
    for (int i = 0; i < NB; i++)
#pragma unroll
        for (int a = 0; a < 4; a++)
#pragma unroll
            for (int b = 0; b < NT; b++)
#pragma unroll
                for (int c = 0; c < 4; c++)
                    acc[i][a][b][c] = 0.0f;

#pragma unroll
    for (int s = 0; s < T_ST - 1; s++) {
        if (s < total)
            load(s, s);
        cp_async_commit();
    }
    for (int t = 0; t < total; t++) {
        cp_async_wait<T_ST - 2>();
        __syncthreads();
        {
            const int nt = t + T_ST - 1;
            if (nt < total)
                load(nt % T_ST, nt);
            cp_async_commit();
        }
        const bf16 *cA = sA + (t % T_ST) * AS;
        const bf16 *cB = sB + (t % T_ST) * NB * BS;
#pragma unroll
        for (int ks = 0; ks < T_BK; ks += 16) {
            uint32_t af[4][4];
#pragma unroll
            for (int mt = 0; mt < 4; mt++) {
                if (!AT) {
                    const int r = wm * 64 + mt * 16 + (lane & 15), cc = ks + (lane >> 4) * 8;
                    ldsm_x4(af[mt], cA + r * (T_BK + T_PAD) + cc);
                } else {
                    const int kk = ks + (lane & 7) + (lane >> 4) * 8, mm = wm * 64 + mt * 16 + ((lane >> 3) & 1) * 8;
                    ldsm_x4_t(af[mt], cA + kk * (T_BM + T_PAD) + mm);
                }
            }
#pragma unroll
            for (int i = 0; i < NB; i++) {
                const bf16 *bb = cB + i * BS;
                uint32_t bfr[NT][2];
#pragma unroll
                for (int np = 0; np < NT / 2; np++) {
                    uint32_t r[4];
                    if (BTT) {
                        const int nn = wn * WN + np * 16 + (lane & 7) + (lane >> 4) * 8;
                        const int kk = ks + ((lane >> 3) & 1) * 8;
                        ldsm_x4(r, bb + nn * (T_BK + T_PAD) + kk);
                    } else {
                        const int kk = ks + (lane & 7) + ((lane >> 3) & 1) * 8;
                        const int nn = wn * WN + np * 16 + (lane >> 4) * 8;
                        ldsm_x4_t(r, bb + kk * (BN + T_PAD) + nn);
                    }
                    bfr[2 * np][0] = r[0];
                    bfr[2 * np][1] = r[1];
                    bfr[2 * np + 1][0] = r[2];
                    bfr[2 * np + 1][1] = r[3];
                }
#pragma unroll
                for (int mt = 0; mt < 4; mt++)
#pragma unroll
                    for (int nt = 0; nt < NT; nt++)
                        mma_bf16(acc[i][mt][nt], af[mt], bfr[nt]);
            }
        }
    }
    cp_async_wait<0>();

#pragma unroll
    for (int mt = 0; mt < 4; mt++)
#pragma unroll
        for (int nt = 0; nt < NT; nt++)
#pragma unroll
            for (int h = 0; h < 2; h++) {
                const long long m = m0 + wm * 64 + mt * 16 + (lane >> 2) + h * 8;
                if (m >= Mx)
                    continue;
                const long long n = n0 + wn * WN + nt * 8 + (lane & 3) * 2; /* even; N % 8 == 0 */
                if (MODE == GM_KSEG && g.split > 1) { /* this part's sums, for kseg_add */
                    if (n < g.N)
#pragma unroll
                        for (int i = 0; i < NB; i++)
                            *(float2 *)(g.part + (((long long)i * g.split + sp) * g.E + e) * g.M * g.N + m * g.N + n) =
                                make_float2(acc[i][mt][nt][h * 2], acc[i][mt][nt][h * 2 + 1]);
                    continue;
                }
                if (g.pairs && n < g.N) {
                    float v0[NB], v1[NB];
#pragma unroll
                    for (int i = 0; i < NB; i++) {
                        v0[i] = acc[i][mt][nt][h * 2];
                        v1[i] = acc[i][mt][nt][h * 2 + 1];
                    }
                    const long long ci = MODE == GM_ROWS ? (row0 + m) * g.ldc + n : e * g.c_es + m * g.ldc + n;
                    epilogue2<EPI, NB>(g, ci, v0, v1);
                    continue;
                }
#pragma unroll
                for (int q = 0; q < 2; q++) {
                    const long long n = n0 + wn * WN + nt * 8 + (lane & 3) * 2 + q;
                    if (n >= g.N)
                        continue;
                    float v[NB];
#pragma unroll
                    for (int i = 0; i < NB; i++)
                        v[i] = acc[i][mt][nt][h * 2 + q];
                    const long long ci = MODE == GM_ROWS ? (row0 + m) * g.ldc + n : e * g.c_es + m * g.ldc + n;
                    epilogue<bf16, EPI, NB>(g, ci, v);
                }
            }
}

/* C_e += Σ_sp part[sp] for the experts with rows, the parts added in order (fp32), then the one
 * rounding of EPI_ACC; two neighbours a thread (N is even on the tensor-core path) */
__global__ void k_kseg_add(GA g, int nb)
{
    const long long MN = g.M * g.N;
    CU_LOOP(q, g.E * MN / 2)
    {
        const long long i = 2 * q, e = i / MN, mn = i % MN, m = mn / g.N, n = mn % g.N;
        if (g.count[e] == 0)
            continue;
        for (int j = 0; j < nb; j++) {
            float2 acc = make_float2(0.0f, 0.0f);
            for (int sp = 0; sp < g.split; sp++) {
                const float2 v = *(const float2 *)(g.part + (((long long)j * g.split + sp) * g.E + e) * MN + mn);
                acc.x += v.x;
                acc.y += v.y;
            }
            bf16 *C = (bf16 *)(j ? g.C1 : g.C0) + e * g.c_es + m * g.ldc + n;
            C[0] = fromf<bf16>(tof<bf16>(C[0]) + acc.x);
            C[1] = fromf<bf16>(tof<bf16>(C[1]) + acc.y);
        }
    }
}

/* ---- dispatch -------------------------------------------------------------------------- */

template <int MODE, int BT, int NB, int NK, int EPI>
static void launch(moe_backend *b, const GA &g, const moe_cu_group *grp, bool tc, moe_dtype t)
{
    cudaStream_t s = moe_cu_stream(b);
    if (tc) {
        const int bm = T_BM, bn = tc_shape<NB>::BN;
        dim3 grid(MODE == GM_ROWS ? (unsigned)(grp->rows_bound / bm + grp->E) : (unsigned)((g.M + bm - 1) / bm),
                  (unsigned)((g.N + bn - 1) / bn), MODE == GM_ROWS ? 1u : (unsigned)(grp->E * g.split));
        const int bytes = tc_smem<MODE, BT, NB>::BYTES;
        static bool attr = false; /* one per instantiation */
        if (!attr) {
            cudaFuncSetAttribute(tc_gemm<MODE, BT, NB, NK, EPI>, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
            attr = true;
        }
        tc_gemm<MODE, BT, NB, NK, EPI><<<grid, 256, bytes, s>>>(g);
        if (MODE == GM_KSEG && g.split > 1)
            k_kseg_add<<<moe_cu_blocks(g.E * g.M * g.N / 2, 256), 256, 0, s>>>(g, NB);
    } else {
        dim3 grid(MODE == GM_ROWS ? (unsigned)(grp->rows_bound / S_BM + grp->E) : (unsigned)((g.M + S_BM - 1) / S_BM),
                  (unsigned)((g.N + S_BN - 1) / S_BN), MODE == GM_ROWS ? 1u : (unsigned)grp->E);
        if (t == MOE_BF16)
            simt_gemm<bf16, MODE, BT, NB, NK, EPI><<<grid, 256, 0, s>>>(g);
        else
            simt_gemm<float, MODE, BT, NB, NK, EPI><<<grid, 256, 0, s>>>(g);
    }
}

/* The weight gradients (KSEG) reduce over each expert's rows. With few experts and small
 * weights their tiles fill the GPU's 2 · SMs block slots poorly (gpu-100m's dW2: 160 blocks
 * for 264 slots, one wave at 61%), so each expert's rows are cut into `split` parts, which
 * run as blocks of their own and leave fp32 sums that k_kseg_add adds in order: the same bits
 * on every run of one machine. The split minimises waves per unit of work, each further part
 * charged a tenth for the sums' round trip; parts keep >= 256 rows; the sums need scratch (a
 * workload without it runs unsplit). */
static int kseg_split(moe_backend *b, const char *op, const moe_cu_group *grp, const moe_cu_gemm_args *a,
                      float **part)
{
    const long long bn = a->nb == 2 ? tc_shape<2>::BN : tc_shape<1>::BN;
    const long long blocks = (a->M + T_BM - 1) / T_BM * ((a->N + bn - 1) / bn) * grp->E;
    const long long slots = 2LL * moe_cu(b)->sm_count;
    const double rows = (double)grp->rows_bound / (double)grp->E;
    int best = 1;
    double best_cost = 1e300;
    for (int sp = 1; sp <= MOE_CU_KSEG_SPLIT && (sp == 1 || rows / sp >= 256); sp++) {
        const double cost = (double)((blocks * sp + slots - 1) / slots) / sp + 0.1 * (sp - 1);
        if (cost < best_cost) {
            best = sp;
            best_cost = cost;
        }
    }
    const size_t need = (size_t)best * (size_t)(a->nb * grp->E * a->M * a->N) * sizeof(float);
    if (best == 1 || moe_cu(b)->cur != MOE_STREAM_COMPUTE || moe_cu(b)->side_cur >= 0 ||
        need > moe_cu(b)->scratch_bytes)
        return 1;
    *part = (float *)moe_cu_scratch(b, need, op);
    return *part ? best : 1;
}

void moe_cu_grouped_gemm(moe_backend *b, const char *op, const moe_cu_group *grp, const moe_cu_gemm_args *a,
                         moe_dtype t)
{
    if (grp->E <= 0 || a->N <= 0 || (a->mode == GM_KSEG && a->M <= 0) || grp->rows_bound <= 0)
        return;
    if (a->mode == GM_ROWS && a->K <= 0)
        return; /* not reached by the FFN (d, f >= 1) */
    if (t == MOE_BF16 && (moe_cu_grouped_cublas(b, op, grp, a) || moe_cu_grouped_sm90(b, op, grp, a))) {
        moe_cu_check(b, op);
        return;
    }
    GA g = ga_of(grp, a);
    /* tensor cores: bf16, and every 16-byte chunk a tile loads either wholly inside its
     * operand or wholly outside (dimensions, strides and pointers in multiples of 8) */
    const int64_t inner = a->mode == GM_ROWS ? a->K : a->M;
    bool tc = t == MOE_BF16 && moe_cu(b)->gemm != MOE_CU_GEMM_SIMT && inner % 8 == 0 && a->N % 8 == 0 && a->lda % 8 == 0 &&
              a->ldb % 8 == 0 && a->b_es % 8 == 0 && moe_cu_aligned16(a->A0) && moe_cu_aligned16(a->A1) && moe_cu_aligned16(a->B0) &&
              moe_cu_aligned16(a->B1);
    if (tc && a->mode == GM_KSEG)
        g.split = kseg_split(b, op, grp, a, &g.part);
    g.pairs = a->ldc % 2 == 0 && (a->mode == GM_ROWS || a->c_es % 2 == 0) && moe_cu_aligned4(a->C0) && moe_cu_aligned4(a->C1) &&
              moe_cu_aligned4(a->C2) && moe_cu_aligned4(a->H1) && moe_cu_aligned4(a->H3);
    const int key = a->mode * 10000 + a->bt * 1000 + a->nb * 100 + a->nk * 10 + a->epi;
    switch (key) {
    case GM_ROWS * 10000 + 0 * 1000 + 200 + 10 + EPI_FWD: launch<GM_ROWS, 0, 2, 1, EPI_FWD>(b, g, grp, tc, t); break;
    case GM_ROWS * 10000 + 0 * 1000 + 100 + 10 + EPI_FWD: launch<GM_ROWS, 0, 1, 1, EPI_FWD>(b, g, grp, tc, t); break;
    case GM_ROWS * 10000 + 0 * 1000 + 100 + 10 + EPI_STORE: launch<GM_ROWS, 0, 1, 1, EPI_STORE>(b, g, grp, tc, t); break;
    case GM_ROWS * 10000 + 1 * 1000 + 100 + 10 + EPI_BWD: launch<GM_ROWS, 1, 1, 1, EPI_BWD>(b, g, grp, tc, t); break;
    case GM_ROWS * 10000 + 1 * 1000 + 100 + 20 + EPI_ACC: launch<GM_ROWS, 1, 1, 2, EPI_ACC>(b, g, grp, tc, t); break;
    case GM_ROWS * 10000 + 1 * 1000 + 100 + 10 + EPI_ACC: launch<GM_ROWS, 1, 1, 1, EPI_ACC>(b, g, grp, tc, t); break;
    case GM_KSEG * 10000 + 0 * 1000 + 200 + 10 + EPI_ACC: launch<GM_KSEG, 0, 2, 1, EPI_ACC>(b, g, grp, tc, t); break;
    case GM_KSEG * 10000 + 0 * 1000 + 100 + 10 + EPI_ACC: launch<GM_KSEG, 0, 1, 1, EPI_ACC>(b, g, grp, tc, t); break;
    default:
        moe_backend_fail(b, op, MOE_ERR_ARG, "no grouped GEMM kernel for mode %d, bt %d, nb %d, nk %d, epilogue %d",
                         a->mode, a->bt, a->nb, a->nk, a->epi);
        return;
    }
    moe_cu_check(b, op);
}
