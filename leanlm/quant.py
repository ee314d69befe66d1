"""Packed weight formats and the modules that hold them (the `quant` method, leanlm/methods/quant.py, puts them in a
model; leanlm/kernels.cpp reads them in one-token decode).

Every format quantizes a weight (N, K) (out, in) in groups of `group` consecutive inputs of one output row, and is
stored as a few tensors (the state-dict keys of a quantized layer):

    int8     qweight int8 (N, K)       scales fp16 (N, K/g)                 w = s * q,      q in [-127, 127]
    int6     qweight int8 (N, K)       scales fp16 (N, K/g)                 w = s * q,      q in [-32, 31] (FlexQ)
    int4     qweight uint8 (N, K/2)    scales fp16 (N, K/g), mins fp16      w = s * q + m,  q in [0, 15]
    ternary  qweight uint8 (N, K/4)    scales fp16 (N, K/g)                 w = s * q,      q in {-1, 0, 1} (BitCPM)

int4 packs each run of 32 inputs into 16 bytes as GGUF's Q4_0/Q4_1 do (byte b: input b in the low nibble, input b+16
in the high one), so a GGUF file's blocks load as they are; ternary packs 32 inputs into 8 bytes (byte b, bits 2j:
input b + 8j, code q + 1). Scales and mins are fp16 (GGUF's choice, and what keeps int4 at 5 bits per weight);
`_apply` keeps packed tensors' dtypes when a model is cast (`model.float()`), moving only their device.

Shapes: N outputs, K inputs, g group size, G = K / g groups per row.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from leanlm.errors import LeanLMError

FORMATS = ("int8", "int6", "int4", "ternary")
BITS = {"int8": 8, "int6": 8, "int4": 4, "ternary": 2}  # bits per stored weight (int6 lives in int8 bytes)
QMAX = {"int8": 127, "int6": 31}
PACK = 32  # inputs per packed run (int4, ternary): group sizes are multiples of it


def check_group(fmt: str, group: int, K: int, where: str) -> None:
    """A group must divide the layer's inputs (and, for the packed 4- and 2-bit formats, be a multiple of 32)."""
    if fmt not in FORMATS:
        raise LeanLMError(f"{where}: unknown quantization format {fmt!r} (choose from {', '.join(FORMATS)})")
    if group <= 0 or K % group:
        raise LeanLMError(f"{where}: group size {group} does not divide the layer's {K} inputs")
    if fmt in ("int4", "ternary") and group % PACK:
        raise LeanLMError(f"{where}: {fmt} group size must be a multiple of {PACK} (got {group})")


# ---------------------------------------------------------------------------------------------------------------------
# quantize / dequantize (reference implementations in PyTorch; the C++ kernels compute the same values)


def _fp16(t: Tensor) -> Tensor:
    return t.clamp(-65504, 65504).to(torch.float16)


def quantize(w: Tensor, fmt: str, group: int) -> dict[str, Tensor]:
    """w (N, K) float -> the packed tensors of `fmt` (module docstring), round to nearest."""
    N, K = w.shape
    check_group(fmt, group, K, "quantize")
    wg = w.detach().float().reshape(N, K // group, group)  # (N, G, g)
    if fmt in QMAX:
        qmax = QMAX[fmt]
        s = _fp16(wg.abs().amax(-1) / qmax)  # (N, G)
        sf = s.float().unsqueeze(-1)
        q = torch.where(sf > 0, wg / sf, torch.zeros_like(wg)).round().clamp(-qmax - (fmt == "int6"), qmax)
        return {"qweight": q.to(torch.int8).reshape(N, K), "scales": s}
    if fmt == "int4":
        lo, hi = wg.amin(-1), wg.amax(-1)
        s, m = _fp16((hi - lo) / 15), _fp16(lo)
        sf, mf = s.float().unsqueeze(-1), m.float().unsqueeze(-1)
        q = torch.where(sf > 0, (wg - mf) / sf, torch.zeros_like(wg)).round().clamp(0, 15).to(torch.uint8)
        return {"qweight": pack_int4(q.reshape(N, K)), "scales": s, "mins": m}
    # ternary, BitCPM's absmean scale: s = mean |w| of the group, q = clamp(round(w / s), -1, 1)
    s = _fp16(wg.abs().mean(-1))
    sf = s.float().unsqueeze(-1)
    q = torch.where(sf > 0, wg / sf, torch.zeros_like(wg)).round().clamp(-1, 1)
    return {"qweight": pack_ternary((q + 1).to(torch.uint8).reshape(N, K)), "scales": s}


def pack_int4(q: Tensor) -> Tensor:
    """q (N, K) uint8 in [0, 15] -> (N, K/2) uint8 in GGUF's nibble order."""
    N, K = q.shape
    r = q.reshape(N, K // PACK, 2, PACK // 2)  # (N, runs, lo|hi, 16)
    return (r[:, :, 0] | (r[:, :, 1] << 4)).reshape(N, K // 2)


def unpack_int4(qw: Tensor) -> Tensor:
    """(N, K/2) uint8 -> q (N, K) uint8 in [0, 15]."""
    N, half = qw.shape
    r = qw.reshape(N, half // (PACK // 2), 1, PACK // 2)
    return torch.cat((r & 15, r >> 4), dim=2).reshape(N, 2 * half)


def pack_ternary(c: Tensor) -> Tensor:
    """codes (N, K) uint8 in {0, 1, 2} -> (N, K/4) uint8 (module docstring)."""
    N, K = c.shape
    r = c.reshape(N, K // PACK, 4, PACK // 4)  # (N, runs, j, b): input b + 8j
    return (r[:, :, 0] | (r[:, :, 1] << 2) | (r[:, :, 2] << 4) | (r[:, :, 3] << 6)).reshape(N, K // 4)


def unpack_ternary(qw: Tensor) -> Tensor:
    """(N, K/4) uint8 -> q (N, K) int8 in {-1, 0, 1}."""
    N, quarter = qw.shape
    r = qw.reshape(N, quarter // (PACK // 4), 1, PACK // 4)
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8, device=qw.device).view(1, 1, 4, 1)
    return (((r >> shifts) & 3).to(torch.int8) - 1).reshape(N, 4 * quarter)


def dequantize(fmt: str, qweight: Tensor, scales: Tensor, mins: Tensor | None = None) -> Tensor:
    """The packed tensors -> w (N, K) fp32. Multiplication and addition are separate ops (no fused multiply-add): the
    values equal the `gguf` package's dequantization of the same blocks bit for bit."""
    if fmt in QMAX:
        q = qweight
    elif fmt == "int4":
        q = unpack_int4(qweight)
    else:
        q = unpack_ternary(qweight)
    N, K = q.shape
    G = scales.shape[1]
    w = q.view(N, G, K // G).float() * scales.float().unsqueeze(-1)  # (N, G, g)
    if mins is not None:
        w = w + mins.float().unsqueeze(-1)
    return w.reshape(N, K)


def fake_quantize(w: Tensor, fmt: str, group: int) -> Tensor:
    """w rounded to `fmt`'s grid, with a straight-through gradient (quantization-aware training, BitCPM)."""
    q = dequantize(fmt, **quantize(w, fmt, group)).to(w.dtype)
    return w + (q - w).detach()


def quantize_activations(x: Tensor, bits: int) -> Tensor:
    """x (..., K) rounded per token to a symmetric `bits`-bit grid (absmax scale): FlexQ's activation quantizer."""
    qmax = 2 ** (bits - 1) - 1
    s = x.detach().abs().amax(-1, keepdim=True).clamp(min=1e-8) / qmax
    return (x / s).round().clamp(-qmax - 1, qmax) * s


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the model's weights as stored: parameters, packed tensors and persistent buffers (a tied weight once;
    RoPE tables and KV caches excluded)."""
    seen: set[int] = set()
    total = 0
    for t in [*model.parameters(), *model.state_dict().values()]:
        key = t.untyped_storage().data_ptr() if t.device.type != "meta" else id(t)
        if key in seen:
            continue
        seen.add(key)
        total += t.numel() * t.element_size()
    return total


# ---------------------------------------------------------------------------------------------------------------------
# modules


class Packed(nn.Module):
    """A weight (N, K) held in a packed format: its tensors are buffers (state-dict keys qweight, scales, mins)."""

    def __init__(self, out_features: int, in_features: int, fmt: str, group: int, where: str = "layer"):
        super().__init__()
        check_group(fmt, group, in_features, where)
        self.out_features, self.in_features, self.fmt, self.group = out_features, in_features, fmt, group
        N, K, G = out_features, in_features, in_features // group
        qshape, qdtype = ((N, K), torch.int8) if fmt in QMAX else ((N, K * BITS[fmt] // 8), torch.uint8)
        self.register_buffer("qweight", torch.zeros(qshape, dtype=qdtype))
        self.register_buffer("scales", torch.zeros(N, G, dtype=torch.float16))
        self.mins: Tensor | None
        self.register_buffer("mins", torch.zeros(N, G, dtype=torch.float16) if fmt == "int4" else None)
        self.compute_dtype = torch.float32  # what an embedding lookup returns: the float dtype the model is cast to

    @property
    def weight(self) -> Tensor:
        """The dequantized weight (N, K) fp32, computed on each access (prefill and training-size batches use it)."""
        return dequantize(self.fmt, self.qweight, self.scales, self.mins)

    def linear(self, x: Tensor) -> Tensor:
        """x (..., K) -> x @ w^T (..., N)."""
        if (
            self.fmt == "int8"
            and self.group == self.in_features
            and x.numel() == self.in_features
            and x.dtype == torch.float32
            and x.device.type == "cpu"
        ):
            # aten's int8 weight-only matmul (per-channel scales) reads the packed weight directly; one row only: on
            # the CPU it is 13x slower than dequantizing for 16 rows and 80x for 512 (torch 2.13)
            y = torch._weight_int8pack_mm(x.reshape(-1, self.in_features), self.qweight, self.scales.float().view(-1))
            return y.view(*x.shape[:-1], self.out_features)
        return F.linear(x, self.weight.to(x.dtype))

    def packed(self) -> tuple[Tensor, Tensor, Tensor | None]:
        return self.qweight, self.scales, self.mins

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.packed() if t is not None)

    def _apply(self, fn, recurse=True):
        # model.float() / .to(dtype) would cast the fp16 scales: packed tensors only follow the device, and a float
        # dtype becomes the dtype the layer computes in
        probe = fn(torch.empty(0))
        device = probe.device
        if probe.dtype.is_floating_point:
            self.compute_dtype = probe.dtype
        for name, buf in self._buffers.items():
            if buf is not None:
                self._buffers[name] = buf.to(device) if device.type != "meta" else fn(buf)
        return self

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
        # a float weight where packed tensors are expected (a full-precision checkpoint loaded into a quantized
        # architecture) is quantized on load
        w = state_dict.get(prefix + "weight")
        if w is not None and prefix + "qweight" not in state_dict:
            if tuple(w.shape) != (self.out_features, self.in_features):
                errors.append(
                    f"{prefix}weight: shape {tuple(w.shape)}, expected {(self.out_features, self.in_features)}"
                )
                return
            packed = {prefix + k: v for k, v in quantize(w, self.fmt, self.group).items()}
            state_dict = {**{k: v for k, v in state_dict.items() if k != prefix + "weight"}, **packed}
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing, unexpected, errors)

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, {self.fmt}, group={self.group}"


class QuantLinear(Packed):
    """A bias-free or biased linear layer with packed weights. `act_bits` (FlexQ) rounds its input per token to 6 or
    8 bits first; 0 leaves activations in float."""

    def __init__(self, in_features: int, out_features: int, fmt: str, group: int, bias: bool = False, where="layer"):
        super().__init__(out_features, in_features, fmt, group, where)
        self.act_bits = 0
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)

    def forward(self, x: Tensor) -> Tensor:
        if self.act_bits:
            x = quantize_activations(x, self.act_bits)
        y = self.linear(x)
        return y + self.bias.to(y.dtype) if self.bias is not None else y

    def extra_repr(self) -> str:
        return super().extra_repr() + (f", act_bits={self.act_bits}" if self.act_bits else "")


class QuantEmbedding(Packed):
    """A token embedding (vocab, C) with packed rows: a lookup dequantizes only the rows it reads."""

    def __init__(self, num_embeddings: int, dim: int, fmt: str, group: int):
        super().__init__(num_embeddings, dim, fmt, group, where="embed_tokens")

    def forward(self, idx: Tensor) -> Tensor:
        flat = idx.reshape(-1)
        qw = self.qweight.index_select(0, flat)
        mins = self.mins.index_select(0, flat) if self.mins is not None else None
        rows = dequantize(self.fmt, qw, self.scales.index_select(0, flat), mins).to(self.compute_dtype)
        return rows.view(*idx.shape, self.in_features)


class TiedHead(nn.Module):
    """The lm head of a model whose head is its (packed) embedding: no state of its own, it reads the embedding's
    tensors when called (so loading, saving and moving the embedding is all there is to do)."""

    def __init__(self, embedding: QuantEmbedding):
        super().__init__()
        self._embedding = [embedding]  # a list: not a registered submodule, so not a second copy in the state dict

    def _load_from_state_dict(self, state_dict, prefix, *args) -> None:
        pass  # a float source's `lm_head.weight` is its embedding again: the embedding loads it

    @property
    def embedding(self) -> QuantEmbedding:
        return self._embedding[0]

    @property
    def weight(self) -> Tensor:
        return self.embedding.weight

    def forward(self, x: Tensor) -> Tensor:
        return self.embedding.linear(x)


class FakeQuantLinear(nn.Linear):
    """Quantization-aware training: a full-precision weight rounded to `fmt` in every forward, the gradient passed
    straight through (BitCPM's ternary QAT). Its state dict is an nn.Linear's; `leanlm quantize` packs it."""

    def __init__(self, in_features: int, out_features: int, fmt: str, group: int, bias: bool = False, where="layer"):
        check_group(fmt, group, in_features, where)
        super().__init__(in_features, out_features, bias=bias)
        self.fmt, self.group = fmt, group

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, fake_quantize(self.weight, self.fmt, self.group), self.bias)


class FakeQuantEmbedding(nn.Embedding):
    """The embedding under QAT: lookups read the rounded rows (what the packed embedding will hold)."""

    def __init__(self, num_embeddings: int, dim: int, fmt: str, group: int):
        check_group(fmt, group, dim, "embed_tokens")
        super().__init__(num_embeddings, dim)
        self.fmt, self.group = fmt, group

    def forward(self, idx: Tensor) -> Tensor:
        return F.embedding(idx, fake_quantize(self.weight, self.fmt, self.group))
