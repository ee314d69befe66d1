"""Decode time per token against the context (issue 29: flat within ±15% from 4k to 16k for an all-sparse layout):
one model per context length, each prefilled (untimed) with its context of the same random tokens, then cached
one-token steps taken in turn across the lengths (the order flips every step), so a noisy neighbour cannot favour
one length. Reported: ms per token per length (median over `--repeats` rounds of `--steps` steps each) and each
length's time over the shortest one's.

    OMP_NUM_THREADS=1 python benchmarks/longctx_decode_flat.py longgen-cpu-24l --set model.attention.schedule=all \
        --lengths 4096,8192,16384 --steps 32 --repeats 3 --json

A dense model (`cpu-24l`) shows the growth the pattern removes.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

from leanlm.checkpoint import load_model, model_overrides


@torch.inference_mode()
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--set", dest="sets", action="append", default=[], help="model.KEY=VALUE at load (repeatable)")
    ap.add_argument("--lengths", default="4096,8192,16384")
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    lengths = [int(n) for n in args.lengths.split(",")]
    overrides = model_overrides(args.sets)
    gen = torch.Generator().manual_seed(0)
    models = {}
    for n in lengths:
        model = load_model(args.model, overrides=overrides)[0].eval()
        if n == lengths[0]:
            tokens = torch.randint(
                0, model.cfg.vocab_size, (1, max(lengths) + args.steps * args.repeats), generator=gen
            )
        model.setup_caches(1, n + args.steps * args.repeats)
        model(tokens[:, :n], last_only=True)
        models[n] = model
    rounds: dict[int, list[float]] = {n: [] for n in lengths}
    order = list(lengths)
    for r in range(args.repeats):
        elapsed = dict.fromkeys(lengths, 0.0)
        for s in range(args.steps):
            for n in order:
                pos = n + r * args.steps + s
                t0 = time.perf_counter()
                models[n](tokens[:, pos : pos + 1], start=pos, last_only=True)
                elapsed[n] += time.perf_counter() - t0
            order.reverse()
        for n in lengths:
            rounds[n].append(1000 * elapsed[n] / args.steps)
    ms = {n: statistics.median(v) for n, v in rounds.items()}
    rel = {n: ms[n] / ms[lengths[0]] for n in lengths}
    for n in lengths:
        print(
            f"{n:>6} tokens: {ms[n]:.2f} ms/token (rounds {', '.join(f'{x:.2f}' for x in rounds[n])}), "
            f"{rel[n]:.3f}x the {lengths[0]}-token context"
        )
    first = models[lengths[0]]
    summary = "; ".join(m.report(first)["summary"] for m in first.methods) or "dense"
    print(summary)
    if args.json:
        out = {
            "model": args.model,
            "overrides": overrides,
            "steps": args.steps,
            "repeats": args.repeats,
            "ms_per_token": {str(n): ms[n] for n in lengths},
            "rounds": {str(n): rounds[n] for n in lengths},
            "relative_to_shortest": {str(n): rel[n] for n in lengths},
            "summary": summary,
        }
        print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
