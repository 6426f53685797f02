/*
 * input.h — opening and reading inputs so that none can hang the process or grow it
 * without bound.
 *
 *  - Every input is first opened with O_NONBLOCK and fstat'd, so a FIFO never blocks an
 *    open before cmoe knows what it is; a directory is refused with "is a directory".
 *  - Inputs that must be regular files (safetensors, metrics.jsonl, token shards) refuse
 *    anything else at once, naming what it is.
 *  - Streams (a pipe, a named FIFO, /dev/stdin, a terminal, a character device) are read
 *    once, from the one descriptor, waiting in poll() for a writer that has not arrived
 *    yet; nothing is re-opened, so no byte is lost and nothing waits for a second writer.
 *  - Every read has a limit: a regular file larger than it is refused before it is read,
 *    a stream that gives more (/dev/zero) is refused when it passes it.
 *
 *     char *text; size_t n;
 *     if (moe_read_all(path, "config", MOE_JSON_MAX, MOE_IN_STREAM, &text, &n)) ...
 *     json_t *j = json_loadb(text, n, 0, &err);
 *     free(text);
 */
#ifndef CMOE_CORE_INPUT_H
#define CMOE_CORE_INPUT_H

#include <stddef.h>
#include <sys/stat.h>

#include "cmoe.h"

/* Configs, train.json, HF config and index files: JSON texts are small. */
#define MOE_JSON_MAX ((size_t)64 << 20)

enum {
    MOE_IN_REGULAR = 0, /* only a regular file */
    MOE_IN_STREAM = 1,  /* also a FIFO, a pipe or a character device, read as a stream */
};

/* Opens path for reading (see above); what names it in messages ("config", "data").
 * *fd stays O_NONBLOCK for a stream (moe_read_fd polls it); st is its fstat. */
moe_status moe_input_open(const char *path, const char *what, int flags, int *fd, struct stat *st);
/* Reads fd (from moe_input_open) to its end into a NUL-terminated malloc'd buffer of at
 * most limit bytes; MOE_ERR_FORMAT naming the limit when there is more. */
moe_status moe_read_fd(int fd, const struct stat *st, const char *path, const char *what, size_t limit, char **buf,
                       size_t *len);
/* moe_input_open + moe_read_fd + close. */
moe_status moe_read_all(const char *path, const char *what, size_t limit, int flags, char **buf, size_t *len);
/* "regular file", "directory", "FIFO", "character device", ... */
const char *moe_file_kind(unsigned mode);

#endif
