"""Study files truncated, deleted, overwritten or torn: the next run either recovers (the
invariant holds and the study reaches its total) or stops with one `error:` line naming
the file, exit 2, no traceback, and the leaderboard's rows untouched."""

from __future__ import annotations

import random
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from .harness import (
    Storage,
    Tally,
    check_invariant,
    make_storage,
    one_line_error,
    quick_args,
    require,
    run,
)

BEFORE, AFTER = 2, 3  # trials in the study before the damage; the rerun's total


@pytest.fixture(scope="module")
def templates(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A finished study of BEFORE trials per file storage, made once and copied per test."""
    made = {}
    for kind in ("sqlite", "journal"):
        out = tmp_path_factory.mktemp(f"template-{kind}") / "lb"
        res = run(make_storage(kind, out), *quick_args(BEFORE))
        assert res.returncode == 0, res.stderr[-3000:]
        made[kind] = out
    return made


def _truncate(path: Path) -> None:
    path.write_bytes(b"")


def _garbage(path: Path) -> None:
    path.write_bytes(random.Random(0).randbytes(path.stat().st_size))


def _garbage_after_header(path: Path) -> None:
    """A valid SQLite header, damaged pages after it (a disk or copy gone wrong)."""
    data = path.read_bytes()
    path.write_bytes(data[:4096] + random.Random(1).randbytes(len(data) - 4096))


def _delete(path: Path) -> None:
    path.unlink()


def _torn_tail(path: Path) -> None:
    """The last record cut short, as a writer killed mid-append or a full disk leaves it."""
    with open(path, "ab") as fh:
        fh.write(b'{"op_code":5,"worker_id":"w","trial_id":0,"st')


def _damaged_middle(path: Path) -> None:
    """A torn record with later records appended after it (the first line cut short)."""
    data = path.read_bytes()
    end = data.index(b"\n")
    path.write_bytes(data[:end - 10] + data[end:])


# damage, storage, what the next run must do: recover, or stop naming the file, saying why
CASES = [
    ("truncated", "sqlite", _truncate, "the study database is empty (0 bytes)"),
    ("garbage", "sqlite", _garbage, "not an SQLite database"),
    ("damaged-pages", "sqlite", _garbage_after_header, "the study database is damaged"),
    ("deleted", "sqlite", _delete, "does not hold it"),
    ("torn-last-line", "journal", _torn_tail, None),
    ("damaged-middle-line", "journal", _damaged_middle, "the study journal is damaged"),
    ("truncated", "journal", _truncate, "does not hold it"),
    ("deleted", "journal", _delete, "does not hold it"),
]


@pytest.mark.parametrize("storage,damage,says", [
    pytest.param(storage, damage, says, id=f"{storage}-{name}",
                 marks=[pytest.mark.slow] if name == "deleted" or (
                     storage, name) == ("journal", "truncated") else [])
    for name, storage, damage, says in CASES])
def test_a_damaged_study_file_is_recovered_or_named(
        storage: str, damage: Callable[[Path], None], says: str | None,
        templates: dict[str, Path], tmp_path: Path, tally: Tally) -> None:
    out = tmp_path / "lb"
    shutil.copytree(templates[storage], out)
    st: Storage = make_storage(storage, out)
    assert st.file is not None
    rows_before = {p.name: p.read_bytes() for p in (st.task_dir / "trials").iterdir()}
    damage(st.file)
    tally.faults += 1
    res = run(st, *quick_args(AFTER))
    if says is None:  # recovered: the torn record dropped, with a warning naming the file
        assert res.returncode == 0, res.stderr[-3000:]
        assert f"warning: {st.file}: dropped an incomplete last record" in res.stderr
        c = check_invariant(st)
        tally.record(c)
        require(c, AFTER)
        return
    assert res.returncode == 2, res.stderr[-3000:]
    line = one_line_error(res.stderr)
    assert str(st.file) in line and says in line, line
    rows_after = {p.name: p.read_bytes() for p in (st.task_dir / "trials").iterdir()}
    assert rows_after == rows_before  # nothing written, nothing lost
    if damage is _delete:  # refused before anything was created in the lost study's place
        assert not st.file.exists()
        assert not any(p.name in ("optuna.db", "optuna.journal") for p in st.task_dir.iterdir())
