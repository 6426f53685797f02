#!/bin/sh
# bench/train_compare.sh — training tokens/s of `cmoe train` against the same model in
# PyTorch (bench/train_torch.py), same config, batch, sequence length and threads, in one
# invocation, and their ratio.
#
# Usage: bench/train_compare.sh [--cmoe PATH] [--threads N] [--batch B] [--seq S]
#            [--steps N] [--warmup W] [--runs R] [--formulations loop,sorted,padded,dense]
#            [--config FILE] [--torch-blas-threads N]
#   defaults: ./cmoe (or cmoe on PATH), 2 threads, batch 8, seq 128, 30 timed steps after
#   5 warmup steps, 3 runs, configs/laptop.json — `cmoe train`'s defaults for the model,
#   batch and sequence.
# Run it from the source tree (datasets/brown/brown.txt.gz and configs/ are read from the
# current directory).
#
# The statistic, the same for both: one run = W untimed + N timed training steps of a
# fresh model; a run's tokens/s = the median over the N timed steps of batch*seq /
# step_time (cmoe: the per-step tokens_per_s of RUN/metrics.jsonl, steps W+1..W+N, whose
# step time covers drawing the batch, forward, backward and the AdamW step, not the
# evaluation); the figure = the median over the R runs. The ratio is cmoe / PyTorch.
# GFLOP/s = tokens/s x the GEMM FLOPs per token of a training step (train_torch.py's
# step_flops: forward 2mnk, backward twice that, causal attention half); the ceiling is
# one OpenBLAS sgemm of the same FLOPs with N threads of its own (a cube, median of 3),
# measured in the same invocation.
#
# Thread settings: cmoe gets --threads N (its OpenMP team; OpenBLAS inside it runs one
# thread per call). PyTorch gets OMP_NUM_THREADS=N, OPENBLAS_NUM_THREADS=1 (or
# --torch-blas-threads) and torch.set_num_threads(N), what ran fastest for Debian's
# PyTorch here.
# OPENBLAS_CORETYPE is left as the environment sets it, for both.
set -eu

CMOE=""
THREADS=2
BATCH=8
SEQ=128
STEPS=30
WARMUP=5
RUNS=3
FORMS=loop,sorted,padded,dense
CONFIG=configs/laptop.json
TBLAS=1
PY=/usr/bin/python3   # Debian's python3-torch

usage() {
    sed -n '2,/^set -eu/p' "$0" | sed '$d; s/^# \{0,1\}//'
    exit "$1"
}

while [ $# -gt 0 ]; do
    case "$1" in
    --cmoe) CMOE=$2; shift 2 ;;
    --threads) THREADS=$2; shift 2 ;;
    --batch) BATCH=$2; shift 2 ;;
    --seq) SEQ=$2; shift 2 ;;
    --steps) STEPS=$2; shift 2 ;;
    --warmup) WARMUP=$2; shift 2 ;;
    --runs) RUNS=$2; shift 2 ;;
    --formulations) FORMS=$2; shift 2 ;;
    --config) CONFIG=$2; shift 2 ;;
    --torch-blas-threads) TBLAS=$2; shift 2 ;;
    -h|--help) usage 0 ;;
    *) echo "train_compare.sh: unknown argument '$1'" >&2; usage 2 >&2 ;;
    esac
done

if [ -z "$CMOE" ]; then
    if [ -x ./cmoe ]; then CMOE=./cmoe; else CMOE=$(command -v cmoe || true); fi
fi
[ -n "$CMOE" ] && [ -x "$CMOE" ] || { echo "train_compare.sh: no cmoe binary; pass --cmoe PATH" >&2; exit 2; }
[ -f "$CONFIG" ] || { echo "train_compare.sh: $CONFIG not found; run from the source tree" >&2; exit 2; }
HERE=$(dirname "$0")
TMP=$(mktemp -d "${TMPDIR:-/tmp}/train_compare.XXXXXX")
trap 'rm -rf "$TMP"' EXIT INT TERM
TOTAL=$((WARMUP + STEPS))

echo "load average before: $(cut -d' ' -f1-3 /proc/loadavg)"

# cmoe: R runs into the temp dir; the final evaluation is kept short (it is not timed)
r=1
while [ "$r" -le "$RUNS" ]; do
    "$CMOE" train --config "$CONFIG" --threads "$THREADS" --batch "$BATCH" --seq "$SEQ" --steps "$TOTAL" \
        --eval-every 0 --eval-batches 1 --log-every 1000000 --seed $((1337 + r)) --out "$TMP/run$r" \
        > "$TMP/run$r.log"
    r=$((r + 1))
done
CMOE_JSON=$("$PY" - "$TMP" "$RUNS" "$WARMUP" <<'EOF'
import json, statistics, sys
tmp, runs, warm = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
per_run = []
for r in range(1, runs + 1):
    with open("%s/run%d/metrics.jsonl" % (tmp, r)) as fh:
        rows = [json.loads(l) for l in fh if l.strip()]
    per_run.append(statistics.median(m["tokens_per_s"] for m in rows if m["step"] > warm))
print(json.dumps({"tokens_per_s": statistics.median(per_run), "runs_tokens_per_s": per_run}))
EOF
)

TORCH_JSON=$("$PY" "$HERE/train_torch.py" --json --config "$CONFIG" --threads "$THREADS" --blas-threads "$TBLAS" \
    --batch "$BATCH" --seq "$SEQ" --steps "$STEPS" --warmup "$WARMUP" --runs "$RUNS" --total-steps "$TOTAL" --formulations "$FORMS")

CEIL_JSON=$("$PY" "$HERE/train_torch.py" --ceiling --config "$CONFIG" --threads "$THREADS" --batch "$BATCH" --seq "$SEQ")

echo "load average after:  $(cut -d' ' -f1-3 /proc/loadavg)"

"$PY" - "$CMOE_JSON" "$TORCH_JSON" "$CMOE" "$CONFIG" "$CEIL_JSON" <<'EOF'
import json, sys
cm, tj, cmoe, config = json.loads(sys.argv[1]), json.loads(sys.argv[2]), sys.argv[3], sys.argv[4]
ceil = json.loads(sys.argv[5])
fpt = tj["step_flops"] / (tj["batch"] * tj["seq"])  # GEMM FLOPs per token


def gf(tok_s):
    return "%5.1f GFLOP/s = %3.0f%% of sgemm" % (tok_s * fpt / 1e9, 100 * tok_s * fpt / 1e9 / ceil["sgemm_gflops"])


print("%s, batch %d x seq %d, %d thread(s) (torch: OPENBLAS_NUM_THREADS=%d); %d warmup + %d timed steps per run, "
      "median of %d runs" % (config, tj["batch"], tj["seq"], tj["threads"], tj["blas_threads"], tj["warmup"],
                             tj["steps"], tj["runs"]))
print("  tokens/s = median over the timed steps of batch*seq/step_time, median over runs")
print("  %.2f MFLOP (GEMM) per token; sgemm ceiling %.1f GFLOP/s (n=%d, %d OpenBLAS threads)"
      % (fpt / 1e6, ceil["sgemm_gflops"], ceil["sgemm_n"], ceil["sgemm_threads"]))
print("  cmoe train    %9.0f tok/s  %s  (runs: %s)" % (cm["tokens_per_s"], gf(cm["tokens_per_s"]),
      ", ".join("%.0f" % r for r in cm["runs_tokens_per_s"])))
for k, v in tj["tokens_per_s"].items():
    print("  torch %-7s %9.0f tok/s  %s  (runs: %s)   cmoe / torch = %.2fx%s"
          % (k, v, gf(v), ", ".join("%.0f" % r for r in tj["runs_tokens_per_s"][k]), cm["tokens_per_s"] / v,
             "   (fastest torch)" if k == tj["fastest"] else ""))
print(json.dumps({"cmoe_binary": cmoe, "cmoe": cm, "torch": tj, "ceiling": ceil,
                  "ratio": {k: cm["tokens_per_s"] / v for k, v in tj["tokens_per_s"].items()}}))
EOF
