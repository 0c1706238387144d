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
    metric = "val_recon" if params["model"] == "ae" else "val_elbo"
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
    assert out.error == "FloatingPointError: non-finite train_loss=nan at epoch 0"
    assert out.row["epochs_done"] == 0
