#!/usr/bin/env bash
# brain-age at the report's full budget (96^3, 3 seeds), for a machine with a GPU.
# Not run yet: no GPU was lent to the task that wrote it (benchmarks/RESULTS.md, brain-age).
#
#   bash benchmarks/brain_age_gpu.sh [OUT]        # OUT default: /tmp/brain-age-gpu
#
# Writes OUT/*.md (the Markdown tables for RESULTS.md), OUT/*.json (raw figures) and the
# leaderboard of the searches under OUT/lb. About 1.5-3 h on one H100/H200-class GPU
# (the cohort is written on the CPU first: ~3 min with 8 processes).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-/tmp/brain-age-gpu}
mkdir -p "$OUT"
export BENCH_DATA=${BENCH_DATA:-$OUT/data}   # the simulated cohort is generated here once
B="python benchmarks/brain_age_bench.py --device cuda --out $OUT/runs"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"

# 1. epoch time of the report's baseline at 96^3: resident volumes vs a NIfTI DataLoader
$B --shape 96 --part epoch --repeats 3 --loader-workers 0 4 8 --json "$OUT/epoch.json" \
    | tee "$OUT/epoch.md"

# 2. the bottleneck's ceiling on the true volumes (CPU, seconds)
$B --shape 96 --part oracle --json "$OUT/oracle.json" | tee "$OUT/oracle.md"

# 3. the report's four models with its settings (30 epochs), 3 seeds each, beside its
#    numbers; the CNN that counts; the training modes and the direct model
$B --shape 96 --part mae --seeds 3 --search-trials 32 --json "$OUT/hypotheses.json" \
    --variants baseline h1-larger-cnn h2-kernel-ridge h3-kernel-ridge-bo h3-bo-optimum \
               counting-cnn training-modes direct | tee "$OUT/hypotheses.md"

# 4. the goal at 96^3: the best bottleneck model of a 20-trial search within 1.5x the
#    kernel-ridge-on-true-volumes ceiling (part 2's "kernel_ridge ... on true volumes")
bench run brain-age --trials 20 --device cuda --out "$OUT/lb" --quiet --eval-top 1
bench board brain-age --out "$OUT/lb" --format markdown --top 5 | tee "$OUT/search96.md"
bench plot brain-age --out "$OUT/lb"
for v in baseline h1-larger-cnn h2-kernel-ridge h3-bo-optimum counting-cnn; do
    bench run brain-age --variant "$v" --device cuda --out "$OUT/lb" --quiet
    bench plot brain-age --variant "$v" --out "$OUT/lb"
done
echo "done: $OUT"
