"""Cached decoding of real text (teacher forcing): SUBLLM vs its dense twin, alternating in one process.

`leanlm bench --what decode` times greedy generation, i.e. the model's own continuation; a small, briefly trained
model continues in loops that its scorer keeps almost entirely (docs/results.md). This script times the same cached
one-token steps on the validation text that follows the prompt, so the stages see the text they were trained on,
and reports the retention over exactly those steps and the executed-FLOP ratio at that retention.

    python benchmarks/subllm_decode.py out/subllm-stdlib-cal out/subllm-stdlib-dense/final \\
        --data out/baseline-stdlib/data --prompt-len 4096 --steps 64 --repeats 5 --json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from leanlm.bench import _flops
from leanlm.checkpoint import load_model
from leanlm.data import TokenDataset
from leanlm.model import decode_layout


@torch.inference_mode()
def run(model, tokens: torch.Tensor, prompt_len: int, steps: int) -> float:
    """Tokens/s of `steps` cached one-token forwards after an (untimed) prefill of `prompt_len` tokens."""
    model.setup_caches(1, prompt_len + steps)
    try:
        model(tokens[:, :prompt_len], last_only=True)
        t0 = time.perf_counter()
        for s in range(prompt_len, prompt_len + steps):
            model(tokens[:, s : s + 1], start=s, last_only=True)
        return steps / (time.perf_counter() - t0)
    finally:
        model.reset_caches()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("dense")
    ap.add_argument("--data", required=True, help="prepared data directory (its validation split is the text)")
    ap.add_argument("--prompt-len", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    models = {"A": load_model(args.model)[0].eval(), "B": load_model(args.dense)[0].eval()}
    val = TokenDataset(args.data, "val")
    tokens = torch.from_numpy(val.tokens[: args.prompt_len + args.steps].astype("int64")).unsqueeze(0)
    tps = {k: [] for k in models}
    for m in models.values():  # warm-up, then count retention over the measured steps only
        with decode_layout(m):
            run(m, tokens, args.prompt_len, args.steps)
        m.reset_retention() if hasattr(m, "reset_retention") else None
    for r in range(args.repeats):
        for k in list(models) if r % 2 == 0 else list(models)[::-1]:
            with decode_layout(models[k]):
                tps[k].append(run(models[k], tokens, args.prompt_len, args.steps))
    a = models["A"]
    with torch.inference_mode():  # take back the prefills' share of the counts: retention of the decoded steps only
        before = a.retention_counts.clone()
        a.setup_caches(1, args.prompt_len)
        a(tokens[:, : args.prompt_len], last_only=True)
        a.reset_caches()
        prefill_counts = a.retention_counts - before
    counts = before - args.repeats * prefill_counts
    retention = (counts[:, 0] / counts[:, 1]).tolist()
    flops = {
        "A": _flops(a, ["decode"], 0, args.prompt_len, args.steps, {"decode": retention})["decode"],
        "B": _flops(models["B"], ["decode"], 0, args.prompt_len, args.steps)["decode"],
    }
    ratios = [x / y for x, y in zip(tps["A"], tps["B"])]
    res = {
        "A": {"ref": args.model, "median_tokens_per_s": statistics.median(tps["A"]), "retention": retention},
        "B": {"ref": args.dense, "median_tokens_per_s": statistics.median(tps["B"])},
        "ratio": {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios), "samples": ratios},
        "flop_ratio": flops["B"] / flops["A"],
    }
    res["ratio_over_flop_ratio"] = res["ratio"]["median"] / res["flop_ratio"]
    print(
        f"cached decode of real text, prompt {args.prompt_len}, {args.steps} steps, {args.repeats} repeats: "
        f"A {res['A']['median_tokens_per_s']:.1f} tok/s, B {res['B']['median_tokens_per_s']:.1f} tok/s, "
        f"A/B {res['ratio']['median']:.3f} [{min(ratios):.3f}, {max(ratios):.3f}], FLOP B/A {res['flop_ratio']:.3f}, "
        f"retention {', '.join(f'{x:.3f}' for x in retention)}"
    )
    if args.json:
        print(json.dumps({"ok": True, **res}))


if __name__ == "__main__":
    main()
