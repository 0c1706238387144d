"""The synthetic task's declaration (the harness's own test bench): parameters, metrics.

The implementation and its fused form are bench.tasks.synthetic.
"""

from __future__ import annotations

from bench.params import Choice, Float, Int, Metric
from bench.registry import declare_task

PARAMS = {
    "x": Float(0.0, -10.0, 10.0),
    "y": Float(0.0, -10.0, 10.0),
    "epochs": Int(5, 1, 100_000),
    "noise": Float(0.0, 0.0, help="std of Gaussian noise added to every curve point (seeded "
                                   "by the seed and the point)"),
    "sleep_s": Float(0.0, 0.0, 3600.0, help="per step: stands in for training time",
                     execution=True),
    # fault injection is how a trial runs (a test of the harness), not what it computes
    "fail": Choice("none", ["none", "exception", "nan", "crash"],
                   help="crash: os._exit, a killed worker", execution=True),
    "fail_at": Int(0, 0, help="the step at which the fault happens", execution=True),
}
METRICS = {
    "loss": Metric("", "Rosenbrock's function, reached at the last step", "val"),
    "distance": Metric("", "distance of (x, y) from the optimum (1, 1)", "val"),
}


TASK = declare_task(
    "synthetic", "bench.tasks.synthetic:Synthetic", metric="loss", direction="minimize",
    params=PARAMS, metrics=METRICS, smoke={"epochs": 3, "noise": 0.1},
    doc="Rosenbrock with a simulated learning curve and fault injection, for harness tests.")
