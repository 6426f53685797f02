/* Error codes and the per-thread message behind moe_last_error(). */
#include <stdarg.h>
#include <stdio.h>
#include <string.h>

#include "cmoe.h"

static _Thread_local char last_error[1024];

const char *moe_strerror(moe_status s)
{
    switch (s) {
    case MOE_OK: return "success";
    case MOE_ERR_ARG: return "invalid argument";
    case MOE_ERR_NOMEM: return "out of memory";
    case MOE_ERR_IO: return "input/output error";
    case MOE_ERR_FORMAT: return "malformed file";
    case MOE_ERR_MPI: return "MPI error";
    case MOE_ERR_CUDA: return "CUDA error";
    case MOE_ERR_UNSUPPORTED: return "not supported by this build";
    }
    return "unknown error";
}

const char *moe_last_error(void)
{
    return last_error[0] ? last_error : "no error recorded";
}

/* Formats into a scratch buffer first, so a message may quote moe_last_error() itself
 * ("loading %s: %s", path, moe_last_error()) to add context. */
moe_status moe_error(moe_status s, const char *fmt, ...)
{
    char msg[sizeof last_error];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    memcpy(last_error, msg, sizeof msg);
    return s;
}
