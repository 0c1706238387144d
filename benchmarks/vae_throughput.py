"""VAE training throughput: bench's resident-tensor loop vs a plain DataLoader loop.

Both train the same model (the vae task's ConvEncoder/ConvDecoder) on the same MNIST
images with the same batch size and optimizer, measured side by side in one process:

- `resident`: uint8 images on the device, batches are index slices of a device permutation,
  the loss is accumulated on the device (bench.tasks.vae.train_epoch, the task's own loop);
  bf16 autocast and channels_last on CUDA.
- `dataloader`: torchvision.datasets.MNIST with ToTensor, a DataLoader (shuffle,
  num_workers, pin_memory on CUDA), per-batch host->device copy and `loss.item()` per step,
  as a notebook training loop is usually written.

Each is warmed up for one partial epoch, then timed over `--epochs` epochs (CUDA synchronised).
Usage: BENCH_DATA=../shared/data python benchmarks/vae_throughput.py [--device cuda]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

from bench.data import data_root, load_images
from bench.tasks import vae as V
from bench.train import generator, resolve_device


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def resident(params: dict, device: torch.device, n: int, epochs: int) -> float:
    x_u8 = load_images("mnist", True, None, device)[0][:n]
    model = V.build_model(params, tuple(x_u8.shape[1:]), device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    gen = generator(device, 0)
    V.train_epoch(model, opt, x_u8[: n // 4], params, 1.0, gen)  # warm-up
    sync(device)
    t0 = time.perf_counter()
    for _ in range(epochs):
        loss = V.train_epoch(model, opt, x_u8, params, 1.0, gen)
    float(loss)
    sync(device)
    return n * epochs / (time.perf_counter() - t0)


def dataloader(params: dict, device: torch.device, n: int, epochs: int, workers: int) -> float:
    import torchvision
    from torch.utils.data import DataLoader, Subset

    ds = torchvision.datasets.MNIST(str(data_root()), train=True, download=False,
                                    transform=torchvision.transforms.ToTensor())
    loader = DataLoader(Subset(ds, range(n)), batch_size=params["batch_size"], shuffle=True,
                        num_workers=workers, pin_memory=device.type == "cuda",
                        persistent_workers=workers > 0)
    model = V.build_model(params, (1, 28, 28), device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)

    def epoch(limit: int | None = None) -> None:
        model.train()
        for i, (x, _) in enumerate(loader):
            if limit is not None and i >= limit:
                break
            x = (x.to(device, non_blocking=True) > 0.5).float()
            mu, logvar = model.encode(x)
            z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)
            loss = (-model.log_px(model.decoder(z), x) + V.kl_normal(mu, logvar)).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            loss.item()  # the per-step host sync of a typical loop

    epoch(limit=len(loader) // 4)  # warm-up
    sync(device)
    t0 = time.perf_counter()
    for _ in range(epochs):
        epoch()
    sync(device)
    return n * epochs / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="auto")
    ap.add_argument("--n", type=int, default=20_000, help="training images per epoch")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workers", type=int, default=2, help="DataLoader workers")
    args = ap.parse_args()
    device = resolve_device(args.device)
    params = {**V.DEFAULTS, "batch_size": args.batch_size}
    res, dl = [], []
    for _ in range(args.repeats):  # interleaved, so drift in machine load hits both alike
        res.append(resident(params, device, args.n, args.epochs))
        dl.append(dataloader(params, device, args.n, args.epochs, args.workers))
    hw = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    ratios = [a / b for a, b in zip(res, dl, strict=True)]
    print(json.dumps({
        "device": str(device), "hardware": hw, "torch": torch.__version__,
        "batch_size": args.batch_size, "images_per_epoch": args.n, "epochs": args.epochs,
        "resident_img_s": [round(x) for x in res], "dataloader_img_s": [round(x) for x in dl],
        "speedup_mean": round(statistics.mean(ratios), 3),
        "speedup_std": round(statistics.stdev(ratios), 3) if len(ratios) > 1 else 0.0,
    }, indent=2))


if __name__ == "__main__":
    main()
