"""Latent distribution families: priors, matching posteriors, and the KL between them.

Each family wraps a `torch.distributions` class (rsample, log_prob and the registered
analytic KLs come from torch) and adds what a latent-variable model needs on top of it:

- `prior(device)`: the prior of one latent dimension, standardised to mean 0 and variance 1,
  so that the families differ in shape and not in scale: N(0, 1), Laplace(0, 1/sqrt 2),
  U(-sqrt 3, sqrt 3).
- `posterior(a, b)`: a member of the family built from two unconstrained tensors (a: where,
  b: how wide), whose support lies inside the prior's. A Uniform posterior is placed inside
  U(-sqrt 3, sqrt 3) by construction, so KL(q || p) is finite for every (a, b).
- `point(a)` / `unpoint(z)`: an unconstrained tensor mapped into the prior's support and back
  (auto-decoder codes, and the initial location of variational parameters).
- `raw_spread(std)`: the `b` that gives a posterior of standard deviation `std`.
- `noise(shape, like, gen)` / `reparam(q, u)`: `q.rsample()` in two halves, the draw and
  the differentiable transform, so that the draw can come from a trial's own generator
  (`Family.rsample(q, gen)`: torch's numbers, from `gen`) and a fused group can draw its
  members' noise outside `torch.vmap` and transform it inside.

`kl(q, p)` is analytic where torch registers the pair and Monte Carlo otherwise; the choice is
made per (type(q), type(p)) pair on first use and remembered. Adding a family is a few lines
(Gumbel, say: torch has a Gumbel-Gumbel KL; loc -0.45, scale 0.78 standardise it; its
rsample is loc - scale * log(-log u), u uniform):

    register_family(Family(
        "gumbel", prior=lambda dev: Gumbel(_scalar(-0.45, dev), _scalar(0.78, dev)),
        posterior=_loc_scale(Gumbel), raw_spread=lambda std: _softplus_inv(0.78 * std),
        noise=_uniform_noise, reparam=lambda q, u: q.loc - q.scale * (-u.log()).log()))
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.distributions import (
    Distribution,
    Laplace,
    Normal,
    Uniform,
    kl_divergence,
    register_kl,
)

from bench.errors import ConfigError

SQRT3 = math.sqrt(3.0)
MIN_SCALE = 1e-4       # Normal/Laplace posterior scale floor: caps -log(scale) at 9.2 nats/dim
MIN_WIDTH_FRAC = 1e-4  # Uniform posterior width >= 1e-4 of the prior's: KL <= 9.2 nats/dim
MC_KL_SAMPLES = 8      # samples per KL estimate where no analytic form is registered


class ClosedUniform(Uniform):
    """Uniform with a closed support [low, high] in `log_prob`.

    `rsample` is low + u * (high - low) with u up to 1 - 2**-24, which rounds to exactly `high`
    in fp32 about once in 10**7 draws; torch's half-open log_prob would give -inf there, and one
    such draw turns an importance weight log p - log q into +inf.
    """

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        inside = (value >= self.low) & (value <= self.high)
        dens = -torch.log(self.high - self.low)
        return torch.where(inside, dens, torch.full_like(dens, -math.inf))


@register_kl(ClosedUniform, ClosedUniform)
def _kl_closed_uniform(q: ClosedUniform, p: ClosedUniform) -> torch.Tensor:
    """torch's Uniform-Uniform KL, log(width_p / width_q), +inf where q leaves p's support,
    written with `where` instead of a masked assignment so that it runs under torch.vmap
    (fused groups)."""
    result = ((p.high - p.low) / (q.high - q.low)).log()
    outside = (q.low < p.low) | (q.high > p.high)
    return torch.where(outside, torch.full_like(result, math.inf), result)


def _scalar(x: float, device: torch.device | str | None) -> torch.Tensor:
    return torch.tensor(float(x), device=device)


def _softplus_inv(y: float) -> float:
    return y + math.log(-math.expm1(-y))  # log(exp(y) - 1), stable for small and large y


def _logit(p: float) -> float:
    return math.log(p) - math.log1p(-p)


Noise = Callable[[tuple[int, ...], torch.Tensor, "torch.Generator | None"], torch.Tensor]


def _normal_noise(shape: tuple[int, ...], like: torch.Tensor,
                  gen: torch.Generator | None) -> torch.Tensor:
    """torch's standard normal draw (distributions.utils._standard_normal), from `gen`."""
    return torch.empty(shape, dtype=like.dtype, device=like.device).normal_(generator=gen)


def _uniform_noise(shape: tuple[int, ...], like: torch.Tensor,
                   gen: torch.Generator | None) -> torch.Tensor:
    """torch.rand's u ~ U[0, 1) (torch's Uniform.rsample), from `gen`."""
    return torch.rand(shape, dtype=like.dtype, device=like.device, generator=gen)


@dataclass(frozen=True)
class Family:
    name: str
    prior: Callable[[torch.device | str | None], Distribution]  # one dimension, variance 1
    posterior: Callable[[torch.Tensor, torch.Tensor], Distribution]
    raw_spread: Callable[[float], float]  # posterior std -> unconstrained b
    # q.rsample() = reparam(q, noise(q's shape, a tensor of q's dtype and device, generator))
    noise: Noise
    reparam: Callable[[Distribution, torch.Tensor], torch.Tensor]
    point: Callable[[torch.Tensor], torch.Tensor] = lambda a: a
    unpoint: Callable[[torch.Tensor], torch.Tensor] = lambda z: z

    def draw(self, q: Distribution, sample_shape: tuple[int, ...] = (),
             gen: torch.Generator | None = None) -> torch.Tensor:
        """The noise of `q.rsample(sample_shape)`, drawn from `gen` (None: the global RNG)."""
        like = q.mean
        return self.noise((*sample_shape, *q.batch_shape), like, gen)

    def rsample(self, q: Distribution, sample_shape: tuple[int, ...] = (),
                gen: torch.Generator | None = None) -> torch.Tensor:
        """`q.rsample(sample_shape)` with its draws from `gen`: with the global RNG's state
        in `gen`, the same numbers as torch's (tests/test_priors.py)."""
        return self.reparam(q, self.draw(q, sample_shape, gen))


_FAMILIES: dict[str, Family] = {}


def register_family(family: Family) -> Family:
    if family.name in _FAMILIES:
        raise ValueError(f"distribution family {family.name!r} is registered twice")
    _FAMILIES[family.name] = family
    return family


def get_family(name: str) -> Family:
    if name not in _FAMILIES:
        raise ConfigError(f"unknown distribution family {name!r}; known: {', '.join(_FAMILIES)}")
    return _FAMILIES[name]


def family_names() -> list[str]:
    return list(_FAMILIES)


def _loc_scale(cls: Callable[..., Distribution]) -> Callable[[torch.Tensor, torch.Tensor],
                                                              Distribution]:
    """loc = a, scale = softplus(b) + MIN_SCALE, for any torch loc-scale class."""

    def build(a: torch.Tensor, b: torch.Tensor) -> Distribution:
        return cls(a, F.softplus(b) + MIN_SCALE, validate_args=False)

    return build


# ---------------------------------------------------------------- Uniform inside U(-sqrt3, sqrt3)
def _uniform_prior(device: torch.device | str | None) -> Distribution:
    return ClosedUniform(_scalar(-SQRT3, device), _scalar(SQRT3, device), validate_args=False)


def _uniform_posterior(a: torch.Tensor, b: torch.Tensor) -> Distribution:
    """U(low, high) with -sqrt3 <= low < high <= sqrt3 for every finite (a, b).

    b sets the width as a fraction of the prior's (at least MIN_WIDTH_FRAC), a places it in
    the slack that is left; low >= -sqrt3 because a non-negative term is added to it, and high
    is clipped at sqrt3 because low + width may round one ulp past it.
    """
    span = 2 * SQRT3
    width = span * (MIN_WIDTH_FRAC + (1 - MIN_WIDTH_FRAC) * torch.sigmoid(b))
    low = -SQRT3 + (span - width) * torch.sigmoid(a)
    high = torch.clamp(low + width, max=SQRT3)
    return ClosedUniform(low, high, validate_args=False)


def _uniform_point(a: torch.Tensor) -> torch.Tensor:
    return -SQRT3 + 2 * SQRT3 * torch.sigmoid(a)


def _uniform_unpoint(z: torch.Tensor) -> torch.Tensor:
    u = ((z + SQRT3) / (2 * SQRT3)).clamp(1e-6, 1 - 1e-6)
    return torch.log(u) - torch.log1p(-u)


def _laplace_noise(shape: tuple[int, ...], like: torch.Tensor,
                   gen: torch.Generator | None) -> torch.Tensor:
    """torch's Laplace draw: u ~ U(eps - 1, 1), eps of the dtype."""
    low = torch.finfo(like.dtype).eps - 1
    return torch.empty(shape, dtype=like.dtype, device=like.device).uniform_(low, 1,
                                                                            generator=gen)


def _laplace_reparam(q: Distribution, u: torch.Tensor) -> torch.Tensor:
    """torch's Laplace.rsample from its u ~ U(eps - 1, 1)."""
    assert isinstance(q, Laplace)
    return q.loc - q.scale * u.sign() * torch.log1p(-u.abs())


def _uniform_reparam(q: Distribution, u: torch.Tensor) -> torch.Tensor:
    assert isinstance(q, Uniform)
    return q.low + u * (q.high - q.low)


def _normal_reparam(q: Distribution, u: torch.Tensor) -> torch.Tensor:
    assert isinstance(q, Normal)
    return q.loc + u * q.scale


register_family(Family(
    "normal", prior=lambda dev: Normal(_scalar(0, dev), _scalar(1, dev), validate_args=False),
    posterior=_loc_scale(Normal), raw_spread=lambda std: _softplus_inv(std - MIN_SCALE),
    noise=_normal_noise, reparam=_normal_reparam))
register_family(Family(
    "laplace",  # variance 2 b^2 = 1
    prior=lambda dev: Laplace(_scalar(0, dev), _scalar(1 / math.sqrt(2), dev),
                              validate_args=False),
    posterior=_loc_scale(Laplace),
    raw_spread=lambda std: _softplus_inv(std / math.sqrt(2) - MIN_SCALE),
    noise=_laplace_noise, reparam=_laplace_reparam))
register_family(Family(
    "uniform", prior=_uniform_prior, posterior=_uniform_posterior,
    # std = width / sqrt 12 and the prior's width is sqrt 12, so std is the width fraction
    raw_spread=lambda std: _logit((std - MIN_WIDTH_FRAC) / (1 - MIN_WIDTH_FRAC)),
    noise=_uniform_noise, reparam=_uniform_reparam,
    point=_uniform_point, unpoint=_uniform_unpoint))


# ---------------------------------------------------------------- KL, chosen per pair
_ANALYTIC: dict[tuple[type, type], bool] = {}


def kl_is_analytic(q: Distribution, p: Distribution) -> bool:
    """Whether torch registers an analytic KL(q || p) for these types (probed once per pair)."""
    key = (type(q), type(p))
    if key not in _ANALYTIC:
        try:
            kl_divergence(q, p)
            _ANALYTIC[key] = True
        except NotImplementedError:
            _ANALYTIC[key] = False
    return _ANALYTIC[key]


def kl_mc(q: Distribution, p: Distribution, samples: int = MC_KL_SAMPLES) -> torch.Tensor:
    """Unbiased Monte Carlo KL(q || p), elementwise: mean of log q(z) - log p(z), z ~ q."""
    z = q.rsample((samples,))
    return (q.log_prob(z) - p.log_prob(z)).mean(0)


def kl(q: Distribution, p: Distribution, samples: int = MC_KL_SAMPLES) -> torch.Tensor:
    """KL(q || p) elementwise (sum over the latent dimensions yourself)."""
    if kl_is_analytic(q, p):
        return kl_divergence(q, p)
    return kl_mc(q, p, samples)
