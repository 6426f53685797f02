libcmoe_la_SOURCES += \
	src/cmoe.h \
	src/status.c \
	src/version.c \
	src/rng.c \
	src/arena.c \
	src/plan.c \
	src/config.c \
	src/config_json.c \
	src/safetensors.h \
	src/safetensors.c \
	src/backend.h \
	src/backend_ref.c

EXTRA_DIST += cmoe.pc.in
# datasets: text, llm.c shards, the synthetic generator
libcmoe_la_SOURCES += src/data.h src/data.c src/synth.c
libcmoe_la_SOURCES += \
	src/cpu.h \
	src/backend_cpu.c \
	src/cpu_router.c \
	src/cpu_select.c \
	src/cpu_aux.c \
	src/cpu_experts.c \
	src/cpu_dispatch.c
# the language model's non-MoE ops in fp32 (src/cpu_model_ops.h) and token sampling
libcmoe_la_SOURCES += src/cpu_model_ops.h src/cpu_matmul.c src/cpu_embedding.c src/cpu_residual.c \
	src/cpu_rmsnorm.c src/cpu_rope.c src/cpu_attention.c src/cpu_crossentropy.c src/cpu_adamw.c \
	src/sample.h src/sample.c
# the MoE layer over the backend table
libcmoe_la_SOURCES += src/moe_layer.h src/moe_layer.c
# the language model's ops on each backend (backend.h, the block at the end of the table)
libcmoe_la_SOURCES += src/backend_ref_model.c src/backend_cpu_model.c
# the MoE language model and its optimizer (src/model.h)
libcmoe_la_SOURCES += src/model.h src/model.c src/model_config.c src/optim.c
# parameter, FLOP and memory counts of a model config (cmoe info)
libcmoe_la_SOURCES += src/model_info.h src/model_info.c
# checkpoints of the full training state; Hugging Face export/import
libcmoe_la_SOURCES += src/checkpoint.h src/checkpoint.c src/hf.h src/hf.c
