"""Convolutional VAE / AE on binarized MNIST: the beta and latent-size studies.

Reads top to bottom: data, model, likelihoods, evaluation (ELBO, IWAE, active units), the
training loop, the objective. Every likelihood metric is per instance, in nats:
`val_elbo` is the beta=1 ELBO whatever beta the model was trained with, so a beta sweep
is compared on one scale; `test_iwae_ll` is the importance-weighted bound (Burda et al.,
2016) with `iwae_k` samples on the same test examples as `test_elbo`, hence >= it in
expectation and a far tighter estimate of log p(x).

Speed: the whole set sits on the device as uint8 and batches are index slices; the
training loss is accumulated on the device and read once per epoch; bf16 autocast and
channels_last on CUDA. Evaluation runs in fp32 (bf16 logits would move a 784-pixel
log-likelihood by tenths of a nat).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bench.data import DATASETS, require_dataset, subsets
from bench.lifecycle import CHECKPOINT_FILE, EpochTrial, load_state
from bench.nets import ConvDecoder, ConvEncoder, bernoulli_log_px, binarize
from bench.params import Choice, Float, Int, Metric
from bench.registry import register_task
from bench.train import autocast, batches, generator
from bench.trial import TrialContext

PARAMS = {
    "dataset": Choice("mnist", DATASETS),
    "model": Choice("vae", ["vae", "ae"], help="ae: deterministic encoder, no KL (the "
                                               "baseline)"),
    "likelihood": Choice("bernoulli", ["bernoulli", "gaussian"],
                         help="bernoulli: binarized pixels; gaussian: intensities in [0,1]"),
    "binarize": Choice("static", ["static", "dynamic"],
                       help="static: pixel > 127; dynamic: resampled every batch"),
    "latent_dim": Int(16, 1, 4096),
    "depth": Int(2, 1, 8, help="conv layers; the first two halve the resolution"),
    "width": Int(32, 1, 1024, help="channels of the first conv, doubled when downsampling"),
    "beta": Float(1.0, 0.0, help="weight of the KL term in training (0 allowed)"),
    "kl_warmup_epochs": Float(0.0, 0.0, help="beta ramps linearly from 0 over these epochs"),
    "lr": Float(1e-3, high=10.0, above=0.0),
    "batch_size": Int(128, 1),
    "epochs": Int(10, 1, 100_000),
    "train_size": Int(None, 1, help="cap on training examples (default: all 50,000)"),
    "val_size": Int(10_000, 1, 59_999, help="carved from the training set, fixed seed"),
    "test_size": Int(None, 1, help="cap on test examples (default: all 10,000)"),
    "iwae_k": Int(200, 1, help="importance samples of test_iwae_ll (bench eval)"),
    "eval_batch_size": Int(1000, 1),
}
DEFAULTS = {k: d.default for k, d in PARAMS.items()}
NATS = "nats"
METRICS = {
    "train_loss": Metric(NATS, "training loss per image (the beta-weighted bound)", "train"),
    "val_elbo": Metric(NATS, "beta=1 ELBO per image, validation split", "val"),
    "val_recon": Metric(NATS, "-log p(x|z) per image, one sample, validation split", "val"),
    "val_kl": Metric(NATS, "KL(q(z|x) || p(z)) per image, validation split", "val"),
    "val_active_units": Metric("units", "latent dims with Cov_x E[z] > 0.01 (validation)",
                               "val"),
    "test_elbo": Metric(NATS, "beta=1 ELBO per image, test split", "test"),
    "test_recon": Metric(NATS, "-log p(x|z) per image, test split", "test"),
    "test_kl": Metric(NATS, "KL(q(z|x) || p(z)) per image, test split", "test"),
    "test_iwae_ll": Metric(NATS, "importance-weighted log p(x), iwae_k samples, test split",
                           "test"),
    "test_active_units": Metric("units", "latent dims with Cov_x E[z] > 0.01 (test)", "test"),
}
LOG_2PI = math.log(2 * math.pi)
ACTIVE_THRESHOLD = 0.01  # Burda et al. (2016): Cov_x(E_q[z_u]) > 0.01


# ---------------------------------------------------------------- data
def load_split(params: Mapping[str, Any], device: torch.device, data_dir: Path | None,
               test: bool = False) -> dict[str, torch.Tensor]:
    """uint8 training images; val (and test, when asked) binarized once, identically for
    every trial."""
    d = subsets(params["dataset"], device, data_dir, params["train_size"],
                params["test_size"], int(params["val_size"]))
    eval_gen = generator(device, 0)  # dynamic binarization: one fixed draw for evaluation
    lik, mode = params["likelihood"], params["binarize"]
    out = {"train": d["train"], "train_y": d["train_y"],
           "val": binarize(d["val"], mode, lik, eval_gen)}
    if test:
        out.update(test=binarize(d["test"], mode, lik, eval_gen), test_y=d["test_y"])
    return out


# ---------------------------------------------------------------- model
class VAE(nn.Module):
    def __init__(self, in_ch: int = 1, size: int = 28, width: int = 32, depth: int = 2,
                 latent_dim: int = 16, model: str = "vae", likelihood: str = "bernoulli"):
        super().__init__()
        self.config = dict(in_ch=in_ch, size=size, width=width, depth=depth,
                           latent_dim=latent_dim, model=model, likelihood=likelihood)
        self.variational, self.likelihood = model == "vae", likelihood
        code_dim = latent_dim * (2 if self.variational else 1)  # (mu, logvar) or z
        self.encoder = ConvEncoder(in_ch, size, width, depth, code_dim)
        self.decoder = ConvDecoder(in_ch, size, width, depth, latent_dim)
        # Gaussian likelihood: one learned scale shared by all pixels (the "sigma-VAE").
        self.log_sigma = nn.Parameter(torch.zeros(())) if likelihood == "gaussian" else None

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        h = self.encoder(x)
        if not self.variational:
            return h, None
        mu, logvar = h.chunk(2, dim=-1)
        return mu, logvar.clamp(-12.0, 8.0)  # keeps exp(logvar) finite in bf16

    def log_px(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """log p(x | z) per instance, summed over pixels (nats). `out` broadcasts over x."""
        if self.likelihood == "bernoulli":
            return bernoulli_log_px(out, x)
        assert self.log_sigma is not None
        ls = self.log_sigma.clamp(-7.0, 2.0)
        lp = -0.5 * ((x - out.float()) * torch.exp(-ls)) ** 2 - ls - 0.5 * LOG_2PI
        return lp.flatten(-3).sum(-1)


def kl_normal(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, exp(logvar)) || N(0, I)) per instance, analytic."""
    return 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar).sum(-1)


def log_normal(z: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    return (-0.5 * ((z - mu) ** 2 * torch.exp(-logvar) + logvar + LOG_2PI)).sum(-1)


# ---------------------------------------------------------------- evaluation
def noise(like: torch.Tensor, gen: torch.Generator | None,
          shape: tuple[int, ...] | None = None) -> torch.Tensor:
    """Standard normal noise from `gen` (the trial's own stream, or a fixed evaluation one)."""
    return torch.randn(shape or like.shape, generator=gen, device=like.device, dtype=like.dtype)


def eval_generator(device: torch.device) -> torch.Generator:
    """Evaluation draws one fixed noise sequence (seed 0) whatever the trial: every
    configuration is scored with the same random numbers, which narrows the differences
    between configurations that are down to sampling noise."""
    return generator(device, 0)


@torch.no_grad()
def elbo_terms(model: VAE, x: torch.Tensor, batch: int = 1000) -> dict[str, torch.Tensor]:
    """Per-instance single-sample ELBO, reconstruction (-log p(x|z)) and KL; AE: recon only."""
    model.eval()
    recon, kl, codes = [], [], []
    gen = eval_generator(x.device)
    for xb in x.split(batch):
        mu, logvar = model.encode(xb)
        if logvar is None:
            recon.append(-model.log_px(model.decoder(mu), xb))
        else:
            z = mu + noise(mu, gen) * torch.exp(0.5 * logvar)
            recon.append(-model.log_px(model.decoder(z), xb))
            kl.append(kl_normal(mu, logvar))
        codes.append(mu)
    out = {"recon": torch.cat(recon), "mu": torch.cat(codes)}
    if kl:
        out["kl"] = torch.cat(kl)
        out["elbo"] = -out["recon"] - out["kl"]
    return out


@torch.no_grad()
def iwae_ll(model: VAE, x: torch.Tensor, k: int, chunk: int = 2048) -> torch.Tensor:
    """log p(x) ~= log (1/K) sum_k p(x, z_k) / q(z_k | x), z_k ~ q(z | x); per instance."""
    model.eval()
    per_batch = max(1, chunk // k)
    out = []
    gen = eval_generator(x.device)
    for xb in x.split(per_batch):
        mu, logvar = model.encode(xb)
        assert logvar is not None, "IWAE needs a variational encoder"
        z = mu + noise(mu, gen, (k, *mu.shape)) * torch.exp(0.5 * logvar)
        logits = model.decoder(z.flatten(0, 1)).unflatten(0, (k, len(xb)))
        log_w = (model.log_px(logits, xb) + log_normal(z, torch.zeros_like(z), torch.zeros_like(z))
                 - log_normal(z, mu, logvar))
        out.append(torch.logsumexp(log_w, 0) - math.log(k))
    return torch.cat(out)


def active_units(mu: torch.Tensor) -> int:
    """Latent dimensions whose posterior mean varies across inputs: Cov_x(E_q[z_u]) > 0.01."""
    return int((mu.float().var(0) > ACTIVE_THRESHOLD).sum())


# ---------------------------------------------------------------- training
def train_epoch(model: VAE, opt: torch.optim.Optimizer, x_u8: torch.Tensor,
                params: Mapping[str, Any], beta: float, gen: torch.Generator,
                noise_gen: torch.Generator | None = None) -> torch.Tensor:
    """One pass; returns the mean training loss as a device tensor (read once, per epoch).
    `gen` orders the batches (and draws dynamic binarization), `noise_gen` the
    reparameterisation noise: both are the trial's own, so a trial's randomness does not
    depend on what else runs in the process."""
    model.train()
    dev = x_u8.device
    total = torch.zeros((), device=dev)
    for idx in batches(len(x_u8), int(params["batch_size"]), dev, gen):
        x = binarize(x_u8[idx], params["binarize"], params["likelihood"], gen)
        if dev.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(dev):
            mu, logvar = model.encode(x)
            if logvar is None:
                loss_i = -model.log_px(model.decoder(mu), x)
            else:
                z = mu + noise(mu, noise_gen) * torch.exp(0.5 * logvar)
                kl = kl_normal(mu.float(), logvar.float())
                loss_i = -model.log_px(model.decoder(z), x) + beta * kl
        loss = loss_i.mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        total += loss.detach() * len(idx)
    return total / len(x_u8)


def beta_at(params: Mapping[str, Any], epoch: int) -> float:
    warm = float(params["kl_warmup_epochs"])
    ramp = 1.0 if warm <= 0 else min(1.0, (epoch + 1) / warm)
    return float(params["beta"]) * ramp


def build_model(params: Mapping[str, Any], shape: tuple[int, ...], device: torch.device) -> VAE:
    model = VAE(shape[0], shape[-1], int(params["width"]), int(params["depth"]),
                int(params["latent_dim"]), params["model"], params["likelihood"]).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    return model


def data_check(params: Mapping[str, Any], data_dir: Path | None) -> None:
    """Before a run: the data set is present (DataError saying where it was looked for)."""
    require_dataset(params["dataset"], data_dir)


def load_model(params: Mapping[str, Any], folder: str | Path,
               device: str | torch.device = "cpu") -> VAE:
    """A finished trial's model, from its checkpoint and its parameters."""
    dev = torch.device(device)
    shape = (1, 28, 28) if params["dataset"] != "cifar10" else (3, 32, 32)
    model = build_model(params, shape, dev)
    state = load_state(Path(folder) / CHECKPOINT_FILE, dev)
    model.load_state_dict(state["trial"]["model"])
    return model.eval()


def _means(terms: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {f"{prefix}_{k}": v.mean() for k, v in terms.items() if k != "mu"}


SMOKE = {"epochs": 2, "train_size": 512, "val_size": 256, "test_size": 64, "iwae_k": 8,
         "latent_dim": 4, "width": 8, "batch_size": 64}


@register_task("vae", metric="val_elbo", direction="maximize", params=PARAMS, metrics=METRICS,
               smoke=SMOKE, data=data_check, fusable=True)
class VaeTrial(EpochTrial):
    """Convolutional VAE/AE on binarized MNIST; ELBO and IWAE log-likelihood in nats."""

    def __init__(self, params: Mapping[str, Any], ctx: TrialContext):
        super().__init__(params, ctx)
        self.data = load_split(params, ctx.device, ctx.data_dir)
        self.model = build_model(params, tuple(self.data["train"].shape[1:]), ctx.device)
        self.opt = torch.optim.Adam(self.model.parameters(), lr=float(params["lr"]))
        self.gen = generator(ctx.device, ctx.seed)
        self.noise_gen = generator(ctx.device, ctx.seed + 1_000_003)
        self.examples_per_epoch = len(self.data["train"])

    def sizes(self) -> dict[str, int]:
        d = load_split(self.params, self.ctx.device, self.ctx.data_dir, test=True)
        return {k: len(d[k]) for k in ("train", "val", "test")}

    def train_epoch(self, epoch: int) -> dict[str, torch.Tensor]:
        loss = train_epoch(self.model, self.opt, self.data["train"], self.params,
                           beta_at(self.params, epoch), self.gen, self.noise_gen)
        return {"train_loss": loss}

    def validate(self, epoch: int) -> dict[str, torch.Tensor]:
        self.val_terms = elbo_terms(self.model, self.data["val"],
                                    int(self.params["eval_batch_size"]))
        return _means(self.val_terms, "val")

    def finish(self) -> dict[str, float]:
        if not hasattr(self, "val_terms"):  # resumed after its last epoch
            self.validate(self.epochs - 1)
        return {"val_active_units": float(active_units(self.val_terms["mu"]))}

    def test(self) -> dict[str, float]:
        """Test ELBO terms, active units and (VAE) the IWAE bound with `iwae_k` samples."""
        data = load_split(self.params, self.ctx.device, self.ctx.data_dir, test=True)
        terms = elbo_terms(self.model, data["test"], int(self.params["eval_batch_size"]))
        metrics = {k: float(v) for k, v in _means(terms, "test").items()}
        metrics["test_active_units"] = float(active_units(terms["mu"]))
        if self.model.variational:
            metrics["test_iwae_ll"] = float(iwae_ll(self.model, data["test"],
                                                    int(self.params["iwae_k"])).mean())
        return metrics
