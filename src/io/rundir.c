/*
 * The run directory (rundir.h): what may be written where, the lock, metrics.jsonl.
 *
 * The checks refuse before anything is created; the lock is then taken and the directory
 * checked again under it, so of two `cmoe train --out s` started together exactly one
 * proceeds and the other fails naming the first one's pid.
 */
#define _DEFAULT_SOURCE /* flock, realpath */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <jansson.h>

#include "core/input.h"
#include "io/rundir.h"

enum { WROTE_CONFIG = 1, WROTE_TRAIN = 2, WROTE_METRICS = 4, WROTE_LOCK = 8 };

static moe_status join(char *buf, size_t n, const char *dir, const char *name)
{
    int k = snprintf(buf, n, "%s/%s", dir, name);
    if (k < 0 || (size_t)k >= n)
        return moe_error(MOE_ERR_ARG, "path '%s/%s' is too long", dir, name);
    return MOE_OK;
}

static int is_ckpt_name(const char *name)
{
    size_t n = strlen(name);
    return n > 17 && !strncmp(name, "ckpt-", 5) && !strcmp(name + n - 12, ".safetensors");
}

/* What dir holds: the files that make it a run (into run[]), and the first other entry. */
typedef struct {
    int exists, n_run, n_other, lock;
    char run[160];
    char other[256];
} dir_survey;

static moe_status survey(const char *dir, dir_survey *sv)
{
    memset(sv, 0, sizeof *sv);
    DIR *d = opendir(dir);
    if (!d) {
        if (errno == ENOENT)
            return MOE_OK;
        if (errno == ENOTDIR)
            return moe_error(MOE_ERR_IO, "'%s' exists and is not a directory", dir);
        return moe_error(MOE_ERR_IO, "cannot read directory '%s': %s", dir, strerror(errno));
    }
    sv->exists = 1;
    for (struct dirent *e; (e = readdir(d));) {
        const char *n = e->d_name;
        if (!strcmp(n, ".") || !strcmp(n, ".."))
            continue;
        if (!strcmp(n, MOE_RUN_LOCK)) {
            sv->lock = 1;
            continue;
        }
        if (!strcmp(n, MOE_RUN_METRICS) || !strcmp(n, MOE_RUN_WEIGHTS) || !strcmp(n, "train.json") || is_ckpt_name(n)) {
            size_t k = strlen(sv->run);
            if (sv->n_run++ < 4)
                snprintf(sv->run + k, sizeof sv->run - k, "%s%s", k ? ", " : "", n);
        } else if (sv->n_other++ == 0) {
            snprintf(sv->other, sizeof sv->other, "%s", n);
        }
    }
    closedir(d);
    return MOE_OK;
}

static moe_status refuse_root(const char *dir)
{
    char *abs = realpath(dir, NULL);
    int root = abs && !strcmp(abs, "/");
    free(abs);
    if (root)
        return moe_error(MOE_ERR_ARG, "'%s' is the root directory: pass a directory of its own, e.g. --out runs/NAME",
                         dir);
    return MOE_OK;
}

/* The pid in a lock file fd, into pid [n] ("" when none was written yet). */
static void lock_pid(int fd, char *pid, size_t n)
{
    /* the holder writes its pid just after it locks: give it a moment */
    pid[0] = '\0';
    for (int i = 0; i < 50 && !pid[0]; i++) {
        ssize_t k = pread(fd, pid, n - 1, 0);
        pid[k > 0 ? k : 0] = '\0';
        pid[strcspn(pid, "\n")] = '\0';
        if (!pid[0])
            usleep(2000);
    }
}

static moe_status in_use(const char *dir, const char *pid)
{
    return moe_error(MOE_ERR_IO, "'%s' is in use by process %s (a cmoe train running in it); wait for it to finish "
                     "or stop it first", dir, pid[0] ? pid : "(unknown pid)");
}

/* MOE_ERR_IO naming the holder when dir's lock is held now; looked at without writing. */
static moe_status probe_lock(const char *dir)
{
    char path[4200], pid[32];
    if (join(path, sizeof path, dir, MOE_RUN_LOCK))
        return MOE_OK;
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return MOE_OK;
    moe_status s = MOE_OK;
    if (flock(fd, LOCK_SH | LOCK_NB) != 0 && errno == EWOULDBLOCK) {
        lock_pid(fd, pid, sizeof pid);
        s = in_use(dir, pid);
    }
    close(fd);
    return s;
}

/* A new run may go into dir: not '/', not in use (unless this process holds the lock), no
 * run there, nothing else there (unless force). */
static moe_status check_new(const char *dir, int force, int locked)
{
    dir_survey sv;
    moe_status s = refuse_root(dir);
    if (s || (s = survey(dir, &sv)) || (sv.lock && !locked && (s = probe_lock(dir))))
        return s;
    if (force)
        return MOE_OK;
    if (sv.n_run)
        return moe_error(MOE_ERR_IO, "'%s' already holds a run (%s%s); pass another --out DIR, --resume %s to "
                         "continue it, or --force to overwrite it", dir, sv.run, sv.n_run > 4 ? ", ..." : "", dir);
    if (sv.n_other)
        return moe_error(MOE_ERR_IO, "'%s' is not empty and holds no cmoe run ('%s'%s); pass a new or empty --out "
                         "DIR, or --force to write config.json, train.json, metrics.jsonl and the weights into it",
                         dir, sv.other, sv.n_other > 1 ? " and more" : "");
    return MOE_OK;
}

moe_status moe_rundir_default_name(char *buf, size_t n)
{
    time_t t = time(NULL);
    struct tm tm;
    char stamp[32];
    localtime_r(&t, &tm);
    strftime(stamp, sizeof stamp, "%Y%m%d-%H%M%S", &tm);
    struct stat sb;
    for (int i = 1; i < 1000; i++) {
        if (i == 1)
            snprintf(buf, n, "runs/%s", stamp);
        else
            snprintf(buf, n, "runs/%s-%d", stamp, i);
        if (stat(buf, &sb) != 0)
            return MOE_OK;
    }
    return moe_error(MOE_ERR_IO, "cannot find a free name runs/%s-N; pass --out DIR", stamp);
}

static void rundir_init(moe_rundir *r, const char *dir)
{
    memset(r, 0, sizeof *r);
    r->lock_fd = r->metrics_fd = -1;
    snprintf(r->dir, sizeof r->dir, "%s", dir);
}

moe_status moe_rundir_lock(moe_rundir *r)
{
    char path[4200];
    moe_status s = join(path, sizeof path, r->dir, MOE_RUN_LOCK);
    if (s)
        return s;
    for (int tries = 0; tries < 100; tries++) {
        struct stat before;
        const int existed = stat(path, &before) == 0;
        int fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0644);
        if (fd < 0)
            return moe_error(MOE_ERR_IO, "cannot create the lock '%s': %s", path, strerror(errno));
        if (flock(fd, LOCK_EX | LOCK_NB) != 0) {
            int e = errno;
            char pid[32];
            lock_pid(fd, pid, sizeof pid);
            close(fd);
            if (e == EWOULDBLOCK)
                return in_use(r->dir, pid);
            return moe_error(MOE_ERR_IO, "cannot lock '%s': %s", path, strerror(e));
        }
        /* the holder before us removes the file when it ends: lock the file that is there */
        struct stat a, b;
        if (fstat(fd, &a) == 0 && stat(path, &b) == 0 && a.st_dev == b.st_dev && a.st_ino == b.st_ino) {
            char pid[32];
            int k = snprintf(pid, sizeof pid, "%ld\n", (long)getpid());
            if (ftruncate(fd, 0) != 0 || pwrite(fd, pid, (size_t)k, 0) != k) {
                close(fd);
                return moe_error(MOE_ERR_IO, "cannot write the lock '%s': %s", path, strerror(errno));
            }
            r->lock_fd = fd;
            if (!existed)
                r->wrote |= WROTE_LOCK;
            return MOE_OK;
        }
        close(fd);
    }
    return moe_error(MOE_ERR_IO, "cannot lock '%s': it keeps being replaced", path);
}

static void unlock(moe_rundir *r)
{
    if (r->lock_fd < 0)
        return;
    char path[4200];
    if (join(path, sizeof path, r->dir, MOE_RUN_LOCK) == MOE_OK)
        unlink(path); /* while still held: no one can have locked the name we remove */
    close(r->lock_fd);
    r->lock_fd = -1;
}

/* --force: the old weights and checkpoints must not pass for this run's */
static moe_status remove_old_state(const char *dir)
{
    char path[4200];
    int64_t *steps = NULL;
    int n = 0;
    moe_status s = join(path, sizeof path, dir, MOE_RUN_WEIGHTS);
    if (!s && remove(path) != 0 && errno != ENOENT)
        s = moe_error(MOE_ERR_IO, "cannot remove the old '%s': %s", path, strerror(errno));
    if (s || (s = moe_ckpt_list(dir, &steps, &n)))
        return s;
    for (int i = 0; i < n && !s; i++)
        if (!(s = moe_ckpt_path(path, sizeof path, dir, steps[i])) && remove(path) != 0 && errno != ENOENT)
            s = moe_error(MOE_ERR_IO, "cannot remove the old '%s': %s", path, strerror(errno));
    free(steps);
    return s;
}

moe_status moe_rundir_create(const char *dir, int force, moe_rundir *r)
{
    rundir_init(r, dir);
    r->fresh = 1;
    moe_status s;
    if ((s = check_new(dir, force, 0)) || (s = moe_mkdirs(dir, &r->made)) || (s = moe_rundir_lock(r)) ||
        (s = check_new(dir, force, 1))) {
        unlock(r);
        moe_made_dirs_undo(&r->made);
        return s;
    }
    if (force && (s = remove_old_state(dir))) {
        unlock(r);
        return s;
    }
    return MOE_OK;
}

moe_status moe_rundir_open(const char *dir, moe_rundir *r)
{
    rundir_init(r, dir);
    struct stat sb;
    if (stat(dir, &sb) != 0)
        return moe_error(MOE_ERR_IO, "run directory '%s': %s", dir, strerror(errno));
    if (!S_ISDIR(sb.st_mode))
        return moe_error(MOE_ERR_IO, "run directory '%s' is not a directory", dir);
    return moe_rundir_lock(r);
}

moe_status moe_rundir_start(moe_rundir *r, const char *config_json, const char *train_json, int64_t resume_step)
{
    char path[4200];
    moe_status s;
    if (config_json) {
        if ((s = join(path, sizeof path, r->dir, "config.json")) || (s = moe_durable_write_text(path, config_json)))
            return s;
        r->wrote |= WROTE_CONFIG;
    }
    if ((s = join(path, sizeof path, r->dir, "train.json")) || (s = moe_durable_write_text(path, train_json)))
        return s;
    r->wrote |= WROTE_TRAIN;
    if ((s = join(path, sizeof path, r->dir, MOE_RUN_METRICS)))
        return s;
    if (resume_step >= 0 && (s = moe_metrics_cut(path, resume_step, NULL)))
        return s;
    /* a new run (into a directory --force let us use) starts a file of its own: whatever the
     * name was, a link included, is replaced rather than truncated through */
    if (resume_step < 0 && unlink(path) != 0 && errno != ENOENT)
        return moe_error(MOE_ERR_IO, "cannot replace '%s': %s", path, strerror(errno));
    int flags = O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC | (resume_step < 0 ? O_EXCL : 0);
    if ((r->metrics_fd = open(path, flags, 0644)) < 0)
        return moe_error(MOE_ERR_IO, "cannot write '%s': %s", path, strerror(errno));
    r->wrote |= WROTE_METRICS;
    return MOE_OK;
}

moe_status moe_rundir_append_metrics(moe_rundir *r, const char *record)
{
    size_t n = strlen(record);
    char *line = malloc(n + 2);
    if (!line)
        return moe_error(MOE_ERR_NOMEM, "out of memory");
    memcpy(line, record, n);
    line[n] = '\n';
    /* one write of the whole line: with O_APPEND a reader or a crash sees whole lines, or a
     * torn last one, never two records spliced */
    size_t at = 0;
    while (at < n + 1) {
        ssize_t k = write(r->metrics_fd, line + at, n + 1 - at);
        if (k < 0 && errno == EINTR)
            continue;
        if (k <= 0) {
            int e = errno;
            free(line);
            return moe_error(MOE_ERR_IO, "cannot write %s/%s: %s", r->dir, MOE_RUN_METRICS, strerror(k < 0 ? e : EIO));
        }
        at += (size_t)k;
    }
    free(line);
    return MOE_OK;
}

moe_status moe_rundir_sync_metrics(moe_rundir *r)
{
    if (r->metrics_fd >= 0 && fsync(r->metrics_fd) != 0 && errno != EINVAL)
        return moe_error(MOE_ERR_IO, "cannot write %s/%s: %s", r->dir, MOE_RUN_METRICS, strerror(errno));
    return MOE_OK;
}

void moe_rundir_close(moe_rundir *r, int failed, int *removed)
{
    if (removed)
        *removed = 0;
    if (r->metrics_fd >= 0)
        close(r->metrics_fd);
    r->metrics_fd = -1;
    if (failed && r->fresh && !r->saved) {
        static const struct {
            unsigned bit;
            const char *name;
        } files[] = {{WROTE_CONFIG, "config.json"}, {WROTE_TRAIN, "train.json"}, {WROTE_METRICS, MOE_RUN_METRICS}};
        char path[4200];
        for (size_t i = 0; i < sizeof files / sizeof files[0]; i++)
            if ((r->wrote & files[i].bit) && join(path, sizeof path, r->dir, files[i].name) == MOE_OK)
                unlink(path);
        if (removed)
            *removed = (r->wrote & (WROTE_CONFIG | WROTE_TRAIN | WROTE_METRICS)) != 0 || r->made.n;
        unlock(r);
        moe_made_dirs_undo(&r->made);
    } else {
        unlock(r);
        moe_made_dirs_clear(&r->made);
    }
    r->wrote = 0;
}

moe_status moe_rundir_check_output(const char *dir, const char *const *names, int force)
{
    dir_survey sv;
    moe_status s = refuse_root(dir);
    if (s || (s = survey(dir, &sv)) || force)
        return s;
    if (sv.n_run)
        return moe_error(MOE_ERR_IO, "'%s' already holds a run (%s%s): refusing to overwrite it; pass another "
                         "directory, or --force", dir, sv.run, sv.n_run > 4 ? ", ..." : "");
    char path[4200];
    struct stat st;
    for (int i = 0; names[i]; i++)
        if (join(path, sizeof path, dir, names[i]) == MOE_OK && lstat(path, &st) == 0)
            return moe_error(MOE_ERR_IO, "'%s' already exists: refusing to overwrite it; pass another directory, or "
                             "--force", path);
    return MOE_OK;
}

/* ---- metrics.jsonl ----------------------------------------------------------------- */

moe_status moe_metrics_cut(const char *path, int64_t step, int *dropped_torn)
{
    if (dropped_torn)
        *dropped_torn = 0;
    int fd;
    struct stat st;
    if (access(path, F_OK) != 0 && errno == ENOENT)
        return moe_durable_write(path, "", 0); /* none yet: start one */
    moe_status s = moe_input_open(path, "metrics file", MOE_IN_REGULAR, &fd, &st);
    if (s)
        return s;
    FILE *in = fdopen(fd, "r");
    if (!in) {
        close(fd);
        return moe_error(MOE_ERR_IO, "cannot read '%s': %s", path, strerror(errno));
    }
    moe_durable *w;
    if ((s = moe_durable_open(path, &w))) {
        fclose(in);
        return s;
    }
    FILE *out = moe_durable_file(w);
    char *line = NULL;
    size_t cap = 0;
    ssize_t n;
    int bad = 0;
    while ((n = getline(&line, &cap, in)) > 0) {
        /* a line without its newline is torn (a crash mid-write): it goes */
        json_t *j = line[n - 1] == '\n' ? json_loadb(line, (size_t)n, 0, NULL) : NULL;
        json_t *v = j ? json_object_get(j, "step") : NULL;
        if (!v && dropped_torn)
            ++*dropped_torn;
        if (v && json_is_integer(v) && json_integer_value(v) <= step)
            bad |= fwrite(line, 1, (size_t)n, out) != (size_t)n;
        json_decref(j);
    }
    bad |= ferror(in);
    free(line);
    fclose(in);
    if (bad) {
        s = moe_error(MOE_ERR_IO, "cannot rewrite '%s': %s", path, strerror(errno));
        moe_durable_abort(w);
        return s;
    }
    return moe_durable_commit(w);
}
