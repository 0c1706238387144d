"""The priors task fused: K auto-decoders, VADs or VAEs of one shape trained as one model.

Members share the shape-fixing parameters (`FusedPriors.group_keys`: the model kind, the
latent family, the decoder's width and depth, the likelihood, batch size, epochs, data
sizes) and differ in learning rates (networks and codes), beta, the VAD's initialisation,
seed, and latent size up to the group's `latent_cap`. What the unfused trial keeps per image
(`nn.Embedding` codes with SparseAdam) is one table per member, [K, images, raw width],
updated by a stacked sparse Adam on the rows of each member's batch (torch's SparseAdam
arithmetic, a step count and learning rate per member). A smaller latent is embedded in the
cap: its unused code columns, decoder columns and encoder rows are zero and stay zero
(masked dimensions carry no prior or KL term and pass no gradient), so the member is
exactly the smaller model. Each member draws the numbers it would draw alone: its own
initialisation (seeded), data order (`gen`) and sampling noise (`noise_gen`, drawn per
member outside `vmap` with the family's `noise`, transformed inside by its `reparam`); the
held-out code fit and the metrics run on the member's unfused model with its own
generator. So a member's objective equals its unfused rerun's to float rounding
(tests/test_fused.py).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch.func import functional_call

from bench.distributions import get_family, kl
from bench.fused import Member
from bench.lifecycle import TaskSpec
from bench.nets import bernoulli_log_px, binarize, gaussian_log_px
from bench.registry import register_fused
from bench.tasks import priors as P
from bench.tasks.vae_fused import CappedNets
from bench.train import autocast, generator

BETAS = (0.9, 0.999)  # torch.optim.SparseAdam's defaults, as make_optimizers uses them
EPS = 1e-8


class _Slot:
    """A member's own pieces: its parameters, generators and unfused twin."""

    def __init__(self, m: Member, model: P.LatentModel, device: torch.device):
        self.params, self.latent = m.params, int(m.params["latent_dim"])
        self.model = model  # the member as an unfused model: validation and export
        self.gen = generator(device, m.ctx.seed)
        self.noise_gen = generator(device, m.ctx.seed + P.NOISE_SEED_OFFSET)


@register_fused("priors")
class FusedPriors(CappedNets):
    group_keys = ("dataset", "model", "prior", "arch", "likelihood", "sigma", "width",
                  "depth", "batch_size", "epochs", "train_size", "val_size",
                  "eval_batch_size")
    # the study's dcgan decoder has BatchNorm (running statistics per member): one at a time
    supports = {"arch": ("conv",)}

    def __init__(self, spec: TaskSpec, k: int, template: Mapping[str, Any],
                 device: torch.device, data_dir: Path | None, latent_cap: int):
        super().__init__(spec, k, template, device, data_dir)
        self.data = P.load_data(template, device, data_dir)
        train = self.data["train"]
        self.n, self.shape = len(train), tuple(train.shape[1:])
        self.kind, self.family = template["model"], get_family(template["prior"])
        base = P.LatentModel(self.family, self.kind, 1, self.shape[0], self.shape[-1],
                             int(template["width"]), int(template["depth"]), latent_cap,
                             float(template["init_std"]), "conv", template["likelihood"],
                             float(template["sigma"]))
        self._stack_nets([(n, p) for n, p in base.named_parameters()
                          if not n.startswith("codes.")], latent_cap, self.kind != "ad")
        self.base = base.to("meta")
        self.prior = self.family.prior(device)  # built once: its scalars are host copies
        self.raw_width = latent_cap * (2 if self.variational else 1)
        self.tables = self.kind != "vae"
        rows = self.n if self.tables else 0  # per-image codes: one table per member
        self.codes = torch.zeros(k, rows, self.raw_width, device=device)
        self.codes_m = torch.zeros_like(self.codes)
        self.codes_v = torch.zeros_like(self.codes)
        # on the device, as StackedAdam's: a step copies nothing from the host
        self.codes_steps = torch.zeros(k, dtype=torch.float64, device=device)
        self.codes_lr = torch.zeros(k, dtype=torch.float64, device=device)
        self.slots: list[_Slot | None] = [None] * k

    # ------------------------------------------------------------ slots
    def _embed_codes(self, slot: int, table: torch.Tensor, latent: int,
                     into: torch.Tensor) -> None:
        into[slot].zero_()
        into[slot][:, self._cols(latent)] = table.to(into)

    def set_member(self, slot: int, member: Member) -> None:
        """A new member: its own initialisation (seeded by the caller: decoder, encoder,
        then its codes, as PriorsTrial builds them), learning rates and generators."""
        model = P.build_model(member.params, self.n, self.shape, self.device,
                              self.data["train_y"])
        s = _Slot(member, model, self.device)
        self._join(slot, model, s.latent, float(member.params["lr"]))
        if self.tables:
            assert model.codes is not None
            with torch.no_grad():
                self._embed_codes(slot, model.codes.weight, s.latent, self.codes)
                self.codes_m[slot].zero_()
                self.codes_v[slot].zero_()
            self.codes_steps[slot] = 0
            self.codes_lr[slot] = float(member.params["lr_codes"])
        self.slots[slot] = s

    def drop_member(self, slot: int) -> None:
        self._leave(slot)
        self.slots[slot] = None
        with torch.no_grad():  # a failed member's NaNs must not linger in its slot
            for t in (self.codes, self.codes_m, self.codes_v):
                t[slot] = 0

    def examples_per_epoch(self) -> int:
        return self.n

    # ------------------------------------------------------------ training
    def _log_px(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if self.template["likelihood"] == "bernoulli":
            return bernoulli_log_px(out, x)
        return gaussian_log_px(out, x, float(self.template["sigma"]))

    def _loss(self, p: dict[str, torch.Tensor], rows: torch.Tensor, x: torch.Tensor,
              u: torch.Tensor, mask: torch.Tensor, beta: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One member: (mean loss, summed loss, summed recon) of a batch, as
        priors.loss_terms computes them for the smaller model."""
        if self.base.encoder is not None:  # vae
            enc = {n.removeprefix("encoder."): v for n, v in p.items()
                   if n.startswith("encoder.")}
            with autocast(x.device):
                raw = functional_call(self.base.encoder, enc, (x,))
        else:
            raw = rows
        prior = self.prior
        if self.variational:
            raw = raw.float()
            q = self.family.posterior(raw[..., : self.cap], raw[..., self.cap:])
            z = self.family.reparam(q, u) * mask
            reg = (kl(q, prior) * mask).sum(-1)
        else:
            point = self.family.point(raw.float())
            reg = -(prior.log_prob(point) * mask).sum(-1)
            z = point * mask
        dec = {n.removeprefix("decoder."): v for n, v in p.items() if n.startswith("decoder.")}
        with autocast(x.device):
            out = functional_call(self.base.decoder, dec, (z,))
        recon = -self._log_px(out, x)
        loss = recon + beta * reg
        return loss.mean(), loss.sum(), recon.sum()

    def _looped(self, p: dict[str, torch.Tensor], rows: torch.Tensor, x: torch.Tensor,
                u: torch.Tensor, mask: torch.Tensor, beta: torch.Tensor
                ) -> tuple[torch.Tensor, ...]:
        """`vmap(_loss)` as a loop over the live members (empty slots cost nothing)."""
        zero = torch.zeros((), device=x.device)
        outs = [self._loss({n: v[i] for n, v in p.items()}, rows[i], x[i], u[i], mask[i],
                           beta[i]) if s is not None else (zero, zero, zero)
                for i, s in enumerate(self.slots)]
        return tuple(torch.stack(t) for t in zip(*outs, strict=True))

    def _noise(self, b: int) -> torch.Tensor:
        """[K, B, cap] sampling noise: each member's [B, L] draw from its noise_gen (the
        draw its unfused trial makes), zero in masked dimensions and empty slots."""
        u = torch.zeros(self.k, b, self.cap, device=self.device)
        if self.variational:
            for i, s in enumerate(self.slots):
                if s is not None:
                    u[i, :, : s.latent] = self.family.noise((b, s.latent), u, s.noise_gen)
        return u

    @torch.no_grad()
    def _codes_step(self, idx: torch.Tensor, grad: torch.Tensor) -> None:
        """torch.optim.SparseAdam on the rows `idx` [K, B] of each member's table (unique
        within a member: a batch of a permutation), with its own lr and step count;
        members not active are left as they are."""
        act = self.opt.active
        self.codes_steps += act.double()
        steps = self.codes_steps.clamp(min=1)
        b1, b2 = BETAS
        size = self.codes_lr * (1 - torch.pow(b2, steps)).sqrt() / (1 - torch.pow(b1, steps))
        shape = (-1, 1, 1)
        size = torch.where(act, size, 0.0).float().view(shape)
        w1 = torch.where(act, 1 - b1, 0.0).float().view(shape)
        w2 = torch.where(act, 1 - b2, 0.0).float().view(shape)
        at = (torch.arange(self.k, device=self.device)[:, None], idx)
        m_old, v_old = self.codes_m[at], self.codes_v[at]
        m = m_old + (grad - m_old) * w1
        v = v_old + (grad * grad - v_old) * w2
        self.codes_m[at], self.codes_v[at] = m, v
        self.codes[at] = self.codes[at] - size * m / (v.sqrt() + EPS)

    def probe(self) -> None:
        full, n = self.data["train"], self.n
        self.n = min(n, int(self.template["batch_size"]))
        self.data["train"] = full[: self.n]  # one step
        try:
            self.train_epoch([0] * self.k)
        finally:
            self.data["train"], self.n = full, n

    def train_epoch(self, epochs: list[int | None]) -> dict[str, torch.Tensor]:
        n, bs = self.n, int(self.template["batch_size"])
        perms = {i: torch.randperm(n, device=self.device, generator=s.gen)
                 for i, s in enumerate(self.slots) if s is not None}
        idle = torch.arange(n, device=self.device)
        beta = torch.tensor([float(s.params["beta"]) if s is not None else 0.0
                             for s in self.slots], device=self.device)
        weight = torch.tensor([s is not None for s in self.slots], dtype=torch.float32,
                              device=self.device)
        total = torch.zeros(self.k, device=self.device)
        recon_total = torch.zeros(self.k, device=self.device)
        step = torch.vmap(self._loss) if self.vectorised else self._looped
        lik = self.template["likelihood"]
        for start in range(0, n, bs):
            idx = torch.stack([perms.get(i, idle)[start: start + bs] for i in range(self.k)])
            x = binarize(self.data["train"][idx], "static", lik)
            if self.tables:
                rows = self.codes[torch.arange(self.k, device=self.device)[:, None], idx]
                rows.requires_grad_(True)
            else:
                rows = torch.zeros(self.k, idx.shape[1], 1, device=self.device)
            u = self._noise(idx.shape[1])
            means, sums, recons = step(self.params, rows, x, u, self.mask, beta)
            self.opt.zero_grad()
            (means * weight).sum().backward()
            self.opt.step()
            if self.tables:
                assert rows.grad is not None
                self._codes_step(idx, rows.grad)
            total += sums.detach().float()
            recon_total += recons.detach().float()
        live = weight > 0
        return {"train_loss": torch.where(live, total / n, torch.nan),
                "train_recon": torch.where(live, recon_total / n, torch.nan)}

    # ------------------------------------------------------------ evaluation and state
    def _sync(self, i: int) -> P.LatentModel:
        """The member's unfused model, holding its current networks and codes."""
        s = self.slots[i]
        assert s is not None
        self._sync_nets(i, s.model, s.latent)
        if s.model.codes is not None:
            with torch.no_grad():
                s.model.codes.weight.copy_(self.codes[i][:, self._cols(s.latent)])
        return s.model

    def validate(self, slots: list[int], epochs: list[int]) -> dict[int, dict[str, Any]]:
        """As PriorsTrial.validate: held-out codes fitted once, after the member's last
        epoch, on its unfused model with its own noise generator."""
        out: dict[int, dict[str, Any]] = {}
        for i, epoch in zip(slots, epochs, strict=True):
            s = self.slots[i]
            assert s is not None
            out[i] = {} if epoch < int(s.params["epochs"]) - 1 else P.val_metrics(
                self._sync(i), self.data["val"], s.params, s.noise_gen)
        return out

    def finish(self, slot: int) -> dict[str, float]:
        s = self.slots[slot]
        assert s is not None
        mse = P.train_mse(self._sync(slot), self.data["train"], self.template["likelihood"],
                          int(self.template["eval_batch_size"]))
        return {"train_rmse": P.rmse_grey(mse)}

    def member_state(self, slot: int, optimizers: bool = True) -> dict[str, Any]:
        """The state PriorsTrial.state_dict() would hold: model (codes included), opts
        ([Adam of the networks, SparseAdam of the codes]), gen, noise_gen."""
        s = self.slots[slot]
        assert s is not None
        model = self._sync(slot)
        state: dict[str, Any] = {"model": model.state_dict(), "gen": s.gen.get_state(),
                                 "noise_gen": s.noise_gen.get_state()}
        if optimizers:
            opts = P.make_optimizers(model, s.params)
            self._adam_state(slot, model, s.latent, opts[0])
            if model.codes is not None and self.codes_steps[slot] > 0:
                cols = self._cols(s.latent)
                opts[1].state[model.codes.weight] = {
                    "step": int(self.codes_steps[slot]),
                    "exp_avg": self.codes_m[slot][:, cols].clone(),
                    "exp_avg_sq": self.codes_v[slot][:, cols].clone()}
            state["opts"] = [o.state_dict() for o in opts]
        return state

    def load_member(self, slot: int, state: Mapping[str, Any]) -> None:
        s = self.slots[slot]
        assert s is not None
        s.model.load_state_dict(state["model"])
        self._embed(slot, dict(s.model.named_parameters()), s.latent, self.params)
        for gen, key in ((s.gen, "gen"), (s.noise_gen, "noise_gen")):
            if key in state:
                gen.set_state(state[key].cpu() if gen.device.type == "cpu" else state[key])
        with torch.no_grad():
            if s.model.codes is not None:
                self._embed_codes(slot, s.model.codes.weight, s.latent, self.codes)
            opts = state.get("opts")
            if not opts:
                return
            self._load_adam(slot, opts[0], s.latent)
            if self.tables and len(opts) > 1 and opts[1]["state"]:
                st = opts[1]["state"][0]
                self._embed_codes(slot, st["exp_avg"], s.latent, self.codes_m)
                self._embed_codes(slot, st["exp_avg_sq"], s.latent, self.codes_v)
                self.codes_steps[slot] = float(st["step"])
