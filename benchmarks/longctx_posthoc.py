"""Training-free sparse attention on a pretrained model (issue 29, experiment c): each pattern switched on at load
(`--set model.attention.*`, no weights change) and scored next to the dense model at several contexts: perplexity
on long windows of a text and passkey retrieval (leanlm.longctx), with the KV-cache bytes and the fraction of the
causal key blocks read. Every sparse variant reads at most `--budget` keys per query.

    python benchmarks/longctx_posthoc.py --model out/smollm2 --data wikitext-2 --contexts 2048,8192 --budget 1024 \
        --windows 2 --trials 2 --depths 0,0.5,1 --out out/longctx-smollm2 --json

`--model` is a float checkpoint (`leanlm convert smollm2-135m out/smollm2`) or a preset. Writes <out>/posthoc.md, .json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from longctx_extension import arms, scored

from leanlm.checkpoint import load_model
from leanlm.data import text_file
from leanlm.evaluate import evaluate
from leanlm.measure import reset_stats

# the extension's layouts at the same budget (benchmarks/longctx_extension.py, this script's directory), by the names
# of this table
NAMES = {
    "full": "dense",
    "all_sparse": "streaming (all layers)",
    "longgen": "longgen layout",
    "s2_longgen": "s2 longgen layout",
    "infllm2": "infllm2 (all layers)",
}


def variants(budget: int, block: int, context: int) -> dict[str, dict | None]:
    """Variant -> its model.attention section (None: dense); at most `budget` keys per query at `context`."""
    table = arms(context, budget, block)
    return {name: table[arm] for arm, name in NAMES.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="out/smollm2")
    ap.add_argument("--data", default="wikitext-2")
    ap.add_argument("--contexts", default="2048,8192")
    ap.add_argument("--budget", type=int, default=1024)
    ap.add_argument("--block", type=int, default=64)
    ap.add_argument("--windows", type=int, default=2, help="perplexity windows per context")
    ap.add_argument("--trials", type=int, default=2, help="passkey trials per depth")
    ap.add_argument("--depths", default="0,0.5,1")
    ap.add_argument("--variants", default="", help="comma-separated subset (default: all)")
    ap.add_argument("--out", default="out/longctx-smollm2")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    contexts = [int(c) for c in args.contexts.split(",")]
    depths = [float(d) for d in args.depths.split(",")]
    rows = []
    for context in contexts:
        table = variants(args.budget, args.block, context)
        chosen = [v.strip() for v in args.variants.split(",") if v.strip()] or list(table)
        for name in chosen:
            section = table[name]
            model, tok = load_model(args.model, overrides={"attention": section} if section else None)
            model.eval()
            t = time.perf_counter()
            reset_stats(model)
            ev = evaluate(model, tok, [text_file(args.data)], seq_len=context, max_windows=args.windows, progress=False)
            row = {"context": context, "variant": name, "attention": section}
            row |= scored(model, tok, ev["perplexity"], context, depths, args.trials, "text")
            row["seconds"] = time.perf_counter() - t
            rows.append(row)
            print(json.dumps(row), file=sys.stderr)
    lines = [
        "| context | variant | ppl | x dense | passkey | KV x dense | blocks read |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        d = next(x for x in rows if x["context"] == r["context"] and x["variant"] == "dense")
        lines.append(
            f"| {r['context']} | {r['variant']} | {r['perplexity']:.3f} | {r['perplexity'] / d['perplexity']:.3f} | "
            f"{r['passkey']:.2f} | {r['kv_cache_bytes'] / d['kv_cache_bytes']:.3f} | {r['blocks_read_fraction']:.3f} |"
        )
    md = "\n".join(lines)
    print(md)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "posthoc.md").write_text(md + "\n")
    result = {"settings": vars(args), "rows": rows}
    (out / "posthoc.json").write_text(json.dumps(result, indent=2))
    if args.json:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
