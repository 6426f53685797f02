/*
 * gemm_sm90.cu — the bf16 grouped GEMMs (gemm.h) on Hopper's own instructions: warpgroup
 * MMAs (wgmma, operands in shared memory) fed by the tensor memory accelerator (TMA), with
 * the segment sizes read on the device, persistent over every expert's tiles, and gemm.cu's
 * epilogues (the FFN's activation and its gradient included). Built for sm_90a only; on
 * other builds and devices moe_cu_grouped_sm90 declines and gemm.cu's kernels run.
 *
 * A block (one per SM) is three warpgroups. One thread of the first issues the TMA copies
 * of each 64-deep step of K into a ring of 192 KB of shared-memory stages (an mbarrier per
 * stage says "full", another "empty"); the other two each compute 64 rows of the block's
 * 128 × BN output tile (BN = 256 with one B operand where N allows, else 128 per operand)
 * with m64nBNk16 wgmma, one step in flight while the next is issued. The tiles run in a
 * fixed order (expert, row tile, column tile), each output summed by one block in one order
 * over K: the same bits on every run.
 *
 * Measured on the H200 (BENCHMARKS.md), each GEMM alone: 520–600 TFLOP/s on layer (b)'s
 * experts, 540–680 on layer (a)'s; cuBLAS, one GEMM per expert, runs (a)'s at ~790. What
 * it lacks against CUTLASS's: the epilogue does not overlap the next tile's MMAs (no
 * ping-pong of the two consumers) and it stores from registers rather than through TMA.
 *
 * Tiles in shared memory are 64 elements (128 bytes) wide rows with the 128-byte swizzle
 * that TMA writes and wgmma reads:
 *  - K-major operands (A rows in ROWS mode; B stored [N, K]): [128 rows][64 k];
 *  - MN-major operands (B stored [K, N]; both operands of KSEG, whose K is the rows):
 *    [64 k][64 m or n] blocks of 8 KB, one per 64 columns.
 * Past an operand's edge TMA fills zeros; rows of the next expert that a ROWS tile reads
 * only reach outputs it does not store, and in KSEG, whose K runs over the expert's rows,
 * the consumers zero them in shared memory before the last step's MMAs.
 */
#include "gpu/gemm_epi.cuh"

#include <cudaTypedefs.h>
#include <cstdio>
#include <cstdlib>
#include <cstring>

namespace {

constexpr int BM = 128, BK = 64;
constexpr int TILE_A = BM * BK * 2; /* bytes */

/* Tiles 128 × BN: BN = 128 with two B operands (two accumulators of 64 × 128 a warpgroup),
 * 128 or 256 with one */
template <int NB, int BN> struct sm90_cfg {
    static constexpr int TILE_B = BN * BK * 2;
    static constexpr int STAGE = TILE_A + NB * TILE_B;
    static constexpr int STAGES = 196608 / STAGE; /* 192 KB of stages: 6 or 4 */
    /* the stages (1024-byte aligned for the swizzle), their barriers, the tile starts */
    static constexpr int fixed = 1024 + STAGES * STAGE + 2 * STAGES * 8;
};

struct SP {
    CUtensorMap a[2], b[2]; /* A0, A1 (ROWS with two pairs); B0, B1 */
    GA g;
    int nt, bn;     /* column tiles and their width */
    int mt;         /* KSEG: row tiles of the weights (M) */
};

#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define SM90A_BODY 1

constexpr int HALF = 64 * BK * 2; /* bytes of a 64-row (or 64-column) half of a tile */

__device__ __forceinline__ uint32_t sa(const void *p)
{
    return (uint32_t)__cvta_generic_to_shared(p);
}

__device__ __forceinline__ void mbar_init(uint32_t bar, int n)
{
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(bar), "r"(n));
}
__device__ __forceinline__ void mbar_wait(uint32_t bar, int parity)
{
    uint32_t ok = 0;
    do
        asm volatile("{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\nselp.u32 %0, 1, 0, p;\n}\n"
                     : "=r"(ok)
                     : "r"(bar), "r"(parity)
                     : "memory");
    while (!ok);
}
__device__ __forceinline__ void mbar_arrive(uint32_t bar)
{
    asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(bar) : "memory");
}
__device__ __forceinline__ void mbar_expect(uint32_t bar, uint32_t bytes)
{
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(bar), "r"(bytes) : "memory");
}
__device__ __forceinline__ void tma2(uint32_t dst, const CUtensorMap *m, uint32_t bar, int x, int y)
{
    asm volatile("cp.async.bulk.tensor.2d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3}], [%4];"
                 ::"r"(dst), "l"(m), "r"(x), "r"(y), "r"(bar)
                 : "memory");
}
__device__ __forceinline__ void tma3(uint32_t dst, const CUtensorMap *m, uint32_t bar, int x, int y, int z)
{
    asm volatile("cp.async.bulk.tensor.3d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3, %4}], [%5];"
                 ::"r"(dst), "l"(m), "r"(x), "r"(y), "r"(z), "r"(bar)
                 : "memory");
}
/* A shared-memory matrix descriptor, 128-byte swizzle: start, leading and stride byte offsets.
 * K-major: 8-row groups 1 KB apart (stride), the leading offset unused (16); a k step of 16
 * moves 32 bytes along the swizzled rows. MN-major: 64-column blocks 8 KB apart (leading),
 * 8-row groups of k 1 KB apart (stride); a k step moves 16 rows, 2 KB. */
__device__ __forceinline__ uint64_t sdesc(uint32_t addr, uint32_t lbo, uint32_t sbo)
{
    return (uint64_t)((addr & 0x3FFFF) >> 4) | (uint64_t)(lbo >> 4) << 16 | (uint64_t)(sbo >> 4) << 32 | 1ull << 62;
}
/* D[64 x N] += A[64 x 16] · B[16 x N], both from shared memory (descriptors); TA, TB: the
 * operand is MN-major (transposed) rather than K-major */
template <int N, int TA, int TB> struct wgmma_op;
template <int TA, int TB> struct wgmma_op<128, TA, TB> {
    static __device__ __forceinline__ void run(float (&d)[64], uint64_t da, uint64_t db)
    {
        asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, 1, 0;\n"
                     "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 "
                     "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, %64, %65, p, 1, 1, %66, %67;\n}\n"
            : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
          "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
          "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
          "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]),
          "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]),
          "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]),
          "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),
          "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
            : "l"(da), "l"(db), "n"(TA), "n"(TB));
    }
};
template <int TA, int TB> struct wgmma_op<256, TA, TB> {
    static __device__ __forceinline__ void run(float (&d)[128], uint64_t da, uint64_t db)
    {
        asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, 1, 0;\n"
                     "wgmma.mma_async.sync.aligned.m64n256k16.f32.bf16.bf16 "
                     "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, %64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, %80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, %96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111, %112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127}, %128, %129, p, 1, 1, %130, %131;\n}\n"
            : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
          "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
          "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
          "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]),
          "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]),
          "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]),
          "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),
          "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63]),
          "+f"(d[64]), "+f"(d[65]), "+f"(d[66]), "+f"(d[67]), "+f"(d[68]), "+f"(d[69]), "+f"(d[70]), "+f"(d[71]),
          "+f"(d[72]), "+f"(d[73]), "+f"(d[74]), "+f"(d[75]), "+f"(d[76]), "+f"(d[77]), "+f"(d[78]), "+f"(d[79]),
          "+f"(d[80]), "+f"(d[81]), "+f"(d[82]), "+f"(d[83]), "+f"(d[84]), "+f"(d[85]), "+f"(d[86]), "+f"(d[87]),
          "+f"(d[88]), "+f"(d[89]), "+f"(d[90]), "+f"(d[91]), "+f"(d[92]), "+f"(d[93]), "+f"(d[94]), "+f"(d[95]),
          "+f"(d[96]), "+f"(d[97]), "+f"(d[98]), "+f"(d[99]), "+f"(d[100]), "+f"(d[101]), "+f"(d[102]), "+f"(d[103]),
          "+f"(d[104]), "+f"(d[105]), "+f"(d[106]), "+f"(d[107]), "+f"(d[108]), "+f"(d[109]), "+f"(d[110]), "+f"(d[111]),
          "+f"(d[112]), "+f"(d[113]), "+f"(d[114]), "+f"(d[115]), "+f"(d[116]), "+f"(d[117]), "+f"(d[118]), "+f"(d[119]),
          "+f"(d[120]), "+f"(d[121]), "+f"(d[122]), "+f"(d[123]), "+f"(d[124]), "+f"(d[125]), "+f"(d[126]), "+f"(d[127])
            : "l"(da), "l"(db), "n"(TA), "n"(TB));
    }
};

__device__ __forceinline__ void wgmma_fence()
{
    asm volatile("wgmma.fence.sync.aligned;" ::: "memory");
}
__device__ __forceinline__ void wgmma_commit()
{
    asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory");
}
template <int N, int NB, int R> __device__ __forceinline__ void wgmma_wait(float (&d)[NB][R])
{
    asm volatile("wgmma.wait_group.sync.aligned %0;" ::"n"(N) : "memory");
    /* the accumulators are final only now: keep their reads below the wait */
#pragma unroll
    for (int i = 0; i < NB; i++)
#pragma unroll
        for (int j = 0; j < R; j++)
            asm volatile("" : "+f"(d[i][j])::"memory");
}

/* Rows [valid, 64) of a 64-row MN-major block (8 KB: rows of 128 bytes, the swizzle moving
 * 16-byte pieces within a row only) set to zero by the warpgroup's 128 threads */
__device__ __forceinline__ void zero_rows(uint8_t *blk, int valid, int tid)
{
    uint4 *p = (uint4 *)(blk + valid * 128);
    const int n = (64 - valid) * 8;
    for (int i = tid; i < n; i += 128)
        p[i] = make_uint4(0, 0, 0, 0);
}
#endif

/* The tile's expert, first output row (of the expert's rows, or of M) and column, and K steps */
struct Tile {
    int e, m0, n0, row0, rows, nk;
};

template <int MODE> __device__ __forceinline__ Tile tile_at(const SP &p, const int *start, int tile)
{
    const GA &g = p.g;
    Tile t;
    int local;
    if (MODE == GM_ROWS) { /* the last expert whose tiles start at or before this one */
        int lo = 0, hi = g.E - 1;
        while (lo < hi) {
            const int mid = (lo + hi + 1) >> 1;
            if (start[mid] <= tile)
                lo = mid;
            else
                hi = mid - 1;
        }
        t.e = lo;
        local = tile - start[lo];
    } else {
        t.e = tile / (p.mt * p.nt);
        local = tile % (p.mt * p.nt);
    }
    t.m0 = local / p.nt * BM;
    t.n0 = local % p.nt * p.bn;
    t.row0 = g.begin[t.e];
    t.rows = g.count[t.e];
    t.nk = MODE == GM_ROWS ? (int)((g.K + BK - 1) / BK) : (t.rows + BK - 1) / BK;
    return t;
}

template <int MODE, int BT, int NB, int NK, int EPI, int BN, int ACT>
__global__ void __launch_bounds__(384, 1) sm90_gemm(const __grid_constant__ SP p)
{
#ifdef SM90A_BODY
    typedef sm90_cfg<NB, BN> C;
    constexpr int TILE_B = C::TILE_B;
    extern __shared__ uint8_t smem[];
    const uint32_t base = (sa(smem) + 1023) & ~1023u;
    uint8_t *gbase = smem + (base - sa(smem));
    const uint32_t full = base + C::STAGES * C::STAGE, empty = full + C::STAGES * 8;
    int *start = (int *)(gbase + C::STAGES * C::STAGE + 2 * C::STAGES * 8);
    const GA &g = p.g;
    const int wg = threadIdx.x / 128, tid = threadIdx.x % 128;
    if (threadIdx.x == 0) {
        for (int s = 0; s < C::STAGES; s++) {
            mbar_init(full + 8 * s, 1);
            mbar_init(empty + 8 * s, 2);
        }
        asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
    }
    int total;
    if (MODE == GM_ROWS) {
        /* start[e]: the tiles of the experts before e, by one warp's scan */
        if (threadIdx.x < 32) {
            const int lane = threadIdx.x, per = (g.E + 31) / 32, lo = lane * per, hi = min(lo + per, g.E);
            int sum = 0;
            for (int x = lo; x < hi; x++)
                sum += (g.count[x] + BM - 1) / BM * p.nt;
            int incl = sum;
#pragma unroll
            for (int o = 1; o < 32; o <<= 1) {
                const int v = __shfl_up_sync(0xffffffffu, incl, o);
                if (lane >= o)
                    incl += v;
            }
            int run = incl - sum;
            for (int x = lo; x < hi; x++) {
                start[x] = run;
                run += (g.count[x] + BM - 1) / BM * p.nt;
            }
            if (lane == 31)
                start[g.E] = incl;
        }
        __syncthreads();
        total = start[g.E];
    } else {
        __syncthreads();
        total = g.E * p.mt * p.nt;
    }

    if (wg == 0) { /* the producer */
        asm volatile("setmaxnreg.dec.sync.aligned.u32 40;");
        if (tid != 0)
            return;
        int s = 0, ph = 0;
        for (int tile = blockIdx.x; tile < total; tile += gridDim.x) {
            const Tile t = tile_at<MODE>(p, start, tile);
            for (int pp = 0; pp < NK; pp++)
                for (int kt = 0; kt < t.nk; kt++) {
                    mbar_wait(empty + 8 * s, ph ^ 1);
                    const uint32_t st = base + s * C::STAGE, bar = full + 8 * s;
                    mbar_expect(bar, C::STAGE);
                    const int k = kt * BK;
                    if (MODE == GM_ROWS) {
                        tma2(st, &p.a[pp], bar, k, t.row0 + t.m0);
#pragma unroll
                        for (int i = 0; i < NB; i++) {
                            const CUtensorMap *bm = &p.b[NK == 2 ? pp : i];
                            const uint32_t d = st + TILE_A + i * TILE_B;
                            if (BT) {
                                tma3(d, bm, bar, k, t.n0, t.e);
                            } else {
#pragma unroll
                                for (int c = 0; c < BN / 64; c++)
                                    tma3(d + c * HALF, bm, bar, t.n0 + 64 * c, k, t.e);
                            }
                        }
                    } else {
                        const int r = t.row0 + k;
                        tma2(st, &p.a[0], bar, t.m0, r);
                        tma2(st + HALF, &p.a[0], bar, t.m0 + 64, r);
#pragma unroll
                        for (int i = 0; i < NB; i++) {
                            const uint32_t d = st + TILE_A + i * TILE_B;
#pragma unroll
                            for (int c = 0; c < BN / 64; c++)
                                tma2(d + c * HALF, &p.b[i], bar, t.n0 + 64 * c, r);
                        }
                    }
                    if (++s == C::STAGES) {
                        s = 0;
                        ph ^= 1;
                    }
                }
        }
        return;
    }

    /* the consumers: warpgroup w computes rows [64w, 64w + 64) of the tile */
    asm volatile("setmaxnreg.inc.sync.aligned.u32 232;");
    const int w = wg - 1, warp = tid / 32, lane = tid % 32;
    constexpr int TA = MODE == GM_KSEG, TB = MODE == GM_KSEG || !BT;
    int s = 0, ph = 0;
    float acc[NB][BN / 2];
    for (int tile = blockIdx.x; tile < total; tile += gridDim.x) {
        const Tile t = tile_at<MODE>(p, start, tile);
        if (t.nk == 0)
            continue; /* KSEG: an expert without rows leaves its gradient as it is */
#pragma unroll
        for (int i = 0; i < NB; i++)
#pragma unroll
            for (int j = 0; j < BN / 2; j++)
                acc[i][j] = 0.0f;
        int prev = -1;
        for (int pp = 0; pp < NK; pp++)
            for (int kt = 0; kt < t.nk; kt++) {
                mbar_wait(full + 8 * s, ph);
                const uint32_t st = base + s * C::STAGE;
                if (MODE == GM_KSEG && kt == t.nk - 1 && t.rows % BK) {
                    /* the last step's rows past the expert's: zeros, in both operands */
                    uint8_t *gs = gbase + (st - base);
                    zero_rows(gs + w * HALF, t.rows % BK, tid);
#pragma unroll
                    for (int i = 0; i < NB; i++)
#pragma unroll
                        for (int c = w; c < BN / 64; c += 2)
                            zero_rows(gs + TILE_A + i * TILE_B + c * HALF, t.rows % BK, tid);
                    asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
                    asm volatile("bar.sync 1, 256;" ::: "memory");
                }
                wgmma_fence();
#pragma unroll
                for (int kk = 0; kk < BK / 16; kk++) {
                    const uint64_t da = TA ? sdesc(st + w * HALF + kk * 2048, HALF, 1024)
                                           : sdesc(st + w * HALF + kk * 32, 16, 1024);
#pragma unroll
                    for (int i = 0; i < NB; i++) {
                        const uint32_t bb = st + TILE_A + i * TILE_B;
                        const uint64_t db = TB ? sdesc(bb + kk * 2048, HALF, 1024) : sdesc(bb + kk * 32, 16, 1024);
                        wgmma_op<BN, TA, TB>::run(acc[i], da, db);
                    }
                }
                wgmma_commit();
                /* the previous step's MMAs are done: its stage goes back to the producer */
                wgmma_wait<1>(acc);
                if (prev >= 0 && tid == 0)
                    mbar_arrive(empty + 8 * prev);
                prev = s;
                if (++s == C::STAGES) {
                    s = 0;
                    ph ^= 1;
                }
            }
        wgmma_wait<0>(acc);
        if (tid == 0)
            mbar_arrive(empty + 8 * prev);

        /* the epilogue: thread (warp, lane) holds rows warp·16 + lane/4 (+ 8) of its 64, and
         * columns 8j + 2·(lane % 4) (+ 1) for j < BN/8. Per row, every load the epilogue
         * needs is issued before the first store: one round trip of latency, not one each. */
        const long long Mx = MODE == GM_ROWS ? t.rows : g.M;
#pragma unroll
        for (int h = 0; h < 2; h++) {
            const long long m = t.m0 + w * 64 + warp * 16 + lane / 4 + 8 * h;
            if (m >= Mx)
                continue;
            const long long rb = MODE == GM_ROWS ? (t.row0 + m) * g.ldc : t.e * g.c_es + m * g.ldc;
            const int n0 = t.n0 + 2 * (lane % 4);
            __nv_bfloat162 in[BN / 8][2];
            if (EPI == EPI_ACC || EPI == EPI_BWD)
#pragma unroll
                for (int j = 0; j < BN / 8; j++)
                    if (n0 + 8 * j < g.N)
                        epilogue2_load<EPI, NB>(g, rb + n0 + 8 * j, in[j]);
#pragma unroll
            for (int j = 0; j < BN / 8; j++) {
                if (n0 + 8 * j >= g.N)
                    continue;
                float v0[NB], v1[NB];
#pragma unroll
                for (int i = 0; i < NB; i++) {
                    v0[i] = acc[i][4 * j + 2 * h];
                    v1[i] = acc[i][4 * j + 2 * h + 1];
                }
                epilogue2_store<EPI, NB, ACT>(g, rb + n0 + 8 * j, v0, v1, in[j]);
            }
        }
    }
#endif
}

} /* namespace */

/* ---- the host side ------------------------------------------------------------------------ */

#ifdef CMOE_SM90A
namespace {

typedef PFN_cuTensorMapEncodeTiled_v12000 encode_fn;

/* cuTensorMapEncodeTiled from the driver through the runtime: nothing links libcuda */
encode_fn encoder()
{
    static encode_fn fn = nullptr;
    static bool tried = false;
    if (!tried) {
        tried = true;
        void *f = nullptr;
        cudaDriverEntryPointQueryResult q;
        if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &f, 12000, cudaEnableDefault, &q) == cudaSuccess &&
            q == cudaDriverEntryPointSuccess)
            fn = (encode_fn)f;
        else
            cudaGetLastError();
    }
    return fn;
}

/* A bf16 tensor map of rank 2 or 3: dims innermost first, byte strides of the outer dims,
 * the box a copy moves (its inner 64 elements: one 128-byte swizzled row) */
bool tmap(CUtensorMap *m, const void *ptr, int rank, const cuuint64_t *dims, const cuuint64_t *strides,
          const cuuint32_t *box)
{
    const cuuint32_t one[3] = {1, 1, 1};
    return encoder()(m, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, (cuuint32_t)rank, (void *)ptr, dims, strides, box, one,
                     CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                     CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) == CUDA_SUCCESS;
}

template <int MODE, int BT, int NB, int NK, int EPI, int BN, int ACT>
void sm90_launch(moe_backend *b, const SP &p, long long tiles_bound)
{
    typedef sm90_cfg<NB, BN> C;
    const int bytes = C::fixed + (p.g.E + 1) * (int)sizeof(int);
    static int limit = 0; /* the dynamic shared memory this instantiation was allowed so far */
    if (bytes > limit) {
        cudaFuncSetAttribute(sm90_gemm<MODE, BT, NB, NK, EPI, BN, ACT>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                             bytes);
        limit = bytes;
    }
    const unsigned grid = (unsigned)(tiles_bound < moe_cu(b)->sm_count ? tiles_bound : moe_cu(b)->sm_count);
    sm90_gemm<MODE, BT, NB, NK, EPI, BN, ACT><<<grid, 384, bytes, moe_cu_stream(b)>>>(p);
}

/* One B operand: 128 × 256 tiles where N fills them (they read the shared A tile half as often
 * per output as 128 × 128 ones), else 128 × 128 */
template <int MODE, int BT, int NK, int EPI, int ACT = -1>
void sm90_launch1(moe_backend *b, SP &p, long long tiles_bound)
{
    if (p.bn == 256)
        sm90_launch<MODE, BT, 1, NK, EPI, 256, ACT>(b, p, tiles_bound);
    else
        sm90_launch<MODE, BT, 1, NK, EPI, 128, ACT>(b, p, tiles_bound);
}

} /* namespace */
#endif

int moe_cu_grouped_sm90(moe_backend *b, const char *op, const moe_cu_group *grp, const moe_cu_gemm_args *a)
{
#ifndef CMOE_SM90A
    (void)b, (void)op, (void)grp, (void)a;
    return 0;
#else
    moe_cuda_state *st = moe_cu(b);
    if (!st->sm90 || (st->gemm != MOE_CU_GEMM_AUTO && st->gemm != MOE_CU_GEMM_WGMMA))
        return 0;
    /* TMA: 16-byte aligned bases and strides; the epilogue stores pairs */
    const bool ok = a->lda % 8 == 0 && a->ldb % 8 == 0 && a->b_es % 8 == 0 && a->ldc % 2 == 0 && a->c_es % 2 == 0 &&
                    a->N % 2 == 0 && moe_cu_aligned16(a->A0) && moe_cu_aligned16(a->A1) && moe_cu_aligned16(a->B0) &&
                    moe_cu_aligned16(a->B1) && moe_cu_aligned4(a->C0) && moe_cu_aligned4(a->C1) &&
                    moe_cu_aligned4(a->C2) && moe_cu_aligned4(a->H1) && moe_cu_aligned4(a->H3) &&
                    grp->E * 4 + sm90_cfg<1, 128>::fixed <= 227 * 1024 && grp->rows_bound < (1LL << 31) && encoder();
    if (!ok)
        return 0;
    SP p;
    memset(&p, 0, sizeof p);
    p.g = ga_of(grp, a);
    p.g.pairs = 1;
    p.bn = a->nb == 1 && (a->N % 256 == 0 || a->N >= 2048) ? 256 : 128;
    p.nt = (int)((a->N + p.bn - 1) / p.bn);
    const cuuint64_t R = (cuuint64_t)grp->rows_bound, E = (cuuint64_t)grp->E;
    bool maps = true;
    long long tiles;
    if (a->mode == GM_ROWS) {
        for (int i = 0; i < a->nk; i++) {
            const cuuint64_t dims[2] = {(cuuint64_t)a->K, R}, str[1] = {(cuuint64_t)a->lda * 2};
            const cuuint32_t box[2] = {64, BM};
            maps = maps && tmap(&p.a[i], i ? a->A1 : a->A0, 2, dims, str, box);
        }
        for (int i = 0; i < (a->nb > a->nk ? a->nb : a->nk); i++) {
            const cuuint64_t dims[3] = {(cuuint64_t)(a->bt ? a->K : a->N), (cuuint64_t)(a->bt ? a->N : a->K), E},
                             str[2] = {(cuuint64_t)a->ldb * 2, (cuuint64_t)a->b_es * 2};
            const cuuint32_t box[3] = {64, a->bt ? (cuuint32_t)p.bn : (cuuint32_t)BK, 1};
            maps = maps && tmap(&p.b[i], i ? a->B1 : a->B0, 3, dims, str, box);
        }
        tiles = (grp->rows_bound / BM + grp->E) * p.nt;
    } else {
        p.mt = (int)((a->M + BM - 1) / BM);
        const cuuint64_t dims[2] = {(cuuint64_t)a->M, R}, str[1] = {(cuuint64_t)a->lda * 2};
        const cuuint32_t box[2] = {64, BK};
        maps = tmap(&p.a[0], a->A0, 2, dims, str, box);
        for (int i = 0; i < a->nb; i++) {
            const cuuint64_t bd[2] = {(cuuint64_t)a->N, R}, bs[1] = {(cuuint64_t)a->ldb * 2};
            maps = maps && tmap(&p.b[i], i ? a->B1 : a->B0, 2, bd, bs, box);
        }
        tiles = (long long)grp->E * p.mt * p.nt;
    }
    if (!maps)
        return 0; /* a shape TMA cannot describe: the other kernels take it */
    if (tiles <= 0)
        return 1;
    const int key = a->mode * 10000 + a->bt * 1000 + a->nb * 100 + a->nk * 10 + a->epi;
    switch (key) {
    /* SwiGLU's epilogues compiled for it alone: the general ones, every activation's code
     * unrolled over a thread's outputs, overflow the instruction cache (measured: the
     * backward's GEMM of layer (b) at 3.2 ms against 1.5 ms with ReLU's) */
    case GM_ROWS * 10000 + 0 * 1000 + 200 + 10 + EPI_FWD:
        if (a->act == MOE_ACT_SWIGLU)
            sm90_launch<GM_ROWS, 0, 2, 1, EPI_FWD, 128, MOE_ACT_SWIGLU>(b, p, tiles);
        else
            sm90_launch<GM_ROWS, 0, 2, 1, EPI_FWD, 128, -1>(b, p, tiles);
        break;
    case GM_ROWS * 10000 + 0 * 1000 + 100 + 10 + EPI_FWD: sm90_launch1<GM_ROWS, 0, 1, EPI_FWD>(b, p, tiles); break;
    case GM_ROWS * 10000 + 0 * 1000 + 100 + 10 + EPI_STORE: sm90_launch1<GM_ROWS, 0, 1, EPI_STORE>(b, p, tiles); break;
    case GM_ROWS * 10000 + 1 * 1000 + 100 + 10 + EPI_BWD:
        if (a->act == MOE_ACT_SWIGLU)
            sm90_launch1<GM_ROWS, 1, 1, EPI_BWD, MOE_ACT_SWIGLU>(b, p, tiles);
        else
            sm90_launch1<GM_ROWS, 1, 1, EPI_BWD>(b, p, tiles);
        break;
    case GM_ROWS * 10000 + 1 * 1000 + 100 + 20 + EPI_ACC: sm90_launch1<GM_ROWS, 1, 2, EPI_ACC>(b, p, tiles); break;
    case GM_ROWS * 10000 + 1 * 1000 + 100 + 10 + EPI_ACC: sm90_launch1<GM_ROWS, 1, 1, EPI_ACC>(b, p, tiles); break;
    case GM_KSEG * 10000 + 0 * 1000 + 200 + 10 + EPI_ACC: sm90_launch<GM_KSEG, 0, 2, 1, EPI_ACC, 128, -1>(b, p, tiles); break;
    case GM_KSEG * 10000 + 0 * 1000 + 100 + 10 + EPI_ACC: sm90_launch1<GM_KSEG, 0, 1, EPI_ACC>(b, p, tiles); break;
    default:
        return 0;
    }
    return 1;
#endif
}
