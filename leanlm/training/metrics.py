"""What a run reports: metrics.csv (and TensorBoard scalars when tensorboard is installed), loss.png, and the
validation loss.
"""

from __future__ import annotations

import csv
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import leanlm.training.distributed as distributed
from leanlm.data import TokenDataset, val_batches

METRICS = ("step", "tokens", "layer_tokens", "loss", "val_loss", "lr", "grad_norm", "tokens_per_s", "flops_per_token")


class MetricsLog:
    """metrics.csv, plus TensorBoard scalars when tensorboard is installed. Only rank 0 writes.

    On resume, rows after the resumed step (logged before a crash, then redone) are dropped, so every step appears
    once.
    """

    def __init__(self, out: Path, start_step: int, enabled: bool, extra: list[str] | None = None):
        self.enabled = enabled
        self.fields = [*METRICS, *(extra or [])]
        self.tb = None
        if not enabled:
            return
        path = out / "metrics.csv"
        kept = []
        if start_step and path.is_file():
            with open(path, newline="") as f:
                kept = [r for r in csv.DictReader(f) if r.get("step", "").isdigit() and int(r["step"]) <= start_step]
        self.file = open(path, "w", newline="")  # closed in close()
        self.writer = csv.DictWriter(self.file, self.fields, extrasaction="ignore")
        self.writer.writeheader()
        self.writer.writerows(kept)
        self.file.flush()
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # tensorboard is an optional extra
            return
        self.tb = SummaryWriter(str(out / "tensorboard"), purge_step=start_step + 1 if start_step else None)

    def write(self, row: dict) -> None:
        if not self.enabled:
            return
        self.writer.writerow({k: "" if row.get(k) is None else row[k] for k in self.fields})
        self.file.flush()
        if self.tb is not None:
            for k in ("loss", "val_loss", "lr", "grad_norm", "tokens_per_s", *self.fields[len(METRICS) :]):
                if row.get(k) is not None:
                    self.tb.add_scalar(k, row[k], row["step"])
            self.tb.flush()

    def close(self) -> None:
        if self.enabled:
            self.file.close()
            if self.tb is not None:
                self.tb.close()


def plot_losses(metrics_csv: Path, png: Path) -> bool:
    """Train and validation loss against step, from metrics.csv; False when matplotlib is not installed."""
    try:
        from matplotlib.figure import Figure  # no pyplot: leaves the process's backend alone
    except ImportError:
        return False
    with open(metrics_csv, newline="") as f:
        rows = list(csv.DictReader(f))
    fig = Figure(figsize=(7, 4), layout="tight")
    ax = fig.subplots()
    train = [(int(r["step"]), float(r["loss"])) for r in rows if r["loss"]]
    val = [(int(r["step"]), float(r["val_loss"])) for r in rows if r["val_loss"]]
    if train:
        ax.plot(*zip(*train), label="train", linewidth=1)
    if val:
        ax.plot(*zip(*val), "o-", label="validation", markersize=3)
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.savefig(png, dpi=120)
    return True


@torch.no_grad()
def validation_loss(
    model: nn.Module,
    dataset: TokenDataset,
    batch_size: int,
    seq_len: int,
    max_batches: int,
    device: torch.device,
    autocast: Callable,
) -> float:
    """Mean cross-entropy per token over the first `max_batches` validation batches (the same windows every time)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for x, y in val_batches(dataset, batch_size, seq_len, max_batches):
        with autocast():
            logits = model(x.to(device))
        total += F.cross_entropy(logits.float().flatten(0, 1), y.to(device).flatten(), reduction="sum").item()
        count += y.numel()
    distributed.reshard(model)
    model.train(was_training)
    return total / count
