#!/usr/bin/env bash
# One prepared script to run first whenever a GPU is lent (at most ~10 minutes on one
# H100/H200): the GPU contract tests, then the GPU benchmark rows. Results (text and JSON)
# go to $OUT (the device tool's output folder) or benchmarks/gpu_results/, ready to paste
# into benchmarks/RESULTS.md.
#
#   BENCH_DATA=/path/with/MNIST bash benchmarks/gpu_check.sh
#
# The machine needs the project installed (pip install -e '.[dev]') and MNIST in
# torchvision's layout under $BENCH_DATA (55 MB: carry it, the GPU machine has no internet).
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-benchmarks/gpu_results}"
mkdir -p "$out"
export BENCH_NO_DOWNLOAD=1
log="$out/gpu_check.txt"
: >"$log"
say() { echo "== $* ($(date -u +%H:%M:%S))" | tee -a "$log"; }

say "machine"
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
  git rev-parse HEAD 2>/dev/null; } 2>&1 | tee -a "$log"

say "1. GPU contract tests (every task's smoke run on CUDA; fractional GPUs on Ray)"
timeout 150 python -m pytest -q -m gpu -p no:cacheprovider tests/test_task_contract.py \
    tests/test_ray.py tests/test_fused.py 2>&1 | tail -15 | tee -a "$log"

say "2. vae training throughput: resident uint8 batches vs a DataLoader, bf16, batch 1024"
timeout 90 python benchmarks/vae_throughput.py --device cuda --batch-size 1024 --n 50000 \
    --epochs 1 --repeats 3 2>&1 | tail -25 | tee -a "$log"

say "3. fused trials: trials/hour at K = 1, 4, 16, 32 vs one at a time and 4 worker processes"
timeout 240 python benchmarks/fused_bench.py --device cuda --trials 32 --fuse 1 4 16 32 \
    --workers 4 --repeats 1 --set width=32 train_size=50000 val_size=10000 \
    --json "$out/fused_gpu.json" 2>&1 | tail -60 | tee -a "$log"

say "4. fused priors (auto-decoder, per-member code tables): K = 1, 16"
timeout 120 python benchmarks/fused_bench.py --task priors --device cuda --trials 16 \
    --fuse 1 16 --repeats 1 --set width=32 train_size=20000 \
    --json "$out/fused_priors_gpu.json" 2>&1 | tail -30 | tee -a "$log"

say "done; results in $out"
