"""Splits and scaling of the brain-age task, as the original report made them.

Test 25% and validation 15% of the rest, each stratified by 10-year age bucket (the
report's `age_10_yr_bckt`) and seeded by `split_seed`, so every trial of a study is scored
on the same subjects; a cohort's own `split` column, when it marks test rows, wins. The
scaler is fitted on the training split only.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd

from bench.brain.evaluation import age_bucket
from bench.errors import ConfigError


def stratified_split(strata: np.ndarray, frac: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(rest, held) indices: round(frac * n_s) of each stratum held out, shuffled by `seed`."""
    rng = np.random.default_rng(seed)
    held: list[int] = []
    for s in np.unique(strata):
        members = np.flatnonzero(strata == s)
        k = int(round(frac * len(members)))
        held += rng.permutation(members)[:k].tolist()
    mask = np.zeros(len(strata), bool)
    mask[held] = True
    return np.flatnonzero(~mask), np.flatnonzero(mask)


def make_splits(meta: pd.DataFrame, params: Mapping[str, Any]) -> dict[str, np.ndarray]:
    age = meta[params["age_column"]].to_numpy(float)
    strata = age_bucket(age)
    seed = int(params["split_seed"])
    col = params["split_column"]
    if col in meta.columns and (meta[col].astype(str).str.lower() == "test").any():
        is_test = meta[col].astype(str).str.lower().to_numpy() == "test"
        dev, test = np.flatnonzero(~is_test), np.flatnonzero(is_test)
    else:
        dev, test = stratified_split(strata, float(params["test_fraction"]), seed)
    tr, va = stratified_split(strata[dev], float(params["val_fraction"]), seed + 1)
    train, val = dev[tr], dev[va]
    if params["train_size"] is not None:
        train = train[: int(params["train_size"])]
    if params["test_size"] is not None:
        test = test[: int(params["test_size"])]
    if min(len(train), len(val), len(test)) < 1:
        raise ConfigError(f"brain-age: a split is empty (train {len(train)}, val {len(val)}, "
                          f"test {len(test)}); the cohort has {len(meta)} usable subjects")
    return {"train": train, "val": val, "test": test}


class Scaler:
    """Volumes min-max scaled (the report's) or standardised; age standardised; fitted on
    the training split only."""

    def __init__(self, concepts: np.ndarray, age: np.ndarray, kind: str = "minmax"):
        if kind == "minmax":
            self.lo, self.span = concepts.min(0), np.maximum(np.ptp(concepts, 0), 1e-9)
        else:
            self.lo, self.span = concepts.mean(0), np.maximum(concepts.std(0), 1e-9)
        self.mean, self.sd = float(age.mean()), max(float(age.std()), 1e-9)

    def concepts(self, c: np.ndarray) -> np.ndarray:
        return (c - self.lo) / self.span

    def concepts_back(self, c: np.ndarray) -> np.ndarray:
        return c * self.span + self.lo

    def age(self, a: np.ndarray) -> np.ndarray:
        return (a - self.mean) / self.sd

    def age_back(self, a: np.ndarray) -> np.ndarray:
        return a * self.sd + self.mean
