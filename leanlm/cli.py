"""The `leanlm` command line: one verb per job, each a thin wrapper over a library function.

Every verb takes `--json`: the result is then printed as exactly one JSON object on the last line of stdout.
Problems the user can fix (missing files, bad values, unsupported models) print one line `leanlm: error: ...` to
stderr and exit with status 2 (with `--json`, also a JSON object {"ok": false, "error": ...}).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from leanlm.errors import LeanLMError

DTYPE_CHOICES = ("float32", "bfloat16")


def _model_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument(
        "--model",
        "-m",
        required=required,
        metavar="REF",
        help="a preset name (e.g. smollm2-135m, tiny), a leanlm checkpoint directory, a Hugging Face "
        "model directory (config.json + safetensors) or a .gguf file",
    )
    p.add_argument(
        "--dtype",
        choices=DTYPE_CHOICES,
        default=None,
        help="compute dtype of the weights (default: the checkpoint's, float32 for GGUF and presets)",
    )
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="model.KEY=VALUE",
        help="change a model setting at load (preset or leanlm checkpoint; with bench, --model only), e.g. "
        "model.subllm.threshold=0.1; repeatable",
    )


def _kernel_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--kernel",
        choices=("torch", "cpp"),
        default="torch",
        help="one-token CPU decode steps (batch 1, float32): torch = pure PyTorch (default); cpp = fused C++ ops per "
        "block and LTE FFN, built on first use (needs a C++ compiler and ninja)",
    )


def _json_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print the result as one JSON object on the last stdout line")


def _tokenizer_for(args, tok):
    if getattr(args, "tokenizer", None):
        from leanlm.data import load_tokenizer_ref

        return load_tokenizer_ref(args.tokenizer)
    if tok is None:
        raise LeanLMError(f"model {args.model!r} comes without a tokenizer: pass --tokenizer PATH")
    return tok


# ---------------------------------------------------------------------------------------------------------------------
# verbs


def cmd_generate(args) -> dict:
    from leanlm.checkpoint import check_tokenizer_fits, load_model, model_overrides
    from leanlm.generate import TextStreamer, generate

    prompts = list(args.prompt or [])
    if args.prompt_file:
        try:
            prompts += [line for line in Path(args.prompt_file).read_text().splitlines() if line.strip()]
        except (OSError, UnicodeDecodeError) as e:
            raise LeanLMError(f"{args.prompt_file}: cannot read prompts ({e.__class__.__name__})") from None
    if not prompts:
        raise LeanLMError("no prompt: pass --prompt TEXT (repeatable) or --prompt-file FILE")
    model, tok = load_model(args.model, dtype=args.dtype, overrides=model_overrides(args.overrides))
    tok = _tokenizer_for(args, tok)
    check_tokenizer_fits(tok, model.cfg.vocab_size)
    texts = [tok.apply_chat_template([{"role": "user", "content": p}]) if args.chat else p for p in prompts]
    ids = [tok.encode(t) for t in texts]
    stop = [] if args.ignore_eos else tok.stop_ids()
    # a single prompt streams its continuation to the terminal as it is generated
    streamer = TextStreamer(tok) if len(ids) == 1 and not args.json else None
    res = generate(
        model,
        ids,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        repetition_penalty=args.repetition_penalty,
        stop_ids=stop,
        seed=args.seed,
        on_token=streamer,
        kernel=args.kernel,
    )
    if streamer:
        streamer.end()
    outputs = [tok.decode(t) for t in res.tokens]
    if not args.json and streamer is None:
        for p, o in zip(prompts, outputs):
            print(f"--- {p}\n{o}")
    n_new = sum(len(t) for t in res.tokens)
    decode_tps = res.n_decode_tokens / res.decode_seconds if res.decode_seconds > 0 else None
    if not args.json:
        print(
            f"[{res.prompt_tokens} prompt tokens in {res.prefill_seconds:.2f}s, {n_new} new tokens, "
            f"decode {decode_tps or 0:.1f} tok/s]",
            file=sys.stderr,
        )
    return {
        "outputs": outputs,
        "tokens": res.tokens,
        "prompt_tokens": res.prompt_tokens,
        "new_tokens": n_new,
        "prefill_seconds": res.prefill_seconds,
        "decode_seconds": res.decode_seconds,
        "decode_tokens_per_s": decode_tps,
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
    }


def cmd_eval(args) -> dict:
    from leanlm.checkpoint import check_tokenizer_fits, load_model, model_overrides
    from leanlm.evaluate import evaluate

    for d in args.data:  # fail on a bad path before spending seconds loading the model
        if not Path(d).is_file():
            raise LeanLMError(f"{d}: no such file")
    model, tok = load_model(args.model, dtype=args.dtype, overrides=model_overrides(args.overrides))
    tok = _tokenizer_for(args, tok)
    check_tokenizer_fits(tok, model.cfg.vocab_size)
    res = evaluate(
        model,
        tok,
        args.data,
        seq_len=args.seq_len,
        stride=args.stride,
        max_windows=args.max_windows,
        batch_size=args.batch_size,
        progress=not args.json,
    )
    res = {"model": args.model, "data": args.data, **res}
    if hasattr(model, "lte_report"):  # LTE: the FFN sparsity its routers chose on this text
        res["lte"] = model.lte_report()
    if not args.json:
        print(f"protocol: {res['protocol']}")
        print(
            f"perplexity {res['perplexity']:.4f} | bits/byte {res['bits_per_byte']:.4f} | "
            f"{res['n_tokens_scored']} tokens in {res['n_windows']} windows"
        )
        if "lte" in res:
            print(
                f"LTE FFN sparsity {res['lte']['ffn_sparsity']:.4f} | FFN cost incl. routers "
                f"{res['lte']['ffn_cost']:.4f}"
            )
    return res


def cmd_bench(args) -> dict:
    from leanlm.bench import format_table, run_bench
    from leanlm.checkpoint import model_overrides

    what = [w.strip() for w in args.what.split(",") if w.strip()]  # checked by run_bench before loading
    res = run_bench(
        args.model,
        vs=args.vs,
        what=what,
        seq_len=args.seq_len,
        batch=args.batch_size,
        prompt_len=args.prompt_len,
        new_tokens=args.new_tokens,
        repeats=args.repeats,
        warmup=args.warmup,
        dtype=args.dtype or "float32",
        threads=args.threads,
        text=args.text,
        overrides=model_overrides(args.overrides),
        kernel=args.kernel,
    )
    if not args.json:
        print(format_table(res))
    return res


def cmd_prepare(args) -> dict:
    from leanlm.data import prepare

    res = prepare(
        args.inputs,
        args.out,
        tokenizer=args.tokenizer,
        vocab_size=args.vocab_size,
        val_fraction=args.val_fraction,
        seed=args.seed,
        progress=not args.json,
    )
    if not args.json:
        what = "reused" if res.get("reused") else "wrote"
        print(
            f"{what} {args.out}: {res['train_tokens']:,} train + {res['val_tokens']:,} val tokens "
            f"from {res['documents']} documents, vocab {res['vocab_size']}"
        )
    return {"out": str(args.out), **res}


def cmd_demo(args) -> dict:
    from leanlm.demo import run_demo

    res = run_demo(args.out, quick=args.quick, progress=not args.json)
    if not args.json:
        print(Path(res["report"]).read_text())
    return res


def cmd_convert(args) -> dict:
    from leanlm.checkpoint import load_model, save_checkpoint
    from leanlm.hf import export_hf

    out = Path(args.out)
    if out.exists() and any(out.iterdir()) and not args.force:
        raise LeanLMError(f"{out}: exists and is not empty (pass --force to replace it)")
    model, tok = load_model(args.src, dtype=args.dtype)
    if args.to == "hf":
        export_hf(model, tok, out)
    else:
        save_checkpoint(model, tok, out)
    if not args.json:
        print(f"wrote {args.to} checkpoint {out} ({model.num_params() / 1e6:.1f}M parameters)")
    return {
        "src": args.src,
        "out": str(out),
        "format": args.to,
        "params": model.num_params(),
        "config": model.cfg.to_dict(),
    }


# ---------------------------------------------------------------------------------------------------------------------
# parser


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="leanlm",
        description="Train, convert, evaluate, benchmark and serve LLaMA-family models that do less work per token.",
    )
    sub = ap.add_subparsers(dest="verb", metavar="VERB", required=True)

    p = sub.add_parser(
        "generate",
        help="generate text from prompts (KV cache, streaming)",
        description="Generate text with a static KV cache: one prefill, then one token per step. "
        "A single prompt is streamed to the terminal.",
    )
    _model_args(p)
    p.add_argument("--prompt", "-p", action="append", help="prompt text; repeat for a batch of prompts")
    p.add_argument("--prompt-file", help="file with one prompt per non-empty line (added to --prompt)")
    p.add_argument(
        "--chat",
        action="store_true",
        help="wrap each prompt as a user message in the tokenizer's chat template (error if it has none)",
    )
    p.add_argument("--max-new-tokens", "-n", type=int, default=128, help="tokens to generate per prompt (default 128)")
    p.add_argument("--temperature", "-t", type=float, default=0.0, help="sampling temperature; 0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=None, help="sample only among the k most likely tokens")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling: smallest set with probability >= p")
    p.add_argument(
        "--repetition-penalty",
        type=float,
        default=1.0,
        help="divide positive / multiply negative logits of already seen tokens by this (default 1 = off)",
    )
    p.add_argument("--ignore-eos", action="store_true", help="do not stop at end-of-sequence tokens")
    p.add_argument("--seed", type=int, default=0, help="random seed for sampling (default 0)")
    p.add_argument("--tokenizer", help="tokenizer to use instead of the model's (tokenizer.json, directory, .gguf)")
    _json_arg(p)
    _kernel_arg(p)
    p.set_defaults(fn=cmd_generate)

    p = sub.add_parser(
        "eval",
        help="perplexity and bits-per-byte on text files",
        description="Perplexity and bits-per-byte of a model on text files. The whole text is "
        "tokenized once; scored in non-overlapping windows of --seq-len tokens, or in "
        "sliding windows advancing by --stride. The protocol is printed with the result.",
    )
    _model_args(p)
    p.add_argument("--data", "-d", nargs="+", required=True, help="UTF-8 text file(s), concatenated in order")
    p.add_argument("--seq-len", type=int, default=512, help="window length in tokens (default 512)")
    p.add_argument(
        "--stride",
        type=int,
        default=None,
        help="sliding-window step; only the last `stride` tokens of "
        "each window after the first are scored (default: non-overlapping windows)",
    )
    p.add_argument("--max-windows", type=int, default=None, help="score only the first N windows")
    p.add_argument("--batch-size", type=int, default=1, help="windows per forward pass (default 1)")
    p.add_argument("--tokenizer", help="tokenizer to use instead of the model's (tokenizer.json, directory, .gguf)")
    _json_arg(p)
    p.set_defaults(fn=cmd_eval)

    p = sub.add_parser(
        "bench",
        help="training-step, prefill and decode speed and memory, A vs B in one run",
        description="Benchmark a model or config: training step (forward+backward+AdamW) tokens/s and "
        "peak memory, prefill tokens/s, decode tokens/s and peak memory. With --vs, a "
        "second model runs alternately in the same process and every metric is reported "
        "as a ratio with median and spread; --vs hf compares against transformers' "
        "LlamaForCausalLM / generate on the same weights.",
    )
    _model_args(p)
    p.add_argument("--vs", default=None, metavar="REF|hf", help="second model/config to compare, or 'hf'")
    p.add_argument("--what", default="train,prefill,decode", help="comma list of train,prefill,decode (default all)")
    p.add_argument("--seq-len", type=int, default=2048, help="training-step sequence length (default 2048)")
    p.add_argument("--batch-size", type=int, default=1, help="batch size for every benchmark (default 1)")
    p.add_argument("--prompt-len", type=int, default=256, help="prompt length for prefill and decode (default 256)")
    p.add_argument("--new-tokens", type=int, default=128, help="tokens generated per decode run (default 128)")
    p.add_argument("--repeats", type=int, default=5, help="measured rounds per variant (default 5)")
    p.add_argument("--warmup", type=int, default=1, help="unmeasured rounds first (default 1)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    p.add_argument(
        "--text",
        default=None,
        metavar="DATA_DIR",
        help="use the validation tokens of a prepared data directory "
        "instead of random ids (matters for methods that choose per token what to skip, e.g. SUBLLM)",
    )
    _kernel_arg(p)
    _json_arg(p)
    p.set_defaults(fn=cmd_bench)

    p = sub.add_parser(
        "prepare",
        help="tokenize text into memory-mapped train/val token files",
        description="Tokenize text files, directories, globs or the word 'stdlib' (the Python standard "
        "library sources of this interpreter, tests excluded) into train.bin/val.bin "
        "(uint16/uint32), split by document, with an end-of-document token between "
        "documents and a manifest.json. Re-running with the same inputs reuses the result.",
    )
    p.add_argument("inputs", nargs="+", help="files, directories, globs, or 'stdlib'")
    p.add_argument("--out", "-o", required=True, help="output directory")
    p.add_argument(
        "--tokenizer",
        default=None,
        help="reuse a tokenizer (tokenizer.json, model directory, .gguf or "
        "a preset with weights such as smollm2-135m); default: train a byte-level BPE on the data",
    )
    p.add_argument("--vocab-size", type=int, default=8192, help="vocabulary of the trained BPE (default 8192)")
    p.add_argument("--val-fraction", type=float, default=0.05, help="fraction of documents for validation (0.05)")
    p.add_argument("--seed", type=int, default=0, help="seed of the document split (default 0)")
    _json_arg(p)
    p.set_defaults(fn=cmd_prepare)

    p = sub.add_parser(
        "demo",
        help="the main job: prepare the stdlib corpus, train, evaluate, benchmark, report",
        description="Prepare the Python standard library corpus, train the dense baseline and every "
        "efficiency method in leanlm at a small size on the same tokens, evaluate and "
        "benchmark them, and write OUT/report.md with PNG plots.",
    )
    p.add_argument("--out", default="demo", help="output directory (default ./demo)")
    p.add_argument("--quick", action="store_true", help="a tiny model and few steps (about a minute)")
    _json_arg(p)
    p.set_defaults(fn=cmd_demo)

    from leanlm.train import add_train_parser

    add_train_parser(sub)

    p = sub.add_parser(
        "convert",
        help="HF dir / GGUF -> leanlm checkpoint, or leanlm baseline -> HF dir",
        description="Convert between formats. --to leanlm (default) writes model.safetensors + "
        "config.json + tokenizer.json; --to hf writes a LlamaForCausalLM directory that "
        "transformers' from_pretrained and AutoTokenizer load.",
    )
    p.add_argument("src", help="what to convert: preset, leanlm checkpoint, HF directory or .gguf file")
    p.add_argument("out", help="output directory (written atomically)")
    p.add_argument("--to", choices=("leanlm", "hf"), default="leanlm", help="output format (default leanlm)")
    p.add_argument("--dtype", choices=DTYPE_CHOICES, default=None, help="store the weights in this dtype")
    p.add_argument("--force", action="store_true", help="replace a non-empty output directory")
    _json_arg(p)
    p.set_defaults(fn=cmd_convert)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result = args.fn(args)
    except (LeanLMError, OSError) as e:  # OSError: disk full, permissions, ...: the environment, not a bug
        print(f"leanlm: error: {e}", file=sys.stderr)
        if args.json:
            print(json.dumps({"ok": False, "error": str(e)}))
        return 2
    except KeyboardInterrupt:
        print("leanlm: interrupted", file=sys.stderr)
        return 130
    if args.json and os.environ.get("RANK", "0") == "0":  # under torchrun only rank 0 reports
        print(json.dumps({"ok": True, **result}, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
