"""A newcomer's first hour: the data folder is only ever read; every task (and every variant)
runs at its smoke budget; messages point to the next step."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from conftest import MNIST_FILES, bench_cli, has_mnist

from bench.registry import MissingExtraError, list_tasks
from bench.space import space_for


def read_only_copy(tmp_path: Path) -> Path:
    """A copy of the MNIST folder, every file and folder made read-only."""
    src = Path(os.environ["BENCH_DATA"]) / "MNIST" / "raw"
    data = tmp_path / "data"
    (data / "MNIST" / "raw").mkdir(parents=True)
    for name in MNIST_FILES:
        os.link(src / name, data / "MNIST" / "raw" / name) if _same_fs(src, data) else \
            shutil.copy(src / name, data / "MNIST" / "raw" / name)
    for path in [*data.rglob("*"), data]:
        path.chmod(path.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
    return data


def _same_fs(a: Path, b: Path) -> bool:
    return os.stat(a).st_dev == os.stat(b.parent if not b.exists() else b).st_dev


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in folder.rglob("*")}


def usable_tasks() -> list[str]:
    out = []
    for task in list_tasks():
        try:
            task.require_extra()
        except MissingExtraError:
            continue
        out.append(task.name)
    return out


@contextmanager
def read_only_mount(folder: Path) -> Iterator[None]:
    """Root ignores file modes: bind-mount the folder read-only over itself."""
    if os.geteuid() != 0:
        yield
        return
    if subprocess.run(["mount", "--bind", str(folder), str(folder)]).returncode != 0:
        pytest.skip("cannot bind-mount here")
    try:
        if subprocess.run(["mount", "-o", "remount,ro,bind", str(folder)]).returncode != 0:
            pytest.skip("cannot remount read-only here")
        yield
    finally:
        subprocess.run(["umount", str(folder)], check=False)


@pytest.mark.skipif(not has_mnist(), reason="MNIST not under $BENCH_DATA")
@pytest.mark.parametrize("name", usable_tasks())
def test_every_task_runs_its_smoke_budget_from_a_read_only_data_folder(
        name: str, tmp_path: Path) -> None:
    data = read_only_copy(tmp_path)
    before = snapshot(data)
    with read_only_mount(data):
        _smoke_run(name, tmp_path, data)
    assert snapshot(data) == before, "the data folder was written to"


def _smoke_run(name: str, tmp_path: Path, data: Path) -> None:
    cache = tmp_path / "cache"
    env = {"BENCH_DATA": str(data), "BENCH_CACHE": str(cache)}
    sets = [] if name in ("vae", "synthetic", "brain-age") else ["--set", "dataset=mnist"]
    res = bench_cli("run", name, "--smoke", "--trials", "1", "--out", str(tmp_path / "lb"),
                    "--quiet", *sets, env=env, cwd=tmp_path, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    if name == "brain-age":  # the simulated cohort is generated into the cache
        assert any(cache.rglob("metadata.csv"))


@pytest.mark.skipif(not has_mnist(), reason="MNIST not under $BENCH_DATA")
def test_every_variant_runs_with_smoke(tmp_path: Path) -> None:
    """Each shipped variant plans and runs one trial at the smoke budget (vae's, on CPU)."""
    space = space_for("vae")
    for variant in space.variants:
        res = bench_cli("run", "vae", "--variant", variant, "--smoke", "--trials", "1",
                        "--out", str(tmp_path / "lb"), "--quiet", timeout=600)
        assert res.returncode == 0, (variant, res.stderr[-2000:])


def test_a_missing_data_set_says_how_to_get_it_and_leaves_nothing(tmp_path: Path) -> None:
    empty, cache = tmp_path / "empty", tmp_path / "cache"
    empty.mkdir()
    res = bench_cli("run", "priors", "--out", str(tmp_path / "lb"), "--data-dir", str(empty),
                    env={"BENCH_CACHE": str(cache)})
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "fashion-mnist" in res.stderr and "download=True" in res.stderr
    assert "--set dataset=mnist" in res.stderr, "the offline way out is named"
    assert list(empty.iterdir()) == [] and not (tmp_path / "lb").exists()


def test_a_failed_download_leaves_no_folder_behind(tmp_path: Path) -> None:
    """No network here: torchvision's download fails; the cache holds nothing afterwards."""
    empty, cache = tmp_path / "empty", tmp_path / "cache"
    empty.mkdir()
    env = {**os.environ, "BENCH_CACHE": str(cache), "BENCH_DATA": str(empty)}
    env.pop("BENCH_NO_DOWNLOAD", None)
    code = ("from bench.data import load_images\n"
            "try:\n    load_images('fashion-mnist', True)\nexcept Exception as e:\n"
            "    print(type(e).__name__)\n")
    out = subprocess.run([__import__("sys").executable, "-c", code], env=env,
                         capture_output=True, text=True, timeout=300)
    assert "DataError" in out.stdout, out.stderr[-2000:]
    assert list(empty.iterdir()) == []
    leftovers = [p for p in cache.rglob("*") if p.is_file()] if cache.exists() else []
    assert leftovers == [], leftovers


def test_list_and_help_point_the_way() -> None:
    res = bench_cli("list")
    assert res.returncode == 0
    assert "needs: pip install" not in res.stdout  # every extra is installed here
    code = ("import sys; sys.modules['nilearn'] = None  # as if not installed\n"
            "from bench.cli import main; main(['list'])")
    hidden = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert "needs: pip install -e '.[brain]' (nilearn not installed)" in hidden.stdout
    assert "param epochs: int [20, 80] step 10" in res.stdout  # the YAML's step
    assert "variant prior-comparison:" in res.stdout and "data: fashion-mnist" in res.stdout
    res = bench_cli("run", "--help")
    assert "--smoke" in res.stdout and "--add N" in res.stdout
