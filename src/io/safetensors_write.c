/*
 * The safetensors writer: tensors sorted by name, a CRC-32 of the data section in the
 * metadata, the file written through core/durable.h (atomic, fsync'd; devices and FIFOs
 * written through, symlinks followed).
 */
#define _POSIX_C_SOURCE 200809L
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <jansson.h>
#include <zlib.h>

#include "core/dtype.h"
#include "core/durable.h"
#include "io/safetensors.h"

static char *dupstr(const char *s)
{
    size_t n = strlen(s) + 1;
    char *d = malloc(n);
    if (d)
        memcpy(d, s, n);
    return d;
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
            ((uint16_t *)dst)[i] = moe_f64_to_bf16(src[i]);
        return MOE_OK;
    case MOE_ST_F16:
        for (int64_t i = 0; i < n; i++)
            ((uint16_t *)dst)[i] = moe_f64_to_f16(src[i]);
        return MOE_OK;
    default:
        return moe_error(MOE_ERR_ARG, "safetensors: cannot convert double to %s", moe_st_dtype_name(dtype));
    }
}

typedef struct {
    char *name;
    moe_st_dtype dtype;
    int ndim;
    int64_t shape[MOE_ST_MAX_DIMS];
    int64_t numel;
    const void *data;
    void *owned;
    moe_st_fill_fn fill; /* lazy: the data is made when it is written (and when summed) */
    void *ctx;
} st_entry;

struct moe_st_writer {
    st_entry *e;
    int n, cap;
    char **mkey, **mval;
    int nm, capm;
    void *lazy;          /* one buffer for the largest lazy tensor */
    size_t lazy_bytes;
    moe_status fill_err; /* the first failure of a fill */
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
    free(w->lazy);
    free(w);
}

static moe_status add_entry(moe_st_writer *w, const char *name, moe_st_dtype dtype, int ndim,
                            const int64_t *shape, const void *data, int copy, moe_st_fill_fn fill, void *ctx)
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
    if (numel > 0 && !data && !fill)
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
    e->fill = fill;
    e->ctx = ctx;
    if (fill && (size_t)numel * es > w->lazy_bytes)
        w->lazy_bytes = (size_t)numel * es;
    w->n++;
    return MOE_OK;
}

moe_status moe_st_writer_add(moe_st_writer *w, const char *name, moe_st_dtype dtype, int ndim,
                             const int64_t *shape, const void *data)
{
    return add_entry(w, name, dtype, ndim, shape, data, 0, NULL, NULL);
}

moe_status moe_st_writer_add_copy(moe_st_writer *w, const char *name, moe_st_dtype dtype, int ndim,
                                  const int64_t *shape, const void *data)
{
    return add_entry(w, name, dtype, ndim, shape, data, 1, NULL, NULL);
}

moe_status moe_st_writer_add_lazy(moe_st_writer *w, const char *name, moe_st_dtype dtype, int ndim,
                                  const int64_t *shape, moe_st_fill_fn fill, void *ctx)
{
    if (!fill)
        return moe_error(MOE_ERR_ARG, "safetensors writer: tensor '%s' has no fill function", name ? name : "?");
    return add_entry(w, name, dtype, ndim, shape, NULL, 0, fill, ctx);
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

/* Streams an entry as little-endian bytes into the CRC and, when fp is set, the file. A
 * lazy entry is made into the writer's one buffer first (a failure is kept in fill_err). */
static int emit(moe_st_writer *w, FILE *fp, const st_entry *e, uLong *crc)
{
    size_t es = moe_st_dtype_size(e->dtype);
    uint64_t bytes = (uint64_t)e->numel * es;
    const uint8_t *src = e->data;
    if (e->fill && bytes) {
        moe_status s = e->fill(e->ctx, w->lazy);
        if (s) {
            if (!w->fill_err)
                w->fill_err = s;
            return -1;
        }
        src = w->lazy;
    }
    if (moe_host_is_le()) {
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
            moe_store_le(tmp + m, src + (size_t)i * es, es);
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

moe_status moe_st_writer_write(moe_st_writer *w, const char *path)
{
    qsort(w->e, (size_t)w->n, sizeof *w->e, entry_by_name);
    if (w->lazy_bytes && !w->lazy && !(w->lazy = malloc(w->lazy_bytes)))
        return moe_error(MOE_ERR_NOMEM, "safetensors writer: out of memory for a tensor of %zu bytes", w->lazy_bytes);
    /* lazy tensors are made twice, once for the checksum the header holds and once to be
     * written: only one tensor is ever in memory */
    uLong crc = crc32(0L, Z_NULL, 0);
    w->fill_err = MOE_OK;
    for (int i = 0; i < w->n && !w->fill_err; i++)
        emit(w, NULL, &w->e[i], &crc);
    if (w->fill_err)
        return w->fill_err;
    char *header = NULL;
    size_t hlen = 0;
    moe_durable *d;
    moe_status s = build_header(w, (uint32_t)crc, &header, &hlen);
    if (s || (s = moe_durable_open(path, &d))) {
        free(header);
        return s;
    }
    FILE *fp = moe_durable_file(d);
    uint8_t len8[8];
    for (int i = 0; i < 8; i++)
        len8[i] = (uint8_t)((uint64_t)hlen >> (8 * i));
    uLong crc2 = 0;
    int bad = fwrite(len8, 1, 8, fp) != 8 || fwrite(header, 1, hlen, fp) != hlen;
    for (int i = 0; i < w->n && !bad; i++)
        bad = emit(w, fp, &w->e[i], &crc2) != 0;
    free(header);
    if (bad) {
        s = w->fill_err ? w->fill_err
                        : moe_error(MOE_ERR_IO, "%s: write failed: %s", moe_durable_target(d), strerror(errno));
        moe_durable_abort(d);
        return s;
    }
    return moe_durable_commit(d);
}
