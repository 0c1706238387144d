"""Networks and likelihoods shared by the image tasks (vae, priors): below the tasks, so no
task imports another.

Every likelihood is per instance, summed over pixels, in nats. Besides the configurable
`ConvEncoder`/`ConvDecoder`, the networks of the original reports are here, layer for layer
(`ARCHS`: encoder and decoder builders by name), so a variant can reproduce a report's
model exactly. Decoders return pre-activation outputs: the report's final sigmoid is applied
by the likelihood (Bernoulli logits, or the mean of a per-pixel MSE), never twice.
"""

from __future__ import annotations

import math
from collections.abc import Callable

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


def gaussian_log_px(mean: torch.Tensor, x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Gaussian log p(x | z) with a fixed pixel std `sigma`, per image, summed over pixels
    (nats; a density, so it can be positive); `mean` broadcasts over x."""
    z = (x - mean.float()) / sigma
    lp = -0.5 * z * z - math.log(sigma) - 0.5 * math.log(2 * math.pi)
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


# ---------------------------------------------------------------- the reports' networks
class Trim(nn.Module):
    """Keep the top-left `size` x `size` pixels (report 000 decodes 29x29, then trims)."""

    def __init__(self, size: int):
        super().__init__()
        self.size = size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[..., : self.size, : self.size]


class LinearToMap(nn.Module):
    """Linear layer -> [B, ch, s, s] feature map (the decoders' first layer)."""

    def __init__(self, latent_dim: int, ch: int, s: int):
        super().__init__()
        self.fc, self.ch, self.s = nn.Linear(latent_dim, ch * s * s), ch, s

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.fc(z).view(-1, self.ch, self.s, self.s)


def lrelu16_encoder(in_ch: int, out_dim: int) -> nn.Sequential:
    """Report 000's encoder: conv 16-32-32-32 (3x3; strides 1, 2, 2, 1; LeakyReLU 0.01 after
    all but the last) on 28x28 -> 32x7x7 -> linear heads, here one linear to `out_dim` (the
    report's separate mean and log-variance heads, concatenated: the same parameters)."""
    return nn.Sequential(
        nn.Conv2d(in_ch, 16, 3, 1, 1), nn.LeakyReLU(0.01),
        nn.Conv2d(16, 32, 3, 2, 1), nn.LeakyReLU(0.01),
        nn.Conv2d(32, 32, 3, 2, 1), nn.LeakyReLU(0.01), nn.Conv2d(32, 32, 3, 1, 1),
        nn.Flatten(), nn.Linear(32 * 7 * 7, out_dim))


def lrelu16_decoder(out_ch: int, latent_dim: int) -> nn.Sequential:
    """Report 000's decoder, the encoder mirrored: linear -> 32x7x7 -> transposed convs
    32-32-16-1 (3x3; strides 1, 2, 2, 1; paddings 1, 1, 0, 0: 7 -> 7 -> 13 -> 27 -> 29),
    trimmed to 28x28. 57,541 parameters with the encoder at latent size 2, as reported."""
    return nn.Sequential(
        LinearToMap(latent_dim, 32, 7),
        nn.ConvTranspose2d(32, 32, 3, 1, 1), nn.LeakyReLU(0.01),
        nn.ConvTranspose2d(32, 32, 3, 2, 1), nn.LeakyReLU(0.01),
        nn.ConvTranspose2d(32, 16, 3, 2, 0), nn.LeakyReLU(0.01),
        nn.ConvTranspose2d(16, out_ch, 3, 1, 0), Trim(28))


def bn256_encoder(in_ch: int, out_dim: int) -> nn.Sequential:
    """Report 001's encoder as its assignment specifies it: conv 32 (k4, 28 -> 14), 64 (k4,
    -> 7, BN), 128 (k3, -> 3, BN), 256 (k3, -> 1, BN), LeakyReLU (0.01) after each, linear to
    `out_dim`. (The report's own code used stride 5 in the last two layers, giving 2x2 then
    1x1: a deviation from the specification, not reproduced.)"""
    def block(i: int, o: int, k: int, s: int, p: int, bn: bool = True) -> list[nn.Module]:
        return [nn.Conv2d(i, o, k, s, p), *([nn.BatchNorm2d(o)] if bn else []),
                nn.LeakyReLU(0.01)]

    return nn.Sequential(*block(in_ch, 32, 4, 2, 1, bn=False), *block(32, 64, 4, 2, 1),
                         *block(64, 128, 3, 2, 0), *block(128, 256, 3, 1, 0),
                         nn.Flatten(), nn.Linear(256, out_dim))


def bn256_decoder(out_ch: int, latent_dim: int) -> nn.Sequential:
    """Report 001's decoder, the encoder mirrored as specified: linear -> 256x1x1 -> BN ->
    LeakyReLU -> transposed convs 128 (k3, -> 3), 64 (k3, s2, -> 7), 32 (k4, s2, -> 14),
    1 (k4, s2, -> 28), BN and LeakyReLU between them. (The report's code skipped the
    32-channel layer with one k4 stride-4 layer, 7 -> 28: not reproduced.)"""
    def up(i: int, o: int, k: int, s: int, p: int) -> list[nn.Module]:
        return [nn.ConvTranspose2d(i, o, k, s, p), nn.BatchNorm2d(o), nn.LeakyReLU(0.01)]

    return nn.Sequential(LinearToMap(latent_dim, 256, 1), nn.BatchNorm2d(256),
                         nn.LeakyReLU(0.01), *up(256, 128, 3, 1, 0), *up(128, 64, 3, 2, 0),
                         *up(64, 32, 4, 2, 1), nn.ConvTranspose2d(32, out_ch, 4, 2, 1))


class DcganLinearDecoder(nn.Module):
    """Report 002's decoder: ConvT(L -> 128, k7) - BN - ReLU - ConvT(-> 64, k4, s2) - BN - ReLU
    - ConvT(-> 1, k4, s2) - sigmoid - Linear(784 -> 784). The linear layer after the sigmoid
    is the report's (it rescaled [0, 1] to its [0, 255] targets): the output is unbounded."""

    def __init__(self, out_ch: int, size: int, latent_dim: int):
        super().__init__()
        self.net = nn.Sequential(
            nn.ConvTranspose2d(latent_dim, 128, 7, 1, 0), nn.BatchNorm2d(128), nn.ReLU(),
            nn.ConvTranspose2d(128, 64, 4, 2, 1), nn.BatchNorm2d(64), nn.ReLU(),
            nn.ConvTranspose2d(64, out_ch, 4, 2, 1), nn.Sigmoid())
        self.shape = (out_ch, size, size)
        self.mlp = nn.Linear(out_ch * size * size, out_ch * size * size)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.net(z.reshape(-1, z.shape[-1], 1, 1)).flatten(1)
        return self.mlp(h).view(-1, *self.shape)


EncoderDecoder = tuple[nn.Module, nn.Module]


def _conv(in_ch: int, size: int, width: int, depth: int, code_dim: int,
          latent_dim: int) -> EncoderDecoder:
    return (ConvEncoder(in_ch, size, width, depth, code_dim),
            ConvDecoder(in_ch, size, width, depth, latent_dim))


def _fixed(enc: Callable[[int, int], nn.Module],
           dec: Callable[[int, int], nn.Module]) -> Callable[..., EncoderDecoder]:
    def build(in_ch: int, size: int, width: int, depth: int, code_dim: int,
              latent_dim: int) -> EncoderDecoder:
        if size != 28:
            raise ValueError(f"this network is built for 28x28 images, got {size}x{size}")
        return enc(in_ch, code_dim), dec(in_ch, latent_dim)

    return build


# name -> (in_ch, size, width, depth, code_dim, latent_dim) -> (encoder, decoder); `width`
# and `depth` shape "conv" only, the reports' networks are fixed.
ARCHS: dict[str, Callable[..., EncoderDecoder]] = {
    "conv": _conv,
    "lrelu16": _fixed(lrelu16_encoder, lrelu16_decoder),
    "bn256": _fixed(bn256_encoder, bn256_decoder),
}
FIXED_SIZE_ARCHS = ("lrelu16", "bn256")  # 28x28 single-channel images only
