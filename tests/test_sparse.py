"""Sparse attention (leanlm/sparse.py, the `attention` method): the gather path equals the masked reference (values
and gradients), causality, dense where the pattern covers everything, cached decode equals the full forward, batched
decoding per row, KV caches bounded by the pattern, schedules, FLOP accounting and bad configs."""

from __future__ import annotations

import shutil

import pytest
import torch
from conftest import decode_padded
from torch.utils.cpp_extension import is_ninja_available

from leanlm.cli import main
from leanlm.config import preset
from leanlm.data import text_file
from leanlm.errors import LeanLMError
from leanlm.generate import generate
from leanlm.methods import build_model
from leanlm.model import Transformer
from leanlm.sparse import SparseAttention, SparseConfig, sparse_layers
from leanlm.sparse_cache import SparseCache

TOL = 1e-4
# tiny model: 4 query heads, 2 KV heads; blocks of 8 so that 100 tokens span 13 blocks
PATTERNS = {
    "sink_window": dict(pattern="sink_window", block=8, window=16, sink=8),
    "s2": dict(pattern="s2", block=8, window=16, sink=0, vert_stride=2),
    "s2_partial": dict(pattern="s2", block=8, window=8, sink=0, vert_stride=4),
    "infllm2": dict(pattern="infllm2", block=8, window=16, sink=8, topk=5, kernel=4, kernel_stride=2, dense_len=20),
}


def sparse_model(name: str, **extra) -> Transformer:
    cfg = preset("tiny", attention={**PATTERNS[name], **extra})
    return build_model(cfg).init_weights(seed=0).eval()


def ids(B: int, T: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 512, (B, T), generator=torch.Generator().manual_seed(seed))


def qkv(attn: SparseAttention, T: int, seed: int = 0, B: int = 2):
    g = torch.Generator().manual_seed(seed)
    H, K, D = attn.n_heads, attn.n_kv_heads, attn.head_dim
    return (torch.randn(B, n, T, D, generator=g, requires_grad=True) for n in (H, K, K))


@pytest.mark.parametrize("name", PATTERNS)
@pytest.mark.parametrize("T", [100, 64])
def test_gather_path_equals_masked_reference(name, T):
    attn = sparse_model(name).layers[0].self_attn
    q, k, v = qkv(attn, T)
    pos = torch.arange(T).unsqueeze(0)
    y_gather = attn.gathered(q, k, v)
    y_masked = attn.masked(q, k, v, pos, pos, None)
    assert torch.allclose(y_gather, y_masked, atol=TOL, rtol=0)
    w = torch.randn_like(y_gather)
    grads_g = torch.autograd.grad((y_gather * w).sum(), (q, k, v))
    grads_m = torch.autograd.grad((y_masked * w).sum(), (q, k, v))
    for a, b in zip(grads_g, grads_m):
        assert torch.isfinite(a).all()
        assert torch.allclose(a, b, atol=TOL, rtol=0)


@pytest.mark.parametrize("name", PATTERNS)
def test_sparse_differs_from_dense_and_is_causal(name):
    model = sparse_model(name)
    dense = Transformer(model.cfg.replace(methods={}))
    dense.load_state_dict(model.state_dict())
    x = ids(1, 100)
    with torch.no_grad():
        y = model(x)
        assert not torch.allclose(y, dense(x), atol=1e-3)  # really sparse at 100 tokens
        x2 = x.clone()
        x2[:, 70:] = (x2[:, 70:] + 1) % 512
        y2 = model(x2)
    assert torch.allclose(y[:, :70], y2[:, :70], atol=TOL, rtol=0)
    assert not torch.allclose(y[:, 70:], y2[:, 70:], atol=1e-3)


@pytest.mark.parametrize(
    "name,extra,T",
    [
        ("s2", dict(vert_stride=1), 100),  # every block is on every head's stride
        ("sink_window", {}, 24),  # the sink and the window reach back to token 0
        ("infllm2", {}, 20),  # below dense_len
        ("infllm2", dict(dense_len=0, topk=13), 100),  # top-k covers every block
    ],
)
def test_dense_when_the_pattern_covers_everything(name, extra, T):
    model = sparse_model(name, **extra)
    dense = Transformer(model.cfg.replace(methods={}))
    dense.load_state_dict(model.state_dict())
    x = ids(2, T)
    with torch.no_grad():
        assert torch.equal(model(x), dense(x))  # bit for bit: the baseline's attention runs


def test_infllm2_below_dense_len_reads_everything_then_topk():
    attn = sparse_model("infllm2", dense_len=40).layers[0].self_attn
    q, k, _ = qkv(attn, 100, B=1)
    with torch.no_grad():
        sel = attn.select(q, torch.arange(100).unsqueeze(0), 13, attn.means(k))  # (1, K, T, NB)
    n = sel.sum(-1)
    blocks = torch.arange(100) // 8 + 1
    assert torch.equal(n[0, :, :40], blocks[:40].expand(2, -1))  # dense below dense_len
    assert (n[0, :, 40:] <= 5).all() and (n[0, :, 40:] == torch.minimum(blocks[40:], torch.tensor(5))).all()
    assert sel[0, :, 40:, 0].all()  # the sink block is always read
    qb = torch.arange(40, 100) // 8
    assert sel[0, :, torch.arange(40, 100), qb].all() and sel[0, :, torch.arange(40, 100), qb - 1].all()  # local


def test_s2_heads_shard_the_context():
    """Every past block is read by some KV head when step = 1 and K >= vert_stride; with a larger stride only the
    residues h * step are covered (DKernel's rule)."""
    for name, covered in (("s2", True), ("s2_partial", False)):
        attn = sparse_model(name).layers[0].self_attn
        qb, kb = torch.tensor(12).view(1, 1, 1), torch.arange(13).view(1, 1, 13)
        ok = attn.static(qb, kb)[:, 0]  # (K, NB) for the last query block
        assert not ok.all(-1).any()  # no single head reads everything
        assert bool(ok.any(0).all()) == covered
        if not covered:  # stride 4, 2 KV heads, step 2: residues 0 and 2 of the distant blocks
            far = ok.any(0)[:11]
            assert far.tolist() == [(j % 2 == 0) for j in range(11)]


@pytest.mark.parametrize("name", PATTERNS)
def test_cached_decode_and_chunked_prefill_equal_full_forward(name):
    model = sparse_model(name)
    x = ids(2, 100, seed=1)
    with torch.no_grad():
        full = model(x)
        model.setup_caches(2, 128)
        try:
            parts = [model(x[:, :40]), model(x[:, 40:70], start=40)]  # a prefill, then a chunk on the cache
            parts += [model(x[:, t : t + 1], start=t) for t in range(70, 100)]
        finally:
            model.reset_caches()
    assert torch.allclose(torch.cat(parts, 1), full, atol=TOL, rtol=0)


@pytest.mark.parametrize("name", PATTERNS)
def test_padded_batch_decodes_each_row_as_alone(name):
    model = sparse_model(name)
    prompts = [ids(1, 30, seed=3)[0].tolist(), ids(1, 57, seed=4)[0].tolist()]
    extra = [ids(1, 12, seed=10 + r)[0].tolist() for r in range(2)]
    P = 57
    prefill, decoded = decode_padded(model, prompts, extra)
    with torch.no_grad():
        for r, p in enumerate(prompts):
            ref = model(torch.tensor([p + extra[r]]))[0]
            assert torch.allclose(prefill[r, P - len(p) :], ref[: len(p)], atol=TOL, rtol=0)
            assert torch.allclose(decoded[r], ref[len(p) :], atol=TOL, rtol=0)


def test_batched_greedy_equals_batch_one():
    model = sparse_model("s2")
    prompts = [ids(1, 33, seed=6)[0].tolist(), ids(1, 50, seed=7)[0].tolist()]
    batched = generate(model, prompts, max_new_tokens=20)
    for r, p in enumerate(prompts):
        assert batched.tokens[r] == generate(model, [p], max_new_tokens=20).tokens[0]


def test_kv_caches_are_bounded_by_the_pattern():
    """sink_window and s2 layers hold sink + window (+ the head's strided blocks); full layers grow with the context."""

    def cache_bytes(model: Transformer, max_len: int) -> list[int]:
        model.setup_caches(1, max_len)
        out = [sum(b.numel() * b.element_size() for b in c.buffers()) for c in model.caches]
        model.reset_caches()
        return out

    sw = sparse_model("sink_window", schedule=[0])
    small, big = cache_bytes(sw, 64), cache_bytes(sw, 256)
    assert isinstance(sw.layers[0].self_attn, SparseAttention) and not isinstance(
        sw.layers[1].self_attn, SparseAttention
    )
    assert small[0] == big[0]  # the sparse layer: independent of the context
    assert big[1] == 4 * small[1]  # the full layer grows with it
    s2 = sparse_model("s2")
    a, b = cache_bytes(s2, 64), cache_bytes(s2, 256)
    assert a[0] < b[0] < 0.75 * cache_bytes(Transformer(s2.cfg.replace(methods={})), 256)[0]


def test_ring_buffer_holds_only_the_window():
    model = sparse_model("sink_window")
    x = ids(1, 90, seed=2)
    with torch.no_grad():
        model.setup_caches(1, 128)
        model(x)
        cache = model.caches[0]
        assert isinstance(cache, SparseCache)
        kept = sorted(p for p in cache.kpos[0, 0].tolist() if p >= 0)
        model.reset_caches()
    assert kept == list(range(8)) + list(range(90 - 16, 90))  # the sink block and the last 16 positions


def test_schedules():
    assert sparse_layers("longgen", 2, 6) == [0, 1, 4, 5]
    assert sparse_layers("longgen", 2, 24) == [0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23]
    for n in range(1, 31):
        layers = sparse_layers("longgen", 2, n)
        full = [i for i in range(n) if i not in layers]
        assert len(full) == round(n / 3)
        assert not full or (full[0] - 0) - (n - 1 - full[-1]) in (-1, 0, 1)  # the middle third
    assert sparse_layers("every_n", 2, 6) == [0, 2, 4]
    assert sparse_layers("every_n", 3, 6) == [0, 1, 3, 4]
    assert sparse_layers([3, 1], 2, 6) == [1, 3]
    assert sparse_layers("all", 2, 3) == [0, 1, 2]


def test_gradients_reach_every_parameter():
    model = sparse_model("infllm2").train()
    x = ids(2, 100, seed=5)
    loss = torch.nn.functional.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_flops_count_only_the_keys_read():
    dense = Transformer(preset("tiny"))
    sw = sparse_model("sink_window")
    assert sw.flops("decode", 200) < dense.flops("decode", 200)
    assert sw.flops("decode", 200) == sw.flops("decode", 1000)  # a decode step reads sink + window at most
    assert sw.flops("prefill", 16) == dense.flops("prefill", 16)  # covered: dense
    cfg = sw.cfg
    attn_dense = 4 * cfg.n_heads * cfg.head_dim * 200 * cfg.n_layers
    attn_sparse = 4 * cfg.n_heads * cfg.head_dim * 24 * cfg.n_layers
    assert dense.flops("decode", 200) - sw.flops("decode", 200) == pytest.approx(attn_dense - attn_sparse)


@pytest.mark.parametrize(
    "section,msg",
    [
        (dict(block=16, window=40), "window: must be a multiple of block"),
        (dict(schedule=[0, 5]), "schedule: layer 5 does not exist"),
        (dict(window=0), "window: must be a positive integer: a query reads at least its own block"),
        (dict(pattern="infllm2", topk=40), "topk x block exceeds the model's context"),
        (dict(window=256, sink=64), "exceed the model's context"),
        (dict(pattern="infllm2", window=32, sink=16, topk=2, block=8), "topk: must cover the sink and local blocks"),
        (dict(pattern="dense"), "pattern: must be one of"),
        (dict(schedule="thirds"), "schedule: must be a list of layers or one of"),
    ],
)
def test_bad_configs_are_one_line_errors(section, msg):
    with pytest.raises(LeanLMError, match=msg):
        preset("tiny", attention={"block": 8, "window": 16, "sink": 8, **section})


@pytest.mark.parametrize("lengths", [(70,), (41, 66)])
def test_composes_with_subllm(lengths):
    """LongGen's layout under SUBLLM: the outer (full-sequence) layers sparse, the subsampled middle ones full;
    batched cached decoding equals the full forward of each row."""
    torch.manual_seed(1)
    attn = dict(PATTERNS["sink_window"], schedule=[0, 4])
    cfg = preset("tiny", n_layers=5, subllm={"structure": "T(T(T)T)T"}, attention=attn)
    m = build_model(cfg).init_weights(0).eval()
    with torch.no_grad():
        for st in m.stages:
            st.scorer.weight.mul_(50.0)  # the threshold drops a good share of the tokens
    assert [type(b.self_attn).__name__ for b in m.layers] == ["SparseAttention"] + ["Attention"] * 3 + [
        "SparseAttention"
    ]
    prompts = [torch.randint(0, 512, (n,)).tolist() for n in lengths]
    new = [torch.randint(0, 512, (12,)).tolist() for _ in lengths]
    m.setup_caches(len(lengths), max(lengths) + 12)
    assert isinstance(m.caches[0], SparseCache) and not isinstance(m.caches[2], SparseCache)
    m.reset_caches()
    prefill, decoded = decode_padded(m, prompts, [n[:11] for n in new])
    steps = torch.cat([prefill[:, -1:], decoded], 1)  # (B, 12, V): the prompt's last position, then 11 steps
    with torch.no_grad():
        for r, (p, n) in enumerate(zip(prompts, new)):
            full = m(torch.tensor([p + n]))[0, len(p) - 1 : len(p) + 11]
            assert (full - steps[r]).abs().max() <= TOL


def test_sparse_layer_inside_a_subsampled_stage():
    """A sparse layer that SUBLLM subsamples reads its pattern on the kept tokens' original positions (the masked
    path); its cached decoding is refused in one line (the stage's cache is keyed by slot, not by position)."""
    torch.manual_seed(2)
    cfg = preset("tiny", n_layers=3, subllm={"structure": "T(T)T"}, attention=dict(PATTERNS["s2"], schedule=[1]))
    m = build_model(cfg).init_weights(0).eval()
    with torch.no_grad():
        for st in m.stages:
            st.scorer.weight.mul_(50.0)
        x = ids(1, 90)
        y = m(x)
        x2 = x.clone()
        x2[:, 60:] = (x2[:, 60:] + 1) % 512
        assert torch.allclose(y[:, :60], m(x2)[:, :60], atol=TOL, rtol=0)  # causal on original positions
        m.setup_caches(1, 100)
        with pytest.raises(LeanLMError, match="another method's KV cache"):
            m(x)
        m.reset_caches()


@pytest.mark.skipif(shutil.which("c++") is None or not is_ninja_available(), reason="the C++ kernels need c++, ninja")
def test_fused_kernels_keep_the_full_layers_and_decode_the_same():
    """With --kernel cpp the full layers decode through the fused C++ ops and the sparse ones through PyTorch: the
    same greedy tokens as the PyTorch path."""
    model = sparse_model("sink_window", schedule=[1])
    prompts = [ids(1, 60, seed=9)[0].tolist()]
    assert generate(model, prompts, 30).tokens == generate(model, prompts, 30, kernel="cpp").tokens


def test_bad_attention_settings_on_the_command_line_are_one_line(capsys):
    for sets in (["model.attention.block=16", "model.attention.window=40"], ["model.attention.schedule=[0, 9]"]):
        argv = ["eval", "-m", "tiny", "--data", "wikitext-2", "--max-windows", "1", "--seq-len", "64"]
        assert main([*argv, *(a for s in sets for a in ("--set", s))]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("leanlm: error: model.attention.")


@pytest.mark.slow
def test_smollm2_post_hoc_longgen_layout(smollm2):
    """SmolLM2 with LongGen's layout switched on at load (no weight changes): cached decoding equals the full
    forward, and on real text the pattern costs little at 600 tokens (sink 64 + window 256 in 20 of 30 layers)."""
    model, tok = smollm2
    attn = {"pattern": "sink_window", "block": 64, "sink": 64, "window": 256, "schedule": "longgen"}
    cfg = model.cfg.replace(methods={"attention": SparseConfig(**attn)})  # validated: the sparse layers derived
    sparse = build_model(cfg)
    sparse.load_state_dict(model.state_dict())
    sparse.eval()
    ids_ = torch.tensor([tok.encode(text_file("wikitext-2").read_text(encoding="utf-8")[:6000])[:600]])
    with torch.no_grad():
        full = sparse(ids_)
        sparse.setup_caches(1, 640)
        parts = [sparse(ids_[:, :560])] + [sparse(ids_[:, t : t + 1], start=t) for t in range(560, 600)]
        sparse.reset_caches()
        assert (torch.cat(parts, 1) - full).abs().max() < 1e-3
        nll = [torch.nn.functional.cross_entropy(m(ids_)[0, :-1], ids_[0, 1:]).item() for m in (model, sparse)]
    assert nll[1] < nll[0] + 0.1  # nats
