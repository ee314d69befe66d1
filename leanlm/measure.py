"""Measuring one variant: what one training step, one prefill and one greedy decode cost in time and memory.

Each runner does one measured operation on fixed inputs and returns (tokens processed, seconds); leanlm models and
transformers models are both accepted and do the same work. `PeakMemory` defines peak memory: the extra memory a
measured call needs above what was in use before it. leanlm.bench compares variants with these; benchmarks/ and the
demo use them too.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import os
import platform
import statistics
import sys
import threading
import time
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from leanlm.data import TokenDataset
from leanlm.errors import LeanLMError
from leanlm.generate import generate
from leanlm.kernels import decode_layout
from leanlm.llamacpp import LlamaCpp
from leanlm.model import Transformer

DEFINITIONS = {
    "train": "one training step on batch x seq_len tokens: forward, fp32 next-token cross-entropy computed from the "
    "logits, backward, AdamW step; tokens/s = batch * seq_len / step time",
    "prefill": "one forward of batch x prompt_len prompt tokens that fills a KV cache and projects only the last "
    "position to the vocabulary; tokens/s = batch * prompt_len / time",
    "decode": "greedy generation of new_tokens tokens per row after a prompt of prompt_len tokens; tokens/s counts "
    "only the steps after the first new token: batch * (new_tokens - 1) / (time from the first new token "
    "to the last); the prompt forward and first token are excluded",
}
SEED = 0


# -- memory ------------------------------------------------------------------------------------------------------------


def _rss_bytes() -> int | None:
    """Resident set size of this process, or None where /proc is not there to read it."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, AttributeError):
        return None


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


# -- inputs ------------------------------------------------------------------------------------------------------------


def device_of(model: nn.Module | LlamaCpp) -> torch.device:
    return torch.device("cpu") if isinstance(model, LlamaCpp) else next(model.parameters()).device


def _vocab_size(model: nn.Module | LlamaCpp) -> int:
    if isinstance(model, LlamaCpp):
        return model.vocab_size
    return model.cfg.vocab_size if isinstance(model, Transformer) else model.config.vocab_size


def sync(device: torch.device) -> None:
    # kernels run asynchronously on accelerators: wait for them so that a timer measures the work, not its launch
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Tokens:
    """The measured inputs: (batch, length) token ids, the same for every model with the same vocabulary.
    Consecutive windows of real text (`text`: a 1-D tensor of token ids), else random ids from a fixed seed.
    (Methods that decide per token what to skip, such as SUBLLM's scorers, behave differently on random ids.)"""

    def __init__(self, text: Tensor | None = None):
        self.text = text

    def __call__(self, model: nn.Module, batch: int, length: int) -> Tensor:
        if self.text is not None:
            need = batch * length
            reps = -(-need // self.text.numel())
            return self.text.repeat(reps)[:need].view(batch, length).to(device_of(model))
        gen = torch.Generator().manual_seed(SEED)
        return torch.randint(0, _vocab_size(model), (batch, length), generator=gen).to(device_of(model))

    @classmethod
    def from_data(cls, path: str, vocab_size: int) -> Tokens:
        """The validation tokens of a prepared data directory (`leanlm prepare`), checked against the vocabulary."""
        data = TokenDataset(path, "val")
        if data.vocab_size > vocab_size:
            raise LeanLMError(f"--text {path}: uses {data.vocab_size} token ids but the model has {vocab_size}")
        return cls(torch.from_numpy(data.tokens[: 1 << 20].astype("int64")))


# -- the measured operations -------------------------------------------------------------------------------------------


class TrainStep:
    """One training step per call on fixed tokens; the optimizer persists between calls.

    The loss is computed here from the logits for both kinds of model (transformers gets no labels), so both sides
    do identical work. Call `close()` afterwards: it frees gradients and optimizer state and restores eval mode.
    """

    def __init__(self, model: nn.Module, batch: int, seq_len: int, tokens: Tokens | None = None, lr: float = 1e-5):
        self.model = model
        self.x = (tokens or Tokens())(model, batch, seq_len)  # (B, T)
        self.device = device_of(model)
        self.opt = torch.optim.AdamW(model.parameters(), lr=lr)
        model.train()

    def __call__(self) -> tuple[int, float]:
        sync(self.device)
        t0 = time.perf_counter()
        x = self.x
        logits = (
            self.model(x) if isinstance(self.model, Transformer) else self.model(input_ids=x, use_cache=False).logits
        )
        loss = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), x[:, 1:].flatten())  # (B, T, V) vs (B, T)
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        sync(self.device)
        return x.numel(), time.perf_counter() - t0

    def close(self) -> None:
        self.opt.zero_grad(set_to_none=True)
        self.opt = None
        self.model.eval()


@torch.inference_mode()
def prefill(model: nn.Module, batch: int, prompt_len: int, tokens: Tokens | None = None) -> tuple[int, float]:
    x = (tokens or Tokens())(model, batch, prompt_len)  # (B, P)
    if isinstance(model, LlamaCpp):
        return model.prefill(x[0].tolist())
    device = device_of(model)
    sync(device)
    t0 = time.perf_counter()
    # the cache allocation is timed: transformers allocates its cache inside the forward
    if isinstance(model, Transformer):
        model.setup_caches(batch, prompt_len)
        try:
            model(x, last_only=True)
        finally:
            model.reset_caches()
    else:
        model(input_ids=x, use_cache=True, logits_to_keep=1)
    sync(device)
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


def decode(
    model: nn.Module,
    batch: int,
    prompt_len: int,
    new_tokens: int,
    tokens: Tokens | None = None,
    cache_dtype: torch.dtype | None = None,
    kernel: str = "torch",
) -> tuple[int, float]:
    """Greedy decode of `new_tokens` per row after a prompt: (tokens, seconds) after the first new token
    (DEFINITIONS["decode"]). `cache_dtype`: a leanlm model's KV cache dtype (default: its parameters')."""
    if new_tokens < 2:
        raise LeanLMError(f"decode needs at least 2 new tokens to time the steps after the first (got {new_tokens})")
    x = (tokens or Tokens())(model, batch, prompt_len)  # (B, P)
    if isinstance(model, LlamaCpp):
        return model.decode(x[0].tolist(), new_tokens)
    if isinstance(model, Transformer):
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
    sync(x.device)
    end = time.perf_counter()
    if out.shape[1] != prompt_len + new_tokens or clock.first is None:
        raise RuntimeError(f"transformers generated {out.shape[1] - prompt_len} tokens instead of {new_tokens}")
    return batch * (new_tokens - 1), end - clock.first


def kv_cache_bytes(model: Transformer, batch: int, length: int) -> int:
    """Bytes of the KV caches `model` allocates for `batch` rows of `length` tokens (each layer's own: a sparse
    attention's bounded cache, a full layer's growing one)."""
    model.setup_caches(batch, length)
    try:
        return sum(b.numel() * b.element_size() for c in model.caches for b in c.buffers())
    finally:
        model.reset_caches()


def measure(run: Callable[[], tuple[int, float]], device: torch.device) -> tuple[float, int | None]:
    """(tokens/s, peak extra memory in bytes) of one call of a runner."""
    with PeakMemory(device) as mem:
        n, seconds = run()
    return n / seconds, mem.bytes


def runs_in_turn(
    runners: dict[str, Callable[[], tuple[int, float]]], repeats: int, device: torch.device, warmup: int = 1
) -> tuple[dict[str, list[float]], dict[str, list[int]]]:
    """Every runner called once per repeat, the order flipping every repeat, so that slow drift (throttling, other
    processes) favours none; after `warmup` untimed rounds. Returns per runner the tokens/s and the peak extra
    memory (bytes; empty where it cannot be read) of each repeat."""
    for _ in range(warmup):
        for run in runners.values():
            run()
    tps: dict[str, list[float]] = {k: [] for k in runners}
    mem: dict[str, list[int]] = {k: [] for k in runners}
    for r in range(repeats):
        for k in list(runners) if r % 2 == 0 else list(runners)[::-1]:
            rate, peak = measure(runners[k], device)
            tps[k].append(rate)
            if peak is not None:
                mem[k].append(peak)
    return tps, mem


@torch.inference_mode()
def steps_in_turn(
    models: dict[str, Transformer], tokens: Tensor, start: int, on_step: Callable[[dict], None] | None = None
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


@torch.inference_mode()
def decode_text_in_turn(
    models: dict[str, Transformer], prompts: Sequence[Tensor], prompt_len: int, steps: int, kernel: str = "torch"
) -> dict[str, float]:
    """Cached decoding of real text (teacher forcing): per prompt (1, prompt_len + steps), every model prefills
    `prompt_len` tokens (untimed), then the models take the `steps` cached one-token forwards in turn
    (`steps_in_turn`), in the decode layout of `kernel`. Returns the seconds each model spent decoding, summed over
    the prompts. The models' methods count what they did from their `reset_stats`: prompts as prefills, steps as
    decode steps."""
    elapsed = dict.fromkeys(models, 0.0)
    with contextlib.ExitStack() as stack:
        for m in models.values():
            stack.enter_context(decode_layout(m, kernel))
        for tokens in prompts:
            try:
                for m in models.values():
                    m.setup_caches(1, prompt_len + steps)
                    m(tokens[:, :prompt_len], last_only=True)
                for k, t in steps_in_turn(models, tokens[:, : prompt_len + steps], prompt_len).items():
                    elapsed[k] += t
            finally:
                for m in models.values():
                    m.reset_caches()
    return elapsed


# -- summaries ---------------------------------------------------------------------------------------------------------


def summarize(samples: Sequence[float]) -> dict:
    """Median, min and max of samples, and the samples."""
    return {"median": statistics.median(samples), "min": min(samples), "max": max(samples), "samples": list(samples)}


def machine(device: torch.device) -> dict:
    """What a measurement ran on."""
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


def reset_stats(model: nn.Module) -> None:
    """Start measuring what a leanlm model's methods do at inference (Method.reset_stats)."""
    for m in model.methods if isinstance(model, Transformer) else ():
        m.reset_stats(model)


def reports(model: nn.Module) -> dict[str, dict]:
    """What each of a leanlm model's methods did since `reset_stats` (Method.report), by method name."""
    return {m.name: m.report(model) for m in model.methods} if isinstance(model, Transformer) else {}
