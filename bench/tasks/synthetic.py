"""An analytic objective with a simulated learning curve: the harness's own test bench.

Rosenbrock's function approached over `epochs` steps, with optional per-step sleep and
injected faults (an exception, a NaN, a hard crash at a given step). It exercises every
path of a backend (pruning, failures, resume, concurrency) in milliseconds, and it is the
trivial trial of the harness-overhead benchmarks. The optimum is 0 at x = y = 1.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Mapping
from typing import Any

import numpy as np

from bench.registry import register_task
from bench.trial import TrialContext

DEFAULTS: dict[str, Any] = {
    "x": 0.0,
    "y": 0.0,
    "epochs": 5,
    "noise": 0.0,         # std of Gaussian noise added to every curve point (seeded)
    "sleep_s": 0.0,       # per step: stands in for training time
    "fail": "none",       # none | exception | nan | crash (os._exit: a killed worker)
    "fail_at": 0,         # step at which the fault happens
}


def rosenbrock(x: float, y: float) -> float:
    return (1.0 - x) ** 2 + 100.0 * (y - x * x) ** 2


@register_task("synthetic", metric="loss", direction="minimize", defaults=DEFAULTS,
               smoke={"epochs": 3, "noise": 0.1})
def synthetic(params: Mapping[str, Any], ctx: TrialContext) -> dict[str, float]:
    """Rosenbrock with a simulated learning curve and fault injection, for harness tests."""
    final = rosenbrock(float(params["x"]), float(params["y"]))
    rng = np.random.default_rng(ctx.seed)
    epochs = int(params["epochs"])
    loss, first = final, 0
    state = ctx.load_state()  # a suspended (preempted) attempt of this trial left its state
    if state is not None:
        first, loss, rng.bit_generator.state = state["next_step"], state["loss"], state["rng"]
    for step in range(first, epochs):
        if params["sleep_s"]:
            time.sleep(float(params["sleep_s"]))
        if params["fail"] != "none" and step == int(params["fail_at"]):
            if params["fail"] == "exception":
                raise RuntimeError(f"injected failure at step {step}")
            if params["fail"] == "crash":
                os._exit(137)
            if params["fail"] == "nan":
                loss = math.nan
                break
        # The curve decays like a training loss and ends exactly at the final value.
        decay = 10.0 * (math.exp(-3.0 * (step + 1) / epochs) - math.exp(-3.0))
        loss = final + decay + rng.normal(0, params["noise"])
        ctx.report(step, loss=loss)
        if ctx.should_stop():
            ctx.suspend({"next_step": step + 1, "loss": loss, "rng": rng.bit_generator.state})
    return {"loss": loss, "distance": math.hypot(float(params["x"]) - 1, float(params["y"]) - 1)}
