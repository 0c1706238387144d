"""SimSiam monitors: weighted kNN accuracy and the collapse statistic.

kNN (Wu et al. 2018, InstDisc; the monitor of the SimSiam CIFAR repositories): features
are L2-normalised, each query's k most cosine-similar memory-bank items vote for their
class with weight exp(sim / T), and the class with the largest summed weight wins.
k=200, T=0.1 are the published settings.

collapse_std (SimSiam paper, Fig. 2): the per-dimension standard deviation of the
L2-normalised output, averaged over dimensions, times sqrt(d). For outputs spread like an
isotropic Gaussian each coordinate of z/||z|| has std 1/sqrt(d), so the value is about 1;
a collapsed (constant) output gives 0. The task measures it on the projector output z of
the clean test images in eval mode; BN then uses running statistics (momentum 0.1), which
after fewer than ~20 steps still remember their initial (0, 1) and read low (0.02-0.12 in
8-step smoke runs), so read it on runs of 50 steps or more.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


@torch.no_grad()
def knn_predict(query: torch.Tensor, bank: torch.Tensor, bank_labels: torch.Tensor,
                classes: int, k: int = 200, temperature: float = 0.1,
                chunk: int = 1024) -> torch.Tensor:
    """Predicted class per query row; `query` and `bank` need not be normalised."""
    query, bank = F.normalize(query.float(), dim=1), F.normalize(bank.float(), dim=1)
    k = min(k, len(bank))
    preds = []
    for q in query.split(chunk):  # [chunk, N] similarities: 1024 x 50,000 fp32 is 200 MB
        sim, idx = (q @ bank.T).topk(k, dim=1)
        votes = torch.zeros(len(q), classes, device=q.device, dtype=sim.dtype)
        votes.scatter_add_(1, bank_labels[idx], (sim / temperature).exp())
        preds.append(votes.argmax(1))
    return torch.cat(preds)


def knn_accuracy(query: torch.Tensor, query_labels: torch.Tensor, bank: torch.Tensor,
                 bank_labels: torch.Tensor, classes: int, k: int = 200,
                 temperature: float = 0.1) -> float:
    """Fraction of queries whose weighted-kNN vote matches their label."""
    pred = knn_predict(query, bank, bank_labels, classes, k, temperature)
    return float((pred == query_labels).float().mean())


def collapse_std(z: torch.Tensor) -> float:
    """mean_j std_i(z_i / ||z_i||)_j * sqrt(d): ~1 healthy, ~0 collapsed."""
    zn = F.normalize(z.float(), dim=1)
    return float(zn.std(0).mean() * math.sqrt(z.shape[1]))
