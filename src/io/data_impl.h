/*
 * data_impl.h — the inside of a moe_dataset, shared by data.c (opening, batches, the
 * validation walk) and data_load.c (reading text and mapping shards).
 */
#ifndef CMOE_IO_DATA_IMPL_H
#define CMOE_IO_DATA_IMPL_H

#include <sys/stat.h>

#include "io/data.h"

#define SHARD_HEADER_BYTES (MOE_SHARD_HEADER_INTS * 4)

/* a contiguous run of tokens that a row never crosses */
typedef struct {
    const uint16_t *tok;
    int64_t n;
} segment;

typedef struct {
    char *path;
    void *map; /* the whole file, read-only */
    size_t len;
} mapped_file;

struct moe_dataset {
    moe_data_kind kind;
    int64_t vocab;
    uint16_t *text; /* text: the decoded bytes */
    mapped_file *files;
    int64_t n_files;
    segment *train, *val;
    int64_t n_train_seg, n_val_seg;
    int64_t n_train, n_val;
    moe_synth_config synth;
    moe_data_identity id;
    char desc[512];
};

/* Text from fd (opened by moe_input_open; a regular file or a stream), gunzipped when it
 * starts with the gzip magic; bounded by MOE_TEXT_MAX; sets d->text, the one training
 * segment, d->desc and d->id. */
moe_status moe_data_load_text(moe_dataset *d, const char *path, int fd, const struct stat *st);
/* One shard (fd from moe_input_open, a regular file) or a directory of them (fd -1). */
moe_status moe_data_load_shards(moe_dataset *d, const char *path, int fd);

#endif
