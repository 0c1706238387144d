"""What every backend shares: one small base class, a registry, and the result of a run.

A backend turns a `Plan` (bench.plan) into finished trials, each run through
`bench.lifecycle.execute_trial`, which writes its row. Backends are found by name in
`BACKENDS` and imported only when used, so `bench list` and `bench --help` load neither
Optuna nor Ray. No backend imports another backend or the CLI.
"""

from __future__ import annotations

import abc
import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from bench.errors import BenchError, UnknownTaskError
from bench.plan import Plan

# name -> (module, pip extra that provides its stack, or None)
BACKENDS: dict[str, tuple[str, str | None]] = {
    "optuna": ("bench.backends.optuna", None),
    "ray": ("bench.backends.ray", "ray"),
}


@dataclass
class RunResult:
    """What a run did, for the summary and the exit status."""

    plan: Plan
    storage_note: str
    counts: dict[str, int] = field(default_factory=dict)  # the study's trials by state
    ran: dict[str, int] = field(default_factory=dict)  # this run's trials by state
    messages: list[str] = field(default_factory=list)  # what the user must know
    exit_code: int = 0
    target: int | None = None  # the study's target total of trials

    def note(self, text: str) -> None:
        self.messages.append(text)


class Backend(abc.ABC):
    """Runs a plan's trials; `prepare` creates the study ahead of launchers (Slurm)."""

    name: str = ""

    @abc.abstractmethod
    def run(self, plan: Plan, progress: Callable[..., Any] | None = None) -> RunResult:
        """Run the plan's trials to the study's target; every finished trial has its row."""

    def prepare(self, plan: Plan) -> int:
        """Create the study (and enqueue a variant's points); the trials left to run."""
        raise BenchError(f"backend {self.name!r} cannot prepare a study ahead of a launcher")

    def status(self, plan: Plan) -> str:
        """The study's progress in a few lines."""
        raise BenchError(f"backend {self.name!r} has no status")


_REGISTRY: dict[str, type[Backend]] = {}


def register_backend(cls: type[Backend]) -> type[Backend]:
    _REGISTRY[cls.name] = cls
    return cls


def get_backend(name: str) -> Backend:
    """The backend `name`, importing its module now; a missing stack names its extra."""
    if name not in BACKENDS:
        raise UnknownTaskError(f"unknown backend {name!r}; known: {', '.join(BACKENDS)}")
    module, extra = BACKENDS[name]
    if name not in _REGISTRY:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if extra is None:
                raise
            raise BenchError(f"--backend {name} needs {exc.name}, which is not installed: "
                             f"pip install -e '.[{extra}]'") from None
    return _REGISTRY[name]()
