/*
 * cmoe report RUN_DIR — RUN_DIR/report.html from RUN_DIR/metrics.jsonl (and config.json,
 * train.json when present): one self-contained page, inline SVG and CSS, no scripts, no
 * network. Charts: loss against steps and tokens, learning rate, tokens/s, gradient norm,
 * load balance, a heatmap of each MoE layer's expert load over time, dropped tokens and
 * every aux loss.
 *
 * Long runs are reduced before drawing (line charts to at most MAX_POINTS bucket means,
 * heatmaps to a cell budget), so the page stays small whatever the number of steps.
 */
#define _POSIX_C_SOURCE 200809L
#include "config.h"

#include <errno.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <jansson.h>

#include "cmoe.h"
#include "commands.h"
#include "model/info.h"
#include "run.h"

enum {
    MAX_POINTS = 800,      /* points per drawn line */
    LAYER_BINS = 400,      /* time buckets of the per-layer series */
    HEAT_CELLS = 60000,    /* rectangles over all heatmaps */
    HEAT_TITLES = 25000,   /* hover titles only below this many cells */
    N_AUX = 6,
};

static const char *const aux_keys[N_AUX] = {"lb", "importance", "load", "z", "mi", "total"};
static const char *const aux_titles[N_AUX] = {
    "Load-balancing loss (Switch / GShard)", "Importance loss (Shazeer)", "Load loss (Shazeer)",
    "Router z-loss (ST-MoE)", "Mutual-information loss (Mod-Squad)", "Aux total per layer (coefficients applied)"};

void help_report(void)
{
    printf("usage: cmoe report RUN_DIR [--out FILE]\n\n"
           "Writes RUN_DIR/report.html from RUN_DIR/metrics.jsonl (as written by cmoe train),\n"
           "with the model (config.json) and the settings (train.json) when they are there.\n"
           "The page is self-contained (inline SVG and CSS, no scripts, nothing fetched):\n"
           "training and validation loss against steps and against tokens, learning rate,\n"
           "tokens/s, gradient norm, load balance (max/mean expert load), a heatmap per MoE\n"
           "layer of each expert's share of the assignments over time, the dropped-token\n"
           "fraction and every aux loss (mean over layers and each layer).\n\n"
           "Options:\n"
           "  --out FILE   write here instead of RUN_DIR/report.html\n"
           "  --help       this text\n\n"
           "Exit status: 0 ok; 1 when RUN_DIR or metrics.jsonl is missing, empty or has a\n"
           "malformed line (the message gives its number); 2 usage.\n");
}

/* ---- growing arrays ------------------------------------------------------------- */

typedef struct {
    double *v;
    int64_t n, cap;
} vec;

static int vec_push(vec *a, double x)
{
    if (a->n == a->cap) {
        int64_t cap = a->cap ? 2 * a->cap : 256;
        double *v = realloc(a->v, (size_t)cap * sizeof *v);
        if (!v)
            return -1;
        a->v = v;
        a->cap = cap;
    }
    a->v[a->n++] = x;
    return 0;
}

/* ---- what metrics.jsonl holds ---------------------------------------------------- */

enum { S_STEP, S_LOSS, S_CE, S_AUX, S_LR, S_GNORM, S_TOKENS, S_TPS, S_ELAPSED, S_VAL, S_LMM, S_DROP, N_SERIES };
static const char *const series_keys[N_SERIES] = {"step", "loss", "ce", "aux", "lr", "grad_norm", "tokens",
                                                  "tokens_per_s", "elapsed_s", "val_loss", "load_max_over_mean",
                                                  "dropped_frac"};

typedef struct {
    int64_t layer, E;
    double *share;          /* [bins, E] Σ over the bin's steps of count_e / Σ count */
    double *aux[N_AUX];     /* [bins] Σ over the bin's steps */
    double *dropped;        /* [bins] */
    int64_t *n;             /* [bins] steps in each bin */
} layer_data;

typedef struct {
    int64_t n;                /* steps (records) */
    vec s[N_SERIES];          /* S_TOKENS holds the cumulative count */
    int has[N_SERIES];        /* the key appeared at least once */
    int nl;
    layer_data *l;
    int64_t bins;             /* time buckets of the per-layer data */
    int aux_nonzero[N_AUX];
} metrics;

static void metrics_free(metrics *m)
{
    for (int i = 0; i < N_SERIES; i++)
        free(m->s[i].v);
    for (int i = 0; i < m->nl; i++) {
        free(m->l[i].share);
        for (int a = 0; a < N_AUX; a++)
            free(m->l[i].aux[a]);
        free(m->l[i].dropped);
        free(m->l[i].n);
    }
    free(m->l);
}

static int fail(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    fputs("cmoe report: ", stderr);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
    return EXIT_FAIL;
}

static char *read_all(const char *path, size_t *len)
{
    FILE *f = fopen(path, "rb");
    if (!f)
        return NULL;
    size_t cap = 1 << 16, n = 0;
    char *buf = malloc(cap + 1);
    while (buf) {
        size_t k = fread(buf + n, 1, cap - n, f);
        n += k;
        if (n < cap)
            break;
        char *b = realloc(buf, 2 * cap + 1);
        if (!b) {
            free(buf);
            buf = NULL;
            break;
        }
        buf = b;
        cap *= 2;
    }
    int err = ferror(f);
    fclose(f);
    if (buf && err) {
        free(buf);
        return NULL;
    }
    if (buf) {
        buf[n] = '\0';
        *len = n;
    }
    return buf;
}

/* The layer structure from the first record. */
static int layers_from(json_t *layers, int64_t lineno, metrics *m)
{
    m->nl = (int)json_array_size(layers);
    m->l = calloc((size_t)m->nl + 1, sizeof *m->l);
    if (!m->l)
        return fail("out of memory");
    for (int i = 0; i < m->nl; i++) {
        json_t *o = json_array_get(layers, (size_t)i), *load = json_object_get(o, "load");
        json_t *li = json_object_get(o, "layer");
        if (!json_is_object(o) || !json_is_integer(li) || !json_is_array(load) || json_array_size(load) == 0)
            return fail("metrics.jsonl line %lld: layers[%d] needs \"layer\" (an integer) and \"load\" (an array of "
                        "counts, one per expert)", (long long)lineno, i);
        layer_data *L = &m->l[i];
        L->layer = json_integer_value(li);
        L->E = (int64_t)json_array_size(load);
        L->share = calloc((size_t)(m->bins * L->E), sizeof *L->share);
        L->dropped = calloc((size_t)m->bins, sizeof *L->dropped);
        L->n = calloc((size_t)m->bins, sizeof *L->n);
        int ok = L->share && L->dropped && L->n;
        for (int a = 0; a < N_AUX; a++)
            ok = ok && (L->aux[a] = calloc((size_t)m->bins, sizeof *L->aux[a]));
        if (!ok)
            return fail("out of memory");
    }
    return 0;
}

static double num_or_nan(json_t *v)
{
    return json_is_number(v) ? json_number_value(v) : NAN;
}

static int add_layers(json_t *layers, int64_t lineno, int64_t bin, metrics *m)
{
    if (!layers && m->nl == 0)
        return 0;
    if (!json_is_array(layers) || (int)json_array_size(layers) != m->nl)
        return fail("metrics.jsonl line %lld: \"layers\" must be an array of %d MoE layers, as on the first line",
                    (long long)lineno, m->nl);
    for (int i = 0; i < m->nl; i++) {
        layer_data *L = &m->l[i];
        json_t *o = json_array_get(layers, (size_t)i), *load = json_object_get(o, "load");
        json_t *li = json_object_get(o, "layer"), *aux = json_object_get(o, "aux");
        if (!json_is_object(o) || !json_is_integer(li) || json_integer_value(li) != L->layer || !json_is_array(load) ||
            (int64_t)json_array_size(load) != L->E)
            return fail("metrics.jsonl line %lld: layers[%d] must be layer %lld with a \"load\" array of %lld "
                        "counts, as on the first line", (long long)lineno, i, (long long)L->layer, (long long)L->E);
        double sum = 0;
        for (int64_t e = 0; e < L->E; e++) {
            json_t *c = json_array_get(load, (size_t)e);
            if (!json_is_number(c) || json_number_value(c) < 0)
                return fail("metrics.jsonl line %lld: layer %lld load[%lld] must be a count >= 0", (long long)lineno,
                            (long long)L->layer, (long long)e);
            sum += json_number_value(c);
        }
        for (int64_t e = 0; sum > 0 && e < L->E; e++)
            L->share[bin * L->E + e] += json_number_value(json_array_get(load, (size_t)e)) / sum;
        double d = num_or_nan(json_object_get(o, "dropped"));
        L->dropped[bin] += isfinite(d) ? d : 0;
        for (int a = 0; a < N_AUX; a++) {
            double v = json_is_object(aux) ? num_or_nan(json_object_get(aux, aux_keys[a])) : NAN;
            if (isfinite(v)) {
                L->aux[a][bin] += v;
                m->aux_nonzero[a] |= v != 0;
            }
        }
        L->n[bin]++;
    }
    return 0;
}

static int parse_record(const char *line, int64_t lineno, int64_t index, metrics *m)
{
    json_error_t err;
    json_t *o = json_loads(line, JSON_DECODE_ANY, &err);
    if (!o)
        return fail("metrics.jsonl line %lld: invalid JSON at column %d: %s", (long long)lineno, err.column, err.text);
    int rc = 0;
    if (!json_is_object(o)) {
        rc = fail("metrics.jsonl line %lld: not a JSON object", (long long)lineno);
        goto done;
    }
    if (!json_is_integer(json_object_get(o, "step"))) {
        rc = fail("metrics.jsonl line %lld: no \"step\" (an integer)", (long long)lineno);
        goto done;
    }
    for (int i = 0; i < N_SERIES; i++) {
        json_t *v = json_object_get(o, series_keys[i]);
        if (v && !json_is_number(v) && !json_is_null(v)) {
            rc = fail("metrics.jsonl line %lld: \"%s\" must be a number", (long long)lineno, series_keys[i]);
            goto done;
        }
        double x = num_or_nan(v);
        m->has[i] |= v != NULL && isfinite(x);
        if (i == S_TOKENS) /* per step in the file, cumulative here */
            x = (m->s[i].n ? m->s[i].v[m->s[i].n - 1] : 0) + (isfinite(x) ? x : NAN);
        if (vec_push(&m->s[i], x)) {
            rc = fail("out of memory");
            goto done;
        }
    }
    json_t *layers = json_object_get(o, "layers");
    if (index == 0 && json_is_array(layers) && (rc = layers_from(layers, lineno, m)))
        goto done;
    rc = add_layers(layers, lineno, index * m->bins / m->n, m);
done:
    json_decref(o);
    return rc;
}

static int is_blank(const char *s)
{
    for (; *s; s++)
        if (*s != ' ' && *s != '\t' && *s != '\r')
            return 0;
    return 1;
}

static int load_metrics(const char *path, metrics *m)
{
    memset(m, 0, sizeof *m);
    size_t len;
    char *text = read_all(path, &len);
    if (!text)
        return fail("cannot read %s: %s", path, strerror(errno ? errno : EIO));
    if (memchr(text, '\0', len)) {
        free(text);
        return fail("%s holds a NUL byte: not a metrics.jsonl written by cmoe train", path);
    }
    for (char *p = text; *p;) { /* records = non-blank lines */
        char *nl = strchr(p, '\n');
        if (nl)
            *nl = '\0';
        m->n += !is_blank(p);
        if (nl)
            *nl = '\n';
        p = nl ? nl + 1 : p + strlen(p);
    }
    if (m->n == 0) {
        free(text);
        return fail("%s is empty: no training steps to report (has the run started?)", path);
    }
    m->bins = m->n < LAYER_BINS ? m->n : LAYER_BINS;
    int rc = 0;
    int64_t lineno = 0, index = 0;
    for (char *p = text; *p && !rc;) {
        char *nl = strchr(p, '\n');
        if (nl)
            *nl = '\0';
        lineno++;
        if (!is_blank(p))
            rc = parse_record(p, lineno, index++, m);
        p = nl ? nl + 1 : p + strlen(p);
    }
    free(text);
    return rc;
}

/* ---- HTML and SVG helpers --------------------------------------------------------- */

static void esc(FILE *f, const char *s)
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
static void fmt_num(char *buf, size_t n, double v)
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

static void fmt_duration(char *buf, size_t n, double s)
{
    if (!isfinite(s) || s < 0)
        snprintf(buf, n, "–");
    else if (s < 60)
        snprintf(buf, n, "%.1f s", s);
    else if (s < 3600)
        snprintf(buf, n, "%d min %02d s", (int)s / 60, (int)s % 60);
    else
        snprintf(buf, n, "%d h %02d min", (int)(s / 3600), ((int)s / 60) % 60);
}

/* Tick step 1, 2 or 5 × 10^k giving about `want` intervals over [lo, hi]. */
static double nice_step(double lo, double hi, int want)
{
    double raw = (hi - lo) / want, p = pow(10, floor(log10(raw))), r = raw / p;
    return (r < 1.5 ? 1 : r < 3.5 ? 2 : r < 7.5 ? 5 : 10) * p;
}

typedef struct {
    const char *label, *color;
    const double *x, *y;
    int64_t n;
    double width, opacity;
    int dots, dash;
} line;

enum { CW = 600, CH = 290, ML = 62, MR = 18, MT = 14, MB = 44 };

typedef struct {
    double x0, x1, y0, y1;
    int logy;
} frame;

static double px(const frame *fr, double x)
{
    return ML + (x - fr->x0) / (fr->x1 - fr->x0) * (CW - ML - MR);
}

static double py(const frame *fr, double y)
{
    if (fr->logy)
        y = log10(y);
    return CH - MB - (y - fr->y0) / (fr->y1 - fr->y0) * (CH - MT - MB);
}

static void axes(FILE *f, frame *fr, const char *xlabel, const char *ylabel)
{
    char b[32];
    /* y grid and labels; a log axis gets 1, 2, 5 × 10^k (only 10^k over many decades) */
    double ticks[64];
    int nt = 0;
    double st = nice_step(fr->y0, fr->y1, 5);
    if (fr->logy) {
        static const double m125[3] = {1, 2, 5};
        const int dense = fr->y1 - fr->y0 < 2.5;
        for (double d = floor(fr->y0); d <= ceil(fr->y1) && nt < 60; d++)
            for (int i = 0; i < (dense ? 3 : 1); i++) {
                double t = d + log10(m125[i]);
                if (t >= fr->y0 && t <= fr->y1)
                    ticks[nt++] = t;
            }
    } else {
        for (double t = ceil(fr->y0 / st) * st; t <= fr->y1 + 1e-9 * st && nt < 60; t += st)
            ticks[nt++] = fabs(t) < 1e-12 * st ? 0 : t;
    }
    for (int i = 0; i < nt; i++) {
        double y = CH - MB - (ticks[i] - fr->y0) / (fr->y1 - fr->y0) * (CH - MT - MB);
        fmt_num(b, sizeof b, fr->logy ? pow(10, ticks[i]) : ticks[i]);
        fprintf(f, "<line class=\"grid\" x1=\"%d\" x2=\"%d\" y1=\"%.1f\" y2=\"%.1f\"/>", ML, CW - MR, y, y);
        fprintf(f, "<text class=\"tick\" x=\"%d\" y=\"%.1f\" text-anchor=\"end\">%s</text>", ML - 6, y + 4, b);
    }
    st = nice_step(fr->x0, fr->x1, 6);
    for (double t = ceil(fr->x0 / st) * st; t <= fr->x1 + 1e-9 * st; t += st) {
        double x = px(fr, t);
        fmt_num(b, sizeof b, fabs(t) < 1e-12 * st ? 0 : t);
        fprintf(f, "<line class=\"grid\" x1=\"%.1f\" x2=\"%.1f\" y1=\"%d\" y2=\"%d\"/>", x, x, MT, CH - MB);
        fprintf(f, "<text class=\"tick\" x=\"%.1f\" y=\"%d\" text-anchor=\"middle\">%s</text>", x, CH - MB + 16, b);
    }
    fprintf(f, "<rect class=\"frame\" x=\"%d\" y=\"%d\" width=\"%d\" height=\"%d\"/>", ML, MT, CW - ML - MR,
            CH - MT - MB);
    fprintf(f, "<text class=\"axis\" x=\"%d\" y=\"%d\" text-anchor=\"middle\">", (ML + CW - MR) / 2, CH - 8);
    esc(f, xlabel);
    fprintf(f, "</text><text class=\"axis\" transform=\"translate(14 %d) rotate(-90)\" text-anchor=\"middle\">",
            (MT + CH - MB) / 2);
    esc(f, ylabel);
    fputs("</text>", f);
}

/* A polyline of at most MAX_POINTS bucket means (finite points only; gaps break it). */
static void draw_line(FILE *f, const frame *fr, const line *L)
{
    int64_t per = L->n > MAX_POINTS ? (L->n + MAX_POINTS - 1) / MAX_POINTS : 1;
    int open = 0, drawn = 0;
    for (int64_t i = 0; i < L->n; i += per) {
        double sx = 0, sy = 0;
        int64_t k = 0;
        for (int64_t j = i; j < i + per && j < L->n; j++)
            if (isfinite(L->x[j]) && isfinite(L->y[j]) && (!fr->logy || L->y[j] > 0)) {
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
        if (isfinite(L->x[i]) && isfinite(L->y[i]) && (!fr->logy || L->y[i] > 0))
            fprintf(f, "<circle cx=\"%.1f\" cy=\"%.1f\" r=\"3.2\" fill=\"%s\" stroke=\"#fff\" stroke-width=\"1\"/>",
                    px(fr, L->x[i]), py(fr, L->y[i]), L->color);
}

typedef struct {
    const char *title, *xlabel, *ylabel, *note;
    int logy, zero_based, legend;
} chart_opts;

/* One figure: title, legend, the SVG. Lines with label NULL stay out of the legend. */
static void chart(FILE *f, const chart_opts *o, const line *lines, int nl)
{
    frame fr = {INFINITY, -INFINITY, INFINITY, -INFINITY, o->logy};
    for (int i = 0; i < nl; i++)
        for (int64_t j = 0; j < lines[i].n; j++) {
            double x = lines[i].x[j], y = lines[i].y[j];
            if (!isfinite(x) || !isfinite(y) || (o->logy && y <= 0))
                continue;
            y = o->logy ? log10(y) : y;
            fr.x0 = fmin(fr.x0, x);
            fr.x1 = fmax(fr.x1, x);
            fr.y0 = fmin(fr.y0, y);
            fr.y1 = fmax(fr.y1, y);
        }
    fputs("<figure class=\"card\"><figcaption>", f);
    esc(f, o->title);
    fputs("</figcaption>", f);
    if (o->legend) {
        fputs("<div class=\"legend\">", f);
        for (int i = 0; i < nl; i++)
            if (lines[i].label) {
                fprintf(f, "<span><i style=\"background:%s\"></i>", lines[i].color);
                esc(f, lines[i].label);
                fputs("</span>", f);
            }
        fputs("</div>", f);
    }
    if (!(fr.x0 <= fr.x1)) {
        fputs("<p class=\"empty\">no values recorded</p></figure>\n", f);
        return;
    }
    if (o->zero_based && !o->logy && fr.y0 > 0)
        fr.y0 = 0;
    if (fr.x1 == fr.x0) {
        fr.x0 -= 0.5;
        fr.x1 += 0.5;
    }
    if (fr.y1 == fr.y0) {
        double d = fr.y0 == 0 ? 1 : fabs(fr.y0) * 0.1;
        fr.y0 -= o->zero_based && fr.y0 == 0 ? 0 : d;
        fr.y1 += d;
    } else {
        double pad = 0.05 * (fr.y1 - fr.y0);
        fr.y1 += pad;
        if (!(o->zero_based && fr.y0 == 0))
            fr.y0 -= pad;
    }
    fprintf(f, "<svg viewBox=\"0 0 %d %d\" role=\"img\" aria-label=\"", CW, CH);
    esc(f, o->title);
    fputs("\">", f);
    axes(f, &fr, o->xlabel, o->ylabel);
    for (int i = 0; i < nl; i++)
        draw_line(f, &fr, &lines[i]);
    fputs("</svg>", f);
    if (o->note) {
        fputs("<p class=\"note\">", f);
        esc(f, o->note);
        fputs("</p>", f);
    }
    fputs("</figure>\n", f);
}

/* Debiased exponential moving average (TensorBoard's smoothing), NaN-skipping. */
static double *ema(const double *y, int64_t n, double alpha)
{
    double *out = malloc((size_t)(n ? n : 1) * sizeof *out), acc = 0, w = 0;
    for (int64_t i = 0; out && i < n; i++) {
        if (isfinite(y[i])) {
            acc = alpha * acc + (1 - alpha) * y[i];
            w = alpha * w + (1 - alpha);
        }
        out[i] = w > 0 ? acc / w : NAN;
    }
    return out;
}

static double smoothing(int64_t n)
{
    /* a window of about n/40 steps, between 1 and 200 */
    double win = (double)n / 40;
    win = win < 1 ? 1 : win > 200 ? 200 : win;
    return 1 - 1 / win;
}

static const char *const palette[] = {"#2563eb", "#ea580c", "#16a34a", "#9333ea", "#dc2626",
                                      "#0891b2", "#ca8a04", "#db2777", "#4b5563", "#65a30d"};
#define PALETTE_N ((int)(sizeof palette / sizeof *palette))

/* ---- the sections -------------------------------------------------------------------- */

static const char *css =
    "*{box-sizing:border-box}"
    "body{margin:0;font:14px/1.45 system-ui,-apple-system,'Segoe UI',Roboto,'Helvetica Neue',Arial,sans-serif;"
    "color:#1f2937;background:#f3f4f6}"
    "header{background:#111827;color:#f9fafb;padding:22px 32px 18px}"
    "header h1{margin:0;font-size:22px;font-weight:600;letter-spacing:.2px}"
    "header .sub{color:#9ca3af;margin-top:4px;font-size:13px;word-break:break-all}"
    "main{max-width:1260px;margin:0 auto;padding:18px 24px 40px}"
    "h2{font-size:16px;font-weight:600;margin:28px 4px 10px;color:#111827;border-bottom:1px solid #e5e7eb;"
    "padding-bottom:6px}"
    ".stats{display:grid;grid-template-columns:repeat(auto-fill,minmax(170px,1fr));gap:10px}"
    ".stat{background:#fff;border-radius:8px;padding:10px 14px;box-shadow:0 1px 2px rgba(0,0,0,.06)}"
    ".stat b{display:block;font-size:20px;font-weight:600;color:#111827;font-variant-numeric:tabular-nums}"
    ".stat span{font-size:12px;color:#6b7280;text-transform:uppercase;letter-spacing:.4px}"
    ".grid2{display:grid;grid-template-columns:repeat(auto-fit,minmax(520px,1fr));gap:14px}"
    ".card{background:#fff;border-radius:8px;margin:0;padding:12px 14px 8px;box-shadow:0 1px 2px rgba(0,0,0,.06)}"
    "figcaption{font-weight:600;font-size:14px;margin-bottom:2px}"
    ".legend{font-size:12px;color:#4b5563;display:flex;flex-wrap:wrap;gap:4px 14px;margin:2px 0 4px}"
    ".legend i{display:inline-block;width:14px;height:3px;border-radius:2px;vertical-align:middle;margin-right:5px}"
    "svg{width:100%;height:auto;display:block}"
    "svg text{font-family:inherit}"
    ".grid{stroke:#eef0f3;stroke-width:1}"
    ".frame{fill:none;stroke:#d1d5db;stroke-width:1}"
    ".tick{font-size:11px;fill:#6b7280}"
    ".axis{font-size:12px;fill:#374151}"
    ".note,.empty{font-size:12px;color:#6b7280;margin:4px 2px}"
    "table.kv{border-collapse:collapse;width:100%;font-size:13px}"
    "table.kv td{padding:3px 8px;border-bottom:1px solid #f1f2f4;vertical-align:top}"
    "table.kv td:first-child{color:#6b7280;white-space:nowrap;width:1%}"
    "table.kv td:last-child{font-variant-numeric:tabular-nums;word-break:break-all}"
    ".heat text{font-size:10px;fill:#6b7280}"
    "footer{color:#9ca3af;font-size:12px;text-align:center;margin-top:30px}";

static void stat(FILE *f, const char *label, const char *value)
{
    fputs("<div class=\"stat\"><span>", f);
    esc(f, label);
    fputs("</span><b>", f);
    esc(f, value);
    fputs("</b></div>", f);
}

static double last_finite(const vec *a)
{
    for (int64_t i = a->n - 1; i >= 0; i--)
        if (isfinite(a->v[i]))
            return a->v[i];
    return NAN;
}

static void summary(FILE *f, const metrics *m, const double *ce_smooth, const moe_model_info *info)
{
    char b[64], c[64];
    fputs("<div class=\"stats\">", f);
    snprintf(b, sizeof b, "%lld", (long long)last_finite(&m->s[S_STEP]));
    stat(f, "steps", b);
    if (m->has[S_TOKENS]) {
        fmt_num(b, sizeof b, last_finite(&m->s[S_TOKENS]));
        stat(f, "tokens", b);
    }
    const vec *tr = m->has[S_CE] ? &m->s[S_CE] : &m->s[S_LOSS];
    if (m->has[S_CE] || m->has[S_LOSS]) {
        double last = NAN;
        for (int64_t i = m->n - 1; i >= 0 && !isfinite(last); i--)
            last = ce_smooth[i];
        snprintf(b, sizeof b, "%.4f", last);
        stat(f, "train loss (smoothed)", b);
        (void)tr;
    }
    if (m->has[S_VAL]) {
        int64_t best = -1;
        for (int64_t i = 0; i < m->n; i++)
            if (isfinite(m->s[S_VAL].v[i]) && (best < 0 || m->s[S_VAL].v[i] < m->s[S_VAL].v[best]))
                best = i;
        snprintf(b, sizeof b, "%.4f", last_finite(&m->s[S_VAL]));
        stat(f, "validation loss (last)", b);
        snprintf(c, sizeof c, "%.4f @ %lld", m->s[S_VAL].v[best], (long long)m->s[S_STEP].v[best]);
        stat(f, "validation loss (best)", c);
    }
    if (m->has[S_TPS]) {
        /* the median, robust to the first (warm-up) steps */
        double *t = malloc((size_t)m->n * sizeof *t);
        int64_t k = 0;
        for (int64_t i = 0; t && i < m->n; i++)
            if (isfinite(m->s[S_TPS].v[i]))
                t[k++] = m->s[S_TPS].v[i];
        for (int64_t i = 1; i < k; i++) /* insertion sort is fine for a summary of a few thousand */
            for (int64_t j = i; j > 0 && t[j - 1] > t[j]; j--) {
                double x = t[j];
                t[j] = t[j - 1];
                t[j - 1] = x;
            }
        if (k) {
            fmt_num(b, sizeof b, t[k / 2]);
            strncat(b, " /s", sizeof b - strlen(b) - 1);
            stat(f, "tokens / s (median)", b);
        }
        free(t);
    }
    if (m->has[S_ELAPSED]) {
        fmt_duration(b, sizeof b, last_finite(&m->s[S_ELAPSED]));
        stat(f, "wall time", b);
    }
    if (info) {
        fmt_num(b, sizeof b, (double)info->total_params);
        fmt_num(c, sizeof c, (double)info->active_params);
        char p[140];
        snprintf(p, sizeof p, "%s / %s", b, c);
        stat(f, "params total / active", p);
    }
    fputs("</div>\n", f);
}

/* A JSON object's top-level scalars as a two-column table. */
static void kv_table(FILE *f, const char *title, json_t *o)
{
    if (!json_is_object(o))
        return;
    fprintf(f, "<figure class=\"card\"><figcaption>%s</figcaption><table class=\"kv\">", title);
    const char *k;
    json_t *v;
    json_object_foreach(o, k, v) {
        char buf[64];
        char *dump = NULL;
        const char *text = buf;
        if (json_is_string(v))
            text = json_string_value(v);
        else if (json_is_integer(v))
            snprintf(buf, sizeof buf, "%lld", (long long)json_integer_value(v));
        else if (json_is_real(v))
            snprintf(buf, sizeof buf, "%.6g", json_real_value(v));
        else if (json_is_boolean(v))
            text = json_is_true(v) ? "true" : "false";
        else if (json_is_null(v))
            text = "null";
        else
            text = dump = json_dumps(v, JSON_COMPACT);
        fputs("<tr><td>", f);
        esc(f, k);
        fputs("</td><td>", f);
        esc(f, text ? text : "");
        fputs("</td></tr>", f);
        free(dump);
    }
    fputs("</table></figure>\n", f);
}

/* Diverging blue–white–red over log2(load / balanced) in [-2, 2]. */
static void heat_color(double ratio, char *buf, size_t n)
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

static void heat_legend(FILE *f)
{
    fputs("<svg viewBox=\"0 0 600 40\" class=\"heat\" style=\"max-width:600px\">"
          "<defs><linearGradient id=\"hg\">",
          f);
    for (int i = 0; i <= 16; i++) {
        char col[16];
        heat_color(pow(2, -2 + 4.0 * i / 16), col, sizeof col);
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

/* One heatmap: experts down, time across, colour = share of the layer's assignments × E. */
static void heatmap(FILE *f, const metrics *m, const layer_data *L, int64_t cols, int titles)
{
    const int W = 600, left = 46, right = 10, top = 6;
    const double rh = fmin(22, fmax(1.5, 180.0 / (double)L->E));
    const double plot_h = rh * (double)L->E;
    const int H = (int)ceil(top + plot_h + 34);
    const double cw = (double)(W - left - right) / (double)cols;
    fprintf(f, "<figure class=\"card\"><figcaption>Layer %lld · %lld experts</figcaption>", (long long)L->layer,
            (long long)L->E);
    fprintf(f, "<svg viewBox=\"0 0 %d %d\" class=\"heat\" shape-rendering=\"crispEdges\">", W, H);
    /* time columns merge whole layer bins */
    for (int64_t c = 0; c < cols; c++) {
        int64_t b0 = c * m->bins / cols, b1 = (c + 1) * m->bins / cols;
        int64_t n = 0;
        for (int64_t b = b0; b < b1; b++)
            n += L->n[b];
        if (!n)
            continue;
        int64_t s0 = (int64_t)m->s[S_STEP].v[b0 * m->n / m->bins];
        int64_t s1 = (int64_t)m->s[S_STEP].v[b1 * m->n / m->bins - 1];
        for (int64_t e = 0; e < L->E; e++) {
            double share = 0;
            for (int64_t b = b0; b < b1; b++)
                share += L->share[b * L->E + e];
            share /= (double)n;
            char col[16];
            heat_color(share * (double)L->E, col, sizeof col);
            fprintf(f, "<rect x=\"%.2f\" y=\"%.2f\" width=\"%.2f\" height=\"%.2f\" fill=\"%s\">", left + c * cw,
                    top + e * rh, cw + 0.05, rh + 0.05, col);
            if (titles)
                fprintf(f, "<title>expert %lld, steps %lld–%lld: %.1f%% of assignments (%.2f× balanced)</title>",
                        (long long)e, (long long)s0, (long long)s1, 100 * share, share * (double)L->E);
            fputs("</rect>", f);
        }
    }
    fprintf(f, "<rect x=\"%d\" y=\"%d\" width=\"%d\" height=\"%.2f\" fill=\"none\" stroke=\"#d1d5db\"/>", left, top,
            W - left - right, plot_h);
    /* expert labels: each when they fit, else about eight */
    int64_t every = L->E <= 16 ? 1 : (L->E + 7) / 8;
    for (int64_t e = 0; e < L->E; e += every)
        fprintf(f, "<text x=\"%d\" y=\"%.1f\" text-anchor=\"end\">%lld</text>", left - 4, top + (e + 0.5) * rh + 3.5,
                (long long)e);
    fprintf(f, "<text transform=\"translate(12 %.1f) rotate(-90)\" text-anchor=\"middle\">expert</text>",
            top + plot_h / 2);
    /* step labels at both ends and the middle */
    for (int i = 0; i <= 2; i++) {
        int64_t idx = i == 2 ? m->n - 1 : i * (m->n - 1) / 2;
        fprintf(f, "<text x=\"%.1f\" y=\"%.1f\" text-anchor=\"%s\">step %lld</text>",
                left + (double)i / 2 * (W - left - right), top + plot_h + 14,
                i == 0 ? "start" : i == 1 ? "middle" : "end", (long long)m->s[S_STEP].v[idx]);
    }
    fputs("</svg></figure>\n", f);
}

/* Per-layer series of one quantity (bin means), their mean over layers, as a chart. */
static void layer_chart(FILE *f, const metrics *m, const chart_opts *o, int aux /* -1: dropped */)
{
    const int64_t B = m->bins;
    double *x = malloc((size_t)B * sizeof *x), *y = malloc((size_t)(B * (m->nl + 1)) * sizeof *y);
    line *lines = calloc((size_t)m->nl + 1, sizeof *lines);
    char(*labels)[32] = calloc((size_t)m->nl + 1, sizeof *labels);
    if (!x || !y || !lines || !labels)
        goto done;
    for (int64_t b = 0; b < B; b++) {
        int64_t i0 = b * m->n / B, i1 = (b + 1) * m->n / B;
        double s = 0;
        for (int64_t i = i0; i < i1; i++)
            s += m->s[S_STEP].v[i];
        x[b] = i1 > i0 ? s / (double)(i1 - i0) : NAN;
        double mean = 0;
        for (int l = 0; l < m->nl; l++) {
            const layer_data *L = &m->l[l];
            double v = L->n[b] ? (aux < 0 ? L->dropped[b] : L->aux[aux][b]) / (double)L->n[b] : NAN;
            if (aux < 0)
                v *= 100;
            y[(l + 1) * B + b] = v;
            mean += v;
        }
        y[b] = mean / m->nl;
    }
    int nl = 0;
    const int many = m->nl > PALETTE_N;
    for (int l = 0; l < m->nl; l++) {
        snprintf(labels[l], sizeof labels[l], "layer %lld", (long long)m->l[l].layer);
        lines[nl++] = (line){many ? NULL : labels[l], palette[l % PALETTE_N], x, y + (l + 1) * B, B, 1.2,
                             m->nl > 1 ? 0.55 : 1, 0, 0};
    }
    if (m->nl > 1)
        lines[nl++] = (line){"mean over layers", "#111827", x, y, B, 2.4, 1, 0, 0};
    chart(f, o, lines, nl);
done:
    free(x);
    free(y);
    free(lines);
    free(labels);
}

static json_t *load_json(const char *dir, const char *name)
{
    char path[4096];
    if (cli_path(path, sizeof path, dir, name))
        return NULL;
    return json_load_file(path, 0, NULL);
}

static int write_report(FILE *f, const char *dir, const metrics *m)
{
    const int64_t n = m->n;
    const double *step = m->s[S_STEP].v;
    /* training loss: cross-entropy when recorded (comparable with val_loss), else loss */
    const int ti = m->has[S_CE] ? S_CE : S_LOSS;
    double *ce_s = ema(m->s[ti].v, n, smoothing(n));
    double *tps_s = ema(m->s[S_TPS].v, n, smoothing(n));
    double *drop = malloc((size_t)n * sizeof *drop);
    if (!ce_s || !tps_s || !drop) {
        free(ce_s), free(tps_s), free(drop);
        return fail("out of memory");
    }
    for (int64_t i = 0; i < n; i++)
        drop[i] = 100 * m->s[S_DROP].v[i];

    json_t *train = load_json(dir, "train.json"), *cfgj = load_json(dir, "config.json");
    moe_model_config cfg;
    moe_model_info info, *infop = NULL;
    char cpath[4096];
    if (cli_path(cpath, sizeof cpath, dir, "config.json") == MOE_OK && moe_model_config_load(cpath, &cfg) == MOE_OK &&
        moe_model_info_compute(&cfg, 0, &info) == MOE_OK)
        infop = &info;

    char when[64];
    time_t t = time(NULL);
    strftime(when, sizeof when, "%Y-%m-%d %H:%M", localtime(&t));
    fputs("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"/>"
          "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\"/><title>cmoe report: ",
          f);
    esc(f, dir);
    fprintf(f, "</title><style>%s</style></head><body>\n<header><h1>cmoe training report</h1><div class=\"sub\">",
            css);
    esc(f, dir);
    fprintf(f, " · %lld steps · written %s by cmoe %s</div></header>\n<main>\n", (long long)n, when, moe_version());
    summary(f, m, ce_s, infop);

    const char *tl = ti == S_CE ? "train (cross-entropy)" : "train (loss)";
    const char *tl_s = ti == S_CE ? "train, smoothed" : "train loss, smoothed";
    double *val_x = malloc((size_t)n * sizeof *val_x), *val_t = malloc((size_t)n * sizeof *val_t),
           *val_y = malloc((size_t)n * sizeof *val_y);
    int64_t nv = 0;
    for (int64_t i = 0; val_x && val_t && val_y && i < n; i++)
        if (isfinite(m->s[S_VAL].v[i])) {
            val_x[nv] = step[i];
            val_t[nv] = m->s[S_TOKENS].v[i];
            val_y[nv++] = m->s[S_VAL].v[i];
        }

    fputs("<h2>Loss</h2><div class=\"grid2\">\n", f);
    {
        line L[3] = {{tl, "#93c5fd", step, m->s[ti].v, n, 1, 0.9, 0, 0},
                     {tl_s, "#2563eb", step, ce_s, n, 2.2, 1, 0, 0},
                     {"validation", "#ea580c", val_x, val_y, nv, 2, 1, 1, 0}};
        chart_opts o = {"Loss vs steps", "step", "loss (nats / token)",
                        ti == S_CE ? "Training cross-entropy, without the aux losses, so it compares with the "
                                     "validation loss."
                                   : NULL,
                        0, 0, 1};
        chart(f, &o, L, nv ? 3 : 2);
        if (m->has[S_TOKENS]) {
            line T[3] = {{tl, "#93c5fd", m->s[S_TOKENS].v, m->s[ti].v, n, 1, 0.9, 0, 0},
                         {tl_s, "#2563eb", m->s[S_TOKENS].v, ce_s, n, 2.2, 1, 0, 0},
                         {"validation", "#ea580c", val_t, val_y, nv, 2, 1, 1, 0}};
            chart_opts ot = {"Loss vs tokens", "tokens seen", "loss (nats / token)", NULL, 0, 0, 1};
            chart(f, &ot, T, nv ? 3 : 2);
        } else {
            fputs("<figure class=\"card\"><figcaption>Loss vs tokens</figcaption><p class=\"empty\">metrics.jsonl "
                  "has no \"tokens\" per step</p></figure>\n",
                  f);
        }
    }
    fputs("</div>\n<h2>Optimisation</h2><div class=\"grid2\">\n", f);
    {
        line lr = {"learning rate", "#9333ea", step, m->s[S_LR].v, n, 2, 1, 0, 0};
        chart_opts o = {"Learning rate", "step", "learning rate", NULL, 0, 1, 0};
        chart(f, &o, &lr, 1);
        line tp[2] = {{"per step", "#86efac", step, m->s[S_TPS].v, n, 1, 0.9, 0, 0},
                      {"smoothed", "#16a34a", step, tps_s, n, 2.2, 1, 0, 0}};
        chart_opts ot = {"Throughput", "step", "tokens / s", NULL, 0, 1, 1};
        chart(f, &ot, tp, 2);
        if (m->has[S_GNORM]) {
            line g = {"gradient norm", "#0891b2", step, m->s[S_GNORM].v, n, 1.4, 1, 0, 0};
            chart_opts og = {"Gradient norm (before clipping)", "step", "global L2 norm", NULL, 1, 0, 0};
            chart(f, &og, &g, 1);
        }
        if (m->has[S_AUX]) {
            line ls = {"aux", "#dc2626", step, m->s[S_AUX].v, n, 1.4, 1, 0, 0};
            chart_opts ol = {"Aux loss in the objective (Σ over layers of coefficient × loss)", "step",
                             "loss − cross-entropy", "The training loss is cross-entropy + this.", 0, 0, 0};
            chart(f, &ol, &ls, 1);
        }
    }
    fputs("</div>\n", f);

    if (m->nl > 0) {
        fputs("<h2>Experts</h2>\n<p class=\"note\">Each expert's share of its layer's kept assignments over "
              "training, relative to a perfectly balanced router (1× = 1/E of the assignments). Red experts are "
              "overloaded, blue ones starved.</p>",
              f);
        heat_legend(f);
        int64_t rows = 0;
        for (int l = 0; l < m->nl; l++)
            rows += m->l[l].E;
        int64_t cols = HEAT_CELLS / (rows ? rows : 1);
        cols = cols > 240 ? 240 : cols < 16 ? 16 : cols;
        cols = cols > m->bins ? m->bins : cols;
        fputs("<div class=\"grid2\">\n", f);
        for (int l = 0; l < m->nl; l++)
            heatmap(f, m, &m->l[l], cols, rows * cols <= HEAT_TITLES);
        fputs("</div>\n<div class=\"grid2\" style=\"margin-top:14px\">\n", f);
        if (m->has[S_LMM]) {
            line b = {"max / mean load", "#db2777", step, m->s[S_LMM].v, n, 1.4, 1, 0, 0};
            chart_opts o = {"Load imbalance (mean over layers of max / mean expert load)", "step",
                            "max / mean (1 = balanced)", NULL, 0, 0, 0};
            chart(f, &o, &b, 1);
        }
        int any_drop = 0;
        for (int64_t i = 0; i < n; i++)
            any_drop |= isfinite(drop[i]) && drop[i] > 0;
        chart_opts od = {"Dropped tokens", "step", "dropped assignments (%)",
                         any_drop ? "Share of the selected (token, expert) assignments dropped by capacity."
                                  : "No assignment was dropped (dropless routing, or capacity never reached).",
                         0, 1, 1};
        layer_chart(f, m, &od, -1);
        fputs("</div>\n<h2>Aux losses</h2><div class=\"grid2\">\n", f);
        int shown = 0;
        for (int a = 0; a < N_AUX; a++) {
            if (!m->aux_nonzero[a])
                continue;
            char note[160] = "";
            if (infop && a < N_AUX - 1) {
                const double coef[N_AUX - 1] = {cfg.moe.lb_coef, cfg.moe.importance_coef, cfg.moe.load_coef,
                                                cfg.moe.z_coef, cfg.moe.mi_coef};
                if (coef[a] > 0)
                    snprintf(note, sizeof note, "Coefficient %g (config.json): the objective gets %g × this.",
                             coef[a], coef[a]);
                else
                    snprintf(note, sizeof note, "Coefficient 0 (config.json): computed for monitoring, not trained on.");
            }
            chart_opts o = {aux_titles[a], "step", a == N_AUX - 1 ? "coef × loss" : "loss (unscaled)",
                            *note ? note : NULL, 0, 0, 1};
            layer_chart(f, m, &o, a);
            shown++;
        }
        if (!shown)
            fputs("<p class=\"note\">Every aux loss is zero in this run.</p>", f);
        fputs("</div>\n", f);
        char off[256] = "";
        for (int a = 0; a < N_AUX - 1; a++)
            if (!m->aux_nonzero[a]) {
                strncat(off, *off ? ", " : "", sizeof off - strlen(off) - 1);
                strncat(off, aux_keys[a], sizeof off - strlen(off) - 1);
            }
        if (*off && shown)
            fprintf(f, "<p class=\"note\">Zero throughout (not used in this run): %s.</p>\n", off);
    } else {
        fputs("<h2>Experts</h2><p class=\"note\">No MoE layers in metrics.jsonl (\"layers\" is empty).</p>\n", f);
    }

    if (train || cfgj) {
        fputs("<h2>Settings</h2><div class=\"grid2\">\n", f);
        kv_table(f, "Training (train.json)", train);
        kv_table(f, "Model (config.json)", cfgj);
        fputs("</div>\n", f);
    }
    fputs("<footer>cmoe report · self-contained: no scripts, nothing fetched</footer>\n</main></body></html>\n", f);
    json_decref(train);
    json_decref(cfgj);
    free(ce_s), free(tps_s), free(drop), free(val_x), free(val_t), free(val_y);
    return 0;
}

int cmd_report(int argc, char **argv)
{
    const char *dir = NULL, *out = NULL;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--help") || !strcmp(argv[i], "-h")) {
            help_report();
            return EXIT_OK;
        } else if (!strcmp(argv[i], "--out")) {
            if (++i >= argc) {
                fprintf(stderr, "cmoe report: --out needs a FILE\nTry 'cmoe help report'.\n");
                return EXIT_USAGE;
            }
            out = argv[i];
        } else if (!strncmp(argv[i], "--out=", 6)) {
            out = argv[i] + 6;
        } else if (argv[i][0] == '-' && argv[i][1]) {
            fprintf(stderr, "cmoe report: unknown option '%s'\nTry 'cmoe help report'.\n", argv[i]);
            return EXIT_USAGE;
        } else if (dir) {
            fprintf(stderr, "cmoe report: one RUN_DIR, got also '%s'\nTry 'cmoe help report'.\n", argv[i]);
            return EXIT_USAGE;
        } else {
            dir = argv[i];
        }
    }
    if (!dir) {
        fprintf(stderr, "cmoe report: which run? usage: cmoe report RUN_DIR\nTry 'cmoe help report'.\n");
        return EXIT_USAGE;
    }
    char path[4096], outp[4096], tmp[4200];
    if (access(dir, F_OK) != 0)
        return fail("no run directory '%s': %s", dir, strerror(errno));
    if (cli_path(path, sizeof path, dir, "metrics.jsonl"))
        return fail("%s", moe_last_error());
    if (access(path, F_OK) != 0)
        return fail("no %s: '%s' is not a run directory of cmoe train (it writes metrics.jsonl)", path, dir);
    if (out)
        snprintf(outp, sizeof outp, "%s", out);
    else if (cli_path(outp, sizeof outp, dir, "report.html"))
        return fail("%s", moe_last_error());
    metrics m;
    int rc = load_metrics(path, &m);
    if (rc) {
        metrics_free(&m);
        return rc;
    }
    /* a reader never sees half a page: write beside it, then rename */
    snprintf(tmp, sizeof tmp, "%s.tmp", outp);
    FILE *f = fopen(tmp, "w");
    if (!f) {
        metrics_free(&m);
        return fail("cannot write %s: %s", tmp, strerror(errno));
    }
    rc = write_report(f, dir, &m);
    if (fflush(f) != 0 || ferror(f))
        rc = rc ? rc : fail("cannot write %s: %s", tmp, strerror(errno));
    if (fclose(f) != 0)
        rc = rc ? rc : fail("cannot write %s: %s", tmp, strerror(errno));
    if (!rc && rename(tmp, outp) != 0)
        rc = fail("cannot rename %s to %s: %s", tmp, outp, strerror(errno));
    if (rc)
        remove(tmp);
    else
        printf("cmoe report: %s (%lld steps, %d MoE layers)\n", outp, (long long)m.n, m.nl);
    metrics_free(&m);
    return rc;
}
