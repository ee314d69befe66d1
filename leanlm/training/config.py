"""The training config: one YAML file of sections, each a typed dataclass, overridable key by key with `--set`.

    model:   {preset: cpu-10m, max_seq_len: 256}  # a model config (leanlm.config.model_config), or with run.init only
                                                  # method sections, which convert the init model (e.g. {subllm: ...}),
                                                  # and context keys (CONTEXT_KEYS: a context extension)
    data:    {inputs: [stdlib], vocab_size: 8192} # text to prepare into <run.out>/data, or {dir: PREPARED_DIR}
    optim:   {lr: 1.0e-3, schedule: cosine}       # leanlm.training.optim.OptimConfig
    run:     {out: out/run, steps: 1000}          # RunConfig below
    distill: {teacher: out/dense/final}           # optional: leanlm.training.distill.DistillConfig
    ltd:     {r_min: 64, q: 16}                   # optional: a training method's section (leanlm.methods, scope train)

`--set section.key=value` overrides one key; the value is parsed as YAML (`run.bf16=true`, `optim.betas=[0.9,0.99]`).
Unknown keys and wrong types are errors naming the full key. The resolved config is written to `<run.out>/config.yaml`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from leanlm.config import apply_overrides, build_dataclass, model_config, model_keys, read_yaml
from leanlm.errors import LeanLMError
from leanlm.methods import CONTEXT_KEYS, REGISTRY, names
from leanlm.model import ModelConfig
from leanlm.training.distill import DistillConfig
from leanlm.training.distributed import DEVICES, STRATEGIES
from leanlm.training.optim import OptimConfig


@dataclass
class DataConfig:
    """Training text: a prepared directory (`leanlm prepare`), or inputs prepared into <run.out>/data on first use."""

    dir: str | None = None  # a prepared data directory
    inputs: list | None = None  # or: files, directories, globs, `stdlib` or a shipped text's name (`leanlm prepare`)
    vocab_size: int | None = None  # BPE size when training a tokenizer for `inputs` (default: the model's vocab)
    tokenizer: str | None = None  # tokenizer for `inputs` instead of training one (default with run.init: the init's)
    val_fraction: float = 0.05  # fraction of documents held out for validation

    def __post_init__(self) -> None:
        if (self.dir is None) == (self.inputs is None):
            raise LeanLMError("data: give exactly one of data.dir (a prepared directory) or data.inputs (text)")
        if self.inputs is not None and (not self.inputs or not all(isinstance(s, str) for s in self.inputs)):
            raise LeanLMError(f"data.inputs: must be a non-empty list of paths (got {self.inputs!r})")
        if not 0 < self.val_fraction < 1:
            raise LeanLMError(f"data.val_fraction: must be in (0, 1) (got {self.val_fraction!r})")


@dataclass
class RunConfig:
    """How long, how big, where to, and on what.

    `batch_size` is the global batch of one micro-step: each of W torchrun processes takes batch_size / W windows of
    the same global batch, so losses do not depend on W. One optimizer step sees batch_size * seq_len * grad_accum
    tokens.
    """

    out: str = "out/run"  # output directory: checkpoints, final/, metrics.csv, config.yaml
    steps: int = 1000  # optimizer steps; the learning-rate schedule spans them
    batch_size: int = 16  # global windows per micro-step, split over torchrun processes
    seq_len: int = 256  # tokens per window
    grad_accum: int = 1  # micro-steps per optimizer step
    seed: int = 0  # weight init, data order, torch/numpy/python RNGs
    eval_every: int = 100  # validation every N steps (0: only at the end)
    eval_batches: int = 20  # validation batches of batch_size windows (the same windows every time)
    save_every: int = 500  # checkpoint every N steps and at the last step (0: only final/)
    keep_last: int = 2  # step checkpoints to keep (0: all)
    log_every: int = 10  # metrics.csv / TensorBoard row every N steps (and at every validation)
    bf16: bool = False  # bfloat16 autocast for forward and backward; weights and optimizer stay float32
    init: str | None = None  # fine-tune: start from this model (preset, checkpoint, HF dir, .gguf) instead of random
    resume: bool = False  # continue from the latest complete step checkpoint in `out`
    strategy: str = "auto"  # multi-process: auto (= ddp) | ddp | fsdp; ignored in a single process
    device: str = "auto"  # auto (cuda if available) | cpu | cuda
    progress: bool = True  # progress bar on stderr
    # stop once this many layer-averaged tokens (LayerTokens / n_layers; plain tokens for a dense model) are consumed,
    # instead of after run.steps: equal-compute comparisons of random-LTD with dense (run.steps is then derived)
    layer_token_budget: int | None = None

    def __post_init__(self) -> None:
        positive = ("steps", "batch_size", "seq_len", "grad_accum", "eval_batches", "log_every")
        for name in positive + ("eval_every", "save_every", "keep_last"):
            v = getattr(self, name)
            if v < (1 if name in positive else 0):
                raise LeanLMError(f"run.{name}: must be {'>= 1' if name in positive else '>= 0'} (got {v!r})")
        if self.strategy not in STRATEGIES:
            raise LeanLMError(f"run.strategy: must be one of {', '.join(STRATEGIES)} (got {self.strategy!r})")
        if self.device not in DEVICES:
            raise LeanLMError(f"run.device: must be one of {', '.join(DEVICES)} (got {self.device!r})")
        if self.layer_token_budget is not None and self.layer_token_budget < 1:
            raise LeanLMError(f"run.layer_token_budget: must be >= 1 (got {self.layer_token_budget!r})")


@dataclass
class TrainConfig:
    model: ModelConfig | None  # None only with run.init (the architecture is then the init model's)
    data: DataConfig
    optim: OptimConfig
    run: RunConfig
    # with run.init, a model section holding only method keys (e.g. `subllm`) and CONTEXT_KEYS changes the init model
    add_methods: dict | None = None
    distill: DistillConfig | None = None  # knowledge distillation from a teacher model
    train_methods: dict[str, Any] = field(default_factory=dict)  # training methods' sections (e.g. ltd), by name

    def to_dict(self) -> dict:
        model = self.model.to_dict() if self.model is not None else self.add_methods
        return {
            "model": model,
            "data": dataclasses.asdict(self.data),
            "optim": dataclasses.asdict(self.optim),
            "run": dataclasses.asdict(self.run),
            **({"distill": dataclasses.asdict(self.distill)} if self.distill is not None else {}),
            **{name: dataclasses.asdict(section) for name, section in self.train_methods.items()},
        }


def sections() -> dict[str, type]:
    """The sections besides `model` and their dataclasses; distill and the training methods' are optional."""
    methods = {name: REGISTRY[name].Config for name in names("train")}
    return {"data": DataConfig, "optim": OptimConfig, "run": RunConfig, "distill": DistillConfig, **methods}


def section_keys() -> dict[str, list[str]]:
    """The sections of a training config and the keys of each (what `--set` may name)."""
    keys = {name: [f.name for f in dataclasses.fields(cls)] for name, cls in sections().items()}
    return {"model": model_keys(), **keys}


def config_from_dict(raw: dict) -> TrainConfig:
    """Build a TrainConfig from the YAML mapping; errors name the offending key."""
    if not isinstance(raw, dict):
        raise LeanLMError(f"config: expected a mapping with sections {', '.join(section_keys())}")
    unknown = [k for k in raw if k not in section_keys()]
    if unknown:
        raise LeanLMError(f"unknown section {unknown[0]!r} (allowed: {', '.join(section_keys())})")
    parts: dict[str, Any] = {"model": None, "train_methods": {}}
    for section, cls in sections().items():
        optional = section == "distill" or section in names("train")
        if optional and raw.get(section) is None:
            continue
        part = build_dataclass(cls, raw.get(section) or {}, section)
        if section in names("train"):
            parts["train_methods"][section] = part
        else:
            parts[section] = part
    model = raw.get("model") or {}
    init = parts["run"].init
    if init and model and set(model) <= {*names("model"), *CONTEXT_KEYS}:  # uptraining, context extension
        parts["add_methods"] = dict(model)
    elif model:
        parts["model"] = model_config(model)
        if parts["model"].dtype != "float32":
            got = parts["model"].dtype
            raise LeanLMError(f"model.dtype: training keeps float32 weights (got {got!r}); use run.bf16 for autocast")
    elif not init:
        raise LeanLMError("model: missing section (give model: {preset: NAME, ...} or run.init to fine-tune)")
    return TrainConfig(**parts)


def load_config(path: str | Path, sets: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    """Read a YAML training config and apply `--set` overrides."""
    return config_from_dict(apply_overrides(read_yaml(path), list(sets), section_keys()))
