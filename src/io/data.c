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

#include <errno.h>
#include <limits.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "core/durable.h"
#include "core/input.h"
#include "io/data_impl.h"

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

    /* one open, never blocking (a FIFO waits in poll for its writer, not in open); a
     * directory is the only thing looked at by name */
    struct stat sb;
    if (stat(path, &sb) != 0)
        return moe_error(MOE_ERR_IO, "data: cannot open '%s': %s", path, strerror(errno));
    int fd = -1;
    uint8_t head[4] = {0};
    const int is_dir = S_ISDIR(sb.st_mode);
    int shard = is_dir;
    if (!is_dir) {
        moe_status st = moe_input_open(path, "data", MOE_IN_STREAM, &fd, &sb);
        if (st != MOE_OK)
            return moe_error(st, "data: %s", moe_last_error());
        if (S_ISREG(sb.st_mode)) { /* sniffed in place; a stream is sniffed from what is read */
            ssize_t got = pread(fd, head, 4, 0);
            if (got < 0) {
                int e = errno;
                close(fd);
                return moe_error(MOE_ERR_IO, "data: cannot read '%s': %s", path, strerror(e));
            }
            if (got == 0) {
                close(fd);
                return moe_error(MOE_ERR_FORMAT, "data: '%s' is empty (0 bytes)", path);
            }
            shard = ends_with(path, ".bin") || (got == 4 && le32(head) == MOE_SHARD_MAGIC);
        } else if (S_ISCHR(sb.st_mode) && !isatty(fd)) {
            /* /dev/zero, /dev/urandom: endless, never a corpus (a terminal is read to EOF) */
            close(fd);
            return moe_error(MOE_ERR_IO, "data: '%s' is a character device; cmoe reads text from a file, a pipe, a "
                             "FIFO or a terminal", path);
        } else if (ends_with(path, ".bin")) {
            close(fd);
            return moe_error(MOE_ERR_IO, "data: '%s' is a %s; a token shard is mapped, so it must be a regular file",
                             path, moe_file_kind(sb.st_mode));
        }
    }

    moe_dataset *d = calloc(1, sizeof *d);
    if (!d) {
        if (fd >= 0)
            close(fd);
        return moe_error(MOE_ERR_NOMEM, "data: out of memory");
    }
    d->kind = shard ? MOE_DATA_SHARDS : MOE_DATA_TEXT;
    d->vocab = o.vocab > 0 ? o.vocab : shard ? MOE_GPT2_VOCAB : 256;
    moe_status st = shard ? moe_data_load_shards(d, path, fd) : moe_data_load_text(d, path, fd, &sb);
    if (fd >= 0)
        close(fd);
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
    snprintf(d->id.kind, sizeof d->id.kind, "synth");
    snprintf(d->id.path, sizeof d->id.path, "synth:tasks=%lld,vocab=%lld,seed=%llu,val=%lld", (long long)c->n_tasks,
             (long long)c->vocab, (unsigned long long)c->seed, (long long)c->n_val);
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
const moe_data_identity *moe_dataset_identity(const moe_dataset *d) { return &d->id; }

int moe_data_identity_differs(const moe_data_identity *a, const moe_data_identity *b, char *buf, size_t n)
{
    int k = 0;
    buf[0] = '\0';
#define SAY(...) (k += snprintf(buf + k, (size_t)k < n ? n - (size_t)k : 0, __VA_ARGS__))
    if (strcmp(a->kind, b->kind)) {
        SAY("%s '%s' -> %s '%s'", a->kind, a->path, b->kind, b->path);
        return 1;
    }
    if (!strcmp(a->kind, "synth")) {
        if (!strcmp(a->path, b->path))
            return 0;
        SAY("%s -> %s", a->path, b->path);
        return 1;
    }
    if (a->size == b->size && a->crc32 == b->crc32)
        return 0;
    if (a->size != b->size)
        SAY("size %llu -> %llu bytes", (unsigned long long)a->size, (unsigned long long)b->size);
    if (a->crc32 != b->crc32)
        SAY("%sCRC-32 %08lx -> %08lx", k ? ", " : "", (unsigned long)a->crc32, (unsigned long)b->crc32);
    if (strcmp(a->path, b->path))
        SAY(" (path %s -> %s)", a->path, b->path);
    else
        SAY(" (%s)", a->path);
#undef SAY
    return 1;
}

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
    return moe_dataset_batch_rows(d, seed, step, micro, 0, B, S, inputs, targets, task_ids);
}

moe_status moe_dataset_batch_rows(const moe_dataset *d, uint64_t seed, int64_t step, int64_t micro, int64_t row0,
                                  int64_t B, int64_t S, int32_t *inputs, int32_t *targets, int32_t *task_ids)
{
    moe_status st = check_batch_args(d, B, S, inputs, targets);
    if (st != MOE_OK)
        return st;
    if (step < 0 || step > UINT32_MAX || micro < 0 || micro > UINT32_MAX)
        return moe_error(MOE_ERR_ARG, "data: step %lld or micro-batch %lld is not in [0, 2^32)", (long long)step,
                         (long long)micro);
    if (row0 < 0 || row0 + B > UINT32_MAX)
        return moe_error(MOE_ERR_ARG, "data: rows %lld..%lld are not in [0, 2^32)", (long long)row0,
                         (long long)(row0 + B));
    const uint32_t key[2] = {(uint32_t)seed, (uint32_t)(seed >> 32)};
    if (d->kind == MOE_DATA_SYNTH) {
        for (int64_t b = 0; b < B; b++) {
            uint32_t ctr[4] = {(uint32_t)(row0 + b), (uint32_t)micro, (uint32_t)step, MOE_RNG_DATA}, o[4];
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
        double u = moe_rand_uniform(seed, MOE_RNG_DATA, (uint32_t)step, (uint32_t)(row0 + b), (uint32_t)micro);
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
    moe_durable *w;
    moe_status s = moe_durable_open(path, &w);
    if (s)
        return moe_error(s, "data: %s", moe_last_error());
    FILE *f = moe_durable_file(w);
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
    if (!ok) {
        s = moe_error(MOE_ERR_IO, "data: cannot write '%s': %s", path, strerror(errno));
        moe_durable_abort(w);
        return s;
    }
    if ((s = moe_durable_commit(w)))
        return moe_error(s, "data: %s", moe_last_error());
    return MOE_OK;
}
