"""In-process throughput benchmarks that compare two variants fairly: same inputs, alternating order, ratios per repeat.

    from leanlm.bench import run_bench, format_table
    result = run_bench("smollm2-135m", vs="hf", what=["prefill", "decode"], repeats=5)
    print(format_table(result))

Variant A is `model`; variant B is `vs`: another model reference, or "hf" for a transformers LlamaForCausalLM sharing
A's weights (leanlm.hf.to_hf_model). Every repeat measures A and B once each, back to back, and swaps who goes first
on every other repeat so that slow drift (thermal throttling, other processes) does not favour one side. The speedup
of A over B is computed per repeat, `A tokens/s / B tokens/s`, and reported as the median with min and max over
repeats; absolute numbers are reported the same way, with every sample kept.

What is measured is defined in DEFINITIONS (identical work on both sides, on random token ids from a fixed seed);
peak memory is defined by `PeakMemory`: the extra memory a measured call needs above what was in use before it.
"""

from __future__ import annotations

import ctypes
import gc
import os
import platform
import statistics
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Sequence
from datetime import datetime, timezone

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from leanlm.config import DTYPES
from leanlm.errors import LeanLMError
from leanlm.kernels import check_kernel

DEFINITIONS = {
    "train": "one training step on batch x seq_len tokens: forward, fp32 next-token cross-entropy computed from the "
    "logits, backward, AdamW step; tokens/s = batch * seq_len / step time",
    "prefill": "one forward of batch x prompt_len prompt tokens that fills a KV cache and projects only the last "
    "position to the vocabulary; tokens/s = batch * prompt_len / time",
    "decode": "greedy generation of new_tokens tokens per row after a prompt of prompt_len tokens; tokens/s counts "
    "only the steps after the first new token: batch * (new_tokens - 1) / (time from the first new token "
    "to the last); the prompt forward and first token are excluded",
}

WHATS = ("train", "prefill", "decode")
SEED = 0


# -- memory ------------------------------------------------------------------------------------------------------------


def _rss_bytes() -> int | None:
    """Resident set size of this process, or None where it cannot be read."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, AttributeError):
        pass
    try:
        import psutil
    except ImportError:
        return None
    return psutil.Process().memory_info().rss


def _return_freed_memory() -> None:
    """Hand memory that Python and malloc hold but no longer use back to the OS (glibc only)."""
    gc.collect()
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):  # not glibc (e.g. musl)
            pass


class PeakMemory:
    """Peak extra memory, in bytes, of the code in a `with` block above what was in use when the block started.

    CUDA: `torch.cuda.max_memory_allocated` after resetting the peak statistics, minus `memory_allocated` at entry:
    exact, tensors only. CPU: the resident set size, sampled every 5 ms by a background thread (and once at entry
    and at exit), peak minus the value at entry. Freed heap memory is returned to the OS before the entry value is
    taken; otherwise memory that one variant freed and malloc kept would be reused silently by the next variant,
    making whichever runs second look cheaper. The CPU number is approximate: it counts every allocation of the
    process, not only tensors, and can miss a spike shorter than the sampling interval. `bytes` is None where the
    RSS cannot be read.
    """

    INTERVAL_S = 0.005

    def __init__(self, device: torch.device):
        self.device = device
        self.bytes: int | None = None

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
            return self
        _return_freed_memory()
        self._base = _rss_bytes()
        self._peak = self._base
        self._stop = threading.Event()
        self._thread = None
        if self._base is not None:
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self.INTERVAL_S):
            self._peak = max(self._peak, _rss_bytes())

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.bytes = torch.cuda.max_memory_allocated(self.device) - self._base
            return
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self.bytes = max(0, max(self._peak, _rss_bytes()) - self._base)


# -- the measured operations -------------------------------------------------------------------------------------------
# Each runner does one measured operation and returns (tokens processed, seconds); leanlm models and transformers
# models are both accepted and do the same work.


def _is_leanlm(model: nn.Module) -> bool:
    return hasattr(model, "setup_caches")


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _vocab_size(model: nn.Module) -> int:
    return model.cfg.vocab_size if _is_leanlm(model) else model.config.vocab_size


def _sync(device: torch.device) -> None:
    # kernels run asynchronously on accelerators: wait for them so that a timer measures the work, not its launch
    if device.type == "cuda":
        torch.cuda.synchronize(device)


TEXT_TOKENS: Tensor | None = None  # set by run_bench(text=...): real text instead of random ids


def random_tokens(model: nn.Module, batch: int, length: int) -> Tensor:
    """(batch, length) token ids, the same for every model with the same vocabulary: consecutive windows of the
    text given to run_bench, else random ids from a fixed seed. (Methods that decide per token what to skip, such
    as SUBLLM's scorers, behave differently on random ids than on text.)"""
    if TEXT_TOKENS is not None:
        need = batch * length
        reps = -(-need // TEXT_TOKENS.numel())
        return TEXT_TOKENS.repeat(reps)[:need].view(batch, length).to(_device(model))
    gen = torch.Generator().manual_seed(SEED)
    return torch.randint(0, _vocab_size(model), (batch, length), generator=gen).to(_device(model))


def load_text_tokens(path: str, vocab_size: int) -> Tensor:
    """The validation tokens of a prepared data directory (`leanlm prepare`), checked against the vocabulary."""
    from leanlm.data import TokenDataset

    data = TokenDataset(path, "val")
    if data.vocab_size > vocab_size:
        raise LeanLMError(f"--text {path}: uses {data.vocab_size} token ids but the model has {vocab_size}")
    return torch.from_numpy(data.tokens[: 1 << 20].astype("int64"))


class TrainStep:
    """One training step per call on fixed random tokens; the optimizer persists between calls.

    The loss is computed here from the logits for both kinds of model (transformers gets no labels), so both sides
    do identical work. Call `close()` afterwards: it frees gradients and optimizer state and restores eval mode.
    """

    def __init__(self, model: nn.Module, batch: int, seq_len: int, lr: float = 1e-5):
        self.model = model
        self.x = random_tokens(model, batch, seq_len)  # (B, T)
        self.device = _device(model)
        self.opt = torch.optim.AdamW(model.parameters(), lr=lr)
        model.train()

    def __call__(self) -> tuple[int, float]:
        _sync(self.device)
        t0 = time.perf_counter()
        x = self.x
        logits = self.model(x) if _is_leanlm(self.model) else self.model(input_ids=x, use_cache=False).logits
        loss = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), x[:, 1:].flatten())  # (B, T, V) vs (B, T)
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        _sync(self.device)
        return x.numel(), time.perf_counter() - t0

    def close(self) -> None:
        self.opt.zero_grad(set_to_none=True)
        self.opt = None
        self.model.eval()


@torch.inference_mode()
def _prefill(model: nn.Module, batch: int, prompt_len: int) -> tuple[int, float]:
    x = random_tokens(model, batch, prompt_len)  # (B, P)
    device = _device(model)
    _sync(device)
    t0 = time.perf_counter()
    # the cache allocation is timed: transformers allocates its cache inside the forward
    if _is_leanlm(model):
        model.setup_caches(batch, prompt_len)
        try:
            model(x, last_only=True)
        finally:
            model.reset_caches()
    else:
        model(input_ids=x, use_cache=True, logits_to_keep=1)
    _sync(device)
    return x.numel(), time.perf_counter() - t0


class _FirstTokenClock:
    """A transformers streamer that notes when the first new token exists (generate first puts the prompt)."""

    def __init__(self):
        self.puts = 0
        self.first: float | None = None

    def put(self, value: Tensor) -> None:
        # transformers hands over tokens with .cpu(), which waits for the device: the clock reads a finished step
        self.puts += 1
        if self.puts == 2:
            self.first = time.perf_counter()

    def end(self) -> None:
        pass


def _decode(
    model: nn.Module,
    batch: int,
    prompt_len: int,
    new_tokens: int,
    cache_dtype: torch.dtype | None = None,
    kernel: str = "torch",
) -> tuple[int, float]:
    x = random_tokens(model, batch, prompt_len)  # (B, P)
    if _is_leanlm(model):
        from leanlm.generate import generate

        res = generate(model, x.tolist(), max_new_tokens=new_tokens, stop_ids=(), dtype=cache_dtype, kernel=kernel)
        return res.n_decode_tokens, res.decode_seconds
    clock = _FirstTokenClock()
    with torch.inference_mode():
        out = model.generate(
            input_ids=x,
            attention_mask=torch.ones_like(x),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            use_cache=True,
            pad_token_id=model.config.eos_token_id or 0,
            streamer=clock,
        )
    _sync(x.device)
    end = time.perf_counter()
    if out.shape[1] != prompt_len + new_tokens or clock.first is None:
        raise RuntimeError(f"transformers generated {out.shape[1] - prompt_len} tokens instead of {new_tokens}")
    return batch * (new_tokens - 1), end - clock.first


def _measure(run: Callable[[], tuple[int, float]], device: torch.device) -> tuple[float, int | None]:
    """(tokens/s, peak extra memory in bytes) of one call of a runner."""
    with PeakMemory(device) as mem:
        n, seconds = run()
    return n / seconds, mem.bytes


def bench_train_step(model: nn.Module, batch: int, seq_len: int, steps: int, warmup: int = 1) -> dict:
    """Tokens/s of `steps` training steps (after `warmup` untimed ones) and their peak extra memory.

    Returns {"tokens_per_s": [per step], "peak_mem_bytes": max over steps, or None}. The peak excludes the weights
    and the optimizer state, which exist before a measured step starts (the warmup step creates the AdamW state).
    """
    step = TrainStep(model, batch, seq_len)
    try:
        for _ in range(warmup):
            step()
        samples = [_measure(step, _device(model)) for _ in range(steps)]
    finally:
        step.close()
    mems = [m for _, m in samples if m is not None]
    return {"tokens_per_s": [t for t, _ in samples], "peak_mem_bytes": max(mems) if mems else None}


def bench_prefill(model: nn.Module, batch: int, prompt_len: int) -> dict:
    """Tokens/s of one prompt forward with a KV cache: {"tokens_per_s", "peak_mem_bytes"}."""
    tps, mem = _measure(lambda: _prefill(model, batch, prompt_len), _device(model))
    return {"tokens_per_s": tps, "peak_mem_bytes": mem}


def bench_decode(
    model: nn.Module, batch: int, prompt_len: int, new_tokens: int, dtype: torch.dtype | None = None
) -> dict:
    """Greedy decode tokens/s after the first new token (see DEFINITIONS["decode"]): {"tokens_per_s", "peak_mem_bytes"}.

    `dtype` is the KV cache dtype of a leanlm model (default: its parameters'); transformers models keep their own.
    """
    if new_tokens < 2:
        raise LeanLMError(f"decode needs at least 2 new tokens to time the steps after the first (got {new_tokens})")
    tps, mem = _measure(lambda: _decode(model, batch, prompt_len, new_tokens, dtype), _device(model))
    return {"tokens_per_s": tps, "peak_mem_bytes": mem}


# -- comparing variants ------------------------------------------------------------------------------------------------


def _summary(samples: Sequence[float]) -> dict:
    return {"median": statistics.median(samples), "min": min(samples), "max": max(samples), "samples": list(samples)}


@torch.inference_mode()
def steps_in_turn(
    models: dict[str, nn.Module], tokens: Tensor, start: int, on_step: Callable[[dict], None] | None = None
) -> dict[str, float]:
    """Cached one-token forwards of several leanlm models over tokens[:, start:], taken in turn step by step (the
    order flips every step), so every model sees the same load on a shared machine: a quiet spell or a noisy
    neighbour cannot favour one of them. The caches must already hold tokens[:, :start] (the caller prefills, untimed).

    Returns the seconds each model spent on its steps; `on_step` gets each step's {name: (1, 1, vocab) logits}.
    """
    elapsed = dict.fromkeys(models, 0.0)
    order = list(models)
    for s in range(start, tokens.shape[1]):
        out = {}
        for k in order:
            t0 = time.perf_counter()
            out[k] = models[k](tokens[:, s : s + 1], start=s, last_only=True)  # (1, 1, V)
            elapsed[k] += time.perf_counter() - t0
        if on_step is not None:
            on_step(out)
        order.reverse()
    return elapsed


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
    model: nn.Module, ref: str, what: Sequence[str], seq_len: int, prompt_len: int, new_tokens: int
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


def _machine(device: torch.device) -> dict:
    info = {
        "device": device.type,
        "processor": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def _flops(
    model: nn.Module, what: Sequence[str], seq_len: int, prompt_len: int, new_tokens: int, retention: dict | None = None
) -> dict:
    # train and prefill: per token of a causal pass over seq_len / prompt_len tokens; decode: one step at the mean
    # context of the generated tokens, prompt_len + new_tokens / 2 (every cached key is attended to, not half).
    # A model that drops tokens at inference (SUBLLM) is costed at the retention it achieved in the measurement:
    # for decode, that of the generated tokens, with caches holding what was kept of the prompt ("decode_cached").
    # An LTE model is costed at the FFN sparsity its routers chose in the measurement (its inference statistics).
    retention = retention or {}
    out = {}
    for w in (w for w in WHATS if w in what):
        kept = retention.get(w)
        if w == "decode":
            extra = {"retention": kept, "cached": retention.get("decode_cached")} if kept is not None else {}
            out[w] = model.decode_flops(prompt_len + new_tokens / 2, **extra)
        else:
            extra = {"retention": kept} if kept is not None else {}
            out[w] = model.flops_per_token(seq_len if w == "train" else prompt_len, training=w == "train", **extra)
    return out


def run_bench(
    model: str,
    vs: str | None = None,
    what: Sequence[str] = WHATS,
    seq_len: int = 2048,
    batch: int = 1,
    prompt_len: int = 256,
    new_tokens: int = 128,
    repeats: int = 5,
    warmup: int = 1,
    dtype: str = "float32",
    threads: int | None = None,
    device: str | None = None,
    text: str | None = None,
    overrides: dict | None = None,
    kernel: str = "torch",
) -> dict:
    """Benchmark model reference `model` (A), alone or against `vs` (B: a model reference, or "hf").

    Arguments mirror the `leanlm bench` flags (`batch` is --batch-size); `device` defaults to CUDA when available.
    Returns a JSON-able dict: date, machine, settings, variants (ref, params, flops_per_token per measurement) and,
    per measurement in `what`, each variant's tokens/s summary (median, min, max, samples) and peak extra memory
    (max over repeats), plus `ratio`: A tokens/s / B tokens/s per repeat (> 1 means A, the --model, is faster), and
    `flop_ratio`: B's executed FLOPs per token / A's, the speed-up that the skipped work alone would give.
    `text`: a prepared data directory whose validation tokens replace the random ids. `overrides`: ModelConfig
    fields changed in A at load (checkpoint.model_overrides). `kernel`: the decode kernel of every leanlm variant
    (leanlm.kernels; transformers models keep their own).
    """
    global TEXT_TOKENS
    from leanlm.checkpoint import load_model

    if dtype not in DTYPES:
        raise LeanLMError(f"--dtype must be one of {', '.join(DTYPES)} (got {dtype!r})")
    if threads is not None:
        if threads < 1:
            raise LeanLMError(f"--threads must be at least 1 (got {threads})")
        torch.set_num_threads(threads)
    torch.manual_seed(SEED)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))

    _check_args(what, seq_len, batch, prompt_len, new_tokens, repeats, warmup)
    check_kernel(kernel)
    model_a = load_model(model, dtype=dtype, overrides=overrides)[0].to(dev)
    TEXT_TOKENS = load_text_tokens(text, model_a.cfg.vocab_size) if text else None
    _check_context(model_a, model, what, seq_len, prompt_len, new_tokens)
    flops_a = _flops(model_a, what, seq_len, prompt_len, new_tokens)
    variants = {"A": {"ref": model, "params": model_a.num_params(), "flops_per_token": flops_a}}
    models = {"A": model_a}
    if vs == "hf":
        from leanlm.hf import to_hf_model

        models["B"] = to_hf_model(model_a).to(dev)
        variants["B"] = {
            "ref": "hf",
            "description": "transformers LlamaForCausalLM sharing A's weights",
            "params": model_a.num_params(),
            "flops_per_token": flops_a,
        }
    elif vs is not None:
        model_b = load_model(vs, dtype=dtype)[0].to(dev)
        _check_context(model_b, vs, what, seq_len, prompt_len, new_tokens)
        models["B"] = model_b
        variants["B"] = {
            "ref": vs,
            "params": model_b.num_params(),
            "flops_per_token": _flops(model_b, what, seq_len, prompt_len, new_tokens),
        }

    results = {}
    retention: dict[str, dict[str, list[float]]] = {k: {} for k in models}  # per variant and measurement
    # training changes the weights: the inference measurements go first and see the model as loaded
    for w in [w for w in ("prefill", "decode", "train") if w in what]:
        for m in models.values():
            if hasattr(m, "reset_retention"):
                m.reset_retention()
            if hasattr(m, "lte_reset_stats"):
                m.lte_reset_stats()
        if w == "train":
            runners = {k: TrainStep(m, batch, seq_len) for k, m in models.items()}
        elif w == "prefill":
            runners = {k: (lambda m=m: _prefill(m, batch, prompt_len)) for k, m in models.items()}
        else:
            runners = {
                k: (lambda m=m: _decode(m, batch, prompt_len, new_tokens, kernel=kernel)) for k, m in models.items()
            }
        try:
            for _ in range(warmup):
                for run in runners.values():
                    run()
            tps: dict[str, list[float]] = {k: [] for k in runners}
            mem: dict[str, list[int]] = {k: [] for k in runners}
            for r in range(repeats):
                for k in list(runners) if r % 2 == 0 else list(runners)[::-1]:
                    rate, peak = _measure(runners[k], dev)
                    tps[k].append(rate)
                    if peak is not None:
                        mem[k].append(peak)
        finally:
            for run in runners.values():
                if isinstance(run, TrainStep):
                    run.close()
        if w == "decode":  # SUBLLM: retention of the generated tokens only, so take back every prompt's share
            for k, m in models.items():
                counts = getattr(m, "retention_counts", None)
                if counts is not None:  # one more prefill of the same prompt measures what each generate's added
                    before = counts.clone()
                    _prefill(m, batch, prompt_len)
                    prompt = counts - before
                    retention[k]["decode_cached"] = (prompt[:, 0] / prompt[:, 1].clamp(min=1)).tolist()
                    counts.copy_(before - (warmup + repeats) * prompt)
        entry = {"unit": "tokens/s", "definition": DEFINITIONS[w]}
        for k, m in models.items():
            entry[k] = {**_summary(tps[k]), "peak_mem_bytes": max(mem[k]) if mem[k] else None}
            if w != "train" and hasattr(m, "retention"):  # kept fraction per stage, over every call measured
                entry[k]["retention"] = retention[k][w] = m.retention()
            if w != "train" and hasattr(m, "lte_report"):  # LTE: the FFN sparsity its routers chose here
                entry[k]["lte"] = m.lte_report()
            if retention[k].get(w) is not None or "lte" in entry[k]:  # executed FLOPs at what it skipped here
                variants[k]["flops_per_token"][w] = _flops(m, [w], seq_len, prompt_len, new_tokens, retention[k])[w]
        if "B" in runners:
            entry["ratio"] = _summary([a / b for a, b in zip(tps["A"], tps["B"])])
        results[w] = entry
    TEXT_TOKENS = None
    if "B" in models:
        for w, entry in results.items():
            entry["flop_ratio"] = variants["B"]["flops_per_token"][w] / variants["A"]["flops_per_token"][w]
            entry["ratio_over_flop_ratio"] = entry["ratio"]["median"] / entry["flop_ratio"]

    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": _machine(dev),
        "settings": {
            "seq_len": seq_len,
            "batch": batch,
            "prompt_len": prompt_len,
            "new_tokens": new_tokens,
            "repeats": repeats,
            "warmup": warmup,
            "dtype": dtype,
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
        flops = ", ".join(f"{w} {f / 1e9:.3g}" for w, f in v["flops_per_token"].items())
        desc = f" ({v['description']})" if "description" in v else ""
        lines.append(f"{k}: {v['ref']}{desc}: {v['params'] / 1e6:,.2f}M params; GFLOP/token: {flops}")
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
            if r[k].get("retention"):
                kept = ", ".join(f"{x:.3f}" for x in r[k]["retention"])
                which = "of the prompt" if w == "prefill" else "of the generated tokens"
                notes.append(f"{w} {k}: fraction {which} kept per stage: {kept}")
            if "lte" in r[k]:
                notes.append(
                    f"{w} {k}: LTE FFN sparsity {r[k]['lte']['ffn_sparsity']:.3f} (routers included: "
                    f"FFN cost {r[k]['lte']['ffn_cost']:.3f} of dense)"
                )
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
