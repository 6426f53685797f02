/*
 * The training settings of a run (rundir.h): defaults, the checks every rank must agree on,
 * train.json, and reading them back from a checkpoint for --resume.
 */
#define _POSIX_C_SOURCE 200809L
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <jansson.h>

#include "backend/backend.h"
#include "io/rundir.h"

void moe_train_settings_default(moe_train_settings *t)
{
    memset(t, 0, sizeof *t);
    /* the laptop default: 2M tokens, about three minutes on 2 cores (BENCHMARKS.md) */
    t->steps = 2000;
    t->batch = 8;
    t->seq = 128;
    t->accum = 1;
    t->groups = 1;
    t->seed = 1337;
    t->eval_every = 250;
    t->eval_batches = 10;
    t->keep = 3;
    snprintf(t->backend, sizeof t->backend, "cpu");
    moe_optim_config_default(&t->oc);
    t->oc.lr = 3e-3;
    t->oc.total_steps = t->steps;
}

moe_status moe_train_settings_validate(const moe_train_settings *t, const moe_model_config *c)
{
    const int64_t big = (int64_t)1 << 40;
#define RANGE(v, lo, hi, name)                                                                                      \
    if ((v) < (lo) || (v) > (hi))                                                                                   \
        return moe_error(MOE_ERR_ARG, "%s %lld is not in [%lld, %lld]", name, (long long)(v), (long long)(lo),       \
                         (long long)(hi));
    RANGE(t->steps, 1, big, "steps")
    RANGE(t->batch, 1, 1 << 20, "batch")
    RANGE(t->seq, 1, 1 << 20, "seq")
    RANGE(t->accum, 1, 1 << 20, "accum")
    RANGE(t->groups, 1, 1 << 20, "groups")
    RANGE(t->threads, 0, 4096, "threads")
    RANGE(t->eval_every, 0, big, "eval_every")
    RANGE(t->eval_batches, 0, big, "eval_batches")
    RANGE(t->save_every, 0, big, "save_every")
    RANGE(t->keep, 0, big, "keep")
#undef RANGE
    if (t->groups & (t->groups - 1))
        return moe_error(MOE_ERR_ARG, "groups %lld is not a power of two", (long long)t->groups);
    if (t->batch % t->groups)
        return moe_error(MOE_ERR_ARG, "batch %lld does not split into %lld groups of whole sequences (use a batch "
                         "that is a multiple of %lld)", (long long)t->batch, (long long)t->groups,
                         (long long)t->groups);
    if (t->batch * t->seq > ((int64_t)1 << 31))
        return moe_error(MOE_ERR_ARG, "batch x seq = %lld tokens is too many (at most 2^31)",
                         (long long)(t->batch * t->seq));
    if (c && t->seq > c->max_position_embeddings)
        return moe_error(MOE_ERR_ARG, "seq %lld is longer than the model's max_position_embeddings %lld",
                         (long long)t->seq, (long long)c->max_position_embeddings);
    int known = 0;
    for (int i = 0; i < moe_backend_count(); i++)
        known |= !strcmp(moe_backend_name(i), t->backend);
    if (!known)
        return moe_error(MOE_ERR_ARG, "backend '%s' is not a backend of this build (%s)", t->backend,
                         moe_backend_list());
    if (t->dtype[0] && strcmp(t->dtype, "fp32") && strcmp(t->dtype, "bf16"))
        return moe_error(MOE_ERR_ARG, "dtype '%s' is not one of fp32, bf16", t->dtype);
    if (t->oc.total_steps != t->steps)
        return moe_error(MOE_ERR_ARG, "the schedule's total_steps %lld differs from steps %lld",
                         (long long)t->oc.total_steps, (long long)t->steps);
    return moe_optim_config_validate(&t->oc);
}

static json_t *identity_json(const moe_data_identity *id)
{
    char crc[16];
    snprintf(crc, sizeof crc, "%08lx", (unsigned long)id->crc32);
    return json_pack("{s:s, s:s, s:I, s:s}", "kind", id->kind, "path", id->path, "size", (json_int_t)id->size,
                     "crc32", crc);
}

moe_status moe_train_settings_to_json(const moe_train_settings *t, const moe_dataset *d, const char *resumed_from,
                                      char **out)
{
    *out = NULL;
    json_t *j = json_object();
    json_object_set_new(j, "data", json_string(t->data));
    json_object_set_new(j, "model", json_string(t->model));
    json_object_set_new(j, "steps", json_integer(t->steps));
    json_object_set_new(j, "batch", json_integer(t->batch));
    json_object_set_new(j, "seq", json_integer(t->seq));
    json_object_set_new(j, "accum", json_integer(t->accum));
    json_object_set_new(j, "groups", json_integer(t->groups));
    json_object_set_new(j, "lr", json_real(t->oc.lr));
    json_object_set_new(j, "min_lr_ratio", json_real(t->oc.min_lr_ratio));
    json_object_set_new(j, "warmup_steps", json_integer(t->oc.warmup_steps));
    json_object_set_new(j, "beta1", json_real(t->oc.beta1));
    json_object_set_new(j, "beta2", json_real(t->oc.beta2));
    json_object_set_new(j, "weight_decay", json_real(t->oc.weight_decay));
    json_object_set_new(j, "eps", json_real(t->oc.eps));
    json_object_set_new(j, "grad_clip", json_real(t->oc.grad_clip));
    json_object_set_new(j, "seed", json_integer((json_int_t)t->seed));
    json_object_set_new(j, "backend", json_string(t->backend));
    if (t->dtype[0]) /* absent: the backend computed in its own type */
        json_object_set_new(j, "dtype", json_string(t->dtype));
    json_object_set_new(j, "threads", json_integer(t->threads));
    json_object_set_new(j, "eval_every", json_integer(t->eval_every));
    json_object_set_new(j, "eval_batches", json_integer(t->eval_batches));
    json_object_set_new(j, "save_every", json_integer(t->save_every));
    json_object_set_new(j, "keep", json_integer(t->keep));
    if (t->init_from[0])
        json_object_set_new(j, "init_from", json_string(t->init_from));
    if (resumed_from)
        json_object_set_new(j, "resumed_from", json_string(resumed_from));
    if (d) {
        json_object_set_new(j, "dataset", json_string(moe_dataset_describe(d)));
        json_object_set_new(j, "data_identity", identity_json(moe_dataset_identity(d)));
    }
    json_object_set_new(j, "cmoe_version", json_string(moe_version()));
    *out = json_dumps(j, JSON_INDENT(2) | JSON_PRESERVE_ORDER);
    json_decref(j);
    return *out ? MOE_OK : moe_error(MOE_ERR_NOMEM, "out of memory");
}

static moe_status need(json_t *o, const char *key, int type, const char *where, json_t **out)
{
    json_t *v = json_object_get(o, key);
    int ok = v && (type == JSON_REAL ? json_is_number(v) : json_typeof(v) == (json_type)type);
    if (!ok)
        return moe_error(MOE_ERR_FORMAT, "%s: the checkpoint's train settings lack '%s' (or it has the wrong type)",
                         where, key);
    *out = v;
    return MOE_OK;
}

static moe_status parse_identity(json_t *o, const char *where, moe_data_identity *id)
{
    const char *kind, *path, *crc;
    json_int_t size;
    if (json_unpack(o, "{s:s, s:s, s:I, s:s}", "kind", &kind, "path", &path, "size", &size, "crc32", &crc) ||
        size < 0 || strlen(crc) != 8)
        return moe_error(MOE_ERR_FORMAT, "%s: the checkpoint's train settings have a malformed 'data_identity'", where);
    snprintf(id->kind, sizeof id->kind, "%s", kind);
    snprintf(id->path, sizeof id->path, "%s", path);
    id->size = (uint64_t)size;
    id->crc32 = (uint32_t)strtoul(crc, NULL, 16);
    return MOE_OK;
}

moe_status moe_run_record_parse(const char *train_json, const char *where, moe_run_record *rec)
{
    memset(rec, 0, sizeof *rec);
    moe_train_settings *t = &rec->t;
    moe_train_settings_default(t);
    if (!train_json)
        return moe_error(MOE_ERR_FORMAT, "%s: no 'train' settings in the metadata: cannot resume", where);
    json_t *j = json_loads(train_json, 0, NULL), *v = NULL;
    if (!json_is_object(j)) {
        json_decref(j);
        return moe_error(MOE_ERR_FORMAT, "%s: the 'train' settings in the metadata are not a JSON object", where);
    }
    moe_status s = MOE_OK;
    int64_t seed = 0;
#define INT(key, field) \
    if (!s && !(s = need(j, key, JSON_INTEGER, where, &v))) field = json_integer_value(v);
#define NUM(key, field) \
    if (!s && !(s = need(j, key, JSON_REAL, where, &v))) field = json_number_value(v);
#define STR(key, field) \
    if (!s && !(s = need(j, key, JSON_STRING, where, &v))) snprintf(field, sizeof field, "%s", json_string_value(v));
    STR("data", t->data) STR("dataset", rec->data_desc) STR("backend", t->backend)
    INT("steps", t->steps) INT("batch", t->batch) INT("seq", t->seq) INT("accum", t->accum)
    INT("seed", seed) INT("threads", t->threads) INT("eval_every", t->eval_every) INT("eval_batches", t->eval_batches)
    INT("warmup_steps", t->oc.warmup_steps)
    NUM("lr", t->oc.lr) NUM("min_lr_ratio", t->oc.min_lr_ratio) NUM("beta1", t->oc.beta1)
    NUM("beta2", t->oc.beta2) NUM("weight_decay", t->oc.weight_decay) NUM("grad_clip", t->oc.grad_clip)
#undef INT
#undef NUM
#undef STR
    /* written by later versions only: defaults otherwise */
    if (!s && (v = json_object_get(j, "model")) && json_is_string(v))
        snprintf(t->model, sizeof t->model, "%s", json_string_value(v));
    if (!s && (v = json_object_get(j, "eps")) && json_is_number(v))
        t->oc.eps = json_number_value(v);
    if (!s && (v = json_object_get(j, "save_every")) && json_is_integer(v))
        t->save_every = json_integer_value(v);
    if (!s && (v = json_object_get(j, "keep")) && json_is_integer(v))
        t->keep = json_integer_value(v);
    if (!s && (v = json_object_get(j, "dtype")) && json_is_string(v))
        snprintf(t->dtype, sizeof t->dtype, "%s", json_string_value(v));
    if (!s && (v = json_object_get(j, "groups")) && json_is_integer(v))
        t->groups = json_integer_value(v);
    if (!s && (v = json_object_get(j, "init_from")) && json_is_string(v))
        snprintf(t->init_from, sizeof t->init_from, "%s", json_string_value(v));
    if (!s && (v = json_object_get(j, "data_identity"))) {
        s = parse_identity(v, where, &rec->data_id);
        rec->have_data_id = !s;
    }
    json_decref(j);
    if (s)
        return s;
    if (t->batch < 1 || t->seq < 1 || t->accum < 1 || t->steps < 1 || seed < 0 || t->groups < 1 ||
        (t->groups & (t->groups - 1)) || t->batch % t->groups)
        return moe_error(MOE_ERR_FORMAT, "%s: the checkpoint's train settings are out of range", where);
    t->seed = (uint64_t)seed;
    t->oc.total_steps = t->steps;
    return MOE_OK;
}

void moe_train_settings_resume(moe_train_settings *out, const moe_run_record *rec, const moe_train_settings *cli,
                               unsigned given)
{
    *out = rec->t;
    if (given & MOE_TS_STEPS)
        out->steps = cli->steps;
    if (given & MOE_TS_THREADS)
        out->threads = cli->threads;
    if ((given & MOE_TS_BACKEND) && strcmp(out->backend, cli->backend)) {
        snprintf(out->backend, sizeof out->backend, "%s", cli->backend);
        out->dtype[0] = 0; /* another backend computes in its own type unless told */
    }
    if (given & MOE_TS_DTYPE)
        snprintf(out->dtype, sizeof out->dtype, "%s", cli->dtype);
    if (given & MOE_TS_EVAL_EVERY)
        out->eval_every = cli->eval_every;
    if (given & MOE_TS_EVAL_BATCHES)
        out->eval_batches = cli->eval_batches;
    if (given & MOE_TS_SAVE_EVERY)
        out->save_every = cli->save_every;
    if (given & MOE_TS_KEEP)
        out->keep = cli->keep;
    out->oc.total_steps = out->steps;
}

/* A description without its quoted path: "text (gzip): N train + M val tokens, vocab V". */
static void strip_path(const char *desc, char *buf, size_t n)
{
    const char *a = strchr(desc, '\''), *b = a ? strchr(a + 1, '\'') : NULL;
    if (a && b)
        snprintf(buf, n, "%.*s%s", (int)(a - desc), desc, b + 1);
    else
        snprintf(buf, n, "%s", desc);
}

moe_status moe_run_record_check_data(const moe_run_record *rec, const moe_dataset *d)
{
    char why[8192];
    if (rec->have_data_id) {
        if (!moe_data_identity_differs(&rec->data_id, moe_dataset_identity(d), why, sizeof why))
            return MOE_OK;
        return moe_error(MOE_ERR_ARG, "--resume: the data changed since the checkpoint: %s", why);
    }
    /* a checkpoint from before identities: the shape of the data, whatever the path's spelling */
    char a[512], b[512];
    strip_path(rec->data_desc, a, sizeof a);
    strip_path(moe_dataset_describe(d), b, sizeof b);
    if (!strcmp(a, b))
        return MOE_OK;
    return moe_error(MOE_ERR_ARG, "--resume: the data changed: the run trained on %s, it is now %s", rec->data_desc,
                     moe_dataset_describe(d));
}
