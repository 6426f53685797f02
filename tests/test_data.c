/* Datasets: text (plain and gzip), llm.c shards, directories, every bad-data case,
 * deterministic batches, the validation walk, the synthetic generator, the Brown Corpus.
 * Files are written by the tests into a fresh directory under $TMPDIR (or /tmp). */
#define _XOPEN_SOURCE 700

#include <errno.h>
#include <ftw.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>
#include <zlib.h>

#include "testutil.h"
#include "io/data.h"

/* ---- helpers ---------------------------------------------------------------- */

static char tmpdir[512];

static int rm_one(const char *p, const struct stat *sb, int flag, struct FTW *f)
{
    (void)sb; (void)flag; (void)f;
    return remove(p);
}

static void setup_tmp(void)
{
    const char *base = getenv("TMPDIR");
    snprintf(tmpdir, sizeof tmpdir, "%s/cmoe-data-XXXXXX", base && *base ? base : "/tmp");
    ck_assert_ptr_nonnull(mkdtemp(tmpdir));
}

static void teardown_tmp(void)
{
    nftw(tmpdir, rm_one, 16, FTW_DEPTH | FTW_PHYS);
}

static const char *tpath(const char *name)
{
    static char buf[4][768];
    static int k;
    k = (k + 1) % 4;
    snprintf(buf[k], sizeof buf[k], "%s/%s", tmpdir, name);
    return buf[k];
}

static void write_bytes(const char *path, const void *p, size_t n)
{
    FILE *f = fopen(path, "wb");
    ck_assert_ptr_nonnull(f);
    ck_assert_uint_eq(fwrite(p, 1, n, f), n);
    ck_assert_int_eq(fclose(f), 0);
}

static void write_gzip(const char *path, const void *p, size_t n)
{
    gzFile g = gzopen(path, "wb");
    ck_assert_ptr_nonnull(g);
    if (n)
        ck_assert_int_eq(gzwrite(g, p, (unsigned)n), (int)n);
    ck_assert_int_eq(gzclose(g), Z_OK);
}

/* A raw shard with a chosen header: tokens[n_written] after the header. */
static void write_raw_shard(const char *path, int32_t magic, int32_t version, int32_t count, const uint16_t *tok,
                            size_t n_written)
{
    int32_t header[256] = {0};
    header[0] = magic;
    header[1] = version;
    header[2] = count;
    FILE *f = fopen(path, "wb");
    ck_assert_ptr_nonnull(f);
    ck_assert_uint_eq(fwrite(header, 4, 256, f), 256); /* the test host is little-endian */
    if (n_written)
        ck_assert_uint_eq(fwrite(tok, 2, n_written, f), n_written);
    ck_assert_int_eq(fclose(f), 0);
}

/* Text whose bytes are all printable and varied. */
static char *make_text(size_t n)
{
    char *t = malloc(n);
    ck_assert_ptr_nonnull(t);
    const char *words[] = {"the ", "cat ", "sat ", "on ", "a ", "mat. ", "Experts ", "route\n"};
    size_t k = 0, w = 0;
    while (k < n) {
        const char *s = words[(w * 7 + w / 3) % 8];
        for (; *s && k < n; s++)
            t[k++] = *s;
        w++;
    }
    return t;
}

/* Opens expecting failure with status st and a message holding every needle. */
static void expect_fail(const char *path, const moe_data_options *o, moe_status st, const char *needle)
{
    moe_dataset *d = (moe_dataset *)0x1;
    moe_status got = moe_dataset_open(path, o, &d);
    const char *msg = moe_last_error();
    ck_assert_msg(got == st, "%s: status %d (%s), expected %d", path, got, msg, st);
    ck_assert_ptr_null(d);
    ck_assert_msg(strstr(msg, needle), "'%s' lacks '%s'", msg, needle);
    /* the message names the file (for synth/arg errors the spec) */
    const char *base = strrchr(path, '/');
    ck_assert_msg(strstr(msg, base ? base + 1 : path), "'%s' does not name '%s'", msg, path);
}

static moe_dataset *open_ok(const char *path, const moe_data_options *o)
{
    moe_dataset *d = NULL;
    moe_status st = moe_dataset_open(path, o, &d);
    ck_assert_msg(st == MOE_OK, "%s: %s", path, moe_last_error());
    ck_assert_ptr_nonnull(d);
    return d;
}

/* ---- text -------------------------------------------------------------------- */

START_TEST(test_text_plain_and_gzip_identical)
{
    setup_tmp();
    const size_t n = 5000;
    char *t = make_text(n);
    write_bytes(tpath("a.txt"), t, n);
    write_gzip(tpath("a.txt.gz"), t, n);
    write_gzip(tpath("b.txt"), t, n); /* gzip is found by its magic, not its name */
    moe_data_options o;
    moe_data_options_default(&o);
    moe_dataset *p = open_ok(tpath("a.txt"), &o), *g = open_ok(tpath("a.txt.gz"), &o), *g2 = open_ok(tpath("b.txt"), &o);
    ck_assert_int_eq(moe_dataset_kind(p), MOE_DATA_TEXT);
    ck_assert_int_eq(moe_dataset_vocab(p), 256);
    ck_assert_int_eq(moe_dataset_train_tokens(p) + moe_dataset_val_tokens(p), (int64_t)n);
    ck_assert_int_eq(moe_dataset_val_tokens(p), 500);
    ck_assert_ptr_nonnull(strstr(moe_dataset_describe(g), "gzip"));
    ck_assert_ptr_null(strstr(moe_dataset_describe(p), "gzip"));
    enum { B = 4, S = 33 };
    int32_t in[3][B * S], tg[3][B * S];
    for (int step = 0; step < 5; step++) {
        ck_assert_int_eq(moe_dataset_batch(p, 7, step, 0, B, S, in[0], tg[0], NULL), MOE_OK);
        ck_assert_int_eq(moe_dataset_batch(g, 7, step, 0, B, S, in[1], tg[1], NULL), MOE_OK);
        ck_assert_int_eq(moe_dataset_batch(g2, 7, step, 0, B, S, in[2], tg[2], NULL), MOE_OK);
        ck_assert_mem_eq(in[0], in[1], sizeof in[0]);
        ck_assert_mem_eq(tg[0], tg[1], sizeof tg[0]);
        ck_assert_mem_eq(in[0], in[2], sizeof in[0]);
    }
    moe_dataset_free(p);
    moe_dataset_free(g);
    moe_dataset_free(g2);

    /* every byte comes back: with no val split one row of n-1 inputs is the whole file */
    o.val_fraction = 0;
    moe_dataset *w = open_ok(tpath("a.txt.gz"), &o);
    int32_t *ri = malloc((n - 1) * sizeof *ri), *rt = malloc((n - 1) * sizeof *rt);
    ck_assert_int_eq(moe_dataset_batch(w, 1, 0, 0, 1, (int64_t)n - 1, ri, rt, NULL), MOE_OK);
    for (size_t i = 0; i + 1 < n; i++) {
        ck_assert_int_eq(ri[i], (uint8_t)t[i]);
        ck_assert_int_eq(rt[i], (uint8_t)t[i + 1]);
    }
    /* a row longer than the data is an argument error, not a crash */
    ck_assert_int_eq(moe_dataset_batch(w, 1, 0, 0, 1, (int64_t)n, ri, rt, NULL), MOE_ERR_ARG);
    ck_assert_ptr_nonnull(strstr(moe_last_error(), "seq+1"));
    free(ri);
    free(rt);
    moe_dataset_free(w);
    free(t);
    teardown_tmp();
}
END_TEST

/* ---- shards -------------------------------------------------------------------- */

START_TEST(test_shard_round_trip)
{
    setup_tmp();
    const int64_t n = 3000;
    int32_t *tok = malloc(n * sizeof *tok);
    for (int64_t i = 0; i < n; i++)
        tok[i] = (int32_t)((i * 7919 + 13) % MOE_GPT2_VOCAB);
    tok[5] = MOE_GPT2_VOCAB - 1; /* the largest legal id */
    ck_assert_int_eq(moe_shard_write(tpath("x.bin"), tok, n), MOE_OK);

    /* the bytes are llm.c's layout */
    FILE *f = fopen(tpath("x.bin"), "rb");
    int32_t h[256];
    ck_assert_uint_eq(fread(h, 4, 256, f), 256);
    ck_assert_int_eq(h[0], 20240520);
    ck_assert_int_eq(h[1], 1);
    ck_assert_int_eq(h[2], n);
    uint16_t first[2];
    ck_assert_uint_eq(fread(first, 2, 2, f), 2);
    ck_assert_int_eq(first[0], tok[0]);
    ck_assert_int_eq(first[1], tok[1]);
    fseek(f, 0, SEEK_END);
    ck_assert_int_eq(ftell(f), 1024 + 2 * n);
    fclose(f);

    moe_data_options o;
    moe_data_options_default(&o);
    o.val_fraction = 0;
    moe_dataset *d = open_ok(tpath("x.bin"), &o);
    ck_assert_int_eq(moe_dataset_kind(d), MOE_DATA_SHARDS);
    ck_assert_int_eq(moe_dataset_vocab(d), MOE_GPT2_VOCAB);
    ck_assert_int_eq(moe_dataset_train_tokens(d), n);
    int32_t *in = malloc(n * sizeof *in), *tg = malloc(n * sizeof *tg);
    ck_assert_int_eq(moe_dataset_batch(d, 3, 0, 0, 1, n - 1, in, tg, NULL), MOE_OK);
    for (int64_t i = 0; i + 1 < n; i++) {
        ck_assert_int_eq(in[i], tok[i]);
        ck_assert_int_eq(tg[i], tok[i + 1]);
    }
    moe_dataset_free(d);

    /* a shard is recognised by its magic under any name */
    rename(tpath("x.bin"), tpath("x.tokens"));
    d = open_ok(tpath("x.tokens"), &o);
    ck_assert_int_eq(moe_dataset_kind(d), MOE_DATA_SHARDS);
    moe_dataset_free(d);
    free(in);
    free(tg);
    free(tok);
    teardown_tmp();
}
END_TEST

/* File k of a directory holds tokens 1000k + i, so a row shows which file it came from. */
START_TEST(test_shard_directory)
{
    setup_tmp();
    const char *names[] = {"d/tiny_train_000002.bin", "d/tiny_val_000000.bin", "d/tiny_train_000001.bin"};
    const int base[] = {2000, 9000, 1000};
    const int64_t len[] = {300, 200, 250};
    mkdir(tpath("d"), 0700);
    for (int k = 0; k < 3; k++) {
        int32_t tok[300];
        for (int64_t i = 0; i < len[k]; i++)
            tok[i] = base[k] + (int32_t)i;
        ck_assert_int_eq(moe_shard_write(tpath(names[k]), tok, len[k]), MOE_OK);
    }
    write_bytes(tpath("d/README.txt"), "not a shard", 11); /* ignored: not *.bin */
    moe_dataset *d = open_ok(tpath("d"), NULL);
    ck_assert_int_eq(moe_dataset_train_tokens(d), 550);
    ck_assert_int_eq(moe_dataset_val_tokens(d), 200);
    ck_assert_ptr_nonnull(strstr(moe_dataset_describe(d), "3 shards"));
    enum { B = 64, S = 20 };
    int32_t in[B * S], tg[B * S];
    int seen[2] = {0, 0};
    for (int step = 0; step < 20; step++) {
        ck_assert_int_eq(moe_dataset_batch(d, 11, step, 0, B, S, in, tg, NULL), MOE_OK);
        for (int b = 0; b < B; b++) {
            int32_t first = in[b * S], file = first / 1000;
            ck_assert_msg(file == 1 || file == 2, "row from a val shard: %d", first);
            seen[file - 1] = 1;
            /* consecutive, inside one file */
            for (int s = 0; s < S; s++) {
                ck_assert_int_eq(in[b * S + s], first + s);
                ck_assert_int_eq(tg[b * S + s], first + s + 1);
            }
            ck_assert_int_lt(tg[b * S + S - 1] - file * 1000, len[file == 1 ? 2 : 0]);
        }
    }
    ck_assert(seen[0] && seen[1]);
    /* the val walk: the val shard in order */
    moe_val_iter it;
    moe_val_iter_init(&it);
    int64_t n, total = 0;
    int32_t expect = 9001;
    while (moe_dataset_val_next(d, &it, 3, 7, in, tg, NULL, &n) == MOE_OK && n > 0) {
        for (int i = 0; i < 3 * 7; i++)
            if (tg[i] >= 0) {
                ck_assert_int_eq(tg[i], expect++);
                ck_assert_int_eq(in[i], tg[i] - 1);
            }
        total += n;
    }
    ck_assert_int_eq(total, 199);
    moe_dataset_free(d);

    /* without val shards the tail of the last file is validation */
    remove(tpath(names[1]));
    moe_data_options o;
    moe_data_options_default(&o);
    o.val_fraction = 0.6; /* 330 tokens: all 300 of file 2 and 30 of file 1 */
    d = open_ok(tpath("d"), &o);
    ck_assert_int_eq(moe_dataset_train_tokens(d), 220);
    ck_assert_int_eq(moe_dataset_val_tokens(d), 330);
    moe_val_iter_init(&it);
    total = 0;
    while (moe_dataset_val_next(d, &it, 2, 16, in, tg, NULL, &n) == MOE_OK && n > 0)
        total += n;
    ck_assert_int_eq(total, 330 - 2); /* two segments, each one's first token is no target */
    for (int step = 0; step < 10; step++) {
        ck_assert_int_eq(moe_dataset_batch(d, 5, step, 0, B, S, in, tg, NULL), MOE_OK);
        for (int b = 0; b < B; b++)
            ck_assert_int_lt(tg[b * S + S - 1], 1220); /* inside the train part of file 1 */
    }
    moe_dataset_free(d);
    teardown_tmp();
}
END_TEST

/* ---- bad data ------------------------------------------------------------------ */

START_TEST(test_bad_shards)
{
    setup_tmp();
    uint16_t tok[100];
    for (int i = 0; i < 100; i++)
        tok[i] = (uint16_t)i;
    write_raw_shard(tpath("magic.bin"), 20240521, 1, 100, tok, 100);
    expect_fail(tpath("magic.bin"), NULL, MOE_ERR_FORMAT, "magic");
    write_raw_shard(tpath("version.bin"), 20240520, 2, 100, tok, 100);
    expect_fail(tpath("version.bin"), NULL, MOE_ERR_FORMAT, "version 2");
    write_raw_shard(tpath("trunc.bin"), 20240520, 1, 100, tok, 60);
    expect_fail(tpath("trunc.bin"), NULL, MOE_ERR_FORMAT, "truncated");
    write_raw_shard(tpath("trail.bin"), 20240520, 1, 60, tok, 100);
    expect_fail(tpath("trail.bin"), NULL, MOE_ERR_FORMAT, "trailing");
    write_bytes(tpath("header.bin"), tok, 100); /* shorter than a header */
    expect_fail(tpath("header.bin"), NULL, MOE_ERR_FORMAT, "truncated");
    write_raw_shard(tpath("zero.bin"), 20240520, 1, 0, tok, 0);
    expect_fail(tpath("zero.bin"), NULL, MOE_ERR_FORMAT, "empty");
    write_bytes(tpath("empty.bin"), tok, 0);
    expect_fail(tpath("empty.bin"), NULL, MOE_ERR_FORMAT, "empty");

    /* token ids: the caller's vocab, and GPT-2's by default */
    write_raw_shard(tpath("vocab.bin"), 20240520, 1, 100, tok, 100);
    moe_data_options o;
    moe_data_options_default(&o);
    o.vocab = 99;
    expect_fail(tpath("vocab.bin"), &o, MOE_ERR_FORMAT, "token 99 at index 99 is >= vocab 99");
    o.vocab = 100;
    moe_dataset *d = open_ok(tpath("vocab.bin"), &o);
    moe_dataset_free(d);
    tok[42] = 50257;
    write_raw_shard(tpath("gpt2.bin"), 20240520, 1, 100, tok, 100);
    expect_fail(tpath("gpt2.bin"), NULL, MOE_ERR_FORMAT, ">= vocab 50257");

    /* a directory: no shards; one bad shard spoils it; only val shards */
    mkdir(tpath("none"), 0700);
    write_bytes(tpath("none/notes.txt"), "x", 1);
    expect_fail(tpath("none"), NULL, MOE_ERR_FORMAT, "no *.bin");
    mkdir(tpath("mixed"), 0700);
    tok[42] = 42;
    write_raw_shard(tpath("mixed/a_train_000.bin"), 20240520, 1, 100, tok, 100);
    write_raw_shard(tpath("mixed/a_train_001.bin"), 20240520, 1, 100, tok, 50);
    expect_fail(tpath("mixed"), NULL, MOE_ERR_FORMAT, "a_train_001.bin' is truncated");
    mkdir(tpath("valonly"), 0700);
    write_raw_shard(tpath("valonly/a_val_000.bin"), 20240520, 1, 100, tok, 100);
    expect_fail(tpath("valonly"), NULL, MOE_ERR_FORMAT, "no training shards");
    teardown_tmp();
}
END_TEST

START_TEST(test_bad_text_and_paths)
{
    setup_tmp();
    write_bytes(tpath("empty.txt"), "", 0);
    expect_fail(tpath("empty.txt"), NULL, MOE_ERR_FORMAT, "empty");
    write_gzip(tpath("empty.txt.gz"), "", 0);
    expect_fail(tpath("empty.txt.gz"), NULL, MOE_ERR_FORMAT, "empty");

    /* a gzip stream cut short */
    char *t = make_text(20000);
    write_gzip(tpath("full.gz"), t, 20000);
    FILE *f = fopen(tpath("full.gz"), "rb");
    char buf[65536];
    size_t m = fread(buf, 1, sizeof buf, f);
    fclose(f);
    write_bytes(tpath("cut.txt.gz"), buf, m / 2);
    expect_fail(tpath("cut.txt.gz"), NULL, MOE_ERR_FORMAT, "gzip");

    /* bytes >= a caller's small vocab */
    moe_data_options o;
    moe_data_options_default(&o);
    o.vocab = 100; /* 'e' is 101 */
    write_bytes(tpath("small.txt"), "abc e", 5);
    expect_fail(tpath("small.txt"), &o, MOE_ERR_FORMAT, "byte 101 at offset 4 is >= vocab 100");

    /* paths */
    expect_fail(tpath("missing.txt"), NULL, MOE_ERR_IO, "No such file");
    expect_fail(tpath("missing/x_train_000.bin"), NULL, MOE_ERR_IO, "No such file");
    /* Unreadable: tests may run as root, which reads chmod-000 files, so a shard that is
     * a directory stands in for a file that cannot be read. */
    mkdir(tpath("u"), 0700);
    mkdir(tpath("u/a_train_000.bin"), 0700);
    expect_fail(tpath("u"), NULL, MOE_ERR_IO, "a_train_000.bin': Is a directory");
    if (geteuid() != 0) {
        write_bytes(tpath("locked.txt"), "hello", 5);
        chmod(tpath("locked.txt"), 0);
        expect_fail(tpath("locked.txt"), NULL, MOE_ERR_IO, "Permission denied");
    }

    /* options */
    write_bytes(tpath("ok.txt"), "hello world", 11);
    o.vocab = 0;
    o.val_fraction = 1.0;
    expect_fail(tpath("ok.txt"), &o, MOE_ERR_ARG, "val_fraction");
    moe_dataset *d = NULL;
    ck_assert_int_eq(moe_dataset_open("", NULL, &d), MOE_ERR_ARG);
    free(t);
    teardown_tmp();
}
END_TEST

/* ---- batches and the val walk --------------------------------------------------- */

/* A shard whose token i is i: a row shows its start position. */
static moe_dataset *counting_shard(int64_t n, double val_fraction)
{
    int32_t *tok = malloc(n * sizeof *tok);
    for (int64_t i = 0; i < n; i++)
        tok[i] = (int32_t)i;
    ck_assert_int_eq(moe_shard_write(tpath("count.bin"), tok, n), MOE_OK);
    free(tok);
    moe_data_options o;
    moe_data_options_default(&o);
    o.val_fraction = val_fraction;
    return open_ok(tpath("count.bin"), &o);
}

START_TEST(test_batches_deterministic)
{
    setup_tmp();
    const int64_t n = 40000;
    moe_dataset *d = counting_shard(n, 0.1);
    ck_assert_int_eq(moe_dataset_train_tokens(d), 36000);
    enum { B = 16, S = 64 };
    static int32_t a[B * S], at[B * S], b[B * S], bt[B * S], task[B * S];
    /* step 5 alone equals step 5 after steps 0..4: resuming needs only the step */
    ck_assert_int_eq(moe_dataset_batch(d, 42, 5, 1, B, S, a, at, NULL), MOE_OK);
    for (int s = 0; s < 5; s++)
        ck_assert_int_eq(moe_dataset_batch(d, 42, s, 1, B, S, b, bt, NULL), MOE_OK);
    ck_assert_int_eq(moe_dataset_batch(d, 42, 5, 1, B, S, b, bt, task), MOE_OK);
    ck_assert_mem_eq(a, b, sizeof a);
    ck_assert_mem_eq(at, bt, sizeof at);
    for (int i = 0; i < B * S; i++)
        ck_assert_int_eq(task[i], 0);
    /* every row: consecutive train tokens, targets shifted by one */
    for (int r = 0; r < B; r++) {
        ck_assert_int_le(a[r * S] + S, 36000 - 1);
        for (int s = 0; s < S; s++) {
            ck_assert_int_eq(a[r * S + s], a[r * S] + s);
            ck_assert_int_eq(at[r * S + s], a[r * S + s] + 1);
        }
    }
    /* seed, step and micro-batch each change the rows */
    const struct { uint64_t seed; int64_t step, micro; } other[] = {{43, 5, 1}, {42, 6, 1}, {42, 5, 0}};
    for (int k = 0; k < 3; k++) {
        ck_assert_int_eq(moe_dataset_batch(d, other[k].seed, other[k].step, other[k].micro, B, S, b, bt, NULL), MOE_OK);
        int same = 0;
        for (int r = 0; r < B; r++)
            same += a[r * S] == b[r * S];
        ck_assert_msg(same < 2, "case %d: %d of %d rows repeat", k, same, B);
    }
    /* starts cover the split: mean near the middle, both ends reached */
    double mean = 0;
    int lo = 0, hi = 0;
    for (int step = 0; step < 200; step++) {
        ck_assert_int_eq(moe_dataset_batch(d, 1, step, 0, B, S, b, bt, NULL), MOE_OK);
        for (int r = 0; r < B; r++) {
            mean += b[r * S];
            lo |= b[r * S] < 1000;
            hi |= b[r * S] > 36000 - S - 1000;
        }
    }
    mean /= 200.0 * B;
    ck_assert_double_eq_tol(mean, (36000 - S) / 2.0, 1000);
    ck_assert(lo && hi);
    /* bad arguments */
    ck_assert_int_eq(moe_dataset_batch(d, 1, -1, 0, B, S, b, bt, NULL), MOE_ERR_ARG);
    ck_assert_int_eq(moe_dataset_batch(d, 1, 0, 0, 0, S, b, bt, NULL), MOE_ERR_ARG);
    ck_assert_int_eq(moe_dataset_batch(d, 1, 0, 0, B, S, NULL, bt, NULL), MOE_ERR_ARG);
    moe_dataset_free(d);
    teardown_tmp();
}
END_TEST

START_TEST(test_val_iterator_covers_split)
{
    setup_tmp();
    moe_dataset *d = counting_shard(1000, 0.25);
    ck_assert_int_eq(moe_dataset_val_tokens(d), 250);
    enum { B = 3, S = 7 };
    int32_t in[B * S], tg[B * S], task[B * S];
    moe_val_iter it;
    moe_val_iter_init(&it);
    int64_t n, total = 0, calls = 0;
    int32_t expect = 751;
    int padded = 0;
    while (1) {
        ck_assert_int_eq(moe_dataset_val_next(d, &it, B, S, in, tg, task, &n), MOE_OK);
        if (n == 0)
            break;
        calls++;
        int64_t valid = 0;
        for (int i = 0; i < B * S; i++) {
            if (tg[i] < 0) {
                padded = 1;
                ck_assert_int_eq(in[i], 0);
                continue;
            }
            ck_assert_msg(!padded, "padding before the end");
            ck_assert_int_eq(tg[i], expect++);
            ck_assert_int_eq(in[i], tg[i] - 1);
            ck_assert_int_eq(task[i], 0);
            valid++;
        }
        ck_assert_int_eq(valid, n);
        total += n;
    }
    ck_assert_int_eq(expect, 1000);
    ck_assert_int_eq(total, 249);
    ck_assert_int_eq(calls, (249 + B * S - 1) / (B * S));
    /* exhausted stays exhausted; a fresh iterator starts over */
    ck_assert_int_eq(moe_dataset_val_next(d, &it, B, S, in, tg, NULL, &n), MOE_OK);
    ck_assert_int_eq(n, 0);
    moe_val_iter_init(&it);
    ck_assert_int_eq(moe_dataset_val_next(d, &it, B, S, in, tg, NULL, &n), MOE_OK);
    ck_assert_int_eq(n, B * S);
    ck_assert_int_eq(tg[0], 751);
    moe_dataset_free(d);

    /* no val split: nothing to walk */
    d = counting_shard(1000, 0);
    ck_assert_int_eq(moe_dataset_val_tokens(d), 0);
    moe_val_iter_init(&it);
    ck_assert_int_eq(moe_dataset_val_next(d, &it, B, S, in, tg, NULL, &n), MOE_OK);
    ck_assert_int_eq(n, 0);
    moe_dataset_free(d);
    teardown_tmp();
}
END_TEST

/* ---- the synthetic generator ------------------------------------------------------ */

START_TEST(test_synth_deterministic_and_in_range)
{
    moe_synth_config c;
    moe_synth_config_default(&c);
    ck_assert_int_eq(moe_synth_config_validate(&c), MOE_OK);
    enum { L = 200 };
    int32_t x[L], y[L], tx[L], ty[L];
    int differ = 0;
    for (uint64_t idx = 0; idx < 64; idx++) {
        uint64_t index = idx * 0x9E3779B97F4A7C15ull >> 1;
        ck_assert_int_eq(moe_synth_sequence(&c, index, L, x, tx), MOE_OK);
        ck_assert_int_eq(moe_synth_sequence(&c, index, L, y, ty), MOE_OK);
        ck_assert_mem_eq(x, y, sizeof x);
        ck_assert_mem_eq(tx, ty, sizeof tx);
        int32_t m = moe_synth_task(&c, index);
        ck_assert_int_eq(m, (int32_t)(index % 4));
        for (int t = 0; t < L; t++) {
            ck_assert(x[t] >= 0 && x[t] < c.vocab);
            ck_assert_int_eq(tx[t], m);
            if (t > 0) {
                ck_assert_int_eq(x[t], moe_synth_next(&c, index, t, x[t - 1]));
                if (m % 2 == 0) /* counting with stride m + 1 */
                    ck_assert_int_eq(x[t], (x[t - 1] + m + 1) % c.vocab);
            }
        }
        ck_assert_int_eq(moe_synth_sequence(&c, index + 4, L, y, NULL), MOE_OK);
        differ += memcmp(x, y, sizeof x) != 0;
    }
    ck_assert_int_ge(differ, 60);
    /* another seed, other languages */
    moe_synth_config c2 = c;
    c2.seed = 2;
    ck_assert_int_eq(moe_synth_sequence(&c, 1, L, x, NULL), MOE_OK);
    ck_assert_int_eq(moe_synth_sequence(&c2, 1, L, y, NULL), MOE_OK);
    ck_assert(memcmp(x, y, sizeof x) != 0);
    /* configuration errors name the field */
    c2.vocab = 6;
    c2.n_tasks = 4;
    ck_assert_int_eq(moe_synth_config_validate(&c2), MOE_ERR_ARG);
    ck_assert_ptr_nonnull(strstr(moe_last_error(), "vocab"));
    c2 = c;
    ck_assert_int_eq(moe_synth_config_parse("tasks=6,vocab=64,val=8", &c2), MOE_OK);
    ck_assert_int_eq(c2.n_tasks, 6);
    ck_assert_int_eq(c2.vocab, 64);
    ck_assert_int_eq(c2.n_val, 8);
    ck_assert_int_eq(moe_synth_config_parse("tasks=x", &c2), MOE_ERR_ARG);
    ck_assert_int_eq(moe_synth_config_parse("colour=3", &c2), MOE_ERR_ARG);
    ck_assert_ptr_nonnull(strstr(moe_last_error(), "colour"));
}
END_TEST

/*
 * Learnable, and the task matters: count models fitted on training rows and scored on
 * the validation rows. Knowing (task, previous token) gets near the languages' entropy
 * (0.28 nats) — far below ln(vocab); a bigram that ignores the task stays well above it,
 * so a model gains by inferring the task from the context.
 */
START_TEST(test_synth_learnable)
{
    moe_dataset *d = NULL;
    ck_assert_int_eq(moe_dataset_open("synth:tasks=4,vocab=32,seed=3,val=256", NULL, &d), MOE_OK);
    ck_assert_int_eq(moe_dataset_kind(d), MOE_DATA_SYNTH);
    ck_assert_int_eq(moe_dataset_vocab(d), 32);
    ck_assert_int_eq(moe_dataset_n_tasks(d), 4);
    enum { B = 32, S = 64, V = 32, M = 4 };
    static int32_t in[B * S], tg[B * S], task[B * S], in2[B * S], tg2[B * S], task2[B * S];
    static double with_task[M][V][V], without[V][V];
    int task_seen[M] = {0};
    for (int step = 0; step < 100; step++) {
        ck_assert_int_eq(moe_dataset_batch(d, 9, step, 0, B, S, in, tg, task), MOE_OK);
        ck_assert_int_eq(moe_dataset_batch(d, 9, step, 0, B, S, in2, tg2, task2), MOE_OK);
        ck_assert_mem_eq(in, in2, sizeof in);
        ck_assert_mem_eq(tg, tg2, sizeof tg);
        ck_assert_mem_eq(task, task2, sizeof task);
        for (int i = 0; i < B * S; i++) {
            ck_assert(task[i] >= 0 && task[i] < M);
            ck_assert_int_eq(task[i], task[i / S * S]); /* one task per row */
            if (i % S < S - 1)
                ck_assert_int_eq(tg[i], in[i + 1]);
            with_task[task[i]][in[i]][tg[i]] += 1;
            without[in[i]][tg[i]] += 1;
            task_seen[task[i]] = 1;
        }
    }
    for (int m = 0; m < M; m++) {
        ck_assert(task_seen[m]);
        /* counting: one successor per token; Markov: at most two, a taken 3/4 of the time */
        double top = 0, all = 0;
        for (int v = 0; v < V; v++) {
            int succ = 0;
            double big = 0, sum = 0;
            for (int w = 0; w < V; w++) {
                succ += with_task[m][v][w] > 0;
                sum += with_task[m][v][w];
                big = fmax(big, with_task[m][v][w]);
            }
            ck_assert_int_le(succ, m % 2 ? 2 : 1);
            top += big;
            all += sum;
        }
        if (m % 2)
            ck_assert_double_eq_tol(top / all, 0.75, 0.02);
    }
    /* score the val rows with add-0.1 smoothing */
    double ce_task = 0, ce_bigram = 0;
    int64_t n, total = 0;
    int rows = 0;
    moe_val_iter it;
    moe_val_iter_init(&it);
    while (moe_dataset_val_next(d, &it, B, S, in, tg, task, &n) == MOE_OK && n > 0) {
        for (int i = 0; i < B * S; i++) {
            if (tg[i] < 0)
                continue;
            double st = 0, sb = 0;
            for (int v = 0; v < V; v++) {
                st += with_task[task[i]][in[i]][v] + 0.1;
                sb += without[in[i]][v] + 0.1;
            }
            ce_task -= log((with_task[task[i]][in[i]][tg[i]] + 0.1) / st);
            ce_bigram -= log((without[in[i]][tg[i]] + 0.1) / sb);
        }
        total += n;
        rows += (int)(n / S);
    }
    ck_assert_int_eq(rows, 256);
    ck_assert_int_eq(total, 256 * S);
    ce_task /= (double)total;
    ce_bigram /= (double)total;
    printf("synth: val cross-entropy, count model with task %.3f, without task %.3f, ln(vocab) %.3f nats\n",
           ce_task, ce_bigram, log(V));
    ck_assert_double_eq_tol(ce_task, 0.5 * 0.5623, 0.03); /* half the tasks at H(3/4, 1/4) */
    ck_assert_double_gt(ce_bigram, ce_task + 0.5);
    ck_assert_double_lt(ce_bigram, log(V) - 1.0);
    moe_dataset_free(d);

    /* spec errors */
    ck_assert_int_eq(moe_dataset_open("synth:tasks=4,bogus=1", NULL, &d), MOE_ERR_ARG);
    ck_assert_ptr_nonnull(strstr(moe_last_error(), "bogus"));
    moe_data_options o;
    moe_data_options_default(&o);
    o.vocab = 16;
    ck_assert_int_eq(moe_dataset_open("synth:vocab=32", &o, &d), MOE_ERR_ARG);
    ck_assert_int_eq(moe_dataset_open("synth", &o, &d), MOE_OK); /* takes the model's vocab */
    ck_assert_int_eq(moe_dataset_vocab(d), 16);
    moe_dataset_free(d);
}
END_TEST

/* ---- the shipped corpus ------------------------------------------------------------- */

START_TEST(test_brown_corpus)
{
    const char *top = getenv("top_srcdir");
    if (!top || !*top) {
        printf("brown: top_srcdir unset (not run by make check), check skipped\n");
        return;
    }
    char path[1024];
    snprintf(path, sizeof path, "%s/datasets/brown/brown.txt.gz", top);
    moe_dataset *d = open_ok(path, NULL);
    int64_t n = moe_dataset_train_tokens(d) + moe_dataset_val_tokens(d);
    printf("brown: %s\n", moe_dataset_describe(d));
    ck_assert_int_ge(n, 5900000);
    ck_assert_int_le(n, 6000000);
    ck_assert_int_eq(moe_dataset_vocab(d), 256);
    enum { B = 4, S = 64 };
    int32_t in[B * S], tg[B * S];
    ck_assert_int_eq(moe_dataset_batch(d, 1, 0, 0, B, S, in, tg, NULL), MOE_OK);
    for (int i = 0; i < B * S; i++)
        ck_assert_msg(in[i] == '\n' || (in[i] >= 32 && in[i] < 127), "byte %d is not ASCII text", in[i]);
    moe_dataset_free(d);
}
END_TEST

/* ---- streams, gzip members and garbage, identity ------------------------------------- */

/* A child writes n bytes of p into a pipe, starting after delay_ms; returns "/dev/fd/N". */
static const char *pipe_of(const void *p, size_t n, int delay_ms, pid_t *pid)
{
    static char path[32];
    int fd[2];
    ck_assert_int_eq(pipe(fd), 0);
    *pid = fork();
    ck_assert_int_ge(*pid, 0);
    if (*pid == 0) {
        close(fd[0]);
        struct timespec ts = {0, (long)delay_ms * 1000000L};
        nanosleep(&ts, NULL);
        _exit(write(fd[1], p, n) == (ssize_t)n ? 0 : 1);
    }
    close(fd[1]);
    snprintf(path, sizeof path, "/dev/fd/%d", fd[0]);
    return path;
}

START_TEST(test_streams)
{
    setup_tmp();
    char *t = make_text(20000);
    write_bytes(tpath("a.txt"), t, 20000);
    write_gzip(tpath("a.gz"), t, 20000);
    moe_dataset *ref = open_ok(tpath("a.txt"), NULL);
    /* a pipe of plain text and one of gzip, read once: every byte, the same tokens */
    for (int gz = 0; gz < 2; gz++) {
        FILE *f = fopen(tpath(gz ? "a.gz" : "a.txt"), "rb");
        static char buf[65536];
        size_t n = fread(buf, 1, sizeof buf, f);
        fclose(f);
        pid_t pid;
        const char *path = pipe_of(buf, n, gz ? 200 : 0, &pid); /* gzip: a writer that comes late */
        moe_dataset *d = open_ok(path, NULL);
        close(atoi(path + 8));
        waitpid(pid, NULL, 0);
        ck_assert_int_eq(moe_dataset_train_tokens(d) + moe_dataset_val_tokens(d), 20000);
        ck_assert_int_eq(moe_dataset_train_tokens(d), moe_dataset_train_tokens(ref));
        const moe_data_identity *a = moe_dataset_identity(d);
        ck_assert_uint_eq(a->size, n);
        moe_dataset_free(d);
    }
    moe_dataset_free(ref);
    /* a shard cannot come through a pipe (it is mapped); an endless device is refused */
    int32_t tok[64] = {0};
    ck_assert_int_eq(moe_shard_write(tpath("s.bin"), tok, 64), MOE_OK);
    FILE *f = fopen(tpath("s.bin"), "rb");
    static char sb[4096];
    size_t n = fread(sb, 1, sizeof sb, f);
    fclose(f);
    pid_t pid;
    const char *path = pipe_of(sb, n, 0, &pid);
    moe_dataset *d = NULL;
    ck_assert_int_eq(moe_dataset_open(path, NULL, &d), MOE_ERR_FORMAT);
    ck_assert_ptr_nonnull(strstr(moe_last_error(), "must be a regular file"));
    close(atoi(path + 8));
    waitpid(pid, NULL, 0);
    expect_fail("/dev/zero", NULL, MOE_ERR_IO, "character device");
    free(t);
    teardown_tmp();
}
END_TEST

START_TEST(test_gzip_members_and_garbage)
{
    setup_tmp();
    char *t = make_text(5000);
    write_gzip(tpath("one.gz"), t, 5000);
    FILE *f = fopen(tpath("one.gz"), "rb");
    static char gz[65536];
    size_t n = fread(gz, 1, sizeof gz, f);
    fclose(f);
    /* two members: both texts */
    FILE *w = fopen(tpath("two.gz"), "wb");
    fwrite(gz, 1, n, w);
    fwrite(gz, 1, n, w);
    fclose(w);
    moe_dataset *d = open_ok(tpath("two.gz"), NULL);
    ck_assert_int_eq(moe_dataset_train_tokens(d) + moe_dataset_val_tokens(d), 10000);
    moe_dataset_free(d);
    /* zero padding after the member is taken, as gzip(1) does */
    w = fopen(tpath("pad.gz"), "wb");
    fwrite(gz, 1, n, w);
    static const char zeros[100];
    fwrite(zeros, 1, sizeof zeros, w);
    fclose(w);
    d = open_ok(tpath("pad.gz"), NULL);
    ck_assert_int_eq(moe_dataset_train_tokens(d) + moe_dataset_val_tokens(d), 5000);
    moe_dataset_free(d);
    /* anything else after it is refused, naming the count and the offset */
    w = fopen(tpath("junk.gz"), "wb");
    fwrite(gz, 1, n, w);
    fwrite("junk!", 1, 5, w);
    fclose(w);
    char want[128];
    snprintf(want, sizeof want, "5 bytes of trailing garbage after the gzip data, which ends at byte %zu", n);
    expect_fail(tpath("junk.gz"), NULL, MOE_ERR_FORMAT, want);
    free(t);
    teardown_tmp();
}
END_TEST

START_TEST(test_identity)
{
    setup_tmp();
    char *t = make_text(3000);
    write_bytes(tpath("x.txt"), t, 3000);
    moe_dataset *a = open_ok(tpath("x.txt"), NULL);
    char cwd[1024], why[8192];
    ck_assert_ptr_nonnull(getcwd(cwd, sizeof cwd));
    ck_assert_int_eq(chdir(tmpdir), 0);
    moe_dataset *b = open_ok("./x.txt", NULL); /* another spelling of the same file */
    ck_assert_int_eq(chdir(cwd), 0);
    const moe_data_identity *ia = moe_dataset_identity(a), *ib = moe_dataset_identity(b);
    ck_assert_str_eq(ia->path, ib->path);
    ck_assert_str_eq(ia->kind, "text");
    ck_assert_uint_eq(ia->size, 3000);
    ck_assert_uint_eq(ia->crc32, crc32(0, (const Bytef *)t, 3000));
    ck_assert_int_eq(moe_data_identity_differs(ia, ib, why, sizeof why), 0);
    /* moved: the same data */
    ck_assert_int_eq(rename(tpath("x.txt"), tpath("y.txt")), 0);
    moe_dataset *c = open_ok(tpath("y.txt"), NULL);
    ck_assert_int_eq(moe_data_identity_differs(ia, moe_dataset_identity(c), why, sizeof why), 0);
    moe_dataset_free(c);
    /* one byte more: size and checksum named, and both paths */
    t[2999] = 'q';
    write_bytes(tpath("y.txt"), t, 3000);
    FILE *f = fopen(tpath("y.txt"), "ab");
    fputc('z', f);
    fclose(f);
    c = open_ok(tpath("y.txt"), NULL);
    ck_assert_int_eq(moe_data_identity_differs(ia, moe_dataset_identity(c), why, sizeof why), 1);
    ck_assert_msg(strstr(why, "size 3000 -> 3001 bytes, CRC-32") && strstr(why, "y.txt"), "%s", why);
    moe_dataset_free(c);
    /* shards: names, sizes and headers */
    mkdir(tpath("sh"), 0700);
    int32_t tok[100];
    for (int i = 0; i < 100; i++)
        tok[i] = i;
    ck_assert_int_eq(moe_shard_write(tpath("sh/a_train_000.bin"), tok, 100), MOE_OK);
    ck_assert_int_eq(moe_shard_write(tpath("sh/a_val_000.bin"), tok, 50), MOE_OK);
    moe_dataset *s1 = open_ok(tpath("sh"), NULL);
    ck_assert_str_eq(moe_dataset_identity(s1)->kind, "shards");
    ck_assert_uint_eq(moe_dataset_identity(s1)->size, 2 * 1024 + 2 * 150);
    ck_assert_int_eq(moe_shard_write(tpath("sh/a_val_000.bin"), tok, 60), MOE_OK); /* rewritten */
    moe_dataset *s2 = open_ok(tpath("sh"), NULL);
    ck_assert_int_eq(moe_data_identity_differs(moe_dataset_identity(s1), moe_dataset_identity(s2), why, sizeof why),
                     1);
    ck_assert_int_eq(moe_data_identity_differs(ia, moe_dataset_identity(s1), why, sizeof why), 1);
    ck_assert_ptr_nonnull(strstr(why, "text"));
    moe_dataset_free(s1);
    moe_dataset_free(s2);
    moe_dataset_free(a);
    moe_dataset_free(b);
    free(t);
    teardown_tmp();
}
END_TEST

static Suite *data_suite(void)
{
    Suite *s = suite_create("data");
    TCase *tc = tcase_create("data");
    tcase_set_timeout(tc, 60);
    tcase_add_test(tc, test_text_plain_and_gzip_identical);
    tcase_add_test(tc, test_shard_round_trip);
    tcase_add_test(tc, test_shard_directory);
    tcase_add_test(tc, test_bad_shards);
    tcase_add_test(tc, test_bad_text_and_paths);
    tcase_add_test(tc, test_batches_deterministic);
    tcase_add_test(tc, test_val_iterator_covers_split);
    tcase_add_test(tc, test_synth_deterministic_and_in_range);
    tcase_add_test(tc, test_synth_learnable);
    tcase_add_test(tc, test_brown_corpus);
    tcase_add_test(tc, test_streams);
    tcase_add_test(tc, test_gzip_members_and_garbage);
    tcase_add_test(tc, test_identity);
    suite_add_tcase(s, tc);
    return s;
}

int main(void)
{
    return tu_run(data_suite());
}
