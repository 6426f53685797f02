/*
 * cmoe bench a2a — the expert-parallel all-to-all under mpirun: for each mode (flat, hier)
 * and chunk count, the time of the exchange alone (dispatch and combine, forward and
 * backward: four moves of every routed row) and its bandwidth per rank, then the MoE
 * layer's forward + backward with that exchange, the exchange's share of it, and the bytes
 * it moves per rank against what data parallelism would all-reduce instead (the expert
 * gradients), computed and checked against the exchange's own counters.
 */
#define _POSIX_C_SOURCE 200809L
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "cmoe.h"
#include "commands.h"
#include "dist/exchange_ep.h"
#include "layer/moe_layer.h"
#include "ref/ref.h"

void help_bench_a2a(void)
{
    printf("usage: mpirun -np P cmoe bench a2a [OPTIONS]\n\n"
           "Times the expert-parallel all-to-all of one MoE layer on P ranks (each holding\n"
           "E/P experts and routing its own tokens), alone and inside the layer's forward +\n"
           "backward, for flat and hierarchical all-to-all and several chunk counts.\n\n"
           "Options (default):\n"
           "  --tokens T           tokens per rank (4096)\n"
           "  --d-model D          row width (512)\n"
           "  --d-ff F             expert intermediate size (1024)\n"
           "  --experts E          experts, a multiple of P (8)\n"
           "  --top-k K            experts per token (2)\n"
           "  --chunks LIST        chunk counts to try, comma-separated (1,2,4)\n"
           "  --a2a MODES          flat, hier or flat,hier (flat,hier)\n"
           "  --ranks-per-node N   hier: N consecutive ranks per node (default: MPI's shared memory)\n"
           "  --iters N            timed iterations (10)\n"
           "  --threads N          threads per rank (1)\n"
           "  --help               this text\n\n"
           "Columns: the exchange's time per iteration (the slowest rank), the bytes it sent\n"
           "to other ranks (a rank's rows for its own experts stay) and their rate, the\n"
           "machine's ceiling for it (GB/s of one memcpy of a move's bytes, same run), the\n"
           "layer's forward + backward and the exchange's share of it, the bytes uniform\n"
           "routing would send (4 moves x tokens x k x (P-1)/P x d x 4), and what data\n"
           "parallelism would all-reduce instead: every expert's gradients, of which a ring\n"
           "sends 2(P-1)/P per rank.\n");
}

typedef struct {
    int64_t T, d, f, E, k, iters, threads, rpn;
    int64_t chunks[8];
    int nchunks;
    int modes; /* bit 0 flat, bit 1 hier */
} a2a_opts;

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static int parse(int argc, char **argv, a2a_opts *o)
{
    *o = (a2a_opts){4096, 512, 1024, 8, 2, 10, 1, 0, {1, 2, 4}, 3, 3};
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!strcmp(a, "--help")) {
            help_bench_a2a();
            return -1;
        }
        if (!v) {
            fprintf(stderr, "cmoe bench a2a: unknown option or missing value '%s'\nTry 'cmoe help bench'.\n", a);
            return EXIT_USAGE;
        }
        i++;
        char *end;
        errno = 0;
        long long n = strtoll(v, &end, 10);
        const int num = !errno && end != v && !*end && n >= 1 && n <= (1 << 24);
        int64_t *dst = !strcmp(a, "--tokens") ? &o->T : !strcmp(a, "--d-model") ? &o->d : !strcmp(a, "--d-ff") ? &o->f
                       : !strcmp(a, "--experts") ? &o->E : !strcmp(a, "--top-k") ? &o->k
                       : !strcmp(a, "--iters") ? &o->iters : !strcmp(a, "--threads") ? &o->threads
                       : !strcmp(a, "--ranks-per-node") ? &o->rpn : NULL;
        if (dst && num) {
            *dst = n;
        } else if (!strcmp(a, "--a2a")) {
            o->modes = (strstr(v, "flat") ? 1 : 0) | (strstr(v, "hier") ? 2 : 0);
            if (!o->modes) {
                fprintf(stderr, "cmoe bench a2a: --a2a '%s': flat, hier or flat,hier\n", v);
                return EXIT_USAGE;
            }
        } else if (!strcmp(a, "--chunks")) {
            o->nchunks = 0;
            for (char *p = (char *)v; *p && o->nchunks < 8;) {
                long long c = strtoll(p, &end, 10);
                if (end == p || c < 1 || c > 64) {
                    fprintf(stderr, "cmoe bench a2a: --chunks '%s': numbers in [1, 64], comma-separated\n", v);
                    return EXIT_USAGE;
                }
                o->chunks[o->nchunks++] = c;
                p = *end == ',' ? end + 1 : end;
            }
        } else {
            fprintf(stderr, "cmoe bench a2a: %s '%s' is not valid\nTry 'cmoe help bench'.\n", a, v);
            return EXIT_USAGE;
        }
    }
    return 0;
}

/* The machine's own ceiling for moving those bytes in shared memory: one memcpy of the
 * same size (the best of 3), GB/s. */
static double memcpy_gbs(double bytes)
{
    const size_t n = bytes > 1 ? (size_t)bytes : 1;
    char *a = malloc(n), *b = malloc(n);
    double best = 0;
    if (a && b) {
        memset(a, 1, n);
        memset(b, 2, n);
        for (int k = 0; k < 3; k++) {
            const double t0 = now();
            memcpy(b, a, n);
            const double t = now() - t0;
            best = t > 0 && (double)n / t > best ? (double)n / t : best;
            a[k] = b[n - 1 - k]; /* the copies must happen */
        }
    }
    free(a);
    free(b);
    return best / 1e9;
}

/* The slowest rank's value (what a synchronous step waits for). */
static double slowest(moe_comm *w, double v)
{
    int64_t us = (int64_t)(v * 1e6);
    moe_comm_allreduce_i64(w, &us, 1, MOE_COMM_MAX, "bench timing");
    return (double)us * 1e-6;
}

static int bench(moe_comm *world, const a2a_opts *o, int hier, int64_t D, moe_backend *b)
{
    const int P = moe_comm_size(world), me = moe_comm_rank(world);
    moe_layer_config c;
    moe_layer_config_default(&c);
    c.d_model = o->d;
    c.d_ff = o->f;
    c.n_experts = o->E;
    c.top_k = o->k;
    moe_ep_options eo;
    moe_ep_options_default(&eo);
    eo.chunks = eo.max_chunks = D;
    eo.hier = hier;
    eo.ranks_per_node = o->rpn;
    moe_exchange *ex = NULL;
    moe_layer *L = NULL;
    moe_xstate *xs = NULL;
    moe_buf *io = NULL, *side = NULL;
    const int64_t T = o->T, d = o->d;
    moe_status s = moe_exchange_ep_create(world, &eo, &ex);
    if (!s)
        s = moe_layer_create(&c, b, T, ex, &L);
    if (!s)
        s = moe_layer_init(L, 1.0);
    if (!s)
        s = b->alloc(b, b->float_type, 4 * T * d, &io);
    if (!s)
        s = ex->state_create(ex, b, &c, T, &xs);
    const int64_t N = T * o->k, R = ex ? ex->expert_rows(xs) : 0;
    if (!s)
        s = b->alloc(b, b->float_type, (N + R) * d, &side);
    double *h = malloc((size_t)(T * d) * sizeof *h);
    if (!s && !h)
        s = moe_error(MOE_ERR_NOMEM, "out of memory");
    for (int64_t i = 0; !s && i < T * d; i++)
        h[i] = moe_rand_normal(7 + (uint64_t)me, 1, 0, (uint32_t)i, 0);
    if (!s)
        s = moe_upload_f64(b, (moe_tensor){io, 0}, h, T * d);
    free(h);
    moe_tensor x = {io, 0}, y = {io, T * d}, dy = {io, 0}, dx = {io, 3 * T * d};
    moe_tensor src = {side, 0}, exp = {side, N * d};
    double t_a2a = 0, t_layer = 0;
    moe_ep_traffic tr;
    for (int phase = 0; phase < 2 && !s; phase++) {
        /* warm-up iteration, then the timed ones */
        for (int64_t it = 0; it <= o->iters && !s; it++) {
            moe_ep_traffic skip;
            if (it == 1) /* the counters from here on: the warm-up's go */
                moe_exchange_ep_traffic(ex, phase ? &skip : &tr, 1);
            const double t0 = now();
            if (phase == 1) {
                moe_layer_zero_grad(L);
                if (!(s = moe_layer_forward(L, y, x, NULL, NULL, T, MOE_KEY_STEP(it), 1)))
                    s = moe_layer_backward(L, dx, dy);
                if (!s)
                    s = b->sync(b);
            } else {
                if (it == 0 && !(s = moe_layer_forward(L, y, x, NULL, NULL, T, MOE_KEY_STEP(0), 1)))
                    s = b->sync(b);
                /* the layer's four moves: x and dy to the experts, y and dx back */
                if (!s)
                    s = ex->plan(xs, moe_layer_plan(L), T);
                for (int rep = 0; rep < 2 && !s; rep++) {
                    for (int64_t ch = 0; ch < D; ch++)
                        ex->to_experts_start(xs, ch, exp, src, d);
                    for (int64_t ch = 0; ch < D && !s; ch++)
                        if (!(s = ex->to_experts_wait(xs, ch)))
                            ex->to_sources_start(xs, ch, src, exp, d);
                    for (int64_t ch = 0; ch < D && !s; ch++)
                        s = ex->to_sources_wait(xs, ch);
                }
            }
            if (it > 0)
                *(phase ? &t_layer : &t_a2a) += now() - t0;
        }
        if (phase == 0)
            moe_exchange_ep_traffic(ex, &tr, 1);
    }
    int rc = EXIT_OK;
    if (s) {
        fprintf(stderr, "cmoe bench a2a: rank %d: %s\n", me, moe_last_error());
        rc = EXIT_FAIL;
    } else {
        t_a2a = slowest(world, t_a2a / (double)o->iters);
        t_layer = slowest(world, t_layer / (double)o->iters);
        const double bytes = (double)tr.bytes_sent / (double)o->iters; /* this rank's, per iteration */
        /* uniform routing sends (P-1)/P of the rows away, four times */
        const double expect = 4.0 * (double)N * (double)(P - 1) / P * (double)d * (double)moe_dtype_size(b->float_type);
        const double dp = 2.0 * (P - 1) / (double)P * (double)o->E * (double)o->d * (double)o->f * 3.0 *
                          (double)moe_dtype_size(b->float_type);
        const double ceil = memcpy_gbs(bytes / 4); /* one move's bytes */
        if (me == 0)
            printf("%-5s %6lld %9.3f %9.3f %10.2f %8.2f %9.3f %6.0f%% %10.2f %10.2f\n", hier ? "hier" : "flat",
                   (long long)D, 1e3 * t_a2a, bytes / 1e6, bytes / t_a2a / 1e9, ceil, 1e3 * t_layer,
                   100.0 * t_a2a / t_layer, expect / 1e6, dp / 1e6);
    }
    if (side)
        b->free(b, side);
    if (io)
        b->free(b, io);
    if (xs)
        ex->state_free(xs);
    moe_layer_free(L);
    moe_exchange_free(ex);
    return rc;
}

int cmd_bench_a2a(int argc, char **argv)
{
    a2a_opts o;
    int r = parse(argc, argv, &o);
    if (r)
        return r < 0 ? EXIT_OK : r;
    moe_comm *world;
    if (moe_comm_world(&world)) {
        fprintf(stderr, "cmoe bench a2a: %s\n", moe_last_error());
        return EXIT_FAIL;
    }
    const int P = moe_comm_size(world);
    int rc = EXIT_OK;
    if (o.E % P) {
        if (moe_comm_rank(world) == 0)
            fprintf(stderr, "cmoe bench a2a: --experts %lld does not split over %d ranks\n", (long long)o.E, P);
        rc = EXIT_USAGE;
    }
    moe_backend *b = NULL;
    if (!rc && moe_backend_create("cpu", &(moe_backend_options){.threads = (int)o.threads}, &b)) {
        fprintf(stderr, "cmoe bench a2a: %s\n", moe_last_error());
        rc = EXIT_FAIL;
    }
    if (!rc && moe_comm_rank(world) == 0) {
        printf("cmoe bench a2a: %d rank%s, %lld tokens per rank, d_model %lld, %lld experts (%lld per rank), top-%lld, "
               "fp32 rows, %lld iterations (slowest rank)\n", P, P == 1 ? "" : "s", (long long)o.T, (long long)o.d,
               (long long)o.E, (long long)(o.E / P), (long long)o.k, (long long)o.iters);
        printf("%-5s %6s %9s %9s %10s %8s %9s %7s %10s %10s\n", "a2a", "chunks", "a2a ms", "MB/rank", "GB/s/rank",
               "memcpy", "layer ms", "share", "MB expect", "MB DP-ar");
    }
    for (int m = 0; !rc && m < 2; m++)
        for (int ci = 0; !rc && (o.modes >> m & 1) && ci < o.nchunks; ci++)
            rc = bench(world, &o, m, o.chunks[ci], b);
    moe_backend_free(b);
    moe_comm_free(world);
    moe_comm_finalize();
    return rc;
}
