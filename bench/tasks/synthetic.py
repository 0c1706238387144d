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

from bench.lifecycle import EpochTrial
from bench.params import Choice, Float, Int, Metric
from bench.registry import register_task
from bench.trial import TrialContext

PARAMS = {
    "x": Float(0.0, -10.0, 10.0),
    "y": Float(0.0, -10.0, 10.0),
    "epochs": Int(5, 1, 100_000),
    "noise": Float(0.0, 0.0, help="std of Gaussian noise added to every curve point (seeded "
                                   "by the seed and the point)"),
    "sleep_s": Float(0.0, 0.0, 3600.0, help="per step: stands in for training time"),
    "fail": Choice("none", ["none", "exception", "nan", "crash"],
                   help="crash: os._exit, a killed worker"),
    "fail_at": Int(0, 0, help="the step at which the fault happens"),
}
METRICS = {
    "loss": Metric("", "Rosenbrock's function, reached at the last step", "val"),
    "distance": Metric("", "distance of (x, y) from the optimum (1, 1)", "val"),
}


def rosenbrock(x: float, y: float) -> float:
    return (1.0 - x) ** 2 + 100.0 * (y - x * x) ** 2


@register_task("synthetic", metric="loss", direction="minimize", params=PARAMS,
               metrics=METRICS, smoke={"epochs": 3, "noise": 0.1}, fusable=False)
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
