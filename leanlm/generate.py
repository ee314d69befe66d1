"""Autoregressive generation with static KV caches: batched prompts, sampling, stop tokens, streaming.

    from leanlm.generate import generate, TextStreamer
    streamer = TextStreamer(tokenizer)
    res = generate(model, [tokenizer.encode("Once upon a time")], max_new_tokens=64, temperature=0.8, top_p=0.95,
                   stop_ids=tokenizer.stop_ids(), seed=0, on_token=streamer)
    streamer.end()
    res.tokens[0]  # the new token ids, without the prompt and without the stop token

A batch of prompts is left-padded to the longest one. Each row gets RoPE positions counted from its own first token
and an attention mask that hides the pad slots, so every row produces what it would produce alone. Without padding
(batch 1, or equal lengths) no mask is built and the model takes its fast SDPA paths.

Shapes: B batch, P padded prompt length, L cache length (P + max_new_tokens), V vocabulary.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TextIO

import torch
from torch import Tensor, nn

from leanlm.errors import LeanLMError
from leanlm.kernels import check_kernel, decode_layout
from leanlm.tokenizer import Tokenizer


@dataclass
class GenerationResult:
    tokens: list[list[int]]  # new tokens per row, ending before the stop token
    prefill_seconds: float  # prompt forward + first token (time to first token)
    decode_seconds: float  # every later step
    n_decode_tokens: int  # tokens produced after each row's first one, summed over rows
    prompt_tokens: int  # prompt tokens summed over rows, without padding


# -- sampling ----------------------------------------------------------------------------------------------------------


def apply_repetition_penalty(logits: Tensor, seen: Tensor, penalty: float) -> Tensor:
    """CTRL/HF penalty on tokens already seen (B, V): positive logits are divided by `penalty`, negative multiplied."""
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)  # (B, V)


def sample_next(
    logits: Tensor,
    temperature: float,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Next token (B,) from fp32 logits (B, V): argmax at temperature 0, else temperature, top-k, top-p sampling."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1) the k-th largest logit
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)  # (B, V)
        probs = sorted_logits.softmax(dim=-1)
        # drop a token once the tokens ranked above it already hold top_p of the mass; the best token always stays
        drop_sorted = probs.cumsum(dim=-1) - probs > top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)  # back to vocabulary order
        logits = logits.masked_fill(drop, float("-inf"))
    probs = logits.softmax(dim=-1)  # (B, V)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


# -- batching ----------------------------------------------------------------------------------------------------------


@dataclass
class PaddedBatch:
    """Left-padded prompts with per-row positions and attention masks; masks are None when no row is padded."""

    idx: Tensor  # (B, P) token ids, pad slots hold 0
    pos: Tensor  # (B, L) RoPE position of every cache slot, or (1, L) without padding
    prefill_mask: Tensor | None  # (B, 1, P, P) causal and no pad keys; pad queries see themselves
    key_ok: Tensor | None  # (B, 1, 1, L) slots holding real tokens: slice [..., :s+1] is the decode mask at slot s


def pad_batch(prompts: Sequence[Sequence[int]], total_len: int, device: torch.device | None = None) -> PaddedBatch:
    """Left-pad `prompts` to the longest, for a cache of `total_len` slots."""
    lens = [len(p) for p in prompts]
    P = max(lens)
    idx = torch.tensor([[0] * (P - n) + list(p) for p, n in zip(prompts, lens)], dtype=torch.long, device=device)
    slots = torch.arange(total_len, device=device)  # (L,)
    if P == min(lens):
        return PaddedBatch(idx, slots.unsqueeze(0), None, None)
    pads = torch.tensor([P - n for n in lens], device=device).unsqueeze(1)  # (B, 1)
    # each row counts positions from its own first token, exactly as if it ran alone; pad slots get position 0
    pos = (slots.unsqueeze(0) - pads).clamp(min=0)  # (B, L)
    key_ok = slots.unsqueeze(0) >= pads  # (B, L)
    causal = torch.ones(P, P, dtype=torch.bool, device=device).tril()  # (P, P)
    # a pad query has no real key before it and an all-False row makes SDPA return NaN, which would then leak through
    # the cached values (0 * NaN) into real rows; letting it attend to itself keeps it finite (its output is unused)
    eye = torch.eye(P, dtype=torch.bool, device=device)
    prefill_mask = (causal & key_ok[:, None, :P]) | eye  # (B, P, P)
    return PaddedBatch(idx, pos, prefill_mask.unsqueeze(1), key_ok[:, None, None, :])


# -- generation --------------------------------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    # kernels run asynchronously on accelerators: wait for them so the timings measure the work, not its launch
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _check_args(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    repetition_penalty: float,
) -> None:
    if not prompts:
        raise LeanLMError("no prompts to generate from")
    if any(len(p) == 0 for p in prompts):
        raise LeanLMError("empty prompt: give at least one token (e.g. the BOS token)")
    if max_new_tokens < 1:
        raise LeanLMError(f"max_new_tokens must be at least 1 (got {max_new_tokens})")
    cfg = model.cfg
    longest = max(len(p) for p in prompts)
    if longest + max_new_tokens > cfg.max_seq_len:
        raise LeanLMError(
            f"prompt of {longest} tokens + {max_new_tokens} new tokens exceeds the model's context of {cfg.max_seq_len}"
        )
    bad = [t for p in prompts for t in p if not 0 <= t < cfg.vocab_size]
    if bad:
        raise LeanLMError(f"token id {bad[0]} is outside the model's vocabulary of {cfg.vocab_size}")
    if temperature < 0:
        raise LeanLMError(f"temperature must be >= 0 (got {temperature})")
    if top_k is not None and top_k < 1:
        raise LeanLMError(f"top_k must be at least 1 (got {top_k})")
    if top_p is not None and not 0 < top_p <= 1:
        raise LeanLMError(f"top_p must be in (0, 1] (got {top_p})")
    if not repetition_penalty > 0:
        raise LeanLMError(f"repetition_penalty must be positive (got {repetition_penalty})")


@torch.inference_mode()
def generate(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    repetition_penalty: float = 1.0,
    stop_ids: Sequence[int] = (),
    seed: int | None = None,
    on_token: Callable[[int, int], None] | None = None,
    dtype: torch.dtype | None = None,
    kernel: str = "torch",
) -> GenerationResult:
    """Continue each prompt by up to `max_new_tokens` tokens.

    Args:
        model: a leanlm Transformer (anything with `cfg`, `setup_caches`, `reset_caches` and its `forward`).
        prompts: token ids per row; rows may differ in length.
        temperature: 0 = greedy; top_k / top_p restrict sampling to the k best / the nucleus of mass p.
        repetition_penalty: > 1 discourages tokens already in the row's prompt or output (CTRL/HF convention).
        stop_ids: a row ends at the first of these (not included in its tokens); the batch runs until all rows end.
        seed: seeds the sampling generator (None = torch's global RNG).
        on_token: called as on_token(row, token) for every reported token, as soon as it is produced.
        dtype: KV cache dtype (default: the model's parameter dtype).
        kernel: "torch" or "cpp": one-token CPU steps of a single row through fused C++ ops (leanlm/kernels.py).
    """
    check_kernel(kernel)
    _check_args(model, prompts, max_new_tokens, temperature, top_k, top_p, repetition_penalty)
    device = next(model.parameters()).device
    B, P = len(prompts), max(len(p) for p in prompts)
    total = P + max_new_tokens
    stop_set = set(stop_ids)
    # reading tokens back on the host costs a device sync per step: only do it when a callback or a stop needs it
    need_host = on_token is not None or bool(stop_set)
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    penalise = repetition_penalty != 1.0
    if penalise:  # tokens each row has seen so far: its prompt, then every token it produces
        seen = torch.zeros(B, model.cfg.vocab_size, dtype=torch.bool, device=device)  # (B, V)
        for r, p in enumerate(prompts):
            seen[r, torch.tensor(list(p), device=device)] = True

    def pick(logits: Tensor) -> Tensor:  # (B, V) fp32 -> (B,)
        if penalise:
            logits = apply_repetition_penalty(logits, seen, repetition_penalty)
        tok = sample_next(logits, temperature, top_k, top_p, generator)
        if penalise:
            seen.scatter_(1, tok.unsqueeze(1), True)
        return tok

    t0 = time.perf_counter()
    model.setup_caches(B, total, dtype)
    try:
        batch = pad_batch(prompts, total, device)
        logits = model(batch.idx, pos=batch.pos[:, :P], start=0, mask=batch.prefill_mask, last_only=True)
        tok = pick(logits[:, -1].float())  # (B,)
        _sync(device)
        t1 = time.perf_counter()

        # column-major weights make batch-1 CPU matmuls stream faster; switching costs ~0.1 s and counts as decode time
        layout = decode_layout(model, kernel) if device.type == "cpu" else contextlib.nullcontext()
        with layout:
            steps: list[Tensor] = []  # one (B,) tensor per step, read back once at the end
            finished = [False] * B
            for i in range(max_new_tokens):
                steps.append(tok)
                if need_host:
                    for r, t in enumerate(tok.tolist()):
                        if finished[r]:
                            continue
                        if t in stop_set:
                            finished[r] = True
                        elif on_token is not None:
                            on_token(r, t)
                    if all(finished):
                        break
                if i + 1 == max_new_tokens:
                    break
                s = P + i  # cache slot of the token being fed
                mask, pos = None, None  # unpadded: position s in every row (the model takes its RoPE rows as views)
                if batch.key_ok is not None:
                    mask, pos = batch.key_ok[..., : s + 1], batch.pos[:, s : s + 1]  # (B, 1, 1, s+1), (B, 1)
                logits = model(tok.unsqueeze(1), pos=pos, start=s, mask=mask)
                tok = pick(logits[:, -1].float())
        rows = torch.stack(steps, dim=1).tolist()  # (B, n) on the host; waits for the device, so no _sync needed
        t2 = time.perf_counter()
    finally:
        model.reset_caches()

    tokens = []
    for row in rows:
        end = next((j for j, t in enumerate(row) if t in stop_set), len(row))
        tokens.append(row[:end])
    return GenerationResult(
        tokens=tokens,
        prefill_seconds=t1 - t0,
        decode_seconds=t2 - t1,
        n_decode_tokens=sum(max(len(t) - 1, 0) for t in tokens),
        prompt_tokens=sum(len(p) for p in prompts),
    )


# -- streaming ---------------------------------------------------------------------------------------------------------


class TextStreamer:
    """An `on_token` callback that prints row 0's text as it grows.

    The whole output is decoded each time and only the new suffix is printed, so tokens that merge with their
    neighbours (byte-level BPE, leading spaces) come out right; text ending in U+FFFD is held back because it means
    a multi-byte character is still incomplete.
    """

    def __init__(self, tokenizer: Tokenizer, stream: TextIO | None = None):
        self.tokenizer = tokenizer
        self.stream = stream if stream is not None else sys.stdout
        self.ids: list[int] = []
        self.printed = 0  # characters of the decoded text already written

    def __call__(self, row: int, token: int) -> None:
        if row != 0:
            return
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids)
        if not text.endswith("\ufffd"):
            self._write(text)

    def _write(self, text: str) -> None:
        if len(text) > self.printed:
            self.stream.write(text[self.printed :])
            self.stream.flush()
            self.printed = len(text)

    def end(self) -> None:
        """Write whatever was held back and a newline; the streamer can then be reused."""
        self._write(self.tokenizer.decode(self.ids))
        self.stream.write("\n")
        self.stream.flush()
        self.ids, self.printed = [], 0
