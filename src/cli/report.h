/*
 * cmoe report (report.c): the metrics of a run as the page draws them; read and reduced by
 * report_metrics.c.
 */
#ifndef CMOE_CLI_REPORT_H
#define CMOE_CLI_REPORT_H

#include <stdint.h>

enum {
    LAYER_BINS = 400,    /* time buckets of the per-layer series */
    HEAT_CELLS = 60000,  /* rectangles over all heatmaps */
    HEAT_TITLES = 25000, /* hover titles only below this many cells */
    N_AUX = 6,
};

/* metrics.jsonl is read whole: at most this much (a regular file only) */
#define REPORT_METRICS_MAX ((size_t)4 << 30)

extern const char *const report_aux_keys[N_AUX]; /* "lb", "importance", "load", "z", "mi", "total" */
/* The pages' style sheet (cmoe report's, shared by cmoe sweep's page). */
extern const char *const report_css;

typedef struct {
    double *v;
    int64_t n, cap;
} vec;

/* the series of metrics.jsonl, by key */
enum { S_STEP, S_LOSS, S_CE, S_AUX, S_LR, S_GNORM, S_TOKENS, S_TPS, S_ELAPSED, S_VAL, S_LMM, S_DROP, N_SERIES };

typedef struct {
    int64_t layer, E;
    double *share;      /* [bins, E] sum over the bin's steps of count_e / sum count */
    double *aux[N_AUX]; /* [bins] sum over the bin's steps */
    double *dropped;    /* [bins] */
    int64_t *n;         /* [bins] steps in each bin */
} layer_data;

typedef struct {
    int64_t n;         /* steps (records) */
    vec s[N_SERIES];   /* S_TOKENS holds the cumulative count */
    int has[N_SERIES]; /* the key appeared at least once */
    int nl;
    layer_data *l;
    int64_t bins;      /* time buckets of the per-layer data */
    int aux_nonzero[N_AUX];
} metrics;

/* "cmoe report: MESSAGE" on stderr; returns EXIT_FAIL. */
int report_fail(const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 1, 2)))
#endif
    ;
/* Reads and checks path (each line one record; a torn last line is skipped with a warning);
 * 0, or report_fail's code with the message printed. */
int report_load_metrics(const char *path, metrics *m);
void report_metrics_free(metrics *m);

#endif
