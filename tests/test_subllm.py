"""SUBLLM: the structure string, selection rules, upsampling/bypass, positions, caches, balancer, training, errors."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import decode_padded

from leanlm.checkpoint import load_checkpoint, load_model, save_checkpoint
from leanlm.cli import main
from leanlm.config import preset
from leanlm.errors import LeanLMError
from leanlm.generate import generate, pad_batch
from leanlm.methods import add_methods, build_model
from leanlm.methods.subllm import SubLLM, balance, balancer_bounds, calibrate_thresholds, topk_length
from leanlm.model import Transformer


def subllm(structure: str = "T(T(T)T)T", seed: int = 0, sharpen: float = 50.0, **over) -> Transformer:
    """A tiny SUBLLM whose scorers are scaled up so that the threshold drops a good share of the tokens."""
    cfg = preset("tiny", n_layers=structure.count("T"), subllm={"structure": structure, **over})
    model = build_model(cfg).init_weights(seed)
    with torch.no_grad():
        for st in model.stages:
            st.scorer.weight.mul_(sharpen)
    return model


def method(model: Transformer) -> SubLLM:
    """The model's SUBLLM method object (also its token router)."""
    sub = model.methods[0]
    assert isinstance(sub, SubLLM) and model.router is sub
    return sub


def test_structure_parsing_and_lengths():
    sub = method(build_model(preset("tiny", n_layers=5, subllm={"structure": "T(T(T)T)T"})))
    # stage 0 opens before block 1, stage 1 before block 2; stage 1 closes after block 2, stage 0 after block 3
    assert sub.opens == [[], [0], [1], [], []] and sub.closes == [[], [], [1], [0], []]
    assert sub.stage_of_layer == [-1, 0, 1, 0, -1] and sub.parent == [-1, 0] and sub.stage_layers == [[1, 3], [2]]
    # stages opening (closing) at the same place: outermost (innermost) first
    sub = method(build_model(preset("tiny", n_layers=3, subllm={"structure": "((T)T(T))"})))
    assert sub.opens == [[0, 1], [], [2]] and sub.closes == [[1], [], [2, 0]]
    assert sub.stage_of_layer == [1, 0, 2] and sub.parent == [-1, 0, 0] and sub.stage_layers == [[1], [0], [2]]
    # the paper's lengths (icefall's rule, df = 1/0.64): 2048 -> 1311 -> 839, 4096 -> 2621 -> 1677, 8192 -> 5243
    assert [topk_length(n, 0.64) for n in (2048, 1311, 4096, 2621, 8192)] == [1311, 839, 2621, 1677, 5243]
    m = build_model(preset("subllm-cpu-24l"))
    sub = method(m)
    depth = [0 if st < 0 else 1 + (sub.parent[st] >= 0) for st in sub.stage_of_layer]  # stages enclosing a block
    assert depth == [0] * 5 + [1] * 5 + [2] * 4 + [1] * 5 + [0] * 5
    assert sub.stage_of_layer == [-1] * 5 + [0] * 5 + [1] * 4 + [0] * 5 + [-1] * 5
    assert sub.stage_lengths(4096) == [2621, 1677] and sub.parent == [-1, 0]


def test_without_parentheses_is_the_baseline_bit_for_bit():
    cfg = preset("tiny", n_layers=3)
    dense = Transformer(cfg).init_weights(0)
    section = preset("tiny", n_layers=3, subllm={"structure": "TTT"}).methods["subllm"]
    sub = build_model(cfg.replace(methods={"subllm": section}))
    sub.init_weights(0)
    x = torch.randint(0, 512, (2, 40))
    for mode in (True, False):
        dense.train(mode), sub.train(mode)
        assert torch.equal(dense(x), sub(x))
    assert sub.flops("train", 40) == dense.flops("train", 40)
    # with stages the backbone is initialised exactly like the dense twin's (same seed)
    staged = subllm("T(T)T", sharpen=1.0)
    for k, v in Transformer(staged.cfg.replace(methods={})).init_weights(0).state_dict().items():
        assert torch.equal(v, staged.state_dict()[k]), k


def test_decode_flops_cost_one_step_at_its_context_and_retention():
    """A decode step attends to every cached key; a SUBLLM step enters stage j with the product of the decoded
    tokens' retention (the decode counters) and its layers attend to the context times the product of the caches'
    retention (the prefill counters; without them the decode counters)."""
    m = subllm("T(T(T)T)T")
    sub = method(m)
    cfg, C = m.cfg, m.cfg.dim
    dense = Transformer(cfg.replace(methods={}))
    one = Transformer(cfg.replace(methods={}, n_layers=1))
    head = 2 * C * cfg.vocab_size
    layer = lambda n: one.flops("decode", n) - head  # noqa: E731
    assert dense.flops("decode", 100) == pytest.approx(head + 5 * layer(100))
    assert dense.flops("decode", 100) > dense.flops("prefill", 100)  # a causal pass averages 50.5 keys per token
    scorers = 2 * C * (1 + 0.5)
    want = head + 2 * layer(100) + 0.5 * 2 * layer(100 * 0.8) + 0.5 * 0.25 * layer(100 * 0.8 * 0.4) + scorers
    sub.counts["decode"] = np.array([[50.0, 100.0], [5.0, 20.0]])  # (kept, seen) per stage: 0.5, 0.25
    sub.counts["prefill"] = np.array([[80.0, 100.0], [32.0, 80.0]])  # 0.8, 0.4
    assert sub.retention("decode") == [0.5, 0.25] and sub.retention("prefill") == [0.8, 0.4]
    assert m.flops("decode", 100) == pytest.approx(want)
    sub.reset_stats(m)
    assert sub.retention("decode") is None and sub.retention("prefill") is None
    sub.counts["decode"] = np.array([[7.0, 7.0], [7.0, 7.0]])  # every decoded token kept, no prefill measured
    assert m.flops("decode", 100) == pytest.approx(dense.flops("decode", 100) + 2 * C * 2)
    sub.reset_stats(m)  # nothing measured: `keep` for both
    k = cfg.methods["subllm"].keep
    want = head + 2 * layer(100) + k * 2 * layer(100 * k) + k * k * layer(100 * k * k) + 2 * C * (1 + k)
    assert m.flops("decode", 100) == pytest.approx(want)


def test_flops_match_a_hand_count():
    """Executed FLOPs per token counted by hand: each block costs 2 per weight plus 4*H*D per attended key for every
    token it runs, a causal pass over n tokens attends to (n+1)/2 keys on average, a scorer costs 2*C per token of
    its enclosing level, the lm head 2*C*V per token; train = 3x the forward over the top-k lengths, prefill the
    forward over the lengths the thresholds kept (measured)."""
    m = subllm("T(T(T)T)T", sharpen=50.0)
    sub = method(m)
    C, V, H, K, D, F_ = 64, 512, 4, 2, 16, 160  # the tiny preset
    assert (m.cfg.dim, m.cfg.vocab_size, m.cfg.n_heads, m.cfg.n_kv_heads, m.cfg.head_dim, m.cfg.ffn_dim) == (
        C, V, H, K, D, F_
    )  # fmt: skip
    weights = C * (H + 2 * K) * D + H * D * C + C * 2 * F_ + F_ * C  # qkv, o, gate_up, down
    block = m.layers[0]
    assert weights == sum(p.numel() for n, p in block.named_parameters() if "norm" not in n)

    def per_token(lengths: list[float], T: int) -> float:
        """lengths: tokens at each block's level; the scorers run on the levels of blocks 0 and 1 (T and stage 0)."""
        total = sum(n * (2 * weights + 4 * H * D * (n + 1) / 2) for n in lengths)
        total += 2 * C * (lengths[0] + lengths[1]) + 2 * C * V * T
        return total / T

    T, df = 64, 1 / 0.64
    k1 = int((T + df - 1) // df)
    k2 = int((k1 + df - 1) // df)
    assert (k1, k2) == (41, 26)
    ran: list[int] = []
    hooks = [b.register_forward_hook(lambda mod, args, out: ran.append(out.shape[1])) for b in m.layers]
    x = torch.randint(0, 512, (1, T), generator=torch.Generator().manual_seed(0))
    m.train()
    with torch.no_grad():
        m(x)
    assert ran == [T, k1, k2, k1, T]  # what a training forward runs
    assert m.flops("train", T) == pytest.approx(3 * per_token([T, k1, k2, k1, T], T), rel=1e-12)
    # prefill: the kept fractions measured in an eval forward; with one row they are the exact kept counts
    m.eval()
    ran.clear()
    sub.reset_stats(m)
    with torch.no_grad():
        m(x)
    for h in hooks:
        h.remove()
    n0, n1, n2 = ran[0], ran[1], ran[2]
    assert n0 == T and 0 < n2 < n1 < T and ran == [T, n1, n2, n1, T]  # the thresholds dropped tokens at both stages
    assert sub.counts["prefill"].tolist() == [[n1, T], [n2, n1]] and sub.retention("decode") is None
    assert m.flops("prefill", T) == pytest.approx(per_token([T, n1, n2, n1, T], T), rel=1e-12)
    # a threshold that keeps everything: every block runs on all T tokens, plus the two scorers
    sub.set_config(m, threshold=-1e9)
    sub.reset_stats(m)
    with torch.no_grad():
        m(x)
    assert sub.retention("prefill") == [1.0, 1.0]
    assert m.flops("prefill", T) == pytest.approx(per_token([T] * 5, T), rel=1e-12)


def test_training_selection_upsampling_bypass_and_positions():
    """One stage around one block, top-k: the output is x + b*w*(y - x) on kept tokens, exactly x on dropped ones,
    where y is the block run on the kept tokens at their original RoPE positions; weights follow the paired rule."""
    torch.manual_seed(0)
    m = subllm("(T)", sharpen=20.0)
    m.train()
    x_ids = torch.randint(0, 512, (2, 30))
    seen = {}
    m.norm.register_forward_pre_hook(lambda mod, args: seen.setdefault("out", args[0]))
    with torch.no_grad():
        m(x_ids)
        x = m.embed_tokens(x_ids)
        s = m.stages[0].scorer(x).squeeze(-1)
    k = topk_length(30, 0.64)
    top = s.topk(k, dim=1).indices.sort(dim=1).values  # (B, k) kept, original order
    out = seen["out"]
    dropped = torch.ones(2, 30, dtype=torch.bool)
    dropped.scatter_(1, top, False)
    assert torch.equal(out[dropped], x[dropped])  # dropped tokens pass the segment unchanged
    xg = x.gather(1, top.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
    cos, sin = m.rope(top, x.dtype)  # original absolute positions
    with torch.no_grad():
        y = m.layers[0](xg, cos, sin)
    got = out.gather(1, top.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
    b = m.stages[0].bypass_scale
    # w = clamp(kept) - clamp(paired discarded): recover it per token from the output and check the rule's range
    w = ((got - xg) / (b * (y - xg))).median(dim=-1).values  # (B, k)
    assert torch.allclose(got, xg + b * w.unsqueeze(-1) * (y - xg), atol=1e-5)
    assert (w >= -1e-5).all() and (w <= 1 + 1e-5).all()
    s_sorted = s.sort(dim=1, descending=True).values.clamp(0, 1)
    disc = s_sorted[:, k:]
    disc = torch.cat((disc, disc.new_zeros(2, 2 * k - 30)), dim=1)
    kept_desc = s_sorted[:, :k]
    w_desc = w.gather(1, s.gather(1, top).argsort(dim=1, descending=True))
    assert torch.allclose(w_desc, kept_desc - disc, atol=1e-4) or torch.allclose(
        w_desc, kept_desc - disc.flip(1), atol=1e-4
    )


def test_threshold_selection_is_causal():
    m = subllm().eval()
    x = torch.randint(0, 512, (2, 48))
    with torch.no_grad():
        a = m(x)
        for j in (5, 20, 47):
            x2 = x.clone()
            x2[:, j] = (x2[:, j] + 7) % 512
            b = m(x2)
            assert (a[:, :j] - b[:, :j]).abs().max() <= 1e-5
    kept = method(m).retention("prefill")
    assert 0.1 < kept[0] < 0.9 and 0.05 < kept[1] < 0.95  # the test drops tokens at both stages


@pytest.mark.parametrize("lengths", [(37,), (9, 31, 20)])
def test_cached_decode_equals_full_forward(lengths):
    torch.manual_seed(1)
    m = subllm().eval()
    prompts = [torch.randint(0, 512, (n,)).tolist() for n in lengths]
    new = [torch.randint(0, 512, (12,)).tolist() for _ in lengths]
    B = len(lengths)
    prefill, decoded = decode_padded(m, prompts, [n[:11] for n in new])
    steps = torch.cat([prefill[:, -1:], decoded], 1)  # (B, 12, V): the prompt's last position, then 11 steps
    with torch.no_grad():
        sub = method(m)
        assert sub.retention("decode") is not None and sub.counts["decode"][0, 1] == 11 * B  # one token per row
        sub.reset_stats(m)
        for r, (p, n) in enumerate(zip(prompts, new)):
            full = m(torch.tensor([p + n]))[0, len(p) - 1 : len(p) + 11]
            assert (full - steps[r]).abs().max() <= 1e-4
    assert 0.1 < sub.retention("prefill")[0] < 0.9 and sub.retention("decode") is None


def test_stage_caches_start_at_their_share_and_grow_exactly():
    """Stage caches are allocated for `keep` of what reaches them (+ 64 slots) and grow when a stage keeps more:
    here a threshold that keeps every token, prefilled in chunks, then decoded; logits equal one full forward."""
    torch.manual_seed(2)
    m = subllm("T(T(T)T)T", threshold=-1e9).eval()
    x = torch.randint(0, 512, (1, 256))
    with torch.no_grad():
        m.setup_caches(1, 256)
        stage1, stage2 = m.caches[1], m.caches[2]
        assert stage1.k.shape[2] == math.ceil(256 * 0.64) + 64 and stage2.k.shape[2] == math.ceil(256 * 0.64**2) + 64
        got = [m(x[:, s : s + 80], start=s) for s in (0, 80, 160)]  # the third chunk grows both stages' caches
        got += [m(x[:, s : s + 1], start=s) for s in range(240, 256)]
        assert stage1.k.shape[2] == stage2.k.shape[2] == 256  # grown, capped at max_len
        m.reset_caches()
        assert (torch.cat(got, 1) - m(x)).abs().max() <= 1e-4
    assert method(m).retention("prefill") == method(m).retention("decode") == [1.0, 1.0]
    # rows of different lengths write at per-row slots: growth on that path keeps each row exact too
    prompts = [x[0, :200].tolist(), x[0, 50:200].tolist()]
    batch = pad_batch(prompts, 250)
    with torch.no_grad():
        m.setup_caches(2, 250)
        logits = m(batch.idx, pos=batch.pos[:, :200], start=0, mask=batch.prefill_mask)
        assert m.caches[1].k.shape[2] == math.ceil(250 * 0.64) + 64 == 224
        for s in range(200, 249):  # the rows' stage caches pass 224 slots at s = 223 (row 0)
            tok = logits[:, -1:].argmax(-1)  # (2, 1)
            logits = m(tok, pos=batch.pos[:, s : s + 1], start=s, mask=batch.key_ok[..., : s + 1])
            for r, p in enumerate(prompts):
                prompts[r] = p + [int(tok[r])]
        assert m.caches[1].k.shape[2] == 250
        m.reset_caches()
        for r, p in enumerate(prompts):
            assert (m(torch.tensor([p]))[0, -1] - logits[r, -1]).abs().max() <= 1e-4


def test_batched_generation_is_exact_per_row():
    m = subllm().eval()
    prompts = [torch.randint(0, 512, (n,)).tolist() for n in (6, 23, 14)]
    together = generate(m, prompts, 10).tokens
    assert together == [generate(m, [p], 10).tokens[0] for p in prompts]
    # each subsampled layer cached only its own tokens: stage caches hold fewer rows' tokens than the full layers
    assert m.caches is None


def test_scorer_and_bypass_receive_gradients():
    m = subllm("T(T(T)T)T", sharpen=5.0).train()
    x = torch.randint(0, 512, (2, 40))
    F.cross_entropy(m(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten()).backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_balancer_moves_scores_into_its_band():
    """Scores that are all positive (mis-calibrated): with only the balancer's gradient, the positive fraction and
    the RMS move into [keep - band, keep + band] and [1.2533 min_abs, 1.2533 max_abs]."""
    torch.manual_seed(0)
    sub = preset("tiny", n_layers=1, subllm={"structure": "(T)"}).methods["subllm"]
    m_min, m_max, r_min, r_max = balancer_bounds(sub)
    feats = torch.randn(4096, 8) + 3.0  # features with a large mean: a random scorer gives one-signed scores
    w = torch.nn.Parameter(torch.full((8,), 0.05))
    opt = torch.optim.Adam([w], lr=0.01)
    for _ in range(600):
        s = balance(feats @ w, (m_min, m_max, r_min, r_max), sub.balancer_grad_scale)
        # a task gradient of unit magnitude everywhere (the balancer scales its push by |g|), zero on average
        (s * (torch.randint(0, 2, s.shape) * 2 - 1).float()).sum().backward()
        opt.step()
        opt.zero_grad()
    s = (feats @ w).detach()
    frac = (s > 0).float().mean().item()
    assert sub.keep - sub.balancer_band - 0.02 <= frac <= sub.keep + sub.balancer_band + 0.02
    assert r_min * 0.95 <= s.square().mean().sqrt().item() <= r_max * 1.05


def test_training_runs_through_the_trainer_and_feeds_the_step(tmp_path, tiny_tokenizer, monkeypatch):
    from leanlm.data import prepare
    from leanlm.training import config_from_dict, train

    corpus = tmp_path / "c.txt"
    corpus.write_text(("def f(x):\n    return x + 1\n\n" * 200 + "The fox jumps. " * 300) * 2)
    prepare([str(corpus)], tmp_path / "data", tokenizer=None, vocab_size=300, progress=False)
    steps = []
    monkeypatch.setattr(SubLLM, "set_step", lambda self, model, step: steps.append(step))
    raw = {
        "model": {"preset": "tiny", "vocab_size": 300, "n_layers": 3,
                  "subllm": {"structure": "T(T)T", "calibrate": True}},
        "data": {"dir": str(tmp_path / "data")},
        "run": {"out": str(tmp_path / "run"), "steps": 4, "batch_size": 2, "seq_len": 32, "eval_every": 2,
                "eval_batches": 1, "save_every": 0, "log_every": 1, "progress": False},
    }  # fmt: skip
    res = train(config_from_dict(raw))
    assert steps == [0, 1, 2, 3]
    header = (tmp_path / "run" / "metrics.csv").read_text().splitlines()[0]
    assert "s1_pos_frac" in header and "s1_bypass_min" in header
    model, _ = load_model(res["checkpoint"])
    assert isinstance(method(model), SubLLM) and model.cfg.arch == "subllm"
    assert json.loads((tmp_path / "run/final/config.json").read_text())["arch"] == "subllm"
    threshold = model.cfg.methods["subllm"].threshold
    assert isinstance(threshold, list) and len(threshold) == 1  # calibrated, then saved
    assert method(model).cfg.threshold == threshold
    assert res["flops_per_token"] < Transformer(model.cfg.replace(methods={})).flops("train", 32)


def test_checkpoint_round_trip_and_arch_guards(tmp_path, tiny_tokenizer):
    m = subllm().eval()
    ck = save_checkpoint(m, None, tmp_path / "sub")
    loaded, _ = load_model(str(ck))
    x = torch.randint(0, 512, (1, 30))
    with torch.no_grad():
        assert torch.equal(loaded(x), m(x))
    # the counters live on the host even for a meta-built model
    assert method(loaded).retention("prefill") == method(m).retention("prefill") is not None
    assert isinstance(method(load_model("subllm-cpu-24l")[0]), SubLLM)  # presets build their method too (bench)
    with pytest.raises(LeanLMError, match="'subllm' checkpoint cannot be loaded as 'llama'"):
        load_checkpoint(ck, expect_arch="llama")
    from leanlm.hf import export_hf

    with pytest.raises(LeanLMError, match="only the dense baseline exports"):
        export_hf(loaded, None, tmp_path / "hf")
    dense = save_checkpoint(Transformer(preset("tiny", n_layers=5)).init_weights(0), None, tmp_path / "dense")
    with pytest.raises(LeanLMError, match="'llama' checkpoint cannot be loaded as 'subllm'"):
        load_checkpoint(dense, expect_arch="subllm")
    meta = json.loads((ck / "config.json").read_text())
    meta["model"]["subllm"] = None  # weights of a SUBLLM under a dense config
    (ck / "config.json").write_text(json.dumps({**meta, "arch": "llama"}))
    with pytest.raises(LeanLMError, match="unexpected 'stages.0"):
        load_model(str(ck))


def test_uptraining_keeps_the_backbone():
    dense = Transformer(preset("tiny", n_layers=5)).init_weights(3)
    cfg = preset("tiny", n_layers=5, subllm={"structure": "T(T(T)T)T"})
    sub = add_methods(dense, cfg, seed=0)
    assert isinstance(method(sub), SubLLM) and sub.cfg.arch == "subllm"
    for k, v in dense.state_dict().items():
        assert torch.equal(v, sub.state_dict()[k])
    assert (sub.stages[0].bypass_scale == 0.5).all()
    # the new stages are initialised as a fresh model's (SubLLM.init_weights with the conversion's seed)
    fresh = build_model(cfg).init_weights(0)
    for st, want in zip(sub.stages, fresh.stages):
        assert torch.equal(st.scorer.weight, want.scorer.weight)
    with pytest.raises(LeanLMError, match="backbone differs"):
        add_methods(dense, preset("tiny", n_layers=5, dim=32, subllm={"structure": "T(T(T)T)T"}))


@pytest.mark.parametrize(
    ("structure", "message"),
    [
        ("T(T(T)T", "1 unclosed '('"),
        ("T)T(T)TT", "unbalanced ')'"),
        ("T()TTT", "empty stage"),
        ("((TTT))", "empty stage"),
        ("T(T)T", "has 3 blocks but model.n_layers=5"),
        ("T(x)TTT", "string of T, ( and )"),
    ],
)
def test_malformed_structures(structure, message):
    with pytest.raises(LeanLMError, match=message.replace("(", r"\(").replace(")", r"\)")):
        preset("tiny", n_layers=5, subllm={"structure": structure})


def test_calibrated_thresholds_keep_the_ratio_per_stage():
    m = subllm("T(T(TT)T)T", sharpen=1.0)  # scores mostly in (-1, 1): v = 0 would keep about half
    batches = [torch.randint(0, 512, (4, 64), generator=torch.Generator().manual_seed(i)) for i in range(3)]
    sub = method(m)
    v = calibrate_thresholds(sub, batches)
    # set on the method and the model's config; training mode restored
    assert len(v) == 2 and m.cfg.methods["subllm"].threshold == v and sub.cfg.threshold == v and m.training
    assert sub.calibrate(m, batches) == {"subllm.threshold": v} and m.training  # the method's calibration step
    m.eval()
    sub.reset_stats(m)
    with torch.no_grad():
        for x in batches:
            m(x)
    assert sub.retention("prefill") == pytest.approx([0.64, 0.64], abs=0.01)
    with pytest.raises(LeanLMError, match="model.subllm.threshold: must be a number or a list of 2 numbers"):
        preset("tiny", n_layers=6, subllm={"structure": "T(T(TT)T)T", "threshold": [0.0]})


@pytest.mark.parametrize("keep", [0.0, 1.5, -0.2])
def test_keep_ratio_outside_unit_interval(keep):
    with pytest.raises(LeanLMError, match="model.subllm.keep: must be in"):
        preset("tiny", n_layers=3, subllm={"structure": "T(T)T", "keep": keep})


def test_cli_errors_are_one_line(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model: {preset: subllm-cpu-24l}\ndata: {inputs: [stdlib]}\n")
    rc = main(["train", "--config", str(cfg), "--set", "model.subllm.structure=TT(TT", "--json"])
    out = capsys.readouterr()
    assert rc == 2 and "model.subllm.structure" in json.loads(out.out.strip().splitlines()[-1])["error"]
    assert out.err.count("\n") == 1 and "Traceback" not in out.err
    rc = main(["train", "--config", str(cfg), "--set", "model.subllm.keep=2", "--json"])
    assert rc == 2 and "model.subllm.keep" in capsys.readouterr().err
    rc = main(["train", "--config", str(cfg), "--set", "model.subllm.calibrate=maybe", "--json"])
    assert rc == 2 and "model.subllm.calibrate: expected bool" in capsys.readouterr().err


def test_bench_text_errors_are_one_line(tmp_path, capsys):
    from leanlm.data import prepare

    bench = ["bench", "--model", "tiny", "--what", "prefill", "--prompt-len", "8", "--repeats", "1"]
    rc = main([*bench, "--text", str(tmp_path / "missing")])
    err = capsys.readouterr().err
    assert rc == 2 and "not a prepared data directory" in err and err.count("\n") == 1
    corpus = tmp_path / "c.txt"
    corpus.write_text(" ".join(f"w{i * 7919 % 100003}" for i in range(20000)))  # varied: the BPE fills its vocab
    prepare([str(corpus)], tmp_path / "data", tokenizer=None, vocab_size=1024, progress=False)
    rc = main([*bench, "--text", str(tmp_path / "data")])  # 1024 token ids for the tiny model's 512
    err = capsys.readouterr().err
    assert rc == 2 and "but the model has 512" in err and err.count("\n") == 1


def test_decode_benchmark_prompt_errors_are_one_line(tmp_path):
    """benchmarks/subllm_decode.py: --prompts below 1, or more prompts than the validation split holds, fail in one
    line naming the problem."""
    import subprocess
    import sys
    from pathlib import Path

    from leanlm.data import prepare

    corpus = tmp_path / "c.txt"
    corpus.write_text(" ".join(f"w{i * 7919 % 100003}" for i in range(20000)))
    prepare([str(corpus)], tmp_path / "data", tokenizer=None, vocab_size=512, progress=False)
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "subllm_decode.py"
    for prompts, message in (("0", "--prompts must be at least 1"), ("100000", "validation tokens")):
        cmd = [sys.executable, str(script), "tiny", "tiny", "--data", str(tmp_path / "data"), "--prompts", prompts]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        assert r.returncode != 0 and r.stderr.count("\n") == 1 and message in r.stderr, r.stderr
