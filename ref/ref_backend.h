/*
 * ref_backend.h — what ref/backend.c and ref/backend_model.c share: the ref backend's
 * buffer (doubles, or int32 ids), its state and accessors.
 */
#ifndef CMOE_REF_BACKEND_H
#define CMOE_REF_BACKEND_H

#include "backend/backend.h"

struct moe_buf {
    moe_dtype type; /* MOE_F64, or MOE_I32 for ids */
    int64_t n;
    void *d;
};

typedef struct {
    double *scratch; /* attention backward's dP/dS and decode's probabilities */
    int64_t scratch_n;
} moe_ref_state;

#define D(t) ((t).buf ? (double *)(t).buf->d + (t).off : NULL)
#define DOPT(t) ((t) ? D(*(t)) : NULL)
#define IDS(t) ((t).buf ? (const int32_t *)(t).buf->d + (t).off : NULL)

/* Scratch of n doubles, as reserved; NULL (and the sticky error set) otherwise. */
double *moe_ref_scratch(moe_backend *b, int64_t n, const char *op);

/* The language model's ops (ref/backend_model.c). */
void moe_ref_model_ops(moe_backend *b);

#endif
