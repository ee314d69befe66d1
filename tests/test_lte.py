"""LTE on tiny random models: grouping/permutation, soft and hard routing against dense references, the sparse
decode FFN, router gradients per stage, training end to end, SUBLLM composition and bad input."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from torch.utils.cpp_extension import is_ninja_available

from leanlm.checkpoint import add_methods, build_model, load_model, save_checkpoint
from leanlm.cli import main
from leanlm.config import LTEConfig, preset
from leanlm.errors import LeanLMError
from leanlm.generate import generate
from leanlm.lte import LTEMLP, activation_grouping, balanced_kmeans, calibration_rows, group_mlp, lte_layers
from leanlm.model import Transformer, decode_layout
from leanlm.train import config_from_dict, read_config_file, train

CFG = dict(dim=64, ffn_dim=128)  # 4 experts of 32


pytestmark = pytest.mark.usefixtures("one_thread")


def dense_model(**kw) -> Transformer:
    torch.manual_seed(0)
    return Transformer(preset("tiny", **{**CFG, **kw})).init_weights(seed=0).eval()


def to_lte(dense: Transformer, **lte) -> Transformer:
    return add_methods(dense, dense.cfg.replace(lte=LTEConfig(**lte))).eval()


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
    lte = add_methods(
        dense_model(), dense_model().cfg.replace(lte=LTEConfig(router_init="centroid", router_init_std=2.0))
    )
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
    rows = calibration_rows(np.random.default_rng(0).integers(0, 512, 10_000), dense.cfg.max_seq_len)
    assert rows.shape == (16, 256)  # 16 windows of the tiny model's max_seq_len
    lte = add_methods(dense, dense.cfg.replace(lte=LTEConfig(expert_size=8, grouping="activations")), calibration=rows)
    kmeans = add_methods(dense, dense.cfg.replace(lte=LTEConfig(expert_size=8)))
    assert lte.cfg.lte.grouping == "activations"
    inputs = []
    hooks = [b.mlp.register_forward_pre_hook(lambda m, a: inputs.append(a[0].flatten(0, 1))) for b in dense.layers]
    with torch.no_grad():
        dense(rows)
    for h in hooks:
        h.remove()
    assigns = activation_grouping(dense, rows, 8)
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
    with pytest.raises(LeanLMError, match="grouping=activations needs training text"):
        add_methods(dense, dense.cfg.replace(lte=LTEConfig(grouping="activations")))


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
    lte = add_methods(lte, lte.cfg.replace(lte=LTEConfig(stage=2))).train()
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
    assert m.stat_tokens == 2 * x.shape[0] * x.shape[1]


def test_generate_with_sparse_decode_matches_full_forward():
    lte = to_lte(dense_model())
    set_routers(lte, offset=0.0, std=0.3)
    out = generate(lte, [[1, 2, 3, 4]], max_new_tokens=8).tokens[0]
    ids = [1, 2, 3, 4]
    with torch.no_grad():
        for _ in range(8):
            ids.append(int(lte(torch.tensor([ids]))[0, -1].argmax()))
    assert out == ids[4:]
    rep = lte.lte_report()
    assert 0 < rep["ffn_sparsity"] < 1 and len(rep["ffn_sparsity_per_layer"]) == 2
    assert lte.flops_per_token(64) < dense_model().flops_per_token(64)


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
            assert m.stat_active == sum(seen) and 0 < sum(seen) < 16 * m.n  # some experts on, some off
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
    torch_sparsity = lte.lte_report()["ffn_sparsity"]
    lte.lte_reset_stats()
    out += [generate(lte, [[1, 2, 3, 4]], max_new_tokens=8, kernel=k).tokens for k in ("torch", "cpp")]
    assert out[0] == out[1] and out[2] == out[3]
    assert torch_sparsity > 0 and lte.lte_report()["ffn_sparsity"] > 0


def test_router_gradients_stage1_but_not_stage2():
    lte = to_lte(dense_model(), eta=1.0)
    set_routers(lte, offset=0.0, std=0.3)
    lte.train()
    x = torch.randint(0, 512, (2, 12))
    (lte(x).logsumexp(-1).mean() + lte.aux_loss()).backward()
    for m in lte_layers(lte):
        assert m.router.weight.grad is not None and m.router.weight.grad.abs().sum() > 0
        assert m.router_offset.grad.abs().sum() > 0
    lte.lte_stage1_done.fill_(True)
    s2 = add_methods(lte, lte.cfg.replace(lte=LTEConfig(stage=2))).train()
    s2(x).logsumexp(-1).mean().backward()
    assert float(s2.aux_loss()) == 0.0
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
    assert lte.aux_loss().item() == pytest.approx(expected, rel=1e-5)
    # the logged values are the ones of that forward: the losses, and each layer's hard sparsity (all experts on)
    row = lte.train_metrics()
    assert row["lte_eff_loss"] == pytest.approx(0.8**2) and row["lte_sep_loss"] == pytest.approx(1 / (0.3**2 + 0.01))
    assert row["lte_sparsity"] == 0.0 and row["lte_sparsity_01"] == 0.0
    set_routers(lte, offset=float(torch.logit(torch.tensor(0.2))))  # every score 0.2: every expert off
    lte(torch.randint(0, 512, (1, 4)))
    lte.aux_loss()
    row = lte.train_metrics()
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
    assert m2.cfg.lte.stage == 2
    for a, b in zip(lte_layers(m1), lte_layers(m2)):
        assert torch.equal(a.router.weight, b.router.weight) and torch.equal(a.grouping, b.grouping)
    text = tmp_path / "t.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 20)
    assert main(["eval", "-m", s2["checkpoint"], "-d", str(text), "--seq-len", "32", "--json"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert 0 <= res["lte"]["ffn_sparsity"] <= 1
    assert main(["generate", "-m", s2["checkpoint"], "-p", "The quick", "-n", "4", "--ignore-eos"]) == 0


def test_saved_config_of_an_lte_run_repeats_it(tmp_path, tiny_data):
    # config.yaml records the whole model section (LTE included) next to run.init; re-running it must convert the
    # init model again (stage 1) or switch its stage (stage 2), not train the init model as it is
    dense = train(config_from_dict(run_cfg(tmp_path / "d", tiny_data, model={"preset": "tiny", **CFG}, steps=2)))
    s1 = train(config_from_dict(run_cfg(tmp_path / "s1", tiny_data, dense["checkpoint"], {"lte": {"eta": 1.0}})))
    train(config_from_dict(run_cfg(tmp_path / "s2", tiny_data, s1["checkpoint"], {"lte": {"stage": 2}})))
    for name, stage in (("s1", 1), ("s2", 2)):
        raw = read_config_file(tmp_path / name / "config.yaml")
        assert set(raw["model"]) > {"lte", "dim"}  # the whole section, not the methods-only one given
        raw["run"]["out"] = str(tmp_path / f"{name}-again")
        again = train(config_from_dict(raw))
        m, _ = load_model(again["checkpoint"])
        assert m.cfg.arch == "lte" and m.cfg.lte.stage == stage
        first, _ = load_model(str(tmp_path / name / "final"))
        for a, b in zip(first.state_dict().values(), m.state_dict().values()):
            assert torch.equal(a, b)  # same init, seed and data: the same run


def test_train_groups_by_activations_on_its_data_and_stage2_keeps_it(tmp_path, tiny_data):
    # leanlm train converts after preparing the data, so grouping=activations calibrates on the training split;
    # stage 2 must name the model's grouping and expert size (one line naming the key when it does not)
    from leanlm.data import TokenDataset

    dense = train(config_from_dict(run_cfg(tmp_path / "d", tiny_data, model={"preset": "tiny", **CFG}, steps=2)))
    lte = {"eta": 1.0, "expert_size": 8, "grouping": "activations"}
    s1 = train(config_from_dict(run_cfg(tmp_path / "s1", tiny_data, dense["checkpoint"], {"lte": lte})))
    d, _ = load_model(dense["checkpoint"])
    rows = calibration_rows(TokenDataset(tiny_data, "train").tokens, d.cfg.max_seq_len)
    want = add_methods(d, d.cfg.replace(lte=LTEConfig(**lte)), seed=0, calibration=rows)
    m1, _ = load_model(s1["checkpoint"])
    assert m1.cfg.lte.grouping == "activations"
    for a, b in zip(lte_layers(m1), lte_layers(want)):  # the grouping is a buffer: training leaves it
        assert torch.equal(a.grouping, b.grouping)
    with pytest.raises(LeanLMError, match="grouping: the model's experts were grouped by activations, not weights"):
        train(
            config_from_dict(
                run_cfg(tmp_path / "x", tiny_data, s1["checkpoint"], {"lte": {"stage": 2, "expert_size": 8}})
            )
        )
    s2_lte = {**lte, "stage": 2}
    s2 = train(config_from_dict(run_cfg(tmp_path / "s2", tiny_data, s1["checkpoint"], {"lte": s2_lte})))
    m2, _ = load_model(s2["checkpoint"])
    assert m2.cfg.lte.grouping == "activations" and m2.cfg.lte.stage == 2
    for a, b in zip(lte_layers(m1), lte_layers(m2)):
        assert torch.equal(a.grouping, b.grouping)


def test_lte_subllm_trains_and_generates(tmp_path, tiny_data):
    pytest.importorskip("leanlm.subllm")
    # scores start at 0.5 (offset 0, not the default 1.5), so some experts are off after 3 steps
    lte = {"eta": 1.0, "router_init_bias": 0.0}
    model = {"preset": "tiny", **CFG, "n_layers": 3, "subllm": {"structure": "T(T)T"}, "lte": lte}
    res = train(config_from_dict(run_cfg(tmp_path / "sub", tiny_data, model=model, steps=3)))
    m, _ = load_model(res["checkpoint"])
    assert m.cfg.arch == "subllm+lte" and len(lte_layers(m)) == 3
    assert len(generate(m, [[1, 2, 3, 4, 5, 6]], max_new_tokens=5).tokens[0]) == 5
    rep = m.lte_report()
    assert 0 < rep["ffn_sparsity"] <= 1
    # the combined saving: SUBLLM's token reduction and LTE's FFN sparsity both lower the executed FLOPs
    assert m.flops_per_token(64) <= build_model(m.cfg.replace(lte=None)).flops_per_token(64)


def test_bad_config_values():
    with pytest.raises(LeanLMError, match="expert_size: must divide model.ffn_dim=128"):
        preset("tiny", **CFG, lte={"expert_size": 48})
    with pytest.raises(LeanLMError, match="eta: must be >= 0"):
        preset("tiny", **CFG, lte={"eta": -0.1})
    with pytest.raises(LeanLMError, match="router_init: must be random or centroid"):
        preset("tiny", **CFG, lte={"router_init": "kmeans"})
    with pytest.raises(LeanLMError, match="stage-1 LTE checkpoint"):
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
        ({"preset": "tiny", **CFG, "lte": {"grouping": "activations"}}, "groups a trained dense model's neurons"),
    ],
)
def test_bad_input_cli(tmp_path, capsys, tiny_data, model, needle):
    cfg = write_config(tmp_path, run_cfg(tmp_path / "o", tiny_data, model=model))
    one_line_exit_2(capsys, ["train", "--config", cfg], needle)


def test_stage2_from_dense_init_cli(tmp_path, capsys, tiny_data, tiny_tokenizer):
    ck = save_checkpoint(dense_model(vocab_size=300), tiny_tokenizer, tmp_path / "dense")
    cfg = write_config(tmp_path, run_cfg(tmp_path / "o", tiny_data, init=ck, model={"lte": {"stage": 2}}))
    one_line_exit_2(capsys, ["train", "--config", cfg], "needs a stage-1 LTE checkpoint")


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
    assert d["A"]["lte"]["ffn_sparsity"] == (1.0 if offset < 0 else 0.0)
    # all off: the FFN's FLOPs are gone (routers remain); all on: dense plus the routers
    assert (d["flop_ratio"] > 1.2) if offset < 0 else (0.99 < d["flop_ratio"] < 1.0)


def test_set_at_load_refuses_gguf_and_hf_inputs(tmp_path, capsys):
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    one_line_exit_2(capsys, ["generate", "-m", str(gguf), "-p", "hi", "--set", "model.max_seq_len=64"], "--set applies")


def test_set_at_load_changes_model_settings(tmp_path, capsys, tiny_tokenizer):
    lte = to_lte(dense_model(vocab_size=300))
    set_routers(lte, offset=0.0, std=0.3)
    ck = save_checkpoint(lte, tiny_tokenizer, tmp_path / "lte")
    assert load_model(str(ck), overrides={"lte": {"eta": 2.0}})[0].cfg.lte.eta == 2.0
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


def test_sweep_flag_errors_are_one_line(tmp_path):
    """benchmarks/lte_sweep.py: --continue-steps that are not step counts of at least 1, --dense-steps below 1,
    --distill-stages other than 1 and 2, --expert-size below 1, and a --device that is unknown or absent fail in one
    line naming the flag, before anything is prepared or trained."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "lte_sweep.py"
    bad_flags = [("--continue-steps", bad) for bad in ("abc", "500,0", "-5", "500,,x")]
    bad_flags += [("--dense-steps", "0"), ("--dense-steps", "-3"), ("--distill-stages", "3"), ("--distill-stages", "")]
    bad_flags += [("--expert-size", "0")]
    bad_flags += [("--device", "tpu")] + ([] if torch.cuda.is_available() else [("--device", "cuda")])
    for flag, bad in bad_flags:
        cmd = [sys.executable, str(script), "--out", str(tmp_path / "out"), f"{flag}={bad}"]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        assert r.returncode != 0 and r.stderr.count("\n") == 1 and flag in r.stderr, r.stderr
    assert not (tmp_path / "out").exists()


def test_ffn_bench_expert_size_errors_are_one_line():
    """benchmarks/lte_ffn_bench.py: an --expert-size below 1 or not dividing the FFN width fails in one line naming
    it, before any module is built; LTEMLP itself refuses such a size."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "lte_ffn_bench.py"
    for bad in ("7", "0"):
        r = subprocess.run([sys.executable, str(script), f"--expert-size={bad}"], capture_output=True, text=True)
        assert r.returncode != 0 and r.stderr.count("\n") == 1 and "expert_size" in r.stderr, r.stderr
    with pytest.raises(LeanLMError, match="expert_size: must divide model.ffn_dim=96"):
        LTEMLP(64, 96, LTEConfig(expert_size=7))


def test_probe_refit_down_is_the_least_squares_fit_under_the_router():
    """lte_predictor_probe.refit_down: with every expert on it gives back the dense down projection; with a router
    that drops experts it lowers the hard-routed FFN's error to the dense output and solves the normal equations."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "lte_predictor_probe.py"
    spec = importlib.util.spec_from_file_location("lte_predictor_probe", path)
    probe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(probe)
    m = lte_layers(to_lte(dense_model(ffn_dim=256), expert_size=32))[0]  # 8 experts
    x = torch.randn(600, 64)
    w0 = m.down_proj.weight.detach().clone()
    with torch.no_grad():
        m.router_offset.fill_(30.0)  # every expert on: the dense output is reached with the dense weights
    probe.refit_down(m, x, ridge=1e-9)
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
    probe.refit_down(m, x, ridge=1e-9)
    with torch.no_grad():
        r = m.down_proj(hm) - y  # (N, C) residual under the same routing
    assert r.square().mean() < 0.8 * before
    grad = hm.double().t() @ r.double()  # (F, C): zero at the least-squares optimum
    assert grad.abs().max() < 1e-3 * (hm.double().t() @ y.double()).abs().max()


def test_predictor_probe_runs_and_rejects_bad_flags(tmp_path):
    """benchmarks/lte_predictor_probe.py on the tiny preset: the oracle keeps exactly --keep of the experts, every
    fitted predictor serves close to that after its offset calibration, recall lies in [0, 1], the JSON is the last
    stdout line, and --save writes a stage-1 checkpoint with the fitted routers; bad flags and a missing data dir
    fail in one line naming them."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    from leanlm.data import prepare

    corpus = tmp_path / "c.txt"
    corpus.write_text(" ".join(f"w{i * 7919 % 100003}" for i in range(20000)))
    prepare([str(corpus)], tmp_path / "data", tokenizer=None, vocab_size=512, progress=False)
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "lte_predictor_probe.py"
    base = [sys.executable, str(script), "--model", "tiny", "--data", str(tmp_path / "data"), "--test", str(corpus)]
    fast = ["--expert-size", "8", "--tokens", "2048", "--steps", "20", "--eval-windows", "2", "--threads", "1"]
    fast += ["--seq-len", "128"]
    save = ["--save", str(tmp_path / "fit")]
    cmd = base + fast + ["--ranks", "0,16", "--refit-down", "--json"] + save
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout.strip().splitlines()[-1])["rows"]
    assert [row["predictor"] for row in rows] == ["oracle", "linear+refit", "mlp-r16"]
    assert rows[0]["sparsity"] == pytest.approx(0.5)  # tiny: 20 experts of 8, keep 10
    for row in rows[1:]:
        assert abs(row["sparsity"] - 0.5) < 0.15 and 0 <= row["recall"] <= 1 and row["perplexity"] > 1
    # --save: a stage-1 LTE checkpoint whose linear routers are the fitted ones (the init's offsets were all 1.5)
    fitted, _ = load_model(str(tmp_path / "fit"))
    assert fitted.cfg.lte.stage == 1 and fitted.cfg.lte.expert_size == 8
    assert bool(fitted.lte_stage1_done)  # so stage 2 may start from these routers
    assert all(not torch.allclose(m.router_offset, torch.full_like(m.router_offset, 1.5)) for m in lte_layers(fitted))
    # --grouping activations: another partition into experts of 8 (bands of 64, 64 and 32 neurons), same function
    r = subprocess.run(
        base + fast + ["--ranks", "0", "--grouping", "activations", "--json", "--save", str(tmp_path / "act")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.strip().splitlines()[-1])["grouping"] == "activations"
    act, _ = load_model(str(tmp_path / "act"))
    for a, b in zip(lte_layers(act), lte_layers(fitted)):
        assert sorted(a.grouping.tolist()) == list(range(160)) and not torch.equal(a.grouping, b.grouping)
        a.router_offset.data.fill_(30.0)  # every expert on
    dense = load_model("tiny")[0].eval()
    x = torch.randint(0, 512, (2, 12))
    torch.testing.assert_close(act.eval()(x), dense(x), atol=1e-4, rtol=1e-4)
    # --refit-down was saved: the first run's down projections are no longer the dense ones (all experts on differs)
    for m in lte_layers(fitted):
        m.router_offset.data.fill_(30.0)
    assert not torch.allclose(fitted.eval()(x), dense(x), atol=1e-3, rtol=1e-3)
    # data whose token ids go past the model's vocabulary (1,024 against tiny's 512)
    prepare([str(corpus)], tmp_path / "data1024", tokenizer=None, vocab_size=1024, progress=False)
    bad_flags = [("--ranks", "0,x"), ("--keep", "1"), ("--expert-size", "7"), ("--data", str(tmp_path / "no"))]
    bad_flags += [("--grouping", "gate"), ("--refit-down", "--ranks=16")]
    bad_flags += [("--data", str(tmp_path / "data1024")), ("--save", str(tmp_path / "fit2") + " --ranks=16")]
    for flag, bad in bad_flags:
        r = subprocess.run(base + fast + [flag, *bad.split()], capture_output=True, text=True, timeout=300)
        assert r.returncode != 0 and r.stderr.count("\n") == 1, r.stderr
        assert (flag.strip("-").replace("-", "_") if flag == "--expert-size" else flag) in r.stderr, r.stderr
        assert ("vocab mismatch" in r.stderr) == bad.endswith("data1024"), r.stderr


def test_teacher_text_samples_documents_and_rejects_bad_input(tmp_path):
    """benchmarks/teacher_text.py on the tiny preset: --samples documents of prompt + new tokens, the prompts taken
    from the data's train split, readable by `prepare`, the JSON the last stdout line; an existing --out is never
    touched, and bad flags, a missing data dir or data past the model's vocabulary fail in one line."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    from leanlm.data import TokenDataset, prepare
    from leanlm.tokenizer import Tokenizer

    corpus = tmp_path / "c.txt"
    corpus.write_text(" ".join(f"w{i * 7919 % 100003}" for i in range(5000)))
    prepare([str(corpus)], tmp_path / "data", tokenizer=None, vocab_size=512, progress=False)
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "teacher_text.py"
    base = [sys.executable, str(script), "--model", "tiny", "--data", str(tmp_path / "data"), "--device", "cpu"]
    run = ["--samples", "5", "--batch-size", "2", "--prompt-len", "8", "--new-tokens", "16"]
    r = subprocess.run(base + run + ["--out", str(tmp_path / "gen"), "--json"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout.strip().splitlines()[-1])
    files = sorted((tmp_path / "gen").iterdir())
    assert [f.name for f in files] == [f"{i:06d}.txt" for i in range(5)] and res["tokens"] == 5 * (8 + 16)
    tok, train = Tokenizer.load(tmp_path / "data"), TokenDataset(tmp_path / "data").tokens.tolist()
    text = f" {' '.join(map(str, train))} "
    for f in files:  # each document starts with a window of the train split
        ids = tok.encode(f.read_text(), add_bos=False)
        assert f" {' '.join(map(str, ids[:4]))} " in text
    prepare([str(tmp_path / "gen")], tmp_path / "gen-data", tokenizer=str(tmp_path / "data"), progress=False)
    assert TokenDataset(tmp_path / "gen-data").manifest["documents"] == 5
    before = files[0].read_text()
    prepare([str(corpus)], tmp_path / "data1024", tokenizer=None, vocab_size=1024, progress=False)
    bad_flags = [
        ("--out", str(tmp_path / "gen")),
        ("--samples", "0"),
        ("--temperature", "0"),
        ("--data", str(tmp_path / "no")),
        ("--data", str(tmp_path / "data1024")),
        ("--model", "nosuch"),
        ("--new-tokens", "250"),
        ("--device", "tpu"),
    ]
    for flag, bad in bad_flags:
        args = base + run + ["--out", str(tmp_path / "gen2")] + [flag, bad]
        r = subprocess.run(args, capture_output=True, text=True)
        assert r.returncode != 0 and r.stderr.count("\n") == 1, r.stderr
        assert flag in r.stderr, r.stderr
        assert ("vocab mismatch" in r.stderr) == bad.endswith("data1024"), r.stderr
    assert files[0].read_text() == before and not (tmp_path / "gen2").exists()
