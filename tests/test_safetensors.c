/*
 * safetensors: bitwise round trips of every dtype, CRC, conversions, the atomic writer,
 * and crafted malformed files, each refused with MOE_ERR_FORMAT and a specific message.
 *
 * Also a comparison tool for tests/oracle.sh (so no Python is needed):
 *     test_safetensors --compare EXPECTED ACTUAL [RTOL]
 * checks that both files hold the same tensors with the same dtype and shape, integer
 * tensors equal, float tensors within ‖a − e‖/‖e‖ <= RTOL (default 1e-10), and the same
 * "config" metadata. Exit 0 when they match, 1 otherwise.
 */
#define _POSIX_C_SOURCE 200809L
#include <dirent.h>
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>

#include "core/dtype.h"
#include "io/safetensors.h"
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

/* entries of directory d whose name starts with prefix */
static int count_entries(const char *d, const char *prefix)
{
    DIR *dp = opendir(d);
    ck_assert_ptr_nonnull(dp);
    int n = 0;
    for (struct dirent *e; (e = readdir(dp));)
        n += strncmp(e->d_name, prefix, strlen(prefix)) == 0;
    closedir(dp);
    return n;
}

static void write_bytes(const char *path, const void *p, size_t n)
{
    FILE *fp = fopen(path, "wb");
    ck_assert_ptr_nonnull(fp);
    ck_assert_uint_eq(fwrite(p, 1, n, fp), n);
    ck_assert_int_eq(fclose(fp), 0);
}

static size_t read_bytes(const char *path, void *p, size_t cap)
{
    FILE *fp = fopen(path, "rb");
    ck_assert_ptr_nonnull(fp);
    size_t n = fread(p, 1, cap, fp);
    fclose(fp);
    return n;
}

/* A file with a given header-length field, header text and data bytes. */
static void write_raw(const char *path, uint64_t hlen_field, const char *header, const void *data, size_t dlen)
{
    size_t hl = strlen(header);
    uint8_t *buf = malloc(8 + hl + dlen + 1);
    ck_assert_ptr_nonnull(buf);
    for (int i = 0; i < 8; i++)
        buf[i] = (uint8_t)(hlen_field >> (8 * i));
    memcpy(buf + 8, header, hl);
    if (dlen)
        memcpy(buf + 8 + hl, data, dlen);
    write_bytes(path, buf, 8 + hl + dlen);
    free(buf);
}

static void fill_bytes(uint8_t *p, size_t n, uint32_t seed)
{
    for (size_t i = 0; i < n; i++)
        p[i] = (uint8_t)(moe_rand_uniform(seed, 77, 0, (uint32_t)i, 0) * 256);
}

/* ---- round trips -------------------------------------------------------------- */

START_TEST(round_trip_every_dtype)
{
    static const int64_t shapes[][MOE_ST_MAX_DIMS] = {{3, 5}, {7}, {2, 3, 4}, {2, 1, 3, 2}, {0, 4}, {0}};
    static const int ndims[] = {2, 1, 3, 4, 2, 0};
    enum { NSHAPE = 6 };
    moe_st_writer *w;
    ck_assert(moe_st_writer_create(&w) == MOE_OK);
    uint8_t *bufs[MOE_ST_NDTYPES][NSHAPE];
    char names[MOE_ST_NDTYPES][NSHAPE][32];
    for (int dt = 0; dt < MOE_ST_NDTYPES; dt++)
        for (int s = 0; s < NSHAPE; s++) {
            int64_t numel = 1;
            for (int i = 0; i < ndims[s]; i++)
                numel *= shapes[s][i];
            size_t bytes = (size_t)numel * moe_st_dtype_size(dt);
            bufs[dt][s] = malloc(bytes + 1);
            fill_bytes(bufs[dt][s], bytes, (uint32_t)(dt * 16 + s));
            if (dt == MOE_ST_BOOL)
                for (size_t i = 0; i < bytes; i++)
                    bufs[dt][s][i] &= 1;
            /* names in reverse order of addition, so sorting matters */
            snprintf(names[dt][s], sizeof names[dt][s], "t%02d.%s", 99 - (dt * NSHAPE + s), moe_st_dtype_name(dt));
            ck_assert_msg(moe_st_writer_add(w, names[dt][s], dt, ndims[s], shapes[s], bufs[dt][s]) == MOE_OK, "%s",
                          moe_last_error());
        }
    ck_assert(moe_st_writer_add_meta(w, "format", "pt") == MOE_OK);
    ck_assert(moe_st_writer_add_meta(w, "note", "caf\xc3\xa9 \"quoted\" \\ {}") == MOE_OK);
    ck_assert(moe_st_writer_add_meta(w, "format", "cmoe") == MOE_OK); /* replaces */
    const char *path = tmp("all.safetensors");
    ck_assert_msg(moe_st_writer_write(w, path) == MOE_OK, "%s", moe_last_error());
    moe_st_writer_free(w);
    ck_assert_int_eq(count_entries(dir, "all.safetensors.tmp"), 0);

    moe_st_file *f;
    ck_assert_msg(moe_st_read(path, &f) == MOE_OK, "%s", moe_last_error());
    ck_assert_int_eq(f->n, MOE_ST_NDTYPES * NSHAPE);
    for (int i = 1; i < f->n; i++)
        ck_assert(strcmp(f->tensors[i - 1].name, f->tensors[i].name) < 0);
    for (int dt = 0; dt < MOE_ST_NDTYPES; dt++)
        for (int s = 0; s < NSHAPE; s++) {
            const moe_st_tensor *t = moe_st_find(f, names[dt][s]);
            ck_assert_ptr_nonnull(t);
            ck_assert_int_eq(t->dtype, dt);
            ck_assert_int_eq(t->ndim, ndims[s]);
            for (int i = 0; i < ndims[s]; i++)
                ck_assert_int_eq(t->shape[i], shapes[s][i]);
            size_t bytes = (size_t)t->numel * moe_st_dtype_size(dt);
            ck_assert_uint_eq(t->end - t->begin, bytes);
            ck_assert_msg(bytes == 0 || memcmp(t->data, bufs[dt][s], bytes) == 0, "%s differs", names[dt][s]);
            free(bufs[dt][s]);
        }
    ck_assert_str_eq(moe_st_meta(f, "format"), "cmoe");
    ck_assert_str_eq(moe_st_meta(f, "note"), "caf\xc3\xa9 \"quoted\" \\ {}");
    const char *crc = moe_st_meta(f, "crc32");
    ck_assert_ptr_nonnull(crc);
    ck_assert_uint_eq(strlen(crc), 8);
    ck_assert_ptr_null(moe_st_meta(f, "missing"));
    ck_assert_ptr_null(moe_st_find(f, "missing"));
    /* the header is padded to 8 bytes, so the data section starts aligned */
    ck_assert_uint_eq((size_t)(f->data - f->buf) % 8, 0);
    moe_st_free(f);
}
END_TEST

/* The same tensors added in another order give the same bytes. */
START_TEST(stable_order)
{
    double a[3] = {1, 2, 3}, b[2] = {4, 5};
    int64_t s3[1] = {3}, s2[1] = {2};
    for (int order = 0; order < 2; order++) {
        moe_st_writer *w;
        ck_assert(moe_st_writer_create(&w) == MOE_OK);
        if (order == 0) {
            ck_assert(moe_st_writer_add(w, "alpha", MOE_ST_F64, 1, s3, a) == MOE_OK);
            ck_assert(moe_st_writer_add(w, "beta", MOE_ST_F64, 1, s2, b) == MOE_OK);
            ck_assert(moe_st_writer_add_meta(w, "k1", "v1") == MOE_OK);
            ck_assert(moe_st_writer_add_meta(w, "k2", "v2") == MOE_OK);
        } else {
            ck_assert(moe_st_writer_add_meta(w, "k2", "v2") == MOE_OK);
            ck_assert(moe_st_writer_add(w, "beta", MOE_ST_F64, 1, s2, b) == MOE_OK);
            ck_assert(moe_st_writer_add_meta(w, "k1", "v1") == MOE_OK);
            ck_assert(moe_st_writer_add(w, "alpha", MOE_ST_F64, 1, s3, a) == MOE_OK);
        }
        ck_assert(moe_st_writer_write(w, tmp(order ? "o1.safetensors" : "o0.safetensors")) == MOE_OK);
        moe_st_writer_free(w);
    }
    static uint8_t x[4096], y[4096];
    size_t nx = read_bytes(tmp("o0.safetensors"), x, sizeof x), ny = read_bytes(tmp("o1.safetensors"), y, sizeof y);
    ck_assert_uint_eq(nx, ny);
    ck_assert(memcmp(x, y, nx) == 0);
    /* "alpha" first in the data section */
    double first;
    memcpy(&first, x + nx - 5 * 8, 8);
    ck_assert(first == 1.0);
}
END_TEST

/* add_copy keeps its own copy; add borrows. */
START_TEST(writer_copy)
{
    double v[2] = {1.5, -2.5};
    int64_t s[1] = {2};
    moe_st_writer *w;
    ck_assert(moe_st_writer_create(&w) == MOE_OK);
    ck_assert(moe_st_writer_add_copy(w, "copied", MOE_ST_F64, 1, s, v) == MOE_OK);
    ck_assert(moe_st_writer_add(w, "borrowed", MOE_ST_F64, 1, s, v) == MOE_OK);
    v[0] = 7;
    ck_assert(moe_st_writer_write(w, tmp("copy.safetensors")) == MOE_OK);
    moe_st_writer_free(w);
    moe_st_file *f;
    ck_assert(moe_st_read(tmp("copy.safetensors"), &f) == MOE_OK);
    double got[2];
    ck_assert(moe_st_get_f64(f, "copied", 1, s, got) == MOE_OK);
    ck_assert(got[0] == 1.5 && got[1] == -2.5);
    ck_assert(moe_st_get_f64(f, "borrowed", 1, s, got) == MOE_OK);
    ck_assert(got[0] == 7 && got[1] == -2.5);
    moe_st_free(f);
}
END_TEST

START_TEST(writer_rejects_bad_args)
{
    moe_st_writer *w;
    ck_assert(moe_st_writer_create(&w) == MOE_OK);
    double v[4] = {0};
    int64_t s[5] = {2, 2, 1, 1, 1}, neg[1] = {-1};
    ck_assert(moe_st_writer_add(w, "a", MOE_ST_F64, 2, s, v) == MOE_OK);
    ck_assert(moe_st_writer_add(w, "a", MOE_ST_F64, 2, s, v) == MOE_ERR_ARG);
    ck_assert_ptr_nonnull(strstr(moe_last_error(), "'a' added twice"));
    ck_assert(moe_st_writer_add(w, "__metadata__", MOE_ST_F64, 2, s, v) == MOE_ERR_ARG);
    ck_assert(moe_st_writer_add(w, "", MOE_ST_F64, 2, s, v) == MOE_ERR_ARG);
    ck_assert(moe_st_writer_add(w, "b", MOE_ST_F64, 5, s, v) == MOE_ERR_ARG);
    ck_assert(moe_st_writer_add(w, "b", MOE_ST_F64, 1, neg, v) == MOE_ERR_ARG);
    ck_assert(moe_st_writer_add(w, "b", (moe_st_dtype)99, 1, s, v) == MOE_ERR_ARG);
    ck_assert(moe_st_writer_add(w, "b", MOE_ST_F64, 1, s, NULL) == MOE_ERR_ARG);
    ck_assert(moe_st_writer_add_meta(w, "crc32", "00000000") == MOE_ERR_ARG);
    moe_st_writer_free(w);
}
END_TEST

/* ---- conversions ---------------------------------------------------------------- */

static void put16(uint8_t *p, uint16_t v)
{
    p[0] = (uint8_t)v;
    p[1] = (uint8_t)(v >> 8);
}

START_TEST(conversions)
{
    /* known half and bfloat16 patterns */
    ck_assert(moe_f16_to_f64(0x3C00) == 1.0);
    ck_assert(moe_f16_to_f64(0xC000) == -2.0);
    ck_assert(moe_f16_to_f64(0x7BFF) == 65504.0);
    ck_assert(moe_f16_to_f64(0x0001) == ldexp(1, -24));
    ck_assert(isinf(moe_f16_to_f64(0x7C00)));
    ck_assert(isnan(moe_f16_to_f64(0x7E00)));
    ck_assert(moe_bf16_to_f64(0x3F80) == 1.0);
    ck_assert(moe_bf16_to_f64(0xC040) == -3.0);

    /* round to nearest, ties to even */
    double in[] = {1.0, 1 + ldexp(1, -11), 1 + 3 * ldexp(1, -11), 65504, 65519, 65520, -0.0, ldexp(1, -25) * 1.5,
                   ldexp(1, -14) - ldexp(1, -25)};
    uint16_t want_h[] = {0x3C00, 0x3C00, 0x3C02, 0x7BFF, 0x7BFF, 0x7C00, 0x8000, 0x0001, 0x0400};
    uint16_t h[9];
    ck_assert(moe_st_from_f64(MOE_ST_F16, in, 9, h) == MOE_OK);
    for (int i = 0; i < 9; i++)
        ck_assert_msg(h[i] == want_h[i], "f16(%.17g) = %04x, want %04x", in[i], h[i], want_h[i]);
    double inb[] = {1.0, 1 + ldexp(1, -8), 1 + 3 * ldexp(1, -8), -3.0, 1e39};
    uint16_t want_b[] = {0x3F80, 0x3F80, 0x3F82, 0xC040, 0x7F80};
    uint16_t b[5];
    ck_assert(moe_st_from_f64(MOE_ST_BF16, inb, 5, b) == MOE_OK);
    for (int i = 0; i < 5; i++)
        ck_assert_msg(b[i] == want_b[i], "bf16(%.17g) = %04x, want %04x", inb[i], b[i], want_b[i]);
    /* every finite half survives decode -> encode */
    for (uint32_t u = 0; u < 0x10000; u++) {
        if ((u & 0x7C00) == 0x7C00)
            continue;
        double d = moe_f16_to_f64((uint16_t)u);
        uint16_t back;
        moe_st_from_f64(MOE_ST_F16, &d, 1, &back);
        ck_assert_msg(back == u, "half %04x -> %g -> %04x", u, d, back);
    }
    ck_assert(moe_st_from_f64(MOE_ST_I32, in, 1, h) == MOE_ERR_ARG);

    /* reading converts F32/BF16/F16 to double and integers to int32 with range checks */
    uint8_t data[4 + 2 + 2 + 16 + 4];
    float f1 = -1.25f;
    memcpy(data, &f1, 4);
    put16(data + 4, 0x3F80); /* bf16 1 */
    put16(data + 6, 0xC000); /* f16 -2 */
    int64_t i64[2] = {5, (int64_t)1 << 40};
    memcpy(data + 8, i64, 16);
    int32_t i32 = -7;
    memcpy(data + 24, &i32, 4);
    const char *hdr = "{\"f\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]},"
                      "\"b\":{\"dtype\":\"BF16\",\"shape\":[],\"data_offsets\":[4,6]},"
                      "\"h\":{\"dtype\":\"F16\",\"shape\":[1,1],\"data_offsets\":[6,8]},"
                      "\"big\":{\"dtype\":\"I64\",\"shape\":[2],\"data_offsets\":[8,24]},"
                      "\"i\":{\"dtype\":\"I32\",\"shape\":[1],\"data_offsets\":[24,28]}}";
    write_raw(tmp("conv.safetensors"), strlen(hdr), hdr, data, sizeof data);
    moe_st_file *f;
    ck_assert_msg(moe_st_read(tmp("conv.safetensors"), &f) == MOE_OK, "%s", moe_last_error());
    double d;
    int64_t one[2] = {1, 1};
    ck_assert(moe_st_get_f64(f, "f", 1, one, &d) == MOE_OK && d == -1.25);
    ck_assert(moe_st_get_f64(f, "b", 0, NULL, &d) == MOE_OK && d == 1.0);
    ck_assert(moe_st_get_f64(f, "h", 2, one, &d) == MOE_OK && d == -2.0);
    ck_assert(moe_st_get_f64(f, "h", -1, NULL, &d) == MOE_OK && d == -2.0);
    int32_t iv[2];
    ck_assert(moe_st_get_i32(f, "i", 1, one, iv) == MOE_OK && iv[0] == -7);
    int64_t two[1] = {2};
    ck_assert(moe_st_get_i32(f, "big", 1, two, iv) == MOE_ERR_FORMAT);
    ck_assert_ptr_nonnull(strstr(moe_last_error(), "does not fit in int32"));
    ck_assert(moe_st_get_f64(f, "i", 1, one, &d) == MOE_ERR_FORMAT);
    ck_assert_ptr_nonnull(strstr(moe_last_error(), "expected a float dtype"));
    ck_assert(moe_st_get_i32(f, "f", 1, one, iv) == MOE_ERR_FORMAT);
    ck_assert_ptr_nonnull(strstr(moe_last_error(), "expected an integer dtype"));
    ck_assert(moe_st_get_f64(f, "f", 2, one, &d) == MOE_ERR_FORMAT);
    ck_assert_ptr_nonnull(strstr(moe_last_error(), "has shape [1], expected [1, 1]"));
    ck_assert(moe_st_get_f64(f, "nope", 1, one, &d) == MOE_ERR_FORMAT);
    ck_assert_ptr_nonnull(strstr(moe_last_error(), "'nope' is missing"));
    moe_st_free(f);
}
END_TEST

/* ---- CRC and malformed files ---------------------------------------------------- */

static void expect_format(const char *path, const char *needle)
{
    moe_st_file *f = (moe_st_file *)1;
    moe_status s = moe_st_read(path, &f);
    ck_assert_msg(s == MOE_ERR_FORMAT, "%s: status %d, want MOE_ERR_FORMAT (%s)", needle, s, moe_last_error());
    ck_assert_ptr_null(f);
    ck_assert_msg(strstr(moe_last_error(), needle), "message '%s' lacks '%s'", moe_last_error(), needle);
    ck_assert_msg(strstr(moe_last_error(), path), "message '%s' does not name the file", moe_last_error());
}

START_TEST(crc_verified)
{
    float v[16];
    for (int i = 0; i < 16; i++)
        v[i] = (float)i;
    int64_t s[2] = {4, 4};
    moe_st_writer *w;
    ck_assert(moe_st_writer_create(&w) == MOE_OK);
    ck_assert(moe_st_writer_add(w, "w", MOE_ST_F32, 2, s, v) == MOE_OK);
    const char *path = tmp("crc.safetensors");
    ck_assert(moe_st_writer_write(w, path) == MOE_OK);
    moe_st_writer_free(w);
    moe_st_file *f;
    ck_assert(moe_st_read(path, &f) == MOE_OK);
    moe_st_free(f);
    static uint8_t buf[4096];
    size_t n = read_bytes(path, buf, sizeof buf);
    buf[n - 3] ^= 0x10; /* one bit of the data */
    write_bytes(path, buf, n);
    expect_format(path, "CRC-32 mismatch");
}
END_TEST

START_TEST(malformed_files)
{
    static const uint8_t zeros[64] = {0};
    static const struct {
        const char *header;
        size_t data_len;
        const char *needle;
    } cases[] = {
        {"{not json", 0, "header is not valid JSON"},
        {"[1, 2]", 0, "header is not a JSON object"},
        {"{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]},\"a\":{}}", 8, "duplicate"},
        {"{\"a\":{\"dtype\":\"F8\",\"shape\":[2],\"data_offsets\":[0,2]}}", 2, "unknown dtype 'F8'"},
        {"{\"a\":{\"dtype\":7,\"shape\":[2],\"data_offsets\":[0,2]}}", 2, "dtype is not a string"},
        {"{\"a\":{\"dtype\":\"F32\",\"shape\":[-2],\"data_offsets\":[0,8]}}", 8, "shape[0] is not a non-negative integer"},
        {"{\"a\":{\"dtype\":\"F32\",\"shape\":[2, 2.0],\"data_offsets\":[0,16]}}", 16, "shape[1] is not a non-negative integer"},
        {"{\"a\":{\"dtype\":\"U8\",\"shape\":[1,1,1,1,1],\"data_offsets\":[0,1]}}", 1, "5 dimensions; cmoe supports at most 4"},
        {"{\"a\":{\"dtype\":\"U8\",\"shape\":4,\"data_offsets\":[0,4]}}", 4, "shape is not a JSON array"},
        {"{\"a\":{\"dtype\":\"F32\",\"shape\":[4],\"data_offsets\":[8,24]}}", 16, "outside the data section"},
        {"{\"a\":{\"dtype\":\"F32\",\"shape\":[16],\"data_offsets\":[0,64]}}", 40, "outside the data section"}, /* truncated */
        {"{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[8,0]}}", 8, "end 0 is before begin 8"},
        {"{\"a\":{\"dtype\":\"F32\",\"shape\":[3],\"data_offsets\":[0,8]}}", 8, "needs 12 bytes"},
        {"{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0]}}", 8, "data_offsets must be [begin, end]"},
        {"{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,-8]}}", 8, "data_offsets must be [begin, end]"},
        {"{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]},"
         "\"b\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[4,12]}}", 12, "overlap"},
        {"{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]},\"__metadata__\":{\"k\":1}}", 4,
         "__metadata__ value of 'k' is not a string"},
        {"{\"__metadata__\":[\"k\"]}", 0, "__metadata__ is not a JSON object"},
        {"{\"__metadata__\":{\"crc32\":\"xyz\"}}", 0, "crc32 'xyz' is not 8 hex digits"},
        {"{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4],\"extra\":1}}", 4, "unknown key 'extra'"},
        {"{\"a\":{\"shape\":[1],\"data_offsets\":[0,4]}}", 4, "missing \"dtype\""},
        {"{\"a\":[1]}", 0, "tensor 'a': entry is not a JSON object"},
        {"{\"\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[0,1]}}", 1, "empty name"},
        {"{\"a\":{\"dtype\":\"F64\",\"shape\":[4611686018427387904, 4],\"data_offsets\":[0,8]}}", 8, "shape overflows"},
    };
    const char *path = tmp("bad.safetensors");
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        write_raw(path, strlen(cases[i].header), cases[i].header, zeros, cases[i].data_len);
        expect_format(path, cases[i].needle);
    }
    printf("safetensors: %zu malformed headers refused\n", sizeof cases / sizeof cases[0] + 4);

    /* the header length field itself */
    const char *ok = "{\"a\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[0,1]}}";
    write_raw(path, (uint64_t)200 * 1000 * 1000, ok, zeros, 1);
    expect_format(path, "exceeds the limit");
    write_raw(path, UINT64_MAX, ok, zeros, 1);
    expect_format(path, "exceeds the limit");
    write_raw(path, strlen(ok) + 100, ok, zeros, 1);
    expect_format(path, "bytes that follow it");
    write_bytes(path, "\x05\0\0", 3);
    expect_format(path, "too short");
    /* and a good one, to show the cases above fail for their own reason */
    write_raw(path, strlen(ok), ok, zeros, 1);
    moe_st_file *f;
    ck_assert_msg(moe_st_read(path, &f) == MOE_OK, "%s", moe_last_error());
    moe_st_free(f);
}
END_TEST

START_TEST(io_errors)
{
    moe_st_file *f;
    const char *missing = tmp("does-not-exist.safetensors");
    ck_assert(moe_st_read(missing, &f) == MOE_ERR_IO);
    ck_assert_ptr_nonnull(strstr(moe_last_error(), missing));
    ck_assert(moe_st_read(dir, &f) == MOE_ERR_IO); /* a directory */
    ck_assert_ptr_nonnull(strstr(moe_last_error(), "is a directory"));
    /* a FIFO without a writer: refused at once, not waited on */
    const char *fifo = tmp("fifo.safetensors");
    ck_assert_int_eq(mkfifo(fifo, 0600), 0);
    ck_assert(moe_st_read(fifo, &f) == MOE_ERR_IO);
    ck_assert_ptr_nonnull(strstr(moe_last_error(), "FIFO"));
    remove(fifo);

    moe_st_writer *w;
    ck_assert(moe_st_writer_create(&w) == MOE_OK);
    uint8_t b[1] = {1};
    int64_t s[1] = {1};
    ck_assert(moe_st_writer_add(w, "b", MOE_ST_BOOL, 1, s, b) == MOE_OK);
    ck_assert(moe_st_writer_write(w, "/nonexistent-dir/x.safetensors") == MOE_ERR_IO);
    ck_assert_ptr_nonnull(strstr(moe_last_error(), "/nonexistent-dir/x.safetensors"));
    moe_st_writer_free(w);
}
END_TEST

/* A failed write (the disk full: the file-size limit makes write() fail with EFBIG) leaves
 * the old file as it was and no temporary behind. */
START_TEST(atomic_writer)
{
    const char *path = tmp("atomic.safetensors");
    write_bytes(path, "old contents", 12);
    moe_st_writer *w;
    ck_assert(moe_st_writer_create(&w) == MOE_OK);
    static double v[4096];
    int64_t s[1] = {4096};
    ck_assert(moe_st_writer_add(w, "v", MOE_ST_F64, 1, s, v) == MOE_OK);
    struct rlimit old, small = {1000, 1000};
    ck_assert_int_eq(getrlimit(RLIMIT_FSIZE, &old), 0);
    small.rlim_max = old.rlim_max;
    signal(SIGXFSZ, SIG_IGN);
    ck_assert_int_eq(setrlimit(RLIMIT_FSIZE, &small), 0);
    moe_status st = moe_st_writer_write(w, path);
    ck_assert_int_eq(setrlimit(RLIMIT_FSIZE, &old), 0);
    ck_assert_msg(st == MOE_ERR_IO, "%s", moe_last_error());
    ck_assert_ptr_nonnull(strstr(moe_last_error(), "File too large"));
    char buf[64];
    size_t n = read_bytes(path, buf, sizeof buf);
    ck_assert_uint_eq(n, 12);
    ck_assert(memcmp(buf, "old contents", 12) == 0);
    ck_assert_int_eq(count_entries(dir, "atomic.safetensors.tmp"), 0);
    /* now it succeeds, replaces the old file and leaves no temporary */
    ck_assert_msg(moe_st_writer_write(w, path) == MOE_OK, "%s", moe_last_error());
    moe_st_writer_free(w);
    ck_assert_int_eq(count_entries(dir, "atomic.safetensors.tmp"), 0);
    moe_st_file *f;
    ck_assert(moe_st_read(path, &f) == MOE_OK);
    ck_assert_int_eq(f->n, 1);
    moe_st_free(f);
}
END_TEST

/* A file written by the Python safetensors package (header copied from its output; no crc32). */
START_TEST(reads_foreign_files)
{
    const char *hdr = "{\"__metadata__\":{\"format\":\"pt\"},\"w\":{\"dtype\":\"F32\",\"shape\":[2,2],\"data_offsets\":[0,16]}}  ";
    float v[4] = {1, 2, 3, 4};
    write_raw(tmp("foreign.safetensors"), strlen(hdr), hdr, v, sizeof v);
    moe_st_file *f;
    ck_assert_msg(moe_st_read(tmp("foreign.safetensors"), &f) == MOE_OK, "%s", moe_last_error());
    double d[4];
    int64_t s[2] = {2, 2};
    ck_assert(moe_st_get_f64(f, "w", 2, s, d) == MOE_OK);
    ck_assert(d[0] == 1 && d[3] == 4);
    ck_assert_str_eq(moe_st_meta(f, "format"), "pt");
    ck_assert_ptr_null(moe_st_meta(f, "crc32"));
    moe_st_free(f);
}
END_TEST

/* ---- comparison mode for tests/oracle.sh ---------------------------------------- */

static int compare_files(const char *expected, const char *actual, double rtol)
{
    moe_st_file *e, *a;
    if (moe_st_read(expected, &e)) {
        fprintf(stderr, "compare: %s\n", moe_last_error());
        return 1;
    }
    if (moe_st_read(actual, &a)) {
        fprintf(stderr, "compare: %s\n", moe_last_error());
        moe_st_free(e);
        return 1;
    }
    int bad = 0;
    double worst = 0;
    for (int i = 0; i < a->n; i++)
        if (!moe_st_find(e, a->tensors[i].name)) {
            fprintf(stderr, "compare: %s has an unexpected tensor '%s'\n", actual, a->tensors[i].name);
            bad = 1;
        }
    for (int i = 0; i < e->n; i++) {
        const moe_st_tensor *te = &e->tensors[i], *ta = moe_st_find(a, te->name);
        char s1[128], s2[128];
        if (!ta) {
            fprintf(stderr, "compare: %s lacks tensor '%s'\n", actual, te->name);
            bad = 1;
            continue;
        }
        if (ta->dtype != te->dtype || moe_st_check_shape(a, ta, te->ndim, te->shape) != MOE_OK) {
            fprintf(stderr, "compare: '%s' is %s %s, expected %s %s\n", te->name, moe_st_dtype_name(ta->dtype),
                    moe_st_shape_str(ta->ndim, ta->shape, s1, sizeof s1), moe_st_dtype_name(te->dtype),
                    moe_st_shape_str(te->ndim, te->shape, s2, sizeof s2));
            bad = 1;
            continue;
        }
        if (!moe_st_dtype_is_float(te->dtype)) {
            if (memcmp(te->data, ta->data, te->end - te->begin) != 0) {
                fprintf(stderr, "compare: integer tensor '%s' differs\n", te->name);
                bad = 1;
            }
            continue;
        }
        /* plain calloc: tu_alloc asserts, and Check is not running here */
        double *x = calloc((size_t)te->numel + 1, sizeof *x), *y = calloc((size_t)te->numel + 1, sizeof *y);
        if (!x || !y) {
            fprintf(stderr, "compare: out of memory\n");
            return 1;
        }
        moe_st_tensor_f64(e, te, x);
        moe_st_tensor_f64(a, ta, y);
        double err = tu_rel_err(y, x, te->numel);
        if (err > worst)
            worst = err;
        if (!(err <= rtol)) {
            fprintf(stderr, "compare: '%s' rel err %.3e > %.1e\n", te->name, err, rtol);
            bad = 1;
        }
        free(x);
        free(y);
    }
    const char *ce = moe_st_meta(e, "config"), *ca = moe_st_meta(a, "config");
    if (!ce || !ca || strcmp(ce, ca) != 0) {
        fprintf(stderr, "compare: the config metadata differs\n");
        bad = 1;
    }
    printf("compare: %d tensors, worst rel err %.3e%s\n", e->n, worst, bad ? ", MISMATCH" : "");
    moe_st_free(e);
    moe_st_free(a);
    return bad;
}

int main(int argc, char **argv)
{
    if (argc >= 4 && strcmp(argv[1], "--compare") == 0)
        return compare_files(argv[2], argv[3], argc > 4 ? atof(argv[4]) : 1e-10);
    const char *t = getenv("TMPDIR");
    snprintf(dir, sizeof dir, "%s/cmoe-st-XXXXXX", t && *t ? t : "/tmp");
    if (!mkdtemp(dir)) {
        perror("mkdtemp");
        return 99;
    }
    Suite *s = suite_create("safetensors");
    TCase *tc = tcase_create("io");
    tcase_add_test(tc, round_trip_every_dtype);
    tcase_add_test(tc, stable_order);
    tcase_add_test(tc, writer_copy);
    tcase_add_test(tc, writer_rejects_bad_args);
    tcase_add_test(tc, conversions);
    tcase_add_test(tc, crc_verified);
    tcase_add_test(tc, malformed_files);
    tcase_add_test(tc, io_errors);
    tcase_add_test(tc, atomic_writer);
    tcase_add_test(tc, reads_foreign_files);
    suite_add_tcase(s, tc);
    int rc = tu_run(s);
    static const char *const files[] = {"all.safetensors", "o0.safetensors", "o1.safetensors", "copy.safetensors",
                                        "conv.safetensors", "crc.safetensors", "bad.safetensors",
                                        "atomic.safetensors", "foreign.safetensors"};
    for (size_t i = 0; i < sizeof files / sizeof files[0]; i++)
        remove(tmp(files[i]));
    if (rmdir(dir) != 0)
        fprintf(stderr, "note: could not remove %s: %s\n", dir, strerror(errno));
    return rc;
}
