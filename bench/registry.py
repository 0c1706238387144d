"""Task registry: `@register_task` fills one dict; `get_task(name)` fails with the known names."""

from __future__ import annotations

import importlib
import pkgutil
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from bench.errors import UnknownTaskError

if TYPE_CHECKING:
    from bench.trial import TrialContext

Objective = Callable[[Mapping[str, Any], "TrialContext"], Mapping[str, float]]
PlotHook = Callable[..., list]
Check = Callable[[Mapping[str, Any], Any], None]  # (params, data_dir) -> None or raise BenchError


@dataclass(frozen=True)
class Task:
    name: str
    objective: Objective
    metric: str
    direction: str
    defaults: Mapping[str, Any]  # every parameter the task knows, with its default
    doc: str = ""
    smoke: Mapping[str, Any] = field(default_factory=dict)  # overrides for a seconds-long CPU run
    check: Check | None = None  # preflight: bad values, missing data -> BenchError before a run


_TASKS: dict[str, Task] = {}
_PLOTS: dict[str, list[PlotHook]] = {}


def register_task(
    name: str, *, metric: str, direction: str, defaults: Mapping[str, Any],
    smoke: Mapping[str, Any] | None = None, check: Check | None = None,
) -> Callable[[Objective], Objective]:
    """Register an objective under `name`.

    `defaults` lists every parameter the objective reads (anything else is rejected before a
    run); `smoke` overrides them for a tiny CPU run: the contract tests use it; `check` is
    called with the merged parameters before anything runs or is written (exit 2 on error).
    """
    if direction not in ("minimize", "maximize"):
        raise ValueError(f"direction must be 'minimize' or 'maximize', got {direction!r}")

    def wrap(fn: Objective) -> Objective:
        if name in _TASKS and _TASKS[name].objective is not fn:
            raise ValueError(f"task {name!r} is registered twice")
        doc = (fn.__doc__ or "").strip().splitlines()
        unknown = set(smoke or {}) - set(defaults)
        if unknown:
            raise ValueError(f"task {name!r}: smoke keys {sorted(unknown)} are not in defaults")
        _TASKS[name] = Task(name, fn, metric, direction, dict(defaults),
                            doc[0] if doc else "", dict(smoke or {}), check)
        return fn

    return wrap


def register_plots(name: str) -> Callable[[PlotHook], PlotHook]:
    """Register a task's own figures: `fn(inp: bench.plots.PlotInput) -> list[Path]`.

    Import matplotlib inside the hook, not at module level: the registry imports every
    task module, and `bench list` should not pay for a plotting stack.
    """

    def wrap(fn: PlotHook) -> PlotHook:
        _PLOTS.setdefault(name, []).append(fn)
        return fn

    return wrap


def get_plots(name: str) -> list[PlotHook]:
    get_task(name)
    return list(_PLOTS.get(name, []))


def _load_builtin_tasks() -> None:
    import bench.tasks

    for mod in pkgutil.iter_modules(bench.tasks.__path__):
        if mod.name.startswith("_"):
            continue
        try:
            importlib.import_module(f"bench.tasks.{mod.name}")
        except Exception as exc:  # one broken module must not take every task down with it
            warnings.warn(f"bench.tasks.{mod.name} failed to import, its tasks are unavailable: "
                          f"{type(exc).__name__}: {exc}", stacklevel=2)


def list_tasks() -> list[Task]:
    _load_builtin_tasks()
    return [_TASKS[k] for k in sorted(_TASKS)]


def get_task(name: str) -> Task:
    if name not in _TASKS:
        _load_builtin_tasks()
    if name not in _TASKS:
        known = ", ".join(sorted(_TASKS)) or "(none)"
        raise UnknownTaskError(f"unknown task {name!r}; known tasks: {known}")
    return _TASKS[name]
