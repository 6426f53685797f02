/*
 * Inline SVG charts for `cmoe report` (svg.h): axes with 1-2-5 ticks (linear or log),
 * polylines reduced to bucket means, legends, the heatmap colour scale. Everything is
 * written as text to a stream; nothing here knows about metrics.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "svg.h"

const char *const svg_palette[SVG_PALETTE_N] = {"#2563eb", "#ea580c", "#16a34a", "#9333ea", "#dc2626",
                                      "#0891b2", "#ca8a04", "#db2777", "#4b5563", "#65a30d"};


void svg_esc(FILE *f, const char *s)
{
    for (; *s; s++)
        switch (*s) {
        case '&': fputs("&amp;", f); break;
        case '<': fputs("&lt;", f); break;
        case '>': fputs("&gt;", f); break;
        case '"': fputs("&quot;", f); break;
        case '\'': fputs("&#39;", f); break;
        default: fputc(*s, f);
        }
}

/* 1234567 -> "1.23M"; small numbers as %g */
void svg_fmt_num(char *buf, size_t n, double v)
{
    double a = fabs(v);
    if (a >= 1e12)
        snprintf(buf, n, "%.3gT", v / 1e12);
    else if (a >= 1e9)
        snprintf(buf, n, "%.3gB", v / 1e9);
    else if (a >= 1e6)
        snprintf(buf, n, "%.3gM", v / 1e6);
    else if (a >= 1e3)
        snprintf(buf, n, "%.3gk", v / 1e3);
    else
        snprintf(buf, n, "%.4g", v);
}

/* Tick step 1, 2 or 5 × 10^k giving about `want` intervals over [lo, hi]. */
static double nice_step(double lo, double hi, int want)
{
    double raw = (hi - lo) / want, p = pow(10, floor(log10(raw))), r = raw / p;
    return (r < 1.5 ? 1 : r < 3.5 ? 2 : r < 7.5 ? 5 : 10) * p;
}

enum { CW = 600, CH = 290, ML = 62, MR = 18, MT = 14, MB = 44 };

typedef struct {
    double x0, x1, y0, y1; /* in axis units: log10 of the value on a log axis */
    int logx, logy;
} frame;

static double px(const frame *fr, double x)
{
    if (fr->logx)
        x = log10(x);
    return ML + (x - fr->x0) / (fr->x1 - fr->x0) * (CW - ML - MR);
}

static double py(const frame *fr, double y)
{
    if (fr->logy)
        y = log10(y);
    return CH - MB - (y - fr->y0) / (fr->y1 - fr->y0) * (CH - MT - MB);
}

/* Tick positions (axis units) over [lo, hi]: 1-2-5 steps, or on a log axis 1, 2, 5 × 10^k
 * (only 10^k over many decades). */
static int ticks(double lo, double hi, int log, int want, double *t, int max)
{
    int nt = 0;
    if (log) {
        /* under about a decade every digit, under 2.5 decades 1, 2, 5, else powers of ten */
        static const double m125[3] = {1, 2, 5}, m19[9] = {1, 2, 3, 4, 5, 6, 7, 8, 9};
        const int span = hi - lo < 1.2 ? 9 : hi - lo < 2.5 ? 3 : 1;
        for (double d = floor(lo); d <= ceil(hi) && nt < max; d++)
            for (int i = 0; i < span && nt < max; i++) {
                double v = d + log10(span == 9 ? m19[i] : m125[i]);
                if (v >= lo - 1e-9 && v <= hi + 1e-9)
                    t[nt++] = v;
            }
        return nt;
    }
    const double st = nice_step(lo, hi, want);
    for (double v = ceil(lo / st) * st; v <= hi + 1e-9 * st && nt < max; v += st)
        t[nt++] = fabs(v) < 1e-12 * st ? 0 : v;
    return nt;
}

static void axes(FILE *f, frame *fr, const char *xlabel, const char *ylabel)
{
    char b[32];
    double t[64];
    int nt = ticks(fr->y0, fr->y1, fr->logy, 5, t, 60);
    for (int i = 0; i < nt; i++) {
        double y = CH - MB - (t[i] - fr->y0) / (fr->y1 - fr->y0) * (CH - MT - MB);
        svg_fmt_num(b, sizeof b, fr->logy ? pow(10, t[i]) : t[i]);
        fprintf(f, "<line class=\"grid\" x1=\"%d\" x2=\"%d\" y1=\"%.1f\" y2=\"%.1f\"/>", ML, CW - MR, y, y);
        fprintf(f, "<text class=\"tick\" x=\"%d\" y=\"%.1f\" text-anchor=\"end\">%s</text>", ML - 6, y + 4, b);
    }
    nt = ticks(fr->x0, fr->x1, fr->logx, 6, t, 60);
    for (int i = 0; i < nt; i++) {
        double x = ML + (t[i] - fr->x0) / (fr->x1 - fr->x0) * (CW - ML - MR);
        svg_fmt_num(b, sizeof b, fr->logx ? pow(10, t[i]) : t[i]);
        fprintf(f, "<line class=\"grid\" x1=\"%.1f\" x2=\"%.1f\" y1=\"%d\" y2=\"%d\"/>", x, x, MT, CH - MB);
        fprintf(f, "<text class=\"tick\" x=\"%.1f\" y=\"%d\" text-anchor=\"middle\">%s</text>", x, CH - MB + 16, b);
    }
    fprintf(f, "<rect class=\"frame\" x=\"%d\" y=\"%d\" width=\"%d\" height=\"%d\"/>", ML, MT, CW - ML - MR,
            CH - MT - MB);
    fprintf(f, "<text class=\"axis\" x=\"%d\" y=\"%d\" text-anchor=\"middle\">", (ML + CW - MR) / 2, CH - 8);
    svg_esc(f, xlabel);
    fprintf(f, "</text><text class=\"axis\" transform=\"translate(14 %d) rotate(-90)\" text-anchor=\"middle\">",
            (MT + CH - MB) / 2);
    svg_esc(f, ylabel);
    fputs("</text>", f);
}

/* a point is drawn when finite, and positive on a log axis */
static int drawable(const frame *fr, double x, double y)
{
    return isfinite(x) && isfinite(y) && (!fr->logx || x > 0) && (!fr->logy || y > 0);
}

/* A polyline of at most SVG_MAX_POINTS bucket means (finite points only; gaps break it). */
static void draw_line(FILE *f, const frame *fr, const svg_line *L)
{
    int64_t per = L->n > SVG_MAX_POINTS ? (L->n + SVG_MAX_POINTS - 1) / SVG_MAX_POINTS : 1;
    int open = 0, drawn = 0;
    for (int64_t i = 0; i < L->n; i += per) {
        double sx = 0, sy = 0;
        int64_t k = 0;
        for (int64_t j = i; j < i + per && j < L->n; j++)
            if (drawable(fr, L->x[j], L->y[j])) {
                sx += L->x[j];
                sy += L->y[j];
                k++;
            }
        if (!k) {
            if (open)
                fputs("\"/>", f);
            open = 0;
            continue;
        }
        double x = px(fr, sx / k), y = py(fr, sy / k);
        if (!open) {
            fprintf(f, "<polyline fill=\"none\" stroke=\"%s\" stroke-width=\"%.1f\" stroke-opacity=\"%.2f\" "
                       "stroke-linejoin=\"round\"%s points=\"", L->color, L->width, L->opacity,
                    L->dash ? " stroke-dasharray=\"5 4\"" : "");
            open = 1;
        }
        fprintf(f, "%.1f,%.1f ", x, y);
        drawn++;
    }
    if (open)
        fputs("\"/>", f);
    (void)drawn;
    for (int64_t i = 0; L->dots && i < L->n; i++) /* few: evaluation steps */
        if (drawable(fr, L->x[i], L->y[i]))
            fprintf(f, "<circle cx=\"%.1f\" cy=\"%.1f\" r=\"3.2\" fill=\"%s\" stroke=\"#fff\" stroke-width=\"1\"/>",
                    px(fr, L->x[i]), py(fr, L->y[i]), L->color);
}

/* The axes' ranges from the drawable points of every line, padded; 0 when there is none. */
static int fit_frame(frame *fr, const svg_chart_opts *o, const svg_line *lines, int nl)
{
    *fr = (frame){INFINITY, -INFINITY, INFINITY, -INFINITY, o->logx, o->logy};
    for (int i = 0; i < nl; i++)
        for (int64_t j = 0; j < lines[i].n; j++) {
            double x = lines[i].x[j], y = lines[i].y[j];
            if (!drawable(fr, x, y))
                continue;
            x = o->logx ? log10(x) : x;
            y = o->logy ? log10(y) : y;
            fr->x0 = fmin(fr->x0, x);
            fr->x1 = fmax(fr->x1, x);
            fr->y0 = fmin(fr->y0, y);
            fr->y1 = fmax(fr->y1, y);
        }
    if (!(fr->x0 <= fr->x1))
        return 0;
    if (o->zero_based && !o->logy && fr->y0 > 0)
        fr->y0 = 0;
    if (fr->x1 == fr->x0) {
        fr->x0 -= 0.5;
        fr->x1 += 0.5;
    } else if (o->logx) { /* room for the end points' dots */
        double pad = 0.03 * (fr->x1 - fr->x0);
        fr->x0 -= pad;
        fr->x1 += pad;
    }
    if (fr->y1 == fr->y0) {
        double d = fr->y0 == 0 ? 1 : fabs(fr->y0) * 0.1;
        fr->y0 -= o->zero_based && fr->y0 == 0 ? 0 : d;
        fr->y1 += d;
    } else {
        double pad = 0.05 * (fr->y1 - fr->y0);
        fr->y1 += pad;
        if (!(o->zero_based && fr->y0 == 0))
            fr->y0 -= pad;
    }
    return 1;
}

/* One figure: title, legend, the SVG. Lines with label NULL stay out of the legend. */
void svg_chart(FILE *f, const svg_chart_opts *o, const svg_line *lines, int nl)
{
    frame fr;
    const int any = fit_frame(&fr, o, lines, nl);
    fputs("<figure class=\"card\"><figcaption>", f);
    svg_esc(f, o->title);
    fputs("</figcaption>", f);
    if (o->legend) {
        fputs("<div class=\"legend\">", f);
        for (int i = 0; i < nl; i++)
            if (lines[i].label) {
                fprintf(f, "<span><i style=\"background:%s\"></i>", lines[i].color);
                svg_esc(f, lines[i].label);
                fputs("</span>", f);
            }
        fputs("</div>", f);
    }
    if (!any) {
        fputs("<p class=\"empty\">no values recorded</p></figure>\n", f);
        return;
    }
    fprintf(f, "<svg viewBox=\"0 0 %d %d\" role=\"img\" aria-label=\"", CW, CH);
    svg_esc(f, o->title);
    fputs("\">", f);
    axes(f, &fr, o->xlabel, o->ylabel);
    for (int i = 0; i < nl; i++)
        draw_line(f, &fr, &lines[i]);
    fputs("</svg>", f);
    if (o->note) {
        fputs("<p class=\"note\">", f);
        svg_esc(f, o->note);
        fputs("</p>", f);
    }
    fputs("</figure>\n", f);
}

/* The same chart as a standalone SVG document (an image for a README): the title above,
 * the legend below, its own styles. */
void svg_chart_file(FILE *f, const svg_chart_opts *o, const svg_line *lines, int nl)
{
    frame fr;
    const int any = fit_frame(&fr, o, lines, nl);
    int nlab = 0;
    size_t longest = 1;
    for (int i = 0; i < o->legend * nl; i++)
        if (lines[i].label) {
            nlab++;
            longest = strlen(lines[i].label) > longest ? strlen(lines[i].label) : longest;
        }
    /* as many legend entries per row as the longest label allows (about 6.5 px a character) */
    int per_row = (int)((CW - ML - MR) / (26 + 6.5 * (double)longest));
    per_row = per_row < 1 ? 1 : per_row > 4 ? 4 : per_row;
    const int top = 30, rows = (nlab + per_row - 1) / per_row, H = top + CH + 18 * rows + 6;
    fprintf(f, "<svg xmlns=\"http://www.w3.org/2000/svg\" viewBox=\"0 0 %d %d\" width=\"%d\" height=\"%d\">\n"
               "<style>text{font-family:system-ui,-apple-system,'Segoe UI',Roboto,Arial,sans-serif}"
               ".grid{stroke:#eef0f3;stroke-width:1}.frame{fill:none;stroke:#d1d5db;stroke-width:1}"
               ".tick{font-size:11px;fill:#6b7280}.axis{font-size:12px;fill:#374151}"
               ".title{font-size:14px;font-weight:600;fill:#111827}.lab{font-size:11.5px;fill:#374151}</style>\n"
               "<rect width=\"100%%\" height=\"100%%\" fill=\"#fff\"/>"
               "<text class=\"title\" x=\"%d\" y=\"20\">",
            CW, H, CW, H, ML);
    svg_esc(f, o->title);
    fprintf(f, "</text>\n<g transform=\"translate(0 %d)\">", top);
    if (any) {
        axes(f, &fr, o->xlabel, o->ylabel);
        for (int i = 0; i < nl; i++)
            draw_line(f, &fr, &lines[i]);
    } else {
        fprintf(f, "<text class=\"axis\" x=\"%d\" y=\"%d\" text-anchor=\"middle\">no values recorded</text>", CW / 2,
                CH / 2);
    }
    fputs("</g>\n", f);
    for (int i = 0, k = 0; i < o->legend * nl; i++) {
        if (!lines[i].label)
            continue;
        const double x = ML + (k % per_row) * (double)(CW - ML - MR) / per_row, y = top + CH + 12 + 18 * (k / per_row);
        fprintf(f, "<line x1=\"%.1f\" x2=\"%.1f\" y1=\"%.1f\" y2=\"%.1f\" stroke=\"%s\" stroke-width=\"3\"%s/>", x,
                x + 16, y - 4, y - 4, lines[i].color, lines[i].dash ? " stroke-dasharray=\"4 3\"" : "");
        fprintf(f, "<text class=\"lab\" x=\"%.1f\" y=\"%.1f\">", x + 21, y);
        svg_esc(f, lines[i].label);
        fputs("</text>", f);
        k++;
    }
    fputs("\n</svg>\n", f);
}

/* Diverging blue–white–red over log2(load / balanced) in [-2, 2]. */
void svg_heat_color(double ratio, char *buf, size_t n)
{
    static const double stops[5][3] = {
        {33, 102, 172}, {103, 169, 207}, {247, 247, 247}, {239, 138, 98}, {178, 24, 43}};
    double t = ratio > 0 ? log2(ratio) : -2;
    t = t < -2 ? -2 : t > 2 ? 2 : t;
    double u = (t + 2); /* 0..4 */
    int i = (int)floor(u);
    if (i >= 4)
        i = 3;
    double w = u - i;
    int rgb[3];
    for (int c = 0; c < 3; c++)
        rgb[c] = (int)lround(stops[i][c] * (1 - w) + stops[i + 1][c] * w);
    snprintf(buf, n, "#%02x%02x%02x", rgb[0], rgb[1], rgb[2]);
}

void svg_heat_legend(FILE *f)
{
    fputs("<svg viewBox=\"0 0 600 40\" class=\"heat\" style=\"max-width:600px\">"
          "<defs><linearGradient id=\"hg\">",
          f);
    for (int i = 0; i <= 16; i++) {
        char col[16];
        svg_heat_color(pow(2, -2 + 4.0 * i / 16), col, sizeof col);
        fprintf(f, "<stop offset=\"%.3f\" stop-color=\"%s\"/>", i / 16.0, col);
    }
    fputs("</linearGradient></defs><rect x=\"100\" y=\"4\" width=\"400\" height=\"12\" fill=\"url(#hg)\" "
          "stroke=\"#d1d5db\"/>",
          f);
    static const char *const lab[5] = {"≤ ¼×", "½×", "1× (balanced)", "2×", "≥ 4×"};
    for (int i = 0; i < 5; i++)
        fprintf(f, "<text x=\"%d\" y=\"32\" text-anchor=\"middle\">%s</text>", 100 + i * 100, lab[i]);
    fputs("</svg>", f);
}

