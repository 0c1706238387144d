"""Exceptions. The CLI prints a `BenchError` without a traceback and exits with its code."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any


class BenchError(Exception):
    """Root of bench's errors: a message that names the thing, the rule and the value."""

    exit_code = 2


class ConfigError(BenchError):
    """A search-space file, a variant or a `--set` value breaks a rule.

    Carries every problem found, so the user fixes them all in one pass.
    """

    def __init__(self, problems: str | Iterable[str]):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("\n".join(self.problems))


def check_rules(task: str, params: Mapping[str, Any],
                rules: Iterable[tuple[str, bool, str]]) -> None:
    """Raise one ConfigError listing every (key, holds, rule) that does not hold."""
    bad = [f"{task}: {key}: {rule}, got {params[key]!r}" for key, ok, rule in rules if not ok]
    if bad:
        raise ConfigError(bad)


class StorageFailure(BenchError):
    """The study's storage failed under a run (a full disk, a lost database server)."""

    exit_code = 1


def storage_failure(exc: BaseException) -> str | None:
    """The root message of a storage failure (Optuna wraps SQLAlchemy's), or None."""
    chain: list[BaseException] = []
    e: BaseException | None = exc
    while e is not None and len(chain) < 10:
        chain.append(e)
        e = e.__cause__ or e.__context__
    if not any(type(x).__module__.startswith(("sqlalchemy", "optuna.exceptions", "sqlite3"))
               for x in chain):
        return None
    return str(chain[-1]).splitlines()[0]


class UnknownTaskError(BenchError):
    """A task name that is not registered."""


class DataError(BenchError):
    """A data set that cannot be found or read."""


class TrialFailed(BenchError):
    """A trial ended without a usable result (non-finite objective, missing metric)."""


class TrialPruned(Exception):  # noqa: N818 - mirrors optuna.TrialPruned
    """Raised by `TrialContext.report` when the backend's pruner stops the trial."""


class TrialSuspended(Exception):  # noqa: N818 - a control-flow signal, like TrialPruned
    """Raised by `TrialContext.suspend`: the trial saved its state and will be resumed later."""
