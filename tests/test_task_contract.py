"""One contract for every registered task (timm's habit), over the harness-owned lifecycle:
a tiny CPU run gives finite declared metrics and a row in the task's schema; the same seed
gives the same objective; a trial suspended after an epoch resumes to the bit-identical
result; `epochs`, `train_size` and `test_size` are honoured; `bench rerun` reproduces a
trial from its row."""

from __future__ import annotations

import math
import random
import re
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from conftest import bench_cli

from bench import leaderboard
from bench.lifecycle import (
    CHECKPOINT_FILE,
    RESUME_FILE,
    EpochTrial,
    execute_trial,
    new_trial_uid,
)
from bench.registry import HARNESS_METRICS, MissingExtraError, get_task, list_tasks
from bench.space import merge_params, space_for
from bench.trial import local_context

TASKS = [t.name for t in list_tasks()]


def test_declarations_agree_with_their_implementations() -> None:
    """The torch-free declarations (bench.specs) name choices the implementations build."""
    from bench import distributions, nets
    from bench.specs import priors, vae

    assert list(vae.ARCH_NAMES) == list(nets.ARCHS)
    assert vae.FIXED_SIZE_ARCHS == nets.FIXED_SIZE_ARCHS
    assert list(priors.FAMILIES) == distributions.family_names()
    for task in list_tasks():
        assert issubclass(task.trial, EpochTrial), task.name
        assert task.doc and task.doc == (task.trial.__doc__ or "").strip().splitlines()[0]


def usable(name: str):
    task = get_task(name)
    try:
        task.require_extra()
    except MissingExtraError as exc:
        pytest.skip(str(exc))
    return task


def smoke_params(name: str, **extra):
    task = usable(name)
    return task, merge_params(task, space_for(name), None, {}, {**task.smoke, **extra})


def run_smoke(name: str, tmp: Path, seed: int = 0, device: str = "cpu", folder: str = "",
              evaluate: bool = True, stop_after: int | None = None, metric: str = "",
              **extra):
    task, params = smoke_params(name, **extra)
    space = space_for(name)
    art = tmp / (folder or f"art-{seed}-{new_trial_uid()}")
    ctx = local_context(seed, device, art, metric or space.metric, checkpoint_every_s=3600)
    if stop_after is not None:
        ctx.stop_check = lambda: ctx.steps_done >= stop_after
    ident = {"task": name, "study": "contract", "variant": "default",
             "trial_uid": art.name, "trial_number": 0, "backend": "test", "seed": seed}
    return execute_trial(task, params, ctx, ident, tmp / "lb", space.direction,
                         evaluate=evaluate), ctx


@pytest.mark.parametrize("name", TASKS)
def test_task_contract(name: str, tmp_path: Path) -> None:
    outcome, ctx = run_smoke(name, tmp_path)
    task = get_task(name)
    assert outcome.state == "COMPLETE", outcome.error
    assert all(math.isfinite(v) for v in outcome.metrics.values())
    assert set(outcome.metrics) <= set(task.metrics), "only declared metrics"
    assert math.isfinite(outcome.objective)
    assert ctx.curve, "a task reports at least one curve point"
    assert (ctx.artifact_dir / CHECKPOINT_FILE).exists() or name == "synthetic"
    assert not (ctx.artifact_dir / RESUME_FILE).exists(), "a finished trial keeps no resume"

    path = tmp_path / "lb" / name / "trials" / f"{ctx.artifact_dir.name}.parquet"
    assert pq.read_schema(path).equals(leaderboard.task_schema(task), check_metadata=False)
    rows = leaderboard.read_trials(tmp_path / "lb", name)
    assert len(rows) == 1
    row = rows.iloc[0]
    assert row["state"] == "COMPLETE" and row["objective"] == pytest.approx(outcome.objective)
    assert row["metric"] == space_for(name).metric
    assert row[f"metric_{row['metric']}"] == pytest.approx(row["objective"])
    assert row["epochs_done"] >= 1 and row["duration_s"] > 0 and row["attempts"] == 1
    curves = leaderboard.read_curves(tmp_path / "lb", name, [row["trial_uid"]])
    assert len(curves) == len(ctx.curve)

    again, _ = run_smoke(name, tmp_path, seed=0)
    assert again.objective == outcome.objective, "the same seed gives the same objective"


@pytest.mark.parametrize("name", TASKS)
def test_suspend_then_resume_is_bit_identical(name: str, tmp_path: Path) -> None:
    """Preemption after epoch 1 of 3, with the process's RNGs scrambled in between."""
    whole, _ = run_smoke(name, tmp_path, folder="whole", epochs=3)
    first, ctx = run_smoke(name, tmp_path, folder="split", epochs=3, stop_after=1)
    assert first.state == "SUSPENDED", first.error
    assert (ctx.artifact_dir / RESUME_FILE).exists()
    assert not leaderboard.trial_exists(tmp_path / "lb", name, "split"), "no row yet"
    torch.manual_seed(12345)
    np.random.seed(6789)
    random.seed(42)
    resumed, ctx = run_smoke(name, tmp_path, folder="split", epochs=3)
    assert whole.state == resumed.state == "COMPLETE", (whole.error, resumed.error)
    assert resumed.metrics.keys() == whole.metrics.keys()
    for key, value in whole.metrics.items():
        if key != "train_examples_per_s":  # a timing
            assert resumed.metrics[key] == value, key
    assert resumed.row["epochs_done"] == 3 and resumed.row["attempts"] == 2
    steps = sorted({s for s, _, _ in ctx.curve})
    assert steps == [0, 1, 2], "the resumed curve keeps the first attempt's points"
    assert not (ctx.artifact_dir / RESUME_FILE).exists()


@pytest.mark.parametrize("name", TASKS)
def test_epochs_and_split_caps_are_honoured(name: str, tmp_path: Path) -> None:
    task, params = smoke_params(name, epochs=2)
    outcome, ctx = run_smoke(name, tmp_path, epochs=2)
    assert outcome.row["epochs_done"] == 2
    assert sorted({s for s, _, _ in ctx.curve}) == [0, 1]
    if "train_size" not in task.params:
        return
    caps = {"train_size": 24, "test_size": 16}
    trial = task.trial({**params, **caps}, local_context(0, "cpu", tmp_path / "sizes"))
    sizes = trial.sizes()
    assert 0 < sizes["train"] <= 24 and 0 < sizes["test"] <= 16, sizes


@pytest.mark.parametrize("name", TASKS)
def test_rerun_reproduces_a_trial_from_its_row(name: str, tmp_path: Path) -> None:
    usable(name)
    out = tmp_path / "lb"
    r = bench_cli("run", name, "--smoke", "--trials", "1", "--out", str(out), "--quiet",
                  "--seed", "3", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    uid = leaderboard.read_trials(out, name)["trial_uid"].iloc[0]
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    r = bench_cli("rerun", uid, "--out", str(out), cwd=tmp_path, env={"TMPDIR": str(tmp)})
    assert r.returncode == 0, r.stderr[-2000:]
    original, again = re.search(r"original objective (\S+), rerun (\S+)", r.stdout).groups()
    assert float(original) == float(again)
    assert "equal" in r.stdout
    assert list(tmp.iterdir()) == [], "an unrecorded rerun leaves nothing behind"
    assert len(leaderboard.read_trials(out, name)) == 1


@pytest.mark.gpu
@pytest.mark.parametrize("name", TASKS)
def test_task_contract_on_cuda(name: str, tmp_path: Path) -> None:
    """The same tiny run on a GPU (bf16 autocast, device-resident data): it completes with
    finite metrics, its row names the GPU, and it lands near the CPU run's objective."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    outcome, _ = run_smoke(name, tmp_path, device="cuda")
    assert outcome.state == "COMPLETE", outcome.error
    assert all(math.isfinite(v) for v in outcome.metrics.values())
    row = leaderboard.read_trials(tmp_path / "lb", name).iloc[0]
    assert row["device"].startswith("cuda") and row["gpu_name"]
    assert row["peak_mem_gb"] > 0
    cpu, _ = run_smoke(name, tmp_path / "cpu")
    # bf16 and different kernels: the same seed lands close, not bit-identical
    assert outcome.objective == pytest.approx(cpu.objective, rel=0.25, abs=0.1)


class _Reads(dict):
    """A parameter set that records which keys are read."""

    def __init__(self, *args, **kw) -> None:
        super().__init__(*args, **kw)
        self.read: set[str] = set()

    def __getitem__(self, key):
        self.read.add(key)
        return super().__getitem__(key)

    def get(self, key, default=None):
        self.read.add(key)
        return super().get(key, default)


@pytest.mark.parametrize("name", [t.name for t in list_tasks() if t.data is not None])
def test_a_data_check_reads_only_its_declared_data_keys(name: str) -> None:
    """A run checks one parameter set per distinct combination of the task's `data_keys`,
    so a key the check reads but does not declare would leave some data unchecked."""
    task, params = smoke_params(name)
    recorded = _Reads(params)
    task.data(recorded, None)
    assert recorded.read, name
    assert task.data_keys is None or recorded.read <= set(task.data_keys), (
        name, sorted(recorded.read - set(task.data_keys or ())))


def test_data_sets_keeps_one_parameter_set_per_distinct_data_keys() -> None:
    from bench.registry import Task

    def check(params, data_dir):
        return None

    sets = [{"dataset": "a", "lr": 1}, {"dataset": "a", "lr": 2}, {"dataset": "b", "lr": 1}]
    keyed = Task("t", "m:C", "x", "minimize", {}, {}, data=check, data_keys=("dataset",))
    assert keyed.data_sets(sets) == [sets[0], sets[2]]
    every = Task("t", "m:C", "x", "minimize", {}, {}, data=check)  # no keys: every parameter
    assert every.data_sets(sets + [dict(sets[1])]) == sets


@pytest.mark.parametrize("name, where, idle, metric", [
    ("vae", {"model": "ae"}, {"beta": (0.1, 4.0), "kl": ("analytic", "mc")}, "val_recon"),
    ("brain-age", {"net": "shell_ridge", "mask_channel": True, "moments": 2, "epochs": 1},
     {"lr": (1e-4, 1e-2), "width": (2, 8)}, ""),
])
def test_a_parameter_declared_idle_changes_nothing(name: str, where: dict, idle: dict,
                                                   metric: str, tmp_path: Path) -> None:
    """`only_with` is true: where its condition fails, two values of the parameter give
    the same trial, metric for metric (what the run's 'no effect' note promises)."""
    task = usable(name)
    for key, (a, b) in idle.items():
        assert task.params[key].idle_because({**task.defaults, **where}), key
        runs = [run_smoke(name, tmp_path, folder=f"{key}-{v}", metric=metric, evaluate=False,
                          **where, **{key: v})[0] for v in (a, b)]
        assert all(r.state == "COMPLETE" for r in runs), [r.error for r in runs]
        measured = [{k: v for k, v in r.metrics.items() if k not in HARNESS_METRICS}
                    for r in runs]  # the clock's figures differ from run to run
        assert measured[0] == measured[1] and len(measured[0]) > 3, key


def test_only_with_names_declared_parameters_and_valid_values() -> None:
    from bench.params import Choice, Int, Metric, only_with
    from bench.registry import declare_task

    params = {"epochs": Int(1, 1), "net": Choice("a", ["a", "b"]), "w": Int(1, 1)}
    metrics = {"m": Metric("x", "a metric")}
    with pytest.raises(ValueError, match=r"w: only_with: nett is not a parameter"):
        declare_task("t-only-with", "m:C", metric="m", direction="minimize", metrics=metrics,
                     params=only_with(params, ["w"], nett=["a"]))
    with pytest.raises(ValueError, match=r"w: only_with: net='c': must be one of a, b"):
        declare_task("t-only-with", "m:C", metric="m", direction="minimize", metrics=metrics,
                     params=only_with(params, ["w"], net=["c"]))
    decl = only_with(params, ["w"], net=["a"])["w"]
    assert decl.idle_because({"net": "a"}) is None
    assert decl.idle_because({"net": "b"}) == "only with net=a; here net='b'"
