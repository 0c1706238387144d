"""`TrialContext`: what an objective sees of the backend running it.

An objective reports curve points with `ctx.report(step, **metrics)`; the backend hears
about the objective metric through `on_report` and may stop the trial by returning True
from `should_prune()`, in which case `report` raises `TrialPruned`. Objectives never
import Optuna or Ray, so the same function runs under either, under Slurm, or in a test.

Preemption is backend-neutral too: `should_stop()` turns True when the backend wants the
trial to give up its slot (Slurm's `--signal=USR2@90` under `bench run --worker-id`); the
objective then calls `suspend(state)` at a step boundary, which saves `state` and the curve
so far and ends this attempt (no row). When the backend runs the trial again (same
artifact folder), `load_state()` returns that state, restores the curve, and the objective
continues where it stopped:

    state = ctx.load_state()                      # None on a fresh trial
    first = 0 if state is None else state["next_epoch"]
    for epoch in range(first, epochs):
        ...
        ctx.report(epoch, ...)
        if ctx.should_stop():
            ctx.suspend({"next_epoch": epoch + 1, "model": model.state_dict(), ...})
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import torch

from bench.errors import TrialPruned, TrialSuspended

STATE_FILE = "suspended_state.pt"


def _never() -> bool:
    return False


@dataclass
class TrialContext:
    seed: int
    device: torch.device
    artifact_dir: Path
    metric: str = ""  # the objective metric; its reported values go to `on_report`
    data_dir: Path | None = None
    on_report: Callable[[int, float], None] | None = None
    prune_check: Callable[[], bool] = _never
    on_step: Callable[[int, dict[str, float]], None] | None = None  # progress display
    curve: list[tuple[int, str, float]] = field(default_factory=list)
    steps_done: int = 0
    stop_check: Callable[[], bool] = _never  # the backend asks the trial to suspend

    @property
    def state_path(self) -> Path:
        """Where `suspend` saves the trial's state: the artifact folder, kept across attempts."""
        return self.artifact_dir / STATE_FILE

    def report(self, step: int, **metrics: Any) -> None:
        """Record one curve point per metric at `step` (an epoch); may raise TrialPruned."""
        values = {k: float(v) for k, v in metrics.items()}
        self.curve.extend((int(step), k, v) for k, v in values.items())
        self.steps_done = max(self.steps_done, int(step) + 1)
        if self.on_step is not None:
            self.on_step(int(step), values)
        value = values.get(self.metric)
        if value is not None and math.isfinite(value) and self.on_report is not None:
            self.on_report(int(step), value)
            if self.should_prune():
                raise TrialPruned(f"pruned at step {step} ({self.metric}={value:.6g})")

    def should_prune(self) -> bool:
        return bool(self.prune_check())

    def should_stop(self) -> bool:
        """True when the backend wants this trial suspended (e.g. a preemption notice)."""
        return bool(self.stop_check())

    def suspend(self, state: Any) -> NoReturn:
        """Save `state` (anything `torch.save` takes) and the curve so far, then end this
        attempt with `TrialSuspended`; the backend resumes the trial later."""
        self.artifact_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.state_path.with_name(f".{STATE_FILE}.tmp")
        torch.save({"state": state, "curve": list(self.curve), "steps_done": self.steps_done},
                   tmp)
        tmp.replace(self.state_path)
        raise TrialSuspended(f"suspended after step {self.steps_done - 1}")

    def load_state(self) -> Any | None:
        """The state saved by `suspend` in an earlier attempt (its curve restored), or None."""
        if not self.state_path.exists():
            return None
        saved = torch.load(self.state_path, map_location=self.device, weights_only=False)
        self.curve = [tuple(p) for p in saved["curve"]]  # type: ignore[misc]
        self.steps_done = int(saved["steps_done"])
        return saved["state"]


def local_context(seed: int = 0, device: str = "cpu", artifact_dir: str | Path = ".",
                  metric: str = "", data_dir: str | Path | None = None) -> TrialContext:
    """A context with no backend: for tests, notebooks and benchmarks."""
    from bench.train import seed_everything

    seed_everything(seed)
    Path(artifact_dir).mkdir(parents=True, exist_ok=True)
    return TrialContext(seed, torch.device(device), Path(artifact_dir), metric,
                        Path(data_dir) if data_dir else None)
