"""`bench plot`: real tiny studies in, valid non-trivial PNGs out; empty and all-FAIL
leaderboards draw what they can without crashing."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import needs_mnist

from bench import leaderboard, plots
from bench.cli import main
from bench.tasks import vae, vae_plots

# vae.SMOKE sizes; latent_dim, beta, lr and depth stay searched so the sweeps have x values.
VAE_SMOKE = [f"--set={k}={vae.SMOKE[k]}" for k in
             ("epochs", "train_size", "val_size", "test_size", "iwae_k", "width", "batch_size")]
GENERIC = {"history.png", "curves.png"}  # importances need 20 trials: a note instead
VAE_FIGURES = {"vae_beta.png", "vae_latent.png", "vae_rate_distortion.png",
               "vae_reconstructions.png", "vae_samples.png", "vae_interpolation.png",
               "vae_traversals.png", "vae_tsne.png"}


def bench(*args: str) -> None:
    fails = any("fail=exception" in a for a in args)  # every trial failed: exit 1
    assert main(list(args)) == (1 if fails else 0), args


def plot(capsys: pytest.CaptureFixture[str], task: str, out: Path) -> list[Path]:
    """`bench plot` in-process; the printed paths, checked against what make_plots wrote."""
    capsys.readouterr()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        bench("plot", task, "--out", str(out))
    skipped = [str(w.message) for w in caught if str(w.message).startswith("bench plot")]
    assert not skipped, skipped
    return [Path(line) for line in capsys.readouterr().out.split()]


def assert_image(path: Path, min_w: int = 300, min_h: int = 100) -> None:
    """A PNG that decodes, has a sensible size and is not one flat colour."""
    from PIL import Image

    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.format == "PNG"
        w, h = im.size
        pixels = np.asarray(im.convert("RGB")).reshape(-1, 3)
    assert w >= min_w and h >= min_h, (path.name, w, h)
    # axes, text and markers give dozens of colours; a blank canvas gives one
    assert len(np.unique(pixels, axis=0)) > 16, path.name
    assert pixels.std() > 10, path.name


@pytest.fixture(scope="module")
def vae_board(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 3-trial TPE search, then one AE (ae-vs-vae's first point) at the best latent size."""
    out = tmp_path_factory.mktemp("plots") / "leaderboards"
    bench("run", "vae", "--trials", "3", "--quiet", "--out", str(out), *VAE_SMOKE)
    rows = leaderboard.read_trials(out, "vae")
    d = int(rows.sort_values("metric_val_elbo").iloc[-1]["param_latent_dim"])
    bench("run", "vae", "--variant", "ae-vs-vae", "--trials", "1", "--quiet", "--out", str(out),
          f"--set=latent_dim={d}", *VAE_SMOKE)
    return out


@needs_mnist
def test_vae_plot_writes_every_figure(vae_board: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    rows = leaderboard.read_trials(vae_board, "vae")
    assert set(rows["state"]) == {"COMPLETE"} and set(rows["param_model"]) == {"vae", "ae"}
    written = plot(capsys, "vae", vae_board)
    search = {p.name for p in written if p.parent == vae_board / "vae" / "plots" / "vae"}
    assert search == GENERIC | VAE_FIGURES
    variant = {p.name for p in written
               if p.parent == vae_board / "vae" / "plots" / "vae.ae-vs-vae"}
    assert "history.png" in variant and "vae_beta.png" not in variant, "one study a folder"
    for path in written:
        assert_image(path)


@needs_mnist
def test_a_selection_plots_only_its_study(vae_board: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    capsys.readouterr()
    bench("plot", "vae", "--out", str(vae_board), "--variant", "ae-vs-vae")
    variant = [Path(line) for line in capsys.readouterr().out.split()]
    bench("plot", "vae", "--out", str(vae_board), "--study", "vae")
    study = [Path(line) for line in capsys.readouterr().out.split()]
    assert {p.parent for p in variant} == {vae_board / "vae" / "plots" / "vae.ae-vs-vae"}
    assert {p.parent for p in study} == {vae_board / "vae" / "plots" / "vae"}
    assert "history.png" in {p.name for p in variant} & {p.name for p in study}


@needs_mnist
def test_vae_plot_picks_best_vae_and_matching_ae(vae_board: Path) -> None:
    rows = leaderboard.read_trials(vae_board, "vae")  # both studies: the AE is in the variant
    inp = plots.PlotInput("vae", vae_board, vae_board / "both", rows, None)
    inp.plot_dir.mkdir()
    best = vae_plots.best_row(inp, "vae")
    vaes = rows[rows["param_model"] == "vae"]
    assert best["metric_val_elbo"] == vaes["metric_val_elbo"].max()
    ae = vae_plots.best_row(inp, "ae", int(best["param_latent_dim"]))
    assert ae is not None and ae["param_latent_dim"] == best["param_latent_dim"]
    # with the AE row the strip has two image rows: taller than the VAE-only strip
    loaded = vae_plots.load_best(inp, best)
    inp.plot_dir = vae_board / "alone"
    inp.plot_dir.mkdir()
    [both] = vae_plots.plot_interpolation(inp, loaded, ae)
    both = both.rename(both.with_name("with_ae.png"))
    [alone] = vae_plots.plot_interpolation(inp, loaded, None)
    from PIL import Image

    with Image.open(alone) as a, Image.open(both) as b:
        assert b.size[1] > a.size[1]


@needs_mnist
def test_importances_cover_the_searched_params(vae_board: Path) -> None:
    rows = leaderboard.read_trials(vae_board, "vae", study="vae")
    imp = plots.importances("vae", rows[rows["state"] == "COMPLETE"], min_trials=3)
    assert set(imp) <= {"beta", "latent_dim", "lr", "depth"} and len(imp) >= 2
    assert "width" not in imp, "a --set key is not a searched parameter"
    assert sum(imp.values()) == pytest.approx(1.0)
    assert plots.importances("vae", rows) == {}  # fewer than 20 trials: no figure


def test_empty_leaderboard_plots_nothing(tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    """Nothing to plot is said, and exits 1 as `bench board` does (not a silent 0)."""
    capsys.readouterr()
    assert main(["plot", "vae", "--out", str(tmp_path / "empty")]) == 1
    assert "no trials of 'vae' under" in capsys.readouterr().err
    result = plots.make_plots("synthetic", tmp_path / "empty")
    assert result.paths == [] and result.no_rows
    assert not (tmp_path / "empty").exists()


def test_only_failed_trials_draw_history_only(tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "lb"
    bench("run", "synthetic", "--trials", "3", "--quiet", "--out", str(out),
          "--set=fail=exception")
    assert set(leaderboard.read_trials(out, "synthetic")["state"]) == {"FAIL"}
    written = plot(capsys, "synthetic", out)
    assert [p.name for p in written] == ["history.png"]
    assert_image(written[0])
    # a VAE leaderboard of FAIL rows has no metric columns: no sweep, no checkpoint figures
    rows = leaderboard.read_trials(out, "synthetic").assign(task="vae")
    inp = plots.PlotInput("vae", out, out / "vae_plots", rows, None)
    inp.plot_dir.mkdir()
    for hook in (vae_plots.plot_beta, vae_plots.plot_latent, vae_plots.plot_rate_distortion,
                 vae_plots.plot_best_model):
        assert hook(inp) == []


def test_generic_figures_for_another_task(tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "lb"
    bench("run", "synthetic", "--trials", "4", "--quiet", "--out", str(out))
    bench("run", "synthetic", "--trials", "1", "--quiet", "--out", str(out), "--study", "bad",
          "--set=fail=exception")
    written = plot(capsys, "synthetic", out)
    assert {(p.parent.name, p.name) for p in written} == {
        ("synthetic", "history.png"), ("synthetic", "curves.png"), ("bad", "history.png")}
    for path in written:
        assert_image(path)
    rows = leaderboard.read_trials(out, "synthetic", study="synthetic")
    assert set(plots.importances("synthetic", rows, min_trials=3)) == {"x", "y"}


def test_history_and_importances_from_mixed_rows(tmp_path: Path) -> None:
    """Rows in memory: PRUNED and FAIL beside COMPLETE; a constant objective has no importances."""
    import pandas as pd

    states = ["COMPLETE", "PRUNED", "COMPLETE", "FAIL", "COMPLETE", "COMPLETE"]
    rows = pd.DataFrame({
        "study": "s", "variant": "default", "direction": "minimize", "metric": "loss",
        "state": states,
        "trial_number": range(6), "trial_uid": [f"u{i}" for i in range(6)],
        "objective": [3.0, 5.0, 1.0, None, 2.0, 0.5],
        "param_x": [0.1, 0.5, -1.0, 0.0, 1.5, 1.0], "param_y": [1.0, 2.0, 0.0, 0.5, 2.5, 1.0]})
    inp = plots.PlotInput("synthetic", tmp_path, tmp_path, rows, None)
    [path] = plots.plot_history(inp)
    assert_image(path)
    assert set(plots.importances("synthetic", inp.complete(), min_trials=3)) == {"x", "y"}
    assert plots.importances("synthetic", inp.complete().assign(objective=1.0)) == {}


def test_history_axis_covers_failed_trials_too() -> None:
    """Failed trials have no objective and are drawn along the bottom edge (axes units);
    the trial axis still spans them, also when every trial failed."""
    from matplotlib.figure import Figure

    from bench.plots import _history_panel

    for states, objectives in ((["FAIL", "FAIL", "FAIL", "COMPLETE", "COMPLETE"],
                                [None, None, None, 480.0, 1.0]),
                               (["FAIL", "FAIL"], [None, None])):
        rows = pd.DataFrame({"trial_number": range(len(states)), "state": states,
                             "objective": objectives, "metric": "loss",
                             "direction": "minimize"})
        ax = Figure().subplots()
        _history_panel(ax, "synthetic", rows)
        lo, hi = ax.get_xlim()
        assert lo < 0 and hi > len(states) - 1, (lo, hi)
        labels = ax.get_legend_handles_labels()[1]
        assert ("complete" in labels) == ("COMPLETE" in states)
