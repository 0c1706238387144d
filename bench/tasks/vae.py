"""Convolutional VAE / AE on binarized MNIST: the beta and latent-size studies.

Reads top to bottom: data, model, likelihoods, evaluation (ELBO, IWAE, active units), the
training loop, the objective. Every likelihood metric is per instance, in nats:
`val_elbo` is the beta=1 ELBO whatever beta the model was trained with, so a beta sweep
is compared on one scale; `test_iwae_ll` is the importance-weighted bound (Burda et al.,
2016) with `iwae_k` samples on the same test examples as `test_elbo`, hence >= it in
expectation and a far tighter estimate of log p(x).

The original reports' settings are parameters: `arch` (their networks, bench.nets.ARCHS),
`likelihood=mse` (report 001's per-pixel mean squared error on grey levels: not a
log-likelihood, so such a model has `*_mse` and `*_kl` but no ELBO; its beta weighs the KL
in nats against a per-pixel mean, so beta = 1e-4 there equals a Gaussian ELBO with
sigma^2 = 784 x 1e-4 / 2, sigma = 0.2), and `kl=mc` (report 004's single-sample Monte Carlo
KL in the training loss; the reported KL is always the analytic one).

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

from bench.data import subsets
from bench.lifecycle import CHECKPOINT_FILE, EpochTrial, load_state
from bench.nets import ARCHS, bernoulli_log_px, binarize
from bench.specs.vae import DEFAULTS, METRICS, NATS, PARAMS, PIXEL, SMOKE  # noqa: F401
from bench.train import autocast, batches, generator
from bench.trial import TrialContext

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
                 latent_dim: int = 16, model: str = "vae", likelihood: str = "bernoulli",
                 arch: str = "conv"):
        super().__init__()
        self.config = dict(in_ch=in_ch, size=size, width=width, depth=depth,
                           latent_dim=latent_dim, model=model, likelihood=likelihood, arch=arch)
        self.variational, self.likelihood = model == "vae", likelihood
        code_dim = latent_dim * (2 if self.variational else 1)  # (mu, logvar) or z
        self.encoder, self.decoder = ARCHS[arch](in_ch, size, width, depth, code_dim,
                                                 latent_dim)
        # Gaussian likelihood: one learned scale shared by all pixels (the "sigma-VAE").
        self.log_sigma = nn.Parameter(torch.zeros(())) if likelihood == "gaussian" else None

    @property
    def has_likelihood(self) -> bool:
        """False for likelihood=mse: a squared error is no log-likelihood, so no ELBO."""
        return self.likelihood != "mse"

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        h = self.encoder(x)
        if not self.variational:
            return h, None
        mu, logvar = h.chunk(2, dim=-1)
        return mu, logvar.clamp(-12.0, 8.0)  # keeps exp(logvar) finite in bf16

    def mean(self, out: torch.Tensor) -> torch.Tensor:
        """The decoder's mean image: sigmoid of the output (Bernoulli probabilities; the
        reports' sigmoid output for mse), the output itself for the Gaussian."""
        out = out.float()
        return out if self.likelihood == "gaussian" else torch.sigmoid(out)

    def log_px(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """log p(x | z) per instance, summed over pixels (nats). `out` broadcasts over x."""
        if self.likelihood == "bernoulli":
            return bernoulli_log_px(out, x)
        assert self.log_sigma is not None, f"likelihood={self.likelihood} has no log p(x|z)"
        ls = self.log_sigma.clamp(-7.0, 2.0)
        lp = -0.5 * ((x - out.float()) * torch.exp(-ls)) ** 2 - ls - 0.5 * LOG_2PI
        return lp.flatten(-3).sum(-1)

    def recon_loss(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The reconstruction term of the training loss, per instance: -log p(x|z) in nats,
        or for mse the per-pixel mean squared error (torch.nn.MSELoss's scale)."""
        if self.has_likelihood:
            return -self.log_px(out, x)
        return pixel_mse(self.mean(out), x)


def pixel_mse(mean: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Mean over pixels of (mean - x)^2, per instance."""
    return (mean.float() - x).pow(2).flatten(1).mean(-1)


def kl_normal(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, exp(logvar)) || N(0, I)) per instance, analytic."""
    return 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar).sum(-1)


def log_normal(z: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    return (-0.5 * ((z - mu) ** 2 * torch.exp(-logvar) + logvar + LOG_2PI)).sum(-1)


def kl_monte_carlo(z: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """One-sample estimate log q(z|x) - log p(z) at z ~ q (report 004's training KL): unbiased
    for kl_normal, with variance that grows with the KL."""
    z, mu, logvar = z.float(), mu.float(), logvar.float()
    return log_normal(z, mu, logvar) - log_normal(z, torch.zeros_like(z), torch.zeros_like(z))


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
    """Per instance, at one z ~ q(z|x) (AE: the code): the reconstruction -log p(x|z), the
    analytic KL and the beta=1 ELBO (models with a likelihood), and the per-pixel squared
    error of the decoder mean (every model)."""
    model.eval()
    out: dict[str, list[torch.Tensor]] = {"mse": [], "mu": []}
    gen = eval_generator(x.device)
    for xb in x.split(batch):
        mu, logvar = model.encode(xb)
        z = mu if logvar is None else mu + noise(mu, gen) * torch.exp(0.5 * logvar)
        dec = model.decoder(z)
        if model.has_likelihood:
            out.setdefault("recon", []).append(-model.log_px(dec, xb))
        if logvar is not None:
            out.setdefault("kl", []).append(kl_normal(mu, logvar))
        out["mse"].append(pixel_mse(model.mean(dec), xb))
        out["mu"].append(mu)
    terms = {k: torch.cat(v) for k, v in out.items()}
    if "kl" in terms and "recon" in terms:
        terms["elbo"] = -terms["recon"] - terms["kl"]
    return terms


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
                noise_gen: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """One pass; the epoch means of the loss, the pixel MSE and (VAE) the analytic KL, as
    device tensors (read once, per epoch). `gen` orders the batches (and draws dynamic
    binarization), `noise_gen` the reparameterisation noise: both are the trial's own, so a
    trial's randomness does not depend on what else runs in the process."""
    model.train()
    dev = x_u8.device
    sums = {k: torch.zeros((), device=dev) for k in ("loss", "mse", "kl")}
    mc_kl = params["kl"] == "mc"
    for idx in batches(len(x_u8), int(params["batch_size"]), dev, gen):
        x = binarize(x_u8[idx], params["binarize"], params["likelihood"], gen)
        if dev.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(dev):
            mu, logvar = model.encode(x)
            z = mu if logvar is None else mu + noise(mu, noise_gen) * torch.exp(0.5 * logvar)
            out = model.decoder(z)
            loss_i = model.recon_loss(out, x)
            if logvar is not None:
                kl = kl_normal(mu.float(), logvar.float())
                loss_i = loss_i + beta * (kl_monte_carlo(z, mu, logvar) if mc_kl else kl)
                sums["kl"] += kl.detach().sum()
        loss = loss_i.mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sums["loss"] += loss.detach() * len(idx)
        sums["mse"] += pixel_mse(model.mean(out.detach()), x).sum()
    metrics = {"loss": sums["loss"], "mse": sums["mse"]}
    if model.variational:
        metrics["kl"] = sums["kl"]
    return {k: v / len(x_u8) for k, v in metrics.items()}


def beta_at(params: Mapping[str, Any], epoch: int) -> float:
    warm = float(params["kl_warmup_epochs"])
    ramp = 1.0 if warm <= 0 else min(1.0, (epoch + 1) / warm)
    return float(params["beta"]) * ramp


def build_model(params: Mapping[str, Any], shape: tuple[int, ...], device: torch.device) -> VAE:
    model = VAE(shape[0], shape[-1], int(params["width"]), int(params["depth"]),
                int(params["latent_dim"]), params["model"], params["likelihood"],
                params["arch"]).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    return model


def load_model(params: Mapping[str, Any], folder: str | Path,
               device: str | torch.device = "cpu") -> VAE:
    """A finished trial's model, from its checkpoint and its parameters."""
    dev = torch.device(device)
    shape = (1, 28, 28) if params["dataset"] != "cifar10" else (3, 32, 32)
    model = build_model({**DEFAULTS, **params}, shape, dev)  # rows older than `arch` lack it
    state = load_state(Path(folder) / CHECKPOINT_FILE, dev)
    model.load_state_dict(state["trial"]["model"])
    return model.eval()


def _means(terms: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {f"{prefix}_{k}": v.mean() for k, v in terms.items() if k != "mu"}


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
        means = train_epoch(self.model, self.opt, self.data["train"], self.params,
                            beta_at(self.params, epoch), self.gen, self.noise_gen)
        return {f"train_{k}": v for k, v in means.items()}

    def validate(self, epoch: int) -> dict[str, torch.Tensor]:
        self.val_terms = elbo_terms(self.model, self.data["val"],
                                    int(self.params["eval_batch_size"]))
        return _means(self.val_terms, "val")

    def finish(self) -> dict[str, float]:
        if not hasattr(self, "val_terms"):  # resumed after its last epoch
            self.validate(self.epochs - 1)
        return {"val_active_units": float(active_units(self.val_terms["mu"]))}

    def test(self) -> dict[str, float]:
        """Test ELBO terms, active units and (a VAE with a likelihood) the IWAE bound with
        `iwae_k` samples."""
        data = load_split(self.params, self.ctx.device, self.ctx.data_dir, test=True)
        terms = elbo_terms(self.model, data["test"], int(self.params["eval_batch_size"]))
        metrics = {k: float(v) for k, v in _means(terms, "test").items()}
        metrics["test_active_units"] = float(active_units(terms["mu"]))
        if self.model.variational and self.model.has_likelihood:
            metrics["test_iwae_ll"] = float(iwae_ll(self.model, data["test"],
                                                    int(self.params["iwae_k"])).mean())
        return metrics
