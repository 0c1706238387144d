"""The fault x moment x storage matrix, as Optuna's storage tests parametrise theirs.

Each cell runs `bench run synthetic` for real, stops it at one moment of a trial's life
(`bench.faults` pause points), sends the fault, checks the faulted run's exit status,
reruns the same command and checks the invariant (harness.py): the study reaches its total,
every finished trial has exactly one row that agrees with the study, nothing is doubled.

Moments: `trial-start` (a trial asked, nothing run), `mid-epoch` (inside training code),
`row-write` (the row's temporary file written, not yet moved into place: on the row
writer's thread, while the main thread tells the study and goes on), `repair` (the next
run's stale-trial pass, after a kill -9 left a trial RUNNING), `tell` (the row queued and
the result recorded, the study not yet told).

Eight cells run by default (about a minute); `-m slow` runs the other 52.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from .harness import (
    EPOCHS,
    EXIT,
    FAULTS,
    MOMENTS,
    SLEEP_S,
    STORAGES,
    TRIALS,
    Storage,
    Tally,
    check_invariant,
    fail_on_hot_journal,
    finish,
    inject,
    pause_env,
    read_rows,
    require,
    row_tmp_files,
    run,
    spawn,
    trial_args,
    wait_until,
)

MID_EPOCH_S = SLEEP_S * 1.5  # after a trial starts: halfway through its second epoch
GRACE_S = 30 + 3  # PostgreSQL studies: a dead worker's trial is failed 30 s after its last beat

# Run by default: each fault and each moment at least once (SIGKILL also before every repair
# cell), on SQLite and journal files, and one PostgreSQL cell; `-m slow` runs the others.
DEFAULT = {
    ("sqlite", "SIGKILL", "trial-start"), ("sqlite", "SIGINT", "row-write"),
    ("sqlite", "2xSIGINT", "mid-epoch"), ("sqlite", "SIGTERM", "repair"),
    ("journal", "SIGKILL", "row-write"), ("journal", "SIGKILL", "tell"),
    ("journal", "SIGTERM", "mid-epoch"),
    ("postgres", "SIGINT", "mid-epoch"),
}

def _cells() -> list:
    cells = []
    for storage in STORAGES:
        for fault in FAULTS:
            for moment in MOMENTS:
                marks: list = []
                if (storage, fault, moment) not in DEFAULT or (
                        storage == "postgres" and fault == "SIGKILL"):  # 30 s heartbeat grace
                    marks.append(pytest.mark.slow)
                if storage == "postgres":
                    marks.append(pytest.mark.postgres)
                if storage == "postgres" and moment == "repair":
                    marks.append(pytest.mark.skip(
                        reason="on a heartbeat storage (PostgreSQL) a run mends only what "
                               "has been stale for 30 s (heartbeat_repair), so a repair "
                               "right after a kill has nothing to do: tests/test_postgres.py "
                               "covers the stale pass"))
                cells.append(pytest.param(storage, fault, moment, marks=marks,
                                          id=f"{storage}-{fault}-{moment}"))
    return cells


# ---------------------------------------------------------------- moments
def _at_trial_start(st: Storage, marker: Path) -> tuple:
    proc = spawn(st, *trial_args(), env=pause_env("trial-start", marker))
    return proc, lambda: marker.exists()


def _mid_epoch(st: Storage, marker: Path) -> tuple:
    proc = spawn(st, *trial_args(), env=pause_env("trial-start", marker, "0"))

    def ready() -> bool:
        if not marker.exists():
            return False
        time.sleep(MID_EPOCH_S)
        return True

    return proc, ready


def _at_row_write(st: Storage, marker: Path) -> tuple:
    """The row's own temporary file (the curve's is written and paused on first)."""
    proc = spawn(st, *trial_args(), env=pause_env("row-write", marker))
    return proc, lambda: any(p.parent.name == "trials" for p in row_tmp_files(st))


def _at_tell(st: Storage, marker: Path) -> tuple:
    proc = spawn(st, *trial_args(), env=pause_env("tell", marker))
    return proc, lambda: marker.exists()


def _at_repair(st: Storage, marker: Path) -> tuple:
    proc = spawn(st, *trial_args(), env=pause_env("repair", marker))
    return proc, lambda: marker.exists()


MOMENT: dict[str, Callable[[Storage, Path], tuple]] = {
    "trial-start": _at_trial_start, "mid-epoch": _mid_epoch, "row-write": _at_row_write,
    "tell": _at_tell, "repair": _at_repair}


def kill_mid_epoch(st: Storage, marker: Path) -> None:
    """A kill -9 inside the first trial's training: a RUNNING trial with nothing saved."""
    proc, ready = _mid_epoch(st, marker)
    wait_until(ready, proc, "the first trial started")
    proc.send_signal(signal.SIGKILL)
    assert finish(proc).returncode == -signal.SIGKILL
    marker.unlink()


def first_trial_state(fault: str, moment: str) -> str:
    """What trial 0 must end as once the rerun is done."""
    if moment == "repair":
        return "FAIL"  # the kill -9 before the repair left nothing to resume from
    if fault == "SIGKILL":  # at the tell, its result was recorded; at its row's write (on
        # the row writer's thread) it had been told already: the rerun writes its row
        return "COMPLETE" if moment in ("tell", "row-write") else "FAIL"
    return "COMPLETE"  # a signal suspends the trial (or lets it finish); the rerun resumes it


# ---------------------------------------------------------------- the matrix
@pytest.mark.parametrize("storage,fault,moment", _cells())
def test_fault(storage: str, fault: str, moment: str, make_store: Callable[..., Storage],
               tmp_path: Path, tally: Tally) -> None:
    st = make_store(storage)
    marker = tmp_path / "paused"
    if moment == "repair":  # a stale trial for the next run's repair pass to deal with
        kill_mid_epoch(st, marker)
        tally.faults += 1
    proc, ready = MOMENT[moment](st, marker)
    wait_until(ready, proc, f"the run reached {moment}")
    inject(proc, fault)
    tally.faults += 1
    faulted = finish(proc)
    fail_on_hot_journal(faulted)
    assert faulted.returncode == EXIT[fault], faulted.stderr[-3000:]
    assert "Traceback" not in faulted.stderr, faulted.stderr[-3000:]
    if storage == "postgres" and fault == "SIGKILL":
        time.sleep(GRACE_S)  # until another run may declare the killed trial dead

    rerun = run(st, *trial_args())
    c = check_invariant(st)
    tally.record(c)
    fail_on_hot_journal(rerun)
    require(c, TRIALS)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "Traceback" not in rerun.stderr, rerun.stderr[-3000:]
    assert not row_tmp_files(st), row_tmp_files(st)

    first = min(st.trials(), key=lambda t: t.number)
    assert first.state.name == first_trial_state(fault, moment)
    row = read_rows(st).iloc[first.number]
    if first.state.name == "COMPLETE":
        assert row["epochs_done"] == EPOCHS  # it ran to the end, resumed or not
    if fault in ("SIGINT", "SIGTERM") and moment in ("trial-start", "mid-epoch"):
        assert row["attempts"] == 2  # suspended at an epoch boundary, resumed from there
    if first.state.name == "FAIL":
        assert "killed" in row["error"]
