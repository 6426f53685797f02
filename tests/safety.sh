#!/bin/sh
# cmoe used as a careless user and a cluster scheduler would, checking that it never
# destroys what is not its own (issue 9): each case runs the real command on real files,
# signals, pipes and FIFOs, and checks the exit code, the message, and that every file
# that was there before is unchanged (a listing with types, modes, link targets and
# checksums, before and after).
#  - outputs: character devices (as root a private /dev/null twin, then /dev/null itself),
#    /dev/stdout on a pipe and on a file, a FIFO, /dev/full (disk full), a symlink (followed),
#    a dangling symlink, an output that is an input (also through a hard link);
#  - run directories: not a run, /, export into a run or over its files, a diverged run and
#    a full disk leave nothing behind, two processes on one directory (the lock);
#  - signals: TERM, HUP and INT each stop a run with a checkpoint and exit 128 + signal;
#    a second signal exits at once; a lock left by a killed process is no obstacle;
#  - inputs: a pipe and a FIFO lose no byte (a late writer is waited for), endless devices
#    and oversized configs are refused, a FIFO given as safetensors does not block, gzip
#    with trailing garbage is refused, a torn last metrics line is skipped by report.
# Every wait is bounded (timeout(1), or a loop with a limit); nothing sleeps blindly.
# Run by automake with top_srcdir and top_builddir exported.
: "${top_srcdir:=.}" "${top_builddir:=.}"
cmoe="$top_builddir/cmoe"
[ -x "$cmoe" ] || { echo "safety.sh: $cmoe is not built"; exit 99; }
command -v timeout >/dev/null || { echo "safety.sh: timeout(1) is missing"; exit 99; }
cmoe=$(cd "$(dirname "$cmoe")" && pwd)/$(basename "$cmoe")

tmp=$(mktemp -d "${TMPDIR:-/tmp}/cmoe-safety.XXXXXX") || exit 99
pids=""
cleanup() {
    for p in $pids; do kill -9 "$p" 2>/dev/null; done
    rm -rf "$tmp"
}
trap cleanup EXIT
trap 'exit 1' INT TERM
fails=0
export OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1
root=0
[ "$(id -u)" = 0 ] && root=1

fail() {
    echo "FAIL: $*"
    fails=$((fails + 1))
}

# run RC PATTERN ARGS...: cmoe (at most 60 s) exits RC and its stderr holds PATTERN
run() {
    want=$1 pat=$2
    shift 2
    timeout 60 "$cmoe" "$@" >"$tmp/stdout" 2>"$tmp/stderr"
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

# snap PATH...: every entry under PATH: type, mode, link target, checksum of files
snap() {
    for p in "$@"; do
        find "$p" -printf '%y %m %p -> %l\n' 2>/dev/null
        find "$p" -type f -exec cksum {} + 2>/dev/null
    done | LC_ALL=C sort
}

# unchanged WHAT PATH...: PATH is as snap saw it into $tmp/before
unchanged() {
    what=$1
    shift
    snap "$@" >"$tmp/after"
    cmp -s "$tmp/before" "$tmp/after" || { fail "$what: files changed"; diff "$tmp/before" "$tmp/after" | head; }
}

# lines FILE: its number of lines (0 when absent)
lines() {
    if [ -f "$1" ]; then awk 'END { print NR }' "$1"; else echo 0; fi
}

# wait_lines FILE N: until FILE has N lines; at most 30 s
wait_lines() {
    i=0
    while [ "$(lines "$1")" -lt "$2" ] && [ $i -lt 600 ]; do
        sleep 0.05
        i=$((i + 1))
    done
    [ "$(lines "$1")" -ge "$2" ]
}

tiny="--preset tiny --data synth --batch 2 --seq 8"

# ---- a finished run to read from --------------------------------------------------------
# Mixtral-shaped, so that it can be exported too
cat >"$tmp/mixtral.json" <<'EOF'
{"vocab_size": 32, "hidden_size": 16, "intermediate_size": 24, "moe_intermediate_size": 24,
 "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 4,
 "max_position_embeddings": 64, "num_local_experts": 4, "num_experts_per_tok": 2}
EOF
R="$tmp/run"
run 0 "" train --config "$tmp/mixtral.json" --data synth --batch 2 --seq 8 --steps 6 --eval-every 3 \
    --save-every 3 --out "$R" || exit 1
timeout 60 "$cmoe" oracle --example-inputs "$tmp/in.safetensors" --config "$top_srcdir/examples/layer.json" \
    --tokens 8 --seed 1 >/dev/null || fail "oracle --example-inputs"

# ---- outputs that are devices, FIFOs, symlinks, or inputs -------------------------------------
# System paths are only written once a private twin of each (made here) came through the
# same case unharmed, and are checked (and repaired) afterwards: a regression must fail
# this test, not break the machine it runs on.
#   /dev/null c 1 3, /dev/full c 1 7 (as root: mknod), /dev/stdout -> /proc/self/fd/1
system_ok=1
twin() { # twin NAME: make $tmp/dev/NAME like /dev/NAME; 1 when that cannot be done (not root)
    case $1 in
    null) [ $root = 1 ] && mknod -m 666 "$tmp/dev/null" c 1 3 ;;
    full) [ $root = 1 ] && mknod -m 666 "$tmp/dev/full" c 1 7 ;;
    stdout) ln -s /proc/self/fd/1 "$tmp/dev/stdout" ;;
    esac
}
intact() { # intact PATH NAME: PATH is still what /dev/NAME should be
    case $2 in
    stdout) [ -L "$1" ] && [ "$(readlink "$1")" = /proc/self/fd/1 ] ;;
    *) [ -c "$1" ] ;;
    esac
}
repair() { # repair NAME: /dev/NAME back to what it should be, with a failure
    intact "/dev/$1" "$1" && return
    fail "/dev/$1 was damaged ($(stat -c %F "/dev/$1" 2>/dev/null)); restoring it"
    rm -f "/dev/$1"
    case $1 in
    null) mknod -m 666 /dev/null c 1 3 ;;
    full) mknod -m 666 /dev/full c 1 7 ;;
    stdout) ln -s /proc/self/fd/1 /dev/stdout ;;
    esac
}
# out_cases DIR: every writer into DIR/null, DIR/full, DIR/stdout
out_cases() {
    d=$1
    snap "$R" "$tmp/in.safetensors" >"$tmp/before"
    run 0 "" report "$R" --out "$d/null"
    run 0 "" oracle --config "$top_srcdir/examples/layer.json" --inputs "$tmp/in.safetensors" --out "$d/null"
    run 1 "No space left on device" report "$R" --out "$d/full"
    run 1 "No space left on device" oracle --config "$top_srcdir/examples/layer.json" \
        --inputs "$tmp/in.safetensors" --out "$d/full"
    # stdout on a pipe and on a file: the page arrives, the summary goes to stderr
    timeout 60 "$cmoe" report "$R" --out "$d/stdout" 2>"$tmp/stderr" | cat >"$tmp/piped.html"
    grep -q '</html>' "$tmp/piped.html" && ! grep -q 'MoE layers)' "$tmp/piped.html" &&
        grep -q "cmoe report: $d/stdout" "$tmp/stderr" && echo "ok: report --out $d/stdout into a pipe" ||
        fail "report --out $d/stdout into a pipe"
    timeout 60 "$cmoe" report "$R" --out "$d/stdout" >"$tmp/redirected.html" 2>/dev/null
    grep -q '</html>' "$tmp/redirected.html" && echo "ok: report --out $d/stdout into a file" ||
        fail "report --out $d/stdout into a file"
    unchanged "outputs into $d" "$R" "$tmp/in.safetensors"
}
mkdir "$tmp/dev"
for name in null full stdout; do
    twin $name || ln -s "/dev/$name" "$tmp/dev/$name" # not root: the real one, which only root could harm
done
out_cases "$tmp/dev"
for name in null full stdout; do
    if [ -L "$tmp/dev/$name" ] && [ "$name" != stdout ]; then
        continue
    elif ! intact "$tmp/dev/$name" $name; then
        fail "the twin of /dev/$name is now a $(stat -c %F "$tmp/dev/$name")"
        system_ok=0
    fi
done
if [ $system_ok = 1 ]; then
    out_cases /dev
    for name in null full stdout; do repair $name; done
else
    fail "the cases on /dev/null, /dev/full and /dev/stdout were not run: their twins were harmed"
fi
# a named FIFO: written through, still a FIFO
mkfifo "$tmp/fifo"
timeout 60 cat "$tmp/fifo" >"$tmp/fromfifo" &
run 0 "" report "$R" --out "$tmp/fifo"
wait $!
[ -p "$tmp/fifo" ] && grep -q '</html>' "$tmp/fromfifo" || fail "report --out FIFO"
# a full disk: the error, and the old file as it was
echo "old page" >"$tmp/page.html"
snap "$tmp/page.html" >"$tmp/before.page"
(ulimit -f 1 && trap '' XFSZ && exec timeout 60 "$cmoe" report "$R" --out "$tmp/page.html") >/dev/null 2>"$tmp/stderr"
[ $? -eq 1 ] && grep -q "File too large" "$tmp/stderr" || fail "report into a full file system: $(cat "$tmp/stderr")"
snap "$tmp/page.html" >"$tmp/after.page"
cmp -s "$tmp/before.page" "$tmp/after.page" || fail "a failed write changed the old file"
ls "$tmp" | grep -q 'page.html.tmp' && fail "a failed write left a temporary file"
# symlinks: followed, the link stays a link; a dangling link creates its target
ln -s page.html "$tmp/link.html"
run 0 "" report "$R" --out "$tmp/link.html"
[ -L "$tmp/link.html" ] && grep -q '</html>' "$tmp/page.html" || fail "report --out SYMLINK did not write its target"
ln -s new.html "$tmp/dangling.html"
run 0 "" report "$R" --out "$tmp/dangling.html"
[ -L "$tmp/dangling.html" ] && grep -q '</html>' "$tmp/new.html" || fail "report --out a dangling symlink"
# an output that is an input: compared by device and inode, not by the string
ln "$R/metrics.jsonl" "$tmp/hardlink.jsonl"
snap "$R" >"$tmp/before"
run 1 "is the run's input" report "$R" --out "$R/metrics.jsonl"
run 1 "is the run's input" report "$R" --out "$tmp/hardlink.jsonl"
run 1 "is the run's input" report "$R" --out "$R/../run/train.json"
unchanged "report --out an input" "$R"
rm "$tmp/hardlink.jsonl"
snap "$tmp/in.safetensors" >"$tmp/before"
run 1 "is the --inputs" oracle --config "$top_srcdir/examples/layer.json" --inputs "$tmp/in.safetensors" \
    --out "$tmp/./in.safetensors"
unchanged "oracle --out = --inputs" "$tmp/in.safetensors"

# ---- run directories ------------------------------------------------------------------------
P="$tmp/project"
mkdir -p "$P/src"
echo '{"name": "my project"}' >"$P/config.json"
echo "notes" >"$P/notes.txt"
snap "$P" >"$tmp/before"
run 1 "is not empty and holds no cmoe run" train $tiny --steps 2 --out "$P"
unchanged "train --out a project directory" "$P"
in_root="config.json train.json metrics.jsonl model.safetensors .cmoe.lock"
new_in_root=""
for f in $in_root; do [ -e "/$f" ] || new_in_root="$new_in_root $f"; done
run 1 "is the root directory" train $tiny --steps 2 --out /
for f in $new_in_root; do # a regression must not leave them there
    [ ! -e "/$f" ] || { fail "train --out / wrote /$f"; rm -f "/$f"; }
done
# a sharded Hugging Face checkpoint directory
H="$tmp/hfsharded"
mkdir "$H"
echo '{"model_type": "mixtral"}' >"$H/config.json"
echo '{"weight_map": {}}' >"$H/model.safetensors.index.json"
snap "$H" >"$tmp/before"
run 1 "holds no cmoe run" train $tiny --steps 2 --out "$H"
unchanged "train --out an HF directory" "$H"
# export into a run, into itself, over an existing file
run 0 "" train $tiny --steps 2 --out "$tmp/plain"
snap "$R" "$tmp/plain" >"$tmp/before"
run 1 "is the input" export --format hf "$R" "$R"
run 1 "is the input" export --format hf --force "$R" "$R/."
run 1 "already holds a run" export --format hf "$R" "$tmp/plain"
unchanged "export into a run" "$R" "$tmp/plain"
snap "$H" >"$tmp/before"
run 1 "config.json' already exists" export --format hf "$R" "$H"
unchanged "export over config.json" "$H"
# --force into a directory whose metrics.jsonl links elsewhere: the link is replaced, its
# target not truncated
echo "precious" >"$tmp/precious.txt"
mkdir "$tmp/forced"
ln -s ../precious.txt "$tmp/forced/metrics.jsonl"
snap "$tmp/precious.txt" >"$tmp/before"
run 0 "" train $tiny --steps 2 --force --out "$tmp/forced"
unchanged "train --force over a linked metrics.jsonl" "$tmp/precious.txt"
# a run that diverges, and one that meets a full disk, leave nothing behind (it diverges
# from weights whose LM head holds the largest float: the forward overflows)
. "$top_srcdir/tests/poison.sh"
run 0 "" train $tiny --steps 1 --out "$tmp/huge"
poison "$tmp/huge/model.safetensors" lm_head.weight max || fail "could not poison a copy of the run"
run 1 "training diverged" train --data synth --batch 2 --seq 8 --steps 20 --init-from "$tmp/huge" --out "$tmp/d/deep/diverged"
[ ! -e "$tmp/d" ] || fail "a diverged run left $(find "$tmp/d" | tr '\n' ' ')"
run 0 "" train $tiny --steps 2 --out "$tmp/d/deep/diverged" # no --force needed
mkdir "$tmp/empty"
run 1 "training diverged" train --data synth --batch 2 --seq 8 --steps 20 --init-from "$tmp/huge" --out "$tmp/empty"
[ -d "$tmp/empty" ] && [ -z "$(ls -A "$tmp/empty")" ] || fail "a diverged run left files in an empty directory"
(ulimit -f 1 && trap '' XFSZ && exec timeout 60 "$cmoe" train $tiny --steps 2 --out "$tmp/full/a/b") \
    >/dev/null 2>"$tmp/stderr"
rc=$?
[ $rc -eq 1 ] && grep -q "File too large" "$tmp/stderr" && [ ! -e "$tmp/full" ] &&
    echo "ok: a full disk: exit 1, nothing left behind" || fail "a full disk: exit $rc, $(cat "$tmp/stderr")"

# ---- two processes on one run directory ---------------------------------------------------------
# started together: exactly one trains, the other fails at once; the log stays whole
for trial in 1 2 3; do
    S="$tmp/race$trial"
    timeout 60 "$cmoe" train $tiny --steps 30 --eval-every 0 --out "$S" >"$tmp/r1.out" 2>"$tmp/r1.err" &
    p1=$!
    timeout 60 "$cmoe" train $tiny --steps 30 --eval-every 0 --seed 7 --out "$S" >"$tmp/r2.out" 2>"$tmp/r2.err" &
    p2=$!
    wait $p1
    rc1=$?
    wait $p2
    rc2=$?
    if [ $((rc1 + rc2)) -ne 1 ] || [ $((rc1 * rc2)) -ne 0 ]; then
        fail "race $trial: exits $rc1 and $rc2 (want one 0 and one 1)"
        cat "$tmp/r1.err" "$tmp/r2.err"
    elif ! grep -q "is in use by process\|already holds a run" "$tmp/r1.err" "$tmp/r2.err"; then
        fail "race $trial: the loser does not say why: $(cat "$tmp/r1.err" "$tmp/r2.err")"
    else
        seed=1337
        [ $rc1 -eq 0 ] || seed=7
        [ "$(lines "$S/metrics.jsonl")" -eq 30 ] &&
            [ "$(grep -c '^{"step":[0-9]*,"loss".*}$' "$S/metrics.jsonl")" -eq 30 ] &&
            grep -q "\"seed\": $seed," "$S/train.json" && [ ! -e "$S/.cmoe.lock" ] &&
            echo "ok: race $trial: one run trained (seed $seed), the other was refused" ||
            fail "race $trial: the run directory is mixed up"
    fi
done

# ---- signals --------------------------------------------------------------------------------------
# a long run; TERM, HUP and INT each stop it after a step with the weights and a checkpoint
long="--preset tiny --data synth --steps 1000000 --batch 2 --seq 8 --eval-every 0 --log-every 100000"
for sig in TERM HUP INT; do
    G="$tmp/sig-$sig"
    "$cmoe" train $long --out "$G" >"$tmp/sig.out" 2>&1 &
    pid=$!
    pids="$pids $pid"
    if ! wait_lines "$G/metrics.jsonl" 3; then
        fail "SIG$sig: the run did not start"
        continue
    fi
    # a second writer or a --resume of the running run fails at once, naming it
    run 1 "is in use by process $pid" train --resume "$G"
    kill -$sig $pid
    wait $pid
    rc=$?
    n=$(lines "$G/metrics.jsonl")
    case $sig in HUP) want=129 ;; INT) want=130 ;; *) want=143 ;; esac
    if [ $rc -eq $want ] && [ -f "$G/ckpt-$n.safetensors" ] && [ -f "$G/model.safetensors" ] &&
        grep -q "stopped by signal" "$tmp/sig.out"; then
        echo "ok: SIG$sig after step $n: exit $rc, ckpt-$n.safetensors and the weights"
    else
        fail "SIG$sig: exit $rc (want $want) after $n steps; files: $(ls "$G" | tr '\n' ' ')"
    fi
done
run 0 "" train --resume "$tmp/sig-TERM" --steps $(($(lines "$tmp/sig-TERM/metrics.jsonl") + 2))
# a second signal ends the process at once, in the middle of a step of about a second
G="$tmp/sig-twice"
"$cmoe" train --preset tiny --data synth --steps 1000 --backend ref --batch 16 --seq 64 --accum 40 \
    --eval-every 0 --log-every 1 --out "$G" >"$tmp/sig.out" 2>&1 &
pid=$!
pids="$pids $pid"
if wait_lines "$G/metrics.jsonl" 1; then
    kill -TERM $pid
    # the second once the first has been taken (two at once would merge into one)
    i=0
    while ! grep -q "a second signal stops at once" "$tmp/sig.out" && [ $i -lt 600 ]; do
        sleep 0.05
        i=$((i + 1))
    done
    kill -TERM $pid
    wait $pid 2>/dev/null
    rc=$?
    [ $rc -eq 143 ] && ! grep -q "stopped by signal" "$tmp/sig.out" && ! ls "$G" | grep -q ckpt- &&
        echo "ok: a second SIGTERM: exit 143 at once, no checkpoint" ||
        fail "a second SIGTERM: exit $rc; $(tail -n 2 "$tmp/sig.out")"
    # the lock of a killed process is no obstacle
    [ -e "$G/.cmoe.lock" ] || fail "no stale lock left to test with"
    run 1 "no checkpoint (ckpt-STEP.safetensors)" train --resume "$G"
    run 0 "" train $tiny --steps 2 --force --out "$G"
else
    fail "the slow run did not start"
fi

# ---- inputs: pipes, FIFOs, endless devices, garbage -------------------------------------------------
awk 'BEGIN { for (i = 0; i < 30000; i++) printf "%c", (i * 7 + int(i / 13)) % 31 + 1 }' >"$tmp/text.txt"
size=$(wc -c <"$tmp/text.txt" | tr -d ' ')
gzip -c "$tmp/text.txt" >"$tmp/text.gz"
# tokens_of DIR: train + val tokens of the run's data, from its log line
tokens_of() {
    sed -n 's/.*: \([0-9]*\) train + \([0-9]*\) val tokens.*/\1 \2/p' "$1" | awk '{ print $1 + $2 }' | head -n 1
}
short="--preset tiny --steps 1 --batch 2 --seq 8 --eval-every 0"
cat "$tmp/text.txt" | timeout 60 "$cmoe" train $short --data /dev/stdin --out "$tmp/p1" >"$tmp/stdout" 2>"$tmp/stderr"
[ $? -eq 0 ] && [ "$(tokens_of "$tmp/stdout")" = "$size" ] && echo "ok: a pipe on /dev/stdin: all $size bytes" ||
    fail "a pipe: $(tokens_of "$tmp/stdout") of $size bytes; $(cat "$tmp/stderr")"
mkfifo "$tmp/data.fifo"
(timeout 60 cat "$tmp/text.gz" >"$tmp/data.fifo") &
run 0 "" train $short --data "$tmp/data.fifo" --out "$tmp/p2" && [ "$(tokens_of "$tmp/stdout")" = "$size" ] ||
    fail "gzip through a FIFO: $(tokens_of "$tmp/stdout") of $size bytes"
wait
# a writer that comes after cmoe opened the FIFO: waited for, not taken for an empty file
(sleep 0.5 && timeout 60 cat "$tmp/text.txt" >"$tmp/data.fifo") &
run 0 "" train $short --data "$tmp/data.fifo" --out "$tmp/p3" && [ "$(tokens_of "$tmp/stdout")" = "$size" ] ||
    fail "a late FIFO writer: $(tokens_of "$tmp/stdout") of $size bytes"
wait
run 1 "is a character device" train $short --data /dev/zero --out "$tmp/p4"
[ ! -e "$tmp/p4" ] || fail "a refused dataset left $tmp/p4"
run 1 "is a character device" eval "$R" --data /dev/zero
run 1 "larger than 64 MiB" oracle --config /dev/zero --inputs "$tmp/in.safetensors" --out "$tmp/o.safetensors"
run 1 "larger than 64 MiB" train --config /dev/zero --data synth --out "$tmp/p5"
run 1 "is a directory" train --config "$tmp" --data synth --out "$tmp/p6"
mkfifo "$tmp/in.fifo"
run 1 "is a FIFO" oracle --config "$top_srcdir/examples/layer.json" --inputs "$tmp/in.fifo" --out "$tmp/o.safetensors"
cp -r "$R" "$tmp/zero"
ln -sf /dev/zero "$tmp/zero/metrics.jsonl"
run 1 "must be a regular file" report "$tmp/zero"
cp "$tmp/text.gz" "$tmp/garbage.gz"
printf 'trailing junk' >>"$tmp/garbage.gz"
run 1 "13 bytes of trailing garbage after the gzip data" train $short --data "$tmp/garbage.gz" --out "$tmp/p7"
cp "$tmp/text.gz" "$tmp/padded.gz"
head -c 512 /dev/zero >>"$tmp/padded.gz"
run 0 "" train $short --data "$tmp/padded.gz" --out "$tmp/p8" # zero padding, as gzip(1) takes it
cat "$tmp/text.gz" "$tmp/text.gz" >"$tmp/twice.gz"
run 0 "" train $short --data "$tmp/twice.gz" --out "$tmp/p9" && [ "$(tokens_of "$tmp/stdout")" = $((2 * size)) ] ||
    fail "two gzip members: $(tokens_of "$tmp/stdout") tokens"

# ---- a torn last line of metrics.jsonl --------------------------------------------------------------
T="$tmp/torn"
cp -r "$R" "$T"
printf '{"step":7,"loss":3.' >>"$T/metrics.jsonl"
run 0 "the last line is incomplete" report "$T"
grep -q '6 steps' "$tmp/stdout" || fail "report of a torn log: $(cat "$tmp/stdout")"

if [ "$fails" -ne 0 ]; then
    echo "safety.sh: $fails failure(s)"
    exit 1
fi
echo "safety.sh: all passed"
