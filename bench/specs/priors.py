"""The priors task's declaration: parameters, metrics, budget, rules (torch-free).

The implementation is bench.tasks.priors (PriorsTrial), its figures
bench.tasks.priors_plots.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from bench.datasets import DATASETS
from bench.params import Choice, Float, Int, Metric
from bench.registry import declare_task

FAMILIES = ("normal", "laplace", "uniform")  # bench.distributions.family_names()
MODELS = ("ad", "vad", "vae")
PARAMS = {
    "dataset": Choice("fashion-mnist", DATASETS, help="mnist works offline"),
    "prior": Choice("normal", list(FAMILIES), help="a family of bench.distributions"),
    "model": Choice("ad", MODELS),
    "arch": Choice("conv", ["conv", "dcgan"],
                   help="decoder: conv (nets.ConvDecoder, width x depth) or dcgan (the "
                        "study's ConvT-BN-ReLU x 2, ConvT, sigmoid, Linear(784, 784))"),
    "likelihood": Choice("bernoulli", ["bernoulli", "gaussian"],
                         help="bernoulli: binarised pixels; gaussian: grey levels in [0, 1], "
                              "pixel std `sigma`"),
    "sigma": Float(0.1, high=10.0, above=0.0, help="gaussian: pixel std on [0, 1] grey levels"),
    "vad_init": Choice("prior", ["prior", "per-class"],
                       help="vad: initial variational parameters of the training images, a "
                            "prior draw each, or one draw per class shared by its images "
                            "(the study's fix for its VAD)"),
    "latent_dim": Int(100, 1, 4096),
    "width": Int(32, 1, 1024, help="arch=conv: decoder (and encoder) channels"),
    "depth": Int(2, 1, 8, help="arch=conv: layers"),
    "lr": Float(1e-3, high=10.0, above=0.0, help="decoder and encoder"),
    "lr_codes": Float(1e-2, high=100.0, above=0.0,
                      help="per-image codes / variational parameters, train and fit"),
    "test_steps": Int(200, 0, help="code-fitting steps for held-out images (ad, vad)"),
    "beta": Float(1.0, 0.0, help="weight of KL (vad, vae) or of -log p(z) (ad)"),
    "init_std": Float(0.1, high=0.999, above=0.0,
                      help="vad: initial posterior std, relative to the prior's 1"),
    "epochs": Int(20, 1, 100_000),
    "batch_size": Int(128, 1),
    "train_size": Int(None, 1, help="cap on training images (default: all but val_size)"),
    "val_size": Int(1000, 1, 59_999, help="held-out training images scoring the search"),
    "test_size": Int(None, 1, help="cap on test images (default: all 10,000)",
                      execution=True),
    "iwae_k": Int(200, 1, execution=True),
    "eval_batch_size": Int(1000, 1, execution=True),
    "tsne_size": Int(1000, 0, help="test codes in the t-SNE artifact (0: none)",
                     execution=True),
}
DEFAULTS = {k: d.default for k, d in PARAMS.items()}
NATS = "nats"
GREY = "grey levels 0-255"
METRICS = {
    "train_loss": Metric(NATS, "training loss per image (MAP or negative beta-ELBO)", "train"),
    "train_recon": Metric(NATS, "-log p(x|z) per training image, epoch mean", "train"),
    "val_recon": Metric(NATS, "-log p(x|z) per held-out image at its fitted/encoded code",
                        "val"),
    "val_kl": Metric(NATS, "KL(q || p) per held-out image (variational models)", "val"),
    "test_recon": Metric(NATS, "-log p(x|z) per test image at its fitted/encoded code", "test"),
    "test_bce_per_pixel": Metric("nats/pixel", "test_recon / pixels (bernoulli)", "test"),
    "train_rmse": Metric(GREY, "RMSE of the decoded learned codes of the training images "
                         "(ad, vad; vae: encoded)", "train"),
    "val_rmse": Metric(GREY, "RMSE of the decoded fitted/encoded codes, held-out images",
                       "val"),
    "test_rmse": Metric(GREY, "RMSE of the decoded fitted/encoded codes, test images", "test"),
    "test_kl": Metric(NATS, "KL(q || p) per test image", "test"),
    "test_elbo": Metric(NATS, "beta=1 ELBO per test image, one sample", "test"),
    "test_iwae_ll": Metric(NATS, "importance-weighted log p(x) per test image", "test"),
}
SMOKE = {"dataset": "mnist", "model": "vad", "epochs": 1, "train_size": 128, "val_size": 32,
         "test_size": 32, "latent_dim": 4, "width": 4, "batch_size": 64, "test_steps": 3,
         "iwae_k": 2, "tsne_size": 0}  # vad: posterior, KL, code fitting and IWAE all run


def data_check(params: Mapping[str, Any], data_dir: Path | None) -> None:
    """Before a run: the data set is present (DataError saying where it was looked for)."""
    from bench.data import require_dataset  # torch: only when a run is checked

    require_dataset(params["dataset"], data_dir)


def rules(params: Mapping[str, Any]) -> list[str]:
    """Combinations that cannot run, found before anything starts."""
    if params["arch"] == "dcgan" and params["dataset"] == "cifar10":
        return ["arch: dcgan decodes 28x28 single-channel images (mnist, fashion-mnist), got "
                "dataset=cifar10"]
    return []


TASK = declare_task(
    "priors", "bench.tasks.priors:PriorsTrial", metric="val_recon", direction="minimize",
    params=PARAMS, metrics=METRICS, smoke=SMOKE, rules=rules, data=data_check,
    data_keys=("dataset",),
    doc="Normal/Laplace/Uniform latents in auto-decoders, VADs and VAEs; recon in nats/image.",
    modules=("bench.tasks.priors", "bench.tasks.priors_plots", "bench.tasks.priors_fused"))
