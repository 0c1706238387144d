"""What every backend shares: running one trial and turning its outcome into a leaderboard row.

`execute_trial` is the only place that calls an objective. It times it, catches what it
raises (pruning, exceptions, a non-finite objective), records the peak memory, and writes
the trial's row and curve to the leaderboard before the backend hears the outcome, so
every trial that ends, COMPLETE, PRUNED or FAIL, has a row.
"""

from __future__ import annotations

import datetime as dt
import functools
import hashlib
import json
import math
import socket
import subprocess
import time
import traceback
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

import bench
from bench import leaderboard
from bench.errors import TrialPruned, TrialSuspended
from bench.registry import Task
from bench.train import peak_mem_gb, reset_peak_memory, seed_everything
from bench.trial import TrialContext


@dataclass
class RunOptions:
    """Everything a backend needs to run a task's trials; built by the CLI from its flags."""

    task: str
    trials: int | None = None
    variant: str | None = None
    sampler: str = "tpe"
    pruner: str | None = None  # None: median for searches, none for enumerated variants
    seed: int = 0
    overrides: Mapping[str, Any] = field(default_factory=dict)
    study: str | None = None
    storage: str | None = None
    out: Path = Path("leaderboards")
    data_dir: Path | None = None
    device: str = "auto"
    workers: int = 1
    space_file: Path | None = None
    progress: bool = True
    extra: Mapping[str, Any] = field(default_factory=dict)  # backend-specific options


@dataclass
class Outcome:
    state: str  # COMPLETE | PRUNED | FAIL, or SUSPENDED (no row: the trial will resume)
    objective: float | None
    metrics: dict[str, float]
    error: str | None
    row: dict[str, Any]


def preflight(task: Task, param_sets: list[Mapping[str, Any]], data_dir: Path | None) -> None:
    """Run the task's own checks on every known parameter set before anything is written."""
    if task.check is None:
        return
    seen: set[str] = set()
    for params in param_sets:
        key = config_hash(task.name, params)
        if key not in seen:
            seen.add(key)
            task.check(params, data_dir)


def new_trial_uid() -> str:
    return uuid.uuid4().hex[:16]


def config_hash(task: str, params: Mapping[str, Any]) -> str:
    """Hash of the task and its merged parameters; the seed is not a parameter."""
    blob = json.dumps({"task": task, "params": {k: params[k] for k in sorted(params)}},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


@functools.lru_cache(maxsize=1)
def git_sha() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=5, cwd=Path(bench.__file__).resolve().parent)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def provenance(device: torch.device) -> dict[str, Any]:
    cuda = device.type == "cuda" and torch.cuda.is_available()
    return {"git_sha": git_sha(), "bench_version": bench.__version__,
            "torch_version": torch.__version__, "device": str(device),
            "gpu_name": torch.cuda.get_device_name(device) if cuda else None,
            "host": socket.gethostname()}


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def build_row(identity: Mapping[str, Any], params: Mapping[str, Any], *, state: str,
              objective: float | None, metric: str, direction: str,
              metrics: Mapping[str, float],
              error: str | None, started_at: dt.datetime, finished_at: dt.datetime,
              epochs_done: int, peak_mem: float | None, device: torch.device) -> dict[str, Any]:
    row: dict[str, Any] = {k: identity.get(k) for k in leaderboard.IDENTITY}
    row.update({f"param_{k}": v for k, v in params.items()})
    row.update(state=state, objective=objective, metric=metric, direction=direction, error=error)
    row.update({f"metric_{k}": float(v) for k, v in metrics.items()})
    row.update(started_at=started_at, finished_at=finished_at,
               duration_s=(finished_at - started_at).total_seconds(),
               epochs_done=epochs_done, peak_mem_gb=peak_mem)
    row["config_hash"] = config_hash(row["task"], params)
    row.update(provenance(device))
    return row


def _check_metrics(metrics: Any, metric: str) -> tuple[dict[str, float], float]:
    if not isinstance(metrics, Mapping):
        kind = type(metrics).__name__
        raise TypeError(f"objective must return a mapping of metrics, got {kind}")
    values = {str(k): float(v) for k, v in metrics.items()}
    if metric not in values:
        raise KeyError(f"objective metric {metric!r} not among the returned metrics "
                       f"({', '.join(sorted(values)) or 'none'})")
    bad = [k for k, v in values.items() if not math.isfinite(v)]
    if bad:
        raise ValueError("non-finite final metric(s): "
                         + ", ".join(f"{k}={values[k]}" for k in bad))
    return values, values[metric]


def _error_text(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def execute_trial(task: Task, params: Mapping[str, Any], ctx: TrialContext,
                  identity: Mapping[str, Any], out: Path, direction: str) -> Outcome:
    """Run the objective once and write its row; KeyboardInterrupt/SystemExit re-raised after."""
    started, t0 = _now(), time.perf_counter()
    state, value, error = "FAIL", None, None
    metrics: dict[str, float] = {}
    interrupt: BaseException | None = None
    try:
        seed_everything(ctx.seed)
        reset_peak_memory(ctx.device)
        metrics, value = _check_metrics(task.objective(params, ctx), ctx.metric)
        state = "COMPLETE"
    except TrialPruned as exc:
        state, error = "PRUNED", str(exc)
    except TrialSuspended as exc:  # not finished: no row; the backend resumes it later
        return Outcome("SUSPENDED", None, {}, str(exc), {})
    except Exception as exc:
        error = _error_text(exc)
        _save_traceback(ctx.artifact_dir)
    except (KeyboardInterrupt, SystemExit) as exc:
        error, interrupt = f"interrupted ({type(exc).__name__})", exc
    finished = started + dt.timedelta(seconds=time.perf_counter() - t0)
    if state == "PRUNED":  # the last reported objective stands for a pruned trial
        value = next((v for s, k, v in reversed(ctx.curve) if k == ctx.metric), None)
    row = build_row(identity, params, state=state, objective=value, metric=ctx.metric,
                    direction=direction, metrics=metrics, error=error,
                    started_at=started, finished_at=finished,
                    epochs_done=ctx.steps_done, peak_mem=peak_mem_gb(ctx.device),
                    device=ctx.device)
    leaderboard.write_trial(out, row, ctx.curve)
    ctx.state_path.unlink(missing_ok=True)  # a finished trial is never resumed
    if interrupt is not None:
        raise interrupt
    return Outcome(state, value, metrics, error, row)


def _save_traceback(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "error.txt").write_text(traceback.format_exc())
    except OSError:
        pass
