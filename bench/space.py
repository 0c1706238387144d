"""Search-space YAML -> `Space` of `Param`s and `Variant`s -> Optuna distributions / Ray domains.

One file per task is the single source of truth for both backends. Every rule is checked
at load time and every violation is reported at once (`ConfigError.problems`), naming
the file, the key and the rule, so nothing runs on a half-valid space.
"""

from __future__ import annotations

import itertools
import math
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from bench.errors import BenchError, ConfigError
from bench.registry import Task, get_task

TOP_KEYS = {"task", "metric", "direction", "fixed", "params", "variants"}
VARIANT_KEYS = {"grid", "seeds", "fixed", "params", "metric", "direction", "description"}
PARAM_KEYS = {
    "float": {"type", "low", "high", "log", "step"},
    "int": {"type", "low", "high", "log", "step"},
    "categorical": {"type", "choices"},
}
DIRECTIONS = ("minimize", "maximize")
_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+")  # 1e-3: YAML 1.1 reads a str


@dataclass(frozen=True)
class Param:
    name: str
    type: str  # float | int | categorical
    low: float = 0.0  # bounds: numeric types only
    high: float = 0.0
    log: bool = False
    step: float | None = None
    choices: tuple[Any, ...] = ()

    def to_optuna(self) -> Any:
        from optuna import distributions as d

        if self.type == "categorical":
            return d.CategoricalDistribution(self.choices)
        if self.type == "int":
            step = int(self.step or 1)
            return d.IntDistribution(int(self.low), int(self.high), log=self.log, step=step)
        return d.FloatDistribution(self.low, self.high, log=self.log, step=self.step)

    def to_ray(self) -> Any:
        """Ray Tune domain with the same support (Ray's integer `upper` is exclusive)."""
        from ray import tune

        if self.type == "categorical":
            return tune.choice(list(self.choices))
        lo, hi = self.low, self.high
        if self.type == "int":
            q = int(self.step or 1)
            if self.log:
                return tune.lograndint(int(lo), int(hi) + 1)
            if q > 1:  # qrandint's upper is inclusive and rounds to multiples of q
                return tune.qrandint(int(lo), int(hi), q)
            return tune.randint(int(lo), int(hi) + 1)
        if self.step:
            return tune.quniform(lo, hi, self.step)
        return tune.loguniform(lo, hi) if self.log else tune.uniform(lo, hi)

    def grid_values(self) -> list[Any]:
        """Finite set of values for the grid sampler, or ConfigError naming the param."""
        if self.type == "categorical":
            return list(self.choices)
        if self.type == "int" and not self.log:
            return list(range(int(self.low), int(self.high) + 1, int(self.step or 1)))
        if self.type == "float" and self.step and not self.log:
            n = int(round((self.high - self.low) / self.step))
            return [self.low + i * self.step for i in range(n + 1)]
        raise ConfigError(
            f"params.{self.name}: the grid sampler needs a finite set (categorical, int, or "
            f"float with `step`), got type={self.type} log={self.log} step={self.step}"
        )


@dataclass(frozen=True)
class Variant:
    name: str
    grid: Mapping[str, list[Any]] = field(default_factory=dict)
    seeds: int = 1
    fixed: Mapping[str, Any] = field(default_factory=dict)
    params: Mapping[str, Param] = field(default_factory=dict)
    metric: str | None = None
    direction: str | None = None
    description: str = ""

    @property
    def enumerated(self) -> bool:
        """A variant without `params` is a finite list of points, each run `seeds` times."""
        return not self.params

    def points(self) -> list[dict[str, Any]]:
        keys = list(self.grid)
        product = itertools.product(*self.grid.values())
        return [dict(zip(keys, vals, strict=True)) for vals in product]


@dataclass(frozen=True)
class Space:
    task: str
    metric: str
    direction: str
    fixed: Mapping[str, Any]
    params: Mapping[str, Param]
    variants: Mapping[str, Variant]
    source: str = "<memory>"

    def variant(self, name: str) -> Variant:
        if name not in self.variants:
            known = ", ".join(self.variants) or "(none)"
            raise ConfigError(f"{self.source}: unknown variant {name!r}; known variants: {known}")
        return self.variants[name]


def spaces_dir() -> Path:
    env = os.environ.get("BENCH_SPACES")
    return Path(env) if env else Path(__file__).resolve().parent.parent / "search_spaces"


def space_path(task: str) -> Path:
    return spaces_dir() / f"{task.replace('-', '_')}.yaml"


def _is_num(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _parse_param(where: str, name: str, spec: Any, errs: list[str]) -> Param | None:
    if not isinstance(spec, Mapping):
        errs.append(f"{where}.{name}: must be a mapping with a `type`, got {spec!r}")
        return None
    kind = spec.get("type")
    if kind not in PARAM_KEYS:
        errs.append(f"{where}.{name}.type: must be one of float, int, categorical, got {kind!r}")
        return None
    n0 = len(errs)
    for key in sorted(set(spec) - PARAM_KEYS[kind]):
        errs.append(f"{where}.{name}: unknown key `{key}` for type {kind}; allowed: "
                    f"{', '.join(sorted(PARAM_KEYS[kind]))}")
    if kind == "categorical":
        choices = spec.get("choices")
        if not isinstance(choices, list) or not choices:
            errs.append(f"{where}.{name}.choices: must be a non-empty list, got {choices!r}")
            return None
        return None if len(errs) > n0 else Param(name, kind, choices=tuple(choices))
    low: Any = spec.get("low")
    high: Any = spec.get("high")
    log: Any = spec.get("log", False)
    step: Any = spec.get("step")
    for key, val in (("low", low), ("high", high)):
        if not _is_num(val):
            errs.append(f"{where}.{name}.{key}: must be a finite number, got {val!r}")
        elif kind == "int" and float(val) != int(val):
            errs.append(f"{where}.{name}.{key}: must be an integer for type int, got {val!r}")
    if not isinstance(log, bool):
        errs.append(f"{where}.{name}.log: must be true or false, got {log!r}")
    if step is not None and (not _is_num(step) or step <= 0):
        errs.append(f"{where}.{name}.step: `step > 0` must hold, got step={step!r}")
    if _is_num(low) and _is_num(high):
        if low > high:
            errs.append(f"{where}.{name}: `low <= high` must hold, got low={low}, high={high}")
        if log is True and low <= 0:
            errs.append(f"{where}.{name}: `log: true` needs `low > 0`, got low={low}")
    if log is True and step is not None:
        errs.append(f"{where}.{name}: `log` and `step` cannot be used together, got step={step}")
    if len(errs) > n0:
        return None
    return Param(name, kind, float(low), float(high), log, step)


def _parse_params(where: str, raw: Any, task: Task | None, errs: list[str]) -> dict[str, Param]:
    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        errs.append(f"{where}: must be a mapping of parameter specs, got {type(raw).__name__}")
        return {}
    _check_known(where, raw, task, errs)
    out = {}
    for name, spec in raw.items():
        p = _parse_param(where, str(name), spec, errs)
        if p is not None:
            out[str(name)] = p
    return out


def _check_known(where: str, keys: Iterable[Any], task: Task | None, errs: list[str]) -> None:
    if task is None:
        return
    for key in keys:
        if key not in task.defaults:
            errs.append(f"{where}.{key}: `{key}` is not a parameter of task {task.name!r}; "
                        f"known: {', '.join(sorted(task.defaults))}")


def _parse_mapping(where: str, raw: Any, task: Task | None, errs: list[str]) -> dict[str, Any]:
    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        errs.append(f"{where}: must be a mapping, got {type(raw).__name__}")
        return {}
    _check_known(where, raw, task, errs)
    return dict(raw)


def _parse_direction(where: str, value: Any, errs: list[str]) -> None:
    if value is not None and value not in DIRECTIONS:
        errs.append(f"{where}: must be minimize or maximize, got {value!r}")


def _parse_variant(src: str, name: str, raw: Any, task: Task | None, errs: list[str]) -> Variant:
    where = f"{src}: variants.{name}"
    if not isinstance(raw, Mapping):
        errs.append(f"{where}: must be a mapping, got {raw!r}")
        return Variant(name)
    for key in sorted(set(raw) - VARIANT_KEYS):
        errs.append(f"{where}: unknown key `{key}`; allowed: {', '.join(sorted(VARIANT_KEYS))}")
    grid = _parse_mapping(f"{where}.grid", raw.get("grid"), task, errs)
    for key, vals in grid.items():
        if not isinstance(vals, list) or not vals:
            errs.append(f"{where}.grid.{key}: must be a non-empty list of values, got {vals!r}")
    seeds = raw.get("seeds", 1)
    if not isinstance(seeds, int) or isinstance(seeds, bool) or seeds < 1:
        errs.append(f"{where}.seeds: must be an integer >= 1, got {seeds!r}")
    _parse_direction(f"{where}.direction", raw.get("direction"), errs)
    params = _parse_params(f"{where}.params", raw.get("params"), task, errs)
    if grid and params:
        errs.append(f"{where}: give either `grid` (enumerated) or `params` (searched), not both")
    return Variant(name, grid, seeds if isinstance(seeds, int) else 1,
                   _parse_mapping(f"{where}.fixed", raw.get("fixed"), task, errs),
                   params, raw.get("metric"), raw.get("direction"), raw.get("description", ""))


def parse_space(raw: Any, source: str, expect_task: str | None = None) -> Space:
    """Check every rule on an already-parsed YAML document; raise one ConfigError listing all."""
    errs: list[str] = []
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{source}: top level must be a mapping, got {type(raw).__name__}")
    for key in sorted(set(raw) - TOP_KEYS):
        errs.append(f"{source}: unknown top-level key `{key}`; "
                    f"allowed: {', '.join(sorted(TOP_KEYS))}")
    name = raw.get("task")
    task: Task | None = None
    if not isinstance(name, str):
        errs.append(f"{source}: task: must name a registered task, got {name!r}")
    else:
        try:
            task = get_task(name)
        except Exception as exc:  # UnknownTaskError: keep collecting the other problems
            errs.append(f"{source}: task: {exc}")
        if expect_task is not None and name != expect_task:
            errs.append(f"{source}: task: file is for {expect_task!r}, got {name!r}")
    _parse_direction(f"{source}: direction", raw.get("direction"), errs)
    fixed = _parse_mapping(f"{source}: fixed", raw.get("fixed"), task, errs)
    params = _parse_params(f"{source}: params", raw.get("params"), task, errs)
    variants_raw = raw.get("variants") or {}
    if not isinstance(variants_raw, Mapping):
        errs.append(f"{source}: variants: must be a mapping, got {type(variants_raw).__name__}")
        variants_raw = {}
    variants = {str(k): _parse_variant(source, str(k), v, task, errs)
                for k, v in variants_raw.items()}
    if errs:
        raise ConfigError(errs)
    assert task is not None
    metric, direction = raw.get("metric") or task.metric, raw.get("direction") or task.direction
    return Space(task.name, metric, direction,
                 fixed, params, variants, source)


def load_space(path: str | Path, expect_task: str | None = None) -> Space:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read search space: {exc.strerror}") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise ConfigError(f"{path}: invalid YAML: {at}{getattr(exc, 'problem', exc)}") from None
    return parse_space(raw, str(path), expect_task)


def validate_file(path: str | Path, overrides: Iterable[str] = ()) -> tuple[list[str], str]:
    """Every problem of a space file and of `--set` overrides against its task, and a summary."""
    problems: list[str] = []
    space = None
    try:
        space = load_space(path)
    except ConfigError as exc:
        problems.extend(exc.problems)
    task_name = space.task if space else _declared_task(path)
    if overrides and task_name:
        try:
            parse_overrides(overrides, get_task(task_name))
        except BenchError as exc:
            problems.extend(getattr(exc, "problems", [str(exc)]))
    summary = f"{len(space.params)} params, {len(space.variants)} variants" if space else ""
    return problems, summary


def _declared_task(path: str | Path) -> str | None:
    try:
        raw = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError):
        return None
    name = raw.get("task") if isinstance(raw, Mapping) else None
    return name if isinstance(name, str) else None


def space_for(task: str) -> Space:
    path = space_path(task)
    if not path.exists():
        t = get_task(task)  # unknown task -> UnknownTaskError before a missing-file message
        return Space(t.name, t.metric, t.direction, {}, {}, {}, f"<defaults of {t.name}>")
    return load_space(path, expect_task=task)


def parse_overrides(pairs: Iterable[str], task: Task, source: str = "--set") -> dict[str, Any]:
    """`key=value` strings -> dict (values parsed as YAML scalars); unknown keys all reported."""
    out, errs = {}, []
    for pair in pairs:
        key, sep, value = pair.partition("=")
        key = key.strip()
        if not sep or not key:
            errs.append(f"{source} {pair!r}: must be key=value")
            continue
        if key not in task.defaults:
            errs.append(f"{source} {key}: `{key}` is not a parameter of task {task.name!r}; "
                        f"known: {', '.join(sorted(task.defaults))}")
            continue
        parsed = _scalar(value)
        rule = _type_rule(task.defaults[key], parsed)
        if rule:
            errs.append(f"{source} {key}={value}: {rule}")
        out[key] = parsed
    if errs:
        raise ConfigError(errs)
    return out


def _scalar(text: str) -> Any:
    """A --set value as YAML reads it, except that `1e-3` is a number (YAML 1.1 says str)."""
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError:
        return text
    if isinstance(value, str) and _NUMBER.fullmatch(value.strip()):
        return float(value)
    return value


def _type_rule(default: Any, value: Any) -> str | None:
    """A --set value must have its default's type (an int may stand for a float)."""
    if default is None or value is None:
        return None
    kind = type(default)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return None
    if isinstance(value, kind) and (kind is not int or not isinstance(value, bool)):
        return None
    return f"must be {kind.__name__} like its default {default!r}, got {value!r}"


def merge_params(task: Task, space: Space, variant: Variant | None,
                 point: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """task defaults <- YAML fixed <- variant fixed <- sampled/grid point <- --set overrides."""
    merged = dict(task.defaults)
    merged.update(space.fixed)
    if variant is not None:
        merged.update(variant.fixed)
    merged.update(point)
    merged.update(overrides)
    return merged
