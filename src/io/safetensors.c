/*
 * safetensors: reader (validates everything before any byte of data is trusted) and an
 * atomic writer with a CRC-32 of the data section in the metadata. JSON goes through
 * jansson only; the data section is little-endian whatever the host.
 */
#define _POSIX_C_SOURCE 200809L
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <jansson.h>
#include <zlib.h>

#include "io/safetensors.h"

/* ---- dtypes ---------------------------------------------------------------- */

static const struct {
    const char *name;
    size_t size;
} dtypes[MOE_ST_NDTYPES] = {
    [MOE_ST_F64] = {"F64", 8}, [MOE_ST_F32] = {"F32", 4}, [MOE_ST_BF16] = {"BF16", 2},
    [MOE_ST_F16] = {"F16", 2}, [MOE_ST_I64] = {"I64", 8}, [MOE_ST_I32] = {"I32", 4},
    [MOE_ST_I16] = {"I16", 2}, [MOE_ST_U16] = {"U16", 2}, [MOE_ST_I8] = {"I8", 1},
    [MOE_ST_U8] = {"U8", 1},   [MOE_ST_BOOL] = {"BOOL", 1},
};

#define DTYPE_LIST "F64, F32, BF16, F16, I64, I32, I16, U16, I8, U8, BOOL"

const char *moe_st_dtype_name(moe_st_dtype t)
{
    return (unsigned)t < MOE_ST_NDTYPES ? dtypes[t].name : "?";
}

size_t moe_st_dtype_size(moe_st_dtype t)
{
    return (unsigned)t < MOE_ST_NDTYPES ? dtypes[t].size : 0;
}

int moe_st_dtype_from_name(const char *name)
{
    for (int i = 0; i < MOE_ST_NDTYPES; i++)
        if (strcmp(dtypes[i].name, name) == 0)
            return i;
    return -1;
}

int moe_st_dtype_is_float(moe_st_dtype t)
{
    return t == MOE_ST_F64 || t == MOE_ST_F32 || t == MOE_ST_BF16 || t == MOE_ST_F16;
}

const char *moe_st_shape_str(int ndim, const int64_t *shape, char *buf, size_t len)
{
    size_t at = 0;
    at += (size_t)snprintf(buf, len, "[");
    for (int i = 0; i < ndim && at < len; i++)
        at += (size_t)snprintf(buf + at, len - at, i ? ", %lld" : "%lld", (long long)shape[i]);
    if (at < len)
        snprintf(buf + at, len - at, "]");
    return buf;
}

/* ---- little-endian bytes ------------------------------------------------- */

static int host_is_le(void)
{
    const uint16_t one = 1;
    return *(const uint8_t *)&one == 1;
}

static uint64_t ld_le(const uint8_t *p, size_t size)
{
    uint64_t v = 0;
    for (size_t i = 0; i < size; i++)
        v |= (uint64_t)p[i] << (8 * i);
    return v;
}

/* Host element -> little-endian bytes (a plain copy on little-endian hosts). */
static void to_le(uint8_t *dst, const uint8_t *src, size_t size)
{
    if (host_is_le())
        memcpy(dst, src, size);
    else
        for (size_t i = 0; i < size; i++)
            dst[i] = src[size - 1 - i];
}

/* ---- float formats --------------------------------------------------------- */

double moe_st_half_to_double(uint16_t h)
{
    int sign = h >> 15, exp = (h >> 10) & 0x1f, mant = h & 0x3ff;
    double v;
    if (exp == 0)
        v = ldexp(mant, -24);
    else if (exp == 31)
        v = mant ? NAN : INFINITY;
    else
        v = ldexp(mant + 1024, exp - 25);
    return sign ? -v : v;
}

double moe_st_bf16_to_double(uint16_t h)
{
    uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

/* Rounds v to the nearest (ties to even) binary float with mbits mantissa and ebits
 * exponent bits; returns its bit pattern. Direct from double, so no double rounding. */
static uint32_t encode_float(double v, int mbits, int ebits)
{
    const int bias = (1 << (ebits - 1)) - 1;
    const uint32_t sign = signbit(v) ? 1u << (mbits + ebits) : 0;
    const uint32_t inf = ((1u << ebits) - 1) << mbits;
    if (isnan(v))
        return sign | inf | (1u << (mbits - 1));
    double a = fabs(v);
    if (isinf(a))
        return sign | inf;
    if (a == 0)
        return sign;
    int e;
    double m = frexp(a, &e); /* a = m·2^e, m in [0.5, 1) */
    int E = e - 1 + bias;
    if (E < 1) /* subnormal, in units of 2^(1 - bias - mbits); 2^mbits rounds up to the least normal */
        return sign | (uint32_t)nearbyint(ldexp(a, bias - 1 + mbits));
    double r = nearbyint(ldexp(m, mbits + 1)); /* in [2^mbits, 2^(mbits+1)] */
    if (r == ldexp(1, mbits + 1)) {
        r = ldexp(1, mbits);
        E++;
    }
    if (E >= (1 << ebits) - 1)
        return sign | inf;
    return sign | ((uint32_t)E << mbits) | ((uint32_t)r - (1u << mbits));
}

moe_status moe_st_from_f64(moe_st_dtype dtype, const double *src, int64_t n, void *dst)
{
    switch (dtype) {
    case MOE_ST_F64:
        memcpy(dst, src, (size_t)n * sizeof *src);
        return MOE_OK;
    case MOE_ST_F32:
        for (int64_t i = 0; i < n; i++)
            ((float *)dst)[i] = (float)src[i];
        return MOE_OK;
    case MOE_ST_BF16:
        for (int64_t i = 0; i < n; i++)
            ((uint16_t *)dst)[i] = (uint16_t)encode_float(src[i], 7, 8);
        return MOE_OK;
    case MOE_ST_F16:
        for (int64_t i = 0; i < n; i++)
            ((uint16_t *)dst)[i] = (uint16_t)encode_float(src[i], 10, 5);
        return MOE_OK;
    default:
        return moe_error(MOE_ERR_ARG, "safetensors: cannot convert double to %s", moe_st_dtype_name(dtype));
    }
}

/* ---- reading ----------------------------------------------------------------- */

void moe_st_free(moe_st_file *f)
{
    if (!f)
        return;
    for (int i = 0; i < f->n; i++)
        free(f->tensors[i].name);
    for (int i = 0; i < f->n_meta; i++) {
        free(f->meta_key[i]);
        free(f->meta_value[i]);
    }
    free(f->tensors);
    free(f->meta_key);
    free(f->meta_value);
    free(f->buf);
    free(f->path);
    free(f);
}

static char *dupstr(const char *s)
{
    size_t n = strlen(s) + 1;
    char *d = malloc(n);
    if (d)
        memcpy(d, s, n);
    return d;
}

#define FMT(...) moe_error(MOE_ERR_FORMAT, __VA_ARGS__)

static moe_status parse_metadata(moe_st_file *f, json_t *meta)
{
    if (!json_is_object(meta))
        return FMT("%s: __metadata__ is not a JSON object", f->path);
    size_t n = json_object_size(meta);
    f->meta_key = calloc(n ? n : 1, sizeof *f->meta_key);
    f->meta_value = calloc(n ? n : 1, sizeof *f->meta_value);
    if (!f->meta_key || !f->meta_value)
        return moe_error(MOE_ERR_NOMEM, "%s: out of memory for metadata", f->path);
    const char *key;
    json_t *v;
    json_object_foreach(meta, key, v) {
        if (!json_is_string(v))
            return FMT("%s: __metadata__ value of '%s' is not a string (safetensors metadata maps strings to strings)",
                       f->path, key);
        f->meta_key[f->n_meta] = dupstr(key);
        f->meta_value[f->n_meta] = dupstr(json_string_value(v));
        if (!f->meta_key[f->n_meta] || !f->meta_value[f->n_meta])
            return moe_error(MOE_ERR_NOMEM, "%s: out of memory for metadata", f->path);
        f->n_meta++;
    }
    return MOE_OK;
}

static int get_uint(json_t *v, int64_t *out)
{
    if (!json_is_integer(v) || json_integer_value(v) < 0)
        return 0;
    *out = (int64_t)json_integer_value(v);
    return 1;
}

static moe_status parse_tensor(moe_st_file *f, const char *name, json_t *e, moe_st_tensor *t)
{
    const char *path = f->path;
    if (!*name)
        return FMT("%s: a tensor has an empty name", path);
    if (!json_is_object(e))
        return FMT("%s: tensor '%s': entry is not a JSON object", path, name);
    const char *key;
    json_t *v;
    json_object_foreach(e, key, v) {
        if (strcmp(key, "dtype") && strcmp(key, "shape") && strcmp(key, "data_offsets"))
            return FMT("%s: tensor '%s': unknown key '%s' (allowed: dtype, shape, data_offsets)", path, name, key);
    }
    json_t *jd = json_object_get(e, "dtype"), *js = json_object_get(e, "shape"),
           *jo = json_object_get(e, "data_offsets");
    if (!jd || !js || !jo)
        return FMT("%s: tensor '%s': missing \"%s\"", path, name, !jd ? "dtype" : !js ? "shape" : "data_offsets");

    if (!json_is_string(jd))
        return FMT("%s: tensor '%s': dtype is not a string", path, name);
    int dt = moe_st_dtype_from_name(json_string_value(jd));
    if (dt < 0)
        return FMT("%s: tensor '%s': unknown dtype '%s' (allowed: " DTYPE_LIST ")", path, name,
                   json_string_value(jd));
    t->dtype = (moe_st_dtype)dt;

    if (!json_is_array(js))
        return FMT("%s: tensor '%s': shape is not a JSON array", path, name);
    size_t nd = json_array_size(js);
    if (nd > MOE_ST_MAX_DIMS)
        return FMT("%s: tensor '%s': %zu dimensions; cmoe supports at most %d", path, name, nd, MOE_ST_MAX_DIMS);
    t->ndim = (int)nd;
    t->numel = 1;
    for (size_t i = 0; i < nd; i++) {
        if (!get_uint(json_array_get(js, i), &t->shape[i]))
            return FMT("%s: tensor '%s': shape[%zu] is not a non-negative integer", path, name, i);
        if (t->shape[i] && t->numel > INT64_MAX / t->shape[i])
            return FMT("%s: tensor '%s': shape overflows 64-bit element counts", path, name);
        t->numel *= t->shape[i];
    }

    int64_t b, en;
    if (!json_is_array(jo) || json_array_size(jo) != 2 || !get_uint(json_array_get(jo, 0), &b) ||
        !get_uint(json_array_get(jo, 1), &en))
        return FMT("%s: tensor '%s': data_offsets must be [begin, end], two non-negative integers", path, name);
    if (en < b)
        return FMT("%s: tensor '%s': data_offsets end %lld is before begin %lld", path, name, (long long)en,
                   (long long)b);
    if ((uint64_t)en > f->data_size)
        return FMT("%s: tensor '%s': data_offsets [%lld, %lld] lie outside the data section (%llu bytes; file truncated?)",
                   path, name, (long long)b, (long long)en, (unsigned long long)f->data_size);
    size_t es = moe_st_dtype_size(t->dtype);
    char sh[128];
    moe_st_shape_str(t->ndim, t->shape, sh, sizeof sh);
    if (t->numel > INT64_MAX / (int64_t)es)
        return FMT("%s: tensor '%s': %s %s is too large", path, name, moe_st_dtype_name(t->dtype), sh);
    if (t->numel * (int64_t)es != en - b)
        return FMT("%s: tensor '%s': %s %s needs %lld bytes but data_offsets [%lld, %lld] span %lld", path, name,
                   moe_st_dtype_name(t->dtype), sh, (long long)(t->numel * (int64_t)es), (long long)b,
                   (long long)en, (long long)(en - b));
    t->begin = (uint64_t)b;
    t->end = (uint64_t)en;
    t->data = f->data + b;
    if (!(t->name = dupstr(name)))
        return moe_error(MOE_ERR_NOMEM, "%s: out of memory", path);
    return MOE_OK;
}

static int by_name(const void *a, const void *b)
{
    return strcmp(((const moe_st_tensor *)a)->name, ((const moe_st_tensor *)b)->name);
}

static int by_begin(const void *a, const void *b)
{
    const moe_st_tensor *x = *(const moe_st_tensor *const *)a, *y = *(const moe_st_tensor *const *)b;
    return x->begin < y->begin ? -1 : x->begin > y->begin ? 1 : strcmp(x->name, y->name);
}

static moe_status check_overlap(moe_st_file *f)
{
    const moe_st_tensor **order = malloc((size_t)(f->n ? f->n : 1) * sizeof *order);
    if (!order)
        return moe_error(MOE_ERR_NOMEM, "%s: out of memory", f->path);
    int m = 0;
    for (int i = 0; i < f->n; i++)
        if (f->tensors[i].end > f->tensors[i].begin) /* empty tensors occupy no bytes */
            order[m++] = &f->tensors[i];
    qsort(order, (size_t)m, sizeof *order, by_begin);
    moe_status s = MOE_OK;
    for (int i = 1; i < m && s == MOE_OK; i++)
        if (order[i]->begin < order[i - 1]->end)
            s = FMT("%s: tensors '%s' [%llu, %llu) and '%s' [%llu, %llu) overlap in the data section", f->path,
                    order[i - 1]->name, (unsigned long long)order[i - 1]->begin,
                    (unsigned long long)order[i - 1]->end, order[i]->name, (unsigned long long)order[i]->begin,
                    (unsigned long long)order[i]->end);
    free(order);
    return s;
}

static uint32_t crc_of(const uint8_t *p, uint64_t n)
{
    uLong crc = crc32(0L, Z_NULL, 0);
    while (n > 0) {
        uInt chunk = n > (1u << 30) ? (1u << 30) : (uInt)n;
        crc = crc32(crc, p, chunk);
        p += chunk;
        n -= chunk;
    }
    return (uint32_t)crc;
}

static moe_status check_crc(moe_st_file *f)
{
    const char *want = moe_st_meta(f, "crc32");
    if (!want)
        return MOE_OK;
    char *end;
    errno = 0;
    unsigned long v = strtoul(want, &end, 16);
    if (strlen(want) != 8 || *end || errno || want[0] == '-' || want[0] == '+' || want[0] == ' ')
        return FMT("%s: __metadata__ crc32 '%s' is not 8 hex digits", f->path, want);
    uint32_t have = crc_of(f->data, f->data_size);
    if ((uint32_t)v != have)
        return FMT("%s: CRC-32 mismatch: the header says %08lx, the data section has %08lx (file corrupted)",
                   f->path, v, (unsigned long)have);
    return MOE_OK;
}

/* Takes ownership of buf. */
static moe_status parse_owned(uint8_t *buf, size_t size, const char *name, moe_st_file **out)
{
    *out = NULL;
    moe_st_file *f = calloc(1, sizeof *f);
    char *path = dupstr(name);
    if (!f || !path) {
        free(f);
        free(path);
        free(buf);
        return moe_error(MOE_ERR_NOMEM, "%s: out of memory", name);
    }
    f->buf = buf;
    f->size = size;
    f->path = path;
    moe_status s;
    json_t *root = NULL;
    if (size < 8) {
        s = FMT("%s: %zu bytes, too short for the 8-byte header length of a safetensors file", name, size);
        goto fail;
    }
    uint64_t hlen = ld_le(buf, 8);
    if (hlen > MOE_ST_MAX_HEADER) {
        s = FMT("%s: header length %llu exceeds the limit of %llu bytes (not a safetensors file?)", name,
                (unsigned long long)hlen, (unsigned long long)MOE_ST_MAX_HEADER);
        goto fail;
    }
    if (hlen > size - 8) {
        s = FMT("%s: header length %llu exceeds the %zu bytes that follow it (file truncated?)", name,
                (unsigned long long)hlen, size - 8);
        goto fail;
    }
    f->data = buf + 8 + hlen;
    f->data_size = size - 8 - hlen;

    json_error_t err;
    root = json_loadb((const char *)buf + 8, (size_t)hlen, JSON_REJECT_DUPLICATES, &err);
    if (!root) {
        s = FMT("%s: header is not valid JSON: %s (line %d, column %d)", name, err.text, err.line, err.column);
        goto fail;
    }
    if (!json_is_object(root)) {
        s = FMT("%s: header is not a JSON object", name);
        goto fail;
    }
    size_t nt = json_object_size(root);
    f->tensors = calloc(nt ? nt : 1, sizeof *f->tensors);
    if (!f->tensors) {
        s = moe_error(MOE_ERR_NOMEM, "%s: out of memory for %zu tensors", name, nt);
        goto fail;
    }
    const char *key;
    json_t *v;
    json_object_foreach(root, key, v) {
        if (strcmp(key, "__metadata__") == 0)
            s = parse_metadata(f, v);
        else if ((s = parse_tensor(f, key, v, &f->tensors[f->n])) == MOE_OK)
            f->n++;
        if (s)
            goto fail;
    }
    qsort(f->tensors, (size_t)f->n, sizeof *f->tensors, by_name);
    if ((s = check_overlap(f)) || (s = check_crc(f)))
        goto fail;
    json_decref(root);
    *out = f;
    return MOE_OK;
fail:
    json_decref(root);
    moe_st_free(f);
    return s;
}

moe_status moe_st_parse(const void *buf, size_t size, const char *name, moe_st_file **out)
{
    uint8_t *copy = malloc(size ? size : 1);
    if (!copy)
        return moe_error(MOE_ERR_NOMEM, "%s: out of memory for %zu bytes", name, size);
    memcpy(copy, buf, size);
    return parse_owned(copy, size, name, out);
}

moe_status moe_st_read(const char *path, moe_st_file **out)
{
    *out = NULL;
    FILE *fp = fopen(path, "rb");
    if (!fp)
        return moe_error(MOE_ERR_IO, "%s: cannot open: %s", path, strerror(errno));
    struct stat st;
    if (fstat(fileno(fp), &st) != 0 || !S_ISREG(st.st_mode)) {
        fclose(fp);
        return moe_error(MOE_ERR_IO, "%s: not a regular file", path);
    }
    if ((uint64_t)st.st_size > SIZE_MAX) {
        fclose(fp);
        return moe_error(MOE_ERR_NOMEM, "%s: %lld bytes do not fit in memory", path, (long long)st.st_size);
    }
    size_t size = (size_t)st.st_size;
    uint8_t *buf = malloc(size ? size : 1);
    if (!buf) {
        fclose(fp);
        return moe_error(MOE_ERR_NOMEM, "%s: cannot allocate %zu bytes", path, size);
    }
    size_t got = fread(buf, 1, size, fp);
    int err = ferror(fp) ? errno : 0;
    fclose(fp);
    if (got != size) {
        free(buf);
        return moe_error(MOE_ERR_IO, "%s: read %zu of %zu bytes: %s", path, got, size,
                         err ? strerror(err) : "file changed while reading");
    }
    return parse_owned(buf, size, path, out);
}

const moe_st_tensor *moe_st_find(const moe_st_file *f, const char *name)
{
    moe_st_tensor key = {.name = (char *)name};
    return f->n ? bsearch(&key, f->tensors, (size_t)f->n, sizeof key, by_name) : NULL;
}

const char *moe_st_meta(const moe_st_file *f, const char *key)
{
    for (int i = 0; i < f->n_meta; i++)
        if (strcmp(f->meta_key[i], key) == 0)
            return f->meta_value[i];
    return NULL;
}

moe_status moe_st_check_shape(const moe_st_file *f, const moe_st_tensor *t, int ndim, const int64_t *shape)
{
    if (ndim < 0)
        return MOE_OK;
    int same = t->ndim == ndim;
    for (int i = 0; same && i < ndim; i++)
        same = t->shape[i] == shape[i];
    if (!same) {
        char a[128], b[128];
        return FMT("%s: tensor '%s' has shape %s, expected %s", f->path, t->name,
                   moe_st_shape_str(t->ndim, t->shape, a, sizeof a), moe_st_shape_str(ndim, shape, b, sizeof b));
    }
    return MOE_OK;
}

moe_status moe_st_tensor_f64(const moe_st_file *f, const moe_st_tensor *t, double *dst)
{
    if (!moe_st_dtype_is_float(t->dtype))
        return FMT("%s: tensor '%s' is %s, expected a float dtype (F64, F32, BF16, F16)", f->path, t->name,
                   moe_st_dtype_name(t->dtype));
    const uint8_t *p = t->data;
    size_t es = moe_st_dtype_size(t->dtype);
    for (int64_t i = 0; i < t->numel; i++, p += es) {
        uint64_t bits = ld_le(p, es);
        if (t->dtype == MOE_ST_F64) {
            memcpy(&dst[i], &bits, 8);
        } else if (t->dtype == MOE_ST_F32) {
            uint32_t b32 = (uint32_t)bits;
            float x;
            memcpy(&x, &b32, 4);
            dst[i] = x;
        } else if (t->dtype == MOE_ST_BF16) {
            dst[i] = moe_st_bf16_to_double((uint16_t)bits);
        } else {
            dst[i] = moe_st_half_to_double((uint16_t)bits);
        }
    }
    return MOE_OK;
}

moe_status moe_st_tensor_i32(const moe_st_file *f, const moe_st_tensor *t, int32_t *dst)
{
    if (moe_st_dtype_is_float(t->dtype))
        return FMT("%s: tensor '%s' is %s, expected an integer dtype (I32 or I64)", f->path, t->name,
                   moe_st_dtype_name(t->dtype));
    const uint8_t *p = t->data;
    size_t es = moe_st_dtype_size(t->dtype);
    for (int64_t i = 0; i < t->numel; i++, p += es) {
        uint64_t bits = ld_le(p, es);
        int64_t v;
        switch (t->dtype) {
        case MOE_ST_I64: v = (int64_t)bits; break;
        case MOE_ST_I32: v = (int32_t)(uint32_t)bits; break;
        case MOE_ST_I16: v = (int16_t)(uint16_t)bits; break;
        case MOE_ST_I8: v = (int8_t)(uint8_t)bits; break;
        default: v = (int64_t)bits; break; /* U16, U8, BOOL */
        }
        if (v < INT32_MIN || v > INT32_MAX)
            return FMT("%s: tensor '%s': element %lld = %lld does not fit in int32", f->path, t->name, (long long)i,
                       (long long)v);
        dst[i] = (int32_t)v;
    }
    return MOE_OK;
}

static moe_status find_checked(const moe_st_file *f, const char *name, int ndim, const int64_t *shape,
                               const moe_st_tensor **t)
{
    if (!(*t = moe_st_find(f, name)))
        return FMT("%s: tensor '%s' is missing", f->path, name);
    return moe_st_check_shape(f, *t, ndim, shape);
}

moe_status moe_st_get_f64(const moe_st_file *f, const char *name, int ndim, const int64_t *shape, double *dst)
{
    const moe_st_tensor *t;
    moe_status s = find_checked(f, name, ndim, shape, &t);
    return s ? s : moe_st_tensor_f64(f, t, dst);
}

moe_status moe_st_get_i32(const moe_st_file *f, const char *name, int ndim, const int64_t *shape, int32_t *dst)
{
    const moe_st_tensor *t;
    moe_status s = find_checked(f, name, ndim, shape, &t);
    return s ? s : moe_st_tensor_i32(f, t, dst);
}

/* ---- writing ------------------------------------------------------------------ */

typedef struct {
    char *name;
    moe_st_dtype dtype;
    int ndim;
    int64_t shape[MOE_ST_MAX_DIMS];
    int64_t numel;
    const void *data;
    void *owned;
} st_entry;

struct moe_st_writer {
    st_entry *e;
    int n, cap;
    char **mkey, **mval;
    int nm, capm;
};

moe_status moe_st_writer_create(moe_st_writer **out)
{
    *out = calloc(1, sizeof **out);
    return *out ? MOE_OK : moe_error(MOE_ERR_NOMEM, "safetensors writer: out of memory");
}

void moe_st_writer_free(moe_st_writer *w)
{
    if (!w)
        return;
    for (int i = 0; i < w->n; i++) {
        free(w->e[i].name);
        free(w->e[i].owned);
    }
    for (int i = 0; i < w->nm; i++) {
        free(w->mkey[i]);
        free(w->mval[i]);
    }
    free(w->e);
    free(w->mkey);
    free(w->mval);
    free(w);
}

static moe_status add_entry(moe_st_writer *w, const char *name, moe_st_dtype dtype, int ndim,
                            const int64_t *shape, const void *data, int copy)
{
    if (!name || !*name || strcmp(name, "__metadata__") == 0)
        return moe_error(MOE_ERR_ARG, "safetensors writer: invalid tensor name '%s'", name ? name : "(null)");
    if ((unsigned)dtype >= MOE_ST_NDTYPES)
        return moe_error(MOE_ERR_ARG, "safetensors writer: tensor '%s': unknown dtype %d", name, (int)dtype);
    if (ndim < 0 || ndim > MOE_ST_MAX_DIMS)
        return moe_error(MOE_ERR_ARG, "safetensors writer: tensor '%s': %d dimensions (0..%d)", name, ndim,
                         MOE_ST_MAX_DIMS);
    for (int i = 0; i < w->n; i++)
        if (strcmp(w->e[i].name, name) == 0)
            return moe_error(MOE_ERR_ARG, "safetensors writer: tensor '%s' added twice", name);
    int64_t numel = 1;
    size_t es = moe_st_dtype_size(dtype);
    for (int i = 0; i < ndim; i++) {
        if (shape[i] < 0 || (shape[i] && numel > INT64_MAX / (int64_t)es / shape[i]))
            return moe_error(MOE_ERR_ARG, "safetensors writer: tensor '%s': bad dimension %d (%lld)", name, i,
                             (long long)shape[i]);
        numel *= shape[i];
    }
    if (numel > 0 && !data)
        return moe_error(MOE_ERR_ARG, "safetensors writer: tensor '%s' has no data", name);
    if (w->n == w->cap) {
        int cap = w->cap ? 2 * w->cap : 16;
        st_entry *e = realloc(w->e, (size_t)cap * sizeof *e);
        if (!e)
            return moe_error(MOE_ERR_NOMEM, "safetensors writer: out of memory");
        w->e = e;
        w->cap = cap;
    }
    st_entry *e = &w->e[w->n];
    memset(e, 0, sizeof *e);
    if (!(e->name = dupstr(name)))
        return moe_error(MOE_ERR_NOMEM, "safetensors writer: out of memory");
    if (copy && numel > 0) {
        if ((uint64_t)numel * es > SIZE_MAX || !(e->owned = malloc((size_t)numel * es))) {
            free(e->name);
            return moe_error(MOE_ERR_NOMEM, "safetensors writer: out of memory for tensor '%s'", name);
        }
        memcpy(e->owned, data, (size_t)numel * es);
        data = e->owned;
    }
    e->dtype = dtype;
    e->ndim = ndim;
    if (ndim)
        memcpy(e->shape, shape, (size_t)ndim * sizeof *shape);
    e->numel = numel;
    e->data = data;
    w->n++;
    return MOE_OK;
}

moe_status moe_st_writer_add(moe_st_writer *w, const char *name, moe_st_dtype dtype, int ndim,
                             const int64_t *shape, const void *data)
{
    return add_entry(w, name, dtype, ndim, shape, data, 0);
}

moe_status moe_st_writer_add_copy(moe_st_writer *w, const char *name, moe_st_dtype dtype, int ndim,
                                  const int64_t *shape, const void *data)
{
    return add_entry(w, name, dtype, ndim, shape, data, 1);
}

moe_status moe_st_writer_add_meta(moe_st_writer *w, const char *key, const char *value)
{
    if (!key || !value)
        return moe_error(MOE_ERR_ARG, "safetensors writer: NULL metadata key or value");
    if (strcmp(key, "crc32") == 0)
        return moe_error(MOE_ERR_ARG, "safetensors writer: metadata key 'crc32' is reserved for the data checksum");
    char *v = dupstr(value);
    if (!v)
        return moe_error(MOE_ERR_NOMEM, "safetensors writer: out of memory");
    for (int i = 0; i < w->nm; i++)
        if (strcmp(w->mkey[i], key) == 0) {
            free(w->mval[i]);
            w->mval[i] = v;
            return MOE_OK;
        }
    if (w->nm == w->capm) {
        int cap = w->capm ? 2 * w->capm : 8;
        char **k = realloc(w->mkey, (size_t)cap * sizeof *k);
        if (k)
            w->mkey = k;
        char **vv = k ? realloc(w->mval, (size_t)cap * sizeof *vv) : NULL;
        if (!vv) {
            free(v);
            return moe_error(MOE_ERR_NOMEM, "safetensors writer: out of memory");
        }
        w->mval = vv;
        w->capm = cap;
    }
    w->mkey[w->nm] = dupstr(key);
    if (!w->mkey[w->nm]) {
        free(v);
        return moe_error(MOE_ERR_NOMEM, "safetensors writer: out of memory");
    }
    w->mval[w->nm++] = v;
    return MOE_OK;
}

static int entry_by_name(const void *a, const void *b)
{
    return strcmp(((const st_entry *)a)->name, ((const st_entry *)b)->name);
}

/* Streams an entry as little-endian bytes into the CRC and, when fp is set, the file. */
static int emit(FILE *fp, const st_entry *e, uLong *crc)
{
    size_t es = moe_st_dtype_size(e->dtype);
    uint64_t bytes = (uint64_t)e->numel * es;
    const uint8_t *src = e->data;
    if (host_is_le()) {
        for (uint64_t done = 0; done < bytes;) {
            uInt chunk = bytes - done > (1u << 30) ? (1u << 30) : (uInt)(bytes - done);
            *crc = crc32(*crc, src + done, chunk);
            if (fp && fwrite(src + done, 1, chunk, fp) != chunk)
                return -1;
            done += chunk;
        }
        return 0;
    }
    uint8_t tmp[4096];
    for (int64_t i = 0; i < e->numel;) {
        size_t m = 0;
        for (; m + es <= sizeof tmp && i < e->numel; m += es, i++)
            to_le(tmp + m, src + (size_t)i * es, es);
        *crc = crc32(*crc, tmp, (uInt)m);
        if (fp && fwrite(tmp, 1, m, fp) != m)
            return -1;
    }
    return 0;
}

/* The JSON header, padded with spaces to a multiple of 8 bytes as the Rust library does. */
static moe_status build_header(moe_st_writer *w, uint32_t crc, char **out, size_t *len)
{
    json_t *root = json_object(), *meta = json_object();
    moe_status s = MOE_OK;
    if (!root || !meta)
        goto nomem;
    uint64_t off = 0;
    for (int i = 0; i < w->n; i++) {
        const st_entry *e = &w->e[i];
        uint64_t bytes = (uint64_t)e->numel * moe_st_dtype_size(e->dtype);
        if (off + bytes > (uint64_t)INT64_MAX) {
            s = moe_error(MOE_ERR_ARG, "safetensors writer: data section exceeds 2^63 bytes");
            goto done;
        }
        json_t *shape = json_array(), *t = json_object();
        if (!shape || !t) {
            json_decref(shape);
            json_decref(t);
            goto nomem;
        }
        for (int d = 0; d < e->ndim; d++)
            json_array_append_new(shape, json_integer(e->shape[d]));
        json_object_set_new(t, "dtype", json_string(moe_st_dtype_name(e->dtype)));
        json_object_set_new(t, "shape", shape);
        json_object_set_new(t, "data_offsets", json_pack("[II]", (json_int_t)off, (json_int_t)(off + bytes)));
        if (json_object_set_new(root, e->name, t))
            goto nomem;
        off += bytes;
    }
    for (int i = 0; i < w->nm; i++)
        json_object_set_new(meta, w->mkey[i], json_string(w->mval[i]));
    char hex[9];
    snprintf(hex, sizeof hex, "%08lx", (unsigned long)crc);
    json_object_set_new(meta, "crc32", json_string(hex));
    json_object_set(root, "__metadata__", meta);
    char *text = json_dumps(root, JSON_COMPACT | JSON_SORT_KEYS | JSON_ENSURE_ASCII);
    if (!text)
        goto nomem;
    size_t n = strlen(text), padded = (n + 7) / 8 * 8;
    char *h = malloc(padded + 1);
    if (!h) {
        free(text);
        goto nomem;
    }
    memcpy(h, text, n);
    memset(h + n, ' ', padded - n);
    h[padded] = 0;
    free(text);
    *out = h;
    *len = padded;
    goto done;
nomem:
    s = moe_error(MOE_ERR_NOMEM, "safetensors writer: out of memory for the header");
done:
    json_decref(root);
    json_decref(meta);
    return s;
}

static moe_status fsync_dir(const char *path)
{
    char *dir = dupstr(path);
    if (!dir)
        return moe_error(MOE_ERR_NOMEM, "out of memory");
    char *slash = strrchr(dir, '/');
    if (slash)
        slash[slash == dir ? 1 : 0] = 0;
    int fd = open(slash ? dir : ".", O_RDONLY | O_DIRECTORY);
    moe_status s = MOE_OK;
    /* Some file systems cannot fsync a directory (EINVAL); the rename stands regardless. */
    if (fd < 0 || (fsync(fd) != 0 && errno != EINVAL && errno != ENOTSUP))
        s = moe_error(MOE_ERR_IO, "%s: cannot fsync directory '%s': %s", path, slash ? dir : ".", strerror(errno));
    if (fd >= 0)
        close(fd);
    free(dir);
    return s;
}

moe_status moe_st_writer_write(moe_st_writer *w, const char *path)
{
    qsort(w->e, (size_t)w->n, sizeof *w->e, entry_by_name);
    uLong crc = crc32(0L, Z_NULL, 0);
    for (int i = 0; i < w->n; i++)
        emit(NULL, &w->e[i], &crc);
    char *header = NULL;
    size_t hlen = 0;
    moe_status s = build_header(w, (uint32_t)crc, &header, &hlen);
    if (s)
        return s;

    size_t plen = strlen(path);
    char *tmp = malloc(plen + 5);
    if (!tmp) {
        free(header);
        return moe_error(MOE_ERR_NOMEM, "out of memory");
    }
    memcpy(tmp, path, plen);
    memcpy(tmp + plen, ".tmp", 5);
    FILE *fp = fopen(tmp, "wb");
    if (!fp) {
        s = moe_error(MOE_ERR_IO, "%s: cannot create: %s", tmp, strerror(errno));
        free(header);
        free(tmp);
        return s;
    }
    uint8_t len8[8];
    for (int i = 0; i < 8; i++)
        len8[i] = (uint8_t)((uint64_t)hlen >> (8 * i));
    uLong crc2 = 0;
    int bad = fwrite(len8, 1, 8, fp) != 8 || fwrite(header, 1, hlen, fp) != hlen;
    for (int i = 0; i < w->n && !bad; i++)
        bad = emit(fp, &w->e[i], &crc2) != 0;
    bad = bad || fflush(fp) != 0 || fsync(fileno(fp)) != 0;
    int err = errno;
    bad = (fclose(fp) != 0) || bad;
    if (!bad && rename(tmp, path) != 0) {
        err = errno;
        bad = 1;
    }
    if (bad) {
        s = moe_error(MOE_ERR_IO, "%s: write failed: %s", path, strerror(err ? err : errno));
        remove(tmp);
    } else {
        s = fsync_dir(path);
    }
    free(header);
    free(tmp);
    return s;
}
