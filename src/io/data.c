/*
 * Datasets: byte-level text (plain or gzip), llm.c token shards, directories of shards,
 * and the synthetic generator behind one interface (data.h).
 *
 * Every split is a list of segments — contiguous uint16 token runs that a row never
 * crosses (one per file, cut in two at the train/val boundary). Text is decoded into
 * memory (6 MB for the Brown Corpus); shards are mapped read-only, so a 10B-token
 * FineWeb set costs address space, not RAM. Opening validates everything once, so a
 * bad token can never surface in the middle of a run.
 */
#define _POSIX_C_SOURCE 200809L

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>
#include <zlib.h>

#include "io/data.h"

#define SHARD_HEADER_BYTES (MOE_SHARD_HEADER_INTS * 4)

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
    char desc[512];
};

void moe_data_options_default(moe_data_options *o)
{
    o->vocab = 0;
    o->val_fraction = 0.1;
}

static int host_is_little_endian(void)
{
    const uint16_t one = 1;
    return *(const uint8_t *)&one == 1;
}

static int32_t le32(const uint8_t *p)
{
    return (int32_t)((uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24);
}

static int ends_with(const char *s, const char *suffix)
{
    size_t n = strlen(s), m = strlen(suffix);
    return n >= m && strcmp(s + n - m, suffix) == 0;
}

/* ---- text ------------------------------------------------------------------ */

/* Reads the whole file (gunzipping when gz) into a malloc'd buffer. */
static moe_status read_plain(const char *path, uint8_t **out, int64_t *n)
{
    FILE *f = fopen(path, "rb");
    if (!f)
        return moe_error(MOE_ERR_IO, "data: cannot open '%s': %s", path, strerror(errno));
    size_t cap = 1 << 16, len = 0;
    uint8_t *buf = malloc(cap);
    moe_status st = MOE_OK;
    while (buf) {
        size_t got = fread(buf + len, 1, cap - len, f);
        len += got;
        if (got == 0) {
            if (ferror(f))
                st = moe_error(MOE_ERR_IO, "data: cannot read '%s': %s", path, strerror(errno));
            break;
        }
        if (len == cap) {
            uint8_t *nb = realloc(buf, cap *= 2);
            if (!nb)
                free(buf);
            buf = nb;
        }
    }
    fclose(f);
    if (!buf)
        return moe_error(MOE_ERR_NOMEM, "data: out of memory reading '%s'", path);
    if (st != MOE_OK) {
        free(buf);
        return st;
    }
    *out = buf;
    *n = (int64_t)len;
    return MOE_OK;
}

static moe_status read_gzip(const char *path, uint8_t **out, int64_t *n)
{
    gzFile g = gzopen(path, "rb");
    if (!g)
        return moe_error(MOE_ERR_IO, "data: cannot open '%s': %s", path, strerror(errno));
    size_t cap = 1 << 20, len = 0;
    uint8_t *buf = malloc(cap);
    moe_status st = MOE_OK;
    while (buf) {
        unsigned want = (unsigned)(cap - len > (1u << 30) ? (1u << 30) : cap - len);
        int got = gzread(g, buf + len, want);
        int err;
        const char *msg = gzerror(g, &err);
        if (got < 0 || (got == 0 && err == Z_BUF_ERROR)) {
            /* Z_BUF_ERROR at the end: the stream stopped before its trailer */
            st = moe_error(MOE_ERR_FORMAT, "data: '%s': corrupt or truncated gzip data (%s)", path,
                           err == Z_ERRNO ? strerror(errno) : msg);
            break;
        }
        if (got == 0)
            break;
        len += (size_t)got;
        if (len == cap) {
            uint8_t *nb = realloc(buf, cap *= 2);
            if (!nb)
                free(buf);
            buf = nb;
        }
    }
    gzclose(g);
    if (!buf)
        return moe_error(MOE_ERR_NOMEM, "data: out of memory reading '%s'", path);
    if (st != MOE_OK) {
        free(buf);
        return st;
    }
    *out = buf;
    *n = (int64_t)len;
    return MOE_OK;
}

static moe_status load_text(moe_dataset *d, const char *path, int gzip)
{
    uint8_t *bytes = NULL;
    int64_t n = 0;
    moe_status st = gzip ? read_gzip(path, &bytes, &n) : read_plain(path, &bytes, &n);
    if (st != MOE_OK)
        return st;
    if (n == 0) {
        free(bytes);
        return moe_error(MOE_ERR_FORMAT, "data: '%s' is empty (no text%s)", path, gzip ? " after gunzip" : "");
    }
    d->text = malloc((size_t)n * sizeof *d->text);
    if (!d->text) {
        free(bytes);
        return moe_error(MOE_ERR_NOMEM, "data: out of memory for %lld tokens of '%s'", (long long)n, path);
    }
    for (int64_t i = 0; i < n; i++) {
        if (bytes[i] >= d->vocab) {
            moe_status e = moe_error(MOE_ERR_FORMAT, "data: '%s': byte %u at offset %lld is >= vocab %lld", path,
                                     bytes[i], (long long)i, (long long)d->vocab);
            free(bytes);
            return e;
        }
        d->text[i] = bytes[i];
    }
    free(bytes);
    d->n_files = 0;
    d->train = malloc(sizeof *d->train);
    if (!d->train)
        return moe_error(MOE_ERR_NOMEM, "data: out of memory");
    d->train[0] = (segment){d->text, n};
    d->n_train_seg = 1;
    snprintf(d->desc, sizeof d->desc, "text '%s'%s", path, gzip ? " (gzip)" : "");
    return MOE_OK;
}

/* ---- shards ---------------------------------------------------------------- */

/* Maps one shard and checks its header, its size and every token. */
static moe_status map_shard(const char *path, int64_t vocab, mapped_file *mf, segment *seg)
{
    int fd = open(path, O_RDONLY);
    if (fd < 0)
        return moe_error(MOE_ERR_IO, "data: cannot open '%s': %s", path, strerror(errno));
    struct stat sb;
    if (fstat(fd, &sb) != 0 || !S_ISREG(sb.st_mode)) {
        int e = S_ISDIR(sb.st_mode) ? EISDIR : errno;
        close(fd);
        return moe_error(MOE_ERR_IO, "data: cannot read '%s': %s", path,
                         S_ISDIR(sb.st_mode) || e ? strerror(e) : "not a regular file");
    }
    size_t len = (size_t)sb.st_size;
    if (len == 0) {
        close(fd);
        return moe_error(MOE_ERR_FORMAT, "data: '%s' is empty (0 bytes, not an llm.c token shard)", path);
    }
    if (len < SHARD_HEADER_BYTES) {
        close(fd);
        return moe_error(MOE_ERR_FORMAT, "data: '%s' is truncated: %zu bytes, shorter than the %d-byte shard header",
                         path, len, SHARD_HEADER_BYTES);
    }
    void *map = mmap(NULL, len, PROT_READ, MAP_PRIVATE, fd, 0);
    int map_errno = errno;
    close(fd);
    if (map == MAP_FAILED)
        return moe_error(MOE_ERR_IO, "data: cannot read '%s': mmap: %s", path, strerror(map_errno));
    mf->map = map;
    mf->len = len;

    const uint8_t *h = map;
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

static moe_status load_shards(moe_dataset *d, const char *path, int is_dir)
{
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
    for (int64_t i = 0; st == MOE_OK && i < n; i++) {
        segment seg;
        d->files[i].path = paths[i];
        paths[i] = NULL;
        d->n_files = i + 1;
        st = map_shard(d->files[i].path, d->vocab, &d->files[i], &seg);
        if (st != MOE_OK)
            break;
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
    if (st == MOE_OK)
        snprintf(d->desc, sizeof d->desc, "%s '%s' (%lld shard%s%s)", is_dir ? "shard directory" : "shard", path,
                 (long long)n, n == 1 ? "" : "s", n_val_files ? ", val by name" : "");
    return st;
}

/* With no val shards, the last val_fraction of the tokens becomes validation. */
static moe_status split_tail(moe_dataset *d, double val_fraction)
{
    int64_t total = 0;
    for (int64_t i = 0; i < d->n_train_seg; i++)
        total += d->train[i].n;
    int64_t want = (int64_t)floor(val_fraction * (double)total + 0.5);
    if (!d->val) {
        d->val = calloc(d->n_train_seg > 0 ? (size_t)d->n_train_seg : 1, sizeof *d->val);
        if (!d->val)
            return moe_error(MOE_ERR_NOMEM, "data: out of memory");
    }
    /* walk back from the last segment, moving tokens to val */
    int64_t i = d->n_train_seg;
    int64_t nv = 0;
    while (want > 0 && i > 0) {
        segment *s = &d->train[i - 1];
        int64_t take = want < s->n ? want : s->n;
        d->val[nv++] = (segment){s->tok + (s->n - take), take};
        s->n -= take;
        want -= take;
        if (s->n == 0)
            i--;
        else
            break;
    }
    d->n_train_seg = i;
    /* val segments were collected last-first */
    for (int64_t a = 0, b = nv - 1; a < b; a++, b--) {
        segment t = d->val[a];
        d->val[a] = d->val[b];
        d->val[b] = t;
    }
    d->n_val_seg = nv;
    return MOE_OK;
}

static void count_tokens(moe_dataset *d)
{
    d->n_train = d->n_val = 0;
    for (int64_t i = 0; i < d->n_train_seg; i++)
        d->n_train += d->train[i].n;
    for (int64_t i = 0; i < d->n_val_seg; i++)
        d->n_val += d->val[i].n;
}

/* ---- open / free ------------------------------------------------------------- */

static moe_status open_synth_spec(const char *path, const moe_data_options *o, moe_dataset **out)
{
    moe_synth_config c;
    moe_synth_config_default(&c);
    c.vocab = 0; /* 0 = not in the spec */
    if (path[5] == ':') {
        moe_status st = moe_synth_config_parse(path + 6, &c);
        if (st != MOE_OK)
            return st;
    } else if (path[5] != '\0') {
        return moe_error(MOE_ERR_ARG, "data: '%s': write synth or synth:tasks=N,vocab=V,seed=S,val=N", path);
    }
    if (c.vocab == 0)
        c.vocab = o->vocab > 0 ? o->vocab : 32;
    else if (o->vocab > 0 && c.vocab > o->vocab)
        return moe_error(MOE_ERR_ARG, "data: '%s': synth vocab %lld is larger than the model's vocab %lld", path,
                         (long long)c.vocab, (long long)o->vocab);
    return moe_dataset_open_synth(&c, out);
}

moe_status moe_dataset_open(const char *path, const moe_data_options *opt, moe_dataset **out)
{
    moe_data_options o;
    if (opt)
        o = *opt;
    else
        moe_data_options_default(&o);
    if (!out)
        return moe_error(MOE_ERR_ARG, "data: out is NULL");
    *out = NULL;
    if (!path || !*path)
        return moe_error(MOE_ERR_ARG, "data: no path given");
    if (!(o.val_fraction >= 0 && o.val_fraction < 1))
        return moe_error(MOE_ERR_ARG, "data: '%s': val_fraction %g is not in [0, 1)", path, o.val_fraction);
    if (o.vocab < 0 || o.vocab > 65536)
        return moe_error(MOE_ERR_ARG, "data: '%s': vocab %lld is not in [1, 65536] (0 = from the data)", path,
                         (long long)o.vocab);
    if (strncmp(path, "synth", 5) == 0 && (path[5] == '\0' || path[5] == ':'))
        return open_synth_spec(path, &o, out);
    if (!host_is_little_endian())
        return moe_error(MOE_ERR_UNSUPPORTED, "data: '%s': datasets need a little-endian host", path);

    struct stat sb;
    if (stat(path, &sb) != 0)
        return moe_error(MOE_ERR_IO, "data: cannot open '%s': %s", path, strerror(errno));

    /* tell text, gzip text and shards apart by their first bytes */
    uint8_t head[4] = {0};
    int is_dir = S_ISDIR(sb.st_mode), shard = is_dir;
    if (!is_dir) {
        FILE *f = fopen(path, "rb");
        if (!f)
            return moe_error(MOE_ERR_IO, "data: cannot open '%s': %s", path, strerror(errno));
        size_t got = fread(head, 1, 4, f);
        int bad = ferror(f);
        fclose(f);
        if (bad)
            return moe_error(MOE_ERR_IO, "data: cannot read '%s': %s", path, strerror(errno));
        if (got == 0)
            return moe_error(MOE_ERR_FORMAT, "data: '%s' is empty (0 bytes)", path);
        shard = ends_with(path, ".bin") || (got == 4 && le32(head) == MOE_SHARD_MAGIC);
    }
    int gzip = !shard && head[0] == 0x1f && head[1] == 0x8b;

    moe_dataset *d = calloc(1, sizeof *d);
    if (!d)
        return moe_error(MOE_ERR_NOMEM, "data: out of memory");
    d->kind = shard ? MOE_DATA_SHARDS : MOE_DATA_TEXT;
    d->vocab = o.vocab > 0 ? o.vocab : shard ? MOE_GPT2_VOCAB : 256;
    moe_status st = shard ? load_shards(d, path, is_dir) : load_text(d, path, gzip);
    if (st == MOE_OK && d->n_val_seg == 0)
        st = split_tail(d, o.val_fraction);
    if (st != MOE_OK) {
        moe_dataset_free(d);
        return st;
    }
    count_tokens(d);
    size_t k = strlen(d->desc);
    snprintf(d->desc + k, sizeof d->desc - k, ": %lld train + %lld val tokens, vocab %lld", (long long)d->n_train,
             (long long)d->n_val, (long long)d->vocab);
    *out = d;
    return MOE_OK;
}

moe_status moe_dataset_open_synth(const moe_synth_config *c, moe_dataset **out)
{
    if (!out || !c)
        return moe_error(MOE_ERR_ARG, "data: synth config or out is NULL");
    *out = NULL;
    moe_status st = moe_synth_config_validate(c);
    if (st != MOE_OK)
        return st;
    moe_dataset *d = calloc(1, sizeof *d);
    if (!d)
        return moe_error(MOE_ERR_NOMEM, "data: out of memory");
    d->kind = MOE_DATA_SYNTH;
    d->synth = *c;
    d->vocab = c->vocab;
    snprintf(d->desc, sizeof d->desc, "synth: %lld tasks, vocab %lld, seed %llu, %lld val sequences",
             (long long)c->n_tasks, (long long)c->vocab, (unsigned long long)c->seed, (long long)c->n_val);
    *out = d;
    return MOE_OK;
}

void moe_dataset_free(moe_dataset *d)
{
    if (!d)
        return;
    for (int64_t i = 0; i < d->n_files; i++) {
        if (d->files[i].map)
            munmap(d->files[i].map, d->files[i].len);
        free(d->files[i].path);
    }
    free(d->files);
    free(d->text);
    free(d->train);
    free(d->val);
    free(d);
}

moe_data_kind moe_dataset_kind(const moe_dataset *d) { return d->kind; }
int64_t moe_dataset_vocab(const moe_dataset *d) { return d->vocab; }
int64_t moe_dataset_train_tokens(const moe_dataset *d) { return d->n_train; }
int64_t moe_dataset_val_tokens(const moe_dataset *d) { return d->n_val; }
int64_t moe_dataset_n_tasks(const moe_dataset *d) { return d->kind == MOE_DATA_SYNTH ? d->synth.n_tasks : 1; }
const char *moe_dataset_describe(const moe_dataset *d) { return d->desc; }

/* ---- batches ------------------------------------------------------------------ */

static moe_status check_batch_args(const moe_dataset *d, int64_t B, int64_t S, const int32_t *inputs,
                                   const int32_t *targets)
{
    if (!d || !inputs || !targets)
        return moe_error(MOE_ERR_ARG, "data: dataset, inputs or targets is NULL");
    if (B <= 0 || B > UINT32_MAX)
        return moe_error(MOE_ERR_ARG, "data: batch %lld is not in [1, 2^32)", (long long)B);
    if (S <= 0 || S > INT32_MAX)
        return moe_error(MOE_ERR_ARG, "data: seq %lld is not in [1, 2^31)", (long long)S);
    return MOE_OK;
}

static void fill_row(const uint16_t *tok, int64_t k, int64_t S, int32_t *in, int32_t *tg, int32_t *task,
                     int32_t task_id)
{
    for (int64_t s = 0; s < k; s++) {
        in[s] = tok[s];
        tg[s] = tok[s + 1];
    }
    for (int64_t s = k; s < S; s++) {
        in[s] = 0;
        tg[s] = -1;
    }
    if (task)
        for (int64_t s = 0; s < S; s++)
            task[s] = s < k ? task_id : 0;
}

static void synth_row(const moe_synth_config *c, uint64_t index, int64_t S, int32_t *in, int32_t *tg,
                      int32_t *task)
{
    /* S+1 tokens without scratch: the first S in in[], the last continues the chain */
    moe_synth_sequence(c, index, S, in, task);
    for (int64_t s = 0; s + 1 < S; s++)
        tg[s] = in[s + 1];
    tg[S - 1] = moe_synth_next(c, index, S, in[S - 1]);
}

moe_status moe_dataset_batch(const moe_dataset *d, uint64_t seed, int64_t step, int64_t micro, int64_t B,
                             int64_t S, int32_t *inputs, int32_t *targets, int32_t *task_ids)
{
    moe_status st = check_batch_args(d, B, S, inputs, targets);
    if (st != MOE_OK)
        return st;
    if (step < 0 || step > UINT32_MAX || micro < 0 || micro > UINT32_MAX)
        return moe_error(MOE_ERR_ARG, "data: step %lld or micro-batch %lld is not in [0, 2^32)", (long long)step,
                         (long long)micro);
    const uint32_t key[2] = {(uint32_t)seed, (uint32_t)(seed >> 32)};
    if (d->kind == MOE_DATA_SYNTH) {
        for (int64_t b = 0; b < B; b++) {
            uint32_t ctr[4] = {(uint32_t)b, (uint32_t)micro, (uint32_t)step, MOE_RNG_DATA}, o[4];
            moe_philox4x32_10(ctr, key, o);
            uint64_t index = ((uint64_t)o[0] | (uint64_t)o[1] << 32) >> 1; /* < 2^63: training */
            synth_row(&d->synth, index, S, inputs + b * S, targets + b * S, task_ids ? task_ids + b * S : NULL);
        }
        return MOE_OK;
    }
    /* number of row starts: S+1 tokens inside one segment */
    int64_t starts = 0;
    for (int64_t i = 0; i < d->n_train_seg; i++)
        starts += d->train[i].n > S ? d->train[i].n - S : 0;
    if (starts == 0)
        return moe_error(MOE_ERR_ARG, "data: the training split (%lld tokens) has no run of seq+1 = %lld tokens in one file",
                         (long long)d->n_train, (long long)S + 1);
    for (int64_t b = 0; b < B; b++) {
        double u = moe_rand_uniform(seed, MOE_RNG_DATA, (uint32_t)step, (uint32_t)b, (uint32_t)micro);
        int64_t p = (int64_t)(u * (double)starts);
        if (p >= starts)
            p = starts - 1;
        int64_t i = 0;
        for (;; i++) {
            int64_t k = d->train[i].n > S ? d->train[i].n - S : 0;
            if (p < k)
                break;
            p -= k;
        }
        fill_row(d->train[i].tok + p, S, S, inputs + b * S, targets + b * S, task_ids ? task_ids + b * S : NULL, 0);
    }
    return MOE_OK;
}

void moe_val_iter_init(moe_val_iter *it)
{
    it->seg = 0;
    it->pos = 0;
}

moe_status moe_dataset_val_next(const moe_dataset *d, moe_val_iter *it, int64_t B, int64_t S, int32_t *inputs,
                                int32_t *targets, int32_t *task_ids, int64_t *n_tokens)
{
    moe_status st = check_batch_args(d, B, S, inputs, targets);
    if (st != MOE_OK)
        return st;
    if (!it || !n_tokens)
        return moe_error(MOE_ERR_ARG, "data: val iterator or n_tokens is NULL");
    int64_t n = 0;
    for (int64_t b = 0; b < B; b++) {
        int32_t *in = inputs + b * S, *tg = targets + b * S, *task = task_ids ? task_ids + b * S : NULL;
        if (d->kind == MOE_DATA_SYNTH) {
            if (it->pos < d->synth.n_val) {
                synth_row(&d->synth, (1ull << 63) + (uint64_t)it->pos++, S, in, tg, task);
                n += S;
            } else {
                fill_row(NULL, 0, S, in, tg, task, 0);
            }
            continue;
        }
        /* skip segments with nothing left to predict */
        while (it->seg < d->n_val_seg && d->val[it->seg].n - 1 - it->pos <= 0) {
            it->seg++;
            it->pos = 0;
        }
        if (it->seg >= d->n_val_seg) {
            fill_row(NULL, 0, S, in, tg, task, 0);
            continue;
        }
        const segment *g = &d->val[it->seg];
        int64_t k = g->n - 1 - it->pos;
        if (k > S)
            k = S;
        fill_row(g->tok + it->pos, k, S, in, tg, task, 0);
        it->pos += k;
        n += k;
    }
    *n_tokens = n;
    return MOE_OK;
}

/* ---- writing shards ------------------------------------------------------------ */

moe_status moe_shard_write(const char *path, const int32_t *tokens, int64_t n)
{
    if (!path || (!tokens && n > 0))
        return moe_error(MOE_ERR_ARG, "data: shard path or tokens is NULL");
    if (n < 0 || n > INT32_MAX)
        return moe_error(MOE_ERR_ARG, "data: shard token count %lld is not in [0, 2^31)", (long long)n);
    for (int64_t i = 0; i < n; i++)
        if (tokens[i] < 0 || tokens[i] > 65535)
            return moe_error(MOE_ERR_ARG, "data: token %d at index %lld does not fit a uint16 shard", tokens[i],
                             (long long)i);
    FILE *f = fopen(path, "wb");
    if (!f)
        return moe_error(MOE_ERR_IO, "data: cannot create '%s': %s", path, strerror(errno));
    uint8_t header[SHARD_HEADER_BYTES] = {0};
    const int32_t h[3] = {MOE_SHARD_MAGIC, MOE_SHARD_VERSION, (int32_t)n};
    for (int i = 0; i < 3; i++)
        for (int b = 0; b < 4; b++)
            header[4 * i + b] = (uint8_t)((uint32_t)h[i] >> (8 * b));
    int ok = fwrite(header, 1, sizeof header, f) == sizeof header;
    uint8_t buf[8192];
    for (int64_t i = 0; ok && i < n;) {
        size_t m = 0;
        for (; m < sizeof buf && i < n; i++, m += 2) {
            buf[m] = (uint8_t)(tokens[i] & 0xff);
            buf[m + 1] = (uint8_t)(tokens[i] >> 8);
        }
        ok = fwrite(buf, 1, m, f) == m;
    }
    int e = errno;
    if (fclose(f) != 0 && ok) {
        ok = 0;
        e = errno;
    }
    if (!ok)
        return moe_error(MOE_ERR_IO, "data: cannot write '%s': %s", path, strerror(e));
    return MOE_OK;
}
