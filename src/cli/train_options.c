/*
 * cmoe train's command line: the options, their checks and the help text. train.c runs
 * what they describe.
 */
#include "config.h"

#include <getopt.h>
#include <inttypes.h>
#include <stdint.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>

#include "cmoe.h"
#include "commands.h"
#include "presets.h"
#include "run.h"
#include "train.h"

static void defaults(train_opts *o)
{
    memset(o, 0, sizeof *o);
    moe_train_settings_default(&o->t);
    moe_dist_options_default(&o->dist);
    o->log_every = 25;
}

void help_train(void)
{
    train_opts d;
    defaults(&d);
    printf("usage: cmoe train [OPTIONS]\n\n"
           "Trains a Mixture-of-Experts language model. With no options: the default laptop\n"
           "model (byte-level, vocabulary 256) on the Brown Corpus (%s).\n"
           "Writes a run directory: config.json (the model), train.json (these settings),\n"
           "metrics.jsonl (one JSON object per step) and model.safetensors (the weights,\n"
           "written at every evaluation and at the end). Then: cmoe sample DIR, cmoe eval DIR.\n\n"
           "Model:\n"
           "  --config FILE       model configuration (JSON, Hugging Face keys)\n"
           "  --preset NAME       configs/NAME.json, looked up in ./configs, $CMOE_CONFIGS and\n"
           "                      the installed presets, else built in (laptop, tiny); default:\n"
           "                      laptop (cmoe info lists them)\n"
           "Data:\n"
           "  --data PATH         text (plain or gzip; bytes are tokens), an llm.c shard (.bin),\n"
           "                      a directory of shards, or synth[:tasks=4,vocab=32,seed=1,val=64]\n"
           "                      (default: %s, found in the current directory,\n"
           "                      then under $CMOE_DATA)\n"
           "Training (default):\n"
           "  --steps N           optimizer steps (%" PRId64 ")\n"
           "  --batch B           sequences per micro-batch (%" PRId64 ")\n"
           "  --seq S             tokens per sequence, <= max_position_embeddings (%" PRId64 ")\n"
           "  --accum N           micro-batches accumulated per step (%" PRId64 ")\n"
           "  --lr LR             peak learning rate, AdamW, cosine decay to 0.1·LR (%g)\n"
           "  --warmup N          linear warmup steps (min(100, steps/10))\n"
           "  --seed S            initialisation and batch order (%" PRIu64 ")\n"
           "  --backend NAME      one of this build's: %s (%s); cpu: fp32, OpenBLAS;\n"
           "                      ref: double, the oracle (slow); cuda: the GPU\n"
           "  --dtype TYPE        compute type: fp32, or bf16 on cuda (bf16 weights and\n"
           "                      activations; router, master weights and AdamW state fp32;\n"
           "                      checkpoints fp32 either way) (the backend's own)\n"
           "  --threads N         worker threads (OpenMP's default, OMP_NUM_THREADS)\n"
           "Many processes (started by mpirun or srun; README: Expert parallelism):\n"
           "  --groups G          cut every micro-batch into G groups of batch/G sequences, routed and\n"
           "                      summed per group in one fixed tree: the same G gives the same bits\n"
           "                      in one process and under any layout (a power of two, a multiple of\n"
           "                      the ranks; default: the number of ranks; kept on --resume)\n"
           "  --ep N              expert-parallel ranks: the experts split over N ranks, the ranks\n"
           "                      = N x data-parallel replicas (default: all of them)\n"
           "  --a2a MODE          flat (one MPI_Alltoallv) or hier (inside each node, then across)\n"
           "  --ranks-per-node N  hier: N consecutive ranks form a node (default: MPI's shared memory)\n"
           "  --a2a-chunks D      the all-to-all in D chunks, each travelling while the last one's\n"
           "                      experts compute (1); auto: 1, 2, 4 timed, the fastest kept\n"
           "  --a2a-max-rows N    at most N rows of a block per all-to-all message (rounds)\n"
           "  --zero              ZeRO-1: the non-expert AdamW moments split over the ranks\n"
           "Output:\n"
           "  --out DIR           run directory (runs/YYYYmmdd-HHMMSS): new, or empty; a directory\n"
           "                      that holds a run or other files is refused, and so is /\n"
           "  --force             write into DIR even so (a run there is overwritten)\n"
           "  --eval-every N      validation loss and weights every N steps, 0: at the end\n"
           "                      only (%" PRId64 ")\n"
           "  --eval-batches N    validation batches per evaluation, 0: the whole split (%" PRId64 ")\n"
           "  --log-every N       a plain progress line every N steps when stdout is not a\n"
           "                      terminal (%" PRId64 "); a terminal gets a live line\n"
           "Checkpoints:\n"
           "  --save-every N      write DIR/ckpt-STEP.safetensors every N steps and at the end:\n"
           "                      parameters, AdamW moments, step, seed, config and settings (F32\n"
           "                      on cpu, F64 on ref: exactly the values held); 0: only when\n"
           "                      interrupted (default)\n"
           "  --keep N            keep the newest N checkpoints, 0: all (%" PRId64 ")\n"
           "  --resume PATH       continue the run in directory PATH from its newest valid\n"
           "                      checkpoint (a newer one that fails is named, with the reason),\n"
           "                      or from the checkpoint file PATH (that one or none): every later\n"
           "                      step is bitwise the step of the uninterrupted run. Settings come\n"
           "                      from the checkpoint; only --steps (a new cosine horizon),\n"
           "                      --threads, --backend, --dtype, --eval-every, --eval-batches, --log-every,\n"
           "                      --save-every, --keep and --data (the same data, moved: checked\n"
           "                      by size and checksum) may be given. metrics.jsonl is cut back to\n"
           "                      the checkpoint's step and continues; later checkpoints are\n"
           "                      removed. A checkpoint that fails validation changes nothing.\n"
           "  --init-from DIR     start from the weights of run DIR (its model.safetensors, e.g. a\n"
           "                      model from 'cmoe import'), with a fresh optimizer: fine-tuning.\n"
           "                      The model config is DIR's; --config/--preset are refused.\n"
           "  --help              this text\n\n"
           "metrics.jsonl: step, loss (ce + aux), ce, aux, lr, grad_norm, tokens_per_s,\n"
           "elapsed_s, load_max_over_mean, dropped_frac, val_loss (evaluation steps), and\n"
           "\"layers\": [{\"layer\", \"experts\", \"load\": [kept per expert], \"dropped\", \"aux\": {lb,\n"
           "importance, load, z, mi, total}}] for each MoE layer.\n\n"
           "Ctrl-C, SIGTERM and SIGHUP (kill, docker stop, Slurm's --signal=TERM@60) stop after\n"
           "the current step, save the weights and a checkpoint, and exit with 128 + the signal\n"
           "(130, 143, 129); --resume DIR continues. A second signal exits at once. One process\n"
           "trains in a directory at a time (DIR/.cmoe.lock names it).\n"
           "Exit status: 0 ok, 1 failure (bad data or config; the reason on stderr), 2 usage.\n",
           CLI_DEFAULT_DATA, CLI_DEFAULT_DATA, d.t.steps, d.t.batch, d.t.seq, d.t.accum, d.t.oc.lr, d.t.seed, moe_backend_list(), d.t.backend,
           d.t.eval_every, d.t.eval_batches, d.log_every, d.t.keep);
}

int cli_train_usage(const char *fmt, ...)
{
    char msg[2048];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    /* one write: the ranks of an MPI job share the terminal */
    fprintf(stderr, "cmoe train: %s\nTry 'cmoe help train'.\n", msg);
    return EXIT_USAGE;
}

/* ---- command line ----------------------------------------------------------------- */

enum {
    OPT_CONFIG = 256, OPT_PRESET, OPT_DATA, OPT_STEPS, OPT_BATCH, OPT_SEQ, OPT_ACCUM, OPT_LR, OPT_WARMUP,
    OPT_BACKEND, OPT_THREADS, OPT_SEED, OPT_OUT, OPT_FORCE, OPT_EVAL_EVERY, OPT_EVAL_BATCHES, OPT_LOG_EVERY,
    OPT_SAVE_EVERY, OPT_KEEP, OPT_RESUME, OPT_INIT_FROM, OPT_DTYPE, OPT_HELP, OPT_EP, OPT_GROUPS, OPT_A2A, OPT_RPN,
    OPT_A2A_CHUNKS, OPT_A2A_MAX_ROWS, OPT_ZERO
};

static int int_opt(const char *name, const char *arg, int64_t lo, int64_t hi, int64_t *out)
{
    if (cli_parse_i64(arg, lo, hi, out))
        return 0;
    cli_train_usage("%s: '%s' is not an integer in [%lld, %lld]", name, arg, (long long)lo, (long long)hi);
    return -1;
}

int cmd_train(int argc, char **argv)
{
    static const struct option longopts[] = {
        {"config", required_argument, NULL, OPT_CONFIG},
        {"preset", required_argument, NULL, OPT_PRESET},
        {"data", required_argument, NULL, OPT_DATA},
        {"steps", required_argument, NULL, OPT_STEPS},
        {"batch", required_argument, NULL, OPT_BATCH},
        {"seq", required_argument, NULL, OPT_SEQ},
        {"accum", required_argument, NULL, OPT_ACCUM},
        {"lr", required_argument, NULL, OPT_LR},
        {"warmup", required_argument, NULL, OPT_WARMUP},
        {"backend", required_argument, NULL, OPT_BACKEND},
        {"dtype", required_argument, NULL, OPT_DTYPE},
        {"threads", required_argument, NULL, OPT_THREADS},
        {"seed", required_argument, NULL, OPT_SEED},
        {"out", required_argument, NULL, OPT_OUT},
        {"force", no_argument, NULL, OPT_FORCE},
        {"eval-every", required_argument, NULL, OPT_EVAL_EVERY},
        {"eval-batches", required_argument, NULL, OPT_EVAL_BATCHES},
        {"log-every", required_argument, NULL, OPT_LOG_EVERY},
        {"save-every", required_argument, NULL, OPT_SAVE_EVERY},
        {"keep", required_argument, NULL, OPT_KEEP},
        {"resume", required_argument, NULL, OPT_RESUME},
        {"init-from", required_argument, NULL, OPT_INIT_FROM},
        {"help", no_argument, NULL, OPT_HELP},
        {"ep", required_argument, NULL, OPT_EP},
        {"groups", required_argument, NULL, OPT_GROUPS},
        {"a2a", required_argument, NULL, OPT_A2A},
        {"ranks-per-node", required_argument, NULL, OPT_RPN},
        {"a2a-chunks", required_argument, NULL, OPT_A2A_CHUNKS},
        {"a2a-max-rows", required_argument, NULL, OPT_A2A_MAX_ROWS},
        {"zero", no_argument, NULL, OPT_ZERO},
        {NULL, 0, NULL, 0},
    };
    train_opts o;
    defaults(&o);
    optind = 0; /* glibc: a full restart, so options may follow RUN_DIR (main() ran getopt with "+") */
    opterr = 0;
    int opt;
    int64_t v;
    const int64_t big = (int64_t)1 << 40;
    while ((opt = getopt_long(argc, argv, ":", longopts, NULL)) != -1) {
        /* what a resumed run takes from its checkpoint */
        if (!o.fixed && opt != ':' && opt != '?')
            for (int i = 0; longopts[i].name; i++)
                if (longopts[i].val == opt &&
                    (opt == OPT_CONFIG || opt == OPT_PRESET || opt == OPT_BATCH ||
                     opt == OPT_SEQ || opt == OPT_ACCUM || opt == OPT_LR || opt == OPT_WARMUP || opt == OPT_SEED ||
                     opt == OPT_OUT || opt == OPT_FORCE || opt == OPT_INIT_FROM || opt == OPT_GROUPS))
                    o.fixed = longopts[i].name;
        switch (opt) {
        case OPT_CONFIG: o.config = optarg; break;
        case OPT_PRESET: o.preset = optarg; break;
        case OPT_DATA: o.data = optarg; break;
        case OPT_OUT: o.out = optarg; break;
        case OPT_FORCE: o.force = 1; break;
        case OPT_BACKEND:
            if (!cli_backend_known(optarg))
                return cli_train_usage("--backend: '%s' is not a backend of this build (%s)", optarg, moe_backend_list());
            snprintf(o.t.backend, sizeof o.t.backend, "%s", optarg);
            o.given |= MOE_TS_BACKEND;
            break;
        case OPT_DTYPE:
            if (strcmp(optarg, "fp32") && strcmp(optarg, "bf16"))
                return cli_train_usage("--dtype: '%s' is not one of fp32, bf16", optarg);
            snprintf(o.t.dtype, sizeof o.t.dtype, "%s", optarg);
            o.given |= MOE_TS_DTYPE;
            break;
        case OPT_STEPS:
            if (int_opt("--steps", optarg, 1, big, &o.t.steps))
                return EXIT_USAGE;
            o.t.oc.total_steps = o.t.steps;
            o.given |= MOE_TS_STEPS;
            break;
        case OPT_SAVE_EVERY:
            if (int_opt("--save-every", optarg, 0, big, &o.t.save_every))
                return EXIT_USAGE;
            o.given |= MOE_TS_SAVE_EVERY;
            break;
        case OPT_KEEP:
            if (int_opt("--keep", optarg, 0, big, &o.t.keep))
                return EXIT_USAGE;
            o.given |= MOE_TS_KEEP;
            break;
        case OPT_RESUME: o.resume = optarg; break;
        case OPT_INIT_FROM: o.init_from = optarg; break;
        case OPT_BATCH:
            if (int_opt("--batch", optarg, 1, 1 << 20, &o.t.batch))
                return EXIT_USAGE;
            break;
        case OPT_SEQ:
            if (int_opt("--seq", optarg, 1, 1 << 20, &o.t.seq))
                return EXIT_USAGE;
            o.have_seq = 1;
            break;
        case OPT_ACCUM:
            if (int_opt("--accum", optarg, 1, 1 << 20, &o.t.accum))
                return EXIT_USAGE;
            break;
        case OPT_WARMUP:
            if (int_opt("--warmup", optarg, 0, big, &o.warmup))
                return EXIT_USAGE;
            o.have_warmup = 1;
            break;
        case OPT_THREADS:
            if (int_opt("--threads", optarg, 0, 4096, &o.t.threads))
                return EXIT_USAGE;
            o.given |= MOE_TS_THREADS;
            break;
        case OPT_SEED:
            if (int_opt("--seed", optarg, 0, INT64_MAX, &v))
                return EXIT_USAGE;
            o.t.seed = (uint64_t)v;
            break;
        case OPT_EVAL_EVERY:
            if (int_opt("--eval-every", optarg, 0, big, &o.t.eval_every))
                return EXIT_USAGE;
            o.given |= MOE_TS_EVAL_EVERY;
            break;
        case OPT_EVAL_BATCHES:
            if (int_opt("--eval-batches", optarg, 0, big, &o.t.eval_batches))
                return EXIT_USAGE;
            o.given |= MOE_TS_EVAL_BATCHES;
            break;
        case OPT_LOG_EVERY:
            if (int_opt("--log-every", optarg, 1, big, &o.log_every))
                return EXIT_USAGE;
            break;
        case OPT_LR:
            if (!cli_parse_double(optarg, &o.t.oc.lr) || !(o.t.oc.lr > 0))
                return cli_train_usage("--lr: '%s' is not a number > 0", optarg);
            break;
        case OPT_EP: case OPT_GROUPS: case OPT_A2A: case OPT_RPN: case OPT_A2A_CHUNKS: case OPT_A2A_MAX_ROWS:
        case OPT_ZERO: {
            char err[256];
            const char *name = NULL;
            for (int i = 0; longopts[i].name && !name; i++)
                name = longopts[i].val == opt ? longopts[i].name : NULL;
            if (cli_dist_option(name, optarg, &o.dist, &o.t.groups, err, sizeof err))
                return cli_train_usage("%s", err);
            o.have_groups |= opt == OPT_GROUPS;
            break;
        }
        case OPT_HELP: help_train(); return EXIT_OK;
        case ':': return cli_train_usage("option '%s' needs an argument", argv[optind - 1]);
        default: return cli_train_usage("unknown option '%s'", argv[optind - 1]);
        }
    }
    if (optind < argc)
        return cli_train_usage("unexpected argument '%s'", argv[optind]);
    if (o.config && o.preset)
        return cli_train_usage("give --config FILE or --preset NAME, not both");
    if (o.resume && o.fixed)
        return cli_train_usage("--%s cannot be given with --resume: a resumed run keeps its checkpoint's settings (only "
                     "--steps, --threads, --backend, --dtype, --eval-every, --eval-batches, --log-every, --save-every, "
                     "--keep and --data may change)", o.fixed);
    if (o.dist.ranks_per_node && !o.dist.hier)
        return cli_train_usage("--ranks-per-node describes the nodes of --a2a hier; give --a2a hier too");
    if (o.init_from && (o.config || o.preset))
        return cli_train_usage("--init-from DIR takes the model config from DIR; drop --%s", o.config ? "config" : "preset");
    if (o.t.batch * o.t.seq > ((int64_t)1 << 31))
        return cli_train_usage("--batch x --seq = %lld tokens is too many", (long long)(o.t.batch * o.t.seq));
    return cli_train_run(&o);
}
