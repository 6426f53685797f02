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
# the language model's non-MoE ops (ref/model_ops.h)
libcmoe_la_SOURCES += ref/model_ops.h ref/embedding.c ref/residual.c ref/rmsnorm.c ref/rope.c \
	ref/attention.c ref/crossentropy.c ref/adamw.c
# mixture of attention heads: its plan ops and the reference layer (ref/moa.h)
libcmoe_la_SOURCES += ref/moa.h ref/moa.c
# the oracle as a backend (backend.h's table over the functions above)
libcmoe_la_SOURCES += ref/ref_backend.h ref/backend.c ref/backend_model.c
