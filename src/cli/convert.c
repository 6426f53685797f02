/*
 * cmoe export / cmoe import — a run directory as a Hugging Face checkpoint and back
 * (src/io/hf.h has the name mapping and what is refused).
 */
#define _POSIX_C_SOURCE 200809L
#include "config.h"

#include <errno.h>
#include <getopt.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include <jansson.h>

#include "cmoe.h"
#include "commands.h"
#include "core/durable.h"
#include "io/hf.h"
#include "io/rundir.h"
#include "run.h"

static int usage(const char *cmd, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, "cmoe %s: ", cmd);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fprintf(stderr, "\nTry 'cmoe help %s'.\n", cmd);
    return EXIT_USAGE;
}

static int failed(const char *cmd)
{
    fprintf(stderr, "cmoe %s: %s\n", cmd, moe_last_error());
    return EXIT_FAIL;
}

static const char mapping_text[] =
    "Architectures: MixtralForCausalLM (no shared expert) and Qwen2MoeForCausalLM (a shared\n"
    "expert with its sigmoid gate, q/k/v biases). Names: HF Linear weights are [out, in],\n"
    "cmoe's [in, out], so every matrix is transposed; cmoe's expert tensors [E, in, out] are\n"
    "cut into one tensor per expert:\n"
    "  model.layers.N.block_sparse_moe.router.weight [C, E]\n"
    "      Mixtral  model.layers.N.block_sparse_moe.gate.weight [E, C]\n"
    "      Qwen2    model.layers.N.mlp.gate.weight [E, C]\n"
    "  ...block_sparse_moe.experts.w1 / w3 / w2 (expert e)\n"
    "      Mixtral  ...block_sparse_moe.experts.e.w1 / w3 / w2.weight\n"
    "      Qwen2    ...mlp.experts.e.gate_proj / up_proj / down_proj.weight\n"
    "  ...block_sparse_moe.shared.w1 / w3 / w2, shared.gate [C]\n"
    "      Qwen2    ...mlp.shared_expert.gate_proj / up_proj / down_proj.weight,\n"
    "               ...mlp.shared_expert_gate.weight [1, C]\n"
    "  attention q/k/v/o_proj, dense mlp gate/up/down_proj: same names, transposed;\n"
    "  embeddings, norms, biases, lm_head.weight: same names and layout.\n";

void help_export(void)
{
    printf("usage: cmoe export --format hf [--dtype f32|bf16|f16] [--force] RUN_DIR OUT_DIR\n\n"
           "Writes the model of a cmoe run (RUN_DIR/model.safetensors) as a Hugging Face\n"
           "transformers checkpoint: OUT_DIR/config.json and OUT_DIR/model.safetensors, loadable\n"
           "with AutoModelForCausalLM.from_pretrained(OUT_DIR).\n\n"
           "%s\n"
           "Refused, naming the reason: configs with no HF equivalent (routers other than top-k\n"
           "softmax, capacity dropping, the aux-loss-free bias, Residual-MoE, pyramid MoE,\n"
           "non-gated experts, shared experts without a gate; for Mixtral dense layers, q/k/v\n"
           "biases, un-renormalised top-k). hidden_act swiglu becomes silu, geglu gelu.\n"
           "Training-only keys travel in config.json under \"cmoe\" and come back on import.\n\n"
           "Options:\n"
           "  --format hf         the only format (required)\n"
           "  --dtype T           f32 (default; import gives back the same bits), bf16 or f16\n"
           "  --force             write into OUT_DIR even when it holds a run or config.json or\n"
           "                      model.safetensors (never over RUN_DIR's own files)\n"
           "  --help              this text\n",
           mapping_text);
}

void help_import(void)
{
    printf("usage: cmoe import --format hf HF_DIR RUN_DIR\n\n"
           "Reads a Hugging Face checkpoint of MixtralForCausalLM or Qwen2MoeForCausalLM\n"
           "(HF_DIR/config.json and HF_DIR/model.safetensors, or the shards listed in\n"
           "HF_DIR/model.safetensors.index.json; F32, BF16 or F16) and writes a cmoe run\n"
           "directory with config.json and model.safetensors (F32). Then:\n"
           "  cmoe eval RUN_DIR --data PATH      loss and perplexity\n"
           "  cmoe sample RUN_DIR                text\n"
           "  cmoe train --init-from RUN_DIR ... fine-tuning (fresh optimizer)\n\n"
           "%s\n"
           "Reads the config.json of transformers 4 (rope_theta, torch_dtype) and 5\n"
           "(rope_parameters, dtype, head_dim null). A key left out that changes the math\n"
           "(rope_theta, rms_norm_eps, hidden_act, num_experts_per_tok, norm_topk_prob) takes\n"
           "the HF class default, as transformers does, and a note on stderr says so.\n"
           "Refused: other model types, rope types other than \"default\" (linear, dynamic,\n"
           "yarn, llama3, longrope, ...), partial rotary factors, sliding windows shorter than\n"
           "the context, activations other than silu and gelu, tensors that are missing, of\n"
           "the wrong shape, not finite (NaN, Inf) or not part of the model (rotary inv_freq\n"
           "buffers are ignored).\n"
           "RUN_DIR must not hold a run, config.json or model.safetensors (--force overwrites).\n\n"
           "Options:\n"
           "  --format hf         the only format (required)\n"
           "  --force             write into RUN_DIR even when it holds a run\n"
           "  --help              this text\n",
           mapping_text);
}

enum { OPT_FORMAT = 256, OPT_DTYPE, OPT_FORCE, OPT_HELP };

/* the common part: --format hf, two directories */
static int parse(const char *cmd, int argc, char **argv, const char **dtype, int *force, const char **a,
                 const char **b)
{
    static const struct option longopts[] = {
        {"format", required_argument, NULL, OPT_FORMAT}, {"dtype", required_argument, NULL, OPT_DTYPE},
        {"force", no_argument, NULL, OPT_FORCE},         {"help", no_argument, NULL, OPT_HELP},
        {NULL, 0, NULL, 0},
    };
    const char *format = NULL;
    optind = 0;
    opterr = 0;
    int opt;
    while ((opt = getopt_long(argc, argv, ":", longopts, NULL)) != -1) {
        switch (opt) {
        case OPT_FORMAT: format = optarg; break;
        case OPT_DTYPE:
            if (!dtype)
                return usage(cmd, "unknown option '--dtype' (export only)");
            *dtype = optarg;
            break;
        case OPT_FORCE: *force = 1; break;
        case OPT_HELP: return -1;
        case ':': return usage(cmd, "option '%s' needs an argument", argv[optind - 1]);
        default: return usage(cmd, "unknown option '%s'", argv[optind - 1]);
        }
    }
    if (!format)
        return usage(cmd, "--format hf is required (Hugging Face transformers is the only format)");
    if (strcmp(format, "hf"))
        return usage(cmd, "--format '%s': the only format is hf", format);
    if (argc - optind != 2)
        return usage(cmd, "need two directories, got %d argument%s", argc - optind, argc - optind == 1 ? "" : "s");
    *a = argv[optind];
    *b = argv[optind + 1];
    return 0;
}

/* what export and import write into their output directory */
static const char *const written[] = {"config.json", CLI_RUN_WEIGHTS, NULL};

/* The output directory's files must not be the input's (the same directory under another
 * name, a symlink): refused even with --force. */
static moe_status same_files(const char *out_dir, const char *in_dir)
{
    char a[4200], b[4200];
    for (int i = 0; written[i]; i++) {
        moe_status s;
        if ((s = cli_path(a, sizeof a, out_dir, written[i])) || (s = cli_path(b, sizeof b, in_dir, written[i])) ||
            (s = moe_refuse_same_file(a, b, "input")))
            return s;
    }
    return MOE_OK;
}

int cmd_export(int argc, char **argv)
{
    const char *dt = "f32", *run_dir, *out;
    int force = 0;
    int rc = parse("export", argc, argv, &dt, &force, &run_dir, &out);
    if (rc < 0) {
        help_export();
        return EXIT_OK;
    }
    if (rc)
        return rc;
    moe_st_dtype dtype;
    if (!strcmp(dt, "f32") || !strcmp(dt, "F32"))
        dtype = MOE_ST_F32;
    else if (!strcmp(dt, "bf16") || !strcmp(dt, "BF16"))
        dtype = MOE_ST_BF16;
    else if (!strcmp(dt, "f16") || !strcmp(dt, "F16"))
        dtype = MOE_ST_F16;
    else
        return usage("export", "--dtype '%s': use f32, bf16 or f16", dt);
    cli_run r;
    moe_made_dirs made = {0};
    int wrote = 0;
    moe_status s = cli_run_open(run_dir, &r);
    moe_hf_arch arch;
    /* refuse before anything is built or written: never over a run or a file of OUT_DIR
     * (unless --force), never over the input itself (not even with --force) */
    if (!s && !(s = moe_hf_arch_of(&r.cfg, &arch)) && !(s = same_files(out, run_dir)) &&
        !(s = moe_rundir_check_output(out, written, force)) && !(s = moe_mkdirs(out, &made)) &&
        !(s = cli_run_build(&r, "cpu", 1, 1, 1))) {
        wrote = 1;
        s = moe_hf_export(r.model, out, dtype);
    }
    if (s) {
        char path[4200]; /* without --force neither file was there before */
        for (int i = 0; wrote && !force && written[i]; i++)
            if (cli_path(path, sizeof path, out, written[i]) == MOE_OK)
                remove(path);
        moe_made_dirs_undo(&made);
    }
    moe_made_dirs_clear(&made);
    if (!s)
        printf("cmoe export: %s -> %s (%s, %s, %lld parameters): config.json, model.safetensors\n", run_dir, out,
               moe_hf_arch_name(arch), moe_st_dtype_name(dtype), (long long)moe_model_numel(r.model));
    cli_run_free(&r);
    return s ? failed("export") : EXIT_OK;
}

int cmd_import(int argc, char **argv)
{
    const char *hf_dir, *run_dir;
    int force = 0;
    int rc = parse("import", argc, argv, NULL, &force, &hf_dir, &run_dir);
    if (rc < 0) {
        help_import();
        return EXIT_OK;
    }
    if (rc)
        return rc;
    char path[4200];
    moe_made_dirs made = {0};
    int wrote = 0;
    moe_model_config c;
    moe_hf_arch arch;
    moe_backend *b = NULL;
    moe_model *m = NULL;
    char *cfg_json = NULL;
    char notes[2048];
    moe_status s = same_files(run_dir, hf_dir);
    if (!s)
        s = moe_rundir_check_output(run_dir, written, force);
    if (!s)
        s = moe_hf_read_config(hf_dir, &c, &arch, notes, sizeof notes);
    if (!s && notes[0]) /* defaults that change the math: said, never silent */
        fprintf(stderr, "cmoe import: note: %s/config.json: %s\n", hf_dir, notes);
    /* fp32 holds every F32, BF16 and F16 value exactly, and the model once: the weights
     * stream from the mapped files one parameter at a time (moe_hf_load_weights) */
    if (!s && !(s = moe_backend_create("cpu", NULL, &b)) && !(s = moe_model_create(&c, b, NULL, 1, 1, &m)) &&
        !(s = moe_hf_load_weights(hf_dir, m, arch)) && !(s = moe_mkdirs(run_dir, &made)) &&
        !(s = moe_model_config_to_json(&c, 1, &cfg_json))) {
        wrote = 1;
        if ((s = cli_path(path, sizeof path, run_dir, "config.json")) == MOE_OK)
            s = moe_durable_write_text(path, cfg_json);
        json_t *t = json_pack("{s:s, s:s}", "imported_from", hf_dir, "architecture", moe_hf_arch_name(arch));
        char *train = t ? json_dumps(t, JSON_COMPACT) : NULL;
        if (!s)
            s = cli_run_save(run_dir, m, train, 0);
        free(train);
        json_decref(t);
    }
    if (s) {
        /* without --force neither file was there before: what this command wrote goes, so
         * the next attempt needs no --force */
        for (int i = 0; wrote && !force && written[i]; i++)
            if (cli_path(path, sizeof path, run_dir, written[i]) == MOE_OK)
                remove(path);
        moe_made_dirs_undo(&made);
    }
    moe_made_dirs_clear(&made);
    if (!s)
        printf("cmoe import: %s (%s, %lld parameters) -> %s: config.json, model.safetensors\n", hf_dir,
               moe_hf_arch_name(arch), (long long)moe_model_numel(m), run_dir);
    free(cfg_json);
    moe_model_free(m);
    moe_backend_free(b);
    return s ? failed("import") : EXIT_OK;
}
