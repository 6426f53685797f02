/*
 * cmoe report: reading metrics.jsonl into the series and per-layer bins the page draws
 * (report.h). Every line is checked; the message names the line.
 */
#define _POSIX_C_SOURCE 200809L
#include "config.h"

#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <jansson.h>

#include "commands.h"
#include "core/input.h"
#include "report.h"

const char *const report_aux_keys[N_AUX] = {"lb", "importance", "load", "z", "mi", "total"};
static const char *const series_keys[N_SERIES] = {"step", "loss", "ce", "aux", "lr", "grad_norm", "tokens",
                                                  "tokens_per_s", "elapsed_s", "val_loss", "load_max_over_mean",
                                                  "dropped_frac"};

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

void report_metrics_free(metrics *m)
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

int report_fail(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    fputs("cmoe report: ", stderr);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
    return EXIT_FAIL;
}

/* The layer structure from the first record. */
static int layers_from(json_t *layers, int64_t lineno, metrics *m)
{
    m->nl = (int)json_array_size(layers);
    m->l = calloc((size_t)m->nl + 1, sizeof *m->l);
    if (!m->l)
        return report_fail("out of memory");
    for (int i = 0; i < m->nl; i++) {
        json_t *o = json_array_get(layers, (size_t)i), *load = json_object_get(o, "load");
        json_t *li = json_object_get(o, "layer");
        if (!json_is_object(o) || !json_is_integer(li) || !json_is_array(load) || json_array_size(load) == 0)
            return report_fail("metrics.jsonl line %lld: layers[%d] needs \"layer\" (an integer) and \"load\" (an array of "
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
            return report_fail("out of memory");
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
        return report_fail("metrics.jsonl line %lld: \"layers\" must be an array of %d MoE layers, as on the first line",
                    (long long)lineno, m->nl);
    for (int i = 0; i < m->nl; i++) {
        layer_data *L = &m->l[i];
        json_t *o = json_array_get(layers, (size_t)i), *load = json_object_get(o, "load");
        json_t *li = json_object_get(o, "layer"), *aux = json_object_get(o, "aux");
        if (!json_is_object(o) || !json_is_integer(li) || json_integer_value(li) != L->layer || !json_is_array(load) ||
            (int64_t)json_array_size(load) != L->E)
            return report_fail("metrics.jsonl line %lld: layers[%d] must be layer %lld with a \"load\" array of %lld "
                        "counts, as on the first line", (long long)lineno, i, (long long)L->layer, (long long)L->E);
        double sum = 0;
        for (int64_t e = 0; e < L->E; e++) {
            json_t *c = json_array_get(load, (size_t)e);
            if (!json_is_number(c) || json_number_value(c) < 0)
                return report_fail("metrics.jsonl line %lld: layer %lld load[%lld] must be a count >= 0", (long long)lineno,
                            (long long)L->layer, (long long)e);
            sum += json_number_value(c);
        }
        for (int64_t e = 0; sum > 0 && e < L->E; e++)
            L->share[bin * L->E + e] += json_number_value(json_array_get(load, (size_t)e)) / sum;
        double d = num_or_nan(json_object_get(o, "dropped"));
        L->dropped[bin] += isfinite(d) ? d : 0;
        for (int a = 0; a < N_AUX; a++) {
            double v = json_is_object(aux) ? num_or_nan(json_object_get(aux, report_aux_keys[a])) : NAN;
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
        return report_fail("metrics.jsonl line %lld: invalid JSON at column %d: %s", (long long)lineno, err.column, err.text);
    int rc = 0;
    if (!json_is_object(o)) {
        rc = report_fail("metrics.jsonl line %lld: not a JSON object", (long long)lineno);
        goto done;
    }
    if (!json_is_integer(json_object_get(o, "step"))) {
        rc = report_fail("metrics.jsonl line %lld: no \"step\" (an integer)", (long long)lineno);
        goto done;
    }
    for (int i = 0; i < N_SERIES; i++) {
        json_t *v = json_object_get(o, series_keys[i]);
        if (v && !json_is_number(v) && !json_is_null(v)) {
            rc = report_fail("metrics.jsonl line %lld: \"%s\" must be a number", (long long)lineno, series_keys[i]);
            goto done;
        }
        double x = num_or_nan(v);
        m->has[i] |= v != NULL && isfinite(x);
        if (i == S_TOKENS) /* per step in the file, cumulative here */
            x = (m->s[i].n ? m->s[i].v[m->s[i].n - 1] : 0) + (isfinite(x) ? x : NAN);
        if (vec_push(&m->s[i], x)) {
            rc = report_fail("out of memory");
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

int report_load_metrics(const char *path, metrics *m)
{
    memset(m, 0, sizeof *m);
    size_t len;
    char *text;
    /* a regular file only (a link to /dev/zero or a FIFO is refused before it is read) */
    if (moe_read_all(path, "metrics file", REPORT_METRICS_MAX, MOE_IN_REGULAR, &text, &len))
        return report_fail("%s", moe_last_error());
    if (memchr(text, '\0', len)) {
        free(text);
        return report_fail("%s holds a NUL byte: not a metrics.jsonl written by cmoe train", path);
    }
    /* a last line without its newline that does not parse was torn by a crash mid-write */
    char *last = len && text[len - 1] != '\n' ? strrchr(text, '\n') : NULL;
    last = last ? last + 1 : len && text[len - 1] != '\n' ? text : NULL;
    if (last && !is_blank(last)) {
        json_t *j = json_loads(last, JSON_DECODE_ANY, NULL);
        if (!j) {
            fprintf(stderr, "cmoe report: warning: %s: the last line is incomplete (the run stopped while writing "
                            "it?); skipped\n", path);
            *last = '\0';
        }
        json_decref(j);
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
        return report_fail("%s is empty: no training steps to report (has the run started?)", path);
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
