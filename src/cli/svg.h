/*
 * svg.h — the SVG drawing of `cmoe report` and `cmoe sweep`: line charts (inline in a page, or
 * a standalone .svg file) and the heatmap colour scale, as text on a stream (the pages
 * themselves are report.c's and sweep_report.c's).
 */
#ifndef CMOE_CLI_SVG_H
#define CMOE_CLI_SVG_H

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#define SVG_MAX_POINTS 800 /* points per drawn line: longer series are reduced to bucket means */
#define SVG_PALETTE_N 10

extern const char *const svg_palette[SVG_PALETTE_N];

/* s with & < > " ' escaped for HTML and SVG text */
void svg_esc(FILE *f, const char *s);
/* 1234567 -> "1.23M"; small numbers as %g */
void svg_fmt_num(char *buf, size_t n, double v);

typedef struct {
    const char *label, *color; /* label NULL: not in the legend */
    const double *x, *y;
    int64_t n;
    double width, opacity;
    int dots, dash;
} svg_line;

typedef struct {
    const char *title, *xlabel, *ylabel, *note;
    int logy, zero_based, legend;
    int logx; /* a log10 x axis (points with x <= 0 are left out) */
} svg_chart_opts;

/* One figure: title, legend, the SVG (axes fitted to the finite points of every line). */
void svg_chart(FILE *f, const svg_chart_opts *o, const svg_line *lines, int nl);
/* The same chart as a standalone SVG document (title and legend drawn in it), for a file. */
void svg_chart_file(FILE *f, const svg_chart_opts *o, const svg_line *lines, int nl);

/* Diverging blue-white-red over log2(ratio) in [-2, 2] (ratio 1 is white), as "#rrggbb". */
void svg_heat_color(double ratio, char *buf, size_t n);
/* The colour scale of svg_heat_color, labelled 1/4x .. 4x. */
void svg_heat_legend(FILE *f);

#endif
