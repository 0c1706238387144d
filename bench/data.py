"""Data sets as uint8 tensors resident on the trial's device.

Each set is read once per process (torchvision's readers, torchvision's folder layout) and
kept on the CPU; device copies are cached too, so the trials a worker runs one after another
share one copy. Images stay uint8 until a batch is formed; batches are index slices.

Where data comes from: `--data-dir` or `$BENCH_DATA` is read, never written (on a cluster
it is often shared and read-only). What bench downloads or generates goes to the cache,
`$BENCH_CACHE` (default ~/.cache/bench): a set missing from the data folder is looked for
in `<cache>/data`, downloaded there by torchvision into a temporary folder that is moved
into place only when complete (a failed download leaves nothing behind).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.datasets import DATASETS, DatasetSpec
from bench.errors import DataError

_CPU: dict[tuple[str, str, bool], tuple[torch.Tensor, torch.Tensor]] = {}
_DEVICE: dict[tuple[str, str, bool, str], tuple[torch.Tensor, torch.Tensor]] = {}


def cache_root() -> Path:
    """Where bench writes downloads and generated data: $BENCH_CACHE or ~/.cache/bench."""
    chosen = os.environ.get("BENCH_CACHE")
    return Path(chosen).expanduser().resolve() if chosen else Path.home() / ".cache" / "bench"


def data_root(data_dir: str | Path | None = None) -> Path:
    """--data-dir, else $BENCH_DATA, else the cache's data folder."""
    chosen = data_dir or os.environ.get("BENCH_DATA")
    return Path(chosen).expanduser().resolve() if chosen else cache_root() / "data"


def dataset_spec(name: str) -> DatasetSpec:
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}")
    return DATASETS[name]


def _to_nchw(data: Any) -> torch.Tensor:
    x = torch.as_tensor(np.asarray(data))
    return x.unsqueeze(1) if x.ndim == 3 else x.permute(0, 3, 1, 2)  # (N,H,W) or (N,H,W,C)


def _open(spec: DatasetSpec, root: Path, train: bool) -> Any | None:
    """The torchvision data set under `root` (download=False never writes), or None."""
    import torchvision.datasets as tvd

    try:
        return getattr(tvd, spec.torchvision_class)(root=str(root), train=train, download=False)
    except RuntimeError:
        return None


def _download(spec: DatasetSpec, cache: Path, train: bool) -> Any | None:
    """Download into a temporary folder of the cache, moved into place when complete."""
    import torchvision.datasets as tvd

    try:
        cache.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".download-{spec.name}-", dir=cache))
    except OSError:
        return None
    try:
        getattr(tvd, spec.torchvision_class)(root=str(tmp), train=train, download=True)
        top = spec.folder.split("/")[0]
        if not (cache / top).exists():
            os.replace(tmp / top, cache / top)
    except Exception:  # no network, a full disk, an interrupted download
        return None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return _open(spec, cache, train)


def _read(spec: DatasetSpec, root: Path, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
    cache = cache_root() / "data"
    ds = _open(spec, root, train)
    if ds is None and cache != root:
        ds = _open(spec, cache, train)
    if ds is None and not os.environ.get("BENCH_NO_DOWNLOAD"):
        ds = _download(spec, cache, train)
    if ds is None:
        raise DataError(_missing(spec, root, cache))
    x = _to_nchw(ds.data).to(torch.uint8).contiguous()
    y = torch.as_tensor(np.asarray(ds.targets), dtype=torch.int64)
    return x, y


def _missing(spec: DatasetSpec, root: Path, cache: Path) -> str:
    tried = "" if os.environ.get("BENCH_NO_DOWNLOAD") else (
        f", and torchvision's download into {cache} failed (no internet?)")
    offline = ("" if spec.name == "mnist" else
               " To run this task offline on MNIST instead, add `--set dataset=mnist`.")
    return (f"dataset {spec.name!r} not found: looked in {root / spec.folder} and "
            f"{cache / spec.folder}{tried}. On a machine with internet, run "
            f"`python -c \"import torchvision; torchvision.datasets."
            f"{spec.torchvision_class}(root='DIR', download=True)\"` and point "
            f"--data-dir or BENCH_DATA at DIR.{offline}")


def load_images(name: str, train: bool, data_dir: str | Path | None = None,
                device: str | torch.device = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """(images uint8 [N,C,H,W], labels int64 [N]) for the train or test split, on `device`."""
    spec, root = dataset_spec(name), data_root(data_dir)
    key = (name, str(root), train)
    if key not in _CPU:
        _CPU[key] = _read(spec, root, train)
    dev = torch.device(device)
    if dev.type == "cpu":
        return _CPU[key]
    dkey = (*key, str(dev))
    if dkey not in _DEVICE:
        x, y = _CPU[key]
        _DEVICE[dkey] = (x.to(dev, non_blocking=True), y.to(dev, non_blocking=True))
    return _DEVICE[dkey]


def require_dataset(name: str, data_dir: str | Path | None = None) -> None:
    """Preflight: both splits are readable (and now cached), else DataError saying where."""
    load_images(name, True, data_dir)
    load_images(name, False, data_dir)


def subsets(name: str, device: torch.device, data_dir: str | Path | None = None,
            train_size: int | None = None, test_size: int | None = None,
            val_size: int = 0) -> dict[str, torch.Tensor]:
    """uint8 images and labels on the device: `train`, `val` (if val_size), `test` (+ `_y`).

    One fixed-seed permutation of the training set, the same in every trial: its first
    `val_size` images are the validation split, the next `train_size` the training subset
    (a random subset, so a small one still holds every class). `test` is the data set's
    own test split, its first `test_size` images.
    """
    x, y = load_images(name, True, data_dir, device)
    x_test, y_test = load_images(name, False, data_dir, device)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    train_idx = cap(perm[val_size:], train_size).to(x.device)
    n_test = len(cap(torch.arange(len(x_test)), test_size))
    out = {"train": x[train_idx], "train_y": y[train_idx],
           "test": x_test[:n_test], "test_y": y_test[:n_test]}
    if val_size:
        if not 0 < val_size < len(x):
            raise DataError(f"val_size must be in (0, {len(x)}), got {val_size}")
        val_idx = perm[:val_size].to(x.device)
        out.update(val=x[val_idx], val_y=y[val_idx])
    return out


def cap(idx: torch.Tensor, size: int | None) -> torch.Tensor:
    """The first `size` indices (all when size is None or larger)."""
    return idx if size is None or size >= len(idx) else idx[: int(size)]
