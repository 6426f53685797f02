# The CUDA backend, built with --with-cuda. libtool has no CUDA tag, so the
# .cu.lo rule below compiles with nvcc through gpu/nvcc-lt.sh, which writes
# the libtool object that links into libcmoe.la beside the C objects.
SUFFIXES += .cu
if HAVE_CUDA
libcmoe_la_SOURCES += gpu/device.cu
endif
EXTRA_DIST += gpu/device.cu gpu/nvcc-lt.sh

AM_V_NVCC = $(am__v_NVCC_@AM_V@)
am__v_NVCC_ = $(am__v_NVCC_@AM_DEFAULT_V@)
am__v_NVCC_0 = @echo "  NVCC    " $@;
am__v_NVCC_1 =
NVCC_COMPILE = $(NVCC) -arch=$(CUDA_ARCH) $(DEFS) $(DEFAULT_INCLUDES) $(AM_CPPFLAGS) $(CPPFLAGS) $(NVCCFLAGS)

.cu.lo:
	$(AM_V_NVCC)$(SHELL) $(top_srcdir)/gpu/nvcc-lt.sh $@ $(NVCC_COMPILE) -c $<

# nvcc writes no dependency files here; name the headers the .cu files include.
gpu/device.lo: $(top_srcdir)/src/cmoe.h config.h
