#!/bin/sh
# The cuda backend end to end through the command line, when this build has it and a device
# answers (else exit 77, SKIP):
#  - cmoe check --backend cuda (fp32, and bf16 through cuBLAS, through cmoe's own mma.sync
#    kernel and, on a Hopper GPU, through its wgmma kernel);
#  - cmoe train: 10 steps on cuda fp32 give cpu's and ref's losses (<= 1e-4 relative), also
#    with the mixture of attention heads;
#    two identical cuda runs give the same bits (every loss, the weights file);
#  - bf16 against fp32: 300 steps of the laptop model end within 2% in validation loss (the
#    means of three seeds);
#  - a run saved on the GPU (bf16) holds F32 checkpoints and resumes on the cpu backend, and a
#    cpu run's checkpoint resumes on cuda fp32 where the cpu run went;
#  - cmoe sample and cmoe eval on cuda.
# Run by automake with top_srcdir and top_builddir exported.
: "${top_srcdir:=.}" "${top_builddir:=.}"
cmoe="$top_builddir/cmoe"
[ -x "$cmoe" ] || { echo "cuda.sh: $cmoe is not built"; exit 99; }
if ! "$cmoe" --version 2>/dev/null | grep -q "device 0:"; then
    echo "cuda.sh: skipped: no cuda build or no device answers"
    exit 77
fi
tmp=$(mktemp -d "${TMPDIR:-/tmp}/cmoe-cuda.XXXXXX") || exit 99
trap 'rm -rf "$tmp"' EXIT INT TERM
fails=0
fail() {
    echo "FAIL: $*"
    fails=$((fails + 1))
}
run() { # run NAME ARGS...: cmoe ARGS with its output in $tmp/NAME.log
    name=$1
    shift
    if "$cmoe" "$@" >"$tmp/$name.log" 2>&1; then
        echo "ok: cmoe $*"
    else
        fail "cmoe $* (exit $?):"
        tail -n 15 "$tmp/$name.log" | sed 's/^/    /'
    fi
}
# the value of "key" on each line of a metrics file
col() { sed -n "s/.*\"$2\":\([-0-9.eE+]*\).*/\1/p" "$1"; }

run check32 check --backend cuda --quick --failures
# bf16 through every path of the experts' grouped GEMMs (the table's shapes are small: auto
# would take one of cmoe's own kernels for all of them; wgmma falls back to mma off Hopper)
for g in wgmma cublas mma; do
    export CMOE_CUDA_GEMM=$g
    run "check16-$g" check --backend cuda --dtype bf16 --quick --failures
done
unset CMOE_CUDA_GEMM

# ---- 10 steps: cuda fp32 = cpu = ref (to 1e-4), and two cuda runs bit for bit ----------------
common="--preset tiny --data synth --steps 10 --batch 4 --seq 32 --eval-every 10 --eval-batches 2"
for b in ref cpu cuda; do
    run "train-$b" train $common --backend "$b" --threads 2 --out "$tmp/$b"
done
run train-cuda2 train $common --backend cuda --threads 2 --out "$tmp/cuda2"
for b in ref cpu; do
    col "$tmp/cuda/metrics.jsonl" loss >"$tmp/cuda.loss"
    col "$tmp/$b/metrics.jsonl" loss >"$tmp/$b.loss"
    n=$(wc -l <"$tmp/cuda.loss" | tr -d ' ')
    [ "$n" -eq 10 ] || fail "cuda run: $n losses, want 10"
    paste "$tmp/cuda.loss" "$tmp/$b.loss" | awk -v b="$b" '
        { r = ($1 - $2) / $2; if (r < 0) r = -r; printf "step %2d  cuda %.10f  %s %.10f  rel %.1e\n", NR, $1, b, $2, r
          if (!(r <= 1e-4)) bad = 1 }
        END { exit bad }' || fail "cuda fp32 and $b losses differ by more than 1e-4"
done
col "$tmp/cuda2/metrics.jsonl" loss >"$tmp/cuda2.loss"
cmp -s "$tmp/cuda.loss" "$tmp/cuda2.loss" || fail "two identical cuda runs gave different losses"
cmp -s "$tmp/cuda/model.safetensors" "$tmp/cuda2/model.safetensors" ||
    fail "two identical cuda runs gave different weights"

# ---- the mixture of attention heads (its four plan ops) on cuda fp32 = cpu ----------------------
sed 's/"num_attention_heads": 4,/"num_attention_heads": 4, "attention_experts": 6, "attention_experts_per_tok": 2,/; s/"qkv_bias": true/"qkv_bias": false/' \
    "$top_srcdir/configs/tiny.json" >"$tmp/moa.json"
for b in cpu cuda; do
    run "moa-$b" train --config "$tmp/moa.json" --data synth --steps 10 --batch 4 --seq 32 --eval-every 10 \
        --eval-batches 2 --backend "$b" --threads 2 --out "$tmp/moa-$b"
    col "$tmp/moa-$b/metrics.jsonl" loss >"$tmp/moa-$b.loss"
done
[ "$(wc -l <"$tmp/moa-cuda.loss" | tr -d ' ')" -eq 10 ] || fail "MoA cuda run: want 10 losses"
paste "$tmp/moa-cuda.loss" "$tmp/moa-cpu.loss" | awk '
    { r = ($1 - $2) / $2; if (r < 0) r = -r; if (!(r <= 1e-4)) bad = 1; if (r > m) m = r }
    END { printf "MoA, 10 steps: cuda fp32 against cpu, largest relative loss difference %.1e\n", m; exit bad }' ||
    fail "MoA: cuda fp32 and cpu losses differ by more than 1e-4"

# ---- bf16 against fp32 over 300 steps of the laptop model ---------------------------------------
# Three seeds of each, compared by their means: one pair alone differs by as much as its
# trajectories do (a change of summation order alone moved one fp32 run's loss by 0.7%).
data="$top_srcdir/datasets/brown/brown.txt.gz"
for t in fp32 bf16; do
    for seed in 1 2 3; do
        run "laptop-$t-$seed" train --data "$data" --steps 300 --eval-every 300 --eval-batches 20 --backend cuda \
            --dtype "$t" --seed "$seed" --log-every 100 --out "$tmp/laptop-$t-$seed"
    done
done
val() { for seed in 1 2 3; do col "$tmp/laptop-$1-$seed/metrics.jsonl" val_loss | tail -n 1; done | tr '\n' ' '; }
v32=$(val fp32)
v16=$(val bf16)
echo "laptop, 300 steps, seeds 1-3: validation loss fp32 $v32; bf16 $v16"
awk -v a="$v32" -v b="$v16" 'BEGIN { na = split(a, x, " "); nb = split(b, y, " "); ma = 0; mb = 0
    for (i = 1; i <= na; i++) ma += x[i] / na; for (i = 1; i <= nb; i++) mb += y[i] / nb
    r = (mb - ma) / ma; if (r < 0) r = -r
    printf "means fp32 %.4f, bf16 %.4f: relative difference %.4f\n", ma, mb, r
    exit !(na == 3 && nb == 3 && ma > 0 && r <= 0.02) }' || fail "bf16 and fp32 mean validation losses differ by more than 2%"
grep -q '"dtype": "bf16"' "$tmp/laptop-bf16-1/train.json" || fail "train.json does not record the dtype"

# ---- a GPU (bf16) run saves F32 checkpoints and resumes on the cpu ------------------------------
run save train --preset tiny --data synth --steps 20 --batch 4 --seq 32 --save-every 10 --backend cuda --dtype bf16 \
    --out "$tmp/gpu"
ck=$(ls "$tmp/gpu"/ckpt-*.safetensors 2>/dev/null | tail -n 1)
[ -n "$ck" ] || fail "no checkpoint in $tmp/gpu"
[ -n "$ck" ] && { head -c 4096 "$ck" | grep -q '"F32"' || fail "the checkpoint is not F32"; }
run resume train --resume "$tmp/gpu" --backend cpu --steps 30
n=$(wc -l <"$tmp/gpu/metrics.jsonl" | tr -d ' ')
[ "$n" -eq 30 ] || fail "the resumed run has $n steps, want 30"
col "$tmp/gpu/metrics.jsonl" loss | awk '!($1 > 0 && $1 < 10) { bad = 1 } END { exit bad }' ||
    fail "the resumed run's losses are not finite"
# ---- and back: a cpu run's checkpoint resumes on cuda fp32 where the cpu run went (to 1e-4) ------
run cpu20 train --preset tiny --data synth --steps 20 --batch 4 --seq 32 --save-every 10 --keep 2 --eval-every 0 \
    --backend cpu --out "$tmp/c2g"
cp "$tmp/c2g/metrics.jsonl" "$tmp/c2g.cpu.jsonl"
rm -f "$tmp/c2g"/ckpt-*20.safetensors # the newest checkpoint gone: resume takes step 10's
run c2g train --resume "$tmp/c2g" --backend cuda
col "$tmp/c2g.cpu.jsonl" loss >"$tmp/c2g.cpu.loss"
col "$tmp/c2g/metrics.jsonl" loss >"$tmp/c2g.cuda.loss"
[ "$(wc -l <"$tmp/c2g.cuda.loss" | tr -d ' ')" -eq 20 ] || fail "the run resumed on cuda: want 20 losses"
paste "$tmp/c2g.cuda.loss" "$tmp/c2g.cpu.loss" | awk '
    NR > 10 { r = ($1 - $2) / $2; if (r < 0) r = -r; if (!(r <= 1e-4)) bad = 1; if (r > m) m = r }
    END { printf "cpu checkpoint resumed on cuda: steps 11-20 against the cpu run, largest relative difference %.1e\n", m
          exit bad }' || fail "a cpu run resumed on cuda does not follow the cpu run"
run sample sample "$tmp/gpu" --backend cuda --tokens 20 --prompt "1 2 3"
run eval eval "$tmp/gpu" --backend cuda --max-batches 2

[ "$fails" -eq 0 ] && echo "cuda.sh: all ok"
exit $((fails > 0))
