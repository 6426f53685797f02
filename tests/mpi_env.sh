# Sourced by the MPI tests: skips (77) when the build has no MPI, and defines
#   mpi_run NP SECONDS PROG ARGS...  runs PROG on NP ranks (oversubscribed) under a time
#                                    limit; its exit status is in $mpi_rc (124: timed out)
#   mpi_tmp                          a scratch directory, removed at exit
cmoe="$top_builddir/cmoe"
[ -x "$cmoe" ] || { echo "$0: $cmoe is not built"; exit 99; }
if ! "$cmoe" --version | grep -q '^MPI: yes'; then
    echo "$0: this build has no MPI (./configure found none): skipped"
    exit 77
fi
MPIRUN=${MPIRUN:-mpirun}
command -v "$MPIRUN" >/dev/null 2>&1 || { echo "$0: the build has MPI but '$MPIRUN' is not found"; exit 99; }
# Open MPI refuses root unless told it is on purpose (CI runs as root).
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
# one thread per rank: the ranks share the cores
export OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1
# a sanitized build: Open MPI's leaks are suppressed by library name (.ci/lsan.supp), which
# needs the slow unwinder to see through the plugins MPI_Finalize unloads
if [ -n "${ASAN_OPTIONS+set}" ]; then
    export ASAN_OPTIONS="$ASAN_OPTIONS:fast_unwind_on_malloc=0"
fi
mpi_tmp=$(mktemp -d "${TMPDIR:-/tmp}/cmoe-mpi.XXXXXX") || exit 99
trap 'rm -rf "$mpi_tmp"' EXIT INT TERM
mpi_rc=0

mpi_run() {
    _np=$1 _limit=$2
    shift 2
    timeout -k 5 "$_limit" "$MPIRUN" --oversubscribe --bind-to none -np "$_np" "$@"
    mpi_rc=$?
    return $mpi_rc
}
