"""Models of the brain-age task: a 3D CNN and the regressors from tissue volumes to age.

The CNN is `depth` blocks of conv (`kernel`^3, `width * 2**i` channels) -> ReLU -> 2x
pool, then dropout and a linear head; the original baseline is depth 1, width 2, max-pool
(2 * 48^3 = 221k features into the head at 96^3). Regressors share one interface,
`fit(x, y) -> self` and `predict(x)`, on float64 numpy arrays of min-max-scaled volumes
and standardised age: an MLP (full-batch Adam: 3 inputs and a few hundred subjects make
mini-batches pointless), RBF kernel ridge and linear ridge (scikit-learn).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from bench.errors import ConfigError


class CNN3d(nn.Module):
    def __init__(self, shape: int, depth: int = 1, width: int = 2, kernel: int = 3,
                 pooling: str = "max", dropout: float = 0.0, out_dim: int = 3):
        super().__init__()
        self.config = dict(shape=shape, depth=depth, width=width, kernel=kernel,
                           pooling=pooling, dropout=dropout, out_dim=out_dim)
        pool = nn.MaxPool3d if pooling == "max" else nn.AvgPool3d
        layers: list[nn.Module] = []
        ch, size = 1, shape
        for i in range(depth):
            out = width * 2**i
            layers += [nn.Conv3d(ch, out, kernel, padding=kernel // 2), nn.ReLU(inplace=True),
                       pool(2)]
            ch, size = out, size // 2
        self.features = nn.Sequential(*layers, nn.Flatten())
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(ch * size**3, out_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class MLPHead(nn.Module):
    """in_dim -> hidden (ReLU) x layers -> 1: the joint model's differentiable regressor."""

    def __init__(self, in_dim: int = 3, hidden: int = 32, layers: int = 1):
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
    """Full-batch Adam on MSE; seeded, so the same data and seed give the same fit."""

    def __init__(self, hidden: int = 32, layers: int = 1, steps: int = 500, lr: float = 1e-2,
                 weight_decay: float = 1e-4, seed: int = 0):
        self.hidden, self.layers, self.steps, self.lr = hidden, layers, steps, lr
        self.weight_decay, self.seed = weight_decay, seed
        self.net: MLPHead | None = None

    def fit(self, x: np.ndarray, y: np.ndarray) -> MLPRegressor:
        with torch.random.fork_rng():
            torch.manual_seed(self.seed)
            self.net = MLPHead(x.shape[1], self.hidden, self.layers)
        xt, yt = torch.as_tensor(x, dtype=torch.float32), torch.as_tensor(y, dtype=torch.float32)
        opt = torch.optim.Adam(self.net.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        for _ in range(self.steps):
            loss = torch.mean((self.net(xt) - yt) ** 2)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return self

    @torch.no_grad()
    def predict(self, x: np.ndarray) -> np.ndarray:
        assert self.net is not None, "fit first"
        return self.net(torch.as_tensor(x, dtype=torch.float32)).double().numpy()


def make_regressor(params: Mapping[str, Any], seed: int) -> Regressor:
    kind = params["regressor"]
    if kind == "mlp":
        return MLPRegressor(int(params["mlp_hidden"]), int(params["mlp_layers"]),
                            int(params["mlp_steps"]), float(params["mlp_lr"]), seed=seed)
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
