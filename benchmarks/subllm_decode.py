"""Cached decoding of real text (teacher forcing): SUBLLM vs its dense twin, alternating in one process.

`leanlm bench --what decode` times greedy generation, i.e. the model's own continuation; a small, briefly trained
model continues in loops that its scorer keeps almost entirely (docs/results.md). This script times the same cached
one-token steps on the validation text that follows each prompt, so the stages see the kind of text they were
trained on, and reports the retention over exactly those steps and the executed-FLOP ratio at that retention.
How much a stage keeps depends on the text (0.49-0.71 per 1024-token block of the stdlib validation split), so the
prompts are taken at `--prompts` evenly spaced offsets of the split rather than only at its start.

    python benchmarks/subllm_decode.py out/subllm-stdlib-cal out/subllm-stdlib-dense/final \\
        --data out/baseline-stdlib/data --prompt-len 4096 --steps 256 --prompts 4 --repeats 5 --json

Any two leanlm models of one vocabulary work (e.g. an LTE model vs its dense fine-tune: the FLOP ratio then uses the
FFN sparsity its routers chose); `--kernel cpp` runs both with the fused C++ decode kernels. The methods measure
through their protocol: `reset_stats` before each repeat, then each method's `report` (printed by its summary line;
SUBLLM's retention of the prompts and of the steps also as `retention_prompts` and `retention`) and the executed
FLOPs per step, `model.flops("decode", prompt_len + steps / 2)`, at what the last repeat measured.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys

import torch

from leanlm.checkpoint import load_model
from leanlm.data import TokenDataset
from leanlm.errors import LeanLMError
from leanlm.measure import decode_text_in_turn, reports, reset_stats, summarize


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("dense")
    ap.add_argument("--data", required=True, help="prepared data directory (its validation split is the text)")
    ap.add_argument("--prompt-len", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=256)
    ap.add_argument("--prompts", type=int, default=4, help="prompts at evenly spaced offsets of the split")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--kernel", choices=("torch", "cpp"), default="torch", help="decode kernel of both models")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if args.prompts < 1:
        sys.exit(f"error: --prompts must be at least 1 (got {args.prompts})")
    try:
        models = {"A": load_model(args.model)[0].eval(), "B": load_model(args.dense)[0].eval()}
        val = TokenDataset(args.data, "val").tokens
    except LeanLMError as e:
        sys.exit(f"error: {e}")
    need = args.prompt_len + args.steps
    if len(val) < args.prompts * need:
        sys.exit(f"error: {args.prompts} prompts of {need} tokens need more than the {len(val)} validation tokens")
    gap = (len(val) - need) // max(args.prompts - 1, 1)
    windows = [val[i * gap : i * gap + need] for i in range(args.prompts)]
    prompts = [torch.from_numpy(w.astype("int64")).unsqueeze(0) for w in windows]
    try:
        decode_text_in_turn(
            models, [p[:, : args.prompt_len + 16] for p in prompts[:1]], args.prompt_len, 16, args.kernel
        )
        seconds: list[dict] = []  # per repeat: each model's decoding time summed over the prompts
        for _ in range(args.repeats):
            for m in models.values():
                reset_stats(m)  # what the methods did: the last repeat's (selection is deterministic)
            seconds.append(decode_text_in_turn(models, prompts, args.prompt_len, args.steps, args.kernel))
    except LeanLMError as e:
        sys.exit(f"error: {e}")
    tps = {k: [args.prompts * args.steps / s[k] for s in seconds] for k in models}
    sub = next((m for m in models["A"].methods if m.name == "subllm"), None)
    retention = sub.retention("decode") if sub is not None else None  # of the decoded steps
    retention_prompts = sub.retention("prefill") if sub is not None else None  # of the prompts: what caches hold
    # executed FLOPs of one step at the mean context, as the methods measured this run (SUBLLM: the decode steps'
    # retention, the prompts' for the cached keys; LTE: the experts its routers chose in the decode steps)
    context = args.prompt_len + args.steps / 2
    flops = {k: m.flops("decode", context) for k, m in models.items()}
    ratios = [s["B"] / s["A"] for s in seconds]  # per repeat; both arms decoded every prompt step by step in turn
    res = {
        "A": {
            "ref": args.model,
            "median_tokens_per_s": statistics.median(tps["A"]),
            "retention": retention,
            "retention_prompts": retention_prompts,
            "methods": reports(models["A"]),
        },
        "B": {"ref": args.dense, "median_tokens_per_s": statistics.median(tps["B"]), "methods": reports(models["B"])},
        "ratio": summarize(ratios),
        "flop_ratio": flops["B"] / flops["A"],
        "prompts": args.prompts,
        "kernel": args.kernel,
    }
    res["ratio_over_flop_ratio"] = res["ratio"]["median"] / res["flop_ratio"]
    summaries = [f"{k}: {r['summary']}" for k in models for r in res[k]["methods"].values()]
    ret = "".join(f"\n  {line}" for line in summaries)
    print(
        f"cached decode of real text, {args.prompts} prompts of {args.prompt_len}, {args.steps} steps each, "
        f"{args.repeats} repeats, kernel {args.kernel}: A {res['A']['median_tokens_per_s']:.1f} tok/s, "
        f"B {res['B']['median_tokens_per_s']:.1f} tok/s, "
        f"A/B {res['ratio']['median']:.3f} [{min(ratios):.3f}, {max(ratios):.3f}], "
        f"FLOP B/A {res['flop_ratio']:.3f}{ret}"
    )
    if args.json:
        print(json.dumps({"ok": True, **res}))


if __name__ == "__main__":
    main()
