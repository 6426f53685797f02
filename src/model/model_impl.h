/*
 * model_impl.h — the model's insides, shared by its files (model.c: build, forward,
 * backward, decode; layout.c: where every tensor lives; stats.c: the step's scalars).
 */
#ifndef CMOE_MODEL_IMPL_H
#define CMOE_MODEL_IMPL_H

#include "model/model.h"

typedef struct {
    moe_param_info info;
    moe_tensor p, g;
} mparam;

typedef struct {
    int64_t E; /* 0: dense FFN */
    moe_layer *moe;
    int64_t stat0;   /* where its stats sit in the model's scalars */
    moe_moa *moa;    /* the attention as a mixture of heads (attention_experts), or NULL */
    int64_t moa_stat0;
    /* parameters and gradients (model-owned); .buf NULL when absent */
    moe_tensor ln1, wq, wk, wv, bq, bk, bv, wo, ln2, w1, w3, w2;
    moe_tensor gln1, gwq, gwk, gwv, gbq, gbk, gbv, gwo, gln2, gw1, gw3, gw2;
    /* saved activations */
    moe_tensor x, n1, rstd1, q, k, v, att, ao, mid, n2, rstd2, h1, h3, a, fo;
    moe_tensor kc, vc; /* KV cache [max_seq, Hkv·hd] */
} mblock;

struct moe_model {
    moe_model_config c;
    moe_backend *b;
    moe_exchange *ex;
    int64_t maxB, maxS, maxN;
    int64_t V, C, H, Hkv, hd, F, L, qd, kvd; /* qd = H·hd, kvd = Hkv·hd */
    int glu;
    mblock *blk;
    moe_arena P, A;      /* layouts of the model-owned parameters and of the activations */
    moe_buf *pbuf, *gbuf, *abuf;
    mparam *par;
    int npar, cappar;
    int64_t numel;
    moe_tensor wte, gwte, normf, gnormf, lmw, glmw;
    moe_tensor xf, nf, rstdf, logits;
    moe_tensor dlogits, dx, dmid, dn, dffn, dao, dq, dk, dv, dqp, dkp;
    moe_buf *ibuf;           /* i32: the last forward's ids */
    moe_tensor in, tg, task; /* [maxN] each */
    moe_buf *sbuf;           /* the step's scalars: last forward [ns], step sums [ns], optimizer [2] */
    int64_t ns, n_scalars;   /* ns: CE, then every MoE layer's stats */
    int64_t forwards;        /* since the last zero_grad */
    double *shost;           /* their last read */
    int shost_fresh;         /* shost is what the backend holds */
    int64_t n_targets;       /* of the last forward */
    int64_t B, S, N;         /* of the last forward */
    int have_task;
    int can_backward;        /* the last forward had targets and nothing overwrote it */
    int have_logits;         /* the logits buffer holds logits (not probabilities) */
};

/* Lays out the parameters (and their table) and the activations; binds the tensors. */
moe_status moe_model_layout(moe_model *m);
void moe_model_bind(moe_model *m);

#endif
