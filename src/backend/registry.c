/*
 * The backend registry (ggml-backend-reg's idea): backends by name, each checked for a
 * complete op table when it is created; and the sticky error of enqueued ops.
 */
#include "config.h"

#include <stdarg.h>
#include <stdio.h>
#include <string.h>

#include "backend/backend.h"

#define MAX_BACKENDS 16

typedef struct {
    char name[32];
    char about[128];
    moe_backend_create_fn create;
} entry;

static entry builtin[] = {
    {"ref", "the oracle: plain C in double, every op as in ref/ (slow, trusted)", moe_backend_ref_create},
    {"cpu", "fp32, OpenBLAS + OpenMP", moe_backend_cpu_create},
#ifdef HAVE_CUDA
    {"cuda", "NVIDIA GPUs: fp32 (cross-checks) or bf16 (--dtype), cuBLAS + own kernels", moe_backend_cuda_create},
#endif
};

static entry table[MAX_BACKENDS];
static int n_table = -1;

static void init_table(void)
{
    if (n_table >= 0)
        return;
    n_table = 0;
    for (size_t i = 0; i < sizeof builtin / sizeof builtin[0]; i++)
        table[n_table++] = builtin[i];
}

moe_status moe_backend_register(const char *name, const char *about, moe_backend_create_fn create)
{
    init_table();
    if (!name || !*name || strlen(name) >= sizeof table[0].name || !create)
        return moe_error(MOE_ERR_ARG, "backend register: a name of 1 to %zu characters and a create function are "
                         "required", sizeof table[0].name - 1);
    for (int i = 0; i < n_table; i++)
        if (!strcmp(table[i].name, name))
            return moe_error(MOE_ERR_ARG, "backend register: '%s' is registered already", name);
    if (n_table == MAX_BACKENDS)
        return moe_error(MOE_ERR_ARG, "backend register: the registry holds %d backends at most", MAX_BACKENDS);
    entry *e = &table[n_table++];
    snprintf(e->name, sizeof e->name, "%s", name);
    snprintf(e->about, sizeof e->about, "%s", about ? about : "");
    e->create = create;
    return MOE_OK;
}

int moe_backend_count(void)
{
    init_table();
    return n_table;
}

const char *moe_backend_name(int i)
{
    init_table();
    return i >= 0 && i < n_table ? table[i].name : NULL;
}

const char *moe_backend_about(int i)
{
    init_table();
    return i >= 0 && i < n_table ? table[i].about : NULL;
}

const char *moe_backend_list(void)
{
    static _Thread_local char buf[MAX_BACKENDS * 34];
    init_table();
    size_t at = 0;
    buf[0] = 0;
    for (int i = 0; i < n_table && at < sizeof buf; i++)
        at += (size_t)snprintf(buf + at, sizeof buf - at, "%s%s", i ? ", " : "", table[i].name);
    return buf;
}

/* The name of the first op the table leaves NULL, or NULL when it is complete. */
static const char *missing_op(const moe_backend *b)
{
#define CHECK(op)        \
    if (!b->op)          \
        return #op;
    MOE_BACKEND_OPS(CHECK)
#undef CHECK
    return NULL;
}

moe_status moe_backend_create(const char *name, const moe_backend_options *o, moe_backend **out)
{
    if (!out)
        return moe_error(MOE_ERR_ARG, "backend: out must not be NULL");
    *out = NULL;
    init_table();
    const moe_backend_options defaults = {0};
    for (int i = 0; i < n_table; i++) {
        if (!name || strcmp(table[i].name, name))
            continue;
        moe_backend *b = NULL;
        moe_status s = table[i].create(o ? o : &defaults, &b);
        if (s)
            return s;
        const char *op = missing_op(b);
        if (op) {
            moe_error(MOE_ERR_UNSUPPORTED, "backend '%s' does not implement the op '%s'", name, op);
            if (b->destroy)
                b->destroy(b);
            return MOE_ERR_UNSUPPORTED;
        }
        *out = b;
        return MOE_OK;
    }
    return moe_error(MOE_ERR_ARG, "backend: unknown backend '%s' (this build has: %s%s)", name ? name : "(null)",
                     moe_backend_list(),
                     name && !strcmp(name, "cuda") ? "; ./configure --with-cuda builds the cuda backend" : "");
}

void moe_backend_free(moe_backend *b)
{
    if (b)
        b->destroy(b);
}

void moe_backend_fail(moe_backend *b, const char *op, moe_status s, const char *fmt, ...)
{
    if (b->err != MOE_OK)
        return; /* the first failure is the one that explains the rest */
    b->err = s ? s : MOE_ERR_ARG;
    int at = snprintf(b->err_msg, sizeof b->err_msg, "%s backend, %s: ", b->name, op);
    if (at < 0 || (size_t)at >= sizeof b->err_msg)
        return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(b->err_msg + at, sizeof b->err_msg - (size_t)at, fmt, ap);
    va_end(ap);
}

moe_status moe_backend_take_error(moe_backend *b)
{
    moe_status s = b->err;
    if (s == MOE_OK)
        return MOE_OK;
    b->err = MOE_OK;
    return moe_error(s, "%s", b->err_msg);
}
