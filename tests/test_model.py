"""The dense baseline: HF logit parity, causality, gradients, FLOP accounting, config validation."""

from __future__ import annotations

import pytest
import torch

from leanlm.config import PRESETS, model_config, preset
from leanlm.errors import LeanLMError
from leanlm.model import Transformer

transformers = pytest.importorskip("transformers")

LLAMA3 = {
    "type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}


@pytest.mark.parametrize(
    "overrides",
    [
        {},  # GQA (4 heads, 2 kv heads), untied
        {"tie_embeddings": True, "n_kv_heads": 4},
        {"rope_scaling": LLAMA3, "n_kv_heads": 1},
        {"rope_scaling": {"type": "linear", "factor": 2.0}, "rope_theta": 500000.0, "norm_eps": 1e-6},
    ],
)
def test_logits_match_hf_llama(overrides):
    from leanlm.hf import to_hf_model

    model = Transformer(preset("tiny", **overrides)).init_weights(seed=1).eval()
    hf = to_hf_model(model)
    x = torch.randint(0, model.cfg.vocab_size, (2, 200))
    with torch.no_grad():
        diff = (model(x) - hf(x).logits).abs().max().item()
    assert diff <= 1e-4


def test_output_shapes_and_last_only(tiny_model):
    x = torch.randint(0, 512, (3, 17))
    assert tiny_model(x).shape == (3, 17, 512)
    full = tiny_model(x)
    assert torch.allclose(tiny_model(x, last_only=True)[:, 0], full[:, -1], atol=1e-6)


def test_causal(tiny_model):
    x = torch.randint(0, 512, (1, 40))
    y = x.clone()
    y[0, 25:] = torch.randint(0, 512, (15,))
    with torch.no_grad():
        a, b = tiny_model(x), tiny_model(y)
    assert torch.equal(a[:, :25], b[:, :25])
    assert not torch.allclose(a[:, 25:], b[:, 25:])


def test_gradients_reach_every_parameter():
    model = Transformer(preset("tiny", qkv_bias=True)).init_weights(seed=0)
    x = torch.randint(0, 512, (2, 16))
    logits = model(x[:, :-1])
    torch.nn.functional.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten()).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_init_is_deterministic_and_scaled():
    a = Transformer(preset("tiny")).init_weights(seed=3)
    b = Transformer(preset("tiny")).init_weights(seed=3)
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(p, q), n
    assert abs(a.layers[0].self_attn.qkv_proj.weight.std().item() - 0.02) < 0.003
    assert a.layers[0].mlp.down_proj.weight.std() < a.layers[0].mlp.gate_up_proj.weight.std() / 1.5
    assert torch.all(a.norm.weight == 1)


def test_flops_per_token_counts_matmuls_and_attention():
    cfg = preset("tiny")
    model = Transformer(cfg)
    matmul_params = sum(p.numel() for n, p in model.named_parameters() if p.dim() == 2 and "embed" not in n)
    T = 128
    attn = 4 * cfg.n_layers * cfg.n_heads * cfg.head_dim * (T + 1) / 2
    assert model.flops("prefill", T) == pytest.approx(2 * matmul_params + attn)
    assert model.flops("train", T) == pytest.approx(3 * (2 * matmul_params + attn))
    # decode at context c attends to c keys
    assert model.flops("decode", 10) == pytest.approx(2 * matmul_params + 40 * cfg.n_layers * 64)
    with pytest.raises(LeanLMError, match="unknown pass 'forward'"):
        model.flops("forward", T)


def test_param_count_ties_embeddings():
    untied = Transformer(preset("tiny")).num_params()
    tied = Transformer(preset("tiny", tie_embeddings=True)).num_params()
    assert untied - tied == 512 * 64


def test_presets_build_and_smollm2_size():
    for name in PRESETS:
        preset(name)
    with torch.device("meta"):
        assert Transformer(preset("smollm2-135m")).num_params() == 134_515_008
        assert abs(Transformer(preset("llama-1.3b")).num_params() / 1e9 - 1.345) < 0.01


@pytest.mark.parametrize(
    "bad, needle",
    [
        ({"dim": 0}, "model.dim"),
        ({"n_heads": 4, "n_kv_heads": 3}, "model.n_kv_heads"),
        ({"dtype": "int8"}, "model.dtype"),
        ({"rope_scaling": {"type": "yarn", "factor": 2.0}}, "model.rope_scaling"),
        ({"rope_scaling": {"type": "llama3", "factor": 2.0}}, "model.rope_scaling"),
        ({"norm_eps": 0.0}, "model.norm_eps"),
    ],
)
def test_config_validation_names_the_field(bad, needle):
    with pytest.raises(LeanLMError, match=needle):
        preset("tiny", **bad)


def test_config_from_dict_rejects_unknown_keys_and_wrong_types():
    with pytest.raises(LeanLMError, match="unknown key 'hidden'"):
        model_config({"hidden": 3})
    with pytest.raises(LeanLMError, match=r"model\.dim: expected int"):
        model_config({"dim": "64"})
    with pytest.raises(LeanLMError, match="unknown preset"):
        preset("gpt-5")
    cfg = model_config(preset("tiny").to_dict())
    assert cfg == preset("tiny")
    with_methods = preset("subllm-cpu-24l", lte={"expert_size": 8})
    assert model_config(with_methods.to_dict()) == with_methods and with_methods.arch == "subllm+lte"


def test_bf16_forward_runs_close_to_fp32(tiny_model):
    x = torch.randint(0, 512, (1, 32))
    with torch.no_grad():
        a = tiny_model(x)
        b = tiny_model.to(torch.bfloat16)(x).float()
    assert (a - b).abs().max() < 0.1


@pytest.mark.slow
def test_smollm2_logits_match_transformers_gguf_load(smollm2):
    from transformers import AutoModelForCausalLM

    from leanlm.hf import smollm2_gguf

    model, tok = smollm2
    f = smollm2_gguf()
    hf = AutoModelForCausalLM.from_pretrained(str(f.parent), gguf_file=f.name).eval()
    ids = torch.tensor([tok.encode("The capital of France is Paris. The capital of Germany is" * 8)])
    with torch.no_grad():
        assert (model(ids) - hf(ids).logits).abs().max().item() <= 1e-4


def test_decode_layout_keeps_values_ties_and_restores():
    from leanlm.kernels import decode_layout

    model = Transformer(preset("tiny", tie_embeddings=True)).init_weights(seed=0).eval()
    x = torch.randint(0, 512, (1, 12))
    with torch.no_grad():
        ref = model(x)
        with decode_layout(model):
            assert not model.layers[0].mlp.down_proj.weight.is_contiguous()
            assert model.lm_head.weight is model.embed_tokens.weight
            assert torch.allclose(model(x), ref, atol=1e-5)
    assert all(p.is_contiguous() for p in model.parameters())
    assert torch.equal(model(x), ref)
    # after a generation (inference mode) the weights still train
    from leanlm.generate import generate

    generate(model, [[1, 2, 3]], max_new_tokens=3)
    torch.nn.functional.cross_entropy(model(x)[0], x[0]).backward()
    assert all(p.grad is not None for p in model.parameters())
