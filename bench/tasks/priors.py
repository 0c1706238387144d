"""Normal, Laplace and Uniform latents in auto-decoders, variational auto-decoders and VAEs.

The original study trained an auto-decoder (`ad`: a decoder and one learned code per training
image, no encoder) and a variational auto-decoder (`vad`: per-image variational parameters,
reparameterised) on Fashion-MNIST with 100 latents, and compared the latent families; `vae`
(an encoder) is the amortised baseline. All three share `vae.ConvDecoder`. Test images have no
codes: `ad` and `vad` fit them with the decoder frozen (`test_steps` Adam steps, `lr_codes`),
`vae` encodes them.

Losses, per image, in nats, on statically binarised pixels (`likelihood=bernoulli`) or on
grey levels in [0, 1] with a Gaussian of fixed pixel std `sigma` (`likelihood=gaussian`, the
original study's grey-level targets):
- `ad`: MAP, -log p(x | z) - beta * log p(z): the prior is the code regulariser (L2 for Normal,
  L1 for Laplace, nothing inside the support for Uniform, whose codes are kept inside it).
- `vad`, `vae`: the negative beta-ELBO, -E_q log p(x | z) + beta * KL(q || p), with q and p of
  the same family (bench.distributions), the KL analytic where torch has it.

`arch=dcgan` is the study's decoder (bench.nets.DcganLinearDecoder); `vad_init=per-class` its
initialisation of the VAD's per-image variational parameters: every training image of one
class starts from the same draw (10 draws, assigned by label), which the study needed for
its VAD to train (its AD started from a prior draw per image).

Metrics, in nats per image (784 pixels for MNIST-sized images): `val_recon` (the objective)
is -log p(x | z) at the code of held-out training images (`val_size`, never trained on):
fitted with the decoder frozen for `ad` and `vad`, encoded for `vae`; it is computed once, at
the end, so search with `--pruner none`. `bench eval` (or a variant) adds the same on the
test split (`test_recon`; `test_bce_per_pixel` = test_recon / pixels for the Bernoulli)
and, for the variational models, `test_kl`, `test_elbo` (beta = 1, one sample) and
`test_iwae_ll` (Burda et al. 2016, `iwae_k` samples). `*_rmse` is the root mean squared
error of the decoded point code in grey levels (0-255), on the learned codes of the
training images (`train_rmse`), the fitted codes of held-out and test images. The study's
own "evaluation loss" was ||x - x_hat||_2 / numel(x) per batch on 0-255 targets (its course's
`reconstruction_loss`), which is RMSE / sqrt(numel): with batches of 64, RMSE / 224.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from bench.data import subsets
from bench.distributions import Family, get_family, kl
from bench.lifecycle import EpochTrial
from bench.nets import (
    ConvDecoder,
    ConvEncoder,
    DcganLinearDecoder,
    bernoulli_log_px,
    binarize,
    gaussian_log_px,
)
from bench.specs.priors import (  # noqa: F401
    DEFAULTS,
    GREY,
    METRICS,
    MODELS,
    NATS,
    PARAMS,
    SMOKE,
)
from bench.train import autocast, batches, generator
from bench.trial import TrialContext

GRID = 64  # images in each artifact grid (8 x 8)


# ---------------------------------------------------------------- data
def load_data(params: Mapping[str, Any], device: torch.device,
              data_dir: Path | None) -> dict[str, torch.Tensor]:
    """uint8 training images (prepared per batch); prepared validation and test images:
    binarised at 0.5 for the Bernoulli, grey levels in [0, 1] for the Gaussian."""
    d = subsets(params["dataset"], device, data_dir, params["train_size"], params["test_size"],
                int(params["val_size"]))
    lik = params["likelihood"]
    return {**d, "val": binarize(d["val"], "static", lik),
            "test": binarize(d["test"], "static", lik)}


# ---------------------------------------------------------------- model
class LatentModel(nn.Module):
    """One decoder; raw latent parameters from a per-image table (ad, vad) or an encoder (vae).

    Raw parameters are unconstrained: `latent_dim` values for `ad` (mapped into the prior's
    support by `family.point`), 2 x `latent_dim` (a, b) for the variational models.
    """

    def __init__(self, family: Family, kind: str, n_train: int, in_ch: int, size: int,
                 width: int, depth: int, latent_dim: int, init_std: float,
                 arch: str = "conv", likelihood: str = "bernoulli", sigma: float = 0.1,
                 labels: torch.Tensor | None = None):
        super().__init__()
        self.family, self.kind, self.latent_dim, self.init_std = family, kind, latent_dim, init_std
        self.likelihood, self.sigma = likelihood, sigma
        self.config = dict(family=family.name, kind=kind, n_train=n_train, in_ch=in_ch,
                           size=size, width=width, depth=depth, latent_dim=latent_dim,
                           init_std=init_std, arch=arch, likelihood=likelihood, sigma=sigma)
        self.variational = kind != "ad"
        raw_dim = latent_dim * (2 if self.variational else 1)
        self.decoder: nn.Module = (DcganLinearDecoder(in_ch, size, latent_dim) if arch == "dcgan"
                                   else ConvDecoder(in_ch, size, width, depth, latent_dim))
        self.encoder = ConvEncoder(in_ch, size, width, depth, raw_dim) if kind == "vae" else None
        # sparse=True: SparseAdam moves only the rows of the batch; dense Adam would keep
        # moving every code on stale momentum, 60,000 x 100 values per step.
        self.codes = nn.Embedding(n_train, raw_dim, sparse=True) if kind != "vae" else None
        if self.codes is not None:
            with torch.no_grad():
                self.codes.weight.copy_(self.initial_codes(n_train, labels))

    def initial_codes(self, n: int, labels: torch.Tensor | None) -> torch.Tensor:
        """The training codes' start: a prior draw per image, or (labels given) per class."""
        cpu = torch.device("cpu")
        if labels is None:
            return self.init_raw(n, cpu)
        labels = labels.cpu()
        return self.init_raw(int(labels.max()) + 1, cpu)[labels]

    def prior(self) -> torch.distributions.Distribution:
        """The prior on the decoder's device, built once per device (its parameters are
        copied from the host: on CUDA a copy per training step would wait for the GPU)."""
        device = next(self.decoder.parameters()).device
        cached = getattr(self, "_prior", None)
        if cached is None or cached[0] != device:
            self._prior = (device, self.family.prior(device))
        return self._prior[1]

    def log_px(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """log p(x | z) per image, summed over pixels (nats): Bernoulli logits or the
        Gaussian mean with pixel std `sigma`; `out` broadcasts over x."""
        if self.likelihood == "bernoulli":
            return bernoulli_log_px(out, x)
        return gaussian_log_px(out, x, self.sigma)

    def mean(self, out: torch.Tensor) -> torch.Tensor:
        """The decoded image in [0, 1]: Bernoulli probabilities, or the clipped Gaussian mean."""
        out = out.float()
        return torch.sigmoid(out) if self.likelihood == "bernoulli" else out.clamp(0.0, 1.0)

    def init_raw(self, n: int, device: torch.device,
                 gen: torch.Generator | None = None) -> torch.Tensor:
        """Codes at prior samples (from `gen`; None: the global RNG, seeded with the trial);
        variational: located there, `init_std` wide."""
        with torch.no_grad():
            z = self.family.rsample(self.family.prior(device), (n, self.latent_dim), gen)
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


def loss_terms(model: LatentModel, raw: torch.Tensor, x: torch.Tensor, beta: float,
               gen: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, recon) per image: MAP for ad, negative beta-ELBO (one sample, its noise from
    `gen`) otherwise."""
    if model.variational:
        q = model.posterior(raw)
        z = model.family.rsample(q, (), gen)
        reg = kl(q, model.prior()).sum(-1)
    else:
        z = model.family.point(raw.float())
        reg = -model.prior().log_prob(z).sum(-1)
    with autocast(x.device):
        logits = model.decoder(z)
    recon = -model.log_px(logits, x)
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
                params: Mapping[str, Any], gen: torch.Generator,
                noise_gen: torch.Generator) -> tuple[torch.Tensor, ...]:
    """One pass (data order from `gen`, sampling noise from `noise_gen`); mean loss and
    recon as device tensors (read once per epoch)."""
    model.train()
    dev = x_u8.device
    total, recon_total = torch.zeros((), device=dev), torch.zeros((), device=dev)
    for idx in batches(len(x_u8), int(params["batch_size"]), dev, gen):
        x = binarize(x_u8[idx], "static", params["likelihood"])
        with autocast(dev):
            raw = model.raw(idx, x)
        loss_i, recon_i = loss_terms(model, raw, x, float(params["beta"]), noise_gen)
        for opt in opts:
            opt.zero_grad(set_to_none=True)
        loss_i.mean().backward()
        for opt in opts:
            opt.step()
        total += loss_i.detach().sum()
        recon_total += recon_i.detach().sum()
    return total / len(x_u8), recon_total / len(x_u8)


def fit_codes(model: LatentModel, x: torch.Tensor, steps: int, lr: float, beta: float,
              batch: int, gen: torch.Generator | None = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Test-time fit of new codes with the decoder frozen: (raw codes, mean recon per step).

    The loss is summed over images, so each image's code sees only its own gradient and the
    result does not depend on `batch` (Adam is per coordinate). Initial codes and
    sampling noise come from `gen` (None: the global RNG).
    """
    model.eval()
    model.decoder.requires_grad_(False)
    raws, history = [], torch.zeros(steps, device=x.device)
    try:
        for xb in x.split(batch):
            raw = model.init_raw(len(xb), x.device, gen).requires_grad_(True)
            opt = torch.optim.Adam([raw], lr=lr)
            for step in range(steps):
                loss_i, recon_i = loss_terms(model, raw, xb, beta, gen)
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
             iwae_k: int, gen: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """Per image: recon and the mean squared error of the decoded image (`mse`, on [0, 1]) at
    the point code; variational: KL, one-sample ELBO, IWAE (k > 0), samples from `gen`."""
    model.eval()
    prior = model.prior()
    out: dict[str, list[torch.Tensor]] = {"recon": [], "mse": [], "code": []}
    for rb, xb in zip(raw.split(batch), x.split(batch), strict=True):
        code = model.code(rb)
        out["code"].append(code)
        dec = model.decoder(code)
        out["recon"].append(-model.log_px(dec, xb))
        out["mse"].append((model.mean(dec) - xb).pow(2).flatten(1).mean(-1))
        if model.variational:
            q = model.posterior(rb)
            kl_i = kl(q, prior).sum(-1)
            out.setdefault("kl", []).append(kl_i)
            log_px = model.log_px(model.decoder(model.family.rsample(q, (), gen)), xb)
            out.setdefault("elbo", []).append(log_px - kl_i)
            if iwae_k > 0:
                out.setdefault("iwae_ll", []).append(iwae_ll(model, rb, xb, iwae_k, gen=gen))
    return {k: torch.cat(v) for k, v in out.items()}


def iwae_ll(model: LatentModel, raw: torch.Tensor, x: torch.Tensor, k: int,
            chunk: int = 2048, gen: torch.Generator | None = None) -> torch.Tensor:
    """log p(x) ~= logsumexp_k [log p(x|z_k) + log p(z_k) - log q(z_k)] - log k, z_k ~ q."""
    prior, out = model.prior(), []
    per = max(1, chunk // k)  # images per decoder call: k x per <= chunk decodes
    for rb, xb in zip(raw.split(per), x.split(per), strict=True):
        q = model.posterior(rb)
        z = model.family.rsample(q, (k,), gen)
        logits = model.decoder(z.flatten(0, 1)).unflatten(0, (k, len(xb)))
        log_w = model.log_px(logits, xb) + prior.log_prob(z).sum(-1) - q.log_prob(z).sum(-1)
        out.append(torch.logsumexp(log_w, 0) - math.log(k))
    return torch.cat(out)


def _mean(terms: Mapping[str, torch.Tensor], prefix: str) -> dict[str, float]:
    """Means per image; the squared errors as one RMSE over every pixel, in grey levels."""
    out = {f"{prefix}_{k}": float(v.float().mean()) for k, v in terms.items()
           if k not in ("code", "mse")}
    out[f"{prefix}_rmse"] = rmse_grey(terms["mse"])
    return out


def rmse_grey(mse: torch.Tensor) -> float:
    """Root mean squared error over every pixel of every image, in grey levels (0-255), from
    per-image mean squared errors on [0, 1] (images of equal size: the mean of means)."""
    return 255.0 * math.sqrt(float(mse.double().mean()))


# ---------------------------------------------------------------- artifacts
@torch.no_grad()
def decode_grids(model: LatentModel, test_x: torch.Tensor, test_codes: torch.Tensor,
                 n: int = GRID) -> dict[str, np.ndarray]:
    """uint8 [n, H, W]: test images, their decoded codes, decoded prior samples."""
    z = model.prior().sample((n, model.latent_dim))

    def u8(t: torch.Tensor) -> np.ndarray:
        return (t.float().clamp(0, 1) * 255).round().to(torch.uint8)[:, 0].cpu().numpy()

    return {"test": u8(test_x[:n]), "decoded": u8(model.mean(model.decoder(test_codes[:n]))),
            "prior_samples": u8(model.mean(model.decoder(z)))}


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


# ---------------------------------------------------------------- the trial
def build_model(params: Mapping[str, Any], n_train: int, shape: tuple[int, ...],
                device: torch.device, labels: torch.Tensor | None = None) -> LatentModel:
    """The model; `labels` (the training labels) are used by vad_init=per-class only."""
    per_class = params["vad_init"] == "per-class" and params["model"] == "vad"
    return LatentModel(get_family(params["prior"]), params["model"], n_train, shape[0],
                       shape[-1], int(params["width"]), int(params["depth"]),
                       int(params["latent_dim"]), float(params["init_std"]), params["arch"],
                       params["likelihood"], float(params["sigma"]),
                       labels if per_class else None).to(device)


@torch.no_grad()
def train_mse(model: LatentModel, x_u8: torch.Tensor, likelihood: str,
              batch: int) -> torch.Tensor:
    """Per-image mean squared error of the decoded learned codes (ad, vad: the table's
    point codes; vae: encoded) of the training images, eval mode."""
    model.eval()
    out = []
    for start in range(0, len(x_u8), batch):
        idx = torch.arange(start, min(start + batch, len(x_u8)), device=x_u8.device)
        x = binarize(x_u8[idx], "static", likelihood)
        code = model.code(model.raw(idx, x))
        out.append((model.mean(model.decoder(code)) - x).pow(2).flatten(1).mean(-1))
    return torch.cat(out)


def new_codes(model: LatentModel, x: torch.Tensor, params: Mapping[str, Any],
              gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Raw latent parameters of new images, encoded (vae) or fitted (ad, vad: with the
    fit's recon per step)."""
    bs = int(params["eval_batch_size"])
    if model.kind == "vae":
        return encode_all(model, x, bs), None
    return fit_codes(model, x, int(params["test_steps"]), float(params["lr_codes"]),
                     float(params["beta"]), bs, gen)


def val_metrics(model: LatentModel, x: torch.Tensor, params: Mapping[str, Any],
                gen: torch.Generator) -> dict[str, float]:
    """val_recon, val_kl, val_rmse of held-out images at their fitted/encoded codes."""
    raw, _ = new_codes(model, x, params, gen)
    terms = evaluate(model, raw, x, int(params["eval_batch_size"]), iwae_k=0, gen=gen)
    return {k: v for k, v in _mean(terms, "val").items()
            if k in ("val_recon", "val_kl", "val_rmse")}


NOISE_SEED_OFFSET = 1_000_003  # the sampling noise's generator is seeded seed + this


class PriorsTrial(EpochTrial):
    """Normal/Laplace/Uniform latents in auto-decoders, VADs and VAEs; recon in nats/image."""

    def __init__(self, params: Mapping[str, Any], ctx: TrialContext):
        super().__init__(params, ctx)
        self.data = load_data(params, ctx.device, ctx.data_dir)
        train = self.data["train"]
        self.model = build_model(params, len(train), tuple(train.shape[1:]), ctx.device,
                                 self.data["train_y"])
        self.opts = make_optimizers(self.model, params)
        self.gen = generator(ctx.device, ctx.seed)  # data order
        # reparameterisation noise, code fitting and evaluation samples (one stream a
        # fused member reproduces: bench.tasks.priors_fused)
        self.noise_gen = generator(ctx.device, ctx.seed + NOISE_SEED_OFFSET)
        self.examples_per_epoch = len(train)

    def sizes(self) -> dict[str, int]:
        return {k: len(self.data[k]) for k in ("train", "val", "test")}

    def train_epoch(self, epoch: int) -> dict[str, torch.Tensor]:
        loss, recon = train_epoch(self.model, self.opts, self.data["train"], self.params,
                                  self.gen, self.noise_gen)
        return {"train_loss": loss, "train_recon": recon}

    def validate(self, epoch: int) -> dict[str, float]:
        """Held-out codes are fitted once, after the last epoch (the fit costs test_steps
        decoder passes per image)."""
        if epoch < self.epochs - 1:
            return {}
        return val_metrics(self.model, self.data["val"], self.params, self.noise_gen)

    def finish(self) -> dict[str, float]:
        mse = train_mse(self.model, self.data["train"], self.params["likelihood"],
                        int(self.params["eval_batch_size"]))
        return {"train_rmse": rmse_grey(mse)}

    def test(self) -> dict[str, float]:
        x = self.data["test"]
        self.test_raw, history = new_codes(self.model, x, self.params, self.noise_gen)
        if history is not None:
            self.fit_history = history
        terms = evaluate(self.model, self.test_raw, x, int(self.params["eval_batch_size"]),
                         int(self.params["iwae_k"]), self.noise_gen)
        self.test_code = terms["code"]
        metrics = _mean(terms, "test")
        if self.params["likelihood"] == "bernoulli":
            metrics["test_bce_per_pixel"] = metrics["test_recon"] / x[0].numel()
        return metrics

    def save_artifacts(self, folder: Path) -> None:
        """Image grids, the test-fit curve, the t-SNE of test codes and the networks."""
        if not hasattr(self, "test_code"):
            self.test()
        grids = decode_grids(self.model, self.data["test"], self.test_code)
        if hasattr(self, "fit_history"):
            np.save(folder / "test_fit_history.npy", self.fit_history.cpu().numpy())
        save_artifacts(self.model, folder, grids, self.test_code, self.data["test_y"],
                       int(self.params["tsne_size"]), self.ctx.seed, {})
