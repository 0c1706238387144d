"""`TrialContext`: what a trial sees of the backend running it.

The trial lifecycle (`bench.lifecycle`) reports each epoch's metrics with
`ctx.report(step, **metrics)`; the backend hears the objective metric through `on_report`
and may stop the trial by returning True from `prune_check`, in which case `report` raises
`TrialPruned`. `stop_check` turns True when the run must give up the trial's slot (Ctrl-C,
SIGTERM, a preemption notice): the lifecycle then saves the trial's state at the epoch
boundary and ends the attempt with `TrialSuspended`. Tasks never import Optuna or Ray, so
the same trial runs under either, under Slurm, or in a plain test.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from bench import signals
from bench.errors import TrialPruned


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
    stop_check: Callable[[], bool] = signals.stop_requested
    checkpoint_every_s: float = 60.0  # resume state saved at epoch ends at most this often
    before_save: Callable[[], None] | None = None  # called before each resume state is saved
    curve: list[tuple[int, str, float]] = field(default_factory=list)
    steps_done: int = 0
    resumed_from: int | None = None  # the epoch a resumed attempt started at

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
        """True when the backend wants this trial suspended (Ctrl-C, preemption notice)."""
        return bool(self.stop_check())


def local_context(seed: int = 0, device: str = "cpu", artifact_dir: str | Path = ".",
                  metric: str = "", data_dir: str | Path | None = None,
                  **kw: Any) -> TrialContext:
    """A context with no backend, its seed applied: for tests, notebooks and benchmarks."""
    from bench.train import seed_everything

    seed_everything(seed)
    Path(artifact_dir).mkdir(parents=True, exist_ok=True)
    kw.setdefault("stop_check", _never)
    return TrialContext(seed, torch.device(device), Path(artifact_dir), metric,
                        Path(data_dir) if data_dir else None, **kw)
