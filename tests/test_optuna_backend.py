"""The Optuna backend end to end on the synthetic task: states, totals, resume, kills,
signals, variants, workers, storages."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
import uuid
from contextlib import closing, suppress
from pathlib import Path

import optuna
import pandas as pd
import pytest
from conftest import bench_cli
from optuna.trial import TrialState

from bench import leaderboard, signals
from bench.cli import main


def run(out: Path, *args: str) -> int:
    return main(["run", "synthetic", "--out", str(out), "--quiet", *args])


def rows(out: Path, **kw) -> pd.DataFrame:
    return leaderboard.read_trials(out, "synthetic", **kw)


def study_trials(out: Path, name: str = "synthetic", journal: bool = False) -> list:
    if journal:
        storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(
            str(out / "synthetic" / "optuna.journal")))
    else:
        storage = f"sqlite:///{out / 'synthetic' / 'optuna.db'}"
    return optuna.load_study(study_name=name, storage=storage).get_trials(deepcopy=False)


def test_search_writes_one_row_per_trial_with_seeds(out: Path) -> None:
    assert run(out, "--trials", "4", "--seed", "7") == 0
    df = rows(out).sort_values("trial_number")
    assert list(df["trial_number"]) == [0, 1, 2, 3]
    assert list(df["seed"]) == [7, 8, 9, 10]
    assert (df["state"] == "COMPLETE").all() and df["error"].isna().all()
    x, y = df["param_x"], df["param_y"]
    expected = (1 - x) ** 2 + 100 * (y - x * x) ** 2
    assert df["objective"].tolist() == pytest.approx(expected.tolist())
    assert (df["backend"] == "optuna").all() and (df["sampler"] == "tpe").all()
    assert df["config_hash"].is_unique and (df["epochs_done"] == 5).all()
    assert df["study_uid"].nunique() == 1 and df["study_uid"].iloc[0]
    trials = study_trials(out)
    assert {t.number: t.value for t in trials} == dict(
        zip(df["trial_number"], df["objective"], strict=True))
    # what optuna-dashboard shows: the row's uid, seed, final metrics
    t0 = trials[0]
    assert t0.user_attrs["bench"]["uid"] == df.iloc[0]["trial_uid"]
    assert t0.user_attrs["metric_distance"] == pytest.approx(df.iloc[0]["metric_distance"])


def test_exception_and_nan_fail_the_trial_and_the_study_goes_on(out: Path, capsys) -> None:
    assert run(out, "--trials", "2", "--set", "fail=exception", "--set", "fail_at=1") == 1
    assert "every trial of this run failed" in capsys.readouterr().err
    assert run(out, "--trials", "2", "--set", "fail=nan", "--study", "nan") == 1
    assert run(out, "--add", "2", "--study", "nan") == 0  # the same study carries on
    df = rows(out)
    exc = df[df["study"] == "synthetic"]
    assert (exc["state"] == "FAIL").all()
    assert exc["error"].str.contains("RuntimeError: injected failure at step 1").all()
    assert (exc["epochs_done"] == 1).all()
    nan = df[df["study"] == "nan"].sort_values("trial_number")
    assert list(nan["state"]) == ["FAIL", "FAIL", "COMPLETE", "COMPLETE"]
    assert nan["error"].iloc[0] == "FloatingPointError: non-finite loss=nan at epoch 0"
    assert [t.state.name for t in study_trials(out, "nan")] == list(nan["state"])


def test_pruned_trials_get_rows_with_their_last_value(out: Path) -> None:
    assert run(out, "--trials", "20", "--sampler", "random", "--set", "epochs=6") == 0
    df = rows(out)
    pruned = df[df["state"] == "PRUNED"]
    assert len(pruned) > 0, "median pruning stops the worse random trials"
    assert (pruned["epochs_done"] < 6).all() and pruned["objective"].notna().all()
    assert pruned["error"].str.startswith("pruned at step").all()
    assert {t.number for t in study_trials(out) if t.state.name == "PRUNED"} == set(
        pruned["trial_number"])


def test_a_rerun_continues_to_the_same_total_and_add_asks_for_more(out: Path,
                                                                    capsys) -> None:
    assert run(out, "--trials", "3") == 0
    assert run(out, "--trials", "3") == 0
    assert "nothing to do" in capsys.readouterr().err
    assert len(rows(out)) == 3
    assert run(out, "--trials", "5") == 0
    assert run(out, "--add", "2") == 0
    df = rows(out)
    assert sorted(df["trial_number"]) == list(range(7)) and df["trial_uid"].is_unique
    assert "(target 7)" in capsys.readouterr().out


def test_a_rerun_with_other_set_values_is_refused_not_mixed_into_the_study(out: Path,
                                                                          capsys) -> None:
    assert run(out, "--trials", "2", "--set", "epochs=2") == 0
    capsys.readouterr()
    for args in (["--set", "epochs=3"], [], ["--set", "epochs=2", "--set", "noise=0.1"]):
        assert run(out, "--add", "1", *args) == 2
        err = capsys.readouterr().err
        assert "is one configuration, and this run would train another" in err, err
        assert "--study NEW" in err
    assert "epochs: the study's 2, this run's 5" in run_err(out, capsys, "--add", "1")
    assert len(study_trials(out)) == 2 and len(rows(out)) == 2
    # the study's values continue it, whatever the spelling; execution parameters may change
    assert run(out, "--add", "1", "--set", "epochs=2.0", "--set", "sleep_s=0.01") == 0
    assert run(out, "--add", "1", "--set", "epochs=2", "--set", "noise=0") == 0  # the default
    assert run(out, "--study", "e3", "--trials", "1", "--set", "epochs=3") == 0
    assert sorted(rows(out)["study"]) == ["e3", *["synthetic"] * 4]
    done = rows(out, study="synthetic")
    assert done["config_hash"].nunique() == 4, "x and y vary; sleep_s is not configuration"


def run_err(out: Path, capsys, *args: str) -> str:
    assert run(out, *args) == 2
    return capsys.readouterr().err


def test_a_study_from_before_the_record_takes_it_from_its_trials(out: Path, capsys) -> None:
    assert run(out, "--trials", "2", "--set", "epochs=2") == 0
    storage = optuna.storages.RDBStorage(f"sqlite:///{out / 'synthetic' / 'optuna.db'}")
    study_id = storage.get_study_id_from_name("synthetic")
    with storage.engine.begin() as conn:  # as a study written by an earlier bench
        conn.exec_driver_sql("DELETE FROM study_user_attributes WHERE study_id = ? AND "
                             "key = 'bench_study_config'", (study_id,))
    capsys.readouterr()
    assert "epochs: the study's 2, this run's 5" in run_err(out, capsys, "--add", "1")
    assert run(out, "--add", "1", "--set", "epochs=2") == 0


def test_a_parameter_added_later_leaves_older_studies_and_rows_one_configuration(
        out: Path, capsys, monkeypatch) -> None:
    """A task gains a parameter (`since=`) whose default is its old behaviour: a study and
    rows from before it continue and read as before; only another value is another
    configuration."""
    from bench.lifecycle import config_hash
    from bench.params import Float
    from bench.registry import get_task

    assert run(out, "--trials", "1", "--set", "epochs=2") == 0
    task = get_task("synthetic")
    monkeypatch.setitem(task.params, "new_knob", Float(0.0, since="2026-12-01"))
    capsys.readouterr()
    assert run(out, "--add", "1", "--set", "epochs=2") == 0, capsys.readouterr().err
    assert ("new_knob: the study's 0.0 (the default; the parameter was added 2026-12-01), "
            "this run's 0.5") in run_err(
        out, capsys, "--add", "1", "--set", "epochs=2", "--set", "new_knob=0.5")
    df = rows(out)
    assert len(df) == 2 and list(df["param_new_knob"]) == [0.0, 0.0]  # the old row: filled
    old = {"x": 1.0, "y": 2.0, "epochs": 2}  # a trial's parameters from before new_knob
    assert config_hash("synthetic", {**old, "new_knob": 0.0}) == config_hash("synthetic", old)
    assert config_hash("synthetic", {**old, "new_knob": 0.5}) != config_hash("synthetic", old)


def test_a_grid_that_gains_an_added_parameter_as_an_axis_keeps_its_points(
        out: Path, tmp_path: Path, monkeypatch) -> None:
    """A variant's grid gains a parameter added later (`since=`) as an axis: the study's
    points from before it are its default's points (not enqueued again), only the new
    value's points run, and a trial suspended before the change resumes at the default."""
    from bench.params import Float
    from bench.registry import get_task

    space = tmp_path / "s.yaml"
    grid = "{x: [-1.0, 1.0]}"
    text = ("task: synthetic\nmetric: loss\ndirection: minimize\nfixed: {epochs: 2}\n"
            "params:\n  x: {type: float, low: -2.0, high: 2.0}\n"
            "variants:\n  g:\n    grid: %s\n    seeds: 2\n")
    space.write_text(text % grid)
    proc = _spawn(out, "--space", str(space), "--variant", "g")  # 10 epochs of 0.3 s
    _wait(lambda: len(rows(out)) >= 1 and _running(out, "synthetic.g"), proc,
          what="a finished and a running trial")
    proc.send_signal(signal.SIGINT)  # the running trial is saved and suspended
    assert proc.wait(timeout=60) == 130
    suspended = [t.number for t in study_trials(out, "synthetic.g")
                 if t.state == TrialState.RUNNING]
    assert suspended
    monkeypatch.setitem(get_task("synthetic").params, "new_knob",
                        Float(0.0, since="2026-12-01"))
    space.write_text(text % "{x: [-1.0, 1.0], new_knob: [0.0, 0.5]}")
    again = ("--space", str(space), "--variant", "g", "--set", "epochs=10", "--set", "sleep_s=0")
    assert run(out, *again) == 0
    df = rows(out, study="synthetic.g")
    assert len(df) == 8, df[["trial_number", "param_x", "param_new_knob"]]
    assert sorted(zip(df["param_x"], df["param_new_knob"], strict=True)) == sorted(
        [(x, k) for x in (-1.0, 1.0) for k in (0.0, 0.5)] * 2)
    resumed = df[df["trial_number"].isin(suspended)]
    assert len(resumed) == len(suspended) and (resumed["param_new_knob"] == 0.0).all()
    assert run(out, *again) == 0  # nothing left to run
    assert len(rows(out, study="synthetic.g")) == 8


def test_same_configuration_different_execution_parameters_is_one_board_row(
        out: Path, capsys) -> None:
    assert run(out, "--variant", "grid", "--set", "sleep_s=0.01", "--trials", "3") == 0
    assert run(out, "--variant", "grid", "--set", "sleep_s=0") == 0
    df = rows(out, study="synthetic.grid")
    assert len(df) == 12 and df.groupby("config_hash")["seed"].nunique().eq(2).all()
    capsys.readouterr()
    assert main(["board", "synthetic", "--out", str(out), "--study", "synthetic.grid"]) == 0
    shown = capsys.readouterr().out
    assert "sleep_s" not in shown and shown.count(" 2 ") >= 6, shown


def test_a_recorded_rerun_is_a_row_whose_artifacts_live_in_the_leaderboard(out: Path) -> None:
    assert run(out, "--trials", "1") == 0
    [uid] = rows(out)["trial_uid"]
    assert main(["rerun", uid, "--out", str(out), "--record"]) == 0
    again = rows(out, study="synthetic.rerun")
    assert len(again) == 1 and again["objective"].iloc[0] == rows(out, study="synthetic")[
        "objective"].iloc[0]
    assert (out / "synthetic" / "artifacts" / again["trial_uid"].iloc[0]).is_dir()


def test_a_resumed_search_does_not_replay_its_first_points(out: Path) -> None:
    assert run(out, "--trials", "2", "--sampler", "random") == 0
    assert run(out, "--add", "2", "--sampler", "random") == 0
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


def _wait(cond, proc: subprocess.Popen, timeout_s: float = 60, what: str = "") -> None:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        assert proc.poll() is None, proc.communicate()
        if cond():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def _resume_files(out: Path) -> list[Path]:
    return list((out / "synthetic" / "artifacts").glob("*/resume.pt"))


def _spawn(out: Path, *args: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "bench.cli", "run", "synthetic", "--out", str(out), "--quiet",
           "--set", "sleep_s=0.3", "--set", "epochs=10", *args]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_kill_9_before_any_saved_state_marks_the_trial_fail(out: Path) -> None:
    proc = _spawn(out, "--trials", "3")  # state saved at most every 60 s: none yet
    _wait(lambda: _running(out, "synthetic"), proc, what="a running trial")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed = [t.number for t in study_trials(out) if t.state.name == "RUNNING"]
    assert len(killed) == 1
    res = bench_cli("run", "synthetic", "--out", str(out), "--quiet", "--trials", "2",
                    "--set", "epochs=10", "--set", "sleep_s=0")  # the study's epochs
    assert res.returncode == 0, res.stderr
    assert f"marked FAIL (left RUNNING by a killed run, nothing saved to resume from): " \
           f"trials {killed}" in res.stderr
    assert [t.state.name for t in study_trials(out)] == ["FAIL", "COMPLETE"]
    df = rows(out).set_index("trial_number")
    assert df.loc[killed[0], "state"] == "FAIL" and "the run died" in df.loc[killed[0], "error"]


def test_kill_9_after_a_saved_epoch_resumes_the_trial_there(out: Path) -> None:
    proc = _spawn(out, "--trials", "1", "--checkpoint-every", "0")
    _wait(lambda: _resume_files(out), proc, what="a saved state")
    time.sleep(0.5)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    # the trial's identity reached the study before its first state was saved: the state
    # lies in the folder its record names
    [killed] = study_trials(out)
    [state] = _resume_files(out)
    assert state.parent.name == killed.user_attrs["bench"]["uid"]
    res = bench_cli("run", "synthetic", "--out", str(out), "--quiet", "--trials", "1",
                    "--set", "sleep_s=0.3", "--set", "epochs=10")
    assert res.returncode == 0, res.stderr
    assert "resuming trials [0]" in res.stderr
    df = rows(out)
    assert len(df) == 1 and df["state"].iloc[0] == "COMPLETE" and df["attempts"].iloc[0] == 2
    assert df["trial_uid"].iloc[0] == state.parent.name
    curve = leaderboard.read_curves(out, "synthetic")
    assert sorted(curve["step"]) == list(range(10)), "each epoch once, none lost or doubled"
    assert [t.state.name for t in study_trials(out)] == ["COMPLETE"]


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
    res = bench_cli("run", "synthetic", "--out", str(out), "--quiet", "--trials", "2",
                    "--set", "epochs=2")
    assert res.returncode == 0, res.stderr
    assert "repaired the record of trials [0]" in res.stderr
    again = study_trials(out)[0]
    assert again.state.name == "COMPLETE" and again.value == pytest.approx(first.value)
    df = rows(out)
    assert len(df) == 2 and (df["state"] == "COMPLETE").all()


@pytest.mark.parametrize("sig,code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_saves_the_running_trial_and_the_rerun_resumes_it(out: Path, sig: int,
                                                                   code: int) -> None:
    proc = _spawn(out, "--trials", "2")
    _wait(lambda: _running(out, "synthetic"), proc, what="a running trial")
    time.sleep(0.5)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == code, err
    assert "run the same command again to resume them" in err
    assert rows(out).empty, "an interrupted trial is not finished: no row"
    [t] = study_trials(out)
    assert t.state.name == "RUNNING" and t.user_attrs["suspended"]
    res = bench_cli("run", "synthetic", "--out", str(out), "--quiet", "--trials", "2",
                    "--set", "sleep_s=0.01", "--set", "epochs=10")
    assert res.returncode == 0, res.stderr
    df = rows(out).sort_values("trial_number")
    assert list(df["state"]) == ["COMPLETE", "COMPLETE"]
    assert list(df["attempts"]) == [2, 1]
    curve = leaderboard.read_curves(out, "synthetic", [df["trial_uid"].iloc[0]])
    assert sorted(curve["step"]) == list(range(10))


def test_a_second_ctrl_c_stops_at_once_and_the_trial_still_resumes(out: Path) -> None:
    proc = _spawn(out, "--trials", "1", "--set", "sleep_s=6")  # an epoch: 6 s
    _wait(lambda: _running(out, "synthetic"), proc, what="a running trial")
    proc.send_signal(signal.SIGINT)
    time.sleep(0.3)
    t0 = time.time()
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=60)
    # at once: well before the epoch's 6 s (the exit itself takes ~1 s on 2 loaded cores)
    assert proc.returncode == 130 and time.time() - t0 < 3.5, "it waited for the epoch"
    [t] = study_trials(out)
    assert t.state.name == "RUNNING" and t.user_attrs["suspended"]
    assert run(out, "--trials", "1", "--set", "sleep_s=0", "--set", "epochs=10") == 0
    assert list(rows(out)["state"]) == ["COMPLETE"]


def test_a_stop_requested_before_a_trial_starts_starts_none(out: Path) -> None:
    signals.request_stop(signal.SIGINT)
    assert run(out, "--trials", "2") == 130
    assert rows(out).empty and study_trials(out) == []


def test_variant_runs_each_point_once_per_seed_even_across_a_kill(out: Path) -> None:
    proc = _spawn(out, "--variant", "grid", "--set", "sleep_s=0.05", "--set", "epochs=3")
    _wait(lambda: len(rows(out)) >= 3, proc, what="three rows")
    _wait(lambda: _running(out, "synthetic.grid"), proc, what="a running trial")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert run(out, "--variant", "grid", "--set", "epochs=3") == 0
    assert run(out, "--variant", "grid", "--set", "epochs=3") == 0  # nothing left to do
    df = rows(out, study="synthetic.grid")
    done = df[df["state"] == "COMPLETE"]
    assert len(done) == 12  # 6 points x 2 seeds
    assert not done.duplicated(["param_x", "param_y", "seed"]).any()
    assert set(done["seed"]) == {0, 1}
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
    trials = study_trials(out, journal=True)
    assert len(trials) == 7 and all(t.state.name == "COMPLETE" for t in trials)
    # one study whatever the worker count: one worker reopens the journal's study
    assert run(out, "--trials", "9") == 0
    assert len(study_trials(out, journal=True)) == 9
    assert not (out / "synthetic" / "optuna.db").exists()


def test_more_workers_on_an_sqlite_study_are_refused_not_forked(out: Path) -> None:
    assert run(out, "--trials", "1") == 0
    res = bench_cli("run", "synthetic", "--out", str(out), "--trials", "3", "--workers", "2")
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "lives in" in res.stderr and "cannot take 2 writing processes" in res.stderr
    assert not (out / "synthetic" / "optuna.journal").exists()


def test_sqlite_with_several_workers_is_refused_before_anything_is_written(out: Path) -> None:
    res = bench_cli("run", "synthetic", "--out", str(out), "--workers", "2",
                    "--storage", f"sqlite:///{out}/x.db")
    assert res.returncode == 2
    assert "SQLite cannot take 2 writing processes" in res.stderr
    assert "Traceback" not in res.stderr and not out.exists()


def test_sigterm_to_the_parent_reaches_the_workers_and_all_resume(out: Path) -> None:
    proc = _spawn(out, "--trials", "4", "--workers", "2")
    journal = out / "synthetic" / "optuna.journal"
    _wait(lambda: journal.exists() and journal.read_text().count('"op_code":4') >= 2, proc,
          what="two running trials")  # op 4: a trial's param was set
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    suspended = [t for t in study_trials(out, journal=True) if t.user_attrs.get("suspended")]
    assert len(suspended) == 2
    res = bench_cli("run", "synthetic", "--out", str(out), "--quiet", "--trials", "4",
                    "--workers", "2", "--set", "sleep_s=0.01", "--set", "epochs=10")
    assert res.returncode == 0, res.stderr
    df = rows(out)
    assert len(df) == 4 and (df["state"] == "COMPLETE").all()
    assert sorted(df["attempts"]) == [1, 1, 2, 2]


def test_timeout_stops_starting_trials(out: Path, capsys) -> None:
    t0 = time.time()
    assert run(out, "--trials", "50", "--timeout", "1", "--set", "sleep_s=0.1",
               "--set", "epochs=3") == 0
    assert time.time() - t0 < 10
    n = len(rows(out))
    assert 1 <= n < 50


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


def test_a_sampled_combination_breaking_a_rule_fails_alone(out: Path, tmp_path: Path) -> None:
    """Cross-parameter rules of searched values are checked per trial, before training."""
    from bench.registry import get_task

    task = get_task("synthetic")
    old = task.rules
    object.__setattr__(task, "rules", lambda p: ["x: must not exceed y"] if p["x"] > p["y"]
                       else [])
    space = tmp_path / "s.yaml"
    space.write_text("task: synthetic\nparams:\n  x: {type: float, low: -2, high: 2}\n"
                     "  y: {type: float, low: -2, high: 2}\n")
    try:
        assert run(out, "--trials", "6", "--sampler", "random", "--pruner", "none",
                   "--space", str(space)) in (0, 1)
    finally:
        object.__setattr__(task, "rules", old)
    df = rows(out)
    bad = df[df["param_x"] > df["param_y"]]
    assert len(bad) and (bad["state"] == "FAIL").all()
    assert bad["error"].str.contains("ConfigError: x: must not exceed y").all()
    assert (df[df["param_x"] <= df["param_y"]]["state"] == "COMPLETE").all()


def test_storage_identity_a_replaced_study_file_is_refused(out: Path) -> None:
    assert run(out, "--trials", "1") == 0
    db = out / "synthetic" / "optuna.db"
    db.write_bytes(b"")
    res = bench_cli("run", "synthetic", "--out", str(out), "--trials", "1")
    assert res.returncode == 2 and "empty (0 bytes)" in res.stderr, res.stderr
    db.unlink()
    res = bench_cli("run", "synthetic", "--out", str(out), "--trials", "1")
    assert res.returncode == 2 and "does not hold it" in res.stderr, res.stderr
    assert not db.exists(), "refused before an empty study was created in its place"
    assert len(rows(out)) == 1
    record = json.loads((out / "synthetic" / ".studies" / "synthetic.json").read_text())
    assert record["uid"] == rows(out)["study_uid"].iloc[0]


def test_a_study_name_cannot_leave_the_leaderboard(out: Path, tmp_path: Path) -> None:
    for name in ("../../x", "a/b", str(tmp_path / "abs"), ".hidden", "x" * 101):
        res = bench_cli("run", "synthetic", "--out", str(out), "--study", name)
        assert res.returncode == 2 and "--study" in res.stderr, (name, res.stderr)
    assert not out.exists() and not (tmp_path / "abs").exists()


def test_a_planted_state_file_is_refused_not_run(out: Path, tmp_path: Path) -> None:
    """A resume state must be plain data: a pickled payload is never executed."""
    proc = _spawn(out, "--trials", "1", "--checkpoint-every", "0")
    _wait(lambda: _resume_files(out), proc, what="a saved state")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    import pickle

    [state] = _resume_files(out)
    state.write_bytes(pickle.dumps(Payload()))
    res = bench_cli("run", "synthetic", "--out", str(out), "--quiet", "--trials", "1",
                    "--set", "sleep_s=0.3", "--set", "epochs=10")
    assert not marker.exists(), "the payload ran"
    assert res.returncode == 1
    df = rows(out)
    assert df["state"].iloc[0] == "FAIL" and "refusing to load" in df["error"].iloc[0]


def _postgres_url() -> str:
    url = os.environ.get("BENCH_TEST_POSTGRES", "postgresql://bench:bench@localhost:5432/bench")
    try:
        import psycopg2

        psycopg2.connect(url, connect_timeout=3).close()
    except Exception as exc:  # noqa: BLE001 - no driver or no server: skip with the reason
        pytest.skip(f"no PostgreSQL answers at {url} ({type(exc).__name__}); "
                    "slurm/local-postgres.sh starts one")
    return url


def _study_url(kind: str, tmp_path: Path) -> str:
    return {"sqlite": f"sqlite:///{tmp_path}/s.db", "journal": f"journal:{tmp_path}/s.journal",
            "postgres": _postgres_url() if kind == "postgres" else ""}[kind]


@pytest.mark.parametrize("kind", ["sqlite", "journal",
                                  pytest.param("postgres", marks=pytest.mark.postgres)])
def test_user_attributes_written_at_once_read_back_in_any_optuna(tmp_path: Path,
                                                                 kind: str) -> None:
    """The metrics, result and flags of a trial go to the storage in one write (one
    multi-row upsert on SQL, one journal append), a key written twice holds its second
    value, and a plain Optuna storage opened afterwards (optuna-dashboard's view) reads every
    one of them; the trial count the run's target check uses agrees with Optuna's."""
    import optuna

    from bench.backends.optuna import count_trials, open_storage, set_user_attrs

    name = f"s-{uuid.uuid4().hex[:8]}"
    url = _study_url(kind, tmp_path)
    study = optuna.create_study(storage=open_storage(url), study_name=name)
    try:
        trial = study.ask()
        set_user_attrs(trial, {"metric_loss": 9.0, "bench_trial": {"uid": "u1"}})
        attrs = {"metric_loss": 0.25, "metric_distance": 1.5, "bench_result": {
            "state": "COMPLETE", "objective": 0.25, "error": None}, "suspended": False}
        set_user_attrs(trial, attrs)
        attrs = {"bench_trial": {"uid": "u1"}, **attrs}
        assert trial.user_attrs == attrs
        running = study.ask()
        assert count_trials(study, (TrialState.RUNNING,)) == 2
        study.tell(trial, 0.25)
        assert count_trials(study, (TrialState.COMPLETE,)) == 1
        assert count_trials(study, (TrialState.COMPLETE, TrialState.RUNNING)) == 2
        plain = (url if kind != "journal" else optuna.storages.JournalStorage(
            optuna.storages.journal.JournalFileBackend(f"{tmp_path}/s.journal")))
        t = optuna.load_study(study_name=name, storage=plain).get_trials()[0]
        assert t.user_attrs == attrs and t.value == 0.25
        done = study.get_trials()[0]
        with pytest.raises(Exception, match="finished|Cannot"):  # a finished trial is kept
            set_user_attrs(optuna.Trial(study, done._trial_id), {"metric_loss": 9.0})
        assert running.number == 1
    finally:
        if kind == "postgres":
            optuna.delete_study(study_name=name, storage=url)


@pytest.mark.parametrize("kind", ["sqlite", "journal",
                                  pytest.param("postgres", marks=pytest.mark.postgres)])
def test_runs_sharing_a_study_reach_its_total_exactly(tmp_path: Path, kind: str) -> None:
    """Three runs of a 2-trial study, each pausing 3 s between counting the study's trials
    and asking for one (`BENCH_PAUSE=ask`): the window in which, unserialised, all three
    saw room and asked (CI once had 14 trials of a 13-trial study on PostgreSQL). Together
    they run exactly the total, as the README promises."""
    from bench.backends.optuna import open_storage

    name = f"s-{uuid.uuid4().hex[:8]}"
    url = _study_url(kind, tmp_path)
    out = tmp_path / "lb"
    cmd = [sys.executable, "-m", "bench.cli", "run", "synthetic", "--out", str(out), "--quiet",
           "--storage", url, "--study", name, "--trials", "2", "--pruner", "none",
           "--set", "epochs=2", "--set", "sleep_s=0.05"]
    env = {**os.environ, "BENCH_PAUSE": "ask", "BENCH_PAUSE_S": "3"}
    try:
        procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True) for _ in range(3)]
        for p in procs:
            text, _ = p.communicate(timeout=240)
            assert p.returncode == 0, text
        trials = optuna.load_study(study_name=name, storage=open_storage(url)).get_trials()
        assert [t.state.name for t in trials] == ["COMPLETE", "COMPLETE"], trials
        df = leaderboard.read_trials(out, "synthetic", study=name)
        assert sorted(df["trial_number"]) == [0, 1]
    finally:
        if kind == "postgres":
            with suppress(KeyError):
                optuna.delete_study(study_name=name, storage=url)


@pytest.mark.parametrize("kind", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def test_a_run_waiting_for_the_claim_lock_still_stops_on_ctrl_c(tmp_path: Path,
                                                                 kind: str) -> None:
    """Another run holds the study's claim lock and hangs (stopped with Ctrl-Z, a lost
    host): a run waiting for it stops on SIGINT, within a second or two, asking nothing."""
    import fcntl

    import psycopg2

    from bench.backends.optuna import _CLAIM_NAMESPACE, open_storage

    name = f"s-{uuid.uuid4().hex[:8]}"
    out = tmp_path / "lb"
    url = (_postgres_url() if kind == "postgres"
           else f"sqlite:///{out / 'synthetic' / 'optuna.db'}")
    if kind == "sqlite":
        (out / "synthetic").mkdir(parents=True)
    study = optuna.create_study(storage=open_storage(url), study_name=name)
    held = []
    try:
        if kind == "postgres":  # a session-level lock on the same key
            conn = psycopg2.connect(url)
            conn.cursor().execute("SELECT pg_advisory_lock(%s, %s)",
                                  (_CLAIM_NAMESPACE, study._study_id))
            held.append(conn)
        else:
            fh = open(out / "synthetic" / f".{name}.claim", "a")  # noqa: SIM115
            fcntl.flock(fh, fcntl.LOCK_EX)
            held.append(fh)
        proc = subprocess.Popen(
            [sys.executable, "-m", "bench.cli", "run", "synthetic", "--out", str(out), "--quiet",
             "--storage", url, "--study", name, "--trials", "2", "--set", "epochs=2"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(6)  # started, opened the study, waiting for the lock
        assert proc.poll() is None, proc.communicate()
        proc.send_signal(signal.SIGINT)
        t0 = time.time()
        _, err = proc.communicate(timeout=30)
        assert time.time() - t0 < 5 and proc.returncode == 130, err
        assert study.get_trials() == []
    finally:
        for h in held:
            h.close()
        if kind == "postgres":
            with suppress(KeyError):
                optuna.delete_study(study_name=name, storage=url)


def test_a_trial_that_saves_no_state_writes_its_identity_with_its_result(out: Path) -> None:
    """One storage write fewer per trial: a trial that finishes without saving a resume
    state records its identity (uid, seed) in the same journal append as its result."""
    journal = out / "synthetic" / "optuna.journal"
    assert run(out, "--trials", "3", "--storage", str(journal), "--set",
               "epochs=2") == 0
    lines = [json.loads(x) for x in
             journal.read_text().splitlines()]
    attrs = [(i, x["trial_id"], next(iter(x["user_attr"]))) for i, x in enumerate(lines)
             if "user_attr" in x and "trial_id" in x]
    df = rows(out).set_index("trial_number")
    for t in study_trials(out, journal=True):
        mine = [(i, key) for i, tid, key in attrs if tid == t._trial_id]
        assert [key for _, key in mine].count("bench") == 1
        block = [i for i, _ in mine]
        assert block == list(range(block[0], block[0] + len(block))), "one contiguous append"
        assert {"bench", "bench_result"} <= {key for _, key in mine}
        assert df.loc[t.number, "trial_uid"] == t.user_attrs["bench"]["uid"]
        assert df.loc[t.number, "seed"] == t.user_attrs["bench"]["seed"] == t.number


def test_a_journal_url_given_to_storage_names_the_same_file(out: Path, tmp_path: Path,
                                                            monkeypatch) -> None:
    """`--storage journal:PATH` (the URL form) and `--storage PATH` are one journal file;
    the prefix never becomes a folder named `journal:` in the working directory."""
    monkeypatch.chdir(tmp_path)
    target = tmp_path / "s.journal"
    assert run(out, "--trials", "1", "--storage", f"journal:{target}") == 0
    assert run(out, "--trials", "2", "--storage", str(target)) == 0
    assert target.exists() and not (tmp_path / "journal:").exists()
    assert len(rows(out)) == 2
