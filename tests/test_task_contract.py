"""One contract for every registered task (timm's habit): a tiny CPU run gives finite
metrics including the objective, a valid leaderboard row, and the same seed gives the same
objective."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from bench import leaderboard
from bench.backends._base import execute_trial, new_trial_uid
from bench.registry import list_tasks
from bench.space import merge_params, space_for
from bench.trial import local_context

TASKS = [t.name for t in list_tasks()]


def run_smoke(name: str, tmp: Path, seed: int = 0, device: str = "cpu"):
    task = next(t for t in list_tasks() if t.name == name)
    space = space_for(name)
    params = merge_params(task, space, None, {}, task.smoke)
    ctx = local_context(seed, device, tmp / f"art-{seed}-{new_trial_uid()}", space.metric)
    ident = {"task": name, "study": "contract", "variant": "default",
             "trial_uid": new_trial_uid(), "trial_number": 0, "backend": "test", "seed": seed}
    return execute_trial(task, params, ctx, ident, tmp / "lb", space.direction), ctx


@pytest.mark.parametrize("name", TASKS)
def test_task_contract(name: str, tmp_path: Path) -> None:
    outcome, ctx = run_smoke(name, tmp_path)
    assert outcome.state == "COMPLETE", outcome.error
    assert all(math.isfinite(v) for v in outcome.metrics.values())
    assert math.isfinite(outcome.objective)
    assert ctx.curve, "a task reports at least one curve point"

    rows = leaderboard.read_trials(tmp_path / "lb", name)
    assert len(rows) == 1
    row = rows.iloc[0]
    for col in (leaderboard.IDENTITY + leaderboard.RESULTS + leaderboard.COST
                + leaderboard.PROVENANCE):
        assert col in rows.columns, col
    assert row["state"] == "COMPLETE" and row["objective"] == pytest.approx(outcome.objective)
    assert row["metric"] == space_for(name).metric
    assert row[f"metric_{row['metric']}"] == pytest.approx(row["objective"])
    assert row["epochs_done"] >= 1 and row["duration_s"] > 0
    curves = leaderboard.read_curves(tmp_path / "lb", name, [row["trial_uid"]])
    assert len(curves) == len(ctx.curve)

    again, _ = run_smoke(name, tmp_path, seed=0)
    assert again.objective == pytest.approx(outcome.objective, rel=1e-5, abs=1e-6)


@pytest.mark.gpu
@pytest.mark.parametrize("name", TASKS)
def test_task_contract_on_cuda(name: str, tmp_path: Path) -> None:
    """The same tiny run on a GPU (bf16 autocast, device-resident data): it completes with
    finite metrics, its row names the GPU, and it lands near the CPU run's objective."""
    import torch

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
