"""`bench plot priors`: the family x model comparison and the image grids, side by side.

Drawn from leaderboard rows and each trial's saved `grids.npz` only (bench.plots' rule: never
by re-training). Figures:
- `priors_comparison.png`: the objective (test recon, nats/image) per model, one box per
  family, every seed as a dot; a second panel with the IWAE log-likelihood of the
  variational models when the rows have it.
- `priors_samples.png` / `priors_decoded.png`: decoded prior samples / decoded test codes,
  families down, models across, from the lowest-seed trial of each cell.
- `priors_test_vs_random.png`: the original study's figure, per cell: test images, their
  decoded fitted codes and decoded random prior draws, 5 of each.
- `priors_tsne.png`: t-SNE of each cell's test codes, coloured by class (the study's t-SNE
  per family).
- `priors_fit_curves.png`: the training loss per epoch and the test-time code fit's
  reconstruction per step (decoder frozen), mean and band over seeds per cell.
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

    from bench.plots import axis_label, objective_of

    panels = [("objective", f"{axis_label('priors', objective_of(done))}, the objective")]
    if "metric_test_iwae_ll" in done and done["metric_test_iwae_ll"].notna().any():
        panels.append(("metric_test_iwae_ll", "test IWAE log-likelihood (nats, higher is better)"))
    fig = Figure(figsize=(5.5 * len(panels), 4.2), layout="constrained")
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
    cells = done.groupby(["param_prior", "param_model"])
    n = cells.size()
    count = str(n.min()) if n.min() == n.max() else f"{n.min()}-{n.max()}"
    # seeds when a cell's trials share one configuration; a search's cells hold several
    seeds = "config_hash" in done and int(cells["config_hash"].nunique().max()) == 1
    what = "seeds" if seeds else "trials (configurations x seeds)"
    fig.suptitle(f"{inp.study}: {len(done)} trials, {count} {what} per family x model; "
                 "box = quartiles, dots = trials")
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
    cells = [(f, m) for f in families for m in models if not cell(done, f, m).empty]
    for draw in (test_vs_random, tsne_panels, fit_curves):
        path = draw(inp, done, cells)
        if path is not None:
            paths.append(path)
    return paths


# ---------------------------------------------------------------- the study's own figures
SHOW = 5  # images per row: the study showed 5 decoded test and 5 decoded random images


def cell(done: pd.DataFrame, family: str, model: str) -> pd.DataFrame:
    return done[(done["param_prior"] == family) & (done["param_model"] == model)]


def first_artifact(inp: PlotInput, rows: pd.DataFrame, name: str) -> Path | None:
    """`name` in the artifacts of the lowest-seed trial that has it."""
    for uid in rows.sort_values("seed")["trial_uid"]:
        path = inp.artifact_dir(str(uid)) / name
        if path.exists():
            return path
    return None


def test_vs_random(inp: PlotInput, done: pd.DataFrame,
                   cells: list[tuple[str, str]]) -> Path | None:
    """Per cell (families down, models across): test images, their decoded fitted codes and
    decoded prior draws, one row of SHOW each (the study's figure had the last two)."""
    from matplotlib.figure import Figure

    grids: dict[tuple[str, str], Path] = {}
    for fam, model in cells:
        path = first_artifact(inp, cell(done, fam, model), "grids.npz")
        if path is not None:
            grids[(fam, model)] = path
    if not grids:
        return None
    fams = list(dict.fromkeys(f for f, _ in grids))
    models = list(dict.fromkeys(m for _, m in grids))
    fig = Figure(figsize=(2.9 * len(models) + 1.2, 2.0 * len(fams) + 0.6))
    for (fam, model), path in grids.items():
        r, c = fams.index(fam), models.index(model)
        ax = fig.add_subplot(len(fams), len(models), r * len(models) + c + 1)
        with np.load(path) as g:
            strips = np.concatenate([g[k][:SHOW] for k in ("test", "decoded", "prior_samples")])
        img = mosaic(strips, cols=SHOW)
        ax.imshow(img, cmap="gray", vmin=0, vmax=255)
        ax.set_title(f"{model} {fam}", fontsize=9)
        ax.set_xticks([])
        h = img.shape[0] / 3
        ax.set_yticks([h * (i + 0.5) for i in range(3)],
                      ["test", "decoded\ntest code", "decoded\nrandom z"] if c == 0 else [],
                      fontsize=8)
    fig.suptitle(f"{inp.study}: test images, their decoded fitted codes and decoded prior "
                 "draws (lowest seed of each cell)", fontsize=10)
    out = inp.plot_dir / "priors_test_vs_random.png"
    fig.savefig(out, dpi=110, bbox_inches="tight")
    return out


def tsne_panels(inp: PlotInput, done: pd.DataFrame,
                cells: list[tuple[str, str]]) -> Path | None:
    """One t-SNE scatter of test codes per cell (the trial's saved tsne.npz)."""
    from bench.plots import figure

    found: list[tuple[str, str, Path]] = []
    for fam, model in cells:
        path = first_artifact(inp, cell(done, fam, model), "tsne.npz")
        if path is not None:
            found.append((fam, model, path))
    if not found:
        return None
    out = inp.plot_dir / "priors_tsne.png"
    ncol = min(3, len(found))
    with figure(out, -(-len(found) // ncol), ncol, panel_in=(3.4, 3.2)) as (fig, axes):
        for ax in axes.flat[len(found):]:
            ax.set_visible(False)
        for ax, (fam, model, path) in zip(axes.flat, found, strict=False):
            with np.load(path) as t:
                sc = ax.scatter(t["xy"][:, 0], t["xy"][:, 1], c=t["labels"], cmap="tab10",
                                s=4, vmin=-0.5, vmax=9.5)
                n = len(t["labels"])
            ax.set(title=f"{model} {fam} ({n} test codes)", xlabel="t-SNE 1",
                   ylabel="t-SNE 2", xticks=[], yticks=[])
        fig.colorbar(sc, ax=axes, ticks=range(10), label="class")
        fig.suptitle(f"{inp.study}: t-SNE of the fitted test codes (point codes; lowest seed)")
    return out


def fit_curves(inp: PlotInput, done: pd.DataFrame,
               cells: list[tuple[str, str]]) -> Path | None:
    """Training loss per epoch (curves) and test-fit reconstruction per step (the saved
    test_fit_history.npy), mean and +-1 std band over each cell's seeds."""
    from bench.plots import axis_label, figure, integer_ticks

    curves = inp.curves(list(done["trial_uid"]))
    curves = curves[curves["metric"] == "train_loss"] if not curves.empty else curves
    fits = {k: [np.load(p) for p in (inp.artifact_dir(str(u)) / "test_fit_history.npy"
                                     for u in cell(done, *k)["trial_uid"]) if p.exists()]
            for k in cells}
    if curves.empty and not any(fits.values()):
        return None
    out = inp.plot_dir / "priors_fit_curves.png"
    later = curves[curves["step"] >= 1]["value"] if not curves.empty else curves
    with figure(out, 1, 2, panel_in=(5.0, 3.6)) as (fig, axes):
        clipped = bool(len(later)) and curves["step"].nunique() > 2
        if clipped:  # epoch 1's loss is 10-100x the rest
            lo, hi = float(later.min()), float(later.max())
            axes[0, 0].set_ylim(lo - 0.05 * (hi - lo), hi + 0.05 * (hi - lo))
        for i, (fam, model) in enumerate(cells):
            c, rows = f"C{i % 10}", cell(done, fam, model)
            per_epoch = curves[curves["trial_uid"].isin(rows["trial_uid"])]
            if not per_epoch.empty:
                stats = per_epoch.groupby("step")["value"].agg(["mean", "std"]).fillna(0.0)
                _band(axes[0, 0], stats.index + 1, stats, c, f"{model} {fam}")
            if fits[(fam, model)]:
                h = np.stack(fits[(fam, model)])
                stats = pd.DataFrame({"mean": h.mean(0), "std": h.std(0)})
                _band(axes[0, 1], np.arange(1, h.shape[1] + 1), stats, c, f"{model} {fam}")
        axes[0, 0].set(xlabel="epoch", ylabel=axis_label("priors", "train_loss"),
                       title="training loss" + (" (from epoch 2)" if clipped else ""))
        integer_ticks(axes[0, 0].xaxis)
        axes[0, 1].set(xlabel="code-fitting step (decoder frozen)",
                       ylabel="test −log p(x|z) (nats / image)", title="test-time code fit")
        if any(fits.values()):
            axes[0, 1].legend(fontsize="small")
        else:  # the fit of test codes runs in `bench eval` (finalists only)
            axes[0, 1].text(0.5, 0.5, f"no test-time fits yet:\nbench eval priors --study "
                            f"{inp.study}", ha="center", va="center",
                            transform=axes[0, 1].transAxes, fontsize="small")
        fig.suptitle(f"{inp.study}: mean over seeds, band = ±1 std")
    return out


def _band(ax: Any, x: Any, stats: pd.DataFrame, colour: str, label: str) -> None:
    mean, std = stats["mean"].to_numpy(), stats["std"].to_numpy()
    ax.plot(x, mean, color=colour, label=label, marker="." if len(mean) < 3 else None)
    ax.fill_between(x, mean - std, mean + std, color=colour, alpha=0.2)
