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
from bench.lifecycle import EpochTrial
from bench.params import Choice, Float, Int, Metric, Text
from bench.registry import register_task
from bench.train import autocast, batches, generator
from bench.trial import TrialContext

PARAMS = {
    "cohort": Text(None, help="cohort folder; null: the simulated cohort (generated once)"),
    "metadata": Text("metadata.csv"),
    "file_pattern": Text("{id}.nii.gz"),
    "id_column": Text("id"),
    "age_column": Text("age"),
    "concepts": Text("csfv,gmv,wmv", help="metadata columns the CNN predicts"),
    "split_column": Text("split", help='rows whose value is "test" form the test split'),
    "shape": Int(96, 8, 512, help="edge of the cube the volumes are brought to"),
    "resize": Choice("resample", ["resample", "crop"]),
    "normalize": Choice("percentile", ["percentile", "zscore", "none"]),
    "on_bad_file": Choice("error", ["error", "skip"]),
    "sim_n": Int(600, 10, 100_000, help="simulated cohort: subjects"),
    "sim_seed": Int(0, 0),
    "model": Choice("bottleneck", ["bottleneck", "direct"], help="direct: CNN -> age"),
    "mode": Choice("independent", ["independent", "sequential", "joint"]),
    "regressor": Choice("mlp", ["mlp", "kernel_ridge", "ridge"]),
    "depth": Int(1, 1, 8, help="the original baseline: 1 conv layer, 2 channels, max-pool"),
    "width": Int(2, 1, 512),
    "kernel": Int(3, 1, 11),
    "pooling": Choice("max", ["max", "avg"]),
    "dropout": Float(0.0, 0.0, 0.99),
    "lr": Float(1e-3, high=10.0, above=0.0),
    "lr_schedule": Choice("constant", ["constant", "cosine"],
                          help="cosine: to 0 over `epochs`, stepped per epoch"),
    "weight_decay": Float(0.0, 0.0),
    "batch_size": Int(16, 1),
    "epochs": Int(20, 1, 100_000),
    "concept_weight": Float(1.0, 0.0, help="joint: weight of the concept MSE"),
    "mlp_hidden": Int(32, 1),
    "mlp_layers": Int(1, 0, 16),
    "mlp_steps": Int(500, 1),
    "mlp_lr": Float(1e-2, high=10.0, above=0.0),
    "kr_alpha": Float(0.1, above=0.0, help="5-fold CV on the simulated training split"),
    "kr_gamma": Float(3.0, above=0.0),
    "ridge_alpha": Float(1.0, 0.0),
    "train_size": Int(None, 1),
    "test_size": Int(None, 1),
    "test_fraction": Float(0.25, high=0.9, above=0.0),
    "val_fraction": Float(0.15, high=0.9, above=0.0),
    "split_seed": Int(0, 0),
    "eval_batch_size": Int(32, 1),
}
DEFAULTS = {k: d.default for k, d in PARAMS.items()}
SMOKE = {"shape": 24, "sim_n": 40, "epochs": 2, "batch_size": 8, "mlp_steps": 100}
CONCEPTS = ("csfv", "gmv", "wmv")  # per-concept metrics are declared for these names
BUCKETS = tuple(range(0, 100, 10))  # MAE by 10-year age bucket
YEARS, ML = "years", "mL"
METRICS = {
    "train_loss": Metric("MSE (scaled)", "training loss on scaled targets", "train"),
    "val_mae": Metric(YEARS, "mean absolute error of the predicted age, validation", "val"),
    "val_mae_mean_predictor": Metric(YEARS, "MAE of predicting the training mean age, "
                                     "validation", "val"),
    "test_mae": Metric(YEARS, "mean absolute error of the predicted age, test", "test"),
    "test_bias": Metric(YEARS, "mean signed error (predicted - true), test", "test"),
    "test_r2": Metric("", "coefficient of determination of the age, test", "test"),
    "test_mae_mean_predictor": Metric(YEARS, "MAE of predicting the training mean age, test",
                                      "test"),
    **{f"test_mae_{b}_{b + 9}": Metric(YEARS, f"test MAE of subjects aged {b}-{b + 9}", "test")
       for b in BUCKETS},
    **{f"concept_mae_{c}": Metric(ML, f"MAE of the predicted {c}, test", "test")
       for c in CONCEPTS},
}
_DEVICE_VOLS: dict[tuple[int, str], torch.Tensor] = {}


def rules(params: Mapping[str, Any]) -> list[str]:
    """Combinations of values that cannot run."""
    bad = []
    if int(params["shape"]) // 2 ** int(params["depth"]) < 1:
        bad.append(f"depth: {params['depth']} poolings shrink shape {params['shape']} below "
                   "1 voxel")
    if params["model"] == "bottleneck" and params["mode"] == "joint" \
            and params["regressor"] == "kernel_ridge":
        bad.append("regressor: mode=joint trains the regressor by gradient descent: regressor "
                   "must be mlp or ridge, got 'kernel_ridge'")
    if not concept_names(params):
        bad.append(f"concepts: must name at least one metadata column, got "
                   f"{params['concepts']!r}")
    return bad


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
        if b in BUCKETS:
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


# ---------------------------------------------------------------- the trial
def data_check(params: Mapping[str, Any], data_dir: Path | None) -> None:
    """Before a run: every image of the cohort read in full (and cached), so a broken cohort
    exits 2 listing every bad file instead of failing each trial."""
    load_data(params, data_dir)


@register_task("brain-age", metric="val_mae", direction="minimize", params=PARAMS,
               metrics=METRICS, smoke=SMOKE, rules=rules, data=data_check,
               requires=("brain", ("nibabel", "nilearn")))
class BrainAgeTrial(EpochTrial):
    """Brain age from T1 MRI via a CNN -> tissue-volume bottleneck -> regressor (years MAE)."""

    def __init__(self, params: Mapping[str, Any], ctx: TrialContext):
        super().__init__(params, ctx)
        cohort = load_data(params, ctx.data_dir)
        self.meta, self.concepts = cohort.meta, concept_names(params)
        self.sp = make_splits(self.meta, params)
        self.c_all = self.meta[self.concepts].to_numpy(float)
        self.a_all = self.meta[params["age_column"]].to_numpy(float)
        tr = self.sp["train"]
        self.sc = Scaler(self.c_all[tr], self.a_all[tr])
        self.vols = device_volumes(cohort.volumes, ctx.device)
        self.idx = {k: torch.as_tensor(v, device=ctx.device) for k, v in self.sp.items()}
        self.y = np.column_stack([self.sc.concepts(self.c_all[tr]), self.sc.age(self.a_all[tr])])
        self.y_train = torch.as_tensor(self.y, dtype=torch.float32, device=ctx.device)
        self.model = build_model(params, len(self.concepts), ctx.device)
        self.opt = torch.optim.Adam(self.model.parameters(), lr=float(params["lr"]),
                                    weight_decay=float(params["weight_decay"]))
        self.sched = (torch.optim.lr_scheduler.CosineAnnealingLR(self.opt, self.epochs)
                      if params["lr_schedule"] == "cosine" else None)
        self.bottleneck = params["model"] == "bottleneck" and params["mode"] != "joint"
        self.reg: Any = None
        if self.bottleneck and params["mode"] == "independent":  # true volumes -> age, once
            self.reg = make_regressor(params, ctx.seed).fit(self.y[:, :-1], self.y[:, -1])
        self.gen = generator(ctx.device, ctx.seed)
        self.examples_per_epoch = len(tr)

    def sizes(self) -> dict[str, int]:
        return {k: len(v) for k, v in self.sp.items()}

    def train_epoch(self, epoch: int) -> dict[str, float]:
        loss = train_epoch(self.model, self.opt, self.vols, self.idx["train"], self.y_train,
                           self.params, self.gen)
        if self.sched is not None:
            self.sched.step()
        return {"train_loss": loss}

    def _fit_sequential(self) -> None:
        """Sequential mode: the regressor learns age from the CNN's predicted volumes."""
        if self.bottleneck and self.params["mode"] == "sequential":
            c_tr, _ = forward_all(self.model, self.vols, self.idx["train"],
                                  int(self.params["eval_batch_size"]))
            assert c_tr is not None
            self.reg = make_regressor(self.params, self.ctx.seed).fit(c_tr, self.y[:, -1])

    def restored(self) -> None:
        self._fit_sequential()

    def _predict(self, split: str) -> tuple[np.ndarray, np.ndarray | None]:
        return predict(self.model, self.reg, self.vols, self.idx[split], self.params, self.sc)

    def validate(self, epoch: int) -> dict[str, float]:
        self._fit_sequential()
        val_age, _ = self._predict("val")
        return {"val_mae": float(np.abs(val_age - self.a_all[self.sp["val"]]).mean())}

    def finish(self) -> dict[str, float]:
        mean_age = self.a_all[self.sp["train"]].mean()
        return {"val_mae_mean_predictor": float(np.abs(mean_age - self.a_all[self.sp["val"]])
                                                .mean())}

    def test(self) -> dict[str, float]:
        test = self.sp["test"]
        test_age, test_c = self._predict("test")
        mean_age = self.a_all[self.sp["train"]].mean()
        metrics = {**age_metrics(test_age, self.a_all[test], "test"),
                   "test_mae_mean_predictor": float(np.abs(mean_age - self.a_all[test]).mean())}
        if test_c is not None:
            for j, name in enumerate(self.concepts):
                if name in CONCEPTS:
                    metrics[f"concept_mae_{name}"] = float(
                        np.abs(test_c[:, j] - self.c_all[test, j]).mean())
        return metrics

    def save_artifacts(self, folder: Path) -> None:
        """predictions.csv: true and predicted age and volumes of every val/test subject."""
        parts = {split: (self.sp[split], *self._predict(split)) for split in ("val", "test")}
        save_predictions(folder / "predictions.csv", self.meta, parts, self.params,
                         self.concepts)
