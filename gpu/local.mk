# The CUDA backend, built with --with-cuda.
if HAVE_CUDA
libcmoe_la_SOURCES += gpu/device.cu
endif
EXTRA_DIST += gpu/device.cu
