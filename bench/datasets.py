"""The image data sets the tasks read, by name (torch-free: task declarations list them)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    torchvision_class: str
    folder: str  # where torchvision keeps it under the root
    classes: int


DATASETS = {
    "mnist": DatasetSpec("mnist", "MNIST", "MNIST/raw", 10),
    "fashion-mnist": DatasetSpec("fashion-mnist", "FashionMNIST", "FashionMNIST/raw", 10),
    "cifar10": DatasetSpec("cifar10", "CIFAR10", "cifar-10-batches-py", 10),
}
