"""One contract for every backend (Optuna's habit of testing every storage through one
suite): the same plan gives one row per finished trial, PRUNED rows with their last value,
each (point, seed) of a variant exactly once, and a rerun continues to the same total."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest

from bench import leaderboard
from bench.backends._base import RunResult, get_backend
from bench.plan import RunOptions, make_plan

BACKENDS = ["optuna", pytest.param("ray", marks=pytest.mark.ray)]




@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    if request.param == "ray":
        request.getfixturevalue("ray_cluster")
    return str(request.param)


def run(backend: str, out: Path, **kw: Any) -> RunResult:
    opts = RunOptions(task="synthetic", out=out, progress=False, backend=backend,
                      overrides={"sleep_s": 0.01}, extra={"cpus_per_trial": 1}
                      if backend == "ray" else {})
    opts = dataclasses.replace(opts, **kw)
    return get_backend(backend).run(make_plan(opts))


def test_one_row_per_finished_trial_and_pruned_rows(backend: str, out: Path) -> None:
    result = run(backend, out, trials=12, sampler="random",
                 pruner="asha" if backend == "ray" else "median",
                 overrides={"sleep_s": 0.01, "epochs": 6})
    assert result.exit_code == 0
    rows = leaderboard.read_trials(out, "synthetic")
    assert len(rows) == 12 and rows["trial_uid"].is_unique
    assert sorted(rows["trial_number"]) == list(range(12))
    assert set(rows["backend"]) == {backend}
    assert set(rows["state"]) <= {"COMPLETE", "PRUNED"}
    pruned, done = rows[rows["state"] == "PRUNED"], rows[rows["state"] == "COMPLETE"]
    assert len(pruned) >= 1 and len(done) >= 1
    assert (pruned["epochs_done"] < 6).all() and (done["epochs_done"] == 6).all()
    curves = leaderboard.read_curves(out, "synthetic")
    for _, r in pruned.iterrows():  # a pruned trial's objective is its last reported value
        c = curves[(curves["trial_uid"] == r["trial_uid"]) & (curves["metric"] == "loss")]
        assert len(c) == r["epochs_done"]
        assert r["objective"] == pytest.approx(c.sort_values("step")["value"].iloc[-1])
    assert done["metric_distance"].notna().all()


def test_a_variant_runs_each_point_and_seed_once(backend: str, out: Path) -> None:
    run(backend, out, variant="grid", sampler="random")
    rows = leaderboard.read_trials(out, "synthetic", study="synthetic.grid")
    assert len(rows) == 12 and set(rows["state"]) == {"COMPLETE"}  # 6 points x 2 seeds
    pairs = set(zip(rows["param_x"], rows["param_y"], rows["seed"], strict=True))
    assert len(pairs) == 12 and set(rows["seed"]) == {0, 1}
    assert set(rows["pruner"]) == {"none"}


def test_a_rerun_continues_to_the_same_total(backend: str, out: Path) -> None:
    run(backend, out, trials=3, pruner="none")
    again = run(backend, out, trials=3, pruner="none")
    assert again.exit_code == 0
    rows = leaderboard.read_trials(out, "synthetic")
    assert len(rows) == 3 and rows["trial_uid"].is_unique


def test_a_study_is_one_configuration(backend: str, out: Path) -> None:
    """A rerun with another fixed value is refused, naming it; nothing is run or written;
    an execution parameter (synthetic's step time) may change."""
    from bench.errors import ConfigError

    run(backend, out, trials=2, pruner="none", overrides={"sleep_s": 0.01, "epochs": 2})
    before = sorted(p.name for p in (out / "synthetic" / "trials").iterdir())
    with pytest.raises(ConfigError) as err:
        run(backend, out, trials=3, pruner="none", overrides={"sleep_s": 0.01, "epochs": 3})
    assert err.value.exit_code == 2
    assert "epochs: the study's 2, this run's 3" in str(err.value)
    assert sorted(p.name for p in (out / "synthetic" / "trials").iterdir()) == before
    again = run(backend, out, trials=2, pruner="none", overrides={"sleep_s": 0.0, "epochs": 2})
    assert again.exit_code == 0  # continued (a Ray experiment is restored to its total)
    assert len(leaderboard.read_trials(out, "synthetic")) == 2
