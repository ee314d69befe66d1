"""Weight quantization (leanlm.quant, the `quant` method): formats, packed checkpoints, QAT, FlexQ, the CLI."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import needs_smollm2
from test_train import corpus, data_dir, make_cfg  # noqa: F401 (fixtures)

from leanlm.checkpoint import load_model, quantize, save_checkpoint
from leanlm.cli import main
from leanlm.config import preset
from leanlm.errors import LeanLMError
from leanlm.methods import add_methods, build_model
from leanlm.methods.quant import QuantConfig, float_state, with_quant
from leanlm.quant import (
    QuantLinear,
    dequantize,
    fake_quantize,
    pack_int4,
    pack_ternary,
    quantize_activations,
    unpack_int4,
    unpack_ternary,
    weight_bytes,
)
from leanlm.quant import quantize as quantize_weight
from leanlm.training import train

CASES = [("int8", 96), ("int8", 32), ("int6", 96), ("int4", 32), ("int4", 96), ("ternary", 32), ("ternary", 96)]


def tiny(**kw):
    return preset("tiny", ffn_dim=192, **kw)  # every width a multiple of 32 and 64


@pytest.mark.parametrize("fmt,group", CASES)
def test_quantize_error_is_bounded_by_half_a_step(fmt, group):
    torch.manual_seed(0)
    w = torch.randn(37, 192)
    packed = quantize_weight(w, fmt, group)
    d = dequantize(fmt, **packed)
    s = packed["scales"].float().repeat_interleave(group, dim=1)  # (N, K): each weight's step
    if fmt == "ternary":  # {-s, 0, s}: only three values per group, whatever the weights
        assert torch.all((d == 0) | (d - s).abs().le(1e-6) | (d + s).abs().le(1e-6))
        return
    # half a step, plus the fp16 rounding of the scale (and min) times the largest code
    slack = {"int8": 127, "int6": 32, "int4": 16}[fmt] * s * 2**-10
    assert torch.all((d - w).abs() <= s / 2 + slack + 1e-6)
    if fmt == "int6":
        assert packed["qweight"].min() >= -32 and packed["qweight"].max() <= 31


def test_packing_round_trips():
    q4 = torch.randint(0, 16, (5, 96), dtype=torch.uint8)
    assert torch.equal(unpack_int4(pack_int4(q4)), q4)
    # GGUF's nibble order: byte b of a run holds inputs b (low) and b + 16 (high)
    assert pack_int4(q4)[0, 3] == q4[0, 3] | (q4[0, 19] << 4)
    c = torch.randint(0, 3, (5, 96), dtype=torch.uint8)
    assert torch.equal(unpack_ternary(pack_ternary(c)), c.to(torch.int8) - 1)


def test_bad_group_sizes_name_the_layer():
    with pytest.raises(LeanLMError, match="group size 64 does not divide the layer's 160 inputs"):
        with_quant(preset("tiny"), format="ternary")  # tiny's FFN is 160 wide
    with pytest.raises(LeanLMError, match="multiple of 32"):
        with_quant(tiny(), format="int4", group_size=16)
    with pytest.raises(LeanLMError, match="model.quant.format"):
        with_quant(tiny(), format="int3")


@pytest.mark.parametrize("fmt", ["int8", "int6", "int4", "ternary"])
@pytest.mark.parametrize("tie", [False, True])
def test_quantized_model_saves_loads_and_matches_its_dequantized_twin(tmp_path, fmt, tie):
    src = build_model(tiny(tie_embeddings=tie)).init_weights(seed=0).eval()
    qm = add_methods(src, with_quant(src.cfg, format=fmt)).eval()
    x = torch.randint(0, 512, (2, 24))
    # the same model in float: the packed weights dequantized into the baseline
    twin = build_model(src.cfg).eval()
    twin.load_state_dict({k: v for k, v in float_state(qm).items() if k in twin.state_dict()}, strict=False)
    twin.tie_head()
    with torch.no_grad():
        assert torch.allclose(qm(x), twin(x), atol=1e-5, rtol=0)
        save_checkpoint(qm, None, tmp_path / "q")
        meta = json.loads((tmp_path / "q" / "config.json").read_text())
        assert meta["arch"] == "quant" and meta["model"]["quant"]["format"] == fmt
        loaded, _ = load_model(str(tmp_path / "q"))
        assert torch.equal(loaded(x), qm(x))
    assert weight_bytes(qm) < 0.3 * weight_bytes(src)
    assert weight_bytes(loaded) == weight_bytes(qm)


def test_quantized_cached_decode_equals_full_forward():
    qm = add_methods(build_model(tiny()).init_weights(seed=0), with_quant(tiny(), format="int4")).eval()
    x = torch.randint(0, 512, (1, 20))
    with torch.no_grad():
        full = qm(x)
        qm.setup_caches(1, 32)
        steps = [qm(x[:, :12], start=0)] + [qm(x[:, t : t + 1], start=t) for t in range(12, 20)]
        qm.reset_caches()
    assert torch.allclose(torch.cat(steps, 1), full, atol=1e-4)


def test_model_casts_keep_packed_dtypes():
    qm = add_methods(build_model(tiny()).init_weights(seed=0), with_quant(tiny(), format="int4"))
    lin = qm.layers[0].mlp.gate_up_proj
    before = lin.scales.clone()
    qm.to(torch.bfloat16).float()
    assert lin.scales.dtype == torch.float16 and torch.equal(lin.scales, before)
    assert lin.qweight.dtype == torch.uint8


def test_int8_per_channel_matmul_matches_dequantized():
    torch.manual_seed(0)
    lin = QuantLinear(96, 40, "int8", 96)
    for k, v in quantize_weight(torch.randn(40, 96), "int8", 96).items():
        getattr(lin, k).copy_(v)
    for x in (torch.randn(1, 1, 96), torch.randn(3, 5, 96)):  # one row: aten's int8 matmul; more: dequantized
        assert torch.allclose(lin(x), x @ lin.weight.T, atol=1e-4)


def test_fake_quantize_is_ternary_with_a_straight_through_gradient():
    w = torch.randn(8, 64, requires_grad=True)
    q = fake_quantize(w, "ternary", 32)
    for row in q.detach().view(8, 2, 32):
        for group in row:
            assert len(set(group.abs().unique().tolist()) - {0.0}) <= 1  # {-s, 0, s}
    (q * torch.arange(64.0)).sum().backward()
    assert torch.equal(w.grad, torch.arange(64.0).expand(8, 64))  # the STE passes the gradient through


def test_activation_quantizer_rounds_per_token():
    x = torch.randn(4, 7, 64)
    a6 = quantize_activations(x, 6)
    step = x.abs().amax(-1, keepdim=True) / 31
    assert torch.all((a6 - x).abs() <= step / 2 + 1e-6)
    assert (a6 / step).sub((a6 / step).round()).abs().max() < 1e-4


def test_flexq_calibration_picks_the_most_sensitive_layers_deterministically():
    cfg = with_quant(tiny(), format="int6", act_bits=6, act8_count=2)
    src = build_model(tiny()).init_weights(seed=0)
    batches = [torch.randint(0, 512, (2, 32), generator=torch.Generator().manual_seed(i)) for i in range(2)]
    chosen = []
    for _ in range(2):
        qm = add_methods(src, cfg).eval()
        (method,) = [m for m in qm.methods if m.name == "quant"]
        out = method.calibrate(qm, batches)
        chosen.append(out["quant.act8_layers"])
        assert qm.cfg.methods["quant"].act8_layers == chosen[-1]
        acts = {n: m.act_bits for n, m in qm.named_modules() if isinstance(m, QuantLinear) and n != "lm_head"}
        assert sorted(n for n, b in acts.items() if b == 8) == chosen[-1]
        assert sum(b == 6 for b in acts.values()) == len(acts) - 2
    assert chosen[0] == chosen[1] and len(chosen[0]) == 2


def test_quantize_verb_writes_a_checkpoint_every_verb_loads(tmp_path, capsys):
    assert main(["quantize", "tiny", str(tmp_path / "q"), "--method", "int4", "--head", "int4", "--json"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["quant"]["format"] == "int4" and res["weight_bytes_vs_float32"] < 0.2
    assert (
        main(
            ["bench", "--model", str(tmp_path / "q"), "--what", "decode", "--prompt-len", "8"]
            + ["--new-tokens", "4", "--repeats", "1", "--warmup", "0", "--json"]
        )
        == 0
    )
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["variants"]["A"]["weight_bytes"] == weight_bytes(load_model(str(tmp_path / "q"))[0])
    # a group size that does not divide the layer: one line, exit 2
    assert main(["quantize", "tiny", str(tmp_path / "bad"), "--method", "int8", "--group-size", "48"]) == 2
    assert "group size 48 does not divide" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--head-group-size", "48"], "model.quant.head_group_size: group size 48 does not divide"),
        (["--group-size", "-2"], "model.quant.group_size: must be a positive group size"),
        (["--act8-count", "-1"], "model.quant.act8_count: must be a non-negative integer"),
        (["--act-bits", "6", "--act8-count", "2"], "--act8-count: FlexQ's A8 fallback ranks layers on text"),
    ],
)
def test_bad_quantize_settings_are_one_line_errors(tmp_path, capsys, flags, message):
    assert main(["quantize", "tiny", str(tmp_path / "bad"), "--method", "int6", *flags]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "bad").exists()


def test_requantizing_a_quantized_model_starts_from_its_dequantized_weights(tmp_path):
    quantize("tiny", tmp_path / "a", method="int4")
    res = quantize(str(tmp_path / "a"), tmp_path / "b", method="int8")
    a, _ = load_model(str(tmp_path / "a"))
    b, _ = load_model(str(tmp_path / "b"))
    assert res["quant"]["format"] == "int8"
    w_a, w_b = a.layers[0].self_attn.o_proj.weight, b.layers[0].self_attn.o_proj.weight
    assert (w_a - w_b).abs().max() <= w_a.abs().amax(1, keepdim=True).max() / 127


def test_packed_model_refuses_to_train_and_qat_trains_then_packs(tmp_path, data_dir):  # noqa: F811
    quantize("tiny", tmp_path / "q", method="int8", head="float")
    with pytest.raises(LeanLMError, match="cannot train: train with model.quant.qat"):
        train(make_cfg(tmp_path / "run0", data_dir, model=None, init=str(tmp_path / "q")))
    # QAT: a float checkpoint, ternary fake quantization in every forward, then packed
    train(make_cfg(tmp_path / "fp", data_dir, model={"preset": "tiny", "vocab_size": 512, "ffn_dim": 192}))
    qat = {"quant": {"format": "ternary", "group_size": 32, "head": "float", "qat": True}}
    train(make_cfg(tmp_path / "qat", data_dir, model=qat, init=str(tmp_path / "fp" / "final")))
    model, _ = load_model(str(tmp_path / "qat" / "final"))
    assert model.cfg.methods["quant"] == QuantConfig(format="ternary", group_size=32, head="float", qat=True)
    res = quantize(str(tmp_path / "qat" / "final"), tmp_path / "packed", method="ternary", group_size=32, head="float")
    packed, _ = load_model(res["out"])
    x = torch.randint(0, 300, (1, 16))
    with torch.no_grad():  # the packed model computes what the QAT model computed in training
        assert torch.allclose(packed(x), model(x), atol=1e-4)


@needs_smollm2
@pytest.mark.slow
def test_smollm2_loads_natively_from_its_q4_1_file_then_from_the_cache():
    model, tok = load_model("smollm2-135m")
    q = model.cfg.methods["quant"]
    assert (q.format, q.group_size, q.head, q.head_group_size) == ("int4", 32, "int8", 32)
    again, tok2 = load_model("smollm2-135m")  # from the cached checkpoint this time
    x = torch.tensor([tok.encode("The quick brown fox")])
    assert tok2.encode("The quick brown fox") == x[0].tolist()
    dense, _ = load_model("smollm2-135m", dtype="float32")  # the dequantizing path: the same weights
    with torch.no_grad():
        assert torch.equal(again(x), model(x))
        assert torch.allclose(model(x), dense(x), atol=1e-4, rtol=0)
