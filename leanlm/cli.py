"""The `leanlm` command line: one verb per job, each a thin wrapper over a library function.

Every verb takes `--json`: the result is then printed as exactly one JSON object on the last line of stdout.
Problems the user can fix (missing files, bad values, unsupported models) print one line `leanlm: error: ...` to
stderr and exit with status 2 (with `--json`, also a JSON object {"ok": false, "error": ...}).
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

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
        help="compute dtype of the weights (default: as stored: the checkpoint's; a GGUF's Q8_0/Q4_0/Q4_1 blocks stay "
        "packed (smollm2-135m too), other GGUF types and random-init presets are float32); a float dtype dequantizes "
        "a GGUF",
    )
    _set_arg(
        p,
        "model.KEY=VALUE",
        "change a model setting at load (preset or leanlm checkpoint; with bench, --model only), e.g. "
        "model.subllm.threshold=0.1; repeatable",
    )


def _kernel_arg(p: argparse.ArgumentParser, default: str = "torch") -> None:
    p.add_argument(
        "--kernel",
        choices=("auto", "torch", "cpp") if default == "auto" else ("torch", "cpp"),
        default=default,
        help="one-token CPU decode steps (batch 1, float32 activations): torch = pure PyTorch; cpp = fused C++ ops "
        "per block and LTE FFN reading float or packed weights, built on first use (needs a C++ compiler and ninja)"
        + ("; auto = cpp for a CPU model where a C++ compiler and ninja exist, else torch" if default == "auto" else "")
        + f" (default {default})",
    )


def _calibrate_args(p: argparse.ArgumentParser, what: str, tokens: int) -> None:
    where = "a file, a shipped text's name (e.g. wikitext-2-valid) or a prepared data directory (its training split)"
    p.add_argument("--calibrate", metavar="TEXT", help=f"{what}: {where}")
    p.add_argument("--calibrate-tokens", type=int, default=tokens, help=f"tokens of --calibrate (default {tokens})")


def _json_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print the result as one JSON object on the last stdout line")


def _flags(fn: Callable, args: argparse.Namespace, **given: Any) -> dict:
    """Keyword arguments for library function `fn`: the verb's flags named like its parameters, then `given`."""
    names = inspect.signature(fn).parameters
    return {**{k: v for k, v in vars(args).items() if k in names}, **given}


def _tokenizer_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tokenizer", help="tokenizer to use instead of the model's (tokenizer.json, directory, .gguf)")


def _set_arg(p: argparse.ArgumentParser, metavar: str, help: str) -> None:
    p.add_argument("--set", dest="sets", action="append", default=[], metavar=metavar, help=help)


# ---------------------------------------------------------------------------------------------------------------------
# verbs


def cmd_generate(args) -> dict:
    from leanlm.checkpoint import check_tokenizer_fits, load_model, model_overrides
    from leanlm.data import model_tokenizer
    from leanlm.generate import TextStreamer, generate
    from leanlm.kernels import auto_kernel

    prompts = list(args.prompt or [])
    if args.prompt_file:
        try:
            prompts += [line for line in Path(args.prompt_file).read_text().splitlines() if line.strip()]
        except (OSError, UnicodeDecodeError) as e:
            raise LeanLMError(f"{args.prompt_file}: cannot read prompts ({e.__class__.__name__})") from None
    if not prompts:
        raise LeanLMError("no prompt: pass --prompt TEXT (repeatable) or --prompt-file FILE")
    model, tok = load_model(args.model, dtype=args.dtype, overrides=model_overrides(args.sets))
    tok = model_tokenizer(tok, args.model, args.tokenizer)
    check_tokenizer_fits(tok, model.cfg.vocab_size)
    texts = [tok.apply_chat_template([{"role": "user", "content": p}]) if args.chat else p for p in prompts]
    ids = [tok.encode(t) for t in texts]
    stop = [] if args.ignore_eos else tok.stop_ids()
    # a single prompt streams its continuation to the terminal as it is generated
    streamer = TextStreamer(tok) if len(ids) == 1 and not args.json else None
    # --dtype is the weights'; the cache follows the loaded model (dtype=None)
    given = {"model": model, "prompts": ids, "stop_ids": stop, "on_token": streamer, "dtype": None}
    res = generate(**_flags(generate, args, **given, kernel=auto_kernel(args.kernel, model)))
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
    from leanlm.data import model_tokenizer, text_file
    from leanlm.evaluate import evaluate
    from leanlm.longctx import format_table, parse_settings, passkey
    from leanlm.measure import reports
    from leanlm.quant import weight_bytes

    # fail on bad values or a bad path before spending seconds loading the model
    if args.task == "passkey":
        if args.data:
            raise LeanLMError("--data is for --task ppl; --task passkey builds its own prompts")
        given = parse_settings(args.lengths, args.depths, args.trials, args.style)
    elif not args.data:
        raise LeanLMError("--task ppl needs --data FILE... (a text file or a shipped text's name, e.g. wikitext-2)")
    files = [text_file(d) for d in args.data or []]
    model, tok = load_model(args.model, dtype=args.dtype, overrides=model_overrides(args.sets))
    tok = model_tokenizer(tok, args.model, args.tokenizer)
    check_tokenizer_fits(tok, model.cfg.vocab_size)
    if args.task == "passkey":
        given = {**given, "model": model, "tokenizer": tok, "progress": not args.json}
        res = {"model": args.model, **passkey(**_flags(passkey, args, **given))}
        if not args.json:
            print(format_table(res))
        return res
    res = evaluate(**_flags(evaluate, args, model=model, tokenizer=tok, paths=files, progress=not args.json))
    # what the methods did on this text, e.g. LTE's FFN sparsity, SUBLLM's retention
    res = {
        "model": args.model,
        "data": args.data,
        **res,
        "methods": reports(model),
        "weight_bytes": weight_bytes(model),
    }
    if not args.json:
        print(f"protocol: {res['protocol']}")
        print(
            f"perplexity {res['perplexity']:.4f} | bits/byte {res['bits_per_byte']:.4f} | "
            f"{res['n_tokens_scored']} tokens in {res['n_windows']} windows"
        )
        for report in res["methods"].values():
            print(report["summary"])
    return res


def cmd_bench(args) -> dict:
    from leanlm.bench import format_table, run_bench
    from leanlm.checkpoint import model_overrides

    what = [w.strip() for w in args.what.split(",") if w.strip()]  # checked by run_bench before loading
    given = {"what": what, "dtype": args.dtype, "overrides": model_overrides(args.sets)}
    res = run_bench(**_flags(run_bench, args, **given))
    if not args.json:
        print(format_table(res))
    return res


def cmd_prepare(args) -> dict:
    from leanlm.data import prepare

    res = prepare(**_flags(prepare, args, progress=not args.json))
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
    from leanlm.checkpoint import convert

    res = convert(**_flags(convert, args))
    if not args.json:
        for k, v in res["calibrated"].items():
            print(f"calibrated {k} = {v}")
        print(f"wrote {args.to} checkpoint {res['out']} ({res['arch']}, {res['params'] / 1e6:.1f}M parameters)")
    return res


def cmd_quantize(args) -> dict:
    from leanlm.checkpoint import quantize

    res = quantize(**_flags(quantize, args))
    if not args.json:
        for k, v in res["calibrated"].items():
            print(f"calibrated {k} = {v}")
        q = res["quant"]
        print(
            f"wrote {res['out']} ({res['arch']}: weights {q['format']}, head {q['head']}): "
            f"{res['weight_bytes'] / 1e6:.1f} MB of weights, {res['weight_bytes_vs_float32']:.3f}x float32"
        )
    return res


def cmd_train(args) -> dict:
    from leanlm.config import apply_overrides, read_yaml
    from leanlm.training import config_from_dict, section_keys, train

    raw = apply_overrides(read_yaml(args.config), list(args.sets), section_keys())
    # the shortcuts bypass YAML parsing: a directory named `123` or `true` stays a path
    shortcuts = {"init": args.init, "out": args.out, "resume": True if args.resume else None}
    run = raw["run"] = dict(raw.get("run") or {})
    run.update({k: v for k, v in shortcuts.items() if v is not None})
    result = train(config_from_dict(raw))
    if not args.json and int(os.environ.get("RANK", "0")) == 0:
        val = f"{result['val_loss']:.4f}" if result["val_loss"] is not None else "-"
        loss = f"{result['loss']:.4f}" if result["loss"] is not None else "-"
        tps = f"{result['tokens_per_s']:,.0f}" if result["tokens_per_s"] else "-"
        print(
            f"{result['steps']} steps, {result['tokens']:,} tokens: loss {loss}, val_loss {val}, {tps} tok/s; "
            f"model in {result['checkpoint']}"
        )
    return result


# ---------------------------------------------------------------------------------------------------------------------
# parser


def _generate_flags(p: argparse.ArgumentParser) -> None:
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
    _tokenizer_arg(p)
    _kernel_arg(p, default="auto")


def _eval_flags(p: argparse.ArgumentParser) -> None:
    _model_args(p)
    tasks = "ppl: perplexity on --data (default); passkey: recall a 5-digit key hidden in long prompts (longctx.py)"
    p.add_argument("--task", choices=("ppl", "passkey"), default="ppl", help=tasks)
    p.add_argument(
        "--data",
        "-d",
        nargs="+",
        help="ppl: UTF-8 text file(s), concatenated in order, or the name of a text shipped with leanlm: wikitext-2 "
        "(the test split), wikitext-2-valid",
    )
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
    p.add_argument("--lengths", default="1024,2048", help="passkey: prompt lengths in tokens (default 1024,2048)")
    p.add_argument("--depths", default="0,0.5,1", help="passkey: needle depths, 0 = start, 1 = end (default 0,0.5,1)")
    p.add_argument("--trials", type=int, default=5, help="passkey: prompts per length and depth (default 5)")
    style = "passkey: filler and needle: text (wikitext-2) or code (Python stdlib) (default text)"
    p.add_argument("--passkey-style", dest="style", choices=("text", "code"), default="text", help=style)
    p.add_argument("--seed", type=int, default=0, help="passkey: seed of the keys and filler offsets (default 0)")
    _tokenizer_arg(p)


def _bench_flags(p: argparse.ArgumentParser) -> None:
    _model_args(p)
    p.add_argument(
        "--vs",
        default=None,
        metavar="REF|hf|llama.cpp",
        help="second model/config to compare; 'hf': transformers on A's weights; 'llama.cpp': llama.cpp on A's GGUF "
        "file (needs llama-cpp-python: pip install 'leanlm[llamacpp]')",
    )
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


def _prepare_flags(p: argparse.ArgumentParser) -> None:
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


def _demo_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="demo", help="output directory (default ./demo)")
    p.add_argument("--quick", action="store_true", help="a tiny model and few steps (about a minute)")


def _train_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", required=True, metavar="FILE", help="the YAML training config")
    _set_arg(
        p,
        "KEY=VALUE",
        "override one config key, value parsed as YAML, e.g. --set run.steps=100 --set optim.lr=1e-3 (repeatable)",
    )
    p.add_argument(
        "--init",
        metavar="REF",
        help="fine-tune from this model: preset, checkpoint dir, HF dir or .gguf "
        "(sets run.init; the data is tokenized with its tokenizer)",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue from the latest complete checkpoint in the output directory (sets run.resume)",
    )
    p.add_argument("--out", metavar="DIR", help="output directory (sets run.out)")


def _convert_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", help="what to convert: preset, leanlm checkpoint, HF directory or .gguf file")
    p.add_argument("out", help="output directory (written atomically)")
    p.add_argument("--to", choices=("leanlm", "hf"), default="leanlm", help="output format (default leanlm)")
    p.add_argument("--dtype", choices=DTYPE_CHOICES, default=None, help="store the weights in this dtype")
    p.add_argument("--force", action="store_true", help="replace a non-empty output directory")
    p.add_argument(
        "--method", dest="methods", action="append", default=[], metavar="NAME", help="add a method (repeatable)"
    )
    _set_arg(p, "model.KEY=VALUE", "set a model config key, e.g. model.lte.router_init=fitted (repeatable)")
    _calibrate_args(p, "text to convert and calibrate on", 32768)
    p.add_argument("--seed", type=int, default=0, help="seed of the new modules' initialisation (default 0)")
    _tokenizer_arg(p)


def _quantize_flags(p: argparse.ArgumentParser) -> None:
    from leanlm.quant import FORMATS

    p.add_argument(
        "src",
        help="what to quantize: preset, leanlm checkpoint (float, QAT-trained or quantized), HF "
        "directory or .gguf file",
    )
    p.add_argument("out", help="output directory (a leanlm checkpoint, written atomically)")
    p.add_argument(
        "--method",
        choices=FORMATS,
        default="int8",
        help="weight format of the blocks' linear layers: "
        "int8 (per channel), int4 (group 32, scale + min), int6 (FlexQ), ternary (BitCPM) (default int8)",
    )
    p.add_argument(
        "--group-size",
        type=int,
        default=None,
        metavar="N",
        help="inputs per scale (0: per output channel; default: int8/int6 per channel, int4 32, ternary 64)",
    )
    p.add_argument(
        "--head", choices=(*FORMATS, "float"), default=None, help="format of the embedding and lm head (default int8)"
    )
    p.add_argument(
        "--head-group-size", type=int, default=None, metavar="N", help="the head's group size (default 0: per channel)"
    )
    p.add_argument(
        "--act-bits",
        type=int,
        choices=(0, 6, 8),
        default=0,
        help="FlexQ: round every linear layer's input per token to 6 or 8 bits (default 0: float)",
    )
    p.add_argument(
        "--act8-count",
        type=int,
        default=0,
        metavar="K",
        help="FlexQ's A8 fallback: with --act-bits 6, the K most sensitive layers on --calibrate keep 8 bits",
    )
    _calibrate_args(p, "text for FlexQ's layer ranking", 8192)
    p.add_argument("--force", action="store_true", help="replace a non-empty output directory")
    _tokenizer_arg(p)


# verb -> (function, its flags, one-line help, description); every verb also takes --json
VERBS: dict[str, tuple[Callable, Callable, str, str]] = {
    "generate": (
        cmd_generate,
        _generate_flags,
        "generate text from prompts (KV cache, streaming)",
        "Generate text with a static KV cache: one prefill, then one token per step. "
        "A single prompt is streamed to the terminal.",
    ),
    "eval": (
        cmd_eval,
        _eval_flags,
        "perplexity and bits-per-byte on text files, or long-context passkey retrieval",
        "Perplexity and bits-per-byte of a model on text files. The whole text is "
        "tokenized once; scored in non-overlapping windows of --seq-len tokens, or in "
        "sliding windows advancing by --stride. The protocol is printed with the result. --task passkey instead "
        "measures whether the model recalls a 5-digit key hidden at --depths of prompts of --lengths tokens.",
    ),
    "bench": (
        cmd_bench,
        _bench_flags,
        "training-step, prefill and decode speed and memory, A vs B in one run",
        "Benchmark a model or config: training step (forward+backward+AdamW) tokens/s and "
        "peak memory, prefill tokens/s, decode tokens/s and peak memory. With --vs, a "
        "second model runs alternately in the same process and every metric is reported "
        "as a ratio with median and spread; --vs hf compares against transformers' "
        "LlamaForCausalLM / generate on the same weights, --vs llama.cpp against llama.cpp on the same GGUF file "
        "(same threads, prompt tokens and greedy decoding).",
    ),
    "prepare": (
        cmd_prepare,
        _prepare_flags,
        "tokenize text into memory-mapped train/val token files",
        "Tokenize text files, directories, globs or the word 'stdlib' (the Python standard "
        "library sources of this interpreter, tests excluded) into train.bin/val.bin "
        "(uint16/uint32), split by document, with an end-of-document token between "
        "documents and a manifest.json. Re-running with the same inputs reuses the result.",
    ),
    "demo": (
        cmd_demo,
        _demo_flags,
        "the main job: prepare the stdlib corpus, train, evaluate, benchmark, report",
        "Prepare the Python standard library corpus, train the dense baseline and every "
        "efficiency method in leanlm at a small size on the same tokens, evaluate and "
        "benchmark them, and write OUT/report.md with PNG plots.",
    ),
    "train": (
        cmd_train,
        _train_flags,
        "train or fine-tune a model from a YAML config (one process, or several under torchrun)",
        "Train a model as a YAML config says (sections model, data, optim, run, and optional distill and "
        "training methods such as ltd; leanlm/training/config.py). Writes step checkpoints, final/, metrics.csv, "
        "config.yaml and loss.png to run.out. Under `torchrun --nproc_per_node N -m leanlm train ...` the global "
        "batch is split over N processes (run.strategy: ddp or fsdp).",
    ),
    "convert": (
        cmd_convert,
        _convert_flags,
        "HF dir / GGUF -> leanlm checkpoint (optionally adding a method), or leanlm baseline -> HF dir",
        "Convert between formats and architectures. --to leanlm (default) writes model.safetensors + "
        "config.json + tokenizer.json; --to hf writes a LlamaForCausalLM directory that transformers' "
        "from_pretrained and AutoTokenizer load. --method adds an efficiency method to a trained model (e.g. lte: "
        "its FFNs grouped into experts with routers), configured with --set; --calibrate gives it text to "
        "convert and calibrate on (LTE's grouping by activations and fitted routers, SUBLLM's thresholds).",
    ),
    "quantize": (
        cmd_quantize,
        _quantize_flags,
        "pack a model's weights as int8, int4, int6 (FlexQ) or ternary (BitCPM)",
        "Quantize a model's weights and save a leanlm checkpoint that every verb loads (eval, generate, bench, "
        "convert, demo). --method sets the blocks' format, --head the embedding's and lm head's; the format and "
        "group sizes are recorded in config.json (model.quant). A GGUF in Q8_0/Q4_0/Q4_1 already loads natively "
        "quantized; quantize re-packs it.",
    ),
}


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="leanlm",
        description="Train, convert, evaluate and benchmark LLaMA-family models that do less work per token.",
    )
    sub = ap.add_subparsers(dest="verb", metavar="VERB", required=True)
    for name, (fn, flags, help_, description) in VERBS.items():
        p = sub.add_parser(name, help=help_, description=description)
        flags(p)
        _json_arg(p)
        p.set_defaults(fn=fn)
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
