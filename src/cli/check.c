/*
 * cmoe check — every op of a backend against the oracle (src/backend/check.h): one line
 * per comparison (op, shape, normalised error, tolerance, ok), a summary, and exit status
 * 1 when any comparison fails.
 */
#include "config.h"

#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "backend/check.h"
#include "cmoe.h"
#include "commands.h"

void help_check(void)
{
    printf("usage: cmoe check [OPTIONS]\n\n"
           "Runs every op of a backend against the oracle (the ref backend, in double) on\n"
           "fresh random inputs over a table of shapes (T prime, E = 1, k = E, experts\n"
           "without tokens, all tokens to one expert, capacity overflow), the language\n"
           "model's ops, and the MoE layer as a whole for every router. The backend's\n"
           "outputs are NaN-poisoned first. Prints one line per comparison: op, shape,\n"
           "relative error ||b - ref|| / ||ref||, tolerance, ok; exits 1 if any fails.\n\n"
           "Options (default):\n"
           "  --backend NAME   the backend to check: %s (cpu)\n"
           "  --dtype TYPE     its compute type: fp32 or bf16 (a GPU backend; fp32)\n"
           "  --tol X          tolerance (1e-5 for fp32, 2e-2 for bf16)\n"
           "  --seed N         of the random inputs (from the clock; printed)\n"
           "  --quick          the small shapes only\n"
           "  --only PREFIX    the comparisons whose op starts with PREFIX (e.g. experts)\n"
           "  --failures       print the failing comparisons only (and the summary)\n"
           "  --help           this text\n",
           moe_backend_list());
}

static int usage(const char *fmt, const char *arg)
{
    fprintf(stderr, "cmoe check: ");
    fprintf(stderr, fmt, arg);
    fprintf(stderr, "\nTry 'cmoe help check'.\n");
    return EXIT_USAGE;
}

typedef struct {
    int failures_only;
    double worst;
    char worst_op[96], worst_shape[96];
} printer;

static void print_row(const moe_check_row *r, void *ctx)
{
    printer *p = ctx;
    if (r->ok && r->err > p->worst) {
        p->worst = r->err;
        snprintf(p->worst_op, sizeof p->worst_op, "%s", r->op);
        snprintf(p->worst_shape, sizeof p->worst_shape, "%s", r->shape);
    }
    if (p->failures_only && r->ok)
        return;
    printf("%-30s %-44s %10.3e %8.1e %s", r->op, r->shape, r->err, r->tol, r->ok ? "ok" : "FAIL");
    if (r->note)
        printf("  (%s)", r->note);
    printf("\n");
    fflush(stdout);
}

int cmd_check(int argc, char **argv)
{
    enum { O_BACKEND = 256, O_DTYPE, O_TOL, O_SEED, O_QUICK, O_ONLY, O_FAILURES, O_HELP };
    static const struct option longopts[] = {
        {"backend", required_argument, NULL, O_BACKEND}, {"dtype", required_argument, NULL, O_DTYPE},
        {"tol", required_argument, NULL, O_TOL},         {"seed", required_argument, NULL, O_SEED},
        {"quick", no_argument, NULL, O_QUICK},           {"only", required_argument, NULL, O_ONLY},
        {"failures", no_argument, NULL, O_FAILURES},     {"help", no_argument, NULL, O_HELP},
        {NULL, 0, NULL, 0},
    };
    const char *backend = "cpu", *dtype = NULL;
    moe_check_options o = {0};
    o.seed = (uint64_t)time(NULL);
    printer pr = {0};
    optind = 0;
    opterr = 0;
    int opt;
    while ((opt = getopt_long(argc, argv, ":", longopts, NULL)) != -1) {
        char *end;
        switch (opt) {
        case O_BACKEND: backend = optarg; break;
        case O_DTYPE:
            if (strcmp(optarg, "fp32") && strcmp(optarg, "bf16"))
                return usage("--dtype must be fp32 or bf16 (got '%s')", optarg);
            dtype = optarg;
            break;
        case O_TOL:
            errno = 0;
            o.tol = strtod(optarg, &end);
            if (errno || end == optarg || *end || !(o.tol > 0) || !isfinite(o.tol))
                return usage("--tol must be a number > 0 (got '%s')", optarg);
            break;
        case O_SEED:
            errno = 0;
            o.seed = strtoull(optarg, &end, 10);
            if (errno || end == optarg || *end || optarg[0] == '-')
                return usage("--seed must be an integer >= 0 (got '%s')", optarg);
            break;
        case O_QUICK: o.quick = 1; break;
        case O_ONLY: o.only = optarg; break;
        case O_FAILURES: pr.failures_only = 1; break;
        case O_HELP: help_check(); return EXIT_OK;
        case ':': return usage("option '%s' needs an argument", argv[optind - 1]);
        default: return usage("unknown option '%s'", argv[optind - 1]);
        }
    }
    if (optind < argc)
        return usage("unexpected argument '%s'", argv[optind]);
    if (!strcmp(backend, "ref"))
        return usage("--backend %s: ref is the oracle the others are checked against", backend);
    moe_backend *b = NULL;
    moe_status s = moe_backend_create(backend, &(moe_backend_options){.dtype = dtype}, &b);
    if (s) {
        fprintf(stderr, "cmoe check: %s\n", moe_last_error());
        return s == MOE_ERR_ARG ? EXIT_USAGE : EXIT_FAIL;
    }
    printf("cmoe check: backend %s (%s) against ref, seed %" PRIu64 "%s\n", backend,
           moe_dtype_name(b->float_type), o.seed, o.quick ? ", quick" : "");
    printf("%-30s %-44s %10s %8s %s\n", "op", "shape", "rel.err", "tol", "ok");
    int failed = 0, rows = 0;
    s = moe_backend_check(b, &o, print_row, &pr, &failed, &rows);
    moe_backend_free(b);
    if (s) {
        fprintf(stderr, "cmoe check: %s\n", moe_last_error());
        return EXIT_FAIL;
    }
    printf("cmoe check: %d of %d comparisons failed", failed, rows);
    if (*pr.worst_op)
        printf("; the largest passing error %.3e (%s, %s)", pr.worst, pr.worst_op, pr.worst_shape);
    printf("\n");
    return failed || rows == 0 ? EXIT_FAIL : EXIT_OK;
}
