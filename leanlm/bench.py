"""In-process throughput benchmarks that compare two variants fairly: same inputs, alternating order, ratios per repeat.

    from leanlm.bench import run_bench, format_table
    result = run_bench("smollm2-135m", vs="hf", what=["prefill", "decode"], repeats=5)
    print(format_table(result))

Variant A is `model`; variant B is `vs`: another model reference, "hf" for a transformers LlamaForCausalLM sharing
A's weights (leanlm.hf.to_hf_model), or "llama.cpp" for llama.cpp running A's GGUF file (leanlm.llamacpp). Every
repeat measures A and B once each, back to back, and swaps who goes first
on every other repeat so that slow drift (thermal throttling, other processes) does not favour one side. The speedup
of A over B is computed per repeat, `A tokens/s / B tokens/s`, and reported as the median with min and max over
repeats; absolute numbers are reported the same way, with every sample kept.

What is measured is defined in leanlm.measure.DEFINITIONS (identical work on both sides); executed FLOPs per token
come from `Transformer.flops` after the measurement, so a method that decides at inference what to skip is costed
at what it skipped in this run, and each method reports what it did (`Method.report`).
"""

from __future__ import annotations

import textwrap
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path

import torch
from torch import nn

from leanlm.checkpoint import load_model
from leanlm.errors import LeanLMError
from leanlm.hf import smollm2_gguf, to_hf_model
from leanlm.kernels import check_kernel
from leanlm.llamacpp import LlamaCpp
from leanlm.measure import (
    DEFINITIONS,
    SEED,
    Tokens,
    TrainStep,
    decode,
    kv_cache_bytes,
    machine,
    prefill,
    reports,
    reset_stats,
    runs_in_turn,
    summarize,
)
from leanlm.model import DTYPES, PASSES, Transformer
from leanlm.quant import weight_bytes

WHATS = PASSES  # what `leanlm bench --what` measures: the passes Transformer.flops counts


def _check_args(
    what: Sequence[str], seq_len: int, batch: int, prompt_len: int, new_tokens: int, repeats: int, warmup: int
) -> None:
    unknown = [w for w in what if w not in WHATS]
    if unknown or not what:
        got = repr(unknown[0]) if unknown else "(none)"
        raise LeanLMError(f"--what: unknown benchmark {got} (choose from {','.join(WHATS)})")
    for name, value, least in (
        ("repeats", repeats, 1),
        ("warmup", warmup, 0),
        ("batch-size", batch, 1),
        ("seq-len", seq_len, 2),
        ("prompt-len", prompt_len, 1),
        ("new-tokens", new_tokens, 2),
    ):
        if value < least:
            raise LeanLMError(f"--{name} must be at least {least} (got {value})")


def _check_context(
    model: Transformer, ref: str, what: Sequence[str], seq_len: int, prompt_len: int, new_tokens: int
) -> None:
    ctx = model.cfg.max_seq_len
    if "train" in what and seq_len > ctx:
        raise LeanLMError(f"--seq-len {seq_len} exceeds the context of {ref} ({ctx} tokens)")
    if "prefill" in what and prompt_len > ctx:
        raise LeanLMError(f"--prompt-len {prompt_len} exceeds the context of {ref} ({ctx} tokens)")
    if "decode" in what and prompt_len + new_tokens > ctx:
        raise LeanLMError(
            f"--prompt-len {prompt_len} + --new-tokens {new_tokens} exceed the context of {ref} ({ctx} tokens)"
        )


def flops(model: Transformer, what: str, seq_len: int, prompt_len: int, new_tokens: int) -> float:
    """Executed FLOPs per token of measurement `what`: train and prefill per token of a causal pass over seq_len /
    prompt_len tokens; decode one step at the mean context of the generated tokens, prompt_len + new_tokens / 2
    (every cached key is attended to, not half)."""
    length = {"train": seq_len, "prefill": prompt_len, "decode": prompt_len + new_tokens / 2}[what]
    return model.flops(what, length)


def gguf_of(ref: str) -> Path:
    """The GGUF file a model reference loads from: a .gguf path, or the smollm2-135m preset's file."""
    if ref == "smollm2-135m" and not Path(ref).exists():
        return smollm2_gguf()
    if ref.lower().endswith(".gguf") and Path(ref).is_file():
        return Path(ref)
    raise LeanLMError(f"--vs llama.cpp runs the same GGUF file in both: {ref} is not a .gguf file or smollm2-135m")


def run_bench(
    model: str,
    vs: str | None = None,
    what: Sequence[str] = WHATS,
    seq_len: int = 2048,
    batch_size: int = 1,
    prompt_len: int = 256,
    new_tokens: int = 128,
    repeats: int = 5,
    warmup: int = 1,
    dtype: str | None = None,
    threads: int | None = None,
    device: str | None = None,
    text: str | None = None,
    overrides: dict | None = None,
    kernel: str = "torch",
) -> dict:
    """Benchmark model reference `model` (A), alone or against `vs` (B: a model reference, or "hf").

    Arguments mirror the `leanlm bench` flags; `device` defaults to CUDA when available.
    Returns a JSON-able dict: date, machine, settings, variants (ref, params, flops_per_token per measurement) and,
    per measurement in `what`, each variant's tokens/s summary (median, min, max, samples), peak extra memory (max
    over repeats) and its methods' reports, plus `ratio`: A tokens/s / B tokens/s per repeat (> 1 means A, the
    --model, is faster), and `flop_ratio`: B's executed FLOPs per token / A's, the speed-up that the skipped work
    alone would give. `text`: a prepared data directory whose validation tokens replace the random ids.
    `overrides`: model config keys changed in A at load (checkpoint.model_overrides). `kernel`: the decode kernel of
    every leanlm variant (leanlm.kernels; transformers models keep their own).
    """
    if dtype is not None and dtype not in DTYPES:
        raise LeanLMError(f"--dtype must be one of {', '.join(DTYPES)} (got {dtype!r})")
    if threads is not None:
        if threads < 1:
            raise LeanLMError(f"--threads must be at least 1 (got {threads})")
        torch.set_num_threads(threads)
    torch.manual_seed(SEED)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))

    _check_args(what, seq_len, batch_size, prompt_len, new_tokens, repeats, warmup)
    check_kernel(kernel)
    # dtype None: as stored (a GGUF in Q8_0/Q4_x packed); transformers needs A's weights in float
    model_a = load_model(model, dtype=dtype or ("float32" if vs == "hf" else None), overrides=overrides)[0].to(dev)
    tokens = Tokens.from_data(text, model_a.cfg.vocab_size) if text else Tokens()
    _check_context(model_a, model, what, seq_len, prompt_len, new_tokens)
    variants = {"A": {"ref": model, "params": model_a.num_params(), "flops_per_token": {}}}
    variants["A"]["weight_bytes"] = weight_bytes(model_a)
    models: dict[str, nn.Module] = {"A": model_a}
    if vs == "hf":
        if model_a.cfg.methods:
            raise LeanLMError(
                f"--vs hf compares the dense baseline; {model} is {model_a.cfg.arch} (use --vs DENSE_REF)"
            )
        models["B"] = to_hf_model(model_a).to(dev)
        variants["B"] = {
            "ref": "hf",
            "description": "transformers LlamaForCausalLM sharing A's weights",
            "params": model_a.num_params(),
            "weight_bytes": weight_bytes(model_a),
            "flops_per_token": {},
        }
    elif vs == "llama.cpp":
        if "train" in what or batch_size != 1 or dev.type != "cpu":
            raise LeanLMError("--vs llama.cpp measures prefill and decode of one row on the CPU (--batch-size 1)")
        path = gguf_of(model)
        models["B"] = LlamaCpp(path, prompt_len + new_tokens + 8, torch.get_num_threads())
        variants["B"] = {
            "ref": "llama.cpp",
            "description": f"llama.cpp (llama-cpp-python {models['B'].version}) on {path.name}, "
            f"{models['B'].threads} threads, greedy",
            "system_info": models["B"].system_info,
            "params": model_a.num_params(),
            "weight_bytes": path.stat().st_size,
            "flops_per_token": {},
        }
    elif vs is not None:
        model_b = load_model(vs, dtype=dtype)[0].to(dev)
        _check_context(model_b, vs, what, seq_len, prompt_len, new_tokens)
        models["B"] = model_b
        variants["B"] = {"ref": vs, "params": model_b.num_params(), "flops_per_token": {}}
        variants["B"]["weight_bytes"] = weight_bytes(model_b)

    results = {}
    # training changes the weights: the inference measurements go first and see the model as loaded
    for w in [w for w in ("prefill", "decode", "train") if w in what]:
        for m in models.values():
            reset_stats(m)
        runners: dict[str, Callable] = {}
        for k, m in models.items():
            if w == "train":
                runners[k] = TrainStep(m, batch_size, seq_len, tokens)
            elif w == "prefill":
                runners[k] = lambda m=m: prefill(m, batch_size, prompt_len, tokens)
            else:
                runners[k] = lambda m=m: decode(m, batch_size, prompt_len, new_tokens, tokens, kernel=kernel)
        try:
            tps, mem = runs_in_turn(runners, repeats, dev, warmup)
        finally:
            for run in runners.values():
                if isinstance(run, TrainStep):
                    run.close()
        entry = {"unit": "tokens/s", "definition": DEFINITIONS[w]}
        for k, m in models.items():
            entry[k] = {**summarize(tps[k]), "peak_mem_bytes": max(mem[k]) if mem[k] else None}
            if w != "train":  # what the methods did at inference, e.g. SUBLLM's retention, LTE's sparsity
                entry[k]["methods"] = reports(m)
            # executed FLOPs at what the methods skipped here (transformers runs A's dense model)
            costed = m if isinstance(m, Transformer) else model_a
            variants[k]["flops_per_token"][w] = flops(costed, w, seq_len, prompt_len, new_tokens)
        if "B" in runners:
            entry["ratio"] = summarize([a / b for a, b in zip(tps["A"], tps["B"])])
            entry["flop_ratio"] = variants["B"]["flops_per_token"][w] / variants["A"]["flops_per_token"][w]
            entry["ratio_over_flop_ratio"] = entry["ratio"]["median"] / entry["flop_ratio"]
        results[w] = entry
    if {"prefill", "decode"} & set(what):  # the caches decoding needs at the end of the measured context
        length = prompt_len + (new_tokens if "decode" in what else 0)
        for k, m in models.items():
            if isinstance(m, Transformer):
                variants[k]["kv_cache_bytes"] = {"tokens": length, "bytes": kv_cache_bytes(m, batch_size, length)}

    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(dev),
        "settings": {
            "seq_len": seq_len,
            "batch": batch_size,
            "prompt_len": prompt_len,
            "new_tokens": new_tokens,
            "repeats": repeats,
            "warmup": warmup,
            "dtype": dtype or "as stored",
            "decode_kernel": kernel,
            "seed": SEED,
            "order": "A then B on even repeats, B then A on odd ones",
            "tokens": f"validation tokens of {text}" if text else f"random ids (seed {SEED})",
        },
        "variants": variants,
        "ratio_definition": "A/B = A tokens/s / B tokens/s within the same repeat (> 1: A, the --model, is faster)",
        "results": results,
    }


# -- output ------------------------------------------------------------------------------------------------------------


def _rate(x: float) -> str:
    return f"{x:,.0f}" if x >= 100 else f"{x:.3g}"


def _spread(s: dict, fmt: Callable[[float], str]) -> str:
    return f"{fmt(s['median'])} [{fmt(s['min'])}, {fmt(s['max'])}]"


def _mib(b: int | None) -> str:
    return "n/a" if b is None else f"{b / 2**20:,.1f} MiB"


def format_table(result: dict) -> str:
    """A terminal table of a `run_bench` result: medians with [min, max] over repeats, then the definitions."""
    m, s, variants = result["machine"], result["settings"], result["variants"]
    hw = m.get("gpu", m["processor"])
    lines = [
        f"leanlm bench  {result['date']}  {m['device']} ({hw}), {m['threads']} threads, torch {m['torch']}, "
        f"{s['dtype']}, batch {s['batch']}, {s['repeats']} repeats after {s['warmup']} warmup"
    ]
    for k, v in variants.items():
        flops_s = ", ".join(f"{w} {f / 1e9:.3g}" for w, f in v["flops_per_token"].items())
        desc = f" ({v['description']})" if "description" in v else ""
        lines.append(
            f"{k}: {v['ref']}{desc}: {v['params'] / 1e6:,.2f}M params, "
            f"{v['weight_bytes'] / 1e6:,.1f} MB of weights; GFLOP/token: {flops_s}"
            + (f"; KV cache {_mib(kv['bytes'])} at {kv['tokens']} tokens" if (kv := v.get("kv_cache_bytes")) else "")
        )
    has_b = "B" in variants
    header = ["what", "A tokens/s median [min, max]"]
    if has_b:
        header += ["B tokens/s median [min, max]", "A/B median [min, max]", "FLOP B/A"]
    header.append("peak mem A" + (" / B" if has_b else ""))
    rows = [header]
    for w, r in result["results"].items():
        row = [w, _spread(r["A"], _rate)]
        if has_b:
            row += [_spread(r["B"], _rate), _spread(r["ratio"], lambda x: f"{x:.3f}"), f"{r['flop_ratio']:.3f}"]
        row.append(" / ".join(_mib(r[k]["peak_mem_bytes"]) for k in variants))
        rows.append(row)
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines.append("")
    lines += ["  ".join(c.ljust(wd) for c, wd in zip(row, widths)).rstrip() for row in rows]
    notes = [
        f"settings: seq_len {s['seq_len']} (train), prompt_len {s['prompt_len']}, new_tokens {s['new_tokens']}, "
        f"decode kernel {s['decode_kernel']}"
    ]
    for w, r in result["results"].items():
        for k in variants:
            notes += [f"{w} {k}: {rep['summary']}" for rep in r[k].get("methods", {}).values()]
    if has_b:
        notes += [
            f"order: {s['order']}",
            result["ratio_definition"],
            "FLOP B/A: executed FLOPs per token of B / of A, the speed-up the skipped work alone would give",
        ]
    notes.append(f"tokens: {s['tokens']}")
    notes += [f"{w}: {result['results'][w]['definition']}" for w in result["results"]]
    notes.append(
        "peak mem: extra memory of one measured call above what was in use before it, max over repeats "
        "(CUDA: allocated tensors; CPU: sampled RSS, approximate)"
    )
    lines.append("")
    lines += [textwrap.fill(n, width=120, subsequent_indent="    ") for n in notes]
    return "\n".join(lines)
