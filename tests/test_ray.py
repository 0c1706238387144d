"""Ray Tune backend: the space contract through Ray, then a real local Ray cluster.

The cluster (2 CPUs) is started once for the module; trials run the synthetic task.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("ray.tune")

import ray  # noqa: E402
from ray.tune.search.optuna import OptunaSearch  # noqa: E402

from bench import leaderboard  # noqa: E402
from bench.backends import ray as ray_backend  # noqa: E402
from bench.backends._base import RunOptions  # noqa: E402
from bench.errors import ConfigError  # noqa: E402
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


# ---------------------------------------------------------------- a local cluster

@pytest.fixture(scope="module")
def cluster() -> Iterator[None]:
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, object_store_memory=100 * 2**20,
                 log_to_driver=False, runtime_env={"env_vars": {
                     k: v for k, v in os.environ.items() if k.startswith("BENCH_")}})
    yield
    if started:
        ray.shutdown()


def opts(out: Path, **kw: Any) -> RunOptions:
    base = RunOptions(task="synthetic", out=out, progress=False,
                      overrides={"sleep_s": 0.02}, extra={"cpus_per_trial": 1})
    return dataclasses.replace(base, **kw)


def test_asha_prunes_and_every_trial_writes_its_row(cluster: None, out: Path) -> None:
    result = ray_backend.run(opts(out, trials=12, pruner="asha", sampler="tpe"))
    rows = leaderboard.read_trials(out, "synthetic")
    assert len(rows) == 12 and rows["trial_uid"].is_unique
    assert sorted(rows["trial_number"]) == list(range(12))
    assert set(rows["backend"]) == {"ray"} and set(rows["pruner"]) == {"asha"}
    assert set(rows["state"]) <= {"COMPLETE", "PRUNED"}
    pruned, done = rows[rows["state"] == "PRUNED"], rows[rows["state"] == "COMPLETE"]
    assert len(pruned) >= 1 and len(done) >= 1
    assert (pruned["epochs_done"] < 5).all() and (done["epochs_done"] == 5).all()
    curves = leaderboard.read_curves(out, "synthetic")
    for _, r in pruned.iterrows():  # a pruned trial's objective is its last reported value
        c = curves[(curves["trial_uid"] == r["trial_uid"]) & (curves["metric"] == "loss")]
        assert len(c) == r["epochs_done"]
        assert r["objective"] == pytest.approx(c.sort_values("step")["value"].iloc[-1])
        assert "pruned at step" in r["error"]
    assert done["metric_distance"].notna().all()
    assert (rows["param_x"].between(-2, 2) & rows["param_y"].between(-1, 3)).all()
    assert result.errors == 0 and result.n_planned == 12
    # Re-running the same experiment needs --resume; a resume of a finished one adds nothing.
    with pytest.raises(ConfigError, match="--resume"):
        ray_backend.run(opts(out, trials=12, pruner="asha"))
    again = ray_backend.run(opts(out, trials=12, pruner="asha", extra={"resume": True}))
    assert again.errors == 0
    assert len(leaderboard.read_trials(out, "synthetic")) == 12


def test_enumerated_variant_runs_each_point_and_seed_once(cluster: None, out: Path) -> None:
    ray_backend.run(opts(out, variant="grid", sampler="random", study="grid"))
    rows = leaderboard.read_trials(out, "synthetic", study="grid")
    assert len(rows) == 12 and set(rows["state"]) == {"COMPLETE"}  # 6 points x 2 seeds
    pairs = set(zip(rows["param_x"], rows["param_y"], rows["seed"], strict=True))
    assert len(pairs) == 12 and set(rows["seed"]) == {0, 1}
    assert set(rows["pruner"]) == {"none"}


def test_failed_trials_get_fail_rows_and_are_retried(cluster: None, out: Path) -> None:
    result = ray_backend.run(opts(out, trials=2, sampler="random", study="boom",
                                  overrides={"fail": "exception", "fail_at": 1},
                                  extra={"max_failures": 1}))
    rows = leaderboard.read_trials(out, "synthetic", study="boom")
    assert len(rows) == 2 and set(rows["state"]) == {"FAIL"}  # one row per trial, last try
    assert rows["error"].str.contains("injected failure at step 1").all()
    assert result.errors == 2


def test_gpu_request_checked_against_cluster(cluster: None, out: Path) -> None:
    gpus = ray.cluster_resources().get("GPU", 0)
    if gpus:
        pytest.skip("this cluster has GPUs")
    with pytest.raises(ConfigError, match=r"--gpus-per-trial 0.25: the Ray cluster has 0 GPU"):
        ray_backend.run(opts(out, trials=1, extra={"gpus_per_trial": 0.25}))
    with pytest.raises(ConfigError, match="--device cuda"):
        ray_backend.run(opts(out, trials=1, device="cuda"))


@pytest.mark.gpu
def test_fractional_gpu_trials_share_one_device(out: Path) -> None:
    import torch

    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    ray.shutdown()
    try:
        ray_backend.run(opts(out, trials=4, sampler="random", pruner="none", device="cuda",
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
