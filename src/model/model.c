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

#include "model/model_impl.h"
#include "ref/ref.h"

/* ---- create / free --------------------------------------------------------------- */

moe_status moe_model_create(const moe_model_config *c, moe_backend *b, moe_exchange *ex, int64_t max_batch,
                            int64_t max_seq, moe_model **out)
{
    if (!out)
        return moe_error(MOE_ERR_ARG, "model: out must not be NULL");
    *out = NULL;
    if (!c || !b)
        return moe_error(MOE_ERR_ARG, "model: config and backend must not be NULL");
    moe_status s = moe_model_config_validate(c);
    if (s)
        return s;
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
    m->ex = ex;
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
    const moe_dtype ft = b->float_type;
    moe_arena_init(&m->P, moe_dtype_size(ft));
    moe_arena_init(&m->A, moe_dtype_size(ft));
    m->blk = calloc((size_t)m->L, sizeof *m->blk);
    if (!m->blk) {
        moe_model_free(m);
        return moe_error(MOE_ERR_NOMEM, "model: out of memory");
    }
    m->ns = 1; /* the cross-entropy */
    for (int64_t l = 0; l < m->L; l++) {
        mblock *k = &m->blk[l];
        k->E = moe_model_layer_experts(c, l);
        if (!k->E)
            continue;
        moe_layer_config lc;
        if ((s = moe_model_layer_config(c, l, &lc)) || (s = moe_layer_create(&lc, b, m->maxN, ex, &k->moe))) {
            if (s == MOE_ERR_NOMEM)
                s = moe_model_size_error(c, m->maxN);
            moe_model_free(m);
            return s;
        }
        k->stat0 = m->ns;
        m->ns += MOE_LAYER_NSTATS(k->E);
    }
    if (c->attention_experts > 0) { /* every layer's attention: a mixture of heads */
        const moe_moa_dims d = {m->maxB, m->maxS, m->C, m->hd, c->attention_experts, c->attention_experts_per_tok,
                                c->rope_theta, c->moe.lb_coef, c->moe.z_coef};
        for (int64_t l = 0; l < m->L; l++) {
            mblock *k = &m->blk[l];
            if ((s = moe_moa_create(&d, l, c->moe.seed, b, &k->moa))) {
                if (s == MOE_ERR_NOMEM)
                    s = moe_model_size_error(c, m->maxN);
                moe_model_free(m);
                return s;
            }
            k->moa_stat0 = m->ns;
            m->ns += MOE_LAYER_NSTATS(c->attention_experts);
        }
    }
    m->n_scalars = 2 * m->ns + 2;
    const moe_workload w = {.batch = m->maxB, .seq = m->maxS, .heads = m->H, .kv_heads = m->Hkv, .head_dim = m->hd,
                            .rows_ffn = m->maxN, .d_model = m->C, .d_ff = m->F};
    if (!(m->shost = calloc((size_t)m->n_scalars, sizeof *m->shost))) {
        moe_model_free(m);
        return moe_error(MOE_ERR_NOMEM, "model: out of memory");
    }
    if ((s = moe_model_layout(m)) || (s = b->alloc(b, ft, m->P.numel, &m->pbuf)) || (s = b->alloc(b, ft, m->P.numel, &m->gbuf)) ||
        (s = b->alloc(b, ft, m->A.numel, &m->abuf)) || (s = b->alloc(b, MOE_I32, 3 * m->maxN, &m->ibuf)) ||
        (s = b->alloc(b, ft == MOE_F64 ? MOE_F64 : MOE_F32, m->n_scalars, &m->sbuf)) || (s = b->reserve(b, &w))) {
        if (s == MOE_ERR_NOMEM)
            s = moe_model_size_error(c, m->maxN);
        moe_model_free(m);
        return s;
    }
    m->in = (moe_tensor){m->ibuf, 0};
    m->tg = (moe_tensor){m->ibuf, m->maxN};
    m->task = (moe_tensor){m->ibuf, 2 * m->maxN};
    moe_model_bind(m);
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
        moe_moa_free(m->blk[l].moa);
    }
    if (m->pbuf)
        b->free(b, m->pbuf);
    if (m->gbuf)
        b->free(b, m->gbuf);
    if (m->abuf)
        b->free(b, m->abuf);
    if (m->ibuf)
        b->free(b, m->ibuf);
    if (m->sbuf)
        b->free(b, m->sbuf);
    moe_arena_free(&m->P);
    moe_arena_free(&m->A);
    free(m->blk);
    free(m->par);
    free(m->shost);
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
    return s ? s : moe_download_f64(m->b, dst, m->par[i].p, m->par[i].info.numel);
}

moe_status moe_model_set_param(moe_model *m, int i, const double *src)
{
    moe_status s = check_index(m, i);
    return s ? s : moe_upload_f64(m->b, m->par[i].p, src, m->par[i].info.numel);
}

moe_status moe_model_set_param_raw(moe_model *m, int i, const void *src, moe_dtype type)
{
    moe_status s = check_index(m, i);
    return s ? s : m->b->upload(m->b, m->par[i].p, src, type, m->par[i].info.numel);
}

moe_status moe_model_get_grad(moe_model *m, int i, double *dst)
{
    moe_status s = check_index(m, i);
    return s ? s : moe_download_f64(m->b, dst, m->par[i].g, m->par[i].info.numel);
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
    m->b->fill(m->b, (moe_tensor){m->sbuf, m->ns}, 0.0, m->ns); /* a new step's sums */
    m->forwards = 0;
    m->shost_fresh = 0;
    for (int64_t l = 0; l < m->L; l++) {
        if (m->blk[l].moe)
            moe_layer_zero_grad(m->blk[l].moe);
        if (m->blk[l].moa)
            moe_moa_zero_grad(m->blk[l].moa);
    }
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
        /* an expert shard draws its elements of the whole tensor: the same weights under any split */
        const int64_t base = p->shard * p->numel;
        /* counter-based draws: any thread count gives the same numbers */
#pragma omp parallel for schedule(static) if (p->numel > (1 << 16))
        for (int64_t j = 0; j < p->numel; j++) {
            const int64_t e = base + j;
            if (norm || zero) {
                w[j] = norm ? 1.0 : 0.0;
                continue;
            }
            double z = 0;
            /* Switch: truncated at ±2σ by redrawing on a fresh counter */
            for (uint32_t t = 0; t < 64; t++) {
                z = moe_rand_normal(seed, MOE_RNG_INIT, (uint32_t)i, (uint32_t)e, (uint32_t)(e >> 32) | (t << 24));
                if (sw <= 0 || fabs(z) <= 2.0)
                    break;
            }
            w[j] = sd * z;
        }
        s = moe_upload_f64(m->b, m->par[i].p, w, p->numel);
    }
    free(w);
    return s ? s : m->b->sync(m->b);
}

/* ---- forward ------------------------------------------------------------------------ */

static moe_tensor *opt(moe_tensor *t)
{
    return t->buf ? t : NULL;
}

/* x → mid = x + attention(x) for N = B·S tokens */
static moe_status attn_forward(moe_model *m, mblock *k, int64_t B, int64_t S)
{
    moe_backend *b = m->b;
    const int64_t N = B * S, C = m->C;
    b->rmsnorm_forward(b, k->n1, k->rstd1, k->x, k->ln1, m->c.rms_norm_eps, N, C);
    if (k->moa) {
        moe_status s = moe_moa_forward(k->moa, k->mid, k->n1, B, S, MOE_KEY_STEP(0));
        if (s)
            return s;
        /* its router's losses and counts join the step's scalars */
        b->copy(b, moe_tensor_at((moe_tensor){m->sbuf, 0}, k->moa_stat0), moe_moa_stats(k->moa),
                MOE_LAYER_NSTATS(m->c.attention_experts));
        b->add(b, k->mid, k->x, N * C);
        return MOE_OK;
    }
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
    return MOE_OK;
}

/* fo = FFN(rmsnorm(mid)), dense or MoE */
static moe_status ffn_forward(moe_model *m, mblock *k, const moe_tensor *task, int64_t N, moe_key key, int training)
{
    moe_backend *b = m->b;
    const int64_t C = m->C;
    b->rmsnorm_forward(b, k->n2, k->rstd2, k->mid, k->ln2, m->c.rms_norm_eps, N, C);
    if (k->moe) {
        moe_status s = moe_layer_forward(k->moe, k->fo, k->n2, &m->in, task, N, key, training);
        if (!s) /* the layer's scalars join the step's, for the one read */
            b->copy(b, moe_tensor_at((moe_tensor){m->sbuf, 0}, k->stat0), moe_layer_stats(k->moe),
                    MOE_LAYER_NSTATS(k->E));
        return s;
    }
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
                             int64_t B, int64_t S, moe_key key, int training, moe_model_losses *losses)
{
    if (!m || !inputs)
        return moe_error(MOE_ERR_ARG, "model forward: model and inputs must not be NULL");
    if (B < 1 || B > m->maxB || S < 1 || S > m->maxS)
        return moe_error(MOE_ERR_ARG, "model forward: batch %lld × sequence %lld outside [1, %lld] × [1, %lld]",
                         (long long)B, (long long)S, (long long)m->maxB, (long long)m->maxS);
    const int64_t N = B * S, C = m->C, M = m->c.moe.n_tasks;
    moe_status s;
    if ((s = check_ids(m, inputs, N, 0, "inputs")) || (targets && (s = check_ids(m, targets, N, -1, "targets"))))
        return s;
    for (int64_t i = 0; task_ids && M >= 1 && i < N; i++)
        if (task_ids[i] < 0 || task_ids[i] >= M)
            return moe_error(MOE_ERR_ARG, "model: task_ids[%lld] = %d outside [0, num_tasks = %lld)", (long long)i,
                             task_ids[i], (long long)M);
    moe_backend *b = m->b;
    m->can_backward = 0;
    m->have_logits = 0;
    m->shost_fresh = 0;
    m->forwards++;
    m->have_task = task_ids != NULL;
    if ((s = b->upload(b, m->in, inputs, MOE_I32, N)) || (targets && (s = b->upload(b, m->tg, targets, MOE_I32, N))) ||
        (task_ids && (s = b->upload(b, m->task, task_ids, MOE_I32, N))))
        return s;
    m->n_targets = 0;
    for (int64_t i = 0; targets && i < N; i++)
        m->n_targets += targets[i] >= 0;
    m->B = B;
    m->S = S;
    m->N = N;

    b->fill(b, (moe_tensor){m->sbuf, 0}, 0.0, m->ns);
    b->embedding_forward(b, m->blk[0].x, m->in, m->wte, N, C);
    for (int64_t l = 0; l < m->L; l++) {
        mblock *k = &m->blk[l];
        if ((s = attn_forward(m, k, B, S)) || (s = ffn_forward(m, k, task_ids ? &m->task : NULL, N, key, training)))
            return s;
        moe_tensor nx = next_x(m, l);
        b->copy(b, nx, k->mid, N * C);
        b->add(b, nx, k->fo, N * C);
    }
    b->rmsnorm_forward(b, m->nf, m->rstdf, m->xf, m->normf, m->c.rms_norm_eps, N, C);
    b->matmul_t_forward(b, m->logits, m->nf, m->lmw, N, C, m->V);
    if (targets) {
        b->crossentropy_forward(b, (moe_tensor){m->sbuf, 0}, m->logits, m->logits, m->tg, N, m->V);
        m->can_backward = 1;
    } else {
        m->have_logits = 1;
    }
    b->add(b, (moe_tensor){m->sbuf, m->ns}, (moe_tensor){m->sbuf, 0}, m->ns); /* into the step's sums */
    return losses ? moe_model_get_losses(m, losses) : MOE_OK;
}

moe_status moe_model_get_logits(moe_model *m, double *dst)
{
    if (!m->have_logits)
        return moe_error(MOE_ERR_ARG, "model: no logits (the last forward had targets, or there was none)");
    return moe_download_f64(m->b, dst, m->logits, m->N * m->V);
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
    if (k->moa) { /* mid = x + MoA(n1) */
        b->fill(b, m->dn, 0.0, N * C);
        if ((s = moe_moa_backward(k->moa, m->dn, m->dmid)))
            return s;
        b->copy(b, m->dx, m->dmid, N * C);
        b->rmsnorm_backward(b, &m->dx, &k->gln1, m->dn, k->x, k->ln1, k->rstd1, N, C);
        return MOE_OK;
    }
    /* mid = x + o_proj(attention(rope(q), rope(k), v)) */
    b->fill(b, m->dao, 0.0, N * m->qd);
    b->matmul_backward(b, &m->dao, &k->gwo, m->dmid, k->ao, k->wo, N, m->qd, C);
    b->fill(b, m->dq, 0.0, N * m->qd);
    b->fill(b, m->dk, 0.0, N * m->kvd);
    b->fill(b, m->dv, 0.0, N * m->kvd);
    b->attention_backward(b, m->dq, m->dk, m->dv, m->dao, k->ao, k->att, k->q, k->k, k->v, B, S, m->H, m->Hkv,
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
    m->shost_fresh = 0;
    moe_status s = b->upload(b, m->in, &token, MOE_I32, 1); /* read before the download below returns */
    if (s)
        return s;
    b->embedding_forward(b, m->blk[0].x, m->in, m->wte, 1, C);
    for (int64_t l = 0; l < m->L; l++) {
        mblock *k = &m->blk[l];
        b->rmsnorm_forward(b, k->n1, k->rstd1, k->x, k->ln1, m->c.rms_norm_eps, 1, C);
        if (k->moa) {
            if ((s = moe_moa_decode(k->moa, k->mid, k->n1, pos)))
                return s;
            b->add(b, k->mid, k->x, C);
            goto ffn;
        }
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
        b->attention_decode(b, k->ao, k->q, k->kc, k->vc, pos, m->H, m->Hkv, m->hd);
        b->matmul_forward(b, k->mid, k->ao, k->wo, 1, m->qd, C);
        b->add(b, k->mid, k->x, C);
    ffn:
        if ((s = ffn_forward(m, k, NULL, 1, MOE_KEY_STEP(0), 0)))
            return s;
        moe_tensor nx = next_x(m, l);
        b->copy(b, nx, k->mid, C);
        b->add(b, nx, k->fo, C);
    }
    b->rmsnorm_forward(b, m->nf, m->rstdf, m->xf, m->normf, m->c.rms_norm_eps, 1, C);
    b->matmul_t_forward(b, m->logits, m->nf, m->lmw, 1, C, m->V);
    return moe_download_f64(b, logits, m->logits, m->V);
}

moe_layer *moe_model_moe_layer(moe_model *m, int64_t layer)
{
    return m && layer >= 0 && layer < m->L ? m->blk[layer].moe : NULL;
}

moe_moa *moe_model_moa(moe_model *m, int64_t layer)
{
    return m && layer >= 0 && layer < m->L ? m->blk[layer].moa : NULL;
}
