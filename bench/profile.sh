#!/usr/bin/env bash
# Where the cuda backend's GPU time goes, kernel by kernel (the GPU machine has Nsight Compute
# but no Nsight Systems). From a --with-cuda build directory holding ./cmoe:
#   bash bench/profile.sh [OUTDIR]
# Profiles one forward + backward of the layers (a) and (b) of bench/gpu_bench.py and two
# steps of training gpu-100m, and prints bench/kernel_times.py's table for each.
set -euo pipefail
case "${1:-}" in -h | --help) sed -n '2,6p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;; esac
command -v ncu >/dev/null || { echo "profile.sh: ncu (Nsight Compute) is not on PATH"; exit 1; }
[ -x ./cmoe ] || { echo "profile.sh: run it from a --with-cuda build directory holding ./cmoe"; exit 1; }
out=${1:-${OUT:-/tmp}/profile}
mkdir -p "$out"
src=$(cd "$(dirname "$0")" && pwd)
ncu_times() { # NAME PER CMD...
    local name=$1 per=$2; shift 2
    ncu --clock-control none --csv --metrics gpu__time_duration.sum --log-file "$out/$name.csv" "$@" >"$out/$name.log" 2>&1 \
        || { echo "profile.sh: $name failed:"; tail -5 "$out/$name.log"; return 1; }
    echo "== $name ($*)"
    python3 "$src/kernel_times.py" "$out/$name.csv" --per "$per"
}
layer="./cmoe bench layer --backend cuda --dtype bf16 --iters 1 --warmup 0"
ncu_times layer_a 1 $layer --tokens 16384 --d-model 4096 --d-ff 14336 --experts 8 --top-k 2
ncu_times layer_b 1 $layer --tokens 16384 --d-model 2048 --d-ff 1408 --experts 64 --top-k 6
ncu_times train_100m 2 ./cmoe train --preset gpu-100m --backend cuda --dtype bf16 --data synth:vocab=50304 \
    --batch 16 --seq 1024 --steps 2 --eval-every 0 --eval-batches 1 --out /tmp/profile_run --force
