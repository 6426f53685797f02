/*
 * Hugging Face export and import (hf.h). One table-free mapping: each cmoe parameter
 * is cut into the HF tensors it becomes ("pieces": a row-major block, copied or
 * transposed), and export and import walk the same pieces in opposite directions, so
 * they cannot disagree.
 */
#define _POSIX_C_SOURCE 200809L
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <jansson.h>

#include "core/durable.h"
#include "io/hf.h"

#define UNSUP(...) moe_error(MOE_ERR_UNSUPPORTED, __VA_ARGS__)
#define FMT(...) moe_error(MOE_ERR_FORMAT, __VA_ARGS__)

/* ---- the pieces of a parameter --------------------------------------------------------- */

/* One HF tensor cut from a cmoe parameter: the row-major block [rows, cols] at offset
 * off of the parameter; HF stores it transposed ([cols, rows]) or as it is, as hshape. */
typedef struct {
    char name[192];
    int ndim;
    int64_t shape[2];
    int64_t off, rows, cols;
    int transpose;
} piece;

static int ends_with(const char *s, const char *suf)
{
    size_t n = strlen(s), k = strlen(suf);
    return n >= k && !strcmp(s + n - k, suf);
}

static void set_t(piece *pc, int64_t off, int64_t rows, int64_t cols)
{
    pc->off = off;
    pc->rows = rows;
    pc->cols = cols;
    pc->transpose = 1;
    pc->ndim = 2;
    pc->shape[0] = cols;
    pc->shape[1] = rows;
}

/* Number of pieces of parameter p (experts: one per expert), 0 when it has no HF twin. */
static int64_t n_pieces(const moe_param_info *p)
{
    const char *s = strstr(p->name, ".block_sparse_moe.experts.");
    return s ? p->shape[0] : 1;
}

static moe_status get_piece(moe_hf_arch arch, const moe_param_info *p, int64_t k, piece *pc)
{
    memset(pc, 0, sizeof *pc);
    long long l;
    int used = 0;
    const int q = arch == MOE_HF_QWEN2_MOE;
    if (sscanf(p->name, "model.layers.%lld.block_sparse_moe.%n", &l, &used) == 1 && used > 0) {
        const char *s = p->name + used;
        const char *pre = q ? "mlp" : "block_sparse_moe";
        if (!strcmp(s, "router.weight")) {
            snprintf(pc->name, sizeof pc->name, "model.layers.%lld.%s.gate.weight", l, pre);
            set_t(pc, 0, p->shape[0], p->shape[1]);
            return MOE_OK;
        }
        if (!strncmp(s, "experts.w", 9) && p->ndim == 3) {
            const char *w = s + 8; /* "w1", "w2", "w3" */
            const char *hn = !q ? w : !strcmp(w, "w1") ? "gate_proj" : !strcmp(w, "w3") ? "up_proj" : "down_proj";
            snprintf(pc->name, sizeof pc->name, "model.layers.%lld.%s.experts.%lld.%s.weight", l, pre, (long long)k,
                     hn);
            set_t(pc, k * p->shape[1] * p->shape[2], p->shape[1], p->shape[2]);
            return MOE_OK;
        }
        if (q && !strncmp(s, "shared.w", 8) && p->ndim == 2) {
            const char *w = s + 7;
            const char *hn = !strcmp(w, "w1") ? "gate_proj" : !strcmp(w, "w3") ? "up_proj" : "down_proj";
            snprintf(pc->name, sizeof pc->name, "model.layers.%lld.mlp.shared_expert.%s.weight", l, hn);
            set_t(pc, 0, p->shape[0], p->shape[1]);
            return MOE_OK;
        }
        if (q && !strcmp(s, "shared.gate")) {
            snprintf(pc->name, sizeof pc->name, "model.layers.%lld.mlp.shared_expert_gate.weight", l);
            pc->ndim = 2;
            pc->shape[0] = 1;
            pc->shape[1] = p->shape[0];
            pc->rows = p->numel;
            pc->cols = 1;
            return MOE_OK;
        }
        return UNSUP("parameter '%s' has no %s equivalent", p->name, moe_hf_arch_name(arch));
    }
    snprintf(pc->name, sizeof pc->name, "%s", p->name);
    if (p->ndim == 2 && ends_with(p->name, "_proj.weight")) {
        set_t(pc, 0, p->shape[0], p->shape[1]);
        return MOE_OK;
    }
    /* embeddings and the LM head are [V, C] in both; norms and biases are vectors */
    pc->ndim = p->ndim;
    pc->shape[0] = p->shape[0];
    pc->shape[1] = p->ndim > 1 ? p->shape[1] : 0;
    pc->rows = p->numel;
    pc->cols = 1;
    return MOE_OK;
}

/* dst [piece] <- src [parameter] (export) */
static void cut(const piece *pc, const double *src, double *dst)
{
    const double *b = src + pc->off;
    if (!pc->transpose) {
        memcpy(dst, b, (size_t)(pc->rows * pc->cols) * sizeof *dst);
        return;
    }
    for (int64_t i = 0; i < pc->rows; i++)
        for (int64_t j = 0; j < pc->cols; j++)
            dst[j * pc->rows + i] = b[i * pc->cols + j];
}

/* dst [parameter] <- src [piece] (import) */
static void paste(const piece *pc, const double *src, double *dst)
{
    double *b = dst + pc->off;
    if (!pc->transpose) {
        memcpy(b, src, (size_t)(pc->rows * pc->cols) * sizeof *b);
        return;
    }
    for (int64_t i = 0; i < pc->rows; i++)
        for (int64_t j = 0; j < pc->cols; j++)
            b[i * pc->cols + j] = src[j * pc->rows + i];
}

static moe_status join(char *buf, size_t n, const char *dir, const char *name)
{
    int k = snprintf(buf, n, "%s/%s", dir, name);
    return k < 0 || (size_t)k >= n ? moe_error(MOE_ERR_ARG, "path '%s/%s' is too long", dir, name) : MOE_OK;
}

/* ---- export ---------------------------------------------------------------------------- */

/* One HF tensor of an export, made when the file is written: a slice of parameter i read
 * from the backend, cut (transposed) into HF's layout; or zeros (Qwen2-MoE's biases). */
typedef struct {
    moe_model *m;
    int i, zero;
    piece pc;
    moe_st_dtype dtype;
    double *pv, *hv; /* the export's two piece-sized buffers */
} export_piece;

static moe_status fill_piece(void *ctx, void *dst)
{
    const export_piece *x = ctx;
    const int64_t n = x->pc.rows * x->pc.cols;
    if (x->zero) {
        memset(x->hv, 0, (size_t)n * sizeof *x->hv);
    } else {
        moe_tensor t;
        moe_status s = moe_model_param_tensors(x->m, x->i, &t, NULL);
        if (s || (s = moe_download_f64(moe_model_backend(x->m), x->pv, moe_tensor_at(t, x->pc.off), n)))
            return s;
        piece at0 = x->pc;
        at0.off = 0;
        cut(&at0, x->pv, x->hv);
    }
    return moe_st_from_f64(x->dtype, x->hv, n, dst);
}

moe_status moe_hf_export(moe_model *m, const char *dir, moe_st_dtype dtype)
{
    if (dtype != MOE_ST_F32 && dtype != MOE_ST_BF16 && dtype != MOE_ST_F16)
        return moe_error(MOE_ERR_ARG, "HF export: dtype %s (use F32, BF16 or F16)", moe_st_dtype_name(dtype));
    const moe_model_config *c = moe_model_config_of(m);
    moe_hf_arch a;
    char *cfg = NULL, path[4096];
    moe_status s = moe_hf_arch_of(c, &a);
    if (s || (s = moe_hf_config_to_json(c, dtype, &cfg)))
        return s;
    if (mkdir(dir, 0777) != 0 && errno != EEXIST) {
        free(cfg);
        return moe_error(MOE_ERR_IO, "cannot create directory '%s': %s", dir, strerror(errno));
    }
    /* every HF tensor is a lazy piece: one piece in memory at a time, never the model */
    const int n = moe_model_n_params(m);
    const int zero_bias = a == MOE_HF_QWEN2_MOE && !c->qkv_bias;
    int64_t npc = 0, big = 1;
    for (int i = 0; i < n; i++) {
        const moe_param_info *p = moe_model_param(m, i);
        npc += n_pieces(p) + (zero_bias ? 1 : 0);
        if (p->numel / n_pieces(p) > big)
            big = p->numel / n_pieces(p);
    }
    export_piece *xs = calloc((size_t)npc, sizeof *xs);
    double *pv = malloc((size_t)big * sizeof *pv), *hv = malloc((size_t)big * sizeof *hv);
    moe_st_writer *w = NULL;
    if (!xs || !pv || !hv)
        s = moe_error(MOE_ERR_NOMEM, "HF export: out of memory");
    if (!s)
        s = moe_st_writer_create(&w);
    int64_t at = 0;
    for (int i = 0; i < n && !s; i++) {
        const moe_param_info *p = moe_model_param(m, i);
        for (int64_t k = 0; k < n_pieces(p) && !s; k++) {
            export_piece *x = &xs[at++];
            *x = (export_piece){.m = m, .i = i, .dtype = dtype, .pv = pv, .hv = hv};
            if (!(s = get_piece(a, p, k, &x->pc)))
                s = moe_st_writer_add_lazy(w, x->pc.name, dtype, x->pc.ndim, x->pc.shape, fill_piece, x);
        }
        /* Qwen2-MoE always has q/k/v biases: zeros are the exact equivalent of none */
        if (!s && zero_bias && ends_with(p->name, "_proj.weight") && strstr(p->name, ".self_attn.") &&
            !strstr(p->name, "o_proj")) {
            export_piece *x = &xs[at++];
            *x = (export_piece){.m = m, .i = i, .zero = 1, .dtype = dtype, .pv = pv, .hv = hv};
            snprintf(x->pc.name, sizeof x->pc.name, "%.*sbias", (int)(strlen(p->name) - 6), p->name);
            x->pc.ndim = 1;
            x->pc.shape[0] = p->shape[1];
            x->pc.rows = 1;
            x->pc.cols = p->shape[1];
            s = moe_st_writer_add_lazy(w, x->pc.name, dtype, 1, x->pc.shape, fill_piece, x);
        }
    }
    if (!s && !(s = moe_st_writer_add_meta(w, "format", "pt")) && !(s = join(path, sizeof path, dir, "model.safetensors")))
        s = moe_st_writer_write(w, path);
    if (!s && !(s = join(path, sizeof path, dir, "config.json")))
        s = moe_durable_write_text(path, cfg);
    moe_st_writer_free(w);
    free(cfg);
    free(xs);
    free(pv);
    free(hv);
    return s;
}

/* ---- import --------------------------------------------------------------------------- */

typedef struct {
    int n;
    moe_st_file **f;
} shards;

static void shards_free(shards *sh)
{
    for (int i = 0; i < sh->n; i++)
        moe_st_free(sh->f[i]);
    free(sh->f);
    sh->n = 0;
}

static moe_status shards_add(shards *sh, const char *path)
{
    moe_st_file **nf = realloc(sh->f, (size_t)(sh->n + 1) * sizeof *nf);
    if (!nf)
        return moe_error(MOE_ERR_NOMEM, "out of memory");
    sh->f = nf;
    moe_status s = moe_st_read(path, &sh->f[sh->n]);
    if (!s)
        sh->n++;
    return s;
}

static const moe_st_tensor *shards_find(const shards *sh, const char *name, int *which)
{
    for (int i = 0; i < sh->n; i++) {
        const moe_st_tensor *t = moe_st_find(sh->f[i], name);
        if (t) {
            *which = i;
            return t;
        }
    }
    return NULL;
}

/* model.safetensors, or the shards named by model.safetensors.index.json's weight_map
 * (each tensor must be in the file the map names) */
static moe_status open_weights(const char *dir, shards *sh)
{
    char path[4096], idx[4096];
    moe_status s;
    struct stat sb;
    if ((s = join(path, sizeof path, dir, "model.safetensors")) ||
        (s = join(idx, sizeof idx, dir, "model.safetensors.index.json")))
        return s;
    if (stat(path, &sb) == 0)
        return shards_add(sh, path);
    if (stat(idx, &sb) != 0)
        return moe_error(MOE_ERR_IO, "'%s' has neither model.safetensors nor model.safetensors.index.json", dir);
    json_error_t err;
    json_t *j = json_load_file(idx, JSON_REJECT_DUPLICATES, &err), *map = j ? json_object_get(j, "weight_map") : NULL;
    if (!json_is_object(map)) {
        json_decref(j);
        return FMT("%s: no \"weight_map\" object%s%s", idx, j ? "" : ": ", j ? "" : err.text);
    }
    const char *key;
    json_t *v;
    /* open each shard once, in order of first mention */
    json_t *seen = json_object();
    json_object_foreach(map, key, v) {
        const char *file = json_string_value(v);
        if (!file || strchr(file, '/') || !strcmp(file, "..")) {
            s = FMT("%s: weight_map['%s'] is not a file name in the directory", idx, key);
            break;
        }
        if (!json_object_get(seen, file)) {
            json_object_set_new(seen, file, json_integer(sh->n));
            if ((s = join(path, sizeof path, dir, file)) || (s = shards_add(sh, path)))
                break;
        }
        const moe_st_tensor *t = moe_st_find(sh->f[json_integer_value(json_object_get(seen, file))], key);
        if (!t) {
            s = FMT("%s: tensor '%s' is not in %s, where weight_map puts it", idx, key, file);
            break;
        }
    }
    json_decref(seen);
    json_decref(j);
    return s;
}

moe_status moe_hf_load_weights(const char *dir, moe_model *m, moe_hf_arch arch)
{
    const moe_model_config *c = moe_model_config_of(m);
    moe_hf_arch want;
    moe_status s = moe_hf_arch_of(c, &want);
    if (s)
        return s;
    if (want != arch)
        return moe_error(MOE_ERR_ARG, "HF import: the config is a %s, not a %s", moe_hf_arch_name(want),
                         moe_hf_arch_name(arch));
    shards sh = {0, NULL};
    if ((s = open_weights(dir, &sh))) {
        shards_free(&sh);
        return s;
    }
    const int n = moe_model_n_params(m);
    int64_t big = 1;
    for (int i = 0; i < n; i++)
        if (moe_model_param(m, i)->numel > big)
            big = moe_model_param(m, i)->numel;
    /* Two passes over the mapped files, so that the whole model never sits in host memory:
     * the first checks every tensor (present, its shape, finite, nothing left over) before
     * the model is touched; the second assembles one parameter at a time and uploads it. */
    double *pv = malloc((size_t)big * sizeof *pv), *hv = malloc((size_t)big * sizeof *hv);
    int nt = 0;
    for (int i = 0; i < sh.n; i++)
        nt += sh.f[i]->n;
    char *used = calloc((size_t)(nt ? nt : 1), 1);
    if (!pv || !hv || !used)
        s = moe_error(MOE_ERR_NOMEM, "HF import: out of memory for a tensor of %lld elements", (long long)big);
    for (int pass = 0; pass < 2 && !s; pass++) {
        for (int i = 0; i < n && !s; i++) {
            const moe_param_info *p = moe_model_param(m, i);
            for (int64_t k = 0; k < n_pieces(p) && !s; k++) {
                piece pc;
                if ((s = get_piece(arch, p, k, &pc)))
                    break;
                int which = 0;
                const moe_st_tensor *t = shards_find(&sh, pc.name, &which);
                if (!t) {
                    s = FMT("%s: tensor '%s' is missing (the config needs it for cmoe's '%s')", dir, pc.name, p->name);
                    break;
                }
                int base = 0;
                for (int f = 0; f < which; f++)
                    base += sh.f[f]->n;
                used[base + (int)(t - sh.f[which]->tensors)] = 1;
                char what[512];
                snprintf(what, sizeof what, "%s: tensor '%s'", sh.f[which]->path, pc.name);
                if ((s = moe_st_check_shape(sh.f[which], t, pc.ndim, pc.shape)) ||
                    (s = moe_st_tensor_f64(sh.f[which], t, hv)) ||
                    (pass == 0 && (s = moe_check_finite(MOE_ERR_FORMAT, what, hv, pc.rows * pc.cols))))
                    break;
                if (pass == 1)
                    paste(&pc, hv, pv);
            }
            if (pass == 1 && !s)
                s = moe_model_set_param(m, i, pv);
        }
        /* every tensor of the files must have been used */
        for (int f = 0, base = 0; pass == 0 && f < sh.n && !s; base += sh.f[f]->n, f++)
            for (int i = 0; i < sh.f[f]->n && !s; i++) {
                const moe_st_tensor *t = &sh.f[f]->tensors[i];
                if (used[base + i] || ends_with(t->name, "rotary_emb.inv_freq"))
                    continue;
                if (c->tie_word_embeddings && !strcmp(t->name, "lm_head.weight"))
                    continue; /* some tied checkpoints store the head too */
                s = FMT("%s: unexpected tensor '%s' (not part of the %s its config.json describes)", sh.f[f]->path,
                        t->name, moe_hf_arch_name(arch));
            }
    }
    free(pv);
    free(hv);
    free(used);
    shards_free(&sh);
    return s;
}
