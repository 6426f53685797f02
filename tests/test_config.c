/* The layer configuration from JSON: every key, every kind of bad input, files. */
#define _POSIX_C_SOURCE 200809L
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "model/model.h"
#include "testutil.h"

static const char *all_keys_json =
    "{\"hidden_size\": 48, \"intermediate_size\": 96, \"num_local_experts\": 6, \"num_experts_per_tok\": 2,"
    " \"router\": \"noisy_topk\", \"scoring_func\": \"sigmoid\", \"norm_topk_prob\": false,"
    " \"second_expert_policy\": \"sampling\", \"capacity_factor\": 1.5, \"min_capacity\": 3,"
    " \"drop_policy\": \"probability\", \"router_jitter_noise\": 0.02, \"sinkhorn_iters\": 5,"
    " \"use_expert_bias\": true, \"bias_update_rate\": 0.003, \"router_aux_loss_coef\": 0.01,"
    " \"importance_loss_coef\": 0.1, \"load_loss_coef\": 0.2, \"router_z_loss_coef\": 0.001,"
    " \"mi_loss_coef\": 0.05, \"num_tasks\": 3, \"hidden_act\": \"geglu\", \"n_shared_experts\": 2,"
    " \"shared_expert_intermediate_size\": 40, \"shared_expert_gate\": true, \"residual_moe\": true,"
    " \"residual_intermediate_size\": 24, \"seed\": 98765, \"layer_index\": 7}";

START_TEST(every_key_parsed)
{
    moe_layer_config c;
    ck_assert_msg(moe_layer_config_from_json(all_keys_json, &c) == MOE_OK, "%s", moe_last_error());
    ck_assert_int_eq(c.d_model, 48);
    ck_assert_int_eq(c.d_ff, 96);
    ck_assert_int_eq(c.n_experts, 6);
    ck_assert_int_eq(c.top_k, 2);
    ck_assert_int_eq(c.router, MOE_ROUTER_NOISY_TOPK);
    ck_assert_int_eq(c.score, MOE_SCORE_SIGMOID);
    ck_assert_int_eq(c.renormalize, 0);
    ck_assert_int_eq(c.second_policy, MOE_SECOND_SAMPLING);
    ck_assert(c.capacity_factor == 1.5);
    ck_assert_int_eq(c.min_capacity, 3);
    ck_assert_int_eq(c.drop_policy, MOE_DROP_PROBABILITY);
    ck_assert(c.jitter_eps == 0.02);
    ck_assert_int_eq(c.sinkhorn_iters, 5);
    ck_assert_int_eq(c.use_bias, 1);
    ck_assert(c.bias_rate == 0.003);
    ck_assert(c.lb_coef == 0.01);
    ck_assert(c.importance_coef == 0.1);
    ck_assert(c.load_coef == 0.2);
    ck_assert(c.z_coef == 0.001);
    ck_assert(c.mi_coef == 0.05);
    ck_assert_int_eq(c.n_tasks, 3);
    ck_assert_int_eq(c.act, MOE_ACT_GEGLU);
    ck_assert_int_eq(c.n_shared, 2);
    ck_assert_int_eq(c.d_ff_shared, 40);
    ck_assert_int_eq(c.shared_gate, 1);
    ck_assert_int_eq(c.residual, 1);
    ck_assert_int_eq(c.d_ff_dense, 24);
    ck_assert(c.seed == 98765);
    ck_assert_int_eq(c.layer, 7);
}
END_TEST

/* Absent keys keep the defaults; an empty object is the default configuration. */
START_TEST(defaults_kept)
{
    moe_layer_config c, d;
    moe_layer_config_default(&d);
    ck_assert(moe_layer_config_from_json("{\"hidden_size\": 16}", &c) == MOE_OK);
    ck_assert_int_eq(c.d_model, 16);
    ck_assert_int_eq(c.d_ff, d.d_ff);
    ck_assert_int_eq(c.top_k, d.top_k);
    ck_assert_int_eq(c.act, d.act);
    ck_assert(c.seed == d.seed);
    ck_assert(moe_layer_config_from_json("{}", &c) == MOE_OK);
    char *a, *b;
    ck_assert(moe_layer_config_to_json(&c, 0, &a) == MOE_OK);
    ck_assert(moe_layer_config_to_json(&d, 0, &b) == MOE_OK);
    ck_assert_str_eq(a, b);
    free(a);
    free(b);
}
END_TEST

/* Each enum value by name, with the other keys it needs to be valid. */
START_TEST(every_enum_value)
{
    static const struct {
        const char *json;
        int field; /* 0 router, 1 score, 2 second, 3 drop, 4 act */
        int want;
    } cases[] = {
        {"{\"router\": \"topk\"}", 0, MOE_ROUTER_TOPK},
        {"{\"router\": \"noisy_topk\"}", 0, MOE_ROUTER_NOISY_TOPK},
        {"{\"router\": \"expert_choice\", \"capacity_factor\": 2}", 0, MOE_ROUTER_EXPERT_CHOICE},
        {"{\"router\": \"hash\", \"num_experts_per_tok\": 1}", 0, MOE_ROUTER_HASH},
        {"{\"router\": \"sinkhorn\"}", 0, MOE_ROUTER_SINKHORN},
        {"{\"scoring_func\": \"softmax\"}", 1, MOE_SCORE_SOFTMAX},
        {"{\"scoring_func\": \"sigmoid\"}", 1, MOE_SCORE_SIGMOID},
        {"{\"second_expert_policy\": \"all\"}", 2, MOE_SECOND_ALL},
        {"{\"second_expert_policy\": \"sampling\"}", 2, MOE_SECOND_SAMPLING},
        {"{\"second_expert_policy\": \"random\"}", 2, MOE_SECOND_RANDOM},
        {"{\"drop_policy\": \"position\"}", 3, MOE_DROP_POSITION},
        {"{\"drop_policy\": \"probability\"}", 3, MOE_DROP_PROBABILITY},
        {"{\"hidden_act\": \"relu\"}", 4, MOE_ACT_RELU},
        {"{\"hidden_act\": \"gelu\"}", 4, MOE_ACT_GELU},
        {"{\"hidden_act\": \"gelu_tanh\"}", 4, MOE_ACT_GELU_TANH},
        {"{\"hidden_act\": \"geglu\"}", 4, MOE_ACT_GEGLU},
        {"{\"hidden_act\": \"swiglu\"}", 4, MOE_ACT_SWIGLU},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        moe_layer_config c;
        ck_assert_msg(moe_layer_config_from_json(cases[i].json, &c) == MOE_OK, "%s: %s", cases[i].json,
                      moe_last_error());
        int got[5] = {(int)c.router, (int)c.score, (int)c.second_policy, (int)c.drop_policy, (int)c.act};
        ck_assert_msg(got[cases[i].field] == cases[i].want, "%s", cases[i].json);
    }
}
END_TEST

/* to_json writes every key, and reading it back gives the same configuration. */
START_TEST(json_round_trip)
{
    moe_layer_config c, c2;
    ck_assert(moe_layer_config_from_json(all_keys_json, &c) == MOE_OK);
    char *text, *text2;
    ck_assert(moe_layer_config_to_json(&c, 1, &text) == MOE_OK);
    ck_assert_msg(moe_layer_config_from_json(text, &c2) == MOE_OK, "%s", moe_last_error());
    ck_assert(moe_layer_config_to_json(&c2, 1, &text2) == MOE_OK);
    ck_assert_str_eq(text, text2);
    ck_assert(c2.capacity_factor == c.capacity_factor && c2.jitter_eps == c.jitter_eps && c2.seed == c.seed);
    ck_assert_ptr_nonnull(strstr(text, "\"shared_expert_intermediate_size\""));
    ck_assert_ptr_nonnull(strstr(text, "\"noisy_topk\""));
    free(text);
    free(text2);
}
END_TEST

static void expect_bad(const char *json, moe_status want, const char *needle, const char *needle2)
{
    moe_layer_config c;
    moe_layer_config_default(&c);
    c.d_model = 777;
    moe_status s = moe_layer_config_from_json(json, &c);
    ck_assert_msg(s == want, "%s: status %d, want %d (%s)", json, s, want, moe_last_error());
    ck_assert_msg(strstr(moe_last_error(), needle), "%s: message '%s' lacks '%s'", json, moe_last_error(), needle);
    if (needle2)
        ck_assert_msg(strstr(moe_last_error(), needle2), "%s: message '%s' lacks '%s'", json, moe_last_error(),
                      needle2);
    ck_assert_msg(c.d_model == 777, "%s: a failed parse changed the output", json);
}

START_TEST(bad_keys_named)
{
    /* unknown key */
    expect_bad("{\"hidden_sizee\": 8}", MOE_ERR_ARG, "hidden_sizee", "unknown key");
    /* wrong JSON types */
    expect_bad("{\"hidden_size\": \"8\"}", MOE_ERR_ARG, "hidden_size", "integer");
    expect_bad("{\"capacity_factor\": \"1.0\"}", MOE_ERR_ARG, "capacity_factor", "number");
    expect_bad("{\"capacity_factor\": null}", MOE_ERR_ARG, "capacity_factor", "null");
    expect_bad("{\"norm_topk_prob\": 1}", MOE_ERR_ARG, "norm_topk_prob", "true or false");
    expect_bad("{\"residual_moe\": \"yes\"}", MOE_ERR_ARG, "residual_moe", NULL);
    expect_bad("{\"hidden_act\": 3}", MOE_ERR_ARG, "hidden_act", "swiglu");
    expect_bad("{\"router\": [\"topk\"]}", MOE_ERR_ARG, "router", "array");
    /* non-integer where an integer is needed */
    expect_bad("{\"hidden_size\": 8.5}", MOE_ERR_ARG, "hidden_size", "integer");
    expect_bad("{\"num_experts_per_tok\": 2.0}", MOE_ERR_ARG, "num_experts_per_tok", "integer");
    /* out of range */
    expect_bad("{\"hidden_size\": -1}", MOE_ERR_ARG, "hidden_size", "[1, 2147483647]");
    expect_bad("{\"num_local_experts\": 0}", MOE_ERR_ARG, "num_local_experts", NULL);
    expect_bad("{\"intermediate_size\": 4294967296}", MOE_ERR_ARG, "intermediate_size", NULL);
    expect_bad("{\"layer_index\": 16777216}", MOE_ERR_ARG, "layer_index", NULL);
    expect_bad("{\"seed\": -5}", MOE_ERR_ARG, "seed", NULL);
    expect_bad("{\"min_capacity\": -1}", MOE_ERR_ARG, "min_capacity", NULL);
    expect_bad("{\"n_shared_experts\": -2}", MOE_ERR_ARG, "n_shared_experts", NULL);
    /* unknown enum strings, with what is allowed */
    expect_bad("{\"router\": \"top2\"}", MOE_ERR_ARG, "router", "\"expert_choice\"");
    expect_bad("{\"scoring_func\": \"tanh\"}", MOE_ERR_ARG, "scoring_func", "\"sigmoid\"");
    expect_bad("{\"second_expert_policy\": \"none\"}", MOE_ERR_ARG, "second_expert_policy", "\"sampling\"");
    expect_bad("{\"drop_policy\": \"random\"}", MOE_ERR_ARG, "drop_policy", "\"position\"");
    expect_bad("{\"hidden_act\": \"silu\"}", MOE_ERR_ARG, "hidden_act", "\"swiglu\"");
    /* values that parse but fail validation */
    expect_bad("{\"num_local_experts\": 4, \"num_experts_per_tok\": 5}", MOE_ERR_ARG, "num_experts_per_tok", NULL);
    expect_bad("{\"router\": \"hash\"}", MOE_ERR_ARG, "num_experts_per_tok", NULL);
    expect_bad("{\"router\": \"expert_choice\"}", MOE_ERR_ARG, "capacity_factor", NULL);
    expect_bad("{\"router_jitter_noise\": 1.5}", MOE_ERR_ARG, "router_jitter_noise", NULL);
    expect_bad("{\"router_z_loss_coef\": -0.1}", MOE_ERR_ARG, "router_z_loss_coef", NULL);
    expect_bad("{\"mi_loss_coef\": 0.1}", MOE_ERR_ARG, "num_tasks", NULL);
    expect_bad("{\"shared_expert_gate\": true}", MOE_ERR_ARG, "n_shared_experts", NULL);
    expect_bad("{\"router\": \"sinkhorn\", \"sinkhorn_iters\": 0}", MOE_ERR_ARG, "sinkhorn_iters", NULL);
    /* the top level */
    expect_bad("[1, 2]", MOE_ERR_ARG, "object", NULL);
    expect_bad("7", MOE_ERR_ARG, "object", NULL);
}
END_TEST

START_TEST(invalid_json)
{
    expect_bad("{\"hidden_size\": 8,}", MOE_ERR_FORMAT, "line 1", "column");
    expect_bad("{\"hidden_size\": 8,\n \"router\": topk}", MOE_ERR_FORMAT, "line 2", NULL);
    expect_bad("", MOE_ERR_FORMAT, "invalid JSON", NULL);
    expect_bad("{\"hidden_size\": 8, \"hidden_size\": 16}", MOE_ERR_FORMAT, "duplicate", NULL);
    expect_bad("{\"capacity_factor\": NaN}", MOE_ERR_FORMAT, "invalid JSON", NULL);
    moe_layer_config c;
    ck_assert(moe_layer_config_from_json(NULL, &c) == MOE_ERR_ARG);
}
END_TEST

static const char *tmpdir(void)
{
    const char *t = getenv("TMPDIR");
    return t && *t ? t : "/tmp";
}

START_TEST(load_files)
{
    char path[512];
    snprintf(path, sizeof path, "%s/cmoe-test-config-%ld.json", tmpdir(), (long)getpid());
    FILE *fp = fopen(path, "w");
    ck_assert_ptr_nonnull(fp);
    fputs(all_keys_json, fp);
    fclose(fp);
    moe_layer_config c;
    ck_assert_msg(moe_layer_config_load(path, &c) == MOE_OK, "%s", moe_last_error());
    ck_assert_int_eq(c.d_model, 48);

    /* a bad file: the message names the path and the key */
    fp = fopen(path, "w");
    ck_assert_ptr_nonnull(fp);
    fputs("{\"hidden_size\": 64,\n \"router\": \"topk\", \"intermediate_size\": true}\n", fp);
    fclose(fp);
    ck_assert(moe_layer_config_load(path, &c) == MOE_ERR_ARG);
    ck_assert_ptr_nonnull(strstr(moe_last_error(), path));
    ck_assert_ptr_nonnull(strstr(moe_last_error(), "intermediate_size"));

    fp = fopen(path, "w");
    ck_assert_ptr_nonnull(fp);
    fputs("{\"hidden_size\": 64,\n\n  oops}\n", fp);
    fclose(fp);
    ck_assert(moe_layer_config_load(path, &c) == MOE_ERR_FORMAT);
    ck_assert_ptr_nonnull(strstr(moe_last_error(), "line 3"));
    unlink(path);

    /* missing and unreadable files */
    ck_assert(moe_layer_config_load(path, &c) == MOE_ERR_IO);
    ck_assert_ptr_nonnull(strstr(moe_last_error(), path));
    ck_assert(moe_layer_config_load("/nonexistent-dir/layer.json", &c) == MOE_ERR_IO);
    ck_assert_ptr_nonnull(strstr(moe_last_error(), "/nonexistent-dir/layer.json"));
    ck_assert(moe_layer_config_load(tmpdir(), &c) != MOE_OK); /* a directory, said so */
    ck_assert_msg(strstr(moe_last_error(), "is a directory, not a file"), "%s", moe_last_error());
    moe_model_config mc;
    ck_assert(moe_model_config_load(tmpdir(), &mc) != MOE_OK);
    ck_assert_msg(strstr(moe_last_error(), "is a directory"), "%s", moe_last_error());
}
END_TEST

/* The shipped examples (README quickstart) must stay valid. */
START_TEST(examples_valid)
{
    const char *src = getenv("top_srcdir");
    static const char *const names[] = {"layer.json", "switch.json", "expert_choice.json", "deepseek_v3.json"};
    int found = 0;
    for (size_t i = 0; i < sizeof names / sizeof names[0]; i++) {
        char path[1024];
        snprintf(path, sizeof path, "%s/examples/%s", src && *src ? src : "..", names[i]);
        if (access(path, R_OK) != 0)
            continue;
        found++;
        moe_layer_config c;
        ck_assert_msg(moe_layer_config_load(path, &c) == MOE_OK, "%s", moe_last_error());
        ck_assert_msg(moe_layer_config_validate(&c, 64) == MOE_OK, "%s: %s", path, moe_last_error());
    }
    printf("config: %d example configs checked\n", found);
}
END_TEST

int main(void)
{
    Suite *s = suite_create("config");
    TCase *tc = tcase_create("json");
    tcase_add_test(tc, every_key_parsed);
    tcase_add_test(tc, defaults_kept);
    tcase_add_test(tc, every_enum_value);
    tcase_add_test(tc, json_round_trip);
    tcase_add_test(tc, bad_keys_named);
    tcase_add_test(tc, invalid_json);
    tcase_add_test(tc, load_files);
    tcase_add_test(tc, examples_valid);
    suite_add_tcase(s, tc);
    return tu_run(s);
}
