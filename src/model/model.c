/*
 * The MoE language model on any backend (model.h). llm.c's layout: one arena of
 * parameters (and its twin of gradients) for everything the model owns, one arena of
 * activations and backward scratch sized for max_batch × max_seq tokens, laid out at
 * create; the MoE layers keep their own (moe_layer.h). A table of named parameters,
 * in model order, ties both together for init, checkpoints and the optimizer.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "model/model.h"
#include "ref/ref.h"

typedef struct {
    moe_param_info info;
    moe_tensor p, g;
} mparam;

typedef struct {
    int64_t E; /* 0: dense FFN */
    moe_layer *moe;
    int64_t *counts; /* [E] host scratch for statistics */
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
    moe_tensor dlogits, dx, dmid, dn, dffn, dao, dq, dk, dv, dqp, dkp, datt;
    int32_t *in, *tg, *task; /* host copies of the last forward's ids [maxN] */
    int64_t B, S, N;         /* of the last forward */
    int have_task;
    int can_backward;        /* the last forward had targets and nothing overwrote it */
    int have_logits;         /* the logits buffer holds logits (not probabilities) */
};

/* ---- layout ------------------------------------------------------------------- */

static moe_status add_view(moe_arena *a, const char *name, int ndim, int64_t d0, int64_t d1)
{
    const int64_t shape[2] = {d0, d1};
    return moe_arena_add(a, name, ndim, shape);
}

static int is_nodecay(const char *name)
{
    size_t n = strlen(name);
#define ENDS(s) (n >= strlen(s) && !strcmp(name + n - strlen(s), s))
    return ENDS("norm.weight") || ENDS(".bias") || ENDS("layernorm.weight");
#undef ENDS
}

static moe_status push_param(moe_model *m, const char *name, int ndim, const int64_t *shape)
{
    if (m->npar == m->cappar) {
        int cap = m->cappar ? 2 * m->cappar : 64;
        mparam *p = realloc(m->par, (size_t)cap * sizeof *p);
        if (!p)
            return moe_error(MOE_ERR_NOMEM, "model: out of memory");
        m->par = p;
        m->cappar = cap;
    }
    mparam *p = &m->par[m->npar++];
    memset(p, 0, sizeof *p);
    if (strlen(name) >= sizeof p->info.name)
        return moe_error(MOE_ERR_ARG, "model: parameter name '%s' too long", name);
    snprintf(p->info.name, sizeof p->info.name, "%s", name);
    p->info.ndim = ndim;
    p->info.numel = 1;
    for (int i = 0; i < ndim; i++) {
        p->info.shape[i] = shape[i];
        p->info.numel *= shape[i];
    }
    p->info.decay = !is_nodecay(name);
    m->numel += p->info.numel;
    return MOE_OK;
}

/* A model-owned parameter: a view in P and an entry in the table (tensors bound later). */
static moe_status own(moe_model *m, const char *name, int ndim, int64_t d0, int64_t d1)
{
    const int64_t shape[2] = {d0, d1};
    moe_status s = add_view(&m->P, name, ndim, d0, d1);
    return s ? s : push_param(m, name, ndim, shape);
}

static moe_status layout(moe_model *m)
{
    const int64_t C = m->C, V = m->V, N = m->maxN, F = m->F;
    const int64_t att = m->maxB * m->H * m->maxS * m->maxS;
    char nm[128];
    moe_status s;
#define OWN(ndim, d0, d1, ...) \
    do { snprintf(nm, sizeof nm, __VA_ARGS__); if ((s = own(m, nm, ndim, d0, d1))) return s; } while (0)
#define ACT(rows, cols, ...) \
    do { snprintf(nm, sizeof nm, __VA_ARGS__); if ((s = add_view(&m->A, nm, 2, rows, cols))) return s; } while (0)
    OWN(2, V, C, "model.embed_tokens.weight");
    for (int64_t l = 0; l < m->L; l++) {
        const mblock *k = &m->blk[l];
        OWN(1, C, 0, "model.layers.%lld.input_layernorm.weight", (long long)l);
        OWN(2, C, m->qd, "model.layers.%lld.self_attn.q_proj.weight", (long long)l);
        OWN(2, C, m->kvd, "model.layers.%lld.self_attn.k_proj.weight", (long long)l);
        OWN(2, C, m->kvd, "model.layers.%lld.self_attn.v_proj.weight", (long long)l);
        if (m->c.qkv_bias) {
            OWN(1, m->qd, 0, "model.layers.%lld.self_attn.q_proj.bias", (long long)l);
            OWN(1, m->kvd, 0, "model.layers.%lld.self_attn.k_proj.bias", (long long)l);
            OWN(1, m->kvd, 0, "model.layers.%lld.self_attn.v_proj.bias", (long long)l);
        }
        OWN(2, m->qd, C, "model.layers.%lld.self_attn.o_proj.weight", (long long)l);
        OWN(1, C, 0, "model.layers.%lld.post_attention_layernorm.weight", (long long)l);
        if (!k->E) {
            OWN(2, C, F, "model.layers.%lld.mlp.gate_proj.weight", (long long)l);
            if (m->glu)
                OWN(2, C, F, "model.layers.%lld.mlp.up_proj.weight", (long long)l);
            OWN(2, F, C, "model.layers.%lld.mlp.down_proj.weight", (long long)l);
        } else {
            const moe_arena *la = moe_layer_params(k->moe);
            for (int i = 0; i < la->n; i++) {
                snprintf(nm, sizeof nm, "model.layers.%lld.block_sparse_moe.%s", (long long)l, la->views[i].name);
                if ((s = push_param(m, nm, la->views[i].ndim, la->views[i].shape)))
                    return s;
            }
        }
        ACT(N, C, "%lld.x", (long long)l);
        ACT(N, C, "%lld.n1", (long long)l);
        ACT(1, N, "%lld.rstd1", (long long)l);
        ACT(N, m->qd, "%lld.q", (long long)l);
        ACT(N, m->kvd, "%lld.k", (long long)l);
        ACT(N, m->kvd, "%lld.v", (long long)l);
        ACT(1, att, "%lld.att", (long long)l);
        ACT(N, m->qd, "%lld.ao", (long long)l);
        ACT(N, C, "%lld.mid", (long long)l);
        ACT(N, C, "%lld.n2", (long long)l);
        ACT(1, N, "%lld.rstd2", (long long)l);
        if (!k->E) {
            ACT(N, F, "%lld.h1", (long long)l);
            if (m->glu)
                ACT(N, F, "%lld.h3", (long long)l);
            ACT(N, F, "%lld.a", (long long)l);
        }
        ACT(N, C, "%lld.fo", (long long)l);
        ACT(m->maxS, m->kvd, "%lld.kc", (long long)l);
        ACT(m->maxS, m->kvd, "%lld.vc", (long long)l);
    }
    OWN(1, C, 0, "model.norm.weight");
    if (!m->c.tie_word_embeddings)
        OWN(2, V, C, "lm_head.weight");
    ACT(N, C, "xf");
    ACT(N, C, "nf");
    ACT(1, N, "rstdf");
    ACT(N, V, "logits");
    ACT(N, V, "d.logits");
    ACT(N, C, "d.x");
    ACT(N, C, "d.mid");
    ACT(N, C, "d.n");
    ACT(N, C, "d.ffn");
    ACT(N, m->qd, "d.ao");
    ACT(N, m->qd, "d.q");
    ACT(N, m->kvd, "d.k");
    ACT(N, m->kvd, "d.v");
    ACT(N, m->qd, "d.qp");
    ACT(N, m->kvd, "d.kp");
    ACT(1, att, "d.att");
#undef OWN
#undef ACT
    return MOE_OK;
}

static moe_tensor at(const moe_arena *a, moe_buf *buf, const char *name)
{
    const moe_view *v = moe_arena_find(a, name);
    return v ? (moe_tensor){buf, v->offset} : (moe_tensor){NULL, 0};
}

static void bind(moe_model *m)
{
    char nm[128];
    const moe_arena *P = &m->P, *A = &m->A;
#define PB(field, gfield, ...) \
    (snprintf(nm, sizeof nm, __VA_ARGS__), k->field = at(P, m->pbuf, nm), k->gfield = at(P, m->gbuf, nm))
#define AB(field, suffix) (snprintf(nm, sizeof nm, "%lld." suffix, (long long)l), k->field = at(A, m->abuf, nm))
    for (int64_t l = 0; l < m->L; l++) {
        mblock *k = &m->blk[l];
        const long long ll = (long long)l;
        PB(ln1, gln1, "model.layers.%lld.input_layernorm.weight", ll);
        PB(wq, gwq, "model.layers.%lld.self_attn.q_proj.weight", ll);
        PB(wk, gwk, "model.layers.%lld.self_attn.k_proj.weight", ll);
        PB(wv, gwv, "model.layers.%lld.self_attn.v_proj.weight", ll);
        PB(bq, gbq, "model.layers.%lld.self_attn.q_proj.bias", ll);
        PB(bk, gbk, "model.layers.%lld.self_attn.k_proj.bias", ll);
        PB(bv, gbv, "model.layers.%lld.self_attn.v_proj.bias", ll);
        PB(wo, gwo, "model.layers.%lld.self_attn.o_proj.weight", ll);
        PB(ln2, gln2, "model.layers.%lld.post_attention_layernorm.weight", ll);
        PB(w1, gw1, "model.layers.%lld.mlp.gate_proj.weight", ll);
        PB(w3, gw3, "model.layers.%lld.mlp.up_proj.weight", ll);
        PB(w2, gw2, "model.layers.%lld.mlp.down_proj.weight", ll);
        AB(x, "x"); AB(n1, "n1"); AB(rstd1, "rstd1"); AB(q, "q"); AB(k, "k"); AB(v, "v"); AB(att, "att");
        AB(ao, "ao"); AB(mid, "mid"); AB(n2, "n2"); AB(rstd2, "rstd2"); AB(h1, "h1"); AB(h3, "h3"); AB(a, "a");
        AB(fo, "fo"); AB(kc, "kc"); AB(vc, "vc");
    }
#undef PB
#undef AB
    m->wte = at(P, m->pbuf, "model.embed_tokens.weight");
    m->gwte = at(P, m->gbuf, "model.embed_tokens.weight");
    m->normf = at(P, m->pbuf, "model.norm.weight");
    m->gnormf = at(P, m->gbuf, "model.norm.weight");
    if (m->c.tie_word_embeddings) {
        m->lmw = m->wte;
        m->glmw = m->gwte;
    } else {
        m->lmw = at(P, m->pbuf, "lm_head.weight");
        m->glmw = at(P, m->gbuf, "lm_head.weight");
    }
#define S(field, name) (m->field = at(A, m->abuf, name))
    S(xf, "xf"); S(nf, "nf"); S(rstdf, "rstdf"); S(logits, "logits"); S(dlogits, "d.logits"); S(dx, "d.x");
    S(dmid, "d.mid"); S(dn, "d.n"); S(dffn, "d.ffn"); S(dao, "d.ao"); S(dq, "d.q"); S(dk, "d.k"); S(dv, "d.v");
    S(dqp, "d.qp"); S(dkp, "d.kp"); S(datt, "d.att");
#undef S
    /* the table's tensors: model-owned views, or the MoE layers' buffers */
    for (int i = 0; i < m->npar; i++) {
        mparam *p = &m->par[i];
        const moe_view *v = moe_arena_find(P, p->info.name);
        if (v) {
            p->p = (moe_tensor){m->pbuf, v->offset};
            p->g = (moe_tensor){m->gbuf, v->offset};
            continue;
        }
        long long l;
        int used = 0;
        if (sscanf(p->info.name, "model.layers.%lld.block_sparse_moe.%n", &l, &used) == 1 && used > 0) {
            moe_layer *ly = m->blk[l].moe;
            const moe_view *lv = moe_arena_find(moe_layer_params(ly), p->info.name + used);
            moe_tensor pb, gb;
            moe_layer_buffers(ly, &pb, &gb);
            p->p = moe_tensor_at(pb, lv->offset);
            p->g = moe_tensor_at(gb, lv->offset);
        }
    }
}

/* ---- create / free --------------------------------------------------------------- */

moe_status moe_model_create(const moe_model_config *c, moe_backend *b, int64_t max_batch, int64_t max_seq,
                            moe_model **out)
{
    if (!out)
        return moe_error(MOE_ERR_ARG, "model: out must not be NULL");
    *out = NULL;
    if (!c || !b)
        return moe_error(MOE_ERR_ARG, "model: config and backend must not be NULL");
    moe_status s = moe_model_config_validate(c);
    if (s)
        return s;
    if (!b->embedding_forward || !b->adamw_step)
        return moe_error(MOE_ERR_UNSUPPORTED, "model: backend '%s' has no language-model ops", b->name);
    if (max_batch < 1 || max_seq < 1 || max_seq > c->max_position_embeddings)
        return moe_error(MOE_ERR_ARG, "model: batch %lld and sequence %lld must be >= 1, sequence <= "
                         "max_position_embeddings (%lld)", (long long)max_batch, (long long)max_seq,
                         (long long)c->max_position_embeddings);
    if (max_batch > INT32_MAX / max_seq)
        return moe_error(MOE_ERR_ARG, "model: batch × sequence = %lld × %lld too large", (long long)max_batch,
                         (long long)max_seq);
    moe_model *m = calloc(1, sizeof *m);
    if (!m)
        return moe_error(MOE_ERR_NOMEM, "model: out of memory");
    m->c = *c;
    m->b = b;
    m->maxB = max_batch;
    m->maxS = max_seq;
    m->maxN = max_batch * max_seq;
    m->V = c->vocab_size;
    m->C = c->hidden_size;
    m->H = c->num_attention_heads;
    m->Hkv = c->num_key_value_heads;
    m->hd = c->head_dim ? c->head_dim : c->hidden_size / c->num_attention_heads;
    m->F = c->intermediate_size;
    m->L = c->num_hidden_layers;
    m->qd = m->H * m->hd;
    m->kvd = m->Hkv * m->hd;
    m->glu = moe_act_is_glu(c->moe.act);
    m->c.moe.d_model = m->C;
    m->c.moe.d_ff = c->moe_intermediate_size;
    moe_arena_init(&m->P, b->elem_size);
    moe_arena_init(&m->A, b->elem_size);
    m->blk = calloc((size_t)m->L, sizeof *m->blk);
    m->in = calloc((size_t)m->maxN, sizeof *m->in);
    m->tg = calloc((size_t)m->maxN, sizeof *m->tg);
    m->task = calloc((size_t)m->maxN, sizeof *m->task);
    if (!m->blk || !m->in || !m->tg || !m->task) {
        moe_model_free(m);
        return moe_error(MOE_ERR_NOMEM, "model: out of memory");
    }
    int64_t scratch = 2 * m->maxN * m->F;
    for (int64_t l = 0; l < m->L; l++) {
        mblock *k = &m->blk[l];
        k->E = moe_model_layer_experts(c, l);
        if (!k->E)
            continue;
        moe_layer_config lc;
        if ((s = moe_model_layer_config(c, l, &lc)) || (s = moe_layer_create(&lc, b, m->maxN, NULL, &k->moe))) {
            if (s == MOE_ERR_NOMEM)
                s = moe_model_size_error(c, m->maxN);
            moe_model_free(m);
            return s;
        }
        if (!(k->counts = calloc((size_t)k->E, sizeof *k->counts))) {
            moe_model_free(m);
            return moe_error(MOE_ERR_NOMEM, "model: out of memory");
        }
    }
    if ((s = layout(m)) || (s = b->alloc(b, m->P.numel, &m->pbuf)) || (s = b->alloc(b, m->P.numel, &m->gbuf)) ||
        (s = b->alloc(b, m->A.numel, &m->abuf)) || (s = b->reserve(b, scratch))) {
        if (s == MOE_ERR_NOMEM)
            s = moe_model_size_error(c, m->maxN);
        moe_model_free(m);
        return s;
    }
    bind(m);
    *out = m;
    return MOE_OK;
}

void moe_model_free(moe_model *m)
{
    if (!m)
        return;
    moe_backend *b = m->b;
    for (int64_t l = 0; m->blk && l < m->L; l++) {
        moe_layer_free(m->blk[l].moe);
        free(m->blk[l].counts);
    }
    if (m->pbuf)
        b->free(b, m->pbuf);
    if (m->gbuf)
        b->free(b, m->gbuf);
    if (m->abuf)
        b->free(b, m->abuf);
    moe_arena_free(&m->P);
    moe_arena_free(&m->A);
    free(m->blk);
    free(m->par);
    free(m->in);
    free(m->tg);
    free(m->task);
    free(m);
}

const moe_model_config *moe_model_config_of(const moe_model *m)
{
    return &m->c;
}

moe_backend *moe_model_backend(const moe_model *m)
{
    return m->b;
}

/* ---- parameters -------------------------------------------------------------------- */

int moe_model_n_params(const moe_model *m)
{
    return m->npar;
}

const moe_param_info *moe_model_param(const moe_model *m, int i)
{
    return i >= 0 && i < m->npar ? &m->par[i].info : NULL;
}

int moe_model_param_index(const moe_model *m, const char *name)
{
    for (int i = 0; name && i < m->npar; i++)
        if (!strcmp(m->par[i].info.name, name))
            return i;
    return -1;
}

int64_t moe_model_numel(const moe_model *m)
{
    return m->numel;
}

static moe_status check_index(const moe_model *m, int i)
{
    if (i < 0 || i >= m->npar)
        return moe_error(MOE_ERR_ARG, "model: parameter index %d outside [0, %d)", i, m->npar);
    return MOE_OK;
}

moe_status moe_model_get_param(moe_model *m, int i, double *dst)
{
    moe_status s = check_index(m, i);
    return s ? s : m->b->download(m->b, dst, m->par[i].p, m->par[i].info.numel);
}

moe_status moe_model_set_param(moe_model *m, int i, const double *src)
{
    moe_status s = check_index(m, i);
    return s ? s : m->b->upload(m->b, m->par[i].p, src, m->par[i].info.numel);
}

moe_status moe_model_get_grad(moe_model *m, int i, double *dst)
{
    moe_status s = check_index(m, i);
    return s ? s : m->b->download(m->b, dst, m->par[i].g, m->par[i].info.numel);
}

moe_status moe_model_param_tensors(moe_model *m, int i, moe_tensor *param, moe_tensor *grad)
{
    moe_status s = check_index(m, i);
    if (s)
        return s;
    if (param)
        *param = m->par[i].p;
    if (grad)
        *grad = m->par[i].g;
    return MOE_OK;
}

void moe_model_zero_grad(moe_model *m)
{
    m->b->fill(m->b, (moe_tensor){m->gbuf, 0}, 0.0, m->P.numel);
    for (int64_t l = 0; l < m->L; l++)
        if (m->blk[l].moe)
            moe_layer_zero_grad(m->blk[l].moe);
}

void moe_model_update_bias(moe_model *m)
{
    for (int64_t l = 0; l < m->L; l++)
        if (m->blk[l].moe)
            moe_layer_update_bias(m->blk[l].moe);
}

static int ends_with(const char *s, const char *suffix)
{
    size_t n = strlen(s), k = strlen(suffix);
    return n >= k && !strcmp(s + n - k, suffix);
}

/* fan-in of a weight in [in, out] layout ([E, in, out] for experts); the [V, C] tables
 * (embedding, LM head) read C per row */
static int64_t fan_in(const moe_param_info *p)
{
    if (p->ndim == 1)
        return p->shape[0];
    if (p->ndim == 3)
        return p->shape[1];
    if (ends_with(p->name, "embed_tokens.weight") || ends_with(p->name, "lm_head.weight"))
        return p->shape[1];
    return p->shape[0];
}

moe_status moe_model_init(moe_model *m, uint64_t seed)
{
    int64_t maxn = 0;
    for (int i = 0; i < m->npar; i++)
        if (m->par[i].info.numel > maxn)
            maxn = m->par[i].info.numel;
    double *w = malloc((size_t)maxn * sizeof *w);
    if (!w)
        return moe_error(MOE_ERR_NOMEM, "model init: out of memory");
    const double sw = m->c.switch_init_scale;
    moe_status s = MOE_OK;
    for (int i = 0; i < m->npar && !s; i++) {
        const moe_param_info *p = &m->par[i].info;
        const int norm = ends_with(p->name, "norm.weight");
        const int zero = ends_with(p->name, ".bias");
        const double sd = sw > 0 ? sqrt(sw / (double)fan_in(p)) : m->c.initializer_range;
        for (int64_t e = 0; e < p->numel; e++) {
            if (norm || zero) {
                w[e] = norm ? 1.0 : 0.0;
                continue;
            }
            double z = 0;
            /* Switch: truncated at ±2σ by redrawing on a fresh counter */
            for (uint32_t t = 0; t < 64; t++) {
                z = moe_rand_normal(seed, MOE_RNG_INIT, (uint32_t)i, (uint32_t)e, (uint32_t)(e >> 32) | (t << 24));
                if (sw <= 0 || fabs(z) <= 2.0)
                    break;
            }
            w[e] = sd * z;
        }
        s = m->b->upload(m->b, m->par[i].p, w, p->numel);
    }
    free(w);
    return s;
}

/* ---- forward ------------------------------------------------------------------------ */

static moe_tensor *opt(moe_tensor *t)
{
    return t->buf ? t : NULL;
}

/* x → mid = x + attention(x) for N = B·S tokens */
static void attn_forward(moe_model *m, mblock *k, int64_t B, int64_t S)
{
    moe_backend *b = m->b;
    const int64_t N = B * S, C = m->C;
    b->rmsnorm_forward(b, k->n1, k->rstd1, k->x, k->ln1, m->c.rms_norm_eps, N, C);
    b->matmul_forward(b, k->q, k->n1, k->wq, N, C, m->qd);
    b->matmul_forward(b, k->k, k->n1, k->wk, N, C, m->kvd);
    b->matmul_forward(b, k->v, k->n1, k->wv, N, C, m->kvd);
    if (k->bq.buf) {
        b->bias_forward(b, k->q, k->bq, N, m->qd);
        b->bias_forward(b, k->k, k->bk, N, m->kvd);
        b->bias_forward(b, k->v, k->bv, N, m->kvd);
    }
    b->rope_forward(b, k->q, k->q, 0, m->c.rope_theta, B, S, m->H, m->hd);
    b->rope_forward(b, k->k, k->k, 0, m->c.rope_theta, B, S, m->Hkv, m->hd);
    b->attention_forward(b, k->ao, k->att, k->q, k->k, k->v, B, S, m->H, m->Hkv, m->hd);
    b->matmul_forward(b, k->mid, k->ao, k->wo, N, m->qd, C);
    b->add(b, k->mid, k->x, N * C);
}

/* fo = FFN(rmsnorm(mid)), dense or MoE */
static moe_status ffn_forward(moe_model *m, mblock *k, const int32_t *tokens, const int32_t *task, int64_t N,
                              uint64_t step, int training)
{
    moe_backend *b = m->b;
    const int64_t C = m->C;
    b->rmsnorm_forward(b, k->n2, k->rstd2, k->mid, k->ln2, m->c.rms_norm_eps, N, C);
    if (k->moe)
        return moe_layer_forward(k->moe, k->fo, k->n2, tokens, task, N, step, training);
    b->ffn_forward(b, k->fo, k->h1, k->h3, k->a, k->n2, k->w1, opt(&k->w3), k->w2, m->c.moe.act, N, C, m->F);
    return MOE_OK;
}

static moe_tensor next_x(moe_model *m, int64_t l)
{
    return l + 1 < m->L ? m->blk[l + 1].x : m->xf;
}

static moe_status check_ids(const moe_model *m, const int32_t *ids, int64_t n, int32_t lo, const char *what)
{
    for (int64_t i = 0; i < n; i++)
        if (ids[i] < lo || ids[i] >= m->V)
            return moe_error(MOE_ERR_ARG, "model: %s[%lld] = %d outside [%d, vocab_size = %lld)", what, (long long)i,
                             ids[i], lo, (long long)m->V);
    return MOE_OK;
}

moe_status moe_model_forward(moe_model *m, const int32_t *inputs, const int32_t *targets, const int32_t *task_ids,
                             int64_t B, int64_t S, uint64_t step, int training, moe_model_losses *losses)
{
    if (!m || !inputs)
        return moe_error(MOE_ERR_ARG, "model forward: model and inputs must not be NULL");
    if (B < 1 || B > m->maxB || S < 1 || S > m->maxS)
        return moe_error(MOE_ERR_ARG, "model forward: batch %lld × sequence %lld outside [1, %lld] × [1, %lld]",
                         (long long)B, (long long)S, (long long)m->maxB, (long long)m->maxS);
    const int64_t N = B * S, C = m->C;
    moe_status s;
    if ((s = check_ids(m, inputs, N, 0, "inputs")) || (targets && (s = check_ids(m, targets, N, -1, "targets"))))
        return s;
    moe_backend *b = m->b;
    m->can_backward = 0;
    m->have_logits = 0;
    memcpy(m->in, inputs, (size_t)N * sizeof *inputs);
    if (targets)
        memcpy(m->tg, targets, (size_t)N * sizeof *targets);
    m->have_task = task_ids != NULL;
    if (task_ids)
        memcpy(m->task, task_ids, (size_t)N * sizeof *task_ids);
    m->B = B;
    m->S = S;
    m->N = N;

    b->embedding_forward(b, m->blk[0].x, m->in, m->wte, N, C);
    double aux = 0;
    for (int64_t l = 0; l < m->L; l++) {
        mblock *k = &m->blk[l];
        attn_forward(m, k, B, S);
        if ((s = ffn_forward(m, k, m->in, task_ids ? m->task : NULL, N, step, training)))
            return s;
        if (k->moe)
            aux += moe_layer_aux(k->moe).total;
        moe_tensor nx = next_x(m, l);
        b->copy(b, nx, k->mid, N * C);
        b->add(b, nx, k->fo, N * C);
    }
    b->rmsnorm_forward(b, m->nf, m->rstdf, m->xf, m->normf, m->c.rms_norm_eps, N, C);
    b->matmul_t_forward(b, m->logits, m->nf, m->lmw, N, C, m->V);
    moe_model_losses L = {0};
    L.aux = aux;
    if (targets) {
        for (int64_t i = 0; i < N; i++)
            L.n_targets += targets[i] >= 0;
        L.ce = b->crossentropy_forward(b, m->logits, m->logits, m->tg, N, m->V);
        m->can_backward = 1;
    } else {
        m->have_logits = 1;
    }
    L.total = L.ce + L.aux;
    if (losses)
        *losses = L;
    return MOE_OK;
}

moe_status moe_model_get_logits(moe_model *m, double *dst)
{
    if (!m->have_logits)
        return moe_error(MOE_ERR_ARG, "model: no logits (the last forward had targets, or there was none)");
    return m->b->download(m->b, dst, m->logits, m->N * m->V);
}

/* ---- backward ------------------------------------------------------------------------ */

/* dx holds ∂/∂(output of block l); on return, ∂/∂(input of block l) */
static moe_status block_backward(moe_model *m, mblock *k)
{
    moe_backend *b = m->b;
    const int64_t B = m->B, S = m->S, N = m->N, C = m->C;
    moe_status s;
    /* x' = mid + ffn(rmsnorm(mid)) */
    if (k->moe) {
        if ((s = moe_layer_backward(k->moe, m->dn, m->dx)))
            return s;
    } else {
        b->fill(b, m->dn, 0.0, N * C);
        b->ffn_backward(b, &m->dn, k->gw1, opt(&k->gw3), k->gw2, m->dx, k->h1, k->h3, k->a, k->n2, k->w1,
                        opt(&k->w3), k->w2, m->c.moe.act, N, C, m->F);
    }
    b->copy(b, m->dmid, m->dx, N * C);
    b->rmsnorm_backward(b, &m->dmid, &k->gln2, m->dn, k->mid, k->ln2, k->rstd2, N, C);
    /* mid = x + o_proj(attention(rope(q), rope(k), v)) */
    b->fill(b, m->dao, 0.0, N * m->qd);
    b->matmul_backward(b, &m->dao, &k->gwo, m->dmid, k->ao, k->wo, N, m->qd, C);
    b->fill(b, m->dq, 0.0, N * m->qd);
    b->fill(b, m->dk, 0.0, N * m->kvd);
    b->fill(b, m->dv, 0.0, N * m->kvd);
    b->attention_backward(b, m->dq, m->dk, m->dv, m->datt, m->dao, k->att, k->q, k->k, k->v, B, S, m->H, m->Hkv,
                          m->hd);
    b->fill(b, m->dqp, 0.0, N * m->qd);
    b->fill(b, m->dkp, 0.0, N * m->kvd);
    b->rope_backward(b, m->dqp, m->dq, 0, m->c.rope_theta, B, S, m->H, m->hd);
    b->rope_backward(b, m->dkp, m->dk, 0, m->c.rope_theta, B, S, m->Hkv, m->hd);
    if (k->bq.buf) {
        b->bias_backward(b, k->gbq, m->dqp, N, m->qd);
        b->bias_backward(b, k->gbk, m->dkp, N, m->kvd);
        b->bias_backward(b, k->gbv, m->dv, N, m->kvd);
    }
    b->fill(b, m->dn, 0.0, N * C);
    b->matmul_backward(b, &m->dn, &k->gwq, m->dqp, k->n1, k->wq, N, C, m->qd);
    b->matmul_backward(b, &m->dn, &k->gwk, m->dkp, k->n1, k->wk, N, C, m->kvd);
    b->matmul_backward(b, &m->dn, &k->gwv, m->dv, k->n1, k->wv, N, C, m->kvd);
    b->copy(b, m->dx, m->dmid, N * C);
    b->rmsnorm_backward(b, &m->dx, &k->gln1, m->dn, k->x, k->ln1, k->rstd1, N, C);
    return MOE_OK;
}

moe_status moe_model_backward(moe_model *m)
{
    if (!m || !m->can_backward)
        return moe_error(MOE_ERR_ARG, "model backward: the last forward had no targets (or was overwritten by decode)");
    moe_backend *b = m->b;
    const int64_t N = m->N, C = m->C, V = m->V;
    b->fill(b, m->dlogits, 0.0, N * V);
    b->crossentropy_backward(b, m->dlogits, m->logits, m->tg, 1.0, N, V);
    b->fill(b, m->dn, 0.0, N * C);
    b->matmul_t_backward(b, &m->dn, &m->glmw, m->dlogits, m->nf, m->lmw, N, C, V);
    b->fill(b, m->dx, 0.0, N * C);
    b->rmsnorm_backward(b, &m->dx, &m->gnormf, m->dn, m->xf, m->normf, m->rstdf, N, C);
    for (int64_t l = m->L - 1; l >= 0; l--) {
        moe_status s = block_backward(m, &m->blk[l]);
        if (s)
            return s;
    }
    b->embedding_backward(b, m->gwte, m->dx, m->in, N, C);
    return MOE_OK;
}

/* ---- decode -------------------------------------------------------------------------- */

moe_status moe_model_decode(moe_model *m, int32_t token, int64_t pos, double *logits)
{
    if (!m || !logits)
        return moe_error(MOE_ERR_ARG, "model decode: model and logits must not be NULL");
    if (pos < 0 || pos >= m->maxS)
        return moe_error(MOE_ERR_ARG, "model decode: position %lld outside [0, max_seq = %lld)", (long long)pos,
                         (long long)m->maxS);
    if (token < 0 || token >= m->V)
        return moe_error(MOE_ERR_ARG, "model decode: token %d outside [0, vocab_size = %lld)", token,
                         (long long)m->V);
    moe_backend *b = m->b;
    const int64_t C = m->C;
    const double theta = m->c.rope_theta;
    m->can_backward = 0;
    m->have_logits = 0;
    m->in[0] = token;
    b->embedding_forward(b, m->blk[0].x, m->in, m->wte, 1, C);
    for (int64_t l = 0; l < m->L; l++) {
        mblock *k = &m->blk[l];
        b->rmsnorm_forward(b, k->n1, k->rstd1, k->x, k->ln1, m->c.rms_norm_eps, 1, C);
        b->matmul_forward(b, k->q, k->n1, k->wq, 1, C, m->qd);
        b->matmul_forward(b, k->k, k->n1, k->wk, 1, C, m->kvd);
        b->matmul_forward(b, k->v, k->n1, k->wv, 1, C, m->kvd);
        if (k->bq.buf) {
            b->bias_forward(b, k->q, k->bq, 1, m->qd);
            b->bias_forward(b, k->k, k->bk, 1, m->kvd);
            b->bias_forward(b, k->v, k->bv, 1, m->kvd);
        }
        b->rope_forward(b, k->q, k->q, pos, theta, 1, 1, m->H, m->hd);
        b->rope_forward(b, k->k, k->k, pos, theta, 1, 1, m->Hkv, m->hd);
        b->copy(b, moe_tensor_at(k->kc, pos * m->kvd), k->k, m->kvd);
        b->copy(b, moe_tensor_at(k->vc, pos * m->kvd), k->v, m->kvd);
        b->attention_decode(b, k->ao, k->att, k->q, k->kc, k->vc, pos, m->H, m->Hkv, m->hd);
        b->matmul_forward(b, k->mid, k->ao, k->wo, 1, m->qd, C);
        b->add(b, k->mid, k->x, C);
        moe_status s = ffn_forward(m, k, m->in, NULL, 1, 0, 0);
        if (s)
            return s;
        moe_tensor nx = next_x(m, l);
        b->copy(b, nx, k->mid, C);
        b->add(b, nx, k->fo, C);
    }
    b->rmsnorm_forward(b, m->nf, m->rstdf, m->xf, m->normf, m->c.rms_norm_eps, 1, C);
    b->matmul_t_forward(b, m->logits, m->nf, m->lmw, 1, C, m->V);
    return b->download(b, logits, m->logits, m->V);
}

/* ---- statistics ------------------------------------------------------------------------ */

moe_status moe_model_get_layer_stats(moe_model *m, int64_t layer, moe_model_layer_stats *st, int64_t *counts)
{
    if (!m || !st || layer < 0 || layer >= m->L)
        return moe_error(MOE_ERR_ARG, "model: layer %lld outside [0, %lld)", (long long)layer,
                         (long long)(m ? m->L : 0));
    memset(st, 0, sizeof *st);
    mblock *k = &m->blk[layer];
    if (!k->moe)
        return MOE_OK;
    st->n_experts = k->E;
    const moe_bplan *p = moe_layer_plan(k->moe);
    if (!p)
        return MOE_OK;
    st->aux = moe_layer_aux(k->moe);
    m->b->plan_stats(m->b, p, &st->assignments, &st->dropped, k->counts, NULL);
    double mx = 0, sum = 0;
    for (int64_t e = 0; e < k->E; e++) {
        sum += (double)k->counts[e];
        if ((double)k->counts[e] > mx)
            mx = (double)k->counts[e];
    }
    st->load_max = mx;
    st->load_mean = sum / (double)k->E;
    if (counts)
        memcpy(counts, k->counts, (size_t)k->E * sizeof *counts);
    return MOE_OK;
}

moe_status moe_model_get_stats(moe_model *m, moe_model_stats *st)
{
    if (!m || !st)
        return moe_error(MOE_ERR_ARG, "model stats: model and stats must not be NULL");
    memset(st, 0, sizeof *st);
    double kept = 0, dropped = 0, ratio = 0;
    for (int64_t l = 0; l < m->L; l++) {
        moe_model_layer_stats ls;
        moe_status s = moe_model_get_layer_stats(m, l, &ls, NULL);
        if (s)
            return s;
        if (!ls.n_experts)
            continue;
        st->n_moe_layers++;
        st->load_max += ls.load_max;
        st->load_mean += ls.load_mean;
        ratio += ls.load_mean > 0 ? ls.load_max / ls.load_mean : 0;
        kept += (double)ls.assignments;
        dropped += (double)ls.dropped;
        st->aux_lb += ls.aux.lb;
        st->aux_importance += ls.aux.importance;
        st->aux_load += ls.aux.load;
        st->aux_z += ls.aux.z;
        st->aux_mi += ls.aux.mi;
        st->aux_total += ls.aux.total;
    }
    if (st->n_moe_layers)
        st->load_max_over_mean = ratio / (double)st->n_moe_layers;
    st->dropped_frac = kept + dropped > 0 ? dropped / (kept + dropped) : 0;
    return MOE_OK;
}

moe_layer *moe_model_moe_layer(moe_model *m, int64_t layer)
{
    return m && layer >= 0 && layer < m->L ? m->blk[layer].moe : NULL;
}
