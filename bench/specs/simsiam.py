"""The simsiam task's declaration: parameters, metrics, budget (torch-free).

The implementation and figures are bench.tasks.simsiam (SimSiamTrial).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from bench.datasets import DATASETS
from bench.params import Bool, Choice, Float, Int, Metric
from bench.registry import declare_task

PARAMS = {
    "dataset": Choice("cifar10", DATASETS),
    "backbone": Choice("resnet18", ["resnet18", "small"],
                       help="resnet18 (CIFAR stem) | small (3 convs, for CPU runs)"),
    "width": Int(32, 1, 1024, help="small backbone: channels of its first conv (x2, x4)"),
    "proj_hidden": Int(2048, 1, help="projector: 3 layers with BN, hidden width"),
    "proj_dim": Int(2048, 1, help="projector output (the paper's 2048)"),
    "pred_hidden": Int(512, 1, help="predictor bottleneck (2048-512-2048 in the paper)"),
    "proj_out_bn": Bool(True, help="BN (no affine) on the projector's output, as in the "
                                   "paper; false: it ends in a plain linear layer",
                        since="2026-12-01"),
    "predictor": Choice("mlp", ["mlp", "identity"],
                        help="identity: the paper's collapsing ablation"),
    "stop_grad": Bool(True, help="false: the other collapsing ablation"),
    "fix_pred_lr": Bool(False, help="the predictor keeps the initial lr (no cosine decay)"),
    "base_lr": Float(0.03, high=100.0, above=0.0, help="lr = base_lr x batch_size / 256"),
    "momentum": Float(0.9, 0.0, 1.0),
    "weight_decay": Float(5e-4, 0.0),
    "batch_size": Int(512, 2, help=">= 2: BatchNorm needs two examples"),
    "epochs": Int(100, 1, 100_000),
    "train_size": Int(None, 1, help="cap on training images (a fixed random subset)"),
    "val_size": Int(5000, 1, 49_999, help="held-out training images: kNN queries of the "
                                          "search"),
    "test_size": Int(None, 1, help="cap on test images (kNN queries of bench eval)",
                      execution=True),
    "min_scale": Float(0.2, high=1.0, above=0.0, help="RandomResizedCrop scale lower bound"),
    "knn_every": Int(1, 1, help="monitor interval in epochs (the last epoch always)"),
    "knn_k": Int(200, 1),
    "knn_t": Float(0.1, above=0.0),
    "eval_batch_size": Int(1024, 1, execution=True),
}
DEFAULTS = {k: d.default for k, d in PARAMS.items()}
METRICS = {
    "train_loss": Metric("neg. cosine", "symmetric SimSiam loss, epoch mean (min -1)", "train"),
    "val_knn_acc": Metric("fraction", "weighted kNN accuracy of held-out training images "
                          "against the training set's backbone features", "val"),
    "val_collapse_std": Metric("", "std of l2-normalised projector outputs x sqrt(d): ~1 "
                               "healthy, 0 collapsed (held-out images)", "val"),
    "test_knn_acc": Metric("fraction", "weighted kNN accuracy of the test set", "test"),
    "test_collapse_std": Metric("", "collapse_std on the test set", "test"),
}
SMOKE = {"dataset": "mnist", "backbone": "small", "width": 8, "proj_hidden": 32, "proj_dim": 32,
         "pred_hidden": 8, "batch_size": 64, "epochs": 2, "train_size": 256, "val_size": 128,
         "test_size": 128, "knn_k": 20, "eval_batch_size": 256}


def data_check(params: Mapping[str, Any], data_dir: Path | None) -> None:
    """Before a run: the data set is present (DataError saying where it was looked for)."""
    from bench.data import require_dataset  # torch: only when a run is checked

    require_dataset(params["dataset"], data_dir)


TASK = declare_task(
    "simsiam", "bench.tasks.simsiam:SimSiamTrial", metric="val_knn_acc", direction="maximize",
    params=PARAMS, metrics=METRICS, smoke=SMOKE, data=data_check, data_keys=("dataset",),
    doc="SimSiam self-supervised pretraining; kNN accuracy, loss and collapse monitors.")
