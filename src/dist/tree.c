/* Fixed-tree sums over group ids and across ranks (tree.h). */
#include <stdlib.h>
#include <string.h>

#include "dist/tree.h"

typedef struct {
    int level;
    int64_t index; /* relative to base, at that level */
    int slot;
} node;

struct moe_tree {
    moe_backend *b;
    moe_piece *pieces;
    int np;
    int64_t n, base, count;
    int levels, slots, live;
    node *nodes;   /* [slots] the partial sums kept */
    int *free_slot; /* [slots] a stack of unused slots */
    unsigned char *seen; /* [count] the leaves pushed since the reset */
    int has_acc;   /* an accumulator of its own (micro-batches chain) */
    int nfree;
    moe_buf *buf;  /* [slots + has_acc, n]: the slots, the accumulator */
    int root;      /* slot of the last finished root, -1: none */
};

static int log2i(int64_t n)
{
    int l = 0;
    while (((int64_t)1 << l) < n)
        l++;
    return l;
}

int moe_tree_slots(const int64_t *order, int64_t n, int64_t base, int64_t count)
{
    /* replay the pushes, counting partial sums kept at once */
    const int L = log2i(count);
    char *have = calloc((size_t)(2 * count + 1), 1); /* heap-indexed nodes: level l, index i → (count >> l) + i */
    if (!have)
        return (int)count + 1;
    int live = 0, most = 0;
    for (int64_t k = 0; k < n; k++) {
        int64_t idx = order[k] - base;
        int l = 0;
        for (; l < L; l++, idx >>= 1) {
            int64_t sib = ((count >> l) + (idx ^ 1));
            if (!have[sib])
                break;
            have[sib] = 0; /* the sibling absorbs this node: one kept partial sum fewer after */
            live--;
        }
        have[(count >> l) + idx] = 1;
        live++;
        most = live > most ? live : most;
    }
    free(have);
    return most > 0 ? most : 1;
}

moe_status moe_tree_create(moe_backend *b, const moe_piece *pieces, int np, int64_t base, int64_t count, int slots,
                           int acc, moe_tree **out)
{
    *out = NULL;
    if (count < 1 || (count & (count - 1)) || base % count)
        return moe_error(MOE_ERR_ARG, "tree: %lld leaves from %lld: not an aligned power of two", (long long)count,
                         (long long)base);
    moe_tree *t = calloc(1, sizeof *t);
    if (!t)
        return moe_error(MOE_ERR_NOMEM, "out of memory");
    t->b = b;
    t->np = np;
    t->base = base;
    t->count = count;
    t->levels = log2i(count);
    t->slots = slots < 1 ? 1 : slots;
    t->has_acc = acc != 0;
    t->root = -1;
    t->pieces = malloc((size_t)(np > 0 ? np : 1) * sizeof *t->pieces);
    t->nodes = calloc((size_t)t->slots, sizeof *t->nodes);
    t->free_slot = calloc((size_t)t->slots, sizeof *t->free_slot);
    t->seen = calloc((size_t)count, 1);
    if (!t->pieces || !t->nodes || !t->free_slot || !t->seen) {
        moe_tree_free(t);
        return moe_error(MOE_ERR_NOMEM, "out of memory");
    }
    for (int i = 0; i < np; i++) {
        t->pieces[i] = pieces[i];
        t->n += pieces[i].n;
    }
    moe_status s = b->alloc(b, b->float_type, (t->slots + t->has_acc) * (t->n > 0 ? t->n : 1), &t->buf);
    if (s) {
        moe_tree_free(t);
        return s;
    }
    moe_tree_reset(t);
    *out = t;
    return MOE_OK;
}

void moe_tree_free(moe_tree *t)
{
    if (!t)
        return;
    if (t->buf)
        t->b->free(t->b, t->buf);
    free(t->pieces);
    free(t->nodes);
    free(t->free_slot);
    free(t->seen);
    free(t);
}

int64_t moe_tree_numel(const moe_tree *t)
{
    return t->n;
}

int64_t moe_tree_bytes(const moe_tree *t)
{
    return (int64_t)(t->slots + t->has_acc) * t->n * (int64_t)moe_dtype_size(t->b->float_type);
}

static moe_tensor slot_t(const moe_tree *t, int slot)
{
    return (moe_tensor){t->buf, (int64_t)slot * t->n};
}

moe_tensor moe_tree_root(const moe_tree *t)
{
    return slot_t(t, t->root >= 0 ? t->root : 0);
}

moe_tensor moe_tree_acc(const moe_tree *t)
{
    return t->has_acc ? slot_t(t, t->slots) : moe_tree_root(t);
}

void moe_tree_reset(moe_tree *t)
{
    t->live = 0;
    t->nfree = 0;
    for (int s = t->slots - 1; s >= 0; s--)
        t->free_slot[t->nfree++] = s;
    t->root = -1;
    memset(t->seen, 0, (size_t)t->count);
}

static int find(const moe_tree *t, int level, int64_t index)
{
    for (int i = 0; i < t->live; i++)
        if (t->nodes[i].level == level && t->nodes[i].index == index)
            return i;
    return -1;
}

moe_status moe_tree_push(moe_tree *t, int64_t id)
{
    moe_backend *b = t->b;
    int64_t idx = id - t->base;
    if (idx < 0 || idx >= t->count)
        return moe_error(MOE_ERR_ARG, "tree: leaf %lld outside [%lld, %lld)", (long long)id, (long long)t->base,
                         (long long)(t->base + t->count));
    if (t->seen[idx])
        return moe_error(MOE_ERR_ARG, "tree: leaf %lld pushed twice", (long long)id);
    t->seen[idx] = 1;
    int level = 0, cur;
    int sib = t->levels > 0 ? find(t, 0, idx ^ 1) : -1;
    if (sib >= 0) { /* the sibling's slot becomes the parent: sibling + these pieces */
        cur = t->nodes[sib].slot;
        t->nodes[sib] = t->nodes[--t->live];
        int64_t off = 0;
        for (int i = 0; i < t->np; off += t->pieces[i].n, i++)
            b->add(b, moe_tensor_at(slot_t(t, cur), off), t->pieces[i].t, t->pieces[i].n);
        level = 1;
        idx >>= 1;
    } else {
        if (t->nfree == 0)
            return moe_error(MOE_ERR_ARG, "tree: more partial sums than the %d planned", t->slots);
        cur = t->free_slot[--t->nfree];
        int64_t off = 0;
        for (int i = 0; i < t->np; off += t->pieces[i].n, i++)
            b->copy(b, moe_tensor_at(slot_t(t, cur), off), t->pieces[i].t, t->pieces[i].n);
    }
    /* climb while the sibling is complete */
    while (level > 0 && level < t->levels && (sib = find(t, level, idx ^ 1)) >= 0) {
        const int other = t->nodes[sib].slot;
        b->add(b, slot_t(t, other), slot_t(t, cur), t->n);
        t->free_slot[t->nfree++] = cur;
        t->nodes[sib] = t->nodes[--t->live];
        cur = other;
        level++;
        idx >>= 1;
    }
    if (t->live == t->slots)
        return moe_error(MOE_ERR_ARG, "tree: more partial sums than the %d planned", t->slots);
    t->nodes[t->live++] = (node){level, idx, cur};
    return MOE_OK;
}

moe_status moe_tree_finish(moe_tree *t, moe_comm *c, int first, moe_tensor scratch, void *host, const char *what)
{
    const int r = find(t, t->levels, 0);
    if (r < 0)
        return moe_error(MOE_ERR_ARG, "tree (%s): not every one of the %lld leaves was pushed", what,
                         (long long)t->count);
    t->root = t->nodes[r].slot;
    moe_status s = moe_tree_across(c, t->b, moe_tree_root(t), scratch, t->n, host, what);
    if (s || !t->has_acc) {
        if (!s && !first)
            s = moe_error(MOE_ERR_ARG, "tree (%s): a second micro-batch, but no accumulator", what);
        return s;
    }
    if (first)
        t->b->copy(t->b, moe_tree_acc(t), moe_tree_root(t), t->n);
    else
        t->b->add(t->b, moe_tree_acc(t), moe_tree_root(t), t->n);
    return MOE_OK;
}

void moe_tree_scatter(moe_tree *t)
{
    int64_t off = 0;
    for (int i = 0; i < t->np; off += t->pieces[i].n, i++)
        t->b->copy(t->b, t->pieces[i].t, moe_tensor_at(moe_tree_acc(t), off), t->pieces[i].n);
}

moe_status moe_tree_across(moe_comm *c, moe_backend *b, moe_tensor t, moe_tensor scratch, int64_t n, void *host,
                           const char *what)
{
    const int P = moe_comm_size(c), r = moe_comm_rank(c);
    if (P == 1 || n == 0)
        return MOE_OK;
    const moe_dtype dt = b->dtype(b, t.buf);
    const int64_t bytes = n * (int64_t)moe_dtype_size(dt);
    moe_status s = MOE_OK;
    for (int step = 1; step < P && !s; step <<= 1) {
        if (r % (2 * step) == 0) {
            if (r + step < P && !(s = moe_comm_recv(c, host, bytes, r + step, what)) &&
                !(s = b->upload(b, scratch, host, dt, n)))
                b->add(b, t, scratch, n); /* left (lower ranks) + right: IEEE + commutes */
        } else {
            if (!(s = b->download(b, host, dt, t, n)))
                s = moe_comm_send(c, host, bytes, r - step, what);
            break;
        }
    }
    if (!s && r == 0)
        s = b->download(b, host, dt, t, n);
    if (!s)
        s = moe_comm_bcast(c, host, bytes, 0, what);
    if (!s && r != 0)
        s = b->upload(b, t, host, dt, n);
    return s;
}

moe_status moe_tree_across_host(moe_comm *c, double *v, int n, const char *what)
{
    const int P = moe_comm_size(c), r = moe_comm_rank(c);
    if (P == 1 || n == 0)
        return MOE_OK;
    double *in = malloc((size_t)n * sizeof *in);
    if (!in)
        return moe_error(MOE_ERR_NOMEM, "out of memory");
    moe_status s = MOE_OK;
    for (int step = 1; step < P && !s; step <<= 1) {
        if (r % (2 * step) == 0) {
            if (r + step < P && !(s = moe_comm_recv(c, in, (int64_t)n * 8, r + step, what)))
                for (int i = 0; i < n; i++)
                    v[i] += in[i];
        } else {
            s = moe_comm_send(c, v, (int64_t)n * 8, r - step, what);
            break;
        }
    }
    free(in);
    return s ? s : moe_comm_bcast(c, v, (int64_t)n * 8, 0, what);
}

double moe_tree_sum_host(const double *v, int64_t count)
{
    if (count == 1)
        return v[0];
    const int64_t h = count / 2; /* count is a power of two */
    return moe_tree_sum_host(v, h) + moe_tree_sum_host(v + h, count - h);
}
