/*
 * check.h — every op of a backend against the oracle (the ref backend), op by op, on fresh
 * random inputs over a table of shapes (ggml's test-backend-ops). Behind `cmoe check` and
 * the backends' cross-check suites.
 *
 * Each comparison gives one row: the op, the shape, ‖b − ref‖ / ‖ref‖ (NaN never passes)
 * and the tolerance. Inputs go to the backend first and come back rounded to its types,
 * and those values go to ref, so both compute on the same numbers; the backend's outputs
 * are poisoned (NaN) first, so an element it leaves unwritten fails; gradients start from
 * the same random values on both sides (backward ops add). Tensors take the types the MoE
 * layer and the model give them: the router, losses, counts, optimizer moments and master
 * weights in f32, everything else in the backend's compute type (f32, or bf16 on a GPU).
 * Everything after selection runs on ref's routing plan, uploaded; selection itself is
 * compared exactly, on the same scores. The MoE layer as a whole is compared last.
 */
#ifndef CMOE_BACKEND_CHECK_H
#define CMOE_BACKEND_CHECK_H

#include "backend/backend.h"

typedef struct {
    const char *op;   /* "experts dw1" */
    const char *shape; /* "T=37 d=24 f=40 E=8 k=2" */
    double err, tol;  /* normalised error (inf: NaN or an op's error), its tolerance */
    int ok;
    const char *note; /* what went wrong beyond the numbers (an op's error), or NULL */
} moe_check_row;

typedef void (*moe_check_report)(const moe_check_row *row, void *ctx);

typedef struct {
    uint64_t seed; /* of the random inputs */
    double tol;    /* <= 0: 1e-5 for an f32 backend, 2e-2 for bf16 (DESIGN.md) */
    int quick;     /* the small shapes only */
    const char *only; /* ops whose name starts with this, NULL: all */
} moe_check_options;

/* Runs the table; *failed = rows over their tolerance. A non-OK status means the check
 * itself could not run (out of memory, ref missing), not that an op failed. */
moe_status moe_backend_check(moe_backend *b, const moe_check_options *o, moe_check_report report, void *ctx,
                             int *failed, int *rows);

#endif
