"""SimSiam: loss, stop-gradient, kNN monitor, batched augmentation, collapse, plots."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
from conftest import needs_mnist

from bench.errors import ConfigError
from bench.lifecycle import execute_trial
from bench.registry import get_task
from bench.tasks import simsiam as ss
from bench.tasks.simsiam_augment import TwoViewAugment
from bench.tasks.simsiam_eval import collapse_std, knn_accuracy, knn_predict
from bench.trial import local_context


# ---------------------------------------------------------------- loss
def test_loss_symmetric_and_bounded() -> None:
    g = torch.Generator().manual_seed(0)
    p1, p2, z1, z2 = (torch.randn(64, 16, generator=g) * 5 for _ in range(4))
    loss = ss.simsiam_loss(p1, p2, z1, z2)
    assert loss == pytest.approx(float(ss.simsiam_loss(p2, p1, z2, z1)), abs=1e-6)
    assert -1.0 <= float(loss) <= 1.0
    assert float(ss.simsiam_loss(z2, z1, z1, z2)) == pytest.approx(-1.0, abs=1e-6)  # p = z
    assert float(ss.simsiam_loss(-z2, -z1, z1, z2)) == pytest.approx(1.0, abs=1e-6)  # p = -z


def _tiny_model(pred: str = "mlp") -> ss.SimSiam:
    return ss.SimSiam(1, "small", 4, 16, 16, 4, pred)


@pytest.mark.parametrize("stop_grad", [True, False])
def test_stop_grad_cuts_the_target_branch(stop_grad: bool) -> None:
    """D(p1, z2) with the target z2 computed by a copy: the copy's parameters get gradient
    only when the stop-gradient is off; the online branch gets it either way."""
    torch.manual_seed(0)
    online = _tiny_model()
    target = copy.deepcopy(online)
    x1, x2 = torch.randn(8, 1, 12, 12), torch.randn(8, 1, 12, 12)
    p1, z2 = online.predictor(online.project(x1)), target.project(x2)
    ss.negative_cosine(p1, z2, stop_grad).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in online.parameters())
    target_grads = [p.grad for p in target.parameters()]
    if stop_grad:
        assert all(g is None for g in target_grads)
    else:
        assert sum(float(g.abs().sum()) for g in target_grads if g is not None) > 0


@pytest.mark.parametrize("out_bn", [True, False])
def test_with_an_identity_predictor_the_stop_gradient_only_halves_the_gradient(
        out_bn: bool) -> None:
    """The paper's argument (section 4.2) that its identity-predictor ablation is the
    no-stop-gradient one in disguise: with h = identity, the symmetric loss with the
    stop-gradient has, for every parameter, half the gradient of the loss without it
    (so SGD at (lr, wd) with it is SGD at (lr / 2, 2 wd) without it)."""
    grads = {}
    for sg in (True, False):
        torch.manual_seed(0)
        model = ss.SimSiam(1, "small", 4, 16, 16, 4, "identity", proj_out_bn=out_bn)
        assert isinstance(model.projector[-1], torch.nn.BatchNorm1d) == out_bn
        g = torch.Generator().manual_seed(1)
        x1, x2 = torch.randn(8, 1, 12, 12, generator=g), torch.randn(8, 1, 12, 12, generator=g)
        ss.simsiam_loss(*model(x1, x2), stop_grad=sg).backward()
        grads[sg] = [p.grad.clone() for p in model.parameters()]
    assert len(grads[True]) == len(grads[False]) > 0
    for with_sg, without in zip(grads[True], grads[False], strict=True):
        torch.testing.assert_close(with_sg, 0.5 * without, rtol=1e-4, atol=1e-7)
    assert any(float(g.abs().sum()) > 0 for g in grads[True])


def test_the_default_projector_starts_from_the_weights_it_had_before_proj_out_bn() -> None:
    """proj_out_bn is declared since=2026-12-01: at its default, rows and studies from
    before it are the same configuration, so the model must start where it started then
    (the projector as it was built before the option, written out here)."""
    from torch import nn

    torch.manual_seed(0)
    new = ss.projector(16, 32, 8)
    after_new = torch.rand(1)
    torch.manual_seed(0)
    old = nn.Sequential(
        nn.Linear(16, 32, bias=False), nn.BatchNorm1d(32), nn.ReLU(inplace=True),
        nn.Linear(32, 32, bias=False), nn.BatchNorm1d(32), nn.ReLU(inplace=True),
        nn.Linear(32, 8, bias=False), nn.BatchNorm1d(8, affine=False))
    assert torch.equal(torch.rand(1), after_new)  # the same draws consumed (the predictor next)
    a, b = new.state_dict(), old.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)


# ---------------------------------------------------------------- monitors
def _knn_fixture() -> tuple[torch.Tensor, ...]:
    """Bank of 4 unit vectors in 2-D, rescaled (the monitor must normalise), and 4 queries."""
    s = math.sqrt(1 - 0.99**2)
    bank = torch.tensor([[0.99, s], [0.8, 0.6], [0.8, -0.6], [-1.0, 0.0]])
    bank = bank * torch.tensor([[3.0], [0.5], [2.0], [7.0]])
    bank_y = torch.tensor([1, 0, 0, 1])
    query = torch.tensor([[1.0, 0.0], [-2.0, 0.0], [0.0, 1.0], [4.0, 0.0]])
    query_y = torch.tensor([1, 1, 0, 0])
    return query, query_y, bank, bank_y


def test_knn_accuracy_matches_hand_computation() -> None:
    """k=3. Cosine similarities of the queries to the bank:
    q0=(1,0):  [0.99, 0.8, 0.8, -1]  -> top3 {1:0.99, 0:0.8, 0:0.8}
    q1=(-1,0): [-0.99, -0.8, -0.8, 1] -> top3 {1:1, 0:-0.8, 0:-0.8}
    q2=(0,1):  [0.141, 0.6, -0.6, 0]  -> top3 {0:0.6, 1:0.141, 1:0}
    q3 = q0 with label 0.
    T=0.1: q0 class 1 e^9.9=19930 vs class 0 2e^8=5962 -> 1 (right); q1 -> 1 (right);
      q2 class 0 e^6=403 vs class 1 e^1.41+e^0=5.1 -> 0 (right); q3 -> 1 (wrong): 3/4.
    T=1: q0 class 1 e^0.99=2.69 vs class 0 2e^0.8=4.45 -> 0 (wrong); q1 e^1=2.72 vs
      2e^-0.8=0.90 -> 1 (right); q2 class 0 e^0.6=1.82 vs class 1 e^0.141+1=2.15 -> 1
      (wrong); q3 -> 0 (right): 2/4. A plain majority vote would give q0 -> 0 at any T."""
    q, qy, b, by = _knn_fixture()
    assert knn_predict(q, b, by, 2, k=3, temperature=0.1).tolist() == [1, 1, 0, 1]
    assert knn_accuracy(q, qy, b, by, 2, k=3, temperature=0.1) == pytest.approx(0.75)
    assert knn_accuracy(q, qy, b, by, 2, k=3, temperature=1.0) == pytest.approx(0.5)
    # k larger than the bank is clipped to the bank: all 4 vote.
    assert knn_predict(q[:1], b, by, 2, k=200, temperature=0.1).tolist() == [1]


def test_collapse_std_is_one_when_spread_and_zero_when_constant() -> None:
    g = torch.Generator().manual_seed(0)
    assert collapse_std(torch.randn(8192, 64, generator=g)) == pytest.approx(1.0, abs=0.03)
    assert collapse_std(torch.ones(100, 64) * 3.0) == pytest.approx(0.0, abs=1e-6)


# ---------------------------------------------------------------- augmentation
def _blob_batch(n: int, channels: int, size: int = 28) -> torch.Tensor:
    """n copies of one asymmetric image (an off-centre bright square, coloured for RGB)."""
    img = torch.zeros(channels, size, size, dtype=torch.uint8)
    img[:, 4:14, 3:20] = 200
    if channels == 3:
        img[1] //= 2
    return img.expand(n, -1, -1, -1).contiguous()


@pytest.mark.parametrize("channels", [1, 3])
def test_views_differ_and_params_are_per_image(channels: int) -> None:
    torch.manual_seed(0)
    aug = TwoViewAugment(channels, 28, (0.5,) * channels, (0.25,) * channels)
    x = _blob_batch(32, channels)
    v1, v2 = aug(x)
    assert v1.shape == v2.shape == (32, channels, 28, 28) and v1.dtype == torch.float32
    # The two views of every image differ.
    assert ((v1 - v2).flatten(1).abs().amax(1) > 1e-3).all()
    # Identical inputs, yet every output in the batch is different: parameters per image.
    flat = v1.flatten(1)
    assert torch.cdist(flat, flat).add(torch.eye(32) * 1e9).amin() > 1e-3
    crop = aug.ops[0]._params["src"]  # kornia's per-image crop boxes of the last call
    assert len(torch.unique(crop.flatten(1), dim=0)) == 32


def test_grayscale_and_jitter_rates_on_rgb() -> None:
    """Grayscale p=0.2 per image: about 20% of a 2,000-image batch has equal channels."""
    torch.manual_seed(0)
    aug = TwoViewAugment(3, 16, (0.5,) * 3, (0.25,) * 3)
    x = _blob_batch(2000, 3, 16)
    out = aug.ops(x.float() / 255)
    gray = (out[:, 0] - out[:, 1]).abs().flatten(1).amax(1) < 1e-5
    assert 0.15 < float(gray.float().mean()) < 0.25  # 0.2 +- 4.5 sigma (sigma=0.009)


# ---------------------------------------------------------------- task
def test_bad_params_are_all_reported() -> None:
    from bench.registry import check_values, get_task

    params = {**ss.DEFAULTS, "backbone": "vgg", "predictor": "linear", "knn_k": 0}
    with pytest.raises(ConfigError) as err:
        check_values(get_task("simsiam"), params)
    text = str(err.value)
    assert "backbone" in text and "predictor" in text and "knn_k" in text


def test_resnet18_has_the_cifar_stem() -> None:
    net, dim = ss.resnet18_cifar(3, 0)
    assert dim == 512 and net.conv1.kernel_size == (3, 3) and net.conv1.stride == (1, 1)
    assert isinstance(net.maxpool, torch.nn.Identity)
    assert net(torch.zeros(2, 3, 32, 32)).shape == (2, 512)


# The collapse run: 96 SGD steps of 32 MNIST images with the small backbone. Measured on
# 3 seeds: collapse_std 0.18-0.20 without stop-grad, 0.62-0.67 with it.
COLLAPSE = {**ss.DEFAULTS, **ss.SMOKE, "train_size": 512, "val_size": 256, "batch_size": 32,
            "epochs": 6, "base_lr": 0.6, "knn_every": 100}


@needs_mnist
def test_no_stop_grad_collapses_on_mnist(tmp_path: Path) -> None:
    out, threads = {}, torch.get_num_threads()
    # Tiny convs on a loaded 2-core machine: 136 s with 2 threads, 16 s with 1 (measured).
    torch.set_num_threads(1)
    task = get_task("simsiam")
    for sg in (True, False):
        ctx = local_context(0, "cpu", tmp_path / str(sg), "val_knn_acc")
        res = execute_trial(task, {**COLLAPSE, "stop_grad": sg}, ctx,
                            {"task": "simsiam", "trial_uid": str(sg)}, tmp_path / "lb",
                            "maximize")
        assert res.state == "COMPLETE", res.error
        out[sg] = res.metrics
        assert [s for s, k, _ in ctx.curve if k == "val_collapse_std"] == [5]  # final only
    torch.set_num_threads(threads)
    assert out[False]["val_collapse_std"] < 0.5 * out[True]["val_collapse_std"], out
    assert out[False]["train_loss"] < out[True]["train_loss"]  # the loss still falls


def test_plots_from_leaderboard(tmp_path: Path) -> None:
    """Fake ablation rows and curves -> both figures, readable PNGs."""
    import matplotlib.image as mpimg

    from bench import leaderboard
    from bench.plots import make_plots

    for i, (sg, pred, seed) in enumerate([(a, b, s) for a in (True, False)
                                          for b in ("mlp", "identity") for s in (0, 1)]):
        params = {**ss.DEFAULTS, "stop_grad": sg, "predictor": pred}
        knn = 0.9 if sg and pred == "mlp" else 0.1
        row = {"task": "simsiam", "study": "t", "variant": "ablation", "trial_uid": f"u{i}",
               "trial_number": i, "seed": seed, "direction": "maximize", "state": "COMPLETE",
               "metric": "val_knn_acc",
               "objective": knn, "metric_val_knn_acc": knn,
               "config_hash": f"{sg}-{pred}", **{f"param_{k}": v for k, v in params.items()}}
        curve = [(e, m, v + 0.01 * seed) for e in range(3)
                 for m, v in (("val_knn_acc", knn), ("train_loss", -0.5),
                              ("val_collapse_std", 0.5))]
        leaderboard.write_trial(tmp_path, row, curve)
    paths = make_plots("simsiam", tmp_path, variant="ablation").paths
    assert {p.name for p in paths} >= {"simsiam_curves.png", "simsiam_final_knn.png"}
    for p in paths:
        img = mpimg.imread(p)
        assert img.ndim == 3 and img.shape[0] > 100 and img[..., :3].std() > 0
