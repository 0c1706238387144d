"""Fused trials: K trials of one small model trained as one stacked model on one device.

A single small trial cannot keep a modern accelerator busy (its step time is bound by
kernel launches, not arithmetic); HFTA (Wang et al., MLSys 2021) trained many same-shaped
models as one. Here a task may register a `FusedGroup`: K members' parameters stacked
along a new leading dimension (`torch.func.stack_module_state`), one vmapped forward and
backward for all (`torch.func.functional_call` under `torch.vmap`), and `StackedAdam`,
which is Adam with each member's own learning rate and step count. On the CPU a task may
loop over its members' forwards instead (the vae does: oneDNN's grouped convolutions,
which vmap becomes, are slower than the members' own; benchmarks/RESULTS.md); one
backward and one StackedAdam step still serve the group.

Each member is its own trial: its own seed (initialisation, data order, sampling noise:
the same draws it would make alone), its own reports and pruning decision, its own row,
curve and checkpoint (bench.tasks.vae_fused, bench.tasks.priors_fused, the synthetic
task's). A member's saved state has the format of the task's unfused trial,
so `bench eval`, `bench rerun` and an unfused resume read it unchanged. Members never
couple: no global gradient clipping or loss scaling; a member whose loss turns non-finite
fails alone (its slot stops updating), a pruned or finished member's slot is refilled by
a new trial at the next epoch boundary.

`run_group` is the epoch loop over a group, backend-neutral: the backend supplies new
members (`next_member`) and hears how each ended (`ended`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from bench import signals
from bench.errors import TrialPruned
from bench.lifecycle import (
    CHECKPOINT_FILE,
    RESUME_FILE,
    Outcome,
    TaskSpec,
    TrialProgress,
    _rng_state,
    _save_traceback,
    build_row,
    check_metrics,
    error_text,
    load_state,
    now,
    save_state,
    write_then_forget,
)
from bench.params import THROUGHPUT
from bench.train import peak_mem_gb, seed_everything
from bench.trial import TrialContext


class StackedAdam:
    """Adam (Kingma & Ba; torch.optim.Adam's arithmetic, no weight decay) over stacked
    parameters [K, ...], with a learning rate and a step count per member; members whose
    `active` flag is off are not updated at all.

    The per-member state (`lr`, `steps`, `active`) lives on the parameters' device and the
    step's coefficients are computed there: a step copies nothing from the host (on CUDA a
    blocking host-to-device copy synchronises the stream, which would serialise the
    launch-bound steps fusion is for; tests/test_fused.py checks it)."""

    def __init__(self, params: Sequence[torch.Tensor], lr: torch.Tensor,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8):
        self.params = list(params)
        self.k = len(lr)
        dev = self.params[0].device if self.params else torch.device("cpu")
        self.lr = lr.detach().to(dev, torch.float64)
        self.b1, self.b2 = betas
        self.eps = eps
        self.steps = torch.zeros(self.k, dtype=torch.float64, device=dev)
        self.active = torch.ones(self.k, dtype=torch.bool, device=dev)
        self.m = [torch.zeros_like(p) for p in self.params]
        self.v = [torch.zeros_like(p) for p in self.params]

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        """torch.optim.Adam's update (its foreach arithmetic: lerp for the first moment,
        addcmul for the second, addcdiv for the parameter), in place, with each member's
        step size; an inactive member's coefficients make it an identity (weight 0 in the
        lerp, 1 on the second moment, step 0), so no masked copies are needed."""
        self.steps += self.active.double()
        steps = self.steps.clamp(min=1)
        act = self.active
        w1 = torch.where(act, 1 - self.b1, 0.0).float()  # lerp weight: 0 keeps m
        keep2 = torch.where(act, self.b2, 1.0).float()
        new2 = torch.where(act, 1 - self.b2, 0.0).float()  # 1 - b2 in double, as torch's
        step_size = torch.where(act, self.lr / (1 - torch.pow(self.b1, steps)), 0.0).float()
        bc2_sqrt = (1 - torch.pow(self.b2, steps)).sqrt().float()
        for p, m, v in zip(self.params, self.m, self.v, strict=True):
            g = p.grad
            if g is None:
                continue
            shape = (-1, *[1] * (p.dim() - 1))
            m.lerp_(g, w1.view(shape))
            v.mul_(keep2.view(shape)).addcmul_(g, g * new2.view(shape))
            denom = v.sqrt().div_(bc2_sqrt.view(shape)).add_(self.eps)
            p.addcdiv_(m * -step_size.view(shape), denom)

    def member_state(self, k: int) -> dict[str, Any]:
        """Member k's moments and step, as slices of the stacked state."""
        return {"step": float(self.steps[k]), "m": [m[k] for m in self.m],
                "v": [v[k] for v in self.v]}

    def set_member(self, k: int, lr: float, state: Mapping[str, Any] | None = None) -> None:
        self.lr[k] = lr
        self.active[k] = True
        with torch.no_grad():
            for i in range(len(self.params)):
                self.m[i][k] = 0 if state is None else state["m"][i]
                self.v[i][k] = 0 if state is None else state["v"][i]
        self.steps[k] = 0 if state is None else state["step"]


@dataclass
class Member:
    """One trial in a slot of a fused group."""

    params: dict[str, Any]
    ctx: TrialContext
    identity: dict[str, Any]
    handle: Any = None  # the backend's trial (an optuna.Trial)
    prog: TrialProgress = field(default_factory=TrialProgress)
    t0: float = field(default_factory=time.perf_counter)
    started: Any = field(default_factory=now)
    last: dict[str, float] = field(default_factory=dict)

    @property
    def epochs(self) -> int:
        return int(self.params["epochs"])


class FusedGroup:
    """What a fusable task implements (see bench.tasks.vae_fused). Slots hold members;
    `train_epoch` and `validate` return per-slot values ([K] tensors, NaN for empty slots);
    `member_state(k)` and `load_member(k, state)` speak the unfused trial's state format."""

    group_keys: tuple[str, ...] = ()  # parameters that fix the stacked shapes
    # parameter -> the values this implementation trains; a plan that can reach another
    # value is refused before anything starts (run it unfused)
    supports: dict[str, tuple[Any, ...]] = {}

    def __init__(self, spec: TaskSpec, k: int, template: Mapping[str, Any],
                 device: torch.device, data_dir: Path | None):
        self.spec, self.k, self.template, self.device = spec, k, template, device
        self.data_dir = data_dir

    def set_member(self, slot: int, member: Member) -> None:
        raise NotImplementedError

    def drop_member(self, slot: int) -> None:
        raise NotImplementedError

    def train_epoch(self, epochs: list[int | None]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def validate(self, slots: list[int], epochs: list[int]) -> dict[int, dict[str, Any]]:
        raise NotImplementedError

    def finish(self, slot: int) -> dict[str, float]:
        return {}

    def member_state(self, slot: int, optimizers: bool = True) -> dict[str, Any]:
        raise NotImplementedError

    def load_member(self, slot: int, state: Mapping[str, Any]) -> None:
        raise NotImplementedError

    def examples_per_epoch(self) -> int:
        return 0

    def probe(self) -> None:
        """One training step of the members in place (`--fuse auto` measures its memory)."""
        raise NotImplementedError


def _floats(values: Mapping[str, torch.Tensor], slot: int) -> dict[str, float]:
    return {k: float(v[slot]) for k, v in values.items()}


def _finite(values: Mapping[str, float]) -> str | None:
    bad = {k: v for k, v in values.items() if not math.isfinite(v)}
    return ", ".join(f"{k}={v}" for k, v in bad.items()) or None


def _end(spec: TaskSpec, m: Member, out: Path, direction: str, state: str,
         metrics: dict[str, float], error: str | None, group: dict[str, Any]) -> Outcome:
    value = None
    if state == "COMPLETE":
        try:
            metrics, value = check_metrics(spec, metrics, m.ctx.metric)
        except (KeyError, ValueError) as exc:
            state, error = "FAIL", error_text(exc)
    elif state == "PRUNED":
        value = next((v for s, k, v in reversed(m.ctx.curve) if k == m.ctx.metric), None)
    duration = m.prog.elapsed_s + time.perf_counter() - m.t0
    row = build_row({**m.identity, **group}, m.params, state=state, objective=value,
                    metric=m.ctx.metric, direction=direction, metrics=metrics, error=error,
                    started_at=m.started, finished_at=now(), duration_s=duration,
                    train_s=m.prog.train_s or None, epochs_done=m.ctx.steps_done,
                    attempts=m.prog.attempts, peak_mem=peak_mem_gb(m.ctx.device),
                    device=m.ctx.device)
    outcome = Outcome(state, value, metrics if state == "COMPLETE" else {}, error, row)
    outcome.row_error = write_then_forget(out, spec, row, m.ctx.curve,
                                          m.ctx.artifact_dir / RESUME_FILE)
    return outcome


def resume_member(group: FusedGroup, slot: int, m: Member) -> None:
    """Load a member's saved state (an unfused or fused attempt's) into its slot."""
    path = m.ctx.artifact_dir / RESUME_FILE
    if not path.exists():
        return
    saved = load_state(path, m.ctx.device)
    group.load_member(slot, saved["trial"])
    m.ctx.curve = [(int(s), str(k), float(v)) for s, k, v in saved["curve"]]
    m.ctx.steps_done = int(saved["steps_done"])
    for key, value in saved["progress"].items():
        setattr(m.prog, key, value)
    m.prog.attempts += 1
    m.last = dict(m.prog.last)


def save_member(group: FusedGroup, slot: int, m: Member) -> None:
    """The member's state in the unfused trial's format (resume.pt)."""
    if m.ctx.before_save is not None:
        m.ctx.before_save()  # the backend records the trial before its state exists
    save_state(m.ctx.artifact_dir / RESUME_FILE, {
        "trial": group.member_state(slot), "rng": _rng_state(m.ctx.device),
        "curve": [list(p) for p in m.ctx.curve], "steps_done": m.ctx.steps_done,
        "progress": {**vars(m.prog), "elapsed_s": m.prog.elapsed_s + time.perf_counter()
                     - m.t0}})


def run_group(spec: TaskSpec, group: FusedGroup, next_member: Callable[[], Member | None],
              ended: Callable[[Member, Outcome], None], out: Path, direction: str,
              group_id: str) -> str:
    """Train the group's members epoch by epoch, refilling freed slots from `next_member`,
    until no member is left; returns "done", or "suspended" when a stop was requested
    (every member's state saved at the epoch boundary; after a second signal, which stops
    the running epoch at once, the state of the members' last periodic save stands).

    As a trial's own lifecycle does for one trial: each member's state is saved at epoch
    ends at most every `checkpoint_every_s` (a killed process resumes from there); a member
    whose setup, validation or end fails ends FAIL alone; an exception in the group's
    shared step fails the members that were in it, and the group goes on with new ones."""
    slots: list[Member | None] = [None] * group.k
    info = {"group_id": group_id, "group_size": group.k}

    def end(i: int, state: str, metrics: dict[str, float], error: str | None) -> None:
        m = slots[i]
        assert m is not None
        try:
            group.drop_member(i)
        finally:
            slots[i] = None
            ended(m, _end(spec, m, out, direction, state, metrics, error, info))

    def failed(i: int, exc: Exception, where: str) -> None:
        m = slots[i]
        assert m is not None
        _save_traceback(m.ctx.artifact_dir)
        end(i, "FAIL", {}, f"{error_text(exc)} ({where})")

    def fill() -> None:
        for i in range(group.k):
            if slots[i] is None and not signals.stop_requested():
                m = next_member()
                if m is None:
                    return
                slots[i] = m
                try:
                    wrong = {k: m.params.get(k) for k in group.group_keys
                             if k in group.template and m.params.get(k) != group.template[k]}
                    if wrong:  # the backend's grouping is at fault: never train it here
                        raise RuntimeError(f"the member's {wrong} differ from its group's "
                                           "shape")
                    seed_everything(m.ctx.seed)  # the member's own initialisation
                    group.set_member(i, m)
                    resume_member(group, i, m)
                except Exception as exc:
                    failed(i, exc, "while joining its fused group")

    def save_all() -> None:
        for i, m in enumerate(slots):
            if m is not None:
                save_member(group, i, m)

    fill()
    saved_at = time.perf_counter()
    while any(slots):
        epochs = [m.prog.next_epoch if m else None for m in slots]
        live = [i for i, m in enumerate(slots) if m is not None]
        try:
            with signals.interruptible():
                t0 = time.perf_counter()
                train = group.train_epoch(epochs)
                dt = time.perf_counter() - t0
                vals: dict[int, dict[str, Any]] = {}
                for i in live:
                    try:
                        vals.update(group.validate([i], [epochs[i]]))  # type: ignore[list-item]
                    except Exception as exc:
                        failed(i, exc, f"validating epoch {epochs[i]}")
        except KeyboardInterrupt:  # a second signal: the epoch is abandoned
            return "suspended"
        except Exception as exc:  # the shared step: no member can go on from it
            for i in live:
                if slots[i] is not None:
                    failed(i, exc, f"in its fused group's epoch {epochs[i]}, with "
                                   f"{len(live)} members")
            fill()
            continue
        for i in live:
            m = slots[i]
            if m is None:
                continue
            values = {**_floats(train, i), **{k: float(v) for k, v in vals[i].items()}}
            m.prog.train_s += dt
            bad = _finite(values)
            if bad:
                end(i, "FAIL", {}, f"FloatingPointError: non-finite {bad} at epoch "
                                   f"{m.prog.next_epoch}")
                continue
            epoch = m.prog.next_epoch
            m.prog.next_epoch += 1
            m.last.update(values)
            m.prog.last = dict(m.last)
            try:
                m.ctx.report(epoch, **values)
            except TrialPruned as exc:
                end(i, "PRUNED", {}, str(exc))
                continue
            if m.prog.next_epoch >= m.epochs:
                try:
                    final = {**m.last, **group.finish(i)}
                    if m.prog.train_s > 0 and group.examples_per_epoch():
                        final[THROUGHPUT] = (group.examples_per_epoch() * m.epochs
                                             / m.prog.train_s)
                    save_state(m.ctx.artifact_dir / CHECKPOINT_FILE,
                               {"trial": group.member_state(i, optimizers=False),
                                "epochs_done": m.epochs})
                except Exception as exc:
                    failed(i, exc, "at its end")
                    continue
                end(i, "COMPLETE", final, None)
        every = min((m.ctx.checkpoint_every_s for m in slots if m is not None), default=0.0)
        if signals.stop_requested() or (any(slots)
                                        and time.perf_counter() - saved_at >= every):
            save_all()
            saved_at = time.perf_counter()
        if signals.stop_requested():
            return "suspended"
        fill()
    return "done"
