"""Throughput of a leanlm model against transformers with the same weights, saved as JSON next to a text table.

    python benchmarks/bench_vs_hf.py --model smollm2-135m --what prefill decode train --repeats 5 --out results/smollm2

Writes OUT.json (the full `leanlm.bench.run_bench` result: every sample, machine, settings) and OUT.txt (the table),
and prints the table. The flags are those of `leanlm bench`; see leanlm/bench.py for what each measurement means.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from leanlm.bench import WHATS, format_table, run_bench
from leanlm.errors import LeanLMError


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m", help="preset, checkpoint dir, HF dir or .gguf (variant A)")
    ap.add_argument("--vs", default="hf", help='"hf" (transformers, same weights) or another model reference')
    ap.add_argument("--what", nargs="+", default=list(WHATS), choices=WHATS)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--batch-size", dest="batch", type=int, default=1)
    ap.add_argument("--prompt-len", type=int, default=256)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", type=Path, default=None, help="write OUT.json and OUT.txt")
    args = vars(ap.parse_args(argv))
    out = args.pop("out")
    try:
        result = run_bench(**args)
    except LeanLMError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    table = format_table(result)
    print(table)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        (out.parent / f"{out.name}.json").write_text(json.dumps(result, indent=2) + "\n")
        (out.parent / f"{out.name}.txt").write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
