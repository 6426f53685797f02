/* check_impl.h — the harness shared by check.c and check_model.c (not installed). */
#ifndef CMOE_BACKEND_CHECK_IMPL_H
#define CMOE_BACKEND_CHECK_IMPL_H

#include <stdarg.h>

#include "backend/check.h"

typedef struct {
    moe_backend *B, *R; /* the backend checked, the oracle */
    moe_check_report report;
    void *ctx;
    int failed, rows, oom;
    double tol;
    uint64_t seed;
    int64_t draws; /* random tensors drawn so far: each gets its own stream */
    moe_dtype ct;  /* the backend's compute type */
    const char *only;
    char shape[96];
} ck;

/* a tensor on both sides: b on the backend checked, r on ref */
typedef struct {
    moe_buf *b, *r;
    int64_t n;
} pair;

void ck_shape(ck *c, const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 2, 3)))
#endif
    ;
int ck_want(const ck *c, const char *op);
/* whether a section with the op names ops (NULL-terminated) has a row that --only asks for */
int ck_section(const ck *c, const char *const *ops);
void ck_row(ck *c, const char *op, double err, double tol, const char *note);
/* n elements of type t on the backend (ref's own type there), from host (rounded by the
 * backend, then the same values to ref) or NaN-poisoned when host is NULL */
pair ck_mk(ck *c, moe_dtype t, int64_t n, const double *host);
pair ck_rand(ck *c, moe_dtype t, int64_t n, double scale);
pair ck_ids(ck *c, const int32_t *ids, int64_t n);
void ck_drop(ck *c, pair p);
void ck_randn(double *x, int64_t n, double scale, uint64_t seed);
double ck_rel(const double *a, const double *r, int64_t n);
/* one row: the first n elements of p on both sides (an op's sticky error fails it) */
void ck_cmp_n(ck *c, const char *op, pair p, int64_t n);
void ck_cmp(ck *c, const char *op, pair p);
moe_plan *ck_host_plan(const moe_layer_config *lc, int64_t T);

/* check_model.c: the language model's ops; the MoE layer as a whole */
moe_status moe_check_model(ck *c, int quick);
moe_status moe_check_layers(ck *c, int quick);

#endif
