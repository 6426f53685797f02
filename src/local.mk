# core: status, versions, Philox, arenas, routing plans, layer configs, float formats,
# durable writes and bounded inputs
libcmoe_la_SOURCES += \
	src/cmoe.h \
	src/core/dtype.h \
	src/core/dtype.c \
	src/core/durable.h \
	src/core/durable.c \
	src/core/input.h \
	src/core/input.c \
	src/core/status.c \
	src/core/version.c \
	src/core/rng.c \
	src/core/arena.c \
	src/core/plan.c \
	src/core/config.c \
	src/core/config_json.c \
	src/core/finite.c
EXTRA_DIST += cmoe.pc.in
# the backend table and its registry
libcmoe_la_SOURCES += src/backend/backend.h src/backend/registry.c
# every op of a backend against the oracle (cmoe check, the cross-check suites)
libcmoe_la_SOURCES += src/backend/check.h src/backend/check_impl.h src/backend/check.c src/backend/check_model.c
# the cpu backend: fp32, OpenBLAS + OpenMP; one file per op, named as its ref/ twin
libcmoe_la_SOURCES += \
	src/cpu/cpu.h \
	src/cpu/model_ops.h \
	src/cpu/backend.c \
	src/cpu/backend_model.c \
	src/cpu/router.c \
	src/cpu/select.c \
	src/cpu/aux_loss.c \
	src/cpu/ffn.c \
	src/cpu/fastmath.h \
	src/cpu/dispatch.c \
	src/cpu/embedding.c \
	src/cpu/rmsnorm.c \
	src/cpu/rope.c \
	src/cpu/attention.c \
	src/cpu/crossentropy.c \
	src/cpu/adamw.c \
	src/cpu/moa.c
# the MoE layer over the backend table
libcmoe_la_SOURCES += src/layer/moe_layer.h src/layer/moe_layer.c src/layer/exchange.h src/layer/exchange.c
# mixture of attention heads over the backend table (ref/moa.h is its oracle)
libcmoe_la_SOURCES += src/layer/moa.h src/layer/moa.c
# the MoE language model, its optimizer, token sampling, parameter/FLOP/memory counts
libcmoe_la_SOURCES += src/model/model.h src/model/model_impl.h src/model/model.c src/model/layout.c src/model/stats.c src/model/model_config.c src/model/check.c src/model/optim.c \
	src/model/sample.h src/model/sample.c src/model/info.h src/model/info.c
# files: safetensors, checkpoints, Hugging Face export/import, datasets (text, llm.c
# shards, the synthetic generator)
libcmoe_la_SOURCES += src/io/safetensors.h src/io/safetensors.c src/io/safetensors_write.c src/io/checkpoint.h \
	src/io/checkpoint.c src/io/hf.h src/io/hf_config.c src/io/hf.c src/io/rundir.h src/io/rundir.c \
	src/io/rundir_ckpt.c src/io/rundir_metrics.c src/io/train_settings.c src/io/data.h src/io/data_impl.h \
	src/io/data.c src/io/data_load.c src/io/synth.c
# distribution: communicators (MPI or one process), fixed-tree sums, the expert-parallel exchange
libcmoe_la_SOURCES += src/dist/comm.h src/dist/comm.c src/dist/tree.h src/dist/tree.c src/dist/exchange_ep.h \
	src/dist/exchange_ep.c src/dist/dist.h src/dist/dist.c src/dist/groups.h src/dist/groups.c \
	src/dist/dist_io.h src/dist/dist_io.c
