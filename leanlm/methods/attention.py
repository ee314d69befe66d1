"""Sparse attention for long contexts as a method: the `model.attention` section gives some layers a block-sparse
attention (leanlm/sparse.py) with the baseline's weights, so any dense model switches to it at load and trains with
it; docs/methods.md shows the use.

    leanlm eval --model smollm2-135m --data wikitext-2 --set model.attention.pattern=sink_window   # post hoc
    model: {preset: cpu-24l, attention: {pattern: s2, block: 64, window: 256, vert_stride: 8, schedule: every_n}}

Patterns: `sink_window` (StreamingLLM's attention sink + a sliding window, LongGen's AttnSink), `s2` (S2-Attention:
each KV head reads its own residue class of strided blocks), `infllm2` (InfLLM v2, MiniCPM4: top-k blocks by pooled
key kernels, dense below `dense_len`). Schedules: `all`, `longgen` (bottom and top thirds sparse, middle third full),
`every_n` (one full layer in `every_n`), or a list of sparse layers. No parameters are added: converting a dense model
only switches the attention, and the section may change freely between runs (the weights stay the same).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor

from leanlm.methods.base import Method
from leanlm.model import Attention, ModelConfig, Transformer
from leanlm.sparse import SparseAttention, SparseConfig


class SparseAttentionMethod(Method):
    name = "attention"
    Config = SparseConfig
    adds_weights = False

    def attention_factory(self, model_cfg: ModelConfig) -> Callable[[int], Attention | None]:
        sparse = set(self.cfg.layers)
        return lambda i: SparseAttention(model_cfg, self.cfg) if i in sparse else None

    def convert(self, model: Transformer, source: Transformer, seed: int, calibration: Tensor | None) -> None:
        """Nothing to make: the sparse layers read the dense weights (a pattern may also replace another)."""

    def _layers(self, model: Transformer) -> list[SparseAttention]:
        return [b.self_attn for b in model.layers if isinstance(b.self_attn, SparseAttention)]

    def reset_stats(self, model: Transformer) -> None:
        for a in self._layers(model):
            a.blocks_read = [0, 0]

    def report(self, model: Transformer) -> dict[str, Any]:
        layers = self._layers(model)
        read, there = (sum(a.blocks_read[i] for a in layers) for i in (0, 1))
        cfg = self.cfg
        out: dict[str, Any] = {"pattern": cfg.pattern, "sparse_layers": len(layers), "layers": len(model.layers)}
        if there:
            out["blocks_read_fraction"] = read / there
        frac = f", {read / there:.1%} of the causal key blocks read" if there else ""
        out["summary"] = f"{cfg.pattern} attention in {len(layers)}/{len(model.layers)} layers{frac}"
        return out
