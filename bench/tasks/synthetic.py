"""An analytic objective with a simulated learning curve: the harness's own test bench.

Rosenbrock's function approached over `epochs` steps, with optional per-step sleep and
injected faults (an exception, a NaN, a hard crash at a given step). It exercises every
path of a backend (pruning, failures, suspend and resume, concurrency) in milliseconds, and
it is the trivial trial of the harness-overhead benchmarks. The optimum is 0 at x = y = 1.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from bench.fused import FusedGroup, Member
from bench.lifecycle import EpochTrial, TaskSpec
from bench.registry import register_fused
from bench.specs.synthetic import METRICS, PARAMS  # noqa: F401
from bench.trial import TrialContext


def rosenbrock(x: float, y: float) -> float:
    return (1.0 - x) ** 2 + 100.0 * (y - x * x) ** 2


class Synthetic(EpochTrial):
    """Rosenbrock with a simulated learning curve and fault injection, for harness tests."""

    def __init__(self, params: Mapping[str, Any], ctx: TrialContext):
        super().__init__(params, ctx)
        x, y = float(params["x"]), float(params["y"])
        self.final = rosenbrock(x, y)
        # noise seeded by the seed and the point: configurations do not share one draw
        point = np.frombuffer(np.array([x, y]).tobytes(), dtype=np.uint32)
        self.rng = np.random.default_rng([ctx.seed, *point.tolist()])

    def train_epoch(self, epoch: int) -> dict[str, float]:
        p = self.params
        if p["sleep_s"]:
            time.sleep(float(p["sleep_s"]))
        if p["fail"] != "none" and epoch == int(p["fail_at"]):
            if p["fail"] == "exception":
                raise RuntimeError(f"injected failure at step {epoch}")
            if p["fail"] == "crash":
                os._exit(137)
            return {"loss": math.nan}
        # The curve decays like a training loss and ends exactly at the final value.
        decay = 10.0 * (math.exp(-3.0 * (epoch + 1) / self.epochs) - math.exp(-3.0))
        return {"loss": self.final + decay + self.rng.normal(0, p["noise"])}

    def finish(self) -> dict[str, float]:
        return {"distance": math.hypot(float(self.params["x"]) - 1,
                                       float(self.params["y"]) - 1)}


@register_fused("synthetic")
class FusedSynthetic(FusedGroup):
    """K synthetic trials in one process, for the fused harness's own tests: each member
    computes exactly the curve it computes alone (its own seeded generator), faults
    included."""

    group_keys = ("epochs", "sleep_s")

    def __init__(self, spec: TaskSpec, k: int, template: Mapping[str, Any],
                 device: Any, data_dir: Any):
        super().__init__(spec, k, template, device, data_dir)
        self.slots: list[Synthetic | None] = [None] * k

    def set_member(self, slot: int, member: Member) -> None:
        self.slots[slot] = Synthetic(member.params, member.ctx)

    def drop_member(self, slot: int) -> None:
        self.slots[slot] = None

    def train_epoch(self, epochs: list[int | None]) -> dict[str, torch.Tensor]:
        if self.template["sleep_s"]:  # one sleep for the group: the point of fusing
            time.sleep(float(self.template["sleep_s"]))
        loss = [math.nan] * self.k
        for i, (trial, epoch) in enumerate(zip(self.slots, epochs, strict=True)):
            if trial is not None and epoch is not None:
                trial.params = {**trial.params, "sleep_s": 0.0}
                loss[i] = float(trial.train_epoch(epoch)["loss"])
        return {"loss": torch.tensor(loss, dtype=torch.float64)}

    def validate(self, slots: list[int], epochs: list[int]) -> dict[int, dict[str, Any]]:
        return {i: {} for i in slots}

    def finish(self, slot: int) -> dict[str, float]:
        trial = self.slots[slot]
        assert trial is not None
        return dict(trial.finish())

    def member_state(self, slot: int, optimizers: bool = True) -> dict[str, Any]:
        trial = self.slots[slot]
        assert trial is not None
        return trial.state_dict(optimizers)

    def load_member(self, slot: int, state: Mapping[str, Any]) -> None:
        trial = self.slots[slot]
        assert trial is not None
        trial.load_state_dict(state)

    def probe(self) -> None:
        pass
