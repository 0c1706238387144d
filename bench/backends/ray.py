"""Ray Tune backend: the same task, YAML space and leaderboard as the Optuna backend, on Ray.

- Space: `Param.to_ray` (inclusive bounds kept). `--sampler tpe|cmaes|qmc` search through
  Ray's `OptunaSearch` with the matching Optuna sampler; `random` is Ray's own random
  search; `grid` (and every enumerated variant, times its `seeds`) is `tune.grid_search`.
- Pruning: `--pruner asha` is Ray's ASHA, `hyperband` its asynchronous HyperBand (ASHA with
  3 brackets: the synchronous one pauses trials, which a function trainable without
  checkpoints would restart from scratch), `median` the median-stopping rule, `none` FIFO.
  Every scheduler counts `epochs_done`, so rungs are in the task's own steps.
- Trials: each one runs the task's trial lifecycle (`bench.lifecycle.execute_trial`) in
  its Ray worker and writes its own row. A trial the scheduler stops gets a PRUNED row: Ray
  stops a function trainable by raising `SystemExit` from `tune.report` in its thread,
  which `_Reporter` turns into bench's prune decision; `BenchTrainable.cleanup` waits for
  the row before Ray tears the actor down. A failed trial raises, so Ray's
  `--max-failures` retries it; the retry has the same `trial_uid` (derived from the
  experiment path and Ray's trial id), so the leaderboard keeps one row per trial: its
  last attempt.
- Experiments live under `<out>/<task>/ray/<study>` (or under `--storage`, any Ray storage
  path). Rerunning the same command restores the experiment (`Tuner.restore`) and continues
  it to its total, re-running only unfinished trials; a trial interrupted after saving its
  state (its artifact folder is keyed by a uid stable across restores) resumes from it.
  Ray changes the working directory of trials, so every path is made absolute first.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import ray
from ray import tune
from ray.tune.result import RESULT_DUPLICATE
from ray.tune.trainable.function_trainable import FunctionTrainable

from bench import leaderboard
from bench.backends._base import Backend, RunResult, register_backend
from bench.errors import ConfigError, TrialFailed
from bench.lifecycle import config_failure, execute_trial
from bench.plan import (
    Plan,
    RunOptions,
    config_change,
    describe_storage,
    make_sampler,
    refuse_other_config,
)
from bench.train import resolve_device
from bench.trial import TrialContext

STEP = "epochs_done"  # the scheduler's time attribute: steps the objective has reported
SEED_INDEX = "bench_seed_index"  # grid axis of the repeated seeds of an enumerated variant
ROW_WAIT_S = 60.0  # how long a stopped trial's actor waits for the trial to write its row
LOCAL_OBJECT_STORE_BYTES = 256 * 2**20  # trials pass only configs and metrics through it


@dataclass(frozen=True)
class RayOptions:
    """The Ray-only flags of `bench run` (RunOptions.extra), validated."""

    gpus_per_trial: float = 0.0
    cpus_per_trial: float = 1.0
    address: str | None = None
    max_failures: int = 0
    resume: bool = False

    @classmethod
    def from_extra(cls, extra: Mapping[str, Any]) -> RayOptions:
        o = cls(**{k: extra[k] for k in ("gpus_per_trial", "cpus_per_trial", "address",
                                          "max_failures", "resume") if extra.get(k) is not None})
        errs = o.problems()
        if errs:
            raise ConfigError(errs)
        return o

    def problems(self) -> list[str]:
        errs = []
        g, c = self.gpus_per_trial, self.cpus_per_trial
        if not math.isfinite(g) or g < 0:
            errs.append(f"--gpus-per-trial: must be >= 0, got {g}")
        elif g > 1 and g != int(g):
            errs.append(f"--gpus-per-trial: a share of one GPU (0 < g <= 1) or a whole number "
                        f"of GPUs, got {g}")
        if not math.isfinite(c) or c < 0 or (c > 1 and c != int(c)):
            errs.append(f"--cpus-per-trial: must be >= 0, and whole above 1, got {c}")
        if self.max_failures < -1:
            errs.append(f"--max-failures: must be >= 0 (or -1: retry forever), got "
                        f"{self.max_failures}")
        return errs


# ---------------------------------------------------------------- inside a trial (Ray worker)

def trial_uid(experiment_path: str, ray_trial_id: str) -> str:
    """Stable across retries and restores of one Ray trial, unique across experiments."""
    return hashlib.sha256(f"{experiment_path}/{ray_trial_id}".encode()).hexdigest()[:16]


def plain(value: Any) -> Any:
    """Ray's samplers hand out numpy scalars; params (and config hashes) hold Python ones, as
    under the Optuna backend."""
    return value.item() if isinstance(value, np.generic) else value


def trial_number(ray_trial_id: str, trial_dir: str) -> int:
    """0-based creation order. Ray's own generator ids end in a 0-based counter
    (`f7436_00003`); with a searcher ids are random and the trial folder is named
    `<trainable>_<id>_<n>_<config>...`, n counting trials from 1."""
    tail = ray_trial_id.rsplit("_", 1)[-1]
    if "_" in ray_trial_id and tail.isdigit():
        return int(tail)
    m = re.search(re.escape(ray_trial_id) + r"_(\d+)", Path(trial_dir).name)
    return max(0, int(m.group(1)) - 1) if m else 0


class _Reporter:
    """Sends the objective metric to Ray; remembers whether Ray stopped the trial."""

    def __init__(self, metric: str):
        self.metric, self.stopped = metric, False

    def report(self, step: int, value: float) -> None:
        if self.stopped:
            return
        try:
            tune.report({self.metric: value, STEP: step + 1})
        except SystemExit:  # Ray's scheduler stopped this trial while report waited
            self.stopped = True

    def should_prune(self) -> bool:
        return self.stopped

    def final(self, metrics: Mapping[str, float], steps: int) -> None:
        """The final metrics as the last result (the searcher's value for the trial)."""
        if self.stopped:
            return
        try:
            tune.report({**metrics, STEP: steps, "bench_state": "COMPLETE"})
        except SystemExit:  # stopped after the row was written: nothing left to do
            pass


def run_trial(plan: Plan, experiment_path: str, ray_trial_id: str,
              config: Mapping[str, Any]) -> bool:
    """One Ray trial: merge its parameters, run the objective, write its row.

    Returns True when Ray stopped the trial (its session is then gone)."""
    point = {k: plain(v) for k, v in config.items() if k != SEED_INDEX}
    number = trial_number(ray_trial_id, tune.get_context().get_trial_dir() or "")
    offset = int(config[SEED_INDEX]) if SEED_INDEX in config else number
    seed = plan.opts.seed + offset
    params = plan.params(point)
    uid = trial_uid(experiment_path, ray_trial_id)
    art = plan.artifact_dir(uid)
    art.mkdir(parents=True, exist_ok=True)
    reporter = _Reporter(plan.metric)
    ctx = TrialContext(seed, resolve_device(plan.opts.device), art, plan.metric,
                       plan.opts.data_dir, on_report=reporter.report,
                       prune_check=reporter.should_prune, stop_check=lambda: False,
                       checkpoint_every_s=plan.opts.checkpoint_every_s)
    ident = {"task": plan.task.name, "study": plan.study_name,
             "study_uid": trial_uid(experiment_path, ""), "variant": plan.variant_name,
             "trial_uid": uid, "trial_number": number, "backend": "ray",
             "sampler": plan.opts.sampler, "pruner": plan.pruner, "seed": seed}
    bad = plan.point_problems(params)
    if bad:  # its FAIL row first, as the Optuna backend's
        failed = config_failure(plan.task, plan.out, plan.metric, plan.direction, ident,
                                params, bad, ctx.device)
        unwritten = f"; its row could not be written: {failed.row_error}" \
            if failed.row_error else ""
        raise TrialFailed((failed.error or "ConfigError") + unwritten)
    outcome = execute_trial(plan.task, params, ctx, ident, plan.out, plan.direction,
                            evaluate=plan.evaluates_every_trial())
    if outcome.row_error:
        raise TrialFailed(f"could not write its row: {outcome.row_error}")
    if outcome.state == "FAIL":
        raise TrialFailed(outcome.error or "failed")  # Ray marks it ERROR and may retry it
    if outcome.state == "COMPLETE":
        reporter.final(outcome.metrics, ctx.steps_done)
    return reporter.stopped


class BenchTrainable(FunctionTrainable):
    """A function trainable running `run_trial`, whose actor outlives the trial's row."""

    def setup(self, config: dict[str, Any], plan: Plan | None = None,
              experiment_path: str = "") -> None:
        assert plan is not None
        self._plan, self._experiment_path = plan, experiment_path
        self._row_written = threading.Event()
        super().setup(config)

    def _trainable_func(self, config: dict[str, Any]) -> None:
        try:
            stopped = run_trial(self._plan, self._experiment_path, self.trial_id, config)
        finally:
            self._row_written.set()
        if not stopped:  # as Ray's own function wrapper ends: "no new result, trial done"
            try:
                tune.report({RESULT_DUPLICATE: True})
            except SystemExit:
                pass

    def reset_config(self, new_config: dict[str, Any]) -> bool:
        # A reused actor: Ray ends the last trial's thread here (2 s at most; else the actor
        # is stopped and `cleanup` waits), so a True means that trial's row is written.
        ok = bool(super().reset_config(new_config))
        if ok:
            self._row_written = threading.Event()
        return ok

    def cleanup(self) -> None:
        # Ray releases a stopped trial's thread here (its report raises SystemExit) and then
        # ends the actor; without this wait the PRUNED row could be lost with the process.
        try:
            super().cleanup()
        finally:
            self._row_written.wait(ROW_WAIT_S)


# ---------------------------------------------------------------- the driver

def _searcher(plan: Plan) -> Any:
    """OptunaSearch with the Optuna sampler of the same name; None: Ray's random/grid."""
    from ray.tune.search.optuna import OptunaSearch

    if plan.opts.sampler in ("random", "grid") or plan.enumerated or not plan.searched():
        return None  # a variant's grid is Ray's grid_search (`param_space`)
    return OptunaSearch(sampler=make_sampler(plan.opts.sampler, plan.opts.seed, True))


def max_steps(plan: Plan) -> int:
    """The most steps a trial can report: the task's epochs of a trial (`trained_epochs`:
    params `epochs`, or the task's `epochs_of`), the largest over the variant's points or
    the searched space."""
    from bench.space import probe_points

    if plan.enumerated:
        assert plan.variant is not None
        sets = [plan.params(point) for point in plan.variant.points()]
    else:
        sets = [params for _, params in probe_points(plan.searched(), plan.params)]
    return max([1, *(plan.task.trained_epochs(p) for p in sets)])


def _scheduler(plan: Plan) -> Any:
    from ray.tune import schedulers as s

    # max_t one past the last step: ASHA stops a trial that reaches max_t, and a trial at its
    # last epoch must be allowed to return its final metrics.
    max_t = max_steps(plan) + 1
    factories: dict[str, Callable[[], Any]] = {
        "asha": lambda: s.ASHAScheduler(time_attr=STEP, max_t=max_t, grace_period=1),
        "hyperband": lambda: s.AsyncHyperBandScheduler(time_attr=STEP, max_t=max_t,
                                                       grace_period=1, brackets=3),
        "median": lambda: s.MedianStoppingRule(time_attr=STEP, grace_period=1,
                                               min_samples_required=5),
        "none": s.FIFOScheduler,
    }
    return factories[plan.pruner]()


def param_space(plan: Plan) -> tuple[dict[str, Any], int]:
    """Ray's param_space and num_samples for the plan."""
    v = plan.variant
    if v is not None and v.enumerated:
        space: dict[str, Any] = {k: tune.grid_search(list(vals)) for k, vals in v.grid.items()
                                 if k not in plan.overrides}
        space[SEED_INDEX] = tune.grid_search(list(range(v.seeds)))
        return space, 1
    if plan.opts.sampler == "grid":
        return {k: tune.grid_search(p.grid_values()) for k, p in plan.searched().items()}, 1
    n = plan.default_total() if plan.opts.trials is None else plan.opts.trials
    return {k: p.to_ray() for k, p in plan.searched().items()}, n


def absolute(opts: RunOptions) -> RunOptions:
    """Ray runs trials in their own working directories: make every path absolute."""
    def fix(p: Path | None) -> Path | None:
        return Path(p).expanduser().resolve() if p is not None else None

    return dataclasses.replace(opts, out=Path(opts.out).expanduser().resolve(),
                               data_dir=fix(opts.data_dir), space_file=fix(opts.space_file))


def storage_path(plan: Plan) -> str:
    s = plan.opts.storage
    if s and "://" in s and not s.startswith(("s3://", "gs://", "file://")):
        raise ConfigError(f"--storage {s}: with --backend ray, --storage is where Ray keeps "
                          "its experiments (a folder, s3:// or gs://), not an Optuna database")
    if s:
        return s if "://" in s else str(Path(s).expanduser().resolve())
    return str(Path(plan.opts.out) / plan.task.name / "ray")


def _env_for_workers() -> dict[str, str]:
    """BENCH_* variables (data, spaces) as absolute paths, for workers on other nodes too."""
    env = {k: v for k, v in os.environ.items() if k.startswith("BENCH_")}
    for k in ("BENCH_DATA", "BENCH_SPACES", "BENCH_OUT"):
        if k in env:
            env[k] = str(Path(env[k]).expanduser().resolve())
    return env


def connect(ropts: RayOptions, quiet: bool = True) -> bool:
    """Join `--address` or start a local cluster; True when this call did (so must shut down)."""
    if ray.is_initialized():
        return False
    runtime_env = {"env_vars": _env_for_workers()}
    if ropts.address:
        ray.init(address=ropts.address, runtime_env=runtime_env, log_to_driver=not quiet)
    else:
        cpus = os.environ.get("BENCH_RAY_CPUS")
        ray.init(num_cpus=int(cpus) if cpus else None, include_dashboard=False,
                 object_store_memory=LOCAL_OBJECT_STORE_BYTES, runtime_env=runtime_env,
                 log_to_driver=not quiet)
    return True


def check_resources(ropts: RayOptions, device: str) -> None:
    """Fail before launch when no node could ever hold one trial."""
    total = ray.cluster_resources()
    gpus, cpus = float(total.get("GPU", 0.0)), float(total.get("CPU", 0.0))
    errs = []
    if ropts.gpus_per_trial > gpus:
        errs.append(f"--gpus-per-trial {ropts.gpus_per_trial:g}: the Ray cluster has "
                    f"{gpus:g} GPU(s)")
    if ropts.cpus_per_trial > cpus:
        errs.append(f"--cpus-per-trial {ropts.cpus_per_trial:g}: the Ray cluster has "
                    f"{cpus:g} CPU(s)")
    if device.startswith("cuda") and ropts.gpus_per_trial <= 0:
        errs.append(f"--device {device}: Ray hides GPUs from trials that request none; "
                    "give --gpus-per-trial (e.g. 0.25 for four trials per GPU)")
    if errs:
        raise ConfigError(errs)


CONFIG_FILE = "bench_study_config.json"  # in the experiment folder: its configuration


def _config_file(experiment: str) -> tuple[Any, str]:
    import pyarrow.fs as pafs  # Ray's own storage layer: local paths and cloud URIs alike

    fs, root = pafs.FileSystem.from_uri(experiment) if "://" in experiment else (
        pafs.LocalFileSystem(), experiment)
    return fs, f"{root.rstrip('/')}/{CONFIG_FILE}"


def _write_config(experiment: str, config: Mapping[str, Any]) -> None:
    fs, path = _config_file(experiment)
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    part = f"{path}.{os.getpid()}.part"  # written whole, then moved into place: a kill
    with fs.open_output_stream(part) as fh:  # mid-write leaves no half record
        fh.write(json.dumps(dict(config), sort_keys=True).encode())
    fs.move(part, path)


def check_config(plan: Plan, experiment: str) -> None:
    """A restored experiment is one configuration, as an Optuna study is
    (`bench.backends.optuna.check_overrides`): its trials would otherwise be continued, and
    new ones started, with other fixed values under the same name. An experiment from
    before this record gets this run's."""
    fs, path = _config_file(experiment)
    mine = plan.canonical_config()
    try:
        with fs.open_input_stream(path) as fh:
            stored = json.loads(fh.read().decode())
    except FileNotFoundError:
        _write_config(experiment, mine)
        return
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}: unreadable ({exc}); it records the configuration of "
                          f"the Ray experiment {plan.study_name!r}. Restore it from a copy, "
                          "or give --study NEW") from exc
    change = config_change(stored, mine, plan)
    if change is not None:
        raise refuse_other_config(plan.study_name, describe_storage(experiment), change)


def make_tuner(plan: Plan, ropts: RayOptions, path: str, name: str) -> tune.Tuner:
    experiment = str(Path(path) / name) if "://" not in path else f"{path}/{name}"
    trainable = tune.with_resources(
        tune.with_parameters(BenchTrainable, plan=plan, experiment_path=experiment),
        {"cpu": ropts.cpus_per_trial, "gpu": ropts.gpus_per_trial})
    if tune.Tuner.can_restore(experiment):  # the same command again: continue it
        check_config(plan, experiment)
        return tune.Tuner.restore(experiment, trainable, resume_unfinished=True,
                                  resume_errored=ropts.max_failures != 0)
    if ropts.resume:
        raise ConfigError(f"--resume: no Ray experiment to restore at {experiment}")
    _write_config(experiment, plan.canonical_config())
    space, n = param_space(plan)
    cfg = tune.TuneConfig(metric=plan.metric, mode=plan.direction[:3], num_samples=n,
                          search_alg=_searcher(plan), scheduler=_scheduler(plan),
                          max_concurrent_trials=plan.opts.workers if plan.opts.workers > 1
                          else None, reuse_actors=True)
    run_cfg = tune.RunConfig(name=name, storage_path=path,
                             failure_config=tune.FailureConfig(max_failures=ropts.max_failures),
                             verbose=1 if plan.opts.progress else 0)
    return tune.Tuner(trainable, param_space=space, tune_config=cfg, run_config=run_cfg)


@register_backend
class RayBackend(Backend):
    name = "ray"

    def run(self, plan: Plan, progress: Callable[..., Any] | None = None) -> RunResult:
        """Connect, fit; the rows are already written when Ray returns."""
        if plan.opts.add is not None:
            raise ConfigError("--add: a Ray Tune experiment is restored to its total; start "
                              "a new one with --study NAME --trials N")
        ropts = RayOptions.from_extra(plan.opts.extra)
        plan = dataclasses.replace(plan, opts=absolute(plan.opts))
        path = storage_path(plan)
        started = connect(ropts, quiet=not plan.opts.progress)
        try:
            check_resources(ropts, plan.opts.device)
            tuner = make_tuner(plan, ropts, path, plan.study_name)
            results = tuner.fit()
        finally:
            if started:
                ray.shutdown()
        where = f"{path}/{plan.study_name}"
        result = RunResult(plan, f"Ray experiment {plan.study_name!r} in "
                                 f"{describe_storage(where)}")
        rows = leaderboard.read_trials(plan.out, plan.task.name, study=plan.study_name)
        result.counts = rows["state"].value_counts().to_dict() if not rows.empty else {}
        result.target = len(results)
        if results.errors:
            result.note(f"{len(results.errors)} Ray trial(s) ended in error (FAIL rows)")
            if len(results.errors) == len(results):
                result.exit_code = 1
        return result
