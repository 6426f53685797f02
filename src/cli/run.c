/* The run directory: saving the weights of a training run and reading them back. */
#define _POSIX_C_SOURCE 200809L
#include "config.h"

#include <errno.h>
#include <inttypes.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include <jansson.h>

#include "cmoe.h"
#include "run.h"
#include "io/checkpoint.h"
#include "io/safetensors.h"

int cli_parse_i64(const char *s, int64_t lo, int64_t hi, int64_t *out)
{
    const char *p = s;
    if (*p == '-')
        p++;
    if (!*p)
        return 0;
    for (; *p; p++)
        if (*p < '0' || *p > '9')
            return 0;
    errno = 0;
    long long v = strtoll(s, NULL, 10);
    if (errno || v < lo || v > hi)
        return 0;
    *out = v;
    return 1;
}

int cli_parse_double(const char *s, double *out)
{
    char *end;
    errno = 0;
    double v = strtod(s, &end);
    if (!*s || *end || errno || !isfinite(v))
        return 0;
    *out = v;
    return 1;
}

moe_status cli_backend_create(const char *name, int threads, const char *dtype, moe_backend **out)
{
    return moe_backend_create(name, &(moe_backend_options){.threads = threads, .dtype = dtype}, out);
}

int cli_backend_known(const char *name)
{
    for (int i = 0; i < moe_backend_count(); i++)
        if (!strcmp(moe_backend_name(i), name))
            return 1;
    return 0;
}

moe_status cli_path(char *buf, size_t n, const char *dir, const char *name)
{
    int k = snprintf(buf, n, "%s/%s", dir, name);
    if (k < 0 || (size_t)k >= n)
        return moe_error(MOE_ERR_ARG, "path '%s/%s' is too long", dir, name);
    return MOE_OK;
}

void cli_fmt_duration(char *buf, size_t n, double s)
{
    if (!(s >= 0) || s > 1e8)
        snprintf(buf, n, "?");
    else if (s < 60)
        snprintf(buf, n, "%ds", (int)s);
    else if (s < 3600)
        snprintf(buf, n, "%dm%02ds", (int)s / 60, (int)s % 60);
    else
        snprintf(buf, n, "%dh%02dm", (int)s / 3600, ((int)s / 60) % 60);
}

/* ---- saving ------------------------------------------------------------------ */

/* The metadata of a weights file, and the file written. */
static moe_status finish_weights(moe_st_writer *w, const char *dir, const moe_model *m, const char *train_json,
                                 int64_t step)
{
    char path[4096], num[32], *cfg_json = NULL;
    snprintf(num, sizeof num, "%" PRId64, step);
    moe_status s;
    if (!(s = cli_path(path, sizeof path, dir, CLI_RUN_WEIGHTS)) &&
        !(s = moe_model_config_to_json(moe_model_config_of(m), 0, &cfg_json)) &&
        !(s = moe_st_writer_add_meta(w, "config", cfg_json)) && !(s = moe_st_writer_add_meta(w, "step", num)) &&
        !(s = moe_st_writer_add_meta(w, "format", "cmoe-weights-1")) &&
        !(s = moe_st_writer_add_meta(w, "cmoe_version", moe_version())) &&
        !(train_json && (s = moe_st_writer_add_meta(w, "train", train_json))))
        s = moe_st_writer_write(w, path);
    free(cfg_json);
    return s;
}

/* One parameter of a weights file, read from the backend as fp32 when the file is written. */
typedef struct {
    moe_model *m;
    int i;
} weight_ref;

static moe_status fill_weight(void *ctx, void *dst)
{
    const weight_ref *x = ctx;
    moe_tensor t;
    moe_status s = moe_model_param_tensors(x->m, x->i, &t, NULL);
    moe_backend *b = moe_model_backend(x->m);
    return s ? s : b->download(b, dst, MOE_F32, t, moe_model_param(x->m, x->i)->numel);
}

moe_status cli_run_save(const char *dir, moe_model *m, const char *train_json, int64_t step)
{
    moe_st_writer *w = NULL;
    const int n = moe_model_n_params(m);
    weight_ref *xs = calloc((size_t)n + 1, sizeof *xs);
    moe_status s = xs ? moe_st_writer_create(&w) : moe_error(MOE_ERR_NOMEM, "out of memory saving %d parameters", n);
    for (int i = 0; i < n && !s; i++) { /* lazy: one tensor in host memory at a time */
        const moe_param_info *p = moe_model_param(m, i);
        xs[i] = (weight_ref){m, i};
        s = moe_st_writer_add_lazy(w, p->name, MOE_ST_F32, p->ndim, p->shape, fill_weight, &xs[i]);
    }
    if (!s)
        s = finish_weights(w, dir, m, train_json, step);
    moe_st_writer_free(w);
    free(xs);
    return s;
}

moe_status cli_run_save_with(const char *dir, const moe_model *m, moe_ckpt_get_fn get, void *ctx,
                             const char *train_json, int64_t step)
{
    /* get may be collective (a gather over ranks): once per parameter, in table order,
     * into host memory before the file is written */
    const int n = moe_model_n_params(m);
    int64_t biggest = 1;
    moe_param_info fi; /* whole tensors, also of a model split over ranks */
    for (int i = 0; i < n; i++) {
        moe_ckpt_full_info(moe_model_param(m, i), &fi);
        biggest = fi.numel > biggest ? fi.numel : biggest;
    }
    moe_st_writer *w = NULL;
    double *tmp = malloc((size_t)biggest * sizeof *tmp);
    float *f32 = malloc((size_t)biggest * sizeof *f32);
    moe_status s = tmp && f32 ? moe_st_writer_create(&w)
                              : moe_error(MOE_ERR_NOMEM, "out of memory for a tensor of %lld elements", (long long)biggest);
    for (int i = 0; i < n && !s; i++) {
        moe_ckpt_full_info(moe_model_param(m, i), &fi);
        if (!(s = get(ctx, i, tmp, NULL, NULL)) && !(s = moe_st_from_f64(MOE_ST_F32, tmp, fi.numel, f32)))
            s = moe_st_writer_add_copy(w, fi.name, MOE_ST_F32, fi.ndim, fi.shape, f32);
    }
    if (!s)
        s = finish_weights(w, dir, m, train_json, step);
    moe_st_writer_free(w);
    free(tmp);
    free(f32);
    return s;
}

/* ---- loading ------------------------------------------------------------------ */

/* The training settings the other commands reuse: data, seq, batch (all optional). */
static moe_status read_train_meta(cli_run *r, const char *text)
{
    json_error_t err;
    json_t *o = json_loads(text, 0, &err);
    if (!o || !json_is_object(o)) {
        json_decref(o);
        return moe_error(MOE_ERR_FORMAT, "%s: metadata 'train' is not a JSON object", r->path);
    }
    json_t *v;
    if ((v = json_object_get(o, "data")) && json_is_string(v) && !(r->data = strdup(json_string_value(v)))) {
        json_decref(o);
        return moe_error(MOE_ERR_NOMEM, "out of memory");
    }
    if ((v = json_object_get(o, "seq")) && json_is_integer(v))
        r->seq = json_integer_value(v);
    if ((v = json_object_get(o, "batch")) && json_is_integer(v))
        r->batch = json_integer_value(v);
    json_decref(o);
    return MOE_OK;
}

moe_status cli_run_open(const char *dir, cli_run *r)
{
    memset(r, 0, sizeof *r);
    moe_status s;
    struct stat sb;
    if (stat(dir, &sb) != 0)
        return moe_error(MOE_ERR_IO, "run directory '%s': %s (pass the --out DIR of a 'cmoe train' run)", dir,
                         strerror(errno));
    if (!S_ISDIR(sb.st_mode))
        return moe_error(MOE_ERR_ARG, "'%s' is not a directory (pass the --out DIR of a 'cmoe train' run)", dir);
    if ((s = cli_path(r->path, sizeof r->path, dir, CLI_RUN_WEIGHTS)))
        return s;
    if (stat(r->path, &sb) != 0)
        return moe_error(MOE_ERR_IO,
                         "'%s' has no weights (%s: %s); 'cmoe train' writes them at every evaluation and at the end",
                         dir, CLI_RUN_WEIGHTS, strerror(errno));
    moe_st_file *f;
    if ((s = moe_st_read(r->path, &f)))
        return s;
    r->file = f;
    const char *cfg = moe_st_meta(f, "config");
    if (!cfg)
        return moe_error(MOE_ERR_FORMAT, "%s: no 'config' in the metadata (not written by cmoe train?)", r->path);
    moe_model_config_default(&r->cfg);
    if ((s = moe_model_config_from_json(cfg, &r->cfg)) || (s = moe_model_config_validate(&r->cfg))) {
        char why[1024]; /* moe_error writes into the buffer moe_last_error returns */
        snprintf(why, sizeof why, "%s", moe_last_error());
        return moe_error(s, "%s: metadata 'config': %s", r->path, why);
    }
    const char *step = moe_st_meta(f, "step");
    if (step && !cli_parse_i64(step, 0, INT64_MAX, &r->step))
        return moe_error(MOE_ERR_FORMAT, "%s: metadata 'step' = '%s' is not a step number", r->path, step);
    const char *train = moe_st_meta(f, "train");
    return train ? read_train_meta(r, train) : MOE_OK;
}

moe_status cli_run_build(cli_run *r, const char *backend, int threads, int64_t max_batch, int64_t max_seq)
{
    moe_status s;
    if ((s = cli_backend_create(backend, threads, NULL, &r->backend)) ||
        (s = moe_model_create(&r->cfg, r->backend, NULL, max_batch, max_seq, &r->model)))
        return s;
    return cli_run_load_into(r, r->model);
}

moe_status cli_run_load_into(cli_run *r, moe_model *model)
{
    moe_status s = MOE_OK;
    moe_st_file *f = r->file;
    if (!f)
        return moe_error(MOE_ERR_ARG, "%s: the weights were already loaded", r->path);
    const int n = moe_model_n_params(model);
    /* a tensor the model does not have means the file belongs to another model */
    for (int i = 0; i < f->n; i++)
        if (moe_model_param_index(model, f->tensors[i].name) < 0)
            return moe_error(MOE_ERR_FORMAT, "%s: tensor '%s' is not a parameter of the model its config describes",
                             r->path, f->tensors[i].name);
    int64_t biggest = 1;
    moe_param_info fi; /* the file holds whole tensors; an expert shard takes its slice */
    for (int i = 0; i < n; i++) {
        moe_ckpt_full_info(moe_model_param(model, i), &fi);
        biggest = fi.numel > biggest ? fi.numel : biggest;
    }
    double *buf = malloc((size_t)biggest * sizeof *buf);
    if (!buf)
        return moe_error(MOE_ERR_NOMEM, "out of memory loading %s", r->path);
    for (int i = 0; i < n && !s; i++) {
        const moe_param_info *p = moe_model_param(model, i);
        moe_ckpt_full_info(p, &fi);
        if (!moe_st_find(f, p->name))
            s = moe_error(MOE_ERR_FORMAT, "%s: parameter '%s' is missing", r->path, p->name);
        else if (!(s = moe_st_get_f64(f, p->name, fi.ndim, fi.shape, buf))) {
            /* NaN or Inf weights give NaN losses and text: refused here, by name */
            char what[4300];
            snprintf(what, sizeof what, "%s: parameter '%s'", r->path, p->name);
            if (!(s = moe_check_finite(MOE_ERR_FORMAT, what, buf, fi.numel)))
                s = moe_model_set_param(model, i, buf + p->shard * p->numel);
        }
    }
    free(buf);
    if (!s) {
        moe_st_free(f);
        r->file = NULL;
    }
    return s;
}

void cli_run_free(cli_run *r)
{
    moe_model_free(r->model);
    moe_backend_free(r->backend);
    moe_st_free(r->file);
    free(r->data);
    memset(r, 0, sizeof *r);
}
