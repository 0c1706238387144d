"""`bench board` over a large leaderboard: N generated rows of the synthetic task (one
Parquet file per trial, as bench writes them; 10 studies, 3 seeds per configuration), then
the board's wall time cold (no cache: every file read), warm (the rows cache matches the
folder), and after 100 more trials were written (the cache reads only those).

Usage: python benchmarks/board_bench.py --rows 100000 [--out /tmp/board-bench]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from bench import leaderboard
from bench.lifecycle import build_row, new_trial_uid
from bench.registry import get_task


def generate(out: Path, n: int, start: int = 0) -> None:
    task = get_task("synthetic")
    schema = leaderboard.task_schema(task)
    rng = np.random.default_rng(start)
    t = dt.datetime(2026, 11, 30, tzinfo=dt.timezone.utc)
    for i in range(start, start + n):
        x, y = float(rng.uniform(-2, 2)), float(rng.uniform(-1, 3))
        config = i // 3
        params = {**task.defaults, "x": round(x, 1) if config % 2 else x, "y": y}
        ident = {"task": "synthetic", "study": f"s{config % 10}", "study_uid": f"u{config % 10}",
                 "variant": "default", "trial_uid": new_trial_uid(), "trial_number": i,
                 "backend": "optuna", "sampler": "tpe", "pruner": "median", "seed": i % 3}
        loss = (1 - x) ** 2 + 100 * (y - x * x) ** 2
        row = build_row(ident, params, state="COMPLETE", objective=loss, metric="loss",
                        direction="minimize", metrics={"loss": loss, "distance": 1.0},
                        error=None, started_at=t, finished_at=t, epochs_done=5)
        leaderboard.write_trial(out, row, (), schema)


def board_seconds(out: Path) -> float:
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, "-m", "bench.cli", "board", "synthetic", "--out",
                          str(out), "--top", "5"], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--out", type=Path, default=Path("/tmp/board-bench"))
    args = ap.parse_args()
    shutil.rmtree(args.out, ignore_errors=True)
    t0 = time.perf_counter()
    generate(args.out, args.rows)
    gen_s = time.perf_counter() - t0
    t_import = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import bench.cli, bench.board"], check=True)
    import_s = time.perf_counter() - t_import
    cold = board_seconds(args.out)
    warm = [board_seconds(args.out) for _ in range(3)]
    generate(args.out, 100, start=args.rows)
    after = board_seconds(args.out)
    print(json.dumps({"rows": args.rows, "generate_s": round(gen_s, 1),
                      "python_and_imports_s": round(import_s, 2),
                      "board_cold_s": round(cold, 2),
                      "board_warm_s": [round(w, 2) for w in warm],
                      "board_after_100_new_rows_s": round(after, 2)}, indent=2))


if __name__ == "__main__":
    main()
