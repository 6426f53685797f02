/*
 * data.h — datasets for training and evaluation: byte-level text, llm.c token shards,
 * and a synthetic multi-task generator.
 *
 *     moe_data_options o;
 *     moe_data_options_default(&o);                   // vocab from the data, val 10%
 *     moe_dataset *d;
 *     if (moe_dataset_open("datasets/brown/brown.txt.gz", &o, &d) != MOE_OK)
 *         fprintf(stderr, "cmoe: %s\n", moe_last_error());
 *     int32_t in[B * S], tg[B * S];
 *     moe_dataset_batch(d, seed, step, micro, B, S, in, tg, NULL);   // training
 *     moe_val_iter it;
 *     moe_val_iter_init(&it);
 *     int64_t n;
 *     while (moe_dataset_val_next(d, &it, B, S, in, tg, NULL, &n) == MOE_OK && n > 0)
 *         ... loss over the targets that are not -1 ...
 *     moe_dataset_free(d);
 *
 * What moe_dataset_open accepts (PATH):
 *  - a text file, plain or gzip (told apart by the gzip magic 1f 8b): byte-level, each
 *    byte is a token, vocabulary 256. Also a stream (a pipe, /dev/stdin, a named FIFO),
 *    opened once and read once: the magic is sniffed from the bytes read, none is lost.
 *    Text is decoded into memory, at most MOE_TEXT_MAX bytes before and after gunzip (a
 *    larger file, or a stream that gives more, is refused). gzip members may be
 *    concatenated; bytes after the last member that are not zeros are refused.
 *  - an llm.c token shard (a name ending in ".bin", or any file starting with the magic):
 *    a header of 256 little-endian int32 — [0] magic 20240520, [1] version 1, [2] number
 *    of tokens — then that many uint16 tokens and nothing else. Shards are mapped
 *    read-only (not copied), so multi-GB shard sets do not need the RAM; so a shard must
 *    be a regular file (a stream holding one is refused with a message).
 *  - a directory: its *.bin shards, sorted by name (strcmp). llm.c's names say the split:
 *    a name containing "_val_" or "_val." is validation, every other shard is training.
 *  - "synth" or "synth:tasks=4,vocab=32,seed=1,val=64": the synthetic generator below.
 * Without validation shards, the last val_fraction of the tokens (of the last file(s))
 * is the validation split. Every header and every token id (< vocab) is checked when
 * the dataset is opened; errors name the file and the problem.
 *
 * Batches are B rows of S+1 consecutive tokens (inputs = the first S, targets = the
 * last S), never crossing a file boundary. The start of row b of micro-batch `micro` of
 * `step` is a pure function of (seed, step, micro, b) — Philox stream MOE_RNG_DATA —
 * so a run resumed at step k sees the batches it would have seen, with no data state
 * to save. Positions are drawn uniformly with replacement from the training split.
 */
#ifndef CMOE_DATA_H
#define CMOE_DATA_H

#include "cmoe.h"

/* llm.c's shard header (dev/data/data_common.py). */
#define MOE_SHARD_MAGIC 20240520
#define MOE_SHARD_VERSION 1
#define MOE_SHARD_HEADER_INTS 256
#define MOE_GPT2_VOCAB 50257

typedef enum { MOE_DATA_TEXT, MOE_DATA_SHARDS, MOE_DATA_SYNTH } moe_data_kind;

/* Text is held in memory: at most this many bytes, compressed or not (1 GiB). */
#define MOE_TEXT_MAX ((size_t)1 << 30)

/*
 * What a dataset is, whatever the spelling of its path: a resumed run checks that it
 * trains on the same data by this, not by the string typed (relative or absolute, moved).
 *  - text: the file's bytes as stored (gzip or not): their number and their CRC-32 (zlib).
 *  - shards: each shard's name, size and 1024-byte header, in order, under one CRC-32, and
 *    the sum of their sizes: cheap for a directory of many GB (the tokens are validated when
 *    opened anyway; a shard rewritten with the same token count and header but other tokens
 *    is not noticed).
 *  - synth: its full spec (every parameter), in path.
 */
typedef struct {
    char kind[16];   /* "text", "shard", "shards", "synth" */
    char path[4096]; /* resolved (realpath) for files and directories, as given for a stream */
    uint64_t size;
    uint32_t crc32;
} moe_data_identity;

typedef struct {
    int64_t vocab;       /* token ids must be < vocab; 0: 256 for text, 50257 (GPT-2)
                          * for shards, the generator's own for synth */
    double val_fraction; /* [0, 1): share of tokens held out when there are no val
                          * shards (default 0.1) */
} moe_data_options;

void moe_data_options_default(moe_data_options *o);

typedef struct moe_dataset moe_dataset;

/* Opens PATH (see the top of this file); opt NULL means defaults. MOE_ERR_IO when a
 * path is missing or cannot be read, MOE_ERR_FORMAT when its contents are wrong,
 * MOE_ERR_ARG for bad options. */
moe_status moe_dataset_open(const char *path, const moe_data_options *opt, moe_dataset **out);
void moe_dataset_free(moe_dataset *d);

moe_data_kind moe_dataset_kind(const moe_dataset *d);
int64_t moe_dataset_vocab(const moe_dataset *d);
/* Tokens in the training / validation split; synth: 0 for both (train is unbounded and
 * val holds n_val sequences whose length is the caller's S+1). */
int64_t moe_dataset_train_tokens(const moe_dataset *d);
int64_t moe_dataset_val_tokens(const moe_dataset *d);
/* Task ids in [0, n_tasks) on every token; 1 for text and shards (task 0 everywhere). */
int64_t moe_dataset_n_tasks(const moe_dataset *d);
/* One line for the log, e.g. "text 'x.txt.gz' (gzip): 5369112 train + 596568 val tokens, vocab 256". */
const char *moe_dataset_describe(const moe_dataset *d);
const moe_data_identity *moe_dataset_identity(const moe_dataset *d);
/* 0 when a and b are the same data (kind, size and checksum; synth: the spec), whatever
 * their paths; else 1, and buf [n] says what differs, e.g. "size 1200 -> 1300 bytes,
 * CRC-32 0a1b2c3d -> 4e5f6a7b (path /a/x.txt -> /b/x.txt)". */
int moe_data_identity_differs(const moe_data_identity *a, const moe_data_identity *b, char *buf, size_t n);

/*
 * A training micro-batch: inputs [B, S], targets [B, S] (targets[b][s] = the token after
 * inputs[b][s]), task_ids [B, S] (NULL: not wanted). Deterministic in (seed, step, micro, b);
 * the dataset is only read, so threads may share it. MOE_ERR_ARG when the training split
 * has no run of S+1 tokens inside one file.
 */
moe_status moe_dataset_batch(const moe_dataset *d, uint64_t seed, int64_t step, int64_t micro, int64_t B,
                             int64_t S, int32_t *inputs /* [B, S] */, int32_t *targets /* [B, S] */,
                             int32_t *task_ids /* [B, S] or NULL */);

/* Rows row0 .. row0 + B - 1 of that micro-batch (each keyed by its global row): a rank
 * reads its own rows of a global batch, which is the same batch in any layout. */
moe_status moe_dataset_batch_rows(const moe_dataset *d, uint64_t seed, int64_t step, int64_t micro, int64_t row0,
                                  int64_t B, int64_t S, int32_t *inputs /* [B, S] */, int32_t *targets /* [B, S] */,
                                  int32_t *task_ids /* [B, S] or NULL */);

/* Walks the validation split in order; a plain value, copy it to restart from a point. */
typedef struct {
    int64_t seg; /* file segment (synth: unused) */
    int64_t pos; /* token offset in it (synth: next sequence) */
} moe_val_iter;

void moe_val_iter_init(moe_val_iter *it);

/*
 * The next B rows of the validation split. Text and shards: row r holds tokens
 * [p, p+S] of one file segment, p advancing by S, so every validation token but each
 * segment's first is a target exactly once. The last row of a segment may be short and
 * the last batch may have fewer rows: padding has input 0, target -1 (ignore) and task 0.
 * Synth: row r is validation sequence r (n_val of them, all full). *n_tokens = the number
 * of targets that are not -1; 0 when the split is exhausted.
 */
moe_status moe_dataset_val_next(const moe_dataset *d, moe_val_iter *it, int64_t B, int64_t S,
                                int32_t *inputs /* [B, S] */, int32_t *targets /* [B, S] */,
                                int32_t *task_ids /* [B, S] or NULL */, int64_t *n_tokens);

/* Writes an llm.c shard (header + uint16 tokens, every one < 65536) to path, through
 * moe_durable_open (core/durable.h): all or nothing. */
moe_status moe_shard_write(const char *path, const int32_t *tokens /* [n] */, int64_t n);

/* ---- the synthetic multi-task generator --------------------------------------
 *
 * n_tasks deterministic "languages" over tokens [0, vocab). Sequence `index` belongs
 * to task m = index mod n_tasks (every token of it carries task id m); its first token
 * is uniform. Then, for task m:
 *  - m even, "counting": x[t+1] = (x[t] + stride_m) mod vocab with stride_m = m + 1
 *    (1, 3, 5, ...: odd, so with a power-of-two vocab the walk visits every token).
 *    Deterministic: entropy 0 once the task is known.
 *  - m odd, "sparse Markov chain": each token v has two successors a = A_m(v) and
 *    b = B_m(v) ≠ a, drawn once from Philox(seed) per (m, v); x[t+1] = a with
 *    probability 3/4, b with 1/4. Entropy H(3/4, 1/4) = 0.562 nats per token.
 * A model that infers the task from the context reaches on average 0.28 nats per
 * token (plus ln(vocab)/S for the first one) against ln(vocab) = 3.47 for vocab 32;
 * a bigram model that ignores the task mixes the n_tasks successor sets. The same
 * token means different things in different tasks, so the router has a reason to
 * send tasks to different experts, which the MI loss rewards.
 * Everything is a pure function of (seed, index, t): no tables, no state.
 */
typedef struct {
    int64_t n_tasks; /* default 4 */
    int64_t vocab;   /* default 32; at least 2·n_tasks and 4, at most 65536 */
    uint64_t seed;   /* the languages and the sequences (default 1) */
    int64_t n_val;   /* validation sequences (default 64) */
} moe_synth_config;

void moe_synth_config_default(moe_synth_config *c);
moe_status moe_synth_config_validate(const moe_synth_config *c);
/* Parses "tasks=4,vocab=32,seed=1,val=64" (any subset, any order) over c's values. */
moe_status moe_synth_config_parse(const char *spec, moe_synth_config *c);
int32_t moe_synth_task(const moe_synth_config *c, uint64_t index);
/* Sequence `index`: len tokens and the task id of each (task_ids may be NULL). */
moe_status moe_synth_sequence(const moe_synth_config *c, uint64_t index, int64_t len,
                              int32_t *tokens /* [len] */, int32_t *task_ids /* [len] or NULL */);
/* Token t >= 1 of sequence `index`, given token t-1 (the chain's step). */
int32_t moe_synth_next(const moe_synth_config *c, uint64_t index, int64_t t, int32_t prev);
/* Opens the generator as a dataset: training rows are sequences drawn by Philox from
 * (seed, step, micro, b); validation rows are sequences 2^63 + r, r < n_val. */
moe_status moe_dataset_open_synth(const moe_synth_config *c, moe_dataset **out);

#endif
