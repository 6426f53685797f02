bin_PROGRAMS += cmoe
cmoe_SOURCES = \
	src/cli/commands.h \
	src/cli/main.c \
	src/cli/oracle.c
cmoe_LDADD = libcmoe.la
cmoe_SOURCES += src/cli/bench.c src/cli/bench_a2a.c src/cli/check.c
cmoe_LDADD += $(BLAS_LIBS)
# cmoe train, sample, eval and the run directory they share
cmoe_SOURCES += src/cli/run.h src/cli/run.c src/cli/train.h src/cli/train.c src/cli/train_options.c src/cli/train_dist.h src/cli/train_dist.c src/cli/signals.h src/cli/signals.c src/cli/sample.c \
	src/cli/eval.c
cmoe_LDADD += $(JANSSON_LIBS)
# cmoe info and cmoe report; presets by name (./configs, $CMOE_CONFIGS, installed)
cmoe_SOURCES += src/cli/presets.h src/cli/presets.c src/cli/info.c src/cli/report.h src/cli/report.c src/cli/report_metrics.c src/cli/svg.h src/cli/svg.c
cmoe_CPPFLAGS = $(AM_CPPFLAGS) -DCMOE_PKGDATADIR='"$(pkgdatadir)"'
# the model presets, installed so that --preset NAME works outside the source tree
presetsdir = $(pkgdatadir)/configs
dist_presets_DATA = configs/mixtral-8x7b.json configs/mixtral-8x22b.json configs/deepseek-moe-16b.json \
	configs/qwen1.5-moe-a2.7b.json configs/dbrx.json configs/arctic.json configs/gpu-100m.json \
	configs/gpu-1b.json configs/laptop.json configs/tiny.json
EXTRA_DIST += configs/README.md
# cmoe export / import: Hugging Face checkpoints (src/io/hf.h)
cmoe_SOURCES += src/cli/convert.c
# cmoe sweep: runs of cmoe train in child processes, sweep.jsonl, the page and the fit
cmoe_SOURCES += src/cli/sweep.h src/cli/sweep.c src/cli/sweep_spec.c src/cli/sweep_record.c src/cli/sweep_report.c
cmoe_LDADD += $(ZLIB_LIBS)
