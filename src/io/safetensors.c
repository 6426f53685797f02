/*
 * safetensors: the dtype table and the reader, which validates everything before any byte
 * of data is trusted (the writer is safetensors_write.c, the float conversions
 * core/dtype.c). JSON goes through jansson only; the data section is little-endian
 * whatever the host.
 */
#define _POSIX_C_SOURCE 200809L
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <jansson.h>
#include <zlib.h>

#include "core/dtype.h"
#include "core/input.h"
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
    if (f->mapped)
        munmap(f->buf, f->size);
    else
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
/* buf is the file's bytes, malloc'd or (mapped) mmap'd: the file takes it over. */
static moe_status parse_owned(uint8_t *buf, size_t size, int mapped, const char *name, moe_st_file **out)
{
    *out = NULL;
    moe_st_file *f = calloc(1, sizeof *f);
    char *path = dupstr(name);
    if (!f || !path) {
        free(f);
        free(path);
        if (mapped)
            munmap(buf, size);
        else
            free(buf);
        return moe_error(MOE_ERR_NOMEM, "%s: out of memory", name);
    }
    f->buf = buf;
    f->size = size;
    f->mapped = mapped;
    f->path = path;
    moe_status s;
    json_t *root = NULL;
    if (size < 8) {
        s = FMT("%s: %zu bytes, too short for the 8-byte header length of a safetensors file", name, size);
        goto fail;
    }
    uint64_t hlen = moe_load_le(buf, 8);
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
    return parse_owned(copy, size, 0, name, out);
}

moe_status moe_st_read(const char *path, moe_st_file **out)
{
    *out = NULL;
    int fd;
    struct stat st;
    /* a FIFO or a device is refused before anything blocks on it */
    moe_status s = moe_input_open(path, "safetensors file", MOE_IN_REGULAR, &fd, &st);
    if (s)
        return s;
    if ((uint64_t)st.st_size > SIZE_MAX) {
        close(fd);
        return moe_error(MOE_ERR_NOMEM, "%s: %lld bytes do not fit in memory", path, (long long)st.st_size);
    }
    /* Mapped, not read: a model's weights reach the backend tensor by tensor from the page
     * cache, never as a second copy of the whole file on the heap. */
    const size_t size = (size_t)st.st_size;
    uint8_t *buf = size ? mmap(NULL, size, PROT_READ, MAP_PRIVATE, fd, 0) : malloc(1);
    const int err = errno;
    close(fd);
    if (buf == MAP_FAILED || !buf)
        return moe_error(MOE_ERR_IO, "%s: cannot map %zu bytes: %s", path, size, strerror(err));
    return parse_owned(buf, size, size > 0, path, out);
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
        uint64_t bits = moe_load_le(p, es);
        if (t->dtype == MOE_ST_F64) {
            memcpy(&dst[i], &bits, 8);
        } else if (t->dtype == MOE_ST_F32) {
            uint32_t b32 = (uint32_t)bits;
            float x;
            memcpy(&x, &b32, 4);
            dst[i] = x;
        } else if (t->dtype == MOE_ST_BF16) {
            dst[i] = moe_bf16_to_f64((uint16_t)bits);
        } else {
            dst[i] = moe_f16_to_f64((uint16_t)bits);
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
        uint64_t bits = moe_load_le(p, es);
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

