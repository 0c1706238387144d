from __future__ import annotations

import atexit
import os
import shutil
import subprocess
import sys
import tempfile
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


os.environ["BENCH_DATA"] = str(_session_data_root())
os.environ.setdefault("BENCH_NO_DOWNLOAD", "1")


def has_mnist() -> bool:
    return (Path(os.environ["BENCH_DATA"]) / "MNIST" / "raw" / "train-images-idx3-ubyte").exists()


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
