"""Search-space YAML -> `Space` of `Param`s and `Variant`s -> Optuna distributions / Ray domains.

One file per task is the single source of truth for both backends. Every rule is checked
at load time and every violation is reported at once (`ConfigError.problems`), naming the
file, the key and the rule, so nothing runs on a half-valid space. Values are checked
against the task's typed declarations (`bench.params`): a `fixed` or `grid` value must be
a valid value of its parameter, a searched range must lie inside the parameter's rule.

The YAML is read as YAML 1.2 reads numbers (`1e-4` is a float, not a string), duplicate
keys are errors, and aliases may not expand a document beyond `MAX_NODES` nodes.
"""

from __future__ import annotations

import itertools
import math
import os
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from bench.errors import BenchError, ConfigError
from bench.names import name_problem
from bench.params import Decl, did_you_mean, looks_numeric, shown, unknown
from bench.reference import parse_reference
from bench.registry import Task, get_task

TOP_KEYS = {"task", "metric", "direction", "fixed", "params", "variants"}
VARIANT_KEYS = {"grid", "seeds", "fixed", "params", "metric", "direction", "description",
                "reference"}
PARAM_KEYS = {
    "float": {"type", "low", "high", "log", "step"},
    "int": {"type", "low", "high", "log", "step"},
    "categorical": {"type", "choices"},
}
DIRECTIONS = ("minimize", "maximize")
MAX_NODES = 100_000  # a YAML document expanded through its aliases
MAX_SEEDS = 1_000
MAX_TRIALS = 100_000  # points x seeds of a variant, or points of a grid search


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

    def grid_size(self) -> int | None:
        """How many values the grid sampler would try, or None when the set is not finite."""
        if self.type == "categorical":
            return len(self.choices)
        if self.type == "int" and not self.log:
            return int(self.high - self.low) // int(self.step or 1) + 1
        if self.type == "float" and self.step and not self.log:
            return int(round((self.high - self.low) / self.step)) + 1
        return None

    def grid_values(self) -> list[Any]:
        """Finite set of values for the grid sampler, or ConfigError naming the param."""
        n = self.grid_size()
        if n is None:
            raise ConfigError(
                f"params.{self.name}: the grid sampler needs a finite set (categorical, int, "
                f"or float with `step`), got type={self.type} log={self.log} step={self.step}")
        if self.type == "categorical":
            return list(self.choices)
        if self.type == "int":
            return list(range(int(self.low), int(self.high) + 1, int(self.step or 1)))
        assert self.step is not None
        return [self.low + i * self.step for i in range(n)]

    def probe_values(self) -> list[Any]:
        """Values spanning the support, for probing cross-parameter rules before a search
        (`probe_rules`): every choice; every value of a set of up to 64 (an int range, a
        float range with `step`); else 9 values from bound to bound, evenly (geometrically
        when `log`) spaced, on the step grid."""
        if self.type == "categorical":
            return list(self.choices)
        n = self.grid_size()
        if n is not None and n <= 64:
            return self.grid_values()
        if self.type == "int" and not self.step and self.high - self.low < 64:  # log too
            return list(range(int(self.low), int(self.high) + 1))
        lo, hi = self.low, self.high
        if self.log and lo > 0:
            vals = [lo * (hi / lo) ** (i / 8) for i in range(9)]
        else:
            vals = [lo + (hi - lo) * i / 8 for i in range(9)]
        if self.step:  # down onto the grid (a hair's tolerance: 2.9999... is 3 steps)
            vals = [lo + math.floor((v - lo) / self.step + 1e-9) * self.step for v in vals]
        if self.type == "int":
            vals = [min(max(round(v), int(lo)), int(hi)) for v in vals]
        return list(dict.fromkeys(vals))

    def values_to_check(self) -> list[Any]:
        """The values whose validity implies every sampled value's: choices, or the bounds."""
        if self.type == "categorical":
            return list(self.choices)
        cast = int if self.type == "int" else float
        return [cast(self.low), cast(self.high)]


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
    reference: Any = None  # the original report's numbers (bench board/compare show them)

    @property
    def enumerated(self) -> bool:
        """A variant without `params` is a finite list of points, each run `seeds` times."""
        return not self.params

    def n_points(self) -> int:
        return math.prod(len(v) for v in self.grid.values()) if self.grid else 1

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
            raise ConfigError(f"{self.source}: unknown variant {name!r}; "
                              f"{did_you_mean(name, self.variants)}known variants: {known}")
        return self.variants[name]


def spaces_dir() -> Path:
    env = os.environ.get("BENCH_SPACES")
    return Path(env) if env else Path(__file__).resolve().parent.parent / "search_spaces"


def space_path(task: str) -> Path:
    return spaces_dir() / f"{task.replace('-', '_')}.yaml"


# ---------------------------------------------------------------- reading YAML safely
class _Loader(yaml.SafeLoader):
    """SafeLoader that reads `1e-4` as a float (YAML 1.2) and refuses duplicate keys."""

    def construct_mapping(self, node: Any, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, Any] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # `<<: *defaults`: later keys may override merged ones
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, (str, int, float, bool)) and key in seen:
                line = key_node.start_mark.line + 1
                raise ConfigError(f"duplicate key `{key}` at line {line} (first at line "
                                  f"{seen[key]}); a YAML mapping takes each key once")
            if isinstance(key, (str, int, float, bool)):
                seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep)


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$"),
    list("-+0123456789."))


def _expanded_size(node: Any, memo: dict[int, int], active: set[int]) -> int:
    key = id(node)
    if key in memo:
        return memo[key]
    if key in active:
        raise ConfigError("a YAML alias refers to a node that contains it (a recursive "
                          "document)")
    active.add(key)
    size = 1
    if isinstance(node, yaml.SequenceNode):
        size += sum(_expanded_size(n, memo, active) for n in node.value)
    elif isinstance(node, yaml.MappingNode):
        size += sum(_expanded_size(k, memo, active) + _expanded_size(v, memo, active)
                    for k, v in node.value)
    active.discard(key)
    memo[key] = size
    if size > MAX_NODES:
        raise ConfigError(f"the document expands to more than {MAX_NODES:,} nodes through "
                          "its aliases (a YAML alias bomb?)")
    return size


def safe_load(text: str) -> Any:
    """Parse YAML text with `_Loader`, bounding what aliases may expand to."""
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _expanded_size(node, {}, set())
        return loader.construct_document(node)
    finally:
        loader.dispose()


# ---------------------------------------------------------------- parsing and checking
def _is_num(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _num_problem(val: Any) -> str:
    hint = " (YAML read it as a string)" if looks_numeric(val) else ""
    return f"must be a finite number, got {val!r}{hint}"


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
        if len({type(c) for c in choices}) > 1:
            errs.append(f"{where}.{name}.choices: must all be of one type, got "
                        f"{', '.join(sorted({type(c).__name__ for c in choices}))}: {choices!r}")
        return None if len(errs) > n0 else Param(name, kind, choices=tuple(choices))
    low: Any = spec.get("low")
    high: Any = spec.get("high")
    log: Any = spec.get("log", False)
    step: Any = spec.get("step")
    for key, val in (("low", low), ("high", high)):
        if not _is_num(val):
            errs.append(f"{where}.{name}.{key}: {_num_problem(val)}")
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


def _against_decl(where: str, p: Param, decl: Decl, errs: list[str]) -> None:
    """A searched parameter's type and range must fit its declaration."""
    if decl.kind in ("choice", "bool", "str") and p.type != "categorical":
        errs.append(f"{where}.{p.name}: `{p.name}` is {decl.rule()}: search it as "
                    f"`type: categorical`, got type={p.type}")
        return
    if decl.kind == "int" and p.type == "float":
        errs.append(f"{where}.{p.name}: `{p.name}` is an integer parameter: search it as "
                    "`type: int` or categorical, got type=float")
        return
    for value in p.values_to_check():
        problem = decl.problem(value)
        if problem:
            errs.append(f"{where}.{p.name}: value {value!r} of the search space: {problem}")


def _parse_params(where: str, raw: Any, task: Task | None, errs: list[str]) -> dict[str, Param]:
    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        errs.append(f"{where}: must be a mapping of parameter specs, got {type(raw).__name__}")
        return {}
    out = {}
    for name, spec in raw.items():
        name = str(name)
        if task is not None and name not in task.params:
            errs.append(_unknown(where, name, task))
            continue
        p = _parse_param(where, name, spec, errs)
        if p is not None:
            if task is not None:
                _against_decl(where, p, task.params[name], errs)
            out[name] = p
    return out


def _unknown(where: str, key: str, task: Task) -> str:
    return f"{where}.{key}: {unknown(key, task.name, task.params)}"


def _parse_fixed(where: str, raw: Any, task: Task | None, errs: list[str]) -> dict[str, Any]:
    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        errs.append(f"{where}: must be a mapping, got {type(raw).__name__}")
        return {}
    if task is not None:
        for key, value in raw.items():
            if key not in task.params:
                errs.append(_unknown(where, str(key), task))
                continue
            problem = task.params[key].problem(value)
            if problem:
                errs.append(f"{where}.{key}: {problem}")
    return dict(raw)


def _parse_grid(where: str, raw: Any, task: Task | None, errs: list[str]) -> dict[str, list]:
    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        errs.append(f"{where}: must be a mapping, got {type(raw).__name__}")
        return {}
    grid = {}
    for key, vals in raw.items():
        if task is not None and key not in task.params:
            errs.append(_unknown(where, str(key), task))
            continue
        if not isinstance(vals, list) or not vals:
            errs.append(f"{where}.{key}: must be a non-empty list of values, got {vals!r}")
            continue
        if task is not None:
            for v in vals:
                problem = task.params[key].problem(v)
                if problem:
                    errs.append(f"{where}.{key}: value {v!r}: {problem}")
        grid[str(key)] = vals
    return grid


def _parse_direction(where: str, value: Any, errs: list[str]) -> None:
    if value is not None and value not in DIRECTIONS:
        errs.append(f"{where}: must be minimize or maximize, got {value!r}")


def _parse_metric(where: str, value: Any, task: Task | None, errs: list[str]) -> None:
    if value is None or task is None:
        return
    if value not in task.metrics:
        errs.append(f"{where}: {value!r} is not a metric of task {task.name!r}; "
                    f"{did_you_mean(str(value), task.metrics)}known: "
                    f"{', '.join(sorted(task.metrics))}")


def _parse_variant(src: str, name: str, raw: Any, task: Task | None, errs: list[str]) -> Variant:
    where = f"{src}: variants.{name}"
    problem = name_problem(name)
    if problem:
        errs.append(f"{where}: the variant's name {problem}")
    if not isinstance(raw, Mapping):
        errs.append(f"{where}: must be a mapping, got {raw!r}")
        return Variant(name)
    for key in sorted(set(raw) - VARIANT_KEYS):
        errs.append(f"{where}: unknown key `{key}`; allowed: {', '.join(sorted(VARIANT_KEYS))}")
    grid = _parse_grid(f"{where}.grid", raw.get("grid"), task, errs)
    seeds = raw.get("seeds", 1)
    if not isinstance(seeds, int) or isinstance(seeds, bool) or not 1 <= seeds <= MAX_SEEDS:
        errs.append(f"{where}.seeds: must be an integer in [1, {MAX_SEEDS}], got {seeds!r}")
        seeds = 1
    _parse_direction(f"{where}.direction", raw.get("direction"), errs)
    _parse_metric(f"{where}.metric", raw.get("metric"), task, errs)
    params = _parse_params(f"{where}.params", raw.get("params"), task, errs)
    if grid and params:
        errs.append(f"{where}: give either `grid` (enumerated) or `params` (searched), not both")
    reference = parse_reference(raw.get("reference"), f"{where}.reference",
                                task.metrics if task is not None else None, errs)
    variant = Variant(name, grid, seeds, _parse_fixed(f"{where}.fixed", raw.get("fixed"), task,
                                                      errs),
                      params, raw.get("metric"), raw.get("direction"),
                      str(raw.get("description", "")), reference)
    if variant.n_points() * seeds > MAX_TRIALS:
        errs.append(f"{where}: {variant.n_points():,} points x {seeds} seeds = "
                    f"{variant.n_points() * seeds:,} trials; at most {MAX_TRIALS:,} per variant")
    return variant


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
        except BenchError as exc:  # UnknownTaskError: keep collecting the other problems
            errs.append(f"{source}: task: {exc}")
        if expect_task is not None and name != expect_task:
            errs.append(f"{source}: task: file is for {expect_task!r}, got {name!r}")
    _parse_direction(f"{source}: direction", raw.get("direction"), errs)
    _parse_metric(f"{source}: metric", raw.get("metric"), task, errs)
    fixed = _parse_fixed(f"{source}: fixed", raw.get("fixed"), task, errs)
    params = _parse_params(f"{source}: params", raw.get("params"), task, errs)
    variants_raw = raw.get("variants") or {}
    if not isinstance(variants_raw, Mapping):
        errs.append(f"{source}: variants: must be a mapping, got {type(variants_raw).__name__}")
        variants_raw = {}
    variants = {str(k): _parse_variant(source, str(k), v, task, errs)
                for k, v in variants_raw.items()}
    if task is not None:
        _check_points(source, task, fixed, variants, errs)
    if errs:
        raise ConfigError(errs)
    assert task is not None
    metric, direction = raw.get("metric") or task.metric, raw.get("direction") or task.direction
    return Space(task.name, metric, direction, fixed, params, variants, source)


def _check_points(source: str, task: Task, fixed: Mapping[str, Any],
                  variants: Mapping[str, Variant], errs: list[str]) -> None:
    """Cross-parameter rules on every enumerated point (values were checked one by one)."""
    if errs:
        return
    for v in variants.values():
        if not v.enumerated or v.n_points() > 1000:
            continue
        for point in v.points():
            merged = {**task.defaults, **fixed, **v.fixed, **point}
            errs.extend(f"{source}: variants.{v.name}: {p}" for p in task.problems(merged))


def load_space(path: str | Path, expect_task: str | None = None) -> Space:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read search space: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not a YAML text file: byte {exc.start} is not UTF-8 "
                          f"({exc.object[exc.start:exc.start + 1]!r})") from None
    try:
        raw = safe_load(text)
    except ConfigError as exc:
        raise ConfigError([f"{path}: {p}" for p in exc.problems]) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise ConfigError(f"{path}: invalid YAML: {at}{getattr(exc, 'problem', exc)}") from None
    except ValueError as exc:  # Python's int(): a number of over 4,300 digits
        raise ConfigError(f"{path}: invalid value: {str(exc).split(';')[0]}") from None
    return parse_space(raw, str(path), expect_task)


RULE_PROBES = 4096  # points of a searched space on which the rules are checked before a run


def probe_points(searched: Mapping[str, Param],
                 merge: Callable[[dict[str, Any]], dict[str, Any]]
                 ) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    """(point, merged parameters) spanning a searched space: each parameter's
    `probe_values`, over their product or, when that is larger, RULE_PROBES points drawn
    from it (seeded: the same every run)."""
    import random

    keys, pools = list(searched), [p.probe_values() for p in searched.values()]
    rng = random.Random(0)
    points = (itertools.product(*pools) if math.prod(len(p) for p in pools) <= RULE_PROBES
              else (tuple(rng.choice(pool) for pool in pools) for _ in range(RULE_PROBES)))
    for values in points:
        point = dict(zip(keys, values, strict=True))
        yield point, merge(point)


def probe_rules(task: Task, searched: Mapping[str, Param],
                merge: Callable[[dict[str, Any]], dict[str, Any]],
                more: Callable[[dict[str, Any]], list[str]] | None = None
                ) -> tuple[list[str], list[str]]:
    """The task's cross-parameter rules over a searched space (`probe_points`), before
    anything runs: (errors, notes). A rule broken in the same words at every probed point
    is an error: a fixed value breaks it whatever is sampled, so no trial could run. Other
    broken rules give a note (even at every probed point: a point between the probes may
    hold): the sampler will propose such points (TPE and Ray's searchers take no hard
    constraints), and each becomes a FAIL trial whose row names its rule. `more(params)`
    adds problems checked the same way (the objective a point would not report). A
    searched parameter that has no effect at any probed point (`Decl.only_with`) gives a
    note too."""
    idle: dict[str, str] = {k: "" for k in searched
                            if k in task.params and task.params[k].only_with}
    if not searched or (task.rules is None and more is None and not idle):
        return [], []
    counts: dict[str, int] = {}
    n = n_bad = 0
    first: tuple[dict[str, Any], list[str]] | None = None
    for point, params in probe_points(searched, merge):
        n += 1
        for k in list(idle):
            why = task.params[k].idle_because(params)
            if why is None:
                del idle[k]
            else:
                idle[k] = idle[k] or why
        broken = list(dict.fromkeys((task.rules(params) if task.rules is not None else [])
                                    + (more(params) if more is not None else [])))
        if broken:
            n_bad += 1
            first = first or (point, broken)
            for rule in broken:
                counts[rule] = counts.get(rule, 0) + 1
    notes = [_idle_note(idle, n)] if idle else []
    if first is None:
        return [], notes
    keys = ", ".join(searched)
    point, broken = first
    text = "; ".join(broken)
    named = [f"{k}={v}" for k, v in point.items() if re.search(rf"\b{re.escape(k)}\b", text)]
    example = f"e.g. at {', '.join(named)}: {text}" if named else f"e.g. {text}"
    always = [r for r in counts if counts[r] == n]
    if always:  # the same words at every point: the searched values do not enter into it
        return [f"every point of the searched space ({keys}; {n} probed) breaks this "
                f"rule, so no trial could run: {r}" for r in always], []
    share = f"every one of the {n}" if n_bad == n else f"{n_bad} of {n}"
    return [], [f"note: {share} probed points of the searched space ({keys}) break a rule "
                f"(points between the probes are not checked); the sampler may propose such "
                f"points, and each becomes a FAIL trial whose row names the rule; {example}"
                ] + notes


def idle_grid_note(task: Task, grid: Mapping[str, Any],
                   param_sets: Sequence[Mapping[str, Any]]) -> list[str]:
    """A note naming each grid axis that has no effect at any of its points (`only_with`)."""
    idle: dict[str, str] = {}
    for k in grid:
        decl = task.params.get(k)
        whys = [decl.idle_because(p) for p in param_sets] if decl is not None else [None]
        if whys and all(whys):
            idle[k] = str(whys[0])
    return [_idle_note(idle, len(param_sets), "grid axes", "points of the grid")] if idle else []


def _idle_note(idle: Mapping[str, str], n: int, who: str = "searched parameters",
               what: str = "probed points of the space") -> str:
    by_reason: dict[str, list[str]] = {}
    for name, why in idle.items():
        by_reason.setdefault(why, []).append(name)
    said = "; ".join(f"{', '.join(names)} ({why})" for why, names in by_reason.items())
    return (f"note: {who} that have no effect at any of the {n} {what}, so "
            f"its trials differ only in the others (fix them, or leave them out): {said}")


def validate_file(path: str | Path, overrides: Iterable[str] = ()
                  ) -> tuple[list[str], str, list[str]]:
    """Every problem of a space file and of `--set` overrides against its task, a summary,
    and notes (searches in which some probed points break a rule)."""
    notes: list[str] = []
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
    if space is not None and not problems:  # each search over its whole space
        task = get_task(space.task)
        given = parse_overrides(overrides, task)
        searches: list[Variant | None] = [None] if space.params else []
        searches += [v for v in space.variants.values() if not v.enumerated]
        for v in searches:
            searched = v.params if v else space.params
            where = f"{space.source}: " + (f"variants.{v.name}: " if v else "params: ")

            def merge(point: dict[str, Any], v: Variant | None = v) -> dict[str, Any]:
                assert space is not None
                return merge_params(task, space, v, point, given)

            def objective(params: dict[str, Any], v: Variant | None = v) -> list[str]:
                assert space is not None
                return task.objective_problems((v.metric if v else None) or space.metric,
                                               params)

            errs, said = probe_rules(task, {k: p for k, p in searched.items()
                                            if k not in given}, merge, objective)
            problems.extend(where + e for e in errs)
            notes.extend(f"{where}{n}" for n in said)
        # each enumerated point as `bench run --variant V [--set ...]` would run it
        for v in space.variants.values():
            if not v.enumerated or v.n_points() > 1000:
                continue
            sets = [merge_params(task, space, v, point, given) for point in v.points()]
            if given:
                where = f"{space.source}: variants.{v.name} with --set"
                metric = v.metric or space.metric
                for params in sets:
                    found = task.problems(params, where) or [
                        f"{where}: {e}" for e in task.objective_problems(metric, params)]
                    problems.extend(e for e in found if e not in problems)
            notes.extend(f"{space.source}: variants.{v.name}: {n}"
                         for n in idle_grid_note(task, v.grid, sets))
    summary = f"{len(space.params)} params, {len(space.variants)} variants" if space else ""
    return problems, summary, notes


def _declared_task(path: str | Path) -> str | None:
    try:
        raw = safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, yaml.YAMLError, ConfigError):
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
    """`key=value` strings -> typed dict; every unknown key and bad value reported at once."""
    out: dict[str, Any] = {}
    errs: list[str] = []
    for pair in pairs:
        key, sep, value = pair.partition("=")
        key = key.strip()
        if not sep or not key:
            errs.append(f"{source} {pair!r}: must be key=value")
            continue
        decl = task.params.get(key)
        if decl is None:
            errs.append(f"{source} {key}: {unknown(key, task.name, task.params)}")
            continue
        parsed = decl.parse_text(value)
        problem = decl.problem(parsed)
        if problem:
            errs.append(f"{source} {key}={shown(value, raw=True)}: {problem}")
        out[key] = parsed
    if errs:
        raise ConfigError(errs)
    return out


def merge_params(task: Task, space: Space, variant: Variant | None,
                 point: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """task defaults <- YAML fixed <- variant fixed <- sampled/grid point <- --set overrides,
    each value in its declared type (3 -> 3.0 for a float parameter)."""
    merged = dict(task.defaults)
    merged.update(space.fixed)
    if variant is not None:
        merged.update(variant.fixed)
    merged.update(point)
    merged.update(overrides)
    return {k: task.params[k].coerce(v) if k in task.params else v for k, v in merged.items()}
