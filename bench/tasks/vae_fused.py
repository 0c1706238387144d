"""The vae task fused: K VAEs (or AEs) of one shape trained as one stacked model.

Members share the shape-fixing parameters (`FusedVae.group_keys`: width, depth, model,
likelihood, batch size, epochs, data sizes) and differ in learning rate, beta and its
warm-up, seed, and latent size up to the group's `latent_cap`. A smaller latent is
embedded in the cap: its unused encoder rows and decoder columns are zero and stay zero
(masked codes carry no KL and pass no gradient), so the member is exactly the smaller
model. Each member draws the same random numbers it would draw alone (its own generators
for data order and reparameterisation noise, its own seeded initialisation), and Adam runs
per member (`StackedAdam`), so a member's objective equals its unfused rerun's to float
rounding (tests/test_fused.py).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch.func import functional_call

from bench.fused import FusedGroup, Member, StackedAdam
from bench.lifecycle import TaskSpec
from bench.nets import binarize
from bench.registry import register_fused
from bench.tasks import vae as V
from bench.train import autocast, generator

NOISE_SEED_OFFSET = 1_000_003  # as VaeTrial: its noise generator is seeded seed + this


class _Slot:
    """A member's own pieces: its parameters, generators and unfused twin (for export)."""

    def __init__(self, m: Member, model: V.VAE, device: torch.device):
        self.params, self.latent = m.params, int(m.params["latent_dim"])
        self.model = model  # the member as an unfused model: export and validation
        self.gen = generator(device, m.ctx.seed)
        self.noise_gen = generator(device, m.ctx.seed + NOISE_SEED_OFFSET)
        self.val_mu: torch.Tensor | None = None


class CappedNets(FusedGroup):
    """Members whose conv encoder/decoder (bench.nets) share one shape but whose latent
    size varies up to the group's `cap`: their networks stacked [K, ...] in `params`,
    padded (a smaller latent's encoder head rows and decoder input columns are zero and,
    its codes masked by `mask`, stay zero), trained by one StackedAdam. Shared by the vae's
    and the priors' fused groups; `_adam_state` / `_load_adam` speak torch.optim.Adam's
    state format for a member's unfused networks."""

    vmap_on_cpu = False  # the tests run both forms on the CPU

    def _stack_nets(self, nets: list[tuple[str, torch.Tensor]], cap: int,
                    variational: bool) -> None:
        self.cap, self.variational = cap, variational
        self.names = [n for n, _ in nets]
        self.params = {n: torch.zeros(self.k, *p.shape, device=self.device,
                                      requires_grad=True) for n, p in nets}
        self.opt = StackedAdam(list(self.params.values()), torch.zeros(self.k))
        self.opt.active[:] = False
        self.mask = torch.zeros(self.k, cap, device=self.device)
        # the members' forward and backward: one vmapped (grouped) call per layer, or a
        # loop over members. On the CPU grouped convolutions are slower than the members'
        # own (oneDNN; benchmarks/RESULTS.md), so there the group loops
        self.vectorised = self.device.type != "cpu" or self.vmap_on_cpu

    def _cols(self, latent: int) -> list[int]:
        """Where a member's latent outputs sit among the cap's: [0, L), and for the
        variational models the second half's (mu/logvar, or a/b) [cap, cap + L)."""
        cols = list(range(latent))
        if self.variational:
            cols += list(range(self.cap, self.cap + latent))
        return cols

    def _index(self, name: str, latent: int) -> tuple[Any, ...] | list[int]:
        """Where a member's tensor `name` sits in its padded slot."""
        if name in ("encoder.head.weight", "encoder.head.bias"):
            return self._cols(latent)
        if name == "decoder.fc.weight":
            return (slice(None), slice(0, latent))
        return (...,)

    def _embed(self, slot: int, tensors: Mapping[str, torch.Tensor], latent: int,
               into: Mapping[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for name in self.names:
                target = into[name][slot]
                target.zero_()
                target[self._index(name, latent)] = tensors[name].to(target)

    def _join(self, slot: int, model: torch.nn.Module, latent: int, lr: float) -> None:
        """A member's freshly built networks into its slot, its mask and learning rate."""
        self._embed(slot, dict(model.named_parameters()), latent, self.params)
        self.mask[slot] = 0
        self.mask[slot, :latent] = 1
        self.opt.set_member(slot, lr)

    def _leave(self, slot: int) -> None:
        self.opt.active[slot] = False
        self.mask[slot] = 0
        with torch.no_grad():  # a failed member's NaNs must not linger in its slot
            for p in self.params.values():
                p[slot] = 0

    def _sync_nets(self, slot: int, model: torch.nn.Module, latent: int) -> None:
        """The member's unfused networks set to its current parameters."""
        with torch.no_grad():
            for name in self.names:
                model.get_parameter(name).copy_(self.params[name][slot][self._index(name,
                                                                                   latent)])

    def _adam_state(self, slot: int, model: torch.nn.Module, latent: int,
                    opt: torch.optim.Optimizer) -> None:
        """Fill `opt` (a torch Adam over the member's unfused networks) with its moments."""
        moments = self.opt.member_state(slot)
        m = dict(zip(self.names, moments["m"], strict=True))
        v = dict(zip(self.names, moments["v"], strict=True))
        for name in self.names:
            idx = self._index(name, latent)
            opt.state[model.get_parameter(name)] = {
                "step": torch.tensor(moments["step"], dtype=torch.float32),
                "exp_avg": m[name][idx].clone(), "exp_avg_sq": v[name][idx].clone()}

    def _load_adam(self, slot: int, opt: Mapping[str, Any], latent: int) -> None:
        """A torch Adam state dict over the member's networks (in `self.names` order) into
        its slot of the StackedAdam."""
        if not opt["state"]:
            return
        m, v = {}, {}
        for i, name in enumerate(self.names):
            st = opt["state"][i]
            m[name], v[name] = st["exp_avg"], st["exp_avg_sq"]
        self._embed(slot, m, latent, dict(zip(self.names, self.opt.m, strict=True)))
        self._embed(slot, v, latent, dict(zip(self.names, self.opt.v, strict=True)))
        self.opt.steps[slot] = float(opt["state"][len(self.names) - 1]["step"])


@register_fused("vae")
class FusedVae(CappedNets):
    group_keys = ("dataset", "model", "likelihood", "binarize", "depth", "width",
                  "batch_size", "epochs", "train_size", "val_size", "eval_batch_size")
    # the reports' fixed networks (BatchNorm in bn256), the per-pixel MSE and the Monte
    # Carlo KL train one trial at a time
    supports = {"arch": ("conv",), "likelihood": ("bernoulli", "gaussian"),
                "kl": ("analytic",)}
    def __init__(self, spec: TaskSpec, k: int, template: Mapping[str, Any],
                 device: torch.device, data_dir: Path | None, latent_cap: int):
        super().__init__(spec, k, template, device, data_dir)
        self.data = V.load_split(template, device, data_dir)
        self.shape = tuple(self.data["train"].shape[1:])
        base = V.build_model({**template, "latent_dim": latent_cap}, self.shape, device)
        self._stack_nets(list(base.named_parameters()), latent_cap, base.variational)
        self.base = base.to("meta")
        self.slots: list[_Slot | None] = [None] * k

    # ------------------------------------------------------------ slots
    def set_member(self, slot: int, member: Member) -> None:
        """A new member: its own initialisation (seeded by the caller), lr and generators."""
        model = V.build_model(member.params, self.shape, self.device)
        s = _Slot(member, model, self.device)
        self._join(slot, model, s.latent, float(member.params["lr"]))
        self.slots[slot] = s

    def drop_member(self, slot: int) -> None:
        self._leave(slot)
        self.slots[slot] = None

    def examples_per_epoch(self) -> int:
        return len(self.data["train"])

    # ------------------------------------------------------------ training
    def _loss(self, p: dict[str, torch.Tensor], x: torch.Tensor, eps: torch.Tensor,
              mask: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
        enc = {n.removeprefix("encoder."): v for n, v in p.items() if n.startswith("encoder.")}
        dec = {n.removeprefix("decoder."): v for n, v in p.items() if n.startswith("decoder.")}
        h = functional_call(self.base.encoder, enc, (x,))
        if self.variational:
            mu = h[..., : self.cap] * mask
            logvar = h[..., self.cap:].clamp(-12.0, 8.0) * mask
            z = mu + eps * torch.exp(0.5 * logvar)
            kl = V.kl_normal(mu.float(), logvar.float())
        else:
            z, kl = h * mask, torch.zeros((), device=x.device)
        out = functional_call(self.base.decoder, dec, (z,))
        return (-self._log_px(out, x, p) + beta * kl).mean()

    def _log_px(self, out: torch.Tensor, x: torch.Tensor, p: dict[str, torch.Tensor]
                ) -> torch.Tensor:
        if self.template["likelihood"] == "bernoulli":
            return V.bernoulli_log_px(out, x)
        ls = p["log_sigma"].clamp(-7.0, 2.0)
        lp = -0.5 * ((x - out.float()) * torch.exp(-ls)) ** 2 - ls - 0.5 * V.LOG_2PI
        return lp.flatten(-3).sum(-1)

    def _batch(self, idx: torch.Tensor, i: int) -> torch.Tensor:
        s = self.slots[i]
        x = binarize(self.data["train"][idx], self.template["binarize"],
                     self.template["likelihood"], s.gen if s is not None else None)
        if self.device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def _stacked_batch(self, idx: torch.Tensor) -> torch.Tensor:
        """[K, B] indices -> [K, B, C, H, W] inputs (a deterministic binarisation)."""
        x = binarize(self.data["train"][idx], self.template["binarize"],
                     self.template["likelihood"])
        if self.device.type == "cuda":  # each member's slice channels_last, as `_batch`
            x = x.permute(0, 1, 3, 4, 2).contiguous().permute(0, 1, 4, 2, 3)
        return x

    def _looped(self, p: dict[str, torch.Tensor], x: torch.Tensor, eps: torch.Tensor,
                mask: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
        """`vmap(_loss)` as a loop over the live members (empty slots cost nothing)."""
        losses = [self._loss({n: v[i] for n, v in p.items()}, x[i], eps[i], mask[i], beta[i])
                  if s is not None else torch.zeros((), device=x.device)
                  for i, s in enumerate(self.slots)]
        return torch.stack(losses)

    def _noise(self, i: int, b: int) -> torch.Tensor:
        eps = torch.zeros(b, self.cap, device=self.device)
        s = self.slots[i]
        if s is not None and self.variational:
            eps[:, : s.latent] = V.noise(eps[:, : s.latent], s.noise_gen)
        return eps

    def probe(self) -> None:
        full = self.data["train"]
        self.data["train"] = full[: int(self.template["batch_size"])]  # one step
        try:
            self.train_epoch([0] * self.k)
        finally:
            self.data["train"] = full

    def train_epoch(self, epochs: list[int | None]) -> dict[str, torch.Tensor]:
        n, bs = len(self.data["train"]), int(self.template["batch_size"])
        perms = {i: torch.randperm(n, device=self.device, generator=s.gen)
                 for i, s in enumerate(self.slots) if s is not None}
        idle = torch.arange(n, device=self.device)
        beta = torch.tensor([V.beta_at(s.params, e) if s is not None and e is not None else 0.0
                             for s, e in zip(self.slots, epochs, strict=True)],
                            device=self.device)
        weight = torch.tensor([s is not None for s in self.slots], dtype=torch.float32,
                              device=self.device)
        total = torch.zeros(self.k, device=self.device)
        step = torch.vmap(self._loss) if self.vectorised else self._looped
        drawn = self.template["binarize"] == "dynamic" and \
            self.template["likelihood"] == "bernoulli"  # from each member's own generator
        for start in range(0, n, bs):
            idx = [perms.get(i, idle)[start: start + bs] for i in range(self.k)]
            if drawn:
                x = torch.stack([self._batch(j, i) for i, j in enumerate(idx)])
            else:  # one gather and one binarisation for the whole group
                x = self._stacked_batch(torch.stack(idx))
            eps = torch.stack([self._noise(i, len(idx[0])) for i in range(self.k)])
            with autocast(self.device):
                losses = step(self.params, x, eps, self.mask, beta)
            self.opt.zero_grad()
            (losses * weight).sum().backward()
            self.opt.step()
            total += losses.detach().float() * len(idx[0])
        return {"train_loss": torch.where(weight > 0, total / n, torch.nan)}

    # ------------------------------------------------------------ evaluation and state
    def _sync(self, i: int) -> V.VAE:
        """The member's unfused model, holding its current parameters."""
        s = self.slots[i]
        assert s is not None
        self._sync_nets(i, s.model, s.latent)
        return s.model

    def validate(self, slots: list[int], epochs: list[int]) -> dict[int, dict[str, Any]]:
        out = {}
        for i in slots:
            terms = V.elbo_terms(self._sync(i), self.data["val"],
                                 int(self.template["eval_batch_size"]))
            s = self.slots[i]
            assert s is not None
            s.val_mu = terms["mu"]
            out[i] = {k: float(v) for k, v in V._means(terms, "val").items()}
        return out

    def finish(self, slot: int) -> dict[str, float]:
        s = self.slots[slot]
        assert s is not None and s.val_mu is not None
        return {"val_active_units": float(V.active_units(s.val_mu))}

    def member_state(self, slot: int, optimizers: bool = True) -> dict[str, Any]:
        """The state VaeTrial.state_dict() would hold: model, opt, gen, noise_gen."""
        s = self.slots[slot]
        assert s is not None
        model = self._sync(slot)
        state: dict[str, Any] = {"model": model.state_dict(), "gen": s.gen.get_state(),
                                 "noise_gen": s.noise_gen.get_state()}
        if optimizers:
            opt = torch.optim.Adam(model.parameters(), lr=float(self.opt.lr[slot]))
            self._adam_state(slot, model, s.latent, opt)
            state["opt"] = opt.state_dict()
        return state

    def load_member(self, slot: int, state: Mapping[str, Any]) -> None:
        s = self.slots[slot]
        assert s is not None
        s.model.load_state_dict(state["model"])
        self._embed(slot, dict(s.model.named_parameters()), s.latent, self.params)
        s.gen.set_state(state["gen"].cpu() if s.gen.device.type == "cpu" else state["gen"])
        s.noise_gen.set_state(state["noise_gen"].cpu() if s.noise_gen.device.type == "cpu"
                              else state["noise_gen"])
        if state.get("opt") is not None:
            self._load_adam(slot, state["opt"], s.latent)
