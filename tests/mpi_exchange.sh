#!/bin/sh
# The expert-parallel exchange (tests/mpi_exchange.c) under mpirun -np 1, 2 and 4
# (oversubscribed: this machine may have fewer cores), each under a time limit so that a
# hang fails. Exit 77 (skip) only when the build has no MPI.
: "${top_srcdir:=.}" "${top_builddir:=.}"
. "$top_srcdir/tests/mpi_env.sh"
prog="$top_builddir/tests/mpi_exchange"
[ -x "$prog" ] || { echo "mpi_exchange.sh: $prog is not built (no Check?)"; exit 77; }
fails=0
for np in 1 2 4; do
    start=$(date +%s)
    if mpi_run "$np" 300 "$prog" >"$mpi_tmp/out" 2>&1; then
        echo "ok: mpirun -np $np mpi_exchange ($(($(date +%s) - start)) s): every rank passed; rank 0: $(grep 'Checks:' "$mpi_tmp/out")"
    else
        echo "FAIL: mpirun -np $np mpi_exchange (exit $mpi_rc after $(($(date +%s) - start)) s):"
        grep -v '^$' "$mpi_tmp/out" | head -n 40 | sed 's/^/    /'
        fails=$((fails + 1))
    fi
done
[ "$fails" -eq 0 ]
