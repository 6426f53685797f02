# The CUDA backend, built with --with-cuda. libtool has no CUDA tag, so the
# .cu.lo rule below compiles with nvcc through gpu/nvcc-lt.sh, which writes
# the libtool object that links into libcmoe.la beside the C objects.
SUFFIXES += .cu
gpu_sources = gpu/device.cu gpu/backend.cu gpu/backend_model.cu gpu/router.cu gpu/plan.cu gpu/select.cu gpu/aux_loss.cu \
	gpu/dispatch.cu gpu/ffn.cu gpu/gemm.cu gpu/attention.cu gpu/rmsnorm.cu gpu/rope.cu gpu/embedding.cu \
	gpu/crossentropy.cu gpu/adamw.cu gpu/moa.cu gpu/flash.cu gpu/gemm_cublas.cu
gpu_headers = gpu/cuda.h gpu/gemm.h gpu/act.cuh gpu/rng.cuh gpu/mma.cuh
if HAVE_CUDA
libcmoe_la_SOURCES += $(gpu_sources)
endif
EXTRA_DIST += $(gpu_sources) $(gpu_headers) gpu/nvcc-lt.sh

AM_V_NVCC = $(am__v_NVCC_@AM_V@)
am__v_NVCC_ = $(am__v_NVCC_@AM_DEFAULT_V@)
am__v_NVCC_0 = @echo "  NVCC    " $@;
am__v_NVCC_1 =
# -Xcompiler passes the C++ host compiler its warnings; -Werror=all-warnings is left to CI.
NVCC_COMPILE = $(NVCC) -arch=$(CUDA_ARCH) -std=c++17 -Xcompiler -Wall,-Wextra,-Wno-unused-parameter \
	$(DEFS) $(DEFAULT_INCLUDES) $(AM_CPPFLAGS) $(CPPFLAGS) $(NVCCFLAGS)

.cu.lo:
	$(AM_V_NVCC)$(SHELL) $(top_srcdir)/gpu/nvcc-lt.sh $@ $(NVCC_COMPILE) -c $<

# nvcc writes no dependency files here; name the headers the .cu files include.
gpu_deps = $(top_srcdir)/src/cmoe.h $(top_srcdir)/src/backend/backend.h $(top_srcdir)/src/core/dtype.h config.h \
	$(top_srcdir)/gpu/cuda.h $(top_srcdir)/gpu/gemm.h $(top_srcdir)/gpu/act.cuh $(top_srcdir)/gpu/rng.cuh $(top_srcdir)/gpu/mma.cuh
gpu/device.lo gpu/backend.lo gpu/backend_model.lo gpu/router.lo gpu/plan.lo gpu/select.lo gpu/aux_loss.lo gpu/dispatch.lo \
	gpu/ffn.lo gpu/gemm.lo gpu/attention.lo gpu/rmsnorm.lo gpu/rope.lo gpu/embedding.lo gpu/crossentropy.lo \
	gpu/adamw.lo gpu/moa.lo gpu/flash.lo gpu/gemm_cublas.lo: $(gpu_deps)
