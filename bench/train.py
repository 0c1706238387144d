"""Shared training helpers: seeding, devices, bf16 autocast, batches from resident tensors."""

from __future__ import annotations

import contextlib
import random
import resource
import sys
from collections.abc import Iterator

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    if torch.cuda.is_available():
        torch.manual_seed(seed)  # seeds every device's generator, CUDA's lazily
    else:  # the same for the CPU alone, without torch's lazy-seed stack captures (0.6 ms)
        torch.default_generator.manual_seed(seed)


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    from bench.errors import ConfigError
    from bench.plan import device_problem

    problem = device_problem(name)
    if problem:
        raise ConfigError(f"--device: {problem}")
    return torch.device(name)


def placement(device: str, workers: int, gpus: int) -> list[str]:
    """The device of each of `workers` processes on a node with `gpus` GPUs: `cuda` (and
    `auto` when there are GPUs) spreads them round-robin, `cuda:N` pins them all to GPU N,
    `cpu` (and `auto` without GPUs) keeps them on the CPU."""
    if device == "auto":
        device = "cuda" if gpus > 0 else "cpu"
    if device == "cuda" and gpus > 0:
        return [f"cuda:{i % gpus}" for i in range(workers)]
    return [device] * workers


def autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA (no loss scaling needed); full precision elsewhere."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def generator(device: torch.device, seed: int) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def batches(n: int, batch_size: int, device: torch.device, gen: torch.Generator,
            shuffle: bool = True, drop_last: bool = False) -> Iterator[torch.Tensor]:
    """Index tensors on `device`: a permutation sliced into batches, no host round trip."""
    if shuffle:
        order = torch.randperm(n, device=device, generator=gen)
    else:
        order = torch.arange(n, device=device)
    stop = n - n % batch_size if drop_last and n >= batch_size else n
    for start in range(0, stop, batch_size):
        yield order[start : start + batch_size]


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_mem_gb(device: torch.device) -> float:
    """CUDA: peak allocated since the last reset. CPU: the process's peak RSS (monotonic)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**30 if sys.platform == "darwin" else rss / 2**20
