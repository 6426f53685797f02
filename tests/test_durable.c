/*
 * core/durable.h and core/input.h: the one durable write and the bounded inputs.
 *  - a regular file is replaced all or nothing, keeping its permission bits; an aborted
 *    write leaves the old contents and no temporary;
 *  - a symlink is followed (the link stays a link), also a dangling one;
 *  - a character device and a FIFO are written through and stay what they are (as root, a
 *    private twin of /dev/null proves that a rename never goes over one);
 *  - a directory is refused; an output that is an input (by device and inode) is refused;
 *  - moe_mkdirs remembers what it made and undoes only that;
 *  - reads: a FIFO without a writer never blocks a regular-only open; a pipe is read to
 *    its end and refused past the limit; a regular file past the limit is refused unread.
 */
#define _DEFAULT_SOURCE /* mknod, makedev */
#define _POSIX_C_SOURCE 200809L
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <sys/wait.h>
#include <unistd.h>

#include "core/durable.h"
#include "core/input.h"
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

static void put(const char *path, const char *text)
{
    FILE *f = fopen(path, "w");
    ck_assert_ptr_nonnull(f);
    fputs(text, f);
    fclose(f);
}

static char *get(const char *path)
{
    static char buf[4096];
    FILE *f = fopen(path, "r");
    ck_assert_ptr_nonnull(f);
    size_t n = fread(buf, 1, sizeof buf - 1, f);
    buf[n] = '\0';
    fclose(f);
    return buf;
}

/* entries of dir whose name contains part */
static int count(const char *part)
{
    DIR *d = opendir(dir);
    ck_assert_ptr_nonnull(d);
    int n = 0;
    for (struct dirent *e; (e = readdir(d));)
        n += strstr(e->d_name, part) != NULL;
    closedir(d);
    return n;
}

START_TEST(regular_replaced_whole)
{
    const char *p = tmp("a.txt");
    put(p, "old");
    ck_assert_int_eq(chmod(p, 0640), 0);
    ck_assert_msg(moe_durable_write_text(p, "new") == MOE_OK, "%s", moe_last_error());
    ck_assert_str_eq(get(p), "new\n");
    struct stat st;
    ck_assert_int_eq(stat(p, &st), 0);
    ck_assert_int_eq(st.st_mode & 07777, 0640);
    ck_assert_int_eq(count(".tmp"), 0);
    /* aborted: the old contents stay, no temporary */
    moe_durable *w;
    ck_assert_int_eq(moe_durable_open(p, &w), MOE_OK);
    fputs("half a page", moe_durable_file(w));
    ck_assert_int_eq(count("a.txt.tmp"), 1);
    moe_durable_abort(w);
    ck_assert_str_eq(get(p), "new\n");
    ck_assert_int_eq(count(".tmp"), 0);
    /* a new file: created whole */
    ck_assert_int_eq(moe_durable_write(tmp("b.bin"), "xyz", 3), MOE_OK);
    ck_assert_str_eq(get(tmp("b.bin")), "xyz");
    /* a directory is refused, a missing directory named */
    ck_assert_int_eq(moe_durable_write(dir, "x", 1), MOE_ERR_IO);
    ck_assert_ptr_nonnull(strstr(moe_last_error(), "is a directory"));
    ck_assert_int_eq(moe_durable_write(tmp("no/such/file"), "x", 1), MOE_ERR_IO);
    ck_assert_ptr_nonnull(strstr(moe_last_error(), "no/such/file"));
}
END_TEST

START_TEST(symlinks_followed)
{
    put(tmp("target.txt"), "old");
    ck_assert_int_eq(symlink("target.txt", tmp("link.txt")), 0);
    ck_assert_int_eq(moe_durable_write_text(tmp("link.txt"), "through"), MOE_OK);
    struct stat st;
    ck_assert_int_eq(lstat(tmp("link.txt"), &st), 0);
    ck_assert(S_ISLNK(st.st_mode));
    ck_assert_str_eq(get(tmp("target.txt")), "through\n");
    /* a chain ending in a name that does not exist yet */
    ck_assert_int_eq(symlink("link3.txt", tmp("link2.txt")), 0);
    ck_assert_int_eq(symlink("fresh.txt", tmp("link3.txt")), 0);
    ck_assert_int_eq(moe_durable_write_text(tmp("link2.txt"), "made"), MOE_OK);
    ck_assert_int_eq(lstat(tmp("link2.txt"), &st), 0);
    ck_assert(S_ISLNK(st.st_mode));
    ck_assert_str_eq(get(tmp("fresh.txt")), "made\n");
}
END_TEST

START_TEST(devices_written_through)
{
    struct stat st;
    ck_assert_int_eq(moe_durable_write_text("/dev/null", "gone"), MOE_OK);
    ck_assert_int_eq(stat("/dev/null", &st), 0);
    ck_assert(S_ISCHR(st.st_mode));
    ck_assert_int_eq(moe_durable_write_text("/dev/full", "x"), MOE_ERR_IO);
    ck_assert_ptr_nonnull(strstr(moe_last_error(), "No space left on device"));
    if (geteuid() == 0) { /* root could rename over a device: a private twin of /dev/null */
        const char *twin = tmp("null");
        ck_assert_int_eq(mknod(twin, S_IFCHR | 0666, makedev(1, 3)), 0);
        ck_assert_int_eq(moe_durable_write_text(twin, "gone"), MOE_OK);
        ck_assert_int_eq(stat(twin, &st), 0);
        ck_assert(S_ISCHR(st.st_mode));
        unlink(twin);
    }
}
END_TEST

START_TEST(fifo_written_through)
{
    const char *fifo = tmp("out.fifo"), *got = tmp("got.txt");
    ck_assert_int_eq(mkfifo(fifo, 0600), 0);
    pid_t pid = fork();
    ck_assert_int_ge(pid, 0);
    if (pid == 0) { /* the reader */
        char cmd[1200];
        snprintf(cmd, sizeof cmd, "cat '%s' > '%s'", fifo, got);
        _exit(system(cmd) == 0 ? 0 : 1);
    }
    ck_assert_msg(moe_durable_write_text(fifo, "through the pipe") == MOE_OK, "%s", moe_last_error());
    int status;
    ck_assert_int_eq(waitpid(pid, &status, 0), pid);
    ck_assert(WIFEXITED(status) && WEXITSTATUS(status) == 0);
    ck_assert_str_eq(get(got), "through the pipe\n");
    struct stat st;
    ck_assert_int_eq(stat(fifo, &st), 0);
    ck_assert(S_ISFIFO(st.st_mode));
    unlink(fifo);
    unlink(got);
}
END_TEST

START_TEST(same_file_refused)
{
    put(tmp("in.txt"), "input");
    ck_assert_int_eq(link(tmp("in.txt"), tmp("hard.txt")), 0);
    char spelt[600];
    snprintf(spelt, sizeof spelt, "%s/./in.txt", dir);
    ck_assert_int_eq(moe_refuse_same_file(spelt, tmp("in.txt"), "--inputs"), MOE_ERR_ARG);
    ck_assert_ptr_nonnull(strstr(moe_last_error(), "is the --inputs"));
    ck_assert_int_eq(moe_refuse_same_file(tmp("hard.txt"), tmp("in.txt"), "--inputs"), MOE_ERR_ARG);
    ck_assert_int_eq(moe_refuse_same_file(tmp("other.txt"), tmp("in.txt"), "--inputs"), MOE_OK);
    ck_assert_int_eq(moe_refuse_same_file("/dev/null", "/dev/null", "input"), MOE_OK); /* harmless */
    ck_assert_int_eq(moe_same_file(tmp("hard.txt"), spelt), 1);
    ck_assert_str_eq(get(tmp("in.txt")), "input");
}
END_TEST

START_TEST(mkdirs_undone)
{
    ck_assert_int_eq(mkdir(tmp("keep"), 0700), 0);
    moe_made_dirs made = {0};
    ck_assert_int_eq(moe_mkdirs(tmp("keep/a/b/c"), &made), MOE_OK);
    ck_assert_int_eq(made.n, 3);
    put(tmp("keep/a/user.txt"), "someone else's"); /* a/ is not empty: it stays */
    moe_made_dirs_undo(&made);
    struct stat st;
    ck_assert_int_ne(stat(tmp("keep/a/b"), &st), 0);
    ck_assert_int_eq(stat(tmp("keep/a/user.txt"), &st), 0);
    ck_assert_int_eq(moe_mkdirs(tmp("keep/a/user.txt/x"), NULL), MOE_ERR_IO); /* a file on the way */
    ck_assert_ptr_nonnull(strstr(moe_last_error(), "not a directory"));
}
END_TEST

/* a child writing n bytes into the write end of a pipe, then closing it */
static pid_t writer(int fd[2], size_t n)
{
    pid_t pid = fork();
    if (pid == 0) {
        close(fd[0]);
        signal(SIGPIPE, SIG_DFL);
        char buf[1024];
        memset(buf, 'x', sizeof buf);
        for (size_t done = 0; done < n;) {
            size_t k = n - done < sizeof buf ? n - done : sizeof buf;
            if (write(fd[1], buf, k) != (ssize_t)k)
                _exit(0); /* the reader gave up */
            done += k;
        }
        _exit(0);
    }
    close(fd[1]);
    return pid;
}

START_TEST(bounded_reads)
{
    char *buf;
    size_t len;
    /* a FIFO with no writer, where a regular file is wanted: refused at once */
    const char *fifo = tmp("in.fifo");
    ck_assert_int_eq(mkfifo(fifo, 0600), 0);
    ck_assert_int_eq(moe_read_all(fifo, "safetensors file", 1024, MOE_IN_REGULAR, &buf, &len), MOE_ERR_IO);
    ck_assert_ptr_nonnull(strstr(moe_last_error(), "is a FIFO"));
    unlink(fifo);
    ck_assert_int_eq(moe_read_all(dir, "config", 1024, MOE_IN_STREAM, &buf, &len), MOE_ERR_IO);
    ck_assert_ptr_nonnull(strstr(moe_last_error(), "is a directory"));
    /* a pipe: read whole under the limit, refused past it */
    char path[64];
    for (int pass = 0; pass < 2; pass++) {
        int fd[2];
        ck_assert_int_eq(pipe(fd), 0);
        pid_t pid = writer(fd, 10000);
        snprintf(path, sizeof path, "/dev/fd/%d", fd[0]);
        moe_status s = moe_read_all(path, "config", pass ? 4096 : 65536, MOE_IN_STREAM, &buf, &len);
        close(fd[0]);
        waitpid(pid, NULL, 0);
        if (pass) {
            ck_assert_int_eq(s, MOE_ERR_FORMAT);
            ck_assert_ptr_nonnull(strstr(moe_last_error(), "larger than 4096 bytes"));
        } else {
            ck_assert_msg(s == MOE_OK, "%s", moe_last_error());
            ck_assert_uint_eq(len, 10000);
            ck_assert_int_eq(buf[9999], 'x');
            ck_assert_int_eq(buf[10000], '\0');
            free(buf);
        }
    }
    /* a regular file past the limit: refused before it is read */
    put(tmp("big.json"), "0123456789");
    ck_assert_int_eq(moe_read_all(tmp("big.json"), "config", 9, MOE_IN_REGULAR, &buf, &len), MOE_ERR_FORMAT);
    ck_assert_int_eq(moe_read_all(tmp("big.json"), "config", 10, MOE_IN_REGULAR, &buf, &len), MOE_OK);
    ck_assert_str_eq(buf, "0123456789");
    free(buf);
}
END_TEST

int main(void)
{
    snprintf(dir, sizeof dir, "%s/cmoe-durable.XXXXXX", getenv("TMPDIR") ? getenv("TMPDIR") : "/tmp");
    if (!mkdtemp(dir)) {
        perror("mkdtemp");
        return 99;
    }
    Suite *s = suite_create("durable");
    TCase *tc = tcase_create("files");
    tcase_add_test(tc, regular_replaced_whole);
    tcase_add_test(tc, symlinks_followed);
    tcase_add_test(tc, devices_written_through);
    tcase_add_test(tc, fifo_written_through);
    tcase_add_test(tc, same_file_refused);
    tcase_add_test(tc, mkdirs_undone);
    tcase_add_test(tc, bounded_reads);
    suite_add_tcase(s, tc);
    int rc = tu_run(s);
    char cmd[600];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", dir);
    if (system(cmd) != 0)
        fprintf(stderr, "note: could not remove %s\n", dir);
    return rc;
}
