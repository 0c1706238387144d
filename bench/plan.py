"""The plan of a run, backend-neutral: what runs, under which name, stored where.

`make_plan(RunOptions)` resolves the task, its space and variant, the objective, the study
name, the storage and the sampler and pruner names, and checks everything before anything
is written: every value of every known parameter set against the task's declarations, the
cross-parameter rules, the optional packages the task needs and the presence of its data.
Each problem is listed at once in one ConfigError (exit 2).

Naming and places (every backend and launcher uses these, never its own):
- study `TASK`, `TASK.VARIANT`, or `--study NAME` (`.smoke` appended for `--smoke` runs);
- results under `<out>/<task>/`: `trials/`, `curves/`, `artifacts/<trial_uid>/`;
- the study's storage: `--storage` (an RDB URL or a journal-file path), else the storage
  that already holds the study under `<out>/<task>/` (`optuna.db`, SQLite, or
  `optuna.journal`), else `optuna.db` for one worker and `optuna.journal` for several.
"""

from __future__ import annotations

import json
import os
import re
import sqlite3
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench.errors import BenchError, ConfigError
from bench.names import name_problem
from bench.params import problems as value_problems
from bench.registry import Task, get_task
from bench.space import (
    MAX_TRIALS,
    Param,
    Space,
    Variant,
    idle_grid_note,
    load_space,
    merge_params,
    probe_rules,
    space_for,
)

if TYPE_CHECKING:
    from bench.fused import FusedGroup

DEFAULT_SEARCH_TRIALS = 20
DEFAULT_SMOKE_TRIALS = 3
PRUNERS = ("median", "asha", "hyperband", "none")


# ---------------------------------------------------------------- sampler registry
def _tpe(seed: int, concurrent: bool) -> Any:
    import optuna

    return optuna.samplers.TPESampler(seed=seed, multivariate=True, constant_liar=concurrent)


def _random(seed: int, concurrent: bool) -> Any:
    import optuna

    return optuna.samplers.RandomSampler(seed=seed)


def _cmaes(seed: int, concurrent: bool) -> Any:
    import optuna

    return optuna.samplers.CmaEsSampler(seed=seed, warn_independent_sampling=False)


def _qmc(seed: int, concurrent: bool) -> Any:
    import optuna

    return optuna.samplers.QMCSampler(seed=seed, warn_independent_sampling=False)


# name -> factory(seed, concurrent) of the Optuna sampler; `grid` is built from the space.
SAMPLERS: dict[str, Callable[[int, bool], Any] | None] = {
    "tpe": _tpe, "random": _random, "grid": None, "cmaes": _cmaes, "qmc": _qmc}


def make_sampler(name: str, seed: int, concurrent: bool,
                 grid: Mapping[str, list[Any]] | None = None) -> Any:
    """The Optuna sampler `name` (Ray's OptunaSearch uses the same ones)."""
    import warnings

    import optuna

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        factory = SAMPLERS[name]
        if factory is None:
            return optuna.samplers.GridSampler(dict(grid or {}), seed=seed)
        return factory(seed, concurrent)


# ---------------------------------------------------------------- options and plan
@dataclass
class RunOptions:
    """Everything a backend needs to run a task's trials; built by the CLI from its flags."""

    task: str
    trials: int | None = None  # the study's target total (None: the default)
    add: int | None = None  # ... or this many more than the study has
    variant: str | None = None
    sampler: str = "tpe"
    pruner: str | None = None  # None: median for searches, none for enumerated variants
    seed: int = 0
    overrides: Mapping[str, Any] = field(default_factory=dict)
    study: str | None = None
    storage: str | None = None
    out: Path = Path("leaderboards")
    data_dir: Path | None = None
    device: str = "auto"
    workers: int = 1
    space_file: Path | None = None
    progress: bool = True
    smoke: bool = False
    timeout_s: float | None = None
    eval_top: int | None = None  # evaluate the best N configurations when the run ends
    checkpoint_every_s: float = 60.0
    fuse: int | str | None = None  # K trials trained as one stacked model, or "auto"
    backend: str = "optuna"
    extra: Mapping[str, Any] = field(default_factory=dict)  # backend-specific options


@dataclass
class Plan:
    """The resolved run: task, space, variant, objective and the storage it lives in."""

    opts: RunOptions
    task: Task
    space: Space
    variant: Variant | None
    metric: str
    direction: str
    study_name: str
    storage_url: str  # a URL, or "journal:<path>"
    pruner: str
    overrides: Mapping[str, Any]  # --set values (and --smoke's budget) in their types
    notes: list[str] = field(default_factory=list)  # said before the run starts (stderr)

    @property
    def variant_name(self) -> str:
        return self.variant.name if self.variant else "default"

    @property
    def enumerated(self) -> bool:
        return self.variant is not None and self.variant.enumerated

    @property
    def out(self) -> Path:
        return Path(self.opts.out)

    @property
    def task_dir(self) -> Path:
        return Path(self.opts.out) / self.task.name

    def artifact_dir(self, uid: str) -> Path:
        return self.task_dir / "artifacts" / uid

    def searched(self) -> dict[str, Param]:
        """Sampled parameters: the variant's own, else the space's, minus --set overrides."""
        params = self.variant.params if self.variant and self.variant.params else self.space.params
        return {k: p for k, p in params.items() if k not in self.overrides}

    def params(self, point: Mapping[str, Any]) -> dict[str, Any]:
        """The merged parameters of one sampled or enumerated point."""
        return merge_params(self.task, self.space, self.variant, point, self.overrides)

    def fixed_config(self, overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """What every trial of the study shares: the merged parameters (task defaults, the
        space's and the variant's fixed values, `--set` and `--smoke`) except those the
        study varies (searched or enumerated), execution parameters and parameters added
        later at their default (`Decl.since`). `overrides`: in
        place of this run's (a study's earlier run, read from its trials)."""
        given = self.overrides if overrides is None else overrides
        merged = merge_params(self.task, self.space, self.variant, {}, given)
        varied = self.varied()
        return {k: v for k, v in merged.items()
                if (k not in varied or k in given) and k not in self.task.execution
                and (k in varied or not self.task.at_added_default(k, v))}

    def varied(self) -> set[str]:
        """The parameters the study varies: searched, or its variant's grid axes."""
        return set(self.searched()) | (set(self.variant.grid) if self.variant else set())

    def canonical_config(self, overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """`fixed_config` as the study stores it (JSON values)."""
        return canonical(self.fixed_config(overrides))

    def default_total(self) -> int:
        if self.enumerated:
            assert self.variant is not None
            return self.variant.n_points() * self.variant.seeds
        return DEFAULT_SMOKE_TRIALS if self.opts.smoke else DEFAULT_SEARCH_TRIALS

    def point_problems(self, params: Mapping[str, Any]) -> list[str]:
        """Why a trial of `params` cannot run (a cross-parameter rule, or an objective it
        would not report); [] when it can."""
        return self.task.problems(params) or self.task.objective_problems(self.metric, params)

    def evaluates_every_trial(self) -> bool:
        """Enumerated variants are compared point by point: each trial gets its test metrics."""
        return self.enumerated

    def lock_path(self) -> Path:
        """Beside the storage file, so runs sharing a storage share the lock."""
        path = storage_file(self.storage_url)
        folder = path.parent if path is not None else self.task_dir
        return folder / f".{self.study_name}.lock"


def make_plan(opts: RunOptions, check_data: bool = True) -> Plan:
    task = get_task(opts.task)
    space = load_space(opts.space_file, opts.task) if opts.space_file else space_for(opts.task)
    variant = space.variant(opts.variant) if opts.variant else None
    errs = _option_problems(opts)
    grid_keys = set(variant.grid) if variant is not None else set()
    smoke = {k: v for k, v in task.smoke.items() if k not in grid_keys} if opts.smoke else {}
    overrides = {**smoke, **opts.overrides}  # --smoke keeps a variant's grid axes
    errs += value_problems(task.name, task.params, overrides, "--set")
    if opts.eval_top and not task.has_test_metrics:
        errs.append(f"--eval-top: task {task.name!r} has no test-set metrics to evaluate")
    pruner = opts.pruner or ("none" if variant and variant.enumerated else "median")
    if pruner not in PRUNERS:
        errs.append(f"--pruner: must be one of {', '.join(PRUNERS)}, got {pruner!r}")
    metric = (variant.metric if variant else None) or space.metric
    direction = (variant.direction if variant else None) or space.direction
    study = opts.study or (f"{task.name}.{variant.name}" if variant else task.name)
    if opts.smoke and not opts.study:
        study += ".smoke"
    if opts.study is not None and name_problem(opts.study):
        errs.append(f"--study: {name_problem(opts.study)}")
    if errs:
        raise ConfigError(errs)
    plan = Plan(opts, task, space, variant, metric, direction, study, "", pruner, overrides)
    plan.storage_url = resolve_storage(opts, task.name, study)
    _check_sampler(plan)
    if plan.opts.fuse is not None:
        fused_class(plan)
    param_sets = [plan.params(pt) for pt in (variant.points() if plan.enumerated
                                             and variant else [{}])]
    errs = []
    seen: set[str] = set()
    for params in param_sets:
        key = json.dumps(params, sort_keys=True, default=str)
        if key not in seen:
            seen.add(key)
            if plan.enumerated or not plan.searched():
                errs += task.problems(params, "parameters") or [
                    f"parameters: {e}" for e in task.objective_problems(metric, params)]
            else:
                errs += value_problems(task.name, task.params, params, "parameters")
    if not errs and not plan.enumerated:  # a search: its rules over the whole space
        errs, plan.notes = probe_rules(task, plan.searched(), plan.params,
                                       lambda p: task.objective_problems(metric, p))
        errs = [f"parameters: {e}" for e in errs]
    elif not errs and variant is not None:  # a grid: an axis that has no effect at any point
        plan.notes = idle_grid_note(task, variant.grid, param_sets)
    if errs:
        raise ConfigError(sorted(set(errs), key=errs.index))
    task.require_extra()
    if opts.fuse is not None:
        from bench.registry import get_fused

        if get_fused(task.name) is None:
            raise ConfigError(
                f"--fuse: task {task.name!r} trains one trial at a time (no fused "
                "implementation: BatchNorm statistics, or a 3-D model that fills the device "
                "alone); run it without --fuse, or several trials per GPU with --workers N")
    if check_data and task.data is not None:
        for data_params in task.data_sets(param_sets):
            task.data(data_params, opts.data_dir)
    return plan


def _option_problems(opts: RunOptions) -> list[str]:
    errs = []
    if opts.sampler not in SAMPLERS:
        errs.append(f"--sampler: must be one of {', '.join(SAMPLERS)}, got {opts.sampler!r}")
    if opts.workers < 1:
        errs.append(f"--workers: must be >= 1, got {opts.workers}")
    if opts.trials is not None and not 0 <= opts.trials <= MAX_TRIALS:
        errs.append(f"--trials: must be in [0, {MAX_TRIALS}], got {opts.trials}")
    if opts.add is not None and not 0 <= opts.add <= MAX_TRIALS:
        errs.append(f"--add: must be in [0, {MAX_TRIALS}], got {opts.add}")
    if opts.trials is not None and opts.add is not None:
        errs.append("--trials and --add: give one (--trials is the study's total, --add "
                    "asks for that many more)")
    if opts.timeout_s is not None and not opts.timeout_s > 0:
        errs.append(f"--timeout: must be > 0 seconds, got {opts.timeout_s}")
    if opts.eval_top is not None and opts.eval_top < 1:
        errs.append(f"--eval-top: must be >= 1, got {opts.eval_top}")
    if opts.fuse is not None and opts.fuse != "auto" and not (
            isinstance(opts.fuse, int) and 1 <= opts.fuse <= 1024):
        errs.append(f"--fuse: must be a number of trials in [1, 1024] or auto, got {opts.fuse!r}")
    if opts.fuse is not None and opts.backend != "optuna":
        errs.append("--fuse: fused trials run on the Optuna backend (Ray Tune schedules one "
                    "trial per actor)")
    if not opts.checkpoint_every_s >= 0:
        errs.append(f"--checkpoint-every: must be >= 0 seconds, got {opts.checkpoint_every_s}")
    # The Optuna backend trains here, so the device must exist here; Ray and Slurm plan on a
    # head or login node whose workers run elsewhere, so only the spelling is checked there.
    problem = device_problem(opts.device, here=opts.backend == "optuna")
    if problem:
        errs.append(f"--device: {problem}")
    return errs


_DEVICE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


def device_problem(name: str, here: bool = True) -> str | None:
    """Why `name` is not a device to train on (None when it is): one of auto, cpu, mps,
    cuda, cuda:N; with `here`, CUDA (and GPU N) or MPS must also exist on this machine."""
    if not _DEVICE.match(name):
        return f"must be auto, cpu, cuda, cuda:N or mps, got {name!r}"
    if not here or name in ("auto", "cpu"):
        return None
    import torch

    if name == "mps":
        return None if torch.backends.mps.is_available() else (
            "mps: Apple's MPS is not available on this machine (use auto or cpu)")
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        return f"{name}: CUDA is not available on this machine (use auto or cpu)"
    if ":" in name and int(name.split(":")[1]) >= count:
        return f"{name}: this machine has {count} GPU(s), cuda:0 to cuda:{count - 1}"
    return None


def fused_class(plan: Plan) -> type[FusedGroup]:
    """The task's FusedGroup class, refused before anything is written when the task has
    none or the run can reach a value the fused implementation does not train."""
    from bench.registry import get_fused

    cls = get_fused(plan.task.name)
    if cls is None:
        raise ConfigError(f"--fuse: task {plan.task.name!r} trains one trial at a time (it "
                          "has no fused implementation: BatchNorm statistics or a 3-D model "
                          "that fills the device alone); run it without --fuse, or several "
                          "trials per GPU with --workers N")
    supports: dict[str, tuple[Any, ...]] = getattr(cls, "supports", {})
    reachable: dict[str, set[Any]] = {k: {plan.params({}).get(k)} for k in supports}
    for name, decl in plan.searched().items():
        if name in supports:
            reachable[name] |= set(decl.values_to_check())
    if plan.enumerated and plan.variant is not None:
        for pt in plan.variant.points():
            for k in supports:
                reachable[k].add(plan.params(pt).get(k))
    for k, allowed in supports.items():
        bad = sorted(str(v) for v in reachable[k] - set(allowed))
        if bad:
            raise ConfigError(f"--fuse: {plan.task.name}'s fused trials train {k} in "
                              f"{{{', '.join(map(str, allowed))}}}, this run reaches "
                              + ", ".join(f"{k}={b}" for b in bad) + "; run it without --fuse")
    return cls  # type: ignore[no-any-return]


def _check_sampler(plan: Plan) -> None:
    if plan.opts.sampler != "grid" or plan.enumerated:
        return
    errs, size = [], 1
    for p in plan.searched().values():
        n = p.grid_size()
        if n is None:
            errs.append(f"--sampler grid: params.{p.name} has no finite set of values "
                        f"(categorical, int, or float with `step`), got type={p.type} "
                        f"log={p.log} step={p.step}")
        else:
            size *= n
    if not errs and size > MAX_TRIALS:
        errs.append(f"--sampler grid: the grid has {size:,} points; at most {MAX_TRIALS:,} "
                    "(narrow the ranges or add `step`)")
    if errs:
        raise ConfigError(errs)


# ---------------------------------------------------------------- storage
def storage_file(url: str) -> Path | None:
    """The file behind a journal or SQLite storage; None for a server database."""
    if url.startswith("journal:"):
        return Path(url.removeprefix("journal:"))
    if url.startswith("sqlite:///"):
        return Path(url.removeprefix("sqlite:///"))
    return None


def resolve_storage(opts: RunOptions, task: str, study: str) -> str:
    """The storage URL of the study (see the module's docstring)."""
    if opts.storage is not None:
        if "://" in opts.storage:
            if opts.storage.startswith("sqlite") and opts.workers > 1:
                raise ConfigError(
                    f"--storage {opts.storage}: SQLite cannot take {opts.workers} writing "
                    "processes; use a journal file (--storage path/to/study.journal) or "
                    "postgresql://...")
            return opts.storage
        path = opts.storage.removeprefix("journal:")  # the form the study's URL takes
        return f"journal:{Path(path).expanduser().resolve()}"
    folder = (Path(opts.out) / task).resolve()
    db, journal = folder / "optuna.db", folder / "optuna.journal"
    in_db, in_journal = study_in_sqlite(db, study), study_in_journal(journal, study)
    if in_db and in_journal:
        raise ConfigError(f"study {study!r} exists both in {db} and in {journal}; name the one "
                          "to use with --storage")
    if in_db and opts.workers > 1:
        raise ConfigError(
            f"study {study!r} lives in {db} (SQLite), which cannot take {opts.workers} "
            f"writing processes. Run it with --workers 1, or start a new study for several "
            f"workers with --study NEW (it will live in {journal.name})")
    if in_db:
        return f"sqlite:///{db}"
    if in_journal:
        return f"journal:{journal}"
    return f"journal:{journal}" if opts.workers > 1 else f"sqlite:///{db}"


SQLITE_MAGIC = b"SQLite format 3\x00"


def study_in_sqlite(path: Path, study: str) -> bool:
    """Whether the SQLite file holds `study`; ConfigError for a damaged file."""
    if not path.exists():
        return False
    try:
        with open(path, "rb") as fh:
            head = fh.read(16)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the study database: {exc.strerror}") from None
    if not head:
        raise ConfigError(
            f"{path}: the study database is empty (0 bytes): it was truncated or replaced, "
            "and its studies are gone. Restore it from a backup, or move it away to start "
            "new studies (the leaderboard's rows stay)")
    if head != SQLITE_MAGIC:
        raise ConfigError(f"{path}: not an SQLite database (damaged, or another file in its "
                          "place); restore it, or move it away to start new studies")
    # read-write where allowed (`rw` never creates): a writer killed mid-commit leaves a hot
    # journal that only a read-write connection rolls back; read-only on a read-only file
    mode = "rw" if os.access(path, os.W_OK) and os.access(path.parent, os.W_OK) else "ro"
    try:
        con = sqlite3.connect(f"file:{path}?mode={mode}", uri=True, timeout=60)
        try:
            rows = con.execute("SELECT 1 FROM studies WHERE study_name = ?", (study,))
            return rows.fetchone() is not None
        finally:
            con.close()
    except sqlite3.OperationalError as exc:
        if "no such table" in str(exc):
            return False
        raise ConfigError(f"{path}: cannot read the study database: {exc}") from None
    except sqlite3.DatabaseError as exc:
        raise ConfigError(f"{path}: the study database is damaged ({exc}); restore it from "
                          "a backup, or move it away to start new studies") from None


def study_in_journal(path: Path, study: str) -> bool:
    """Whether the journal file creates `study` (op_code 0 records)."""
    if not path.exists():
        return False
    needle = json.dumps(study)
    torn: int | None = None  # an unreadable study record, damage unless it is the last line
    try:
        with open(path, "rb") as fh:
            for number, line in enumerate(fh, 1):
                if torn is not None:
                    raise ConfigError(f"{path}: the study journal is damaged (line {torn} is "
                                      "not a whole record, and records follow it); keep a "
                                      "copy, then remove that line to recover its studies")
                if b'"op_code":0' not in line or needle.encode() not in line:
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    torn = number
                    continue
                if record.get("op_code") == 0 and record.get("study_name") == study:
                    return True
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the study journal: {exc.strerror}") from None
    return False


def describe_storage(url: str) -> str:
    path = storage_file(url)
    return str(path) if path is not None else url.split("@")[-1]


def require_backend(name: str) -> None:
    """A clear error naming the extra when a backend's stack is missing."""
    import importlib.util

    if name == "ray" and importlib.util.find_spec("ray") is None:
        raise BenchError("--backend ray needs Ray Tune, which is not installed: "
                         "pip install -e '.[ray]'")


def canonical(values: Mapping[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(dict(values), sort_keys=True, default=str))


def config_change(stored: Mapping[str, Any], mine: Mapping[str, Any],
                  plan: Plan | None = None) -> str | None:
    """How this run's configuration differs from its study's, value by value; None if not.
    A key is absent when the study varies it (named so) or, for a parameter added later
    (`Decl.since`), at its default (named as its default)."""
    if dict(stored) == dict(mine):
        return None
    missing = object()
    changed = sorted(k for k in {*stored, *mine} if stored.get(k, missing) != mine.get(k, missing))

    def show(config: Mapping[str, Any], key: str) -> str:
        if key in config:
            return repr(config[key])
        if plan is not None and key in plan.varied():
            return "'(searched or a grid axis)'"
        decl = plan.task.params.get(key) if plan is not None else None
        if decl is not None and decl.since is not None:
            return f"{decl.default!r} (the default; the parameter was added {decl.since})"
        return "'(unset)'"

    return ", ".join(f"{k}: the study's {show(stored, k)}, this run's {show(mine, k)}"
                     for k in changed)


def refuse_other_config(study: str, where: str, change: str) -> ConfigError:
    return ConfigError(
        f"study {study!r} in {where} is one configuration, and this run would train another "
        f"({change}; from --set, --smoke, the search space or the variant). Rerun with the "
        "study's values to continue it, or give --study NEW for a study of this "
        "configuration")
