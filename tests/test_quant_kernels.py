"""The fused C++ decode kernels on packed weights (leanlm/kernels.cpp, leanlm.quant's formats): each packed GEMV
equals the matmul with the dequantized weight, an embedding row equals its dequantization, and the cached decode of
quantized models (dense, LTE, SUBLLM) with --kernel cpp equals the PyTorch path."""

from __future__ import annotations

import shutil

import pytest
import torch
from torch.utils.cpp_extension import is_ninja_available

from leanlm.config import preset
from leanlm.generate import generate
from leanlm.kernels import cpp_kernels, decode_layout
from leanlm.methods import add_methods, build_model
from leanlm.methods.quant import with_quant
from leanlm.model import Transformer
from leanlm.quant import dequantize, quantize

pytestmark = pytest.mark.skipif(
    shutil.which("c++") is None or not is_ninja_available(), reason="the C++ kernels need c++ and ninja"
)

# format -> group sizes (0: per output channel)
GROUPS = {"int8": (0, 32, 64), "int6": (0, 32), "int4": (32, 64, 128), "ternary": (32, 64, 128)}
CASES = [(fmt, g, K) for fmt, gs in GROUPS.items() for g in gs for K in (32, 96, 160, 576) if K % (g or K) == 0]


@pytest.fixture
def threads(request):
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


def packed_weight(fmt: str, w: torch.Tensor, group: int):
    p = quantize(w, fmt, group)
    return cpp_kernels().packed(fmt, p["qweight"], p["scales"], p.get("mins")), dequantize(fmt, **p)


@pytest.mark.parametrize("threads", [1, 2], indirect=True)  # 2: the rows split over threads
@pytest.mark.parametrize(("fmt", "group", "K"), CASES)
def test_packed_gemv_equals_the_dequantized_matmul(fmt, group, K, threads):
    gen = torch.Generator().manual_seed(K + group)
    for N in (37, 101):  # odd: a last row on its own after the row pairs
        W, w = packed_weight(fmt, torch.randn(N, K, generator=gen), group or K)
        assert (W.format, W.out_features, W.in_features, W.group) == (fmt, N, K, group or K)
        x = torch.randn(K, generator=gen)
        ref = x.double() @ w.double().t()
        scale = x.abs().double() @ w.abs().double().t()  # what fp32 rounding is relative to
        err = (cpp_kernels().matvec(x, W).double() - ref).abs() / scale
        assert err.max() <= 1e-5, (fmt, group, K, N, float(err.max()))


def test_an_int8_row_of_any_length():
    """int8 groups need not be multiples of 32 (per channel: any K), and a float32 weight goes through the same op."""
    gen = torch.Generator().manual_seed(1)
    for K in (7, 100):
        W, w = packed_weight("int8", torch.randn(5, K, generator=gen), K)
        x = torch.randn(K, generator=gen)
        assert torch.allclose(cpp_kernels().matvec(x, W), w @ x, rtol=1e-5, atol=1e-5)
    w = torch.randn(9, 40, generator=gen)
    x = torch.randn(40, generator=gen)
    assert torch.allclose(cpp_kernels().matvec(x, cpp_kernels().dense(w.t().contiguous().t())), w @ x, atol=1e-5)
    with pytest.raises(RuntimeError, match="column-major"):
        cpp_kernels().matvec(x, cpp_kernels().dense(w))


@pytest.mark.parametrize("fmt", ["int8", "int4", "ternary"])
def test_embedding_rows_are_their_dequantization(fmt):
    w = torch.randn(50, 64, generator=torch.Generator().manual_seed(2))
    W, ref = packed_weight(fmt, w, 32)
    for t in (0, 17, 49):
        assert torch.equal(cpp_kernels().embed_decode(torch.tensor([[t]]), W).view(-1), ref[t])
    with pytest.raises(RuntimeError, match="outside the vocabulary"):
        cpp_kernels().embed_decode(torch.tensor([[50]]), W)


def cached_logits(model, tokens: torch.Tensor, prompt: int, kernel: str) -> torch.Tensor:
    """Prefill `prompt` tokens, then decode the rest one by one with the caches: (1, T - prompt + 1, vocab)."""
    with torch.no_grad(), decode_layout(model, kernel):
        if kernel == "cpp":  # every block and both ends run the fused ops
            assert model.fused is not None and all(b.fused is not None for b in model.layers)
        model.setup_caches(1, tokens.shape[1])
        out = [model(tokens[:, :prompt], last_only=True)]
        out += [model(tokens[:, s : s + 1], start=s) for s in range(prompt, tokens.shape[1])]
        model.reset_caches()
    return torch.cat(out, 1)


def quantized(cfg, **section) -> Transformer:
    model = build_model(cfg).init_weights(seed=0).eval()
    return add_methods(model, with_quant(model.cfg, **section)).eval()


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize(
    "section",
    [
        {"format": "int8"},
        {"format": "int8", "group_size": 32, "head": "float"},
        {"format": "int6", "head": "int4", "head_group_size": 32},
        {"format": "int4", "head": "int8", "head_group_size": 32},
        {"format": "int4", "group_size": 64, "head": "float"},
        {"format": "ternary", "head": "ternary", "head_group_size": 32},
    ],
)
def test_quantized_models_decode_the_same_with_the_kernels(section, tied):
    model = quantized(preset("tiny", ffn_dim=192, tie_embeddings=tied), **section)
    x = torch.randint(0, 512, (1, 40), generator=torch.Generator().manual_seed(3))
    ref, got = (cached_logits(model, x, 30, k) for k in ("torch", "cpp"))
    assert (ref - got).abs().max() <= 1e-4
    assert model.fused is None and all(b.fused is None for b in model.layers)  # dropped with the layout


def test_generate_is_identical_with_either_kernel_on_an_int4_model():
    model = quantized(preset("tiny", ffn_dim=192, vocab_size=300), format="int4", head="int8", head_group_size=32)
    prompts = [[1, 2, 3, 4, 5, 6, 7]]
    assert generate(model, prompts, 16).tokens == generate(model, prompts, 16, kernel="cpp").tokens


def test_flexq_layers_keep_pytorch():
    """A layer that rounds its activations (act_bits) computes something else than the float GEMV: its block keeps
    the PyTorch path, and the decode is the same either way."""
    model = quantized(preset("tiny", ffn_dim=192), format="int6", act_bits=8)
    x = torch.randint(0, 512, (1, 24), generator=torch.Generator().manual_seed(4))
    with torch.no_grad(), decode_layout(model, "cpp"):
        assert model.fused is not None and all(b.fused is None for b in model.layers)
    ref = cached_logits(model, x, 16, "torch")
    with torch.no_grad(), decode_layout(model, "cpp"):
        model.setup_caches(1, x.shape[1])
        first = model(x[:, :16], last_only=True)  # the prefill, then the one-token steps
        got = torch.cat([first] + [model(x[:, s : s + 1], start=s) for s in range(16, 24)], 1)
        model.reset_caches()
    assert (ref - got).abs().max() <= 1e-4


@pytest.mark.parametrize(
    ("section", "expert_size", "packed"),
    [
        ({"format": "int4"}, 32, True),  # experts of one 32-input group each
        ({"format": "int4", "group_size": 64}, 32, True),  # half a group of down per expert
        ({"format": "ternary", "group_size": 64}, 32, True),
        ({"format": "int8", "group_size": 32}, 16, True),  # int8: any expert width, within a group
        ({"format": "int8"}, 16, True),  # per channel: every expert inside the one group
        ({"format": "int4"}, 16, False),  # int4 experts of 16 split down's packed runs: the float path
    ],
)
def test_lte_on_packed_weights_decodes_the_same(section, expert_size, packed):
    cfg = preset("tiny", ffn_dim=192, lte={"expert_size": expert_size})
    model = quantized(cfg, head="int8", **section)
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for b in model.layers:  # routers that pick some experts, not all
            b.mlp.router.weight.copy_(torch.randn(b.mlp.router.weight.shape, generator=gen) * 0.5)
            b.mlp.router_offset.zero_()
    x = torch.randint(0, 512, (1, 48), generator=gen)
    ref = cached_logits(model, x, 30, "torch")
    lte = model.methods[0]
    lte.reset_stats(model)
    with torch.no_grad(), decode_layout(model, "cpp"):
        weights = model.layers[0].mlp._fused[1]
        assert (weights[2].format == section["format"]) == packed  # packed: read as stored, else dequantized
    got = cached_logits(model, x, 30, "cpp")
    assert (ref - got).abs().max() <= 1e-4
    assert 0.1 < lte.report(model)["ffn_sparsity"] < 0.9


def test_subllm_on_int8_weights_decodes_the_same():
    cfg = preset("tiny", ffn_dim=192, n_layers=5, subllm={"structure": "T(T(TT)T)"})
    model = quantized(cfg, format="int8")
    with torch.no_grad():
        for st in model.stages:
            st.scorer.weight.mul_(50.0)  # drop a good share of the tokens at both stages
    x = torch.randint(0, 512, (1, 100), generator=torch.Generator().manual_seed(6))
    ref, got = (cached_logits(model, x, 64, k) for k in ("torch", "cpp"))
    assert (ref - got).abs().max() <= 1e-4
