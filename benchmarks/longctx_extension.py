"""LongGen's recipe and the sparse patterns at one KV budget (issue 29, experiments a, b): a model pretrained at a short
context is extended to a 4x longer one with equal steps under full attention, the LongGen hybrid (sink + window in
the outer thirds), all layers sparse, S2 blocks in LongGen's layout and InfLLM v2 in every layer; the full-attention
extension is also evaluated with StreamingLLM-style eviction (sink + window in every layer) switched on after
training. Every sparse arm reads at most `--budget` keys per query.

Per arm: validation perplexity at the long context (windows of the prepared validation split), passkey retrieval
at that context (leanlm.longctx, `--passkey-style`, needle depths 0..1), span recall (a 16-token span of the window,
copied at its end: the share of the copy's tokens 2..16 predicted top-1; a small model copies long before it learns
a passkey prompt), KV-cache bytes at the long context vs full attention, the fraction of the causal key blocks read,
and the training time.

    python benchmarks/longctx_extension.py --init out/baseline-stdlib/final --data out/baseline-stdlib/data \
        --context 1024 --budget 256 --block 32 --steps 120 --out out/longctx --json

Arms already trained under --out are reused (`--skip-training` refuses to train). Writes <out>/longctx.md and .json.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from leanlm.checkpoint import load_model
from leanlm.data import TokenDataset, spread_batches
from leanlm.longctx import passkey
from leanlm.measure import kv_cache_bytes, reset_stats
from leanlm.training import config_from_dict, train


def arms(context: int, budget: int, block: int) -> dict[str, dict | None]:
    """Arm -> its model.attention section (None: full attention); every sparse arm reads <= budget keys at `context`:
    sink_window one sink block + the window; s2 half on the window, half on its strided blocks; infllm2 top-k blocks."""
    local = budget - block
    s2_window = budget // 2
    return {
        "full": None,
        "longgen": dict(pattern="sink_window", block=block, sink=block, window=local, schedule="longgen"),
        "all_sparse": dict(pattern="sink_window", block=block, sink=block, window=local, schedule="all"),
        "s2_longgen": dict(
            pattern="s2",
            block=block,
            sink=0,
            window=s2_window,
            vert_stride=max(1, 2 * context // budget),
            schedule="longgen",
        ),
        "infllm2": dict(
            pattern="infllm2",
            block=block,
            sink=block,
            window=s2_window,
            topk=budget // block,
            kernel=block // 2,
            kernel_stride=block // 4,
            dense_len=budget,
            schedule="all",
        ),
    }


def train_arm(name: str, section: dict | None, args: argparse.Namespace) -> float:
    out = Path(args.out) / name
    if (out / "final").is_dir():
        return float("nan")
    if args.skip_training:
        raise SystemExit(f"{out}/final: missing and --skip-training given")
    model = {"max_seq_len": args.context, **({"attention": section} if section else {})}
    cfg = config_from_dict(
        {
            "model": model,
            "data": {"dir": args.data},
            "optim": {
                "lr": args.lr,
                "warmup_steps": max(1, args.steps // 10),
                "schedule": "cosine",
                "min_lr_ratio": 0.1,
                "weight_decay": 0.1,
                "grad_clip": 1.0,
            },
            "run": {
                "init": args.init,
                "out": str(out),
                "steps": args.steps,
                "batch_size": args.batch_size,
                "seq_len": args.context,
                "eval_every": 0,
                "eval_batches": 2,
                "save_every": 0,
                "log_every": max(1, args.steps // 10),
                "progress": False,
                "seed": args.seed,
            },
        }
    )
    t = time.perf_counter()
    train(cfg)
    return time.perf_counter() - t


@torch.inference_mode()
def val_ppl(model, data: str, context: int, windows: int) -> float:
    val = TokenDataset(data, "val")
    nll = n = 0.0
    for x in spread_batches(val, 1, context + 1, windows):  # (1, context + 1)
        logits = model(x[:, :-1])
        nll += F.cross_entropy(logits[0].float(), x[0, 1:], reduction="sum").item()
        n += context
    return math.exp(nll / n)


@torch.inference_mode()
def span_recall(model, data: str, context: int, depths: list[float], trials: int, span: int = 16) -> dict[str, float]:
    """Per depth, top-1 accuracy on tokens 2..span of a copy, at the window's end, of the span at that depth."""
    windows = spread_batches(TokenDataset(data, "val"), 1, context, trials)
    out = {}
    for d in depths:
        hits = 0
        for x in windows:  # (1, context)
            x = x.clone()
            src = int(d * (context - 3 * span))
            x[0, -span:] = x[0, src : src + span]
            pred = model(x).argmax(-1)[0, -span:-1]  # predictions of the copy's tokens 2..span
            hits += int((pred == x[0, -span + 1 :]).sum())
        out[str(d)] = hits / (trials * (span - 1))
    return out


def scored(model, tok, perplexity: float, context: int, depths: list[float], trials: int, style: str) -> dict:
    """An arm's row after its perplexity pass (stats reset before it): the share of the key blocks its attention read
    there, its passkey accuracy at `context` and its KV-cache bytes (longctx_posthoc.py scores its variants so too)."""
    read = next((m.report(model) for m in model.methods if m.name == "attention"), {})
    pk = passkey(model, tok, [context], depths, trials=trials, style=style)
    return {
        "perplexity": perplexity,
        "passkey": pk["mean_accuracy"],
        "passkey_by_depth": pk["accuracy"][str(context)],
        "passkey_digits": sum(pk["digit_accuracy"][str(context)].values()) / len(depths),
        "kv_cache_bytes": kv_cache_bytes(model, 1, context),
        "blocks_read_fraction": read.get("blocks_read_fraction", 1.0),
    }


def evaluate_arm(ref: str, section: dict | None, args: argparse.Namespace) -> dict:
    model, tok = load_model(ref, overrides={"attention": section} if section else None)
    model.eval()
    reset_stats(model)
    ppl = val_ppl(model, args.data, args.context, args.windows)
    row = scored(model, tok, ppl, args.context, args.depths, args.trials, args.passkey_style)
    recall = span_recall(model, args.data, args.context, args.depths, args.trials)
    return {"span_recall": sum(recall.values()) / len(recall), "span_recall_by_depth": recall, **row}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--init", required=True, help="the short-context model (a leanlm checkpoint)")
    ap.add_argument("--data", required=True, help="its prepared data directory")
    ap.add_argument("--context", type=int, default=1024, help="the extended context")
    ap.add_argument("--budget", type=int, default=256, help="keys per query of every sparse arm")
    ap.add_argument("--block", type=int, default=32)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--windows", type=int, default=16, help="validation windows of --context tokens")
    ap.add_argument("--trials", type=int, default=6, help="passkey trials per depth")
    ap.add_argument("--depths", default="0,0.25,0.5,0.75,1")
    ap.add_argument("--passkey-style", default="code", choices=("code", "text"))
    ap.add_argument("--arms", default="", help="comma-separated subset of the arms (default: all)")
    ap.add_argument("--skip-training", action="store_true")
    ap.add_argument("--out", default="out/longctx")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    args.depths = [float(d) for d in args.depths.split(",")]
    if args.budget % args.block or args.budget < 4 * args.block:
        raise SystemExit(f"--budget must be a multiple of --block and at least 4 blocks (got {args.budget})")
    table = arms(args.context, args.budget, args.block)
    chosen = [a for a in args.arms.split(",") if a] or list(table)
    rows = {}
    for name in chosen:
        seconds = train_arm(name, table[name], args)
        final = str(Path(args.out) / name / "final")
        rows[name] = {"train_seconds": seconds, **evaluate_arm(final, table[name], args)}
        print(f"{name}: {rows[name]}", file=sys.stderr)
    if "full" in chosen:  # post-hoc eviction on the full-attention extension, at the same budget
        post = dict(table["all_sparse"])
        rows["posthoc_eviction"] = {
            "train_seconds": 0.0,
            **evaluate_arm(str(Path(args.out) / "full" / "final"), post, args),
        }
    full = rows.get("full")
    lines = [
        f"| arm | val ppl @ {args.context} | x full | passkey | span recall | KV bytes x full | blocks read |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        rel = r["perplexity"] / full["perplexity"] if full else float("nan")
        kv = r["kv_cache_bytes"] / full["kv_cache_bytes"] if full else float("nan")
        lines.append(
            f"| {name} | {r['perplexity']:.3f} | {rel:.3f} | {r['passkey']:.2f} | {r['span_recall']:.2f} | {kv:.3f} | "
            f"{r['blocks_read_fraction']:.3f} |"
        )
    md = "\n".join(lines)
    print(md)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {
        "settings": {k: v for k, v in vars(args).items()},
        "arms": {k: v for k, v in table.items() if k in chosen},
        "rows": rows,
    }
    (out / "longctx.md").write_text(md + "\n")
    (out / "longctx.json").write_text(json.dumps(result, indent=2))
    if args.json:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
