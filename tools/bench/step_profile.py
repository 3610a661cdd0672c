#!/usr/bin/env python3
"""Where one decode step's GPU time goes, kernel by kernel, from Nsight Compute.

    ncu --profile-from-start off --graph-profiling node --metrics gpu__time_duration.sum --csv \\
        hga generate ... --profiler-step 4 > step.csv
    python3 tools/bench/step_profile.py step.csv [label]

`hga generate --profiler-step N` brackets decode step N (a CUDA graph replay) with cuProfilerStart / Stop, so the
CSV holds every kernel of that one step. ncu runs the kernels one at a time, so each duration is the kernel alone
(its launch ramp and tail included, no overlap with its neighbours through PDL, no gap between kernels): the sum
is what the step would take with zero-cost boundaries. Prints, per kernel name: launches, mean and total
microseconds, and share of the sum. Several prompts give several steps: one table per step (split where the step's
first kernel, `hga_embed_gather`, appears).
"""
import csv
import sys
from collections import defaultdict


def main(path, label=""):
    with open(path, newline="") as f:
        lines = [l for l in f if l.startswith('"')]  # ncu prints its own log lines before the CSV
    r = csv.DictReader(lines)
    steps, cur = [], []
    for x in r:
        if x.get("Metric Name") != "gpu__time_duration.sum":
            continue
        name = x["Kernel Name"].split("(")[0].strip()
        unit = x.get("Metric Unit", "nsecond")
        v = float(x["Metric Value"].replace(",", ""))
        us = v / 1e3 if unit.startswith("n") else v if unit.startswith("u") else v * 1e3
        if name.startswith("hga_embed_gather") and cur:
            steps.append(cur)
            cur = []
        cur.append((name, us))
    if cur:
        steps.append(cur)
    for i, st in enumerate(steps):
        per = defaultdict(lambda: [0, 0.0])
        for n, us in st:
            per[n][0] += 1
            per[n][1] += us
        total = sum(us for _, us in st)
        print(f"{label}step {i}: {len(st)} kernels, sum of kernel times {total:.1f} us")
        print(f"  {'kernel':<40} {'count':>6} {'mean us':>9} {'total us':>9} {'share':>7}")
        for n, (c, us) in sorted(per.items(), key=lambda kv: -kv[1][1]):
            print(f"  {n[:40]:<40} {c:>6} {us / c:>9.2f} {us:>9.1f} {us / total * 100:>6.1f}%")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2] + " " if len(sys.argv) > 2 else "")
