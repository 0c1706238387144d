"""Search-space YAML: every rule, every error at once, and the conversion to Optuna."""

from __future__ import annotations

import math
from pathlib import Path

import optuna
import pytest
import yaml
from conftest import bench_cli

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
        "variants.sweep.seeds: must be an integer in [1, 1000], got 0",
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
    assert "`epoch` is not a parameter of task 'vae'; did you mean `epochs`?" in msgs[0]
    assert "epochs=three: must be an integer >= 1 and <= 100000, got 'three'" in msgs[1]
    assert "must be key=value" in msgs[2]


SPECS = {
    "f": {"type": "float", "low": 0.5, "high": 2.0},
    "flog": {"type": "float", "low": 1e-4, "high": 1.0, "log": True},
    "fstep": {"type": "float", "low": 0.0, "high": 1.0, "step": 0.25},
    "i": {"type": "int", "low": 2, "high": 4},
    "ilog": {"type": "int", "low": 1, "high": 128, "log": True},
    "istep": {"type": "int", "low": 0, "high": 10, "step": 5},
    "c": {"type": "categorical", "choices": ["a", "b", "c"]},
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
    assert seen["c"] == {"a", "b", "c"}
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


def test_values_are_checked_against_the_task_declarations(tmp_path: Path) -> None:
    """fixed, grid and searched values obey the parameter's type and rule."""
    doc = """
task: vae
fixed: {epochs: "5", lr: -0.1, model: gan}
params:
  latent_dim: {type: float, low: 2, high: 8}
  depth: {type: int, low: 0, high: 3}
  width: {type: categorical, choices: [16, "32"]}
variants:
  v: {grid: {batch_size: [64, 0]}, seeds: 2}
"""
    with pytest.raises(ConfigError) as err:
        load_space(write(tmp_path, doc))
    problems = "\n".join(err.value.problems)
    for fragment in [
        "fixed.epochs: must be an integer >= 1 and <= 100000, got '5'",
        "fixed.lr: must be a number > 0 and <= 10, got -0.1",
        "fixed.model: must be one of vae, ae, got 'gan'",
        "params.latent_dim: `latent_dim` is an integer parameter: search it as `type: int`",
        "params.depth: value 0 of the search space: must be an integer >= 1 and <= 8",
        "params.width.choices: must all be of one type",
        "variants.v.grid.batch_size: value 0: must be an integer >= 1",
    ]:
        assert fragment in problems, (fragment, problems)


def test_yaml_reads_exponent_numbers_and_refuses_duplicate_keys(tmp_path: Path) -> None:
    space = load_space(write(tmp_path, "task: vae\nfixed: {lr: 1e-4, beta: 1e2}\n"))
    assert space.fixed == {"lr": 1e-4, "beta": 100.0}
    with pytest.raises(ConfigError, match=r"duplicate key `epochs` at line 4 \(first at line 3"):
        load_space(write(tmp_path, "task: vae\nfixed:\n  epochs: 1\n  epochs: 2\n"))


def test_yaml_alias_bombs_and_huge_variants_are_refused(tmp_path: Path) -> None:
    bomb = ["task: synthetic", 'a: &a ["x","x","x","x","x","x","x","x","x","x"]']
    for i, prev in zip("bcdefgh", "abcdefg", strict=True):
        bomb.append(f"{i}: &{i} [" + ",".join([f"*{prev}"] * 10) + "]")
    with pytest.raises(ConfigError, match="more than 100,000 nodes through its aliases"):
        load_space(write(tmp_path, "\n".join(bomb) + "\n"))
    with pytest.raises(ConfigError, match=r"seeds: must be an integer in \[1, 1000\]"):
        load_space(write(tmp_path, "task: synthetic\nvariants: {v: {seeds: 1000000000}}\n"))
    with pytest.raises(ConfigError, match="at most 100,000 per variant"):
        grid = "{x: [" + ",".join(["0.0"] * 1000) + "], y: [" + ",".join(["1.0"] * 200) + "]}"
        load_space(write(tmp_path, f"task: synthetic\nvariants: {{v: {{grid: {grid}}}}}\n"))


def test_a_wide_grid_search_is_refused_before_it_is_built(tmp_path: Path) -> None:
    from bench.plan import RunOptions, make_plan

    path = write(tmp_path, "task: synthetic\nparams:\n  epochs: {type: int, low: 1, "
                 "high: 100000}\n  fail_at: {type: int, low: 0, high: 100000}\n")
    with pytest.raises(ConfigError, match="the grid has 10,000,100,000 points"):
        make_plan(RunOptions("synthetic", sampler="grid", space_file=path,
                             out=tmp_path / "lb"))
    assert not (tmp_path / "lb").exists()


def test_rules_are_probed_over_a_searched_space_before_a_run(tmp_path: Path) -> None:
    import re

    from bench.plan import RunOptions, make_plan
    from bench.space import Param

    assert Param("n", "int", 1, 6).probe_values() == [1, 2, 3, 4, 5, 6]  # small: every one
    assert Param("n", "int", 1, 1000).probe_values() == [1, 126, 251, 376, 500, 625, 750,
                                                         875, 1000]
    assert Param("a", "float", 1e-4, 1.0, log=True).probe_values() == pytest.approx(
        [10 ** (-4 + i / 2) for i in range(9)])
    assert Param("s", "float", 0.1, 0.3, step=0.1).probe_values() == pytest.approx(
        [0.1, 0.2, 0.3])  # the upper end is probed (floor(1.999...) is not 2 steps)
    assert Param("s", "float", 0.0, 100.0, step=0.3).probe_values()[-1] == pytest.approx(99.9)
    assert Param("c", "categorical", choices=("x", "y")).probe_values() == ["x", "y"]
    # shell-ridge-search searches moments 1-3: with normalize=none two values of three
    # break a rule; a run goes ahead and says so
    plan = make_plan(RunOptions("brain-age", variant="shell-ridge-search",
                                overrides={"normalize": "none"}, out=tmp_path / "lb"),
                     check_data=False)
    assert len(plan.notes) == 1, plan.notes
    n_bad = int(re.search(r"note: (\d+) of 4096 probed points", plan.notes[0]).group(1))
    assert abs(n_bad / 4096 - 2 / 3) < 0.03
    assert "e.g. at moments=" in plan.notes[0] and "need a normalised image" in plan.notes[0]
    assert make_plan(RunOptions("brain-age", variant="shell-ridge-search",
                                out=tmp_path / "lb"), check_data=False).notes == []
    # a fixed value that breaks a rule at every point: refused, the rule named once
    with pytest.raises(ConfigError) as err:
        make_plan(RunOptions("brain-age", variant="shell-ridge-search",
                             overrides={"mode": "joint"}, out=tmp_path / "lb"),
                  check_data=False)
    assert err.value.problems == [
        "parameters: every point of the searched space (moments, shells, concept_scaling, "
        "regressor, kr_alpha, kr_gamma; 4096 probed) breaks this rule, so no trial could "
        "run: net: shell_ridge (volumes fitted in closed form, shells cut from the brain "
        "mask) needs mode='independent', got 'joint'"]
    assert not (tmp_path / "lb").exists()


def test_a_rule_that_holds_only_inside_a_range_is_found_not_refused(tmp_path: Path) -> None:
    """channels=3,16 needs depth 2 and width 3 exactly: width 3 is neither bound nor the
    midpoint of [2, 32], and the run is not refused; with width not searched it is."""
    from bench.plan import RunOptions, make_plan
    from bench.space import Param

    space = write(tmp_path, "task: brain-age\nparams:\n  depth: {type: int, low: 1, high: 3}"
                  "\n  width: {type: int, low: 2, high: 32}\n")
    over = {"channels": "3,16"}
    plan = make_plan(RunOptions("brain-age", space_file=space, overrides=over,
                                out=tmp_path / "lb"), check_data=False)
    assert len(plan.notes) == 1 and "e.g. at depth=1, width=2: channels:" in plan.notes[0]
    # broken at every probed point, in words that name the searched values: a note, not
    # a refusal (a value between the probes might hold)
    plan = make_plan(RunOptions("brain-age", space_file=space, overrides={**over, "width": 8},
                                out=tmp_path / "lb"), check_data=False)
    assert plan.notes[0].startswith("note: every one of the 3 probed points of the searched "
                                    "space (depth) break a rule"), plan.notes
    # a log-scale int range of up to 64 values is probed at every value
    assert Param("w", "int", 2, 32, log=True).probe_values() == list(range(2, 33))
    # bench validate probes every search of a file the same way
    bad = write(tmp_path, "task: brain-age\nfixed: {net: shell_ridge, mask_channel: true}\n"
                "variants:\n  modes:\n    params: {mode: {type: categorical, choices: "
                "[sequential, joint]}}\n")
    res = bench_cli("validate", str(bad))  # mode is searched: every point fails, and says
    assert res.returncode == 0 and "variants.modes: note: every one of the 2 probed points" \
        in res.stderr, res.stderr  # its value ("got 'joint'"): a note
    bad.write_text(bad.read_text().replace("net: shell_ridge, mask_channel: true",
                                           "net: shell_ridge, mask_channel: false"))
    res = bench_cli("validate", str(bad))  # mask_channel, fixed: the same words everywhere
    assert res.returncode == 2 and "variants.modes: every point of the searched space (mode; "\
        "2 probed) breaks this rule, so no trial could run: net: shell_ridge" in res.stderr \
        and "needs mask_channel=True, got False" in res.stderr, res.stderr


def test_set_lists_every_bad_value_at_once() -> None:
    task = get_task("vae")
    with pytest.raises(ConfigError) as err:
        parse_overrides(["lr=-0.1", "batch_size=0", "width=0", "train_size=-5", "epochs=-1",
                         "model=gan"], task)
    assert len(err.value.problems) == 6


def test_a_search_is_told_which_searched_parameters_have_no_effect(tmp_path: Path) -> None:
    """brain-age's default space searches the CNN; with net=shell_ridge fixed, the CNN's
    parameters do nothing at any point, and the run (and `bench validate`) says so; the
    regressor's kr_alpha acts at some points (regressor is searched), so it is not named."""
    from bench.space import validate_file

    raw = yaml.safe_load(Path(space_for("brain-age").source).read_text())
    path = str(tmp_path / "search.yaml")  # the default search, without the variants
    Path(path).write_text(yaml.safe_dump({k: v for k, v in raw.items() if k != "variants"},
                                         sort_keys=False))
    problems, _, notes = validate_file(path, ["net=shell_ridge", "mask_channel=true"])
    assert problems == []
    [idle] = [n for n in notes if "no effect" in n]
    named = idle.split("leave them out): ")[1]
    assert named.startswith("depth, width, ") and "lr, lr_schedule" in named
    assert named.endswith("(only with net=cnn; here net='shell_ridge')")
    assert "kr_alpha" not in named and "regressor" not in named
    problems, _, notes = validate_file(path, [])  # net=cnn: every searched one acts
    assert problems == [] and not [n for n in notes if "no effect" in n]
    res = bench_cli("validate", path, "--set", "net=shell_ridge", "--set", "mask_channel=true")
    assert res.returncode == 0 and "depth, width" in res.stderr, res.stderr


def test_a_grid_axis_without_effect_at_every_point_is_noted() -> None:
    from bench.space import validate_file

    _, _, notes = validate_file(space_for("vae").source, ["model=ae"])
    [beta] = [n for n in notes if "variants.beta-sweep:" in n]
    assert "grid axes that have no effect at any of the 7 points" in beta
    assert beta.endswith("beta (only with model=vae; here model='ae')")
    _, _, notes = validate_file(space_for("vae").source, [])
    assert not [n for n in notes if "no effect" in n]
