/* The CUDA device query behind `cmoe --version`: which GPUs this build can see. */
#include <cuda_runtime.h>
#include <stdarg.h>
#include <stdio.h>

#include "cmoe.h"

/* Appends to buf at *used; a full buffer truncates quietly, the text is only for people. */
static void append(char *buf, size_t n, size_t *used, const char *fmt, ...)
{
    if (*used >= n)
        return;
    va_list ap;
    va_start(ap, fmt);
    int w = vsnprintf(buf + *used, n - *used, fmt, ap);
    va_end(ap);
    if (w > 0)
        *used += (size_t)w < n - *used ? (size_t)w : n - *used - 1;
}

extern "C" moe_status moe_cuda_device_info(char *buf, size_t n)
{
    if (!buf || n == 0)
        return moe_error(MOE_ERR_ARG, "moe_cuda_device_info: buf is NULL or n is 0");
    buf[0] = '\0';
    size_t used = 0;
    int runtime = 0, driver = 0;
    cudaRuntimeGetVersion(&runtime);
    cudaDriverGetVersion(&driver); /* 0 when no driver is installed */

    int count = 0;
    cudaError_t err = cudaGetDeviceCount(&count);
    if (err != cudaSuccess || count == 0) {
        /* No GPU (or no driver) is a normal state for a CUDA build, e.g. on CI. */
        append(buf, n, &used, "CUDA runtime %d.%d, driver %d.%d: no device answers (%s)",
               runtime / 1000, runtime % 1000 / 10, driver / 1000, driver % 1000 / 10,
               err != cudaSuccess ? cudaGetErrorString(err) : "0 devices");
        cudaGetLastError(); /* clear the sticky error so later calls start clean */
        return moe_error(MOE_ERR_CUDA, "%s", buf);
    }
    append(buf, n, &used, "CUDA runtime %d.%d, driver %d.%d: %d device%s", runtime / 1000,
           runtime % 1000 / 10, driver / 1000, driver % 1000 / 10, count, count == 1 ? "" : "s");
    for (int i = 0; i < count; i++) {
        cudaDeviceProp p;
        if (cudaGetDeviceProperties(&p, i) != cudaSuccess) {
            append(buf, n, &used, "\n  device %d: properties unavailable", i);
            continue;
        }
        append(buf, n, &used, "\n  device %d: %s, %.1f GiB, compute capability %d.%d, %d SMs",
               i, p.name, (double)p.totalGlobalMem / (1024.0 * 1024.0 * 1024.0), p.major,
               p.minor, p.multiProcessorCount);
    }
    return MOE_OK;
}
