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
FFN sparsity its routers chose); `--kernel cpp` runs both with the fused C++ decode kernels.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys

import torch

from leanlm.bench import _flops, _summary, steps_in_turn
from leanlm.checkpoint import load_model
from leanlm.data import TokenDataset
from leanlm.model import decode_layout


@torch.inference_mode()
def run(
    models: dict, prompts: list[torch.Tensor], prompt_len: int, steps: int, kernel: str = "torch"
) -> tuple[dict, dict]:
    """Per prompt (1, prompt_len + steps): every model prefills `prompt_len` tokens (untimed), then the models take
    the `steps` cached one-token forwards in turn (leanlm.bench.steps_in_turn). Returns the seconds each model spent
    decoding, summed over the prompts, and for each SUBLLM the (kept, seen) counts per stage of the prefills and of
    the decoded steps."""
    counts = {k: m.retention_counts for k, m in models.items() if hasattr(m, "retention_counts")}
    kept = {k: [torch.zeros_like(c), torch.zeros_like(c)] for k, c in counts.items()}  # prefilled, decoded
    elapsed = dict.fromkeys(models, 0.0)
    with contextlib.ExitStack() as stack:
        for m in models.values():
            stack.enter_context(decode_layout(m, kernel))
        for tokens in prompts:
            try:
                before = {k: c.clone() for k, c in counts.items()}
                for m in models.values():
                    m.setup_caches(1, prompt_len + steps)
                    m(tokens[:, :prompt_len], last_only=True)
                for k, c in counts.items():
                    kept[k][0] += c - before[k]
                    before[k] = c.clone()
                for k, t in steps_in_turn(models, tokens[:, : prompt_len + steps], prompt_len).items():
                    elapsed[k] += t
                for k, c in counts.items():
                    kept[k][1] += c - before[k]
            finally:
                for m in models.values():
                    m.reset_caches()
    return elapsed, kept


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
    models = {"A": load_model(args.model)[0].eval(), "B": load_model(args.dense)[0].eval()}
    val = TokenDataset(args.data, "val").tokens
    need = args.prompt_len + args.steps
    if args.prompts < 1:
        sys.exit(f"error: --prompts must be at least 1 (got {args.prompts})")
    if len(val) < args.prompts * need:
        sys.exit(f"error: {args.prompts} prompts of {need} tokens need more than the {len(val)} validation tokens")
    gap = (len(val) - need) // max(args.prompts - 1, 1)
    windows = [val[i * gap : i * gap + need] for i in range(args.prompts)]
    prompts = [torch.from_numpy(w.astype("int64")).unsqueeze(0) for w in windows]
    run(models, [p[:, : args.prompt_len + 16] for p in prompts[:1]], args.prompt_len, 16, args.kernel)  # warm-up
    seconds: list[dict] = []  # per repeat: each model's decoding time summed over the prompts
    for _ in range(args.repeats):
        elapsed, kept_r = run(models, prompts, args.prompt_len, args.steps, args.kernel)
        seconds.append(elapsed)
    counts = kept_r.get("A")  # the same every repeat: selection is deterministic
    tps = {k: [args.prompts * args.steps / s[k] for s in seconds] for k in models}
    names = ("decode_cached", "decode")  # retention of the prompts (what the caches hold) and of the decoded steps
    kept = {} if counts is None else {k: (c[:, 0] / c[:, 1]).tolist() for k, c in zip(names, counts)}
    retention = kept.get("decode")
    flops = {
        "A": _flops(models["A"], ["decode"], 0, args.prompt_len, args.steps, kept)["decode"],
        "B": _flops(models["B"], ["decode"], 0, args.prompt_len, args.steps)["decode"],
    }
    ratios = [s["B"] / s["A"] for s in seconds]  # per repeat; both arms decoded every prompt step by step in turn
    res = {
        "A": {
            "ref": args.model,
            "median_tokens_per_s": statistics.median(tps["A"]),
            "retention": retention,
            "retention_prompts": kept.get("decode_cached"),
        },
        "B": {"ref": args.dense, "median_tokens_per_s": statistics.median(tps["B"])},
        "ratio": _summary(ratios),
        "flop_ratio": flops["B"] / flops["A"],
        "prompts": args.prompts,
        "kernel": args.kernel,
    }
    res["ratio_over_flop_ratio"] = res["ratio"]["median"] / res["flop_ratio"]
    ret = "" if retention is None else f", retention {', '.join(f'{x:.3f}' for x in retention)}"
    if retention is not None:
        ret += f" (prompts {', '.join(f'{x:.3f}' for x in kept['decode_cached'])})"
    if hasattr(models["A"], "lte_report"):  # LTE: the FFN sparsity its routers chose (prompts and steps)
        res["A"]["lte_ffn_sparsity"] = models["A"].lte_report()["ffn_sparsity"]
        ret += f", LTE FFN sparsity {res['A']['lte_ffn_sparsity']:.3f}"
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
