"""brain-age figures, from leaderboard rows, curves and each trial's artifacts.

The best trial is the one with the lowest objective among those that have the artifact a
figure needs (`predictions.csv` and `regressor_curve.csv` are written for finalists:
`bench eval`, or every run of an enumerated variant).

- `age_pred_vs_true.png`: predicted against true age, validation and test, with the
  mean-age predictor (the training mean) drawn as the line it is.
- `concepts_pred_vs_true.png`: predicted against true volumes (mL), validation and test,
  Pearson r and MAE per volume.
- `mae_by_bucket.png`: MAE per 10-year bucket: the best trial's validation and test
  beside the mean-age predictor's, and test MAE per variant (or configuration).
- `training_curves.png`: the CNN's training and validation loss (scaled MSE) and
  validation MAE per epoch, and the MLP regressor's epochs (train MSE, validation MAE);
  `net=shell_ridge` (fitted in closed form, one epoch) has only the regressor's, if any.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from bench.registry import register_plots

BUCKET = re.compile(r"^metric_test_mae_(\d+)_(\d+)$")
SPLITS = ("val", "test")


def _ranked(rows: pd.DataFrame) -> pd.DataFrame:
    asc = (rows["direction"].iloc[0] if "direction" in rows else "minimize") == "minimize"
    return rows.sort_values("objective", ascending=asc)


def _best_with(inp: Any, rows: pd.DataFrame, name: str,
               need_concepts: bool = False) -> tuple[Any, pd.DataFrame]:
    """(row, the artifact `name` as a frame) of the best trial that has it, or (None, empty)."""
    for _, row in _ranked(rows).iterrows():
        path = Path(inp.artifact_dir(row["trial_uid"])) / name
        if not path.exists():
            continue
        df = pd.read_csv(path)
        if not need_concepts or _concept_names(df):
            return row, df
    return None, pd.DataFrame()


def _concept_names(df: pd.DataFrame) -> list[str]:
    return [c[: -len("_pred")] for c in df.columns if c.endswith("_pred") and c != "age_pred"]


def _label(row: Any) -> str:
    """'trial #N (variant)', as curves.png names trials; the default space's search is
    'search'."""
    variant = row.get("variant")
    variant = "search" if variant in (None, "", "default") else variant
    return f"trial #{int(row['trial_number'])} ({variant})"


def _mae(a: pd.Series, b: pd.Series | float) -> float:
    return float((a - b).abs().mean())


def _identity(ax: Any, lo: float, hi: float) -> None:
    ax.plot([lo, hi], [lo, hi], "k--", lw=1, label="identity")


# ---------------------------------------------------------------- ages and volumes
def age_pred_vs_true(path: Path, row: Any, df: pd.DataFrame) -> list[Path]:
    from bench.plots import figure

    with figure(path, 1, 2, panel_in=(4.4, 4.2)) as (fig, axes):
        lo, hi = float(df["age"].min()), float(df["age"].max())
        for ax, split in zip(axes[0], SPLITS, strict=True):
            part = df[df["split"] == split]
            mean_age = float(part["age_mean_predictor"].iloc[0])
            ax.scatter(part["age"], part["age_pred"], s=10, alpha=0.6, label="model")
            _identity(ax, lo, hi)
            ax.axhline(mean_age, color="tab:red", lw=1,
                       label=f"mean-age predictor ({mean_age:.1f} y)")
            ax.set(xlabel="true age (years)", ylabel="predicted age (years)",
                   title=f"{split} (n={len(part)}): MAE {_mae(part['age_pred'], part['age']):.2f}"
                         f" y, mean predictor {_mae(part['age'], mean_age):.2f} y")
            ax.legend(fontsize=7)
        fig.suptitle(f"age, best {_label(row)}")
    return [path]


def concepts_pred_vs_true(path: Path, row: Any, df: pd.DataFrame) -> list[Path]:
    from bench.plots import figure

    names = _concept_names(df)
    with figure(path, len(SPLITS), len(names), panel_in=(3.6, 3.4)) as (fig, axes):
        for i, split in enumerate(SPLITS):
            part = df[df["split"] == split]
            for ax, name in zip(axes[i], names, strict=True):
                true, pred = part[name], part[f"{name}_pred"]
                ax.scatter(true, pred, s=8, alpha=0.6)
                _identity(ax, float(df[name].min()), float(df[name].max()))
                r = float(np.corrcoef(true, pred)[0, 1]) if true.std() > 0 and pred.std() > 0 \
                    else float("nan")
                ax.set(xlabel=f"true {name} (mL)", ylabel=f"predicted {name} (mL)",
                       title=f"{split} {name}: r {r:.2f}, MAE {_mae(pred, true):.1f} mL")
        fig.suptitle(f"tissue volumes, best {_label(row)}")
    return [path]


# ---------------------------------------------------------------- MAE by age bucket
def _bucket_table(df: pd.DataFrame, split: str) -> pd.DataFrame:
    part = df[df["split"] == split]
    lo = (part["age"] // 10 * 10).astype(int)
    err = (part["age_pred"] - part["age"]).abs()
    mean_err = (part["age_mean_predictor"] - part["age"]).abs()
    return pd.DataFrame({"model": err, "mean predictor": mean_err, "lo": lo}).groupby("lo") \
        .agg(model=("model", "mean"), mean_predictor=("mean predictor", "mean"),
             n=("model", "size"))


def _variant_buckets(rows: pd.DataFrame) -> tuple[pd.DataFrame, str] | None:
    """Test MAE per age bucket of the best 6 variants (or configurations, in one variant)
    among the trials evaluated on the test set, ranked by their mean objective; and the
    panel's title. None when no trial was evaluated."""
    from bench.plots import config_labels, objective_of

    cols = sorted((c for c in rows.columns if BUCKET.match(c) and rows[c].notna().any()),
                  key=lambda c: int(BUCKET.match(c).group(1)))  # type: ignore[union-attr]
    if not cols:
        return None
    done = rows[rows[cols].notna().any(axis=1)]  # evaluated: an unevaluated trial has no bars
    by_variant = done["variant"].nunique() > 1
    key = "variant" if by_variant else "config_hash"
    grouped = done.groupby(key)
    asc = (done["direction"].iloc[0] if "direction" in done else "minimize") == "minimize"
    order = grouped["objective"].mean().sort_values(ascending=asc).index[:6]
    table = grouped[cols].mean().loc[order]
    table.columns = [int(BUCKET.match(c).group(1)) for c in cols]  # type: ignore[union-attr]
    if not by_variant:
        labels = config_labels(done[done["config_hash"].isin(order)])
        table.index = [labels[str(h)] for h in table.index]
    what = "variant" if by_variant else "configuration"
    return table, (f"test MAE per {what}: the best {len(table)} evaluated\n"
                   f"by {objective_of(done)}, of {grouped.ngroups}")


def _wrap(label: str, width: int = 30) -> str:
    """A legend label on lines of at most `width` characters, broken between words."""
    import textwrap

    return "\n".join(textwrap.wrap(label, width)) or label


def _bars(ax: Any, table: pd.DataFrame, title: str, legend_beside: bool = False) -> None:
    """One bar group per bucket (the table's columns), one bar per row of the table; long
    labels go in a legend beside the axes, where it hides no bar."""
    x = np.arange(len(table.columns))
    width = 0.8 / max(len(table), 1)
    for k, (name, vals) in enumerate(table.iterrows()):
        ax.bar(x + k * width, vals.to_numpy(float), width, label=_wrap(str(name)))
    ax.set_xticks(x + 0.4 - width / 2, [f"{b}-{b + 9}" for b in table.columns])
    ax.set(xlabel="age bucket (years)", ylabel="MAE (years)", title=title)
    if legend_beside:
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    else:
        ax.legend(fontsize=7)


def mae_by_bucket(path: Path, row: Any, df: pd.DataFrame, rows: pd.DataFrame) -> list[Path]:
    from bench.plots import figure

    variants = _variant_buckets(rows)
    panels = (len(SPLITS) if row is not None else 0) + (variants is not None)
    if panels == 0:
        return []
    with figure(path, 1, panels, panel_in=(5.6, 3.8)) as (fig, axes):
        k = 0
        if row is not None:
            for split in SPLITS:
                t = _bucket_table(df, split)
                table = t[["model", "mean_predictor"]].T
                table.columns = list(t.index)
                table.index = ["model", "mean-age predictor"]
                counts = ", ".join(f"{b}: {n}" for b, n in t["n"].items())
                _bars(axes[0][k], table, f"{split}, best {_label(row)}\nsubjects {counts}")
                k += 1
        if variants is not None:
            _bars(axes[0][k], *variants, legend_beside=True)
    return [path]


# ---------------------------------------------------------------- training curves
def training_curves(path: Path, row: Any, curves: pd.DataFrame,
                    reg: pd.DataFrame) -> list[Path]:
    """The CNN's curves when it trained 2+ epochs (not `net=shell_ridge`, fitted in closed
    form: one reported epoch), and the MLP regressor's last fit when it has one."""
    from bench.plots import figure

    cnn = curves["step"].nunique() >= 2
    if not cnn and reg.empty:
        return []
    with figure(path, 1, 2 * cnn + (not reg.empty), panel_in=(4.4, 3.4)) as (fig, axes):
        if cnn:
            ax = axes[0][0]
            for metric in ("train_loss", "val_loss"):
                c = curves[curves["metric"] == metric].sort_values("step")
                ax.plot(c["step"] + 1, c["value"], marker=".", label=metric)
            ax.set(yscale="log", xlabel="epoch", ylabel="loss (scaled MSE)", title="CNN loss")
            ax.legend(fontsize=7)
            ax = axes[0][1]
            c = curves[curves["metric"] == "val_mae"].sort_values("step")
            ax.plot(c["step"] + 1, c["value"], marker=".", label="val MAE (CNN + regressor)")
            if pd.notna(row.get("metric_val_mae_mean_predictor")):
                ax.axhline(float(row["metric_val_mae_mean_predictor"]), color="tab:red", lw=1,
                           label="mean-age predictor")
            ax.set(xlabel="epoch", ylabel="MAE (years)", title="validation age MAE")
            low, high = ax.get_ylim()
            if high - low < 0.5:  # a flat curve: half a year of axis, not nanoyears of ticks
                mid = (low + high) / 2
                ax.set_ylim(mid - 0.25, mid + 0.25)
            ax.legend(fontsize=7)
        if not reg.empty:
            ax = axes[0][2 * cnn]
            ax.plot(reg["epoch"] + 1, reg["train_loss"], marker=".", label="train MSE (scaled)")
            ax.set(yscale="log", xlabel="epoch", ylabel="train MSE (scaled age)",
                   title="MLP regressor (its last fit)")
            twin = ax.twinx()
            twin.plot(reg["epoch"] + 1, reg["val_mae"], color="tab:green", marker=".",
                      label="val MAE (years)")
            twin.set_ylabel("val MAE (years)")
            twin.grid(False)
            ax.legend(fontsize=7, loc="upper left")
            twin.legend(fontsize=7, loc="upper right")
        from matplotlib.ticker import MaxNLocator

        for ax in axes[0]:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs 1, 2, not 1.2
        fig.suptitle(f"training, best {_label(row)}")
    return [path]


@register_plots("brain-age")
def brain_age_plots(inp: Any) -> list[Path]:
    from bench.plots import guarded

    rows = inp.complete()
    if rows.empty:
        return []
    out: list[Path] = []
    row, df = _best_with(inp, rows, "predictions.csv")
    if row is not None:
        out += guarded("age_pred_vs_true", age_pred_vs_true,
                       inp.plot_dir / "age_pred_vs_true.png", row, df)
    crow, cdf = _best_with(inp, rows, "predictions.csv", need_concepts=True)
    if crow is not None:
        out += guarded("concepts_pred_vs_true", concepts_pred_vs_true,
                       inp.plot_dir / "concepts_pred_vs_true.png", crow, cdf)
    out += guarded("mae_by_bucket", mae_by_bucket, inp.plot_dir / "mae_by_bucket.png", row,
                   df, rows)
    best = _ranked(rows).iloc[0]
    curves = inp.curves([best["trial_uid"]])
    if not curves.empty:
        reg_path = Path(inp.artifact_dir(best["trial_uid"])) / "regressor_curve.csv"
        reg = pd.read_csv(reg_path) if reg_path.exists() else pd.DataFrame()
        out += guarded("training_curves", training_curves,
                       inp.plot_dir / "training_curves.png", best, curves, reg)
    return out
