from __future__ import annotations

import atexit
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = ROOT.parent / "shared" / "data"


def _session_data_root() -> Path:
    """A per-session data root: the read-only data sets (BENCH_DATA if set, else the shared
    folder beside the checkout) linked in, so data a task generates (the simulated brain
    cohort) is written here and never into the shared folder."""
    src = Path(os.environ.get("BENCH_DATA") or SHARED_DATA)
    root = Path(tempfile.mkdtemp(prefix="bench-data-"))
    atexit.register(shutil.rmtree, root, True)  # removes the links, not what they point to
    if src.is_dir():
        for entry in src.iterdir():
            if entry.name != "brain-sim":
                (root / entry.name).symlink_to(entry.resolve())
    return root


DATA_SOURCE = Path(os.environ.get("BENCH_DATA") or SHARED_DATA)
os.environ["BENCH_DATA"] = str(_session_data_root())
_CACHE = Path(tempfile.mkdtemp(prefix="bench-cache-"))  # downloads and generated data
atexit.register(shutil.rmtree, _CACHE, True)
os.environ["BENCH_CACHE"] = str(_CACHE)
os.environ.setdefault("BENCH_NO_DOWNLOAD", "1")
MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
               "t10k-labels-idx1-ubyte")


def has_mnist() -> bool:
    raw = Path(os.environ["BENCH_DATA"]) / "MNIST" / "raw"
    return all((raw / f).exists() for f in MNIST_FILES)


def pytest_report_header(config: pytest.Config) -> str:
    where = f"MNIST from {DATA_SOURCE / 'MNIST' / 'raw'}" if has_mnist() else (
        f"MNIST missing (looked in {DATA_SOURCE / 'MNIST' / 'raw'}): its tests "
        + ("FAIL (BENCH_REQUIRE_DATA=1)" if os.environ.get("BENCH_REQUIRE_DATA") else "skip"))
    return f"bench data: {where}; cache {_CACHE}"


def pytest_sessionstart(session: pytest.Session) -> None:
    """CI (BENCH_REQUIRE_DATA=1) must not skip the MNIST tests silently: stop instead."""
    if os.environ.get("BENCH_REQUIRE_DATA") and not has_mnist():
        pytest.exit(f"MNIST not found under {DATA_SOURCE / 'MNIST' / 'raw'} and "
                    "BENCH_REQUIRE_DATA=1: the MNIST tests would be skipped", returncode=1)


needs_mnist = pytest.mark.skipif(not has_mnist(), reason="MNIST not under $BENCH_DATA")


def bench_cli(*args: str, cwd: Path | None = None, env: dict | None = None,
              timeout: float = 600) -> subprocess.CompletedProcess:
    """Run the real `bench` entry point in a subprocess."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "bench.cli", *args], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def out(tmp_path: Path) -> Path:
    return tmp_path / "leaderboards"


@pytest.fixture(autouse=True)
def _fresh_signals() -> Iterator[None]:
    """`bench.cli.main` run in-process installs bench's signal handlers: undo them, and
    forget stop requests, after every test."""
    from bench import signals

    signals.reset()
    yield
    signals.reset()
    for sig in (signal.SIGTERM, signal.SIGUSR2):
        signal.signal(sig, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[None]:
    """A local Ray cluster of 2 CPUs for a module's tests (its BENCH_* variables passed on)."""
    ray = pytest.importorskip("ray")
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, object_store_memory=100 * 2**20,
                 log_to_driver=False, runtime_env={"env_vars": {
                     k: v for k, v in os.environ.items() if k.startswith("BENCH_")}})
    yield
    if started:
        ray.shutdown()
