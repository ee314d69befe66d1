"""Training: typed YAML configs, one readable training loop, checkpoints with exact resume, and `leanlm train`.

    leanlm train --config configs/tiny-cpu.yaml --set run.steps=100 --set optim.lr=1e-3
    torchrun --nproc_per_node 2 -m leanlm train --config configs/tiny-cpu.yaml --set run.strategy=fsdp

A config has four sections (and optional ltd and distill); every key is optional except a model (or run.init) and data:

    model: {preset: cpu-10m, max_seq_len: 256}   # a preset plus ModelConfig overrides, or every ModelConfig field
    data:  {inputs: [stdlib], vocab_size: 8192}  # text to prepare into <run.out>/data, or {dir: PREPARED_DIR}
    optim: {lr: 1.0e-3, schedule: cosine, warmup_steps: 100}           # see leanlm.optim.OptimConfig
    run:   {out: out/run, steps: 1000, batch_size: 16, seq_len: 256}   # see RunConfig below
    ltd:   {r_min: 64, q: 16}                    # optional: random-LTD training (leanlm.ltd.LTDConfig)
    distill: {teacher: out/dense/final}          # optional: distil from a teacher model (DistillConfig below)

`--set section.key=value` overrides one key; the value is parsed as YAML (`run.bf16=true`, `optim.betas=[0.9,0.99]`).
Unknown keys and wrong types are errors naming the full key. The resolved config is written to `<run.out>/config.yaml`.

Outputs in run.out: `step-XXXXXXXX/` checkpoints (weights, config.json, tokenizer, trainer_state.pt: optimizer, step,
tokens, RNG and data-iterator state, all loadable with torch.load(weights_only=True)), the last `run.keep_last` of
them kept; `final/` (weights + config + tokenizer, for `leanlm eval/generate/bench --model`); `metrics.csv`;
`tensorboard/` when tensorboard is installed; `loss.png` when matplotlib is.

`run.batch_size` is the global batch of one micro-step: each of W torchrun processes takes batch_size / W windows of
the same global batch, so losses do not depend on W. One optimizer step sees batch_size * seq_len * grad_accum tokens.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import functools
import math
import os
import random
import re
import shutil
import sys
import time
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from torch import Tensor, nn

from leanlm import distributed
from leanlm.config import METHODS, PRESETS, ModelConfig, build_dataclass, merge_preset
from leanlm.errors import LeanLMError
from leanlm.ltd import LTDConfig, RandomLTD, resolve_plan
from leanlm.optim import OptimConfig, build_optimizer, schedule_lr, schedule_lr_layer_tokens

TRAINER_STATE_VERSION = 1
CKPT_RE = re.compile(r"^step-(\d{8})$")
METRICS = ("step", "tokens", "loss", "val_loss", "lr", "grad_norm", "tokens_per_s", "flops_per_token")

# ---------------------------------------------------------------------------------------------------------------------
# config


@dataclass
class DataConfig:
    """Training text: a prepared directory (`leanlm prepare`), or inputs prepared into <run.out>/data on first use."""

    dir: str | None = None  # a prepared data directory
    inputs: list | None = None  # or: files, directories, globs or `stdlib`, as for `leanlm prepare`
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
    """How long, how big, where to, and on what."""

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
        if self.strategy not in distributed.STRATEGIES:
            allowed = ", ".join(distributed.STRATEGIES)
            raise LeanLMError(f"run.strategy: must be one of {allowed} (got {self.strategy!r})")
        if self.device not in distributed.DEVICES:
            raise LeanLMError(f"run.device: must be one of {', '.join(distributed.DEVICES)} (got {self.device!r})")
        if self.layer_token_budget is not None and self.layer_token_budget < 1:
            raise LeanLMError(f"run.layer_token_budget: must be >= 1 (got {self.layer_token_budget!r})")


@dataclass
class DistillConfig:
    """Knowledge distillation from a teacher, e.g. the dense model an LTE or SUBLLM model is converted from.

    The minimised objective becomes (1 - weight) * cross-entropy + weight * T^2 * KL(teacher || student) at
    temperature T, plus the method's own loss; the logged loss stays the cross-entropy, so runs remain comparable.
    Not in the LTE or SUBLLM papers: a lever for fine-tuning on little text, where the hard labels overfit
    (docs/results.md, LTE).
    """

    teacher: str | None = None  # required: a preset with weights, checkpoint, HF dir or .gguf with the same vocab
    weight: float = 1.0  # 1: the teacher's distribution only; 0: cross-entropy only
    temperature: float = 1.0

    def __post_init__(self) -> None:
        if not self.teacher:
            raise LeanLMError("distill.teacher: required (a model to distil from: checkpoint, .gguf or preset)")
        if not 0 <= self.weight <= 1:
            raise LeanLMError(f"distill.weight: must be in [0, 1] (got {self.weight!r})")
        if not self.temperature > 0:
            raise LeanLMError(f"distill.temperature: must be > 0 (got {self.temperature!r})")


def distill_loss(logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """T^2 * KL(teacher || student) per token, averaged over tokens; T^2 keeps the gradient's scale independent of T."""
    s = F.log_softmax(logits.float().flatten(0, 1) / temperature, dim=-1)  # (B*T, V)
    t = F.log_softmax(teacher_logits.float().flatten(0, 1) / temperature, dim=-1)  # (B*T, V)
    return F.kl_div(s, t, log_target=True, reduction="batchmean") * temperature**2


def load_teacher(cfg: DistillConfig, vocab_size: int, seq_len: int, device: torch.device) -> nn.Module:
    from leanlm.checkpoint import load_model

    teacher, _ = load_model(cfg.teacher, dtype="float32")
    where = f"distill.teacher={cfg.teacher}"
    if teacher.cfg.vocab_size != vocab_size:
        raise LeanLMError(f"{where}: vocab size {teacher.cfg.vocab_size} differs from the model's {vocab_size}")
    if teacher.cfg.max_seq_len < seq_len:
        raise LeanLMError(f"{where}: its context of {teacher.cfg.max_seq_len} is shorter than run.seq_len={seq_len}")
    return teacher.to(device).eval().requires_grad_(False)


@dataclass
class TrainConfig:
    model: ModelConfig | None  # None only with run.init (the architecture is then the init model's)
    data: DataConfig
    optim: OptimConfig
    run: RunConfig
    # with run.init, a model section holding only method keys (e.g. `subllm`) adds those methods to the init model
    add_methods: dict | None = None
    ltd: LTDConfig | None = None  # random-LTD (leanlm/ltd.py), a training option for any dense model
    distill: DistillConfig | None = None  # knowledge distillation from a teacher model

    def to_dict(self) -> dict:
        return {
            "model": None if self.model is None else self.model.to_dict(),
            "data": dataclasses.asdict(self.data),
            "optim": dataclasses.asdict(self.optim),
            "run": dataclasses.asdict(self.run),
            **({"ltd": dataclasses.asdict(self.ltd)} if self.ltd is not None else {}),
            **({"distill": dataclasses.asdict(self.distill)} if self.distill is not None else {}),
        }


SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "data": DataConfig,
    "optim": OptimConfig,
    "run": RunConfig,
    "ltd": LTDConfig,  # optional: absent = no random-LTD
    "distill": DistillConfig,  # optional: absent = no teacher
}


def _keys(section: str) -> list[str]:
    names = [f.name for f in dataclasses.fields(SECTIONS[section])]
    return ["preset", *names] if section == "model" else names


def _check_keys(section: str, data: dict) -> None:
    allowed = _keys(section)
    for k in data:
        if k not in allowed:
            raise LeanLMError(f"unknown key '{section}.{k}' (allowed in {section}: {', '.join(allowed)})")


def _numbers_from_strings(cls: type, data: dict) -> dict:
    """PyYAML reads `3e-4` (no dot) as a string: accept such strings for float fields."""
    hints = typing.get_type_hints(cls)
    out = dict(data)
    for k, v in data.items():
        if isinstance(v, str) and float in (typing.get_args(hints[k]) or (hints[k],)):
            with contextlib.suppress(ValueError):
                out[k] = float(v)
    return out


def _model_section(data: dict) -> ModelConfig:
    data = dict(data)
    name = data.pop("preset", None)
    if name is not None:
        if name not in PRESETS:
            raise LeanLMError(f"model.preset: unknown preset {name!r} (known: {', '.join(PRESETS)})")
        data = merge_preset(PRESETS[name], data)
    cfg = build_dataclass(ModelConfig, _numbers_from_strings(ModelConfig, data), "model")
    if cfg.dtype != "float32":
        raise LeanLMError(f"model.dtype: training keeps float32 weights (got {cfg.dtype!r}); use run.bf16 for autocast")
    return cfg


def config_from_dict(raw: dict) -> TrainConfig:
    """Build a TrainConfig from the YAML mapping; errors name the offending key."""
    if not isinstance(raw, dict):
        raise LeanLMError(f"config: expected a mapping with sections {', '.join(SECTIONS)}")
    unknown = [k for k in raw if k not in SECTIONS]
    if unknown:
        raise LeanLMError(f"unknown section {unknown[0]!r} (allowed: {', '.join(SECTIONS)})")
    parts: dict[str, Any] = {}
    for section, cls in SECTIONS.items():
        if section in ("ltd", "distill") and raw.get(section) is None:
            continue
        data = raw.get(section) or {}
        if not isinstance(data, dict):
            raise LeanLMError(f"{section}: expected a mapping, got {type(data).__name__}")
        _check_keys(section, data)
        if section == "model":
            init = (raw.get("run") or {}).get("init") if isinstance(raw.get("run"), dict) else None
            if init and data and set(data) <= set(METHODS):  # uptraining: methods on top of the init model
                parts["model"], parts["add_methods"] = None, dict(data)
            else:
                parts["model"] = _model_section(data) if data else None
        else:
            parts[section] = build_dataclass(cls, _numbers_from_strings(cls, data), section)
    if parts["model"] is None and not parts["run"].init:
        raise LeanLMError("model: missing section (give model: {preset: NAME, ...} or run.init to fine-tune)")
    return TrainConfig(**parts)


def read_config_file(path: str | Path) -> dict:
    try:
        raw = yaml.safe_load(Path(path).read_text())
    except OSError as e:
        raise LeanLMError(f"{path}: cannot read config ({e.strerror or e})") from None
    except yaml.YAMLError as e:
        raise LeanLMError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    return raw if raw is not None else {}


def apply_overrides(raw: dict, sets: list[str]) -> dict:
    """Apply `section.key=value` overrides (values parsed as YAML) to a raw config mapping, in order."""
    raw = {k: dict(v) if isinstance(v, dict) else v for k, v in raw.items()}
    for item in sets:
        key, sep, value = item.partition("=")
        key = key.strip()
        section, dot, name = key.partition(".")
        if not sep or not dot:
            raise LeanLMError(f"--set {item!r}: expected SECTION.KEY=VALUE, e.g. run.steps=100")
        if section not in SECTIONS:
            raise LeanLMError(f"--set {key}: unknown section {section!r} (allowed: {', '.join(SECTIONS)})")
        _check_keys(section, {name.split(".")[0]: None})
        try:
            parsed = yaml.safe_load(value)
        except yaml.YAMLError as e:
            raise LeanLMError(f"--set {key}: value is not valid YAML ({str(e).splitlines()[0]})") from None
        if not isinstance(raw.get(section), dict):
            raw[section] = {}
        # a deeper key (model.subllm.keep=0.5) sets one key of a nested section
        *parents, leaf = name.split(".")
        target = raw[section]
        for part in parents:
            if not isinstance(target.get(part), dict):
                target[part] = {}
            target[part] = dict(target[part])
            target = target[part]
        target[leaf] = parsed
    return raw


def load_config(path: str | Path, sets: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    """Read a YAML training config and apply `--set` overrides."""
    return config_from_dict(apply_overrides(read_config_file(path), list(sets)))


# ---------------------------------------------------------------------------------------------------------------------
# model


def build_model(cfg: ModelConfig) -> nn.Module:
    """A fresh (uninitialised) model for `cfg` (see leanlm.checkpoint.build_model)."""
    from leanlm.checkpoint import build_model

    return build_model(cfg)


def _load_weights(model: nn.Module, state: dict[str, Tensor], where: str) -> None:
    expected = set(model.state_dict())
    if model.cfg.tie_embeddings:
        expected.discard("lm_head.weight")  # checkpoints store a tied head once, as the embedding
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        what = f"missing {missing[0]!r}" if missing else f"unexpected {unexpected[0]!r}"
        raise LeanLMError(f"{where}: weights do not match the model ({what})")
    model.load_state_dict(state, strict=False)


# ---------------------------------------------------------------------------------------------------------------------
# checkpoints


def checkpoint_dirs(out: Path) -> list[Path]:
    """Step checkpoint directories in `out`, oldest first."""
    if not out.is_dir():
        return []
    return sorted(p for p in out.iterdir() if p.is_dir() and CKPT_RE.match(p.name))


def load_training_checkpoint(path: Path) -> tuple[dict, dict[str, Tensor], dict]:
    """(config.json, weights, trainer state) of a complete step checkpoint; LeanLMError if anything is missing or
    does not load."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from leanlm.checkpoint import read_config

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


def latest_checkpoint(out: Path, warn: typing.Callable[[str], None]) -> tuple[Path, dict, dict, dict] | None:
    """The newest complete checkpoint in `out`, loaded; broken newer ones are reported through `warn` and skipped."""
    for path in reversed(checkpoint_dirs(out)):
        try:
            return (path, *load_training_checkpoint(path))
        except LeanLMError as e:
            warn(f"warning: {e}; falling back to the previous checkpoint")
    return None


def save_training_checkpoint(path: Path, model: nn.Module, tokenizer: Any, trainer_state: dict) -> Path:
    """Weights + config.json + tokenizer + trainer_state.pt, all renamed into place together."""
    from leanlm.checkpoint import atomic_dir, save_checkpoint

    with atomic_dir(path) as tmp:
        # tmp is empty, so save_checkpoint's own atomic write onto it is a plain rename; trainer_state.pt then joins
        # the weights before the outer rename makes the whole checkpoint visible at once
        save_checkpoint(model, tokenizer, tmp)
        torch.save(trainer_state, tmp / "trainer_state.pt")
    return path


def _prune(out: Path, keep_last: int) -> None:
    if keep_last:
        for old in checkpoint_dirs(out)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)


def _remove_stale_temporaries(out: Path) -> None:
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


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# ---------------------------------------------------------------------------------------------------------------------
# metrics


class MetricsLog:
    """metrics.csv, plus TensorBoard scalars when tensorboard is installed. Only rank 0 writes.

    On resume, rows after the resumed step (logged before a crash, then redone) are dropped, so every step appears
    once.
    """

    def __init__(self, out: Path, start_step: int, enabled: bool, extra: list[str] | None = None):
        self.enabled = enabled
        self.fields = [*METRICS, *(extra or [])]
        self.tb = None
        if not enabled:
            return
        path = out / "metrics.csv"
        kept = []
        if start_step and path.is_file():
            with open(path, newline="") as f:
                kept = [r for r in csv.DictReader(f) if r.get("step", "").isdigit() and int(r["step"]) <= start_step]
        self.file = open(path, "w", newline="")  # closed in close()
        self.writer = csv.DictWriter(self.file, self.fields, extrasaction="ignore")
        self.writer.writeheader()
        self.writer.writerows(kept)
        self.file.flush()
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # tensorboard is an optional extra
            return
        self.tb = SummaryWriter(str(out / "tensorboard"), purge_step=start_step + 1 if start_step else None)

    def write(self, row: dict) -> None:
        if not self.enabled:
            return
        self.writer.writerow({k: "" if row.get(k) is None else row[k] for k in self.fields})
        self.file.flush()
        if self.tb is not None:
            for k in ("loss", "val_loss", "lr", "grad_norm", "tokens_per_s", *self.fields[len(METRICS) :]):
                if row.get(k) is not None:
                    self.tb.add_scalar(k, row[k], row["step"])
            self.tb.flush()

    def close(self) -> None:
        if self.enabled:
            self.file.close()
            if self.tb is not None:
                self.tb.close()


def plot_losses(metrics_csv: Path, png: Path) -> bool:
    """Train and validation loss against step, from metrics.csv; False when matplotlib is not installed."""
    try:
        from matplotlib.figure import Figure  # no pyplot: leaves the process's backend alone
    except ImportError:
        return False
    with open(metrics_csv, newline="") as f:
        rows = list(csv.DictReader(f))
    fig = Figure(figsize=(7, 4), layout="tight")
    ax = fig.subplots()
    train = [(int(r["step"]), float(r["loss"])) for r in rows if r["loss"]]
    val = [(int(r["step"]), float(r["val_loss"])) for r in rows if r["val_loss"]]
    if train:
        ax.plot(*zip(*train), label="train", linewidth=1)
    if val:
        ax.plot(*zip(*val), "o-", label="validation", markersize=3)
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.savefig(png, dpi=120)
    return True


# ---------------------------------------------------------------------------------------------------------------------
# training


@torch.no_grad()
def validation_loss(
    model: nn.Module,
    dataset: Any,
    batch_size: int,
    seq_len: int,
    max_batches: int,
    device: torch.device,
    autocast: typing.Callable,
    calibration: Any = None,
) -> float:
    """Mean cross-entropy per token over the first `max_batches` validation batches (the same windows every time).

    A model with a `calibrate` hook (SUBLLM with `calibrate: true`) first sets its inference thresholds on the same
    number of windows spread over `calibration` (training data, so the validation text stays unseen)."""
    from leanlm.data import spread_batches, val_batches

    calibrate = getattr(model, "calibrate", None)
    if calibrate is not None and calibration is not None:
        with autocast():
            calibrate([x.to(device) for x in spread_batches(calibration, batch_size, seq_len, max_batches)])
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for x, y in val_batches(dataset, batch_size, seq_len, max_batches):
        with autocast():
            logits = model(x.to(device))
        total += F.cross_entropy(logits.float().flatten(0, 1), y.to(device).flatten(), reduction="sum").item()
        count += y.numel()
    distributed.reshard(model)
    model.train(was_training)
    return total / count


def _model_for_saving(model: nn.Module, model_cfg: ModelConfig, d: distributed.Dist) -> nn.Module | None:
    """A CPU copy of the full model on rank 0 (None elsewhere): FSDP shards must be gathered (a collective)."""
    state = distributed.full_model_state(model)
    if not d.is_main:
        return None
    with torch.device("meta"):
        full = build_model(model_cfg)
    full.load_state_dict(state, assign=True)
    return full


def _weights_finite(model: nn.Module, d: distributed.Dist) -> bool:
    ok = all(bool(torch.isfinite(distributed.local_tensor(p)).all()) for p in model.parameters())
    return distributed.all_true(ok, d)


def _check_same_model(configured: ModelConfig, saved: ModelConfig, where: Path) -> None:
    a, b = configured.to_dict(), saved.to_dict()
    for k in a:
        if a[k] != b[k]:
            raise LeanLMError(f"resume: {where} was trained with model.{k}={b[k]!r} but the config says {a[k]!r}")


def train(cfg: TrainConfig) -> dict:
    """Train (or fine-tune, or resume) as `cfg` says; returns a summary. Runs under torchrun as well as alone."""
    from tqdm import tqdm

    from leanlm.checkpoint import add_methods, load_model, save_checkpoint
    from leanlm.data import BatchIterator, TokenDataset, prepare
    from leanlm.tokenizer import Tokenizer

    run = cfg.run
    out = Path(run.out)
    with contextlib.ExitStack() as stack:
        # ---- setup: processes, output directory, seeds ---------------------------------------------------------------
        d = stack.enter_context(distributed.session(run.device))
        strategy = distributed.resolve_strategy(run.strategy, d.world_size)
        if run.batch_size % d.world_size:
            raise LeanLMError(f"run.batch_size={run.batch_size} is not divisible by the {d.world_size} processes")
        local_batch = run.batch_size // d.world_size

        def note(msg: str) -> None:
            if d.is_main:
                print(msg, file=sys.stderr)

        if not run.resume and checkpoint_dirs(out):
            raise LeanLMError(f"{out} already holds checkpoints: pass --resume to continue, or choose another --out")
        if d.is_main:
            out.mkdir(parents=True, exist_ok=True)
            _remove_stale_temporaries(out)
        _seed_everything(run.seed)
        found = latest_checkpoint(out, note) if run.resume else None
        if run.resume and found is None:
            note(f"note: no complete checkpoint in {out}; starting from step 0")
        ckpt_path, meta, weights, state = found or (None, None, None, None)
        del found  # the weights and optimizer state are dropped as soon as they are loaded into place

        # ---- model: resumed weights, a pretrained init, or a fresh random model --------------------------------------
        def convert(model: nn.Module, added: ModelConfig, calibration: Tensor | None = None) -> nn.Module:
            new = add_methods(model, added, seed=run.seed, calibration=calibration)
            if new.cfg.arch != model.cfg.arch:
                note(f"note: run.init={run.init}: converted into {added.arch} (new modules initialised)")
            return new

        init_tok, added, calibrate = None, None, False
        if ckpt_path is not None:
            if state["step"] > run.steps:
                raise LeanLMError(f"resume: {ckpt_path} is at step {state['step']}, beyond run.steps={run.steps}")
            model_cfg = ModelConfig.from_dict(meta["model"], where=f"{ckpt_path}/config.json: model")
            if cfg.model is not None and not run.init:
                _check_same_model(cfg.model, model_cfg, ckpt_path)
            model = build_model(model_cfg)
            _load_weights(model, weights, str(ckpt_path))
            weights = None
        elif run.init:
            model, init_tok = load_model(run.init, dtype="float32", seed=run.seed)
            if cfg.add_methods:
                added = ModelConfig.from_dict({**model.cfg.to_dict(), **cfg.add_methods}, where="model")
            elif cfg.model is not None and cfg.model.backbone() == model.cfg.backbone():
                # a whole model section on the init's backbone, e.g. the config.yaml that an LTE stage-1 run saved:
                # its methods apply as a methods-only section's would, so re-running a saved config repeats the run
                changed = {m: getattr(cfg.model, m) for m in METHODS if getattr(cfg.model, m) is not None}
                if any(v != getattr(model.cfg, m) for m, v in changed.items()):
                    added = model.cfg.replace(**changed)
            # LTE grouped by activations calibrates on the training text, so that conversion waits for the data
            calibrate = (
                added is not None and model.cfg.lte is None and getattr(added.lte, "grouping", "") == "activations"
            )
            if added is not None and not calibrate:
                model = convert(model, added)
            model_cfg = added or model.cfg
            if cfg.model is not None and cfg.model != model_cfg:
                note(f"note: run.init={run.init}: the model section is ignored, the architecture is the init model's")
        else:
            model_cfg = cfg.model
            if model_cfg.lte is not None and model_cfg.lte.grouping == "activations":
                raise LeanLMError(
                    "model.lte.grouping=activations groups a trained dense model's neurons: set run.init to one"
                )
            model = build_model(model_cfg).init_weights(run.seed)
        if run.seq_len > model_cfg.max_seq_len:
            raise LeanLMError(f"run.seq_len={run.seq_len} exceeds the model's max_seq_len={model_cfg.max_seq_len}")
        # LayerTokens per step (random-LTD or dense alike) and the run's length; checked before any data is prepared
        plan, total_steps = resolve_plan(
            cfg.ltd, model_cfg, run.seq_len, run.batch_size * run.grad_accum, run.steps, run.layer_token_budget
        )
        if run.layer_token_budget is not None:
            run = dataclasses.replace(run, steps=total_steps)
            note(f"note: run.layer_token_budget={run.layer_token_budget}: {total_steps} optimizer steps")
        cfg = dataclasses.replace(cfg, model=model_cfg, run=run)
        # a frozen teacher per process: its logits are targets, never trained or sharded; checked before any data
        teacher = None
        if cfg.distill is not None:
            teacher = load_teacher(cfg.distill, model_cfg.vocab_size, run.seq_len, d.device)

        # ---- data: prepare on first use (rank 0), then every rank maps the same files --------------------------------
        data_dir = Path(cfg.data.dir) if cfg.data.dir else out / "data"
        if cfg.data.inputs is not None:
            if d.is_main:
                prepare(
                    cfg.data.inputs,
                    data_dir,
                    tokenizer=cfg.data.tokenizer or run.init,
                    vocab_size=cfg.data.vocab_size or model_cfg.vocab_size,
                    val_fraction=cfg.data.val_fraction,
                    progress=run.progress,
                )
            distributed.barrier(d)
        train_data, val_data = TokenDataset(data_dir, "train"), TokenDataset(data_dir, "val")
        tokenizer = Tokenizer.load(data_dir)
        train_data.check_vocab(model_cfg.vocab_size)
        if init_tok is not None and init_tok.tok.get_vocab() != tokenizer.tok.get_vocab():
            note(
                f"warning: {data_dir} was tokenized differently from {run.init}'s tokenizer; "
                f"prepare it with `--tokenizer {run.init}`"
            )
        if len(val_data) < run.seq_len + 1:
            raise LeanLMError(
                f"{data_dir}: {len(val_data)} validation tokens, fewer than seq_len + 1 = "
                f"{run.seq_len + 1}; raise data.val_fraction or lower run.seq_len"
            )
        batches = BatchIterator(
            train_data, local_batch, run.seq_len, seed=run.seed, rank=d.rank, world_size=d.world_size
        )
        if calibrate:
            from leanlm.lte import calibration_rows

            model = convert(model, added, calibration_rows(train_data.tokens, added.max_seq_len))

        # ---- optimizer: after wrapping, since FSDP replaces the parameters with shards -------------------------------
        raw = model.float().to(d.device)
        model = distributed.wrap(raw, strategy, d)
        optimizer = build_optimizer(model, cfg.optim)
        params = [p for p in model.parameters() if p.requires_grad]

        # ---- resume: optimizer, data position, RNGs, counters --------------------------------------------------------
        step, tokens, last_loss = 0, 0, None
        if ckpt_path is not None:
            distributed.load_optimizer_state(model, optimizer, state["optimizer"])
            batches.load_state_dict(state["data"])
            set_rng_state(state["rng"])
            step, tokens, last_loss = state["step"], state["tokens"], state["loss"]
            note(f"resuming from {ckpt_path} (step {step}, {tokens} tokens)")
            state = None
        layer_tokens = plan.total_layer_tokens(step)  # LayerTokens consumed so far: a function of the step

        if d.is_main:
            (out / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        train_metrics = getattr(raw, "train_metrics", None)  # method diagnostics, e.g. SUBLLM's per-stage retention
        # random-LTD, the LayerToken LR or a LayerToken budget: log layer-averaged tokens and the kept length too
        by_layer_tokens = cfg.ltd is not None or run.layer_token_budget is not None or cfg.optim.lr_index != "steps"
        extra = ["layer_tokens", "ltd_r"] if by_layer_tokens else []
        extra += list(train_metrics()) if train_metrics else []
        extra += ["distill_kl"] if teacher is not None else []
        log = MetricsLog(out, step, enabled=d.is_main, extra=extra)
        stack.callback(log.close)

        # ---- loop ----------------------------------------------------------------------------------------------------
        set_step = getattr(raw, "set_step", None)  # methods with step-dependent schedules
        aux_loss = getattr(raw, "aux_loss", None)  # methods with an extra loss term (e.g. an efficiency penalty)
        # executed FLOPs per training token: the model's forward + backward, plus the teacher's forward when distilling
        teacher_flops = teacher.flops_per_token(run.seq_len) if teacher is not None else 0.0
        flops_per_token = (
            raw.flops_per_token(run.seq_len, training=True) + teacher_flops if hasattr(raw, "flops_per_token") else None
        )
        tokens_per_step = run.batch_size * run.seq_len * run.grad_accum
        ltd = RandomLTD(raw, plan).attach() if plan.ltd is not None else None
        if ltd is not None:
            stack.callback(ltd.detach)
        # the LayerToken LR spans the budget (Megatron-DeepSpeed's decay tokens), or else the whole run
        budget = run.layer_token_budget
        lt_total = budget * model_cfg.n_layers if budget is not None else plan.total_layer_tokens(run.steps)
        flops_sum = 0.0  # executed FLOPs per token summed over this session's steps (random-LTD changes them per step)
        autocast = functools.partial(torch.autocast, d.device.type, dtype=torch.bfloat16, enabled=run.bf16)
        max_norm = cfg.optim.grad_clip or math.inf  # clip_grad_norm_ with inf only measures the norm
        bar = tqdm(
            total=run.steps,
            initial=step,
            unit="step",
            file=sys.stderr,
            dynamic_ncols=True,
            disable=not (run.progress and d.is_main),
        )
        stack.callback(bar.close)
        start_step, train_seconds, val_loss = step, 0.0, None
        interval_tokens, interval_seconds, interval_losses = 0, 0.0, []  # since the last metrics row
        model.train()
        while step < run.steps:
            t0 = time.perf_counter()
            if set_step is not None:
                set_step(step)
            if ltd is not None:
                ltd.set_step(step)
                flops_per_token = ltd.flops_per_token() + teacher_flops
            if cfg.optim.lr_index == "layer_tokens":
                L = model_cfg.n_layers
                lr = schedule_lr_layer_tokens(layer_tokens / L, lt_total / L, tokens_per_step, cfg.optim)
            else:
                lr = schedule_lr(step, cfg.optim, run.steps)
            for group in optimizer.param_groups:
                group["lr"] = lr * group.get("lr_scale", 1.0)
            loss_sum = torch.zeros((), device=d.device)  # cross-entropy: the number comparable across methods
            objective_sum = torch.zeros((), device=d.device)  # what is minimised: cross-entropy (+ KD) + aux_loss
            kd_sum = torch.zeros((), device=d.device)
            for micro in range(run.grad_accum):
                x, y = next(batches)
                x, y = x.to(d.device, non_blocking=True), y.to(d.device, non_blocking=True)
                with distributed.grad_sync(model, enabled=micro == run.grad_accum - 1):
                    with autocast():
                        logits = model(x)  # (B, T, V)
                        loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
                        total = loss
                        if teacher is not None:
                            with torch.no_grad():
                                teacher_logits = teacher(x)  # (B, T, V)
                            kd = distill_loss(logits, teacher_logits, cfg.distill.temperature)
                            total = (1 - cfg.distill.weight) * loss + cfg.distill.weight * kd
                            kd_sum += kd.detach()
                        if aux_loss is not None:
                            total = total + aux_loss()
                    (total / run.grad_accum).backward()
                loss_sum += loss.detach()
                objective_sum += total.detach()
            grad_norm = distributed.full_tensor(torch.nn.utils.clip_grad_norm_(params, max_norm))
            loss_val, objective, norm_val = distributed.all_mean(
                [(loss_sum / run.grad_accum).item(), (objective_sum / run.grad_accum).item(), grad_norm.item()], d
            )
            if not (math.isfinite(objective) and math.isfinite(norm_val)):
                what = f"loss is {objective}" if not math.isfinite(objective) else f"gradient norm is {norm_val}"
                last = checkpoint_dirs(out)
                raise LeanLMError(
                    f"step {step + 1}: {what}; stopped without updating the weights (lower optim.lr?); "
                    f"last checkpoint: {last[-1] if last else 'none'}"
                )
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            layer_tokens += plan.layer_tokens(step)
            flops_sum += flops_per_token or 0.0
            step, tokens, last_loss = step + 1, tokens + tokens_per_step, loss_val
            dt = time.perf_counter() - t0
            train_seconds += dt
            interval_seconds += dt
            interval_tokens += tokens_per_step
            interval_losses.append(loss_val)

            is_last = step == run.steps
            val_now = None
            validate = is_last or (run.eval_every and step % run.eval_every == 0)
            # the method's diagnostics of this training step, read before validation runs the model in eval mode
            method_row = train_metrics() if train_metrics and (validate or step % run.log_every == 0) else {}
            if validate:
                # every rank scores the same windows: FSDP needs all ranks in every forward, and the result is final
                val_now = val_loss = validation_loss(
                    distributed.unwrap(model),
                    val_data,
                    local_batch,
                    run.seq_len,
                    run.eval_batches * d.world_size,
                    d.device,
                    autocast,
                    calibration=train_data,
                )
            if is_last or val_now is not None or step % run.log_every == 0:
                tps = interval_tokens / interval_seconds
                log.write(
                    {
                        "step": step,
                        "tokens": tokens,
                        "loss": sum(interval_losses) / len(interval_losses),  # mean since the last row: less noise
                        "val_loss": val_now,
                        "lr": lr,
                        "grad_norm": norm_val,
                        "tokens_per_s": tps,
                        "flops_per_token": flops_per_token,
                        "layer_tokens": layer_tokens // model_cfg.n_layers,
                        "ltd_r": plan.kept(step - 1),
                        # this step's KL to the teacher, on this process's batch
                        **({"distill_kl": (kd_sum / run.grad_accum).item()} if teacher is not None else {}),
                        **method_row,
                    }
                )
                interval_tokens, interval_seconds, interval_losses = 0, 0.0, []
                bar.set_postfix_str(
                    f"loss {loss_val:.3f} lr {lr:.2e} {tps:,.0f} tok/s"
                    + (f" val {val_loss:.3f}" if val_loss is not None else ""),
                    refresh=False,
                )
            bar.update(1)

            if run.save_every and (is_last or step % run.save_every == 0):
                if not _weights_finite(model, d):
                    raise LeanLMError(f"step {step}: the weights are no longer finite; not saving a checkpoint")
                trainer_state = {
                    "version": TRAINER_STATE_VERSION,
                    "step": step,
                    "tokens": tokens,
                    "loss": last_loss,
                    "optimizer": distributed.optimizer_state(model, optimizer),
                    "data": batches.state_dict(),
                    "rng": rng_state(),
                    "world_size": d.world_size,
                    "config": cfg.to_dict(),
                }
                full = _model_for_saving(model, model_cfg, d)
                if d.is_main:
                    save_training_checkpoint(out / f"step-{step:08d}", full, tokenizer, trainer_state)
                    _prune(out, run.keep_last)
                distributed.barrier(d)
        bar.close()

        # ---- final save: weights + config + tokenizer for eval/generate/bench ----------------------------------------
        if val_loss is None:  # resumed at the last step: nothing was scored in this session
            val_loss = validation_loss(
                distributed.unwrap(model),
                val_data,
                local_batch,
                run.seq_len,
                run.eval_batches * d.world_size,
                d.device,
                autocast,
                calibration=train_data,
            )
        if not _weights_finite(model, d):
            raise LeanLMError(f"step {step}: the weights are no longer finite; not saving {out / 'final'}")
        # the live model's config: it carries what training set on it (SUBLLM's calibrated thresholds)
        full = _model_for_saving(model, distributed.unwrap(model).cfg, d)
        summary = {
            "out": str(out),
            "checkpoint": str(out / "final"),
            "steps": step,
            "tokens": tokens,
            "loss": last_loss,
            "val_loss": val_loss,
            "tokens_per_s": (step - start_step) * tokens_per_step / train_seconds if train_seconds else None,
            "train_seconds": train_seconds,
            # executed FLOPs per token; with random-LTD the mean over this session's steps
            "flops_per_token": flops_sum / (step - start_step) if ltd and step > start_step else flops_per_token,
            "layer_tokens": layer_tokens // model_cfg.n_layers,
            "params": sum(p.numel() for p in params),  # a DTensor's numel is that of the whole parameter
            "world_size": d.world_size,
            "strategy": strategy,
        }
        if d.is_main:
            trained = {k: summary[k] for k in ("steps", "tokens", "loss", "val_loss")}
            save_checkpoint(full, tokenizer, out / "final", extra={"trained": trained})
            plot_losses(out / "metrics.csv", out / "loss.png")
        distributed.barrier(d)
        return summary


# ---------------------------------------------------------------------------------------------------------------------
# command line


def add_train_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the `train` verb to the `leanlm` subcommands."""
    p = sub.add_parser(
        "train",
        help="train or fine-tune a model from a YAML config (one process, or several under torchrun)",
        description="Train a model as a YAML config says (sections model, data, optim, run, and optional ltd "
        "and distill; see leanlm/train.py). "
        "Writes step checkpoints, final/, metrics.csv, config.yaml and loss.png to run.out. Under "
        "`torchrun --nproc_per_node N -m leanlm train ...` the global batch is split over N processes "
        "(run.strategy: ddp or fsdp).",
    )
    p.add_argument("--config", "-c", required=True, metavar="FILE", help="the YAML training config")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one config key, value parsed as YAML, e.g. --set run.steps=100 --set optim.lr=1e-3 (repeatable)",
    )
    p.add_argument(
        "--init",
        metavar="REF",
        help="fine-tune from this model: preset, checkpoint dir, HF dir or .gguf "
        "(sets run.init; the data is tokenized with its tokenizer)",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue from the latest complete checkpoint in the output directory (sets run.resume)",
    )
    p.add_argument("--out", metavar="DIR", help="output directory (sets run.out)")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object on the last stdout line")
    p.set_defaults(fn=cmd_train)
    return p


def cmd_train(args: argparse.Namespace) -> dict:
    raw = apply_overrides(read_config_file(args.config), list(args.overrides))
    # the shortcuts bypass YAML parsing: a directory named `123` or `true` stays a path
    shortcuts = {"init": args.init, "out": args.out, "resume": True if args.resume else None}
    run = raw["run"] = dict(raw.get("run") or {})
    run.update({k: v for k, v in shortcuts.items() if v is not None})
    result = train(config_from_dict(raw))
    if not args.json and int(os.environ.get("RANK", "0")) == 0:
        val = f"{result['val_loss']:.4f}" if result["val_loss"] is not None else "-"
        loss = f"{result['loss']:.4f}" if result["loss"] is not None else "-"
        tps = f"{result['tokens_per_s']:,.0f}" if result["tokens_per_s"] else "-"
        print(
            f"{result['steps']} steps, {result['tokens']:,} tokens: loss {loss}, val_loss {val}, {tps} tok/s; "
            f"model in {result['checkpoint']}"
        )
    return result


__all__ = [
    "DataConfig",
    "RunConfig",
    "TrainConfig",
    "OptimConfig",
    "config_from_dict",
    "load_config",
    "apply_overrides",
    "read_config_file",
    "build_model",
    "train",
    "add_train_parser",
    "cmd_train",
]
