"""Optuna backend: a study per (task, variant), trials run by one or several local workers.

- Storage (bench.plan): SQLite under `<out>/<task>/` for one worker, a journal file there
  for several, or whatever `--storage` names; a study that exists is always reopened where
  it lives. Journal files use an `fcntl` lock (released by the kernel when a writer dies,
  so a kill -9 never leaves a stale lock) and drop a record torn by a full disk.
- Targets: `--trials N` is the study's total (a rerun of the same command continues to the
  same total, as a restored Ray Tune experiment does); `--add N` asks for N more; a
  variant's total is its points x seeds. `--timeout` stops starting trials after that many
  seconds.
- The run's own loop (ask -> run -> tell), not `study.optimize`: a stop request (Ctrl-C,
  SIGTERM, SIGUSR2) lets the running trial save its state at the epoch boundary; the trial
  stays RUNNING, marked `suspended`, and the next run resumes it before starting new ones.
- A run that holds the study's lock alone repairs what killed runs left: a RUNNING trial
  with a saved state is resumed; one whose result reached the study but whose row did not
  gets its row; one with neither is marked FAIL with a FAIL row. Every finished trial
  without a row gets one from the study's record. With heartbeats (RDB servers: other
  hosts may be live) a run starts by repairing only what is stale: a trial without a
  heartbeat for the grace period is told its known result, or failed (it counts in the
  total, as on a file; Optuna's retry of it is the next trial asked), and a trial
  finished that long ago without a row gets one.
- Enumerated variants: every (point, seed) pair the study lacks is enqueued once,
  seed-major, and workers pop only enqueued trials.
- Worker slots (`--worker-id`, used by `bench slurm`): `--trials` counts the trials that
  slot has finished in total; on SIGUSR2 the slot suspends its trial and exits with
  EXIT_SUSPENDED (75) so its job requeues it; the restarted slot resumes it first.
- Each trial's `bench` user attributes carry its row uid, seed, `--set` overrides, final
  metrics and FAIL reason, so optuna-dashboard shows what the leaderboard shows. They are
  written with the trial's first saved state or its result (one storage write, not one
  more at its start); the uid is derived from the study's uid and the trial number.
- Rows are written by a `RowWriter` thread while the next trial runs (the result reaches
  the study right after the row is queued); the run waits for them before it exits.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import fcntl
import hashlib
import json
import multiprocessing as mp
import os
import signal
import sqlite3
import sys
import time
import uuid
import warnings
import zlib
from collections import Counter
from collections.abc import Callable, Generator, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
import torch
from optuna.storages._heartbeat import (
    BaseHeartbeat,
    get_heartbeat_thread,
    is_heartbeat_enabled,
)
from optuna.storages.journal import JournalFileBackend
from optuna.storages.journal._file import BaseJournalFileLock
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, TrialState

from bench import faults, leaderboard, signals
from bench.backends._base import Backend, RunResult, register_backend
from bench.errors import BenchError, ConfigError, StorageFailure, storage_failure
from bench.lifecycle import (
    RESUME_FILE,
    Outcome,
    RowWriter,
    build_row,
    config_failure,
    execute_trial,
    now,
    write_row,
)
from bench.plan import (
    Plan,
    config_change,
    describe_storage,
    fused_class,
    make_sampler,
    refuse_other_config,
    storage_file,
    study_in_journal,
    study_in_sqlite,
)
from bench.space import Param
from bench.train import placement, resolve_device
from bench.trial import TrialContext

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
ATTR = "bench"  # the trial's identity: uid, seed, overrides (set when it starts)
RESULT = "bench_result"  # its outcome: state, objective, error (set before it is told)
METRIC = "metric_"  # one user attribute per final metric, as optuna-dashboard shows them
STUDY_UID = "bench_study_uid"
STUDY_SET = "bench_study_config"  # the values every trial of the study shares


# ---------------------------------------------------------------- storage
class FlockLock(BaseJournalFileLock):
    """An `fcntl.flock` lock beside the journal: the kernel releases it when its holder
    dies, so a killed writer never leaves a lock behind (Optuna's symlink lock can)."""

    def __init__(self, path: str):
        self.path = path + ".flock"
        self.fh: Any = None

    def acquire(self) -> bool:
        self.fh = open(self.path, "a")  # noqa: SIM115 - held until release()
        fcntl.flock(self.fh, fcntl.LOCK_EX)
        return True

    def release(self) -> None:
        if self.fh is not None:
            fcntl.flock(self.fh, fcntl.LOCK_UN)
            self.fh.close()
            self.fh = None


class Journal(JournalFileBackend):
    """A journal file whose last record, if torn by a full disk or a killed writer, is
    dropped before the next append, and whose damage is reported with the file's name."""

    def __init__(self, path: str):
        super().__init__(path, lock_obj=FlockLock(path))
        self.path = path

    def append_logs(self, logs: list[dict[str, Any]]) -> None:
        with _held(self._lock):
            size = _drop_torn_tail(self.path)
            data = ("\n".join(json.dumps(x, separators=(",", ":")) for x in logs) + "\n")
            try:
                with open(self.path, "ab") as fh:  # no fsync, as Optuna's own journal:
                    fh.write(data.encode())  # a killed process loses nothing (the page
                    fh.flush()  # cache outlives it); an fsync per record was 7 of the 10 ms
                    # bench added per trial (benchmarks/RESULTS.md, harness overhead)
            except OSError as exc:
                with contextlib.suppress(OSError):
                    os.truncate(self.path, size)  # leave no torn record behind
                raise OSError(exc.errno, exc.strerror, str(self.path)) from exc

    def read_logs(self, log_number_from: int) -> Generator[dict[str, Any], None, None]:
        try:
            yield from super().read_logs(log_number_from)
        except ValueError as exc:  # JSONDecodeError included
            raise BenchError(
                f"{self.path}: the study journal is damaged ({exc}); a record was torn by a "
                "full disk or a killed writer and later records were appended to it. Keep a "
                "copy, then remove the damaged line (the error names its position) to "
                "recover the studies in it") from None


@contextmanager
def _held(lock: BaseJournalFileLock) -> Iterator[None]:
    lock.acquire()
    try:
        yield
    finally:
        lock.release()


def _drop_torn_tail(path: str) -> int:
    """Truncate an incomplete last line (a write that never completed); the file's size."""
    size = os.path.getsize(path)
    if size == 0:
        return 0
    with open(path, "rb") as fh:
        fh.seek(max(0, size - 1))
        if fh.read(1) == b"\n":
            return size
        fh.seek(max(0, size - 65536))
        tail = fh.read()
    cut = tail.rfind(b"\n")
    keep = size - len(tail) + cut + 1 if cut >= 0 else (0 if size <= 65536 else size)
    os.truncate(path, keep)
    print(f"warning: {path}: dropped an incomplete last record ({size - keep} bytes) left by "
          "a writer that was killed or ran out of disk", file=sys.stderr)
    return keep


def open_storage(url: str) -> optuna.storages.BaseStorage:
    try:
        if url.startswith("journal:"):
            path = Path(url.removeprefix("journal:"))
            path.parent.mkdir(parents=True, exist_ok=True)
            return optuna.storages.JournalStorage(Journal(str(path)))
        if url.startswith("sqlite:///"):
            Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
            return optuna.storages.RDBStorage(url,
                                              engine_kwargs={"connect_args": {"timeout": 60}})
        # A server database: heartbeats let a crashed worker's trial be failed and retried
        # (Optuna marks heartbeat_interval experimental: said once per run, not to users).
        warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning,
                                message=".*heartbeat")
        return optuna.storages.RDBStorage(
            url, heartbeat_interval=10, grace_period=30,
            heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(
                max_retry=2))
    except ModuleNotFoundError as exc:
        raise BenchError(f"storage {describe_storage(url)} needs {exc.name}, which is not "
                         "installed: pip install -e '.[postgres]'") from None
    except PermissionError as exc:
        raise BenchError(f"cannot open the study storage {describe_storage(url)}: "
                         f"{exc.strerror} ({exc.filename})") from None
    except Exception as exc:  # sqlalchemy's OperationalError, DatabaseError
        if "sqlalchemy" in type(exc).__module__:
            raise BenchError(f"cannot open the study storage {describe_storage(url)}: "
                             f"{str(exc).splitlines()[0]}") from None
        raise


def study_exists(plan: Plan, storage: Any = None) -> bool:
    """Whether the plan's storage holds its study, asked without creating either (a file
    storage is read directly; a server database is asked by name, through `storage` when
    it is open already)."""
    path = storage_file(plan.storage_url)
    if path is not None:
        return (study_in_journal(path, plan.study_name)
                if plan.storage_url.startswith("journal:")
                else study_in_sqlite(path, plan.study_name))
    try:
        (storage or open_storage(plan.storage_url)).get_study_id_from_name(plan.study_name)
        return True
    except KeyError:
        return False


def open_study(plan: Plan, worker: int = 0) -> optuna.Study:
    """Open (or create) the plan's study; check its direction and its identity."""
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    _refuse_a_lost_study(plan)
    storage = open_storage(plan.storage_url)
    if storage_file(plan.storage_url) is None:
        _refuse_a_lost_study(plan, storage)
    retry = getattr(storage, "heartbeat_stale_trial_callback", None)
    if retry is not None:  # a heartbeat-failed trial gets its FAIL row, then is retried
        storage.heartbeat_stale_trial_callback = _RowThenRetry(plan, retry)  # type: ignore
    study = optuna.create_study(
        storage=storage, sampler=_sampler(plan, worker, 0), pruner=make_pruner(plan.pruner),
        study_name=plan.study_name, direction=StudyDirection[plan.direction.upper()],
        load_if_exists=True)
    if study.direction.name.lower() != plan.direction:
        raise ConfigError(
            f"study {plan.study_name!r} in {describe_storage(plan.storage_url)} was created to "
            f"{study.direction.name.lower()} but this run would {plan.direction}; use "
            "--study NEW")
    check_identity(plan, study)
    check_overrides(plan, study)
    n_existing = len(study.get_trials(deepcopy=False))
    _refuse_lost_trials(plan, study, n_existing)
    if n_existing:  # workers must not propose the same points, nor a rerun replay its first
        study.sampler = _sampler(plan, worker, n_existing)
    return study


def _refuse_lost_trials(plan: Plan, study: optuna.Study, n_existing: int) -> None:
    """A row of the trial this storage would number next means the storage has lost
    trials (restored from an older copy, or a journal cut short): new trials would take
    those numbers, and so the rows and artifacts of the trials that were lost. Refused."""
    uid = derived_uid(study, n_existing)
    if leaderboard.trial_exists(plan.out, plan.task.name, uid):
        raise ConfigError(
            f"study {plan.study_name!r} in {describe_storage(plan.storage_url)} holds "
            f"{n_existing} trials, but the leaderboard {plan.task_dir} has the row of its "
            f"trial {n_existing} ({leaderboard.trial_path(plan.out, plan.task.name, uid)}): "
            "the storage was restored from an older copy or cut short, and new trials would "
            "overwrite the rows of the trials it lost. Restore the newer storage, or run "
            "under another --study")


def _sampler(plan: Plan, worker: int, n_existing: int) -> optuna.samplers.BaseSampler:
    seed = plan.opts.seed + 1000 * worker + 100_003 * n_existing
    concurrent = plan.opts.workers > 1 or "worker_id" in plan.opts.extra
    grid = ({k: p.grid_values() for k, p in plan.searched().items()}
            if plan.opts.sampler == "grid" and not plan.enumerated else None)
    return make_sampler(plan.opts.sampler, seed, concurrent, grid)


def make_pruner(name: str) -> optuna.pruners.BasePruner:
    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=1)
    if name == "asha":
        return optuna.pruners.SuccessiveHalvingPruner()
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1)
    return optuna.pruners.NopPruner()


def _record_path(plan: Plan) -> Path:
    """Where the leaderboard records its study's uid and storage."""
    return plan.task_dir / ".studies" / f"{plan.study_name}.json"


def _recorded(plan: Plan) -> dict[str, Any] | None:
    try:
        known = json.loads(_record_path(plan).read_text())
    except (OSError, ValueError):
        return None
    return known if isinstance(known, dict) else None


def _refuse_a_lost_study(plan: Plan, storage: Any = None) -> None:
    """Before anything is created: a study the leaderboard recorded that this storage does
    not hold (its file deleted, truncated or replaced, or another storage named) is refused,
    and no empty study of that name is created in its place. File storages are read
    without opening them through Optuna (which would create the file); a server database
    is asked once it is open (`storage`)."""
    known = _recorded(plan)
    if known is None:
        return
    if storage_file(plan.storage_url) is None and storage is None:
        return
    holds = study_exists(plan, storage)
    if not holds:
        raise ConfigError(
            f"the leaderboard {plan.task_dir} recorded study {plan.study_name!r} (uid "
            f"{known.get('uid')}) in {known.get('storage')}, but "
            f"{describe_storage(plan.storage_url)} does not hold it: its file was deleted, "
            "truncated or replaced, or --storage names another one. Restore it, point "
            "--storage at the recorded one, or use --study NEW for a new study (the rows of "
            "the old one stay)")


def check_identity(plan: Plan, study: optuna.Study) -> str:
    """A study is its storage's study, not its name: its uid is stored in it and beside the
    leaderboard, and a leaderboard that recorded another study of this name is refused."""
    uid = study.user_attrs.get(STUDY_UID)
    if uid is None:
        uid = uuid.uuid4().hex[:16]
        study.set_user_attr(STUDY_UID, uid)
    record = _record_path(plan)
    known = _recorded(plan)
    if known is not None and known.get("uid") != uid:
        raise ConfigError(
            f"the leaderboard {plan.task_dir} recorded study {plan.study_name!r} with uid "
            f"{known.get('uid')} in {known.get('storage')}, but "
            f"{describe_storage(plan.storage_url)} holds a different study of that name (uid "
            f"{uid}): its storage was replaced, truncated or is another one. Use --storage to "
            f"point at the recorded one, or --study NEW for a new study")
    if known is None:
        record.parent.mkdir(parents=True, exist_ok=True)
        tmp = record.with_name(f".{record.name}.tmp")
        tmp.write_text(json.dumps({"uid": uid, "storage": describe_storage(plan.storage_url)}))
        tmp.replace(record)
    return uid


def check_overrides(plan: Plan, study: optuna.Study) -> None:
    """A study is one configuration: the values its trials share (`Plan.fixed_config`: the
    task's defaults, the space's and variant's fixed values, `--set`, `--smoke`) are stored
    in it when it is created, and a run with other values is refused: its trials would be
    mixed with the study's under one name, and TPE would model them as one objective.
    Execution parameters (evaluation batch sizes, a simulated step time) may change. A
    study from before this record takes it from its latest trial's `--set` values."""
    mine = plan.canonical_config()
    stored = study.user_attrs.get(STUDY_SET)
    if stored is None:
        earlier = [_info(t) for t in study.get_trials(deepcopy=False)]
        earlier = [i for i in earlier if isinstance(i.get("overrides"), dict)]
        stored = plan.canonical_config(earlier[-1]["overrides"]) if earlier else mine
        study.set_user_attr(STUDY_SET, stored)
    change = config_change(stored, mine, plan)
    if change is not None:
        raise refuse_other_config(plan.study_name, describe_storage(plan.storage_url), change)


try:  # what study.optimize calls; Study.tell adds a re-read of the trial to return a copy
    from optuna.study._tell import _tell_with_warning
except ImportError:  # pragma: no cover - another Optuna layout: the public call
    _tell_with_warning = None  # type: ignore[assignment]


def _tell(study: optuna.Study, trial: optuna.Trial, value: float | None,
          state: TrialState) -> None:
    """`study.tell` without its read-back of the finished trial (one storage read, 2 ms per
    trial on SQLite), as `study.optimize` tells its trials."""
    if _tell_with_warning is None:
        study.tell(trial, value, state=state)
        return
    _tell_with_warning(study=study, trial=trial, value_or_values=value, state=state,
                       suppress_warning=True)


class _RowThenRetry:
    """Optuna's failed-trial callback (heartbeat expired), writing the FAIL row first."""

    def __init__(self, plan: Plan, retry: Any):
        self.plan, self.retry = plan, retry

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        _record_row(self.plan, study, trial, "FAIL", error="worker stopped sending heartbeats "
                    "(killed?); marked FAIL by another worker")
        self.retry(study, trial)


class StudyLock:
    """Every run holds the study's lock file shared; `sole` is True when this run got it
    exclusively at start, i.e. no other run on this storage was using the study. Call
    `share()` once stale trials are dealt with, so that other runs may join."""

    def __init__(self, fh: Any, sole: bool):
        self.fh, self.sole = fh, sole

    def share(self) -> None:
        if self.sole:
            fcntl.flock(self.fh, fcntl.LOCK_SH)


def _open_lock_file(path: Path) -> Any:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        return open(path, "a")  # noqa: SIM115
    except OSError as exc:
        raise BenchError(f"cannot create the study's lock file {path}: {exc.strerror}") from None


def _try_flock(fh: Any) -> bool:
    """An exclusive flock if free now; False (holding nothing) if another run has it."""
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


@contextmanager
def study_lock(plan: Plan) -> Iterator[StudyLock]:
    with _open_lock_file(plan.lock_path()) as fh:
        sole = _try_flock(fh)
        if not sole:
            fcntl.flock(fh, fcntl.LOCK_SH)  # waits only while a starting run repairs the study
        try:
            yield StudyLock(fh, sole)
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


# ---------------------------------------------------------------- rows from the study's record
def set_user_attrs(trial: optuna.Trial, attrs: dict[str, Any]) -> None:
    """Several user attributes of a trial in one storage write (one SQL transaction, one
    journal append of single-key records that any Optuna reader replays), where Optuna
    writes each on its own: a commit (SQLite: an fsync) per attribute made the per-trial
    metrics most of the harness's overhead (benchmarks/harness_overhead.py)."""
    from optuna.storages import JournalStorage, RDBStorage
    from optuna.storages._cached_storage import _CachedStorage
    from optuna.storages.journal._storage import JournalOperation

    storage = trial.storage
    base = storage._backend if isinstance(storage, _CachedStorage) else storage
    tid = trial._trial_id
    if isinstance(base, RDBStorage):
        from optuna.storages._rdb import models  # SQLAlchemy: only for an SQL storage
        from optuna.storages._rdb.storage import _create_scoped_session

        with _create_scoped_session(base.scoped_session, True) as session:
            _upsert_user_attrs(base, session, models, tid, attrs)
    elif isinstance(base, JournalStorage):
        with base._thread_lock:
            worker = base._replay_result.worker_id
            base._backend.append_logs([
                {"op_code": JournalOperation.SET_TRIAL_USER_ATTR, "worker_id": worker,
                 "trial_id": tid, "user_attr": {key: value}} for key, value in attrs.items()])
            base._sync_with_backend()
    else:
        for key, value in attrs.items():
            storage.set_trial_user_attr(tid, key, value)
    trial._cached_frozen_trial.user_attrs.update(attrs)


def _upsert_user_attrs(base: Any, session: Any, models: Any, tid: int,
                       attrs: Mapping[str, Any]) -> None:
    """Optuna's `_set_trial_attr_without_commit` for several keys at once: the trial's
    state checked once and one multi-row upsert (SQLite, PostgreSQL), where Optuna checks
    the trial and upserts per key (two queries per attribute: ~7 ms a trial on SQLite)."""
    trial = models.TrialModel.find_or_raise_by_id(tid, session)
    base.check_trial_is_updatable(tid, trial.state)
    cls = models.TrialUserAttributeModel
    dialect = base.engine.name
    if dialect == "sqlite" and sqlite3.sqlite_version_info < (3, 24, 0):
        dialect = "old sqlite"  # no upsert before SQLite 3.24
    if dialect in ("sqlite", "postgresql"):
        from sqlalchemy.dialects import postgresql, sqlite

        insert: Any = sqlite.insert if dialect == "sqlite" else postgresql.insert
        stmt = insert(cls).values([{"trial_id": tid, "key": k, "value_json": json.dumps(v)}
                                   for k, v in attrs.items()])
        session.execute(stmt.on_conflict_do_update(
            index_elements=[cls.trial_id, cls.key],
            set_={"value_json": stmt.excluded.value_json}))
        return
    for key, value in attrs.items():  # MySQL and others: Optuna's own, key by key
        base._set_trial_attr_without_commit(session, cls, tid, key, value)


def count_trials(study: optuna.Study, states: tuple[TrialState, ...]) -> int:
    """How many of the study's trials are in `states`: one COUNT query on an SQL storage
    (reading the trials, as `study.get_trials` does, took ~5 ms a trial on SQLite)."""
    from optuna.storages import RDBStorage
    from optuna.storages._cached_storage import _CachedStorage

    storage = study._storage
    base = storage._backend if isinstance(storage, _CachedStorage) else storage
    if not isinstance(base, RDBStorage):
        return len(study.get_trials(deepcopy=False, states=states))
    import sqlalchemy
    from optuna.storages._rdb import models
    from optuna.storages._rdb.storage import _create_scoped_session

    with _create_scoped_session(base.scoped_session) as session:
        return int(session.query(sqlalchemy.func.count(models.TrialModel.trial_id))
                   .filter(models.TrialModel.study_id == study._study_id,
                           models.TrialModel.state.in_(states)).scalar())


_CLAIM_NAMESPACE = zlib.crc32(b"bench: claim a trial") & 0x7FFFFFFF  # advisory-lock key
CLAIM_POLL_S = 0.1  # a run waiting for the claim lock tries again this often (and stops)
CLAIM_WARN_S = 30.0  # ... and says so once after this long
# PostgreSQL probes a lock holder's connection after 10 s of silence, every 5 s, 3 times:
# a holder whose host died or lost the network releases the lock within ~25 s (a stopped
# process, whose host still answers, keeps it, as it keeps an flock)
CLAIM_KEEPALIVE = {"tcp_keepalives_idle": 10, "tcp_keepalives_interval": 5,
                   "tcp_keepalives_count": 3}


def _poll(try_lock: Callable[[], bool], what: str) -> bool:
    """Take a lock by trying it every CLAIM_POLL_S: False if a stop is asked first (Ctrl-C,
    SIGTERM, Slurm's USR2), so that a run waiting on a hung holder still stops."""
    start, warned = time.monotonic(), False
    while not try_lock():
        if signals.stop_requested():
            return False
        if not warned and time.monotonic() - start > CLAIM_WARN_S:
            print(f"waiting for {what}: another run has held it for {CLAIM_WARN_S:.0f} s "
                  "(stopped or hung?)", file=sys.stderr)
            warned = True
        time.sleep(CLAIM_POLL_S)
    return True


@contextmanager
def claim_lock(plan: Plan, study: optuna.Study) -> Iterator[bool]:
    """Held while a run counts the study's trials and asks for one more, so that the runs
    sharing a study (worker processes, other runs, other hosts) together reach its total
    exactly: counting and asking are two storage calls, and two runs that each saw one
    trial left both asked (four workers on PostgreSQL, under load). Yields False, holding
    nothing, if a stop was asked while waiting. PostgreSQL: a transaction-scoped advisory
    lock on the study (the server drops it with a killed run's connection, or a dead host's:
    CLAIM_KEEPALIVE); a file storage: an flock beside the file (the kernel drops it);
    another server database: an flock beside the study's folder, which serialises the runs
    of this host only. No lock here expires while its holder lives: a lease that did could
    let a stopped holder (Ctrl-Z) wake up and ask past the total."""
    from optuna.storages import RDBStorage
    from optuna.storages._cached_storage import _CachedStorage

    storage = study._storage
    base = storage._backend if isinstance(storage, _CachedStorage) else storage
    if isinstance(base, RDBStorage) and base.engine.dialect.name == "postgresql":
        import sqlalchemy

        conn = base.engine.connect()
        try:
            conn.begin()
            for name, value in CLAIM_KEEPALIVE.items():  # this transaction only
                conn.execute(sqlalchemy.text(f"SET LOCAL {name} = {int(value)}"))
            key = {"ns": _CLAIM_NAMESPACE, "study": study._study_id}
            try_lock = sqlalchemy.text("SELECT pg_try_advisory_xact_lock(:ns, :study)")
            yield _poll(lambda: bool(conn.execute(try_lock, key).scalar()),
                        f"the study's claim lock in {describe_storage(plan.storage_url)}")
        finally:  # the lock ends with the transaction; a failed release (the connection
            # lost) has released it too, and must not fail a trial the run has asked for
            with contextlib.suppress(Exception):
                conn.rollback()
            with contextlib.suppress(Exception):
                conn.close()
        return
    path = plan.lock_path().with_suffix(".claim")
    with _open_lock_file(path) as fh:
        got = _poll(lambda: _try_flock(fh), f"the study's claim lock {path}")
        try:
            yield got
        finally:
            if got:
                fcntl.flock(fh, fcntl.LOCK_UN)


def _info(t: FrozenTrial | optuna.Trial) -> dict[str, Any]:
    """The trial's own identity record (uid, seed, number, overrides), or {}: a retry
    (RetryFailedTrialCallback) copies its failed trial's attributes, whose record names
    the failed trial's number and is not the retry's."""
    info = t.user_attrs.get(ATTR)
    return info if isinstance(info, dict) and info.get("number", t.number) == t.number else {}


def identity(plan: Plan, number: int, uid: str, seed: int, study_uid: str) -> dict[str, Any]:
    return {"task": plan.task.name, "study": plan.study_name, "study_uid": study_uid,
            "variant": plan.variant_name, "trial_uid": uid, "trial_number": number,
            "backend": "optuna", "sampler": plan.opts.sampler, "pruner": plan.pruner,
            "seed": seed}


def _uid(study: optuna.Study, t: FrozenTrial | optuna.Trial) -> str:
    """The trial's row id: the one its identity record names (trials of earlier versions
    drew a random one), else derived from the study's uid and the trial number, so the
    trial, its repair and its resume all find the same row and artifact folder without a
    storage write at the trial's start."""
    uid = _info(t).get("uid")
    if uid:
        return str(uid)
    return derived_uid(study, t.number)


def derived_uid(study: optuna.Study, number: int) -> str:
    """The row id of trial `number` of `study` (from the study's uid and the number)."""
    seed = f"{study.user_attrs.get(STUDY_UID, study.study_name)}:{number}"
    return hashlib.sha256(seed.encode()).hexdigest()[:16]


def _record_row(plan: Plan, study: optuna.Study, t: FrozenTrial, state: str,
                error: str | None = None) -> str | None:
    """A row built from the study's record of a trial (its params, result attributes)."""
    info = _info(t)
    uid = _uid(study, t)
    if leaderboard.trial_exists(plan.out, plan.task.name, uid):
        return None
    result = t.user_attrs.get(RESULT) or {}
    params = plan.params(dict(t.params))
    started = (t.datetime_start.astimezone(dt.timezone.utc) if t.datetime_start else now())
    finished = (t.datetime_complete.astimezone(dt.timezone.utc) if t.datetime_complete
                else now())
    value = t.value if state == "COMPLETE" else result.get("objective")
    row = build_row(identity(plan, t.number, uid, int(info.get("seed", _seed(plan, t))),
                             study.user_attrs.get(STUDY_UID, "")),
                    params, state=state, objective=value, metric=plan.metric,
                    direction=plan.direction, metrics=_metrics(t),
                    error=error or result.get("error"), started_at=started,
                    finished_at=finished, epochs_done=max(t.intermediate_values, default=-1) + 1,
                    device=resolve_device(plan.opts.device))
    return write_row(plan.out, plan.task, row)


def _seed(plan: Plan, t: FrozenTrial | optuna.Trial) -> int:
    """A trial's seed where its identity record does not name it: an enumerated point's
    (stored when it was enqueued), else the run's base seed plus the trial number."""
    if "seed" in t.user_attrs:
        return int(t.user_attrs["seed"])
    return plan.opts.seed + t.number


def _metrics(t: FrozenTrial) -> dict[str, float]:
    return {k.removeprefix(METRIC): float(v) for k, v in t.user_attrs.items()
            if k.startswith(METRIC) and isinstance(v, (int, float))}


def adopt_stale_results(plan: Plan, study: optuna.Study) -> list[int]:
    """Heartbeat storages: a stale RUNNING trial whose result is known (its row was written,
    or its result attribute set, and the run died before it told the study) is told that
    result, before Optuna's stale-trial pass would mark it FAIL and retry a finished point."""
    storage = study._storage
    stale = getattr(storage, "_get_stale_trial_ids", None)
    if stale is None:
        return []
    adopted = []
    for trial_id in stale(study._study_id):
        t = storage.get_trial(trial_id)
        row = leaderboard.read_trial(plan.out, plan.task.name, _uid(study, t))
        known = row or t.user_attrs.get(RESULT)
        if not isinstance(known, dict) or known.get("state") not in ("COMPLETE", "PRUNED",
                                                                     "FAIL"):
            continue
        value = known.get("objective")
        try:
            storage.set_trial_state_values(
                trial_id, TrialState[known["state"]],
                [value] if known["state"] == "COMPLETE" and value is not None else None)
        except optuna.exceptions.UpdateFinishedTrialError:
            continue  # another process adopted or failed it first
        if row is None:
            _record_row(plan, study, storage.get_trial(trial_id), known["state"])
        adopted.append(t.number)
    return adopted


def repair(plan: Plan, study: optuna.Study, slot: str | None = None) -> dict[str, list[int]]:
    """What killed runs left (call with the study's lock held alone, or as a slot for its
    own trials): resume, repair, or fail RUNNING trials; write missing rows."""
    done: dict[str, list[int]] = {"resumable": [], "failed": [], "repaired": []}
    storage = study._storage
    faults.pause("repair")
    for t in study.get_trials(deepcopy=False):
        owner = t.user_attrs.get("worker_id")
        if owner is not None and owner != slot:
            continue  # another slot's trial: its slot resumes it
        if slot is not None and owner is None:
            continue
        if t.state == TrialState.RUNNING:
            uid = _uid(study, t)
            result = t.user_attrs.get(RESULT)
            row = leaderboard.read_trial(plan.out, plan.task.name, uid)
            known = row or result
            if isinstance(known, dict):  # finished, but the study was not told
                state = known["state"]
                value = known.get("objective")
                storage.set_trial_state_values(
                    t._trial_id, TrialState[state],
                    [value] if state == "COMPLETE" and value is not None else None)
                if row is None:
                    _record_row(plan, study, storage.get_trial(t._trial_id), state)
                done["repaired"].append(t.number)
            elif (plan.artifact_dir(uid) / RESUME_FILE).exists() or t.user_attrs.get(
                    "suspended"):
                done["resumable"].append(t.number)
            else:  # the row first, then the state: a kill between the two loses nothing
                _record_row(plan, study, t, "FAIL",
                            "the run died while the trial was RUNNING (killed?), before it saved "
                            "a state to resume from; marked FAIL by the next run")
                storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
                done["failed"].append(t.number)
        elif t.state in FINISHED and not leaderboard.trial_exists(
                plan.out, plan.task.name, _uid(study, t)):
            if _record_row(plan, study, t, t.state.name) is None:
                done["repaired"].append(t.number)
    return done


def heartbeat_repair(plan: Plan, study: optuna.Study) -> dict[str, list[int]]:
    """`repair` for heartbeat storages, where other hosts may be live: only what a dead
    run left. A stale RUNNING trial (no heartbeat for the grace period) is told its known
    result, or failed (its FAIL row written) and retried, as Optuna's stale-trial pass
    does; a finished trial without a row (a run killed with rows still queued) gets one
    from the study's record once it has been finished for the grace period (a live run
    writes its rows within a second or two of the result)."""
    done: dict[str, list[int]] = {"resumable": [], "failed": [], "repaired": [], "stale": []}
    storage = study._storage
    assert isinstance(storage, BaseHeartbeat)
    done["repaired"] += adopt_stale_results(plan, study)
    stale = set(storage._get_stale_trial_ids(study._study_id))  # one query, not one a trial
    optuna.storages.fail_stale_trials(study)  # FAIL row, then Optuna's retry (_RowThenRetry)
    done["stale"] += [t.number for t in study.get_trials(deepcopy=False,
                                                         states=(TrialState.FAIL,))
                      if t._trial_id in stale]
    base = getattr(storage, "_backend", storage)  # the RDBStorage under Optuna's cache
    grace = float(getattr(base, "grace_period", None) or 30)
    cutoff = dt.datetime.now() - dt.timedelta(seconds=grace)
    for t in study.get_trials(deepcopy=False, states=FINISHED):
        if (t.datetime_complete is not None and t.datetime_complete < cutoff
                and not leaderboard.trial_exists(plan.out, plan.task.name, _uid(study, t))
                and _record_row(plan, study, t, t.state.name) is None):
            done["repaired"].append(t.number)
    return done


# ---------------------------------------------------------------- enumerated variants
def point_key(point: dict[str, Any], plan: Plan) -> str:
    """A grid point's identity in the study. A parameter added later (`Decl.since`) at its
    default is left out: a grid that gains it as an axis keeps its earlier points."""
    kept = {k: v for k, v in point.items() if not plan.task.at_added_default(k, v)}
    return json.dumps(kept, sort_keys=True, default=str)


def enqueue_missing(plan: Plan, study: optuna.Study, limit: int | None = None) -> int:
    """Enqueue every (point, seed) pair of an enumerated variant that the study lacks,
    seed-major (a partial run covers every point once before repeating any); at most up to
    `limit` trials in the study in all."""
    assert plan.variant is not None
    trials = study.get_trials(deepcopy=False)
    taken = {(t.user_attrs.get("bench_point"), t.user_attrs.get("seed_index"))
             for t in trials if t.state != TrialState.FAIL}
    room = None if limit is None else max(0, limit - len(
        [t for t in trials if t.state != TrialState.FAIL]))
    added = 0
    for s in range(plan.variant.seeds):
        for point in plan.variant.points():
            if (point_key(point, plan), s) in taken:
                continue
            if room is not None and added >= room:
                return added
            study.enqueue_trial(point, user_attrs={"bench_point": point_key(point, plan),
                                                   "seed_index": s, "seed": plan.opts.seed + s})
            added += 1
    return added


def _pop_waiting(study: optuna.Study) -> optuna.Trial | None:
    """An enqueued trial, taken atomically (as Study.ask does), or None when none is left."""
    storage = study._storage
    for t in study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
        try:
            if storage.set_trial_state_values(t._trial_id, TrialState.RUNNING):
                return optuna.Trial(study, t._trial_id)
        except optuna.exceptions.UpdateFinishedTrialError:
            continue
    return None


# ---------------------------------------------------------------- one trial
def suggest(trial: optuna.Trial, p: Param) -> Any:
    if p.type == "categorical":
        return trial.suggest_categorical(p.name, list(p.choices))
    if p.type == "int":
        return trial.suggest_int(p.name, int(p.low), int(p.high), step=int(p.step or 1), log=p.log)
    return trial.suggest_float(p.name, p.low, p.high, step=p.step, log=p.log)


@dataclass
class Worker:
    """Runs trials of one study in this process; counts what it did."""

    plan: Plan
    study: optuna.Study
    progress: Any = None
    slot: str | None = None
    ran: Counter = field(default_factory=Counter)
    row_errors: list[str] = field(default_factory=list)
    target: int | None = None  # the study's total: stop asking once it has that many
    rows: RowWriter = field(default_factory=RowWriter)  # rows written while the next trial runs
    identity_due: dict[int, dict[str, Any]] = field(default_factory=dict)  # number -> record

    def __post_init__(self) -> None:
        self.device = resolve_device(self.plan.opts.device)
        self.study_uid = self.study.user_attrs.get(STUDY_UID, "")
        self.evaluate = self.plan.evaluates_every_trial()
        # As in study.optimize: a sampler may call study.stop() (GridSampler, when its grid
        # is exhausted), which Optuna allows only inside an optimisation loop.
        self.study._thread_local.in_optimize_loop = True

    def params_for(self, trial: optuna.Trial) -> tuple[dict[str, Any], int]:
        plan = self.plan
        if "bench_point" in trial.user_attrs:
            assert plan.variant is not None
            frozen = trial._cached_frozen_trial
            known = {**(frozen.system_attrs.get("fixed_params") or {}), **frozen.params}
            point = {}
            for k, vals in plan.variant.grid.items():
                decl = plan.task.params.get(k)
                if k in plan.overrides:
                    continue
                if k not in known and decl is not None and decl.since is not None:
                    point[k] = decl.default  # a point enqueued before the grid had this axis
                else:
                    point[k] = trial.suggest_categorical(k, vals)
        else:
            point = {k: suggest(trial, p) for k, p in plan.searched().items()}
        return plan.params(point), int(_info(trial).get("seed", _seed(plan, trial)))

    def run_one(self, trial: optuna.Trial) -> str:
        """Run (or resume) one trial and tell the study; its state, or SUSPENDED."""
        with get_heartbeat_thread(trial._trial_id, self.study._storage):
            outcome = self._execute(trial)
        return self.record(trial, outcome)

    def record(self, trial: optuna.Trial, outcome: Outcome) -> str:
        """Tell the study how a trial ended (its metrics as user attributes first)."""
        if outcome.state == "SUSPENDED":
            set_user_attrs(trial, {**self._identity_due(trial), "suspended": True})
            if is_heartbeat_enabled(self.study._storage):
                # a heartbeat storage runs no repair pass (other hosts may be live): the
                # trial goes back to WAITING, the next ask() anywhere claims it atomically
                # and resumes it from its saved state (same number, uid and parameters)
                self.study._storage.set_trial_state_values(trial._trial_id, TrialState.WAITING)
            self.ran["SUSPENDED"] += 1  # this run's: the Ctrl-C message says it was saved
            if self.progress:
                self.progress.end_trial(trial.number, outcome, worker=trial.number)
            return "SUSPENDED"
        attrs: dict[str, Any] = self._identity_due(trial)
        attrs.update({f"{METRIC}{k}": v for k, v in outcome.metrics.items()})
        attrs[RESULT] = {"state": outcome.state, "objective": outcome.objective,
                         "error": outcome.error}  # last: repair reads it as "finished"
        if trial.user_attrs.get("suspended"):
            attrs["suspended"] = False
        set_user_attrs(trial, attrs)  # what optuna-dashboard shows, in one storage write
        if outcome.row_error:
            self.row_errors.append(f"trial {trial.number}: could not write its row: "
                                   f"{outcome.row_error}")
        state = TrialState[outcome.state]
        faults.pause("tell")
        _tell(self.study, trial, outcome.objective if state == TrialState.COMPLETE else None,
              state)
        self.ran[outcome.state] += 1
        if self.progress:
            self.progress.end_trial(trial.number, outcome, worker=trial.number)
        return outcome.state

    def _identity_due(self, trial: optuna.Trial) -> dict[str, Any]:
        """The trial's identity record as attributes to write, if not written yet."""
        info = self.identity_due.pop(trial.number, None)
        return {ATTR: info} if info is not None else {}

    def _write_identity(self, trial: optuna.Trial) -> None:
        """Before the trial's first resume state is saved: the state then names its trial."""
        due = self._identity_due(trial)
        if due:
            set_user_attrs(trial, due)

    def prepare(self, trial: optuna.Trial,
                ) -> tuple[dict[str, Any], TrialContext, dict[str, Any], list[str]]:
        """(params, context, row identity, rule problems) of a trial about to run. Its
        identity record goes to the study with its first saved state (`ctx.before_save`)
        or with its result, not in a storage write of its own."""
        plan = self.plan
        faults.pause("trial-start")
        params, seed = self.params_for(trial)
        uid = _uid(self.study, trial)
        if not _info(trial):  # a new trial: its identity is written with its first state
            # (`_identity_due`), not in a storage write of its own (benchmarks/harness_overhead)
            self.identity_due[trial.number] = {
                "uid": uid, "seed": seed, "number": trial.number,
                "overrides": {k: v for k, v in plan.overrides.items()}}
        number = trial.number
        on_step = ((lambda s, v: self.progress.on_step(s, v, worker=number))
                   if self.progress else None)
        ctx = TrialContext(seed, self.device, plan.artifact_dir(uid), plan.metric,
                           plan.opts.data_dir, on_report=lambda s, v: trial.report(v, s),
                           prune_check=trial.should_prune, on_step=on_step,
                           checkpoint_every_s=plan.opts.checkpoint_every_s,
                           before_save=lambda: self._write_identity(trial))
        ident = identity(plan, trial.number, uid, seed, self.study_uid)
        if self.progress:
            self.progress.start_trial(trial.number, plan.task.trained_epochs(params),
                                      worker=number)
        ctx.artifact_dir.mkdir(parents=True, exist_ok=True)
        return params, ctx, ident, plan.point_problems(params)

    def _execute(self, trial: optuna.Trial) -> Outcome:
        params, ctx, ident, bad = self.prepare(trial)
        if bad:  # a sampled combination that breaks a cross-parameter rule
            return config_failure(self.plan.task, self.plan.out, self.plan.metric,
                                  self.plan.direction, ident, params, bad, ctx.device)
        return execute_trial(self.plan.task, params, ctx, ident, self.plan.out,
                             self.plan.direction, evaluate=self.evaluate, rows=self.rows)

    def work(self, resume: list[int], n_new: int, deadline: float | None) -> int:
        """Resume `resume` (trial numbers), then run up to `n_new` new trials. Exit code."""
        try:
            code = self._work(resume, n_new, deadline)
        finally:
            self.row_errors += self.rows.flush()  # every queued row is on disk, or said not
        if code == 0 and signals.stop_requested():  # a signal while the last rows were
            code = signals.exit_code()  # written: the status says so, as anywhere else
        return 1 if self.row_errors and code == 0 else code

    def _rows_lost(self) -> bool:
        self.row_errors += self.rows.errors()
        return bool(self.row_errors)

    def _work(self, resume: list[int], n_new: int, deadline: float | None) -> int:
        if self.plan.opts.fuse is not None:
            from bench.backends.optuna_fused import FusedRunner, auto_k

            fuse = self.plan.opts.fuse
            k = auto_k(self.plan, fused_class(self.plan), self.device) if fuse == "auto" \
                else int(fuse)
            return FusedRunner(self, k, resume, n_new, deadline).run()
        for number in resume:
            if self._should_stop(deadline):
                break
            trial_id = self.study._storage.get_trial_id_from_study_id_trial_number(
                self.study._study_id, number)
            if self.run_one(optuna.Trial(self.study, trial_id)) == "SUSPENDED":
                return signals.exit_code()
            if self._rows_lost():
                return 1
        for _ in range(n_new):
            if self._should_stop(deadline):
                break
            trial = self._ask()
            if trial is None:
                break
            if self.run_one(trial) == "SUSPENDED":
                return signals.exit_code()
            if self._rows_lost():
                return 1
        return signals.exit_code() if signals.stop_requested() else 0

    def _ask(self) -> optuna.Trial | None:
        """The next trial: a waiting one (enqueued, or suspended on a heartbeat storage)
        first; None when an enumerated variant has none left."""
        storage = self.study._storage
        if is_heartbeat_enabled(storage):  # as study.optimize does, per trial
            assert isinstance(storage, BaseHeartbeat)
            adopt_stale_results(self.plan, self.study)
            optuna.storages.fail_stale_trials(self.study)
            for t in self.study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
                if t.user_attrs.get("suspended"):  # a fresh heartbeat before it can be
                    storage.record_heartbeat(t._trial_id)  # claimed: its old one is
                    # stale, and another host's stale pass would fail it at once
        if self.plan.enumerated:
            trial = _pop_waiting(self.study)
            if trial is not None and self.slot is not None:  # the slot resumes it, and
                trial.set_user_attr("worker_id", self.slot)  # counts it as its own
            return trial
        with self.claiming() as got:  # other runs count and ask too
            return self.claim() if got else None

    @contextmanager
    def claiming(self) -> Iterator[bool]:
        """`claim_lock` when the study has a total to share; a Slurm slot's quota is its
        own (no target), and asks without it."""
        if self.target is None:
            yield True
            return
        with claim_lock(self.plan, self.study) as got:
            yield got

    def claim(self) -> optuna.Trial | None:
        """A new trial if the study is short of its total; None if not. Call it inside
        `claiming()`, which makes the count and the ask one step for every run."""
        if self._target_reached() or signals.stop_requested():
            return None
        faults.pause("ask")
        trial = self.study.ask()
        if self.slot is not None:
            trial.set_user_attr("worker_id", self.slot)
        return trial

    def _target_reached(self) -> bool:
        """Other processes (other hosts, other runs) may be adding trials to the study too."""
        if self.target is None or self.plan.enumerated:
            return False
        return count_trials(self.study, FINISHED + (TrialState.RUNNING,)) >= self.target

    def _should_stop(self, deadline: float | None) -> bool:
        return (signals.stop_requested() or getattr(self.study, "_stop_flag", False)
                or (deadline is not None and time.time() >= deadline))


# ---------------------------------------------------------------- the run
def split(n: int, k: int) -> list[int]:
    """n trials over k workers, exactly: the first n % k workers run one more."""
    return [n // k + (1 if i < n % k else 0) for i in range(k)]


def _counts(study: optuna.Study) -> dict[str, int]:
    c = Counter(t.state.name for t in study.get_trials(deepcopy=False))
    susp = Counter(t.state.name for t in study.get_trials(
        deepcopy=False, states=(TrialState.RUNNING, TrialState.WAITING))
        if t.user_attrs.get("suspended"))  # WAITING on heartbeat storages
    return {"COMPLETE": c["COMPLETE"], "PRUNED": c["PRUNED"], "FAIL": c["FAIL"],
            "RUNNING": c["RUNNING"] - susp["RUNNING"], "SUSPENDED": sum(susp.values()),
            "WAITING": c["WAITING"] - susp["WAITING"]}


def _finished(study: optuna.Study, slot: str | None = None) -> int:
    return sum(1 for t in study.get_trials(deepcopy=False, states=FINISHED)
               if slot is None or t.user_attrs.get("worker_id") == slot)


def slot_index(worker_id: str) -> int:
    """A sampler-seed offset per slot, stable across its restarts."""
    return zlib.crc32(worker_id.encode()) % 100_000


@register_backend
class OptunaBackend(Backend):
    name = "optuna"

    def prepare(self, plan: Plan) -> int:
        study = open_study(plan)
        target = self._target(plan, study)
        if plan.enumerated:
            enqueue_missing(plan, study, target)
        return max(0, target - _finished(study))

    def status(self, plan: Plan) -> str:
        study = open_study(plan)
        counts = _counts(study)
        return (f"study {plan.study_name!r} in {describe_storage(plan.storage_url)}: "
                + ", ".join(f"{v} {k}" for k, v in counts.items()))

    def _target(self, plan: Plan, study: optuna.Study) -> int:
        opts = plan.opts
        if opts.add is not None:
            live = len(study.get_trials(deepcopy=False, states=FINISHED + (TrialState.RUNNING,)))
            return live + opts.add
        default = plan.default_total()
        if opts.trials is None:
            return default
        return min(opts.trials, default) if plan.enumerated else opts.trials

    def run(self, plan: Plan, progress: Callable[..., Any] | None = None) -> RunResult:
        try:
            return self._run(plan, progress)
        except BenchError:
            raise
        except Exception as exc:
            root = storage_failure(exc)
            if root is None:
                raise
            raise StorageFailure(
                f"the study's storage failed: {root} ({describe_storage(plan.storage_url)}). "
                "Finished trials keep their rows; free space or fix the permissions, then "
                "rerun: the next run repairs the study") from exc

    def _run(self, plan: Plan, progress: Callable[..., Any] | None = None) -> RunResult:
        signals.install(quiet=not plan.opts.progress)
        slot = plan.opts.extra.get("worker_id")
        if slot is not None:
            return self._run_slot(plan, str(slot))
        result = RunResult(plan, f"study {plan.study_name!r} in "
                                 f"{describe_storage(plan.storage_url)}")
        if plan.opts.trials == 0 and not study_exists(plan):  # asks for nothing: a study
            result.note("nothing to do: --trials 0 asks for no trial; no study was created")
            result.target = 0  # created here would hold this run's configuration for good
            return result
        leaderboard.clean_stale_tmp(plan.out, plan.task.name)
        with study_lock(plan) as lock:
            study = open_study(plan)
            heartbeat = is_heartbeat_enabled(study._storage)
            if heartbeat:
                fixed = heartbeat_repair(plan, study)
            else:
                fixed = repair(plan, study) if lock.sole else {
                    "resumable": [], "failed": [], "repaired": []}
            lock.share()
            _report_repairs(result, fixed)
            target = result.target = self._target(plan, study)
            if plan.enumerated:
                enqueue_missing(plan, study, target)
            resume = fixed["resumable"]
            if plan.enumerated:  # failed points are enqueued again, up to the target
                n_new = len(study.get_trials(deepcopy=False, states=(TrialState.WAITING,)))
            else:
                n_new = max(0, target - len(study.get_trials(
                    deepcopy=False, states=FINISHED + (TrialState.RUNNING,))))
            if not resume and n_new == 0:
                done = _finished(study)
                result.note(f"nothing to do: the study has {done} finished trials, "
                            + (f"more than the {target} asked for (--trials is the study's "
                               "total, not a number to run)" if done > target else
                               f"of its {target}") + "; `--add N` runs N more")
            deadline = time.time() + plan.opts.timeout_s if plan.opts.timeout_s else None
            bar = progress(plan, len(resume) + n_new, study) if progress and (resume or n_new) \
                else None
            try:
                if plan.opts.workers == 1:
                    worker = Worker(plan, study, bar, target=target)
                    result.exit_code = worker.work(resume, n_new, deadline)
                    result.ran = dict(worker.ran)
                    result.messages += worker.row_errors
                else:
                    result.exit_code = _run_processes(plan, resume, n_new, deadline, bar,
                                                      result)
            finally:
                if bar:
                    bar.close()
            result.counts = _counts(study)
            if deadline is not None and time.time() >= deadline and result.exit_code == 0:
                left = (len(study.get_trials(deepcopy=False, states=(TrialState.WAITING,)))
                        if plan.enumerated else max(0, target - _finished(study)))
                if left:
                    result.note(f"stopped by --timeout {plan.opts.timeout_s:g} s (no new trial "
                                f"starts after it): {left} of the study's {target} trials are "
                                "left; run the same command again to go on")
        _finish(plan, result)
        return result

    def _run_slot(self, plan: Plan, slot: str) -> RunResult:
        """A worker slot: its own RUNNING trials first, then new ones up to its quota."""
        result = RunResult(plan, f"study {plan.study_name!r} in "
                                 f"{describe_storage(plan.storage_url)}")
        study = open_study(plan, slot_index(slot))
        fixed = repair(plan, study, slot)
        _report_repairs(result, fixed)
        resume = [t.number for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
                  if t.user_attrs.get("worker_id") == slot and t.number not in fixed["failed"]]
        quota = plan.opts.trials if plan.opts.trials is not None else plan.default_total()
        n_new = max(0, quota - _finished(study, slot) - len(resume))
        worker = Worker(plan, study, slot=slot)
        result.exit_code = worker.work(resume, n_new, None)
        result.ran, result.messages = dict(worker.ran), result.messages + worker.row_errors
        result.counts = _counts(study)
        return result


def _report_repairs(result: RunResult, fixed: dict[str, list[int]]) -> None:
    if fixed["resumable"]:
        result.note(f"resuming trials {fixed['resumable']} (interrupted) from their saved "
                    "epoch")
    if fixed["failed"]:
        result.note(f"marked FAIL (left RUNNING by a killed run, nothing saved to resume "
                    f"from): trials {fixed['failed']}")
    if fixed["repaired"]:
        result.note(f"repaired the record of trials {fixed['repaired']} (finished, but their "
                    "row or the study's record was missing)")
    if fixed.get("stale"):
        result.note(f"marked FAIL: trials {fixed['stale']} (no heartbeat for the grace period: "
                    "their run was killed); Optuna's retry of each is the next trial asked")


def _finish(plan: Plan, result: RunResult) -> None:
    """The exit status: rows lost or every trial of this run failed -> 1."""
    if result.exit_code != 0:
        return
    if any("could not write its row" in m for m in result.messages):
        result.exit_code = 1
    elif result.ran and result.ran.get("FAIL", 0) == sum(result.ran.values()):
        result.note(f"every trial of this run failed ({result.ran['FAIL']}); their reasons are "
                    f"above and in the `error` column of {plan.task_dir / 'trials'}")
        result.exit_code = 1


# ---------------------------------------------------------------- several processes
def _worker_main(plan: Plan, resume: list[int], n_new: int, index: int,
                 deadline: float | None, queue: Any, target: int | None) -> None:
    os.setpgrp()  # the terminal's Ctrl-C reaches the parent only; it forwards one signal
    signals.install(quiet=True)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})  # see
    signals.die_with_parent()  # _run_processes: one forwarded while starting comes now
    # a worker holds the study's lock shared for its whole life, as its parent does: if the
    # parent is killed and a run starts while this worker finishes its trial, that run sees
    # the study in use and does not repair (fail) the trial from under it
    lock = open(plan.lock_path(), "a")  # noqa: SIM115 (held until the process exits)
    fcntl.flock(lock, fcntl.LOCK_SH)
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    device = placement(plan.opts.device, plan.opts.workers, gpus)[index]
    plan = dataclasses.replace(plan, opts=dataclasses.replace(plan.opts, device=device))
    if resolve_device(device).type == "cpu":  # k workers share the cores, not k x all
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // plan.opts.workers))
    try:
        study = open_study(plan, index)
        worker = Worker(plan, study, progress=_QueueProgress(queue, index), target=target)
        code = worker.work(resume, n_new, deadline)
        for m in worker.row_errors:
            queue.put(("message", index, m))
    except BenchError as exc:
        queue.put(("message", index, f"worker {index}: {exc}"))
        code = exc.exit_code
    sys.exit(code)


class _QueueProgress:
    """A worker's progress events, sent to the parent's display."""

    def __init__(self, queue: Any, index: int):
        self.queue, self.index = queue, index

    def start_trial(self, number: int, epochs: Any, worker: int = 0) -> None:
        self.queue.put(("start", worker, (number, epochs)))

    def on_step(self, step: int, values: dict[str, float], worker: int = 0) -> None:
        self.queue.put(("step", worker, (step, values)))

    def end_trial(self, number: int, outcome: Outcome, worker: int = 0) -> None:
        self.queue.put(("end", worker, (number, outcome.state, outcome.objective,
                                        outcome.error)))


def _run_processes(plan: Plan, resume: list[int], n_new: int, deadline: float | None,
                   bar: Any, result: RunResult) -> int:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    k = plan.opts.workers
    shares = [resume[i::k] for i in range(k)]
    procs = [ctx.Process(target=_worker_main, args=(plan, shares[i], n, i, deadline, queue,
                                                    result.target),
                         name=f"bench-worker-{i}")
             for i, n in enumerate(split(n_new, k)) if n > 0 or shares[i]]
    # Started with SIGINT and SIGTERM blocked (a child inherits the mask): a signal that
    # arrives while a worker is still importing waits, and is taken by its handler once
    # it is installed (_worker_main unblocks them), instead of a traceback and a "crash";
    # the parent's own signal, if one came meanwhile, is delivered when it unblocks here
    stop_signals = {signal.SIGINT, signal.SIGTERM}
    signal.pthread_sigmask(signal.SIG_BLOCK, stop_signals)
    try:
        for p in procs:
            p.start()
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, stop_signals)
    forwarded = 0
    try:
        while any(p.is_alive() for p in procs):
            _drain(queue, bar, result)
            if signals.stop_requested() and forwarded < (2 if signals.hard_stop_requested()
                                                         else 1):
                forwarded += 1  # Ctrl-C reaches the process group; kill -TERM only the parent
                for p in procs:
                    if p.is_alive() and p.pid:
                        os.kill(p.pid, signals.current_signal())
            time.sleep(0.2)
    finally:
        for p in procs:
            p.join()
        _drain(queue, bar, result)
    codes = {p.name: p.exitcode for p in procs}
    crashed = {n: c for n, c in codes.items() if c not in (0, 1, 2, 75, 130, 143)}
    if crashed:
        result.note("worker(s) crashed: " + ", ".join(f"{n} (exit {c})"
                                                       for n, c in crashed.items()))
    if procs and len(crashed) == len(procs):
        return 1
    if signals.stop_requested():
        return signals.exit_code()
    return max((c for c in codes.values() if c in (1, 2)), default=0)


def _drain(queue: Any, bar: Any, result: RunResult) -> None:
    import queue as q

    while True:
        try:
            kind, index, payload = queue.get_nowait()
        except q.Empty:
            return
        if kind == "message":
            result.note(payload)
        elif kind == "end":
            result.ran[payload[1]] = result.ran.get(payload[1], 0) + 1
        if bar is not None:
            bar.event(kind, index, payload)
