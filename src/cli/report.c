/*
 * cmoe report RUN_DIR — RUN_DIR/report.html from RUN_DIR/metrics.jsonl (and config.json,
 * train.json when present): one self-contained page, inline SVG and CSS, no scripts, no
 * network. Charts: loss against steps and tokens, learning rate, tokens/s, gradient norm,
 * load balance, a heatmap of each MoE layer's expert load over time, dropped tokens and
 * every aux loss.
 *
 * Long runs are reduced before drawing (line charts to at most SVG_MAX_POINTS bucket means,
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
#include "core/durable.h"
#include "core/input.h"
#include "commands.h"
#include "model/info.h"
#include "run.h"
#include "report.h"
#include "svg.h"

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

/* ---- the sections -------------------------------------------------------------------- */

const char *const report_css =
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

static void stat_box(FILE *f, const char *label, const char *value)
{
    fputs("<div class=\"stat\"><span>", f);
    svg_esc(f, label);
    fputs("</span><b>", f);
    svg_esc(f, value);
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
    stat_box(f, "steps", b);
    if (m->has[S_TOKENS]) {
        svg_fmt_num(b, sizeof b, last_finite(&m->s[S_TOKENS]));
        stat_box(f, "tokens", b);
    }
    const vec *tr = m->has[S_CE] ? &m->s[S_CE] : &m->s[S_LOSS];
    if (m->has[S_CE] || m->has[S_LOSS]) {
        double last = NAN;
        for (int64_t i = m->n - 1; i >= 0 && !isfinite(last); i--)
            last = ce_smooth[i];
        snprintf(b, sizeof b, "%.4f", last);
        stat_box(f, "train loss (smoothed)", b);
        (void)tr;
    }
    if (m->has[S_VAL]) {
        int64_t best = -1;
        for (int64_t i = 0; i < m->n; i++)
            if (isfinite(m->s[S_VAL].v[i]) && (best < 0 || m->s[S_VAL].v[i] < m->s[S_VAL].v[best]))
                best = i;
        snprintf(b, sizeof b, "%.4f", last_finite(&m->s[S_VAL]));
        stat_box(f, "validation loss (last)", b);
        snprintf(c, sizeof c, "%.4f @ %lld", m->s[S_VAL].v[best], (long long)m->s[S_STEP].v[best]);
        stat_box(f, "validation loss (best)", c);
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
            svg_fmt_num(b, sizeof b, t[k / 2]);
            strncat(b, " /s", sizeof b - strlen(b) - 1);
            stat_box(f, "tokens / s (median)", b);
        }
        free(t);
    }
    if (m->has[S_ELAPSED]) {
        fmt_duration(b, sizeof b, last_finite(&m->s[S_ELAPSED]));
        stat_box(f, "wall time", b);
    }
    if (info) {
        svg_fmt_num(b, sizeof b, (double)info->total_params);
        svg_fmt_num(c, sizeof c, (double)info->active_params);
        char p[140];
        snprintf(p, sizeof p, "%s / %s", b, c);
        stat_box(f, "params total / active", p);
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
        svg_esc(f, k);
        fputs("</td><td>", f);
        svg_esc(f, text ? text : "");
        fputs("</td></tr>", f);
        free(dump);
    }
    fputs("</table></figure>\n", f);
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
            svg_heat_color(share * (double)L->E, col, sizeof col);
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
static void layer_chart(FILE *f, const metrics *m, const svg_chart_opts *o, int aux /* -1: dropped */)
{
    const int64_t B = m->bins;
    double *x = malloc((size_t)B * sizeof *x), *y = malloc((size_t)(B * (m->nl + 1)) * sizeof *y);
    svg_line *lines = calloc((size_t)m->nl + 1, sizeof *lines);
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
    const int many = m->nl > SVG_PALETTE_N;
    for (int l = 0; l < m->nl; l++) {
        snprintf(labels[l], sizeof labels[l], "layer %lld", (long long)m->l[l].layer);
        lines[nl++] = (svg_line){many ? NULL : labels[l], svg_palette[l % SVG_PALETTE_N], x, y + (l + 1) * B, B, 1.2,
                             m->nl > 1 ? 0.55 : 1, 0, 0};
    }
    if (m->nl > 1)
        lines[nl++] = (svg_line){"mean over layers", "#111827", x, y, B, 2.4, 1, 0, 0};
    svg_chart(f, o, lines, nl);
done:
    free(x);
    free(y);
    free(lines);
    free(labels);
}

static json_t *load_json(const char *dir, const char *name)
{
    char path[4096], *text;
    size_t len;
    if (cli_path(path, sizeof path, dir, name) || access(path, F_OK) != 0)
        return NULL;
    /* optional, but bounded: a link to /dev/zero must not grow the process */
    if (moe_read_all(path, "JSON file", MOE_JSON_MAX, MOE_IN_REGULAR, &text, &len)) {
        fprintf(stderr, "cmoe report: warning: %s; left out of the page\n", moe_last_error());
        return NULL;
    }
    json_t *j = json_loadb(text, len, 0, NULL);
    free(text);
    return j;
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
        return report_fail("out of memory");
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
    svg_esc(f, dir);
    fprintf(f, "</title><style>%s</style></head><body>\n<header><h1>cmoe training report</h1><div class=\"sub\">",
            report_css);
    svg_esc(f, dir);
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
        svg_line L[3] = {{tl, "#93c5fd", step, m->s[ti].v, n, 1, 0.9, 0, 0},
                     {tl_s, "#2563eb", step, ce_s, n, 2.2, 1, 0, 0},
                     {"validation", "#ea580c", val_x, val_y, nv, 2, 1, 1, 0}};
        svg_chart_opts o = {"Loss vs steps", "step", "loss (nats / token)",
                        ti == S_CE ? "Training cross-entropy, without the aux losses, so it compares with the "
                                     "validation loss."
                                   : NULL,
                        0, 0, 1, 0};
        svg_chart(f, &o, L, nv ? 3 : 2);
        if (m->has[S_TOKENS]) {
            svg_line T[3] = {{tl, "#93c5fd", m->s[S_TOKENS].v, m->s[ti].v, n, 1, 0.9, 0, 0},
                         {tl_s, "#2563eb", m->s[S_TOKENS].v, ce_s, n, 2.2, 1, 0, 0},
                         {"validation", "#ea580c", val_t, val_y, nv, 2, 1, 1, 0}};
            svg_chart_opts ot = {"Loss vs tokens", "tokens seen", "loss (nats / token)", NULL, 0, 0, 1, 0};
            svg_chart(f, &ot, T, nv ? 3 : 2);
        } else {
            fputs("<figure class=\"card\"><figcaption>Loss vs tokens</figcaption><p class=\"empty\">metrics.jsonl "
                  "has no \"tokens\" per step</p></figure>\n",
                  f);
        }
    }
    fputs("</div>\n<h2>Optimisation</h2><div class=\"grid2\">\n", f);
    {
        svg_line lr = {"learning rate", "#9333ea", step, m->s[S_LR].v, n, 2, 1, 0, 0};
        svg_chart_opts o = {"Learning rate", "step", "learning rate", NULL, 0, 1, 0, 0};
        svg_chart(f, &o, &lr, 1);
        svg_line tp[2] = {{"per step", "#86efac", step, m->s[S_TPS].v, n, 1, 0.9, 0, 0},
                      {"smoothed", "#16a34a", step, tps_s, n, 2.2, 1, 0, 0}};
        svg_chart_opts ot = {"Throughput", "step", "tokens / s", NULL, 0, 1, 1, 0};
        svg_chart(f, &ot, tp, 2);
        if (m->has[S_GNORM]) {
            svg_line g = {"gradient norm", "#0891b2", step, m->s[S_GNORM].v, n, 1.4, 1, 0, 0};
            svg_chart_opts og = {"Gradient norm (before clipping)", "step", "global L2 norm", NULL, 1, 0, 0, 0};
            svg_chart(f, &og, &g, 1);
        }
        if (m->has[S_AUX]) {
            svg_line ls = {"aux", "#dc2626", step, m->s[S_AUX].v, n, 1.4, 1, 0, 0};
            svg_chart_opts ol = {"Aux loss in the objective (Σ over layers of coefficient × loss)", "step",
                             "loss − cross-entropy", "The training loss is cross-entropy + this.", 0, 0, 0, 0};
            svg_chart(f, &ol, &ls, 1);
        }
    }
    fputs("</div>\n", f);

    if (m->nl > 0) {
        fputs("<h2>Experts</h2>\n<p class=\"note\">Each expert's share of its layer's kept assignments over "
              "training, relative to a perfectly balanced router (1× = 1/E of the assignments). Red experts are "
              "overloaded, blue ones starved.</p>",
              f);
        svg_heat_legend(f);
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
            svg_line b = {"max / mean load", "#db2777", step, m->s[S_LMM].v, n, 1.4, 1, 0, 0};
            svg_chart_opts o = {"Load imbalance (mean over layers of max / mean expert load)", "step",
                            "max / mean (1 = balanced)", NULL, 0, 0, 0, 0};
            svg_chart(f, &o, &b, 1);
        }
        int any_drop = 0;
        for (int64_t i = 0; i < n; i++)
            any_drop |= isfinite(drop[i]) && drop[i] > 0;
        svg_chart_opts od = {"Dropped tokens", "step", "dropped assignments (%)",
                         any_drop ? "Share of the selected (token, expert) assignments dropped by capacity."
                                  : "No assignment was dropped (dropless routing, or capacity never reached).",
                         0, 1, 1, 0};
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
            svg_chart_opts o = {aux_titles[a], "step", a == N_AUX - 1 ? "coef × loss" : "loss (unscaled)",
                            *note ? note : NULL, 0, 0, 1, 0};
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
                strncat(off, report_aux_keys[a], sizeof off - strlen(off) - 1);
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
    char path[4096], outp[4096];
    if (access(dir, F_OK) != 0)
        return report_fail("no run directory '%s': %s", dir, strerror(errno));
    if (cli_path(path, sizeof path, dir, "metrics.jsonl"))
        return report_fail("%s", moe_last_error());
    if (access(path, F_OK) != 0)
        return report_fail("no %s: '%s' is not a run directory of cmoe train (it writes metrics.jsonl)", path, dir);
    if (out)
        snprintf(outp, sizeof outp, "%s", out);
    else if (cli_path(outp, sizeof outp, dir, "report.html"))
        return report_fail("%s", moe_last_error());
    /* the page must not replace what it is made from */
    static const char *const inputs[] = {"metrics.jsonl", "train.json", "config.json"};
    for (int i = 0; i < 3; i++) {
        char in[4200];
        if (cli_path(in, sizeof in, dir, inputs[i]) == MOE_OK && moe_refuse_same_file(outp, in, "run's input"))
            return report_fail("%s", moe_last_error());
    }
    metrics m;
    int rc = report_load_metrics(path, &m);
    if (rc) {
        report_metrics_free(&m);
        return rc;
    }
    /* a reader never sees half a page (core/durable.h); /dev/stdout is written through */
    struct stat so, sf;
    const int same_as_stdout = fstat(STDOUT_FILENO, &so) == 0 && stat(outp, &sf) == 0 && so.st_dev == sf.st_dev &&
                               so.st_ino == sf.st_ino;
    moe_durable *w;
    if (moe_durable_open(outp, &w)) {
        report_metrics_free(&m);
        return report_fail("%s", moe_last_error());
    }
    rc = write_report(moe_durable_file(w), dir, &m);
    if (rc)
        moe_durable_abort(w);
    else if (moe_durable_commit(w))
        rc = report_fail("%s", moe_last_error());
    else /* not into the page when the page went to stdout */
        fprintf(same_as_stdout ? stderr : stdout, "cmoe report: %s (%lld steps, %d MoE layers)\n", outp,
                (long long)m.n, m.nl);
    report_metrics_free(&m);
    return rc;
}
