"""Trials per hour of the vae (or priors) search, fused (`--fuse K`) against one trial at a
time, and against `--workers W` processes sharing the device, side by side on one machine.

Every configuration runs the same N trials (random sampler, no pruning, the same fixed
shape: width, depth, batch size, epochs, data sizes) through `bench run` in this process
(workers: spawned processes), on a fresh leaderboard; configurations are interleaved over
`--repeats` rounds. Reported: trials/hour (mean ± std over repeats), the speed-up against
one at a time, and on CUDA the peak memory per member of the fused runs.

Usage:
  BENCH_DATA=../shared/data python benchmarks/fused_bench.py --device cpu --trials 16 \\
      --fuse 1 2 4 8 16 --set width=16 train_size=2000
  BENCH_DATA=... python benchmarks/fused_bench.py --device cuda --trials 64 \\
      --fuse 1 4 16 32 --workers 4 --set train_size=50000      (benchmarks/gpu_check.sh)
  BENCH_DATA=... python benchmarks/fused_bench.py --task priors --device cpu --fuse 1 8
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from bench import leaderboard
from bench.backends._base import get_backend
from bench.lifecycle import git_sha
from bench.plan import RunOptions, make_plan
from bench.registry import get_task
from bench.space import parse_overrides

BASES = {
    "vae": {"epochs": 1, "width": 16, "depth": 2, "latent_dim": 16, "batch_size": 128,
            "train_size": 2000, "val_size": 500},
    # the default search's auto-decoder; its held-out code fit (test_steps x val_size)
    # is part of every trial, run per member on its unfused model
    "priors": {"dataset": "mnist", "epochs": 1, "width": 16, "depth": 2, "latent_dim": 16,
               "batch_size": 128, "train_size": 2000, "val_size": 200, "test_steps": 50},
}


def run(task: str, trials: int, overrides: dict[str, Any], device: str, fuse: int | None,
        workers: int) -> tuple[float, float]:
    """(wall seconds, peak CUDA memory in GB) of one `bench run TASK`."""
    with tempfile.TemporaryDirectory() as tmp:
        opts = RunOptions(task=task, trials=trials, sampler="random", pruner="none",
                          overrides=overrides, out=Path(tmp), progress=False, device=device,
                          fuse=fuse, workers=workers,
                          storage=f"{tmp}/s.journal" if workers > 1 else None)
        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        result = get_backend("optuna").run(make_plan(opts))
        wall = time.perf_counter() - t0
        rows = leaderboard.read_trials(tmp, task)
        assert result.exit_code == 0 and len(rows) == trials, result.messages
        assert (rows["state"] == "COMPLETE").all()
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else 0.0
    return wall, peak


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--task", default="vae", choices=sorted(BASES))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--trials", type=int, default=16)
    ap.add_argument("--fuse", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    ap.add_argument("--workers", type=int, nargs="*", default=[])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args()
    overrides = {**BASES[args.task], **parse_overrides(args.set, get_task(args.task))}
    configs: dict[str, tuple[int | None, int]] = {"one at a time": (None, 1)}
    configs.update({f"fused K={k}": (k, 1) for k in args.fuse if k > 1})
    configs.update({f"{w} worker processes": (None, w) for w in args.workers})
    # warm-up: data, kernels
    run(args.task, 2, {**overrides, "train_size": 256}, args.device, None, 1)
    walls: dict[str, list[float]] = {k: [] for k in configs}
    peaks: dict[str, float] = {}
    for _ in range(args.repeats):
        for name, (fuse, workers) in configs.items():
            wall, peak = run(args.task, args.trials, overrides, args.device, fuse, workers)
            walls[name].append(wall)
            peaks[name] = max(peaks.get(name, 0.0), peak)
    base = statistics.mean(walls["one at a time"])
    out: dict[str, Any] = {
        "machine": f"{platform.processor() or platform.machine()}, "
                   f"{torch.get_num_threads()} threads"
                   + (f", {torch.cuda.get_device_name()}" if args.device.startswith("cuda")
                      else ""),
        "torch": torch.__version__, "bench": git_sha(), "task": args.task,
        "trials": args.trials,
        "overrides": overrides, "results": {}}
    for name, w in walls.items():
        rate = [3600 * args.trials / x for x in w]
        k = configs[name][0] or 1
        out["results"][name] = {
            "wall_s": [round(x, 2) for x in w],
            "trials_per_hour": round(statistics.mean(rate)),
            "trials_per_hour_std": round(statistics.stdev(rate)) if len(rate) > 1 else None,
            "speedup": round(base / statistics.mean(w), 2),
            "peak_gb_per_member": round(peaks[name] / k, 3) if peaks[name] else None}
    text = json.dumps(out, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text)


if __name__ == "__main__":
    main()
