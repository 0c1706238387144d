"""Final evaluation and reruns, from the leaderboard's rows and the trials' checkpoints.

- `bench eval`: search trials never touch the test set; once a study is done, its best
  configurations (every seed of each) are evaluated from their final checkpoints, and the
  test metrics are added to their rows, where `board`, `plot` and pandas read them.
- `bench rerun UID`: one trial again, from its row (parameters and seed), as a standalone
  trial; on the CPU its objective equals the original's.
"""

from __future__ import annotations

import contextlib
import json
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from bench import leaderboard
from bench.errors import BenchError, ConfigError
from bench.lifecycle import evaluate_checkpoint, execute_trial, new_trial_uid, now
from bench.registry import Task, get_task
from bench.train import resolve_device, seed_everything
from bench.trial import local_context


def params_of(task: Task, row: Mapping[str, Any]) -> dict[str, Any]:
    """A row's merged parameters in their declared types (a parameter added to the task
    since the row was written takes its default)."""
    params = dict(task.defaults)
    for name, decl in task.params.items():
        value = row.get(f"param_{name}")
        if value is not None and not (isinstance(value, float) and value != value):
            params[name] = decl.coerce(value)
        elif f"param_{name}" in row:
            params[name] = None if decl.nullable else decl.default
    return params


def finalists(rows: pd.DataFrame, top: int) -> pd.DataFrame:
    """COMPLETE rows of the `top` best configurations (by mean objective over seeds)."""
    done = rows[rows["state"] == "COMPLETE"]
    if done.empty:
        return done
    direction = done["direction"].iloc[0]
    means = done.groupby("config_hash")["objective"].mean()
    best = means.sort_values(ascending=direction == "minimize").head(top).index
    return done[done["config_hash"].isin(best)]


@dataclass
class Evaluated:
    uid: str
    config_hash: str
    seed: int
    metrics: dict[str, float]


def check_eval(task: Task, overrides: Mapping[str, Any]) -> None:
    """ConfigError unless the task has test metrics and `overrides` are valid evaluation
    parameters (the others would change the trained model)."""
    if not task.has_test_metrics:
        raise ConfigError(f"task {task.name!r} has no test-set metrics to evaluate (its "
                          f"metrics: {', '.join(sorted(task.metrics))})")
    problems = task.problems(overrides, "--set") if overrides else []
    trained = sorted(k for k in overrides if k in task.params and k not in task.execution)
    if trained:
        problems.append(f"--set {', '.join(trained)}: bench eval takes evaluation parameters "
                        f"only ({', '.join(sorted(task.execution))}; marked * by `bench list "
                        f"{task.name}`); the others change the trained model: run a study "
                        "with them")
    if problems:
        raise ConfigError(problems)


def evaluate_rows(task: Task, rows: pd.DataFrame, out: Path, overrides: Mapping[str, Any],
                  device: str = "auto", data_dir: Path | None = None,
                  echo: Any = None) -> list[Evaluated]:
    """Test metrics for each row's trial from its checkpoint, written into its row. A trial
    that cannot be evaluated (its checkpoint deleted, ...) is reported and the others go
    on; the error lists every such trial at the end (exit 1)."""
    check_eval(task, overrides)
    dev = resolve_device(device)
    schema = leaderboard.task_schema(task)
    done: list[Evaluated] = []
    failed: list[str] = []
    records = rows.to_dict("records")
    for i, row in enumerate(records, 1):
        uid = str(row["trial_uid"])
        full = leaderboard.read_trial(out, task.name, uid) or row
        if echo is not None:  # the test set can take minutes a trial on a CPU: say so first
            echo(f"[{i}/{len(records)}] evaluating trial {uid} (seed {full['seed']}) on "
                 f"{dev} ...")
        started = time.perf_counter()
        params = {**params_of(task, full), **overrides}
        ctx = local_context(int(full["seed"]), str(dev),
                            leaderboard.task_dir(out, task.name) / "artifacts" / uid,
                            str(full["metric"]), data_dir)
        try:
            metrics = evaluate_checkpoint(task, params, ctx)
        except BenchError as exc:
            failed.append(f"trial {uid}: {exc}")
            if echo is not None:
                echo(f"[{i}/{len(records)}] trial {uid} not evaluated: {exc}")
            continue
        unknown = sorted(set(metrics) - set(task.metrics))
        if unknown:
            raise BenchError(f"task {task.name!r} returned undeclared metric(s) {unknown}")
        leaderboard.update_trial(out, task.name, uid, {
            **{f"metric_{k}": v for k, v in metrics.items()}, "evaluated_at": now(),
            "eval_params": json.dumps(dict(overrides), sort_keys=True, default=str)}, schema)
        done.append(Evaluated(uid, str(full["config_hash"]), int(full["seed"]), metrics))
        if echo is not None:
            echo(f"[{i}/{len(records)}] trial {uid} in {time.perf_counter() - started:.0f} s: "
                 + ", ".join(f"{k}={v:.5g}" for k, v in sorted(metrics.items())))
    if failed:
        raise EvaluationFailed(f"{len(failed)} of {len(records)} trial(s) not evaluated "
                               f"({len(done)} were):\n" + "\n".join(failed))
    return done


class EvaluationFailed(BenchError):
    """Some finalists could not be evaluated; the others were."""

    exit_code = 1


@dataclass
class Rerun:
    task: str
    uid: str
    original: float | None
    again: float | None
    state: str
    error: str | None


def rerun(out: Path, uid: str, device: str = "cpu", data_dir: Path | None = None,
          record: bool = False) -> Rerun:
    """Run the trial `uid` again from its row, standalone; both objectives."""
    found = leaderboard.find_trial(out, uid)
    if found is None:
        raise BenchError(f"no row for trial {uid!r} under {out} (look in "
                         f"{out}/<task>/trials/)")
    name, row = found
    task = get_task(name)
    params = params_of(task, row)
    seed = int(row["seed"])
    seed_everything(seed)
    new_uid = new_trial_uid()
    ident = {**{k: row.get(k) for k in leaderboard.IDENTITY}, "trial_uid": new_uid,
             "study": f"{row['study']}.rerun", "backend": "rerun"}
    with contextlib.ExitStack() as stack:
        if record:  # a recorded rerun is a trial of the leaderboard: its artifacts stay there
            art = leaderboard.task_dir(out, name) / "artifacts" / new_uid
            target = out
        else:  # nothing of an unrecorded rerun outlives it
            art = Path(stack.enter_context(tempfile.TemporaryDirectory(
                prefix=f"bench-rerun-{uid}-")))
            target = art / "lb"
        art.mkdir(parents=True, exist_ok=True)
        ctx = local_context(seed, str(resolve_device(device)), art, str(row["metric"]),
                            data_dir)
        outcome = execute_trial(task, params, ctx, ident, Path(target), str(row["direction"]))
    return Rerun(name, uid, row.get("objective"), outcome.objective, outcome.state,
                 outcome.error)
