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
