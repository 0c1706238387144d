"""Harness overhead per trial, bench against raw Optuna on the same storage, side by side.

Both run N trials of the same trivial workload (one epoch that sleeps `--sleep-ms`, one
intermediate report and a pruning check, TPE, median pruner) on a fresh storage of the same
kind (SQLite file, journal file); configurations are interleaved over `--repeats` rounds.
Overhead per trial = (wall time - time inside the workload) / N, after one untimed warm-up
run of each (the first run in a process pays its imports: ~1 s of torch). Raw Optuna is
`study.optimize` with a plain objective; bench is `bench run synthetic` in-process (the
trial lifecycle, typed rows in Parquet, the curve, the final checkpoint, the `bench`
user attributes, the study's repair pass at start).

Usage: python benchmarks/harness_overhead.py [--trials 50] [--repeats 3] [--sleep-ms 50]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import optuna

from bench import leaderboard
from bench.backends._base import get_backend
from bench.plan import RunOptions, make_plan

STORAGES = {"sqlite": "sqlite:///{tmp}/study.db", "journal": "{tmp}/study.journal"}


def raw_optuna(trials: int, sleep_s: float, storage: str, tmp: str) -> float:
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    if storage == "journal":
        backend = optuna.storages.journal.JournalFileBackend(f"{tmp}/study.journal")
        store: object = optuna.storages.JournalStorage(backend)
    else:
        store = STORAGES[storage].format(tmp=tmp)

    def objective(trial: optuna.Trial) -> float:
        x = trial.suggest_float("x", -10, 10)
        y = trial.suggest_float("y", -10, 10)
        time.sleep(sleep_s)
        value = (1 - x) ** 2 + 100 * (y - x * x) ** 2
        trial.report(value, 0)
        if trial.should_prune():
            raise optuna.TrialPruned()
        return value

    t0 = time.perf_counter()
    study = optuna.create_study(storage=store, study_name="raw", direction="minimize",
                                sampler=optuna.samplers.TPESampler(seed=0, multivariate=True),
                                pruner=optuna.pruners.MedianPruner(n_startup_trials=5,
                                                                   n_warmup_steps=1))
    study.optimize(objective, n_trials=trials)
    return time.perf_counter() - t0


def bench_run(trials: int, sleep_s: float, storage: str, tmp: str) -> float:
    url = STORAGES[storage].format(tmp=tmp)
    opts = RunOptions(task="synthetic", trials=trials, out=Path(tmp) / "lb", progress=False,
                      overrides={"epochs": 1, "sleep_s": sleep_s}, storage=url)
    t0 = time.perf_counter()
    result = get_backend("optuna").run(make_plan(opts))
    wall = time.perf_counter() - t0
    assert result.exit_code == 0 and len(leaderboard.read_trials(opts.out, "synthetic")) == trials
    return wall


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--trials", type=int, default=50)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--sleep-ms", type=float, default=50.0)
    args = ap.parse_args()
    sleep_s = args.sleep_ms / 1000
    runners = {"raw optuna": raw_optuna, "bench": bench_run}
    per_trial: dict[str, list[float]] = {}
    for storage in STORAGES:  # warm-up, not timed: imports (torch, the task) and caches
        for fn in runners.values():
            with tempfile.TemporaryDirectory() as tmp:
                fn(3, 0.0, storage, tmp)
    for _ in range(args.repeats):
        for storage in STORAGES:
            for name, fn in runners.items():
                with tempfile.TemporaryDirectory() as tmp:
                    wall = fn(args.trials, sleep_s, storage, tmp)
                ms = 1000 * (wall - args.trials * sleep_s) / args.trials
                per_trial.setdefault(f"{name}, {storage}", []).append(ms)
    out: dict[str, object] = {"machine": platform.processor() or platform.machine(),
                              "trials": args.trials, "sleep_ms": args.sleep_ms}
    for key, values in per_trial.items():
        out[key] = {"overhead_ms_per_trial": [round(v, 1) for v in values],
                    "median": round(statistics.median(values), 1)}
    for storage in STORAGES:
        ratios = [b / r for b, r in zip(per_trial[f"bench, {storage}"],
                                        per_trial[f"raw optuna, {storage}"], strict=True)]
        out[f"ratio bench / raw, {storage}"] = [round(x, 2) for x in ratios]
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
