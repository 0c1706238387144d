"""The VAE's science, checked against independent computations."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from conftest import needs_mnist
from torch import distributions as D

from bench.lifecycle import execute_trial
from bench.registry import get_task
from bench.space import merge_params, space_for
from bench.tasks import vae as V
from bench.trial import local_context


def test_analytic_kl_equals_monte_carlo() -> None:
    g = torch.Generator().manual_seed(0)
    mu, logvar = torch.randn(4, 6, generator=g), torch.randn(4, 6, generator=g) * 0.5
    z = mu + torch.randn(200_000, 4, 6, generator=g) * torch.exp(0.5 * logvar)
    log_q = V.log_normal(z, mu, logvar)
    log_p = V.log_normal(z, torch.zeros_like(z), torch.zeros_like(z))
    mc = (log_q - log_p).mean(0)
    se = (log_q - log_p).std(0) / math.sqrt(200_000)
    assert torch.all((mc - V.kl_normal(mu, logvar)).abs() < 4 * se + 1e-4)
    ref = D.kl_divergence(D.Normal(mu, torch.exp(0.5 * logvar)), D.Normal(0.0, 1.0)).sum(-1)
    assert torch.allclose(V.kl_normal(mu, logvar), ref, atol=1e-5)


def test_likelihoods_match_torch_distributions() -> None:
    g = torch.Generator().manual_seed(1)
    x_bin = (torch.rand(3, 1, 28, 28, generator=g) > 0.5).float()
    logits = torch.randn(3, 1, 28, 28, generator=g) * 3
    m = V.VAE(latent_dim=2)
    ref = D.Bernoulli(logits=logits).log_prob(x_bin).sum((1, 2, 3))
    assert torch.allclose(m.log_px(logits, x_bin), ref, atol=1e-4)

    mg = V.VAE(latent_dim=2, likelihood="gaussian")
    with torch.no_grad():
        mg.log_sigma.fill_(-1.3)
    x = torch.rand(3, 1, 28, 28, generator=g)
    ref = D.Normal(logits, math.exp(-1.3)).log_prob(x).sum((1, 2, 3))
    assert torch.allclose(mg.log_px(logits, x), ref, rtol=1e-5, atol=1e-3)


def test_active_units_counts_dimensions_that_vary() -> None:
    mu = torch.zeros(1000, 5)
    mu[:, :3] = torch.randn(1000, 3)
    mu[:, 3] = 0.05 * torch.randn(1000)  # variance 0.0025 < 0.01: inactive
    assert V.active_units(mu) == 3


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[V.VAE, torch.Tensor]:
    if not (Path(__import__("os").environ["BENCH_DATA"]) / "MNIST").exists():
        pytest.skip("MNIST not under $BENCH_DATA")
    task = get_task("vae")
    params = merge_params(task, space_for("vae"), None, {}, {**task.smoke, "epochs": 2})
    art = tmp_path_factory.mktemp("vae")
    ctx = local_context(0, "cpu", art, "val_elbo")
    out = execute_trial(task, params, ctx, {"task": "vae", "trial_uid": "t"}, art / "lb",
                        "maximize")
    assert out.state == "COMPLETE", out.error
    model = V.load_model(params, art)
    data = V.load_split({**params, "test_size": 256}, torch.device("cpu"), None, test=True)
    return model, data["test"]


def test_iwae_is_at_least_the_elbo_on_the_same_examples(trained) -> None:
    model, x = trained
    torch.manual_seed(0)
    elbo = V.elbo_terms(model, x)["elbo"].mean()
    iwae = V.iwae_ll(model, x, k=64).mean()
    assert iwae >= elbo
    assert iwae - elbo < 50, "a small model's gap is a few nats, not orders of magnitude"


def test_iwae_with_one_sample_is_the_elbo_in_expectation(trained) -> None:
    model, x = trained
    torch.manual_seed(0)
    iw1 = torch.stack([V.iwae_ll(model, x, k=1) for _ in range(30)])
    el = torch.stack([V.elbo_terms(model, x)["elbo"] for _ in range(30)])
    # the same estimand; only the KL term is sampled in one and analytic in the other
    se = math.sqrt(iw1.var() / iw1.numel() + el.var() / el.numel())
    assert abs(iw1.mean() - el.mean()) < 4 * se
    k10, k100 = V.iwae_ll(model, x, k=10).mean(), V.iwae_ll(model, x, k=100).mean()
    assert iw1.mean() <= k10 <= k100 + 0.05  # the bound tightens with K


def run_vae(tmp_path: Path, evaluate: bool = True, **extra):
    task = get_task("vae")
    params = merge_params(task, space_for("vae"), None, {}, {**task.smoke, **extra})
    metric = ("val_mse" if params["likelihood"] == "mse" else
              "val_recon" if params["model"] == "ae" else "val_elbo")
    ctx = local_context(0, "cpu", tmp_path / "art", metric)
    out = execute_trial(task, params, ctx, {"task": "vae", "trial_uid": "x"}, tmp_path / "lb",
                        "maximize", evaluate=evaluate)
    return out, ctx, params


@needs_mnist
def test_val_elbo_is_the_beta_one_bound_whatever_beta(tmp_path: Path) -> None:
    out, ctx, params = run_vae(tmp_path, beta=4.0)
    m = out.metrics
    assert m["val_elbo"] == pytest.approx(-(m["val_recon"] + m["val_kl"]), rel=1e-5)
    assert m["test_elbo"] == pytest.approx(-(m["test_recon"] + m["test_kl"]), rel=1e-5)
    assert 0 <= m["test_active_units"] <= params["latent_dim"]
    assert {"val_elbo", "val_recon", "val_kl", "train_loss"} <= {k for _, k, _ in ctx.curve}


@needs_mnist
def test_a_search_trial_never_touches_the_test_set(tmp_path: Path, monkeypatch) -> None:
    calls = []
    real = V.load_split
    monkeypatch.setattr(V, "load_split", lambda *a, **k: calls.append(k) or real(*a, **k))
    out, _, _ = run_vae(tmp_path, evaluate=False)
    assert out.state == "COMPLETE" and not any(k.get("test") for k in calls)
    assert not {k for k in out.metrics if k.startswith("test_")}


@needs_mnist
def test_ae_reports_reconstruction_and_no_elbo(tmp_path: Path) -> None:
    out, _, _ = run_vae(tmp_path, model="ae")
    assert out.state == "COMPLETE", out.error
    m = out.metrics
    assert "val_recon" in m and "test_recon" in m
    assert not {"val_elbo", "test_iwae_ll", "val_kl"} & set(m)


@needs_mnist
def test_diverging_training_fails_with_the_reason(tmp_path: Path, monkeypatch) -> None:
    real = V.build_model

    def poisoned(*a, **k):
        model = real(*a, **k)
        with torch.no_grad():
            model.decoder.fc.bias.fill_(float("nan"))
        return model

    monkeypatch.setattr(V, "build_model", poisoned)
    out, _, _ = run_vae(tmp_path)
    assert out.state == "FAIL"
    assert out.error.startswith("FloatingPointError: non-finite train_loss=nan")
    assert out.error.endswith("at epoch 0")
    assert out.row["epochs_done"] == 0


# ---------------------------------------------------------------- the reports' settings
def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def shapes_through(net: torch.nn.Sequential, x: torch.Tensor, kinds: tuple) -> list:
    """Spatial sizes after each layer of the given kinds."""
    out = []
    for layer in net:
        x = layer(x)
        if isinstance(layer, kinds):
            out.append(tuple(x.shape[1:]))
    return out


def test_report_000_network_is_the_reported_one() -> None:
    from torch import nn

    m = V.VAE(latent_dim=2, arch="lrelu16")
    assert n_params(m) == 57_541  # the report's torchsummary total
    x = torch.zeros(3, 1, 28, 28)
    convs = shapes_through(m.encoder, x, (nn.Conv2d,))
    assert convs == [(16, 28, 28), (32, 14, 14), (32, 7, 7), (32, 7, 7)]
    ups = shapes_through(m.decoder, torch.zeros(3, 2), (nn.ConvTranspose2d,))
    assert ups == [(32, 7, 7), (32, 13, 13), (16, 27, 27), (1, 29, 29)]
    assert m.decoder(torch.zeros(3, 2)).shape == (3, 1, 28, 28)  # trimmed
    slopes = {a.negative_slope for a in m.modules() if isinstance(a, nn.LeakyReLU)}
    assert slopes == {0.01}


def test_report_001_network_follows_its_specification() -> None:
    from torch import nn

    m = V.VAE(latent_dim=64, arch="bn256", likelihood="mse")
    convs = shapes_through(m.encoder, torch.zeros(4, 1, 28, 28), (nn.Conv2d,))
    assert convs == [(32, 14, 14), (64, 7, 7), (128, 3, 3), (256, 1, 1)]
    assert [k.kernel_size for k in m.encoder if isinstance(k, nn.Conv2d)] == [
        (4, 4), (4, 4), (3, 3), (3, 3)]
    assert m.encoder[-1].out_features == 128  # (mu, logvar) for nz = 64
    ups = shapes_through(m.decoder, torch.zeros(4, 64), (nn.ConvTranspose2d,))
    assert ups == [(128, 3, 3), (64, 7, 7), (32, 14, 14), (1, 28, 28)]
    assert sum(isinstance(k, nn.BatchNorm2d) for k in m.encoder) == 3
    assert sum(isinstance(k, nn.BatchNorm2d) for k in m.decoder) == 4


def test_mse_loss_is_torchs_per_pixel_mse_of_a_sigmoid_output() -> None:
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(3)
    m = V.VAE(latent_dim=2, likelihood="mse")
    out, x = torch.randn(5, 1, 28, 28, generator=g), torch.rand(5, 1, 28, 28, generator=g)
    per_image = m.recon_loss(out, x)
    assert per_image.shape == (5,)
    assert float(per_image.mean()) == pytest.approx(
        float(F.mse_loss(torch.sigmoid(out), x)), rel=1e-6)  # nn.MSELoss on the batch
    assert not m.has_likelihood
    with pytest.raises(AssertionError, match="no log p"):
        m.log_px(out, x)


def test_monte_carlo_kl_is_unbiased() -> None:
    g = torch.Generator().manual_seed(4)
    mu, logvar = torch.randn(3, 5, generator=g), torch.randn(3, 5, generator=g) * 0.7
    n = 200_000
    z = mu + torch.randn(n, 3, 5, generator=g) * torch.exp(0.5 * logvar)
    est = V.kl_monte_carlo(z, mu, logvar)
    se = est.std(0) / math.sqrt(n)
    assert torch.all((est.mean(0) - V.kl_normal(mu, logvar)).abs() < 4 * se)


def test_fixed_networks_refuse_cifar_before_running() -> None:
    from bench.errors import ConfigError
    from bench.registry import check_values

    task = get_task("vae")
    with pytest.raises(ConfigError, match="arch: lrelu16 is built for 28x28"):
        check_values(task, {**task.defaults, "arch": "lrelu16", "dataset": "cifar10"})


@needs_mnist
def test_mse_autoencoder_reports_squared_error_and_no_bound(tmp_path: Path) -> None:
    import torch.nn.functional as F

    out, ctx, params = run_vae(tmp_path, model="ae", likelihood="mse", arch="bn256",
                               latent_dim=8)
    assert out.state == "COMPLETE", out.error
    m = out.metrics
    assert {"val_mse", "test_mse", "train_mse"} <= set(m)
    assert not {"val_elbo", "val_recon", "test_iwae_ll", "val_kl"} & set(m)
    # independent check: torch's MSE of the reloaded model on the validation images
    model = V.load_model(params, ctx.artifact_dir)
    val = V.load_split(params, torch.device("cpu"), None)["val"]
    with torch.no_grad():
        ref = F.mse_loss(torch.sigmoid(model.decoder(model.encode(val)[0])), val)
    assert m["val_mse"] == pytest.approx(float(ref), rel=1e-4)


@needs_mnist
def test_monte_carlo_kl_trains_and_reports_the_analytic_kl(tmp_path: Path) -> None:
    out, _, _ = run_vae(tmp_path, kl="mc")
    assert out.state == "COMPLETE", out.error
    m = out.metrics
    assert m["val_elbo"] == pytest.approx(-(m["val_recon"] + m["val_kl"]), rel=1e-5)
    assert m["test_iwae_ll"] >= m["test_elbo"] - 1.0


@needs_mnist
def test_report_figures_are_drawn_for_the_report_variants(tmp_path: Path) -> None:
    from conftest import bench_cli
    from matplotlib.image import imread

    out = tmp_path / "lb"
    env = {"OMP_NUM_THREADS": "1"}
    for variant in ("ae-vs-vae-001", "kl-estimator-004"):
        run = bench_cli("run", "vae", "--variant", variant, "--smoke", "--set", "epochs=1",
                        "--quiet", "--device", "cpu", "--out", str(out), env=env)
        assert run.returncode == 0, run.stderr
    plot = bench_cli("plot", "vae", "--out", str(out), env=env)
    assert plot.returncode == 0, plot.stderr
    written = {Path(p).name for p in plot.stdout.split()}
    assert {"vae_report_reconstructions.png", "vae_report_samples.png",
            "vae_report_interpolations.png", "vae_report_prior_interpolation.png",
            "vae_report_perturbations.png"} <= written
    for path in plot.stdout.split():
        if Path(path).name.startswith("vae_report_"):
            img = imread(path)
            assert img.ndim == 3 and min(img.shape[:2]) > 100 and img.std() > 0, path
    strip = imread(out / "vae" / "plots" / "vae.ae-vs-vae-001.smoke" /
                   "vae_report_interpolations.png")
    assert strip.shape[0] > strip.shape[1]  # 3 pairs x (AE, VAE) = 6 strips of 7 images
