# The oracle: plain C11 + OpenMP, double precision, part of libcmoe.
libcmoe_la_SOURCES += \
	ref/ref.h \
	ref/matmul.c \
	ref/router.c \
	ref/select.c \
	ref/aux_loss.c \
	ref/ffn.c \
	ref/dispatch.c \
	ref/moe_layer.c
