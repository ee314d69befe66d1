"""Weight quantization as a method: the `model.quant` section swaps the model's linear layers (and its embedding and
lm head) for packed ones (leanlm/quant.py), so a quantized model is saved, loaded, converted, evaluated and decoded
like any other (docs/methods.md).

    leanlm quantize smollm2-135m out/int4 --method int4          # or: model: {quant: {format: int4}}

Formats: int8 (symmetric, per output channel by default), int4 (group 32, scale and minimum), int6 (FlexQ's 6-bit
weights; `act_bits` 6 or 8 rounds each layer's input per token, with the A8 fallback for the layers calibration finds
most sensitive), ternary (BitCPM: {-1, 0, 1} x an absmean scale per group of 64). With `qat: true` the weights stay in
full precision and every forward rounds them with a straight-through gradient (quantization-aware training from a
float checkpoint, `run.init`); `leanlm quantize` packs such a model.

What is quantized: every block's attention and FFN projections (`format`), the embedding and lm head (`head`; tied,
they are one packed tensor). Routers and scorers a method adds (LTE's, SUBLLM's) stay in float: they are <0.1% of
the weights, and they decide what runs.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from leanlm.errors import LeanLMError
from leanlm.methods.base import Method
from leanlm.model import ModelConfig, Transformer
from leanlm.quant import (
    FORMATS,
    FakeQuantEmbedding,
    FakeQuantLinear,
    Packed,
    QuantEmbedding,
    QuantLinear,
    TiedHead,
    check_group,
    quantize_activations,
    weight_bytes,
)

HEAD_FORMATS = (*FORMATS, "float")
DEFAULT_GROUP = {"int8": 0, "int6": 0, "int4": 32, "ternary": 64}  # 0: one group per output row (per channel)
BLOCK_LINEARS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")  # what `format` quantizes in each block


@dataclass
class QuantConfig:
    """The `model.quant` section."""

    format: str = "int8"  # int8 | int6 | int4 | ternary: the blocks' linear layers
    group_size: int = -1  # inputs per scale; 0 = per output channel; -1 = the format's default (DEFAULT_GROUP)
    head: str = "int8"  # the embedding and lm head: a format, or float (kept as they are)
    head_group_size: int = 0
    act_bits: int = 0  # FlexQ: 0 (float activations), 6 or 8 (each linear's input rounded per token)
    act8_count: int = 0  # FlexQ's A8 fallback: this many of the most sensitive layers keep 8-bit activations
    act8_layers: list[str] = field(default_factory=list)  # ... which ones (set by calibration, by module name)
    qat: bool = False  # full-precision weights rounded in each forward (straight-through gradient): to train

    def check(self, model_cfg: ModelConfig) -> None:
        def bad(name: str, why: str) -> LeanLMError:
            return LeanLMError(f"model.quant.{name}: {why} (got {getattr(self, name)!r})")

        if self.format not in FORMATS:
            raise bad("format", f"must be one of {', '.join(FORMATS)}")
        if self.head not in HEAD_FORMATS:
            raise bad("head", f"must be one of {', '.join(HEAD_FORMATS)}")
        for name in ("group_size", "head_group_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < -1:
                raise bad(name, "must be a positive group size, 0 (per output channel) or -1 (the format's default)")
        if self.act_bits not in (0, 6, 8):
            raise bad("act_bits", "must be 0 (float activations), 6 or 8")
        if not isinstance(self.act8_count, int) or self.act8_count < 0:
            raise bad("act8_count", "must be a non-negative integer")
        C, Fd, HD = model_cfg.dim, model_cfg.ffn_dim, model_cfg.n_heads * model_cfg.head_dim
        for K in sorted({C, Fd, HD}):
            check_group(self.format, self.group(self.format, self.group_size, K), K, "model.quant.group_size")
        if self.head != "float":
            check_group(self.head, self.group(self.head, self.head_group_size, C), C, "model.quant.head_group_size")

    @staticmethod
    def group(fmt: str, size: int, K: int) -> int:
        """The group size of a layer with K inputs: `size`, the format's default (-1), or K (0: per channel)."""
        size = DEFAULT_GROUP[fmt] if size == -1 else size
        return K if size == 0 else size


class Quant(Method):
    name = "quant"
    Config = QuantConfig

    def attach(self, model: Transformer) -> None:
        q = self.cfg
        for block in model.layers:
            for parent in (block.self_attn, block.mlp):
                for name in BLOCK_LINEARS:
                    lin = getattr(parent, name, None)
                    if isinstance(lin, nn.Linear):
                        setattr(parent, name, self._linear(lin, q.format, q.group_size))
        if q.head == "float":
            return
        V, C = model.embed_tokens.num_embeddings, model.embed_tokens.embedding_dim
        g = q.group(q.head, q.head_group_size, C)
        with torch.device(model.norm.weight.device):
            if q.qat:
                model.embed_tokens = FakeQuantEmbedding(V, C, q.head, g)
                head = FakeQuantLinear(C, V, q.head, g)
                if model.cfg.tie_embeddings:
                    head.weight = model.embed_tokens.weight
                model.lm_head = head
            else:
                model.embed_tokens = QuantEmbedding(V, C, q.head, g)
                tied = model.cfg.tie_embeddings
                model.lm_head = TiedHead(model.embed_tokens) if tied else QuantLinear(C, V, q.head, g, where="lm_head")
        self.set_act_bits(model)

    def _linear(self, lin: nn.Linear, fmt: str, size: int) -> nn.Module:
        K, N, bias = lin.in_features, lin.out_features, lin.bias is not None
        g = self.cfg.group(fmt, size, K)
        with torch.device(lin.weight.device):
            return (FakeQuantLinear if self.cfg.qat else QuantLinear)(K, N, fmt, g, bias=bias)

    def set_act_bits(self, model: Transformer) -> None:
        """FlexQ: every block linear rounds its input to `act_bits`, the A8 fallback layers to 8."""
        for name, m in model.named_modules():
            if isinstance(m, QuantLinear) and name.startswith("layers."):
                m.act_bits = 8 if (self.cfg.act_bits and name in self.cfg.act8_layers) else self.cfg.act_bits

    def convert(self, model: Transformer, source: Transformer, seed: int, calibration: Tensor | None) -> None:
        # the float weights were quantized as they loaded (Packed._load_from_state_dict); other methods must be in
        # place first, since they rearrange float weights (e.g. LTE's expert grouping)
        others = {n for n in model.cfg.methods if n != self.name}
        if others != {n for n in source.cfg.methods if n != self.name}:
            raise LeanLMError("quantize last: convert the model to its other methods first, then quantize it")

    def check_training(self) -> None:
        if not self.cfg.qat:
            raise LeanLMError(
                "a quantized model holds packed weights and cannot train: train with model.quant.qat: true "
                "(quantization-aware training from a float checkpoint), then `leanlm quantize` it"
            )

    def calibrate(self, model: Transformer, batches: list[Tensor]) -> dict[str, Any]:
        """FlexQ's layer-wise selection: with 6-bit activations and `act8_count` > 0, rank the block linears by how
        much 6-bit activations (vs 8-bit) change their output on the calibration batches (relative squared error),
        and keep the `act8_count` most sensitive at 8 bits."""
        q = self.cfg
        if q.act_bits != 6 or q.act8_count == 0 or q.qat:
            return {}
        layers = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear) and n.startswith("layers.")}
        err = dict.fromkeys(layers, 0.0)
        norm = dict.fromkeys(layers, 0.0)

        def probe(name: str):
            def hook(mod: QuantLinear, args: tuple) -> None:
                x = args[0]
                w = mod.weight
                y8 = torch.nn.functional.linear(quantize_activations(x, 8), w)
                y6 = torch.nn.functional.linear(quantize_activations(x, 6), w)
                err[name] += float((y6 - y8).pow(2).sum())
                norm[name] += float(y8.pow(2).sum())

            return hook

        handles = [m.register_forward_pre_hook(probe(n)) for n, m in layers.items()]
        saved = {n: m.act_bits for n, m in layers.items()}
        try:
            for m in layers.values():
                m.act_bits = 0  # each layer sees its float input; the hook rounds it both ways
            with torch.no_grad():
                for x in batches:
                    model(x)
        finally:
            for h in handles:
                h.remove()
            for n, m in layers.items():
                m.act_bits = saved[n]
        ranked = sorted(layers, key=lambda n: err[n] / max(norm[n], 1e-30), reverse=True)
        self.set_config(model, act8_layers=sorted(ranked[: q.act8_count]))
        self.set_act_bits(model)
        return {"quant.act8_layers": self.cfg.act8_layers}

    def report(self, model: Transformer) -> dict[str, Any]:
        q = self.cfg
        acts = f", activations A{q.act_bits} ({len(q.act8_layers)} layers A8)" if q.act_bits else ""
        return {"summary": f"weights {q.format}, head {q.head}{acts}", "weight_bytes": weight_bytes(model)}


def float_state(model: Transformer) -> dict[str, Tensor]:
    """The model's state dict with every packed weight dequantized to a float `weight` (what a model of another
    quantization, or none, loads; a tied head once, as the embedding)."""
    state = dict(model.state_dict())
    if model.cfg.tie_embeddings:
        state = {k: v for k, v in state.items() if not k.startswith("lm_head.")}
    for name, m in model.named_modules():
        if isinstance(m, Packed):
            for k in ("qweight", "scales", "mins"):
                state.pop(f"{name}.{k}", None)
            state[f"{name}.weight"] = m.weight
    return state


def float32_bytes(model: Transformer) -> int:
    """What the model's weights take in float32: 4 bytes per weight, a tied one once (the ratio's denominator)."""
    return 4 * sum(v.numel() for v in float_state(model).values() if v.is_floating_point())


def without_quant(cfg: ModelConfig) -> ModelConfig:
    return cfg.replace(methods={k: v for k, v in cfg.methods.items() if k != Quant.name})


def with_quant(cfg: ModelConfig, **section: Any) -> ModelConfig:
    """cfg with a `quant` section (last, as the registry orders methods)."""
    base = without_quant(cfg)
    q = dataclasses.replace(QuantConfig(), **section)
    return base.replace(methods={**base.methods, Quant.name: q})
