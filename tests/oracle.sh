#!/bin/sh
# cmoe oracle: exit codes, messages, example inputs, and the committed fixtures
# (tests/fixtures/oracle_*), compared tensor by tensor with the expected outputs.
# Run by automake with top_srcdir and top_builddir exported.
: "${top_srcdir:=.}" "${top_builddir:=.}"
cmoe="$top_builddir/cmoe"
fix="$top_srcdir/tests/fixtures"
layer="$top_srcdir/examples/layer.json"
[ -r "$layer" ] || layer="$fix/oracle_topk.json"

tmp=$(mktemp -d "${TMPDIR:-/tmp}/cmoe-oracle.XXXXXX") || exit 99
trap 'rm -rf "$tmp"' EXIT INT TERM
fails=0

fail() {
    echo "FAIL: $*"
    fails=$((fails + 1))
}

# expect RC STDERR-PATTERN ARGS...: exit status RC, and stderr matches the pattern
expect() {
    want=$1 pat=$2
    shift 2
    "$cmoe" oracle "$@" >"$tmp/stdout" 2>"$tmp/stderr"
    rc=$?
    if [ "$rc" -ne "$want" ]; then
        fail "cmoe oracle $*: exit $rc, want $want"
        sed 's/^/    /' "$tmp/stderr"
    elif [ -n "$pat" ] && ! grep -q -- "$pat" "$tmp/stderr"; then
        fail "cmoe oracle $*: stderr lacks '$pat':"
        sed 's/^/    /' "$tmp/stderr"
    else
        echo "ok: exit $rc: cmoe oracle $*"
    fi
}

# the quickstart: example inputs, then the oracle on them
expect 0 "" --example-inputs "$tmp/in.safetensors" --config "$layer" --tokens 32 --seed 7
expect 0 "" --config "$layer" --inputs "$tmp/in.safetensors" --out "$tmp/out.safetensors"
grep -q "dropped" "$tmp/stdout" || fail "the summary does not report drops"
[ -s "$tmp/out.safetensors" ] || fail "no output file"
ls "$tmp" | grep -q "out.safetensors.tmp" && fail "a temporary file was left behind"
expect 0 "" --config "$layer" --inputs "$tmp/in.safetensors" --out "$tmp/out2.safetensors" --eval --step 9
expect 0 "" --help

# NaN or Inf in x, dy or a parameter: refused by name, unless --allow-nonfinite
. "$top_srcdir/tests/poison.sh"
for t in x dy router.weight; do
    cp "$tmp/in.safetensors" "$tmp/bad.safetensors" && poison "$tmp/bad.safetensors" "$t" inf || fail "poison $t"
    expect 1 "'$t' is not finite: element 0 (of [0-9]*) is inf (--allow-nonfinite runs on it anyway)" \
        --config "$layer" --inputs "$tmp/bad.safetensors" --out "$tmp/bad-out.safetensors"
    [ -e "$tmp/bad-out.safetensors" ] && fail "a refused run wrote its output"
done
cp "$tmp/in.safetensors" "$tmp/nan.safetensors" && poison "$tmp/nan.safetensors" x nan || fail "poison x"
expect 1 "input 'x' is not finite: element 0 (of [0-9]*) is nan" --config "$layer" --inputs "$tmp/nan.safetensors" \
    --out "$tmp/nan-out.safetensors"
expect 0 "" --config "$layer" --inputs "$tmp/nan.safetensors" --out "$tmp/nan-out.safetensors" --allow-nonfinite
[ -s "$tmp/nan-out.safetensors" ] || fail "--allow-nonfinite wrote no output"
expect 2 "--example-inputs" --example-inputs "$tmp/x.safetensors" --config "$layer" --tokens 4 --allow-nonfinite

# messages that say what is wrong: a directory as config, task ids without tasks, a layer
# too large for the machine (refused before allocating, naming bytes, keys and tensor)
expect 1 "is a directory, not a file" --config "$tmp" --inputs "$tmp/in.safetensors" --out "$tmp/x.safetensors"
sed '0,/{/s//{"num_tasks": 3, /' "$layer" >"$tmp/tasks.json"
expect 0 "" --example-inputs "$tmp/tasks.safetensors" --config "$tmp/tasks.json" --tokens 32 --seed 3
expect 1 "the config has no tasks (num_tasks = 0)" --config "$layer" --inputs "$tmp/tasks.safetensors" \
    --out "$tmp/x.safetensors"
echo '{"hidden_size": 65536, "intermediate_size": 1048576, "num_local_experts": 64}' >"$tmp/huge.json"
expect 1 "layer (hidden_size 65536, intermediate_size 1048576, num_local_experts 64, 4 tokens): arena: .* elements of 8 bytes (.* GiB) are more than this machine's memory (.* GiB); the largest tensor is 'experts.w1' \[64, 65536, 1048576\]" \
    --example-inputs "$tmp/huge-in.safetensors" --config "$tmp/huge.json" --tokens 4

# usage errors: 2
expect 2 "unknown option '--bogus'" --bogus
expect 2 "--config" --inputs "$tmp/in.safetensors" --out "$tmp/x.safetensors"
expect 2 "--out" --config "$layer" --inputs "$tmp/in.safetensors"
expect 2 "--inputs" --config "$layer" --out "$tmp/x.safetensors"
expect 2 "needs an argument" --config
expect 2 "--step" --config "$layer" --inputs "$tmp/in.safetensors" --out "$tmp/x.safetensors" --step 1x
expect 2 "--tokens" --example-inputs "$tmp/x.safetensors" --config "$layer" --tokens -3
expect 2 "unexpected argument" --config "$layer" --inputs "$tmp/in.safetensors" --out "$tmp/x.safetensors" stray

# failures: 1, with the reason on stderr
echo '{"hidden_size": 64, "router": "top3"}' >"$tmp/bad.json"
expect 1 "router" --config "$tmp/bad.json" --inputs "$tmp/in.safetensors" --out "$tmp/x.safetensors"
echo '{"hidden_size": 64,' >"$tmp/broken.json"
expect 1 "invalid JSON" --config "$tmp/broken.json" --inputs "$tmp/in.safetensors" --out "$tmp/x.safetensors"
expect 1 "cannot open" --config "$tmp/missing.json" --inputs "$tmp/in.safetensors" --out "$tmp/x.safetensors"
expect 1 "cannot open" --config "$layer" --inputs "$tmp/missing.safetensors" --out "$tmp/x.safetensors"
head -c 200 "$tmp/in.safetensors" >"$tmp/trunc.safetensors"
expect 1 "header length" --config "$layer" --inputs "$tmp/trunc.safetensors" --out "$tmp/x.safetensors"
printf 'not a safetensors file at all' >"$tmp/junk.safetensors"
expect 1 "junk.safetensors" --config "$layer" --inputs "$tmp/junk.safetensors" --out "$tmp/x.safetensors"
# inputs that do not match the layer: wrong shapes, extra and missing parameters
expect 1 "tensor 'x' has shape" --config "$fix/oracle_ec.json" --inputs "$tmp/in.safetensors" --out "$tmp/x.safetensors"
echo '{"hidden_size": 4, "intermediate_size": 6, "num_local_experts": 3, "num_experts_per_tok": 1}' >"$tmp/plain.json"
echo '{"hidden_size": 4, "intermediate_size": 6, "num_local_experts": 3, "num_experts_per_tok": 1,
       "n_shared_experts": 1}' >"$tmp/shared.json"
expect 0 "" --example-inputs "$tmp/plain.safetensors" --config "$tmp/plain.json" --tokens 5
expect 0 "" --example-inputs "$tmp/shared.safetensors" --config "$tmp/shared.json" --tokens 5
expect 1 "parameter 'shared.w1' \[4, 6\] is missing" --config "$tmp/shared.json" \
    --inputs "$tmp/plain.safetensors" --out "$tmp/x.safetensors"
expect 1 "unknown tensor 'shared" --config "$tmp/plain.json" \
    --inputs "$tmp/shared.safetensors" --out "$tmp/x.safetensors"
[ -e "$tmp/x.safetensors" ] && fail "a failed run wrote its output"

# the committed fixtures: same inputs and config give the same outputs
cmp_tool="$top_builddir/tests/test_safetensors"
for f in topk ec; do
    case $f in topk) extra="--step 3" ;; ec) extra="--eval" ;; esac
    # shellcheck disable=SC2086
    expect 0 "" --config "$fix/oracle_$f.json" --inputs "$fix/oracle_${f}_in.safetensors" \
        --out "$tmp/$f.safetensors" $extra
    if [ -x "$cmp_tool" ]; then
        if "$cmp_tool" --compare "$fix/oracle_${f}_out.safetensors" "$tmp/$f.safetensors"; then
            echo "ok: fixture $f matches"
        else
            fail "fixture $f: outputs differ from tests/fixtures/oracle_${f}_out.safetensors" \
                "(after an intended change of the reference: tests/fixtures/regen.sh BUILDDIR)"
        fi
    else
        echo "note: $cmp_tool not built (no Check); fixture $f not compared"
    fi
done

if [ "$fails" -ne 0 ]; then
    echo "$fails check(s) failed"
    exit 1
fi
echo "all oracle checks passed"
exit 0
