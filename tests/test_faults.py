"""Faults that must lose nothing: rows that cannot be written, crashed and orphaned
workers, torn journals, stale locks and temporary files, signals during a row's write."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import optuna
import pytest
from conftest import bench_cli

from bench import leaderboard


def spawn(out: Path, *args: str, env: dict | None = None) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "bench.cli", "run", "synthetic", "--out", str(out), "--quiet",
           *args]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **(env or {})})


def wait_for(path: Path, proc: subprocess.Popen, timeout_s: float = 60) -> None:
    deadline = time.time() + timeout_s
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline, f"{path} never appeared"
        time.sleep(0.05)


def journal_trials(out: Path, study: str = "synthetic") -> list:
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(
        str(out / "synthetic" / "optuna.journal")))
    return optuna.load_study(study_name=study, storage=storage).get_trials(deepcopy=False)


def sqlite_trials(out: Path, study: str = "synthetic") -> list:
    return optuna.load_study(study_name=study, storage=f"sqlite:///{out}/synthetic/optuna.db"
                             ).get_trials(deepcopy=False)


def assert_invariant(out: Path, trials: list) -> None:
    """Every finished trial has exactly one readable row whose state and objective equal
    the study's; no row without a trial."""
    rows = leaderboard.read_trials(out, "synthetic")
    by_number = {r["trial_number"]: r for r in rows.to_dict("records")}
    finished = [t for t in trials if t.state.is_finished()]
    assert len(rows["trial_uid"].unique()) == len(by_number) == len(finished) == len(rows), (
        len(finished), len(rows))
    for t in finished:
        row = by_number[t.number]
        assert row["state"] == t.state.name
        if t.state.name == "COMPLETE":
            assert row["objective"] == pytest.approx(t.value)


@contextmanager
def read_only(folder: Path) -> Iterator[None]:
    """`folder` read-only for real: a read-only tmpfs for root (who ignores modes), else
    mode 0555."""
    folder.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        folder.chmod(0o555)
        try:
            yield
        finally:
            folder.chmod(0o755)
        return
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(folder)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a read-only tmpfs here")
    try:
        yield
    finally:
        subprocess.run(["umount", str(folder)], check=False)


def test_rows_that_cannot_be_written_are_reported_and_repaired(out: Path) -> None:
    trials_dir = out / "synthetic" / "trials"
    with read_only(trials_dir):
        res = bench_cli("run", "synthetic", "--out", str(out), "--quiet", "--trials", "3")
    assert res.returncode == 1, res.stderr
    assert "could not write its row" in res.stderr and str(trials_dir) in res.stderr
    # the run stopped at the first lost row it learnt of: rows are written on a thread of
    # their own, so a second trial may have started before the first row's write failed
    lost = sqlite_trials(out)
    assert len(lost) in (1, 2)
    assert all(t.state.name == "COMPLETE" and "bench_result" in t.user_attrs for t in lost)
    res = bench_cli("run", "synthetic", "--out", str(out), "--quiet", "--trials", "3")
    assert res.returncode == 0, res.stderr
    assert f"repaired the record of trials {[t.number for t in lost]}" in res.stderr
    assert_invariant(out, sqlite_trials(out))
    assert len(leaderboard.read_trials(out, "synthetic")) == 3


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")
def test_a_full_disk_loses_no_row_and_says_so(tmp_path: Path) -> None:
    disk = tmp_path / "disk"
    disk.mkdir()
    mount = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=400k", "tmpfs", str(disk)],
                           capture_output=True, text=True)
    if mount.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mount.stderr.strip()}")
    try:
        out = disk / "lb"
        res = bench_cli("run", "synthetic", "--out", str(out), "--quiet", "--trials", "200",
                        "--set", "epochs=30", timeout=300)
        assert res.returncode == 1, res.stdout[-500:] + res.stderr[-2000:]
        assert "Traceback" not in res.stderr, res.stderr[-3000:]
        assert "No space left on device" in res.stderr or "disk is full" in res.stderr
        saved = tmp_path / "saved"
        shutil.copytree(out, saved)
    finally:
        subprocess.run(["umount", str(disk)], check=False)
    res = bench_cli("run", "synthetic", "--out", str(saved), "--quiet", "--trials", "0",
                    "--set", "epochs=30")
    assert res.returncode == 0, res.stderr
    assert_invariant(saved, sqlite_trials(saved))


def test_when_every_worker_crashes_the_run_fails(out: Path) -> None:
    res = bench_cli("run", "synthetic", "--out", str(out), "--quiet", "--trials", "2",
                    "--workers", "2", "--set", "fail=crash")
    assert res.returncode == 1, res.stderr
    assert "worker(s) crashed" in res.stderr and "exit 137" in res.stderr


def test_workers_of_a_killed_parent_stop_and_their_trials_resume(out: Path) -> None:
    proc = spawn(out, "--trials", "4", "--workers", "2", "--set", "sleep_s=0.5",
                 "--set", "epochs=6")
    journal = out / "synthetic" / "optuna.journal"
    deadline = time.time() + 60
    while not (journal.exists() and journal.read_text().count('"op_code":4') >= 2):
        assert time.time() < deadline and proc.poll() is None
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    deadline = time.time() + 30  # orphans get SIGTERM from the kernel, finish the epoch
    while _workers_alive(out):
        assert time.time() < deadline, "orphaned workers kept running"
        time.sleep(0.2)
    trials = journal_trials(out)
    assert sum(bool(t.user_attrs.get("suspended")) for t in trials) == 2
    res = bench_cli("run", "synthetic", "--out", str(out), "--quiet", "--trials", "4",
                    "--workers", "2", "--set", "sleep_s=0.01", "--set", "epochs=6")
    assert res.returncode == 0, res.stderr
    assert_invariant(out, journal_trials(out))
    assert len(leaderboard.read_trials(out, "synthetic")) == 4


def _workers_alive(out: Path) -> bool:
    """Whether a process still holds the study's lock file (every worker holds it shared
    for its whole life)."""
    res = subprocess.run(["fuser", str(out / "synthetic" / ".synthetic.lock")],
                         capture_output=True, text=True)
    return res.returncode == 0


def test_a_writer_killed_holding_the_journal_lock_leaves_no_stale_lock(out: Path) -> None:
    from bench.backends.optuna import FlockLock

    journal = out / "synthetic" / "optuna.journal"
    journal.parent.mkdir(parents=True)
    code = (f"from bench.backends.optuna import FlockLock; import time; "
            f"FlockLock({str(journal)!r}).acquire(); print('held', flush=True); time.sleep(60)")
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    lock = FlockLock(str(journal))
    t0 = time.time()
    assert lock.acquire() and time.time() - t0 < 1
    lock.release()
    res = bench_cli("run", "synthetic", "--out", str(out), "--quiet", "--trials", "2",
                    "--storage", str(journal), timeout=60)
    assert res.returncode == 0, res.stderr


def test_a_torn_journal_record_is_dropped_and_a_damaged_one_named(out: Path) -> None:
    journal = out / "synthetic" / "optuna.journal"
    assert bench_cli("run", "synthetic", "--out", str(out), "--quiet", "--trials", "1",
                     "--workers", "2").returncode == 0
    size = journal.stat().st_size
    with open(journal, "ab") as fh:
        fh.write(b'{"op_code":5,"worker_id":"x","trial_id":0,"st')  # a write cut short
    res = bench_cli("run", "synthetic", "--out", str(out), "--quiet", "--trials", "2",
                    "--workers", "2")
    assert res.returncode == 0, res.stderr
    assert "dropped an incomplete last record" in res.stderr
    assert journal.read_bytes()[:size] == journal.read_bytes()[:size]
    assert len(journal_trials(out)) == 2
    data = journal.read_bytes()
    first_end = data.index(b"\n") + 1
    journal.write_bytes(data[:first_end] + b'{"op_code":5,"tru' + data[first_end:])
    res = bench_cli("run", "synthetic", "--out", str(out), "--quiet", "--trials", "3",
                    "--workers", "2")
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert f"{journal}: the study journal is damaged" in res.stderr


def test_temporary_files_of_killed_writers_are_cleaned(out: Path) -> None:
    import socket

    trials = out / "synthetic" / "trials"
    trials.mkdir(parents=True)
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = trials / f".abc.parquet.{socket.gethostname()}.{dead.pid}.tmp"
    stale.write_bytes(b"PAR1 half")
    live = trials / f".def.parquet.{socket.gethostname()}.{os.getpid()}.tmp"
    live.write_bytes(b"PAR1 half")
    assert bench_cli("run", "synthetic", "--out", str(out), "--quiet", "--trials",
                     "1").returncode == 0
    assert not stale.exists() and live.exists()


def test_rows_still_queued_when_the_run_is_killed_are_written_by_the_next_run(
        out: Path, tmp_path: Path) -> None:
    marker = tmp_path / "at-row-write"
    proc = spawn(out, "--trials", "3", env={"BENCH_PAUSE": "row-write",
                                            "BENCH_PAUSE_FILE": str(marker),
                                            "BENCH_PAUSE_S": "60"})
    wait_for(marker, proc)  # the row writer holds trial 0's row; the study goes on
    deadline = time.time() + 60
    while not any(t.state.name == "COMPLETE" for t in sqlite_trials(out)):
        assert time.time() < deadline and proc.poll() is None
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert not list((out / "synthetic" / "trials").glob("*.parquet"))
    res = bench_cli("run", "synthetic", "--out", str(out), "--quiet", "--trials", "3")
    assert res.returncode == 0, res.stderr
    assert "repaired the record of trials [0" in res.stderr
    trials = sqlite_trials(out)
    assert len(trials) == 3 and trials[0].state.name == "COMPLETE"  # a trial the kill
    assert all(t.state.is_finished() for t in trials)  # caught mid-epoch ended FAIL
    assert_invariant(out, trials)
    row = leaderboard.read_trials(out, "synthetic").set_index("trial_number").loc[0]
    assert row["objective"] == pytest.approx(trials[0].value)


@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_during_a_row_write_keeps_the_row(out: Path, tmp_path: Path, sig: int,
                                                   code: int) -> None:
    marker = tmp_path / "at-row-write"
    proc = spawn(out, "--trials", "3", env={"BENCH_PAUSE": "row-write",
                                            "BENCH_PAUSE_FILE": str(marker),
                                            "BENCH_PAUSE_S": "1"})
    wait_for(marker, proc)
    proc.send_signal(sig)
    time.sleep(0.05)
    proc.send_signal(sig)  # and a second one, 50 ms later
    proc.communicate(timeout=60)
    assert proc.returncode == code
    trials = sqlite_trials(out)
    # the trial whose row was being written finished; those that started meanwhile (rows
    # are written on a thread of their own) finished or were suspended; every finished
    # trial's row is there once the run has exited
    assert trials[0].state.name == "COMPLETE"
    assert all(t.state.name == "COMPLETE" or t.user_attrs.get("suspended") for t in trials)
    assert_invariant(out, trials)


@pytest.mark.parametrize("moment,suspends", [("trial-start", True), ("tell", False)])
def test_ctrl_c_says_whether_a_trial_was_saved_half_done(out: Path, tmp_path: Path,
                                                         moment: str, suspends: bool) -> None:
    marker = tmp_path / "paused"
    proc = spawn(out, "--trials", "3", env={"BENCH_PAUSE": moment,
                                            "BENCH_PAUSE_FILE": str(marker),
                                            "BENCH_PAUSE_S": "1"})
    wait_for(marker, proc)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    trials = sqlite_trials(out)
    assert any(t.user_attrs.get("suspended") for t in trials) == suspends
    saved = "interrupted trials were saved at their last finished epoch" in err
    assert saved == suspends, err
    assert ("no trial was left half-done" in err) == (not suspends), err


def _one_row(uid: str) -> dict:
    from bench.lifecycle import build_row, now
    from bench.registry import get_task

    ident = {"task": "synthetic", "study": "s", "study_uid": "su", "variant": None,
             "trial_uid": uid, "trial_number": 0, "backend": "optuna", "sampler": "tpe",
             "pruner": "none", "seed": 1}
    return build_row(ident, get_task("synthetic").defaults, state="COMPLETE", objective=0.5,
                     metric="loss", direction="minimize", metrics={"loss": 0.5},
                     error=None, started_at=now(), finished_at=now(), duration_s=0.1)


def test_the_row_writer_waits_for_the_next_trial_to_train_then_writes(tmp_path: Path) -> None:
    """Rows queued at a trial boundary are written once the next trial trains (`open`), at
    the latest after `patience_s`, and always by `flush`; the resume file goes only once
    its row is on disk."""
    from bench.lifecycle import RowWriter
    from bench.registry import get_task

    spec = get_task("synthetic")
    trials = tmp_path / "synthetic" / "trials"

    def submit(writer: RowWriter, uid: str) -> Path:
        resume = tmp_path / f"{uid}.resume"
        resume.write_bytes(b"state")
        writer.submit(tmp_path, spec, _one_row(uid), [(0, "loss", 0.5)], resume)
        return resume

    patient = RowWriter(patience_s=60)
    resume = submit(patient, "a")
    time.sleep(0.5)
    assert not (trials / "a.parquet").exists() and resume.exists()  # the boundary's turn
    patient.open()
    deadline = time.time() + 10
    while not (trials / "a.parquet").exists():
        assert time.time() < deadline, "open() did not let the row be written"
        time.sleep(0.01)
    resume = submit(patient, "b")
    assert patient.flush() == [] and (trials / "b.parquet").exists() and not resume.exists()
    submit(patient, "d")  # a row with another behind it is written at once (short trials
    submit(patient, "e")  # must not let the writer fall behind): only the last one waits
    deadline = time.time() + 10
    while not (trials / "d.parquet").exists():
        assert time.time() < deadline, "a row with another queued behind it waited"
        time.sleep(0.01)
    time.sleep(0.5)
    assert not (trials / "e.parquet").exists()
    assert patient.flush() == [] and (trials / "e.parquet").exists()
    hasty = RowWriter(patience_s=0.2)
    submit(hasty, "c")
    time.sleep(2)  # nobody opens: written after its patience
    assert (trials / "c.parquet").exists()
    df = leaderboard.read_trials(tmp_path, "synthetic")
    assert sorted(df["trial_uid"]) == ["a", "b", "c", "d", "e"]
    assert (df["objective"] == 0.5).all()


def test_ctrl_c_counts_this_runs_suspended_trials_not_the_studys(out: Path,
                                                                 tmp_path: Path) -> None:
    """A trial another worker left suspended (its slot resumes it) is not this run's: an
    interrupt between this run's trials says that none was left half-done."""
    marker = tmp_path / "paused"
    env = {"BENCH_PAUSE": "trial-start", "BENCH_PAUSE_FILE": str(marker), "BENCH_PAUSE_S": "1"}
    first = spawn(out, "--trials", "3", "--worker-id", "1", env=env)
    wait_for(marker, first)
    first.send_signal(signal.SIGINT)
    _, err = first.communicate(timeout=60)
    assert first.returncode == 130 and "were saved at their last finished epoch" in err, err
    assert sum(bool(t.user_attrs.get("suspended")) for t in sqlite_trials(out)) == 1
    marker.unlink()
    second = spawn(out, "--trials", "3", "--worker-id", "2", env={**env, "BENCH_PAUSE": "tell"})
    wait_for(marker, second)
    second.send_signal(signal.SIGINT)
    _, err = second.communicate(timeout=60)
    assert second.returncode == 130, err
    assert sum(bool(t.user_attrs.get("suspended")) for t in sqlite_trials(out)) == 1, err
    assert "no trial was left half-done" in err, err
    assert "were saved at their last finished epoch" not in err, err


@pytest.mark.parametrize("storage", ["sqlite", "journal"])
def test_a_storage_restored_from_an_older_copy_is_refused_before_rows_are_overwritten(
        out: Path, tmp_path: Path, storage: str) -> None:
    """Trial rows are named from the study's uid and the trial number; a storage that lost
    trials (an older backup put back, a journal cut short) would number new trials as the
    lost ones and overwrite their rows. The run is refused (exit 2), and no row changes."""
    from bench.cli import main

    args = ["run", "synthetic", "--out", str(out), "--quiet"]
    db = out / "synthetic" / "optuna.db"
    if storage == "journal":
        db = tmp_path / "study.journal"
        args += ["--storage", str(db)]
    assert main([*args, "--trials", "3"]) == 0
    old = db.read_bytes()
    assert main([*args, "--trials", "5"]) == 0
    before = leaderboard.read_trials(out, "synthetic").set_index("trial_uid")["objective"]
    assert len(before) == 5
    db.write_bytes(old)
    proc = spawn(out, "--trials", "5", "--seed", "7", *args[5:])
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2, err
    assert "the storage was restored from an older copy or cut short" in err
    after = leaderboard.read_trials(out, "synthetic").set_index("trial_uid")["objective"]
    assert after.sort_index().to_dict() == before.sort_index().to_dict()


@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_while_workers_start_is_a_clean_stop(out: Path, sig: int, code: int) -> None:
    """--workers 2 stopped while its workers are still importing: the signal waits for each
    worker's handler (no KeyboardInterrupt traceback, no 'crashed' worker), exit 130/143."""
    proc = spawn(out, "--trials", "5", "--workers", "2")
    deadline = time.time() + 30
    while time.time() < deadline and not subprocess.run(
            ["pgrep", "-P", str(proc.pid)], capture_output=True).stdout:
        time.sleep(0.05)
    time.sleep(0.5)  # the workers are importing torch
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err
    assert "Traceback" not in err and "crashed" not in err, err
    finished = [t for t in journal_trials(out) if t.state.is_finished()]  # --workers N:
    assert len(leaderboard.read_trials(out, "synthetic")) == len(finished)  # a journal
