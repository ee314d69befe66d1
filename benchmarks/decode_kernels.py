"""Cached one-token decode of one model with the PyTorch path vs the fused C++ kernels (`--kernel cpp`), in one run.

    python benchmarks/decode_kernels.py cpu-24l --prompt-len 4096 --steps 128 --repeats 5
    python benchmarks/decode_kernels.py smollm2-135m --prompt-len 128 --steps 128 --repeats 5

The model is loaded twice, once per kernel, each in its decode layout; after an untimed prefill of random ids the two
copies take their cached steps in turn, step by step (order flipped every step), so both see the same load on a
shared machine. Reports ms per step of each, the speed-up torch / cpp per repeat (median [min, max]) and the largest
logit difference between the two over every step.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys

import torch

from leanlm.checkpoint import load_model
from leanlm.errors import LeanLMError
from leanlm.kernels import decode_layout
from leanlm.measure import steps_in_turn, summarize

KERNELS = ("torch", "cpp")  # the two decode paths compared (leanlm.kernels)


@torch.inference_mode()
def run(models: dict, tokens: torch.Tensor, prompt_len: int) -> tuple[dict, float]:
    """Seconds each copy spent on the steps after `prompt_len`, and the largest |logit difference| between them."""
    diffs = [0.0]
    for m in models.values():
        m.setup_caches(1, tokens.shape[1])
        m(tokens[:, :prompt_len], last_only=True)
    try:
        elapsed = steps_in_turn(
            models, tokens, prompt_len, lambda out: diffs.append(float((out["torch"] - out["cpp"]).abs().max()))
        )
    finally:
        for m in models.values():
            m.reset_caches()
    return elapsed, max(diffs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", help="a preset, leanlm checkpoint, HF directory or .gguf file")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--steps", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    for name in ("prompt_len", "steps", "repeats"):
        if getattr(args, name) < 1:
            sys.exit(f"error: --{name.replace('_', '-')} must be at least 1 (got {getattr(args, name)})")
    try:
        models = {k: load_model(args.model)[0].eval() for k in KERNELS}  # presets: the same seed, the same weights
        vocab = models["torch"].cfg.vocab_size
        gen = torch.Generator().manual_seed(0)
        tokens = torch.randint(0, vocab, (1, args.prompt_len + args.steps), generator=gen)
        with contextlib.ExitStack() as stack:
            for k, m in models.items():
                stack.enter_context(decode_layout(m, k))
            run(models, tokens[:, : args.prompt_len + 8], args.prompt_len)  # warm-up (and the kernels' first load)
            seconds, diffs = [], []
            for _ in range(args.repeats):
                elapsed, diff = run(models, tokens, args.prompt_len)
                seconds.append(elapsed)
                diffs.append(diff)
    except LeanLMError as e:
        sys.exit(f"error: {e}")
    ms = {k: statistics.median(s[k] for s in seconds) * 1e3 / args.steps for k in KERNELS}
    ratios = [s["torch"] / s["cpp"] for s in seconds]
    res = {
        "model": args.model,
        "prompt_len": args.prompt_len,
        "steps": args.steps,
        "threads": torch.get_num_threads(),
        "ms_per_step": ms,
        "speedup": summarize(ratios),
        "max_abs_logit_diff": max(diffs),
    }
    print(
        f"{args.model}, prompt {args.prompt_len}, {args.steps} steps, {args.repeats} repeats, "
        f"{res['threads']} threads: torch {ms['torch']:.2f} ms/step, cpp {ms['cpp']:.2f} ms/step, torch/cpp "
        f"{res['speedup']['median']:.3f} [{min(ratios):.3f}, {max(ratios):.3f}], max |Δlogit| {max(diffs):.2e}"
    )
    if args.json:
        print(json.dumps({"ok": True, **res}))


if __name__ == "__main__":
    main()
