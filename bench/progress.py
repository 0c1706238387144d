"""Live progress for `bench run`: trials done of this run's total, moving epoch by epoch (so
the elapsed time and the ETA move during a long trial), the running trials and their
epochs, and the best objective so far."""

from __future__ import annotations

import math
import sys
from typing import Any

from tqdm.auto import tqdm


class Progress:
    def __init__(self, plan: Any, total: int, study: Any = None):
        self.plan = plan
        self.maximize = plan.direction == "maximize"
        self.best: float | None = None
        self.done = 0
        self.running: dict[int, list[Any]] = {}  # worker -> [trial, epochs, epochs done]
        self.bar = tqdm(total=total, desc=f"{plan.task.name} [{plan.study_name}]", unit="trial",
                        file=sys.stderr, dynamic_ncols=True, disable=not plan.opts.progress,
                        bar_format="{l_bar}{bar}| {n:.1f}/{total_fmt} [{elapsed}<{remaining}"
                                   "{postfix}]")

    def _better(self, v: float) -> bool:
        return self.best is None or (v > self.best if self.maximize else v < self.best)

    def _refresh(self) -> None:
        partial = sum(min(1.0, done / epochs) for _, epochs, done in self.running.values()
                      if epochs)
        self.bar.n = min(self.bar.total or 0, self.done + partial)
        trials = " ".join(f"{t}:{d}/{e or '?'}" for t, e, d in self.running.values())
        best = "-" if self.best is None else f"{self.best:.4g}"
        self.bar.set_postfix_str(f"trial:epoch {trials or '-'} | best {self.plan.metric}={best}",
                                 refresh=True)

    # in-process events (worker 0) ...
    def start_trial(self, number: int, epochs: Any, worker: int = 0) -> None:
        self.running[worker] = [number, int(epochs) if epochs else 0, 0]
        self._refresh()

    def on_step(self, step: int, values: dict[str, float], worker: int = 0) -> None:
        if worker in self.running:
            self.running[worker][2] = step + 1
        self._refresh()

    def end_trial(self, number: int, outcome: Any, worker: int = 0) -> None:
        self._ended(number, outcome.state, outcome.objective, outcome.error, worker)

    def _ended(self, number: int, state: str, objective: float | None, error: str | None,
               worker: int) -> None:
        self.running.pop(worker, None)
        if state == "SUSPENDED":  # saved half-done, resumed by a later run: not done
            self._refresh()
            return
        self.done += 1
        if state == "COMPLETE" and objective is not None and math.isfinite(objective) \
                and self._better(objective):
            self.best = objective
        if state == "FAIL":
            self.bar.write(f"trial {number} FAIL: {error}", file=sys.stderr)
        self._refresh()

    # ... and the same events from worker processes
    def event(self, kind: str, worker: int, payload: Any) -> None:
        if kind == "start":
            self.start_trial(payload[0], payload[1], worker)
        elif kind == "step":
            self.on_step(payload[0], payload[1], worker)
        elif kind == "end":
            self._ended(payload[0], payload[1], payload[2], payload[3], worker)

    def close(self) -> None:
        self.bar.close()
