"""The trial lifecycle, owned by the harness for every task: train epochs -> report -> suspend or
resume -> record -> (later, for the finalists) evaluate on the test set.

A task supplies an `EpochTrial` subclass: its constructor builds data, model and optimisers
from the parameters; `train_epoch` runs one epoch; `validate` scores it; `test` evaluates
the finished model on the test set (only for finalists: `bench eval`, or variants). The
harness does the rest, once for all tasks:

- the epoch loop's bookkeeping: timing, one host sync per epoch, the non-finite guard,
  reports to the backend and its pruning decision, the progress display;
- state at epoch boundaries: every `nn.Module`, optimiser, LR scheduler and generator the
  trial holds (found among its attributes), the names in `extra_state`, the global RNGs
  and the curve, saved to `resume.pt` when the run is asked to stop (Ctrl-C, SIGTERM, a
  preemption notice) and at most every `checkpoint_every_s` otherwise, so a killed or
  interrupted trial resumes at its last saved epoch and ends bit-identical on CPU;
- the final checkpoint (`checkpoint.pt`: the trained state without optimiser moments),
  from which `bench eval` computes the test metrics later;
- the row: one per finished trial (COMPLETE, PRUNED, FAIL), typed by the task's
  declarations, written atomically; by a `RowWriter` thread where the backend runs many
  trials in one process, so encoding and writing the Parquet files overlaps the next trial.

Every state file loads with `torch.load(weights_only=True)`: plain tensors, numbers,
strings, lists and dicts, never pickled code.
"""

from __future__ import annotations

import datetime as dt
import functools
import hashlib
import json
import math
import os
import queue
import random
import socket
import subprocess
import threading
import time
import traceback
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

import bench
from bench import leaderboard, signals
from bench.errors import DataError, TrialPruned, TrialSuspended
from bench.params import THROUGHPUT, Decl, Metric
from bench.train import peak_mem_gb, reset_peak_memory, seed_everything
from bench.trial import TrialContext

RESUME_FILE = "resume.pt"
CHECKPOINT_FILE = "checkpoint.pt"


class EpochTrial:
    """One trial of a task, driven epoch by epoch by the harness. Subclass it.

    `__init__(params, ctx)` builds everything (data on `ctx.device`, model, optimisers,
    generators seeded from `ctx.seed`); it runs again when a trial resumes, before its
    saved state is loaded. Attributes that are modules, optimisers, schedulers or
    generators are saved and restored by the harness; list other attributes that change
    during training (counters, running values) in `extra_state`.
    """

    extra_state: tuple[str, ...] = ()
    examples_per_epoch: int = 0  # for the harness's throughput figure

    def __init__(self, params: Mapping[str, Any], ctx: TrialContext):
        self.params, self.ctx = params, ctx

    @property
    def epochs(self) -> int:
        return int(self.params["epochs"])

    def train_epoch(self, epoch: int) -> Mapping[str, Any]:
        """One pass over the training data; metrics may be device tensors (read once)."""
        raise NotImplementedError

    def validate(self, epoch: int) -> Mapping[str, Any]:
        """Validation metrics after `epoch` (the objective among them at least at the end)."""
        return {}

    def finish(self) -> Mapping[str, Any]:
        """Search-time metrics computed once, after the last epoch (no test data)."""
        return {}

    def test(self) -> Mapping[str, Any]:
        """Test-set metrics of the trained model: for finalists only (`bench eval`)."""
        return {}

    def save_artifacts(self, folder: Path) -> None:
        """Figures' data for `bench plot`, written after `test` (finalists only)."""

    def restored(self) -> None:
        """Called after a saved state was loaded (rebuild what is derived from it)."""

    def sizes(self) -> dict[str, int]:
        """Examples in each split this trial uses ({"train": n, "val": n, "test": n})."""
        return {}

    # ------------------------------------------------------------ state
    def state_dict(self, optimizers: bool = True) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name, obj in vars(self).items():
            if isinstance(obj, torch.nn.Module):
                out[name] = obj.state_dict()
            elif isinstance(obj, torch.Generator):
                out[name] = obj.get_state()
            elif isinstance(obj, np.random.Generator):
                out[name] = obj.bit_generator.state
            elif optimizers and isinstance(obj, (torch.optim.Optimizer,
                                                 torch.optim.lr_scheduler.LRScheduler)):
                out[name] = obj.state_dict()
            elif optimizers and isinstance(obj, list) and obj and all(
                    isinstance(o, torch.optim.Optimizer) for o in obj):
                out[name] = [o.state_dict() for o in obj]
        for name in self.extra_state:
            out[name] = getattr(self, name)
        return out

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        for name, value in state.items():
            obj = getattr(self, name, None)
            if isinstance(obj, torch.nn.Module):
                obj.load_state_dict(value)
            elif isinstance(obj, torch.Generator):
                obj.set_state(value.cpu() if obj.device.type == "cpu" else value)
            elif isinstance(obj, np.random.Generator):
                obj.bit_generator.state = value
            elif isinstance(obj, (torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler)):
                obj.load_state_dict(value)
            elif isinstance(obj, list) and obj and isinstance(obj[0], torch.optim.Optimizer):
                for o, s in zip(obj, value, strict=True):
                    o.load_state_dict(s)
            else:
                setattr(self, name, value)
        self.restored()


class TaskSpec(Protocol):
    """What the lifecycle needs of a registered task (bench.registry.Task)."""

    @property
    def name(self) -> str: ...

    @property
    def trial(self) -> type[EpochTrial]: ...

    @property
    def params(self) -> Mapping[str, Decl]: ...

    @property
    def metrics(self) -> Mapping[str, Metric]: ...


# ---------------------------------------------------------------- saved state
def _rng_state(device: torch.device) -> dict[str, Any]:
    np_state: Any = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)),
                       *np_state[2:]]}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: Mapping[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"].cpu())
    random.setstate(_tuples(state["python"]))
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), *rest))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"].cpu(), device)


def _tuples(x: Any) -> Any:
    return tuple(_tuples(v) for v in x) if isinstance(x, (list, tuple)) else x


def save_state(path: Path, blob: Mapping[str, Any]) -> None:
    """Atomically: a temporary file, fsync, then rename; a kill leaves the old state whole."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as fh:
        torch.save(dict(blob), fh)
        fh.flush()
        os.fsync(fh.fileno())
    tmp.replace(path)


def load_state(path: Path, device: torch.device | str = "cpu") -> dict[str, Any]:
    """A saved state, loaded as plain data only (`weights_only=True`): a file that holds
    anything else (pickled code) is refused, never run."""
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except Exception as exc:  # UnpicklingError, a truncated file, a foreign format
        raise DataError(f"{path}: refusing to load this state file: it is not a plain-data "
                        f"bench state ({type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
                        f"). Delete it to restart the trial from scratch.") from None


# ---------------------------------------------------------------- the epoch loop
@dataclass
class TrialProgress:
    """What a trial's attempts have done so far (kept in the resume state)."""

    next_epoch: int = 0
    train_s: float = 0.0
    elapsed_s: float = 0.0  # earlier attempts' wall time
    attempts: int = 1
    started_at: str | None = None
    last: dict[str, float] = field(default_factory=dict)


def _floats(values: Mapping[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in values.items()}


def _check_finite(values: Mapping[str, float], epoch: int) -> None:
    bad = {k: v for k, v in values.items() if not math.isfinite(v)}
    if bad:
        what = ", ".join(f"{k}={v}" for k, v in bad.items())
        raise FloatingPointError(f"non-finite {what} at epoch {epoch}")


def _resume_blob(trial: EpochTrial, ctx: TrialContext, prog: TrialProgress,
                 wall_s: float) -> dict[str, Any]:
    return {"trial": trial.state_dict(), "rng": _rng_state(ctx.device),
            "curve": [list(p) for p in ctx.curve], "steps_done": ctx.steps_done,
            "progress": {**vars(prog), "elapsed_s": prog.elapsed_s + wall_s}}


def _restore(trial: EpochTrial, ctx: TrialContext, prog: TrialProgress) -> None:
    path = ctx.artifact_dir / RESUME_FILE
    if not path.exists():
        return
    saved = load_state(path, ctx.device)
    trial.load_state_dict(saved["trial"])
    _set_rng_state(saved["rng"], ctx.device)
    ctx.curve = [(int(s), str(k), float(v)) for s, k, v in saved["curve"]]
    ctx.steps_done = int(saved["steps_done"])
    for k, v in saved["progress"].items():
        setattr(prog, k, v)
    prog.attempts += 1
    ctx.resumed_from = prog.next_epoch


def train(spec: TaskSpec, params: Mapping[str, Any], ctx: TrialContext,
          evaluate: bool = False, prog: TrialProgress | None = None,
          rows: RowWriter | None = None) -> dict[str, float]:
    """Run (or resume) the trial to its end; returns its final metrics.

    Raises TrialPruned (the backend's decision after a report), TrialSuspended (a stop was
    requested: the state is saved), or the task's own exception."""
    prog = prog or TrialProgress()
    t_wall = time.perf_counter()
    with signals.interruptible():
        trial = spec.trial(params, ctx)
        _restore(trial, ctx, prog)
    saved_at = time.perf_counter()
    for epoch in range(prog.next_epoch, trial.epochs):
        with signals.interruptible():
            if rows is not None:
                rows.open()  # earlier trials' rows are written while this one trains
            t0 = time.perf_counter()
            values = _floats(trial.train_epoch(epoch))  # the epoch's one host sync
            prog.train_s += time.perf_counter() - t0
            _check_finite(values, epoch)
            val = _floats(trial.validate(epoch))
            _check_finite(val, epoch)
        values.update(val)
        prog.last.update(values)
        prog.next_epoch = epoch + 1
        ctx.report(epoch, **values)  # may raise TrialPruned
        stop = ctx.should_stop()
        if stop or time.perf_counter() - saved_at >= ctx.checkpoint_every_s:
            if ctx.before_save is not None:
                ctx.before_save()  # the backend records the trial before its state exists
            save_state(ctx.artifact_dir / RESUME_FILE,
                       _resume_blob(trial, ctx, prog, time.perf_counter() - t_wall))
            saved_at = time.perf_counter()
        if stop and epoch + 1 < trial.epochs:
            raise TrialSuspended(f"suspended after epoch {epoch} ({signals.stop_reason()})")
    with signals.interruptible():
        final = {**prog.last, **_floats(trial.finish())}
        if prog.train_s > 0 and trial.examples_per_epoch:
            final[THROUGHPUT] = trial.examples_per_epoch * trial.epochs / prog.train_s
        if any(isinstance(v, torch.nn.Module) for v in vars(trial).values()):
            save_state(ctx.artifact_dir / CHECKPOINT_FILE,  # a model to evaluate later
                       {"trial": trial.state_dict(optimizers=False), "epochs_done": trial.epochs})
        if evaluate:
            final.update(_floats(trial.test()))
            trial.save_artifacts(ctx.artifact_dir)
    return final


def evaluate_checkpoint(spec: TaskSpec, params: Mapping[str, Any],
                        ctx: TrialContext) -> dict[str, float]:
    """`bench eval`: rebuild the trial, load its final checkpoint, compute test metrics."""
    path = ctx.artifact_dir / CHECKPOINT_FILE
    if not path.exists():
        raise DataError(f"{path}: no checkpoint (the trial did not finish, or its artifacts "
                        f"were deleted); `bench rerun {ctx.artifact_dir.name} --record` trains "
                        "it again as a new row with its checkpoint")
    seed_everything(ctx.seed)
    trial = spec.trial(params, ctx)
    trial.load_state_dict(load_state(path, ctx.device)["trial"])
    metrics = _floats(trial.test())
    trial.save_artifacts(ctx.artifact_dir)
    return metrics


# ---------------------------------------------------------------- one trial, one row
@dataclass
class Outcome:
    state: str  # COMPLETE | PRUNED | FAIL, or SUSPENDED (no row: the trial resumes later)
    objective: float | None
    metrics: dict[str, float]
    error: str | None
    row: dict[str, Any]
    row_error: str | None = None  # the row could not be written (disk full, read-only)


def new_trial_uid() -> str:
    return uuid.uuid4().hex[:16]


def config_hash(task: str, params: Mapping[str, Any]) -> str:
    """Hash of the task and its merged parameters: the seed is not a parameter, and neither
    are execution parameters (how a trial runs, not what it trains: `Decl.execution`); a
    parameter added later counts only away from its default (`Decl.since`)."""
    from bench.registry import get_task

    decl = get_task(task)
    execution = decl.execution
    kept = {k: params[k] for k in sorted(params)
            if k not in execution and not decl.at_added_default(k, params[k])}
    blob = json.dumps({"task": task, "params": kept}, sort_keys=True, default=str)
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


def now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def build_row(identity: Mapping[str, Any], params: Mapping[str, Any], *, state: str,
              objective: float | None, metric: str, direction: str,
              metrics: Mapping[str, float], error: str | None, started_at: dt.datetime,
              finished_at: dt.datetime, duration_s: float | None = None,
              train_s: float | None = None, epochs_done: int = 0, attempts: int = 1,
              peak_mem: float | None = None, device: torch.device | str = "cpu",
              ) -> dict[str, Any]:
    row: dict[str, Any] = {k: identity.get(k) for k in leaderboard.IDENTITY}
    row.update({f"param_{k}": v for k, v in params.items()})
    row.update(state=state, objective=objective, metric=metric, direction=direction, error=error)
    row.update({f"metric_{k}": float(v) for k, v in metrics.items()})
    duration = (finished_at - started_at).total_seconds() if duration_s is None else duration_s
    row.update(started_at=started_at, finished_at=finished_at, duration_s=duration,
               train_s=train_s, epochs_done=epochs_done, attempts=attempts,
               peak_mem_gb=peak_mem)
    row["config_hash"] = config_hash(row["task"], params)
    row.update(provenance(torch.device(device)))
    return row


def check_metrics(spec: TaskSpec, metrics: Mapping[str, float],
                  metric: str) -> tuple[dict[str, float], float]:
    values = dict(metrics)
    unknown = sorted(set(values) - set(spec.metrics))
    if unknown:
        raise KeyError(f"task {spec.name!r} returned undeclared metric(s) {unknown}; declare "
                       "them in its register_task(metrics=...)")
    if metric not in values:
        raise KeyError(f"objective metric {metric!r} not among the returned metrics "
                       f"({', '.join(sorted(values)) or 'none'})")
    bad = [k for k, v in values.items() if not math.isfinite(v)]
    if bad:
        raise ValueError("non-finite final metric(s): "
                         + ", ".join(f"{k}={values[k]}" for k in bad))
    return values, values[metric]


def error_text(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def config_failure(spec: TaskSpec, out: Path, metric: str, direction: str,
                   identity: Mapping[str, Any], params: Mapping[str, Any], broken: list[str],
                   device: Any = None) -> Outcome:
    """A sampled point that breaks a cross-parameter rule: a FAIL row naming the rules,
    written at once (every backend), and its outcome."""
    t = now()
    row = build_row(identity, params, state="FAIL", objective=None, metric=metric,
                    direction=direction, metrics={}, error="ConfigError: " + "; ".join(broken),
                    started_at=t, finished_at=t, device=device)
    outcome = Outcome("FAIL", None, {}, row["error"], row)
    outcome.row_error = write_row(out, spec, row)
    return outcome


def execute_trial(spec: TaskSpec, params: Mapping[str, Any], ctx: TrialContext,
                  identity: Mapping[str, Any], out: Path, direction: str,
                  evaluate: bool = False, rows: RowWriter | None = None) -> Outcome:
    """Run (or resume) one trial and write its row (or queue it on `rows`: its write
    failure is then reported by `rows`, not by the outcome); a stop request leaves it
    SUSPENDED."""
    started, t0 = now(), time.perf_counter()
    prog = TrialProgress(started_at=started.isoformat())
    state, value, error = "FAIL", None, None
    metrics: dict[str, float] = {}
    try:
        seed_everything(ctx.seed)
        reset_peak_memory(ctx.device)
        final = train(spec, params, ctx, evaluate, prog, rows)
        metrics, value = check_metrics(spec, final, ctx.metric)
        state = "COMPLETE"
    except TrialPruned as exc:
        state, error = "PRUNED", str(exc)
    except (TrialSuspended, KeyboardInterrupt) as exc:  # not finished: no row, resumed later
        return Outcome("SUSPENDED", None, {}, error_text(exc), {})
    except Exception as exc:
        error = error_text(exc)
        _save_traceback(ctx.artifact_dir)
    started = dt.datetime.fromisoformat(prog.started_at or started.isoformat())
    if state == "PRUNED":  # the last reported objective stands for a pruned trial
        value = next((v for s, k, v in reversed(ctx.curve) if k == ctx.metric), None)
        metrics = {k: v for k, v in prog.last.items() if k in spec.metrics}
    finished = now()
    duration = prog.elapsed_s + time.perf_counter() - t0  # every attempt's wall time
    row = build_row(identity, params, state=state, objective=value, metric=ctx.metric,
                    direction=direction, metrics=metrics, error=error, started_at=started,
                    finished_at=finished, duration_s=duration, train_s=prog.train_s or None,
                    epochs_done=ctx.steps_done, attempts=prog.attempts,
                    peak_mem=peak_mem_gb(ctx.device), device=ctx.device)
    outcome = Outcome(state, value, metrics, error, row)
    resume_file = ctx.artifact_dir / RESUME_FILE
    if rows is not None:
        rows.submit(out, spec, row, ctx.curve, resume_file)
    else:
        outcome.row_error = write_then_forget(out, spec, row, ctx.curve, resume_file)
    return outcome


def write_then_forget(out: Path, spec: TaskSpec, row: Mapping[str, Any],
                       curve: list[tuple[int, str, float]], resume_file: Path) -> str | None:
    problem = write_row(out, spec, row, curve)
    if problem is None:
        resume_file.unlink(missing_ok=True)  # finished: never resumed
    return problem


class RowWriter:
    """Writes finished trials' rows (and curves) on a thread of its own, in order, so that
    encoding and writing the Parquet files (~1-2 ms a trial) overlaps the next trial instead
    of adding to it (benchmarks/harness_overhead.py). A process killed with rows still
    queued loses none of them for good: the backend records each result in the study right
    after queueing its row (as the resume file, deleted only once the row is written, keeps
    the trial resumable until then), and the next run's repair pass writes a finished
    trial's missing row from the study's record (on a heartbeat storage once it has been
    finished for the grace period; without the curve and the cost columns only the
    trial's process knew). `flush()` waits for the queue; the reasons rows could
    not be written (disk full, read-only) come back from `errors()` and `flush()`.

    The writer yields to the harness: after a row is queued it waits until the next trial
    is training (`open()`, called by the lifecycle before each epoch), at most `patience_s`,
    unless more rows wait behind it (trials shorter than a row's write: it then writes at
    once, so it never falls more than a trial or two behind), so that its Python
    (encoding, ~1 ms) runs beside the trial's compute rather than beside the tell, ask
    and pruning of the trial boundary, where on 2 cores it slowed the harness by ~1.5 ms
    a trial (benchmarks/harness_overhead.py)."""

    def __init__(self, patience_s: float = 1.0) -> None:
        self._queue: queue.Queue[tuple[Any, ...] | None] = queue.Queue()
        self._errors: list[str] = []
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._gate = threading.Event()
        self._gate.set()
        self.patience_s = patience_s

    def open(self) -> None:
        """A trial is training: queued rows may be written now."""
        self._gate.set()

    def submit(self, out: Path, spec: TaskSpec, row: Mapping[str, Any],
               curve: list[tuple[int, str, float]], resume_file: Path) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._loop, name="bench-rows", daemon=True)
            self._thread.start()
        self._gate.clear()  # the trial boundary's storage work comes first
        self._queue.put((out, spec, dict(row), list(curve), resume_file))

    def _loop(self) -> None:
        while True:
            job = self._queue.get()
            try:
                if job is None:
                    return
                # caught up, yield to the trial boundary; behind (short trials), write now
                deadline = time.monotonic() + self.patience_s
                while (not self._gate.wait(0.05) and self._queue.empty()
                       and time.monotonic() < deadline):
                    pass
                try:
                    problem = write_then_forget(*job)
                except Exception as exc:  # a bug must not lose the rows queued after it
                    problem = error_text(exc)
                if problem is not None:
                    with self._lock:
                        self._errors.append(f"trial {job[2].get('trial_number')}: could not "
                                            f"write its row: {problem}")
            finally:
                self._queue.task_done()

    def errors(self) -> list[str]:
        """The write failures since the last call."""
        with self._lock:
            found, self._errors = self._errors, []
        return found

    def flush(self) -> list[str]:
        """Wait until every queued row is written; the write failures since the last call."""
        self._gate.set()
        if self._thread is not None and self._thread.is_alive():
            self._queue.join()
        return self.errors()


def write_row(out: Path, spec: TaskSpec, row: Mapping[str, Any],
              curve: list[tuple[int, str, float]] | None = None) -> str | None:
    """Write a row (and its curve); the reason it could not be written, or None."""
    try:
        leaderboard.write_trial(out, row, curve or (), leaderboard.task_schema(spec))
    except OSError as exc:  # a write error (disk full) names no file: the row's is named
        where = getattr(exc, "filename", None) or leaderboard.trial_path(
            out, str(row.get("task")), str(row.get("trial_uid")))
        return f"{exc.strerror or exc} ({where})"
    return None


def _save_traceback(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "error.txt").write_text(traceback.format_exc())
    except OSError:
        pass
