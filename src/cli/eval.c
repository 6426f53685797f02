/*
 * cmoe eval — validation loss, perplexity and bits per byte (or per token) of the model
 * in a run directory, over the validation split of its data or of --data.
 */
#define _POSIX_C_SOURCE 200809L
#include "config.h"

#include <getopt.h>
#include <inttypes.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <jansson.h>

#include "cmoe.h"
#include "commands.h"
#include "io/data.h"
#include "model/model.h"
#include "run.h"

typedef struct {
    const char *dir, *data, *backend;
    int64_t batch, seq, max_batches, threads;
    int json;
} eval_opts;

void help_eval(void)
{
    printf("usage: cmoe eval RUN_DIR [OPTIONS]\n\n"
           "Evaluates the model in RUN_DIR (RUN_DIR/model.safetensors, written by cmoe train)\n"
           "on the validation split of a dataset: mean cross-entropy (nats), perplexity, and\n"
           "bits per byte for byte-level text (loss / ln 2) or bits per token otherwise.\n"
           "Every validation token but each file's first is predicted once, in rows of\n"
           "--seq tokens.\n\n"
           "Options (default):\n"
           "  --data PATH          dataset (the run's training data); see cmoe help train\n"
           "  --seq S              tokens of context per row (the run's --seq, at most\n"
           "                       max_position_embeddings)\n"
           "  --batch B            rows per forward pass (the run's --batch)\n"
           "  --max-batches N      stop after N batches; 0: the whole split (0)\n"
           "  --backend NAME       cpu, ref or cuda (fp32) (cpu)\n"
           "  --threads N          worker threads (OpenMP's default)\n"
           "  --json               print one JSON object instead of text\n"
           "  --help               this text\n\n"
           "Exit status: 0 ok, 1 failure (no run, bad data; the reason on stderr), 2 usage.\n");
}

static int usage(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    fputs("cmoe eval: ", stderr);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fputs("\nTry 'cmoe help eval'.\n", stderr);
    return EXIT_USAGE;
}

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static moe_status evaluate(const eval_opts *o, cli_run *r)
{
    const char *path = o->data ? o->data : r->data;
    if (!path)
        return moe_error(MOE_ERR_ARG, "%s does not say which data it was trained on; pass --data PATH", r->path);
    int64_t S = o->seq ? o->seq : r->seq ? r->seq : r->cfg.max_position_embeddings;
    int64_t B = o->batch ? o->batch : r->batch ? r->batch : 8;
    if (S > r->cfg.max_position_embeddings) {
        if (o->seq)
            return moe_error(MOE_ERR_ARG, "--seq %lld is longer than the model's max_position_embeddings %lld",
                             (long long)S, (long long)r->cfg.max_position_embeddings);
        S = r->cfg.max_position_embeddings;
    }
    moe_data_options dopt;
    moe_data_options_default(&dopt);
    dopt.vocab = r->cfg.vocab_size <= 65536 ? r->cfg.vocab_size : 65536;
    moe_dataset *d = NULL;
    int32_t *in = NULL, *tg = NULL, *task = NULL;
    moe_status s;
    if ((s = moe_dataset_open(path, &dopt, &d)))
        return s;
    if (moe_dataset_vocab(d) > r->cfg.vocab_size) {
        s = moe_error(MOE_ERR_ARG, "data '%s' has vocabulary %lld but the model's vocab_size is %lld", path,
                      (long long)moe_dataset_vocab(d), (long long)r->cfg.vocab_size);
        goto done;
    }
    in = malloc((size_t)(B * S) * sizeof *in);
    tg = malloc((size_t)(B * S) * sizeof *tg);
    task = malloc((size_t)(B * S) * sizeof *task);
    if (!in || !tg || !task) {
        s = moe_error(MOE_ERR_NOMEM, "out of memory for a batch of %lld x %lld", (long long)B, (long long)S);
        goto done;
    }
    if ((s = cli_run_build(r, o->backend, (int)o->threads, B, S)))
        goto done;
    double t0 = now(), sum = 0, shown = t0;
    const int tty = isatty(STDERR_FILENO);
    int64_t total = 0, batches = 0;
    moe_val_iter it;
    moe_val_iter_init(&it);
    for (; o->max_batches <= 0 || batches < o->max_batches; batches++) {
        int64_t n;
        moe_model_losses L;
        if ((s = moe_dataset_val_next(d, &it, B, S, in, tg, task, &n)))
            goto done;
        if (n == 0)
            break;
        if ((s = moe_model_forward(r->model, in, tg, task, B, S, MOE_KEY_STEP(0), 0, &L)))
            goto done;
        sum += L.ce * (double)L.n_targets;
        total += L.n_targets;
        if (tty && now() - shown > 0.5) { /* the whole Brown split takes minutes */
            fprintf(stderr, "\rcmoe eval: %lld of %lld tokens, loss %.4f\033[K", (long long)total,
                    (long long)moe_dataset_val_tokens(d), sum / (double)total);
            shown = now();
        }
    }
    if (tty)
        fprintf(stderr, "\r\033[K");
    if (total == 0) {
        s = moe_error(MOE_ERR_ARG, "data '%s' has no validation tokens to evaluate on (%s)", path,
                      moe_dataset_describe(d));
        goto done;
    }
    const double loss = sum / (double)total, bits = loss / log(2.0), dt = now() - t0;
    const int bytes = moe_dataset_kind(d) == MOE_DATA_TEXT;
    const char *unit = bytes ? "byte" : "token";
    if (o->json) {
        char key[32];
        snprintf(key, sizeof key, "bits_per_%s", unit);
        json_t *j = json_pack("{s:s, s:I, s:s, s:I, s:I, s:f, s:f, s:f, s:f}", "run", o->dir, "step",
                              (json_int_t)r->step, "data", path, "tokens", (json_int_t)total, "seq", (json_int_t)S,
                              "loss", loss, "perplexity", exp(loss), key, bits, "seconds", dt);
        char *text = j ? json_dumps(j, JSON_PRESERVE_ORDER) : NULL;
        if (text)
            printf("%s\n", text);
        free(text);
        json_decref(j);
        if (!text) {
            s = moe_error(MOE_ERR_NOMEM, "out of memory");
            goto done;
        }
    } else {
        printf("cmoe eval: %s (step %lld) on %s\n", o->dir, (long long)r->step, moe_dataset_describe(d));
        printf("  %lld validation tokens in rows of %lld (%lld batches, %.1f s)\n", (long long)total, (long long)S,
               (long long)batches, dt);
        printf("  loss %.4f nats/%s   perplexity %.3f   bits per %s %.4f\n", loss, unit, exp(loss), unit, bits);
    }
done:
    moe_dataset_free(d);
    free(in);
    free(tg);
    free(task);
    return s;
}

enum { OPT_DATA = 256, OPT_SEQ, OPT_BATCH, OPT_MAXB, OPT_BACKEND, OPT_THREADS, OPT_JSON, OPT_HELP };

int cmd_eval(int argc, char **argv)
{
    static const struct option longopts[] = {
        {"data", required_argument, NULL, OPT_DATA},
        {"seq", required_argument, NULL, OPT_SEQ},
        {"batch", required_argument, NULL, OPT_BATCH},
        {"max-batches", required_argument, NULL, OPT_MAXB},
        {"backend", required_argument, NULL, OPT_BACKEND},
        {"threads", required_argument, NULL, OPT_THREADS},
        {"json", no_argument, NULL, OPT_JSON},
        {"help", no_argument, NULL, OPT_HELP},
        {NULL, 0, NULL, 0},
    };
    eval_opts o;
    memset(&o, 0, sizeof o);
    o.backend = "cpu";
    optind = 0; /* glibc: a full restart, so options may follow RUN_DIR (main() ran getopt with "+") */
    opterr = 0;
    int opt;
    while ((opt = getopt_long(argc, argv, ":", longopts, NULL)) != -1) {
        switch (opt) {
        case OPT_DATA: o.data = optarg; break;
        case OPT_JSON: o.json = 1; break;
        case OPT_SEQ:
            if (!cli_parse_i64(optarg, 1, 1 << 20, &o.seq))
                return usage("--seq: '%s' is not an integer in [1, %d]", optarg, 1 << 20);
            break;
        case OPT_BATCH:
            if (!cli_parse_i64(optarg, 1, 1 << 20, &o.batch))
                return usage("--batch: '%s' is not an integer in [1, %d]", optarg, 1 << 20);
            break;
        case OPT_MAXB:
            if (!cli_parse_i64(optarg, 0, INT64_MAX, &o.max_batches))
                return usage("--max-batches: '%s' is not an integer >= 0", optarg);
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
        case OPT_HELP: help_eval(); return EXIT_OK;
        case ':': return usage("option '%s' needs an argument", argv[optind - 1]);
        default: return usage("unknown option '%s'", argv[optind - 1]);
        }
    }
    if (optind >= argc)
        return usage("which run? give RUN_DIR (the --out DIR of cmoe train)");
    if (optind + 1 < argc)
        return usage("unexpected argument '%s'", argv[optind + 1]);
    o.dir = argv[optind];
    if (o.batch && o.seq && o.batch * o.seq > ((int64_t)1 << 31))
        return usage("--batch x --seq = %lld tokens is too many", (long long)(o.batch * o.seq));
    cli_run r;
    moe_status s = cli_run_open(o.dir, &r);
    if (!s)
        s = evaluate(&o, &r);
    cli_run_free(&r);
    if (s) {
        fprintf(stderr, "cmoe eval: %s\n", moe_last_error());
        return EXIT_FAIL;
    }
    return EXIT_OK;
}
