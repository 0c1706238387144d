"""Evaluation of the brain-age task: MAE in years (overall and per 10-year bucket), the
concepts' Pearson r and MAE, and the per-subject files `bench plot` draws from.

Every figure here is computed from predictions and truths in years or mL, never from scaled
units, so it can be checked against the artifacts (`predictions.csv`) independently.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from bench.specs.brain_age import BUCKETS, CONCEPTS


def age_bucket(age: np.ndarray) -> np.ndarray:
    return (np.floor(age / 10) * 10).astype(int)



def age_metrics(pred: np.ndarray, true: np.ndarray, prefix: str) -> dict[str, float]:
    err = pred - true
    ss_tot = float(((true - true.mean()) ** 2).sum())
    out = {f"{prefix}_mae": float(np.abs(err).mean()), f"{prefix}_bias": float(err.mean()),
           f"{prefix}_r2": 1.0 - float((err**2).sum()) / ss_tot if ss_tot > 0 else 0.0}
    buckets = age_bucket(true)
    for b in np.unique(buckets):
        if b in BUCKETS:
            out[f"{prefix}_mae_{b}_{b + 9}"] = float(np.abs(err[buckets == b]).mean())
    return out


def pearson_r(x: np.ndarray, y: np.ndarray) -> float:
    """Pearson r; 0 where either side is constant (a collapsed prediction correlates with
    nothing, and a NaN would fail the trial)."""
    if len(x) < 2 or np.std(x) == 0 or np.std(y) == 0:
        return 0.0
    return float(np.corrcoef(x, y)[0, 1])


def concept_metrics(pred: np.ndarray, true: np.ndarray, names: list[str],
                    prefix: str, mae: bool) -> dict[str, float]:
    """`{prefix}r_<c>` (and `concept_mae_<c>` in mL) for the declared concept names."""
    out = {}
    for j, name in enumerate(names):
        if name in CONCEPTS:
            out[f"{prefix}r_{name}"] = pearson_r(pred[:, j], true[:, j])
            if mae:
                out[f"concept_mae_{name}"] = float(np.abs(pred[:, j] - true[:, j]).mean())
    return out


def save_predictions(path: Path, meta: pd.DataFrame, parts: dict[str, tuple], params:
                     Mapping[str, Any], concepts: list[str], mean_age: float) -> None:
    """predictions.csv: one row per val/test subject, true and predicted age and volumes,
    and the mean-age predictor's age (the training split's mean)."""
    frames = []
    for split, (rows, age_pred, c_pred) in parts.items():
        df = pd.DataFrame({"id": meta[params["id_column"]].to_numpy()[rows], "split": split,
                           "age": meta[params["age_column"]].to_numpy(float)[rows],
                           "age_pred": age_pred, "age_mean_predictor": mean_age})
        for j, name in enumerate(concepts):
            df[name] = meta[name].to_numpy(float)[rows]
            if c_pred is not None:
                df[f"{name}_pred"] = c_pred[:, j]
        frames.append(df)
    pd.concat(frames).to_csv(path, index=False, float_format="%.6g")


def save_regressor_curve(path: Path, reg: Any, age_sd: float) -> None:
    """regressor_curve.csv: the MLP's (epoch, train MSE scaled, val MAE in years)."""
    history = getattr(reg, "history", None)
    if history:
        df = pd.DataFrame(history, columns=["epoch", "train_loss", "val_mae"])
        df["val_mae"] *= age_sd
        df.to_csv(path, index=False, float_format="%.6g")
