"""Typed parameter declarations: the one source of a task's parameter types and value rules.

A task declares each parameter once (`Int`, `Float`, `Choice`, `Bool`, `Text`); from that
declaration come `--set` typing, the typing of YAML `fixed`, `grid` and `params` values,
the value checks run before anything starts, the Arrow type of the `param_<name>` column,
and what `bench list` prints. Every rule is checked without loading data, so a run with
bad values stops within seconds, listing every problem at once.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import yaml

THROUGHPUT = "train_examples_per_s"  # the metric every task gets from the harness

_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")  # YAML 1.1 reads 1e-3 as a str
KINDS = ("int", "float", "bool", "str", "choice")


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def looks_numeric(value: Any) -> bool:
    """A string YAML 1.1 left unparsed although it reads as a number (`1e-4`, `1e308`)."""
    return isinstance(value, str) and bool(_NUMBER.fullmatch(value.strip()))


@dataclass(frozen=True)
class Decl:
    """One parameter: kind, default, and the rule its values obey.

    Numeric bounds are inclusive (`low`, `high`) or exclusive (`above`); `nullable` admits
    None (for caps such as `train_size`, None meaning "all").
    """

    kind: str
    default: Any
    low: float | None = None
    high: float | None = None
    above: float | None = None
    choices: tuple[Any, ...] = ()
    nullable: bool = False
    help: str = ""
    # how the trial runs (speed, memory, evaluation-only settings), not what it trains: a
    # study's later runs may change it (bench.backends.optuna.check_overrides)
    execution: bool = False
    # added after studies and rows existed (a date): at its default, which must be the
    # behaviour from before it, it is left out of `config_hash` and of a study's stored
    # configuration, so the studies and rows from before it stay one configuration with
    # those after it (a study continues; a board groups old and new rows)
    since: str | None = None
    # the parameter has an effect only where each named parameter has one of the listed
    # values (`net=cnn` for a CNN's width): a run that searches it where it has none is
    # told so (bench.space.probe_rules)
    only_with: tuple[tuple[str, tuple[Any, ...]], ...] = ()

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")
        if self.kind == "choice":
            if not self.choices or len({type(c) for c in self.choices}) != 1:
                raise ValueError(f"choices must be non-empty and of one type: {self.choices}")
        problem = self.problem(self.default)
        if problem:
            raise ValueError(f"default {self.default!r} breaks its own rule: {problem}")

    # ------------------------------------------------------------ rules
    def rule(self) -> str:
        """The rule in words: 'an integer >= 1', 'one of max, avg', ..."""
        if self.kind == "choice":
            text = "one of " + ", ".join(str(c) for c in self.choices)
        elif self.kind == "bool":
            text = "true or false"
        elif self.kind == "str":
            text = "a string"
        else:
            text = "an integer" if self.kind == "int" else "a number"
            bounds = []
            if self.above is not None:
                bounds.append(f"> {_fmt(self.above)}")
            if self.low is not None:
                bounds.append(f">= {_fmt(self.low)}")
            if self.high is not None:
                bounds.append(f"<= {_fmt(self.high)}")
            if bounds:
                text += " " + " and ".join(bounds)
        return text + (" (or null)" if self.nullable else "")

    def problem(self, value: Any) -> str | None:
        """Why `value` is not a valid value of this parameter, or None."""
        if value is None:
            return None if self.nullable else f"must be {self.rule()}, got null"
        hint = (" (YAML 1.1 reads a number such as 1e-4 as a string: write 1.0e-4)"
                if looks_numeric(value) and self.kind in ("int", "float") else "")
        if self.kind == "choice":
            ok = any(type(value) is type(c) and value == c for c in self.choices)
            return None if ok else f"must be {self.rule()}, got {shown(value)}"
        if self.kind == "bool":
            return None if isinstance(value, bool) else \
                f"must be {self.rule()}, got {shown(value)}"
        if self.kind == "str":
            return None if isinstance(value, str) else \
                f"must be {self.rule()}, got {shown(value)}"
        if self.kind == "int" and not (is_number(value) and float(value).is_integer()):
            return f"must be {self.rule()}, got {shown(value)}{hint}"
        if self.kind == "float" and not is_number(value):
            return f"must be {self.rule()}, got {shown(value)}{hint}"
        x = float(value)
        if not math.isfinite(x):
            return f"must be {self.rule()} (finite), got {shown(value)}"
        if (self.low is not None and x < self.low) or (self.high is not None and x > self.high) \
                or (self.above is not None and x <= self.above):
            return f"must be {self.rule()}, got {shown(value)}"
        return None

    def idle_because(self, params: Mapping[str, Any]) -> str | None:
        """Why this parameter has no effect in `params` ("only with net=cnn; here
        net='shell_ridge'"), or None when it has one."""
        return unmet(self.only_with, params)

    def coerce(self, value: Any) -> Any:
        """A valid value in its column type: 3 -> 3.0 for floats, 3.0 -> 3 for ints."""
        if value is None:
            return None
        if self.kind == "float":
            return float(value)
        if self.kind == "int":
            return int(value)
        return value

    def arrow_type(self) -> Any:
        import pyarrow as pa

        kind = self.kind
        if kind == "choice":
            kind = {int: "int", float: "float", bool: "bool"}.get(type(self.choices[0]), "str")
        return {"int": pa.int64(), "float": pa.float64(), "bool": pa.bool_()}.get(
            kind, pa.string())

    def parse_text(self, text: str) -> Any:
        """A `--set` value: a YAML scalar, except that `1e-3` is a number (YAML 1.1: str)."""
        try:
            value = yaml.safe_load(text) if text.strip() else None
        except (yaml.YAMLError, ValueError):  # ValueError: an int of over 4,300 digits
            return text
        if isinstance(value, str) and looks_numeric(value):
            number = float(value)
            return int(number) if self.kind == "int" and number.is_integer() else number
        if self.kind == "str" and value is not None and not isinstance(value, str):
            return text  # a path or a name that YAML would read as a number or a bool
        return value


def unmet(only_with: tuple[tuple[str, tuple[Any, ...]], ...],
          params: Mapping[str, Any]) -> str | None:
    """The first condition of `only_with` that `params` do not meet, in words ("only with
    net=cnn; here net='shell_ridge'"), or None when they meet every one."""
    for key, allowed in only_with:
        if key in params and params[key] not in allowed:
            return (f"only with {key}={'|'.join(str(a) for a in allowed)}; here "
                    f"{key}={params[key]!r}")
    return None


def shown(value: Any, most: int = 80, raw: bool = False) -> str:
    """`repr(value)` (`str` with `raw`) for a message, cut to `most` characters (a
    5,000-digit --set value is named, not printed)."""
    text = str(value) if raw else repr(value)
    return text if len(text) <= most else f"{text[:most - 20]}... ({len(text):,} characters)"


def _fmt(x: float) -> str:
    return str(int(x)) if float(x).is_integer() and abs(x) < 1e15 else f"{x:g}"


# ------------------------------------------------------------ constructors
def only_with(decls: Mapping[str, Any], names: Iterable[str], **conditions: Iterable[Any]
              ) -> dict[str, Any]:
    """`decls` (parameters or metrics) with `names` declared to apply only where each
    condition's parameter takes one of its values (`only_with(P, ["width"], net=["cnn"])`):
    a parameter has an effect there only, a metric is reported there only."""
    import dataclasses

    out = dict(decls)
    for name in names:
        out[name] = dataclasses.replace(out[name], only_with=out[name].only_with + tuple(
            (k, tuple(v)) for k, v in conditions.items()))
    return out


def Int(default: int | None, low: int | None = None, high: int | None = None, *,  # noqa: N802
        nullable: bool = False, help: str = "", execution: bool = False,
        since: str | None = None) -> Decl:
    return Decl("int", default, low, high, nullable=nullable or default is None, help=help,
                execution=execution, since=since)


def Float(default: float, low: float | None = None, high: float | None = None, *,  # noqa: N802
          above: float | None = None, nullable: bool = False, help: str = "",
          execution: bool = False, since: str | None = None) -> Decl:
    return Decl("float", default, low, high, above, nullable=nullable, help=help,
                execution=execution, since=since)


def Choice(default: Any, choices: Iterable[Any], *, help: str = "",  # noqa: N802
           execution: bool = False, since: str | None = None) -> Decl:
    return Decl("choice", default, choices=tuple(choices), help=help, execution=execution,
                since=since)


def Bool(default: bool, *, help: str = "", since: str | None = None) -> Decl:  # noqa: N802
    return Decl("bool", default, help=help, since=since)


def Text(default: str | None, *, nullable: bool = False, help: str = "",  # noqa: N802
         since: str | None = None) -> Decl:
    return Decl("str", default, nullable=nullable or default is None, help=help, since=since)


# ------------------------------------------------------------ checks over a parameter set
def did_you_mean(word: str, names: Iterable[str]) -> str:
    """'did you mean `x`? ' for the one or two names nearest a typo, else ''."""
    import difflib

    cutoff = 0.75 if len(word) > 4 else 0.6  # a short word's one swap: vea -> vae (0.67)
    by_lower = {n.lower(): n for n in names}  # VAE -> vae
    near = [by_lower[n] for n in difflib.get_close_matches(word.lower(), list(by_lower), n=2,
                                                           cutoff=cutoff)]
    return f"did you mean {' or '.join(f'`{n}`' for n in near)}? " if near else ""


def unknown(key: str, task: str, names: Iterable[str]) -> str:
    """The message for a key that is not one of the task's parameters: the nearest
    names first (a typo), then every known one."""
    names = sorted(names)
    return (f"`{key}` is not a parameter of task {task!r}; {did_you_mean(key, names)}"
            f"known: {', '.join(names)}")


def problems(task: str, decls: Mapping[str, Decl], values: Mapping[str, Any],
             where: str = "") -> list[str]:
    """Every unknown key and every bad value of `values`, each naming where it came from."""
    out = []
    prefix = f"{where}: " if where else ""
    for key, value in values.items():
        decl = decls.get(key)
        if decl is None:
            out.append(f"{prefix}{key}: {unknown(key, task, decls)}")
            continue
        problem = decl.problem(value)
        if problem:
            out.append(f"{prefix}{key}: {problem}")
    return out


def coerce_all(decls: Mapping[str, Decl], values: Mapping[str, Any]) -> dict[str, Any]:
    return {k: decls[k].coerce(v) if k in decls else v for k, v in values.items()}


def defaults(decls: Mapping[str, Decl]) -> dict[str, Any]:
    return {k: d.default for k, d in decls.items()}


@dataclass(frozen=True)
class Metric:
    """A metric a task reports: its unit (for tables and axes) and what it measures;
    `only_with`: the parameter values under which the task reports it (an AE has no
    ELBO), so that a run ranked by it elsewhere is refused before it starts."""

    unit: str = ""
    help: str = ""
    split: str = ""  # train | val | test | "" (a cost or a count)
    only_with: tuple[tuple[str, tuple[Any, ...]], ...] = ()

    def missing_because(self, params: Mapping[str, Any]) -> str | None:
        """Why a trial of `params` does not report this metric, or None when it does."""
        return unmet(self.only_with, params)

    def label(self, name: str) -> str:
        return f"{name} ({self.unit})" if self.unit else name
