"""The Optuna backend end to end on the synthetic task: states, resume, kills, variants."""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import sys
import time
from contextlib import closing
from pathlib import Path

import optuna
import pandas as pd
import pytest
from conftest import bench_cli

from bench import leaderboard
from bench.cli import main


def run(out: Path, *args: str) -> int:
    return main(["run", "synthetic", "--out", str(out), "--quiet", *args])


def rows(out: Path, **kw) -> pd.DataFrame:
    return leaderboard.read_trials(out, "synthetic", **kw)


def study_trials(out: Path, name: str = "synthetic") -> list:
    storage = f"sqlite:///{out / 'synthetic' / 'optuna.db'}"
    return optuna.load_study(study_name=name, storage=storage).get_trials(deepcopy=False)


def test_search_writes_one_row_per_trial_with_seeds(out: Path) -> None:
    assert run(out, "--trials", "4", "--seed", "7") == 0
    df = rows(out).sort_values("trial_number")
    assert list(df["trial_number"]) == [0, 1, 2, 3]
    assert list(df["seed"]) == [7, 8, 9, 10]
    assert (df["state"] == "COMPLETE").all() and df["error"].isna().all()
    # the objective is the task's own value at the sampled point
    x, y = df["param_x"], df["param_y"]
    expected = (1 - x) ** 2 + 100 * (y - x * x) ** 2
    assert df["objective"].tolist() == pytest.approx(expected.tolist())
    assert (df["backend"] == "optuna").all() and (df["sampler"] == "tpe").all()
    assert df["config_hash"].is_unique and (df["epochs_done"] == 5).all()
    values = {t.number: t.value for t in study_trials(out)}
    assert values == dict(zip(df["trial_number"], df["objective"], strict=True))


def test_exception_and_nan_fail_the_trial_and_the_study_goes_on(out: Path) -> None:
    assert run(out, "--trials", "2", "--set", "fail=exception", "--set", "fail_at=1") == 0
    assert run(out, "--trials", "2", "--set", "fail=nan", "--study", "nan") == 0
    assert run(out, "--trials", "2", "--study", "nan") == 0  # the same study carries on
    df = rows(out)
    exc = df[df["study"] == "synthetic"]
    assert (exc["state"] == "FAIL").all()
    assert exc["error"].str.contains("RuntimeError: injected failure at step 1").all()
    assert (exc["epochs_done"] == 1).all()
    nan = df[df["study"] == "nan"].sort_values("trial_number")
    assert list(nan["state"]) == ["FAIL", "FAIL", "COMPLETE", "COMPLETE"]
    assert nan["error"].iloc[0].startswith("ValueError: non-finite final metric(s): loss=nan")
    states = [t.state.name for t in study_trials(out, "nan")]
    assert states == ["FAIL", "FAIL", "COMPLETE", "COMPLETE"]


def test_pruned_trials_get_rows_with_their_last_value(out: Path) -> None:
    assert run(out, "--trials", "20", "--sampler", "random", "--set", "epochs=6") == 0
    df = rows(out)
    pruned = df[df["state"] == "PRUNED"]
    assert len(pruned) > 0, "median pruning stops the worse random trials"
    assert (pruned["epochs_done"] < 6).all() and pruned["objective"].notna().all()
    assert pruned["error"].str.startswith("pruned at step").all()
    assert {t.number for t in study_trials(out) if t.state.name == "PRUNED"} == set(
        pruned["trial_number"])


def test_rerun_resumes_and_adds_trials(out: Path) -> None:
    assert run(out, "--trials", "3") == 0
    assert run(out, "--trials", "2") == 0
    df = rows(out)
    assert sorted(df["trial_number"]) == [0, 1, 2, 3, 4] and df["trial_uid"].is_unique


def test_a_resumed_search_does_not_replay_its_first_points(out: Path) -> None:
    assert run(out, "--trials", "2", "--sampler", "random") == 0
    assert run(out, "--trials", "2", "--sampler", "random") == 0
    df = rows(out)
    assert len(df) == 4 and not df.duplicated(["param_x", "param_y"]).any()


def _running(out: Path, study: str) -> int:
    """RUNNING trials of a study, read through a read-only connection: opening the database
    with Optuna while `bench run` creates it would race it to create the tables."""
    db = out / "synthetic" / "optuna.db"
    if not db.exists():
        return 0
    try:
        with closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)) as con:
            return con.execute(
                "SELECT count(*) FROM trials JOIN studies USING (study_id) "
                "WHERE studies.study_name = ? AND trials.state = 'RUNNING'", (study,),
            ).fetchone()[0]
    except sqlite3.OperationalError:  # tables not created yet, or locked for a moment
        return 0


def _wait_running(out: Path, study: str, proc: subprocess.Popen, timeout_s: float = 60) -> None:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        assert proc.poll() is None, proc.communicate()
        if _running(out, study):
            return
        time.sleep(0.3)
    raise AssertionError("no trial started")


def _spawn(out: Path, *args: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "bench.cli", "run", "synthetic", "--out", str(out), "--quiet",
           "--set", "sleep_s=0.4", "--set", "epochs=10", *args]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_kill_9_mid_trial_then_rerun_marks_it_fail_and_resumes(out: Path) -> None:
    proc = _spawn(out, "--trials", "3")
    _wait_running(out, "synthetic", proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed = [t.number for t in study_trials(out) if t.state.name == "RUNNING"]
    assert len(killed) == 1
    res = bench_cli("run", "synthetic", "--out", str(out), "--quiet", "--trials", "1",
                    "--set", "epochs=2")
    assert res.returncode == 0, res.stderr
    assert f"marked FAIL (left RUNNING by a killed run): trials {killed}" in res.stdout
    trials = study_trials(out)
    assert [t.state.name for t in trials] == ["FAIL", "COMPLETE"]
    df = rows(out).set_index("trial_number")
    assert df.loc[killed[0], "state"] == "FAIL"
    assert "worker died" in df.loc[killed[0], "error"]
    assert df.loc[1, "state"] == "COMPLETE"


def test_a_trial_killed_after_writing_its_row_keeps_that_row(out: Path) -> None:
    """The window between the row's os.replace and Optuna's tell: resume adopts the row."""
    assert run(out, "--trials", "2", "--set", "epochs=2") == 0
    storage = optuna.storages.RDBStorage(f"sqlite:///{out / 'synthetic' / 'optuna.db'}")
    study = optuna.load_study(study_name="synthetic", storage=storage)
    first = study.get_trials()[0]
    trial_id = storage.get_trial_id_from_study_id_trial_number(study._study_id, 0)
    with storage.engine.begin() as conn:  # put the study back in the state a kill leaves
        conn.exec_driver_sql(f"UPDATE trials SET state='RUNNING' WHERE trial_id={trial_id}")
        conn.exec_driver_sql(f"DELETE FROM trial_values WHERE trial_id={trial_id}")
    assert study_trials(out)[0].state.name == "RUNNING"
    res = bench_cli("run", "synthetic", "--out", str(out), "--quiet", "--trials", "0")
    assert res.returncode == 0, res.stderr
    assert "marked FAIL" not in res.stdout
    again = study_trials(out)[0]
    assert again.state.name == "COMPLETE" and again.value == pytest.approx(first.value)
    df = rows(out)
    assert len(df) == 2 and (df["state"] == "COMPLETE").all()


def test_sigterm_marks_the_running_trial_fail_and_exits_130(out: Path) -> None:
    proc = _spawn(out, "--trials", "3")
    _wait_running(out, "synthetic", proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "Rerun the same command to resume" in err
    df = rows(out)
    assert list(df["state"]) == ["FAIL"] and "interrupted" in df["error"].iloc[0]
    assert [t.state.name for t in study_trials(out)] == ["FAIL"]


def test_an_interrupt_before_the_objective_starts_still_leaves_a_fail_row(
        out: Path, monkeypatch) -> None:
    from bench.backends import optuna as ob

    def interrupted(self, trial):
        raise KeyboardInterrupt

    monkeypatch.setattr(ob.Objective, "params_for", interrupted)
    assert run(out, "--trials", "2") == 130
    df = rows(out)
    assert list(df["state"]) == ["FAIL"] and "before it started" in df["error"].iloc[0]
    assert [t.state.name for t in study_trials(out)] == ["FAIL"]


def test_variant_runs_each_point_once_per_seed_even_across_a_kill(out: Path) -> None:
    proc = _spawn(out, "--variant", "grid", "--set", "sleep_s=0.05", "--set", "epochs=3")
    deadline = time.time() + 60
    while len(rows(out)) < 3 and time.time() < deadline:  # a few points done, then kill
        time.sleep(0.1)
    _wait_running(out, "synthetic.grid", proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert run(out, "--variant", "grid", "--set", "epochs=3") == 0
    assert run(out, "--variant", "grid", "--set", "epochs=3") == 0  # nothing left to do
    df = rows(out, study="synthetic.grid")
    done = df[df["state"] == "COMPLETE"]
    assert len(done) == 12  # 6 points x 2 seeds
    assert not done.duplicated(["param_x", "param_y", "seed"]).any()
    assert set(done["seed"]) == {0, 1}
    # the killed trial: FAIL and re-run, unless its row was written before the kill
    assert (df["state"] == "FAIL").sum() <= 1
    assert df["trial_uid"].is_unique
    assert (df["variant"] == "grid").all() and (df["pruner"] == "none").all()


def test_a_partial_variant_run_covers_every_point_before_repeating(out: Path) -> None:
    assert run(out, "--variant", "grid", "--trials", "6") == 0
    df = rows(out)
    assert len(df) == 6 and (df["seed"] == 0).all()
    assert not df.duplicated(["param_x", "param_y"]).any()


def test_workers_share_a_journal_study_exactly(out: Path, capsys) -> None:
    assert run(out, "--trials", "7", "--workers", "3", "--pruner", "none",
               "--set", "sleep_s=0.05") == 0
    assert "optuna.journal" in capsys.readouterr().out
    df = rows(out)
    assert sorted(df["trial_number"]) == list(range(7)) and (df["state"] == "COMPLETE").all()
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(
        str(out / "synthetic" / "optuna.journal")))
    trials = optuna.load_study(study_name="synthetic", storage=storage).get_trials()
    assert len(trials) == 7 and all(t.state.name == "COMPLETE" for t in trials)


def test_sqlite_with_several_workers_is_refused_before_anything_is_written(out: Path) -> None:
    res = bench_cli("run", "synthetic", "--out", str(out), "--workers", "2",
                    "--storage", f"sqlite:///{out}/x.db")
    assert res.returncode == 2
    assert "SQLite cannot take 2 writing processes" in res.stderr
    assert "Traceback" not in res.stderr and not out.exists()


@pytest.mark.parametrize("sampler", ["random", "cmaes", "qmc"])
def test_samplers(out: Path, sampler: str) -> None:
    assert run(out, "--trials", "3", "--sampler", sampler, "--pruner", "none") == 0
    assert (rows(out)["sampler"] == sampler).all() and len(rows(out)) == 3


def test_grid_sampler_and_hyperband(out: Path, tmp_path: Path) -> None:
    space = tmp_path / "s.yaml"
    space.write_text("task: synthetic\nparams:\n  x: {type: float, low: 0, high: 1, step: 0.5}\n"
                     "  y: {type: categorical, choices: [0.0, 1.0]}\n")
    assert run(out, "--space", str(space), "--sampler", "grid", "--trials", "6",
               "--pruner", "hyperband") == 0
    df = rows(out)
    assert sorted(zip(df["param_x"], df["param_y"], strict=True)) == [
        (x, y) for x in (0.0, 0.5, 1.0) for y in (0.0, 1.0)]
