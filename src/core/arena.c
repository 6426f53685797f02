/* Arenas: many named tensors in one allocation (llm.c's layout); checkpoints write the views. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "cmoe.h"

void moe_arena_init(moe_arena *a, size_t elem)
{
    memset(a, 0, sizeof *a);
    a->elem = elem;
}

moe_status moe_arena_add(moe_arena *a, const char *name, int ndim, const int64_t *shape)
{
    if (a->data)
        return moe_error(MOE_ERR_ARG, "arena: cannot add '%s' after allocation", name);
    if (strlen(name) >= MOE_NAME_MAX)
        return moe_error(MOE_ERR_ARG, "arena: tensor name '%s' longer than %d", name, MOE_NAME_MAX - 1);
    if (ndim < 1 || ndim > MOE_MAX_DIMS)
        return moe_error(MOE_ERR_ARG, "arena: tensor '%s' has %d dims (1..%d)", name, ndim, MOE_MAX_DIMS);
    if (moe_arena_find(a, name))
        return moe_error(MOE_ERR_ARG, "arena: tensor '%s' added twice", name);
    int64_t numel = 1;
    for (int i = 0; i < ndim; i++) {
        if (shape[i] <= 0 || numel > INT64_MAX / 8 / shape[i])
            return moe_error(MOE_ERR_ARG, "arena: tensor '%s' has bad dimension %d (%lld)", name, i,
                             (long long)shape[i]);
        numel *= shape[i];
    }
    if (a->n == a->cap) {
        int cap = a->cap ? 2 * a->cap : 16;
        moe_view *v = realloc(a->views, (size_t)cap * sizeof *v);
        if (!v)
            return moe_error(MOE_ERR_NOMEM, "arena: out of memory for views");
        a->views = v;
        a->cap = cap;
    }
    moe_view *v = &a->views[a->n++];
    memset(v, 0, sizeof *v);
    strcpy(v->name, name);
    v->ndim = ndim;
    memcpy(v->shape, shape, (size_t)ndim * sizeof *shape);
    v->offset = a->numel;
    v->numel = numel;
    a->numel += numel;
    return MOE_OK;
}

int64_t moe_host_memory(void)
{
    long pages = sysconf(_SC_PHYS_PAGES), size = sysconf(_SC_PAGESIZE);
    return pages > 0 && size > 0 && pages < INT64_MAX / size ? (int64_t)pages * size : 0;
}

/* The refusal names the size in bytes and the tensor that takes the most of it; the
 * caller adds the config keys that sized it. */
static moe_status too_big(const moe_arena *a, const char *why)
{
    const moe_view *big = a->n ? &a->views[0] : NULL;
    for (int i = 1; i < a->n; i++)
        if (a->views[i].numel > big->numel)
            big = &a->views[i];
    char sh[128] = "";
    for (int d = 0, at = 0; big && d < big->ndim && at < (int)sizeof sh - 24; d++)
        at += snprintf(sh + at, sizeof sh - (size_t)at, "%s%lld", d ? ", " : "[", (long long)big->shape[d]);
    return moe_error(MOE_ERR_NOMEM, "arena: %lld elements of %zu bytes (%.3g GiB) %s; the largest tensor is '%s' %s]",
                     (long long)a->numel, a->elem, (double)a->numel * (double)a->elem / (1 << 30), why,
                     big ? big->name : "", sh);
}

moe_status moe_arena_alloc(moe_arena *a)
{
    if (a->data)
        return MOE_OK;
    const int64_t mem = moe_host_memory();
    if (a->numel > (int64_t)(SIZE_MAX / a->elem) || (mem > 0 && (double)a->numel * (double)a->elem > (double)mem)) {
        char why[96];
        snprintf(why, sizeof why, "are more than this machine's memory (%.3g GiB)", (double)mem / (1 << 30));
        return too_big(a, why);
    }
    a->data = calloc(a->numel ? (size_t)a->numel : 1, a->elem);
    if (!a->data)
        return too_big(a, "could not be allocated");
    return MOE_OK;
}

const moe_view *moe_arena_find(const moe_arena *a, const char *name)
{
    for (int i = 0; i < a->n; i++)
        if (strcmp(a->views[i].name, name) == 0)
            return &a->views[i];
    return NULL;
}

void *moe_arena_ptr(const moe_arena *a, const moe_view *v)
{
    if (!a->data || !v)
        return NULL;
    return (char *)a->data + (size_t)v->offset * a->elem;
}

void moe_arena_free(moe_arena *a)
{
    if (!a)
        return;
    free(a->views);
    free(a->data);
    memset(a, 0, sizeof *a);
}
