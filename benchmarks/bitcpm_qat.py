"""BitCPM's ternary quantization-aware training (issue 28, item 5): a float model trained on the stdlib corpus,
continued M more steps in full precision and with ternary QAT, against ternary post-training quantization; then a
short ternary QAT of a pretrained model (SmolLM2-135M) on wikitext-2.

    python benchmarks/bitcpm_qat.py --out out/bitcpm-qat --json

Part 1 (the stdlib corpus, `leanlm prepare stdlib`, a --vocab-size BPE, into <out>/data unless --data names a prepared
directory): a small float LLaMA (preset cpu-10m narrowed by --dim/--layers/--ffn-dim; the FFN width must be a
multiple of --group-size) trains --steps steps from scratch (<out>/float). From its final checkpoint two runs continue
--qat-steps steps on the same data with the same schedule: full precision (<out>/float-continued) and ternary QAT
(<out>/qat: `model: {quant: {format: ternary, group_size: G, head: H, qat: true}}` with `run.init`, every block linear
rounded to {-1, 0, 1} x an absmean fp16 scale per group in each forward, straight-through gradient). The QAT model is
packed with `leanlm.checkpoint.quantize(..., method="ternary")` (<out>/qat-packed, 2 bits per weight + an fp16 scale
per group), and the float model is packed the same way without training (<out>/ptq). Reported: validation loss of
each (the first --eval-batches windows of the validation split, the same windows for every model), the difference
packed - QAT (zero up to float rounding: the packed model computes what the QAT forward computed), and the packed
sizes of the blocks' linear weights and of the whole model vs float32.

The head (embedding and lm head) is --head: int8 (default; per output channel, near-lossless) or float. BitCPM, like
BitNet, keeps them out of the ternary format; int8 keeps the whole model small when the head is a large part of it.

Part 2 (--lm, default smollm2-135m; skipped with --skip-lm): perplexity on --test (wikitext-2, `leanlm eval`'s
protocol, --windows windows of --lm-seq-len) of the float model, of its ternary post-training quantization, and of
ternary QAT for --lm-steps steps on --lm-train (wikitext-2-valid, tokenized with the model's tokenizer; 10% held out),
packed after training.

Writes <out>/bitcpm_qat.md and <out>/bitcpm_qat.json; `--json` prints the JSON on the last stdout line.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import platform
import shutil
import sys
import time
from pathlib import Path

import torch

from leanlm.checkpoint import load_model, quantize
from leanlm.data import TokenDataset, prepare, text_file
from leanlm.errors import LeanLMError
from leanlm.evaluate import evaluate
from leanlm.quant import Packed, weight_bytes
from leanlm.training import config_from_dict, train
from leanlm.training.metrics import validation_loss


def train_run(out: Path, data: Path, *, model: dict, init: Path | str | None, args, steps: int, lr: float, **run):
    """One `leanlm train` run in process (a fresh output directory); returns its summary and wall time."""
    shutil.rmtree(out, ignore_errors=True)
    raw = {
        "model": model,
        "data": {"dir": str(data)},
        "optim": {"lr": lr, "warmup_steps": max(1, steps // 10), "schedule": "cosine", "min_lr_ratio": 0.1},
        "run": {
            "out": str(out),
            "steps": steps,
            "batch_size": args.batch,
            "seq_len": args.seq_len,
            "eval_every": 0,
            "eval_batches": 1,  # its own end-of-run check; the losses reported are measured below
            "save_every": 0,
            "log_every": max(1, steps // 10),
            "progress": False,
            "device": "cpu",
            **({"init": str(init)} if init is not None else {}),
            **run,
        },
    }
    t0 = time.perf_counter()
    summary = train(config_from_dict(raw))
    return {"steps": summary["steps"], "train_loss": summary["loss"], "seconds": round(time.perf_counter() - t0, 1)}


@torch.no_grad()
def val_loss(ref: Path | str, data: Path, args) -> float:
    model, _ = load_model(str(ref))
    val = TokenDataset(data, "val")
    return validation_loss(
        model.eval(), val, args.batch, args.seq_len, args.eval_batches, torch.device("cpu"), contextlib.nullcontext
    )


def sizes(ref: Path | str, float_ref: Path | str) -> dict:
    """Bytes of a packed model: its blocks' linear weights (packed tensors) and everything, vs float32."""
    model, _ = load_model(str(ref))
    ref_model, _ = load_model(str(float_ref), dtype="float32")
    blocks = [m for n, m in model.named_modules() if isinstance(m, Packed) and n.startswith("layers.")]
    packed = sum(m.nbytes() for m in blocks)
    fp32 = 4 * sum(m.out_features * m.in_features for m in blocks)
    whole, whole_fp32 = weight_bytes(model), weight_bytes(ref_model)
    head = [m for n, m in model.named_modules() if isinstance(m, Packed) and not n.startswith("layers.")]
    head_packed = sum(m.nbytes() for m in head)
    head_fp32 = 4 * sum(m.out_features * m.in_features for m in head)
    return {
        "blocks_linear_bytes": packed,
        "blocks_linear_fp32_bytes": fp32,
        "blocks_linear_ratio": packed / fp32,
        "bits_per_block_weight": 8 * packed / (fp32 / 4),
        "model_bytes": whole,
        "model_fp32_bytes": whole_fp32,
        "model_ratio": whole / whole_fp32,
        # the same model with a float32 head instead (the other choice of --head)
        "model_ratio_head_float": (whole - head_packed + head_fp32) / whole_fp32 if head else whole / whole_fp32,
    }


def pack(src: Path | str, out: Path, args) -> Path:
    quantize(str(src), out, method="ternary", group_size=args.group_size, head=args.head, force=True)
    return out


def part_stdlib(args, out: Path) -> dict:
    if args.data:
        data = Path(args.data)
    else:
        prepare(["stdlib"], out / "data", vocab_size=args.vocab_size, progress=False)
        data = out / "data"
    vocab = json.loads((data / "manifest.json").read_text())["vocab_size"]
    shape = {"dim": args.dim, "n_layers": args.layers, "n_heads": args.heads, "n_kv_heads": args.kv_heads}
    model = {"preset": "cpu-10m", **shape, "ffn_dim": args.ffn_dim, "vocab_size": vocab, "max_seq_len": args.seq_len}
    quant = {"format": "ternary", "group_size": args.group_size, "head": args.head, "qat": True}
    runs: dict[str, dict] = {}
    print(f"float: {args.steps} steps", file=sys.stderr)
    runs["float"] = train_run(out / "float", data, model=model, init=None, args=args, steps=args.steps, lr=args.lr)
    start = out / "float" / "final"
    cont = {"steps": args.qat_steps, "lr": args.qat_lr, "seed": 1}  # fresh windows after the first run's
    print(f"float continued and ternary QAT: {args.qat_steps} steps each", file=sys.stderr)
    runs["float continued"] = train_run(out / "float-continued", data, model=None, init=start, args=args, **cont)
    runs["QAT"] = train_run(out / "qat", data, model={"quant": quant}, init=start, args=args, **cont)
    packed = pack(out / "qat" / "final", out / "qat-packed", args)
    ptq = pack(start, out / "ptq", args)
    print("validation losses", file=sys.stderr)
    loss = {
        "float (start)": val_loss(start, data, args),
        "float continued": val_loss(out / "float-continued" / "final", data, args),
        "ternary QAT (fake-quantized)": val_loss(out / "qat" / "final", data, args),
        "ternary QAT, packed": val_loss(packed, data, args),
        "ternary PTQ (no QAT)": val_loss(ptq, data, args),
    }
    return {
        "data": str(data),
        "model": model,
        "quant": quant,
        "val_tokens": args.eval_batches * args.batch * args.seq_len,
        "runs": runs,
        "val_loss": loss,
        "packed_minus_qat": loss["ternary QAT, packed"] - loss["ternary QAT (fake-quantized)"],
        "sizes": sizes(packed, start),
    }


def perplexity(ref: Path | str, args, dtype: str | None = None) -> dict:
    model, tok = load_model(str(ref), dtype=dtype)
    t0 = time.perf_counter()
    with torch.no_grad():
        r = evaluate(
            model.eval(), tok, [text_file(args.test)], seq_len=args.lm_seq_len, max_windows=args.windows, progress=False
        )
    return {"perplexity": r["perplexity"], "tokens": r["n_tokens_scored"], "eval_s": round(time.perf_counter() - t0)}


def part_lm(args, out: Path) -> dict:
    data = out / "lm-data"
    prepare([args.lm_train], data, tokenizer=args.lm, val_fraction=0.1, progress=False)
    quant = {"format": "ternary", "group_size": args.group_size, "head": args.head, "qat": True}
    print(f"{args.lm}: float and ternary PTQ perplexity", file=sys.stderr)
    rows = {"float32": perplexity(args.lm, args, dtype="float32")}
    ptq = pack(args.lm, out / "lm-ptq", args)
    rows["ternary PTQ (no QAT)"] = perplexity(ptq, args)
    print(f"{args.lm}: ternary QAT, {args.lm_steps} steps", file=sys.stderr)
    lm_args = argparse.Namespace(**{**vars(args), "batch": args.lm_batch, "seq_len": args.lm_train_seq_len})
    run = train_run(
        out / "lm-qat", data, model={"quant": quant}, init=args.lm, args=lm_args, steps=args.lm_steps, lr=args.lm_lr
    )
    packed = pack(out / "lm-qat" / "final", out / "lm-qat-packed", args)
    rows[f"ternary QAT ({args.lm_steps} steps), packed"] = perplexity(packed, args)
    for r in rows.values():
        r["vs_float32"] = r["perplexity"] / rows["float32"]["perplexity"]
    return {
        "model": args.lm,
        "train_text": args.lm_train,
        "test": args.test,
        "windows": args.windows,
        "seq_len": args.lm_seq_len,
        "qat": {"steps": args.lm_steps, "batch": args.lm_batch, "seq_len": args.lm_train_seq_len, "lr": args.lm_lr}
        | {"tokens": args.lm_steps * args.lm_batch * args.lm_train_seq_len, "seconds": run["seconds"]},
        "rows": rows,
        "sizes": sizes(packed, args.lm),
    }


def markdown(res: dict) -> str:
    md = [f"# BitCPM ternary QAT ({res['date']}, {res['machine']}, {res['seconds']:.0f} s)", ""]
    if "stdlib" in res:
        s = res["stdlib"]
        sz = s["sizes"]
        m = s["model"]
        md += [
            f"Stdlib corpus: dim {m['dim']}, {m['n_layers']} layers, FFN {m['ffn_dim']}, vocab {m['vocab_size']}; "
            f"float {s['runs']['float']['steps']} steps, then {s['runs']['QAT']['steps']} more steps each way; "
            f"validation loss on {s['val_tokens']:,} tokens. Ternary group {s['quant']['group_size']}, "
            f"head {s['quant']['head']}.",
            "",
            "| model | val loss | vs float continued |",
            "|---|---|---|",
        ]
        ref = s["val_loss"]["float continued"]
        md += [f"| {k} | {v:.4f} | {v - ref:+.4f} |" for k, v in s["val_loss"].items()]
        md += [
            "",
            f"- packed − QAT val loss: {s['packed_minus_qat']:+.2e}",
            f"- blocks' linear weights: {sz['blocks_linear_bytes']:,} bytes packed vs "
            f"{sz['blocks_linear_fp32_bytes']:,} fp32 = {sz['blocks_linear_ratio']:.4f}× "
            f"({sz['bits_per_block_weight']:.3f} bits per weight)",
            f"- whole model: {sz['model_bytes']:,} vs {sz['model_fp32_bytes']:,} bytes = {sz['model_ratio']:.4f}× "
            f"(with a float32 head instead: {sz['model_ratio_head_float']:.4f}×)",
            "",
        ]
    if "lm" in res:
        lm = res["lm"]
        q = lm["qat"]
        md += [
            f"{lm['model']} on {lm['test']} ({lm['windows']} windows of {lm['seq_len']}); QAT on {lm['train_text']}: "
            f"{q['steps']} steps x {q['batch']} x {q['seq_len']} tokens ({q['tokens']:,} tokens, lr {q['lr']}, "
            f"{q['seconds']:.0f} s).",
            "",
            "| model | perplexity | × float32 |",
            "|---|---|---|",
        ]
        md += [f"| {k} | {r['perplexity']:.2f} | {r['vs_float32']:.2f} |" for k, r in lm["rows"].items()]
        sz = lm["sizes"]
        md += [
            "",
            f"- blocks' linear weights {sz['blocks_linear_ratio']:.4f}× fp32; whole model {sz['model_ratio']:.4f}× "
            f"(float32 head: {sz['model_ratio_head_float']:.4f}×)",
        ]
    return "\n".join(md) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="out/bitcpm-qat", help="output directory (runs, checkpoints, report)")
    ap.add_argument("--data", default=None, help="a prepared data directory (default: stdlib into <out>/data)")
    ap.add_argument("--vocab-size", type=int, default=4096, help="BPE size when preparing stdlib (default 4096)")
    ap.add_argument("--dim", type=int, default=192)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=6)
    ap.add_argument("--kv-heads", type=int, default=3)
    ap.add_argument("--ffn-dim", type=int, default=512, help="a multiple of --group-size")
    ap.add_argument("--steps", type=int, default=300, help="float training steps (default 300)")
    ap.add_argument("--qat-steps", type=int, default=100, help="steps of each continuation (default 100)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--lr", type=float, default=2e-3, help="float training peak learning rate")
    ap.add_argument("--qat-lr", type=float, default=1e-3, help="peak learning rate of both continuations")
    ap.add_argument("--eval-batches", type=int, default=16, help="validation batches of --batch x --seq-len")
    ap.add_argument("--group-size", type=int, default=64, help="inputs per ternary scale (default 64)")
    ap.add_argument("--head", default="int8", choices=["int8", "float"], help="embedding and lm head format")
    ap.add_argument("--skip-stdlib", action="store_true", help="only part 2")
    ap.add_argument("--skip-lm", action="store_true", help="only part 1")
    ap.add_argument("--lm", default="smollm2-135m", help="pretrained model of part 2 (default smollm2-135m)")
    ap.add_argument("--lm-train", default="wikitext-2-valid", help="QAT text of part 2")
    ap.add_argument("--test", default="wikitext-2", help="perplexity text of part 2 (default wikitext-2)")
    ap.add_argument("--windows", type=int, default=40, help="windows of --test scored (default 40)")
    ap.add_argument("--lm-seq-len", type=int, default=512, help="tokens per scored window (default 512)")
    ap.add_argument("--lm-steps", type=int, default=30)
    ap.add_argument("--lm-batch", type=int, default=4)
    ap.add_argument("--lm-train-seq-len", type=int, default=256)
    ap.add_argument("--lm-lr", type=float, default=3e-4)
    ap.add_argument("--json", action="store_true", help="print the JSON result on the last stdout line")
    args = ap.parse_args()
    torch.manual_seed(0)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    res: dict = {"ok": True}
    try:
        if not args.skip_stdlib:
            res["stdlib"] = part_stdlib(args, out)
            res["stdlib"]["seconds"] = round(time.perf_counter() - t0, 1)
        if not args.skip_lm:
            t1 = time.perf_counter()
            res["lm"] = part_lm(args, out)
            res["lm"]["seconds"] = round(time.perf_counter() - t1, 1)
    except LeanLMError as e:
        sys.exit(f"error: {e}")
    res["date"] = datetime.date.today().isoformat()
    res["machine"] = f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    res["seconds"] = round(time.perf_counter() - t0, 1)
    md = markdown(res)
    (out / "bitcpm_qat.md").write_text(md, encoding="utf-8")
    (out / "bitcpm_qat.json").write_text(json.dumps(res, indent=2) + "\n", encoding="utf-8")
    print(md)
    if args.json:
        print(json.dumps(res))


if __name__ == "__main__":
    main()
