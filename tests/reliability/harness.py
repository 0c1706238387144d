"""What the fault-injection suite shares: runs of the real `bench` entry point, the three
storages a study can live in, faults and the moments they land at, and the invariant.

The invariant after the rerun that follows a fault: every finished trial of the study has
exactly one readable row whose state and objective equal the study's; no row belongs to a
trial the study does not have; no trial has two rows; the rerun reaches the study's total
with nothing left RUNNING; the exit statuses say what happened.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import optuna
import pandas as pd
import pytest
from optuna.storages.journal import JournalFileBackend
from optuna.trial import FrozenTrial

from bench import leaderboard

TASK = "synthetic"
PG_URL = os.environ.get("BENCH_TEST_POSTGRES", "postgresql://bench:bench@localhost:5432/bench")
# Trials long enough to be hit mid-epoch (4 epochs of 0.15 s), short enough for a 2-core box.
EPOCHS, SLEEP_S = 4, 0.15
TRIALS = 2  # the faulted trial, and one more that the rerun runs
PAUSE_S = "1"  # how long a process sits at a pause point: the window for the signal
DOUBLE_GAP_S = 0.05  # between the two signals of a double Ctrl-C
RUN_TIMEOUT_S = 120

# fault -> the signals sent, and the exit status of the run that receives them
FAULTS: dict[str, tuple[signal.Signals, ...]] = {
    "SIGINT": (signal.SIGINT,),
    "SIGTERM": (signal.SIGTERM,),
    "SIGKILL": (signal.SIGKILL,),
    "2xSIGINT": (signal.SIGINT, signal.SIGINT),
}
EXIT: dict[str, int] = {"SIGINT": 130, "SIGTERM": 143, "SIGKILL": -signal.SIGKILL,
                        "2xSIGINT": 130}
MOMENTS = ("trial-start", "mid-epoch", "row-write", "repair", "tell")
STORAGES = ("sqlite", "journal", "postgres")


# ---------------------------------------------------------------- storages
@dataclass
class Storage:
    """Where the study lives, the `bench run` flags that say so, and a reader of it."""

    kind: str  # sqlite | journal | postgres
    out: Path
    study: str = TASK

    @property
    def task_dir(self) -> Path:
        return self.out / TASK

    @property
    def file(self) -> Path | None:
        if self.kind == "sqlite":
            return self.task_dir / "optuna.db"
        if self.kind == "journal":
            return self.task_dir / "optuna.journal"
        return None

    def args(self) -> list[str]:
        if self.kind == "sqlite":
            return []  # the default: OUT/synthetic/optuna.db
        if self.kind == "journal":
            return ["--storage", str(self.file)]
        return ["--storage", PG_URL, "--study", self.study]

    def open(self) -> optuna.storages.BaseStorage:
        if self.kind == "journal":
            return optuna.storages.JournalStorage(JournalFileBackend(str(self.file)))
        url = f"sqlite:///{self.file}" if self.kind == "sqlite" else PG_URL
        return optuna.storages.RDBStorage(url)

    def trials(self) -> list[FrozenTrial]:
        storage = self.open()
        try:
            return optuna.load_study(study_name=self.study, storage=storage).get_trials()
        finally:
            close(storage)


def close(storage: optuna.storages.BaseStorage) -> None:
    """Close an RDB storage's pooled connections (an open SQLite file keeps a tmpfs busy)."""
    engine = getattr(storage, "engine", None)
    if engine is not None:
        engine.dispose()


def make_storage(kind: str, out: Path) -> Storage:
    study = f"rel-{uuid.uuid4().hex[:10]}" if kind == "postgres" else TASK
    return Storage(kind, out, study)


def postgres_up() -> bool:
    try:
        import psycopg2
    except ImportError:
        return False
    try:
        psycopg2.connect(PG_URL, connect_timeout=3).close()
    except psycopg2.Error:
        return False
    return True


def drop_pg_study(name: str) -> None:
    try:
        optuna.delete_study(study_name=name, storage=PG_URL)
    except KeyError:
        pass


# ---------------------------------------------------------------- runs
@dataclass
class Run:
    returncode: int
    stdout: str
    stderr: str


def command(st: Storage, *args: str) -> list[str]:
    return [sys.executable, "-m", "bench.cli", "run", TASK, "--out", str(st.out), "--quiet",
            *st.args(), *args]


def trial_args(trials: int = TRIALS, epochs: int = EPOCHS, sleep_s: float = SLEEP_S
               ) -> list[str]:
    return ["--trials", str(trials), "--set", f"epochs={epochs}", "--set", f"sleep_s={sleep_s}"]


def quick_args(trials: int = TRIALS) -> list[str]:
    """Trials of two instant epochs, where the fault is not a matter of timing."""
    return trial_args(trials, epochs=2, sleep_s=0.0)


def spawn(st: Storage, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    """Start `bench run`; its output goes to unnamed temporary files, not pipes, so that
    waiting for it never waits for orphaned workers that inherited its output."""
    out, err = tempfile.TemporaryFile(), tempfile.TemporaryFile()
    proc = subprocess.Popen(command(st, *args), stdout=out, stderr=err,
                            env={**os.environ, **(env or {})})
    proc.outputs = (out, err)  # type: ignore[attr-defined]
    return proc


def finish(proc: subprocess.Popen, timeout_s: float = RUN_TIMEOUT_S) -> Run:
    try:
        proc.wait(timeout=timeout_s)
        timed_out = False
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        timed_out = True
    texts = []
    for fh in proc.outputs:  # type: ignore[attr-defined]
        fh.seek(0)
        texts.append(fh.read().decode(errors="replace"))
        fh.close()
    if timed_out:
        pytest.fail(f"`bench run` still running after {timeout_s} s: {texts[1][-2000:]}")
    return Run(proc.returncode, texts[0], texts[1])


def run(st: Storage, *args: str, env: dict[str, str] | None = None,
        timeout_s: float = RUN_TIMEOUT_S) -> Run:
    return finish(spawn(st, *args, env=env), timeout_s)


HOT_JOURNAL = "attempt to write a readonly database"


def fail_on_hot_journal(res: Run) -> None:
    """A kill -9 inside an SQLite commit leaves a hot journal; the next run must roll it back
    (test_windows.py reproduces the window). Fails, naming the window, if a run refused it."""
    if HOT_JOURNAL in res.stderr:
        pytest.fail("a kill inside an SQLite commit left a hot journal and the next run "
                    "refused the study: " + res.stderr.strip()[-300:])


def pause_env(point: str, marker: Path, seconds: str = PAUSE_S) -> dict[str, str]:
    return {"BENCH_PAUSE": point, "BENCH_PAUSE_FILE": str(marker), "BENCH_PAUSE_S": seconds}


def wait_until(ready: Callable[[], bool], proc: subprocess.Popen, what: str,
               timeout_s: float = 60) -> None:
    """Poll `ready()` until true; fail if the process ended first or it took too long."""
    deadline = time.time() + timeout_s
    while not ready():
        if proc.poll() is not None:
            res = finish(proc)
            fail_on_hot_journal(res)
            pytest.fail(f"the run ended (exit {res.returncode}) before {what}: "
                        f"{res.stderr[-2000:]}")
        if time.time() > deadline:
            proc.kill()
            pytest.fail(f"{what} never happened within {timeout_s} s")
        time.sleep(0.02)


def inject(proc: subprocess.Popen, fault: str) -> None:
    for i, sig in enumerate(FAULTS[fault]):
        if i:
            time.sleep(DOUBLE_GAP_S)
        if proc.poll() is None:
            proc.send_signal(sig)


def read_rows(st: Storage) -> pd.DataFrame:
    """The study's rows, in trial order."""
    df = leaderboard.read_trials(st.out, TASK, study=st.study)
    return df.sort_values("trial_number").reset_index(drop=True) if not df.empty else df


def row_tmp_files(st: Storage) -> list[Path]:
    """Temporary row files (a row being written, or left by a killed writer)."""
    return [p for sub in ("trials", "curves") for p in (st.task_dir / sub).glob(".*.tmp")]


def children(pid: int) -> list[int]:
    """The process's child processes (a run's workers and its resource tracker)."""
    res = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True,
                         text=True)
    return [int(p) for p in res.stdout.split()]


def wait_gone(pids: list[int], timeout_s: float = 60) -> None:
    deadline = time.time() + timeout_s
    while any(alive(p) for p in pids):
        assert time.time() < deadline, f"processes {pids} still alive"
        time.sleep(0.05)


def alive(pid: int) -> bool:
    """Whether the process runs (a zombie, exited but not yet reaped, does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as fh:  # a zombie has exited
            return fh.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


# ---------------------------------------------------------------- the invariant
@dataclass
class Check:
    """What the invariant found; `problems` empty means it holds."""

    finished: int = 0
    rows: int = 0
    lost: int = 0  # finished trials without a readable row
    wrong: int = 0  # rows whose state or objective differ from the study's
    orphans: int = 0  # rows of no trial of the study
    doubled: int = 0  # trials with more than one row
    unfinished: int = 0  # trials left RUNNING or WAITING
    problems: list[str] = field(default_factory=list)


@dataclass
class Tally:
    """Faults injected by one test, and what the invariant checks after them found."""

    nodeid: str
    faults: int = 0
    checks: int = 0
    lost: int = 0
    wrong: int = 0
    doubled: int = 0
    unfinished: int = 0

    def record(self, c: Check) -> None:
        self.checks += 1
        self.unfinished += c.unfinished
        self.lost += c.lost
        self.wrong += c.wrong + c.orphans
        self.doubled += c.doubled


def check_invariant(st: Storage, trials: list[FrozenTrial] | None = None) -> Check:
    """Compare the study's record with the leaderboard's rows (see the module docstring).

    Rows are matched to trials by trial number within the study, and where the study
    recorded the trial's row uid (user attribute `bench`), by that uid too."""
    trials = st.trials() if trials is None else trials
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        df = leaderboard.read_trials(st.out, TASK, study=st.study)
    c = Check()
    c.problems += [f"unreadable: {w.message}" for w in caught if "skipped" in str(w.message)]
    rows = df.to_dict("records") if not df.empty else []
    c.rows = len(rows)
    by_number: dict[int, list[dict]] = {}
    for r in rows:
        by_number.setdefault(int(r["trial_number"]), []).append(r)
    numbers = {t.number for t in trials}
    for n, rs in by_number.items():
        if n not in numbers:
            c.orphans += len(rs)
            c.problems.append(f"rows {[r['trial_uid'] for r in rs]} of no trial (number {n})")
    for t in trials:
        rs = by_number.get(t.number, [])
        if not t.state.is_finished():
            c.unfinished += 1
            c.problems.append(f"trial {t.number} left {t.state.name} "
                              f"(suspended={t.user_attrs.get('suspended')}), {len(rs)} row(s)")
            continue
        c.finished += 1
        if not rs:
            c.lost += 1
            c.problems.append(f"trial {t.number} ({t.state.name}) has no row")
            continue
        if len({r["trial_uid"] for r in rs}) > 1 or len(rs) > 1:
            c.doubled += 1
            c.problems.append(f"trial {t.number} has {len(rs)} rows")
        row = rs[0]
        uid = (t.user_attrs.get("bench") or {}).get("uid")
        if uid is not None and row["trial_uid"] != uid:
            c.wrong += 1
            c.problems.append(f"trial {t.number}: row uid {row['trial_uid']} != study's {uid}")
        if row["state"] != t.state.name:
            c.wrong += 1
            c.problems.append(f"trial {t.number}: row says {row['state']}, study says "
                              f"{t.state.name}")
        elif t.state.name == "COMPLETE" and row["objective"] != pytest.approx(t.value):
            c.wrong += 1
            c.problems.append(f"trial {t.number}: row objective {row['objective']} != "
                              f"study's {t.value}")
    return c


class Defect(AssertionError):
    """A behaviour the suite hunts for (a known defect's test is `xfail(raises=Defect)`, so
    that any other failure of its setup still fails)."""


class InvariantBroken(Defect):
    """The study and the leaderboard disagree after the rerun."""


def require(c: Check, total: int | None = None) -> None:
    """The invariant holds and the study has `total` finished trials, each with its row."""
    if c.problems:
        raise InvariantBroken("\n".join(c.problems))
    if total is not None and not c.finished == c.rows == total:
        raise InvariantBroken(f"{c.finished} finished trials and {c.rows} rows; the study's "
                              f"total is {total}")


def one_line_error(stderr: str) -> str:
    """The error line of a run that failed cleanly: no traceback, one `error:` line."""
    assert "Traceback" not in stderr, stderr[-3000:]
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, stderr[-3000:]
    return errors[0]
