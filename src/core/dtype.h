/*
 * dtype.h — conversions between double and the float formats cmoe stores (F64, F32, BF16,
 * F16), and little-endian bytes whatever the host. Used by safetensors, checkpoints and
 * Hugging Face import/export; the backends' typed buffers will use the same ones.
 */
#ifndef CMOE_CORE_DTYPE_H
#define CMOE_CORE_DTYPE_H

#include <stddef.h>
#include <stdint.h>

/* IEEE half (binary16) and bfloat16 bits to double: exact. */
double moe_f16_to_f64(uint16_t h);
double moe_bf16_to_f64(uint16_t h);
/* double to half / bfloat16 bits, rounded to nearest even directly from double (no double
 * rounding through float); overflow gives ±inf, NaN stays NaN. */
uint16_t moe_f64_to_f16(double v);
uint16_t moe_f64_to_bf16(double v);

int moe_host_is_le(void);
/* size (1..8) little-endian bytes at p as an unsigned integer */
uint64_t moe_load_le(const uint8_t *p, size_t size);
/* one host-order element of size bytes to little-endian bytes (a copy on little-endian hosts) */
void moe_store_le(uint8_t *dst, const uint8_t *src, size_t size);

#endif
