"""`bench plot vae`: the figures of the beta, latent-size and AE-vs-VAE studies.

Sweeps (beta, latent size, rate-distortion) come from leaderboard rows alone; the rest from
the best COMPLETE VAE trial's checkpoint on test images: reconstructions, prior samples, an
AE-vs-VAE interpolation strip, latent traversals and a t-SNE of test codes. Nothing is
trained. The best trial is ranked by the task's own metric (`val_elbo`, the beta=1 bound),
not by the `objective` column: studies optimise different metrics (`ae-vs-vae` minimises
`val_recon`), so objectives of different studies are not comparable.

matplotlib, sklearn and bench.plots are imported inside the hooks: the registry imports
this module whenever it lists tasks.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from bench.data import load_images
from bench.lifecycle import CHECKPOINT_FILE
from bench.registry import register_plots
from bench.tasks import vae as V

if TYPE_CHECKING:
    import numpy as np
    import pandas as pd

    from bench.plots import PlotInput

N_CODES = 400           # test images encoded for t-SNE and latent variances: t-SNE ~2 s on CPU
TRAVERSE_DIMS = 6       # the highest-variance dimensions; the rest are usually inactive
TRAVERSE_VALUES = torch.linspace(-3.0, 3.0, 9)  # in prior standard deviations
INTERP_T = torch.linspace(0.0, 1.0, 11)
INTERP_DIGITS = (2, 7)  # endpoints: the first test 2 and the first test 7
SAMPLE_GRID = (4, 10)   # rows x columns of prior samples
SWEEP_LABELS = {"metric_val_elbo": "val ELBO (β=1 bound, nats)",
                "metric_val_recon": "val recon −log p(x|z) (nats)",
                "metric_val_kl": "val KL(q(z|x) ‖ p(z)) (nats)"}


# ---------------------------------------------------------------- rows
def model_rows(inp: PlotInput, model: str, need: Sequence[str] = ()) -> pd.DataFrame:
    """COMPLETE rows of `model` (vae | ae) with every column in `need` present."""
    done = inp.complete()
    if done.empty or any(c not in done.columns for c in need):
        return done.iloc[0:0]
    kind = done["param_model"].fillna("vae") if "param_model" in done.columns else None
    if kind is None:
        return done.dropna(subset=list(need)) if model == "vae" else done.iloc[0:0]
    return done[kind == model].dropna(subset=list(need))


def checkpoint(inp: PlotInput, row: Any) -> Path:
    return inp.artifact_dir(str(row["trial_uid"])) / CHECKPOINT_FILE


def load_model(inp: PlotInput, row: Any) -> V.VAE:
    from bench.evaluate import params_of
    from bench.registry import get_task

    return V.load_model(params_of(get_task("vae"), dict(row)), checkpoint(inp, row).parent)


def best_row(inp: PlotInput, model: str, latent_dim: int | None = None) -> Any | None:
    """The best COMPLETE trial of `model` with a checkpoint: VAE by val_elbo, AE by val_recon."""
    col, ascending = ("metric_val_elbo", False) if model == "vae" else ("metric_val_recon", True)
    rows = model_rows(inp, model, [col])
    if latent_dim is not None and "param_latent_dim" in rows.columns:
        rows = rows[rows["param_latent_dim"] == latent_dim]
    rows = rows[[checkpoint(inp, r).exists() for _, r in rows.iterrows()]]
    return None if rows.empty else rows.sort_values(col, ascending=ascending).iloc[0]


def _param(row: Any, name: str) -> Any:
    import pandas as pd

    value = row.get(f"param_{name}")
    return V.DEFAULTS[name] if value is None or pd.isna(value) else value  # not recorded


# ---------------------------------------------------------------- sweeps from rows
@register_plots("vae")
def plot_beta(inp: PlotInput) -> list[Path]:
    """val ELBO, reconstruction and KL against beta (symlog x when beta=0 is present)."""
    from bench.plots import figure

    rows = model_rows(inp, "vae", ["param_beta", *SWEEP_LABELS])
    if rows.empty or rows["param_beta"].nunique() < 2:
        return []
    path = inp.plot_dir / "vae_beta.png"
    with figure(path, 1, 3) as (fig, axes):
        for i, (col, label) in enumerate(SWEEP_LABELS.items()):
            ax = axes[0, i]
            _sweep(ax, rows, "param_beta", col, legend=i == 0)
            _beta_axis(ax, rows["param_beta"])
            ax.set_ylabel(label)
        fig.suptitle("VAE: β against validation ELBO, reconstruction and KL")
    return [path]


def _sweep(ax: Any, rows: pd.DataFrame, x: str, y: str, legend: bool) -> None:
    """Every trial as a dot; a study that grids `x` also gets mean ± std over its seeds."""
    ax.scatter(rows[x], rows[y], s=16, alpha=0.6, color="C0", label="one trial (seed)")
    if x.removeprefix("param_") in _grid_keys(str(rows["variant"].iloc[0])):
        stats = rows.groupby(x)[y].agg(["mean", "std", "size"]).reset_index()
        n = int(stats["size"].max())
        ax.errorbar(stats[x], stats["mean"], yerr=stats["std"].fillna(0.0), color="C3",
                    capsize=2, lw=1.2, label=f"mean ± std over {n} seeds")
    if legend:
        ax.legend(fontsize="small")


def _grid_keys(variant: str) -> set[str]:
    """Parameters the variant enumerates: only there is a mean over seeds per x meaningful."""
    from bench.space import space_for

    try:
        v = space_for("vae").variants.get(variant)
    except Exception:  # an unreadable space file: plain dots, no lines
        return set()
    return set(v.grid) if v is not None else set()


def _beta_axis(ax: Any, betas: pd.Series) -> None:
    positive = betas[betas > 0]
    if (betas == 0).any():  # log x cannot show beta=0: linear below the smallest beta
        lin = float(positive.min()) if not positive.empty else 1.0
        ax.set_xscale("symlog", linthresh=lin, linscale=0.5)
        ax.set_xlim(left=-0.3 * lin)
        ax.set_xlabel("β (KL weight; symlog, 0 included)")
    else:
        ax.set_xscale("log")
        _plain_ticks(ax.xaxis)
        ax.set_xlabel("β (KL weight, log)")


def _plain_ticks(axis: Any) -> None:
    """0.5, 2 rather than 5×10^-1, 2×10^0 on a log axis; LogFormatter picks which to label."""
    from matplotlib.ticker import LogFormatter

    class Plain(LogFormatter):
        def __call__(self, x: float, pos: int | None = None) -> str:
            return f"{x:g}" if super().__call__(x, pos) else ""

    axis.set_major_formatter(Plain())
    axis.set_minor_formatter(Plain(labelOnlyBase=False))


@register_plots("vae")
def plot_latent(inp: PlotInput) -> list[Path]:
    """val ELBO and active units against latent size (log2 x)."""
    from matplotlib.ticker import ScalarFormatter

    from bench.plots import figure

    rows = model_rows(inp, "vae", ["param_latent_dim", "metric_val_elbo"])
    if rows.empty or rows["param_latent_dim"].nunique() < 2:
        return []
    has_au = "metric_val_active_units" in rows.columns
    path = inp.plot_dir / "vae_latent.png"
    with figure(path, 1, 2 if has_au else 1) as (fig, axes):
        _sweep(axes[0, 0], rows, "param_latent_dim", "metric_val_elbo", legend=True)
        axes[0, 0].set_ylabel(SWEEP_LABELS["metric_val_elbo"])
        if has_au:
            _active_units(axes[0, 1], rows)
        for ax in axes[0]:
            ax.set_xscale("log", base=2)
            ax.xaxis.set_major_formatter(ScalarFormatter())  # 8, 16, 32 rather than 2^3
            ax.set_xlabel("latent size")
        fig.suptitle("VAE: latent size against ELBO and active units")
    return [path]


def _active_units(ax: Any, rows: pd.DataFrame) -> None:
    _sweep(ax, rows.dropna(subset=["metric_val_active_units"]), "param_latent_dim",
           "metric_val_active_units", legend=False)
    dims = sorted(rows["param_latent_dim"].unique())
    ax.plot(dims, dims, ls="--", color="0.5", label="all units active")
    ax.set_ylabel(f"active units (Cov_x E[z] > {V.ACTIVE_THRESHOLD})")
    ax.legend(fontsize="small")


@register_plots("vae")
def plot_rate_distortion(inp: PlotInput) -> list[Path]:
    """Rate (KL) against distortion (reconstruction), coloured by beta, iso-ELBO lines."""
    from bench.plots import figure

    rows = model_rows(inp, "vae", ["param_beta", "metric_val_kl", "metric_val_recon"])
    if len(rows) < 2:
        return []
    path = inp.plot_dir / "vae_rate_distortion.png"
    with figure(path, panel_in=(5.6, 4.2)) as (fig, axes):
        ax = axes[0, 0]
        _rd_points(fig, ax, rows)
        _iso_elbo(ax, rows["metric_val_kl"] + rows["metric_val_recon"])
        ax.set_xlabel("rate: val KL (nats)")
        ax.set_ylabel("distortion: val −log p(x|z) (nats)")
        ax.legend(fontsize="small")
        ax.set_title("VAE: rate-distortion plane")
    return [path]


def _rd_points(fig: Any, ax: Any, rows: pd.DataFrame) -> None:
    from matplotlib.colors import LogNorm

    beta = rows["param_beta"].to_numpy(float)
    kl, recon = rows["metric_val_kl"].to_numpy(float), rows["metric_val_recon"].to_numpy(float)
    pos = beta > 0
    if pos.any():
        lo, hi = beta[pos].min(), beta[pos].max()
        norm = LogNorm(vmin=lo, vmax=hi if hi > lo else lo * 10)  # one beta: a valid range
        sc = ax.scatter(kl[pos], recon[pos], c=beta[pos], norm=norm, cmap="viridis", s=28,
                        edgecolors="k", linewidths=0.3)
        bar = fig.colorbar(sc, ax=ax, label="β (log colour)")
        _plain_ticks(bar.ax.yaxis)
    if (~pos).any():  # log colour has no place for 0
        ax.scatter(kl[~pos], recon[~pos], marker="X", s=48, color="C3", label="β = 0")


def _iso_elbo(ax: Any, neg_elbo: pd.Series) -> None:
    """Lines recon + KL = const: moving along one trades rate for distortion at equal ELBO."""
    import numpy as np

    xlim, ylim = ax.get_xlim(), ax.get_ylim()
    xs = np.linspace(xlim[0], xlim[1], 50)
    for i, c in enumerate(np.quantile(neg_elbo, [0.0, 0.5, 1.0])):
        ax.plot(xs, c - xs, ls=":", color="0.5", lw=1,
                label="iso-ELBO (recon + KL = const)" if i == 0 else None)
    ax.set_xlim(xlim)
    ax.set_ylim(ylim)


# ---------------------------------------------------------------- the best checkpoint
@dataclass
class Best:
    """The best VAE, its row and a fixed set of test images with their codes."""

    model: V.VAE
    row: Any
    x: torch.Tensor        # model inputs [N, C, H, W]
    y: torch.Tensor        # digit labels [N]
    mu: torch.Tensor       # posterior means [N, latent]

    @property
    def name(self) -> str:
        return f"trial {self.row['study']}#{self.row['trial_number']}"

    def index_of(self, digit: int) -> int:
        hits = (self.y == digit).nonzero()
        return int(hits[0]) if len(hits) else 0


@register_plots("vae")
def plot_best_model(inp: PlotInput) -> list[Path]:
    """Reconstructions, samples, interpolations, traversals and t-SNE of the best VAE."""
    from bench.plots import guarded

    row = best_row(inp, "vae")
    if row is None:
        return []
    best = load_best(inp, row)
    ae = best_row(inp, "ae", best.mu.shape[1])
    figures: list[tuple[str, Callable[..., list[Path]], tuple[Any, ...]]] = [
        ("vae reconstructions", plot_reconstructions, (inp, best)),
        ("vae prior samples", plot_samples, (inp, best)),
        ("vae interpolation", plot_interpolation, (inp, best, ae)),
        ("vae traversals", plot_traversals, (inp, best)),
        ("vae t-SNE", plot_tsne, (inp, best)),
    ]
    return [p for name, draw, args in figures for p in guarded(name, draw, *args)]


def load_best(inp: PlotInput, row: Any) -> Best:
    model = load_model(inp, row)
    x, y = load_test_images(inp, row, N_CODES)
    return Best(model, row, x, y, encode(model, x))


def load_test_images(inp: PlotInput, row: Any, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first `n` test images, prepared exactly as the trial's evaluation saw them."""
    x_u8, y = load_images(str(_param(row, "dataset")), False, inp.data_dir)
    gen = torch.Generator().manual_seed(0)  # dynamic binarization: one fixed draw
    x = V.binarize(x_u8[:n], str(_param(row, "binarize")), str(_param(row, "likelihood")), gen)
    return x, y[:n]


@torch.no_grad()
def encode(model: V.VAE, x: torch.Tensor) -> torch.Tensor:
    return model.encode(x)[0].float()


@torch.no_grad()
def decode(model: V.VAE, z: torch.Tensor) -> np.ndarray:
    """Decoder means in [0, 1]: Bernoulli probabilities, or clipped Gaussian means."""
    out = model.decoder(z).float()
    img = torch.sigmoid(out) if model.likelihood == "bernoulli" else out.clamp(0.0, 1.0)
    return img.numpy()


def plot_reconstructions(inp: PlotInput, best: Best) -> list[Path]:
    from bench.plots import image_rows

    idx = [best.index_of(d) for d in range(10)]
    x = best.x[idx]
    path = inp.plot_dir / "vae_reconstructions.png"
    image_rows(path, [("test", x.numpy()), ("recon", decode(best.model, best.mu[idx]))],
               f"VAE reconstructions (decoder mean at E[z|x]), {best.name}",
               col_labels=[str(int(best.y[i])) for i in idx])
    return [path]


def plot_samples(inp: PlotInput, best: Best) -> list[Path]:
    from bench.plots import image_rows

    rows, cols = SAMPLE_GRID
    z = torch.randn(rows * cols, best.mu.shape[1], generator=torch.Generator().manual_seed(0))
    imgs = decode(best.model, z)
    path = inp.plot_dir / "vae_samples.png"
    image_rows(path, [("", imgs[r * cols:(r + 1) * cols]) for r in range(rows)],
               f"VAE samples: decoder mean at z ~ N(0, I), {best.name}")
    return [path]


def plot_interpolation(inp: PlotInput, best: Best, ae_row: Any | None) -> list[Path]:
    """Decode (1-t) z_a + t z_b between two test digits, for the VAE and (if any) the AE."""
    from bench.plots import image_rows

    ia, ib = (best.index_of(d) for d in INTERP_DIGITS)
    d = best.mu.shape[1]
    rows = [(f"VAE (d={d})", _interpolate(best.model, best.mu[ia], best.mu[ib]))]
    if ae_row is not None:
        ae = load_model(inp, ae_row)
        za, zb = encode(ae, best.x[[ia, ib]])
        rows.append((f"AE (d={d})", _interpolate(ae, za, zb)))
    path = inp.plot_dir / "vae_interpolation.png"
    what = "AE vs VAE" if ae_row is not None else "VAE (no AE of this latent size)"
    image_rows(path, rows, f"{what}: linear interpolation of codes, digit "
               f"{INTERP_DIGITS[0]} → {INTERP_DIGITS[1]}",
               col_labels=[f"{t:.1f}" for t in INTERP_T.tolist()])
    return [path]


def _interpolate(model: V.VAE, za: torch.Tensor, zb: torch.Tensor) -> np.ndarray:
    t = INTERP_T[:, None]
    return decode(model, (1 - t) * za + t * zb)


def plot_traversals(inp: PlotInput, best: Best) -> list[Path]:
    """Vary one latent dimension of one test code over [-3, 3], the others fixed."""
    from bench.plots import image_rows

    var = best.mu.var(0)
    dims = var.argsort(descending=True)[:TRAVERSE_DIMS].tolist()
    base = best.mu[0]
    rows = []
    for dim in dims:
        z = base.repeat(len(TRAVERSE_VALUES), 1)
        z[:, dim] = TRAVERSE_VALUES
        rows.append((f"z{dim} (var {float(var[dim]):.2g})", decode(best.model, z)))
    path = inp.plot_dir / "vae_traversals.png"
    image_rows(path, rows, f"VAE latent traversals, highest-variance dimensions, {best.name}",
               col_labels=[f"{v:+.1f}" for v in TRAVERSE_VALUES.tolist()])
    return [path]


def plot_tsne(inp: PlotInput, best: Best) -> list[Path]:
    """t-SNE of test posterior means coloured by digit (a 2-D latent is shown as is)."""
    import numpy as np
    import seaborn as sns

    from bench.plots import figure

    codes = best.mu.numpy()
    if codes.shape[1] == 2:
        emb, how = codes, "posterior means (2-D latent, shown directly)"
    else:
        from sklearn.manifold import TSNE
        from threadpoolctl import threadpool_limits

        perplexity = min(30.0, (len(codes) - 1) / 3)
        tsne = TSNE(perplexity=perplexity, init="pca", random_state=0, max_iter=500)
        with threadpool_limits(1):  # 400 points: OpenMP threads on a busy CPU were 8x slower
            emb = tsne.fit_transform(codes)
        how = f"t-SNE of {codes.shape[1]}-D posterior means"
    path = inp.plot_dir / "vae_tsne.png"
    with figure(path, panel_in=(5.4, 4.6)) as (fig, axes):
        ax = axes[0, 0]
        sns.scatterplot(x=emb[:, 0], y=emb[:, 1], hue=np.asarray(best.y), palette="tab10",
                        s=14, linewidth=0, ax=ax, legend="full")
        ax.legend(title="digit", fontsize="small", loc="center left", bbox_to_anchor=(1, 0.5))
        ax.set_xlabel("dimension 1")
        ax.set_ylabel("dimension 2")
        ax.set_title(f"{how}\n{len(codes)} test images, {best.name}")
    return [path]
