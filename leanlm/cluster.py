"""Balanced k-means: the clustering that turns a dense FFN's neurons into equal-sized experts (LTE's grouping,
leanlm/methods/lte.py; MoEfication's recipe)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def balanced_kmeans(x: Tensor, n: int, iters: int = 20, seed: int = 0) -> Tensor:
    """Cluster the rows of x (F, d) into n clusters of exactly F // n rows; returns the cluster of each row (F,).
    Greedy balanced assignment on the whole (row, centroid) similarity matrix, best pairs first (MoEfication's), on
    L2-normalised rows."""
    Fd = x.shape[0]
    size = Fd // n
    # on the CPU in float32 wherever the model is: the grouping (stored in checkpoints) then does not depend on it
    x = F.normalize(x.detach().float().cpu(), dim=1)
    gen = torch.Generator().manual_seed(seed)
    centroids = x[torch.randperm(Fd, generator=gen)[:n]].clone()  # (n, d)
    assign = torch.zeros(Fd, dtype=torch.long)
    for _ in range(iters):
        sim = x @ centroids.t()  # (F, n)
        order = sim.flatten().argsort(descending=True).tolist()
        new, room, left = [-1] * Fd, [size] * n, Fd  # plain Python: tensor indexing per pair is ~100x slower
        for flat in order:
            r, c = divmod(flat, n)
            if new[r] < 0 and room[c]:
                new[r] = c
                room[c] -= 1
                left -= 1
                if not left:
                    break
        new = torch.tensor(new)
        if torch.equal(new, assign):
            break
        assign = new
        centroids = F.normalize(torch.zeros_like(centroids).index_add_(0, assign, x), dim=1)
    return assign
