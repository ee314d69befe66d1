"""leanlm checkpoints and the one function that turns any model reference into a model.

A checkpoint is a directory: `model.safetensors` + `config.json` ({"leanlm": version, "arch": ..., "model": {...}})
+ `tokenizer.json`/`tokenizer_config.json`, written atomically (leanlm.io.atomic_dir).

`load_model(ref)` accepts a preset name, a leanlm checkpoint, a HF directory or a .gguf file.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from leanlm import hf
from leanlm.config import PRESETS, PRETRAINED_PRESETS, apply_overrides, merge_preset, model_config, model_keys, preset
from leanlm.data import CALIBRATION_LEN, TokenDataset, calibration_windows, model_tokenizer, text_file
from leanlm.errors import LeanLMError
from leanlm.evaluate import tokenize_files
from leanlm.io import atomic_dir, read_json
from leanlm.methods import REGISTRY, add_methods, build_model, calibrate_methods, names
from leanlm.methods.quant import float32_bytes, float_state, weight_bytes, with_quant
from leanlm.model import Transformer, torch_dtype
from leanlm.tokenizer import Tokenizer

FORMAT_VERSION = 1


def save_checkpoint(
    model: Transformer, tokenizer: Tokenizer | None, out: str | Path, extra: dict | None = None
) -> Path:
    """Write weights + config (+ tokenizer) atomically to directory `out`."""
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
    meta = read_json(path / "config.json", "config", f"{path}: not a checkpoint (no config.json)")
    if "model" not in meta:
        raise LeanLMError(f"{path / 'config.json'}: not a leanlm config (no 'model' section)")
    return meta


def model_overrides(sets: list[str] | tuple[str, ...]) -> dict:
    """`--set model.KEY=VALUE` items (values parsed as YAML) as a nested dict of ModelConfig fields, e.g.
    ["model.subllm.threshold=0.1"] -> {"subllm": {"threshold": 0.1}}."""
    other = [s.partition(".")[0] for s in sets if not s.startswith("model.")]
    if other:
        raise LeanLMError(f"--set {other[0]}.*: only model.* keys apply when loading a model")
    return apply_overrides({}, list(sets), {"model": model_keys()}).get("model", {})


def _check_overrides(model_cfg: dict, overrides: dict, where: str) -> None:
    """`overrides` may change a method section of `model_cfg`, and add one only for a method without weights."""
    for k, v in overrides.items():
        weightless = k in REGISTRY and not REGISTRY[k].adds_weights
        if isinstance(v, dict) and not isinstance(model_cfg.get(k), dict) and not weightless:
            raise LeanLMError(f"--set model.{k}.*: {where} has no {k} section to change")


def load_checkpoint(
    path: str | Path, dtype: str | None = None, expect_arch: str | None = None, overrides: dict | None = None
) -> tuple[Transformer, Tokenizer | None]:
    """Load a leanlm checkpoint directory, as whatever architecture it holds (leanlm.methods.build_model).

    `expect_arch` (e.g. "llama") refuses any other architecture, e.g. a SUBLLM where a dense model is required.
    `overrides`: model config keys changed at load (`model_overrides`), e.g. SUBLLM's inference threshold.
    """
    path = Path(path)
    meta = read_config(path)
    arch = meta.get("arch", "llama")
    if expect_arch is not None and arch != expect_arch:
        raise LeanLMError(f"{path}: a {arch!r} checkpoint cannot be loaded as {expect_arch!r}")
    overrides = overrides or {}
    _check_overrides(meta["model"], overrides, str(path))
    saved = model_config(merge_preset(meta["model"], {}), where=f"{path}/config.json: model")
    if set(saved.arch.split("+")) != set(arch.split("+")):
        raise LeanLMError(f"{path}/config.json: says arch {arch!r} but its model section describes {saved.arch!r}")
    cfg = model_config(merge_preset(meta["model"], overrides), where=f"{path}/config.json: model")
    wfile = path / "model.safetensors"
    if not wfile.is_file():
        raise LeanLMError(f"{path}: incomplete checkpoint (no model.safetensors)")
    try:
        state = load_file(str(wfile))
    except (SafetensorError, OSError) as e:
        raise LeanLMError(f"{wfile}: corrupt weights ({e})") from None
    model = hf.build_with_state(cfg, state, where=str(path), dtype=dtype)
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
    path = Path(ref)
    if overrides and (path.is_file() or hf.is_hf_dir(path)) and not is_checkpoint(path):
        raise LeanLMError(f"--set applies to presets and leanlm checkpoints, not to {ref} (convert it first)")
    if ref in PRESETS and not path.exists():
        if ref in PRETRAINED_PRESETS:
            model, tok = _pretrained(hf.smollm2_gguf(), dtype)
            if not overrides:
                return model, tok
            _check_overrides(model.cfg.to_dict(), overrides, f"preset {ref}")
            cfg = model_config(merge_preset(model.cfg.to_dict(), overrides), where=f"preset {ref}")
            return hf.build_with_state(cfg, model.state_dict(), where=ref, dtype=dtype), tok
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


def _check_out(out: Path, force: bool) -> None:
    """convert and quantize write a new checkpoint: never over a directory with something in it, unless --force."""
    if out.exists() and any(out.iterdir()) and not force:
        raise LeanLMError(f"{out}: exists and is not empty (pass --force to replace it)")


def _calibration_rows(
    calibrate: str | None, n_tokens: int, cfg, tok: Tokenizer | None, src: str, tokenizer: str | None, seed: int
):
    """Token rows (S, T) of `calibrate` (a text file, a shipped text's name or a prepared data directory: its
    training split) for conversion and calibration, or None; and the tokenizer used."""
    if calibrate is None:
        return None, tok
    if Path(calibrate).is_dir():
        data = TokenDataset(calibrate, "train")
        data.check_vocab(cfg.vocab_size)
        ids = data.tokens
    else:
        tok = model_tokenizer(tok, src, tokenizer)
        ids = tokenize_files(tok, [text_file(calibrate)])[0]
    seq = min(CALIBRATION_LEN, cfg.max_seq_len)
    return calibration_windows(ids, max(1, n_tokens // seq), seq, seed=seed), tok  # (S, T)


def quantize(
    src: str,
    out: str | Path,
    *,
    method: str = "int8",
    group_size: int | None = None,
    head: str | None = None,
    head_group_size: int | None = None,
    act_bits: int = 0,
    act8_count: int = 0,
    calibrate: str | None = None,
    calibrate_tokens: int = 8192,
    tokenizer: str | None = None,
    force: bool = False,
) -> dict:
    """`leanlm quantize`: pack `src`'s weights as `method` (leanlm.methods.quant) and save to `out`. The source may be
    float, trained with quantization-aware training (its float weights are packed), or already quantized (its
    dequantized weights are re-quantized). FlexQ's A8 fallback (act_bits 6, act8_count > 0) ranks the layers on
    `calibrate_tokens` tokens of `calibrate`."""
    out = Path(out)
    _check_out(out, force)
    if act_bits == 6 and act8_count and calibrate is None:
        raise LeanLMError("--act8-count: FlexQ's A8 fallback ranks layers on text: give --calibrate TEXT")
    section = {"format": method, "act_bits": act_bits, "act8_count": act8_count}
    section |= {"group_size": group_size} if group_size is not None else {}
    section |= {"head": head} if head is not None else {}
    section |= {"head_group_size": head_group_size} if head_group_size is not None else {}
    model, tok = load_model(src)
    target = with_quant(model.cfg.replace(dtype="float32"), **section)  # checks formats and group sizes
    before = weight_bytes(model.float())
    new = build_model(target)
    new.load_state_dict(float_state(model))  # the float weights are packed as they load (leanlm.quant.Packed)
    rows, tok = _calibration_rows(calibrate, calibrate_tokens, target, tok, src, tokenizer, 0)
    calibrated = calibrate_methods(new.eval(), list(rows.split(4))) if rows is not None else {}
    save_checkpoint(new, tok, out)
    after = weight_bytes(new)
    return {
        "src": src,
        "out": str(out),
        "arch": new.cfg.arch,
        "quant": dataclasses.asdict(new.cfg.methods["quant"]),
        "calibrated": calibrated,
        "weight_bytes": after,
        "source_weight_bytes": before,
        "weight_bytes_vs_float32": after / float32_bytes(new),
    }


def cache_dir() -> Path:
    """Where leanlm keeps what it derives from installed files: $LEANLM_CACHE, else ~/.cache/leanlm."""
    return Path(os.environ.get("LEANLM_CACHE") or Path.home() / ".cache" / "leanlm")


def _pretrained(gguf: Path, dtype: str | None) -> tuple[Transformer, Tokenizer | None]:
    """A pretrained preset's GGUF, natively quantized (dtype None) or in a float dtype. The native model is also
    kept as a leanlm checkpoint under `cache_dir()`, keyed by the file's size and time: later loads read its
    safetensors and tokenizer.json instead of parsing the GGUF (~0.5 s instead of ~5 s: a cold start to the first
    token is then mostly `import torch`)."""
    if dtype is not None:
        return hf.load_gguf(gguf, dtype=dtype)
    st = gguf.stat()
    cached = cache_dir() / f"{gguf.stem}-{st.st_size}-{int(st.st_mtime)}"
    if is_checkpoint(cached):
        return load_checkpoint(cached)
    model, tok = hf.load_gguf(gguf)
    try:
        save_checkpoint(model, tok, cached)
    except OSError:  # a read-only home: the cache is an optimisation only
        pass
    return model, tok


def convert(
    src: str,
    out: str | Path,
    *,
    to: str = "leanlm",
    dtype: str | None = None,
    methods: Sequence[str] = (),
    sets: Sequence[str] = (),
    calibrate: str | None = None,
    calibrate_tokens: int = 32768,
    tokenizer: str | None = None,
    seed: int = 0,
    force: bool = False,
) -> dict:
    """`leanlm convert`: load `src`, add `methods` (their config keys set by `sets`, `model.NAME.KEY=VALUE`), let
    the methods convert and calibrate on `calibrate_tokens` tokens of the text `calibrate` (a file, a shipped text's
    name, or a prepared data directory: its training split), and save to `out` as a
    leanlm checkpoint or (`to="hf"`, the dense baseline only) a HF directory. `sets` on sections the model already
    has change them at load (as `--set` does elsewhere)."""
    out = Path(out)
    _check_out(out, force)
    for i, name in enumerate(methods):
        if name in methods[:i]:
            raise LeanLMError(f"--method {name}: given twice")
        if name not in names("model"):
            raise LeanLMError(f"--method {name}: not a method of the model (known: {', '.join(names('model'))})")
    if calibrate_tokens < 64:
        raise LeanLMError(f"--calibrate-tokens must be at least 64 (got {calibrate_tokens})")
    overrides = model_overrides(sets)
    added = {k: v for k, v in overrides.items() if k in methods}
    at_load = {k: v for k, v in overrides.items() if k not in methods}
    # float32 unless asked otherwise: a GGUF converts to float weights (`leanlm quantize` keeps or changes packing)
    model, tok = load_model(src, dtype=dtype or "float32", seed=seed, overrides=at_load or None)
    out_dtype = dtype or model.cfg.dtype
    model = model.float()  # conversion and calibration compute in float32
    for name in methods:
        if name in model.cfg.methods:
            raise LeanLMError(f"--method {name}: {src} already has it")
    target = model_config({**model.cfg.to_dict(), **{name: added.get(name, {}) for name in methods}})
    rows, tok = _calibration_rows(calibrate, calibrate_tokens, target, tok, src, tokenizer, seed)
    if target != model.cfg:
        model = add_methods(model, target, seed=seed, calibration=rows)
    calibrated = calibrate_methods(model, list(rows.split(4))) if rows is not None else {}
    model = model.to(torch_dtype(out_dtype)).eval()
    model.cfg = model.cfg.replace(dtype=out_dtype)
    if to == "hf":
        hf.export_hf(model, tok, out)
    else:
        save_checkpoint(model, tok, out)
    return {
        "src": src,
        "out": str(out),
        "format": to,
        "arch": model.cfg.arch,
        "params": model.num_params(),
        "calibrated": calibrated,
        "config": model.cfg.to_dict(),
    }
