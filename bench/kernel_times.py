#!/usr/bin/env python3
"""Where a cmoe (or any CUDA) program spends its GPU time, kernel by kernel, from Nsight
Compute's per-launch durations (the device machine has ncu but no nsys).

  ncu --clock-control none --csv --metrics gpu__time_duration.sum --log-file k.csv \\
      ./cmoe bench layer --backend cuda --dtype bf16 ... --iters 1 --warmup 0
  python3 bench/kernel_times.py k.csv [--per N] [--top 25]

Prints, per kernel name (template arguments cut), the launches, the summed duration and its
share of the whole, largest first; --per N divides the times by N (layer iterations or
training steps profiled). ncu runs the launches one at a time, so the sum is the GPU's busy
time without overlap: gaps the host leaves between kernels are not in it.
"""
import argparse
import csv
import re
import sys


def short(name):
    name = re.sub(r"\(.*$", "", name)  # the parameter list
    depth, out = 0, []
    for ch in name:  # template arguments
        if ch == "<":
            depth += 1
        elif ch == ">":
            depth -= 1
        elif depth == 0:
            out.append(ch)
    name = "".join(out).strip()
    return re.sub(r"^(void|static)\s+", "", name)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("csv")
    p.add_argument("--per", type=float, default=1.0, help="divide the times by this (iterations or steps)")
    p.add_argument("--top", type=int, default=25)
    a = p.parse_args()
    with open(a.csv, newline="") as f:
        lines = [l for l in f if l.startswith('"')]  # ncu's own log lines start with "=="
    rows = list(csv.DictReader(lines))
    if not rows or "Metric Value" not in rows[0]:
        sys.exit("kernel_times.py: %s holds no ncu --csv metrics (was --metrics gpu__time_duration.sum given?)" % a.csv)
    agg = {}
    for r in rows:
        if r.get("Metric Name") != "gpu__time_duration.sum":
            continue
        v = float(r["Metric Value"].replace(",", ""))
        unit = r.get("Metric Unit", "nsecond")
        ms = v * {"nsecond": 1e-6, "usecond": 1e-3, "msecond": 1.0, "second": 1e3}.get(unit, 1e-6)
        k = short(r["Kernel Name"])
        n, t = agg.get(k, (0, 0.0))
        agg[k] = (n + 1, t + ms)
    total = sum(t for _, t in agg.values())
    print("%-58s %8s %10s %6s" % ("kernel", "launches", "ms", "share"))
    for k, (n, t) in sorted(agg.items(), key=lambda kv: -kv[1][1])[: a.top]:
        print("%-58s %8.0f %10.3f %5.1f%%" % (k[:58], n / a.per, t / a.per, 100 * t / total))
    print("%-58s %8.0f %10.3f" % ("total", sum(n for n, _ in agg.values()) / a.per, total / a.per))


if __name__ == "__main__":
    main()
