"""`bench plot simsiam`: monitor curves per cell (mean line, band over seeds) and final kNN bars.

A cell is one configuration (config_hash), labelled by the parameters that vary across the
plotted rows, e.g. `stop_grad=False predictor=mlp` in the ablation. Everything comes from
the leaderboard's rows and curves; nothing is re-trained. Drawn with the core's `figure`
helper (a styled matplotlib Figure, no pyplot state).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

CURVES = (("val_knn_acc", "kNN accuracy (held-out images)"), ("train_loss", "training loss"),
          ("val_collapse_std", "collapse_std: std(z/|z|) x sqrt(d)"))
LABEL_PARAMS = ("stop_grad", "predictor")  # shown first when they vary


def cell_labels(rows: pd.DataFrame) -> pd.Series:
    """config_hash -> 'k=v k=v' over the parameters that differ between configurations."""
    params = [c for c in rows.columns if c.startswith("param_")]
    firsts = rows.groupby("config_hash")[params].first()
    cols = [c for c in firsts.columns if firsts[c].astype(str).nunique() > 1]
    cols.sort(key=lambda c: (c.removeprefix("param_") not in LABEL_PARAMS, c))
    if not cols:
        return pd.Series("all", index=firsts.index)
    return firsts[cols].apply(
        lambda r: " ".join(f"{c.removeprefix('param_')}={r[c]}" for c in cols), axis=1)


def curve_stats(curves: pd.DataFrame, rows: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Per (config_hash, step): mean and std over the seeds' curves of one metric."""
    pts = curves[curves["metric"] == metric].merge(rows[["trial_uid", "config_hash"]],
                                                   on="trial_uid")
    stats = pts.groupby(["config_hash", "step"])["value"].agg(["mean", "std"]).reset_index()
    return stats.fillna({"std": 0.0})


def draw(inp: Any) -> list[Path]:
    """simsiam_curves.png and simsiam_final_knn.png in inp.plot_dir."""
    rows = inp.complete()
    if rows.empty:
        return []
    labels = cell_labels(rows).sort_values()
    colours = {h: f"C{i % 10}" for i, h in enumerate(labels.index)}  # one colour per cell
    curves = inp.curves(list(rows["trial_uid"]))
    return [draw_curves(inp.plot_dir / "simsiam_curves.png", rows, curves, labels, colours),
            draw_final(inp.plot_dir / "simsiam_final_knn.png", rows, labels, colours)]


def draw_curves(path: Path, rows: pd.DataFrame, curves: pd.DataFrame, labels: pd.Series,
                colours: dict[str, str]) -> Path:
    from bench.plots import figure, integer_ticks

    with figure(path, 1, len(CURVES)) as (fig, axes):
        for ax, (metric, title) in zip(axes[0], CURVES, strict=True):
            stats = curve_stats(curves, rows, metric)
            for h, label in labels.items():
                s = stats[stats["config_hash"] == h]
                if s.empty:
                    continue
                epoch, c = s["step"] + 1, colours[h]
                ax.plot(epoch, s["mean"], marker=".", color=c, label=label)
                if len(s) == 1:  # one monitor point (knn_every >= epochs): a bar, not a band
                    ax.errorbar(epoch, s["mean"], yerr=s["std"], color=c, capsize=3)
                ax.fill_between(epoch, s["mean"] - s["std"], s["mean"] + s["std"],
                                color=c, alpha=0.2)
            ax.set(title=title, xlabel="epoch")
            integer_ticks(ax.xaxis)
        handles, names = axes[0, 0].get_legend_handles_labels()
        if handles:  # below the panels: inside one it covered that panel's curves
            fig.legend(handles, names, loc="outside lower center", fontsize="small",
                       ncols=min(len(names), 4))
        fig.suptitle(f"simsiam: mean over seeds, band = +-1 std ({len(rows)} trials)")
    return path


def draw_final(path: Path, rows: pd.DataFrame, labels: pd.Series,
               colours: dict[str, str]) -> Path:
    from bench.plots import figure

    final = rows.groupby("config_hash")["metric_val_knn_acc"].agg(["mean", "std", "size"])
    final = final.fillna(0.0).join(labels.rename("label")).sort_values("mean", ascending=False)
    ticks = [f"{lab.replace(' ', chr(10))}\n(n={n})"  # one parameter per line
             for lab, n in zip(final["label"], final["size"], strict=True)]
    with figure(path, panel_in=(max(4.2, 1.5 * len(final)), 3.8)) as (fig, axes):
        ax = axes[0, 0]
        ax.bar(range(len(final)), final["mean"], yerr=final["std"], capsize=4,
               color=[colours[h] for h in final.index])
        ax.set_xticks(range(len(final)), ticks, fontsize="small")
        ax.set(ylabel="final kNN accuracy", title="simsiam: final kNN accuracy per cell")
    return path
