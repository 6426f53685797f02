/* Version and what this build has (BLAS, OpenMP, MPI, CUDA), for cmoe --version. */
#include "config.h"

#include <stdio.h>
#include <string.h>

#include <cblas.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#ifdef HAVE_MPI
#include <mpi.h>
#endif

#include "backend/backend.h"
#include "cmoe.h"

const char *moe_version(void) { return PACKAGE_VERSION; }

static void blas_info(char *buf, size_t n)
{
#ifdef HAVE_OPENBLAS_GET_CONFIG
    /* e.g. "OpenBLAS 0.3.21 NO_AFFINITY Haswell MAX_THREADS=64" */
    snprintf(buf, n, "%s, %d threads", openblas_get_config(), openblas_get_num_threads());
#else
    snprintf(buf, n, "a CBLAS (cblas_sgemm; not OpenBLAS, so no version to report)");
#endif
}

static void openmp_info(char *buf, size_t n)
{
#ifdef _OPENMP
    /* _OPENMP is the yyyymm date of the supported spec. */
    snprintf(buf, n, "yes (spec %d), %d threads max", _OPENMP, omp_get_max_threads());
#else
    snprintf(buf, n, "no (built with --disable-openmp or an unsupported compiler)");
#endif
}

static void mpi_info(char *buf, size_t n)
{
#ifdef HAVE_MPI
    /* MPI_Get_library_version may be called before MPI_Init (MPI-3). */
    char lib[MPI_MAX_LIBRARY_VERSION_STRING];
    int len = 0;
    if (MPI_Get_library_version(lib, &len) != MPI_SUCCESS)
        snprintf(lib, sizeof lib, "library version unavailable");
    /* Open MPI's string runs over several lines; its first says enough. */
    lib[strcspn(lib, "\n,")] = '\0';
    snprintf(buf, n, "yes (MPI %d.%d, %s)", MPI_VERSION, MPI_SUBVERSION, lib);
#else
    snprintf(buf, n, "no (not found by configure, or --without-mpi)");
#endif
}

const char *moe_build_info(void)
{
    /* Rebuilt on every call so the thread count follows OMP_NUM_THREADS;
     * thread-local so concurrent callers do not share the buffer. */
    static _Thread_local char info[1024];
    char blas[256], omp[128], mpi[384];
    blas_info(blas, sizeof blas);
    openmp_info(omp, sizeof omp);
    mpi_info(mpi, sizeof mpi);
    snprintf(info, sizeof info,
             "BLAS: %s\nOpenMP: %s\nMPI: %s\nCUDA: %s\nBackends: %s",
             blas, omp, mpi,
#ifdef HAVE_CUDA
             "built (nvcc -arch=" CMOE_CUDA_ARCH ")",
#else
             "not built (configure --with-cuda to build it)",
#endif
             moe_backend_list());
    return info;
}

#ifndef HAVE_CUDA
/* Without --with-cuda there is no gpu/device.cu; the query still answers. */
moe_status moe_cuda_device_info(char *buf, size_t n)
{
    if (!buf || n == 0)
        return moe_error(MOE_ERR_ARG, "moe_cuda_device_info: buf is NULL or n is 0");
    snprintf(buf, n, "CUDA: not built");
    return moe_error(MOE_ERR_UNSUPPORTED, "CUDA: not built (configure --with-cuda)");
}

moe_status moe_cuda_gemm_ceiling(const char *dtype, double flops, double *gflops, int64_t *side)
{
    (void)dtype, (void)flops;
    if (gflops)
        *gflops = 0;
    if (side)
        *side = 0;
    return moe_error(MOE_ERR_UNSUPPORTED, "CUDA: not built (configure --with-cuda)");
}
#endif
