"""SUBLLM vs its dense twin on the same tokens (issue 4, "Quality"): validation loss of both final checkpoints, the
SUBLLM checkpoint's validation loss under threshold selection (v = 0, the paper's rule, and per-stage thresholds
calibrated on training windows) and under training's top-k selection, the retention each stage achieved, and the
two runs' loss curves as a PNG.

    leanlm train --config configs/subllm-stdlib.yaml
    leanlm train --config configs/subllm-stdlib.yaml --set model.subllm.structure=TTTTTTTTTTTTTTTTTTTTTTTT \\
        --out out/subllm-stdlib-dense
    python benchmarks/subllm_quality.py out/subllm-stdlib out/subllm-stdlib-dense --png docs/subllm_quality.png

Each argument is a `leanlm train` output directory (its config.yaml names the data and the window shape, final/ is
scored). The thresholds are set through the SUBLLM method object (`model.methods`): `set_config(threshold=0)`, then
`calibrate_thresholds(sub, batches)` on training windows; the retention is the method's `retention("prefill")`
since `reset_stats`.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from leanlm.checkpoint import load_model, save_checkpoint
from leanlm.data import TokenDataset, spread_batches, val_batches
from leanlm.errors import LeanLMError
from leanlm.measure import reset_stats
from leanlm.methods.subllm import calibrate_thresholds
from leanlm.training import load_config


@torch.no_grad()
def loss_and_retention(model, data: TokenDataset, batch: int, seq_len: int, n: int) -> tuple[float, list[float]]:
    """Mean validation loss of `n` batches and, for a SUBLLM, the fraction each stage kept of them."""
    reset_stats(model)
    total = count = 0.0
    for x, y in val_batches(data, batch, seq_len, n):
        logits = model(x)
        total += F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="sum").item()
        count += y.numel()
    sub = subllm(model)
    return total / count, ((sub.retention("prefill") or []) if sub is not None else [])


def subllm(model):
    """The model's SUBLLM method object, or None."""
    return next((m for m in model.methods if m.name == "subllm"), None)


def curve(run: Path) -> tuple[list, list]:
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    train = [(int(r["step"]), float(r["loss"])) for r in rows if r["loss"]]
    val = [(int(r["step"]), float(r["val_loss"])) for r in rows if r["val_loss"]]
    return train, val


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("subllm_run")
    ap.add_argument("dense_run")
    ap.add_argument("--batches", type=int, default=16, help="validation batches scored (default 16)")
    ap.add_argument("--png", default=None, help="write both runs' loss curves here")
    ap.add_argument("--save", default=None, help="also save the calibrated SUBLLM checkpoint here (for leanlm bench)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    sub_run, dense_run = Path(args.subllm_run), Path(args.dense_run)
    try:
        cfg = load_config(sub_run / "config.yaml")  # the run's resolved config, as training wrote it
        data_dir = Path(cfg.data.dir or sub_run / "data")
        batch, seq_len = cfg.run.batch_size, cfg.run.seq_len
        train_data, val_data = TokenDataset(data_dir, "train"), TokenDataset(data_dir, "val")
        dense, _ = load_model(str(dense_run / "final"))
        model, tokenizer = load_model(str(sub_run / "final"))
    except LeanLMError as e:
        sys.exit(f"error: {e}")
    sub = subllm(model)
    if sub is None or not sub.parent:
        sys.exit(f"error: {sub_run / 'final'} is not a SUBLLM with stages")
    dense.eval(), model.eval()
    res = {"dense": {"val_loss": loss_and_retention(dense, val_data, batch, seq_len, args.batches)[0]}}
    rows = {}
    sub.set_config(model, threshold=0.0)
    rows["threshold v=0"] = loss_and_retention(model, val_data, batch, seq_len, args.batches)
    calib = spread_batches(train_data, batch, seq_len, args.batches)  # training windows, as the trainer does
    v = calibrate_thresholds(sub, calib)
    rows["threshold calibrated"] = loss_and_retention(model, val_data, batch, seq_len, args.batches)
    if args.save:
        save_checkpoint(model, tokenizer, args.save)
    reset_stats(model)  # the first windows are a few documents: retention over windows spread over the split too
    with torch.no_grad():
        for x in spread_batches(val_data, batch, seq_len, args.batches):
            model(x)
    res["retention_calibrated_val_spread"] = sub.retention("prefill")
    sub.selection = "topk"
    rows["top-k (training rule)"] = loss_and_retention(model, val_data, batch, seq_len, args.batches)
    for name, (loss, kept) in rows.items():
        res[name] = {"val_loss": loss, "vs_dense": loss / res["dense"]["val_loss"]}
        if name.startswith("threshold"):
            res[name]["retention"] = kept
    res["calibrated_thresholds"] = v
    res["gap_threshold_vs_topk"] = {
        k: rows[k][0] / rows["top-k (training rule)"][0] - 1 for k in ("threshold v=0", "threshold calibrated")
    }
    print(f"{'dense':28s} val loss {res['dense']['val_loss']:.4f}")
    for name, (loss, kept) in rows.items():
        extra = f"  retention {', '.join(f'{x:.3f}' for x in kept)}" if name.startswith("threshold") else ""
        print(f"{'SUBLLM ' + name:28s} val loss {loss:.4f}  ({loss / res['dense']['val_loss']:.4f}x dense){extra}")
    print(f"calibrated thresholds {v}")
    spread = ", ".join(f"{x:.3f}" for x in res["retention_calibrated_val_spread"])
    print(f"calibrated retention over {args.batches * batch} windows spread over the validation split: {spread}")
    if args.png:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4))
        for name, run in (("SUBLLM", sub_run), ("dense twin", dense_run)):
            train, val = curve(run)
            line = ax.plot(*zip(*train), alpha=0.6, label=f"{name} train")[0]
            ax.plot(*zip(*val), "o-", color=line.get_color(), label=f"{name} validation")
        ax.set_xlabel("step")
        ax.set_ylabel("loss (nats/token)")
        ax.set_title("SUBLLM vs dense twin, same tokens and seed")
        ax.legend()
        fig.tight_layout()
        fig.savefig(args.png, dpi=120)
        res["png"] = args.png
    if args.json:
        print(json.dumps({"ok": True, **res}))


if __name__ == "__main__":
    main()
