bin_PROGRAMS += cmoe
cmoe_SOURCES = \
	src/cli/commands.h \
	src/cli/main.c \
	src/cli/oracle.c
cmoe_LDADD = libcmoe.la
cmoe_SOURCES += src/cli/bench.c
