/*
 * cmoe info — parameters, active parameters, FLOPs per token and training memory of a
 * model configuration (the counting rules are in src/model/info.h and `cmoe help info`).
 */
#include "config.h"

#include <getopt.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <jansson.h>

#include "cmoe.h"
#include "commands.h"
#include "model/info.h"
#include "presets.h"
#include "run.h"

void help_info(void)
{
    printf("usage: cmoe info (--preset NAME | --config FILE) [--seq S] [--json]\n"
           "       cmoe info --list\n\n"
           "Prints what a model configuration costs: total parameters (by part), active\n"
           "parameters per token, FLOPs per token (forward and forward+backward) at sequence\n"
           "length S, and the memory of weights, gradients and AdamW state.\n\n"
           "Options:\n"
           "  --preset NAME   configs/NAME.json, looked up in ./configs, $CMOE_CONFIGS, then the\n"
           "                  installed presets; laptop and tiny are also built in\n"
           "  --config FILE   a model configuration (JSON, Hugging Face keys)\n"
           "  --seq S         sequence length for the attention FLOPs (max_position_embeddings)\n"
           "  --json          one JSON object: total_params, active_params,\n"
           "                  active_params_nonembed, flops_per_token_fwd, flops_per_token_fwdbwd,\n"
           "                  the parameters by part, and memory in bytes\n"
           "  --list          the presets found, with their total and active parameters\n"
           "  --help          this text\n\n"
           "Counting rules:\n"
           "  Parameters are counted as the model allocates them: embedding, LM head (absent\n"
           "  when tied), RMSNorm weights, q/k/v/o projections and q/k/v biases, dense FFNs,\n"
           "  routers (and noise projections, expert biases), experts, shared experts and their\n"
           "  gate, the Residual-MoE branch and its mixing projection [hidden, 2].\n"
           "  Active parameters per token count everything a token touches: the embedding and\n"
           "  the LM head whole, each MoE layer's router whole, k of its E routed experts (k =\n"
           "  top-k for token choice, an upper bound when a capacity factor drops tokens; 1 for\n"
           "  hash routing; capacity_factor for expert choice), and every shared expert and\n"
           "  residual branch. 'without embedding' leaves out the embedding and the LM head.\n"
           "  FLOPs per token: 2 per multiply-add of every matrix product the token goes\n"
           "  through (attention projections, FFNs, router, its k experts, shared experts and\n"
           "  gate, residual branch, LM head) plus attention's q·k and p·v products, 4·H·head_dim\n"
           "  per key attended. Causal: the query at position i sees i+1 keys, so a token of a\n"
           "  length-S sequence attends to (S+1)/2 keys on average (PaLM's MFU formula counts S,\n"
           "  twice this term). Elementwise work (norms, RoPE, activations, softmax, the\n"
           "  embedding lookup) is not counted. Backward = 2 x forward; fwd+bwd = 3 x forward.\n"
           "  Memory (activations not included): fp32 = 4 bytes each for weights, gradients,\n"
           "  AdamW m and v (16 per parameter); bf16 mixed precision = bf16 weights (2) and\n"
           "  gradients (2) plus fp32 master weights (4), m (4) and v (4), also 16 per parameter.\n\n"
           "Exit status: 0 ok, 1 invalid configuration or preset not found, 2 usage.\n");
}

static int usage(const char *msg, const char *arg)
{
    fprintf(stderr, "cmoe info: ");
    fprintf(stderr, msg, arg);
    fprintf(stderr, "\nTry 'cmoe help info'.\n");
    return EXIT_USAGE;
}

/* 46702792704 -> "46,702,792,704" */
static const char *grouped(int64_t v, char *buf, size_t n)
{
    char digits[32];
    int len = snprintf(digits, sizeof digits, "%" PRId64, v < 0 ? -v : v), at = 0;
    if (v < 0 && (size_t)at + 1 < n)
        buf[at++] = '-';
    for (int i = 0; i < len && (size_t)at + 2 < n; i++) {
        if (i > 0 && (len - i) % 3 == 0)
            buf[at++] = ',';
        buf[at++] = digits[i];
    }
    buf[at] = '\0';
    return buf;
}

/* 1.29e10 -> "12.88 B" (decimal: parameter counts and FLOPs are quoted that way) */
static const char *si(double v, const char *unit, char *buf, size_t n)
{
    static const char *const pre[] = {"", "K", "M", "B", "T", "P"};
    static const char *const pre_flop[] = {"", "K", "M", "G", "T", "P"};
    int i = 0;
    while (v >= 1000 && i < 5) {
        v /= 1000;
        i++;
    }
    snprintf(buf, n, "%.2f %s%s", v, unit[0] ? pre_flop[i] : pre[i], unit);
    return buf;
}

static const char *gib(double bytes, char *buf, size_t n)
{
    snprintf(buf, n, bytes >= 1024.0 * 1024 * 1024 ? "%.1f GiB" : "%.1f MiB",
             bytes >= 1024.0 * 1024 * 1024 ? bytes / (1024.0 * 1024 * 1024) : bytes / (1024.0 * 1024));
    return buf;
}

static void part(const char *name, int64_t v, int64_t total)
{
    char g[40];
    if (v)
        printf("    %-24s %18s  %5.1f%%\n", name, grouped(v, g, sizeof g), 100.0 * (double)v / (double)total);
}

static void print_text(const char *src, const moe_model_config *c, const moe_model_info *in)
{
    char a[40], b[40], d[40];
    const int64_t hd = c->head_dim ? c->head_dim : c->hidden_size / c->num_attention_heads;
    printf("%s\n", src);
    printf("  %lld layers (%lld MoE, %lld dense), hidden %lld, %lld heads (%lld KV, head_dim %lld), vocab %lld, "
           "%s embeddings, %s\n",
           (long long)in->n_layers, (long long)in->n_moe_layers, (long long)in->n_dense_layers,
           (long long)c->hidden_size, (long long)c->num_attention_heads, (long long)c->num_key_value_heads,
           (long long)hd, (long long)c->vocab_size, c->tie_word_embeddings ? "tied" : "untied",
           moe_activation_name(c->moe.act));
    if (in->attention_experts)
        printf("  attention: a mixture of %lld attention-head experts (head_dim %lld), %lld per token, one shared "
               "key/value head\n",
               (long long)in->attention_experts, (long long)hd, (long long)in->attention_experts_per_tok);
    if (in->n_moe_layers) {
        const moe_layer_config *m = &c->moe;
        printf("  MoE: %lld experts of %lld, router %s, %.3g experts per token", (long long)m->n_experts,
               (long long)c->moe_intermediate_size, moe_router_name(m->router), in->experts_per_token);
        if (m->n_shared)
            printf(", %lld shared of %lld%s", (long long)m->n_shared,
                   (long long)(m->d_ff_shared > 0 ? m->d_ff_shared : c->moe_intermediate_size),
                   m->shared_gate ? " (sigmoid gate)" : "");
        if (m->residual)
            printf(", residual MLP of %lld", (long long)(m->d_ff_dense > 0 ? m->d_ff_dense : c->moe_intermediate_size));
        printf(", %s\n", m->capacity_factor > 0 || m->router == MOE_ROUTER_EXPERT_CHOICE ? "capacity-limited"
                                                                                          : "dropless");
    }
    printf("\nParameters\n");
    printf("  total                      %18s  (%s)\n", grouped(in->total_params, a, sizeof a),
           si((double)in->total_params, "", b, sizeof b));
    part("embedding", in->embed_params, in->total_params);
    part("LM head", in->lm_head_params, in->total_params);
    part("attention", in->attn_params, in->total_params);
    part("  of it attention experts", in->attn_expert_params, in->total_params);
    part("norms", in->norm_params, in->total_params);
    part("dense FFN", in->dense_ffn_params, in->total_params);
    part("routers", in->router_params, in->total_params);
    part("routed experts", in->expert_params, in->total_params);
    part("shared experts", in->shared_params, in->total_params);
    part("residual MLP", in->residual_params, in->total_params);
    printf("  active per token           %18s  (%s)\n", grouped(in->active_params, a, sizeof a),
           si((double)in->active_params, "", b, sizeof b));
    printf("    without embedding/head   %18s  (%s)\n", grouped(in->active_params_nonembed, a, sizeof a),
           si((double)in->active_params_nonembed, "", b, sizeof b));
    printf("\nFLOPs per token at seq %lld (causal: (S+1)/2 keys per query on average)\n", (long long)in->seq);
    printf("  forward                    %18s  (attention products %s)\n", si(in->flops_fwd, "FLOP", a, sizeof a),
           si(in->flops_attn_fwd, "FLOP", b, sizeof b));
    printf("  forward + backward         %18s\n", si(in->flops_fwdbwd, "FLOP", a, sizeof a));
    printf("\nTraining memory (activations not included)\n");
    printf("  %-20s %11s %11s %11s %11s %11s\n", "", "weights", "gradients", "master", "AdamW m, v", "total");
    printf("  %-20s %11s %11s %11s ", "fp32", gib(in->mem_fp32_params, a, sizeof a),
           gib(in->mem_fp32_grads, b, sizeof b), "-");
    printf("%11s %11s\n", gib(in->mem_fp32_adam, a, sizeof a), gib(in->mem_fp32_total, b, sizeof b));
    printf("  %-20s %11s %11s %11s ", "bf16 + fp32 master", gib(in->mem_bf16_params, a, sizeof a),
           gib(in->mem_bf16_grads, b, sizeof b), gib(in->mem_bf16_master, d, sizeof d));
    printf("%11s %11s\n", gib(in->mem_bf16_adam, a, sizeof a), gib(in->mem_bf16_total, b, sizeof b));
}

static int print_json(const char *src, const moe_model_info *in)
{
    json_t *o = json_object(), *p = json_object(), *mf = json_object(), *mb = json_object();
    json_object_set_new(o, "source", json_string(src));
    json_object_set_new(o, "seq", json_integer(in->seq));
    json_object_set_new(o, "total_params", json_integer(in->total_params));
    json_object_set_new(o, "active_params", json_integer(in->active_params));
    json_object_set_new(o, "active_params_nonembed", json_integer(in->active_params_nonembed));
    json_object_set_new(o, "total_params_nonembed", json_integer(in->total_params_nonembed));
    json_object_set_new(o, "experts_per_token", json_real(in->experts_per_token));
    json_object_set_new(o, "flops_per_token_fwd", json_real(in->flops_fwd));
    json_object_set_new(o, "flops_per_token_fwdbwd", json_real(in->flops_fwdbwd));
    json_object_set_new(o, "attention_flops_per_token_fwd", json_real(in->flops_attn_fwd));
    json_object_set_new(o, "layers", json_integer(in->n_layers));
    json_object_set_new(o, "moe_layers", json_integer(in->n_moe_layers));
    json_object_set_new(o, "dense_layers", json_integer(in->n_dense_layers));
    json_object_set_new(p, "embedding", json_integer(in->embed_params));
    json_object_set_new(p, "lm_head", json_integer(in->lm_head_params));
    json_object_set_new(p, "attention", json_integer(in->attn_params));
    if (in->attention_experts) {
        json_object_set_new(o, "attention_experts", json_integer(in->attention_experts));
        json_object_set_new(o, "attention_experts_per_tok", json_integer(in->attention_experts_per_tok));
        json_object_set_new(p, "attention_experts", json_integer(in->attn_expert_params));
    }
    json_object_set_new(p, "norms", json_integer(in->norm_params));
    json_object_set_new(p, "dense_ffn", json_integer(in->dense_ffn_params));
    json_object_set_new(p, "routers", json_integer(in->router_params));
    json_object_set_new(p, "experts", json_integer(in->expert_params));
    json_object_set_new(p, "shared_experts", json_integer(in->shared_params));
    json_object_set_new(p, "residual", json_integer(in->residual_params));
    json_object_set_new(o, "params", p);
    json_object_set_new(mf, "params", json_real(in->mem_fp32_params));
    json_object_set_new(mf, "grads", json_real(in->mem_fp32_grads));
    json_object_set_new(mf, "adam", json_real(in->mem_fp32_adam));
    json_object_set_new(mf, "total", json_real(in->mem_fp32_total));
    json_object_set_new(mb, "params", json_real(in->mem_bf16_params));
    json_object_set_new(mb, "grads", json_real(in->mem_bf16_grads));
    json_object_set_new(mb, "master", json_real(in->mem_bf16_master));
    json_object_set_new(mb, "adam", json_real(in->mem_bf16_adam));
    json_object_set_new(mb, "total", json_real(in->mem_bf16_total));
    json_object_set_new(o, "memory_bytes_fp32", mf);
    json_object_set_new(o, "memory_bytes_bf16_mixed", mb);
    char *text = json_dumps(o, JSON_INDENT(2) | JSON_PRESERVE_ORDER | JSON_REAL_PRECISION(17));
    json_decref(o);
    if (!text) {
        fprintf(stderr, "cmoe info: out of memory\n");
        return EXIT_FAIL;
    }
    printf("%s\n", text);
    free(text);
    return EXIT_OK;
}

static void list_one(const char *name, const char *path, void *ctx)
{
    (void)ctx;
    moe_model_config c;
    moe_model_info in;
    char src[4200], a[40], b[40];
    if (cli_preset_load(name, &c, src, sizeof src) || moe_model_info_compute(&c, 0, &in)) {
        printf("  %-20s (invalid: %s)\n", name, moe_last_error());
        return;
    }
    printf("  %-20s %12s total, %12s active  %s\n", name, si((double)in.total_params, "", a, sizeof a),
           si((double)in.active_params, "", b, sizeof b), path ? path : "(built in)");
}

int cmd_info(int argc, char **argv)
{
    enum { O_PRESET = 256, O_CONFIG, O_SEQ, O_JSON, O_LIST, O_HELP };
    static const struct option longopts[] = {
        {"preset", required_argument, NULL, O_PRESET}, {"config", required_argument, NULL, O_CONFIG},
        {"seq", required_argument, NULL, O_SEQ},       {"json", no_argument, NULL, O_JSON},
        {"list", no_argument, NULL, O_LIST},           {"help", no_argument, NULL, O_HELP},
        {NULL, 0, NULL, 0},
    };
    const char *preset = NULL, *config = NULL;
    int64_t seq = 0;
    int json = 0, list = 0, opt;
    optind = 1;
    opterr = 0;
    while ((opt = getopt_long(argc, argv, ":", longopts, NULL)) != -1) {
        switch (opt) {
        case O_PRESET: preset = optarg; break;
        case O_CONFIG: config = optarg; break;
        case O_SEQ:
            if (!cli_parse_i64(optarg, 1, (int64_t)1 << 20, &seq))
                return usage("--seq: '%s' is not an integer in [1, 2^20]", optarg);
            break;
        case O_JSON: json = 1; break;
        case O_LIST: list = 1; break;
        case O_HELP: help_info(); return EXIT_OK;
        case ':': return usage("option '%s' needs an argument", argv[optind - 1]);
        default: return usage("unknown option '%s'", argv[optind - 1]);
        }
    }
    if (optind < argc)
        return usage("unexpected argument '%s'", argv[optind]);
    if (list) {
        if (preset || config)
            return usage("--list takes no --preset or --config%s", "");
        printf("presets (./configs, $CMOE_CONFIGS, installed, built in):\n");
        cli_preset_list(list_one, NULL);
        return EXIT_OK;
    }
    if (!preset == !config)
        return usage("give --preset NAME or --config FILE%s", preset ? ", not both" : "");
    moe_model_config c;
    char src[4200];
    moe_status s;
    if (config) {
        snprintf(src, sizeof src, "%s", config);
        s = moe_model_config_load(config, &c);
    } else {
        s = cli_preset_load(preset, &c, src, sizeof src);
    }
    if (s) {
        fprintf(stderr, "cmoe info: %s\n", moe_last_error());
        return EXIT_FAIL;
    }
    if (seq > c.max_position_embeddings) {
        fprintf(stderr, "cmoe info: --seq %lld is longer than the model's max_position_embeddings %lld\n",
                (long long)seq, (long long)c.max_position_embeddings);
        return EXIT_USAGE;
    }
    moe_model_info in;
    if ((s = moe_model_info_compute(&c, seq, &in))) {
        fprintf(stderr, "cmoe info: %s\n", moe_last_error());
        return EXIT_FAIL;
    }
    if (json)
        return print_json(src, &in);
    print_text(src, &c, &in);
    return EXIT_OK;
}
