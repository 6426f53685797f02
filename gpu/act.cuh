/*
 * act.cuh — the FFN activations on the device, forward and backward, in fp32 (the
 * formulas of ref/ffn.c; accurate expf/erff/tanhf rather than the cpu backend's fast
 * polynomials). Shared by the grouped GEMM epilogues (gemm.cu) and the dense FFN (ffn.cu).
 */
#ifndef CMOE_GPU_ACT_CUH
#define CMOE_GPU_ACT_CUH

#include "cmoe.h"

#define ACT_SQRT_2_OVER_PI 0.79788456080286535588f
#define ACT_GELU_TANH_C 0.044715f

__device__ __forceinline__ int act_is_glu(int act)
{
    return act == MOE_ACT_SWIGLU || act == MOE_ACT_GEGLU;
}

/* act(x) of the first projection (for GLU kinds the gate: silu or gelu) */
__device__ __forceinline__ float act_fwd(int act, float x)
{
    switch (act) {
    case MOE_ACT_RELU:
        return x > 0.0f ? x : 0.0f;
    case MOE_ACT_GELU_TANH:
        return 0.5f * x * (1.0f + tanhf(ACT_SQRT_2_OVER_PI * (x + ACT_GELU_TANH_C * x * x * x)));
    case MOE_ACT_GELU:
    case MOE_ACT_GEGLU:
        return 0.5f * x * (1.0f + erff(x * 0.70710678118654752440f));
    default: /* SwiGLU's silu */
        return x / (1.0f + expf(-x));
    }
}

/* From da = ∂L/∂a at a = act(x)[·h3]: g1 = ∂L/∂x and, for GLU kinds, g3 = ∂L/∂h3. */
__device__ __forceinline__ void act_bwd(int act, float da, float x, float h3, float *g1, float *g3)
{
    switch (act) {
    case MOE_ACT_SWIGLU: {
        const float sg = 1.0f / (1.0f + expf(-x));
        *g3 = da * x * sg;
        *g1 = da * h3 * sg * (1.0f + x * (1.0f - sg));
        break;
    }
    case MOE_ACT_RELU:
        *g1 = x > 0.0f ? da : 0.0f;
        break;
    case MOE_ACT_GELU_TANH: {
        const float th = tanhf(ACT_SQRT_2_OVER_PI * (x + ACT_GELU_TANH_C * x * x * x));
        const float du = ACT_SQRT_2_OVER_PI * (1.0f + 3.0f * ACT_GELU_TANH_C * x * x);
        *g1 = da * (0.5f * (1.0f + th) + 0.5f * x * (1.0f - th * th) * du);
        break;
    }
    default: { /* GELU, GEGLU */
        const float cdf = 0.5f * (1.0f + erff(x * 0.70710678118654752440f));
        const float grad = cdf + x * 0.39894228040143267794f * expf(-0.5f * x * x);
        if (act == MOE_ACT_GEGLU) {
            *g3 = da * x * cdf;
            *g1 = da * h3 * grad;
        } else {
            *g1 = da * grad;
        }
        break;
    }
    }
}

#endif
