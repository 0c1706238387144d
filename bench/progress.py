"""Live progress for `bench run`: trial i/N, the running trial's epoch, the best value so far."""

from __future__ import annotations

import math
import sys
from typing import Any

from optuna.trial import TrialState
from tqdm.auto import tqdm

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)


class Progress:
    def __init__(self, plan: Any, total: int, study: Any):
        self.plan, self.study = plan, study
        self.maximize = plan.direction == "maximize"
        self.best: float | None = None
        self.epochs: Any = None
        self.trial: int | None = None
        self.start_finished = len(study.get_trials(deepcopy=False, states=FINISHED))
        self.counts = {"COMPLETE": 0, "PRUNED": 0, "FAIL": 0}
        self.bar = tqdm(total=total, desc=f"{plan.task.name} [{plan.study_name}]", unit="trial",
                        file=sys.stderr, dynamic_ncols=True, disable=not plan.opts.progress)

    def _better(self, v: float) -> bool:
        return self.best is None or (v > self.best if self.maximize else v < self.best)

    def _postfix(self, epoch: str = "") -> None:
        best = "-" if self.best is None else f"{self.best:.4g}"
        self.bar.set_postfix_str(f"trial {self.trial} epoch {epoch or '-'} | "
                                 f"best {self.plan.metric}={best}", refresh=True)

    def start_trial(self, number: int, epochs: Any) -> None:
        self.trial, self.epochs = number, epochs
        self._postfix()

    def on_step(self, step: int, values: dict[str, float]) -> None:
        self._postfix(f"{step + 1}/{self.epochs}" if self.epochs else str(step + 1))

    def end_trial(self, number: int, outcome: Any) -> None:
        self.counts[outcome.state] += 1
        if outcome.state == "COMPLETE" and self._better(outcome.objective):
            self.best = outcome.objective
        if outcome.state == "FAIL":
            self.bar.write(f"trial {number} FAIL: {outcome.error}")
        self.bar.update(1)
        self._postfix()

    def poll(self) -> None:
        """Multi-process mode: read progress back from the study's storage."""
        trials = self.study.get_trials(deepcopy=False, states=FINISHED)
        self.bar.n = max(0, len(trials) - self.start_finished)
        for t in trials:
            if t.state == TrialState.COMPLETE and t.value is not None and math.isfinite(t.value):
                if self._better(t.value):
                    self.best = t.value
        running = self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        self.trial = ",".join(str(t.number) for t in running) or None  # type: ignore[assignment]
        self._postfix()

    def close(self) -> None:
        self.bar.close()
