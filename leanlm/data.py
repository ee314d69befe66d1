"""Data: `prepare` turns text files into token arrays; `TokenDataset` and `BatchIterator` feed them to training.

A prepared directory holds
  train.bin, val.bin      raw token ids (uint16 when the vocabulary fits, else uint32), readable with np.memmap;
                          every document is followed by the end-of-document token
  tokenizer.json, tokenizer_config.json
  manifest.json           what went in (sources, a fingerprint of files + options) and what came out (token counts,
                          dtype, vocabulary size, eos id, tokenizer sha256)

The train/val split is by document (one file = one document): a hash of the document's path relative to its input
decides, so the split does not depend on the order of inputs, on the working directory or on other files. Re-running
with the same inputs and options reuses the directory; every write goes to a temporary directory renamed at the end.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import sys
import sysconfig
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers
from torch import Tensor
from tqdm import tqdm

from leanlm.config import PRESETS, PRETRAINED_PRESETS
from leanlm.errors import LeanLMError
from leanlm.hf import gguf_tokenizer, smollm2_gguf
from leanlm.io import atomic_dir, read_json
from leanlm.tokenizer import Tokenizer

FORMAT_VERSION = 1
EOT = "<|endoftext|>"  # the end-of-document token of trained tokenizers
STDLIB = "stdlib"  # the input word for the running interpreter's standard-library sources
# texts shipped inside the package, by name (leanlm/texts/*/README.md: where they come from, their licence)
TEXTS_DIR = Path(__file__).with_name("texts")
NAMED_TEXTS = {
    "wikitext-2": TEXTS_DIR / "wikitext-2" / "test.txt",  # the test split: the usual perplexity text
    "wikitext-2-valid": TEXTS_DIR / "wikitext-2" / "valid.txt",
}
# stdlib directories that hold tests or third-party code rather than the library itself
STDLIB_EXCLUDE = frozenset({"test", "tests", "idle_test", "site-packages"})
GLOB_CHARS = "*?["
# documents per encode_batch call, and bytes: big enough for the Rust side to use every core, small enough for a
# smooth progress bar and bounded memory
CHUNK_DOCS = 256
CHUNK_BYTES = 4 << 20
MAX_SKIPPED_LISTED = 20


# ---------------------------------------------------------------------------------------------------------------------
# finding documents


@dataclass(frozen=True)
class _Doc:
    path: Path
    key: str  # the path relative to its input (posix): decides the split
    size: int
    mtime_ns: int


def stdlib_files() -> list[Path]:
    """The `.py` sources of the running interpreter's standard library, without tests and site-packages, sorted."""
    return [path for path, _ in _expand(STDLIB)[0]]


def _walk(root: Path, suffix: str = "", exclude: frozenset[str] = frozenset()) -> list[str]:
    """Files under `root` as sorted posix paths relative to it. Hidden entries (.git, .venv, ...) are never text
    the user meant to train on, so they are skipped along with directories named in `exclude`."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".") and d not in exclude]
        rel = Path(dirpath).relative_to(root)
        found += [(rel / f).as_posix() for f in filenames if not f.startswith(".") and f.endswith(suffix)]
    return sorted(found)


def _glob_base(pattern: str) -> Path:
    """The leading wildcard-free directories of a glob: matches are keyed relative to it, like a directory input."""
    parts = Path(pattern).parts
    n = next(i for i, p in enumerate(parts) if any(c in p for c in GLOB_CHARS))
    return Path(*parts[:n]) if n else Path(".")


def _expand(spec: str) -> tuple[list[tuple[Path, str]], Path]:
    """(file, key) pairs of one input and the root its keys are relative to."""
    if spec in NAMED_TEXTS:
        return [(NAMED_TEXTS[spec], NAMED_TEXTS[spec].name)], NAMED_TEXTS[spec].parent
    if spec == STDLIB:
        root = Path(sysconfig.get_paths()["stdlib"])
        return [(root / k, k) for k in _walk(root, suffix=".py", exclude=STDLIB_EXCLUDE)], root
    path = Path(spec)
    if path.is_file():
        return [(path, path.name)], path.parent
    if path.is_dir():
        return [(path / k, k) for k in _walk(path)], path
    if not any(c in spec for c in GLOB_CHARS):
        raise LeanLMError(f"{spec}: no such file or directory")
    base = _glob_base(spec)
    files = []
    for match in map(Path, sorted(glob.glob(spec, recursive=True))):
        if match.is_file():
            files.append((match, match.relative_to(base).as_posix()))
        elif match.is_dir():
            files += [(match / k, (match.relative_to(base) / k).as_posix()) for k in _walk(match)]
    if not files:
        raise LeanLMError(f"{spec}: the pattern matches no files")
    return files, base


def _discover(inputs: Sequence[str]) -> tuple[list[_Doc], list[dict]]:
    """All files of all inputs, in input order; a file named by two inputs counts once."""
    docs, sources, seen = [], [], set()
    for spec in inputs:
        files, root = _expand(spec)
        n = 0
        for path, key in files:
            real = path.resolve()
            if real in seen:
                continue
            seen.add(real)
            st = path.stat()
            docs.append(_Doc(path, key, st.st_size, st.st_mtime_ns))
            n += 1
        sources.append({"input": spec, "root": str(root.resolve()), "files": n})
    return docs, sources


def _read(path: Path) -> str | None:
    try:
        return path.read_bytes().decode("utf-8")
    except (UnicodeDecodeError, OSError):
        return None


# ---------------------------------------------------------------------------------------------------------------------
# tokenizers


def _resolve_tokenizer(ref: str) -> tuple[str, list[Path]]:
    """("gguf" | "json", the files the tokenizer is read from): enough to fingerprint it without loading it."""
    path = Path(ref)
    if path.is_file():
        return ("gguf", [path]) if path.suffix.lower() == ".gguf" else ("json", [path])
    if path.is_dir():
        if not (path / "tokenizer.json").is_file():
            raise LeanLMError(f"{ref}: no tokenizer.json in this directory")
        return "json", [path / f for f in ("tokenizer.json", "tokenizer_config.json") if (path / f).is_file()]
    if ref in PRETRAINED_PRESETS:
        return "gguf", [smollm2_gguf()]
    if ref in PRESETS:
        raise LeanLMError(
            f"preset {ref!r} has no published weights, hence no tokenizer (presets with one: "
            f"{', '.join(PRETRAINED_PRESETS)})"
        )
    raise LeanLMError(
        f"{ref}: unknown tokenizer (expected a tokenizer.json file, a directory containing one, a .gguf "
        f"file or one of the presets {', '.join(PRETRAINED_PRESETS)})"
    )


def load_tokenizer_ref(ref: str | Path) -> Tokenizer:
    """Load a tokenizer from a tokenizer.json file, a directory holding one (HF directory or leanlm checkpoint),
    a .gguf file or a preset with weights (`smollm2-135m`)."""
    kind, files = _resolve_tokenizer(str(ref))
    if kind == "json":
        return Tokenizer.load(files[0])
    try:
        return gguf_tokenizer(files[0])
    except LeanLMError:
        raise
    except Exception as e:  # gguf/transformers raise assorted errors on files that are not GGUF
        raise LeanLMError(f"{files[0]}: cannot read a tokenizer from this GGUF file ({str(e)[:120]})") from None


def model_tokenizer(tok: Tokenizer | None, ref: str, override: str | Path | None = None) -> Tokenizer:
    """The tokenizer to use with model `ref`: `override` (a `--tokenizer` reference) if given, else its own `tok`."""
    if override:
        return load_tokenizer_ref(override)
    if tok is None:
        raise LeanLMError(f"model {ref!r} comes without a tokenizer: pass --tokenizer PATH")
    return tok


def train_tokenizer(
    texts: Iterator[str], vocab_size: int, n_texts: int | None = None, progress: bool = False
) -> Tokenizer:
    """A byte-level BPE (GPT-2 style) with `<|endoftext|>` as its only special token, used as bos and eos."""
    check_vocab_size(vocab_size)
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOT],
        show_progress=progress,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer, length=n_texts)
    return Tokenizer(tok, bos_token=EOT, eos_token=EOT)


def check_vocab_size(vocab_size: int) -> None:
    lo, hi = 256 + 1, 2**32 - 1  # every byte + the special token; the largest id a uint32 array holds
    if not isinstance(vocab_size, int) or isinstance(vocab_size, bool) or not lo <= vocab_size <= hi:
        raise LeanLMError(f"vocab_size must be an integer in [{lo}, {hi}] (256 bytes + {EOT}), got {vocab_size!r}")


def _document_separator(tok: Tokenizer) -> tuple[Tokenizer, str]:
    """The token that ends every document: `<|endoftext|>` when the vocabulary has it (in SmolLM2's, eos is the chat
    end-of-turn token instead), else the tokenizer's eos, else `</s>`. A tokenizer without eos gets the separator as
    its eos, so that the saved tokenizer_config says where generated documents end."""
    sep = next((t for t in (EOT, tok.eos_token, "</s>") if t is not None and tok.tok.token_to_id(t) is not None), None)
    if sep is None:
        raise LeanLMError("the tokenizer has no end-of-text token (<|endoftext|>, eos or </s>) to separate documents")
    if tok.eos_id is None:
        tok = Tokenizer(
            tok.tok,
            bos_token=tok.bos_token,
            eos_token=sep,
            chat_template=tok.chat_template,
            add_bos=tok.add_bos,
            pad_token=tok.pad_token,
        )
    return tok, sep


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 65535 else np.uint32)


# ---------------------------------------------------------------------------------------------------------------------
# prepare


def _unit_hash(seed: int, key: str) -> float:
    digest = hashlib.sha256(f"{seed}\0{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_documents(keys: Sequence[str], val_fraction: float, seed: int = 0) -> list[bool]:
    """Which documents are validation documents: those whose hash falls under `val_fraction`, but with two or more
    documents at least one in each split (the lowest hash goes to val, the highest to train)."""
    u = [_unit_hash(seed, k) for k in keys]
    is_val = [x < val_fraction for x in u]
    if len(keys) >= 2:
        if not any(is_val):
            is_val[u.index(min(u))] = True
        if all(is_val):
            is_val[u.index(max(u))] = False
    return is_val


def _fingerprint(docs: list[_Doc], options: dict) -> str:
    h = hashlib.sha256(json.dumps(options, sort_keys=True).encode())
    for d in docs:
        h.update(f"{d.path.resolve()}\0{d.key}\0{d.size}\0{d.mtime_ns}\n".encode())
    return h.hexdigest()


def _reusable(out: Path, fingerprint: str) -> dict | None:
    """The manifest of `out` if it was prepared from the same fingerprint and its token files are complete."""
    try:
        m = read_manifest(out)
    except LeanLMError:
        return None
    if m["fingerprint"] != fingerprint or not (out / "tokenizer.json").is_file():
        return None
    for split in ("train", "val"):
        f = out / f"{split}.bin"
        if not f.is_file() or f.stat().st_size != m[f"{split}_tokens"] * np.dtype(m["dtype"]).itemsize:
            return None
    return m


def _chunks(docs: list[_Doc]) -> Iterator[list[_Doc]]:
    chunk, size = [], 0
    for d in docs:
        chunk.append(d)
        size += d.size
        if len(chunk) >= CHUNK_DOCS or size >= CHUNK_BYTES:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


def _reread(doc: _Doc) -> str:
    text = _read(doc.path)
    if text is None:
        raise LeanLMError(f"{doc.path}: changed while preparing (no longer readable UTF-8)")
    return text


def prepare(
    inputs: list[str],
    out: str | Path,
    tokenizer: str | None = None,
    vocab_size: int = 8192,
    val_fraction: float = 0.05,
    seed: int = 0,
    progress: bool = True,
) -> dict:
    """Tokenize text files into `out` (see the module docstring); returns the manifest plus `reused`.

    `inputs`: files, directories (recursively, hidden entries skipped), globs, or the word `stdlib`.
    `tokenizer`: None trains a byte-level BPE of `vocab_size` on the training documents; otherwise a reference for
    `load_tokenizer_ref` and `vocab_size` is ignored. `seed` salts the document hash that picks the split.
    """
    t0 = time.perf_counter()
    out = Path(out)
    if not inputs:
        raise LeanLMError("prepare: no inputs given")
    if not isinstance(val_fraction, (int, float)) or not 0 < val_fraction < 1:
        raise LeanLMError(f"val_fraction must be in (0, 1), got {val_fraction!r}")
    if tokenizer is None:
        check_vocab_size(vocab_size)
    if out.exists() and not (out.is_dir() and ((out / "manifest.json").is_file() or not any(out.iterdir()))):
        raise LeanLMError(f"{out}: exists and is not a prepared data directory; refusing to overwrite it")

    docs, sources = _discover(inputs)
    options = {
        "format": FORMAT_VERSION,
        "inputs": list(inputs),
        "val_fraction": val_fraction,
        "seed": seed,
        "vocab_size": vocab_size if tokenizer is None else None,
        "tokenizer": tokenizer,
    }
    if tokenizer is not None:
        _, tok_files = _resolve_tokenizer(tokenizer)
        options["tokenizer_files"] = [[str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns] for f in tok_files]
    fingerprint = _fingerprint(docs, options)
    if (old := _reusable(out, fingerprint)) is not None:
        return {**old, "reused": True}

    # read every file once up front: the split needs the final document list, and bad files are reported early
    kept, skipped, n_empty, n_bytes = [], [], 0, 0
    for d in docs:
        text = _read(d.path)
        if text is None:
            print(f"warning: {d.path}: not UTF-8 text (or unreadable), skipped", file=sys.stderr)
            skipped.append(str(d.path))
        elif not text.strip():
            n_empty += 1  # empty files (e.g. bare __init__.py) carry nothing to learn; not worth a warning
        else:
            kept.append(d)
            n_bytes += d.size
    if not kept:
        raise LeanLMError(
            f"the corpus is empty: {len(docs)} files found, {len(skipped)} not UTF-8, "
            f"{n_empty} empty or whitespace only"
        )
    is_val = split_documents([d.key for d in kept], val_fraction, seed)
    t_scan = time.perf_counter()

    if tokenizer is None:
        train_docs = [d for d, v in zip(kept, is_val) if not v] or kept  # a single document trains on all of it
        tok = train_tokenizer((_reread(d) for d in train_docs), vocab_size, len(train_docs), progress=progress)
        if tok.vocab_size < vocab_size:  # BPE ran out of pairs to merge: the model can be smaller than asked
            print(
                f"warning: the corpus yields only {tok.vocab_size} tokens (vocab_size {vocab_size} was asked for)",
                file=sys.stderr,
            )
    else:
        tok = load_tokenizer_ref(tokenizer)
    tok, sep = _document_separator(tok)
    t_tok = time.perf_counter()
    eos = tok.tok.token_to_id(sep)
    vocab = max(tok.vocab_size, max(tok.tok.get_vocab(with_added_tokens=True).values()) + 1)
    dtype = token_dtype(vocab)

    with atomic_dir(out) as tmp:
        with (
            open(tmp / "train.bin", "wb") as ftrain,
            open(tmp / "val.bin", "wb") as fval,
            tqdm(total=len(kept), unit="doc", desc="tokenizing", file=sys.stderr, disable=not progress) as bar,
        ):
            files, counts = {False: ftrain, True: fval}, {False: 0, True: 0}
            val_of = dict(zip(kept, is_val))
            for chunk in _chunks(kept):
                encodings = tok.tok.encode_batch_fast([_reread(d) for d in chunk], add_special_tokens=False)
                for d, enc in zip(chunk, encodings):
                    ids = np.array(enc.ids + [eos], dtype=dtype)
                    if len(kept) == 1:  # one document: its tail is the validation set
                        n_val = min(len(ids) - 1, max(1, round(len(ids) * val_fraction)))
                        parts = {False: ids[:-n_val], True: ids[-n_val:]}
                    else:
                        parts = {val_of[d]: ids}
                    for v, arr in parts.items():
                        arr.tofile(files[v])
                        counts[v] += len(arr)
                bar.update(len(chunk))
        tok.save(tmp)
        manifest = {
            "leanlm_data": FORMAT_VERSION,
            "sources": sources,
            "documents": len(kept),
            "train_documents": len(kept) - sum(is_val) if len(kept) > 1 else 1,
            "val_documents": sum(is_val) if len(kept) > 1 else 0,
            "split": "document" if len(kept) > 1 else "tail of the single document",
            "empty_files": n_empty,
            "skipped": len(skipped),
            "skipped_paths": skipped[:MAX_SKIPPED_LISTED],
            "train_tokens": counts[False],
            "val_tokens": counts[True],
            "bytes": n_bytes,
            "dtype": dtype.name,
            "vocab_size": vocab,
            "eos_id": eos,
            "eos_token": sep,
            "tokenizer": tokenizer or f"trained byte-level BPE ({vocab_size})",
            "tokenizer_sha256": hashlib.sha256((tmp / "tokenizer.json").read_bytes()).hexdigest(),
            "val_fraction": val_fraction,
            "seed": seed,
            "fingerprint": fingerprint,
            "seconds": {
                "scan": round(t_scan - t0, 3),
                "tokenizer": round(t_tok - t_scan, 3),
                "encode": round(time.perf_counter() - t_tok, 3),
            },
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return {**manifest, "reused": False}


# ---------------------------------------------------------------------------------------------------------------------
# reading prepared data


MANIFEST_KEYS = ("fingerprint", "dtype", "vocab_size", "eos_id", "train_tokens", "val_tokens")


def read_manifest(path: str | Path) -> dict:
    f = Path(path) / "manifest.json"
    m = read_json(f, "manifest", f"{path}: not a prepared data directory (no manifest.json; run `leanlm prepare`)")
    missing = [k for k in MANIFEST_KEYS if k not in m]
    if missing:
        raise LeanLMError(f"{f}: corrupt manifest (no {missing[0]!r})")
    if m["dtype"] not in ("uint16", "uint32"):
        raise LeanLMError(f"{f}: dtype must be uint16 or uint32, got {m['dtype']!r}")
    return m


class TokenDataset:
    """One split ("train" or "val") of a prepared directory, memory-mapped."""

    def __init__(self, path: str | Path, split: str = "train"):
        if split not in ("train", "val"):
            raise LeanLMError(f"split must be 'train' or 'val', got {split!r}")
        self.path, self.split = Path(path), split
        self.manifest = read_manifest(self.path)
        dtype = np.dtype(self.manifest["dtype"])
        n = self.manifest[f"{split}_tokens"]
        f = self.path / f"{split}.bin"
        if not f.is_file() or f.stat().st_size != n * dtype.itemsize:
            raise LeanLMError(f"{f}: missing or truncated (the manifest says {n} tokens); run `leanlm prepare` again")
        # numpy refuses to map an empty file
        self.tokens: np.ndarray = np.memmap(f, dtype=dtype, mode="r") if n else np.zeros(0, dtype)
        self.vocab_size: int = self.manifest["vocab_size"]
        self.eos_id: int = self.manifest["eos_id"]

    def __len__(self) -> int:
        return len(self.tokens)

    def check_vocab(self, model_vocab_size: int) -> None:
        """Refuse data whose token ids can go past a model's vocabulary (prepared with another tokenizer)."""
        if self.vocab_size > model_vocab_size:
            raise LeanLMError(
                f"vocab mismatch: the data in {self.path} uses {self.vocab_size} token ids but the model has "
                f"{model_vocab_size}; prepare the data with the model's tokenizer"
            )


def _windows(tokens: np.ndarray, starts: Sequence[int], seq_len: int) -> tuple[Tensor, Tensor]:
    buf = torch.from_numpy(np.stack([tokens[i : i + seq_len + 1] for i in starts]).astype(np.int64))
    return buf[:, :-1].contiguous(), buf[:, 1:].contiguous()


CALIBRATION_LEN = 512  # tokens per calibration window


def calibration_windows(tokens: np.ndarray, n: int, seq_len: int, seed: int = 0) -> Tensor:
    """Up to `n` windows (n, T) of a token array at seeded random, non-overlapping offsets, T = seq_len or shorter
    for a short text: calibration text for a method (SUBLLM's thresholds, LTE's grouping and routers)."""
    seq = min(seq_len, (len(tokens) - 1) // 2)
    if seq < 16:
        raise LeanLMError(f"{len(tokens)} tokens are too few to calibrate on (at least 33 are needed)")
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randperm(len(tokens) // seq - 1, generator=gen)[:n] * seq
    return _windows(tokens, starts.tolist(), seq)[0]


def text_file(ref: str | Path) -> Path:
    """A text file by path, or by the name of a text shipped with leanlm (NAMED_TEXTS)."""
    path = NAMED_TEXTS.get(str(ref), Path(ref))
    if not path.is_file():
        names = ", ".join(NAMED_TEXTS)
        raise LeanLMError(f"{ref}: no such file, and not the name of a text shipped with leanlm ({names})")
    return path


def _check_batch_args(dataset: TokenDataset, batch_size: int, seq_len: int) -> None:
    for name, v in (("batch_size", batch_size), ("seq_len", seq_len)):
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            raise LeanLMError(f"{name} must be a positive integer, got {v!r}")
    if len(dataset) < seq_len + 1:
        raise LeanLMError(
            f"{dataset.path} ({dataset.split}): {len(dataset)} tokens, fewer than seq_len + 1 = "
            f"{seq_len + 1}; use a shorter seq_len or more data"
        )


class BatchIterator:
    """Endless random windows: x = tokens[i:i+T], y = tokens[i+1:i+T+1], as int64 tensors of shape (B, T).

    Every step draws the global batch of world_size * batch_size start offsets from one generator seeded by `seed`,
    identically on every rank, and rank r keeps slice [r*B, (r+1)*B): W ranks see exactly the batch that one process
    with batch W*B sees. `state_dict` captures the position, so a resumed run continues with the same batches.
    """

    def __init__(
        self, dataset: TokenDataset, batch_size: int, seq_len: int, seed: int = 0, rank: int = 0, world_size: int = 1
    ):
        _check_batch_args(dataset, batch_size, seq_len)
        if not 0 <= rank < world_size:
            raise LeanLMError(f"rank must be in [0, world_size={world_size}), got {rank}")
        self.dataset, self.batch_size, self.seq_len = dataset, batch_size, seq_len
        self.rank, self.world_size = rank, world_size
        self.generator = torch.Generator().manual_seed(seed)
        self.step = 0

    def __iter__(self) -> BatchIterator:
        return self

    def __next__(self) -> tuple[Tensor, Tensor]:
        n_starts = len(self.dataset) - self.seq_len  # the last start still leaves room for y's final token
        starts = torch.randint(0, n_starts, (self.world_size * self.batch_size,), generator=self.generator)
        mine = starts[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]
        self.step += 1
        return _windows(self.dataset.tokens, mine.tolist(), self.seq_len)

    def state_dict(self) -> dict:
        return {"step": self.step, "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        try:
            self.generator.set_state(torch.as_tensor(state["generator"], dtype=torch.uint8))
            self.step = int(state["step"])
        except (KeyError, TypeError, RuntimeError) as e:
            raise LeanLMError(f"not a BatchIterator state ({e})") from None


def val_batches(
    dataset: TokenDataset, batch_size: int, seq_len: int, max_batches: int | None = None
) -> Iterator[tuple[Tensor, Tensor]]:
    """Sequential non-overlapping windows from the start of `dataset`, `batch_size` at a time (the last batch may be
    smaller), at most `max_batches` batches: the same tokens every time, for comparable validation losses."""
    _check_batch_args(dataset, batch_size, seq_len)
    starts = range(0, (len(dataset) - 1) // seq_len * seq_len, seq_len)
    if max_batches is not None:
        starts = starts[: max_batches * batch_size]

    def batches() -> Iterator[tuple[Tensor, Tensor]]:  # a nested generator so bad arguments raise at the call
        for b in range(0, len(starts), batch_size):
            yield _windows(dataset.tokens, starts[b : b + batch_size], seq_len)

    return batches()


def spread_batches(dataset: TokenDataset, batch_size: int, seq_len: int, max_batches: int) -> list[Tensor]:
    """`max_batches` batches of input windows spaced evenly over the whole of `dataset` (deterministic): a sample of
    every part of a split, e.g. to calibrate a statistic without reading all of it."""
    _check_batch_args(dataset, batch_size, seq_len)
    last = len(dataset) - seq_len - 1  # the last start with a full window
    n = max_batches * batch_size
    if last < 0:
        raise LeanLMError(f"{dataset.path}: the {dataset.split} split is shorter than one window of {seq_len} tokens")
    starts = np.linspace(0, last, n).astype(np.int64).tolist()
    return [_windows(dataset.tokens, starts[b : b + batch_size], seq_len)[0] for b in range(0, n, batch_size)]
