"""The decode layout, and the optional fused C++ CPU kernels for one-token decoding (leanlm/kernels.cpp), chosen at
run time with `kernel="cpp"` (`leanlm generate/bench --kernel cpp`, `generate(..., kernel="cpp")`,
`decode_layout(model, "cpp")`).

The default, "torch", is pure PyTorch. "cpp" replaces, for one token of one row in fp32 on a CPU, each block's
attention half and SwiGLU half by one op each (`attn_decode`, `mlp_decode`), LTE's sparse FFN by `lte_decode`, and
the small ops around the blocks (embedding, final norm with the lm head, SUBLLM's stage score and upsample), which
cost ~0.1 ms each mid-step as PyTorch ops (kernels.cpp); everything else (prefill, batches, training, other dtypes
and devices) runs the PyTorch code it would run anyway. The kernel is a run-time choice, not part of a model's
config: it changes how a step is computed, not what.

The ops read every weight through one descriptor (`decode_weight`): a float32 weight in the decode layout, or a
packed one of leanlm.quant (int8, int6, int4, ternary), read as it is stored, with fp32 activations.
"""

from __future__ import annotations

import contextlib
import functools
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.cpp_extension import is_ninja_available, load

from leanlm.errors import LeanLMError
from leanlm.model import Block, Transformer
from leanlm.quant import FakeQuantEmbedding, FakeQuantLinear, Packed, QuantLinear, TiedHead

KERNELS = ("torch", "cpp")


def check_kernel(kernel: str) -> None:
    if kernel not in KERNELS:
        raise LeanLMError(f"--kernel must be torch (pure PyTorch) or cpp (fused C++ CPU decode ops), got {kernel!r}")


def auto_kernel(kernel: str, model: nn.Module) -> str:
    """ "auto": cpp for a model on the CPU where the extension can be built (a C++ compiler and ninja), else torch;
    any other kernel name as it is. Packed (quantized) weights make the difference large: the PyTorch path
    dequantizes each weight for every token."""
    if kernel != "auto":
        return kernel
    on_cpu = all(t.device.type == "cpu" for t in model.parameters())
    return "cpp" if on_cpu and shutil.which("c++") is not None and is_ninja_available() else "torch"


@functools.cache
def cpp_kernels():
    """The compiled extension, built on first use for this CPU (-march=native; torch caches the build under
    ~/.cache/torch_extensions, so later processes only load it, in about a second)."""
    if shutil.which("c++") is None:
        raise LeanLMError("--kernel cpp needs a C++ compiler (c++ not found); use --kernel torch")
    if not is_ninja_available():
        raise LeanLMError("--kernel cpp needs ninja to build (pip install ninja); or use --kernel torch")
    try:
        return load(
            name="leanlm_kernels",
            sources=[str(Path(__file__).with_name("kernels.cpp"))],
            # -fopenmp: at::parallel_for is a header template that runs serially unless compiled with OpenMP; the
            # libgomp it links is the one torch has already loaded (same soname), so the threads are torch's
            extra_cflags=["-O3", "-march=native", "-fopenmp"],
            extra_ldflags=["-fopenmp"],
        )
    except Exception as e:  # a compiler or linker error: the log is long, its last line names the failure
        last = (str(e).strip().splitlines() or ["unknown error"])[-1]
        raise LeanLMError(f"--kernel cpp: building the C++ kernels failed ({last})") from None


@contextlib.contextmanager
def decode_layout(model: Transformer, kernel: str = "torch") -> Iterator[None]:
    """Within the block, store every Linear weight (out, in) column-major: same values, shape and Parameter objects,
    but `F.linear` then streams a contiguous (in, out) matrix (MKL's NN gemv). For batch-1 decode on a CPU this is
    ~25% faster for the layer weights and 2x for a 49k-row lm head (docs/design.md); for training-size batches it is
    slower, so the row-major layout is restored on exit. Tied weights stay tied (the data is swapped in place). The
    FFNs and the token router switch to layouts of their own inside it (`MLP.decode_layout`,
    `TokenRouter.decode_layout`).

    kernel: "torch" (pure PyTorch) or "cpp": one-token steps of one row then run each half-block (and the embedding,
    the final norm with the lm head) as fused C++ ops on the same weights.
    """
    check_kernel(kernel)
    params = {id(m.weight): m.weight for m in model.modules() if isinstance(m, nn.Linear) and m.weight.dim() == 2}
    # fp32 only: for bf16 the column-major path is ~10x slower on CPUs without native bf16 matmul (measured)
    changed = [p for p in params.values() if p.is_contiguous() and p.dtype == torch.float32]
    # inference_mode(False): called from generate() under inference mode, whose tensors could never train again
    with torch.inference_mode(False), torch.no_grad():
        for p in changed:
            p.data = p.data.t().contiguous().t()
    try:
        with contextlib.ExitStack() as stack:
            stack.enter_context(_fuse_ends(model, kernel))
            for block in model.layers:
                stack.enter_context(block.mlp.decode_layout(kernel))
                stack.enter_context(_fuse_block(block, kernel))
            if model.router is not None:
                stack.enter_context(model.router.decode_layout(kernel))
            yield
    finally:
        with torch.inference_mode(False), torch.no_grad():
            for p in changed:
                p.data = p.data.contiguous()


def _fp32_cpu(*tensors: torch.Tensor) -> bool:
    return all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors)


def decode_weight(layer: nn.Module) -> Any | None:
    """The fused ops' descriptor of a layer's weight (kernels.cpp `Weight`), or None where the ops would compute
    something else than the layer (it then keeps PyTorch): a bias-free float32 nn.Linear in the column-major decode
    layout, a float32 nn.Embedding (any strides), or a packed layer on the CPU: QuantEmbedding, TiedHead (its
    embedding), QuantLinear without bias or activation rounding (FlexQ's act_bits). The quantization-aware layers
    round their weights in every forward: None. Builds the kernels on first use (a failure is one LeanLMError)."""
    if isinstance(layer, TiedHead):
        layer = layer.embedding
    if isinstance(layer, (FakeQuantLinear, FakeQuantEmbedding)):
        return None
    if isinstance(layer, Packed):
        if isinstance(layer, QuantLinear) and (layer.act_bits or layer.bias is not None):
            return None
        if layer.qweight.device.type != "cpu":
            return None
        return cpp_kernels().packed(layer.fmt, *layer.packed())
    if isinstance(layer, nn.Linear):
        w = layer.weight
        if layer.bias is not None or not _fp32_cpu(w) or not w.t().is_contiguous():
            return None
        return cpp_kernels().dense(w.detach())
    if isinstance(layer, nn.Embedding) and _fp32_cpu(layer.weight):
        return cpp_kernels().dense(layer.weight.detach())
    return None


@contextlib.contextmanager
def _fuse_ends(model: Transformer, kernel: str) -> Iterator[None]:
    """A one-token step of one row starts and ends with one call each: the embedding, and the final norm with the
    lm head (mid-step a small PyTorch op costs ~0.1 ms, docs/design.md)."""
    n = model.norm.weight
    if kernel == "cpp" and _fp32_cpu(n):
        head, embed = decode_weight(model.lm_head), decode_weight(model.embed_tokens)
        if head is not None and embed is not None:
            model.fused = (cpp_kernels(), (n.detach(), model.norm.eps, head), embed)
    try:
        yield
    finally:
        model.fused = None


@contextlib.contextmanager
def _fuse_block(block: Block, kernel: str) -> Iterator[None]:
    """One-token steps of one row run the block as two fused C++ ops reading its weights (decode_weight)."""
    n, n2 = block.input_layernorm, block.post_attention_layernorm
    attn = block.self_attn
    w_qkv = decode_weight(attn.qkv_proj) if kernel == "cpp" and _fp32_cpu(n.weight, n2.weight) else None
    w_o = decode_weight(attn.o_proj) if w_qkv is not None else None
    mlp = block.mlp.decode_step(n2, cpp_kernels(), decode_weight) if w_o is not None else None
    if mlp is None:
        yield  # a weight the ops do not read as the layer does (another dtype or layout, a bias, FlexQ): PyTorch
        return
    block.fused = (cpp_kernels(), (n.weight.detach(), n.eps, w_qkv, w_o), mlp)
    attn.proj_ops = (cpp_kernels(), w_qkv, w_o)  # for an attention that runs its own one-token step (sparse)
    try:
        yield
    finally:
        block.fused = attn.proj_ops = None
