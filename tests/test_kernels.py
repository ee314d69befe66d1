"""The fused C++ decode kernels (leanlm/kernels.cpp, `--kernel cpp`) against the PyTorch path: a dense block, a GQA
block, SUBLLM stages and LTE blocks decode the same logits; generation is identical; missing tools are one error."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from torch.utils.cpp_extension import is_ninja_available

from leanlm.checkpoint import save_checkpoint
from leanlm.cli import main
from leanlm.config import preset
from leanlm.errors import LeanLMError
from leanlm.generate import generate
from leanlm.kernels import decode_layout
from leanlm.methods import add_methods, build_model
from leanlm.methods.lte import LTEConfig
from leanlm.model import Transformer

needs_cxx = pytest.mark.skipif(
    shutil.which("c++") is None or not is_ninja_available(), reason="the C++ kernels need c++ and ninja"
)


def cached_logits(model, tokens: torch.Tensor, prompt: int, kernel: str) -> torch.Tensor:
    """Prefill `prompt` tokens, then decode the rest one by one with the caches: (1, T - prompt + 1, vocab)."""
    with torch.no_grad(), decode_layout(model, kernel):
        model.setup_caches(1, tokens.shape[1])
        out = [model(tokens[:, :prompt], last_only=True)]
        out += [model(tokens[:, s : s + 1], start=s) for s in range(prompt, tokens.shape[1])]
        model.reset_caches()
    return torch.cat(out, 1)


@needs_cxx
@pytest.mark.parametrize("threads", [1, 2])  # 2: gemv rows and attention key chunks are split over threads
@pytest.mark.parametrize("heads", [(4, 4), (6, 2)])  # multi-head, and grouped-query attention (3 heads per kv head)
def test_dense_block_kernels_equal_pytorch(threads, heads):
    torch.manual_seed(0)
    cfg = preset("tiny", dim=96, n_heads=heads[0], n_kv_heads=heads[1], max_seq_len=700)
    model = Transformer(cfg).init_weights(seed=0).eval()
    x = torch.randint(0, 512, (1, 600))  # 600 keys: three 256-key chunks of the split softmax, the last partial
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        ref, got = (cached_logits(model, x, 580, k) for k in ("torch", "cpp"))
    finally:
        torch.set_num_threads(before)
    assert (ref - got).abs().max() <= 1e-4
    with torch.no_grad():  # and both equal one forward over the whole sequence
        assert (model(x)[:, 579:] - got).abs().max() <= 1e-4
    assert all(b.fused is None for b in model.layers) and model.fused is None  # views dropped with the layout


@needs_cxx
def test_subllm_stages_decode_the_same_with_the_kernels():
    cfg = preset("tiny", n_layers=5, subllm={"structure": "T(T(TT)T)"})
    model = build_model(cfg).init_weights(seed=0).eval()
    with torch.no_grad():
        for st in model.stages:
            st.scorer.weight.mul_(50.0)  # drop a good share of the tokens at both stages
    x = torch.randint(0, 512, (1, 120))
    sub = model.methods[0]
    ref = cached_logits(model, x, 64, "torch")
    torch_counts = {kind: c.copy() for kind, c in sub.counts.items()}
    sub.reset_stats(model)
    got = cached_logits(model, x, 64, "cpp")  # stage caches start small and grow while decoding: prepare() reserves
    assert (ref - got).abs().max() <= 1e-4
    # both paths keep the same tokens: the prompt's (prefill) and the decoded steps' (the cpp score kernel)
    assert all((sub.counts[kind] == c).all() for kind, c in torch_counts.items())
    for kind in ("prefill", "decode"):
        kept = sub.retention(kind)
        assert 0.1 < kept[0] < 0.9 and 0.05 < kept[1] < 0.95, (kind, kept)


@needs_cxx
def test_lte_blocks_decode_the_same_with_the_kernels():
    dense = Transformer(preset("tiny", dim=64, ffn_dim=128)).init_weights(seed=0).eval()
    lte = add_methods(dense, dense.cfg.replace(methods={"lte": LTEConfig()})).eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for b in lte.layers:
            b.mlp.router.weight.copy_(torch.randn(b.mlp.router.weight.shape, generator=gen) * 0.3)
            b.mlp.router_offset.zero_()
    x = torch.randint(0, 512, (1, 60))
    ref = cached_logits(lte, x, 30, "torch")
    method = lte.methods[0]
    method.reset_stats(lte)
    got = cached_logits(lte, x, 30, "cpp")  # the FFN half goes through lte_decode with the norm and residual fused
    assert (ref - got).abs().max() <= 1e-4
    assert 0 < method.report(lte)["ffn_sparsity"] < 1


@needs_cxx
def test_generate_is_identical_with_either_kernel(tmp_path, capsys, tiny_tokenizer):
    model = Transformer(preset("tiny", vocab_size=300)).init_weights(seed=0).eval()
    prompts = [[1, 2, 3, 4, 5, 6, 7]]
    assert generate(model, prompts, 20).tokens == generate(model, prompts, 20, kernel="cpp").tokens
    # a batch of rows keeps the PyTorch path (the kernels do one row): same tokens either way
    batch = [[1, 2, 3], [4, 5, 6, 7, 8]]
    assert generate(model, batch, 8).tokens == generate(model, batch, 8, kernel="cpp").tokens
    ck = save_checkpoint(model, tiny_tokenizer, tmp_path / "m")
    outs = []
    for kernel in ("torch", "cpp"):
        assert main(["generate", "-m", str(ck), "-p", "hi", "-n", "6", "--kernel", kernel, "--json"]) == 0
        outs.append(json.loads(capsys.readouterr().out.strip().splitlines()[-1])["tokens"])
    assert outs[0] == outs[1]


def test_unknown_kernel_is_one_error(capsys):
    model = Transformer(preset("tiny")).init_weights(seed=0).eval()
    with pytest.raises(LeanLMError, match="--kernel must be torch"):
        generate(model, [[1, 2]], 2, kernel="cuda")
    with pytest.raises(SystemExit) as e:
        main(["generate", "-m", "tiny", "-p", "hi", "--kernel", "cuda"])
    assert e.value.code == 2 and "invalid choice" in capsys.readouterr().err


@pytest.mark.parametrize("missing", ["c++", "ninja"])
def test_kernels_without_a_compiler_are_one_error(monkeypatch, missing):
    import torch.utils.cpp_extension

    import leanlm.kernels

    if missing == "c++":
        monkeypatch.setattr(leanlm.kernels.shutil, "which", lambda _: None)
    else:
        monkeypatch.setattr(leanlm.kernels.shutil, "which", lambda _: "/usr/bin/c++")
        monkeypatch.setattr(torch.utils.cpp_extension, "is_ninja_available", lambda: False)
        monkeypatch.setattr(leanlm.kernels, "is_ninja_available", lambda: False, raising=False)  # imported by name
    leanlm.kernels.cpp_kernels.cache_clear()
    dense = Transformer(preset("tiny", dim=64, ffn_dim=128)).init_weights(seed=0).eval()
    model = add_methods(dense, dense.cfg.replace(methods={"lte": LTEConfig()})).eval()  # LTE: its layout moves weights
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        with (
            pytest.raises(LeanLMError, match="needs a C\\+\\+ compiler" if missing == "c++" else "needs ninja"),
            decode_layout(model, "cpp"),
        ):
            pass
    finally:
        leanlm.kernels.cpp_kernels.cache_clear()  # the next user loads the real build
    for k, v in model.state_dict().items():  # nothing lost or left in the decode layout
        assert torch.equal(v, weights[k]) and v.is_contiguous(), k


def test_checkpoints_that_stored_the_lte_kernel_still_load(tmp_path, tiny_tokenizer):
    from leanlm.checkpoint import load_checkpoint

    dense = Transformer(preset("tiny", vocab_size=300, dim=64, ffn_dim=128)).init_weights(seed=0).eval()
    lte = add_methods(dense, dense.cfg.replace(methods={"lte": LTEConfig()}))
    ck = save_checkpoint(lte, tiny_tokenizer, tmp_path / "lte")
    meta = json.loads((ck / "config.json").read_text())
    meta["model"]["lte"]["decode_kernel"] = "cpp"  # an older leanlm kept the kernel choice in the config
    (ck / "config.json").write_text(json.dumps(meta))
    assert load_checkpoint(ck)[0].cfg.methods["lte"].expert_size == 32


@pytest.mark.slow
@needs_cxx
def test_smollm2_generates_the_same_with_the_kernels(smollm2):
    model, tok = smollm2  # grouped-query attention with 9 query and 3 kv heads, tied 49k-row head
    ids = [tok.encode("The capital of France is Paris, and the capital of Italy is")]
    ref, got = (generate(model, ids, 24, kernel=k).tokens for k in ("torch", "cpp"))
    assert ref == got


@needs_cxx
@pytest.mark.parametrize("tied", [True, False])
def test_embedding_and_head_kernels_equal_pytorch(tied):
    """A decode step starts and ends with one call each (embed_decode; head_decode = final norm + lm head), for a
    row-major embedding and for one tied to the column-major lm head; an id outside the vocabulary is refused."""
    model = Transformer(preset("tiny", tie_embeddings=tied)).init_weights(seed=0).eval()
    with torch.no_grad():
        model.norm.weight.uniform_(0.5, 1.5)
    x = torch.randint(0, 512, (1, 40))
    ref, got = (cached_logits(model, x, 30, k) for k in ("torch", "cpp"))
    assert (ref - got).abs().max() <= 1e-4
    with torch.no_grad(), decode_layout(model, "cpp"):
        assert model.fused is not None
        idx = torch.tensor([[7]])
        assert torch.equal(model.embed(idx), model.embed_tokens(idx))
        with pytest.raises(RuntimeError, match="outside the vocabulary"):
            model.embed(torch.tensor([[512]]))
    assert model.fused is None and model.lm_head.weight.is_contiguous()
