"""The distribution families (bench.distributions) and the `priors` task, end to end."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import bench_cli, needs_mnist

from bench import leaderboard
from bench.distributions import (
    SQRT3,
    family_names,
    get_family,
    kl,
    kl_is_analytic,
    kl_mc,
)
from bench.errors import ConfigError, DataError
from bench.lifecycle import execute_trial
from bench.registry import get_task
from bench.trial import local_context

FAMILIES = family_names()
N_SAMPLES = 400_000
# Tiny convolutions gain nothing from a second thread, and on a loaded 2-core machine the
# intra-op thread pool made a 0.3 s trial take 3-4 s (measured), so the task tests use one.
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def posterior(name: str, a: list[float], std: list[float], grad: bool = False):
    fam = get_family(name)
    at = torch.tensor(a, requires_grad=grad)
    bt = torch.tensor([fam.raw_spread(s) for s in std], requires_grad=grad)
    return fam.posterior(at, bt), at, bt


def expected_moments(q) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and variance from the textbook formulas, not from torch's own properties."""
    if hasattr(q, "low"):
        return (q.low + q.high) / 2, (q.high - q.low) ** 2 / 12
    if type(q).__name__ == "Laplace":
        return q.loc, 2 * q.scale**2
    return q.loc, q.scale**2


def test_every_study_family_is_registered() -> None:
    assert {"normal", "laplace", "uniform"} <= set(FAMILIES)
    with pytest.raises(ConfigError, match="known: normal, laplace, uniform"):
        get_family("cauchy")


# ---------------------------------------------------------------- per family
@pytest.mark.parametrize("name", FAMILIES)
def test_prior_is_standardised(name: str) -> None:
    torch.manual_seed(0)
    z = get_family(name).prior("cpu").sample((N_SAMPLES,))
    assert float(z.mean()) == pytest.approx(0.0, abs=0.01)
    assert float(z.var()) == pytest.approx(1.0, abs=0.01)


@pytest.mark.parametrize("name", FAMILIES)
def test_sample_moments(name: str) -> None:
    torch.manual_seed(0)
    q, _, _ = posterior(name, [-1.0, 0.0, 0.7], [0.05, 0.5, 0.9])
    z = q.rsample((N_SAMPLES,))
    mean, var = expected_moments(q)
    # standard error of the mean is std / sqrt(n) ~ 0.0015 at std 0.9; of the variance ~ 1%
    torch.testing.assert_close(z.mean(0), mean, atol=6 * var.sqrt().max() / N_SAMPLES**0.5,
                               rtol=0)
    torch.testing.assert_close(z.var(0), var, rtol=0.03, atol=1e-6)
    assert torch.allclose(q.stddev, torch.tensor([0.05, 0.5, 0.9]), rtol=1e-4)


@pytest.mark.parametrize("name", FAMILIES)
def test_density_integrates_to_one(name: str) -> None:
    q, _, _ = posterior(name, [-0.5, 0.3], [0.2, 0.8])
    for dist in (q, get_family(name).prior("cpu")):
        grid = torch.linspace(-12.0, 12.0, 480_001, dtype=torch.float64)
        dens = dist.log_prob(grid.float().view(-1, *[1] * len(dist.batch_shape))).exp()
        mass = torch.trapezoid(dens.double(), grid, dim=0)
        torch.testing.assert_close(mass, torch.ones_like(mass), atol=2e-3, rtol=0)


@pytest.mark.parametrize("name", FAMILIES)
def test_analytic_kl_matches_monte_carlo(name: str) -> None:
    torch.manual_seed(0)
    q, _, _ = posterior(name, [-1.0, 0.0, 0.4, 1.5], [0.05, 0.3, 0.7, 0.95])
    p = get_family(name).prior("cpu")
    assert kl_is_analytic(q, p)
    z = q.sample((N_SAMPLES,))
    ratio = q.log_prob(z) - p.log_prob(z)
    se = ratio.std(0) / N_SAMPLES**0.5
    torch.testing.assert_close(kl(q, p), ratio.mean(0), atol=float(5 * se.max() + 1e-4), rtol=0)


@pytest.mark.parametrize("name", FAMILIES)
def test_kl_nonnegative_and_zero_to_itself(name: str) -> None:
    gen = torch.Generator().manual_seed(1)
    fam = get_family(name)
    a, b = torch.randn(2, 1000, generator=gen) * 4  # far into the tails of every link
    q, p = fam.posterior(a, b), fam.prior("cpu")
    values = kl(q, p)
    assert torch.isfinite(values).all() and (values >= -1e-5).all()
    torch.testing.assert_close(kl(q, q), torch.zeros(1000), atol=1e-5, rtol=0)
    torch.testing.assert_close(kl_mc(q, q), torch.zeros(1000), atol=1e-5, rtol=0)
    torch.testing.assert_close(kl(p, p), torch.zeros(()), atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", FAMILIES)
def test_gradients_flow_through_rsample(name: str) -> None:
    q, a, b = posterior(name, [-0.5, 0.2], [0.3, 0.6], grad=True)
    p = get_family(name).prior("cpu")
    (q.rsample((64,)).pow(2).sum() + kl(q, p).sum()).backward()
    for g in (a.grad, b.grad):
        assert g is not None and torch.isfinite(g).all() and (g.abs() > 0).all()


@pytest.mark.parametrize("name", FAMILIES)
def test_rsample_from_a_generator_draws_torchs_numbers(name: str) -> None:
    """Family.rsample(q, shape, gen) is q.rsample(shape) with its draws from `gen`: the
    same numbers for the same seed (a trial's noise stream, which a fused member replays),
    and differentiable in q's parameters; draw + reparam split it for vmap."""
    fam = get_family(name)
    q, a, b = posterior(name, [-0.5, 0.2, 1.0], [0.3, 0.6, 0.05], grad=True)
    for shape in [(), (4,), (2, 5)]:
        torch.manual_seed(11)
        ours = fam.rsample(q, shape, torch.Generator().manual_seed(11))
        assert torch.equal(ours, q.rsample(shape))
        gen = torch.Generator().manual_seed(11)
        assert torch.equal(fam.reparam(q, fam.draw(q, shape, gen)), ours)
    prior = fam.prior("cpu")
    torch.manual_seed(3)
    assert torch.equal(fam.rsample(prior, (6, 3), torch.Generator().manual_seed(3)),
                       prior.sample((6, 3)))
    fam.rsample(q, (8,), torch.Generator().manual_seed(0)).sum().backward()
    assert a.grad is not None and b.grad is not None and (b.grad.abs() > 0).all()


@pytest.mark.parametrize("name", FAMILIES)
def test_point_lies_in_support_and_inverts(name: str) -> None:
    fam = get_family(name)
    z = fam.prior("cpu").sample((1000,))
    torch.testing.assert_close(fam.point(fam.unpoint(z)), z, atol=1e-4, rtol=0)
    assert torch.isfinite(fam.prior("cpu").log_prob(fam.point(torch.randn(1000) * 30))).all()


# ---------------------------------------------------------------- supports and pairs
def test_uniform_posterior_stays_inside_prior_support() -> None:
    fam = get_family("uniform")
    extreme = torch.tensor([-1e4, -60.0, -20.0, 0.0, 20.0, 60.0, 1e4])
    a, b = torch.meshgrid(extreme, extreme, indexing="ij")
    q, p = fam.posterior(a.flatten(), b.flatten()), fam.prior("cpu")
    assert (q.low >= -SQRT3).all() and (q.high <= SQRT3).all() and (q.high > q.low).all()
    values = kl(q, p)
    assert torch.isfinite(values).all() and float(values.max()) <= -math.log(1e-4) + 1e-3
    # closed support: a sample rounded onto `high` keeps a finite density
    assert torch.isfinite(q.log_prob(q.high)).all() and torch.isfinite(q.log_prob(q.low)).all()


def test_pair_without_analytic_kl_uses_monte_carlo() -> None:
    torch.manual_seed(0)
    q, _, _ = posterior("uniform", [0.5], [0.4])
    p = get_family("laplace").prior("cpu")
    assert not kl_is_analytic(q, p)
    grid = torch.linspace(float(q.low), float(q.high), 200_001, dtype=torch.float64)
    dq = torch.exp(q.log_prob(grid.float())).double()
    exact = torch.trapezoid(dq * (q.log_prob(grid.float()) - p.log_prob(grid.float())).double(),
                            grid)
    assert float(kl(q, p, samples=N_SAMPLES)) == pytest.approx(float(exact), abs=5e-3)
    # a Normal posterior under a Uniform prior leaves the support: the KL is infinite, not NaN
    assert math.isinf(float(kl(posterior("normal", [0.0], [0.3])[0], get_family("uniform")
                               .prior("cpu"))))


# ---------------------------------------------------------------- the task
def test_bad_values_are_all_listed_and_missing_data_named(tmp_path: Path) -> None:
    from bench.registry import check_values
    from bench.specs.priors import data_check

    task = get_task("priors")
    params = {**task.defaults, "model": "ae", "prior": "gumbel", "beta": -1.0}
    with pytest.raises(ConfigError) as err:
        check_values(task, params)
    assert {"model", "prior", "beta"} == {p.split(":")[0] for p in err.value.problems}
    with pytest.raises(DataError, match="fashion-mnist"):
        data_check(task.defaults, tmp_path)


@needs_mnist
@pytest.mark.usefixtures("one_thread")
def test_ad_test_time_fit_lowers_recon_monotonically() -> None:
    from bench.data import load_images
    from bench.nets import binarize
    from bench.tasks.priors import LatentModel, fit_codes

    torch.manual_seed(0)
    model = LatentModel(get_family("normal"), "ad", 8, 1, 28, 8, 2, 8, 0.1)
    before = {k: v.clone() for k, v in model.decoder.state_dict().items()}
    x = binarize(load_images("mnist", False)[0][:32], "static", "bernoulli")
    _, history = fit_codes(model, x, steps=40, lr=0.05, beta=0.0, batch=16)
    assert (history[1:] <= history[:-1] + 1e-4).all(), history
    assert float(history[-1]) < float(history[0]) - 1.0
    for k, v in model.decoder.state_dict().items():
        assert torch.equal(v, before[k]), f"decoder changed during the test-time fit: {k}"


@needs_mnist
@pytest.mark.usefixtures("one_thread")
def test_trial_writes_readable_artifacts(tmp_path: Path) -> None:
    from matplotlib.image import imread

    task = get_task("priors")
    params = {**task.defaults, **task.smoke, "model": "ad", "prior": "uniform", "test_size": 64,
              "tsne_size": 40}
    ctx = local_context(0, "cpu", tmp_path, "val_recon")
    out = execute_trial(task, params, ctx, {"task": "priors", "trial_uid": "t"},
                        tmp_path / "lb", "minimize", evaluate=True)
    assert out.state == "COMPLETE", out.error
    metrics = out.metrics
    assert metrics["test_bce_per_pixel"] == pytest.approx(metrics["test_recon"] / 784)
    with np.load(tmp_path / "grids.npz") as grids:
        assert {k: grids[k].shape for k in grids} == {
            "test": (64, 28, 28), "decoded": (64, 28, 28), "prior_samples": (64, 28, 28)}
        assert grids["prior_samples"].std() > 0
    history = np.load(tmp_path / "test_fit_history.npy")
    assert history.shape == (3,) and history[-1] <= history[0]
    for name in ("decoded.png", "prior_samples.png", "tsne.png"):
        img = imread(tmp_path / name)
        assert img.ndim == 3 and min(img.shape[:2]) > 50 and img.std() > 0, name
    with np.load(tmp_path / "tsne.npz") as t:
        assert t["xy"].shape == (40, 2) and len(t["labels"]) == 40
    blob = torch.load(tmp_path / "model.pt", weights_only=True)
    assert blob["config"]["family"] == "uniform" and not any(
        k.startswith("codes.") for k in blob["state_dict"])


TINY = ["dataset=mnist", "epochs=1", "train_size=128", "val_size=32", "test_size=32",
        "latent_dim=4",
        "width=4", "batch_size=64", "test_steps=3", "iwae_k=2", "tsne_size=0"]


@needs_mnist
def test_prior_comparison_end_to_end(tmp_path: Path) -> None:
    from matplotlib.image import imread

    out = tmp_path / "lb"
    sets = [a for kv in TINY for a in ("--set", kv)]
    run = bench_cli("run", "priors", "--variant", "prior-comparison", *sets, "--quiet",
                    "--device", "cpu", "--out", str(out), env=ONE_THREAD)
    assert run.returncode == 0, run.stderr
    rows = leaderboard.read_trials(out, "priors")
    assert len(rows) == 27 and set(rows["state"]) == {"COMPLETE"}, rows["error"].dropna()
    cells = rows.groupby(["param_prior", "param_model"])["seed"].nunique()
    assert len(cells) == 9 and set(cells) == {3}

    from bench import board

    [sec] = board.sections(rows, get_task("priors"))  # `bench board`
    table = sec.table
    assert len(table) == 9 and set(table["n"]) == {3}
    assert table["mean"].is_monotonic_increasing  # ranked: minimize val_recon
    assert rows["metric_test_recon"].notna().all(), "a variant evaluates every trial"

    plot = bench_cli("plot", "priors", "--variant", "prior-comparison", "--out", str(out),
                     env=ONE_THREAD)
    assert plot.returncode == 0, plot.stderr
    written = {Path(p).name: Path(p) for p in plot.stdout.split()}
    for name in ("priors_comparison.png", "priors_samples.png", "priors_decoded.png"):
        img = imread(written[name])
        assert img.ndim == 3 and min(img.shape[:2]) > 200 and img.std() > 0, name


# ---------------------------------------------------------------- the study's settings (002)
def test_dcgan_decoder_is_the_studys() -> None:
    from torch import nn

    from bench.nets import DcganLinearDecoder

    dec = DcganLinearDecoder(1, 28, 100)
    convs = [m for m in dec.net if isinstance(m, nn.ConvTranspose2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size, c.stride, c.padding) for c in convs] \
        == [(100, 128, (7, 7), (1, 1), (0, 0)), (128, 64, (4, 4), (2, 2), (1, 1)),
            (64, 1, (4, 4), (2, 2), (1, 1))]
    assert [type(m).__name__ for m in dec.net] == [
        "ConvTranspose2d", "BatchNorm2d", "ReLU", "ConvTranspose2d", "BatchNorm2d", "ReLU",
        "ConvTranspose2d", "Sigmoid"]
    assert (dec.mlp.in_features, dec.mlp.out_features) == (784, 784)
    expected = (100 * 128 * 49 + 128) + 2 * 128 + (128 * 64 * 16 + 64) + 2 * 64 \
        + (64 * 16 + 1) + (784 * 784 + 784)
    assert sum(p.numel() for p in dec.parameters()) == expected
    assert dec(torch.randn(3, 100)).shape == (3, 1, 28, 28)


def test_gaussian_likelihood_matches_torch() -> None:
    from bench.nets import gaussian_log_px

    g = torch.Generator().manual_seed(5)
    mean, x = torch.rand(4, 1, 28, 28, generator=g), torch.rand(4, 1, 28, 28, generator=g)
    ref = torch.distributions.Normal(mean, 0.1).log_prob(x).sum((1, 2, 3))
    torch.testing.assert_close(gaussian_log_px(mean, x, 0.1), ref, rtol=1e-5, atol=1e-3)


def test_per_class_init_shares_one_draw_per_class_for_the_vad_only() -> None:
    from bench.tasks.priors import build_model

    task = get_task("priors")
    labels = torch.tensor([0, 1, 0, 2, 1, 2, 2])
    params = {**task.defaults, "vad_init": "per-class", "latent_dim": 6, "width": 4}
    torch.manual_seed(0)
    vad = build_model({**params, "model": "vad"}, 7, (1, 28, 28), torch.device("cpu"), labels)
    w = vad.codes.weight.detach()
    for c in range(3):
        rows = w[labels == c]
        assert torch.equal(rows, rows[:1].expand_as(rows)), f"class {c} shares one draw"
    assert not torch.equal(w[0], w[1])
    ad = build_model({**params, "model": "ad"}, 7, (1, 28, 28), torch.device("cpu"), labels)
    assert not torch.equal(ad.codes.weight[0], ad.codes.weight[2]), "ad: one draw per image"


def test_rmse_is_in_grey_levels() -> None:
    from bench.tasks.priors import rmse_grey

    # images off by 0.1 everywhere, and by 0.3 everywhere: RMSE sqrt((0.01 + 0.09) / 2)
    assert rmse_grey(torch.tensor([0.01, 0.09])) == pytest.approx(255 * math.sqrt(0.05))


def test_dcgan_needs_28x28_images() -> None:
    from bench.registry import check_values

    task = get_task("priors")
    with pytest.raises(ConfigError, match="dcgan decodes 28x28"):
        check_values(task, {**task.defaults, "arch": "dcgan", "dataset": "cifar10"})


@needs_mnist
def test_decoders_002_end_to_end(tmp_path: Path) -> None:
    """The study's variant: grey-level metrics on every trial, its figures from bench plot."""
    from matplotlib.image import imread

    out = tmp_path / "lb"
    run = bench_cli("run", "priors", "--variant", "decoders-002", "--smoke", "--set",
                    "tsne_size=24", "--quiet", "--device", "cpu", "--out", str(out),
                    env=ONE_THREAD)
    assert run.returncode == 0, run.stderr
    rows = leaderboard.read_trials(out, "priors")
    assert len(rows) == 18 and set(rows["state"]) == {"COMPLETE"}, rows["error"].dropna()
    for col in ("metric_train_rmse", "metric_val_rmse", "metric_test_rmse"):
        assert rows[col].between(0, 255).all(), col
    assert rows["metric_test_bce_per_pixel"].isna().all() if \
        "metric_test_bce_per_pixel" in rows else True  # a Gaussian has no BCE
    plot = bench_cli("plot", "priors", "--out", str(out), env=ONE_THREAD)
    assert plot.returncode == 0, plot.stderr
    written = {Path(p).name: Path(p) for p in plot.stdout.split()}
    for name in ("priors_test_vs_random.png", "priors_tsne.png", "priors_fit_curves.png"):
        img = imread(written[name])
        assert img.ndim == 3 and min(img.shape[:2]) > 200 and img.std() > 0, name
    board = bench_cli("board", "priors", "--out", str(out), "--format", "json")
    assert board.returncode == 0 and "24.9" in board.stdout, board.stderr  # the reference
    cmp = bench_cli("compare", "priors", "--study", "priors.decoders-002.smoke", "--out", str(out))
    assert cmp.returncode == 0, cmp.stderr  # the report's numbers beside ours, its findings
    assert "report: prior=normal, model=vad: 24.9 (test_rmse); measured" in cmp.stdout, cmp.stdout
    assert "finding: VAD Uniform is the worst" in cmp.stdout
