"""Brain age from T1 MRI through a concept bottleneck of tissue volumes (CSF, GM, WM).

Reads top to bottom: cohort, splits, scaling, training, evaluation, the objective. A 3D
CNN predicts the min-max-scaled volumes csfv/gmv/wmv; a regressor (MLP, RBF kernel ridge,
linear ridge) maps volumes to age. The three concept-bottleneck modes of Koh et al. (2020,
ICML, "Concept Bottleneck Models"): independent (regressor fitted on the true training
volumes), sequential (fitted on the CNN's predicted training volumes, refitted each
epoch), joint (CNN and an MLP/linear head end to end, loss = age MSE + concept_weight *
concept MSE). `model=direct` is the reference without the bottleneck: the CNN predicts age.
The CNN trains with Adam at `lr`, constant or (`lr_schedule=cosine`) decayed to 0 over the
epochs; no checkpoint selection: the last epoch's model is scored.

Data: without `cohort`, the simulated cohort (`bench.brain.sim`, `sim_n` subjects at
`shape`^3) is generated once under the data root and reused. Splits: the cohort's own
test rows (`split` column == "test") when present, else 75/25 stratified by 10-year
bucket; train/val 85/15 stratified; both seeded by `split_seed`, not the trial's seed, so
every trial is scored on the same subjects. Scaling is fitted on the training split only.

Speed: the float16 volumes sit on the device once per process (96^3 x 600 = 1.06 GB) and
batches are index slices into them, never copies of a split; bf16 autocast and
channels_last_3d on CUDA; the training loss is read once per epoch.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from bench.brain import plots as _plots  # noqa: F401  (registers the brain-age figures)
from bench.brain.models import CNN3d, JointModel, joint_head, make_regressor
from bench.data import data_root
from bench.errors import ConfigError
from bench.registry import register_task
from bench.train import autocast, batches, generator
from bench.trial import TrialContext

DEFAULTS: dict[str, Any] = {
    "cohort": None,              # cohort folder; None: the simulated cohort under the data root
    "metadata": "metadata.csv",
    "file_pattern": "{id}.nii.gz",
    "id_column": "id",
    "age_column": "age",
    "concepts": "csfv,gmv,wmv",
    "split_column": "split",     # rows whose value is "test" form the test split, if present
    "shape": 96,                 # edge of the cube the volumes are brought to
    "resize": "resample",        # resample | crop
    "normalize": "percentile",   # percentile | zscore | none
    "on_bad_file": "error",      # error | skip
    "sim_n": 600,                # simulated cohort: subjects and seed
    "sim_seed": 0,
    "model": "bottleneck",       # bottleneck | direct (CNN -> age)
    "mode": "independent",       # independent | sequential | joint
    "regressor": "mlp",          # mlp | kernel_ridge | ridge
    "depth": 1,                  # the original baseline: 1 conv layer, 2 channels, max-pool
    "width": 2,
    "kernel": 3,
    "pooling": "max",            # max | avg
    "dropout": 0.0,
    "lr": 1e-3,
    "lr_schedule": "constant",   # constant | cosine (to 0 over `epochs`, stepped per epoch)
    "weight_decay": 0.0,
    "batch_size": 16,
    "epochs": 20,
    "concept_weight": 1.0,       # joint: weight of the concept MSE
    "mlp_hidden": 32,
    "mlp_layers": 1,
    "mlp_steps": 500,
    "mlp_lr": 1e-2,
    "kr_alpha": 0.1,             # 5-fold CV on the simulated training split (RESULTS.md)
    "kr_gamma": 3.0,
    "ridge_alpha": 1.0,
    "train_size": None,
    "test_size": None,
    "test_fraction": 0.25,
    "val_fraction": 0.15,
    "split_seed": 0,
    "eval_batch_size": 32,
}
SMOKE = {"shape": 24, "sim_n": 40, "epochs": 2, "batch_size": 8, "mlp_steps": 100}
CHOICES = {"model": ("bottleneck", "direct"), "mode": ("independent", "sequential", "joint"),
           "regressor": ("mlp", "kernel_ridge", "ridge"), "pooling": ("max", "avg"),
           "lr_schedule": ("constant", "cosine"),
           "on_bad_file": ("error", "skip"), "resize": ("resample", "crop"),
           "normalize": ("percentile", "zscore", "none")}
_DEVICE_VOLS: dict[tuple[int, str], torch.Tensor] = {}


def check_params(params: Mapping[str, Any]) -> None:
    bad = [f"brain-age: {k}: must be one of {', '.join(v)}, got {params[k]!r}"
           for k, v in CHOICES.items() if params[k] not in v]
    for k, lo in (("depth", 1), ("width", 1), ("kernel", 1), ("shape", 8), ("epochs", 1)):
        if int(params[k]) < lo:
            bad.append(f"brain-age: {k}: must be >= {lo}, got {params[k]!r}")
    if int(params["shape"]) // 2 ** int(params["depth"]) < 1:
        bad.append(f"brain-age: depth: {params['depth']} poolings shrink shape "
                   f"{params['shape']} below 1 voxel")
    if params["model"] == "bottleneck" and params["mode"] == "joint" \
            and params["regressor"] == "kernel_ridge":
        bad.append("brain-age: mode=joint trains the regressor by gradient descent: "
                   "regressor must be mlp or ridge, got 'kernel_ridge'")
    if bad:
        raise ConfigError(bad)


# ---------------------------------------------------------------- cohort and splits
def concept_names(params: Mapping[str, Any]) -> list[str]:
    """The `concepts` parameter ("csfv,gmv,wmv") as column names."""
    return [c.strip() for c in str(params["concepts"]).split(",") if c.strip()]


def load_data(params: Mapping[str, Any], data_dir: Path | None) -> Any:
    from bench.brain.cohort import CohortSpec, load_cohort
    from bench.brain.sim import ensure_sim_cohort

    shape = int(params["shape"])
    folder = params["cohort"]
    if folder is None:
        folder = ensure_sim_cohort(data_root(data_dir), int(params["sim_n"]), shape,
                                   int(params["sim_seed"]))
    concepts = tuple(concept_names(params))
    spec = CohortSpec(Path(folder).expanduser(), shape, params["metadata"],
                      params["file_pattern"], params["id_column"], params["age_column"],
                      concepts, params["resize"], params["normalize"])
    return load_cohort(spec, params["on_bad_file"])


def age_bucket(age: np.ndarray) -> np.ndarray:
    return (np.floor(age / 10) * 10).astype(int)


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
    """Min-max for volumes (as the original), standardisation for age; train split only."""

    def __init__(self, concepts: np.ndarray, age: np.ndarray):
        self.lo, self.span = concepts.min(0), np.maximum(np.ptp(concepts, 0), 1e-9)
        self.mean, self.sd = float(age.mean()), max(float(age.std()), 1e-9)

    def concepts(self, c: np.ndarray) -> np.ndarray:
        return (c - self.lo) / self.span

    def concepts_back(self, c: np.ndarray) -> np.ndarray:
        return c * self.span + self.lo

    def age(self, a: np.ndarray) -> np.ndarray:
        return (a - self.mean) / self.sd

    def age_back(self, a: np.ndarray) -> np.ndarray:
        return a * self.sd + self.mean


def device_volumes(vols: torch.Tensor, device: torch.device) -> torch.Tensor:
    """The cohort's float16 volumes on `device`, copied once per process."""
    if device.type == "cpu":
        return vols
    key = (id(vols), str(device))
    if key not in _DEVICE_VOLS:
        _DEVICE_VOLS.clear()  # one cohort on the device at a time: 1 GB each at 96^3
        _DEVICE_VOLS[key] = vols.to(device, non_blocking=True)
    return _DEVICE_VOLS[key]


# ---------------------------------------------------------------- training
def _input(vols: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    x = vols[idx].float()
    if x.is_cuda:
        x = x.contiguous(memory_format=torch.channels_last_3d)
    return x


def loss_fn(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor,
            params: Mapping[str, Any]) -> torch.Tensor:
    """y = [scaled concepts..., scaled age]."""
    mse = torch.nn.functional.mse_loss
    if params["model"] == "direct":
        return mse(model(x)[:, 0].float(), y[:, -1])
    if params["mode"] == "joint":
        c, a = model(x)
        weight = float(params["concept_weight"])
        return mse(a.float(), y[:, -1]) + weight * mse(c.float(), y[:, :-1])
    return mse(model(x).float(), y[:, :-1])


def train_epoch(model: torch.nn.Module, opt: torch.optim.Optimizer, vols: torch.Tensor,
                idx: torch.Tensor, y: torch.Tensor, params: Mapping[str, Any],
                gen: torch.Generator) -> float:
    model.train()
    dev = vols.device
    total = torch.zeros((), device=dev)
    for b in batches(len(idx), int(params["batch_size"]), dev, gen):
        with autocast(dev):
            loss = loss_fn(model, _input(vols, idx[b]), y[b], params)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        total += loss.detach() * len(b)
    return float(total) / len(idx)


@torch.no_grad()
def forward_all(model: torch.nn.Module, vols: torch.Tensor, idx: torch.Tensor,
                batch: int) -> tuple[np.ndarray | None, np.ndarray | None]:
    """(scaled concepts [n,k] or None, scaled age [n] or None) straight from the network."""
    model.eval()
    cs, ages = [], []
    for part in idx.split(batch):
        with autocast(vols.device):
            out = model(_input(vols, part))
        if isinstance(out, tuple):  # joint: (concepts, age)
            cs.append(out[0].float())
            ages.append(out[1].float())
        elif out.shape[1] == 1:  # direct: age
            ages.append(out[:, 0].float())
        else:  # bottleneck CNN: concepts
            cs.append(out.float())
    c = torch.cat(cs).double().cpu().numpy() if cs else None
    a = torch.cat(ages).double().cpu().numpy() if ages else None
    return c, a


def build_model(params: Mapping[str, Any], n_concepts: int,
                device: torch.device) -> torch.nn.Module:
    direct = params["model"] == "direct"
    cnn = CNN3d(int(params["shape"]), int(params["depth"]), int(params["width"]),
                int(params["kernel"]), params["pooling"], float(params["dropout"]),
                1 if direct else n_concepts)
    model: torch.nn.Module = cnn
    if not direct and params["mode"] == "joint":
        model = JointModel(cnn, joint_head(params, n_concepts))
    model = model.to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last_3d)
    return model


def predict(model: torch.nn.Module, reg: Any, vols: torch.Tensor, idx: torch.Tensor,
            params: Mapping[str, Any], sc: Scaler) -> tuple[np.ndarray, np.ndarray | None]:
    """(age in years, volumes in the metadata's units or None for the direct model)."""
    c, a = forward_all(model, vols, idx, int(params["eval_batch_size"]))
    if a is None:
        assert c is not None and reg is not None
        a = np.asarray(reg.predict(c), dtype=float)
    return sc.age_back(a), None if c is None else sc.concepts_back(c)


# ---------------------------------------------------------------- metrics
def age_metrics(pred: np.ndarray, true: np.ndarray, prefix: str) -> dict[str, float]:
    err = pred - true
    ss_tot = float(((true - true.mean()) ** 2).sum())
    out = {f"{prefix}_mae": float(np.abs(err).mean()), f"{prefix}_bias": float(err.mean()),
           f"{prefix}_r2": 1.0 - float((err**2).sum()) / ss_tot if ss_tot > 0 else 0.0}
    buckets = age_bucket(true)
    for b in np.unique(buckets):
        out[f"{prefix}_mae_{b}_{b + 9}"] = float(np.abs(err[buckets == b]).mean())
    return out


def save_predictions(path: Path, meta: pd.DataFrame, parts: dict[str, tuple], params:
                     Mapping[str, Any], concepts: list[str]) -> None:
    """predictions.csv: one row per val/test subject, true and predicted age and volumes."""
    frames = []
    for split, (rows, age_pred, c_pred) in parts.items():
        df = pd.DataFrame({"id": meta[params["id_column"]].to_numpy()[rows], "split": split,
                           "age": meta[params["age_column"]].to_numpy(float)[rows],
                           "age_pred": age_pred})
        for j, name in enumerate(concepts):
            df[name] = meta[name].to_numpy(float)[rows]
            if c_pred is not None:
                df[f"{name}_pred"] = c_pred[:, j]
        frames.append(df)
    pd.concat(frames).to_csv(path, index=False, float_format="%.6g")


# ---------------------------------------------------------------- objective
def preflight(params: Mapping[str, Any], data_dir: Path | None) -> None:
    """Before a run: bad values, then every image of the cohort read in full (and cached),
    so a broken cohort exits 2 listing every bad file instead of failing each trial."""
    check_params(params)
    load_data(params, data_dir)


@register_task("brain-age", metric="val_mae", direction="minimize", defaults=DEFAULTS,
               smoke=SMOKE, check=preflight)
def brain_age(params: Mapping[str, Any], ctx: TrialContext) -> dict[str, float]:
    """Brain age from T1 MRI via a CNN -> tissue-volume bottleneck -> regressor (years MAE)."""
    check_params(params)
    cohort = load_data(params, ctx.data_dir)
    meta, concepts = cohort.meta, concept_names(params)
    sp = make_splits(meta, params)
    c_all = meta[concepts].to_numpy(float)
    a_all = meta[params["age_column"]].to_numpy(float)
    tr = sp["train"]
    sc = Scaler(c_all[tr], a_all[tr])
    vols = device_volumes(cohort.volumes, ctx.device)
    idx = {k: torch.as_tensor(v, device=ctx.device) for k, v in sp.items()}
    y = np.column_stack([sc.concepts(c_all[tr]), sc.age(a_all[tr])])
    y_train = torch.as_tensor(y, dtype=torch.float32, device=ctx.device)
    model = build_model(params, len(concepts), ctx.device)
    opt = torch.optim.Adam(model.parameters(), lr=float(params["lr"]),
                           weight_decay=float(params["weight_decay"]))
    sched = (torch.optim.lr_scheduler.CosineAnnealingLR(opt, int(params["epochs"]))
             if params["lr_schedule"] == "cosine" else None)
    bottleneck = params["model"] == "bottleneck" and params["mode"] != "joint"
    reg = None
    if bottleneck and params["mode"] == "independent":  # true volumes -> age, fitted once
        reg = make_regressor(params, ctx.seed).fit(y[:, :-1], y[:, -1])
    gen = generator(ctx.device, ctx.seed)
    t0 = time.perf_counter()
    for epoch in range(int(params["epochs"])):
        loss = train_epoch(model, opt, vols, idx["train"], y_train, params, gen)
        if sched is not None:
            sched.step()
        if not np.isfinite(loss):
            raise FloatingPointError(f"training loss is {loss} at epoch {epoch}")
        if bottleneck and params["mode"] == "sequential":  # predicted volumes -> age
            c_tr, _ = forward_all(model, vols, idx["train"], int(params["eval_batch_size"]))
            assert c_tr is not None
            reg = make_regressor(params, ctx.seed).fit(c_tr, y[:, -1])
        val_age, _ = predict(model, reg, vols, idx["val"], params, sc)
        val_mae = float(np.abs(val_age - a_all[sp["val"]]).mean())
        ctx.report(epoch, train_loss=loss, val_mae=val_mae)
    train_s = time.perf_counter() - t0
    test_age, test_c = predict(model, reg, vols, idx["test"], params, sc)
    metrics = {"val_mae": val_mae, **age_metrics(test_age, a_all[sp["test"]], "test"),
               "test_mae_mean_predictor": float(np.abs(a_all[tr].mean() - a_all[sp["test"]])
                                                .mean()),
               "train_volumes_per_s": len(tr) * int(params["epochs"]) / max(train_s, 1e-9)}
    if test_c is not None:
        for j, name in enumerate(concepts):
            metrics[f"concept_mae_{name}"] = float(np.abs(test_c[:, j] - c_all[sp["test"], j])
                                                   .mean())
    _, val_c = predict(model, reg, vols, idx["val"], params, sc)
    save_predictions(ctx.artifact_dir / "predictions.csv", meta,
                     {"val": (sp["val"], val_age, val_c), "test": (sp["test"], test_age, test_c)},
                     params, concepts)
    return metrics
