/*
 * Where the model's tensors live (model_impl.h): llm.c's layout, one arena of parameters
 * (and its twin of gradients) for everything the model owns and one of activations and
 * backward scratch, plus the table of named parameters that ties in the MoE layers' own.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "model/model_impl.h"

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
    p->info.expert = !strncmp(name, "model.layers.", 13) && strstr(name, ".block_sparse_moe.experts.") != NULL;
    p->info.shard = p->info.expert && m->ex ? m->ex->shard : 0;
    p->info.shards = p->info.expert && m->ex ? m->ex->shards : 1;
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

moe_status moe_model_layout(moe_model *m)
{
    const int64_t C = m->C, V = m->V, N = m->maxN, F = m->F;
    const int64_t att = m->b->attention_saved(m->b, m->maxB, m->maxS, m->H);
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
        if (k->moa) { /* a mixture of attention heads owns its parameters, as an MoE layer does */
            const moe_arena *pa = moe_moa_params(k->moa);
            for (int i = 0; i < pa->n; i++) {
                snprintf(nm, sizeof nm, "model.layers.%lld.self_attn.%s", (long long)l, pa->views[i].name);
                if ((s = push_param(m, nm, pa->views[i].ndim, pa->views[i].shape)))
                    return s;
            }
            goto post_attention;
        }
        OWN(2, C, m->qd, "model.layers.%lld.self_attn.q_proj.weight", (long long)l);
        OWN(2, C, m->kvd, "model.layers.%lld.self_attn.k_proj.weight", (long long)l);
        OWN(2, C, m->kvd, "model.layers.%lld.self_attn.v_proj.weight", (long long)l);
        if (m->c.qkv_bias) {
            OWN(1, m->qd, 0, "model.layers.%lld.self_attn.q_proj.bias", (long long)l);
            OWN(1, m->kvd, 0, "model.layers.%lld.self_attn.k_proj.bias", (long long)l);
            OWN(1, m->kvd, 0, "model.layers.%lld.self_attn.v_proj.bias", (long long)l);
        }
        OWN(2, m->qd, C, "model.layers.%lld.self_attn.o_proj.weight", (long long)l);
    post_attention:
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
        if (!k->moa) { /* MoA keeps its own */
            ACT(N, m->qd, "%lld.q", (long long)l);
            ACT(N, m->kvd, "%lld.k", (long long)l);
            ACT(N, m->kvd, "%lld.v", (long long)l);
            ACT(1, att, "%lld.att", (long long)l);
            ACT(N, m->qd, "%lld.ao", (long long)l);
            ACT(m->maxS, m->kvd, "%lld.kc", (long long)l);
            ACT(m->maxS, m->kvd, "%lld.vc", (long long)l);
        }
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
#undef OWN
#undef ACT
    return MOE_OK;
}

static moe_tensor at(const moe_arena *a, moe_buf *buf, const char *name)
{
    const moe_view *v = moe_arena_find(a, name);
    return v ? (moe_tensor){buf, v->offset} : (moe_tensor){NULL, 0};
}

void moe_model_bind(moe_model *m)
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
    S(dqp, "d.qp"); S(dkp, "d.kp");
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
            moe_layer_param_tensors(ly, p->info.name + used, &p->p, &p->g);
        } else if (sscanf(p->info.name, "model.layers.%lld.self_attn.%n", &l, &used) == 1 && used > 0 &&
                   m->blk[l].moa) {
            moe_moa_param_tensors(m->blk[l].moa, p->info.name + used, &p->p, &p->g);
        }
    }
}

