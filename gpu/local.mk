# The CUDA backend, built with --with-cuda. libtool has no CUDA tag, so the
# .cu.lo rule below compiles with nvcc through gpu/nvcc-lt.sh, which writes
# the libtool object that links into libcmoe.la beside the C objects.
SUFFIXES += .cu
gpu_sources = gpu/device.cu gpu/backend.cu gpu/backend_model.cu gpu/router.cu gpu/plan.cu gpu/select.cu gpu/aux_loss.cu \
	gpu/dispatch.cu gpu/ffn.cu gpu/gemm.cu gpu/attention.cu gpu/rmsnorm.cu gpu/rope.cu gpu/embedding.cu \
	gpu/crossentropy.cu gpu/adamw.cu gpu/moa.cu gpu/flash.cu gpu/gemm_cublas.cu gpu/gemm_sm90.cu
gpu_headers = gpu/cuda.h gpu/gemm.h gpu/gemm_epi.cuh gpu/act.cuh gpu/rng.cuh gpu/mma.cuh
if HAVE_CUDA
libcmoe_la_SOURCES += $(gpu_sources)
endif
EXTRA_DIST += $(gpu_sources) $(gpu_headers) gpu/nvcc-lt.sh

AM_V_NVCC = $(am__v_NVCC_@AM_V@)
am__v_NVCC_ = $(am__v_NVCC_@AM_DEFAULT_V@)
am__v_NVCC_0 = @echo "  NVCC    " $@;
am__v_NVCC_1 =
# -Xcompiler passes the C++ host compiler its warnings; -Werror=all-warnings is left to CI.
NVCC_FLAGS = -std=c++17 -Xcompiler -Wall,-Wextra,-Wno-unused-parameter \
	$(DEFS) $(DEFAULT_INCLUDES) $(AM_CPPFLAGS) $(CPPFLAGS) $(NVCCFLAGS)
NVCC_COMPILE = $(NVCC) -arch=$(CUDA_ARCH) $(NVCC_FLAGS)

.cu.lo:
	$(AM_V_NVCC)$(SHELL) $(top_srcdir)/gpu/nvcc-lt.sh $@ $(NVCC_COMPILE) -c $<

# The Hopper GEMM needs sm_90a (wgmma, setmaxnreg); configure gives it the plain arch, and
# the file builds to a stub that declines, when the backend is not built for sm_90.
gpu/gemm_sm90.lo: $(srcdir)/gpu/gemm_sm90.cu
	$(AM_V_NVCC)$(SHELL) $(top_srcdir)/gpu/nvcc-lt.sh $@ $(NVCC) $(CUDA_SM90A_FLAGS) $(NVCC_FLAGS) -c $(srcdir)/gpu/gemm_sm90.cu

# nvcc writes no dependency files here; name the headers the .cu files include.
gpu_deps = $(top_srcdir)/src/cmoe.h $(top_srcdir)/src/backend/backend.h $(top_srcdir)/src/core/dtype.h config.h \
	$(top_srcdir)/gpu/cuda.h $(top_srcdir)/gpu/gemm.h $(top_srcdir)/gpu/gemm_epi.cuh $(top_srcdir)/gpu/act.cuh $(top_srcdir)/gpu/rng.cuh $(top_srcdir)/gpu/mma.cuh
gpu/device.lo gpu/backend.lo gpu/backend_model.lo gpu/router.lo gpu/plan.lo gpu/select.lo gpu/aux_loss.lo gpu/dispatch.lo \
	gpu/ffn.lo gpu/gemm.lo gpu/attention.lo gpu/rmsnorm.lo gpu/rope.lo gpu/embedding.lo gpu/crossentropy.lo \
	gpu/adamw.lo gpu/moa.lo gpu/flash.lo gpu/gemm_cublas.lo gpu/gemm_sm90.lo: $(gpu_deps)
