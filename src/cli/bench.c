/*
 * cmoe bench layer — times forward + backward of one MoE layer on a backend, splits the
 * time by phase, and measures in the same run the machine's ceiling: one cblas_sgemm
 * (OpenBLAS with its own threads, its best setting) of the same total FLOPs, or on the
 * cuda backend one cuBLAS GEMM of them in the compute type (--dtype).
 */
#include "config.h"

#include <cblas.h>
#include <errno.h>
#include <getopt.h>
#include <limits.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "cmoe.h"
#include "commands.h"
#include "model/model.h"
#include "layer/moe_layer.h"
#include "presets.h"

void help_bench(void)
{
    printf("usage: cmoe bench layer [OPTIONS]\n\n"
           "Times forward + backward of one MoE layer (random inputs and weights) and\n"
           "prints the median, a per-phase split, GFLOP/s, and the ratio to one\n"
           "cblas_sgemm (cuda: one cuBLAS GEMM in the compute type) of the same total\n"
           "FLOPs measured in the same run.\n\n"
           "Options (default):\n"
           "  --backend NAME         one of this build's: %s (cpu)\n"
           "  --dtype TYPE           compute type: fp32 or bf16 (bf16 needs cuda; fp32)\n"
           "  --tokens T             tokens per batch (4096)\n"
           "  --d-model D            hidden size (512)\n"
           "  --d-ff F               expert intermediate size (2048)\n"
           "  --experts E            routed experts (8)\n"
           "  --top-k K              experts per token (2)\n"
           "  --shared N             shared experts, each of size F (0)\n"
           "  --act NAME             relu, gelu, gelu_tanh, geglu, swiglu (swiglu)\n"
           "  --router NAME          topk, noisy_topk, expert_choice, hash, sinkhorn (topk)\n"
           "  --capacity-factor CF   <= 0: dropless (0; expert_choice: 1)\n"
           "  --preset NAME          take the layer from a model preset (configs/NAME.json, as\n"
           "                         cmoe info): its d-model, d-ff, experts, top-k, router,\n"
           "                         activation, capacity, shared experts and residual branch\n"
           "                         replace the options above; --tokens still applies\n"
           "  --layer I              which layer of the preset (the first MoE layer)\n"
           "  --threads N            threads (OpenMP's default)\n"
           "  --iters N              timed iterations (10)\n"
           "  --warmup N             untimed iterations first (2)\n"
           "  --json                 print one JSON object instead of text\n"
           "  --help                 this text\n\n"
           "FLOPs count the GEMMs only (router, experts, shared): forward 2·m·n·k each,\n"
           "backward twice that. Gradients accumulate across iterations (zero_grad is\n"
           "outside the timed region). On cuda an iteration ends with a sync and the\n"
           "phases are the host's time to enqueue them (CMOE_CUDA_SYNC=1 makes every op\n"
           "wait, so that the phases are the device's time, and the total slower).\n\n", moe_backend_list());
    help_bench_a2a();
}

static int usage(const char *fmt, const char *arg)
{
    fprintf(stderr, "cmoe bench: ");
    fprintf(stderr, fmt, arg);
    fprintf(stderr, "\nTry 'cmoe help bench'.\n");
    return EXIT_USAGE;
}

/* A whole number in [lo, hi], or -1 (with a message). */
static int parse_int(const char *s, long long lo, long long hi, const char *name, long long *out)
{
    char *end;
    errno = 0;
    long long v = strtoll(s, &end, 10);
    if (errno || end == s || *end || v < lo || v > hi) {
        fprintf(stderr, "cmoe bench: %s must be an integer in [%lld, %lld] (got '%s')\n", name, lo, hi, s);
        return -1;
    }
    *out = v;
    return 0;
}

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static double median(double *v, int n)
{
    qsort(v, (size_t)n, sizeof *v, cmp_double);
    return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

/* GFLOP/s of one square-ish sgemm of `flops`, median of 3, OpenBLAS with `threads`. */
static double sgemm_ceiling(double flops, int threads, int64_t *side)
{
    int64_t m = (int64_t)cbrt(flops / 2.0);
    m = m < 256 ? 256 : (m > 8192 ? 8192 : m);
    m = m / 16 * 16;
    *side = m;
    float *A = malloc((size_t)(m * m) * sizeof *A), *B = malloc((size_t)(m * m) * sizeof *B),
          *C = malloc((size_t)(m * m) * sizeof *C);
    if (!A || !B || !C) {
        free(A);
        free(B);
        free(C);
        return NAN;
    }
    for (int64_t i = 0; i < m * m; i++) {
        A[i] = (float)((i * 7 % 13) - 6) * 0.01f;
        B[i] = (float)((i * 5 % 11) - 5) * 0.01f;
    }
    int old = openblas_get_num_threads();
    openblas_set_num_threads(threads);
    double t[4];
    for (int r = 0; r < 4; r++) {
        double t0 = now();
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, (blasint)m, (blasint)m, (blasint)m, 1.0f, A,
                    (blasint)m, B, (blasint)m, 0.0f, C, (blasint)m);
        t[r] = now() - t0;
    }
    openblas_set_num_threads(old);
    free(A);
    free(B);
    free(C);
    double med = median(t + 1, 3); /* the first call warms up */
    return 2.0 * (double)m * m * m / med / 1e9;
}

static int lookup(const char *s, const char *const *names, int n)
{
    for (int i = 0; i < n; i++)
        if (strcmp(s, names[i]) == 0)
            return i;
    return -1;
}

typedef struct {
    const char *backend, *dtype;
    long long T, d, f, E, k, shared, threads, iters, warmup;
    int act, router, json;
    double cf;
    int cf_set;
    const char *preset;    /* --preset: the layer config below replaces the shape options */
    long long layer;       /* --layer, -1: the first MoE layer */
    moe_layer_config pcfg;
} bench_opts;

/* --preset NAME --layer I: the shape options from that layer of the model preset. */
static int resolve_preset(bench_opts *o)
{
    moe_model_config mc;
    char src[4200];
    if (cli_preset_load(o->preset, &mc, src, sizeof src)) {
        fprintf(stderr, "cmoe bench: %s\n", moe_last_error());
        return EXIT_FAIL;
    }
    if (o->layer < 0)
        for (o->layer = 0; o->layer < mc.num_hidden_layers && moe_model_layer_experts(&mc, o->layer) <= 0;)
            o->layer++;
    if (o->layer >= mc.num_hidden_layers) {
        fprintf(stderr, "cmoe bench: --layer %lld: %s has %lld layers%s\n", o->layer, src,
                (long long)mc.num_hidden_layers, o->layer == mc.num_hidden_layers ? ", none of them MoE" : "");
        return EXIT_USAGE;
    }
    if (moe_model_layer_config(&mc, o->layer, &o->pcfg)) {
        fprintf(stderr, "cmoe bench: --layer %lld of %s: %s\n", o->layer, src, moe_last_error());
        return EXIT_USAGE;
    }
    const moe_layer_config *c = &o->pcfg;
    o->d = c->d_model, o->f = c->d_ff, o->E = c->n_experts, o->k = c->top_k, o->shared = c->n_shared;
    o->act = (int)c->act, o->router = (int)c->router, o->cf = c->capacity_factor, o->cf_set = 1;
    return 0;
}

static int parse(int argc, char **argv, bench_opts *o)
{
    static const char *const acts[] = {"relu", "gelu", "gelu_tanh", "geglu", "swiglu"};
    static const char *const routers[] = {"topk", "noisy_topk", "expert_choice", "hash", "sinkhorn"};
    enum { O_BACKEND = 256, O_DTYPE, O_TOKENS, O_D, O_F, O_E, O_K, O_SHARED, O_ACT, O_ROUTER, O_CF, O_THREADS, O_ITERS,
           O_WARMUP, O_JSON, O_HELP, O_PRESET, O_LAYER };
    static const struct option longopts[] = {
        {"backend", required_argument, NULL, O_BACKEND}, {"tokens", required_argument, NULL, O_TOKENS},
        {"dtype", required_argument, NULL, O_DTYPE},
        {"d-model", required_argument, NULL, O_D},        {"d-ff", required_argument, NULL, O_F},
        {"experts", required_argument, NULL, O_E},        {"top-k", required_argument, NULL, O_K},
        {"shared", required_argument, NULL, O_SHARED},    {"act", required_argument, NULL, O_ACT},
        {"router", required_argument, NULL, O_ROUTER},    {"capacity-factor", required_argument, NULL, O_CF},
        {"threads", required_argument, NULL, O_THREADS},  {"iters", required_argument, NULL, O_ITERS},
        {"warmup", required_argument, NULL, O_WARMUP},    {"json", no_argument, NULL, O_JSON},
        {"help", no_argument, NULL, O_HELP},              {"preset", required_argument, NULL, O_PRESET},
        {"layer", required_argument, NULL, O_LAYER},      {NULL, 0, NULL, 0},
    };
    *o = (bench_opts){.backend = "cpu", .T = 4096, .d = 512, .f = 2048, .E = 8, .k = 2, .iters = 10,
                      .warmup = 2, .act = MOE_ACT_SWIGLU, .router = MOE_ROUTER_TOPK, .layer = -1};
    optind = 1;
    opterr = 0;
    int opt, r = 0;
    const long long BIG = 1LL << 31;
    while ((opt = getopt_long(argc, argv, ":", longopts, NULL)) != -1) {
        switch (opt) {
        case O_BACKEND:
            if (strcmp(optarg, "cpu") && strcmp(optarg, "ref") && strcmp(optarg, "cuda"))
                return usage("--backend must be cpu, ref or cuda (got '%s')", optarg);
            o->backend = optarg;
            break;
        case O_DTYPE:
            if (strcmp(optarg, "fp32") && strcmp(optarg, "bf16"))
                return usage("--dtype must be fp32 or bf16 (got '%s')", optarg);
            o->dtype = optarg;
            break;
        case O_TOKENS: r = parse_int(optarg, 1, INT32_MAX, "--tokens", &o->T); break;
        case O_D: r = parse_int(optarg, 1, BIG, "--d-model", &o->d); break;
        case O_F: r = parse_int(optarg, 1, BIG, "--d-ff", &o->f); break;
        case O_E: r = parse_int(optarg, 1, 1 << 20, "--experts", &o->E); break;
        case O_K: r = parse_int(optarg, 1, 1 << 20, "--top-k", &o->k); break;
        case O_SHARED: r = parse_int(optarg, 0, 1 << 16, "--shared", &o->shared); break;
        case O_THREADS: r = parse_int(optarg, 1, 1024, "--threads", &o->threads); break;
        case O_ITERS: r = parse_int(optarg, 1, 1000000, "--iters", &o->iters); break;
        case O_WARMUP: r = parse_int(optarg, 0, 1000000, "--warmup", &o->warmup); break;
        case O_ACT:
            if ((o->act = lookup(optarg, acts, 5)) < 0)
                return usage("unknown --act '%s' (relu, gelu, gelu_tanh, geglu, swiglu)", optarg);
            break;
        case O_ROUTER:
            if ((o->router = lookup(optarg, routers, 5)) < 0)
                return usage("unknown --router '%s' (topk, noisy_topk, expert_choice, hash, sinkhorn)", optarg);
            break;
        case O_CF: {
            char *end;
            o->cf = strtod(optarg, &end);
            if (end == optarg || *end || !isfinite(o->cf) || o->cf > 1e6)
                return usage("--capacity-factor must be a finite number <= 1e6 (got '%s')", optarg);
            o->cf_set = 1;
            break;
        }
        case O_JSON: o->json = 1; break;
        case O_PRESET: o->preset = optarg; break;
        case O_LAYER: r = parse_int(optarg, 0, MOE_MODEL_MAX_LAYERS - 1, "--layer", &o->layer); break;
        case O_HELP: help_bench(); return -1;
        case ':': return usage("option '%s' needs an argument", argv[optind - 1]);
        default: return usage("unknown option '%s'", argv[optind - 1]);
        }
        if (r)
            return EXIT_USAGE;
    }
    if (optind < argc)
        return usage("unexpected argument '%s'", argv[optind]);
    if (o->layer >= 0 && !o->preset)
        return usage("--layer needs --preset NAME%s", "");
    if (o->preset && (r = resolve_preset(o)))
        return r;
    if (o->k > o->E && o->router != MOE_ROUTER_EXPERT_CHOICE && o->router != MOE_ROUTER_HASH) {
        fprintf(stderr, "cmoe bench: --top-k (%lld) exceeds --experts (%lld)\n", o->k, o->E);
        return EXIT_USAGE;
    }
    /* Every buffer must be addressable: the largest products, in elements of 8 bytes. */
    const long long lim = LLONG_MAX / 64;
    long long rows, m1, m2, m3, m4;
    if (__builtin_mul_overflow(o->T, o->k, &rows) || __builtin_mul_overflow(rows, o->f, &m1) || m1 > lim ||
        __builtin_mul_overflow(o->T, o->d, &m2) || m2 > lim || __builtin_mul_overflow(o->E, o->d, &m3) ||
        __builtin_mul_overflow(m3, o->f, &m4) || m4 > lim || __builtin_mul_overflow(rows, o->d, &m3) || m3 > lim ||
        __builtin_mul_overflow(o->shared, o->f, &m4) || __builtin_mul_overflow(m4, o->T, &m4) || m4 > lim) {
        fprintf(stderr, "cmoe bench: sizes too large: tokens·top-k·d-ff, tokens·d-model or experts·d-model·d-ff "
                        "overflows\n");
        return EXIT_USAGE;
    }
    return 0;
}

typedef struct {
    double fwd_flops, total_flops;
    int64_t n, dropped;
} flop_count;

static flop_count count_flops(const moe_layer_config *c, int64_t T, int64_t n)
{
    const double glu = (c->act == MOE_ACT_GEGLU || c->act == MOE_ACT_SWIGLU) ? 3 : 2;
    const double d = (double)c->d_model, f = (double)c->d_ff, E = (double)c->n_experts;
    double fwd = 2.0 * (double)n * d * f * glu;
    if (c->router != MOE_ROUTER_HASH)
        fwd += 2.0 * (double)T * d * E * (c->router == MOE_ROUTER_NOISY_TOPK ? 2 : 1);
    const double Fs = (double)(c->n_shared * (c->d_ff_shared > 0 ? c->d_ff_shared : c->d_ff));
    const double Fd = c->residual ? (double)(c->d_ff_dense > 0 ? c->d_ff_dense : c->d_ff) : 0;
    fwd += 2.0 * (double)T * d * (Fs + Fd) * glu;
    fwd += 2.0 * (double)T * d * ((c->shared_gate && Fs > 0 ? 1 : 0) + (Fd > 0 ? 2 : 0)); /* gate, mix */
    return (flop_count){fwd, 3.0 * fwd, n, 0};
}

static int run_layer(const bench_opts *o)
{
    moe_layer_config c;
    moe_layer_config_default(&c);
    if (o->preset) {
        c = o->pcfg; /* the layer as the model has it, coefficients included */
    } else {
        c.d_model = o->d;
        c.d_ff = o->f;
        c.n_experts = o->E;
        c.top_k = o->router == MOE_ROUTER_HASH ? 1 : o->k;
        c.router = (moe_router_kind)o->router;
        c.act = (moe_activation)o->act;
        c.capacity_factor = o->cf_set ? o->cf : (o->router == MOE_ROUTER_EXPERT_CHOICE ? 1.0 : 0.0);
        c.n_shared = o->shared;
        c.d_ff_shared = o->f;
        if (o->router != MOE_ROUTER_HASH)
            c.lb_coef = 0.01;
    }
    moe_status st = moe_layer_config_validate(&c, o->T);
    if (st) {
        fprintf(stderr, "cmoe bench: %s\n", moe_last_error());
        return EXIT_USAGE;
    }
    moe_backend *b = NULL;
    moe_layer *L = NULL;
    moe_buf *io = NULL;
    double *host = NULL, *samples = NULL;
    int rc = EXIT_FAIL;
    const int64_t T = o->T, d = o->d;
    if ((st = moe_backend_create(o->backend, &(moe_backend_options){.threads = (int)o->threads, .dtype = o->dtype},
                                 &b)) ||
        (st = moe_layer_create(&c, b, T, NULL, &L)) || (st = moe_layer_init(L, 1.0)) ||
        (st = b->alloc(b, b->float_type, 4 * T * d, &io)))
        goto done;
    const int threads = b->set_threads(b, 0);
    host = malloc((size_t)(T * d) * sizeof *host);
    samples = malloc((size_t)(o->iters * (MOE_PH_COUNT + 1)) * sizeof *samples);
    if (!host || !samples) {
        st = moe_error(MOE_ERR_NOMEM, "bench: out of memory");
        goto done;
    }
    moe_tensor x = {io, 0}, y = {io, T * d}, dy = {io, 2 * T * d}, dx = {io, 3 * T * d};
    for (int64_t i = 0; i < T * d; i++)
        host[i] = moe_rand_normal(7, 99, 0, (uint32_t)i, (uint32_t)(i >> 32));
    moe_upload_f64(b, x, host, T * d);
    for (int64_t i = 0; i < T * d; i++)
        host[i] = moe_rand_normal(8, 99, 0, (uint32_t)i, (uint32_t)(i >> 32)) / sqrt((double)T);
    moe_upload_f64(b, dy, host, T * d);
    moe_layer_zero_grad(L);
    for (long long it = 0; it < o->warmup + o->iters; it++) {
        double t0 = now();
        if ((st = moe_layer_forward(L, y, x, NULL, NULL, T, MOE_KEY_STEP(it), 1)) ||
            (st = moe_layer_backward(L, dx, dy)) || (st = b->sync(b)))
            goto done;
        double t = now() - t0;
        if (it >= o->warmup) {
            int64_t q = it - o->warmup;
            samples[q] = t;
            const double *ph = moe_layer_phase_seconds(L);
            for (int p = 0; p < MOE_PH_COUNT; p++)
                samples[o->iters * (p + 1) + q] = ph[p];
        }
    }
    double counts[2];
    if ((st = moe_download_f64(b, counts, moe_tensor_at(moe_layer_stats(L), MOE_STAT_COUNTS + 2 * c.n_experts), 2)))
        goto done;
    const int64_t n = (int64_t)counts[0], dropped = (int64_t)counts[1];
    flop_count fc = count_flops(&c, T, n);
    double ms = 1e3 * median(samples, (int)o->iters), phase_ms[MOE_PH_COUNT];
    for (int p = 0; p < MOE_PH_COUNT; p++)
        phase_ms[p] = 1e3 * median(samples + o->iters * (p + 1), (int)o->iters);
    int64_t side;
    const int gpu = !strcmp(o->backend, "cuda");
    const char *dtype = moe_dtype_name(b->float_type);
    double gflops = fc.total_flops / (ms * 1e-3) / 1e9, ceil_gflops = 0;
    if (gpu) {
        if ((st = moe_cuda_gemm_ceiling(b->float_type == MOE_BF16 ? "bf16" : "fp32", fc.total_flops, &ceil_gflops,
                                        &side)))
            goto done;
    } else {
        ceil_gflops = sgemm_ceiling(fc.total_flops, threads, &side);
    }
    double frac = gflops / ceil_gflops;
    static const char *const act_names[] = {"relu", "gelu", "gelu_tanh", "geglu", "swiglu"};
    if (o->json) {
        printf("{\"backend\": \"%s\", \"dtype\": \"%s\", \"tokens\": %lld, \"d_model\": %lld, \"d_ff\": %lld, \"experts\": %lld, "
               "\"top_k\": %lld, \"shared\": %lld, \"act\": \"%s\", \"router\": \"%s\", \"capacity_factor\": %g, "
               "\"threads\": %d, \"iters\": %lld, \"warmup\": %lld, \"assignments\": %lld, \"dropped\": %lld, "
               "\"ms_median\": %.4f, \"gflop\": %.4f, \"gflops\": %.3f, \"sgemm_gflops\": %.3f, "
               "\"sgemm_side\": %lld, \"ceiling_fraction\": %.4f, \"phases_ms\": {",
               o->backend, dtype, o->T, o->d, o->f, o->E, (long long)c.top_k, o->shared, act_names[o->act],
               moe_router_name(c.router), c.capacity_factor, threads, o->iters, o->warmup, (long long)n,
               (long long)dropped, ms, fc.total_flops / 1e9, gflops, ceil_gflops, (long long)side, frac);
        for (int p = 0; p < MOE_PH_COUNT; p++)
            printf("%s\"%s\": %.4f", p ? ", " : "", moe_layer_phase_name(p), phase_ms[p]);
        printf("}}\n");
    } else {
        if (gpu)
            printf("cmoe bench layer: backend cuda, %s\n", dtype);
        else
            printf("cmoe bench layer: backend %s, %d thread%s\n", o->backend, threads, threads == 1 ? "" : "s");
        printf("  T=%lld d=%lld f=%lld E=%lld k=%lld shared=%lld act=%s router=%s capacity_factor=%g\n", o->T, o->d,
               o->f, o->E, (long long)c.top_k, o->shared, act_names[o->act], moe_router_name(c.router),
               c.capacity_factor);
        printf("  assignments %lld, dropped %lld; %lld iterations after %lld warm-up\n", (long long)n,
               (long long)dropped, o->iters, o->warmup);
        printf("  forward+backward: median %.2f ms, %.2f GFLOP -> %.1f GFLOP/s\n", ms, fc.total_flops / 1e9, gflops);
        if (gpu)
            printf("  cuBLAS GEMM %lldx%lldx%lld (%s): %.1f GFLOP/s -> ceiling fraction %.3f\n", (long long)side,
                   (long long)side, (long long)side, dtype, ceil_gflops, frac);
        else
            printf("  sgemm %lldx%lldx%lld (OpenBLAS, %d threads): %.1f GFLOP/s -> ceiling fraction %.3f\n",
                   (long long)side, (long long)side, (long long)side, threads, ceil_gflops, frac);
        printf("  phases (median ms):\n");
        for (int p = 0; p < MOE_PH_COUNT; p++)
            printf("    %-13s %9.3f  (%4.1f%%)\n", moe_layer_phase_name(p), phase_ms[p], 100.0 * phase_ms[p] / ms);
    }
    rc = EXIT_OK;
done:
    if (st)
        fprintf(stderr, "cmoe bench: %s\n", moe_last_error());
    free(host);
    free(samples);
    if (b && io)
        b->free(b, io);
    moe_layer_free(L);
    moe_backend_free(b);
    return rc;
}

int cmd_bench(int argc, char **argv)
{
    if (argc < 2) {
        fprintf(stderr, "cmoe bench: which benchmark? (layer, a2a)\nTry 'cmoe help bench'.\n");
        return EXIT_USAGE;
    }
    if (strcmp(argv[1], "--help") == 0 || strcmp(argv[1], "-h") == 0) {
        help_bench();
        return EXIT_OK;
    }
    if (strcmp(argv[1], "a2a") == 0) /* the expert-parallel all-to-all, under mpirun (bench_a2a.c) */
        return cmd_bench_a2a(argc - 1, argv + 1);
    if (strcmp(argv[1], "layer") != 0)
        return usage("unknown benchmark '%s' (layer, a2a)", argv[1]);
    bench_opts o;
    int r = parse(argc - 1, argv + 1, &o);
    if (r < 0)
        return EXIT_OK; /* --help */
    if (r)
        return r;
    return run_layer(&o);
}
