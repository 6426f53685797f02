#!/bin/sh
# cmoe train under mpirun, end to end (tiny model, 10 steps, --groups 4 everywhere):
#  - bit-identity across layouts: one process, mpirun -np 1, -np 2 --ep 2, -np 4 --ep 4, -np 4 --ep 2
#    (E+D), -np 4 --ep 2 --zero (E+Z), -np 2 --ep 1 (data parallel), hierarchical
#    all-to-all with simulated nodes and 3 chunks, --a2a-chunks auto, messages cut into
#    rounds of 5 rows, and with --accum 2 (E+Z): the same metrics (every loss, gradient norm, expert load and val
#    loss, printed with 17 digits: equal text is equal bits) and the same weights and
#    checkpoint tensors, byte for byte;
#  - resharding: the checkpoint written at step 5 by -np 4 --ep 4 resumes at -np 2 --ep 2
#    and in one process, and steps 6..10 are bitwise the uninterrupted run's; --init-from
#    the one-process run's weights under -np 4 --ep 4 trains as in one process;
#  - refusals, on every rank: an --ep that does not divide the ranks or the experts, a
#    batch that does not split into the groups, groups the ranks do not divide, 3 ranks;
#    ranks started with different settings (named);
#  - faults: a rank killed with SIGKILL ends the job within 30 s, naming the rank; a rank
#    that hangs (SIGSTOP) makes the others give up after CMOE_MPI_TIMEOUT and end the job;
#    SIGTERM stops every rank after the same step with a checkpoint (exit 143).
# Exit 77 (skip) only when the build has no MPI.
: "${top_srcdir:=.}" "${top_builddir:=.}"
. "$top_srcdir/tests/mpi_env.sh"
tmp=$mpi_tmp
fails=0

fail() {
    echo "FAIL: $*"
    fails=$((fails + 1))
}

# the tiny preset with experts that split over 4 ranks (4 and 8 per MoE layer)
sed 's/^    6$/    8/' "$top_srcdir/configs/tiny.json" >"$tmp/tiny8.json"
grep -q '^    8$' "$tmp/tiny8.json" || { echo "mpi_train.sh: could not make the test config"; exit 99; }
common="--config $tmp/tiny8.json --data synth --steps 10 --seed 5 --batch 8 --seq 16 --groups 4 --eval-every 5
    --eval-batches 2 --save-every 5 --keep 0"

# train NP NAME ARGS...: cmoe train on NP ranks (0: no mpirun) into $tmp/NAME
train() {
    np=$1 name=$2
    shift 2
    start=$(date +%s)
    if [ "$np" -eq 0 ]; then
        timeout 120 "$cmoe" train $common --out "$tmp/$name" "$@" >"$tmp/$name.log" 2>&1
        mpi_rc=$?
    else
        mpi_run "$np" 120 "$cmoe" train $common --out "$tmp/$name" "$@" >"$tmp/$name.log" 2>&1
    fi
    if [ "$mpi_rc" -ne 0 ]; then
        fail "$name: exit $mpi_rc"
        tail -n 8 "$tmp/$name.log" | sed 's/^/    /'
        return 1
    fi
    echo "ok: $name ($(($(date +%s) - start)) s): $(grep 'layout:' "$tmp/$name.log" | sed 's/^ *//')"
}

# the metrics without the fields that measure time
metrics() {
    sed -E 's/"(tokens_per_s|step_time_s|elapsed_s)":[^,}]*,?//g' "$1/metrics.jsonl"
}

# the data section of a safetensors file (after the 8-byte length and the JSON header)
tensors() {
    n=$(od -An -t u8 -N 8 "$1" | tr -d ' ')
    tail -c +$((n + 9)) "$1"
}

# same A B WHAT: run B's metrics, weights and last checkpoint are run A's, bit for bit
same() {
    metrics "$tmp/$1" >"$tmp/a.txt"
    metrics "$tmp/$2" >"$tmp/b.txt"
    if ! cmp -s "$tmp/a.txt" "$tmp/b.txt"; then
        fail "$3: metrics differ from $1's"
        diff "$tmp/a.txt" "$tmp/b.txt" | head -n 4 | cut -c1-240
        return
    fi
    for f in model.safetensors ckpt-10.safetensors; do
        tensors "$tmp/$1/$f" >"$tmp/a.bin"
        tensors "$tmp/$2/$f" >"$tmp/b.bin"
        [ -s "$tmp/a.bin" ] && cmp -s "$tmp/a.bin" "$tmp/b.bin" || { fail "$3: $f differs from $1's"; return; }
    done
    echo "ok: $3: the same bits as $1 (losses $(grep -o '"loss":[^,]*' "$tmp/$2/metrics.jsonl" | head -n 2 |
        cut -d: -f2 | tr '\n' ' ')...)"
}

# ---- bit-identity across layouts ------------------------------------------------------------
train 0 one
train 1 np1 && same one np1 "mpirun -np 1"
train 2 ep2 --ep 2 && same one ep2 "-np 2 --ep 2"
train 4 ep4 --ep 4 && same one ep4 "-np 4 --ep 4"
train 4 ed --ep 2 && same one ed "-np 4 --ep 2 (E+D)"
train 4 ez --ep 2 --zero && same one ez "-np 4 --ep 2 --zero (E+Z)"
train 2 dp --ep 1 && same one dp "-np 2 --ep 1 (data parallel)"
train 4 hier --ep 4 --a2a hier --ranks-per-node 2 --a2a-chunks 3 && same one hier "-np 4 --ep 4 hier, 2 nodes, 3 chunks"
train 2 auto --ep 2 --a2a-chunks auto && same one auto "-np 2 --ep 2 --a2a-chunks auto"
grep -q 'a2a-chunks auto: [124] chunk' "$tmp/auto.log" || fail "--a2a-chunks auto did not say what it chose"
train 4 rounds --ep 4 --a2a-max-rows 5 && same one rounds "-np 4 --ep 4, all-to-all messages of 5 rows"
grep -q 'memory per rank: parameters' "$tmp/ez.log" || fail "no memory per rank at the start"
# gradient accumulation chains micro-batches in order, in every layout alike
train 0 one_acc --accum 2 && train 4 ed_acc --ep 2 --accum 2 --zero && same one_acc ed_acc "-np 4 --ep 2 --zero --accum 2"
grep -q 'all-to-all: .* MB sent per rank per step' "$tmp/ed_acc.log" || fail "no all-to-all report at the end"

# ---- resharding: saved at EP 4, resumed at EP 2 and in one process ----------------------------
for to in 2 0; do
    name=reshard$to
    rm -rf "$tmp/$name"
    cp -r "$tmp/ep4" "$tmp/$name"
    start=$(date +%s)
    if [ "$to" -eq 0 ]; then
        timeout 120 "$cmoe" train --resume "$tmp/$name/ckpt-5.safetensors" >"$tmp/$name.log" 2>&1
        mpi_rc=$?
    else
        mpi_run "$to" 120 "$cmoe" train --resume "$tmp/$name/ckpt-5.safetensors" --ep 2 >"$tmp/$name.log" 2>&1
    fi
    if [ "$mpi_rc" -ne 0 ]; then
        fail "resume at $to ranks: exit $mpi_rc"
        tail -n 5 "$tmp/$name.log"
        continue
    fi
    grep -q "resumed from .*ckpt-5.safetensors at step 5" "$tmp/$name.log" || fail "$name: no resume line"
    where="on $to ranks --ep 2"
    [ "$to" -eq 0 ] && where="in one process"
    same one "$name" "saved by -np 4 --ep 4 at step 5, resumed $where ($(($(date +%s) - start)) s)"
done

# ---- --init-from: each shard takes its slice of the whole weights ------------------------------
ia="--init-from $tmp/one --data synth --steps 3 --batch 8 --seq 16 --groups 4 --eval-every 0 --eval-batches 1"
if timeout 60 "$cmoe" train $ia --out "$tmp/if1" >"$tmp/if1.log" 2>&1 &&
    mpi_run 4 60 "$cmoe" train $ia --ep 4 --out "$tmp/if4" >"$tmp/if4.log" 2>&1; then
    metrics "$tmp/if1" >"$tmp/a.txt"
    metrics "$tmp/if4" >"$tmp/b.txt"
    cmp -s "$tmp/a.txt" "$tmp/b.txt" && echo "ok: --init-from under -np 4 --ep 4: the same bits as in one process" ||
        fail "--init-from under -np 4 --ep 4 differs from one process"
else
    fail "--init-from: exit $mpi_rc"
    tail -n 3 "$tmp/if1.log" "$tmp/if4.log" | sed 's/^/    /'
fi

# ---- refusals on every rank ---------------------------------------------------------------------
# refuse RC PATTERN NP ARGS...
refuse() {
    rc=$1 pat=$2 np=$3
    shift 3
    rm -rf "$tmp/refused"
    mpi_run "$np" 60 "$cmoe" train ${config:---config $tmp/tiny8.json} --data synth --steps 2 --batch 8 --seq 16 \
        --out "$tmp/refused" "$@" >"$tmp/refuse.log" 2>&1
    n=$(grep -c -- "$pat" "$tmp/refuse.log")
    if [ "$mpi_rc" -ne "$rc" ] || [ "$n" -ne "$np" ]; then
        fail "-np $np $*: exit $mpi_rc (want $rc), '$pat' said by $n of $np ranks"
        head -n 6 "$tmp/refuse.log" | sed 's/^/    /'
    else
        echo "ok: -np $np $*: refused by every rank: $(grep -m 1 -- "$pat" "$tmp/refuse.log" | cut -c1-150)"
    fi
    [ ! -e "$tmp/refused/config.json" ] || fail "-np $np $*: a refused run wrote its run directory"
}
refuse 2 "does not divide the 2 ranks" 2 --ep 3
config="--preset tiny" refuse 2 "does not divide the 6 experts of layer 2: use one of 1, 2" 4 --ep 4
refuse 2 "does not split into 16 groups" 2 --groups 16
refuse 2 "must be a power of two and a multiple of the 4 ranks" 4 --groups 2
refuse 2 "run 1, 2, 4, 8, ... ranks" 3
rm -rf "$tmp/mismatch"
timeout 60 "$MPIRUN" --oversubscribe --bind-to none -np 1 "$cmoe" train --config "$tmp/tiny8.json" --data synth \
    --steps 2 --batch 8 --seq 16 --out "$tmp/mismatch" --seed 1 : -np 1 "$cmoe" train --config "$tmp/tiny8.json" \
    --data synth --steps 2 --batch 8 --seq 16 --out "$tmp/mismatch" --seed 2 >"$tmp/mismatch.log" 2>&1
rc=$?
if [ "$rc" -ne 0 ] && grep -q "the ranks disagree on the training settings: rank 1 differs from rank 0" \
    "$tmp/mismatch.log"; then
    echo "ok: ranks started with different seeds are refused before training, naming what differs"
else
    fail "ranks with different settings: exit $rc"
    head -n 5 "$tmp/mismatch.log" | sed 's/^/    /'
fi

# ---- faults ----------------------------------------------------------------------------------
# the pid of rank R of the cmoe train writing into run directory DIR
rank_pid() {
    for p in /proc/[0-9]*; do
        tr '\0' '\n' <"$p/cmdline" 2>/dev/null | grep -qx -- "$2" || continue
        tr '\0' '\n' <"$p/environ" 2>/dev/null | grep -qx "OMPI_COMM_WORLD_RANK=$1" && { basename "$p"; return; }
    done
}

# fault SIGNAL NAME: a long run on 2 ranks; rank 1 gets SIGNAL once it trains; the job must
# end non-zero within 30 s of it, and the log must name rank 1
fault() {
    sig=$1 name=$2
    rm -rf "$tmp/$name"
    CMOE_MPI_TIMEOUT=5 "$MPIRUN" --oversubscribe --bind-to none -np 2 "$cmoe" train --config "$tmp/tiny8.json" \
        --data synth --steps 100000 --batch 8 --seq 16 --eval-every 0 --out "$tmp/$name" --ep 2 \
        >"$tmp/$name.log" 2>&1 &
    job=$!
    for i in $(seq 1 100); do
        [ -s "$tmp/$name/metrics.jsonl" ] && break
        sleep 0.2
    done
    pid=$(rank_pid 1 "$tmp/$name")
    if [ -z "$pid" ]; then
        fail "$name: rank 1 not found"
        kill "$job"
        wait "$job"
        return
    fi
    kill -s "$sig" "$pid"
    start=$(date +%s)
    while kill -0 "$job" 2>/dev/null && [ $(($(date +%s) - start)) -lt 40 ]; do
        sleep 0.2
    done
    took=$(($(date +%s) - start))
    if kill -0 "$job" 2>/dev/null; then
        fail "$name: the job still runs 40 s after rank 1 got SIG$sig"
        kill -s KILL "$pid" 2>/dev/null
        kill "$job"
    fi
    wait "$job"
    rc=$?
    if [ "$rc" -ne 0 ] && [ "$took" -le 30 ] && grep -q "rank 1" "$tmp/$name.log"; then
        echo "ok: rank 1 got SIG$sig: the job ended in $took s, exit $rc: $(grep -m 1 'rank 1' "$tmp/$name.log" | cut -c1-160)"
    else
        fail "$name: SIG$sig to rank 1: exit $rc after $took s"
        head -n 8 "$tmp/$name.log" | sed 's/^/    /'
    fi
}
fault KILL killed
fault STOP stopped

# SIGTERM to one rank (as Slurm's --signal reaches each task at its own time): every rank
# stops after the same step, the checkpoint is written, every rank exits 143
rm -rf "$tmp/term"
"$MPIRUN" --oversubscribe --bind-to none -np 2 "$cmoe" train --config "$tmp/tiny8.json" --data synth \
    --steps 100000 --batch 8 --seq 16 --eval-every 0 --out "$tmp/term" --ep 2 >"$tmp/term.log" 2>&1 &
job=$!
for i in $(seq 1 100); do
    [ -s "$tmp/term/metrics.jsonl" ] && break
    sleep 0.2
done
pid=$(rank_pid 1 "$tmp/term")
[ -n "$pid" ] && kill -s TERM "$pid"
wait "$job"
rc=$?
steps=$(awk 'END { print NR }' "$tmp/term/metrics.jsonl")
if [ "$rc" -eq 143 ] && [ -f "$tmp/term/ckpt-$steps.safetensors" ]; then
    echo "ok: SIGTERM to rank 1: both ranks stopped after step $steps, checkpoint written, exit 143"
else
    fail "SIGTERM: exit $rc, checkpoints: $(ls "$tmp/term" | grep ckpt | tr '\n' ' ')"
    tail -n 5 "$tmp/term.log" | sed 's/^/    /'
fi

[ "$fails" -eq 0 ] || { echo "$fails failure(s)"; exit 1; }
