"""`bench plot vae`: the figures of the beta, latent-size and AE-vs-VAE studies.

Sweeps (beta, latent size, rate-distortion) come from leaderboard rows alone; the rest from
the best COMPLETE VAE trial's checkpoint on test images: reconstructions, prior samples, an
AE-vs-VAE interpolation strip, latent traversals and a t-SNE of test codes. Nothing is
trained. The best trial is ranked by the task's own metric (`val_elbo`, the beta=1 bound;
`val_mse` for models without a likelihood), not by the `objective` column: studies optimise
different metrics (`ae-vs-vae` minimises `val_recon`).

The original reports' studies (`REPORT_FIGURES`, by variant) also get the report's own
figures, from the lowest-seed trial of each configuration: reconstructions of the first
test images and prior samples in the report's numbers, t-SNE of test codes, AE and VAE code
interpolations between the report's digit pairs, interpolation between two prior draws in
latent and in data space, and prior samples perturbed along chosen latent dimensions.

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
MSE_SWEEP_LABELS = {"metric_val_mse": "val squared error (per pixel, [0,1] scale)",
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


def rank_column(inp: PlotInput, model: str) -> tuple[str, bool]:
    """(column, ascending) ranking `model`'s trials: VAE by val_elbo, AE by val_recon; a
    study without them (likelihood=mse: no log-likelihood) by val_mse."""
    col, ascending = ("metric_val_elbo", False) if model == "vae" else ("metric_val_recon", True)
    rows = inp.complete()
    if col not in rows.columns or rows[col].isna().all():
        return "metric_val_mse", True
    return col, ascending


def best_row(inp: PlotInput, model: str, latent_dim: int | None = None) -> Any | None:
    """The best COMPLETE trial of `model` with a checkpoint (see `rank_column`)."""
    col, ascending = rank_column(inp, model)
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

    labels = SWEEP_LABELS
    rows = model_rows(inp, "vae", ["param_beta", *labels])
    if rows.empty:  # likelihood=mse: no ELBO, so per-pixel error and KL
        labels = MSE_SWEEP_LABELS
        rows = model_rows(inp, "vae", ["param_beta", *labels])
    if rows.empty or rows["param_beta"].nunique() < 2:
        return []
    path = inp.plot_dir / "vae_beta.png"
    with figure(path, 1, len(labels)) as (fig, axes):
        for i, (col, label) in enumerate(labels.items()):
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
    if legend:  # below the panels, where it covers no data
        ax.figure.legend(*ax.get_legend_handles_labels(), loc="outside lower center",
                         ncols=2, fontsize="small")


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
    values = sorted(positive.unique())
    if len(values) <= 8:  # a grid: tick exactly its values (0.6, 1, 1.4, 1.8)
        from matplotlib.ticker import NullLocator

        ax.set_xticks(values, [f"{v:g}" for v in values])
        ax.xaxis.set_minor_locator(NullLocator())


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
        ax.legend(fontsize="small", loc="upper center", bbox_to_anchor=(0.5, -0.14),
                  ncols=2)  # below the plane, where it covers no trial
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
        values = sorted(set(beta[pos].tolist()))
        if len(values) <= 8:  # a grid: every beta of the study labelled
            bar.set_ticks(values, labels=[f"{v:g}" for v in values])
            bar.ax.minorticks_off()
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
    """Decoder means in [0, 1]: Bernoulli probabilities, sigmoid outputs (mse), or clipped
    Gaussian means."""
    return model.mean(model.decoder(z)).clamp(0.0, 1.0).numpy()


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


# ---------------------------------------------------------------- the reports' own figures
@dataclass(frozen=True)
class ReportFigures:
    """The figures of one report's study, in the report's numbers (0 / () draws nothing)."""

    recon_n: int = 0            # the first test images, reconstructed by every configuration
    recon_cols: int = 8
    samples: int = 0            # decoded prior samples per configuration
    sample_cols: int = 8
    tsne: bool = False          # t-SNE of sampled test codes per configuration
    pairs: tuple[tuple[int, int], ...] = ()  # digit pairs for code interpolations
    interp_steps: int = 5       # t = i / steps, i < steps, between the two images
    prior_interp: int = 0       # alphas in [0, 1] between two prior draws
    perturb_dims: tuple[int, ...] = ()       # prior samples shifted along these dimensions
    perturb_eps: float = 0.0
    curves: tuple[str, ...] = ()  # per-epoch metrics, one panel each, a line per configuration


REPORT_FIGURES = {
    # 000: "32 test images", "n_samples = 256" in a 16-wide grid, TSNE of sampled z
    # and its "Losses over epochs" (train and validation reconstruction and KL)
    "beta-vae-000": ReportFigures(recon_n=32, samples=256, sample_cols=16, tsne=True,
                                  curves=("val_elbo", "val_recon", "val_kl", "train_kl")),
    # 001: vis_reconstruction (5 test images), vis_samples (16 of 64 drawn, 4 x 4), pairs,
    # and its curves of the reconstruction and KL losses
    "ae-vs-vae-001": ReportFigures(recon_n=5, recon_cols=5, samples=16, sample_cols=4,
                                   pairs=((1, 7), (3, 5), (6, 9)),
                                   curves=("train_mse", "val_mse", "train_kl")),
    "vae-beta-001": ReportFigures(recon_n=5, recon_cols=5, samples=16, sample_cols=4,
                                  curves=("train_mse", "val_mse", "train_kl")),
    # 004: alpha = 0, 0.1, ..., 1; eps = 5 on dimensions 0, 2, 6 and 16
    "kl-estimator-004": ReportFigures(prior_interp=11, perturb_dims=(0, 2, 6, 16),
                                      perturb_eps=5.0),
}
TSNE_POINTS = 1000  # the report displayed 1,000 test points


@dataclass
class Config:
    """One configuration of a study: its label, its lowest-seed trial's model and row."""

    label: str
    model: V.VAE
    row: Any

    @property
    def latent_dim(self) -> int:
        return int(self.row["param_latent_dim"])


def configs(inp: PlotInput) -> list[Config]:
    """Each configuration's lowest-seed COMPLETE trial with a checkpoint, in grid order."""
    from bench.plots import config_labels

    done = inp.complete()
    done = done[[checkpoint(inp, r).exists() for _, r in done.iterrows()]]
    if done.empty:
        return []
    labels = config_labels(done)
    out = []
    for h, g in done.sort_values(["trial_number"]).groupby("config_hash", sort=False):
        row = g.sort_values("seed").iloc[0]
        out.append(Config(labels[str(h)], load_model(inp, row), row))
    return out


@register_plots("vae")
def plot_report_figures(inp: PlotInput) -> list[Path]:
    """The figures the study's report drew (REPORT_FIGURES), when the study is one of them."""
    from bench.plots import guarded

    spec = REPORT_FIGURES.get(str(inp.rows["variant"].iloc[0])) if len(inp.rows) else None
    cfgs = configs(inp) if spec is not None else []
    if spec is None or not cfgs:
        return []
    x, y = load_test_images(inp, cfgs[0].row, max(spec.recon_n, TSNE_POINTS))
    draws: list[tuple[str, Callable[..., list[Path]], tuple[Any, ...]]] = [
        ("report reconstructions", report_recon, (inp, spec, cfgs, x)),
        ("report samples", report_samples, (inp, spec, cfgs)),
        ("report t-SNE", report_tsne, (inp, spec, cfgs, x, y)),
        ("report interpolations", report_pairs, (inp, spec, cfgs, x, y)),
        ("report prior interpolation", report_prior_interp, (inp, spec, cfgs)),
        ("report perturbations", report_perturb, (inp, spec, cfgs)),
        ("report curves", report_curves, (inp, spec)),
    ]
    return [p for name, draw, args in draws for p in guarded(name, draw, *args)]


def mosaic(imgs: np.ndarray, cols: int) -> np.ndarray:
    """[N, 1, H, W] in [0, 1] -> one grid image, `cols` wide, 1-pixel white gaps."""
    import numpy as np

    n, _, h, w = imgs.shape
    rows = -(-n // cols)
    out = np.ones((rows * (h + 1) - 1, cols * (w + 1) - 1), dtype=np.float32)
    for i, img in enumerate(imgs):
        r, c = divmod(i, cols)
        out[r * (h + 1):r * (h + 1) + h, c * (w + 1):c * (w + 1) + w] = img[0]
    return out


def mosaic_panels(path: Path, panels: list[tuple[str, np.ndarray]], cols: int,
                  title: str) -> Path:
    """One grayscale mosaic per panel: stacked when each is one strip, else a near-square
    grid of panels."""
    import math
    import textwrap

    from bench.plots import figure

    n = len(panels)
    strip = len(panels[0][1]) <= cols
    ncols = 1 if strip else math.ceil(math.sqrt(n))
    nrows = math.ceil(n / ncols)
    edge = 0.45 * min(cols, len(panels[0][1]))
    size = (max(edge + 0.4, 2.6), 0.45 * -(-len(panels[0][1]) // cols) + 0.6)
    title = "\n".join(textwrap.wrap(title, int(ncols * size[0] * 11)))  # ~11 characters an inch
    with figure(path, nrows, ncols, panel_in=size) as (fig, axes):
        for ax in axes.flat[n:]:
            ax.set_visible(False)
        for ax, (label, imgs) in zip(axes.flat, panels, strict=False):
            ax.imshow(mosaic(imgs, cols), cmap="gray", vmin=0.0, vmax=1.0,
                      interpolation="nearest")
            ax.set(xticks=[], yticks=[])
            ax.grid(False)
            ax.set_title(label, fontsize="small")
        fig.suptitle(title, fontsize="medium")
    return path


def report_recon(inp: PlotInput, spec: ReportFigures, cfgs: list[Config],
                 x: torch.Tensor) -> list[Path]:
    """The first `recon_n` test images and each configuration's reconstruction (decoder
    mean at the posterior mean, as the reports' visualisations)."""
    if not spec.recon_n:
        return []
    xs = x[:spec.recon_n]
    panels = [("test images", xs.numpy())]
    panels += [(c.label, decode(c.model, encode(c.model, xs))) for c in cfgs]
    path = inp.plot_dir / "vae_report_reconstructions.png"
    return [mosaic_panels(path, panels, spec.recon_cols,
                          f"{inp.study}: the first {spec.recon_n} test images and their "
                          "reconstructions (decoder mean at E[z|x])")]


def report_samples(inp: PlotInput, spec: ReportFigures, cfgs: list[Config]) -> list[Path]:
    """`samples` decoded prior draws per configuration (one fixed draw for all)."""
    if not spec.samples:
        return []
    z = torch.randn(spec.samples, cfgs[0].latent_dim, generator=torch.Generator().manual_seed(0))
    panels = [(c.label, decode(c.model, z)) for c in cfgs]
    path = inp.plot_dir / "vae_report_samples.png"
    return [mosaic_panels(path, panels, spec.sample_cols,
                          f"{inp.study}: decoder mean at {spec.samples} draws z ~ N(0, I), "
                          "the same draws for every configuration")]


def report_tsne(inp: PlotInput, spec: ReportFigures, cfgs: list[Config], x: torch.Tensor,
                y: torch.Tensor) -> list[Path]:
    """t-SNE of one sampled z ~ q(z|x) per test image (as the report), per configuration;
    a 2-D latent is also shown as it is."""
    import seaborn as sns

    from bench.plots import figure

    if not spec.tsne:
        return []
    x, digits = x[:TSNE_POINTS], y[:TSNE_POINTS].numpy()
    codes = [sampled_codes(c.model, x) for c in cfgs]
    raw = codes[0].shape[1] == 2
    path = inp.plot_dir / "vae_report_tsne.png"
    with figure(path, 2 if raw else 1, len(cfgs), panel_in=(3.4, 3.2)) as (fig, axes):
        for j, (c, z) in enumerate(zip(cfgs, codes, strict=True)):
            views = [("t-SNE", tsne_2d(z))] + ([("z as is", z)] if raw else [])
            for i, (how, xy) in enumerate(views):
                ax = axes[i, j]
                sns.scatterplot(x=xy[:, 0], y=xy[:, 1], hue=digits, palette="tab10", s=6,
                                linewidth=0, ax=ax, legend=j == len(cfgs) - 1 and i == 0)
                ax.set_title(f"{c.label}: {how}", fontsize="small")
                ax.set_xlabel("t-SNE 1" if how == "t-SNE" else "z1 (prior std units)")
                ax.set_ylabel("t-SNE 2" if how == "t-SNE" else "z2 (prior std units)")
        legend = axes[0, -1].get_legend()
        if legend is not None:
            legend.set_title("digit")
            sns.move_legend(axes[0, -1], "center left", bbox_to_anchor=(1, 0.5))
        fig.suptitle(f"{inp.study}: one z ~ q(z|x) for each of {len(x)} test images")
    return [path]


@torch.no_grad()
def sampled_codes(model: V.VAE, x: torch.Tensor) -> np.ndarray:
    """One z ~ q(z|x) per image from a fixed generator (an AE: its code)."""
    mu, logvar = model.encode(x)
    if logvar is None:
        return mu.float().numpy()
    eps = torch.randn(mu.shape, generator=torch.Generator().manual_seed(0))
    return (mu + eps * torch.exp(0.5 * logvar)).float().numpy()


def tsne_2d(codes: np.ndarray) -> np.ndarray:
    from sklearn.manifold import TSNE
    from threadpoolctl import threadpool_limits

    perplexity = min(30.0, (len(codes) - 1) / 3)
    with threadpool_limits(1):  # a busy CPU: OpenMP threads were slower (see plot_tsne)
        return TSNE(perplexity=perplexity, init="pca", random_state=0,
                    max_iter=500).fit_transform(codes)


def report_pairs(inp: PlotInput, spec: ReportFigures, cfgs: list[Config], x: torch.Tensor,
                 y: torch.Tensor) -> list[Path]:
    """Per digit pair: the first test image of each digit, then decoded codes z_a + t (z_b -
    z_a) at t = i / steps for i < steps (the report's loop), for every configuration."""
    import numpy as np

    from bench.plots import image_rows

    if not spec.pairs:
        return []
    t = torch.arange(spec.interp_steps, dtype=torch.float32)[:, None] / spec.interp_steps
    rows = []
    for a, b in spec.pairs:
        ia, ib = (int((y == d).nonzero()[0]) for d in (a, b))
        ends = x[[ia, ib]]
        for c in cfgs:
            za, zb = encode(c.model, ends)
            mids = decode(c.model, za + t * (zb - za))
            strip = np.concatenate([ends[:1].numpy(), mids, ends[1:].numpy()])
            rows.append((f"{a}→{b} {c.label}", strip))
    labels = ["image a", *(f"t={v:.1f}" for v in t[:, 0].tolist()), "image b"]
    path = inp.plot_dir / "vae_report_interpolations.png"
    image_rows(path, rows, f"{inp.study}: decoded interpolations of posterior means between "
               "the first test image of each digit", col_labels=labels)
    return [path]


def report_prior_interp(inp: PlotInput, spec: ReportFigures,
                        cfgs: list[Config]) -> list[Path]:
    """Two prior draws z0, z1: g(a z0 + (1 - a) z1) (latent space) beside a g(z0) + (1 - a)
    g(z1) (data space), a = 0, 0.1, ..., 1, for every configuration."""
    from bench.plots import image_rows

    if not spec.prior_interp:
        return []
    d = cfgs[0].latent_dim
    z0, z1 = torch.randn(2, d, generator=torch.Generator().manual_seed(1))
    a = torch.linspace(0.0, 1.0, spec.prior_interp)[:, None]
    rows = []
    for c in cfgs:
        g0, g1 = (torch.from_numpy(decode(c.model, z[None])) for z in (z0, z1))
        rows.append((f"{c.label}: latent", decode(c.model, a * z0 + (1 - a) * z1)))
        rows.append((f"{c.label}: data", (a[:, :, None, None] * g0
                                          + (1 - a[:, :, None, None]) * g1).numpy()))
    path = inp.plot_dir / "vae_report_prior_interpolation.png"
    image_rows(path, rows, f"{inp.study}: interpolating two prior draws in latent space "
               "(decoded) and in data space (blended decodings)",
               col_labels=[f"α={v:.1f}" for v in a[:, 0].tolist()])
    return [path]


def report_perturb(inp: PlotInput, spec: ReportFigures, cfgs: list[Config]) -> list[Path]:
    """8 prior draws decoded, then the same draws with `perturb_eps` added to one latent
    dimension at a time."""
    from bench.plots import image_rows

    d = cfgs[0].latent_dim
    dims = [i for i in spec.perturb_dims if i < d]  # the report's dimensions that exist here
    if not dims:
        return []
    z = torch.randn(8, d, generator=torch.Generator().manual_seed(2))
    rows = []
    for c in cfgs:
        rows.append((f"{c.label}: z", decode(c.model, z)))
        for dim in dims:
            shifted = z.clone()
            shifted[:, dim] += spec.perturb_eps
            rows.append((f"z{dim} + {spec.perturb_eps:g}", decode(c.model, shifted)))
    path = inp.plot_dir / "vae_report_perturbations.png"
    image_rows(path, rows, f"{inp.study}: 8 prior draws, and the same with one latent "
               f"dimension shifted by ε = {spec.perturb_eps:g} (prior std units)")
    return [path]


def report_curves(inp: PlotInput, spec: ReportFigures) -> list[Path]:
    """Each metric of `spec.curves` per epoch: a line per configuration, mean over its seeds,
    band +-1 std."""
    from bench.plots import axis_label, config_labels, figure, integer_ticks

    done = inp.complete()
    pts = inp.curves(list(done["trial_uid"])) if spec.curves and len(done) else None
    if pts is None or pts.empty:
        return []
    pts = pts.merge(done[["trial_uid", "config_hash"]], on="trial_uid")
    metrics = [m for m in spec.curves if (pts["metric"] == m).any()]
    if not metrics or pts["step"].nunique() < 2:
        return []
    names = config_labels(done)
    labels = {h: names[h] for h in done.sort_values("trial_number")["config_hash"].unique()}
    path = inp.plot_dir / "vae_report_curves.png"
    with figure(path, 1, len(metrics), panel_in=(3.8, 3.0)) as (fig, axes):
        for ax, metric in zip(axes[0], metrics, strict=True):
            for i, (h, label) in enumerate(labels.items()):
                mine = pts[(pts["metric"] == metric) & (pts["config_hash"] == h)]
                stats = mine.groupby("step")["value"].agg(["mean", "std"]).fillna(0.0)
                x = stats.index + 1
                ax.plot(x, stats["mean"], marker=".", color=f"C{i}", label=label)
                ax.fill_between(x, stats["mean"] - stats["std"], stats["mean"] + stats["std"],
                                color=f"C{i}", alpha=0.2)
            ax.set(xlabel="epoch", ylabel=axis_label("vae", metric))
            integer_ticks(ax.xaxis)
        axes[0, 0].legend(fontsize="small")
        n = int(done.groupby("config_hash").size().max())
        fig.suptitle(f"{inp.study}: per epoch, mean over {n} seeds, band = ±1 std")
    return [path]
