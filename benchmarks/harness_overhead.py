"""Harness overhead per trial: wall time outside the objective / total, over N tiny trials.

Runs `bench run` in-process with the Optuna backend (TPE, median pruner, SQLite study,
Parquet rows) and compares the run's wall time with the sum of the trials' own
`duration_s` (the time inside the objective, as the leaderboard records it). Two workloads:
the synthetic task with a fixed sleep (a trivial trial: the overhead in absolute terms)
and a tiny vae trial (the overhead as a fraction of a real, if small, trial).

Usage: BENCH_DATA=../shared/data python benchmarks/harness_overhead.py [--trials 50]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from bench import leaderboard
from bench.backends import optuna as ob
from bench.backends._base import RunOptions

WORKLOADS = {
    "synthetic (sleep 50 ms)": ("synthetic", {"epochs": 1, "sleep_s": 0.05}),
    "vae tiny (1 epoch, 1000 images)": ("vae", {"epochs": 1, "train_size": 1000, "val_size": 500,
                                                 "test_size": 200, "iwae_k": 8, "width": 16}),
}


def measure(task: str, overrides: dict, trials: int, storage: str | None) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        opts = RunOptions(task=task, trials=trials, overrides=overrides, out=Path(tmp),
                          progress=False, storage=storage and storage.format(tmp=tmp))
        t0 = time.perf_counter()
        ob.run(opts)
        wall = time.perf_counter() - t0
        rows = leaderboard.read_trials(tmp, task)
    inside = float(rows["duration_s"].sum())
    return {"trials": len(rows), "wall_s": round(wall, 2), "inside_objective_s": round(inside, 2),
            "overhead_per_trial_ms": round(1000 * (wall - inside) / len(rows), 1),
            "overhead_fraction": round((wall - inside) / wall, 4)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--trials", type=int, default=50)
    args = ap.parse_args()
    results = {}
    for name, (task, overrides) in WORKLOADS.items():
        results[f"{name}, sqlite"] = measure(task, overrides, args.trials, None)
    results["synthetic (sleep 50 ms), journal file"] = measure(
        "synthetic", WORKLOADS["synthetic (sleep 50 ms)"][1], args.trials, "{tmp}/study.journal")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
