/*
 * Groups in one process (src/dist/, no MPI needed):
 *  - a rank's rows of a global batch (moe_dataset_batch_rows) are those rows of the whole
 *    batch, for text and the synthetic generator;
 *  - the fixed tree (tree.h): pushes in any order give the bits of the one pairwise tree,
 *    with the partial sums it planned, and refuses a leaf twice or out of range;
 *  - the expert-parallel exchange over a one-process communicator gives the local layer's
 *    bits (so a build without MPI runs the same code);
 *  - training with --groups 4 in one process: the same bits at 1 and 2 threads, ZeRO-1
 *    changes no bit, and the trainer refuses layouts that do not fit, naming what would.
 */
#include "dist/exchange_ep.h"
#include "dist/groups.h"
#include "dist/tree.h"
#include "testutil.h"

START_TEST(test_batch_rows)
{
    moe_dataset *d[2];
    ck_assert_int_eq(moe_dataset_open("synth", NULL, &d[0]), MOE_OK);
    char path[4096];
    snprintf(path, sizeof path, "%s/datasets/brown/brown.txt.gz", getenv("top_srcdir") ? getenv("top_srcdir") : ".");
    ck_assert_msg(moe_dataset_open(path, NULL, &d[1]) == MOE_OK, "%s", moe_last_error());
    enum { B = 8, S = 12 };
    int32_t in[B * S], tg[B * S], task[B * S], pin[B * S], ptg[B * S], ptask[B * S];
    for (int k = 0; k < 2; k++) {
        ck_assert_int_eq(moe_dataset_batch(d[k], 9, 3, 1, B, S, in, tg, task), MOE_OK);
        for (int r0 = 0; r0 < B; r0 += 3) {
            const int n = r0 + 3 <= B ? 3 : B - r0;
            ck_assert_int_eq(moe_dataset_batch_rows(d[k], 9, 3, 1, r0, n, S, pin, ptg, ptask), MOE_OK);
            ck_assert_mem_eq(pin, in + r0 * S, (size_t)(n * S) * sizeof *in);
            ck_assert_mem_eq(ptg, tg + r0 * S, (size_t)(n * S) * sizeof *tg);
            ck_assert_mem_eq(ptask, task + r0 * S, (size_t)(n * S) * sizeof *task);
        }
        ck_assert_int_eq(moe_dataset_batch_rows(d[k], 9, 3, 1, -1, 2, S, pin, ptg, NULL), MOE_ERR_ARG);
        moe_dataset_free(d[k]);
    }
}
END_TEST

/* Leaves whose sum depends on the order: 2^k + tiny values. */
static double leaf(int64_t id, int64_t i)
{
    return ldexp(1.0, (int)((id * 7 + i) % 25)) * (id % 2 ? -1 : 1) + 1e-7 * (double)(id + i);
}

static double pairwise(int64_t lo, int64_t n, int64_t i)
{
    if (n == 1)
        return (float)leaf(lo, i);
    return (float)(pairwise(lo, n / 2, i) + pairwise(lo + n / 2, n / 2, i));
}

START_TEST(test_tree)
{
    moe_backend *b;
    ck_assert_int_eq(moe_backend_create("cpu", NULL, &b), MOE_OK);
    moe_comm *one;
    ck_assert_int_eq(moe_comm_world(&one), MOE_OK);
    enum { N = 5, COUNT = 8 };
    moe_buf *buf;
    ck_assert_int_eq(b->alloc(b, MOE_F32, 2 * N, &buf), MOE_OK);
    moe_piece pc[2] = {{{buf, 0}, 2}, {{buf, 2}, 3}}; /* a set of two tensors */
    const int64_t orders[3][COUNT] = {{8, 9, 10, 11, 12, 13, 14, 15}, {15, 14, 13, 12, 11, 10, 9, 8},
                                      {8, 10, 12, 14, 9, 11, 13, 15}};
    const int want_slots[3] = {3, 3, 4}; /* log2(8) in order; the strided order holds 4 */
    for (int o = 0; o < 3; o++) {
        const int slots = moe_tree_slots(orders[o], COUNT, 8, COUNT);
        ck_assert_int_eq(slots, want_slots[o]);
        moe_tree *t;
        ck_assert_int_eq(moe_tree_create(b, pc, 2, 8, COUNT, slots, 1, &t), MOE_OK);
        for (int m = 0; m < 2; m++) { /* two micro-batches: acc = R, acc += R */
            moe_tree_reset(t);
            for (int k = 0; k < COUNT; k++) {
                double v[N];
                for (int i = 0; i < N; i++)
                    v[i] = leaf(orders[o][k], i);
                ck_assert_int_eq(moe_upload_f64(b, (moe_tensor){buf, 0}, v, N), MOE_OK);
                ck_assert_int_eq(moe_tree_push(t, orders[o][k]), MOE_OK);
            }
            ck_assert_int_eq(moe_tree_push(t, 8), MOE_ERR_ARG);
            ck_assert_int_eq(moe_tree_push(t, 16), MOE_ERR_ARG);
            ck_assert_int_eq(moe_tree_finish(t, one, m == 0, (moe_tensor){NULL, 0}, NULL, "test"), MOE_OK);
        }
        moe_tree_scatter(t);
        double got[N];
        ck_assert_int_eq(moe_download_f64(b, got, (moe_tensor){buf, 0}, N), MOE_OK);
        for (int i = 0; i < N; i++) {
            const float r = (float)pairwise(8, COUNT, i), want = r + r;
            ck_assert_msg(got[i] == (double)want, "order %d, element %d: %.9g, the tree gives %.9g", o, i, got[i],
                          (double)want);
        }
        moe_tree_free(t);
    }
    double h[4] = {leaf(0, 0), leaf(1, 0), leaf(2, 0), leaf(3, 0)};
    ck_assert(moe_tree_sum_host(h, 4) == (h[0] + h[1]) + (h[2] + h[3]));
    b->free(b, buf);
    moe_comm_free(one);
    moe_backend_free(b);
}
END_TEST

/* the layer through the expert-parallel exchange on one process = the local layer */
START_TEST(test_ep_one_process)
{
    moe_layer_config c;
    moe_layer_config_default(&c);
    c.d_model = 16;
    c.d_ff = 24;
    c.n_experts = 4;
    c.lb_coef = 0.01;
    moe_backend *b;
    ck_assert_int_eq(moe_backend_create("cpu", NULL, &b), MOE_OK);
    moe_comm *one;
    ck_assert_int_eq(moe_comm_world(&one), MOE_OK);
    moe_ep_options o;
    moe_ep_options_default(&o);
    o.chunks = o.max_chunks = 2;
    moe_exchange *ex;
    ck_assert_int_eq(moe_exchange_ep_create(one, &o, &ex), MOE_OK);
    const int64_t T = 150, d = c.d_model;
    double *out[2];
    for (int k = 0; k < 2; k++) {
        moe_layer *L;
        ck_assert_int_eq(moe_layer_create(&c, b, T, k ? ex : NULL, &L), MOE_OK);
        ck_assert_int_eq(moe_layer_init(L, 1.0), MOE_OK);
        moe_buf *io;
        ck_assert_int_eq(b->alloc(b, MOE_F32, 4 * T * d, &io), MOE_OK);
        double *h = tu_alloc(T * d);
        tu_randn(h, T * d, 1.0, 3);
        moe_upload_f64(b, (moe_tensor){io, 0}, h, T * d);
        tu_randn(h, T * d, 1.0, 4);
        moe_upload_f64(b, (moe_tensor){io, 2 * T * d}, h, T * d);
        moe_layer_zero_grad(L);
        ck_assert_int_eq(moe_layer_forward(L, (moe_tensor){io, T * d}, (moe_tensor){io, 0}, NULL, NULL, T,
                                           MOE_KEY_STEP(1), 1), MOE_OK);
        ck_assert_int_eq(moe_layer_backward(L, (moe_tensor){io, 3 * T * d}, (moe_tensor){io, 2 * T * d}), MOE_OK);
        out[k] = tu_alloc(2 * T * d + 3 * 4 * d * 24);
        ck_assert_int_eq(moe_download_f64(b, out[k], (moe_tensor){io, T * d}, T * d), MOE_OK);
        ck_assert_int_eq(moe_download_f64(b, out[k] + T * d, (moe_tensor){io, 3 * T * d}, T * d), MOE_OK);
        ck_assert_int_eq(moe_layer_get_grad(L, "experts.w1", out[k] + 2 * T * d), MOE_OK);
        free(h);
        b->free(b, io);
        moe_layer_free(L);
    }
    ck_assert_int_eq(memcmp(out[0], out[1], (size_t)(2 * T * d + 4 * d * 24) * sizeof(double)), 0);
    free(out[0]);
    free(out[1]);
    moe_exchange_free(ex);
    moe_comm_free(one);
    moe_backend_free(b);
}
END_TEST

/* 3 steps of the tiny model in 4 groups (accum 2): losses, norms, parameters */
static double *train_groups(int threads, int zero, int64_t *n)
{
    moe_model_config c;
    moe_model_config_tiny(&c);
    c.moe.jitter_eps = 0.01;
    moe_backend *b;
    ck_assert_int_eq(moe_backend_create("cpu", &(moe_backend_options){.threads = threads}, &b), MOE_OK);
    moe_comm *one;
    ck_assert_int_eq(moe_comm_world(&one), MOE_OK);
    moe_dist_options o;
    moe_dist_options_default(&o);
    o.groups = 4;
    o.zero = zero;
    moe_dist *d;
    const int64_t B = 8, S = 16;
    ck_assert_msg(moe_dist_create(one, &o, &c, B, &d) == MOE_OK, "%s", moe_last_error());
    ck_assert_int_eq(d->passes, 4);
    moe_model *m;
    ck_assert_int_eq(moe_model_create(&c, b, d->ex, d->pass_batch, S, &m), MOE_OK);
    ck_assert_int_eq(moe_model_init(m, 3), MOE_OK);
    moe_optim_config oc;
    moe_optim_config_default(&oc);
    moe_gtrain *g;
    ck_assert_msg(moe_gtrain_create(d, m, &oc, S, 2, &g) == MOE_OK, "%s", moe_last_error());
    moe_dataset *data;
    ck_assert_int_eq(moe_dataset_open("synth", NULL, &data), MOE_OK);
    *n = 9 + moe_model_numel(m);
    double *out = tu_alloc(*n);
    for (int step = 0; step < 3; step++) {
        moe_optim_result r;
        ck_assert_msg(moe_gtrain_step(g, data, 7, step, 2, &r) == MOE_OK, "%s", moe_last_error());
        moe_model_stats st;
        ck_assert_int_eq(moe_model_get_stats(m, MOE_SPAN_STEP, &st), MOE_OK);
        out[3 * step] = st.ce;
        out[3 * step + 1] = st.aux_total;
        out[3 * step + 2] = r.grad_norm;
    }
    int64_t at = 9;
    for (int i = 0; i < moe_model_n_params(m); i++) {
        ck_assert_int_eq(moe_model_get_param(m, i, out + at), MOE_OK);
        at += moe_model_param(m, i)->numel;
    }
    moe_dataset_free(data);
    moe_gtrain_free(g);
    moe_model_free(m);
    moe_dist_free(d);
    moe_comm_free(one);
    moe_backend_free(b);
    return out;
}

START_TEST(test_groups_training)
{
    int64_t n, n2;
    double *ref = train_groups(1, 0, &n);
    ck_assert(isfinite(ref[0]) && ref[0] > 0);
    const int variants[2][2] = {{2, 0}, {1, 1}}; /* 2 threads; ZeRO-1 */
    for (int k = 0; k < 2; k++) {
        double *r = train_groups(variants[k][0], variants[k][1], &n2);
        ck_assert_int_eq(n, n2);
        int64_t i = 0;
        while (i < n && memcmp(&r[i], &ref[i], sizeof r[i]) == 0)
            i++;
        ck_assert_msg(i == n, "%d threads%s: value %lld = %.17g, reference %.17g", variants[k][0],
                      variants[k][1] ? ", ZeRO-1" : "", (long long)i, r[i], ref[i]);
        free(r);
    }
    free(ref);
}
END_TEST

START_TEST(test_layouts_refused)
{
    moe_model_config c;
    moe_model_config_tiny(&c); /* layers of 4 and 6 experts */
    moe_dist_options o;
    moe_dist_options_default(&o);
    int64_t ep, g;
    o.groups = 3;
    ck_assert_int_eq(moe_dist_check(&o, 1, &c, 8, &ep, &g), MOE_ERR_ARG);
    ck_assert_msg(strstr(moe_last_error(), "must be a power of two"), "%s", moe_last_error());
    o.groups = 16;
    ck_assert_int_eq(moe_dist_check(&o, 1, &c, 8, &ep, &g), MOE_ERR_ARG);
    ck_assert_msg(strstr(moe_last_error(), "--batch 8 does not split into 16 groups"), "%s", moe_last_error());
    o.groups = 8;
    o.ep = 4;
    ck_assert_int_eq(moe_dist_check(&o, 4, &c, 8, &ep, &g), MOE_ERR_ARG);
    ck_assert_msg(strstr(moe_last_error(), "does not divide the 6 experts of layer 2: use one of 1, 2"), "%s",
                  moe_last_error());
    o.ep = 2;
    ck_assert_int_eq(moe_dist_check(&o, 1, &c, 8, &ep, &g), MOE_ERR_ARG);
    ck_assert_msg(strstr(moe_last_error(), "unless started by mpirun"), "%s", moe_last_error());
    o.ep = 0;
    o.groups = 0;
    ck_assert_int_eq(moe_dist_check(&o, 2, &c, 8, &ep, &g), MOE_OK);
    ck_assert_int_eq(ep, 2);
    ck_assert_int_eq(g, 2);
}
END_TEST

int main(void)
{
    Suite *s = suite_create("groups");
    TCase *tc = tcase_create("groups");
    tcase_set_timeout(tc, 120);
    tcase_add_test(tc, test_batch_rows);
    tcase_add_test(tc, test_tree);
    tcase_add_test(tc, test_ep_one_process);
    tcase_add_test(tc, test_groups_training);
    tcase_add_test(tc, test_layouts_refused);
    suite_add_tcase(s, tc);
    return tu_run(s);
}
