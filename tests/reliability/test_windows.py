"""Windows that neither the matrix's pause points nor random kills hit reliably, reproduced
deterministically: by putting the study in exactly the state a kill inside the window
leaves, or by holding the process that must still be alive at a pause point."""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from optuna.trial import TrialState

from .harness import (
    Defect,
    Storage,
    Tally,
    alive,
    check_invariant,
    children,
    close,
    finish,
    pause_env,
    quick_args,
    read_rows,
    require,
    run,
    spawn,
    wait_gone,
    wait_until,
)


def test_a_repair_killed_between_fail_and_row_loses_no_row(
        make_store: Callable[..., Storage], tmp_path: Path, tally: Tally) -> None:
    st = make_store("sqlite")
    marker = tmp_path / "paused"
    # 1. kill -9 a run just after its first trial was asked: RUNNING, no `bench` uid yet
    proc = spawn(st, *quick_args(2), env=pause_env("trial-start", marker))
    wait_until(marker.exists, proc, "the first trial started")
    proc.send_signal(signal.SIGKILL)
    assert finish(proc).returncode == -signal.SIGKILL
    tally.faults += 1
    [t] = st.trials()
    assert t.state == TrialState.RUNNING and "bench" not in t.user_attrs
    # 2. the next run's repair, killed after its first step (the trial marked FAIL) and
    #    before its second (the FAIL row written): exactly what repair()'s first step does
    storage = st.open()
    try:
        assert storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
    finally:
        close(storage)
    tally.faults += 1
    # 3. the rerun must give the FAIL trial its row
    rerun = run(st, *quick_args(2))
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    c = check_invariant(st)
    tally.record(c)
    require(c, 2)


@pytest.mark.slow
def test_a_rerun_right_after_a_parent_kill_leaves_its_orphans_alone(
        make_store: Callable[..., Storage], tmp_path: Path, tally: Tally) -> None:
    st = make_store("journal")
    marker = tmp_path / "writing"
    args = [*quick_args(1), "--workers", "2"]  # one trial: one worker process
    # the worker finishes training, then sits 15 s in each of its curve and row writes
    proc = spawn(st, *args, env=pause_env("row-write", marker, "15"))
    wait_until(marker.exists, proc, "the worker was writing its trial's curve")
    [worker] = [p for p in children(proc.pid) if "spawn_main" in _cmdline(p)]
    proc.send_signal(signal.SIGKILL)  # the worker gets SIGTERM and carries on writing
    assert finish(proc).returncode == -signal.SIGKILL
    tally.faults += 1
    rerun = run(st, *args)  # at once, as a requeued job or an impatient user would
    assert alive(worker), "the orphan ended before the rerun was done"
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    wait_gone([worker])
    c = check_invariant(st)
    tally.record(c)
    require(c, 1)
    rows = read_rows(st)
    if not (rows["state"] == "COMPLETE").all():  # it had finished training
        raise Defect(f"the orphan's finished trial ended {list(rows['state'])}: "
                     f"{list(rows['error'])}; the rerun said: {rerun.stderr[-500:]}")


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_text().replace("\0", " ")
    except OSError:
        return ""


# A writer that dies inside a transaction whose pages already reached the database file (a
# commit in progress, or a cache spill) leaves a hot journal: the file is only consistent
# again once that journal is rolled back, which needs a read-write connection.
KILLED_WRITER = """
import sqlite3, sys, time
con = sqlite3.connect(sys.argv[1], isolation_level=None)
con.execute("PRAGMA cache_size=1")  # spill dirty pages into the file before the commit
con.execute("BEGIN IMMEDIATE")
con.execute("UPDATE trial_values SET value = value + 1")
con.execute("CREATE TABLE killed_mid_transaction(x)")
con.executemany("INSERT INTO killed_mid_transaction VALUES (?)", [(b"x" * 2000,)] * 300)
print("in the transaction", flush=True)
time.sleep(60)
"""


def test_an_sqlite_writer_killed_mid_commit_does_not_lock_the_study_out(
        make_store: Callable[..., Storage], tally: Tally) -> None:
    st = make_store("sqlite")
    assert st.file is not None
    assert run(st, *quick_args(1)).returncode == 0
    values = [t.value for t in st.trials()]
    writer = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(st.file)],
                              stdout=subprocess.PIPE, text=True)
    assert writer.stdout is not None and writer.stdout.readline() == "in the transaction\n"
    writer.kill()
    writer.wait()
    tally.faults += 1
    assert st.file.with_name("optuna.db-journal").stat().st_size > 0  # a hot journal
    res = run(st, *quick_args(2))
    if res.returncode != 0:
        raise Defect(f"exit {res.returncode}: {res.stderr[-1000:]}")
    c = check_invariant(st)
    tally.record(c)
    require(c, 2)
    assert [t.value for t in st.trials()][:1] == values  # the killed transaction rolled back
