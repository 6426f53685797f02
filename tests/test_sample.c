/*
 * Decoding within the trained context (src/model/sample.h): a small byte-level model
 * trained here on the Brown corpus at seq S, with max_position_embeddings 4·S (as the
 * laptop preset once had 2x), read past 2·S through moe_decoder:
 *  - teacher forcing on held-out text: the per-token cross-entropy at positions 2S..4S of
 *    the stream, decoded in a window of S, stays at the in-context validation level;
 *  - greedy continuation past 2·S: each generated token scored by a fresh forward over
 *    the S tokens before it (in-context positions) costs no more late than early — text
 *    generated at positions the model never saw would score as the gibberish it is;
 *  - after the window slid, the decoder's logits are a fresh forward's over the tokens it
 *    kept (keys and values re-encoded at their new positions, no stale RoPE);
 *  - the same measures with the window at max_position_embeddings (what `cmoe sample`
 *    did) are printed, to show what the window prevents.
 */
#define _POSIX_C_SOURCE 200809L /* setenv */
#include "io/data.h"
#include "model/model.h"
#include "model/sample.h"
#include "testutil.h"

#include <unistd.h>

/* Spin-waiting OpenMP threads cost 10x on a loaded 2-core machine; see test_cpu_layer.c. */
static void passive_omp(char **argv)
{
    if (getenv("OMP_WAIT_POLICY"))
        return;
    setenv("OMP_WAIT_POLICY", "passive", 1);
    execv("/proc/self/exe", argv);
}

enum { S = 32, MAXP = 4 * S, STEPS = 400, B = 8, ROWS = 6 };

static moe_dataset *d;
static moe_backend *b;
static moe_model *m;   /* trained at seq S, created for MAXP positions */
static moe_model *win; /* the same weights, for fresh forwards of up to S tokens */

/* CE of target under logits [V] */
static double ce_of(const double *logits, int64_t V, int32_t target)
{
    double mx = logits[0], sum = 0;
    for (int64_t j = 1; j < V; j++)
        mx = logits[j] > mx ? logits[j] : mx;
    for (int64_t j = 0; j < V; j++)
        sum += exp(logits[j] - mx);
    return mx + log(sum) - logits[target];
}

static void setup(void)
{
    const char *src = getenv("top_srcdir") ? getenv("top_srcdir") : ".";
    char path[1024];
    snprintf(path, sizeof path, "%s/datasets/brown/brown.txt.gz", src);
    ck_assert_msg(moe_dataset_open(path, NULL, &d) == MOE_OK, "%s", moe_last_error());
    moe_model_config c;
    moe_model_config_tiny(&c);
    c.vocab_size = 256;
    c.hidden_size = 48;
    c.num_attention_heads = 4;
    c.num_key_value_heads = 2;
    c.head_dim = 12;
    c.num_hidden_layers = 2;
    c.n_experts_per_layer = 0;
    c.first_k_dense_replace = 0;
    c.moe_intermediate_size = 64;
    c.moe.n_experts = 4;
    c.moe.top_k = 2;
    c.max_position_embeddings = MAXP;
    ck_assert_int_eq(moe_backend_create("cpu", &(moe_backend_options){.threads = 2}, &b), MOE_OK);
    ck_assert_msg(moe_model_create(&c, b, NULL, B, MAXP, &m) == MOE_OK, "%s", moe_last_error());
    ck_assert_int_eq(moe_model_create(&c, b, NULL, 1, S, &win), MOE_OK);
    ck_assert_int_eq(moe_model_init(m, 3), MOE_OK);
    moe_optim_config oc;
    moe_optim_config_default(&oc);
    oc.lr = 1e-2;
    oc.warmup_steps = 20;
    oc.total_steps = STEPS;
    moe_optim *o;
    ck_assert_int_eq(moe_optim_create(m, &oc, &o), MOE_OK);
    int32_t in[B * S], tg[B * S];
    moe_model_losses L = {0};
    for (int64_t step = 0; step < STEPS; step++) {
        moe_model_zero_grad(m);
        ck_assert_int_eq(moe_dataset_batch(d, 11, step, 0, B, S, in, tg, NULL), MOE_OK);
        ck_assert_int_eq(moe_model_forward(m, in, tg, NULL, B, S, MOE_KEY_STEP((uint64_t)step), 1, &L), MOE_OK);
        ck_assert_int_eq(moe_model_backward(m), MOE_OK);
        ck_assert_int_eq(moe_optim_step(o, 1.0, NULL), MOE_OK);
    }
    printf("sample: trained %d steps of %d x %d bytes of Brown, last loss %.3f\n", STEPS, B, S, L.total);
    moe_optim_free(o);
    double *w = NULL;
    for (int i = 0; i < moe_model_n_params(m); i++) {
        w = realloc(w, (size_t)moe_model_param(m, i)->numel * sizeof *w);
        ck_assert_int_eq(moe_model_get_param(m, i, w), MOE_OK);
        ck_assert_int_eq(moe_model_set_param(win, i, w), MOE_OK);
    }
    free(w);
}

static void teardown(void)
{
    moe_model_free(win);
    moe_model_free(m);
    moe_backend_free(b);
    moe_dataset_free(d);
}

/* The validation CE of ordinary forwards at seq S: what in-context means. */
static double in_context_ce(void)
{
    moe_val_iter it;
    moe_val_iter_init(&it);
    int32_t in[B * S], tg[B * S];
    double sum = 0;
    int64_t n = 0, got;
    for (int k = 0; k < 8 && moe_dataset_val_next(d, &it, B, S, in, tg, NULL, &got) == MOE_OK && got > 0; k++) {
        moe_model_losses L;
        ck_assert_int_eq(moe_model_forward(m, in, tg, NULL, B, S, MOE_KEY_STEP(0), 0, &L), MOE_OK);
        sum += L.ce * (double)L.n_targets;
        n += L.n_targets;
    }
    return sum / (double)n;
}

/* ROWS held-out streams of MAXP + 1 bytes */
static void streams(int32_t *x /* [ROWS, MAXP + 1] */)
{
    moe_val_iter it;
    moe_val_iter_init(&it);
    int32_t in[MAXP], tg[MAXP];
    for (int r = 0; r < ROWS; r++) {
        int64_t got;
        do
            ck_assert_int_eq(moe_dataset_val_next(d, &it, 1, MAXP, in, tg, NULL, &got), MOE_OK);
        while (got != MAXP); /* whole rows only */
        for (int i = 0; i < MAXP; i++)
            x[r * (MAXP + 1) + i] = in[i];
        x[r * (MAXP + 1) + MAXP] = tg[MAXP - 1];
    }
}

/* Teacher forcing through a decoder of window W: the mean CE of the targets at stream
 * positions [from, to) */
static double forced_ce(const int32_t *x, int64_t W, int64_t from, int64_t to)
{
    double logits[256], sum = 0;
    int64_t n = 0;
    for (int r = 0; r < ROWS; r++) {
        moe_decoder dec;
        ck_assert_int_eq(moe_decoder_init(&dec, m, W), MOE_OK);
        const int32_t *row = x + r * (MAXP + 1);
        for (int64_t i = 0; i < to; i++) {
            ck_assert_int_eq(moe_decoder_push(&dec, row[i], logits), MOE_OK);
            if (i >= from) {
                sum += ce_of(logits, 256, row[i + 1]);
                n++;
            }
        }
        moe_decoder_free(&dec);
    }
    return sum / (double)n;
}

/* Greedy continuation of S/2 prompt bytes to MAXP in a window of W; each generated byte
 * scored in context (a fresh forward over the up to S bytes before it); mean over
 * generated positions [S/2, S) -> *early and [2S, MAXP) -> *late */
static void greedy(const int32_t *x, int64_t W, double *early, double *late)
{
    double logits[256], se = 0, sl = 0, *row_logits = tu_alloc(S * 256);
    int64_t ne = 0, nl = 0;
    int32_t g[MAXP + 1];
    for (int r = 0; r < ROWS; r++) {
        moe_decoder dec;
        ck_assert_int_eq(moe_decoder_init(&dec, m, W), MOE_OK);
        for (int i = 0; i < S / 2; i++) {
            g[i] = x[r * (MAXP + 1) + i];
            ck_assert_int_eq(moe_decoder_push(&dec, g[i], logits), MOE_OK);
        }
        for (int i = S / 2; i < MAXP; i++) {
            int32_t best = 0;
            for (int j = 1; j < 256; j++)
                best = logits[j] > logits[best] ? j : best;
            g[i] = best;
            if (i + 1 < MAXP)
                ck_assert_int_eq(moe_decoder_push(&dec, g[i], logits), MOE_OK);
        }
        moe_decoder_free(&dec);
        for (int i = S / 2; i < MAXP; i++) {
            if (i >= S && i < 2 * S)
                continue;
            const int64_t lo = i - S > 0 ? i - S : 0, len = i - lo;
            ck_assert_int_eq(moe_model_forward(win, g + lo, NULL, NULL, 1, len, MOE_KEY_STEP(0), 0, NULL), MOE_OK);
            ck_assert_int_eq(moe_model_get_logits(win, row_logits), MOE_OK);
            double ce = ce_of(row_logits + (len - 1) * 256, 256, g[i]);
            if (i < S) {
                se += ce;
                ne++;
            } else {
                sl += ce;
                nl++;
            }
        }
    }
    free(row_logits);
    *early = se / (double)ne;
    *late = sl / (double)nl;
}

START_TEST(test_past_the_context)
{
    int32_t *x = malloc((size_t)ROWS * (MAXP + 1) * sizeof *x);
    streams(x);
    const double base = in_context_ce();
    const double late = forced_ce(x, S, 2 * S, MAXP), late_old = forced_ce(x, MAXP, 2 * S, MAXP);
    printf("sample: validation ce in context (seq %d) %.3f; teacher-forced past %d in a window of %d %.3f, "
           "of %d (max_position_embeddings) %.3f\n", S, base, 2 * S, S, late, MAXP, late_old);
    ck_assert_msg(late <= 1.15 * base, "past the context: ce %.3f against %.3f in context", late, base);
    double ge, gl, ge_old, gl_old;
    greedy(x, S, &ge, &gl);
    greedy(x, MAXP, &ge_old, &gl_old);
    printf("sample: greedy bytes scored in context: %.3f early, %.3f past %d (window %d); %.3f and %.3f "
           "(window %d)\n", ge, gl, 2 * S, S, ge_old, gl_old, MAXP);
    ck_assert_msg(gl <= ge + 0.5, "greedy past the context: ce %.3f against %.3f early", gl, ge);
    free(x);
}
END_TEST

/* After a slide the cache holds the kept tokens at positions 0.., as a fresh forward */
START_TEST(test_slide_reencodes)
{
    int32_t *x = malloc((size_t)ROWS * (MAXP + 1) * sizeof *x);
    streams(x);
    moe_decoder dec;
    ck_assert_int_eq(moe_decoder_init(&dec, m, S), MOE_OK);
    double logits[256], *full = tu_alloc(S * 256);
    double worst = 0;
    for (int i = 0; i < 3 * S + 5; i++) {
        ck_assert_int_eq(moe_decoder_push(&dec, x[i], logits), MOE_OK);
        ck_assert_int_le(dec.n, S);
        ck_assert_int_eq(moe_model_forward(win, dec.win, NULL, NULL, 1, dec.n, MOE_KEY_STEP(0), 0, NULL), MOE_OK);
        ck_assert_int_eq(moe_model_get_logits(win, full), MOE_OK);
        double e = tu_rel_err(logits, full + (dec.n - 1) * 256, 256);
        worst = e > worst ? e : worst;
    }
    ck_assert_int_eq(dec.slides, 5); /* at 32, 48, 64, 80, 96 */
    printf("sample: decoder vs fresh forward over its window, worst rel err %.2e over %d tokens, %lld slides\n",
           worst, 3 * S + 5, (long long)dec.slides);
    ck_assert_double_le(worst, 1e-5);
    moe_decoder_free(&dec);
    ck_assert_int_eq(moe_decoder_init(&dec, m, MAXP + 1), MOE_ERR_ARG);
    ck_assert_int_eq(moe_decoder_init(&dec, m, 0), MOE_ERR_ARG);
    moe_decoder_free(&dec); /* NULL-safe after a refusal */
    free(full);
    free(x);
}
END_TEST

int main(int argc, char **argv)
{
    (void)argc;
    passive_omp(argv);
    Suite *s = suite_create("sample");
    TCase *tc = tcase_create("sample");
    tcase_add_checked_fixture(tc, setup, teardown); /* in the forked child: OpenMP does not survive fork */
    tcase_set_timeout(tc, 120);
    tcase_add_test(tc, test_past_the_context);
    tcase_add_test(tc, test_slide_reencodes);
    suite_add_tcase(s, tc);
    return tu_run(s);
}
