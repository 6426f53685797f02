/*
 * One durable, atomic way to write a file (durable.h): every writer of libcmoe and of the
 * tool goes through moe_durable_open/commit, so the rules about special files, symlinks and
 * crashes live in one place.
 */
#define _POSIX_C_SOURCE 200809L
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "core/durable.h"

enum { ATOMIC, DIRECT };

struct moe_durable {
    FILE *fp;
    int how;
    int fsync_direct; /* a regular file written in place (through /proc): fsync it too */
    char *target;     /* the file written */
    char *tmp;        /* ATOMIC: the temporary beside it */
};

static char *dup_str(const char *s)
{
    size_t n = strlen(s) + 1;
    char *d = malloc(n);
    if (d)
        memcpy(d, s, n);
    return d;
}

/* dir of path ("." when none), as a new string */
static char *dir_of(const char *path)
{
    const char *slash = strrchr(path, '/');
    if (!slash)
        return dup_str(".");
    size_t n = slash == path ? 1 : (size_t)(slash - path);
    char *d = malloc(n + 1);
    if (d) {
        memcpy(d, path, n);
        d[n] = '\0';
    }
    return d;
}

/* Follows the chain of symbolic links that starts at path to its last name, which need
 * not exist (a dangling link names the file to create). NULL with errno on failure. */
static char *follow_links(const char *path)
{
    char *p = dup_str(path);
    for (int hops = 0; p; hops++) {
        struct stat ls;
        if (lstat(p, &ls) != 0 || !S_ISLNK(ls.st_mode))
            return p; /* the end of the chain, existing or not */
        if (hops == 40) {
            free(p);
            errno = ELOOP;
            return NULL;
        }
        char link[PATH_MAX];
        ssize_t k = readlink(p, link, sizeof link - 1);
        if (k < 0) {
            free(p);
            return NULL;
        }
        link[k] = '\0';
        char *next;
        if (link[0] == '/') {
            next = dup_str(link);
        } else {
            char *d = dir_of(p);
            next = d ? malloc(strlen(d) + strlen(link) + 2) : NULL;
            if (next)
                sprintf(next, "%s/%s", d, link);
            free(d);
        }
        free(p);
        p = next;
        if (!p)
            errno = ENOMEM;
    }
    return p;
}

static moe_status open_direct(moe_durable *w, const char *path, int flags)
{
    int fd = open(path, O_WRONLY | O_NOCTTY | O_CLOEXEC | flags);
    if (fd < 0 || !(w->fp = fdopen(fd, "w"))) {
        int e = errno;
        if (fd >= 0)
            close(fd);
        return moe_error(MOE_ERR_IO, "cannot write '%s': %s", path, strerror(e));
    }
    w->how = DIRECT;
    return (w->target = dup_str(path)) ? MOE_OK : moe_error(MOE_ERR_NOMEM, "out of memory");
}

/* The temporary beside target: O_EXCL, so two writers never share one. perm < 0: a new
 * file (0666 less the umask); else the replaced file's bits. */
static moe_status open_atomic(moe_durable *w, const char *target, int perm)
{
    static atomic_uint counter;
    if (!(w->target = dup_str(target)) || !(w->tmp = malloc(strlen(target) + 48)))
        return moe_error(MOE_ERR_NOMEM, "out of memory");
    int fd = -1;
    for (int tries = 0; fd < 0 && tries < 100; tries++) {
        sprintf(w->tmp, "%s.tmp-%ld-%u", target, (long)getpid(), atomic_fetch_add(&counter, 1));
        fd = open(w->tmp, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, perm < 0 ? 0666 : 0600);
        if (fd < 0 && errno != EEXIST)
            break;
    }
    if (fd < 0) {
        moe_status s = moe_error(MOE_ERR_IO, "cannot write '%s': cannot create a temporary file beside it: %s",
                                 target, strerror(errno));
        free(w->tmp);
        w->tmp = NULL;
        return s;
    }
    if (perm >= 0)
        (void)fchmod(fd, (mode_t)perm); /* best effort: the old file's bits */
    if (!(w->fp = fdopen(fd, "w"))) {
        int e = errno;
        close(fd);
        unlink(w->tmp);
        return moe_error(MOE_ERR_IO, "cannot write '%s': %s", w->tmp, strerror(e));
    }
    w->how = ATOMIC;
    return MOE_OK;
}

static void durable_free(moe_durable *w)
{
    free(w->target);
    free(w->tmp);
    free(w);
}

moe_status moe_durable_open(const char *path, moe_durable **out)
{
    *out = NULL;
    if (!path || !*path)
        return moe_error(MOE_ERR_ARG, "no output path given");
    moe_durable *w = calloc(1, sizeof *w);
    if (!w)
        return moe_error(MOE_ERR_NOMEM, "out of memory");
    moe_status s;
    struct stat st;
    if (stat(path, &st) == 0) {
        if (S_ISDIR(st.st_mode)) {
            s = moe_error(MOE_ERR_IO, "cannot write '%s': it is a directory", path);
        } else if (S_ISCHR(st.st_mode) || S_ISFIFO(st.st_mode)) {
            s = open_direct(w, path, 0); /* a FIFO waits for its reader, as with `cat > fifo` */
        } else if (!S_ISREG(st.st_mode)) {
            s = moe_error(MOE_ERR_IO, "cannot write '%s': it is a %s; cmoe writes regular files, character "
                          "devices and FIFOs", path, S_ISBLK(st.st_mode) ? "block device" : "socket");
        } else {
            char *target = follow_links(path);
            struct stat ts;
            if (!target) {
                s = moe_error(MOE_ERR_IO, "cannot write '%s': %s", path, strerror(errno));
            } else if (stat(target, &ts) != 0 || ts.st_dev != st.st_dev || ts.st_ino != st.st_ino) {
                /* a /proc magic link (/dev/stdout to a file): the name leads nowhere else */
                s = open_direct(w, path, O_TRUNC);
                w->fsync_direct = 1;
            } else {
                s = open_atomic(w, target, (int)(st.st_mode & 07777));
            }
            free(target);
        }
    } else if (errno == ENOENT) {
        char *target = follow_links(path);
        s = target ? open_atomic(w, target, -1) : moe_error(MOE_ERR_IO, "cannot write '%s': %s", path, strerror(errno));
        free(target);
    } else {
        s = moe_error(MOE_ERR_IO, "cannot write '%s': %s", path, strerror(errno));
    }
    if (s) {
        durable_free(w);
        return s;
    }
    *out = w;
    return MOE_OK;
}

FILE *moe_durable_file(moe_durable *w)
{
    return w->fp;
}

const char *moe_durable_target(const moe_durable *w)
{
    return w->target;
}

void moe_durable_abort(moe_durable *w)
{
    if (!w)
        return;
    if (w->fp)
        fclose(w->fp);
    if (w->how == ATOMIC && w->tmp)
        unlink(w->tmp);
    durable_free(w);
}

moe_status moe_durable_commit(moe_durable *w)
{
    int bad = ferror(w->fp) != 0, err = bad ? (errno ? errno : EIO) : 0;
    if (!bad && fflush(w->fp) != 0)
        bad = 1, err = errno;
    /* a device or a FIFO cannot be fsync'd (EINVAL); a regular file must be */
    if (!bad && (w->how == ATOMIC || w->fsync_direct) && fsync(fileno(w->fp)) != 0 && errno != EINVAL &&
        errno != EROFS)
        bad = 1, err = errno;
    if (fclose(w->fp) != 0 && !bad)
        bad = 1, err = errno;
    w->fp = NULL;
    if (!bad && w->how == ATOMIC && rename(w->tmp, w->target) != 0)
        bad = 1, err = errno;
    moe_status s = MOE_OK;
    if (bad) {
        s = moe_error(MOE_ERR_IO, "cannot write '%s': %s", w->target, strerror(err));
        if (w->how == ATOMIC)
            unlink(w->tmp);
    } else if (w->how == ATOMIC) {
        s = moe_fsync_parent(w->target);
    }
    durable_free(w);
    return s;
}

moe_status moe_durable_write(const char *path, const void *data, size_t n)
{
    moe_durable *w;
    moe_status s = moe_durable_open(path, &w);
    if (s)
        return s;
    if (n && fwrite(data, 1, n, w->fp) != n) {
        s = moe_error(MOE_ERR_IO, "cannot write '%s': %s", w->target, strerror(errno));
        moe_durable_abort(w);
        return s;
    }
    return moe_durable_commit(w);
}

moe_status moe_durable_write_text(const char *path, const char *text)
{
    moe_durable *w;
    moe_status s = moe_durable_open(path, &w);
    if (s)
        return s;
    if (fputs(text, w->fp) == EOF || fputc('\n', w->fp) == EOF) {
        s = moe_error(MOE_ERR_IO, "cannot write '%s': %s", w->target, strerror(errno));
        moe_durable_abort(w);
        return s;
    }
    return moe_durable_commit(w);
}

moe_status moe_fsync_parent(const char *path)
{
    char *dir = dir_of(path);
    if (!dir)
        return moe_error(MOE_ERR_NOMEM, "out of memory");
    int fd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    moe_status s = MOE_OK;
    /* some file systems cannot fsync a directory (EINVAL); the rename stands regardless */
    if (fd < 0 || (fsync(fd) != 0 && errno != EINVAL && errno != ENOTSUP && errno != EROFS))
        s = moe_error(MOE_ERR_IO, "%s: cannot fsync directory '%s': %s", path, dir, strerror(errno));
    if (fd >= 0)
        close(fd);
    free(dir);
    return s;
}

int moe_same_file(const char *a, const char *b)
{
    struct stat sa, sb;
    return a && b && stat(a, &sa) == 0 && stat(b, &sb) == 0 && sa.st_dev == sb.st_dev && sa.st_ino == sb.st_ino;
}

moe_status moe_refuse_same_file(const char *out, const char *in, const char *what)
{
    struct stat so;
    if (!out || !in || stat(out, &so) != 0 || !(S_ISREG(so.st_mode) || S_ISFIFO(so.st_mode)))
        return MOE_OK;
    if (moe_same_file(out, in))
        return moe_error(MOE_ERR_ARG, "the output '%s' is the %s '%s' (the same file): refusing to overwrite an input; "
                         "write somewhere else", out, what, in);
    return MOE_OK;
}

/* ---- directories ------------------------------------------------------------------- */

moe_status moe_mkdirs(const char *dir, moe_made_dirs *made)
{
    char buf[4096];
    if (!dir || !*dir)
        return moe_error(MOE_ERR_ARG, "no directory given");
    if (snprintf(buf, sizeof buf, "%s", dir) >= (int)sizeof buf)
        return moe_error(MOE_ERR_ARG, "directory '%s' is too long", dir);
    /* each prefix ending at a '/', then the whole path */
    for (char *p = buf + 1;; p++) {
        if (*p != '/' && *p != '\0')
            continue;
        char c = *p;
        *p = '\0';
        struct stat sb;
        if (mkdir(buf, 0777) == 0) {
            if (made && made->n < (int)(sizeof made->dir / sizeof made->dir[0]) && (made->dir[made->n] = dup_str(buf)))
                made->n++;
        } else if (errno != EEXIST) {
            return moe_error(MOE_ERR_IO, "cannot create directory '%s': %s", buf, strerror(errno));
        }
        if (stat(buf, &sb) != 0 || !S_ISDIR(sb.st_mode))
            return moe_error(MOE_ERR_IO, "'%s' exists and is not a directory", buf);
        *p = c;
        if (!c)
            break;
    }
    return MOE_OK;
}

void moe_made_dirs_undo(moe_made_dirs *made)
{
    for (int i = made->n - 1; i >= 0; i--) {
        rmdir(made->dir[i]); /* only when empty: what someone else put there stays */
        free(made->dir[i]);
    }
    made->n = 0;
}

void moe_made_dirs_clear(moe_made_dirs *made)
{
    for (int i = 0; i < made->n; i++)
        free(made->dir[i]);
    made->n = 0;
}
