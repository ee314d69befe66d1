"""A training run on disk: step checkpoints (weights + config + tokenizer + trainer state), written atomically, found
again on resume, pruned; and every RNG a step draws from, saved and restored so that a resumed run continues exactly.

trainer_state.pt holds the optimizer, step, tokens, RNG and data-iterator state, all loadable with
torch.load(weights_only=True).
"""

from __future__ import annotations

import random
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor, nn

from leanlm.checkpoint import read_config, save_checkpoint
from leanlm.errors import LeanLMError
from leanlm.io import atomic_dir

TRAINER_STATE_VERSION = 1
CKPT_RE = re.compile(r"^step-(\d{8})$")


def checkpoint_dirs(out: Path) -> list[Path]:
    """Step checkpoint directories in `out`, oldest first."""
    if not out.is_dir():
        return []
    return sorted(p for p in out.iterdir() if p.is_dir() and CKPT_RE.match(p.name))


def load_training_checkpoint(path: Path) -> tuple[dict, dict[str, Tensor], dict]:
    """(config.json, weights, trainer state) of a complete step checkpoint; LeanLMError if anything is missing or
    does not load."""
    meta = read_config(path)
    try:
        weights = load_file(str(path / "model.safetensors"))
    except (SafetensorError, OSError) as e:
        raise LeanLMError(f"{path}: missing or corrupt model.safetensors ({e})") from None
    try:
        state = torch.load(path / "trainer_state.pt", map_location="cpu", weights_only=True)
    except Exception as e:  # torch.load fails with assorted errors (RuntimeError, EOFError, UnpicklingError, ...)
        raise LeanLMError(f"{path}: missing or corrupt trainer_state.pt ({type(e).__name__})") from None
    if not isinstance(state, dict) or state.get("version") != TRAINER_STATE_VERSION:
        raise LeanLMError(f"{path}: trainer_state.pt is not a leanlm trainer state (version {TRAINER_STATE_VERSION})")
    return meta, weights, state


def latest_checkpoint(out: Path, warn: Callable[[str], None]) -> tuple[Path, dict, dict, dict] | None:
    """The newest complete checkpoint in `out`, loaded; broken newer ones are reported through `warn` and skipped."""
    for path in reversed(checkpoint_dirs(out)):
        try:
            return (path, *load_training_checkpoint(path))
        except LeanLMError as e:
            warn(f"warning: {e}; falling back to the previous checkpoint")
    return None


def save_training_checkpoint(path: Path, model: nn.Module, tokenizer: Any, trainer_state: dict) -> Path:
    """Weights + config.json + tokenizer + trainer_state.pt, all renamed into place together."""
    with atomic_dir(path) as tmp:
        # tmp is empty, so save_checkpoint's own atomic write onto it is a plain rename; trainer_state.pt then joins
        # the weights before the outer rename makes the whole checkpoint visible at once
        save_checkpoint(model, tokenizer, tmp)
        torch.save(trainer_state, tmp / "trainer_state.pt")
    return path


def prune(out: Path, keep_last: int) -> None:
    if keep_last:
        for old in checkpoint_dirs(out)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)


def remove_stale_temporaries(out: Path) -> None:
    """Temporary directories of a run that was killed while writing (atomic_dir cleans up only on exceptions)."""
    for p in out.glob(".*.tmp-*"):
        shutil.rmtree(p, ignore_errors=True)


def rng_state() -> dict:
    """Every RNG a training step could draw from, as tensors and plain values (torch.load(weights_only=True))."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, py_state, gauss_next = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "python": {"version": version, "state": torch.tensor(py_state, dtype=torch.int64), "gauss_next": gauss_next},
    }


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    keys = n["keys"].numpy().astype(np.uint32)
    np.random.set_state((n["kind"], keys, n["pos"], n["has_gauss"], n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"].tolist()), p["gauss_next"]))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
