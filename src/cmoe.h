/*
 * cmoe.h — Mixture-of-Experts training in C: the public API.
 *
 * Run the reference MoE layer (the oracle, in double) on your own tensors:
 *
 *     moe_layer_config cfg;
 *     moe_layer_config_default(&cfg);
 *     cfg.d_model = 64; cfg.d_ff = 128; cfg.n_experts = 8; cfg.top_k = 2;
 *     moe_ref_layer *L;
 *     if (moe_ref_layer_create(&cfg, T, &L) != MOE_OK) {
 *         fprintf(stderr, "cmoe: %s\n", moe_last_error());
 *         return 1;
 *     }
 *     double *w = moe_ref_layer_param(L, "router.weight", NULL);   // [d_model, n_experts]
 *     ... fill parameters and x ...
 *     moe_ref_layer_forward(L, y, x, NULL, NULL, T, MOE_KEY_STEP(0), 1);  // y [T, d_model]
 *     moe_ref_layer_backward(L, dx, dy);                          // grads accumulate
 *     double *gw = moe_ref_layer_grad(L, "router.weight", NULL);
 *     moe_ref_layer_free(L);
 *
 * Every entry point returns moe_status; on failure moe_last_error() says what
 * was wrong, naming the field or file. The library never exits or asserts on input.
 */
#ifndef CMOE_H
#define CMOE_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* ---- errors ------------------------------------------------------------ */

typedef enum {
    MOE_OK = 0,
    MOE_ERR_ARG = -1,         /* invalid argument or configuration */
    MOE_ERR_NOMEM = -2,       /* allocation failed */
    MOE_ERR_IO = -3,          /* file could not be opened, read or written */
    MOE_ERR_FORMAT = -4,      /* malformed file contents */
    MOE_ERR_MPI = -5,         /* an MPI call failed */
    MOE_ERR_CUDA = -6,        /* a CUDA call failed */
    MOE_ERR_UNSUPPORTED = -7, /* not available in this build */
} moe_status;

const char *moe_strerror(moe_status s);
/* The message of the last failure in this thread, with its context. */
const char *moe_last_error(void);
/* Records a message for moe_last_error() and returns s (printf-style). */
moe_status moe_error(moe_status s, const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 2, 3)))
#endif
    ;
/* Index of the first NaN or ±Inf among x[0, n), −1 when every value is finite. */
int64_t moe_first_nonfinite(const double *x, int64_t n);
/* MOE_OK when x[0, n) is finite; else s with "WHAT is not finite: element I is nan"
 * (what names the tensor, e.g. "input 'x'"), so bad values are refused where they enter. */
moe_status moe_check_finite(moe_status s, const char *what, const double *x, int64_t n);
const char *moe_version(void);
/* What this build has, one "NAME: ..." line each: BLAS (name, version), OpenMP
 * (max threads), MPI (library version), CUDA (built or not). Thread-local buffer. */
const char *moe_build_info(void);
/* Writes the CUDA devices (name, memory, compute capability) into buf [n].
 * MOE_OK when at least one device answers; MOE_ERR_CUDA when none does (buf says
 * why); MOE_ERR_UNSUPPORTED when built without --with-cuda (buf: "CUDA: not built"). */
moe_status moe_cuda_device_info(char *buf, size_t n);
/* The machine's GEMM ceiling on device 0: GFLOP/s of one cuBLAS GEMM (dtype "fp32": plain
 * fp32, TF32 off; "bf16": bf16 operands, fp32 accumulation) of about `flops` operations on
 * random data, median of 5 after a warm-up; side = its M = N = K. MOE_ERR_UNSUPPORTED
 * without --with-cuda, MOE_ERR_CUDA without a device. */
moe_status moe_cuda_gemm_ceiling(const char *dtype, double flops, double *gflops, int64_t *side);

/* ---- random numbers: Philox-4x32-10, counter based --------------------- */

/* One Philox-4x32-10 block: out = philox(ctr, key). Matches Random123. */
void moe_philox4x32_10(const uint32_t ctr[4], const uint32_t key[2], uint32_t out[4]);

/* Streams keep independent uses apart; the layer and micro-batch are folded in by
 * moe_rng_stream (below). */
enum {
    MOE_RNG_JITTER = 1,  /* router input jitter */
    MOE_RNG_NOISE = 2,   /* noisy top-k gate noise */
    MOE_RNG_GUMBEL = 3,  /* GShard second-expert sampling */
    MOE_RNG_RANDOM2 = 4, /* GShard random routing of the second expert */
    MOE_RNG_INIT = 5,    /* parameter initialisation */
    MOE_RNG_DATA = 6,    /* batch order */
    MOE_RNG_SAMPLE = 7,  /* sampling tokens */
};

/*
 * Where a draw sits in training. Every random draw of a layer is keyed by (seed, what,
 * layer, step, micro-batch, global token index, draw index), so the numbers do not depend
 * on threads, ranks or how a batch is split over them.
 */
typedef struct {
    uint64_t step;   /* optimizer step (its low 32 bits key the draws) */
    uint32_t micro;  /* micro-batch of gradient accumulation, < 4096 */
    uint32_t token0; /* global index of the call's first token within its micro-batch */
} moe_key;
#define MOE_KEY_STEP(s) ((moe_key){(uint64_t)(s), 0, 0})
/* The stream word of a draw: what it is for (8 bits), the layer (12), the micro-batch (12). */
static inline uint32_t moe_rng_stream(uint32_t what, int64_t layer, moe_key k)
{
    return what | ((uint32_t)layer & 0xFFFu) << 8 | (k.micro & 0xFFFu) << 20;
}

/* Uniform in (0, 1) with 53 random bits, from counter (i, j, step, stream) and key seed. */
double moe_rand_uniform(uint64_t seed, uint32_t stream, uint32_t step, uint32_t i, uint32_t j);
/* Standard normal (Box–Muller on one Philox block), same counter layout. */
double moe_rand_normal(uint64_t seed, uint32_t stream, uint32_t step, uint32_t i, uint32_t j);

/* ---- the MoE layer configuration ---------------------------------------- */

typedef enum {
    MOE_ROUTER_TOPK,          /* token choice: top-1 (Switch), top-2 (GShard), top-k */
    MOE_ROUTER_NOISY_TOPK,    /* Shazeer 2017: H = x·Wg + ε·softplus(x·Wnoise) */
    MOE_ROUTER_EXPERT_CHOICE, /* each expert takes its top-C tokens */
    MOE_ROUTER_HASH,          /* expert = hash(token id) mod E */
    MOE_ROUTER_SINKHORN,      /* balanced assignment by Sinkhorn iterations */
} moe_router_kind;

typedef enum { MOE_SCORE_SOFTMAX, MOE_SCORE_SIGMOID } moe_score_fn;

/* GShard's policy for the second expert of top-2. */
typedef enum {
    MOE_SECOND_ALL,      /* always dispatch it */
    MOE_SECOND_SAMPLING, /* choose it from logits + Gumbel noise */
    MOE_SECOND_RANDOM,   /* keep it with probability min(1, 2·g2) */
} moe_second_policy;

typedef enum {
    MOE_DROP_POSITION,    /* first come first served: choice rank, then token order */
    MOE_DROP_PROBABILITY, /* highest gate weight first (batch prioritized routing) */
} moe_drop_policy;

typedef enum {
    MOE_ACT_RELU,
    MOE_ACT_GELU,      /* exact, erf */
    MOE_ACT_GELU_TANH, /* tanh approximation */
    MOE_ACT_GEGLU,     /* gelu(x·W1) ⊙ (x·W3) */
    MOE_ACT_SWIGLU,    /* silu(x·W1) ⊙ (x·W3) */
} moe_activation;

typedef struct {
    int64_t d_model, d_ff;   /* hidden size, expert intermediate size */
    int64_t n_experts, top_k;

    moe_router_kind router;
    moe_score_fn score;        /* softmax or sigmoid over the E router logits */
    int renormalize;           /* top-k weights divided by their sum */
    moe_second_policy second_policy; /* only with top_k == 2 */
    double capacity_factor;    /* <= 0: dropless */
    int64_t min_capacity;
    moe_drop_policy drop_policy;
    double jitter_eps;         /* router input multiplied by U(1-eps, 1+eps) in training */
    int64_t sinkhorn_iters;
    int use_bias;              /* aux-loss-free balancing bias (DeepSeek-V3) */
    double bias_rate;          /* its update step */

    double lb_coef;            /* load balance  E·Σ f_e·P_e */
    double importance_coef;    /* cv²(importance) */
    double load_coef;          /* cv²(load) */
    double z_coef;             /* mean(logsumexp(z)²) */
    double mi_coef;            /* −MI(task; expert) */
    int64_t n_tasks;           /* task ids in [0, n_tasks) for the MI loss */

    moe_activation act;
    int64_t n_shared, d_ff_shared; /* shared experts, always on */
    int shared_gate;           /* Qwen2-MoE: shared output × sigmoid(x·w) */
    int residual;              /* Residual-MoE: dense MLP mixed in by a learned 2-way softmax */
    int64_t d_ff_dense;        /* its intermediate size */

    uint64_t seed;             /* key of every random draw of this layer */
    int64_t layer;             /* layer index, folded into the random streams */
} moe_layer_config;

void moe_layer_config_default(moe_layer_config *c);
/* Checks the configuration for T tokens; names the offending field on failure. */
moe_status moe_layer_config_validate(const moe_layer_config *c, int64_t T);
/* Reads a JSON object with the keys documented in README.md (unknown keys are errors). */
moe_status moe_layer_config_from_json(const char *text, moe_layer_config *c);
moe_status moe_layer_config_load(const char *path, moe_layer_config *c);
/* The configuration as JSON text with every key (pretty: indented); free() the result. */
moe_status moe_layer_config_to_json(const moe_layer_config *c, int pretty, char **out);
/* Per-expert capacity for T tokens, at most T (a larger one would never drop); 0 means dropless. */
int64_t moe_capacity(const moe_layer_config *c, int64_t T);

const char *moe_router_name(moe_router_kind r);
const char *moe_activation_name(moe_activation a);

/* ---- the routing plan ---------------------------------------------------- */

/*
 * Every router produces this. The n kept assignments are sorted by expert, and
 * within an expert by token. Token choice: n <= T·k; expert choice: n = E·C;
 * hash: n = T. For token-choice routers the [T, k] choice arrays keep what was
 * selected before dropping (expert -1 where GShard's random policy skipped it).
 */
typedef struct {
    int64_t T, E, k;        /* k = choices per token (expert choice: capacity C) */
    int64_t n;              /* kept assignments */
    int64_t capacity;       /* per-expert limit, 0 = dropless */
    int64_t dropped;        /* selected assignments dropped by capacity */
    int32_t *token;         /* [n] */
    int32_t *expert;        /* [n] */
    double *weight;         /* [n] combine weight */
    int64_t *src;           /* [n] index t·E + e into the [T, E] scores */
    int64_t *offsets;       /* [E+1] */
    int64_t *count;         /* [E] kept per expert */
    int64_t *selected;      /* [E] selected per expert, before dropping */
    int32_t *choice_expert; /* [T, k] token choice only, else NULL */
    double *choice_weight;  /* [T, k] */
    uint8_t *choice_kept;   /* [T, k] */
    int64_t *choice;        /* [n] token choice: index t·k + j of each kept assignment */
    int64_t cap_n;          /* allocated assignments */
} moe_plan;

moe_status moe_plan_create(int64_t max_n, int64_t T, int64_t E, int64_t k, moe_plan **out);
void moe_plan_free(moe_plan *p);
/* Checks indices, offsets, counts against capacity; message names what is broken. */
moe_status moe_plan_check(const moe_plan *p);

/* ---- named tensors (arenas) ---------------------------------------------- */

#define MOE_MAX_DIMS 4
#define MOE_NAME_MAX 64

typedef struct {
    char name[MOE_NAME_MAX];
    int ndim;
    int64_t shape[MOE_MAX_DIMS];
    int64_t offset, numel; /* in elements */
} moe_view;

/* One allocation holding many named tensors; views are laid out first, then allocated. */
typedef struct {
    moe_view *views;
    int n, cap;
    int64_t numel;  /* total elements */
    size_t elem;    /* bytes per element */
    void *data;
} moe_arena;

void moe_arena_init(moe_arena *a, size_t elem);
/* Bytes of physical memory of this machine (0 when unknown): allocations larger than it
 * are refused with a message rather than attempted. */
int64_t moe_host_memory(void);
moe_status moe_arena_add(moe_arena *a, const char *name, int ndim, const int64_t *shape);
moe_status moe_arena_alloc(moe_arena *a); /* zero-filled */
const moe_view *moe_arena_find(const moe_arena *a, const char *name);
void *moe_arena_ptr(const moe_arena *a, const moe_view *v);
void moe_arena_free(moe_arena *a);

/* ---- the reference MoE layer (double) ------------------------------------ */

/* Lays out the parameters of an MoE layer as named views of a (not yet allocated) arena,
 * in the fixed order every backend uses (initialisation draws by index); names and
 * shapes are listed in README.md. */
moe_status moe_layer_param_layout(const moe_layer_config *c, moe_arena *a);

typedef struct {
    double lb, importance, load, z, mi; /* each unscaled */
    double total;                       /* Σ coef·loss */
} moe_aux_losses;

typedef struct moe_ref_layer moe_ref_layer;

moe_status moe_ref_layer_create(const moe_layer_config *c, int64_t max_tokens, moe_ref_layer **out);
void moe_ref_layer_free(moe_ref_layer *l);
const moe_layer_config *moe_ref_layer_config(const moe_ref_layer *l);
/* Parameters and their gradients as named views (names in README.md). */
const moe_arena *moe_ref_layer_params(const moe_ref_layer *l);
const moe_arena *moe_ref_layer_grads(const moe_ref_layer *l);
double *moe_ref_layer_param(moe_ref_layer *l, const char *name, const moe_view **view);
double *moe_ref_layer_grad(moe_ref_layer *l, const char *name, const moe_view **view);
void moe_ref_layer_zero_grad(moe_ref_layer *l);
/* Random init: N(0, std²) with std = init_scale / sqrt(fan_in), from Philox (seed). */
void moe_ref_layer_init(moe_ref_layer *l, double init_scale);

/*
 * y = MoE(x) for T tokens. token_ids [T] feed the hash router (NULL: the global position key.token0 + t);
 * task_ids [T] feed the MI loss (NULL: task 0). key keys the random draws
 * (MOE_KEY_STEP(step) outside a distributed or accumulated batch); training = 0 turns
 * off jitter and gate noise.
 */
moe_status moe_ref_layer_forward(moe_ref_layer *l, double *y /* [T, d] */,
                                 const double *x /* [T, d] */, const int32_t *token_ids,
                                 const int32_t *task_ids, int64_t T, moe_key key, int training);
/* dx = ∂(Σ dy·y + aux.total)/∂x (overwritten); parameter gradients accumulate (+=). */
moe_status moe_ref_layer_backward(moe_ref_layer *l, double *dx /* [T, d] */,
                                  const double *dy /* [T, d] */);
const moe_plan *moe_ref_layer_plan(const moe_ref_layer *l);
moe_aux_losses moe_ref_layer_aux(const moe_ref_layer *l);
/* Aux-loss-free balancing: bias_e += rate·sign(mean load − load_e) from the last plan. */
void moe_ref_layer_update_bias(moe_ref_layer *l);

#ifdef __cplusplus
}
#endif
#endif
