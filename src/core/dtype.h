/*
 * dtype.h — element types of backend buffers and host transfers, and their conversions.
 *
 * A backend buffer carries one of these; host data crossing to or from a backend says
 * its own, and the copy converts on the way (so a bf16 checkpoint tensor goes to an f32
 * buffer without a detour through double). Safetensors, checkpoints and Hugging Face
 * import/export use the same conversions. Float conversions round to nearest, ties to
 * even; NaN stays NaN and overflow gives ±inf, as IEEE casts do.
 */
#ifndef CMOE_DTYPE_H
#define CMOE_DTYPE_H

#include <stddef.h>
#include <stdint.h>

#include "cmoe.h"

typedef enum {
    MOE_F64,  /* the oracle's */
    MOE_F32,  /* cpu; master weights and optimizer state everywhere but ref */
    MOE_BF16, /* GPU weights and activations */
    MOE_I32,  /* token, target and task ids */
    MOE_NDTYPES
} moe_dtype;

size_t moe_dtype_size(moe_dtype t);     /* bytes per element; 0 when out of range */
const char *moe_dtype_name(moe_dtype t); /* "f64", "f32", "bf16", "i32"; "?" when out of range */
int moe_dtype_is_float(moe_dtype t);

float moe_bf16_to_f32(uint16_t h);
uint16_t moe_f32_to_bf16(float f); /* round to nearest even; NaN stays a (quiet) NaN */
uint16_t moe_f64_to_bf16(double v); /* straight from double: one rounding */
/* IEEE half, for safetensors' F16 */
uint16_t moe_f64_to_f16(double v);
double moe_f16_to_f64(uint16_t h);
double moe_bf16_to_f64(uint16_t h); /* exact */

/* Little-endian bytes, whatever the host (safetensors, checkpoints, shards). */
int moe_host_is_le(void);
/* size (1..8) little-endian bytes at p as an unsigned integer */
uint64_t moe_load_le(const uint8_t *p, size_t size);
/* one host-order element of size bytes to little-endian bytes (a copy on little-endian hosts) */
void moe_store_le(uint8_t *dst, const uint8_t *src, size_t size);

/*
 * n elements of type st at src to type dt at dst (host memory, no overlap). Float to
 * integer is refused (MOE_ERR_ARG) unless every value is integral and in range, and
 * then exact; integer to float is exact for |v| < 2^24 (f32) and 2^8 (bf16) and rounds
 * beyond.
 */
moe_status moe_convert(void *dst, moe_dtype dt, const void *src, moe_dtype st, int64_t n);

#endif
