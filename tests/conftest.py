from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = ROOT.parent / "shared" / "data"

# Tests read data offline: BENCH_DATA if set, else the shared folder beside the checkout.
os.environ.setdefault("BENCH_DATA", str(SHARED_DATA))
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
