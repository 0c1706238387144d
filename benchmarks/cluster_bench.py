"""Clusters: K concurrent tiny trials (Optuna workers vs Ray Tune vs sequential), and harness
overhead per trial for each backend and storage (SQLite, journal file, PostgreSQL, Ray).

Part 1, throughput: `--trials` synthetic trials of `--epochs` steps sleeping `--sleep-s`
each (a stand-in for training that leaves the CPU free), run sequentially, by K Optuna
worker processes sharing a journal-file study, and by Ray Tune with K concurrent trials
(random search, no pruning everywhere, so every run does the same work). Wall time from
`run()` to its return, process start-up included; Ray's cluster start is timed apart.

Part 2, overhead: `--overhead-trials` trivial trials (synthetic, epochs=1, no sleep, random
search): overhead per trial = (wall - time inside the objective) / trials, where the time
inside is the sum of the rows' `duration_s`. Sequential Optuna on each storage, and Ray.

All configurations run side by side in one process, `--repeats` times each, alternating;
mean +- std over repeats. PostgreSQL is used when `BENCH_TEST_POSTGRES` (or the default
URL of slurm/local-postgres.sh) answers.

Usage: python benchmarks/cluster_bench.py [--workers 2] [--repeats 3] [--write]
       (--write replaces the `## clusters` section of benchmarks/RESULTS.md)
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench import leaderboard
from bench.backends._base import get_backend
from bench.lifecycle import git_sha
from bench.plan import RunOptions, make_plan

PG_URL = os.environ.get("BENCH_TEST_POSTGRES", "postgresql://bench:bench@localhost:5432/bench")
RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
HEADING = "## clusters"


def postgres_up() -> bool:
    try:
        import psycopg2

        psycopg2.connect(PG_URL, connect_timeout=3).close()
        return True
    except Exception:
        return False


def run_once(backend: str, out: Path, trials: int, overrides: dict[str, Any], workers: int,
             storage: str | None = None) -> tuple[float, float, int, float]:
    """(wall_s, seconds inside objectives, rows, span_s from first start to last finish)."""
    opts = RunOptions(task="synthetic", trials=trials, sampler="random", pruner="none",
                      overrides=overrides, out=out, progress=False, storage=storage,
                      workers=workers,  # Ray: a cap on concurrent trials
                      study=f"b{uuid.uuid4().hex[:8]}", backend=backend,
                      extra={"cpus_per_trial": 1} if backend == "ray" else {})
    t0 = time.perf_counter()
    get_backend(backend).run(make_plan(opts))
    wall = time.perf_counter() - t0
    rows = leaderboard.read_trials(out, "synthetic", study=opts.study)
    if backend == "optuna" and storage and storage.startswith("postgresql"):
        import optuna

        optuna.delete_study(study_name=opts.study, storage=storage)
    span = (rows["finished_at"].max() - rows["started_at"].min()).total_seconds()
    return wall, float(rows["duration_s"].sum()), len(rows), span


def mean_std(xs: list[float]) -> str:
    if len(xs) < 2:
        return f"{xs[0]:.3g}"
    return f"{statistics.mean(xs):.3g} +- {statistics.stdev(xs):.2g}"


def side_by_side(configs: dict[str, Callable[[Path], tuple[float, float, int, float]]],
                 repeats: int) -> dict[str, list[tuple[float, float, int, float]]]:
    results: dict[str, list[tuple[float, float, int, float]]] = {k: [] for k in configs}
    for r in range(repeats):
        for name, fn in configs.items():  # alternate configurations, repeat by repeat
            with tempfile.TemporaryDirectory() as tmp:
                results[name].append(fn(Path(tmp)))
            w, inside, n, _ = results[name][-1]
            print(f"  [{r + 1}/{repeats}] {name}: {n} trials, {w:.2f} s wall, "
                  f"{inside:.2f} s inside", flush=True)
    return results


def start_ray(cpus: int) -> float:
    import ray

    t0 = time.perf_counter()
    ray.init(num_cpus=cpus, include_dashboard=False, object_store_memory=100 * 2**20,
             log_to_driver=False,
             runtime_env={"env_vars": {k: v for k, v in os.environ.items()
                                       if k.startswith("BENCH_")}})
    return time.perf_counter() - t0


def hardware() -> str:
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text()
                .splitlines() if ln.startswith("model name")), platform.processor())
    mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    import optuna
    import ray

    pg = ""
    if postgres_up():
        out = subprocess.run(["psql", PG_URL, "-tAc", "SHOW server_version"],
                             capture_output=True, text=True)
        pg = f", PostgreSQL {out.stdout.strip()} (localhost)"
    return (f"{cpu}, {os.cpu_count()} cores, {mem_gb:.0f} GB RAM (shared with other jobs); "
            f"Optuna {optuna.__version__}, Ray {ray.__version__}{pg}; bench {git_sha() or '?'}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, default=2, help="K concurrent trials")
    ap.add_argument("--trials", type=int, default=24)
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--sleep-s", type=float, default=0.1)
    ap.add_argument("--overhead-trials", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--write", action="store_true", help="update benchmarks/RESULTS.md")
    args = ap.parse_args()
    k = args.workers
    ray_init_s = start_ray(k)
    print(f"ray.init: {ray_init_s:.1f} s", flush=True)

    tiny = {"epochs": args.epochs, "sleep_s": args.sleep_s}
    n = args.trials
    print("throughput:", flush=True)
    thr = side_by_side({
        "sequential (Optuna, 1 process, SQLite)":
            lambda o: run_once("optuna", o, n, tiny, 1),
        f"Optuna, {k} worker processes, journal file":
            lambda o: run_once("optuna", o, n, tiny, k),
        f"Ray Tune, {k} concurrent trials":
            lambda o: run_once("ray", o, n, tiny, k),
    }, args.repeats)

    trivial = {"epochs": 1, "sleep_s": 0.0}
    m = args.overhead_trials
    configs: dict[str, Callable[[Path], tuple[float, float, int, float]]] = {
        "Optuna, SQLite": lambda o: run_once("optuna", o, m, trivial, 1),
        "Optuna, journal file": lambda o: run_once("optuna", o, m, trivial, 1,
                                                   str(o / "study.journal")),
    }
    if postgres_up():
        configs["Optuna, PostgreSQL"] = lambda o: run_once("optuna", o, m, trivial, 1, PG_URL)
    configs[f"Ray Tune ({k} concurrent)"] = lambda o: run_once("ray", o, m, trivial, k)
    print("overhead:", flush=True)
    ovh = side_by_side(configs, args.repeats)

    import ray

    ray.shutdown()
    text = report(args, thr, ovh, ray_init_s)
    print(text)
    if args.write:
        write_section(text)


def report(args: argparse.Namespace, thr: dict, ovh: dict, ray_init_s: float) -> str:
    seq = statistics.mean(r[0] for r in thr[next(iter(thr))])
    ideal = args.trials * args.epochs * args.sleep_s
    lines = [HEADING, "",
             f"Measured {time.strftime('%Y-%m-%d')} by `python benchmarks/cluster_bench.py "
             f"--workers {args.workers} --repeats {args.repeats}`; {hardware()}. "
             f"Mean +- std over {args.repeats} repeats, configurations alternated in one run.",
             "",
             f"### Throughput: {args.trials} tiny trials ({args.epochs} steps x "
             f"{args.sleep_s * 1000:.0f} ms sleep; {ideal:.1f} s of trial time), "
             f"K = {args.workers}", "",
             "| runner | wall s | trials/hour | speed-up vs sequential |",
             "|---|---|---|---|"]
    for name, runs in thr.items():
        walls = [r[0] for r in runs]
        rate = [3600 * r[2] / r[0] for r in runs]
        lines.append(f"| {name} | {mean_std(walls)} | {mean_std(rate)} | "
                     f"{seq / statistics.mean(walls):.2f}x |")
    lines += ["", f"Ray's local cluster start (`ray.init`, outside the timings above): "
              f"{ray_init_s:.1f} s. Optuna worker processes are started inside the timing "
              "(spawn + imports).", "",
              f"### Harness overhead per trial: {args.overhead_trials} trivial trials "
              "(synthetic, epochs=1, no sleep, random search, no pruning)", "",
              "| backend, storage | wall s | fixed s (start + end) | overhead ms/trial, "
              "steady state | trials/s, steady state |",
              "|---|---|---|---|---|"]
    for name, runs in ovh.items():
        k = args.workers if "Ray" in name else 1
        walls = [w for w, _, _, _ in runs]
        fixed = [w - span for w, _, _, span in runs]
        per = [1000 * (k * span - inside) / n for _, inside, n, span in runs]
        rate = [n / span for _, _, n, span in runs]
        lines.append(f"| {name} | {mean_std(walls)} | {mean_std(fixed)} | {mean_std(per)} | "
                     f"{mean_std(rate)} |")
    lines += ["", "Steady state: from the first trial's start to the last one's finish (the "
              "rows' timestamps); overhead = (concurrent slots x that span - time inside "
              "objectives) / trials. Fixed: wall minus that span (opening the study, starting "
              "Ray's trial actors, tearing down)."]
    return "\n".join(lines) + "\n"


def write_section(text: str) -> None:
    """Replace (or append) this script's section of RESULTS.md, leaving the others alone."""
    old = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n"
    lines = old.splitlines(keepends=True)
    start = next((i for i, ln in enumerate(lines) if ln.strip() == HEADING), None)
    if start is None:
        new = old.rstrip("\n") + "\n\n" + text
    else:
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")),
                   len(lines))
        new = "".join(lines[:start]) + text + ("\n" if end < len(lines) else "") \
            + "".join(lines[end:])
    RESULTS.write_text(new)


if __name__ == "__main__":
    main()
