"""Long-context passkey retrieval: can the model recall a 5-digit key hidden at a given depth of a long prompt?

    from leanlm.checkpoint import load_model
    from leanlm.longctx import format_table, passkey
    model, tok = load_model("smollm2-135m")
    r = passkey(model, tok, lengths=[512, 2048], depths=[0, 0.5, 1], trials=5)
    r["accuracy"]["2048"]["0.5"], r["mean_accuracy"], r["protocol"]; print(format_table(r))

Protocol (Mohtashami & Jaggi 2023, as in LongLoRA): prompt = head + filler window holding a needle + question, 90% to
100% of `length` tokens (at length = the model's context, less NEW_TOKENS, for the answer). Filler: `text`, the shipped
wikitext-2 test split, or `code`, the interpreter's stdlib .py files in sorted order, tokenized in pieces cut at
sentence (text) or line (code) starts; the window starts and if possible ends at one. Head (with BOS if the tokenizer
adds one), needle and question are tokenized apart. The needle "The pass key is 48213. Remember it. 48213 is the pass
key." (code: a line `PASS_KEY = 48213  # remember this number`) goes at relative depth d of the window (0 = after the
head, 1 = before the question), moved to the nearest piece start within length/20 tokens if any. `random.Random(seed,
length)` draws each trial's distinct 5-digit key and window offset, shared by all depths. Greedy decoding of NEW_TOKENS
tokens, batch 1: a trial is correct if the first 5 ASCII digits of the output (anything else skipped) are the key;
digit accuracy is the fraction of the key's 5 positions those digits match.
"""

from __future__ import annotations

import bisect
import math
import random
import re
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from tqdm import tqdm

from leanlm.data import stdlib_files, text_file
from leanlm.errors import LeanLMError
from leanlm.evaluate import read_text
from leanlm.generate import generate

NEW_TOKENS = 10  # enough for 5 digits even if every digit is its own token after a space
MIN_FILLER = 32  # filler tokens a prompt must hold besides head, needle and question


@dataclass(frozen=True)
class Style:
    head: str  # before the haystack
    needle: str  # "{key}" is replaced by the key
    question: str  # ends where the key should come next
    split: str  # regex of the filler's piece starts: where the needle and the window's ends may go
    source: str  # the filler, in words


STYLES = {
    "text": Style(
        head="There is an important piece of information hidden inside a lot of irrelevant text. Find it and "
        "memorize it. I will quiz you about it at the end.\n",
        needle=" The pass key is {key}. Remember it. {key} is the pass key.",
        question="\nWhat is the pass key? The pass key is",
        split=r"(?<=\.)(?= )|(?=\n)",  # a sentence start (wikitext writes " . "), or a new line
        source="wikitext-2 test split",
    ),
    "code": Style(
        head="",
        needle="\nPASS_KEY = {key}  # remember this number",
        question="\nassert PASS_KEY ==",
        split=r"(?=\n)",  # a line start: the needle becomes a line of its own
        source="Python standard library sources",
    ),
}


@dataclass(frozen=True)
class Filler:
    ids: list[int]  # the filler's tokens
    starts: list[int]  # sorted token indices where a piece starts (0 first)


@dataclass(frozen=True)
class Prompt:
    ids: list[int]
    key: int
    needle_at: int  # token index of the needle's first token in `ids`
    depth: float  # the needle's actual relative depth in the filler window


def _style(style: str) -> Style:
    if style not in STYLES:
        raise LeanLMError(f"unknown passkey style {style!r} (choose from {', '.join(STYLES)})")
    return STYLES[style]


def tokenize_filler(tokenizer, texts: Iterable[str], split: str, n_tokens: int) -> Filler:
    """The first `n_tokens` or more tokens of `texts`, each text split at regex `split` and its pieces tokenized one
    by one (no BOS): every piece start is a token boundary."""
    ids, starts = [], []
    for piece in (piece for text in texts for piece in re.split(split, text) if piece):
        if len(ids) >= n_tokens:
            break
        starts.append(len(ids))
        ids += tokenizer.encode(piece, add_bos=False)
    return Filler(ids, starts)


def load_filler(tokenizer, style: str, n_tokens: int) -> Filler:
    """The style's filler: wikitext-2 (test split) or the stdlib's sorted .py files, the first n_tokens or more."""
    split = _style(style).split
    if style == "text":
        return tokenize_filler(tokenizer, [read_text(text_file("wikitext-2"))], split, n_tokens)
    texts = map(lambda path: path.read_text(encoding="utf-8", errors="replace"), stdlib_files())
    return tokenize_filler(tokenizer, texts, split, n_tokens)


def _nearest(starts: list[int], x: int, lo: int, hi: int, ends: tuple[int, ...] = ()) -> int:
    """The piece start (or one of `ends`) in [lo, hi] nearest to x, else x."""
    i = bisect.bisect_left(starts, x)
    near = [s for s in (*starts[max(i - 1, 0) : i + 1], *ends) if lo <= s <= hi]
    return min(near, key=lambda s: abs(s - x), default=x)


def build_prompt(
    tokenizer,
    filler: Filler,
    length: int,
    depth: float,
    key: int,
    offset: float,
    style: str = "text",
    max_tokens: int | None = None,
) -> Prompt:
    """A prompt of 90% to 100% of `length` tokens, and at most `max_tokens`, with `key` at `depth` of a filler window
    starting at fraction `offset` of the filler; pure given the tokenizer."""
    st, lo, length = _style(style), math.ceil(0.9 * length), min(length, max_tokens or length)
    head = tokenizer.encode(st.head)
    needle = tokenizer.encode(st.needle.format(key=key), add_bos=False)
    question = tokenizer.encode(st.question, add_bos=False)
    n = length - len(head) - len(needle) - len(question)
    if n < MIN_FILLER:
        raise LeanLMError(f"length {length} is too short: a passkey prompt needs {length - n + MIN_FILLER}+ tokens")
    if n > len(filler.ids):
        raise LeanLMError(f"length {length} needs {n} filler tokens but the {style} filler has {len(filler.ids)}")
    slack = length // 20  # how far the needle may move to a piece start
    x = round(offset * (len(filler.ids) - n))
    begin = _nearest(filler.starts, x, 0, x)  # piece 0 starts at 0: begin is always a piece start
    end = _nearest(filler.starts, begin + n, max(begin + n - length + lo, begin + 1), begin + n)
    x = begin + round(depth * (end - begin))
    at = _nearest(filler.starts, x, max(begin, x - slack), min(end, x + slack), (begin, end))
    ids = head + filler.ids[begin:at] + needle + filler.ids[at:end] + question
    return Prompt(ids, key, len(head) + at - begin, (at - begin) / (end - begin))


def draw_trials(seed: int, length: int, trials: int) -> list[tuple[int, float]]:
    """(key, filler offset) of each trial: distinct 5-digit keys, reproducible from (seed, length)."""
    rng = random.Random(f"passkey/{seed}/{length}")
    keys = rng.sample(range(10_000, 100_000), trials)
    return [(k, rng.random()) for k in keys]


def score(text: str, key: int) -> tuple[bool, float]:
    """(the first 5 digits of `text` are the key, fraction of the key's digits matched position by position)."""
    got, want = re.findall(r"[0-9]", text)[:5], str(key)
    return "".join(got) == want, sum(a == b for a, b in zip(got, want)) / len(want)


def parse_settings(lengths: str, depths: str, trials: int, style: str) -> dict:
    """Comma-separated --lengths and --depths as {"lengths": [int], "depths": [float]}, checked with the rest."""
    try:
        res = {"lengths": [int(x) for x in lengths.split(",")], "depths": [float(x) for x in depths.split(",")]}
    except ValueError:
        raise LeanLMError(f"--lengths/--depths take comma-separated numbers (got {lengths!r}, {depths!r})") from None
    check_passkey(**res, trials=trials, style=style)
    return res


def check_passkey(
    lengths: Sequence[int], depths: Sequence[float], trials: int, style: str, context: int | None = None
) -> None:
    """The settings' errors that need no tokenizer (`context`: the model's, when known)."""
    _style(style)
    if not lengths or not depths:
        raise LeanLMError("passkey needs at least one length and one depth")
    for d in depths:
        if not 0 <= d <= 1:
            raise LeanLMError(f"depth {d} is outside [0, 1] (0 = start of the prompt, 1 = just before the question)")
    if context is not None and max(lengths) > context:
        raise LeanLMError(f"length {max(lengths)} exceeds the model's context of {context} tokens")
    if trials < 1:
        raise LeanLMError(f"trials must be at least 1 (got {trials})")


def passkey(
    model,
    tokenizer,
    lengths: Sequence[int],
    depths: Sequence[float],
    trials: int = 5,
    seed: int = 0,
    style: str = "text",
    progress: bool = False,
) -> dict:
    """Passkey retrieval accuracy of a leanlm Transformer per prompt length and needle depth (module docstring)."""
    lengths = list(dict.fromkeys(int(n) for n in lengths))
    depths = list(dict.fromkeys(float(d) for d in depths))
    check_passkey(lengths, depths, trials, style, model.cfg.max_seq_len)
    filler = load_filler(tokenizer, style, 4 * max(lengths) + 4096)
    # every prompt first, so a length too short fails before any generation
    prompts = {}
    for n in lengths:
        plan, cap = draw_trials(seed, n, trials), model.cfg.max_seq_len - NEW_TOKENS
        for d in depths:
            prompts[n, d] = [build_prompt(tokenizer, filler, n, d, k, o, style, cap) for k, o in plan]
    scores: dict[tuple[int, float], list[tuple[bool, float]]] = {}
    t0 = time.perf_counter()
    with tqdm(total=len(prompts) * trials, unit="prompt", desc="passkey", file=sys.stderr, disable=not progress) as bar:
        for cell, ps in prompts.items():
            for p in ps:
                out = generate(model, [p.ids], NEW_TOKENS, temperature=0.0, stop_ids=tokenizer.stop_ids()).tokens[0]
                scores.setdefault(cell, []).append(score(tokenizer.decode(out), p.key))
                bar.update()
    acc, digit_acc = (
        {str(n): {str(d): sum(s[i] for s in scores[n, d]) / trials for d in depths} for n in lengths} for i in (0, 1)
    )
    return {
        "task": "passkey",
        "style": style,
        "trials": trials,
        "seed": seed,
        "lengths": lengths,
        "depths": depths,
        "accuracy": acc,
        "digit_accuracy": digit_acc,
        "mean_accuracy": sum(ok for c in scores.values() for ok, _ in c) / len(prompts) / trials,
        "mean_digit_accuracy": sum(f for c in scores.values() for _, f in c) / len(prompts) / trials,
        "seconds": time.perf_counter() - t0,
        "protocol": f"{trials} trials per length and depth: prompts of 90-100% of `length` tokens, "
        f"{STYLES[style].source} as filler cut at a random offset per trial, a random 5-digit key stated "
        f"at relative depth d, then a question; greedy decoding of {NEW_TOKENS} tokens, correct if the first "
        f"5 digits of the output are the key",
    }


def format_table(res: dict) -> str:
    """Accuracy as a table: one row per length, one column per depth."""
    depths, acc = res["depths"], res["accuracy"]
    title = f"passkey accuracy ({res['style']}, {res['trials']} trials per cell; rows: length, columns: depth)"
    header = f"{'length':>8}" + "".join(f"{'d=' + str(d):>8}" for d in depths)
    rows = [f"{n:>8}" + "".join(f"{acc[str(n)][str(d)]:>8.2f}" for d in depths) for n in res["lengths"]]
    mean = f"mean accuracy {res['mean_accuracy']:.3f}, digits {res['mean_digit_accuracy']:.3f}; {res['seconds']:.1f}s"
    return "\n".join([f"protocol: {res['protocol']}", title, header, *rows, mean])
