/*
 * Checkpoints (src/io/checkpoint.h): a save/restore round trip is bitwise on cpu (F32) and
 * ref (F64), training continued from a checkpoint gives bitwise the losses of the
 * uninterrupted run, and crafted bad files — each a different way a checkpoint can be
 * broken — are rejected with their own message and leave the model untouched.
 */
#define _POSIX_C_SOURCE 200809L
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "io/checkpoint.h"
#include "testutil.h"

static char dir[256];

static const char *tmp(const char *name)
{
    static char path[4][512];
    static int slot;
    slot = (slot + 1) % 4;
    snprintf(path[slot], sizeof path[slot], "%s/%s", dir, name);
    return path[slot];
}

enum { B = 2, S = 8 };

/* the tiny preset trained for `steps` steps on fixed random tokens */
typedef struct {
    moe_backend *b;
    moe_model *m;
    moe_optim *o;
    moe_model_config c;
} rig;

static void rig_make(rig *r, const char *backend, uint64_t seed)
{
    moe_model_config_tiny(&r->c);
    ck_assert_int_eq(moe_backend_create(backend, &(moe_backend_options){.threads = 1}, &r->b), MOE_OK);
    ck_assert_int_eq(moe_model_create(&r->c, r->b, NULL, B, S, &r->m), MOE_OK);
    ck_assert_int_eq(moe_model_init(r->m, seed), MOE_OK);
    moe_optim_config oc;
    moe_optim_config_default(&oc);
    oc.total_steps = 10;
    oc.warmup_steps = 2;
    ck_assert_int_eq(moe_optim_create(r->m, &oc, &r->o), MOE_OK);
}

static void rig_free(rig *r)
{
    moe_optim_free(r->o);
    moe_model_free(r->m);
    moe_backend_free(r->b);
}

/* one training step; returns the loss */
static double rig_step(rig *r, int64_t step)
{
    int32_t in[B * S], tg[B * S];
    for (int i = 0; i < B * S; i++) {
        in[i] = (int32_t)((i * 7 + step * 13) % r->c.vocab_size);
        tg[i] = (int32_t)((i * 5 + step * 3 + 1) % r->c.vocab_size);
    }
    moe_model_losses L;
    moe_model_zero_grad(r->m);
    ck_assert_int_eq(moe_model_forward(r->m, in, tg, NULL, B, S, MOE_KEY_STEP((uint64_t)step), 1, &L), MOE_OK);
    ck_assert_int_eq(moe_model_backward(r->m), MOE_OK);
    ck_assert_int_eq(moe_optim_step(r->o, 1.0, NULL), MOE_OK);
    return L.total;
}

static void save(rig *r, const char *path, int64_t step)
{
    moe_ckpt_state st = {step, moe_optim_steps(r->o), 1337, "{\"steps\": 10}", "{\"elapsed_s\": 1.5}"};
    ck_assert_msg(moe_ckpt_save(path, r->m, r->o, &st) == MOE_OK, "%s", moe_last_error());
}

/* every parameter and moment of two rigs, bitwise */
static void assert_same_state(rig *x, rig *y)
{
    const int n = moe_model_n_params(x->m);
    ck_assert_int_eq(n, moe_model_n_params(y->m));
    ck_assert_int_eq(moe_optim_steps(x->o), moe_optim_steps(y->o));
    for (int i = 0; i < n; i++) {
        const int64_t k = moe_model_param(x->m, i)->numel;
        double *a = tu_alloc(4 * k);
        ck_assert_int_eq(moe_model_get_param(x->m, i, a), MOE_OK);
        ck_assert_int_eq(moe_model_get_param(y->m, i, a + k), MOE_OK);
        ck_assert_int_eq(moe_optim_get_moments(x->o, i, a + 2 * k, a + 3 * k), MOE_OK);
        ck_assert_msg(!memcmp(a, a + k, (size_t)k * sizeof *a), "parameter %s differs",
                      moe_model_param(x->m, i)->name);
        ck_assert_int_eq(moe_optim_get_moments(y->o, i, a, a + k), MOE_OK);
        ck_assert_msg(!memcmp(a, a + 2 * k, (size_t)(2 * k) * sizeof *a), "moments of %s differ",
                      moe_model_param(x->m, i)->name);
        free(a);
    }
}

/* save after 3 steps, restore into a differently initialised rig, then both train on:
 * same state, and the same losses bit for bit */
static void roundtrip(const char *backend)
{
    rig a, b;
    rig_make(&a, backend, 1);
    for (int64_t s = 0; s < 3; s++)
        rig_step(&a, s);
    const char *path = tmp("rt.safetensors");
    save(&a, path, 3);
    rig_make(&b, backend, 99);
    moe_ckpt *ck;
    ck_assert_msg(moe_ckpt_open(path, &ck) == MOE_OK, "%s", moe_last_error());
    ck_assert_int_eq(ck->step, 3);
    ck_assert_int_eq(ck->optim_steps, 3);
    ck_assert_int_eq(ck->data_step, 3);
    ck_assert_uint_eq(ck->seed, 1337);
    ck_assert_int_eq(ck->dtype, strcmp(backend, "ref") ? MOE_ST_F32 : MOE_ST_F64);
    ck_assert_str_eq(ck->train_json, "{\"steps\": 10}");
    ck_assert_ptr_nonnull(moe_st_meta(ck->f, "crc32"));
    ck_assert_msg(moe_ckpt_restore(ck, b.m, b.o) == MOE_OK, "%s", moe_last_error());
    moe_ckpt_free(ck);
    assert_same_state(&a, &b);
    for (int64_t s = 3; s < 8; s++) {
        double la = rig_step(&a, s), lb = rig_step(&b, s);
        char sa[32], sb[32];
        snprintf(sa, sizeof sa, "%.17g", la);
        snprintf(sb, sizeof sb, "%.17g", lb);
        ck_assert_str_eq(sa, sb);
    }
    assert_same_state(&a, &b);
    ck_assert_int_eq(access(tmp("rt.safetensors.tmp"), F_OK), -1);
    rig_free(&a);
    rig_free(&b);
}

START_TEST(test_roundtrip_cpu)
{
    roundtrip("cpu");
}
END_TEST

START_TEST(test_roundtrip_ref)
{
    roundtrip("ref");
}
END_TEST

/* ---- crafted bad files ----------------------------------------------------------- */

static uint8_t *good;
static size_t good_n;

static uint8_t *slurp(const char *path, size_t *n)
{
    FILE *f = fopen(path, "rb");
    ck_assert_ptr_nonnull(f);
    fseek(f, 0, SEEK_END);
    long sz = ftell(f);
    fseek(f, 0, SEEK_SET);
    uint8_t *p = malloc((size_t)sz + 1);
    ck_assert_uint_eq(fread(p, 1, (size_t)sz, f), (size_t)sz);
    fclose(f);
    *n = (size_t)sz;
    return p;
}

static void spit(const char *path, const void *p, size_t n)
{
    FILE *f = fopen(path, "wb");
    ck_assert_ptr_nonnull(f);
    ck_assert_uint_eq(fwrite(p, 1, n, f), n);
    ck_assert_int_eq(fclose(f), 0);
}

static uint64_t hlen_of(const uint8_t *p)
{
    uint64_t h = 0;
    for (int i = 7; i >= 0; i--)
        h = h << 8 | p[i];
    return h;
}

/* the good file with its header replaced by edit(header JSON); the data (and so its
 * CRC) stays as it was */
typedef void (*edit_fn)(json_t *root);
static void with_header(const char *path, edit_fn edit)
{
    uint64_t hl = hlen_of(good);
    json_t *root = json_loadb((const char *)good + 8, hl, 0, NULL);
    ck_assert_ptr_nonnull(root);
    edit(root);
    char *h = json_dumps(root, JSON_COMPACT);
    json_decref(root);
    size_t nh = strlen(h), nd = good_n - 8 - hl;
    uint8_t *out = malloc(8 + nh + nd);
    for (int i = 0; i < 8; i++)
        out[i] = (uint8_t)((uint64_t)nh >> (8 * i));
    memcpy(out + 8, h, nh);
    memcpy(out + 8 + nh, good + 8 + hl, nd);
    spit(path, out, 8 + nh + nd);
    free(out);
    free(h);
}

static json_t *meta(json_t *root)
{
    return json_object_get(root, "__metadata__");
}

#define P_NORM "model.norm.weight"
#define P_W1 "model.layers.0.mlp.gate_proj.weight"
#define P_Q "model.layers.0.self_attn.q_proj.weight"

static void e_no_crc(json_t *r) { json_object_del(meta(r), "crc32"); }
static void e_no_format(json_t *r) { json_object_del(meta(r), "format"); }
static void e_format_v9(json_t *r) { json_object_set_new(meta(r), "format", json_string("cmoe-checkpoint-9")); }
static void e_dtype_meta(json_t *r) { json_object_set_new(meta(r), "dtype", json_string("BF16")); }
static void e_step_text(json_t *r) { json_object_set_new(meta(r), "step", json_string("12abc")); }
static void e_no_step(json_t *r) { json_object_del(meta(r), "step"); }
static void e_t_gt_step(json_t *r) { json_object_set_new(meta(r), "optim_steps", json_string("9")); }
static void e_data_step(json_t *r) { json_object_set_new(meta(r), "data_step", json_string("1")); }
static void e_seed_neg(json_t *r) { json_object_set_new(meta(r), "seed", json_string("-5")); }
static void e_no_config(json_t *r) { json_object_del(meta(r), "config"); }
static void e_config_json(json_t *r) { json_object_set_new(meta(r), "config", json_string("{\"hidden_size\": ")); }
static void e_config_key(json_t *r) { json_object_set_new(meta(r), "config", json_string("{\"hiden_size\": 16}")); }
static void e_train_array(json_t *r) { json_object_set_new(meta(r), "train", json_string("[1, 2]")); }
static void e_meta_number(json_t *r) { json_object_set_new(meta(r), "step", json_integer(3)); }

static void e_config_other(json_t *r)
{
    /* a valid config of another model: the checkpoint belongs to a different run */
    json_t *c = json_loads(json_string_value(json_object_get(meta(r), "config")), 0, NULL);
    json_object_set_new(c, "rms_norm_eps", json_real(1e-6));
    char *t = json_dumps(c, JSON_COMPACT);
    json_object_set_new(meta(r), "config", json_string(t));
    free(t);
    json_decref(c);
}

static void e_dtype_i32(json_t *r)
{
    json_object_set_new(json_object_get(r, P_NORM), "dtype", json_string("I32"));
}

static void e_shape(json_t *r)
{
    /* same bytes, other shape: [C, F] read as [F, C] */
    json_t *sh = json_object_get(json_object_get(r, P_W1), "shape");
    json_t *a = json_array_get(sh, 0), *b = json_array_get(sh, 1);
    json_int_t x = json_integer_value(a), y = json_integer_value(b);
    ck_assert_int_ne(x, y);
    json_integer_set(a, y);
    json_integer_set(b, x);
}

static void e_missing(json_t *r) { json_object_del(r, "optim.v." P_NORM); }

static void e_overlap(json_t *r)
{
    json_t *a = json_object_get(json_object_get(r, "optim.m." P_NORM), "data_offsets");
    json_object_set(json_object_get(r, "optim.v." P_NORM), "data_offsets", a);
}

static void e_span(json_t *r)
{
    json_t *o = json_object_get(json_object_get(r, P_NORM), "data_offsets");
    json_integer_set(json_array_get(o, 1), json_integer_value(json_array_get(o, 1)) - 4);
}

static void e_beyond(json_t *r)
{
    json_t *o = json_object_get(json_object_get(r, P_NORM), "data_offsets");
    json_integer_set(json_array_get(o, 0), (json_int_t)1 << 40);
    json_integer_set(json_array_get(o, 1), ((json_int_t)1 << 40) + 64);
}

/* a rewrite through the writer (new CRC): every tensor of the good file, with element 0
 * of nan_name set to NaN and an extra tensor when asked */
static void rewrite(const char *path, const char *nan_name, const char *extra)
{
    moe_st_file *f;
    ck_assert_int_eq(moe_st_parse(good, good_n, "good", &f), MOE_OK);
    moe_st_writer *w;
    ck_assert_int_eq(moe_st_writer_create(&w), MOE_OK);
    for (int i = 0; i < f->n; i++) {
        const moe_st_tensor *t = &f->tensors[i];
        uint8_t *d = malloc((size_t)(t->end - t->begin) + 1);
        memcpy(d, t->data, t->end - t->begin);
        if (nan_name && !strcmp(t->name, nan_name)) {
            float q = NAN;
            memcpy(d, &q, 4);
        }
        ck_assert_int_eq(moe_st_writer_add_copy(w, t->name, t->dtype, t->ndim, t->shape, d), MOE_OK);
        free(d);
    }
    if (extra) {
        float z[3] = {0, 0, 0};
        int64_t sh[1] = {3};
        ck_assert_int_eq(moe_st_writer_add_copy(w, extra, MOE_ST_F32, 1, sh, z), MOE_OK);
    }
    for (int i = 0; i < f->n_meta; i++)
        if (strcmp(f->meta_key[i], "crc32"))
            ck_assert_int_eq(moe_st_writer_add_meta(w, f->meta_key[i], f->meta_value[i]), MOE_OK);
    ck_assert_int_eq(moe_st_writer_write(w, path), MOE_OK);
    moe_st_writer_free(w);
    moe_st_free(f);
}

/* the file must be refused with a message holding want, the model left as it was */
static int n_bad;
static void expect_bad(rig *r, const char *path, const char *want)
{
    const int n = moe_model_n_params(r->m);
    int64_t total = moe_model_numel(r->m), at = 0;
    double *before = tu_alloc(total), *after = tu_alloc(total);
    for (int i = 0; i < n; i++) {
        moe_model_get_param(r->m, i, before + at);
        at += moe_model_param(r->m, i)->numel;
    }
    const int64_t t0 = moe_optim_steps(r->o);
    moe_ckpt *ck = NULL;
    moe_status s = moe_ckpt_open(path, &ck);
    if (s == MOE_OK)
        s = moe_ckpt_restore(ck, r->m, r->o);
    moe_ckpt_free(ck);
    ck_assert_msg(s != MOE_OK, "%s was accepted (want an error with '%s')", path, want);
    ck_assert_msg(strstr(moe_last_error(), want), "%s: message '%s' lacks '%s'", path, moe_last_error(), want);
    at = 0;
    for (int i = 0; i < n; i++) {
        moe_model_get_param(r->m, i, after + at);
        at += moe_model_param(r->m, i)->numel;
    }
    ck_assert_msg(!memcmp(before, after, (size_t)total * sizeof *before), "%s: the model was changed", path);
    ck_assert_int_eq(moe_optim_steps(r->o), t0);
    printf("checkpoint: rejected %-16s %s\n", strrchr(path, '/') + 1, moe_last_error());
    n_bad++;
    free(before);
    free(after);
}

START_TEST(test_bad_files)
{
    rig a, r;
    rig_make(&a, "cpu", 1);
    for (int64_t s = 0; s < 2; s++)
        rig_step(&a, s);
    save(&a, tmp("good.safetensors"), 2);
    good = slurp(tmp("good.safetensors"), &good_n);
    rig_make(&r, "cpu", 5);
    rig_step(&r, 0);
    /* the good file itself passes */
    moe_ckpt *ck;
    ck_assert_int_eq(moe_ckpt_open(tmp("good.safetensors"), &ck), MOE_OK);
    ck_assert_int_eq(moe_ckpt_check(ck, r.m), MOE_OK);
    moe_ckpt_free(ck);

    const uint64_t hl = hlen_of(good);
    uint8_t *buf = malloc(good_n + 64);
    /* structure of the file */
    spit(tmp("empty"), good, 0);
    expect_bad(&r, tmp("empty"), "too short");
    memcpy(buf, good, good_n);
    buf[5] = 1; /* header length 2^40 */
    spit(tmp("hugeheader"), buf, good_n);
    expect_bad(&r, tmp("hugeheader"), "exceeds the limit");
    spit(tmp("cutheader"), good, 8 + hl / 2);
    expect_bad(&r, tmp("cutheader"), "bytes that follow it");
    memcpy(buf, good, good_n);
    buf[8] = '[';
    spit(tmp("notjson"), buf, good_n);
    expect_bad(&r, tmp("notjson"), "not valid JSON");
    {
        const char *h = "[1, 2, 3]";
        memset(buf, 0, 8);
        buf[0] = (uint8_t)strlen(h);
        memcpy(buf + 8, h, strlen(h));
        spit(tmp("notobject"), buf, 8 + strlen(h));
        expect_bad(&r, tmp("notobject"), "not a JSON object");
    }
    {
        /* the same key twice: JSON through the library, duplicates refused */
        char h[] = "{\"a\": {\"dtype\": \"F32\", \"shape\": [1], \"data_offsets\": [0, 4]}, "
                   "\"a\": {\"dtype\": \"F32\", \"shape\": [1], \"data_offsets\": [0, 4]}}";
        memset(buf, 0, 8);
        buf[0] = (uint8_t)strlen(h);
        memcpy(buf + 8, h, strlen(h));
        memset(buf + 8 + strlen(h), 0, 4);
        spit(tmp("dupkey"), buf, 8 + strlen(h) + 4);
        expect_bad(&r, tmp("dupkey"), "duplicate");
    }
    spit(tmp("truncated"), good, good_n - 100);
    expect_bad(&r, tmp("truncated"), "outside the data section");
    with_header(tmp("beyond"), e_beyond);
    expect_bad(&r, tmp("beyond"), "outside the data section");
    with_header(tmp("overlap"), e_overlap);
    expect_bad(&r, tmp("overlap"), "overlap");
    with_header(tmp("span"), e_span);
    expect_bad(&r, tmp("span"), "span");
    memcpy(buf, good, good_n);
    buf[good_n - 3] ^= 0x40;
    spit(tmp("crc"), buf, good_n);
    expect_bad(&r, tmp("crc"), "CRC-32 mismatch");
    with_header(tmp("nocrc"), e_no_crc);
    expect_bad(&r, tmp("nocrc"), "'crc32' is missing");
    /* metadata */
    with_header(tmp("noformat"), e_no_format);
    expect_bad(&r, tmp("noformat"), "'format' is missing");
    with_header(tmp("format9"), e_format_v9);
    expect_bad(&r, tmp("format9"), "is not supported");
    with_header(tmp("dtypemeta"), e_dtype_meta);
    expect_bad(&r, tmp("dtypemeta"), "must be F32 or F64");
    with_header(tmp("metanumber"), e_meta_number);
    expect_bad(&r, tmp("metanumber"), "not a string");
    with_header(tmp("steptext"), e_step_text);
    expect_bad(&r, tmp("steptext"), "'step' = '12abc'");
    with_header(tmp("nostep"), e_no_step);
    expect_bad(&r, tmp("nostep"), "'step' is missing");
    with_header(tmp("tgtstep"), e_t_gt_step);
    expect_bad(&r, tmp("tgtstep"), "optim_steps 9 exceeds step 2");
    with_header(tmp("datastep"), e_data_step);
    expect_bad(&r, tmp("datastep"), "data_step 1 differs");
    with_header(tmp("seedneg"), e_seed_neg);
    expect_bad(&r, tmp("seedneg"), "'seed' = '-5'");
    with_header(tmp("noconfig"), e_no_config);
    expect_bad(&r, tmp("noconfig"), "'config' is missing");
    with_header(tmp("configjson"), e_config_json);
    expect_bad(&r, tmp("configjson"), "metadata 'config'");
    with_header(tmp("configkey"), e_config_key);
    expect_bad(&r, tmp("configkey"), "hiden_size");
    with_header(tmp("configother"), e_config_other);
    expect_bad(&r, tmp("configother"), "does not match the model (rms_norm_eps");
    with_header(tmp("trainarray"), e_train_array);
    expect_bad(&r, tmp("trainarray"), "'train' is not a JSON object");
    /* tensors against the model */
    with_header(tmp("dtypei32"), e_dtype_i32);
    expect_bad(&r, tmp("dtypei32"), "has dtype I32 but the checkpoint's dtype is F32");
    with_header(tmp("shape"), e_shape);
    expect_bad(&r, tmp("shape"), "has shape");
    with_header(tmp("missing"), e_missing);
    expect_bad(&r, tmp("missing"), "'optim.v." P_NORM "' is missing");
    rewrite(tmp("extra"), NULL, "optim.m.extra.weight");
    expect_bad(&r, tmp("extra"), "unexpected tensor 'optim.m.extra.weight'");
    rewrite(tmp("nan"), "optim.v." P_Q, NULL);
    expect_bad(&r, tmp("nan"), "not finite");
    /* a checkpoint of the model with a different shape: the tiny model with wider experts */
    {
        rig w;
        moe_model_config c;
        moe_model_config_tiny(&c);
        c.moe_intermediate_size = 24;
        ck_assert_int_eq(moe_backend_create("cpu", &(moe_backend_options){.threads = 1}, &w.b), MOE_OK);
        ck_assert_int_eq(moe_model_create(&c, w.b, NULL, B, S, &w.m), MOE_OK);
        ck_assert_int_eq(moe_model_init(w.m, 3), MOE_OK);
        moe_optim_config oc;
        moe_optim_config_default(&oc);
        ck_assert_int_eq(moe_optim_create(w.m, &oc, &w.o), MOE_OK);
        save(&w, tmp("othermodel"), 0);
        rig_free(&w);
        expect_bad(&r, tmp("othermodel"), "does not match the model (moe_intermediate_size");
    }
    printf("checkpoint: %d crafted bad files rejected, each with its own message, the model untouched\n", n_bad);
    ck_assert_int_ge(n_bad, 15);
    free(buf);
    free(good);
    rig_free(&a);
    rig_free(&r);
}
END_TEST

START_TEST(test_missing_file)
{
    moe_ckpt *ck = (moe_ckpt *)1;
    ck_assert_int_eq(moe_ckpt_open(tmp("nope.safetensors"), &ck), MOE_ERR_IO);
    ck_assert_ptr_null(ck);
    ck_assert_ptr_nonnull(strstr(moe_last_error(), "nope.safetensors"));
}
END_TEST

int main(void)
{
    snprintf(dir, sizeof dir, "%s/cmoe-ckpt-XXXXXX", getenv("TMPDIR") ? getenv("TMPDIR") : "/tmp");
    if (!mkdtemp(dir))
        return 99;
    Suite *s = suite_create("checkpoint");
    TCase *tc = tcase_create("checkpoint");
    tcase_set_timeout(tc, 120);
    tcase_add_test(tc, test_roundtrip_cpu);
    tcase_add_test(tc, test_roundtrip_ref);
    tcase_add_test(tc, test_bad_files);
    tcase_add_test(tc, test_missing_file);
    suite_add_tcase(s, tc);
    int rc = tu_run(s);
    char cmd[600];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", dir);
    if (system(cmd) != 0)
        fprintf(stderr, "cannot remove %s\n", dir);
    return rc;
}
