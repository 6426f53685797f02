/*
 * Bounded, non-blocking-open inputs (input.h).
 *
 * Why poll() and not a blocking re-open of a FIFO: the O_NONBLOCK descriptor already
 * counts as a reader, so a writer may connect, write everything and leave before a second
 * open; that open would then wait forever for another writer and the bytes would be lost.
 * On the one descriptor, poll() waits for a writer that has not come yet (Linux does not
 * report a hang-up on a FIFO no writer has opened) and read() returns 0 only at the end.
 */
#define _POSIX_C_SOURCE 200809L
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "core/input.h"

const char *moe_file_kind(unsigned mode)
{
    if (S_ISREG(mode))
        return "regular file";
    if (S_ISDIR(mode))
        return "directory";
    if (S_ISFIFO(mode))
        return "FIFO (a pipe)";
    if (S_ISCHR(mode))
        return "character device";
    if (S_ISBLK(mode))
        return "block device";
    if (S_ISSOCK(mode))
        return "socket";
    return "special file";
}

moe_status moe_input_open(const char *path, const char *what, int flags, int *fd, struct stat *st)
{
    *fd = -1;
    if (!path || !*path)
        return moe_error(MOE_ERR_ARG, "%s: no path given", what);
    int f = open(path, O_RDONLY | O_NONBLOCK | O_NOCTTY | O_CLOEXEC);
    if (f < 0)
        return moe_error(MOE_ERR_IO, "%s '%s': cannot open: %s", what, path, strerror(errno));
    if (fstat(f, st) != 0) {
        int e = errno;
        close(f);
        return moe_error(MOE_ERR_IO, "%s '%s': %s", what, path, strerror(e));
    }
    const int stream = S_ISFIFO(st->st_mode) || S_ISCHR(st->st_mode);
    if (S_ISDIR(st->st_mode) || (!S_ISREG(st->st_mode) && !(stream && (flags & MOE_IN_STREAM)))) {
        close(f);
        if (S_ISDIR(st->st_mode))
            return moe_error(MOE_ERR_IO, "%s '%s' is a directory, not a file", what, path);
        return moe_error(MOE_ERR_IO, "%s '%s' is a %s; it must be a regular file", what, path,
                         moe_file_kind(st->st_mode));
    }
    /* a regular file reads as it always does; a stream keeps O_NONBLOCK for the poll loop */
    if (!stream) {
        int fl = fcntl(f, F_GETFL);
        if (fl >= 0)
            fcntl(f, F_SETFL, fl & ~O_NONBLOCK);
    }
    *fd = f;
    return MOE_OK;
}

static moe_status too_big(const char *path, const char *what, size_t limit)
{
    if (limit >= ((size_t)1 << 20))
        return moe_error(MOE_ERR_FORMAT, "%s '%s' is larger than %zu MiB, the limit for a %s", what, path,
                         limit >> 20, what);
    return moe_error(MOE_ERR_FORMAT, "%s '%s' is larger than %zu bytes, the limit for a %s", what, path, limit, what);
}

moe_status moe_read_fd(int fd, const struct stat *st, const char *path, const char *what, size_t limit, char **buf,
                       size_t *len)
{
    *buf = NULL;
    *len = 0;
    const int stream = !S_ISREG(st->st_mode);
    if (!stream && (uint64_t)st->st_size > limit)
        return too_big(path, what, limit); /* refused before a byte is read */
    size_t cap = stream ? 1 << 16 : (size_t)st->st_size + 1, n = 0;
    char *b = malloc(cap + 1);
    if (!b)
        return moe_error(MOE_ERR_NOMEM, "%s '%s': out of memory for %zu bytes", what, path, cap);
    for (;;) {
        if (n == cap) {
            if (cap > limit) {
                free(b);
                return too_big(path, what, limit);
            }
            size_t nc = cap * 2 > limit + 1 ? limit + 1 : cap * 2;
            char *nb = realloc(b, nc + 1);
            if (!nb) {
                free(b);
                return moe_error(MOE_ERR_NOMEM, "%s '%s': out of memory for %zu bytes", what, path, nc);
            }
            b = nb;
            cap = nc;
        }
        if (stream) {
            struct pollfd p = {.fd = fd, .events = POLLIN};
            if (poll(&p, 1, -1) < 0) {
                if (errno == EINTR)
                    continue;
                break;
            }
        }
        ssize_t got = read(fd, b + n, cap - n);
        if (got > 0) {
            n += (size_t)got;
            if (n > limit) {
                free(b);
                return too_big(path, what, limit);
            }
            continue;
        }
        if (got == 0)
            break;
        if (errno == EINTR || errno == EAGAIN)
            continue;
        int e = errno;
        free(b);
        return moe_error(MOE_ERR_IO, "%s '%s': cannot read: %s", what, path, strerror(e));
    }
    b[n] = '\0';
    *buf = b;
    *len = n;
    return MOE_OK;
}

moe_status moe_read_all(const char *path, const char *what, size_t limit, int flags, char **buf, size_t *len)
{
    int fd;
    struct stat st;
    *buf = NULL;
    *len = 0;
    moe_status s = moe_input_open(path, what, flags, &fd, &st);
    if (s)
        return s;
    s = moe_read_fd(fd, &st, path, what, limit, buf, len);
    close(fd);
    return s;
}
