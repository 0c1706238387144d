"""SimSiam's two-view augmentation, applied to whole uint8 batches on the training device.

kornia draws every random parameter per image (crop box, flip, jitter factors, grayscale
coin), so one call on a [B, C, H, W] batch is B independent torchvision-style pipelines;
torchvision's v2 transforms draw one set per call and would need a per-image CPU loop
(see benchmarks/simsiam_pipeline.py for what that costs). Two calls give the two views,
with independent parameters.

Recipe (SimSiam, Chen & He 2021, appendix D, CIFAR): RandomResizedCrop scale 0.2-1,
horizontal flip p=0.5, colour jitter 0.4/0.4/0.4/0.1 with p=0.8, grayscale p=0.2. On a
1-channel set saturation and hue are undefined, so jitter keeps brightness and contrast
and grayscale is dropped (it would be the identity). This needs kornia >= 0.9, whose
ColorJitter skips a step whose factors are all neutral and uses torchvision's formulas;
0.7 runs the hue step on 1-channel input and fails ("shape of (*, 3, H, W)").
"""

from __future__ import annotations

import torch
from torch import nn

# Per-channel mean/std of each training set in [0, 1] (the usual published constants).
MEAN_STD: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "mnist": ((0.1307,), (0.3081,)),
    "fashion-mnist": ((0.2860,), (0.3530,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
}
JITTER = (0.4, 0.4, 0.4, 0.1)  # brightness, contrast, saturation, hue


def mean_std(dataset: str, channels: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Known constants, or 0.5/0.25 per channel for a set we have no figures for."""
    return MEAN_STD.get(dataset, ((0.5,) * channels, (0.25,) * channels))


class Normalize(nn.Module):
    """uint8 or [0, 1] float -> standardised float, per channel."""

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.uint8:
            x = x.float().div_(255.0)
        return (x - self.mean) / self.std


class TwoViewAugment(nn.Module):
    """`views(x_u8)` -> two standardised float views, every parameter drawn per image."""

    def __init__(self, channels: int, size: int, mean: tuple[float, ...], std: tuple[float, ...],
                 min_scale: float = 0.2, jitter_p: float = 0.8, gray_p: float = 0.2):
        super().__init__()
        import kornia.augmentation as K  # here, not at module level: `bench list` stays light

        colour = channels == 3
        b, c, s, h = JITTER
        ops: list[nn.Module] = [
            K.RandomResizedCrop((size, size), scale=(min_scale, 1.0)),
            K.RandomHorizontalFlip(p=0.5),
            K.ColorJitter(b, c, s if colour else 0.0, h if colour else 0.0, p=jitter_p),
        ]
        if colour:
            ops.append(K.RandomGrayscale(p=gray_p))
        self.ops = nn.Sequential(*ops)
        self.norm = Normalize(mean, std)

    def one(self, x_u8: torch.Tensor) -> torch.Tensor:
        """One augmented, standardised view of a uint8 batch."""
        return self.norm(self.ops(x_u8.float().div_(255.0)))

    def forward(self, x_u8: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.one(x_u8), self.one(x_u8)
