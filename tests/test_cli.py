"""The `bench` command line: bad input exits 2 with every problem and writes nothing;
an end-to-end run, board and plot read back what they wrote."""

from __future__ import annotations

import json
from io import StringIO
from pathlib import Path

import pandas as pd
import pytest
from conftest import bench_cli, needs_mnist

from bench import leaderboard

SMOKE = ["--set", "epochs=1", "--set", "train_size=256", "--set", "val_size=128",
         "--set", "test_size=64", "--set", "iwae_k=4", "--set", "width=8"]


def test_list_shows_tasks_spaces_and_variants() -> None:
    res = bench_cli("list")
    assert res.returncode == 0, res.stderr
    assert "vae: Convolutional VAE/AE" in res.stdout
    assert "variant beta-sweep: rate-distortion trade-off" in res.stdout
    assert "grid {'beta': [0.0, 0.0001" in res.stdout and "data: mnist" in res.stdout
    assert "objective: maximize val_elbo" in res.stdout
    assert "param depth: int [1, 3]" in res.stdout, "integer ranges print as integers"
    one = bench_cli("list", "vae")  # one task: every parameter --set takes
    assert one.returncode == 0 and "brain-age" not in one.stdout
    assert "latent_dim = 16: an integer >= 1 and <= 4096" in one.stdout
    assert "iwae_k* = 200: an integer >= 1" in one.stdout
    assert bench_cli("list", "vea").returncode == 2


def test_help_is_a_users_summary_and_loads_no_search_stack() -> None:
    res = bench_cli("--help")
    assert res.returncode == 0 and "bench run vae --smoke" in res.stdout
    import subprocess
    import sys

    code = ("import sys; from bench.cli import main; main(['list']); main(['validate']); "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'optuna', 'ray', 'torch'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]", "task declarations import no torch"


def test_validate_shipped_spaces() -> None:
    res = bench_cli("validate")
    assert res.returncode == 0, res.stderr
    assert "ok: " in res.stdout and "vae.yaml" in res.stdout


def test_validate_lists_every_error_and_exits_2(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("task: vae\nparams:\n  beta: {type: float, low: 10, high: 1}\n"
                   "  lr: {type: float, low: 0, high: 1, log: true}\nfixed: {colour: 1}\n")
    res = bench_cli("validate", str(bad), "--set", "epochz=3")
    assert res.returncode == 2
    assert "Traceback" not in res.stderr
    for text in (f"{bad}: params.beta: `low <= high` must hold, got low=10, high=1",
                 f"{bad}: params.lr: `log: true` needs `low > 0`, got low=0",
                 f"{bad}: fixed.colour: `colour` is not a parameter of task 'vae'",
                 "--set epochz: `epochz` is not a parameter of task 'vae'"):
        assert text in res.stderr, res.stderr


def test_validate_set_checks_each_grid_point_as_a_run_would(tmp_path: Path) -> None:
    """`bench validate FILE --set k=v` refuses what `bench run --variant V --set k=v` would:
    a grid point that breaks a cross-parameter rule once the override is applied."""
    space = tmp_path / "grid.yaml"
    space.write_text("task: vae\nvariants:\n  archs:\n    grid: {arch: [conv, lrelu16]}\n")
    assert bench_cli("validate", str(space), "--set", "dataset=mnist").returncode == 0
    res = bench_cli("validate", str(space), "--set", "dataset=cifar10")
    assert res.returncode == 2, res.stdout
    assert res.stderr.count("variants.archs with --set: arch: lrelu16 is built for 28x28") == 1
    run = bench_cli("run", "vae", "--space", str(space), "--variant", "archs", "--set",
                    "dataset=cifar10", "--out", str(tmp_path / "lb"))
    assert run.returncode == 2 and "arch: lrelu16 is built for 28x28" in run.stderr


@pytest.mark.parametrize("args, message", [
    (["run", "nope"], "unknown task 'nope'; known tasks:"),
    (["run", "vae", "--set", "betta=1", "--set", "epochs=x"], "`betta` is not a parameter"),
    (["run", "vae", "--variant", "nope"], "unknown variant 'nope'; known variants: beta-sweep"),
    (["run", "vea"], "unknown task 'vea'; did you mean `vae`? known tasks:"),
    (["run", "VAE"], "unknown task 'VAE'; did you mean `vae`? known tasks:"),
    (["run", "vae", "--variant", "beta-swep"],
     "unknown variant 'beta-swep'; did you mean `beta-sweep`? known variants: beta-sweep"),
    (["run", "vae", "--set", "model=gan", "--set", "beta=-1"],
     "--set model=gan: must be one of vae, ae, got 'gan'"),
    (["run", "synthetic", "--trials", "-1"], "--trials: must be in [0, 100000], got -1"),
    (["run", "synthetic", "--sampler", "tpee"], "--sampler: must be one of tpe, random"),
    (["run", "synthetic", "--study", "../x"], "--study: must be 1-100 characters"),
    (["run", "synthetic", "--device", "tpu"],
     "--device: must be auto, cpu, cuda, cuda:N or mps, got 'tpu'"),
    (["run", "synthetic", "--device", "cuda:99"], "--device: cuda:99: "),
    (["run", "vae", "--smoke", "--set", "model=ae"], "the objective val_elbo is reported "
     "only with model=vae; here model='ae'"),
    (["run", "vae", "--variant", "beta-sweep", "--set", "likelihood=mse"],
     "parameters: the objective val_elbo is reported only with likelihood=bernoulli|gaussian"),
    (["run", "synthetic", "--set", "noise=" + "9" * 5000],
     "--set noise=999999999999999999999999999999999999999999999999999999999999... (5,000 "
     "characters): must be a number >= 0"),
])
def test_bad_run_input_exits_2_and_writes_nothing(tmp_path: Path, args, message) -> None:
    out = tmp_path / "lb"
    res = bench_cli(*args, "--out", str(out))
    assert res.returncode == 2, res.stderr
    assert message in res.stderr and "Traceback" not in res.stderr
    assert not out.exists()


@pytest.mark.parametrize("task", ["priors", "simsiam"])
def test_a_missing_default_data_set_exits_2_before_a_run(tmp_path: Path, task: str) -> None:
    out = tmp_path / "lb"
    res = bench_cli("run", task, "--out", str(out), "--data-dir", str(tmp_path))
    assert res.returncode == 2 and "not found: looked in" in res.stderr, res.stderr
    assert not out.exists()


def test_missing_data_exits_2_naming_where_it_looked(tmp_path: Path) -> None:
    out, empty = tmp_path / "lb", tmp_path / "nodata"
    empty.mkdir()
    res = bench_cli("run", "vae", "--out", str(out), "--data-dir", str(empty), *SMOKE)
    assert res.returncode == 2
    assert f"looked in {empty / 'MNIST' / 'raw'}" in res.stderr
    assert "BENCH_DATA" in res.stderr and "Traceback" not in res.stderr
    assert not out.exists()


def test_every_bad_value_is_listed_within_seconds_before_any_data(tmp_path: Path) -> None:
    import time

    out = tmp_path / "lb"
    t0 = time.time()
    res = bench_cli("run", "vae", "--out", str(out), "--data-dir", str(tmp_path / "nodata"),
                    "--set", "epochs=-1", "--set", "lr=-0.1", "--set", "batch_size=0",
                    "--set", "width=0", "--set", "train_size=-5")
    assert time.time() - t0 < 30
    assert res.returncode == 2 and "Traceback" not in res.stderr
    for key in ("epochs=-1", "lr=-0.1", "batch_size=0", "width=0", "train_size=-5"):
        assert f"--set {key}: must be" in res.stderr, res.stderr
    assert "not found" not in res.stderr, "values are checked before the data"
    assert not out.exists()


def test_a_search_whose_fixed_values_break_a_rule_exits_2_before_a_run(tmp_path: Path) -> None:
    out = tmp_path / "lb"  # the default space searches 17 parameters, not these two
    res = bench_cli("run", "brain-age", "--out", str(out), "--smoke", "--set", "moments=2",
                    "--set", "normalize=none")
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "every point of the searched space" in res.stderr, res.stderr
    assert "moments: powers of an intensity need a normalised image" in res.stderr
    assert not out.exists()


def test_a_missing_optional_stack_names_its_extra(tmp_path: Path) -> None:
    fake = tmp_path / "site" / "nibabel"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('No module named nibabel')\n")
    res = bench_cli("run", "brain-age", "--smoke", "--out", str(tmp_path / "lb"),
                    env={"PYTHONPATH": str(tmp_path / "site")})
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    assert "needs nibabel" in res.stderr and "pip install -e '.[brain]'" in res.stderr


@needs_mnist
def test_run_board_plot_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "lb"
    res = bench_cli("run", "vae", "--trials", "3", "--out", str(out), "--sampler", "random",
                    "--pruner", "none", *SMOKE)
    assert res.returncode == 0, res.stderr
    assert "3 COMPLETE, 0 PRUNED, 0 FAIL" in res.stdout
    assert "top configurations (maximize val_elbo)" in res.stdout
    assert f"bench eval vae --study vae --top 3 --out {out}" in res.stdout
    assert (out / "vae" / "optuna.db").exists()

    rows = leaderboard.read_trials(out, "vae")
    assert len(rows) == 3 and (rows["state"] == "COMPLETE").all()
    for col in ("param_beta", "param_latent_dim", "metric_val_elbo", "metric_val_active_units",
                "peak_mem_gb", "git_sha", "torch_version", "host"):
        assert col in rows.columns, col
    assert rows["metric_test_iwae_ll"].isna().all(), "a search never touches the test set"
    assert (rows["metric_val_elbo"] == rows["objective"]).all()
    curves = leaderboard.read_curves(out, "vae")
    assert set(curves["metric"]) >= {"val_elbo", "val_recon", "val_kl", "train_loss"}
    import torch

    from bench.lifecycle import load_state

    for _, r in rows.iterrows():  # each checkpoint is the trial's own model
        blob = load_state(out / "vae" / "artifacts" / r["trial_uid"] / "checkpoint.pt")
        assert blob["trial"]["model"]["decoder.fc.weight"].shape[1] == r["param_latent_dim"]
        assert "opt" not in blob["trial"], "no optimiser moments in a final checkpoint"
        assert torch.load(out / "vae" / "artifacts" / r["trial_uid"] / "checkpoint.pt",
                          weights_only=True)

    ev = bench_cli("eval", "vae", "--out", str(out), "--top", "2", "--set", "iwae_k=4")
    assert ev.returncode == 0, ev.stderr
    said = ev.stdout.splitlines()  # each trial announced before its (long) test pass
    assert said.index(next(x for x in said if x.startswith("[1/2] evaluating trial"))) < \
        said.index(next(x for x in said if x.startswith("[1/2] trial")))
    rows = leaderboard.read_trials(out, "vae")
    done = rows.dropna(subset=["metric_test_iwae_ll"])
    assert len(done) == 2 and done["evaluated_at"].notna().all()
    assert (done["metric_test_iwae_ll"] >= done["metric_test_elbo"] - 1.0).all()
    assert set(done["objective"]) == set(rows["objective"].nlargest(2))
    assert json.loads(done["eval_params"].iloc[0]) == {"iwae_k": 4}
    bad = bench_cli("eval", "vae", "--out", str(out), "--study", "nosuch")
    assert bad.returncode == 2 and "known: vae" in bad.stderr
    bad = bench_cli("eval", "vae", "--out", str(out), "--set", "latent_dim=5")
    assert bad.returncode == 2 and "evaluation parameters only" in bad.stderr, bad.stderr
    lost = done["trial_uid"].iloc[0]  # a finalist whose checkpoint is gone: the other goes on
    (out / "vae" / "artifacts" / lost / "checkpoint.pt").unlink()
    ev = bench_cli("eval", "vae", "--out", str(out), "--top", "2", "--set", "iwae_k=4")
    assert ev.returncode == 1 and f"trial {lost} not evaluated" in ev.stdout, ev.stdout
    assert "1 of 2 trial(s) not evaluated (1 were)" in ev.stderr

    formats = {f: bench_cli("board", "vae", "--out", str(out), "--format", f)
               for f in ("table", "csv", "markdown", "json")}
    assert all(r.returncode == 0 for r in formats.values())
    csv = pd.read_csv(StringIO(formats["csv"].stdout))
    best = rows["objective"].max()
    assert csv["mean"].iloc[0] == pytest.approx(best) and len(csv) == 3
    assert (csv["study"] == "vae").all() and (csv["metric"] == "val_elbo").all()
    records = json.loads(formats["json"].stdout)
    assert [r["rank"] for r in records] == [1, 2, 3]
    md = formats["markdown"].stdout
    assert md.startswith("### study 'vae' (search; maximize val_elbo") and "\n| " in md
    top = bench_cli("board", "vae", "--out", str(out), "--top", "1", "--format", "csv")
    assert len(pd.read_csv(StringIO(top.stdout))) == 1

    plot = bench_cli("plot", "vae", "--out", str(out))
    assert plot.returncode == 0, plot.stderr
    pngs = [Path(p) for p in plot.stdout.split()]
    assert pngs and all(p.suffix == ".png" and p.parent == out / "vae" / "plots" / "vae"
                        for p in pngs)  # one folder per study
    from PIL import Image

    for p in pngs:
        with Image.open(p) as im:
            lo, hi = im.convert("L").getextrema()
            assert im.size[0] > 200 and hi - lo > 50, f"{p} is blank"


def test_fixing_a_grid_axis_with_set_is_said(tmp_path: Path) -> None:
    res = bench_cli("run", "synthetic", "--variant", "grid", "--set", "x=0.5", "--quiet",
                    "--out", str(tmp_path / "lb"))
    assert res.returncode == 0, res.stderr
    assert "note: --set x fixes the variant's grid axis 'x'" in res.stderr


def test_a_task_without_test_metrics_is_not_offered_an_evaluation(tmp_path: Path) -> None:
    out = tmp_path / "lb"
    res = bench_cli("run", "synthetic", "--trials", "1", "--eval-top", "1", "--out", str(out))
    assert res.returncode == 2 and "has no test-set metrics" in res.stderr
    assert not out.exists()
    res = bench_cli("run", "synthetic", "--trials", "1", "--out", str(out))
    assert res.returncode == 0 and "bench eval" not in res.stdout
    res = bench_cli("eval", "synthetic", "--out", str(out))
    assert res.returncode == 2 and "has no test-set metrics" in res.stderr


def test_board_without_rows_says_so(tmp_path: Path) -> None:
    res = bench_cli("board", "vae", "--out", str(tmp_path))
    assert res.returncode == 1 and "no trials of 'vae'" in res.stderr
    assert "bench run vae --out" in res.stderr


def test_a_space_file_that_is_not_text_or_holds_a_huge_number_exits_2(tmp_path: Path) -> None:
    binary = tmp_path / "bin.yaml"
    binary.write_bytes(b"\xff\xfe garbage")
    huge = tmp_path / "huge.yaml"
    huge.write_text("task: synthetic\nparams:\n  x: {type: float, low: " + "9" * 5000
                    + ", high: 2}\n")
    for path, message in ((binary, "not a YAML text file: byte 0 is not UTF-8"),
                          (huge, "invalid value: Exceeds the limit (4300 digits)")):
        for args in (["validate", str(path)], ["run", "synthetic", "--space", str(path),
                                               "--out", str(tmp_path / "lb")]):
            res = bench_cli(*args)
            assert res.returncode == 2 and f"{path}: {message}" in res.stderr, res.stderr
            assert "Traceback" not in res.stderr and len(res.stderr) < 400
    assert not (tmp_path / "lb").exists()


def test_an_unusable_out_path_exits_2_without_advice_about_studies(tmp_path: Path) -> None:
    afile = tmp_path / "afile"
    afile.write_text("not a folder")
    for args in (["board", "synthetic"], ["run", "synthetic", "--trials", "1"]):
        res = bench_cli(*args, "--out", str(afile))
        assert res.returncode == 2, res.stderr
        assert "Not a directory" in res.stderr and "repairs" not in res.stderr
    res = bench_cli("run", "synthetic", "--trials", "1", "--out", str(tmp_path / ("a" * 300)))
    assert res.returncode == 2 and "File name too long" in res.stderr, res.stderr
