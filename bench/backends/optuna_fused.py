"""The Optuna backend's fused mode (`bench run TASK --fuse K`): K trials at a time trained
as one stacked model (bench.fused), each its own Optuna trial.

Grouping: the first trial of a group is asked freely (TPE with the constant liar, so
trials in flight are not proposed again); its shape-fixing parameters (the task's
`FusedGroup.group_keys` that are searched) are then enqueued for the group's other K - 1
members, so the sampler proposes the rest (learning rate, beta, latent size, ...) around
them. Freed slots (finished, pruned, failed members) are refilled at epoch boundaries by
trials asked freely: one whose shape matches joins the group; the first that does not is
held as the next group's first member, and the group drains. So the sampler, not the
grouping, decides which shapes are explored. A variant's enqueued points join a group when
their shape matches, else a later one. On a stop request every member saves its state and
stays RUNNING, marked suspended; a later run (fused or not) resumes it.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Mapping
from typing import Any

import optuna
import torch
from optuna.trial import TrialState

from bench import signals
from bench.fused import FusedGroup, Member, run_group
from bench.lifecycle import Outcome, config_failure
from bench.plan import Plan, fused_class

MAX_AUTO = 64  # --fuse auto never stacks more members than this


def latent_cap(plan: Plan) -> int:
    """The largest latent size a member of this plan can have."""
    sizes = [int(plan.params({}).get("latent_dim") or 1)]
    searched = plan.searched().get("latent_dim")
    if searched is not None:
        sizes.append(int(max(searched.values_to_check())))
    if plan.enumerated and plan.variant is not None:
        sizes += [int(plan.params(pt).get("latent_dim") or 1) for pt in plan.variant.points()]
    return max(sizes)


def auto_k(plan: Plan, cls: type[FusedGroup], device: torch.device) -> int:
    """K from a one-step probe of a 2-member group's peak memory on CUDA; 8 on a CPU (where
    the gain flattens out: benchmarks/RESULTS.md)."""
    if device.type != "cuda":
        return 8
    from bench.fused import Member as _M
    from bench.trial import local_context

    params = plan.params({})
    group = cls(plan.task, 2, params, device, plan.opts.data_dir, **_extra(plan, cls))
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)  # the data set and the stacked state
    for slot in range(2):
        group.set_member(slot, _M(params, local_context(slot, str(device)), {}))
    group.probe()  # one training step of both members
    per_member = max(1, (torch.cuda.max_memory_allocated(device) - base) // 2)
    free, _ = torch.cuda.mem_get_info(device)
    return int(max(1, min(MAX_AUTO, 0.7 * free // per_member)))


def _extra(plan: Plan, cls: type[FusedGroup]) -> dict[str, Any]:
    return {"latent_cap": latent_cap(plan)} if "latent_dim" in plan.task.params else {}


class FusedRunner:
    """Feeds a worker's trials into fused groups until its budget is spent."""

    def __init__(self, worker: Any, k: int, resume: list[int], n_new: int,
                 deadline: float | None):
        self.w, self.k = worker, k  # each group: at most the trials it can still get
        self.plan: Plan = worker.plan
        self.cls = fused_class(self.plan)
        self.resume, self.left, self.deadline = list(resume), n_new, deadline
        self.pending: optuna.Trial | None = None  # the next group's first member
        self.taken = 0  # members the current group has had
        self.draining = False
        self.template: dict[str, Any] = {}
        self.suspended = False
        self.ended: set[int] = set()

    def run(self) -> int:
        while not self.suspended and self._first():
            gid = uuid.uuid4().hex[:12]
            self.taken, self.draining = 0, False
            members: dict[int, Member] = {}
            state = "suspended"
            if not signals.stop_requested():
                group = self.cls(self.plan.task, self._group_k(), self.template,
                                 self.w.device, self.plan.opts.data_dir,
                                 **_extra(self.plan, self.cls))
                state = run_group(self.plan.task, group, self._feeder(members), self._ended,
                                  self.plan.out, self.plan.direction, gid)
            # a stop that came while the group was built (its data loaded) leaves run_group
            # nothing to start: the group's first trial is suspended, not asked again
            if state == "suspended" or signals.stop_requested():
                for number, m in members.items():
                    if number not in self.ended:
                        self.w.record(m.handle, Outcome("SUSPENDED", None, {}, None, {}))
                if self.pending is not None:  # asked, never started: resumed from scratch
                    self.w.record(self.pending, Outcome("SUSPENDED", None, {}, None, {}))
                self.suspended = True
            if self.w.row_errors:
                return 1
        return signals.exit_code() if signals.stop_requested() else 0

    def _group_k(self) -> int:
        """K, or fewer slots when fewer trials can still join this group: every slot costs
        its share of the stacked state (a priors member's code table is the size of the
        training set), and the rows' group_size says how many slots the group had."""
        can_join = len(self.resume) + self.left
        if self.plan.enumerated:  # the variant's waiting points of this group's shape
            shape = {k: self.template[k] for k in self.cls.group_keys if k in self.template}
            waiting = sum(self._waiting_fits(t, shape) for t in self.w.study.get_trials(
                deepcopy=False, states=(TrialState.WAITING,)))
            can_join = len(self.resume) + min(self.left, waiting)
        return max(1, min(self.k, 1 + can_join))  # 1: the group's first trial, taken

    # ------------------------------------------------------------ members
    def _feeder(self, members: dict[int, Member]) -> Callable[[], Member | None]:
        return lambda: self._next(members)

    def _first(self) -> bool:
        """Take the next group's first trial; its shape keys become the group's."""
        trial = self.pending or self._take(None, free=True)
        if trial is None:
            return False
        self.pending = trial
        params, _ = self.w.params_for(trial)
        self.template = dict(params)
        return True

    def _take(self, shape: Mapping[str, Any] | None, free: bool = False
              ) -> optuna.Trial | None:
        if self.w._should_stop(self.deadline):
            return None
        study = self.w.study
        for number in list(self.resume):
            resumed = optuna.Trial(study, study._storage.get_trial_id_from_study_id_trial_number(
                study._study_id, number))
            if shape is None or self._fits(resumed, shape):
                self.resume.remove(number)
                return resumed
        if self.left <= 0 or self.w._target_reached():
            return None
        trial = (self._pop_variant(shape) if self.plan.enumerated
                 else self._ask(None if free else shape))
        if trial is not None:
            self.left -= 1
        return trial

    def _fits(self, trial: optuna.Trial, shape: Mapping[str, Any]) -> bool:
        params, _ = self.w.params_for(trial)
        return all(params.get(k) == v for k, v in shape.items())

    def _waiting_fits(self, t: optuna.trial.FrozenTrial, shape: Mapping[str, Any]) -> bool:
        """Whether an enqueued point has the group's shape. It has no params until it
        runs: Optuna keeps it in the trial's fixed_params (a suspended trial sent back to
        WAITING has both)."""
        fixed = t.system_attrs.get("fixed_params") or {}
        point = self.plan.params({**fixed, **t.params})
        return all(point.get(k) == v for k, v in shape.items())

    def _pop_variant(self, shape: Mapping[str, Any] | None) -> optuna.Trial | None:
        from bench.backends.optuna import _pop_waiting

        if shape is None:
            return _pop_waiting(self.w.study)
        storage = self.w.study._storage
        for t in self.w.study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
            if self._waiting_fits(t, shape):
                try:
                    if storage.set_trial_state_values(t._trial_id, TrialState.RUNNING):
                        return optuna.Trial(self.w.study, t._trial_id)
                except optuna.exceptions.UpdateFinishedTrialError:
                    continue
        return None

    def _ask(self, shape: Mapping[str, Any] | None) -> optuna.Trial | None:
        searched = self.plan.searched()
        fixed = {k: v for k, v in (shape or {}).items() if k in searched}
        if not fixed:
            return self.w._ask()
        with self.w.claiming() as got:  # other runs count and ask too
            if not got or self.w._target_reached() or signals.stop_requested():
                return None
            # the group's shape, fixed; the sampler proposes the rest
            tag = uuid.uuid4().hex
            self.w.study.enqueue_trial(fixed, user_attrs={"bench_group_slot": tag})
            for t in self.w.study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
                if t.user_attrs.get("bench_group_slot") == tag and \
                        self.w.study._storage.set_trial_state_values(t._trial_id,
                                                                     TrialState.RUNNING):
                    return optuna.Trial(self.w.study, t._trial_id)
            return self.w.claim()

    def _next(self, members: dict[int, Member]) -> Member | None:
        shape = {k: self.template[k] for k in self.cls.group_keys if k in self.template}
        trial: optuna.Trial | None = self._member(shape)
        while trial is not None:
            if self.taken > 1 and not self._fits(trial, shape):
                # not this group's shape (never expected: every way in above matches it):
                # it starts the next group
                self.pending, self.draining = trial, True
                return None
            params, ctx, ident, bad = self.w.prepare(trial)
            cap = _extra(self.plan, self.cls).get("latent_cap")
            if cap is not None and int(params.get("latent_dim", 0)) > cap:
                bad = [f"latent_dim: {params['latent_dim']} exceeds the group's {cap}"]
            if not bad:
                member = Member(params, ctx, ident, trial)
                members[trial.number] = member
                return member
            plan = self.plan
            self.w.record(trial, config_failure(plan.task, plan.out, plan.metric,
                                                plan.direction, ident, params, bad,
                                                ctx.device))
            trial = self._member(shape)
        return None

    def _member(self, shape: Mapping[str, Any]) -> optuna.Trial | None:
        """The group's next member: its first, then K - 1 of its shape, then refills asked
        freely while they keep its shape (see the module docstring)."""
        if self.draining:
            return None
        trial: optuna.Trial | None
        if self.taken == 0 and self.pending is not None:
            trial, self.pending = self.pending, None
        elif self.taken < self.k or self.plan.enumerated:
            trial = self._take(shape)
        else:
            trial = self._take(None, free=True)
            if trial is not None and not self._fits(trial, shape):
                self.pending, self.draining = trial, True  # the next group starts with it
                return None
        if trial is not None:
            self.taken += 1
        return trial

    def _ended(self, member: Member, outcome: Outcome) -> None:
        self.ended.add(member.handle.number)
        self.w.record(member.handle, outcome)
