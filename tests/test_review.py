"""Reviewing results: a board that ranks within one study at a time, paired comparisons,
the HTML report in a real headless browser, the leaderboard folder in the readers users
reach for, and the study as optuna-dashboard shows it."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import optuna
import pandas as pd
import pytest
from conftest import bench_cli

from bench import board, compare, leaderboard
from bench.cli import main
from bench.registry import get_task


def run(out: Path, *args: str) -> int:
    return main(["run", "synthetic", "--out", str(out), "--quiet", *args])


@pytest.fixture(scope="module")
def two_studies(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A search minimising loss and a grid variant (6 points x 2 seeds); and a study that
    maximises `distance` under the same task, which must never be ranked with the others."""
    out = tmp_path_factory.mktemp("review") / "lb"
    assert run(out, "--trials", "6", "--pruner", "none", "--sampler", "random") == 0
    assert run(out, "--variant", "grid", "--set", "noise=20") == 0
    space = out.parent / "max.yaml"
    space.write_text("task: synthetic\nmetric: distance\ndirection: maximize\nparams:\n"
                     "  x: {type: float, low: -2, high: 2}\n  epochs: {type: int, low: 1, "
                     "high: 3}\n")
    assert run(out, "--space", str(space), "--study", "far", "--trials", "4") == 0
    return out


def test_board_ranks_each_study_by_its_own_metric_and_direction(two_studies: Path) -> None:
    task = get_task("synthetic")
    secs = {s.study: s for s in board.sections(leaderboard.read_trials(two_studies,
                                                                       "synthetic"), task)}
    assert set(secs) == {"synthetic", "synthetic.grid", "far"}
    far, search = secs["far"], secs["synthetic"]
    assert (far.metric, far.direction) == ("distance", "maximize")
    assert far.table["mean"].is_monotonic_decreasing
    assert (search.metric, search.direction) == ("loss", "minimize")
    assert search.table["mean"].is_monotonic_increasing
    assert set(far.params) == {"param_x", "param_epochs"}, "only what varies in the study"
    grid = secs["synthetic.grid"]
    assert len(grid.table) == 6 and set(grid.table["n"]) == {2}
    text = bench_cli("board", "synthetic", "--out", str(two_studies)).stdout
    assert text.count("study '") == 3
    far_text = text[text.index("study 'far'"):text.index("study 'synthetic'")]
    assert "±" not in far_text, "n = 1 shows no spread"
    lines = [line.split() for line in far_text.splitlines()[1:] if line.strip()]
    col = lines[0].index("epochs")
    epochs = [cells[col] for cells in lines[1:]]
    assert epochs and all(e.isdigit() for e in epochs), f"ints print as ints: {epochs}"
    assert "±" in text[text.index("study 'synthetic.grid'"):]


def test_board_formats_and_typos(two_studies: Path) -> None:
    out = str(two_studies)
    res = bench_cli("board", "synthetic", "--out", out, "--format", "json", "--variant", "grid")
    records = json.loads(res.stdout)
    assert len(records) == 6 and {r["study"] for r in records} == {"synthetic.grid"}
    r0 = records[0]
    assert {"study", "metric", "direction", "n", "mean", "std", "params"} <= set(r0)
    assert r0["metric"] == "loss" and r0["n"] == 2 and set(r0["params"]) == {"x", "y"}
    csv = pd.read_csv(__import__("io").StringIO(bench_cli(
        "board", "synthetic", "--out", out, "--format", "csv").stdout))
    assert set(csv["study"]) == {"synthetic", "synthetic.grid", "far"}
    md = bench_cli("board", "synthetic", "--out", out, "--format", "markdown").stdout
    assert md.count("### study") == 3
    both = bench_cli("board", "synthetic", "--out", out, "--study", "synthetic", "--metrics",
                     "distance", "--metrics", "loss")  # repeated: both are shown
    one = bench_cli("board", "synthetic", "--out", out, "--study", "synthetic", "--metrics",
                    "distance,loss")
    assert both.returncode == 0 and "distance" in both.stdout and both.stdout == one.stdout
    for args, known in ((["--study", "nope"], "known: far, synthetic, synthetic.grid"),
                        (["--variant", "nope"], "known: default, grid")):
        bad = bench_cli("board", "synthetic", "--out", out, *args)
        assert bad.returncode == 2 and known in bad.stderr
    bad = bench_cli("board", "synthetic", "--out", out, "--study", "synthetic.gird")
    assert bad.returncode == 2 and "did you mean `synthetic.grid`" in bad.stderr
    bad = bench_cli("board", "synthetic", "--out", out, "--metrics", "distanse")
    assert bad.returncode == 2 and "did you mean `distance`? known:" in bad.stderr
    bad = bench_cli("board", "synthetc", "--out", out)
    assert bad.returncode == 2 and "did you mean `synthetic`? known tasks" in bad.stderr


def test_holm_and_the_paired_test_choice() -> None:
    # Holm (1979): sorted p 0.01, 0.02, 0.03 with m=3 -> 0.03, 0.04, 0.04 (monotone)
    assert compare.holm([0.03, 0.01, 0.02]) == pytest.approx([0.04, 0.03, 0.04])
    rng = np.random.default_rng(0)
    small = rng.normal(1.0, 0.1, 4)
    assert compare.paired(small)[3] == "paired t"
    big = rng.normal(1.0, 0.1, 8)
    mean, low, high, test, p = compare.paired(big)
    assert test == "wilcoxon" and low < mean < high and p < 0.05


def test_compare_a_variant_and_draw_its_critical_differences(two_studies: Path) -> None:
    res = bench_cli("compare", "synthetic", "--variant", "grid", "--out", str(two_studies))
    assert res.returncode == 0, res.stderr
    assert "paired t" in res.stdout and "p (Holm)" in res.stdout
    assert "Friedman over 2 shared seeds" in res.stdout
    png = two_studies / "synthetic" / "plots" / "synthetic.grid" / "critical_difference.png"
    assert png.exists()
    from PIL import Image

    with Image.open(png) as im:
        lo, hi = im.convert("L").getextrema()
        assert im.size[0] > 400 and hi - lo > 100
    data = json.loads(bench_cli("compare", "synthetic", "--variant", "grid", "--out",
                                str(two_studies), "--format", "json").stdout)
    assert len(data["comparisons"]) == 5 and data["direction"] == "minimize"
    assert all(c["pairs"] == 2 for c in data["comparisons"])
    bad = bench_cli("compare", "synthetic", "--study", "nosuch", "--out", str(two_studies))
    assert bad.returncode == 2 and "known:" in bad.stderr


def test_the_leaderboard_folder_reads_in_pandas_pyarrow_and_duckdb(two_studies: Path) -> None:
    folder = two_studies / "synthetic" / "trials"
    n = len(list(folder.glob("*.parquet")))
    df = pd.read_parquet(folder)
    assert len(df) == n and df["seed"].dtype == "int64"
    import pyarrow.dataset as ds

    assert ds.dataset(folder, format="parquet").to_table().num_rows == n
    duckdb = pytest.importorskip("duckdb")
    rows = duckdb.sql(f"SELECT study, count(*) AS n FROM read_parquet('{folder}/*.parquet') "
                      "GROUP BY study ORDER BY study").fetchall()
    assert dict(rows) == {"far": 4, "synthetic": 6, "synthetic.grid": 12}


def test_an_older_file_without_a_later_column_reads_as_the_readme_says(
        two_studies: Path, tmp_path: Path) -> None:
    """A file from before a metric was declared lacks its column: the README's three ways
    read the folder with the column, null for that file (pandas alone would drop it)."""
    import pyarrow.parquet as pq

    from bench.registry import get_task

    folder = tmp_path / "trials"
    shutil.copytree(two_studies / "synthetic" / "trials", folder)
    newest = sorted(folder.glob("*.parquet"))[0]
    old = pq.read_table(newest).drop_columns(["metric_distance"])
    pq.write_table(old, folder / "000-older.parquet")  # listed first
    newest.unlink()
    n = len(list(folder.glob("*.parquet")))
    assert "metric_distance" not in pd.read_parquet(folder).columns  # the trap
    df = pd.read_parquet(folder, schema=leaderboard.task_schema(get_task("synthetic")))
    assert len(df) == n and df["metric_distance"].isna().sum() == 1
    duckdb = pytest.importorskip("duckdb")
    nulls = duckdb.sql(f"SELECT count(*) FROM read_parquet('{folder}/*.parquet', "
                       "union_by_name=true) WHERE metric_distance IS NULL").fetchall()
    assert nulls == [(1,)]
    shutil.copytree(folder, tmp_path / "lb" / "synthetic" / "trials")
    rows = leaderboard.read_trials(tmp_path / "lb", "synthetic")
    assert len(rows) == n and rows["metric_distance"].isna().sum() == 1


def test_a_file_with_conflicting_columns_is_named_and_skipped(tmp_path: Path) -> None:
    out = tmp_path / "lb"
    assert run(out, "--trials", "2") == 0
    bad = out / "synthetic" / "trials" / "zz-foreign.parquet"
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"task": ["synthetic"], "seed": ["not a number"]}), bad)
    with pytest.warns(UserWarning, match="zz-foreign.parquet: leaderboard file skipped: its "
                      "columns conflict"):
        rows = leaderboard.read_trials(out, "synthetic")
    assert len(rows) == 2


def test_optuna_dashboard_sees_metrics_overrides_uids_and_fail_reasons(tmp_path: Path) -> None:
    serializer = pytest.importorskip("optuna_dashboard._serializer")
    out = tmp_path / "lb"
    assert run(out, "--trials", "2", "--set", "noise=0.5") == 0
    assert run(out, "--study", "failing", "--trials", "1", "--set", "fail=exception") == 1
    storage = optuna.storages.RDBStorage(f"sqlite:///{out}/synthetic/optuna.db")
    rows = leaderboard.read_trials(out, "synthetic").set_index(["study", "trial_number"])
    shown = {}
    for study in storage.get_all_studies():  # as the dashboard lists studies
        trials = storage.get_all_trials(study._study_id)
        for t in trials:
            attrs = {a["key"]: a["value"] for a in serializer.serialize_frozen_trial(
                study._study_id, t, {})["user_attrs"]}
            ident = json.loads(attrs["bench"])
            assert ident["uid"] == rows.loc[(study.study_name, t.number), "trial_uid"]
            shown[study.study_name, t.number] = attrs, ident["overrides"]
    assert sorted(shown) == [("failing", 0), ("synthetic", 0), ("synthetic", 1)]
    assert shown["synthetic", 0][1] == {"noise": 0.5}
    assert shown["failing", 0][1] == {"fail": "exception"}
    assert float(shown["synthetic", 0][0]["metric_loss"]) == pytest.approx(
        rows.loc[("synthetic", 0), "metric_loss"])
    assert "injected failure" in json.loads(shown["failing", 0][0]["bench_result"])["error"]


def test_plot_draws_one_study_per_folder_and_refuses_typos(two_studies: Path) -> None:
    res = bench_cli("plot", "synthetic", "--out", str(two_studies))
    assert res.returncode == 0, res.stderr
    folders = {Path(p).parent.name for p in res.stdout.split()}
    assert folders == {"synthetic", "synthetic.grid", "far"}
    assert "parameter importances need 20 complete trials" in res.stderr
    bad = bench_cli("plot", "synthetic", "--variant", "nosuch", "--out", str(two_studies))
    assert bad.returncode == 2 and "known: default, grid" in bad.stderr
    assert not (two_studies / "synthetic" / "plots" / "nosuch").exists()


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--no-first-run", "--disable-sync"]


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium (apt-get install chromium)")
def test_the_report_renders_in_a_headless_browser(two_studies: Path, tmp_path: Path) -> None:
    res = bench_cli("report", "synthetic", "--out", str(two_studies))
    assert res.returncode == 0, res.stderr
    page = Path(res.stdout.strip())
    text = page.read_text()
    assert text.count("<table") >= 4 and "src=\"data:image/png;base64," in text
    assert "http://" not in text and "https://" not in text, "self-contained"
    dom = subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={tmp_path / 'u1'}",
                          "--virtual-time-budget=5000", "--dump-dom", page.as_uri()],
                         capture_output=True, text=True, timeout=120).stdout
    assert 'data-images-ok="yes"' in dom, "every image decodes in the browser"
    assert "study 'synthetic.grid'" in dom and "Is the difference real?" in dom
    shot = tmp_path / "report.png"
    subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={tmp_path / 'u2'}",
                    "--window-size=1200,1600", f"--screenshot={shot}", page.as_uri()],
                   capture_output=True, timeout=120)
    from PIL import Image

    with Image.open(shot) as im:
        grey = np.asarray(im.convert("L"), dtype=float)
    assert grey.shape == (1600, 1200)
    assert (grey < 128).mean() > 0.01, "the screenshot shows text and figures, not a blank"


def test_a_one_configuration_study_says_which_configuration_it_is(tmp_path: Path) -> None:
    out = tmp_path / "lb"
    assert run(out, "--trials", "1", "--set", "noise=0.25") == 0
    shown = bench_cli("board", "synthetic", "--out", str(out)).stdout.splitlines()
    header = shown[1].split()
    assert header[:3] == ["rank", "loss", "n"] and {"x", "y", "noise"} <= set(header), shown
    assert "epochs" not in header, "a default value is not shown"


def test_board_shows_n_a_for_a_parameter_without_effect_in_its_configuration() -> None:
    """brain-age's kr_alpha acts only with regressor=kernel_ridge: the board prints n/a for
    the mlp configurations' sampled kr_alpha instead of a value that did nothing."""
    done = pd.DataFrame({"config_hash": ["a", "b", "a"], "param_regressor":
                         ["mlp", "kernel_ridge", "mlp"], "param_kr_alpha": [0.5, 0.02, 0.5],
                         "param_mode": ["independent"] * 3, "param_model": ["bottleneck"] * 3})
    table = pd.DataFrame({"rank": [1, 2], "config_hash": ["a", "b"], "mean": [1.0, 2.0],
                          "std": [None, None], "n": [2, 1], "param_regressor": ["mlp",
                          "kernel_ridge"], "param_kr_alpha": [0.5, 0.02]})
    sec = board.Section("s", "u", "v", "val_mae", "minimize", "years", {}, table,
                        ["param_regressor", "param_kr_alpha"], done=done)
    shown = board.display_table(sec, get_task("brain-age"))
    assert shown["kr_alpha"].tolist() == ["n/a", "0.02"]
    assert shown["regressor"].tolist() == ["mlp", "kernel_ridge"]
    done["param_regressor"] = [None, "kernel_ridge", None]  # a row from before the column:
    assert board.display_table(sec, get_task("brain-age"))["kr_alpha"].tolist() == [
        "0.5", "0.02"]  # no value, so nothing known to make kr_alpha idle
    done["param_regressor"] = ["mlp", "kernel_ridge", "mlp"]
    done["param_model"] = "direct"  # no regressor at all: both n/a
    assert board.display_table(sec, get_task("brain-age"))["regressor"].tolist() == [
        "n/a", "n/a"]


def test_a_study_whose_trials_all_failed_leaves_the_board_readable(tmp_path: Path) -> None:
    """One all-FAIL study among others: every board format, the report and compare still
    answer (the study says it has no COMPLETE trial); JSON is strict JSON (no NaN)."""
    out = tmp_path / "lb"
    assert run(out, "--study", "allf", "--trials", "2", "--set", "fail=nan",
               "--set", "fail_at=3") == 1
    assert run(out, "--study", "ok", "--trials", "2") == 0
    table = bench_cli("board", "synthetic", "--out", str(out))
    assert table.returncode == 0, table.stderr
    allf = table.stdout[table.stdout.index("study 'allf'"):table.stdout.index("study 'ok'")]
    assert "2 FAIL" in allf and "no COMPLETE trial yet" in allf
    md = bench_cli("board", "synthetic", "--out", str(out), "--format", "markdown")
    assert md.returncode == 0 and "no COMPLETE trial yet" in md.stdout, md.stderr
    js = bench_cli("board", "synthetic", "--out", str(out), "--format", "json")
    assert js.returncode == 0, js.stderr

    def strict(constant: str) -> None:
        raise ValueError(f"not JSON: {constant}")

    records = json.loads(js.stdout, parse_constant=strict)
    assert [r["study"] for r in records] == ["ok", "ok"]
    assert all(r["std"] is None and r["metrics"]["loss"]["std"] is None for r in records)
    csv = bench_cli("board", "synthetic", "--out", str(out), "--format", "csv")
    assert csv.returncode == 0, csv.stderr  # ranks stay integers beside the empty study
    import io

    ranks = pd.read_csv(io.StringIO(csv.stdout))["rank"]
    assert ranks.tolist() == [1, 2] and ranks.dtype == np.int64, csv.stdout
    report = bench_cli("report", "synthetic", "--out", str(out))
    assert report.returncode == 0 and (out / "synthetic" / "report.html").exists()
    cmp = bench_cli("compare", "synthetic", "--out", str(out), "--study", "allf")
    assert cmp.returncode == 2 and "the study has 2 FAIL" in cmp.stderr, cmp.stderr


def test_board_says_when_test_metrics_come_from_different_eval_settings() -> None:
    done = pd.DataFrame({"config_hash": ["a", "b", "c"], "metric_test_iwae_ll": [-384.2, -90.1,
                         None], "eval_params": ['{"iwae_k": 5}', "{}", None]})
    table = pd.DataFrame({"rank": [1, 2, 3], "config_hash": ["a", "b", "c"],
                          "mean": [1.0, 2.0, 3.0], "std": [None] * 3, "n": [1, 1, 1]})
    sec = board.Section("s", "u", "v", "val_elbo", "maximize", "nats", {}, table, [],
                        done=done)
    note = board.eval_settings_note(sec, ["test_iwae_ll"])
    assert "rank 1: iwae_k=5" in note and "rank 2: the trials' own settings" in note
    assert board.eval_settings_note(sec, ["val_elbo"]) == ""  # not a test metric
    done["eval_params"] = ["{}", "{}", None]
    assert board.eval_settings_note(sec, ["test_iwae_ll"]) == ""  # one setting: no note
