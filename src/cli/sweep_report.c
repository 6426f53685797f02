/*
 * The page and plots of `cmoe sweep` (sweep.h): DIR/report.html, DIR/plots/NAME.svg and, with a
 * fit, DIR/fit.json, from the runs that are done (their sweep.jsonl records and run
 * directories). The charts are cmoe report's (svg.c); every number comes from the runs'
 * metrics.jsonl and the FLOP counts of src/model/info.c.
 *
 * Analyses the spec may ask for:
 *  - baseline: each run's final validation loss minus the baseline's, and the training
 *    compute at which its validation curve first reaches the baseline's final loss (linear
 *    between evaluations), as the ratio baseline FLOPs / those FLOPs ("the same quality at
 *    R x less training compute");
 *  - fit "clark": Clark et al. (2022)'s bilinear law in natural logs,
 *      ln L = a·ln N + b·ln E + c·ln N·ln E + d,
 *    N the dense base model's parameters (active, without embeddings and routers), E the
 *    experts per MoE layer (1 for a dense model), L the final validation loss, by least
 *    squares (modified Gram-Schmidt QR); coefficients, R² and every residual;
 *  - load: each run's expert-load imbalance (max / mean over experts, mean over layers)
 *    over the steps, beside its loss.
 */
#define _POSIX_C_SOURCE 200809L
#include "config.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <jansson.h>

#include "cmoe.h"
#include "core/durable.h"
#include "report.h"
#include "run.h"
#include "svg.h"
#include "sweep.h"

typedef struct {
    const sweep_run *r;
    double final_val, best_val, wall;
    int64_t nv;
    double *vx, *vy, *vt; /* evaluations: training FLOPs, validation loss, wall seconds */
    int64_t n;
    double *step, *lmm;   /* every step: step, load max/mean (smoothed) */
    double reach;         /* FLOPs to reach the baseline's final loss; NAN when never */
} curve;

static double num(json_t *rec, const char *k)
{
    json_t *v = json_object_get(rec, k);
    return json_is_number(v) ? json_number_value(v) : NAN;
}

/* Debiased exponential moving average over a window of about n/25 steps (NaN-skipping). */
static void smooth(double *y, int64_t n)
{
    double win = (double)n / 25, acc = 0, w = 0;
    const double a = 1 - 1 / (win < 1 ? 1 : win > 200 ? 200 : win);
    for (int64_t i = 0; i < n; i++) {
        if (isfinite(y[i])) {
            acc = a * acc + (1 - a) * y[i];
            w = a * w + (1 - a);
        }
        y[i] = w > 0 ? acc / w : NAN;
    }
}

static moe_status load_curve(const char *dir, const sweep_run *r, curve *c)
{
    memset(c, 0, sizeof *c);
    c->r = r;
    c->final_val = num(r->record, "final_val_loss");
    c->best_val = num(r->record, "best_val_loss");
    c->wall = num(r->record, "wall_s");
    c->reach = NAN;
    char p[4400];
    snprintf(p, sizeof p, "%s/runs/%s/metrics.jsonl", dir, r->name);
    metrics m;
    if (report_load_metrics(p, &m)) {
        report_metrics_free(&m);
        return moe_error(MOE_ERR_FORMAT, "%s: cannot be read for the report", p);
    }
    const int64_t n = m.n;
    c->vx = malloc((size_t)(n + 1) * sizeof *c->vx);
    c->vy = malloc((size_t)(n + 1) * sizeof *c->vy);
    c->vt = malloc((size_t)(n + 1) * sizeof *c->vt);
    c->step = malloc((size_t)(n + 1) * sizeof *c->step);
    c->lmm = malloc((size_t)(n + 1) * sizeof *c->lmm);
    if (!c->vx || !c->vy || !c->vt || !c->step || !c->lmm) {
        report_metrics_free(&m);
        return moe_error(MOE_ERR_NOMEM, "out of memory");
    }
    const double per_step = r->flops_per_token * (double)r->tokens_per_step;
    for (int64_t i = 0; i < n; i++) {
        c->step[i] = m.s[S_STEP].v[i];
        c->lmm[i] = m.s[S_LMM].v[i];
        if (isfinite(m.s[S_VAL].v[i])) {
            c->vx[c->nv] = m.s[S_STEP].v[i] * per_step;
            c->vy[c->nv] = m.s[S_VAL].v[i];
            c->vt[c->nv++] = m.s[S_ELAPSED].v[i];
        }
    }
    c->n = n;
    /* the final loss from the curve itself (sweep.jsonl keeps 10 digits): a run reaches its
     * own final loss, so the baseline's ratio is 1 */
    if (c->nv > 0)
        c->final_val = c->vy[c->nv - 1];
    smooth(c->lmm, n);
    report_metrics_free(&m);
    return MOE_OK;
}

static void free_curve(curve *c)
{
    free(c->vx), free(c->vy), free(c->vt), free(c->step), free(c->lmm);
}

/* The training FLOPs at which the validation curve first reaches `target`. */
static double reach(const curve *c, double target)
{
    for (int64_t i = 0; i < c->nv; i++) {
        if (c->vy[i] > target)
            continue;
        if (i == 0)
            return c->vx[0]; /* already at the first evaluation: an upper bound */
        const double y0 = c->vy[i - 1], y1 = c->vy[i];
        return c->vx[i - 1] + (y0 - target) / (y0 - y1) * (c->vx[i] - c->vx[i - 1]);
    }
    return NAN;
}

/* ---- the fit --------------------------------------------------------------------------- */

typedef struct {
    int ok;
    char why[256];
    double beta[4]; /* a, b, c, d */
    double r2, rms;
    int n;
    double *fit, *res; /* per point, ln L fitted and ln L − fit */
} fit_result;

static double clark(const double *b, double N, double E)
{
    const double ln = log(N), le = log(E);
    return b[0] * ln + b[1] * le + b[2] * ln * le + b[3];
}

/* Least squares of y on the columns of X [n, 4] by modified Gram-Schmidt. */
static int lstsq4(const double *X, const double *y, int n, double *beta)
{
    double *Q = malloc((size_t)n * 4 * sizeof *Q), R[4][4] = {{0}}, qy[4];
    if (!Q)
        return 0;
    memcpy(Q, X, (size_t)n * 4 * sizeof *Q);
    int ok = 1;
    for (int j = 0; j < 4 && ok; j++) {
        for (int i = 0; i < j; i++) {
            double d = 0;
            for (int r = 0; r < n; r++)
                d += Q[r * 4 + i] * Q[r * 4 + j];
            R[i][j] = d;
            for (int r = 0; r < n; r++)
                Q[r * 4 + j] -= d * Q[r * 4 + i];
        }
        double nn = 0, orig = 0;
        for (int r = 0; r < n; r++) {
            nn += Q[r * 4 + j] * Q[r * 4 + j];
            orig += X[r * 4 + j] * X[r * 4 + j];
        }
        R[j][j] = sqrt(nn);
        if (!(R[j][j] > 1e-9 * sqrt(orig))) /* a column in the span of the others */
            ok = 0;
        for (int r = 0; ok && r < n; r++)
            Q[r * 4 + j] /= R[j][j];
    }
    for (int j = 0; ok && j < 4; j++) {
        qy[j] = 0;
        for (int r = 0; r < n; r++)
            qy[j] += Q[r * 4 + j] * y[r];
    }
    for (int j = 3; ok && j >= 0; j--) {
        double v = qy[j];
        for (int k = j + 1; k < 4; k++)
            v -= R[j][k] * beta[k];
        beta[j] = v / R[j][j];
    }
    free(Q);
    return ok;
}

static void fit_clark(const curve *c, int n, fit_result *f)
{
    memset(f, 0, sizeof *f);
    f->n = n;
    f->fit = calloc((size_t)(n + 1), sizeof *f->fit);
    f->res = calloc((size_t)(n + 1), sizeof *f->res);
    double *X = calloc((size_t)(n + 1) * 4, sizeof *X), *y = calloc((size_t)(n + 1), sizeof *y);
    if (!f->fit || !f->res || !X || !y) {
        snprintf(f->why, sizeof f->why, "out of memory");
        free(X), free(y);
        return;
    }
    for (int i = 0; i < n; i++) {
        const double ln = log((double)c[i].r->base_params), le = log((double)c[i].r->experts);
        X[i * 4 + 0] = ln;
        X[i * 4 + 1] = le;
        X[i * 4 + 2] = ln * le;
        X[i * 4 + 3] = 1;
        y[i] = log(c[i].final_val);
    }
    if (n < 5)
        snprintf(f->why, sizeof f->why, "%d runs done: four coefficients need at least five", n);
    else if (!lstsq4(X, y, n, f->beta))
        snprintf(f->why, sizeof f->why, "the runs do not separate N and E (at least two base sizes and two expert "
                                        "counts are needed)");
    else {
        double mean = 0, ss = 0, st = 0;
        for (int i = 0; i < n; i++)
            mean += y[i] / n;
        for (int i = 0; i < n; i++) {
            f->fit[i] = clark(f->beta, (double)c[i].r->base_params, (double)c[i].r->experts);
            f->res[i] = y[i] - f->fit[i];
            ss += f->res[i] * f->res[i];
            st += (y[i] - mean) * (y[i] - mean);
        }
        f->rms = sqrt(ss / n);
        f->r2 = st > 0 ? 1 - ss / st : NAN;
        f->ok = 1;
    }
    free(X), free(y);
}

static moe_status write_fit_json(const char *dir, const curve *c, const fit_result *f)
{
    json_t *o = json_object(), *pts = json_array();
    json_object_set_new(o, "law", json_string("ln L = a ln N + b ln E + c ln N ln E + d (Clark et al. 2022)"));
    json_object_set_new(o, "N", json_string("active parameters without embeddings and routers"));
    json_object_set_new(o, "E", json_string("experts per MoE layer (1: dense)"));
    json_object_set_new(o, "L", json_string("final validation loss (nats per token)"));
    if (f->ok) {
        json_object_set_new(o, "a", json_real(f->beta[0]));
        json_object_set_new(o, "b", json_real(f->beta[1]));
        json_object_set_new(o, "c", json_real(f->beta[2]));
        json_object_set_new(o, "d", json_real(f->beta[3]));
        json_object_set_new(o, "r2", json_real(f->r2));
        json_object_set_new(o, "rms_residual", json_real(f->rms));
    } else {
        json_object_set_new(o, "error", json_string(f->why));
    }
    for (int i = 0; i < f->n; i++)
        json_array_append_new(pts, json_pack("{s:s, s:I, s:I, s:f, s:o, s:o}", "run", c[i].r->name, "N",
                                             (json_int_t)c[i].r->base_params, "E", (json_int_t)c[i].r->experts, "L",
                                             c[i].final_val, "fit", f->ok ? json_real(exp(f->fit[i])) : json_null(),
                                             "residual_ln", f->ok ? json_real(f->res[i]) : json_null()));
    json_object_set_new(o, "points", pts);
    char *text = json_dumps(o, JSON_INDENT(2) | JSON_PRESERVE_ORDER | JSON_REAL_PRECISION(8));
    json_decref(o);
    char p[4200];
    snprintf(p, sizeof p, "%s/fit.json", dir);
    moe_status s = text ? moe_durable_write_text(p, text) : moe_error(MOE_ERR_NOMEM, "out of memory");
    free(text);
    return s;
}

/* ---- charts ----------------------------------------------------------------------------- */

/* The chart inline in the page and as DIR/plots/NAME.svg. */
static moe_status chart(FILE *page, const char *dir, const char *name, const svg_chart_opts *o, const svg_line *l,
                        int nl)
{
    svg_chart(page, o, l, nl);
    char p[4200];
    snprintf(p, sizeof p, "%s/plots/%s.svg", dir, name);
    moe_durable *w;
    moe_status s = moe_durable_open(p, &w);
    if (s)
        return s;
    svg_chart_file(moe_durable_file(w), o, l, nl);
    return moe_durable_commit(w);
}

static svg_line run_line(const curve *c, int i, const double *x, const double *y, int64_t n, int dots)
{
    return (svg_line){c->r->name, svg_palette[i % SVG_PALETTE_N], x, y, n, 2, 1, dots, i >= SVG_PALETTE_N};
}

/* ---- the page --------------------------------------------------------------------------- */

static const char *extra_css =
    "table.runs{border-collapse:collapse;width:100%;font-size:12.5px;background:#fff;border-radius:8px;"
    "box-shadow:0 1px 2px rgba(0,0,0,.06)}"
    "table.runs th,table.runs td{padding:4px 8px;border-bottom:1px solid #f1f2f4;text-align:right;"
    "font-variant-numeric:tabular-nums;white-space:nowrap}"
    "table.runs th{color:#6b7280;font-weight:600;background:#f9fafb}"
    "table.runs td:first-child,table.runs th:first-child{text-align:left}"
    "a{color:#2563eb;text-decoration:none}";

static void td_num(FILE *f, double v, const char *fmt)
{
    char b[64];
    if (!isfinite(v))
        snprintf(b, sizeof b, "–");
    else if (!fmt)
        svg_fmt_num(b, sizeof b, v);
    else
        snprintf(b, sizeof b, fmt, v);
    fprintf(f, "<td>%s</td>", b);
}

static void runs_table(FILE *f, const sweep_spec *s)
{
    fputs("<table class=\"runs\"><tr><th>run</th><th>experts × k</th><th>params</th><th>active</th>"
          "<th>FLOPs / token</th><th>steps</th><th>tokens</th><th>train FLOPs</th><th>wall</th>"
          "<th>final val</th><th>best val</th><th>state</th></tr>\n",
          f);
    for (int i = 0; i < s->n; i++) {
        const sweep_run *r = &s->runs[i];
        const char *status = r->record ? json_string_value(json_object_get(r->record, "status")) : NULL;
        fputs("<tr><td>", f);
        if (r->done) {
            fputs("<a href=\"runs/", f);
            svg_esc(f, r->name);
            fputs("/report.html\">", f);
        }
        svg_esc(f, r->name);
        fputs(r->done ? "</a></td>" : "</td>", f);
        char e[48];
        if (r->info.n_moe_layers)
            snprintf(e, sizeof e, "%lld × %g", (long long)r->cfg.moe.n_experts, r->info.experts_per_token);
        else
            snprintf(e, sizeof e, "dense");
        fprintf(f, "<td>%s</td>", e);
        td_num(f, (double)r->info.total_params, NULL);
        td_num(f, (double)r->info.active_params, NULL);
        td_num(f, r->flops_per_token, NULL);
        td_num(f, (double)r->t.steps, "%.0f");
        td_num(f, (double)r->tokens, NULL);
        td_num(f, r->train_flops, NULL);
        char w[32] = "–";
        if (r->done)
            cli_fmt_duration(w, sizeof w, num(r->record, "wall_s"));
        fprintf(f, "<td>%s</td>", w);
        td_num(f, r->done ? num(r->record, "final_val_loss") : NAN, "%.4f");
        td_num(f, r->done ? num(r->record, "best_val_loss") : NAN, "%.4f");
        fprintf(f, "<td>%s</td></tr>\n", r->done ? "done" : status ? status : "not run");
    }
    fputs("</table>\n", f);
}

static void baseline_section(FILE *f, const curve *c, int n, const curve *b)
{
    fputs("<h2>Against the baseline</h2><p class=\"note\">Final validation loss minus the baseline's, and the "
          "training compute each run took to reach the baseline's final validation loss (first crossing, linear "
          "between evaluations); ratio = the baseline's training FLOPs / that compute.</p>",
          f);
    fputs("<table class=\"runs\"><tr><th>run</th><th>final val</th><th>gap to baseline</th>"
          "<th>FLOPs to reach baseline's final</th><th>compute ratio</th></tr>\n",
          f);
    printf("\nagainst the baseline %s (final validation loss %.4f, %.4g training FLOPs):\n", b->r->name, b->final_val,
           b->r->train_flops);
    printf("  %-28s %10s %10s %16s %8s\n", "run", "final val", "gap", "FLOPs to reach", "ratio");
    for (int i = 0; i < n; i++) {
        const double gap = c[i].final_val - b->final_val, ratio = b->r->train_flops / c[i].reach;
        fputs("<tr><td>", f);
        svg_esc(f, c[i].r->name);
        fputs("</td>", f);
        td_num(f, c[i].final_val, "%.4f");
        td_num(f, gap, "%+.4f");
        td_num(f, c[i].reach, NULL);
        td_num(f, ratio, "%.2f×");
        fputs("</tr>\n", f);
        if (isfinite(ratio))
            printf("  %-28s %10.4f %+10.4f %16.4g %7.2fx\n", c[i].r->name, c[i].final_val, gap, c[i].reach, ratio);
        else
            printf("  %-28s %10.4f %+10.4f %16s %8s\n", c[i].r->name, c[i].final_val, gap, "not reached", "-");
    }
    fputs("</table>\n", f);
}

static void fit_section(FILE *f, const curve *c, const fit_result *fr)
{
    fputs("<h2>Clark et al.'s law</h2>", f);
    printf("\nClark et al.'s bilinear law, ln L = a ln N + b ln E + c ln N ln E + d (natural logs; N = active "
           "parameters without embeddings and routers, E = experts, L = final validation loss):\n");
    if (!fr->ok) {
        fprintf(f, "<p class=\"note\">No fit: %s.</p>\n", fr->why);
        printf("  no fit: %s\n", fr->why);
        return;
    }
    fprintf(f, "<p class=\"note\">ln L = a·ln N + b·ln E + c·ln N·ln E + d by least squares over %d runs: "
               "a = %.5f, b = %.5f, c = %.5f, d = %.5f; R² = %.4f, RMS residual %.4f (in ln L). N = active "
               "parameters without embeddings and routers, E = experts per MoE layer.</p>",
            fr->n, fr->beta[0], fr->beta[1], fr->beta[2], fr->beta[3], fr->r2, fr->rms);
    printf("  a = %.6f  b = %.6f  c = %.6f  d = %.6f   R^2 = %.4f, RMS residual %.4f (ln L), %d runs\n",
           fr->beta[0], fr->beta[1], fr->beta[2], fr->beta[3], fr->r2, fr->rms, fr->n);
    printf("  %-28s %10s %5s %10s %10s %12s\n", "run", "N", "E", "L", "fit", "residual ln");
    fputs("<table class=\"runs\"><tr><th>run</th><th>N</th><th>E</th><th>L</th><th>fit</th>"
          "<th>residual (ln L)</th></tr>\n",
          f);
    for (int i = 0; i < fr->n; i++) {
        fputs("<tr><td>", f);
        svg_esc(f, c[i].r->name);
        fprintf(f, "</td><td>%lld</td><td>%lld</td>", (long long)c[i].r->base_params, (long long)c[i].r->experts);
        td_num(f, c[i].final_val, "%.4f");
        td_num(f, exp(fr->fit[i]), "%.4f");
        td_num(f, fr->res[i], "%+.4f");
        fputs("</tr>\n", f);
        printf("  %-28s %10lld %5lld %10.4f %10.4f %+12.4f\n", c[i].r->name, (long long)c[i].r->base_params,
               (long long)c[i].r->experts, c[i].final_val, exp(fr->fit[i]), fr->res[i]);
    }
    fputs("</table>\n", f);
}

/* Final loss against E, a line of points per base size N, and the fitted law dashed. */
static moe_status fit_chart(FILE *f, const char *dir, const curve *c, int n, const fit_result *fr)
{
    int64_t Ns[16];
    int nN = 0;
    for (int i = 0; i < n; i++) {
        int k = 0;
        while (k < nN && Ns[k] != c[i].r->base_params)
            k++;
        if (k == nN && nN < 16)
            Ns[nN++] = c[i].r->base_params;
    }
    enum { PTS = 40 };
    double *xs = calloc((size_t)(2 * nN * (n + PTS) + 1), sizeof *xs), *ys = xs ? xs + nN * (n + PTS) : NULL;
    svg_line *L = calloc((size_t)(2 * nN + 1), sizeof *L);
    char(*lab)[64] = calloc((size_t)(2 * nN + 1), sizeof *lab);
    if (!xs || !L || !lab) {
        free(xs), free(L), free(lab);
        return moe_error(MOE_ERR_NOMEM, "out of memory");
    }
    double emin = INFINITY, emax = -INFINITY;
    for (int i = 0; i < n; i++)
        emin = fmin(emin, (double)c[i].r->experts), emax = fmax(emax, (double)c[i].r->experts);
    int nl = 0;
    for (int g = 0; g < nN; g++) {
        double *x = xs + g * (n + PTS), *y = ys + g * (n + PTS);
        int64_t k = 0;
        for (int i = 0; i < n; i++) /* in run order: E ascends within a base size in a grid */
            if (c[i].r->base_params == Ns[g]) {
                x[k] = (double)c[i].r->experts;
                y[k++] = c[i].final_val;
            }
        char nn[32];
        svg_fmt_num(nn, sizeof nn, (double)Ns[g]);
        snprintf(lab[nl], sizeof lab[0], "N = %s", nn);
        L[nl] = (svg_line){lab[nl], svg_palette[g % SVG_PALETTE_N], x, y, k, 2, 1, 1, 0};
        nl++;
        if (fr->ok) {
            for (int j = 0; j < PTS; j++) {
                x[k + j] = exp(log(emin) + (log(emax) - log(emin)) * j / (PTS - 1));
                y[k + j] = exp(clark(fr->beta, (double)Ns[g], x[k + j]));
            }
            snprintf(lab[nl], sizeof lab[0], "fit, N = %s", nn);
            L[nl] = (svg_line){lab[nl], svg_palette[g % SVG_PALETTE_N], x + k, y + k, PTS, 1.4, 0.8, 0, 1};
            nl++;
        }
    }
    svg_chart_opts o = {"Final validation loss against experts", "experts per MoE layer (E, log scale)",
                        "final validation loss", "Dots: runs; dashed: the fitted law.", 0, 0, 1, 1};
    moe_status s = chart(f, dir, "fit", &o, L, nl);
    free(xs), free(L), free(lab);
    return s;
}

static moe_status write_page(FILE *f, const sweep_spec *s, const char *dir, curve *c, int n)
{
    moe_status st = MOE_OK;
    char when[64];
    time_t t = time(NULL);
    strftime(when, sizeof when, "%Y-%m-%d %H:%M", localtime(&t));
    fprintf(f, "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"/><meta name=\"viewport\" "
               "content=\"width=device-width, initial-scale=1\"/><title>cmoe sweep: ");
    svg_esc(f, s->path);
    fprintf(f, "</title><style>%s%s</style></head><body>\n<header><h1>cmoe sweep</h1><div class=\"sub\">", report_css,
            extra_css);
    svg_esc(f, s->path);
    fprintf(f, " · %d of %d runs done · written %s by cmoe %s</div></header>\n<main>\n", n, s->n, when, moe_version());
    if (s->description[0]) {
        fputs("<p>", f);
        svg_esc(f, s->description);
        fputs("</p>\n", f);
    }
    fputs("<h2>Runs</h2>\n", f);
    runs_table(f, s);

    const curve *b = NULL;
    for (int i = 0; i < n; i++)
        if (s->baseline[0] && !strcmp(c[i].r->name, s->baseline))
            b = &c[i];
    for (int i = 0; b && i < n; i++)
        c[i].reach = reach(&c[i], b->final_val);
    if (b)
        baseline_section(f, c, n, b);
    fit_result fr;
    memset(&fr, 0, sizeof fr);
    if (s->fit_clark) {
        fit_clark(c, n, &fr);
        fit_section(f, c, &fr);
        st = write_fit_json(dir, c, &fr);
    }

    svg_line *L = calloc((size_t)n + 2, sizeof *L);
    if (!L)
        return moe_error(MOE_ERR_NOMEM, "out of memory");
    double fmin_ = INFINITY, fmax_ = -INFINITY;
    for (int i = 0; i < n; i++) {
        L[i] = run_line(&c[i], i, c[i].vx, c[i].vy, c[i].nv, 1);
        for (int64_t j = 0; j < c[i].nv; j++)
            fmin_ = fmin(fmin_, c[i].vx[j]), fmax_ = fmax(fmax_, c[i].vx[j]);
    }
    int nl = n;
    double bx[2] = {fmin_, fmax_}, by[2] = {b ? b->final_val : NAN, b ? b->final_val : NAN};
    if (b)
        L[nl++] = (svg_line){"baseline's final loss", "#111827", bx, by, 2, 1, 0.7, 0, 1};
    fputs("<h2>Validation loss</h2><div class=\"grid2\">\n", f);
    svg_chart_opts o = {"Validation loss against training FLOPs", "training FLOPs (forward + backward)",
                        "validation loss (nats / token)", "Each dot is an evaluation; FLOPs are cmoe info's per token "
                        "times the tokens trained.", 0, 0, 1, fmax_ > 20 * fmin_};
    if (!st)
        st = chart(f, dir, "loss_vs_flops", &o, L, nl);
    for (int i = 0; i < n; i++)
        L[i] = run_line(&c[i], i, c[i].vt, c[i].vy, c[i].nv, 1);
    svg_chart_opts ot = {"Validation loss against wall time", "seconds of training", "validation loss (nats / token)",
                         "Wall time on this machine, for the cost FLOPs do not count (routing, memory, the "
                         "optimizer over every parameter).", 0, 0, 1, 0};
    if (!st)
        st = chart(f, dir, "loss_vs_time", &ot, L, n);
    fputs("</div>\n", f);
    if (s->fit_clark && !st) {
        fputs("<div class=\"grid2\">\n", f);
        st = fit_chart(f, dir, c, n, &fr);
        fputs("</div>\n", f);
    }
    if (s->load && !st) {
        fputs("<h2>Expert load</h2><div class=\"grid2\">\n", f);
        int k = 0;
        for (int i = 0; i < n; i++)
            if (c[i].r->info.n_moe_layers)
                L[k++] = run_line(&c[i], i, c[i].step, c[i].lmm, c[i].n, 0);
        svg_chart_opts ol = {"Expert-load imbalance over training", "step",
                             "max / mean expert load (1 = balanced)", "Mean over MoE layers of the busiest expert's "
                             "kept assignments over the mean, smoothed.", 0, 0, 1, 0};
        st = chart(f, dir, "load", &ol, L, k);
        for (int i = 0; i < n; i++)
            L[i] = run_line(&c[i], i, c[i].vx, c[i].vy, c[i].nv, 1);
        if (!st)
            svg_chart(f, &o, L, n);
        fputs("</div>\n", f);
    }
    free(L);
    free(fr.fit), free(fr.res);
    fputs("<footer>cmoe sweep · self-contained: no scripts, nothing fetched · each run's name links to its own "
          "report</footer>\n</main></body></html>\n",
          f);
    return st;
}

moe_status sweep_report(const sweep_spec *s, const char *dir)
{
    curve *c = calloc((size_t)s->n + 1, sizeof *c);
    if (!c)
        return moe_error(MOE_ERR_NOMEM, "out of memory");
    int n = 0;
    moe_status st = MOE_OK;
    for (int i = 0; i < s->n && !st; i++)
        if (s->runs[i].done && !(st = load_curve(dir, &s->runs[i], &c[n])))
            n++;
    char p[4200];
    snprintf(p, sizeof p, "%s/report.html", dir);
    moe_durable *w = NULL;
    if (!st && !(st = moe_durable_open(p, &w))) {
        st = write_page(moe_durable_file(w), s, dir, c, n);
        if (st)
            moe_durable_abort(w);
        else
            st = moe_durable_commit(w);
    }
    for (int i = 0; i < n; i++)
        free_curve(&c[i]);
    free(c);
    return st;
}
