/*
 * cmoe info's counts (src/model/info.h): the presets against their published parameter
 * counts, a small config counted by hand, the FLOP identities, and total_params against
 * moe_model_config_param_count and the parameters a created model really has.
 */
#define _POSIX_C_SOURCE 200809L
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "model/info.h"
#include "testutil.h"

static const char *const presets[] = {"mixtral-8x7b", "mixtral-8x22b", "deepseek-moe-16b", "qwen1.5-moe-a2.7b",
                                      "dbrx", "arctic", "gpu-100m"};
#define N_PRESETS ((int)(sizeof presets / sizeof *presets))

/* configs/NAME.json of the source tree (make check sets top_srcdir; else the cwd). */
static void load_preset(const char *name, moe_model_config *c)
{
    const char *top = getenv("top_srcdir");
    char path[4096];
    snprintf(path, sizeof path, "%s/configs/%s.json", top && *top ? top : ".", name);
    ck_assert_msg(moe_model_config_load(path, c) == MOE_OK, "%s: %s", path, moe_last_error());
    ck_assert_msg(moe_model_config_validate(c) == MOE_OK, "%s: %s", name, moe_last_error());
}

static moe_model_info info_of(const char *name, int64_t seq)
{
    moe_model_config c;
    load_preset(name, &c);
    moe_model_info in;
    ck_assert_msg(moe_model_info_compute(&c, seq, &in) == MOE_OK, "%s: %s", name, moe_last_error());
    return in;
}

/* |v - want| <= tol (in units of 1e9) */
#define ck_billions(v, want, tol)                                                                                     \
    ck_assert_msg(fabs((double)(v) / 1e9 - (want)) <= (tol), "%s = %.4f B, expected %.2f B ± %.2f", #v,            \
                  (double)(v) / 1e9, (double)(want), (double)(tol))

START_TEST(mixtral_8x7b_exact)
{
    moe_model_info in = info_of("mixtral-8x7b", 0);
    /* HF's count of MixtralForCausalLM (untied 32000-vocab embeddings) */
    ck_assert_int_eq(in.total_params, 46702792704LL);
    /* embed 131,072,000 + head 131,072,000 + final norm + 32 × (attention 41,943,040 +
     * 2 of 8 experts 352,321,536 + router 32,768 + 2 norms 8,192) */
    ck_assert_int_eq(in.active_params, 12879925248LL);
    ck_billions(in.active_params, 12.9, 0.05);
    ck_assert_int_eq(in.seq, 32768);
    printf("info: mixtral-8x7b total %lld active %lld\n", (long long)in.total_params, (long long)in.active_params);
}
END_TEST

START_TEST(published_counts)
{
    /* published: Mixtral 8x22B 141B / 39B; DeepSeekMoE 16B 16.4B / 2.8B; Qwen1.5-MoE-A2.7B
     * 14.3B / 2.7B (2.0B without embeddings); DBRX 132B / 36B; Arctic 480B / 17B */
    moe_model_info x = info_of("mixtral-8x22b", 0);
    ck_billions(x.total_params, 140.6, 0.1);
    ck_billions(x.active_params, 39.2, 0.1);
    moe_model_info d = info_of("deepseek-moe-16b", 0);
    ck_billions(d.total_params, 16.4, 0.05);
    ck_billions(d.active_params, 2.8, 0.05);
    ck_assert_int_eq(d.n_dense_layers, 1);
    moe_model_info q = info_of("qwen1.5-moe-a2.7b", 0);
    ck_billions(q.total_params, 14.3, 0.05);
    ck_billions(q.active_params, 2.7, 0.05);
    ck_billions(q.active_params_nonembed, 2.0, 0.1);
    moe_model_info b = info_of("dbrx", 0);
    ck_billions(b.total_params, 132, 0.5);
    ck_billions(b.active_params, 36, 0.5);
    /* Arctic: 476.9B / 15.6B here; Snowflake rounds to "480B / 17B" (see README) */
    moe_model_info a = info_of("arctic", 0);
    ck_billions(a.total_params, 477, 1);
    ck_billions(a.active_params, 15.6, 0.1);
    moe_model_info g = info_of("gpu-100m", 0);
    ck_assert_msg(g.total_params > 90000000 && g.total_params < 110000000, "gpu-100m has %lld parameters",
                  (long long)g.total_params);
    printf("info: mixtral-8x22b %.2fB/%.2fB deepseek-moe-16b %.2fB/%.2fB qwen1.5-moe-a2.7b %.2fB/%.2fB "
           "dbrx %.2fB/%.2fB arctic %.2fB/%.2fB gpu-100m %.1fM/%.1fM\n",
           x.total_params / 1e9, x.active_params / 1e9, d.total_params / 1e9, d.active_params / 1e9,
           q.total_params / 1e9, q.active_params / 1e9, b.total_params / 1e9, b.active_params / 1e9,
           a.total_params / 1e9, a.active_params / 1e9, g.total_params / 1e6, g.active_params / 1e6);
}
END_TEST

/* Every preset: the parts sum up, agree with the model's own count, and FLOPs follow
 * from the active parameters: fwd − attention = 2·(active matrices) + 2·V·C (LM head). */
START_TEST(presets_consistent)
{
    for (int i = 0; i < N_PRESETS; i++) {
        moe_model_config c;
        load_preset(presets[i], &c);
        moe_model_info in;
        ck_assert(moe_model_info_compute(&c, 1024 < c.max_position_embeddings ? 1024 : 0, &in) == MOE_OK);
        ck_assert_msg(in.total_params == moe_model_config_param_count(&c), "%s: %lld vs param_count %lld",
                      presets[i], (long long)in.total_params, (long long)moe_model_config_param_count(&c));
        ck_assert_int_eq(in.total_params, in.embed_params + in.lm_head_params + in.norm_params + in.attn_params +
                                              in.dense_ffn_params + in.router_params + in.expert_params +
                                              in.shared_params + in.residual_params);
        ck_assert(in.active_params < in.total_params && in.active_params_nonembed < in.active_params);
        const int64_t hd = c.head_dim ? c.head_dim : c.hidden_size / c.num_attention_heads;
        const int64_t biases = c.qkv_bias ? c.num_hidden_layers * (c.num_attention_heads + 2 * c.num_key_value_heads) * hd : 0;
        double matrices = (double)(in.active_params_nonembed - in.norm_params - biases);
        double want = 2 * matrices + 2.0 * (double)(c.vocab_size * c.hidden_size);
        ck_assert_msg(fabs(in.flops_fwd - in.flops_attn_fwd - want) <= 1e-9 * want, "%s: %.6e vs %.6e", presets[i],
                      in.flops_fwd - in.flops_attn_fwd, want);
        ck_assert(in.flops_fwdbwd == 3 * in.flops_fwd);
        ck_assert(in.mem_fp32_total == 16.0 * (double)in.total_params);
        ck_assert(in.mem_bf16_total == in.mem_bf16_params + in.mem_bf16_grads + in.mem_bf16_master + in.mem_bf16_adam);
    }
}
END_TEST

/* A config small enough to count on paper. */
static void paper_config(moe_model_config *c)
{
    moe_model_config_default(c);
    c->vocab_size = 10;
    c->hidden_size = 4;
    c->intermediate_size = 6;
    c->moe_intermediate_size = 5;
    c->num_hidden_layers = 2;
    c->first_k_dense_replace = 1; /* layer 0 dense, layer 1 MoE */
    c->num_attention_heads = 2;
    c->num_key_value_heads = 1;
    c->head_dim = 2;
    c->max_position_embeddings = 8;
    c->tie_word_embeddings = 0;
    c->qkv_bias = 1;
    c->n_experts_per_layer = 0;
    c->moe.act = MOE_ACT_RELU;
    c->moe.n_experts = 3;
    c->moe.top_k = 2;
    c->moe.n_shared = 1;
    c->moe.d_ff_shared = 7;
    c->moe.shared_gate = 1;
    c->moe.d_model = 4;
    c->moe.d_ff = 5;
}

START_TEST(counted_by_hand)
{
    moe_model_config c;
    paper_config(&c);
    ck_assert_msg(moe_model_config_validate(&c) == MOE_OK, "%s", moe_last_error());
    moe_model_info in;
    ck_assert(moe_model_info_compute(&c, 4, &in) == MOE_OK);
    /* embed 40, head 40, norms 4 + 2·2·4 = 20;
     * attention per layer: q 4·4 + k 4·2 + v 4·2 + o 4·4 = 48, biases 4 + 2 + 2 = 8 → 2·56 = 112;
     * dense FFN (relu) 2·4·6 = 48; router 4·3 = 12; experts 3·2·4·5 = 120;
     * shared 2·4·7 = 56 + gate 4 = 60 */
    ck_assert_int_eq(in.embed_params, 40);
    ck_assert_int_eq(in.lm_head_params, 40);
    ck_assert_int_eq(in.norm_params, 20);
    ck_assert_int_eq(in.attn_params, 112);
    ck_assert_int_eq(in.dense_ffn_params, 48);
    ck_assert_int_eq(in.router_params, 12);
    ck_assert_int_eq(in.expert_params, 120);
    ck_assert_int_eq(in.shared_params, 60);
    ck_assert_int_eq(in.total_params, 452);
    ck_assert_int_eq(moe_model_config_param_count(&c), 452);
    /* active: all but one of the three experts (40) */
    ck_assert_int_eq(in.active_params, 412);
    ck_assert_int_eq(in.active_params_nonembed, 332);
    /* forward FLOPs per token at S = 4: 2·(96 [attention matrices of 2 layers] + 48 [dense]
     * + 12 [router] + 2·40 [experts] + 60 [shared + gate]) + 2·40 [head] = 672, plus the
     * attention products: 2 layers · 2·2·(H·hd = 4)·(S+1)/2 = 2 · 16 · 2.5 = 80 */
    ck_assert(in.flops_attn_fwd == 80);
    ck_assert_msg(in.flops_fwd == 2.0 * (96 + 48 + 12 + 80 + 60) + 80 + 80, "flops_fwd %.1f", in.flops_fwd);
    ck_assert(in.flops_fwdbwd == 3 * in.flops_fwd);
    /* the attention term grows by 2 layers · 16 · ½ per extra position */
    moe_model_info in5;
    ck_assert(moe_model_info_compute(&c, 5, &in5) == MOE_OK);
    ck_assert(in5.flops_fwd - in.flops_fwd == 16);
    /* seq 0 = max_position_embeddings */
    ck_assert(moe_model_info_compute(&c, 0, &in5) == MOE_OK);
    ck_assert_int_eq(in5.seq, 8);
    /* tied: no head parameters, the head's FLOPs stay */
    c.tie_word_embeddings = 1;
    ck_assert(moe_model_info_compute(&c, 4, &in5) == MOE_OK);
    ck_assert_int_eq(in5.total_params, 412);
    ck_assert_int_eq(in5.active_params, 372);
    ck_assert(in5.flops_fwd == in.flops_fwd);
}
END_TEST

START_TEST(routers_and_branches)
{
    moe_model_config c;
    paper_config(&c);
    moe_model_info base, in;
    ck_assert(moe_model_info_compute(&c, 4, &base) == MOE_OK);
    /* noisy top-k: a second [C, E] projection, used by every token */
    c.moe.router = MOE_ROUTER_NOISY_TOPK;
    ck_assert(moe_model_info_compute(&c, 4, &in) == MOE_OK);
    ck_assert_int_eq(in.router_params, 24);
    ck_assert(in.flops_fwd - base.flops_fwd == 24);
    /* hash: no router, one expert per token */
    c.moe.router = MOE_ROUTER_HASH;
    c.moe.top_k = 1;
    c.moe.lb_coef = c.moe.z_coef = 0; /* nothing to balance */
    ck_assert_msg(moe_model_info_compute(&c, 4, &in) == MOE_OK, "%s", moe_last_error());
    ck_assert_int_eq(in.router_params, 0);
    ck_assert(in.experts_per_token == 1);
    ck_assert_int_eq(in.active_params, base.active_params - 12 - 40);
    /* expert choice: capacity_factor experts per token on average */
    c.moe.router = MOE_ROUTER_EXPERT_CHOICE;
    c.moe.top_k = 2;
    c.moe.capacity_factor = 1.5;
    ck_assert_msg(moe_model_config_validate(&c) == MOE_OK, "%s", moe_last_error());
    ck_assert(moe_model_info_compute(&c, 4, &in) == MOE_OK);
    ck_assert(in.experts_per_token == 1.5);
    ck_assert_int_eq(in.active_params, base.active_params - 20);
    /* Residual-MoE: dense branch of d_ff_dense and the [C, 2] mixing projection, always on */
    paper_config(&c);
    c.moe.residual = 1;
    c.moe.d_ff_dense = 3;
    ck_assert(moe_model_info_compute(&c, 4, &in) == MOE_OK);
    ck_assert_int_eq(in.residual_params, 2 * 4 * 3 + 8);
    ck_assert_int_eq(in.active_params - base.active_params, 32);
    ck_assert(in.flops_fwd - base.flops_fwd == 64);
    ck_assert_int_eq(in.total_params, moe_model_config_param_count(&c));
    /* bad input is refused, naming the field */
    c.num_key_value_heads = 3;
    ck_assert(moe_model_info_compute(&c, 4, &in) == MOE_ERR_ARG);
    ck_assert(strstr(moe_last_error(), "num_key_value_heads") != NULL);
    paper_config(&c);
    ck_assert(moe_model_info_compute(&c, -1, &in) == MOE_ERR_ARG);
    ck_assert(moe_model_info_compute(NULL, 4, &in) == MOE_ERR_ARG);
}
END_TEST

/* total_params equals what moe_model_create really allocates. */
static void check_created(const moe_model_config *c, const char *what)
{
    moe_model_info in;
    ck_assert_msg(moe_model_info_compute(c, 0, &in) == MOE_OK, "%s: %s", what, moe_last_error());
    moe_backend *b = NULL;
    moe_model *m = NULL;
    ck_assert(moe_backend_create("ref", &(moe_backend_options){.threads = 1}, &b) == MOE_OK);
    ck_assert_msg(moe_model_create(c, b, NULL, 1, 4, &m) == MOE_OK, "%s: %s", what, moe_last_error());
    ck_assert_msg(moe_model_numel(m) == in.total_params, "%s: model has %lld parameters, info says %lld", what,
                  (long long)moe_model_numel(m), (long long)in.total_params);
    moe_model_free(m);
    moe_backend_free(b);
}

START_TEST(matches_created_model)
{
    moe_model_config c;
    moe_model_config_tiny(&c);
    check_created(&c, "tiny");
    paper_config(&c);
    check_created(&c, "shared + gate, qkv bias, dense layer");
    c.moe.residual = 1;
    c.moe.d_ff_dense = 3;
    c.moe.router = MOE_ROUTER_NOISY_TOPK;
    c.moe.use_bias = 1;
    c.moe.act = MOE_ACT_SWIGLU;
    check_created(&c, "residual, noisy top-k, expert bias, swiglu");
    c.moe.router = MOE_ROUTER_HASH;
    c.moe.top_k = 1;
    c.moe.use_bias = 0;
    c.moe.lb_coef = c.moe.z_coef = 0;
    c.tie_word_embeddings = 1;
    check_created(&c, "hash router, tied");
    paper_config(&c);
    c.n_experts_per_layer = 2;
    c.num_experts_per_layer[0] = 0;
    c.num_experts_per_layer[1] = 5;
    check_created(&c, "pyramid");
}
END_TEST

int main(void)
{
    Suite *s = suite_create("info");
    TCase *tc = tcase_create("counts");
    tcase_add_test(tc, mixtral_8x7b_exact);
    tcase_add_test(tc, published_counts);
    tcase_add_test(tc, presets_consistent);
    tcase_add_test(tc, counted_by_hand);
    tcase_add_test(tc, routers_and_branches);
    tcase_add_test(tc, matches_created_model);
    suite_add_tcase(s, tc);
    return tu_run(s);
}
