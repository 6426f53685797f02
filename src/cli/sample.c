/*
 * cmoe sample — generates from the model of a run directory, one token at a time
 * through the KV cache (moe_model_decode), printing as it goes.
 */
#define _POSIX_C_SOURCE 200809L
#include "config.h"

#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "cmoe.h"
#include "commands.h"
#include "io/data.h"
#include "model/model.h"
#include "run.h"
#include "model/sample.h"

typedef struct {
    const char *dir, *prompt, *backend;
    int64_t tokens, top_k, threads;
    double temperature, top_p;
    uint64_t seed;
} sample_opts;

static void defaults(sample_opts *o)
{
    memset(o, 0, sizeof *o);
    o->backend = "cpu";
    o->tokens = 256;
    o->temperature = 0.8;
    o->top_k = 0;
    o->top_p = 0.95;
    o->seed = 1;
}

void help_sample(void)
{
    sample_opts d;
    defaults(&d);
    printf("usage: cmoe sample RUN_DIR [OPTIONS]\n\n"
           "Generates text from the model in RUN_DIR (the --out of cmoe train; it reads\n"
           "RUN_DIR/model.safetensors), one token at a time with a KV cache, and prints it\n"
           "as it goes: the prompt, then the continuation. Byte-level models (vocabulary\n"
           "256) print bytes; other models take and print token ids separated by spaces.\n"
           "Past max_position_embeddings the context slides: the last half is kept.\n\n"
           "Options (default):\n"
           "  --prompt TEXT        what to continue (a new line for byte-level models)\n"
           "  --tokens N           tokens to generate (%" PRId64 ")\n"
           "  --temperature T      softmax temperature; 0 is greedy (%g)\n"
           "  --top-k K            keep the K most probable tokens; 0: all (%" PRId64 ")\n"
           "  --top-p P            keep the most probable tokens whose mass reaches P (%g)\n"
           "  --seed S             seed of the draws: same seed, same text (%" PRIu64 ")\n"
           "  --backend NAME       cpu, ref or cuda (fp32) (%s)\n"
           "  --threads N          worker threads (OpenMP's default)\n"
           "  --help               this text\n\n"
           "Exit status: 0 ok, 1 failure (no run or weights there; the reason on stderr), 2 usage.\n",
           d.tokens, d.temperature, d.top_k, d.top_p, d.seed, d.backend);
}

static int usage(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    fputs("cmoe sample: ", stderr);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fputs("\nTry 'cmoe help sample'.\n", stderr);
    return EXIT_USAGE;
}

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* The prompt as tokens: bytes for byte-level models (V = 256), else whitespace/comma-separated ids. */
static moe_status prompt_tokens(const char *prompt, int64_t V, int32_t *out, int64_t *n)
{
    int64_t k = 0;
    if (V == 256) {
        for (const unsigned char *p = (const unsigned char *)prompt; *p; p++)
            out[k++] = *p;
    } else {
        const char *p = prompt;
        while (*p) {
            while (*p == ' ' || *p == ',' || *p == '\t' || *p == '\n')
                p++;
            if (!*p)
                break;
            char *end;
            errno = 0;
            long long v = strtoll(p, &end, 10);
            if (end == p || errno || v < 0 || v >= V)
                return moe_error(MOE_ERR_ARG,
                                 "--prompt: this model has %lld tokens, so the prompt is token ids in [0, %lld) "
                                 "separated by spaces; '%.20s' is not one",
                                 (long long)V, (long long)V, p);
            out[k++] = (int32_t)v;
            p = end;
        }
    }
    *n = k;
    return MOE_OK;
}

static void emit(int32_t tok, int64_t V)
{
    if (V == 256)
        putchar(tok);
    else
        printf("%d ", (int)tok);
    fflush(stdout);
}

/* Decodes hist[start, n) from position 0 into a fresh cache; logits of the last. */
static moe_status refill(moe_model *m, const int32_t *hist, int64_t start, int64_t n, double *logits)
{
    for (int64_t i = start; i < n; i++) {
        moe_status s = moe_model_decode(m, hist[i], i - start, logits);
        if (s)
            return s;
    }
    return MOE_OK;
}

static moe_status generate(const sample_opts *o, cli_run *r)
{
    const moe_model_config *c = &r->cfg;
    const int64_t V = c->vocab_size;
    size_t plen = strlen(o->prompt ? o->prompt : "");
    int64_t cap = (int64_t)plen + o->tokens + 1;
    int32_t *hist = malloc((size_t)cap * sizeof *hist);
    double *logits = malloc((size_t)V * sizeof *logits), *probs = malloc((size_t)V * sizeof *probs);
    moe_status s;
    if (!hist || !logits || !probs) {
        s = moe_error(MOE_ERR_NOMEM, "out of memory");
        goto done;
    }
    int64_t n = 0;
    if ((s = prompt_tokens(o->prompt ? o->prompt : "", V, hist, &n)))
        goto done;
    if (n == 0) /* a start token: a line break (Brown has a sentence per line), GPT-2's <|endoftext|> */
        hist[n++] = V == 256 ? '\n' : V == MOE_GPT2_VOCAB ? MOE_GPT2_VOCAB - 1 : 0;
    else
        for (int64_t i = 0; i < n; i++)
            emit(hist[i], V);
    /* the model holds W positions: enough for all, or max_position_embeddings */
    const int64_t W = n + o->tokens < c->max_position_embeddings ? n + o->tokens : c->max_position_embeddings;
    if ((s = cli_run_build(r, o->backend, (int)o->threads, 1, W)))
        goto done;
    const int64_t keep = W / 2 > 0 ? W / 2 : 1;
    int64_t start = n > W ? n - keep : 0;
    double t0 = now();
    if ((s = refill(r->model, hist, start, n, logits)))
        goto done;
    for (int64_t g = 0; g < o->tokens; g++) {
        int32_t tok;
        double u = moe_rand_uniform(o->seed, MOE_RNG_SAMPLE, 0, (uint32_t)g, 0);
        if ((s = moe_sample_token(&tok, probs, logits, V, o->temperature, o->top_k, o->top_p, u)))
            goto done;
        emit(tok, V);
        hist[n++] = tok;
        if (g + 1 == o->tokens)
            break;
        if (n - start > W) { /* the cache is full: keep the last half and go on */
            start = n - keep;
            s = refill(r->model, hist, start, n, logits);
        } else {
            s = moe_model_decode(r->model, tok, n - 1 - start, logits);
        }
        if (s)
            goto done;
    }
    double dt = now() - t0;
    if (V != 256 || hist[n - 1] != '\n')
        putchar('\n');
    fflush(stdout);
    fprintf(stderr, "cmoe sample: %lld tokens in %.2f s (%.1f tokens/s), step %lld of %s\n", (long long)o->tokens,
            dt, dt > 0 ? (double)o->tokens / dt : 0.0, (long long)r->step, o->dir);
done:
    free(hist);
    free(logits);
    free(probs);
    return s;
}

enum { OPT_PROMPT = 256, OPT_TOKENS, OPT_TEMP, OPT_TOPK, OPT_TOPP, OPT_SEED, OPT_BACKEND, OPT_THREADS, OPT_HELP };

int cmd_sample(int argc, char **argv)
{
    static const struct option longopts[] = {
        {"prompt", required_argument, NULL, OPT_PROMPT},
        {"tokens", required_argument, NULL, OPT_TOKENS},
        {"temperature", required_argument, NULL, OPT_TEMP},
        {"top-k", required_argument, NULL, OPT_TOPK},
        {"top-p", required_argument, NULL, OPT_TOPP},
        {"seed", required_argument, NULL, OPT_SEED},
        {"backend", required_argument, NULL, OPT_BACKEND},
        {"threads", required_argument, NULL, OPT_THREADS},
        {"help", no_argument, NULL, OPT_HELP},
        {NULL, 0, NULL, 0},
    };
    sample_opts o;
    defaults(&o);
    optind = 0; /* glibc: a full restart, so options may follow RUN_DIR (main() ran getopt with "+") */
    opterr = 0;
    int opt;
    int64_t v;
    while ((opt = getopt_long(argc, argv, ":", longopts, NULL)) != -1) {
        switch (opt) {
        case OPT_PROMPT: o.prompt = optarg; break;
        case OPT_TOKENS:
            if (!cli_parse_i64(optarg, 1, (int64_t)1 << 30, &o.tokens))
                return usage("--tokens: '%s' is not an integer in [1, %lld]", optarg, (long long)1 << 30);
            break;
        case OPT_TEMP:
            if (!cli_parse_double(optarg, &o.temperature) || o.temperature < 0)
                return usage("--temperature: '%s' is not a number >= 0", optarg);
            break;
        case OPT_TOPK:
            if (!cli_parse_i64(optarg, 0, INT32_MAX, &o.top_k))
                return usage("--top-k: '%s' is not an integer >= 0", optarg);
            break;
        case OPT_TOPP:
            if (!cli_parse_double(optarg, &o.top_p) || !(o.top_p > 0 && o.top_p <= 1))
                return usage("--top-p: '%s' is not a number in (0, 1]", optarg);
            break;
        case OPT_SEED:
            if (!cli_parse_i64(optarg, 0, INT64_MAX, &v))
                return usage("--seed: '%s' is not a non-negative integer", optarg);
            o.seed = (uint64_t)v;
            break;
        case OPT_BACKEND:
            if (strcmp(optarg, "cpu") && strcmp(optarg, "ref") && strcmp(optarg, "cuda"))
                return usage("--backend: '%s' is not one of cpu, ref, cuda", optarg);
            o.backend = optarg;
            break;
        case OPT_THREADS:
            if (!cli_parse_i64(optarg, 0, 4096, &o.threads))
                return usage("--threads: '%s' is not an integer in [0, 4096]", optarg);
            break;
        case OPT_HELP: help_sample(); return EXIT_OK;
        case ':': return usage("option '%s' needs an argument", argv[optind - 1]);
        default: return usage("unknown option '%s'", argv[optind - 1]);
        }
    }
    if (optind >= argc)
        return usage("which run? give RUN_DIR (the --out DIR of cmoe train)");
    if (optind + 1 < argc)
        return usage("unexpected argument '%s'", argv[optind + 1]);
    o.dir = argv[optind];
    cli_run r;
    moe_status s = cli_run_open(o.dir, &r);
    if (!s)
        s = generate(&o, &r);
    cli_run_free(&r);
    if (s) {
        fflush(stdout);
        fprintf(stderr, "cmoe sample: %s\n", moe_last_error());
        return EXIT_FAIL;
    }
    return EXIT_OK;
}
