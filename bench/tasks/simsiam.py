"""SimSiam (Chen & He, 2021): the stop-gradient and predictor ablations, scored by kNN accuracy.

Reads top to bottom: data, model (backbone, projector, predictor), loss, optimiser and
schedule, the training loop, the monitors, the objective. The recipe is the paper's
CIFAR-10 one (appendix D): CIFAR ResNet-18 (3x3 stem, no max-pool), projector of 3 layers
with BN, output 2048, predictor 2048-512-2048, symmetric negative-cosine loss, SGD with
lr = 0.03 x batch/256, momentum 0.9, weight decay 5e-4, cosine schedule, batch 512.
The paper's finding to reproduce: without the stop-gradient, or with an identity
predictor, the output collapses (collapse_std -> 0, kNN accuracy -> chance) while the
loss still falls to its minimum of -1. (The identity predictor's collapse needs a projector
without the paper's output BN at the CPU budgets measured: `proj_out_bn`, RESULTS.md.)

Speed: the data sit on the device as uint8; both views are augmented there in one batched
call each (simsiam_augment.py); the loss is accumulated on the device and read once per
epoch; bf16 autocast and channels_last on CUDA; monitors run in eval mode on clean images.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from bench.data import dataset_spec, subsets
from bench.lifecycle import EpochTrial
from bench.registry import register_plots
from bench.specs.simsiam import DEFAULTS, METRICS, PARAMS, SMOKE  # noqa: F401
from bench.tasks.simsiam_augment import Normalize, TwoViewAugment, mean_std
from bench.tasks.simsiam_eval import collapse_std, knn_accuracy
from bench.train import autocast, batches, generator
from bench.trial import TrialContext

if TYPE_CHECKING:
    from bench.plots import PlotInput

# ---------------------------------------------------------------- data
def load_data(params: Mapping[str, Any], device: torch.device,
              data_dir: Path | None) -> dict[str, torch.Tensor]:
    """uint8 train/test images and labels on the device; the train cap is a fixed subset."""
    return subsets(params["dataset"], device, data_dir, params["train_size"], params["test_size"])


# ---------------------------------------------------------------- model
def resnet18_cifar(in_ch: int, width: int) -> tuple[nn.Module, int]:
    """torchvision's ResNet-18 with the CIFAR stem: 3x3 stride-1 conv, no max-pool (512-d)."""
    from torchvision.models import resnet18

    net = resnet18()
    net.conv1 = nn.Conv2d(in_ch, 64, 3, 1, 1, bias=False)
    net.maxpool = nn.Identity()  # 32x32 inputs: the ImageNet stem would leave 8x8 after layer1
    net.fc = nn.Identity()
    return net, 512


def small_convnet(in_ch: int, width: int) -> tuple[nn.Module, int]:
    """3 conv-BN-ReLU layers (the last two stride 2), pooled to 2x2 and flattened (16 x width).

    2x2 rather than global pooling keeps coarse layout: at random init it lifts MNIST kNN
    accuracy (2,048-image bank, k=20) from 0.49 to 0.78, so a short run starts from
    features worth keeping and a collapse shows as a fall."""
    layers: list[nn.Module] = []
    ch = in_ch
    for i, out in enumerate((width, 2 * width, 4 * width)):
        layers += [nn.Conv2d(ch, out, 3, 1 if i == 0 else 2, 1, bias=False),
                   nn.BatchNorm2d(out), nn.ReLU(inplace=True)]
        ch = out
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(2), nn.Flatten()), 4 * ch


BACKBONES: dict[str, Callable[[int, int], tuple[nn.Module, int]]] = {
    "resnet18": resnet18_cifar, "small": small_convnet}


def projector(in_dim: int, hidden: int, out: int, out_bn: bool = True) -> nn.Sequential:
    """Three linear layers, each followed by BN; the last BN has no affine (as in the paper).
    Without `out_bn` the last layer is a plain linear one: SimSiam still learns (the
    paper's BN ablation), but the identity predictor then collapses (the output BN keeps
    every output dimension at unit variance over the batch; benchmarks/RESULTS.md)."""
    # built in order, one last Linear either way: the default draws the initial weights it
    # drew before this option existed (tests/test_simsiam.py)
    layers: list[nn.Module] = [
        nn.Linear(in_dim, hidden, bias=False), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
        nn.Linear(hidden, hidden, bias=False), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True)]
    if out_bn:
        layers += [nn.Linear(hidden, out, bias=False), nn.BatchNorm1d(out, affine=False)]
    else:
        layers += [nn.Linear(hidden, out)]
    return nn.Sequential(*layers)


def predictor(dim: int, hidden: int, kind: str) -> nn.Module:
    """Bottleneck MLP dim-hidden-dim (BN on the hidden layer only), or the identity."""
    if kind == "identity":
        return nn.Identity()
    return nn.Sequential(nn.Linear(dim, hidden, bias=False), nn.BatchNorm1d(hidden),
                         nn.ReLU(inplace=True), nn.Linear(hidden, dim))


class SimSiam(nn.Module):
    def __init__(self, in_ch: int = 3, backbone: str = "resnet18", width: int = 32,
                 proj_hidden: int = 2048, proj_dim: int = 2048, pred_hidden: int = 512,
                 pred_kind: str = "mlp", proj_out_bn: bool = True):
        super().__init__()
        self.backbone, feat_dim = BACKBONES[backbone](in_ch, width)
        self.projector = projector(feat_dim, proj_hidden, proj_dim, proj_out_bn)
        self.predictor = predictor(proj_dim, pred_hidden, pred_kind)

    def project(self, x: torch.Tensor) -> torch.Tensor:
        return self.projector(self.backbone(x))

    def forward(self, x1: torch.Tensor, x2: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(p1, p2, z1, z2). The views go through separately, as in the paper: BN statistics
        are per view."""
        z1, z2 = self.project(x1), self.project(x2)
        return self.predictor(z1), self.predictor(z2), z1, z2


def build_model(params: Mapping[str, Any], in_ch: int, device: torch.device) -> SimSiam:
    model = SimSiam(in_ch, params["backbone"], int(params["width"]), int(params["proj_hidden"]),
                    int(params["proj_dim"]), int(params["pred_hidden"]), params["predictor"],
                    bool(params["proj_out_bn"]))
    model = model.to(device)
    return model.to(memory_format=torch.channels_last) if device.type == "cuda" else model


# ---------------------------------------------------------------- loss
def negative_cosine(p: torch.Tensor, z: torch.Tensor, stop_grad: bool = True) -> torch.Tensor:
    """D(p, z) = -cos(p, z), batch mean, in [-1, 1]; z is the target (detached by stop_grad)."""
    if stop_grad:
        z = z.detach()
    return -F.cosine_similarity(p.float(), z.float(), dim=-1).mean()


def simsiam_loss(p1: torch.Tensor, p2: torch.Tensor, z1: torch.Tensor, z2: torch.Tensor,
                 stop_grad: bool = True) -> torch.Tensor:
    """Symmetric loss 0.5 D(p1, z2) + 0.5 D(p2, z1)."""
    return 0.5 * (negative_cosine(p1, z2, stop_grad) + negative_cosine(p2, z1, stop_grad))


# ---------------------------------------------------------------- optimiser
def build_optimizer(model: SimSiam, params: Mapping[str, Any]) -> torch.optim.SGD:
    """SGD at lr = base_lr x batch/256 (linear scaling, Goyal et al. 2017); each group keeps
    its `initial_lr` and a `fixed` flag that exempts it from the schedule."""
    lr = float(params["base_lr"]) * int(params["batch_size"]) / 256
    pred = list(model.predictor.parameters())
    pred_ids = {id(p) for p in pred}
    rest = [p for p in model.parameters() if id(p) not in pred_ids]
    groups = [{"params": rest, "fixed": False}]
    if pred:
        groups.append({"params": pred, "fixed": bool(params["fix_pred_lr"])})
    for g in groups:
        g["initial_lr"] = lr
    return torch.optim.SGD(groups, lr=lr, momentum=float(params["momentum"]),
                           weight_decay=float(params["weight_decay"]))


def set_cosine_lr(opt: torch.optim.Optimizer, step: int, total_steps: int) -> None:
    """lr = initial x 0.5 (1 + cos(pi t / T)), per step; `fixed` groups keep their initial lr."""
    factor = 0.5 * (1.0 + math.cos(math.pi * step / max(total_steps, 1)))
    for g in opt.param_groups:
        g["lr"] = g["initial_lr"] if g["fixed"] else g["initial_lr"] * factor


# ---------------------------------------------------------------- training
def steps_per_epoch(n: int, batch_size: int) -> int:
    """drop_last: a final batch of 1 would break BatchNorm; sets smaller than a batch are one."""
    return max(1, n // batch_size)


def train_epoch(model: SimSiam, opt: torch.optim.Optimizer, aug: TwoViewAugment,
                x_u8: torch.Tensor, params: Mapping[str, Any], gen: torch.Generator,
                step0: int, total_steps: int) -> torch.Tensor:
    """One pass; returns the mean training loss as a device tensor (read once, per epoch)."""
    model.train()
    dev = x_u8.device
    total, n_steps = torch.zeros((), device=dev), 0
    for idx in batches(len(x_u8), int(params["batch_size"]), dev, gen, drop_last=True):
        set_cosine_lr(opt, step0 + n_steps, total_steps)
        x1, x2 = aug(x_u8[idx])
        if dev.type == "cuda":
            x1 = x1.contiguous(memory_format=torch.channels_last)
            x2 = x2.contiguous(memory_format=torch.channels_last)
        with autocast(dev):
            p1, p2, z1, z2 = model(x1, x2)
        loss = simsiam_loss(p1, p2, z1, z2, bool(params["stop_grad"]))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        total += loss.detach()
        n_steps += 1
    return total / max(n_steps, 1)


# ---------------------------------------------------------------- monitors
@torch.no_grad()
def embed(model: SimSiam, norm: Normalize, x_u8: torch.Tensor,
          batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(backbone features, projector outputs) of clean images, eval mode, fp32."""
    model.eval()
    feats, projs = [], []
    for xb in x_u8.split(batch):
        x = norm(xb)
        if x.device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(x.device):
            h = model.backbone(x)
            z = model.projector(h)
        feats.append(h.float())
        projs.append(z.float())
    return torch.cat(feats), torch.cat(projs)


def monitors(model: SimSiam, norm: Normalize, bank: torch.Tensor, bank_y: torch.Tensor,
             query: torch.Tensor, query_y: torch.Tensor, params: Mapping[str, Any],
             classes: int) -> dict[str, float]:
    """kNN accuracy of the queries against the bank (backbone features, as the SimSiam kNN
    monitors do) and collapse_std of the queries' projector outputs z."""
    bs = int(params["eval_batch_size"])
    bank_f, _ = embed(model, norm, bank, bs)
    query_f, z = embed(model, norm, query, bs)
    acc = knn_accuracy(query_f, query_y, bank_f, bank_y, classes, int(params["knn_k"]),
                       float(params["knn_t"]))
    return {"knn_acc": acc, "collapse_std": collapse_std(z)}


class SimSiamTrial(EpochTrial):
    """SimSiam self-supervised pretraining; kNN accuracy, loss and collapse monitors."""

    def __init__(self, params: Mapping[str, Any], ctx: TrialContext):
        super().__init__(params, ctx)
        dev = ctx.device
        self.data = subsets(params["dataset"], dev, ctx.data_dir, params["train_size"],
                            params["test_size"], int(params["val_size"]))
        ch, size = int(self.data["train"].shape[1]), int(self.data["train"].shape[-1])
        mean, std = mean_std(params["dataset"], ch)
        self.aug = TwoViewAugment(ch, size, mean, std, float(params["min_scale"])).to(dev)
        self.norm = Normalize(mean, std).to(dev)
        self.model = build_model(params, ch, dev)
        self.opt = build_optimizer(self.model, params)
        self.gen = generator(dev, ctx.seed)
        self.classes = dataset_spec(params["dataset"]).classes
        self.per_epoch = steps_per_epoch(len(self.data["train"]), int(params["batch_size"]))
        self.examples_per_epoch = self.per_epoch * min(int(params["batch_size"]),
                                                       len(self.data["train"]))

    def sizes(self) -> dict[str, int]:
        return {k: len(self.data[k]) for k in ("train", "val", "test")}

    def train_epoch(self, epoch: int) -> dict[str, torch.Tensor]:
        loss = train_epoch(self.model, self.opt, self.aug, self.data["train"], self.params,
                           self.gen, epoch * self.per_epoch, self.epochs * self.per_epoch)
        return {"train_loss": loss}

    def validate(self, epoch: int) -> dict[str, float]:
        if (epoch + 1) % int(self.params["knn_every"]) and epoch != self.epochs - 1:
            return {}
        d = self.data
        m = monitors(self.model, self.norm, d["train"], d["train_y"], d["val"], d["val_y"],
                     self.params, self.classes)
        return {f"val_{k}": v for k, v in m.items()}

    def test(self) -> dict[str, float]:
        d = self.data
        m = monitors(self.model, self.norm, d["train"], d["train_y"], d["test"], d["test_y"],
                     self.params, self.classes)
        return {f"test_{k}": v for k, v in m.items()}


@register_plots("simsiam")
def simsiam_plots(inp: PlotInput) -> list[Path]:
    """Curves per cell (mean, band over seeds) and a final-accuracy bar per cell."""
    from bench.tasks.simsiam_plots import draw

    return draw(inp)
