"""Networks and likelihoods shared by the image tasks (vae, priors): below the tasks, so no
task imports another.

Every likelihood is per instance, summed over pixels, in nats.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def binarize(x_u8: torch.Tensor, mode: str, likelihood: str,
             gen: torch.Generator | None = None) -> torch.Tensor:
    """uint8 images -> model inputs: {0,1} for Bernoulli, [0,1] for Gaussian/MSE."""
    x = x_u8.float().div_(255.0)
    if likelihood != "bernoulli":
        return x
    if mode == "dynamic":
        return torch.bernoulli(x, generator=gen)
    return (x_u8 > 127).float()


def bernoulli_log_px(logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Bernoulli log p(x | z) per image, summed over pixels (nats); logits broadcast over x."""
    logits = logits.float()
    lp = -F.binary_cross_entropy_with_logits(logits, x.expand_as(logits), reduction="none")
    return lp.flatten(-3).sum(-1)


def _sizes(size: int, depth: int) -> list[int]:
    """Edge length after each downsampling conv (k=4, s=2, p=1 maps n to n // 2)."""
    sizes = [size]
    for _ in range(min(depth, 2)):
        sizes.append(sizes[-1] // 2)
    return sizes


class ConvEncoder(nn.Module):
    """depth conv layers (the first two stride 2) -> linear to `out_dim`."""

    def __init__(self, in_ch: int, size: int, width: int, depth: int, out_dim: int):
        super().__init__()
        layers: list[nn.Module] = []
        ch = in_ch
        for i in range(depth):
            down = i < 2
            out = width * 2 ** min(i, 1)
            layers += [nn.Conv2d(ch, out, 4 if down else 3, 2 if down else 1, 1), nn.SiLU()]
            ch = out
        self.features = nn.Sequential(*layers, nn.Flatten())
        self.head = nn.Linear(ch * _sizes(size, depth)[-1] ** 2, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class ConvDecoder(nn.Module):
    """The encoder mirrored: linear -> stride-1 convs -> transposed convs back to `size`."""

    def __init__(self, out_ch: int, size: int, width: int, depth: int, latent_dim: int):
        super().__init__()
        sizes = _sizes(size, depth)
        self.ch, self.s = width * 2 ** min(depth - 1, 1), sizes[-1]
        self.fc = nn.Linear(latent_dim, self.ch * self.s**2)
        layers: list[nn.Module] = [nn.SiLU()]
        for _ in range(depth - (len(sizes) - 1)):
            layers += [nn.Conv2d(self.ch, self.ch, 3, 1, 1), nn.SiLU()]
        ch = self.ch
        for i in reversed(range(len(sizes) - 1)):  # sizes[i+1] -> sizes[i]
            out = out_ch if i == 0 else width
            extra = sizes[i] - 2 * sizes[i + 1]  # 1 where the target edge is odd
            layers.append(nn.ConvTranspose2d(ch, out, 4, 2, 1, output_padding=extra))
            if i > 0:
                layers.append(nn.SiLU())
            ch = out
        self.net = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(self.fc(z).view(-1, self.ch, self.s, self.s))
