/*
 * durable.h — the one way libcmoe and the tool write a file, and the checks that keep
 * an output from destroying what is not cmoe's.
 *
 *     moe_durable *w;
 *     if (moe_durable_open("run/train.json", &w)) return fail();   // nothing written yet
 *     fputs(text, moe_durable_file(w));
 *     if (moe_durable_commit(w)) return fail();                     // all or nothing
 *
 * What the output PATH may be:
 *  - a regular file, or a name that does not exist yet: written to a temporary file in
 *    the same directory (NAME.tmp-PID-N, created with O_EXCL), flushed, fsync'd, renamed
 *    over PATH, the directory fsync'd. A reader sees the old file or the new one, never a
 *    part; a failure (disk full, a signal, an error of the caller) leaves PATH as it was
 *    and no temporary behind. A replaced file keeps its permission bits.
 *  - a symbolic link: followed (its final target is written as above; the link stays a
 *    link), also when the target does not exist yet (a dangling link).
 *  - a character device or a FIFO (/dev/null, /dev/stdout on a terminal or a pipe, a named
 *    pipe): written through, in place. Never renamed over: as root a rename would turn
 *    /dev/null into a regular file.
 *  - a file reached through a /proc magic link (/dev/stdout redirected to a file): written
 *    in place, as the shell's redirection asked.
 *  - a directory, a block device or a socket: refused.
 */
#ifndef CMOE_CORE_DURABLE_H
#define CMOE_CORE_DURABLE_H

#include <stddef.h>
#include <stdio.h>

#include "cmoe.h"

typedef struct moe_durable moe_durable;

/* Opens PATH for writing under the rules above. MOE_ERR_IO names the path and the reason;
 * nothing has been changed when it fails. */
moe_status moe_durable_open(const char *path, moe_durable **out);
/* The stream to write to (stdio buffered). */
FILE *moe_durable_file(moe_durable *w);
/* The path actually written (the symlink's target), for messages. */
const char *moe_durable_target(const moe_durable *w);
/* Finishes the write (see above) and frees w, also on failure. An error the stream met
 * while the caller wrote (ferror) fails the commit. */
moe_status moe_durable_commit(moe_durable *w);
/* Drops what was written (a regular target keeps its old contents) and frees w; NULL-safe. */
void moe_durable_abort(moe_durable *w);

/* The whole file at once: n bytes of data. */
moe_status moe_durable_write(const char *path, const void *data, size_t n);
/* A text file: text and a final newline. */
moe_status moe_durable_write_text(const char *path, const char *text);

/* fsync of the directory that holds path (a rename in it is then durable). */
moe_status moe_fsync_parent(const char *path);

/* 1 when a and b are the same existing file (device and inode, whatever the spelling:
 * relative or absolute, through symlinks or hard links), else 0. */
int moe_same_file(const char *a, const char *b);
/* MOE_ERR_ARG when the output `out` is the same regular file or FIFO as the input `in`
 * (what names the input in the message); devices such as /dev/null are never refused. */
moe_status moe_refuse_same_file(const char *out, const char *in, const char *what);

/* ---- directories this process creates ----------------------------------------------- */

/* mkdir -p that remembers which directories it made, so a failed command can remove
 * them again (and only them): moe_made_dirs_undo removes the empty ones, deepest first. */
typedef struct {
    int n;
    char *dir[64];
} moe_made_dirs;

moe_status moe_mkdirs(const char *dir, moe_made_dirs *made /* NULL: not recorded */);
void moe_made_dirs_undo(moe_made_dirs *made);
void moe_made_dirs_clear(moe_made_dirs *made); /* forget them (the command succeeded) */

#endif
