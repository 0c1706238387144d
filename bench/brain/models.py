"""Models of the brain-age task: a 3D CNN and the regressors from tissue volumes to age.

The CNN is one block per entry of `channels` (conv `kernel`^3 without padding, as the
report's, or `same` padding -> optional batch norm -> ReLU -> 2x pool), then a head:

- `flatten` (the report's): every voxel of the last feature map into a linear layer,
  optionally through a hidden layer. The report's baseline, Conv3d(1 -> 2, k3) - ReLU -
  MaxPool - Linear(2 * 47^3 -> 3), has 622,997 parameters at 96^3, 622,941 of them in the
  head: one weight per voxel and concept for a few hundred subjects.
- `mean`: a 1x1x1 conv to `hidden` channels (ReLU), the mean over space, a linear layer.
  A tissue volume is a count of voxels, i.e. the mean over a fixed grid of a per-voxel
  tissue fraction times a constant: this head is that sum with a learned per-voxel
  classifier, the same weights at every position. (The sum over space is the mean times
  the fixed voxel count, a constant the linear layer absorbs, so one of them is enough.)

Regressors share one interface, `fit(x, y) -> self` and `predict(x)`, on float64 numpy
arrays of scaled volumes and standardised age: an MLP (the report's 3 -> 64 -> 1, Adam,
mini-batches, per-epoch history), RBF kernel ridge and linear ridge (scikit-learn).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from itertools import combinations_with_replacement
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from bench.errors import ConfigError
from bench.specs.brain_age import (  # noqa: F401  (the declarations are the source)
    HEADS,
    NORMS,
    conv_channels,
    feature_size,
)


class CNN3d(nn.Module):
    def __init__(self, shape: int, channels: Sequence[int] = (2,), kernel: int = 3,
                 padding: str = "valid", pooling: str = "max", norm: str = "none",
                 head: str = "flatten", hidden: int = 0, dropout: float = 0.0,
                 out_dim: int = 3, in_channels: int = 1):
        super().__init__()
        if head not in HEADS or norm not in NORMS:
            raise ConfigError(f"brain-age: head must be one of {HEADS} and norm one of "
                              f"{NORMS}, got head={head!r}, norm={norm!r}")
        pool = nn.MaxPool3d if pooling == "max" else nn.AvgPool3d
        layers: list[nn.Module] = []
        ch = in_channels
        for out in channels:
            layers.append(nn.Conv3d(ch, out, kernel, padding=kernel // 2 if padding == "same"
                                    else 0))
            if norm == "batch":
                layers.append(nn.BatchNorm3d(out))
            layers += [nn.ReLU(inplace=True), pool(2)]
            ch = out
        self.features = nn.Sequential(*layers)
        size = feature_size(shape, len(channels), kernel, padding)
        self.head = (flatten_head(ch * size**3, hidden, dropout, out_dim) if head == "flatten"
                     else mean_head(ch, hidden, dropout, out_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def erode(m: torch.Tensor) -> torch.Tensor:
    """Binary erosion of a bool [B,1,X,Y,Z] by the 3^3 cube, the image's edge not counted as
    outside (a voxel stays when its in-image neighbours are all set): three 1-D ANDs of
    shifted views, 15x faster on the CPU than a 3^3 min-pool, and exact."""
    for d in (2, 3, 4):
        n, y = m.shape[d], m.clone()
        y.narrow(d, 0, n - 1).logical_and_(m.narrow(d, 1, n - 1))
        y.narrow(d, 1, n - 1).logical_and_(m.narrow(d, 0, n - 1))
        m = y
    return m


class ShellMomentRidge(nn.Module):
    """Tissue volumes as a ridge regression, fitted in closed form, on the per-voxel
    monomials (degree <= 3) of the input channels summed within `shells` depth shells of
    the brain mask (layers `thickness` voxels thick from its surface, the last the rest).

    Why (benchmarks/RESULTS.md, brain-age, "a closed-form model"): a 6 mm voxel's mean,
    mean square and mean cube of intensity and its brain fraction determine its CSF/GM/WM
    mix, so a volume is a sum over voxels of a smooth function of the channels, and the
    shells let that function differ between cortex and deep tissue. The solution is a
    finely balanced combination of nearly collinear sums: gradient descent (the CNN's
    optimiser) does not reach it in a few hundred steps, least squares does exactly.
    `fit` sets the buffers; the state (and a checkpoint) is those buffers alone. Ridge's
    alpha is chosen from 1e-6 (a floor) to 1e3: the standardised monomials are nearly
    collinear (a brain fraction of 0 or 1 equals its square), and leave-one-out mostly
    picks the floor.

    `bins` k >= 2 adds, per shell, a soft histogram of the intensity (channel 0) in k bins
    weighted by the brain fraction (each voxel split between its two nearest bin centres,
    linearly; bins spread over `hist_range`, set by `set_range` from the training images
    and part of the state): a volume can then be a sum over voxels of any piecewise-linear
    function of the intensity, which a cubic cannot follow at 2 mm, where a voxel's
    intensity is nearly its tissue's (RESULTS, "eighth session")."""

    DEGREE = 3
    mean: torch.Tensor
    scale: torch.Tensor
    coef: torch.Tensor
    intercept: torch.Tensor
    alpha: torch.Tensor
    hist_range: torch.Tensor  # with bins only

    def __init__(self, in_channels: int, mask_index: int, out_dim: int, shells: int = 3,
                 thickness: int = 1, bins: int = 0):
        super().__init__()
        self.mask_index, self.n_shells, self.thickness = mask_index, shells, thickness
        self.bins = bins
        self.combos = [c for k in range(1, self.DEGREE + 1)
                       for c in combinations_with_replacement(range(in_channels), k)]
        n = shells * (len(self.combos) + bins)
        if bins:  # a buffer only then: the state of a model without bins is unchanged
            self.register_buffer("hist_range", torch.tensor([0.0, 1.0], dtype=torch.float64))
        self.register_buffer("mean", torch.zeros(n, dtype=torch.float64))
        self.register_buffer("scale", torch.ones(n, dtype=torch.float64))
        self.register_buffer("coef", torch.zeros(n, out_dim, dtype=torch.float64))
        self.register_buffer("intercept", torch.zeros(out_dim, dtype=torch.float64))
        self.register_buffer("alpha", torch.zeros(out_dim, dtype=torch.float64))

    def shells(self, x: torch.Tensor) -> torch.Tensor:
        """[B,C,S,S,S] -> [B,n,S,S,S]: the brain (mask channel > 0.5) cut by erosion (`erode`,
        the 3^3 cube) into layers `thickness` voxels thick from its surface, the last shell the
        rest (n=3: the outer layer, the next one, the interior; n=1: the brain)."""
        inside = (x[:, self.mask_index] > 0.5)[:, None]
        out, outer = [], inside
        for _ in range(self.n_shells - 1):
            inner = outer
            for _ in range(self.thickness):
                inner = erode(inner)
            out.append(outer & ~inner)
            outer = inner
        return torch.cat([*out, outer], 1).to(torch.float32)

    def set_range(self, lo: float, hi: float) -> None:
        """The intensities the histogram's first and last bin centres sit at."""
        if not hi > lo:
            raise ValueError(f"histogram range: need hi > lo, got {lo}, {hi}")
        self.hist_range.copy_(torch.tensor([lo, hi], dtype=torch.float64))

    def histogram(self, x: torch.Tensor, shells: torch.Tensor) -> torch.Tensor:
        """[B, shells, bins]: per shell, the brain fraction of each voxel split between the
        two bins whose centres bracket its intensity (linearly; outside the range, the end
        bin takes it all), summed in float32 (as the monomials), returned as float64."""
        k, n = self.bins, self.n_shells
        lo, hi = (float(v) for v in self.hist_range)
        t = (x[:, 0].clamp(lo, hi) - lo) * ((k - 1) / (hi - lo))
        if x.is_cuda:  # CUDA's scatter_add adds in no fixed order: reruns would differ
            return self.histogram_dense(t, x[:, self.mask_index], shells)
        left = t.floor().clamp(0, k - 2)
        upper = t - left
        rank = torch.arange(1, n + 1, dtype=shells.dtype, device=x.device).view(1, n, 1, 1, 1)
        which = (shells * rank).sum(1)  # 1..n: a brain voxel's shell (they are disjoint)
        weight = x[:, self.mask_index] * (which > 0)  # the brain fraction; 0 outside
        idx = ((which - 1).clamp(min=0) * k + left).long().flatten(1)
        out = torch.zeros(len(x), n * k, dtype=torch.float32, device=x.device)
        out.scatter_add_(1, idx, ((1 - upper) * weight).flatten(1))
        out.scatter_add_(1, idx + 1, (upper * weight).flatten(1))
        return out.double().reshape(len(x), n, k)

    def histogram_dense(self, t: torch.Tensor, frac: torch.Tensor,
                        shells: torch.Tensor) -> torch.Tensor:
        """`histogram` as one tent function per bin (t: the intensity in bin units): k
        passes instead of a scatter, but sums in a fixed order (deterministic on CUDA)."""
        weighted = shells * frac[:, None]
        out = [torch.einsum("bxyz,bsxyz->bs", (1 - (t - j).abs()).clamp_(min=0), weighted)
               for j in range(self.bins)]
        return torch.stack(out, 2).double()

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """[B,C,S,S,S] -> [B, shells x (monomials + bins)]: float32 sums, returned as
        float64."""
        with torch.autocast(x.device.type, enabled=False):  # sums of float32, not bf16
            x = x.to(torch.float32)
            shells = self.shells(x)
            out: list[torch.Tensor] = []
            monos: dict[tuple[int, ...], torch.Tensor] = {}
            for combo in self.combos:  # in order of degree: one product each
                mono = x[:, combo[0]] if len(combo) == 1 else monos[combo[:-1]] * x[:, combo[-1]]
                if len(combo) < self.DEGREE:  # a prefix of higher degrees: kept
                    monos[combo] = mono
                out.append(torch.einsum("bxyz,bsxyz->bs", mono, shells))
            feats = torch.stack(out, 2).to(torch.float64)  # [B, shells, monomials]
            if self.bins:
                feats = torch.cat([feats, self.histogram(x, shells)], 2)
            return feats.reshape(len(x), -1)

    def fit(self, feats: np.ndarray, y: np.ndarray) -> ShellMomentRidge:
        """Ridge per output on standardised features, alpha by leave-one-out (RidgeCV)."""
        from sklearn.linear_model import RidgeCV

        mean, scale = feats.mean(0), feats.std(0)
        scale[scale < 1e-12] = 1.0
        ridge = RidgeCV(alphas=np.logspace(-6, 3, 28), alpha_per_target=True)
        ridge.fit((feats - mean) / scale, y)
        coef = np.asarray(ridge.coef_).reshape(y.shape[1], -1).T  # one output: [n] from sklearn
        for name, value in (("mean", mean), ("scale", scale), ("coef", coef),
                            ("intercept", ridge.intercept_),
                            ("alpha", np.broadcast_to(ridge.alpha_, (y.shape[1],)))):
            getattr(self, name).copy_(torch.tensor(np.array(value, np.float64)))
        return self

    def predict(self, feats: torch.Tensor) -> torch.Tensor:
        """Volumes from `features` (float64, as fitted) -> float32."""
        z = (feats.to(self.coef) - self.mean) / self.scale
        return (z @ self.coef + self.intercept).to(torch.float32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):
            return self.predict(self.features(x))


def flatten_head(features: int, hidden: int, dropout: float, out_dim: int) -> nn.Module:
    mods: list[nn.Module] = [nn.Flatten(), nn.Dropout(dropout)]
    if hidden > 0:  # the report's H1: Linear(64000 -> 16) - ReLU - Linear(16 -> 3)
        mods += [nn.Linear(features, hidden), nn.ReLU(inplace=True)]
        features = hidden
    return nn.Sequential(*mods, nn.Linear(features, out_dim))


class SpatialMean(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3, 4))


def mean_head(ch: int, hidden: int, dropout: float, out_dim: int) -> nn.Module:
    mods: list[nn.Module] = []
    if hidden > 0:  # a per-voxel classifier before the count
        mods += [nn.Conv3d(ch, hidden, 1), nn.ReLU(inplace=True)]
        ch = hidden
    return nn.Sequential(*mods, SpatialMean(), nn.Dropout(dropout), nn.Linear(ch, out_dim))


def n_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


class MLPHead(nn.Module):
    """in_dim -> hidden (ReLU) x layers -> 1: the MLP regressor and the joint model's head."""

    def __init__(self, in_dim: int = 3, hidden: int = 64, layers: int = 1):
        super().__init__()
        mods: list[nn.Module] = []
        d = in_dim
        for _ in range(layers):
            mods += [nn.Linear(d, hidden), nn.ReLU()]
            d = hidden
        self.net = nn.Sequential(*mods, nn.Linear(d, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).squeeze(-1)


class Regressor(Protocol):
    def fit(self, x: np.ndarray, y: np.ndarray) -> Regressor: ...

    def predict(self, x: np.ndarray) -> np.ndarray: ...


class MLPRegressor:
    """Adam on MSE over `epochs` shuffled mini-batches (full batch when `batch_size` is None);
    seeded, so the same data and seed give the same fit. `history` holds one
    (epoch, train MSE, validation MAE) per epoch, in the scaled units, when `monitor` is set."""

    def __init__(self, hidden: int = 64, layers: int = 1, epochs: int = 30, lr: float = 1e-3,
                 batch_size: int | None = 16, weight_decay: float = 0.0, seed: int = 0):
        self.hidden, self.layers, self.epochs, self.lr = hidden, layers, epochs, lr
        self.batch_size, self.weight_decay, self.seed = batch_size, weight_decay, seed
        self.net: MLPHead | None = None
        self.monitor: tuple[np.ndarray, np.ndarray] | None = None  # (x_val, y_val)
        self.history: list[tuple[int, float, float]] = []

    def fit(self, x: np.ndarray, y: np.ndarray) -> MLPRegressor:
        gen = torch.Generator().manual_seed(self.seed)
        with torch.random.fork_rng():
            torch.manual_seed(self.seed)
            self.net = MLPHead(x.shape[1], self.hidden, self.layers)
        xt, yt = torch.as_tensor(x, dtype=torch.float32), torch.as_tensor(y, dtype=torch.float32)
        opt = torch.optim.Adam(self.net.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        batch = self.batch_size or len(xt)
        self.history = []
        for epoch in range(self.epochs):
            total = 0.0
            for idx in torch.randperm(len(xt), generator=gen).split(batch):
                loss = torch.mean((self.net(xt[idx]) - yt[idx]) ** 2)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total += float(loss.detach()) * len(idx)
            self._record(epoch, total / len(xt))
        return self

    def _record(self, epoch: int, train_mse: float) -> None:
        if self.monitor is not None:
            x_val, y_val = self.monitor
            mae = float(np.abs(self.predict(x_val) - y_val).mean())
            self.history.append((epoch, train_mse, mae))

    @torch.no_grad()
    def predict(self, x: np.ndarray) -> np.ndarray:
        assert self.net is not None, "fit first"
        return self.net(torch.as_tensor(x, dtype=torch.float32)).double().numpy()


def make_regressor(params: Mapping[str, Any], seed: int) -> Regressor:
    kind = params["regressor"]
    if kind == "mlp":
        return MLPRegressor(int(params["mlp_hidden"]), int(params["mlp_layers"]),
                            int(params["mlp_epochs"]), float(params["mlp_lr"]),
                            params["mlp_batch_size"], float(params["mlp_weight_decay"]),
                            seed=seed)
    if kind == "kernel_ridge":
        from sklearn.kernel_ridge import KernelRidge

        return KernelRidge(alpha=float(params["kr_alpha"]), kernel="rbf",
                           gamma=float(params["kr_gamma"]))
    if kind == "ridge":
        from sklearn.linear_model import Ridge

        return Ridge(alpha=float(params["ridge_alpha"]))
    raise ConfigError(f"brain-age: regressor: must be mlp, kernel_ridge or ridge, got {kind!r}")


class JointModel(nn.Module):
    """CNN -> scaled volumes -> head -> scaled age, trained end to end (Koh et al. 2020)."""

    def __init__(self, cnn: CNN3d, head: nn.Module):
        super().__init__()
        self.cnn, self.head = cnn, head

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        concepts = self.cnn(x)
        return concepts, self.head(concepts.float())


def joint_head(params: Mapping[str, Any], n_concepts: int) -> nn.Module:
    """MLP for regressor=mlp, a linear layer for ridge; kernel ridge is not differentiable."""
    if params["regressor"] == "mlp":
        return MLPHead(n_concepts, int(params["mlp_hidden"]), int(params["mlp_layers"]))
    if params["regressor"] == "ridge":
        return MLPHead(n_concepts, 1, 0)
    raise ConfigError("brain-age: mode=joint trains the regressor by gradient descent: "
                      f"regressor must be mlp or ridge, got {params['regressor']!r}")
