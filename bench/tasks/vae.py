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
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from bench.data import require_dataset, subsets
from bench.errors import check_rules
from bench.registry import register_task
from bench.train import autocast, batches, generator
from bench.trial import TrialContext

DEFAULTS: dict[str, Any] = {
    "dataset": "mnist",
    "model": "vae",              # vae | ae (deterministic encoder, no KL: the baseline)
    "likelihood": "bernoulli",   # bernoulli (binarized pixels) | gaussian (intensities in [0,1])
    "binarize": "static",        # static: pixel > 127 | dynamic: resampled every batch
    "latent_dim": 16,
    "depth": 2,                  # conv layers; the first two halve the resolution
    "width": 32,                 # channels of the first conv layer, doubled when downsampling
    "beta": 1.0,                 # weight of the KL term in training (0 allowed)
    "kl_warmup_epochs": 0.0,     # beta ramps linearly from 0 over this many epochs
    "lr": 1e-3,
    "batch_size": 128,
    "epochs": 10,
    "train_size": None,          # cap on training examples (default: all 50,000)
    "val_size": 10_000,          # carved from the training set with a fixed seed
    "test_size": None,           # cap on test examples (default: all 10,000)
    "iwae_k": 200,
    "eval_batch_size": 1000,
}
LOG_2PI = math.log(2 * math.pi)
ACTIVE_THRESHOLD = 0.01  # Burda et al. (2016): Cov_x(E_q[z_u]) > 0.01


# ---------------------------------------------------------------- data
def binarize(x_u8: torch.Tensor, mode: str, likelihood: str,
             gen: torch.Generator | None = None) -> torch.Tensor:
    """uint8 images -> model inputs: {0,1} for Bernoulli, [0,1] for Gaussian."""
    x = x_u8.float().div_(255.0)
    if likelihood == "gaussian":
        return x
    if mode == "dynamic":
        return torch.bernoulli(x, generator=gen)
    return (x_u8 > 127).float()


def load_split(params: Mapping[str, Any], device: torch.device,
               data_dir: Path | None) -> dict[str, torch.Tensor]:
    """uint8 training images; val/test binarized once, identically for every trial."""
    d = subsets(params["dataset"], device, data_dir, params["train_size"],
                params["test_size"], int(params["val_size"]))
    eval_gen = generator(device, 0)  # dynamic binarization: one fixed draw for evaluation
    lik, mode = params["likelihood"], params["binarize"]
    return {"train": d["train"], "train_y": d["train_y"],
            "val": binarize(d["val"], mode, lik, eval_gen),
            "test": binarize(d["test"], mode, lik, eval_gen), "test_y": d["test_y"]}


# ---------------------------------------------------------------- model
def _sizes(size: int, depth: int) -> list[int]:
    """Edge length after each downsampling conv (k=4, s=2, p=1 maps n to n // 2)."""
    sizes = [size]
    for _ in range(min(depth, 2)):
        sizes.append(sizes[-1] // 2)
    return sizes


class ConvEncoder(nn.Module):
    """depth conv layers (the first two stride 2) -> linear to `out_dim`."""

    def __init__(self, in_ch: int, size: int, width: int, depth: int, out_dim: int):
        super().__init__()
        layers: list[nn.Module] = []
        ch = in_ch
        for i in range(depth):
            down = i < 2
            out = width * 2 ** min(i, 1)
            layers += [nn.Conv2d(ch, out, 4 if down else 3, 2 if down else 1, 1), nn.SiLU()]
            ch = out
        self.features = nn.Sequential(*layers, nn.Flatten())
        self.head = nn.Linear(ch * _sizes(size, depth)[-1] ** 2, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class ConvDecoder(nn.Module):
    """The encoder mirrored: linear -> stride-1 convs -> transposed convs back to `size`."""

    def __init__(self, out_ch: int, size: int, width: int, depth: int, latent_dim: int):
        super().__init__()
        sizes = _sizes(size, depth)
        self.ch, self.s = width * 2 ** min(depth - 1, 1), sizes[-1]
        self.fc = nn.Linear(latent_dim, self.ch * self.s**2)
        layers: list[nn.Module] = [nn.SiLU()]
        for _ in range(depth - (len(sizes) - 1)):
            layers += [nn.Conv2d(self.ch, self.ch, 3, 1, 1), nn.SiLU()]
        ch = self.ch
        for i in reversed(range(len(sizes) - 1)):  # sizes[i+1] -> sizes[i]
            out = out_ch if i == 0 else width
            extra = sizes[i] - 2 * sizes[i + 1]  # 1 where the target edge is odd
            layers.append(nn.ConvTranspose2d(ch, out, 4, 2, 1, output_padding=extra))
            if i > 0:
                layers.append(nn.SiLU())
            ch = out
        self.net = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(self.fc(z).view(-1, self.ch, self.s, self.s))


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


def bernoulli_log_px(logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Bernoulli log p(x | z) per image, summed over pixels (nats); logits broadcast over x."""
    logits = logits.float()
    lp = -F.binary_cross_entropy_with_logits(logits, x.expand_as(logits), reduction="none")
    return lp.flatten(-3).sum(-1)


def kl_normal(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, exp(logvar)) || N(0, I)) per instance, analytic."""
    return 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar).sum(-1)


def log_normal(z: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    return (-0.5 * ((z - mu) ** 2 * torch.exp(-logvar) + logvar + LOG_2PI)).sum(-1)


# ---------------------------------------------------------------- evaluation
@torch.no_grad()
def elbo_terms(model: VAE, x: torch.Tensor, batch: int = 1000) -> dict[str, torch.Tensor]:
    """Per-instance single-sample ELBO, reconstruction (-log p(x|z)) and KL; AE: recon only."""
    model.eval()
    recon, kl, codes = [], [], []
    for xb in x.split(batch):
        mu, logvar = model.encode(xb)
        if logvar is None:
            recon.append(-model.log_px(model.decoder(mu), xb))
        else:
            z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)
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
    for xb in x.split(per_batch):
        mu, logvar = model.encode(xb)
        assert logvar is not None, "IWAE needs a variational encoder"
        z = mu + torch.randn((k, *mu.shape), device=mu.device) * torch.exp(0.5 * logvar)
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
                params: Mapping[str, Any], beta: float, gen: torch.Generator) -> torch.Tensor:
    """One pass; returns the mean training loss as a device tensor (read once, per epoch)."""
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
                z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)
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


def check_params(params: Mapping[str, Any]) -> None:
    """Every bad value at once (ConfigError); run per trial, as sampled values vary."""
    check_rules("vae", params, [
        ("model", params["model"] in ("vae", "ae"), "must be vae or ae"),
        ("likelihood", params["likelihood"] in ("bernoulli", "gaussian"),
         "must be bernoulli or gaussian"),
        ("binarize", params["binarize"] in ("static", "dynamic"), "must be static or dynamic"),
        ("beta", float(params["beta"]) >= 0, "must be >= 0"),
        ("depth", int(params["depth"]) >= 1, "must be >= 1"),
        ("latent_dim", int(params["latent_dim"]) >= 1, "must be >= 1"),
        ("iwae_k", int(params["iwae_k"]) >= 1, "must be >= 1"),
        ("val_size", 0 < int(params["val_size"]) < 60_000, "must be in (0, 60000)")])


def preflight(params: Mapping[str, Any], data_dir: Path | None) -> None:
    """Before a run: the values, then the data set's presence (DataError)."""
    check_params(params)
    require_dataset(params["dataset"], data_dir)


def save_checkpoint(model: VAE, path: Path, metrics: Mapping[str, float]) -> None:
    torch.save({"config": model.config, "state_dict": model.state_dict(),
                "metrics": dict(metrics)}, path)


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> VAE:
    blob = torch.load(path, map_location=device, weights_only=True)
    model = VAE(**blob["config"]).to(device)
    model.load_state_dict(blob["state_dict"])
    return model.eval()


def _means(terms: Mapping[str, torch.Tensor], prefix: str) -> dict[str, float]:
    return {f"{prefix}_{k}": float(v.mean()) for k, v in terms.items() if k != "mu"}


SMOKE = {"epochs": 2, "train_size": 512, "val_size": 256, "test_size": 64, "iwae_k": 8,
         "latent_dim": 4, "width": 8, "batch_size": 64}


@register_task("vae", metric="val_elbo", direction="maximize", defaults=DEFAULTS, smoke=SMOKE,
               check=preflight)
def vae(params: Mapping[str, Any], ctx: TrialContext) -> dict[str, float]:
    """Convolutional VAE/AE on binarized MNIST; ELBO and IWAE log-likelihood in nats."""
    check_params(params)
    data = load_split(params, ctx.device, ctx.data_dir)
    model = build_model(params, tuple(data["train"].shape[1:]), ctx.device)
    opt = torch.optim.Adam(model.parameters(), lr=float(params["lr"]))
    gen = generator(ctx.device, ctx.seed)
    eval_bs = int(params["eval_batch_size"])
    train_s, seen, first = 0.0, 0, 0  # train_s: training epochs only, not validation
    val: dict[str, float] = {}
    state = ctx.load_state()  # left by a suspended (preempted) attempt of this trial
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        gen.set_state(state["gen"].to(gen.get_state().device))
        first, seen, val = state["next_epoch"], state["seen"], state["val"]
        train_s = state["train_s"]
        torch.set_rng_state(state["torch_rng"].cpu())  # the reparameterisation noise
        if ctx.device.type == "cuda":
            torch.cuda.set_rng_state(state["cuda_rng"].cpu(), ctx.device)
    for epoch in range(first, int(params["epochs"])):
        t0 = time.perf_counter()
        loss = train_epoch(model, opt, data["train"], params, beta_at(params, epoch), gen)
        if not torch.isfinite(loss):  # the epoch's one host sync, so the timing is complete
            raise FloatingPointError(f"training loss is {float(loss)} at epoch {epoch}")
        train_s += time.perf_counter() - t0
        seen += len(data["train"])
        val = _means(elbo_terms(model, data["val"], eval_bs), "val")
        ctx.report(epoch, train_loss=float(loss), **val)
        if ctx.should_stop():  # preemption notice: save at this epoch boundary and yield
            ctx.suspend({"next_epoch": epoch + 1, "model": model.state_dict(),
                         "opt": opt.state_dict(), "gen": gen.get_state(), "seen": seen,
                         "val": val, "train_s": train_s,
                         "torch_rng": torch.get_rng_state(),
                         "cuda_rng": torch.cuda.get_rng_state(ctx.device)
                         if ctx.device.type == "cuda" else None})
    test_terms = elbo_terms(model, data["test"], eval_bs)
    metrics = {**val, **_means(test_terms, "test"),
               "active_units": float(active_units(test_terms["mu"])),
               "train_images_per_s": seen / max(train_s, 1e-9)}
    if model.variational:
        metrics["test_iwae_ll"] = float(iwae_ll(model, data["test"], int(params["iwae_k"])).mean())
    save_checkpoint(model, ctx.artifact_dir / "model.pt", metrics)
    return metrics
