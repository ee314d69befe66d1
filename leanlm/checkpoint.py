"""leanlm checkpoints and the one function that turns any model reference into a model.

A checkpoint is a directory: `model.safetensors` + `config.json` ({"leanlm": version, "arch": ..., "model": {...}})
+ `tokenizer.json`/`tokenizer_config.json`. Directories are written atomically: into a temporary sibling, fsynced,
then renamed into place, so a crash never leaves a half-written checkpoint under the final name.

`load_model(ref)` accepts a preset name, a leanlm checkpoint, a HF directory or a .gguf file.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from torch import Tensor

from leanlm.config import METHODS, PRESETS, PRETRAINED_PRESETS, ModelConfig, merge_preset, preset
from leanlm.errors import LeanLMError
from leanlm.model import Transformer, torch_dtype
from leanlm.tokenizer import Tokenizer

FORMAT_VERSION = 1


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_dir(final: str | Path) -> Iterator[Path]:
    """Yield a temporary directory next to `final`; on success fsync its files and rename it to `final`.

    An existing `final` is replaced only after the new directory is complete (it is moved aside, then deleted).
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes 0700; give the result ordinary permissions
        for f in tmp.rglob("*"):
            if f.is_file():
                os.chmod(f, 0o666 & ~umask)
                with open(f, "rb+") as fh:
                    os.fsync(fh.fileno())
        _fsync_dir(tmp)
        old = None
        if final.exists():
            old = final.parent / f".{final.name}.old-{os.getpid()}"
            os.replace(final, old)
        os.replace(tmp, final)
        _fsync_dir(final.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def build_model(cfg: ModelConfig) -> Transformer:
    """A fresh (uninitialised) model for `cfg`: the dense baseline, or the efficiency methods its config names.

    The one place methods plug in; call `.init_weights(seed)` on the result, or load weights into it.
    """
    if cfg.subllm is not None:
        from leanlm.subllm import SubLLM

        model = SubLLM(cfg)
    else:
        model = Transformer(cfg)
    if cfg.lte is not None:  # composes with any model whose `layers` are baseline Blocks
        from leanlm.lte import apply_lte

        model = apply_lte(model, cfg)
    return model


def add_methods(model: Transformer, cfg: ModelConfig, seed: int = 0, calibration: Tensor | None = None) -> Transformer:
    """Turn a trained model into the architecture `cfg` describes: same backbone weights, the method's new modules
    initialised as the method initialises them (e.g. a pretrained LLaMA uptrained into a SUBLLM with `run.init`).

    calibration: token rows (S, T) of training text, for what groups by activations (LTE's grouping=activations)."""
    if model.cfg.backbone() != cfg.backbone():
        raise LeanLMError(f"cannot convert into {cfg.arch}: the model's backbone differs from the configured one")
    for m in METHODS:
        if getattr(model.cfg, m, None) is not None and getattr(model.cfg, m) != getattr(cfg, m, None):
            if m == "lte" and cfg.lte is not None:  # LTE stage 1 -> 2: checked by lte_state_dict
                continue
            raise LeanLMError(f"the model already has {m}={getattr(model.cfg, m)!r}; cannot change or remove it")
    state = model.state_dict()
    if cfg.lte is not None:
        from leanlm.lte import init_routers, lte_state_dict

        state = lte_state_dict(model, cfg, seed, calibration)  # dense: grouping + permutation; LTE: the stage change
    new = build_model(cfg).init_weights(seed)
    missing, unexpected = new.load_state_dict(state, strict=False)
    if cfg.lte is not None and model.cfg.lte is None:  # new routers (may be initialised from the grouped weights)
        init_routers(new, seed)
    if unexpected:
        raise LeanLMError(f"cannot convert {model.cfg.arch} into {cfg.arch}: unexpected weight {unexpected[0]!r}")
    return new.to(next(model.parameters()).dtype)


def save_checkpoint(
    model: Transformer, tokenizer: Tokenizer | None, out: str | Path, extra: dict | None = None
) -> Path:
    """Write weights + config (+ tokenizer) atomically to directory `out`."""
    from safetensors.torch import save_file

    with atomic_dir(out) as tmp:
        state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
        if model.cfg.tie_embeddings:
            state.pop("lm_head.weight", None)
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt", "leanlm": str(FORMAT_VERSION)})
        meta = {"leanlm": FORMAT_VERSION, "arch": model.cfg.arch, "model": model.cfg.to_dict(), **(extra or {})}
        (tmp / "config.json").write_text(json.dumps(meta, indent=2) + "\n")
        if tokenizer is not None:
            tokenizer.save(tmp)
    return Path(out)


def is_checkpoint(path: Path) -> bool:
    try:
        return "leanlm" in json.loads((path / "config.json").read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError, TypeError):
        return False


def read_config(path: Path) -> dict:
    f = path / "config.json"
    if not f.is_file():
        raise LeanLMError(f"{path}: not a checkpoint (no config.json)")
    try:
        meta = json.loads(f.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LeanLMError(f"{f}: corrupt config ({e})") from None
    if not isinstance(meta, dict) or "model" not in meta:
        raise LeanLMError(f"{f}: not a leanlm config (no 'model' section)")
    lte = meta["model"].get("lte")
    if isinstance(lte, dict):  # written before the decode kernel became a run-time choice (--kernel): drop it
        lte.pop("decode_kernel", None)
    return meta


def model_overrides(sets: list[str] | tuple[str, ...]) -> dict:
    """`--set model.KEY=VALUE` items (values parsed as YAML) as a nested dict of ModelConfig fields, e.g.
    ["model.subllm.threshold=0.1"] -> {"subllm": {"threshold": 0.1}}."""
    from leanlm.train import apply_overrides

    raw = apply_overrides({}, list(sets))
    other = sorted(set(raw) - {"model"})
    if other:
        raise LeanLMError(f"--set {other[0]}.*: only model.* keys apply when loading a model")
    return raw.get("model", {})


def _check_overrides(model_cfg: dict, overrides: dict, where: str) -> None:
    """`overrides` may change a method section of `model_cfg`, not add one."""
    for k, v in overrides.items():
        if isinstance(v, dict) and not isinstance(model_cfg.get(k), dict):
            raise LeanLMError(f"--set model.{k}.*: {where} has no {k} section to change")


def load_checkpoint(
    path: str | Path, dtype: str | None = None, expect_arch: str | None = None, overrides: dict | None = None
) -> tuple[Transformer, Tokenizer | None]:
    """Load a leanlm checkpoint directory, as whatever architecture it holds (see `build_model`).

    `expect_arch` (e.g. "llama") refuses any other architecture, e.g. a SUBLLM where a dense model is required.
    `overrides`: ModelConfig fields changed at load (`model_overrides`), e.g. an inference threshold or kernel.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from leanlm.hf import build_with_state

    path = Path(path)
    meta = read_config(path)
    arch = meta.get("arch", "llama")
    if expect_arch is not None and arch != expect_arch:
        raise LeanLMError(f"{path}: a {arch!r} checkpoint cannot be loaded as {expect_arch!r}")
    overrides = overrides or {}
    _check_overrides(meta["model"], overrides, str(path))
    cfg = ModelConfig.from_dict(merge_preset(meta["model"], overrides), where=f"{path}/config.json: model")
    if cfg.arch != arch:
        raise LeanLMError(f"{path}/config.json: says arch {arch!r} but its model section describes {cfg.arch!r}")
    wfile = path / "model.safetensors"
    if not wfile.is_file():
        raise LeanLMError(f"{path}: incomplete checkpoint (no model.safetensors)")
    try:
        state = load_file(str(wfile))
    except (SafetensorError, OSError) as e:
        raise LeanLMError(f"{wfile}: corrupt weights ({e})") from None
    model = build_with_state(cfg, state, where=str(path), dtype=dtype)
    tok = Tokenizer.load(path) if (path / "tokenizer.json").is_file() else None
    if tok is not None:
        check_tokenizer_fits(tok, cfg.vocab_size, where=f"{path}: ")
    return model, tok


def check_tokenizer_fits(tok: Tokenizer, vocab_size: int, where: str = "") -> None:
    """A tokenizer may have fewer tokens than the model's (padded) vocabulary, never more."""
    if tok.vocab_size > vocab_size:
        raise LeanLMError(f"{where}tokenizer has {tok.vocab_size} tokens but the model's vocabulary is {vocab_size}")


def load_model(
    ref: str, dtype: str | None = None, seed: int = 0, overrides: dict | None = None
) -> tuple[Transformer, Tokenizer | None]:
    """Resolve a model reference: a preset name, a leanlm checkpoint dir, a HF dir or a .gguf file.

    Presets without published weights give a randomly initialised model (seeded) and no tokenizer. `overrides`
    (`model_overrides`) change ModelConfig fields of a preset or leanlm checkpoint at load.
    """
    from leanlm import hf

    path = Path(ref)
    if overrides and (ref in PRETRAINED_PRESETS or path.is_file() or hf.is_hf_dir(path)) and not is_checkpoint(path):
        raise LeanLMError(f"--set applies to presets and leanlm checkpoints, not to {ref} (convert it first)")
    if ref in PRESETS and not path.exists():
        if ref in PRETRAINED_PRESETS:
            return hf.load_gguf(hf.smollm2_gguf(), dtype=dtype)
        _check_overrides(PRESETS[ref], overrides or {}, f"preset {ref}")
        cfg = preset(ref, **(overrides or {}))
        model = build_model(cfg).init_weights(seed=seed)
        return model.to(torch_dtype(dtype or cfg.dtype)).eval(), None
    if not path.exists():
        raise LeanLMError(f"{ref}: no such file or directory, and not a preset (presets: {', '.join(PRESETS)})")
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise LeanLMError(f"{ref}: not a model (expected a checkpoint directory or a .gguf file)")
        return hf.load_gguf(path, dtype=dtype)
    if is_checkpoint(path):
        return load_checkpoint(path, dtype=dtype, overrides=overrides)
    if hf.is_hf_dir(path):
        return hf.load_hf_dir(path, dtype=dtype)
    raise LeanLMError(f"{ref}: not a checkpoint directory (no leanlm or Hugging Face config.json)")
