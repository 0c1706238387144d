"""Optuna backend: a study per (task, variant), trials run by one or several local workers.

- Storage: an SQLite file under `<out>/<task>/` by default. SQLite does not take several
  writing processes, so `--workers N > 1` uses a journal file there instead (or whatever
  `--storage` names: an RDB URL such as postgresql://..., or a journal-file path).
- Resume: re-running a study adds `--trials` more. Trials left RUNNING by a killed run are
  marked FAIL (and get a FAIL row) when this run holds the study's lock file, i.e. when no
  other local run is using the study; RDB storages also fail them by heartbeat.
- Enumerated variants (a grid, or just fixed values, times `seeds`) are enqueued: every
  (point, seed) pair not already COMPLETE, PRUNED, RUNNING or WAITING in the study is
  enqueued once, so a resumed sweep runs each missing pair exactly once.
- Worker slots (`--worker-id`, used by `bench slurm`): `--trials` counts the trials that
  worker has finished in total, so K slots of quota n_i finish exactly sum(n_i) trials
  however often each is restarted. SIGUSR2 asks the running trial to suspend (the objective
  saves its state through `ctx.suspend`); the trial stays RUNNING, owned by the slot, and
  the worker exits with EXIT_SUSPENDED (75) so its job script can requeue it; the restarted
  slot resumes its RUNNING trials first (from their saved state), then runs new ones.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import json
import multiprocessing as mp
import os
import signal
import sys
import threading
import time
import warnings
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import torch
from optuna.storages._heartbeat import get_heartbeat_thread, is_heartbeat_enabled  # as optimize
from optuna.storages.journal import JournalFileBackend
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, TrialState

from bench import leaderboard
from bench.backends._base import (
    Outcome,
    RunOptions,
    build_row,
    execute_trial,
    new_trial_uid,
    preflight,
)
from bench.errors import ConfigError, TrialFailed, TrialSuspended
from bench.registry import Task, get_task
from bench.space import Param, Space, Variant, load_space, merge_params, space_for
from bench.train import resolve_device
from bench.trial import TrialContext

SAMPLERS = ("tpe", "random", "grid", "cmaes", "qmc")
PRUNERS = ("median", "asha", "hyperband", "none")
DEFAULT_SEARCH_TRIALS = 20
EXIT_SUSPENDED = 75  # EX_TEMPFAIL: a slot stopped on SIGUSR2; requeue it to continue
STOP = threading.Event()  # set by SIGUSR2 in a worker slot: suspend the trial, take no new one


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

    @property
    def variant_name(self) -> str:
        return self.variant.name if self.variant else "default"

    def searched(self) -> dict[str, Param]:
        """Sampled parameters: the variant's own, else the space's, minus --set overrides."""
        params = self.variant.params if self.variant and self.variant.params else self.space.params
        return {k: p for k, p in params.items() if k not in self.opts.overrides}


def make_plan(opts: RunOptions) -> Plan:
    task = get_task(opts.task)
    space = load_space(opts.space_file, opts.task) if opts.space_file else space_for(opts.task)
    variant = space.variant(opts.variant) if opts.variant else None
    if opts.sampler not in SAMPLERS:
        raise ConfigError(f"--sampler: must be one of {', '.join(SAMPLERS)}, got {opts.sampler!r}")
    pruner = opts.pruner or ("none" if variant and variant.enumerated else "median")
    if pruner not in PRUNERS:
        raise ConfigError(f"--pruner: must be one of {', '.join(PRUNERS)}, got {pruner!r}")
    if opts.workers < 1:
        raise ConfigError(f"--workers: must be >= 1, got {opts.workers}")
    if opts.trials is not None and opts.trials < 0:
        raise ConfigError(f"--trials: must be >= 0, got {opts.trials}")
    metric = (variant.metric if variant else None) or space.metric
    direction = (variant.direction if variant else None) or space.direction
    study = opts.study or (f"{task.name}.{variant.name}" if variant else task.name)
    plan = Plan(opts, task, space, variant, metric, direction, study,
                resolve_storage(opts), pruner)
    if opts.sampler == "grid" and not (variant and variant.enumerated):
        for p in plan.searched().values():
            p.grid_values()  # raises ConfigError naming a param without a finite grid
    points = variant.points() if variant and variant.enumerated else [{}]
    preflight(task, [merge_params(task, space, variant, pt, opts.overrides) for pt in points],
              opts.data_dir)
    return plan


def resolve_storage(opts: RunOptions) -> str:
    folder = Path(opts.out) / opts.task
    if opts.storage is None:
        if opts.workers > 1:
            return f"journal:{folder / 'optuna.journal'}"
        return f"sqlite:///{folder / 'optuna.db'}"
    if "://" in opts.storage:
        if opts.storage.startswith("sqlite") and opts.workers > 1:
            raise ConfigError(
                f"--storage {opts.storage}: SQLite cannot take {opts.workers} writing processes; "
                "use a journal file (--storage path/to/study.journal) or postgresql://...")
        return opts.storage
    return f"journal:{opts.storage}"


def open_storage(url: str) -> optuna.storages.BaseStorage:
    if url.startswith("journal:"):
        path = Path(url.removeprefix("journal:"))
        path.parent.mkdir(parents=True, exist_ok=True)
        backend = JournalFileBackend(str(path))
        return optuna.storages.JournalStorage(backend)
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        return optuna.storages.RDBStorage(url, engine_kwargs={"connect_args": {"timeout": 60}})
    # A server database: heartbeats let a crashed worker's trial be failed and retried.
    return optuna.storages.RDBStorage(
        url, heartbeat_interval=10, grace_period=30,
        heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(
            max_retry=2))


def make_sampler(plan: Plan, worker: int, n_existing: int = 0) -> optuna.samplers.BaseSampler:
    # Workers must not propose the same points, nor a resumed study replay its first ones.
    seed = plan.opts.seed + 1000 * worker + 100_003 * n_existing
    name = plan.opts.sampler
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        if name == "tpe":
            concurrent = plan.opts.workers > 1 or "worker_id" in plan.opts.extra
            return optuna.samplers.TPESampler(seed=seed, multivariate=True,
                                              constant_liar=concurrent)
        if name == "random":
            return optuna.samplers.RandomSampler(seed=seed)
        if name == "cmaes":
            return optuna.samplers.CmaEsSampler(seed=seed, warn_independent_sampling=False)
        if name == "qmc":
            return optuna.samplers.QMCSampler(seed=seed, warn_independent_sampling=False)
        grid = {k: p.grid_values() for k, p in plan.searched().items()}
        return optuna.samplers.GridSampler(grid, seed=seed)


def make_pruner(name: str) -> optuna.pruners.BasePruner:
    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=1)
    if name == "asha":
        return optuna.pruners.SuccessiveHalvingPruner()
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1)
    return optuna.pruners.NopPruner()


def open_study(plan: Plan, worker: int = 0) -> optuna.Study:
    storage = open_storage(plan.storage_url)
    hook = ("heartbeat_stale_trial_callback"  # Optuna >= 4.9; failed_trial_callback before
            if hasattr(storage, "heartbeat_stale_trial_callback") else "failed_trial_callback")
    retry = getattr(storage, hook, None)
    if retry is not None:  # a heartbeat-failed trial gets its FAIL row, then is retried
        setattr(storage, hook, _RowThenRetry(plan, retry))
    study = optuna.create_study(
        storage=storage, sampler=make_sampler(plan, worker),
        pruner=make_pruner(plan.pruner), study_name=plan.study_name,
        direction=StudyDirection[plan.direction.upper()], load_if_exists=True)
    if study.direction.name.lower() != plan.direction:
        raise ConfigError(
            f"study {plan.study_name!r} in {plan.storage_url} was created to "
            f"{study.direction.name.lower()} but this run would {plan.direction}; use --study NEW")
    n_existing = len(study.get_trials(deepcopy=False))
    if n_existing:
        study.sampler = make_sampler(plan, worker, n_existing)
    return study


class _RowThenRetry:
    """Optuna's failed-trial callback (heartbeat expired), writing the FAIL row first."""

    def __init__(self, plan: Plan, retry: Any):
        self.plan, self.retry = plan, retry

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        _stale_row(self.plan, trial, "worker stopped sending heartbeats (killed?); marked FAIL "
                   "by another worker")
        self.retry(study, trial)


class StudyLock:
    """Every run holds the study's lock file shared; `sole` is True when this run got it
    exclusively at start, i.e. no other local run was using the study. Call `share()` once
    stale trials are dealt with, so that other runs may join."""

    def __init__(self, fh: Any, sole: bool):
        self.fh, self.sole = fh, sole

    def __bool__(self) -> bool:
        return self.sole

    def share(self) -> None:
        if self.sole:
            fcntl.flock(self.fh, fcntl.LOCK_SH)


@contextmanager
def study_lock(plan: Plan) -> Iterator[StudyLock]:
    path = Path(plan.opts.out) / plan.task.name / f".{plan.study_name}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            sole = True
        except BlockingIOError:
            fcntl.flock(fh, fcntl.LOCK_SH)  # waits only while a starting run fails stale trials
            sole = False
        try:
            yield StudyLock(fh, sole)
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def identity(plan: Plan, number: int, uid: str, seed: int) -> dict[str, Any]:
    return {"task": plan.task.name, "study": plan.study_name, "variant": plan.variant_name,
            "trial_uid": uid, "trial_number": number, "backend": "optuna",
            "sampler": plan.opts.sampler, "pruner": plan.pruner, "seed": seed}


def fail_stale_trials(plan: Plan, study: optuna.Study) -> list[int]:
    """Mark trials left RUNNING by a killed run FAIL, each with a FAIL leaderboard row.

    Suspended trials (a preempted worker slot saved their state) are left to their slot."""
    storage = study._storage
    stale = [t for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
             if not t.user_attrs.get("suspended")]
    failed = []
    for t in stale:
        trial_id = storage.get_trial_id_from_study_id_trial_number(study._study_id, t.number)
        row = _written_row(plan, t)
        if row is not None:  # killed after its row was written: the study adopts the row
            state = TrialState[row["state"]]
            done = state == TrialState.COMPLETE
            storage.set_trial_state_values(trial_id, state, [row["objective"]] if done else None)
        elif storage.set_trial_state_values(trial_id, TrialState.FAIL):
            _stale_row(plan, t)
            failed.append(t.number)
    return failed


def _written_row(plan: Plan, t: FrozenTrial) -> dict[str, Any] | None:
    uid = t.user_attrs.get("trial_uid")
    return leaderboard.read_trial(plan.opts.out, plan.task.name, uid) if uid else None


def _stale_row(plan: Plan, t: FrozenTrial,
               error: str = "worker died while the trial was RUNNING; marked FAIL on resume",
               ) -> None:
    uid = t.user_attrs.get("trial_uid") or new_trial_uid()
    if leaderboard.trial_exists(plan.opts.out, plan.task.name, uid):
        return  # the killed run wrote its row before the storage heard of the outcome
    point = {k: v for k, v in t.params.items()}
    params = merge_params(plan.task, plan.space, plan.variant, point, plan.opts.overrides)
    # Optuna stores naive local times; rows carry UTC.
    started = t.datetime_start.astimezone(dt.timezone.utc) if t.datetime_start else time_now()
    steps = max(t.intermediate_values, default=-1) + 1
    row = build_row(identity(plan, t.number, uid, t.user_attrs.get("seed", plan.opts.seed)),
                    params, state="FAIL", objective=None, metric=plan.metric,
                    direction=plan.direction, metrics={},
                    error=error,
                    started_at=started, finished_at=time_now(), epochs_done=steps,
                    peak_mem=None, device=resolve_device(plan.opts.device))
    leaderboard.write_trial(plan.opts.out, row)


def time_now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def point_key(point: dict[str, Any]) -> str:
    return json.dumps(point, sort_keys=True, default=str)


def enqueue_missing(plan: Plan, study: optuna.Study) -> int:
    """Enqueue every (point, seed) pair of an enumerated variant that the study lacks."""
    assert plan.variant is not None
    taken = {(t.user_attrs.get("bench_point"), t.user_attrs.get("seed_index"))
             for t in study.get_trials(deepcopy=False, states=(
                 TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING, TrialState.WAITING))}
    added = 0
    # Seed-major: a partial run covers every point once before repeating any.
    for s in range(plan.variant.seeds):
        for point in plan.variant.points():
            if (point_key(point), s) in taken:
                continue
            study.enqueue_trial(point, user_attrs={"bench_point": point_key(point),
                                                   "seed_index": s, "seed": plan.opts.seed + s})
            added += 1
    return added


def waiting(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=(TrialState.WAITING,)))


class Objective:
    """The Optuna objective: suggest, merge, run the task through `execute_trial`."""

    def __init__(self, plan: Plan, progress: Any = None):
        self.plan, self.progress = plan, progress
        self.device = resolve_device(plan.opts.device)
        self.searched = plan.searched()

    def params_for(self, trial: optuna.Trial) -> tuple[dict[str, Any], int]:
        v = self.plan.variant
        if "bench_point" in trial.user_attrs:
            assert v is not None
            point = {k: trial.suggest_categorical(k, vals) for k, vals in v.grid.items()}
            seed = int(trial.user_attrs["seed"])
        else:
            point = {k: suggest(trial, p) for k, p in self.searched.items()}
            seed = self.plan.opts.seed + trial.number
        plan = self.plan
        return merge_params(plan.task, plan.space, v, point, plan.opts.overrides), seed

    def __call__(self, trial: optuna.Trial) -> float:
        try:
            params, seed, uid, ctx = self._prepare(trial)
        except KeyboardInterrupt:  # Ctrl-C or SIGTERM before the objective began: still a row
            frozen = trial.study._storage.get_trial(trial._trial_id)
            _stale_row(self.plan, frozen, "interrupted (KeyboardInterrupt) before it started")
            raise
        if self.progress:
            self.progress.start_trial(trial.number, params.get("epochs"))
        outcome = execute_trial(self.plan.task, params, ctx,
                                identity(self.plan, trial.number, uid, seed),
                                Path(self.plan.opts.out), self.plan.direction)
        if self.progress:
            self.progress.end_trial(trial.number, outcome)
        return _to_optuna(outcome)

    def _prepare(self, trial: optuna.Trial) -> tuple[dict[str, Any], int, str, TrialContext]:
        params, seed = self.params_for(trial)
        uid = trial.user_attrs.get("trial_uid")
        if uid is not None and trial.user_attrs.get("uid_trial_number") == trial.number:
            seed = int(trial.user_attrs.get("seed", seed))  # a suspended trial, resumed
        else:  # a new trial (a retry copies its failed trial's user attrs: not its uid)
            uid = new_trial_uid()
            trial.set_user_attr("trial_uid", uid)
            trial.set_user_attr("uid_trial_number", trial.number)
            trial.set_user_attr("seed", seed)
        art = Path(self.plan.opts.out) / self.plan.task.name / "artifacts" / uid
        art.mkdir(parents=True, exist_ok=True)
        ctx = TrialContext(seed, self.device, art, self.plan.metric, self.plan.opts.data_dir,
                           on_report=lambda step, value: trial.report(value, step),
                           prune_check=trial.should_prune,
                           on_step=self.progress.on_step if self.progress else None,
                           stop_check=STOP.is_set)
        return params, seed, uid, ctx


def _to_optuna(outcome: Outcome) -> float:
    if outcome.state == "SUSPENDED":
        raise TrialSuspended(outcome.error)
    if outcome.state == "PRUNED":
        raise optuna.TrialPruned(outcome.error)
    if outcome.state == "FAIL":
        raise TrialFailed(outcome.error or "failed")
    assert outcome.objective is not None
    return outcome.objective


def suggest(trial: optuna.Trial, p: Param) -> Any:
    if p.type == "categorical":
        return trial.suggest_categorical(p.name, list(p.choices))
    if p.type == "int":
        return trial.suggest_int(p.name, int(p.low), int(p.high), step=int(p.step or 1), log=p.log)
    return trial.suggest_float(p.name, p.low, p.high, step=p.step, log=p.log)


def run_worker(plan: Plan, n_trials: int, worker: int = 0, progress: Any = None) -> None:
    """Run `n_trials` trials of the plan's study in this process."""
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    if n_trials <= 0:
        return
    study = open_study(plan, worker)
    study.optimize(Objective(plan, progress), n_trials=n_trials, catch=(Exception,),
                   gc_after_trial=False)


# ---------------------------------------------------------------- worker slots (bench slurm)

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)


def _on_usr2(signum: int, frame: Any) -> None:
    STOP.set()


def slot_index(worker_id: str) -> int:
    """A sampler-seed offset per slot, stable across its restarts."""
    return zlib.crc32(worker_id.encode()) % 100_000


def finished_by(study: optuna.Study, worker_id: str) -> int:
    return sum(1 for t in study.get_trials(deepcopy=False, states=FINISHED)
               if t.user_attrs.get("worker_id") == worker_id)


def run_slot(plan: Plan, worker_id: str, quota: int | None) -> int:
    """Resume the slot's RUNNING trials, then run new ones until it has finished `quota`.

    Returns 0, or EXIT_SUSPENDED when SIGUSR2 stopped it (its trial saved and left RUNNING).
    An enumerated variant's trials are enqueued beforehand (`bench slurm submit` does it):
    concurrent slots enqueueing at once would duplicate them.
    """
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    signal.signal(signal.SIGUSR2, _on_usr2)
    quota = DEFAULT_SEARCH_TRIALS if quota is None else quota
    study = open_study(plan, slot_index(worker_id))  # reseeded: a restart proposes anew
    objective = Objective(plan)
    owned = [t for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
             if t.user_attrs.get("worker_id") == worker_id]
    for t in owned:
        if STOP.is_set() or not _run_one(study, optuna.Trial(study, t._trial_id), objective):
            return EXIT_SUSPENDED
    enumerated = plan.variant is not None and plan.variant.enumerated
    while finished_by(study, worker_id) < quota:
        if STOP.is_set():
            return EXIT_SUSPENDED
        if enumerated and waiting(study) == 0:
            break
        if is_heartbeat_enabled(study._storage):  # as study.optimize does before each trial
            optuna.storages.fail_stale_trials(study)
        trial = study.ask()
        trial.set_user_attr("worker_id", worker_id)
        if not _run_one(study, trial, objective):
            return EXIT_SUSPENDED
    return 0


def _run_one(study: optuna.Study, trial: optuna.Trial, objective: Objective) -> bool:
    """Run one trial and tell the study; False when it was suspended (left RUNNING)."""
    if trial.user_attrs.get("suspended"):
        trial.set_user_attr("suspended", False)
    with get_heartbeat_thread(trial._trial_id, study._storage):
        try:
            value = objective(trial)
        except TrialSuspended:
            trial.set_user_attr("suspended", True)
            trial.set_user_attr("suspensions", int(trial.user_attrs.get("suspensions", 0)) + 1)
            return False
        except optuna.TrialPruned:
            study.tell(trial, state=TrialState.PRUNED)
            return True
        except KeyboardInterrupt:  # SIGTERM: the row says FAIL, so must the study
            study.tell(trial, state=TrialState.FAIL)
            raise
        except Exception:
            study.tell(trial, state=TrialState.FAIL)
            return True
    study.tell(trial, value)
    return True


def _worker_main(plan: Plan, n_trials: int, worker: int) -> None:
    from bench.cli import install_signal_handlers

    install_signal_handlers()
    if resolve_device(plan.opts.device).type == "cpu":  # k workers share the cores, not k x all
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // plan.opts.workers))
    try:
        run_worker(plan, n_trials, worker)
    except KeyboardInterrupt:
        sys.exit(130)


def split(n: int, k: int) -> list[int]:
    """n trials over k workers, exactly: the first n % k workers run one more."""
    return [n // k + (1 if i < n % k else 0) for i in range(k)]


@dataclass
class RunResult:
    plan: Plan
    n_planned: int
    stale_failed: list[int]
    storage_note: str
    exit_code: int = 0  # EXIT_SUSPENDED when a worker slot stopped on SIGUSR2


def run(opts: RunOptions, progress_factory: Any = None) -> RunResult:
    if "worker_id" in opts.extra and opts.workers != 1:
        raise ConfigError(f"--worker-id: a worker slot is one process, got --workers "
                          f"{opts.workers}; start one slot per worker")
    plan = make_plan(opts)
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    with study_lock(plan) as lock:
        study = open_study(plan)
        # With heartbeats (RDB) Optuna fails stale trials itself, and retries them.
        heartbeat = is_heartbeat_enabled(study._storage)
        stale = fail_stale_trials(plan, study) if lock.sole and not heartbeat else []
        lock.share()
        note = f"study {plan.study_name!r} in {plan.storage_url}"
        if "worker_id" in opts.extra:
            code = run_slot(plan, str(opts.extra["worker_id"]), opts.trials)
            return RunResult(plan, opts.trials or 0, stale, note, code)
        if plan.variant is not None and plan.variant.enumerated:
            enqueue_missing(plan, study)
            todo = waiting(study)
            n = todo if opts.trials is None else min(opts.trials, todo)
        else:
            n = DEFAULT_SEARCH_TRIALS if opts.trials is None else opts.trials
        progress = progress_factory(plan, n, study) if progress_factory else None
        try:
            if opts.workers == 1:
                run_worker(plan, n, 0, progress)
            else:
                _run_processes(plan, n, progress)
        finally:
            if progress:
                progress.close()
    return RunResult(plan, n, stale, note)


def _run_processes(plan: Plan, n: int, progress: Any) -> None:
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_worker_main, args=(plan, k, i), name=f"bench-worker-{i}")
             for i, k in enumerate(split(n, plan.opts.workers)) if k > 0]
    for p in procs:
        p.start()
    try:
        while any(p.is_alive() for p in procs):
            if progress:
                progress.poll()
            time.sleep(1.0)
    finally:
        for p in procs:
            p.join()
    if progress:
        progress.poll()
    failed = [p.name for p in procs if p.exitcode not in (0, None)]
    if failed:
        print(f"warning: worker(s) exited abnormally: {', '.join(failed)}", file=sys.stderr)
