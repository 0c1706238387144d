"""brain-age figures, from leaderboard rows and each trial's `predictions.csv` artifact.

- `age_pred_vs_true.png`: the best trial's test predictions against true age.
- `mae_by_bucket.png`: test MAE per 10-year bucket, one bar group per variant (or per
  configuration when the rows hold one variant), best six by objective.
- `concepts_pred_vs_true.png`: the best bottleneck trial's predicted volumes vs truth.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from bench.registry import register_plots

BUCKET = re.compile(r"^metric_test_mae_(\d+)_(\d+)$")


def _best(rows: pd.DataFrame) -> pd.DataFrame:
    asc = (rows["direction"].iloc[0] if "direction" in rows else "minimize") == "minimize"
    return rows.sort_values("objective", ascending=asc)


def _predictions(inp: Any, rows: pd.DataFrame, need_concepts: bool) -> tuple[Any, pd.DataFrame]:
    for _, row in _best(rows).iterrows():
        path = Path(inp.artifact_dir(row["trial_uid"])) / "predictions.csv"
        if not path.exists():
            continue
        df = pd.read_csv(path)
        if not need_concepts or any(c.endswith("_pred") and c != "age_pred" for c in df):
            return row, df
    return None, pd.DataFrame()


def _pred_vs_true(plt: Any, row: Any, df: pd.DataFrame, out: Path) -> Path:
    test = df[df["split"] == "test"]
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.scatter(test["age"], test["age_pred"], s=10, alpha=0.6)
    lo, hi = float(test["age"].min()), float(test["age"].max())
    ax.plot([lo, hi], [lo, hi], "k--", lw=1)
    mae = float((test["age_pred"] - test["age"]).abs().mean())
    ax.set(xlabel="true age (years)", ylabel="predicted age (years)",
           title=f"best trial {row['trial_uid'][:8]} ({row.get('variant', '')}): MAE {mae:.2f} y")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def _by_bucket(plt: Any, rows: pd.DataFrame, out: Path) -> Path | None:
    cols = sorted((c for c in rows.columns if BUCKET.match(c)),
                  key=lambda c: int(BUCKET.match(c).group(1)))  # type: ignore[union-attr]
    if not cols:
        return None
    key = "variant" if rows["variant"].nunique() > 1 else "config_hash"
    grouped = rows.groupby(key)
    table = grouped[cols].mean()
    order = grouped["objective"].mean().sort_values().index[:6]
    table = table.loc[order]
    labels = [f"{BUCKET.match(c).group(1)}-{BUCKET.match(c).group(2)}" for c in cols]  # type: ignore[union-attr]
    fig, ax = plt.subplots(figsize=(max(6, len(cols) * 1.2), 4))
    width = 0.8 / max(len(table), 1)
    x = np.arange(len(cols))
    for k, (name, vals) in enumerate(table.iterrows()):
        ax.bar(x + k * width, vals.to_numpy(float), width, label=str(name)[:24])
    ax.set_xticks(x + 0.4 - width / 2, labels)
    ax.set(xlabel="age bucket (years)", ylabel="test MAE (years)", title="MAE by age bucket")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def _concepts(plt: Any, row: Any, df: pd.DataFrame, out: Path) -> Path:
    test = df[df["split"] == "test"]
    names = [c[: -len("_pred")] for c in df.columns if c.endswith("_pred") and c != "age_pred"]
    fig, axes = plt.subplots(1, len(names), figsize=(4 * len(names), 4), squeeze=False)
    for ax, name in zip(axes[0], names, strict=True):
        ax.scatter(test[name], test[f"{name}_pred"], s=10, alpha=0.6)
        lo, hi = float(test[name].min()), float(test[name].max())
        ax.plot([lo, hi], [lo, hi], "k--", lw=1)
        mae = float((test[f"{name}_pred"] - test[name]).abs().mean())
        ax.set(xlabel=f"true {name}", ylabel=f"predicted {name}", title=f"{name}: MAE {mae:.3g}")
    fig.suptitle(f"concepts, trial {row['trial_uid'][:8]} ({row.get('variant', '')})")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


@register_plots("brain-age")
def brain_age_plots(inp: Any) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = inp.complete()
    if rows.empty:
        return []
    paths: list[Path] = []
    row, df = _predictions(inp, rows, need_concepts=False)
    if row is not None:
        paths.append(_pred_vs_true(plt, row, df, inp.plot_dir / "age_pred_vs_true.png"))
    bucket = _by_bucket(plt, rows, inp.plot_dir / "mae_by_bucket.png")
    if bucket is not None:
        paths.append(bucket)
    row, df = _predictions(inp, rows, need_concepts=True)
    if row is not None:
        paths.append(_concepts(plt, row, df, inp.plot_dir / "concepts_pred_vs_true.png"))
    return paths
