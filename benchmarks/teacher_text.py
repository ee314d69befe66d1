"""Sample training text from a (teacher) model: more text for distillation than the fine-tuning corpus holds.

    python benchmarks/teacher_text.py --model out/g/dense/final --data out/g/data --out out/g/gen \\
        --samples 4096 --prompt-len 32 --new-tokens 480 --batch-size 512 --json

Each sample continues a `--prompt-len`-token window of the prepared corpus' train split (`--data`, its start drawn
at random) by `--new-tokens` tokens sampled at `--temperature` (1: the model's own distribution, which is what a
KL-to-the-teacher loss is taken over). Every sample, prompt included, is written as one document
(`<out>/NNNNNN.txt`) into a directory made atomically, ready for `leanlm prepare` (one file = one document, so the
train/val split is by sample). Not in the LTE paper: the LTE issue's corpus (wikitext-2 valid, 260k tokens) is
overfitted by the dense model within a few hundred steps, and this is sequence-level distillation data drawn from
the teacher instead (docs/results.md, LTE, twelfth attempt).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="checkpoint, .gguf or preset to sample from")
    ap.add_argument("--data", required=True, help="prepared directory whose train split gives the prompts")
    ap.add_argument("--out", required=True, help="output directory (one .txt file per sample; must not exist)")
    ap.add_argument("--samples", type=int, default=1024)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=480)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    for name in ("samples", "prompt_len", "new_tokens", "batch_size"):
        if getattr(args, name) < 1:
            sys.exit(f"error: --{name.replace('_', '-')} must be >= 1 (got {getattr(args, name)})")
    if not args.temperature > 0:
        sys.exit(f"error: --temperature must be > 0 (got {args.temperature})")

    from pathlib import Path

    from leanlm.checkpoint import atomic_dir, load_model
    from leanlm.data import TokenDataset
    from leanlm.distributed import setup
    from leanlm.errors import LeanLMError
    from leanlm.generate import generate
    from leanlm.tokenizer import Tokenizer

    out = Path(args.out)
    if out.exists():
        sys.exit(f"error: --out {out} exists (samples are never overwritten)")

    def flagged(flag: str, fn, *a, **kw):  # leanlm's own checks, in one line naming the flag whose value is bad
        try:
            return fn(*a, **kw)
        except LeanLMError as e:
            sys.exit(f"error: {flag}: {e}")

    dev = flagged("--device", setup, args.device).device
    data = flagged("--data", TokenDataset, args.data, "train")
    tok = flagged("--data", Tokenizer.load, args.data)  # the samples are text in the data's tokenization
    model, _ = flagged("--model", load_model, args.model)
    flagged("--data", data.check_vocab, model.cfg.vocab_size)
    train = data.tokens
    if len(train) <= args.prompt_len:
        sys.exit(f"error: --data {args.data}: the train split has {len(train)} tokens, not more than --prompt-len")
    model = model.to(dev).eval()
    rng = np.random.default_rng(args.seed)
    starts = rng.integers(0, len(train) - args.prompt_len, size=args.samples)  # (samples,)

    t0, n_tokens = time.perf_counter(), 0
    with atomic_dir(out) as tmp:
        for b in range(0, args.samples, args.batch_size):
            batch = starts[b : b + args.batch_size]
            prompts = [train[s : s + args.prompt_len].astype(np.int64).tolist() for s in batch]
            # generate's own checks; the only one the flags above leave open is the model's context
            res = flagged(
                "--prompt-len + --new-tokens",
                generate,
                model,
                prompts,
                args.new_tokens,
                temperature=args.temperature,
                seed=args.seed + b,
            )
            for i, (p, new) in enumerate(zip(prompts, res.tokens)):
                (tmp / f"{b + i:06d}.txt").write_text(tok.decode(p + new), encoding="utf-8")
                n_tokens += len(p) + len(new)
            print(f"{b + len(prompts)}/{args.samples} samples, {time.perf_counter() - t0:.0f} s", flush=True)
    seconds = time.perf_counter() - t0
    result = {
        "out": str(out),
        "samples": args.samples,
        "tokens": n_tokens,
        "seconds": round(seconds, 1),
        "tokens_per_s": round(n_tokens / seconds),
        "model": args.model,
        "device": dev.type,
    }
    print(json.dumps(result) if args.json else f"{n_tokens} tokens in {seconds:.0f} s -> {out}")


if __name__ == "__main__":
    main()
