"""random-LTD (leanlm/methods/ltd.py): exactness of the token router's gather/run/scatter, sampling, schedules,
LayerToken accounting and LR, dense checkpoints, bad input, composition with other methods, and a short
`leanlm train` run with random-LTD."""

from __future__ import annotations

import csv
import itertools
import math
import random
from pathlib import Path

import pytest
import torch
import yaml

from leanlm.cli import main
from leanlm.config import preset
from leanlm.errors import LeanLMError
from leanlm.methods import build_model, install
from leanlm.methods import ltd as ltd_mod
from leanlm.methods.ltd import LTDConfig, RandomLTD, sample_kept, scheduled_length
from leanlm.model import Transformer
from leanlm.training import config_from_dict, train
from leanlm.training.optim import LayerTokens, OptimConfig, schedule_lr, schedule_lr_layer_tokens

WORDS = "the quick brown fox jumps over the lazy dog and runs away from the big red barn".split()


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny4() -> Transformer:
    return Transformer(preset("tiny", n_layers=4)).init_weights(seed=0)


def installed(model: Transformer, r_min: int = 8, n: int = 32, steps: int = 10, **ltd) -> RandomLTD:
    """random-LTD set up for a run of `steps` optimizer steps of n-token windows and installed as the model's token
    router (what the training loop does); r grows from r_min to n over the run (q = 4)."""
    method = RandomLTD(LTDConfig(r_min=r_min, q=4, **ltd))
    method.setup_run(model.cfg, n, steps)
    install(model, [method])
    return method


def one_block_model(seed: int = 0) -> Transformer:
    """A one-block model whose block drops tokens (no exempt layer), with non-trivial weights (norms too)."""
    torch.manual_seed(seed)
    model = Transformer(preset("tiny", n_layers=1))
    for p in model.layers[0].parameters():
        torch.nn.init.normal_(p, std=0.3)
    return model


def block_inputs(seed: int = 0, B: int = 2, n: int = 12):
    model = one_block_model(seed)
    x = torch.randn(B, n, model.cfg.dim)
    cos, sin = model.rope(torch.arange(n).unsqueeze(0), x.dtype)  # (1, 1, n, D)
    return model, x, cos, sin


def routed(model: Transformer, x: torch.Tensor, keep: torch.Tensor, monkeypatch) -> torch.Tensor:
    """The hidden states after the blocks (before the final norm) of a training forward of `model` with random-LTD
    installed, for hidden input x (B, n, C) in place of the embeddings, the router drawing the positions `keep`
    (B, r). Gradients flow back to x."""
    B, n, _ = x.shape
    r = keep.shape[1]
    monkeypatch.setattr(ltd_mod, "sample_kept", lambda g, b, n_, r_, device=None: keep.expand(g, b, r_))
    if model.router is None:
        installed(model, r_min=r, n=n, steps=10, exempt=[], schedule="constant")
    model.router.set_step(model, 0)
    assert model.router.r == r
    out = []
    hooks = [
        model.embed_tokens.register_forward_hook(lambda m, i, o: x),
        model.norm.register_forward_pre_hook(lambda m, i: out.append(i[0])),
    ]
    model.train()
    try:
        model(torch.zeros(B, n, dtype=torch.long))
    finally:
        for h in hooks:
            h.remove()
    return out[0]


# ---------------------------------------------------------------------------------------------------------------------
# the router is exact


def test_full_length_is_bit_identical_to_dense():
    dense, model = tiny4(), tiny4()
    ltd = installed(model)
    ltd.set_step(model, 10)  # the end of the ramp: r = n, the router routes nothing
    assert ltd.r == 32
    x = torch.randint(0, 512, (2, 32))
    dense.train(), model.train()
    a, b = dense(x), model(x)
    assert torch.equal(a, b)
    a.square().mean().backward(), b.square().mean().backward()
    for (name, p), q in zip(dense.named_parameters(), model.parameters()):
        assert torch.equal(p.grad, q.grad), name


def test_eval_and_uninstalled_run_the_plain_model():
    dense, model = tiny4(), tiny4()
    ltd = installed(model)
    ltd.set_step(model, 0)
    assert model.router is ltd and "forward" not in model.__dict__  # a router, not a patched forward
    x = torch.randint(0, 512, (2, 32))
    model.train()
    assert not torch.equal(model(x), dense(x))  # dropping is active in training
    model.eval(), dense.eval()
    assert torch.equal(model(x), dense(x))
    # what the loop saves is built from the config alone: random-LTD is not part of the model
    plain = build_model(model.cfg)
    plain.load_state_dict(model.state_dict())
    assert plain.router is None and plain.methods == () and plain.cfg.arch == "llama"
    plain.train(), dense.train()
    assert torch.equal(plain(x), dense(x)) and "forward" not in plain.__dict__
    # disabled (`ltd.enabled=false`, the dense arm): installing it routes nothing
    off = tiny4()
    ltd = RandomLTD(LTDConfig(enabled=False, r_min=8, q=4))
    ltd.setup_run(off.cfg, 32, 10)
    install(off, [ltd])
    ltd.set_step(off, 0)
    off.train()
    assert off.router is None and ltd.r == 32 and torch.equal(off(x), dense(x))


def test_dropped_positions_unchanged_and_kept_rows_are_the_block_on_the_subsequence(monkeypatch):
    model, x, cos, sin = block_inputs()
    block = model.layers[0]
    keep = torch.tensor([[0, 3, 4, 9, 11], [1, 2, 5, 6, 7]])  # (B, r), sorted
    y = routed(model, x, keep, monkeypatch)
    for b in range(2):
        dropped = [i for i in range(12) if i not in keep[b]]
        assert torch.equal(y[b, dropped], x[b, dropped])
        # kept rows: the block on the kept tokens alone, each with its ORIGINAL RoPE angle. Not bit-identical: the
        # reference runs the block on 5 rows of one sample, the model on 2 x 5 rows at once, and the matmul kernels
        # block their sums differently for different row counts (1e-6 to 1.4e-6 seen). The outputs reach ~7, where
        # one float32 ulp is 4.8e-7, and each is a sum over the block's 64- and 160-wide matmuls: a few ulps of
        # reordering, so atol=1e-5 (~20 ulps) is float rounding with headroom, 1e5 times below the ~1 that the
        # wrong-angle check below moves the rows by
        ref = block(x[b : b + 1, keep[b]], cos[:, :, keep[b]], sin[:, :, keep[b]])
        torch.testing.assert_close(y[b, keep[b]], ref[0], rtol=0, atol=1e-5)
    # a shifted angle table (positions 0..r-1, DeepSpeed's behaviour on RoPE) gives a different result
    wrong = block(x[:1, keep[0]], cos[:, :, :5], sin[:, :, :5])
    assert not torch.allclose(wrong[0], y[0, keep[0]], atol=1e-4)


def test_kept_token_outputs_are_causal(monkeypatch):
    model, x, cos, sin = block_inputs()
    keep = torch.tensor([[0, 2, 3, 6, 8, 10], [1, 4, 5, 7, 9, 11]])
    y = routed(model, x, keep, monkeypatch)
    for j in range(12):
        x2 = x.clone()
        x2[:, j] += 1.0
        y2 = routed(model, x2, keep, monkeypatch)
        assert torch.equal(y2[:, :j], y[:, :j]), j  # nothing before position j moves
    monkeypatch.undo()
    # and the whole model in training: perturbing token j leaves the logits before j unchanged (same draws)
    model = tiny4()
    ltd = installed(model)
    ltd.set_step(model, 0)
    model.train()
    idx = torch.randint(0, 512, (2, 32))
    torch.manual_seed(1)
    ref = model(idx)
    for j in (5, 17, 31):
        idx2 = idx.clone()
        idx2[:, j] = (idx2[:, j] + 1) % 512
        torch.manual_seed(1)
        assert torch.equal(model(idx2)[:, :j], ref[:, :j])


def test_gradients_equal_a_mask_based_reference(monkeypatch):
    """The spec's reference: the block on the full sequence with dropped tokens masked out as keys (and as queries,
    save themselves), then the input put back at the dropped positions. Outputs, input and parameter gradients agree."""
    model, x, cos, sin = block_inputs(seed=3)
    block = model.layers[0]
    B, n, _ = x.shape
    keep = torch.tensor([[1, 2, 4, 7, 8, 11], [0, 3, 5, 6, 9, 10]])
    kept = torch.zeros(B, n, dtype=torch.bool).scatter(1, keep, True)  # (B, n)
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    mask = causal & kept[:, None, :] & kept[:, :, None]  # (B, n, n): kept query i sees kept key j <= i
    mask |= torch.eye(n, dtype=torch.bool)  # dropped queries see only themselves (no all-masked rows)
    w = torch.randn(B, n, x.shape[-1])  # a loss that weights every output differently

    def grads(fn):
        block.zero_grad()
        xi = x.clone().requires_grad_(True)
        y = fn(xi)
        (y * w).sum().backward()
        return y.detach(), xi.grad, [p.grad.clone() for p in block.parameters()]

    ours = grads(lambda xi: routed(model, xi, keep, monkeypatch))
    ref = grads(lambda xi: torch.where(kept[..., None], block(xi, cos, sin, mask=mask[:, None]), xi))
    for a, b in zip([ours[0], ours[1], *ours[2]], [ref[0], ref[1], *ref[2]]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_layerwise_draws_and_shared_subset(monkeypatch):
    draws = []
    real = ltd_mod.sample_kept

    def spy(g, b, n, r, device=None):
        draws.append((g, b, n, r))
        return real(g, b, n, r, device)

    monkeypatch.setattr(ltd_mod, "sample_kept", spy)
    x = torch.randint(0, 512, (2, 32))
    for layerwise, g in ((True, 2), (False, 1)):
        model = tiny4()
        ltd = installed(model, layerwise=layerwise)
        ltd.set_step(model, 0)
        model.train()
        model(x)
        assert draws[-1] == (g, 2, 32, 8)  # one draw per forward: per dropping layer, or one shared by all
    # exempt layers: only layer 0 sees everything, three layers drop
    model = tiny4()
    ltd = installed(model, exempt=[0])
    assert sorted(ltd.drop) == [1, 2, 3]
    assert ltd.flow("train", 32, 0)[0] == [32, 8, 8, 8]


# ---------------------------------------------------------------------------------------------------------------------
# sampling


def test_sampling_is_uniform_without_replacement():
    torch.manual_seed(1234)
    n, r, rows = 7, 3, 35_000
    keep = sample_kept(5, rows // 5, n, r).reshape(-1, r)  # (rows, r)
    assert (keep.diff(dim=-1) > 0).all()  # sorted, hence distinct: without replacement
    assert keep.min() >= 0 and keep.max() < n
    # every one of the C(7, 3) = 35 subsets equally likely: chi-square with 34 dof, 99.9% quantile 65.25
    subsets = {s: i for i, s in enumerate(itertools.combinations(range(n), r))}
    counts = torch.bincount(torch.tensor([subsets[tuple(row)] for row in keep.tolist()]), minlength=len(subsets))
    expected = rows / len(subsets)
    chi2 = ((counts.double() - expected) ** 2 / expected).sum().item()
    assert chi2 < 65.25, chi2
    # every position kept with probability r / n: chi-square with 6 dof, 99.9% quantile 22.46
    pos = torch.bincount(keep.flatten(), minlength=n).double()
    e = rows * r / n
    assert ((pos - e) ** 2 / e).sum().item() < 22.46


# ---------------------------------------------------------------------------------------------------------------------
# schedules, LayerTokens, LR


def test_kept_length_hand_computed():
    r = [scheduled_length(t, n=256, r_min=64, q=16, schedule_steps=10) for t in (0, 1, 5, 9, 10, 11)]
    # t=1: floor(64 + 19.2) = 83 -> 80; t=5: 64 + 96 = 160; t=9: floor(64 + 172.8) = 236 -> 224
    assert r == [64, 80, 160, 224, 256, 256]
    # n not a multiple of q (the ViT recipe): r(T) = 192 < 197, full length two steps later
    vit = [scheduled_length(t, n=197, r_min=32, q=8, schedule_steps=100) for t in (100, 101, 102)]
    assert vit == [192, 192, 197]
    const = [scheduled_length(t, n=256, r_min=100, q=16, schedule_steps=5, schedule="constant") for t in (0, 4, 5)]
    assert const == [100, 100, 256]


def test_layer_tokens_and_budget_hand_computed():
    # 4 layers, first and last exempt; 2 windows of 32 tokens per step; r: 8 8 12 12 16 ... 32 from step 10
    model = tiny4()
    ltd = installed(model, steps=10)
    lt = LayerTokens(4, 32, samples=2, router=ltd)
    assert [ltd.kept(t) for t in range(4)] == [8, 8, 12, 12]
    assert lt.at(0) == 2 * (8 * 2 + 32 * 2) == 160
    assert lt.at(2) == 2 * (12 * 2 + 32 * 2) == 176
    assert lt.at(10) == 2 * 32 * 4 == 256  # full length: a dense step
    dense = LayerTokens(4, 32, samples=2)
    assert dense.at(0) == 256 and dense.steps_for(64 * 5) == 5
    # budget of 5 dense steps = 1280 LayerTokens: 160 + 160 + 176 + 176 + 192 + 208 = 1072, + 208 = 1280 -> 7 steps
    assert lt.steps_for(64 * 5) == 7
    assert lt.total(7) == 1280


def test_layer_token_lr_hand_computed():
    opt = OptimConfig(lr=1.0, warmup_steps=2, schedule="cosine", min_lr_ratio=0.1)
    # dense: identical to the step schedule
    for t in range(10):
        assert schedule_lr_layer_tokens(64 * t, 64 * 10, 64, opt) == pytest.approx(schedule_lr(t, opt, 10))
    # random-LTD after one step of the plan above: 40 layer-averaged tokens = 0.625 dense steps -> warmup
    assert schedule_lr_layer_tokens(40, 320, 64, opt) == pytest.approx((0.625 + 1) / 2)
    # after 2.75 of 5 dense steps (176 tokens): cosine p = (2.75 - 2) / 3 = 0.25
    want = 0.1 + 0.45 * (1 + math.cos(math.pi * 0.25))
    assert schedule_lr_layer_tokens(176, 320, 64, opt) == pytest.approx(want)


def test_flops_reflect_the_dropped_work():
    cfg = preset("cpu-10m")
    with torch.device("meta"):  # FLOPs need the shapes only
        model = Transformer(cfg)
    full = model.flops("train", 256)  # dense: no router
    # r = 128 of 256 in the 4 middle layers until step 5, then the whole window
    ltd = RandomLTD(LTDConfig(r_min=128, q=16, schedule="constant", schedule_steps=5))
    ltd.setup_run(cfg, 256, 10)
    install(model, [ltd])
    ltd.set_step(model, 5)
    assert ltd.r == 256 and model.flops("train", 256) == pytest.approx(full)
    ltd.set_step(model, 0)
    half = model.flops("train", 256)
    assert ltd.r == 128 and model.flops("train", 256) == half
    head = 3 * 2 * cfg.dim * cfg.vocab_size
    per_layer = (full - head) / 6
    assert half == pytest.approx(head + 2 * per_layer + 4 * per_layer * 0.5, rel=0.02)  # attention halves again
    assert half < head + 2 * per_layer + 4 * per_layer * 0.5


def test_state_dict_round_trips_into_the_dense_model():
    model = tiny4()
    ltd = installed(model)
    ltd.set_step(model, 0)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x = torch.randint(0, 512, (2, 32))
    for _ in range(2):
        model(x).logsumexp(-1).mean().backward()
        opt.step()
        opt.zero_grad()
    dense = Transformer(model.cfg)
    assert list(dense.state_dict()) == list(model.state_dict())
    dense.load_state_dict(model.state_dict(), strict=True)
    model.eval(), dense.eval()
    assert torch.equal(dense(x), model(x))


# ---------------------------------------------------------------------------------------------------------------------
# configs and bad input


def raw_cfg(tmp_path: Path, data_dir: Path | str = "unused", ltd: dict | None = None, **run) -> dict:
    return {
        "model": {"preset": "tiny", "n_layers": 4},
        "data": {"dir": str(data_dir)},
        "optim": {"lr": 3e-3, "warmup_steps": 2},
        "run": {"out": str(tmp_path / "run"), "steps": 8, "batch_size": 4, "seq_len": 32, "progress": False, **run},
        **({"ltd": ltd} if ltd is not None else {}),
    }


@pytest.mark.parametrize(
    "ltd, match",
    [
        ({"q": 0}, r"ltd\.q: must be >= 1"),
        ({"r_min": 8, "q": 16}, r"ltd\.q: must be <= r_min=8"),
        ({"r_min": 0}, r"ltd\.r_min: must be >= 1"),
        ({"schedule": "cosine"}, r"ltd\.schedule: must be one of linear, constant"),
        ({"r_mn": 8}, r"unknown key 'ltd\.r_mn'"),
        ({"r_min": "8"}, r"ltd\.r_min: expected int"),
        ({"exempt": [0, "last"]}, r"ltd\.exempt: must be a list of layer indices"),
    ],
)
def test_bad_ltd_config(tmp_path, ltd, match):
    with pytest.raises(LeanLMError, match=match):
        config_from_dict(raw_cfg(tmp_path, ltd=ltd))


def test_ltd_section_absent_or_disabled():
    # disabled: no check against the run (r_min > seq_len is fine), nothing dropped, a dense run's LayerTokens
    ltd = RandomLTD(LTDConfig(enabled=False, r_min=1000))
    ltd.setup_run(preset("tiny"), 32, 8)
    model = Transformer(preset("tiny"))
    install(model, [ltd])
    assert model.router is None and ltd.kept(0) == 32
    lt = LayerTokens(model.cfg.n_layers, 32, samples=4, router=ltd.token_router())
    assert lt.at(0) == 4 * 32 * 2 and lt.steps_for(8 * 4 * 32) == 8
    assert config_from_dict(raw_cfg(Path("x"))).train_methods == {}


@pytest.mark.parametrize(
    "ltd, run, match",
    [
        ({"r_min": 64}, {}, r"ltd\.r_min=64 is larger than the sequence \(run\.seq_len=32\)"),
        ({"r_min": 8, "q": 8, "schedule_steps": 9}, {}, r"ltd\.schedule_steps=9 is longer than the run \(8 optimizer"),
        ({"r_min": 8, "q": 8, "exempt": [0, 4]}, {}, r"ltd\.exempt: layer 4 is out of range for a 4-layer model"),
        # with a LayerToken budget the schedule may span at most the dense run's steps (here 320 / (2 * 32) = 5)
        (
            {"r_min": 8, "q": 4, "schedule_steps": 6},
            {"layer_token_budget": 320, "batch_size": 2},
            r"ltd\.schedule_steps=6 is longer than the run \(5 optimizer",
        ),
    ],
)
def test_bad_input_names_the_key_before_any_work(tmp_path, ltd, run, match):
    with pytest.raises(LeanLMError, match=match):  # data.dir does not exist: the check comes first
        train(config_from_dict(raw_cfg(tmp_path, ltd=ltd, **run)))


def test_bad_input_through_the_cli_exits_2(tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(raw_cfg(tmp_path, ltd={"r_min": 8, "q": 8})))
    assert main(["train", "--config", str(config), "--set", "ltd.q=0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["leanlm: error: ltd.q: must be >= 1 (got 0)"]


def test_subllm_is_refused_before_any_work(tmp_path):
    """SUBLLM routes the model's tokens itself: random-LTD cannot also be its token router."""
    model = build_model(preset("tiny", n_layers=4, subllm={"structure": "T(TT)T"}))
    with pytest.raises(LeanLMError, match="ltd: subllm already routes this model's tokens; they cannot be combined"):
        installed(model)
    raw = raw_cfg(tmp_path, ltd={"r_min": 8, "q": 4})
    raw["model"]["subllm"] = {"structure": "T(TT)T"}
    with pytest.raises(LeanLMError, match="ltd: subllm already routes this model's tokens"):
        train(config_from_dict(raw))  # data.dir does not exist: the check comes first


# ---------------------------------------------------------------------------------------------------------------------
# training


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    from leanlm.data import prepare

    rng = random.Random(0)
    corpus = tmp_path_factory.mktemp("corpus")
    for i in range(12):
        (corpus / f"doc{i}.txt").write_text(" ".join(rng.choice(WORDS) for _ in range(800)))
    out = tmp_path_factory.mktemp("prepared") / "data"
    prepare([str(corpus)], out, vocab_size=300, progress=False)
    return out


def read_metrics(out: Path) -> list[dict]:
    with open(out / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_train_with_ltd_through_the_cli(tmp_path, data_dir, capsys):
    """`leanlm train` with random-LTD at an equal LayerToken budget and the LayerToken LR: the logged r, layer tokens
    and LR equal the hand-computed plan; the result is a dense checkpoint."""
    config = tmp_path / "ltd.yaml"
    raw = raw_cfg(tmp_path, data_dir, ltd={"r_min": 8, "q": 4, "schedule_steps": 5}, log_every=1, eval_every=0)
    raw["model"]["vocab_size"] = 300
    raw["optim"].update(lr_index="layer_tokens", schedule="cosine", min_lr_ratio=0.1)
    config.write_text(yaml.safe_dump(raw))
    sets = ["--set", "run.layer_token_budget=320", "--set", "run.batch_size=2", "--json"]  # 5 dense steps
    assert main(["train", "--config", str(config), *sets]) == 0
    capsys.readouterr()
    out = tmp_path / "run"
    rows = read_metrics(out)
    assert list(rows[0])[:4] == ["step", "tokens", "layer_tokens", "loss"]
    # r(t) = 4 * floor(floor(8 + t / 5 * 24) / 4); LayerTokens 2 * (2r + 2 * 32) = 4r + 128 per step, layer-averaged
    # r + 32: 40 44 48 52 56 64 64 -> cumulative 40 ... 368 >= 320 after 7 steps
    assert [int(r["ltd_r"]) for r in rows] == [8, 12, 16, 20, 24, 32, 32]
    assert [int(r["layer_tokens"]) for r in rows] == [40, 84, 132, 184, 240, 304, 368]
    opt = OptimConfig(lr=3e-3, warmup_steps=2, min_lr_ratio=0.1)
    consumed = [0, 40, 84, 132, 184, 240, 304]  # before each update; the schedule spans the budget, 320
    want = [schedule_lr_layer_tokens(c, 320, 64, opt) for c in consumed]
    assert [float(r["lr"]) for r in rows] == pytest.approx(want)
    assert float(rows[0]["flops_per_token"]) < float(rows[-1]["flops_per_token"])
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["ltd"]["r_min"] == 8 and saved["run"]["steps"] == 7
    # the final checkpoint is the dense model
    from leanlm.checkpoint import load_model

    model, _ = load_model(str(out / "final"))
    assert type(model) is Transformer and model.cfg.arch == "llama" and model.router is None and model.methods == ()
    # the dense arm of the same config at the same budget: 5 steps, the same LR schedule indexed by tokens
    dense_argv = [*sets, "--set", "ltd.enabled=false", "--out", str(tmp_path / "d")]
    assert main(["train", "--config", str(config), *dense_argv]) == 0
    dense = read_metrics(tmp_path / "d")
    assert [int(r["layer_tokens"]) for r in dense] == [64, 128, 192, 256, 320]
    assert [float(r["lr"]) for r in dense] == pytest.approx([schedule_lr(t, opt, 5) for t in range(5)])


def test_exact_resume_with_ltd(tmp_path, data_dir, monkeypatch):
    """Kept positions come from the global torch RNG, which checkpoints save: a resumed random-LTD run repeats the
    straight run's losses and weights exactly."""
    from safetensors.torch import load_file

    from leanlm.methods.base import Method
    from leanlm.training import loop

    def cfg(out: Path, **run):
        raw = raw_cfg(tmp_path, data_dir, ltd={"r_min": 8, "q": 4, "schedule_steps": 5}, **run)
        raw["model"]["vocab_size"] = 300
        raw["run"].update(out=str(out), layer_token_budget=320, batch_size=2, save_every=4, eval_every=0, log_every=1)
        return config_from_dict(raw)

    train(cfg(tmp_path / "straight"))

    class CrashAtStep4(Method):
        name = "crash"

        def set_step(self, model, step: int) -> None:  # the hook the loop calls before each step
            if step == 4:
                raise RuntimeError("simulated crash")

    def build_crashing(model_cfg):
        model = build_model(model_cfg)
        install(model, [CrashAtStep4(None)])
        return model

    monkeypatch.setattr(loop, "build_model", build_crashing)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(cfg(tmp_path / "split"))
    monkeypatch.undo()
    res = train(cfg(tmp_path / "split", resume=True))
    assert res["steps"] == 7 and res["layer_tokens"] == 368

    def rows(out):
        return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in read_metrics(out)]

    assert rows(tmp_path / "split") == rows(tmp_path / "straight")
    a, b = (load_file(str(tmp_path / d / "final" / "model.safetensors")) for d in ("straight", "split"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_lte_model_trains_with_ltd(tmp_path, data_dir):
    """random-LTD composes with LTE (an FFN, not a token router): the LTE model's dropping layers route only the kept
    tokens through their experts, the auxiliary losses still apply, and the executed FLOPs drop."""
    lte = {"expert_size": 32, "eta": 0.5}
    model = build_model(preset("tiny", n_layers=4, lte=lte)).init_weights(seed=0)
    dense_flops = model.flops("train", 32)
    ltd = installed(model)
    ltd.set_step(model, 0)
    assert model.router is ltd and [m.name for m in model.methods] == ["lte", "ltd"]
    assert model.flops("train", 32) < dense_flops
    model.train()
    loss = model(torch.randint(0, 512, (2, 32))).logsumexp(-1).mean()
    aux = model.methods[0].aux_loss(model)
    assert aux is not None and torch.isfinite(aux)
    (loss + aux).backward()
    assert model.layers[1].mlp.router.weight.grad.abs().sum() > 0
    # and through `leanlm train`: an LTE model from scratch with an ltd section
    raw = raw_cfg(tmp_path, data_dir, ltd={"r_min": 8, "q": 4}, steps=6, log_every=1, eval_every=0, save_every=0)
    raw["model"].update(vocab_size=300, lte=lte)
    res = train(config_from_dict(raw))
    rows = read_metrics(tmp_path / "run")
    assert [int(r["ltd_r"]) for r in rows] == [8, 12, 16, 20, 24, 28]
    assert all(math.isfinite(float(r["loss"])) and r["lte_eff_loss"] for r in rows)
    flops = [float(r["flops_per_token"]) for r in rows]
    lte_dense = build_model(preset("tiny", n_layers=4, vocab_size=300, lte=lte)).flops("train", 32)
    assert flops == sorted(flops) and flops[-1] < lte_dense and res["flops_per_token"] < lte_dense
    from leanlm.checkpoint import load_model

    trained, _ = load_model(str(tmp_path / "run" / "final"))
    assert trained.cfg.arch == "lte" and trained.router is None


def test_speed_script_device_errors_are_one_line():
    """benchmarks/ltd_speed.py: an unknown --device, or cuda where there is none, fails in one line naming the flag."""
    import subprocess
    import sys

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "ltd_speed.py"
    for bad in ["tpu"] + ([] if torch.cuda.is_available() else ["cuda"]):
        cmd = [sys.executable, str(script), f"--device={bad}"]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        assert r.returncode != 0 and r.stderr.count("\n") == 1 and "--device" in r.stderr, r.stderr
