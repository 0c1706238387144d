"""SimSiam epoch throughput: batched on-device augmentation vs a per-image DataLoader pipeline.

Both train the same SimSiam model with the same SGD step on the same uint8 images, side by
side in one process, repeats interleaved (A, B, A, B, ...) so background load hits both:

- `batched`: images resident on the device as uint8; each batch is an index slice and both
  views come from one kornia call each, with per-image random parameters
  (bench.tasks.simsiam.train_epoch, the task's own loop).
- `dataloader`: a Dataset whose __getitem__ applies torchvision v2 transforms (the same
  recipe) twice to one image, a DataLoader (shuffle, `--workers` processes, persistent,
  pin_memory on CUDA) and a host->device copy per batch, as SimSiam repositories do.

Also timed alone: the augmentation only (no model), which is what the DataLoader workers
must keep up with. Images/s counts source images (each gives two views).

Usage:
  BENCH_DATA=../shared/data python benchmarks/simsiam_pipeline.py --data mnist
  python benchmarks/simsiam_pipeline.py --data random-cifar       # uint8 noise, 3x32x32
  python benchmarks/simsiam_pipeline.py --device cuda --backbone resnet18 --batch 512 \
      --data random-cifar --images 50000       # ResNet-18 CIFAR-sized s/epoch (bf16, CL)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable

import torch
from torch.utils.data import DataLoader, Dataset

from bench.data import load_images
from bench.tasks import simsiam as S
from bench.tasks.simsiam_augment import JITTER, TwoViewAugment, mean_std
from bench.train import autocast, generator, resolve_device


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            return next(ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def images(kind: str, n: int) -> torch.Tensor:
    if kind == "mnist":
        return load_images("mnist", True)[0][:n]
    return torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8,
                         generator=torch.Generator().manual_seed(0))


def v2_pipeline(channels: int, size: int, mean: tuple, std: tuple) -> Callable:
    """The task's recipe in torchvision v2 transforms, applied to one CHW uint8 image."""
    from torchvision.transforms import v2

    b, c, s, h = JITTER
    colour = channels == 3
    ops = [v2.RandomResizedCrop(size, scale=(0.2, 1.0), antialias=True),
           v2.RandomHorizontalFlip(),
           v2.RandomApply([v2.ColorJitter(b, c, s if colour else 0, h if colour else 0)], p=0.8)]
    if colour:
        ops.append(v2.RandomGrayscale(p=0.2))
    ops += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))]
    return v2.Compose(ops)


class TwoViews(Dataset):
    def __init__(self, x_u8: torch.Tensor, transform: Callable):
        self.x, self.t = x_u8, transform

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        img = self.x[i]
        return self.t(img), self.t(img)


def make_model(params: dict, channels: int, device: torch.device) -> tuple:
    model = S.build_model(params, channels, device)
    return model, S.build_optimizer(model, params)


def step(model: S.SimSiam, opt: torch.optim.Optimizer, x1: torch.Tensor,
         x2: torch.Tensor) -> torch.Tensor:
    """The task's training step, for batches that arrive already augmented."""
    dev = x1.device
    if dev.type == "cuda":
        x1 = x1.contiguous(memory_format=torch.channels_last)
        x2 = x2.contiguous(memory_format=torch.channels_last)
    with autocast(dev):
        p1, p2, z1, z2 = model(x1, x2)
    loss = S.simsiam_loss(p1, p2, z1, z2, True)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss.detach()


def time_batched(model: S.SimSiam, opt: torch.optim.Optimizer, aug: TwoViewAugment,
                 x_dev: torch.Tensor, params: dict, train: bool) -> float:
    gen = generator(x_dev.device, 0)
    sync(x_dev.device)
    t0 = time.perf_counter()
    if train:
        float(S.train_epoch(model, opt, aug, x_dev, params, gen, 0, 10**9))
    else:
        for idx in torch.randperm(len(x_dev), device=x_dev.device).split(params["batch_size"]):
            aug(x_dev[idx])
    sync(x_dev.device)
    return len(x_dev) / (time.perf_counter() - t0)


def time_loader(model: S.SimSiam, opt: torch.optim.Optimizer, loader: DataLoader,
                device: torch.device, train: bool) -> float:
    sync(device)
    t0, seen, total = time.perf_counter(), 0, torch.zeros((), device=device)
    for v1, v2 in loader:
        seen += len(v1)
        if train:
            v1 = v1.to(device, non_blocking=True)
            v2 = v2.to(device, non_blocking=True)
            total += step(model, opt, v1, v2)
    float(total)
    sync(device)
    return seen / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", choices=("mnist", "random-cifar"), default="mnist")
    ap.add_argument("--images", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--backbone", choices=tuple(S.BACKBONES), default="small")
    ap.add_argument("--width", type=int, default=16)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    x = images(args.data, args.images)
    ch, size = x.shape[1], x.shape[-1]
    dataset = "mnist" if args.data == "mnist" else "cifar10"
    mean, std = mean_std(dataset, ch)
    params = {**S.DEFAULTS, "backbone": args.backbone, "width": args.width,
              "batch_size": args.batch, "proj_hidden": 512, "proj_dim": 512, "pred_hidden": 128}
    if args.backbone == "resnet18":
        params.update(proj_hidden=2048, proj_dim=2048, pred_hidden=512)
    aug = TwoViewAugment(ch, size, mean, std).to(device)
    x_dev = x.to(device)
    loader = DataLoader(TwoViews(x, v2_pipeline(ch, size, mean, std)), batch_size=args.batch,
                        shuffle=True, drop_last=True, num_workers=args.workers,
                        persistent_workers=args.workers > 0,
                        pin_memory=device.type == "cuda")
    model, opt = make_model(params, ch, device)
    # Warm-up: kornia's first call, the workers' start, cuDNN autotuning.
    time_batched(model, opt, aug, x_dev[: 2 * args.batch], params, True)
    time_loader(model, opt, loader, device, False)

    runs: dict[str, list[float]] = {k: [] for k in
                                    ("batched_epoch", "dataloader_epoch",
                                     "batched_aug_only", "dataloader_aug_only")}
    for _ in range(args.repeats):
        runs["batched_epoch"].append(time_batched(model, opt, aug, x_dev, params, True))
        runs["dataloader_epoch"].append(time_loader(model, opt, loader, device, True))
        runs["batched_aug_only"].append(time_batched(model, opt, aug, x_dev, params, False))
        runs["dataloader_aug_only"].append(time_loader(model, opt, loader, device, False))
    summary = {k: {"mean": statistics.mean(v), "std": statistics.stdev(v) if len(v) > 1 else 0.0}
               for k, v in runs.items()}
    ratios = {"epoch": [a / b for a, b in zip(runs["batched_epoch"], runs["dataloader_epoch"],
                                              strict=True)],
              "aug_only": [a / b for a, b in zip(runs["batched_aug_only"],
                                                 runs["dataloader_aug_only"], strict=True)]}
    hw = (torch.cuda.get_device_name(device) if device.type == "cuda"
          else f"{cpu_name()}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}, "
               f"load average {os.getloadavg()[0]:.1f}")
    print(json.dumps({"config": vars(args), "hardware": hw, "torch": torch.__version__,
                      "images_per_s": summary,
                      "ratio_batched_over_dataloader": {k: statistics.mean(v)
                                                        for k, v in ratios.items()},
                      "seconds_per_epoch_batched": args.images
                      / summary["batched_epoch"]["mean"]}, indent=2))


if __name__ == "__main__":
    main()
