"""Ray Tune backend: the space contract through Ray, then a real local Ray cluster.

The cluster (2 CPUs) is started once for the module; trials run the synthetic task.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("ray.tune")

import ray  # noqa: E402
from ray.tune.search.optuna import OptunaSearch  # noqa: E402

from bench import leaderboard  # noqa: E402
from bench.backends import ray as ray_backend  # noqa: E402
from bench.backends._base import get_backend  # noqa: E402
from bench.errors import ConfigError  # noqa: E402
from bench.plan import RunOptions, make_plan  # noqa: E402
from bench.space import Param, load_space, spaces_dir  # noqa: E402

pytestmark = pytest.mark.ray
SAMPLES = 4000


def shipped_params() -> list[tuple[str, Param]]:
    out = []
    for path in sorted(spaces_dir().glob("*.yaml")):
        space = load_space(path)
        params = dict(space.params)
        for v in space.variants.values():
            params.update({f"{v.name}.{k}": p for k, p in v.params.items()})
        out += [(f"{path.stem}:{k}", p) for k, p in params.items()]
    return out


@pytest.mark.parametrize("name,p", shipped_params(), ids=[n for n, _ in shipped_params()])
def test_space_contract_through_ray(name: str, p: Param) -> None:
    """Ray samples the YAML's support: names, types, inclusive bounds (int high reachable),
    and Ray's Optuna searcher sees the same distribution as the Optuna backend."""
    domain = p.to_ray()
    values = [ray_backend.plain(v) for v in domain.sample(size=SAMPLES, random_state=0)]
    if p.type == "categorical":
        assert set(values) == set(p.choices)
    elif p.type == "int":
        assert all(isinstance(v, int) and not isinstance(v, bool) for v in values)
        assert min(values) >= p.low and max(values) <= p.high
        step = int(p.step or 1)
        assert all((v - p.low) % step == 0 for v in values)
        assert p.high in values and p.low in values  # inclusive on both ends
    else:
        assert all(isinstance(v, float) for v in values)
        assert min(values) >= p.low and max(values) <= p.high
    converted = OptunaSearch.convert_search_space({p.name: domain})[p.name]
    assert converted == p.to_optuna()


def test_fractional_gpus_validated() -> None:
    assert ray_backend.RayOptions.from_extra({"gpus_per_trial": 0.25}).gpus_per_trial == 0.25
    assert ray_backend.RayOptions.from_extra({"gpus_per_trial": 2}).gpus_per_trial == 2
    with pytest.raises(ConfigError) as err:
        ray_backend.RayOptions.from_extra({"gpus_per_trial": 1.5, "cpus_per_trial": -1,
                                           "max_failures": -3})
    text = str(err.value)
    assert "--gpus-per-trial: a share of one GPU" in text and "got 1.5" in text
    assert "--cpus-per-trial" in text and "--max-failures" in text


def test_the_schedulers_horizon_is_the_tasks_epochs_of_a_trial(tmp_path: Path) -> None:
    def steps(task: str, **kw: Any) -> int:
        return ray_backend.max_steps(make_plan(RunOptions(task=task, out=tmp_path / "lb",
                                                          **kw), check_data=False))

    # net=shell_ridge is fitted in closed form and reports one epoch, whatever `epochs` is
    assert steps("brain-age", variant="shell-ridge-search", overrides={"epochs": 30}) == 1
    assert steps("brain-age", overrides={"epochs": 7}) == 7
    assert steps("synthetic", overrides={"epochs": 5}) == 5
    space = tmp_path / "s.yaml"
    space.write_text("task: synthetic\nparams:\n  epochs: {type: int, low: 2, high: 9}\n")
    assert steps("synthetic", space_file=space) == 9  # searched: its largest value
    space.write_text("task: synthetic\nparams:\n  epochs: {type: int, low: 2, high: 5}\n"
                     "variants:\n  g:\n    grid: {epochs: [3, 40]}\n")
    assert steps("synthetic", space_file=space, variant="g") == 40  # a grid: its points
    assert ray_backend._searcher(make_plan(RunOptions(
        task="synthetic", out=tmp_path / "lb", space_file=space, variant="g"),
        check_data=False)) is None  # Ray's grid_search runs a grid, not OptunaSearch


def test_a_point_that_breaks_a_rule_gets_a_fail_row_naming_it(tmp_path: Path) -> None:
    """As under the Optuna backend: the row first, then Ray's trial error."""
    from bench.errors import TrialFailed

    plan = make_plan(RunOptions(task="brain-age", variant="shell-ridge-search", backend="ray",
                                overrides={"normalize": "none"}, out=tmp_path / "lb"),
                     check_data=False)
    point = {"moments": 2, "shells": 3, "concept_scaling": "zscore", "regressor": "mlp",
             "kr_alpha": 0.1, "kr_gamma": 0.1}
    with pytest.raises(TrialFailed, match="ConfigError: moments: powers of an intensity"):
        ray_backend.run_trial(plan, str(tmp_path / "exp"), "abc12_00003", point)
    rows = leaderboard.read_trials(tmp_path / "lb", "brain-age")
    assert list(rows["state"]) == ["FAIL"] and list(rows["backend"]) == ["ray"]
    assert rows["error"].iloc[0].startswith("ConfigError: moments: powers of an intensity")
    assert rows["param_moments"].iloc[0] == 2


# ---------------------------------------------------------------- a local cluster

@pytest.fixture(scope="module")
def cluster(ray_cluster: None) -> None:
    """The shared local cluster (conftest.ray_cluster)."""


def opts(out: Path, **kw: Any) -> RunOptions:
    base = RunOptions(task="synthetic", out=out, progress=False, backend="ray",
                      overrides={"sleep_s": 0.02}, extra={"cpus_per_trial": 1})
    return dataclasses.replace(base, **kw)


def run(o: RunOptions):
    return get_backend("ray").run(make_plan(o))


def test_failed_trials_get_fail_rows_and_are_retried(cluster: None, out: Path) -> None:
    result = run(opts(out, trials=2, sampler="random", study="boom",
                                  overrides={"fail": "exception", "fail_at": 1},
                                  extra={"max_failures": 1}))
    rows = leaderboard.read_trials(out, "synthetic", study="boom")
    assert len(rows) == 2 and set(rows["state"]) == {"FAIL"}  # one row per trial, last try
    assert rows["error"].str.contains("injected failure at step 1").all()
    assert result.exit_code == 1 and "2 Ray trial(s) ended in error" in result.messages[0]


def test_gpu_request_checked_against_cluster(cluster: None, out: Path) -> None:
    gpus = ray.cluster_resources().get("GPU", 0)
    if gpus:
        pytest.skip("this cluster has GPUs")
    with pytest.raises(ConfigError, match=r"--gpus-per-trial 0.25: the Ray cluster has 0 GPU"):
        run(opts(out, trials=1, extra={"gpus_per_trial": 0.25}))
    with pytest.raises(ConfigError, match="--device cuda"):
        run(opts(out, trials=1, device="cuda"))


@pytest.mark.gpu
def test_fractional_gpu_trials_share_one_device(out: Path) -> None:
    import torch

    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    ray.shutdown()
    try:
        run(opts(out, trials=4, sampler="random", pruner="none", device="cuda",
                             extra={"gpus_per_trial": 0.25, "cpus_per_trial": 0.5}))
    finally:
        ray.shutdown()
    rows = leaderboard.read_trials(out, "synthetic")
    assert len(rows) == 4 and set(rows["state"]) == {"COMPLETE"}
    assert rows["device"].str.startswith("cuda").all() and rows["gpu_name"].notna().all()


def test_cli_joins_a_running_cluster(cluster: None, out: Path, tmp_path: Path) -> None:
    from conftest import bench_cli

    address = ray.get_runtime_context().gcs_address
    r = bench_cli("run", "synthetic", "--backend", "ray", "--address", address, "--trials",
                  "3", "--pruner", "median", "--set", "epochs=2", "--out", "lb", "--quiet",
                  cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Ray experiment 'synthetic'" in r.stdout
    rows = leaderboard.read_trials(tmp_path / "lb", "synthetic")  # relative --out, absolute rows
    assert len(rows) == 3 and set(rows["state"]) == {"COMPLETE"}
