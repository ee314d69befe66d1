"""The decode layout, and the optional fused C++ CPU kernels for one-token decoding (leanlm/kernels.cpp), chosen at
run time with `kernel="cpp"` (`leanlm generate/bench --kernel cpp`, `generate(..., kernel="cpp")`,
`decode_layout(model, "cpp")`).

The default, "torch", is pure PyTorch. "cpp" replaces, for one token of one row in fp32 on a CPU, each block's
attention half and SwiGLU half by one op each (`attn_decode`, `mlp_decode`), LTE's sparse FFN by `lte_decode`, and
the small ops around the blocks (embedding, final norm with the lm head, SUBLLM's stage score and upsample), which
cost ~0.1 ms each mid-step as PyTorch ops (kernels.cpp); everything else (prefill, batches, training, other dtypes
and devices) runs the PyTorch code it would run anyway. The kernel is a run-time choice, not part of a model's
config: it changes how a step is computed, not what.
"""

from __future__ import annotations

import contextlib
import functools
import shutil
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn
from torch.utils.cpp_extension import is_ninja_available, load

from leanlm.errors import LeanLMError
from leanlm.model import Block, Transformer

KERNELS = ("torch", "cpp")


def check_kernel(kernel: str) -> None:
    if kernel not in KERNELS:
        raise LeanLMError(f"--kernel must be torch (pure PyTorch) or cpp (fused C++ CPU decode ops), got {kernel!r}")


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


@contextlib.contextmanager
def _fuse_ends(model: Transformer, kernel: str) -> Iterator[None]:
    """A one-token step of one row starts and ends with one call each: the embedding, and the final norm with the
    lm head (mid-step a small PyTorch op costs ~0.1 ms, docs/design.md)."""
    w, n, e = model.lm_head.weight, model.norm.weight, model.embed_tokens.weight
    if kernel == "cpp" and _fp32_cpu(w, n, e) and w.t().is_contiguous():
        # (C,), eps, (C, vocab); the embedding (vocab, C) is row- or (tied to the lm head) column-major
        model.fused = (cpp_kernels(), (n.detach(), model.norm.eps, w.detach().t()), e.detach())
    try:
        yield
    finally:
        model.fused = None


@contextlib.contextmanager
def _fuse_block(block: Block, kernel: str) -> Iterator[None]:
    """One-token steps of one row run the block as two fused C++ ops reading the column-major weights."""
    qkv, o = block.self_attn.qkv_proj, block.self_attn.o_proj
    if kernel != "cpp" or not _fp32_cpu(qkv.weight) or qkv.bias is not None:
        yield
        return
    ops = cpp_kernels()  # build (or load) first: a failure is one error, before any state changes
    n = block.input_layernorm
    attn = (n.weight.detach(), n.eps, qkv.weight.detach().t(), o.weight.detach().t())  # (C,), eps, (C, 3HD), (HD, C)
    mlp = block.mlp.decode_step(block.post_attention_layernorm, ops)
    if mlp is None or not (attn[2].is_contiguous() and attn[3].is_contiguous()):
        yield  # not in the column-major layout (e.g. a weight shared in another layout): keep PyTorch
        return
    block.fused = (ops, attn, mlp)
    try:
        yield
    finally:
        block.fused = None
