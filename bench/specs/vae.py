"""The vae task's declaration: parameters, metrics, budget, rules (torch-free).

The implementation is bench.tasks.vae (VaeTrial), its figures bench.tasks.vae_plots, its
fused implementation bench.tasks.vae_fused.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from bench.datasets import DATASETS
from bench.params import Choice, Float, Int, Metric, only_with
from bench.registry import declare_task

ARCH_NAMES = ("conv", "lrelu16", "bn256")  # bench.nets.ARCHS
FIXED_SIZE_ARCHS = ("lrelu16", "bn256")  # 28x28 single-channel images only

PARAMS = {
    "dataset": Choice("mnist", DATASETS),
    "model": Choice("vae", ["vae", "ae"], help="ae: deterministic encoder, no KL (the "
                                               "baseline)"),
    "arch": Choice("conv", list(ARCH_NAMES),
                   help="conv: width x depth SiLU net; lrelu16: report 000's 16-32-32-32 "
                        "LeakyReLU net; bn256: report 001's 32-64-128-256 BatchNorm net"),
    "likelihood": Choice("bernoulli", ["bernoulli", "gaussian", "mse"],
                         help="bernoulli: binarized pixels; gaussian: intensities in [0,1], "
                              "learned sigma; mse: per-pixel mean squared error of a sigmoid "
                              "output on intensities (report 001; no log-likelihood)"),
    "kl": Choice("analytic", ["analytic", "mc"],
                 help="KL term of the training loss: analytic, or one-sample Monte Carlo "
                      "log q(z|x) - log p(z) at the reparameterised z (report 004)"),
    "binarize": Choice("static", ["static", "dynamic"],
                       help="static: pixel > 127; dynamic: resampled every batch"),
    "latent_dim": Int(16, 1, 4096),
    "depth": Int(2, 1, 8, help="arch=conv: conv layers; the first two halve the resolution"),
    "width": Int(32, 1, 1024, help="arch=conv: channels of the first conv, doubled when "
                                   "downsampling"),
    "beta": Float(1.0, 0.0, help="weight of the KL term in training (0 allowed)"),
    "kl_warmup_epochs": Float(0.0, 0.0, help="beta ramps linearly from 0 over these epochs"),
    "lr": Float(1e-3, high=10.0, above=0.0),
    "batch_size": Int(128, 1),
    "epochs": Int(10, 1, 100_000),
    "train_size": Int(None, 1, help="cap on training examples (default: all 50,000)"),
    "val_size": Int(10_000, 1, 59_999, help="carved from the training set, fixed seed"),
    "test_size": Int(None, 1, help="cap on test examples (default: all 10,000)",
                      execution=True),
    "iwae_k": Int(200, 1, help="importance samples of test_iwae_ll (bench eval)",
                  execution=True),
    "eval_batch_size": Int(1000, 1, execution=True),
}
PARAMS = only_with(PARAMS, ["beta", "kl", "kl_warmup_epochs"], model=["vae"])  # an AE: no KL
PARAMS = only_with(PARAMS, ["depth", "width"], arch=["conv"])  # the others are fixed nets
DEFAULTS = {k: d.default for k, d in PARAMS.items()}
NATS = "nats"
PIXEL = "per pixel"
METRICS = {
    "train_loss": Metric(NATS, "training loss per image (the beta-weighted bound; "
                         "likelihood=mse: mse + beta x KL)", "train"),
    "train_mse": Metric(PIXEL, "squared error of the decoder mean, per pixel, at the training "
                        "z (train mode), epoch mean", "train"),
    "train_kl": Metric(NATS, "KL(q(z|x) || p(z)) per image (analytic), epoch mean", "train"),
    "val_elbo": Metric(NATS, "beta=1 ELBO per image, validation split", "val"),
    "val_recon": Metric(NATS, "-log p(x|z) per image, one sample, validation split", "val"),
    "val_kl": Metric(NATS, "KL(q(z|x) || p(z)) per image, validation split", "val"),
    "val_mse": Metric(PIXEL, "squared error of the decoder mean at one z ~ q(z|x) (AE: the "
                      "code), per pixel on [0,1] targets, validation split", "val"),
    "val_active_units": Metric("units", "latent dims with Cov_x E[z] > 0.01 (validation)",
                               "val"),
    "test_elbo": Metric(NATS, "beta=1 ELBO per image, test split", "test"),
    "test_recon": Metric(NATS, "-log p(x|z) per image, test split", "test"),
    "test_kl": Metric(NATS, "KL(q(z|x) || p(z)) per image, test split", "test"),
    "test_mse": Metric(PIXEL, "squared error of the decoder mean at one z ~ q(z|x) (AE: the "
                       "code), per pixel on [0,1] targets, test split", "test"),
    "test_iwae_ll": Metric(NATS, "importance-weighted log p(x), iwae_k samples, test split",
                           "test"),
    "test_active_units": Metric("units", "latent dims with Cov_x E[z] > 0.01 (test)", "test"),
}
LIKELIHOODS = ["bernoulli", "gaussian"]  # likelihood=mse has no log-likelihood
METRICS = only_with(METRICS, ["train_kl", "val_kl", "test_kl"], model=["vae"])  # an AE: no KL
METRICS = only_with(METRICS, ["val_recon", "test_recon"], likelihood=LIKELIHOODS)
METRICS = only_with(METRICS, ["val_elbo", "test_elbo", "test_iwae_ll"], model=["vae"],
                    likelihood=LIKELIHOODS)
SMOKE = {"epochs": 2, "train_size": 512, "val_size": 256, "test_size": 64, "iwae_k": 8,
         "latent_dim": 4, "width": 8, "batch_size": 64}



def data_check(params: Mapping[str, Any], data_dir: Path | None) -> None:
    """Before a run: the data set is present (DataError saying where it was looked for)."""
    from bench.data import require_dataset  # torch: only when a run is checked

    require_dataset(params["dataset"], data_dir)


def rules(params: Mapping[str, Any]) -> list[str]:
    """Combinations that cannot run, found before anything starts."""
    found = []
    if params["arch"] in FIXED_SIZE_ARCHS and params["dataset"] == "cifar10":
        found.append(f"arch: {params['arch']} is built for 28x28 single-channel images "
                     f"(mnist, fashion-mnist), got dataset={params['dataset']}")
    return found



TASK = declare_task(
    "vae", "bench.tasks.vae:VaeTrial", metric="val_elbo", direction="maximize",
    params=PARAMS, metrics=METRICS, smoke=SMOKE, rules=rules, data=data_check,
    data_keys=("dataset",),
    doc="Convolutional VAE/AE on binarized MNIST; ELBO and IWAE log-likelihood in nats.",
    modules=("bench.tasks.vae", "bench.tasks.vae_plots", "bench.tasks.vae_fused"))
