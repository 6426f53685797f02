/* Philox-4x32-10 against the Random123 known-answer vectors (kat_vectors), and the
 * properties the rest of cmoe relies on: draws are pure functions of their counters. */
#include "testutil.h"

START_TEST(test_philox_kat)
{
    static const uint32_t kat[3][10] = {
        {0x00000000, 0x00000000, 0x00000000, 0x00000000, 0x00000000, 0x00000000,
         0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8},
        {0xffffffff, 0xffffffff, 0xffffffff, 0xffffffff, 0xffffffff, 0xffffffff,
         0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd},
        {0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344, 0xa4093822, 0x299f31d0,
         0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1},
    };
    for (int v = 0; v < 3; v++) {
        uint32_t out[4];
        moe_philox4x32_10(kat[v], kat[v] + 4, out);
        for (int i = 0; i < 4; i++)
            ck_assert_msg(out[i] == kat[v][6 + i], "vector %d word %d: %08x, expected %08x", v, i, out[i],
                          kat[v][6 + i]);
    }
}
END_TEST

START_TEST(test_uniform_range_and_determinism)
{
    /* count, then assert once: every ck_assert is a message to Check's parent process */
    double sum = 0;
    const int n = 200000;
    int bad = 0;
    for (int i = 0; i < n; i++) {
        double u = moe_rand_uniform(42, 1, 7, (uint32_t)i, 3);
        bad += !(u > 0 && u < 1) || u != moe_rand_uniform(42, 1, 7, (uint32_t)i, 3);
        sum += u;
    }
    ck_assert_int_eq(bad, 0);
    ck_assert_double_eq_tol(sum / n, 0.5, 0.005);
    /* every counter word and the key change the draw */
    double u0 = moe_rand_uniform(42, 1, 7, 5, 3);
    ck_assert(u0 != moe_rand_uniform(43, 1, 7, 5, 3));
    ck_assert(u0 != moe_rand_uniform(42, 2, 7, 5, 3));
    ck_assert(u0 != moe_rand_uniform(42, 1, 8, 5, 3));
    ck_assert(u0 != moe_rand_uniform(42, 1, 7, 6, 3));
    ck_assert(u0 != moe_rand_uniform(42, 1, 7, 5, 4));
    ck_assert(u0 != moe_rand_uniform(42ull | (1ull << 40), 1, 7, 5, 3));
}
END_TEST

START_TEST(test_normal_moments)
{
    const int n = 200000;
    double m1 = 0, m2 = 0;
    int bad = 0;
    for (int i = 0; i < n; i++) {
        double z = moe_rand_normal(7, 2, 0, (uint32_t)i, 0);
        bad += !isfinite(z);
        m1 += z;
        m2 += z * z;
    }
    ck_assert_int_eq(bad, 0);
    m1 /= n;
    m2 /= n;
    ck_assert_double_eq_tol(m1, 0.0, 0.01);
    ck_assert_double_eq_tol(m2, 1.0, 0.02);
}
END_TEST

int main(void)
{
    Suite *s = suite_create("rng");
    TCase *tc = tcase_create("philox");
    tcase_add_test(tc, test_philox_kat);
    tcase_add_test(tc, test_uniform_range_and_determinism);
    tcase_add_test(tc, test_normal_moments);
    suite_add_tcase(s, tc);
    return tu_run(s);
}
