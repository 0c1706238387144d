"""Fused trials (`--fuse K`): K trials trained as one stacked model. A member equals the same
trial run alone; members are pruned, fail and resume alone; groups follow the sampler."""

from __future__ import annotations

import math
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import torch
from conftest import bench_cli, needs_mnist
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from bench import leaderboard
from bench.cli import main
from bench.fused import Member, StackedAdam, run_group
from bench.lifecycle import CHECKPOINT_FILE, execute_trial, load_state
from bench.registry import get_fused, get_task
from bench.space import merge_params, space_for
from bench.trial import local_context


def test_stacked_adam_is_torch_adam_per_member() -> None:
    torch.manual_seed(0)
    w = [torch.randn(3, 4) for _ in range(3)]
    lrs = [1e-3, 3e-2, 0.5]
    refs = [torch.nn.Parameter(x.clone()) for x in w]
    opts = [torch.optim.Adam([p], lr=lr) for p, lr in zip(refs, lrs, strict=True)]
    stacked = torch.stack(w).requires_grad_(True)
    adam = StackedAdam([stacked], torch.tensor(lrs))
    for step in range(5):
        target = torch.randn(3, 4)
        for p, o in zip(refs, opts, strict=True):
            o.zero_grad()
            ((p - target) ** 3).sum().backward()
            o.step()
        adam.zero_grad()
        ((stacked - target) ** 3).sum().backward()
        adam.step()
        for k in range(3):
            assert torch.allclose(stacked[k], refs[k], rtol=1e-6, atol=1e-7), (step, k)
    adam.active[1] = False  # a dropped member does not move at all
    before = stacked[1].detach().clone()
    adam.zero_grad()
    (stacked ** 2).sum().backward()
    adam.step()
    assert torch.equal(stacked[1], before)


class _CrossDevice(TorchDispatchMode):
    """Records every op that mixes devices (a host tensor copied to the parameters' device)."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        out = func(*args, **(kwargs or {}))
        devices = {t.device.type for t in tree_leaves((args, kwargs, out))
                   if isinstance(t, torch.Tensor) and t.dim() > 0}
        if len(devices) > 1:
            self.seen.append(str(func))
        return out


def test_a_stacked_adam_step_copies_nothing_from_the_host() -> None:
    """On CUDA a blocking host-to-device copy synchronises the stream: the step's per-member
    coefficients must be computed where the parameters are (here: the meta device, where
    any copy from the host shows as an op with tensors on two devices)."""
    stacked = torch.zeros(4, 3, 2, device="meta", requires_grad=True)
    adam = StackedAdam([stacked], torch.tensor([1e-3, 1e-2, 0.1, 1.0]))
    adam.active[2] = False
    stacked.grad = torch.ones(4, 3, 2, device="meta")
    with _CrossDevice() as mode:
        adam.step()
    assert not mode.seen, mode.seen
    assert adam.steps.device.type == adam.lr.device.type == adam.active.device.type == "meta"


def alone_and_fused(task: str, members: list[dict], seeds: list[int], cap: int,
                    tmp: Path, vmap: bool) -> tuple[dict, dict]:
    """Each member run alone (artifacts in tmp/alone<seed>), then all as one fused group of
    latent cap `cap` (tmp/f<seed>): their outcomes by seed."""
    spec = get_task(task)
    metric, direction = spec.metric, spec.direction
    alone = {s: execute_trial(spec, p, local_context(s, "cpu", tmp / f"alone{s}", metric),
                              {"task": task, "trial_uid": f"a{s}", "seed": s}, tmp / "lb",
                              direction)
             for p, s in zip(members, seeds, strict=True)}
    group = get_fused(task)(spec, len(members), members[0], torch.device("cpu"), None,
                            latent_cap=cap)
    assert group.vectorised == vmap
    queue = [Member(p, local_context(s, "cpu", tmp / f"f{s}", metric),
                    {"task": task, "trial_uid": f"f{s}", "seed": s})
             for p, s in zip(members, seeds, strict=True)]
    fused: dict = {}
    assert run_group(spec, group, lambda: queue.pop(0) if queue else None,
                     lambda m, o: fused.__setitem__(m.ctx.seed, o), tmp / "lb", direction,
                     "g") == "done"
    return alone, fused


@needs_mnist
@pytest.mark.parametrize("binarize,vmap", [("static", True), ("dynamic", True),
                                           ("static", False)])  # one gather / member draws;
# vmapped (CUDA's form) and looped over members (the CPU's)
def test_fused_vae_members_equal_their_unfused_runs(tmp_path: Path, binarize: str, vmap: bool,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Latent sizes 8, 4, 6 in one group of cap 8; different lr, beta, warm-up, seed."""
    monkeypatch.setattr(get_fused("vae"), "vmap_on_cpu", vmap)
    task = get_task("vae")
    base = merge_params(task, space_for("vae"), None, {},
                        {**task.smoke, "epochs": 2, "train_size": 256, "latent_dim": 8,
                         "binarize": binarize})
    members = [dict(base, lr=1e-3, beta=1.0, latent_dim=8),
               dict(base, lr=3e-3, beta=0.5, latent_dim=4),
               dict(base, lr=5e-4, beta=2.0, latent_dim=6, kl_warmup_epochs=2.0)]
    seeds = [0, 5, 9]
    alone, fused = alone_and_fused("vae", members, seeds, 8, tmp_path, vmap)
    for seed in seeds:
        a, f = alone[seed], fused[seed]
        assert f.state == a.state == "COMPLETE", f.error
        for key in ("val_elbo", "val_recon", "val_kl", "train_loss"):
            assert f.metrics[key] == pytest.approx(a.metrics[key], rel=1e-4), (seed, key)
        assert f.row["group_size"] == 3 and f.row["group_id"] == "g"
    # a member's checkpoint has the unfused trial's format: bench eval reads it
    from bench.lifecycle import evaluate_checkpoint

    ctx = local_context(5, "cpu", tmp_path / "f5", "val_elbo")
    test = evaluate_checkpoint(task, members[1], ctx)
    assert test["test_elbo"] <= test["test_iwae_ll"] + 1.0


@needs_mnist
@pytest.mark.parametrize("model,prior,vmap,extra", [
    ("ad", "normal", False, {}), ("ad", "uniform", True, {}),
    ("vad", "laplace", False, {"vad_init": "per-class"}), ("vad", "uniform", True, {}),
    ("vae", "normal", True, {"likelihood": "gaussian"}), ("vae", "laplace", False, {})])
def test_fused_priors_members_equal_their_unfused_runs(
        tmp_path: Path, model: str, prior: str, vmap: bool, extra: dict,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Latent sizes 8, 4, 6 in one group of cap 8; their own lr, lr_codes, beta, seed: the
    per-image code tables (SparseAdam), the noise, the held-out fit are each member's."""
    monkeypatch.setattr(get_fused("priors"), "vmap_on_cpu", vmap)
    task = get_task("priors")
    base = merge_params(task, space_for("priors"), None, {},
                        {**task.smoke, "model": model, "prior": prior, "epochs": 2,
                         "train_size": 192, "val_size": 24, "test_steps": 4, "batch_size": 64,
                         "latent_dim": 8, **extra})
    members = [dict(base, lr=1e-3, lr_codes=0.1, beta=1.0, latent_dim=8),
               dict(base, lr=3e-3, lr_codes=0.05, beta=0.5, latent_dim=4),
               dict(base, lr=5e-4, lr_codes=0.02, beta=2.0, latent_dim=6, test_steps=6)]
    seeds = [0, 5, 9]
    alone, fused = alone_and_fused("priors", members, seeds, 8, tmp_path, vmap)
    keys = ["val_recon", "val_rmse", "train_loss", "train_recon", "train_rmse"]
    for seed in seeds:
        a, f = alone[seed], fused[seed]
        assert f.state == a.state == "COMPLETE", f.error
        for key in keys + (["val_kl"] if model != "ad" else []):
            assert f.metrics[key] == pytest.approx(a.metrics[key], rel=1e-4), (seed, key)
        assert f.row["group_size"] == 3
        # the trained networks and code tables themselves, not only their metrics
        saved = {w: load_state(tmp_path / f"{w}{seed}" / CHECKPOINT_FILE,
                               torch.device("cpu"))["trial"]["model"] for w in ("alone", "f")}
        assert saved["alone"].keys() == saved["f"].keys()
        for name, value in saved["alone"].items():
            torch.testing.assert_close(saved["f"][name], value, rtol=1e-4, atol=1e-6,
                                       msg=lambda m, n=name, k=seed: f"{k} {n}: {m}")
    # a member's checkpoint has the unfused trial's format: bench eval reads it
    from bench.lifecycle import evaluate_checkpoint

    ctx = local_context(5, "cpu", tmp_path / "f5", "val_recon")
    test = evaluate_checkpoint(task, members[1], ctx)
    assert math.isfinite(test["test_recon"]) and test["test_rmse"] > 0


@needs_mnist
@pytest.mark.parametrize("model", ["vad", "ad"])
def test_suspended_priors_members_resume_fused_or_alone_to_their_uninterrupted_run(
        tmp_path: Path, model: str) -> None:
    """A stop after epoch 1 saves each member in the unfused trial's format (networks,
    code table, Adam and SparseAdam moments, generators); resumed alone or in a new group,
    each ends where its uninterrupted unfused run ends."""
    from bench import signals

    task = get_task("priors")
    base = merge_params(task, space_for("priors"), None, {},
                        {**task.smoke, "model": model, "prior": "laplace", "epochs": 3,
                         "train_size": 128, "val_size": 16, "test_steps": 3,
                         "batch_size": 64, "latent_dim": 6})
    members = [dict(base, lr=2e-3, lr_codes=0.1, latent_dim=6),
               dict(base, lr=1e-3, lr_codes=0.05, beta=0.5, latent_dim=3)]
    seeds = [1, 2]
    alone = {s: execute_trial(task, p, local_context(s, "cpu", tmp_path / f"a{s}", "val_recon"),
                              {"task": "priors", "trial_uid": f"a{s}", "seed": s},
                              tmp_path / "lb", "minimize")
             for p, s in zip(members, seeds, strict=True)}

    def member(p: dict, s: int) -> Member:
        return Member(p, local_context(s, "cpu", tmp_path / f"f{s}", "val_recon"),
                      {"task": "priors", "trial_uid": f"f{s}", "seed": s})

    group = get_fused("priors")(task, 2, base, torch.device("cpu"), None, latent_cap=6)
    train_epoch = group.train_epoch

    def then_stop(epochs: list) -> dict:
        out = train_epoch(epochs)
        signals.request_stop()
        return out

    group.train_epoch = then_stop
    queue = [member(p, s) for p, s in zip(members, seeds, strict=True)]
    ended: dict = {}
    try:
        assert run_group(task, group, lambda: queue.pop(0) if queue else None,
                         lambda m, o: ended.__setitem__(m.ctx.seed, o), tmp_path / "lb",
                         "minimize", "g1") == "suspended"
    finally:
        signals.reset()
    assert not ended and all((tmp_path / f"f{s}" / "resume.pt").exists() for s in seeds)
    # seed 1 resumes alone (the unfused lifecycle reads the member's state) ...
    resumed = {1: execute_trial(task, members[0], member(members[0], 1).ctx,
                                {"task": "priors", "trial_uid": "f1", "seed": 1},
                                tmp_path / "lb", "minimize")}
    # ... seed 2 in a new group
    group = get_fused("priors")(task, 2, base, torch.device("cpu"), None, latent_cap=6)
    queue = [member(members[1], 2)]
    assert run_group(task, group, lambda: queue.pop(0) if queue else None,
                     lambda m, o: resumed.__setitem__(m.ctx.seed, o), tmp_path / "lb",
                     "minimize", "g2") == "done"
    for s in seeds:
        assert resumed[s].state == "COMPLETE", resumed[s].error
        for key in ("val_recon", "train_loss", "train_rmse"):
            assert resumed[s].metrics[key] == pytest.approx(alone[s].metrics[key], rel=1e-4), \
                (s, key)
        saved = {w: load_state(tmp_path / f"{w}{s}" / CHECKPOINT_FILE,
                               torch.device("cpu"))["trial"]["model"] for w in ("a", "f")}
        for name, value in saved["a"].items():
            torch.testing.assert_close(saved["f"][name], value, rtol=1e-4, atol=1e-6,
                                       msg=lambda m, n=name, k=s: f"{k} {n}: {m}")


@needs_mnist
@pytest.mark.parametrize("task", ["vae", "priors"])
def test_bench_rerun_of_a_fused_member_gives_its_objective(tmp_path: Path, task: str) -> None:
    out = tmp_path / "lb"
    res = bench_cli("run", task, "--smoke", "--trials", "3", "--fuse", "3", "--sampler",
                    "random", "--pruner", "none", "--set", "epochs=1", "--set",
                    "train_size=256", "--out", str(out), "--quiet")
    assert res.returncode == 0, res.stderr
    rows = leaderboard.read_trials(out, task)
    assert len(rows) == 3 and rows["group_id"].nunique() == 1 and set(rows["group_size"]) == {3}
    for uid in rows["trial_uid"]:
        r = bench_cli("rerun", uid, "--out", str(out))
        assert r.returncode == 0, r.stderr
        original, again = map(float, re.search(r"original objective (\S+), rerun (\S+)",
                                               r.stdout).groups())
        assert again == pytest.approx(original, rel=1e-4)


def fused_space(tmp_path: Path) -> Path:
    path = tmp_path / "space.yaml"
    path.write_text("task: synthetic\nparams:\n  x: {type: float, low: -2, high: 2}\n"
                    "  y: {type: float, low: -1, high: 3}\n"
                    "  fail: {type: categorical, choices: [none, nan]}\n")
    return path


def test_a_member_that_turns_non_finite_fails_alone(tmp_path: Path) -> None:
    out = tmp_path / "lb"
    assert main(["run", "synthetic", "--out", str(out), "--quiet", "--trials", "12",
                 "--fuse", "4", "--space", str(fused_space(tmp_path)), "--sampler", "random",
                 "--pruner", "none", "--set", "fail_at=2"]) == 0
    rows = leaderboard.read_trials(out, "synthetic")
    assert len(rows) == 12
    failed = rows[rows["param_fail"] == "nan"]
    assert len(failed) and (failed["state"] == "FAIL").all()
    assert failed["error"].str.contains("non-finite loss=nan at epoch 2").all()
    ok = rows[rows["param_fail"] == "none"]
    assert len(ok) and (ok["state"] == "COMPLETE").all()
    for _, r in ok.iterrows():  # exactly its unfused value
        x, y = r["param_x"], r["param_y"]
        assert r["objective"] == pytest.approx((1 - x) ** 2 + 100 * (y - x * x) ** 2)
    assert (rows.groupby("group_id").size() >= 1).all() and set(rows["group_size"]) == {4}


def test_pruned_members_are_refilled_and_the_total_holds(tmp_path: Path) -> None:
    out = tmp_path / "lb"
    assert main(["run", "synthetic", "--out", str(out), "--quiet", "--trials", "16",
                 "--fuse", "4", "--sampler", "random", "--set", "epochs=6"]) == 0
    rows = leaderboard.read_trials(out, "synthetic")
    assert len(rows) == 16 and rows["trial_uid"].is_unique
    assert (rows["state"] == "PRUNED").sum() >= 1
    assert (rows.groupby("group_id").size() > 4).any(), "a slot was refilled"
    study = optuna.load_study(study_name="synthetic",
                              storage=f"sqlite:///{out}/synthetic/optuna.db")
    assert len(study.trials) == 16 and all(t.state.is_finished() for t in study.trials)


def test_ctrl_c_suspends_the_group_and_the_rerun_resumes_it(tmp_path: Path) -> None:
    out = tmp_path / "lb"
    cmd = [sys.executable, "-m", "bench.cli", "run", "synthetic", "--out", str(out), "--quiet",
           "--trials", "6", "--fuse", "3", "--pruner", "none", "--set", "sleep_s=0.3",
           "--set", "epochs=8", "--set", "noise=0.5"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while not list((out / "synthetic" / "curves").glob("*.parquet")) and \
            len(list((out / "synthetic" / "artifacts").glob("*"))) < 3:
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.1)
    time.sleep(1.0)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    study = optuna.load_study(study_name="synthetic",
                              storage=f"sqlite:///{out}/synthetic/optuna.db")
    suspended = [t for t in study.trials if t.user_attrs.get("suspended")]
    assert len(suspended) == 3
    assert all((out / "synthetic" / "artifacts" / t.user_attrs["bench"]["uid"] /
                "resume.pt").exists() for t in suspended)
    # the rerun resumes them, one unfused: the saved state has the unfused format
    assert main(["run", "synthetic", "--out", str(out), "--quiet", "--trials", "6",
                 "--pruner", "none", "--set", "sleep_s=0", "--set", "epochs=8",
                 "--set", "noise=0.5"]) == 0
    rows = leaderboard.read_trials(out, "synthetic")
    assert len(rows) == 6 and (rows["state"] == "COMPLETE").all()
    assert (rows["attempts"] == 2).sum() == 3
    curves = leaderboard.read_curves(out, "synthetic")
    assert (curves.groupby("trial_uid")["step"].nunique() == 8).all()
    task = get_task("synthetic")  # the resumed value is the uninterrupted one
    from bench.lifecycle import train

    for _, r in rows[rows["attempts"] == 2].iterrows():
        params = {**task.defaults, "x": r["param_x"], "y": r["param_y"], "epochs": 8,
                  "noise": 0.5}
        ref = train(task, params, local_context(int(r["seed"]), "cpu", tmp_path / "r", "loss"))
        assert r["objective"] == ref["loss"]


def test_fuse_on_a_task_without_it_says_so(tmp_path: Path) -> None:
    res = bench_cli("run", "simsiam", "--fuse", "4", "--out", str(tmp_path / "lb"))
    assert res.returncode == 2 and "trains one trial at a time" in res.stderr
    assert "--workers N" in res.stderr and not (tmp_path / "lb").exists()
    res = bench_cli("run", "synthetic", "--fuse", "0", "--out", str(tmp_path / "lb"))
    assert res.returncode == 2 and "--fuse: must be a number of trials" in res.stderr
    for bad, said in (("arch=bn256", "arch=bn256"), ("likelihood=mse", "likelihood=mse"),
                      ("kl=mc", "kl=mc")):
        res = bench_cli("run", "vae", "--fuse", "4", "--set", bad, "--out", str(tmp_path / "lb"))
        assert res.returncode == 2 and said in res.stderr and "without --fuse" in res.stderr
    res = bench_cli("run", "vae", "--variant", "ae-vs-vae-001", "--fuse", "2",
                    "--out", str(tmp_path / "lb"))
    assert res.returncode == 2 and "arch=bn256" in res.stderr, res.stderr
    assert not (tmp_path / "lb").exists()
    # priors fuses its conv decoder; the report's BatchNorm decoder is refused, nothing written
    res = bench_cli("run", "priors", "--variant", "decoders-002", "--fuse", "2", "--out",
                    str(tmp_path / "lb"))
    assert res.returncode == 2 and "reaches arch=dcgan" in res.stderr, res.stderr
    assert not (tmp_path / "lb").exists()


def test_workers_are_placed_on_the_gpus_round_robin() -> None:
    from bench.train import placement

    assert placement("cuda", 5, 2) == ["cuda:0", "cuda:1", "cuda:0", "cuda:1", "cuda:0"]
    assert placement("auto", 3, 4) == ["cuda:0", "cuda:1", "cuda:2"]
    assert placement("cuda:1", 3, 2) == ["cuda:1"] * 3
    assert placement("auto", 2, 0) == ["cpu", "cpu"]
    assert placement("cpu", 2, 8) == ["cpu", "cpu"]


@pytest.mark.gpu
@needs_mnist
@pytest.mark.parametrize("task", ["vae", "priors"])
def test_fused_members_on_cuda_land_near_their_unfused_runs(tmp_path: Path, task: str) -> None:
    """bf16 autocast and vmapped kernels: close, not bit-identical."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    out = tmp_path / "lb"
    res = bench_cli("run", task, "--smoke", "--trials", "4", "--fuse", "4", "--device",
                    "cuda", "--sampler", "random", "--pruner", "none", "--out", str(out),
                    "--quiet")
    assert res.returncode == 0, res.stderr
    rows = leaderboard.read_trials(out, task)
    assert len(rows) == 4 and rows["device"].str.startswith("cuda").all()
    uid = rows["trial_uid"].iloc[0]
    r = bench_cli("rerun", uid, "--out", str(out), "--device", "cuda")
    original, again = map(float, re.search(r"original objective (\S+), rerun (\S+)",
                                           r.stdout).groups())
    assert again == pytest.approx(original, rel=0.05)


@pytest.mark.gpu
@needs_mnist
@pytest.mark.parametrize("task", ["vae", "priors"])
def test_a_fused_training_step_does_not_wait_for_the_gpu(tmp_path: Path, task: str) -> None:
    """Synchronising operations (torch.cuda.set_sync_debug_mode) in an epoch of 1 step and
    in one of 8 steps: the same count, so none of them is per step."""
    import warnings

    from bench.train import seed_everything

    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    spec = get_task(task)
    params = merge_params(spec, space_for(task), None, {},
                          {**spec.smoke, "train_size": 512, "batch_size": 64, "latent_dim": 8})
    group = get_fused(task)(spec, 2, params, torch.device("cuda"), None, latent_cap=8)
    for slot in range(2):
        seed_everything(slot)
        group.set_member(slot, Member(dict(params, latent_dim=4 + 4 * slot),
                                      local_context(slot, "cuda", tmp_path / str(slot),
                                                    spec.metric), {}))
    full = group.data["train"]

    def syncs(images: int) -> int:
        group.data["train"] = full[:images]
        if hasattr(group, "n"):
            group.n = images
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                group.train_epoch([0, 0])
            finally:
                torch.cuda.set_sync_debug_mode("default")
        return sum("synchroniz" in str(w.message) for w in seen)

    one, eight = syncs(64), syncs(512)
    assert eight == one, (one, eight)


SHAPES = """task: priors
metric: val_recon
direction: minimize
fixed: {dataset: mnist, epochs: 1, batch_size: 64, train_size: 128, val_size: 16,
        test_steps: 2, width: 4, latent_dim: 4, tsne_size: 0, test_size: 16, iwae_k: 2}
params:
  lr: {type: float, low: 1.0e-4, high: 3.0e-3, log: true}
variants:
  shapes:
    fixed: {lr: 1.0e-3}
    grid: {model: [ad, vad], prior: [normal, uniform]}
    seeds: 2
"""


@needs_mnist
def test_a_variants_points_are_grouped_by_their_own_shape(tmp_path: Path) -> None:
    """Enqueued points have no params until they run: each must still join only a group of
    its own shape (model and prior are group keys), never train under another's."""
    space = tmp_path / "space.yaml"
    space.write_text(SHAPES)
    out = tmp_path / "lb"
    assert main(["run", "priors", "--space", str(space), "--variant", "shapes", "--fuse", "4",
                 "--out", str(out), "--quiet"]) == 0
    rows = leaderboard.read_trials(out, "priors")
    assert len(rows) == 8 and (rows["state"] == "COMPLETE").all(), rows["error"].tolist()
    shapes = rows.groupby("group_id")[["param_model", "param_prior"]].nunique()
    assert (shapes == 1).all().all(), rows[["group_id", "param_model", "param_prior"]]
    # each shape has 2 points (seeds): its group has 2 slots, not --fuse's 4
    assert set(rows["group_size"]) == {2} and (rows.groupby("group_id").size() == 2).all()
    uid = rows[(rows["param_model"] == "vad") & (rows["param_prior"] == "uniform")].iloc[0]
    r = bench_cli("rerun", uid["trial_uid"], "--out", str(out))
    original, again = map(float, re.search(r"original objective (\S+), rerun (\S+)",
                                           r.stdout).groups())
    assert again == pytest.approx(original, rel=1e-4)


def test_a_stop_while_a_group_is_built_suspends_its_first_trial(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C while the group loads its data: the run ends (it used to loop for ever,
    rebuilding the group), the trial it had asked is suspended, and a rerun runs it."""
    from bench import signals
    from bench.tasks.synthetic import FusedSynthetic

    built = []
    original = FusedSynthetic.__init__

    def stop_while_building(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        built.append(1)
        signals.request_stop()
        original(self, *args, **kwargs)

    monkeypatch.setattr(FusedSynthetic, "__init__", stop_while_building)
    out = tmp_path / "lb"
    args = ["run", "synthetic", "--out", str(out), "--quiet", "--trials", "4", "--fuse", "2",
            "--pruner", "none"]
    assert main(args) == 130 and len(built) == 1
    study = optuna.load_study(study_name="synthetic",
                              storage=f"sqlite:///{out}/synthetic/optuna.db")
    assert [t.user_attrs.get("suspended") for t in study.trials] == [True]
    monkeypatch.setattr(FusedSynthetic, "__init__", original)
    signals.reset()
    assert main(args) == 0
    rows = leaderboard.read_trials(out, "synthetic")
    assert len(rows) == 4 and (rows["state"] == "COMPLETE").all()


def test_a_member_that_cannot_join_fails_alone_and_the_step_failing_fails_its_members(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from bench.tasks.synthetic import FusedSynthetic

    join, step = FusedSynthetic.set_member, FusedSynthetic.train_epoch
    calls = {"join": 0, "step": 0}

    def flaky_join(self, slot, member):  # type: ignore[no-untyped-def]
        calls["join"] += 1
        if calls["join"] == 2:
            raise MemoryError("no room for this member")
        join(self, slot, member)

    def flaky_step(self, epochs):  # type: ignore[no-untyped-def]
        calls["step"] += 1
        if calls["step"] == 3:
            raise RuntimeError("the stacked step broke")
        return step(self, epochs)

    monkeypatch.setattr(FusedSynthetic, "set_member", flaky_join)
    monkeypatch.setattr(FusedSynthetic, "train_epoch", flaky_step)
    out = tmp_path / "lb"
    assert main(["run", "synthetic", "--out", str(out), "--quiet", "--trials", "6",
                 "--fuse", "2", "--pruner", "none", "--set", "epochs=2"]) == 0
    rows = leaderboard.read_trials(out, "synthetic").sort_values("trial_number")
    assert len(rows) == 6
    errors = rows["error"].fillna("").tolist()
    assert sum("MemoryError: no room for this member (while joining" in e for e in errors) == 1
    broke = [e for e in errors if "the stacked step broke" in e]
    assert broke and all("fused group's epoch" in e for e in broke)
    assert (rows["state"] == "COMPLETE").sum() == 6 - 1 - len(broke) >= 2
    # each failed member left its traceback where a failed trial does
    for uid in rows[rows["state"] == "FAIL"]["trial_uid"]:
        assert (out / "synthetic" / "artifacts" / uid / "error.txt").exists()


def test_fuse_k_is_capped_by_the_trials_to_run(tmp_path: Path) -> None:
    out = tmp_path / "lb"
    assert main(["run", "synthetic", "--out", str(out), "--quiet", "--trials", "3",
                 "--fuse", "64", "--pruner", "none"]) == 0
    rows = leaderboard.read_trials(out, "synthetic")
    assert len(rows) == 3 and set(rows["group_size"]) == {3}


def _wait_for(predicate, proc: subprocess.Popen, seconds: float) -> None:  # type: ignore[no-untyped-def]
    deadline = time.time() + seconds
    while not predicate():
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.05)


def test_killed_fused_members_resume_from_their_periodic_checkpoint(tmp_path: Path) -> None:
    """--checkpoint-every holds for fused members: kill -9 mid-run, and the rerun resumes
    each member from its last save (attempts 2, the uninterrupted curve), none FAIL."""
    out = tmp_path / "lb"
    cmd = [sys.executable, "-m", "bench.cli", "run", "synthetic", "--out", str(out), "--quiet",
           "--trials", "3", "--fuse", "3", "--pruner", "none", "--set", "sleep_s=0.2",
           "--set", "epochs=20", "--checkpoint-every", "0"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    arts = out / "synthetic" / "artifacts"
    _wait_for(lambda: len(list(arts.glob("*/resume.pt"))) == 3, proc, 60)
    time.sleep(0.5)
    proc.kill()
    proc.communicate(timeout=30)
    assert main(cmd[3:-2] + ["--set", "sleep_s=0"]) == 0
    rows = leaderboard.read_trials(out, "synthetic")
    assert len(rows) == 3 and (rows["state"] == "COMPLETE").all(), rows["error"].tolist()
    assert (rows["attempts"] == 2).all()
    curves = leaderboard.read_curves(out, "synthetic")
    assert (curves.groupby("trial_uid")["step"].nunique() == 20).all()


def test_a_second_ctrl_c_suspends_the_group_not_fails_it(tmp_path: Path) -> None:
    """Two SIGINTs 0.2 s apart: the second stops the running epoch at once; its members
    stay resumable (SUSPENDED), and the rerun finishes every one."""
    out = tmp_path / "lb"
    cmd = [sys.executable, "-m", "bench.cli", "run", "synthetic", "--out", str(out), "--quiet",
           "--trials", "3", "--fuse", "3", "--pruner", "none", "--set", "sleep_s=1.0",
           "--set", "epochs=6", "--checkpoint-every", "0"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    arts = out / "synthetic" / "artifacts"
    _wait_for(lambda: len(list(arts.glob("*/resume.pt"))) == 3, proc, 60)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    study = optuna.load_study(study_name="synthetic",
                              storage=f"sqlite:///{out}/synthetic/optuna.db")
    assert [t.user_attrs.get("suspended") for t in study.trials] == [True] * 3
    assert main(cmd[3:-2] + ["--set", "sleep_s=0"]) == 0
    rows = leaderboard.read_trials(out, "synthetic")
    assert len(rows) == 3 and (rows["state"] == "COMPLETE").all(), rows["error"].tolist()
