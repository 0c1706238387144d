"""Search-space YAML: every rule, every error at once, and the conversion to Optuna."""

from __future__ import annotations

import math
from pathlib import Path

import optuna
import pytest
import yaml

from bench.errors import ConfigError
from bench.registry import get_task
from bench.space import Param, load_space, parse_overrides, parse_space, space_for

BAD = """
task: vae
direction: sideways
colour: blue
fixed: {epochs: 2, not_a_param: 1}
params:
  beta: {type: float, low: 10, high: 1}
  lr: {type: float, low: 0, high: 1.0, log: true}
  latent_dim: {type: int, low: 2.5, high: 8}
  width: {type: categorical, choices: []}
  depth: {type: int, low: 1, high: 3, lgo: true}
variants:
  sweep: {grid: {beta: 0.1}, seeds: 0, colour: red}
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "space.yaml"
    path.write_text(text)
    return path


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    path = write(tmp_path, BAD)
    with pytest.raises(ConfigError) as err:
        load_space(path)
    problems = err.value.problems
    expected = [
        "direction: must be minimize or maximize, got 'sideways'",
        "unknown top-level key `colour`",
        "fixed.not_a_param: `not_a_param` is not a parameter of task 'vae'",
        "params.beta: `low <= high` must hold, got low=10, high=1",
        "params.lr: `log: true` needs `low > 0`, got low=0",
        "params.latent_dim.low: must be an integer for type int, got 2.5",
        "params.width.choices: must be a non-empty list",
        "params.depth: unknown key `lgo`",
        "variants.sweep.grid.beta: must be a non-empty list of values, got 0.1",
        "variants.sweep.seeds: must be an integer >= 1, got 0",
        "variants.sweep: unknown key `colour`",
    ]
    for fragment in expected:
        assert any(fragment in p for p in problems), (fragment, problems)
    assert all(p.startswith(str(path)) for p in problems), "every problem names the file"
    assert len(problems) == len(expected)


def test_invalid_yaml_names_line(tmp_path: Path) -> None:
    path = write(tmp_path, "task: vae\nparams: {beta: [1, 2\n")
    with pytest.raises(ConfigError, match=r"invalid YAML: line \d+"):
        load_space(path)


def test_unknown_task_in_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown task 'nope'; known tasks: .*vae"):
        load_space(write(tmp_path, "task: nope\n"))


def test_metric_and_direction_default_to_registration() -> None:
    space = parse_space({"task": "vae"}, "<t>")
    assert (space.metric, space.direction) == ("val_elbo", "maximize")


def test_overrides_parse_yaml_scalars_and_check_types() -> None:
    task = get_task("vae")
    got = parse_overrides(["epochs=3", "lr=1e-3", "train_size=100", "model=ae", "beta=0"], task)
    assert got == {"epochs": 3, "lr": 1e-3, "train_size": 100, "model": "ae", "beta": 0}
    with pytest.raises(ConfigError) as err:
        parse_overrides(["epoch=3", "epochs=three", "lr"], task)
    msgs = err.value.problems
    assert len(msgs) == 3
    assert "`epoch` is not a parameter of task 'vae'" in msgs[0]
    assert "must be int like its default 10, got 'three'" in msgs[1]
    assert "must be key=value" in msgs[2]


SPECS = {
    "f": {"type": "float", "low": 0.5, "high": 2.0},
    "flog": {"type": "float", "low": 1e-4, "high": 1.0, "log": True},
    "fstep": {"type": "float", "low": 0.0, "high": 1.0, "step": 0.25},
    "i": {"type": "int", "low": 2, "high": 4},
    "ilog": {"type": "int", "low": 1, "high": 128, "log": True},
    "istep": {"type": "int", "low": 0, "high": 10, "step": 5},
    "c": {"type": "categorical", "choices": ["a", 1, None]},
}


def params_of(specs: dict) -> dict[str, Param]:
    from bench.space import _parse_param

    errs: list[str] = []
    out = {k: _parse_param("params", k, v, errs) for k, v in specs.items()}
    assert not errs
    return out  # type: ignore[return-value]


def test_optuna_sampling_respects_names_types_and_inclusive_bounds() -> None:
    from bench.backends.optuna import suggest

    params = params_of(SPECS)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen: dict[str, set] = {k: set() for k in params}
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    for _ in range(300):
        trial = study.ask()
        for name, p in params.items():
            v = suggest(trial, p)
            seen[name].add(v)
            if p.type == "int":
                assert isinstance(v, int) and p.low <= v <= p.high
            elif p.type == "float":
                assert isinstance(v, float) and p.low <= v <= p.high
        study.tell(trial, 0.0)
    assert seen["i"] == {2, 3, 4}, "inclusive high is reachable"
    assert seen["istep"] == {0, 5, 10}
    assert seen["fstep"] == {0.0, 0.25, 0.5, 0.75, 1.0}
    assert seen["c"] == {"a", 1, None}
    assert max(seen["ilog"]) > 64 and min(seen["ilog"]) < 4


def test_grid_values() -> None:
    params = params_of(SPECS)
    assert params["istep"].grid_values() == [0, 5, 10]
    assert params["fstep"].grid_values() == [0.0, 0.25, 0.5, 0.75, 1.0]
    with pytest.raises(ConfigError, match="params.f: the grid sampler needs a finite set"):
        params["f"].grid_values()


def test_distributions_match_specs() -> None:
    d = params_of(SPECS)["flog"].to_optuna()
    assert isinstance(d, optuna.distributions.FloatDistribution) and d.log
    assert math.isclose(d.low, 1e-4) and d.high == 1.0


def test_variant_points_are_the_cartesian_product() -> None:
    space = space_for("synthetic")
    pts = space.variant("grid").points()
    assert len(pts) == 6 and {"x": -1.0, "y": 1.0} in pts
    with pytest.raises(ConfigError, match="unknown variant 'nope'; known variants: grid"):
        space.variant("nope")


def test_grid_and_params_are_exclusive(tmp_path: Path) -> None:
    doc = {"task": "synthetic", "variants": {"v": {
        "grid": {"x": [1.0]}, "params": {"y": {"type": "float", "low": 0, "high": 1}}}}}
    with pytest.raises(ConfigError, match="either `grid`"):
        load_space(write(tmp_path, yaml.safe_dump(doc)))
