"""Task registry: `declare_task` / `@register_task` fill one dict; `get_task(name)` fails
with the known names.

A task is an `EpochTrial` subclass registered with its typed parameter declarations
(`bench.params`), the metrics it reports (with units), its objective, a seconds-long CPU
budget (`smoke`), cross-parameter rules, a data check and the optional packages it needs.

The built-in tasks are declared in `bench.specs`, which imports neither torch nor the task's
implementation: the declaration names its `EpochTrial` class as "module:Class" and the
modules that register its figures and fused implementation, imported only when a trial,
a figure or a fused group is wanted. So `bench list`, `bench board`, `bench validate` and the
checks of `bench run` answer without loading torch (about a second on 2 cores).
"""

from __future__ import annotations

import importlib
import json
import pkgutil
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench.errors import BenchError, ConfigError, UnknownTaskError
from bench.params import THROUGHPUT, Decl, Metric, defaults, did_you_mean, problems

if TYPE_CHECKING:
    from bench.lifecycle import EpochTrial

PlotHook = Callable[..., list]
Rules = Callable[[Mapping[str, Any]], list[str]]  # cross-parameter rules -> problems
DataCheck = Callable[[Mapping[str, Any], Path | None], None]  # raise DataError when missing

HARNESS_METRICS = {THROUGHPUT: Metric("examples/s", "training throughput (training epochs "
                                                    "only, not validation)")}


class MissingExtraError(BenchError):
    """An optional stack a task or backend needs is not installed."""


@dataclass(frozen=True)
class Task:
    name: str
    impl: type[EpochTrial] | str  # the class, or "module:Class" imported on first use
    metric: str
    direction: str
    params: Mapping[str, Decl]
    metrics: Mapping[str, Metric]
    doc: str = ""
    smoke: Mapping[str, Any] = field(default_factory=dict)  # a seconds-long CPU budget
    rules: Rules | None = None
    data: DataCheck | None = None
    requires: tuple[str, Sequence[str]] | None = None  # (extra, modules)
    modules: tuple[str, ...] = ()  # imported before the task's figures or fused class are used
    epochs_of: Callable[[Mapping[str, Any]], int] | None = None  # when not params["epochs"]
    data_keys: tuple[str, ...] | None = None  # what `data` reads (None: every parameter)

    def data_sets(self, param_sets: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
        """The parameter sets among `param_sets` that the data check must see: one per
        distinct combination of `data_keys` (of every parameter when the task names none)."""
        out, seen = [], set()
        for p in param_sets:
            keys = self.data_keys if self.data_keys is not None else sorted(p)
            key = json.dumps([[k, p.get(k)] for k in keys], default=str)
            if key not in seen:
                seen.add(key)
                out.append(p)
        return out

    def objective_problems(self, metric: str, params: Mapping[str, Any]) -> list[str]:
        """[why] when a trial of `params` would not report `metric` (its objective), so it
        could only fail; [] when it would."""
        decl = self.metrics.get(metric)
        why = decl.missing_because({**self.defaults, **params}) if decl is not None else None
        return [f"the objective {metric} is reported {why}: rank this configuration by a "
                "metric it reports (a space's or variant's `metric:`)"] if why else []

    def trained_epochs(self, params: Mapping[str, Any]) -> int:
        """The epochs a trial of `params` runs (the progress bar's total)."""
        if self.epochs_of is not None:
            return self.epochs_of({**self.defaults, **params})
        return int(params.get("epochs") or 0)

    @property
    def trial(self) -> type[EpochTrial]:
        """The task's `EpochTrial` class (its module imported on first use)."""
        if isinstance(self.impl, str):
            module, _, attr = self.impl.partition(":")
            return getattr(importlib.import_module(module), attr)  # type: ignore[no-any-return]
        return self.impl

    def load(self) -> None:
        """Import the task's implementation modules (they register its figures and fused
        implementation)."""
        for module in self.modules:
            importlib.import_module(module)

    @property
    def execution(self) -> frozenset[str]:
        """Execution parameters: how a trial runs, not what it trains (`Decl.execution`)."""
        return frozenset(k for k, d in self.params.items() if d.execution)

    def at_added_default(self, key: str, value: Any) -> bool:
        """Whether `key` is a parameter added after studies existed (`Decl.since`), at its
        default: left out of config hashes and of a study's stored configuration."""
        decl = self.params.get(key)
        return decl is not None and decl.since is not None and value == decl.default

    @property
    def has_test_metrics(self) -> bool:
        """Whether `bench eval` has anything to compute for this task."""
        return any(m.split == "test" for m in self.metrics.values())

    @property
    def defaults(self) -> dict[str, Any]:
        return defaults(self.params)

    def problems(self, params: Mapping[str, Any], where: str = "") -> list[str]:
        """Every bad value of a (merged) parameter set, the cross-parameter rules included."""
        found = problems(self.name, self.params, params, where)
        if not found and self.rules is not None:
            prefix = f"{where}: " if where else ""
            # over the defaults: a partial set (`bench eval --set`, a row older than a
            # parameter) is checked as the trial will run it
            found = [f"{prefix}{p}" for p in self.rules({**self.defaults, **params})]
        return found

    def require_extra(self) -> None:
        """MissingExtraError naming the pip extra when an optional package is absent."""
        if self.requires is None:
            return
        extra, modules = self.requires
        missing = []
        for m in modules:
            try:
                importlib.import_module(m)
            except ImportError:
                missing.append(m)
        if missing:
            raise MissingExtraError(
                f"task {self.name!r} needs {', '.join(missing)}, which is not installed: "
                f"pip install -e '.[{extra}]' (or pip install 'bench[{extra}]')")


_TASKS: dict[str, Task] = {}
_PLOTS: dict[str, list[PlotHook]] = {}
_FUSED: dict[str, type] = {}


def declare_task(
    name: str, impl: type[EpochTrial] | str, *, metric: str, direction: str,
    params: Mapping[str, Decl], metrics: Mapping[str, Metric], doc: str = "",
    smoke: Mapping[str, Any] | None = None, rules: Rules | None = None,
    data: DataCheck | None = None, requires: tuple[str, Sequence[str]] | None = None,
    modules: Sequence[str] = (), epochs_of: Callable[[Mapping[str, Any]], int] | None = None,
    data_keys: Sequence[str] | None = None,
) -> Task:
    """Declare the task `name`, trained by `impl` (an `EpochTrial` subclass or its
    "module:Class", imported on first use).

    `params` declares every parameter the task reads (type, range or choices, default);
    `metrics` every metric it returns (unit, meaning); `smoke` overrides parameters for a
    seconds-long CPU run (`bench run TASK --smoke`, the contract tests); `rules` checks
    combinations of values, `data` the presence of the data, both before anything runs;
    `modules` are imported before the task's figures or fused implementation are looked up
    (default: the module of a "module:Class" `impl`); `epochs_of(params)` the epochs a trial
    runs where that is not `params["epochs"]` (a model fitted in closed form runs one);
    `data_keys` the parameters `data` reads, so that a run checks each distinct combination
    once (default: each distinct parameter set).
    """
    if direction not in ("minimize", "maximize"):
        raise ValueError(f"direction must be 'minimize' or 'maximize', got {direction!r}")
    if metric not in metrics:
        raise ValueError(f"task {name!r}: objective {metric!r} is not a declared metric")
    if "epochs" not in params:
        raise ValueError(f"task {name!r}: every task declares `epochs`")
    if name in _TASKS and _TASKS[name].impl != impl:
        raise ValueError(f"task {name!r} is registered twice")
    bad = problems(name, params, smoke or {}, "smoke")
    if bad:
        raise ValueError("; ".join(bad))
    conditions = [(n, d.only_with) for n, d in params.items()] + [
        (n, m.only_with) for n, m in metrics.items()]
    for pname, only in conditions:
        for key, allowed in only:
            bad = ([f"{key} is not a parameter"] if key not in params else
                   [f"{key}={a!r}: {params[key].problem(a)}" for a in allowed
                    if params[key].problem(a)])
            if bad:
                raise ValueError(f"task {name!r}: {pname}: only_with: {'; '.join(bad)}")
    if data_keys is not None:
        unknown = [k for k in data_keys if k not in params]
        if unknown:
            raise ValueError(f"task {name!r}: data_keys {unknown} are not declared parameters")
        if data is None:
            raise ValueError(f"task {name!r}: data_keys without a data check")
    if not modules and isinstance(impl, str):
        modules = (impl.partition(":")[0],)
    task = Task(name, impl, metric, direction, dict(params), {**metrics, **HARNESS_METRICS},
                doc, dict(smoke or {}), rules, data, requires, tuple(modules), epochs_of,
                None if data_keys is None else tuple(data_keys))
    _TASKS[name] = task
    return task


def register_task(
    name: str, *, metric: str, direction: str, params: Mapping[str, Decl],
    metrics: Mapping[str, Metric], smoke: Mapping[str, Any] | None = None,
    rules: Rules | None = None, data: DataCheck | None = None,
    requires: tuple[str, Sequence[str]] | None = None,
    epochs_of: Callable[[Mapping[str, Any]], int] | None = None,
    data_keys: Sequence[str] | None = None,
) -> Callable[[type[EpochTrial]], type[EpochTrial]]:
    """Register an `EpochTrial` subclass as the task `name` (the class decorator form of
    `declare_task`, for tasks outside `bench.specs`; the docstring's first line is the doc)."""

    def wrap(cls: type[EpochTrial]) -> type[EpochTrial]:
        doc = (cls.__doc__ or "").strip().splitlines()
        declare_task(name, cls, metric=metric, direction=direction, params=params,
                     metrics=metrics, doc=doc[0] if doc else "", smoke=smoke, rules=rules,
                     data=data, requires=requires, epochs_of=epochs_of, data_keys=data_keys)
        return cls

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


def register_fused(name: str) -> Callable[[type], type]:
    """Register a task's fused implementation (a bench.fused.FusedGroup subclass)."""

    def wrap(cls: type) -> type:
        _FUSED[name] = cls
        return cls

    return wrap


def get_fused(name: str) -> type | None:
    """The task's FusedGroup class, or None when the task trains one trial at a time."""
    get_task(name).load()
    return _FUSED.get(name)


def get_plots(name: str) -> list[PlotHook]:
    get_task(name).load()
    return list(_PLOTS.get(name, []))


def _load_builtin_tasks() -> None:
    import bench.specs

    for mod in pkgutil.iter_modules(bench.specs.__path__):
        if mod.name.startswith("_"):
            continue
        try:
            importlib.import_module(f"bench.specs.{mod.name}")
        except Exception as exc:  # one broken module must not take every task down with it
            warnings.warn(f"bench.specs.{mod.name} failed to import, its tasks are unavailable: "
                          f"{type(exc).__name__}: {exc}", stacklevel=2)


def list_tasks() -> list[Task]:
    _load_builtin_tasks()
    return [_TASKS[k] for k in sorted(_TASKS)]


def get_task(name: str) -> Task:
    if name not in _TASKS:
        _load_builtin_tasks()
    if name not in _TASKS:
        known = ", ".join(sorted(_TASKS)) or "(none)"
        raise UnknownTaskError(f"unknown task {name!r}; {did_you_mean(name, _TASKS)}known "
                               f"tasks: {known}")
    return _TASKS[name]


def check_values(task: Task, params: Mapping[str, Any], where: str = "") -> None:
    """ConfigError listing every problem of one merged parameter set."""
    found = task.problems(params, where)
    if found:
        raise ConfigError(found)
