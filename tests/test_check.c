/*
 * The cross-check harness itself (src/backend/check.h, behind `cmoe check` and the cuda
 * suite): the cpu backend passes every comparison, and a cpu backend with ops broken on
 * purpose fails exactly the comparisons of those ops — an op that writes nothing (the
 * poisoned output stays NaN), one that leaves its gradient as it was.
 */
#include "backend/check.h"
#include "testutil.h"

typedef struct {
    int failed_matmul, failed_dispatch_dx, failed_other, rows;
} tally;

static void count(const moe_check_row *r, void *ctx)
{
    tally *t = ctx;
    t->rows++;
    if (r->ok)
        return;
    if (!strcmp(r->op, "matmul"))
        t->failed_matmul++;
    else if (!strcmp(r->op, "dispatch dx"))
        t->failed_dispatch_dx++;
    else {
        t->failed_other++;
        printf("unexpected failure: %s %s %.3e %s\n", r->op, r->shape, r->err, r->note ? r->note : "");
        fflush(stdout);
    }
}

START_TEST(test_cpu_passes)
{
    moe_backend *b;
    ck_assert_int_eq(moe_backend_create("cpu", &(moe_backend_options){.threads = 2}, &b), MOE_OK);
    tally t = {0};
    int failed = -1, rows = 0;
    const moe_check_options o = {.seed = 5, .quick = 1};
    ck_assert_msg(moe_backend_check(b, &o, count, &t, &failed, &rows) == MOE_OK, "%s", moe_last_error());
    printf("cpu vs ref: %d of %d comparisons failed\n", failed, rows);
    ck_assert_int_gt(rows, 1000);
    ck_assert_int_eq(rows, t.rows);
    ck_assert_int_eq(failed, 0);
    moe_backend_free(b);
}
END_TEST

static void no_matmul(moe_backend *b, moe_tensor out, moe_tensor x, moe_tensor w, int64_t T, int64_t K, int64_t N)
{
}

static void no_dispatch_backward(moe_backend *b, moe_tensor dx, moe_tensor dxe, const moe_bplan *p, int64_t d)
{
}

START_TEST(test_broken_ops_fail)
{
    moe_backend *b;
    ck_assert_int_eq(moe_backend_create("cpu", &(moe_backend_options){.threads = 2}, &b), MOE_OK);
    b->matmul_forward = no_matmul;
    b->dispatch_backward = no_dispatch_backward;
    tally t = {0};
    int failed = 0, rows = 0;
    /* the dense and dispatch rows only: the layer would fail everywhere through them */
    const moe_check_options o1 = {.seed = 6, .quick = 1, .only = "matmul"};
    ck_assert_int_eq(moe_backend_check(b, &o1, count, &t, &failed, &rows), MOE_OK);
    const moe_check_options o2 = {.seed = 6, .quick = 1, .only = "dispatch"};
    ck_assert_int_eq(moe_backend_check(b, &o2, count, &t, &failed, &rows), MOE_OK);
    ck_assert_int_gt(t.failed_matmul, 0);
    ck_assert_int_gt(t.failed_dispatch_dx, 0);
    ck_assert_int_eq(t.failed_other, 0);
    moe_backend_free(b);
}
END_TEST

int main(void)
{
    Suite *s = suite_create("check");
    TCase *tc = tcase_create("check");
    tcase_set_timeout(tc, 300);
    tcase_add_test(tc, test_cpu_passes);
    tcase_add_test(tc, test_broken_ops_fail);
    suite_add_tcase(s, tc);
    return tu_run(s);
}
