# One Check suite per component. Suites that need hardware that is absent exit 77 (SKIP).
if HAVE_CHECK
TEST_LDADD = libcmoe.la $(CHECK_LIBS)
TEST_CFLAGS = $(AM_CFLAGS) $(CHECK_CFLAGS)
check_suites = \
	tests/test_rng \
	tests/test_arena \
	tests/test_router \
	tests/test_select \
	tests/test_aux \
	tests/test_ffn \
	tests/test_dispatch \
	tests/test_layer \
	tests/test_config \
	tests/test_safetensors \
	tests/test_backend
check_PROGRAMS += $(check_suites)
TESTS += $(check_suites)
tests_test_rng_SOURCES = tests/test_rng.c tests/testutil.h
tests_test_arena_SOURCES = tests/test_arena.c tests/testutil.h
tests_test_router_SOURCES = tests/test_router.c tests/testutil.h
tests_test_select_SOURCES = tests/test_select.c tests/testutil.h
tests_test_aux_SOURCES = tests/test_aux.c tests/testutil.h
tests_test_ffn_SOURCES = tests/test_ffn.c tests/testutil.h
tests_test_dispatch_SOURCES = tests/test_dispatch.c tests/testutil.h
tests_test_layer_SOURCES = tests/test_layer.c tests/testutil.h
tests_test_config_SOURCES = tests/test_config.c tests/testutil.h
tests_test_safetensors_SOURCES = tests/test_safetensors.c tests/testutil.h
tests_test_backend_SOURCES = tests/test_backend.c tests/testutil.h
tests_test_backend_CFLAGS = $(TEST_CFLAGS)
tests_test_backend_LDADD = $(TEST_LDADD)
tests_test_rng_CFLAGS = $(TEST_CFLAGS)
tests_test_rng_LDADD = $(TEST_LDADD)
tests_test_arena_CFLAGS = $(TEST_CFLAGS)
tests_test_arena_LDADD = $(TEST_LDADD)
tests_test_router_CFLAGS = $(TEST_CFLAGS)
tests_test_router_LDADD = $(TEST_LDADD)
tests_test_select_CFLAGS = $(TEST_CFLAGS)
tests_test_select_LDADD = $(TEST_LDADD)
tests_test_aux_CFLAGS = $(TEST_CFLAGS)
tests_test_aux_LDADD = $(TEST_LDADD)
tests_test_ffn_CFLAGS = $(TEST_CFLAGS)
tests_test_ffn_LDADD = $(TEST_LDADD)
tests_test_dispatch_CFLAGS = $(TEST_CFLAGS)
tests_test_dispatch_LDADD = $(TEST_LDADD)
tests_test_layer_CFLAGS = $(TEST_CFLAGS)
tests_test_layer_LDADD = $(TEST_LDADD)
tests_test_config_CFLAGS = $(TEST_CFLAGS)
tests_test_config_LDADD = $(TEST_LDADD)
tests_test_safetensors_CFLAGS = $(TEST_CFLAGS)
tests_test_safetensors_LDADD = $(TEST_LDADD)
endif
# CLI tests are shell scripts run against the built ./cmoe.
TESTS += tests/cli.sh tests/oracle.sh
EXTRA_DIST += tests/cli.sh tests/oracle.sh tests/fixtures
AM_TESTS_ENVIRONMENT = top_srcdir='$(top_srcdir)' top_builddir='$(top_builddir)'; export top_srcdir top_builddir;
# The tests share the machine (make -j, other work): OpenMP threads that spin while they
# wait for a core another process holds make many small parallel regions 100x slower, so
# waiting threads sleep (the results do not depend on it); a value in the environment wins.
AM_TESTS_ENVIRONMENT += OMP_WAIT_POLICY=$${OMP_WAIT_POLICY:-passive}; export OMP_WAIT_POLICY;
if HAVE_CHECK
check_PROGRAMS += tests/test_data
TESTS += tests/test_data
tests_test_data_SOURCES = tests/test_data.c tests/testutil.h
tests_test_data_CFLAGS = $(TEST_CFLAGS)
tests_test_data_LDADD = $(TEST_LDADD) $(ZLIB_LIBS)
endif
if HAVE_CHECK
check_PROGRAMS += tests/test_model_ops tests/test_cpu_model_ops
TESTS += tests/test_model_ops tests/test_cpu_model_ops
tests_test_model_ops_SOURCES = tests/test_model_ops.c tests/testutil.h
tests_test_model_ops_CFLAGS = $(TEST_CFLAGS)
tests_test_model_ops_LDADD = $(TEST_LDADD)
tests_test_cpu_model_ops_SOURCES = tests/test_cpu_model_ops.c tests/testutil.h
tests_test_cpu_model_ops_CFLAGS = $(TEST_CFLAGS)
tests_test_cpu_model_ops_LDADD = $(TEST_LDADD)
endif
# the cpu backend against ref, op by op and layer by layer
if HAVE_CHECK
check_PROGRAMS += tests/test_cpu
TESTS += tests/test_cpu
tests_test_cpu_SOURCES = tests/test_cpu.c tests/testutil.h
tests_test_cpu_CFLAGS = $(TEST_CFLAGS)
tests_test_cpu_LDADD = $(TEST_LDADD)
endif
if HAVE_CHECK
check_PROGRAMS += tests/test_cpu_layer
TESTS += tests/test_cpu_layer
tests_test_cpu_layer_SOURCES = tests/test_cpu_layer.c tests/testutil.h
tests_test_cpu_layer_CFLAGS = $(TEST_CFLAGS)
tests_test_cpu_layer_LDADD = $(TEST_LDADD)
endif
# cmoe train, sample, eval end to end (tiny runs)
TESTS += tests/train.sh
EXTRA_DIST += tests/train.sh tests/poison.sh
# the language model and its optimizer: cpu vs ref, finite differences, training, decode
if HAVE_CHECK
check_PROGRAMS += tests/test_model
TESTS += tests/test_model
tests_test_model_SOURCES = tests/test_model.c tests/testutil.h
tests_test_model_CFLAGS = $(TEST_CFLAGS)
tests_test_model_LDADD = $(TEST_LDADD)
endif
# sampling within the trained context: a small model trained on Brown, read past 2x its seq
if HAVE_CHECK
check_PROGRAMS += tests/test_sample
TESTS += tests/test_sample
tests_test_sample_SOURCES = tests/test_sample.c tests/testutil.h
tests_test_sample_CFLAGS = $(TEST_CFLAGS)
tests_test_sample_LDADD = $(TEST_LDADD)
endif
# cmoe info's counts; cmoe report on a fixture run (and its bad inputs)
if HAVE_CHECK
check_PROGRAMS += tests/test_info
TESTS += tests/test_info
tests_test_info_SOURCES = tests/test_info.c tests/testutil.h
tests_test_info_CFLAGS = $(TEST_CFLAGS)
tests_test_info_LDADD = $(TEST_LDADD)
endif
TESTS += tests/report.sh
EXTRA_DIST += tests/report.sh
# checkpoints: bitwise save/restore/continue on cpu and ref, crafted bad files; cmoe train --resume
# end to end; Hugging Face export/import
if HAVE_CHECK
check_PROGRAMS += tests/test_checkpoint tests/test_hf tests/test_hf_config
TESTS += tests/test_checkpoint tests/test_hf tests/test_hf_config
tests_test_checkpoint_SOURCES = tests/test_checkpoint.c tests/testutil.h
tests_test_checkpoint_CFLAGS = $(TEST_CFLAGS) $(JANSSON_CFLAGS)
tests_test_checkpoint_LDADD = $(TEST_LDADD) $(JANSSON_LIBS)
tests_test_hf_SOURCES = tests/test_hf.c tests/testutil.h
tests_test_hf_CFLAGS = $(TEST_CFLAGS) $(JANSSON_CFLAGS)
tests_test_hf_LDADD = $(TEST_LDADD) $(JANSSON_LIBS)
tests_test_hf_config_SOURCES = tests/test_hf_config.c tests/testutil.h
tests_test_hf_config_CFLAGS = $(TEST_CFLAGS) $(JANSSON_CFLAGS)
tests_test_hf_config_LDADD = $(TEST_LDADD) $(JANSSON_LIBS)
endif
TESTS += tests/resume.sh tests/hf.sh
EXTRA_DIST += tests/resume.sh tests/hf.sh tests/hf_reference.py
# the exchange (loopback = local, bit for bit) and bit-identity at any thread count
if HAVE_CHECK
check_PROGRAMS += tests/test_exchange tests/test_determinism
TESTS += tests/test_exchange tests/test_determinism
tests_test_exchange_SOURCES = tests/test_exchange.c tests/testutil.h
tests_test_exchange_CFLAGS = $(TEST_CFLAGS)
tests_test_exchange_LDADD = $(TEST_LDADD)
tests_test_determinism_SOURCES = tests/test_determinism.c tests/testutil.h
tests_test_determinism_CFLAGS = $(TEST_CFLAGS)
tests_test_determinism_LDADD = $(TEST_LDADD)
endif
# never destroying what is not cmoe's: outputs that are devices, FIFOs, symlinks or inputs,
# run directories and their lock, signals, pipes and unbounded inputs (issue 9)
TESTS += tests/safety.sh
EXTRA_DIST += tests/safety.sh
# the durable write and bounded inputs (core/), the run directory (io/rundir.h)
if HAVE_CHECK
check_PROGRAMS += tests/test_durable tests/test_rundir
TESTS += tests/test_durable tests/test_rundir
tests_test_durable_SOURCES = tests/test_durable.c tests/testutil.h
tests_test_durable_CFLAGS = $(TEST_CFLAGS)
tests_test_durable_LDADD = $(TEST_LDADD)
tests_test_rundir_SOURCES = tests/test_rundir.c tests/testutil.h
tests_test_rundir_CFLAGS = $(TEST_CFLAGS)
tests_test_rundir_LDADD = $(TEST_LDADD)
endif
# the cuda backend (gpu/) against ref and cpu; exits 77 (SKIP) without a build or a device
if HAVE_CHECK
check_PROGRAMS += tests/test_cuda tests/test_check
TESTS += tests/test_cuda tests/test_check
tests_test_cuda_SOURCES = tests/test_cuda.c tests/testutil.h
tests_test_cuda_CFLAGS = $(TEST_CFLAGS)
tests_test_cuda_LDADD = $(TEST_LDADD)
tests_test_check_SOURCES = tests/test_check.c tests/testutil.h
tests_test_check_CFLAGS = $(TEST_CFLAGS)
tests_test_check_LDADD = $(TEST_LDADD)
endif
TESTS += tests/cuda.sh
EXTRA_DIST += tests/cuda.sh
# expert parallelism over MPI (src/dist/): the exchange against one process, bit for bit,
# under mpirun -np 1, 2, 4 (skipped only when the build has no MPI)
if HAVE_CHECK
check_PROGRAMS += tests/mpi_exchange
tests_mpi_exchange_SOURCES = tests/mpi_exchange.c tests/testutil.h
tests_mpi_exchange_CFLAGS = $(TEST_CFLAGS)
tests_mpi_exchange_LDADD = $(TEST_LDADD)
endif
# cmoe train under mpirun: the same bits in every layout, resharding, refusals, faults
TESTS += tests/mpi_exchange.sh tests/mpi_train.sh
EXTRA_DIST += tests/mpi_exchange.sh tests/mpi_train.sh tests/mpi_env.sh
AM_TESTS_ENVIRONMENT += MPIRUN='$(MPIRUN)'; export MPIRUN;
# groups in one process: a rank's rows of a batch, the fixed tree, the expert-parallel
# exchange on one rank, --groups training bit-identical across threads and with ZeRO-1
if HAVE_CHECK
check_PROGRAMS += tests/test_groups
TESTS += tests/test_groups
tests_test_groups_SOURCES = tests/test_groups.c tests/testutil.h
tests_test_groups_CFLAGS = $(TEST_CFLAGS)
tests_test_groups_LDADD = $(TEST_LDADD)
endif
# cmoe sweep: a two-run sweep end to end, resume of an interrupted sweep (TERM, kill -9), the
# equal-FLOPs steps of a budget, bad specs named by their key
TESTS += tests/sweep.sh
EXTRA_DIST += tests/sweep.sh
# mixture of attention heads: the oracle by finite differences, its ops, cpu against ref, the
# composed layer against the oracle on ref and cpu, decode
if HAVE_CHECK
check_PROGRAMS += tests/test_moa
TESTS += tests/test_moa
tests_test_moa_SOURCES = tests/test_moa.c tests/testutil.h
tests_test_moa_CFLAGS = $(TEST_CFLAGS)
tests_test_moa_LDADD = $(TEST_LDADD)
endif
if HAVE_CHECK
check_PROGRAMS += tests/test_moa_model
TESTS += tests/test_moa_model
tests_test_moa_model_SOURCES = tests/test_moa_model.c tests/testutil.h
tests_test_moa_model_CFLAGS = $(TEST_CFLAGS)
tests_test_moa_model_LDADD = $(TEST_LDADD)
endif
