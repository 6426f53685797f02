/*
 * safetensors.h — read and write the safetensors format (internal to libcmoe and the tool).
 *
 * A file is: an 8-byte little-endian header length N, N bytes of JSON
 *     {"NAME": {"dtype": "F32", "shape": [2, 3], "data_offsets": [BEGIN, END]}, ...,
 *      "__metadata__": {"KEY": "VALUE", ...}}
 * then the data section; offsets are relative to its start, tensors are row-major
 * and little-endian. The writer adds "crc32" (zlib CRC-32 of the whole data section,
 * 8 lowercase hex digits) to the metadata and the reader checks it when present.
 *
 *     moe_st_file *f;
 *     if (moe_st_read("in.safetensors", &f) != MOE_OK) { puts(moe_last_error()); ... }
 *     int64_t shape[2] = {T, d};
 *     moe_st_get_f64(f, "x", 2, shape, x);            // any float dtype -> double
 *     moe_st_free(f);
 *
 *     moe_st_writer *w;
 *     moe_st_writer_create(&w);
 *     moe_st_writer_add(w, "y", MOE_ST_F64, 2, shape, y);   // y must live until write
 *     moe_st_writer_add_meta(w, "note", "hello");
 *     moe_st_writer_write(w, "out.safetensors");            // core/durable.h: atomic
 *     moe_st_writer_free(w);
 *
 * The reader is safetensors.c, the writer safetensors_write.c, the float conversions
 * core/dtype.c.
 */
#ifndef CMOE_SAFETENSORS_H
#define CMOE_SAFETENSORS_H

#include <stddef.h>
#include <stdint.h>

#include "cmoe.h"

#define MOE_ST_MAX_DIMS 4
/* A header larger than this is refused before it is read (the Rust reference uses 100 MB too). */
#define MOE_ST_MAX_HEADER ((uint64_t)100 * 1000 * 1000)

typedef enum {
    MOE_ST_F64,
    MOE_ST_F32,
    MOE_ST_BF16,
    MOE_ST_F16,
    MOE_ST_I64,
    MOE_ST_I32,
    MOE_ST_I16,
    MOE_ST_U16,
    MOE_ST_I8,
    MOE_ST_U8,
    MOE_ST_BOOL,
    MOE_ST_NDTYPES
} moe_st_dtype;

const char *moe_st_dtype_name(moe_st_dtype t);  /* "F32", ...; "?" when out of range */
size_t moe_st_dtype_size(moe_st_dtype t);       /* bytes per element; 0 when out of range */
int moe_st_dtype_from_name(const char *name);   /* the dtype, or -1 */
int moe_st_dtype_is_float(moe_st_dtype t);

/* ---- reading ------------------------------------------------------------- */

typedef struct {
    char *name;
    moe_st_dtype dtype;
    int ndim;                         /* 0 = scalar */
    int64_t shape[MOE_ST_MAX_DIMS];
    int64_t numel;
    uint64_t begin, end;              /* byte offsets into the data section */
    const void *data;                 /* little-endian bytes, possibly unaligned */
} moe_st_tensor;

typedef struct {
    char *path;
    int n;                            /* tensors, sorted by name */
    moe_st_tensor *tensors;
    int n_meta;
    char **meta_key, **meta_value;
    uint8_t *buf;                     /* the whole file (mapped read-only when read from a path) */
    size_t size;
    int mapped;
    const uint8_t *data;              /* the data section, inside buf */
    uint64_t data_size;
} moe_st_file;

/* Reads and validates the whole file. MOE_ERR_IO: cannot read PATH, or PATH is not a
 * regular file (a FIFO or a device is refused before anything blocks on it);
 * MOE_ERR_FORMAT: the message names the file, the tensor and the problem. */
moe_status moe_st_read(const char *path, moe_st_file **out);
/* The same on a buffer already in memory (copied); name is used in messages. */
moe_status moe_st_parse(const void *buf, size_t size, const char *name, moe_st_file **out);
void moe_st_free(moe_st_file *f);

const moe_st_tensor *moe_st_find(const moe_st_file *f, const char *name);
const char *moe_st_meta(const moe_st_file *f, const char *key); /* NULL when absent */

/* Checks that t has ndim dims of the given shape (ndim < 0: any shape); names file and tensor. */
moe_status moe_st_check_shape(const moe_st_file *f, const moe_st_tensor *t, int ndim, const int64_t *shape);
/* numel elements of a float tensor (F64, F32, BF16, F16) as double. */
moe_status moe_st_tensor_f64(const moe_st_file *f, const moe_st_tensor *t, double *dst);
/* numel elements of an integer tensor (I64, I32, I16, U16, I8, U8, BOOL) as int32, range checked. */
moe_status moe_st_tensor_i32(const moe_st_file *f, const moe_st_tensor *t, int32_t *dst);
/* Find + shape check + convert; a missing tensor is MOE_ERR_FORMAT naming it. */
moe_status moe_st_get_f64(const moe_st_file *f, const char *name, int ndim, const int64_t *shape, double *dst);
moe_status moe_st_get_i32(const moe_st_file *f, const char *name, int ndim, const int64_t *shape, int32_t *dst);

/* Shape as "[2, 3]" into buf (for messages). */
const char *moe_st_shape_str(int ndim, const int64_t *shape, char *buf, size_t len);

/* ---- writing ------------------------------------------------------------- */

typedef struct moe_st_writer moe_st_writer;

moe_status moe_st_writer_create(moe_st_writer **out);
void moe_st_writer_free(moe_st_writer *w);
/* Adds a tensor of host-order elements; data is borrowed and must stay valid until write
 * (it may be NULL when numel is 0). Names are unique and not "__metadata__". */
moe_status moe_st_writer_add(moe_st_writer *w, const char *name, moe_st_dtype dtype, int ndim,
                             const int64_t *shape, const void *data);
/* The same, but the writer keeps its own copy of the data. */
moe_status moe_st_writer_add_copy(moe_st_writer *w, const char *name, moe_st_dtype dtype, int ndim,
                                  const int64_t *shape, const void *data);
/* Makes a lazy tensor's numel host-order elements at dst (e.g. from a backend); a failure
 * stops the write with its status. */
typedef moe_status (*moe_st_fill_fn)(void *ctx, void *dst);
/* A tensor made when the file is written (twice: for the checksum, then for the file),
 * so that a writer of a whole model holds one tensor at a time, never the model. */
moe_status moe_st_writer_add_lazy(moe_st_writer *w, const char *name, moe_st_dtype dtype, int ndim,
                                  const int64_t *shape, moe_st_fill_fn fill, void *ctx);
/* Adds (or replaces) a metadata string; "crc32" is reserved for the writer. */
moe_status moe_st_writer_add_meta(moe_st_writer *w, const char *key, const char *value);
/* Writes PATH through moe_durable_open (core/durable.h): tensors sorted by name, CRC-32 in
 * the metadata; a temporary beside PATH flushed, fsync'd, renamed over it, the directory
 * fsync'd (a device or FIFO is written through, a symlink followed). On failure PATH is
 * untouched and no temporary is left. */
moe_status moe_st_writer_write(moe_st_writer *w, const char *path);

/* ---- conversions for writers --------------------------------------------- */

/* n doubles to F64, F32, BF16 or F16 host-order elements (round to nearest even). */
moe_status moe_st_from_f64(moe_st_dtype dtype, const double *src, int64_t n, void *dst);

#endif
