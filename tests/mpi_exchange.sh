#!/bin/sh
# The expert-parallel exchange (tests/mpi_exchange.c) under mpirun -np 1, 2 and 4
# (oversubscribed: this machine may have fewer cores), each under a time limit so that a
# hang fails; then cmoe bench a2a on 2 ranks. Exit 77 (skip) only when the build has no MPI.
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
# cmoe bench a2a runs (flat and hier, two chunk counts) and counts the bytes it computes
if mpi_run 2 120 "$cmoe" bench a2a --tokens 256 --d-model 16 --d-ff 16 --iters 2 --chunks 1,2 >"$mpi_tmp/bench" 2>&1 &&
    [ "$(grep -c '^flat\|^hier' "$mpi_tmp/bench")" -eq 4 ]; then
    echo "ok: mpirun -np 2 cmoe bench a2a: $(grep '^flat *1 ' "$mpi_tmp/bench")"
else
    echo "FAIL: mpirun -np 2 cmoe bench a2a (exit $mpi_rc):"
    sed 's/^/    /' "$mpi_tmp/bench" | head -n 12
    fails=$((fails + 1))
fi
[ "$fails" -eq 0 ]
