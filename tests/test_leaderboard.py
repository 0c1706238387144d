"""The Parquet leaderboard: atomic files, concurrent writers, schema evolution, ranking."""

from __future__ import annotations

import multiprocessing as mp
import os
from pathlib import Path

import pandas as pd
import pytest

from bench import leaderboard


def row(uid: str, objective: float | None = 1.0, config: str = "c1", state: str = "COMPLETE",
        **extra) -> dict:
    base = {"task": "t", "study": "s", "variant": "default", "trial_uid": uid, "trial_number": 0,
            "state": state, "objective": objective, "direction": "minimize",
            "config_hash": config, "param_x": 1.0}
    base.update(extra)
    return base


def _writer(out: str, worker: int, n: int) -> None:
    for i in range(n):
        uid = f"w{worker}-{i}"
        leaderboard.write_trial(out, row(uid, float(i), config=f"c{i % 3}"),
                                [(s, "loss", float(s)) for s in range(5)])


def test_concurrent_writers_lose_no_row(tmp_path: Path) -> None:
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(str(tmp_path), w, 40)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
        assert p.exitcode == 0
    rows = leaderboard.read_trials(tmp_path, "t")
    assert len(rows) == 160 and rows["trial_uid"].is_unique
    curves = leaderboard.read_curves(tmp_path, "t")
    assert len(curves) == 160 * 5
    assert not list((tmp_path / "t" / "trials").glob(".*")), "no temporary file left behind"


def test_schema_evolution_unions_columns(tmp_path: Path) -> None:
    leaderboard.write_trial(tmp_path, row("a", 1.0))
    leaderboard.write_trial(tmp_path, row("b", 2.0, param_new=3, metric_extra=0.5))
    leaderboard.write_trial(tmp_path, row("c", 3.0, param_x=2))  # int where float was
    rows = leaderboard.read_trials(tmp_path, "t").set_index("trial_uid")
    assert rows.loc["b", "param_new"] == 3 and pd.isna(rows.loc["a", "param_new"])
    assert rows.loc["c", "param_x"] == 2.0
    assert pd.isna(rows.loc["a", "metric_extra"])


def test_corrupt_and_partial_files_are_skipped_with_a_warning(tmp_path: Path) -> None:
    good = leaderboard.write_trial(tmp_path, row("good"))
    bad = good.with_name("bad.parquet")
    bad.write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])  # truncated for real
    (good.parent / ".tmp-in-flight.parquet").write_bytes(b"PAR1 partial")
    with pytest.warns(UserWarning, match="bad.parquet: unreadable leaderboard file skipped"):
        rows = leaderboard.read_trials(tmp_path, "t")
    assert list(rows["trial_uid"]) == ["good"]


def test_write_replaces_atomically_and_cleans_up_on_failure(tmp_path: Path, monkeypatch) -> None:
    import pyarrow.parquet as pq

    leaderboard.write_trial(tmp_path, row("x", 1.0))

    def broken(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(pq, "write_table", broken)
    with pytest.raises(OSError):
        leaderboard.write_trial(tmp_path, row("x", 2.0))
    folder = tmp_path / "t" / "trials"
    assert sorted(os.listdir(folder)) == ["x.parquet"]
    assert leaderboard.read_trials(tmp_path, "t")["objective"].tolist() == [1.0]


def test_an_unreadable_row_file_never_shifts_the_cached_rows(tmp_path: Path) -> None:
    """A file that cannot be read (cut short mid-copy) is skipped without pairing the
    next file's rows with its name in the read cache: every read, and every read after
    the file is whole again, gives each trial once with its own objective."""
    import warnings

    from bench.cli import main

    out = tmp_path / "lb"
    assert main(["run", "synthetic", "--trials", "3", "--out", str(out), "--quiet"]) == 0
    truth = leaderboard.read_trials(out, "synthetic").set_index("trial_uid")["objective"]
    files = sorted((out / "synthetic" / "trials").glob("*.parquet"))
    assert len(files) == 3
    first = files[0]
    whole = first.read_bytes()
    first.write_bytes(whole[:300])
    cache = out / "synthetic" / ".cache"
    import shutil

    shutil.rmtree(cache, ignore_errors=True)
    for _ in range(2):  # the first read writes the cache, the second reads it
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            rows = leaderboard.read_trials(out, "synthetic").set_index("trial_uid")
        assert len(rows) == 2 and rows.index.is_unique
        assert rows["objective"].to_dict() == {u: truth[u] for u in rows.index}
    first.write_bytes(whole)
    rows = leaderboard.read_trials(out, "synthetic").set_index("trial_uid")
    assert rows["objective"].sort_index().to_dict() == truth.sort_index().to_dict()
