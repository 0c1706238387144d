"""Brain age from T1 MRI through a concept bottleneck of tissue volumes (CSF, GM, WM).

Reads top to bottom: cohort, splits, scaling, training, evaluation, the trial. A 3D CNN
predicts the scaled volumes csfv/gmv/wmv; a regressor (MLP, RBF kernel ridge, linear
ridge) maps volumes to age. The three concept-bottleneck modes of Koh et al. (2020, ICML,
"Concept Bottleneck Models"): independent (regressor fitted on the true training volumes,
as the original report does), sequential (fitted on the CNN's predicted training volumes,
refitted each epoch), joint (CNN and an MLP/linear head end to end, loss = age MSE +
concept_weight * concept MSE). `model=direct` is the reference without the bottleneck:
the CNN predicts age. The CNN trains with Adam at `lr`, constant or (`lr_schedule=cosine`)
decayed to 0 over the epochs; no checkpoint selection: the last epoch's model is scored.

The defaults are the original report's settings (../shared/seeds/000_347117b93a658727.txt,
part 1): Conv3d(1 -> 2, k3, no padding) - ReLU - MaxPool - Linear(2*47^3 -> 3) at 96^3
(622,997 parameters), Adam at 1e-3 for 30 epochs, min-max scaled volumes, an MLP 3 -> 64
-> 1 (ReLU) at lr 1e-3 for 30 epochs, 75/25 test and 85/15 validation splits stratified by
10-year bucket. What the report does not give (batch sizes: 16) is marked where it is set.

Why that baseline does not learn csfv, and what does (benchmarks/RESULTS.md, brain-age):
its head has one weight per voxel and concept (207,646 per concept at 96^3) for ~400
training subjects, so it fits the training volumes and not the count; `head=mean` (a
per-voxel classifier averaged over space: a volume is a count of voxels) has a few hundred
weights and the right invariance. At 32^3 (6 mm voxels) a dark voxel is CSF or a voxel
half outside the skull-stripped brain; `mask_channel` adds the fraction of each voxel
inside the brain as a second input channel (benchmarks/RESULTS.md, brain-age, "the
brain-mask channel": the best 32^3 configuration's test MAE 6.42 -> 6.24 y, mean of 4
seeds, better on 3 of them). `moments` 2 or 3 add the mean square (and cube) of the
intensity over each voxel: with the mean and the brain fraction they determine a 6 mm
voxel's CSF/GM/WM mix. The CNN does not use them (6.4 y), but a ridge regression fitted in
closed form does: `net=shell_ridge` (bench.brain.models.ShellMomentRidge) sums the per-voxel
monomials of the channels within depth shells of the brain and fits each volume by least
squares, in seconds: the 20-trial search at 32^3 reaches 4.25 y (RESULTS, "a closed-form
model"). Gradient descent does not find that finely balanced combination of nearly
collinear sums in a few hundred steps; least squares does.

Data: without `cohort`, the simulated cohort (`bench.brain.sim`, `sim_n` subjects at
`shape`^3) is generated once under the data root and reused. Splits: the cohort's own
test rows (`split` column == "test") when present, else 75/25 stratified by 10-year
bucket; train/val 85/15 stratified; both seeded by `split_seed`, not the trial's seed, so
every trial is scored on the same subjects. Scaling is fitted on the training split only
(the report normalised the test ages with test-set statistics; that leak is not copied).

Speed: the float16 volumes sit on the device once per process (96^3 x 622 = 1.1 GB) and
batches are index slices into them, never copies of a split; bf16 autocast and
channels_last_3d on CUDA; the training loss is read once per epoch.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.brain import plots as _plots  # noqa: F401  (registers the brain-age figures)
from bench.brain.evaluation import (
    age_metrics,
    concept_metrics,
    save_predictions,
    save_regressor_curve,
)
from bench.brain.models import (
    CNN3d,
    JointModel,
    MLPRegressor,
    ShellMomentRidge,
    conv_channels,
    joint_head,
    make_regressor,
)
from bench.brain.splits import Scaler, make_splits
from bench.data import cache_root
from bench.lifecycle import EpochTrial
from bench.specs.brain_age import (  # noqa: F401
    DEFAULTS,
    METRICS,
    ML,
    PARAMS,
    SCALED,
    SMOKE,
    YEARS,
    concept_names,
    rules,
    shell_voxels,
    trained_epochs,
)
from bench.train import autocast, batches, generator
from bench.trial import TrialContext

_DEVICE_VOLS: dict[tuple[int, str], torch.Tensor] = {}
# net=shell_ridge's features of every subject, per cohort and shell cut (`shell_features`)
_SHELL_FEATURES: dict[tuple[Any, ...], tuple[torch.Tensor, torch.Tensor]] = {}
_RANGES: dict[tuple[Any, ...], tuple[torch.Tensor, tuple[float, float]]] = {}


# ---------------------------------------------------------------- cohort and splits
def load_data(params: Mapping[str, Any], data_dir: Path | None) -> Any:
    from bench.brain.cohort import CohortSpec, load_cohort
    from bench.brain.sim import ensure_sim_cohort

    shape = int(params["shape"])
    folder = params["cohort"]
    if folder is None:
        folder = ensure_sim_cohort(cache_root(), int(params["sim_n"]),
                                   int(params["sim_shape"] or shape), int(params["sim_seed"]))
    concepts = tuple(concept_names(params))
    spec = CohortSpec(Path(folder).expanduser(), shape, params["metadata"],
                      params["file_pattern"], params["id_column"], params["age_column"],
                      concepts, params["resize"], params["normalize"],
                      bool(params["mask_channel"]), int(params["moments"]))
    return load_cohort(spec, params["on_bad_file"])


def device_volumes(vols: torch.Tensor, device: torch.device) -> torch.Tensor:
    """The cohort's float16 volumes on `device`, copied once per process."""
    if device.type == "cpu":
        return vols
    key = (id(vols), str(device))
    if key not in _DEVICE_VOLS:
        _DEVICE_VOLS.clear()  # one cohort on the device at a time: 1 GB each at 96^3
        _DEVICE_VOLS[key] = vols.to(device, non_blocking=True)
    return _DEVICE_VOLS[key]


def intensity_range(vols: torch.Tensor, idx: torch.Tensor, mask_index: int,
                    batch: int) -> tuple[float, float]:
    """The 0.5th and 99.5th percentiles of the intensity (channel 0) of the brain voxels of
    the subjects `idx`, from every 97th brain voxel of each subject (so the same whatever
    the batch size)."""
    sample = []
    for part in idx.split(batch):
        x = vols[part].float()
        sample += [v[0][v[mask_index] > 0.5][::97] for v in x]
    q = torch.quantile(torch.cat(sample).double(),
                       torch.tensor([0.005, 0.995], dtype=torch.float64, device=vols.device))
    return float(q[0]), float(q[1])


def fit_range(ridge: ShellMomentRidge, cohort: torch.Tensor, vols: torch.Tensor,
              train: torch.Tensor, batch: int) -> None:
    """With bins: the histogram's range from the training subjects `train` (once per
    process for a cohort and split)."""
    if not ridge.bins:
        return
    key = (id(cohort), str(vols.device), ridge.mask_index, hash(train.cpu().numpy().tobytes()))
    if key not in _RANGES:
        _RANGES[key] = (cohort, intensity_range(vols, train, ridge.mask_index, batch))
    ridge.set_range(*_RANGES[key][1])


def shell_features(ridge: ShellMomentRidge, cohort: torch.Tensor, vols: torch.Tensor,
                   batch: int) -> torch.Tensor:
    """`ridge.features` of every subject of `vols` (`cohort`'s volumes on the device) [N, F],
    computed once per process for a cohort, device, shell cut and histogram (its bins and
    the range the model holds now: a checkpoint's, once loaded); they do not depend on the
    fit: a trial's splits are rows of it, and the trials of a search that share them share
    it (at 96^3 the features are nearly all of a trial's time). Keyed by the cohort's CPU
    tensor, which is held (so its id is not reused); the device copy is not."""
    hist = (ridge.bins, *ridge.hist_range.tolist()) if ridge.bins else ()
    key = (id(cohort), str(vols.device), ridge.mask_index, ridge.n_shells, ridge.thickness,
           *hist)
    if key not in _SHELL_FEATURES:
        if len(_SHELL_FEATURES) >= 32:  # each is small ([N, <= 6 x 98] float64)
            _SHELL_FEATURES.clear()
        rows = torch.arange(len(vols), device=vols.device).split(batch)
        with torch.no_grad():
            feats = torch.cat([ridge.features(_input(vols, part)) for part in rows])
        _SHELL_FEATURES[key] = (cohort, feats)
    return _SHELL_FEATURES[key][1]


# ---------------------------------------------------------------- training
def _input(vols: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    x = vols[idx].float()
    if x.is_cuda:
        x = x.contiguous(memory_format=torch.channels_last_3d)
    return x


def flip_lr(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Each volume of [B,C,X,Y,Z] (RAS: X runs left-right) mirrored in X with p=0.5."""
    flip = torch.rand(len(x), device=x.device, generator=gen) < 0.5
    return torch.where(flip[:, None, None, None, None], x.flip(2), x)


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


def scaled_loss(c: np.ndarray | None, a: np.ndarray | None, y: np.ndarray,
                params: Mapping[str, Any]) -> float:
    """`loss_fn` on network outputs already computed (forward_all), for the validation."""
    loss = 0.0
    if a is not None:
        loss += float(((a - y[:, -1]) ** 2).mean())
    if c is not None:
        weight = float(params["concept_weight"]) if a is not None else 1.0
        loss += weight * float(((c - y[:, :-1]) ** 2).mean())
    return loss


def train_epoch(model: torch.nn.Module, opt: torch.optim.Optimizer, vols: torch.Tensor,
                idx: torch.Tensor, y: torch.Tensor, params: Mapping[str, Any],
                gen: torch.Generator) -> float:
    model.train()
    dev = vols.device
    total = torch.zeros((), device=dev)
    for b in batches(len(idx), int(params["batch_size"]), dev, gen):
        x = _input(vols, idx[b])
        if params["augment"] == "flip":
            x = flip_lr(x, gen)
        with autocast(dev):
            loss = loss_fn(model, x, y[b], params)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        total += loss.detach() * len(b)
    return float(total) / len(idx)


@torch.no_grad()
def forward_all(model: torch.nn.Module, vols: torch.Tensor, idx: torch.Tensor,
                batch: int, direct: bool = False) -> tuple[np.ndarray | None, np.ndarray | None]:
    """(scaled concepts [n,k] or None, scaled age [n] or None) straight from the network
    (`direct`: it predicts age; one column is not enough to tell: one concept is too)."""
    model.eval()
    cs, ages = [], []
    for part in idx.split(batch):
        with autocast(vols.device):
            out = model(_input(vols, part))
        if isinstance(out, tuple):  # joint: (concepts, age)
            cs.append(out[0].float())
            ages.append(out[1].float())
        elif direct:
            ages.append(out[:, 0].float())
        else:  # bottleneck CNN: concepts
            cs.append(out.float())
    c = torch.cat(cs).double().cpu().numpy() if cs else None
    a = torch.cat(ages).double().cpu().numpy() if ages else None
    return c, a


def build_model(params: Mapping[str, Any], n_concepts: int, device: torch.device,
                in_channels: int = 1) -> torch.nn.Module:
    """The CNN (and the joint head) for volumes of `in_channels` channels (the cohort's)."""
    direct = params["model"] == "direct"
    cnn = CNN3d(int(params["shape"]), conv_channels(params), int(params["kernel"]),
                params["padding"], params["pooling"], params["norm"], params["head"],
                int(params["hidden"]), float(params["dropout"]), 1 if direct else n_concepts,
                in_channels)
    model: torch.nn.Module = cnn
    if not direct and params["mode"] == "joint":
        model = JointModel(cnn, joint_head(params, n_concepts))
    model = model.to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last_3d)
    return model


def fit_regressor(params: Mapping[str, Any], seed: int, x: np.ndarray, y: np.ndarray,
                  x_val: np.ndarray, y_val: np.ndarray) -> Any:
    """The regressor fitted on (x, y); an MLP also records its curve on (x_val, y_val)."""
    reg = make_regressor(params, seed)
    if isinstance(reg, MLPRegressor):
        reg.monitor = (x_val, y_val)
    return reg.fit(x, y)


# ---------------------------------------------------------------- the trial
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
        self.sc = Scaler(self.c_all[tr], self.a_all[tr], params["concept_scaling"])
        self.vols = device_volumes(cohort.volumes, ctx.device)
        self.idx = {k: torch.as_tensor(v, device=ctx.device) for k, v in self.sp.items()}
        self.y = {k: np.column_stack([self.sc.concepts(self.c_all[v]), self.sc.age(self.a_all[v])])
                  for k, v in self.sp.items()}
        self.y_train = torch.as_tensor(self.y["train"], dtype=torch.float32, device=ctx.device)
        self.model: torch.nn.Module
        self.opt: torch.optim.Optimizer | None = None
        self.sched: Any = None
        if params["net"] == "shell_ridge":  # closed form: fitted here, no epochs to train
            ridge = ShellMomentRidge(int(cohort.volumes.shape[1]), 1, len(self.concepts),
                                     int(params["shells"]), shell_voxels(int(params["shape"])),
                                     int(params["bins"]))
            self.model = ridge.to(ctx.device)
            self.cohort_volumes = cohort.volumes
            fit_range(ridge, cohort.volumes, self.vols, self.idx["train"],
                      int(params["eval_batch_size"]))
            feats = self._shell_features()[self.idx["train"]]
            ridge.fit(feats.cpu().numpy(), self.y["train"][:, :-1])
            fitted = ridge.predict(feats).double().cpu().numpy()  # the fit's training loss,
            self.fit_loss = scaled_loss(fitted, None, self.y["train"], params)  # reported
        else:
            self.model = build_model(params, len(self.concepts), ctx.device,
                                     int(cohort.volumes.shape[1]))
            self.opt = torch.optim.Adam(self.model.parameters(), lr=float(params["lr"]),
                                        weight_decay=float(params["weight_decay"]))
            self.sched = (torch.optim.lr_scheduler.CosineAnnealingLR(self.opt, self.epochs)
                          if params["lr_schedule"] == "cosine" else None)
        self.bottleneck = params["model"] == "bottleneck" and params["mode"] != "joint"
        self.reg: Any = None
        if self.bottleneck and params["mode"] == "independent":  # true volumes -> age, once
            self.reg = self._fit_regressor(self.y["train"][:, :-1],
                                           self.y["val"][:, :-1])
        self.gen = generator(ctx.device, ctx.seed)
        self.examples_per_epoch = len(tr)

    @property
    def epochs(self) -> int:
        return trained_epochs(self.params)

    def sizes(self) -> dict[str, int]:
        return {k: len(v) for k, v in self.sp.items()}

    def _fit_regressor(self, x_train: np.ndarray, x_val: np.ndarray) -> Any:
        return fit_regressor(self.params, self.ctx.seed, x_train, self.y["train"][:, -1],
                             x_val, self.y["val"][:, -1])

    def _shell_features(self) -> torch.Tensor:
        """net=shell_ridge's features of every subject at the model's current state (a
        restored checkpoint's histogram range included), from the process's cache."""
        assert isinstance(self.model, ShellMomentRidge)
        return shell_features(self.model, self.cohort_volumes, self.vols,
                              int(self.params["eval_batch_size"]))

    def _forward(self, split: str) -> tuple[np.ndarray | None, np.ndarray | None]:
        if isinstance(self.model, ShellMomentRidge):  # its features are computed once
            with torch.no_grad():
                c = self.model.predict(self._shell_features()[self.idx[split]])
            return c.double().cpu().numpy(), None
        return forward_all(self.model, self.vols, self.idx[split],
                           int(self.params["eval_batch_size"]), self.params["model"] == "direct")

    def train_epoch(self, epoch: int) -> dict[str, float]:
        if self.opt is None:  # the closed-form model: nothing to train
            return {"train_loss": self.fit_loss}
        loss = train_epoch(self.model, self.opt, self.vols, self.idx["train"], self.y_train,
                           self.params, self.gen)
        if self.sched is not None:
            self.sched.step()
        return {"train_loss": loss}

    def _fit_sequential(self) -> None:
        """Sequential mode: the regressor learns age from the CNN's predicted volumes."""
        if self.bottleneck and self.params["mode"] == "sequential":
            c_tr, _ = self._forward("train")
            c_va, _ = self._forward("val")
            assert c_tr is not None and c_va is not None
            self.reg = self._fit_regressor(c_tr, c_va)

    def restored(self) -> None:
        self._fit_sequential()

    def _ages(self, c: np.ndarray | None, a: np.ndarray | None) -> np.ndarray:
        """Age in years from the network's outputs (through the regressor when it has one)."""
        if a is None:
            assert c is not None and self.reg is not None
            a = np.asarray(self.reg.predict(c), dtype=float)
        return self.sc.age_back(a)

    def _predict(self, split: str) -> tuple[np.ndarray, np.ndarray | None]:
        """(age in years, volumes in the metadata's units or None for the direct model)."""
        c, a = self._forward(split)
        return self._ages(c, a), None if c is None else self.sc.concepts_back(c)

    def validate(self, epoch: int) -> dict[str, float]:
        self._fit_sequential()
        c, a = self._forward("val")
        val_age = self._ages(c, a)
        return {"val_mae": float(np.abs(val_age - self.a_all[self.sp["val"]]).mean()),
                "val_loss": scaled_loss(c, a, self.y["val"], self.params)}

    def _mean_age(self) -> float:
        return float(self.a_all[self.sp["train"]].mean())

    def finish(self) -> dict[str, float]:
        val = self.sp["val"]
        out = {"val_mae_mean_predictor": float(np.abs(self._mean_age() - self.a_all[val])
                                               .mean())}
        _, val_c = self._predict("val")
        if val_c is not None:
            out.update(concept_metrics(val_c, self.c_all[val], self.concepts, "val_concept_",
                                       mae=False))
        if self.reg is not None:  # the regressor on the true volumes: the bottleneck's ceiling
            out["val_mae_true_concepts"] = self._true_concepts_mae("val")
        return out

    def _true_concepts_mae(self, split: str) -> float:
        """MAE in years of the regressor fed the split's true (scaled) volumes."""
        true_age = self.sc.age_back(np.asarray(self.reg.predict(self.y[split][:, :-1])))
        return float(np.abs(true_age - self.a_all[self.sp[split]]).mean())

    def test(self) -> dict[str, float]:
        test = self.sp["test"]
        test_age, test_c = self._predict("test")
        metrics = {**age_metrics(test_age, self.a_all[test], "test"),
                   "test_mae_mean_predictor": float(np.abs(self._mean_age() - self.a_all[test])
                                                    .mean())}
        if test_c is not None:
            metrics.update(concept_metrics(test_c, self.c_all[test], self.concepts,
                                           "concept_", mae=True))
        if self.reg is not None:  # as val_mae_true_concepts, on the test split
            metrics["test_mae_true_concepts"] = self._true_concepts_mae("test")
        return metrics

    def save_artifacts(self, folder: Path) -> None:
        """predictions.csv (true and predicted age and volumes of every val/test subject) and
        regressor_curve.csv (the MLP regressor's epochs)."""
        parts = {split: (self.sp[split], *self._predict(split)) for split in ("val", "test")}
        save_predictions(folder / "predictions.csv", self.meta, parts, self.params,
                         self.concepts, self._mean_age())
        save_regressor_curve(folder / "regressor_curve.csv", self.reg, self.sc.sd)
