"""Normal, Laplace and Uniform latents in auto-decoders, variational auto-decoders and VAEs.

The original study trained an auto-decoder (`ad`: a decoder and one learned code per training
image, no encoder) and a variational auto-decoder (`vad`: per-image variational parameters,
reparameterised) on Fashion-MNIST with 100 latents, and compared the latent families; `vae`
(an encoder) is the amortised baseline. All three share `vae.ConvDecoder`. Test images have no
codes: `ad` and `vad` fit them with the decoder frozen (`test_steps` Adam steps, `lr_codes`),
`vae` encodes them.

Losses, per image, in nats, on statically binarised pixels (Bernoulli likelihood):
- `ad`: MAP, -log p(x | z) - beta * log p(z): the prior is the code regulariser (L2 for Normal,
  L1 for Laplace, nothing inside the support for Uniform, whose codes are kept inside it).
- `vad`, `vae`: the negative beta-ELBO, -E_q log p(x | z) + beta * KL(q || p), with q and p of
  the same family (bench.distributions), the KL analytic where torch has it.

Metrics: `test_recon` (the objective) and `train_recon` are -log p(x | z) summed over the 784
pixels (BCE nats per image) at the image's code: the AD code, or the posterior mean. Divide by
784 for the per-pixel mean BCE that the original study reported (`test_bce_per_pixel`; it used
grey-level targets, so its 0.11 is not on this scale). Variational models add `test_kl`,
`test_elbo` (beta = 1, one sample) and `test_iwae_ll` (Burda et al. 2016, `iwae_k` samples).
The objective needs the test-time fit, so it is computed once, at the end; per-epoch curves
carry the training loss only (no pruning on the objective: search with `--pruner none`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from bench.data import require_dataset, subsets
from bench.distributions import Family, family_names, get_family, kl
from bench.errors import check_rules
from bench.registry import register_task
from bench.tasks.vae import ConvDecoder, ConvEncoder, bernoulli_log_px, binarize
from bench.train import autocast, batches, generator
from bench.trial import TrialContext

DEFAULTS: dict[str, Any] = {
    "dataset": "fashion-mnist",  # mnist works offline
    "prior": "normal",           # a family of bench.distributions: normal | laplace | uniform
    "model": "ad",               # ad | vad | vae
    "latent_dim": 100,
    "width": 32,                 # decoder (and encoder) channels, as in vae.ConvDecoder
    "depth": 2,
    "lr": 1e-3,                  # decoder and encoder
    "lr_codes": 1e-2,            # per-image codes / variational parameters, train and test
    "test_steps": 200,           # test-time code fitting (ad, vad); vae encodes
    "beta": 1.0,                 # weight of KL (vad, vae) or of -log p(z) (ad)
    "init_std": 0.1,             # vad: initial posterior std, relative to the prior's 1
    "epochs": 20,
    "batch_size": 128,
    "train_size": None,          # cap on training images (default: all 60,000)
    "test_size": None,           # cap on test images (default: all 10,000)
    "iwae_k": 200,
    "eval_batch_size": 1000,
    "tsne_size": 1000,           # test codes in the t-SNE artifact (0: none)
}
MODELS = ("ad", "vad", "vae")
GRID = 64  # images in each artifact grid (8 x 8)


# ---------------------------------------------------------------- data
def load_data(params: Mapping[str, Any], device: torch.device,
              data_dir: Path | None) -> dict[str, torch.Tensor]:
    """uint8 training images (binarised per batch) and binarised test images, on the device."""
    d = subsets(params["dataset"], device, data_dir, params["train_size"], params["test_size"])
    return {**d, "test": binarize(d["test"], "static", "bernoulli")}


# ---------------------------------------------------------------- model
class LatentModel(nn.Module):
    """One decoder; raw latent parameters from a per-image table (ad, vad) or an encoder (vae).

    Raw parameters are unconstrained: `latent_dim` values for `ad` (mapped into the prior's
    support by `family.point`), 2 x `latent_dim` (a, b) for the variational models.
    """

    def __init__(self, family: Family, kind: str, n_train: int, in_ch: int, size: int,
                 width: int, depth: int, latent_dim: int, init_std: float):
        super().__init__()
        self.family, self.kind, self.latent_dim, self.init_std = family, kind, latent_dim, init_std
        self.config = dict(family=family.name, kind=kind, n_train=n_train, in_ch=in_ch,
                           size=size, width=width, depth=depth, latent_dim=latent_dim,
                           init_std=init_std)
        self.variational = kind != "ad"
        raw_dim = latent_dim * (2 if self.variational else 1)
        self.decoder = ConvDecoder(in_ch, size, width, depth, latent_dim)
        self.encoder = ConvEncoder(in_ch, size, width, depth, raw_dim) if kind == "vae" else None
        # sparse=True: SparseAdam moves only the rows of the batch; dense Adam would keep
        # moving every code on stale momentum, 60,000 x 100 values per step.
        self.codes = nn.Embedding(n_train, raw_dim, sparse=True) if kind != "vae" else None
        if self.codes is not None:
            with torch.no_grad():
                self.codes.weight.copy_(self.init_raw(n_train, torch.device("cpu")))

    def prior(self) -> torch.distributions.Distribution:
        return self.family.prior(self.decoder.fc.weight.device)

    def init_raw(self, n: int, device: torch.device) -> torch.Tensor:
        """Codes at prior samples; variational: located there, `init_std` wide."""
        z = self.family.prior(device).sample((n, self.latent_dim))
        a = self.family.unpoint(z)
        if not self.variational:
            return a
        return torch.cat([a, torch.full_like(a, self.family.raw_spread(self.init_std))], -1)

    def raw(self, idx: torch.Tensor | None = None, x: torch.Tensor | None = None) -> torch.Tensor:
        if self.encoder is not None:
            assert x is not None
            return self.encoder(x)
        assert self.codes is not None and idx is not None
        return self.codes(idx)

    def posterior(self, raw: torch.Tensor) -> torch.distributions.Distribution:
        a, b = raw.float().chunk(2, dim=-1)
        return self.family.posterior(a, b)

    def code(self, raw: torch.Tensor) -> torch.Tensor:
        """The image's point code: the AD code, or the posterior mean."""
        return self.posterior(raw).mean if self.variational else self.family.point(raw.float())


def loss_terms(model: LatentModel, raw: torch.Tensor, x: torch.Tensor,
               beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, recon) per image: MAP for ad, negative beta-ELBO (one sample) otherwise."""
    if model.variational:
        q = model.posterior(raw)
        z = q.rsample()
        reg = kl(q, model.prior()).sum(-1)
    else:
        z = model.family.point(raw.float())
        reg = -model.prior().log_prob(z).sum(-1)
    with autocast(x.device):
        logits = model.decoder(z)
    recon = -bernoulli_log_px(logits, x)
    return recon + beta * reg, recon


# ---------------------------------------------------------------- training
def make_optimizers(model: LatentModel, params: Mapping[str, Any]) -> list[torch.optim.Optimizer]:
    nets = [p for n, p in model.named_parameters() if not n.startswith("codes.")]
    opts: list[torch.optim.Optimizer] = [torch.optim.Adam(nets, lr=float(params["lr"]))]
    if model.codes is not None:
        opts.append(torch.optim.SparseAdam(list(model.codes.parameters()),
                                           lr=float(params["lr_codes"])))
    return opts


def train_epoch(model: LatentModel, opts: list[torch.optim.Optimizer], x_u8: torch.Tensor,
                params: Mapping[str, Any], gen: torch.Generator) -> tuple[torch.Tensor, ...]:
    """One pass; mean loss and recon as device tensors (read once per epoch)."""
    model.train()
    dev = x_u8.device
    total, recon_total = torch.zeros((), device=dev), torch.zeros((), device=dev)
    for idx in batches(len(x_u8), int(params["batch_size"]), dev, gen):
        x = binarize(x_u8[idx], "static", "bernoulli")
        with autocast(dev):
            raw = model.raw(idx, x)
        loss_i, recon_i = loss_terms(model, raw, x, float(params["beta"]))
        for opt in opts:
            opt.zero_grad(set_to_none=True)
        loss_i.mean().backward()
        for opt in opts:
            opt.step()
        total += loss_i.detach().sum()
        recon_total += recon_i.detach().sum()
    return total / len(x_u8), recon_total / len(x_u8)


def fit_codes(model: LatentModel, x: torch.Tensor, steps: int, lr: float, beta: float,
              batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Test-time fit of new codes with the decoder frozen: (raw codes, mean recon per step).

    The loss is summed over images, so each image's code sees only its own gradient and the
    result does not depend on `batch` (Adam is per coordinate).
    """
    model.eval()
    model.decoder.requires_grad_(False)
    raws, history = [], torch.zeros(steps, device=x.device)
    try:
        for xb in x.split(batch):
            raw = model.init_raw(len(xb), x.device).requires_grad_(True)
            opt = torch.optim.Adam([raw], lr=lr)
            for step in range(steps):
                loss_i, recon_i = loss_terms(model, raw, xb, beta)
                opt.zero_grad(set_to_none=True)
                loss_i.sum().backward()
                opt.step()
                history[step] += recon_i.detach().sum()
            raws.append(raw.detach())
    finally:
        model.decoder.requires_grad_(True)
    return torch.cat(raws), history / len(x)


@torch.no_grad()
def encode_all(model: LatentModel, x: torch.Tensor, batch: int) -> torch.Tensor:
    model.eval()
    return torch.cat([model.raw(x=xb) for xb in x.split(batch)])


# ---------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate(model: LatentModel, raw: torch.Tensor, x: torch.Tensor, batch: int,
             iwae_k: int) -> dict[str, torch.Tensor]:
    """Per image: recon at the point code; variational: KL, one-sample ELBO, IWAE (k > 0)."""
    model.eval()
    prior = model.prior()
    out: dict[str, list[torch.Tensor]] = {"recon": [], "code": []}
    for rb, xb in zip(raw.split(batch), x.split(batch), strict=True):
        code = model.code(rb)
        out["code"].append(code)
        out["recon"].append(-bernoulli_log_px(model.decoder(code), xb))
        if model.variational:
            q = model.posterior(rb)
            kl_i = kl(q, prior).sum(-1)
            out.setdefault("kl", []).append(kl_i)
            log_px = bernoulli_log_px(model.decoder(q.sample()), xb)
            out.setdefault("elbo", []).append(log_px - kl_i)
            if iwae_k > 0:
                out.setdefault("iwae_ll", []).append(iwae_ll(model, rb, xb, iwae_k))
    return {k: torch.cat(v) for k, v in out.items()}


def iwae_ll(model: LatentModel, raw: torch.Tensor, x: torch.Tensor, k: int,
            chunk: int = 2048) -> torch.Tensor:
    """log p(x) ~= logsumexp_k [log p(x|z_k) + log p(z_k) - log q(z_k)] - log k, z_k ~ q."""
    prior, out = model.prior(), []
    per = max(1, chunk // k)  # images per decoder call: k x per <= chunk decodes
    for rb, xb in zip(raw.split(per), x.split(per), strict=True):
        q = model.posterior(rb)
        z = q.sample((k,))
        logits = model.decoder(z.flatten(0, 1)).unflatten(0, (k, len(xb)))
        log_w = bernoulli_log_px(logits, xb) + prior.log_prob(z).sum(-1) - q.log_prob(z).sum(-1)
        out.append(torch.logsumexp(log_w, 0) - math.log(k))
    return torch.cat(out)


def _mean(terms: Mapping[str, torch.Tensor], prefix: str) -> dict[str, float]:
    return {f"{prefix}_{k}": float(v.float().mean()) for k, v in terms.items() if k != "code"}


# ---------------------------------------------------------------- artifacts
@torch.no_grad()
def decode_grids(model: LatentModel, test_x: torch.Tensor, test_codes: torch.Tensor,
                 n: int = GRID) -> dict[str, np.ndarray]:
    """uint8 [n, H, W]: test images, their decoded codes, decoded prior samples."""
    z = model.prior().sample((n, model.latent_dim))

    def u8(t: torch.Tensor) -> np.ndarray:
        return (t.float().clamp(0, 1) * 255).round().to(torch.uint8)[:, 0].cpu().numpy()

    return {"test": u8(test_x[:n]), "decoded": u8(torch.sigmoid(model.decoder(test_codes[:n]))),
            "prior_samples": u8(torch.sigmoid(model.decoder(z)))}


def save_artifacts(model: LatentModel, folder: Path, grids: Mapping[str, Any],
                   codes: torch.Tensor, labels: torch.Tensor, tsne_size: int, seed: int,
                   metrics: Mapping[str, float]) -> None:
    """grids.npz and PNG grids, t-SNE of test codes, and the networks (not the code tables)."""
    from torchvision.utils import save_image

    np.savez_compressed(folder / "grids.npz", **grids)
    for name in ("decoded", "prior_samples"):
        images = torch.from_numpy(grids[name]).float().div(255).unsqueeze(1)
        save_image(images, folder / f"{name}.png", nrow=8, padding=1)
    nets = {k: v for k, v in model.state_dict().items() if not k.startswith("codes.")}
    torch.save({"config": model.config, "state_dict": nets, "metrics": dict(metrics)},
               folder / "model.pt")
    if tsne_size > 0:
        save_tsne(codes[:tsne_size].cpu().numpy(), labels[:tsne_size].cpu().numpy(),
                  folder / "tsne.png", seed)


def save_tsne(codes: np.ndarray, labels: np.ndarray, path: Path, seed: int) -> None:
    from matplotlib.figure import Figure
    from sklearn.manifold import TSNE

    perplexity = min(30.0, (len(codes) - 1) / 3)  # sklearn needs perplexity < n
    xy = TSNE(2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(codes)
    np.savez_compressed(path.with_suffix(".npz"), xy=xy, labels=labels)
    fig = Figure(figsize=(5, 5))
    ax = fig.add_subplot()
    sc = ax.scatter(xy[:, 0], xy[:, 1], c=labels, cmap="tab10", s=4, vmin=-0.5, vmax=9.5)
    fig.colorbar(sc, ax=ax, ticks=range(10), label="class")
    ax.set(title=f"t-SNE of {len(codes)} test codes", xticks=[], yticks=[])
    fig.savefig(path, dpi=100, bbox_inches="tight")


# ---------------------------------------------------------------- objective
def check_params(params: Mapping[str, Any]) -> None:
    """Every bad value at once (ConfigError); run per trial, as sampled values vary."""
    check_rules("priors", params, [
        ("model", params["model"] in MODELS, f"must be one of {', '.join(MODELS)}"),
        ("prior", params["prior"] in family_names(),
         f"must be one of {', '.join(family_names())}"),
        ("beta", float(params["beta"]) >= 0, "must be >= 0"),
        ("latent_dim", int(params["latent_dim"]) >= 1, "must be >= 1"),
        ("depth", int(params["depth"]) >= 1, "must be >= 1"),
        ("test_steps", int(params["test_steps"]) >= 0, "must be >= 0"),
        ("init_std", 0 < float(params["init_std"]) < 1, "must be in (0, 1)"),
        ("iwae_k", int(params["iwae_k"]) >= 1, "must be >= 1"),
        ("tsne_size", int(params["tsne_size"]) >= 0, "must be >= 0")])


def preflight(params: Mapping[str, Any], data_dir: Path | None) -> None:
    """Before a run: the values, then the data set's presence (DataError)."""
    check_params(params)
    require_dataset(params["dataset"], data_dir)


def build_model(params: Mapping[str, Any], n_train: int, shape: tuple[int, ...],
                device: torch.device) -> LatentModel:
    return LatentModel(get_family(params["prior"]), params["model"], n_train, shape[0],
                       shape[-1], int(params["width"]), int(params["depth"]),
                       int(params["latent_dim"]), float(params["init_std"])).to(device)


SMOKE = {"dataset": "mnist", "model": "vad", "epochs": 1, "train_size": 128, "test_size": 32,
         "latent_dim": 4, "width": 4, "batch_size": 64, "test_steps": 3, "iwae_k": 2,
         "tsne_size": 0}  # vad: posterior, KL, test-time fit and IWAE all run


@register_task("priors", metric="test_recon", direction="minimize", defaults=DEFAULTS,
               smoke=SMOKE, check=preflight)
def priors(params: Mapping[str, Any], ctx: TrialContext) -> dict[str, float]:
    """Normal/Laplace/Uniform latents in auto-decoders, VADs and VAEs; recon in nats/image."""
    check_params(params)
    data = load_data(params, ctx.device, ctx.data_dir)
    model = build_model(params, len(data["train"]), tuple(data["train"].shape[1:]), ctx.device)
    opts, gen = make_optimizers(model, params), generator(ctx.device, ctx.seed)
    for epoch in range(int(params["epochs"])):
        loss, recon = train_epoch(model, opts, data["train"], params, gen)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"training loss is {float(loss)} at epoch {epoch}")
        ctx.report(epoch, train_loss=float(loss), epoch_recon=float(recon))
    bs, beta = int(params["eval_batch_size"]), float(params["beta"])
    train_x = binarize(data["train"], "static", "bernoulli")
    if model.kind == "vae":
        train_raw, test_raw = encode_all(model, train_x, bs), encode_all(model, data["test"], bs)
    else:
        assert model.codes is not None
        train_raw = model.codes.weight.detach()
        test_raw, _ = fit_codes(model, data["test"], int(params["test_steps"]),
                                float(params["lr_codes"]), beta, bs)
    train = evaluate(model, train_raw, train_x, bs, iwae_k=0)
    test = evaluate(model, test_raw, data["test"], bs, int(params["iwae_k"]))
    train.pop("elbo", None)  # a one-sample ELBO on training codes says nothing new
    metrics = {**_mean(train, "train"), **_mean(test, "test")}
    metrics["test_bce_per_pixel"] = metrics["test_recon"] / data["test"][0].numel()
    grids = decode_grids(model, data["test"], test["code"])
    save_artifacts(model, ctx.artifact_dir, grids, test["code"], data["test_y"],
                   int(params["tsne_size"]), ctx.seed, metrics)
    return metrics
