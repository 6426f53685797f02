/*
 * Reading datasets (data_impl.h): byte-level text, plain or gzip, from a file or a stream,
 * and llm.c token shards mapped read-only; each with its identity (data.h).
 *
 * Text is read once from the one descriptor moe_dataset_open opened (core/input.h) and the
 * gzip magic is sniffed from the bytes read, so a pipe or a FIFO loses nothing and nothing
 * waits for a second writer. gzip is inflated in memory with zlib, member after member, so
 * that what follows the last member is seen: zeros are padding (as gzip(1) takes them),
 * anything else is refused rather than silently dropped.
 */
#define _XOPEN_SOURCE 700

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>
#include <zlib.h>

#include "core/input.h"
#include "io/data_impl.h"

static int32_t le32(const uint8_t *p)
{
    return (int32_t)((uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24);
}

static int ends_with(const char *s, const char *suffix)
{
    size_t n = strlen(s), m = strlen(suffix);
    return n >= m && strcmp(s + n - m, suffix) == 0;
}

static uint32_t crc_bytes(uint32_t crc, const uint8_t *p, size_t n)
{
    uLong c = crc;
    while (n > 0) {
        uInt chunk = n > (1u << 30) ? (1u << 30) : (uInt)n;
        c = crc32(c, p, chunk);
        p += chunk;
        n -= chunk;
    }
    return (uint32_t)c;
}

/* The resolved path when there is one (a file or directory), else the path as given. */
static void set_id_path(moe_dataset *d, const char *path)
{
    char *abs = realpath(path, NULL);
    snprintf(d->id.path, sizeof d->id.path, "%s", abs ? abs : path);
    free(abs);
}

/* ---- text ------------------------------------------------------------------------ */

static moe_status too_much_text(const char *path, const char *how)
{
    return moe_error(MOE_ERR_FORMAT, "data: '%s' holds more than %zu MiB of text%s; text is held in memory: convert "
                     "a corpus this large to llm.c token shards (which are mapped)", path, MOE_TEXT_MAX >> 20, how);
}

static moe_status gunzip(const char *path, const uint8_t *in, size_t n, uint8_t **out, size_t *len)
{
    *out = NULL;
    z_stream z;
    memset(&z, 0, sizeof z);
    if (inflateInit2(&z, 16 + MAX_WBITS) != Z_OK) /* 16: gzip wrapper only */
        return moe_error(MOE_ERR_NOMEM, "data: '%s': cannot start zlib", path);
    size_t cap = n < MOE_TEXT_MAX / 4 ? 4 * n + 4096 : MOE_TEXT_MAX + 1, used = 0, at = 0;
    uint8_t *buf = malloc(cap);
    moe_status s = buf ? MOE_OK : moe_error(MOE_ERR_NOMEM, "data: out of memory reading '%s'", path);
    while (!s) {
        z.next_in = (Bytef *)(in + at);
        z.avail_in = (uInt)(n - at); /* n <= MOE_TEXT_MAX < 2^32 */
        int r = Z_OK;
        while (!s && r != Z_STREAM_END) {
            if (used == cap) {
                if (cap > MOE_TEXT_MAX) {
                    s = too_much_text(path, " after gunzip");
                    break;
                }
                size_t nc = 2 * cap > MOE_TEXT_MAX + 1 ? MOE_TEXT_MAX + 1 : 2 * cap;
                uint8_t *nb = realloc(buf, nc);
                if (!nb) {
                    s = moe_error(MOE_ERR_NOMEM, "data: out of memory reading '%s'", path);
                    break;
                }
                buf = nb;
                cap = nc;
            }
            z.next_out = buf + used;
            z.avail_out = (uInt)(cap - used > UINT_MAX ? UINT_MAX : cap - used);
            const size_t room = z.avail_out;
            r = inflate(&z, Z_NO_FLUSH);
            used += room - z.avail_out;
            if (r == Z_OK || r == Z_STREAM_END || (r == Z_BUF_ERROR && z.avail_out == 0))
                continue;
            if (r == Z_BUF_ERROR) /* input used up before the member's trailer */
                s = moe_error(MOE_ERR_FORMAT, "data: '%s': corrupt or truncated gzip data (it ends before the "
                              "gzip trailer)", path);
            else
                s = moe_error(MOE_ERR_FORMAT, "data: '%s': corrupt or truncated gzip data (%s)", path,
                              z.msg ? z.msg : "zlib error");
        }
        if (s)
            break;
        at = n - z.avail_in;
        if (at == n)
            break;
        if (n - at >= 2 && in[at] == 0x1f && in[at + 1] == 0x8b) { /* another member */
            inflateReset(&z);
            continue;
        }
        size_t k = at;
        while (k < n && in[k] == 0)
            k++;
        if (k < n)
            s = moe_error(MOE_ERR_FORMAT, "data: '%s': %zu bytes of trailing garbage after the gzip data, which ends at "
                          "byte %zu; remove them (truncate the file to %zu bytes) or re-compress the text", path,
                          n - at, at, at);
        break;
    }
    inflateEnd(&z);
    if (s) {
        free(buf);
        return s;
    }
    *out = buf;
    *len = used;
    return MOE_OK;
}

moe_status moe_data_load_text(moe_dataset *d, const char *path, int fd, const struct stat *st)
{
    char *raw;
    size_t n_raw;
    moe_status s = moe_read_fd(fd, st, path, "data", MOE_TEXT_MAX, &raw, &n_raw);
    if (s == MOE_ERR_FORMAT)
        return too_much_text(path, S_ISREG(st->st_mode) ? "" : " (a stream that did not end)");
    if (s)
        return moe_error(s, "data: %s", moe_last_error());
    if (n_raw == 0) {
        free(raw);
        return moe_error(MOE_ERR_FORMAT, "data: '%s' is empty (0 bytes)", path);
    }
    if (n_raw >= 4 && le32((const uint8_t *)raw) == MOE_SHARD_MAGIC) {
        free(raw);
        return moe_error(MOE_ERR_FORMAT, "data: '%s' is a %s holding an llm.c token shard; a shard is mapped, so it "
                         "must be a regular file: save it to a file first", path, moe_file_kind(st->st_mode));
    }
    const int gzip = n_raw >= 2 && (uint8_t)raw[0] == 0x1f && (uint8_t)raw[1] == 0x8b;
    snprintf(d->id.kind, sizeof d->id.kind, "text");
    d->id.size = n_raw;
    d->id.crc32 = crc_bytes(0, (const uint8_t *)raw, n_raw);
    if (S_ISREG(st->st_mode))
        set_id_path(d, path);
    else
        snprintf(d->id.path, sizeof d->id.path, "%s", path);
    uint8_t *bytes = (uint8_t *)raw;
    size_t n = n_raw;
    if (gzip) {
        s = gunzip(path, (const uint8_t *)raw, n_raw, &bytes, &n);
        free(raw);
        if (s)
            return s;
    }
    if (n == 0) {
        free(bytes);
        return moe_error(MOE_ERR_FORMAT, "data: '%s' is empty (no text%s)", path, gzip ? " after gunzip" : "");
    }
    d->text = malloc(n * sizeof *d->text);
    if (!d->text) {
        free(bytes);
        return moe_error(MOE_ERR_NOMEM, "data: out of memory for %zu tokens of '%s'", n, path);
    }
    for (size_t i = 0; i < n; i++) {
        if (bytes[i] >= d->vocab) {
            s = moe_error(MOE_ERR_FORMAT, "data: '%s': byte %u at offset %zu is >= vocab %lld", path, bytes[i], i,
                          (long long)d->vocab);
            free(bytes);
            return s;
        }
        d->text[i] = bytes[i];
    }
    free(bytes);
    d->n_files = 0;
    d->train = malloc(sizeof *d->train);
    if (!d->train)
        return moe_error(MOE_ERR_NOMEM, "data: out of memory");
    d->train[0] = (segment){d->text, (int64_t)n};
    d->n_train_seg = 1;
    snprintf(d->desc, sizeof d->desc, "text '%s'%s", path, gzip ? " (gzip)" : "");
    return MOE_OK;
}

/* ---- shards ------------------------------------------------------------------------ */

/* Maps one shard (fd: open already, or -1) and checks its header, its size and every token;
 * folds its name, size and header into *crc. */
static moe_status map_shard(const char *path, int fd, int64_t vocab, mapped_file *mf, segment *seg, uint32_t *crc)
{
    struct stat sb;
    const int own = fd < 0;
    if (own && (fd = open(path, O_RDONLY | O_NONBLOCK | O_CLOEXEC)) < 0)
        return moe_error(MOE_ERR_IO, "data: cannot open '%s': %s", path, strerror(errno));
    if (fstat(fd, &sb) != 0 || !S_ISREG(sb.st_mode)) {
        int e = S_ISDIR(sb.st_mode) ? EISDIR : errno;
        if (own)
            close(fd);
        if (!e)
            return moe_error(MOE_ERR_IO, "data: '%s' is a %s; a token shard must be a regular file (it is mapped)",
                             path, moe_file_kind(sb.st_mode));
        return moe_error(MOE_ERR_IO, "data: cannot read '%s': %s", path, strerror(e));
    }
    size_t len = (size_t)sb.st_size;
    if (len == 0 || len < SHARD_HEADER_BYTES) {
        if (own)
            close(fd);
        if (len == 0)
            return moe_error(MOE_ERR_FORMAT, "data: '%s' is empty (0 bytes, not an llm.c token shard)", path);
        return moe_error(MOE_ERR_FORMAT, "data: '%s' is truncated: %zu bytes, shorter than the %d-byte shard header",
                         path, len, SHARD_HEADER_BYTES);
    }
    void *map = mmap(NULL, len, PROT_READ, MAP_PRIVATE, fd, 0);
    int map_errno = errno;
    if (own)
        close(fd);
    if (map == MAP_FAILED)
        return moe_error(MOE_ERR_IO, "data: cannot read '%s': mmap: %s", path, strerror(map_errno));
    mf->map = map;
    mf->len = len;

    const uint8_t *h = map;
    const char *slash = strrchr(path, '/');
    const char *base = slash ? slash + 1 : path;
    uint8_t size8[8];
    for (int i = 0; i < 8; i++)
        size8[i] = (uint8_t)((uint64_t)len >> (8 * i));
    *crc = crc_bytes(*crc, (const uint8_t *)base, strlen(base) + 1);
    *crc = crc_bytes(*crc, size8, sizeof size8);
    *crc = crc_bytes(*crc, h, SHARD_HEADER_BYTES);

    int32_t magic = le32(h), version = le32(h + 4), count = le32(h + 8);
    if (magic != MOE_SHARD_MAGIC)
        return moe_error(MOE_ERR_FORMAT, "data: '%s': bad magic %d (an llm.c token shard starts with %d)", path,
                         magic, MOE_SHARD_MAGIC);
    if (version != MOE_SHARD_VERSION)
        return moe_error(MOE_ERR_FORMAT, "data: '%s': unsupported shard version %d (expected %d: uint16 tokens)",
                         path, version, MOE_SHARD_VERSION);
    if (count <= 0)
        return moe_error(MOE_ERR_FORMAT, "data: '%s': header says %d tokens: the shard is empty", path, count);
    size_t want = SHARD_HEADER_BYTES + 2 * (size_t)count;
    if (len < want)
        return moe_error(MOE_ERR_FORMAT, "data: '%s' is truncated: the header says %d tokens but the file holds %zu",
                         path, count, (len - SHARD_HEADER_BYTES) / 2);
    if (len > want)
        return moe_error(MOE_ERR_FORMAT, "data: '%s': %zu trailing bytes after the %d tokens the header declares",
                         path, len - want, count);

    const uint16_t *tok = (const uint16_t *)(h + SHARD_HEADER_BYTES);
    for (int64_t i = 0; i < count; i++)
        if (tok[i] >= vocab)
            return moe_error(MOE_ERR_FORMAT, "data: '%s': token %u at index %lld is >= vocab %lld", path, tok[i],
                             (long long)i, (long long)vocab);
    *seg = (segment){tok, count};
    return MOE_OK;
}

/* llm.c names: fineweb_val_000000.bin, tiny_shakespeare_val.bin. */
static int is_val_name(const char *name)
{
    return strstr(name, "_val_") || strstr(name, "_val.");
}

static int bin_filter(const struct dirent *e)
{
    return e->d_name[0] != '.' && ends_with(e->d_name, ".bin");
}

static int by_name(const struct dirent **a, const struct dirent **b)
{
    return strcmp((*a)->d_name, (*b)->d_name);
}

/* Collects the shard paths of a directory, sorted; val shards flagged. */
static moe_status list_shards(const char *dir, char ***paths, int **is_val, int64_t *n)
{
    struct dirent **ents;
    int m = scandir(dir, &ents, bin_filter, by_name);
    if (m < 0)
        return moe_error(MOE_ERR_IO, "data: cannot read directory '%s': %s", dir, strerror(errno));
    if (m == 0) {
        free(ents);
        return moe_error(MOE_ERR_FORMAT, "data: directory '%s' holds no *.bin token shards", dir);
    }
    *paths = calloc((size_t)m, sizeof **paths);
    *is_val = calloc((size_t)m, sizeof **is_val);
    moe_status st = (*paths && *is_val) ? MOE_OK : moe_error(MOE_ERR_NOMEM, "data: out of memory");
    for (int i = 0; i < m; i++) {
        if (st == MOE_OK) {
            size_t len = strlen(dir) + strlen(ents[i]->d_name) + 2;
            (*paths)[i] = malloc(len);
            if ((*paths)[i]) {
                snprintf((*paths)[i], len, "%s/%s", dir, ents[i]->d_name);
                (*is_val)[i] = is_val_name(ents[i]->d_name) != 0;
            } else {
                st = moe_error(MOE_ERR_NOMEM, "data: out of memory");
            }
        }
        free(ents[i]);
    }
    free(ents);
    *n = m;
    return st;
}

moe_status moe_data_load_shards(moe_dataset *d, const char *path, int fd)
{
    const int is_dir = fd < 0;
    char **paths = NULL;
    int *is_val = NULL;
    int64_t n = 1;
    moe_status st;
    if (is_dir) {
        st = list_shards(path, &paths, &is_val, &n);
    } else {
        paths = calloc(1, sizeof *paths);
        is_val = calloc(1, sizeof *is_val);
        st = paths && is_val && (paths[0] = strdup(path)) ? MOE_OK : moe_error(MOE_ERR_NOMEM, "data: out of memory");
    }
    d->files = st == MOE_OK ? calloc((size_t)n, sizeof *d->files) : NULL;
    d->train = st == MOE_OK ? calloc((size_t)n, sizeof *d->train) : NULL;
    d->val = st == MOE_OK ? calloc((size_t)n, sizeof *d->val) : NULL;
    if (st == MOE_OK && (!d->files || !d->train || !d->val))
        st = moe_error(MOE_ERR_NOMEM, "data: out of memory");
    int64_t n_val_files = 0;
    uint32_t crc = 0;
    uint64_t size = 0;
    for (int64_t i = 0; st == MOE_OK && i < n; i++) {
        segment seg;
        d->files[i].path = paths[i];
        paths[i] = NULL;
        d->n_files = i + 1;
        st = map_shard(d->files[i].path, is_dir ? -1 : fd, d->vocab, &d->files[i], &seg, &crc);
        if (st != MOE_OK)
            break;
        size += d->files[i].len;
        if (is_val[i])
            d->val[d->n_val_seg++] = seg, n_val_files++;
        else
            d->train[d->n_train_seg++] = seg;
    }
    if (st == MOE_OK && d->n_train_seg == 0)
        st = moe_error(MOE_ERR_FORMAT, "data: directory '%s' holds only validation shards (*_val_*.bin), no training shards",
                       path);
    for (int64_t i = 0; paths && i < n; i++)
        free(paths[i]);
    free(paths);
    free(is_val);
    if (st == MOE_OK) {
        snprintf(d->desc, sizeof d->desc, "%s '%s' (%lld shard%s%s)", is_dir ? "shard directory" : "shard", path,
                 (long long)n, n == 1 ? "" : "s", n_val_files ? ", val by name" : "");
        snprintf(d->id.kind, sizeof d->id.kind, is_dir ? "shards" : "shard");
        set_id_path(d, path);
        d->id.size = size;
        d->id.crc32 = crc;
    }
    return st;
}
