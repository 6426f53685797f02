#!/bin/sh
# cmoe train --save-every / --keep / --resume end to end:
#  - on cpu and on ref: a run of 20 (ref: 8) steps saves a checkpoint half way; a copy
#    resumed from that checkpoint writes steps 11..20 whose metrics (loss, ce, aux, lr,
#    grad_norm, val_loss, expert loads — all but the timings) are byte for byte the
#    uninterrupted run's; the losses are printed with 17 significant digits, so equal
#    text is equal bits;
#  - a crash after the checkpoint (later checkpoint gone, metrics.jsonl with more steps
#    and a torn last line): --resume DIR picks the newest checkpoint and still matches;
#  - --steps extends a finished run, other settings are refused with --resume;
#  - broken checkpoints (CRC, truncation, another model's, weights-only, none at all)
#    are refused with their message and leave every file of the run directory as it was.
# Run by automake with top_srcdir and top_builddir exported.
: "${top_srcdir:=.}" "${top_builddir:=.}"
cmoe="$top_builddir/cmoe"
[ -x "$cmoe" ] || { echo "resume.sh: $cmoe is not built"; exit 99; }

tmp=$(mktemp -d "${TMPDIR:-/tmp}/cmoe-resume.XXXXXX") || exit 99
trap 'rm -rf "$tmp"' EXIT INT TERM
fails=0
export OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1

fail() {
    echo "FAIL: $*"
    fails=$((fails + 1))
}

# run RC PATTERN ARGS...: cmoe exits RC and its stderr holds PATTERN
run() {
    want=$1 pat=$2
    shift 2
    "$cmoe" "$@" >"$tmp/stdout" 2>"$tmp/stderr"
    rc=$?
    if [ "$rc" -ne "$want" ]; then
        fail "cmoe $*: exit $rc, want $want"
        tail -n 5 "$tmp/stdout" "$tmp/stderr" | sed 's/^/    /'
        return 1
    fi
    if [ -n "$pat" ] && ! grep -q -- "$pat" "$tmp/stderr"; then
        fail "cmoe $*: stderr lacks '$pat':"
        sed 's/^/    /' "$tmp/stderr"
        return 1
    fi
    echo "ok: exit $rc: cmoe $*"
}

# metrics of the steps after FROM, without the fields that measure time
after() {
    sed -E 's/"(tokens_per_s|step_time_s|elapsed_s)":[^,}]*,?//g' "$1" |
        awk -v from="$2" '{ if (match($0, /"step":[0-9]+/) && substr($0, RSTART + 7, RLENGTH - 7) + 0 > from) print }'
}

losses() {
    grep -o '"step":[0-9]*,"loss":[^,]*' "$1" | awk -v from="$2" -F'[:,]' '$2 + 0 > from { print $2, $4 }'
}

# same_after A B FROM WHAT: steps after FROM of run B equal run A's
same_after() {
    after "$1/metrics.jsonl" "$3" >"$tmp/a.txt"
    after "$2/metrics.jsonl" "$3" >"$tmp/b.txt"
    n=$(wc -l <"$tmp/a.txt" | tr -d ' ')
    [ "$n" -gt 0 ] || { fail "$4: no steps after $3 in $1"; return; }
    if cmp -s "$tmp/a.txt" "$tmp/b.txt"; then
        echo "ok: $4: the $n steps after step $3 are bitwise the uninterrupted run's (loss %.17g):"
        losses "$2/metrics.jsonl" "$3" | head -n 3 | sed 's/^/    step, loss: /'
    else
        fail "$4: steps after $3 differ from the uninterrupted run"
        diff "$tmp/a.txt" "$tmp/b.txt" | head -n 6 | cut -c1-200
    fi
    k=$(awk 'END { print NR }' "$2/metrics.jsonl")
    [ "$k" -eq "$(awk 'END { print NR }' "$1/metrics.jsonl")" ] || fail "$4: metrics.jsonl has $k lines"
}

sums() {
    (cd "$1" && find . -type f | LC_ALL=C sort | xargs cksum)
}

# ---- bitwise resume on cpu and ref -----------------------------------------------------
for backend in cpu ref; do
    if [ $backend = cpu ]; then steps=20 half=10; else steps=8 half=4; fi
    A="$tmp/$backend-A" B="$tmp/$backend-B"
    run 0 "" train --preset tiny --data synth --steps $steps --batch 4 --seq 16 --eval-every 5 --eval-batches 2 \
        --save-every $half --backend $backend --out "$A" || continue
    [ -f "$A/ckpt-$half.safetensors" ] && [ -f "$A/ckpt-$steps.safetensors" ] ||
        fail "$backend: checkpoints ckpt-$half and ckpt-$steps missing"
    cp -r "$A" "$B"
    run 0 "" train --resume "$B/ckpt-$half.safetensors" || continue
    grep -q "resumed from $B/ckpt-$half.safetensors at step $half" "$tmp/stdout" || fail "$backend: no resume line"
    grep -q "\"resumed_from\"" "$B/train.json" || fail "$backend: train.json does not say it was resumed"
    same_after "$A" "$B" $half "resume on $backend"
done

# ---- a crash after the checkpoint: --resume DIR -------------------------------------------
A="$tmp/cpu-A" C="$tmp/crash"
cp -r "$A" "$C"
rm "$C/ckpt-20.safetensors" "$C/model.safetensors"
head -n 13 "$A/metrics.jsonl" >"$C/metrics.jsonl"
printf '{"step":14,"loss":3.' >>"$C/metrics.jsonl"   # torn by the crash
run 0 "" train --resume "$C"
grep -q "resumed from $C/ckpt-10.safetensors at step 10" "$tmp/stdout" || fail "--resume DIR did not pick ckpt-10"
same_after "$A" "$C" 10 "resume after a crash"

# ---- keep, extend, refuse ----------------------------------------------------------------
K="$tmp/keep"
run 0 "" train --preset tiny --data synth --steps 12 --batch 2 --seq 8 --eval-every 0 --save-every 3 --keep 2 \
    --out "$K"
n=$(ls "$K" | grep -c '^ckpt-')
[ "$n" -eq 2 ] && [ -f "$K/ckpt-9.safetensors" ] && [ -f "$K/ckpt-12.safetensors" ] ||
    fail "--keep 2 kept $(ls "$K" | grep '^ckpt-' | tr '\n' ' ')"
run 0 "" train --resume "$K"
grep -q "is complete at step 12" "$tmp/stdout" || fail "resuming a finished run should say it is complete"
run 0 "" train --resume "$K" --steps 15 --keep 0
[ "$(awk 'END { print NR }' "$K/metrics.jsonl")" -eq 15 ] || fail "--steps 15 did not extend the run to 15 steps"
[ -f "$K/ckpt-15.safetensors" ] || fail "no checkpoint at the new end"
run 2 "cannot be given with --resume" train --resume "$K" --lr 0.1
# --data may name the same data again (it is checked by what it is), not other data
sums "$K" >"$tmp/before"
run 1 "the data changed since the checkpoint: synth:tasks=4,vocab=32,seed=1,val=64 -> synth:tasks=2" \
    train --resume "$K" --steps 16 --data synth:tasks=2
sums "$K" >"$tmp/after"
cmp -s "$tmp/before" "$tmp/after" || fail "a refused --data changed the run directory"
run 1 "beyond --steps" train --resume "$K" --steps 5

# ---- the data is what it is, not how its path was typed ------------------------------------------
# trained with a relative path, resumed from another directory: the same file (it used to
# fail, comparing 'text.txt' with '/.../text.txt'); then moved (--data names it again);
# then changed, which is refused naming what differs
P="$tmp/proj"
mkdir -p "$P"
awk 'BEGIN { for (i = 0; i < 20000; i++) printf "%c", (i * 7 + int(i / 13)) % 31 + 1 }' >"$P/text.txt"
cmoe_abs=$(cd "$(dirname "$cmoe")" && pwd)/$(basename "$cmoe")
if (cd "$P" && "$cmoe_abs" train --preset tiny --data text.txt --steps 4 --batch 2 --seq 8 --eval-every 0 \
    --save-every 2 --out run >/dev/null 2>&1); then
    (cd / && "$cmoe_abs" train --resume "$P/run" --steps 6 >"$tmp/stdout" 2>"$tmp/stderr") &&
        echo "ok: a run trained on a relative path resumes from another directory" ||
        { fail "resume from another directory: $(cat "$tmp/stderr")"; }
    mv "$P/text.txt" "$P/moved.txt"
    run 0 "" train --resume "$P/run" --steps 8 --data "$P/moved.txt"
    grep -q "\"data\": \"$P/moved.txt\"" "$P/run/train.json" || fail "train.json does not name the moved data"
    printf '\001' >>"$P/moved.txt"
    run 1 "the data changed since the checkpoint: size 20000 -> 20001 bytes, CRC-32 [0-9a-f]* -> [0-9a-f]*" \
        train --resume "$P/run" --steps 10
else
    fail "could not train on $P/text.txt"
fi
# the issue's own steps: a run on the default data (datasets/brown, found from the source tree)
# resumes, both from there and from another directory
D="$tmp/default-data"
src_abs=$(cd "$top_srcdir" && pwd)
sed 's/"vocab_size": *[0-9]*/"vocab_size": 256/' "$top_srcdir/configs/tiny.json" >"$tmp/tiny256.json"
if (cd "$src_abs" && "$cmoe_abs" train --config "$tmp/tiny256.json" --steps 2 --batch 2 --seq 8 --eval-every 0 --save-every 1 \
    --out "$D" >/dev/null 2>&1); then
    (cd "$src_abs" && "$cmoe_abs" train --resume "$D" --steps 3 >"$tmp/stdout" 2>"$tmp/stderr") &&
        (cd / && "$cmoe_abs" train --resume "$D" --steps 4 >>"$tmp/stdout" 2>>"$tmp/stderr") &&
        echo "ok: a run on the default data resumes from the source tree and from another directory" ||
        fail "resume of a run on the default data: $(cat "$tmp/stderr")"
else
    fail "could not train on the default data from $src_abs"
fi

# ---- Ctrl-C writes a checkpoint of the step it stopped after ---------------------------------
G="$tmp/sigint"
"$cmoe" train --preset tiny --data synth --steps 1000000 --batch 2 --seq 8 --eval-every 0 --log-every 1000 \
    --out "$G" >"$tmp/sigint.out" 2>&1 &
pid=$!
i=0
while [ "$(cat "$G/metrics.jsonl" 2>/dev/null | wc -l)" -lt 5 ] && [ $i -lt 300 ]; do
    sleep 0.1
    i=$((i + 1))
done
kill -INT $pid
wait $pid
rc=$?
n=$(awk 'END { print NR }' "$G/metrics.jsonl")
if [ $rc -eq 130 ] && [ -f "$G/ckpt-$n.safetensors" ]; then
    echo "ok: Ctrl-C after step $n: exit 130 and ckpt-$n.safetensors"
    run 0 "" train --resume "$G" --steps $((n + 2))
    [ "$(awk 'END { print NR }' "$G/metrics.jsonl")" -eq $((n + 2)) ] || fail "the interrupted run did not continue"
else
    fail "Ctrl-C: exit $rc (want 130), checkpoints: $(ls "$G" | grep ckpt- | tr '\n' ' ') after $n steps"
fi

# ---- broken checkpoints leave the run as it was ------------------------------------------------
D="$tmp/broken"
cp -r "$A" "$D"
rm "$D/ckpt-20.safetensors"
ck="$D/ckpt-10.safetensors"
cp "$ck" "$tmp/good.safetensors"
# bad NAME PATTERN: `cmoe train --resume D` fails with PATTERN, every file of D unchanged
bad() {
    sums "$D" >"$tmp/before"
    run 1 "$2" train --resume "$D"
    sums "$D" >"$tmp/after"
    cmp -s "$tmp/before" "$tmp/after" || { fail "$1: the run directory changed"; diff "$tmp/before" "$tmp/after"; }
    cp "$tmp/good.safetensors" "$ck"
}
size=$(wc -c <"$ck" | tr -d ' ')
off=$((size - 9))
byte=$(od -An -tu1 -j $off -N1 "$ck" | tr -d ' ')
printf "$(printf '\\%03o' $(((byte + 1) % 256)))" | dd of="$ck" bs=1 seek=$off conv=notrunc 2>/dev/null
bad "flipped byte" "CRC-32 mismatch"
head -c $((size - 1000)) "$tmp/good.safetensors" >"$ck"
bad "truncated" "file truncated"
head -c 5 "$tmp/good.safetensors" >"$ck"
bad "five bytes" "too short"
cp "$D/model.safetensors" "$ck"
bad "weights only" "a weights-only file"
sed 's/"moe_intermediate_size": 16/"moe_intermediate_size": 24/' "$A/config.json" >"$tmp/other.json"
run 0 "" train --config "$tmp/other.json" --data synth --steps 2 --batch 2 --seq 8 --save-every 2 --out "$tmp/other"
# a newer checkpoint that fails (here another model's) is named and skipped for the newest
# valid one; named as the exact file, it is refused
E="$tmp/fallback"
cp -r "$D" "$E"
cp "$tmp/other/ckpt-2.safetensors" "$E/ckpt-30.safetensors"
sums "$E" >"$tmp/before"
run 1 "does not match the run's config.json" train --resume "$E/ckpt-30.safetensors"
sums "$E" >"$tmp/after"
cmp -s "$tmp/before" "$tmp/after" || fail "a refused checkpoint file changed the run directory"
run 0 "" train --resume "$E"
grep -q "skipped a checkpoint that failed: $E/ckpt-30.safetensors: the checkpoint's config does not match" \
    "$tmp/stdout" || fail "the failed newer checkpoint was not named with its reason"
grep -q "continuing from the newest valid one, $E/ckpt-10.safetensors" "$tmp/stdout" &&
    grep -q "resumed from $E/ckpt-10.safetensors at step 10" "$tmp/stdout" || fail "did not fall back to ckpt-10"
same_after "$A" "$E" 10 "resume past a bad newer checkpoint"
cp "$tmp/good.safetensors" "$tmp/keep.safetensors"
rm "$ck"
bad "no checkpoint" "no checkpoint (ckpt-STEP.safetensors)"
run 1 "No such file" train --resume "$tmp/nothere"

if [ "$fails" -ne 0 ]; then
    echo "resume.sh: $fails failure(s)"
    exit 1
fi
echo "resume.sh: all passed"
