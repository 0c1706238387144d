"""`bench plot priors`: the family x model comparison and the image grids, side by side.

Drawn from leaderboard rows and each trial's saved `grids.npz` only (bench.plots' rule: never
by re-training). Figures:
- `priors_comparison.png`: the objective (test recon, nats/image) per model, one box per
  family, every seed as a dot; a second panel with the IWAE log-likelihood of the
  variational models when the rows have it.
- `priors_samples.png` / `priors_decoded.png`: decoded prior samples / decoded test codes,
  families down, models across, from the lowest-seed trial of each cell.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from bench.distributions import family_names
from bench.plots import PlotInput
from bench.registry import register_plots

MODELS = ("ad", "vad", "vae")  # bench.tasks.priors.MODELS, without importing torch models


def _order(values: Any, preferred: list[str] | tuple[str, ...]) -> list[str]:
    present = [str(v) for v in pd.unique(values)]
    return [v for v in preferred if v in present] + sorted(set(present) - set(preferred))


def mosaic(images: np.ndarray, cols: int = 8, pad: int = 1) -> np.ndarray:
    """[n, H, W] -> one [rows * (H + pad), cols * (W + pad)] image, white padding."""
    n, h, w = images.shape
    rows = -(-n // cols)
    out = np.full((rows * (h + pad), cols * (w + pad)), 255, dtype=np.uint8)
    for i, img in enumerate(images):
        r, c = divmod(i, cols)
        out[r * (h + pad):r * (h + pad) + h, c * (w + pad):c * (w + pad) + w] = img
    return out


def comparison(inp: PlotInput, done: pd.DataFrame, families: list[str],
               models: list[str]) -> Path:
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    panels = [("objective", "test recon (BCE nats / image, lower is better)")]
    if "metric_test_iwae_ll" in done and done["metric_test_iwae_ll"].notna().any():
        panels.append(("metric_test_iwae_ll", "test IWAE log-likelihood (nats, higher is better)"))
    fig = Figure(figsize=(5.5 * len(panels), 4.2))
    colors = {f: f"C{i}" for i, f in enumerate(families)}
    width = 0.8 / max(1, len(families))
    for i, (col, label) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), i + 1)
        for j, fam in enumerate(families):
            for m, model in enumerate(models):
                cell = done[(done["param_prior"] == fam) & (done["param_model"] == model)]
                vals = cell[col].dropna().to_numpy(dtype=float)
                if len(vals) == 0:
                    continue
                x = m + (j - (len(families) - 1) / 2) * width
                ax.boxplot(vals, positions=[x], widths=width * 0.8, patch_artist=True,
                           boxprops={"facecolor": colors[fam], "alpha": 0.35},
                           medianprops={"color": colors[fam]}, showfliers=False)
                jitter = np.linspace(-0.25, 0.25, len(vals)) * width if len(vals) > 1 else [0]
                ax.scatter(x + np.asarray(jitter), vals, color=colors[fam], s=14, zorder=3)
        ax.set_xticks(range(len(models)), models)
        ax.set(xlim=(-0.6, len(models) - 0.4), ylabel=label, xlabel="model")
        if i == 0:
            ax.legend(handles=[Line2D([], [], marker="o", ls="", color=colors[f], label=f)
                               for f in families], title="prior", fontsize=8)
    n = done.groupby(["param_prior", "param_model"]).size()
    seeds = str(n.min()) if n.min() == n.max() else f"{n.min()}-{n.max()}"
    fig.suptitle(f"priors: {len(done)} trials, {seeds} seeds per family x model")
    path = inp.plot_dir / "priors_comparison.png"
    fig.savefig(path, dpi=110, bbox_inches="tight")
    return path


def grid_figure(inp: PlotInput, done: pd.DataFrame, families: list[str], models: list[str],
                key: str, title: str, name: str) -> Path | None:
    """One mosaic per (family, model) cell from its lowest-seed trial's grids.npz."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(2.6 * len(models), 2.7 * len(families)))
    drawn = 0
    for r, fam in enumerate(families):
        for c, model in enumerate(models):
            ax = fig.add_subplot(len(families), len(models), r * len(models) + c + 1)
            ax.set(xticks=[], yticks=[])
            if r == 0:
                ax.set_title(model)
            if c == 0:
                ax.set_ylabel(fam)
            cell = done[(done["param_prior"] == fam) & (done["param_model"] == model)]
            for uid in cell.sort_values("seed")["trial_uid"]:
                path = inp.artifact_dir(str(uid)) / "grids.npz"
                if path.exists():
                    with np.load(path) as grids:
                        ax.imshow(mosaic(grids[key]), cmap="gray", vmin=0, vmax=255)
                    drawn += 1
                    break
    if not drawn:
        return None
    fig.suptitle(title)
    out = inp.plot_dir / name
    fig.savefig(out, dpi=110, bbox_inches="tight")
    return out


@register_plots("priors")
def priors_plots(inp: PlotInput) -> list[Path]:
    done = inp.complete()
    if done.empty or not {"param_prior", "param_model"} <= set(done.columns):
        return []
    families = _order(done["param_prior"], family_names())
    models = _order(done["param_model"], MODELS)
    paths = [comparison(inp, done, families, models)]
    for key, title, name in (("prior_samples", "decoded prior samples", "priors_samples.png"),
                             ("decoded", "decoded test codes", "priors_decoded.png")):
        path = grid_figure(inp, done, families, models, key, title, name)
        if path is not None:
            paths.append(path)
    return paths
