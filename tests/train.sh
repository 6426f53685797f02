#!/bin/sh
# cmoe train, sample and eval: tiny runs on synthetic data and on a small text file,
# the run directory they write (metrics.jsonl with the keys issue 5's report reads,
# config.json, train.json, model.safetensors), sampling and evaluation of that run, the
# exit codes of bad input, and NaN/Inf weights and divergence named by their cause. Run by automake with top_srcdir and top_builddir exported.
: "${top_srcdir:=.}" "${top_builddir:=.}"
cmoe="$top_builddir/cmoe"
[ -x "$cmoe" ] || { echo "train.sh: $cmoe is not built"; exit 99; }

tmp=$(mktemp -d "${TMPDIR:-/tmp}/cmoe-train.XXXXXX") || exit 99
trap 'rm -rf "$tmp"' EXIT INT TERM
fails=0
# one thread: the models are tiny, and the tests share the machine with the rest of make check
export OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1

fail() {
    echo "FAIL: $*"
    fails=$((fails + 1))
}

# expect RC STDERR-PATTERN COMMAND ARGS...: exit status RC and stderr matching the pattern
expect() {
    want=$1 pat=$2
    shift 2
    "$cmoe" "$@" >"$tmp/stdout" 2>"$tmp/stderr"
    rc=$?
    if [ "$rc" -ne "$want" ]; then
        fail "cmoe $*: exit $rc, want $want"
        sed 's/^/    stdout: /' "$tmp/stdout" | tail -n 5
        sed 's/^/    stderr: /' "$tmp/stderr" | tail -n 5
    elif [ -n "$pat" ] && ! grep -q -- "$pat" "$tmp/stderr"; then
        fail "cmoe $*: stderr lacks '$pat':"
        sed 's/^/    /' "$tmp/stderr"
    else
        echo "ok: exit $rc: cmoe $*"
    fi
}

# check_metrics DIR STEPS EVALS: one JSON line per step, each with the required keys,
# steps 1..STEPS in order, val_loss on exactly EVALS lines, finite losses.
check_metrics() {
    m="$1/metrics.jsonl"
    [ -s "$m" ] || { fail "$m is missing or empty"; return; }
    n=$(wc -l <"$m" | tr -d ' ')
    [ "$n" -eq "$2" ] || fail "$m has $n lines, want $2 (one per step)"
    for key in step loss ce aux lr grad_norm tokens_per_s load_max_over_mean dropped_frac layers; do
        k=$(grep -c "\"$key\":" "$m")
        [ "$k" -eq "$n" ] || fail "$m: \"$key\" is on $k of $n lines"
    done
    k=$(grep -c '"val_loss":' "$m")
    [ "$k" -eq "$3" ] || fail "$m: \"val_loss\" is on $k lines, want $3"
    # each line a {...} object, steps 1, 2, ... in order, losses finite numbers
    awk -v f="$m" '
        !/^\{.*\}$/ { print "FAIL: " f ":" NR " is not one JSON object"; bad = 1 }
        { if (match($0, /"step":[0-9]+/) == 0 || substr($0, RSTART + 7, RLENGTH - 7) + 0 != NR) {
              print "FAIL: " f ":" NR " does not say step " NR; bad = 1 } }
        /"loss":(null|"|-?nan|-?inf)/ { print "FAIL: " f ":" NR " loss is not a number"; bad = 1 }
        END { exit bad }' "$m" || fails=$((fails + 1))
}

# ---- a tiny MoE model on the synthetic multi-task data --------------------------------
syn="$tmp/synth"
expect 0 "" train --preset tiny --data synth --steps 20 --batch 4 --seq 32 --eval-every 10 --eval-batches 0 \
    --log-every 5 --out "$syn"
check_metrics "$syn" 20 2
for f in config.json train.json model.safetensors; do
    [ -s "$syn/$f" ] || fail "synth run: $f missing"
done
ls "$syn" | grep -q "\.tmp" && fail "a temporary weights file was left behind"
grep -q '"layers":\[{"layer":1,"experts":4,"load":\[' "$syn/metrics.jsonl" ||
    fail "metrics: no per-layer expert load of MoE layer 1 (4 experts)"
grep -q '"layer":2,"experts":6' "$syn/metrics.jsonl" || fail "metrics: no entry for layer 2 (6 experts)"
grep -q '"layer":0,' "$syn/metrics.jsonl" && fail "metrics: dense layer 0 listed as an MoE layer"
grep -q '"aux":{"lb":' "$syn/metrics.jsonl" || fail "metrics: no per-layer aux losses"
grep -q '"num_hidden_layers": 3' "$syn/config.json" || fail "config.json does not hold the tiny model"
grep -q '"data": "synth"' "$syn/train.json" || fail "train.json does not name the data"
# plain progress lines (stdout is not a terminal)
grep -q "step  5/20" "$tmp/stdout" || fail "no plain progress line at step 5"
grep -q "load max/mean" "$tmp/stdout" || fail "progress line lacks the expert load"

# the loss goes down over 20 steps
first=$(sed -n '1s/.*"loss":\([^,]*\),.*/\1/p' "$syn/metrics.jsonl")
last=$(sed -n '$s/.*"loss":\([^,]*\),.*/\1/p' "$syn/metrics.jsonl")
awk -v a="$first" -v b="$last" 'BEGIN { exit !(b < a) }' || fail "loss did not fall: $first -> $last"

# saved weights give back the final validation loss: eval over the same (whole) split and rows
val=$(sed -n '$s/.*"val_loss":\([^,]*\),.*/\1/p' "$syn/metrics.jsonl")
expect 0 "" eval "$syn" --json
grep -q '"bits_per_token"' "$tmp/stdout" || fail "eval of a token model does not report bits per token"
ev=$(sed -n 's/.*"loss": *\([^,]*\),.*/\1/p' "$tmp/stdout")
awk -v a="$val" -v b="$ev" 'BEGIN { d = a - b; if (d < 0) d = -d; exit !(a != "" && d <= 1e-5 * (1 + a)) }' ||
    fail "eval loss $ev differs from the run's final val_loss $val"
expect 0 "" eval "$syn"
grep -q "perplexity" "$tmp/stdout" || fail "eval prints no perplexity"

# sampling: token ids for a 32-token model, reproducible with the seed
expect 0 "" sample "$syn" --tokens 24 --seed 5 --prompt "1 2 3"
cp "$tmp/stdout" "$tmp/sample1"
[ "$(wc -w <"$tmp/sample1" | tr -d ' ')" -eq 27 ] || fail "sample: want 3 prompt + 24 ids, got: $(cat "$tmp/sample1")"
expect 0 "" sample "$syn" --tokens 24 --seed 5 --prompt "1 2 3"
cmp -s "$tmp/stdout" "$tmp/sample1" || fail "sample is not reproducible with the same seed"
# the context is what the run trained on (--seq 32), not max_position_embeddings (64): it
# slides at 32, so the model never runs at a position it never saw
expect 0 "context 32 (the sequence length it trained on), the window slid" sample "$syn" --tokens 150 --temperature 0
[ "$(wc -w <"$tmp/stdout" | tr -d ' ')" -eq 150 ] || fail "sample past the context: want 150 ids"
expect 0 "context 32 (the sequence length it trained on)$" sample "$syn" --tokens 10
# a prompt longer than the context: it slides while reading the prompt
expect 0 "the window slid" sample "$syn" --tokens 10 --prompt "$(seq -s ' ' 0 31) 1 2 3 4 5 6 7 8"
[ "$(wc -w <"$tmp/stdout" | tr -d ' ')" -eq 50 ] || fail "sample of a 40-id prompt: want 50 ids"
expect 1 "prompt" sample "$syn" --prompt "1 99"

# ---- a byte-level model on a small text file -------------------------------------------
awk 'BEGIN { for (i = 0; i < 400; i++) printf "the quick brown fox jumps over the lazy dog %d.\n", i % 7 }' \
    >"$tmp/text.txt"
cat >"$tmp/bytes.json" <<'EOF'
{"vocab_size": 256, "hidden_size": 16, "intermediate_size": 32, "moe_intermediate_size": 16,
 "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 8,
 "max_position_embeddings": 64, "num_local_experts": 4, "num_experts_per_tok": 2}
EOF
txt="$tmp/text"
expect 0 "" train --config "$tmp/bytes.json" --data "$tmp/text.txt" --steps 6 --batch 2 --seq 24 \
    --accum 2 --eval-every 0 --eval-batches 4 --out "$txt"
check_metrics "$txt" 6 1
expect 0 "" eval "$txt" --max-batches 3
grep -q "bits per byte" "$tmp/stdout" || fail "eval of a byte-level model does not report bits per byte"
expect 0 "" sample "$txt" --prompt "the " --tokens 16 --top-k 5 --top-p 0.9
head -c 4 "$tmp/stdout" | grep -q "the " || fail "sample does not echo the prompt"
expect 1 "already holds a run" train --config "$tmp/bytes.json" --data "$tmp/text.txt" --steps 1 --out "$txt"
expect 0 "" train --config "$tmp/bytes.json" --data "$tmp/text.txt" --steps 1 --batch 2 --seq 16 \
    --out "$txt" --force

# ---- usage errors: 2 -------------------------------------------------------------------
expect 2 "unknown option '--bogus'" train --bogus
expect 2 "--steps" train --steps 0
expect 2 "--steps" train --steps 1x
expect 2 "--batch" train --batch -3
expect 2 "--lr" train --lr nan
expect 2 "needs an argument" train --data
expect 2 "not both" train --config "$tmp/bytes.json" --preset tiny
expect 2 "max_position_embeddings" train --preset tiny --data synth --seq 65 --out "$tmp/x1"
expect 2 "--backend" train --backend gpu
expect 2 "unexpected argument" train stray
expect 2 "RUN_DIR" sample
expect 2 "--top-p" sample "$syn" --top-p 0
expect 2 "unknown option" eval "$syn" --bogus
expect 0 "" train --help
expect 0 "" sample --help
expect 0 "" eval --help

# ---- failures: 1, with the reason ---------------------------------------------------------
expect 1 "no-such-file.txt" train --preset tiny --data "$tmp/no-such-file.txt" --steps 1 --out "$tmp/x2"
: >"$tmp/empty.txt"
expect 1 "empty" train --preset tiny --data "$tmp/empty.txt" --steps 1 --out "$tmp/x3"
echo '{"hidden_size": 16,' >"$tmp/broken.json"
expect 1 "broken.json" train --config "$tmp/broken.json" --data synth --steps 1 --out "$tmp/x4"
echo '{"hidden_size": 16, "no_such_key": 1}' >"$tmp/unknown.json"
expect 1 "no_such_key" train --config "$tmp/unknown.json" --data synth --steps 1 --out "$tmp/x5"
expect 1 "no preset 'nope'" train --preset nope --data synth --steps 1 --out "$tmp/x6"
# a backend this build lacks is a usage error naming the ones it has
if ! "$cmoe" --version | grep -q '^Backends:.*cuda'; then
    expect 2 "'cuda' is not a backend of this build (ref, cpu" train --preset tiny --data synth --steps 1 --backend cuda --out "$tmp/x7"
fi
expect 2 "'tpu' is not a backend of this build" train --preset tiny --data synth --steps 1 --backend tpu --out "$tmp/x7"
expect 1 "vocab" train --preset tiny --data "$tmp/text.txt" --steps 1 --out "$tmp/x8"
[ -e "$tmp/x8/metrics.jsonl" ] && fail "a failed start left a run directory behind"
expect 1 "no-such-run" sample "$tmp/no-such-run"
mkdir "$tmp/not-a-run"
expect 1 "no weights" eval "$tmp/not-a-run"
expect 1 "missing.txt" eval "$syn" --data "$tmp/missing.txt"

# ---- a renormalised top-1 gate is always 1: said, with what gives Switch's gate ------------------
sed 's/"num_experts_per_tok": 2/"num_experts_per_tok": 1/' "$top_srcdir/configs/tiny.json" >"$tmp/top1.json"
expect 0 "" train --config "$tmp/top1.json" --data synth --steps 1 --batch 2 --seq 8 --eval-every 0 --out "$tmp/top1"
grep -q "note: top-1 with norm_topk_prob true: the gate is p/p = 1" "$tmp/stdout" ||
    fail "a renormalised top-1 gate is not pointed out"

# ---- NaN, Inf and divergence: refused or explained by name, never a silent nan ----------------
. "$top_srcdir/tests/poison.sh"
cp -r "$syn" "$tmp/nan" && poison "$tmp/nan/model.safetensors" model.layers.1.block_sparse_moe.experts.w1 nan ||
    fail "could not poison a copy of the run"
w1="parameter 'model.layers.1.block_sparse_moe.experts.w1' is not finite: element 0 (of 1024) is nan"
expect 1 "$w1" eval "$tmp/nan" --max-batches 1
expect 1 "$w1" sample "$tmp/nan" --tokens 2
expect 1 "$w1" train --init-from "$tmp/nan" --data synth --steps 1 --out "$tmp/x9"
# finite weights whose forward overflows: eval errs, and training says so instead of blaming --lr
cp -r "$syn" "$tmp/big" && poison "$tmp/big/model.safetensors" lm_head.weight max || fail "could not poison"
big="every parameter is finite; the largest |parameter| is 3.40282e+38, in 'lm_head.weight'"
expect 1 "the loss is nan on synth: the forward pass overflowed ($big)" eval "$tmp/big" --max-batches 2
expect 1 "training diverged at step 1: the loss is nan (ce nan, .*): $big, so the forward pass overflowed" \
    train --init-from "$tmp/big" --data synth --steps 2 --out "$tmp/x10"
grep -q "try a lower --lr" "$tmp/stderr" && fail "an overflowing forward pass is blamed on --lr"
# out-of-range settings are refused up front, naming the key
expect 1 "lr (--lr) must be in \[0, 1\]" train --preset tiny --data synth --steps 3 --lr 1e308 --out "$tmp/x11"
echo '{"initializer_range": 1e300}' >"$tmp/init.json"
expect 1 "initializer_range must be in (0, 1\]" train --config "$tmp/init.json" --data synth --steps 1 --out "$tmp/x12"

# messages that say what is wrong: a directory as config; a model larger than the machine,
# refused before allocating, with the config keys that make it so
expect 1 "config $tmp: is a directory, not a JSON file" train --config "$tmp" --data synth --steps 1 --out "$tmp/x13"
echo '{"hidden_size": 1048576, "moe_intermediate_size": 16777216, "num_local_experts": 10}' >"$tmp/huge.json"
expect 1 "model: MoE layer 0 (hidden_size 1048576, moe_intermediate_size 16777216, num_local_experts 10, .*more than this machine's memory.*The config asks for .* parameters (hidden_size 1048576" \
    train --config "$tmp/huge.json" --data synth --steps 1 --out "$tmp/x14"

echo "train.sh: $fails failure(s)"
[ "$fails" -eq 0 ]
