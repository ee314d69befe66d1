"""Perplexity and bits-per-byte on text files, with a stated, reproducible protocol.

    from leanlm.checkpoint import load_model
    from leanlm.data import text_file
    from leanlm.evaluate import evaluate
    model, tok = load_model("smollm2-135m")
    r = evaluate(model, tok, [text_file("wikitext-2")], seq_len=512, max_windows=40)
    r["perplexity"], r["bits_per_byte"], r["protocol"]

Protocol: each file is read as UTF-8 and tokenized whole, once, without BOS; the token streams of several files are
concatenated in the order given. Windows of `seq_len` tokens are cut from the stream:

* default: non-overlapping windows starting at 0, seq_len, 2*seq_len, ...; each window predicts all its tokens but
  the first (a trailing window of a single token predicts nothing and is dropped);
* `stride=s`: sliding windows starting at 0, s, 2s, ... (the Hugging Face perplexity guide); each window scores only
  the tokens the previous window did not, so every token but the very first is scored once, with up to
  seq_len - s tokens of extra left context. The last window is the one that reaches the end of the stream.

Perplexity = exp(mean NLL per scored token). Bits-per-byte = total NLL in bits / UTF-8 bytes of the scored tokens,
which makes models with different tokenizers comparable. `evaluate` runs the same protocol on a transformers model:
the parity check that our forward pass computes what Hugging Face's does.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm

from leanlm.errors import LeanLMError
from leanlm.model import Transformer


@dataclass(frozen=True)
class Window:
    begin: int  # stream index of the window's first token
    end: int  # one past its last token
    n_scored: int  # its last n_scored tokens are scored, each predicted from the window tokens before it


def plan_windows(n_tokens: int, seq_len: int, stride: int | None = None) -> list[Window]:
    """The windows of the protocol over a stream of `n_tokens` tokens (stride None = non-overlapping)."""
    step = seq_len if stride is None else stride
    windows = []
    prev_end = 0
    for begin in range(0, n_tokens, step):
        end = min(begin + seq_len, n_tokens)
        # tokens past the previous window's end are new; a window cannot predict its own first token
        n_scored = min(end - prev_end, end - begin - 1)
        if n_scored > 0:
            windows.append(Window(begin, end, n_scored))
        prev_end = end
        if end == n_tokens:
            break
    return windows


def token_byte_counts(text: str, offsets: Sequence[tuple[int, int]]) -> np.ndarray:
    """UTF-8 bytes per token (int64, one per offset pair), summing exactly to len(text.encode()).

    `offsets` are the tokenizer's character offsets into `text`. Each token is credited with the bytes from the end of
    the previous token to its own end. Byte-level BPE can split one multi-byte character over several tokens that
    all report that character's span: the first of them gets the character's bytes, the others 0, so the total is
    still exact. Bytes after the last token's end (text a normalizer dropped) go to the last token.
    """
    n_bytes = len(text.encode("utf-8"))
    if not offsets:
        return np.zeros(0, dtype=np.int64)
    # code points -> UTF-8 length of each character -> byte offset of every character boundary
    cps = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    char_bytes = 1 + (cps >= 0x80).astype(np.int64) + (cps >= 0x800) + (cps >= 0x10000)  # (n_chars,)
    char_to_byte = np.concatenate(([0], np.cumsum(char_bytes)))  # (n_chars + 1,)
    ends = char_to_byte[np.array([e for _, e in offsets], dtype=np.int64)]  # (n_tokens,)
    ends = np.maximum.accumulate(ends)  # offsets of split characters can repeat; never count bytes twice
    ends[-1] = n_bytes
    return np.diff(ends, prepend=0)


def _backend(tokenizer):
    """The `tokenizers.Tokenizer` behind a leanlm Tokenizer, a transformers fast tokenizer, or itself."""
    for attr in ("tok", "backend_tokenizer"):
        inner = getattr(tokenizer, attr, None)
        if inner is not None:
            return inner
    return tokenizer


def read_text(path: str | Path) -> str:
    path = Path(path)
    if not path.exists():
        raise LeanLMError(f"{path}: no such file")
    if not path.is_file():
        raise LeanLMError(f"{path}: not a file")
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as e:
        raise LeanLMError(f"{path}: cannot read ({e.strerror or e})") from None
    except UnicodeDecodeError as e:
        raise LeanLMError(f"{path}: not UTF-8 text (invalid byte at offset {e.start})") from None
    if not text:
        raise LeanLMError(f"{path}: empty file")
    return text


def tokenize_files(tokenizer, paths: Sequence[str | Path]) -> tuple[np.ndarray, np.ndarray]:
    """Token ids and UTF-8 bytes per token (both int64, (N,)) of the files, each tokenized whole without BOS."""
    if not paths:
        raise LeanLMError("no text files to evaluate on")
    tok = _backend(tokenizer)
    ids, nbytes = [], []
    for p in paths:
        text = read_text(p)
        enc = tok.encode(text, add_special_tokens=False)
        ids.append(np.array(enc.ids, dtype=np.int64))
        nbytes.append(token_byte_counts(text, enc.offsets))
    return np.concatenate(ids), np.concatenate(nbytes)


def _check(seq_len: int, stride: int | None, max_windows: int | None, batch_size: int, context: int) -> None:
    if seq_len < 2:
        raise LeanLMError(f"seq_len must be at least 2 (got {seq_len})")
    if seq_len > context:
        raise LeanLMError(f"seq_len {seq_len} exceeds the model's context of {context} tokens")
    if stride is not None and not 1 <= stride <= seq_len:
        raise LeanLMError(f"stride must be between 1 and seq_len={seq_len} (got {stride})")
    if max_windows is not None and max_windows < 1:
        raise LeanLMError(f"max_windows must be at least 1 (got {max_windows})")
    if batch_size < 1:
        raise LeanLMError(f"batch_size must be at least 1 (got {batch_size})")


def _protocol(
    paths: Sequence[str | Path], n_tokens: int, seq_len: int, stride: int | None, n_used: int, n_all: int
) -> str:
    files = "whole file" if len(paths) == 1 else f"{len(paths)} files, each whole,"
    parts = [f"{files} tokenized without BOS ({n_tokens} tokens)"]
    if stride is None:
        parts += [f"non-overlapping windows of {seq_len} tokens", "every token after the first of each window scored"]
    else:
        parts += [
            f"sliding windows of up to {seq_len} tokens every {stride} tokens",
            "each window scores only the tokens the previous one did not (the first: all but its first token)",
        ]
    parts.append(f"first {n_used} of {n_all} windows" if n_used < n_all else f"all {n_all} windows")
    return "; ".join(parts)


@torch.inference_mode()
def _score(
    logits_of: Callable[[Tensor], Tensor],
    device: torch.device,
    vocab_size: int,
    tokenizer,
    paths: Sequence[str | Path],
    seq_len: int,
    stride: int | None,
    max_windows: int | None,
    batch_size: int,
    progress: bool,
) -> dict:
    """The protocol, for any model given as `logits_of(ids (B, T)) -> logits (B, T, V)`."""
    ids, nbytes = tokenize_files(tokenizer, paths)
    if len(ids) < 2:
        raise LeanLMError(f"{', '.join(map(str, paths))}: fewer than 2 tokens, nothing to predict")
    if int(ids.max()) >= vocab_size:
        raise LeanLMError(
            f"the tokenizer produced id {int(ids.max())} but the model's vocabulary has {vocab_size} "
            "tokens: tokenizer and model do not belong together"
        )
    all_windows = plan_windows(len(ids), seq_len, stride)
    windows = all_windows[:max_windows]
    byte_prefix = np.concatenate(([0], np.cumsum(nbytes)))  # bytes of tokens [a, b) = prefix[b] - prefix[a]
    stream = torch.from_numpy(ids)

    total_nll, n_scored, n_bytes = 0.0, 0, 0
    with tqdm(total=len(windows), unit="win", desc="eval", file=sys.stderr, disable=not progress) as bar:
        i = 0
        while i < len(windows):
            # batch consecutive windows of equal length (all but possibly the last have seq_len tokens)
            j = i + 1
            length = windows[i].end - windows[i].begin
            while j < len(windows) and j - i < batch_size and windows[j].end - windows[j].begin == length:
                j += 1
            group = windows[i:j]
            x = torch.stack([stream[w.begin : w.end] for w in group]).to(device)  # (B, T)
            logits = logits_of(x)  # (B, T, V)
            # log-softmax in fp32 whatever the model's dtype: position t predicts token t+1
            nll = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), x[:, 1:].flatten(), reduction="none")
            nll = nll.view(len(group), length - 1)  # (B, T-1)
            for row, w in zip(nll, group):
                total_nll += row[length - 1 - w.n_scored :].double().sum().item()
                n_scored += w.n_scored
                n_bytes += int(byte_prefix[w.end] - byte_prefix[w.end - w.n_scored])
            bar.update(len(group))
            i = j

    nll_mean = total_nll / n_scored
    return {
        "perplexity": math.exp(nll_mean),
        "bits_per_byte": total_nll / math.log(2) / n_bytes,
        "nll": nll_mean,
        "n_tokens_scored": n_scored,
        "n_bytes_scored": n_bytes,
        "n_windows": len(windows),
        "protocol": _protocol(paths, len(ids), seq_len, stride, len(windows), len(all_windows)),
    }


def evaluate(
    model,
    tokenizer,
    paths: Sequence[str | Path],
    seq_len: int,
    stride: int | None = None,
    max_windows: int | None = None,
    batch_size: int = 1,
    progress: bool = True,
) -> dict:
    """Perplexity of a model on text files under the protocol of this module's docstring: a leanlm model, or a
    transformers causal LM (e.g. LlamaForCausalLM) as the reference; `tokenizer` may be a leanlm Tokenizer or a
    transformers fast tokenizer.

    Returns perplexity, bits_per_byte, nll (mean nats per scored token), n_tokens_scored, n_bytes_scored, n_windows
    and `protocol`, a one-line description of what was measured.
    """
    if isinstance(model, Transformer):
        forward, vocab, context = model, model.cfg.vocab_size, model.cfg.max_seq_len
    else:
        cfg = model.config

        def forward(x: Tensor) -> Tensor:
            return model(input_ids=x, use_cache=False).logits

        vocab, context = cfg.vocab_size, cfg.max_position_embeddings
    _check(seq_len, stride, max_windows, batch_size, context)
    device = next(model.parameters()).device
    return _score(forward, device, vocab, tokenizer, paths, seq_len, stride, max_windows, batch_size, progress)
