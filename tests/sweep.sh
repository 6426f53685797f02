#!/bin/sh
# cmoe sweep: a tiny two-run sweep end to end (sweep.jsonl's fields, the page and its plots,
# each run an ordinary run directory for eval, sample, report and export), a second
# invocation that trains nothing, an interrupted sweep (TERM, then kill -9 of the sweep) that
# resumes to the same bits as an uninterrupted one, the equal-FLOPs steps of a budget
# against `cmoe info --json`, and bad specs refused with a message naming the key.
# Run by automake with top_srcdir and top_builddir exported.
: "${top_srcdir:=.}" "${top_builddir:=.}"
cmoe="$top_builddir/cmoe"
[ -x "$cmoe" ] || { echo "sweep.sh: $cmoe is not built"; exit 99; }

tmp=$(mktemp -d "${TMPDIR:-/tmp}/cmoe-sweep.XXXXXX") || exit 99
bg=""
trap '[ -n "$bg" ] && kill -9 "$bg" 2>/dev/null; [ -n "$KEEP" ] || rm -rf "$tmp"' EXIT INT TERM
fails=0
export OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1

fail() {
    echo "FAIL: $*"
    fails=$((fails + 1))
}

# expect RC STDERR-PATTERN ARGS...: cmoe's exit status and stderr
expect() {
    want=$1 pat=$2
    shift 2
    "$cmoe" "$@" >"$tmp/stdout" 2>"$tmp/stderr"
    rc=$?
    if [ "$rc" -ne "$want" ]; then
        fail "cmoe $*: exit $rc, want $want"
        sed 's/^/    stdout: /' "$tmp/stdout" | tail -n 8
        sed 's/^/    stderr: /' "$tmp/stderr" | tail -n 5
    elif [ -n "$pat" ] && ! grep -q -- "$pat" "$tmp/stderr"; then
        fail "cmoe $*: stderr lacks '$pat':"
        sed 's/^/    /' "$tmp/stderr"
    else
        echo "ok: exit $rc: cmoe $*"
    fi
}

# field NAME KEY FILE: the value of "KEY" in the record of run NAME in sweep.jsonl
field() {
    grep "\"name\":\"$1\"" "$3" | tail -n 1 | sed -n "s/.*\"$2\":\([^,}]*\).*/\1/p"
}

# a Mixtral-shaped tiny model (so that export works on its runs)
cat >"$tmp/small.json" <<'EOF'
{"vocab_size": 32, "hidden_size": 16, "intermediate_size": 32, "moe_intermediate_size": 16,
 "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 4,
 "max_position_embeddings": 64, "num_local_experts": 4, "num_experts_per_tok": 2}
EOF

# ---- a tiny two-run sweep ------------------------------------------------------------------
cat >"$tmp/two.json" <<EOF
{"description": "two tiny runs",
 "config": "$tmp/small.json",
 "train": {"data": "synth", "batch": 2, "seq": 16, "eval_batches": 2, "evals": 4},
 "budget": {"flops": 4e7},
 "runs": [{"name": "E{num_local_experts}"}],
 "grid": {"model.num_local_experts": [2, 4]},
 "analysis": {"baseline": "E2", "load": true}}
EOF
out="$tmp/two"
expect 0 "" sweep "$tmp/two.json" --out "$out"
cp "$tmp/stdout" "$tmp/two.stdout"
grep -q "all 2 runs done" "$tmp/two.stdout" || fail "the sweep does not say it is done"
grep -q "sweep 100.0%" "$tmp/two.stdout" || fail "no progress line over the whole sweep"
j="$out/sweep.jsonl"
[ "$(wc -l <"$j" | tr -d ' ')" -eq 2 ] || fail "sweep.jsonl: want 2 records, got $(wc -l <"$j")"
for k in name key status config train grid total_params active_params flops_per_token tokens train_flops \
    wall_s final_val_loss best_val_loss; do
    [ "$(grep -c "\"$k\":" "$j")" -eq 2 ] || fail "sweep.jsonl: \"$k\" is not in every record"
done
grep -q '"config":{"model_type":"cmoe"' "$j" || fail "sweep.jsonl: the record does not hold the model config"
for r in E2 E4; do
    steps=$(field "$r" steps "$j")
    tokens=$(field "$r" tokens "$j")
    fpt=$(field "$r" flops_per_token "$j")
    tf=$(field "$r" train_flops "$j")
    [ "$tokens" -eq $((steps * 32)) ] || fail "$r: tokens $tokens != steps $steps x 32"
    awk -v f="$fpt" -v t="$tokens" -v x="$tf" 'BEGIN { d = f * t - x; if (d < 0) d = -d; exit !(d <= 1e-6 * x) }' ||
        fail "$r: train_flops $tf != flops_per_token $fpt x tokens $tokens"
    # the run's own metrics say the same final validation loss
    v=$(sed -n '$s/.*"val_loss":\([^,]*\),.*/\1/p' "$out/runs/$r/metrics.jsonl")
    fv=$(field "$r" final_val_loss "$j")
    awk -v a="$v" -v b="$fv" 'BEGIN { d = a - b; if (d < 0) d = -d; exit !(a != "" && d <= 1e-8 * (1 + a)) }' ||
        fail "$r: final_val_loss $fv differs from its metrics' last val_loss $v"
    # an ordinary run directory
    expect 0 "" eval "$out/runs/$r"
    expect 0 "" sample "$out/runs/$r" --tokens 8 --prompt "1 2"
    expect 0 "" report "$out/runs/$r"
    expect 0 "" export --format hf "$out/runs/$r" "$tmp/hf-$r"
done
for f in report.html plots/loss_vs_flops.svg plots/loss_vs_time.svg plots/load.svg spec.json configs/E2.json \
    logs/E4.log; do
    [ -s "$out/$f" ] || fail "$out/$f is missing"
done
grep -q "E4" "$out/report.html" && grep -q "Against the baseline" "$out/report.html" ||
    fail "report.html lacks the runs or the baseline comparison"
grep -q "compute ratio" "$tmp/two.stdout" || grep -q "ratio" "$tmp/two.stdout" || fail "no baseline comparison printed"
if command -v xmllint >/dev/null 2>&1; then
    for f in report.html plots/loss_vs_flops.svg plots/load.svg; do
        xmllint --noout "$out/$f" 2>"$tmp/xml" || { fail "$f is not well-formed XML"; cat "$tmp/xml"; }
    done
fi

# again: nothing is trained, the page is written again
m1=$(cksum <"$out/runs/E4/metrics.jsonl")
expect 0 "" sweep "$tmp/two.json" --out "$out"
grep -q "2 done already" "$tmp/stdout" || fail "the second invocation does not see the runs done"
grep -q "starting" "$tmp/stdout" && fail "the second invocation trained again"
# the runs read back from sweep.jsonl: the baseline still reaches its own final loss (1.00x)
grep -qE "^ +E2 .* 1\.00x" "$tmp/stdout" || fail "the baseline does not reach its own loss when read back"
[ "$(cksum <"$out/runs/E4/metrics.jsonl")" = "$m1" ] || fail "a finished run was changed"
expect 0 "" sweep "$tmp/two.json" --out "$out" --dry-run
grep -q "E4 .* done" "$tmp/stdout" || fail "--dry-run does not show the runs done"

# ---- an interrupted sweep ----------------------------------------------------------------
# run b is long enough (3000 steps) to be stopped in the middle: TERM, then kill -9 of the
# sweep (its trainer gets TERM and saves), then it finishes; the bits are those of a sweep
# that was never stopped
cat >"$tmp/stop.json" <<EOF
{"config": "$tmp/small.json",
 "train": {"data": "synth", "batch": 2, "seq": 16, "eval_batches": 2, "evals": 3},
 "runs": [{"name": "a", "train": {"steps": 40}}, {"name": "b", "train": {"steps": 3000, "save_every": 0}}]}
EOF
# wait_for FILE PATTERN: until a line of FILE matches (at most ~60 s)
wait_for() {
    i=0
    while ! grep -q "$2" "$1" 2>/dev/null; do
        i=$((i + 1))
        [ $i -gt 600 ] && return 1
        sleep 0.1
    done
}
st="$tmp/stop"
"$cmoe" sweep "$tmp/stop.json" --out "$st" >"$tmp/s1" 2>&1 &
bg=$!
wait_for "$st/logs/b.log" "^step  *[0-9]" || fail "run b never started"
kill -TERM "$bg"
wait "$bg"
rc=$?
bg=""
[ "$rc" -eq 143 ] || { fail "a sweep stopped by TERM exits $rc, want 143"; tail -n 5 "$tmp/s1"; }
grep -q "run the same command to continue" "$tmp/s1" || fail "the stopped sweep does not say how to continue"
[ "$(grep -c '"status":"done"' "$st/sweep.jsonl")" -eq 1 ] || fail "after TERM: want run a done and b not"
ls "$st/runs/b"/ckpt-*.safetensors >/dev/null 2>&1 || fail "run b has no checkpoint after TERM"
ma=$(cksum <"$st/runs/a/metrics.jsonl")

"$cmoe" sweep "$tmp/stop.json" --out "$st" >"$tmp/s2" 2>&1 &
bg=$!
wait_for "$st/logs/b.log" "resumed from" || fail "run b was not resumed"
sleep 0.3
pid=$(cat "$st/runs/b/.cmoe.lock" 2>/dev/null)
kill -KILL "$bg"
wait "$bg" 2>/dev/null
bg=""
# the trainer saves its checkpoint and ends by itself
i=0
while [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; do
    i=$((i + 1))
    [ $i -gt 600 ] && { fail "the trainer of a killed sweep is still running"; kill -9 "$pid"; break; }
    sleep 0.1
done

expect 0 "" sweep "$tmp/stop.json" --out "$st"
grep -q "1 done already" "$tmp/stdout" || fail "the resumed sweep does not count run a done"
grep -q "b: resuming from its checkpoint" "$tmp/stdout" || fail "the resumed sweep does not resume run b"
# the trainer of the killed sweep saved a checkpoint of its own when it stopped (its output
# went nowhere: the sweep's pipe was gone): the third start resumes later than the second
k1=$(sed -n 's/.*resumed from .* at step \([0-9]*\)$/\1/p' "$st/logs/b.log" | sed -n 1p)
k2=$(sed -n 's/.*resumed from .* at step \([0-9]*\)$/\1/p' "$st/logs/b.log" | sed -n 2p)
[ -n "$k2" ] && [ "$k2" -gt "$k1" ] ||
    fail "run b: the trainer of the killed sweep saved no checkpoint (resumed at $k1, then ${k2:-?})"
[ "$(cksum <"$st/runs/a/metrics.jsonl")" = "$ma" ] || fail "run a was trained again"
[ "$(grep -c '^step 3000/3000' "$st/logs/b.log")" -eq 1 ] || fail "run b did not end at step 3000"
expect 0 "" sweep "$tmp/stop.json" --out "$tmp/straight"
for r in a b; do
    [ "$(field $r final_val_loss "$st/sweep.jsonl")" = "$(field $r final_val_loss "$tmp/straight/sweep.jsonl")" ] ||
        fail "run $r: the interrupted sweep's final val loss differs from the uninterrupted one's"
done

# ---- equal training FLOPs: steps = budget / (FLOPs per token x tokens per step) ----------
cat >"$tmp/wide.json" <<'EOF'
{"vocab_size": 32, "hidden_size": 32, "intermediate_size": 64, "moe_intermediate_size": 48,
 "num_hidden_layers": 3, "num_attention_heads": 4, "head_dim": 8, "max_position_embeddings": 64,
 "num_local_experts": 8, "num_experts_per_tok": 2}
EOF
cat >"$tmp/budget.json" <<EOF
{"train": {"data": "synth", "batch": 4, "seq": 32},
 "budget": {"flops": 3e9},
 "runs": [{"name": "small", "config": "$tmp/small.json"},
          {"name": "wide", "config": "$tmp/wide.json"},
          {"name": "long", "config": "$tmp/wide.json", "train": {"seq": 64, "batch": 2, "accum": 3}}]}
EOF
expect 0 "" sweep "$tmp/budget.json" --out "$tmp/budget" --dry-run
[ -e "$tmp/budget" ] && fail "--dry-run wrote $tmp/budget"
cp "$tmp/stdout" "$tmp/plan"
for r in "small $tmp/small.json 32 128" "wide $tmp/wide.json 32 128" "long $tmp/wide.json 64 384"; do
    set -- $r
    "$cmoe" info --config "$2" --seq "$3" --json >"$tmp/info" || fail "cmoe info --config $2"
    fpt=$(sed -n 's/.*"flops_per_token_fwdbwd": *\([^,]*\),*/\1/p' "$tmp/info")
    want=$(awk -v b=3e9 -v f="$fpt" -v t="$4" 'BEGIN { printf "%d", b / (f * t) + 0.5 }')
    got=$(awk -v n="$1" '$2 == n { print $7 }' "$tmp/plan")
    [ -n "$got" ] && [ "$got" -eq "$want" ] || fail "$1: budget steps $got, want $want (FLOPs/token $fpt, $4 tokens/step)"
    # every run spends the budget to within half a step
    awk -v b=3e9 -v f="$fpt" -v t="$4" -v s="$got" 'BEGIN { d = s * f * t - b; if (d < 0) d = -d; exit !(d <= f * t / 2) }' ||
        fail "$1: $got steps spend more than half a step off the budget"
done

# ---- Clark et al.'s fit: least squares, so the residuals are orthogonal to every regressor --
cat >"$tmp/fit.json" <<EOF
{"config": "$tmp/small.json",
 "model": {"num_experts_per_tok": 1},
 "train": {"data": "synth", "batch": 2, "seq": 16, "steps": 30, "eval_batches": 2, "evals": 2},
 "runs": [{"name": "a-E{num_local_experts}", "model": {"hidden_size": 16}},
          {"name": "b-E{num_local_experts}", "model": {"hidden_size": 24, "head_dim": 6}}],
 "grid": {"model.num_local_experts": [1, 2, 4]},
 "analysis": {"fit": "clark"}}
EOF
expect 0 "" sweep "$tmp/fit.json" --out "$tmp/fit"
grep -q "a = .* b = .* c = .* d = " "$tmp/stdout" || fail "the sweep does not print the fitted coefficients"
[ "$(grep -c '"residual_ln":' "$tmp/fit/fit.json")" -eq 6 ] || fail "fit.json: want 6 residuals"
tr -d ' \n' <"$tmp/fit/fit.json" | sed 's/},{/}\n{/g' |
    sed -n 's/.*"N":\([0-9]*\),"E":\([0-9]*\),.*"residual_ln":\([^}]*\).*/\1 \2 \3/p' |
    awk '{ n = log($1); e = log($2); r = $3; s0 += r; s1 += r * n; s2 += r * e; s3 += r * n * e; k++ }
         END { if (k != 6) { print "FAIL: fit.json: " k " points read"; exit 1 }
               m = 0; split(s0 " " s1 " " s2 " " s3, v, " ")
               for (i = 1; i <= 4; i++) { a = v[i] < 0 ? -v[i] : v[i]; if (a > m) m = a }
               if (m > 1e-6) { print "FAIL: fit residuals not orthogonal to the regressors: " s0 " " s1 " " s2 " " s3; exit 1 } }' ||
    fails=$((fails + 1))
[ -s "$tmp/fit/plots/fit.svg" ] || fail "no plots/fit.svg"

# ---- bad specs: exit 1, the message names the key ----------------------------------------
bad() { # bad PATTERN JSON
    printf '%s\n' "$2" >"$tmp/bad.json"
    expect 1 "$1" sweep "$tmp/bad.json" --out "$tmp/bad-out"
    [ -e "$tmp/bad-out" ] && fail "a bad spec wrote $tmp/bad-out"
}
syn='"train": {"data": "synth"}'
bad "trian: unknown key" '{"trian": {}}'
bad "train.stepz: unknown key" '{"train": {"stepz": 5, "data": "synth"}}'
bad "train.batch: must be an integer" '{"train": {"batch": "8", "data": "synth"}}'
bad "runs\[0\].train.stepz: unknown key" '{"train": {"data": "synth"}, "runs": [{"name": "a", "train": {"stepz": 5}}]}'
bad "grid.train.stepz: unknown key" '{"train": {"data": "synth"}, "grid": {"train.stepz": [5]}}'
bad "runs\[1\] (\"b\"): model: .*num_local_expert" \
    '{"preset": "tiny", '"$syn"', "runs": [{"name": "a"}, {"name": "b", "model": {"num_local_expert": 4}}]}'
bad "hidden_act" '{"preset": "tiny", '"$syn"', "grid": {"model.hidden_act": ["swiglu", "nope"]}}'
bad "budget.flops: must be a number > 0" '{"preset": "tiny", '"$syn"', "budget": {"flops": -1}}'
bad "budget.flops: .* less than half a step" '{"preset": "tiny", '"$syn"', "budget": {"flops": 10}}'
bad "budget.flopz: unknown key" '{"preset": "tiny", '"$syn"', "budget": {"flopz": 1e9}}'
bad "train.steps cannot be given with budget.flops" \
    '{"preset": "tiny", "train": {"data": "synth", "steps": 10}, "budget": {"flops": 1e9}}'
bad "grid.num_local_experts: a grid key is" '{"preset": "tiny", '"$syn"', "grid": {"num_local_experts": [2]}}'
bad "grid.model.num_local_experts: must be a non-empty array" \
    '{"preset": "tiny", '"$syn"', "grid": {"model.num_local_experts": []}}'
bad "taken by an earlier run" '{"preset": "tiny", '"$syn"', "runs": [{"name": "a"}, {"name": "a"}]}'
bad "run name 'a/b'" '{"preset": "tiny", '"$syn"', "runs": [{"name": "a/b"}]}'
bad "'{lr}' is not a grid key" '{"preset": "tiny", '"$syn"', "runs": [{"name": "x{lr}"}]}'
bad "analysis.baseline: no run is named \"nope\"" '{"preset": "tiny", '"$syn"', "analysis": {"baseline": "nope"}}'
bad "analysis.fit: must be \"clark\"" '{"preset": "tiny", '"$syn"', "analysis": {"fit": "kaplan"}}'
bad "train.seq 1000 is longer than the model's max_position_embeddings" \
    '{"preset": "tiny", "train": {"data": "synth", "seq": 1000}}'
bad "runs\[0\].preset: .*unknown preset\|runs\[0\].preset: .*nope" \
    '{"train": {"data": "synth"}, "runs": [{"name": "a", "preset": "nope"}]}'
bad "invalid JSON at line" '{"train": '
bad "runs: must be a non-empty array" '{"runs": []}'
mkdir -p "$tmp/project" && echo keep >"$tmp/project/notes.txt"
expect 1 "not empty and not a sweep" sweep "$tmp/two.json" --out "$tmp/project"
[ "$(cat "$tmp/project/notes.txt")" = keep ] || fail "a refused --out was changed"
expect 2 "--out DIR is required" sweep "$tmp/two.json"
expect 2 "which spec" sweep --out "$tmp/x"
expect 2 "unknown option" sweep "$tmp/two.json" --out "$tmp/x" --bogus

[ "$fails" -eq 0 ] || { echo "sweep.sh: $fails failure(s)"; exit 1; }
echo "sweep.sh: all passed"
