"""Disks that turn read-only or fill up, for real (tmpfs and read-only bind mounts, as root).

Each must either be recovered from by the next run (every row there, the invariant holding)
or stop the run with one clear `error:` line that names where, and no traceback.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from .harness import (
    TRIALS,
    Defect,
    Storage,
    Tally,
    check_invariant,
    one_line_error,
    quick_args,
    require,
    run,
)

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="mounting file systems needs root")
FULL_TRIALS = 30


@contextmanager
def mounted(folder: Path, *args: str) -> Iterator[None]:
    """`mount ARGS folder` for the block's duration; skip the test where mounting fails."""
    folder.mkdir(parents=True, exist_ok=True)
    res = subprocess.run(["mount", *args, str(folder)], capture_output=True, text=True)
    if res.returncode != 0:
        pytest.skip(f"cannot mount here: {res.stderr.strip()}")
    try:
        yield
    finally:
        if subprocess.run(["umount", str(folder)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "--lazy", str(folder)], check=False)  # still busy


@contextmanager
def read_only(folder: Path) -> Iterator[None]:
    """The folder, with what it holds, read-only: a read-only bind mount of itself."""
    with mounted(folder, "--bind", str(folder)):
        res = subprocess.run(["mount", "-o", "remount,ro,bind", str(folder)],
                             capture_output=True, text=True)
        if res.returncode != 0:
            pytest.skip(f"cannot remount read-only here: {res.stderr.strip()}")
        yield


@pytest.mark.parametrize("storage", [pytest.param("sqlite", marks=pytest.mark.slow), "journal"])
def test_a_read_only_rows_folder_is_reported_and_the_next_run_repairs(
        storage: str, make_store: Callable[..., Storage], tally: Tally) -> None:
    st = make_store(storage)
    trials_dir = st.task_dir / "trials"
    with mounted(trials_dir, "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs"):
        res = run(st, *quick_args())
        tally.faults += 1
    assert res.returncode == 1, res.stderr[-3000:]
    assert "Traceback" not in res.stderr, res.stderr[-3000:]
    # the run stopped at the first row it learnt it could not write: rows are written on a
    # thread of their own, so the next trial may have run meanwhile (and lost its row too)
    lost = st.trials()
    assert len(lost) in (1, 2) and all(t.state.name == "COMPLETE" for t in lost)
    said = [line for line in res.stderr.splitlines() if "could not write its row" in line]
    assert [line.split(":")[0] for line in said] == [f"trial {t.number}" for t in lost]
    assert all("Read-only file system" in line and str(trials_dir) in line for line in said)
    rerun = run(st, *quick_args())
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"repaired the record of trials {[t.number for t in lost]}" in rerun.stderr
    c = check_invariant(st)
    tally.record(c)
    require(c, TRIALS)


@pytest.mark.parametrize("storage", ["sqlite", pytest.param("journal", marks=pytest.mark.slow)])
def test_a_read_only_study_folder_stops_the_run_in_one_line_and_changes_nothing(
        storage: str, make_store: Callable[..., Storage], tally: Tally) -> None:
    st = make_store(storage)
    assert run(st, *quick_args(2)).returncode == 0
    before = {p.name: p.read_bytes() for p in (st.task_dir / "trials").iterdir()}
    with read_only(st.task_dir):
        res = run(st, *quick_args(4))
        tally.faults += 1
    assert res.returncode == 2, res.stderr[-3000:]
    line = one_line_error(res.stderr)
    assert str(st.task_dir) in line and "Read-only file system" in line
    assert {p.name: p.read_bytes() for p in (st.task_dir / "trials").iterdir()} == before
    assert run(st, *quick_args(4)).returncode == 0
    c = check_invariant(st)
    tally.record(c)
    require(c, 4)


class FileNotNamed(Defect):
    """The run stopped cleanly, but its message does not say which file or folder."""


@pytest.mark.parametrize("storage,free_kib", [
    pytest.param("sqlite", 160),
    pytest.param("journal", 40, marks=pytest.mark.slow),
    pytest.param("journal", 160, marks=pytest.mark.slow),  # a row's write fails first
    pytest.param("sqlite", 40, marks=pytest.mark.slow),  # the study cannot even be opened
    pytest.param("sqlite", 300, marks=pytest.mark.slow),
    pytest.param("journal", 300, marks=pytest.mark.slow),
])
def test_a_full_disk_loses_no_row_and_says_where(
        storage: str, free_kib: int, make_store: Callable[..., Storage], tmp_path: Path,
        tally: Tally) -> None:
    disk = tmp_path / "disk"
    with mounted(disk, "-t", "tmpfs", "-o", "size=1m", "tmpfs"):
        st = make_store(storage, disk / "lb")
        filler = disk / "filler"
        fs = os.statvfs(disk)
        filler.write_bytes(b"\0" * (fs.f_bavail * fs.f_frsize - free_kib * 1024))
        res = run(st, *quick_args(FULL_TRIALS))
        tally.faults += 1
        assert res.returncode in (1, 2), res.stderr[-3000:]  # 2: the study cannot be opened
        assert "Traceback" not in res.stderr, res.stderr[-3000:]
        said = [line for line in res.stderr.splitlines()
                if line.startswith("error: ") or "could not write its row" in line]
        # one error, or one line per trial whose row could not be written (rows are written
        # while the next trial trains, so one or two more may have run meanwhile)
        assert said and (len(said) == 1 or all("could not write its row" in line
                                               for line in said)), res.stderr[-3000:]
        assert len(said) <= 4, res.stderr[-3000:]  # the run stopped at the next boundary
        assert all("No space left on device" in line or "disk is full" in line
                   for line in said), res.stderr[-3000:]
        filler.unlink()  # space freed: the next run repairs and continues
        rerun = run(st, *quick_args(FULL_TRIALS))
        assert rerun.returncode == 0, rerun.stderr[-3000:]
        c = check_invariant(st)
        tally.record(c)
        require(c, FULL_TRIALS)
    for line in said:
        if str(disk) not in line or ("could not write its row" in line
                                     and "/trials/" not in line):  # the row's own file
            raise FileNotNamed(line)
