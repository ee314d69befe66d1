"""Perplexity parity: leanlm's SmolLM2-135M against transformers' own GGUF loading, under one protocol.

    python benchmarks/eval_parity.py --data wikitext-2 --seq-len 512 --max-windows 40

leanlm loads the GGUF with its own reader (leanlm.checkpoint.load_model("smollm2-135m")); the reference is
transformers' AutoModelForCausalLM/AutoTokenizer reading the same file, so no leanlm loading code is shared. Both are
scored by leanlm.evaluate's protocol (whole file tokenized without BOS, fixed windows). `--data` takes text files or
the names of texts shipped with leanlm (default `wikitext-2`, its test split; leanlm.data.text_file). Progress goes to
stderr; the last stdout line is JSON with both results and the relative perplexity difference. Exit status 1 when the
difference exceeds --tol, 2 on a usage problem.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from leanlm.checkpoint import load_model
from leanlm.data import text_file
from leanlm.errors import LeanLMError
from leanlm.evaluate import evaluate
from leanlm.hf import smollm2_gguf


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--data", nargs="+", default=["wikitext-2"], help="text file(s) or shipped text names (default wikitext-2)"
    )
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--stride", type=int, default=None, help="sliding windows every STRIDE tokens (default: none)")
    ap.add_argument("--max-windows", type=int, default=40)
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--tol", type=float, default=1e-3, help="largest accepted relative perplexity difference")
    args = ap.parse_args(argv)
    try:
        paths = [str(text_file(d)) for d in args.data]
        opts = dict(seq_len=args.seq_len, stride=args.stride, max_windows=args.max_windows, batch_size=args.batch_size)
        t0 = time.perf_counter()
        model, tok = load_model("smollm2-135m", dtype="float32")
        ours = evaluate(model, tok, paths, **opts)
        t1 = time.perf_counter()
        del model
        gguf = smollm2_gguf()
        hf_model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
        hf_tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        ref = evaluate(hf_model, hf_tok, paths, progress=True, **opts)
        t2 = time.perf_counter()
    except LeanLMError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    rel = abs(ours["perplexity"] - ref["perplexity"]) / ref["perplexity"]
    out = {
        "model": f"smollm2-135m ({gguf.name})",
        "data": args.data,
        "protocol": ours["protocol"],
        "leanlm": {
            k: ours[k] for k in ("perplexity", "bits_per_byte", "nll", "n_tokens_scored", "n_bytes_scored", "n_windows")
        }
        | {"seconds": round(t1 - t0, 2)},
        "transformers": {k: ref[k] for k in ("perplexity", "bits_per_byte", "nll", "n_tokens_scored")}
        | {"seconds": round(t2 - t1, 2)},
        "rel_diff_perplexity": rel,
        "tol": args.tol,
        "ok": rel <= args.tol and ours["n_tokens_scored"] == ref["n_tokens_scored"],
    }
    print(f"leanlm ppl {ours['perplexity']:.6f}  transformers ppl {ref['perplexity']:.6f}  rel diff {rel:.2e}")
    print(json.dumps(out))
    return 0 if out["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
