"""LTE on tiny random models: grouping/permutation, soft and hard routing against dense references, the sparse
decode FFN, router gradients per stage, training end to end, SUBLLM composition, conversion with fitted routers and
refit down projections (`leanlm convert`), executed-FLOP counts (the union of experts in a prefill) and bad input."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from torch.utils.cpp_extension import is_ninja_available

from leanlm.checkpoint import load_model, save_checkpoint
from leanlm.cli import main
from leanlm.cluster import balanced_kmeans
from leanlm.config import preset, read_yaml
from leanlm.data import calibration_windows
from leanlm.errors import LeanLMError
from leanlm.generate import generate
from leanlm.kernels import decode_layout
from leanlm.methods import add_methods, build_model
from leanlm.methods.lte import (
    LTEMLP,
    LTEConfig,
    activation_grouping,
    ffn_inputs,
    group_mlp,
    lte_layers,
    refit_down,
    set_magnitude_routing,
)
from leanlm.model import Transformer
from leanlm.training import config_from_dict, train

CFG = dict(dim=64, ffn_dim=128)  # 4 experts of 32


pytestmark = pytest.mark.usefixtures("one_thread")


def dense_model(**kw) -> Transformer:
    torch.manual_seed(0)
    return Transformer(preset("tiny", **{**CFG, **kw})).init_weights(seed=0).eval()


def with_lte(cfg, **lte):
    """`cfg` with an LTE section (replacing any it has)."""
    return cfg.replace(methods={**cfg.methods, "lte": LTEConfig(**lte)})


def to_lte(dense: Transformer, **lte) -> Transformer:
    return add_methods(dense, with_lte(dense.cfg, **lte)).eval()


def lte_of(model: Transformer):
    """The model's LTE method object (aux_loss, train_metrics, report, reset_stats)."""
    return next(m for m in model.methods if m.name == "lte")


def lte_cfg(model: Transformer) -> LTEConfig:
    return model.cfg.methods["lte"]


def set_routers(model, offset: float | None = None, std: float = 0.0, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lte_layers(model):
            m.router.weight.copy_(torch.randn(m.router.weight.shape, generator=gen) * std)
            if offset is not None:
                m.router_offset.fill_(offset)


def masked_dense_mlp(dense_mlp, mlp: LTEMLP, x, on):
    """Reference: the original (unpermuted) dense MLP with neuron j kept iff its expert is on."""
    Fd = mlp.n * mlp.E
    keep = on.repeat_interleave(mlp.E, dim=-1).float()  # (..., F) in permuted order
    keep_orig = torch.zeros_like(keep)
    keep_orig[..., mlp.grouping] = keep  # position j holds original neuron grouping[j]
    gate, up = dense_mlp.gate_up_proj(x).split(Fd, dim=-1)
    return dense_mlp.down_proj(F.silu(gate) * up * keep_orig)


def test_balanced_kmeans_equal_sizes_and_grouping_is_a_permutation():
    x = torch.randn(96, 16)
    assign = balanced_kmeans(x, 3, iters=5)
    assert torch.bincount(assign, minlength=3).tolist() == [32, 32, 32]
    lte = to_lte(dense_model())
    for m in lte_layers(lte):
        assert sorted(m.grouping.tolist()) == list(range(128)) and not torch.equal(m.grouping, torch.arange(128))


def test_centroid_router_init():
    lte = add_methods(dense_model(), with_lte(dense_model().cfg, router_init="centroid", router_init_std=2.0))
    for m in lte_layers(lte):
        torch.testing.assert_close(m.router.weight.norm(dim=1), torch.full((m.n,), 2.0))
        gate = F.normalize(m.gate_up_proj.weight.view(m.n, 2, m.E, -1)[:, 0], dim=-1).mean(1)  # (n, C)
        assert (F.cosine_similarity(m.router.weight, gate, dim=1) > 0.999).all()


def test_permutation_equivalence():
    dense = dense_model()
    lte = to_lte(dense)
    set_routers(lte, offset=30.0)  # every expert on: the permuted model must be the dense one
    x = torch.randint(0, 512, (2, 12))
    torch.testing.assert_close(lte(x), dense(x), atol=1e-5, rtol=1e-5)
    for d, m in zip(dense.layers, lte.layers):
        h = torch.randn(2, 5, 64)
        on = torch.ones(2, 5, m.mlp.n, dtype=torch.bool)
        torch.testing.assert_close(m.mlp.infer(h, on), d.mlp(h), atol=1e-5, rtol=1e-5)


def test_permutation_equivalence_with_a_given_grouping():
    # group_mlp with another rule's assignment (the probe's grouping by activations): that partition is stored and
    # the function is unchanged
    dense = dense_model()
    lte = to_lte(dense)
    set_routers(lte, offset=30.0)
    for i, (d, m) in enumerate(zip(dense.layers, lte_layers(lte))):
        assign = torch.randperm(128, generator=torch.Generator().manual_seed(i)) % 4  # 4 experts of 32
        m.load_state_dict({**m.state_dict(), **group_mlp(d.mlp, m.lte, i, assign)})
        assert all(assign[m.grouping[e * 32 : (e + 1) * 32]].unique().numel() == 1 for e in range(4))
    x = torch.randint(0, 512, (2, 12))
    torch.testing.assert_close(lte(x), dense(x), atol=1e-5, rtol=1e-5)


def test_grouping_by_activations_bands_and_keeps_the_function():
    # experts of 8: 16 experts in two magnitude bands of 8; every neuron of the first band's experts has a smaller
    # mean share of |h| than any neuron of the second's; the stored partition is that one; all experts on = dense
    dense = dense_model()
    rows = calibration_windows(np.random.default_rng(0).integers(0, 512, 10_000), 16, dense.cfg.max_seq_len)
    assert rows.shape == (16, 256)  # 16 windows of the tiny model's max_seq_len
    lte = add_methods(dense, with_lte(dense.cfg, expert_size=8, grouping="activations"), calibration=rows)
    kmeans = add_methods(dense, with_lte(dense.cfg, expert_size=8))
    assert lte_cfg(lte).grouping == "activations"
    inputs = []
    hooks = [b.mlp.register_forward_pre_hook(lambda m, a: inputs.append(a[0].flatten(0, 1))) for b in dense.layers]
    with torch.no_grad():
        dense(rows)
    for h in hooks:
        h.remove()
    assigns = activation_grouping(dense, ffn_inputs(dense, rows), 8)
    for d, m, k, x, assign in zip(dense.layers, lte_layers(lte), lte_layers(kmeans), inputs, assigns):
        gate, up = d.mlp.gate_up_proj(x).chunk(2, dim=-1)  # (N, F)
        h = (F.silu(gate) * up).abs()
        share = (h / h.sum(1, keepdim=True)).mean(0)  # (F,)
        assert torch.equal(assign.bincount(), torch.full((16,), 8))
        assert share[assign < 8].max() <= share[assign >= 8].min()
        assert all(assign[m.grouping[e * 8 : (e + 1) * 8]].unique().numel() == 1 for e in range(16))
        assert not torch.equal(m.grouping, k.grouping)
    set_routers(lte, offset=30.0)
    x = rows[:2, :12]
    torch.testing.assert_close(lte(x), dense(x), atol=1e-5, rtol=1e-5)
    with pytest.raises(LeanLMError, match="grouping=activations, router_init=random needs calibration text"):
        add_methods(dense, with_lte(dense.cfg, grouping="activations"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_grouping_a_cuda_model_equals_grouping_it_on_the_cpu():
    # k-means runs on the CPU whatever the model's device, so a checkpoint's grouping does not depend on it
    cpu, gpu = to_lte(dense_model()), to_lte(dense_model().cuda())
    torch.testing.assert_close(gpu.state_dict(), cpu.state_dict(), check_device=False, atol=0, rtol=0)


def test_stage1_with_all_scores_one_equals_dense():
    dense = dense_model()
    lte = to_lte(dense, eta=1.0)
    set_routers(lte, offset=100.0)  # sigmoid(100) == 1.0 in fp32
    lte.train()
    x = torch.randint(0, 512, (2, 12))
    torch.testing.assert_close(lte(x), dense(x), atol=1e-5, rtol=1e-5)


def test_stage2_hard_mask_equals_masked_dense():
    dense = dense_model()
    lte = to_lte(dense)
    lte.lte_stage1_done.fill_(True)
    lte = add_methods(lte, with_lte(lte.cfg, stage=2)).train()
    set_routers(lte, offset=0.0, std=0.3)
    for d, m in zip(dense.layers, lte.layers):
        x = torch.randn(2, 7, 64)
        on = m.mlp.logits(x) > 0
        assert 0 < on.float().mean() < 1
        torch.testing.assert_close(m.mlp(x), masked_dense_mlp(d.mlp, m.mlp, x, on), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kept", [0.25, 0.9, 1.0])  # row-major: block copies below DENSE_ABOVE, masked dense above
def test_decode_ffn_both_paths_equal_masked_dense(kept):
    dense = dense_model()
    lte = to_lte(dense)
    d, m = dense.layers[0].mlp, lte.layers[0].mlp
    x = torch.randn(1, 1, 64)
    on = torch.zeros(1, 1, m.n, dtype=torch.bool)
    on[..., torch.randperm(m.n)[: max(1, round(kept * m.n))]] = True
    assert (on.float().mean() > m.DENSE_ABOVE) == (kept > m.DENSE_ABOVE)
    ref = masked_dense_mlp(d, m, x, on)
    with torch.no_grad():
        torch.testing.assert_close(m.infer(x, on), ref, atol=1e-5, rtol=1e-5)
        with decode_layout(lte):  # the expert table at every fraction
            assert m._experts is not None and m.gate_up_proj.weight.numel() == 0
            torch.testing.assert_close(m.infer(x, on), ref, atol=1e-5, rtol=1e-5)
    assert m._experts is None and torch.equal(m.gate_up_proj.weight, to_lte(dense).layers[0].mlp.gate_up_proj.weight)


@pytest.mark.parametrize("layout", ["row-major", "decode_layout"])
@pytest.mark.parametrize("tokens", [(1, 1), (3, 1), (1, 6)])
def test_sparse_inference_ffn_equals_masked_dense(layout, tokens):
    dense = dense_model()
    lte = to_lte(dense)
    set_routers(lte, offset=0.0, std=0.3)
    d, m = dense.layers[0].mlp, lte.layers[0].mlp
    x = torch.randn(*tokens, 64)
    on = m.logits(x) > 0
    ref = masked_dense_mlp(d, m, x, on)
    with torch.no_grad(), decode_layout(lte) if layout == "decode_layout" else torch.no_grad():
        if layout == "decode_layout":
            assert m._experts is not None and m.down_proj.weight.t().is_contiguous()
        torch.testing.assert_close(m(x), ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(m.infer(x, torch.zeros_like(on)), torch.zeros_like(x))  # no expert selected
    kind = "decode" if x.shape[1] == 1 else "prefill"  # one token per row: decode steps
    assert m.stats[kind][0] == 2 * x.shape[0] * x.shape[1] and sum(s[0] for s in m.stats.values()) == m.stats[kind][0]


def test_generate_with_sparse_decode_matches_full_forward():
    lte = to_lte(dense_model())
    set_routers(lte, offset=0.0, std=0.3)
    out = generate(lte, [[1, 2, 3, 4]], max_new_tokens=8).tokens[0]
    ids = [1, 2, 3, 4]
    with torch.no_grad():
        for _ in range(8):
            ids.append(int(lte(torch.tensor([ids]))[0, -1].argmax()))
    assert out == ids[4:]
    rep = lte_of(lte).report(lte)
    assert 0 < rep["ffn_sparsity"] < 1 and len(rep["ffn_sparsity_per_layer"]) == 2
    # a decode step computes only its own experts; a prefill the union of its tokens' (test_prefill_flops_count_...):
    # at most the dense FFN, plus the routers (2 * C * n per layer)
    dense = dense_model()
    assert lte.flops("decode", 64) < dense.flops("decode", 64)
    assert lte.flops("prefill", 64) <= dense.flops("prefill", 64) + 2 * (2 * 64 * 4)


needs_cxx = pytest.mark.skipif(
    shutil.which("c++") is None or not is_ninja_available(), reason="the C++ decode kernel needs c++ and ninja"
)


@needs_cxx
@pytest.mark.parametrize("threads", [1, 2])  # 2: the selected experts are split over threads, partial sums added
@pytest.mark.parametrize("expert_size", [32, 16, 8, 6])  # 32, 16: the fixed-width gate/up loops; 8, 6: the generic one
def test_fused_decode_kernel_equals_masked_dense(expert_size, threads):
    dense = dense_model(ffn_dim=96)
    lte = to_lte(dense, expert_size=expert_size)
    set_routers(lte, offset=0.0, std=0.3)
    d, m = dense.layers[0].mlp, lte.layers[0].mlp
    x = torch.randn(16, 1, 1, 64)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.no_grad(), decode_layout(lte, "cpp"):
            assert m._fused is not None
            seen = []
            for xi in x:
                on = m.logits(xi) > 0
                seen.append(int(on.sum()))
                torch.testing.assert_close(m(xi), masked_dense_mlp(d, m, xi, on), atol=1e-5, rtol=1e-5)
            assert m.stats["decode"][1] == sum(seen) and 0 < sum(seen) < 16 * m.n  # some experts on, some off
            for offset in (-100.0, 100.0):  # none selected: zeros; all selected: the dense FFN
                m.router_offset.fill_(offset)
                torch.testing.assert_close(
                    m(x[0]), d(x[0]) if offset > 0 else torch.zeros_like(x[0]), atol=1e-5, rtol=1e-5
                )
    finally:
        torch.set_num_threads(before)
    assert m._fused is None and m._experts is None  # the kernel's views are dropped with the layout


@needs_cxx
def test_generate_with_fused_kernel_equals_torch_path():
    lte = to_lte(dense_model())
    set_routers(lte, offset=0.0, std=0.3)
    out = [generate(lte, [[1, 2, 3, 4], [5, 6]], max_new_tokens=8, kernel=k).tokens for k in ("torch", "cpp")]
    torch_sparsity = lte_of(lte).report(lte)["ffn_sparsity"]
    lte_of(lte).reset_stats(lte)
    out += [generate(lte, [[1, 2, 3, 4]], max_new_tokens=8, kernel=k).tokens for k in ("torch", "cpp")]
    assert out[0] == out[1] and out[2] == out[3]
    assert torch_sparsity > 0 and lte_of(lte).report(lte)["ffn_sparsity"] > 0


def test_router_gradients_stage1_but_not_stage2():
    lte = to_lte(dense_model(), eta=1.0)
    set_routers(lte, offset=0.0, std=0.3)
    lte.train()
    x = torch.randint(0, 512, (2, 12))
    (lte(x).logsumexp(-1).mean() + lte_of(lte).aux_loss(lte)).backward()
    for m in lte_layers(lte):
        assert m.router.weight.grad is not None and m.router.weight.grad.abs().sum() > 0
        assert m.router_offset.grad.abs().sum() > 0
    lte.lte_stage1_done.fill_(True)
    s2 = add_methods(lte, with_lte(lte.cfg, stage=2)).train()
    s2(x).logsumexp(-1).mean().backward()
    assert lte_of(s2).aux_loss(s2) is None  # stage 2 keeps no scores: no auxiliary loss
    for m, m1 in zip(lte_layers(s2), lte_layers(lte)):
        assert not m.router.weight.requires_grad and m.router.weight.grad is None and m.router_offset.grad is None
        assert torch.equal(m.router.weight, m1.router.weight)  # stage 2 keeps the stage-1 routers
        assert m.gate_up_proj.weight.grad.abs().sum() > 0


def test_aux_losses_hand_computed():
    lte = to_lte(dense_model(), eta=2.0, lambda_sep=0.5, sep_eps=0.01)
    set_routers(lte, offset=float(torch.logit(torch.tensor(0.8))))  # every score 0.8
    lte.train()
    lte(torch.randint(0, 512, (1, 4)))
    expected = 2.0 * 0.8**2 + 0.5 / (0.3**2 + 0.01)
    assert lte_of(lte).aux_loss(lte).item() == pytest.approx(expected, rel=1e-5)
    # the logged values are the ones of that forward: the losses, and each layer's hard sparsity (all experts on)
    row = lte_of(lte).train_metrics(lte)
    assert row["lte_eff_loss"] == pytest.approx(0.8**2) and row["lte_sep_loss"] == pytest.approx(1 / (0.3**2 + 0.01))
    assert row["lte_sparsity"] == 0.0 and row["lte_sparsity_01"] == 0.0
    set_routers(lte, offset=float(torch.logit(torch.tensor(0.2))))  # every score 0.2: every expert off
    lte(torch.randint(0, 512, (1, 4)))
    lte_of(lte).aux_loss(lte)
    row = lte_of(lte).train_metrics(lte)
    assert row["lte_eff_loss"] == pytest.approx(0.2**2) and row["lte_sparsity"] == 1.0
    assert all(row[f"lte_sparsity_{i:02d}"] == 1.0 for i in range(len(lte_layers(lte))))


@pytest.fixture
def tiny_data(tmp_path_factory):
    from conftest import TEXT

    from leanlm.data import prepare

    root = tmp_path_factory.mktemp("lte")
    (root / "text.txt").write_text(TEXT * 40)
    out = root / "data"
    prepare([str(root / "text.txt")], out, vocab_size=300, progress=False)
    return out


def run_cfg(out, data, init=None, model=None, steps=3):
    raw = {
        "data": {"dir": str(data)},
        "optim": {"lr": 1e-3, "warmup_steps": 0},
        "run": {"out": str(out), "steps": steps, "batch_size": 2, "seq_len": 32, "eval_batches": 1, "log_every": 1},
    }
    raw["run"]["progress"] = False
    if init:
        raw["run"]["init"] = str(init)
    if model:
        raw["model"] = model
    return raw


def test_train_stage1_then_stage2_then_eval_and_generate(tmp_path, tiny_data, tiny_tokenizer, capsys):
    dense = train(config_from_dict(run_cfg(tmp_path / "d", tiny_data, model={"preset": "tiny", **CFG}, steps=2)))
    s1 = train(config_from_dict(run_cfg(tmp_path / "s1", tiny_data, dense["checkpoint"], {"lte": {"eta": 1.0}})))
    rows = (tmp_path / "s1" / "metrics.csv").read_text().splitlines()
    assert "lte_sparsity" in rows[0] and "lte_sparsity_01" in rows[0] and "lte_eff_loss" in rows[0]
    m1, _ = load_model(s1["checkpoint"])
    assert m1.cfg.arch == "lte" and bool(m1.lte_stage1_done)
    s2 = train(config_from_dict(run_cfg(tmp_path / "s2", tiny_data, s1["checkpoint"], {"lte": {"stage": 2}})))
    m2, _ = load_model(s2["checkpoint"])
    assert lte_cfg(m2).stage == 2
    for a, b in zip(lte_layers(m1), lte_layers(m2)):
        assert torch.equal(a.router.weight, b.router.weight) and torch.equal(a.grouping, b.grouping)
    text = tmp_path / "t.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 20)
    assert main(["eval", "-m", s2["checkpoint"], "-d", str(text), "--seq-len", "32", "--json"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert 0 <= res["methods"]["lte"]["ffn_sparsity"] <= 1
    assert main(["generate", "-m", s2["checkpoint"], "-p", "The quick", "-n", "4", "--ignore-eos"]) == 0


def test_saved_config_of_an_lte_run_repeats_it(tmp_path, tiny_data):
    # config.yaml records the whole model section (LTE included) next to run.init; re-running it must convert the
    # init model again (stage 1) or switch its stage (stage 2), not train the init model as it is
    dense = train(config_from_dict(run_cfg(tmp_path / "d", tiny_data, model={"preset": "tiny", **CFG}, steps=2)))
    s1 = train(config_from_dict(run_cfg(tmp_path / "s1", tiny_data, dense["checkpoint"], {"lte": {"eta": 1.0}})))
    train(config_from_dict(run_cfg(tmp_path / "s2", tiny_data, s1["checkpoint"], {"lte": {"stage": 2}})))
    for name, stage in (("s1", 1), ("s2", 2)):
        raw = read_yaml(tmp_path / name / "config.yaml")
        assert set(raw["model"]) > {"lte", "dim"}  # the whole section, not the methods-only one given
        raw["run"]["out"] = str(tmp_path / f"{name}-again")
        again = train(config_from_dict(raw))
        m, _ = load_model(again["checkpoint"])
        assert m.cfg.arch == "lte" and lte_cfg(m).stage == stage
        first, _ = load_model(str(tmp_path / name / "final"))
        for a, b in zip(first.state_dict().values(), m.state_dict().values()):
            assert torch.equal(a, b)  # same init, seed and data: the same run


def test_train_groups_by_activations_on_its_data_and_stage2_keeps_it(tmp_path, tiny_data):
    # leanlm train converts after preparing the data, so grouping=activations calibrates on the training split;
    # stage 2 must name the model's grouping and expert size (one line naming the key when it does not)
    from leanlm.data import TokenDataset
    from leanlm.training.loop import CALIBRATION_LEN, CALIBRATION_WINDOWS

    dense = train(config_from_dict(run_cfg(tmp_path / "d", tiny_data, model={"preset": "tiny", **CFG}, steps=2)))
    lte = {"eta": 1.0, "expert_size": 8, "grouping": "activations"}
    s1 = train(config_from_dict(run_cfg(tmp_path / "s1", tiny_data, dense["checkpoint"], {"lte": lte})))
    d, _ = load_model(dense["checkpoint"])
    # what the loop calibrates on: CALIBRATION_WINDOWS windows of the train split (the grouping reads the first 16)
    rows = calibration_windows(
        TokenDataset(tiny_data, "train").tokens, CALIBRATION_WINDOWS, min(CALIBRATION_LEN, d.cfg.max_seq_len)
    )
    want = add_methods(d, with_lte(d.cfg, **lte), seed=0, calibration=rows)
    m1, _ = load_model(s1["checkpoint"])
    assert lte_cfg(m1).grouping == "activations"
    for a, b in zip(lte_layers(m1), lte_layers(want)):  # the grouping is a buffer: training leaves it
        assert torch.equal(a.grouping, b.grouping)
    with pytest.raises(LeanLMError, match="grouping: the model's experts have grouping 'activations', not 'weights'"):
        train(
            config_from_dict(
                run_cfg(tmp_path / "x", tiny_data, s1["checkpoint"], {"lte": {"stage": 2, "expert_size": 8}})
            )
        )
    s2_lte = {**lte, "stage": 2}
    s2 = train(config_from_dict(run_cfg(tmp_path / "s2", tiny_data, s1["checkpoint"], {"lte": s2_lte})))
    m2, _ = load_model(s2["checkpoint"])
    assert lte_cfg(m2).grouping == "activations" and lte_cfg(m2).stage == 2
    for a, b in zip(lte_layers(m1), lte_layers(m2)):
        assert torch.equal(a.grouping, b.grouping)


def test_lte_subllm_trains_and_generates(tmp_path, tiny_data):
    # scores start at 0.5 (offset 0, not the default 1.5), so some experts are off after 3 steps
    lte = {"eta": 1.0, "router_init_bias": 0.0}
    model = {"preset": "tiny", **CFG, "n_layers": 3, "subllm": {"structure": "T(T)T"}, "lte": lte}
    res = train(config_from_dict(run_cfg(tmp_path / "sub", tiny_data, model=model, steps=3)))
    m, _ = load_model(res["checkpoint"])
    assert m.cfg.arch == "subllm+lte" and len(lte_layers(m)) == 3
    assert len(generate(m, [[1, 2, 3, 4, 5, 6]], max_new_tokens=5).tokens[0]) == 5
    rep = lte_of(m).report(m)
    assert 0 < rep["ffn_sparsity"] <= 1
    # the combined saving: SUBLLM's token reduction and LTE's FFN sparsity both lower the executed FLOPs (of a decode
    # step, which computes only its own experts; the SUBLLM twin is costed at the same measured retention)
    sub = next(x for x in m.methods if x.name == "subllm")
    twin = build_model(m.cfg.replace(methods={"subllm": m.cfg.methods["subllm"]}))
    twin.methods[0].counts = {k: c.copy() for k, c in sub.counts.items()}
    assert m.flops("decode", 64) <= twin.flops("decode", 64)


def test_bad_config_values():
    with pytest.raises(LeanLMError, match="expert_size: must divide model.ffn_dim=128"):
        preset("tiny", **CFG, lte={"expert_size": 48})
    with pytest.raises(LeanLMError, match="eta: must be >= 0"):
        preset("tiny", **CFG, lte={"eta": -0.1})
    with pytest.raises(LeanLMError, match="router_init: must be one of random, centroid, fitted"):
        preset("tiny", **CFG, lte={"router_init": "kmeans"})
    with pytest.raises(LeanLMError, match="stage=2 needs a stage-1 LTE model"):
        to_lte(dense_model(), stage=2)


def write_config(tmp_path, raw) -> str:
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(raw))
    return str(p)


def one_line_exit_2(capsys, argv, needle):
    rc = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("leanlm: error:") and needle in err[-1], err


@pytest.mark.parametrize(
    "model, needle",
    [
        ({"preset": "tiny", **CFG, "lte": {"expert_size": 48}}, "model.lte.expert_size: must divide"),
        ({"preset": "tiny", **CFG, "lte": {"eta": -1}}, "model.lte.eta: must be >= 0"),
        ({"preset": "tiny", **CFG, "lte": {"stage": 2}}, "needs the routers of a stage-1 LTE checkpoint"),
        ({"preset": "tiny", **CFG, "lte": {"grouping": "gate"}}, "model.lte.grouping: must be weights"),
        ({"preset": "tiny", **CFG, "lte": {"grouping": "activations"}}, "activations converts a trained dense model"),
        ({"preset": "tiny", **CFG, "lte": {"router_init": "fitted"}}, "fitted converts a trained dense model"),
    ],
)
def test_bad_input_cli(tmp_path, capsys, tiny_data, model, needle):
    cfg = write_config(tmp_path, run_cfg(tmp_path / "o", tiny_data, model=model))
    one_line_exit_2(capsys, ["train", "--config", cfg], needle)


def test_stage2_from_dense_init_cli(tmp_path, capsys, tiny_data, tiny_tokenizer):
    ck = save_checkpoint(dense_model(vocab_size=300), tiny_tokenizer, tmp_path / "dense")
    cfg = write_config(tmp_path, run_cfg(tmp_path / "o", tiny_data, init=ck, model={"lte": {"stage": 2}}))
    one_line_exit_2(capsys, ["train", "--config", cfg], "stage=2 needs a stage-1 LTE model")


def test_lte_checkpoint_without_grouping(tmp_path, capsys, tiny_tokenizer):
    from safetensors.torch import load_file, save_file

    ck = save_checkpoint(to_lte(dense_model(vocab_size=300)), tiny_tokenizer, tmp_path / "lte")
    state = {k: v for k, v in load_file(str(ck / "model.safetensors")).items() if not k.endswith(".grouping")}
    save_file(state, str(ck / "model.safetensors"))
    one_line_exit_2(capsys, ["generate", "-m", str(ck), "-p", "hi", "-n", "2"], "mlp.grouping")


@pytest.mark.parametrize("offset", [-100.0, 100.0])  # every expert off / on while the bench generates
def test_bench_costs_lte_at_the_sparsity_measured(tmp_path, tiny_tokenizer, offset):
    from leanlm.bench import run_bench

    lte = to_lte(dense_model(vocab_size=300))
    set_routers(lte, offset=offset)
    ck = save_checkpoint(lte, tiny_tokenizer, tmp_path / "lte")
    dense = save_checkpoint(dense_model(vocab_size=300), tiny_tokenizer, tmp_path / "dense")
    r = run_bench(str(ck), vs=str(dense), what=["decode"], prompt_len=8, new_tokens=4, repeats=1, warmup=0)
    d = r["results"]["decode"]
    assert d["A"]["methods"]["lte"]["ffn_sparsity"] == (1.0 if offset < 0 else 0.0)
    # all off: the FFN's FLOPs are gone (routers remain); all on: dense plus the routers
    assert (d["flop_ratio"] > 1.2) if offset < 0 else (0.99 < d["flop_ratio"] < 1.0)
    # A is costed at its decode steps' experts: the dense decode step at the mean context (8 + 4 / 2 keys), each
    # layer's FFN (6 * C * F) dropped when every expert is off, plus each router (2 * C * n)
    L, C, F_, n = 2, 64, 128, 4
    ffn = 0.0 if offset < 0 else 6 * C * F_
    want = dense_model(vocab_size=300).flops("decode", 10) - L * 6 * C * F_ + L * (ffn + 2 * C * n)
    assert r["variants"]["A"]["flops_per_token"]["decode"] == pytest.approx(want, rel=1e-12)


def test_set_at_load_refuses_gguf_and_hf_inputs(tmp_path, capsys):
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    one_line_exit_2(capsys, ["generate", "-m", str(gguf), "-p", "hi", "--set", "model.max_seq_len=64"], "--set applies")


def test_set_at_load_changes_model_settings(tmp_path, capsys, tiny_tokenizer):
    lte = to_lte(dense_model(vocab_size=300))
    set_routers(lte, offset=0.0, std=0.3)
    ck = save_checkpoint(lte, tiny_tokenizer, tmp_path / "lte")
    assert lte_cfg(load_model(str(ck), overrides={"lte": {"eta": 2.0}})[0]).eta == 2.0
    outs = []
    for extra in ([], ["--set", "model.lte.eta=2"]):  # eta only matters in training: same tokens
        assert main(["generate", "-m", str(ck), "-p", "hi", "-n", "4", "--json", *extra]) == 0
        outs.append(json.loads(capsys.readouterr().out.strip().splitlines()[-1]))
    assert outs[0]["tokens"] == outs[1]["tokens"]
    dense = save_checkpoint(dense_model(vocab_size=300), tiny_tokenizer, tmp_path / "dense")
    one_line_exit_2(capsys, ["generate", "-m", str(dense), "-p", "hi", "--set", "model.lte.eta=1"], "no lte section")
    one_line_exit_2(capsys, ["generate", "-m", str(ck), "-p", "hi", "--set", "run.steps=1"], "only model.* keys")
    one_line_exit_2(capsys, ["generate", "-m", str(ck), "-p", "hi", "--set", "model.lte.eta=-1"], "must be >= 0")


@pytest.mark.slow
def test_smollm2_grouping_preserves_logits(smollm2):
    dense, tok = smollm2
    lte = to_lte(dense)
    set_routers(lte, offset=30.0)
    x = torch.tensor([tok.encode("The capital of France is Paris, and the capital of Italy is")])
    with torch.no_grad():
        torch.testing.assert_close(lte(x), dense(x), atol=2e-4, rtol=1e-4)
        set_routers(lte, offset=0.0, std=0.05)
        m, d = lte.layers[3].mlp, dense.layers[3].mlp
        h = torch.randn(1, 1, 576, generator=torch.Generator().manual_seed(0))
        on = m.logits(h) > 0
        with decode_layout(lte):  # 1536-term fp32 sums in another order: 1e-4 was exceeded once (1.1e-4)
            torch.testing.assert_close(m(h), masked_dense_mlp(d, m, h, on), atol=3e-4, rtol=1e-4)


def test_lte_mlp_refuses_an_expert_size_that_does_not_divide_the_ffn():
    # experts are equal-sized and tile the FFN: every layout relies on it, so the FFN itself refuses other sizes
    with pytest.raises(LeanLMError, match="expert_size: must divide model.ffn_dim=96"):
        LTEMLP(64, 96, LTEConfig(expert_size=7))
    with pytest.raises(LeanLMError, match="expert_size: must divide model.ffn_dim=96"):
        preset("tiny", dim=64, ffn_dim=96, lte={"expert_size": 7})


def test_refit_down_is_the_least_squares_fit_under_the_router():
    """refit_down: with every expert on it gives back the dense down projection; with a router that drops experts it
    lowers the hard-routed FFN's error to the dense output and solves the normal equations."""
    m = lte_layers(to_lte(dense_model(ffn_dim=256), expert_size=32))[0]  # 8 experts
    x = torch.randn(600, 64)
    w0 = m.down_proj.weight.detach().clone()
    with torch.no_grad():
        m.router_offset.fill_(30.0)  # every expert on: the dense output is reached with the dense weights
    refit_down(m, x, ridge=1e-9)
    torch.testing.assert_close(m.down_proj.weight, w0, atol=1e-4, rtol=1e-3)
    with torch.no_grad():
        m.router.weight.normal_(0.0, 1.0)
        m.router_offset.zero_()
        on = m.logits(x) > 0  # (N, n): about half the experts per token, different ones per token
        h = m.hidden(x)  # (N, n, E)
        hm = (h * on.unsqueeze(-1)).flatten(-2)  # (N, F)
        y = m.down_proj(h.flatten(-2))  # the dense output, the target
    assert 0.3 < on.float().mean() < 0.7
    before = (m.down_proj(hm) - y).square().mean()
    refit_down(m, x, ridge=1e-9)
    with torch.no_grad():
        r = m.down_proj(hm) - y  # (N, C) residual under the same routing
    assert r.square().mean() < 0.8 * before
    grad = hm.double().t() @ r.double()  # (F, C): zero at the least-squares optimum
    assert grad.abs().max() < 1e-3 * (hm.double().t() @ y.double()).abs().max()


def test_fitted_routers_keep_their_fraction_and_count_as_stage_1():
    """router_init: fitted (add_methods with calibration text): each router is fitted to the magnitude oracle and
    keeps `keep` of the experts on the calibration tokens; the routers differ from the init's; lte_stage1_done is set
    (stage 2 may start from them); refit_down changes only the down projections, towards the dense output."""
    dense = dense_model()
    rows = calibration_windows(np.random.default_rng(0).integers(0, 512, 10_000), 16, 256)  # (16, 256)
    lte = dict(expert_size=8, router_init="fitted", keep=0.3)  # 16 experts of 8
    fitted = add_methods(dense, with_lte(dense.cfg, **lte), calibration=rows).eval()
    refit = add_methods(dense, with_lte(dense.cfg, **lte, refit_down=True), calibration=rows).eval()
    init = to_lte(dense, expert_size=8)  # the same grouping, routers as initialised
    assert bool(fitted.lte_stage1_done) and bool(refit.lte_stage1_done) and not bool(init.lte_stage1_done)
    s2 = add_methods(fitted, with_lte(fitted.cfg, **lte, stage=2))
    lte_of(s2).set_step(s2, 0)  # stage 2 may start from the fitted routers (it refuses untrained ones)
    set_magnitude_routing(fitted, 1.0)  # every expert on: the dense FFN inputs the routers were fitted on
    inputs = ffn_inputs(fitted, rows).float()
    set_magnitude_routing(fitted, None)
    for m, r, i, x, d in zip(lte_layers(fitted), lte_layers(refit), lte_layers(init), inputs, dense.layers):
        assert torch.equal(m.grouping, i.grouping) and torch.equal(m.gate_up_proj.weight, i.gate_up_proj.weight)
        assert not torch.allclose(m.router.weight, i.router.weight)
        assert not torch.allclose(m.router_offset, i.router_offset)
        with torch.no_grad():
            on = m.logits(x) > 0  # (N, n)
            oracle = m.magnitude_choice(m.hidden(x), 0.3)
        assert on.float().mean() == pytest.approx(0.3, abs=0.02)  # `keep` of the experts on these tokens
        # the fit follows the oracle: its recall of the oracle's experts (0.5 here) is above that of any router
        # keeping 0.3 independently of it (0.3)
        assert (on & oracle).sum() / oracle.sum() > 0.4
        assert torch.equal(r.router.weight, m.router.weight) and torch.equal(r.router_offset, m.router_offset)
        assert torch.equal(m.down_proj.weight, i.down_proj.weight)
        assert not torch.equal(r.down_proj.weight, m.down_proj.weight)
        with torch.no_grad():  # under the routing, the refit down projection is closer to the dense FFN's output
            y = d.mlp(x)
            hm = (m.hidden(x) * on.unsqueeze(-1)).flatten(-2)
            assert (r.down_proj(hm) - y).square().mean() < (m.down_proj(hm) - y).square().mean()
    # on the deployed (hard-routed) forward of the calibration text, about `keep` of the experts run per token
    lte_of(fitted).reset_stats(fitted)  # (ffn_inputs above counted the every-expert pass)
    with torch.no_grad():
        fitted(rows[:4])
    assert [1 - m.sparsity() for m in lte_layers(fitted)] == pytest.approx([0.3, 0.3], abs=0.1)


def test_convert_cli_fits_routers_on_calibration_text(tmp_path, capsys, tiny_tokenizer):
    """`leanlm convert SRC OUT --method lte --set model.lte.* --calibrate FILE`: groups by activations, fits the
    routers and refits the down projections on the text, writes a checkpoint that loads (stage 1 done, the down
    projections no longer the dense ones); bad input fails in one line, before anything is written."""
    from conftest import TEXT

    src = save_checkpoint(dense_model(ffn_dim=160, vocab_size=300), tiny_tokenizer, tmp_path / "dense")
    text = tmp_path / "calib.txt"
    text.write_text(TEXT * 80)
    out = tmp_path / "lte"
    sets = ["model.lte.expert_size=8", "model.lte.router_init=fitted", "model.lte.refit_down=true"]
    sets += ["model.lte.grouping=activations"]
    args = ["convert", str(src), str(out), "--method", "lte", *[a for s in sets for a in ("--set", s)]]
    assert main([*args, "--calibrate", str(text), "--calibrate-tokens", "2048", "--json"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["ok"] and res["arch"] == "lte" and res["out"] == str(out)
    model, tok = load_model(str(out))
    c = lte_cfg(model)
    assert (c.expert_size, c.router_init, c.refit_down, c.grouping) == (8, "fitted", True, "activations")
    assert tok is not None and bool(model.lte_stage1_done) and len(lte_layers(model)) == 2
    dense, _ = load_model(str(src))
    for m in lte_layers(model):
        assert m.n == 20 and sorted(m.grouping.tolist()) == list(range(160))
        assert not torch.allclose(m.router_offset, torch.full_like(m.router_offset, 1.5))  # not the init's offsets
        m.router_offset.data.fill_(30.0)  # every expert on: the refit down projections differ from the dense ones
    x = torch.randint(0, 300, (2, 12))
    with torch.no_grad():
        assert not torch.allclose(model(x), dense(x), atol=1e-3, rtol=1e-3)
    calib = ["--calibrate", str(text)]
    for argv, needle in [
        (["--method", "nosuch", *calib], "--method nosuch: not a method"),
        (["--method", "lte", "--set", "model.subllm.keep=0.5", *calib], "has no subllm section to change"),
        (["--method", "lte", "--calibrate", str(tmp_path / "missing.txt")], "missing.txt: no such file"),
        (["--method", "lte", "--set", "model.lte.router_init=fitted"], "router_init=fitted needs calibration text"),
        (["--method", "lte", "--set", "model.lte.keep=1", *calib], "model.lte.keep: must lie strictly between"),
        (["--method", "lte", "--set", "model.lte.refit_down=true", *calib], "refit_down: refits under fitted"),
        (["--method", "lte", *calib, "--calibrate-tokens", "10"], "--calibrate-tokens must be at least 64"),
        (["--method", "lte", "--method", "lte", *calib], "--method lte: given twice"),
    ]:
        one_line_exit_2(capsys, ["convert", str(src), str(tmp_path / "bad"), *argv], needle)
        assert not (tmp_path / "bad").exists()
    # a preset has no tokenizer to read calibration text with
    no_tok = ["convert", "tiny", str(tmp_path / "bad"), "--method", "lte", *calib]
    one_line_exit_2(capsys, no_tok, "without a tokenizer")
    assert not (tmp_path / "bad").exists()


def force_routers(model: Transformer, pick) -> None:
    """Route by position: in a call of T tokens, token t turns on exactly the expert pick(t) (in every row)."""
    for m in lte_layers(model):

        def logits(x, m=m):
            t = torch.arange(x.shape[1]).view(1, -1, 1)
            hot = torch.arange(m.n).view(1, 1, -1) == pick(t)
            return torch.where(hot, 1.0, -1.0).expand(x.shape[0], -1, -1)

        m.logits = logits


def test_prefill_flops_count_the_union_of_experts():
    # token t picks expert t mod n: every token computes one expert of its own (1/n of the FFN), but a prefill of
    # 2n tokens computes the union, every expert: its FFN costs what the dense one does (+ the routers)
    dense = dense_model()
    lte = to_lte(dense)
    n, C, L, T = 4, 64, 2, 8
    force_routers(lte, lambda t: t % n)
    lte.setup_caches(1, 64)
    with torch.no_grad():
        lte(torch.randint(0, 512, (1, T)))
    for m in lte_layers(lte):
        assert m.stats["prefill"] == [T, T, n * T] and m.cost("prefill") == 1.0
        assert m.sparsity() == pytest.approx(1 - 1 / n)  # what each token used is still 1/n of the experts
    assert lte.flops("prefill", T) == pytest.approx(dense.flops("prefill", T) + L * 2 * C * n, rel=1e-12)
    rep = lte_of(lte).report(lte)
    assert rep["ffn_cost"]["prefill"] == pytest.approx(1 + 2 * C * n / (6 * C * 128))
    assert rep["ffn_cost"]["decode"] is None
    # one decode step (one token: expert 0) is costed at its own experts: 1/n of each FFN, + the routers
    with torch.no_grad():
        lte(torch.randint(0, 512, (1, 1)), start=T)
    for m in lte_layers(lte):
        assert m.stats["decode"] == [1, 1, 1] and m.cost("decode") == 1 / n
    ffn = 6 * C * 128
    want = dense.flops("decode", T + 1) - L * ffn + L * (ffn / n + 2 * C * n)
    assert lte.flops("decode", T + 1) == pytest.approx(want, rel=1e-12)
    assert lte.flops("prefill", T) == pytest.approx(dense.flops("prefill", T) + L * 2 * C * n, rel=1e-12)  # unchanged


def test_flops_match_a_hand_count():
    # tiny with CFG: vocab V=512, width C=64, L=2 layers, H=4 heads and K=2 kv heads of D=16, FFN F=128 in n=4
    # experts of 32. Decode stats: layer 0 ran 10 steps choosing 25 experts (cost 25/40), layer 1 10 steps of 1
    lte = to_lte(dense_model())
    layers = lte_layers(lte)
    layers[0].stats["decode"] = [10, 25, 25]
    layers[1].stats["decode"] = [10, 10, 10]
    V, C, H, K, D, F_, n = 512, 64, 4, 2, 16, 128, 4
    qkvo = 2 * (C * H * D + C * K * D + C * K * D + H * D * C)  # q, k, v, o projections: 2 FLOPs per weight
    keys = 100
    attn = 4 * H * D * keys  # QK^T and AV over 100 keys
    ffn = 2 * (2 * F_ * C + F_ * C)  # gate/up and down: 49,152
    router = 2 * C * n  # 512
    head = 2 * C * V
    want = head + (qkvo + attn + ffn * 25 / 40 + router) + (qkvo + attn + ffn * 10 / 40 + router)
    assert want == 65536 + 2 * (24576 + 25600 + 512) + 49152 * 35 / 40
    assert lte.flops("decode", keys) == pytest.approx(want, rel=1e-12)
    # nothing measured in prefills: every expert (the union of many tokens' experts); training: every expert, 3x
    T = 32
    want = head + 2 * (qkvo + 4 * H * D * (T + 1) / 2 + ffn + router)
    assert lte.flops("prefill", T) == pytest.approx(want, rel=1e-12)
    assert lte.flops("train", T) == pytest.approx(3 * want, rel=1e-12)
